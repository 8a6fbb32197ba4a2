"""The DeepSpeed trainer on CPU: learning, ZeRO-3 across processes, exact resume, offload parity, export."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import child_env, losses, read_metrics, run_cli

TINY = ["model=tiny_bert", "logger=none", "trainer.progress=false", "optim.lr=1e-3", "optim.warmup_ratio=0",
        "data.max_train_samples=256", "data.max_eval_samples=64", "trainer.eval_every=0"]
NO_DROPOUT = ["++model.from_config.hidden_dropout_prob=0.0", "++model.from_config.attention_probs_dropout_prob=0.0"]


def test_a_wandb_key_without_a_reachable_server_logs_offline(tmp_path):
    """With WANDB_API_KEY set (online) and a W&B server that does not answer, the run logs offline and says so at
    once; wandb.init retried ~90 s and then failed the run with a traceback."""
    import time
    run, t0 = tmp_path / "run", time.monotonic()
    p = run_cli(["train", f"run_dir={run}", *TINY, "logger=wandb", "trainer.max_steps=2", "trainer.ckpt_every=0"],
                env={"WANDB_MODE": None, "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert "W&B (http://127.0.0.1:9) cannot be reached" in p.stderr + p.stdout and "wandb sync" in p.stdout
    assert any(d.startswith("offline-run-") for d in os.listdir(run / "wandb")) and time.monotonic() - t0 < 60


def test_wandb_mode_variable_decides_under_logger_mode_auto(tmp_path, monkeypatch):
    """WANDB_MODE (W&B's own variable; the README has multi-node users set it in .deepspeed_env) was ignored:
    logger.mode=auto went online whenever a key was set, and WANDB_MODE=disabled still wrote an offline run."""
    from omegaconf import OmegaConf

    import runx.trainers.tracking as tracking
    lcfg = OmegaConf.create({"backend": "wandb", "mode": "auto", "project": "p", "entity": None, "name": None,
                             "group": None, "tags": []})
    def no_server_check():
        raise AssertionError("an online run was attempted")
    monkeypatch.setattr(tracking, "wandb_unreachable", no_server_check)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    wb = tracking.WandbRun(lcfg, OmegaConf.create({"x": 1}), str(tmp_path), "r")
    assert wb.run is None and os.listdir(tmp_path) == []
    monkeypatch.setenv("WANDB_MODE", "offline")
    wb = tracking.WandbRun(lcfg, OmegaConf.create({"x": 1}), str(tmp_path), "r")
    assert wb.mode == "offline" and wb.finish({"loss": 1.0}).startswith("wandb sync ")
    # a sweep's job (<sweep folder>/<k> beside multirun.yaml) is named <sweep folder>-<k> and grouped by its sweep
    # (all sweeps' runs were named 0, 1, ... without a group)
    from runx.trainers.tracking import sweep_of
    (tmp_path / "lr_sweep" / "3").mkdir(parents=True)
    assert sweep_of(str(tmp_path / "lr_sweep" / "3")) is None
    (tmp_path / "lr_sweep" / "multirun.yaml").write_text("{}")
    assert sweep_of(str(tmp_path / "lr_sweep" / "3")) == "lr_sweep" and sweep_of(str(tmp_path / "lr_sweep")) is None
    job = tracking.WandbRun(lcfg, OmegaConf.create({"x": 1}), str(tmp_path / "lr_sweep" / "3"), "3")
    assert (job.run.name, job.run.group) == ("lr_sweep-3", "lr_sweep")
    job.finish({})
    monkeypatch.setenv("WANDB_MODE", "online")      # and with it, the server check an online run makes
    with pytest.raises(AssertionError, match="an online run was attempted"):
        tracking.WandbRun(lcfg, OmegaConf.create({"x": 1}), str(tmp_path), "r")


def test_default_job_learns(tmp_path):
    """The embedded default (pretrained MiniLM, stdlib_topics) — loss falls and held-out accuracy beats chance."""
    run = tmp_path / "run"
    p = run_cli(["train", f"run_dir={run}", "trainer.max_steps=24", "trainer.eval_every=24", "trainer.ckpt_every=0",
                 "optim.lr=1e-4", "trainer.progress=false"], env={"WANDB_MODE": None, "WANDB_API_KEY": None})
    # W&B offline by default: a local run folder and the sync command printed for later upload
    assert "wandb sync" in p.stdout, p.stdout[-2000:]
    assert any(d.startswith("offline-run-") for d in os.listdir(run / "wandb"))
    m = read_metrics(run)
    first = sum(r["loss"] for r in m[:4]) / 4
    last = sum(r["loss"] for r in m[-4:]) / 4
    assert last < first - 0.1, (first, last)
    summary = json.load(open(run / "summary.json"))
    assert summary["eval/accuracy"] > 0.4  # 4 balanced-ish classes: chance ~0.33 (majority class)
    # train.log (what a SLURM user reads) has the run's plan, its evaluations and its end: it was empty
    log = (run / "train.log").read_text()
    assert "training sft on" in log and "step 24: eval/loss=" in log and "finished: steps=24" in log, log
    assert "finished: steps=" not in p.stdout    # the console gets the summary table instead
    from runx.recipes import RECIPES     # what trainer.monitor may name covers what the evaluation reports
    assert {k[5:] for k in summary if k.startswith("eval/")} <= set(RECIPES["sft"].eval_metrics)
    cfg = open(run / "config.yaml").read()
    assert "recipe:" in cfg and (run / "env.json").exists()


def test_zero3_two_processes_match_one(tmp_path):
    """ZeRO-3 over 2 CPU processes (torchrun, gloo) == 1 process with the same global batch (fp32); so does
    trainer.monitor's best (on 2 ranks rank 0's value decides)."""
    common = TINY + NO_DROPOUT + ["trainer=zero3", "trainer.max_steps=5", "trainer.ckpt_every=0",
                                  "trainer.eval_every=1", "trainer.monitor=eval/loss"]
    run_cli(["train", f"run_dir={tmp_path / 'one'}", "trainer.micro_batch_size=8", *common])
    (tmp_path / "tmp").mkdir()
    run_cli(["train", f"run_dir={tmp_path / 'two'}", "trainer.micro_batch_size=4", "trainer.num_procs=2", *common,
             "logger=wandb"], env={"TMPDIR": str(tmp_path / "tmp")})
    # torchrun's worker folders stay with the run (they were a /tmp/torchelastic_* folder per run, never removed);
    # W&B's temporary folders are removed by the workers (os._exit skipped it: two per rank)
    assert [f.name for f in (tmp_path / "tmp").iterdir() if not f.name.startswith("torchinductor_")] == []
    assert (tmp_path / "two" / ".runx" / "torchrun").is_dir()
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-4 * abs(a[s]), (s, a[s], b[s])
    assert a[5] < a[1]
    # the recipe's metrics are the step's over both ranks (train accuracy was rank 0's half of the batch)
    acc = [[r["acc"] for r in read_metrics(tmp_path / run)] for run in ("one", "two")]
    assert acc[0] == pytest.approx(acc[1], abs=1e-9), acc
    # one run dir, written by rank 0 only
    assert len(read_metrics(tmp_path / "two")) == 5
    one, two = (json.load(open(tmp_path / r / "summary.json")) for r in ("one", "two"))
    assert one["best_step"] == two["best_step"] and one["best/eval/loss"] == pytest.approx(two["best/eval/loss"], 1e-4)


def test_a_causal_lm_step_averages_over_all_its_tokens(tmp_path):
    """Micro-batches of a causal LM hold different numbers of label tokens. Each one's loss used to be its own
    token mean, so grad_accum=4 or 2 ranks trained on a mean of micro-batch means (HF Trainer's old gradient-
    accumulation bug): another loss curve than one batch of 8 (1.3e-4 relative at step 1 here). Now every step
    averages over all of its tokens on all ranks: the same curve whichever way the global batch is split (8x1
    against 2 micro-batches of 2 on each of 2 ZeRO-3 ranks; by hand also 4x2, 2x4 and 4x1 on 2 ranks)."""
    common = ["recipe=sft", "model=tiny_llama", "data=tiny_text", "logger=none", "trainer.progress=false",
              "trainer.max_steps=3", "trainer.eval_every=0", "trainer.ckpt_every=0"]
    splits = {"8x1": ["trainer.micro_batch_size=8"],       # 2 micro-batches x 2 ranks: accumulation and ranks
              "2x2x2ranks": ["trainer.micro_batch_size=2", "trainer.grad_accum=2", "trainer.num_procs=2",
                             "trainer=zero3"],
              # the fused head calls the decoder, not the engine: ZeRO-3 kept only the last micro-batch's gradient
              "4x2fused": ["trainer.micro_batch_size=4", "trainer.grad_accum=2", "trainer=zero3",
                           "recipe.fused_logprob=true"]}
    amp = {"amp": ["trainer.micro_batch_size=8", "trainer.precision=amp_bf16"],
           "amp_fused": ["trainer.micro_batch_size=8", "trainer.precision=amp_bf16", "recipe.fused_logprob=true"]}
    for name, extra in {**splits, **amp}.items():
        run_cli(["train", f"run_dir={tmp_path / name}", *common, *extra])
    ref = losses(tmp_path / "8x1")
    assert sorted(ref) == [1, 2, 3]
    for name in splits:
        got = losses(tmp_path / name)
        assert all(abs(got[s] - ref[s]) <= 2e-6 * ref[s] for s in ref), (name, got, ref)
    # amp_bf16's autocast is the engine forward's: the fused path ran in fp32 (its loss equal to fp32's to 1e-7)
    a, af = losses(tmp_path / "amp"), losses(tmp_path / "amp_fused")
    assert abs(af[1] - a[1]) <= 1e-5 * a[1] and abs(af[1] - ref[1]) >= 5e-6 * ref[1], (af, a, ref)


def test_zero3_builds_a_pretrained_model_partitioned(tmp_path):
    """Under ZeRO-3 a pretrained HF model is built already partitioned (zero.Init through HfDeepSpeedConfig):
    built whole, DeepSpeed would move all of it to each GPU before partitioning. Same training losses as ZeRO-2's
    whole build (1 process: the same dropout stream), and on 2 ranks the weights each rank loaded give the same
    held-out loss as the whole model (lr ~ 0, so the eval after 1 step sees the loaded weights)."""
    common = ["logger=none", "trainer.progress=false", "trainer.ckpt_every=0", "data.max_train_samples=64",
              "data.max_eval_samples=32", "data.max_length=32", "trainer.micro_batch_size=8"]
    run_cli(["train", *common, "trainer=zero2", "trainer.max_steps=3", "trainer.eval_every=0",
             f"run_dir={tmp_path / 'z2'}"])
    run_cli(["train", *common, "trainer=zero3", "trainer.max_steps=3", "trainer.eval_every=0",
             f"run_dir={tmp_path / 'z3'}"])
    a, b = losses(tmp_path / "z2"), losses(tmp_path / "z3")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) <= 1e-4 * abs(a[s]) for s in a), (a, b)
    assert "building the model partitioned" in (tmp_path / "z3" / "train.log").read_text()
    assert "building the model partitioned" not in (tmp_path / "z2" / "train.log").read_text()
    frozen = ["optim.lr=1e-12", "optim.warmup_ratio=0", "trainer.max_steps=1", "trainer.eval_every=1"]
    run_cli(["train", *common, *frozen, "trainer=zero2", f"run_dir={tmp_path / 'e1'}"])
    run_cli(["train", *common, *frozen, "trainer=zero3", "trainer.num_procs=2", "trainer.micro_batch_size=4",
             f"run_dir={tmp_path / 'e2'}"])
    log2 = (tmp_path / "e2" / "train.log").read_text()
    assert "partitioned across 2 rank(s)" in log2, log2[-3000:]
    e1, e2 = (json.load(open(tmp_path / r / "summary.json"))["eval/loss"] for r in ("e1", "e2"))
    assert abs(e1 - e2) <= 1e-5 * abs(e1), (e1, e2)


def test_killed_run_resumes_exactly(tmp_path):
    """Kill after a checkpoint, rerun the same command: later losses equal the uninterrupted run's (dropout on,
    so RNG state, data order and LR schedule must all be restored)."""
    common = TINY + ["trainer=zero3", "trainer.max_steps=8", "trainer.ckpt_every=3", "trainer.micro_batch_size=8",
                     "optim.scheduler=cosine", "optim.warmup_steps=2"]
    run_cli(["train", f"run_dir={tmp_path / 'full'}", *common])
    killed = run_cli(["train", f"run_dir={tmp_path / 'cut'}", *common], env={"RUNX_CRASH_AFTER_STEP": "4"},
                     check=False)
    assert killed.returncode != 0
    assert open(tmp_path / "cut" / "ckpt" / "latest").read() == "step_3"

    def saved_wall(tag):   # the training-loop wall time a checkpoint carries (runx's DeepSpeed client state)
        import torch
        return torch.load(tmp_path / "cut" / "ckpt" / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                          weights_only=False, map_location="cpu")["runx_train_wall_s"]
    w3 = saved_wall("step_3")
    run_cli(["train", f"run_dir={tmp_path / 'cut'}", *common])  # resume=auto
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 9))
    for s in range(4, 9):
        assert a[s] == b[s], (s, a[s], b[s])
    # train_wall_s covers both segments: the resumed loop continues the first segment's clock
    w8 = saved_wall("step_8")
    second = sum(r["step_time_s"] for r in read_metrics(tmp_path / "cut")[-5:])   # steps 4..8 after the resume
    assert 0 < w3 and w3 + second <= w8 <= json.load(open(tmp_path / "cut" / "summary.json"))["train_wall_s"]
    # keep-last-K: only the 2 newest checkpoints remain
    assert sorted(d for d in os.listdir(tmp_path / "cut" / "ckpt") if d.startswith("step_")) == ["step_6", "step_8"]


def test_resume_auto_survives_a_latest_that_names_no_complete_checkpoint(tmp_path, caplog):
    """`latest` naming a deleted or incomplete folder made resume=auto start over at step 0 without a word; it
    now resumes the newest complete checkpoint, and says when there is none."""
    from types import SimpleNamespace

    from runx.trainers.deepspeed_trainer import Trainer
    ckpt = tmp_path / "ckpt"
    for step, complete in ((2, True), (4, True), (6, False)):
        (ckpt / f"step_{step}").mkdir(parents=True)
        if complete:
            (ckpt / f"step_{step}" / "runx_complete.json").write_text("{}")
    fake = SimpleNamespace(cfg=SimpleNamespace(resume="auto"), run_dir=str(tmp_path))
    (ckpt / "latest").write_text("step_4")
    assert Trainer.find_resume(fake) == (str(ckpt), "step_4")
    (ckpt / "latest").write_text("step_8")
    with caplog.at_level("WARNING", logger="runx"):
        assert Trainer.find_resume(fake) == (str(ckpt), "step_4")
    assert "step_8, which is not a complete checkpoint: resuming from step_4" in caplog.text
    for step in (2, 4):
        (ckpt / f"step_{step}" / "runx_complete.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="runx"):
        assert Trainer.find_resume(fake) is None
    assert "holds no complete checkpoint (step_2, step_4, step_6): this run starts over" in caplog.text
    assert Trainer.find_resume(SimpleNamespace(cfg=SimpleNamespace(resume="never"), run_dir=str(tmp_path))) is None


def test_a_run_that_starts_at_step_0_gets_its_own_wandb_run(tmp_path):
    """The W&B id in the run dir was reused by any later run there, also one starting over at step 0 (killed
    before its first checkpoint, or resume=never): W&B then dropped its steps as repeats of the old run's."""
    from omegaconf import OmegaConf

    from runx.cli.config import compose
    from runx.trainers.tracking import WandbRun
    cfg = compose(["logger=wandb", "logger.mode=offline"])
    ids = []
    for resumed in (False, True, False):
        wb = WandbRun(cfg.logger, cfg, str(tmp_path), "r", resumed=resumed)
        ids.append(wb.run.id)
        wb.finish({})
    assert ids[0] == ids[1] != ids[2] and (tmp_path / "wandb_run_id.txt").read_text() == ids[2]
    assert OmegaConf.select(cfg, "logger.backend") == "wandb"


