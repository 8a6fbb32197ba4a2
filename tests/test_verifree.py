"""VeriFree (issue #5): the estimator on a toy policy with a closed-form objective, the tokenisation split,
reward / log-prob ranges, rollout and loss on a tiny model, data loading, and `runx train` end to end."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from runx.recipes import verifree as vf
from runx.recipes.text_data import read_files
from runx.recipes.verifree_task import ArithmeticTask, qa_rows

# pytest-xdist (tests/run.sh runs 2 workers) keeps this file on one worker: its tiny model is built once
pytestmark = pytest.mark.xdist_group("verifree")

os.environ.setdefault("DS_ACCELERATOR", "cpu")


# ---------------------------------------------------------------------------------------------------------
# A local stand-in for runx.kernels.linear_logprob, used only if the kernels package lacks it
# ---------------------------------------------------------------------------------------------------------

def _reference_linear_logprob(hidden, weight, targets, bias=None, temperature=1.0, chunk=None,
                              return_entropy=False, backend="auto", ignore_index=-100):
    logits = (hidden.float() @ weight.float().T + (0 if bias is None else bias.float())) / temperature
    logz = torch.log_softmax(logits, -1)
    keep = targets != ignore_index
    lp = logz.gather(-1, torch.where(keep, targets, 0)[..., None]).squeeze(-1) * keep
    if return_entropy:
        return lp, -(logz.exp() * logz).sum(-1) * keep
    return lp


@pytest.fixture(autouse=True)
def _kernel_available(monkeypatch):
    try:
        from runx.kernels import linear_logprob  # noqa: F401
    except ImportError:
        import types
        mod = types.ModuleType("runx.kernels")
        mod.linear_logprob = _reference_linear_logprob
        monkeypatch.setitem(sys.modules, "runx.kernels", mod)
    yield


def _cfg(*overrides):
    """The composed default config with `key=value` overrides applied (values parsed as YAML)."""
    import yaml
    from omegaconf import OmegaConf, open_dict

    from runx.cli.config import compose
    cfg = compose(["recipe=verifree", "logger=none"])
    with open_dict(cfg):
        for ov in overrides:
            key, value = ov.split("=", 1)
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# 1. The estimator on a two-token toy policy: unbiased for grad E_z[pi(y*|x,z)], and Rao-Blackwell
# ---------------------------------------------------------------------------------------------------------

class TwoTokenPolicy:
    """pi(z) = softmax(a) over 2 reasoning tokens, pi(y|z) = softmax(b[z]) over 2 answers; y* = 1.
    J(theta) = sum_z pi(z) pi(y*|z), so grad J is exact by autograd."""
    Y_STAR = 1

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(2, generator=g).requires_grad_()
        self.b = torch.randn(2, 2, generator=g).requires_grad_()

    def params(self):
        return [self.a, self.b]

    def exact_grad(self) -> torch.Tensor:
        J = (torch.softmax(self.a, 0) * torch.softmax(self.b, 1)[:, self.Y_STAR]).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(J, self.params())])

    def estimators(self, draws: int, G: int, gen: torch.Generator,
                   advantage: str = "rloo") -> tuple[torch.Tensor, torch.Tensor]:
        """[draws, 6] VeriFree gradients and verifier-RLOO gradients, each draw from the same G sampled z
        (the verifier also samples y). All draws in one backward: draw m reads its own copy of theta, so the
        gradient w.r.t. copy m is that draw's estimate (times 1/draws, from the mean over rows)."""
        def run(loss_fn):
            a = self.a.detach().expand(draws, 2).clone().requires_grad_()
            b = self.b.detach().expand(draws, 2, 2).clone().requires_grad_()
            loss = loss_fn(torch.log_softmax(a, 1).gather(1, z), torch.log_softmax(b, 2))
            ga, gb = torch.autograd.grad(loss, [a, b])
            # the loss is minimised: the ascent direction on J is minus its gradient
            return -draws * torch.cat([ga, gb.flatten(1)], 1)

        with torch.no_grad():
            z = torch.multinomial(torch.softmax(self.a, 0).expand(draws, 2), G, replacement=True, generator=gen)
            py = torch.softmax(self.b, 1)[z]                                     # [draws, G, 2]
            y = torch.multinomial(py.reshape(-1, 2), 1, generator=gen).view(draws, G)

        def verifree(logp_z, logp_b):
            answer_lp = logp_b.gather(1, z[..., None].expand(-1, -1, 2))[..., self.Y_STAR]   # log pi(y*|x,z_i)
            R = vf.verifree_rewards(answer_lp.flatten(), torch.ones(draws * G, dtype=torch.bool))
            return vf.verifree_loss(logp_z.flatten(), answer_lp.flatten(), R, G, advantage, "reward")[0]

        def verifier(logp_z, logp_b):
            logp_y = logp_b.gather(1, z[..., None].expand(-1, -1, 2)).gather(2, y[..., None]).squeeze(2)
            r = (y == self.Y_STAR).float().flatten()                            # binary verifier reward
            return vf.verifier_loss((logp_z + logp_y).flatten(), r, G, "rloo")[0]

        return run(verifree), run(verifier)


def test_gradient_unbiased_and_lower_variance_than_verifier_on_two_token_policy():
    pol = TwoTokenPolicy()
    exact = pol.exact_grad()
    draws = 20000
    g_vf, g_v = pol.estimators(draws, 4, torch.Generator().manual_seed(1))
    # Monte-Carlo mean within 3 standard errors of the exact gradient, every component
    se = g_vf.std(0) / draws ** 0.5
    assert torch.all((g_vf.mean(0) - exact).abs() <= 3 * se + 1e-7), (g_vf.mean(0), exact, se)
    assert exact.abs().max() > 10 * se.max()          # the test has power: the gradient is far from 0
    # the verifier estimator is unbiased too (same target), with more variance: Rao-Blackwell over y
    se_v = g_v.std(0) / draws ** 0.5
    assert torch.all((g_v.mean(0) - exact).abs() <= 3 * se_v + 1e-7)
    var_vf, var_v = g_vf.var(0).sum(), g_v.var(0).sum()
    assert var_vf <= var_v, (var_vf, var_v)


def test_a_wrong_estimator_fails_the_toy_check():
    """Power check of the test above: dropping the answer term (pure REINFORCE on z) is biased."""
    pol = TwoTokenPolicy()
    exact = pol.exact_grad()
    draws, G = 20000, 4
    gen = torch.Generator().manual_seed(1)
    z = torch.multinomial(torch.softmax(pol.a, 0).detach().expand(draws, 2), G, replacement=True, generator=gen)
    b = pol.b.detach().expand(draws, 2, 2).clone().requires_grad_()
    a = pol.a.detach().expand(draws, 2).clone().requires_grad_()
    answer_lp = torch.log_softmax(b, 2).gather(1, z[..., None].expand(-1, -1, 2))[..., 1].flatten()
    R = vf.verifree_rewards(answer_lp, torch.ones(draws * G, dtype=torch.bool))
    loss, _ = vf.verifree_loss(torch.log_softmax(a, 1).gather(1, z).flatten(), 0 * answer_lp, R, G)
    ga, gb = torch.autograd.grad(loss, [a, b], allow_unused=True)
    g = -draws * torch.cat([ga, torch.zeros(draws, 4)], 1)
    se = g.std(0) / draws ** 0.5
    assert not torch.all((g.mean(0) - exact).abs() <= 3 * se + 1e-7)


def test_without_baseline_still_unbiased_but_noisier():
    """The RLOO baseline is a pure variance reduction (the paper's ablation: removing it costs accuracy)."""
    pol = TwoTokenPolicy()
    exact = pol.exact_grad()
    g_rloo, _ = pol.estimators(20000, 4, torch.Generator().manual_seed(2), "rloo")
    g_naive, _ = pol.estimators(20000, 4, torch.Generator().manual_seed(2), "naive")
    se = g_naive.std(0) / 20000 ** 0.5
    assert torch.all((g_naive.mean(0) - exact).abs() <= 3 * se + 1e-7)
    assert g_rloo.var(0).sum() < g_naive.var(0).sum()


