"""ZeRO-Infinity on CPU (issue #9): raw DeepSpeed's hand-set NVMe buffers crash, runx's derived settings train
with loss parity to ZeRO-3, and the aio probe. Named test_z_* so it is collected last: tests/run.sh starts the
async_io JIT build in the background and these tests wait for it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import OFFLINE_ENV, losses, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_M = ["recipe=sft", "model=llama_m", "data=tiny_text", "logger=none", "trainer.progress=false",
           "trainer.max_steps=5", "trainer.ckpt_every=0", "trainer.eval_every=0", "trainer.micro_batch_size=4",
           "data.max_train_samples=64", "optim.lr=1e-3", "optim.warmup_ratio=0"]


@pytest.fixture(scope="module")
def aio_ready():
    """Wait (up to ~8 min) for the async_io op: the background build of tests/run.sh, or build it here.
    torch's JIT builder holds a lock in the build folder, so a second builder waits for the first."""
    t0 = time.time()
    env = dict(os.environ, **OFFLINE_ENV)
    p = subprocess.run([sys.executable, "-m", "runx.trainers.nvme", "--build-aio"], capture_output=True, text=True,
                       env=env, timeout=480, cwd=REPO)
    assert p.returncode == 0 and "ready" in p.stdout, \
        f"async_io did not build in {time.time() - t0:.0f}s (needs libaio-dev):\n{p.stdout}\n{p.stderr[-3000:]}"


RAW = r"""
# Raw DeepSpeed, as its docs configure ZeRO-Infinity (offload_param/offload_optimizer nvme, aio defaults), with
# the parameters really kept on NVMe (max_in_cpu=0) and a hand-set buffer_count.
import json, os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
from runx.trainers import runtime
runtime.ensure_dist_env(); runtime.init_distributed("cpu")
import torch, deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import HfDeepSpeedConfig
path, count, extra = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
      "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4, **extra,
          "offload_param": {"device": "nvme", "nvme_path": path, "pin_memory": False, "buffer_count": count,
                            "buffer_size": 1e8, "max_in_cpu": 0},
          "offload_optimizer": {"device": "nvme", "nvme_path": path, "pin_memory": False, "buffer_count": 4,
                                "fast_init": False}},
      "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
              "overlap_events": True}}
conf = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
torch.manual_seed(0)
keep = HfDeepSpeedConfig(ds)  # HF initialises the partitioned weights (gathered) under zero.Init
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = LlamaForCausalLM(conf)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=ds)
g = torch.Generator().manual_seed(0)
for step in range(2):
    ids = torch.randint(0, 4096, (4, 64), generator=g)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss); engine.step()
    print("RAW_STEP", step, float(loss), flush=True)
# What this script checks ends here. The interpreter's teardown of DeepSpeed's aio handle threads aborted once
# in ~10 CI runs ("terminate called without an active exception", exit -6) after both steps had run: skip it.
sys.stderr.flush()
os._exit(0)
"""


def _raw(tmp_path, name, count, extra=None):
    script = tmp_path / "raw_nvme.py"
    script.write_text(RAW)
    env = dict(os.environ, **OFFLINE_ENV)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(script), str(tmp_path / name), str(count), json.dumps(extra or {})],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def _llama_m_stats():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from runx.trainers.nvme import param_stats
    conf = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        return param_stats(LlamaForCausalLM(conf))


def test_hand_set_buffers_crash_raw_deepspeed_derived_settings_do_not(aio_ready, tmp_path):
    """buffer_count=5 (DeepSpeed's documented default) with the parameters on NVMe: step 0 runs, step 1 dies
    with "Not enough buffers" (the reuse distance keeps every matrix of this small model live). The same 5
    buffers with runx's derived reuse distance train (runx's derived buffer count is the next test)."""
    from runx.trainers.nvme import nvme_param_settings
    crash = _raw(tmp_path, "crash", 5)
    out = crash.stdout + crash.stderr
    assert crash.returncode != 0 and "Not enough buffers 0 for swapping" in out, out[-3000:]
    assert "RAW_STEP 0" in out and "RAW_STEP 1" not in out
    derived = nvme_param_settings(_llama_m_stats(), 4, buffer_count=5)
    assert derived["buffer_count"] == 5 and derived["max_in_cpu"] == 0
    fixed = _raw(tmp_path, "fixed", 5, {"stage3_max_reuse_distance": derived["stage3_max_reuse_distance"]})
    assert fixed.returncode == 0 and fixed.stdout.count("RAW_STEP") == 2, fixed.stderr[-3000:]
    # the step both ran is the same step
    first = lambda out: next(l for l in out.splitlines() if l.startswith("RAW_STEP 0"))
    assert first(fixed.stdout) == first(crash.stdout)


