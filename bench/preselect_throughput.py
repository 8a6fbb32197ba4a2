"""PreSelect filter-stage throughput: documents/s per process vs a bare fastText predict loop, and 1 -> 2 processes.

Side by side in one run, on the same generated JSONL shards and the same classifier:
  bare     one process: read the shard, json.loads, the same whitespace normalisation, model.predict in batches
           of `--batch` (the minimal script that scores a shard; no output, no second pass);
  runx     the recipe's two per-shard passes on that shard, as a worker runs them (load the classifier, pass 1:
           score + store line/score/chars, pass 2: copy the kept lines to the output shard);
  scaling  the whole filter (filter_score, filter_threshold, filter stages, with the job's fixed costs: stage
           bookkeeping, the global sort, the histogram plot, the manifest) over all shards, num_workers=1 vs 2,
           next to bare fastText processes over the same shards (1 vs 2): the machine's own ceiling.
On a shared machine wall-clock ratios are noisy; CPU-time ratios are printed too.
Targets (issue #6): runx >= 0.9x bare per process; 2 processes >= 1.8x one.

    python bench/preselect_throughput.py [--quick] [--shards 8] [--docs 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_shard(args) -> int:
    from runx.recipes.preselect_world import World
    folder, i, docs, seed = args
    mix = {"facts": 0.15, "lore": 0.15, "prose": 0.35, "noise": 0.15, "boilerplate": 0.20}
    # web-page-sized documents (1-3 KB) rather than the embedded default's short ones
    rows = World(seed).documents("throughput", i, docs, mix, min_chars=1000, max_chars=3000)
    with open(os.path.join(folder, f"shard-{i:05d}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return sum(len(r["text"]) for r in rows)


def make_shards(folder: str, shards: int, docs: int, seed: int) -> tuple[list[str], int]:
    import multiprocessing as mp
    os.makedirs(folder)
    with mp.get_context("fork").Pool(min(shards, os.cpu_count() or 1)) as pool:
        chars = sum(pool.map(_write_shard, [(folder, i, docs, seed) for i in range(shards)]))
    return [os.path.join(folder, f"shard-{i:05d}.jsonl") for i in range(shards)], chars


def make_classifier(path: str, seed: int, bucket: int) -> None:
    """A fastText classifier with the paper's settings, on facts-vs-rest labels from the generated world."""
    from runx.recipes.preselect import FT_NEGATIVE, FT_POSITIVE, fasttext_text, train_fasttext_clean_process
    from runx.recipes.preselect_world import World
    rows = World(seed).documents("sample", 0, 4000, {"facts": 0.3, "lore": 0.2, "prose": 0.3, "noise": 0.2})
    train = path + ".txt"
    with open(train, "w") as f:
        for r in rows:
            f.write(f"{FT_POSITIVE if r['domain'] == 'facts' else FT_NEGATIVE} {fasttext_text(r['text'])}\n")
    train_fasttext_clean_process(train, path, dict(wordNgrams=2, epoch=3, lr=0.1, dim=100, minCount=1,
                                                   bucket=bucket, thread=1, seed=0, loss="softmax", verbose=0))


def bare_chunk(args) -> int:
    """The bare loop over several shards with one model load (what one bare worker process would do)."""
    import fasttext
    model_path, shards, batch = args
    model = fasttext.load_model(model_path)
    n = 0
    for shard in shards:
        buf = []
        with open(shard, "rb") as f:
            for line in f:
                buf.append(" ".join(json.loads(line)["text"].split()))
                if len(buf) == batch:
                    model.predict(buf, k=1)
                    n += len(buf)
                    buf = []
        if buf:
            model.predict(buf, k=1)
            n += len(buf)
    return n


def bare_processes(model_path: str, shards: list[str], workers: int, batch: int) -> float:
    """docs/s of bare fastText workers over all shards, split like the DataJob splits them (shards[w::n])."""
    import multiprocessing as mp
    t0 = time.perf_counter()
    if workers == 1:
        n = bare_chunk((model_path, shards, batch))
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            n = sum(pool.map(bare_chunk, [(model_path, shards[w::workers], batch) for w in range(workers)]))
    return n / (time.perf_counter() - t0)


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (worker pools are joined before we read it)."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bare_loop(model_path: str, shard: str, batch: int) -> tuple[float, float, int]:
    import fasttext
    c0, t0 = cpu_seconds(), time.perf_counter()
    model = fasttext.load_model(model_path)
    n, buf, out = 0, [], []
    with open(shard, "rb") as f:
        for line in f:
            buf.append(" ".join(json.loads(line)["text"].split()))
            if len(buf) == batch:
                out.append(model.predict(buf, k=1))
                n += len(buf)
                buf = []
    if buf:
        out.append(model.predict(buf, k=1))
        n += len(buf)
    return time.perf_counter() - t0, cpu_seconds() - c0, n