def test_group_baselines():
    R = torch.tensor([0.2, 0.4, 0.9, 0.1, 1.0, 0.0])
    b = vf.group_baseline(R, 3, "rloo")
    assert torch.allclose(b, torch.tensor([0.65, 0.55, 0.3, 0.5, 0.05, 0.55]))
    assert torch.allclose(vf.group_baseline(R, 3, "grpo"), torch.tensor([0.5] * 3 + [1.1 / 3] * 3))
    with pytest.raises(ValueError, match="advantage"):
        vf.group_baseline(R, 3, "bogus")


# ---------------------------------------------------------------------------------------------------------
# 2. Tokenisation at the split: the scored sequence is the one the policy reads (byte-level: additive at the
#    split; SentencePiece-style: the answer tokenised in context), prompts read with one BOS
# ---------------------------------------------------------------------------------------------------------

def _random_text(rng: random.Random, n: int) -> str:
    alphabet = "abcxyz0123456789 +-=.<>/\\{}\n" + "éü€中😀"
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_tokenisation_is_additive_at_the_split_for_the_default_tokenizer():
    from runx.trainers.hf import load_tokenizer
    cfg = _cfg()
    rc = cfg.recipe
    tok = load_tokenizer(cfg.model)
    rng = random.Random(0)
    for _ in range(300):
        response = _random_text(rng, rng.randint(0, 40)) + "<answer> \\boxed{" + _random_text(rng, 3) + "} </answer>"
        think = vf.split_before_answer(response, rc.answer_split)
        assert think is not None and think.endswith("<answer") and not think.endswith(">")
        answer = vf.fill(rc.answer_template, answer=_random_text(rng, rng.randint(1, 6)))
        assert answer.startswith(">")
        enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
        assert enc(think + answer) == enc(think) + enc(answer)


def test_built_sequences_equal_tokenised_prompt_think_answer():
    from runx.trainers.hf import load_tokenizer
    cfg = _cfg()
    rc = cfg.recipe
    tok = load_tokenizer(cfg.model)
    prompts = [vf.fill(rc.prompt_template, question="Ann has 2 pens. She buys 3. How many pens now?")]
    resp = [vf.Response(0, [], "2+3=5. <answer> \\boxed{6} </answer>", "stop"),
            vf.Response(0, tok("2+3=5. I give up", add_special_tokens=False).input_ids, "2+3=5. I give up", "eos")]
    seqs = vf.build_verifree_sequences(tok, prompts, resp, ["5"], rc.answer_template, rc.answer_split,
                                       rc.max_new_tokens)
    full = prompts[0] + "2+3=5. <answer> \\boxed{5} </answer>"       # the reference answer is patched in
    n = len(tok(full).input_ids)
    assert seqs.input_ids[0, :n].tolist() == tok(full).input_ids
    answer_ids = seqs.input_ids[0][seqs.role[0] == vf.ANSWER].tolist()
    assert tok.decode(answer_ids) == vf.fill(rc.answer_template, answer="5")
    assert tok.decode(seqs.input_ids[0][seqs.role[0] == vf.THINK].tolist()) == "2+3=5. <answer"
    assert seqs.has_answer.tolist() == [True, False]
    assert (seqs.role[1] == vf.ANSWER).sum() == 0


def _sentencepiece_tokenizer():
    """A Llama-2 / Mistral style tokenizer, trained here (no download): SentencePiece-like BPE ("\u2581" for a
    space and before the text of every separately encoded string), a BOS added, "<answer>" merged in its
    vocabulary (with the space before it: " <answer>" is one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(0)
    words = "the a cat has buys finds loses pens cups how many now so is".split()
    corpus = [" ".join(rng.choice(words) for _ in range(6)) + f" {rng.randint(0, 99)}+{rng.randint(0, 9)}="
              f"{rng.randint(0, 99)}. <answer> \\boxed{{{rng.randint(0, 99)}}} </answer>" for _ in range(400)]
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = list("\n0123456789<>{}\\/=+-.:?[]\u2581ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    sp.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=alphabet, show_progress=False))
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", sp.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.fixture(scope="module")
def sp_tok():
    tok = _sentencepiece_tokenizer()
    assert "\u2581<answer>" in tok.get_vocab()          # the token that holds both z's end and the answer's ">"
    return tok


SP_PROMPT = "Q: the cat has 4 pens and buys 5\nA:\n"


def _sampled(tok, prompt: str, text: str) -> list:
    """The ids a policy that wrote `text` after `prompt` sampled: the whole text's tokens after the prompt's."""
    prompt_ids, full = vf.encode_prompts(tok, [prompt, prompt + text])
    assert full[:len(prompt_ids)] == prompt_ids
    return full[len(prompt_ids):]


def test_patched_answer_is_tokenised_in_context_for_a_sentencepiece_tokenizer(sp_tok):
    """z, the patched answer and the prompt were tokenised apart: with a SentencePiece-style tokenizer each piece
    gained a leading "\u2581", so R scored "<answer > \\boxed{9}..." (a text the policy never writes) and z's first
    token was not the sampled one. Now the scored sequence decodes to exactly prompt + z + answer, z keeps its
    sampled tokens, and the answer tokens are the whole text's (the token " <answer>", holding z's end and the
    answer's ">", goes with the answer) -- also when the policy spelled the tag out in other tokens."""
    tok = sp_tok
    answer = vf.fill("> \\boxed{{answer}} </answer>", answer="9")
    prompt_ids = vf.encode_prompts(tok, [SP_PROMPT])[0]
    canonical = _sampled(tok, SP_PROMPT, "so 4+5=9. <answer> \\boxed{8} </answer>")
    head = _sampled(tok, SP_PROMPT, "so 4+5=9.")
    spelled = head + tok.convert_tokens_to_ids(["\u2581"] + list("<answer>"))     # the tag a character at a time
    for sampled in (canonical, spelled):
        r = vf.Response(0, sampled, tok.decode(sampled, skip_special_tokens=True), "stop")
        z = vf.split_before_answer(r.text, "<answer")
        assert z == "so 4+5=9. <answer"
        seqs = vf.build_verifree_sequences(tok, [SP_PROMPT], [r], ["9"], "> \\boxed{{answer}} </answer>",
                                           "<answer", 64)
        ids, role = seqs.input_ids[0].tolist(), seqs.role[0].tolist()
        assert ids[:len(prompt_ids)] == prompt_ids and set(role[:len(prompt_ids)]) == {0}
        assert tok.decode(ids, skip_special_tokens=True) == SP_PROMPT + z + answer
        think = [t for t, ro in zip(ids, role) if ro == vf.THINK]
        ans = [t for t, ro in zip(ids, role) if ro == vf.ANSWER]
        assert ids == prompt_ids + think + ans
        assert think == sampled[:len(think)] == head                # z's tokens are the sampled ones
        in_context = tok(SP_PROMPT + z + answer).input_ids         # the whole text, tokenised once
        assert ans == in_context[len(in_context) - len(ans):]
        assert tok.convert_ids_to_tokens(ans)[0] == "\u2581<answer>"
        assert seqs.has_answer.tolist() == [True]


def test_without_character_offsets_the_pieces_are_checked_and_a_mismatch_is_warned_once(sp_tok, monkeypatch, caplog):
    """A tokenizer without offsets (a slow one) falls back to tokenising the rest of z and the answer apart; where
    those pieces do not decode to the text (SentencePiece), that is said once."""
    class Slow:
        is_fast = False

        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, *args, **kwargs):
            if kwargs.get("return_offsets_mapping"):
                raise NotImplementedError
            return self._tok(*args, **kwargs)

    monkeypatch.setattr(vf, "_WARNED", set())
    caplog.set_level("WARNING", logger="runx.verifree")
    sampled = _sampled(sp_tok, SP_PROMPT, "so 4+5=9. <answer> \\boxed{9} </answer>")
    for _ in range(2):
        think, ans = vf.in_context(Slow(sp_tok), SP_PROMPT, sampled, "so 4+5=9. <answer", "> \\boxed{9} </answer>")
        assert think[:5] == sampled[:5]
    warned = [r.getMessage() for r in caplog.records if "tokenised apart" in r.getMessage()]
    assert len(warned) == 1 and "Slow" in warned[0], warned
    # a byte-level tokenizer's pieces do concatenate: no warning
    from runx.trainers.hf import byte_tokenizer
    monkeypatch.setattr(vf, "_WARNED", set())
    caplog.clear()
    byte = byte_tokenizer()
    ids = byte("so 4+5=9. <answer> \\boxed{9} </answer>", add_special_tokens=False).input_ids
    think, ans = vf.in_context(Slow(byte), "Q: x\nA: ", ids, "so 4+5=9. <answer", "> \\boxed{9} </answer>")
    assert think + ans == ids and not caplog.records


