"""concept_prune: DBP quotas, SemDeDup, spherical k-means, the data job (determinism, resume, split),
inputs and their errors, and `runx train recipe=concept_prune debug=smoke` end to end."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from conftest import child_env

from runx.conf.schema.concept_prune import ConceptPruneConfig
from runx.recipes import concept_prune as cp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(seed=0, smoke=False, **kw):
    return OmegaConf.create({"recipe": asdict(ConceptPruneConfig(**kw)), "seed": seed, "smoke": smoke})


def run_job(run_dir, seed=0, smoke=False, **kw):
    job = cp.ConceptPrune(make_cfg(seed, smoke, **kw), str(run_dir))
    return job, job.run()


def kept_rows(run_dir):
    return pq.read_table(os.path.join(run_dir, "pruned", "kept_ids.parquet")).to_pydict()


def planted_embeddings(n_base=600, d=24, n_exact=60, n_near=60, seed=0):
    """Clustered unit vectors plus exact and near copies of some of them. Returns (X, group) where
    group[i] is the index of the base point row i copies (its own index for base points)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, d))
    base = centres[rng.integers(0, 8, n_base)] + 0.9 * rng.standard_normal((n_base, d))
    src = rng.choice(n_base, n_exact + n_near, replace=False)
    copies = base[src].copy()
    copies[n_exact:] += 0.01 * rng.standard_normal((n_near, d))        # cos ~ 0.9999
    X = np.concatenate([base, copies])
    group = np.concatenate([np.arange(n_base), src])
    perm = rng.permutation(len(X))
    X, group = X[perm], group[perm]
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), group


# =================================================================================== quotas (step 4)
def test_quotas_sum_exactly_and_never_exceed_cluster_size():
    rng = np.random.default_rng(0)
    for trial in range(300):
        k = int(rng.integers(1, 40))
        sizes = rng.integers(0, 50, k) * (rng.random(k) < 0.9)            # some empty clusters
        sizes[rng.integers(0, k)] += 1
        total = int(sizes.sum())
        n_keep = int(rng.integers(0, total + 1)) if trial % 10 else total
        C = rng.random(k) * 0.2
        probs = cp.quota_probabilities(C, sizes, float(rng.choice([0.01, 0.1, 1.0])), "dintra_dinter")
        balance = float(rng.choice([0.0, 0.5, 1.0]))
        q = cp.allocate_quotas(probs, sizes, n_keep, balance)
        lb, _ = cp.quota_bounds(sizes, n_keep, balance)
        assert q.sum() == n_keep
        assert (q <= sizes).all() and (q >= lb).all() and (q >= 0).all()
        assert (q[sizes == 0] == 0).all()
    with pytest.raises(ValueError, match="cannot keep"):
        cp.allocate_quotas(np.ones(3) / 3, np.array([1, 2, 3]), 7, 0.5)


def test_quotas_become_uniform_as_temperature_grows():
    rng = np.random.default_rng(1)
    sizes = rng.integers(200, 400, 25)
    C = rng.random(25) * 0.3
    n_keep = 2000
    q_cold = cp.allocate_quotas(cp.quota_probabilities(C, sizes, 0.01, "dintra_dinter"), sizes, n_keep, 0.0)
    q_hot = cp.allocate_quotas(cp.quota_probabilities(C, sizes, 1e9, "dintra_dinter"), sizes, n_keep, 0.0)
    q_uniform = cp.allocate_quotas(cp.quota_probabilities(C, sizes, 1.0, "uniform"), sizes, n_keep, 0.0)
    assert q_hot.max() - q_hot.min() <= 1 and abs(q_hot - n_keep / 25).max() < 1
    np.testing.assert_array_equal(q_hot, q_uniform)
    assert q_cold.max() - q_cold.min() > 50                                 # the cold end is not uniform
    # spread shrinks monotonically with temperature (clusters large enough that no cap binds)
    big = sizes * 10
    spreads = [np.ptp(cp.allocate_quotas(cp.quota_probabilities(C, big, t, "dintra_dinter"), big, n_keep, 0))
               for t in (0.02, 0.05, 0.2, 1.0, 10.0)]
    assert spreads == sorted(spreads, reverse=True)
    # with caps: the uniform share of a tiny cluster goes to the others, all equal up to rounding
    sizes2 = np.array([5, 1000, 1000, 1000])
    q = cp.allocate_quotas(cp.quota_probabilities(C[:4], sizes2, 1e9, "dintra_dinter"), sizes2, 800, 0.0)
    assert q[0] == 5 and q[1:].max() - q[1:].min() <= 1 and q.sum() == 800


def reference_quotas(target, lb, ub, total, iters=20000):
    """The reference code's QP, min 1/2||x - target||^2 s.t. sum x = total, lb <= x <= ub, i.e. the
    projection of `target` onto (hyperplane n box), by Dykstra's alternating projections: an iterative
    method that knows nothing of the closed form."""
    x, p, q = target.astype(float), np.zeros(len(target)), np.zeros(len(target))
    for _ in range(iters):
        y = np.clip(x + p, lb, ub)
        p = x + p - y
        x_new = (y + q) + (total - (y + q).sum()) / len(y)
        q = y + q - x_new
        if np.abs(x_new - x).max() < 1e-10:
            x = x_new
            break
        x = x_new
    return np.clip(x, lb, ub)


def test_quotas_match_reference_qp_on_random_inputs():
    rng = np.random.default_rng(2)
    for _ in range(25):
        k = int(rng.integers(2, 30))
        sizes = rng.integers(1, 120, k)
        n_keep = int(rng.integers(1, sizes.sum()))
        d_intra, d_inter = rng.uniform(0.05, 0.4, k), rng.uniform(0.2, 0.8, k)
        probs = cp.quota_probabilities(d_intra * d_inter, sizes, float(rng.choice([0.02, 0.1, 0.5])), "dintra_dinter")
        # softmax reference
        z = np.exp(d_intra * d_inter / 1.0)
        assert np.isclose(cp.quota_probabilities(d_intra * d_inter, sizes, 1.0, "dintra_dinter"), z / z.sum()).all()
        lb, ub = cp.quota_bounds(sizes, n_keep, 0.5)
        x = cp.project_quotas(n_keep * probs, lb, ub, n_keep)
        ref = reference_quotas(n_keep * probs, lb.astype(float), ub.astype(float), n_keep)
        np.testing.assert_allclose(x, ref, atol=1e-3 * max(1, n_keep / k))
        q = cp.allocate_quotas(probs, sizes, n_keep, 0.5)
        assert np.abs(q - x).max() < 1 + 1e-6


