"""`runx plan`: the memory each ZeRO config needs on GPU, CPU and NVMe, what fits, and the cheapest config
that does (issue #9). `runx train` runs `check_fits` first and stops with a clear message when the
configured run cannot fit.

The estimate, per rank, is a sum of named terms (every one is a row of the printed breakdown):

  model states     parameters + gradients + optimizer states, per ZeRO stage and offload target.
                   Mixed precision (bf16) with Adam reproduces DeepSpeed's own estimators exactly
                   (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`, with
                   their additional_buffer_factor on the CPU side), with Psi = parameters, L = the largest
                   layer's own parameters, N = data-parallel ranks:
                     ZeRO-0      GPU 2Psi + 18Psi                 (nothing partitioned)
                     ZeRO-1/2    GPU 2Psi + 18Psi/N               18 = 2 bf16 grads + 4 fp32 grads + 4 fp32
                                                                  master + 8 Adam (m, v)
                     ZeRO-2+opt  GPU 2Psi, CPU max(4N, 16) Psi
                     ZeRO-3      GPU 4L + 18Psi/N                 4L = one gathered layer's bf16 weights+grads
                     ZeRO-3+opt  GPU 4L + 2Psi/N, CPU 16Psi
                     ZeRO-3+p+o  GPU 4L,          CPU 18Psi
                   fp32 training (our CPU runs) has no separate 16-bit copy, so the same terms become:
                     params 4, grads 4 (+4 fp32 grad partition for ZeRO>=1: DeepSpeed keeps one),
                     fp32 master 0 when DeepSpeed reuses the fp32 partition as master (ZeRO-0, ZeRO-3
                     without optimizer offload) else 4, optimizer states 8 (Adam) / 4 (SGD momentum,
                     LARS) — i.e. ZeRO-0 16 B/param, ZeRO-1/2 4 + 20/N, ZeRO-3 16/N (+4/N offloaded).
  runtime buffers  what DeepSpeed and torch hold besides model states, from the configured knobs:
                   gathered parameters kept under stage3_max_reuse_distance (ZeRO-3 keeps a gathered
                   parameter while its next use is within that many elements: all of a model under 1e9),
                   gradient reduce buckets (reduce_bucket_size elements), torch's foreach optimizer
                   temporaries (one parameter-sized fp32 buffer during the step), the host copy of the
                   model built before the engine partitions it (without zero.Init) and the flattening
                   copy ZeRO-1/2/3 make of it, NVMe swap buffers (pinned), the optimizer swapper's buffers.
  activations      traced: one forward on the meta device with the configured micro-batch and sequence
                   length, summing the tensors autograd saves for backward, plus the logits gradient;
                   analytic (per-layer transformer count) when tracing is not possible.
  baseline         measured, never assumed: peak RSS of a process that imports torch + DeepSpeed +
                   transformers, joins a gloo/NCCL group and trains a toy model for one step through
                   DeepSpeed (on CUDA also the context's device memory), cached per machine and versions.

On a CPU-only machine (trainer.device=cpu) everything above lives in one process's RAM: the CPU total is
what the trainer's `peak_mem_gb` (peak RSS) measures.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

GiB = 2 ** 30


# ====================================================================================== sizes
def parse_size(text, key: str) -> int | None:
    """'80GB' / '80GiB' / '512MB' / '1.5TB' / 'auto' -> bytes (GB = GiB, as nvidia-smi and `free` count)."""
    if text in (None, "auto", ""):
        return None
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"{key}={text!r}: not a size. Use e.g. 80GB, 512MB, 1.5TB or auto.")
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def size_problem(key: str, value, words: tuple = ("auto",)) -> str | None:
    """The config problem of a size value (None when it parses, or is one of `words`)."""
    if value is None or value in words or isinstance(value, str) and "${" in value:
        return None
    try:
        size = parse_size(value, key)
    except ValueError:
        return f"{key}={value}: not a size. Valid values: {', '.join(words)} or a size such as 16GB, 512MB or 1.5TB."
    if size is not None and size <= 0:   # (0 read as "unknown" planned this machine's memory, or a GPU that fit all)
        return f"{key}={value}: no memory. Valid values: {', '.join(words)} or a size above 0 such as 16GB."
    return None


def fmt(b: float | None) -> str:
    if b is None:
        return "-"
    if b == 0:
        return "0"
    if b >= GiB:
        return f"{b / GiB:.2f} GiB"
    return f"{b / 2**20:.0f} MiB"


# ====================================================================================== model facts
@dataclass
class ModelFacts:
    n_params: int                 # Psi: all parameters (shared ones once)
    n_trainable: int
    largest_layer: int            # L: largest sum of a module's own parameters (DeepSpeed's definition)
    largest_param: int
    numels: list                  # forward (registration) order
    module_max_params: int
    activation_bytes: int         # per rank, one micro-batch
    activation_how: str
    param_bytes: int              # 2 (bf16) or 4 (fp32)
    source: str = ""
    # (world, {"cpu"/"device": bytes available per rank}, cuda) -> {"cpu"/"device": {term: bytes per rank}}: memory a
    # recipe holds besides the trainer's (LoRA-GA's gradient sums, VeriFree's rollout KV cache), if it declares
    # any (`extra_memory`)
    extra_memory: object = None
    # ZeRO-3 builds this model already partitioned (trainers/recipe.py builds_partitioned), not whole per rank
    zero3_partitioned_build: bool = False
    micro_batch: str = ""         # one micro-batch in words, for a model that reads no tokens (SwAV's crops)

    def nvme_stats(self, world: int) -> dict:
        return {"n_params": self.n_params, "largest": self.largest_param, "count": len(self.numels),
                "numels": sorted(self.numels, reverse=True), "forward_numels": list(self.numels),
                "module_max_params": self.module_max_params, "world_size": world}


def build_on_meta(cfg):
    """The recipe's model on the meta device (no memory, no weights read). Pretrained models are built from
    their config with the recipe's own wrapping (LoRA etc.). The recipe's run dir is a scratch folder, removed
    again: nothing is written there."""
    import shutil
    import tempfile

    from runx.recipes import RECIPES
    recipe_cls = RECIPES[cfg.recipe.name].load()
    scratch = tempfile.mkdtemp(prefix="runx_plan_")
    try:
        return _build_on_meta(cfg, recipe_cls, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build_on_meta(cfg, recipe_cls, scratch):
    import torch
    from omegaconf import OmegaConf, open_dict

    from runx.trainers.recipe import RecipeConfigError, build_recipe
    try:
        recipe = build_recipe(recipe_cls, cfg, scratch)
        with torch.device("meta"):
            return recipe.build_model(), recipe, "recipe.build_model() on meta"
    except RecipeConfigError:
        raise
    except Exception as first:  # from_pretrained refuses the meta device: rebuild from the checkpoint's config
        if cfg.model.get("from_config") or cfg.model.kind not in ("causal_lm", "seq_cls"):
            raise
        from transformers import AutoConfig

        from runx.trainers.hf import resolve_path
        hf_conf = AutoConfig.from_pretrained(resolve_path(cfg.model.path),
                                             trust_remote_code=cfg.model.trust_remote_code).to_dict()
        for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
                  "id2label", "label2id", "num_labels"):
            hf_conf.pop(k, None)
        cfg2 = cfg.copy()
        with open_dict(cfg2):
            cfg2.model.from_config = OmegaConf.create(hf_conf)
        recipe = recipe_cls(cfg2, scratch)
        with torch.device("meta"):
            return recipe.build_model(), recipe, f"config of {cfg.model.path} on meta ({type(first).__name__} " \
                                                 f"building directly)"


def plan_batch(cfg, recipe) -> tuple[int, int, bool]:
    """(sequences, tokens each, full logits?) of one training micro-batch: the recipe's `plan_batch()` when it
    has one (VeriFree: micro-batch x G sequences of prompt + sampled tokens, logits only a chunk at a time),
    else (trainer.micro_batch_size, data.max_length, True)."""
    if hasattr(recipe, "plan_batch"):
        return recipe.plan_batch()
    return int(cfg.trainer.micro_batch_size), int(cfg.data.max_length), True


def _chunked_logits_bytes(model, tokens: int) -> int:
    """A chunked LM head's largest block (runx.kernels: fp32 logits + their gradient, one chunk of rows)."""
    from runx.kernels.logprob import chunk_rows
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
    return 2 * chunk_rows(tokens, vocab) * vocab * 4 if vocab else 0


