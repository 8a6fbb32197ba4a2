"""Offload benchmark (issue #9): GPU-only, CPU offload and NVMe offload, runx vs raw DeepSpeed with its
documented example settings, on the same model and batches; plus the disk-bandwidth floor of nvme_path,
measured in the same run.

Arms (each in its own process, so memory and pinned buffers never leak between them):
  gpu_only           ZeRO-3, nothing offloaded                  raw: DeepSpeed's ZeRO-3 example block
  cpu_offload        params + optimizer -> CPU                  raw: + offload_* {device: cpu, pin_memory}
  nvme_optimizer     optimizer -> NVMe, params -> CPU           raw: the documented ZeRO-Infinity block
                     runx: derived optimizer swapper (pipelined over
                     sub-groups when its pinned buffers fit); params
                     handed to DeepSpeed as "nvme" + max_in_cpu = all
                                                                     (buffer_count 5, buffer_size 1e8,
                                                                     max_in_cpu 1e9; DeepSpeed still writes
                                                                     the parameter partitions to nvme_path)
  nvme_params        params + optimizer -> NVMe (max_in_cpu 0)  raw: the same block with max_in_cpu 0
                     runx: derived buffers / reuse distance          (hand-set buffers: crashes at step 1)
  nvme_optimizer_docblock  runx given raw's whole block through trainer.ds_overrides (params "nvme" with
                     max_in_cpu 1e9, buffer_count 5, buffer_size 1e8, reuse distance 1e9; serial optimizer
                     swapper, one sub-group): the same DeepSpeed config as raw's nvme_optimizer, so runx/raw
                     isolates runx itself (compared with that raw run).
  nvme_optimizer_ga  optimizer -> NVMe, params on the device, grad_accum G chosen from the measured floor
                     so that compute covers the optimizer's I/O (runx only)
Both sides use torch's AdamW (no JIT-built DeepSpeed CPU Adam) and the sft recipe's model, data and loss.
Step time = median after warm-up; model TFLOPS = 6 * params * tokens / step time. The NVMe optimizer step
(DeepSpeedEngine._take_model_step, timed) is compared with the I/O floor 16N/R + 12N/W (+ 2-4N/W when
parameters live on NVMe), R and W from DeepSpeed's aio on nvme_path with the probe's best settings.

    python bench/offload.py --quick                    # CPU rows (llama_m, fp32), 3 alternating rounds
    python bench/offload.py --device cuda --quick      # GPU rows, ~2 min on one H100 (bf16 ~0.13B Llama)
Writes bench/results/offload.json (one entry per device).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CPU_MODEL = ["model=llama_m", "data.max_length=64", "trainer.micro_batch_size=4"]


def packed_text(path: str, chars: int, rows: int = 4096) -> str:
    """A JSONL of the stdlib docstrings packed into rows of `chars` bytes (byte tokenizer: every sequence fills
    data.max_length, so each micro-batch does the same, full work)."""
    from runx.recipes.text_data import ASSETS, _read_jsonl
    texts = [r["text"] for r in _read_jsonl(os.path.join(ASSETS, "stdlib_topics.jsonl"))]
    blob = "\n\n".join(texts)
    with open(path, "w") as f:
        for i in range(rows):
            start = (i * chars * 7) % max(1, len(blob) - chars)
            f.write(json.dumps({"text": blob[start:start + chars]}) + "\n")
    return path
GPU_MODEL = [  # ~0.13B Llama from a config (no download), bf16, 8 x 1024 tokens per micro-batch
    "model=tiny_llama", "++model.from_config.hidden_size=768", "++model.from_config.intermediate_size=2048",
    "++model.from_config.num_hidden_layers=12", "++model.from_config.num_attention_heads=12",
    "++model.from_config.num_key_value_heads=12", "++model.from_config.vocab_size=32000",
    "++model.from_config.max_position_embeddings=1024", "trainer.precision=bf16", "data.max_length=1024",
    "trainer.micro_batch_size=8",
]
LAYOUT = {  # runx trainer overrides per arm
    "gpu_only": ["trainer=zero3"],
    "cpu_offload": ["trainer=zero3_cpu_offload"],
    "nvme_optimizer": ["trainer=zero3", "trainer.offload_param=cpu", "trainer.offload_optimizer=nvme"],
    "nvme_params": ["trainer=zero3_nvme"],
    "nvme_optimizer_docblock": ["trainer=zero3_nvme",
                                "++trainer.ds_overrides.zero_optimization.offload_param.max_in_cpu=1e9",
                                "++trainer.ds_overrides.zero_optimization.offload_param.buffer_count=5",
                                "++trainer.ds_overrides.zero_optimization.offload_param.buffer_size=1e8",
                                "++trainer.ds_overrides.zero_optimization.stage3_max_reuse_distance=1e9",
                                # and raw's serial optimizer swapper (runx would derive a pipelined one)
                                "++trainer.ds_overrides.zero_optimization.sub_group_size=1e9",
                                "++trainer.ds_overrides.zero_optimization.offload_optimizer.buffer_count=4",
                                "++trainer.ds_overrides.zero_optimization.offload_optimizer.pipeline_read=false",
                                "++trainer.ds_overrides.zero_optimization.offload_optimizer.pipeline_write=false"],
    "nvme_optimizer_ga": ["trainer=zero3", "trainer.offload_optimizer=nvme"],
}


# =========================================================================================== raw DeepSpeed
def raw_ds_config(arm: str, cfg, nvme_path: str, pin: bool) -> dict:
    """DeepSpeed's documented example blocks (docs/_pages/config-json.md, the HF DeepSpeed ZeRO-3 example)."""
    t = cfg.trainer
    zero = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
            "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
            "stage3_param_persistence_threshold": float(t.stage3_param_persistence_threshold),
            "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True}
    if arm == "cpu_offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if arm in ("nvme_optimizer", "nvme_params"):
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme_path, "pin_memory": pin,
                                     "buffer_count": 4, "fast_init": False}
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme_path, "pin_memory": pin, "buffer_count": 5,
                                 "buffer_size": 1e8, "max_in_cpu": 1e9 if arm == "nvme_optimizer" else 0}
    ds = {"train_micro_batch_size_per_gpu": int(t.micro_batch_size), "gradient_accumulation_steps": int(t.grad_accum),
          "train_batch_size": int(t.micro_batch_size) * int(t.grad_accum), "gradient_clipping": float(t.grad_clip),
          "steps_per_print": 10 ** 9, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
          "zero_force_ds_cpu_optimizer": False}
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    if "nvme" in arm:
        ds["aio"] = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                     "overlap_events": True}
    return ds


