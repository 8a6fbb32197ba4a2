"""`runx eval <run_dir>`: a trained run's checkpoint evaluated again, on its own held-out data or on other data.

As lightning-hydra-template's eval.py: the run's resolved config, the checkpoint's consolidated weights (from a
ZeRO-sharded checkpoint too), the recipe's own `evaluate`. One process; the model must fit one device. Only keys
that choose the evaluation data and how it is batched may change (`data.*`, a few trainer keys, a recipe's
evaluation keys); everything that makes the model stays the run's.
"""
from __future__ import annotations

import hashlib
import os

from runx.cli.export import checkpoint_tag, load_run_config, trained_model_of_run

# keys `runx eval` may change: the evaluation data and batching, and recipe keys that only change evaluation
EVAL_KEYS = ("data.", "trainer.micro_batch_size", "trainer.device", "trainer.dataloader_workers")
EVAL_RECIPE_WORDS = ("eval", "knn", "probe")


class EvalError(ValueError):
    """A run that cannot be evaluated as asked: printed as one paragraph, no traceback."""


def _allowed(key: str) -> bool:
    if key.startswith("recipe."):
        return any(w in key for w in EVAL_RECIPE_WORDS)
    return key.startswith(EVAL_KEYS)


def eval_config(run_dir: str, overrides: list[str]):
    """The run's config with the evaluation overrides applied and validated, and the recipe's registry entry."""
    from omegaconf import OmegaConf

    from runx.cli.config import check_paths, format_problems, validate
    cfg, info = load_run_config(run_dir, "evaluate", EvalError)
    groups = [o for o in overrides if o.split("=", 1)[0] in ("data", "model", "recipe", "trainer")]
    if groups:
        raise EvalError(f"{', '.join(groups)}: runx eval takes dotted keys, not config groups (the run's config is "
                        f"already composed). Valid choices: e.g. data.kind=jsonl data.path=<file> "
                        f"data.eval_path=<file>")
    bad = [o for o in overrides if "=" not in o or not _allowed(o.split("=", 1)[0].lstrip("+"))]
    if bad:
        raise EvalError(f"{', '.join(bad)}: runx eval changes only the evaluation data and batching. Valid keys: "
                        f"data.* (e.g. data.eval_path=<file>, data.max_eval_samples=N), trainer.micro_batch_size, "
                        f"trainer.device, trainer.dataloader_workers, and recipe.* keys about evaluation "
                        f"({' / '.join(EVAL_RECIPE_WORDS)} in the name)")
    if overrides:
        OmegaConf.set_struct(cfg, False)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        keys = {o.split("=", 1)[0].lstrip("+") for o in overrides}
        if "data.path" in keys and not keys & {"data.eval_path", "data.eval_split"} and \
                cfg.data.kind in ("jsonl", "parquet", "csv") and os.path.isfile(os.path.expanduser(cfg.data.path)):
            # a file named to evaluate on is evaluated whole, not data.val_fraction of it
            cfg.data.eval_path = cfg.data.path
        if cfg.data.kind != "hf" and cfg.data.get("extra"):
            cfg.data.extra = {}   # datasets.load_dataset's arguments for the run's own hub data, not for these files
        import glob
        if cfg.data.kind in ("jsonl", "parquet", "csv") and cfg.data.get("eval_path") and cfg.data.get("path") and \
                not glob.glob(os.path.expanduser(str(cfg.data.path))):
            # the run's training files moved or deleted since: an evaluation of other files does not need them (its
            # classes are the run's, from .runx/label_names.json); they were "no such file" problems
            cfg.data.path = cfg.data.eval_path
    # the problems of what eval reads (the data, the model's files): a rule added since the run was trained that
    # its training settings break does not stop its evaluation
    read = ("data.", "model.") + tuple(o.split("=", 1)[0].lstrip("+") for o in overrides)
    problems = [p for p in validate(cfg) if p.startswith(read)] + check_paths(cfg)
    if problems:
        raise EvalError(format_problems(problems))
    return cfg, info


def evaluate_run(run_dir: str, tag: str | None = None, overrides: list[str] | None = None,
                 out: str | None = None) -> tuple[str, dict]:
    """Evaluate checkpoint `tag` (default: latest; best: trainer.monitor's best) of `run_dir`. Returns (the result
    file, what it holds: {eval/<metric>: value} with the tag, the overrides and the number of samples)."""
    import torch

    from runx.trainers.datajob import atomic_write_json
    from runx.trainers.recipe import RecipeConfigError, build_recipe
    from runx.trainers.runtime import pick_device
    overrides = list(overrides or [])
    cfg, info = eval_config(run_dir, overrides)
    asked, tag = tag, checkpoint_tag(run_dir, cfg, tag, "evaluate", EvalError)
    try:
        recipe = build_recipe(info.load(), cfg, run_dir)
        recipe.serving_run = True
        model, _, tag = trained_model_of_run(recipe, run_dir, cfg, tag, asked, "eval", EvalError)
        model.to(pick_device(str(cfg.trainer.device))).eval()
        _, eval_ds = recipe.build_data()
    except RecipeConfigError as e:
        raise EvalError(str(e)) from None
    if eval_ds is None or len(eval_ds) == 0:
        raise EvalError(f"{run_dir}: no held-out data to evaluate on (data.max_eval_samples=0 or no held-out "
                        f"split). Valid choices: data.eval_path=<file or folder> (local files), data.eval_split=<split>, "
                        f"data.val_fraction>0")
    loader = torch.utils.data.DataLoader(eval_ds, batch_size=int(cfg.trainer.micro_batch_size), shuffle=False,
                                         collate_fn=recipe.collate,
                                         num_workers=int(cfg.trainer.get("dataloader_workers") or 0))
    with torch.no_grad():
        metrics = {f"eval/{k}": v for k, v in recipe.evaluate(model, loader).items()}
    name = tag + (f"-{hashlib.sha1(' '.join(overrides).encode()).hexdigest()[:8]}" if overrides else "")
    if out and (os.path.isdir(out) or out.endswith(("/", os.sep))):   # --out <folder>: the result file goes in it
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, f"{name}.json")
    out = out or os.path.join(run_dir, "eval", f"{name}.json")
    record = {"run_dir": os.path.abspath(run_dir), "tag": tag, "overrides": overrides, "samples": len(eval_ds),
              **metrics}
    atomic_write_json(out, record)
    return out, record


def print_result(run_dir: str, out: str, record: dict) -> None:
    from runx.trainers.tracking import console, summary_table
    metrics = {k: v for k, v in record.items() if k.startswith("eval/")}
    console().print(summary_table(f"runx eval — {run_dir} @ {record['tag']} ({record['samples']} samples)", metrics))
    console().print(f"wrote {out}", soft_wrap=True)
