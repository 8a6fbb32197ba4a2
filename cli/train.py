"""The `runx train` Hydra app and how a composed config becomes a run.

The parent composes once and writes the resolved config to the run dir; with several processes it
starts them through an existing launcher (torchrun, or the DeepSpeed launcher for hostfile multi-node),
and each worker loads that resolved copy — one run dir, not one per rank.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time

import hydra
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("runx")
LAST_EXIT_CODE = 0
INTERRUPTED_HINT: str | None = None   # how to resume the run a Ctrl-C interrupted (runx main prints it)
TORCHRUN_PORT = 29500   # torchrun's and the DeepSpeed launcher's default master port


def run_dir_for(cfg) -> str:
    """run_dir=<path> pins a single run's folder; in a sweep it is the sweep's folder and each job gets
    <path>/<job number> (hydra.sweep.dir), so jobs never resume one another's checkpoints."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if cfg.get("run_dir") and HydraConfig.get().mode != RunMode.MULTIRUN:
        return os.path.abspath(os.path.expanduser(str(cfg.run_dir)))
    return os.path.abspath(HydraConfig.get().runtime.output_dir)


def objective_value(result: dict, cfg) -> float | None:
    key = cfg.get("objective") or None
    if key is None:
        from hydra.core.hydra_config import HydraConfig
        try:
            sweeper = HydraConfig.get().sweeper._target_
        except Exception:
            sweeper = ""
        if "optuna" in str(sweeper).lower():   # `runx train` checks this before the sweep starts
            _objective_problem("an Optuna sweep needs objective=<final metric>, e.g. objective=eval/accuracy "
                               f"(this run's final metrics: {', '.join(sorted(result))})")
        return None
    if not isinstance(result.get(key), (int, float)):
        _objective_problem(f"objective={key}: not a numeric final metric of this run. Valid choices: "
                           f"{', '.join(sorted(k for k, v in result.items() if isinstance(v, (int, float))))}.")
    return float(result[key])


def _objective_problem(problem: str):
    """Stop the sweep with the config-problem paragraph (the finished run's directory stays as it is)."""
    global LAST_EXIT_CODE
    from runx.cli.config import format_problems
    print(format_problems([problem]), file=sys.stderr)
    LAST_EXIT_CODE = 2
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path="pkg://runx.conf", config_name="config")
def hydra_main(cfg: DictConfig):
    global LAST_EXIT_CODE
    from runx.cli.config import absolute_local_paths, check_paths, fill_recipe_defaults, format_problems, validate
    from runx.trainers.recipe import RecipeConfigError
    from runx.trainers.runtime import Diverged, Stopped
    fill_recipe_defaults(cfg)
    absolute_local_paths(cfg)
    job = _sweep_job()
    # multirun jobs are validated here (single runs already were, before Hydra started), and every job checks
    # its paths where it runs (a SLURM job: on its node)
    problems = validate(cfg) + check_paths(cfg)
    run_dir = run_dir_for(cfg)
    _redact_hydra_copies(run_dir)   # first: a run refused below keeps Hydra's copies of the overrides too
    if not problems:
        try:
            result = launch(cfg, run_dir)
        except RecipeConfigError as e:  # the recipe's own cross-key checks: a config problem, not a crash
            problems = [str(e)]
        except Stopped as e:            # SIGTERM: checkpoint saved at a step boundary
            print(f"runx: {e}", file=sys.stderr)
            _log_to_files_only(f"runx: {e}", with_traceback=False, level=logging.WARNING)   # (what SLURM users read)
            LAST_EXIT_CODE = 143
            raise SystemExit(143) from None
        except Diverged as e:           # NaN / inf loss: one line, no traceback; a sweep goes on with its other jobs
            print(f"runx: {e}", file=sys.stderr)
            _log_to_files_only(f"runx: {e}", with_traceback=False)
            LAST_EXIT_CODE = 1
            if job is None:
                raise SystemExit(1) from None
            SWEEP_FAILURES.append((job, "diverged", run_dir))
            raise SweepJobDiverged(f"runx: job #{job} diverged (printed with it)") from None
        except KeyboardInterrupt:       # Ctrl-C: runx main prints how to resume this run (its folder named)
            global INTERRUPTED_HINT
            from runx.trainers.runtime import resume_hint
            INTERRUPTED_HINT = resume_hint(cfg, run_dir)
            _log_to_files_only(f"runx: interrupted; {INTERRUPTED_HINT}", with_traceback=False,
                               level=logging.WARNING)
            raise
        except BaseException as e:      # Hydra prints it; train.log (what a SLURM user reads) gets it too
            if not isinstance(e, SystemExit):
                _log_to_files_only(f"the run failed: {type(e).__name__}")
                if job is not None:
                    SWEEP_FAILURES.append((job, f"crashed ({type(e).__name__})", run_dir))
            raise
    if problems:
        paragraph = format_problems(problems)
        print(paragraph, file=sys.stderr)
        _log_to_files_only(paragraph, with_traceback=False)
        LAST_EXIT_CODE = 2
        if job is None:
            raise SystemExit(2)
        # a sweep's job: Hydra marks it failed and the sweep goes on (as after a crash); the sweeper decides
        SWEEP_FAILURES.append((job, "config problem", run_dir))
        raise SweepJobConfigProblem(f"runx: job #{job} stopped on the config problem printed with it")
    return objective_value(result, cfg)


