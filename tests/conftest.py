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


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None, check: bool = True, cwd=None):
    e = child_env(env)
    p = subprocess.run([sys.executable, "-m", "runx.cli.main", *args], capture_output=True, text=True,
                       timeout=timeout, env=e, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"runx {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}"
                             f"\n--- stderr\n{p.stderr[-6000:]}")
    return p


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
