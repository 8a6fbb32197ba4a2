"""Fused numerical kernels for runx (issue #3).

* ``linear_logprob``: per-token log-probs (and entropy) of an LM head without the [N, V]
  logits, differentiable w.r.t. hidden, weight and bias.
* ``sinkhorn``: SwAV's distributed Sinkhorn-Knopp equipartition, stable for small eps.

Both take ``backend='auto'|'torch'|'triton'``.  Importing this package does not import
triton; the Triton kernels load on first use (CUDA tensors, or CPU tensors with
TRITON_INTERPRET=1).
"""

from .logprob import chunk_rows, linear_logprob
from .sinkhorn import sinkhorn

__all__ = ["linear_logprob", "sinkhorn", "chunk_rows"]
