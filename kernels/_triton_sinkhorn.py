"""Triton kernels for ``sinkhorn`` (imported only when the Triton backend runs).

Same three passes as ``sinkhorn._TorchOps`` but each is one launch and one read of
``scores`` in its own dtype (bf16 scores are read as bf16 and upcast in registers), with
exp, the 1/eps scale, the potentials and the max-shifted reductions fused in.  Q itself is
written once, at the end: 2 * iters launches in all for one process.  The eager reference
instead writes and re-reads a K x B fp32 matrix ~6 times per iteration.

Split prototype pass.  The prototype (column) reduction runs over all B samples.  One
program per 32-column strip gives only ~K/32 programs (~94 at K=3000), too few to fill a
GPU when B is small, so the rows are also split: grid (cdiv(K, BLOCK_K), SPLIT), program
(j, s) reducing rows [s * R, (s + 1) * R) of strip j into a partial (max, sum) written to
[SPLIT, K] fp32 buffers.  The partials are merged without another launch: the sample
kernel, which needs the potential f of each column block it visits anyway, computes
f_k = -log K - logsumexp_s(m_sk + log sum_sk) on the fly from the SPLIT partials (the
potential partials carry m + log K, so the merge needs no extra argument).  With SPLIT = 1
the prototype kernel writes f directly.  ``proto_stats`` (several processes) merges its
partials in torch before the cross-process merge.  ``RUNX_SINKHORN_SPLIT=n`` forces SPLIT
(for tuning and tests).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._backend import interpret_mode

_MAX_SPLIT = 8  # a constexpr of the sample kernel: each value is one more compiled variant


@triton.jit
def _proto_kernel(s_ptr, g_ptr, m_ptr, sum_ptr, B, K, rows_per_split, stride_b, inv_eps, shift,
                  HAS_G: tl.constexpr, TO_POTENTIAL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per prototype column k, over the rows of split s = program_id(1): online
    (max, sum exp(x - max)) of x_bk = s_bk / eps + g_b.  TO_POTENTIAL (SPLIT = 1 only)
    writes the potential f_k = -shift - max - log(sum) directly; otherwise row s of the
    [SPLIT, K] partials: (max + shift, sum).  rows_per_split is a multiple of BLOCK_B."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    r0 = tl.program_id(1) * rows_per_split
    r1 = tl.minimum(r0 + rows_per_split, B)
    m = tl.full((BLOCK_K,), -1.0e30, tl.float32)  # finite: no (-inf) - (-inf)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for b0 in range(r0, r1, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < r1
        ptrs = s_ptr + rows[:, None].to(tl.int64) * stride_b + cols[None, :]
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32) * inv_eps
        if HAS_G:
            x += tl.load(g_ptr + rows, mask=row_ok, other=0.0)[:, None]
        m_new = tl.maximum(m, tl.max(x, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
        m = m_new
    if TO_POTENTIAL:
        tl.store(m_ptr + cols, -shift - m - tl.log(tl.where(col_ok, acc, 1.0)), mask=col_ok)
    else:
        out = tl.program_id(1) * K + cols
        tl.store(m_ptr + out, m + shift, mask=col_ok)
        tl.store(sum_ptr + out, acc, mask=col_ok)


@triton.jit
def _potential(f_ptr, fsum_ptr, cols, col_ok, K, SPLIT: tl.constexpr):
    """f for the columns ``cols``: loaded (SPLIT = 0), or merged from SPLIT partials
    (m_sk, sum_sk) at f_ptr / fsum_ptr + s * K as f_k = -logsumexp_s(m_sk + log sum_sk)."""
    if SPLIT == 0:
        f = tl.load(f_ptr + cols, mask=col_ok, other=0.0)
    else:
        mx = tl.load(f_ptr + cols, mask=col_ok, other=0.0)
        for s in tl.static_range(1, SPLIT):
            mx = tl.maximum(mx, tl.load(f_ptr + s * K + cols, mask=col_ok, other=0.0))
        acc = tl.zeros_like(mx)
        for s in tl.static_range(SPLIT):
            m_s = tl.load(f_ptr + s * K + cols, mask=col_ok, other=0.0)
            acc += tl.load(fsum_ptr + s * K + cols, mask=col_ok, other=1.0) * tl.exp(m_s - mx)
        f = -mx - tl.log(acc)
    return f


@triton.jit
def _sample_kernel(s_ptr, f_ptr, fsum_ptr, out_ptr, B, K, stride_b, stride_o, inv_eps, offset,
                   SPLIT: tl.constexpr, WRITE_Q: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per sample: lse_b = logsumexp_k(x_bk + f_k); writes offset - lse_b (the sample
    potential g_b with offset = -log B), or with WRITE_Q Q_bk = exp(x_bk + f_k - lse_b).
    f is a K-vector (SPLIT = 0) or SPLIT prototype partials merged per column block."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    row_off = rows[:, None].to(tl.int64) * stride_b
    m = tl.full((BLOCK_B,), -1.0e30, tl.float32)
    acc = tl.zeros((BLOCK_B,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(s_ptr + row_off + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=float("-inf")).to(tl.float32) * inv_eps
        x += _potential(f_ptr, fsum_ptr, cols, col_ok, K, SPLIT)[None, :]
        m_new = tl.maximum(m, tl.max(x, axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(tl.where(row_ok, acc, 1.0))  # padded rows: avoid log(0)
    if WRITE_Q:
        o_off = rows[:, None].to(tl.int64) * stride_o
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(s_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inv_eps
            x += _potential(f_ptr, fsum_ptr, cols, col_ok, K, SPLIT)[None, :]
            tl.store(out_ptr + o_off + cols[None, :], tl.exp(x - lse[:, None]), mask=mask)
    else:
        tl.store(out_ptr + rows, offset - lse, mask=row_ok)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _small() -> bool:
    return interpret_mode()


def _prep(scores: torch.Tensor) -> torch.Tensor:
    return scores if scores.stride(1) == 1 else scores.contiguous()


def _rows_per_split(scores, block_b: int, block_k: int) -> tuple[int, int]:
    """(rows per split, SPLIT) for the prototype pass; rows a multiple of block_b."""
    b, k = scores.shape
    forced = os.environ.get("RUNX_SINKHORN_SPLIT", "").strip()
    if forced:
        split = int(forced)
    elif scores.is_cuda and not _small():
        # ~3 programs per SM, each split keeping >= 2 row tiles.
        split = min(triton.cdiv(3 * _num_sms(scores.device.index), triton.cdiv(k, block_k)),
                    triton.cdiv(b, 2 * block_b))
    else:  # interpreter: split whenever there are >= 2 tiles a split, so tests exercise it
        split = min(4, triton.cdiv(b, 2 * block_b))
    split = max(1, min(split, _MAX_SPLIT))
    rows = max(1, triton.cdiv(triton.cdiv(b, split), block_b)) * block_b
    return rows, max(1, triton.cdiv(b, rows))


def _proto_launch(scores, inv_eps, g, shift, to_potential):
    """Prototype pass.  Returns f [K] when to_potential and SPLIT = 1, else the partials
    [2, SPLIT, K] ((max + shift) in [0], sums in [1])."""
    scores = _prep(scores)
    b, k = scores.shape
    # GPU: 32-column strips (128-byte rows, coalesced); the row split multiplies the
    # ~K/32 programs (~94 for K=3000) up to ~3 per SM.
    block_b, block_k, warps = (64, 32, 4) if scores.is_cuda and not _small() else (8, 16, 1)
    rows, split = _rows_per_split(scores, block_b, block_k)
    direct = to_potential and split == 1
    out = torch.empty((k,) if direct else (2, split, k), dtype=torch.float32, device=scores.device)
    m_buf, s_buf = (out, out) if direct else (out[0], out[1])
    _proto_kernel[(triton.cdiv(k, block_k), split)](
        scores, g if g is not None else out, m_buf, s_buf, b, k, rows, scores.stride(0), inv_eps, shift,
        HAS_G=g is not None, TO_POTENTIAL=direct, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=warps,
    )
    return out


def proto_stats(scores, inv_eps, g):
    """Local per-prototype (max, sum exp(x - max)) for the cross-process merge (with
    SPLIT > 1 the partials are merged here in torch: a few K-sized ops)."""
    part = _proto_launch(scores, inv_eps, g, 0.0, False)
    m, s = part[0], part[1]
    if m.shape[0] == 1:
        return m[0], s[0]
    m_all = m.amax(dim=0)
    return m_all, (s * torch.exp(m - m_all)).sum(dim=0)


def proto_potential(scores, inv_eps, g, log_k):
    """Single process: f_k = -log K - logsumexp_b(x_bk + g_b) in one launch, as f [K] or
    as its unmerged [2, SPLIT, K] partials; pass it on to ``sample_potential`` / ``assign``
    unchanged (they merge the partials)."""
    return _proto_launch(scores, inv_eps, g, log_k, True)


def _sample_launch(scores, inv_eps, f, write_q, offset=0.0):
    scores = _prep(scores)
    b, k = scores.shape
    if scores.is_cuda and not _small():
        block_b, block_k, warps = 4, 512, 4
    else:
        block_b, block_k, warps = 4, 16, 1
    if write_q:
        out = torch.empty((b, k), dtype=torch.float32, device=scores.device)
    else:
        out = torch.empty(b, dtype=torch.float32, device=scores.device)
    split = 0 if f.dim() == 1 else f.shape[1]  # f [K], or partials [2, SPLIT, K]
    f_m, f_s = (f, f) if split == 0 else (f[0], f[1])
    _sample_kernel[(triton.cdiv(b, block_b),)](
        scores, f_m, f_s, out, b, k, scores.stride(0), out.stride(0), inv_eps, offset,
        SPLIT=split, WRITE_Q=write_q, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=warps,
    )
    return out


def sample_lse(scores, inv_eps, f):
    return -_sample_launch(scores, inv_eps, f, False)


def sample_potential(scores, inv_eps, f, log_b):
    """g_b = -log B - logsumexp_k(x_bk + f_k) in one launch (log_b a Python float)."""
    return _sample_launch(scores, inv_eps, f, False, offset=-log_b)


def assign(scores, inv_eps, f):
    return _sample_launch(scores, inv_eps, f, True)
