"""Compose configs with Hydra's compose API and validate them against the typed schemas.

Validation reports every problem at once, each naming the key, the bad value and the valid choices —
before any heavy import (torch, deepspeed) happens.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from importlib import resources

from runx.trainers.runtime import objective_direction  # one rule for sweeps and trainer.monitor

GROUPS = ["recipe", "model", "data", "trainer", "logger", "launcher", "debug", "experiment"]


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def group_options(group: str) -> list[str]:
    folder = resources.files("runx.conf").joinpath(group)
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def group_description(group: str, option: str) -> str:
    """The first sentence of a config file's leading comment (skipping `# @package`), over several lines if it
    runs on."""
    text = resources.files("runx.conf").joinpath(group, option + ".yaml").read_text()
    words: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        if not s.startswith("#"):
            break
        if "@package" in s:
            continue
        words.append(s.lstrip("# ").strip())
        if words[-1].endswith((".", ":", ")")) or len(words) == 3:
            break
    return " ".join(words)


def _check_group_overrides(overrides: list[str]) -> list[str]:
    """`trainer=zero9` -> an error naming the group and its valid options (before Hydra sees it)."""
    problems = []
    for ov in overrides:
        key, sep, val = ov.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or val in ("null", "None", ""):
            continue
        opts = group_options(key)
        for v in val.split(","):  # multirun sweeps: trainer=zero2,zero3
            v = v.strip()
            if v.startswith(("glob(", "choice(", "range(")):
                continue
            if v not in opts:
                hint = difflib.get_close_matches(v, opts, n=1)
                problems.append(f"{key}={v}: '{v}' is not a config in group '{key}'. "
                                f"Valid choices: {', '.join(opts)}." + (f" Did you mean '{hint[0]}'?" if hint else ""))
    return problems


def normalize_recipe_overrides(overrides: list[str]) -> list[str]:
    """`recipe.<key>=v` for a key of the chosen recipe's schema becomes `++recipe.<key>=v`: recipe YAML files
    state only what differs from the schema, and the schema's defaults are merged in after composition, so
    Hydra would otherwise reject a key the YAML does not mention. Unknown keys stay as they are (an error)."""
    from runx.recipes import RECIPES
    names = [v for o in overrides for k, _, v in [o.partition("=")] if k == "recipe"]
    names = [n for v in names for n in v.split(",")] or ["sft"]
    fields = set()
    for n in names:
        if n.strip() in RECIPES:
            fields |= {f.name for f in dataclasses.fields(RECIPES[n.strip()].load_schema())}
    out = []
    for o in overrides:
        key = o.partition("=")[0]
        if key.startswith("recipe.") and key.split(".")[1] in fields:
            o = "++" + o
        out.append(o)
    return out


def compose(overrides: list[str], return_hydra_config: bool = False):
    """Compose the config tree with these overrides; Hydra's errors become a ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    problems = _check_group_overrides(overrides)
    if problems:
        raise ConfigError(problems)
    overrides = normalize_recipe_overrides(overrides)
    try:
        with initialize_config_module(config_module="runx.conf", version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides),
                                return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError([_explain_hydra_error(e, overrides)]) from None
    fill_recipe_defaults(cfg)
    return cfg


def fill_recipe_defaults(cfg) -> None:
    """Put the recipe schema's defaults under the `recipe:` node (YAML states only what differs).
    Unknown keys are kept so that validate() can report them."""
    from omegaconf import OmegaConf, open_dict

    from runx.recipes import RECIPES
    node = cfg.get("recipe")
    name = node.get("name") if node is not None else None
    if name not in RECIPES:
        return
    schema = RECIPES[name].load_schema()
    defaults = OmegaConf.create(dataclasses.asdict(schema()))
    with open_dict(cfg):
        merged = OmegaConf.merge(defaults, node)
        cfg.recipe = merged