def test_a_prompt_template_that_starts_with_the_bos_text_reads_one_bos(sp_tok):
    """A prompt_template written from the model's own format ("<s>[INST] ...") got the tokenizer's BOS on top of
    its own: the policy sampled, and was scored, after two BOS tokens. The rollout and both sequence builders
    read one."""
    tok = sp_tok
    bos = tok.bos_token_id
    prompts = [vf.fill("<s>[INST] {question} [/INST]", question="the cat has 4 pens"), "Q: the cat\nA:\n"]
    enc = vf.encode_prompts(tok, prompts)
    assert [ids[:2].count(bos) for ids in enc] == [1, 1] and all(ids[0] == bos for ids in enc)

    class Recorder(torch.nn.Module):
        """A policy that records what generate reads and writes one eos."""
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.read = None

        def generate(self, input_ids, attention_mask, generation_config, **kw):
            self.read = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
            n = generation_config.num_return_sequences
            eos = torch.full((input_ids.shape[0], 1), generation_config.eos_token_id)
            return torch.cat([input_ids, eos], 1).repeat_interleave(n, 0)

    pol = Recorder()
    resp = vf.sample_responses(pol, tok, prompts, 1, 1.0, 1.0, 4, "</answer>")
    assert pol.read == enc
    resp = [vf.Response(0, _sampled(tok, prompts[0], "so 4. <answer> \\boxed{4} </answer>"),
                        "so 4. <answer> \\boxed{4} </answer>", "stop")]
    for seqs in (vf.build_verifree_sequences(tok, prompts, resp, ["4"], "> \\boxed{{answer}} </answer>", "<answer",
                                             64), vf.build_response_sequences(tok, prompts, resp)):
        assert seqs.input_ids[0, :len(enc[0])].tolist() == enc[0]
        assert seqs.input_ids[0, :3].tolist().count(bos) == 1


# ---------------------------------------------------------------------------------------------------------
# 3. Ranges: R in [0, 1], log-probs <= 0, no tag -> R = 0; the whole loss on a tiny random model
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = _cfg("recipe.warmup_steps=0", "recipe.group_size=4", "recipe.max_new_tokens=48",
               "recipe.task_train_size=64", "recipe.task_eval_size=8")
    torch.manual_seed(0)
    recipe = vf.VeriFree(cfg, str(tmp_path_factory.mktemp("vf")))
    model = recipe.build_model()
    train, held_out = recipe.build_data()
    return recipe, model, train, held_out


def test_rewards_in_unit_interval_logprobs_nonpositive_and_no_tag_gets_zero(tiny):
    recipe, model, _, _ = tiny
    rc, tok = recipe.rc, recipe.tokenizer
    prompts = [vf.fill(rc.prompt_template, question="Tom has 1 cup. He finds 1. How many cups now?")]
    texts = ["1+1=2. <answer> \\boxed{2} </answer>", "1+1=3. <answer> \\boxed{3} </answer>",
             "1+1=2. no tag here", "1+1=2. <answer> \\box"]
    finishes = ["stop", "stop", "eos", "length"]
    resp = [vf.Response(0, tok(t, add_special_tokens=False).input_ids, t, f) for t, f in zip(texts, finishes)]
    seqs = vf.build_verifree_sequences(tok, prompts, resp, ["2"], rc.answer_template, rc.answer_split, 64)
    logp, ent = vf.sequence_logprobs(model, seqs)
    assert torch.all(logp <= 0) and torch.all(ent >= 0)
    assert torch.all(logp[seqs.role > 0] < 0)                  # a random model is never certain
    answer_lp = (logp * (seqs.role == vf.ANSWER)).sum(1)
    R = vf.verifree_rewards(answer_lp, seqs.has_answer)
    assert torch.all((R >= 0) & (R <= 1))
    assert answer_lp[2] == 0 and R[2] == 0                      # no tag: no answer tokens, yet R = 0 (not e^0)
    assert answer_lp[3] < 0 and R[3] == 0                       # truncated -> 0
    assert torch.allclose(R[:2], answer_lp[:2].exp())           # R = pi(y*|x,z) = exp(sum of answer log-probs)
    # the fused path equals the full-logits path
    logp_full, _ = vf.sequence_logprobs(model, seqs, fused=False)
    assert torch.allclose(logp, logp_full, atol=1e-5)


class Scripted(torch.nn.Module):
    """A policy whose generate() writes fixed continuations (one per sampled row, cycling), stepping the
    stopping criterion like HF generate; log-probs come from the wrapped tiny model."""

    def __init__(self, inner, tok, texts):
        super().__init__()
        self.inner = inner
        self.scripts = [tok(t, add_special_tokens=False).input_ids for t in texts]
        self.pad = tok.pad_token_id

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def generate(self, input_ids, generation_config, stopping_criteria, **kw):
        max_new_tokens, num_return_sequences = generation_config.max_new_tokens, generation_config.num_return_sequences
        ids = input_ids.repeat_interleave(num_return_sequences, 0)
        rows = [self.scripts[i % len(self.scripts)] for i in range(ids.shape[0])]
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        for t in range(max_new_tokens):
            nxt = torch.tensor([r[t] if t < len(r) and not d else self.pad for r, d in zip(rows, done)])
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= stopping_criteria[0](ids) | torch.tensor([t + 1 >= len(r) for r in rows])
            if done.all():
                break
        return ids


def test_loss_runs_rollout_and_backprops_for_both_rewards(tiny):
    recipe, model, _, _ = tiny
    rc = recipe.rc
    rc.answer_template = ">{answer}"          # short, so a random model's R does not underflow to 0
    texts = ["1+2=3. <answer>\\boxed{3} </answer>", "1+2=4. <answer>\\boxed{4} </answer>",
             "1+2=3. no tag", "1+2=3. <answer>\\boxed{3} </answer>"]
    policy = Scripted(model, recipe.tokenizer, texts)
    batch = [{"question": "Ann has 1 pen. She buys 2. How many pens now?", "answer": "3"}] * 2
    try:
        for reward in ("verifree", "verifier"):
            rc.reward = reward
            model.zero_grad()
            loss, metrics = recipe.loss(policy, batch, 0)
            loss.backward()
            assert torch.isfinite(loss)
            assert metrics["acc"] == 0.5 and metrics["no_tag_frac"] == 0.25 and metrics["truncated_frac"] == 0
            if reward == "verifier":
                assert metrics["reward"] == 0.5
            else:
                assert 0 < metrics["reward"] < 1
            assert metrics["entropy"] > 0
            assert metrics["response_len"] == sum(len(s) for s in policy.scripts) / 4
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)
    finally:
        rc.reward, rc.answer_template = "verifree", "> \\boxed{{answer}} </answer>"


def _scripted_step(recipe, model, texts, batch):
    """(loss, metrics, parameter gradients) of one recipe.loss step whose rollouts write `texts`."""
    policy = Scripted(model, recipe.tokenizer, texts)
    model.zero_grad()
    loss, metrics = recipe.loss(policy, batch, 0)
    loss.backward()
    return loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]


def _assert_same_step_off_and_on(recipe, model, texts, batch, key, label, **tol):
    """The scripted step with recipe.<key> false, then true: the same loss, metrics and gradients."""
    steps = []
    for on in (False, True):
        setattr(recipe.rc, key, on)
        steps.append(_scripted_step(recipe, model, texts, batch))
    _assert_same_step(*steps, label, **tol)