def test_a_save_cut_short_is_never_kept_over_a_complete_checkpoint_and_a_resumed_run_drops_its_old_summary(tmp_path):
    """A folder left by a kill during a save (no runx_complete.json) counted among the newest keep_last: the next
    save deleted the checkpoint it had just written, `latest` named nothing, and the run had no checkpoint left;
    runx eval/export offered the cut folder and crashed loading it. A finished run resumed for more steps that
    then died kept its old summary.json: runx report showed it done, with the earlier end's numbers."""
    from runx.cli.evaluate import EvalError
    from runx.cli.export import checkpoint_tag, load_run_config
    run = tmp_path / "run"
    common = TINY + [f"run_dir={run}", "trainer.ckpt_every=1", "trainer.keep_last=1", "trainer.micro_batch_size=4"]
    run_cli(["train", *common, "trainer.max_steps=2"])
    assert (run / "summary.json").exists()
    (run / "ckpt" / "step_9").mkdir()             # a save of a later step that a kill cut short
    (run / "ckpt" / "step_9" / "mp_rank_00_model_states.pt").write_bytes(b"trunc")
    cfg, _ = load_run_config(str(run))
    with pytest.raises(EvalError, match=r"--tag step_9: an incomplete checkpoint \(its save was cut short\).*"
                                        r"Valid choices: step_2$"):
        checkpoint_tag(str(run), cfg, "step_9", "evaluate", EvalError)
    p = run_cli(["train", *common, "trainer.max_steps=5"], env={"RUNX_CRASH_AFTER_STEP": "3"}, check=False)
    assert p.returncode == 17
    assert sorted(os.listdir(run / "ckpt")) == ["latest", "step_3"] and (run / "ckpt" / "latest").read_text() == \
        "step_3"
    assert not (run / "summary.json").exists()    # stopped before its end: not done
    run_cli(["train", *common, "trainer.max_steps=5"])
    assert json.load(open(run / "summary.json"))["steps"] == 5 and sorted(losses(run)) == [1, 2, 3, 4, 5]


def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_the_run_resumes(tmp_path):
    """SLURM preemption / scancel send SIGTERM: the run saves a checkpoint after the current step and exits 143
    (with checkpoints off, too); the same command resumes it, and the W&B sync hint names both offline
    segments of the run."""
    import time
    run = tmp_path / "run"
    args = [sys.executable, "-m", "runx.cli.main", "train", f"run_dir={run}", *TINY, "logger=wandb",
            "trainer.max_steps=100000", "trainer.ckpt_every=0", "trainer.micro_batch_size=8"]
    env = child_env()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 3:
            break
        time.sleep(0.2)
    p.terminate()   # SIGTERM
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "stopped by SIGTERM" in err, (p.returncode, err[-3000:])
    assert "W&B so far: wandb sync" in err and "offline-run-" in err, err[-2000:]
    step = max(losses(run))
    assert open(run / "ckpt" / "latest").read() == f"step_{step}"
    # train.log (what a SLURM user reads) says so too: a one-process run's stop was on the console only
    assert f"stopped by SIGTERM after step {step}, checkpoint saved" in (run / "train.log").read_text()
    done = run_cli(["train", f"run_dir={run}", *TINY, "logger=wandb", f"trainer.max_steps={step + 2}",
                    "trainer.ckpt_every=0", "trainer.micro_batch_size=8"])
    assert sorted(losses(run)) == list(range(1, step + 3))
    sync = next(line for line in done.stdout.splitlines() if "wandb sync" in line)
    assert sync.count("offline-run-") == 2, sync


def _ignored_signals(pid) -> set:
    """The signals a process ignores (SIG_IGN), from /proc."""
    import signal
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigIgn")).split()[1], 16)
    return {signal.Signals(n) for n in range(1, 65) if mask >> (n - 1) & 1 and n in signal.Signals._value2member_map_}


def test_ctrl_z_and_ctrl_c_on_a_launched_run(tmp_path):
    """Ctrl-Z (SIGTSTP to the terminal's process group) on a 2-process run suspends runx and every process of the
    launch, which has a session of its own (they used to train on); fg (SIGCONT) continues them all. Ctrl-C
    (SIGINT) then exits 130 with runx's one line, as one process gives; it used to print each worker's
    KeyboardInterrupt traceback and torchrun's SignalException. No worker is left running."""
    import fcntl
    import signal
    import time

    import psutil
    run = tmp_path / "run"
    args = [sys.executable, "-m", "runx.cli.main", "train", f"run_dir={run}", *TINY, "trainer=zero2",
            "trainer.num_procs=2", "trainer.max_steps=100000", "trainer.ckpt_every=0", "trainer.micro_batch_size=8",
            "logger=wandb"]
    env = child_env()
    # output to files, and runx's own exit awaited: W&B's service, in a session of its own, inherits them and may
    # outlive runx while it writes its last records; pipes would wait for it too
    out_f, err_f = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # runx is started as a terminal starts a foreground job: SIGINT and SIGQUIT at their defaults. A shell without
    # job control (a script, `sh -c`, an agent's tool) starts a background command (`pytest ... &`, nohup) with both
    # ignored, as POSIX has it; an ignored signal stays ignored across fork and exec, and Python then installs no
    # KeyboardInterrupt handler. So in a test session started that way pytest, xdist's workers and every process
    # they start have SigIgn 0x1001006 (INT, QUIT, and Python's own PIPE, XFSZ) from the outset, and runx, started
    # with SIGINT ignored, rightly kept ignoring Ctrl-C: it never exited. Nothing in runx, W&B or the other
    # libraries ignores SIGINT (traced with strace and an LD_PRELOAD hook on sigaction/signal/system).
    reset = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
             "signal.signal(signal.SIGQUIT, signal.SIG_DFL); os.execv(sys.executable, sys.argv[1:])")
    with open(out_f, "w") as o, open(err_f, "w") as e:
        p = subprocess.Popen([sys.executable, "-c", reset, *args], stdout=o, stderr=e, text=True, env=env,
                             start_new_session=True)
    launch = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None and not (
                (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 3):
            time.sleep(0.2)
        launch = psutil.Process(p.pid).children(recursive=True)
        workers = [c for c in launch if "runx.cli.worker" in c.cmdline() and "torch.distributed.run" not in c.cmdline()]
        assert len(workers) == 2, [c.cmdline() for c in launch]
        assert not {signal.SIGINT, signal.SIGQUIT} & _ignored_signals(p.pid), _ignored_signals(p.pid)
        os.killpg(p.pid, signal.SIGTSTP)
        stopped = lambda: all(q.status() == psutil.STATUS_STOPPED   # noqa: E731
                              for q in [psutil.Process(p.pid), *launch])
        while time.time() < deadline and not stopped():
            time.sleep(0.1)
        steps = len(read_metrics(run))
        time.sleep(2)
        assert stopped() and len(read_metrics(run)) == steps, [q.status() for q in launch]
        os.killpg(p.pid, signal.SIGCONT)
        # runx continues the launch once it runs again: on a busy machine the first workers it continues can take
        # a few steps before it gets to the last process
        while time.time() < deadline and (any(q.status() == psutil.STATUS_STOPPED for q in launch)
                                           or len(read_metrics(run)) < steps + 2):
            time.sleep(0.2)
        assert not any(q.status() == psutil.STATUS_STOPPED for q in launch) and len(read_metrics(run)) >= steps + 2, (
            [q.status() for q in launch], len(read_metrics(run)), steps)
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:   # what is still there, and in which state
            left = []
            for q in [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]:
                try:
                    with open(f"/proc/{q.pid}/status") as f:
                        sig = [line.strip() for line in f if line.startswith(("SigBlk", "SigIgn", "SigPnd", "ShdPnd"))]
                    left.append((q.pid, q.status(), " ".join(q.cmdline())[:100], sig))
                except (psutil.Error, OSError):
                    pass
            raise AssertionError(f"runx did not exit 60 s after Ctrl-C: {left}\n{err_f.read_text()[-3000:]}")
        err = err_f.read_text()
    except BaseException:     # leave nothing running (or stopped) behind a failed test: it would slow the rest
        for q in [*launch, *psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]:
            try:
                q.kill()
            except psutil.Error:
                pass
        raise
    assert p.returncode == 130 and "runx: interrupted" in err, (p.returncode, err[-3000:])
    assert f"rerun the same command to resume ({run})" in err, err[-3000:]   # the run's own words, its folder
    assert "Traceback" not in err and "Failures:" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    with open(run / ".runx" / "workers.lock", "a+") as lock:       # rank 0's worker has exited
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # the W&B run keeps its steps: Ctrl-C reached W&B's service under rank 0 too, which shut down at once
    # ("Connection lost"; the segment's history file could stay at its 7-byte header)
    assert "could not end" not in err, err[-3000:]
    core_log = "".join(f.read_text() for f in run.glob("wandb/*/logs/debug-core.log"))
    assert core_log and "received shutdown signal" not in core_log, core_log[-2000:]
    history = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.time() + 30    # (the service, no longer runx's child, writes its last records on its own)
    while time.time() < deadline and not (history and history[0].stat().st_size > 1000):
        time.sleep(0.5)
        history = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert history and history[0].stat().st_size > 1000, [h.stat().st_size for h in history]


DIVERGE = ["optim.name=sgd", "optim.lr=1e36", "optim.scheduler=constant", "trainer.grad_clip=0"]


def test_a_diverged_run_stops_at_the_nonfinite_step(tmp_path):
    """A NaN / inf training loss used to train on to max_steps (and save NaN checkpoints). Now the run stops at
    that step with one line naming the step, lr and last checkpoint, exit 1, no checkpoint of the NaN state; with
    2 processes too; a sweep's diverged job fails and the others run; stop_on_nonfinite_loss=false trains on."""
    base = [*TINY, *DIVERGE, "trainer.max_steps=20", "trainer.ckpt_every=1", "trainer.micro_batch_size=8"]
    # a sweep: the diverged job fails, the next one runs (and, told to, trains on through the NaN steps)
    sweep = tmp_path / "sweep"
    p = run_cli(["train", "-m", f"hydra.sweep.dir={sweep}", *base, "trainer.stop_on_nonfinite_loss=true,false"],
                check=False)
    assert p.returncode == 1 and f"#0 diverged: {sweep / '0'}" in p.stderr, p.stderr[-3000:]
    assert "the training loss is nan at step 2 (lr 1e+36): the run diverged and stopped without saving; its last " \
           "checkpoint is step_1" in p.stderr, p.stderr[-3000:]
    assert "#1" not in p.stderr.split("of the sweep failed")[1] and "Traceback" not in p.stderr, p.stderr[-3000:]
    run = sweep / "0"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and math.isfinite(rows[0]["loss"]) and math.isnan(rows[1]["loss"])
    assert (run / "ckpt" / "latest").read_text() == "step_1" and not (run / "ckpt" / "step_2").exists()
    assert json.load(open(run / "summary.json"))["diverged_at"] == 2
    assert "diverged" in (run / "train.log").read_text()
    assert [r["step"] for r in read_metrics(sweep / "1")] == list(range(1, 21))

    run2 = tmp_path / "run2"
    p = run_cli(["train", f"run_dir={run2}", *base, "trainer=zero2", "trainer.num_procs=2"], check=False)
    assert p.returncode == 1 and "the training loss is nan at step 2" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "launcher exited" not in p.stderr, p.stderr[-3000:]


def test_a_diverged_run_ends_its_w_and_b_run_as_failed(tmp_path):
    """A diverged run's W&B run was finished with exit code 0 (a success in W&B's list; the failed-run end that
    close() makes came after it and did nothing), and its `wandb sync` command was not printed. The message
    also told a run clipping at 1.0 to "set trainer.grad_clip"."""
    from runx.cli.config import compose
    from runx.trainers.deepspeed_trainer import Trainer
    from runx.trainers.runtime import Diverged

    class Record:
        def __init__(self):
            self.ends = []

        def log(self, *a):
            pass

        def flush(self):
            pass

        def finish(self, summary, exit_code=0):
            self.ends.append((summary, exit_code))
            return "wandb sync /x/wandb/offline-run-1"
    trainer = Trainer(compose(["model=tiny_bert", f"run_dir={tmp_path}", "trainer.grad_clip=1.0"]), str(tmp_path))
    wb = Record()
    with pytest.raises(Diverged, match=r"lower trainer.grad_clip \(now 1\), or .*W&B: wandb sync /x/wandb"):
        trainer._diverged({"step": 3, "loss": float("nan"), "lr": 0.1}, Record(), wb)
    assert wb.ends == [({"diverged_at": 0}, 1)]


@pytest.mark.parametrize("procs", [1, 2])
def test_submitit_preemption_saves_then_requeues(tmp_path, procs):
    """Under Hydra's submitit launcher (submitit_local here, as on SLURM) the preemption signal (USR2) ran
    submitit's handler wherever the training loop was: it requeued the job and exited without a checkpoint. Now
    runx saves at the step boundary first (with 2 processes: after the workers saved), then submitit requeues,
    and the requeued job resumes from that step: every step is logged once and the run completes. The signal goes
    to every process of the job, as SLURM's --signal sends it: it ended torchrun and the workers before they had
    saved, and a data loader worker ran submitit's inherited handler (requeueing the job itself)."""
    import signal
    import time

    import psutil
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "runx.cli.main", "train", "-m", "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={sweep}", *TINY, "trainer.max_steps=120", "trainer.ckpt_every=0",
            "trainer.micro_batch_size=8", f"trainer.num_procs={procs}", "trainer=zero2",
            f"trainer.dataloader_workers={2 - procs}"]
    env = child_env()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    run, deadline = sweep / "0", time.time() + 180
    while time.time() < deadline and p.poll() is None and not (
            (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 3):
        time.sleep(0.2)
    tasks = [c for c in psutil.Process(p.pid).children(recursive=True)
             if "submitit.core._submit" in " ".join(c.cmdline())]
    tasks = [c for c in tasks if c.ppid() not in {t.pid for t in tasks}]   # (not its forked data loader worker)
    assert len(tasks) == 1 and p.poll() is None
    job = [tasks[0]] + tasks[0].children(recursive=True)
    assert len(job) > 1, job    # the data loader's worker / torchrun and its workers
    for proc in job:
        proc.send_signal(signal.SIGUSR2)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    logs = (run / "train.log").read_text()
    resumed = [line for line in logs.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "ckpt/step_" in resumed[0], logs[-3000:]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 121))
    assert json.load(open(run / "summary.json"))["steps"] == 120


