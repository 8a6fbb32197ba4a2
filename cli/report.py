"""`runx report <dir>`: one table for a run or a whole sweep, plus PNG plots.

A run dir holds config.yaml + summary.json + metrics.jsonl; a sweep dir holds run dirs (one per job).
The table shows the config keys that differ between runs and the final metrics, sorted by the objective.
"""
from __future__ import annotations

import json
import os


def find_runs(root: str) -> list[str]:
    """Run folders under root (symlinked ones too); a job that failed before its first step (config.yaml, no
    metrics) is a run as well, listed as failed."""
    runs = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # (a sweep job stopped by a config problem before runx wrote config.yaml: Hydra's copy and train.log)
        stopped_early = "train.log" in filenames and os.path.isfile(os.path.join(dirpath, ".hydra", "config.yaml"))
        if "config.yaml" in filenames and ({"summary.json", "metrics.jsonl", "env.json"} & set(filenames)) \
                or stopped_early:
            runs.append(dirpath)
            dirnames[:] = []  # a run's own subfolders are not runs
        else:
            dirnames[:] = sorted(d for d in dirnames if d not in ("ckpt", "wandb", "export", ".hydra", ".runx"))
    return sorted(runs, key=lambda p: (len(p), p))


def sweep_direction(root: str, objective: str) -> str:
    """The direction an Optuna sweep under `root` ran with, else the objective's usual one. Hydra's basic sweeper
    writes the sweep's multirun.yaml; the Optuna sweeper writes none, so its jobs' own .hydra/hydra.yaml say."""
    from runx.cli.config import objective_direction
    paths = [os.path.join(root, "multirun.yaml")] + [os.path.join(r, ".hydra", "hydra.yaml") for r in find_runs(root)]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is not None:
        from omegaconf import OmegaConf
        hcfg = OmegaConf.load(path).get("hydra", {})
        direction = OmegaConf.select(hcfg, "sweeper.direction", default=None) if hcfg else None
        if "optuna" in str(OmegaConf.select(hcfg, "sweeper._target_", default="")).lower() and \
                direction in ("maximize", "minimize"):
            return direction
    return objective_direction(objective)


def _end_of(run: str) -> str:
    """How a run that is not running ended, from its train.log: crashed (an exception), or stopped (a signal,
    a checkpoint saved; or killed with no word)."""
    path = os.path.join(run, "train.log")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 20000))
            tail = f.read().decode(errors="replace")
    except OSError:
        return "stopped"
    failed = max(tail.rfind("the run failed"), tail.rfind("rank 0 failed"))
    stopped = tail.rfind("stopped by")
    return "crashed" if failed > stopped else "stopped"


def _in_use(run: str) -> bool:
    """Whether a runx process holds the run dir's lock now (a run still training, not one stopped or crashed)."""
    import fcntl
    path = os.path.join(run, ".runx", "runx.lock")
    if not os.path.exists(path):
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def collect(root: str) -> tuple[list[dict], list[str]]:
    """Rows of {run, config..., metrics...} and the config keys that differ across runs."""
    from omegaconf import OmegaConf

    from runx.trainers.tracking import read_metrics, read_summary
    rows, configs = [], []
    for run in find_runs(root):
        own = os.path.join(run, "config.yaml")
        cfg = _flatten(OmegaConf.to_container(OmegaConf.load(own if os.path.exists(own) else
                                                             os.path.join(run, ".hydra", "config.yaml"))))
        summary = read_summary(run)
        status = "done" if "diverged_at" not in summary else f"diverged at step {summary['diverged_at']}"
        if not summary:  # a run that did not finish: the latest value of each metric it logged
            hist = read_metrics(run)
            summary = {k: v for rec in hist for k, v in rec.items()}
            status = ("running" if _in_use(run) else _end_of(run)) if hist else \
                ("config problem" if not os.path.exists(own) else "failed")
        rows.append({"run": os.path.relpath(run, root) or ".", "_cfg": cfg, "_path": run, "_status": status,
                     **summary})
        configs.append(cfg)
    # keys every run has (a recipe's own keys differ in name, not value, between recipes: recipe.name shows it)
    keys = sorted(set.intersection(*(set(c) for c in configs))) if configs else []
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1
               and not k.startswith(("run_dir", "trainer.nvme_path"))]
    return rows, varying


