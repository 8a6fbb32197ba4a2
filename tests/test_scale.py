"""Scale (issue #9): `runx plan` against DeepSpeed's estimators and measured peaks, the pre-flight check,
NVMe settings derivation, sweeps (2x2 multirun + report, Optuna preset, the parallel local launcher)."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from conftest import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

LLAMA = ["recipe=sft", "model=llama_m", "data=tiny_text", "logger=none", "trainer.progress=false",
         "trainer.micro_batch_size=4", "trainer.ckpt_every=0", "trainer.eval_every=0",
         "data.max_train_samples=64", "++model.from_config.num_hidden_layers=4",
         "++model.from_config.intermediate_size=2048", "++model.from_config.num_attention_heads=8",
         "++model.from_config.num_key_value_heads=8"]


def cli(args, **kw):
    """`runx` from outside the repo: Hydra finds runx's launcher plugin where it is installed (an editable install
    included, through runx's own plugin path), not in the working directory's hydra_plugins/."""
    import tempfile
    kw.setdefault("env", {})
    return run_cli(args, cwd=tempfile.gettempdir(), **kw)


# ------------------------------------------------------------------------------------------ plan: formulas
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (4, 2)])
def test_model_states_match_deepspeed_estimators(gpus, nodes):
    """Mixed precision + Adam: params + grads + optimizer states per GPU and per node's CPU equal
    DeepSpeed's estimate_zero2/zero3_model_states_mem_needs for every layout they cover."""
    from runx.trainers.plan import LAYOUTS, deepspeed_reference, model_states
    psi, largest = 1_364_000_000, 65_536_000
    covered = 0
    for lay in LAYOUTS:
        ref = deepspeed_reference(lay, psi, largest, gpus, nodes)
        if ref is None:
            continue
        covered += 1
        ms = model_states(lay, psi, largest, gpus, nodes, mixed=True, opt_bytes=8, buffer_factor=1.5)
        assert sum(ms["gpu"].values()) == pytest.approx(ref[1], rel=1e-6, abs=16), (lay, ms, ref)
        assert sum(ms["cpu"].values()) == pytest.approx(ref[0], rel=1e-6, abs=16), (lay, ms, ref)
    assert covered >= 5


def test_fp32_formula():
    """fp32 (our CPU runs), per rank: ZeRO-0 16 B/param, ZeRO-1/2 4 + 20/N, ZeRO-3 16/N; ZeRO-3 with params and
    optimizer offloaded keeps 20 B/param on the CPU (the fp32 master is a separate copy there)."""
    from runx.trainers.plan import Layout, model_states
    psi = 10_000_000
    ms = lambda lay, n=1: model_states(lay, psi, 0, n, 1, mixed=False, buffer_factor=1.0)
    assert sum(ms(Layout("z0", 0))["gpu"].values()) == 16 * psi
    assert sum(ms(Layout("z2", 2), 4)["gpu"].values()) == 4 * psi + 20 * psi // 4
    assert sum(ms(Layout("z3", 3), 4)["gpu"].values()) == 16 * psi // 4
    off = ms(Layout("z3o", 3, "cpu", "cpu"))
    assert sum(off["cpu"].values()) == 20 * psi and sum(off["gpu"].values()) == 0


# ------------------------------------------------------------------------------------------ NVMe derivation
def _llama_m_stats():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from runx.trainers.nvme import param_stats
    conf = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        return param_stats(LlamaForCausalLM(conf))


def test_nvme_buffers_cover_the_live_set():
    """Under DeepSpeed's default reuse distance every swappable llama_m matrix is live at the forward/backward
    turn (8 of them >= 1 MiB), so 5 hand-set buffers cannot work; the derived count covers them, and a
    hand-set count gets a reuse distance that fits it."""
    from runx.trainers.nvme import (derive_param_buffers, nvme_param_settings, reuse_distance_for_buffers,
                                    swappable_partitions)
    st = _llama_m_stats()
    sw = swappable_partitions(st, 4)
    assert len(sw) == 8 and max(sw) == 4096 * 256
    count, size = derive_param_buffers(st, 4, 1e9, 5e7)
    assert count >= len(sw) + 1 and size >= max(sw)
    s = nvme_param_settings(st, 4, buffer_count=5)
    assert s["buffer_count"] == 5 and s["max_in_cpu"] == 0 and s["stage3_max_reuse_distance"] < sum(sw)
    with pytest.raises(ValueError, match="nvme_buffer_count=2 is too small"):
        reuse_distance_for_buffers(st, 4, 2)
    with pytest.raises(ValueError, match="nvme_buffer_size"):
        nvme_param_settings(st, 4, buffer_size=1000)
    budget = nvme_param_settings(st, 4, buffer_budget_bytes=6 * size * 4)
    assert budget["buffer_count"] == 6 and budget["stage3_max_reuse_distance"] < 1e9


