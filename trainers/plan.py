"""`runx plan`: memory per ZeRO config on GPU / CPU / NVMe, and whether a config fits (issue #9).

Placeholder entry points used by the CLI; the estimator is being written.
"""
from __future__ import annotations


def plan_and_print(cfg, out_dir=None) -> int:
    raise NotImplementedError("runx plan is not implemented yet")


def check_fits(cfg) -> None:
    """Raise a clear error when the configured run cannot fit this machine (called by `runx train`)."""
    return None
