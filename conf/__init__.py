"""runx's config tree (found by Hydra as pkg://runx.conf).

Importing this package registers, once per process:
- `base`: every key with its default, generated from the dataclass schemas in runx.conf.schema
  (so YAML files only state what differs and a key typo is an error, not a silent new key);
- the `runx_first` resolver: first non-null argument (used for a sweep's folder);
- the `runx_new_run_dir` resolver: a single run's folder, run_dir or a new dated folder that no other run took;
- the `runx_sweep_name` resolver: the recipe part of a sweep folder's name, the same for every job of the sweep
  (`recipe=a,b` on the command line gives `a+b`; otherwise its argument, the recipe's name);
- the `runx_weights_dtype` resolver: the dtype a trained model is loaded in, from `trainer.precision` (bf16
  weights only where DeepSpeed keeps an fp32 master copy of them);
- the `runx_when` resolver: `${runx_when:${data.name},verifree_arith,300,0}` is 300 for that data option and 0
  otherwise (a recipe default that belongs to its embedded model or data, and must not leak into the user's);
- the `runx_verifree_prompt` resolver: VeriFree's short prompt for its embedded byte-level model, the paper's
  prompt for any other model;
- the `runx_required` resolver: `key: ${runx_required:key,example}` marks a value the user must give. (Hydra's
  `???` cannot: `base` already holds a default for every key, and OmegaConf keeps a set value when `???` is
  merged onto it, so the option would silently fall back to base's default.)
"""
from __future__ import annotations

from dataclasses import asdict


class RequiredValueError(ValueError):
    pass


def _required(key: str, example: str = "") -> None:
    raise RequiredValueError("required, no default: set it on the command line"
                             + (f", e.g. {key}={example}" if example else ""))


def _sweep_name(default: str) -> str:
    """Every job of `runx train -m recipe=a,b` resolves the sweep folder with its own recipe; the name must
    come from the command line instead, or the jobs land in one folder per recipe."""
    import sys
    for a in sys.argv[1:]:
        key, _, value = a.lstrip("+~").partition("=")
        if key == "recipe" and "," in value:
            return "+".join(v.strip() for v in value.split(","))
    return default


def _given(value) -> bool:
    """A resolver argument that holds a value (Hydra passes an unset one as None, "" or "null")."""
    return value not in (None, "", "null")


_CLAIMED: dict[str, str] = {}


def _new_run_dir(pinned, candidate: str) -> str:
    """A single run's folder: run_dir where given, else `candidate` (outputs/<date>/<time>-<recipe>) made here and
    now, or <candidate>-2, -3, ... where another run took that name in the same second (two runs started together
    by a script shared one folder: the second was refused as "in use" and Hydra's files of both mixed there)."""
    if _given(pinned):
        return pinned
    if candidate not in _CLAIMED:   # (resolved more than once per run: the same folder each time)
        import os
        os.makedirs(os.path.dirname(os.path.abspath(candidate)), exist_ok=True)
        path, n = candidate, 1
        while True:
            try:
                os.mkdir(path)
                break
            except FileExistsError:
                n += 1
                path = f"{candidate}-{n}"
        _CLAIMED[candidate] = path
    return _CLAIMED[candidate]


def _verifree_prompt(model_name: str) -> str:
    from runx.conf.schema.verifree import EMBEDDED_MODEL, PAPER_PROMPT, SHORT_PROMPT
    return SHORT_PROMPT if model_name == EMBEDDED_MODEL else PAPER_PROMPT


def _register() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from runx.conf.schema.core import RunConfig

    if not OmegaConf.has_resolver("runx_first"):
        OmegaConf.register_new_resolver(
            "runx_first", lambda *args: next((a for a in args if _given(a)), None))
    if not OmegaConf.has_resolver("runx_new_run_dir"):
        OmegaConf.register_new_resolver("runx_new_run_dir", _new_run_dir, use_cache=True)
    if not OmegaConf.has_resolver("runx_sweep_name"):
        OmegaConf.register_new_resolver("runx_sweep_name", _sweep_name)
    if not OmegaConf.has_resolver("runx_weights_dtype"):
        OmegaConf.register_new_resolver("runx_weights_dtype", lambda precision: "bf16" if precision == "bf16"
                                        else "fp32")
    if not OmegaConf.has_resolver("runx_when"):
        OmegaConf.register_new_resolver("runx_when", lambda value, match, then, otherwise:
                                        then if value == match else otherwise)
    if not OmegaConf.has_resolver("runx_verifree_prompt"):
        OmegaConf.register_new_resolver("runx_verifree_prompt", _verifree_prompt)
    if not OmegaConf.has_resolver("runx_required"):
        OmegaConf.register_new_resolver("runx_required", _required)
    ConfigStore.instance().store(name="base", node=OmegaConf.create(asdict(RunConfig())))


_register()
