"""`recipe:` section of SwAV (Caron et al. 2020, arXiv 2006.09882).

Defaults are the reference `main_swav.py` values (ResNet-50, ImageNet, 2x224 + 6x96 crops);
conf/recipe/swav.yaml shrinks them to the embedded CPU default (small CNN on generated shapes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SwAVConfig:
    name: str = "swav"

    # ---- multi-crop (one entry per crop group; the first group is the "large" crops) ----------------
    nmb_crops: list = field(default_factory=lambda: [2, 6])
    size_crops: list = field(default_factory=lambda: [224, 96])
    min_scale_crops: list = field(default_factory=lambda: [0.14, 0.05])
    max_scale_crops: list = field(default_factory=lambda: [1.0, 0.14])
    # crops whose codes are computed (and predicted from every other crop): the two large crops
    crops_for_assign: list = field(default_factory=lambda: [0, 1])
    # per-crop augmentation (each applied independently to every crop)
    flip_prob: float = 0.5
    color_jitter: list = field(default_factory=lambda: [0.8, 0.8, 0.8, 0.2])  # brightness, contrast, saturation, hue
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: list = field(default_factory=lambda: [0.1, 2.0])
    normalize_mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    normalize_std: list = field(default_factory=lambda: [0.228, 0.224, 0.225])

    # ---- model ------------------------------------------------------------------------------------------
    hidden_mlp: int = 2048                # 0 = a single linear projection
    feat_dim: int = 128
    nmb_prototypes: int = 3000
    backbone_width: int = 32             # small_cnn channels: w, 2w, 4w, 4w
    head_bn: bool = True                  # BatchNorm in the projection MLP (a collapse remedy is to drop it)
    # small_cnn normalisation layers; "group" keeps samples independent (exact multi-process equivalence on CPU)
    backbone_norm: Literal["batch", "group", "none"] = "batch"
    small_image_stem: bool = False        # resnets: 3x3 stride-1 stem and no max-pool (32 px images)
    sync_bn: bool = True                  # SyncBatchNorm across processes (CUDA only; reference does this)

    # ---- loss ---------------------------------------------------------------------------------------------
    temperature: float = 0.1              # T of the prediction softmax
    epsilon: float = 0.05                 # entropic regularisation of the Sinkhorn codes
    sinkhorn_iterations: int = 3
    # sinkhorn: the method; softmax: ablation without equipartition (codes = softmax(scores / epsilon))
    codes: Literal["sinkhorn", "softmax"] = "sinkhorn"
    # auto: Triton on CUDA, torch otherwise; triton: CUDA only (or TRITON_INTERPRET=1, Triton's CPU interpreter)
    sinkhorn_backend: Literal["auto", "torch", "triton"] = "auto"
    freeze_prototypes_steps: int = 313    # optimizer steps during which prototypes get no gradient
    # 0 = no queue; else at least the global micro-batch (micro_batch_size x processes), rounded down to a multiple
    # of it; each process uses its share, every process keeps (and checkpoints) all shares
    queue_length: int = 0
    queue_start_epoch: int = 15

    # ---- data -----------------------------------------------------------------------------------------------
    # generated datasets (data.kind=generated, data.name=shapes|digits): sizes and side length
    generated_train_size: int = 8000
    generated_eval_size: int = 2000
    generated_image_size: int = 32
    image_field: str = "image"            # HF datasets column holding the image

    # ---- evaluation on frozen backbone features -------------------------------------------------------------
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_train_samples: int = 10000      # labelled training images (no augmentation) for kNN / linear probe
    linear_probe_steps: int = 100         # full-batch L-BFGS iterations of the linear probe
    linear_probe_l2: float = 1e-4
