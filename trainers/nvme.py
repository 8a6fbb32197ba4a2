"""ZeRO-Infinity (NVMe offload) settings derived from the model instead of guessed.

Raw DeepSpeed with hand-set buffers died with "Not enough buffers 0 for swapping 1" (shared/research/
measured.md, on an H100 and on CPU). The parameter swapper needs a pinned buffer for every parameter
that is in flight at once: each buffer must hold the largest parameter (partition), and the count must
cover the parameters live under `stage3_max_live_parameters` / prefetch plus the ones a module's
forward holds simultaneously. Tensors under 1 MiB are never swapped (MIN_AIO_BYTES in DeepSpeed).
"""
from __future__ import annotations

import os
import shutil

MIN_AIO_BYTES = 1024 ** 2


def param_stats(model, world_size: int = 1) -> dict:
    numels = [getattr(p, "ds_numel", p.numel()) for p in model.parameters()]
    numels.sort(reverse=True)
    return {"n_params": sum(numels), "largest": numels[0] if numels else 0, "count": len(numels),
            "numels": numels, "world_size": world_size}


def derive_param_buffers(stats: dict, bytes_per_elem: int, max_live: float, prefetch: float) -> tuple[int, int]:
    """(buffer_count, buffer_size in elements) for offload_param=nvme."""
    world = max(1, stats["world_size"])
    largest_part = -(-stats["largest"] // world)
    # buffer size: >= the largest parameter partition, aligned to the aio block
    align = MIN_AIO_BYTES // bytes_per_elem
    size = max(align, -(-largest_part // align) * align)
    swappable = [-(-n // world) for n in stats["numels"] if -(-n // world) * bytes_per_elem >= MIN_AIO_BYTES]
    # live set: enough buffers for the parameters that can be resident at once (max_live + prefetch
    # elements), counted with the smallest swappable tensors (worst case = most tensors), plus slack
    # for the module being computed and the one being prefetched.
    budget = max_live + prefetch
    live, acc = 0, 0
    for n in sorted(swappable):
        if acc + n > budget:
            break
        acc += n
        live += 1
    count = max(8, min(len(swappable), live) + 4)
    # never fewer than all swappable params of the biggest module pair: cap at total swappable + 4
    count = min(count, len(swappable) + 4) if swappable else 8
    return count, size


def check_nvme_path(path: str, need_bytes: int) -> None:
    """Fail fast (before any model is built) on an unwritable or too-full nvme_path."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".runx_write_probe")
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
        os.unlink(probe)
    except OSError as e:
        raise RuntimeError(f"trainer.nvme_path={path!r} is not writable ({e.strerror}); "
                           f"ZeRO-Infinity needs {need_bytes / 2**30:.2f} GiB there. "
                           f"Point trainer.nvme_path at a writable local NVMe folder.") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise RuntimeError(f"trainer.nvme_path={path!r} has {free / 2**30:.2f} GiB free but ZeRO-Infinity "
                           f"needs {need_bytes / 2**30:.2f} GiB (params + optimizer states). "
                           f"Free space or choose another trainer.nvme_path.")


def nvme_bytes_needed(n_params: int, offload_param: bool, offload_optimizer: bool, param_bytes: int) -> int:
    need = 0
    if offload_param:
        need += n_params * param_bytes
    if offload_optimizer:
        need += n_params * 4 * 3  # fp32 master, exp_avg, exp_avg_sq
    return int(need * 1.1) + 64 * MIN_AIO_BYTES


def build_async_io() -> bool:
    """JIT-build (or load the cached) DeepSpeed async_io op; True when it loads."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder import AsyncIOBuilder
    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        return False
    builder.load(verbose=False)
    return True


def aio_available() -> bool:
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.ops.op_builder import AsyncIOBuilder
        return AsyncIOBuilder().is_compatible(verbose=False)
    except Exception:
        return False


if __name__ == "__main__":
    import sys
    if "--build-aio" in sys.argv:
        ok = build_async_io()
        print("async_io", "ready" if ok else "NOT compatible (install libaio-dev)")
        sys.exit(0 if ok else 1)
