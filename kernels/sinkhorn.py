"""SwAV's (distributed) Sinkhorn-Knopp, computed stably in fp32.

SwAV (``main_swav.py: distributed_sinkhorn``) does, with Q = exp(scores / eps).T [K, B]:

    Q /= sum(Q)                                  # all-reduced total
    repeat iters:
        Q /= all_reduce(Q.sum(dim=1)); Q /= K    # prototypes (rows) -> 1/K each
        Q /= Q.sum(dim=0); Q /= B_global         # samples (columns) -> 1/B each
    return (Q * B_global).T                      # [B, K], every sample sums to 1

Plain ``exp(scores / eps)`` overflows fp32 once scores/eps > 88 (eps = 0.01 and a cosine
score of 0.9), and fp16/bf16 much earlier.  Every normalisation above only rescales rows
or columns, so we carry the scalings as log-potentials instead of touching Q:

    Q_kb = exp(x_bk + f_k + g_b),   x = scores / eps   (fp32)

* prototype step: f_k = -log K - logsumexp_b(x_bk + g_b)   (over the *global* batch)
* sample step:    g_b = -log B - logsumexp_k(x_bk + f_k)   (local: a sample lives on one rank)
* output:         Q[b] = softmax_k(x_bk + f_k)             (last sample step, times B)

This is the same sequence of matrices as SwAV's (the initial division by the total is a
scalar that the first prototype step cancels), but every exp is max-shifted, so there is
no overflow and no all-zero row or column: no NaN/Inf for any finite scores.  The global
logsumexp over the batch is combined across ranks with an all-reduce MAX of the per-rank
maxima and an all-reduce SUM of the rescaled sums (two K-vectors per iteration).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._backend import resolve_backend

# A reducer is called as fn(tensor, op) with op in {"sum", "max"} and returns the
# element-wise reduction of ``tensor`` over all processes (it may work in place).
Reducer = Callable[[torch.Tensor, str], torch.Tensor]


def _auto_reducer() -> Reducer | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
        dist.all_reduce(t, op=ops[op])
        return t

    return reduce


def _make_reducer(world_sums) -> Reducer | None:
    if world_sums is None:
        return None
    if isinstance(world_sums, str):
        if world_sums != "auto":
            raise ValueError(f"world_sums must be None, 'auto' or a callable, got {world_sums!r}")
        return _auto_reducer()
    if not callable(world_sums):
        raise TypeError("world_sums must be None, 'auto' or a callable fn(tensor, op)")
    return world_sums


# ----------------------------------------------------------------------------------------
# Torch reference implementation of the three passes (also the CPU path)
# ----------------------------------------------------------------------------------------


class _TorchOps:
    @staticmethod
    def proto_stats(scores, inv_eps, g):
        """Per prototype k: local max_b and sum_b exp(x_bk + g_b - max)."""
        x = scores.float() * inv_eps
        if x.shape[0] == 0:   # a rank without samples this step still takes part in the global sums
            return x.new_full((x.shape[1],), float("-inf")), x.new_zeros(x.shape[1])
        if g is not None:
            x += g[:, None]
        m = x.amax(dim=0)
        x -= m
        return m, x.exp_().sum(dim=0)

    @staticmethod
    def sample_lse(scores, inv_eps, f):
        return torch.logsumexp(scores.float() * inv_eps + f, dim=1)

    @staticmethod
    def assign(scores, inv_eps, f):
        return torch.softmax(scores.float() * inv_eps + f, dim=1)


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    eps: float = 0.05,
    iters: int = 3,
    world_sums: None | str | Reducer = None,
    backend: str = "auto",
    cuda_graph: bool = True,
) -> torch.Tensor:
    """SwAV code assignment Q [B, K] (fp32) from prototype scores [B, K].

    Args:
        scores: [B_local, K] scores of this process's samples against K prototypes (any
            float dtype; computed in fp32).
        eps: entropic regularisation (SwAV: 0.05; 0.03 against collapse; stable to 0.01
            and below).
        iters: Sinkhorn iterations (SwAV: 3), >= 1.
        world_sums: None (single process), "auto" (torch.distributed all_reduce when
            initialised with world size > 1), or a callable ``fn(tensor, op)`` with
            ``op`` in {"sum", "max"} returning the reduction over all processes.  The
            global batch size is the sum of the local ones.
        backend: 'auto' (Triton on CUDA), 'torch' or 'triton'.
        cuda_graph: single process on CUDA with Triton: replay the launches from a CUDA
            graph captured once per shape (the call is otherwise bound by host launch
            time).  Skipped while the caller is itself capturing a graph.  Each cached
            shape keeps its static input, Q and work buffers (about 2 x B x K fp32) alive;
            up to 4 shapes are cached, least recently used dropped first.

    Returns:
        Q [B_local, K] fp32, each row sums to 1; over the global batch each prototype
        receives mass ~ B_global / K (exactly after the prototype step, approximately
        after the final sample step).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, K], got {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise TypeError("scores must be a floating tensor")
    if scores.shape[1] == 0:
        raise ValueError("scores must have at least one prototype (K >= 1), got [B, 0]")
    if int(iters) < 1:
        raise ValueError("iters must be >= 1 (SwAV uses 3)")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    reduce = _make_reducer(world_sums)
    impl = resolve_backend(backend, scores)
    if impl == "triton":
        from . import _triton_sinkhorn as ops
    else:
        ops = _TorchOps
    b_local, k = scores.shape
    if b_local == 0 and reduce is None:
        return scores.new_zeros((0, k), dtype=torch.float32)
    inv_eps = 1.0 / float(eps)
    log_k = math.log(k)
    log_b = math.log(max(b_local, 1))
    if reduce is None and impl == "triton":  # single process: the fused launches
        if cuda_graph and scores.is_cuda and not torch.cuda.is_current_stream_capturing():
            return ops.fused_graphed(scores, inv_eps, int(iters), log_k, log_b)
        return ops.fused(scores, inv_eps, int(iters), log_k, log_b)
    g = None
    f = None
    for it in range(int(iters)):
        # Prototype step: f_k = -log K - logsumexp over the global batch of (x_bk + g_b).
        m, s = ops.proto_stats(scores, inv_eps, g)
        if reduce is not None:
            m_glob = reduce(m.clone(), "max")
            s = torch.where(torch.isneginf(m), 0.0, s * torch.exp(m - m_glob))   # (no samples here: m = -inf)
            if it == 0:  # piggy-back the global batch size on the first sum
                packed = reduce(torch.cat([s, s.new_tensor([float(b_local)])]), "sum")
                s, log_b = packed[:-1], torch.log(packed[-1])  # stays on device: no sync
            else:
                s = reduce(s, "sum")
            m = m_glob
        f = -log_k - m - torch.log(s)
        if it + 1 < iters:
            # Sample step: g_b = -log B - logsumexp_k(x_bk + f_k)  (rows live on one rank).
            g = -log_b - ops.sample_lse(scores, inv_eps, f)
    # The last sample step followed by "* B" is a softmax over prototypes.
    return ops.assign(scores, inv_eps, f)
