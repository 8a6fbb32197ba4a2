"""`recipe:` section of `lora_ga` (LoRA-GA, Wang, Yu, Li 2024, arXiv 2407.05000).

Defaults are the paper's / its reference code's (Outsider565/LoRA-GA): direction ArB2r, stable scale with
gamma = 16, eta = alpha / sqrt(r), randomized SVD with q = 4r and 4 power iterations, and a gradient
estimated over 128 samples (the reference's LoraGAConfig: 64 batches of 2; here 8 batches of the trainer's
micro-batch 16 x world size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runx.conf.schema.baselines import LoRAConfig


@dataclass
class LoRAGAConfig(LoRAConfig):
    name: str = "lora_ga"
    # Global batches (trainer.micro_batch_size x grad_accum x world size samples each) whose mean-loss
    # gradients are averaged into the full fine-tuning gradient estimate G.
    grad_batches: int = 8
    # eval: dropout off while estimating G (deterministic, the same G for any number of processes);
    # train: dropout on, as the reference code does.
    estimation_mode: Literal["eval", "train"] = "eval"
    # The precision of the estimation pass. model: the dtype the model computes in (the reference code's choice:
    # fp32 for T5, bf16 for Llama). bf16: autocast to bf16 for an fp32 model, about 2x faster on CPUs with
    # AVX512-BF16 and on tensor cores; the gradients still reach the fp64 sums, the SVD and the offsets in fp32.
    # On the embedded task bf16 moves G by 0.9% (relative norm; top-2r subspace overlap 0.995), another draw of
    # 128 samples by 84% (overlap 0.51): bench/results/lora_ga_init_share.json.
    estimation_dtype: Literal["model", "bf16"] = "model"
    # How the estimation samples (those of the first grad_batches training batches) form micro-batches:
    # by_length groups similar lengths (less padding: the 128 short texts of the embedded task fill 2.8x their
    # tokens with padding in training order); training_order = as training would draw them. With a per-sample
    # mean loss (classification) G is the same either way; with a per-token mean (causal LM) each micro-batch
    # weighs its tokens, so G differs slightly, as it would for any other grouping.
    grad_batching: Literal["by_length", "training_order"] = "by_length"
    # Where the fp64 running sum of each target weight's gradient lives between batches (on the rank owning
    # that layer: 1/world of the sums per rank); the device only holds about one layer's gradient at a time (a
    # hook consumes it as soon as it exists). auto = the compute device on CUDA, host RAM otherwise. In host RAM
    # every micro-batch's gradients cross PCIe and are added by CPU cores: 2.4 ns per weight on 2 cores here, 16 s
    # per micro-batch for a 7B model; on the GPU it is one bandwidth-bound add. The budget below bounds the sums
    # either way.
    grad_accumulator: Literal["auto", "cpu", "device"] = "auto"
    # Most memory the fp64 sums may take per rank: 8 bytes per target weight / world, 52 GB for Llama-2-7B's
    # linear layers on one process. Above it the layers are split into groups, one estimation pass over the same
    # batches each (the same G, more forward passes). auto = half the free memory where the sums live; none =
    # one pass whatever the size; or a size such as 16GB.
    grad_sum_budget: str = "auto"
    # Which singular vectors A and B take (paper: ArB2r = A <- top-r right singular vectors, B <- left singular
    # vectors r+1..2r). Every choice splits the top 2r indices between A and B; the others are ablations.
    direction: Literal["ArB2r", "A2rBr", "ArBr", "random"] = "ArB2r"
    # stable: A, B scaled by d_out^(1/4) / sqrt(gamma) (paper, Alg. 1); unit: orthonormal (ablation "+GA" only)
    scale: Literal["stable", "unit"] = "stable"
    stable_gamma: float = 16.0
    # LoRA scaling eta: rslora = alpha / sqrt(r) (the paper); lora = alpha / r (peft's default, the reference
    # fork's examples without use_rslora)
    scaling: Literal["rslora", "lora"] = "rslora"
    # randomized: Halko et al. range finder with q = min(4r, m, n) and `svd_niter` power iterations (the
    # reference's torch.svd_lowrank call), seeded; exact: torch.linalg.svd
    svd: Literal["randomized", "exact"] = "randomized"
    svd_niter: int = 4
    # Save the init (A0, B0) and re-apply it on resume; also written into every export.
    save_init: bool = True
