"""`recipe:` sections of the baseline recipes (sft, lora)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class SFTConfig:
    name: str = "sft"
    # cls: sequence classification (cross-entropy on labels); lm: next-token loss on the text
    # (prompt tokens masked when the data has a prompt/response split); auto: from model.kind.
    task: Literal["auto", "cls", "lm"] = "auto"
    # use runx.kernels.linear_logprob for the LM loss (no [tokens x vocab] logits)
    fused_logprob: bool = False
    # with fused_logprob: how a bf16/fp16 head's gradient is summed over the row chunks (fp32: an fp32 [V, H] sum
    # rounded once; weight: in the head's dtype, half the bytes, one rounding per chunk, as Liger's FLCE)
    logprob_dw_accum: Literal["fp32", "weight"] = "fp32"
    # with fused_logprob: rows of logits per chunk (null: as many as fit 2^27 fp32 logits, 512 MiB). Fewer rows,
    # less memory: at 8k tokens x 32k vocab, 1024 rows with logprob_dw_accum=weight held 0.17x eager's memory
    logprob_chunk: Optional[int] = None


@dataclass
class LoRAConfig(SFTConfig):
    name: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # module names (peft target_modules); "auto": all linear layers of attention + MLP blocks
    target_modules: list = field(default_factory=lambda: ["auto"])
    # train the classifier head too (sequence classification)
    train_head: bool = True
    # LoRA scaling eta: lora = alpha / r (Hu et al., peft's default); rslora = alpha / sqrt(r) (Kalajdzievski 2023)
    scaling: Literal["lora", "rslora"] = "lora"
    # DoRA (Liu et al. 2024, peft's use_dora): a learned magnitude per output column on top of LoRA's direction
    use_dora: bool = False
