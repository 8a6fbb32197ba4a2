"""Tests for runx.kernels: linear_logprob and sinkhorn (issue #3).

CPU tests check the torch reference paths against fp64 references.  The Triton kernels
are checked on CPU through Triton's interpreter in a subprocess (TRITON_INTERPRET must be
set before triton kernels are defined); those tests fail, never skip, if the interpreter
cannot run.  Tests marked ``gpu`` run the same checks on CUDA and skip without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from runx.kernels import chunk_rows, linear_logprob, linear_logprob_weighted_sum, sinkhorn

# pytest-xdist (tests/run.sh runs 2 workers) keeps this file on one worker: its interpreter runs start once
pytestmark = pytest.mark.xdist_group("kernels")

IGNORE = -100


# ----------------------------------------------------------------------------------------
# References and shared checkers (also run inside the interpreter subprocess and on GPU)
# ----------------------------------------------------------------------------------------


def _ref_logprob(h, w, t, b, temperature):
    """fp64 log_softmax(h @ W.T / T).gather and entropy; ignored rows are 0."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    lp = torch.log_softmax(z / temperature, dim=-1)
    valid = t != IGNORE
    out = lp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    ent = -(lp.exp() * lp).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=h.device)
    return torch.where(valid, out, zero), torch.where(valid, ent, zero)


def _rel(a, r):
    a, r = a.double().cpu(), r.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()


def _check_logprob(n, hsz, v, dtype, *, device="cpu", backend="torch", bias=True, temperature=1.0,
                   chunk=None, entropy=True, ignore_frac=0.2, scale=1.0, seed=0, grad_tol=None):
    """Values and gradients against fp64 autograd; returns the measured errors."""
    gen = torch.Generator().manual_seed(seed)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    h = (torch.randn(n, hsz, generator=gen) * scale).to(dtype).to(device)
    w = (torch.randn(v, hsz, generator=gen) / hsz**0.5 * 3).to(dtype).to(device)
    b = (torch.randn(v, generator=gen)).to(dtype).to(device) if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < ignore_frac] = IGNORE
    t = t.to(device)
    g_lp = torch.randn(n, generator=gen).to(device)  # arbitrary per-token upstream grads
    g_ent = torch.randn(n, generator=gen).to(device)

    leaves = [x.clone().requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    out = linear_logprob(leaves[0], leaves[1], t, bias=leaves[2] if bias else None, temperature=temperature,
                         chunk=chunk, return_entropy=entropy, backend=backend)
    lp, ent = out if entropy else (out, None)
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    loss.backward()

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    rlp, rent = _ref_logprob(ref_leaves[0], ref_leaves[1], t, ref_leaves[2] if bias else None, temperature)
    rloss = (rlp * g_lp.double()).sum() + ((rent * g_ent.double()).sum() if entropy else 0.0)
    rloss.backward()

    errs = {"logp": _rel(lp.detach(), rlp.detach())}
    assert (lp <= 0).all(), f"positive log-prob {lp.max().item()}"
    valid = t != IGNORE
    assert (lp[~valid] == 0).all()
    if entropy:
        errs["entropy"] = _rel(ent.detach(), rent.detach())
        assert (ent[~valid] == 0).all()
        assert (ent[valid] >= -1e-4).all() and (ent[valid] <= torch.log(torch.tensor(float(v))) + 1e-3).all()
    for name, mine, ref in zip(["d_hidden", "d_weight", "d_bias"], leaves, ref_leaves):
        assert mine.grad is not None and mine.grad.dtype == dtype, name
        errs[name] = _rel(mine.grad, ref.grad)
    tols = {k: (grad_tol if grad_tol is not None and k.startswith("d_") else tol) for k in errs}
    # Ignored rows contribute nothing: their hidden-state gradient is exactly zero.
    assert (leaves[0].grad[~valid] == 0).all()
    bad = {k: e for k, e in errs.items() if not e <= tols[k]}
    assert not bad, f"errors above {tols}: {bad} (all: {errs})"
    return errs


def _swav_reference(scores, eps, iters, dtype=torch.float64):
    """SwAV's distributed_sinkhorn for one process, verbatim (fp64 unless told)."""
    q = torch.exp(scores.to(dtype) / eps).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def _cosine_scores(b, k, dim=32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(b, dim, generator=gen), dim=1)
    protos = F.normalize(torch.randn(k, dim, generator=gen), dim=1)
    return (feats @ protos.T).to(device)


def _check_sinkhorn(b, k, eps, *, backend="torch", device="cpu", dtype=torch.float32, iters=3, seed=0,
                    scale=1.0):
    scores = (_cosine_scores(b, k, seed=seed) * scale).to(dtype).to(device)
    q = sinkhorn(scores, eps=eps, iters=iters, backend=backend)
    assert q.shape == (b, k) and q.dtype == torch.float32
    assert torch.isfinite(q).all()
    ref = _swav_reference(scores.cpu(), eps, iters)
    diff = (q.double().cpu() - ref).abs().max().item()
    assert diff <= 1e-4, f"max |Q - Q_swav| = {diff}"
    assert (q.sum(1).double().cpu() - 1).abs().max().item() <= 1e-5
    return diff


# ----------------------------------------------------------------------------------------
# linear_logprob, torch reference path
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n,hsz,v,bias,temperature,chunk",
    [
        (1, 8, 5, False, 1.0, None),
        (37, 24, 101, True, 0.7, 10),  # odd sizes, several chunks (fp32 dW accumulation)
        (64, 33, 257, False, 1.3, 64),
        (19, 16, 1000, True, 1.0, 7),
    ],
)
def test_logprob_matches_fp64(n, hsz, v, bias, temperature, chunk, dtype):
    _check_logprob(n, hsz, v, dtype, bias=bias, temperature=temperature, chunk=chunk)


