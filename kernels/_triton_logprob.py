"""Triton kernels for ``linear_logprob`` (imported only when the Triton backend runs).

Forward: one fused kernel per (row block, vocab split).  It computes logit tiles with
``tl.dot`` (fp32 accumulation) and folds them into an online softmax, so logits never
reach memory.  Per row it keeps the running max ``m``, ``s = sum exp(z - m)``,
``e = sum exp(z - m) (z - m)`` (entropy) and the target logit.  The vocabulary is split
over several programs so that short sequences still fill the GPU; the [splits, N]
partials are merged in torch (a few KB).

Backward: for one slice of the vocabulary at a time, a kernel recomputes the logit tiles
of all rows and writes d_logits = (g ([j==t] - p_j) - ge p_j (log p_j + H)) / T in the
input dtype; torch (cuBLAS) then does dW[slice] = dX^T @ h and dH += dX @ W[slice].
Only [N, slice] (<= chunk x V elements) is ever stored.

``linear_logprob_weighted_sum`` (gradient made in the forward) keeps cuBLAS for its three GEMMs and uses
``_wsum_rows_kernel`` between them: per row of a chunk's fp32 logits, an online max / sum-exp pass, then a pass
writing d_logits (in the weight's dtype when it is bf16/fp16), with the target's log-prob and the entropy.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._backend import interpret_mode



@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_temp,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, EVEN_H: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Scaled logits z[rows, cols] in fp32; columns past the vocabulary are -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_H)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    for k0 in range(0, H, BLOCK_H):
        if EVEN_H:
            a = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + ks) < H
            a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 dot is broken; fp32 gives the same sums
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc * inv_temp
    return tl.where(col_ok[None, :], acc, float("-inf"))


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, s_ptr, e_ptr, z_ptr,
                N, V, H, stride_h, stride_w, inv_temp, v_per_split, n_splits,
                HAS_BIAS: tl.constexpr, WANT_ENT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                EVEN_H: tl.constexpr, GROUP_N: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # Grouped launch order: consecutive programs cover GROUP_N row blocks x all splits,
    # so the resident working set is GROUP_N hidden blocks (re-read every vocab tile,
    # they stay in L2) plus one weight tile per split (each shared by GROUP_N programs).
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * n_splits
    group = pid // per_group
    first = group * GROUP_N
    gsize = tl.minimum(n_row_blocks - first, GROUP_N)
    pid_n = first + (pid % per_group) % gsize
    pid_s = (pid % per_group) // gsize

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    # Finite "-inf" for the running max: avoids (-inf) - (-inf) = nan on the first tile.
    m = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    e = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_temp,
                        HAS_BIAS, UPCAST, PREC, EVEN_H, BLOCK_N, BLOCK_V, BLOCK_H)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])  # 0 on masked columns
        if WANT_ENT:
            # e tracks sum p (z - m) relative to the running max: shift it when m moves.
            zc = tl.where(p > 0, z - m_new[:, None], 0.0)   # 0 log 0 = 0 (masked columns, -inf logits)
            e = alpha * (e + (m - m_new) * s) + tl.sum(p * zc, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(z_ptr + out, zt, mask=row_ok)
    if WANT_ENT:
        tl.store(e_ptr + out, e, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, ge_ptr, ent_ptr, dx_ptr,
                    N, V, H, stride_h, stride_w, stride_dx, inv_temp,
                    HAS_BIAS: tl.constexpr, WANT_ENT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    EVEN_H: tl.constexpr, GROUP_N: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # Grouped order (as in a tiled GEMM): programs running together cover GROUP_N row
    # blocks x many vocab tiles, so both operands are mostly served from L2.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    n_v_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * n_v_blocks
    first = (pid // per_group) * GROUP_N
    gsize = tl.minimum(n_row_blocks - first, GROUP_N)
    pid_n = first + (pid % per_group) % gsize
    pid_v = (pid % per_group) // gsize
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_temp,
                    HAS_BIAS, UPCAST, PREC, EVEN_H, BLOCK_N, BLOCK_V, BLOCK_H)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    logq = tl.where(col_ok[None, :], z - lse[:, None], float("-inf"))
    p = tl.exp(logq)
    logq = tl.where(p > 0, logq, 0.0)   # p log p = 0 where p = 0 (a -inf logit): no 0 * -inf
    coef = g[:, None] + tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if WANT_ENT:
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        coef += ge[:, None] * (logq + ent[:, None])
    dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - p * coef
    dx = dz * inv_temp
    ptrs = dx_ptr + rows[:, None].to(tl.int64) * stride_dx + cols[None, :]
    tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _wsum_rows_kernel(z_ptr, t_ptr, g_ptr, dx_ptr, logp_ptr, ent_ptr, lse_ptr, V, stride_z, stride_dx, inv_temp,
                      WANT_ENT: tl.constexpr, WRITE_DX: tl.constexpr, STORE_LSE: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    # One row of materialised fp32 logits z (already scaled by 1/T).  Pass 1: per-lane online max m,
    # s = sum exp(z - m) and e = sum exp(z - m) (z - m).  Pass 2: d_logits = g ([j == t] - p_j) / T,
    # written over dx in dx's dtype (dx may be z itself).
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    e = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        ok = (v0 + cols) < V
        z = tl.load(z_row + v0 + cols, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, z)
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))   # 1 while a lane has seen nothing (-inf)
        p = tl.where(ok & (z != float("-inf")), tl.exp(z - m_new), 0.0)   # -inf - -inf: a lane of -inf so far (a NaN
        # logit still makes the row NaN, so that the loss shows it)
        if WANT_ENT:
            shift = tl.where(s > 0, (m - m_new) * s, 0.0)
            e = alpha * (e + shift) + tl.where(p > 0, p * (z - m_new), 0.0)
        s = alpha * s + p
        m = m_new
    big = tl.max(m, 0)
    w = tl.where(s > 0, tl.exp(m - big), 0.0)
    total = tl.sum(s * w, 0)
    lse = big + tl.log(total)
    t = tl.load(t_ptr + row)
    tl.store(logp_ptr + row, tl.load(z_row + t) - lse)
    if STORE_LSE:
        tl.store(lse_ptr + row, lse)
    if WANT_ENT:
        # sum_j p_j (z_j - M) = E / S;  H = log S - E / S
        e_all = tl.sum(tl.where(s > 0, w * (e + (m - big) * s), 0.0), 0)
        tl.store(ent_ptr + row, tl.log(total) - e_all / total)
    if WRITE_DX:
        g = tl.load(g_ptr + row)
        dx_row = dx_ptr + row * stride_dx
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            ok = c < V
            z = tl.load(z_row + c, mask=ok, other=float("-inf"))
            dz = tl.where(c == t, g, 0.0) - g * tl.exp(z - lse)
            tl.store(dx_row + c, (dz * inv_temp).to(dx_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) for bf16/fp16 on CUDA instead of the
# default below; set by bench/kernels.py --logprob-sweep to time alternatives side by side.
CONFIG_OVERRIDE: tuple | None = None


def _config(t: torch.Tensor, hidden_size: int):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages, UPCAST, PREC)."""
    if CONFIG_OVERRIDE is not None and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16):
        return (*CONFIG_OVERRIDE, False, "tf32")
    if interpret_mode() and not t.is_cuda:
        # Tiny tiles keep the numpy interpreter fast; fp32 dot sidesteps its bf16 bug.
        return 16, 32, 16, 4, 1, True, "ieee"
    if t.dtype == torch.float32:
        # 3xTF32 keeps ~fp32 accuracy on tensor cores (plain TF32 would cost ~1e-3).
        return 64, 64, 32, 4, 3, False, "tf32x3"
    # bf16/fp16 (PREC unused).  Swept on an H100 at N=16k, H=4096, V=128k: 128x256x64 with
    # 8 warps and 3 stages gave 528 TFLOP/s forward / 538 d_logits vs 471 / 459 for
    # 128x128x64 (cuBLAS h @ W.T alone: 735).
    return 128, 256, 64, 8, 3, False, "tf32"