def _assert_same_step(ref, other, tag, rtol, atol, grad_rtol):
    """`other` has `ref`'s loss and metrics (rtol / atol) and its nonzero gradients (grad_rtol / atol)."""
    (l0, m0, g0), (l1, m1, g1) = ref, other
    assert torch.allclose(l0, l1, rtol=rtol, atol=atol), (tag, l0, l1)
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=rtol, abs=atol), (tag, k, m0[k], m1[k])
    assert any(g.abs().sum() > 0 for g in g0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=grad_rtol, atol=atol)


def test_gradient_in_forward_equals_autograd_through_the_logprobs(tiny):
    """recipe.grad_in_forward (the head's gradient made from the objective's per-token coefficients) gives the
    loss, metrics and parameter gradients of the plain path (log-probs, then autograd through verifree_loss),
    for both rewards and with a truncation mask ("1+2=" ends without a stop: truncated) and Dr. GRPO's
    normaliser."""
    recipe, model, _, _ = tiny
    rc = recipe.rc
    saved = (rc.answer_template, rc.reward, rc.grad_in_forward, rc.ignore_truncated, rc.loss_norm, rc.advantage)
    rc.answer_template = ">{answer}"
    texts = ["1+2=3. <answer>\\boxed{3} </answer>", "1+2=4. <answer>\\boxed{4} </answer>",
             "1+2=3. no tag", "1+2=3. <answer>\\boxed{3} </answer>", "1+2=", "1+2=3. <answer>\\boxed{5} </answer>"]
    batch = [{"question": "Ann has 1 pen. She buys 2. How many pens now?", "answer": "3"},
             {"question": "Bo has 2 cups. He finds 1. How many cups now?", "answer": "3"}]
    try:
        for reward, extra in (("verifree", {}), ("verifree", {"ignore_truncated": True, "loss_norm": "max_len",
                                                               "advantage": "grpo"}), ("verifier", {})):
            rc.reward = reward
            for k, v in extra.items():
                setattr(rc, k, v)
            _assert_same_step_off_and_on(recipe, model, texts, batch, "grad_in_forward", reward,
                                         rtol=1e-5, atol=1e-7, grad_rtol=1e-4)
    finally:
        (rc.answer_template, rc.reward, rc.grad_in_forward, rc.ignore_truncated, rc.loss_norm, rc.advantage) = saved


def test_packed_scoring_gives_the_padded_loss_and_gradients_in_fewer_rows(tiny):
    """recipe.pack_sequences: the G x prompts sequences scored packed into fewer rows (position ids restarting
    per sequence) give the hidden states, loss, metrics and parameter gradients of the padded layout, on both
    log-prob paths."""
    recipe, model, _, _ = tiny
    rc = recipe.rc
    saved = (rc.answer_template, rc.grad_in_forward, rc.pack_sequences)
    rc.answer_template = ">{answer}"
    texts = ["1+2=3. <answer>\\boxed{3} </answer>", "1+2=3. I add one and two, which gives three. <answer>\\boxed{3} "
             "</answer>", "1+2=3. no tag", "1+2=", "1+2=3. <answer>\\boxed{4} </answer>"]
    batch = [{"question": "Ann has 1 pen. She buys 2. How many pens now?", "answer": "3"},
             {"question": "Bo has 2 cups. He finds 1. How many cups now?", "answer": "3"}]
    # the hidden states: the same at every real token, from fewer rows
    tok = recipe.tokenizer
    enc = tok(["a short one", "a much longer sequence of several words here", "mid length text", "x"],
              return_tensors="pt", padding=True, padding_side="right")
    rows = []
    hook = model.get_decoder().register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                                         with_kwargs=True)
    with torch.no_grad():
        plain = vf.decoder_hidden(model, enc.input_ids, enc.attention_mask)
        packed = vf.decoder_hidden(model, enc.input_ids, enc.attention_mask, packed=True)
    hook.remove()
    real = enc.attention_mask.bool()
    assert rows[1] < rows[0] == 4
    torch.testing.assert_close(packed[real], plain[real], rtol=1e-4, atol=1e-5)
    assert (packed[~real] == 0).all()
    try:
        for gif in (True, False):
            rc.grad_in_forward = gif
            _assert_same_step_off_and_on(recipe, model, texts, batch, "pack_sequences", gif,
                                         rtol=1e-4, atol=1e-6, grad_rtol=1e-3)
    finally:
        rc.answer_template, rc.grad_in_forward, rc.pack_sequences = saved


def test_rollout_from_the_model_and_metrics(tiny):
    recipe, model, train, _ = tiny
    loss, metrics = recipe.loss(model, [train[0], train[1]], 0)   # a random model: real HF generate path
    loss.backward()
    assert torch.isfinite(loss) and 0 <= metrics["reward"] <= 1
    assert 0 < metrics["response_len"] <= recipe.rc.max_new_tokens


def test_rollout_stops_at_closing_tag_and_groups_by_prompt(tiny):
    recipe, model, _, _ = tiny
    tok = recipe.tokenizer
    pol = Scripted(model, tok, ["3+4=7. <answer> \\boxed{7} </answer> and more text"])
    out = vf.sample_responses(pol, tok, ["Q: a\nA: ", "Q: bb\nA: "], 3, 1.0, 1.0, 64, "</answer>")
    assert [r.prompt_index for r in out] == [0, 0, 0, 1, 1, 1]
    assert all(r.text == "3+4=7. <answer> \\boxed{7} </answer>" and r.finish == "stop" for r in out)
    short = vf.sample_responses(pol, tok, ["Q: a\nA: "], 2, 1.0, 1.0, 10, "</answer>")
    assert all(r.finish == "length" and len(r.ids) == 10 for r in short)
    # a tokenizer that pads with its eos: generate's fill after the closing tag is not a sampled eos (the verifier
    # baseline trained on it), an eos the policy sampled is
    eos, saved_pad = tok.eos_token_id, tok.pad_token
    tok.pad_token = tok.eos_token
    try:
        stopped = tok("1 <answer> \\boxed{1} </answer>", add_special_tokens=False).input_ids
        ended = tok("no tag here, " * 4, add_special_tokens=False).input_ids + [eos]   # longer: fill after a
        pol = Scripted(model, tok, ["x"])
        pol.scripts = [stopped, ended]
        a, b = vf.sample_responses(pol, tok, ["Q: a\nA: "], 2, 1.0, 1.0, 64, "</answer>")
    finally:
        tok.pad_token = saved_pad
    assert a.finish == "stop" and a.ids == stopped
    assert b.finish == "eos" and b.ids == ended


def test_rollouts_ignore_the_checkpoints_generation_config(tiny):
    """generate() filled every setting the rollout left unset from the model's generation_config (a checkpoint's
    generation_config.json: Qwen2.5-Instruct ships repetition_penalty 1.05): rollouts came from a penalised
    distribution and were scored under the unpenalised policy (a biased gradient), and greedy evaluation was not
    greedy. The samples (same seed) and the greedy answers are now those of the bare policy."""
    import copy
    recipe, model, _, _ = tiny
    tok = recipe.tokenizer
    prompts = ["Q: Ann has 1 pen. She buys 2. How many pens now?\nA: ", "Q: 1+1\nA: "]

    def rollouts():
        out = []
        for temperature, group in ((1.0, 2), (0.0, 1)):
            torch.manual_seed(0)
            out.append([r.ids for r in vf.sample_responses(model, tok, prompts, group, temperature, 1.0, 12,
                                                           "</answer>")])
        return out

    bare = rollouts()
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    for k, v in dict(repetition_penalty=3.0, no_repeat_ngram_size=1, top_k=3, min_new_tokens=12).items():
        setattr(model.generation_config, k, v)
    try:
        assert rollouts() == bare
        assert model.generation_config.repetition_penalty == 3.0          # the model's own is left as it was
    finally:
        model.generation_config = saved