# config keys whose values may be local files or folders (a relative one is relative to where runx was started)
PATH_KEYS = ("model.path", "model.tokenizer", "data.path", "data.eval_path", "data.hf_name", "data.chat_template",
             "trainer.nvme_path", "launcher.hostfile", "resume", "recipe.path", "recipe.encoder",
             "recipe.encoder_weights", "recipe.pool", "recipe.sample", "recipe.output_dir")


def absolute_local_paths(cfg) -> list[str]:
    """Relative values of PATH_KEYS that name something here (a file, a folder, a glob's matches) made absolute:
    the run's saved config, `runx eval` / `runx export` of it from another folder, a SLURM job on another node
    and an exported adapter's base_model_name_or_path then find them. Hub ids and built-ins are left as they
    are. Returns the keys changed."""
    import glob

    from omegaconf import OmegaConf
    changed = []
    nvme = OmegaConf.select(cfg, "trainer.nvme_path", default=None, throw_on_resolution_failure=False)
    if isinstance(nvme, str) and nvme and os.path.abspath(os.path.expanduser(nvme)) != nvme:
        # a folder runx creates, so it need not exist yet: `trainer.nvme_path="~/nvme"` (the shell leaves a ~ after
        # `=` or in quotes as it is) made the space check and the aio probe measure ./~/nvme, DeepSpeed swap to ~/nvme
        OmegaConf.update(cfg, "trainer.nvme_path", os.path.abspath(os.path.expanduser(nvme)), force_add=False)
        changed.append("trainer.nvme_path")
    for key in PATH_KEYS:
        if key == "trainer.nvme_path":
            continue
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if not isinstance(value, str) or not value or os.path.isabs(value) or value.startswith(("~", "builtin:")) \
                or "://" in value or value in ("auto", "never", "builtin"):
            continue
        if os.path.exists(value) or glob.glob(value):
            OmegaConf.update(cfg, key, os.path.abspath(value), force_add=False)
            changed.append(key)
    return changed


def same_path_value(key: str, a, b) -> bool:
    """Two values of a config key are the same setting: equal, or for PATH_KEYS the same absolute path (a run
    saved before its relative paths were made absolute)."""
    if a == b:
        return True
    return key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and \
        os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def _explain_hydra_error(e: Exception, overrides: list[str]) -> str:
    msg = str(e).strip()
    # "Could not override 'optim.lrr'. ... Key 'lrr' is not in struct" -> name the valid keys
    import re
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        full = m.group(1)
        parent, _, leaf = full.rpartition(".")
        recipe = next((o.partition("=")[2] for o in overrides if o.partition("=")[0] == "recipe"), None)
        valid = _schema_keys(parent, recipe)
        while parent and not valid:   # 'modle.path': the unknown key is 'modle', under the root
            parent, _, leaf = parent.rpartition(".")
            valid = _schema_keys(parent, recipe)
        value = next((o.partition("=")[2] for o in overrides if o.lstrip("+~").partition("=")[0] == full), "?")
        return (f"{full}={value}: '{leaf}' is not a key of '{parent or '<root>'}'. "
                f"Valid keys: {', '.join(valid)}." + _did_you_mean(full, parent, leaf, valid))
    return msg.splitlines()[0] + ("" if len(msg.splitlines()) == 1 else " " + " ".join(msg.splitlines()[1:])[:500])


def _schema_keys(path: str, recipe: str | None = None) -> list[str]:
    from runx.conf.schema.core import RunConfig
    node = RunConfig
    for part in [p for p in path.split(".") if p]:
        if part == "recipe":
            from runx.recipes import RECIPES
            node = RECIPES[recipe or "sft"].load_schema()
            continue
        fields = {f.name: f for f in dataclasses.fields(node)}
        f = fields.get(part)
        if f is None:
            return []
        t = typing.get_type_hints(node)[part]
        if not dataclasses.is_dataclass(t):
            return []
        node = t
    return [f.name for f in dataclasses.fields(node)]