def test_logprob_large_logits_stay_finite_and_nonpositive():
    # Logits of magnitude ~1e3: a naive exp overflows, log-softmax must not.  In fp32,
    # p = exp(z - lse) with z ~ 1e3 carries ~1e-4 relative error, hence grad_tol.  (Entropy
    # is ~0 here, so only its absolute error is meaningful: checked separately below.)
    errs = _check_logprob(23, 16, 77, torch.float32, scale=300.0, chunk=5, entropy=False, grad_tol=1e-3)
    assert errs["logp"] < 1e-5
    h, w = torch.randn(23, 16) * 300, torch.randn(77, 16) / 4 * 3
    t = torch.randint(0, 77, (23,))
    _, ent = linear_logprob(h, w, t, return_entropy=True, chunk=5)
    _, rent = _ref_logprob(h, w, t, None, 1.0)
    assert torch.isfinite(ent).all() and (ent.double() - rent).abs().max() < 1e-3


def test_logprob_without_entropy_and_leading_dims():
    torch.manual_seed(1)
    h = torch.randn(2, 5, 12, requires_grad=True)
    w = torch.randn(31, 12, requires_grad=True)
    t = torch.randint(0, 31, (2, 5))
    lp = linear_logprob(h, w, t, chunk=3)
    assert lp.shape == (2, 5)
    ref = torch.log_softmax(h.double() @ w.double().T, -1).gather(-1, t[..., None]).squeeze(-1)
    assert _rel(lp.detach(), ref.detach()) < 1e-6
    lp.sum().backward()
    ref.sum().backward()
    assert h.grad is not None and w.grad is not None