def test_zero_infinity_trains_llama_with_loss_parity_to_zero3(aio_ready, tmp_path):
    """llama_m (4.2M params, 8 matrices >= 1 MiB) with parameters and optimizer states on NVMe through
    `runx train trainer=zero3_nvme` (derived buffers, no hand-set numbers): 5 steps whose losses match
    ZeRO-3's within 1e-3 relative, with the parameters and optimizer states really on disk: in the run's own
    folder under nvme_path, which a finished run removes (here a hard stop after step 5's checkpoint keeps it)."""
    nv = tmp_path / "nvme"
    run_cli(["train", *LLAMA_M, "trainer=zero3", f"run_dir={tmp_path / 'z3'}"])
    p = run_cli(["train", *LLAMA_M, "trainer=zero3_nvme", f"trainer.nvme_path={nv}", f"run_dir={tmp_path / 'nv'}",
                 "trainer.ckpt_every=5"], env={"RUNX_CRASH_AFTER_STEP": "5"}, check=False)
    assert p.returncode == 17, p.stderr[-3000:]
    (swap,) = list(nv.glob("runx-nv-*"))
    a, b = losses(tmp_path / "z3"), losses(tmp_path / "nv")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-3 * abs(a[s]), (s, a[s], b[s])
    assert a[5] < a[1]
    params = list((swap / "zero_stage_3" / "float32params" / "rank0").glob("*_param.tensor.swp"))
    states = list((swap / "zero_stage_3" / "optimizer" / "rank0").glob("exp_avg*.swp"))
    # the optimizer swapper pipelines over derived sub-groups (trainers/nvme.py: nvme_optimizer_settings):
    # two Adam states per sub-group on disk
    zero = json.loads((tmp_path / "nv" / "ds_config.json").read_text())["zero_optimization"]
    assert zero["offload_optimizer"]["pipeline_read"] and zero["offload_optimizer"]["pipeline_write"]
    groups = {p.name.split("-")[1] for p in states}
    assert len(params) == 8 and len(groups) >= 2 and len(states) == 2 * len(groups), (params, states)
    # resuming it on NVMe is refused (DeepSpeed cannot load a checkpoint there); the message names the stopped
    # run's swap files, which neither way out needs
    p = run_cli(["train", *LLAMA_M, "trainer=zero3_nvme", f"trainer.nvme_path={nv}", f"run_dir={tmp_path / 'nv'}",
                 "trainer.ckpt_every=5"], check=False)
    assert p.returncode == 2 and f"The stopped run's swap files ({swap}, " in " ".join(p.stderr.split()), p.stderr


def test_params_in_cpu_with_optimizer_on_nvme_use_the_documented_block(aio_ready, tmp_path):
    """offload_param=cpu + offload_optimizer=nvme is handed to DeepSpeed as ZeRO-Infinity's documented block
    (parameters "nvme" with max_in_cpu covering all of them: written once at start-up, then kept in CPU
    memory; trainers/nvme.py: deepspeed_param_device) and trains with ZeRO-3's losses."""
    nv = tmp_path / "nvme"
    run_cli(["train", *LLAMA_M, "trainer=zero3", f"run_dir={tmp_path / 'z3'}"])
    p = run_cli(["train", *LLAMA_M, "trainer=zero3", "trainer.offload_param=cpu", "trainer.offload_optimizer=nvme",
                 f"trainer.nvme_path={nv}", f"run_dir={tmp_path / 'ic'}", "trainer.ckpt_every=5"],
                env={"RUNX_CRASH_AFTER_STEP": "5"}, check=False)   # a hard stop keeps the run's swap files
    assert p.returncode == 17, p.stderr[-3000:]
    a, b = losses(tmp_path / "z3"), losses(tmp_path / "ic")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-3 * abs(a[s]), (s, a[s], b[s])
    zero = json.loads((tmp_path / "ic" / "ds_config.json").read_text())["zero_optimization"]
    assert zero["offload_param"]["device"] == "nvme" and zero["offload_optimizer"]["device"] == "nvme"
    assert zero["offload_param"]["max_in_cpu"] > 4_000_000  # llama_m: 4.2M parameters, all of them
    (swap,) = list(nv.glob("runx-ic-*"))
    assert list((swap / "zero_stage_3" / "optimizer" / "rank0").glob("exp_avg*.swp"))