def _saved_bytes(model, forward) -> int:
    """Bytes autograd saves for backward while `forward()` runs `model` in training mode on meta tensors: one
    entry per storage (views share it); weights saved for backward are not activations."""
    import torch
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st._cdata not in weights:
                saved[st._cdata] = max(saved.get(st._cdata, 0), st.nbytes())
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


def _trace_activations(model, batch: tuple) -> int:
    """Bytes autograd saves for backward in one forward of a micro-batch (meta device), plus the logits
    gradient that exists at the start of backward (a chunk of it for a chunked head: the decoder alone is
    traced then)."""
    import torch
    b, s, full_logits = batch
    ids = torch.zeros(b, s, dtype=torch.long, device="meta")
    if not full_logits:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return _saved_bytes(model, lambda: base.get_decoder()(input_ids=ids)) + _chunked_logits_bytes(base, b * s)
    logits = []

    def forward():
        out = model(input_ids=ids)
        logits.append((out.logits if hasattr(out, "logits") else out[0]).float())
    return _saved_bytes(model, forward) + 2 * logits[0].numel() * 4


def _analytic_activations(model, cfg, bytes_per: int, batch: tuple) -> int:
    """Per-layer transformer count: ~8h + 4i values saved per token and layer (+ 2*heads*s attention scores with
    eager attention; sdpa / flash keep O(s)), plus logits (fp32) and their gradient (a chunk of them for a
    chunked head). With gradient checkpointing: each layer's input, plus one layer recomputed at a time."""
    c = getattr(model, "config", None)
    if c is None:
        return 0
    h = getattr(c, "hidden_size", 0)
    i = getattr(c, "intermediate_size", 4 * h)
    L = getattr(c, "num_hidden_layers", 0)
    a = getattr(c, "num_attention_heads", 1)
    V = getattr(c, "vocab_size", 0)
    b, s, full_logits = batch
    eager = getattr(c, "_attn_implementation", "eager") in (None, "eager")
    layer = b * s * (8 * h + 4 * i + (2 * a * s if eager else 0)) * bytes_per
    layers = L * b * s * h * bytes_per + layer if cfg.model.get("gradient_checkpointing") else L * layer
    return layers + (3 * b * s * V * 4 if full_logits else _chunked_logits_bytes(model, b * s))


