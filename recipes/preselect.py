"""PreSelect — "Predictive Data Selection: The Data That Predicts Is the Data That Teaches" (Shum et al. 2025,
arXiv 2503.00808), as one sharded, resumable data job.

    given reference models m = 1..N with benchmark scores s_m (a strict ability order) and a document sample:
    bpc     BPC_m(d) = L_m(d) / (|d|_chars · ln 2),  L_m(d) = Σ_t −ln p_m(x_t | x_<t)      (sliding window)   (1)
    score   S(d) = 1/C(N,2) · Σ_{i<j} 1[(s_i − s_j)(BPC_j(d) − BPC_i(d)) > 0]                                 (2)
            (pairs whose loss order on d agrees with their ability order; ties add nothing;
             without ties S = (τ_Kendall(s, −BPC) + 1) / 2)
    label   positives: S(d) = 1 (or the top quantile); negatives: as many of the lowest-S documents
    train   fastText(wordNgrams=2, epoch=3, lr=0.1) on normalised text, held-out precision / recall
    filter  p(d) = P(label 1 | d) over the whole pool; keep the top `keep_fraction` of the pool's characters,
            with the exact global threshold (pass 1 scores every shard, one sort, pass 2 writes the kept lines)

The reference code's bugs are not reproduced (see shared/research/algos_data.md §1): negatives are the lowest-S
documents (its `sorted_id2score` was undefined), newlines become spaces both when training and when scoring (it
joined lines with "" at scoring time), and the threshold comes from every shard (it used 3 of 100).

Stages (each reads and writes shards plus a manifest, skips finished shards, splits by shard index across
`num_workers` processes and SLURM array tasks — see runx.trainers.datajob):
    world -> references          (embedded default only: generated pool, n-gram reference family)
    sample -> bpc -> score -> label -> train -> filter_score -> filter_threshold -> filter
    students                     (embedded default only: equal-budget students, compute multiplier)
Bad input (invalid JSON, a missing/non-string text field, an unreadable file) is reported with path and line,
counted in the manifests, and skipped: never silently dropped, never fatal to the job.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from omegaconf import OmegaConf

from runx.conf.schema.preselect import PreSelectConfig, PreSelectWorldConfig
from runx.recipes.text_data import files_at, open_shard, parquet_rows_at, select_shards, shard_format
from runx.trainers.datajob import (DataJob, JobContext, Stage, atomic_path, atomic_write_bytes, atomic_write_json,
                                   remove_stale_temps)
from runx.trainers.recipe import RecipeConfigError

log = logging.getLogger("runx.preselect")

LN2 = math.log(2.0)
FT_POSITIVE, FT_NEGATIVE = "__label__1", "__label__0"
SHARD_FORMATS = ("jsonl", "parquet")


# =============================================================================================================
# Eq. (1): bits per character of each document under a reference model
# =============================================================================================================
def causal_lm_doc_nats(model, tokenizer, texts: list[str], window: int, stride: int, batch_size: int,
                       device) -> np.ndarray:
    """Σ_t −ln p(x_t | x_<t) per document, long documents by sliding window.

    Each document is tokenised alone and starts with BOS (or EOS when the tokenizer has no BOS), so every text
    token is a target. Windows start every `stride` tokens and are `window` tokens long; a window scores only the
    targets after the previous window's end, so each token is scored exactly once with ≥ window−stride tokens of
    left context (the reference: 1900 / 512). Windows of all documents are batched, longest first."""
    import torch
    if not 1 <= stride < window:
        raise ValueError(f"recipe.bpc_stride={stride} must be in [1, bpc_window-1] (bpc_window={window})")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    docs = [([start] if start is not None else []) + list(t) for t in ids]
    windows = []  # (doc, begin, end, first target)
    for d, toks in enumerate(docs):
        prev, begin = 1, 0
        while prev < len(toks):
            end = min(begin + window, len(toks))
            windows.append((d, begin, end, prev))
            prev, begin = end, begin + stride
    windows.sort(key=lambda w: w[1] - w[2])  # longest first: little padding per batch
    totals = np.zeros(len(docs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        for b in range(0, len(windows), batch_size):
            batch = windows[b: b + batch_size]
            width = max(e - s for _, s, e, _ in batch)
            inp = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            rows, cols, tgts, owner = [], [], [], []
            for r, (d, s, e, first) in enumerate(batch):
                inp[r, : e - s] = torch.tensor(docs[d][s:e])
                mask[r, : e - s] = 1
                for t in range(first, e):        # target token t is predicted at window position t-s-1
                    rows.append(r)
                    cols.append(t - s - 1)
                    tgts.append(docs[d][t])
                    owner.append(d)
            logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits
            picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()
            nll = -picked.log_softmax(-1).gather(1, torch.tensor(tgts, device=device)[:, None])[:, 0]
            totals += np.bincount(owner, weights=nll.double().cpu().numpy(), minlength=len(docs))
    return totals


class HFReference:
    """A Hugging Face causal LM as a reference model (hub id or local folder; `from_config` for tests)."""

    def __init__(self, ref: dict, rc, seed: int):
        import torch
        from runx.trainers.hf import load_model, load_tokenizer
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if rc.bpc_device == "cuda" or (rc.bpc_device == "auto" and cuda)
                                   else "cpu")
        dtype = rc.bpc_dtype if rc.bpc_dtype != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        mcfg = OmegaConf.create({"kind": "causal_lm", "path": ref["path"], "tokenizer": ref.get("tokenizer"),
                                 "from_config": ref.get("from_config"), "dtype": dtype,
                                 "trust_remote_code": bool(ref.get("trust_remote_code", False))})
        self.tokenizer = load_tokenizer(mcfg)
        torch.manual_seed(seed)  # only matters for from_config (randomly initialised) models
        self.model = load_model(mcfg, tokenizer=self.tokenizer).to(self.device).eval()
        self.window = int(ref.get("window", rc.bpc_window))
        self.stride = int(ref.get("stride", rc.bpc_stride))
        key, limit = position_limit(self.model.config.to_dict())
        if limit is None:   # an alias the saved dict does not spell out
            key, limit = position_limit({"max_position_embeddings": getattr(self.model.config,
                                                                            "max_position_embeddings", None)})
        if limit and self.window > limit:
            raise ValueError(window_problem(ref["name"], self.window, limit, key))
        self.batch_size = int(rc.bpc_batch_size)

    def doc_bits(self, texts: list[str]) -> np.ndarray:
        return causal_lm_doc_nats(self.model, self.tokenizer, texts, self.window, self.stride, self.batch_size,
                                  self.device) / LN2


# Where a config.json keeps the longest input its position embeddings allow: the common name first, then the
# GPT-2 family's n_positions (n_ctx, its older twin) and the max_sequence_length of some others. transformers maps
# max_position_embeddings onto n_positions only on a loaded GPT2Config; the raw file has the alias.
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")


def position_limit(config: dict) -> tuple[str | None, int | None]:
    """(key, value) of the first position limit a model config (config.json as a dict) gives, or (None, None)."""
    for key in POSITION_LIMIT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None, None


def window_problem(name: str, window: int, limit: int, key: str = "max_position_embeddings") -> str:
    return (f"recipe.bpc_window={window} exceeds {name}'s {key}={limit}; set recipe.bpc_window "
            f"(and bpc_stride below it) or the reference's `window` to at most {limit}")


class NgramReference:
    def __init__(self, path: str):
        from runx.recipes.preselect_ngram import CharNgramLM
        self.lm = CharNgramLM.load(path)

    def doc_bits(self, texts: list[str]) -> np.ndarray:
        return self.lm.doc_bits(texts)


# =============================================================================================================
# Eq. (2): predictive strength
# =============================================================================================================
def predictive_strength(bpc: np.ndarray, ability: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S(d) for a [docs, models] loss matrix and per-model ability scores; also the agreeing-pair counts.

    A pair (i, j) counts when the abler model has the strictly lower loss on d; a tie in ability or in loss
    counts as disagreement. S = agreeing pairs / C(N, 2)."""
    bpc = np.asarray(bpc, dtype=np.float64)
    ability = np.asarray(ability, dtype=np.float64)
    i, j = np.triu_indices(len(ability), 1)
    ability_sign = np.sign(ability[i] - ability[j])                 # +1: i is the abler model
    loss_sign = np.sign(bpc[:, j] - bpc[:, i])                      # +1: i has the lower loss on d
    agree = ((ability_sign * loss_sign) > 0).sum(axis=1)
    return agree / max(len(i), 1), agree