# ------------------------------------------------------------------------------ schema validation
def validate(cfg) -> list[str]:
    """Every problem of a composed config, as messages naming key, value and valid choices."""
    from omegaconf import OmegaConf

    from runx.conf.schema.core import RunConfig
    from runx.recipes import RECIPES

    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    problems: list[str] = []
    recipe = data.get("recipe") or {}
    name = recipe.get("name") if isinstance(recipe, dict) else None
    recipe_schema = RECIPES[name].load_schema() if name in RECIPES else None
    if recipe_schema is None:
        problems.append(f"recipe.name={name}: unknown recipe. Valid choices: {', '.join(RECIPES)}.")
    else:
        _walk(recipe, recipe_schema, "recipe", problems)
    root = {k: v for k, v in data.items() if k != "recipe"}
    _walk(root, RunConfig, "", problems, skip={"recipe"})
    from runx.cli.ranges import range_problems
    problems += range_problems(data)
    procs = (data.get("trainer") or {}).get("num_procs")
    d = data.get("data") or {}
    given = [f"{k}={d.get(k)}" for k in ("kind", "path", "hf_name", "eval_path")
             if d.get(k) and not (k == "kind" and d.get(k) == "builtin")]
    if name in RECIPES and RECIPES[name].kind == "data" and given:   # it would run on its default input instead
        problems.append(f"data.{given[0]}: recipe={name} is a data job that reads no data.* key; its input is "
                        f"{RECIPES[name].input_keys}. Valid choices: those keys, and no data override.")
    m = data.get("model") or {}
    if name in RECIPES and RECIPES[name].kind == "data" and (m.get("kind") != "none" or m.get("path")):
        # it would embed / score with its own models while the run's config named another
        shown = f"model={m.get('name')}" if m.get("kind") != "none" else f"model.path={m.get('path')}"
        problems.append(f"{shown}: recipe={name} is a data job that loads no model.* model; its models are "
                        f"{RECIPES[name].model_keys}. Valid choices: those keys, and no model override.")
    elif name in RECIPES and RECIPES[name].kind == "train" and m.get("kind") == "none":
        problems.append(f"model=none: recipe={name} trains a model. Valid choices: "
                        f"{', '.join(o for o in group_options('model') if o != 'none')}, or model.path=<id or folder>.")
    source = RECIPES[name].data_problem(d.get("kind"), d.get("name")) if name in RECIPES else None
    if source:
        problems.append(source)
    if name in RECIPES and RECIPES[name].kind == "data" and isinstance(procs, int) and procs > 1:
        problems.append(f"trainer.num_procs={procs}: recipe={name} is a data job, run by one process with its "
                        f"own worker pool. Valid values: 1; for parallel shards set recipe.num_workers={procs}.")
    if not problems:  # interpolations resolve? (each value on its own, so that every failure is reported)
        _resolve_all(cfg, "", problems)
    if not problems:  # the values interpolations gave (${oc.env:MBS}) checked like values written out
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved.pop("hydra", None)
        given = _interpolated_values(data, resolved, RunConfig, recipe_schema)
        if given is not None:
            if recipe_schema is not None:
                _walk(given.get("recipe") or {}, recipe_schema, "recipe", problems)
            _walk({k: v for k, v in given.items() if k != "recipe"}, RunConfig, "", problems, skip={"recipe"})
            problems += range_problems(given)
    return problems


def _field_type(schema, key):
    """The type of `schema`'s field `key` (Optional unwrapped), or None (no such field / not a dataclass)."""
    if schema is None or not dataclasses.is_dataclass(schema):
        return None
    t = typing.get_type_hints(schema).get(key)
    if typing.get_origin(t) is typing.Union:
        t = next((a for a in typing.get_args(t) if a is not type(None)), None)
    return t