def test_nvme_optimizer_swapper_pipelines_when_its_buffers_fit():
    """Optimizer states on NVMe: llama_m (4.2M params) gets >= 2 swappable sub-groups and the pipelined
    swapper with enough buffers for three sub-groups in flight; a model too small for two >= 1 MiB
    sub-groups, or a pinned budget too small for the buffers, keeps DeepSpeed's serial swapper."""
    from runx.trainers.nvme import MIN_AIO_BYTES, nvme_optimizer_settings, optimizer_swap_buffers
    st = _llama_m_stats()
    s = nvme_optimizer_settings(st, n_states=2, pin_budget_bytes=2 ** 30)
    assert s["pipelined"] and s["block"]["pipeline_read"] and s["block"]["pipeline_write"]
    assert s["block"]["buffer_count"] == optimizer_swap_buffers(2) == 14
    assert MIN_AIO_BYTES // 4 <= s["sub_group_size"] <= st["n_params"] // 2
    assert s["pinned_bytes"] == 14 * 4 * (s["sub_group_size"] + st["largest"])
    tight = nvme_optimizer_settings(st, n_states=2, pin_budget_bytes=s["pinned_bytes"] - 1)
    assert not tight["pipelined"] and tight["block"] == {"buffer_count": 4, "fast_init": False}
    assert tight["sub_group_size"] is None
    tiny = nvme_optimizer_settings({"n_params": 300_000, "largest": 100_000}, pin_budget_bytes=2 ** 30)
    assert not tiny["pipelined"]
    two_ranks = nvme_optimizer_settings({**st, "world_size": 2}, pin_budget_bytes=2 ** 30)
    assert two_ranks["sub_group_size"] <= s["sub_group_size"]
    # the 5%-of-RAM budget is the node's, shared by its ranks (each rank took all of it: 8 ranks pinned 20%)
    from runx.trainers.nvme import default_pin_budget
    ram = 128 * 2 ** 30
    assert default_pin_budget(1, ram) == int(0.05 * ram) and default_pin_budget(8, ram) == int(0.05 * ram) // 8
    assert default_pin_budget(1, 10 ** 15) == 8 * 2 ** 30                      # at most 8 GiB
    import os
    old = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = "4"
    try:
        assert default_pin_budget(ram_bytes=ram) == int(0.05 * ram) // 4       # a launched rank's own share
    finally:
        os.environ.pop("LOCAL_WORLD_SIZE") if old is None else os.environ.update(LOCAL_WORLD_SIZE=old)


# ------------------------------------------------------------------------------------------ plan: CLI + check
def test_plan_cli_prints_and_writes_table(tmp_path):
    (tmp_path / "tmp").mkdir()
    p = cli(["plan", *LLAMA, "trainer=zero3_nvme", f"trainer.nvme_path={tmp_path / 'nv'}",
             f"run_dir={tmp_path / 'plan'}"], env={"COLUMNS": "200", "TMPDIR": str(tmp_path / "tmp")})
    # the model's scratch run dir is gone (a runx_plan_* per call); torch's compile cache may stay
    assert [f.name for f in (tmp_path / "tmp").iterdir() if not f.name.startswith("torchinductor_")] == []
    text = (tmp_path / "plan" / "plan.txt").read_text()
    for s in ("zero0", "zero3 + params,optimizer->nvme", "GPU / rank", "CPU / node", "NVMe / node",
              "derived NVMe settings", "baseline"):
        assert s in text, s
    assert "zero3 + params,optimizer->nvme" in p.stdout
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    cfgd = plan["configured"]
    assert cfgd["layout"] == "zero3 + params,optimizer->nvme" and cfgd["nvme_total"] > 20 * plan["model"]["n_params"]
    assert cfgd["nvme_settings"]["buffer_count"] >= 9 and plan["cheapest"] == "zero0"
    # a data job has no model to place: one line saying so (it was an AttributeError traceback)
    p = cli(["plan", "recipe=concept_prune"], check=False)
    assert p.returncode == 2 and "recipe=concept_prune is a data job" in p.stderr and "Traceback" not in p.stderr


