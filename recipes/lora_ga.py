"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang, Yu, Li 2024, arXiv 2407.05000).

Vanilla LoRA trains W + eta·B·A from A ~ Kaiming, B = 0, whose first steps barely move the effective weight.
LoRA-GA picks A0, B0 so that the first LoRA step is the best rank-2r approximation of the full fine-tuning
step. With G = dL/dW (W in R^{m x n}, m = d_out, nn.Linear layout) one SGD step of size lr changes the
effective weight by

    d(eta·B·A) = -lr·eta²·(B0·B0ᵀ·G + G·A0ᵀ·A0) + O(lr²)

and with G = U·S·Vᵀ the choice below makes the bracket c²·G_2r, G_2r = sum_{i<=2r} s_i·u_i·v_iᵀ.

Algorithm (paper Alg. 1/2; `LoRAGA.prepare`, run once before the DeepSpeed engine is built):

  1. G_l = mean over `grad_batches` batches of dL/dW_l at the pretrained point, for every target layer l
     (`estimate_full_gradients`: per-weight hooks consume each gradient as soon as it exists, so about one
     layer's full gradient is alive; fp64 running sums, each kept by one "owner" rank)
  2. U, S, V = svd(G_l), top 2r (`gradient_svd`: randomized as the reference, or exact)
  3. A0 = V[:, :r]ᵀ · m^(1/4)/sqrt(gamma);  B0 = U[:, r:2r] · m^(1/4)/sqrt(gamma)     (Alg. 1, "stable" scale)
  4. eta = alpha/sqrt(r);  W_l <- W_l - eta·B0·A0  in fp32, so the model's output is unchanged    (Alg. 1)
  5. train as ordinary LoRA (everything else is the `lora` recipe).

The LoRA layers are peft's. The base weight is shifted, so an adapter alone is not portable: the init
(A0, B0, eta) is saved next to the run and in every export, which also writes a plain rank-2r peft adapter
for the original base ([A_f; A0], [B_f, -B0]) and merged full weights (`export`).

Several ranks, ZeRO-3, offload. `prepare` runs before the engine. Each rank runs its share of every global
batch (the trainer's data order); the gradient hook reduces each layer's gradient onto the rank that owns
that layer (layers spread by size), which keeps the fp64 running sum, so host memory for the sums is 1/world
of the target weights, and the owner later does that layer's SVD and broadcasts A0, B0 (SVDs run in
parallel). fp64 sums do not depend on the order of additions: 1 and 2 processes give the same init. With ZeRO
0-3 and CPU offload the model is not yet partitioned at prepare; a model that already is (built under
zero.Init, e.g. NVMe parameter offload) gets DeepSpeed's own fetch/release hooks for the estimation pass (no
optimizer, removed afterwards): the gradient hook then sees the gathered weight's full gradient, and the init
writes the shifted weights through GatheredParameters.

