"""Per-token log-probabilities of an LM head without materialising the [N, V] logits.

    logp[i]    = log_softmax((hidden[i] @ weight.T + bias) / temperature)[targets[i]]
    entropy[i] = -sum_j p_ij log p_ij          (optional)

Why: for N = 32k tokens and a 152k vocabulary the bf16 logits alone are 10 GB, the fp32
log_softmax another 20 GB and their gradient as much again, for an output of N floats.

Design (one ``torch.autograd.Function`` for both backends):

* Forward keeps only per-row statistics (logsumexp, and entropy when asked): O(N) memory.
  The torch path does it chunk by chunk over rows ([chunk, V] fp32 logits at a time);
  the Triton path fuses the GEMM with an online softmax over vocab tiles, so it never
  writes logits at all.
* Backward *recomputes* the logits block by block from (hidden, weight, lse) instead of
  stashing gradients computed in forward as Liger's FLCE does.  Trade-off: 8·N·H·V
  FLOPs instead of 6·N·H·V (about 1.33x the GEMM work), but it supports an arbitrary
  per-token upstream gradient (policy-gradient weights, masks, entropy bonus), which a
  Liger-style "grad in forward" cannot do for ``reduction='none'`` (the weight gradient
  sums over tokens, so the upstream per-token weights must be known in forward), and a
  forward-only call (reference log-probs, rewards) costs no gradient work and O(N) memory.
  When the per-token weights *are* known before the head runs (a cross-entropy, a policy gradient with
  detached advantages, VeriFree's objective), ``linear_logprob_weighted_sum`` takes the other side of the
  trade: the 6·N·H·V scheme, gradients made in the forward and held until backward.
  Peak extra memory in backward: one block of d_logits of chunk·V elements plus one fp32
  gradient accumulator.  The torch path walks row chunks [chunk, V] (fp32) and sums dW
  over them (fp32 [V, H] when the weight is bf16/fp16: bf16 accumulation would drift by
  ~0.4% per chunk).  The Triton path walks vocabulary slices [N, chunk·V/N] (input
  dtype): each slice's dW rows come out of one GEMM over all tokens, and dH is summed in
  fp32 [N, H], which is V/N times fewer bytes to accumulate than dW for LLM heads.
* The gradient of the entropy is exact too (d H / d z_j = -p_j (log p_j + H)), so an
  entropy bonus can be back-propagated through the same pass.
* Rows whose target equals ``ignore_index`` get log-prob 0 and entropy 0 and contribute
  no gradient.  Other targets must lie in [0, V) (not checked on CUDA: a check would
  force a host sync).
"""

from __future__ import annotations

import functools
import math

import torch

from ._backend import resolve_backend

# Default budget for one chunk of logits, in elements (2**27 fp32 = 512 MiB).
DEFAULT_CHUNK_ELEMS = 1 << 27
# how linear_logprob_weighted_sum sums a low-precision weight's gradient over row chunks
DW_ACCUM = ("fp32", "weight")


