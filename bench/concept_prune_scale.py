"""concept_prune at scale: 1M x 384 synthetic embeddings, dedup + cluster + quota + prune on this machine's
CPUs, against a bare faiss spherical k-means (same k, same iterations, same training-sample size) on the
same data, measured side by side in one run.

Each side runs in its own fresh process, so its peak RSS (/proc VmHWM) is its own; both are also
reported net of the process's RSS after its imports. Writes bench/results/concept_prune_scale.json.

    python bench/concept_prune_scale.py            # 1M x 384, k=1000, 20 iterations
    python bench/concept_prune_scale.py --quick    # 200k x 384, k=200
    taskset -c 0,1 python bench/concept_prune_scale.py   # pin to 2 cores on a bigger machine
    python bench/concept_prune_scale.py --device cuda    # GPU pipeline vs a bare torch k-means on CUDA
                                                         # (faiss' GPU build when installed)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def make_embeddings(path: str, n: int, d: int, concepts: int, dup_fraction: float, seed: int = 0) -> int:
    """Unit vectors around `concepts` centres with heterogeneous spreads; `dup_fraction` of the rows are
    near-copies (cos > 0.999) of other rows. Written in chunks to an .npy; returns the planted copies."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((concepts, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.5, 1.5, concepts).astype(np.float32) / np.sqrt(d)
    X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    planted = 0
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        c = rng.integers(0, concepts, b - a)
        x = centres[c] + spread[c, None] * rng.standard_normal((b - a, d), dtype=np.float32)
        dup = np.flatnonzero(rng.random(b - a) < dup_fraction)
        src = rng.integers(0, b - a, len(dup))
        keep = ~np.isin(src, dup)                       # copy only originals of this chunk
        dup, src = dup[keep], src[keep]
        x[dup] = x[src] + 0.001 * rng.standard_normal((len(dup), d), dtype=np.float32)
        planted += len(dup)
        X[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    X.flush()
    del X
    return planted


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    """This process's peak RSS (VmHWM: reset at exec, unlike ru_maxrss, which a child inherits)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------- workers
def bare_faiss(path: str, k: int, niter: int, seed: int, mppc: int) -> dict:
    import faiss
    base = rss_mib()
    x = np.load(path)                                    # the whole matrix in RAM, as faiss needs it
    t0 = time.perf_counter()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=mppc,
                      verbose=False)
    km.train(x)
    t1 = time.perf_counter()
    D, I = km.index.search(x, 1)
    t2 = time.perf_counter()
    return {"what": "faiss.Kmeans(spherical=True).train + index.search", "train_s": t1 - t0,
            "train_assign_s": t2 - t0, "peak_rss_mib": peak_mib(), "base_rss_mib": base}


def bare_torch_cuda(path: str, k: int, niter: int, seed: int, mppc: int) -> dict:
    """GPU baseline where faiss has no GPU build: the recipe's own torch spherical k-means, called bare
    on an in-memory matrix (same sample size as faiss' subsampling), plus one assignment pass."""
    import torch

    from runx.recipes.concept_prune import _spherical_kmeans_torch, assign_to_centroids
    base = rss_mib()
    x = np.load(path)
    torch.zeros(1, device="cuda")                        # CUDA context outside the timing
    t0 = time.perf_counter()
    sample = x[np.sort(np.random.default_rng(seed).choice(len(x), min(len(x), k * mppc), replace=False))]
    C = _spherical_kmeans_torch(sample, k, niter, seed, "cuda")
    t1 = time.perf_counter()
    assign_to_centroids(x, C, "cuda")
    t2 = time.perf_counter()
    return {"what": "torch spherical k-means on CUDA + assignment", "train_s": t1 - t0, "train_assign_s": t2 - t0,
            "peak_rss_mib": peak_mib(), "base_rss_mib": base}


def pipeline(path: str, k: int, niter: int, seed: int, mppc: int, run_dir: str, epsilon: float,
             shard_size: int, device: str = "cpu") -> dict:
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from runx.conf.schema.concept_prune import ConceptPruneConfig
    from runx.recipes.concept_prune import ConceptPrune
    import faiss  # noqa: F401  (imported before the baseline RSS, as the bare side does)
    import torch  # noqa: F401
    base = rss_mib()
    rc = ConceptPruneConfig(input="embeddings", path=path, num_clusters=k, kmeans_iters=niter, epsilon=epsilon,
                            keep_fraction=0.5, budget_of="deduplicated", max_points_per_centroid=mppc,
                            shard_size=shard_size, device=device)
    cfg = OmegaConf.create({"recipe": asdict(rc), "seed": seed, "smoke": False})
    t0 = time.perf_counter()
    res = ConceptPrune(cfg, run_dir).run()
    wall = time.perf_counter() - t0
    st = res["stage_seconds"]
    return {"stage_seconds": st, "pipeline_s": sum(v for s, v in st.items() if s != "embed"),
            "embed_s": st["embed"], "wall_with_embed_s": wall, "peak_rss_mib": peak_mib(), "base_rss_mib": base,
            "dedup_removed": res["dedup_removed"], "n_keep": res["n_keep"], "kept": res["kept"]}


def child(args) -> None:
    fn = {"bare": bare_faiss, "bare_cuda": bare_torch_cuda, "pipeline": pipeline}[args.child]
    kw = json.loads(args.kw)
    print("RESULT " + json.dumps(fn(**kw)))


def in_child(which: str, **kw) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", which, "--kw", json.dumps(kw)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit(f"{which} failed (exit {out.returncode})")
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--kw")
    ap.add_argument("--n", type=int)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--epsilon", type=float, default=0.05)
    ap.add_argument("--dup-fraction", type=float, default=0.1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.child:
        return child(args)
    n = args.n or (200_000 if args.quick else 1_000_000)
    k = args.k or (200 if args.quick else 1000)
    mppc, seed = 256, 1234
    work = tempfile.mkdtemp(prefix="cp_scale_", dir=args.workdir)
    path = os.path.join(work, "emb.npy")
    t = time.perf_counter()
    planted = make_embeddings(path, n, args.dim, concepts=k, dup_fraction=args.dup_fraction)
    print(f"data: {n} x {args.dim} float32 ({n * args.dim * 4 / 2**20:.0f} MiB), {planted} planted near-copies, "
          f"generated in {time.perf_counter() - t:.1f}s; k={k}, niter={args.niter}, cores={os.cpu_count()}")
    bare = in_child("bare" if args.device == "cpu" else "bare_cuda", path=path, k=k, niter=args.niter, seed=seed,
                    mppc=mppc)
    pipe = in_child("pipeline", path=path, k=k, niter=args.niter, seed=seed, mppc=mppc,
                    run_dir=os.path.join(work, "job"), epsilon=args.epsilon, shard_size=100_000, device=args.device)
    matrix_mib = n * args.dim * 4 / 2**20
    res = {"device": args.device, "n": n, "dim": args.dim, "k": k, "niter": args.niter, "epsilon": args.epsilon, "cpus": os.cpu_count(),
           "planted_copies": planted, "matrix_mib": matrix_mib, "bare_faiss": bare, "pipeline": pipe,
           "ratio_vs_faiss_train": pipe["pipeline_s"] / bare["train_s"],
           "ratio_vs_faiss_train_assign": pipe["pipeline_s"] / bare["train_assign_s"],
           "pipeline_peak_over_matrix": pipe["peak_rss_mib"] / matrix_mib,
           "pipeline_peak_net_over_matrix": (pipe["peak_rss_mib"] - pipe["base_rss_mib"]) / matrix_mib,
           "bare_peak_over_matrix": bare["peak_rss_mib"] / matrix_mib}
    res["targets"] = {"ratio<=1.5 (vs train+assign)": res["ratio_vs_faiss_train_assign"] <= 1.5,
                      "peak<=2x matrix": res["pipeline_peak_over_matrix"] <= 2.0}
    if args.quick:  # 1000-row clusters against k=200: SemDeDup's share and the fixed costs are much larger
        res["targets_note"] = "targets are for the full size (1M x 384, k=1000); --quick only exercises the bench"
    print(f"bare {bare['what']}: train {bare['train_s']:.1f}s, train+assign {bare['train_assign_s']:.1f}s, "
          f"peak RSS {bare['peak_rss_mib']:.0f} MiB")
    print("pipeline stages (s): " + ", ".join(f"{s} {v:.1f}" for s, v in pipe["stage_seconds"].items()))
    print(f"pipeline (dedup+cluster+quota+prune+write, embed excluded): {pipe['pipeline_s']:.1f}s; "
          f"removed {pipe['dedup_removed']} (planted {planted}); kept {pipe['kept']}")
    print(f"ratio vs bare k-means train+assign: {res['ratio_vs_faiss_train_assign']:.2f}  "
          f"(vs train only: {res['ratio_vs_faiss_train']:.2f})")
    print(f"pipeline peak RSS {pipe['peak_rss_mib']:.0f} MiB = {res['pipeline_peak_over_matrix']:.2f}x the "
          f"{matrix_mib:.0f} MiB matrix (net of imports: {res['pipeline_peak_net_over_matrix']:.2f}x); "
          f"bare k-means {res['bare_peak_over_matrix']:.2f}x")
    print("targets:", res["targets"], res.get("targets_note", ""))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    name = "concept_prune_scale" + ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    name += ".json"
    with open(os.path.join(HERE, "results", name), "w") as f:
        json.dump(res, f, indent=2)
    import shutil
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