def _redact_hydra_copies(run_dir: str) -> None:
    """Hydra's copies of the config and overrides (<run_dir>/.hydra/*.yaml, a sweep's multirun.yaml) with secrets
    redacted as in config.yaml."""
    from runx.trainers.tracking import redact_hydra_outputs
    sweep = None
    try:   # (no Hydra context when launch() is called directly)
        if _sweep_job() is not None:
            from hydra.core.hydra_config import HydraConfig
            sweep = str(HydraConfig.get().sweep.dir)
    except ValueError:
        pass
    redact_hydra_outputs(run_dir, sweep)


# In-process sweep jobs (Hydra's basic launcher) that failed: (job number, why, run dir). `runx train -m`
# lists them once the sweep ends.
SWEEP_FAILURES: list[tuple[int, str, str]] = []


class SweepDirRecorder(Callback):
    """Hydra callback (conf/config.yaml: hydra.callbacks.runx_sweep): remembers the folder of the sweep this
    process runs, which Hydra's own config no longer says once the sweep has ended."""
    sweep_dir: str | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
        SweepDirRecorder.sweep_dir = os.path.abspath(str(config.hydra.sweep.dir))
        # the mark of a sweep's folder that its jobs find (tracking.sweep_of: their W&B name and group); Hydra's
        # multirun.yaml is written by its basic sweeper only, not by Optuna's
        from runx.trainers.tracking import SWEEP_MARK
        os.makedirs(SweepDirRecorder.sweep_dir, exist_ok=True)
        with open(os.path.join(SweepDirRecorder.sweep_dir, SWEEP_MARK), "a"):
            pass


def failed_jobs_on_disk() -> list[tuple[int, str, str]]:
    """The failed jobs of a sweep whose jobs ran in other processes (Hydra's submitit launchers), read from their
    run dirs as `runx report` reads them: (job number, why, run dir)."""
    sweep_dir = SweepDirRecorder.sweep_dir
    if not sweep_dir or not os.path.isdir(sweep_dir):
        return []
    from runx.cli.report import collect
    rows, _ = collect(sweep_dir)
    return [(int(r["run"]), "diverged" if r["_status"].startswith("diverged") else r["_status"], r["_path"])
            for r in rows if r["_status"] != "done" and r["run"].isdigit()]


def _sweep_job() -> int | None:
    """This run's job number when it is a job of a multirun sweep, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return int(hc.job.num)


@contextlib.contextmanager
def optuna_sweeps_end_cleanly():
    """Two endings of Hydra's Optuna sweeper that were tracebacks, mended while a runx sweep runs:

    - Hydra drives its study with ask/tell and caps n_trials at a grid's size, yet Optuna's GridSampler still
      calls study.stop() once the last grid point is told, which outside study.optimize raises RuntimeError
      (optuna#4121). Hydra swallows it after a completed trial, not after a failed one: a grid sweep whose last
      trial failed lost its optimization_results.yaml. That stop is a no-op here (the sweep ends by its count).
    - A sweep whose every trial failed has no best trial (optuna raises ValueError): one line says so, the exit
      status is a failed job's, and `runx train -m` lists the failed jobs."""
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
    from optuna.samplers import GridSampler
    after_trial, sweep = GridSampler.after_trial, OptunaSweeperImpl.sweep

    def grid_after_trial(self, study, trial, state, values):
        try:
            after_trial(self, study, trial, state, values)
        except RuntimeError as e:
            if "Study.stop" not in str(e):
                raise

    def optuna_sweep(self, arguments):
        global LAST_EXIT_CODE
        try:
            return sweep(self, arguments)
        except ValueError as e:
            if "No trials are completed" not in str(e):
                raise
            print("runx: every trial of the Optuna sweep failed, so it has no best trial", file=sys.stderr)
            LAST_EXIT_CODE = LAST_EXIT_CODE or 1
    GridSampler.after_trial, OptunaSweeperImpl.sweep = grid_after_trial, optuna_sweep
    try:
        yield
    finally:
        GridSampler.after_trial, OptunaSweeperImpl.sweep = after_trial, sweep


class SweepJobDiverged(CompactHydraException):
    """A sweep job whose loss became NaN / inf: failed, as a crash is, without a traceback."""


class SweepJobConfigProblem(CompactHydraException):
    """A sweep job stopped by a config problem (printed when it happened). Hydra records the job as failed and
    runs the others (as after a crash); at the end it prints only this message, no traceback."""


# Keys a resumed run may change: how long it runs (early-stopping patience included), how often it evaluates /
# logs / saves, where it logs and on which machine. Any other change (recipe, model, data, seed, optimiser,
# batch, precision) would load the checkpoint into a different run, and rewrite the run's config.yaml to
# describe that other run.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.epochs", "trainer.eval_every", "trainer.log_every",
                     "trainer.ckpt_every", "trainer.keep_last", "trainer.progress", "trainer.dataloader_workers",
                     "trainer.device", "trainer.stop_on_nonfinite_loss",
                     "trainer.nvme_path", "trainer.aio.", "trainer.early_stop_patience", "trainer.early_stop_min_delta",
                     "data.max_eval_samples", "logger.", "plan.", "launcher.", "export_at_end", "resume", "run_dir",
                     "objective")