def test_logprob_follows_autocast_and_mixed_dtypes():
    torch.manual_seed(4)
    h = torch.randn(13, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (13,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = linear_logprob(h, w, t, chunk=4)
        lp.sum().backward()
    assert lp.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref, _ = _ref_logprob(h.detach().bfloat16(), w.detach().bfloat16(), t, None, 1.0)
    assert _rel(lp.detach(), ref) < 1e-5  # bf16 operands, fp32 accumulation
    # fp32 weight with bf16 hidden (no autocast): the weight follows hidden's dtype.
    w.grad = None
    lp2 = linear_logprob(h.detach().bfloat16(), w, t)
    lp2.sum().backward()
    assert w.grad.dtype == torch.float32 and _rel(lp2.detach(), ref) < 1e-5


def test_logprob_all_ignored_gives_zero_and_no_grad():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.full((6,), IGNORE)
    lp, ent = linear_logprob(h, w, t, return_entropy=True)
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()
    # an empty batch too (its detached zeros made backward() raise)
    h0 = torch.randn(0, 8, requires_grad=True)
    lp, ent = linear_logprob(h0, w, torch.zeros(0, dtype=torch.long), return_entropy=True)
    w.grad = None
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == (0,) and h0.grad.shape == (0, 8) and (w.grad == 0).all()


def test_logprob_chunk_size_does_not_change_result():
    torch.manual_seed(2)
    h, w = torch.randn(29, 10), torch.randn(45, 10)
    t = torch.randint(0, 45, (29,))
    outs = [linear_logprob(h, w, t, chunk=c, return_entropy=True) for c in (1, 4, 29, None)]
    for lp, ent in outs[1:]:
        torch.testing.assert_close(lp, outs[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ent, outs[0][1], rtol=1e-6, atol=1e-6)


def test_logprob_forward_only_under_no_grad():
    h, w = torch.randn(9, 6), torch.randn(13, 6)
    t = torch.randint(0, 13, (9,))
    with torch.no_grad():
        lp = linear_logprob(h, w, t)
    assert not lp.requires_grad
    ref, _ = _ref_logprob(h, w, t, None, 1.0)
    assert _rel(lp, ref) < 1e-6


def test_logprob_rejects_bad_inputs():
    h, w = torch.randn(4, 6), torch.randn(7, 6)
    with pytest.raises(ValueError):
        linear_logprob(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError):
        linear_logprob(h, w, torch.zeros(4))
    with pytest.raises(ValueError):
        linear_logprob(h, w, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError):
        linear_logprob(h, w, torch.zeros(4, dtype=torch.long), backend="cuda")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # An explicit Triton request on CPU without the interpreter must not silently fall back.
        with pytest.raises(RuntimeError):
            linear_logprob(h, w, torch.zeros(4, dtype=torch.long), backend="triton")


def test_vocab_slice_helper():
    from runx.kernels.logprob import vocab_slice

    assert vocab_slice(37, 101, 10) == 27  # 37 * 27 <= 10 * 101
    assert vocab_slice(32768, 151936, 883) % 128 == 0
    assert vocab_slice(32768, 151936, 883) * 32768 <= 883 * 151936
    assert vocab_slice(4, 100, 8) == 100


def test_chunk_rows_helper():
    assert chunk_rows(100, 50, 7) == 7
    assert chunk_rows(5, 50, 7) == 5
    assert chunk_rows(10**6, 152064) * 152064 <= 1 << 27
    assert chunk_rows(10**6, 152064) % 128 == 0
    assert chunk_rows(3, 10) == 3
    with pytest.raises(ValueError):
        chunk_rows(3, 10, 0)


class _MaxBytes(TorchDispatchMode):
    """Records the largest tensor (in bytes) produced by any aten op, forward and backward."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_bytes = max(self.max_bytes, o.numel() * o.element_size())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_torch_path_never_materialises_full_logits(dtype):
    n, hsz, v, chunk = 256, 8, 4000, 16  # N*V = 1.02M >> chunk*V = 64k > V*H = 32k elements
    h = torch.randn(n, hsz).to(dtype).requires_grad_()
    w = torch.randn(v, hsz).to(dtype).requires_grad_()
    b = torch.randn(v).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,))
    with _MaxBytes() as probe:
        lp, ent = linear_logprob(h, w, t, bias=b, chunk=chunk, return_entropy=True, backend="torch")
        (lp.sum() + ent.sum()).backward()
    assert h.grad is not None and w.grad is not None and b.grad is not None
    # Largest buffer: one fp32 chunk of logits (or an fp32 copy/accumulator of the weight).
    assert probe.max_bytes <= 4 * max(chunk * v, v * hsz), probe.max_bytes
    # ...and the probe does see a full materialisation when there is one.
    with _MaxBytes() as probe_eager:
        torch.log_softmax(h @ w.T, -1).gather(1, t[:, None]).sum().backward()
    assert probe_eager.max_bytes >= n * v * w.element_size()


# ----------------------------------------------------------------------------------------
# linear_logprob_weighted_sum: the gradient made in the forward
# ----------------------------------------------------------------------------------------


def _check_masked_vocab(backend):
    """A bias of -inf (banned tokens, a padded vocabulary) in the first vocabulary block and later: the entropy and
    its gradients were NaN on every path (0 * log 0), and the row kernel's log-probs too (-inf - -inf on a lane
    that had seen only -inf). Log-probs, entropies and gradients against fp64 with 0 log 0 = 0."""
    gen = torch.Generator().manual_seed(3)
    n, hsz, v = 7, 8, 150
    h = torch.randn(n, hsz, generator=gen, dtype=torch.float64)
    w = torch.randn(v, hsz, generator=gen, dtype=torch.float64)
    b = torch.zeros(v, dtype=torch.float64)
    b[[0, 1, 5, 77, 149]] = -float("inf")
    t = torch.tensor([2, 3, 4, 6, 100, 148, 10])
    ga, ge = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    # the reference leaves the banned columns out (p = 0 there), so that its own gradients stay finite
    keep = torch.isfinite(b)
    t_keep = torch.cumsum(keep, 0)[t] - 1
    ref = [x.clone().requires_grad_() for x in (h, w)]
    logp = torch.log_softmax(ref[0] @ ref[1][keep].T, -1)
    lp_r, ent_r = logp.gather(1, t_keep[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
    (ga * lp_r + ge * ent_r).sum().backward()
    xs = [x.float().requires_grad_() for x in (h, w)]
    if backend == "wsum":
        s, lp, ent = linear_logprob_weighted_sum(xs[0], xs[1], t, ga.float(), bias=b.float(), return_logp=True,
                                                 return_entropy=True, backend="triton")
        s.backward()
        h2, w2 = (x.clone().requires_grad_() for x in (h, w))
        lp2 = torch.log_softmax(h2 @ w2[keep].T, -1).gather(1, t_keep[:, None]).squeeze(1)
        grads_ref = torch.autograd.grad((ga * lp2).sum(), (h2, w2))
    else:
        lp, ent = linear_logprob(xs[0], xs[1], t, bias=b.float(), return_entropy=True, chunk=4, backend=backend)
        (ga.float() * lp + ge.float() * ent).sum().backward()
        grads_ref = [r.grad for r in ref]
    assert _rel(lp, lp_r.detach()) < 1e-5 and _rel(ent, ent_r.detach()) < 1e-5, (lp, ent)
    for x, r in zip(xs, grads_ref):
        assert torch.isfinite(x.grad).all() and _rel(x.grad, r) < 1e-5, _rel(x.grad, r)


def test_logprob_with_minus_inf_logits_torch():
    _check_masked_vocab("torch")


WSUM_CASES = [
    (1, 8, 5, False, 1.0, None),
    (37, 24, 101, True, 0.7, 10),    # odd sizes, several chunks
    (64, 33, 257, False, 1.3, 64),
    (19, 16, 1000, True, 1.0, 7),
]


def _check_weighted_sum(n, hsz, v, bias, temperature, chunk, dtype, backend="torch", scale=3.0, ent_tol=None,
                        dw_accum="fp32"):
    """S = sum_i w_i logp_i, its per-token log-probs / entropies and the gradients of c·S (c != 1: the upstream
    scalar is applied) against fp64 autograd; ignored rows count 0."""
    gen = torch.Generator().manual_seed(n + v)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    h = torch.randn(n, hsz, generator=gen, dtype=torch.float64)
    w = torch.randn(v, hsz, generator=gen, dtype=torch.float64) / hsz**0.5 * scale
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < 0.2] = IGNORE
    tw = torch.randn(n, generator=gen)
    refs = [x.clone().requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    lp, ent = _ref_logprob(refs[0], refs[1], t, refs[2] if bias else None, temperature)
    s_ref = (tw.double() * lp).sum()
    (-2.5 * s_ref).backward()
    xs = [x.to(dtype).requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    s, lp_x, ent_x = linear_logprob_weighted_sum(xs[0], xs[1], t, tw, bias=xs[2] if bias else None,
                                                 temperature=temperature, chunk=chunk, return_logp=True,
                                                 return_entropy=True, backend=backend, dw_accum=dw_accum)
    assert s.dtype == torch.float32 and not lp_x.requires_grad and (lp_x <= 0).all()
    (-2.5 * s).backward()
    assert abs(s.item() - s_ref.item()) <= tol * max(1.0, abs(s_ref.item()))
    assert _rel(lp_x, lp.detach()) < tol and _rel(ent_x, ent.detach()) < (ent_tol or tol), (_rel(lp_x, lp),
                                                                                         _rel(ent_x, ent))
    for x, r in zip(xs, refs):
        assert x.grad.dtype == dtype and _rel(x.grad, r.grad) < tol, (x.shape, _rel(x.grad, r.grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,hsz,v,bias,temperature,chunk", WSUM_CASES)
def test_weighted_sum_matches_fp64(n, hsz, v, bias, temperature, chunk, dtype):
    _check_weighted_sum(n, hsz, v, bias, temperature, chunk, dtype)


@pytest.mark.parametrize("n,hsz,v,bias,temperature,chunk", WSUM_CASES[1:])
def test_weighted_sum_with_dw_summed_in_bf16_matches_fp64(n, hsz, v, bias, temperature, chunk):
    """dw_accum='weight' (Liger's way: a bf16 weight's gradient summed in bf16 over the row chunks, 3-4 of them
    here) stays within the bf16 tolerance; it holds no fp32 [V, H] sum, and an unknown mode names the choices."""
    _check_weighted_sum(n, hsz, v, bias, temperature, chunk, torch.bfloat16, dw_accum="weight")
    from runx.kernels.logprob import _GradAccumulator
    w, h = torch.zeros(v, hsz, dtype=torch.bfloat16), torch.zeros(n, hsz, dtype=torch.bfloat16)
    kept = {m: _GradAccumulator(h, w, None, 4, True, True, False, dw_accum=m) for m in ("fp32", "weight")}
    assert kept["weight"].halves is None and kept["weight"].dw.dtype == torch.bfloat16
    assert kept["fp32"].dw is None and {p.dtype for *_, p in kept["fp32"].halves} == {torch.float32}
    with pytest.raises(ValueError, match="valid choices: fp32, weight"):
        linear_logprob_weighted_sum(h, w, torch.zeros(n, dtype=torch.long), torch.ones(n), dw_accum="bf16")


def test_weighted_sum_equals_linear_logprob_and_costs_three_quarters():
    """Same value and gradients as (w * linear_logprob(...)).sum(), with 3 GEMMs per chunk instead of 4:
    6·N·H·V multiply-adds x2 instead of 8 (counted at the aten level)."""
    torch.manual_seed(3)
    n, hsz, v, chunk = 40, 16, 300, 8
    h, w, b = torch.randn(n, hsz), torch.randn(v, hsz) / 4, torch.randn(v)
    t, tw = torch.randint(0, v, (n,)), torch.rand(n)
    flops = {}
    grads = {}
    for name in ("recompute", "in_forward"):
        xs = [x.clone().requires_grad_() for x in (h, w, b)]
        with _MatmulFlops() as probe:
            if name == "recompute":
                s = (tw * linear_logprob(xs[0], xs[1], t, bias=xs[2], chunk=chunk, backend="torch")).sum()
            else:
                s = linear_logprob_weighted_sum(xs[0], xs[1], t, tw, bias=xs[2], chunk=chunk)
            s.backward()
        flops[name], grads[name] = probe.flops, (s.detach(), *[x.grad for x in xs])
    for a, r in zip(grads["in_forward"], grads["recompute"]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert flops["recompute"] == 8 * n * hsz * v and flops["in_forward"] == 6 * n * hsz * v, flops
    # no gradient work at all under no_grad, also for a model's own weights (requires_grad: an evaluation with
    # the fused head ran the dW GEMM and held an fp32 [V, H] buffer)
    for leaves in ((h, w), (h.clone().requires_grad_(), w.clone().requires_grad_())):
        with torch.no_grad(), _MatmulFlops() as probe:
            linear_logprob_weighted_sum(*leaves, t, tw, chunk=chunk)
        assert probe.flops == 2 * n * hsz * v, probe.flops


def test_weighted_sum_follows_autocast():
    """Under autocast (trainer.precision=amp_bf16) the operands are bf16 like F.linear's, the fp32 leaves get fp32
    gradients through the cast, and the value matches the recomputing path on the same bf16 operands."""
    torch.manual_seed(5)
    h = torch.randn(21, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t, tw = torch.randint(0, 50, (21,)), torch.rand(21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = linear_logprob_weighted_sum(h, w, t, tw, chunk=4)
        s.backward()
        ref = (tw * linear_logprob(h.detach(), w.detach(), t, chunk=4)).sum()
    assert s.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(s.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert torch.isfinite(h.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("v,blk", [(9, 2), (10, 3), (1, None), (7, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_dw_halves_round_in_their_own_storage(v, blk, dtype):
    """The fp32 dW sum of a low-precision weight is rounded over the front half's bytes: the result equals a
    plain cast of the whole sum and lives in that storage (no [V, H] buffer beside the fp32 one), for odd and
    even V and with the rows rounded in several blocks."""
    from runx.kernels.logprob import _round_halves_in_place
    h = 6
    full = torch.randn(v, h) * 100
    m = (v + 1) // 2
    front, back = full[:m].clone(), full[m:].clone()
    out = _round_halves_in_place([(0, m, front), (m, v, back)], dtype, v, h, blk=blk)
    assert out.dtype == dtype and out.shape == (v, h)
    assert torch.equal(out, full.to(dtype))
    assert out.untyped_storage().data_ptr() == front.untyped_storage().data_ptr()


def test_weighted_sum_bounds_memory_and_refuses_a_second_backward():
    n, hsz, v, chunk = 256, 8, 4000, 16
    h = torch.randn(n, hsz).requires_grad_()
    w = torch.randn(v, hsz).requires_grad_()
    t, tw = torch.randint(0, v, (n,)), torch.randn(n)
    with _MaxBytes() as probe:
        s = linear_logprob_weighted_sum(h, w, t, tw, chunk=chunk)
        s.backward(retain_graph=True)
    assert probe.max_bytes <= 4 * max(chunk * v, v * hsz), probe.max_bytes
    with pytest.raises(RuntimeError, match="second backward"):
        s.backward()
    with pytest.raises(ValueError):
        linear_logprob_weighted_sum(h, w, t, tw[:-1])
    empty = linear_logprob_weighted_sum(h[:0], w, t[:0], tw[:0])
    assert empty.item() == 0.0


class _MatmulFlops(TorchDispatchMode):
    """2·m·n·k per mm / addmm / matmul at the aten level."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif name in ("bmm", "baddbmm"):
            raise AssertionError(f"unexpected batched matmul {name}")
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------
# sinkhorn, torch reference path
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,k", [(37, 19), (64, 50), (130, 33), (48, 3000)])
@pytest.mark.parametrize("eps", [0.05, 0.03])
def test_sinkhorn_matches_swav_fp64(b, k, eps):
    _check_sinkhorn(b, k, eps)


def test_sinkhorn_prototype_marginals_converge():
    b, k = 96, 24
    q = sinkhorn(_cosine_scores(b, k, seed=3), eps=0.05, iters=300)
    assert (q.sum(1) - 1).abs().max() <= 1e-5
    assert (q.sum(0) - b / k).abs().max() <= 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.01, 0.02])