def filter_job(model_path: str, pool: str, run_dir: str, batch: int):
    from omegaconf import OmegaConf
    from runx.recipes.preselect import PreSelect
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.join(run_dir, "train"))
    shutil.copy(model_path, os.path.join(run_dir, "train", "classifier.bin"))
    refs = [{"name": f"m{i}", "kind": "hf", "path": "unused", "score": float(i)} for i in range(2)]
    cfg = OmegaConf.create({"seed": 0, "smoke": False, "recipe": {
        "name": "preselect", "pool": pool, "sample": pool, "references": refs, "keep_fraction": 0.1,
        "predict_batch": batch}})
    return PreSelect(cfg, run_dir)


def runx_filter(model_path: str, pool: str, run_dir: str, workers: int, batch: int) -> tuple[float, dict, dict]:
    """Wall time of the whole filter; CPU seconds of the parent (serial part) and of the worker processes."""
    import resource
    job = filter_job(model_path, pool, run_dir, batch)
    me0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = job.run(num_workers=workers, only=["filter_score", "filter_threshold", "filter"])
    wall = time.perf_counter() - t0
    me1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"parent": me1.ru_utime + me1.ru_stime - me0.ru_utime - me0.ru_stime,
           "workers": kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime}
    return wall, result, cpu


def runx_shard_passes(model_path: str, pool: str, run_dir: str, batch: int) -> tuple[float, float, int]:
    """One worker's work on one shard: classifier load + pass 1 + pass 2 (threshold computed beforehand)."""
    from runx.trainers.datajob import JobContext
    job = filter_job(model_path, pool, run_dir, batch)
    job.run(only=["filter_score", "filter_threshold"])
    job._cache = {}  # the worker loads the classifier itself
    ctx = JobContext(run_dir, job.cfg)
    c0, t0 = cpu_seconds(), time.perf_counter()
    e1 = job.score_pool_shard(ctx, "00000")
    job.filter_pool_shard(ctx, "00000")
    return time.perf_counter() - t0, cpu_seconds() - c0, e1["docs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shards (about a minute)")
    ap.add_argument("--shards", type=int, default=8)  # 4 x 20k docs: fixed costs (fork, sort, plot) cap 2-proc scaling at ~1.65x
    ap.add_argument("--docs", type=int, default=None, help="documents per shard (default 20000; quick 4000)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, best kept (default 3; quick 2)")
    ap.add_argument("--bucket", type=int, default=200000, help="fastText hash buckets of the classifier")
    ap.add_argument("--batch", type=int, default=2048, help="documents per predict call (both sides)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "preselect_throughput.json"))
    args = ap.parse_args()
    docs = args.docs or (4000 if args.quick else 20000)
    repeats = args.repeats or (2 if args.quick else 3)
    tmp = tempfile.mkdtemp(prefix="preselect_tp_")
    try:
        pool = os.path.join(tmp, "pool")
        shards, chars = make_shards(pool, args.shards, docs, seed=0)
        model = os.path.join(tmp, "classifier.bin")
        make_classifier(model, seed=0, bucket=args.bucket)
        one = os.path.join(tmp, "one_shard")
        os.makedirs(one)
        shutil.copy(shards[0], one)
        mb = os.path.getsize(shards[0]) / 2**20
        bare, ours, w1, w2, cbare, cours, c1, c2, b1, b2 = [], [], [], [], [], [], [], [], [], []
        for _ in range(repeats):  # interleaved, best of each: the machine may be shared
            t, c, n = bare_loop(model, shards[0], args.batch)
            bare.append(n / t)
            cbare.append(n / c)
            t, c, n = runx_shard_passes(model, one, os.path.join(tmp, "run1"), args.batch)
            ours.append(n / t)
            cours.append(n / c)
            t, r1, cpu1 = runx_filter(model, pool, os.path.join(tmp, "runA"), 1, args.batch)
            w1.append(len(shards) * docs / t)
            c1.append(cpu1)
            t, r2, cpu2 = runx_filter(model, pool, os.path.join(tmp, "runB"), 2, args.batch)
            w2.append(len(shards) * docs / t)
            c2.append(cpu2)
            b1.append(bare_processes(model, shards, 1, args.batch))
            b2.append(bare_processes(model, shards, 2, args.batch))
        same = all(open(os.path.join(tmp, "runA", "output", f), "rb").read() ==
                   open(os.path.join(tmp, "runB", "output", f), "rb").read()
                   for f in os.listdir(os.path.join(tmp, "runA", "output")) if f.startswith("part-"))
        # CPU-time model of the 2-process run on two free cores: the parent's serial work, plus the workers'
        # work split evenly (each gets half the shards); robust to other jobs sharing the machine
        best1 = min(c1, key=lambda c: c["parent"] + c["workers"])
        best2 = min(c2, key=lambda c: c["parent"] + c["workers"])
        est_scaling = (best1["parent"] + best1["workers"]) / (best2["parent"] + best2["workers"] / 2)
        res = {
            "docs_per_shard": docs, "shards": len(shards), "mean_doc_chars": chars / (len(shards) * docs),
            "shard_mb": mb, "fasttext_bucket": args.bucket, "predict_batch": args.batch, "repeats": repeats,
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "bare_docs_per_s": max(bare), "runx_docs_per_s_1proc": max(ours),
            "per_process_ratio": max(ours) / max(bare),
            "bare_docs_per_cpu_s": max(cbare), "runx_docs_per_cpu_s": max(cours),
            "per_process_ratio_cpu_time": max(cours) / max(cbare),
            "runx_docs_per_s_1worker_all_shards": max(w1), "runx_docs_per_s_2workers_all_shards": max(w2),
            "scaling_2_vs_1": max(w2) / max(w1), "cpu_seconds_1worker": best1, "cpu_seconds_2workers": best2,
            "bare_docs_per_s_1proc_all_shards": max(b1), "bare_docs_per_s_2procs_all_shards": max(b2),
            "bare_scaling_2_vs_1": max(b2) / max(b1), "scaling_vs_bare_scaling": (max(w2) / max(w1)) /
                                                                                 (max(b2) / max(b1)),
            "scaling_2_vs_1_cpu_time_estimate": est_scaling, "outputs_identical_1_vs_2_workers": same,
            "kept_char_fraction": r2["kept_char_fraction"],
            "targets": {"per_process_ratio": 0.9, "scaling_2_vs_1": 1.8},
            "all_bare": bare, "all_runx_1proc": ours, "all_1worker": w1, "all_2workers": w2,
        }
        res["meets_targets"] = res["per_process_ratio"] >= 0.9 and res["scaling_2_vs_1"] >= 1.8
        print(f"shard: {docs} docs, {mb:.1f} MB, {res['mean_doc_chars']:.0f} chars/doc; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"bare fastText loop      {res['bare_docs_per_s']:10.0f} docs/s")
        print(f"runx 2 passes, 1 proc   {res['runx_docs_per_s_1proc']:10.0f} docs/s   "
              f"ratio {res['per_process_ratio']:.3f}x  (target >= 0.9x)")
        print(f"runx, {len(shards)} shards, 1 worker {res['runx_docs_per_s_1worker_all_shards']:10.0f} docs/s")
        print(f"runx, {len(shards)} shards, 2 workers{res['runx_docs_per_s_2workers_all_shards']:10.0f} docs/s   "
              f"scaling {res['scaling_2_vs_1']:.3f}x  (target >= 1.8x)   outputs identical: {same}")
        print(f"bare fastText, same shards: 1 process {res['bare_docs_per_s_1proc_all_shards']:.0f} docs/s, "
              f"2 processes {res['bare_docs_per_s_2procs_all_shards']:.0f} docs/s: scaling "
              f"{res['bare_scaling_2_vs_1']:.3f}x (this machine's ceiling); runx / bare scaling "
              f"{res['scaling_vs_bare_scaling']:.3f}")
        print(f"CPU time: bare {res['bare_docs_per_cpu_s']:.0f} docs/cpu-s, runx {res['runx_docs_per_cpu_s']:.0f} "
              f"docs/cpu-s, ratio {res['per_process_ratio_cpu_time']:.3f}x; 2-process scaling on two free cores "
              f"(serial parent + half the workers' CPU) {est_scaling:.3f}x")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
