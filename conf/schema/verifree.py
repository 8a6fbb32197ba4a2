"""`recipe:` section of VeriFree (Zhou et al. 2025, arXiv 2505.21493) and its verifier-based baseline.

Defaults follow the reference run (sail-sg/VeriFree run.sh on oat): G=8 samples per question, T=1,
top-p 1, stop at "</answer>", reward R = pi(y*|x,z) (reward_source=p), RLOO baseline on the reasoning
tokens, answer term weighted by R (sft_coef_source=reward), token-sum losses, no KL.
Templates use the literal placeholders `{question}` and `{answer}` (no other brace is special).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

# The paper's prompt, applied by hand to a base model (apply_ours_qwen3_template).
PAPER_PROMPT = ("<|im_start|>user\n{question}\nPlease reason step by step, and put your final answer within "
                "<answer> \\boxed{} </answer>.<|im_end|>\n<|im_start|>assistant\n")
# The embedded default's byte-level model, trained from scratch, gets a short prompt (recipe.prompt_template is
# ${runx_verifree_prompt:${model.name}} in conf/recipe/verifree.yaml: this for that model, the paper's otherwise)
EMBEDDED_MODEL = "tiny_llama_verifree"
SHORT_PROMPT = "Q: {question}\nA: "
# What follows the split "<answer": the reference answer patched in after the sampled reasoning.
PAPER_ANSWER = "> \\boxed{{answer}} </answer>"


@dataclass
class VeriFreeConfig:
    name: str = "verifree"

    # ---- objective -------------------------------------------------------------------------------
    # verifree: R = pi(y*|x,z) from the policy itself; verifier: sample y too, R = 1{boxed answer == y*}
    reward: Literal["verifree", "verifier"] = "verifree"
    # baseline b_i: rloo = mean of the other G-1 rewards; grpo = group mean (no std, = Dr. GRPO's);
    # naive = no baseline. Applied to the reasoning tokens (verifree) or the whole response (verifier).
    advantage: Literal["rloo", "grpo", "naive"] = "rloo"
    # weight of the answer log-likelihood term (verifree only): reward = R_i (paper), one = 1 (JEPO/LaTRO-like),
    # advantage = A_i (the reference code's dataclass default)
    answer_weight: Literal["reward", "one", "advantage"] = "reward"
    # sum: token sums per sequence (the reference); max_len: divide by max_new_tokens (Dr. GRPO)
    loss_norm: Literal["sum", "max_len"] = "sum"
    # k3 KL to the starting (warmed-up) policy; 0 = no reference model at all (the paper)
    kl_coef: float = 0.0
    # drop truncated traces from the loss instead of giving them R=0 (reference: ignore_no_eos=False)
    ignore_truncated: bool = False

    # ---- templates -------------------------------------------------------------------------------
    prompt_template: str = PAPER_PROMPT
    answer_template: str = PAPER_ANSWER
    # the reasoning z ends with this string: split BEFORE the ">" of the opening tag (paper section 2.4); the
    # patched answer is tokenised in context after z's sampled tokens (a token holding both z's end and the
    # answer's start, as SentencePiece's "<answer>", is scored with the answer: recipes/verifree.py in_context)
    answer_split: str = "<answer"
    stop_string: str = "</answer>"

    # ---- rollout ---------------------------------------------------------------------------------
    # the longest prompt (prompt_template with the question) in tokens: longer rows are dropped with a warning;
    # with max_new_tokens, the positions a sequence needs. 1024 as the reference (oat's prompt_max_length); the
    # recipe's config sets 192 for the embedded model (256 positions)
    max_prompt_length: int = 1024
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 3000
    # hf: model.generate with KV cache (works on ZeRO-3 partitioned policies); vllm: needs vllm installed
    rollout_backend: Literal["hf", "vllm"] = "hf"
    vllm_gpu_memory_utilization: float = 0.3    # the colocated vLLM engine's share of GPU memory
    # at most this many sequences per generate call (0 = the whole micro-batch x G at once); a call samples whole
    # groups, so a chunk is at least max(group_size, eval_samples) (smaller values are a config error)
    rollout_chunk: int = 0

    # ---- log-probs -------------------------------------------------------------------------------
    # runx.kernels.linear_logprob on final hidden states (no [tokens x vocab] logits); false = full logits
    fused_logprob: bool = True
    logprob_chunk: Optional[int] = None
    # with fused_logprob and no KL: make the head's gradient in its forward pass from the objective's per-token
    # coefficients (runx.kernels.linear_logprob_weighted_sum, 6·N·H·V FLOPs instead of 8); false = log-probs
    # first, then autograd through the objective (any objective)
    grad_in_forward: bool = True
    # with grad_in_forward: how a bf16/fp16 head's gradient is summed over the row chunks (fp32: an fp32 [V, H]
    # sum rounded once; weight: in the head's dtype, half the bytes, one rounding per chunk, as Liger's FLCE)
    logprob_dw_accum: Literal["fp32", "weight"] = "fp32"
    # with fused_logprob: score the micro-batch's G x prompts sequences packed into as few rows as fit (position
    # ids restarting per sequence; transformers masks them apart), not padded to the longest reasoning
    pack_sequences: bool = False

    # ---- evaluation ------------------------------------------------------------------------------
    # held-out accuracy is greedy ("acc"); with eval_samples > 0 also the mean over that many samples per
    # question at the rollout temperature ("acc_sampled", an estimate of J on held-out questions)
    eval_samples: int = 0
    eval_max_new_tokens: Optional[int] = None   # None = max_new_tokens
    # evaluate the starting (warmed-up) policy once before RL; reported as start/* in the run summary
    eval_before_rl: bool = True

    # ---- supervised warm-up on worked traces (cached in the run dir) -------------------------------
    warmup_steps: int = 0             # 0 = start RL from the model as built / loaded
    warmup_examples: int = 256        # the number of distinct worked traces it sees
    warmup_batch_size: int = 32
    warmup_lr: float = 1e-3
    # fraction of warm-up traces that are flawed, the answer following the flaw (generated task only):
    # early_stop = the reasoning stops after a proper prefix of its steps; slip = one result off by 1-2.
    # A policy that knows how to reason but often errs: the regime where RL has something to fix.
    warmup_corrupt_fraction: float = 0.0
    warmup_corrupt_kind: Literal["early_stop", "slip"] = "early_stop"
    # where the warmed-up weights are cached: relative to the run dir, or an absolute path shared by runs
    warmup_cache: str = "warmup"

    # ---- data ------------------------------------------------------------------------------------
    question_field: str = "question"
    answer_field: str = "answer"
    # the generated arithmetic task (data.kind=generated)
    task_steps: int = 2
    task_max_operand: int = 9
    task_train_size: int = 4000
    task_eval_size: int = 200
    task_seed: int = 1234