def model_facts(cfg) -> ModelFacts:
    """Parameter counts, the largest layer and the activation estimate for the composed config."""
    from runx.trainers.nvme import default_accelerator
    default_accelerator()
    import torch._dynamo  # noqa: F401  (before any zero.Init, as the trainer does)
    from runx.trainers.recipe import zero3_builds_partitioned
    model, recipe, source = build_on_meta(cfg)
    seen, numels, trainable = set(), [], 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        numels.append(p.numel())
        trainable += p.numel() if p.requires_grad else 0
    layer = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    per_module = max((sum(1 for _ in m.parameters(recurse=False)) for m in model.modules()), default=1)
    pbytes = 2 if cfg.trainer.precision == "bf16" else 4
    how, micro_batch = "none", ""
    act = 0
    if cfg.model.kind in ("causal_lm", "seq_cls"):
        batch = plan_batch(cfg, recipe)
        if cfg.model.get("gradient_checkpointing"):
            # a trace would not see what checkpointed layers keep (their inputs) or the recompute's peak
            act, how = _analytic_activations(model, cfg, pbytes, batch), "analytic (gradient checkpointing)"
        else:
            try:
                act, how = _trace_activations(model, batch), "traced on meta"
            except Exception as e:  # data-dependent control flow etc.
                act, how = _analytic_activations(model, cfg, pbytes, batch), \
                    f"analytic ({type(e).__name__} tracing)"
        if batch[:2] != (int(cfg.trainer.micro_batch_size), int(cfg.data.max_length)):
            how += f", {batch[0]} sequences x {batch[1]} tokens"
    elif hasattr(recipe, "plan_inputs"):   # other models: the recipe's own training forward on meta inputs
        inputs, what = recipe.plan_inputs()
        micro_batch = what
        try:
            act, how = _saved_bytes(model, lambda: model(*inputs)), f"traced on meta, {what}"
        except Exception as e:
            act, how = 0, f"none ({type(e).__name__} tracing)"
    extra_memory = None
    if hasattr(recipe, "extra_memory"):
        extra_memory = lambda world, available, cuda: recipe.extra_memory(model, world, available, cuda)
    return ModelFacts(n_params=sum(numels), n_trainable=trainable, largest_layer=layer,
                      largest_param=max(numels, default=0), numels=numels, module_max_params=per_module,
                      activation_bytes=int(act), activation_how=how, param_bytes=pbytes, source=source,
                      extra_memory=extra_memory, zero3_partitioned_build=zero3_builds_partitioned(cfg, recipe),
                      micro_batch=micro_batch)


# ====================================================================================== layouts
@dataclass(frozen=True)
class Layout:
    name: str
    stage: int
    offload_param: str = "none"
    offload_optimizer: str = "none"

    @property
    def overrides(self) -> str:
        s = f"trainer.zero_stage={self.stage}"
        if self.offload_param != "none":
            s += f" trainer.offload_param={self.offload_param}"
        if self.offload_optimizer != "none":
            s += f" trainer.offload_optimizer={self.offload_optimizer}"
        return s


# cheapest first: least communication and host/disk traffic
LAYOUTS = [
    Layout("zero0", 0), Layout("zero1", 1), Layout("zero2", 2),
    Layout("zero2 + optimizer->cpu", 2, offload_optimizer="cpu"),
    Layout("zero3", 3),
    Layout("zero3 + optimizer->cpu", 3, offload_optimizer="cpu"),
    Layout("zero3 + params,optimizer->cpu", 3, "cpu", "cpu"),
    Layout("zero3 + optimizer->nvme, params->cpu", 3, "cpu", "nvme"),
    Layout("zero3 + params,optimizer->nvme", 3, "nvme", "nvme"),
]


def layout_of(tcfg) -> Layout:
    for lay in LAYOUTS:
        if (lay.stage, lay.offload_param, lay.offload_optimizer) == \
                (int(tcfg.zero_stage), str(tcfg.offload_param), str(tcfg.offload_optimizer)):
            return lay
    return Layout(f"zero{tcfg.zero_stage} + params->{tcfg.offload_param}, optimizer->{tcfg.offload_optimizer}",
                  int(tcfg.zero_stage), str(tcfg.offload_param), str(tcfg.offload_optimizer))


def optimizer_state_bytes(optim_name: str, momentum: float = 0.9) -> int:
    return {"adamw": 8, "sgd": 4 if momentum else 0, "lars": 4}.get(optim_name, 8)