def test_a_slurm_step_of_several_tasks_per_node_is_refused():
    """submitit's tasks_per_node=8 (or srun -n 8) ran the command once per task: 8 runs, each starting its own
    trainer.num_procs processes into one run dir. One task per node is right, or one per node of a torchrun run."""
    from runx.cli.config import compose
    from runx.cli.train import slurm_step_problem
    cfg = compose(["trainer.num_procs=8"])
    assert slurm_step_problem(cfg, {}) is None                                            # not under srun
    assert slurm_step_problem(cfg, {"SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NUM_NODES": "1"}) is None
    problem = slurm_step_problem(cfg, {"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "1"})
    assert problem.startswith("this SLURM step runs 8 task(s) on 1 node(s)") and "tasks_per_node=1" in problem
    assert slurm_step_problem(cfg, {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2"})     # 2 separate runs
    multi = compose(["trainer.num_procs=8", "launcher=torchrun", "launcher.num_nodes=2", "launcher.master_addr=n1",
                     "run_dir=/shared/r"])
    assert slurm_step_problem(multi, {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2"}) is None
    assert slurm_step_problem(multi, {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2"})
    assert slurm_step_problem(cfg, {"SLURM_STEP_NUM_TASKS": "8", "RANK": "3"}) is None   # a rank torchrun started


def test_each_node_of_a_torchrun_run_across_nodes_holds_its_own_lock(tmp_path):
    """Every node of launcher=torchrun launcher.num_nodes=2 runs the same command into one shared run dir: where
    the filesystem's flock is cluster-wide the second node found the first one's run-dir lock and refused to
    start. Now each node takes its own; only the first node (launcher.master_addr) moves an earlier run aside."""
    import socket
    import subprocess as sp

    from runx.cli.config import compose
    from runx.cli.train import hold_run_dir, is_master_node, run_dir_lock_name
    host = socket.gethostname()
    multi = compose(["launcher=torchrun", "launcher.num_nodes=2", f"launcher.master_addr={host}", "run_dir=/s/r"])
    assert run_dir_lock_name(compose([])) == "runx" and run_dir_lock_name(multi) == f"runx-{host}"
    assert is_master_node(host) and is_master_node("127.0.0.1") and not is_master_node("no-such-node-x.invalid")
    # another node's lock (here: another process holding it) does not stop this one
    held = sp.Popen([sys.executable, "-c", "import fcntl, os, sys, time; os.makedirs(sys.argv[1], exist_ok=True); "
                     "f = open(os.path.join(sys.argv[1], 'runx-node02.lock'), 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
                     "print('held', flush=True); time.sleep(60)", str(tmp_path / ".runx")], stdout=sp.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        hold_run_dir(str(tmp_path), run_dir_lock_name(multi))
    finally:
        held.kill()


def test_a_node_other_than_the_first_logs_beside_the_shared_train_log(tmp_path):
    """Every node of a torchrun run across nodes runs `runx train` with Hydra's file handler on the shared
    <run_dir>/train.log: their lines were interleaved there. A node other than the first now writes its own
    .runx/train-<host>.log; handlers on other files stay as they were."""
    import logging
    import socket

    from runx.cli.train import node_log_aside
    root = logging.getLogger()
    shared = logging.FileHandler(tmp_path / "train.log")
    shared.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    other = logging.FileHandler(tmp_path / "other.log")
    root.addHandler(shared)
    root.addHandler(other)
    try:
        root.warning("before")
        aside = node_log_aside(str(tmp_path))
        root.warning("after")
        assert aside == str(tmp_path / ".runx" / f"train-{socket.gethostname()}.log")
        assert shared not in root.handlers and other in root.handlers
        assert (tmp_path / "train.log").read_text() == "[WARNING] before\n"
        assert open(aside).read() == "[WARNING] after\n"          # the same format as train.log's
        assert (tmp_path / "other.log").read_text() == "before\nafter\n"
        assert node_log_aside(str(tmp_path / "elsewhere")) is None
    finally:
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler) and str(tmp_path) in h.baseFilename:
                root.removeHandler(h)
                h.close()


def test_epochs_set_the_number_of_steps(tmp_path):
    """trainer.epochs: ceil(epochs * training samples / global batch) steps, whatever max_steps says; the LR
    schedule ends with them (linear decay reaches 0 after the last step, not at max_steps)."""
    run = tmp_path / "run"
    run_cli(["train", f"run_dir={run}", *TINY, "trainer.epochs=0.3", "trainer.max_steps=1000", "trainer.grad_accum=2",
             "trainer.micro_batch_size=8", "trainer.ckpt_every=0", "optim.scheduler=linear"])
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 6))          # ceil(0.3 * 256 / 16) = 5
    # the lr each step applied (it was logged after the scheduler had moved on: one step ahead, 0 at the end)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 8e-4, 6e-4, 4e-4, 2e-4])
    # the default trainer (ZeRO-0, fp32) logs the gradient norm too (DeepSpeed's clip dropped it)
    assert all(r["grad_norm"] > 0 for r in rows), rows[0]


def test_monitor_keeps_the_best_checkpoint_and_stops_early(tmp_path):
    """trainer.monitor + early_stop_patience (Lightning's ModelCheckpoint(monitor) + EarlyStopping): with a
    min_delta no evaluation can beat, the first evaluation stays best, its checkpoint survives keep_last=1, the
    run stops after `patience` more evaluations, the same command does not train on, more patience does, and
    `runx export --tag best` exports the best step."""
    from runx.cli.export import export_run
    run = tmp_path / "run"
    args = ["train", f"run_dir={run}", *TINY, "trainer.max_steps=40", "trainer.eval_every=2", "trainer.ckpt_every=4",
            "trainer.keep_last=1", "trainer.micro_batch_size=8", "trainer.monitor=eval/accuracy",
            "trainer.early_stop_min_delta=1.0"]
    run_cli(args + ["trainer.early_stop_patience=2"])
    summary = json.load(open(run / "summary.json"))
    assert summary["early_stopped_at"] == 6 and summary["best_step"] == 2 and max(losses(run)) == 6, summary
    evals = [r for r in read_metrics(run) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and summary["best/eval/accuracy"] == evals[0]["eval/accuracy"]
    assert (run / "ckpt" / "best").read_text() == "step_2" and (run / "ckpt" / "latest").read_text() == "step_6"
    assert sorted(d for d in os.listdir(run / "ckpt") if d.startswith("step_")) == ["step_2", "step_6"]
    # a save cut short between its `best` and `latest` pointers (written in that order now): the resumed run puts
    # `best` back to its tracker's best step (it named another, and rotation deleted the best); a checkpoint
    # without its random streams resumes with a warning
    (run / "ckpt" / "best").write_text("step_6")
    (run / "ckpt" / "step_6" / "rng_rank0.pt").unlink()
    p = run_cli(args + ["trainer.early_stop_patience=2"])        # stopped early: nothing more to do
    assert max(losses(run)) == 6 and json.load(open(run / "summary.json"))["early_stopped_at"] == 6
    assert (run / "ckpt" / "best").read_text() == "step_2" and "ckpt/best named step_6" in p.stdout + p.stderr
    assert "has no rng_rank0.pt" in p.stdout + p.stderr
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (run / "ckpt" / f".tmp-{dead}-latest").write_text("step_")   # a pointer a killed save left half-written
    run_cli(args + ["trainer.early_stop_patience=4"])            # more patience: two more evaluations
    assert not (run / "ckpt" / f".tmp-{dead}-latest").exists()
    summary = json.load(open(run / "summary.json"))
    assert summary["early_stopped_at"] == 10 and summary["best_step"] == 2 and max(losses(run)) == 10, summary
    assert sorted(d for d in os.listdir(run / "ckpt") if d.startswith("step_")) == ["step_10", "step_2"]
    out = export_run(str(run), str(tmp_path / "best"), tag="best")
    assert os.path.exists(os.path.join(out, "model.safetensors")) or os.listdir(out)
    # another run continuing this one's step_10 starts its own best: that run's best step_2 is not a checkpoint of
    # the new run (its summary named step 2, and `--tag best` found nothing there)
    other = tmp_path / "other"
    p = run_cli(["train", f"run_dir={other}", *args[2:], "trainer.max_steps=12", "trainer.early_stop_patience=4",
                 f"resume={run}"])
    assert "starts afresh here" in p.stdout + p.stderr
    summary = json.load(open(other / "summary.json"))
    assert summary["best_step"] == 12 and (other / "ckpt" / "best").read_text() == "step_12", summary


def test_a_signal_stops_a_launched_run_after_its_workers_saved(tmp_path):
    """2 processes under torchrun. SIGUSR1 (SLURM's --signal) used to end torchrun at once and runx with it while
    the workers were still saving; SIGTERM let torchrun SIGKILL them after 30 s and print a SignalException
    traceback. Now runx exits 143 only once rank 0's worker has exited (its lock is free at that moment), with a
    checkpoint saved, no traceback, and the same command resumes from it."""
    import fcntl
    import signal
    import time
    run = tmp_path / "run"
    args = [sys.executable, "-m", "runx.cli.main", "train", f"run_dir={run}", *TINY, "trainer=zero2",
            "trainer.num_procs=2", "trainer.max_steps=100000", "trainer.ckpt_every=0", "trainer.micro_batch_size=8"]
    # every checkpoint save takes 4 s longer in the workers (patched in through sitecustomize)
    patch = tmp_path / "slow_save"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('RUNX_WORKER') == '1':\n"
        "    from runx.trainers.deepspeed_trainer import Trainer\n"
        "    _save = Trainer.save_checkpoint\n"
        "    def slow_save(self, engine, step):\n"
        "        time.sleep(4)\n"
        "        return _save(self, engine, step)\n"
        "    Trainer.save_checkpoint = slow_save\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(patch)] + [p for p in [env.get("PYTHONPATH")] if p])
    steps = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        with open(tmp_path / "err.txt", "w") as err_file:
            p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err_file, text=True, env=env)
            deadline, seen = time.time() + 240, len(steps) and steps[-1]
            while time.time() < deadline and p.poll() is None:
                if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= seen + 3:
                    break
                time.sleep(0.2)
            p.send_signal(sig)
            rc = p.wait(timeout=180)
            with open(run / ".runx" / "workers.lock", "a+") as lock:   # rank 0's worker is gone already
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            latest = (run / "ckpt" / "latest").read_text()
        err = (tmp_path / "err.txt").read_text()
        assert rc == 143 and f"stopped by {sig.name}" in err and f"latest checkpoint: {latest}" in err, (rc, err)
        assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
        # the workers get SIGTERM whatever runx got; their log line names both (or only runx's, where a worker
        # read runx's stop request in the run dir before the SIGTERM reached it)
        said = ["SIGUSR1 (sent to runx; SIGTERM here)", "SIGUSR1"] if sig == signal.SIGUSR1 else ["SIGTERM"]
        log_text = (run / "train.log").read_text()
        assert any(f"stopped by {s} after step {latest.removeprefix('step_')}" in log_text for s in said), log_text
        steps.append(int(latest.removeprefix("step_")))
    assert steps[1] > steps[0] >= 3 and max(losses(run)) == steps[1]


def test_a_signal_under_the_deepspeed_launcher_goes_to_the_workers_not_to_its_launch_process():
    """runx passes SIGTERM to the DeepSpeed launcher's workers itself. It matched every process whose command line
    named runx.cli.worker, DeepSpeed's launch process too, whose handler then ended every process under it (W&B's
    service included) before rank 0 had saved: no checkpoint, yet 'stopped at a step boundary'."""
    from runx.cli.train import _is_worker
    launch = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "--master_addr=127.0.0.1",
              "--master_port=29511", "--module", "--no_local_rank", "runx.cli.worker", "/runs/a"]
    assert not _is_worker(launch)
    assert _is_worker([sys.executable, "-u", "-m", "runx.cli.worker", "/runs/a"])
    assert not _is_worker([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "runx.cli.main"])


def test_a_stop_reaches_the_workers_of_a_deepspeed_run_across_nodes_through_the_run_dir(tmp_path, monkeypatch):
    """The DeepSpeed launcher reaches other nodes through pdsh: SIGUSR1 to runx reached no worker there, SIGTERM
    only as a kill 30 s later. runx now writes the signal into the run dir, where every worker looks each second
    and stops at its step boundary; the launcher is left running until they have stopped (a second signal goes on
    to it)."""
    import signal
    import threading

    from runx.cli.train import _run_forwarding_signals
    from runx.trainers.runtime import StopOnSignal, parent_signal_file
    record = parent_signal_file(str(tmp_path))
    os.makedirs(os.path.dirname(record))
    stop = StopOnSignal(record)
    monkeypatch.setattr(stop, "POLL_S", 0.0)
    try:
        assert not stop.signalled
        # a stand-in for the launcher: it ends (143, as a stopped worker does) once the request is there, and
        # would end at once with -15 on a SIGTERM of its own
        waits = ("import os, sys, time\n"
                 "while not os.path.exists(sys.argv[1]): time.sleep(0.05)\n"
                 "sys.exit(143)\n")
        cmd = [sys.executable, "-c", waits, record]
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        rc, got = _run_forwarding_signals(cmd, dict(os.environ), record=record, through_record=True)
        assert (rc, got) == (143, "SIGUSR1")
        assert open(record).read() == "SIGUSR1" and stop.signalled and stop.signal_name == "SIGUSR1"
        # without through_record the launcher gets the signal (the one-machine launchers pass it on themselves)
        os.remove(record)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        rc, got = _run_forwarding_signals(cmd, dict(os.environ), record=record)
        assert (rc, got) == (-signal.SIGTERM, "SIGTERM")
    finally:
        stop.restore()


@pytest.mark.parametrize("trainer", ["zero3_cpu_offload"])
def test_cpu_offload_matches_zero3(tmp_path, trainer):
    common = TINY + NO_DROPOUT + ["trainer.max_steps=5", "trainer.ckpt_every=0", "trainer.micro_batch_size=8"]
    run_cli(["train", f"run_dir={tmp_path / 'z3'}", "trainer=zero3", *common])
    run_cli(["train", f"run_dir={tmp_path / 'off'}", f"trainer={trainer}", *common])
    a, b = losses(tmp_path / "z3"), losses(tmp_path / "off")
    for s in range(1, 6):
        assert abs(a[s] - b[s]) <= 1e-3 * abs(a[s]), (s, a[s], b[s])


EXPORT_CHECK = r"""
import sys, json, torch
from omegaconf import OmegaConf
import runx.conf
from runx.cli.config import compose
from runx.recipes import RECIPES
from runx.trainers.deepspeed_trainer import Trainer
run_dir, recipe_name = sys.argv[1], sys.argv[2]
cfg = compose(sys.argv[3:] + [f"run_dir={run_dir}", f"recipe={recipe_name}"])
from runx.cli.train import launch
launch(cfg, run_dir)
"""


@pytest.mark.parametrize("recipe,zero", [("sft", "zero3"), ("lora", "zero2"), ("lora", "zero3")])
def test_export_gives_engine_logits(tmp_path, recipe, zero, monkeypatch):
    """`runx export` of a ZeRO checkpoint loads with transformers / peft and gives the trained engine's logits."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    run = tmp_path / "run"
    run_cli(["train", f"recipe={recipe}", f"trainer={zero}", f"run_dir={run}", "trainer.max_steps=3",
             "trainer.ckpt_every=3", "export_at_end=true", *TINY])
    out = tmp_path / "exported"
    run_cli(["export", str(run), "--out", str(out)])
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["Return the absolute value of x.", "Open a socket to host."], return_tensors="pt", padding=True)
    def load(folder):
        if recipe == "lora":
            from peft import AutoPeftModelForSequenceClassification
            return AutoPeftModelForSequenceClassification.from_pretrained(folder).eval()
        return AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        from_ckpt = load(out)(**batch).logits
        from_engine = load(run / "export")(**batch).logits  # written in-process from the live engine
    assert torch.allclose(from_ckpt, from_engine, atol=1e-5), (from_ckpt, from_engine)
    assert from_ckpt.abs().sum() > 0
    # the classifier's config names its classes (the default data's topics): the model's, or the LoRA base's
    from transformers import AutoConfig

    from runx.recipes.text_data import STDLIB_TOPICS
    assert AutoConfig.from_pretrained(out / ("base" if recipe == "lora" else "")).id2label == \
        dict(enumerate(STDLIB_TOPICS))
    if recipe == "lora":
        assert load(out).config.id2label == dict(enumerate(STDLIB_TOPICS))
    if recipe == "sft":   # what cannot be exported says so in one line, with the choices
        # an export into a folder replaces the earlier export's files (another run's adapter beside this model
        # loaded as a mix of both); a folder of other files is refused
        from runx.cli.export import ExportError, clear_earlier_export
        manifest = json.load(open(out / "runx_export.json"))
        assert "model.safetensors" in manifest["files"] and manifest["tag"] == "step_3"
        (out / "adapter_config.json").write_text("{}")
        (out / "serve.py").write_text("mine")               # the user's own file beside the export stays
        (tmp_path / "outside.txt").write_text("keep")       # a manifest entry outside the folder is not followed
        json.dump({**manifest, "files": manifest["files"] + ["adapter_config.json", "../outside.txt",
                                                             str(tmp_path / "outside.txt")]},
                  open(out / "runx_export.json", "w"))
        run_cli(["export", str(run), "--out", str(out)])   # its manifest lists what it wrote, not serve.py
        files = json.load(open(out / "runx_export.json"))["files"]
        assert "model.safetensors" in files and "serve.py" not in files and (out / "serve.py").exists()
        assert not (out / "adapter_config.json").exists() and (tmp_path / "outside.txt").exists()
        # an export cut short (killed while writing) leaves a folder the next export owns: it was refused as
        # foreign, the earlier export already gone; the rerun clears it back to the user's files
        from runx.cli.export import export_run
        from runx.recipes.sft import SFT

        def killed(self, model, sd, out_dir):
            with open(os.path.join(out_dir, "model.safetensors"), "w") as f:
                f.write("half")
            raise KeyboardInterrupt
        with monkeypatch.context() as m:
            m.setattr(SFT, "export", killed)
            with pytest.raises(KeyboardInterrupt):
                export_run(str(run), str(out))
        assert json.load(open(out / "runx_export.json"))["in_progress"] is True
        (out / "stray" / "x").parent.mkdir()
        (out / "stray" / "x").write_text("half")
        run_cli(["export", str(run), "--out", str(out)])
        assert (out / "serve.py").exists() and not (out / "stray").exists()
        assert (out / "model.safetensors").stat().st_size > 100
        assert json.load(open(out / "runx_export.json")).get("in_progress") is None
        clear_earlier_export(str(out), owned=False)
        assert [f.name for f in out.iterdir()] == ["serve.py"]
        # the run still training rotates the checkpoint being read away: the latest is read again, once (it
        # stopped in a traceback: FileNotFoundError, no model states)
        import shutil

        from runx.cli import export as export_mod
        shutil.copytree(run / "ckpt" / "step_3", run / "ckpt" / "step_9")
        (run / "ckpt" / "latest").write_text("step_9")
        real = export_mod.checkpoint_state_dict

        def rotated(root, tag, stage):
            if tag == "step_9":
                shutil.rmtree(os.path.join(root, tag))
                (run / "ckpt" / "latest").write_text("step_3")
                raise FileNotFoundError(f"no model states in {root}/{tag}")
            return real(root, tag, stage)
        with monkeypatch.context() as m:
            m.setattr(export_mod, "checkpoint_state_dict", rotated)
            export_run(str(run), str(tmp_path / "rotated"))
        assert json.load(open(tmp_path / "rotated" / "runx_export.json"))["tag"] == "step_3"
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("mine")
        with pytest.raises(ExportError, match=r"a folder with other files in it \(e.g. notes.txt\)"):
            clear_earlier_export(str(tmp_path / "mine"), owned=False)
        p = run_cli(["export", str(run / "ckpt" / "step_3")], check=False)
        assert p.returncode == 2 and f"Valid choices: runx export {run} --tag step_3" in p.stderr, p.stderr
        p = run_cli(["export", str(run), "--tag", "step_9"], check=False)
        assert p.returncode == 2 and "Valid choices: step_3" in p.stderr and "Traceback" not in p.stderr, p.stderr
        p = run_cli(["export", str(tmp_path / "nope")], check=False)
        assert p.returncode == 2 and "nope: no such folder" in p.stderr, p.stderr
        (tmp_path / "a_file").write_text("")
        p = run_cli(["export", str(run), "--out", str(tmp_path / "a_file")], check=False)
        assert p.returncode == 2 and "a file, not a folder" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_eval_reproduces_the_runs_evaluation_and_takes_other_data(tmp_path):
    """`runx eval <run>` (lightning-hydra-template's eval.py): the checkpoint's consolidated weights (ZeRO-3, a
    LoRA-GA model whose base carries its offset) give the run's own last evaluation; `--tag best` and
    data.eval_path=<file> evaluate another checkpoint / other data; a key that would change the model is refused."""
    from runx.cli.evaluate import EvalError, evaluate_run
    run = tmp_path / "run"
    run_cli(["train", "recipe=lora_ga", "trainer=zero3", f"run_dir={run}", *TINY, "trainer.max_steps=4",
             "trainer.eval_every=2", "trainer.ckpt_every=2", "trainer.monitor=eval/loss"])
    summary = json.load(open(run / "summary.json"))
    p = run_cli(["eval", str(run)])
    assert "eval/loss" in p.stdout and "step_4.json" in p.stdout, p.stdout
    got = json.load(open(run / "eval" / "step_4.json"))
    for k in ("eval/loss", "eval/accuracy"):
        assert got[k] == pytest.approx(summary[k], rel=1e-5), (k, got, summary)
    out, best = evaluate_run(str(run), tag="best")
    assert best["eval/loss"] == pytest.approx(summary["best/eval/loss"], rel=1e-5)
    (tmp_path / "evals").mkdir()    # --out <a folder>: the result file goes in it
    out, _ = evaluate_run(str(run), out=str(tmp_path / "evals"))
    assert out == str(tmp_path / "evals" / "step_4.json") and json.load(open(out))["tag"] == "step_4"
    out, _ = evaluate_run(str(run), out=str(tmp_path / "new") + "/", tag="latest")   # a new folder (a traceback)
    assert out == str(tmp_path / "new" / "step_4.json")
    rows = [{"text": "Return the absolute value of x.", "label": 1}, {"text": "Open a socket.", "label": 3}]
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, _ = evaluate_run(str(run), overrides=[f"data.eval_path={tmp_path / 'other.jsonl'}", "data.kind=jsonl",
                                               f"data.path={tmp_path / 'other.jsonl'}"])
    assert json.load(open(out))["samples"] == 2 and out != str(run / "eval" / "step_4.json")
    with pytest.raises(EvalError, match="optim.lr=1: runx eval changes only the evaluation data"):
        evaluate_run(str(run), overrides=["optim.lr=1"])
    with pytest.raises(EvalError, match="data=jsonl: runx eval takes dotted keys"):
        evaluate_run(str(run), overrides=["data=jsonl"])
    p = run_cli(["eval", str(run), "data.eval_path=/nope.jsonl"], check=False)
    assert p.returncode == 2 and "data.eval_path=/nope.jsonl" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_run_dir_is_usable_from_anywhere_and_eval_of_a_file_scores_all_of_it_with_the_runs_classes(tmp_path):
    """Relative paths were saved as given, so `runx export` of the run from another folder died in a traceback;
    `runx eval <run> data.kind=jsonl data.path=<file>` scored data.val_fraction of the file, numbered its string
    labels from the file itself (a file lacking a class shifted every id: accuracy 1.0 -> 0.0) and overwrote the
    run's saved class names."""
    words = ["alpha", "beta", "gamma"]
    rows = [{"text": f"{words[i % 3]} item {i}", "label": words[i % 3]} for i in range(60)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sub = [r for r in rows if r["label"] != "alpha"][:10]
    (tmp_path / "sub.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sub))
    run = tmp_path / "run"
    # (a head of 4 outputs for 3 classes, as minilm.yaml's num_labels gives when only data.path is set)
    run_cli(["train", "recipe=sft", *TINY, "data=jsonl", "data.path=d/train.jsonl", "model.num_labels=4",
             "trainer.max_steps=3", "run_dir=run"], cwd=tmp_path)
    assert f"path: {tmp_path / 'd' / 'train.jsonl'}" in (run / "config.yaml").read_text()
    names = (run / ".runx" / "label_names.json").read_text()
    run_cli(["export", str(run)], cwd="/")
    assert json.load(open(run / "export" / "config.json"))["architectures"] == ["BertForSequenceClassification"]
    by_path = json.loads(run_cli(["eval", str(run), "data.kind=jsonl", f"data.path={tmp_path / 'sub.jsonl'}",
                                  "--out", str(tmp_path / "a.json")]).stdout and (tmp_path / "a.json").read_text())
    by_eval_path = json.loads(run_cli(["eval", str(run), f"data.eval_path={tmp_path / 'sub.jsonl'}", "--out",
                                       str(tmp_path / "b.json")]).stdout and (tmp_path / "b.json").read_text())
    assert by_path["samples"] == by_eval_path["samples"] == 10
    assert by_path["eval/loss"] == pytest.approx(by_eval_path["eval/loss"], rel=1e-6)
    assert by_path["eval/accuracy"] == by_eval_path["eval/accuracy"]
    assert (run / ".runx" / "label_names.json").read_text() == names
    # the run's training file moved away: an evaluation of another file does not need it (it was "data.path=...:
    # no such file"), and scores the same
    os.rename(tmp_path / "d" / "train.jsonl", tmp_path / "d" / "moved.jsonl")
    moved = json.loads(run_cli(["eval", str(run), f"data.eval_path={tmp_path / 'sub.jsonl'}", "--out",
                                str(tmp_path / "c.json")]).stdout and (tmp_path / "c.json").read_text())
    assert moved["samples"] == 10 and moved["eval/loss"] == pytest.approx(by_eval_path["eval/loss"], rel=1e-6)


def test_lora_scaling_and_dora_options(tmp_path):
    """recipe.scaling=rslora gives peft's alpha/sqrt(r), the default alpha/r; recipe.use_dora adds DoRA's magnitude
    vectors (and builds on the meta device, as `runx plan` needs); LoRA-GA, whose init is for plain LoRA, refuses
    DoRA with the valid choices and keeps the paper's alpha/sqrt(r)."""
    import torch

    from runx.cli.config import compose
    from runx.recipes.lora import LoRA
    from runx.recipes.lora_ga import LoRAGA
    from runx.trainers.recipe import RecipeConfigError, build_recipe

    def built(cls, *o):
        model = build_recipe(cls, compose(["model=tiny_bert", *o]), str(tmp_path)).build_model()
        layer = next(m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict))
        return model, layer.scaling["default"]
    model, eta = built(LoRA, "recipe=lora")
    assert eta == 16 / 8 and not any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    model, eta = built(LoRA, "recipe=lora", "recipe.use_dora=true", "recipe.scaling=rslora")
    assert eta == pytest.approx(16 / 8 ** 0.5)
    assert any("lora_magnitude_vector" in n and p.requires_grad for n, p in model.named_parameters())
    with torch.device("meta"):
        built(LoRA, "recipe=lora", "recipe.use_dora=true")
    assert built(LoRAGA, "recipe=lora_ga")[1] == pytest.approx(16 / 8 ** 0.5)
    with pytest.raises(RecipeConfigError, match="recipe.use_dora=true: LoRA-GA.*recipe=lora recipe.use_dora=true"):
        build_recipe(LoRAGA, compose(["recipe=lora_ga", "model=tiny_bert", "recipe.use_dora=true"]), str(tmp_path))


def test_amp_bf16_autocasts_fp32_weights(tmp_path):
    """trainer.precision=amp_bf16: DeepSpeed's torch_autocast block. The forward runs in bf16 (losses differ
    from fp32 in the low bits, so autocast is really on) while weights and optimizer stay fp32 (losses track
    the fp32 run closely, and the exported weights are fp32)."""
    common = TINY + NO_DROPOUT + ["trainer=zero0", "trainer.max_steps=4", "trainer.ckpt_every=4",
                                  "trainer.micro_batch_size=8"]
    run_cli(["train", f"run_dir={tmp_path / 'fp32'}", *common])
    run_cli(["train", f"run_dir={tmp_path / 'amp'}", "trainer.precision=amp_bf16", *common])
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "amp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert any(a[s] != b[s] for s in a), "amp_bf16 gave bit-identical fp32 losses: autocast was not applied"
    for s in a:
        assert abs(a[s] - b[s]) <= 2e-2 * abs(a[s]), (s, a[s], b[s])
    ds = json.load(open(tmp_path / "amp" / "ds_config.json"))  # the exact DeepSpeed config, in the run dir
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    import torch
    sd = torch.load(tmp_path / "amp" / "ckpt" / "step_4" / "mp_rank_00_model_states.pt", weights_only=False)
    dtypes = {v.dtype for v in sd["module"].values() if torch.is_tensor(v) and v.is_floating_point()}
    assert dtypes == {torch.float32}, dtypes


def test_nested_ds_overrides_merge_key_by_key(tmp_path):
    """`++trainer.ds_overrides.zero_optimization.reduce_bucket_size=...` reaches Hydra as a nested dict: it must
    set that one key, not replace the generated zero_optimization block (which silently meant ZeRO-0)."""
    import torch

    from runx.cli.config import compose
    from runx.trainers.deepspeed_trainer import Trainer
    cfg = compose(["trainer=zero3", "trainer.device=cpu", f"run_dir={tmp_path}",
                   "++trainer.ds_overrides.zero_optimization.reduce_bucket_size=12345",
                   "++trainer.ds_overrides={gradient_clipping: 0.5, aio.queue_depth: 16}"])
    ds = Trainer(cfg, str(tmp_path)).build_ds_config(torch.nn.Linear(4, 4))
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 12345
    assert z["stage3_prefetch_bucket_size"] == cfg.trainer.stage3_prefetch_bucket_size
    assert ds["gradient_clipping"] == 0.5 and ds["aio"] == {"queue_depth": 16}


def test_a_users_reuse_distance_sizes_the_nvme_buffers_and_never_outgrows_them(tmp_path):
    """ZeRO-Infinity buffers are sized for a reuse distance. A user's zero_optimization.stage3_max_reuse_distance
    (DeepSpeed's documented 1e9) was merged over the distance runx had fitted to trainer.nvme_buffer_count=5, so
    all six 1M-element weights stayed live for 5 buffers: "Not enough buffers". Now a hand-set count keeps a
    distance that fits it (at most the user's), and buffer_count=auto sizes the buffers for the user's distance."""
    import torch

    from runx.cli.config import compose
    from runx.trainers.deepspeed_trainer import Trainer
    from runx.trainers.nvme import nvme_param_settings, param_stats
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(6)])
    base = ["trainer=zero3_nvme", "trainer.device=cpu", f"trainer.nvme_path={tmp_path / 'nvme'}",
            "trainer.aio.tune=false", f"run_dir={tmp_path}"]
    stats = param_stats(model, 1)
    fit5 = nvme_param_settings(stats, 4, 5)["stage3_max_reuse_distance"]
    assert fit5 < 1e9
    z = Trainer(compose(base + ["trainer.nvme_buffer_count=5",
                                "++trainer.ds_overrides.zero_optimization.stage3_max_reuse_distance=1e9"]),
                str(tmp_path)).build_ds_config(model)["zero_optimization"]
    assert z["offload_param"]["buffer_count"] == 5 and z["stage3_max_reuse_distance"] == fit5
    small = Trainer(compose(base + ["trainer.nvme_buffer_count=5",
                                    "++trainer.ds_overrides.zero_optimization.stage3_max_reuse_distance=1000"]),
                    str(tmp_path)).build_ds_config(model)["zero_optimization"]
    assert small["stage3_max_reuse_distance"] == 1000          # a shorter one than the fit is the user's to pick
    auto = {r: Trainer(compose(base + [f"++trainer.ds_overrides.zero_optimization.stage3_max_reuse_distance={r}"]),
                       str(tmp_path)).build_ds_config(model)["zero_optimization"] for r in (1000, 1e9)}
    assert [auto[r]["stage3_max_reuse_distance"] for r in (1000, 1e9)] == [1000, 1e9]
    assert auto[1000]["offload_param"]["buffer_count"] < auto[1e9]["offload_param"]["buffer_count"]


def test_param_groups_split_only_when_it_changes_the_math():
    """Decay/no-decay groups only with weight decay (or LARS): under ZeRO-3 each group is an optimizer sub-group,
    one more NVMe swap round-trip per step when the optimizer lives on disk."""
    import torch

    from runx.trainers.optim import default_param_groups
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    one = default_param_groups(model, 0.0)
    assert len(one) == 1 and len(one[0]["params"]) == 4
    two = default_param_groups(model, 0.1)
    assert [len(g["params"]) for g in two] == [1, 3] and [g["weight_decay"] for g in two] == [0.1, 0.0]
    lars = default_param_groups(model, 0.0, "lars")
    assert len(lars) == 2 and lars[1].get("lars_exclude")


def test_aio_block_user_values_or_defaults_skip_the_probe(tmp_path):
    """trainer.aio: values the user set are used as written (DeepSpeed's defaults for the rest), also a value
    equal to DeepSpeed's default, and tune=false keeps DeepSpeed's documented defaults; none of them probes the
    disk (the probe would write a cache entry under RUNX_CACHE)."""
    from omegaconf import OmegaConf

    from runx.conf.schema.core import AioConfig
    from runx.trainers.nvme import DEEPSPEED_AIO_DEFAULTS, cached_probe, resolve_aio
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    base = OmegaConf.structured(AioConfig)

    def aio(**kw):
        return resolve_aio(OmegaConf.create({"nvme_path": str(nvme), "aio": OmegaConf.merge(base, kw)}))
    assert aio(queue_depth=32) == dict(DEEPSPEED_AIO_DEFAULTS, queue_depth=32, use_gds=False)
    assert aio(block_size=1048576) == dict(DEEPSPEED_AIO_DEFAULTS, use_gds=False)   # set, though a default
    assert aio(tune=False) == dict(DEEPSPEED_AIO_DEFAULTS, use_gds=False)
    assert cached_probe(str(nvme)) is None


def test_head_lr_gives_the_task_head_its_own_group():
    """optim.head_lr: the classifier's parameters (plain or peft's modules_to_save copy) get their own lr, the
    rest keep theirs; a model without a task head, or a causal LM config, is an error."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from runx.cli.config import compose, validate
    from runx.trainers.optim import default_param_groups, with_head_lr
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))
    model = get_peft_model(bert, LoraConfig(r=2, target_modules=["query", "value"], task_type=TaskType.SEQ_CLS))
    groups = with_head_lr(model, default_param_groups(model, 0.1), 2e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    head = [g for g in groups if "lr" in g]
    assert len(head) == 2 and all(g["lr"] == 2e-3 for g in head)   # decay + no-decay halves of the head
    assert {names[id(p)] for g in head for p in g["params"]} == {
        n for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    opt = torch.optim.AdamW(groups, lr=1e-4)
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-4, 2e-3]
    with pytest.raises(ValueError, match="optim.head_lr"):
        with_head_lr(torch.nn.Linear(2, 2), [{"params": list(torch.nn.Linear(2, 2).parameters())}], 1e-3)
    assert validate(compose(["recipe=lora", "optim.head_lr=0.002"])) == []
    problems = validate(compose(["recipe=sft", "model=tiny_llama", "optim.head_lr=0.002"]))
    assert len(problems) == 1 and "optim.head_lr=0.002" in problems[0] and "seq_cls" in problems[0], problems


def test_text_data_loads_local_files_and_saved_datasets(tmp_path):
    """The sft/lora/lora_ga data path on local files: JSONL (classification), Parquet with custom prompt/response
    field names (causal LM: only the response is trained on), CSV, and a saved `datasets` folder with its own
    eval split."""
    import datasets
    import pandas as pd

    from runx.cli.config import compose
    from runx.recipes.sft import SFT
    cls_rows = [{"sentence": f"row {i} about {'maths' if i % 2 else 'files'}", "y": i % 2} for i in range(20)]
    (tmp_path / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in cls_rows))
    rec = SFT(compose(["recipe=sft", "model=tiny_bert", "data=jsonl", f"data.path={tmp_path / 'cls.jsonl'}",
                       "data.text_field=sentence", "data.label_field=y", "data.val_fraction=0.25"]), str(tmp_path))
    train, evals = rec.build_data()
    assert (len(train), len(evals)) == (15, 5) and set(int(train[i]["labels"]) for i in range(15)) == {0, 1}

    lm_rows = [{"query": f"Q{i}: 2+{i}=", "answer": f"{2 + i}"} for i in range(10)]
    pd.DataFrame(lm_rows).to_parquet(tmp_path / "lm.parquet")
    rec = SFT(compose(["recipe=sft", "model=tiny_llama", "data=jsonl", "data.kind=parquet",
                       f"data.path={tmp_path / 'lm.parquet'}", "data.prompt_field=query",
                       "data.response_field=answer", "data.val_fraction=0"]), str(tmp_path))
    train, _ = rec.build_data()
    by_prompt = {bytes(t for t in train[i]["input_ids"] if t < 256).decode(): train[i] for i in range(len(train))}
    item = by_prompt["Q3: 2+3=5"]
    trained = [t for t in item["labels"] if t != -100]
    assert bytes(t for t in trained if t < 256).decode() == "5"     # the prompt is masked, the answer (+eos) kept
    assert len(trained) == 2 and len(item["labels"]) == len(item["input_ids"])

    pd.DataFrame(cls_rows).rename(columns={"sentence": "text", "y": "label"}).to_csv(tmp_path / "cls.csv", index=False)
    rec = SFT(compose(["recipe=sft", "model=tiny_bert", "data=jsonl", "data.kind=csv",
                       f"data.path={tmp_path / 'cls.csv'}"]), str(tmp_path))
    train, evals = rec.build_data()
    assert len(train) + len(evals) == 20

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(cls_rows[:12]),
                               "test": datasets.Dataset.from_list(cls_rows[12:])})
    ds = ds.rename_columns({"sentence": "text", "y": "label"})
    ds.save_to_disk(str(tmp_path / "saved"))
    rec = SFT(compose(["recipe=sft", "model=tiny_bert", "data=hf", f"data.hf_name={tmp_path / 'saved'}",
                       "data.eval_split=test"]), str(tmp_path))
    train, evals = rec.build_data()
    assert (len(train), len(evals)) == (12, 8)       # the folder's own test split, not a carved one


def test_a_sources_own_held_out_split_is_used_or_named_never_silently_replaced(tmp_path):
    """A DatasetDict (or a folder of split files) whose held-out split is not data.eval_split (default
    validation) was silently given val_fraction of its training rows as held-out data, its own split unused; a
    misspelled data.eval_split passed unnoticed. Now that is a config problem listing the source's splits; a
    source with only a training split still holds out val_fraction of it."""
    import datasets

    from runx.cli.config import compose
    from runx.recipes.text_data import load_rows
    from runx.trainers.recipe import RecipeConfigError
    rows = [{"text": f"t {i}", "label": i % 3} for i in range(20)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:16]),
                          "test": datasets.Dataset.from_list(rows[16:])}).save_to_disk(str(tmp_path / "dd"))
    hf = ["recipe=sft", "model=tiny_bert", "data=hf", f"data.hf_name={tmp_path / 'dd'}"]
    with pytest.raises(RecipeConfigError, match=r"data.eval_split=validation: not a split of .*dd. Valid choices: "
                                                 r"test\."):
        load_rows(compose(hf).data)
    with pytest.raises(RecipeConfigError, match=r"data.eval_split=tset: .*Valid choices: test\."):
        load_rows(compose(hf + ["data.eval_split=tset"]).data)
    train, evals = load_rows(compose(hf + ["data.eval_split=test"]).data)
    assert (len(train), len(evals)) == (16, 4)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "only"))
    train, evals = load_rows(compose(["recipe=sft", "model=tiny_bert", "data=hf",
                                      f"data.hf_name={tmp_path / 'only'}", "data.val_fraction=0.25"]).data)
    assert (len(train), len(evals)) == (15, 5)
    (tmp_path / "d").mkdir()
    for split, part in (("train", rows[:16]), ("test", rows[16:])):
        (tmp_path / "d" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    local = ["recipe=sft", "model=tiny_bert", "data=jsonl", f"data.path={tmp_path / 'd'}"]
    with pytest.raises(RecipeConfigError, match=r"data.eval_split=validation: .*Valid choices: test\."):
        load_rows(compose(local).data)
    assert [len(x) for x in load_rows(compose(local + ["data.eval_split=test"]).data)] == [16, 4]
    # data.extra: datasets.load_dataset's own arguments (a subset's name, data_files of a packaged builder); they
    # were read by nothing
    files = f"{{train:{tmp_path / 'd' / 'train.jsonl'},test:{tmp_path / 'd' / 'test.jsonl'}}}"
    built = ["recipe=sft", "model=tiny_bert", "data=hf", "data.hf_name=json", f"++data.extra.data_files={files}",
             "++data.extra.name=mine", "data.eval_split=test"]   # (name: a TypeError against the helper's own)
    assert [len(x) for x in load_rows(compose(built).data)] == [16, 4]
    # runx eval of such a run on other files: data.extra is the run's own data's (it was refused, and the
    # suggested data.extra={} merged away nothing); a training-only rule added since does not stop an eval
    from omegaconf import OmegaConf

    from runx.cli.evaluate import eval_config
    run = tmp_path / "hf_run"
    run.mkdir()
    saved = compose(built)
    OmegaConf.update(saved, "optim.warmup_steps", 10**6)   # (a rule added after this run was trained)
    OmegaConf.save(saved, run / "config.yaml")
    cfg, _ = eval_config(str(run), ["data.kind=jsonl", f"data.path={tmp_path / 'd' / 'test.jsonl'}"])
    assert cfg.data.kind == "jsonl" and not cfg.data.extra


def test_a_dataset_id_neither_cached_nor_reachable_is_a_config_problem_naming_the_key(tmp_path):
    """data.hf_name=<a hub id not in the cache> (or a mistyped relative folder, which reads as one) ended the run
    in a datasets ConnectionError traceback while offline; now it is one config problem naming data.hf_name."""
    from runx.cli.config import compose
    from runx.recipes.text_data import load_rows
    from runx.trainers.recipe import RecipeConfigError
    cfg = compose(["recipe=sft", "model=tiny_bert", "data=hf", "data.hf_name=nobody/no_such_dataset_xyz"])
    with pytest.raises(RecipeConfigError, match=r"^data.hf_name=nobody/no_such_dataset_xyz: .*not in the Hugging "
                                                r"Face cache"):
        load_rows(cfg.data)
    # runx validate says so too, before anything loads (it reported a missing model id, not a dataset or encoder
    # id); datasets' packaged builders and runx's own encoders name no hub repo
    from runx.cli.config import check_paths
    problems = check_paths(cfg)
    assert len(problems) == 1 and problems[0].startswith("data.hf_name=nobody/no_such_dataset_xyz: not a local "
                                                         "folder, not in the Hugging Face cache"), problems
    assert check_paths(compose(["recipe=sft", "model=tiny_bert", "data=hf", "data.hf_name=json"])) == []
    enc = check_paths(compose(["recipe=concept_prune", "recipe.encoder=nobody/no_such_encoder"]))
    assert len(enc) == 1 and enc[0].startswith("recipe.encoder=nobody/no_such_encoder: not a local folder"), enc
    assert check_paths(compose(["recipe=concept_prune"])) == []
    # a dataset that datasets prepared earlier reloads offline from its own cache: not a problem; nor is one the hub
    # moved to another owner (imdb -> stanfordnlp/imdb), which is cached under that owner's name
    import datasets.config
    moved = compose(["recipe=sft", "model=tiny_bert", "data=hf", "data.hf_name=no_such_dataset_xyz"])
    assert len(check_paths(moved)) == 1
    os.makedirs(os.path.join(str(datasets.config.HF_DATASETS_CACHE), "nobody___no_such_dataset_xyz"))
    assert check_paths(cfg) == [] and check_paths(moved) == []


def test_files_with_a_byte_order_mark_read_like_any_other(tmp_path):
    """Excel's "CSV UTF-8" and some editors' JSON start with a UTF-8 byte-order mark: the CSV's first column was
    named '\\ufefftext' (a "missing field" error), the JSONL's first line was invalid JSON, a JSON array was
    read as JSON Lines."""
    from runx.recipes.text_data import read_files
    rows = [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(4)]
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows),
                                    encoding="utf-8-sig")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8-sig")
    assert read_files(str(tmp_path / "a.csv"), "csv") == rows
    assert read_files(str(tmp_path / "a.jsonl"), "jsonl") == rows
    assert read_files(str(tmp_path / "a.json"), "jsonl") == rows
    # compressed files the shard helpers accept were opened as plain text (a UnicodeDecodeError traceback)
    import gzip

    import zstandard
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "a.csv.gz").write_bytes(gzip.compress((tmp_path / "a.csv").read_bytes()))
    (tmp_path / "z" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "a.jsonl").read_bytes()))
    assert read_files(str(tmp_path / "z" / "a.csv.gz"), "csv") == rows
    assert read_files(str(tmp_path / "z"), "jsonl") == rows            # a folder's compressed shards are read
    # data=hf pointed at a folder of plain files: a config problem naming the way to read them
    from runx.recipes.text_data import load_hf_splits
    from runx.trainers.recipe import RecipeConfigError
    with pytest.raises(RecipeConfigError, match=r"data.hf_name=.*z: a folder, but not a saved Hugging Face "
                                                r"dataset .*Valid choices: data=jsonl data.kind=csv"):
        load_hf_splits(str(tmp_path / "z"), "train")


def test_held_out_rows_come_from_the_users_split_when_there_is_one(tmp_path):
    """A data.path folder with train.jsonl + validation.jsonl used to be read as one pool (both files) and 20% of
    it held out at random: the user's validation rows were trained on. Now the folder's files are the splits;
    data.eval_path names a held-out file outright; without either, val_fraction of the rows is held out."""
    from runx.cli.config import check_paths, compose
    from runx.recipes.sft import SFT
    rows = lambda a, b: "".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(a, b))  # noqa
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text(rows(0, 30))
    (tmp_path / "d" / "validation.jsonl").write_text(rows(30, 40))
    (tmp_path / "held.jsonl").write_text(rows(40, 44))
    base = ["recipe=sft", "model=tiny_bert", "data=jsonl"]
    for extra, sizes in (([f"data.path={tmp_path / 'd'}"], (30, 10)),
                         ([f"data.path={tmp_path / 'd'}", f"data.eval_path={tmp_path / 'held.jsonl'}"], (30, 4)),
                         ([f"data.path={tmp_path / 'd' / 'train.jsonl'}", "data.val_fraction=0.2"], (24, 6))):
        train, evals = SFT(compose(base + extra), str(tmp_path)).build_data()
        assert (len(train), len(evals)) == sizes, extra
    problems = check_paths(compose(base + [f"data.path={tmp_path / 'd'}", f"data.eval_path={tmp_path / 'nope'}"]))
    assert len(problems) == 1 and problems[0].startswith(f"data.eval_path={tmp_path / 'nope'}: no such file")
    problems = check_paths(compose(["recipe=sft", "model=tiny_bert", f"data.eval_path={tmp_path / 'held.jsonl'}"]))
    assert len(problems) == 1 and "not data.kind=builtin" in problems[0], problems


def test_class_labels_agree_between_splits_and_fit_the_model(tmp_path):
    """Label names were numbered per split, so a held-out split missing one class gave its rows other ids than
    training did (wrong accuracy, silently); a class id beyond model.num_labels crashed cross-entropy with an
    IndexError; CSV's "10" sorted before "2". Now the training split's numbering is used for both, and the
    others are config problems naming the key and the valid value."""
    from runx.recipes.sft import SFT
    from runx.cli.config import compose
    from runx.trainers.recipe import RecipeConfigError
    train = [{"text": f"t{i}", "label": ["neg", "neu", "pos"][i % 3]} for i in range(12)]
    held = [{"text": "h0", "label": "pos"}, {"text": "h1", "label": "neu"}]     # no "neg": ids used to shift
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "d" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    base = ["recipe=sft", "model=tiny_bert", "data=jsonl", f"data.path={tmp_path / 'd'}"]
    tr, ev = SFT(compose(base + ["model.num_labels=3"]), str(tmp_path)).build_data()
    assert tr.label_names == ["neg", "neu", "pos"] and ev.labels == [2, 1] and tr.labels[:3] == [0, 1, 2]
    with pytest.raises(RecipeConfigError, match="model.num_labels=2: the training rows have class id.s. 2 outside "
                                                "0..1. Valid choices: model.num_labels=3"):
        SFT(compose(base + ["model.num_labels=2"]), str(tmp_path)).build_data()
    (tmp_path / "d" / "validation.jsonl").write_text(json.dumps({"text": "h", "label": "meh"}) + "\n")
    with pytest.raises(RecipeConfigError, match="held-out rows have label.s. meh that the training rows lack.*"
                                                "Valid choices: neg, neu, pos"):
        SFT(compose(base + ["model.num_labels=3"]), str(tmp_path)).build_data()
    (tmp_path / "c.csv").write_text("text,label\n" + "".join(f"r{i},{i}\n" for i in range(11)))
    tr, ev = SFT(compose(["recipe=sft", "model=tiny_bert", "data=jsonl", "data.kind=csv", f"data.path={tmp_path / 'c.csv'}",
                          "model.num_labels=11", "data.val_fraction=0"]), str(tmp_path)).build_data()
    assert sorted(tr.labels) == list(range(11)) and tr.label_names is None


def test_data_max_length_beyond_learned_positions_is_a_config_problem(tmp_path, caplog):
    """BERT-like models cannot encode more tokens than their position table holds: data.max_length beyond it is
    refused before training (and before `runx plan` sizes a run that long); a rotary model only warns."""
    from runx.cli.config import compose
    from runx.cli.main import _recipe_problems
    from runx.recipes.sft import SFT
    from runx.trainers.recipe import RecipeConfigError
    with pytest.raises(RecipeConfigError, match="data.max_length=200: BertForSequenceClassification has learned "
                                                "position embeddings for 128 tokens.*data.max_length <= 128"):
        SFT(compose(["recipe=sft", "model=tiny_bert", "data.max_length=200"]), str(tmp_path)).build_model()
    # runx validate too, from the checkpoint's config (it said ok, and runx train refused)
    problems = _recipe_problems(compose(["recipe=sft", "data.max_length=600"]))
    assert problems and "BertForSequenceClassification has learned position embeddings for 512 tokens" in problems[0]
    SFT(compose(["recipe=sft", "model=tiny_bert", "data.max_length=128"]), str(tmp_path)).build_model()
    with caplog.at_level("WARNING", logger="runx.sft"):
        SFT(compose(["recipe=sft", "model=tiny_llama", "data.max_length=300"]), str(tmp_path)).build_model()
    assert "data.max_length=300 is beyond LlamaForCausalLM's max_position_embeddings (256)" in caplog.text
    p = run_cli(["train", "recipe=lora", "model=tiny_bert", "data.max_length=200", f"run_dir={tmp_path / 'r'}"],
                check=False, timeout=120)
    assert p.returncode == 2 and "data.max_length <= 128" in p.stderr and "does not fit" not in p.stderr, p.stderr


def _sft(tmp_path, *overrides):
    from runx.cli.config import compose
    from runx.recipes.sft import SFT
    from runx.trainers.recipe import build_recipe
    return build_recipe(SFT, compose(["recipe=sft", "model=tiny_llama", *overrides]), str(tmp_path))


def test_causal_lm_data_problems_are_config_problems_naming_the_key(tmp_path):
    """Rows without the configured fields, an empty file, a tokenizer without eos: one config problem each (not a
    KeyError / ZeroDivisionError / TypeError later); a .json array and a saved single `Dataset` are read."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    from runx.trainers.hf import byte_tokenizer
    from runx.trainers.recipe import RecipeConfigError
    alpaca = [{"instruction": f"say {i}", "output": str(i)} for i in range(8)]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, indent=1))       # a JSON array, not JSON Lines
    rec = _sft(tmp_path, "data=jsonl", f"data.path={tmp_path / 'alpaca.json'}")
    with pytest.raises(RecipeConfigError) as e:
        rec.build_data()
    for words in ("data.text_field ('text')", "data.prompt_field + data.response_field ('prompt', 'response')",
                  "['instruction', 'output']"):
        assert words in str(e.value), str(e.value)
    train, _ = _sft(tmp_path, "data=jsonl", f"data.path={tmp_path / 'alpaca.json'}", "data.prompt_field=instruction",
                    "data.response_field=output", "data.val_fraction=0").build_data()
    assert len(train) == 8

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RecipeConfigError, match=f"data.path={tmp_path / 'empty.jsonl'}: 0 training rows"):
        _sft(tmp_path, "data=jsonl", f"data.path={tmp_path / 'empty.jsonl'}").build_data()

    text = datasets.Dataset.from_list([{"text": f"row {i}"} for i in range(20)])
    text.save_to_disk(str(tmp_path / "ds"))                                   # a Dataset, not a DatasetDict
    train, evals = _sft(tmp_path, "data=hf", f"data.hf_name={tmp_path / 'ds'}", "data.val_fraction=0.25").build_data()
    assert (len(train), len(evals)) == (15, 5)
    datasets.DatasetDict({"train": text}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecipeConfigError, match="data.train_split=nope: not a split of .* Valid choices: train"):
        _sft(tmp_path, "data=hf", f"data.hf_name={tmp_path / 'dd'}", "data.train_split=nope").build_data()
    # a save_to_disk folder given as JSONL: its metadata .json files are not rows; it says to use data=hf
    with pytest.raises(RecipeConfigError, match="saved Hugging Face dataset.*data=hf"):
        _sft(tmp_path, "data=jsonl", f"data.path={tmp_path / 'dd'}").build_data()
    # a file whose name says another format than data.kind (validate says so too), or that is not what it says
    from runx.cli.config import check_paths, compose
    rows = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(20))
    (tmp_path / "rows.jsonl").write_text(rows)
    (tmp_path / "rows.parquet").write_text(rows)
    with pytest.raises(RecipeConfigError, match=r"data.kind=parquet: data.path=.*rows.jsonl is a jsonl file. "
                                                r"Valid choices: data.kind=jsonl"):
        _sft(tmp_path, "data=jsonl", "data.kind=parquet", f"data.path={tmp_path / 'rows.jsonl'}").build_data()
    assert check_paths(compose(["data=jsonl", "data.kind=csv", f"data.path={tmp_path / 'rows.jsonl'}",
                                f"data.eval_path={tmp_path / 'rows.parquet'}"])) == [
        f"data.kind=csv: data.path={tmp_path / 'rows.jsonl'} is a jsonl file. Valid choices: data.kind=jsonl, or a "
        ".csv / .csv.gz / .csv.zst file",
        f"data.kind=csv: data.eval_path={tmp_path / 'rows.parquet'} is a parquet file. Valid choices: "
        "data.kind=parquet, or a .csv / .csv.gz / .csv.zst file"]
    with pytest.raises(RecipeConfigError, match="rows.parquet: not a readable Parquet file"):
        _sft(tmp_path, "data=jsonl", "data.kind=parquet", f"data.path={tmp_path / 'rows.parquet'}").build_data()

    PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer().backend_tokenizer).save_pretrained(tmp_path / "tok")
    with pytest.raises(RecipeConfigError, match="no eos_token.*model.tokenizer="):
        _sft(tmp_path, f"model.tokenizer={tmp_path / 'tok'}")


LLAMA3_LIKE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _text(ids):
    return bytes(t for t in ids if 0 <= t < 256).decode()


def test_chat_rows_train_on_the_assistant_turns_only(tmp_path):
    """Chat rows ({messages: [{role, content}]} or ShareGPT {from, value}) are rendered with the chat template
    and only the assistant turns, with their end-of-turn marker, are labels: for ChatML, a Jinja text with the
    tokenizer's bos, a .jinja file and the tokenizer's own template; train_on_prompt labels every token."""
    import torch

    from runx.cli.config import check_paths, compose
    from runx.recipes.text_data import CausalLMDataset
    from runx.trainers.hf import byte_tokenizer
    talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4, né"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"}]
    share = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                 [{"messages": talk}] * 3 + [{"messages": share}] * 3))
    data = ["data=jsonl", f"data.path={tmp_path / 'chat.jsonl'}", "data.val_fraction=0", "data.max_length=256"]
    rec = _sft(tmp_path, *data, "data.chat_template=chatml")
    train, _ = rec.build_data()
    assert rec.tokenizer.chat_template.startswith("{% for m in messages %}<|im_start|>")   # exported with it
    items = sorted((train[i] for i in range(len(train))), key=lambda it: len(it["input_ids"]))
    assert _text(items[0]["input_ids"]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert _text(items[0]["labels"]) == "yo<|im_end|>\n"
    # chatml's <|im_end|> is plain text to this tokenizer: the turn also ends with its eos, trained on, so that an
    # exported model's generate() stops after a turn (it ran on to max_new_tokens)
    eos = rec.tokenizer.eos_token_id
    assert items[0]["labels"].count(eos) == 1 and items[0]["labels"][items[0]["labels"].index(eos) - 1] != -100
    assert _text(items[-1]["labels"]) == "4, né<|im_end|>\n6<|im_end|>\n"
    # the labelled tokens are contiguous runs ending each assistant turn: the mask is positional, not a filter
    lab = items[-1]["labels"]
    runs = sum(1 for i, t in enumerate(lab) if t != -100 and (i == 0 or lab[i - 1] == -100))
    assert runs == 2 and len(lab) == len(items[-1]["input_ids"])
    loss = rec.lm_loss(rec.build_model(), rec.collate(items))
    assert torch.isfinite(loss) and loss.requires_grad

    # the bos the template writes is the tokenizer's bos token, written once; the header is not trained on
    (tmp_path / "llama3.jinja").write_text(LLAMA3_LIKE)
    tok = byte_tokenizer()
    train, _ = _sft(tmp_path, *data, f"data.chat_template={tmp_path / 'llama3.jinja'}").build_data()
    for it in (min((train[i] for i in range(len(train))), key=lambda it: len(it["input_ids"])),
               CausalLMDataset([{"messages": share}], tok, "text", 256, chat_template=LLAMA3_LIKE)[0]):
        assert it["input_ids"][0] == tok.bos_token_id and it["input_ids"].count(tok.bos_token_id) == 1
        assert _text(it["labels"]) == "yo<|eot_id|>" and it["labels"][0] == -100
    # the tokenizer's own template is used when data.chat_template is unset
    tok.chat_template = LLAMA3_LIKE
    ds = CausalLMDataset([{"messages": share}], tok, "text", 256)
    assert _text(ds[0]["labels"]) == "yo<|eot_id|>"
    ds = CausalLMDataset([{"messages": share}], tok, "text", 256, train_on_prompt=True)
    assert ds[0]["labels"] == ds[0]["input_ids"]
    # a prompt/response row with train_on_prompt keeps the prompt in the labels (all but the bos)
    ds = CausalLMDataset([{"prompt": "2+2=", "response": "4"}], tok, "text", 256, train_on_prompt=True)
    assert ds[0]["labels"][1:] == ds[0]["input_ids"][1:] and ds[0]["labels"][0] == -100
    # a config naming an unknown template is a config problem before any work, with the valid choices
    problems = check_paths(compose(["recipe=sft", "model=tiny_llama", *data, "data.chat_template=chatlm"]))
    assert len(problems) == 1 and "data.chat_template=chatlm" in problems[0] and "chatml" in problems[0], problems


def test_chat_data_problems_name_the_key(tmp_path):
    """No chat template, a malformed conversation, a conversation without an assistant turn, and a template
    that rewrites earlier turns (so the assistant tokens cannot be located): each a config problem naming the
    key and what would work."""
    from runx.recipes.text_data import CausalLMDataset
    from runx.trainers.hf import byte_tokenizer
    from runx.trainers.recipe import RecipeConfigError
    tok = byte_tokenizer()
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(RecipeConfigError, match="data.chat_template: the tokenizer of the model has no chat "
                                                "template.*Valid choices: chatml"):
        CausalLMDataset([{"messages": ok}], tok, "text", 64)
    for bad, why in ((["hi"], "row 0: turn 0 is a str"), ([], "row 0: an empty conversation"), ("hi", "row 0: a str \\('hi'\\), not a list"),
                     ([{"role": "user", "content": "hi"}], "row 0: no assistant turn"),
                     ([{"speaker": "user", "text": "hi"}], "row 0: turn 0 has no 'role'"),
                     ([{"role": "user", "content": 3}, *ok], "row 0: turn 0 \\(user\\) has content int")):
        with pytest.raises(RecipeConfigError, match=f"data.messages_field='messages': {why}"):
            CausalLMDataset([{"messages": ok}, {"messages": bad}][1:], tok, "text", 64, chat_template="chatml")
    # a template that shows only the last assistant turn's reasoning (as reasoning models' templates do)
    drops = ("{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' and not loop.last %}"
             "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}<assistant>{% endif %}")
    think = [ok[0], {"role": "assistant", "content": "<think>hm</think>yo"}, *ok]
    with pytest.raises(RecipeConfigError, match="renders a conversation's earlier turns differently.*"
                                                "data.train_on_prompt=true"):
        CausalLMDataset([{"messages": think}], tok, "text", 64, chat_template=drops)
    assert len(CausalLMDataset([{"messages": think}], tok, "text", 64, chat_template=drops, train_on_prompt=True))


def test_a_data_problem_found_by_launched_workers_is_the_config_problem_paragraph(tmp_path):
    """With 2 processes the data is read in the workers: rank 0 hands the problem to the parent, which prints
    the same one paragraph (exit 2) a single process gives, without torchrun's failure report over it."""
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"instruction": "x", "output": "y"}) + "\n"
                                                 for _ in range(8)))
    p = run_cli(["train", f"run_dir={tmp_path / 'run'}", *TINY, "trainer=zero3", "trainer.num_procs=2",
                 "trainer.max_steps=1", "data=jsonl", f"data.path={tmp_path / 'rows.jsonl'}"], check=False)
    assert p.returncode == 2 and "Invalid configuration" in p.stderr and "data.text_field" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "Failures:" not in p.stderr, p.stderr
    # a problem only rank 1 has (a file missing on one node): rank 1 leaves with exit 2 once rank 0 has reported
    # none, torchrun ends rank 0 (waiting for it in a collective), and the parent prints rank 1's problem
    patch = tmp_path / "rank1_only"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RUNX_WORKER') == '1' and os.environ.get('RANK') == '1':\n"
        "    from runx.recipes.sft import SFT\n"
        "    from runx.trainers.recipe import RecipeConfigError\n"
        "    def build_data(self):\n"
        "        raise RecipeConfigError('data.path=/only/on/node0.jsonl: no such file on this node')\n"
        "    SFT.build_data = build_data\n")
    env = {"PYTHONPATH": os.pathsep.join([str(patch)] + [q for q in [os.environ.get("PYTHONPATH")] if q])}
    p = run_cli(["train", f"run_dir={tmp_path / 'run2'}", *TINY, "trainer=zero3", "trainer.num_procs=2",
                 "trainer.max_steps=1"], check=False, env=env, timeout=180)
    assert p.returncode == 2 and "data.path=/only/on/node0.jsonl: no such file on this node" in p.stderr, p.stderr


