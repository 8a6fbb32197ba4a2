"""Logging that cooperates with rich: one console for log lines and progress bars, rank 0 only."""
from __future__ import annotations

import logging
import os

_CONSOLE = None


def shared_console():
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console
        _CONSOLE = Console(stderr=False)
    return _CONSOLE


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


class RankZeroRichHandler(logging.Handler):
    """A RichHandler on rank 0; silent on other ranks (their file logs still get every line)."""

    def __init__(self, level=logging.NOTSET):
        super().__init__(level)
        self.addFilter(NoCompilerProbes())
        import sys
        if sys.stdout.isatty():
            from rich.logging import RichHandler
            self._inner = RichHandler(console=shared_console(), show_path=False, rich_tracebacks=False,
                                      log_time_format="[%X]")
            self._plain = False
        else:   # a log file (SLURM, nohup): whole lines, as rich would wrap them at 80 columns mid-path
            self._inner = logging.StreamHandler(sys.stdout)
            self._inner.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%H:%M:%S"))
            self._plain = True

    def setFormatter(self, fmt):
        super().setFormatter(fmt)
        if not self._plain:
            self._inner.setFormatter(fmt)

    def emit(self, record):
        if is_rank_zero() and not getattr(record, "file_only", False):   # file_only: the console shows it otherwise
            self._inner.emit(record)


class NoCompilerProbes(logging.Filter):
    """Drops the gcc command lines of DeepSpeed's op-compatibility probes (async_io's `-laio` test program),
    which distutils / setuptools log at INFO, some before runx's logging setup quiets those loggers: noise
    for a user, on the console and in train.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("compilers") or "distutils" in record.pathname)


class RedactOverrides(logging.Filter):
    """Hydra's launcher and sweeper lines list each job's overrides (`#0 : seed=0 ++logger.api_key=...`): their
    secret-named values are shown as *** (tracking.redact_text), as in the run's saved files."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("hydra"):
            from runx.trainers.tracking import redact_text
            text = record.getMessage()
            clean = redact_text(text)
            if clean != text:
                record.msg, record.args = clean, None
        return True


def quiet_warnings() -> None:
    """Deprecation warnings between the libraries runx pins, which a user can do nothing about."""
    import warnings   # peft reads transformers' renamed model.is_gradient_checkpointing on every get_peft_model
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`is_gradient_checkpointing` is deprecated")


def quiet_libraries() -> None:
    """Libraries that attach their own handlers print every line twice under Hydra's root handler."""
    for name in ["deepspeed", "DeepSpeed", "transformers", "datasets", "torch.distributed", "wandb",
                 "distutils", "setuptools", "root.distutils", "compilers", "huggingface_hub"]:   # compilers: setuptools' C probe
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        if name not in ("transformers",):
            lg.setLevel(logging.WARNING)
    quiet_warnings()
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_default_handler()
    except Exception:
        pass