def test_kl_to_the_starting_policy_is_zero_at_start_and_grows_after_a_step(tiny, tmp_path):
    recipe, model, _, _ = tiny
    rc = recipe.rc
    policy = Scripted(model, recipe.tokenizer, ["1+2=3. <answer>\\boxed{3} </answer>", "1+2=4. no tag"])
    batch = [{"question": "Ann has 1 pen. She buys 2. How many pens now?", "answer": "3"}]
    old = (recipe.run_dir, rc.kl_coef)
    recipe.run_dir, rc.kl_coef = str(tmp_path), 0.5
    try:
        recipe.prepare(None, model)                       # saves the starting weights as the KL anchor
        recipe.after_engine(None, model)
        loss, metrics = recipe.loss(policy, batch, 0)
        assert abs(metrics["kl"]) < 1e-6 and torch.isfinite(loss)
        with torch.no_grad():                             # move the policy away from the anchor
            for p in model.parameters():
                p += 0.05 * torch.randn_like(p)
        loss2, metrics = recipe.loss(policy, batch, 1)
        assert metrics["kl"] > 1e-3
        loss2.backward()                                  # the KL term has a gradient pulling back
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    finally:
        with torch.no_grad():                             # restore the shared fixture's weights
            from safetensors.torch import load_file
            model.load_state_dict(load_file(recipe.kl_reference_file()))
        recipe.run_dir, rc.kl_coef = old
        model.zero_grad()


def test_a_kl_term_does_not_change_the_sampled_rollouts(tiny, tmp_path):
    """kl_coef > 0 builds the reference model in after_engine, before the first rollout: building it (weights
    initialised from the config) must not draw from the global RNG, or a KL ablation samples other traces."""
    recipe, model, train, _ = tiny
    rc = recipe.rc
    prompts = [vf.fill(rc.prompt_template, question=ex["question"]) for ex in train[:2]]
    old = (recipe.run_dir, rc.kl_coef, rc.eval_before_rl)
    recipe.run_dir, rc.eval_before_rl = str(tmp_path), False
    rollouts = {}
    try:
        for kl in (0.0, 0.5):
            rc.kl_coef, recipe._ref_model = kl, None
            recipe.prepare(None, model)
            torch.manual_seed(123)
            state = torch.get_rng_state()
            recipe.after_engine(None, model)
            assert torch.equal(torch.get_rng_state(), state), f"kl_coef={kl} moved the global RNG"
            assert (recipe._ref_model is not None) == (kl > 0)
            rollouts[kl] = [r.ids for r in recipe.rollout(model, prompts, rc.group_size, rc.temperature, 16)]
    finally:
        recipe.run_dir, rc.kl_coef, rc.eval_before_rl = old
        recipe._ref_model = None
    assert rollouts[0.0] == rollouts[0.5]
    assert len({tuple(ids) for ids in rollouts[0.0]}) > 1     # sampled, not one greedy answer repeated


def test_a_rollout_chunk_below_a_group_is_a_config_error():
    """rollout_chunk caps the sequences of one generate call, which samples whole groups: 0 < chunk < G (or < the
    held-out eval_samples) could not keep the cap, so it is refused with the valid range."""
    for ov, least in ((["recipe.rollout_chunk=3"], 8), (["recipe.rollout_chunk=-1"], 8),
                      (["recipe.rollout_chunk=8", "recipe.eval_samples=12"], 12)):
        with pytest.raises(ValueError, match=rf"recipe.rollout_chunk={ov[0].split('=')[1]}: .*Valid values: 0 "
                                             rf"\(the whole micro-batch at once\) or >= {least}"):
            vf.VeriFree(_cfg("recipe.group_size=8", *ov), "/tmp")
    for ok in ("0", "8", "12"):
        recipe = vf.VeriFree(_cfg("recipe.group_size=8", f"recipe.rollout_chunk={ok}"), "/tmp")
        assert recipe.rc.rollout_chunk == int(ok)


def test_vllm_backend_is_optional_and_says_how_to_get_it(tiny, monkeypatch):
    recipe, model, _, _ = tiny
    monkeypatch.setitem(sys.modules, "vllm", None)       # as if vllm were not installed
    recipe.rc.rollout_backend = "vllm"
    try:
        with pytest.raises(ImportError, match="rollout_backend=vllm needs the vllm package"):
            recipe.loss(model, [{"question": "q", "answer": "1"}], 0)
    finally:
        recipe.rc.rollout_backend = "hf"


def test_bad_config_values_are_named():
    from conftest import run_cli
    p = run_cli(["validate", "recipe=verifree", "recipe.reward=bogus", "recipe.advantage=rlo"], check=False)
    assert p.returncode != 0
    assert "recipe.reward=bogus" in p.stdout + p.stderr and "verifree, verifier" in p.stdout + p.stderr
    assert "rloo, grpo, naive" in p.stdout + p.stderr
    with pytest.raises(ValueError, match="group_size"):
        vf.VeriFree(_cfg("recipe.group_size=1"), "/tmp")
    with pytest.raises(ValueError, match="prompt_template"):
        vf.VeriFree(_cfg("recipe.prompt_template=no_placeholder"), "/tmp")


# ---------------------------------------------------------------------------------------------------------
# 4. Data: the generated task's held-out split, JSONL loading with file:line errors
# ---------------------------------------------------------------------------------------------------------

def test_generated_task_traces_are_correct_and_held_out_is_disjoint():
    task = ArithmeticTask(steps=2, max_operand=9, seed=3)
    train, held = task.generate(500, "train"), task.generate(50, "eval")
    assert not {r["signature"] for r in train} & {r["signature"] for r in held}
    for r in train[:100]:
        last = r["trace"].strip().split(" ")[-1].rstrip(".")
        assert last.split("=")[1] == r["answer"] and int(r["answer"]) >= 0
        assert eval(last.split("=")[0]) == int(r["answer"])   # noqa: S307 (digits and +/- only)
    assert len({r["signature"] for r in held}) == 50


def test_flawed_warmup_traces_answer_what_their_reasoning_says():
    from runx.recipes.verifree_task import corrupt_trace
    task = ArithmeticTask(steps=3, max_operand=9, seed=3)
    rng = random.Random(0)
    for ex in task.generate(50, "train"):
        full = [s for s in ex["trace"].split(". ") if s.strip()]
        early = corrupt_trace(ex, rng, "early_stop")
        steps = [s for s in early["trace"].split(". ") if s.strip()]
        assert 1 <= len(steps) < len(full) and steps == full[:len(steps)]
        assert early["answer"] == steps[-1].split("=")[1].rstrip(".")
        slip = corrupt_trace(ex, rng, "slip")
        steps = [s.rstrip(".") for s in slip["trace"].split(". ") if s.strip()]
        wrong = [s for s in steps if eval(s.split("=")[0]) != int(s.split("=")[1])]   # noqa: S307
        assert len(wrong) == 1 and slip["answer"] == steps[-1].split("=")[1] != ex["answer"]


def test_jsonl_loading_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "q1", "answer": "a1"}\n\n{"question": "q2", "answer": 7}\n')
    assert qa_rows(read_files(str(p), "jsonl"), str(p)) == [{"question": "q1", "answer": "a1"},
                                                            {"question": "q2", "answer": "7"}]
    p.write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl row 2: missing field"):
        qa_rows(read_files(str(p), "jsonl"), str(p))
    p.write_text('{"question": "q1", "answer": "a1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON"):
        read_files(str(p), "jsonl")


def test_recipe_reads_jsonl_and_hf_datasets_with_configurable_fields(tmp_path):
    import datasets
    rows = [{"problem": f"q{i}", "solution": str(i)} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:15]))
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows[15:]))
    cfg = _cfg("data.kind=jsonl", f"data.path={tmp_path}", "recipe.question_field=problem",
               "recipe.answer_field=solution", "recipe.warmup_steps=0", "data.max_eval_samples=null")
    train, held = vf.VeriFree(cfg, str(tmp_path)).build_data()
    assert len(train) == 15 and held[0] == {"question": "q15", "answer": "15"}
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    cfg = _cfg("data.kind=hf", f"data.path={tmp_path / 'hf'}", "recipe.question_field=problem",
               "recipe.answer_field=solution", "recipe.warmup_steps=0", "data.val_fraction=0.25",
               "data.max_eval_samples=null")
    train, held = vf.VeriFree(cfg, str(tmp_path)).build_data()
    assert len(train) == 15 and len(held) == 5            # no validation split: a held-out fraction
    assert {r["question"] for r in train.rows} | {r["question"] for r in held.rows} == {r["problem"] for r in rows}