def raw_arm(arm: str, cfg, nvme_path: str) -> dict:
    """The loop a user writes around deepspeed.initialize: same model, batches, loss and optimizer as runx."""
    import torch

    from runx.recipes.sft import SFT
    from runx.trainers import runtime
    dev = runtime.pick_device(cfg.trainer.device)
    runtime.init_distributed(dev)
    import deepspeed
    ds = raw_ds_config(arm, cfg, nvme_path, pin=dev == "cuda")
    runtime.seed_everything(int(cfg.seed))
    recipe = SFT(cfg, tempfile.mkdtemp(prefix="runx_bench_"))
    keep = None
    if "nvme" in arm:  # parameters on NVMe: built partitioned (HF initialises the partitions)
        from transformers.integrations import HfDeepSpeedConfig
        keep = HfDeepSpeedConfig(ds)  # noqa: F841
    model = recipe.build_model()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(cfg.optim.lr))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    train, _ = recipe.build_data()
    from _raw_deepspeed import raw_steps
    return {**raw_steps(engine, recipe, train, cfg, label=arm), "n_params": n_params}


# =========================================================================================== runx
def runx_arm(arm: str, cfg, run_dir: str) -> dict:
    from runx.cli.train import launch
    from runx.trainers.tracking import read_metrics
    launch(cfg, run_dir)
    hist = read_metrics(run_dir)
    from runx.trainers.plan import model_facts
    n = model_facts(cfg).n_trainable
    return {"step_s": [h["step_time_s"] for h in hist], "tokens": [h.get("tokens_per_s", 0) * h["step_time_s"]
                                                                    for h in hist],
            "losses": [h["loss"] for h in hist], "n_params": n}


