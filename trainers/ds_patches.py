"""The one DeepSpeed bug runx works around (DeepSpeed 0.19.8), applied only when parameters live on NVMe.

ZeRO-Infinity's NVMe prefetcher (PartitionedParameterCoordinator.__prefetch_nvme_param_partitions) walks the
parameter trace and collects every upcoming partition still on NVMe, without removing duplicates. A
parameter that occurs twice within the prefetch window (an LM head whose forward use is followed at once
by its backward use, a tied embedding, a module called twice) is then handed to
AsyncPartitionedParameterSwapper.swap_in twice in one call, and the second copy dies with
"AssertionError: param N already assigned swap buffer id B". Seen on an H100 (bf16 ~0.13B Llama) and on
CPU (bf16 llama_m); tests/test_z_nvme.py reproduces it on CPU.

The fix keeps the first occurrence of each parameter in that list. Swapping one partition into two buffers
is never meaningful, so this changes nothing else.
"""
from __future__ import annotations

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper as S
    original = S.swap_in

    def swap_in(self, params, async_op=True, swap_in_buffers=None):
        if swap_in_buffers is None and len(params) > 1:
            seen: set[int] = set()
            params = [p for p in params if not (p.ds_id in seen or seen.add(p.ds_id))]
        return original(self, params, async_op=async_op, swap_in_buffers=swap_in_buffers)

    swap_in.__wrapped__ = original
    S.swap_in = swap_in
    _APPLIED = True
