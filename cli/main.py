"""`runx <verb> ...`: the dispatcher. Heavy libraries are imported inside the verbs that need them, so
`runx --help` answers at once.
"""
from __future__ import annotations

import contextlib
import os
import sys

USAGE = """\
runx — an experiment runner for compute-efficient ML research (Hydra + DeepSpeed).

usage: runx <verb> [hydra overrides] [options]

verbs:
  train [overrides] [-m]      run a recipe (Hydra app; -m sweeps, --cfg job prints the config)
  ls [group]                  recipes (default) or the options of a config group
  show [overrides]            the resolved config
  validate [overrides] [--all]  check a config (all problems at once); --all: every recipe
  plan [overrides]            memory needed per ZeRO config on GPU / CPU / NVMe, and what fits
  report <dir> [--objective KEY] [--minimize|--maximize]  table + plots for a run or a sweep
  export <run_dir> [--out DIR] [--tag step_N|best]  HF safetensors / PEFT adapter from a checkpoint
  eval <run_dir> [--tag step_N|best] [data.* overrides]  a checkpoint evaluated again (other data too)

config groups: recipe model data trainer logger launcher debug experiment
examples:
  runx train                                  # default job: MiniLM fine-tune on stdlib_topics, CPU, ~2 min
  runx train recipe=lora_ga trainer=zero3 optim.lr=2e-4
  runx train -m recipe=lora optim.lr=1e-4,1e-3 seed=0,1
  runx train recipe=sft trainer.num_procs=2 trainer=zero3
"""


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):   # a redirected log (SLURM, nohup) gets each line as it is printed
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    verb, rest = argv[0], argv[1:]
    verbs = {"train": _train, "ls": _ls, "show": _show, "validate": _validate, "plan": _plan,
             "report": _report, "export": _export, "eval": _eval}
    if verb not in verbs:
        print(f"runx: unknown verb {verb!r}. Valid verbs: {', '.join(verbs)}.\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    _find_hydra_plugins()   # before anything composes: Hydra scans its plugins once
    from runx.trainers.console import quiet_warnings
    quiet_warnings()
    try:
        return int(verbs[verb](rest) or 0)
    except KeyboardInterrupt:
        hint = None
        if verb == "train":
            from runx.cli import train
            hint = train.INTERRUPTED_HINT or "rerun with the same run_dir and resume=auto, the default, to resume"
        print("runx: interrupted" + (f" (the last complete checkpoint is kept; {hint})" if hint else ""),
              file=sys.stderr)
        return 130


def _fail(problems: list[str]) -> int:
    from runx.cli.config import format_problems
    print(format_problems(problems), file=sys.stderr)
    return 2


def _compose_validated(overrides: list[str]):
    """(config, every problem). Hydra stops at its first bad override: each one it refuses (an unknown key, a
    config group option that does not exist) is set aside and the rest composed again, so that the problems of
    all of them, and of the values of the others, are reported at once. Not past a bad recipe= or experiment=,
    which decide what the other keys mean."""
    from runx.cli.config import ConfigError, check_paths, compose, validate
    problems: list[str] = []
    remaining = list(overrides)
    dropped_groups: set = set()
    while True:
        try:
            cfg = compose(remaining)
            break
        except ConfigError as e:
            problems += [p for p in e.problems if p not in problems]
            keys = {p.partition("=")[0] for p in e.problems}
            culprits = [o for o in remaining if o.lstrip("+~").partition("=")[0] in keys]
            if not culprits or keys & {"recipe", "experiment"}:
                return None, problems
            remaining = [o for o in remaining if o not in culprits]
            dropped_groups |= {k for k in keys if "." not in k}
    found = validate(cfg) + check_paths(cfg)
    # (not the keys of a group whose option was refused: its default stood in for it)
    found = [p for p in found if p not in problems and not p.startswith(tuple(g + "." for g in dropped_groups))]
    return (None if problems else cfg), problems + found


# ------------------------------------------------------------------------------------------ train
def _train(rest: list[str]) -> int:
    from runx.cli.config import _check_group_overrides, hydra_argv_overrides, sweeper_problems
    flags = {a for a in rest if a.startswith("-")}
    multirun = bool(flags & {"-m", "--multirun"})
    passthrough = bool(flags & {"--cfg", "-c", "--help", "-h", "--info", "--hydra-help", "--resolve"})
    overrides = hydra_argv_overrides(rest)
    printing = bool(flags & {"--cfg", "-c", "--resolve"}) and not bool(flags & {"--help", "-h", "--hydra-help"})
    if not multirun and (not passthrough or printing):
        cfg, problems = _compose_validated(overrides)  # fail fast, before any heavy import
        if problems:
            return _fail(problems)
        if not passthrough:
            problems = _hold_pinned_run_dir(cfg)
            if problems:
                return _fail(problems)
        flag = next((a for a in ("--cfg", "-c") if a in rest), None)
        if printing and flag and rest.index(flag) + 1 < len(rest) and rest[rest.index(flag) + 1] == "job":
            from omegaconf import OmegaConf   # the job's config as it runs: with the recipe schema's defaults
            print(OmegaConf.to_yaml(cfg, resolve="--resolve" in rest), end="")
            return 0
    elif multirun:
        if flags & {"--cfg", "-c"}:   # (Hydra's ValueError traceback: only one of --run, --multirun, --cfg ...)
            print("runx train: --cfg prints one run's config and -m runs a sweep: give one of them. A sweep job's "
                  "config: `runx train --cfg job <that job's values>`, or `runx show <overrides>`.", file=sys.stderr)
            return 2
        problems = _check_group_overrides(overrides) or sweeper_problems(rest) or _sweep_problems(overrides)
        if problems:
            return _fail(problems)
    if multirun and not passthrough:
        rest = rest + _claimed_sweep_dir(overrides, [a for a in rest if a.lstrip("+~").startswith("hydra")])
    from runx.cli.train import hydra_main
    from runx.cli.config import is_optuna_sweep, normalize_recipe_overrides, optuna_direction_override
    direction = optuna_direction_override(rest) if multirun else None
    if direction:
        print(f"runx: Optuna {direction.rpartition('=')[2]}s the objective ({direction})", file=sys.stderr)
    sys.argv = ["runx train"] + normalize_recipe_overrides(rest) + ([direction] if direction else [])
    from runx.cli import train
    optuna = multirun and is_optuna_sweep(rest)
    from runx.trainers.tracking import RedactingStream
    stderr, sys.stderr = sys.stderr, RedactingStream(sys.stderr)
    try:
        with train.optuna_sweeps_end_cleanly() if optuna else contextlib.nullcontext():
            hydra_main()
        code = train.LAST_EXIT_CODE
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.stderr = stderr
    # jobs that ran elsewhere (submitit): from their dirs; not for a sweep stopped by a signal (the job it stopped
    # read as "failed: running", its own lock still held by this process), which said how to resume it
    if multirun and code not in (0, 143) and not train.SWEEP_FAILURES:
        train.SWEEP_FAILURES.extend(train.failed_jobs_on_disk())
    if multirun and train.SWEEP_FAILURES:
        failed = sorted(train.SWEEP_FAILURES)
        print(f"runx: {len(failed)} job(s) of the sweep failed:", file=sys.stderr)
        for num, why, run_dir in failed:
            print(f"  #{num} {why}: {run_dir}", file=sys.stderr)
        code = code or 1   # also where the sweeper went on past them (Optuna) with jobs in other processes
        if code == 1 and all(why == "config problem" for _, why, _ in failed):
            code = 2    # what a single run with that config problem exits with
    return code


def _sweep_problems(overrides: list[str]) -> list[str]:
    """Every job of a sweep composed and validated before the first one starts (a bad value in the 15th job
    would otherwise surface after 14 runs). Paths are left to each job (a SLURM job checks them on its node), but
    for run_dir=<path>: the sweep's own folder, which this process makes."""
    from runx.cli.config import ConfigError, compose, run_dir_problems, sweep_jobs, validate
    from hydra.errors import HydraException
    try:
        jobs = sweep_jobs(overrides)
    except HydraException as e:
        return [f"cannot parse the sweep: {e}"]
    problems: list[str] = []
    for i, job in enumerate(jobs):
        try:
            cfg = compose(job)
            found = validate(cfg) + (run_dir_problems(cfg) if i == 0 else [])   # (the sweep's folder)
        except ConfigError as e:
            found = e.problems
        for p in found:   # an unknown key is one problem, whatever values the sweep gives it
            unknown_key = "is not a key of" in p and any(q.partition("=")[0] == p.partition("=")[0] and
                                                         "is not a key of" in q for q in problems)
            if p not in problems and not unknown_key:
                problems.append(p)
    return problems


def _hold_pinned_run_dir(cfg) -> list[str]:
    """A single run into a given run_dir= takes the folder's lock before Hydra starts: refused later (in use by a
    run still going), it had already written its .hydra/ files over that run's and its refusal into its train.log.
    (Where one folder is shared on purpose, a SLURM array's data job, or the step-shape check must speak first,
    the lock is left to the launch.)"""
    if not cfg.get("run_dir") or os.environ.get("RUNX_WORKER") == "1":
        return []
    from runx.cli.train import hold_run_dir, multi_node, run_dir_lock_name, slurm_step_problem
    from runx.recipes import RECIPES
    from runx.trainers.datajob import slurm_array_task
    from runx.trainers.recipe import RecipeConfigError
    train = RECIPES[cfg.recipe.name].kind == "train"
    if train and (slurm_step_problem(cfg) or multi_node(cfg)) or not train and slurm_array_task()[1] > 1:
        return []
    try:
        hold_run_dir(os.path.abspath(os.path.expanduser(str(cfg.run_dir))), run_dir_lock_name(cfg))
    except RecipeConfigError as e:
        return [str(e)]
    return []


def _claimed_sweep_dir(overrides: list[str], hydra_overrides: list[str] = ()) -> list[str]:
    """`hydra.sweep.dir=<folder>` for a sweep whose folder is the default one (no run_dir=, no hydra.sweep.dir on
    the command line or in an experiment file): its dated folder (multirun/<date>/<time>-<recipe>), made here, or
    <folder>-2, -3, ... where another sweep took that name in the same second (two sweeps started together by a
    script shared one folder, and each job resumed the other sweep's job of the same number). Passed on as a
    value, not left to the config's `${now:...}`: each job of a submitit sweep resolves its config again, in its
    own process."""
    from omegaconf import OmegaConf

    from runx.cli.config import compose, sweep_jobs
    from runx.conf import _new_run_dir, _sweep_name
    try:
        cfg = compose(sweep_jobs(overrides)[0] + list(hydra_overrides), return_hydra_config=True)
        folder = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["dir"]
    except Exception:   # (the sweep's checks above have reported what they could)
        return []
    if cfg.get("run_dir") or not str(folder).startswith("${runx_first:${run_dir},multirun/"):
        return []
    import time
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    folder = _new_run_dir(None, f"multirun/{stamp}-{_sweep_name(cfg.recipe.name)}")
    return [f"hydra.sweep.dir='{folder}'"]


def _find_hydra_plugins() -> None:
    """Editable installs map runx.* by path; make Hydra's plugin namespace see runx's launcher too."""
    try:
        import hydra_plugins
        import runx.cli
        src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(runx.cli.__file__))), "hydra_plugins")
        if os.path.isdir(os.path.join(src, "runx_launcher")) and src not in list(hydra_plugins.__path__):
            hydra_plugins.__path__.append(src)
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------ ls / show / validate
def _ls(rest: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from runx.cli.config import GROUPS, group_description, group_options
    from runx.recipes import RECIPES
    con = Console()
    group = rest[0] if rest else "recipe"
    if group not in GROUPS:
        print(f"runx ls: unknown group {group!r}. Valid groups: {', '.join(GROUPS)}.", file=sys.stderr)
        return 2
    if group == "recipe":
        t = Table(title="runx recipes", header_style="bold")
        for col in ("recipe", "kind", "description", "paper"):
            t.add_column(col)
        for r in RECIPES.values():
            t.add_row(r.name, r.kind, r.description, r.paper)
    else:
        t = Table(title=f"config group '{group}'", header_style="bold")
        t.add_column("option")
        t.add_column("description")
        for opt in group_options(group):
            t.add_row(opt, group_description(group, opt))
    con.print(t)
    return 0


def _show(rest: list[str]) -> int:
    from omegaconf import OmegaConf
    cfg, problems = _compose_validated([a for a in rest if not a.startswith("-")])
    if cfg is None:
        return _fail(problems)
    if "--help" in rest or "-h" in rest:
        print("usage: runx show [overrides] [--raw]   the composed config, resolved (--raw: interpolations as "
              "written)")
        return 0
    try:       # resolved unless asked otherwise; a required value not given leaves it unresolved (and reported)
        text = OmegaConf.to_yaml(cfg, resolve="--raw" not in rest and not problems)
    except Exception:
        text = OmegaConf.to_yaml(cfg)
    print(text)
    if problems:
        return _fail(problems)
    return 0


def _validate(rest: list[str]) -> int:
    overrides = [a for a in rest if not a.startswith("-")]
    if "--all" in rest:
        from runx.cli.config import group_options
        bad = 0
        for name in group_options("recipe"):
            _, problems = _compose_validated([f"recipe={name}"] + overrides)
            print(f"{'ok ' if not problems else 'BAD'} recipe={name}")
            for p in problems:
                print(f"    - {p}")
            bad += bool(problems)
        return 2 if bad else 0
    cfg, problems = _compose_validated(overrides)
    if problems:
        return _fail(problems)
    problems = _recipe_problems(cfg)
    if problems:
        return _fail(problems)
    from runx.recipes import RECIPES
    groups = "" if RECIPES[cfg.recipe.name].kind == "data" else \
        f" model={cfg.model.name} data={cfg.data.name} trainer={cfg.trainer.name}"
    print(f"ok: recipe={cfg.recipe.name}{groups}")
    return 0


def _recipe_problems(cfg) -> list[str]:
    """The recipe's own checks (its constructor: cross-key checks, input listings, tokenizer, data fields where
    it reads them), as `runx train` runs them first; nothing is trained or written outside a temp folder."""
    import tempfile

    from runx.recipes import RECIPES
    from runx.trainers.recipe import RecipeConfigError, build_recipe
    from runx.trainers.console import quiet_libraries
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="runx_validate_") as tmp:
        try:
            build_recipe(RECIPES[cfg.recipe.name].load(), cfg, tmp)
        except RecipeConfigError as e:   # a recipe's list of problems ("...:\n  - a\n  - b") counts as each
            return str(e).split("\n  - ")[1:] or [str(e)]
    return []


