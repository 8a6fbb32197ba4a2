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
    run_job(cfg, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
