"""Triton kernels for ``sinkhorn`` (imported only when the Triton backend runs).

Single process (``fused``, the default): 2 + iters launches, every one of them row- or
tile-parallel (no program walks a whole column):

* first prototype step: per-(row block, prototype) online (max, sum exp) partials, then a
  tiny merge into f_1 = -log K - logsumexp_b(x_bk);
* iteration t = 1 .. iters-1: one launch per block of samples does the sample step for its
  rows (g_b = -log B - logsumexp_k(x_bk + f_k)) *and* its share of the next prototype
  step.  No column max is needed there: right after a sample step x_bk + f_k + g_b <= -log B
  for every b, so m_k = -log B - f_k bounds column k and
      f'_k = -log K - m_k - log sum_b exp(x_bk + g_b - m_k)
           = f_k + log B - log K - log sum_b exp(x_bk + f_k - lse_b),
  a sum of terms <= 1 that is >= 1/K (a prototype's mass after a sample step is at least
  its previous 1/K over B), so it can neither overflow nor underflow.  Each block adds its
  column sums into a K-vector with atomics; the next launch forms f' on the fly;
* last launch: the final sample step written as Q[b] = softmax_k(x_bk + f_k).
When K fits one tile (K <= ONE_TILE_MAX) a block of rows is read once per launch.

Several processes (``proto_stats`` / ``sample_lse`` / ``assign``, between all-reduces): the
three passes of ``sinkhorn._TorchOps``, each one launch (``assign`` is the fused path's last
launch with f given).

Every launch reads ``scores`` in its own dtype (bf16 is upcast in registers) with exp, the
1/eps scale, the potentials and the max-shifted reductions fused in; Q is written once, at
the end.  The eager reference writes and re-reads a K x B fp32 matrix ~6 times per iteration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpret_mode


@triton.jit
def _proto_kernel(s_ptr, g_ptr, m_ptr, sum_ptr, B, K, stride_b, inv_eps,
                  HAS_G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per prototype column k, over all local samples: online (max, sum exp(x - max)) of
    x_bk = s_bk / eps + g_b, for the cross-process merge.  One program owns a narrow column
    strip and walks every row: no partials to merge."""
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
    tl.store(m_ptr + cols, m, mask=col_ok)
    tl.store(sum_ptr + cols, acc, mask=col_ok)