# ------------------------------------------------------------------------------------------ plan / report / export
def _plan(rest: list[str]) -> int:
    cfg, problems = _compose_validated([a for a in rest if not a.startswith("-")])
    if problems:
        return _fail(problems)
    from runx.recipes import RECIPES
    if RECIPES[cfg.recipe.name].kind == "data":
        problems = _recipe_problems(cfg)   # its own config problems first, as for a training recipe
        if problems:
            return _fail(problems)
        print(f"runx plan: recipe={cfg.recipe.name} is a data job: no model on DeepSpeed to place, its shards run "
              f"in recipe.num_workers={cfg.recipe.get('num_workers')} processes on this machine. runx plan sizes "
              f"the training recipes: {', '.join(r for r, i in RECIPES.items() if i.kind == 'train')}.",
              file=sys.stderr)
        return 2
    from runx.trainers.plan import plan_and_print
    from runx.trainers.recipe import RecipeConfigError
    try:
        return plan_and_print(cfg, out_dir=cfg.run_dir)
    except RecipeConfigError as e:
        return _fail([str(e)])


def _report(rest: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="runx report")
    p.add_argument("dir")
    p.add_argument("--objective", default=None)
    way = p.add_mutually_exclusive_group()   # neither: the sweep's own direction, else the objective's kind
    way.add_argument("--minimize", dest="minimize", action="store_const", const=True, default=None)
    way.add_argument("--maximize", dest="minimize", action="store_const", const=False)
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(rest)
    from runx.cli.report import report
    return report(a.dir, objective=a.objective, minimize=a.minimize, plots=not a.no_plots)