def test_cluster_complexity_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    C = rng.standard_normal((12, 8))
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    sizes = np.array([10, 1, 5, 7, 0, 9, 3, 4, 8, 2, 6, 11])
    d_intra = rng.uniform(0.1, 0.3, 12)
    d_inter, complexity = cp.cluster_complexity(sizes, d_intra, C.astype(np.float32), num_neighbors=4)
    for j in range(12):
        dist = sorted(1 - C[j] @ C[l] for l in range(12) if l != j)
        assert d_inter[j] == pytest.approx(np.mean(dist[:4]), abs=1e-5)
    big = sizes >= 2
    np.testing.assert_allclose(complexity[big], (d_intra * d_inter)[big], rtol=1e-6)
    assert np.allclose(complexity[~big], (d_intra * d_inter)[big].mean())  # reference's nanmean fill


# ====================================================================================== SemDeDup (step 2)
def test_as_many_clusters_as_rows_is_a_config_problem():
    """recipe.num_clusters=100000 on 4186 rows: faiss was silently given k = rows, every row its own cluster, and
    the run removed no duplicate."""
    from runx.recipes.concept_prune import ConceptPrune
    from runx.trainers.recipe import RecipeConfigError
    with pytest.raises(RecipeConfigError, match=r"recipe.num_clusters=100000: the data has 4186 rows to cluster.*"
                                                r"Valid values: recipe.num_clusters < 4186"):
        ConceptPrune.check_k("recipe.num_clusters", 100000, 4186)
    ConceptPrune.check_k("recipe.dedup_clusters", 40, 4186)


