"""Process set-up shared by every training run: DeepSpeed's environment, distributed init, seeds, device.

Facts this encodes (shared/research/deepspeed_cpu.md): on a CPU box DeepSpeed needs RANK/LOCAL_RANK/
WORLD_SIZE/MASTER_* or it tries MPI discovery; the shm comm op JIT-compiles for ~50 s unless disabled;
importing torch._dynamo before zero.Init avoids a signature-mismatch TypeError; a few FutureWarnings per
step are noise.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import socket
import warnings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def unreachable(endpoint: str, timeout_s: float = 3.0) -> str | None:
    """Why `endpoint` (a service's base URL) does not answer one HTTP request within `timeout_s` (no DNS, no route,
    a firewall that accepts and stalls, TLS failed), or None when it answers (any HTTP status), when a proxy is
    configured (the proxy decides), or when the URL is not one this probe parses."""
    if any(k in os.environ for k in PROXY_VARS):
        return None
    import urllib.error
    import urllib.request
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
        return None
    except urllib.error.HTTPError:      # an answer (even 4xx / 5xx): the service is there
        return None
    except ValueError:
        return None
    except (OSError, urllib.error.URLError) as e:
        return str(getattr(e, "reason", e))


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    if requested == "cuda" and not cuda_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible (valid choices: auto, cpu, cuda)")
    return requested


def import_deepspeed(device: str):
    """Import DeepSpeed quietly, with the CPU accelerator when there is no GPU and no JIT-built comm op."""
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor).*")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\._(all_gather|reduce_scatter)_base.*")
    import torch._dynamo  # noqa: F401  (must precede zero.Init)
    import deepspeed
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.ERROR)
    for h in deepspeed.utils.logger.handlers:
        h.setLevel(logging.ERROR)
    return deepspeed


def ensure_dist_env() -> None:
    """A single process started without a launcher: make it a world of one."""
    if "RANK" not in os.environ:
        # not started by a launcher: a fresh port (an inherited MASTER_PORT may be held by the parent)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(device: str):
    ensure_dist_env()
    import torch
    import torch.distributed as dist
    deepspeed = import_deepspeed(device)
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    import numpy as np
    import torch
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def peak_memory_bytes(device: str) -> int:
    """Peak GPU memory allocated (CUDA) or peak resident set size of this process (CPU)."""
    if device == "cuda":
        import torch
        return int(torch.cuda.max_memory_allocated())
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# Dense bf16 peak TFLOPS of common accelerators, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def device_peak_tflops() -> float:
    import torch
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


STEP_DIR = re.compile(r"step_\d+")   # a checkpoint's folder under ckpt/


def checkpoint_root(resume: str, run_dir: str) -> str:
    """The checkpoint folder a resume setting points at: <run_dir>/ckpt for resume=auto, else the given path, or
    its ckpt/ folder when it is a run dir, or the folder of the one ckpt/step_N it names. A complete one holds
    `latest`."""
    root = os.path.join(run_dir, "ckpt") if resume == "auto" else os.path.normpath(os.path.expanduser(resume))
    if STEP_DIR.fullmatch(os.path.basename(root)) and (os.path.isdir(root) or os.path.isdir(os.path.dirname(root))):
        return os.path.dirname(root)   # one checkpoint of a run (or one keep_last deleted: its folder's others)
    return os.path.join(root, "ckpt") if os.path.isdir(os.path.join(root, "ckpt")) else root


def resume_target(resume: str, run_dir: str) -> tuple[str, str | None]:
    """(checkpoint root, the tag a resume setting names: the step_N of a resume=<run>/ckpt/step_N, else the
    root's `latest`, or None)."""
    root = checkpoint_root(str(resume), run_dir)
    step = os.path.basename(os.path.normpath(os.path.expanduser(str(resume))))
    if str(resume) != "auto" and STEP_DIR.fullmatch(step):
        return root, step
    latest = os.path.join(root, "latest")
    return root, (open(latest).read().strip() or None) if os.path.exists(latest) else None


def is_complete(root: str, tag: str | None) -> bool:
    """Whether ckpt folder `tag` holds a whole checkpoint (runx_complete.json: a save a kill cut short has none)."""
    return bool(tag) and os.path.exists(os.path.join(root, tag, "runx_complete.json"))


def checkpoint_steps(root: str) -> list[str]:
    """The step_N folders under a checkpoint root, oldest first, complete or not."""
    if not os.path.isdir(root):
        return []
    return sorted((d for d in os.listdir(root) if STEP_DIR.fullmatch(d)), key=lambda d: int(d.split("_")[1]))


def resume_problem(resume: str, run_dir: str) -> str | None:
    """resume=<path> that names no complete checkpoint (a run folder, its ckpt/ folder, or one ckpt/step_N), as a
    config problem before anything is built; None for auto / never / a good path."""
    if str(resume) in ("auto", "never"):
        return None
    root, tag = resume_target(str(resume), run_dir)
    if is_complete(root, tag):
        return None
    have = [d for d in checkpoint_steps(root) if is_complete(root, d)]
    return (f"resume={resume}: no complete checkpoint there. Valid choices: a run folder or its ckpt/ folder "
            f"(resumes its latest checkpoint), or one of its checkpoints"
            + (f" ({', '.join(os.path.join(root, d) for d in have[-3:])})" if have else "")
            + ", or resume=auto / resume=never")


def flatten_overrides(d: dict, prefix: str = "") -> dict:
    """trainer.ds_overrides as dotted leaves, so that a nested block ({zero_optimization: {offload_param:
    {max_in_cpu: 1e9}}}, as Hydra builds it from `++trainer.ds_overrides.zero_optimization...=`) is merged
    key by key into the generated config instead of replacing the whole block."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_overrides(v, key + "."))
        else:
            out[key] = v
    return out


# final metrics where higher is better; anything else (losses, bits per character, times) is minimised
_HIGHER_IS_BETTER = ("accuracy", "acc", "f1", "auc", "score", "reward", "tflops", "mfu", "per_s")


def objective_direction(objective: str) -> str:
    """maximize for accuracy-like final metrics, else minimize (losses, bits per character, seconds): the
    direction of a sweep's objective and of trainer.monitor (monitor_mode=auto)."""
    return "maximize" if any(w in objective for w in _HIGHER_IS_BETTER) else "minimize"


def remove_checkpoint(root: str, tag: str) -> None:
    """Delete a checkpoint folder, its completion marker first: rmtree removes files in directory order, and one
    cut short could leave the marker beside a half-deleted checkpoint."""
    try:
        os.remove(os.path.join(root, tag, "runx_complete.json"))
    except FileNotFoundError:
        pass
    shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


class BestTracker:
    """trainer.monitor across evaluations, as Lightning's ModelCheckpoint(monitor=...) + EarlyStopping: the best
    value and its step, and how many evaluations in a row have not improved on it by more than `min_delta`.
    The first value is an improvement; NaN never is. Its state rides in every checkpoint, so a resumed run
    keeps its best and its patience count (and a run that stopped early stays stopped, unless it is resumed
    with more patience)."""

    def __init__(self, key: str, mode: str = "auto", patience: int = 0, min_delta: float = 0.0):
        if mode == "auto":
            mode = "max" if objective_direction(key) == "maximize" else "min"
        self.key, self.mode, self.patience, self.min_delta = key, mode, int(patience), float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, value: float, step: int) -> bool:
        """Record an evaluation; True when it is the new best."""
        value = float(value)
        better = value == value and (self.best is None or (value > self.best + self.min_delta if self.mode == "max"
                                                           else value < self.best - self.min_delta))
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"key": self.key, "best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load(self, state: dict | None) -> None:
        if state and state.get("key") == self.key:
            self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], int(state["bad_evals"])

    def summary(self) -> dict:
        return {} if self.best is None else {f"best/{self.key}": self.best, "best_step": self.best_step}