def _export(rest: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="runx export")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None,
                   help="checkpoint tag: step_N, or best (trainer.monitor's best; default: latest)")
    a = p.parse_args(rest)
    from runx.cli.export import ExportError, export_run
    from runx.trainers.console import quiet_libraries
    quiet_libraries()   # e.g. transformers' load report calling the head, loaded from the checkpoint after, missing
    try:
        out = export_run(a.run_dir, a.out, a.tag)
    except ExportError as e:
        print(f"runx export: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


def _eval(rest: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="runx eval", description="Evaluate a training run's checkpoint again, on its "
                                "held-out data or on other data (data.eval_path=..., data.* overrides).")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="data.* / trainer.micro_batch_size / trainer.device overrides")
    p.add_argument("--tag", default=None,
                   help="checkpoint tag: step_N, or best (trainer.monitor's best; default: latest)")
    p.add_argument("--out", default=None,
                   help="result file, or a folder for it (default: <run_dir>/eval/<tag>[-<hash>].json)")
    a = p.parse_intermixed_args(rest)
    from runx.cli.evaluate import EvalError, evaluate_run, print_result
    from runx.trainers.console import quiet_libraries
    quiet_libraries()
    from runx.cli.export import ExportError
    try:
        out, record = evaluate_run(a.run_dir, a.tag, a.overrides, a.out)
    except (EvalError, ExportError) as e:
        print(f"runx eval: {e}", file=sys.stderr)
        return 2
    print_result(a.run_dir, out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