def test_semdedup_cluster_rule_and_tiling():
    e = np.eye(4, dtype=np.float32)
    a, c = e[0], e[1]
    b = (a + 0.01 * e[2]) / np.linalg.norm(a + 0.01 * e[2])
    d = (c + 0.01 * e[3]) / np.linalg.norm(c + 0.01 * e[3])
    # order: a, b~a, c, d~c, a again (exact copy): first of each group survives
    removed = cp.semdedup_cluster(np.stack([a, b, c, d, a]), epsilon=0.01)
    assert removed.tolist() == [False, True, False, True, True]
    # tiled == brute force on random data, for several block sizes
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 16)).astype(np.float32)
    X[150:] = X[:150] + 0.2 * rng.standard_normal((150, 16)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    S = X @ X.T
    brute = np.array([S[j, :j].max() > 0.9 if j else False for j in range(300)])
    for block in (1, 300 * 7, 300 * 64, 1 << 24):
        np.testing.assert_array_equal(cp.semdedup_cluster(X, 0.1, block_elems=block), brute)


def test_semdedup_keeps_the_member_farthest_from_the_centroid():
    dist = np.array([0.3, 0.1, 0.3, 0.5])
    rows = np.array([7, 3, 2, 9])
    assert rows[cp.within_cluster_order(dist, rows, "hard", 0, 0)].tolist() == [9, 2, 7, 3]
    assert rows[cp.within_cluster_order(dist, rows, "easy", 0, 0)].tolist() == [3, 2, 7, 9]
    r1 = cp.within_cluster_order(dist, rows, "random", 5, 1)
    assert sorted(r1.tolist()) == [0, 1, 2, 3]
    assert (r1 == cp.within_cluster_order(dist, rows, "random", 5, 1)).all()


def test_semdedup_removes_planted_exact_and_near_duplicates(tmp_path):
    X, group = planted_embeddings()
    np.save(tmp_path / "emb.npy", X)
    job, res = run_job(tmp_path / "job", input="embeddings", path=str(tmp_path / "emb.npy"), num_clusters=6,
                       epsilon=0.01, keep_fraction=1.0, budget_of="deduplicated", shard_size=256)
    removed = set(job.removed_rows().tolist())
    first = {}
    for i, g in enumerate(group):
        first.setdefault(g, []).append(i)
    # a removal is right if its group still has another member: true positives per group = min(removed, size - 1)
    tp = sum(min(sum(i in removed for i in rows), len(rows) - 1) for rows in first.values())
    n_planted = sum(len(rows) - 1 for rows in first.values())
    assert n_planted == 120
    precision, recall = tp / max(1, len(removed)), tp / n_planted
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    survivors_per_group = [sum(i not in removed for i in rows) for rows in first.values() if len(rows) > 1]
    assert min(survivors_per_group) >= 1                                  # never lose a whole group
    assert np.mean(np.array(survivors_per_group) == 1) >= 0.95
    assert res["dedup_removed"] == len(removed)
    with open(tmp_path / "job" / "pruned" / "manifest.json") as f:
        assert json.load(f)["dedup_removed"] == len(removed)
    # the survivor of each duplicate group is the one farthest from its cluster's centroid ("hard")
    C = np.load(tmp_path / "job" / "kmeans" / "centroids.npy")
    for rows in first.values():
        if len(rows) > 1:
            alive = [i for i in rows if i not in removed]
            lab = np.argmax(X[rows] @ C.T, axis=1)
            if len(alive) == 1 and len(set(lab)) == 1:
                cos = X[rows] @ C[lab[0]]
                assert cos[rows.index(alive[0])] <= cos.min() + 1e-6


# ======================================================================== k-means + job determinism
def test_spherical_kmeans_is_deterministic_for_a_seed():
    X, _ = planted_embeddings(seed=4)
    a = cp.spherical_kmeans(X, 10, 10, seed=7)
    b = cp.spherical_kmeans(X, 10, 10, seed=7)
    c = cp.spherical_kmeans(X, 10, 10, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)   # spherical: unit centroids
    lab, cos = cp.assign_to_centroids(X, a)
    np.testing.assert_array_equal(lab, np.argmax(X @ a.T, axis=1))
    np.testing.assert_allclose(cos, (X @ a.T).max(1), atol=1e-5)


def test_job_is_deterministic_resumable_and_splittable(tmp_path):
    X, _ = planted_embeddings(seed=5)
    np.save(tmp_path / "emb.npy", X)
    kw = dict(input="embeddings", path=str(tmp_path / "emb.npy"), num_clusters=6, epsilon=0.01,
              keep_fraction=0.4, shard_size=200, keep="random", dedup_keep="random")
    run_job(tmp_path / "a", seed=3, **kw)
    ref = kept_rows(tmp_path / "a")
    assert len(ref["row"]) == round(0.4 * len(X))
    # same seed, fresh dir: identical output
    run_job(tmp_path / "b", seed=3, **kw)
    assert kept_rows(tmp_path / "b") == ref
    # another seed: another subset
    run_job(tmp_path / "c", seed=4, **kw)
    assert kept_rows(tmp_path / "c")["row"] != ref["row"]
    # killed after k-means, then resumed: earlier shards are skipped, output identical
    job = cp.ConceptPrune(make_cfg(3, **kw), str(tmp_path / "d"))
    job.run(only=["embed", "kmeans"])
    mtime = os.path.getmtime(tmp_path / "d" / "embed" / "00000.npy")
    cp.ConceptPrune(make_cfg(3, **kw), str(tmp_path / "d")).run()
    assert os.path.getmtime(tmp_path / "d" / "embed" / "00000.npy") == mtime
    assert kept_rows(tmp_path / "d") == ref
    # split across two array tasks (each rerun until its share of every stage is done)
    pending = {0, 1}
    for _ in range(20):
        for t in sorted(pending, reverse=True):
            r = cp.ConceptPrune(make_cfg(3, **kw), str(tmp_path / "e")).run(task_index=t, num_tasks=2)
            if "incomplete_stage" not in r:
                pending.discard(t)
        if 0 not in pending:
            break
    assert kept_rows(tmp_path / "e") == ref
    # two worker processes
    cp.ConceptPrune(make_cfg(3, **kw), str(tmp_path / "f")).run(num_workers=2)
    assert kept_rows(tmp_path / "f") == ref
    # a run dir refuses other settings
    with pytest.raises(ValueError, match="keep_fraction"):
        cp.ConceptPrune(make_cfg(3, **dict(kw, keep_fraction=0.5)), str(tmp_path / "a")).run()


def test_job_outputs_hard_pruning_and_quotas(tmp_path):
    X, _ = planted_embeddings(n_base=800, seed=6)
    np.save(tmp_path / "emb.npy", X)
    job, res = run_job(tmp_path / "j", input="embeddings", path=str(tmp_path / "emb.npy"), num_clusters=8,
                       epsilon=0.01, keep_fraction=0.3, temperature=0.05, shard_size=300)
    out = tmp_path / "j" / "pruned"
    for f in ("kept_ids.parquet", "clusters.parquet", "manifest.json", "quota_vs_size.png"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "quota_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = pq.read_table(out / "kept_ids.parquet").to_pandas()
    table = pq.read_table(out / "clusters.parquet").to_pandas()
    n_keep = round(0.3 * len(X))
    assert len(kept) == n_keep == res["kept"] == table["quota"].sum()
    assert (table["kept"] == table["quota"]).all() and (table["quota"] <= table["size"]).all()
    assert table["size"].sum() == len(X) - res["dedup_removed"]
    assert not set(kept["row"]) & set(job.removed_rows().tolist())
    np.testing.assert_array_equal(kept["id"], kept["row"])              # .npy input: ids are row numbers
    # each kept sample names its input file and its row there (the row number alone spans all the files)
    assert set(kept["file"]) == {str(tmp_path / "emb.npy")}
    np.testing.assert_array_equal(kept["file_row"], kept["row"])
    # hard: inside every cluster, every kept sample is at least as far from the centroid as any dropped one
    for g in job.concept_groups(None):
        m = job.concept_members(g)
        for c, lo, hi in cp._cluster_runs(m["cluster"]):
            is_kept = np.isin(m["rows"][lo:hi], kept["row"])
            if is_kept.any() and (~is_kept).any():
                assert m["dist"][lo:hi][is_kept].min() >= m["dist"][lo:hi][~is_kept].max() - 1e-6
    # DBP gives more to complex clusters than SSP's uniform quotas would
    assert np.corrcoef(table["complexity"], table["quota"] / table["size"].clip(1))[0, 1] > 0


def test_eval_fractions_beyond_the_deduplicated_set_are_not_compared_with_capped_arms(tmp_path, caplog):
    """The embedded default under smoke (fractions 0.2 and 0.4 of ~900 rows, ~300 left after SemDeDup): at 0.4 the
    arms drawing from the survivors could keep only ~300 rows, not 360. They are skipped there, not silently capped
    and compared with random at 360; eval.json and the summary give each arm's kept count, and a warning names 0.4."""
    caplog.set_level("WARNING", logger="runx.concept_prune")
    job, res = run_job(tmp_path / "j", smoke=True, epsilon=0.03, num_clusters=30, keep_fraction=0.3, temperature=0.1,
                       eval_fractions=[0.2, 0.4])
    ev = json.loads((tmp_path / "j" / "pruned" / "eval.json").read_text())
    n_input, n_dedup = ev["n_input"], ev["n_after_dedup"]
    assert ev["fractions"] == [0.2, 0.4] and round(0.2 * n_input) <= n_dedup < round(0.4 * n_input)
    for arm in ("dedup_random", "ssp", "dbp"):                 # at 0.4 they are not reported, rather than capped
        assert ev["accuracy"][arm][1] is None and ev["kept"][arm][1] is None
        assert f"accuracy_{arm}@0.4" not in res and f"kept_{arm}@0.4" not in res
    for arm in ("random", "dedup_random", "ssp", "dbp"):       # at 0.2 every arm trains on the same number of rows
        assert ev["kept"][arm][0] == round(0.2 * n_input) and 0 < ev["accuracy"][arm][0] <= 1
        assert res[f"kept_{arm}@0.2"] == ev["kept"][arm][0] and res[f"accuracy_{arm}@0.2"] == ev["accuracy"][arm][0]
    assert ev["kept"]["random"][1] == round(0.4 * n_input) and res["accuracy_random@0.4"] == ev["accuracy"]["random"][1]
    assert ev["capped_fractions"] == [0.4] and ev["target"] == [round(0.2 * n_input), round(0.4 * n_input)]
    assert res["eval_capped_fractions"] == "0.4"
    warned = [r.getMessage() for r in caplog.records if "eval_fractions" in r.getMessage()]
    assert len(warned) == 1 and "0.4" in warned[0] and "0.2" not in warned[0] and f"{n_dedup} left" in warned[0]


def test_separate_dedup_clustering_and_float16_shards(tmp_path):
    X, group = planted_embeddings(seed=7)
    np.save(tmp_path / "emb.npy", X)
    job, res = run_job(tmp_path / "j", input="embeddings", path=str(tmp_path / "emb.npy"), num_clusters=5,
                       dedup_clusters=12, epsilon=0.01, keep_fraction=0.5, budget_of="deduplicated",
                       embed_dtype="float16", shard_size=250)
    assert np.load(tmp_path / "j" / "embed" / "00000.npy", mmap_mode="r").dtype == np.float16
    assert (tmp_path / "j" / "recluster" / "centroids.npy").exists()
    assert res["dedup_removed"] >= 110
    n_dedup = len(X) - res["dedup_removed"]
    assert res["kept"] == round(0.5 * n_dedup)
    table = pq.read_table(tmp_path / "j" / "pruned" / "clusters.parquet").to_pandas()
    assert len(table) == 5 and table["size"].sum() == n_dedup


# =========================================================================== inputs and their errors
def test_parquet_embeddings_keep_their_ids_and_bad_rows_are_named(tmp_path):
    X, _ = planted_embeddings(n_base=200, n_exact=10, n_near=10, seed=8)
    ids = [f"doc-{i}" for i in range(len(X))]
    pq.write_table(pa.table({"id": ids, "embedding": [list(map(float, x)) for x in X]}), tmp_path / "e.parquet")
    run_job(tmp_path / "j", input="embeddings", path=str(tmp_path), num_clusters=4, epsilon=0.01,
            keep_fraction=0.5)
    kept = kept_rows(tmp_path / "j")
    assert kept["id"] == [ids[r] for r in kept["row"]]
    bad = [list(map(float, x)) for x in X[:5]]
    bad[3] = bad[3][:-1]
    pq.write_table(pa.table({"embedding": bad}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: row 3"):
        run_job(tmp_path / "k", input="embeddings", path=str(tmp_path / "bad.parquet"), num_clusters=2)
    np.save(tmp_path / "flat.npy", np.ones(10, np.float32))
    with pytest.raises(ValueError, match=r"flat\.npy: expected a 2-D array"):
        run_job(tmp_path / "l", input="embeddings", path=str(tmp_path / "flat.npy"))
    zero = X[:20].copy()
    zero[7] = 0
    np.save(tmp_path / "zero.npy", zero)
    with pytest.raises(ValueError, match=r"zero\.npy.*row 7"):
        run_job(tmp_path / "m", input="embeddings", path=str(tmp_path / "zero.npy"), num_clusters=2)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"recipe.keep_fraction=1.5"):
        cp.ConceptPrune(make_cfg(keep_fraction=1.5), str(tmp_path))
    with pytest.raises(ValueError, match=r"recipe.path is empty"):
        cp.ConceptPrune(make_cfg(input="text"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"recipe.path=/nonexistent"):
        run_job(tmp_path / "x", input="embeddings", path="/nonexistent/e.npy")



def test_config_problems_name_the_key_and_the_valid_choices(tmp_path):
    from runx.trainers.recipe import RecipeConfigError, build_recipe
    (tmp_path / "imgs").mkdir()
    with pytest.raises(RecipeConfigError, match=r"recipe.encoder=builtin:minilm: not an image encoder.*"
                                                r"torchvision:<arch>.*Hugging Face image model"):
        build_recipe(cp.ConceptPrune, make_cfg(input="images", path=str(tmp_path / "imgs")), str(tmp_path / "r"))
    with pytest.raises(RecipeConfigError, match=r"recipe.encoder=torchvision:resnet18: an image encoder"):
        build_recipe(cp.ConceptPrune, make_cfg(input="text", path=str(tmp_path), encoder="torchvision:resnet18"),
                     str(tmp_path / "r"))


def test_a_text_field_typo_names_the_fields_and_can_be_fixed_in_the_same_run_dir(tmp_path):
    from runx.trainers.recipe import RecipeConfigError
    rows = [{"uid": i, "content": f"sample text number {i}"} for i in range(12)]
    (tmp_path / "single.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(input="text", path=str(tmp_path / "single.jsonl"), id_field="uid", num_clusters=2, epsilon=0.01,
              keep_fraction=0.5, max_length=16)
    with pytest.raises(RecipeConfigError, match=r"single\.jsonl:1: no text field recipe.text_field='text' "
                                                r"\(fields there: content, uid\)"):
        run_job(tmp_path / "run", **kw)
    _, res = run_job(tmp_path / "run", text_field="content", **kw)        # nothing was finished: re-pinned
    assert res["n_input"] == 12


def test_rerun_after_the_inputs_changed_is_refused_and_resume_never_starts_over_from_the_cli(tmp_path):
    from runx.trainers.recipe import RecipeConfigError
    X, _ = planted_embeddings(n_base=120, n_exact=5, n_near=5, seed=9)
    np.save(tmp_path / "emb.npy", X)
    kw = dict(input="embeddings", path=str(tmp_path / "emb.npy"), num_clusters=3, epsilon=0.01, keep_fraction=0.4)
    run_job(tmp_path / "run", **kw)
    np.save(tmp_path / "emb.npy", X[:100])                                # the input file was replaced
    with pytest.raises(RecipeConfigError, match=r"input files \(1 files, \d+ bytes -> 1 files, \d+ bytes, e.g. "
                                                r".*emb\.npy was modified\).*resume=never"):
        run_job(tmp_path / "run", **kw)
    env = child_env({"WANDB_MODE": "disabled"})
    cmd = [sys.executable, "-m", "runx.cli.main", "train", "recipe=concept_prune", "recipe.input=embeddings",
           f"recipe.path={tmp_path / 'emb.npy'}", "recipe.num_clusters=3", "recipe.epsilon=0.01",
           "recipe.keep_fraction=0.5", "logger=none", f"run_dir={tmp_path / 'run'}"]
    # refused before the run dir's config.yaml is (re)written: the folder still describes its own job
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 2 and "resume=never" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()
    out = subprocess.run(cmd + ["resume=never"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_input"] == 100 and summary["kept"] == 50

def test_text_encoder_minilm_mean_pooling(tmp_path):
    texts = ["a cat sits on the mat", "a kitten is sitting on a rug", "stock markets fell sharply today",
             "the cat sat on the mat"]
    enc = cp.TextEncoder("builtin:minilm", "mean", 64, batch_size=4, device="cpu")
    batched = np.concatenate(list(enc(texts)))
    alone = np.concatenate([np.concatenate(list(enc([t]))) for t in texts])   # no padding involved
    np.testing.assert_allclose(batched, alone, atol=1e-5)                   # padding is masked out
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    S = batched @ batched.T
    assert S[0, 3] > S[0, 1] > S[0, 2]
    # bad JSONL names file and line
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: no text field"):
        cp.read_texts(str(tmp_path / "d.jsonl"), 0, 2, ConceptPruneConfig())
    (tmp_path / "e.jsonl").write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(ValueError, match=r"e\.jsonl:2: not valid JSON"):
        cp.read_texts(str(tmp_path / "e.jsonl"), 0, 2, ConceptPruneConfig())



def test_text_input_reads_compressed_and_ndjson_files_and_names_what_it_cannot_read(tmp_path, caplog):
    import gzip
    import logging
    import zstandard
    folder = tmp_path / "pool"
    (folder / "sub").mkdir(parents=True)
    rows = [json.dumps({"id": f"d{i}", "text": f"document number {i}"}) + "\n" for i in range(40)]
    (folder / "a.jsonl").write_text("".join(rows[:10]))
    (folder / "b.jsonl.gz").write_bytes(gzip.compress("".join(rows[10:20]).encode()))
    (folder / "sub" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(rows[20:30]).encode()))
    (folder / "d.ndjson").write_text("".join(rows[30:35]))
    (folder / "e.csv.gz").write_bytes(gzip.compress(b"id,text\nc1,first csv row\nc2,second csv row\n"))
    (folder / "f.txt.gz").write_bytes(gzip.compress(b"a line\nanother line\n"))
    (folder / "README.md").write_text("not data")
    with caplog.at_level(logging.WARNING):
        job = cp.ConceptPrune(make_cfg(input="text", path=str(folder)), str(tmp_path / "run"))
        counts = {os.path.basename(f): n for f, n in job._input_files()}
    assert counts == {"a.jsonl": 10, "b.jsonl.gz": 10, "c.jsonl.zst": 10, "d.ndjson": 5, "e.csv.gz": 2,
                      "f.txt.gz": 2}
    assert any("README.md" in r.getMessage() and "skipped 1 file" in r.getMessage() for r in caplog.records)
    ids, texts = cp.read_texts(str(folder / "sub" / "c.jsonl.zst"), 2, 4, job.rc)
    assert ids.to_pylist() == ["d22", "d23"] and texts == ["document number 22", "document number 23"]
    assert cp.read_texts(str(folder / "e.csv.gz"), 0, 2, job.rc)[1] == ["first csv row", "second csv row"]
    (folder / "g.jsonl.bz2").write_bytes(b"BZh9")                  # a data file in a compression not read
    with pytest.raises(ValueError, match=r"cannot read .*g\.jsonl\.bz2.*gzip"):
        cp.ConceptPrune(make_cfg(input="text", path=str(folder)), str(tmp_path / "run2"))

def test_text_and_image_inputs_run_the_job(tmp_path):
    from PIL import Image
    rows = [{"id": 100 + i, "text": t} for i, t in enumerate(
        ["the cat sat on the mat", "the cat sat on the mat", "a dog runs in the park", "dogs run in parks",
         "interest rates rise again", "the central bank raised rates", "a recipe for tomato soup",
         "how to cook tomato soup"] * 2)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, res = run_job(tmp_path / "jt", input="text", path=str(tmp_path / "t.jsonl"), num_clusters=3,
                     epsilon=0.01, keep_fraction=0.25, budget_of="deduplicated", max_length=32)
    assert res["dedup_removed"] >= 8                           # every text appears twice (exact copies)
    kept = kept_rows(tmp_path / "jt")
    assert all(i == 100 + r for i, r in zip(kept["id"], kept["row"]))
    img = tmp_path / "imgs"
    img.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        arr = (rng.random((20, 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(img / f"{i}.png")
        if i < 2:
            Image.fromarray(arr).save(img / f"{i}_copy.png")
    _, res = run_job(tmp_path / "ji", input="images", path=str(img), encoder="torchvision:resnet18",
                     image_size=32, num_clusters=2, epsilon=0.001, keep_fraction=0.5, budget_of="deduplicated")
    assert res["dedup_removed"] == 2
    assert all(str(i).endswith(".png") for i in kept_rows(tmp_path / "ji")["id"])


# ================================================================================ embedded default + CLI
def test_digits_default_plants_duplicates_and_a_fixed_test_split():
    a = cp.digits_with_planted_duplicates(0, 0.4, 20, 0.2)
    b = cp.digits_with_planted_duplicates(1, 0.4, 20, 0.2)
    np.testing.assert_array_equal(a["X_test"], b["X_test"])            # never depends on the seed
    assert len(a["X_train"]) > 2 * a["n_unique"]
    assert len(np.unique(a["origin"])) == a["n_unique"]
    E = cp.digits_embedding(a["X_train"], 32)
    first = {}
    for i, o in enumerate(a["origin"]):
        first.setdefault(o, i)
    rep = np.array([first[o] for o in a["origin"]])
    assert ((E * E[rep]).sum(1) > 0.97).all()                           # copies sit within epsilon=0.03


def test_cli_smoke_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    env = child_env({"WANDB_MODE": "disabled"})
    out = subprocess.run([sys.executable, "-m", "runx.cli.main", "train", "recipe=concept_prune", "debug=smoke",
                          f"run_dir={run_dir}"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "pruned" / "manifest.json").read_text())
    ev = json.loads((run_dir / "pruned" / "eval.json").read_text())
    assert summary["kept"] == manifest["kept"] == round(0.3 * manifest["n_input"])
    assert manifest["dedup_removed"] > 0.5 * (manifest["n_input"] - ev["n_unique"])
    assert set(ev["accuracy"]) == {"random", "dedup_random", "ssp", "dbp"}
    assert 0.5 < ev["accuracy_full"] <= 1 and 0.5 < summary["accuracy_kept"] <= 1
    for stage in ("embed", "kmeans", "assign", "dedup", "quota", "prune", "write", "evaluate"):
        assert json.loads((run_dir / stage / "manifest.json").read_text())["complete"], stage



@pytest.mark.parametrize("recipe,key,array", [("concept_prune", "kept", False), ("preselect", "kept_docs", True)],
                         ids=["concept_prune", "preselect_slurm_array"])
def test_logger_wandb_records_the_data_job(tmp_path, recipe, key, array):
    """logger=wandb on a data job: one offline W&B run with the job's final numbers, and its sync command. As a
    SLURM array (2 tasks, rerun until done: 9 rounds), the task that completes the job records it; unfinished
    rounds make no W&B run."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "runx.cli.main", "train", f"recipe={recipe}", "debug=smoke", "logger=wandb",
           f"run_dir={run_dir}"]
    for round_ in range(20 if array else 1):
        task = {"SLURM_ARRAY_TASK_ID": str(round_ % 2), "SLURM_ARRAY_TASK_COUNT": "2"} if array else {}
        out = subprocess.run(cmd, capture_output=True, text=True, env={**env, **task}, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        done = "incomplete_stage" not in json.loads((run_dir / "summary.json").read_text())
        assert ("wandb sync" in out.stdout) == done and (run_dir / "wandb").exists() == done, out.stdout[-2000:]
        if done:
            break
    assert done and (round_ > 1) == array
    runs = [d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    value = str(json.loads((run_dir / "summary.json").read_text())[key]).encode()
    # the offline run's summary record: a SummaryItem protobuf (key, value_json)
    data = next((run_dir / "wandb" / runs[0]).glob("run-*.wandb")).read_bytes()
    assert b"\n" + bytes([len(key)]) + key.encode() + b"\x82\x01" + bytes([len(value)]) + value in data


def test_faiss_loader_probe_lines_are_quiet():
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "import runx.recipes.concept_prune as cp; import faiss\n"
            "cp.spherical_kmeans(__import__('numpy').eye(4, dtype='float32'), 2, 2, 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "faiss.loader" not in out.stderr

# ================================================================================== GPU (run where CUDA is)
def _has_cuda():
    import torch
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs CUDA")
def test_cuda_paths_match_cpu_and_are_deterministic(tmp_path):
    X, group = planted_embeddings(seed=9)
    # SemDeDup on the GPU == on the CPU
    for eps in (0.01, 0.3):
        np.testing.assert_array_equal(cp.semdedup_cluster(X, eps, "cuda", block_elems=len(X) * 64),
                                      cp.semdedup_cluster(X, eps, "cpu", block_elems=len(X) * 64))
    # torch k-means on CUDA: deterministic for a seed, unit centroids, assignment == argmax
    a = cp.spherical_kmeans(X, 8, 10, seed=3, device="cuda")
    np.testing.assert_array_equal(a, cp.spherical_kmeans(X, 8, 10, seed=3, device="cuda"))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    lab, cos = cp.assign_to_centroids(X, a, "cuda")
    assert (lab == np.argmax(X @ a.T, axis=1)).mean() > 0.999
    # the whole job on CUDA: same planted duplicates found, same output twice
    np.save(tmp_path / "emb.npy", X)
    kw = dict(input="embeddings", path=str(tmp_path / "emb.npy"), num_clusters=6, epsilon=0.01, keep_fraction=0.4,
              device="cuda")
    _, r1 = run_job(tmp_path / "a", **kw)
    _, r2 = run_job(tmp_path / "b", **kw)
    assert kept_rows(tmp_path / "a") == kept_rows(tmp_path / "b")
    assert 114 <= r1["dedup_removed"] <= 126


def test_ids_of_mixed_types_in_one_file_are_read_as_text(tmp_path):
    """ids 7 and "doc-7" in one JSONL file ended the embed stage in a bare pyarrow ArrowTypeError; a file with a
    byte-order mark lost its first line to a JSON error."""
    from types import SimpleNamespace

    from runx.recipes.concept_prune import read_texts
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"id": i if i % 2 else f"doc-{i}", "text": f"t{i}"}) + "\n" for i in range(4)),
                    encoding="utf-8-sig")
    ids, texts = read_texts(str(path), 0, 4, SimpleNamespace(text_field="text", id_field="id"))
    assert ids.to_pylist() == ["doc-0", "1", "doc-2", "3"] and texts == ["t0", "t1", "t2", "t3"]


def test_kept_samples_name_their_file_and_row_there(tmp_path):
    """kept_ids.parquet's `row` counts across all input files (and its `id` is that row where the data has no id
    field): the kept samples could not be found in a folder of files. Its `file` / `file_row` columns say where."""
    X, _ = planted_embeddings(n_base=300, seed=3)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "a.npy", X[:200])
    np.save(tmp_path / "in" / "b.npy", X[200:])
    run_job(tmp_path / "j", input="embeddings", path=str(tmp_path / "in"), num_clusters=4, epsilon=0.01,
            keep_fraction=0.5, shard_size=150)
    kept = pq.read_table(tmp_path / "j" / "pruned" / "kept_ids.parquet").to_pandas()
    assert set(kept["file"]) == {str(tmp_path / "in" / "a.npy"), str(tmp_path / "in" / "b.npy")}
    for file, row, file_row in zip(kept["file"], kept["row"], kept["file_row"]):
        np.testing.assert_array_equal(np.load(file)[file_row], X[row])


def test_temp_files_of_killed_writers_go_when_their_stage_starts_again(tmp_path):
    """A run killed while embedding left its memory-mapped, shard-sized embed/.tmp-<pid>-<key>.npy (one per worker)
    for good. A stage now removes the temps of writers that no longer run, in its folder and the folders it writes
    into; a live process's temps (another run's workers) and those of another machine (a SLURM array task on
    another node) stay, except for the very output the stage is about to write."""
    X, _ = planted_embeddings(n_base=200, n_exact=10, n_near=10, seed=2)
    np.save(tmp_path / "emb.npy", X)
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    dead, live, elsewhere = reaped.pid, os.getpid(), "00000000"   # (a machine tag that is not this machine's)
    run = tmp_path / "run"
    planted = {"embed/.tmp-{dead}-00000.npy": False,               # the killed embedding of shard 0
               "embed/.tmp-{dead}-3f9a2c1b7d0e": False,            # a killed marker write
               "embed/.tmp-{dead}@{elsewhere}-00001.npy": False,   # shard 1, killed on another node
               "embed/.tmp-{dead}@{elsewhere}-99999.npy": True,    # not this task's to judge
               "embed/.tmp-{live}-99999.npy": True,                # a live process's
               "pruned/.tmp-{dead}-kept_ids.parquet": False,
               "pruned/.tmp-{live}-notes.txt": True,
               ".tmp-{dead}-inputs.json": False}
    for name in planted:
        path = run / name.format(dead=dead, live=live, elsewhere=elsewhere)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 4096)
    run_job(run, input="embeddings", path=str(tmp_path / "emb.npy"), num_clusters=4, epsilon=0.01,
            keep_fraction=0.5, shard_size=120)
    for name, stays in planted.items():
        assert (run / name.format(dead=dead, live=live, elsewhere=elsewhere)).exists() == stays, name
    assert len(kept_rows(run)["row"]) == round(0.5 * len(X))


# ============================================================================== scale: memory and tiles
_POOLS = []   # proxy pools stay alive: a buffer freed after the test still goes through its pool


def _arrow_peak(fn):
    """(fn(), peak bytes Arrow allocated while it ran)."""
    base = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(base)
    _POOLS.append(pool)
    pa.set_memory_pool(pool)
    try:
        return fn(), pool.max_memory()
    finally:
        pa.set_memory_pool(base)


def test_a_shard_of_a_parquet_or_csv_file_reads_only_its_rows(tmp_path):
    """read_texts / read_embeddings read the whole file (pq.read_table, read_csv) for every shard and sliced it:
    memory grew with the file, and the I/O of a job with N^2 / shard_size. Now a shard reads its row groups (Parquet,
    only the columns it needs) or streams the CSV a block at a time: the peak stays near the shard's size."""
    import pyarrow.csv as pcsv
    from types import SimpleNamespace
    rng = np.random.default_rng(0)
    n, group = 16000, 500
    texts = [f"row {i} " + "x" * int(rng.integers(900, 1100)) for i in range(n)]        # ~16 MB of text
    t = pa.table({"id": [f"doc-{i}" for i in range(n)], "text": texts, "unused": texts})
    pq.write_table(t, tmp_path / "t.parquet", row_group_size=group)                    # 32 row groups
    pcsv.write_csv(t.select(["id", "text"]), tmp_path / "t.csv")
    rc = SimpleNamespace(text_field="text", id_field="id")
    # the CSV stream's peak, 1 MB blocks in flight, measured 5.9-6.3 MB depending on this process's earlier Arrow
    # use (6 MB failed 2 of 3 runs beside test_preselect.py); a whole read is >= the file's 16 MB
    for name, bound in (("t.parquet", 6e6), ("t.csv", 8e6)):
        file = str(tmp_path / name)
        assert cp.count_rows(file, rc) == n
        for a, b in ((0, 7), (n - 600, n), (480, 1530)):                               # across row groups
            (ids, got), peak = _arrow_peak(lambda: cp.read_texts(file, a, b, rc))
            assert got == texts[a:b] and ids.to_pylist() == [f"doc-{i}" for i in range(a, b)], (name, a, b)
            del ids
            # the shard is ~1 MB; the whole file 16 (CSV) to 32 MB (Parquet, two text columns)
            assert peak < bound, (name, a, b, peak)
        _, peak = _arrow_peak(lambda: cp.count_rows(file, rc))
        assert peak < bound, (name, peak)
    # Parquet embeddings: the shard's row groups of the embedding and id columns
    X = rng.standard_normal((n, 64)).astype(np.float32)
    pq.write_table(pa.table({"id": np.arange(n) * 10, "embedding": list(X), "unused": texts}),
                   tmp_path / "e.parquet", row_group_size=group)
    rc = SimpleNamespace(embedding_field="embedding", id_field="id")
    (ids, batches), peak = _arrow_peak(lambda: cp.read_embeddings(str(tmp_path / "e.parquet"), 7000, 7700, rc))
    np.testing.assert_allclose(np.concatenate(list(batches)), X[7000:7700] / np.linalg.norm(X[7000:7700], axis=1,
                                                                                           keepdims=True), rtol=1e-6)
    assert ids.to_pylist() == list(range(70000, 77000, 10))
    assert peak < 6e6, peak


def test_a_csv_whose_types_change_after_the_first_block_reads_as_before(tmp_path):
    """pyarrow's streaming CSV reader takes the column types from the first block and fails on a later block that
    does not convert; read_csv loosens the type instead (here: int ids, then one that is not a number, so all ids
    are text). Such a file is read whole, as before, with the same ids."""
    from types import SimpleNamespace
    n = 60000
    lines = [f"{i},text number {i} " + "y" * 40 for i in range(n)]
    lines[-1] = "x-last,the last text"
    (tmp_path / "t.csv").write_text("id,text\n" + "\n".join(lines) + "\n")
    rc = SimpleNamespace(text_field="text", id_field="id")
    assert cp.count_rows(str(tmp_path / "t.csv"), rc) == n
    ids, texts = cp.read_texts(str(tmp_path / "t.csv"), 10, 13, rc)
    assert ids.to_pylist() == ["10", "11", "12"] and texts[0].startswith("text number 10 ")
    job = cp.ConceptPrune(make_cfg(input="text", path=str(tmp_path / "t.csv"), shard_size=25000), str(tmp_path / "r"))
    assert [p.get("csv_stream") for p in job.input_plan()] == [False] * 3


def _shard_reads(job):
    """[(ids, texts)] of every embedding shard of a text job, read as embed_shard reads them (no encoder)."""
    job._encoder = lambda texts: texts
    return [(None if ids is None else ids.to_pylist(), texts) for ids, texts in map(job._read_and_encode,
                                                                                     job.input_plan())]


def test_a_shard_of_a_jsonl_or_txt_file_starts_at_its_first_row(tmp_path):
    """A JSONL / .txt shard read the file from byte 0 and skipped the rows before its own: the shards of one file read
    N^2 / (2 shard_size) rows in all (1M rows in 10k-row shards: 25 s instead of 6; gzip decompresses them too). The
    count notes where each shard's first row starts ([byte, line number], one per shard, in inputs.json) and the
    shard seeks there: the same rows, ids and error lines as a read of the whole file, with blank, whitespace and CRLF
    lines, a BOM and a U+2028 inside a string (one line to the reader)."""
    from types import SimpleNamespace
    folder = tmp_path / "in"
    folder.mkdir()
    lines = []
    for i in range(60):
        text = f"text {i}" + ("\u2028after a line separator" if i % 7 == 3 else "")
        lines.append(json.dumps({"id": f"d{i}", "text": text}, ensure_ascii=False) + ("\r\n" if i % 3 == 1 else "\n"))
        if i % 5 == 2:
            lines.append(" \t\n" if i % 2 else "\r\n")                     # blank lines: whitespace, a CRLF
    (folder / "a.jsonl").write_bytes(("\ufeff" + "".join(lines)).encode())
    (folder / "b.txt").write_bytes("first\r\n\n日本語の行\nwith\u2028separator\n  \nlast line".encode())
    rc = SimpleNamespace(text_field="text", id_field="id")
    whole_ids, whole = cp.read_texts(str(folder / "a.jsonl"), 0, 60, rc)
    assert whole_ids.to_pylist() == [f"d{i}" for i in range(60)] and whole[3] == "text 3\u2028after a line separator"
    whole_txt = cp.read_texts(str(folder / "b.txt"), 0, 5, rc)[1]
    assert whole_txt == ["first", "日本語の行", "with\u2028separator", "last line"]
    for size in (1, 4, 7, 60):
        job = cp.ConceptPrune(make_cfg(input="text", path=str(folder), shard_size=size), str(tmp_path / f"r{size}"))
        assert all(len(p["seek"]) == 2 for p in job.input_plan())
        assert json.loads((tmp_path / f"r{size}" / "inputs.json").read_text()) == job.input_plan()
        got = _shard_reads(job)
        assert [i for ids, _ in got if ids for i in ids] == whole_ids.to_pylist(), size
        assert [t for _, texts in got for t in texts] == whole + whole_txt, size
    # an error names the same line as before
    k = next(i for i, line in enumerate(lines) if '"d35"' in line)
    lines[k], lineno = lines[k].replace('"text 35"', "35"), k + 1
    (folder / "a.jsonl").write_bytes(("\ufeff" + "".join(lines)).encode())
    with pytest.raises(ValueError, match=rf"a\.jsonl:{lineno}: no text field"):
        cp.read_texts(str(folder / "a.jsonl"), 0, 60, rc)
    job = cp.ConceptPrune(make_cfg(input="text", path=str(folder / "a.jsonl"), shard_size=10), str(tmp_path / "e"))
    job._encoder = lambda texts: texts
    with pytest.raises(ValueError, match=rf"a\.jsonl:{lineno}: no text field"):
        job._read_and_encode(job.input_plan()[3])


def test_a_later_jsonl_shard_reads_only_its_own_bytes(tmp_path, monkeypatch):
    """The bytes a shard reads (counted under the reader's buffers): its own rows' and the reader's 8 kB chunks at
    either end, not the rows before it (the last of 8 shards read the whole file)."""
    import io
    n, file = 4000, tmp_path / "big.jsonl"
    file.write_text("".join(json.dumps({"text": f"row {i} " + "x" * 40}) + "\n" for i in range(n)))
    data = file.read_bytes()
    line_starts = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1         # one row a line
    line_starts = [0] + line_starts.tolist()
    job = cp.ConceptPrune(make_cfg(input="text", path=str(file), shard_size=500), str(tmp_path / "r"))
    plan, job._encoder = job.input_plan(), (lambda texts: texts)
    read = []

    class Counted(io.FileIO):
        def readinto(self, buf):
            read.append(super().readinto(buf))
            return read[-1]

    monkeypatch.setattr(cp, "open_shard", lambda file, comp: io.BufferedReader(Counted(file)))
    for p in plan:
        read.clear()
        assert job._read_and_encode(p)[1] == [f"row {i} " + "x" * 40 for i in range(p["start"], p["stop"])]
        own = line_starts[p["stop"]] - line_starts[p["start"]]
        assert sum(read) <= own + 4 * 8192 < len(data) / 2, (p["key"], sum(read), own)


def test_the_count_and_the_reader_split_a_line_file_alike_and_an_old_plan_scans_from_the_start(tmp_path):
    """The count split bytes at b"\n" and stripped bytes, the reader read text with universal newlines and
    str.strip(): on a lone \r the count had one row where the reader had two ("b" was never embedded), and on a line
    of U+3000 the reader skipped a counted row (the last shard then failed). Both now read lines as bytes at b"\n":
    the count, the seeks and the rows agree. The shards of a plan (inputs.json) written before there were seeks
    scan the file from byte 0 and read the same rows."""
    from types import SimpleNamespace
    rc = SimpleNamespace(text_field="text", id_field="id")
    row = b'{"text": "x"}\n'
    for name, body, texts in (
            ("lone_cr", row + b'{"text": "a"}\r{"text": "b"}\n', None),               # one line: invalid JSON
            ("trailing_cr", row + b'{"text": "a"}\r', ["x", "a"]),
            ("ideographic_space", row + "\u3000\n".encode() + row, None),             # a row, and not JSON
            ("bom_and_space", "\ufeff \n".encode() + row, ["x"]),                    # the BOM dropped: blank
            ("txt_lone_cr", "a\rb\n\u3000\nc\r\n", ["a\rb", "\u3000", "c"])):
        file = tmp_path / (f"{name}.txt" if name.startswith("txt") else f"{name}.jsonl")
        file.write_bytes(body.encode() if isinstance(body, str) else body)
        n, seeks = cp._line_starts(str(file), 1)
        assert n == cp.count_rows(str(file), rc) == len(seeks), name
        gz = tmp_path / f"{file.name}.gz"
        gz.write_bytes(gzip.compress(file.read_bytes()))
        assert cp.count_rows(str(gz), rc) == n, name
        job = cp.ConceptPrune(make_cfg(input="text", path=str(file), shard_size=1), str(tmp_path / name))
        assert len(job.input_plan()) == n, name
        if texts is None:
            with pytest.raises(ValueError, match=rf"{file.name}:2: not valid JSON"):
                _shard_reads(job)
        else:
            assert [t for _, got in _shard_reads(job) for t in got] == texts, name
            assert cp.read_texts(str(gz), 0, n, rc)[1] == texts, name
    # an old plan
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n\n" for i in range(30)))
    cfg = make_cfg(input="text", path=str(tmp_path / "t.jsonl"), shard_size=7)
    job = cp.ConceptPrune(cfg, str(tmp_path / "r"))
    plan = job.input_plan()
    data = (tmp_path / "t.jsonl").read_bytes()
    line_starts = [0] + [i + 1 for i, c in enumerate(data) if c == 10]
    assert [p["seek"] for p in plan] == [[line_starts[2 * a], 2 * a + 1] for a in range(0, 30, 7)]   # row r: line 2r+1
    with_seeks = _shard_reads(job)
    assert with_seeks == [(list(range(a, min(30, a + 7))), [f"t{i}" for i in range(a, min(30, a + 7))])
                          for a in range(0, 30, 7)]
    old = [{k: v for k, v in p.items() if k != "seek"} for p in plan]
    (tmp_path / "r" / "inputs.json").write_text(json.dumps(old))
    job = cp.ConceptPrune(cfg, str(tmp_path / "r"))
    assert job.input_plan() == old and _shard_reads(job) == with_seeks


def test_semdedup_tiles_are_square_at_large_n_and_match_brute_force(monkeypatch):
    """A row block of block_elems / n rows (16 at n = 1M, the default bound) against every earlier member made the
    similarity product memory-bound (0.06 vs 0.13 G pairs/s with 4096 x 4096 tiles). Columns are tiled too now,
    with a running max: products of >= 256 rows within the same memory bound, and the same removals."""
    rng = np.random.default_rng(3)
    n, d = 6000, 24
    X = rng.standard_normal((n, d)).astype(np.float32)
    src = rng.choice(n // 2, 400, replace=False)
    X[n // 2 + np.arange(200)] = X[src[:200]]                                           # exact copies, later
    X[n // 2 + 200 + np.arange(200)] = X[src[200:]] + 0.02 * rng.standard_normal((200, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    brute = np.zeros(n, dtype=bool)
    for a in range(1, n, 500):
        S = X[a:a + 500] @ X.T
        S[np.arange(a, min(n, a + 500))[:, None] <= np.arange(n)[None, :]] = -2.0         # only i < j
        brute[a:a + 500] = S.max(1) > 1 - 0.01
    assert 400 <= brute.sum() < 450
    shapes = []

    class Spy(np.ndarray):
        def __matmul__(self, other):
            shapes.append((self.shape[0], other.shape[1]))
            return np.asarray(self) @ np.asarray(other)

    contiguous = np.ascontiguousarray
    monkeypatch.setattr(np, "ascontiguousarray", lambda x, dtype=None: contiguous(x, dtype=dtype).view(Spy))
    block = 1 << 16                                           # n = 6000 at 2^16 is n = 1M at 2^24: 10-row blocks
    removed = cp.semdedup_cluster(X, 0.01, block_elems=block)
    monkeypatch.undo()
    np.testing.assert_array_equal(removed, brute)
    assert shapes and max(r * c for r, c in shapes) <= block
    assert {r for r, _ in shapes} == {256, n % 256}, sorted(set(shapes))[:5]   # row blocks of 256, the last 112
    # the tiles cover the lower triangle once: ~n^2 / 2 pairs, not more
    assert n * n / 2 <= sum(r * c for r, c in shapes) <= n * n / 2 + n * 256
    np.testing.assert_array_equal(cp.semdedup_cluster(X, 0.01), brute)              # one tile per row block


def test_image_shards_read_the_image_list_once(tmp_path, monkeypatch):
    """Every image shard json.load-ed the whole images.json (every image path) to take its slice."""
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    job = cp.ConceptPrune(make_cfg(input="images", path=str(tmp_path / "imgs"), encoder="torchvision:resnet18",
                                   shard_size=2), str(tmp_path / "r"))
    job._encoder = lambda paths: iter([np.ones((len(paths), 4), np.float32)])
    loads = []
    real_load = json.load
    monkeypatch.setattr(cp.json, "load", lambda f: loads.append(f.name) or real_load(f))
    got = [job._read_and_encode(p)[0].to_pylist() for p in job.input_plan()]
    assert got == [["0.png", "1.png"], ["2.png", "3.png"], ["4.png", "5.png"]]
    assert sum(name.endswith("images.json") for name in loads) <= 1
