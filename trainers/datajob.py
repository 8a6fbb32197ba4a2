"""Data jobs: ordered stages that read and write shards, resumable and splittable.

A stage processes a list of shard keys. Each shard's output is written atomically and a marker
`<stage>/<key>.done.json` records it (with the shard's own numbers); a rerun skips shards whose marker
exists, so a killed job continues where it stopped and produces identical outputs (the temp files its killed
writers left are removed as each stage starts: remove_stale_temps). Shards are split
across local worker processes (`num_workers`) and across nodes / SLURM array tasks (`task_index` /
`num_tasks`, read from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT when set) by shard index.
Stages that need all shards (a global threshold, k-means) are `Stage(..., shards=lambda ctx: ["all"])`
and run on task 0 once every earlier stage is complete.

A run dir holds one job: its settings and input files (paths, sizes, mtimes) are pinned in
`<run_dir>/<job_name>_job.json`, and a rerun with other ones is refused (finished shards would be reused),
unless no shard is finished yet or `resume=never` starts the job over.

    class MyJob(DataJob):
        def stages(self):
            return [Stage("score", self.list_input_shards, self.score_shard),
                    Stage("threshold", lambda ctx: ["all"], self.compute_threshold)]
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("runx.datajob")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _new_temp_file(folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def readable_like_open(path: str) -> None:
    """Give `path` (a file, or every file under a folder) the mode open() would have: 0666 less the umask.
    Libraries that write weights (safetensors' save_file, so HF / PEFT save_pretrained too) create their files
    0600, which hides a run's exports from the user's group on a shared cluster."""
    mask = _umask()
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
    for f in files:
        if os.path.isfile(f) and not os.path.islink(f):
            os.chmod(f, 0o666 & ~mask)


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for other threads meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _new_temp_file(folder: str) -> tuple[int, str]:
    """A new, exclusively created hidden file in `folder`, with the mode open() gives (0666 less the umask):
    tempfile.mkstemp's 0600 would stay on the renamed result and hide it from the user's group."""
    while True:
        tmp = os.path.join(folder, _temp_prefix() + secrets.token_hex(6))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


# ---- temp files: ".tmp-<pid>@<machine>-<name>", removed once their writer is dead -----------------------------
# A writer killed before its rename leaves its temp file behind (an embedding shard's is shard-sized, a fastText
# classifier's ~800 MB), and nothing else removes it. The name says who wrote it: the process id, and the machine
# (its host name and pid namespace) where that id means something, since a SLURM array's tasks on other nodes write
# into the same folders and their pids are not processes here. Names without the machine part (older runx) count
# as this machine's.
_TEMP_NAME = re.compile(r"^\.tmp-(\d+)(?:@([0-9a-f]{8}))?-(.+)$")
_MACHINE: list[str] = []


def _machine() -> str:
    if not _MACHINE:
        import socket
        try:
            pid_ns = os.readlink("/proc/self/ns/pid")
        except OSError:
            pid_ns = ""
        _MACHINE.append(hashlib.sha256(f"{socket.gethostname()}\n{pid_ns}".encode()).hexdigest()[:8])
    return _MACHINE[0]


def _temp_prefix() -> str:
    return f".tmp-{os.getpid()}@{_machine()}-"


def _process_gone(pid: int) -> bool:
    """Whether no process `pid` runs on this machine (a zombie writes nothing more: gone too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:      # alive, another user's
        return False
    except (OverflowError, ValueError):
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def remove_stale_temps(folder: str, recursive: bool = False, output: str | None = None) -> list[str]:
    """Remove the temp files that killed writers left in `folder` (and below it with recursive=True): those whose
    process no longer runs on this machine; temps of live processes (another run's workers, another task of a
    SLURM array) and of other machines stay. With `output` (the name of a file in `folder` that only the caller
    writes, e.g. a shard it is about to write), only that file's temps, whoever wrote them: a writer on another
    node, or a pid reused since. Returns the removed paths."""
    removed = []
    for root, _, files in os.walk(folder) if os.path.isdir(folder) else ():
        for f in files:
            m = _TEMP_NAME.match(f)
            if m is None:
                continue
            if output is not None:
                stale = m.group(3) == output
            else:
                stale = m.group(2) in (None, _machine()) and _process_gone(int(m.group(1)))
            if stale:
                try:
                    os.unlink(os.path.join(root, f))
                    removed.append(os.path.join(root, f))
                except FileNotFoundError:
                    pass
        if not recursive or output is not None:
            break
    if removed:
        log.info("removed %d temp file(s) that killed writers left in %s", len(removed), folder)
    return removed


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


class atomic_path:
    """`with atomic_path(final) as tmp: write to tmp` -> renamed to final only if the block succeeds."""

    def __init__(self, final: str):
        self.final = final
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        base = os.path.basename(final)
        self.tmp = os.path.join(os.path.dirname(os.path.abspath(final)), _temp_prefix() + base)

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            readable_like_open(self.tmp)   # a writer may create 0600 files (safetensors' save_file does)
            os.replace(self.tmp, self.final)
        elif os.path.exists(self.tmp):
            os.unlink(self.tmp)
        return False


@dataclass
class Stage:
    name: str
    shards: Callable[["JobContext"], list[str]]          # the shard keys this stage processes
    run_shard: Callable[["JobContext", str], dict]        # process one shard -> its manifest entry
    parallel: bool = True                                 # False: only task 0 / worker 0 runs it
    also_writes: tuple[str, ...] = ()                     # folders besides <job_dir>/<name> it writes into


def slurm_array_task() -> tuple[int, int]:
    """(task index, task count) of a SLURM array that runs this one command (sbatch --array), else (0, 1).

    A job started by submitit (Hydra's submitit launcher) is one whole job even though submitit submits a
    sweep as a SLURM array: its array index is the sweep job's number, not a share of this job's shards."""
    if os.environ.get("SUBMITIT_FOLDER"):
        return 0, 1
    return int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)), int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))


