"""`runx export <run_dir>`: user-loadable weights from a (possibly ZeRO-sharded) checkpoint.

ZeRO 0/1 checkpoints hold the full module state; ZeRO 2/3 ones are consolidated with DeepSpeed's own
zero_to_fp32 (frozen parameters included). The recipe decides the format: HF safetensors for full
fine-tunes, a PEFT adapter folder for LoRA, merged weights where the recipe offers them.
"""
from __future__ import annotations

import glob
import os


def checkpoint_state_dict(ckpt_root: str, tag: str, zero_stage: int) -> dict:
    import torch
    if zero_stage >= 2:
        os.environ.setdefault("DS_ACCELERATOR", "cpu") if not torch.cuda.is_available() else None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag)
    files = sorted(glob.glob(os.path.join(ckpt_root, tag, "mp_rank_*_model_states.pt")))
    if not files:
        raise FileNotFoundError(f"no model states in {os.path.join(ckpt_root, tag)}")
    sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}


def export_run(run_dir: str, out: str | None = None, tag: str | None = None) -> str:
    from omegaconf import OmegaConf

    import runx.conf  # noqa: F401
    from runx.recipes import RECIPES
    private = os.path.join(run_dir, ".runx", "job.yaml")  # unredacted (the run dir's config.yaml is redacted)
    cfg = OmegaConf.load(private if os.path.exists(private) else os.path.join(run_dir, "config.yaml"))
    ckpt_root = os.path.join(run_dir, "ckpt")
    if tag is None:
        latest = os.path.join(ckpt_root, "latest")
        if not os.path.exists(latest):
            raise FileNotFoundError(f"{run_dir} has no checkpoint (expected {latest})")
        tag = open(latest).read().strip()
    info = RECIPES[cfg.recipe.name]
    if info.kind != "train":
        raise ValueError(f"recipe {info.name} is a data job: its outputs are already files in {run_dir}")
    recipe = info.load()(cfg, run_dir)
    model = recipe.build_model()
    sd = checkpoint_state_dict(ckpt_root, tag, int(cfg.trainer.zero_stage))
    missing = set(model.state_dict()) - set(sd)
    if missing:
        raise RuntimeError(f"checkpoint {tag} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(sd)
    out = out or os.path.join(run_dir, "export")
    recipe.export(model, sd, out)
    return out