def test_samples_without_a_response_token_are_dropped_and_an_empty_batch_loss_is_zero(tmp_path, caplog):
    """A prompt that fills data.max_length leaves no token to train on: such samples are dropped with a warning
    (all of them: a config problem naming data.max_length), and a micro-batch without labels has loss 0, not NaN."""
    import torch

    from runx.recipes.text_data import CausalLMDataset
    from runx.trainers.hf import byte_tokenizer
    from runx.trainers.recipe import RecipeConfigError
    tok = byte_tokenizer()
    rows = [{"prompt": "x" * 40, "response": "y"}, {"prompt": "2+2=", "response": "4"}]
    with caplog.at_level("WARNING", logger="runx.text_data"):
        ds = CausalLMDataset(rows, tok, "text", 16)
    assert len(ds) == 1 and "dropped 1 of 2 samples" in caplog.text and "data.max_length=16" in caplog.text
    with pytest.raises(RecipeConfigError, match="data.max_length=16: none of the 1 samples"):
        CausalLMDataset(rows[:1], tok, "text", 16)

    rec = _sft(tmp_path, "data=tiny_text")
    model = rec.build_model()
    batch = rec.collate([ds[0]])
    batch["labels"][:] = -100
    loss = rec.lm_loss(model, batch)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sft_fused_head_loss_matches_full_logits_under_zero3(tmp_path):
    """recipe.fused_logprob=true (the LM head's gradient made in its forward, never [N, V] logits) trains the same
    loss curve as HF's full-logits cross-entropy, under ZeRO-3, where the head's weight is partitioned and only
    a call through the module sees it whole."""
    common = ["recipe=sft", "model=tiny_llama", "data=tiny_text", "trainer=zero3", "trainer.max_steps=4",
              "trainer.eval_every=0", "trainer.ckpt_every=0", "logger=none", "trainer.progress=false",
              "optim.lr=1e-3", "optim.warmup_ratio=0"]
    for fused in ("false", "true"):
        run_cli(["train", f"run_dir={tmp_path / fused}", f"recipe.fused_logprob={fused}", *common])
    a, b = losses(tmp_path / "false"), losses(tmp_path / "true")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a[4] < a[1]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])


