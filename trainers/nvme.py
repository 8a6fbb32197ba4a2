"""ZeRO-Infinity (NVMe offload) settings derived from the model and the disk instead of guessed.

Why raw DeepSpeed crashed with "Not enough buffers 0 for swapping 1" (shared/research/measured.md, on an
H100 and on CPU), read from deepspeed/runtime/zero/partitioned_param_coordinator.py (0.19.8):

* A parameter partition on NVMe is read into one of `buffer_count` pinned buffers of `buffer_size`
  elements, and that buffer stays taken until the parameter is *released* (re-partitioned).
* Step 0 records the module trace and releases every parameter right after its module ran, so a handful
  of buffers suffices — which is why hand-set counts survive step 0.
* From step 1 on (complete trace) a parameter is kept, and so is its buffer, while its next use lies
  within `stage3_max_reuse_distance` parameter elements (default 1e9). Everything used in the forward
  pass and reused in the backward pass within that distance stays resident at the forward/backward turn.
  For a model under ~0.5e9 parameters that is every swappable parameter; buffer_count 5/6/16 runs dry.
* The NVMe prefetcher takes only free buffers, in trace order, so it never starves the module being run.

So the live set at any moment is: parameters retained under the reuse distance R, plus the swappable
parameters of the module being fetched; buffer_count must cover it (+1 for the single-parameter swap-in
the optimizer does at start-up, +1 slack). Tensors whose partition is under max(1 MiB, aio.block_size)
are never swapped (MIN_AIO_BYTES in DeepSpeed) and need no buffer. `buffer_size` must hold the largest
swappable partition, rounded up to the I/O alignment.

The aio block (block size, queue depth, threads) comes from a short read/write probe of nvme_path with
DeepSpeed's own aio handle (O_DIRECT), cached per path and device in ~/.cache/runx/aio_probe.json.
"""
from __future__ import annotations

import json
import os
import shutil
import time

MIN_AIO_BYTES = 1024 ** 2          # deepspeed/runtime/swap_tensor/utils.py
AIO_ALIGNED_BYTES = 1024           # ditto: per-thread I/O alignment
DEEPSPEED_DEFAULT_REUSE = 1e9      # stage3_max_reuse_distance default
DEEPSPEED_AIO_DEFAULTS = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1,
                          "single_submit": False, "overlap_events": True}


# ----------------------------------------------------------------------------------- model statistics
def param_stats(model, world_size: int = 1, trainable_only: bool = False) -> dict:
    """Sizes of a model's parameters (ZeRO-3 aware: `ds_numel` when partitioned), largest first, plus the
    forward-order sizes and, per module, how many parameters one fetch brings in."""
    seen, order = set(), []
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        order.append(int(getattr(p, "ds_numel", p.numel())))
    per_module = [sum(1 for _ in m.parameters(recurse=False)) for m in model.modules()]
    numels = sorted(order, reverse=True)
    return {"n_params": sum(numels), "largest": numels[0] if numels else 0, "count": len(numels),
            "numels": numels, "forward_numels": order, "module_max_params": max(per_module or [1]),
            "world_size": world_size}


