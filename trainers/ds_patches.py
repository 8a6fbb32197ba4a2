"""The two DeepSpeed bugs runx works around (DeepSpeed 0.19.8).

1. (`apply`, only when parameters live on NVMe) ZeRO-Infinity's NVMe prefetcher
(PartitionedParameterCoordinator.__prefetch_nvme_param_partitions) walks the parameter trace and collects
every upcoming partition still on NVMe, without removing duplicates. A
parameter that occurs twice within the prefetch window (an LM head whose forward use is followed at once
by its backward use, a tied embedding, a module called twice) is then handed to
AsyncPartitionedParameterSwapper.swap_in twice in one call, and the second copy dies with
"AssertionError: param N already assigned swap buffer id B". Seen on an H100 (bf16 ~0.13B Llama) and on
CPU (bf16 llama_m); tests/test_z_nvme.py reproduces it on CPU.

The fix keeps the first occurrence of each parameter in that list. Swapping one partition into two buffers
is never meaningful, so this changes nothing else.

2. (`release_engine`) A ZeRO-3 engine is never freed: DeepSpeed keeps its model in a module-level list
(`parameter_offload.FWD_MODULE_STACK`, appended at engine init and never popped) and its parameter coordinator
in a class-level `functools.lru_cache` (`PartitionedParameterCoordinator.__params_to_release`, keyed by the
coordinator and the module), and the model's forward hooks hold the engine. `engine.destroy()` removes neither.
The model's weights and the optimizer's states stay allocated until the process exits: jobs of a Hydra sweep
that run one after another in one process (the basic launcher, Optuna) pile them up on the GPU. Measured on
CPU: one live engine per finished job, also after `gc.collect()`; none with this release.
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


def release_engine(engine) -> None:
    """Free what a finished engine holds: `engine.destroy()`, then DeepSpeed's two process-wide references to
    a ZeRO-3 engine's model (see the module docstring). Other live engines lose only the cached sets of
    parameters to release after each module, which DeepSpeed recomputes on their next step."""
    module = getattr(engine, "module", None)
    try:
        engine.destroy()
    finally:
        from deepspeed.runtime.zero import parameter_offload
        parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK
                                                 if m is not module]
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
        fn = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
        # the lru_cache sits under DeepSpeed's NVTX wrapper (which does not expose it as __wrapped__)
        for obj in [fn, *(c.cell_contents for c in (getattr(fn, "__closure__", None) or ()))]:
            if hasattr(obj, "cache_clear"):
                obj.cache_clear()
