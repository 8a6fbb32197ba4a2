"""concept_prune's claim in miniature: accuracy vs kept fraction for DBP, SSP (uniform quotas) and random
pruning, side by side in one run, over several seeds.

Data: scikit-learn digits, a fixed stratified test split that is never pruned, and a train split with
web-like planted duplication (recipe defaults: 40% of images copied 1-20x, Zipf counts, three classes
favoured). Each seed runs the real data job (conf/recipe/concept_prune.yaml settings) and its evaluate
stage trains a logistic regression on every subset at the same budget:
  random        a uniform sample of the (duplicated) train split
  dedup_random  SemDeDup, then a uniform sample of the survivors
  ssp           SemDeDup, uniform cluster quotas, keep the hardest (Sorscher et al.'s SSP, balanced)
  dbp           SemDeDup, quotas from softmax(d_intra * d_inter / T), keep the hardest (Abbas et al.)
Targets (issue #7): DBP >= random at every fraction in [0.2, 0.8]; DBP matches full-data accuracy within
one seed-spread with <= 50% of the data. Writes bench/results/concept_prune_small.json.

    python bench/concept_prune_small.py            # 5 seeds, fractions 0.1 .. 0.8
    python bench/concept_prune_small.py --quick    # 3 seeds, fractions 0.2 .. 0.8
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("random", "dedup_random", "ssp", "dbp")


def recipe_settings(**overrides) -> dict:
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from runx.conf.schema.concept_prune import ConceptPruneConfig
    yaml = OmegaConf.load(os.path.join(HERE, "..", "conf", "recipe", "concept_prune.yaml"))
    rc = asdict(ConceptPruneConfig())
    rc.update(OmegaConf.to_container(yaml.recipe, resolve=True))
    rc.update(overrides)
    return rc


def nulls(a) -> list:
    """A float array as a JSON list, nan (an arm not compared at that fraction) as null."""
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, dtype=float)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    from omegaconf import OmegaConf

    from runx.recipes.concept_prune import ConceptPrune
    seeds = args.seeds or (3 if args.quick else 5)
    # kept fractions of the input the pruned arms can fill at equal size: SemDeDup leaves ~32% of the rows here
    # (larger fractions were compared with those arms capped at the survivors, i.e. at unequal sizes)
    fractions = [0.1, 0.2, 0.3] if args.quick else [0.1, 0.15, 0.2, 0.25, 0.3]
    rc = recipe_settings(eval_fractions=fractions)
    acc = {m: [] for m in METHODS}
    kept = {m: [] for m in METHODS}
    full, removed, n_input, n_unique = [], [], [], []
    t0 = time.perf_counter()
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as d:
            res = ConceptPrune(OmegaConf.create({"recipe": rc, "seed": seed, "smoke": False}), d).run()
            with open(os.path.join(d, "pruned", "eval.json")) as f:
                ev = json.load(f)
        for m in METHODS:
            acc[m].append(ev["accuracy"][m])
            kept[m].append(ev["kept"][m])
        full.append(ev["accuracy_full"])
        removed.append(res["dedup_removed"])
        n_input.append(ev["n_input"])
        n_unique.append(ev["n_unique"])
        print(f"seed {seed}: {ev['n_input']} train rows ({ev['n_unique']} unique), SemDeDup removed "
              f"{res['dedup_removed']}, full-data accuracy {ev['accuracy_full']:.4f}")
    # (null: an arm drawing from SemDeDup's survivors is not compared at a fraction larger than they are)
    A = {m: np.array(v, dtype=float) for m, v in acc.items()}
    full = np.array(full)
    mean = {m: np.nanmean(A[m], 0) if np.isfinite(A[m]).any() else A[m][0] for m in METHODS}
    sd = {m: np.nanstd(A[m], 0) if np.isfinite(A[m]).any() else A[m][0] for m in METHODS}
    print(f"\naccuracy (mean ± sd over {seeds} seeds), fixed test split; full data: "
          f"{full.mean():.4f} ± {full.std():.4f}")
    print("kept   " + "".join(f"{m:>18s}" for m in METHODS) + "   dbp-random")
    for i, f in enumerate(fractions):
        print(f"{f:5.2f}  " + "".join(f"{mean[m][i]:>11.4f} ±{sd[m][i]:.4f}" for m in METHODS)
              + f"   {mean['dbp'][i] - mean['random'][i]:+.4f}")
    in_range = [i for i, f in enumerate(fractions) if 0.2 - 1e-9 <= f <= 0.8 + 1e-9 and np.isfinite(mean["dbp"][i])]
    beats_random = {fractions[i]: bool(mean["dbp"][i] >= mean["random"][i]) for i in in_range}
    spread = max(float(full.std()), float(np.nanmax(sd["dbp"])))
    matches = [f for i, f in enumerate(fractions) if mean["dbp"][i] >= full.mean() - spread]
    smallest = min(matches) if matches else None
    targets = {"dbp>=random at every fraction in [0.2, 0.8] (equal sizes)": bool(beats_random)
               and all(beats_random.values()),
               "dbp matches full (within one seed-spread) with <=50% data": smallest is not None and smallest <= 0.5}
    print(f"\nDBP >= random: {beats_random}")
    print(f"smallest kept fraction where DBP >= full - spread ({full.mean():.4f} - {spread:.4f}): {smallest}")
    print(f"DBP vs SSP (mean over fractions): {np.nanmean(mean['dbp'] - mean['ssp']):+.4f}")
    print("targets:", targets, f"({time.perf_counter() - t0:.0f}s)")
    out = {"seeds": seeds, "fractions": fractions, "settings": {k: rc[k] for k in (
               "num_clusters", "epsilon", "temperature", "balance", "keep", "dedup_keep", "dup_fraction",
               "max_copies", "dup_noise", "embed_dim", "kmeans_iters", "num_neighbors")},
           "n_input": n_input, "n_unique": n_unique, "dedup_removed": removed,
           "accuracy_full": {"mean": float(full.mean()), "sd": float(full.std()), "per_seed": full.tolist()},
           "accuracy": {m: {"mean": nulls(mean[m]), "sd": nulls(sd[m]), "per_seed": [nulls(r) for r in A[m]]}
                        for m in METHODS},
           "kept": {m: nulls(np.nanmean(np.array(kept[m], dtype=float), 0)) for m in METHODS},
           "dbp_beats_random": {str(k): v for k, v in beats_random.items()},
           "smallest_fraction_matching_full": smallest, "spread": spread, "targets": targets}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    name = "concept_prune_small_quick.json" if args.quick else "concept_prune_small.json"
    with open(os.path.join(HERE, "results", name), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
