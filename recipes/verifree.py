"""VeriFree: reinforcing general reasoning without verifiers (Zhou et al. 2025, arXiv 2505.21493).

x question, z reasoning trace, y answer, y* reference answer. With a unique correct answer string the
verifier's expected reward given z is the policy's own probability of y*:

    J(theta) = E_{z ~ pi(.|x)} [ pi(y*|x,z) ]                                              (eq. 1)
    grad J   = E_z [ R(z) (grad log pi(z|x) + grad log pi(y*|x,z)) ],   R(z) = pi(y*|x,z)   (eq. 2)

One step on a micro-batch of prompts (VeriFree.loss, top to bottom):
  1. rollout: G traces per question, sampled until the closing answer tag            (sample_responses)
  2. cut each trace before the ">" of "<answer", append the reference answer        (build_verifree_sequences)
     -> the sequence the policy reads had it written y* after z: the prompt's and z's sampled tokens, then
        the answer tokenised in context (the whole text tokenised once, roles by character offsets), so that
        R scores the tokens a model writing "<answer> \\boxed{y*} </answer>" after z would produce, for
        byte-level BPE (Qwen, Llama-3) and SentencePiece-style tokenizers (Llama-2, Mistral) alike   (in_context)
  3. one forward: per-token log-probs of z and of the answer from the final hidden states with the
     fused kernel, no [tokens x vocab] logits                                        (sequence_logprobs)
  4. R_i = exp(sum_answer log pi) in [0, 1]; 0 without an answer tag or when truncated  (verifree_rewards)
  5. loss = mean_i [ -(R_i - b_i) sum_z log pi  -  R_i sum_answer log pi ],  b_i = RLOO baseline
                                                                                      (verifree_loss)
     whose gradient is minus the estimator of eq. 2:
         g = 1/G sum_i [ (R_i - b_i) grad log pi(z_i|x) + R_i grad log pi(y*|x,z_i) ]
  The trainer then does one on-policy optimizer step (grad clipping in the DeepSpeed config).

`reward=verifier` is the baseline the paper compares with: the same loop with the answer sampled too,
R_i = 1{boxed answer == y*}, and the (RLOO / Dr. GRPO) advantage on the whole response (verifier_loss).
Its gradient has the same mean as VeriFree's and a larger variance: VeriFree's estimator is its
Rao-Blackwellisation over y (Theorem 1).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass

import torch

from runx.recipes.sft import (ExportsTokenizer, causal_lm_tokenizer, check_fused_head, check_packed_attention,
                              check_positions, check_positions_from_config, model_config)
from runx.recipes.text_data import (first_fit, held_out_split, load_hf_splits, read_local_splits, require_rows,
                                   with_offsets)
from runx.recipes.verifree_task import ArithmeticTask, QADataset, corrupt_trace, qa_rows, split_rows
from runx.trainers.recipe import RecipeConfigError, TrainingRecipe

log = logging.getLogger("runx.verifree")


# =====================================================================================================
# Templates and the answer boundary
# =====================================================================================================

def fill(template: str, **values: str) -> str:
    """Replace the literal placeholders {question} / {answer}; other braces (\\boxed{}) stay as they are."""
    for key, val in values.items():
        template = template.replace("{" + key + "}", val)
    return template


def split_before_answer(text: str, split: str) -> str | None:
    """The reasoning z of a sampled response: everything up to and including `split` ("<answer"),
    or None when the response never opened the answer tag. Splitting before the ">" (not after
    "<answer>") is the paper's choice (section 2.4): the patched answer starts with ">", and with a
    byte-level BPE "<answer" and ">" are separate tokens, so z keeps its sampled tokens."""
    idx = text.find(split)
    return None if idx < 0 else text[:idx] + split


_BOXED = re.compile(r"\\boxed\{(.*)\}", re.S)


def extract_answer(response: str, split: str, stop: str) -> str | None:
    """The answer a response gives: the \\boxed{...} content after the opening answer tag (None if absent)."""
    idx = response.find(split)
    if idx < 0:
        return None
    seg = response[idx + len(split):]
    end = seg.find(stop)
    if end >= 0:
        seg = seg[:end]
    m = _BOXED.search(seg)
    return m.group(1).strip() if m else None


# =====================================================================================================
# The estimator (eq. 2) on per-sequence token sums. Pure tensor code: the toy-policy test uses it too.
# =====================================================================================================

def group_baseline(rewards: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """b_i from the other samples of the same question (rows are grouped G at a time).
    rloo: mean of the other G-1 rewards (unbiased: b_i independent of sample i)
    grpo: the group mean, including i (Dr. GRPO's advantage, no std division)
    naive: 0"""
    if kind == "naive":
        return torch.zeros_like(rewards)
    r = rewards.view(-1, group_size)
    if kind == "rloo":
        if group_size < 2:
            raise ValueError("recipe.advantage=rloo needs recipe.group_size >= 2")
        b = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    elif kind == "grpo":
        b = r.mean(1, keepdim=True).expand_as(r)
    else:
        raise ValueError(f"recipe.advantage={kind!r}: valid choices are 'rloo', 'grpo', 'naive'")
    return b.reshape(-1)


def verifree_rewards(answer_logp_sum: torch.Tensor, has_answer: torch.Tensor) -> torch.Tensor:
    """R_i = pi(y*|x,z_i) = exp(sum of the answer tokens' log-probs); 0 for traces without a usable
    answer (no tag, truncated, too long). Detached: R is a weight, not a path for the gradient."""
    lp = answer_logp_sum.detach().float()
    return torch.where(has_answer, lp.clamp(max=0.0).exp(), torch.zeros_like(lp))


def verifree_loss(think_logp_sum: torch.Tensor, answer_logp_sum: torch.Tensor, rewards: torch.Tensor,
                  group_size: int, advantage: str = "rloo", answer_weight: str = "reward",
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """mean_i valid_i * [ -A_i * sum_z log pi  -  w_i * sum_answer log pi ]   (the reference's token sums)

    A_i = R_i - b_i (baseline on the reasoning term only); w_i = R_i (paper), 1, or A_i."""
    adv = rewards - group_baseline(rewards, group_size, advantage)
    w = {"reward": rewards, "one": torch.ones_like(rewards), "advantage": adv}.get(answer_weight)
    if w is None:
        raise ValueError(f"recipe.answer_weight={answer_weight!r}: valid choices are 'reward', 'one', 'advantage'")
    valid = torch.ones_like(rewards) if valid is None else valid.to(rewards.dtype)
    pg = -(adv.detach() * think_logp_sum)                 # REINFORCE on z with the leave-one-out baseline
    ans = -(w.detach() * answer_logp_sum)                 # R-weighted log-likelihood of the reference answer
    loss = (valid * (pg + ans)).sum() / rewards.numel()
    return loss, {"loss_pg": float((valid * pg).detach().sum() / rewards.numel()),
                  "loss_answer": float((valid * ans).detach().sum() / rewards.numel())}


def verifier_loss(response_logp_sum: torch.Tensor, rewards: torch.Tensor, group_size: int,
                  advantage: str = "rloo", valid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """mean_i valid_i * [ -A_i * sum_{z,y} log pi ],  A_i = r_i - b_i: REINFORCE with a binary verifier."""
    adv = rewards - group_baseline(rewards, group_size, advantage)
    valid = torch.ones_like(rewards) if valid is None else valid.to(rewards.dtype)
    pg = -(adv.detach() * response_logp_sum)
    loss = (valid * pg).sum() / rewards.numel()
    return loss, {"loss_pg": float(loss.detach())}


# =====================================================================================================
# Rollout: G samples per question with HF generate (KV cache), stopping at the closing answer tag
# =====================================================================================================

@dataclass
class Response:
    prompt_index: int      # which question of the micro-batch
    ids: list              # sampled token ids (through the stop string / eos; pads removed)
    text: str              # decoded response, cut after the first stop string
    finish: str            # "stop" (closing tag), "eos", or "length" (hit max_new_tokens: truncated)


def unwrap(model):
    """The HF model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def is_zero3_partitioned(module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


class StopOnString:
    """Per-sequence stopping criterion: true once the decoded tail contains the stop string."""

    def __init__(self, tokenizer, stop: str, prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len
        self.tail = max(1, len(stop))

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        gen = input_ids[:, self.prompt_len:]
        if gen.shape[1] == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tails = self.tokenizer.batch_decode(gen[:, -self.tail:], skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in tails], dtype=torch.bool, device=input_ids.device)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The token ids the policy reads for each rendered prompt: with the tokenizer's special tokens (its BOS),
    except for a prompt that already starts with the BOS text (a template written from the model's own format,
    "<s>[INST] ..." or "<|begin_of_text|>..."), which would otherwise read BOS twice. The rollout, the scored
    sequences, the warm-up and the prompt-length check all read prompts through this."""
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and p.startswith(bos) for p in prompts]
    out: list = [None] * len(prompts)
    for flag in (False, True):
        idx = [i for i, h in enumerate(has_bos) if h == flag]
        if idx:
            for i, ids in zip(idx, tokenizer([prompts[i] for i in idx], add_special_tokens=not flag).input_ids):
                out[i] = list(ids)
    return out


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] input ids left-padded with pad_id (generate continues every row at the right end) and the mask."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):] = torch.tensor(r)
            attn[i, T - len(r):] = 1
    return ids, attn


def rollout_generation_config(tokenizer, group_size: int, temperature: float, top_p: float, max_new_tokens: int):
    """The recipe's sampling settings and nothing else: plain sampling at `temperature` with nucleus `top_p`
    (greedy at temperature 0), the tokenizer's pad / eos / bos. Whatever the checkpoint's generation_config.json
    holds (Qwen2.5-Instruct's repetition_penalty 1.05, a no_repeat_ngram_size, min_new_tokens, top_k 20 ...)
    must not apply: the rollouts would come from another distribution than the policy the loss scores (a biased
    gradient), and the greedy evaluation would not be greedy."""
    from transformers import GenerationConfig
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, num_return_sequences=group_size, use_cache=True,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id, **sampling)


@torch.no_grad()
def sample_responses(policy, tokenizer, prompts: list[str], group_size: int, temperature: float, top_p: float,
                     max_new_tokens: int, stop: str, chunk: int = 0) -> list[Response]:
    """G responses per prompt, in prompt order (rows g*G .. g*G+G-1 belong to prompt g).

    Sampled with rollout_generation_config only: transformers fills every setting a generation config leaves
    unset from the model's own generation_config (the checkpoint's file), so the model's is swapped for an empty
    one for the call. On a ZeRO-3 partitioned policy every rank must run the same number of forward passes, so
    generation keeps stepping until all ranks finish (synced_gpus) when more than one rank exists."""
    import torch.distributed as dist
    from transformers import GenerationConfig, StoppingCriteriaList

    device = next(policy.parameters()).device
    synced = is_zero3_partitioned(policy) and dist.is_available() and dist.is_initialized() \
        and dist.get_world_size() > 1
    was_training = policy.training
    policy.eval()
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    end_ids = {i for i in (pad_id, eos_id) if i is not None}
    per_call = max(1, (chunk or len(prompts) * group_size) // group_size)
    config = rollout_generation_config(tokenizer, group_size, temperature, top_p, max_new_tokens)
    model_config = getattr(policy, "generation_config", None)
    out: list[Response] = []
    try:
        if model_config is not None:
            policy.generation_config = GenerationConfig()
        for start in range(0, len(prompts), per_call):
            input_ids, attn = left_pad(encode_prompts(tokenizer, prompts[start:start + per_call]), pad_id)
            input_ids, attn = input_ids.to(device), attn.to(device)
            plen = input_ids.shape[1]
            seqs = policy.generate(
                input_ids=input_ids, attention_mask=attn, generation_config=config,
                stopping_criteria=StoppingCriteriaList([StopOnString(tokenizer, stop, plen)]), synced_gpus=synced)
            for row, gen in enumerate(seqs[:, plen:].tolist()):
                ids, finish = [], "length"
                for t in gen:
                    if t in end_ids:
                        # a sampled eos is trained on; generate's fill after the stop string is not, also where the
                        # tokenizer pads with its eos (Qwen base, Llama without a pad token)
                        if t == eos_id and stop not in tokenizer.decode(ids, skip_special_tokens=True):
                            ids.append(t)
                        finish = "eos"
                        break
                    ids.append(t)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                cut = text.find(stop)
                if cut >= 0:
                    text, finish = text[:cut + len(stop)], "stop"
                out.append(Response(start + row // group_size, ids, text, finish))
    finally:
        if model_config is not None:
            policy.generation_config = model_config
        policy.train(was_training)
    return out


# =====================================================================================================
# Sequences: prompt + z + reference answer (VeriFree) or prompt + sampled response (verifier)
# =====================================================================================================

THINK, ANSWER = 1, 2   # token roles: which sum a scored token belongs to


@dataclass
class ScoredBatch:
    input_ids: torch.Tensor      # [N, T] right-padded
    attention_mask: torch.Tensor
    role: torch.Tensor           # [N, T] 0 = prompt/pad (not scored), THINK, ANSWER: role of token t
    has_answer: torch.Tensor     # [N] bool: a usable answer segment (R may be > 0)
    truncated: torch.Tensor      # [N] bool


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


_WARNED: set = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)   # as a Response's text is decoded


def _whole_chars(text: str) -> bool:
    """Whether a decoded prefix ends on a character boundary: a byte-level token can end inside a multi-byte
    character ("×", "π", CJK), which decodes to U+FFFD until the next token completes it."""
    return not text.endswith("\ufffd")


def sampled_within(tokenizer, sampled: list[int], z: str) -> int:
    """How many leading sampled tokens lie wholly inside z: the longest prefix whose text is a prefix of z and
    ends on a character boundary (a binary search on the decoded prefixes, each read up to its last whole
    character so that the test is monotonic in the prefix length)."""
    lo, hi = 0, len(sampled)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if z.startswith(_decode(tokenizer, sampled[:mid]).rstrip("\ufffd")):
            lo = mid
        else:
            hi = mid - 1
    while lo > 0 and not _whole_chars(_decode(tokenizer, sampled[:lo])):
        lo -= 1
    return lo


def _token_starting_at(offsets: list[tuple[int, int]], b: int) -> int | None:
    """The index of the token that starts at character b, if no token of the text crosses b (else None)."""
    for i, (s, e) in enumerate(offsets):
        if e > b:
            return i if s == b else None
    return None


def in_context(tokenizer, prompt: str, sampled: list[int], z: str, answer: str) -> tuple[list[int], list[int]]:
    """(z tokens, answer tokens) of `prompt` + `z` + `answer` as the policy reads them: the tokens a model that
    wrote the sampled ids (whose text begins z) and then the rest of z and the answer would have produced.

    The sampled tokens that lie wholly inside z are kept as sampled (the REINFORCE term scores what was
    sampled). The whole text is tokenised once (a fast tokenizer's character offsets) and its tokens from where
    the kept ones end are taken in context: no piece gains what a tokenizer adds at the start of a string
    (tokenised apart, SentencePiece's "▁" before the patched ">" made R score "<answer > \\boxed{..}", a text the
    model never writes), and z's closing "<answer" merges with the answer's ">" where the tokenizer merges them
    ("<answer>" is one token in Llama-2 / Mistral style vocabularies).
    Roles by offsets: a token that ends inside z is a z token; the first token holding a character of the answer
    and every later one are answer tokens. So a token straddling the boundary (that "<answer>") goes with the
    answer: R = pi(y*|x,z) must score the model's choice to open the answer as the reference does, and that
    choice is this token. Where a token of the whole text crosses the point where the kept sampled tokens end,
    fewer are kept (the rest of z re-tokenised, as the reference re-tokenises all of z).

    A tokenizer without offsets (a slow one), or no common token boundary: the sampled tokens inside z, the rest
    of z and the answer tokenised apart (the reference's rule, exact for byte-level BPE); warned once where
    those pieces do not decode to the text."""
    k = sampled_within(tokenizer, sampled, z)
    enc = with_offsets(tokenizer, prompt + z + answer)
    if enc is not None:
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        z_end = len(prompt) + len(z)
        for j in range(k, -1, -1):
            head = _decode(tokenizer, sampled[:j])
            if not _whole_chars(head):
                continue
            first = _token_starting_at(offsets, len(prompt) + len(head))
            if first is not None:
                n_z = first + sum(1 for _, e in offsets[first:] if e <= z_end)
                return list(sampled[:j]) + ids[first:n_z], ids[n_z:]
    head = _decode(tokenizer, sampled[:k])
    think, ans = list(sampled[:k]) + _encode(tokenizer, z[len(head):]), _encode(tokenizer, answer)
    scored = _decode(tokenizer, think + ans)
    if scored != z + answer:
        _warn_once("apart", "%s gives no character offsets (a slow tokenizer), or none where the sampled tokens "
                   "end, so the end of the reasoning and the reference answer were tokenised apart, and the "
                   "pieces do not decode to the text (...%r, not ...%r): R = pi(y*|x,z) then scores tokens the "
                   "model would not write. A fast tokenizer tokenises them in context", type(tokenizer).__name__,
                   scored[-40:], (z + answer)[-40:])
    return think, ans


def pack(prompt_ids: list[list[int]], segments: list[list[tuple[list[int], int]]], pad_id: int) -> tuple:
    """Right-padded [prompt | seg_1 | seg_2 ...] rows and the per-token role tensor."""
    rows, roles = [], []
    for p, segs in zip(prompt_ids, segments):
        ids, role = list(p), [0] * len(p)
        for seg, r in segs:
            ids += seg
            role += [r] * len(seg)
        rows.append(ids)
        roles.append(role)
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    role = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, rl) in enumerate(zip(rows, roles)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attn[i, :len(ids)] = 1
        role[i, :len(rl)] = torch.tensor(rl)
    return input_ids, attn, role


def build_verifree_sequences(tokenizer, prompts: list[str], responses: list[Response], references: list[str],
                             answer_template: str, split: str, max_new_tokens: int) -> ScoredBatch:
    """prompt + z_i + patched reference answer: z_i = response text up to and including "<answer", answer =
    "> \\boxed{y*} </answer>", as the policy reads them (prompt ids as sampled, z's sampled tokens, the answer
    tokenised in context: `in_context`). A response that never opened the tag keeps its sampled ids as z and has
    no answer (R=0); one that hit max_new_tokens, or whose z + answer is longer than max_new_tokens, is
    truncated (R=0)."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    segs, has_answer, truncated = [], [], []
    for r in responses:
        trunc = r.finish == "length"
        z = split_before_answer(r.text, split)
        if z is not None:
            answer = fill(answer_template, answer=references[r.prompt_index])
            think, ans = in_context(tokenizer, prompts[r.prompt_index], list(r.ids), z, answer)
            trunc = trunc or len(think) + len(ans) > max_new_tokens
            segs.append([(think, THINK), (ans, ANSWER)])
            has_answer.append(not trunc)
        else:
            segs.append([(list(r.ids), THINK)])
            has_answer.append(False)
        truncated.append(trunc)
    input_ids, attn, role = pack([prompt_ids[r.prompt_index] for r in responses], segs, tokenizer.pad_token_id)
    return ScoredBatch(input_ids, attn, role, torch.tensor(has_answer), torch.tensor(truncated))


def build_response_sequences(tokenizer, prompts: list[str], responses: list[Response]) -> ScoredBatch:
    """prompt + the sampled response ids, all scored as one segment (the verifier baseline)."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    segs = [[(list(r.ids), THINK)] for r in responses]
    input_ids, attn, role = pack([prompt_ids[r.prompt_index] for r in responses], segs, tokenizer.pad_token_id)
    trunc = torch.tensor([r.finish == "length" for r in responses])
    return ScoredBatch(input_ids, attn, role, ~trunc, trunc)


# =====================================================================================================
# Log-probs of given tokens from the final hidden states (no full-vocab logits over the sequence)
# =====================================================================================================

def decoder_hidden(policy, ids: torch.Tensor, attn: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """The decoder's final hidden states [N, T, H] for right-padded rows. packed: the N sequences first go into
    as few rows of width T as fit (`first_fit`), position ids restarting per sequence so that
    transformers masks each off from the others; the states come back in the [N, T] layout (zeros at padding).
    The G sequences of a group vary in length (their reasoning), so the padded layout computes many pad tokens."""
    dec = policy.get_decoder()
    if not packed:
        return dec(input_ids=ids, attention_mask=attn).last_hidden_state
    n, width = ids.shape
    lengths = attn.sum(1).tolist()
    row_of, offset, used = first_fit(lengths, width)
    rows = len(used)
    # flat packed position of every real token, in the row-major order of attn's ones
    at = torch.cat([r * width + o + torch.arange(k) for r, o, k in zip(row_of, offset, lengths)]).to(ids.device)
    pos_in_seq = torch.cat([torch.arange(k) for k in lengths]).to(ids.device)
    real = attn.bool()
    flat_ids = torch.full((rows * width,), int(ids[~real][0]) if (~real).any() else 0, dtype=ids.dtype,
                          device=ids.device)
    flat_ids[at] = ids[real]
    flat_pos = torch.zeros(rows * width, dtype=torch.long, device=ids.device)
    for r, u in enumerate(used):                           # padding after a row's sequences: its own positions
        flat_pos[r * width + u:(r + 1) * width] = torch.arange(width - u, device=ids.device)
    flat_pos[at] = pos_in_seq
    hidden = dec(input_ids=flat_ids.view(rows, width), position_ids=flat_pos.view(rows, width),
                 use_cache=False).last_hidden_state
    out = hidden.new_zeros(n, width, hidden.shape[-1])
    return out.masked_scatter(real[..., None], hidden.reshape(rows * width, -1)[at])


def _head_logprob(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                  chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_logprob through the LM-head *module*: calling the module (not reading head.weight) lets
    ZeRO-3 gather the partitioned weight for the call and route its gradient back to the partition."""
    from runx.kernels import linear_logprob
    from runx.trainers.hf import through_module
    return through_module(head, lambda h: linear_logprob(h, head.weight, targets, bias=getattr(head, "bias", None),
                                                         temperature=temperature, chunk=chunk,
                                                         return_entropy=True), hidden)


def _head_weighted_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                       temperature: float, chunk: int | None, dw_accum: str = "fp32"):
    """linear_logprob_weighted_sum through the LM-head module (the ZeRO-3 gather, as _head_logprob)."""
    from runx.kernels import linear_logprob_weighted_sum
    from runx.trainers.hf import through_module
    return through_module(head, lambda h: linear_logprob_weighted_sum(
        h, head.weight, targets, weights, bias=getattr(head, "bias", None), temperature=temperature, chunk=chunk,
        return_logp=True, return_entropy=True, dw_accum=dw_accum), hidden)


def linear_objective_logprobs(policy, batch: ScoredBatch, objective, temperature: float = 1.0,
                              chunk: int | None = None, packed: bool = False, dw_accum: str = "fp32"):
    """The loss ``objective(think_lp, answer_lp)`` and the [N, T] log-probs / entropies, for an objective that
    is linear in the two per-sequence log-prob sums once the rewards are fixed (VeriFree's and the verifier
    baseline's without KL). Its gradient is made during the head's forward pass (6·N·H·V FLOPs, not 8):

    1. the answer tokens' log-probs alone, without gradient (a few tokens per sequence): they fix R;
    2. the objective's coefficient for each sequence's two sums, by autograd on the objective itself
       (``objective`` is the same function the unfused path calls, so the two paths cannot disagree);
    3. one weighted-sum pass over every scored token with those coefficients as token weights (``dw_accum``:
       how the head's gradient is summed, as in ``linear_logprob_weighted_sum``).
    ``objective(think_lp, answer_lp, answer_lp_detached) -> (loss, parts)`` must not depend on think_lp
    except linearly; the value returned is re-evaluated on the final log-probs (for the logged parts)."""
    device = next(policy.parameters()).device
    ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
    scored = batch.role[:, 1:].to(device) > 0
    targets = ids[:, 1:][scored]
    role = batch.role[:, 1:].to(device)[scored]
    seq = torch.arange(ids.shape[0], device=device)[:, None].expand_as(scored)[scored]
    hidden = decoder_hidden(policy, ids, attn, packed)
    h = hidden[:, :-1][scored]
    head = policy.get_output_embeddings()
    n = ids.shape[0]
    is_ans = role == ANSWER
    with torch.no_grad():                                                          # 1.
        lp_ans, _ = _head_logprob(head, h[is_ans].detach(), targets[is_ans], temperature, chunk)
    answer_lp = torch.zeros(n, device=device).index_add_(0, seq[is_ans], lp_ans.float())
    think_x = torch.zeros(n, device=device, requires_grad=True)                    # 2.
    answer_x = answer_lp.clone().requires_grad_()
    probe, _ = objective(think_x, answer_x, answer_lp)
    c_think, c_ans = torch.autograd.grad(probe, [think_x, answer_x], allow_unused=True)
    c_think = torch.zeros(n, device=device) if c_think is None else c_think
    c_ans = torch.zeros(n, device=device) if c_ans is None else c_ans
    weights = torch.where(is_ans, c_ans[seq], c_think[seq])
    loss, lp, ent = _head_weighted_sum(head, h, targets, weights, temperature, chunk, dw_accum)   # 3.
    return (loss, *_per_position(scored, lp, ent))


def _per_position(scored: torch.Tensor, lp: torch.Tensor, ent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored tokens' log-probs / entropies as [N, T] (0 elsewhere; position t holds input_ids[:, t]'s), from
    `scored` = role[:, 1:] > 0 (token t+1 is predicted at position t); the entropies detached."""
    n = scored.shape[0]
    where = torch.cat([torch.zeros((n, 1), dtype=torch.bool, device=scored.device), scored], dim=1)
    zeros = torch.zeros(where.shape, dtype=torch.float32, device=scored.device)
    return zeros.masked_scatter(where, lp.float()), zeros.masked_scatter(where, ent.detach().float())


def sequence_logprobs(policy, batch: ScoredBatch, temperature: float = 1.0, fused: bool = True,
                      chunk: int | None = None, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token_t | prefix) and the entropy of that distribution for every scored token, as [N, T]
    (0 elsewhere; position t holds the log-prob of input_ids[:, t]).

    fused: final hidden states -> runx.kernels.linear_logprob at the scored positions only;
    otherwise the model's full logits (the unfused baseline, [N, T, V] in memory)."""
    device = next(policy.parameters()).device
    ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
    scored = batch.role[:, 1:].to(device) > 0            # token t+1 is predicted from position t
    targets = ids[:, 1:][scored]
    if fused:
        hidden = decoder_hidden(policy, ids, attn, packed)
        h = hidden[:, :-1][scored]
        lp, ent = _head_logprob(policy.get_output_embeddings(), h, targets, temperature, chunk)
    else:
        logits = policy(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
        logz = torch.log_softmax(logits, dim=-1)
        lp = logz[scored].gather(-1, targets[:, None]).squeeze(-1)
        ent = -(logz[scored].exp() * logz[scored]).sum(-1)
    return _per_position(scored, lp, ent)


# =====================================================================================================
# Supervised warm-up on worked traces (cached), then the recipe
# =====================================================================================================

def warmup_texts(rows: list[dict], cfg, seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompt, target) pairs of the worked traces: target = trace + "<answer" + patched answer, the same
    segmentation the RL sequences use. A fraction cfg.warmup_corrupt_fraction get one arithmetic slip."""
    import random
    rng = random.Random(seed)
    prompts, targets = [], []
    for r in rows:
        if cfg.warmup_corrupt_fraction > 0 and "trace" in r and rng.random() < cfg.warmup_corrupt_fraction:
            r = corrupt_trace(r, rng, cfg.warmup_corrupt_kind)
        if "trace" not in r:
            raise ValueError("recipe.warmup_steps > 0 needs worked traces: a 'trace' field in the data "
                             "(the generated task has one; set recipe.warmup_steps=0 for data without)")
        prompts.append(fill(cfg.prompt_template, question=r["question"]))
        targets.append(r["trace"] + cfg.answer_split + fill(cfg.answer_template, answer=r["answer"]))
    return prompts, targets


class VeriFree(ExportsTokenizer, TrainingRecipe):
    throughput_unit = "tokens"

    def __init__(self, cfg, run_dir: str):
        if cfg.get("smoke"):
            # debug=smoke: the same pipeline in seconds (tiny data, a few warm-up steps, short rollouts), on a copy:
            # the run's own config (config.yaml, the resume check) keeps the values it was composed with
            import copy
            cfg = copy.deepcopy(cfg)
        super().__init__(cfg, run_dir)
        self.rc = cfg.recipe
        rc = self.rc
        if cfg.get("smoke"):
            from omegaconf import open_dict
            with open_dict(rc):
                rc.warmup_steps = min(rc.warmup_steps, 5)
                rc.warmup_examples = min(rc.warmup_examples, 16)
                rc.warmup_batch_size = min(rc.warmup_batch_size, 4)
                rc.task_train_size = min(rc.task_train_size, 64)
                rc.task_eval_size = min(rc.task_eval_size, 8)
                rc.group_size = min(rc.group_size, 2)
                rc.max_new_tokens = min(rc.max_new_tokens, 24)
                rc.eval_samples = min(rc.eval_samples, 1)
        if rc.group_size < 1 or (rc.advantage == "rloo" and rc.group_size < 2):
            raise ValueError(f"recipe.group_size={rc.group_size}: must be >= 2 with recipe.advantage=rloo")
        chunk, least = rc.rollout_chunk, max(int(rc.group_size), int(rc.eval_samples))
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0 or 0 < chunk < least:
            # a generate call samples whole groups (all the sequences of a prompt): below the largest group the
            # chunk could not keep its limit, the call would make a whole group anyway
            raise ValueError(f"recipe.rollout_chunk={chunk}: at most this many sequences per generate call, and a "
                             f"call samples whole groups (recipe.group_size={rc.group_size} per training prompt, "
                             f"recipe.eval_samples={rc.eval_samples} per held-out one). Valid values: 0 (the whole "
                             f"micro-batch at once) or >= {least}")
        if not rc.temperature > 0:
            raise ValueError(f"recipe.temperature={rc.temperature}: RL sampling needs a temperature > 0")
        if "{question}" not in rc.prompt_template:
            raise ValueError("recipe.prompt_template must contain the placeholder {question}")
        if "{answer}" not in rc.answer_template:
            raise ValueError("recipe.answer_template must contain the placeholder {answer}")
        if cfg.model.kind != "causal_lm":
            raise ValueError(f"model.kind={cfg.model.kind!r}: verifree needs a causal_lm")
        from runx.trainers.recipe import params_on_nvme
        if (rc.warmup_steps > 0 or rc.kl_coef > 0) and params_on_nvme(cfg):
            # parameters on NVMe are always built partitioned: the warm start and the KL anchor need the whole
            # state dict before the engine exists (every other run that needs them is built whole)
            t = cfg.trainer
            which = (f"recipe.warmup_steps={rc.warmup_steps}" if rc.warmup_steps > 0 else
                     f"recipe.kl_coef={rc.kl_coef}")
            raise ValueError(f"{which} with parameters on NVMe (trainer.offload_param={t.offload_param}): the "
                             "supervised warm-up and the KL anchor need the whole weights before the engine exists, "
                             "and NVMe parameters are built partitioned. Valid choices: recipe.warmup_steps=0 and "
                             "recipe.kl_coef=0 (warm up once elsewhere and start from that checkpoint with "
                             "model.path=...), or a trainer without parameter offload to NVMe (zero3, "
                             "zero3_cpu_offload)")
        self.tokenizer = causal_lm_tokenizer(cfg.model)
        self.hf_config = model_config(cfg.model)   # (read once for the checks below; None: not readable here)
        # a prompt of up to recipe.max_prompt_length tokens (longer ones are dropped: prompt_rows) and the answer:
        # the positions a sequence needs (a model with learned positions has no more)
        check_positions_from_config(cfg.model, self.max_positions(), self.positions_key(), conf=self.hf_config)
        if rc.fused_logprob:
            check_fused_head(self.hf_config, "recipe.fused_logprob")
        self._rows = None if cfg.data.kind in ("generated", "builtin") else self.read_data()
        self._tokens = 0
        self._held_out = None
        self._start_metrics: dict = {}
        self._eval_start = False     # set by prepare() on a fresh run with eval_before_rl; done in after_engine
        self._ref_model = None
        self._vllm = None

    # ---- building --------------------------------------------------------------------------------
    def max_positions(self) -> int:
        """The longest sequence: a prompt of recipe.max_prompt_length tokens and the longest answer sampled."""
        rc = self.rc
        return int(rc.max_prompt_length) + max(int(rc.max_new_tokens), int(rc.eval_max_new_tokens or 0))

    def positions_key(self) -> str:
        longest = "eval_max_new_tokens" if int(self.rc.eval_max_new_tokens or 0) > int(self.rc.max_new_tokens) \
            else "max_new_tokens"
        return f"recipe.max_prompt_length + recipe.{longest}"

    def build_model(self):
        from runx.trainers.hf import load_model
        model = load_model(self.cfg.model, tokenizer=self.tokenizer)
        check_positions(model, self.max_positions(), self.positions_key())
        if self.rc.pack_sequences:
            check_packed_attention(model, "recipe.pack_sequences")
        return model

    # ---- for `runx plan` ------------------------------------------------------------------------------
    def plan_batch(self) -> tuple[int, int, bool]:
        """One micro-batch trains micro_batch_size x G sequences of prompt + sampled tokens (the prompt bounded,
        for the plan, by recipe.max_prompt_length); the fused head holds one chunk of logits at a time."""
        rc = self.rc
        return (int(self.cfg.trainer.micro_batch_size) * int(rc.group_size),
                int(self.rc.max_prompt_length) + int(rc.max_new_tokens), not rc.fused_logprob)

    def extra_memory(self, model, world: int, available: dict, cuda: bool = False) -> dict:
        """Device memory besides the trainer's, per rank: the rollout's KV cache (HF generate, one call of
        rollout_chunk or micro-batch x G sequences) or the colocated vLLM engine's share, and the KL reference
        copy of the weights."""
        rc, c = self.rc, model.config
        seqs, tokens, _ = self.plan_batch()
        terms = {}
        if rc.rollout_backend == "vllm":
            terms["vLLM engine (rollouts)"] = int(rc.vllm_gpu_memory_utilization * available["device"])
        else:
            per_call = max(1, (int(rc.rollout_chunk) or seqs) // int(rc.group_size)) * int(rc.group_size)
            heads = getattr(c, "num_attention_heads", 1)
            kv = getattr(c, "num_key_value_heads", None) or heads
            head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
            low = self.cfg.trainer.precision in ("bf16", "amp_bf16") or next(model.parameters()).element_size() == 2
            per_token = 2 * c.num_hidden_layers * kv * head_dim * (2 if low else 4)   # K and V, every layer
            terms[f"rollout KV cache ({per_call} sequences x {tokens} tokens)"] = per_call * tokens * per_token
        if rc.kl_coef > 0:
            terms["KL reference model"] = sum(p.numel() * p.element_size() for p in model.parameters())
        return {"device": terms}

    def read_data(self) -> tuple[list[dict], list[dict]]:
        """(train, held-out) {question, answer[, trace]} rows of the user's data: JSONL / Parquet / CSV files
        (a folder holding <data.train_split>.<ext> and <data.eval_split>.<ext> is read as those splits) or a HF
        dataset; without a held-out split, data.val_fraction of train. Read by the constructor, so that a data
        problem is reported before the model is built."""
        rc, data = self.rc, self.cfg.data
        kinds = ("generated", "builtin", "jsonl", "parquet", "csv", "hf")
        if data.kind not in kinds:
            raise ValueError(f"data.kind={data.kind}: verifree reads question/answer rows. Valid choices: "
                             f"{', '.join(kinds)} (generated = the arithmetic task).")
        qa = lambda rows, src: qa_rows(rows, src, rc.question_field, rc.answer_field)   # noqa: E731
        held_out = None
        if data.kind == "hf":
            src = data.hf_name or data.path
            ds = load_hf_splits(src, data.train_split, data.extra)
            train_src = f"{src}[{data.train_split}]"
            train = qa(ds[data.train_split], train_src)
            split = held_out_split(ds, data, src)
            if split:
                held_src = f"{src}[{split}]"
                held_out = qa(ds[split], held_src)
        else:
            train, held_out = read_local_splits(data)
            train_src, held_src = data.path, data.get("eval_path") or data.path
            train = qa(train, train_src)
            held_out = qa(held_out, held_src) if held_out is not None else None
        require_rows(train, data)
        train = self.prompt_rows(train, str(train_src))
        if held_out is not None:
            held_out = self.prompt_rows(held_out, str(held_src), held_out=True)
        if held_out is None:
            train, held_out = split_rows(train, data.val_fraction, int(self.cfg.seed))
        if rc.warmup_steps > 0:
            bad = next((i for i, r in enumerate(train[:rc.warmup_examples]) if "trace" not in r), None)
            if bad is not None:
                raise ValueError(f"recipe.warmup_steps={rc.warmup_steps}: the supervised warm-up trains on worked "
                                 f"traces, and training row {bad + 1} has no 'trace' field. Set "
                                 f"recipe.warmup_steps=0 (its default for any data but data=verifree_arith), "
                                 f"or add a 'trace' field to the rows.")
        return train, held_out

    def prompt_rows(self, rows: list[dict], source: str, held_out: bool = False) -> list[dict]:
        """The rows whose prompt (recipe.prompt_template with the question) fits in recipe.max_prompt_length
        tokens. Longer ones are dropped with a warning naming the first, as SFT drops the samples that
        data.max_length leaves no response token of (a question is not cut: its reference answer would no longer
        follow from it); no training row left is a config error. The prompt, with max_new_tokens, is what the
        positions check counts."""
        limit = int(self.rc.max_prompt_length)
        prompts = [fill(self.rc.prompt_template, question=r["question"]) for r in rows]
        lengths = [len(ids) for ids in encode_prompts(self.tokenizer, prompts)] if rows else []
        long = [i for i, n in enumerate(lengths) if n > limit]
        if not long:
            return rows
        first = f"{source} row {long[0] + 1}, {lengths[long[0]]} tokens"
        if len(long) == len(rows) and not held_out:
            raise RecipeConfigError(
                f"recipe.max_prompt_length={limit}: the prompt (recipe.prompt_template with the question) of every "
                f"row of {source} is longer ({first}), so there is nothing to train on. Valid values: "
                f"recipe.max_prompt_length >= {min(lengths)} ({max(lengths)} keeps every row), or shorter questions "
                f"or recipe.prompt_template")
        log.warning("dropped %d of %d rows of %s: their prompt (recipe.prompt_template with the question) is longer "
                    "than recipe.max_prompt_length=%d tokens (the first: %s). A larger recipe.max_prompt_length keeps "
                    "them", len(long), len(rows), source, limit, first)
        drop = set(long)
        return [r for i, r in enumerate(rows) if i not in drop]

    def build_data(self):
        rc, data = self.rc, self.cfg.data
        if self._rows is not None:
            train, held_out = self._rows
        else:
            task = self.task()
            train = self.prompt_rows(task.generate(rc.task_train_size, "train"), "the generated training problems")
            held_out = self.prompt_rows(task.generate(rc.task_eval_size, "eval"), "the generated held-out problems",
                                        held_out=True)
        if data.max_train_samples:
            train = train[:data.max_train_samples]
        if data.max_eval_samples is not None:   # 0: no evaluation (None: all held-out rows)
            held_out = held_out[:data.max_eval_samples]
        self._warmup_rows = train[:self.rc.warmup_examples]
        self._held_out = QADataset(held_out) if held_out else None
        return QADataset(train), self._held_out

    def task(self) -> ArithmeticTask:
        rc = self.rc
        return ArithmeticTask(steps=rc.task_steps, max_operand=rc.task_max_operand, seed=rc.task_seed)

    def collate(self, examples: list) -> list:
        return list(examples)             # a batch is a set of prompts

    # ---- supervised warm-up, cached --------------------------------------------------------------
    def warmup_cache_file(self) -> str:
        """Keyed by everything that determines the warmed-up weights except the RL seed, so runs sharing
        recipe.warmup_cache (an absolute path) start from the same policy."""
        rc = self.rc
        from omegaconf import OmegaConf
        key = json.dumps({"model": OmegaConf.to_container(self.cfg.model, resolve=True),
                          "data": [self.cfg.data.kind, self.cfg.data.path, self.cfg.data.hf_name],
                          "warmup": [rc.warmup_steps, rc.warmup_examples, rc.warmup_batch_size, rc.warmup_lr,
                                     rc.warmup_corrupt_fraction, rc.warmup_corrupt_kind],
                          "task": [rc.task_steps, rc.task_max_operand, rc.task_seed, rc.task_train_size],
                          "templates": [rc.prompt_template, rc.answer_template, rc.answer_split]},
                         sort_keys=True, default=str)
        root = rc.warmup_cache if os.path.isabs(rc.warmup_cache) else os.path.join(self.run_dir, rc.warmup_cache)
        return os.path.join(root, hashlib.sha1(key.encode()).hexdigest()[:12], "model.safetensors")

    def needs_whole_weights_before_engine(self) -> bool:
        # prepare() loads / saves a full state dict (warm start, KL anchor) before the engine exists; the start's
        # evaluation (eval_before_rl) waits for the engine (after_engine), whose ZeRO-3 hooks gather the weights
        return self.rc.warmup_steps > 0 or self.rc.kl_coef > 0

    def prepare(self, trainer, model):
        """Warm-start (cached supervised warm-up), and with kl_coef > 0 keep the starting weights as the KL
        anchor (the trainer skips prepare on resume: both files are then already in place)."""
        import torch.distributed as dist
        from safetensors.torch import load_file, save_file
        from runx.trainers.datajob import atomic_path
        distributed = dist.is_available() and dist.is_initialized()
        rank0 = not distributed or dist.get_rank() == 0
        if self.rc.warmup_steps > 0:
            path = self.warmup_cache_file()
            if not os.path.exists(path) and rank0:
                # on a forked random stream, and no gradient left behind: a run that warms up and one that finds
                # the warm-up cached (a rerun after a crash, runs sharing recipe.warmup_cache) start RL alike
                # (the last warm-up gradient was added to the first RL step's)
                with torch.random.fork_rng(devices=self._rng_devices(model)):
                    self.supervised_warmup(model, path)
                model.zero_grad(set_to_none=True)
            if distributed:
                dist.barrier()
            model.load_state_dict(load_file(path), strict=True)
            log.info("warm-started policy from %s", path)
        if self.rc.warmup_steps == 0 and self.cfg.model.get("from_config") and not self.cfg.get("smoke"):
            log.warning("RL starts from a randomly initialised policy (model.from_config) without a supervised "
                        "warm-up (recipe.warmup_steps=0): its samples will not open the answer tag %r, so every "
                        "reward is 0 and nothing is learned. Start from a pretrained model (model=hf_causal_lm "
                        "model.path=...), or warm up on worked traces (recipe.warmup_steps > 0, rows with a "
                        "'trace' field, as data=verifree_arith has)", self.rc.answer_split)
        # a fresh run (prepare is skipped on resume) evaluates its start once the engine exists (after_engine)
        self._eval_start = bool(self.rc.eval_before_rl) and self._held_out is not None and len(self._held_out) > 0
        if self.rc.kl_coef > 0:
            if rank0:
                with atomic_path(self.kl_reference_file()) as tmp:
                    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
            if distributed:
                dist.barrier()
        return model

    def kl_reference_file(self) -> str:
        return os.path.join(self.run_dir, "kl_reference.safetensors")

    def supervised_warmup(self, model, path: str) -> None:
        """Next-token loss on (prompt -> worked trace + answer) pairs, prompt tokens masked; AdamW with a
        cosine decay. Writes the weights atomically plus a log next to them."""
        from safetensors.torch import save_file
        from runx.trainers.datajob import atomic_path, atomic_write_json
        rc = self.rc
        prompts, targets = warmup_texts(self._warmup_rows, rc, rc.task_seed)
        if not prompts:
            raise ValueError("recipe.warmup_examples=0 but recipe.warmup_steps > 0")
        device = next(model.parameters()).device
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        # each target tokenised after its prompt, as the RL sequences tokenise the patched answer (in_context)
        target_ids = [sum(in_context(self.tokenizer, p, [], t, ""), []) for p, t in zip(prompts, targets)]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rc.warmup_lr,
                                weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, rc.warmup_steps) / rc.warmup_steps)))
        g = torch.Generator().manual_seed(rc.task_seed)
        order = torch.randperm(len(prompts), generator=g).tolist()
        pos, losses = 0, []
        model.train()
        for step in range(rc.warmup_steps):
            idx = []
            while len(idx) < rc.warmup_batch_size:
                if pos == len(order):
                    order, pos = torch.randperm(len(prompts), generator=g).tolist(), 0
                idx.append(order[pos])
                pos += 1
            ids, attn, role = pack([prompt_ids[i] for i in idx], [[(target_ids[i], THINK)] for i in idx],
                                   self.tokenizer.pad_token_id)
            logp, _ = sequence_logprobs(model, ScoredBatch(ids, attn, role, None, None), 1.0, self.rc.fused_logprob,
                                        self.rc.logprob_chunk)
            loss = -logp.sum() / (role > 0).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % 50 == 0 or step == rc.warmup_steps - 1:
                log.info("warm-up step %d/%d: loss %.4f", step + 1, rc.warmup_steps, losses[-1])
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
        atomic_write_json(os.path.join(os.path.dirname(path), "warmup_log.json"),
                          {"steps": rc.warmup_steps, "examples": len(prompts), "loss_first": losses[0],
                           "loss_last": sum(losses[-10:]) / len(losses[-10:])})

    def after_engine(self, trainer, engine) -> None:
        if self.rc.kl_coef > 0:
            # the KL anchor: the policy RL starts from (saved by prepare), frozen, outside the engine
            from safetensors.torch import load_file
            # built on a forked random stream: a model built from its config initialises its weights from the
            # global RNG, which would shift every rollout after it, so a kl_coef ablation would sample other
            # traces than the run without KL (the weights are overwritten by the anchor's below anyway)
            with torch.random.fork_rng(devices=self._rng_devices(engine)):
                ref = self.build_model()
            ref.load_state_dict(load_file(self.kl_reference_file()))
            self._ref_model = ref.to(next(unwrap(engine).parameters()).device).eval().requires_grad_(False)
        if self._eval_start:
            # the starting policy's held-out numbers, through the engine: under ZeRO-3 its hooks gather each
            # layer's weights as generation reaches it, so the model can be built partitioned
            self._eval_start = False
            loader = torch.utils.data.DataLoader(self._held_out, batch_size=int(self.cfg.trainer.micro_batch_size),
                                                 collate_fn=self.collate)
            training = unwrap(engine).training
            engine.eval()
            # on its own random stream: sampled answers (eval_samples > 0) must not move the training rollouts',
            # so that eval_before_rl=false trains the same run
            with torch.no_grad(), torch.random.fork_rng(devices=self._rng_devices(engine)):
                self._start_metrics = {f"start/{k}": v for k, v in self.evaluate(engine, loader).items()}
            engine.train(training)
            log.info("before RL: %s", self._start_metrics)
            if self._start_metrics.get("start/no_tag_frac") == 1.0:
                log.warning("before RL, no greedy answer of the policy opens the answer tag %r (start/no_tag_frac "
                            "= 1): if its samples do not either, every reward is 0 and RL has no signal. A model "
                            "that follows recipe.prompt_template (or a warm-up, recipe.warmup_steps) gives it one",
                            self.rc.answer_split)
            if trainer is None or trainer.is_main:   # kept for the summary of a resumed run (trainer None: in-process use)
                from runx.trainers.datajob import atomic_write_json
                atomic_write_json(self.start_metrics_file(), self._start_metrics)

    @staticmethod
    def _rng_devices(engine) -> list[int]:
        """The CUDA device whose generator a forked random stream must also save and restore: the policy's."""
        dev = next(unwrap(engine).parameters()).device
        return [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []

    # ---- one step: rollout, patch, score, loss ---------------------------------------------------
    def rollout(self, policy, prompts: list[str], group_size: int, temperature: float,
                max_new_tokens: int) -> list[Response]:
        rc = self.rc
        if rc.rollout_backend == "vllm":
            return self.vllm_rollout(policy, prompts, group_size, temperature, max_new_tokens)
        return sample_responses(policy, self.tokenizer, prompts, group_size, temperature, rc.top_p,
                                max_new_tokens, rc.stop_string, rc.rollout_chunk)

    def loss(self, model, batch, step: int):
        rc, G = self.rc, self.rc.group_size
        policy = unwrap(model)
        prompts = [fill(rc.prompt_template, question=ex["question"]) for ex in batch]
        refs = [str(ex["answer"]).strip() for ex in batch]

        # 1. rollout: z_i (and y_i) ~ pi(.|x), G per question
        t0 = time.perf_counter()
        responses = self.rollout(policy, prompts, G, rc.temperature, rc.max_new_tokens)
        t1 = time.perf_counter()
        sampled = [extract_answer(r.text, rc.answer_split, rc.stop_string) for r in responses]
        correct = torch.tensor([a is not None and a == refs[r.prompt_index] for a, r in zip(sampled, responses)],
                               dtype=torch.float32)

        # 2. sequences: x + z_i + y* (split before ">" of "<answer") or x + z_i + y_i (verifier)
        if rc.reward == "verifree":
            seqs = build_verifree_sequences(self.tokenizer, prompts, responses, refs, rc.answer_template,
                                            rc.answer_split, rc.max_new_tokens)
        else:
            seqs = build_response_sequences(self.tokenizer, prompts, responses)

        # 3-5. log pi of every z / y token in one forward (fused log-prob, temperature-scaled like the sampler),
        # the rewards, and the loss whose gradient is the estimator
        device = next(policy.parameters()).device
        role = seqs.role.to(device)
        norm = float(rc.max_new_tokens) if rc.loss_norm == "max_len" else 1.0
        valid = ~seqs.truncated.to(device) if rc.ignore_truncated else None
        has_answer = seqs.has_answer.to(device)

        def objective(think_lp, answer_lp, answer_lp_detached):
            if rc.reward == "verifree":
                R = verifree_rewards(answer_lp_detached, has_answer)
                return verifree_loss(think_lp / norm, answer_lp / norm, R, G, rc.advantage, rc.answer_weight,
                                     valid)
            R = correct.to(device) * has_answer
            return verifier_loss((think_lp + answer_lp) / norm, R, G, rc.advantage, valid)

        if rc.fused_logprob and rc.grad_in_forward and rc.kl_coef == 0:
            # the objective is linear in the log-prob sums: its gradient is made in the head's forward
            loss, logp, entropy = linear_objective_logprobs(policy, seqs, objective, rc.temperature,
                                                            rc.logprob_chunk, rc.pack_sequences, rc.logprob_dw_accum)
            think_lp, answer_lp = (logp * (role == THINK)).sum(1), (logp * (role == ANSWER)).sum(1)
            _, parts = objective(think_lp, answer_lp, answer_lp)          # the logged parts, from the final values
        else:
            logp, entropy = sequence_logprobs(policy, seqs, rc.temperature, rc.fused_logprob, rc.logprob_chunk,
                                              rc.pack_sequences)
            think_lp, answer_lp = (logp * (role == THINK)).sum(1), (logp * (role == ANSWER)).sum(1)
            loss, parts = objective(think_lp, answer_lp, answer_lp.detach())
        R = verifree_rewards(answer_lp, has_answer) if rc.reward == "verifree" else correct.to(device) * has_answer

        # optional KL to the starting policy (k3 estimator, mean over each sequence's scored tokens)
        if rc.kl_coef > 0:
            with torch.no_grad():
                ref_lp, _ = sequence_logprobs(self._ref_model, seqs, rc.temperature, rc.fused_logprob,
                                              rc.logprob_chunk, rc.pack_sequences)
            mask = (role > 0).float()
            d = (ref_lp - logp) * mask
            k3 = ((d.exp() - d - 1) * mask).sum(1) / mask.sum(1).clamp(min=1)
            loss = loss + rc.kl_coef * k3.mean()
            parts["kl"] = float(k3.detach().mean())

        sampled_tokens = role == THINK          # tokens the policy sampled (the patched answer is the reference)
        self._tokens = int(seqs.attention_mask.sum())
        # for throughput reports: rollout time / generated tokens, scoring-forward time / sequence tokens
        self.last_timing = {"rollout_s": t1 - t0, "rollout_tokens": sum(len(r.ids) for r in responses),
                            "forward_s": time.perf_counter() - t1, "update_tokens": self._tokens}
        no_tag = torch.tensor([split_before_answer(r.text, rc.answer_split) is None for r in responses],
                              dtype=torch.float32)
        metrics = {"reward": float(R.mean()), "acc": float(correct.mean()),
                   "response_len": float(sum(len(r.ids) for r in responses) / len(responses)),
                   "no_tag_frac": float(no_tag.mean()), "truncated_frac": float(seqs.truncated.float().mean()),
                   "entropy": float(entropy[sampled_tokens].mean()) if sampled_tokens.any() else 0.0, **parts}
        return loss, metrics

    # ---- evaluation: held-out exact match --------------------------------------------------------
    def evaluate(self, model, loader) -> dict:
        """Held-out exact match: greedy ("acc"), and with recipe.eval_samples > 0 the mean over that many
        samples per question at the rollout temperature ("acc_sampled")."""
        import torch.distributed as dist
        rc = self.rc
        policy = unwrap(model)
        max_new = rc.eval_max_new_tokens or rc.max_new_tokens
        tot = torch.zeros(6, dtype=torch.float64)   # n, correct, no_tag, length, n_sampled, correct_sampled
        for batch in loader:
            prompts = [fill(rc.prompt_template, question=ex["question"]) for ex in batch]
            refs = [str(ex["answer"]).strip() for ex in batch]
            for r in sample_responses(policy, self.tokenizer, prompts, 1, 0.0, 1.0, max_new, rc.stop_string,
                                      rc.rollout_chunk):
                tot[0] += 1
                tot[1] += float(extract_answer(r.text, rc.answer_split, rc.stop_string) == refs[r.prompt_index])
                tot[2] += float(split_before_answer(r.text, rc.answer_split) is None)
                tot[3] += len(r.ids)
            if rc.eval_samples > 0:
                for r in sample_responses(policy, self.tokenizer, prompts, rc.eval_samples, rc.temperature,
                                          rc.top_p, max_new, rc.stop_string, rc.rollout_chunk):
                    tot[4] += 1
                    tot[5] += float(extract_answer(r.text, rc.answer_split, rc.stop_string) == refs[r.prompt_index])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(tot)
        if tot[0].item() == 0:   # nothing held out: no numbers (0.0 would read as a measured accuracy)
            return {}
        n = tot[0].item()
        out = {"acc": tot[1].item() / n, "no_tag_frac": tot[2].item() / n, "response_len": tot[3].item() / n}
        if rc.eval_samples > 0:
            out["acc_sampled"] = tot[5].item() / max(tot[4].item(), 1.0)
        return out

    # ---- throughput accounting -------------------------------------------------------------------
    def batch_size(self, batch) -> int:
        return len(batch)

    def batch_tokens(self, batch) -> int:
        """Tokens of the last update's sequences (the trainer asks after loss())."""
        return self._tokens

    def start_metrics_file(self) -> str:
        return os.path.join(self.run_dir, "start_metrics.json")

    def final_metrics(self) -> dict:
        """The starting policy's held-out numbers next to the trainer's final eval/* ones (a resumed run, which
        does not evaluate its start again, reads them from the first segment's file)."""
        if not self._start_metrics and os.path.exists(self.start_metrics_file()):
            with open(self.start_metrics_file()) as f:
                return json.load(f)
        return dict(self._start_metrics)

    # ---- optional vLLM rollout -------------------------------------------------------------------
    def vllm_rollout(self, policy, prompts, group_size, temperature, max_new_tokens) -> list[Response]:
        """Generation with vLLM (rollout_backend=vllm): a colocated engine whose weights are refreshed from the
        policy before each rollout. Needs `vllm` and an unpartitioned policy (ZeRO 0-2)."""
        try:
            import vllm
        except ImportError:
            raise ImportError("recipe.rollout_backend=vllm needs the vllm package (pip install vllm); "
                              "valid choices: 'hf' (default, always available), 'vllm'") from None
        if is_zero3_partitioned(policy):
            raise ValueError("recipe.rollout_backend=vllm needs the full weights on each rank: use ZeRO 0-2 "
                             "or recipe.rollout_backend=hf")
        if self._vllm is None:
            folder = os.path.join(self.run_dir, "vllm_init")
            policy.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            self._vllm = vllm.LLM(model=folder, gpu_memory_utilization=self.rc.vllm_gpu_memory_utilization,
                                  enable_prefix_caching=True)
        # refresh the engine's weights from the policy (on-policy sampling)
        weights = [(k, v.detach()) for k, v in policy.state_dict().items()]
        if hasattr(self._vllm, "apply_model"):                  # vLLM >= 0.8 (V1 engine, in-process)
            self._vllm.apply_model(lambda model: model.load_weights(weights))
        else:                                                    # older engines
            self._vllm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        params = vllm.SamplingParams(n=group_size, temperature=temperature, top_p=self.rc.top_p,
                                     max_tokens=max_new_tokens, stop=[self.rc.stop_string],
                                     include_stop_str_in_output=True)
        # the prompt ids the scoring reads (encode_prompts: no second BOS), not vLLM's own tokenisation of the text
        inputs = [{"prompt_token_ids": ids} for ids in encode_prompts(self.tokenizer, prompts)]
        out = []
        for i, res in enumerate(self._vllm.generate(inputs, params, use_tqdm=False)):
            for o in res.outputs:
                finish = "length" if o.finish_reason == "length" else "stop"
                out.append(Response(i, list(o.token_ids), o.text, finish))
        return out