# resume=<checkpoint of another run dir> may also move the run to another memory layout: DeepSpeed loads a ZeRO-3
# checkpoint with or without CPU offload (how an NVMe run continues: nvme_resume_problems)
RESUMABLE_ELSEWHERE = ("trainer.name", "trainer.offload_param", "trainer.offload_optimizer")


def resume_problems(cfg, run_dir: str) -> list[str]:
    """A run that would resume a checkpoint (resume=auto into a run dir holding one, or resume=<path>): the config
    must be that checkpoint's run's, up to RESUMABLE_CHANGES. Otherwise the checkpoint's optimizer and schedule
    state would silently override the new settings (a new optim.lr), or fail to load (another recipe)."""
    from omegaconf import OmegaConf

    from runx.cli.config import same_path_value
    from runx.cli.report import _flatten
    from runx.trainers.runtime import checkpoint_root
    mode = str(cfg.get("resume", "auto"))
    if mode == "never":
        return []
    root = checkpoint_root(mode, run_dir)
    saved = os.path.join(os.path.dirname(os.path.normpath(root)), ".runx", "job.yaml")
    if not os.path.exists(os.path.join(root, "latest")) or not os.path.exists(saved):
        return []
    allowed = RESUMABLE_CHANGES + (RESUMABLE_ELSEWHERE if mode != "auto" else ())
    old = _flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    # keys only one side has (a key added or removed by a runx upgrade) do not block; a changed recipe changes
    # recipe.name, which both have
    differ = [k for k in sorted(set(old) & set(new)) if not same_path_value(k, old[k], new[k])
              and not any(k == p or p.endswith(".") and k.startswith(p) for p in allowed)]
    if not differ:
        return []
    from runx.trainers.tracking import is_secret   # (the saved job.yaml holds secrets unredacted)

    def value(k, v):
        return "***" if is_secret(k, v) else v
    shown = "; ".join(f"{k}: {value(k, old[k])} -> {value(k, new[k])}" for k in differ[:8])
    more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
    where = run_dir if mode == "auto" else root
    return [f"resume={mode}: {where} holds a checkpoint of a run with another config ({shown}{more}). Resuming "
            "would continue that run under these settings. Valid choices: the same settings as that run (only "
            "max_steps, early stopping, eval/log/checkpoint intervals, logger, launcher and machine keys may change"
            + (", and the offload layout when resuming another run's checkpoint" if mode != "auto" else "")
            + "), resume=never to start over" + (" in this folder" if mode == "auto" else "") + ", or another run_dir."]


# what a training run leaves in its run dir besides its config and logs: a run started over (resume=never) moves
# them aside, so that its checkpoints, metrics and W&B run are its own
RUN_STATE = ("ckpt", "metrics.jsonl", "summary.json", "wandb_run_id.txt", "wandb", "export", "eval")


def supersede_previous_run(run_dir: str) -> str | None:
    """resume=never into a run dir an earlier run wrote: that run's checkpoints, metrics, summary, W&B run and
    export move to <run_dir>/.runx/superseded-<time>/ (nothing is deleted). Without this, keep_last pruning
    deleted the new run's checkpoints as older than the earlier run's, `latest` then named a deleted folder, and
    the new run's W&B steps were appended to the earlier run's. The folder moved to, or None."""
    present = [n for n in RUN_STATE if os.path.lexists(os.path.join(run_dir, n))]
    if not present:
        return None
    dest = os.path.join(run_dir, ".runx", "superseded-" + time.strftime("%Y%m%d-%H%M%S"))
    while os.path.exists(dest):
        dest += "_"
    os.makedirs(dest)
    from runx.trainers.datajob import atomic_write_bytes
    atomic_write_bytes(_superseding(run_dir), dest.encode())   # (a move cut short is finished into dest)
    for n in present:
        os.replace(os.path.join(run_dir, n), os.path.join(dest, n))
    os.remove(_superseding(run_dir))
    log.info("the earlier run's %s moved to %s", ", ".join(present), dest)
    return dest


def _superseding(run_dir: str) -> str:
    return os.path.join(run_dir, ".runx", "superseding")