BIG = ["recipe=sft", "model=tiny_llama", "++model.from_config.hidden_size=4096",
       "++model.from_config.intermediate_size=11008", "++model.from_config.num_hidden_layers=32",
       "++model.from_config.num_attention_heads=32", "++model.from_config.num_key_value_heads=32",
       "++model.from_config.vocab_size=32000", "data=tiny_text", "trainer.micro_batch_size=1"]


def test_plan_described_machine_picks_cheapest_that_fits():
    """A 7B Llama (bf16) on a described 8 x 80 GB node: ZeRO-0 (~20 B/param) does not fit a GPU, ZeRO-1
    (2 + 18/8 B/param) does and is the cheapest; on one 24 GB GPU only optimizer offload fits."""
    from runx.cli.config import compose
    from runx.trainers.plan import make_plan, model_facts
    base = BIG + ["trainer.precision=bf16", "plan.cpu_mem=1TB", "plan.nvme_free=4TB"]
    facts = model_facts(compose(base))
    assert 6.5e9 < facts.n_params < 7e9 and facts.activation_bytes < 2 * 2**30
    plan = make_plan(compose(base + ["plan.gpus=8", "plan.gpu_mem=80GB"]), facts=facts)
    fits = {r.layout.name: r.fits for r in plan.rows}
    assert not plan.current.fits and not fits["zero0"] and fits["zero1"] and plan.cheapest.layout.name == "zero1"
    plan = make_plan(compose(base + ["plan.gpus=1", "plan.gpu_mem=24GB"]), facts=facts)
    fits = {r.layout.name: r.fits for r in plan.rows}
    assert not any(fits[k] for k in ("zero0", "zero1", "zero2", "zero3"))
    assert plan.cheapest.layout.name == "zero2 + optimizer->cpu" and fits["zero3 + params,optimizer->nvme"]


def test_plan_counts_how_zero3_builds_the_model():
    """ZeRO-3 builds a Hugging Face model partitioned (zero.Init): no whole copy per rank in host memory, none on the
    GPU. A recipe that needs whole weights first (VeriFree's warm start) builds it whole: the plan counts the copy
    on each rank's host and the whole model on each GPU before DeepSpeed partitions it, so that a 7B model is not
    called a fit on 8 x 24 GB GPUs."""
    from runx.cli.config import compose
    from runx.trainers.plan import make_plan, model_facts
    base = BIG + ["trainer.precision=bf16", "plan.cpu_mem=1TB", "plan.gpus=8", "plan.gpu_mem=24GB"]
    rows = {}
    for recipe in ("sft", "verifree"):
        cfg = compose([*base, f"recipe={recipe}"] + (["data=verifree_arith"] if recipe == "verifree" else []))
        facts = model_facts(cfg)
        assert facts.zero3_partitioned_build == (recipe == "sft")
        rows[recipe] = {r.layout.name: r for r in make_plan(cfg, facts=facts).rows}
    whole = "whole model on the GPU before partitioning (engine init)"
    z3, z3v = rows["sft"]["zero3"], rows["verifree"]["zero3"]
    assert whole not in z3.gpu and "model built on host (init)" not in z3.cpu and z3.fits
    assert z3v.gpu[whole] == 2 * facts.n_params and "model built on host (init)" in z3v.cpu and not z3v.fits


