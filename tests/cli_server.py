"""A fork server for the tests' `runx` processes (conftest.run_cli).

Each `runx train` of a test spent about 4 of its ~6.5 s importing torch, transformers, DeepSpeed, W&B, Hydra...
This process imports them once, then serves requests read from stdin, one JSON line each: it forks, and the child
runs `python -m runx.cli.main <argv>` as a fresh interpreter would (its own cwd, environment, stdout / stderr files,
sys.argv, __main__, exit code, atexit handlers and interpreter teardown); only the imports are already done. The
child's pid, then its exit status (negative: the signal that ended it) are written back as JSON lines.

It serves only an environment equal to the one it was started with: modules read variables at import time
(HF_HUB_OFFLINE, DS_ACCELERATOR, ...). conftest starts another one for another environment, and runs with extra
variables, and tests that need a process exactly as the shell starts it, get a plain subprocess.
"""
from __future__ import annotations

import json
import os
import sys

PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "numpy", "transformers", "transformers.modeling_utils",
           "transformers.models.bert.modeling_bert", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2", "deepspeed", "deepspeed.ops", "accelerate", "peft", "wandb",
           "hydra", "omegaconf", "rich", "psutil", "datasets", "torchvision", "runx.cli.train")


def _child(req: dict) -> None:
    """In the forked child: become `python -m runx.cli.main <argv>` (does not return: SystemExit ends it)."""
    import runpy
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, (path, flags) in enumerate([(os.devnull, os.O_RDONLY),
                                        (req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                        (req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)]):
        new = os.open(path, flags, 0o644)
        os.dup2(new, fd)
        os.close(new)
    sys.path[0] = os.getcwd()        # what `python -m` puts first
    sys.argv = ["runx.cli.main", *req["argv"]]
    sys.modules.pop("runx.cli.main", None)   # run as __main__, as -m does (not a copy imported before)
    runpy.run_module("runx.cli.main", run_name="__main__", alter_sys=True)
    sys.exit(0)


def serve() -> None:
    import importlib
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception as e:  # a missing optional package: the child imports what it needs itself
                print(f"cli_server: not preloaded {name}: {e}", file=sys.stderr)
    import threading
    if threading.active_count() != 1:   # a Python thread here would be missing (or hold its locks) in every child
        print(json.dumps({"error": f"threads after the imports: {threading.enumerate()}"}), flush=True)
        return
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)     # never returns here
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        print(json.dumps({"rc": rc}), flush=True)


if __name__ == "__main__":
    serve()