def test_sinkhorn_low_precision_small_eps_is_finite(dtype, eps):
    # Scores up to ~2.5 (unnormalised prototypes): scores/eps reaches 250, so a naive exp
    # overflows even in fp32 / bf16 at eps=0.02.
    scores = (_cosine_scores(64, 40, dim=4, seed=4) * 2.5).to(dtype)
    naive = _swav_reference(scores, eps, 3, dtype=torch.float32)  # SwAV's code as is, fp32
    assert torch.isinf(torch.exp(scores.float() / eps)).any()
    assert not torch.isfinite(naive).all()
    q = sinkhorn(scores, eps=eps, iters=3)
    assert torch.isfinite(q).all()
    assert (q.double() - _swav_reference(scores, eps, 3)).abs().max() <= 1e-4
    assert (q.sum(1) - 1).abs().max() <= 1e-5


def test_sinkhorn_outlier_sample_does_not_underflow():
    # One sample far below every prototype's best match: exp(x - max) underflows to 0 for
    # its whole column in a max-shifted linear-domain implementation (0/0 = NaN).
    scores = _cosine_scores(32, 16, seed=5)
    scores[7] = -1.0
    q = sinkhorn(scores, eps=0.01, iters=3)
    assert torch.isfinite(q).all()
    assert (q.double() - _swav_reference(scores, 0.01, 3)).abs().max() <= 1e-4