def test_group_choices_replace_the_embedded_model_data_prompt_and_warmup():
    from runx.cli.config import compose
    from runx.conf.schema.verifree import PAPER_PROMPT
    emb = compose(["recipe=verifree"])
    assert emb.model.from_config.hidden_size == 128 and emb.model.path == "builtin:bytes"
    assert emb.data.kind == "generated" and emb.recipe.warmup_steps == 300
    assert emb.recipe.prompt_template == "Q: {question}\nA: "
    user = compose(["recipe=verifree", "model=hf_causal_lm", "model.path=/m", "data=jsonl", "data.path=/d.jsonl"])
    assert user.model.from_config is None and user.model.path == "/m"
    assert (user.data.kind, user.data.path, user.data.name) == ("jsonl", "/d.jsonl", "jsonl")
    assert user.recipe.warmup_steps == 0 and user.recipe.prompt_template == PAPER_PROMPT
    hf = compose(["recipe=verifree", "data=hf", "data.hf_name=/x"])
    assert hf.data.kind == "hf" and hf.recipe.warmup_steps == 0


def test_user_data_problems_are_config_problems_before_the_model(tmp_path, monkeypatch):
    from runx.trainers import hf
    from runx.trainers.recipe import RecipeConfigError, build_recipe
    monkeypatch.setattr(hf, "load_model", lambda *a, **k: pytest.fail("the model was built"))
    (tmp_path / "qa.jsonl").write_text('{"question": "1+1", "answer": "2"}\n' * 4)
    for overrides, words in [
            (["data.kind=jsonl", f"data.path={tmp_path / 'qa.jsonl'}", "recipe.warmup_steps=5"],
             ["recipe.warmup_steps=5", "'trace'", "recipe.warmup_steps=0"]),
            (["data.kind=jsonl", f"data.path={tmp_path / 'qa.jsonl'}", "recipe.question_field=problem"],
             ["missing field", "recipe.question_field"]),
            (["data.kind=imagefolder", f"data.path={tmp_path}"], ["data.kind=imagefolder", "parquet, csv, hf"])]:
        with pytest.raises(RecipeConfigError) as e:
            build_recipe(vf.VeriFree, _cfg(*overrides), str(tmp_path))
        assert all(w in str(e.value) for w in words), str(e.value)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RecipeConfigError, match="0 training rows"):
        build_recipe(vf.VeriFree, _cfg("data.kind=jsonl", f"data.path={tmp_path / 'empty.jsonl'}"), str(tmp_path))
    # rows with traces warm up
    (tmp_path / "t.jsonl").write_text('{"question": "1+1", "answer": "2", "trace": "1+1=2. "}\n' * 4)
    recipe = vf.VeriFree(_cfg("data.kind=jsonl", f"data.path={tmp_path / 't.jsonl'}", "recipe.warmup_steps=5"),
                         str(tmp_path))
    assert recipe.build_data()[0][0]["trace"] == "1+1=2. "


def test_prompts_longer_than_max_prompt_length_are_dropped_and_positions_checked(tmp_path, caplog):
    """VeriFree never looked at prompt lengths: an over-long question crashed mid-run on a model with learned
    positions (GPT-2: an IndexError in generate). Now prompts longer than recipe.max_prompt_length are dropped
    with a warning naming the first (as SFT drops what data.max_length leaves no response of), none left is a
    config error, and recipe.max_prompt_length + recipe.max_new_tokens beyond a learned-position model's positions
    is refused before any weight is read. (A new key: a run saved before it had data.max_length=64, which would
    have dropped most of the embedded task's prompts on resume.)"""
    from runx.trainers.recipe import RecipeConfigError, build_recipe
    caplog.set_level("WARNING", logger="runx.verifree")
    long_q = "Ann has 7 pens. " * 8 + "How many pens now?"
    rows = [{"question": "1+1?", "answer": "2"}, {"question": long_q, "answer": "7"},
            {"question": "2+2?", "answer": "4"}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "long.jsonl").write_text(json.dumps(rows[1]))
    data = ["data.kind=jsonl", "recipe.warmup_steps=0", "recipe.max_prompt_length=40", "data.val_fraction=0.3"]
    train, held = vf.VeriFree(_cfg(*data, f"data.path={tmp_path / 'qa.jsonl'}"), str(tmp_path)).build_data()
    assert sorted(r["question"] for r in list(train.rows) + list(held.rows)) == ["1+1?", "2+2?"]
    warned = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warned) == 1 and "qa.jsonl row 2" in warned[0] and "recipe.max_prompt_length=40" in warned[0], warned
    with pytest.raises(RecipeConfigError, match=r"recipe\.max_prompt_length=40: .*long\.jsonl row 1"):
        build_recipe(vf.VeriFree, _cfg(*data, f"data.path={tmp_path / 'long.jsonl'}"), str(tmp_path))
    # the generated task fits the embedded model's default; its prompts are checked too
    rec = vf.VeriFree(_cfg("recipe.task_train_size=16", "recipe.task_eval_size=4"), str(tmp_path))
    assert len(rec.build_data()[0]) == 16
    with pytest.raises(RecipeConfigError, match="generated training problems"):
        vf.VeriFree(_cfg("recipe.task_train_size=16", "recipe.max_prompt_length=10"), str(tmp_path)).build_data()
    # learned positions (GPT-2): the longest prompt + answer must fit, refused before the model is built
    gpt2 = ["model.from_config.model_type=gpt2", "recipe.warmup_steps=0"]
    with pytest.raises(RecipeConfigError, match=r"recipe\.max_prompt_length \+ recipe\.max_new_tokens=292: .*256"):
        build_recipe(vf.VeriFree, _cfg(*gpt2, "recipe.max_new_tokens=100"), str(tmp_path))
    with pytest.raises(RecipeConfigError, match=r"recipe\.eval_max_new_tokens=292"):
        build_recipe(vf.VeriFree, _cfg(*gpt2, "recipe.eval_max_new_tokens=100"), str(tmp_path))
    build_recipe(vf.VeriFree, _cfg(*gpt2), str(tmp_path))                       # 192 + 64 = 256: fits


def test_fused_logprob_is_refused_for_a_model_that_transforms_its_logits_after_the_head():
    """The fused head scores h W^T / T; Gemma-2's final logit softcap is not in it: the policy would be trained
    on another distribution than it samples from. Refused before any weight is read (recipe.fused_logprob=false
    is the way); the embedded model is not."""
    from runx.cli.config import compose
    from runx.cli.main import _recipe_problems
    base = ["recipe=verifree", "logger=none"]
    gemma2 = base + ["++model.from_config.model_type=gemma2"]
    problems = _recipe_problems(compose(gemma2))
    assert len(problems) == 1 and "recipe.fused_logprob=false" in problems[0], problems
    assert "final_logit_softcapping" in problems[0]
    assert _recipe_problems(compose(gemma2 + ["recipe.fused_logprob=false"])) == []
    assert _recipe_problems(compose(base)) == []


def test_recipe_reads_parquet_csv_and_a_saved_single_dataset(tmp_path):
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"problem": f"q{i}", "solution": str(i)} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "qa.parquet"))
    with open(tmp_path / "qa.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["problem", "solution"])
        w.writeheader()
        w.writerows(rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))   # a Dataset, not a DatasetDict
    fields = ["recipe.question_field=problem", "recipe.answer_field=solution", "data.val_fraction=0.25",
              "recipe.warmup_steps=0", "data.max_eval_samples=null"]
    for kind, path in [("parquet", "qa.parquet"), ("csv", "qa.csv"), ("hf", "ds")]:
        train, held = vf.VeriFree(_cfg(f"data.kind={kind}", f"data.path={tmp_path / path}", *fields),
                                  str(tmp_path)).build_data()
        qs = [r["question"] for r in train.rows], [r["question"] for r in held.rows]
        assert len(qs[0]) == 15 and len(qs[1]) == 5 and sorted(qs[0] + qs[1]) == sorted(r["problem"] for r in rows)


