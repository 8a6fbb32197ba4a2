"""`recipe:` section of PreSelect (Shum et al. 2025, arXiv 2503.00808): predictive data selection."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


def _ngram_reference(name: str, facts: float) -> dict:
    # Equal budget, equal capacity; the family differs only in how its 30% "encyclopedia" share splits
    # between the benchmark's fact table (`facts`) and an unrelated one (`lore`): ability order = facts share.
    return {"name": name, "kind": "ngram", "order": 9, "score": None,
            "mixture": {"facts": facts, "lore": round(0.30 - facts, 4), "prose": 0.35, "noise": 0.15,
                        "boilerplate": 0.20}}


def default_references() -> list:
    return [_ngram_reference(f"ngram_f{int(f * 100):02d}", f) for f in (0.02, 0.05, 0.08, 0.12, 0.17, 0.24)]


@dataclass
class PreSelectWorldConfig:
    """The generated world of the embedded default (`pool: builtin`)."""
    num_facts: int = 1500               # size of the benchmark's fact table (and of the look-alike `lore` table)
    pool_shards: int = 4
    docs_per_pool_shard: int = 5000
    sample_shards: int = 2              # the documents scored by every reference model (paper: 16 parts)
    docs_per_sample_shard: int = 3000
    pool_mixture: dict = field(default_factory=lambda: {
        "facts": 0.15, "lore": 0.15, "prose": 0.35, "noise": 0.15, "boilerplate": 0.20})
    reference_chars: int = 500000       # training characters of each n-gram reference model
    benchmark_items: int = 500
    compression: Literal["none", "gz", "zst"] = "zst"


@dataclass
class PreSelectConfig:
    name: str = "preselect"
    num_workers: int = 1                # local processes per stage (shards are split by index)

    # ---- data: JSONL / Parquet shards (optionally .gz / .zst); a file, a folder or a glob ----------
    pool: str = "builtin"               # the corpus to filter; "builtin" = the generated world
    sample: str = ""                    # documents to compute BPC on (required unless pool=builtin)
    text_field: str = "text"
    id_field: str = "id"

    # ---- reference models: [{name, kind: hf|ngram, path, score, ...}] ---------------------------------
    # kind=hf: any HF causal LM hub id or local folder, `score` = its benchmark average (required).
    # kind=ngram: a character n-gram model the recipe trains on the generated world (`order`, `mixture`);
    # score: null = measure it on the generated benchmark.
    references: list = field(default_factory=default_references)

    # ---- bpc: sliding window over long documents (the reference code: 1900-token window, stride 512) --
    bpc_window: int = 1900
    bpc_stride: int = 512
    bpc_batch_size: int = 8             # windows per forward pass
    bpc_device: Literal["auto", "cpu", "cuda"] = "auto"
    bpc_dtype: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU

    # ---- label ---------------------------------------------------------------------------------
    # perfect: positives are S(d) = 1 (the paper); quantile: the top `positive_quantile` of S
    positives: Literal["perfect", "quantile"] = "perfect"
    positive_quantile: float = 0.1
    heldout_fraction: float = 0.1
    min_positives: int = 10

    # ---- train: fastText (the paper: wordNgrams=2, epoch=3, lr=0.1, other fastText defaults) ----------
    ft_word_ngrams: int = 2
    ft_epoch: int = 3
    ft_lr: float = 0.1
    ft_dim: int = 100
    ft_min_count: int = 1
    ft_bucket: int = 2000000
    ft_threads: int = 1                 # 1 = bit-reproducible classifier

    # ---- filter: keep the top `keep_fraction` of the pool's characters, exact global threshold -------
    keep_fraction: float = 0.1
    output_dir: str = ""                # "" = <run_dir>/output
    output_format: Literal["same", "jsonl", "parquet"] = "same"
    output_compression: Literal["same", "none", "gz", "zst"] = "same"
    predict_batch: int = 2048
    histogram_bins: int = 50

    # ---- embedded default: generated world + students ------------------------------------------------
    world: PreSelectWorldConfig = field(default_factory=PreSelectWorldConfig)
    evaluate: bool = True               # train students on random / PreSelect / perplexity-filter selections
    student_order: int = 9
    # random students at these multiples of PreSelect's kept characters: distinct, > 0, any order (the curve the
    # compute multiplier is read from is sorted by budget); debug=smoke keeps the first two
    random_budget_multiples: list = field(default_factory=lambda: [1, 2, 4, 8])
    perplexity_reference: Optional[str] = None   # None = the highest-ability reference