def test_sft_fused_head_loss_passes_its_dw_accumulation_and_chunk_to_the_kernel(tmp_path, monkeypatch):
    """recipe.logprob_dw_accum and recipe.logprob_chunk reach linear_logprob_weighted_sum (fp32 and the
    kernel's own chunk by default); bad values are config problems naming the choices / range."""
    import runx.kernels
    from runx.cli.config import compose, validate
    from runx.recipes.sft import SFT
    seen, real = [], runx.kernels.linear_logprob_weighted_sum
    monkeypatch.setattr(runx.kernels, "linear_logprob_weighted_sum",
                        lambda *a, **k: seen.append((k["dw_accum"], k["chunk"])) or real(*a, **k))
    over = ["recipe=sft", "model=tiny_llama", "data=tiny_text", "logger=none", "recipe.fused_logprob=true"]
    for extra in ([], ["recipe.logprob_dw_accum=weight", "recipe.logprob_chunk=8"]):
        rec = SFT(compose(over + extra), str(tmp_path))
        train, _ = rec.build_data()
        rec.lm_loss(rec.build_model(), rec.collate([train[0], train[1]])).backward()
    assert seen == [("fp32", None), ("weight", 8)]
    assert validate(compose(over + ["recipe.logprob_dw_accum=bf16"])) == [
        "recipe.logprob_dw_accum=bf16: invalid choice. Valid choices: fp32, weight."]
    problems = validate(compose(over + ["recipe.logprob_chunk=0"]))
    assert len(problems) == 1 and problems[0].startswith("recipe.logprob_chunk=0"), problems


def test_group_by_length_sampler_draws_the_same_samples_with_less_padding_and_resumes():
    """data.group_by_length: over each group of 50 steps the same samples as the plain draw, far less padding,
    every rank's micro-batches cut from one global batch, and a sampler started at step s (a resumed run)
    yields exactly the tail of the full sequence."""
    import random

    from runx.trainers.deepspeed_trainer import StepBatchSampler
    rng = random.Random(0)
    lengths = [rng.randint(4, 64) for _ in range(1000)]
    args = dict(n=1000, micro=4, accum=2, world=2, seed=3, max_steps=100)
    plain = StepBatchSampler(rank=0, start_step=0, **args)
    grouped = StepBatchSampler(rank=0, start_step=0, lengths=lengths, **args)
    for first in (0, 50):
        a = sorted(i for s in range(first, first + 50) for i in plain.global_indices(s))
        b = sorted(i for s in range(first, first + 50) for i in grouped.global_indices(s))
        assert a == b
    pad = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert pad(list(grouped)) < 0.7 * pad(list(plain))
    # rank 1 gets the other halves of the same global batches
    r1 = StepBatchSampler(rank=1, start_step=0, lengths=lengths, **args)
    for step, (m0, m1) in enumerate(zip(list(grouped)[::2], list(r1)[::2])):
        assert sorted(m0 + m1) == sorted(grouped.global_indices(step)[:8])   # first micro-batch of each rank
    resumed = StepBatchSampler(rank=0, start_step=37, lengths=lengths, **args)
    assert list(resumed) == list(grouped)[37 * 2:]
    # batches are not ordered long-to-short within a group
    maxes = [max(lengths[i] for i in grouped.global_indices(s)) for s in range(50)]
    assert maxes != sorted(maxes, reverse=True)


@pytest.mark.parametrize("n,max_steps", [(1500, 94), (1322, 120), (100, 30)])
def test_group_by_length_is_one_pass_per_epoch_and_no_batch_holds_a_sample_twice(n, max_steps):
    """The last group of 50 steps was drawn past max_steps and sorted with the next epoch's samples: with
    trainer.epochs=1 (1500 samples, 94 steps of 16) 84 samples were never seen and 88 twice, and copies of a sample
    from two epochs sorted side by side into one batch (32 of the default job's 120 batches). Now a run draws the
    ungrouped order's samples, and a batch holds a sample twice no more often than the ungrouped order's do."""
    import random
    from collections import Counter

    from runx.trainers.deepspeed_trainer import StepBatchSampler
    rng = random.Random(1)
    lengths = [rng.randint(4, 512) for _ in range(n)]
    args = dict(n=n, micro=8, accum=2, world=1, rank=0, seed=0, start_step=0, max_steps=max_steps)
    plain, grouped = StepBatchSampler(**args), StepBatchSampler(lengths=lengths, **args)
    draws = lambda smp: [smp.global_indices(s) for s in range(max_steps)]   # noqa: E731
    a, b = draws(plain), draws(grouped)
    assert Counter(i for batch in a for i in batch) == Counter(i for batch in b for i in batch)
    twice = lambda batches: sum(len(x) - len(set(x)) for x in batches)   # noqa: E731
    assert twice(b) <= twice(a), (twice(b), twice(a))