@dataclass
class JobContext:
    job_dir: str
    cfg: Any
    task_index: int = 0
    num_tasks: int = 1

    def stage_dir(self, stage: str) -> str:
        d = os.path.join(self.job_dir, stage)
        os.makedirs(d, exist_ok=True)
        return d

    def marker(self, stage: str, key: str) -> str:
        return os.path.join(self.stage_dir(stage), f"{key}.done.json")

    def is_done(self, stage: str, key: str) -> bool:
        return os.path.exists(self.marker(stage, key))

    def read_marker(self, stage: str, key: str) -> dict:
        with open(self.marker(stage, key)) as f:
            return json.load(f)


def _die_with_the_job() -> None:
    """A pool worker ends when the job's process does (PR_SET_PDEATHSIG: SIGKILL; its finished shards are on disk,
    atomically): a killed job left its workers computing on, and they wrote shards into a rerun that had started
    the job over with other settings."""
    from runx.trainers.runtime import die_with_parent
    import signal
    die_with_parent(signal.SIGKILL)


def _worker(job: "DataJob", stage: Stage, ctx: JobContext, keys: list[str]) -> list[tuple[str, dict]]:
    out = []
    for key in keys:
        entry = stage.run_shard(ctx, key)
        atomic_write_json(ctx.marker(stage.name, key), entry)
        out.append((key, entry))
    return out