def _interpolated_values(raw, resolved, root_schema, recipe_schema):
    """`raw` with each interpolation replaced by its resolved value: text (as oc.env gives every value) is read
    as a number where the schema's field is a number (logger.group=${oc.env:SLURM_JOB_ID} stays text); None when
    `raw` has no interpolation."""
    found = False

    def merge(r, v, schema):
        nonlocal found
        if isinstance(r, dict) and isinstance(v, dict):
            return {k: merge(r[k], v.get(k), _field_type(schema, k)) if k in v else r[k] for k in r}
        if isinstance(r, list) and isinstance(v, list) and len(r) == len(v):
            return [merge(a, b, None) for a, b in zip(r, v)]
        if isinstance(r, str) and "${" in r:
            found = True
            if isinstance(v, str) and schema in (int, float):
                try:
                    return schema(v)
                except ValueError:
                    pass
            return v
        return r
    out = {k: merge(v, resolved.get(k), recipe_schema if k == "recipe" else _field_type(root_schema, k))
           for k, v in raw.items() if k in resolved}
    return out if found else None


def run_dir_problems(cfg) -> list[str]:
    """run_dir=<path> (a run's folder, or a sweep's): a folder, or a path where one can be made."""
    from omegaconf import OmegaConf
    run_dir = OmegaConf.select(cfg, "run_dir", default=None, throw_on_resolution_failure=False)
    if not isinstance(run_dir, str) or not run_dir:
        return []
    where = os.path.abspath(os.path.expanduser(run_dir))
    parent = where
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.exists(where) and not os.path.isdir(where):
        return [f"run_dir={run_dir}: a file, not a folder. Valid choices: a folder (created if missing)."]
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return [f"run_dir={run_dir}: cannot be made here ({parent} is not a writable folder). Valid choices: a "
                f"folder you can write to."]
    return []


def check_paths(cfg) -> list[str]:
    """Local files and folders the config names that do not exist on this machine, as problems naming the key.
    Run where the job runs, before any model is built (a hub id is not checked: only absolute, ./ or ~ paths
    for model and `datasets` sources; data and recipe input files always are)."""
    import glob

    def local_like(p: str) -> bool:
        return os.path.isabs(p) or p.startswith(("./", "../", "~"))

    def missing(p: str) -> bool:
        p = os.path.expanduser(p)
        return not (os.path.exists(p) or glob.glob(p))

    out: list[str] = []

    def need(key: str, value, always: bool, what: str = "no such file, folder or glob match on this machine"):
        if isinstance(value, str) and value and not value.startswith("builtin:") and (always or local_like(value)) \
                and missing(value):
            out.append(f"{key}={value}: {what}.")

    # values that fail to resolve (a required value not given) are reported by validate(); here they read as unset
    from omegaconf import OmegaConf
    d, m, r, t = ({k: OmegaConf.select(cfg, f"{group}.{k}", default=None, throw_on_resolution_failure=False)
                   for k in (cfg.get(group) or {})} for group in ("data", "model", "recipe", "trainer"))
    if not m.get("from_config"):
        need("model.path", m.get("path"), False, "no such folder on this machine (give a local model folder "
             "or a hub id)")
    need("model.tokenizer", m.get("tokenizer"), False)
    hostfile = OmegaConf.select(cfg, "launcher.hostfile", default=None, throw_on_resolution_failure=False)
    need("launcher.hostfile", hostfile, True, "no such file on this machine")
    if hostfile and os.path.isfile(os.path.expanduser(str(hostfile))):
        out += hostfile_problems(str(hostfile))
    kind = d.get("kind")
    if kind in ("jsonl", "parquet", "csv", "imagefolder") and d.get("path") == "":
        out.append(f"data.path: empty; data.kind={kind} reads local files. Set data.path=<file or folder>.")
    if kind in ("jsonl", "parquet", "csv"):
        need("data.path", d.get("path"), True)
        need("data.eval_path", d.get("eval_path"), True)
        from runx.recipes.text_data import kind_mismatch
        out += [p for p in (kind_mismatch(f"data.{k}", str(d.get(k)), kind) for k in ("path", "eval_path")
                            if d.get(k)) if p]
    elif d.get("eval_path"):
        out.append(f"data.eval_path={d.get('eval_path')}: held-out files for data.kind=jsonl / parquet / csv, not "
                   f"data.kind={kind}. Valid choices: data.eval_split=<split> for a datasets source, or unset.")
    if kind == "imagefolder" and d.get("path"):
        root = os.path.expanduser(str(d.get("path")))
        need("data.path", d.get("path"), True)
        if os.path.isdir(root):
            have = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
            for key in ("train_split", "eval_split"):
                if d.get(key) not in have:
                    out.append(f"data.{key}={d.get(key)}: no folder {os.path.join(root, str(d.get(key)))} "
                               f"(<data.path>/<split>/<class>/<image>). Valid choices: {', '.join(have) or 'none'}.")
            classes = [{e for e in os.listdir(os.path.join(root, str(d.get(k))))
                        if os.path.isdir(os.path.join(root, str(d.get(k)), e))}
                       for k in ("train_split", "eval_split") if d.get(k) in have]
            if len(classes) == 2 and classes[1] - classes[0]:
                out.append(f"data.eval_split={d.get('eval_split')}: classes the training split lacks, so they have "
                           f"no label number: {', '.join(sorted(classes[1] - classes[0])[:5])}.")
    if d.get("chat_template"):
        from runx.recipes.text_data import chat_template_problem
        problem = chat_template_problem(d.get("chat_template"))
        if problem:
            out.append(problem + ".")
    if kind == "hf":
        need("data.hf_name" if d.get("hf_name") else "data.path", d.get("hf_name") or d.get("path"), False,
             "no such folder on this machine (give a saved dataset folder or a hub id)")
    if kind == "hf" and d.get("hf_name") or r.get("name") == "concept_prune":
        # hub ids the model build does not already look up (that names model.path / model.tokenizer)
        from runx.trainers.hf import offline_uncached
        out += offline_uncached(cfg, ("data.hf_name", "recipe.encoder"))
    if "nvme" in (t.get("offload_param"), t.get("offload_optimizer")):
        nvme = os.path.expanduser(str(t.get("nvme_path") or ""))
        if os.path.exists(nvme) and not os.path.isdir(nvme):
            out.append(f"trainer.nvme_path={t['nvme_path']}: a file, not a folder. Valid choices: a folder on a "
                       f"local NVMe drive (it is created if missing).")
        from runx.trainers.nvme import aio_available
        if not aio_available():
            out.append("trainer.offload_param / offload_optimizer=nvme: DeepSpeed's async_io op cannot be built "
                       "here (libaio is missing). Install it (apt install libaio-dev; conda install libaio), or "
                       "choose trainer=zero3_cpu_offload.")
    from runx.recipes import RECIPES
    from runx.trainers.runtime import resume_problem
    name = OmegaConf.select(cfg, "recipe.name", default=None)
    if name in RECIPES and RECIPES[name].kind == "train" and cfg.get("resume") is not None:
        problem = resume_problem(str(cfg.get("resume")), "")   # (a data job's resume=<path> is its pin's business)
        if problem:
            out.append(problem + ".")
    out += run_dir_problems(cfg)
    # (torch is imported only for this check; `runx plan plan.gpus=8 ...` describes another machine: not checked)
    described = (OmegaConf.select(cfg, "plan.gpus", default=0) or 0) > 0 or \
        OmegaConf.select(cfg, "plan.gpu_mem", default="auto") != "auto"
    if t.get("device") == "cuda" and not described:
        from runx.trainers.runtime import cuda_available
        if not cuda_available():
            out.append("trainer.device=cuda: no CUDA device is visible on this machine. Valid choices: auto (the "
                       "GPUs where there are some, else the CPU), cpu.")
    name = r.get("name")
    if name == "concept_prune" and r.get("input") != "digits":
        need("recipe.path", r.get("path"), True)
    if name == "preselect":
        if r.get("pool") != "builtin":
            need("recipe.pool", r.get("pool"), True)
        need("recipe.sample", r.get("sample"), True)
    return out