def child(impl: str, arm: str, overrides: list[str], out: str) -> None:
    """One arm in this process; the optimizer step (at the accumulation boundary) is timed on the side."""
    import deepspeed.runtime.engine as eng

    from _raw_deepspeed import synced_call

    from runx.cli.config import compose
    opt_times: list[float] = []
    orig = eng.DeepSpeedEngine._take_model_step

    def timed(self, *a, **k):
        r, seconds = synced_call(orig, self, *a, **k)
        opt_times.append(seconds)
        return r
    eng.DeepSpeedEngine._take_model_step = timed
    cfg = compose(overrides)
    try:
        res = runx_arm(arm, cfg, str(cfg.run_dir)) if impl == "runx" else raw_arm(arm, cfg, str(cfg.trainer.nvme_path))
        res["ok"] = True
    except BaseException as e:  # a crash is a result (raw DeepSpeed with hand-set NVMe buffers)
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    res["opt_step_s"] = opt_times
    with open(out, "w") as f:
        json.dump(res, f)
    os._exit(0)  # skip DeepSpeed's atexit/aio teardown


# =========================================================================================== orchestration
def run_arm(impl, arm, overrides, timeout) -> dict:
    out = tempfile.mktemp(prefix=f"offload_{impl}_{arm}_", suffix=".json")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", impl, arm, out, "--", *overrides],
                           capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
        tail = (p.stdout + p.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f}s", "wall_s": time.time() - t0}
    if not os.path.exists(out):
        return {"ok": False, "error": f"exit {p.returncode}: {tail}", "wall_s": time.time() - t0}
    res = json.load(open(out))
    res["wall_s"] = round(time.time() - t0, 1)
    if not res.get("ok"):
        if "Not enough buffers" in tail and "Not enough buffers" not in res.get("error", ""):
            res["error"] += " (Not enough buffers)"
    return res


def merge_runs(runs: list[dict], warmup: int) -> dict:
    """One arm's runs over rounds: each run's warm-up steps dropped, the rest pooled, then summarized. A failed
    run is the result only if no run succeeded."""
    ok = [r for r in runs if r.get("ok") and len(r.get("step_s", [])) > warmup]
    if not ok:
        return runs[-1]
    res = {k: v for k, v in ok[-1].items() if not isinstance(v, list)}
    for key in ("step_s", "tokens", "opt_step_s", "losses"):
        res[key] = [x for r in ok for x in r.get(key, [])[warmup:]]
    res["runs"] = len(ok)
    return summarize(res, 0)


def summarize(res: dict, warmup: int) -> dict:
    if not res.get("ok") or len(res.get("step_s", [])) <= warmup:
        return res
    st, tok = res["step_s"][warmup:], res["tokens"][warmup:]
    step = statistics.median(st)
    res["step_median_s"] = step
    res["tokens_per_step"] = statistics.median(tok)
    res["model_tflops"] = 6.0 * res["n_params"] * res["tokens_per_step"] / step / 1e12
    ot = res.get("opt_step_s", [])[warmup:]
    if ot:
        res["opt_step_median_s"] = statistics.median(ot)
    return res


def floors(n_params: int, probe: dict, param_bytes: int) -> dict:
    """Seconds of disk I/O an NVMe optimizer step cannot beat: read fp32 master + m + v + grads (16 B/param),
    write master + m + v (12 B/param), plus the updated parameters when they live on NVMe."""
    # the disk's best measured rates over the probe grid (not only the chosen setting's): the strictest floor
    R = probe.get("fastest_read_GBps", probe["read_GBps"]) * 1e9
    W = probe.get("fastest_write_GBps", probe["write_GBps"]) * 1e9
    opt = 16 * n_params / R + 12 * n_params / W
    return {"nvme_optimizer": opt, "nvme_optimizer_docblock": opt, "nvme_optimizer_ga": opt,
            "nvme_params": opt + param_bytes * n_params / W}