def test_train_stops_before_building_when_it_cannot_fit(tmp_path):
    """`runx train` runs the same check first: a 7B fp32 ZeRO-0 run on this machine stops with the memory it
    needs (and the cheapest config that fits, if any) before any weights exist."""
    p = cli(["train", *BIG, f"run_dir={tmp_path / 'r'}", "logger=none", f"trainer.nvme_path={tmp_path / 'nv'}"],
            check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "does not fit" in p.stderr and "CPU needs" in p.stderr
    assert "cheapest config that fits" in p.stderr or "No ZeRO / offload config fits" in p.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists() and not (tmp_path / "r" / "config.yaml").exists()


def test_nvme_path_unwritable_or_full_fails_fast(tmp_path, capsys):
    """Unwritable nvme_path (through `runx train`), and a disk without room for the model's swap files (the
    same pre-flight check in-process): both stop before any model is built, naming the path and the space
    needed."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "nvme"  # a folder under a regular file cannot be created
    common = ["recipe=sft", "model=llama_m", "data=tiny_text", "trainer=zero3_nvme", "logger=none",
              "trainer.progress=false"]
    p = cli(["train", *common, f"trainer.nvme_path={bad}", f"run_dir={tmp_path / 'r1'}"], check=False)
    assert p.returncode == 2 and str(bad) in p.stderr and "not writable" in p.stderr and "GiB" in p.stderr, p.stderr
    assert not (tmp_path / "r1" / "metrics.jsonl").exists()
    # a model whose swap files need about twice the free space on the disk of tmp_path
    from runx.cli.config import compose
    from runx.trainers.plan import check_fits
    free = shutil.disk_usage(tmp_path).free
    vocab = int(2 * free / (20 * 2 * 4096)) + 1
    cfg = compose(common + [f"trainer.nvme_path={tmp_path / 'nv'}", f"++model.from_config.vocab_size={vocab}",
                            "++model.from_config.hidden_size=4096", "++model.from_config.num_attention_heads=32",
                            "++model.from_config.num_key_value_heads=32"])
    with pytest.raises(SystemExit) as e:
        check_fits(cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "nv") in err and "free but ZeRO-Infinity needs" in err, err
    need = float(err.split("needs ")[1].split(" GiB")[0])
    assert need * 2**30 > free


# ------------------------------------------------------------------------------------------ sweeps
def test_launcher_jobs_of_optuna_batches_add_up_and_a_new_sweep_starts_over(tmp_path):
    """Optuna with n_jobs calls the launcher once per batch: each batch rewrote launcher_jobs.json with its own
    jobs only."""
    from hydra_plugins.runx_launcher.runx_launcher import record_jobs
    path = tmp_path / "launcher_jobs.json"
    record_jobs(path, [{"idx": 1, "returncode": 0}, {"idx": 0, "returncode": 0}], 0)
    record_jobs(path, [{"idx": 3, "returncode": 1}, {"idx": 2, "returncode": 0}], 2)
    assert [(j["idx"], j["returncode"]) for j in json.loads(path.read_text())] == [(0, 0), (1, 0), (2, 0), (3, 1)]
    record_jobs(path, [{"idx": 3, "returncode": 0}], 3)       # a job run again replaces its record
    assert [j["returncode"] for j in json.loads(path.read_text())] == [0, 0, 0, 0]
    record_jobs(path, [{"idx": 0, "returncode": 2}], 0)       # another sweep into the folder
    assert json.loads(path.read_text()) == [{"idx": 0, "returncode": 2}]
    assert [f.name for f in tmp_path.iterdir()] == ["launcher_jobs.json"]   # no temporary file left


def test_2x2_parallel_multirun_report_and_plan_vs_measured_peak(tmp_path):
    """One 2x2 sweep (two Llama sizes x ZeRO-0/ZeRO-3) through the parallel local launcher, 2 jobs at once:
    4 run dirs, jobs that overlap in time, one `runx report` table, and for every run the plan's CPU total
    within 15% of the peak RSS the trainer measured."""
    sweep = tmp_path / "sweep"
    p = cli(["train", "-m", "hydra/launcher=runx_parallel", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}",
             *LLAMA, "trainer.max_steps=2", "++model.from_config.hidden_size=384,768", "trainer=zero0,zero3",
             "objective=final_loss"], env={"RUNX_CACHE": str(tmp_path / "cache")}, timeout=900)
    runs = sorted(d for d in os.listdir(sweep) if d.isdigit())
    assert runs == ["0", "1", "2", "3"], (runs, p.stderr[-3000:])
    jobs = json.loads((sweep / "launcher_jobs.json").read_text())
    assert [j["returncode"] for j in jobs] == [0, 0, 0, 0]
    # overlap: job 1 started before job 0 ended (also from the runs' own files: config written at start)
    a, b = jobs[0], jobs[1]
    assert b["start"] < a["end"] and a["start"] < b["end"], jobs
    assert os.path.getmtime(sweep / "1" / "config.yaml") < os.path.getmtime(sweep / "0" / "summary.json")

    r = cli(["report", str(sweep)], env={"COLUMNS": "250"})
    assert "4 runs" in r.stdout and r.stdout.count("zero3") >= 2
    rep = json.loads((sweep / "report.json").read_text())
    assert len(rep["rows"]) == 4 and "trainer.name" in rep["varying"]
    assert rep["objective"] == "final_loss" and rep["minimize"]  # the sweep's own objective, sorted ascending
    assert [row["final_loss"] for row in rep["rows"]] == sorted(row["final_loss"] for row in rep["rows"])
    assert (sweep / "report_curves.png").stat().st_size > 0 and (sweep / "report_sweep.png").stat().st_size > 0

    # plan vs measured peak RSS, each run with its own overrides
    from runx.cli.config import compose
    from runx.trainers.plan import make_plan
    old_cache = os.environ.get("RUNX_CACHE")
    os.environ["RUNX_CACHE"] = str(tmp_path / "cache")
    try:
        errors = {}
        for j in jobs:
            cfg = compose(list(j["overrides"]))
            plan = make_plan(cfg)
            predicted = plan.current.total("cpu")
            measured = json.loads((sweep / str(j["idx"]) / "summary.json").read_text())["peak_mem_gb"] * 2**30
            errors[" ".join(o for o in j["overrides"] if "hidden_size" in o or "trainer=" in o)] = \
                round(predicted / measured - 1, 3)
    finally:
        os.environ.pop("RUNX_CACHE", None) if old_cache is None else os.environ.update(RUNX_CACHE=old_cache)
    print("plan / measured - 1:", errors)
    assert all(abs(e) <= 0.15 for e in errors.values()), errors


def test_parallel_launcher_keeps_a_pinned_sweep_folder_and_lists_a_failed_job(tmp_path):
    """run_dir=<path> with hydra/launcher=runx_parallel: job k runs in <path>/k (each job is a single `runx train`,
    which took <path> itself, so the second job found it in use); a job that diverges is one line and is listed
    at the end, as with the in-process launcher, and the other job finishes."""
    sweep = tmp_path / "sweep"
    p = cli(["train", "-m", "hydra/launcher=runx_parallel", "hydra.launcher.n_jobs=2", f"run_dir={sweep}",
             "optim.lr=1e-3,1e36", "model=tiny_bert", "logger=none", "trainer.progress=false", "optim.warmup_ratio=0",
             "data.max_train_samples=64", "trainer.eval_every=0", "optim.name=sgd", "optim.scheduler=constant",
             "trainer.grad_clip=0", "trainer.max_steps=3", "trainer.ckpt_every=0", "trainer.micro_batch_size=8",
             "++trainer.ds_overrides.comet={enabled: false, api_key: SECRETPAR}"], check=False, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "of the sweep failed" in p.stderr, p.stderr[-3000:]
    # a token on the command line stays out of the launcher's console lines and records (and Hydra's multirun.yaml)
    leaked = [str(f) for f in sweep.rglob("*") if f.is_file() and f.name != "job.yaml" and b"SECRETPAR" in f.read_bytes()]
    assert "SECRETPAR" not in p.stdout + p.stderr and leaked == [], leaked
    assert f"#1 diverged: {sweep / '1'}" in p.stderr.split("of the sweep failed")[1], p.stderr[-3000:]
    assert json.loads((sweep / "0" / "summary.json").read_text())["steps"] == 3
    assert "diverged_at" in json.loads((sweep / "1" / "summary.json").read_text())
    import yaml
    assert yaml.safe_load((sweep / "0" / "config.yaml").read_text())["run_dir"] == str(sweep / "0")


def test_optuna_preset_runs_4_trials(tmp_path):
    """The preset's fallback direction is maximize; objective=eval/loss with no direction given is minimised.
    (model=tiny_bert: the preset's search over the default job's recipe, at a tenth of MiniLM's load time)"""
    sweep = tmp_path / "optuna"
    p = cli(["train", "-m", "hydra/sweeper=runx_optuna", "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}",
         "model=tiny_bert", "data.max_length=32",
         "objective=eval/loss", "trainer.max_steps=1", "trainer.eval_every=1", "trainer.ckpt_every=0",
         "trainer.micro_batch_size=4", "data.max_train_samples=32", "data.max_eval_samples=16", "logger=none",
         "trainer.progress=false"], timeout=900)
    runs = sorted(d for d in os.listdir(sweep) if d.isdigit())
    assert runs == ["0", "1", "2", "3"]
    import yaml
    res = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    losses = {json.load(open(sweep / r / "summary.json"))["eval/loss"] for r in runs}
    assert len(losses) == 4 and res["best_value"] == min(losses)
    assert "Best value: " in p.stdout + p.stderr       # the sweeper's own result lines are shown (they were hidden)
    # its jobs know their sweep (their W&B runs are named <sweep>-<k> and grouped): Optuna writes no multirun.yaml
    from runx.trainers.tracking import sweep_of
    assert sweep_of(str(sweep / "0")) == "optuna"
    lr_used = {yaml.safe_load(open(sweep / r / "config.yaml"))["optim"]["lr"] for r in runs}
    assert len(lr_used) == 4 and all(1e-5 <= lr <= 1e-3 for lr in lr_used)


def test_cluster_presets_compose():
    """hydra/launcher=runx_slurm (submitit), hydra/sweeper=runx_optuna and hydra/launcher=runx_parallel compose."""
    from hydra import compose as hcompose
    from hydra import initialize_config_module
    with initialize_config_module(config_module="runx.conf", version_base="1.3"):
        cfg = hcompose("config", overrides=["hydra/launcher=runx_slurm", "hydra.launcher.partition=gpu"],
                       return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
        assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.nodes == 1
        assert cfg.hydra.launcher.max_num_timeout == 20     # a time limit requeues (submitit's 0 ended the job)
        cfg = hcompose("config", overrides=["hydra/sweeper=runx_optuna"], return_hydra_config=True)
        assert cfg.hydra.sweeper.direction == "maximize" and "optim.lr" in cfg.hydra.sweeper.params
        # no fixed study name: with a storage, Optuna continued the study of that name, one for every sweep
        assert cfg.hydra.sweeper.study_name is None
        cfg = hcompose("config", overrides=["hydra/launcher=runx_parallel", "hydra.launcher.n_jobs=3"],
                       return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("RunxParallelLauncher") and cfg.hydra.launcher.n_jobs == 3


def test_a_parallel_sweeps_jobs_stop_and_checkpoint_when_runx_dies(tmp_path):
    """hydra/launcher=runx_parallel ran each job as a child that outlived runx: a kill of runx left it training to
    its last step, unseen (PPID 1). Now each job gets SIGTERM when runx dies: it saves a checkpoint at its step
    boundary and stops, and rerunning the sweep resumes it."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import child_env
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "runx.cli.main", "train", "-m", "hydra/launcher=runx_parallel",
           "hydra.launcher.n_jobs=1", f"hydra.sweep.dir={sweep}", "model=tiny_bert", "logger=none",
           "trainer.progress=false", "trainer.max_steps=400", "trainer.ckpt_every=0", "trainer.eval_every=0",
           "trainer.micro_batch_size=2", "data.max_length=16", "optim.lr=1e-4,2e-4"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    metrics = sweep / "0" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert metrics.exists(), "the first job never logged a step"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 120
    while time.time() < deadline and not (sweep / "0" / "launcher.json").exists() and \
            not (sweep / "0" / "ckpt" / "latest").exists():
        time.sleep(0.2)
    time.sleep(3)
    latest = sweep / "0" / "ckpt" / "latest"
    assert latest.exists(), "the orphaned job did not checkpoint and stop"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-1] < 400 and latest.read_text() == f"step_{steps[-1]}"
    n = len(steps)
    time.sleep(2)
    assert len(metrics.read_text().splitlines()) == n          # nothing trains on
    assert not (sweep / "1").exists()


def test_plan_of_a_described_machine_names_the_process_count_it_planned_with():
    """plan.gpus=8 planned 8 ranks while the config ran trainer.num_procs=2, and its advice left the count out:
    following it, runx train planned (and refused) differently."""
    from runx.cli.config import compose
    from runx.trainers.plan import make_plan, render
    cfg = compose(["model=llama_m", "plan.gpus=8", "plan.gpu_mem=80GB", "trainer.num_procs=2"])
    _, text = render(make_plan(cfg, measure=False), cfg)
    assert "trainer.zero_stage=0 trainer.num_procs=8" in text and "this config runs 2" in text, text
    cfg = compose(["model=llama_m", "plan.gpus=8", "plan.gpu_mem=80GB", "trainer.num_procs=8"])
    assert "trainer.num_procs" not in render(make_plan(cfg, measure=False), cfg)[1]