class DataJob:
    """Base class of the data recipes (preselect, concept_prune)."""

    #: the settings record is <run_dir>/<job_name>_job.json
    job_name = "data"
    #: keys of settings() that change how the job runs, not what it computes: free to change on a rerun
    unpinned: tuple[str, ...] = ("recipe.num_workers",)

    def __init__(self, cfg, run_dir: str):
        self.cfg = cfg
        self.run_dir = run_dir

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def settings(self) -> dict:
        """What the outputs depend on (e.g. {"recipe": {...}, "seed": 0}): pinned for the run dir."""
        return {}

    def input_files(self) -> list[str]:
        """Files the job reads from outside its run dir: their sizes and mtimes are pinned with the settings."""
        return []

    def outputs(self) -> list[str]:
        """Files and folders the job writes besides its stage folders: removed when it starts over."""
        return []

    def summary(self, ctx: JobContext) -> dict:
        """Final numbers for the run summary / metrics.jsonl (read from the stage manifests)."""
        return {}

    def run(self, num_workers: int = 1, task_index: int | None = None, num_tasks: int | None = None,
            only: list[str] | None = None, progress=None, resume: str = "auto") -> dict:
        array_index, array_count = slurm_array_task()
        task_index = array_index if task_index is None else task_index
        num_tasks = array_count if num_tasks is None else num_tasks
        self.pin_settings(resume, num_tasks)
        ctx = JobContext(self.run_dir, self.cfg, task_index, num_tasks)
        remove_stale_temps(self.run_dir)
        timings = {}
        for stage in self.stages():
            if only and stage.name not in only:
                continue
            t0 = time.perf_counter()
            for folder in (os.path.join(self.run_dir, stage.name), *stage.also_writes):
                remove_stale_temps(folder, recursive=True)    # a killed run's half-written files
            keys = stage.shards(ctx)
            if stage.parallel:
                mine = [k for i, k in enumerate(keys) if i % num_tasks == task_index]
            else:  # task 0 runs it; other tasks wait for its markers (the completeness check below)
                mine = keys if task_index == 0 else []
            todo = [k for k in mine if not ctx.is_done(stage.name, k)]
            skipped = len(mine) - len(todo)
            log.info("stage %-10s %d shard(s), %d already done", stage.name, len(mine), skipped)
            if todo:
                self._run_keys(stage, ctx, todo, num_workers if stage.parallel else 1)
            entries = {k: ctx.read_marker(stage.name, k) for k in keys if ctx.is_done(stage.name, k)}
            atomic_write_json(os.path.join(ctx.stage_dir(stage.name), "manifest.json"),
                              {"stage": stage.name, "shards": entries, "complete": len(entries) == len(keys)})
            timings[stage.name] = time.perf_counter() - t0
            if progress is not None:
                progress(stage.name, len(todo), skipped, timings[stage.name])
            if len(entries) < len(keys):
                log.info("stage %s incomplete on this task (%d/%d); later stages wait for the other tasks",
                         stage.name, len(entries), len(keys))
                return {"incomplete_stage": stage.name, "stage_seconds": timings}
        result = self.summary(ctx)
        result["stage_seconds"] = timings
        return result

    # ---- one job per run dir ---------------------------------------------------------------------------------
    def _pin_state(self):
        path = os.path.join(self.run_dir, f"{self.job_name}_job.json")
        now = json.loads(json.dumps({"job": self.job_name, "settings": self.settings(),
                                     "inputs": file_fingerprint(self.input_files()),
                                     "stages": [s.name for s in self.stages()]}, default=str))
        before = None
        if os.path.exists(path):
            with open(path) as f:
                before = json.load(f)
        done = self._finished_shards(before)
        diff = self._pin_diff(before, now) if before is not None else []
        return path, before, now, done, diff

    def pin_refusal(self, resume: str = "auto", num_tasks: int = 1) -> str | None:
        """Why pin_settings would refuse this run, or None; changes nothing (the CLI asks before it rewrites
        the run dir's config.yaml, so that a refused rerun leaves the folder describing its own job)."""
        if resume not in ("auto", "never"):
            return (f"resume={resume}: a data job continues its own run_dir (resume=auto) or starts it over "
                    f"(resume=never); to continue that run's stages, give run_dir={resume}")
        _, before, _, done, diff = self._pin_state()
        if resume == "never" and (done or before is not None) and num_tasks > 1:
            return (f"resume=never with {num_tasks} array tasks: each task would clear the others' work. Empty "
                    f"{self.run_dir} (or give another run_dir=) before starting the tasks")
        if resume == "auto" and diff and done:
            return (f"run_dir={self.run_dir} holds a {self.job_name} job with other settings: {'; '.join(diff)}. "
                    f"Its {done} finished shards were computed with the old ones and would be reused. Rerun with "
                    f"resume=never to start this run_dir over, or give another run_dir=")
        return None

    def pin_settings(self, resume: str = "auto", num_tasks: int = 1) -> None:
        """Record the settings and input files on the first run; refuse a rerun with other ones while any shard
        is finished (it would be reused); start over when nothing is finished yet (a fixed typo) or on
        resume=never. Problems are RecipeConfigErrors: the CLI prints them as the config-problem paragraph."""
        from runx.trainers.recipe import RecipeConfigError
        problem = self.pin_refusal(resume, num_tasks)
        if problem:
            raise RecipeConfigError(problem)
        path, before, now, done, diff = self._pin_state()
        if resume == "never" and (done or before is not None):
            log.info("resume=never: clearing the %s job in %s (%d finished shards)", self.job_name, self.run_dir,
                     done)
            self._start_over(before, path)
        elif diff:
            log.info("%s: settings changed before any shard finished (%s); starting over", self.run_dir,
                     "; ".join(diff))
            self._start_over(before, path)
        elif before is None and done:
            log.warning("%s holds %d finished shards but no %s: assuming they were computed with these settings",
                        self.run_dir, done, os.path.basename(path))
        if before != now:
            atomic_write_json(path, now)

    def _stage_names(self, before: dict | None) -> list[str]:
        return sorted({s.name for s in self.stages()} | set((before or {}).get("stages", [])))

    def _finished_shards(self, before: dict | None) -> int:
        n = 0
        for name in self._stage_names(before):
            d = os.path.join(self.run_dir, name)
            if os.path.isdir(d):
                n += sum(f.endswith(".done.json") for f in os.listdir(d))
        return n

    def _pin_diff(self, before: dict, now: dict) -> list[str]:
        """'key (old -> new)' for every pinned setting that differs, and the input files if they changed."""
        old, new = _flatten(before.get("settings", before)), _flatten(now["settings"])  # first records: settings only
        out = [f"{k} ({_short(old.get(k))} -> {_short(new.get(k))})" for k in sorted(set(old) | set(new))
               if k not in self.unpinned and old.get(k) != new.get(k)]
        if "inputs" in before and before["inputs"]["digest"] != now["inputs"]["digest"]:
            out.append(_input_change(before["inputs"], now["inputs"]))
        return out

    def _start_over(self, before: dict | None, pin_path: str) -> None:
        for p in [os.path.join(self.run_dir, n) for n in self._stage_names(before)] + self.outputs() + [pin_path]:
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)

    def _run_keys(self, stage: Stage, ctx: JobContext, keys: list[str], num_workers: int) -> None:
        if num_workers <= 1 or len(keys) == 1:
            _worker(self, stage, ctx, keys)
            return
        # Separate processes (not threads): scoring code is CPU-bound python/C++ holding the GIL.
        import multiprocessing as mp
        chunks = [keys[w::num_workers] for w in range(num_workers)]
        with mp.get_context("fork").Pool(num_workers, initializer=_die_with_the_job) as pool:
            pool.starmap(_worker, [(self, stage, ctx, c) for c in chunks if c])


