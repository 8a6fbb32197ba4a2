"""`hydra/launcher=runx_parallel`: run the jobs of a sweep N at a time on this machine, one GPU (group) each.

Hydra's basic launcher runs jobs one after another in its own process and pins nothing (hydra #2074,
#1974). Here every job is its own `runx train` process (a single run whose run dir is the job's sweep
subdir), so a crash or an OOM stays in its job, each job sees only its GPUs through CUDA_VISIBLE_DEVICES,
and CPU-only jobs split the cores (OMP_NUM_THREADS). A job's value for the sweeper (Optuna) is its final
`objective` metric, read from the job's summary.json.

    runx train -m hydra/launcher=runx_parallel hydra.launcher.n_jobs=4 optim.lr=1e-4,3e-4,1e-3 seed=0,1
    runx train -m hydra/launcher=runx_parallel hydra.launcher.gpus_per_job=2 trainer.num_procs=2 seed=0,1,2,3

Each job writes launcher.json (start/end time, GPUs, exit code) and launcher.log (its output) in its dir;
the sweep dir gets launcher_jobs.json with all of them.
"""

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


try:   # looked up here: the function below runs between fork and exec, where an import could deadlock
    import ctypes
    import signal as _signal
    _PRCTL, _SIGTERM = ctypes.CDLL(None, use_errno=True).prctl, int(_signal.SIGTERM)
except (OSError, AttributeError):
    _PRCTL = None


def _term_with_the_launcher() -> None:
    """In the job's process before exec: SIGTERM to it when runx (this thread, waiting on it) dies."""
    if _PRCTL is not None:
        _PRCTL(1, _SIGTERM)   # 1 = PR_SET_PDEATHSIG