# ====================================================================================== model states
def model_states(lay: Layout, psi: int, largest_layer: int, gpus_per_node: int = 1, nodes: int = 1,
                 mixed: bool = True, opt_bytes: int = 8, buffer_factor: float = 1.5,
                 trainable: int | None = None) -> dict:
    """Parameters + gradients + optimizer states per GPU (compute device) and per node's CPU, by component.

    For mixed=True, opt_bytes=8 and everything trainable these sum to DeepSpeed's estimators (tested).
    Frozen parameters (LoRA) hold only their weights. NVMe-offloaded states are listed under `nvme`.
    """
    N = gpus_per_node * nodes
    t = psi if trainable is None else trainable
    frozen = psi - t
    p16 = 2 if mixed else 4                    # the weights the model computes with
    g16 = 2 if mixed else 4                    # gradients as backward produces them
    g32 = 4                                    # fp32 gradient partition the optimizer reads
    master = 4                                 # fp32 master weights (0 where DeepSpeed reuses fp32 params)
    gpu, cpu, nvme = {}, {}, {}
    if lay.stage == 0:
        gpu["params"] = p16 * psi
        gpu["grads"] = g16 * t + (g32 * t if mixed else 0)
        gpu["master"] = master * t if mixed else 0
        gpu["optimizer"] = opt_bytes * t
        return {"gpu": gpu, "cpu": cpu, "nvme": nvme}
    if lay.stage in (1, 2):
        gpu["params"] = p16 * psi                                       # replicated
        if lay.offload_optimizer == "cpu":
            # DeepSpeed: CPU max(4 N, 16) Psi — the fp32 model each rank loads vs grads32+master+states
            per = g32 + master + opt_bytes
            cpu["grads"] = g32 * t
            cpu["master"] = master * t
            cpu["optimizer"] = opt_bytes * t
            if 4 * N > per:
                cpu["model load (4 B x ranks)"] = (4 * N - per) * t
            gpu["grads"] = 0
        else:
            gpu["grads"] = (g16 + g32) * t // N
            gpu["master"] = master * t // N
            gpu["optimizer"] = opt_bytes * t // N
            # DeepSpeed: CPU 4 Psi per local rank — the fp32 model each rank loads before the engine
            cpu["model load (4 B x local ranks)"] = 4 * psi * gpus_per_node
        for k in cpu:
            cpu[k] = int(cpu[k] * buffer_factor)
        return {"gpu": gpu, "cpu": cpu, "nvme": nvme}
    # ZeRO-3: everything partitioned; one gathered layer (weights + grads) on the GPU
    gpu["gathered layer"] = 2 * p16 * largest_layer if mixed else 2 * 4 * largest_layer
    per_rank_params = p16 * psi // N
    shared_master = (not mixed) and lay.offload_optimizer == "none"
    states = {"grads": g32 * t, "master": 0 if shared_master else master * t, "optimizer": opt_bytes * t}
    if lay.offload_param == "none":
        gpu["params"] = per_rank_params
    if lay.offload_optimizer == "none":
        for k, v in states.items():
            gpu[k] = v // N
        if not mixed:  # fp32: no 16-bit copy of the grads besides the partition
            pass
    target = {"cpu": cpu, "nvme": nvme}
    if lay.offload_optimizer in ("cpu", "nvme"):
        for k, v in states.items():
            target[lay.offload_optimizer][k] = v // nodes
    if lay.offload_param in ("cpu", "nvme"):
        target[lay.offload_param]["params"] = p16 * psi // nodes
    if lay.offload_param == "none" and lay.offload_optimizer == "none":
        # zero.Init: each rank's CPU briefly holds the largest layer in fp32
        cpu["zero.Init (largest layer x ranks)"] = 4 * largest_layer * gpus_per_node
    for k in list(cpu):
        cpu[k] = int(cpu[k] * buffer_factor)
    return {"gpu": gpu, "cpu": cpu, "nvme": nvme}


def deepspeed_reference(lay: Layout, psi: int, largest_layer: int, gpus_per_node=1, nodes=1) -> tuple | None:
    """DeepSpeed's own estimator for this layout: (cpu_bytes, gpu_bytes), or None where it has none."""
    from runx.trainers.nvme import default_accelerator
    default_accelerator()
    if lay.stage in (1, 2) and lay.offload_param == "none" and lay.offload_optimizer in ("none", "cpu"):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        return estimate_zero2_model_states_mem_needs(psi, gpus_per_node, nodes,
                                                     cpu_offload=lay.offload_optimizer == "cpu")
    if lay.stage == 3 and lay.offload_optimizer in ("none", "cpu") and lay.offload_param in ("none", "cpu"):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        if lay.offload_param == "cpu" and lay.offload_optimizer != "cpu":
            return None
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            psi, largest_layer, gpus_per_node, nodes, cpu_offload=lay.offload_optimizer == "cpu",
            cpu_offload_params=lay.offload_param == "cpu", zero_init=True)
        return cpu, gpu
    return None


# ====================================================================================== the machine
@dataclass
class Machine:
    device: str                 # cuda | cpu (the compute device of the run)
    gpus_per_node: int          # data-parallel ranks per node
    nodes: int
    gpu_mem: int | None         # per GPU, bytes
    cpu_mem: int                # per node, bytes available
    nvme_free: int | None
    nvme_path: str
    described: bool
    baseline_cpu: int = 0       # per process
    baseline_gpu: int = 0       # CUDA context per GPU
    baseline_how: str = ""


def _cuda_info() -> tuple[int, int | None]:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory
    except Exception:
        pass
    return 0, None


def describe_machine(cfg) -> Machine:
    import psutil
    P, t = cfg.plan, cfg.trainer
    described = int(P.gpus) > 0 or P.gpu_mem != "auto"
    n_cuda, cuda_mem = (0, None) if t.device == "cpu" else _cuda_info()
    device = "cuda" if (described and t.device != "cpu") or (n_cuda and t.device != "cpu") else "cpu"
    if int(P.gpus) > 0:
        per_node = int(P.gpus)
    else:
        per_node = max(1, int(t.num_procs))
    gpu_mem = parse_size(P.gpu_mem, "plan.gpu_mem") or (cuda_mem if device == "cuda" else None)
    cpu_mem = parse_size(P.cpu_mem, "plan.cpu_mem") or int(psutil.virtual_memory().available)
    path = os.path.abspath(os.path.expanduser(str(t.nvme_path)))
    nvme = parse_size(P.nvme_free, "plan.nvme_free")
    if nvme is None:
        probe = path
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        nvme = shutil.disk_usage(probe or "/").free if probe else None   # (a relative path walks up to cwd)
    nodes = max(1, int(cfg.launcher.num_nodes))
    return Machine(device, per_node, nodes, gpu_mem, cpu_mem, nvme, path, described)