# =============================================================================================================
# Labels, fastText normalisation, the exact top-fraction threshold
# =============================================================================================================
def choose_labels(S: np.ndarray, agree: np.ndarray, comparable_pairs: int, mode: str, quantile: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of positives and of as many negatives, the lowest-S documents.

    perfect (the paper): every document with S = 1, i.e. every comparable pair agrees. quantile (not in the
    paper or its code, which only has S = 1): exactly round(quantile * N) documents, the highest S first.
    S takes only C(N,2) + 1 values, so a cut at a score level would take the whole tied level (58% of the
    documents for a 0.3 quantile with 3 references); ties at either cut are broken by one seeded random order."""
    tiebreak = np.random.default_rng([seed, 11]).random(len(S))
    if mode == "perfect":
        pos = np.flatnonzero(agree == comparable_pairs)
    elif mode == "quantile":
        pos = np.sort(np.lexsort((tiebreak, -S))[: int(round(quantile * len(S)))])
    else:
        raise ValueError(f"recipe.positives={mode!r}: valid choices are perfect, quantile")
    is_pos = np.zeros(len(S), bool)
    is_pos[pos] = True
    ascending = np.lexsort((tiebreak, S))
    neg = ascending[~is_pos[ascending]][: len(pos)]
    return pos, np.sort(neg)


def fasttext_text(text: str) -> str:
    """The one normalisation used for training and for scoring: every whitespace run -> one space."""
    return " ".join(text.split())


def positive_probability(model, texts: list[str]) -> np.ndarray:
    """P(__label__1 | text) for already-normalised texts (binary softmax: P1 = 1 - P0)."""
    if not texts:
        return np.zeros(0)
    labels, probs = model.predict(texts, k=1)
    return np.fromiter((p[0] if lab[0] == FT_POSITIVE else 1.0 - p[0] for lab, p in zip(labels, probs)),
                       dtype=np.float64, count=len(texts))


_FASTTEXT_TRAIN = """
import json, os, signal, sys
from runx.trainers.runtime import die_with_parent
args = json.loads(sys.argv[1])
die_with_parent(signal.SIGKILL)       # killed with the runx process that started it, not trained on as an orphan
if os.getppid() != args["parent"]:    # that process died before the call (the orphan's parent: init, a subreaper)
    sys.exit("the process that started this fastText training has ended")
import fasttext
fasttext.train_supervised(input=args.pop("input"), **args["kwargs"]).save_model(args["output"])
"""


def train_fasttext_clean_process(train_file: str, out_path: str, kwargs: dict) -> None:
    """fastText's supervised training in a fresh interpreter, the model saved atomically to `out_path`.

    The installed fastText build leaves its input matrix's memory uninitialised (only the first 10% of rows
    per thread are drawn; the rest is whatever the allocator hands back): in a process whose heap already
    held large freed arrays, the matrix starts with garbage (we saw 1e25 entries and NaN losses), so the
    classifier would depend on what ran before. A fresh process, with large allocations forced to fresh
    (zeroed) pages, gives the same model for the same file and seed every time.

    The child ends when this process does (PR_SET_PDEATHSIG, set by the child itself: a preexec_fn would run
    Python between fork and exec in a process with threads): a killed run's orphan trained on, competing with
    the rerun for the cores and leaving its temp file (~800 MB at 2M buckets), which the rerun's stage start now
    removes (DataJob.run: remove_stale_temps)."""
    import subprocess
    import sys
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    # (when called outside a stage, too); this file's own temps whoever left them: one writer only (task 0), so
    # a killed run's temp goes also when the rerun lands on another node
    remove_stale_temps(os.path.dirname(os.path.abspath(out_path)))
    _remove_stale_temps(out_path)
    with atomic_path(out_path) as tmp:
        proc = subprocess.run([sys.executable, "-c", _FASTTEXT_TRAIN,
                               json.dumps({"input": train_file, "output": tmp, "kwargs": kwargs,
                                           "parent": os.getpid()})],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"fastText training on {train_file} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")


def prefix_closest_to(chars_in_order: np.ndarray, target: float) -> int:
    """How many documents, taken in this order, make a character count closest to `target` (within one doc)."""
    cum = np.concatenate([[0], np.cumsum(chars_in_order, dtype=np.int64)])
    return int(np.argmin(np.abs(cum - target)))


def rank_order(score: np.ndarray, shard: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Global order: higher score first; ties by shard index, then line: one exact, reproducible ranking."""
    return np.lexsort((line, shard, -score))


def kept_mask(score: np.ndarray, shard: int, line: np.ndarray, thr: dict) -> np.ndarray:
    """Pass 2: is (score, shard, line) ranked at or above the threshold document? Same order as rank_order."""
    if thr["keep_none"]:
        return np.zeros(len(score), bool)
    s, ts, tl = score, thr["shard"], thr["line"]
    above = s > thr["score"]
    tie = s == thr["score"]
    return above | (tie & ((shard < ts) | ((shard == ts) & (line <= tl))))


# =============================================================================================================
# Students: equal-budget comparison and the compute multiplier (embedded default)
# =============================================================================================================
def compute_multiplier(budgets: list[float], accuracies: list[float], target: float, base_budget: float) -> dict:
    """Random-selection budget needed to reach `target` accuracy / base_budget, interpolating the random curve
    linearly in log budget (the curve is made monotone by a running max). Bounds when off the curve."""
    b = np.asarray(budgets, dtype=np.float64)
    a = np.maximum.accumulate(np.asarray(accuracies, dtype=np.float64))
    if target <= a[0]:
        return {"multiplier": float(b[0] / base_budget), "bound": "at_most"}
    if target > a[-1]:
        return {"multiplier": float(b[-1] / base_budget), "bound": "at_least"}
    k = int(np.argmax(a >= target))
    if a[k] == a[k - 1]:
        budget = b[k]
    else:
        f = (target - a[k - 1]) / (a[k] - a[k - 1])
        budget = math.exp(math.log(b[k - 1]) + f * (math.log(b[k]) - math.log(b[k - 1])))
    return {"multiplier": float(budget / base_budget), "bound": "interpolated"}


# =============================================================================================================
# The job
# =============================================================================================================
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# debug=smoke: the embedded default shrunk to seconds
SMOKE_WORLD = {"num_facts": 120, "pool_shards": 3, "docs_per_pool_shard": 150, "sample_shards": 1,
               "docs_per_sample_shard": 500, "reference_chars": 40000, "benchmark_items": 80}


OUTPUT_OWNER = ".runx_owner.json"


def _output_dir_owner(out_dir: str) -> str | None:
    try:
        with open(os.path.join(out_dir, OUTPUT_OWNER)) as f:
            return json.load(f).get("run_dir")
    except (OSError, ValueError):
        return None


def _local_reference_problems(key: str, ref: dict, window: int) -> list[str]:
    """A reference given as a local folder must exist, and fit its window (read from its config.json) now,
    not after the references before it have scored the whole sample."""
    path = os.path.expanduser(str(ref["path"]))
    if not (os.path.isabs(path) or str(ref["path"]).startswith(("./", "../")) or os.path.isdir(path)):
        return []      # an HF hub id
    if not os.path.isdir(path):
        return [f"{key}.path={ref['path']}: no such folder on this machine (give a local model folder or a hub id)"]
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return []
    key, limit = position_limit(config) if isinstance(config, dict) else (None, None)
    return [window_problem(ref["name"], window, limit, key)] if limit and window > limit else []


def _all_at_once(ctx: JobContext) -> list[str]:
    # A one-shard stage: shard index 0 belongs to task 0 and runs in-process; the other array tasks see the
    # stage incomplete until task 0's marker exists, and wait. (Stage(parallel=False) would let them run on.)
    return ["all"]