class Stopped(Exception):
    """The run stopped on a signal at a step boundary, after saving a checkpoint."""


class Diverged(Exception):
    """The training loss became NaN or infinite (trainer.stop_on_nonfinite_loss): the run stopped at that step
    without saving; its last checkpoint holds the last state saved before."""


def diverged_file(run_dir: str) -> str:
    """Where rank 0 of a launched run leaves its Diverged message, for the parent to print."""
    return os.path.join(run_dir, ".runx", "diverged.txt")


def submitit_preemption():
    """(signal, handler) when this process is a submitit job (hydra/launcher=submitit_slurm, runx_slurm,
    submitit_local) whose preemption / timeout signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)
    submitit handles: its handler checkpoints the job's callable and requeues it, then exits, wherever the
    training loop is. runx takes that signal over, saves at the step boundary, then calls the handler."""
    import signal
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    handler = signal.getsignal(sig) if sig is not None else None
    owner = getattr(handler, "__self__", None)
    if owner is not None and type(owner).__module__.split(".")[0] == "submitit":
        return sig, handler
    return None


def submitit_requeue(sig, handler) -> None:
    """submitit's handler: requeues the job and exits this process. A job it will not requeue (a time limit hit
    more than hydra.launcher.max_num_timeout times) is stopped like any other signalled run: its checkpoint is
    saved, and the same command resumes it (submitit's UncompletedJobError made it read as a crash)."""
    try:
        handler(sig, None)
    except Exception as e:
        if type(e).__name__ != "UncompletedJobError":
            raise
        logging.getLogger("runx.trainer").warning("submitit did not requeue the job: %s (hydra.launcher."
                                                  "max_num_timeout sets how many time limits it requeues)", e)


