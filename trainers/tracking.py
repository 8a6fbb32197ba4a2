"""Where a run's results go: the run directory, metrics.jsonl, W&B, and the rich console.

Run dir layout:
  config.yaml      the resolved config (secrets redacted)   env.json     git sha, versions, host, command
  metrics.jsonl    one JSON object per logged step          summary.json final metrics
  ckpt/            DeepSpeed checkpoints step_N + `latest`  export/      HF / PEFT weights
  wandb/           the W&B run (offline unless a key is set)
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
import uuid

from runx.trainers.datajob import atomic_write_bytes, atomic_write_json

SECRET_KEY = re.compile(r"(api[_-]?key|(^|_)token$|secret|password|passwd)", re.I)


def is_secret(key, value) -> bool:
    """A config value shown as *** wherever runx writes or prints it: a secret-named key's (the last part of a
    dotted one), unless empty."""
    return bool(SECRET_KEY.search(str(key).rsplit(".", 1)[-1])) and value not in (None, "")


def redact(obj, args: bool = False):
    """A config with the values of secret-named keys replaced by ***; `args`: also `key=value` override strings
    (Hydra's overrides lists)."""
    if isinstance(obj, dict):
        return {k: "***" if is_secret(k, v) else redact(v, args) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, args) for v in obj]
    return redact_arg(obj) if args and isinstance(obj, str) else obj


_INNER_KEY = re.compile(r"([A-Za-z0-9_\-]+)\s*:")


def redact_arg(arg: str) -> str:
    """A command-line `key=value` override with a secret key's value replaced (++logger.api_key=x -> ...=***),
    also where the value is a dict holding one (data.extra={token: x}, ds_overrides.comet={api_key: x})."""
    key, eq, value = str(arg).partition("=")
    leaf = key.lstrip("+~").rsplit(".", 1)[-1]
    inner = value.lstrip().startswith(("{", "[")) and any(SECRET_KEY.search(k) for k in _INNER_KEY.findall(value))
    return f"{key}=***" if eq and value and (SECRET_KEY.search(leaf) or inner) else arg


# an override inside a line of text: key=value, the value a {...} / [...] (one level of nesting) or a word (up to
# a quote or comma: a Python list's repr)
_OVERRIDE = re.compile(r"([+~]*[\w.\-/@]+=)(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}|\[[^\[\]]*\]|[^\s'\",]*)")


def redact_text(text: str) -> str:
    """Every `key=value` override in a line of text through redact_arg."""
    return _OVERRIDE.sub(lambda m: redact_arg(m.group(1) + m.group(2)), text)


