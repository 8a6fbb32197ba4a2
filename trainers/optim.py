"""Optimisers and learning-rate schedules from the `optim:` section.

AdamW and SGD are torch's. LARS (You et al. 2017, as used by SwAV) is written here because neither
torch nor DeepSpeed ships it for arbitrary parameter groups; it is a few lines on top of SGD momentum.
"""
from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor step is scaled by eta * ||w|| / (||g|| + wd * ||w||).

    Groups with `lars_exclude=True` (biases, norms) take a plain SGD-momentum step, as SwAV does.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    wd = group["weight_decay"]
                    if wd:
                        g = g.add(p, alpha=wd)
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g * trust
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(ocfg, params_or_groups):
    name = ocfg.name
    if name == "adamw":
        return torch.optim.AdamW(params_or_groups, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps,
                                 weight_decay=ocfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params_or_groups, lr=ocfg.lr, momentum=ocfg.momentum,
                               weight_decay=ocfg.weight_decay)
    if name == "lars":
        return LARS(params_or_groups, lr=ocfg.lr, momentum=ocfg.momentum, weight_decay=ocfg.weight_decay,
                    eta=ocfg.lars_eta)
    raise ValueError(f"optim.name={name!r}: valid choices are adamw, sgd, lars")


def lr_lambda(ocfg, max_steps: int):
    """Multiplier of the base LR at optimizer step s: linear warmup, then cosine / linear / constant."""
    warmup = ocfg.warmup_steps or int(round(ocfg.warmup_ratio * max_steps))
    floor = ocfg.min_lr_ratio

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if ocfg.scheduler == "constant" or max_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if ocfg.scheduler == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return f


HEAD_MODULES = ("classifier", "score")  # HF's sequence-classification heads (peft's SEQ_CLS modules_to_save)


def is_head_param(name: str) -> bool:
    return any(part in HEAD_MODULES for part in name.split("."))


def with_head_lr(model, groups: list[dict], head_lr: float) -> list[dict]:
    """Each group split in two: the task head's parameters (lr = head_lr) and the rest (unchanged)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out, n_head = [], 0
    for g in groups:
        head = [p for p in g["params"] if is_head_param(names.get(id(p), ""))]
        rest = [p for p in g["params"] if not is_head_param(names.get(id(p), ""))]
        n_head += len(head)
        if rest:
            out.append({**g, "params": rest})
        if head:
            out.append({**g, "params": head, "lr": float(head_lr)})
    if n_head == 0:
        raise ValueError(f"optim.head_lr={head_lr}: the model has no trainable task head (a module named "
                         f"{' or '.join(HEAD_MODULES)}); set optim.head_lr=null")
    return out


def default_param_groups(model, weight_decay: float, optimizer: str = "adamw"):
    """Decay matrices, not biases / norms (the common transformer recipe). Without weight decay (and without
    LARS, which also exempts biases / norms from adaptation) the split changes nothing but costs: under ZeRO-3
    every parameter group is its own optimizer sub-group, and with optimizer states on NVMe that is one more
    swap round-trip per step (~20 ms per step measured on CPU), so one group is returned."""
    if float(weight_decay) == 0.0 and optimizer != "lars":
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": 0.0}]
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups
