"""`runx export <run_dir>`: user-loadable weights from a (possibly ZeRO-sharded) checkpoint.

ZeRO 0/1 checkpoints hold the full module state; ZeRO 2/3 ones are consolidated with DeepSpeed's own
zero_to_fp32 (frozen parameters included). The recipe decides the format: HF safetensors for full
fine-tunes, a PEFT adapter folder for LoRA, merged weights where the recipe offers them.
"""
from __future__ import annotations

import glob
import os
import sys


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
    # floats as fp32 (what ZeRO-2/3's consolidation gives); integer buffers (BatchNorm's step count) keep their dtype
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


class ExportError(ValueError):
    """A run that cannot be exported as asked: printed as one paragraph, no traceback."""


def load_run_config(run_dir: str, verb: str = "export", error=ExportError):
    """A training run's resolved config (the unredacted copy when there) and its recipe's registry entry."""
    from omegaconf import OmegaConf

    import runx.conf  # noqa: F401
    from runx.recipes import RECIPES
    private = os.path.join(run_dir, ".runx", "job.yaml")  # unredacted (the run dir's config.yaml is redacted)
    public = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(private) and not os.path.exists(public):
        from runx.cli.report import find_runs
        runs = find_runs(run_dir) if os.path.isdir(run_dir) else []
        if runs:   # a sweep's folder, or outputs/: its runs are the choices
            names = [os.path.relpath(r, run_dir) for r in runs]
            cmd = {"evaluate": "eval"}.get(verb, verb)
            raise error(f"{run_dir}: a folder of {len(runs)} runs, not one run; runx {cmd} takes one run folder. "
                        f"Valid choices: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''} (e.g. runx "
                        f"{cmd} {os.path.join(run_dir, names[0])})")
        if not os.path.exists(run_dir):
            raise error(f"{run_dir}: no such folder")
        # a checkpoint folder given for its run: <run>/ckpt or <run>/ckpt/step_N
        parts = os.path.normpath(os.path.abspath(run_dir)).split(os.sep)
        if "ckpt" in parts[1:]:
            i = len(parts) - 1 - parts[::-1].index("ckpt")
            run, step = os.sep.join(parts[:i]), parts[i + 1] if i + 1 < len(parts) else None
            cmd = {"evaluate": "eval"}.get(verb, verb)
            raise error(f"{run_dir}: a checkpoint folder; runx {cmd} takes the run folder. Valid choices: runx "
                        f"{cmd} {run}" + (f" --tag {step}" if step else ""))
        raise error(f"{run_dir}: not a runx run folder (no config.yaml)")
    cfg = OmegaConf.load(private if os.path.exists(private) else public)
    info = RECIPES[cfg.recipe.name]
    if info.kind != "train":
        raise error(f"recipe {info.name} is a data job: its outputs are already files in {run_dir}, nothing to {verb}")
    return cfg, info


def checkpoint_tag(run_dir: str, cfg, tag: str | None, verb: str = "export", error=ExportError) -> str:
    """The checkpoint a verb reads: `tag` (step_N, or best: trainer.monitor's best), else the latest."""
    ckpt_root = os.path.join(run_dir, "ckpt")
    from runx.trainers.runtime import checkpoint_steps, is_complete
    found = checkpoint_steps(ckpt_root)
    # a folder without runx_complete.json is a save cut short by a kill: not loadable, not a choice
    tags = [d for d in found if is_complete(ckpt_root, d)]
    if tag in (None, "latest"):
        latest = os.path.join(ckpt_root, "latest")
        if not os.path.exists(latest):
            hint = " (it ran with trainer.ckpt_every=0: rerun it with export_at_end=true, or with checkpoints)" \
                if not int(cfg.trainer.get("ckpt_every") or 0) else ""
            raise error(f"{run_dir} has no checkpoint to {verb}{hint}")
        tag = open(latest).read().strip()
    elif tag == "best":    # the checkpoint of trainer.monitor's best evaluation
        best = os.path.join(ckpt_root, "best")
        if not os.path.exists(best):
            raise error(f"--tag best: {run_dir} has no best checkpoint (it is kept for runs with "
                        f"trainer.monitor=<eval metric> and checkpoints on). Valid choices: "
                        f"{', '.join(tags) or 'none'}")
        tag = open(best).read().strip()
    if tag not in tags:
        what = "an incomplete checkpoint (its save was cut short)" if tag in found else "no such checkpoint"
        raise error(f"--tag {tag}: {what} in {ckpt_root}. Valid choices: {', '.join(tags) or 'none'}")
    return tag


def trained_model(recipe, run_dir: str, cfg, tag: str):
    """The recipe's model with the checkpoint's weights (all of them: a LoRA-GA base keeps its offset)."""
    model = recipe.build_model()
    sd = checkpoint_state_dict(os.path.join(run_dir, "ckpt"), tag, int(cfg.trainer.zero_stage))
    return _loaded(model, sd, tag)


def trained_model_of_run(recipe, run_dir: str, cfg, tag: str, asked: str | None, verb: str = "export",
                         error=ExportError):
    """trained_model, for a run that may still be training: the checkpoint read can be rotated away under the
    reader (trainer.keep_last), which stopped in a traceback. The latest / best one asked for is then read
    again as it is now, once; a checkpoint named by its step says it is gone. Returns (model, state, tag)."""
    from runx.trainers.runtime import is_complete
    try:
        return (*trained_model(recipe, run_dir, cfg, tag), tag)
    except Exception:
        if is_complete(os.path.join(run_dir, "ckpt"), tag):
            raise
    if asked in (None, "latest", "best"):
        newer = checkpoint_tag(run_dir, cfg, asked, verb, error)
        if newer != tag:
            print(f"runx {verb}: {tag} was deleted while it was read (the run is still training and keeps only "
                  f"its newest checkpoints): reading {newer}", file=sys.stderr)
            return (*trained_model(recipe, run_dir, cfg, newer), newer)
    raise error(f"--tag {tag}: the checkpoint was deleted while it was read (the run is still training and keeps "
                f"only its newest checkpoints, trainer.keep_last). Valid choices: --tag latest, or a run with "
                f"more checkpoints kept")


def _loaded(model, sd, tag):
    missing = set(model.state_dict()) - set(sd)
    if missing:
        raise RuntimeError(f"checkpoint {tag} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(sd)
    return model, sd


def export_run(run_dir: str, out: str | None = None, tag: str | None = None) -> str:
    cfg, info = load_run_config(run_dir)
    asked, tag = tag, checkpoint_tag(run_dir, cfg, tag)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out}: a file, not a folder. Valid choices: a folder (created if missing)")
    from runx.cli.config import check_paths, format_problems
    from runx.trainers.recipe import RecipeConfigError, build_recipe
    problems = [p for p in check_paths(cfg) if p.startswith(("model.", "recipe."))]
    if problems:   # the run's base model (a local folder) is needed to rebuild the model
        raise ExportError(format_problems(problems))
    try:
        recipe = build_recipe(info.load(), cfg, run_dir)
    except RecipeConfigError as e:
        raise ExportError(str(e)) from None
    recipe.serving_run = True
    default = out is None
    out = out or os.path.join(run_dir, "export")
    refuse_foreign_folder(out, default)
    # (a load that fails leaves the earlier export as it was)
    model, sd, tag = trained_model_of_run(recipe, run_dir, cfg, tag, asked)
    clear_earlier_export(out, default)
    from runx.trainers.datajob import atomic_write_json, readable_like_open
    before = _files_under(out)
    record = {"run_dir": os.path.abspath(run_dir), "tag": tag}
    # written first: an export cut short (a kill, a full disk) leaves a folder the next export owns and clears
    # back to the files that were there before it (it was refused as a foreign folder, the earlier export gone)
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, EXPORT_MANIFEST), {**record, "in_progress": True, "kept": sorted(before)})
    try:
        recipe.export(model, sd, out)
    except RecipeConfigError as e:
        raise ExportError(str(e)) from None
    atomic_write_json(os.path.join(out, EXPORT_MANIFEST),
                      {**record, "files": sorted(_files_under(out) - before - {EXPORT_MANIFEST})})
    readable_like_open(out)
    return out


def _files_under(folder: str) -> set:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


EXPORT_MANIFEST = "runx_export.json"   # what an export wrote, so that the next one into the folder replaces it


def refuse_foreign_folder(out: str, owned: bool) -> None:
    """An --out folder with files in it that no runx export wrote (no manifest) is refused before any work,
    unless it is the run's own export folder (`owned`)."""
    if owned or not os.path.isdir(out) or not os.listdir(out) or os.path.isfile(os.path.join(out, EXPORT_MANIFEST)):
        return
    raise ExportError(f"--out {out}: a folder with other files in it (e.g. {sorted(os.listdir(out))[0]}); an "
                      "export there would mix with them. Valid choices: a new or empty folder, or one an "
                      "earlier runx export wrote")


def clear_earlier_export(out: str, owned: bool) -> None:
    """The files of an earlier export into `out` removed (an export of another run or recipe left its files
    beside the new ones: an sft model.safetensors under a lora adapter loaded as a model neither run trained):
    those its manifest lists, inside the folder only; files of the user's own beside them stay. A folder with
    other files and no manifest is refused, unless it is the run's own export folder (`owned`)."""
    import json
    import shutil
    refuse_foreign_folder(out, owned)
    if not os.path.isdir(out) or not os.listdir(out):
        return
    manifest = os.path.join(out, EXPORT_MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            record = json.load(f)
        listed = record.get("files", [])
        if record.get("in_progress"):   # cut short: everything but what was there before it
            listed = sorted(_files_under(out) - set(record.get("kept", [])) - {EXPORT_MANIFEST})
        root = os.path.realpath(out)
        for rel in listed:
            path = os.path.join(out, str(rel))
            inside = not os.path.isabs(str(rel)) and ".." not in str(rel).split(os.sep) and \
                os.path.commonpath([root, os.path.realpath(os.path.dirname(path))]) == root
            if inside and (os.path.isfile(path) or os.path.islink(path)):
                os.remove(path)
        for d, _, _ in sorted(os.walk(out), key=lambda x: -len(x[0])):   # folders it emptied
            if d != out and not os.listdir(d):
                os.rmdir(d)
        os.remove(manifest)
    else:   # the run's own export folder, written before manifests
        shutil.rmtree(out)