def test_sinkhorn_rejects_bad_args():
    s = torch.randn(4, 3)
    with pytest.raises(ValueError):
        sinkhorn(s, iters=0)
    with pytest.raises(ValueError):
        sinkhorn(s, eps=0.0)
    with pytest.raises(ValueError):
        sinkhorn(s, world_sums="nccl")
    with pytest.raises(ValueError, match="at least one prototype"):   # (a 'math domain error')
        sinkhorn(torch.randn(4, 0))
    assert sinkhorn(torch.randn(0, 5)).shape == (0, 5)               # (an IndexError from amax on the CPU path)


def test_sinkhorn_callable_world_sums_with_threads():
    """Two threads act as ranks; the callable all-reduces through a barrier."""
    scores = _cosine_scores(50, 30, seed=6)
    parts = [scores[:20], scores[20:]]  # unequal local batches: B_global is summed
    barrier = threading.Barrier(2)
    slots: list = [None, None]
    results: list = [None, None]
    errors: list = []

    def make_reduce(rank):
        def reduce(t, op):
            slots[rank] = t.clone()
            barrier.wait()
            out = torch.maximum(slots[0], slots[1]) if op == "max" else slots[0] + slots[1]
            barrier.wait()  # both read before the next call overwrites the slots
            return out

        return reduce

    def worker(rank):
        try:
            results[rank] = sinkhorn(parts[rank], eps=0.05, iters=3, world_sums=make_reduce(rank))
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
            barrier.abort()

    def run_ranks():
        threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors

    run_ranks()
    full = sinkhorn(scores, eps=0.05, iters=3)
    torch.testing.assert_close(torch.cat(results), full, rtol=0, atol=1e-6)
    # a rank without samples this step takes part in the sums and gets [0, K]
    parts[:] = [scores, scores[:0]]
    run_ranks()
    assert results[1].shape == (0, 30)
    torch.testing.assert_close(results[0], full, rtol=0, atol=1e-6)