def test_zero_infinity_bf16_survives_duplicate_nvme_prefetch(aio_ready, tmp_path):
    """bf16 llama_m with parameters on NVMe: DeepSpeed 0.19.8's NVMe prefetcher lists the LM head twice (its
    forward use is followed at once by its backward use) and, unpatched, dies at step 2 with "param N already
    assigned swap buffer id B" (an H100 run hit it the same way). With trainers/ds_patches.py the run
    matches bf16 ZeRO-3 (same partitioned bf16 arithmetic)."""
    bf16 = [*LLAMA_M, "trainer.precision=bf16"]
    run_cli(["train", *bf16, "trainer=zero3", f"run_dir={tmp_path / 'z3'}"])
    run_cli(["train", *bf16, "trainer=zero3_nvme", f"trainer.nvme_path={tmp_path / 'nvme'}",
             f"run_dir={tmp_path / 'nv'}"])
    a, b = losses(tmp_path / "z3"), losses(tmp_path / "nv")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-3 * abs(a[s]), (s, a[s], b[s])


def test_aio_probe_is_cached_and_sane(aio_ready, tmp_path):
    from runx.trainers.nvme import cached_probe, probe_aio
    old_cache = os.environ.get("RUNX_CACHE")
    os.environ["RUNX_CACHE"] = str(tmp_path / "cache")
    try:
        t0 = time.time()
        r = probe_aio(str(tmp_path / "disk"), size_mb=16,
                      grid={"block_size": [262144, 1048576], "queue_depth": [8, 32], "intra_op_parallelism": [1, 2]})
        first = time.time() - t0
        assert r["trials"] == 8 and r["read_GBps"] > 0.01 and r["write_GBps"] > 0.01
        assert r["block_size"] in (262144, 1048576) and r["queue_depth"] in (8, 32)
        assert r["fastest_seconds"] <= r["best_seconds"] <= r["default_seconds"]
        if r["chosen"] == "deepspeed_default":  # the defaults stay unless another point is >= 10% faster
            assert (r["block_size"], r["queue_depth"], r["intra_op_parallelism"]) == (1048576, 8, 1)
        else:
            assert r["default_seconds"] > 1.1 * r["best_seconds"]
        assert cached_probe(str(tmp_path / "disk")) == r
        t0 = time.time()
        assert probe_aio(str(tmp_path / "disk"), size_mb=16) == r and time.time() - t0 < first
        assert not [f for f in os.listdir(tmp_path / "disk") if f.startswith(".runx_aio_probe")]
        # DeepSpeed's defaults are measured first: out of time after one point (a slow disk), they are kept (the
        # grid's 256 KiB points came first, and the fastest of them won without having to beat the defaults)
        short = probe_aio(str(tmp_path / "disk"), size_mb=16, refresh=True, time_budget_s=0.0)
        assert short["trials"] == 1 and short["chosen"] == "deepspeed_default" and short["default_seconds"]
        assert (short["block_size"], short["queue_depth"], short["intra_op_parallelism"]) == (1048576, 8, 1)
    finally:
        os.environ.pop("RUNX_CACHE", None) if old_cache is None else os.environ.update(RUNX_CACHE=old_cache)


def test_zero_infinity_loads_a_pretrained_model(aio_ready, tmp_path):
    """The default job's pretrained MiniLM under trainer=zero3_nvme: the NVMe settings are derived from a shape
    model built from the checkpoint's config (from_pretrained refuses the meta device, and every pretrained
    model failed before step 1); its first losses match ZeRO-3's."""
    common = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.ckpt_every=0", "logger=none",
              "trainer.progress=false", "data.max_train_samples=64", "trainer.micro_batch_size=8"]
    run_cli(["train", *common, "trainer=zero3", f"run_dir={tmp_path / 'z3'}"])
    run_cli(["train", *common, "trainer=zero3_nvme", f"trainer.nvme_path={tmp_path / 'nvme'}",
             f"run_dir={tmp_path / 'nv'}"])
    a, b = losses(tmp_path / "z3"), losses(tmp_path / "nv")
    assert sorted(a) == sorted(b) == [1, 2]
    assert all(abs(a[s] - b[s]) <= 1e-3 * abs(a[s]) for s in a), (a, b)


def test_lora_ga_with_gradient_checkpointing_on_nvme_matches_zero3(aio_ready, tmp_path):
    """LoRA-GA's estimation on NVMe-partitioned weights, then training with gradient checkpointing: the engine's
    recompute no longer goes through the estimation's dead ZeRO hooks (it crashed at the first backward); the
    losses match ZeRO-3's."""
    common = ["recipe=lora_ga", "model.gradient_checkpointing=true", "recipe.grad_batches=2", "trainer.max_steps=3",
              "data.max_train_samples=48", "trainer.micro_batch_size=8", "trainer.eval_every=0",
              "trainer.ckpt_every=0", "logger=none", "trainer.progress=false"]
    run_cli(["train", *common, "trainer=zero3", f"run_dir={tmp_path / 'z3'}"])
    run_cli(["train", *common, "trainer=zero3_nvme", f"trainer.nvme_path={tmp_path / 'nvme'}",
             f"run_dir={tmp_path / 'nv'}"])
    a, b = losses(tmp_path / "z3"), losses(tmp_path / "nv")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) <= 1e-3 * abs(a[s]) for s in a), (a, b)