# final metrics the table shows when present (the objective and any metric a data job reports come on top)
COL_MIN = 5   # characters a table column needs to stay readable
SHOWN_METRICS = ("final_loss", "eval/loss", "eval/accuracy", "steps", "samples_per_s", "train_wall_s", "peak_mem_gb")


def headline_metrics(rows: list[dict]) -> list[str]:
    """The first two evaluation metrics each run's recipe lists (RecipeInfo.eval_metrics), as eval/<name>:
    VeriFree's eval/acc, SwAV's eval/knn_acc, which the generic list above does not name."""
    from runx.recipes import RECIPES
    out: list[str] = []
    for r in rows:
        info = RECIPES.get(str(r["_cfg"].get("recipe.name")))
        for m in (info.eval_metrics[:2] if info else ()):
            if f"eval/{m}" not in out:
                out.append(f"eval/{m}")
    return out


def report(root: str, objective: str | None = None, minimize: bool | None = None, plots: bool = True) -> int:
    """The table (and plots) of a run or a sweep, sorted by `objective`: minimized or maximized as `minimize`
    says, else as the sweep ran (Optuna's direction), else by the metric's kind (losses down, accuracy up)."""
    from rich.console import Console
    from rich.table import Table
    rows, varying = collect(root)
    if not rows:
        print(f"runx report: no runs under {root} (a run dir has config.yaml and summary.json)")
        return 1
    metric_keys = sorted({k for r in rows for k, v in r.items() if not k.startswith("_") and k != "run"
                          and isinstance(v, (int, float))})
    if objective is not None and objective not in metric_keys:
        print(f"runx report: --objective {objective}: no run under {root} has that final metric. Valid choices: "
              f"{', '.join(metric_keys) or 'none'}.")
        return 2
    headline = headline_metrics(rows)
    if objective is None:
        # the sweep's own objective (objective=<metric> in the runs' config), else a sensible default
        declared = {r["_cfg"].get("objective") for r in rows} - {None}
        objective = declared.pop() if len(declared) == 1 and next(iter(declared)) in metric_keys else \
            next((k for k in ("eval/accuracy", *headline, "eval/loss", "final_loss")
                  if k in metric_keys), None)
    if minimize is None:
        minimize = bool(objective) and sweep_direction(root, objective) == "minimize"
    if objective:
        def rank(r):   # missing, NaN and non-numbers last (NaN compares false with all: the sort was arbitrary)
            v = r.get(objective)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
            return (0, v if minimize else -v) if ok else (1, 0)
        rows.sort(key=rank)
    trained = any("steps" in r for r in rows)
    # data jobs: their own metrics, those every finished run has (two data recipes share few)
    done = [set(r) for r in rows if r["_status"] == "done"]
    common = set.intersection(*done) if done else set()   # (a sweep whose every job failed has none)
    shown = [k for k in metric_keys if k == objective or k in SHOWN_METRICS or k in headline or k.startswith("best/")
             or k in ("best_step", "early_stopped_at") or not trained and k in common]
    console, note = Console(), ""
    t = Table(title=f"runx report — {root} ({len(rows)} run{'s' if len(rows) != 1 else ''})", header_style="bold")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    arrow = lambda k: " ↓" if k == objective and minimize else " ↑" if k == objective else ""
    failed = any(r["_status"] != "done" for r in rows)
    if len(rows) == 1:   # one run: a metric per line (a data job reports a dozen, too many for columns)
        t.add_column("metric")
        t.add_column("value", justify="right", overflow="fold")
        for k, v in [("status", rows[0]["_status"])] * failed + [(k + arrow(k), fmt(rows[0].get(k, ""))) for k in shown]:
            t.add_row(k, v)
    else:
        # narrow terminals: fold long names and values onto several lines instead of cutting them to "0.000…";
        # columns that would not get COL_MIN characters each (runs of several recipes differ in dozens of keys)
        # become one "config" column of key=value lines, and beyond that only the first metrics are shown
        merged = (1 + failed + len(varying) + len(shown)) * (COL_MIN + 3) > console.width
        config_width = min(28, console.width // 2)
        if merged:   # the run column 14 characters at most; a run's status goes into its config cell
            order = sorted(shown, key=lambda k: k != objective)   # the objective first, then as listed
            used, keep = 1 + (14 + 3) + (config_width + 3), []
            for k in order:   # as many whole metric columns as fit beside them (headers do not fold)
                w = max(len(k + arrow(k)), 8) + 3
                if keep and used + w > console.width:
                    break
                keep.append(k)
                used += w
            left_out = len(shown) - len(keep)
            shown = [k for k in shown if k in keep]
            if left_out > 0:   # printed whole below the table (a path folded into the table's width breaks)
                note = f"{left_out} more metric{'s' * (left_out > 1)} in {os.path.join(root, 'report.json')}"
        t.add_column("run", overflow="fold", max_width=14 if merged else None)
        if failed and not merged:
            t.add_column("status")
        if merged:
            t.add_column("config", overflow="fold", min_width=config_width)
        else:
            for k in varying:
                t.add_column(k, overflow="fold")
        for k in shown:
            t.add_column(k + arrow(k), justify="right", overflow="fold")
        for r in rows:
            cfg = [(k, fmt(r["_cfg"].get(k))) for k in varying]
            if merged:
                lines = ([f"status={r['_status']}"] if failed else []) + [f"{k}={v}" for k, v in cfg]
                cells = [r["run"], "\n".join(lines)]
            else:
                cells = [r["run"]] + ([r["_status"]] if failed else []) + [v for _, v in cfg]
            cells += [fmt(r.get(k, "")) for k in shown]
            t.add_row(*cells)
    console.print(t)
    if note:
        console.print(note, soft_wrap=True)
    def plain(v):   # strict JSON: a NaN / inf metric (a diverged run) is null
        return None if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))) else v
    table_rows = [{"run": r["run"], "status": r["_status"], **{k: r["_cfg"].get(k) for k in varying},
                   **{k: plain(r.get(k)) for k in metric_keys}} for r in rows]
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump({"objective": objective, "minimize": minimize, "varying": varying, "rows": table_rows}, f,
                  indent=2, default=str)
    written = make_plots(root, rows, varying, objective) if plots else []
    for path in written:
        print(f"wrote {path}")
    url = log_to_wandb(root, table_rows, written)
    if url:
        print(f"logged to W&B: {url}")
    return 0