def quiet_data_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: SLURM's scancel / preemption / --signal reach every process of the job step,
    the loader's workers too. A worker that ended on SIGTERM made PyTorch raise 'DataLoader worker killed' in
    the training process while it was saving its checkpoint; one that ran submitit's inherited handler on
    SIGUSR2 requeued the job itself. The training process stops them when it is done."""
    import signal
    sigs = [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    if os.environ.get("RUNX_PREEMPT_SIGNAL"):
        sigs.append(int(os.environ["RUNX_PREEMPT_SIGNAL"]))
    for sig in sigs:
        signal.signal(sig, signal.SIG_IGN)
    # the run dir's locks: a forked worker holds them with its parent, and one orphaned by a kill -9 of the
    # training process kept them for seconds (the rerun was refused as "in use by another runx run")
    import sys
    train = sys.modules.get("runx.cli.train")
    for f in getattr(train, "_HELD", ()):
        try:
            f.close()
        except OSError:
            pass


def parent_signal_file(run_dir: str) -> str:
    """Where runx, running a launch, records the signal it was sent: the workers get SIGTERM whatever it was
    (USR1 / USR2 / TERM to runx end the launcher, and each worker's PR_SET_PDEATHSIG sends SIGTERM)."""
    return os.path.join(run_dir, ".runx", "stop_signal")


def die_with_parent(sig) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux PR_SET_PDEATHSIG); if the parent is
    already gone, send it now. A no-op where prctl is missing."""
    try:
        import ctypes
        if ctypes.CDLL(None, use_errno=True).prctl(1, int(sig)) != 0:   # 1 = PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:   # the parent died before the call
        os.kill(os.getpid(), sig)


def how_to_resume(resume: str, run_dir: str, pinned: bool = True, sweep_dir: str | None = None) -> str:
    """The words that tell a stopped run how to continue: the same command resumes a resume=auto run whose folder
    it names (run_dir=...); without run_dir= it would start a new run in a new dated folder, so the words add it
    (a sweep's: the sweep's folder, whose job k resumes in <folder>/k). One started with resume=never (or from
    another run's checkpoint) would start over (or restart from there) instead."""
    if str(resume) == "auto":
        if pinned:
            return f"rerun the same command to resume ({run_dir})"
        if sweep_dir:
            return (f"to resume, rerun the sweep with run_dir={sweep_dir} (job folders {sweep_dir}/<k>; without it "
                    "a new sweep starts in a new folder)")
        return f"to resume, rerun the same command with run_dir={run_dir} (without it a new run starts in a new folder)"
    return (f"to resume, rerun it with resume=auto (the default) and run_dir={run_dir}; the same command "
            f"(resume={resume}) would " + ("start over" if str(resume) == "never" else "restart from that checkpoint"))


def resume_hint(cfg, run_dir: str) -> str:
    """how_to_resume for a run's config: whether run_dir= was given, and the sweep folder of a sweep's job."""
    pinned, sweep = bool(cfg.get("run_dir")), None
    if not pinned:
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                sweep = os.path.dirname(os.path.abspath(run_dir))
        except (ValueError, ImportError):   # no Hydra job here (a launched worker, a direct call)
            pass
    return how_to_resume(cfg.get("resume", "auto"), run_dir, pinned, sweep)


def requeued_resume(resume: str, run_dir: str) -> str:
    """A SLURM job requeued after preemption (SLURM_RESTART_COUNT > 0) re-executes its original command: with
    resume=never or resume=<other run> it would start over at every requeue. It continues its own checkpoint
    instead (resume=auto) when its run dir has one."""
    if str(resume) != "auto" and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 \
            and os.path.exists(os.path.join(run_dir, "ckpt", "latest")):
        return "auto"
    return str(resume)


def stop_cause(signal_name: str | None, run_dir: str) -> str:
    """What stopped this process, for its log line: the signal runx was sent, where it forwarded one."""
    if signal_name is None:
        return "a signal to another rank"
    try:
        with open(parent_signal_file(run_dir)) as f:
            sent = f.read().strip()
    except OSError:
        sent = ""
    if os.environ.get("RUNX_WORKER") == "1" and sent and sent != signal_name:
        return f"{sent} (sent to runx; {signal_name} here)"
    return signal_name


class StopOnSignal:
    """SIGTERM (SLURM preemption, scancel, a container stop) and SIGUSR1 (SLURM's --signal) set a flag that the
    training loop reads at each step boundary, where it saves a checkpoint and stops. With several ranks the
    loop sums the flag in the all-reduce it already makes for the step's loss, so all ranks stop after the same
    step even if only one got the signal, at no extra collective."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    POLL_S = 1.0     # how often a worker looks for the launching runx's stop request (one stat a second)

    def __init__(self, request_file: str | None = None):
        """request_file: a launched worker's parent_signal_file. The launching runx writes the signal it was sent
        there; a worker that finds it stops as if signalled. This is how a stop reaches every node of a DeepSpeed
        launcher run (pdsh passes no SIGUSR1 on, and SIGTERM only with a 30 s kill behind it)."""
        import signal
        import threading
        self.signal_name = None
        self._old = {}
        self._handover = None
        self._request, self._next_poll = request_file, 0.0
        if threading.current_thread() is threading.main_thread():   # handlers can only be set there
            self._handover = submitit_preemption()
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
            if self._handover is not None:
                self._old[self._handover[0]] = signal.signal(self._handover[0], self._handle)
            elif os.environ.get("RUNX_PREEMPT_SIGNAL"):
                # a worker of a submitit job: SLURM sends the preemption signal to every process of the job
                # step, these too (it was the default action: the worker ended before rank 0 had saved)
                sig = int(os.environ["RUNX_PREEMPT_SIGNAL"])
                self._old[sig] = signal.signal(sig, self._handle)

    @property
    def handing_over(self) -> bool:
        import signal
        return self._handover is not None and self.signal_name == signal.Signals(self._handover[0]).name

    def hand_over(self) -> None:
        """Once the checkpoint is saved: when submitit's preemption signal stopped the run, call submitit's own
        handler, which requeues the job and exits this process (the requeued job resumes from the checkpoint)."""
        if self.handing_over:
            sig, handler = self._handover
            self.restore()
            submitit_requeue(sig, handler)

    def _handle(self, signum, frame) -> None:
        import signal
        self.signal_name = signal.Signals(signum).name

    @property
    def signalled(self) -> bool:
        if self.signal_name is None and self._request is not None:
            import time
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + self.POLL_S
                try:
                    with open(self._request) as f:
                        self.signal_name = f.read().strip() or "SIGTERM"
                except OSError:
                    pass
        return self.signal_name is not None

    def restore(self) -> None:
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
