"""Shared test helpers: run the CLI in a subprocess with an offline, CPU-only environment."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

OFFLINE_ENV = {
    "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)


def _session_folder(var: str, prefix: str) -> None:
    """A temporary folder for the test session in `var`, removed when the process that made it exits (pytest-xdist's
    workers inherit the controller's): one was left in /tmp per worker and run."""
    if var not in os.environ:
        os.environ[var] = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, os.environ[var], True)


# the aio probe / plan caches of a test session stay out of ~/.cache/runx, and the datasets the tests prepare with
# datasets' packaged builders (json, imagefolder) out of ~/.cache/huggingface/datasets
_session_folder("RUNX_CACHE", "runx_test_cache_")
_session_folder("HF_DATASETS_CACHE", "runx_test_datasets_")


def child_env(env: dict | None = None) -> dict:
    """The environment of a runx process a test starts: offline, CPU, and without the distributed variables an
    in-process test left in this worker (its process group holds that MASTER_PORT)."""
    e = dict(os.environ, **OFFLINE_ENV)
    for k, v in (env or {}).items():  # None removes a variable
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    e.pop("RANK", None), e.pop("WORLD_SIZE", None), e.pop("LOCAL_RANK", None), e.pop("MASTER_PORT", None)
    return e


class _CliServer:
    """A tests/cli_server.py process for one environment: it has imported torch, transformers, DeepSpeed... once,
    and forks a `python -m runx.cli.main` for each run (about 4 s of imports less each)."""

    def __init__(self, env: dict):
        self.env, self.buf = env, b""
        self.proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "cli_server.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
        ready = self._read(180)
        if "ready" not in ready:
            raise RuntimeError(f"tests/cli_server.py did not start: {ready}")

    def _read(self, timeout: float) -> dict:
        """The server's next JSON line (its pipe read unbuffered: a buffered reader could hold the next line
        where select() does not see it)."""
        import select
        import time
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if not select.select([self.proc.stdout], [], [], max(0.0, end - time.monotonic()))[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"tests/cli_server.py ended (exit {self.proc.wait()})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def run(self, argv: list[str], env: dict, timeout: float, cwd) -> subprocess.CompletedProcess:
        import signal
        with tempfile.TemporaryDirectory(prefix="runx_cli_") as d:
            out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
            self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "cwd": os.path.abspath(cwd or os.getcwd()),
                                              "out": out, "err": err}).encode() + b"\n")
            self.proc.stdin.flush()
            pid = self._read(60)["pid"]
            try:
                rc = self._read(timeout)["rc"]
            except TimeoutError:    # as subprocess.run: kill it, then raise
                os.kill(pid, signal.SIGKILL)
                self._read(60)
                raise subprocess.TimeoutExpired([sys.executable, "-m", "runx.cli.main", *argv], timeout) from None

            def read(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    return f.read()
            return subprocess.CompletedProcess([sys.executable, "-m", "runx.cli.main", *argv], rc, read(out), read(err))

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()


_SERVER: list[_CliServer] = []


# variables that change in this process and that nothing reads at import time: the child gets them as they are now
# (pytest's current test; torch's in-process settings, read when CUDA is checked / inductor compiles)
_RUN_TIME_ONLY = ("PYTEST_CURRENT_TEST", "PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR")


def _server_for(env: dict) -> _CliServer:
    """The fork server of this environment (another variable set or changed in this process since the last one
    started, one of _RUN_TIME_ONLY aside: a new one)."""
    def key(e):
        return {k: v for k, v in e.items() if k not in _RUN_TIME_ONLY}
    if _SERVER and (key(_SERVER[0].env) != key(env) or _SERVER[0].proc.poll() is not None):
        old = _SERVER.pop()
        if os.environ.get("RUNX_TEST_SERVER_LOG"):
            changed = sorted(k for k in set(env) | set(old.env) if env.get(k) != old.env.get(k))
            with open(os.environ["RUNX_TEST_SERVER_LOG"], "a") as f:
                f.write(f"restart {os.getpid()}: {changed}\n")
        old.close()
    if not _SERVER:
        _SERVER.append(_CliServer(env))
        atexit.register(_SERVER[0].close)
    return _SERVER[0]


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None, check: bool = True, cwd=None,
            fresh: bool = False):
    """`python -m runx.cli.main <args>`. Forked from tests/cli_server.py (imports done) unless `env` adds
    variables or `fresh`: then started as the shell starts it."""
    e = child_env(env)
    if env or fresh or sys.platform != "linux" or os.environ.get("RUNX_TEST_FRESH_CLI") == "1":
        p = subprocess.run([sys.executable, "-m", "runx.cli.main", *args], capture_output=True, text=True,
                           timeout=timeout, env=e, cwd=cwd)
    else:
        p = _server_for(e).run(list(args), e, timeout, cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"runx {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}"
                             f"\n--- stderr\n{p.stderr[-6000:]}")
    return p


# (not SIGCHLD: PyTorch's DataLoader installs its handler once per process, by design; a handler is not inherited)
_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGTSTP", "SIGHUP", "SIGPIPE")


def _signal_state() -> dict:
    """This thread's signal mask and ignored set (as the kernel has them: what a child started now inherits) and
    the Python handlers of the signals runx uses."""
    import signal
    state = {name: signal.getsignal(getattr(signal, name)) for name in _SIGNALS}
    watched = sum(1 << (int(getattr(signal, name)) - 1) for name in (*_SIGNALS, "SIGQUIT"))
    try:
        with open(f"/proc/self/task/{__import__('threading').get_native_id()}/status") as f:
            # (only the watched signals' bits: Triton's first compile in a process has LLVM install its crash
            # handlers, which takes SIGXFSZ off Python's ignored set, once per process by design)
            state.update((k, f"{int(v, 16) & watched:x}") for k, v in (line.split(":", 1) for line in f
                                                                        if line.startswith(("SigBlk", "SigIgn"))))
    except OSError:
        pass
    return state


@pytest.fixture(autouse=True)
def _signals_left_as_found():
    """A test that leaves a signal blocked, ignored or handled in this process would change every process the
    later tests start (a blocked SIGINT is inherited: Ctrl-C then never reached a runx started afterwards)."""
    import signal
    before = _signal_state()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    after = _signal_state()
    if after != before:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for name in _SIGNALS:
            if before[name] is not None:
                signal.signal(getattr(signal, name), before[name])
        changed = {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
        pytest.fail(f"the test left this process's signal state changed (restored now): {changed}")


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.fixture
def runx():
    return run_cli


def word_tokenizer(kind: str):
    """A small fast tokenizer trained here on a few words and sums (no download), of one of the two families
    whose word-start handling differs: "sentencepiece" (Llama-2 / Mistral: a "▁" word-start mark, also before
    the first word of every encoded string, and a BOS) or "bytelevel" (GPT-2 / Qwen / Llama-3: no BOS)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(0)
    words = "the a cat dog has buys finds how many pens cups answer think boxed so is Q A USER ASSISTANT".split()
    corpus = [" ".join(rng.choice(words) for _ in range(8)) + f" {rng.randint(0, 99)}+{rng.randint(0, 99)}="
              f"{rng.randint(0, 200)}.\n<answer> \\boxed{{{rng.randint(0, 99)}}} </answer> A: 4 Q: x"
              for _ in range(500)]
    if kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = list("\n0123456789<>{}\\/=+-.:?▁ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                            initial_alphabet=alphabet))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