# ---- the settings record ---------------------------------------------------------------------------------------
MAX_LISTED_INPUTS = 1000   # beyond this many input files the record keeps their count, bytes and digest only


def file_fingerprint(paths: list[str]) -> dict:
    """Count, total bytes and a digest of (path, size, mtime) of files; the list itself for up to 1000 files."""
    rows = []
    for p in paths:
        st = os.stat(p)
        rows.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256("".join(f"{p}\t{n}\t{m}\n" for p, n, m in rows).encode()).hexdigest()[:16]
    out = {"count": len(rows), "bytes": sum(r[1] for r in rows), "digest": digest}
    if len(rows) <= MAX_LISTED_INPUTS:
        out["files"] = rows
    return out


def _input_change(before: dict, now: dict) -> str:
    old = {p: (n, m) for p, n, m in before.get("files", [])}
    new = {p: (n, m) for p, n, m in now.get("files", [])}
    first = next((p for p in sorted(set(old) | set(new)) if old.get(p) != new.get(p)), None)
    example = "" if first is None else f", e.g. {first} " + (
        "is new" if first not in old else "is no longer among them" if first not in new else "was modified")
    return (f"input files ({before['count']} files, {before['bytes']} bytes -> {now['count']} files, "
            f"{now['bytes']} bytes{example})")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v, width: int = 80) -> str:
    """A value for a message, long ones cut in the middle (paths differ at their ends)."""
    text = json.dumps(v, default=str)
    return text if len(text) <= width else text[: width // 2 - 2] + "..." + text[-(width // 2 - 1):]