def chunk_rows(n_rows: int, vocab: int, chunk: int | None = None) -> int:
    """Rows per chunk: ``chunk`` if given, else as many as fit DEFAULT_CHUNK_ELEMS.

    The largest logits block any path materialises is ``chunk_rows(...) * vocab``
    elements; tests assert this bound.
    """
    if chunk is not None:
        if int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return max(1, min(int(chunk), n_rows))
    rows = max(1, DEFAULT_CHUNK_ELEMS // max(vocab, 1))
    if rows >= 128:
        rows -= rows % 128  # GEMM-friendly multiple of the tile size
    return max(1, min(rows, n_rows))


# ----------------------------------------------------------------------------------------
# Mixed-precision matmul helpers (fp32 accumulation *and* fp32 output for bf16/fp16 input)
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cuda_out_dtype_ok(device_index: int) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` works for bf16 on this GPU."""
    try:
        a = torch.ones(16, 16, device=f"cuda:{device_index}", dtype=torch.bfloat16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


class _Operands:
    """Holds the weight in the form the chunk GEMMs need.

    bf16/fp16 on CUDA: keep the weight as is and ask cuBLAS for fp32 output.  Anywhere
    else (CPU, or an old torch): one fp32 copy of the weight per call; this is the
    reference path, where exactness matters more than V·H·4 bytes.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight
        self.low_precision = weight.dtype in (torch.float16, torch.bfloat16)
        self.native = (not self.low_precision) or (
            weight.is_cuda and _cuda_out_dtype_ok(weight.device.index or 0)
        )
        self._w32 = None
        self.b32 = None if bias is None else bias.float()

    @property
    def w32(self) -> torch.Tensor:
        if self._w32 is None:
            self._w32 = self.weight.float()
        return self._w32

    def logits(self, h_c: torch.Tensor, inv_temp: float) -> torch.Tensor:
        """fp32 scaled logits of one chunk of rows: ((h_c @ W.T) + b) * inv_temp."""
        if not self.low_precision:
            z = h_c @ self.weight.T
        elif self.native:
            z = torch.mm(h_c, self.weight.T, out_dtype=torch.float32)
        else:
            z = h_c.float() @ self.w32.T
        if self.b32 is not None:
            z += self.b32
        if inv_temp != 1.0:
            z *= inv_temp
        return z


# ----------------------------------------------------------------------------------------
# Torch reference path (chunked, exact) -- the spec every other path is tested against
# ----------------------------------------------------------------------------------------


def _torch_forward(hidden, weight, bias, targets, valid, inv_temp, chunk, want_ent):
    n = hidden.shape[0]
    ops = _Operands(weight, bias)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    tgt = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    ent = torch.empty(n, dtype=torch.float32, device=hidden.device) if want_ent else None
    safe_t = torch.where(valid, targets, 0)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = ops.logits(hidden[s:e], inv_temp)  # the only [chunk, V] buffer
        lse_c = torch.logsumexp(z, dim=-1)
        lse[s:e] = lse_c
        tgt[s:e] = z.gather(1, safe_t[s:e, None]).squeeze(1)
        if want_ent:
            z -= lse_c[:, None]  # z now holds log p
            # H = -sum p log p, with 0 log 0 = 0 (a -inf logit); one temp
            ent[s:e] = -(z.exp() * z).nan_to_num_(nan=0.0).sum(-1)
        del z
    return tgt, lse, ent


def _torch_dlogits(ops, h_c, t_c, lse_c, g_c, ge_c, ent_c, inv_temp):
    """d loss / d (h W^T + b) for one chunk, fp32 [c, V]."""
    z = ops.logits(h_c, inv_temp)
    z -= lse_c[:, None]  # log p
    return _dlogits_from_logp(z, t_c, g_c, ge_c, ent_c, inv_temp)


def _dlogits_from_logp(z, t_c, g_c, ge_c, ent_c, inv_temp):
    """d_logits [c, V] from the chunk's log-probs ``z`` (fp32, consumed: p is computed in place of it when
    there is no entropy term) and the per-row upstream gradients g (log-prob) and ge (entropy)."""
    p = z.exp_() if ge_c is None else z.exp()
    if ge_c is not None:
        # dz_j = -p_j (g + ge (log p_j + H)) + g [j == t]; 0 where p_j = 0 (log p_j = -inf)
        z.masked_fill_(p == 0, 0.0)
        z += ent_c[:, None]
        z *= ge_c[:, None]
        z += g_c[:, None]
        p *= z
        p.neg_()
    else:
        p *= -g_c[:, None]
    rows = torch.arange(p.shape[0], device=p.device)
    p[rows, t_c] += g_c  # ignored rows have g == 0 and a safe target 0
    if inv_temp != 1.0:
        p *= inv_temp
    return p


# ----------------------------------------------------------------------------------------
# Backward drivers
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cuda_addmm_dtype_ok(device_index: int) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` accumulates bf16
    products into an fp32 ``acc`` in place on this GPU (cuBLAS beta=1: no [N, H] temporary)."""
    try:
        dev = f"cuda:{device_index}"
        a = torch.full((16, 16), 2.0, device=dev, dtype=torch.bfloat16)
        acc = torch.ones(16, 16, device=dev)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return acc.dtype == torch.float32 and bool((acc == 65.0).all())
    except (TypeError, RuntimeError):
        return False


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, where acc may be fp32 while a, b are bf16/fp16 (fp32 accumulation
    inside the GEMM, no rounding of the partial product to low precision)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_addmm_dtype_ok(a.device.index or 0):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # in place, beta = 1
    elif a.is_cuda and _cuda_out_dtype_ok(a.device.index or 0):
        acc += torch.mm(a, b, out_dtype=torch.float32)
    else:
        acc += a.float() @ b.float()


class _GradAccumulator:
    """dH (written per chunk), dW and db (summed over chunks, in fp32 when needed).

    dW of a low-precision weight over several chunks is summed in fp32 and rounded once at the end.  That
    fp32 sum is held as two row halves so that the rounding needs no third buffer: the low-precision dW
    ([V, H], 2 bytes an element) is written over the front half's own storage ([ceil(V/2), H] fp32, the
    same bytes), and the back half is freed.  A plain ``.to(bf16)`` would hold V·H·4 + V·H·2 bytes at once
    (3.7 GB for a 152k x 4096 head), this holds V·H·4."""

    def __init__(self, hidden, weight, bias, n_chunks, need_h, need_w, need_b, dw_accum="fp32"):
        self.weight, self.n_chunks = weight, n_chunks
        self.dh = torch.empty_like(hidden) if need_h else None
        self.dw = self.halves = None
        if need_w:
            v, h = weight.shape
            if n_chunks > 1 and weight.dtype in (torch.float16, torch.bfloat16) and dw_accum == "fp32":
                m = (v + 1) // 2
                self.halves = [(0, m, torch.zeros(m, h, dtype=torch.float32, device=weight.device)),
                               (m, v, torch.zeros(v - m, h, dtype=torch.float32, device=weight.device))]
            else:  # one chunk: a single GEMM writes dW with one rounding; fp32 weights need no rounding;
                # dw_accum="weight": summed in the weight's dtype, one rounding per chunk (as Liger's FLCE)
                self.dw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        self.db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None

    def add(self, s, e, h_c, dx, w32=None):
        """Consume d_logits ``dx`` [c, V] of rows s:e (fp32, or the weight's dtype)."""
        if self.db is not None:
            self.db += dx.sum(0, dtype=torch.float32)
        if dx.dtype == torch.float32 and self.weight.dtype != torch.float32:
            if w32 is not None:  # CPU reference: keep everything in fp32
                if self.dh is not None:
                    self.dh[s:e] = dx @ w32
                self._add_w(dx, h_c.float())
                return
            dx = dx.to(self.weight.dtype)
        if self.dh is not None:
            torch.mm(dx, self.weight, out=self.dh[s:e])
        self._add_w(dx, h_c)

    def _add_w(self, dx, h_c):
        if self.dw is not None:
            _addmm_(self.dw, dx.T, h_c)
        for r0, r1, part in self.halves or ():
            _addmm_(part, dx[:, r0:r1].T, h_c)

    def result(self):
        dw = self.dw
        if self.halves is not None:
            dw = _round_halves_in_place(self.halves, self.weight.dtype, *self.weight.shape)
            self.halves = None
        return self.dh, dw, self.db


def _round_halves_in_place(halves, dtype, v, h, blk=None):
    """[V, H] ``dtype`` (2-byte) dW from its fp32 row halves, written over the front half's storage.

    Output row r takes bytes [2hr, 2h(r+1)) of the front half, i.e. fp32 rows [r/2, (r+1)/2): rows at or
    before r. Front rows are rounded block by block in increasing order through a small temporary, so every
    fp32 row is read before its bytes are overwritten; the back half's rows then land on front bytes that
    have all been read."""
    (_, m, front), (_, _, back) = halves
    out = front.view(dtype).view(-1)[: v * h].view(v, h)
    blk = blk or max(1, (1 << 24) // max(h, 1))   # 64 MiB of fp32 rows per step
    for a in range(0, m, blk):
        b = min(a + blk, m)
        tmp = front[a:b].to(dtype)  # read rows [a, b) before rows [a/2, b/2) are overwritten
        out[a:b].copy_(tmp)
    out[m:].copy_(back)
    return out


def _torch_backward(hidden, weight, bias, safe_t, lse, g, ge, ent, inv_temp, chunk, need_h, need_w, need_b):
    """Row chunks: recompute [chunk, V] logits, dH rows complete, dW/db summed over chunks."""
    n = hidden.shape[0]
    acc = _GradAccumulator(hidden, weight, bias, math.ceil(n / chunk), need_h, need_w, need_b)
    ops = _Operands(weight, bias)
    w32 = None if ops.native else ops.w32
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        dx = _torch_dlogits(ops, hidden[s:e], safe_t[s:e], lse[s:e], g[s:e],
                            None if ge is None else ge[s:e], None if ge is None else ent[s:e], inv_temp)
        acc.add(s, e, hidden[s:e], dx, w32=w32)
        del dx
    return acc.result()


def vocab_slice(n_rows: int, vocab: int, chunk_rows_: int) -> int:
    """Columns per vocabulary slice in the Triton backward: [N, slice] holds at most
    chunk_rows * V elements, the same bound as the torch path's row chunks."""
    cols = max(1, (chunk_rows_ * vocab) // max(n_rows, 1))
    if cols >= 256:
        cols -= cols % 128  # whole GEMM / kernel tiles
    return min(cols, vocab)


def _triton_backward(hidden, weight, bias, safe_t, lse, g, ge, ent, inv_temp, chunk, need_h, need_w, need_b):
    """Vocabulary slices: a Triton kernel recomputes the logits of all rows for a slice of
    the vocabulary and writes d_logits [N, slice] (input dtype); cuBLAS then gives that
    slice's dW rows *completely* (a GEMM over all N tokens, no cross-chunk accumulation)
    and adds the slice's share of dH into an fp32 [N, H] accumulator.  Accumulating dH
    (N*H) instead of dW (V*H) moves ~V/N times fewer bytes, the win for LLM heads where
    V (32k-152k) exceeds the tokens per micro-batch.
    """
    from . import _triton_logprob as tk

    n, v = hidden.shape[0], weight.shape[0]
    cols = vocab_slice(n, v, chunk)
    n_slices = math.ceil(v / cols)
    buf = torch.empty((n, cols), dtype=hidden.dtype, device=hidden.device)
    dh = dw = db = None
    if need_h:
        dh = torch.empty_like(hidden) if n_slices == 1 else torch.zeros(hidden.shape, dtype=torch.float32,
                                                                          device=hidden.device)
    if need_w:
        dw = torch.empty_like(weight)
    if need_b:
        db = torch.empty(v, dtype=torch.float32, device=hidden.device)
    for v0 in range(0, v, cols):
        v1 = min(v0 + cols, v)
        dx = tk.dlogits(hidden, weight[v0:v1], None if bias is None else bias[v0:v1], safe_t - v0, lse, g, ge, ent,
                        inv_temp, out=buf[:, : v1 - v0])
        if need_w:
            torch.mm(dx.T, hidden, out=dw[v0:v1])
        if need_b:
            db[v0:v1] = dx.sum(0, dtype=torch.float32)
        if need_h:
            if n_slices == 1:
                torch.mm(dx, weight, out=dh)
            else:
                _addmm_(dh, dx, weight[v0:v1])
    if need_h and dh.dtype != hidden.dtype:
        dh = dh.to(hidden.dtype)
    return dh, dw, db


# ----------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, ignore_index, chunk, want_ent, impl):
        valid = targets != ignore_index
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if impl == "triton_rows":  # library GEMM + the row kernel per chunk (masked logp / entropy, and lse)
            lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            no_weights = torch.zeros_like(lse)   # no gradient is made here
            logp, ent, *_ = _weighted_forward(hidden, weight, bias, targets, valid, no_weights, inv_temp, chunk,
                                              want_ent, False, False, False, impl="triton", lse=lse)
        else:
            if impl == "triton":
                from . import _triton_logprob as tk

                tgt, lse, ent = tk.forward(hidden, weight, bias, targets, inv_temp, want_ent)
            else:
                tgt, lse, ent = _torch_forward(hidden, weight, bias, targets, valid, inv_temp, chunk, want_ent)
            logp = torch.where(valid, tgt - lse, zero)
            if ent is not None:
                ent = torch.where(valid, ent, zero)
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, ent)
        ctx.inv_temp, ctx.chunk, ctx.impl = inv_temp, chunk, impl
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        # .backward() may be called inside an autocast region (CPU runs it on that thread).
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _LinearLogprob._backward(ctx, g_logp, g_ent)

    @staticmethod
    def _backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, valid, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_logp is None and g_ent is None or not (need_h or need_w or need_b):
            return (None,) * 9
        n, inv_temp, chunk = hidden.shape[0], ctx.inv_temp, ctx.chunk
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Ignored rows: zero upstream gradient, safe target (the onehot term is g*[j==t]).
        g = zero.expand(n) if g_logp is None else g_logp.float()
        g = torch.where(valid, g, zero).contiguous()
        ge = None
        if g_ent is not None:
            ge = torch.where(valid, g_ent.float(), zero).contiguous()
        safe_t = torch.where(valid, targets, 0)
        ent_arg = None if ge is None else ent
        if ctx.impl == "triton_rows" and ge is None:
            # d/dθ of sum_i g_i logp_i: the gradient-in-forward pass with the upstream gradients as the weights
            # (logits recomputed by the library GEMM, d_logits by the row kernel): 6·N·H·V FLOPs, all cuBLAS
            _, _, dh, dw, db = _weighted_forward(hidden, weight, bias, targets, valid, g, inv_temp, chunk, False,
                                                 need_h, need_w, need_b and bias is not None, impl="triton")
        elif ctx.impl in ("triton", "triton_rows"):   # (an entropy gradient: the fused d_logits kernel)
            dh, dw, db = _triton_backward(hidden, weight, bias, safe_t, lse, g, ge, ent_arg, inv_temp, chunk,
                                          need_h, need_w, need_b and bias is not None)
        else:
            dh, dw, db = _torch_backward(hidden, weight, bias, safe_t, lse, g, ge, ent_arg, inv_temp, chunk,
                                         need_h, need_w, need_b and bias is not None)
        if db is not None:
            db = db.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None, None


def _flat_operands(hidden, weight, targets, bias, temperature):
    """Checked inputs of both entry points as the chunk drivers take them: hidden [N, H] and targets [N] (long)
    flattened, weight and bias in the operand dtype and contiguous; returns (h2, w, b, t1, lead shape, device
    type). Operand dtype: like F.linear, autocast's when it is on; otherwise weight and bias follow hidden (a
    differentiable cast, so gradients reach the original dtype)."""
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden [..., H] and weight [V, H] mismatch: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError("targets must be an integer tensor")
    if not (hidden.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise TypeError("hidden and weight must be floating tensors")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dev_type = hidden.device.type
    dtype = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    b = None if bias is None else bias.to(dtype).contiguous()
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    return h2, w, b, targets.reshape(-1).long(), hidden.shape[:-1], dev_type


# ----------------------------------------------------------------------------------------
# Weighted sum with the gradient computed in the forward (6·N·H·V instead of 8·N·H·V)
# ----------------------------------------------------------------------------------------


def _weighted_forward(hidden, weight, bias, targets, valid, tw, inv_temp, chunk, want_ent, need_h, need_w, need_b,
                      impl="torch", lse=None, dw_accum="fp32"):
    """One pass over row chunks: logits (one GEMM), log-probs, and, with the per-token weights already known,
    d_logits = w_i ([j == t_i] - p_ij) / T, consumed at once by the dH and dW GEMMs: nothing is recomputed.
    impl="triton": one row kernel turns each chunk's fp32 logits into log-probs and d_logits (written in the
    weight's dtype when cuBLAS takes it, else over the logits) in two reads and one write; the torch path makes
    several elementwise passes. ``lse`` [N]: also store each row's logsumexp there."""
    n = hidden.shape[0]
    ops = _Operands(weight, bias)
    w32 = None if ops.native else ops.w32
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    ent = torch.zeros(n, dtype=torch.float32, device=hidden.device) if want_ent else None
    safe_t = torch.where(valid, targets, 0)
    g = torch.where(valid, tw, torch.zeros((), dtype=torch.float32, device=hidden.device))
    grads = need_h or need_w or need_b
    acc = _GradAccumulator(hidden, weight, bias, math.ceil(n / chunk), need_h, need_w, need_b,
                           dw_accum) if grads else None
    if impl == "triton":
        from . import _triton_logprob as tk
        low = grads and ops.native and ops.low_precision    # d_logits straight into the GEMMs' dtype
        dx_buf = torch.empty((min(chunk, n), weight.shape[0]), dtype=weight.dtype, device=hidden.device) if low else None
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = ops.logits(hidden[s:e], inv_temp)  # the only [chunk, V] fp32 buffer
        if impl == "triton":
            dx = (dx_buf[: e - s] if low else z) if grads else None
            tk.wsum_rows(z, safe_t[s:e], g[s:e], inv_temp, dx, logp[s:e], None if ent is None else ent[s:e],
                         None if lse is None else lse[s:e])
        else:
            lse_c = torch.logsumexp(z, dim=-1, keepdim=True)
            if lse is not None:
                lse[s:e] = lse_c.squeeze(1)
            z -= lse_c  # log p
            logp[s:e] = z.gather(1, safe_t[s:e, None]).squeeze(1)
            if want_ent:
                ent[s:e] = -(z.exp() * z).nan_to_num_(nan=0.0).sum(-1)
            dx = _dlogits_from_logp(z, safe_t[s:e], g[s:e], None, None, inv_temp) if grads else None
        if grads:
            acc.add(s, e, hidden[s:e], dx, w32=w32)
        del z, dx
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    logp = torch.where(valid, logp, zero)
    if ent is not None:
        ent = torch.where(valid, ent, zero)
    dh, dw, db = acc.result() if grads else (None, None, None)
    return logp, ent, dh, dw, db


class _WeightedLogprobSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tw, inv_temp, ignore_index, chunk, want_ent, impl, dw_accum,
                grad_on):
        valid = targets != ignore_index
        # (needs_input_grad follows requires_grad alone: under torch.no_grad, an evaluation, the [V, H] gradient
        # was still computed and held; `grad_on` is the caller's grad mode, off inside any forward)
        need_h, need_w, need_b = (bool(x) and grad_on for x in ctx.needs_input_grad[:3])
        need_b = need_b and bias is not None
        logp, ent, dh, dw, db = _weighted_forward(hidden, weight, bias, targets, valid, tw, inv_temp, chunk,
                                                  want_ent, need_h, need_w, need_b, impl, dw_accum=dw_accum)
        if db is not None:
            db = db.to(bias.dtype)
        ctx.grads = (dh, dw, db)
        ctx.mark_non_differentiable(logp)
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        total = (tw * logp).sum()
        return total, logp, ent

    @staticmethod
    def backward(ctx, g_total, _g_logp, _g_ent):
        if ctx.grads is None:
            raise RuntimeError("linear_logprob_weighted_sum: a second backward through the same call; its "
                               "gradients are made once, in the forward")
        dh, dw, db = ctx.grads
        ctx.grads = None  # scaled in place below: they belong to this backward only
        if g_total is None:
            return (None,) * 12
        scale = lambda x: None if x is None else x.mul_(g_total.to(x.dtype))
        return scale(dh), scale(dw), scale(db), None, None, None, None, None, None, None, None, None


def linear_logprob_weighted_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int | None = None,
    return_logp: bool = False,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    dw_accum: str = "fp32",
):
    """``sum_i token_weight[i] * logp[i]`` with its gradient computed during the forward.

    For losses whose per-token weights are known before the head runs: a cross-entropy (weights -1/n), a
    policy gradient with detached advantages (weights -A_i), VeriFree's objective (-A_i on the reasoning,
    -R_i on the answer).  Each chunk's logits are made once and turned into d_logits on the spot, so the
    head costs 6·N·H·V FLOPs where ``linear_logprob`` + backward costs 8 (it recomputes the logits to
    support any upstream gradient).  ``token_weight`` is a constant: no gradient flows into it.  The
    gradients w.r.t. hidden / weight / bias are held from the forward until backward (one [N, H] and one
    [V, H] tensor, the size of the gradients themselves).

    Runs chunked torch GEMMs on any device (cuBLAS on CUDA; bf16 operands with fp32 accumulation there).
    Between the GEMMs, backend 'triton' (the default on CUDA) runs one row kernel per chunk (softmax, log-probs
    and d_logits in two reads of the logits and one write); 'torch' does it with elementwise torch ops.
    Largest temporary: one [chunk, V] fp32 block (``chunk`` as in ``linear_logprob``), plus a [chunk, V]
    d_logits block in the weight's dtype on the Triton path with bf16/fp16 weights.

    ``dw_accum``: how a bf16/fp16 weight's gradient is summed over the row chunks. 'fp32' (default): in an fp32
    [V, H] buffer, rounded once at the end (V·H·4 bytes, e.g. 2.5 GB for a 152k x 4096 head). 'weight': in the
    weight's own dtype, as Liger's fused linear cross-entropy does: half those bytes and half the bytes each
    chunk's dW GEMM reads and writes, at the cost of one rounding per chunk. On a bf16 toy (1024 x 64 x 2000)
    dW's norm-relative error against fp64 is 3.0e-3 with either mode in 2 chunks (the bf16 operands' own),
    4.2e-3 / 5.6e-3 / 6.5e-3 in 8 / 32 / 128 chunks with 'weight'.

    Returns the scalar sum, and if asked the (detached) per-token log-probs and entropies.
    """
    if token_weight.shape != targets.shape:
        raise ValueError(f"token_weight {tuple(token_weight.shape)} must have the shape of targets "
                         f"{tuple(targets.shape)}")
    if dw_accum not in DW_ACCUM:
        raise ValueError(f"dw_accum={dw_accum!r}: valid choices: {', '.join(DW_ACCUM)}")
    h2, w, bias, t1, lead, dev_type = _flat_operands(hidden, weight, targets, bias, temperature)
    impl = resolve_backend(backend, h2)
    tw = token_weight.detach().reshape(-1).float()
    n, v = h2.shape[0], w.shape[0]
    if n == 0:
        total = (h2.sum() + w.sum()) * 0.0  # keeps the graph for an empty batch
        zeros = h2.new_zeros(lead, dtype=torch.float32)
        out = (total.float(),) + ((zeros,) if return_logp else ()) + ((zeros.clone(),) if return_entropy else ())
        return out if len(out) > 1 else out[0]
    with torch.autocast(dev_type, enabled=False):
        total, logp, ent = _WeightedLogprobSum.apply(h2, w, bias, t1, tw, 1.0 / float(temperature),
                                                     int(ignore_index), chunk_rows(n, v, chunk),
                                                     bool(return_entropy), impl, dw_accum,
                                                     torch.is_grad_enabled())
    out = (total,)
    if return_logp:
        out += (logp.detach().reshape(lead),)
    if return_entropy:
        out += (ent.detach().reshape(lead),)
    return out if len(out) > 1 else out[0]


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    ignore_index: int = -100,
):
    """Log-probability of ``targets`` under ``softmax((hidden @ weight.T + bias) / T)``.

    Args:
        hidden: [..., H] activations (fp32, bf16 or fp16).
        weight: [V, H] LM-head weight.  Under autocast, hidden/weight/bias are cast to the
            autocast dtype (as ``F.linear`` would); otherwise weight/bias are cast to
            ``hidden.dtype``.  Accumulation is always fp32.
        targets: [...] integer token ids; entries equal to ``ignore_index`` give 0.
        bias: optional [V].
        temperature: T > 0; logits are divided by it (as RL samplers do).
        chunk: rows per chunk of logits (default: ~2**27 logits per chunk).  The torch
            path never holds more than one [chunk, V] block; the Triton forward holds
            none, its backward one.
        return_entropy: also return the entropy of each row's distribution (0 for
            ignored rows).  Its gradient is exact, like the log-prob's.
        backend: 'auto' (Triton on CUDA, torch elsewhere), 'torch', 'triton' (fused Triton GEMM kernels:
            logits never stored) or 'triton_rows' (cuBLAS GEMMs over [chunk, V] logit blocks with the Triton row
            kernel between them, as ``linear_logprob_weighted_sum`` runs; an entropy gradient uses the
            'triton' backward).
        ignore_index: target value that marks padding.

    Returns:
        logp [...] fp32 (always <= 0), or (logp, entropy) if ``return_entropy``.
        Differentiable w.r.t. hidden, weight and bias.
    """
    h2, w, b, t1, lead, dev_type = _flat_operands(hidden, weight, targets, bias, temperature)
    impl = resolve_backend(backend, h2, variants=("triton_rows",))
    n, v = h2.shape[0], w.shape[0]
    rows = chunk_rows(n, v, chunk)
    if n == 0:   # zeros that keep the graph: backward() gives zero gradients (it raised on a detached zero)
        out = h2.new_zeros(lead, dtype=torch.float32) + (h2.sum() + w.sum()).float() * 0.0
        return (out, out.clone()) if return_entropy else out
    with torch.autocast(dev_type, enabled=False):  # our matmuls pick their own precision
        logp, ent = _LinearLogprob.apply(h2, w, b, t1, 1.0 / float(temperature), int(ignore_index), rows,
                                         bool(return_entropy), impl)
    logp = logp.reshape(lead)
    if return_entropy:
        return logp, ent.reshape(lead)
    return logp