Memory of the sums. 8 bytes per target weight / world (52 GB for Llama-2-7B's linear layers on one process,
where the reference accumulated the full gradients on the GPU and ran out of memory, its issue #14). Above
`recipe.grad_sum_budget` the layers are split into consecutive groups (`sum_groups`), one estimation pass over
the same batches each with only that group's weights requiring grad: a layer's gradient is the same in any
grouping, so the init is too (tested bit for bit); only the forward passes repeat.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import torch
import torch.distributed as dist

from runx.recipes.lora import LoRA
from runx.trainers.datajob import atomic_write_bytes

log = logging.getLogger("runx.lora_ga")

ADAPTER = "default"
INIT_DIR = "lora_ga_init"          # (A0, B0, eta) of every target layer: rebuilds the offset base
INIT_FILE = "init.safetensors"
INIT_META = "lora_ga_init.json"


# ============================================================================ the target layers
def lora_ga_targets(model) -> dict:
    """name -> peft LoRA layer wrapping an nn.Linear (or a fan_in_fan_out Conv1D), in module order."""
    from peft.tuners.lora import LoraLayer
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in getattr(module, "lora_A", {}):
            w = getattr(module.get_base_layer(), "weight", None)
            if w is None or len(_weight_shape(w)) != 2:
                raise ValueError(f"LoRA-GA initialises linear layers only; {name!r} wraps "
                                 f"{type(module.get_base_layer()).__name__} (recipe.target_modules)")
            out[name] = module
    if not out:
        raise ValueError("LoRA-GA found no peft LoRA layer to initialise (recipe.target_modules)")
    return out


def _is_partitioned(p) -> bool:
    return hasattr(p, "ds_id")


def _gathered(params, modify: bool = False):
    """Full tensors of ZeRO-3 partitioned params inside the block (every rank writes the same values)."""
    params = [p for p in params if _is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def _weight_shape(p) -> tuple[int, int]:
    return tuple(p.ds_shape) if _is_partitioned(p) else tuple(p.shape)


# ============================================================================ 1. the full-FT gradient
@contextlib.contextmanager
def _zero3_fetch_hooks(model, trainer):
    """Forward/backward of a model whose parameters are ZeRO-3 partitioned: DeepSpeed's fetch/release hooks
    without an optimizer (DeepSpeedZeRoOffload), removed on exit."""
    if not any(_is_partitioned(p) for p in model.parameters()):
        yield
        return
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils.timer import NoopTimer
    # the run's own ZeRO-3 settings (offload device, NVMe buffers, live-parameter limits) when the trainer has them
    raw = trainer.build_ds_config(model) if hasattr(trainer, "build_ds_config") else \
        {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    ds_cfg = DeepSpeedConfig(raw)
    zc = ds_cfg.zero_config
    offload = DeepSpeedZeRoOffload(model, timers=NoopTimer(), ds_config=ds_cfg,
                                   overlap_comm=False, prefetch_bucket_size=zc.prefetch_bucket_size,
                                   max_live_parameters=zc.max_live_parameters,
                                   param_persistence_threshold=zc.param_persistence_threshold,
                                   offload_param_config=zc.offload_param)
    try:
        yield
    finally:
        offload.partition_all_parameters()
        offload.destroy()
        # destroy() leaves on each module the autograd Functions DeepSpeed made for its backward hooks, bound to
        # this offload; the engine's own ZeRO-3 hooks would reuse them (DeepSpeed makes them only where absent),
        # so its backward, and a checkpointed layer's recompute, would fetch through this dead coordinator
        for m in model.modules():
            for k in ("pre_bwd_fn", "post_bwd_fn"):
                m.__dict__.pop(k, None)


def assign_owners(shapes: dict, world: int) -> dict:
    """name -> rank that accumulates, and later decomposes, that layer's gradient (greedy by size)."""
    load, owner = [0] * world, {}
    for name in sorted(shapes, key=lambda n: (-shapes[n][0] * shapes[n][1], n)):
        k = min(range(world), key=lambda i: (load[i], i))
        owner[name] = k
        load[k] += shapes[name][0] * shapes[name][1]
    return owner


SUM_BYTES = 8   # fp64 running sums


def group_sum_bytes(numels: list[int], world: int) -> int:
    """Most fp64-sum bytes a rank holds for a group of layers: all of them on one rank; with several, at most
    an even share plus the largest layer (owners are assigned greedily by size, `assign_owners`)."""
    if world == 1:
        return SUM_BYTES * sum(numels)
    return int(SUM_BYTES * (sum(numels) / world + max(numels)))


def sum_groups(shapes: dict, world: int, budget: int | None) -> list[list[str]]:
    """Target layers (forward order) split into consecutive groups whose fp64 sums fit `budget` bytes per rank
    (`group_sum_bytes`).
    One group when budget is None. Each group is one estimation pass over the same batches, with only its
    weights requiring grad, so a layer's G is the same in any grouping; a layer larger than the budget alone
    still gets a group of its own."""
    names = list(shapes)
    if budget is None:
        return [names]
    groups, cur = [], []
    for n in names:
        if cur and group_sum_bytes([shapes[k][0] * shapes[k][1] for k in cur + [n]], world) > budget:
            groups.append(cur)
            cur = []
        cur.append(n)
    return groups + [cur] if cur else groups


def _keep_checkpointing(model) -> None:
    """In eval mode transformers skips gradient checkpointing (it runs only while `module.training`), so the
    estimation pass of a model that needs checkpointing to train would hold every layer's activations. Mark
    just the modules that decide on checkpointing (their `gradient_checkpointing` flag is on) as training: they
    checkpoint, while their submodules, dropout and attention included, stay in eval mode (no dropout); the
    recomputed forward is the same deterministic one."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True


def estimate_full_gradients(model, weights: dict, batches, loss_fn, accumulate_on: str = "cpu",
                            mode: str = "eval", owners: dict | None = None,
                            autocast_bf16: bool = False) -> tuple[dict, int]:
    """Sum over `batches` (and over ranks) of dL/dW for each weight in `weights` (name -> parameter).

    Only the target weights require grad during the pass, and a post-accumulate hook consumes each weight's
    gradient the moment autograd writes it, then frees it: the device holds about one layer's full gradient
    at a time. With several ranks (`owners`: name -> rank) the hook reduces that gradient onto the layer's
    owner, which alone keeps the running sum: each rank holds 1/world of the sums. Sums are fp64, so they do
    not depend on the order of the additions (1 process == 2 processes). Returns (this rank's sums,
    micro-batches seen by this rank). Leaves no gradient, hook or requires_grad change behind.
    autocast_bf16: run the passes under bf16 autocast (the weights' gradients stay fp32).
    """
    world = dist.get_world_size() if owners is not None and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    params = dict(model.named_parameters())
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def consume(name):
        def hook(p):
            g = p.grad.detach()
            p.grad = None
            if world > 1:
                g = g.to(torch.float64)
                dist.reduce(g, dst=owners[name])     # same hook order on every rank: same graph
                if rank != owners[name]:
                    return
            g = g.cpu() if accumulate_on == "cpu" else g
            if name in sums:
                sums[name].add_(g)                   # computed in fp64 (the sum's dtype): no fp64 copy of g
            else:
                sums[name] = g.to(torch.float64, copy=True)
        return hook

    n_batches = 0
    try:
        for p in params.values():
            p.requires_grad_(False)
        for name, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(consume(name)))
        model.train(mode == "train")
        if mode == "eval":
            _keep_checkpointing(model)
        # LoRA paths are zero at the default init (B = 0); disabling them computes the base model exactly.
        adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        device_type = next(iter(weights.values())).device.type if weights else "cpu"
        with adapters_off, torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast_bf16):
            for batch in batches:
                loss = loss_fn(batch)
                loss.backward()
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(saved_flags[n])
        model.train(was_training)
    mine = [n for n in weights if owners is None or owners[n] == rank]
    missing = [n for n in mine if n not in sums]
    if n_batches and missing:
        raise RuntimeError(f"LoRA-GA: no gradient reached {missing[:3]} (unused by the loss?)")
    return sums, n_batches


# ============================================================================ 2. SVD of G
def _canonical_signs(U, V):
    """Fix each singular pair's sign (largest |v_i| entry positive): the same init on any process count."""
    idx = V.abs().argmax(dim=0)
    s = torch.sign(V[idx, torch.arange(V.shape[1], device=V.device)])
    s[s == 0] = 1
    return U * s, V * s


def gradient_svd(G: torch.Tensor, k: int, method: str = "randomized", niter: int = 4, seed: int = 0):
    """Top-k singular triplets of G (m x n): U (m x k), S (k), V (n x k), fp32, sign-canonical.

    randomized: Halko-Martinsson-Tropp range finder with q = min(2k, m, n) columns (the reference's
    torch.svd_lowrank(q=4r)) and `niter` power iterations, with a seeded test matrix.
    """
    G = G.float()
    m, n = G.shape
    if k > min(m, n):
        raise ValueError(f"LoRA-GA needs 2*rank <= min(d_out, d_in); a {m}x{n} layer allows rank <= "
                         f"{min(m, n) // 2} (recipe.rank)")
    if method == "exact":
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        U, S, V = U[:, :k], S[:k], Vh[:k].T
    elif method == "randomized":
        q = min(2 * k, m, n)
        gen = torch.Generator().manual_seed(seed)
        omega = torch.randn(n, q, generator=gen).to(G.device)
        Q = torch.linalg.qr(G @ omega).Q
        for _ in range(niter):
            Q = torch.linalg.qr(G @ torch.linalg.qr(G.T @ Q).Q).Q
        Ub, S, Vh = torch.linalg.svd(Q.T @ G, full_matrices=False)
        U, S, V = (Q @ Ub)[:, :k], S[:k], Vh[:k].T
    else:
        raise ValueError(f"recipe.svd={method!r}: valid choices are randomized, exact")
    U, V = _canonical_signs(U, V)
    return U, S, V


# ============================================================================ 3. A0, B0
def lora_ga_factors(U, V, r: int, direction: str = "ArB2r", scale: str = "stable", gamma: float = 16.0,
                    seed: int = 0):
    """(A0 [r x n], B0 [m x r]) from the top-2r singular vectors of G (U: m x 2r, V: n x 2r).

    Every direction splits the top-2r indices between A and B, so B0B0ᵀG + GA0ᵀA0 = c²·G_2r for all of them;
    ArB2r (the paper) gives A the top r.
    """
    if direction == "ArB2r":
        a_idx, b_idx = torch.arange(0, r), torch.arange(r, 2 * r)
    elif direction == "A2rBr":
        a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(0, r)
    elif direction == "ArBr":
        a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    elif direction == "random":
        perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(seed))
        a_idx, b_idx = perm[:r], perm[r:]
    else:
        raise ValueError(f"recipe.direction={direction!r}: valid choices are ArB2r, A2rBr, ArBr, random")
    A = V[:, a_idx.to(V.device)].T.contiguous()
    B = U[:, b_idx.to(U.device)].contiguous()
    if scale == "stable":          # c = d_out^(1/4) / sqrt(gamma) on both factors (Alg. 1; issue #12: sqrt)
        c = U.shape[0] ** 0.25 / math.sqrt(gamma)
        A, B = A * c, B * c
    elif scale != "unit":
        raise ValueError(f"recipe.scale={scale!r}: valid choices are stable, unit")
    return A, B


# ============================================================================ 4. write the init
@torch.no_grad()
def apply_lora_ga_init(layer, A: torch.Tensor, B: torch.Tensor, eta: float) -> None:
    """lora_A <- A0, lora_B <- B0, W <- W - eta·B0·A0 (fp32, then the weight's dtype)."""
    base = layer.get_base_layer()
    W, lA, lB = base.weight, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    fan_in_fan_out = getattr(layer, "fan_in_fan_out", False)
    with _gathered([W, lA, lB], modify=True):
        offset = eta * (B.float() @ A.float())
        if fan_in_fan_out:
            offset = offset.T
        W.copy_((W.float() - offset.to(W.device)).to(W.dtype))
        lA.copy_(A.to(lA.device, lA.dtype))
        lB.copy_(B.to(lB.device, lB.dtype))


def lora_eta(layer) -> float:
    return float(layer.scaling[ADAPTER])


def _comm_device(trainer) -> torch.device:
    """Where collectives run: the trainer's device (NCCL needs CUDA tensors; gloo takes CPU ones)."""
    return torch.device(str(getattr(trainer, "device", "cpu")))


def _broadcast(t: torch.Tensor, src: int, trainer) -> torch.Tensor:
    t = t.float().contiguous().to(_comm_device(trainer))
    dist.broadcast(t, src=src)
    return t


def _check_same_on_all_ranks(A: dict, B: dict, world: int, trainer) -> None:
    """Every rank must have written the same init (A0, B0 are broadcast from each layer's owner)."""
    if world == 1:
        return
    s = torch.tensor([sum(float(t.double().abs().sum()) for t in d.values()) for d in (A, B)],
                     dtype=torch.float64, device=_comm_device(trainer))
    hi, lo = s.clone(), s.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise RuntimeError(f"LoRA-GA: ranks computed different inits (checksums {lo.tolist()} .. {hi.tolist()})")


# ============================================================================ the recipe
class LoRAGA(LoRA):
    """`lora` with the gradient-SVD init (above) and exports that account for the shifted base weight."""

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        r = cfg.recipe
        if int(r.grad_batches) < 1:
            raise ValueError(f"recipe.grad_batches={r.grad_batches}: must be >= 1")
        if float(r.stable_gamma) <= 0:
            raise ValueError(f"recipe.stable_gamma={r.stable_gamma}: must be > 0")
        from runx.trainers.plan import size_problem
        problem = size_problem("recipe.grad_sum_budget", str(r.grad_sum_budget), ("auto", "none"))
        if problem:
            raise ValueError(problem)
        if r.get("use_dora"):
            from runx.trainers.recipe import RecipeConfigError
            raise RecipeConfigError("recipe.use_dora=true: LoRA-GA initialises plain LoRA factors (and shifts the base "
                                    "weight by their product); a DoRA magnitude is not part of its init. Valid "
                                    "choices: recipe.use_dora=false, or recipe=lora recipe.use_dora=true")
        self.timings: dict[str, float] = {}
        self.init_stats: dict[str, float] = {}

    # -------------------------------------------------------------- model
    def check_adapter(self, model) -> None:
        # 2·rank singular vectors per layer: checked on the skeleton (runx validate) and on the model, before the
        # gradient estimation (it failed after it)
        from runx.trainers.recipe import RecipeConfigError
        try:
            shapes = {n: _weight_shape(m.get_base_layer().weight) for n, m in lora_ga_targets(model).items()}
        except ValueError as e:
            raise RecipeConfigError(str(e)) from None
        name, shape = min(shapes.items(), key=lambda kv: min(kv[1]))
        rank = int(self.cfg.recipe.rank)
        if 2 * rank > min(shape):
            raise RecipeConfigError(
                f"recipe.rank={rank}: LoRA-GA initialises A and B from 2·rank singular vectors of each layer's "
                f"gradient, and {name} ({shape[0]}x{shape[1]}) has {min(shape)}. Valid values: recipe.rank <= "
                f"{min(shape) // 2}, or recipe.target_modules without the smallest layers")

    def build_model(self):
        model = super().build_model()
        self.check_adapter(model)
        saved = self._saved_init_dir()
        if saved is not None:           # a resumed run: the checkpoint may not carry frozen weights
            load_lora_ga_init(model, saved)
            self._init_applied = True
        return model

    def _saved_init_dir(self) -> str | None:
        """The init saved by an earlier prepare of this run (or of the run `resume=<path>` continues), if it
        was made with this run's settings."""
        res = str(self.cfg.get("resume", "auto"))
        if res == "never":
            return None
        from runx.trainers.runtime import is_complete, resume_target
        if not is_complete(*resume_target(res, self.run_dir)):
            # nothing to resume: this run starts at step 0 and estimates its own init (an init left in the run
            # dir by an earlier run, on other data or batches, was re-applied)
            return None
        cands = [os.path.join(self.run_dir, INIT_DIR)]
        if res != "auto":
            p = os.path.abspath(os.path.expanduser(res))
            cands += [os.path.join(d, INIT_DIR) for d in (p, os.path.dirname(p), os.path.dirname(os.path.dirname(p)))]
        want = self._meta()
        for c in cands:
            if os.path.exists(os.path.join(c, INIT_META)):
                with open(os.path.join(c, INIT_META)) as f:
                    meta = json.load(f)
                meta.setdefault("grad_batching", "training_order")   # inits saved before these options existed
                meta.setdefault("estimation_dtype", "model")
                if all(meta.get(k) == v for k, v in want.items()):
                    return c
                log.warning("LoRA-GA: ignoring %s, made with other settings", c)
        return None

    # -------------------------------------------------------------- the LoRA-GA init
    def prepare(self, trainer, model):
        if getattr(self, "_init_applied", False):
            log.info("LoRA-GA: init re-applied from %s", self._saved_init_dir())
            return model
        rc = self.cfg.recipe
        r = int(rc.rank)
        t0 = time.perf_counter()
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        targets = lora_ga_targets(model)
        weights = {n: l.get_base_layer().weight for n, l in targets.items()}
        shapes = {n: _weight_shape(w) for n, w in weights.items()}
        groups = sum_groups(shapes, world, self._sum_budget(trainer, world))

        # 1. G = mean over grad_batches global batches of dL/dW; each rank runs its share of every batch
        loader = trainer.train_loader_for_estimation(int(rc.grad_batches), by_length=rc.grad_batching == "by_length")
        batches = [trainer.to_device(b) for b in loader]
        counts = torch.tensor([len(batches), -len(batches)], dtype=torch.float64, device=_comm_device(trainer))
        if world > 1:   # the hooks reduce per micro-batch: every rank must run the same number of them
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            if counts[0] != -counts[1]:
                raise RuntimeError(f"LoRA-GA: ranks got {int(-counts[1])}..{int(counts[0])} estimation batches")
        n_total = len(batches) * world
        if n_total == 0:
            raise RuntimeError("LoRA-GA: the estimation loader yielded no batch (is the training set empty?)")
        if len(groups) > 1:
            log.info("LoRA-GA: the fp64 gradient sums exceed recipe.grad_sum_budget; %d estimation passes over "
                     "the same batches, each for a group of layers", len(groups))
        factors, stats = {}, torch.zeros(2, dtype=torch.float64, device=_comm_device(trainer))
        t_est = time.perf_counter() - t0      # the batches, then each pass (the SVDs count as init)
        owners = {}
        index = {name: i for i, name in enumerate(targets)}
        for group in groups:
            ta = time.perf_counter()
            owners.update(assign_owners({n: shapes[n] for n in group}, world))
            with _zero3_fetch_hooks(model, trainer):
                sums, _ = estimate_full_gradients(
                    model, {n: weights[n] for n in group}, batches, lambda b: self.loss(model, b, 0)[0],
                    accumulate_on=self._sums_on(trainer.device == "cuda"), mode=rc.estimation_mode, owners=owners,
                    autocast_bf16=rc.estimation_dtype == "bf16")
            t_est += time.perf_counter() - ta
            # 2-3. each owner: average, SVD, A0/B0 for its layers (the SVDs run in parallel across ranks)
            for name in group:
                if owners[name] != rank:
                    continue
                layer = targets[name]
                G = (sums.pop(name) / n_total).float()
                G = G.to(_comm_device(trainer))
                if getattr(layer, "fan_in_fan_out", False):
                    G = G.T
                seed = int(self.cfg.seed) * 7919 + index[name]
                U, S, V = gradient_svd(G, 2 * r, rc.svd, int(rc.svd_niter), seed=seed)
                factors[name] = lora_ga_factors(U, V, r, rc.direction, rc.scale, float(rc.stable_gamma), seed=seed)
                # ||G_2r|| / ||G||: the cosine between the first LoRA-GA step and the full fine-tuning step
                stats[0] += float(S.square().sum().sqrt() / G.norm().clamp_min(1e-30))
                stats[1] += 1
                del G
            del sums
        del batches
        t1 = t0 + t_est
        # 4. every rank: receive A0/B0 from the owner, write lora_A, lora_B and W - eta·B0·A0
        init_A, init_B = {}, {}
        for name, layer in targets.items():
            m, n = _weight_shape(weights[name])
            if getattr(layer, "fan_in_fan_out", False):
                m, n = n, m
            A, B = factors.pop(name) if owners[name] == rank else (torch.empty(r, n), torch.empty(m, r))
            if world > 1:
                A, B = _broadcast(A, owners[name], trainer), _broadcast(B, owners[name], trainer)
            apply_lora_ga_init(layer, A, B, lora_eta(layer))
            init_A[name], init_B[name] = A.cpu(), B.cpu()
        if world > 1:
            dist.all_reduce(stats)
        t2 = time.perf_counter()

        self.timings = {"lora_ga/estimate_s": t1 - t0, "lora_ga/svd_init_s": t2 - t1, "lora_ga/init_s": t2 - t0}
        self.init_stats = {"lora_ga/grad_energy_2r": float(stats[0] / stats[1]),
                           "lora_ga/grad_micro_batches": n_total, "lora_ga/estimation_passes": len(groups)}
        _check_same_on_all_ranks(init_A, init_B, world, trainer)
        if rc.save_init and rank == 0:
            save_lora_ga_init(os.path.join(self.run_dir, INIT_DIR), targets, init_A, init_B,
                              {**self._meta(), "batches_seen": n_total})
        if dist.is_initialized():
            dist.barrier()
        self._init_applied = True
        log.info("LoRA-GA init: %d layers, %d micro-batches, %.2fs (estimate %.2fs), ||G_2r||/||G|| = %.3f",
                 len(targets), n_total, t2 - t0, t1 - t0, self.init_stats["lora_ga/grad_energy_2r"])
        return model

    def _sum_budget(self, trainer, world: int) -> int | None:
        """recipe.grad_sum_budget in bytes per rank (None: no limit); "auto" = half the memory the sums would
        live in (host RAM shared by this node's ranks, or the GPU's free memory), the smallest over ranks so
        that every rank forms the same groups."""
        if str(self.cfg.recipe.grad_sum_budget) != "auto":
            return self._budget(0)
        if self._sums_on(trainer.device == "cuda") == "device" and trainer.device == "cuda":
            free = torch.cuda.mem_get_info()[0]
        else:
            import psutil
            # ranks on this node share its RAM (torchrun: LOCAL_WORLD_SIZE; the DeepSpeed launcher: LOCAL_SIZE)
            local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
            free = psutil.virtual_memory().available // max(1, local)
        budget = torch.tensor([self._budget(free)], dtype=torch.float64, device=_comm_device(trainer))
        if world > 1:
            dist.all_reduce(budget, op=dist.ReduceOp.MIN)
        return int(budget.item())

    def _budget(self, free: int) -> int | None:
        """recipe.grad_sum_budget in bytes per rank: None for "none", half of `free` for "auto", else the size."""
        text = str(self.cfg.recipe.grad_sum_budget)
        if text in ("auto", "none"):
            return free // 2 if text == "auto" else None
        from runx.trainers.plan import parse_size
        return parse_size(text, "recipe.grad_sum_budget")

    def _sums_on(self, cuda: bool) -> str:
        """recipe.grad_accumulator resolved: "cpu" or "device" (auto: the device on CUDA)."""
        acc = str(self.cfg.recipe.grad_accumulator)
        return ("device" if cuda else "cpu") if acc == "auto" else acc

    def extra_memory(self, model, world: int, available: dict, cuda: bool = False) -> dict:
        """For `runx plan`: {"cpu" or "device": {term: bytes per rank}}, the estimation's fp64 sums as the run
        would hold them under recipe.grad_sum_budget ("auto": half of `available[where]`, bytes per rank)."""
        shapes = {n: _weight_shape(l.get_base_layer().weight) for n, l in lora_ga_targets(model).items()}
        if not shapes:
            return {}
        where = self._sums_on(cuda)
        groups = sum_groups(shapes, world, self._budget(available[where]))
        need = max(group_sum_bytes([shapes[n][0] * shapes[n][1] for n in g], world) for g in groups)
        passes = f", {len(groups)} passes" if len(groups) > 1 else ""
        return {where: {f"LoRA-GA init: fp64 gradient sums (before training{passes})": int(need)}}

    def _meta(self) -> dict:
        """What the init depends on (besides the data): a saved init is reused only if all of it matches."""
        rc = self.cfg.recipe
        return {"rank": int(rc.rank), "alpha": float(rc.alpha), "scaling": rc.scaling,
                "direction": rc.direction, "scale": rc.scale, "stable_gamma": float(rc.stable_gamma),
                "svd": rc.svd, "svd_niter": int(rc.svd_niter), "grad_batches": int(rc.grad_batches),
                "estimation_mode": rc.estimation_mode, "grad_batching": rc.grad_batching,
                "estimation_dtype": rc.estimation_dtype,
                "base_model": str(self.cfg.model.path),
                "seed": int(self.cfg.seed)}

    def final_metrics(self) -> dict:
        return {**super().final_metrics(), **self.timings, **self.init_stats}

    # -------------------------------------------------------------- saving
    def export(self, model, state_dict, out_dir):
        """out_dir/
             merged/                  full HF weights W_init + eta·B·A (+ tokenizer): no peft needed
             adapter_rank2r/          plain peft LoRA for the ORIGINAL base: A' = [A; A0], B' = [B, -B0]
             adapter_on_offset_base/  peft adapter of the trained A, B (+ head), valid only on the offset base
                                      (its base_model_name_or_path is cleared so that no loader pairs it with
                                      the original base, where it gives another model)
             lora_ga_init/            A0, B0, eta per layer: offset base = original base - eta·B0·A0
             README.txt               which folder to load
        """
        model = getattr(model, "module", model)
        if state_dict is None:
            state_dict = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        os.makedirs(out_dir, exist_ok=True)
        offset_dir = os.path.join(out_dir, "adapter_on_offset_base")
        super().export(model, dict(state_dict), offset_dir)
        conf_path = os.path.join(offset_dir, "adapter_config.json")
        with open(conf_path) as f:
            conf = json.load(f)
        conf["base_model_name_or_path"] = None
        atomic_write_bytes(conf_path, json.dumps(conf, indent=2).encode())
        for card in ("README.md", "README.txt"):   # peft's card names the original base, LoRA's says load it
            if os.path.exists(os.path.join(offset_dir, card)):          # with it: out_dir/README.txt says how
                os.remove(os.path.join(offset_dir, card))
        own = os.path.join(self.run_dir, INIT_DIR)     # this run's init, whatever its resume setting
        init_dir = own if os.path.exists(os.path.join(own, INIT_META)) else self._saved_init_dir()
        if init_dir is None:
            from runx.trainers.recipe import RecipeConfigError
            raise RecipeConfigError(f"recipe.save_init={self.cfg.recipe.get('save_init')}: a LoRA-GA export needs the "
                                    f"init saved at the start ({os.path.join(self.run_dir, INIT_DIR)}), which this "
                                    f"run did not keep. Valid choices: recipe.save_init=true (its default)")
        export_lora_ga_init_copy(init_dir, os.path.join(out_dir, INIT_DIR))
        export_rank2r_adapter(model, state_dict, init_dir, os.path.join(out_dir, "adapter_rank2r"))
        self.name_classes(model.get_base_model().config)    # merged/'s config names the classes (id2label)
        export_merged(model, state_dict, os.path.join(out_dir, "merged"),
                      torch.bfloat16 if self.cfg.model.get("dtype") == "bf16" else torch.float32)
        self.tokenizer.save_pretrained(os.path.join(out_dir, "merged"))
        self.tokenizer.save_pretrained(os.path.join(out_dir, "adapter_rank2r"))
        atomic_write_bytes(os.path.join(out_dir, "README.txt"), EXPORT_README.encode())


EXPORT_README = """LoRA-GA export (runx). Which folder to load:
  merged/                  the fine-tuned model as full weights: AutoModel*.from_pretrained("merged")
  adapter_rank2r/          a plain PEFT LoRA adapter (rank 2r) for the ORIGINAL base model:
                           PeftModel.from_pretrained(original_base, "adapter_rank2r")
  adapter_on_offset_base/  the trained rank-r adapter; valid only on the offset base
                           (original base - eta*B0*A0 per layer, from lora_ga_init/: runx's
                           load_lora_ga_init rebuilds it). On the original base it gives another model.
  lora_ga_init/            A0, B0 and eta of every adapted layer (init.safetensors, lora_ga_init.json)
"""


# ============================================================================ init files and exports
def save_lora_ga_init(path: str, targets: dict, A: dict, B: dict, meta: dict) -> None:
    from safetensors.torch import save_file
    from runx.trainers.datajob import atomic_path, atomic_write_json
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, layer in targets.items():
        tensors[f"{name}.lora_A"] = A[name].float().contiguous()
        tensors[f"{name}.lora_B"] = B[name].float().contiguous()
        meta.setdefault("eta", {})[name] = lora_eta(layer)
        meta.setdefault("fan_in_fan_out", {})[name] = bool(getattr(layer, "fan_in_fan_out", False))
    with atomic_path(os.path.join(path, INIT_FILE)) as tmp:
        save_file(tensors, tmp)
    atomic_write_json(os.path.join(path, INIT_META), meta)   # written last: marks the init complete


def read_lora_ga_init(path: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file
    with open(os.path.join(path, INIT_META)) as f:
        meta = json.load(f)
    return load_file(os.path.join(path, INIT_FILE)), meta


def load_lora_ga_init(model, path: str) -> None:
    """Re-apply a saved init to a freshly built peft model (same targets, pristine base weights)."""
    tensors, meta = read_lora_ga_init(path)
    targets = lora_ga_targets(model)
    missing = sorted(set(meta["eta"]) ^ set(targets))
    if missing:
        raise ValueError(f"{path}: saved LoRA-GA init does not match the model's LoRA layers ({missing[:3]} ...)")
    for name, layer in targets.items():
        if abs(lora_eta(layer) - meta["eta"][name]) > 1e-9 * max(1.0, abs(meta["eta"][name])):
            raise ValueError(f"{path}: {name} was initialised with eta={meta['eta'][name]}, the model has "
                             f"{lora_eta(layer)} (recipe.rank / alpha / scaling changed?)")
        apply_lora_ga_init(layer, tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], meta["eta"][name])


def export_lora_ga_init_copy(src: str, dst: str) -> None:
    import shutil
    os.makedirs(dst, exist_ok=True)
    for f in (INIT_FILE, INIT_META):
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


def _lora_key_prefixes(state_dict: dict) -> dict:
    """peft module path -> (key of lora_A, key of lora_B) in a full peft state dict."""
    out = {}
    for k in state_dict:
        if k.endswith(f".lora_A.{ADAPTER}.weight"):
            mod = k[: -len(f".lora_A.{ADAPTER}.weight")]
            out[mod] = (k, f"{mod}.lora_B.{ADAPTER}.weight")
    return out


def export_rank2r_adapter(model, state_dict: dict, init_dir: str, out_dir: str) -> None:
    """A plain peft LoRA of rank 2r for the original base: W_pre + eta'·B'A' = W_init + eta·B·A with
    A' = [A; A0], B' = [B, -B0] and eta' = eta (alpha' = alpha·sqrt2 under rsLoRA, 2·alpha otherwise)."""
    import copy
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    tensors, meta = read_lora_ga_init(init_dir)
    # peft's saved keys ("...lora_A.weight", no adapter name) of the trained adapter and head
    sd = get_peft_model_state_dict(model, state_dict=dict(state_dict), adapter_name=ADAPTER)
    for mod, (ka, kb) in _lora_key_prefixes(state_dict).items():
        if f"{mod}.lora_A" not in tensors:
            raise KeyError(f"{init_dir}: the LoRA-GA init has no layer {mod!r}")
        A0, B0 = tensors[f"{mod}.lora_A"], tensors[f"{mod}.lora_B"]
        sa, sb = ka.replace(f".{ADAPTER}", ""), kb.replace(f".{ADAPTER}", "")
        sd[sa] = torch.cat([state_dict[ka].float(), A0.float()], dim=0).contiguous()
        sd[sb] = torch.cat([state_dict[kb].float(), -B0.float()], dim=1).contiguous()
    cfg = copy.deepcopy(model.peft_config[ADAPTER])
    cfg.r = 2 * int(cfg.r)
    cfg.lora_alpha = float(cfg.lora_alpha) * (math.sqrt(2.0) if cfg.use_rslora else 2.0)
    cfg.init_lora_weights = True
    os.makedirs(out_dir, exist_ok=True)
    cfg.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})


def export_merged(model, state_dict: dict, out_dir: str, dtype=torch.float32) -> None:
    """Full HF weights of the fine-tuned model: W = W_init + eta·B·A per LoRA layer (in fp32), heads from
    modules_to_save, everything else as is; saved in `dtype` (the model's: a bf16 model's merged weights are
    bf16, as its config.json says, not fp32 at twice the size)."""
    from peft.tuners.lora import LoraLayer
    eta = {n: lora_eta(m) for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    fio = {n: bool(getattr(m, "fan_in_fan_out", False)) for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    lora = _lora_key_prefixes(state_dict)
    base = model.get_base_model()
    tied = bool(getattr(base.config, "tie_word_embeddings", False) or
                getattr(getattr(base.config, "get_text_config", lambda: None)(), "tie_word_embeddings", False))
    merged, storages = {}, set()
    for k, v in state_dict.items():
        if ".lora_" in k or ".original_module." in k:     # LoRA factors (merged below), the untrained head copy
            continue
        key = k
        if ".base_layer." in k:
            mod, leaf = k.split(".base_layer.")
            if leaf == "weight" and mod in lora:
                ka, kb = lora[mod]
                delta = eta[mod] * (state_dict[kb].float() @ state_dict[ka].float())
                v = v.float() + (delta.T if fio[mod] else delta)
            key = f"{mod}.{leaf}"
        key = key.replace(f".modules_to_save.{ADAPTER}.", ".")
        if key.startswith("base_model.model."):
            key = key[len("base_model.model."):]
        ptr = v.untyped_storage().data_ptr()
        shared = ptr in storages   # a tied weight (lm_head = embed_tokens) seen under another key
        if shared and tied:
            continue               # the config ties it again on load, as save_pretrained leaves it out
        storages.add(ptr)
        v = v.to(dtype).contiguous()
        merged[key] = v.clone() if shared else v   # safetensors refuses tensors that share memory
    os.makedirs(out_dir, exist_ok=True)
    base.config.architectures = [type(base).__name__]   # as save_pretrained writes it (the checkpoint's said BertModel)
    base.config.save_pretrained(out_dir)
    from safetensors.torch import save_file
    save_file(merged, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