def hostfile_problems(path: str) -> list[str]:
    """DeepSpeed's hostfile format (one `hostname slots=N` per line, # comments), which its launcher checked
    only after runx had started it (a traceback)."""
    import re
    with open(os.path.expanduser(path), errors="replace") as f:
        lines = [(i, ln.split("#", 1)[0].strip()) for i, ln in enumerate(f, 1)]
    hosts = [(i, ln) for i, ln in lines if ln]
    bad = [(i, ln) for i, ln in hosts if not re.match(r"\S+\s+slots=[1-9]\d*(\s|$)", ln)]
    valid = "lines of 'hostname slots=N' (N GPUs on that node), # for comments"
    if bad:
        return [f"launcher.hostfile={path}: line {bad[0][0]} is {bad[0][1]!r}. Valid values: a file of {valid}."]
    if not hosts:
        return [f"launcher.hostfile={path}: names no host. Valid values: a file of {valid}."]
    return []


def _resolve_all(node, prefix: str, problems: list[str]) -> None:
    from omegaconf import DictConfig, ListConfig

    keys = range(len(node)) if isinstance(node, ListConfig) else [k for k in node.keys() if k != "hydra"]
    for k in keys:
        full = f"{prefix}[{k}]" if isinstance(node, ListConfig) else (f"{prefix}.{k}" if prefix else str(k))
        try:
            value = node[k]
        except Exception as e:  # MissingMandatoryValue, InterpolationResolutionError
            first = str(e).splitlines()[0].replace("RequiredValueError raised while resolving interpolation: ", "")
            problems.append(f"{full}: {first}" + (
                " — this value is required (set it on the command line, e.g. model.path=...)"
                if "Missing mandatory" in str(e) else ""))
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            _resolve_all(value, full, problems)


# keys a user may look for under another group
ELSEWHERE = {"data.micro_batch_size": "trainer.micro_batch_size",
             "data.batch_size": "trainer.micro_batch_size", "trainer.lr": "optim.lr", "trainer.seed": "seed"}


def _did_you_mean(full: str, parent: str, leaf: str, keys: list) -> str:
    """The hint after an unknown key (`full`, `leaf` under `parent`): where it lives if in another group, else
    the closest of `keys`."""
    near = difflib.get_close_matches(leaf, keys, n=1)
    hint = ELSEWHERE.get(full) or (f"{parent + '.' if parent else ''}{near[0]}" if near else None)
    return f" Did you mean '{hint}'?" if hint else ""


def _walk(data: dict, schema, prefix: str, problems: list[str], skip=()):
    hints = typing.get_type_hints(schema)
    fields = [f.name for f in dataclasses.fields(schema)]
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key in skip:
            continue
        if key not in hints:
            problems.append(f"{full}={_show(value)}: unknown key. Valid keys under '{prefix or '<root>'}': "
                            f"{', '.join(fields)}." + _did_you_mean(full, prefix, str(key), fields))
            continue
        _check_value(value, hints[key], full, problems)


def _show(v):
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) < 60 else s[:57] + "..."


def _check_value(value, t, full: str, problems: list[str]):
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: checked when resolved
    if value == "???":
        return  # mandatory: reported at resolution if still missing
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if t is typing.Any:
        return
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return
        t = next(a for a in args if a is not type(None))
        return _check_value(value, t, full, problems)
    if origin is typing.Literal:
        if value not in args:
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            problems.append(f"{full}={_show(value)}: invalid choice. Valid choices: "
                            f"{', '.join(str(a) for a in args)}." + (f" Did you mean '{hint[0]}'?" if hint else ""))
        return
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            problems.append(f"{full}={_show(value)}: expected a mapping with keys "
                            f"{', '.join(f.name for f in dataclasses.fields(t))}.")
            return
        _walk(value, t, full, problems)
        return
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }.get(origin or t)
    if ok is not None and not ok(value):
        tname = getattr(origin or t, "__name__", str(t))
        problems.append(f"{full}={_show(value)}: expected {tname}, got {type(value).__name__}.")
    elif (origin or t) is float and isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{full}={value}: not a finite number. Valid values: a finite float.")