class RedactingStream:
    """A text stream whose writes go through redact_text where they name a secret-like key: Hydra writes a failed
    sweep job's overrides straight to sys.stderr ("Error executing job with overrides: [...]")."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(redact_text(text) if isinstance(text, str) and SECRET_KEY.search(text) else text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def redact_hydra_outputs(run_dir: str, sweep_dir: str | None = None) -> None:
    """Hydra's own copies of the job's config and overrides (<run_dir>/.hydra/*.yaml, beside config.yaml, and a
    sweep's multirun.yaml) with the secrets redacted as in config.yaml: they held them in clear."""
    import yaml
    paths = [os.path.join(run_dir, ".hydra", n) for n in ("config.yaml", "overrides.yaml", "hydra.yaml")]
    for path in paths + ([os.path.join(sweep_dir, "multirun.yaml")] if sweep_dir else []):
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            data = yaml.safe_load(f)
        cleaned = redact(data, args=True)
        if cleaned != data:
            atomic_write_bytes(path, yaml.safe_dump(cleaned, sort_keys=False).encode())


def save_resolved_config(cfg, path: str, redacted: bool = True) -> None:
    """The resolved config; redacted for the run dir, unredacted (mode 0600) for worker processes."""
    from omegaconf import OmegaConf
    data = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.create(redact(data) if redacted else data)).encode())
    if not redacted:
        os.chmod(path, 0o600)


def environment_record() -> dict:
    """git sha (and whether the tree had changes) of runx's own checkout where it runs from one (an editable
    install), else of the repository runx was started in (a project using an installed runx); versions, host,
    the redacted command line. Outside any repository git_sha / git_dirty are null (they read as "" and clean)."""
    def git(*args, where=None):
        try:
            p = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                               cwd=where or os.path.dirname(os.path.abspath(__file__)))
            return p.stdout.strip() if p.returncode == 0 else ""
        except Exception:
            return ""
    repo = git("rev-parse", "--show-toplevel") or git("rev-parse", "--show-toplevel", where=os.getcwd())
    versions = {}
    from importlib import metadata
    for pkg in ["runx", "torch", "deepspeed", "transformers", "peft", "accelerate", "hydra-core", "wandb",
                "triton", "faiss-cpu", "torchvision", "datasets", "fasttext-numpy2-wheel"]:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    sha = git("rev-parse", "HEAD", where=repo) if repo else ""
    rec = {"git_sha": sha or None, "git_dirty": bool(git("status", "--porcelain", where=repo)) if sha else None,
           "git_repo": repo or None,
           "python": sys.version.split()[0], "platform": platform.platform(), "host": platform.node(),
           "argv": [redact_arg(a) for a in sys.argv], "versions": versions, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import torch
        if torch.cuda.is_available():
            rec["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return rec


class MetricsLog:
    """Append-only metrics.jsonl. On resume, lines past the resumed step are dropped first.

    Lines reach the file at most `flush_every_s` after they are logged, also when no line follows for a while
    (an eval, a long rollout): a daemon thread flushes what is pending. The trainer also flushes before every
    checkpoint, so a kill loses only lines that the resumed run logs again."""

    def __init__(self, path: str, resume_step: int | None = None, flush_every_s: float = 1.0):
        import threading
        self.path = path
        self.flush_every_s = flush_every_s
        self._flushed_at = 0.0
        self._lock, self._pending, self._closed = threading.Lock(), False, threading.Event()
        if resume_step is not None and os.path.exists(path):
            keep = []
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if rec.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            atomic_write_bytes(path, "".join(keep).encode())
        self.f = open(path, "a")
        threading.Thread(target=self._flush_pending, name="runx-metrics-flush", daemon=True).start()

    def log(self, rec: dict) -> None:
        with self._lock:
            self.f.write(json.dumps(rec, default=float) + "\n")
            self._pending = True
        now = time.monotonic()
        if now - self._flushed_at >= self.flush_every_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        with self._lock:
            if not self.f.closed:
                self.f.flush()
            self._pending = False
        self._flushed_at = time.monotonic() if now is None else now

    def _flush_pending(self) -> None:
        while not self._closed.wait(self.flush_every_s):
            if self._pending:
                self.flush()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self.f.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def wandb_unreachable() -> tuple[str, str | None]:
    """(the W&B server's URL, why it does not answer, or None). Checked before an online wandb.init, which would
    retry ~90 s against an unreachable server and then raise."""
    import wandb

    from runx.trainers.runtime import unreachable
    base = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    return base, unreachable(base)


SWEEP_MARK = ".runx_sweep"   # an empty file runx leaves in a sweep's folder when the sweep starts


def sweep_of(run_dir: str) -> str | None:
    """The sweep folder's name for a sweep job's run dir (<sweep folder>/<job number>, beside the mark runx leaves
    there or Hydra's multirun.yaml), else None. A sweep's W&B runs were all named 0, 1, 2 ... with no group: every
    sweep of a project gave the same names and nothing tied one sweep's runs together."""
    run = os.path.abspath(run_dir).rstrip("/")
    parent = os.path.dirname(run)
    if os.path.basename(run).isdigit() and any(os.path.exists(os.path.join(parent, m))
                                               for m in (SWEEP_MARK, "multirun.yaml")):
        return os.path.basename(parent)
    return None


class WandbRun:
    """W&B through the wandb package. mode=auto: WANDB_MODE where it is set, else online iff WANDB_API_KEY is set,
    else offline."""

    def __init__(self, lcfg, cfg, run_dir: str, run_name: str, resumed: bool = True):
        """`resumed`: the run continues the one that wrote run_dir's W&B id (a training run resumed from its
        checkpoint, a data job's rerun), whose W&B run it extends. A training run that starts at step 0 gets a
        new id: W&B would drop its steps as repeats of the old run's."""
        self.run = None
        self.mode = None
        if lcfg.backend != "wandb" or lcfg.mode == "disabled":
            return
        import wandb
        from omegaconf import OmegaConf
        mode = lcfg.mode
        env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if mode == "auto" and env_mode in ("disabled", "dryrun", "offline", "online", "run"):
            # W&B's own variable (e.g. set for every node through .deepspeed_env) decides, as in wandb.init
            mode = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
            if mode == "disabled":
                return
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode == "online":   # a W&B server that does not answer: log offline now, sync later
            base, why = wandb_unreachable()
            if why is not None:
                import logging
                logging.getLogger("runx").warning("W&B (%s) cannot be reached (%s): this run logs offline to %s; "
                                                  "upload it with the `wandb sync` command printed at the end", base,
                                                  why, os.path.join(run_dir, "wandb"))
                mode = "offline"
        id_file = os.path.join(run_dir, "wandb_run_id.txt")
        run_id = open(id_file).read().strip() if resumed and os.path.exists(id_file) else uuid.uuid4().hex[:8]
        atomic_write_bytes(id_file, run_id.encode())
        os.environ.setdefault("WANDB_SILENT", "true")
        argv, sys.argv = sys.argv, [redact_arg(a) for a in sys.argv]   # W&B records the command line
        sweep = sweep_of(run_dir)
        try:
            self.run = wandb.init(project=lcfg.project, entity=lcfg.entity,
                                  name=lcfg.name or (f"{sweep}-{run_name}" if sweep else run_name),
                                  group=lcfg.group or sweep, tags=[str(t) for t in lcfg.tags], mode=mode, id=run_id,
                                  resume="allow",
                                  dir=run_dir, config=redact(OmegaConf.to_container(cfg, resolve=True)),
                                  settings=wandb.Settings(silent=True, console="off"))
        finally:
            sys.argv = argv
        self.mode = mode

    def log(self, rec: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)

    def finish(self, summary: dict, exit_code: int = 0) -> str | None:
        """Returns the `wandb sync` command for offline runs. A second call does nothing. exit_code 1: the run
        failed (W&B marks it so)."""
        if self.run is None:
            return None
        for k, v in summary.items():
            if isinstance(v, (int, float)):
                self.run.summary[k] = v
        run_dir, run_id = self.run.dir, self.run.id
        run, self.run = self.run, None
        run.finish(exit_code=exit_code)
        if self.mode == "offline":   # a resumed run has one offline folder per segment, all with the same id
            import glob
            segments = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(run_dir)),
                                                     f"offline-run-*-{run_id}")))
            return "wandb sync " + " ".join(segments or [os.path.dirname(run_dir)])
        return None


def console():
    from runx.trainers.console import shared_console
    return shared_console()


def summary_table(title: str, rows: dict):
    from rich.table import Table
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        t.add_row(str(k), str(v))
    return t


def write_summary(run_dir: str, summary: dict) -> None:
    atomic_write_json(os.path.join(run_dir, "summary.json"), summary)


def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