def _partition(numel: int, world: int) -> int:
    return -(-numel // max(1, world))


def swappable_partitions(stats: dict, bytes_per_elem: int, block_size: int = MIN_AIO_BYTES) -> list[int]:
    """Per-rank partition sizes (elements, forward order) of the parameters DeepSpeed swaps to NVMe."""
    threshold = max(MIN_AIO_BYTES, int(block_size))
    world = stats.get("world_size", 1)
    return [_partition(n, world) for n in stats.get("forward_numels", stats["numels"])
            if _partition(n, world) * bytes_per_elem >= threshold]


def retained_under_reuse(swappable: list[int], reuse_distance: float) -> int:
    """Most swappable parameters kept resident at once under stage3_max_reuse_distance = R.

    At the forward/backward turn a parameter at forward position x (of F elements) is next used after
    about 2(F - x) traversed elements, so it is kept iff it lies in the last R/2 elements of the forward
    order. We bound it by the *most* swappable tensors fitting in R elements (smallest first): safe for
    any order, tied weights and activation-checkpoint re-forwards.
    """
    kept, acc = 0, 0
    for n in sorted(swappable):
        if acc + n > reuse_distance:
            break
        acc += n
        kept += 1
    return kept


def derive_param_buffers(stats: dict, bytes_per_elem: int, max_live: float, prefetch: float,
                         max_reuse_distance: float = DEEPSPEED_DEFAULT_REUSE,
                         block_size: int = MIN_AIO_BYTES) -> tuple[int, int]:
    """(buffer_count, buffer_size in elements) for offload_param=nvme that cannot run out of buffers.

    `max_live` / `prefetch` bound the gathered parameters and the prefetch, not the held buffers (the
    NVMe prefetcher only takes free buffers), so the count follows the reuse distance; they are kept in
    the signature for callers that pass the trainer's ZeRO-3 knobs.
    """
    swappable = swappable_partitions(stats, bytes_per_elem, block_size)
    align = max(1, AIO_ALIGNED_BYTES // bytes_per_elem)
    largest = max(swappable, default=MIN_AIO_BYTES // bytes_per_elem)
    size = -(-largest // align) * align
    module_max = min(len(swappable), int(stats.get("module_max_params", 2))) or 1
    count = retained_under_reuse(swappable, max_reuse_distance) + module_max + 2
    return int(count), int(size)


def reuse_distance_for_buffers(stats: dict, bytes_per_elem: int, buffer_count: int,
                               block_size: int = MIN_AIO_BYTES) -> float:
    """The largest stage3_max_reuse_distance whose live set fits `buffer_count` buffers (0 = release every
    parameter after use). Raises when even that cannot fit (fewer buffers than one module needs)."""
    swappable = swappable_partitions(stats, bytes_per_elem, block_size)
    module_max = min(len(swappable), int(stats.get("module_max_params", 2))) or 1
    room = int(buffer_count) - module_max - 2
    if room < 0:
        raise ValueError(f"trainer.nvme_buffer_count={buffer_count} is too small: one module fetch needs "
                         f"{module_max} NVMe buffers plus 2 (start-up swap-in, slack); use >= {module_max + 2} "
                         f"or 'auto'")
    return float(sum(sorted(swappable)[:room]))


def nvme_param_settings(stats: dict, bytes_per_elem: int, buffer_count="auto", buffer_size="auto",
                        block_size: int = MIN_AIO_BYTES, max_reuse_distance: float | None = None,
                        buffer_budget_bytes: int | None = None) -> dict:
    """The offload_param block plus the ZeRO-3 reuse distance that keeps it from running dry.

    buffer_count="auto": DeepSpeed's reuse distance (or the one given) and enough buffers for it; if those
    pinned buffers would exceed `buffer_budget_bytes`, fewer buffers and a shorter reuse distance.
    buffer_count=N: the reuse distance shrunk until the live set fits N buffers.
    """
    if buffer_count == "auto":
        R = DEEPSPEED_DEFAULT_REUSE if max_reuse_distance is None else float(max_reuse_distance)
        count, size = derive_param_buffers(stats, bytes_per_elem, 0, 0, R, block_size)
        if buffer_budget_bytes is not None and count * size * bytes_per_elem > buffer_budget_bytes:
            module_max = min(len(swappable_partitions(stats, bytes_per_elem, block_size)),
                             int(stats.get("module_max_params", 2))) or 1
            count = max(module_max + 2, int(buffer_budget_bytes // (size * bytes_per_elem)))
            R = reuse_distance_for_buffers(stats, bytes_per_elem, count, block_size)
    else:
        count = int(buffer_count)
        R = reuse_distance_for_buffers(stats, bytes_per_elem, count, block_size)
        if max_reuse_distance is not None:
            R = min(R, float(max_reuse_distance))
        _, size = derive_param_buffers(stats, bytes_per_elem, 0, 0, R, block_size)
    if buffer_size != "auto":
        need = max(swappable_partitions(stats, bytes_per_elem, block_size), default=0)
        if int(float(buffer_size)) < need:
            raise ValueError(f"trainer.nvme_buffer_size={buffer_size} is smaller than the largest swapped "
                             f"parameter partition ({need} elements); use >= {need} or 'auto'")
        size = int(float(buffer_size))
    return {"buffer_count": int(count), "buffer_size": int(size), "max_in_cpu": 0,
            "stage3_max_reuse_distance": float(R)}


def deepspeed_param_device(zero_stage: int, offload_param: str, offload_optimizer: str) -> str:
    """DeepSpeed's offload_param device for runx's trainer.offload_param.

    Parameters in CPU memory next to optimizer states on NVMe are spelled the way DeepSpeed documents
    ZeRO-Infinity: device "nvme" with `max_in_cpu` covering every parameter ("nvme_in_cpu"; they are written
    to nvme_path once at start-up and then live in CPU memory). Measured on CPU (llama_m, alternating runs,
    quiet machine): optimizer step 0.042 s with it against 0.058-0.092 s with device "cpu", the same swap
    calls either way; the extra time sat in async_io.wait."""
    if int(zero_stage) == 3 and offload_param == "cpu" and offload_optimizer == "nvme":
        return "nvme_in_cpu"
    return offload_param


# ------------------------------------------------------------------------- optimizer states on NVMe
OPT_SERIAL_BUFFERS = 4   # DeepSpeed's documented offload_optimizer.buffer_count
OPT_SUB_GROUPS = 8       # sub-groups per rank when the swapper pipelines


def swapped_state_count(optim_name: str) -> int:
    """Optimizer states per parameter the NVMe swapper moves: AdamW's two moments, else one buffer."""
    return 2 if optim_name == "adamw" else 1


def optimizer_swap_buffers(n_states: int) -> int:
    """Pinned buffers DeepSpeed's pipelined optimizer swapper holds at once: three sub-groups in flight (the
    previous one being written, the current one stepping, the next one being read), each with its fp32
    partition, its optimizer states and its gradient; plus the states a first step creates unpinned (the
    swap-out copies them into new buffers). Adam: 14 (12 ran on CPU, 8 ran out)."""
    return 3 * (n_states + 2) + n_states


def local_ranks() -> int:
    """This node's ranks (torchrun: LOCAL_WORLD_SIZE; the DeepSpeed launcher: LOCAL_SIZE); 1 outside a launch."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    return 1


def default_pin_budget(ranks_per_node: int | None = None, ram_bytes: int | None = None) -> int:
    """Host memory one rank's pipelined optimizer swapper may pin: 5% of the node's RAM (at most 8 GiB), shared
    by its ranks (each took the whole 5%: 8 ranks pinned 20% of RAM). `ram_bytes`: another machine's (runx plan
    describing it), else this one's."""
    import psutil
    ram = psutil.virtual_memory().total if ram_bytes is None else int(ram_bytes)
    n = local_ranks() if ranks_per_node is None else max(1, int(ranks_per_node))
    return int(min(8 * 2 ** 30, 0.05 * ram) // n)


def nvme_optimizer_settings(stats: dict, n_states: int = 2, pin_budget_bytes: int | None = None,
                            sub_groups: int = OPT_SUB_GROUPS) -> dict:
    """The offload_optimizer block and ZeRO-3 sub_group_size for optimizer states on NVMe.

    DeepSpeed's default swapper reads one sub-group's fp32 partition, optimizer states and gradient, steps
    it, and writes it back; with the default sub_group_size (1e9) that is the whole partition of most
    models, so the disk idles while the optimizer computes and the other way round. With pipeline_read /
    pipeline_write it reads the next sub-group and writes the previous one while the current one steps.
    That needs several sub-groups and `optimizer_swap_buffers` pinned buffers, each as large as the largest
    sub-group (a sub-group closes at the first parameter that takes it to sub_group_size, so it can exceed
    it by up to one parameter). Sub-groups are kept >= MIN_AIO_BYTES so that DeepSpeed swaps them at all.
    Pipelined when that fits `pin_budget_bytes` (default: this rank's share of 5% of RAM), else DeepSpeed's
    serial swapper (buffer_count 4).
    Measured on CPU (llama_m, optimizer step): 0.05-0.06 s pipelined vs 0.07-0.10 s serial."""
    world = stats.get("world_size", 1)
    per_rank = _partition(int(stats["n_params"]), world)
    largest = _partition(int(stats["largest"]), world)
    serial = {"block": {"buffer_count": OPT_SERIAL_BUFFERS, "fast_init": False}, "sub_group_size": None,
              "pipelined": False, "pinned_bytes": OPT_SERIAL_BUFFERS * 4 * per_rank}
    group = max(-(-per_rank // max(1, int(sub_groups))), MIN_AIO_BYTES // 4)
    if per_rank < 2 * group:  # a single sub-group: nothing to overlap
        return serial
    count = optimizer_swap_buffers(n_states)
    pinned = count * 4 * (group + largest)
    budget = default_pin_budget() if pin_budget_bytes is None else int(pin_budget_bytes)
    if pinned > budget:
        return serial
    return {"block": {"buffer_count": count, "fast_init": False, "pipeline_read": True, "pipeline_write": True},
            "sub_group_size": int(group), "pipelined": True, "pinned_bytes": int(pinned)}


def param_buffer_bytes(count: int, size: int, bytes_per_elem: int) -> int:
    return int(count) * int(size) * int(bytes_per_elem)


# ----------------------------------------------------------------------------------- disk space
def nvme_bytes_needed(n_params: int, offload_param: bool, offload_optimizer: bool, param_bytes: int,
                      optimizer_state_bytes: int = 8, n_trainable: int | None = None) -> int:
    """Bytes ZeRO-Infinity writes under nvme_path (all ranks of this node together).

    params: one `param_bytes` copy each; optimizer (of the `n_trainable` parameters only, all by default):
    fp32 master (4) + optimizer states (Adam: 8) + the fp32 gradient partition DeepSpeed swaps with them (4).
    10% + 64 MiB headroom for alignment padding.
    """
    need = 0
    if offload_param:
        need += n_params * param_bytes
    if offload_optimizer:
        need += (n_params if n_trainable is None else n_trainable) * (4 + optimizer_state_bytes + 4)
    return int(need * 1.1) + 64 * MIN_AIO_BYTES


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def run_swap_dir(nvme_path: str, run_dir: str) -> str:
    """A run's own folder under trainer.nvme_path. DeepSpeed names its swap files by tensor and rank only
    (`zero_stage_3/optimizer/rank0/exp_avg-0_0.tensor.swp`), so two runs swapping into one folder (the jobs of
    a parallel sweep, SLURM jobs sharing a node's NVMe) would overwrite each other's optimizer states and
    parameters. The name follows the run folder: a resumed run gets the same one."""
    import hashlib
    run = os.path.abspath(run_dir).rstrip("/")
    tag = hashlib.sha1(run.encode()).hexdigest()[:8]
    return os.path.join(os.path.expanduser(str(nvme_path)), f"runx-{os.path.basename(run)}-{tag}")


def remove_swap_files(swap_dir: str, rank: int) -> None:
    """This rank's swap files of a run that ended (a checkpoint holds what a resume needs), then the folders
    left empty: a finished run left them behind (16 bytes per parameter for params + Adam on NVMe)."""
    if not os.path.isdir(swap_dir):
        return
    for dirpath, _, _ in os.walk(swap_dir, topdown=False):
        if os.path.basename(dirpath) == f"rank{rank}":
            shutil.rmtree(dirpath, ignore_errors=True)
    for dirpath, _, _ in os.walk(swap_dir, topdown=False):
        try:
            os.rmdir(dirpath)   # other ranks' folders, not yet empty, stay for them
        except OSError:
            pass


def check_nvme_path(path: str, need_bytes: int) -> None:
    """Fail fast (before any model is built) on an unwritable or too-full nvme_path, naming the path and
    the space needed."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".runx_write_probe.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(probe)
    except OSError as e:
        raise RuntimeError(f"trainer.nvme_path={path!r} is not writable ({e.strerror or e}); ZeRO-Infinity needs "
                           f"{_gib(need_bytes)} there. Point trainer.nvme_path at a writable local NVMe "
                           f"folder.") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise RuntimeError(f"trainer.nvme_path={path!r} has {_gib(free)} free but ZeRO-Infinity needs "
                           f"{_gib(need_bytes)} there (parameters + optimizer states). Free space or choose "
                           f"another trainer.nvme_path.")


# ----------------------------------------------------------------------------------- the async_io op
def default_accelerator() -> None:
    """DeepSpeed's CPU accelerator on a machine without CUDA (no probing noise); never forced where a GPU is
    visible, since a trainer in this same process may be about to use it."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def build_async_io() -> bool:
    """JIT-build (or load the cached) DeepSpeed async_io op; True when it loads."""
    default_accelerator()
    from deepspeed.ops.op_builder import AsyncIOBuilder
    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        return False
    builder.load(verbose=False)
    return True


def aio_available() -> bool:
    try:
        default_accelerator()
        from deepspeed.ops.op_builder import AsyncIOBuilder
        return AsyncIOBuilder().is_compatible(verbose=False)
    except Exception:
        return False


# ----------------------------------------------------------------------------------- aio probe
# Blocks above 1 MiB would also raise DeepSpeed's swap threshold (max(1 MiB, block_size)) and keep smaller
# matrices in RAM — and with a 4 MiB block DeepSpeed 0.19.8 died here with "param 20 already assigned swap
# buffer" on llama_m — so the probe stays at <= 1 MiB (the DeepNVMe tutorial's best was 1 MiB, qd 32).
PROBE_GRID = {"block_size": [262144, 1048576], "queue_depth": [8, 32, 128], "intra_op_parallelism": [1, 4]}


def _cache_file() -> str:
    root = os.environ.get("RUNX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "runx"))
    return os.path.join(root, "aio_probe.json")


def _cache_key(path: str) -> str:
    real = os.path.realpath(path)
    return f"{real}|dev={os.stat(real).st_dev}"


def cached_probe(path: str) -> dict | None:
    try:
        with open(_cache_file()) as f:
            return json.load(f).get(_cache_key(path))
    except (OSError, ValueError):
        return None


# A grid point replaces DeepSpeed's documented defaults only when it is clearly faster: single 32-64 MB transfers
# are noisy, and a 3% "win" of 256 KiB blocks here once made the real optimizer swap 35% slower than 1 MiB.
PROBE_MIN_GAIN = 1.10


def probe_aio(path: str, size_mb: int = 64, grid: dict | None = None, refresh: bool = False,
              time_budget_s: float = 30.0, repeats: int = 2) -> dict:
    """Read/write `size_mb` with DeepSpeed's aio handle (O_DIRECT) under each grid point, `repeats` times (best
    of); keep the fastest (read + write time) if it beats DeepSpeed's defaults by PROBE_MIN_GAIN, else the
    defaults. Cached per (path, device). Returns the aio block plus the measured GB/s."""
    os.makedirs(path, exist_ok=True)
    if not refresh:
        hit = cached_probe(path)
        if hit is not None:
            return hit
    # one probe at a time per machine: every rank of a run resolves its aio block, and ranks probing one disk at
    # once measured it under each other's load (and could pick different blocks); the others then read the cache
    import fcntl
    os.makedirs(os.path.dirname(_cache_file()), exist_ok=True)
    with open(_cache_file() + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        hit = None if refresh else cached_probe(path)
        return hit if hit is not None else _probe_aio(path, size_mb, grid, time_budget_s, repeats)


def _probe_aio(path: str, size_mb: int, grid: dict | None, time_budget_s: float, repeats: int) -> dict:
    default_accelerator()
    import logging

    import torch
    from deepspeed.ops.op_builder import AsyncIOBuilder
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.ERROR)  # the one-time SSD write-endurance warning
    aio = AsyncIOBuilder().load(verbose=False)
    grid = grid or PROBE_GRID
    # DeepSpeed's defaults first and always measured: a slow disk ran out of time_budget_s before reaching them,
    # and the fastest point then won without having to beat them by PROBE_MIN_GAIN
    keys = ("block_size", "queue_depth", "intra_op_parallelism")
    points = [(bs, qd, th) for bs in grid["block_size"] for qd in grid["queue_depth"]
              for th in grid["intra_op_parallelism"]]
    points.sort(key=lambda p: p != tuple(DEEPSPEED_AIO_DEFAULTS[k] for k in keys))
    numel = size_mb * 2**20 // 4
    fname = os.path.join(path, f".runx_aio_probe.{os.getpid()}")
    trials, t_start = [], time.perf_counter()
    owner = aio.aio_handle(1048576, 8, False, True, 1)  # owns the page-locked buffer for the whole probe
    buf = owner.new_cpu_locked_tensor(numel, torch.empty(0, dtype=torch.float32))
    buf.uniform_()
    try:
        for bs, qd, th in points:
            if trials and time.perf_counter() - t_start > time_budget_s:
                break
            h = aio.aio_handle(bs, qd, False, True, th)
            w = r = float("inf")
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                assert h.sync_pwrite(buf, fname) >= 0
                t1 = time.perf_counter()
                assert h.sync_pread(buf, fname) >= 0
                t2 = time.perf_counter()
                w, r = min(w, t1 - t0), min(r, t2 - t1)
            nbytes = numel * 4
            trials.append({"block_size": bs, "queue_depth": qd, "intra_op_parallelism": th,
                           "write_GBps": nbytes / w / 1e9, "read_GBps": nbytes / r / 1e9, "seconds": w + r})
    finally:
        owner.free_cpu_locked_tensor(buf)
        if os.path.exists(fname):
            os.unlink(fname)
    fastest = min(trials, key=lambda t: t["seconds"])
    default = next((t for t in trials if all(t[k] == DEEPSPEED_AIO_DEFAULTS[k]
                                              for k in ("block_size", "queue_depth", "intra_op_parallelism"))), None)
    keep_default = default is not None and default["seconds"] <= PROBE_MIN_GAIN * fastest["seconds"]
    best = default if keep_default else fastest
    result = {"block_size": best["block_size"], "queue_depth": best["queue_depth"],
              "intra_op_parallelism": best["intra_op_parallelism"], "single_submit": False,
              "overlap_events": True, "read_GBps": round(best["read_GBps"], 3),
              "write_GBps": round(best["write_GBps"], 3), "probe_mb": size_mb, "trials": len(trials),
              "default_seconds": default["seconds"] if default else None, "best_seconds": best["seconds"],
              "fastest_seconds": fastest["seconds"],
              "fastest_read_GBps": round(max(t["read_GBps"] for t in trials), 3),
              "fastest_write_GBps": round(max(t["write_GBps"] for t in trials), 3),
              "chosen": "deepspeed_default" if keep_default else "probe",
              "path": os.path.realpath(path), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    _store(path, result)
    return result


def _store(path: str, result: dict) -> None:
    f = _cache_file()
    os.makedirs(os.path.dirname(f), exist_ok=True)
    try:
        with open(f) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        data = {}
    data[_cache_key(path)] = result
    tmp = f"{f}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, f)


def resolve_aio(tcfg) -> dict:
    """The `aio` block for a trainer config: the values the user set (not null, DeepSpeed's defaults for the
    rest) when any is set or tune=false, else the probe's (cached) choice for trainer.nvme_path."""
    from omegaconf import OmegaConf
    user = OmegaConf.to_container(tcfg.aio, resolve=True) if not isinstance(tcfg.aio, dict) else dict(tcfg.aio)
    tune = user.pop("tune", True)
    user = {k: v for k, v in user.items() if v is not None}
    if not tune or user:
        return {**DEEPSPEED_AIO_DEFAULTS, **user, "use_gds": False}
    probed = probe_aio(str(tcfg.nvme_path))
    return {k: probed[k] for k in DEEPSPEED_AIO_DEFAULTS} | {"use_gds": False}


if __name__ == "__main__":
    import sys
    if "--build-aio" in sys.argv:
        ok = build_async_io()
        print("async_io", "ready" if ok else "NOT compatible (install libaio-dev)")
        sys.exit(0 if ok else 1)
    if "--probe" in sys.argv:
        target = sys.argv[sys.argv.index("--probe") + 1]
        print(json.dumps(probe_aio(target, refresh="--refresh" in sys.argv), indent=1))