def log_to_wandb(root: str, table_rows: list[dict], images: list[str]) -> str | None:
    """The table and plots as one W&B run (job_type=report) when W&B is online (WANDB_API_KEY set and
    WANDB_MODE not offline/disabled); nothing otherwise."""
    if not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "online") in ("offline", "disabled"):
        return None
    import wandb

    from runx.trainers.tracking import wandb_unreachable
    base, why = wandb_unreachable()
    if why is not None:
        print(f"runx report: W&B ({base}) cannot be reached ({why}): the report is not logged there")
        return None
    cols = sorted({k for r in table_rows for k in r}, key=lambda k: (k != "run", k))
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "runx"), job_type="report",
                     name=f"report-{os.path.basename(os.path.abspath(root))}", dir=root,
                     settings=wandb.Settings(silent=True, console="off"))
    run.log({"report": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in table_rows]),
             **{os.path.basename(p)[:-4]: wandb.Image(p) for p in images}})
    url = run.url
    run.finish()
    return url


def make_plots(root: str, rows: list[dict], varying: list[str], objective: str | None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runx.trainers.tracking import read_metrics
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        hist = read_metrics(r["_path"])
        label = r["run"] if not varying else ", ".join(f"{k.split('.')[-1]}={r['_cfg'].get(k)}" for k in varying)
        steps = [h["step"] for h in hist if "loss" in h]
        axes[0].plot(steps, [h["loss"] for h in hist if "loss" in h], label=label)
        ev = [(h["step"], h[objective]) for h in hist if objective and objective in h]
        if ev:
            axes[1].plot(*zip(*ev), marker="o", label=label)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].set(title=objective or "objective", xlabel="step")
    if len(rows) <= 12:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(root, "report_curves.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    if objective and varying:
        numeric = [k for k in varying if all(isinstance(r["_cfg"].get(k), (int, float)) for r in rows)]
        if numeric:
            fig, axes = plt.subplots(1, len(numeric), figsize=(4.5 * len(numeric), 3.6), squeeze=False)
            for ax, k in zip(axes[0], numeric):
                pts = sorted((r["_cfg"][k], r[objective]) for r in rows if objective in r)
                ax.scatter(*zip(*pts)) if pts else None
                ax.set(xlabel=k, ylabel=objective)
                if pts and min(p[0] for p in pts) > 0 and max(p[0] for p in pts) / min(p[0] for p in pts) > 20:
                    ax.set_xscale("log")
            fig.tight_layout()
            p = os.path.join(root, "report_sweep.png")
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(p)
    return written