def finish_superseding(run_dir: str) -> str | None:
    """A resume=never run cut short while it moved the earlier run aside left that run in two places (its
    checkpoints moved, its summary not, which the next run then took for a finished run without checkpoints and
    moved into a second folder): the rest goes into the same folder first. The folder, or None."""
    pending = _superseding(run_dir)
    if not os.path.exists(pending):
        return None
    with open(pending) as f:
        dest = f.read().strip()
    present = [n for n in RUN_STATE if os.path.lexists(os.path.join(run_dir, n))
               and not os.path.lexists(os.path.join(dest, n))]
    if os.path.isdir(dest):
        for n in present:
            os.replace(os.path.join(run_dir, n), os.path.join(dest, n))
        if present:
            log.warning("an earlier resume=never run was stopped while it moved the run before it aside: its %s "
                        "moved to %s too", ", ".join(present), dest)
    os.remove(pending)
    return dest if os.path.isdir(dest) else None


def nvme_resume_problems(cfg, run_dir: str) -> list[str]:
    """A checkpoint to resume into an engine that offloads to NVMe: DeepSpeed (0.19.8) cannot load one there. Its
    stage-3 loader purges the NVMe-swapped optimizer state after loading it (Adam restarts from step 1, silently)
    and, with parameters on NVMe and the optimizer on CPU, fails. The same checkpoint loads exactly under CPU
    offload (tests/test_z_nvme.py), which the message offers."""
    t = cfg.trainer
    where = {k: str(t.get(k)) for k in ("offload_param", "offload_optimizer")}
    mode = str(cfg.get("resume", "auto"))
    if mode == "never" or not any(v.startswith("nvme") for v in where.values()):
        return []
    from runx.trainers.runtime import checkpoint_root
    root = checkpoint_root(mode, run_dir)
    if not os.path.exists(os.path.join(root, "latest")):
        return []
    from importlib.metadata import version

    from runx.trainers.nvme import run_swap_dir
    swap = run_swap_dir(str(t.nvme_path), run_dir)
    left = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(swap) for f in fs)
    # a run stopped hard leaves its swap files (a finished or stopped-by-signal one removes them)
    leftover = (f" The stopped run's swap files ({swap}, {left / 2**30:.2f} GiB) serve neither: delete them to "
                "free the disk.") if left else ""
    return [f"resume={mode}: {root} holds a checkpoint, and this run offloads to NVMe (trainer.offload_param="
            f"{where['offload_param']}, trainer.offload_optimizer={where['offload_optimizer']}). DeepSpeed "
            f"{version('deepspeed')} cannot load a checkpoint into an NVMe-offloaded engine: it restarts Adam's "
            "state (optimizer on NVMe) or fails (parameters on NVMe), so the run would not continue where it "
            f"stopped. Valid choices: resume that checkpoint with CPU offload where it fits (trainer=zero3_cpu_offload "
            f"resume={root} run_dir=<a new folder>: it continues exactly), or resume=never to start over." + leftover]