@pytest.mark.parametrize("fused", [False, True])
def test_packing_gives_the_unpacked_loss_and_gradients_with_fewer_rows(tmp_path, fused):
    """data.packing=true: a micro-batch of causal LM samples packed into rows of max_length tokens gives the
    loss and gradients of the padded batch (no sample attends to another, no label crosses a boundary), in fewer
    rows with less padding; with the fused head too."""
    import torch

    from runx.cli.config import compose
    from runx.recipes.sft import SFT
    over = ["recipe=sft", "model=tiny_llama", "data=tiny_text", "data.max_length=96", "logger=none",
            f"recipe.fused_logprob={str(fused).lower()}"]
    plain, packed = SFT(compose(over), str(tmp_path)), SFT(compose(over + ["data.packing=true"]), str(tmp_path))
    train, _ = plain.build_data()
    items = [train[i] for i in range(12)]
    torch.manual_seed(0)
    model = plain.build_model()
    out = {}
    for name, recipe in (("plain", plain), ("packed", packed)):
        batch = recipe.collate(items)
        model.zero_grad()
        loss = recipe.lm_loss(model, batch)
        loss.backward()
        out[name] = (batch, loss.detach(), [p.grad.clone() for p in model.parameters()])
    bp, bk = out["plain"][0], out["packed"][0]
    assert bk["input_ids"].shape[0] < bp["input_ids"].shape[0] and bk["input_ids"].shape[1] <= 96
    assert bk["attention_mask"].sum() == bp["attention_mask"].sum()                       # every token, once
    assert (bk["labels"][:, 1:] != -100).sum() == (bp["labels"][:, 1:] != -100).sum()      # the same targets
    assert (bk["input_ids"].numel() - bk["attention_mask"].sum()) < (bp["input_ids"].numel() - bp["attention_mask"].sum())
    torch.testing.assert_close(out["packed"][1], out["plain"][1], rtol=1e-5, atol=1e-6)
    for gp, gk in zip(out["plain"][2], out["packed"][2]):
        torch.testing.assert_close(gk, gp, rtol=1e-4, atol=1e-6)
    # the position ids are what keeps samples apart: without them (one long sequence per row) later samples'
    # logits change
    with torch.no_grad():
        right = model(**packed.lm_inputs(bk)).logits
        wrong = model(input_ids=bk["input_ids"], attention_mask=torch.ones_like(bk["attention_mask"])).logits
    later = bk["position_ids"] != torch.arange(bk["input_ids"].shape[1])     # tokens after a row's first sample
    assert later.any() and (right - wrong)[later].abs().max() > 1e-2


def test_packing_is_refused_for_a_model_that_lets_packed_samples_attend_to_each_other(tmp_path, monkeypatch):
    """If the model's attention ignored the restarting position ids (here: transformers' packed-sequence
    detection switched off), building the model stops with a config problem instead of training on leaked
    attention; with the detection on, the same model passes."""
    import transformers.masking_utils as mu

    from runx.cli.config import compose
    from runx.recipes.sft import SFT
    from runx.trainers.recipe import RecipeConfigError
    cfg = compose(["recipe=sft", "model=tiny_llama", "data=tiny_text", "data.packing=true", "logger=none"])
    SFT(cfg, str(tmp_path)).build_model()
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(RecipeConfigError, match="data.packing"):
        SFT(cfg, str(tmp_path)).build_model()


def test_metrics_lines_reach_the_file_within_a_second_when_no_line_follows(tmp_path):
    """A line logged just after a flush, then a long eval / rollout: the line is on disk within ~1 s anyway."""
    import time
    from runx.trainers.tracking import MetricsLog
    m = MetricsLog(str(tmp_path / "metrics.jsonl"), flush_every_s=0.2)
    m.log({"step": 1, "loss": 1.0})     # first line: flushed at once (nothing flushed before)
    m.log({"step": 2, "loss": 0.5})     # within flush_every_s of the first: pending
    time.sleep(0.7)                     # no further log() call
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    m.close()


def test_unknown_lora_target_modules_name_the_key_and_the_layers_there(tmp_path):
    from runx.cli.config import compose
    from runx.recipes.lora import LoRA
    from runx.trainers.recipe import RecipeConfigError
    with pytest.raises(RecipeConfigError, match=r"recipe.target_modules=\['qproj'\].*q_proj.*v_proj"):
        LoRA(compose(["recipe=lora", "model=tiny_llama", "recipe.target_modules=[qproj]"]), str(tmp_path))
    rec = LoRA(compose(["recipe=lora", "model=tiny_llama"]), str(tmp_path))   # (and on the loaded model)
    rec.cfg.recipe.target_modules = ["qproj"]
    with pytest.raises(RecipeConfigError, match=r"recipe.target_modules=\['qproj'\].*q_proj.*v_proj"):
        rec.build_model()
    # a classifier's head is trained whole (train_head), never adapted: naming it was dropped without a word, and
    # the error offered it among the valid names
    from runx.recipes.lora_ga import LoRAGA
    for cls, name in ((LoRA, "lora"), (LoRAGA, "lora_ga")):
        with pytest.raises(RecipeConfigError, match=r"recipe.target_modules=\['classifier', 'query'\]: classifier is "
                                                    r"the classifier's head, .*names among dense, key, query, value\.$"):
            cls(compose([f"recipe={name}", "model=tiny_bert", "recipe.target_modules=[query,classifier]"]),
                str(tmp_path))
    # a list shared across models (a Llama name on a BERT): the names this model has get the adapter, as peft does
    LoRA(compose(["recipe=lora", "model=tiny_bert", "recipe.target_modules=[query,value,gate_proj]"]), str(tmp_path))


def test_a_bf16_model_is_exported_in_bf16(tmp_path):
    import torch
    from safetensors.torch import load_file
    rec = _sft(tmp_path, "model.dtype=bf16", "trainer.precision=bf16")
    model = rec.build_model()
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    rec.export(model, sd, str(tmp_path / "out"))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert all(torch.equal(saved[k], sd[k].to(torch.bfloat16)) for k in saved)