# ====================================================================================== baseline
def _versions() -> str:
    from importlib import metadata
    out = [sys.version.split()[0]]
    for pkg in ("torch", "deepspeed", "transformers"):
        try:
            out.append(f"{pkg}={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return " ".join(out)


def _baseline_cache() -> str:
    root = os.environ.get("RUNX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "runx"))
    return os.path.join(root, "baseline.json")


def cached_baseline(device: str) -> dict | None:
    try:
        with open(_baseline_cache()) as f:
            return json.load(f).get(f"{device}|{_versions()}")
    except (OSError, ValueError):
        return None


def measure_baseline(device: str, refresh: bool = False) -> dict:
    """Peak RSS (and CUDA context) of the framework itself, measured in a fresh process (cached)."""
    if not refresh:
        hit = cached_baseline(device)
        if hit:
            return {**hit, "cached": True}
    env = dict(os.environ, DS_ACCELERATOR="cpu" if device == "cpu" else os.environ.get("DS_ACCELERATOR", ""))
    if device != "cpu" and not env["DS_ACCELERATOR"]:
        env.pop("DS_ACCELERATOR")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "runx.trainers.plan", "--measure-baseline", device],
                       capture_output=True, text=True, env=env, timeout=600)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RUNX_BASELINE ")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"runx plan: measuring the framework's baseline memory failed:\n{p.stderr[-3000:]}")
    rec = json.loads(line[-1].split(" ", 1)[1])
    rec["seconds"] = round(time.time() - t0, 1)
    f = _baseline_cache()
    os.makedirs(os.path.dirname(f), exist_ok=True)
    try:
        data = json.load(open(f))
    except (OSError, ValueError):
        data = {}
    data[f"{device}|{_versions()}"] = rec
    tmp = f"{f}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, f)
    return rec