def _log_to_files_only(message: str, with_traceback: bool = True, level: int = logging.ERROR) -> None:
    """A message (and the current exception's traceback) into the log files (train.log: what a SLURM user
    reads), not again onto the console."""
    import traceback
    record = logging.LogRecord("runx", level, __file__, 0, "%s\n%s",
                               (message, traceback.format_exc() if with_traceback else ""), None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


_HELD: list = []   # open lock files: a lock lives as long as its process


def hold_run_dir(run_dir: str, who: str = "runx") -> None:
    """Lock run_dir for this process's lifetime (released by the kernel when it exits, even on kill -9).
    runx takes "runx" for a training run; rank 0 of its workers takes "workers", which a new runx also checks,
    so a rerun cannot start while workers of an earlier one are still stopping."""
    import fcntl
    if any(f.name.startswith(os.path.join(run_dir, ".runx", "")) for f in _HELD):
        return          # this process holds it already (a second run in one process, e.g. a test)
    os.makedirs(os.path.join(run_dir, ".runx"), exist_ok=True)
    for name in ("runx", "workers") if who == "runx" else (who,):
        f = open(os.path.join(run_dir, ".runx", f"{name}.lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            from runx.trainers.recipe import RecipeConfigError
            raise RecipeConfigError(f"run_dir={run_dir} is in use by another runx run (its "
                                    f"{'runx process is' if name.startswith('runx') else name + ' are'} still "
                                    "running). Wait for it to stop, or give another run_dir=") from None
        if who == "runx" and name == "workers":
            f.close()            # only checked: the new run's own workers take it
        else:
            _HELD.append(f)


def multi_node(cfg) -> bool:
    """A torchrun run whose nodes each run the same runx command (launcher=torchrun launcher.num_nodes > 1)."""
    return cfg.launcher.kind == "torchrun" and int(cfg.launcher.num_nodes) > 1


def run_dir_lock_name(cfg) -> str:
    """The run dir's lock: one per run, and of a run across nodes one per node (on a shared filesystem whose
    flock is cluster-wide, NFSv4, Lustre, GPFS, the second node found the first one's lock and refused to start,
    leaving the first waiting in the rendezvous)."""
    if not multi_node(cfg):
        return "runx"
    import socket
    return f"runx-{socket.gethostname()}"


def is_master_node(addr: str) -> bool:
    """Whether launcher.master_addr names this machine (its host name, or an address of it)."""
    import socket
    host = socket.gethostname()
    if addr in (host, host.split(".")[0], socket.getfqdn(), "localhost") or addr.startswith("127."):
        return True
    try:
        target = socket.gethostbyname(addr)
    except OSError:
        return False
    import psutil   # every address of this machine (an InfiniBand interface's too), not only its host name's
    mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return target in mine or target.startswith("127.")


def node_log_aside(run_dir: str) -> str | None:
    """On a node other than the first of a torchrun run across nodes: this node's log lines go to
    .runx/train-<host>.log instead of the shared train.log (which every node's Hydra file handler appended to,
    interleaved). Returns the new log file, or None where no handler wrote train.log."""
    import socket
    shared = os.path.abspath(os.path.join(run_dir, "train.log"))
    root, moved = logging.getLogger(), None
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and os.path.abspath(h.baseFilename) == shared:
            moved = os.path.join(run_dir, ".runx", f"train-{socket.gethostname()}.log")
            os.makedirs(os.path.dirname(moved), exist_ok=True)
            aside = logging.FileHandler(moved)
            aside.setFormatter(h.formatter)
            aside.setLevel(h.level)
            for f in h.filters:
                aside.addFilter(f)
            root.removeHandler(h)
            h.close()
            root.addHandler(aside)
    return moved


def slurm_step_problem(cfg, env=None) -> str | None:
    """A SLURM step (srun, or submitit's tasks) of several tasks each running this command: runx starts the run's
    own processes (trainer.num_procs, through torchrun), one runx per node. With hydra.launcher.tasks_per_node=8
    (submitit's one-task-per-GPU habit) or nodes=2 without launcher.num_nodes, every task ran a run of its own
    into the same run dir (up to 8 x 8 processes; all but one stopped at the run dir's lock)."""
    env = os.environ if env is None else env
    if "SLURM_STEP_NUM_TASKS" not in env or env.get("RANK") is not None:   # not an srun step / a launched rank
        return None
    tasks, nodes = int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_STEP_NUM_NODES", "1") or 1)
    run_nodes = int(cfg.launcher.num_nodes) if cfg.launcher.kind == "torchrun" else 1
    if tasks == 1 or run_nodes > 1 and tasks == nodes == run_nodes:   # one runx per node of the run
        return None
    return (f"this SLURM step runs {tasks} task(s) on {nodes} node(s), each starting this run: runx starts its "
            f"own trainer.num_procs={cfg.trainer.num_procs} process(es) per node. Valid choices: one task "
            "(hydra.launcher.tasks_per_node=1 hydra.launcher.nodes=1, srun -n 1) with hydra.launcher.gpus_per_node "
            "= trainer.num_procs; across nodes one task per node with launcher=torchrun "
            "launcher.num_nodes=<nodes>, or launcher=deepspeed with a hostfile from one task")


def launch(cfg, run_dir: str) -> dict:
    """Write the resolved config, then run in-process (1 process) or through a launcher."""
    from runx.trainers.tracking import environment_record, save_resolved_config
    from runx.trainers.datajob import atomic_write_json
    from runx.trainers.recipe import RecipeConfigError
    recipe_kind, worker = RECIPES_KIND(cfg), os.environ.get("RUNX_WORKER") == "1"
    trains_here = recipe_kind == "train" and not worker   # (the launching process of a training run)
    from runx.trainers.runtime import requeued_resume
    if trains_here and requeued_resume(cfg.get("resume", "auto"), run_dir) != str(cfg.get("resume", "auto")):
        log.info("a requeued SLURM job (SLURM_RESTART_COUNT=%s): it resumes its own checkpoint (resume=auto), not "
                 "resume=%s", os.environ.get("SLURM_RESTART_COUNT"), cfg.resume)
        from omegaconf import OmegaConf
        OmegaConf.update(cfg, "resume", "auto")
    mode = str(cfg.get("resume", "auto"))
    shape = slurm_step_problem(cfg) if trains_here else None
    if shape:
        raise RecipeConfigError(shape)
    from runx.trainers.datajob import slurm_array_task
    if trains_here or recipe_kind == "data" and slurm_array_task()[1] <= 1:
        # a second run into the same folder would interleave checkpoints (shards) with this one; a SLURM array's
        # tasks share a data job's folder on purpose (each takes its own shards)
        hold_run_dir(run_dir, run_dir_lock_name(cfg))
    problems = resume_problems(cfg, run_dir) + nvme_resume_problems(cfg, run_dir) if not worker else []
    job = None
    if recipe_kind == "data" and os.path.isdir(run_dir):   # a rerun of a data job: same settings?
        from runx.recipes import RECIPES
        from runx.trainers.recipe import build_recipe
        job = build_recipe(RECIPES[cfg.recipe.name].load(), cfg, run_dir)   # run_job runs this one
        problems += [p for p in [job.pin_refusal(mode, slurm_array_task()[1])] if p]
    if problems:   # before config.yaml is rewritten: the run dir keeps describing its checkpoint / shards
        raise RecipeConfigError(problems[0])
    if cfg.plan.check and trains_here:
        from runx.trainers.plan import check_fits
        check_fits(cfg)  # stops with a clear message when the config cannot fit this machine (no config.yaml then)
    os.makedirs(run_dir, exist_ok=True)
    # a torchrun run across nodes: every node runs this command; the first node (launcher.master_addr) moves an
    # earlier run aside and records the environment, the others only start their processes
    first_node = not multi_node(cfg) or is_master_node(str(cfg.launcher.master_addr))
    if not first_node and not worker:
        aside = node_log_aside(run_dir)
        if aside:
            log.info("this node's log: %s (train.log is the first node's)", aside)
    if trains_here and first_node:
        finish_superseding(run_dir)
    if trains_here and mode == "never" and first_node:
        supersede_previous_run(run_dir)
    elif trains_here and first_node and mode == "auto" and os.path.exists(os.path.join(run_dir, "summary.json")) and \
            not os.path.exists(os.path.join(run_dir, "ckpt", "latest")):
        # a finished run without checkpoints (trainer.ckpt_every=0): nothing to resume, and its results would be
        # overwritten by this one's
        from runx.trainers.tracking import read_summary
        earlier = read_summary(run_dir) or {}
        moved = supersede_previous_run(run_dir)
        how = (f"a run that diverged at step {earlier['diverged_at']} before its first checkpoint"
               if earlier.get("diverged_at") else "a finished run without a checkpoint (trainer.ckpt_every=0)")
        log.warning("%s holds %s, so there is nothing to resume: this run starts at step 0, and the earlier run's "
                    "results moved to %s", run_dir, how, moved)
    save_resolved_config(cfg, os.path.join(run_dir, "config.yaml"))
    save_resolved_config(cfg, os.path.join(run_dir, ".runx", "job.yaml"), redacted=False)
    if first_node:
        atomic_write_json(os.path.join(run_dir, "env.json"), environment_record())
    n = int(cfg.trainer.num_procs)
    kind = cfg.launcher.kind
    if n <= 1 and kind == "local" or worker:
        return run_job(cfg, run_dir, job)
    cmd = launcher_command(cfg, run_dir)
    log.info("launching %d processes: %s", n, " ".join(cmd))
    from runx.cli.worker import parent_identity, problem_files
    env = dict(os.environ, RUNX_WORKER="1", PYTHONUNBUFFERED="1", **parent_identity())
    if not _has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    from runx.trainers.runtime import diverged_file, parent_signal_file, submitit_preemption
    # what the workers and this process leave for each other about one launch: none from an earlier one
    for stale in [diverged_file(run_dir), parent_signal_file(run_dir), *problem_files(run_dir)]:
        if os.path.exists(stale):
            os.remove(stale)
    handover = submitit_preemption()
    if handover:   # SLURM signals every process of the step: the workers stop on it too, the launcher ignores it
        env["RUNX_PREEMPT_SIGNAL"] = str(int(handover[0]))
    # DeepSpeed's launcher across nodes (pdsh): a signal to its runner reaches the other nodes' workers only as a
    # kill 30 s later (SIGUSR1 not at all); the first signal reaches them through the run dir instead
    ds_nodes = kind == "deepspeed" and bool(cfg.launcher.hostfile) and int(cfg.launcher.num_nodes) > 1
    rc, signalled = _run_forwarding_signals(cmd, env, handover[0] if handover else None,
                                            record=parent_signal_file(run_dir), through_record=ds_nodes)
    if rc != 0 and signalled:
        import signal
        from runx.trainers.runtime import Stopped
        _wait_for_workers(run_dir)
        if handover and signalled == signal.Signals(handover[0]).name:
            from runx.trainers.runtime import submitit_requeue   # requeues the job and exits; it then resumes
            submitit_requeue(*handover)
        latest = os.path.join(run_dir, "ckpt", "latest")
        saved = open(latest).read().strip() if os.path.exists(latest) else None
        from runx.trainers.runtime import resume_hint
        raise Stopped(f"stopped by {signalled}: the launched processes stopped at a step boundary"
                      + (f" (latest checkpoint: {saved})" if saved else "")
                      + "; " + resume_hint(cfg, run_dir))
    # the workers leave these with exit 0 where every rank has them (no torchrun failure report over the message)
    if os.path.exists(diverged_file(run_dir)):
        from runx.trainers.runtime import Diverged
        with open(diverged_file(run_dir)) as f:
            raise Diverged(f.read())
    reported = problem_files(run_dir)
    if reported:                      # rank 0's problem, else the one a single rank found
        with open(reported[0]) as f:
            raise RecipeConfigError(f.read())
    if rc != 0:
        raise RuntimeError(f"the {kind} launcher exited with code {rc} (logs above; run dir {run_dir})")
    from runx.trainers.tracking import read_summary
    return read_summary(run_dir)


# torchrun's own SIGTERM handler gives the workers 30 s (--shutdown-timeout), then SIGKILLs them, mid-checkpoint
# for a large model, and prints a SignalException traceback. Told not to handle SIGTERM (--signals-to-handle,
# read from PET_SIGNALS_TO_HANDLE; older torchruns ignore it) torchrun just ends, as it always did on SIGUSR1;
# each worker then gets SIGTERM from the kernel (PR_SET_PDEATHSIG, runx.cli.worker), finishes its step, saves
# and exits, and runx waits for that.
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
# The launcher runs in a session of its own, so a Ctrl-C in the terminal reaches runx only (torchrun's handler
# would print a SignalException traceback); it ends with runx, however runx ends (PR_SET_PDEATHSIG, which
# survives the exec).
# Under submitit the launcher also ignores its preemption signal (SIG_IGN survives the exec; the workers install
# their own handler for it), which SLURM sends to every process of the job step: its default action ended it.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, int(signal.SIGTERM)); "
                    "os.getppid() != {parent} and os._exit(143); "
                    "p = os.environ.get('RUNX_PREEMPT_SIGNAL'); p and signal.signal(int(p), signal.SIG_IGN); "
                    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def _run_forwarding_signals(cmd: list[str], env: dict, preempt=None, record: str | None = None,
                            through_record: bool = False) -> tuple[int, str | None]:
    """Run the launcher; a SIGTERM / SIGUSR1 sent to this process (kill <pid>, a scheduler that signals only the
    parent) goes on to it, and from it to the workers, which checkpoint and stop. `preempt`: submitit's
    preemption signal, taken over here and passed on as SIGTERM. `record`: a file the first signal's name is
    written to; the workers read it each second and stop on it too. `through_record`: the first signal goes to
    the workers only that way (and to the ones on this machine directly), the launcher keeps running until they
    have stopped; a second signal goes on to the launcher."""
    import signal
    if cmd[0] == sys.executable and sys.platform.startswith("linux"):
        cmd = [sys.executable, "-c", _DIE_WITH_PARENT.format(parent=os.getpid())] + cmd[1:]
    proc = subprocess.Popen(cmd, env={**env, "PET_SIGNALS_TO_HANDLE": TORCHRUN_SIGNALS}, start_new_session=True)
    got: list[str] = []

    def forward(signum, frame):
        got.append(signal.Signals(signum).name)
        if record and len(got) == 1:
            from runx.trainers.datajob import atomic_write_bytes   # (a worker polling it reads all or nothing)
            atomic_write_bytes(record, got[0].encode())
        sig = signal.SIGTERM if signum == preempt else signum
        # the DeepSpeed launcher's runner dies on SIGTERM without passing it on, and its launch process (between
        # it and the workers) lives on: the workers get the signal straight away (torchrun passes it on itself)
        # (the workers only: the launch process, whose command line names runx.cli.worker too, would end every
        # process under it on SIGTERM, W&B's service included, before rank 0 had saved)
        workers = _workers(_launch_tree(proc)) if through_record or "deepspeed.launcher" in " ".join(cmd) else []
        if not (through_record and len(got) == 1):   # (through the record: the launcher only on a second signal)
            proc.send_signal(sig)
        for p in workers:
            _quietly(p.send_signal, sig)

    def suspend(signum, frame):
        # Ctrl-Z: the launch (a session of its own) does not get the terminal's SIGTSTP; it stops and continues
        # with runx. Every process stops, so no collective waits on a running peer (one suspended for longer
        # than the process group's timeout may still fail when it continues).
        tree = _launch_tree(proc)
        for p in tree:
            _quietly(p.suspend)
        os.kill(os.getpid(), signal.SIGSTOP)       # returns on SIGCONT (the shell's fg / bg)
        for p in tree:
            _quietly(p.resume)

    old = {sig: signal.signal(sig, forward)
           for sig in (signal.SIGTERM, signal.SIGUSR1, preempt) if sig is not None}
    old[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, suspend)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:       # Ctrl-C: the workers stop where they are, as a one-process run does
        _interrupt(proc)
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return rc, (got[0] if got else None)


def _interrupt(proc) -> None:
    """SIGTERM to the launcher (which then just ends, before it could report its workers' exits as failures),
    SIGINT to its workers (they leave where they are, quietly, exit 130); wait for them (15 s at most) so that
    their last lines come before runx's. Only the workers: W&B's service under rank 0 ended on the SIGINT too,
    and the segment's whole W&B history was lost ("Connection lost")."""
    import signal

    import psutil
    tree = _launch_tree(proc)
    alive = tree[:1] + _workers(tree)
    proc.terminate()
    for w in alive[1:]:
        _quietly(w.send_signal, signal.SIGINT)
    try:
        _, alive = psutil.wait_procs(alive, timeout=15)
    finally:   # stuck (e.g. in a collective whose peer has left), or a second Ctrl-C: none outlives runx
        for p in alive:
            _quietly(p.kill)
        if proc.poll() is None:
            proc.kill()


def _launch_tree(proc) -> list:
    """The launcher and its descendants (the workers) as psutil processes, launcher first; [] once it is gone."""
    import psutil
    try:
        launcher = psutil.Process(proc.pid)
        return [launcher] + launcher.children(recursive=True)
    except psutil.Error:
        return []


def _workers(tree: list) -> list:
    """The runx workers among a launch's processes (`_launch_tree`), not the launchers above them."""
    return [p for p in tree[1:] if _is_worker(_cmdline(p))]


def _is_worker(argv: list) -> bool:
    """A runx worker's command line (python [-u] -m runx.cli.worker <run_dir>), not a launcher's that names it."""
    return any(a == "-m" and b == "runx.cli.worker" for a, b in zip(argv, argv[1:]))


def _cmdline(p) -> list:
    import psutil
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _quietly(action, *args) -> None:
    """A psutil action on a process that may have exited meanwhile."""
    import psutil
    try:
        action(*args)
    except psutil.Error:
        pass


def _wait_for_workers(run_dir: str) -> None:
    """Block until rank 0's worker on this node has exited (it holds .runx/workers.lock while it lives), so that
    runx, and a SLURM step ending with it, does not leave while the workers still write their checkpoint."""
    import fcntl
    path = os.path.join(run_dir, ".runx", "workers.lock")
    if not os.path.exists(path):
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("runx: waiting for the workers to finish their step and save a checkpoint", file=sys.stderr,
                  flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        fcntl.flock(f, fcntl.LOCK_UN)


def RECIPES_KIND(cfg) -> str:
    from runx.recipes import RECIPES
    return RECIPES[cfg.recipe.name].kind


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def launcher_command(cfg, run_dir: str) -> list[str]:
    from runx.trainers.runtime import free_port
    n = int(cfg.trainer.num_procs)
    L = cfg.launcher
    # several nodes must agree on the rendezvous port without talking: torchrun's default, not a local free one
    port = int(L.master_port) or (TORCHRUN_PORT if int(L.num_nodes) > 1 else free_port())
    worker = ["runx.cli.worker", run_dir]
    if L.kind == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port), "--module",
               "--no_local_rank"]
        if L.hostfile:
            cmd += ["--hostfile", str(L.hostfile), "--num_nodes", str(L.num_nodes)]
            if n > 0:
                cmd += ["--num_gpus", str(n)]
        else:
            cmd += ["--num_gpus", str(n)]
        return cmd + list(L.extra_args) + worker
    # local / torchrun: torch.distributed.run (torchrun)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
    if int(L.num_nodes) > 1:
        cmd += ["--nnodes", str(L.num_nodes), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"{L.master_addr}:{port}"]
    else:
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    if not any(a.split("=")[0] in ("--log-dir", "--log_dir") for a in map(str, L.extra_args)):
        # torchrun's per-worker folders (and the error.json of a worker that fails) go with the run, not into a
        # /tmp/torchelastic_* folder that it never removes
        cmd += ["--log-dir", os.path.join(run_dir, ".runx", "torchrun")]
    return cmd + list(L.extra_args) + ["-m"] + worker


def run_job(cfg, run_dir: str, job=None) -> dict:
    """Run one recipe in this process (rank of a distributed world, or a world of one); `job`: a data recipe
    launch() already built to check its settings."""
    from runx.recipes import RECIPES
    from runx.trainers.console import quiet_libraries
    from runx.trainers.recipe import build_recipe
    quiet_libraries()
    info = RECIPES[cfg.recipe.name]
    cls = info.load()
    if info.kind == "data":
        from runx.trainers.datajob import atomic_write_json
        from runx.trainers.tracking import WandbRun, console, summary_table
        job = job or build_recipe(cls, cfg, run_dir)
        result = job.run(num_workers=int(cfg.recipe.get("num_workers", 1) or 1),
                         resume=str(cfg.get("resume", "auto")))
        atomic_write_json(os.path.join(run_dir, "summary.json"), result)
        flat = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
        console().print(summary_table(f"runx {info.name} — {run_dir}", flat))
        if cfg.logger.backend == "wandb":
            # one W&B run with the job's config and final numbers, recorded by the process that finds the job
            # complete (of a SLURM array, the task that finishes it; a rerun updates the same W&B run)
            if "incomplete_stage" in result:
                log.info("W&B: the job is not complete yet (stage %s); the run that completes it records it",
                         result["incomplete_stage"])
            else:
                sync = WandbRun(cfg.logger, cfg, run_dir, os.path.basename(run_dir.rstrip("/")),
                                resumed=str(cfg.get("resume", "auto")) != "never").finish(flat)
                if sync:
                    console().print(f"W&B run saved offline; upload it with: [bold]{sync}[/bold]", soft_wrap=True)
        return result
    from runx.trainers.deepspeed_trainer import Trainer
    trainer = Trainer(cfg, run_dir)
    recipe = build_recipe(cls, cfg, run_dir)
    try:
        result = trainer.fit(recipe)
        if cfg.get("export_at_end", False):
            trainer.export(trainer.engine, recipe, os.path.join(run_dir, "export"))
    except BaseException as e:
        # a failed job's exception outlives it (Hydra keeps it in the job's return until the sweep ends), and
        # its frames' variables would keep the engine, the model and the batches: only the lines are kept
        import traceback
        traceback.clear_frames(e.__traceback__)
        raise
    finally:   # the next job of an in-process sweep gets this one's memory back
        trainer.close()
    return result