def test_verifree_evaluates_its_start_on_nvme_partitioned_weights(aio_ready, tmp_path):
    """VeriFree's evaluation before RL (on by default) generates through the engine, whose hooks fetch each layer
    from NVMe: it failed when it ran in prepare(), before the engine existed. Its start numbers match ZeRO-3's."""
    common = ["recipe=verifree", "debug=smoke", "recipe.reward=verifier", "recipe.warmup_steps=0",
              "trainer.max_steps=1", "logger=none"]
    for name, extra in (("z3", ["trainer=zero3"]),
                        ("nv", ["trainer=zero3_nvme", f"trainer.nvme_path={tmp_path / 'nvme'}"])):
        run_cli(["train", *common, *extra, f"run_dir={tmp_path / name}"], env={"OMP_NUM_THREADS": "1"})
    starts = []
    for name in ("z3", "nv"):
        with open(tmp_path / name / "summary.json") as f:
            starts.append({k: v for k, v in json.load(f).items() if k.startswith("start/")})
    assert starts[0] and starts[0] == starts[1], starts
    with open(tmp_path / "nv" / "train.log") as f:      # DeepSpeed's async_io gcc probe stays out of the log
        log = f.read()
    assert "ZeRO-3: building the model partitioned" in log and "compilers" not in log and "-laio" not in log


def test_a_zero_infinity_checkpoint_resumes_exactly_under_cpu_offload_and_is_refused_on_nvme(aio_ready, tmp_path):
    """DeepSpeed cannot load a checkpoint into an NVMe-offloaded engine (Adam restarted silently from step 1):
    resume=auto into NVMe offload stops with a config error before any model is built, naming the way out; that
    way out (the same checkpoint under CPU offload) continues the NVMe run's losses exactly."""
    common = ["recipe=sft", "data=tiny_text", "model=tiny_llama", "debug=smoke", "trainer.max_steps=4",
              "trainer.ckpt_every=1", "trainer.keep_last=10", "logger=none", "trainer.progress=false"]
    nvme = lambda name: ["trainer=zero3_nvme", f"trainer.nvme_path={tmp_path / ('nv_' + name)}"]
    run_cli(["train", *common, *nvme("whole"), f"run_dir={tmp_path / 'whole'}"])
    assert list((tmp_path / "nv_whole").iterdir()) == []   # a finished run removes its swap files
    p = run_cli(["train", *common, *nvme("cut"), f"run_dir={tmp_path / 'cut'}"], env={"RUNX_CRASH_AFTER_STEP": "2"},
                check=False)
    assert p.returncode == 17
    p = run_cli(["train", *common, *nvme("cut"), f"run_dir={tmp_path / 'cut'}"], check=False)
    assert p.returncode == 2 and "cannot load a checkpoint into an NVMe-offloaded engine" in p.stderr, p.stderr
    assert "trainer.offload_optimizer=nvme" in p.stderr and "Traceback" not in p.stderr

    run_cli(["train", *common, "trainer=zero3_cpu_offload", f"resume={tmp_path / 'cut' / 'ckpt'}",
             f"run_dir={tmp_path / 'cpu'}"])
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cpu")
    assert sorted(b) == [3, 4] and all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in b), (a, b)


def test_each_run_swaps_into_its_own_folder_and_removes_its_rank_files(tmp_path):
    """Two runs with one nvme_path (a parallel sweep, SLURM jobs on one node) swapped into the same file names
    and overwrote each other's optimizer states; each run now has its own folder, the same on a resume."""
    from runx.trainers.nvme import remove_swap_files, run_swap_dir
    a, b = run_swap_dir("/nvme", str(tmp_path / "sweep" / "0")), run_swap_dir("/nvme", str(tmp_path / "sweep" / "1"))
    assert a != b and a.startswith("/nvme/runx-0-") and b.startswith("/nvme/runx-1-")
    assert run_swap_dir("/nvme", str(tmp_path / "sweep" / "0") + "/") == a
    swap = tmp_path / "swap"
    for rank in (0, 1):
        for kind in ("optimizer", "float32params"):
            d = swap / "zero_stage_3" / kind / f"rank{rank}"
            d.mkdir(parents=True)
            (d / "exp_avg-0_0.tensor.swp").write_bytes(b"x")
    remove_swap_files(str(swap), 0)   # rank 0 ends first: rank 1's files stay for it
    assert sorted(str(p.relative_to(swap)) for p in swap.rglob("*.swp")) == [
        "zero_stage_3/float32params/rank1/exp_avg-0_0.tensor.swp",
        "zero_stage_3/optimizer/rank1/exp_avg-0_0.tensor.swp"]
    remove_swap_files(str(swap), 1)
    assert not swap.exists()
