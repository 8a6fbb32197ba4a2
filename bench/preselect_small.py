"""PreSelect's claim in miniature: compute multiplier of PreSelect over random selection, over several seeds.

For each seed the whole embedded default runs (generated 5-domain pool + benchmark, 6 n-gram reference models on
different mixtures, BPC -> S(d) -> labels -> fastText -> top 10% of characters), then char 9-gram students are
trained at equal character budget B on PreSelect's output, on a perplexity filter (lowest BPC under the ablest
reference) and on random selections of B, 2B, 4B, 8B characters, and scored on the benchmark.

    compute multiplier = random-selection budget needed to reach the PreSelect student's accuracy / B
                         (random curve interpolated linearly in log budget)

Target (issue #6): >= 2x. Writes bench/results/preselect_small.json.

    python bench/preselect_small.py [--quick] [--seeds 0 1 2] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUICK_WORLD = {"num_facts": 800, "pool_shards": 2, "docs_per_pool_shard": 4000, "sample_shards": 2,
               "docs_per_sample_shard": 2500, "reference_chars": 300000, "benchmark_items": 400}


def run_seed(seed: int, quick: bool, workers: int, keep: str | None) -> dict:
    from omegaconf import OmegaConf
    from runx.recipes.preselect import PreSelect
    recipe = {"name": "preselect", "ft_bucket": 200000}
    if quick:
        recipe["world"] = QUICK_WORLD
    cfg = OmegaConf.create({"seed": seed, "smoke": False, "recipe": recipe})
    run_dir = keep or tempfile.mkdtemp(prefix=f"preselect_small_{seed}_")
    try:
        t0 = time.perf_counter()
        summary = PreSelect(cfg, run_dir).run(num_workers=workers)
        seconds = time.perf_counter() - t0
        with open(os.path.join(run_dir, "students", "all.done.json")) as f:
            students = json.load(f)
        with open(os.path.join(run_dir, "references", "manifest.json")) as f:
            refs = {k: v["benchmark_accuracy"] for k, v in json.load(f)["shards"].items()}
    finally:
        if keep is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    st = students["students"]
    return {"seed": seed, "seconds": seconds, "budget_chars": students["budget_chars"],
            "compute_multiplier": students["compute_multiplier"], "multiplier_bound": students["multiplier_bound"],
            "acc_preselect": st["preselect"]["accuracy"], "acc_perplexity_filter": st["perplexity_filter"]["accuracy"],
            "acc_oracle_facts": st["oracle_facts"]["accuracy"],
            "random_curve": [{"multiple": c["multiple"], "chars": c["chars"], "accuracy": c["accuracy"]}
                             for c in st["random"]],
            "mix_preselect": st["preselect"]["mix"], "mix_perplexity_filter": st["perplexity_filter"]["mix"],
            "mix_random_x1": st["random"][0]["mix"] if st["random"] else None,
            "reference_abilities": refs, "classifier_auc": summary.get("classifier_auc"),
            "positives": summary.get("positives"), "kept_char_fraction": summary["kept_char_fraction"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller world (about a minute per seed on 2 cores)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", default=None, help="keep the run folders under this directory")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "preselect_small.json"))
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        keep = os.path.join(args.keep, f"seed{seed}") if args.keep else None
        r = run_seed(seed, args.quick, args.workers, keep)
        rows.append(r)
        curve = "  ".join(f"x{c['multiple']}={c['accuracy']:.3f}" for c in r["random_curve"])
        print(f"seed {seed}: PreSelect {r['acc_preselect']:.3f} | perplexity filter {r['acc_perplexity_filter']:.3f}"
              f" | oracle {r['acc_oracle_facts']:.3f} | random {curve} | multiplier {r['compute_multiplier']:.2f}x"
              f" ({r['multiplier_bound']}) | facts share: PreSelect {r['mix_preselect']['facts']:.2f}, random "
              f"{r['mix_random_x1']['facts']:.2f} | {r['seconds']:.0f}s", flush=True)
    mults = [r["compute_multiplier"] for r in rows]
    res = {"quick": args.quick, "seeds": args.seeds, "workers": args.workers,
           "compute_multiplier_mean": sum(mults) / len(mults), "compute_multiplier_min": min(mults),
           "compute_multiplier_geomean": math.exp(sum(math.log(m) for m in mults) / len(mults)),
           "acc_preselect_mean": sum(r["acc_preselect"] for r in rows) / len(rows),
           "acc_random_x1_mean": sum(r["random_curve"][0]["accuracy"] for r in rows) / len(rows),
           "acc_perplexity_filter_mean": sum(r["acc_perplexity_filter"] for r in rows) / len(rows),
           "target": 2.0, "per_seed": rows}
    res["meets_target"] = res["compute_multiplier_min"] >= 2.0
    print(f"compute multiplier over {len(rows)} seeds: mean {res['compute_multiplier_mean']:.2f}x, "
          f"min {res['compute_multiplier_min']:.2f}x (target >= 2x): {'PASS' if res['meets_target'] else 'FAIL'}")
    print(f"mean accuracy: PreSelect {res['acc_preselect_mean']:.3f}, random at equal budget "
          f"{res['acc_random_x1_mean']:.3f}, perplexity filter {res['acc_perplexity_filter_mean']:.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
