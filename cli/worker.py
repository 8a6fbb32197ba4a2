"""Entry point of each process started by a launcher: load the parent's resolved config and run."""
from __future__ import annotations

import os
import sys


def main() -> int:
    run_dir = sys.argv[1]
    from omegaconf import OmegaConf

    import runx.conf  # noqa: F401  (registers resolvers)
    from runx.cli.train import run_job
    from runx.trainers.console import RankZeroRichHandler
    import logging
    logging.basicConfig(level=logging.INFO, handlers=[RankZeroRichHandler()], format="%(message)s")
    cfg = OmegaConf.load(os.path.join(run_dir, ".runx", "job.yaml"))
    from runx.trainers.runtime import Stopped
    try:
        run_job(cfg, run_dir)
    except Stopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"runx: {e}", file=sys.stderr)
        return 143
    return 0


def exit_without_teardown(code: int) -> None:
    """Leave a finished worker without running interpreter teardown. Its results are written (atomically) and
    its W&B run is finished by then, but C++ threads that gloo / DeepSpeed leave running can abort the process in
    static destructors ("terminate called without an active exception", exit -6). A CI run saw that after a
    2-process run had finished, and the launcher then reported the whole run as failed."""
    import logging
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