RAW_OF = {"nvme_optimizer_docblock": "nvme_optimizer"}  # arms compared with another arm's raw run


def table_of(rows: dict, floor: dict) -> list[dict]:
    table = []
    gpu_tflops = rows.get("gpu_only", {}).get("runx", {}).get("model_tflops")
    for arm in LAYOUT:
        impls = rows.get(arm)
        if not impls:
            continue
        r, w = impls.get("runx", {}), impls.get("raw") or rows.get(RAW_OF.get(arm), {}).get("raw", {})
        row = {"arm": arm, "runx_step_s": r.get("step_median_s"), "raw_step_s": w.get("step_median_s"),
               "runx_tflops": r.get("model_tflops"), "raw_tflops": w.get("model_tflops"),
               "raw_error": None if w.get("ok", True) else w.get("error"),
               "runx_error": None if r.get("ok", True) else r.get("error")}
        if r.get("step_median_s") and w.get("step_median_s"):
            row["runx_over_raw_throughput"] = w["step_median_s"] / r["step_median_s"]
        if arm in floor and r.get("opt_step_median_s"):
            row.update(opt_step_s=r["opt_step_median_s"], io_floor_s=floor[arm],
                       opt_step_over_floor=r["opt_step_median_s"] / floor[arm])
        if gpu_tflops and r.get("model_tflops"):
            row["tflops_vs_gpu_only"] = r["model_tflops"] / gpu_tflops
        if r.get("grad_accum"):
            row["grad_accum"] = r["grad_accum"]
        table.append(row)
    return table


