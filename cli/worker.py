"""Entry point of each process started by a launcher: load the parent's resolved config and run."""
from __future__ import annotations

import os
import sys


def _stop_with_the_launcher() -> None:
    """torchrun starts each worker in a session of its own, so a kill -9 of runx's process group left the
    workers training on (and racing a rerun in the same run_dir). PR_SET_PDEATHSIG has the kernel send SIGTERM
    when the launcher dies: the trainer then saves a checkpoint at the step boundary and stops."""
    import signal

    from runx.trainers.runtime import die_with_parent
    die_with_parent(signal.SIGTERM)


def _stop_with_runx() -> None:
    """The DeepSpeed launcher puts a process of its own (deepspeed.launcher.launch) between runx's launcher
    process and the workers, and that one does not end with runx: a kill -9 of runx left the workers training on.
    A worker on runx's machine watches runx's pid (RUNX_PARENT_PID, with its start time against reuse) and
    SIGTERMs itself when runx is gone: it then saves a checkpoint at the step boundary and stops."""
    import signal
    import socket
    import threading
    import time
    pid, host, start = (os.environ.get(k) for k in ("RUNX_PARENT_PID", "RUNX_PARENT_HOST", "RUNX_PARENT_START"))
    if not pid or host != socket.gethostname():
        return

    def alive() -> bool:
        fields = _proc_stat(pid)
        return len(fields) > 19 and fields[0] != "Z" and (not start or fields[19] == start)

    def watch():
        while alive():
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="runx-parent-watch", daemon=True).start()


def _proc_stat(pid) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first, start time at index 19); [] when the
    process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def parent_identity() -> dict:
    """The environment that lets this process's workers watch it (_stop_with_runx)."""
    import socket
    fields = _proc_stat(os.getpid())
    start = fields[19] if len(fields) > 19 else ""
    return {"RUNX_PARENT_PID": str(os.getpid()), "RUNX_PARENT_HOST": socket.gethostname(), "RUNX_PARENT_START": start}


def main() -> int:
    run_dir = sys.argv[1]
    _stop_with_the_launcher()
    _stop_with_runx()
    import signal
    interrupted = []

    def on_interrupt(signum, frame):   # runx passes a Ctrl-C on to every worker
        interrupted.append(True)
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, on_interrupt)
    from runx.cli.train import hold_run_dir
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        hold_run_dir(run_dir, "workers")
    from omegaconf import OmegaConf

    import runx.conf  # noqa: F401  (registers resolvers)
    from runx.cli.train import run_job
    from runx.trainers.console import NoCompilerProbes, RankZeroRichHandler
    import logging
    handlers: list[logging.Handler] = [RankZeroRichHandler()]
    if rank == 0:   # the run's train.log gets rank 0's lines, as a 1-process run's does
        log_file = logging.FileHandler(os.path.join(run_dir, "train.log"))
        log_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        log_file.addFilter(NoCompilerProbes())
        handlers.append(log_file)
    logging.basicConfig(level=logging.INFO, handlers=handlers, format="%(message)s")
    cfg = OmegaConf.load(os.path.join(run_dir, ".runx", "job.yaml"))
    from runx.trainers.recipe import RecipeConfigError
    from runx.trainers.runtime import Diverged, Stopped, diverged_file
    rank0 = rank == 0
    try:
        run_job(cfg, run_dir)
    except Stopped as e:      # the parent runx says it on the console, with the checkpoint's step
        if rank0:
            from runx.cli.train import _log_to_files_only
            _log_to_files_only(f"runx: {e}", with_traceback=False, level=logging.WARNING)
        return 143
    # A diverged run (every rank saw the same all-reduced loss): rank 0 leaves the message for the parent, which
    # prints it and exits 1. The workers exit 0, so that torchrun does not print its failure report over it.
    except Diverged as e:
        if rank0:
            from runx.trainers.datajob import atomic_write_bytes
            atomic_write_bytes(diverged_file(run_dir), str(e).encode())
        return 0
    except RecipeConfigError as e:
        return _config_problem(run_dir, rank, str(e))
    except BaseException as e:
        if interrupted:   # Ctrl-C: no traceback (nor the one a peer's collective raises when the other rank left)
            return 130
        if rank0 and not isinstance(e, SystemExit):
            from runx.cli.train import _log_to_files_only
            _log_to_files_only(f"rank 0 failed: {type(e).__name__}")
        raise
    return 0


def problem_file(run_dir: str, rank: int = 0) -> str:
    """Where a rank of a launched run leaves a config problem found after the launch (in the recipe's
    constructor or its data), for the parent to print (rank 0's, else any rank's)."""
    return os.path.join(run_dir, ".runx", "config_problem.txt" if rank == 0 else f"config_problem.{rank}.txt")


def problem_files(run_dir: str) -> list[str]:
    """The config problems the ranks of a launch left in `run_dir`, rank 0's first."""
    import glob
    return [f for f in [problem_file(run_dir)] if os.path.exists(f)] + \
        sorted(glob.glob(os.path.join(run_dir, ".runx", "config_problem.*.txt")))


def _config_problem(run_dir: str, rank: int, message: str, wait_s: float = 10.0) -> int:
    """A config problem in a worker: written for the parent. Every rank reads the same config and data, so rank
    0 has the same problem: then all leave with exit 0 (torchrun prints no failure report over the message).
    A problem rank 0 did not have (a file missing on one node only) leaves with exit 2 once rank 0 has not
    reported one within `wait_s`: torchrun then ends the ranks that wait for this one in a collective."""
    import time

    from runx.trainers.datajob import atomic_write_bytes
    atomic_write_bytes(problem_file(run_dir, rank), message.encode())
    if rank == 0:
        return 0
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if os.path.exists(problem_file(run_dir)):
            return 0
        time.sleep(0.1)
    return 2


def exit_without_teardown(code: int) -> None:
    """Leave a finished worker without running interpreter teardown. Its results are written (atomically) and
    its W&B run is finished by then, but C++ threads that gloo / DeepSpeed leave running can abort the process in
    static destructors ("terminate called without an active exception", exit -6). A CI run saw that after a
    2-process run had finished, and the launcher then reported the whole run as failed. An interrupted worker
    (130) leaves the process group as it is: tearing it down can wait forever on a peer stuck in a collective."""
    import logging
    try:
        import torch.distributed as dist
        if code != 130 and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    logging.shutdown()
    remove_library_temp_dirs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def remove_library_temp_dirs() -> None:
    """W&B's module-level temporary folders (tmp*wandb-media, tmp*wandb-artifacts), which the interpreter's exit
    removes and os._exit skips: two left in $TMPDIR per rank of every multi-process run."""
    for module, owner, attr in (("wandb.sdk.data_types._private", None, "MEDIA_TMP"),
                                ("wandb.sdk.artifacts.artifact", "Artifact", "_TMP_DIR")):
        mod = sys.modules.get(module)
        holder = getattr(mod, owner, None) if owner else mod
        tmp = getattr(holder, attr, None)
        try:
            if tmp is not None:
                tmp.cleanup()
        except Exception:
            pass


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:   # a Ctrl-C before the run started (while importing)
        code = 130
    exit_without_teardown(code)
