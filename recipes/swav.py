"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments (Caron et al. 2020).

The method, in the order one training step runs it (paper sec. 3, reference `main_swav.py`):

  0. at the start of every iteration the prototypes C = [c_1..c_K] are renormalised to unit length;
  1. every image is augmented into V crops (2 large + several small; `swav_data.MultiCrop`);
  2. each crop x_v goes through the backbone f and the projection head g, and is L2-normalised:
        z_v = g(f(x_v)) / ||g(f(x_v))||                                                       (sec. 3.1)
     its prototype scores are  s_v = z_v C^T  (cosine similarities, B x K);
  3. for each crop a in `crops_for_assign`, codes are computed without gradient by Sinkhorn-Knopp on
     exp(s_a / eps), so that the B codes of the batch (of all processes, + an optional queue of past
     embeddings) spread equally over the K prototypes (the equipartition constraint, eq. 3-4):
        Q_a = diag(u) exp(s_a / eps) diag(v),   rows of Q_a^T sum to 1/K, columns to 1/B      (eq. 3)
  4. swapped prediction: every other crop v predicts Q_a through p_v = softmax(s_v / T), T = 0.1:
        L = 1/|A| sum_{a in A} 1/(V-1) sum_{v != a} -1/B sum_b sum_k Q_a[b,k] log p_v[b,k]       (eq. 1-2)
  5. the prototypes get no gradient during the first `freeze_prototypes_steps` optimizer steps.

Data parallel: Sinkhorn's per-prototype sums are all-reduced across processes (runx.kernels.sinkhorn), so
N processes with B/N images each give the codes (and the loss) of one process with B images.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from runx.recipes import swav_data
from runx.trainers.recipe import TrainingRecipe

log = logging.getLogger("runx.swav")

VISION_ARCHS = ("small_cnn", "resnet18", "resnet50")


# =========================================================================================================
# The network: backbone f, projection head g, prototypes C (+ the queue of past embeddings)
# =========================================================================================================
class SmallCNN(nn.Module):
    """4 conv blocks (w, 2w, 4w, 4w channels; strides 1, 2, 2, 1) + global average pooling (any crop size),
    4w-d features: the embedded default."""

    def __init__(self, norm: str = "batch", width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            layer = {"batch": lambda: nn.BatchNorm2d(cout), "group": lambda: nn.GroupNorm(math.gcd(8, cout), cout),
                     "none": lambda: nn.Identity()}[norm]
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none"), layer(), nn.ReLU(inplace=True)]

        w = width
        self.net = nn.Sequential(*block(3, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2),
                                 *block(4 * w, 4 * w, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 4 * w

    def forward(self, x):
        return self.net(x)


def resnet_backbone(arch: str, small_image_stem: bool) -> nn.Module:
    """torchvision ResNet with the classifier removed (global-average-pooled features)."""
    import torchvision
    net = getattr(torchvision.models, arch)(weights=None)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    if small_image_stem:   # 32 px images: 3x3 stride-1 stem, no max-pool (the usual CIFAR variant)
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


class Prototypes(nn.Module):
    """C: K unit vectors in the embedding space; scores = z C^T. While frozen, C is used detached, so the
    backbone and head still learn but C receives no gradient (works under every ZeRO stage, whose gradient
    buffers live outside `param.grad`)."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, dim))
        nn.init.normal_(self.weight)
        with torch.no_grad():
            self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z, frozen: bool = False):
        w = self.weight.detach() if frozen else self.weight
        return F.linear(z, w)


class SwAVNet(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_mlp: int, feat_dim: int, nmb_prototypes: int, head_bn: bool,
                 mean, std, queue_shape: tuple | None = None):
        super().__init__()
        self.backbone = backbone
        d = backbone.out_dim
        if hidden_mlp > 0:   # g: Linear -> BN -> ReLU -> Linear (reference projection head)
            self.head = nn.Sequential(nn.Linear(d, hidden_mlp), nn.BatchNorm1d(hidden_mlp) if head_bn else nn.Identity(),
                                      nn.ReLU(inplace=True), nn.Linear(hidden_mlp, feat_dim))
        else:
            self.head = nn.Linear(d, feat_dim)
        self.prototypes = Prototypes(feat_dim, nmb_prototypes)
        # crops arrive as uint8 (4x less host->device traffic); normalisation happens here, on the device
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)
        self.channels_last = False
        # the queue: embeddings of the last batches of each assigned crop, [len(crops_for_assign), L, D]; in the
        # module's state so that checkpoints carry it. With N processes each uses its own L/N rows
        # (`queue_rows`: rank r's part, r*L/N..(r+1)*L/N), and every rank holds all N parts (SwAV._push_queue
        # gathers each step's embeddings): DeepSpeed saves rank 0's module state and every rank loads it, so a
        # resumed rank 1 got rank 0's queue when each rank held only its own.
        self.queue_rows = slice(None)
        if queue_shape is not None:
            self.register_buffer("queue", torch.zeros(queue_shape))
            self.register_buffer("queue_in_use", torch.zeros((), dtype=torch.bool))
        else:
            self.queue = None

    def local_queue(self) -> torch.Tensor:
        """This process's part of the queue, [len(crops_for_assign), L/N, D] (a view)."""
        return self.queue[:, self.queue_rows]

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float() - self.mean) / self.std).to(self.prototypes.weight.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the backbone features the evaluation (kNN, linear probe) reads."""
        return self.backbone(self._input(x))

    def forward(self, crops: list, freeze_prototypes: bool = False, with_queue: bool = False):
        """crops: V tensors [B, 3, s_v, s_v]. Returns (z [V*B, D] unit rows, scores [V*B, K], queue scores
        [len(crops_for_assign), L, K] or None). Crops of one resolution go through f as one batch."""
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(self._input(torch.cat(crops[start:end]))))
            start = end
        z = F.normalize(self.head(torch.cat(feats)), dim=1)                       # z = g(f(x)) / ||.||
        scores = self.prototypes(z, frozen=freeze_prototypes)                     # s = z C^T
        queue_scores = None
        if with_queue:
            with torch.no_grad():
                q = self.local_queue().to(z.dtype)
                queue_scores = self.prototypes(q.flatten(0, 1), frozen=True).view(q.shape[0], q.shape[1], -1)
        return z, scores, queue_scores


# =========================================================================================================
# Codes and loss (pure functions of the scores)
# =========================================================================================================
def compute_codes(scores: torch.Tensor, rc) -> torch.Tensor:
    """Q for one assigned crop (scores [B', K], queue rows first): Sinkhorn-Knopp with eps and n iterations,
    per-prototype sums all-reduced across processes. Ablation `codes=softmax`: no equipartition."""
    if rc.codes == "softmax":
        return torch.softmax(scores / rc.epsilon, dim=1)
    from runx.kernels import sinkhorn
    return sinkhorn(scores, eps=float(rc.epsilon), iters=int(rc.sinkhorn_iterations), world_sums="auto",
                    backend=rc.sinkhorn_backend)


def swapped_prediction_loss(scores: list, codes: dict, temperature: float) -> torch.Tensor:
    """scores: V tensors [B, K] (one per crop); codes: {crop index a: Q_a [B, K]}.
    L = 1/|A| sum_a 1/(V-1) sum_{v != a} mean_b [ -sum_k Q_a[b,k] log softmax(s_v / T)[b,k] ]"""
    n_crops = len(scores)
    loss = scores[0].new_zeros(())
    for a, q in codes.items():
        sub = scores[0].new_zeros(())
        for v in range(n_crops):
            if v == a:
                continue
            log_p = F.log_softmax(scores[v] / temperature, dim=1)
            sub = sub - (q * log_p).sum(dim=1).mean()
        loss = loss + sub / (n_crops - 1)
    return loss / len(codes)


def assignment_entropy(probs: torch.Tensor) -> float:
    """Entropy of the mean assignment, divided by ln K: 1 = prototypes used uniformly, 0 = collapse."""
    mean = probs.float().mean(0)
    return float(-(mean * torch.log(mean.clamp_min(1e-12))).sum() / math.log(probs.shape[1]))


# =========================================================================================================
# Evaluation on frozen features
# =========================================================================================================
@torch.no_grad()
def weighted_knn_accuracy(train_f, train_y, test_f, test_y, k: int, temperature: float, chunk: int = 1024) -> float:
    """Weighted kNN (Wu et al. 2018): cosine similarity, the k nearest training features vote for their
    class with weight exp(sim / temperature)."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), n_cls, device=sim.device)
        votes.scatter_add_(1, train_y[idx], torch.exp(sim / temperature))
        correct += int((votes.argmax(1) == test_y[i:i + chunk]).sum())
    return correct / len(test_f)


def linear_probe_accuracy(train_f, train_y, test_f, test_y, steps: int, l2: float) -> float:
    """Multinomial logistic regression on standardised frozen features (full-batch L-BFGS)."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr, xte = ((train_f - mu) / sd).float(), ((test_f - mu) / sd).float()
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    lin = nn.Linear(xtr.shape[1], n_cls).to(xtr.device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), train_y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(1) == test_y).float().mean())


# =========================================================================================================
# The recipe
# =========================================================================================================
class SwAV(TrainingRecipe):
    throughput_unit = "samples"

    def __init__(self, cfg, run_dir: str):
        super().__init__(cfg, run_dir)
        self.rc = cfg.recipe
        self._check_config()
        self.queue_length_local = 0
        self.steps_per_epoch = 1
        self._probe_train = None
        self._train = None

    def _check_config(self):
        rc, m = self.rc, self.cfg.model
        n = len(rc.nmb_crops)
        for key in ("size_crops", "min_scale_crops", "max_scale_crops"):
            if len(rc[key]) != n:
                raise ValueError(f"recipe.{key}={list(rc[key])} must have one entry per crop group "
                                 f"(recipe.nmb_crops={list(rc.nmb_crops)})")
        if len(rc.color_jitter) != 4:
            raise ValueError(f"recipe.color_jitter={list(rc.color_jitter)}: expected 4 values "
                             f"[brightness, contrast, saturation, hue]")
        total = sum(int(c) for c in rc.nmb_crops)
        if total < 2:
            raise ValueError(f"recipe.nmb_crops={list(rc.nmb_crops)}: SwAV needs at least 2 crops")
        bad = [a for a in rc.crops_for_assign if not 0 <= int(a) < total]
        if bad or not rc.crops_for_assign:
            raise ValueError(f"recipe.crops_for_assign={list(rc.crops_for_assign)}: valid crop indices are "
                             f"0..{total - 1}")
        if m.kind != "vision" or m.arch not in VISION_ARCHS:
            raise ValueError(f"recipe=swav needs a vision model: model.kind={m.kind!r}, model.arch={m.arch!r} "
                             f"(valid: model=small_cnn|resnet18|resnet50, i.e. kind vision, arch in {VISION_ARCHS})")
        if int(self.cfg.trainer.zero_stage) == 3:
            raise ValueError("recipe=swav runs data parallel under trainer.zero_stage 0, 1 or 2 "
                             "(prototype renormalisation needs full parameters); got trainer.zero_stage=3")
        # (the queue and the kernel backend failed at build / the first step, after validate had passed)
        if int(rc.queue_length) > 0:
            world, micro = self._planned_world(), int(self.cfg.trainer.micro_batch_size)
            if int(rc.queue_length) < micro * world:
                raise ValueError(f"recipe.queue_length={rc.queue_length} is smaller than the global micro-batch "
                                 f"{micro * world} (trainer.micro_batch_size={micro} x {world} process(es)): the "
                                 f"queue is rounded down to a multiple of it, here none. Valid choices: 0 (no "
                                 f"queue), or at least {micro * world} (best a multiple of it)")
        if rc.codes == "sinkhorn" and rc.sinkhorn_backend == "triton":
            from runx.kernels._backend import interpret_mode, triton_import_error
            if not (self._on_cuda() or interpret_mode()):
                raise ValueError(f"recipe.sinkhorn_backend=triton runs a Triton kernel on CUDA tensors, and this run "
                                 f"computes on the CPU (trainer.device={self.cfg.trainer.device}"
                                 f"{', no CUDA device here' if self.cfg.trainer.device == 'auto' else ''}). Valid "
                                 f"choices: auto, torch (or trainer.device=cuda for a GPU machine, or "
                                 f"TRITON_INTERPRET=1 to run the kernel in Triton's CPU interpreter)")
            err = triton_import_error()
            if err is not None:
                raise ValueError(f"recipe.sinkhorn_backend=triton: triton is unusable here ({err}). Valid "
                                 f"choices: auto, torch")

    # ---- building ---------------------------------------------------------------------------------------
    def _world(self) -> int:
        import torch.distributed as dist
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _rank(self) -> int:
        import torch.distributed as dist
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _planned_world(self) -> int:
        """The run's number of processes: the actual world where distributed is initialised (`runx train` builds
        the recipe in its processes after that), else the config's (`runx validate`): trainer.num_procs per
        node, times launcher.num_nodes for a multi-node launcher."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        procs, launcher = max(1, int(self.cfg.trainer.num_procs)), self.cfg.get("launcher") or {}
        kind = launcher.get("kind", "local")
        if procs == 1 and kind == "local":
            return 1
        nodes = 1 if kind == "deepspeed" and not launcher.get("hostfile") else max(1, int(launcher.get("num_nodes", 1)))
        return procs * nodes

    def _on_cuda(self) -> bool:
        dev = self.cfg.trainer.device
        return dev == "cuda" or (dev == "auto" and torch.cuda.is_available())

    def plan_inputs(self) -> tuple[list, str]:
        """For `runx plan`: one micro-batch's multi-crop input on the meta device, and its description."""
        rc, b = self.rc, int(self.cfg.trainer.micro_batch_size)
        crops = [torch.zeros(b, 3, int(size), int(size), device="meta")
                 for n, size in zip(rc.nmb_crops, rc.size_crops) for _ in range(int(n))]
        what = " + ".join(f"{n}x{size}px" for n, size in zip(rc.nmb_crops, rc.size_crops))
        return [crops], f"{b} images x ({what})"

    def build_model(self):
        rc, m, t = self.rc, self.cfg.model, self.cfg.trainer
        if m.arch == "small_cnn":
            backbone = SmallCNN(rc.backbone_norm, int(rc.backbone_width))
        else:
            backbone = resnet_backbone(m.arch, rc.small_image_stem)
        if m.path:
            self._load_backbone(backbone, m.path)
        # queue: rounded down to a multiple of the global micro-batch (_check_config: at least one), split evenly
        # over the processes; every rank holds all parts (SwAVNet.queue_rows)
        world, micro = self._world(), int(t.micro_batch_size)
        queue_shape = None
        if rc.queue_length > 0:
            qlen = int(rc.queue_length) - int(rc.queue_length) % (micro * world)
            self.queue_length_local = qlen // world
            queue_shape = (len(rc.crops_for_assign), qlen, int(rc.feat_dim))
        model = SwAVNet(backbone, int(rc.hidden_mlp), int(rc.feat_dim), int(rc.nmb_prototypes), bool(rc.head_bn),
                        list(rc.normalize_mean), list(rc.normalize_std), queue_shape)
        if queue_shape is not None:
            rank = self._rank()
            model.queue_rows = slice(rank * self.queue_length_local, (rank + 1) * self.queue_length_local)
        if self._on_cuda() and rc.sync_bn and world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # (no channels_last weights: DeepSpeed's broadcast views every parameter as bytes, needs stride(-1) == 1)
        return model

    @staticmethod
    def _load_backbone(backbone: nn.Module, path: str):
        """model.path: a local state dict (.safetensors or torch.save) for the backbone (no download)."""
        import os
        if not os.path.exists(path):
            raise FileNotFoundError(f"model.path={path!r}: no such file (leave empty for random init)")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if not k.startswith(("head.", "prototypes.", "queue"))}
        missing, unexpected = backbone.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"model.path={path!r} does not fit the {type(backbone).__name__} backbone: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    def build_data(self):
        cfg, rc, d = self.cfg, self.rc, self.cfg.data
        train_src, eval_src, resize = swav_data.load_sources(cfg)
        size, seed = int(rc.size_crops[0]), int(cfg.seed)
        # subsets are seeded random draws, not the first images (an image folder lists them class by class)
        eval_idx = swav_data.subset(d.max_eval_samples, len(eval_src), seed, "eval")
        if train_src is None:    # data.name=synthetic: ready-made crops; the eval images double as probe set
            train = swav_data.SyntheticCrops(int(d.max_train_samples or rc.generated_train_size), rc, seed)
            train_src, train_idx = eval_src, eval_idx
        else:
            train_idx = swav_data.subset(d.max_train_samples, len(train_src), seed, "train")
            # crops a pure function of (seed, step, image): a resumed run's loader workers draw what the
            # uninterrupted run's did (after_engine tells it the step it starts at)
            train = swav_data.TransformedImages(train_src, swav_data.MultiCrop(rc), train_idx, seed=seed,
                                                micro_per_step=int(cfg.trainer.grad_accum))
        self._train = train
        evalset = swav_data.TransformedImages(eval_src, swav_data.eval_pipeline(rc, size, resize), eval_idx)
        # held-out labels of (un-augmented) training images: the kNN bank and linear-probe training set
        probe_idx = [train_idx[j] for j in swav_data.subset(int(rc.probe_train_samples), len(train_idx), seed, "probe")]
        self._probe_train = swav_data.TransformedImages(train_src, swav_data.eval_pipeline(rc, size, resize),
                                                        probe_idx)
        global_batch = int(cfg.trainer.micro_batch_size) * int(cfg.trainer.grad_accum) * self._world()
        self.steps_per_epoch = max(1, len(train) // global_batch)
        return train, (evalset if len(evalset) else None)   # data.max_eval_samples=0: no evaluation

    def collate(self, examples):
        return swav_data.collate(examples)

    def batch_size(self, batch) -> int:
        return len(batch["label"])

    def param_groups(self, model):
        """LARS: biases and normalisation parameters take a plain SGD step, without weight decay
        (solo-learn's `exclude_bias_n_norm`); other optimisers: all parameters, weight decay everywhere
        (the reference decays every parameter)."""
        o = self.cfg.optim
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if o.name == "lars" and o.lars_exclude_bias_and_norm:
            adapt = [p for n, p in params if p.ndim > 1]
            plain = [p for n, p in params if p.ndim <= 1]
            return [{"params": adapt, "weight_decay": float(o.weight_decay)},
                    {"params": plain, "weight_decay": 0.0, "lars_exclude": True}]
        return [{"params": [p for _, p in params], "weight_decay": float(o.weight_decay)}]

    def after_engine(self, trainer, engine) -> None:
        """The training set learns the step the loop starts at (a resumed run: its checkpoint's, which DeepSpeed's
        engine restored), so that its crops are those of that step (swav_data.TransformedImages); the loader is
        made after this. And: DeepSpeed bf16 casts parameters but keeps buffers fp32; BatchNorm needs its running
        statistics in the dtype of its weight (else: "expected scalar type BFloat16 but found Float")."""
        if isinstance(self._train, swav_data.TransformedImages):
            self._train.begin(int(getattr(engine, "global_steps", 0)))
        module = engine.module
        dtype = module.prototypes.weight.dtype
        if dtype == torch.float32:
            return
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean = m.running_mean.to(dtype)
                m.running_var = m.running_var.to(dtype)

    # ---- the loop ---------------------------------------------------------------------------------------
    def on_step_start(self, trainer, engine, step: int) -> None:
        normalize_prototypes_(engine)

    def prototypes_frozen(self, step: int) -> bool:
        return step < int(self.rc.freeze_prototypes_steps)

    def queue_active(self, step: int) -> bool:
        return self.queue_length_local > 0 and step // self.steps_per_epoch >= int(self.rc.queue_start_epoch)

    def loss(self, model, batch, step: int):
        rc = self.rc
        module = getattr(model, "module", model)
        crops = batch["crops"]
        bs, n_crops = crops[0].shape[0], len(crops)
        use_queue = self.queue_active(step) and bool(module.queue_in_use or (module.local_queue()[:, -1] != 0).any())
        # steps 2 and 5: embeddings z and scores s = z C^T of every crop (C detached while frozen)
        z, scores, queue_scores = model(crops, freeze_prototypes=self.prototypes_frozen(step), with_queue=use_queue)
        scores = scores.float()
        per_crop = list(scores.split(bs))
        # step 3: codes of the assigned crops, without gradient (queue scores first, then this batch)
        codes = {}
        with torch.no_grad():
            for i, a in enumerate(rc.crops_for_assign):
                s = per_crop[int(a)].detach()
                if use_queue:
                    s = torch.cat([queue_scores[i].float(), s])
                codes[int(a)] = compute_codes(s, rc)[-bs:]
        # step 4: swapped prediction
        loss = swapped_prediction_loss(per_crop, codes, float(rc.temperature))
        if self.queue_active(step):
            self._push_queue(module, z.detach(), bs, use_queue)
        return loss, self._monitor(z.detach(), per_crop, codes)

    @torch.no_grad()
    def _push_queue(self, module, z, bs: int, in_use: bool):
        """FIFO: shift by one batch, insert this batch's embeddings of each assigned crop; in every process's
        part of the queue, with the embeddings that process computed (all-gathered: each rank keeps the whole
        queue, so that rank 0's checkpoint carries every rank's part)."""
        new = torch.stack([z[int(a) * bs:(int(a) + 1) * bs] for a in self.rc.crops_for_assign]).float()
        world = self._world()
        if world > 1:
            import torch.distributed as dist
            parts = [torch.empty_like(new) for _ in range(world)]
            dist.all_gather(parts, new.contiguous())
        else:
            parts = [new]
        q, n = module.queue, self.queue_length_local
        for r, part in enumerate(parts):
            rows = q[:, r * n:(r + 1) * n]          # rank r's part (a view)
            rows[:, bs:] = rows[:, :-bs].clone()
            rows[:, :bs] = part.to(q.dtype)
        if in_use:
            module.queue_in_use.fill_(True)

    def _monitor(self, z, per_crop, codes) -> dict:
        """Collapse monitor: entropy of the mean prediction and of the mean code, embedding spread."""
        with torch.no_grad():
            p = torch.softmax(per_crop[0] / float(self.rc.temperature), dim=1)
            q = next(iter(codes.values()))
            return {"assign_entropy": assignment_entropy(p),
                    "code_entropy": assignment_entropy(q),
                    # std of the unit embeddings across the batch, times sqrt(D): ~1 spread out, 0 collapsed
                    "z_std": float(z.float().std(0).mean() * math.sqrt(z.shape[1]))}

    # ---- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, module, loader):
        """(backbone features, projected unit embeddings, labels) of a loader of {"image", "label"} batches."""
        dev = next(module.parameters()).device
        feats, zs, labels = [], [], []
        for batch in loader:
            x = batch["image"].to(dev, non_blocking=True)
            f = module.features(x)
            feats.append(f.float())
            zs.append(F.normalize(module.head(f), dim=1).float())
            labels.append(batch["label"].to(dev))
        return torch.cat(feats), torch.cat(zs), torch.cat(labels)

    def evaluate(self, model, loader) -> dict:
        rc = self.rc
        module = getattr(model, "module", model)
        was_training = module.training
        module.eval()
        try:
            probe_loader = torch.utils.data.DataLoader(self._probe_train, batch_size=loader.batch_size or 256,
                                                       shuffle=False, collate_fn=self.collate,
                                                       num_workers=int(self.cfg.trainer.dataloader_workers))
            ftr, _, ytr = self._embed(module, probe_loader)
            fte, zte, yte = self._embed(module, loader)
            w = F.normalize(module.prototypes.weight.detach().float(), dim=1)
            p = torch.softmax(zte @ w.T / float(rc.temperature), dim=1)
            out = {"assign_entropy": assignment_entropy(p),
                   "prototypes_used": float(p.argmax(1).unique().numel()),
                   "z_std": float(zte.std(0).mean() * math.sqrt(zte.shape[1])),
                   "feature_std": float(F.normalize(fte, dim=1).std(0).mean() * math.sqrt(fte.shape[1]))}
            if (ytr >= 0).all() and (yte >= 0).all():
                out["knn_acc"] = weighted_knn_accuracy(ftr, ytr, fte, yte, int(rc.knn_k), float(rc.knn_temperature))
                out["linear_acc"] = linear_probe_accuracy(ftr, ytr, fte, yte, int(rc.linear_probe_steps),
                                                          float(rc.linear_probe_l2))
            return out
        finally:
            module.train(was_training)

    # ---- saving -----------------------------------------------------------------------------------------
    def export(self, model, state_dict: dict, out_dir: str) -> None:
        """backbone.safetensors (load it with model.path=...) and swav.safetensors (the whole network)."""
        import os
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        full = {k: v.contiguous() for k, v in state_dict.items()}
        save_file(full, os.path.join(out_dir, "swav.safetensors"))
        save_file({k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")},
                  os.path.join(out_dir, "backbone.safetensors"))


@torch.no_grad()
def normalize_prototypes_(engine_or_module) -> None:
    """Step 0: c_k <- c_k / ||c_k|| in place. Under DeepSpeed mixed precision or ZeRO 1-2 the optimizer steps an
    fp32 master copy and copies it back over the module's weights, so the master copy is normalised too (else
    the next step undoes the normalisation)."""
    module = getattr(engine_or_module, "module", engine_or_module)
    w = module.prototypes.weight
    # ZeRO 1-2 (any precision), bf16 optimizer. The attribute exists on every rank, None where this rank's
    # partition holds none of w; the get is a collective, so every rank must take this branch.
    if hasattr(w, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
        wn = F.normalize(safe_get_full_fp32_param(w).float(), dim=1)
        safe_set_full_fp32_param(w, wn)
        w.copy_(wn.to(device=w.device, dtype=w.dtype))
        return
    master = _unfused_master_copy(getattr(engine_or_module, "optimizer", None), w)
    wn = F.normalize((master if master is not None else w).float(), dim=1)
    w.copy_(wn.to(w.dtype))
    if master is not None:                                  # ZeRO 0 + bf16/fp16: FP16_UnfusedOptimizer
        master.copy_(wn)


def _unfused_master_copy(optimizer, w):
    """The fp32 master tensor DeepSpeed's FP16_UnfusedOptimizer keeps for low-precision parameter w, if any."""
    for lp_group, hp_group in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
        for lp, hp in zip(lp_group, hp_group):
            if lp is w:
                return hp
    return None