def format_problems(problems: list[str], title: str = "Invalid configuration") -> str:
    lines = [f"{title} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
    lines += [f"  - {p}" for p in problems]
    lines.append("Fix the overrides above (`runx ls <group>` lists the options; `runx show` prints the config).")
    return "\n".join(lines)


def hydra_argv_overrides(argv: list[str]) -> list[str]:
    """The key=value overrides in a `runx train` argv (no flags, no hydra/* internals)."""
    out = []
    for a in argv:
        if a.startswith("-") or "=" not in a:
            continue
        key = a.lstrip("+~").partition("=")[0]
        if key.startswith("hydra") :
            continue
        out.append(a)
    return out


# Beyond this many jobs a sweep is checked one swept value at a time (the others at their first value)
SWEEP_CHECK_ALL_MAX = 32


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The job overrides a multirun will compose, for checking before any job starts: choice and range sweeps
    expanded (all combinations up to SWEEP_CHECK_ALL_MAX jobs, else each swept value once, the other keys at
    their first value); an Optuna interval at both ends. Sweeps it cannot enumerate (glob) are left to the
    jobs, which check themselves."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed, swept = [], []
    for raw, o in zip(overrides, parsed):
        if not o.is_sweep_override():
            fixed.append(raw)
            continue
        prefix = raw[: len(raw) - len(raw.lstrip("+~"))]
        key = prefix + o.key_or_group
        try:
            if o.is_interval_sweep():
                iv = o.value()
                values = [str(iv.start), str(iv.end)]
            else:
                values = list(o.sweep_string_iterator())
        except Exception:   # glob(...) and other forms the jobs expand themselves
            continue
        if values:
            swept.append([f"{key}={v}" for v in values])
    if not swept:
        return [fixed]
    if math.prod(len(v) for v in swept) <= SWEEP_CHECK_ALL_MAX:
        return [fixed + list(combo) for combo in itertools.product(*swept)]
    firsts = [v[0] for v in swept]
    jobs = [fixed + firsts]
    for i, values in enumerate(swept):
        jobs += [fixed + firsts[:i] + [v] + firsts[i + 1:] for v in values[1:]]
    return jobs


def _argv_value(argv: list[str], key: str) -> str | None:
    return next((a.partition("=")[2] for a in argv if a.lstrip("+~").partition("=")[0] == key), None)


def is_optuna_sweep(argv: list[str]) -> bool:
    """Whether the command line picks an Optuna sweeper (Hydra's `optuna` preset or runx's `runx_optuna`)."""
    return "optuna" in (_argv_value(argv, "hydra/sweeper") or "")


def sweeper_problems(argv: list[str]) -> list[str]:
    """An Optuna sweep needs each job to return a number, objective=<final metric>, and a direction that is
    one of Optuna's."""
    sweeper = _argv_value(argv, "hydra/sweeper") or ""
    objective = _argv_value(argv, "objective")
    direction = _argv_value(argv, "hydra.sweeper.direction")
    if not is_optuna_sweep(argv):
        return []
    if objective in (None, "", "null"):
        return [f"hydra/sweeper={sweeper}: each trial returns the run's final `objective` metric, and none is set. "
                "Add objective=<metric>, e.g. objective=eval/accuracy (maximised), or objective=final_loss "
                "(minimised)."]
    if direction is not None and direction not in ("maximize", "minimize"):
        return [f"hydra.sweeper.direction={direction}: not an Optuna direction. Valid choices: maximize, minimize."]
    return []


def optuna_direction_override(argv: list[str]) -> str | None:
    """For an Optuna sweep that names no direction: hydra.sweeper.direction=<what the objective wants>.

    Hydra's optuna sweeper minimises by default, which would pick the worst trial for objective=eval/accuracy;
    the runx_optuna preset's default (maximize) would do the same for a loss."""
    if not is_optuna_sweep(argv) or _argv_value(argv, "hydra.sweeper.direction"):
        return None
    objective = _argv_value(argv, "objective")
    return f"hydra.sweeper.direction={objective_direction(objective)}" if objective else None


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"
