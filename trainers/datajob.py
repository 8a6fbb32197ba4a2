"""Data jobs: ordered stages that read and write shards, resumable and splittable.

A stage processes a list of shard keys. Each shard's output is written atomically and a marker
`<stage>/<key>.done.json` records it (with the shard's own numbers); a rerun skips shards whose marker
exists, so a killed job continues where it stopped and produces identical outputs. Shards are split
across local worker processes (`num_workers`) and across nodes / SLURM array tasks (`task_index` /
`num_tasks`, read from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT when set) by shard index.
Stages that need all shards (a global threshold, k-means) are `Stage(..., shards=lambda ctx: ["all"])`
and run on task 0 once every earlier stage is complete.

    class MyJob(DataJob):
        def stages(self):
            return [Stage("score", self.list_input_shards, self.score_shard),
                    Stage("threshold", lambda ctx: ["all"], self.compute_threshold)]
"""
from __future__ import annotations

import json
import logging
import os
import secrets
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


def _new_temp_file(folder: str) -> tuple[int, str]:
    """A new, exclusively created hidden file in `folder`, with the mode open() gives (0666 less the umask):
    tempfile.mkstemp's 0600 would stay on the renamed result and hide it from the user's group."""
    while True:
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


class atomic_path:
    """`with atomic_path(final) as tmp: write to tmp` -> renamed to final only if the block succeeds."""

    def __init__(self, final: str):
        self.final = final
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        base = os.path.basename(final)
        self.tmp = os.path.join(os.path.dirname(os.path.abspath(final)), f".tmp-{os.getpid()}-{base}")

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
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


def _worker(job: "DataJob", stage: Stage, ctx: JobContext, keys: list[str]) -> list[tuple[str, dict]]:
    out = []
    for key in keys:
        entry = stage.run_shard(ctx, key)
        atomic_write_json(ctx.marker(stage.name, key), entry)
        out.append((key, entry))
    return out


class DataJob:
    """Base class of the data recipes (preselect, concept_prune)."""

    def __init__(self, cfg, run_dir: str):
        self.cfg = cfg
        self.run_dir = run_dir

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def summary(self, ctx: JobContext) -> dict:
        """Final numbers for the run summary / metrics.jsonl (read from the stage manifests)."""
        return {}

    def run(self, num_workers: int = 1, task_index: int | None = None, num_tasks: int | None = None,
            only: list[str] | None = None, progress=None) -> dict:
        task_index = int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)) if task_index is None else task_index
        num_tasks = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)) if num_tasks is None else num_tasks
        ctx = JobContext(self.run_dir, self.cfg, task_index, num_tasks)
        timings = {}
        for stage in self.stages():
            if only and stage.name not in only:
                continue
            t0 = time.perf_counter()
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

    def _run_keys(self, stage: Stage, ctx: JobContext, keys: list[str], num_workers: int) -> None:
        if num_workers <= 1 or len(keys) == 1:
            _worker(self, stage, ctx, keys)
            return
        # Separate processes (not threads): scoring code is CPU-bound python/C++ holding the GIL.
        import multiprocessing as mp
        chunks = [keys[w::num_workers] for w in range(num_workers)]
        with mp.get_context("fork").Pool(num_workers) as pool:
            pool.starmap(_worker, [(self, stage, ctx, c) for c in chunks if c])