def forward(hidden, weight, bias, targets, inv_temp, want_ent):
    """Returns (target logit, lse, entropy or None), all fp32 [N]; logits never stored."""
    n, hsz = hidden.shape
    v = weight.shape[0]
    bn, bv, bh, warps, stages, upcast, prec = _config(hidden, hsz)
    n_row_blocks = triton.cdiv(n, bn)
    v_blocks = triton.cdiv(v, bv)
    if hidden.is_cuda:
        # A wave of ~GROUP_N x splits programs re-reads GROUP_N hidden blocks (L2-resident)
        # and streams `splits` weight tiles per step: with ~16 splits that is compute-bound
        # even when N is large; with few row blocks, more splits fill the GPU.  Each split
        # keeps >= 4 vocab tiles so its loop amortises the prologue.
        splits = max(16, triton.cdiv(2 * _num_sms(hidden.device.index or 0), n_row_blocks))
        splits = max(1, min(splits, v_blocks // 4))
        group_n = 8
    else:
        splits = min(3, v_blocks)  # exercise the split/merge logic under the interpreter
        group_n = 2
    v_per_split = triton.cdiv(v_blocks, splits) * bv
    splits = triton.cdiv(v, v_per_split)
    part = torch.empty((4 if want_ent else 3, splits, n), dtype=torch.float32, device=hidden.device)
    m_p, s_p, z_p = part[0], part[1], part[2]
    e_p = part[3] if want_ent else part[0]  # dummy pointer when unused
    grid = (n_row_blocks * splits,)
    _fwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, targets, m_p, s_p, e_p, z_p,
        n, v, hsz, hidden.stride(0), weight.stride(0), inv_temp, v_per_split, splits,
        HAS_BIAS=bias is not None, WANT_ENT=want_ent, UPCAST=upcast, PREC=prec, EVEN_H=hsz % bh == 0,
        GROUP_N=group_n, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps, num_stages=stages,
    )
    # Merge the splits: lse = M + log(sum_k s_k exp(m_k - M)).
    m_all = m_p.max(0).values
    w = torch.exp(m_p - m_all)
    s_all = (s_p * w).sum(0)
    lse = m_all + torch.log(s_all)
    ent = None
    if want_ent:
        # sum p (z - M) = sum_k w_k (e_k + (m_k - M) s_k);  H = log S - E / S
        e_all = ((e_p + (m_p - m_all) * s_p) * w).sum(0)
        ent = torch.log(s_all) - e_all / s_all
    return z_p.sum(0), lse, ent


def dlogits(h_c, weight, bias, t_c, lse_c, g_c, ge_c, ent_c, inv_temp, out):
    """Write d loss / d(logits before temperature) into ``out`` [N, V'] for the rows of
    ``h_c`` and the vocabulary rows ``weight`` [V', H] (a slice; ``t_c`` is relative to it)."""
    n, hsz = h_c.shape
    v = weight.shape[0]
    bn, bv, bh, warps, stages, upcast, prec = _config(h_c, hsz)
    want_ent = ge_c is not None
    grid = (triton.cdiv(n, bn) * triton.cdiv(v, bv),)
    _dlogits_kernel[grid](
        h_c, weight, bias if bias is not None else weight, t_c, lse_c, g_c,
        ge_c if want_ent else g_c, ent_c if want_ent else g_c, out,
        n, v, hsz, h_c.stride(0), weight.stride(0), out.stride(0), inv_temp,
        HAS_BIAS=bias is not None, WANT_ENT=want_ent, UPCAST=upcast, PREC=prec, EVEN_H=hsz % bh == 0,
        GROUP_N=8 if h_c.is_cuda else 2, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps, num_stages=stages,
    )
    return out


def wsum_rows(z, t_c, g_c, inv_temp, dx, logp, ent, lse=None):
    """For fp32 logits ``z`` [c, V] (scaled by 1/T): ``logp`` [c] <- log p of ``t_c`` (safe ids), ``ent`` [c]
    <- entropy and ``lse`` [c] <- logsumexp if given, and, if ``dx`` is given, ``dx`` [c, V] (``z`` itself or a
    bf16/fp16 buffer) <- the d_logits g ([j == t] - p) / T of the weighted sum.  Reads z twice, writes dx once."""
    c, v = z.shape
    if c == 0:
        return
    block = 64 if (interpret_mode() and not z.is_cuda) else min(4096, triton.next_power_of_2(v))
    warps = 4 if block <= 1024 else 8
    out = dx if dx is not None else z
    _wsum_rows_kernel[(c,)](
        z, t_c, g_c, out, logp, ent if ent is not None else logp, lse if lse is not None else logp, v, z.stride(0),
        out.stride(0), inv_temp, WANT_ENT=ent is not None, WRITE_DX=dx is not None, STORE_LSE=lse is not None,
        BLOCK_V=block, num_warps=warps,
    )