def _baseline_child(device: str) -> None:
    """Runs in the measuring subprocess: the trainer's imports and set-up (ZeRO-3 engine, the superset of the
    stages' code) with a toy model, one step."""
    import resource

    import runx.cli.train  # noqa: F401  (Hydra, rich: what `runx train` has loaded)
    from runx.trainers import runtime
    runtime.ensure_dist_env()
    rank, world = runtime.init_distributed(device)
    import deepspeed
    import torch
    import transformers  # noqa: F401  (the model library every transformer recipe loads)
    from transformers import LlamaConfig, LlamaForCausalLM
    conf = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(conf)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # the ZeRO-3 machinery too
          "zero_allow_untested_optimizer": True,
          "zero_force_ds_cpu_optimizer": False}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    ids = torch.randint(0, 64, (1, 8), device=engine.device)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    import psutil
    # the steady-state resident set after set-up and one step: the import-time peak (a transient) would
    # otherwise be counted on top of the model states' own peak
    rec = {"cpu_rss": int(psutil.Process().memory_info().rss), "device": device,
           "cpu_rss_peak": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
    if device == "cuda":
        free_after, total = torch.cuda.mem_get_info()
        # the context and library workspaces: device memory in use that torch's allocator did not hand out
        rec["gpu_context"] = int(total - free_after - torch.cuda.memory_reserved())
    print("RUNX_BASELINE " + json.dumps(rec), flush=True)


# ====================================================================================== the estimate
@dataclass
class Row:
    layout: Layout
    gpu: dict = field(default_factory=dict)     # per GPU (compute device)
    cpu: dict = field(default_factory=dict)     # per node
    nvme: dict = field(default_factory=dict)    # per node
    fits: bool = True
    why: str = ""
    nvme_settings: dict | None = None

    def total(self, where: str) -> int:
        return int(sum(getattr(self, where).values()))


def _zero_knobs(tcfg, overrides: dict) -> dict:
    z = {"reuse": 1e9, "reduce_bucket": 5e8, "sub_group": 1e9, "prefetch": float(tcfg.stage3_prefetch_bucket_size),
         "max_live": float(tcfg.stage3_max_live_parameters)}
    for k, key in (("reuse", "stage3_max_reuse_distance"), ("reduce_bucket", "reduce_bucket_size"),
                   ("sub_group", "sub_group_size")):
        v = overrides.get(f"zero_optimization.{key}")  # overrides arrive flattened (runtime.flatten_overrides)
        if v is not None:
            z[k] = float(v)
    return z


def estimate(cfg, facts: ModelFacts, machine: Machine, lay: Layout) -> Row:
    from omegaconf import OmegaConf
    t = cfg.trainer
    mixed = t.precision == "bf16"
    p = facts.param_bytes
    N = machine.gpus_per_node * machine.nodes
    psi, tr = facts.n_params, facts.n_trainable
    opt_b = optimizer_state_bytes(cfg.optim.name, float(cfg.optim.momentum))
    ms = model_states(lay, psi, facts.largest_layer, machine.gpus_per_node, machine.nodes, mixed, opt_b,
                      buffer_factor=1.0, trainable=tr)
    row = Row(lay)
    row.gpu = {f"model states: {k}": v for k, v in ms["gpu"].items() if v}
    # on a CPU-only run the "host copy" terms are the compute-side tensors themselves
    host_terms = ("zero.Init", "model load")
    row.cpu = {f"model states: {k}": v for k, v in ms["cpu"].items()
               if v and not (machine.device == "cpu" and k.startswith(host_terms))}
    row.nvme = {f"model states: {k}": v for k, v in ms["nvme"].items() if v}
    from runx.trainers.runtime import flatten_overrides
    overrides = flatten_overrides(OmegaConf.to_container(t.ds_overrides, resolve=True))
    z = _zero_knobs(t, overrides)
    opt_nvme = None
    if lay.offload_optimizer == "nvme":  # the trainer derives the swapper (and maybe the sub-group size)
        from runx.trainers.nvme import default_pin_budget, nvme_optimizer_settings, swapped_state_count
        opt_nvme = nvme_optimizer_settings({"n_params": tr, "largest": min(facts.largest_param, tr),
                                            "world_size": N}, n_states=swapped_state_count(str(cfg.optim.name)),
                                           pin_budget_bytes=default_pin_budget(
                                               machine.gpus_per_node, machine.cpu_mem if machine.described else None))
        if opt_nvme["sub_group_size"] and "zero_optimization.sub_group_size" not in overrides:
            z["sub_group"] = float(opt_nvme["sub_group_size"])
    from runx.trainers.nvme import deepspeed_param_device
    # parameters that pass through NVMe ("nvme", or "nvme_in_cpu": written once, then kept in CPU memory)
    param_dev = deepspeed_param_device(lay.stage, lay.offload_param, lay.offload_optimizer)
    # the trainer builds under zero.Init then (trainers/recipe.py builds_partitioned)
    zero_init = param_dev.startswith("nvme") or (lay.stage == 3 and facts.zero3_partitioned_build)
    G = machine.gpus_per_node

    # ---- runtime buffers on the compute device
    if lay.stage == 3:
        # gathered parameters kept under the reuse distance (the estimator's 4L is the floor)
        kept = min(psi, max(z["reuse"], facts.largest_layer))
        row.gpu["gathered params (reuse distance)"] = max(0, p * kept - ms["gpu"].get("gathered layer", 0) // 2)
        row.gpu["gradient reduce bucket"] = (2 if mixed else 4) * int(min(tr, z["reduce_bucket"]))
    elif lay.stage in (1, 2):
        row.gpu["gradient reduce bucket"] = (2 if mixed else 4) * int(min(tr, z["reduce_bucket"]))
    if not mixed:
        # torch's foreach AdamW/SGD keeps one parameter-sized temporary during the step
        opt_dev = "cpu" if lay.offload_optimizer != "none" else "gpu"
        target = row.cpu if opt_dev == "cpu" else row.gpu
        per = tr if lay.stage == 0 or opt_dev == "cpu" else tr // N
        target["optimizer step temporaries"] = 4 * (min(per, int(z["sub_group"])) if lay.stage == 3 else per)
        if lay.stage == 3:
            # ZeRO-3 flattens the sub-group's gradient partition into a new fp32 tensor for the step
            # (stage3._prepare_fp32_grad_for_sub_group); in mixed precision that copy is the states' 4 B grads
            target["flattened grad partition (step)"] = 4 * min(tr // N, int(z["sub_group"]))
    row.gpu["activations (1 micro-batch)"] = facts.activation_bytes

    # ---- host side: the model as built before the engine takes it over
    if zero_init and cfg.model.get("from_config"):
        # a randomly initialised model is built whole once (the same start as the other ZeRO configs) and
        # copied into the partitioned one
        row.cpu["reference model (random init)"] = p * psi * G
    if not zero_init:
        if machine.device == "cuda":
            if not any(k.startswith("model load") for k in ms["cpu"]):
                # every local rank builds the full model in host memory before it moves to the GPU
                row.cpu["model built on host (init)"] = p * psi * G
            if lay.stage == 3:
                # a model not built under zero.Init goes to the GPU whole (the engine's module.to(device)) and is
                # partitioned only then: the peak at engine init
                row.gpu["whole model on the GPU before partitioning (engine init)"] = p * psi
        elif lay.stage >= 1:
            # on CPU the engine copies the weights into flat (ZeRO-1/2) or partitioned + flat (ZeRO-3)
            # buffers; the per-parameter tensors it frees stay in the process heap (glibc keeps them)
            row.cpu["model copy replaced at engine init"] = p * psi * G
    if machine.device == "cpu" and lay.stage == 3 and not param_dev.startswith("nvme"):
        # ZeRO-3 flattens the partitions into contiguous buffers at engine init, however the model was built
        row.cpu["flat partition copy (engine init)"] = p * psi // N * G
    # ---- NVMe: swap buffers and the swapper's pinned buffers
    if "nvme" in (lay.offload_param, lay.offload_optimizer):
        from runx.trainers.nvme import DEEPSPEED_AIO_DEFAULTS, nvme_param_settings, param_buffer_bytes
        if param_dev == "nvme_in_cpu":
            row.nvme["params (written at start-up, read into CPU memory)"] = p * psi
        if param_dev.startswith("nvme"):
            s = nvme_param_settings(facts.nvme_stats(N), p, str(t.nvme_buffer_count), str(t.nvme_buffer_size),
                                    int(t.aio.block_size or DEEPSPEED_AIO_DEFAULTS["block_size"]), z["reuse"])
            if param_dev == "nvme_in_cpu":
                s = {**s, "max_in_cpu": int(psi) + 1}
            row.nvme_settings = s
            row.cpu["NVMe param swap buffers (pinned)"] = param_buffer_bytes(s["buffer_count"], s["buffer_size"],
                                                                             p) * G
            row.cpu["partitioned-param swap buffer"] = p * facts.largest_param * G
        if lay.offload_optimizer == "nvme":
            largest_group = int(min(z["sub_group"] + (facts.largest_param if opt_nvme["pipelined"] else 0),
                                    -(-tr // N)))
            count = opt_nvme["block"]["buffer_count"]
            row.cpu[f"optimizer swap buffers ({count} x sub-group, pinned)"] = count * 4 * largest_group * G
            row.cpu["fp32 sub-group staging (init)"] = 4 * largest_group * G
        row.nvme["alignment / padding"] = int(0.1 * sum(row.nvme.values())) + 64 * 2**20

    # ---- the recipe's own memory (LoRA-GA's fp64 gradient sums before training: counted on top, an upper
    # bound, since the optimizer and engine buffers do not exist yet then; VeriFree's rollout KV cache)
    if facts.extra_memory is not None:
        host = machine.cpu_mem // max(1, G)
        avail = {"cpu": host, "device": machine.gpu_mem if machine.device == "cuda" and machine.gpu_mem else host}
        for where, terms in facts.extra_memory(N, avail, machine.device == "cuda").items():
            for label, b in terms.items():
                if where == "cpu":
                    row.cpu[label] = b * G
                else:
                    row.gpu[label] = b
    # ---- per-process baseline
    if machine.device == "cpu":
        # one process per rank; the compute device *is* host memory
        ranks = G
        row.cpu = {**{f"compute: {k}": v * ranks for k, v in row.gpu.items()}, **row.cpu}
        row.gpu = {}
        row.cpu["baseline (measured, x ranks)"] = machine.baseline_cpu * ranks
    else:
        row.gpu["CUDA context (measured)"] = machine.baseline_gpu
        row.cpu["baseline (measured, x ranks)"] = machine.baseline_cpu * G
    # ---- does it fit?
    problems = []
    if machine.device == "cuda" and machine.gpu_mem and row.total("gpu") > machine.gpu_mem:
        problems.append(f"GPU needs {fmt(row.total('gpu'))} > {fmt(machine.gpu_mem)} per GPU")
    if row.total("cpu") > machine.cpu_mem:
        problems.append(f"CPU needs {fmt(row.total('cpu'))} > {fmt(machine.cpu_mem)} available")
    if row.nvme and machine.nvme_free is not None and row.total("nvme") > machine.nvme_free:
        problems.append(f"NVMe needs {fmt(row.total('nvme'))} > {fmt(machine.nvme_free)} free at "
                        f"{machine.nvme_path}")
    row.fits = not problems
    row.why = "; ".join(problems)
    return row


@dataclass
class Plan:
    facts: ModelFacts
    machine: Machine
    rows: list
    current: Row
    cheapest: Row | None


def make_plan(cfg, facts: ModelFacts | None = None, machine: Machine | None = None,
              measure: bool = True) -> Plan:
    facts = facts or model_facts(cfg)
    machine = machine or describe_machine(cfg)
    if measure:
        base = measure_baseline(machine.device if not machine.described or _cuda_info()[0] else "cpu")
        machine.baseline_cpu = int(base["cpu_rss"])
        machine.baseline_gpu = int(base.get("gpu_context", 0))
        machine.baseline_how = f"measured ({'cached' if base.get('cached') else 'now'})"
    rows = [estimate(cfg, facts, machine, lay) for lay in LAYOUTS]
    from runx.recipes import RECIPES
    stages = RECIPES[cfg.recipe.name].zero_stages if cfg.recipe.name in RECIPES else (0, 1, 2, 3)
    for r in rows:   # a layout the recipe refuses (SwAV: ZeRO-3) does not fit, whatever its memory
        if r.layout.stage not in stages:
            r.fits, r.why = False, f"recipe={cfg.recipe.name} runs ZeRO stage {', '.join(map(str, stages))} only"
    current_layout = layout_of(cfg.trainer)
    current = next((r for r in rows if r.layout == current_layout), None) or \
        estimate(cfg, facts, machine, current_layout)
    cheapest = next((r for r in rows if r.fits), None)
    return Plan(facts, machine, rows, current, cheapest)


# ====================================================================================== output
def render(plan: Plan, cfg) -> tuple[object, str]:
    """(rich renderable, plain text) of the plan."""
    from rich.console import Console, Group
    from rich.table import Table
    f, m = plan.facts, plan.machine
    title = (f"runx plan — {cfg.model.name}: {f.n_params / 1e6:.1f}M params ({f.n_trainable / 1e6:.1f}M trainable), "
             f"largest layer {f.largest_layer / 1e6:.2f}M, {cfg.trainer.precision}, micro-batch "
             + (f.micro_batch or f"{cfg.trainer.micro_batch_size} x {cfg.data.max_length} tokens"))
    where = (f"{'described' if m.described else 'this machine'}: {m.nodes} node(s) x {m.gpus_per_node} "
             f"{'GPU' if m.device == 'cuda' else 'CPU process'}(es), "
             + (f"GPU {fmt(m.gpu_mem)} each, " if m.device == "cuda" else "")
             + f"CPU {fmt(m.cpu_mem)} available, NVMe {fmt(m.nvme_free)} free at {m.nvme_path}")
    t = Table(title=title, caption=where, header_style="bold")
    for col in ("config", "GPU / rank", "CPU / node", "NVMe / node", "fits", "trainer overrides"):
        t.add_column(col, justify="right" if col in ("GPU / rank", "CPU / node", "NVMe / node") else "left")
    # a described machine is planned with a rank per GPU: the advice says so when the run has another count
    procs = f" trainer.num_procs={m.gpus_per_node}" if m.described and \
        m.gpus_per_node != max(1, int(cfg.trainer.num_procs)) else ""
    for r in plan.rows:
        mark = "yes" if r.fits else "no"
        if plan.cheapest is r:
            mark = "yes (cheapest)"
        name = r.layout.name + ("  <- configured" if r is plan.current else "")
        t.add_row(name, fmt(r.total("gpu")) if m.device == "cuda" else "-", fmt(r.total("cpu")),
                  fmt(r.total("nvme")) if r.nvme else "-", mark if r.fits else f"no: {r.why}",
                  r.layout.overrides + procs)
    b = Table(title=f"breakdown of the configured run ({plan.current.layout.name})", header_style="bold")
    b.add_column("where")
    b.add_column("term")
    b.add_column("bytes", justify="right")
    for where_ in ("gpu", "cpu", "nvme"):
        for k, v in getattr(plan.current, where_).items():
            b.add_row(where_.upper(), k, fmt(v))
    notes = [f"activations: {f.activation_how}; baseline: {m.baseline_how or 'not measured'} "
             f"({fmt(m.baseline_cpu)} RSS per process" + (f", {fmt(m.baseline_gpu)} CUDA context" if m.device ==
                                                         "cuda" else "") + ")"]
    if plan.current.nvme_settings:
        notes.append("derived NVMe settings: " + json.dumps(plan.current.nvme_settings))
    if plan.cheapest is None:
        notes.append("nothing fits: reduce the model, micro-batch or sequence length, or add GPUs / nodes")
    elif plan.cheapest is not plan.current:
        notes.append(f"cheapest config that fits: {plan.cheapest.layout.name} ({plan.cheapest.layout.overrides}"
                     f"{procs})")
    if procs:
        notes.append(f"planned with{procs} (one rank per described GPU); this config runs "
                     f"{max(1, int(cfg.trainer.num_procs))}")
    from rich.text import Text
    group = Group(t, b, *[Text(n) for n in notes])
    con = Console(record=True, width=170, file=open(os.devnull, "w"))
    con.print(group)
    return group, con.export_text()


def plan_json(plan: Plan) -> dict:
    def row(r: Row):
        return {"layout": r.layout.name, "overrides": r.layout.overrides, "fits": r.fits, "why": r.why,
                "gpu": r.gpu, "cpu": r.cpu, "nvme": r.nvme, "gpu_total": r.total("gpu"),
                "cpu_total": r.total("cpu"), "nvme_total": r.total("nvme"), "nvme_settings": r.nvme_settings}
    return {"model": dataclasses.asdict(plan.facts) | {"numels": len(plan.facts.numels)},
            "machine": dataclasses.asdict(plan.machine), "rows": [row(r) for r in plan.rows],
            "configured": row(plan.current), "cheapest": plan.cheapest.layout.name if plan.cheapest else None}


def _default_out_dir(cfg) -> str:
    return os.path.join("outputs", time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S") + "-plan")


def plan_and_print(cfg, out_dir=None) -> int:
    from rich.console import Console
    plan = make_plan(cfg)
    group, text = render(plan, cfg)
    con = Console()
    if not con.is_terminal:
        con = Console(width=170)
    con.print(group)
    out_dir = str(out_dir) if out_dir else _default_out_dir(cfg)
    from runx.trainers.datajob import atomic_write_bytes
    atomic_write_bytes(os.path.join(out_dir, "plan.txt"), text.encode())
    atomic_write_bytes(os.path.join(out_dir, "plan.json"),
                       json.dumps(plan_json(plan), indent=1, default=str).encode())
    print(f"wrote {os.path.join(out_dir, 'plan.txt')} and plan.json")
    return 0 if plan.current.fits else 3


# ====================================================================================== the pre-flight check
def check_fits(cfg) -> None:
    """Stop (SystemExit 2, message on stderr) when the configured run cannot fit this machine, or when
    nvme_path is unwritable / too full — before any model is built."""
    t = cfg.trainer
    uses_nvme = "nvme" in (t.offload_param, t.offload_optimizer)
    from runx.trainers.recipe import RecipeConfigError
    try:
        facts = model_facts(cfg)
        machine = describe_machine(cfg)
    except RecipeConfigError:
        raise  # the config itself is wrong: reported as such by the caller
    except Exception as e:  # a recipe whose model cannot be sized on the meta device: never block the run
        from runx.trainers.hf import hub_unreachable
        problem = hub_unreachable(e, cfg)
        if problem:          # ...unless its model cannot be loaded at all: say so now, not after a second wait
            raise RecipeConfigError(problem) from None
        print(f"runx: memory check skipped (could not size the model on the meta device: "
              f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})", file=sys.stderr)
        if uses_nvme:
            from runx.trainers.nvme import check_nvme_path
            try:
                check_nvme_path(str(t.nvme_path), 64 * 2**20)
            except RuntimeError as err:
                _stop(str(err))
        return
    if uses_nvme:
        from runx.trainers.nvme import check_nvme_path, deepspeed_param_device, nvme_bytes_needed
        param_dev = deepspeed_param_device(int(t.zero_stage), str(t.offload_param), str(t.offload_optimizer))
        need = nvme_bytes_needed(facts.n_params, param_dev.startswith("nvme"), t.offload_optimizer == "nvme",
                                 facts.param_bytes, optimizer_state_bytes(cfg.optim.name, float(cfg.optim.momentum)),
                                 facts.n_trainable)
        try:
            check_nvme_path(str(t.nvme_path), need)
        except RuntimeError as e:
            _stop(str(e))
    # the model-dependent part first: if it alone is far below capacity, skip measuring the baseline
    quick = estimate(cfg, facts, machine, layout_of(t))
    cap_cpu = machine.cpu_mem
    cap_gpu = machine.gpu_mem if machine.device == "cuda" else None
    far = quick.total("cpu") < 0.5 * cap_cpu and (cap_gpu is None or quick.total("gpu") < 0.5 * cap_gpu)
    if far and cached_baseline(machine.device) is None:
        return
    plan = make_plan(cfg, facts, machine)
    if plan.current.fits:
        return
    _, text = render(plan, cfg)
    hint = (f" The cheapest config that fits is {plan.cheapest.layout.name}: rerun with "
            f"{plan.cheapest.layout.overrides}." if plan.cheapest else
            " No ZeRO / offload config fits: use a smaller model, micro-batch or sequence length, or more GPUs.")
    _stop(f"runx: this run does not fit: {plan.current.layout.name} — {plan.current.why}.{hint}\n"
          f"(set plan.check=false to start anyway; `runx plan ...` prints the table)\n\n{text}")


def _stop(msg: str) -> None:
    print(msg, file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--measure-baseline":
        _baseline_child(sys.argv[2])