def print_table(table: list[dict]) -> None:
    f = lambda v, s="{:.1f}": s.format(v) if isinstance(v, (int, float)) else "-"
    print("\narm                      runx ms/step   raw ms/step  runx/raw  TFLOPS(runx)  vs GPU-only  opt step/IO floor")
    for row in table:
        print(f"{row['arm']:<23} {f(row['runx_step_s'] and row['runx_step_s'] * 1e3):>12} "
              f"{f(row['raw_step_s'] and row['raw_step_s'] * 1e3):>12} "
              f"{f(row.get('runx_over_raw_throughput'), '{:.3f}'):>9} {f(row['runx_tflops'], '{:.3f}'):>13} "
              f"{f(row.get('tflops_vs_gpu_only'), '{:.3f}'):>12} {f(row.get('opt_step_over_floor'), '{:.2f}'):>10}"
              + (f"   raw: {row['raw_error'][:90]}" if row.get("raw_error") else "")
              + (f"   runx: {row['runx_error'][:90]}" if row.get("runx_error") else ""), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--nvme-path", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no arm after this many seconds (default: 125 for --quick on cuda)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="repeat the whole arm list this many times, alternating runx/raw, and report medians over "
                         "all timed steps (default 3 on CPU, 1 on cuda: one CPU run of an arm varies by +-15%%)")
    ap.add_argument("--arms", default=None,
                    help="comma-separated subset of the arms to run (default: all); with --merge the other arms' "
                         "rows of the same device are kept from --out")
    ap.add_argument("--merge", action="store_true",
                    help="keep this device's earlier arm results in --out for the arms not run now (a time-boxed "
                         "GPU session split over two calls)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "offload.json"))
    a = ap.parse_args()
    chosen = set(a.arms.split(",")) if a.arms else set(LAYOUT)
    if chosen - set(LAYOUT):
        ap.error(f"--arms: unknown {sorted(chosen - set(LAYOUT))}; valid: {', '.join(LAYOUT)}")
    rounds = a.rounds or (1 if a.device == "cuda" else 3)
    t_start = time.time()
    # the GPU session is time-boxed (bench/gpu_check.sh gives this script 150 s); the CPU rows are not
    budget = a.budget_s or ((125.0 if a.device == "cuda" else 600.0) if a.quick else 1800.0)
    if a.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    nvme = a.nvme_path or os.path.join(os.environ.get("TMPDIR", "/tmp"), "runx_bench_nvme")
    os.makedirs(nvme, exist_ok=True)
    steps = a.steps or (5 if a.quick else 8)  # 1 warm-up + 4 timed steps at least
    warmup = 1
    model = CPU_MODEL if a.device == "cpu" else GPU_MODEL
    seq = 64 if a.device == "cpu" else 1024
    data = packed_text(os.path.join(tempfile.mkdtemp(prefix="runx_bench_data_"), "packed.jsonl"), seq + 16)
    common = ["recipe=sft", "data=jsonl", f"data.path={data}", "data.val_fraction=0.01", *model,
              f"trainer.device={a.device}", "logger=none", "trainer.progress=false", "trainer.ckpt_every=0",
              "trainer.eval_every=0", "optim.warmup_ratio=0", "plan.check=false"]

    rows: dict = {}
    floor: dict = {}
    if a.merge and os.path.exists(a.out):
        earlier = json.load(open(a.out)).get(a.device, {})
        rows = {arm: impls for arm, impls in earlier.get("arms", {}).items() if arm not in chosen}
    # 1. the async_io op (JIT) and the disk floor, measured first, in this run
    from runx.trainers.nvme import build_async_io, probe_aio
    t0 = time.time()
    aio_ok = build_async_io()
    aio_build_s = time.time() - t0
    probe = probe_aio(nvme, size_mb=256 if a.device == "cuda" else 32, refresh=True) if aio_ok else None
    print(f"async_io {'ready' if aio_ok else 'MISSING'} ({aio_build_s:.0f}s); disk at {nvme}: "
          + (f"read {probe['read_GBps']:.2f} GB/s, write {probe['write_GBps']:.2f} GB/s (aio block "
             f"{probe['block_size']}, qd {probe['queue_depth']}, threads {probe['intra_op_parallelism']})"
             if probe else "-"), flush=True)
    # merged rows from an earlier call give the model size now: the floor (and the GA arm's G) need it first
    known_n = next((impls[i]["n_params"] for impls in rows.values() for i in impls if impls[i].get("n_params")), None)
    if known_n and probe:
        floor.update(floors(known_n, probe, 2 if a.device == "cuda" else 4))
    # the probe's choice, pinned (tune=false): the per-run folders below must not trigger a probe each
    aio = [f"trainer.aio.{k}={probe[k]}" for k in ("block_size", "queue_depth", "intra_op_parallelism")] \
        + ["trainer.aio.tune=false"] if probe else []

    gpu_name = None
    if a.device == "cuda":
        import torch
        gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None

    def write() -> list[dict]:
        table = table_of(rows, floor)
        result = {"device": a.device, "gpu": gpu_name, "quick": a.quick, "model": model, "steps": steps,
                  "rounds": rounds, "warmup": warmup, "aio_build_s": round(aio_build_s, 1), "disk": probe, "io_floor_s": floor,
                  "rows": table, "arms": {arm: {impl: {k: v for k, v in res.items() if k != "losses"}
                                                for impl, res in impls.items()} for arm, impls in rows.items()},
                  "targets": {"runx_over_raw_throughput": ">= 1.0 where raw runs", "opt_step_over_floor": "<= 1.3",
                              "nvme_optimizer_ga tflops_vs_gpu_only": ">= 0.5"},
                  "wall_s": round(time.time() - t_start, 1), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        prev = json.load(open(a.out)) if os.path.exists(a.out) else {}
        prev[a.device] = result
        with open(a.out, "w") as fh:
            json.dump(prev, fh, indent=1, default=str)
        return table

    # most informative first: the time box may cut the tail
    order = [("gpu_only", "runx"), ("gpu_only", "raw"), ("cpu_offload", "runx"), ("cpu_offload", "raw"),
             ("nvme_params", "runx"), ("nvme_optimizer_ga", "runx"), ("nvme_optimizer", "runx"),
             ("nvme_optimizer", "raw"), ("nvme_optimizer_docblock", "runx"), ("nvme_params", "raw")]
    order = [(arm, impl) for arm, impl in order if arm in chosen]
    runs_of: dict = {}  # (arm, impl) -> that arm's run results, one per round (merged by merge_runs)

    arm_no = {arm: i for i, arm in enumerate(dict.fromkeys(arm for arm, _ in order))}

    def round_order(r: int) -> list[tuple[str, str]]:
        """raw runs before runx in every other arm, swapped each round (so a one-round GPU run is not always
        runx-first); raw's crashing nvme_params runs once."""
        out = []
        for arm, impl in order:
            if impl == "raw" and arm == "nvme_params" and r > 0:
                continue
            if (r + arm_no[arm]) % 2 and impl == "raw" and out and out[-1] == (arm, "runx"):
                out.insert(len(out) - 1, (arm, impl))
            else:
                out.append((arm, impl))
        return out

    for rnd, (arm, impl) in ((r, ai) for r in range(rounds) for ai in round_order(r)):
        left = budget - (time.time() - t_start)
        if left < 20:
            rows.setdefault(arm, {})[impl] = {"ok": False, "error": "skipped: time budget"}
            continue
        if "nvme" in arm and not aio_ok:
            rows.setdefault(arm, {})[impl] = {"ok": False, "error": "async_io unavailable (install libaio-dev)"}
            continue
        # every run swaps into a fresh folder on the probed disk (no file reuse between runs), removed after it
        nvme_run = tempfile.mkdtemp(prefix=f"{arm}_{impl}_", dir=nvme)
        # on a GPU the arms without disk traffic take ~0.3 s a step: more timed steps cost little there
        n_steps = max(steps, 10) if a.device == "cuda" and "nvme" not in arm else steps
        over = common + LAYOUT[arm] + [f"trainer.max_steps={n_steps}", f"run_dir={tempfile.mkdtemp(prefix='runx_b_')}",
                                       f"trainer.nvme_path={nvme_run}"]
        if "nvme" in arm and impl == "runx":
            over += aio
        ga = None
        if arm == "nvme_optimizer_ga":
            # enough micro-steps that compute is ~2x the optimizer's I/O floor (target >= 0.5x GPU-only TFLOPS)
            micro = rows.get("gpu_only", {}).get("runx", {}).get("step_median_s")
            f_opt = floor.get("nvme_optimizer")
            ga = max(2, min(256, int(2 * f_opt / micro) + 1)) if (f_opt and micro) else 8
            over += [f"trainer.grad_accum={ga}", "trainer.max_steps=2"]
        one = run_arm(impl, arm, over, timeout=max(20, left))
        shutil.rmtree(nvme_run, ignore_errors=True)
        runs = runs_of.setdefault((arm, impl), [])
        runs.append(one)
        res = merge_runs(runs, warmup)
        if ga:
            res["grad_accum"] = ga
        rows.setdefault(arm, {})[impl] = res
        if res.get("ok") and res.get("n_params") and not floor and probe:
            floor.update(floors(res["n_params"], probe, 2 if a.device == "cuda" else 4))
        print(f"{arm:>18} {impl:>4}: "
              + (f"{res['step_median_s'] * 1e3:9.1f} ms/step  {res['model_tflops']:8.3f} TFLOPS"
                 + (f"  opt step {res['opt_step_median_s']:.3f}s" if "opt_step_median_s" in res else "")
                 if res.get("step_median_s") else f"FAILED {res.get('error', '')[:150]}")
              + f"  ({res.get('wall_s', 0):.0f}s wall)", flush=True)
        write()
    table = write()
    print_table(table)
    print(f"wrote {a.out} ({time.time() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, arm, out = sys.argv[2:5]
        if "trainer.device=cpu" in sys.argv:
            os.environ["DS_ACCELERATOR"] = "cpu"
        child(impl, arm, sys.argv[sys.argv.index("--") + 1:], out)
    sys.exit(main())
