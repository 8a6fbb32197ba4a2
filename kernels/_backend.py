"""Backend selection shared by the kernels in this package.

Triton is imported lazily and only when a Triton backend is actually chosen, so that
``import runx.kernels`` stays cheap and works on machines whose triton install has no
usable driver (CPU-only CI).  The Triton kernels run on CUDA tensors, or on CPU tensors
through Triton's interpreter when ``TRITON_INTERPRET=1`` is set *before* the kernel
modules are imported (``triton.jit`` reads it at decoration time).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def interpret_mode() -> bool:
    """True when Triton kernels will run in the (CPU, numpy-based) interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None if ``import triton`` works, else the reason (cached: import is slow)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # broad on purpose: broken driver setups raise odd errors
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_backend(backend: str, tensor: torch.Tensor, variants: tuple = ()) -> str:
    """Map ``backend`` ('auto' | 'torch' | 'triton' | one of ``variants``) to the implementation to run.

    'auto' picks Triton for CUDA tensors when triton imports, the torch reference
    otherwise (it never picks the slow interpreter); RUNX_KERNEL_BACKEND=torch|triton overrides
    that choice for every 'auto' call (e.g. the torch reference on a GPU where a Triton kernel
    misbehaves).  An explicit 'triton' that cannot run raises instead of silently falling back,
    so benchmarks and tests cannot lie.
    """
    valid = BACKENDS + tuple(variants)   # variants: an op's other Triton implementations ('triton_rows')
    if backend not in valid:
        raise ValueError(f"backend must be one of {valid}, got {backend!r}")
    forced = os.environ.get("RUNX_KERNEL_BACKEND", "").strip()
    if backend == "auto" and forced:     # one switch for every call the recipes make with 'auto'
        if forced not in ("torch", "triton"):
            raise ValueError(f"RUNX_KERNEL_BACKEND={forced!r}: valid values are torch, triton")
        backend = forced
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_import_error() is None else "torch"
    if not (tensor.is_cuda or interpret_mode()):
        raise RuntimeError(
            f"backend={backend!r} needs CUDA tensors, or TRITON_INTERPRET=1 (set before the "
            "first triton kernel import) to run CPU tensors in Triton's interpreter"
        )
    err = triton_import_error()
    if err is not None:
        raise RuntimeError(f"backend={backend!r} requested but triton is unusable: {err}")
    return backend