def test_a_run_dir_in_use_is_refused_and_workers_stop_with_their_launcher(tmp_path):
    """While a run (or the workers of one) holds run_dir, a second runx into it is refused (they would
    interleave checkpoints). Workers get SIGTERM when their launcher dies (PR_SET_PDEATHSIG): torchrun starts
    them in sessions of their own, so a kill -9 of runx's process group left them training."""
    import signal
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from runx.cli.train import hold_run_dir; "
                               f"hold_run_dir({str(run)!r}, 'workers'); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- the running run's\n")
    (run / "train.log").write_text("the running run's log\n")
    p = run_cli(["train", f"run_dir={run}", *TINY, "trainer.max_steps=1"], check=False)
    assert p.returncode == 2 and "is in use by another runx run (its workers are still running)" in p.stderr, \
        p.stderr
    # refused before Hydra starts: the running run's Hydra files and log are its own (they were overwritten)
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- the running run's\n"
    assert (run / "train.log").read_text() == "the running run's log\n"
    holder.kill()
    holder.wait()
    # a worker whose launcher is killed gets SIGTERM
    code = ("import os, signal, sys, time; from runx.cli.worker import _stop_with_the_launcher; "
            "signal.signal(signal.SIGTERM, lambda *a: (print('SIGTERM', flush=True), os._exit(0))); "
            "_stop_with_the_launcher(); print('ready', flush=True); time.sleep(30)")
    launcher = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                                 f"p = subprocess.Popen([sys.executable, '-c', {code!r}]); time.sleep(30)"],
                                stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline().strip() == "ready"
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert launcher.stdout.readline().strip() == "SIGTERM"
    # the DeepSpeed launcher puts a process of its own between runx's launcher and the workers, which outlives
    # runx: a worker watches runx itself (runx -> middle -> worker; runx killed, the middle one lives on)
    worker = code.replace("_stop_with_the_launcher", "_stop_with_runx")
    middle = f"import os, subprocess, sys, time; print(os.getpid(), flush=True); " \
             f"subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"
    runx = subprocess.Popen([sys.executable, "-c", "import os, subprocess, sys, time; from runx.cli.worker import "
                             "parent_identity; subprocess.Popen([sys.executable, '-c', " + repr(middle) + "], "
                             "env=dict(os.environ, **parent_identity())); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    middle_pid = int(runx.stdout.readline())
    assert runx.stdout.readline().strip() == "ready"
    runx.send_signal(signal.SIGKILL)
    runx.wait()
    try:
        assert runx.stdout.readline().strip() == "SIGTERM"
    finally:
        os.kill(middle_pid, signal.SIGKILL)


SEQUENTIAL_JOBS = r"""
import gc, sys
import torch
import runx.conf
from runx.cli.config import compose
from runx.cli.train import run_job
from deepspeed.runtime.engine import DeepSpeedEngine
kept = []
for k in range(3):   # the third job diverges; its exception is kept, as Hydra keeps it in the job's return
    run_dir = f"{sys.argv[1]}/{k}"
    try:
        run_job(compose(sys.argv[2:] + [f"run_dir={run_dir}", f"seed={k}"] + (["optim.lr=1e30"] if k == 2 else [])),
                run_dir)
    except Exception as e:
        if k != 2:
            raise
        kept.append(e)
        print("job", k, "failed:", type(e).__name__)
    gc.collect()
    live = [o for o in gc.get_objects() if isinstance(o, DeepSpeedEngine)]
    params = sum(p.numel() for p in gc.get_objects() if isinstance(p, torch.nn.Parameter))
    print("after job", k, "engines", len(live), "parameters", params, flush=True)
"""


@pytest.mark.parametrize("recipe", ["sft", "lora"])
def test_jobs_run_one_after_another_in_one_process_free_their_engines(tmp_path, recipe):
    """A Hydra sweep's jobs run one after another in one process (basic launcher, Optuna): each finished job's
    engine, model and optimizer states are freed, a failed one's too. DeepSpeed's ZeRO-3 keeps them alive through
    two process-wide references (trainers/ds_patches.py), so before Trainer.close() every job stayed allocated;
    a failed job's exception kept its engine through its frames."""
    p = subprocess.run([sys.executable, "-c", SEQUENTIAL_JOBS, str(tmp_path), f"recipe={recipe}", "trainer=zero3",
                        "trainer.max_steps=2", "trainer.ckpt_every=0", "trainer.grad_clip=0", *TINY],
                       capture_output=True, text=True, timeout=600, env=child_env())
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("after job")]
    assert lines == [f"after job {k} engines 0 parameters 0" for k in range(3)], p.stdout[-2000:]
    assert "job 2 failed: Diverged" in p.stdout, p.stdout[-2000:]


def test_a_classifier_loaded_with_another_class_count_is_a_config_problem_or_gets_a_new_head(tmp_path):
    """A local sequence classifier whose head has 3 classes, loaded with model.num_labels=2 (or minilm.yaml's 4,
    kept when only model.path is overridden), stopped in transformers' "ignore_mismatched_sizes" RuntimeError
    after the data had loaded; now the recipe refuses it at once naming both sizes, and
    model.ignore_mismatched_sizes=true puts a new head of model.num_labels classes in its place."""
    import transformers

    from runx.cli.config import compose
    from runx.recipes.sft import SFT
    from runx.trainers.recipe import RecipeConfigError, build_recipe
    conf = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=128, num_labels=3,
                                   architectures=["BertForSequenceClassification"],
                                   id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    transformers.BertForSequenceClassification(conf).save_pretrained(tmp_path / "cls3")
    base = ["recipe=sft", f"model.path={tmp_path / 'cls3'}", "model.tokenizer=builtin:minilm", "data=jsonl",
            f"data.path={tmp_path / 'x.jsonl'}"]
    with pytest.raises(RecipeConfigError, match=r"model.num_labels=2: .*cls3 is a sequence classifier whose head "
                                                r"has 3 classes \(neg, neu, pos\). Valid choices: model.num_labels=3"):
        build_recipe(SFT, compose(base + ["model.num_labels=2"]), str(tmp_path))
    assert build_recipe(SFT, compose(base + ["model.num_labels=3"]), str(tmp_path)).build_model().num_labels == 3
    # the folder has no tokenizer: said so, naming model.tokenizer (transformers said to install sentencepiece)
    no_tok = [b for b in base if not b.startswith("model.tokenizer=")] + ["model.num_labels=3"]
    with pytest.raises(RecipeConfigError, match=r"model.path=.*cls3: a folder without tokenizer files .*Valid "
                                                r"choices: model.tokenizer="):
        build_recipe(SFT, compose(no_tok), str(tmp_path))
    model = build_recipe(SFT, compose(base + ["model.num_labels=2", "model.ignore_mismatched_sizes=true"]),
                         str(tmp_path)).build_model()
    assert model.classifier.out_features == 2
    # a head fine-tuned on data labelled with its own class names keeps its numbering (pos = 0 here; sorted names
    # made neg 0, and the head's outputs scrambled)
    import json
    order = {0: "pos", 1: "neg", 2: "neu"}
    conf.id2label, conf.label2id = order, {v: k for k, v in order.items()}
    transformers.BertForSequenceClassification(conf).save_pretrained(tmp_path / "cls3b")
    rows = [{"text": f"t {i}", "label": ["neg", "neu", "pos"][i % 3]} for i in range(12)]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    own = base[:1] + [f"model.path={tmp_path / 'cls3b'}"] + base[2:] + ["model.num_labels=3", "data.val_fraction=0.25"]
    train_ds, _ = build_recipe(SFT, compose(own), str(tmp_path / "run")).build_data()
    assert train_ds.label_names == ["pos", "neg", "neu"] and sorted(set(train_ds.labels)) == [0, 1, 2]
    # a new head (ignore_mismatched_sizes) or labels the checkpoint lacks: numbered in sorted order
    fresh, _ = build_recipe(SFT, compose(own + ["model.ignore_mismatched_sizes=true"]), str(tmp_path / "r2")).build_data()
    assert fresh.label_names == ["neg", "neu", "pos"]


def test_an_unlabelled_row_is_named_and_whole_number_floats_are_class_ids():
    """One null label made every int label read as an unknown class name ("the held-out rows have label(s) 0, 1, 2
    that the training rows lack ... Valid choices: None"); labels 1.0, 2.0, 10.0 (a pandas int column with a gap)
    were names in string order ("10.0" < "2.0")."""
    from runx.recipes.text_data import ClassificationDataset
    from runx.trainers.hf import byte_tokenizer
    from runx.trainers.recipe import RecipeConfigError
    tok = byte_tokenizer()
    rows = [{"text": f"r{i}", "label": i % 3} for i in range(6)]
    rows[4]["label"] = None
    with pytest.raises(RecipeConfigError, match=r"data.label_field='label': training row 5 has no label \(None\)"):
        ClassificationDataset(rows, tok, "text", "label", 16)
    ds = ClassificationDataset([{"text": "a", "label": 2.0}, {"text": "b", "label": 10.0}], tok, "text", "label",
                               16, num_labels=11)
    assert ds.labels == [2, 10] and ds.label_names is None
    # a null text was trained on as the text "None" (a NaN cell as "nan"), in either task
    from runx.recipes.text_data import CausalLMDataset
    rows = [{"text": "a", "label": 0}, {"text": float("nan"), "label": 1}]
    with pytest.raises(RecipeConfigError, match=r"data.text_field='text': training row 2 has no text \(nan\)"):
        ClassificationDataset(rows, tok, "text", "label", 16)
    tok.eos_token = tok.pad_token
    with pytest.raises(RecipeConfigError, match=r"data.response_field='response': row 1 has no text \(None\)"):
        CausalLMDataset([{"prompt": "q", "response": None}], tok, "text", 16)
    # a field the row is not read from may be empty (prompt / response rows with a null text column)
    CausalLMDataset([{"prompt": "q", "response": "a", "text": None}], tok, "text", 16)


def test_a_stopped_run_says_how_to_resume_it_and_a_requeued_job_continues_its_checkpoint(tmp_path, monkeypatch):
    """A run started with resume=never told its stop to "rerun the same command to resume": that command starts it
    over. A SLURM job requeued after preemption re-executes its command: with resume=never (or another run's
    checkpoint) it started over at every requeue."""
    from runx.trainers.runtime import how_to_resume, requeued_resume
    assert how_to_resume("auto", "/r") == "rerun the same command to resume (/r)"
    assert "rerun it with resume=auto (the default) and run_dir=/r; the same command (resume=never) would start " \
           "over" in how_to_resume("never", "/r")
    # a run without run_dir= (a new dated folder each time): the same command would start a new run elsewhere
    from omegaconf import OmegaConf

    from runx.trainers.runtime import resume_hint
    assert resume_hint(OmegaConf.create({"run_dir": None, "resume": "auto"}), "/o/12-00-00-sft") == \
        "to resume, rerun the same command with run_dir=/o/12-00-00-sft (without it a new run starts in a new folder)"
    assert resume_hint(OmegaConf.create({"run_dir": "/r", "resume": "auto"}), "/r") == \
        "rerun the same command to resume (/r)"
    assert how_to_resume("auto", "/m/sw/3", pinned=False, sweep_dir="/m/sw").startswith(
        "to resume, rerun the sweep with run_dir=/m/sw (job folders /m/sw/<k>")
    (tmp_path / "ckpt").mkdir()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_resume("never", str(tmp_path)) == "never"          # no checkpoint of its own yet
    (tmp_path / "ckpt" / "latest").write_text("step_3")
    assert requeued_resume("never", str(tmp_path)) == "auto" and requeued_resume("/other/run", str(tmp_path)) == "auto"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert requeued_resume("never", str(tmp_path)) == "never"


def test_log_every_holds_after_an_evaluation_and_a_finished_run_without_checkpoints_is_kept(tmp_path):
    """After the first evaluation every step was logged (log_every=5 gave steps 3..10): the test was "or the last
    evaluation's numbers", which stay set. A rerun into a finished run without checkpoints (ckpt_every=0) trained
    again from step 0 and overwrote its metrics and summary without a word; they now move aside first."""
    run = tmp_path / "run"
    cmd = ["train", *TINY, f"run_dir={run}", "trainer.max_steps=10", "trainer.log_every=5", "trainer.eval_every=3",
           "trainer.ckpt_every=0", "trainer.micro_batch_size=4", "data.max_eval_samples=8"]
    run_cli(cmd)
    assert [r["step"] for r in read_metrics(run)] == [3, 5, 6, 9, 10]
    first = (run / "metrics.jsonl").read_text()
    p = run_cli(cmd)
    assert "holds a finished run without a checkpoint" in p.stdout + p.stderr
    moved = [d for d in os.listdir(run / ".runx") if d.startswith("superseded-")]
    assert len(moved) == 1 and (run / ".runx" / moved[0] / "metrics.jsonl").read_text() == first
    assert [r["step"] for r in read_metrics(run)] == [3, 5, 6, 9, 10]
    # one that diverged before its first checkpoint is called that (it read "trainer.ckpt_every=0" whatever it was)
    (run / "summary.json").write_text(json.dumps({"steps": 2, "diverged_at": 2}))
    p = run_cli(cmd[:-3] + ["trainer.max_steps=1", "trainer.ckpt_every=0", "trainer.micro_batch_size=4"])
    assert "holds a run that diverged at step 2 before its first checkpoint" in p.stdout + p.stderr


def test_resume_from_a_path_that_holds_no_checkpoint_is_a_config_problem(tmp_path):
    """resume=<path> was checked only once the data and the model were built: a FileNotFoundError traceback."""
    from runx.cli.config import check_paths, compose
    assert any(p.startswith(f"resume={tmp_path / 'nope'}: no complete checkpoint there")
               for p in check_paths(compose([f"resume={tmp_path / 'nope'}"])))
    (tmp_path / "r" / "ckpt" / "step_2").mkdir(parents=True)
    (tmp_path / "r" / "ckpt" / "step_2" / "runx_complete.json").write_text("{}")
    (tmp_path / "r" / "ckpt" / "step_4").mkdir()                      # cut short
    for good in (tmp_path / "r" / "ckpt" / "step_2",):
        assert not [p for p in check_paths(compose([f"resume={good}"])) if p.startswith("resume=")]
    problems = check_paths(compose([f"resume={tmp_path / 'r'}"]))     # no `latest`: its newest is named
    assert any(p.startswith(f"resume={tmp_path / 'r'}: no complete checkpoint there") and "step_2" in p
               for p in problems), problems
    # a step that keep_last deleted: the checkpoints that are there are named
    gone = check_paths(compose([f"resume={tmp_path / 'r' / 'ckpt' / 'step_1'}"]))
    assert any(p.startswith(f"resume={tmp_path / 'r' / 'ckpt' / 'step_1'}: no complete checkpoint there") and
               str(tmp_path / "r" / "ckpt" / "step_2") in p for p in gone), gone


def test_a_data_jobs_pool_worker_dies_with_the_job():
    """A killed data job left its pool workers computing on (PPID 1), writing shards into a rerun."""
    import subprocess
    import sys
    import time
    code = ("import os, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    from runx.trainers.datajob import _die_with_the_job\n"
            "    _die_with_the_job()\n"
            "    time.sleep(60)\n"
            "    os._exit(0)\n"
            "print(pid, flush=True)\n"
            "time.sleep(0.5)\n"
            "os._exit(0)\n")
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:   # gone, or a zombie nobody has reaped yet (state Z): dead either way
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        raise AssertionError("the worker outlived its job")


def test_train_head_false_freezes_the_classifier_head(tmp_path):
    """recipe.train_head=false was ignored: peft's sequence-classification model adds the head to modules_to_save
    (trainable) whatever the config says, so the run was the same as with train_head=true."""
    from runx.cli.config import compose
    from runx.recipes.lora import LoRA
    from runx.trainers.recipe import build_recipe

    def head_trainable(*o):
        model = build_recipe(LoRA, compose(["recipe=lora", "model=tiny_bert", *o]), str(tmp_path)).build_model()
        return sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert head_trainable() == ["base_model.model.classifier.modules_to_save.default.bias",
                                "base_model.model.classifier.modules_to_save.default.weight"]
    assert head_trainable("recipe.train_head=false") == []


def test_secrets_are_redacted_in_every_file_of_the_run_dir_but_the_private_job_config(tmp_path):
    """Only config.yaml was redacted: env.json's argv, ds_config.json, Hydra's .hydra/*.yaml, the W&B run (the
    command line it records) and the checkpoint's files held a token given on the command line in clear. The workers' own copy
    (.runx/job.yaml) keeps it, readable by the owner only."""
    run = tmp_path / "run"
    run_cli(["train", "model=tiny_bert", "debug=smoke", "logger=wandb", "trainer.progress=false",
             "data.max_length=32", "trainer.ckpt_every=100",
             "++trainer.ds_overrides.comet={enabled: false, api_key: SECRETCOMET}", f"run_dir={run}"], cwd=tmp_path)
    leaked = [str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and b"SECRET" in p.read_bytes()]
    assert leaked == [".runx/job.yaml"], leaked     # the checkpoint's files too (DeepSpeed pickles its config)
    assert list(run.glob("ckpt/step_*/*model_states.pt"))
    assert oct((run / ".runx" / "job.yaml").stat().st_mode & 0o777) == "0o600"
    assert "api_key: '***'" in (run / "config.yaml").read_text()
    # a dict value holding a secret-named key (it was kept whole: only the override's own key was looked at)
    assert "++trainer.ds_overrides.comet=***" in (run / "env.json").read_text()
    assert (run / ".hydra" / "overrides.yaml").exists() and list(run.glob("wandb/offline-run-*"))
    # a run refused before it starts (here: another seed than the checkpoint's) keeps Hydra's copies clean too
    p = run_cli(["train", "model=tiny_bert", "debug=smoke", "logger=none", "seed=5", "data.max_length=32",
                 "++trainer.ds_overrides.comet.api_key=SECRETAGAIN", "++trainer.ds_overrides.comet.enabled=false",
                 f"run_dir={run}"], cwd=tmp_path, check=False)
    assert p.returncode == 2 and "seed: 0 -> 5" in p.stderr, p.stderr
    # (the refusal listed the changed keys with their values: both tokens, the saved one from job.yaml)
    assert "comet.api_key: *** -> ***" in p.stderr and "SECRET" not in p.stderr + p.stdout, p.stderr
    leaked = [str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and b"SECRETAGAIN" in p.read_bytes()]
    assert leaked == [], leaked
    from runx.trainers.tracking import redact_arg
    assert redact_arg("++data.extra={token: hf_x, name: a}") == "++data.extra=***"
    assert redact_arg("data.extra={name: tokenizer_v2}") == "data.extra={name: tokenizer_v2}"   # a value, not a key
    assert redact_arg("++logger.api_key=x") == "++logger.api_key=***" and redact_arg("optim.lr=0.1") == "optim.lr=0.1"
    # the overrides inside Hydra's launcher lines (now shown: `#0 : seed=0 ...`) go through the same rule
    from runx.trainers.tracking import redact_text
    assert redact_text("#0 : seed=0 ++logger.api_key=abc model.tokenizer=x data.extra={token: t, name: {a: 1}}") \
        == "#0 : seed=0 ++logger.api_key=*** model.tokenizer=x data.extra=***"
    assert redact_text("overrides: ['seed=0', '++a.api_key=abc']") == "overrides: ['seed=0', '++a.api_key=***']"


def test_fused_logprob_with_a_lora_adapter_on_the_output_layer_is_refused(tmp_path):
    """The fused log-prob kernel reads lm_head's base weight and replaces its forward: a LoRA adapter there was
    never computed (its B stayed 0; LoRA-GA's offset base started at a loss of 19.6 instead of 5.5)."""
    from runx.cli.config import compose
    from runx.recipes.lora import LoRA
    from runx.recipes.lora_ga import LoRAGA
    from runx.trainers.recipe import RecipeConfigError, build_recipe
    for cls, name in ((LoRA, "lora"), (LoRAGA, "lora_ga")):
        base = [f"recipe={name}", "model=tiny_llama", "data=tiny_text", "recipe.target_modules=[q_proj,lm_head]"]
        with pytest.raises(RecipeConfigError, match=r"recipe.fused_logprob=true with a LoRA adapter on the output"):
            build_recipe(cls, compose(base + ["recipe.fused_logprob=true"]), str(tmp_path)).build_model()
        build_recipe(cls, compose(base), str(tmp_path)).build_model()          # unfused: the adapter is computed


def test_a_data_loader_worker_does_not_hold_the_run_dirs_lock(tmp_path):
    """DataLoader workers are forked with the run dir's lock files open: one orphaned by a kill -9 of the training
    process kept the lock for seconds, and the rerun was refused as "in use by another runx run"."""
    import fcntl
    import multiprocessing

    from runx.cli import train
    from runx.trainers.runtime import quiet_data_worker
    train.hold_run_dir(str(tmp_path))
    ours = [f for f in train._HELD if f.name.startswith(str(tmp_path))]
    ready = multiprocessing.get_context("fork").Event()

    def worker():
        quiet_data_worker(0)
        ready.set()
        import time
        time.sleep(60)
    p = multiprocessing.get_context("fork").Process(target=worker, daemon=True)
    p.start()
    try:
        assert ready.wait(30)
        for f in ours:                  # the training process is gone; its worker lives on
            train._HELD.remove(f)
            f.close()
        with open(tmp_path / ".runx" / "runx.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        p.kill()


def test_a_save_into_an_existing_checkpoint_folder_cut_short_is_not_complete(tmp_path):
    """A run rolled back in its own folder (resume=<run>/ckpt/step_2) saves step_4 again over the old step_4: a
    kill during that save left the new model file beside the old optimizer file and the old runx_complete.json,
    and resume=auto loaded the mix without a word. The marker goes before the save; the cut-short folder is then
    incomplete, and resume=auto continues from step_2."""
    run = tmp_path / "run"
    args = ["train", f"run_dir={run}", *TINY, "trainer.max_steps=4", "trainer.ckpt_every=2",
            "trainer.micro_batch_size=8"]
    run_cli(args)
    patch = tmp_path / "crash_in_save"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import os\n"
        "from deepspeed.runtime.engine import DeepSpeedEngine\n"
        "_save = DeepSpeedEngine.save_checkpoint\n"
        "def save(self, save_dir, tag=None, **kw):\n"
        "    if tag == 'step_4':\n"
        "        os._exit(9)   # killed during the save\n"
        "    return _save(self, save_dir, tag=tag, **kw)\n"
        "DeepSpeedEngine.save_checkpoint = save\n")
    env = {"PYTHONPATH": os.pathsep.join([str(patch)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    p = run_cli(args + [f"resume={run / 'ckpt' / 'step_2'}"], env=env, check=False)
    assert p.returncode == 9, p.stderr[-2000:]
    from runx.trainers.runtime import is_complete   # (resume=auto then continues the newest complete one, step_2)
    assert is_complete(str(run / "ckpt"), "step_2") and not is_complete(str(run / "ckpt"), "step_4")


def test_the_environment_record_names_the_repository_it_could_read(tmp_path, monkeypatch):
    """Installed with the README's `pip install .`, runx's own folder is no git checkout: env.json said git_sha ""
    and git_dirty false (a clean tree). It now records the repository runx was started in, else null."""
    import subprocess

    import runx.trainers.tracking as tracking
    monkeypatch.setattr(tracking, "__file__", str(tmp_path / "site" / "runx" / "trainers" / "tracking.py"))
    (tmp_path / "site").mkdir()
    monkeypatch.chdir(tmp_path / "site")
    rec = tracking.environment_record()
    assert rec["git_sha"] is None and rec["git_dirty"] is None and rec["git_repo"] is None
    project = tmp_path / "project"
    project.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=project, check=True)
    (project / "a.txt").write_text("a")
    subprocess.run(git + ["add", "a.txt"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-qm", "a"], cwd=project, check=True)
    monkeypatch.chdir(project)
    rec = tracking.environment_record()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert (rec["git_sha"], rec["git_dirty"], rec["git_repo"]) == (head, False, str(project))


def test_packed_batches_count_samples_and_lora_flops_leave_out_frozen_weight_gradients(tmp_path):
    """samples/s counted a packed micro-batch's rows (4, then 6, for 8 samples); TFLOPS and MFU took 6N per token
    for LoRA too, whose frozen weights get no gradient (4N + 2N trainable)."""
    from runx.cli.config import compose
    from runx.recipes.lora import LoRA
    from runx.recipes.text_data import pack_collate
    from runx.trainers.hf import count_params
    from runx.trainers.recipe import build_recipe
    sft = _sft(tmp_path)
    items = [{"input_ids": list(range(1, k + 1)), "labels": list(range(1, k + 1))} for k in (5, 9, 3, 12, 7, 2, 8, 4)]
    packed = pack_collate(0, 16)(items)
    assert len(packed["input_ids"]) < 8 and sft.batch_size(packed) == 8
    model = sft.build_model()
    assert sft.flops_per_token(model) == 6 * count_params(model)
    lora = build_recipe(LoRA, compose(["recipe=lora", "model=tiny_llama"]), str(tmp_path / "l"))
    model = lora.build_model()
    n, t = count_params(model), count_params(model, trainable_only=True)
    assert 0 < t < n / 2 and lora.flops_per_token(model) == 4 * n + 2 * t


def test_a_checkpoint_deletion_cut_short_leaves_no_complete_marker(tmp_path, monkeypatch):
    """Rotation deleted a checkpoint with rmtree, in directory order: cut short, runx_complete.json could
    survive beside a half-deleted checkpoint that resume=auto would then load. The marker goes first."""
    from runx.trainers import runtime
    step = tmp_path / "step_4"
    step.mkdir()
    for f in ("mp_rank_00_model_states.pt", "rng_rank0.pt", "runx_complete.json"):
        (step / f).write_text("x")
    monkeypatch.setattr(runtime.shutil, "rmtree", lambda *a, **k: None)   # killed before any file went
    runtime.remove_checkpoint(str(tmp_path), "step_4")
    assert not runtime.is_complete(str(tmp_path), "step_4") and (step / "rng_rank0.pt").exists()


def test_a_resume_never_move_cut_short_is_finished_into_the_same_folder(tmp_path, monkeypatch):
    """resume=never moves the earlier run aside; killed part-way, its checkpoints sat in one folder and its summary
    in the run dir, which the next run took for a finished run without checkpoints and moved to a second folder.
    The next run now finishes the move into the first one."""
    from runx.cli import train
    run = tmp_path / "run"
    (run / "ckpt" / "step_2").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "summary.json").write_text("{}")
    real, calls = os.replace, []

    def killed_on_the_second(a, b):
        calls.append(a)
        if len(calls) == 3:    # (the first one writes the move's own record)
            raise KeyboardInterrupt
        return real(a, b)
    with monkeypatch.context() as m:
        m.setattr(train.os, "replace", killed_on_the_second)
        with pytest.raises(KeyboardInterrupt):
            train.supersede_previous_run(str(run))
    assert not (run / "ckpt").exists() and (run / "summary.json").exists()   # split in two
    dest = train.finish_superseding(str(run))
    assert dest is not None and sorted(os.listdir(dest)) == ["ckpt", "metrics.jsonl", "summary.json"]
    assert not (run / "summary.json").exists() and not (run / ".runx" / "superseding").exists()
    assert [d for d in os.listdir(run / ".runx") if d.startswith("superseded-")] == [os.path.basename(dest)]
    assert train.finish_superseding(str(run)) is None