def _gloo_worker(rank, world, init_file, out_dir, scores):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local = scores.chunk(world)[rank]
        q = sinkhorn(local, eps=0.05, iters=3, world_sums="auto")
        torch.save(q, os.path.join(out_dir, f"q{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sinkhorn_gloo_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    scores = _cosine_scores(64, 40, seed=7)
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path), scores), nprocs=2, join=True)
    q = torch.cat([torch.load(tmp_path / f"q{r}.pt") for r in range(2)])
    full = sinkhorn(scores, eps=0.05, iters=3)
    torch.testing.assert_close(q, full, rtol=0, atol=1e-6)
    assert (q.double() - _swav_reference(scores, 0.05, 3)).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------
# Triton kernels through the interpreter (CPU).  TRITON_INTERPRET must be set before the
# kernels are defined, so these run in a fresh interpreter process.  No skipping: if the
# interpreter cannot run here the test fails with its output.
# ----------------------------------------------------------------------------------------


def _interp_logprob_checks():
    from runx.kernels._backend import interpret_mode

    assert interpret_mode(), "TRITON_INTERPRET not set in child"
    for dtype in (torch.float32, torch.bfloat16):
        # V=101 is not a multiple of BLOCK_V=32; H=24 not of BLOCK_H=16 (masked K loop);
        # chunk=16 with N=37 makes 3 backward chunks (fp32 dW accumulator).
        _check_logprob(37, 24, 101, dtype, backend="triton", bias=True, temperature=0.7, chunk=16)
        _check_logprob(20, 32, 70, dtype, backend="triton", bias=False, entropy=False, chunk=None, seed=1)
    _check_logprob(9, 16, 40, torch.float32, backend="triton", scale=300.0, seed=2, entropy=False,
                   grad_tol=1e-3)  # huge logits
    # The Triton path's largest buffer is bounded by chunk * V too (vocab slices in backward).
    n, hsz, v, chunk = 96, 8, 1500, 8
    h = torch.randn(n, hsz, requires_grad=True)
    w = torch.randn(v, hsz, requires_grad=True)
    t = torch.randint(0, v, (n,))
    with _MaxBytes() as probe:  # (the interpreter's own argument copies are byte views)
        lp, ent = linear_logprob(h, w, t, chunk=chunk, return_entropy=True, backend="triton")
        (lp.sum() + ent.sum()).backward()
    assert probe.max_bytes <= 4 * max(chunk * v, v * hsz), probe.max_bytes
    # Same numbers as the torch path.
    h, w = torch.randn(21, 16), torch.randn(53, 16)
    t = torch.randint(0, 53, (21,))
    a = linear_logprob(h, w, t, return_entropy=True, backend="triton")
    r = linear_logprob(h, w, t, return_entropy=True, backend="torch")
    torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    # linear_logprob through library GEMMs + the row kernel (its entropy gradient: the fused d_logits kernel)
    for dtype in (torch.float32, torch.bfloat16):
        _check_logprob(37, 24, 101, dtype, backend="triton_rows", bias=True, temperature=0.7, chunk=16)
        _check_logprob(20, 32, 70, dtype, backend="triton_rows", bias=True, temperature=1.3, entropy=False,
                       chunk=8, seed=1)
    # The gradient-in-forward sum's row kernel (BLOCK_V=64 here: several blocks per row and a ragged last one)
    for case in WSUM_CASES[1:]:
        for dtype in (torch.float32, torch.bfloat16):
            _check_weighted_sum(*case, dtype, backend="triton")
    # huge logits: near-one-hot rows, whose entropies are tiny numbers (the torch path also misses 1e-5 on them)
    _check_weighted_sum(23, 16, 300, True, 1.0, 8, torch.float32, backend="triton", scale=100.0, ent_tol=1e-4)
    _check_wsum_rows_low_precision_output()
    for backend in ("triton", "triton_rows", "wsum"):
        _check_masked_vocab(backend)
    print("INTERP-OK logprob")