def usable_cpus() -> int:
    """The CPUs this process may run on (a SLURM allocation's or taskset's share of a big node), not the node's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def say(msg: str) -> None:
    """Progress lines on stderr (Hydra's logging config keeps plugin INFO logs quiet)."""
    print(f"[runx_parallel] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunxParallelLauncherConf:
    _target_: str = "hydra_plugins.runx_launcher.runx_launcher.RunxParallelLauncher"
    # jobs at once; -1: one per GPU group (visible GPUs // gpus_per_job), or 2 on a machine without GPUs
    n_jobs: int = -1
    # GPUs pinned to each job (match trainer.num_procs for multi-GPU jobs)
    gpus_per_job: int = 1
    # CPU threads per job (OMP_NUM_THREADS); -1: the machine's cores split evenly across running jobs
    threads_per_job: int = -1


ConfigStore.instance().store(group="hydra/launcher", name="runx_parallel", node=RunxParallelLauncherConf,
                             provider="runx")

# hydra overrides that belong to the sweep, not to the single run each job is
_SWEEP_ONLY = ("hydra/launcher", "hydra/sweeper", "hydra.launcher", "hydra.sweeper", "hydra.sweep.", "hydra.run.",
               "hydra.mode")


class JobFailed(CompactHydraException):
    """A job that exited non-zero: one line (its output is in its launcher.log, its problem printed there)."""


def failure_kind(returncode: int, job_dir: Path) -> str:
    """How a job failed, in the words `runx train -m` uses for in-process jobs."""
    from runx.trainers.tracking import read_summary
    try:
        diverged = "diverged_at" in read_summary(str(job_dir))
    except ValueError:   # a summary cut short
        diverged = False
    if diverged:
        return "diverged"
    return {2: "config problem", 143: "stopped (SIGTERM)", 130: "interrupted"}.get(returncode, "crashed")


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


def record_jobs(path: Path, records: list[dict], initial_job_idx: int) -> None:
    """The sweep's launcher_jobs.json, written atomically. A sweeper that launches in batches (Optuna with n_jobs)
    calls launch() once per batch: the earlier batches' records are kept (each batch rewrote the file with its own
    jobs only); a new sweep into the same folder (initial_job_idx 0) starts the file over."""
    from runx.trainers.datajob import atomic_write_json
    earlier = json.loads(path.read_text()) if initial_job_idx > 0 and path.exists() else []
    done = {r["idx"] for r in records}
    atomic_write_json(str(path), sorted([r for r in earlier if r["idx"] not in done] + records,
                                        key=lambda r: r["idx"]))


class RunxParallelLauncher(Launcher):
    def __init__(self, n_jobs: int = -1, gpus_per_job: int = 1, threads_per_job: int = -1) -> None:
        super().__init__()
        self.n_jobs, self.gpus_per_job, self.threads_per_job = int(n_jobs), int(gpus_per_job), int(threads_per_job)
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    # ------------------------------------------------------------------------------------------ launch
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from runx.trainers.tracking import redact_arg, redact_hydra_outputs
        redact_hydra_outputs(str(sweep_dir / "-"), str(sweep_dir))   # the sweeper's multirun.yaml
        self._redact = redact_arg

        gpus = visible_gpus()
        per = max(1, self.gpus_per_job)
        groups = [gpus[i:i + per] for i in range(0, len(gpus) - per + 1, per)] if gpus else []
        n = self.n_jobs if self.n_jobs > 0 else (len(groups) or 2)
        if groups and n > len(groups):
            log.warning("hydra.launcher.n_jobs=%d but only %d GPU group(s) of %d: running %d at once",
                        n, len(groups), per, len(groups))
            n = len(groups)
        n = max(1, min(n, len(job_overrides)))
        threads = self.threads_per_job if self.threads_per_job > 0 else max(1, usable_cpus() // n)
        slots: queue.Queue = queue.Queue()
        for g in (groups[:n] if groups else [None] * n):
            slots.put(g)
        say(f"{len(job_overrides)} jobs, {n} at once" +
            (f", GPUs {groups[:n]}" if groups else f", {threads} CPU threads each") + f"; sweep dir {sweep_dir}")

        jobs = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            HydraConfig.instance().set_config(sweep_config)
            job_dir = sweep_dir / str(sweep_config.hydra.sweep.subdir)
            jobs.append((idx, list(overrides), sweep_config, job_dir))
        HydraConfig.instance().set_config(self.config)

        passthrough = [o for o in OmegaConf.to_container(self.config.hydra.overrides.hydra)
                       if not o.lstrip("+~").startswith(_SWEEP_ONLY)]
        lock = threading.Lock()
        records: list[dict] = []
        self._running: dict = {}   # job number -> its runx process

        def run_one(job) -> JobReturn:
            idx, overrides, sweep_config, job_dir = job
            gpu_group = slots.get()
            try:
                return self._run(idx, overrides, sweep_config, job_dir, gpu_group, threads, passthrough,
                                 records, lock)
            finally:
                slots.put(gpu_group)

        with ThreadPoolExecutor(max_workers=n) as pool:
            try:
                results = list(pool.map(run_one, jobs))
            except BaseException as e:
                # Ctrl-C / SIGTERM to runx: the running jobs get it too (a job checkpoints at its step boundary
                # and stops) and are waited for; they had trained on to their last step, unseen
                import signal
                sig = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
                with lock:
                    running = list(self._running.values())
                for p in running:
                    try:
                        p.send_signal(sig)
                    except ProcessLookupError:
                        pass
                raise
        record_jobs(sweep_dir / "launcher_jobs.json", records, initial_job_idx)
        return results

    def _run(self, idx, overrides, sweep_config, job_dir: Path, gpu_group, threads, passthrough, records, lock):
        job_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
            env.pop(k, None)
        if gpu_group is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_group)
        env.setdefault("OMP_NUM_THREADS", str(threads))  # a user's own setting wins
        # the job's run dir is its sweep subdir, also when run_dir=<path> pinned the sweep's folder (a single run
        # would take that path itself, every job the same one)
        own = [o for o in overrides if o.lstrip("+~").partition("=")[0] != "run_dir"]
        cmd = [sys.executable, "-m", "runx.cli.main", "train", *own, *passthrough, f"run_dir={job_dir}",
               f"hydra.run.dir={job_dir}"]
        shown = [self._redact(o) for o in overrides]   # (a token given on the command line stays out of both)
        rec: dict[str, Any] = {"idx": idx, "overrides": shown, "gpus": gpu_group, "threads": threads,
                               "dir": str(job_dir), "start": time.time()}
        say(f"#{idx} started" + (f" on GPU {','.join(gpu_group)}" if gpu_group else "") +
            f": {' '.join(filter_overrides(shown))}")
        with open(job_dir / "launcher.log", "w") as out:
            # the job gets SIGTERM if runx dies (kill -9 included): it checkpoints and stops instead of training
            # on as an orphan
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                 preexec_fn=_term_with_the_launcher)
            with lock:
                self._running[idx] = p
            try:
                p.wait()
            finally:
                with lock:
                    self._running.pop(idx, None)
        rec.update(end=time.time(), returncode=p.returncode)
        rec["seconds"] = round(rec["end"] - rec["start"], 2)
        with open(job_dir / "launcher.json", "w") as f:
            json.dump(rec, f, indent=1)
        with lock:
            records.append(rec)
        say(f"#{idx} {'finished' if p.returncode == 0 else 'FAILED'} (exit {p.returncode}) in {rec['seconds']:.1f}s: "
            f"{job_dir}" + ("" if p.returncode == 0 else f" (see {job_dir / 'launcher.log'})"))

        ret = JobReturn(overrides=list(overrides), cfg=sweep_config, hydra_cfg=None, working_dir=str(job_dir),
                        task_name=str(sweep_config.hydra.job.name))
        if p.returncode != 0:
            why = failure_kind(p.returncode, job_dir)
            from runx.cli import train     # `runx train -m` lists the failed jobs at the end
            with lock:
                train.SWEEP_FAILURES.append((idx, why, str(job_dir)))
            ret.status = JobStatus.FAILED
            ret.return_value = JobFailed(f"runx: job #{idx} {why} (exit {p.returncode}); its output: "
                                         f"{job_dir / 'launcher.log'}")
            return ret
        try:
            ret.return_value = self._objective(sweep_config, job_dir)
            ret.status = JobStatus.COMPLETED
        except Exception as e:  # the objective is missing from the run's final metrics
            ret.status = JobStatus.FAILED
            ret.return_value = e
        return ret

    @staticmethod
    def _objective(sweep_config: DictConfig, job_dir: Path):
        key = sweep_config.get("objective")
        if not key:
            return None
        from runx.trainers.tracking import read_summary
        summary = read_summary(str(job_dir))
        if key not in summary:
            raise KeyError(f"objective={key!r} is not among the final metrics of {job_dir}: {sorted(summary)}")
        return float(summary[key])