def test_export_writes_a_tokenizer_that_loads_with_transformers(tmp_path):
    from transformers import AutoTokenizer
    recipe = vf.VeriFree(_cfg(), str(tmp_path))
    model = recipe.build_model()
    recipe.export(model, model.state_dict(), str(tmp_path / "export"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    text = "Q: 2+3\nA: 2+3=5. <answer> \\boxed{5} </answer>"
    assert tok(text).input_ids == recipe.tokenizer(text).input_ids and tok.eos_token == recipe.tokenizer.eos_token


# ---------------------------------------------------------------------------------------------------------
# 5. ZeRO-3: rollout on a partitioned policy, and one update through the fused log-prob equals the same
#    update on an unpartitioned copy (the LM head is called as a module so ZeRO-3 gathers its weight)
# ---------------------------------------------------------------------------------------------------------

ZERO3_SCRIPT = r"""
import copy, json
import torch
from runx.trainers import runtime
from runx.cli.config import compose
from runx.recipes import verifree as vf

runtime.init_distributed("cpu")
import deepspeed
recipe = vf.VeriFree(compose(["recipe=verifree", "logger=none"]), "/tmp")
torch.manual_seed(0)
model = recipe.build_model()
ref, init = copy.deepcopy(model), copy.deepcopy(model)
ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "gradient_clipping": 0.0,
      "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=ds)
policy = vf.unwrap(engine)
tok = recipe.tokenizer
out = vf.sample_responses(policy, tok, ["Q: 1+1\nA: ", "Q: 2+2\nA: "], 2, 1.0, 1.0, 6, "</answer>")
resp = [vf.Response(0, [], "2+3=5. <answer> \\boxed{5} </answer>", "stop"),
        vf.Response(0, [], "2+3=6. <answer> \\boxed{6} </answer>", "stop")]
seqs = vf.build_verifree_sequences(tok, ["Q: 2+3\nA: "], resp, ["5"], ">{answer}", "<answer", 64)

def loss_of(pol):
    lp, _ = vf.sequence_logprobs(pol, seqs)
    think, ans = (lp * (seqs.role == vf.THINK)).sum(1), (lp * (seqs.role == vf.ANSWER)).sum(1)
    return vf.verifree_loss(think, ans, torch.tensor([0.9, 0.1]), 2)[0]

partitioned = vf.is_zero3_partitioned(policy) and policy.get_output_embeddings().weight.numel() == 0
loss = loss_of(policy)
engine.backward(loss)
engine.step()
ref_loss = loss_of(ref)
ref_loss.backward()
with torch.no_grad():
    for p in ref.parameters():
        p -= 0.5 * p.grad
    with deepspeed.zero.GatheredParameters(list(policy.parameters())):
        diff = max(float((p - q).abs().max()) for p, q in zip(policy.parameters(), ref.parameters()))
        step = min(float((q - q0).abs().max()) for q, q0 in zip(ref.parameters(), init.parameters()))
print(json.dumps({"partitioned": partitioned, "n_rollouts": len(out),
                  "lens": [len(r.ids) for r in out], "loss": float(loss), "ref_loss": float(ref_loss),
                  "max_param_diff": diff, "min_ref_step": step}))
"""


def test_zero3_partitioned_rollout_and_update_match_unpartitioned():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    proc = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["partitioned"]
    assert res["n_rollouts"] == 4 and all(0 < n <= 6 for n in res["lens"])
    assert abs(res["loss"] - res["ref_loss"]) < 1e-5
    assert res["min_ref_step"] > 1e-4                  # every parameter moved ...
    assert res["max_param_diff"] < 1e-5                # ... exactly as without partitioning

# ---------------------------------------------------------------------------------------------------------
# 6. End to end through the CLI
# ---------------------------------------------------------------------------------------------------------

def _train(run_dir, *overrides, timeout=600):
    from conftest import read_metrics, run_cli
    # a tiny model: extra threads only contend (10x slower on a busy machine)
    run_cli(["train", "recipe=verifree", "debug=smoke", f"run_dir={run_dir}", *overrides], timeout=timeout,
            env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    with open(os.path.join(run_dir, "summary.json")) as f:
        return read_metrics(run_dir), json.load(f)


def test_runx_train_verifree_smoke_end_to_end(tmp_path):
    rows, summary = _train(tmp_path / "run")
    assert len(rows) == 4 and all(0 <= r["reward"] <= 1 for r in rows)
    assert {"reward", "acc", "response_len", "no_tag_frac", "truncated_frac", "entropy", "loss_pg",
            "loss_answer"} <= set(rows[0])
    assert 0 <= summary["eval/acc"] <= 1 and 0 <= summary["start/acc"] <= 1   # after and before RL
    from runx.recipes import RECIPES     # what trainer.monitor may name covers what the evaluation reports
    assert {k[5:] for k in summary if k.startswith("eval/")} <= set(RECIPES["verifree"].eval_metrics)
    warm = [d for d in os.scandir(tmp_path / "run" / "warmup")]                # the warm-up is cached in the run dir
    assert warm and os.path.exists(os.path.join(warm[0].path, "model.safetensors"))


def test_start_numbers_survive_a_resume_and_do_not_move_training(tmp_path):
    """The evaluation before RL runs on its own random stream (eval_before_rl=false trains the same run), and its
    numbers reach the summary of a run killed and resumed (the resumed segment does not evaluate its start)."""
    from conftest import run_cli
    cold = ["recipe.warmup_steps=0", "trainer.ckpt_every=1", "trainer.eval_every=0", "recipe.eval_samples=1"]
    rows, summary = _train(tmp_path / "whole", *cold)
    off, _ = _train(tmp_path / "off", *cold, "recipe.eval_before_rl=false")
    # the rollouts themselves: sampled lengths and entropies (the untrained policy's losses are all 0)
    assert [(r["response_len"], r["entropy"], r["loss"]) for r in rows] == \
        [(r["response_len"], r["entropy"], r["loss"]) for r in off]
    start = {k: v for k, v in summary.items() if k.startswith("start/")}
    assert "start/acc_sampled" in start
    args = ["train", "recipe=verifree", "debug=smoke", f"run_dir={tmp_path / 'cut'}", *cold]
    p = run_cli(args, env={"RUNX_CRASH_AFTER_STEP": "2", "OMP_NUM_THREADS": "1"}, check=False)
    assert p.returncode == 17
    run_cli(args, env={"OMP_NUM_THREADS": "1"})
    with open(tmp_path / "cut" / "summary.json") as f:
        resumed = json.load(f)
    assert {k: v for k, v in resumed.items() if k.startswith("start/")} == start
    assert abs(resumed["final_loss"] - summary["final_loss"]) <= 1e-6 * max(1.0, abs(summary["final_loss"]))


def test_warm_start_or_kl_anchor_with_parameters_on_nvme_is_a_config_error(tmp_path):
    from runx.cli.config import compose
    from runx.trainers.recipe import RecipeConfigError, build_recipe
    for extra, key in ((["recipe.warmup_steps=5"], "recipe.warmup_steps=5"),
                       (["recipe.warmup_steps=0", "recipe.kl_coef=0.1"], "recipe.kl_coef=0.1")):
        cfg = compose(["recipe=verifree", "trainer=zero3_nvme", f"trainer.nvme_path={tmp_path}", *extra])
        with pytest.raises(RecipeConfigError, match=key.replace(".", r"\.")):
            build_recipe(vf.VeriFree, cfg, str(tmp_path))
    cfg = compose(["recipe=verifree", "trainer=zero3_nvme", f"trainer.nvme_path={tmp_path}", "recipe.warmup_steps=0"])
    build_recipe(vf.VeriFree, cfg, str(tmp_path))                      # neither: fine


@pytest.mark.slow
def test_runx_train_verifier_baseline_on_zero3_smoke(tmp_path):
    """Without a warm start the policy is built partitioned on 2 ZeRO-3 processes; its evaluation before RL runs
    through the engine's hooks and matches the same start evaluated whole in one process."""
    cold = ["recipe.reward=verifier", "recipe.warmup_steps=0"]
    rows, summary = _train(tmp_path / "run", *cold, "trainer=zero3", "trainer.num_procs=2")
    assert len(rows) == 4 and all(r["reward"] in (0.0, 0.5, 1.0) or 0 <= r["reward"] <= 1 for r in rows)
    assert "eval/acc" in summary
    with open(tmp_path / "run" / "train.log") as f:
        assert "building the model partitioned across 2 rank(s)" in f.read()
    _, whole = _train(tmp_path / "whole", *cold, "trainer=zero2", "trainer.max_steps=1")
    start = {k: v for k, v in summary.items() if k.startswith("start/")}
    assert start and start == {k: v for k, v in whole.items() if k.startswith("start/")}


def test_plan_counts_the_rollout_kv_cache_and_the_sequences_a_micro_batch_trains(tmp_path):
    """`runx plan` sizes VeriFree's micro-batch as micro_batch_size x G sequences of prompt + max_new_tokens and
    adds the rollout's KV cache (one generate call) and, with a KL term, the reference copy."""
    from runx.cli.config import compose
    from runx.trainers import plan
    cfg = compose(["recipe=verifree", "logger=none", "trainer.micro_batch_size=3", "recipe.group_size=4",
                   "recipe.max_new_tokens=100", "recipe.rollout_chunk=8"])
    model, recipe, _ = plan.build_on_meta(cfg)
    assert plan.plan_batch(cfg, recipe) == (12, int(cfg.recipe.max_prompt_length) + 100, False)
    c = model.config
    kv_heads = c.num_key_value_heads
    per_token = 2 * c.num_hidden_layers * kv_heads * (c.hidden_size // c.num_attention_heads) * 4   # fp32 run
    ((label, kv),) = recipe.extra_memory(model, 1, {"cpu": 2**34, "device": 2**34})["device"].items()
    assert kv == 8 * (int(cfg.recipe.max_prompt_length) + 100) * per_token and "8 sequences" in label
    cfg2 = compose(["recipe=verifree", "logger=none", "recipe.kl_coef=0.1", "recipe.rollout_backend=vllm"])
    model2, recipe2, _ = plan.build_on_meta(cfg2)
    terms = recipe2.extra_memory(model2, 1, {"cpu": 2**34, "device": 2**34})["device"]
    assert terms["KL reference model"] == sum(p.numel() * 4 for p in model2.parameters())
    assert terms["vLLM engine (rollouts)"] == int(0.3 * 2**34)
    # the plan carries them: its breakdown has the KV cache next to the traced activations of 12 sequences
    facts = plan.model_facts(cfg)
    assert "12 sequences" in facts.activation_how
    extra = facts.extra_memory(1, {"cpu": 2**34, "device": 2**34}, False)
    assert extra["device"] and next(iter(extra["device"])).startswith("rollout KV cache")


def test_zero3_builds_partitioned_unless_prepare_needs_whole_weights(tmp_path):
    """prepare() touches the model before the DeepSpeed engine exists when it warm-starts or keeps a KL anchor:
    those runs build the model whole under ZeRO-3; without them it is built partitioned (the evaluation before RL
    runs through the engine, after_engine)."""
    from runx.cli.config import compose
    from runx.trainers.recipe import build_recipe, builds_partitioned
    base = ["recipe=verifree", "trainer=zero3", "recipe.warmup_steps=0"]
    for extra, partitioned in (([], True), (["recipe.eval_before_rl=false"], True),
                               (["recipe.eval_before_rl=false", "recipe.kl_coef=0.1"], False),
                               (["recipe.eval_before_rl=false", "recipe.warmup_steps=5"], False)):
        cfg = compose(base + extra)
        assert builds_partitioned(cfg, build_recipe(vf.VeriFree, cfg, str(tmp_path))) == partitioned, extra


def test_no_held_out_rows_means_no_evaluation_numbers(tmp_path):
    """data.max_eval_samples=0 was read as "no limit", and an empty held-out set was scored 0/1: acc 0.0,
    no_tag_frac 0.0, numbers that look measured. Now 0 means no evaluation set, and evaluating nothing gives
    no numbers."""
    import torch
    rec = vf.VeriFree(_cfg("data.max_eval_samples=0"), str(tmp_path))
    train, held = rec.build_data()
    assert len(train) > 0 and held is None
    rec3 = vf.VeriFree(_cfg("data.max_eval_samples=3"), str(tmp_path))
    assert len(rec3.build_data()[1]) == 3
    empty = torch.utils.data.DataLoader([], batch_size=2, collate_fn=rec.collate)
    assert rec.evaluate(rec.build_model(), empty) == {}


def test_rows_without_a_question_or_answer_are_refused_with_their_row():
    """null / "" / list answers and questions were taken as the literal text "None", "" or "['a', 'b']": RL then
    rewarded the policy for writing \\boxed{None}, and an empty reference scored an empty box as correct."""
    from runx.recipes.verifree_task import qa_rows
    assert qa_rows([{"question": "1+1?", "answer": 2}], "d.jsonl") == [{"question": "1+1?", "answer": "2"}]
    for row, field in (({"question": "1+1?", "answer": None}, "answer"), ({"question": None, "answer": "2"},
                       "question"), ({"question": "q", "answer": "  "}, "answer"),
                       ({"question": "q", "answer": ["a"]}, "answer")):
        with pytest.raises(ValueError, match=rf"d.jsonl row 2: recipe.{field}_field='{field}' is .*non-empty"):
            qa_rows([{"question": "ok", "answer": "1"}, row], "d.jsonl")


def test_a_run_that_finds_its_warm_up_cached_starts_rl_as_one_that_warmed_up(tmp_path):
    """The supervised warm-up left its last gradient on the model, and DeepSpeed added it to the first RL step's:
    a run that found the warm-up cached (a rerun after a crash before the first checkpoint, runs sharing
    recipe.warmup_cache) trained another policy. Now both start RL alike (the warm-up also on its own random
    stream), to the last step's loss and gradient norm."""
    from conftest import read_metrics, run_cli
    cache = tmp_path / "warmup"
    common = ["train", "recipe=verifree", "debug=smoke", "trainer.max_steps=2", "trainer.ckpt_every=0",
              "trainer.eval_every=0", "logger=none", "trainer.progress=false", f"recipe.warmup_cache={cache}"]
    run_cli(common + [f"run_dir={tmp_path / 'fresh'}"])
    assert len(list(cache.glob("*/model.safetensors"))) == 1
    run_cli(common + [f"run_dir={tmp_path / 'cached'}"])
    a, b = read_metrics(tmp_path / "fresh"), read_metrics(tmp_path / "cached")
    assert [(r["loss"], r.get("grad_norm")) for r in a] == [(r["loss"], r.get("grad_norm")) for r in b], (a, b)


def test_sampled_tokens_inside_the_reasoning_are_found_past_multibyte_characters():
    """A byte-level token can end inside a multi-byte character ("×"), whose prefix decodes to U+FFFD: the binary
    search for the sampled tokens inside z took that for the end of z and kept too few (24 of 52), so the rest of
    z was re-tokenised and REINFORCE scored tokens that were never sampled."""
    from runx.trainers.hf import byte_tokenizer
    tok = byte_tokenizer()
    for n in range(1, 40):
        z = "×" * n + " so 12 <answer"
        ids = tok(z + "> \\boxed{12} </answer>", add_special_tokens=False).input_ids
        true_k = max(j for j in range(len(ids) + 1) if z.startswith(tok.decode(ids[:j], skip_special_tokens=True)))
        assert vf.sampled_within(tok, ids, z) == true_k, n