def _check_wsum_rows_low_precision_output():
    """The row kernel writing d_logits into a bf16 buffer (what it does for bf16 weights on CUDA) and over the
    logits themselves, against torch."""
    from runx.kernels import _triton_logprob as tk

    torch.manual_seed(4)
    c, v, inv_temp = 13, 203, 1 / 0.7
    z = torch.randn(c, v) * 4
    t = torch.randint(0, v, (c,))
    g = torch.randn(c)
    logq = torch.log_softmax(z.double(), -1)
    want_dx = (torch.nn.functional.one_hot(t, v).double() - logq.exp()) * g.double()[:, None] * inv_temp
    want_ent = -(logq.exp() * logq).sum(-1)
    for out_dtype in (torch.bfloat16, torch.float32):
        zz = z.clone()
        dx = torch.empty(c, v, dtype=out_dtype) if out_dtype != torch.float32 else zz
        logp, ent = torch.empty(c), torch.empty(c)
        lse = torch.empty(c)
        tk.wsum_rows(zz, t, g, inv_temp, dx, logp, ent, lse)
        assert dx.dtype == out_dtype
        torch.testing.assert_close(lse.double(), torch.logsumexp(z.double(), -1), rtol=1e-6, atol=1e-6)
        tol = 1e-2 if out_dtype == torch.bfloat16 else 1e-5
        assert _rel(dx.double(), want_dx) < tol, _rel(dx.double(), want_dx)
        torch.testing.assert_close(logp.double(), logq.gather(1, t[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    logp2 = torch.empty(c)
    tk.wsum_rows(z.clone(), t, g, inv_temp, None, logp2, None)  # log-probs only (no gradient wanted)
    torch.testing.assert_close(logp2, logp)


def _interp_sinkhorn_checks():
    from runx.kernels._backend import interpret_mode

    assert interpret_mode(), "TRITON_INTERPRET not set in child"
    _check_sinkhorn(37, 19, 0.05, backend="triton")
    _check_sinkhorn(70, 45, 0.03, backend="triton", seed=1)
    q = _check_sinkhorn(40, 33, 0.01, backend="triton", dtype=torch.bfloat16, scale=2.5, seed=2)
    assert q <= 1e-4
    scores = _cosine_scores(30, 20, seed=3)
    ref = sinkhorn(scores, backend="torch")
    torch.testing.assert_close(sinkhorn(scores, backend="triton"), ref, rtol=0, atol=1e-6)
    # A (trivial, world size 1) reducer takes the unfused path used with several processes.
    torch.testing.assert_close(sinkhorn(scores, backend="triton", world_sums=lambda t, op: t), ref,
                               rtol=0, atol=1e-6)
    # the fused single-process path at 1, 2 and 5 iterations, and with K split into chunks
    from runx.kernels import _triton_sinkhorn as ts

    for iters in (1, 2, 5):
        torch.testing.assert_close(sinkhorn(scores, iters=iters, backend="triton"),
                                   sinkhorn(scores, iters=iters, backend="torch"), rtol=0, atol=1e-6)
    one_tile, ts.ONE_TILE_MAX = ts.ONE_TILE_MAX, 8
    try:
        _check_sinkhorn(37, 19, 0.05, backend="triton")
        _check_sinkhorn(40, 33, 0.01, backend="triton", dtype=torch.bfloat16, scale=2.5, seed=2)
    finally:
        ts.ONE_TILE_MAX = one_tile
    print("INTERP-OK sinkhorn")


_INTERP_TESTS = {
    "test_triton_logprob_interpreter": "_interp_logprob_checks",
    "test_triton_sinkhorn_interpreter": "_interp_sinkhorn_checks",
}


def _start_in_interpreter(fn_name: str):
    code = (
        "import importlib.util, sys\n"
        "import runx.kernels\n"
        "assert 'triton' not in sys.modules, 'import runx.kernels imported triton eagerly'\n"
        f"spec = importlib.util.spec_from_file_location('kernel_tests_child', {__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        f"mod.{fn_name}()\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: no buffer deadlock
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return proc, log


@pytest.fixture(scope="module", autouse=True)
def _interpreter_children(request):
    """Start the (slow, single-threaded) interpreter runs when the module starts, so they
    overlap with the in-process tests; each interpreter test then waits for its child."""
    selected = {item.originalname for item in request.session.items}
    children = {t: _start_in_interpreter(fn) for t, fn in _INTERP_TESTS.items() if t in selected}
    yield children
    for proc, log in children.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _wait_for_child(children, test_name):
    proc, log = children[test_name]
    try:
        rc = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    log.seek(0)
    out = log.read()
    assert rc == 0, f"interpreter run failed (rc={rc}):\n{out[-8000:]}"
    assert "INTERP-OK" in out, out[-8000:]


def test_triton_logprob_interpreter(_interpreter_children):
    _wait_for_child(_interpreter_children, "test_triton_logprob_interpreter")


def test_triton_sinkhorn_interpreter(_interpreter_children):
    _wait_for_child(_interpreter_children, "test_triton_sinkhorn_interpreter")


def test_logprob_kernels_compile_for_an_h100():
    """The interpreter runs the kernels' Python; this compiles them for sm_90 (bf16 operands, the tile configs
    _config picks on CUDA) down to a cubin with triton's bundled ptxas, which catches typing and lowering errors
    the interpreter lets through. No GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from runx.kernels import _triton_logprob as tk

    bn, bv, bh, warps, stages, upcast, prec = tk._config(torch.empty(1, dtype=torch.bfloat16, device="meta"), 4096)
    tiles = {"HAS_BIAS": True, "WANT_ENT": True, "UPCAST": upcast, "PREC": prec, "EVEN_H": True,
             "GROUP_N": 8, "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}
    i32, f32 = "i32", "fp32"
    fwd = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "t_ptr": "*i64", "m_ptr": "*fp32",
           "s_ptr": "*fp32", "e_ptr": "*fp32", "z_ptr": "*fp32", "N": i32, "V": i32, "H": i32, "stride_h": i32,
           "stride_w": i32, "inv_temp": f32, "v_per_split": i32, "n_splits": i32}
    dlogits = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "t_ptr": "*i64", "lse_ptr": "*fp32",
               "g_ptr": "*fp32", "ge_ptr": "*fp32", "ent_ptr": "*fp32", "dx_ptr": "*bf16", "N": i32, "V": i32,
               "H": i32, "stride_h": i32, "stride_w": i32, "stride_dx": i32, "inv_temp": f32}
    rows = {"z_ptr": "*fp32", "t_ptr": "*i64", "g_ptr": "*fp32", "dx_ptr": "*bf16", "logp_ptr": "*fp32",
            "ent_ptr": "*fp32", "lse_ptr": "*fp32", "V": i32, "stride_z": i32, "stride_dx": i32, "inv_temp": f32}
    cases = [(tk._fwd_kernel, fwd, tiles, warps, stages),
             (tk._dlogits_kernel, dlogits, tiles, warps, stages),
             (tk._wsum_rows_kernel, rows, {"WANT_ENT": True, "WRITE_DX": True, "STORE_LSE": True,
                                           "BLOCK_V": 4096}, 8, 1)]
    for fn, sig, consts, nw, ns in cases:
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": ns})
        assert len(k.asm["cubin"]) > 1000, fn.__name__


# ----------------------------------------------------------------------------------------
# Real CUDA
# ----------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "triton_rows", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_logprob(backend, dtype):
    _check_logprob(300, 256, 5003, dtype, device="cuda", backend=backend, bias=True, temperature=0.8, chunk=128)
    _check_logprob(77, 128, 1000, dtype, device="cuda", backend=backend, bias=False, entropy=False, seed=1)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend,dw_accum", [("triton", "fp32"), ("torch", "fp32"), ("triton", "weight")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_weighted_sum(dtype, backend, dw_accum):
    """The gradient-in-forward sum on CUDA (cuBLAS GEMMs, bf16 operands with fp32 output / accumulation; dW summed
    over the 5 row chunks in fp32, or in the weight's dtype) against linear_logprob's fp64-checked path."""
    torch.manual_seed(0)
    n, hsz, v = 600, 256, 5003
    h = torch.randn(n, hsz, device="cuda").to(dtype)
    w = (torch.randn(v, hsz, device="cuda") / 8).to(dtype)
    t = torch.randint(0, v, (n,), device="cuda")
    t[::9] = IGNORE
    tw = torch.randn(n, device="cuda")
    out = {}
    for name in ("sum", "reference"):
        xs = [x.clone().requires_grad_() for x in (h, w)]
        if name == "sum":
            s = linear_logprob_weighted_sum(xs[0], xs[1], t, tw, temperature=0.8, chunk=128, backend=backend,
                                            dw_accum=dw_accum)
        else:
            ref, _ = _ref_logprob(xs[0].double(), xs[1].double(), t, None, 0.8)
            s = (tw.double() * ref).sum()
        s.backward()
        out[name] = (s.detach(), xs[0].grad, xs[1].grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(out["sum"][0].item() - out["reference"][0].item()) <= tol * abs(out["reference"][0].item())
    for a, r in zip(out["sum"][1:], out["reference"][1:]):
        assert a.dtype == dtype and _rel(a, r) < tol


@pytest.mark.gpu
@needs_cuda
def test_gpu_logprob_peak_memory_is_chunked():
    n, hsz, v, chunk = 4096, 512, 50000, 256
    h = torch.randn(n, hsz, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(v, hsz, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, v, (n,), device="cuda")
    for backend in ("triton", "torch"):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        linear_logprob(h, w, t, chunk=chunk, backend=backend).sum().backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        full_logits_fp32 = n * v * 4
        assert extra < 0.5 * full_logits_fp32, (backend, extra, full_logits_fp32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_sinkhorn(backend):
    _check_sinkhorn(512, 3000, 0.05, backend=backend, device="cuda")
    _check_sinkhorn(256, 300, 0.01, backend=backend, device="cuda", dtype=torch.bfloat16, scale=2.5, seed=1)
    scores = _cosine_scores(1000, 700, seed=2, device="cuda")
    ref = sinkhorn(scores, backend="torch")
    torch.testing.assert_close(sinkhorn(scores, backend="triton"), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(sinkhorn(scores, backend="triton", world_sums=lambda t, op: t), ref,
                               rtol=0, atol=1e-5)
    if backend == "triton":  # K larger than one tile: the chunked fused path
        wide = _cosine_scores(300, 5000, seed=4, device="cuda")
        torch.testing.assert_close(sinkhorn(wide, backend="triton"), sinkhorn(wide, backend="torch"),
                                   rtol=0, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_gpu_sinkhorn_cuda_graph_replay():
    from runx.kernels import _triton_sinkhorn as ts

    a = _cosine_scores(600, 3000, seed=5, device="cuda").to(torch.bfloat16)
    b = _cosine_scores(600, 3000, seed=6, device="cuda").to(torch.bfloat16)
    plain_a = sinkhorn(a, backend="triton", cuda_graph=False)
    plain_b = sinkhorn(b, backend="triton", cuda_graph=False)
    qa = sinkhorn(a, backend="triton")  # captures
    qb = sinkhorn(b, backend="triton")  # replays with new input
    assert any(key[2] == (600, 3000) for key in ts._graphs), "no graph was captured"
    assert not ts._ungraphable
    torch.testing.assert_close(qa, plain_a, rtol=0, atol=1e-6)  # the first result is not overwritten
    torch.testing.assert_close(qb, plain_b, rtol=0, atol=1e-6)
    assert qa.data_ptr() != qb.data_ptr()
    # a transposed (non-contiguous) view and another shape go through the same cache
    torch.testing.assert_close(sinkhorn(b.t().contiguous().t(), backend="triton"), plain_b, rtol=0, atol=1e-6)
    c = _cosine_scores(100, 300, seed=7, device="cuda")
    torch.testing.assert_close(sinkhorn(c, backend="triton"), sinkhorn(c, backend="torch"), rtol=0, atol=1e-5)



def test_kernel_backend_environment_switch(monkeypatch):
    """RUNX_KERNEL_BACKEND=torch turns every 'auto' call into the torch reference (the escape hatch the recipes'
    calls, which pass 'auto', need); an explicit backend is kept; a bad value is an error naming the choices."""
    from runx.kernels._backend import resolve_backend
    t = torch.zeros(1)
    monkeypatch.setenv("RUNX_KERNEL_BACKEND", "torch")
    assert resolve_backend("auto", t) == "torch"
    monkeypatch.setenv("RUNX_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="torch, triton"):
        resolve_backend("auto", t)
    assert resolve_backend("torch", t) == "torch"