@triton.jit
def _sample_kernel(s_ptr, f_ptr, out_ptr, B, K, stride_b, inv_eps, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per sample: lse_b = logsumexp_k(x_bk + f_k)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lse = _row_lse(s_ptr, f_ptr, f_ptr, f_ptr, rows[:, None].to(tl.int64) * stride_b, row_ok, False, K, inv_eps,
                   0.0, False, False, BLOCK_B, BLOCK_K)
    tl.store(out_ptr + rows, lse, mask=row_ok)


# ------------------------------------------------------------------ fused single process
# Launch parameters of the fused path, per device kind.  GPU values: the fastest of the
# variants timed side by side on an H100 (bench/kernels.py --sinkhorn-sweep, K=3000,
# B=2048 and 4096; bench/results/kernels_sinkhorn_gpu.json).
ONE_TILE_MAX = 4096
FUSED_CFG = {"cuda": {"part_rows": 128, "part_block_b": 32, "part_block_k": 128, "part_warps": 4,
                      "rows": 16, "block_b": 2, "warps": 8},
             "cpu": {"part_rows": 16, "part_block_b": 8, "part_block_k": 16, "part_warps": 1,
                     "rows": 8, "block_b": 4, "warps": 1}}


@triton.jit
def _col_partial_kernel(s_ptr, pm_ptr, ps_ptr, B, K, stride_b, inv_eps,
                        ROWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial (max, sum exp(x - max)) of x = s / eps over ROWS samples, per prototype."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    m = tl.full((BLOCK_K,), -1.0e30, tl.float32)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for b0 in range(0, ROWS, BLOCK_B):
        rows = r * ROWS + b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_b + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32) * inv_eps
        m_new = tl.maximum(m, tl.max(x, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
        m = m_new
    tl.store(pm_ptr + r * K + cols, m, mask=col_ok)
    tl.store(ps_ptr + r * K + cols, acc, mask=col_ok)


@triton.jit
def _col_merge_kernel(pm_ptr, ps_ptr, f_ptr, zero_ptr, R, K, n_zero, log_k, BLOCK: tl.constexpr):
    """f_k = -log K - logsumexp over the R partials; also zeroes the atomic column sums."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < K
    m = tl.full((BLOCK,), -1.0e30, tl.float32)
    acc = tl.zeros((BLOCK,), tl.float32)
    for r in range(0, R):
        pm = tl.load(pm_ptr + r * K + cols, mask=ok, other=-1.0e30)
        ps = tl.load(ps_ptr + r * K + cols, mask=ok, other=0.0)
        m_new = tl.maximum(m, pm)
        acc = acc * tl.exp(m - m_new) + ps * tl.exp(pm - m_new)
        m = m_new
    tl.store(f_ptr + cols, -log_k - m - tl.log(tl.where(ok, acc, 1.0)), mask=ok)
    for j in range(0, n_zero):
        tl.store(zero_ptr + j * K + cols, tl.zeros((BLOCK,), tl.float32), mask=ok)


@triton.jit
def _potential(fb_ptr, ain_ptr, cols, col_ok, shift, HAS_AIN: tl.constexpr):
    """f_k for this launch: the stored f, or the previous f plus the column-sum update."""
    f = tl.load(fb_ptr + cols, mask=col_ok, other=0.0)
    if HAS_AIN:
        f += shift - tl.log(tl.load(ain_ptr + cols, mask=col_ok, other=1.0))
    return f


@triton.jit
def _row_lse(s_ptr, fb_ptr, ain_ptr, fout_ptr, row_off, row_ok, store_f, K, inv_eps, shift,
             HAS_AIN: tl.constexpr, WRITE_F: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """lse_b = logsumexp_k(x_bk + f_k) for a block of rows, online over K in BLOCK_K chunks (f from
    `_potential`; with WRITE_F it is also stored to fout where `store_f`)."""
    m = tl.full((BLOCK_B,), -1.0e30, tl.float32)  # finite: no (-inf) - (-inf)
    acc = tl.zeros((BLOCK_B,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        f = _potential(fb_ptr, ain_ptr, cols, col_ok, shift, HAS_AIN)
        if WRITE_F:
            tl.store(fout_ptr + cols, f, mask=col_ok & store_f)
        x = tl.load(s_ptr + row_off + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=float("-inf")).to(tl.float32) * inv_eps + f[None, :]
        m_new = tl.maximum(m, tl.max(x, axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    return m + tl.log(tl.where(row_ok, acc, 1.0))  # padded rows: avoid log(0)


@triton.jit
def _row_kernel(s_ptr, fb_ptr, ain_ptr, fout_ptr, aout_ptr, q_ptr, B, K, stride_b, stride_q, inv_eps, shift,
                HAS_AIN: tl.constexpr, WRITE_F: tl.constexpr, ACC_OUT: tl.constexpr, WRITE_Q: tl.constexpr,
                ONE_TILE: tl.constexpr, ROWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """For ROWS samples: lse_b = logsumexp_k(x_bk + f_k); then either the column sums
    sum_b exp(x_bk + f_k - lse_b) atomically added to aout (ACC_OUT), or Q (WRITE_Q)."""
    pid = tl.program_id(0)
    if ONE_TILE:  # all K prototypes in one tile: each row block is read once
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < K
        f = _potential(fb_ptr, ain_ptr, cols, col_ok, shift, HAS_AIN)
        if WRITE_F:
            tl.store(fout_ptr + cols, f, mask=col_ok & (pid == 0))
        csum = tl.zeros((BLOCK_K,), tl.float32)
        for b0 in range(0, ROWS, BLOCK_B):
            rows = pid * ROWS + b0 + tl.arange(0, BLOCK_B)
            row_ok = rows < B
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_b + cols[None, :], mask=mask,
                        other=float("-inf")).to(tl.float32) * inv_eps + f[None, :]
            mx = tl.where(row_ok, tl.max(x, axis=1), 0.0)  # padded rows: no (-inf) - (-inf)
            e = tl.exp(x - mx[:, None])
            p = e / tl.where(row_ok, tl.sum(e, axis=1), 1.0)[:, None]
            if ACC_OUT:
                csum += tl.sum(p, axis=0)
            if WRITE_Q:
                tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_q + cols[None, :], p, mask=mask)
        if ACC_OUT:
            tl.atomic_add(aout_ptr + cols, csum, mask=col_ok)
    else:  # K in chunks: an online logsumexp pass, then a second pass over the same rows
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        row_off = rows[:, None].to(tl.int64) * stride_b
        lse = _row_lse(s_ptr, fb_ptr, ain_ptr, fout_ptr, row_off, row_ok, pid == 0, K, inv_eps, shift,
                       HAS_AIN, WRITE_F, BLOCK_B, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            mask = row_ok[:, None] & col_ok[None, :]
            f = _potential(fb_ptr, ain_ptr, cols, col_ok, shift, HAS_AIN)
            x = tl.load(s_ptr + row_off + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) * inv_eps
            p = tl.exp(x + f[None, :] - lse[:, None])
            if ACC_OUT:
                tl.atomic_add(aout_ptr + cols, tl.sum(tl.where(mask, p, 0.0), axis=0), mask=col_ok)
            if WRITE_Q:
                tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_q + cols[None, :], p, mask=mask)


def fused(scores: torch.Tensor, inv_eps: float, iters: int, log_k: float, log_b: float,
          cfg: dict | None = None) -> torch.Tensor:
    """Single-process Sinkhorn: Q [B, K] fp32 in 2 + iters launches (see the module docstring)."""
    scores = _prep(scores)
    b, k = scores.shape
    c = cfg or _fused_cfg(scores)
    dev = scores.device
    r_blocks = triton.cdiv(b, c["part_rows"])
    n_sums = max(iters - 1, 1)
    # one allocation (these calls are short enough for allocator and launch overheads to show):
    # 2 x r_blocks partial rows, f_1 .. f_iters, the column sums of each prototype step
    work = torch.empty((2 * r_blocks + iters + n_sums, k), dtype=torch.float32, device=dev)
    part = work[: 2 * r_blocks].view(2, r_blocks, k)
    pot = work[2 * r_blocks: 2 * r_blocks + iters]
    sums = work[2 * r_blocks + iters:]
    _col_partial_kernel[(r_blocks, triton.cdiv(k, c["part_block_k"]))](
        scores, part[0], part[1], b, k, scores.stride(0), inv_eps,
        ROWS=c["part_rows"], BLOCK_B=c["part_block_b"], BLOCK_K=c["part_block_k"], num_warps=c["part_warps"])
    _col_merge_kernel[(triton.cdiv(k, 1024 if scores.is_cuda else 64),)](
        part[0], part[1], pot[0], sums, r_blocks, k, iters - 1, log_k, BLOCK=1024 if scores.is_cuda else 64)
    q = torch.empty((b, k), dtype=torch.float32, device=dev)
    for it in range(1, iters + 1):
        last = it == iters
        _row_launch(scores, inv_eps, c, pot[max(it - 2, 0)], q, ain=sums[it - 2] if it >= 2 else None,
                    shift=log_b - log_k, fout=pot[it - 1] if 2 <= it < iters else None,
                    aout=None if last else sums[it - 1])
    return q


# ---- CUDA graph replay of the fused path ---------------------------------------------------
# On a GPU the fused path is 2 + iters short launches (~0.1-0.2 ms of GPU work for SwAV's
# 4k x 3k) and each Triton launch costs tens of microseconds of Python on the host, so the
# call is host-bound.  SwAV calls it with the same shape every step, so the launches are
# captured once per (shape, dtype, eps, iters, device) and replayed: the input is copied into
# the graph's static buffer and Q is cloned out of it (so two calls never alias).
GRAPH_CACHE_SIZE = 4
_graphs: "dict[tuple, tuple]" = {}
_ungraphable: set = set()


def fused_graphed(scores: torch.Tensor, inv_eps: float, iters: int, log_k: float, log_b: float) -> torch.Tensor:
    """`fused` replayed from a cached CUDA graph; the same numbers (the same kernels run)."""
    key = (scores.device, scores.dtype, tuple(scores.shape), float(inv_eps), int(iters))
    if key in _ungraphable:
        return fused(scores, inv_eps, iters, log_k, log_b)
    entry = _graphs.pop(key, None)
    if entry is None:
        static_in = scores.contiguous().clone()
        try:
            side = torch.cuda.Stream(device=scores.device)  # warm-up (compiles) off the capture
            side.wait_stream(torch.cuda.current_stream(scores.device))
            with torch.cuda.stream(side):
                fused(static_in, inv_eps, iters, log_k, log_b)
            torch.cuda.current_stream(scores.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = fused(static_in, inv_eps, iters, log_k, log_b)
        except Exception as exc:  # capture unsupported here: plain launches from now on
            import warnings

            warnings.warn(f"sinkhorn: CUDA graph capture failed ({exc!s:.200}); using plain launches")
            _ungraphable.add(key)
            return fused(scores, inv_eps, iters, log_k, log_b)
        entry = (graph, static_in, static_out)
        while len(_graphs) >= GRAPH_CACHE_SIZE:  # least recently used goes first
            _graphs.pop(next(iter(_graphs)))
    else:
        entry[1].copy_(scores)
    _graphs[key] = entry
    graph, _, static_out = entry
    graph.replay()
    return static_out.clone()


def _row_launch(scores, inv_eps, c, fb, q, ain=None, shift=0.0, fout=None, aout=None):
    """One `_row_kernel` launch: f from `fb` (updated by the column sums `ain` if given), f stored to `fout`
    if given, then the next step's column sums added to `aout` if given, else Q written to `q`."""
    b, k = scores.shape
    one_tile = k <= ONE_TILE_MAX
    rows = c["rows"] if one_tile else c["block_b"]
    _row_kernel[(triton.cdiv(b, rows),)](
        scores, fb, fb if ain is None else ain, fb if fout is None else fout, fb if aout is None else aout, q,
        b, k, scores.stride(0), q.stride(0), inv_eps, shift,
        HAS_AIN=ain is not None, WRITE_F=fout is not None, ACC_OUT=aout is not None, WRITE_Q=aout is None,
        ONE_TILE=one_tile, ROWS=rows, BLOCK_B=c["block_b"],
        BLOCK_K=triton.next_power_of_2(k) if one_tile else 512, num_warps=c["warps"])


def _gpu_tiles(scores: torch.Tensor) -> bool:
    """Whether to launch with the GPU tile sizes (on CUDA and not under the Triton interpreter)."""
    return scores.is_cuda and not interpret_mode()


def _fused_cfg(scores: torch.Tensor) -> dict:
    return FUSED_CFG["cuda" if _gpu_tiles(scores) else "cpu"]


def _prep(scores: torch.Tensor) -> torch.Tensor:
    return scores if scores.stride(1) == 1 else scores.contiguous()


def proto_stats(scores, inv_eps, g):
    """Local per-prototype (max, sum exp(x - max)) for the cross-process merge."""
    scores = _prep(scores)
    b, k = scores.shape
    # GPU: 32-column strips (128-byte rows, coalesced) give ~K/32 programs, ~94 for K=3000.
    block_b, block_k, warps = (64, 32, 4) if _gpu_tiles(scores) else (8, 16, 1)
    out = torch.empty((2, k), dtype=torch.float32, device=scores.device)
    _proto_kernel[(triton.cdiv(k, block_k),)](
        scores, g if g is not None else out, out[0], out[1], b, k, scores.stride(0), inv_eps,
        HAS_G=g is not None, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=warps,
    )
    return out[0], out[1]


def sample_lse(scores, inv_eps, f):
    """lse_b = logsumexp_k(x_bk + f_k), one launch (between the all-reduces of several processes)."""
    scores = _prep(scores)
    b, k = scores.shape
    block_b, block_k, warps = (4, 512, 4) if _gpu_tiles(scores) else (4, 16, 1)
    out = torch.empty(b, dtype=torch.float32, device=scores.device)
    _sample_kernel[(triton.cdiv(b, block_b),)](scores, f, out, b, k, scores.stride(0), inv_eps,
                                               BLOCK_B=block_b, BLOCK_K=block_k, num_warps=warps)
    return out


def assign(scores, inv_eps, f):
    """Q[b] = softmax_k(x_bk + f_k): the fused path's last launch, with f given."""
    scores = _prep(scores)
    q = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    _row_launch(scores, inv_eps, _fused_cfg(scores), f, q)
    return q
