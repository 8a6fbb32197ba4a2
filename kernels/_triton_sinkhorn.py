"""Triton kernels for ``sinkhorn`` (imported only when the Triton backend runs).

Same three passes as ``sinkhorn._TorchOps`` but each is one launch and one read of
``scores`` in its own dtype (bf16 scores are read as bf16 and upcast in registers), with
exp, the 1/eps scale, the potentials and the max-shifted reductions fused in.  Q itself is
written once, at the end: 2 * iters launches in all for one process.  The eager reference
instead writes and re-reads a K x B fp32 matrix ~6 times per iteration.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._backend import interpret_mode


@triton.jit
def _proto_kernel(s_ptr, g_ptr, m_ptr, sum_ptr, f_ptr, B, K, stride_b, inv_eps, log_k,
                  HAS_G: tl.constexpr, TO_POTENTIAL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per prototype column k, over all local samples: online (max, sum exp(x - max)) of
    x_bk = s_bk / eps + g_b.  TO_POTENTIAL (single process) writes the potential
    f_k = -log K - max - log(sum) directly; otherwise (max, sum) for the cross-process merge.
    One program owns a narrow column strip and walks every row: no partials to merge, and
    one launch per prototype step (these calls are launch-bound at SwAV sizes)."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    m = tl.full((BLOCK_K,), -1.0e30, tl.float32)  # finite: no (-inf) - (-inf)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        ptrs = s_ptr + rows[:, None].to(tl.int64) * stride_b + cols[None, :]
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32) * inv_eps
        if HAS_G:
            x += tl.load(g_ptr + rows, mask=row_ok, other=0.0)[:, None]
        m_new = tl.maximum(m, tl.max(x, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
        m = m_new
    if TO_POTENTIAL:
        tl.store(f_ptr + cols, -log_k - m - tl.log(tl.where(col_ok, acc, 1.0)), mask=col_ok)
    else:
        tl.store(m_ptr + cols, m, mask=col_ok)
        tl.store(sum_ptr + cols, acc, mask=col_ok)


@triton.jit
def _sample_kernel(s_ptr, f_ptr, out_ptr, B, K, stride_b, stride_o, inv_eps, offset,
                   WRITE_Q: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per sample: lse_b = logsumexp_k(x_bk + f_k); writes offset - lse_b (the sample
    potential g_b with offset = -log B), or with WRITE_Q Q_bk = exp(x_bk + f_k - lse_b)."""
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
        x += tl.load(f_ptr + cols, mask=col_ok, other=0.0)[None, :]
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
            x += tl.load(f_ptr + cols, mask=col_ok, other=0.0)[None, :]
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


def _proto_launch(scores, inv_eps, g, log_k, to_potential):
    scores = _prep(scores)
    b, k = scores.shape
    # GPU: 32-column strips (128-byte rows, coalesced) give ~K/32 programs, ~94 for K=3000.
    block_b, block_k, warps = (64, 32, 4) if scores.is_cuda and not _small() else (8, 16, 1)
    out = torch.empty((1 if to_potential else 2, k), dtype=torch.float32, device=scores.device)
    _proto_kernel[(triton.cdiv(k, block_k),)](
        scores, g if g is not None else out, out[0], out[-1], out[0], b, k, scores.stride(0), inv_eps, log_k,
        HAS_G=g is not None, TO_POTENTIAL=to_potential, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=warps,
    )
    return out


def proto_stats(scores, inv_eps, g):
    """Local per-prototype (max, sum exp(x - max)) for the cross-process merge."""
    out = _proto_launch(scores, inv_eps, g, 0.0, False)
    return out[0], out[1]


def proto_potential(scores, inv_eps, g, log_k):
    """Single process: f_k = -log K - logsumexp_b(x_bk + g_b) in one launch."""
    return _proto_launch(scores, inv_eps, g, log_k, True)[0]


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
    _sample_kernel[(triton.cdiv(b, block_b),)](
        scores, f, out, b, k, scores.stride(0), out.stride(0), inv_eps, offset,
        WRITE_Q=write_q, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=warps,
    )
    return out


def sample_lse(scores, inv_eps, f):
    return -_sample_launch(scores, inv_eps, f, False)


def sample_potential(scores, inv_eps, f, log_b):
    """g_b = -log B - logsumexp_k(x_bk + f_k) in one launch (log_b a Python float)."""
    return _sample_launch(scores, inv_eps, f, False, offset=-log_b)


def assign(scores, inv_eps, f):
    return _sample_launch(scores, inv_eps, f, True)
