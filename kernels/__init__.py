"""Fused numerical kernels for runx (issue #3).

* ``linear_logprob``: per-token log-probs (and entropy) of an LM head without the [N, V]
  logits, differentiable w.r.t. hidden, weight and bias.
* ``linear_logprob_weighted_sum``: sum_i w_i·logp_i for weights known in advance, its gradient made in
  the forward (6·N·H·V FLOPs instead of 8).
* ``sinkhorn``: SwAV's distributed Sinkhorn-Knopp equipartition, stable for small eps.

Both take ``backend='auto'|'torch'|'triton'``.  Importing this package does not import
triton; the Triton kernels load on first use (CUDA tensors, or CPU tensors with
TRITON_INTERPRET=1).
"""

from .logprob import chunk_rows, linear_logprob, linear_logprob_weighted_sum
from .sinkhorn import sinkhorn

__all__ = ["linear_logprob", "linear_logprob_weighted_sum", "sinkhorn", "chunk_rows"]