def _shrink_for_smoke(rc: dict) -> dict:
    """debug=smoke: a smaller world, three of the n-gram references, a small fastText table: seconds."""
    rc["world"] = {k: (min(v, SMOKE_WORLD[k]) if k in SMOKE_WORLD else v) for k, v in rc["world"].items()}
    ngram = [r for r in rc["references"] if r.get("kind") == "ngram"]
    if len(ngram) > 3:  # keep the weakest, a middle and the strongest of the family
        keep = {id(ngram[0]), id(ngram[len(ngram) // 2]), id(ngram[-1])}
        rc["references"] = [r for r in rc["references"] if r.get("kind") != "ngram" or id(r) in keep]
    rc["ft_bucket"] = min(int(rc["ft_bucket"]), 20000)
    multiples = rc["random_budget_multiples"]
    rc["random_budget_multiples"] = list(multiples)[:2] if isinstance(multiples, (list, tuple)) else multiples
    rc["min_positives"] = min(int(rc["min_positives"]), 2)
    return rc


class PreSelect(DataJob):
    def __init__(self, cfg, run_dir: str):
        super().__init__(cfg, run_dir)
        # the schema's defaults under whatever the config gives (also when built from Python without Hydra)
        given = OmegaConf.to_container(cfg.recipe, resolve=True)
        rc = {**dataclasses.asdict(PreSelectConfig()), **given}
        rc["world"] = {**dataclasses.asdict(PreSelectWorldConfig()), **(given.get("world") or {})}
        self.seed = int(cfg.get("seed", 0) or 0)
        self.smoke = bool(cfg.get("smoke", False))
        self._given_multiples = rc["random_budget_multiples"]   # checked whole, also under smoke (it keeps 2)
        self.rc = OmegaConf.create(_shrink_for_smoke(rc) if self.smoke else rc)
        self.builtin = self.rc.pool == "builtin"
        self._shards: dict[str, list[str]] = {}     # recipe.pool / recipe.sample listed once, in _check_config
        self.references = self._check_config()
        self.out_dir = os.path.abspath(self.rc.output_dir) if self.rc.output_dir else \
            os.path.join(run_dir, "output")
        self._cache: dict = {}

    def __getstate__(self):  # worker processes get the job without loaded models
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    # ---- configuration checks: every message names the key, the value and what is valid -------------------
    def _check_config(self) -> list[dict]:
        rc = self.rc
        problems = []
        if not 0.0 < float(rc.keep_fraction) <= 1.0:
            problems.append(f"recipe.keep_fraction={rc.keep_fraction}: must be in (0, 1]")
        if not 1 <= int(rc.bpc_stride) < int(rc.bpc_window):
            problems.append(f"recipe.bpc_stride={rc.bpc_stride}: must be in [1, bpc_window-1] "
                            f"(bpc_window={rc.bpc_window})")
        if not 0.0 <= float(rc.heldout_fraction) < 1.0:
            problems.append(f"recipe.heldout_fraction={rc.heldout_fraction}: must be in [0, 1)")
        if not 0.0 < float(rc.positive_quantile) < 1.0:
            problems.append(f"recipe.positive_quantile={rc.positive_quantile}: must be in (0, 1)")
        multiples = self._given_multiples
        numeric = isinstance(multiples, (list, tuple)) and \
            all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in multiples)
        if not numeric or any(m <= 0 for m in multiples) or len(set(multiples)) != len(multiples):
            # a zero or negative budget has no log for the curve's interpolation; a repeated one trains the same
            # student twice and gives the curve a flat step that is not there
            problems.append(f"recipe.random_budget_multiples={multiples}: must be distinct positive numbers "
                            f"(multiples of the PreSelect budget, e.g. [1, 2, 4, 8])")
        names_given = [r.get("name") for r in (rc.references or [])]
        if rc.perplexity_reference is not None and rc.perplexity_reference not in names_given:
            problems.append(f"recipe.perplexity_reference={rc.perplexity_reference}: not a reference name; "
                            f"valid choices: {', '.join(map(str, names_given))} (or null = the ablest)")
        if rc.positives not in ("perfect", "quantile"):
            problems.append(f"recipe.positives={rc.positives}: valid choices are perfect, quantile")
        if rc.pool != "builtin" and not rc.sample:
            problems.append("recipe.sample='' : required when recipe.pool is not 'builtin' (the documents every "
                            "reference model scores, e.g. a few shards of the pool)")
        for key in ("pool", "sample") if not self.builtin else ():
            if rc[key]:
                try:
                    self._shards[key] = list_shards(rc[key], key)
                except (FileNotFoundError, ValueError) as e:
                    problems.append(str(e))
        from runx.recipes.preselect_world import DOMAINS
        from runx.recipes.preselect_ngram import MAX_ORDER
        refs = [dict(r) for r in (rc.references or [])]
        if len(refs) < 2:
            problems.append(f"recipe.references: {len(refs)} model(s) given; predictive strength ranks at least 2")
        names = set()
        for i, r in enumerate(refs):
            key = f"recipe.references[{i}]"
            name, kind = r.get("name"), r.get("kind", "hf")
            if not isinstance(name, str) or not _NAME_OK.match(name):
                problems.append(f"{key}.name={name!r}: needs a name of letters, digits, '_', '.', '-'")
            elif name in names:
                problems.append(f"{key}.name={name!r}: duplicate reference name")
            names.add(name)
            if kind == "hf":
                if not r.get("path"):
                    problems.append(f"{key}.path: required for kind=hf (an HF hub id or a local folder)")
                elif not r.get("from_config"):
                    problems += _local_reference_problems(key, r, int(r.get("window", rc.bpc_window)))
                if not isinstance(r.get("score"), (int, float)) or isinstance(r.get("score"), bool):
                    problems.append(f"{key}.score={r.get('score')!r}: kind=hf needs its benchmark score (a number)")
            elif kind == "ngram":
                if rc.pool != "builtin":
                    problems.append(f"{key}.kind=ngram: n-gram references are trained on the generated world and "
                                    f"need recipe.pool=builtin; for your own pool use kind=hf with a path and score")
                order = r.get("order", 9)
                if not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
                    problems.append(f"{key}.order={order!r}: valid 1..{MAX_ORDER}")
                mix = r.get("mixture") or {}
                bad = sorted(set(mix) - set(DOMAINS))
                if not mix or bad:
                    problems.append(f"{key}.mixture={mix}: domain fractions over {list(DOMAINS)}"
                                    + (f" (unknown: {bad})" if bad else ""))
            else:
                problems.append(f"{key}.kind={kind!r}: valid choices are hf, ngram")
        if problems:
            raise ValueError("PreSelect configuration:\n  - " + "\n  - ".join(problems))
        return refs

    # ---- where things are -----------------------------------------------------------------------------
    def _world(self):
        from runx.recipes.preselect_world import World
        return World(self.seed, num_facts=int(self.rc.world.num_facts))

    def _world_path(self, kind: str, i: int) -> str:
        comp = self.rc.world.compression
        ext = ".jsonl" + {"none": "", "gz": ".gz", "zst": ".zst"}[comp]
        return os.path.join(self.run_dir, "world", kind, f"part-{i:05d}{ext}")

    def pool_paths(self) -> list[str]:
        if self.builtin:
            return [self._world_path("pool", i) for i in range(int(self.rc.world.pool_shards))]
        return self._shards["pool"]

    def sample_paths(self) -> list[str]:
        if self.builtin:
            return [self._world_path("sample", i) for i in range(int(self.rc.world.sample_shards))]
        return self._shards["sample"]

    # ---- what the run dir pins (DataJob.pin_settings), and the output folder ---------------------------------
    job_name = "preselect"
    # batch sizes change memory and speed, not the scores: free to lower after an out-of-memory error
    unpinned = ("recipe.num_workers", "recipe.bpc_batch_size", "recipe.predict_batch")

    def settings(self) -> dict:
        rc = OmegaConf.to_container(self.rc, resolve=True)
        if rc["output_dir"]:
            rc["output_dir"] = self.out_dir
        return {"recipe": rc, "seed": self.seed, "smoke": self.smoke}

    def input_files(self) -> list[str]:
        return [] if self.builtin else self.pool_paths() + self.sample_paths()

    def outputs(self) -> list[str]:
        if not self.rc.output_dir:
            return [self.out_dir]
        if _output_dir_owner(self.out_dir) != os.path.abspath(self.run_dir):
            return []          # not this run's files: _claim_output_dir refuses the folder
        return [os.path.join(self.out_dir, f) for f in os.listdir(self.out_dir)
                if f.startswith(("part-", ".tmp-")) or f in ("manifest.json", "score_histogram.png")]

    def run(self, *args, **kw) -> dict:
        self._claim_output_dir()
        return super().run(*args, **kw)

    def _claim_output_dir(self) -> None:
        """A recipe.output_dir outside the run dir holds the outputs of one run, marked by OUTPUT_OWNER. A folder
        holding another run's outputs (or files runx did not write) is refused, rather than cleared of the
        part-* files its manifest does not list: the folder is the user's choice and may hold their own data,
        and a refusal deletes nothing. The run's own leftovers from other settings go with resume=never."""
        if not self.rc.output_dir:
            return
        me, owner = os.path.abspath(self.run_dir), _output_dir_owner(self.out_dir)
        if owner == me:
            return
        others = sorted(f for f in os.listdir(self.out_dir) if f != OUTPUT_OWNER) \
            if os.path.isdir(self.out_dir) else []
        if others:
            what = f"the outputs of run_dir={owner}" if owner else f"files no PreSelect run wrote ({others[0]}, ...)"
            raise RecipeConfigError(f"recipe.output_dir={self.rc.output_dir} already holds {what}: two jobs writing "
                                    f"one folder mix their part-* files. Give an empty or new recipe.output_dir, "
                                    f"or empty that one")
        atomic_write_json(os.path.join(self.out_dir, OUTPUT_OWNER), {"run_dir": me, "recipe": "preselect"})

    def pool_keys(self, ctx: JobContext) -> list[str]:
        return [f"{i:05d}" for i in range(len(self.pool_paths()))]

    def sample_keys(self, ctx: JobContext) -> list[str]:
        return [f"{i:05d}" for i in range(len(self.sample_paths()))]

    def stages(self) -> list[Stage]:
        stages = []
        if self.builtin:
            stages.append(Stage("world", self.world_keys, self.make_world_shard))
        if any(r.get("kind") == "ngram" for r in self.references):
            stages.append(Stage("references", self.ngram_reference_names, self.train_ngram_reference))
        stages += [
            Stage("sample", self.sample_keys, self.read_sample_shard),
            Stage("bpc", self.bpc_keys, self.bpc_shard),
            Stage("score", self.sample_keys, self.score_shard),
            Stage("label", _all_at_once, self.make_labels),
            Stage("train", _all_at_once, self.train_classifier),
            Stage("filter_score", self.pool_keys, self.score_pool_shard),
            Stage("filter_threshold", _all_at_once, self.compute_threshold, also_writes=(self.out_dir,)),
            Stage("filter", self.pool_keys, self.filter_pool_shard, also_writes=(self.out_dir,)),
        ]
        if self.builtin and self.rc.evaluate:
            stages.append(Stage("students", _all_at_once, self.train_students))
        return stages

    # ---- stage world: the generated pool, BPC sample and benchmark (embedded default) ----------------------
    def world_keys(self, ctx: JobContext) -> list[str]:
        w = self.rc.world
        return ([f"pool-{i:05d}" for i in range(int(w.pool_shards))] +
                [f"sample-{i:05d}" for i in range(int(w.sample_shards))] + ["benchmark"])

    def make_world_shard(self, ctx: JobContext, key: str) -> dict:
        world, w = self._world(), self.rc.world
        if key == "benchmark":
            items = world.benchmark(int(w.benchmark_items))
            path = os.path.join(self.run_dir, "world", "benchmark.jsonl")
            atomic_write_bytes(path, "".join(json.dumps(it.__dict__) + "\n" for it in items).encode())
            return {"items": len(items), "path": path}
        kind, i = key.split("-")
        n = int(w.docs_per_pool_shard if kind == "pool" else w.docs_per_sample_shard)
        docs = world.documents(kind, int(i), n, dict(w.pool_mixture))
        path = self._world_path(kind, int(i))
        write_shard_lines(path, (json.dumps(d).encode() for d in docs), w.compression)
        return {"docs": len(docs), "chars": sum(len(d["text"]) for d in docs), "path": path}

    # ---- stage references: train the n-gram family, measure each model's benchmark ability ------------------
    def ngram_reference_names(self, ctx: JobContext) -> list[str]:
        return [r["name"] for r in self.references if r.get("kind") == "ngram"]

    def train_ngram_reference(self, ctx: JobContext, name: str) -> dict:
        from runx.recipes.preselect_ngram import CharNgramLM
        from runx.recipes.preselect_world import benchmark_accuracy
        index = [r["name"] for r in self.references].index(name)
        ref = self.references[index]
        world = self._world()
        corpus = world.reference_corpus(index, dict(ref["mixture"]), int(self.rc.world.reference_chars))
        lm = CharNgramLM(int(ref.get("order", 9))).fit(corpus)
        lm.save(os.path.join(ctx.stage_dir("references"), f"{name}.npz"))
        acc = benchmark_accuracy(lm, world.benchmark(int(self.rc.world.benchmark_items)))
        return {"benchmark_accuracy": acc, "train_chars": lm.train_chars, "order": lm.order,
                "mixture": dict(ref["mixture"])}

    def abilities(self, ctx: JobContext) -> np.ndarray:
        """Each reference's ability score: the configured one, or the measured benchmark accuracy."""
        out = []
        for r in self.references:
            if isinstance(r.get("score"), (int, float)):
                out.append(float(r["score"]))
            else:
                out.append(float(ctx.read_marker("references", r["name"])["benchmark_accuracy"]))
        return np.array(out)

    # ---- stage sample: read the BPC sample once, report bad lines, keep a clean copy -----------------------
    def read_sample_shard(self, ctx: JobContext, key: str) -> dict:
        path = self.sample_paths()[int(key)]
        bad = BadLineLog()
        rows = []
        for item in read_docs(path, self.rc.text_field, self.rc.id_field):
            if isinstance(item, BadLine):
                bad.add(item)
            elif not item[2]:
                bad.add(BadLine(path, item[0], "empty text: no characters to compute BPC on"))
            else:
                rows.append(json.dumps({"id": item[1], "text": item[2]}).encode())
        if not rows:
            self._check_text_field(path, bad)
        write_shard_lines(os.path.join(ctx.stage_dir("sample"), f"{key}.jsonl"), rows, "none")
        return {"input": path, "docs": len(rows), **bad.save(os.path.join(ctx.stage_dir("sample"),
                                                                             f"{key}.bad.jsonl"))}

    def _check_text_field(self, path: str, bad: "BadLineLog") -> None:
        """A shard without one good document, mostly for lack of the text field: recipe.text_field names a
        field the data does not have (a config problem, stopped here before any reference model loads)."""
        missing = [b for b in bad.items if b["error"].startswith(("missing field", "missing column"))]
        if missing and 2 * len(missing) >= len(bad.items):
            raise RecipeConfigError(f"recipe.text_field={self.rc.text_field!r} is not in {path}: line "
                                    f"{missing[0]['line']}: {missing[0]['error']}. Set recipe.text_field to the "
                                    f"field that holds the documents' text")

    def _sample_texts(self, ctx: JobContext, key: str) -> tuple[list[str], list[str]]:
        ids, texts = [], []
        with open(os.path.join(ctx.stage_dir("sample"), f"{key}.jsonl"), "rb") as f:
            for line in f:
                d = json.loads(line)
                ids.append(d["id"])
                texts.append(d["text"])
        return ids, texts

    # ---- stage bpc: Eq. (1) for every (reference, sample shard) ---------------------------------------------
    def bpc_keys(self, ctx: JobContext) -> list[str]:
        # a sample too small for recipe.min_positives fails here, before every reference scores it
        keys = self.sample_keys(ctx)
        if all(ctx.is_done("sample", k) for k in keys):
            docs = sum(int(ctx.read_marker("sample", k).get("docs", 0)) for k in keys)
            rc = self.rc
            most = round(float(rc.positive_quantile) * docs) if rc.positives == "quantile" else docs
            if most < int(rc.min_positives):
                how = (f"the top recipe.positive_quantile={rc.positive_quantile} of them" if rc.positives ==
                       "quantile" else "at most all of them")
                raise RecipeConfigError(
                    f"recipe.min_positives={rc.min_positives}: recipe.sample holds {docs} documents, so the labels "
                    f"would have {most} positives ({how}); found before the references score them. Valid choices: "
                    f"more documents in recipe.sample, a larger recipe.positive_quantile, or a lower "
                    f"recipe.min_positives")
        # reference-major: a worker's consecutive keys share a model, which it loads once
        return [f"{r['name']}__{s}" for r in self.references for s in keys]

    def _reference(self, name: str):
        if self._cache.get("ref_name") != name:
            self._cache.clear()
            ref = next(r for r in self.references if r["name"] == name)
            if ref.get("kind") == "ngram":
                model = NgramReference(os.path.join(self.run_dir, "references", f"{name}.npz"))
            else:
                model = HFReference(ref, self.rc, self.seed)
            self._cache.update(ref_name=name, ref=model)
        return self._cache["ref"]

    def bpc_shard(self, ctx: JobContext, key: str) -> dict:
        name, shard = key.rsplit("__", 1)
        ids, texts = self._sample_texts(ctx, shard)
        bits = self._reference(name).doc_bits(texts)
        chars = np.array([len(t) for t in texts], dtype=np.int64)
        bpc = bits / np.maximum(chars, 1)
        _save_npz(os.path.join(ctx.stage_dir("bpc"), name, f"{shard}.npz"), bpc=bpc, chars=chars)
        return {"docs": len(texts), "chars": int(chars.sum()), "mean_bpc": float(bits.sum() / max(chars.sum(), 1))}

    # ---- stage score: Eq. (2) per sample shard -------------------------------------------------------------
    def score_shard(self, ctx: JobContext, key: str) -> dict:
        bpc = np.stack([np.load(os.path.join(ctx.stage_dir("bpc"), r["name"], f"{key}.npz"))["bpc"]
                        for r in self.references], axis=1)
        S, agree = predictive_strength(bpc, self.abilities(ctx))
        _save_npz(os.path.join(ctx.stage_dir("score"), f"{key}.npz"), S=S, agree=agree)
        hist = np.bincount(agree, minlength=len(self.references) * (len(self.references) - 1) // 2 + 1)
        return {"docs": len(S), "mean_S": float(S.mean()) if len(S) else 0.0,
                "agreeing_pairs_histogram": hist.tolist()}

    # ---- stage label: positives S = 1, as many lowest-S negatives, a held-out split -------------------------
    def make_labels(self, ctx: JobContext, _key: str) -> dict:
        ability = self.abilities(ctx)
        n = len(ability)
        comparable = int(sum(ability[i] != ability[j] for i in range(n) for j in range(i + 1, n)))
        if comparable < n * (n - 1) // 2:
            log.warning("reference abilities %s have ties: %d of %d pairs cannot agree", ability.tolist(),
                        n * (n - 1) // 2 - comparable, n * (n - 1) // 2)
        keys = self.sample_keys(ctx)
        parts = [np.load(os.path.join(ctx.stage_dir("score"), f"{k}.npz")) for k in keys]
        S = np.concatenate([p["S"] for p in parts])
        agree = np.concatenate([p["agree"] for p in parts])
        offsets = np.concatenate([[0], np.cumsum([len(p["S"]) for p in parts])]).astype(int)
        pos, neg = choose_labels(S, agree, comparable, self.rc.positives, float(self.rc.positive_quantile),
                                 self.seed)
        if len(pos) < int(self.rc.min_positives):
            raise RecipeConfigError(self._too_few_positives(len(pos), len(S)))
        rng = np.random.default_rng([self.seed, 12])
        split = {}
        for label, idx in ((1, pos), (0, neg)):
            idx = idx[rng.permutation(len(idx))]
            n_held = int(round(float(self.rc.heldout_fraction) * len(idx)))
            for r, i in enumerate(idx):
                split[int(i)] = (label, "heldout" if r < n_held else "train")
        texts = {}
        for n, k in enumerate(keys):  # only the labelled documents' texts
            lo, hi = offsets[n], offsets[n + 1]
            wanted = [i for i in split if lo <= i < hi]
            if wanted:
                ids, tx = self._sample_texts(ctx, k)
                texts.update({i: (ids[i - lo], tx[i - lo]) for i in wanted})
        order = sorted(split)
        order = [order[i] for i in rng.permutation(len(order))]  # fastText reads in file order: shuffle once
        files = {"train": [], "heldout": []}
        records = []
        for i in order:
            label, part = split[i]
            doc_id, text = texts[i]
            files[part].append(f"{FT_POSITIVE if label else FT_NEGATIVE} {fasttext_text(text)}\n")
            records.append(json.dumps({"id": doc_id, "S": float(S[i]), "label": label, "split": part}) + "\n")
        d = ctx.stage_dir("label")
        for part, lines in files.items():
            atomic_write_bytes(os.path.join(d, f"{part}.txt"), "".join(lines).encode())
        atomic_write_bytes(os.path.join(d, "labels.jsonl"), "".join(records).encode())
        return {"docs_scored": len(S), "positives": int(len(pos)), "negatives": int(len(neg)),
                "train": len(files["train"]), "heldout": len(files["heldout"]),
                "abilities": ability.tolist(), "comparable_pairs": comparable,
                "mean_S": float(S.mean()), "negatives_max_S": float(S[neg].max()) if len(neg) else None}

    def _too_few_positives(self, positives: int, scored: int) -> str:
        rc = self.rc
        if scored == 0:
            return ("no sample document could be scored: every line of recipe.sample was bad (see "
                    f"{os.path.join(self.run_dir, 'sample')}/*.bad.jsonl)")
        if rc.positives == "quantile":
            return (f"only {positives} positive documents (the top recipe.positive_quantile={rc.positive_quantile} "
                    f"of {scored} scored), fewer than recipe.min_positives={rc.min_positives}: score more documents "
                    f"(recipe.sample) or raise recipe.positive_quantile")
        return (f"only {positives} positive documents (S = 1: every reference pair agrees) among {scored}, fewer "
                f"than recipe.min_positives={rc.min_positives}: score more documents (recipe.sample) or use "
                f"recipe.positives=quantile")

    # ---- stage train: the fastText classifier --------------------------------------------------------------
    def train_classifier(self, ctx: JobContext, _key: str) -> dict:
        import fasttext
        rc, d = self.rc, ctx.stage_dir("train")
        out = os.path.join(d, "classifier.bin")
        train_fasttext_clean_process(os.path.join(ctx.stage_dir("label"), "train.txt"), out, dict(
            wordNgrams=int(rc.ft_word_ngrams), epoch=int(rc.ft_epoch), lr=float(rc.ft_lr), dim=int(rc.ft_dim),
            minCount=int(rc.ft_min_count), bucket=int(rc.ft_bucket), thread=int(rc.ft_threads), seed=self.seed,
            loss="softmax", verbose=0))
        model = fasttext.load_model(out)
        return {"labels": list(model.get_labels()), **_heldout_metrics(
            model, os.path.join(ctx.stage_dir("label"), "heldout.txt"))}

    def _classifier(self):
        if "classifier" not in self._cache:
            import fasttext
            self._cache["classifier"] = fasttext.load_model(os.path.join(self.run_dir, "train", "classifier.bin"))
        return self._cache["classifier"]

    # ---- stage filter_score (pass 1): P(label 1) of every pool document ----------------------------------
    def score_pool_shard(self, ctx: JobContext, key: str) -> dict:
        path = self.pool_paths()[int(key)]
        model, batch_size = self._classifier(), int(self.rc.predict_batch)
        bad = BadLineLog()
        lines, chars, scores, batch = [], [], [], []
        for item in read_docs(path, self.rc.text_field, self.rc.id_field):
            if isinstance(item, BadLine):
                bad.add(item)
                continue
            lines.append(item[0])
            chars.append(len(item[2]))
            batch.append(fasttext_text(item[2]))
            if len(batch) == batch_size:
                scores.append(positive_probability(model, batch))
                batch = []
        if batch:
            scores.append(positive_probability(model, batch))
        score = np.concatenate(scores) if scores else np.zeros(0)
        _save_npz(os.path.join(ctx.stage_dir("filter_score"), f"{key}.npz"),
                  line=np.array(lines, dtype=np.int64), score=score, chars=np.array(chars, dtype=np.int64))
        return {"input": path, "docs": len(lines), "chars": int(sum(chars)),
                **bad.save(os.path.join(ctx.stage_dir("filter_score"), f"{key}.bad.jsonl"))}

    # ---- stage filter_threshold: the exact global cut by character mass ------------------------------------
    def compute_threshold(self, ctx: JobContext, _key: str) -> dict:
        keys = self.pool_keys(ctx)
        parts = [np.load(os.path.join(ctx.stage_dir("filter_score"), f"{k}.npz")) for k in keys]
        score = np.concatenate([p["score"] for p in parts]) if parts else np.zeros(0)
        chars = np.concatenate([p["chars"] for p in parts]) if parts else np.zeros(0, np.int64)
        line = np.concatenate([p["line"] for p in parts]) if parts else np.zeros(0, np.int64)
        shard = np.concatenate([np.full(len(p["score"]), i) for i, p in enumerate(parts)]) if parts else line
        order = rank_order(score, shard, line)
        total = int(chars.sum())
        target = float(self.rc.keep_fraction) * total
        n_keep = prefix_closest_to(chars[order], target)
        thr = {"keep_none": n_keep == 0, "score": None, "shard": None, "line": None}
        if n_keep:
            last = order[n_keep - 1]
            thr.update(score=float(score[last]), shard=int(shard[last]), line=int(line[last]))
        kept_chars = int(chars[order[:n_keep]].sum())
        if total and abs(kept_chars - target) > 0.25 * target:
            # whole documents are kept: a document at the cut as long as the target (or longer) moves it far
            at_cut = int(chars[order[max(n_keep - 1, 0):n_keep + 1]].max())
            log.warning("recipe.keep_fraction=%s: kept %d documents, %.3g%% of the pool's characters against the "
                        "%.3g%% asked, because whole documents are kept and a document at the cut has %d "
                        "characters (%.3g%% of the pool). A larger keep_fraction or a pool of shorter documents "
                        "keeps closer to it", self.rc.keep_fraction, n_keep, 100 * kept_chars / total,
                        100 * target / total, at_cut, 100 * at_cut / total)
        # bins over the observed range: a classifier trained briefly on few labels keeps scores near 0.5
        bins = int(self.rc.histogram_bins)
        lo, hi = (float(score.min()), float(score.max())) if len(score) else (0.0, 1.0)
        span = (lo, hi) if hi > lo else (lo - 0.5e-3, hi + 0.5e-3)
        docs_hist, edges = np.histogram(score, bins=bins, range=span)
        chars_hist, _ = np.histogram(score, bins=bins, range=span, weights=chars)
        os.makedirs(self.out_dir, exist_ok=True)
        _plot_histogram(os.path.join(self.out_dir, "score_histogram.png"), edges, docs_hist, chars_hist,
                        thr["score"], float(self.rc.keep_fraction))
        return {"threshold": thr, "keep_fraction": float(self.rc.keep_fraction), "total_docs": int(len(score)),
                "total_chars": total, "target_chars": target, "kept_docs": n_keep, "kept_chars": kept_chars,
                "histogram": {"bin_edges": edges.tolist(), "docs": docs_hist.tolist(),
                              "chars": chars_hist.astype(np.int64).tolist()}}

    # ---- stage filter (pass 2): write each shard's kept documents, unchanged --------------------------------
    def _output_name(self, key: str, path: str) -> tuple[str, str, str]:
        fmt, comp = shard_format(path)
        out_fmt = fmt if self.rc.output_format == "same" else self.rc.output_format
        out_comp = comp if self.rc.output_compression == "same" else self.rc.output_compression
        if out_fmt == "parquet":
            out_comp = "none"
        ext = ".parquet" if out_fmt == "parquet" else ".jsonl" + {"none": "", "gz": ".gz", "zst": ".zst"}[out_comp]
        return f"part-{key}{ext}", out_fmt, out_comp

    def filter_pool_shard(self, ctx: JobContext, key: str) -> dict:
        path = self.pool_paths()[int(key)]
        thr = ctx.read_marker("filter_threshold", "all")["threshold"]
        scored = np.load(os.path.join(ctx.stage_dir("filter_score"), f"{key}.npz"))
        keep = kept_mask(scored["score"], int(key), scored["line"], thr)
        kept_lines = scored["line"][keep]
        name, out_fmt, out_comp = self._output_name(key, path)
        out = os.path.join(self.out_dir, name)
        written = _write_kept(path, out, set(kept_lines.tolist()), out_fmt, out_comp, self.rc.text_field,
                              self.rc.id_field)
        if written != len(kept_lines):
            raise RuntimeError(f"{path}: {written} documents written but {len(kept_lines)} were selected in pass 1;"
                               f" the shard changed between the two passes (rerun from filter_score)")
        return {"input": path, "output": name, "docs": int(len(keep)), "chars": int(scored["chars"].sum()),
                "kept_docs": int(keep.sum()), "kept_chars": int(scored["chars"][keep].sum())}

    # ---- stage students: equal-budget students on each selection (embedded default) -------------------------
    def train_students(self, ctx: JobContext, _key: str) -> dict:
        from runx.recipes.preselect_ngram import CharNgramLM
        from runx.recipes.preselect_world import DOMAINS, benchmark_accuracy
        world = self._world()
        bench = world.benchmark(int(self.rc.world.benchmark_items))
        pool = [d for p in self.pool_paths() for d in _read_objects(p)]
        chars = np.array([len(d["text"]) for d in pool], dtype=np.int64)
        budget = int(ctx.read_marker("filter_threshold", "all")["kept_chars"])
        order_n = int(self.rc.student_order)

        def student(idx) -> dict:
            idx = np.asarray(idx, dtype=np.int64)
            lm = CharNgramLM(order_n).fit([pool[i]["text"] for i in idx])
            doms = [pool[i].get("domain") for i in idx]
            return {"accuracy": benchmark_accuracy(lm, bench), "chars": int(chars[idx].sum()), "docs": len(idx),
                    "mix": {d: round(doms.count(d) / max(len(doms), 1), 4) for d in DOMAINS}}

        def take(order: np.ndarray, target: float) -> np.ndarray:
            return order[: prefix_closest_to(chars[order], target)]

        # PreSelect: exactly the documents the filter stage wrote
        kept = [d for m in self._filter_entries(ctx) for d in _read_objects(os.path.join(self.out_dir, m["output"]))]
        by_id = {d["id"]: i for i, d in enumerate(pool)}
        results = {"preselect": student([by_id[d["id"]] for d in kept])}
        # perplexity filter: the lowest BPC under the ablest reference (or the one named in the config)
        names = [r["name"] for r in self.references]
        best = self.rc.perplexity_reference or names[int(np.argmax(self.abilities(ctx)))]
        bpc = self._reference(best).doc_bits([d["text"] for d in pool]) / np.maximum(chars, 1)
        results["perplexity_filter"] = {**student(take(np.lexsort((np.arange(len(pool)), bpc)), budget)),
                                        "reference": best}
        # oracle: only `facts` documents (the domain the benchmark asks about), a reference point
        facts = np.flatnonzero([d.get("domain") == "facts" for d in pool])
        results["oracle_facts"] = student(take(facts[np.random.default_rng([self.seed, 13]).permutation(len(facts))],
                                               budget))
        # random selection at 1x, 2x, 4x, ... the budget: the curve the compute multiplier is read from
        perm = np.random.default_rng([self.seed, 14]).permutation(len(pool))
        curve = []
        for m in self.rc.random_budget_multiples:
            if m * budget > chars.sum() * 1.0001:
                log.warning("random budget %sx = %d chars exceeds the pool (%d chars): skipped", m, m * budget,
                            chars.sum())
                continue
            curve.append({"multiple": m, **student(take(perm, m * budget))})
        # compute_multiplier reads the curve left to right as budgets grow: in the config's order, [2, 1] would
        # interpolate a different (wrong) multiplier than [1, 2] from the same students
        curve.sort(key=lambda c: (c["chars"], c["multiple"]))
        results["random"] = curve
        target = results["preselect"]["accuracy"]
        mult = compute_multiplier([c["chars"] for c in curve], [c["accuracy"] for c in curve], target,
                                  results["preselect"]["chars"]) if curve else {"multiplier": None, "bound": None}
        return {"budget_chars": budget, "student_order": order_n, "benchmark_items": len(bench),
                "students": results, "compute_multiplier": mult["multiplier"], "multiplier_bound": mult["bound"]}

    def _filter_entries(self, ctx: JobContext) -> list[dict]:
        return [ctx.read_marker("filter", k) for k in self.pool_keys(ctx)]

    # ---- the run's summary and the output manifest ----------------------------------------------------------
    def summary(self, ctx: JobContext) -> dict:
        if not all(ctx.is_done("filter", k) for k in self.pool_keys(ctx)):
            return {}  # a partial run (`only=[...]`): nothing final to report yet
        thr = ctx.read_marker("filter_threshold", "all")
        shards = []
        bad = 0
        for k in self.pool_keys(ctx):
            e = ctx.read_marker("filter", k)
            b = ctx.read_marker("filter_score", k)
            bad += b["bad_lines"]
            shards.append({"key": k, **e, "bad_lines": b["bad_lines"]})
        kept_docs = sum(s["kept_docs"] for s in shards)
        kept_chars = sum(s["kept_chars"] for s in shards)
        manifest = {"recipe": "preselect", "keep_fraction": thr["keep_fraction"], "threshold": thr["threshold"],
                    "total_docs": thr["total_docs"], "total_chars": thr["total_chars"], "kept_docs": kept_docs,
                    "kept_chars": kept_chars, "kept_char_fraction": kept_chars / max(thr["total_chars"], 1),
                    "bad_lines": bad, "histogram": {"png": "score_histogram.png", **thr["histogram"]},
                    "shards": shards}
        atomic_write_json(os.path.join(self.out_dir, "manifest.json"), manifest)
        out = {"kept_docs": kept_docs, "kept_chars": kept_chars, "kept_char_fraction": manifest["kept_char_fraction"],
               "threshold_score": thr["threshold"]["score"], "pool_bad_lines": bad, "output_dir": self.out_dir}
        sample_keys = self.sample_keys(ctx)
        if all(ctx.is_done("sample", k) for k in sample_keys):
            out["sample_bad_lines"] = sum(ctx.read_marker("sample", k)["bad_lines"] for k in sample_keys)
        if ctx.is_done("label", "all"):
            label = ctx.read_marker("label", "all")
            out.update(positives=label["positives"], negatives=label["negatives"])
        if ctx.is_done("train", "all"):
            train = ctx.read_marker("train", "all")
            out.update({f"classifier_{k}": train[k] for k in ("precision", "recall", "accuracy", "auc")})
        if self.builtin and self.rc.evaluate and ctx.is_done("students", "all"):
            st = ctx.read_marker("students", "all")
            out["compute_multiplier"] = st["compute_multiplier"]
            out["multiplier_bound"] = st["multiplier_bound"]
            for name in ("preselect", "perplexity_filter", "oracle_facts"):
                out[f"acc_{name}"] = st["students"][name]["accuracy"]
            for c in st["students"]["random"]:
                out[f"acc_random_x{c['multiple']}"] = c["accuracy"]
        return out


# =============================================================================================================
# Shards: JSONL (.jsonl/.json/.ndjson, optionally .gz/.zst) and Parquet, read line by line, bad lines reported
# (file formats and decompression: runx.recipes.text_data, shared with concept_prune)
# =============================================================================================================
def list_shards(spec: str, key: str) -> list[str]:
    """The shard files of `spec` (a file, a folder or a glob), sorted: shard index = position in this list."""
    shards = [os.path.abspath(f) for f in select_shards(files_at(spec, recursive=False), SHARD_FORMATS,
                                                          f"recipe.{key}={spec!r}")]
    if not shards:
        raise FileNotFoundError(f"recipe.{key}={spec!r}: no shards found. Give a file, a folder or a glob of "
                                f"JSONL (.jsonl/.json/.ndjson, optionally .gz/.zst) or .parquet files.")
    return shards


class _Writer:
    """A deterministic byte sink for a shard: gzip without timestamp/name, zstd at a fixed level."""

    def __init__(self, f, compression: str):
        self.raw = f
        if compression == "gz":
            self.out = gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6)
        elif compression == "zst":
            import zstandard
            self.out = zstandard.ZstdCompressor(level=3).stream_writer(f, closefd=False)
        else:
            self.out = f

    def write(self, b: bytes) -> None:
        self.out.write(b)

    def close(self) -> None:
        if self.out is not self.raw:
            self.out.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()


def write_shard_lines(path: str, lines, compression: str) -> None:
    """Write byte lines to `path` atomically (a killed writer leaves only a hidden temp file)."""
    _remove_stale_temps(path)
    with atomic_path(path) as tmp:
        w = _Writer(open(tmp, "wb"), compression)
        for line in lines:
            w.write(line if line.endswith(b"\n") else line + b"\n")
        w.close()


def _remove_stale_temps(path: str) -> None:
    """Temp files of this output left by a killed run, whichever process or node wrote them (only this shard's
    owner writes this name)."""
    folder, base = os.path.split(os.path.abspath(path))
    remove_stale_temps(folder, output=base)


@dataclass
class BadLine:
    path: str
    line: int       # 1-based line (JSONL) or row (Parquet); 0 = the file as a whole
    error: str

    def as_dict(self) -> dict:
        return {"path": self.path, "line": self.line, "error": self.error}


def read_docs(path: str, text_field: str, id_field: str, raw: bool = False) -> Iterator:
    """Yield (line, id, text, raw_line_or_None) per document and BadLine per bad line; never raises on bad data.

    JSONL: one object per line with a string `text_field`. Parquet: a string column `text_field`."""
    fmt = shard_format(path)
    if fmt is None:
        yield BadLine(path, 0, "not a JSONL or Parquet shard")
        return
    if fmt[0] == "parquet":
        yield from _read_parquet(path, text_field, id_field)
        return
    base = os.path.basename(path)
    n = 0
    try:
        f = open_shard(path, fmt[1])
    except OSError as e:
        yield BadLine(path, 0, f"unreadable file: {e}")
        return
    try:
        with f:
            for n, line in enumerate(f, 1):
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError as e:
                    yield BadLine(path, n, f"invalid UTF-8: {e.reason} at byte {e.start}")
                    continue
                except ValueError as e:
                    msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                    yield BadLine(path, n, "empty line" if not line.strip() else f"invalid JSON: {msg}")
                    continue
                if not isinstance(obj, dict):
                    yield BadLine(path, n, f"expected a JSON object, got {type(obj).__name__}")
                    continue
                text = obj.get(text_field)
                if not isinstance(text, str):
                    yield BadLine(path, n, f"missing field {text_field!r} (fields: {sorted(obj)[:8]})"
                                  if text is None else
                                  f"field {text_field!r} is {type(text).__name__}, expected a string")
                    continue
                doc_id = obj.get(id_field)
                yield n, (f"{base}:{n}" if doc_id is None else str(doc_id)), text, (line if raw else None)
    except Exception as e:  # noqa: BLE001 — truncated gzip, corrupt zstd frame, I/O error: the rest is unreadable
        yield BadLine(path, n + 1, f"unreadable from here on: {type(e).__name__}: {e}")


def _read_parquet(path: str, text_field: str, id_field: str) -> Iterator:
    import pyarrow.parquet as pq
    base = os.path.basename(path)
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            yield BadLine(path, 0, f"missing column {text_field!r} (columns: {names[:8]})")
            return
        cols = [text_field] + ([id_field] if id_field in names else [])
        row = 0
        for batch in pf.iter_batches(columns=cols, batch_size=8192):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(cols) == 2 else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                row += 1
                if not isinstance(text, str):
                    yield BadLine(path, row, f"row {row}: column {text_field!r} is "
                                             f"{'null' if text is None else type(text).__name__}, expected a string")
                    continue
                yield row, (f"{base}:{row}" if doc_id is None else str(doc_id)), text, None
    except Exception as e:  # noqa: BLE001 — pyarrow raises many types for a corrupt file
        yield BadLine(path, 0, f"unreadable parquet file: {type(e).__name__}: {e}")


class BadLineLog:
    """Collects a shard's bad lines: warns with path:line (first few), writes them all next to the output."""

    def __init__(self, shown: int = 5):
        self.items: list[dict] = []
        self.shown = shown

    def add(self, bad: BadLine) -> None:
        if len(self.items) < self.shown:
            log.warning("bad input %s:%d: %s", bad.path, bad.line, bad.error)
        self.items.append(bad.as_dict())

    def save(self, path: str) -> dict:
        if self.items:
            atomic_write_bytes(path, "".join(json.dumps(b) + "\n" for b in self.items).encode())
        elif os.path.exists(path):
            os.unlink(path)
        return {"bad_lines": len(self.items), "bad_examples": self.items[: self.shown]}


# =============================================================================================================
# Small pieces the stages share
# =============================================================================================================
def _save_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _read_objects(path: str) -> list[dict]:
    """All records of a (trusted, self-written) shard."""
    fmt, comp = shard_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    with open_shard(path, comp) as f:
        return [json.loads(line) for line in f]


def _heldout_metrics(model, path: str) -> dict:
    labels, texts = [], []
    with open(path) as f:
        for line in f:
            lab, _, text = line.rstrip("\n").partition(" ")
            labels.append(lab == FT_POSITIVE)
            texts.append(text)
    if not texts:
        return {"heldout": 0, "precision": None, "recall": None, "accuracy": None, "auc": None}
    y = np.array(labels)
    p = positive_probability(model, texts)
    pred = p >= 0.5                       # fastText's own decision: the more probable label
    tp = int((pred & y).sum())
    auc = _roc_auc(p, y)
    return {"heldout": len(texts), "precision": tp / max(int(pred.sum()), 1), "recall": tp / max(int(y.sum()), 1),
            "accuracy": float((pred == y).mean()), "auc": auc}


def _roc_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC = P(a positive outscores a negative), ties count half: what the top-fraction filter relies on.

    Mann-Whitney from ranks (O(n log n) time, O(n) memory) instead of comparing every pair, which needed
    n_pos x n_neg booleans (~10 GB at 200k held-out documents). Tied scores get their group's average rank,
    kept doubled so every quantity is an integer: U is the same half-integer count as the pairwise formula,
    so the result is the same float."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    _, group, counts = np.unique(score, return_inverse=True, return_counts=True)
    before = np.cumsum(counts) - counts                      # scores below each tie group
    rank2 = (2 * before + counts + 1)[group.ravel()]         # doubled average 1-based rank
    u2 = int(rank2[positive].sum()) - n_pos * (n_pos + 1)    # 2 * U
    return (u2 / 2) / (n_pos * n_neg)


# Parquet output is written one row group at a time, with pyarrow's default row-group length (what
# pq.write_table of the whole shard used): the files stay byte-identical to writing the shard at once, and only
# the kept rows of one row group are held (as Arrow columns), never the whole input nor Python objects per row.
PARQUET_ROW_GROUP = 1024 * 1024
READ_BATCH = 8192   # rows read, converted or filtered at a time


def _write_kept(path: str, out: str, keep: set, out_fmt: str, out_comp: str, text_field: str,
                id_field: str) -> int:
    """Copy the kept documents of one input shard to `out`, streamed (JSONL lines verbatim; Parquet rows by
    batch); returns how many were written."""
    in_fmt, in_comp = shard_format(path)
    written = 0

    def count(rows):
        nonlocal written
        for r in rows:
            written += 1
            yield r

    if in_fmt == "jsonl" and out_fmt == "jsonl":
        write_shard_lines(out, count(line for n, line in _numbered_lines(path, in_comp) if n in keep), out_comp)
        return written
    import pyarrow as pa
    import pyarrow.parquet as pq
    if in_fmt == "parquet" and keep:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        batches = parquet_rows_at(pf, np.array(sorted(keep), dtype=np.int64) - 1, READ_BATCH)   # (keep: 1-based)
    elif in_fmt == "parquet":  # nothing kept (maybe an unreadable file, reported in pass 1): an empty shard
        try:
            schema = pq.read_schema(path)
        except Exception:  # noqa: BLE001
            schema = pa.schema([(text_field, pa.string())])
        batches = iter(())
    else:
        schema, batches = _jsonl_kept_batches(path, in_comp, keep)
    if out_fmt == "jsonl":
        write_shard_lines(out, count(json.dumps(r).encode() for b in batches for r in b.to_pylist()), out_comp)
        return written
    _remove_stale_temps(out)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        pending, rows = [], 0
        for batch in batches:
            pending.append(batch)
            rows += batch.num_rows
            while rows >= PARQUET_ROW_GROUP:
                # one contiguous table per row group: the page layout (so the bytes) depends on array chunking
                group = pa.Table.from_batches(pending, schema).combine_chunks()
                writer.write_table(group.slice(0, PARQUET_ROW_GROUP))
                pending = group.slice(PARQUET_ROW_GROUP).to_batches()
                rows -= PARQUET_ROW_GROUP
                written += PARQUET_ROW_GROUP
                del group
        if rows or not written:   # the last row group; an empty shard is one empty table, as pq.write_table
            writer.write_table(pa.Table.from_batches(pending, schema).combine_chunks())
            written += rows
    return written


def _jsonl_kept_batches(path: str, comp: str, keep: set):
    """The kept JSONL records as (schema, RecordBatch iterator): every field any record has (pyarrow's
    from_pylist takes the first record's keys only), each column as _rows_column builds it from all values at
    once, without holding the records. A first pass finds the columns (in first-seen order) and the type pyarrow
    infers for each batch of values; a column whose non-null batches all agree has that type (inference over all
    values gives the same), any other column (types that differ or fail) is built whole from that one field of
    every record."""
    import pyarrow as pa

    def chunks():
        records = (json.loads(line) for n, line in _numbered_lines(path, comp) if n in keep)
        while chunk := list(itertools.islice(records, READ_BATCH)):
            yield chunk

    types: dict = {}          # column -> the one non-null type seen so far, None while only nulls
    irregular: set = set()    # columns built whole
    for chunk in chunks():
        for key in dict.fromkeys(k for r in chunk for k in r):
            types.setdefault(key, None)
            if key in irregular:
                continue
            try:
                t = pa.array([r.get(key) for r in chunk]).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                irregular.add(key)
                continue
            if t != pa.null() and types[key] is not None and t != types[key]:
                irregular.add(key)
            elif t != pa.null():
                types[key] = t
    if not types:
        return pa.schema([]), iter(())
    whole = {}
    if irregular:
        columns = {k: [] for k in types if k in irregular}
        for chunk in chunks():
            for k, values in columns.items():
                values.extend(r.get(k) for r in chunk)
        whole = {k: _rows_column(k, values, path) for k, values in columns.items()}
    schema = pa.schema([(k, whole[k].type if k in whole else (t or pa.null())) for k, t in types.items()])

    def batches():
        start = 0
        for chunk in chunks():
            yield pa.RecordBatch.from_arrays(
                [whole[f.name].slice(start, len(chunk)) if f.name in whole else
                 pa.array([r.get(f.name) for r in chunk], f.type) for f in schema], schema=schema)
            start += len(chunk)
    return schema, batches()


def _rows_column(key: str, values: list, where: str):
    """One field of every kept JSONL record as a Parquet column. A field whose values mix types (1 in one record,
    "x4" in another) becomes a string column, its non-string values as JSON text, with a warning."""
    import pyarrow as pa
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        log.warning("%s: field %r has values of several types; written to Parquet as text (JSON for the "
                    "non-strings)", where, key)
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def _numbered_lines(path: str, comp: str):
    try:
        with open_shard(path, comp) as f:
            yield from enumerate(f, 1)
    except Exception:  # noqa: BLE001 — an unreadable tail was reported in pass 1, and none of it was scored
        return


def _plot_histogram(path: str, edges, docs, chars, threshold, keep_fraction: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    for a, values, what in ((ax[0], docs, "documents"), (ax[1], chars, "characters")):
        a.bar(centers, values, width=width, color="#4c72b0")
        if threshold is not None:
            a.axvline(threshold, color="#c44e52", lw=1.5, label=f"threshold {threshold:.6g}")
            a.legend(loc="upper center")
        a.set_xlabel("fastText P(label 1)")
        a.ticklabel_format(axis="x", useOffset=False)
        a.set_ylabel(what)
        a.set_yscale("log")
    fig.suptitle(f"PreSelect pool scores — keep top {keep_fraction:.1%} of characters")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.86, wspace=0.25)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
