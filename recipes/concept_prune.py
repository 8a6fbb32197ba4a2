"""Density-based pruning (DBP): Abbas, Rusak, Tirumala, Brendel, Chaudhuri, Morcos, ICLR 2024
("Effective pruning of web-scale datasets based on complexity of concept clusters"), with SemDeDup
(Abbas et al. 2023) in front of it.

    1. embed     x_i = f(sample_i) / ||f(sample_i)||                       (any encoder; or given vectors)
    2. SemDeDup  spherical k-means; inside each cluster, in "hard first" order,
                 remove x_j  iff  max_{i before j} cos(x_i, x_j) > 1 - epsilon
    3. cluster   spherical k-means of the survivors into k concepts, centroids c_j
    4. quota     d_intra(j) = mean_{x in j} (1 - cos(x, c_j))
                 d_inter(j) = mean over the num_neighbors nearest other centroids of (1 - cos(c_j, c_l))
                 C_j = d_intra(j) * d_inter(j);   P = softmax(C / temperature)
                 N_j = argmin ||N - N_keep P||^2  s.t.  sum_j N_j = N_keep,  lb_j <= N_j <= n_j
                 (the reference code's QP; solved in closed form: N_j = clip(N_keep P_j + lambda, lb_j, n_j))
    5. prune     keep the N_j samples of cluster j farthest from c_j ("hard"; "easy" / "random" optional)

Steps 2 and 3 share one k-means when `dedup_clusters` is 0 (SemDeDup runs inside the concept clusters and
the concept centroids are re-estimated on the survivors: one Lloyd update); `dedup_clusters > 0` runs the
papers' two clusterings (a fine one for SemDeDup, a fresh one on the deduplicated set for DBP).

The job is a DataJob: every step writes shards plus a done-marker, so a killed run resumes where it
stopped, and shards split across worker processes (`num_workers`) and SLURM array tasks. Outputs land in
<run_dir>/pruned/: kept_ids.parquet (id, row over all inputs, cluster, distance, file, file_row: the input file
and the 0-based row there, blank lines not counted), clusters.parquet (the per-cluster table), quota_vs_size.png,
manifest.json and, for the embedded default (input=digits), eval.json: test accuracy of a classifier
trained on DBP-, SSP- and randomly pruned subsets against a fixed test split that is never pruned.
"""
from __future__ import annotations

import heapq
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from runx.recipes.text_data import files_at, open_shard, select_shards, shard_format
from runx.trainers.datajob import DataJob, JobContext, Stage, atomic_path, atomic_write_json, remove_stale_temps
from runx.trainers.recipe import RecipeConfigError

log = logging.getLogger("runx.concept_prune")
# faiss' loader logs its CPU-feature probe at INFO on every import ("Could not load library with AVX512
# support due to: ModuleNotFoundError ..."): noise on every run, not a problem
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

EMBEDDING_SUFFIXES = (".npy", ".parquet")
TEXT_FORMATS = ("jsonl", "parquet", "csv", "txt")   # jsonl / csv / txt optionally .gz / .zst (text_data)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SMOKE_MAX_ROWS = 512


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def l2_normalize(x: np.ndarray, where: str = "") -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if len(bad):
        raise ValueError(f"{where}: row {int(bad[0])} is a zero or non-finite vector; cannot L2-normalise it")
    return x / norms


# =====================================================================================================
# 1. embed
# =====================================================================================================
class TextEncoder:
    """A HF / sentence-transformers text encoder: mean (or CLS) pooling of the last hidden state, then L2
    normalisation, as sentence-transformers' all-MiniLM-L6-v2 does (modules.json: Pooling + Normalize)."""

    def __init__(self, path: str, pooling: str, max_length: int, batch_size: int, device: str):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from runx.trainers.hf import resolve_path
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_path(path))
        self.model = AutoModel.from_pretrained(resolve_path(path)).eval().to(device)
        self.pooling, self.max_length, self.batch_size, self.device = pooling, max_length, batch_size, device

    def __call__(self, texts: list[str]):
        torch = self.torch
        for a in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[a:a + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                h = self.model(**enc).last_hidden_state
            if self.pooling == "mean":
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            else:
                v = h[:, 0]
            yield torch.nn.functional.normalize(v.float(), dim=-1).cpu().numpy()


class ImageEncoder:
    """"torchvision:<arch>" (classifier head removed; weights from a local state-dict file) or a HF image
    model folder (pooler output, else the mean of the last hidden state)."""

    def __init__(self, spec: str, weights: str, image_size: int, batch_size: int, device: str):
        import torch
        import torchvision.transforms as T
        self.torch, self.batch_size, self.device = torch, batch_size, device
        if spec.startswith("torchvision:"):
            import torchvision
            arch = spec.split(":", 1)[1]
            if arch not in torchvision.models.list_models():
                raise ValueError(f"recipe.encoder={spec}: unknown torchvision model {arch!r}")
            model = torchvision.models.get_model(arch, weights=None)
            if weights:
                model.load_state_dict(torch.load(weights, map_location="cpu"))
            else:
                log.warning("recipe.encoder=%s without recipe.encoder_weights: randomly initialised encoder", spec)
            for head in ("fc", "classifier", "heads", "head"):
                if hasattr(model, head):
                    setattr(model, head, torch.nn.Identity())
            self.model, self.hf = model.eval().to(device), False
            self.transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                                        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        else:
            from transformers import AutoImageProcessor, AutoModel

            from runx.trainers.hf import resolve_path
            self.processor = AutoImageProcessor.from_pretrained(resolve_path(spec))
            self.model, self.hf = AutoModel.from_pretrained(resolve_path(spec)).eval().to(device), True

    def __call__(self, paths: list[str]):
        from PIL import Image
        torch = self.torch
        for a in range(0, len(paths), self.batch_size):
            images = []
            for p in paths[a:a + self.batch_size]:
                try:
                    images.append(Image.open(p).convert("RGB"))
                except Exception as e:
                    raise ValueError(f"{p}: cannot read image ({e})") from e
            with torch.inference_mode():
                if self.hf:
                    px = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
                    out = self.model(pixel_values=px)
                    v = out.pooler_output if getattr(out, "pooler_output", None) is not None \
                        else out.last_hidden_state.mean(1)
                else:
                    v = self.model(torch.stack([self.transform(im) for im in images]).to(self.device))
            yield torch.nn.functional.normalize(v.flatten(1).float(), dim=-1).cpu().numpy()


def digits_with_planted_duplicates(seed: int, dup_fraction: float, max_copies: int, noise: float,
                                   smoke: bool = False) -> dict:
    """scikit-learn's digits: a fixed stratified test split (never pruned, the same for every seed) and a
    train split with web-like duplication: `dup_fraction` of the train images get 1..max_copies jittered
    copies (Zipf-distributed counts), three classes three times as likely to be copied."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    if smoke:
        X_tr, y_tr, X_te, y_te = X_tr[:300], y_tr[:300], X_te[:200], y_te[:200]
    rng = np.random.default_rng(seed)
    heavy = rng.choice(10, 3, replace=False)
    w = np.where(np.isin(y_tr, heavy), 3.0, 1.0)
    src = rng.choice(len(X_tr), int(dup_fraction * len(X_tr)), replace=False, p=w / w.sum())
    copies = np.minimum(rng.zipf(1.6, len(src)), max_copies)
    origin = np.concatenate([np.arange(len(X_tr)), np.repeat(src, copies)])
    X_all = X_tr[origin].copy()
    X_all[len(X_tr):] += noise * rng.standard_normal((len(origin) - len(X_tr), X.shape[1]))
    perm = rng.permutation(len(origin))  # spread the copies over the shards
    return {"X_train": X_all[perm].astype(np.float32), "y_train": y_tr[origin][perm], "origin": origin[perm],
            "X_test": X_te.astype(np.float32), "y_test": y_te, "n_unique": len(X_tr)}


def digits_embedding(X: np.ndarray, dim: int) -> np.ndarray:
    """The 'pretrained encoder' of the embedded default: PCA of standardised pixels, L2-normalised."""
    Z = (X - X.mean(0)) / np.maximum(X.std(0), 1.0)   # std floor (pixel units): blank pixels stay quiet
    _, _, Vt = np.linalg.svd(Z, full_matrices=False)
    return l2_normalize(Z @ Vt[:dim].T, "digits")


# =====================================================================================================
# 2./3. spherical k-means (faiss; GPU when faiss has one, else torch on CUDA, else faiss on CPU)
# =====================================================================================================
def spherical_kmeans(x: np.ndarray, k: int, niter: int, seed: int, device: str = "cpu") -> np.ndarray:
    """Unit-norm centroids of Lloyd iterations on cosine similarity (faiss.Kmeans(spherical=True)).
    `x` is the (already subsampled) training set; deterministic for a seed."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = min(k, len(x))
    faiss_gpu = device == "cuda" and _faiss_has_gpu()
    if device == "cuda" and not faiss_gpu:
        return _spherical_kmeans_torch(x, k, niter, seed, device)
    import faiss
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=int(seed) % (2 ** 31), spherical=True, gpu=faiss_gpu,
                      max_points_per_centroid=len(x) // k + 1, min_points_per_centroid=1, verbose=False)
    km.train(x)
    return l2_normalize(km.centroids, "k-means centroids")


def _faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _spherical_kmeans_torch(x: np.ndarray, k: int, niter: int, seed: int, device: str) -> np.ndarray:
    import torch
    g = torch.Generator().manual_seed(int(seed))
    X = torch.from_numpy(x).to(device)
    C = X[torch.randperm(len(X), generator=g)[:k].to(device)].clone()
    for _ in range(niter):
        labels, _ = _assign_torch(X, C)
        sums = torch.zeros_like(C).index_add_(0, labels, X)
        counts = torch.bincount(labels, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):  # re-seed empty clusters on random points (faiss splits big clusters instead)
            sums[empty] = X[torch.randperm(len(X), generator=g)[:len(empty)].to(device)]
        C = torch.nn.functional.normalize(sums, dim=1)
    return C.cpu().numpy()


def _assign_torch(X, C, chunk: int = 65536):
    import torch
    labels, sims = [], []
    for a in range(0, len(X), chunk):
        s, i = (X[a:a + chunk] @ C.T).max(1)
        labels.append(i)
        sims.append(s)
    return torch.cat(labels), torch.cat(sims)


def assign_to_centroids(x: np.ndarray, centroids: np.ndarray, device: str = "cpu"):
    """(label, cosine similarity to that centroid) of each row: nearest centroid by inner product."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if device == "cuda":
        import torch
        lab, sim = _assign_torch(torch.from_numpy(x).to(device), torch.from_numpy(centroids).to(device))
        return lab.cpu().numpy().astype(np.int32), sim.cpu().numpy().astype(np.float32)
    import faiss
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    D, I = index.search(x, 1)
    return I[:, 0].astype(np.int32), D[:, 0].astype(np.float32)


# =====================================================================================================
# 2. SemDeDup inside one cluster
# =====================================================================================================
def within_cluster_order(dist: np.ndarray, rows: np.ndarray, rule: str, seed: int, cluster: int) -> np.ndarray:
    """Order of a cluster's members. hard: farthest from the centroid first; easy: nearest first;
    random: a permutation seeded by (seed, cluster). Ties break by row id, so the order is deterministic."""
    if rule == "hard":
        return np.lexsort((rows, -dist))
    if rule == "easy":
        return np.lexsort((rows, dist))
    return np.random.default_rng([int(seed), int(cluster)]).permutation(len(rows))


def semdedup_tiles(n: int, block_elems: int = 1 << 24) -> tuple[int, int]:
    """(rows, cols) of the similarity tiles of a cluster of n: rows j in [a, a + rows) against earlier members i
    in column tiles of `cols`, rows * cols <= block_elems. Row blocks of >= 256 (GEMM-efficient) and <= n/4
    (skips ~3/8 of the square above the diagonal); when a whole row block against every earlier member would
    exceed the bound, columns are tiled too (square tiles of sqrt(block_elems)): a row block of block_elems / n
    rows (16 at n = 1M) makes the product memory-bound, ~2x slower than square tiles with a running max."""
    want = min(n, max(256, -(-n // 4)))
    rows = max(1, min(want, max(block_elems // max(n, 1), math.isqrt(block_elems))))
    return rows, max(1, block_elems // rows)


def semdedup_rows(E, a: int, b: int, epsilon: float, cols: int, device: str = "cpu") -> np.ndarray:
    """Removed-mask of rows [a, b) of a cluster in keep order (E: its embeddings, numpy or a torch tensor):
    M_j = max_{i<j} cos(x_i, x_j) > 1 - epsilon, a running max over column tiles [c, c + cols) of the members
    before b. Row blocks are independent of each other (a removed member still counts as an earlier one)."""
    cuda = device == "cuda"
    if cuda:
        import torch
        M = torch.full((b - a,), -2.0, device=E.device)
        j = torch.arange(a, b, device=E.device)[:, None]
    else:
        M = np.full(b - a, -2.0, dtype=np.float32)
        j = np.arange(a, b)[:, None]
    for c in range(0, b, cols):
        d = min(b, c + cols)
        S = E[a:b] @ E[c:d].T                          # rows j in [a, b) against members i in [c, d)
        if d > a:                                      # the tile reaches the diagonal: keep only i < j
            i = torch.arange(c, d, device=E.device)[None, :] if cuda else np.arange(c, d)[None, :]
            S[i >= j] = -2.0
        M = torch.maximum(M, S.max(1).values) if cuda else np.maximum(M, S.max(1))
    return (M.cpu().numpy() if cuda else M) > 1.0 - epsilon


def semdedup_cluster(emb, epsilon: float, device: str = "cpu", block_elems: int = 1 << 24) -> np.ndarray:
    """Removed-mask of one cluster whose rows are in keep order: x_j goes iff
    M_j = max_{i<j} cos(x_i, x_j) > 1 - epsilon. Comparisons include earlier removed items (as the
    reference does), so the first item of each near-duplicate group survives. Tiled (semdedup_tiles):
    memory <= block_elems similarities whatever the cluster size."""
    n = len(emb)
    removed = np.zeros(n, dtype=bool)
    if n < 2:
        return removed
    rows, cols = semdedup_tiles(n, block_elems)
    if device == "cuda":
        import torch
        E = torch.as_tensor(np.asarray(emb, dtype=np.float32)).to(device)
    else:  # numpy: single-threaded elementwise work, BLAS for the product (no thread-pool wakeups per op)
        E = np.ascontiguousarray(emb, dtype=np.float32)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        removed[a:b] = semdedup_rows(E, a, b, epsilon, cols, device)
    return removed


# =====================================================================================================
# 4. quotas
# =====================================================================================================
def cluster_complexity(sizes: np.ndarray, d_intra: np.ndarray, centroids: np.ndarray, num_neighbors: int):
    """d_inter(j) = mean cosine distance of c_j to its num_neighbors nearest other centroids;
    C_j = d_intra(j) * d_inter(j). Clusters with < 2 members get the mean C of the others (the
    reference replaces their NaN with nanmean)."""
    k = len(centroids)
    m = min(num_neighbors, k - 1)
    d_inter = np.zeros(k)
    if m > 0:
        C = np.asarray(centroids, dtype=np.float32)
        for a in range(0, k, 1024):                                     # k x k in row blocks
            S = C[a:a + 1024] @ C.T
            S[np.arange(len(S)), np.arange(a, a + len(S))] = -np.inf   # exclude self
            top = -np.partition(-S, m - 1, axis=1)[:, :m]               # m most similar others
            d_inter[a:a + len(S)] = (1.0 - top.astype(np.float64)).mean(1)
    complexity = d_intra * d_inter
    small = sizes < 2
    if small.any() and (~small).any():
        complexity = np.where(small, complexity[~small].mean(), complexity)
    return d_inter, complexity


def quota_probabilities(complexity: np.ndarray, sizes: np.ndarray, temperature: float, kind: str) -> np.ndarray:
    """P_j = softmax(C_j / temperature) over the non-empty clusters (DBP); uniform (SSP); or n_j / N."""
    live = sizes > 0
    if kind == "size":
        p = sizes.astype(np.float64)
    else:
        z = np.zeros(len(sizes)) if kind == "uniform" else complexity / temperature
        z = np.where(live, z, -np.inf)
        p = np.exp(z - z[live].max())
    p = np.where(live, p, 0.0)
    return p / p.sum()


def quota_bounds(sizes: np.ndarray, n_keep: int, balance: float) -> tuple[np.ndarray, np.ndarray]:
    """lb_j = min(floor(n_keep / k_live * balance), n_j) (the reference's cls_bal_ratio floor), ub_j = n_j."""
    sizes = np.asarray(sizes, dtype=np.int64)
    k_live = max(1, int((sizes > 0).sum()))
    return np.minimum(math.floor(n_keep / k_live * balance), sizes), sizes


def project_quotas(target: np.ndarray, lb: np.ndarray, ub: np.ndarray, total: float) -> np.ndarray:
    """argmin_x ||x - target||^2  s.t.  sum x = total, lb <= x <= ub  (the reference's QP) in closed form:
    x_j = clip(target_j + lambda, lb_j, ub_j), lambda found by bisection (the sum is monotone in lambda),
    then solved exactly on the final set of unclipped clusters. A capped cluster's excess therefore goes
    to the others additively and equally, not in proportion."""
    t, lb, ub = (np.asarray(v, dtype=np.float64) for v in (target, lb, ub))
    if not lb.sum() - 1e-9 <= total <= ub.sum() + 1e-9:
        raise ValueError(f"infeasible quotas: the total {total} is outside [{lb.sum()}, {ub.sum()}]")
    lo, hi = float((lb - t).min()) - 1.0, float((ub - t).max()) + 1.0
    for _ in range(200):
        lam = 0.5 * (lo + hi)
        if np.clip(t + lam, lb, ub).sum() < total:
            lo = lam
        else:
            hi = lam
    x = np.clip(t + hi, lb, ub)
    free = (x > lb) & (x < ub)
    if free.any():
        lam = (total - x[~free].sum() - t[free].sum()) / free.sum()
        x = np.where(free, np.clip(t + lam, lb, ub), x)
    return x


def allocate_quotas(probs: np.ndarray, sizes: np.ndarray, n_keep: int, balance: float) -> np.ndarray:
    """Integer quotas N_j: sum N_j = n_keep exactly, lb_j <= N_j <= n_j, N_j within 1 of the projection of
    n_keep * P (floors, plus one for the largest fractional parts; ties to the lower cluster id)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if not 0 <= n_keep <= int(sizes.sum()):
        raise ValueError(f"cannot keep {n_keep} of {int(sizes.sum())} samples")
    lb, ub = quota_bounds(sizes, n_keep, balance)
    x = project_quotas(n_keep * np.asarray(probs, dtype=np.float64), lb, ub, n_keep)
    q = np.clip(np.floor(x + 1e-9), lb, ub).astype(np.int64)
    short = n_keep - int(q.sum())
    frac = x - q
    if short > 0:
        cand = np.flatnonzero(q < sizes)
        q[cand[np.lexsort((cand, -frac[cand]))[:short]]] += 1
    elif short < 0:
        cand = np.flatnonzero(q > lb)
        q[cand[np.lexsort((cand, frac[cand]))[:-short]]] -= 1
    assert q.sum() == n_keep and (q <= sizes).all() and (q >= lb).all()
    return q


# =====================================================================================================
# 5. prune
# =====================================================================================================
def select_within_cluster(rows: np.ndarray, dist: np.ndarray, quota: int, rule: str, seed: int,
                          cluster: int) -> np.ndarray:
    """The `quota` rows of one cluster to keep: farthest from the centroid (hard, SSP / DBP), nearest
    (easy) or random."""
    return rows[within_cluster_order(dist, rows, rule, seed, cluster)[:quota]]


def budget(rc, n_input: int, n_dedup: int) -> int:
    base = n_input if rc.budget_of == "input" else n_dedup
    n_keep = int(round(rc.keep_fraction * base))
    if n_keep > n_dedup:
        log.warning("keep_fraction=%s of %d input rows (%d) exceeds the %d rows left after SemDeDup: keeping "
                    "all of them", rc.keep_fraction, base, n_keep, n_dedup)
    return min(n_keep, n_dedup)


@dataclass
class ConceptStats:
    """What the quota step needs about the concept clusters."""
    sizes: np.ndarray        # members after SemDeDup
    dist_sum: np.ndarray     # sum of (1 - cos(x, c_j)) over members
    centroids: np.ndarray    # unit-norm concept centroids

    def quotas(self, rc, n_keep: int, complexity_kind: str | None = None):
        d_intra = self.dist_sum / np.maximum(self.sizes, 1)
        d_inter, complexity = cluster_complexity(self.sizes, d_intra, self.centroids, rc.num_neighbors)
        probs = quota_probabilities(complexity, self.sizes, rc.temperature, complexity_kind or rc.complexity)
        return {"d_intra": d_intra, "d_inter": d_inter, "complexity": complexity, "probability": probs,
                "quota": allocate_quotas(probs, self.sizes, n_keep, rc.balance)}


def select(members: dict, quotas: np.ndarray, rule: str, seed: int) -> np.ndarray:
    """Kept rows of every cluster present in `members` (rows, cluster, dist; grouped by cluster)."""
    kept = []
    for c, lo, hi in _cluster_runs(members["cluster"]):
        kept.append(select_within_cluster(members["rows"][lo:hi], members["dist"][lo:hi], int(quotas[c]),
                                          rule, seed, c))
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)


def _cluster_runs(labels_sorted: np.ndarray):
    """(cluster, start, stop) of each run of equal labels in a label-sorted array."""
    if len(labels_sorted) == 0:
        return
    cut = np.flatnonzero(np.diff(labels_sorted)) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [len(labels_sorted)]])
    for a, b in zip(starts, stops):
        yield int(labels_sorted[a]), int(a), int(b)


def balanced_groups(counts: np.ndarray, num_groups: int) -> list[list[int]]:
    """Clusters split into groups of near-equal pairwise cost (sum n_c^2): longest processing time first."""
    order = np.lexsort((np.arange(len(counts)), -counts))
    heap = [(0, g) for g in range(num_groups)]
    groups = [[] for _ in range(num_groups)]
    for c in order:
        cost, g = heapq.heappop(heap)
        groups[g].append(int(c))
        heapq.heappush(heap, (cost + int(counts[c]) ** 2 + 1, g))
    return [sorted(g) for g in groups if g]


# =====================================================================================================
# the embedded default's check: does the pruned subset train as well as the full one?
# =====================================================================================================
def subset_accuracy(data: dict, rows: np.ndarray) -> float:
    """Test accuracy of a logistic regression on standardised pixels trained on train rows `rows`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    with threadpool_limits(1):  # tiny problem: BLAS threads (and faiss' spinning OpenMP ones) only cost time
        clf.fit(data["X_train"][rows], data["y_train"][rows])
        return float(clf.score(data["X_test"], data["y_test"]))


# =====================================================================================================
# the data job
# =====================================================================================================
class ConceptPrune(DataJob):
    """embed -> kmeans -> assign -> dedup [-> recluster -> reassign] -> quota -> prune -> write [-> evaluate]"""

    def __init__(self, cfg, run_dir: str):
        super().__init__(cfg, run_dir)
        self.rc = cfg.recipe
        self.seed = int(cfg.get("seed", 0))
        self.smoke = bool(cfg.get("smoke", False))
        self._encoder = None
        self._digits = None
        self._cache: dict = {}
        self._check_config()
        self.input_paths = self._list_inputs()

    # ---- configuration -------------------------------------------------------------------------
    def _check_config(self):
        # (the value ranges are validate()'s: cli/ranges.py RECIPE["concept_prune"], all reported at once)
        from omegaconf import OmegaConf

        from runx.cli.ranges import range_problems
        rc = self.rc
        data = OmegaConf.to_container(self.cfg, resolve=True) if OmegaConf.is_config(self.cfg) else dict(self.cfg)
        problems = [p for p in range_problems(data) if p.startswith("recipe.")]
        if problems:
            raise ValueError(" ".join(problems))
        if rc.input != "digits" and not rc.path:
            raise ValueError(f"recipe.path is empty: recipe.input={rc.input} reads its samples from files "
                             "(a file, a folder or a glob)")
        if rc.input == "images" and not is_image_encoder(rc.encoder):
            raise ValueError(f"recipe.encoder={rc.encoder}: not an image encoder. recipe.input=images needs "
                             "recipe.encoder=torchvision:<arch> (e.g. torchvision:resnet50, weights from "
                             "recipe.encoder_weights=<state-dict file>) or a Hugging Face image model (a hub id, "
                             "or a local folder with preprocessor_config.json)")
        if rc.input == "text" and rc.encoder.startswith("torchvision:"):
            raise ValueError(f"recipe.encoder={rc.encoder}: an image encoder. recipe.input=text needs a Hugging "
                             "Face / sentence-transformers text model: builtin:minilm, a hub id or a local folder")

    # ---- what the run dir pins (DataJob.pin_settings) -------------------------------------------
    job_name = "concept_prune"
    # the encoder batch changes memory, not the embeddings (padding is masked): lower it after an OOM
    unpinned = ("recipe.num_workers", "recipe.batch_size")

    def settings(self) -> dict:
        from omegaconf import OmegaConf
        rc = OmegaConf.to_container(self.rc, resolve=True) if not isinstance(self.rc, dict) else dict(self.rc)
        rc.pop("num_workers", None)   # also recorded in pruned/manifest.json, the same for any worker count
        return {"recipe": rc, "seed": self.seed, "smoke": self.smoke}

    def input_files(self) -> list[str]:
        return self.input_paths

    def outputs(self) -> list[str]:
        return [os.path.join(self.run_dir, f) for f in ("pruned", "inputs.json", "images.json")]

    @property
    def pruned_dir(self) -> str:
        return os.path.join(self.run_dir, "pruned")

    @property
    def device(self) -> str:
        if "device" not in self._cache:
            self._cache["device"] = resolve_device(self.rc.device)
        return self._cache["device"]

    @property
    def shared_clustering(self) -> bool:
        return int(self.rc.dedup_clusters) == 0

    def k_concepts(self) -> int:
        return min(int(self.rc.num_clusters), 8) if self.smoke else int(self.rc.num_clusters)

    def k_dedup(self) -> int:
        if self.shared_clustering:
            return self.k_concepts()
        return min(int(self.rc.dedup_clusters), 16) if self.smoke else int(self.rc.dedup_clusters)

    @staticmethod
    def check_k(key: str, k: int, rows: int) -> None:
        """As many clusters as rows puts every row in a cluster of its own: SemDeDup then finds no pair and the
        quotas have nothing to weigh (faiss was silently given k = rows; the run removed nothing)."""
        if k >= rows:
            from runx.trainers.recipe import RecipeConfigError
            raise RecipeConfigError(f"{key}={k}: the data has {rows} rows to cluster, so every row would be a "
                                    f"cluster of its own. Valid values: {key} < {rows} (tens to hundreds of rows "
                                    "per cluster)")

    def niter(self) -> int:
        return min(int(self.rc.kmeans_iters), 5) if self.smoke else int(self.rc.kmeans_iters)

    def stages(self) -> list[Stage]:
        all_ = lambda ctx: ["all"]  # noqa: E731  (a global step; the base runs it once, on task 0)
        w = self._in_worker
        st = [Stage("embed", self.embed_shards, w(self.embed_shard)),
              Stage("kmeans", all_, self.kmeans_all),
              Stage("assign", self.embed_keys, w(self.assign_shard)),
              Stage("dedup", self.dedup_groups, w(self.dedup_group))]
        if not self.shared_clustering:
            st += [Stage("recluster", all_, self.recluster_all),
                   Stage("reassign", self.embed_keys, w(self.reassign_shard))]
        st += [Stage("quota", all_, self.quota_all),
               Stage("prune", self.concept_groups, w(self.prune_group)),
               Stage("write", all_, self.write_all, also_writes=(self.pruned_dir,))]
        if self.rc.input == "digits":
            st.append(Stage("evaluate", all_, self.evaluate_all, also_writes=(self.pruned_dir,)))
        return st

    def run(self, num_workers: int = 1, **kw) -> dict:
        if num_workers > 1 and self.device == "cuda":
            log.warning("num_workers=%d with device=cuda: CUDA cannot be used in forked workers; using 1", num_workers)
            num_workers = 1
        self._parent_pid = os.getpid()
        return super().run(num_workers=num_workers, **kw)

    def _in_worker(self, fn):
        return _OneThreadPerWorker(self, fn.__name__)

    def _one_thread_if_forked(self):
        """Shards run in forked worker processes (num_workers > 1) use one thread each: the parent's
        OpenMP pool (faiss, torch) does not survive fork, and GOMP_parallel in the child would wait forever
        on threads that no longer exist; one thread per process is also the right split of the cores."""
        if os.getpid() != getattr(self, "_parent_pid", os.getpid()) and not self._cache.get("one_thread"):
            import faiss
            import torch
            from threadpoolctl import threadpool_limits
            faiss.omp_set_num_threads(1)
            torch.set_num_threads(1)
            threadpool_limits(1)
            self._cache["one_thread"] = True

    def __getstate__(self):  # sent to worker processes: not the loaded encoder
        state = dict(self.__dict__)
        state["_encoder"] = None
        state["_cache"] = {k: v for k, v in self._cache.items() if k not in ("one_thread", "images")}
        return state

    # ---- 1. embed ------------------------------------------------------------------------------
    def digits(self) -> dict:
        if self._digits is None:
            rc = self.rc
            self._digits = digits_with_planted_duplicates(self.seed, rc.dup_fraction, rc.max_copies,
                                                          rc.dup_noise, self.smoke)
        return self._digits

    def input_plan(self) -> list[dict]:
        """Embedding shards: [{key, file, start, stop, offset[, csv_stream][, seek]}], cached in <run_dir>/inputs.json
        (`seek`: [byte, line number] where row `start` of an uncompressed JSONL / .txt file starts; a plan written
        before it existed has none, and its shards scan the file from the start as they did)."""
        if "plan" in self._cache:
            return self._cache["plan"]
        path = os.path.join(self.run_dir, "inputs.json")
        if os.path.exists(path):
            with open(path) as f:
                plan = json.load(f)
        else:
            files = self._input_files()
            plan, offset = [], 0
            cap = SMOKE_MAX_ROWS if self.smoke and self.rc.input != "digits" else None
            for file, n in files:
                if cap is not None:
                    n = min(n, cap - offset)
                hint = self._reader_hint(file)
                seeks = hint.pop("seeks", None)
                for i, start in enumerate(range(0, n, int(self.rc.shard_size))):
                    stop = min(n, start + int(self.rc.shard_size))
                    plan.append({"key": f"{len(plan):05d}", "file": file, "start": start, "stop": stop,
                                 "offset": offset + start, **hint, **({"seek": seeks[i]} if seeks else {})})
                offset += n
            if not plan:
                raise ValueError(f"recipe.path={self.rc.path}: no rows to embed")
            atomic_write_json(path, plan)
        self._cache["plan"] = plan
        return plan

    def _list_inputs(self) -> list[str]:
        """The input files recipe.path names, sorted ([] for digits)."""
        rc = self.rc
        if rc.input == "digits":
            return []
        files = files_at(rc.path, recursive=True)
        if not files and not os.path.exists(os.path.expanduser(rc.path)) and not any(c in rc.path for c in "*?["):
            raise FileNotFoundError(f"recipe.path={rc.path}: no such file or folder")
        if rc.input == "text":
            files, what = select_shards(files, TEXT_FORMATS, f"recipe.path={rc.path}"), \
                "JSONL / Parquet / CSV / .txt, the line formats optionally .gz / .zst"
        else:
            suffixes = EMBEDDING_SUFFIXES if rc.input == "embeddings" else IMAGE_SUFFIXES
            files, what = sorted(f for f in files if f.lower().endswith(suffixes)), ", ".join(suffixes)
        if not files:
            raise ValueError(f"recipe.path={rc.path}: no {rc.input} files ({what}) there")
        return [os.path.abspath(f) for f in files]

    def _input_files(self) -> list[tuple]:
        """(file, rows) of every input file; images: ("<list>", n) with the list in images.json."""
        rc = self.rc
        if rc.input == "digits":
            return [("digits", len(self.digits()["X_train"]))]
        if rc.input == "images":
            atomic_write_json(os.path.join(self.run_dir, "images.json"), self.input_paths)
            return [("<images.json>", len(self.input_paths))]
        return [(f, count_rows(f, rc, every=int(rc.shard_size))) for f in self.input_paths]

    def _reader_hint(self, file: str) -> dict:
        """What the count of a file's rows learnt that saves each shard a pass: whether a CSV streams; where each
        shard's first row starts in an uncompressed JSONL / .txt file (`seeks`, one per shard, from the count's
        cache: _line_starts)."""
        fc = shard_format(file, TEXT_FORMATS) if self.rc.input == "text" else None
        if fc and fc[0] == "csv":
            return {"csv_stream": _csv_streams(file, fc[1]) is not None}
        if fc and fc[0] in ("jsonl", "txt") and fc[1] == "none":
            seeks = _line_starts(file, int(self.rc.shard_size))[1]
            return {"seeks": seeks} if seeks else {}
        return {}

    def embed_shards(self, ctx) -> list[str]:
        return [p["key"] for p in self.input_plan()]

    def embed_keys(self, ctx) -> list[str]:
        return self.embed_shards(ctx)

    def embed_shard(self, ctx: JobContext, key: str) -> dict:
        rc = self.rc
        piece = next(p for p in self.input_plan() if p["key"] == key)
        n = piece["stop"] - piece["start"]
        ids, batches = self._read_and_encode(piece)
        out = os.path.join(ctx.stage_dir("embed"), f"{key}.npy")
        for name in (f"{key}.npy", f"{key}.ids.parquet"):   # a shard-sized temp a killed writer left, on any node
            remove_stale_temps(ctx.stage_dir("embed"), output=name)
        with atomic_path(out) as tmp:
            mm = None
            row = 0
            for v in batches:
                if mm is None:
                    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=rc.embed_dtype, shape=(n, v.shape[1]))
                mm[row:row + len(v)] = v
                row += len(v)
            if row != n:
                raise RuntimeError(f"{piece['file']}: expected {n} rows in shard {key}, embedded {row}")
            mm.flush()
            dim = mm.shape[1]
            del mm
        import pyarrow as pa
        import pyarrow.parquet as pq
        if ids is None:
            ids = pa.array(np.arange(piece["offset"], piece["offset"] + n, dtype=np.int64))
        with atomic_path(os.path.join(ctx.stage_dir("embed"), f"{key}.ids.parquet")) as tmp:
            pq.write_table(pa.table({"id": ids}), tmp)
        return {"rows": n, "offset": piece["offset"], "dim": int(dim), "file": piece["file"]}

    def _read_and_encode(self, piece: dict):
        """(ids or None, iterator of L2-normalised float32 batches) of one input shard."""
        rc, file, a, b = self.rc, piece["file"], piece["start"], piece["stop"]
        if rc.input == "digits":
            d = self.digits()
            if "emb" not in self._cache:
                self._cache["emb"] = digits_embedding(d["X_train"], int(rc.embed_dim))
            return None, iter([self._cache["emb"][a:b]])
        if rc.input == "embeddings":
            return read_embeddings(file, a, b, rc)
        if rc.input == "text":
            ids, texts = read_texts(file, a, b, rc, csv_stream=piece.get("csv_stream"), seek=piece.get("seek"))
            if self._encoder is None:
                self._encoder = self._load_encoder(TextEncoder, rc.encoder, rc.pooling, rc.max_length,
                                                   rc.batch_size, self.device)
            return ids, self._encoder(texts)
        if "images" not in self._cache:          # read once per process, not once per shard
            with open(os.path.join(self.run_dir, "images.json")) as f:
                self._cache["images"] = json.load(f)
        paths = self._cache["images"][a:b]
        if self._encoder is None:
            self._encoder = self._load_encoder(ImageEncoder, rc.encoder, rc.encoder_weights, rc.image_size,
                                               rc.batch_size, self.device)
        import pyarrow as pa
        root = rc.path if os.path.isdir(rc.path) else os.path.dirname(rc.path)
        return pa.array([os.path.relpath(p, root) for p in paths]), self._encoder(paths)

    def _load_encoder(self, cls, *args):
        """The encoder; a hub id that cannot be fetched (offline, not cached) is a config problem naming
        recipe.encoder, not a traceback."""
        try:
            return cls(*args)
        except OSError as e:
            from runx.trainers.hf import hub_unreachable
            from runx.trainers.recipe import RecipeConfigError
            problem = hub_unreachable(e, self.cfg)
            if problem is None or os.environ.get("RUNX_TRACEBACK"):
                raise
            raise RecipeConfigError(problem) from None

    # ---- shard access ----------------------------------------------------------------------------
    def embeddings(self, key: str, mmap: bool = True) -> np.ndarray:
        return np.load(os.path.join(self.run_dir, "embed", f"{key}.npy"), mmap_mode="r" if mmap else None)

    def offsets(self) -> dict:
        return {p["key"]: p["offset"] for p in self.input_plan()}

    def n_rows(self) -> int:
        p = self.input_plan()[-1]
        return p["offset"] + p["stop"] - p["start"]

    def sample_rows(self, n_sample: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
        """A uniform sample of global rows (without those in `exclude`), gathered shard by shard."""
        N = self.n_rows()
        pool = np.arange(N) if exclude is None else np.setdiff1d(np.arange(N), exclude)
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(pool, n_sample, replace=False)) if n_sample < len(pool) else pool
        return self.gather(take)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """float32 embeddings of global `rows` (any order), read shard by shard from the memory maps."""
        out = np.empty((len(rows), self.input_dim()), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        for p in self.input_plan():
            lo, hi = np.searchsorted(srt, [p["offset"], p["offset"] + p["stop"] - p["start"]])
            if hi > lo:
                E = self.embeddings(p["key"])
                out[order[lo:hi]] = E[srt[lo:hi] - p["offset"]]
                del E
        return out

    # ---- 2./3. k-means + assignment ------------------------------------------------------------
    def kmeans_all(self, ctx: JobContext, key: str) -> dict:
        k = self.k_dedup()
        x = self.sample_rows(k * int(self.rc.max_points_per_centroid), self.seed)
        self.check_k("recipe.num_clusters" if self.shared_clustering else "recipe.dedup_clusters", k, len(x))
        C = spherical_kmeans(x, k, self.niter(), self.seed, self.device)
        with atomic_path(os.path.join(ctx.stage_dir("kmeans"), "centroids.npy")) as tmp:
            np.save(tmp, C)
        return {"k": int(len(C)), "train_rows": int(len(x)), "niter": self.niter(), "device": self.device}

    def assign_shard(self, ctx: JobContext, key: str) -> dict:
        C = np.load(os.path.join(ctx.job_dir, "kmeans", "centroids.npy"))
        labels, cos = assign_to_centroids(self.embeddings(key, mmap=False), C, self.device)
        with atomic_path(os.path.join(ctx.stage_dir("assign"), f"{key}.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, label=labels, cos=cos, counts=np.bincount(labels, minlength=len(C)))
        return {"rows": int(len(labels))}

    def _counts(self, stage: str) -> np.ndarray:
        if f"counts:{stage}" in self._cache:
            return self._cache[f"counts:{stage}"]
        tot = None
        for key in self.embed_keys(None):
            with np.load(os.path.join(self.run_dir, stage, f"{key}.npz")) as z:
                tot = z["counts"].astype(np.int64) if tot is None else tot + z["counts"]
        self._cache[f"counts:{stage}"] = tot
        return tot

    def _groups(self, stage: str) -> list[list[int]]:
        """Cluster groups (the shards of dedup / prune), computed from the assignment counts."""
        if stage not in self._cache:
            counts = self._counts(stage)
            g = max(1, min(int((counts > 0).sum()), math.ceil(int(counts.sum()) / int(self.rc.shard_size))))
            self._cache[stage] = balanced_groups(counts, g)
        return self._cache[stage]

    def _members(self, stage: str, clusters: list[int], alive: bool = False) -> dict:
        """rows / cluster / cos of every member of `clusters` from an assignment stage, sorted by cluster."""
        want = np.zeros(len(self._counts(stage)), dtype=bool)
        want[clusters] = True
        rows, lab, cos = [], [], []
        for key, off in self.offsets().items():
            with np.load(os.path.join(self.run_dir, stage, f"{key}.npz")) as z:
                lz, cz = z["label"], z["cos"]
            sel = np.flatnonzero((lz >= 0) & want[np.maximum(lz, 0)])
            rows.append(sel + off)
            lab.append(lz[sel])
            cos.append(cz[sel])
        rows, lab, cos = np.concatenate(rows), np.concatenate(lab), np.concatenate(cos)
        order = np.lexsort((rows, lab))
        return {"rows": rows[order].astype(np.int64), "cluster": lab[order], "cos": cos[order]}

    # ---- 2. SemDeDup ---------------------------------------------------------------------------
    def dedup_groups(self, ctx) -> list[str]:
        return [f"g{i:04d}" for i in range(len(self._groups("assign")))]

    def dedup_group(self, ctx: JobContext, key: str) -> dict:
        rc = self.rc
        clusters = self._groups("assign")[int(key[1:])]
        m = self._members("assign", clusters)
        removed = np.zeros(len(m["rows"]), dtype=bool)
        new_cos = np.full(len(m["rows"]), np.nan, dtype=np.float32)
        centroids = np.load(os.path.join(ctx.job_dir, "kmeans", "centroids.npy"))[clusters].copy()
        runs = [(j, c, lo, hi) for j, (c, lo, hi) in enumerate(self._runs_for(m["cluster"], clusters))]
        # every cluster's members in keep order, gathered in that order: a cluster is a contiguous slice of E
        # (no per-cluster copy) and its row blocks are independent tasks, so one huge cluster spreads over the
        # threads as well as many small ones do
        perm = np.arange(len(m["rows"]))
        for j, c, lo, hi in runs:
            perm[lo:hi] = lo + within_cluster_order(1.0 - m["cos"][lo:hi], m["rows"][lo:hi], rc.dedup_keep,
                                                    self.seed, c)
        E = self.gather(m["rows"][perm])
        if rc.dedup and rc.epsilon > 0:
            removed[perm] = self._semdedup_slices(E, [(lo, hi) for _, _, lo, hi in runs])
        if self.shared_clustering:
            # one Lloyd update on the survivors: c_j = normalise(mean of the kept members), summed in row order
            at = np.empty_like(perm)
            at[perm] = np.arange(len(perm))                               # member position -> row of E
            for j, c, lo, hi in runs:
                if hi > lo:
                    keep = np.arange(lo, hi)[~removed[lo:hi]]
                    Ek = E[at[keep]]
                    s = Ek.astype(np.float64).sum(0)
                    centroids[j] = s / np.linalg.norm(s)
                    new_cos[keep] = Ek @ centroids[j].astype(np.float32)
        with atomic_path(os.path.join(ctx.stage_dir("dedup"), f"{key}.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, rows=m["rows"], cluster=m["cluster"], cos=m["cos"], removed=removed, new_cos=new_cos,
                         clusters=np.asarray(clusters, dtype=np.int64), centroids=centroids.astype(np.float32))
        return {"members": int(len(removed)), "removed": int(removed.sum()), "clusters": len(clusters)}

    def _semdedup_slices(self, E: np.ndarray, slices: list[tuple[int, int]]) -> np.ndarray:
        """SemDeDup of each cluster E[lo:hi] (rows in keep order): the removed-mask over all rows of E."""
        removed = np.zeros(len(E), dtype=bool)
        if self.device == "cuda":
            for lo, hi in slices:
                removed[lo:hi] = semdedup_cluster(E[lo:hi], self.rc.epsilon, self.device)
            return removed
        threads = 1 if self._cache.get("one_thread") else len(os.sched_getaffinity(0))
        tasks = []                                                        # (cost, lo, hi, a, b, cols)
        for lo, hi in slices:
            if hi - lo >= 2:
                rows, cols = semdedup_tiles(hi - lo)
                for a in range(0, hi - lo, rows):
                    b = min(hi - lo, a + rows)
                    tasks.append(((b - a) * b, lo, hi, a, b, cols))       # cost: rows x earlier members

        def run(t):                                                       # writes disjoint slices only
            _, lo, hi, a, b, cols = t
            removed[lo + a:lo + b] = semdedup_rows(E[lo:hi], a, b, self.rc.epsilon, cols)

        if threads == 1:
            for t in tasks:
                run(t)
        else:
            # Row blocks in parallel on single-threaded BLAS (numpy releases the GIL in the products): no
            # per-product thread barriers, which cost 10x on a busy machine for cluster-sized products.
            from concurrent.futures import ThreadPoolExecutor

            from threadpoolctl import threadpool_limits
            tasks.sort(key=lambda t: -t[0])                               # largest first
            with threadpool_limits(1), ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, tasks))
        return removed

    def input_dim(self) -> int:
        if "dim" not in self._cache:
            self._cache["dim"] = int(self.embeddings(self.input_plan()[0]["key"]).shape[1])
        return self._cache["dim"]

    @staticmethod
    def _runs_for(labels_sorted: np.ndarray, clusters: list[int]):
        """(cluster, lo, hi) for each cluster of the group, empty ones included (lo == hi)."""
        for c in clusters:
            lo, hi = np.searchsorted(labels_sorted, [c, c + 1])
            yield c, int(lo), int(hi)

    def removed_rows(self) -> np.ndarray:
        out = []
        for key in self.dedup_groups(None):
            with np.load(os.path.join(self.run_dir, "dedup", f"{key}.npz")) as z:
                out.append(z["rows"][z["removed"]])
        return np.sort(np.concatenate(out))

    # ---- 3. the concept clustering (separate mode: a fresh k-means on the survivors) ---------------
    def recluster_all(self, ctx: JobContext, key: str) -> dict:
        k = self.k_concepts()
        x = self.sample_rows(k * int(self.rc.max_points_per_centroid), self.seed + 1, exclude=self.removed_rows())
        self.check_k("recipe.num_clusters", k, len(x))
        C = spherical_kmeans(x, k, self.niter(), self.seed + 1, self.device)
        with atomic_path(os.path.join(ctx.stage_dir("recluster"), "centroids.npy")) as tmp:
            np.save(tmp, C)
        return {"k": int(len(C)), "train_rows": int(len(x))}

    def reassign_shard(self, ctx: JobContext, key: str) -> dict:
        C = np.load(os.path.join(ctx.job_dir, "recluster", "centroids.npy"))
        off = self.offsets()[key]
        E = self.embeddings(key, mmap=False)
        removed = self._cache.get("removed")
        if removed is None:
            removed = self._cache["removed"] = self.removed_rows()
        dead = removed[(removed >= off) & (removed < off + len(E))] - off
        labels, cos = assign_to_centroids(E, C, self.device)
        labels[dead] = -1
        live = labels >= 0
        counts = np.bincount(labels[live], minlength=len(C))
        dist_sum = np.bincount(labels[live], weights=1.0 - cos[live], minlength=len(C))
        with atomic_path(os.path.join(ctx.stage_dir("reassign"), f"{key}.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, label=labels, cos=cos, counts=counts, dist_sum=dist_sum)
        return {"rows": int(live.sum())}

    # ---- concept clusters, whichever mode ------------------------------------------------------
    def concept_stats(self) -> ConceptStats:
        if self.shared_clustering:
            k = len(np.load(os.path.join(self.run_dir, "kmeans", "centroids.npy"), mmap_mode="r"))
            sizes, dist_sum = np.zeros(k, np.int64), np.zeros(k)
            centroids = None
            for key in self.dedup_groups(None):
                with np.load(os.path.join(self.run_dir, "dedup", f"{key}.npz")) as z:
                    live = ~z["removed"]
                    lab = z["cluster"][live]
                    sizes += np.bincount(lab, minlength=k)
                    dist_sum += np.bincount(lab, weights=1.0 - z["new_cos"][live].astype(np.float64), minlength=k)
                    if centroids is None:
                        centroids = np.zeros((k, z["centroids"].shape[1]), np.float32)
                    centroids[z["clusters"]] = z["centroids"]
            return ConceptStats(sizes, dist_sum, centroids)
        C = np.load(os.path.join(self.run_dir, "recluster", "centroids.npy"))
        sizes, dist_sum = np.zeros(len(C), np.int64), np.zeros(len(C))
        for key in self.embed_keys(None):
            with np.load(os.path.join(self.run_dir, "reassign", f"{key}.npz")) as z:
                sizes += z["counts"]
                dist_sum += z["dist_sum"]
        return ConceptStats(sizes, dist_sum, C)

    def concept_groups(self, ctx) -> list[str]:
        if self.shared_clustering:
            return self.dedup_groups(ctx)
        return [f"g{i:04d}" for i in range(len(self._groups("reassign")))]

    def concept_members(self, key: str) -> dict:
        """rows / cluster / dist (cosine distance to the concept centroid) of a group's survivors."""
        if self.shared_clustering:
            with np.load(os.path.join(self.run_dir, "dedup", f"{key}.npz")) as z:
                live = ~z["removed"]
                return {"rows": z["rows"][live], "cluster": z["cluster"][live],
                        "dist": 1.0 - z["new_cos"][live].astype(np.float64)}
        m = self._members("reassign", self._groups("reassign")[int(key[1:])])
        return {"rows": m["rows"], "cluster": m["cluster"], "dist": 1.0 - m["cos"].astype(np.float64)}

    # ---- 4. quotas -----------------------------------------------------------------------------
    def quota_all(self, ctx: JobContext, key: str) -> dict:
        stats = self.concept_stats()
        n_input, n_dedup = self.n_rows(), int(stats.sizes.sum())
        n_keep = budget(self.rc, n_input, n_dedup)
        table = stats.quotas(self.rc, n_keep)
        with atomic_path(os.path.join(ctx.stage_dir("quota"), "clusters.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, size=stats.sizes, **table)
        return {"n_input": n_input, "n_dedup": n_dedup, "n_keep": n_keep,
                "budget_exceeds_dedup": bool(round(self.rc.keep_fraction * (
                    n_input if self.rc.budget_of == "input" else n_dedup)) > n_dedup)}

    # ---- 5. prune ------------------------------------------------------------------------------
    def prune_group(self, ctx: JobContext, key: str) -> dict:
        with np.load(os.path.join(ctx.job_dir, "quota", "clusters.npz")) as z:
            quotas = z["quota"]
        m = self.concept_members(key)
        kept = select(m, quotas, self.rc.keep, self.seed)
        srt = np.argsort(m["rows"])
        pos = srt[np.searchsorted(m["rows"][srt], kept)]
        with atomic_path(os.path.join(ctx.stage_dir("prune"), f"{key}.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, rows=kept, cluster=m["cluster"][pos], dist=m["dist"][pos].astype(np.float32))
        return {"kept": int(len(kept))}

    # ---- outputs -------------------------------------------------------------------------------
    def write_all(self, ctx: JobContext, key: str) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq
        out_dir = os.path.join(ctx.job_dir, "pruned")
        parts = []
        for g in self.concept_groups(ctx):
            with np.load(os.path.join(ctx.job_dir, "prune", f"{g}.npz")) as z:
                parts.append({k: z[k] for k in ("rows", "cluster", "dist")})
        rows = np.concatenate([p["rows"] for p in parts])
        order = np.argsort(rows)
        rows = rows[order]
        cluster = np.concatenate([p["cluster"] for p in parts])[order]
        dist = np.concatenate([p["dist"] for p in parts])[order]
        ids, file_index, file_rows = [], [], []
        plan = self.input_plan()
        names = list(dict.fromkeys(p["file"] for p in plan))
        index = {f: i for i, f in enumerate(names)}
        for p in plan:
            lo, hi = np.searchsorted(rows, [p["offset"], p["offset"] + p["stop"] - p["start"]])
            if hi > lo:
                col = pq.read_table(os.path.join(ctx.job_dir, "embed", f"{p['key']}.ids.parquet"))["id"]
                ids.append(col.take(pa.array(rows[lo:hi] - p["offset"])).combine_chunks())
                # where each kept sample is: its input file (an index into the file names, not a Python string
                # per kept row) and its row there (0-based; blank lines not counted)
                file_index.append(np.full(int(hi - lo), index[p["file"]], dtype=np.int32))
                file_rows.append(rows[lo:hi] - p["offset"] + p["start"])
        files = pa.array(names, pa.string()).take(pa.array(np.concatenate(file_index) if file_index else
                                                           np.zeros(0, np.int32)))
        if len({a.type for a in ids}) > 1:
            ids = [a.cast(pa.string()) for a in ids]
        id_col = pa.concat_arrays(ids) if ids else pa.array([], pa.int64())
        with atomic_path(os.path.join(out_dir, "kept_ids.parquet")) as tmp:
            pq.write_table(pa.table({"id": id_col, "row": rows, "cluster": cluster.astype(np.int32),
                                     "distance": dist, "file": files,
                                     "file_row": np.concatenate(file_rows) if file_rows else
                                     np.zeros(0, np.int64)}), tmp)
        with np.load(os.path.join(ctx.job_dir, "quota", "clusters.npz")) as z:
            table = {k: z[k] for k in z.files}
        kept_per = np.bincount(cluster, minlength=len(table["size"]))
        before = self._counts("assign") if self.shared_clustering else None
        cols = {"cluster": np.arange(len(table["size"]), dtype=np.int32), "size": table["size"],
                "size_before_dedup": before if before is not None else np.full(len(table["size"]), -1),
                "d_intra": table["d_intra"], "d_inter": table["d_inter"], "complexity": table["complexity"],
                "probability": table["probability"], "quota": table["quota"], "kept": kept_per}
        with atomic_path(os.path.join(out_dir, "clusters.parquet")) as tmp:
            pq.write_table(pa.table(cols), tmp)
        plot_quota_vs_size(cols, os.path.join(out_dir, "quota_vs_size.png"))
        q = ctx.read_marker("quota", "all")
        dedup_removed = sum(ctx.read_marker("dedup", g)["removed"] for g in self.dedup_groups(ctx))
        manifest = {"paper": "Abbas et al., ICLR 2024 (DBP) + SemDeDup", "n_input": q["n_input"],
                    "dedup_removed": int(dedup_removed), "n_after_dedup": q["n_dedup"], "n_keep": q["n_keep"],
                    "kept": int(len(rows)), "kept_fraction": len(rows) / q["n_input"],
                    "budget_exceeds_dedup": q["budget_exceeds_dedup"],
                    "k_concepts": int(len(table["size"])),
                    "k_dedup": int(ctx.read_marker("kmeans", "all")["k"]),
                    "device": self.device, "settings": self.settings(),
                    "files": {"kept_ids": "kept_ids.parquet", "clusters": "clusters.parquet",
                              "plot": "quota_vs_size.png"}}
        atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest)
        return {k: manifest[k] for k in ("n_input", "dedup_removed", "n_after_dedup", "n_keep", "kept")}

    # ---- the embedded default's claim --------------------------------------------------------
    def evaluate_all(self, ctx: JobContext, key: str) -> dict:
        """Test accuracy after training on DBP- vs SSP- vs randomly-pruned subsets, the same budget each."""
        import pyarrow.parquet as pq
        rc, data = self.rc, self.digits()
        stats = self.concept_stats()
        groups = [self.concept_members(g) for g in self.concept_groups(ctx)]
        n_input, n_dedup = self.n_rows(), int(stats.sizes.sum())
        survivors = np.sort(np.concatenate([g["rows"] for g in groups]))
        rng = np.random.default_rng([self.seed, 7])
        fractions = sorted({float(f) for f in rc.eval_fractions})
        if self.smoke:
            fractions = fractions[:2]
        # the arms that sample from SemDeDup's survivors cannot keep more than n_dedup rows: at a larger budget they
        # would be capped and compared with random at a larger size. Those fractions are skipped for them (null
        # accuracy and kept count, aligned with `fractions`) and named in `capped_fractions`.
        pruned_arms = ("dedup_random", "ssp", "dbp")
        sizes = [int(round(f * n_input)) for f in fractions]
        capped = [f for f, n in zip(fractions, sizes) if n > n_dedup]
        if capped:
            log.warning("evaluate: eval_fractions %s of the %d input rows ask for more than the %d left after SemDeDup "
                        "(a fraction of at most %.4f): only random is trained there; dbp, ssp and dedup_random are "
                        "skipped, not capped at %d rows", ", ".join(f"{f:g}" for f in capped), n_input, n_dedup,
                        n_dedup / n_input, n_dedup)
        res = {"fractions": fractions, "n_input": n_input, "n_after_dedup": n_dedup, "n_unique": data["n_unique"],
               "target": sizes, "capped_fractions": capped,
               "accuracy": {m: [] for m in ("random",) + pruned_arms},
               "kept": {m: [] for m in ("random",) + pruned_arms}}
        res["accuracy_full"] = subset_accuracy(data, np.arange(n_input))
        for f, n in zip(fractions, sizes):
            picks = {"random": np.sort(rng.choice(n_input, n, replace=False))}
            if n <= n_dedup:
                picks["dedup_random"] = np.sort(rng.choice(survivors, n, replace=False))
                for name, kind in (("ssp", "uniform"), ("dbp", rc.complexity)):
                    quotas = stats.quotas(rc, n, kind)["quota"]
                    picks[name] = np.sort(np.concatenate([select(g, quotas, rc.keep, self.seed) for g in groups]))
            for name in res["accuracy"]:
                rows = picks.get(name)
                res["accuracy"][name].append(None if rows is None else subset_accuracy(data, rows))
                res["kept"][name].append(None if rows is None else int(len(rows)))
        kept = pq.read_table(os.path.join(ctx.job_dir, "pruned", "kept_ids.parquet"))["row"].to_numpy()
        res["accuracy_kept"] = subset_accuracy(data, kept)
        res["kept_fraction"] = len(kept) / n_input
        atomic_write_json(os.path.join(ctx.job_dir, "pruned", "eval.json"), res)
        return {"accuracy_full": res["accuracy_full"], "accuracy_kept": res["accuracy_kept"]}

    def summary(self, ctx: JobContext) -> dict:
        if not ctx.is_done("write", "all"):  # a partial run (`only=[...]`)
            return {}
        out = dict(ctx.read_marker("write", "all"))
        out["kept_fraction"] = out["kept"] / out["n_input"]
        if ctx.is_done("evaluate", "all"):
            with open(os.path.join(ctx.job_dir, "pruned", "eval.json")) as f:
                ev = json.load(f)
            out["accuracy_full"], out["accuracy_kept"] = ev["accuracy_full"], ev["accuracy_kept"]
            # only the arms trained at a fraction are reported there, each with the rows it kept
            for name, accs in ev["accuracy"].items():
                for fr, acc, kept in zip(ev["fractions"], accs, ev["kept"][name]):
                    if acc is not None:
                        out[f"accuracy_{name}@{fr:g}"] = acc
                        out[f"kept_{name}@{fr:g}"] = kept
            if ev.get("capped_fractions"):
                out["eval_capped_fractions"] = ",".join(f"{f:g}" for f in ev["capped_fractions"])
        return out


class _OneThreadPerWorker:
    """A stage's run_shard that first drops to one thread when it runs in a forked worker (picklable)."""

    def __init__(self, job: ConceptPrune, method: str):
        self.job, self.method = job, method

    def __call__(self, ctx, key):
        self.job._one_thread_if_forked()
        return getattr(self.job, self.method)(ctx, key)


# =====================================================================================================
# reading inputs (errors name the file and the line / row)
# =====================================================================================================
def is_image_encoder(spec: str) -> bool:
    """torchvision:<arch>, a HF hub id (not checked here), or a local HF folder with an image processor."""
    if spec.startswith("torchvision:"):
        return True
    if spec.startswith("builtin:"):   # builtin:minilm, the text encoder
        return False
    path = os.path.expanduser(spec)
    if os.path.isabs(path) or spec.startswith(("./", "../")) or os.path.isdir(path):
        return os.path.exists(os.path.join(path, "preprocessor_config.json"))
    return True


def count_rows(file: str, rc, every: int | None = None) -> int:
    """The file's rows (a line file's: its non-blank lines). `every` (the shard size): an uncompressed JSONL / .txt
    file's count also notes where each shard's first row starts (_line_starts, cached for the plan)."""
    if file.lower().endswith(".npy"):
        shape = np.load(file, mmap_mode="r").shape
        if len(shape) != 2:
            raise ValueError(f"{file}: expected a 2-D array (rows x dim) of embeddings, got shape {shape}")
        return int(shape[0])
    fmt, comp = shard_format(file, TEXT_FORMATS)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return int(pq.ParquetFile(file).metadata.num_rows)
    if fmt == "csv":
        n = _csv_streams(file, comp)                          # streamed: memory ~ a 1 MB block, not the file
        return int(_read_csv(file, comp).num_rows) if n is None else n
    if every and comp == "none":
        return _line_starts(file, every)[0]
    with open_shard(file, comp) as f:   # rows as read_texts reads them: lines at b"\n", a BOM at byte 0 aside
        return sum(1 for i, line in enumerate(f) if (line.removeprefix(_BOM) if i == 0 else line).strip())


def _line_starts(file: str, every: int) -> tuple[int, list]:
    r"""(rows, seeks) of an uncompressed JSONL / .txt file, in one pass of 1 MB blocks (vectorised): its rows as
    read_texts reads them (lines end at b"\n"; a line is a row unless bytes.strip() leaves nothing of it, a BOM at
    byte 0 aside), and [byte, line number] of the line holding each of rows 0, every, 2 every, ...: where a shard of
    `every` rows starts (read_texts seeks there instead of reading and skipping the rows before it). One pair per
    shard, not per row. Cached per process (file, mtime, size, every)."""
    key = (file, os.path.getmtime(file), os.path.getsize(file), every)
    if key not in _LINE_STARTS:
        n, lines, pos, seeks = 0, 0, 0, []
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                if not block.endswith(b"\n"):
                    block += f.readline()                   # whole lines
                kept = block.translate(_BYTES_KEPT)
                if pos == 0 and block.startswith(_BOM):
                    kept = bytes(len(_BOM)) + kept[len(_BOM):]
                starts = np.concatenate(([0], np.flatnonzero(np.frombuffer(block, np.uint8)[:-1] == 10) + 1))
                rows = np.flatnonzero(np.logical_or.reduceat(np.frombuffer(kept, bool), starts))   # non-blank lines
                seeks += [[pos + int(starts[i]), lines + int(i) + 1] for i in rows[(-n) % every::every]]
                n, lines, pos = n + len(rows), lines + len(starts), pos + len(block)
        _LINE_STARTS[key] = (n, seeks)
    return _LINE_STARTS[key]


_LINE_STARTS: dict = {}
_BOM = "\ufeff".encode()
# a bytes.translate table: 1 for a byte that bytes.strip() keeps
_BYTES_KEPT = bytes(c not in b" \t\n\r\x0b\x0c" for c in range(256))


def _read_csv(file: str, compression: str):
    import pyarrow.csv as pcsv
    with open_shard(file, compression) as f:
        return pcsv.read_csv(f)


def _open_csv(f):
    """A CSV streamed block by block (1 MB blocks; no read-ahead threads, so ~2 blocks in memory)."""
    import pyarrow.csv as pcsv
    return pcsv.open_csv(f, read_options=pcsv.ReadOptions(use_threads=False))


def _csv_streams(file: str, compression: str) -> int | None:
    """The CSV's row count if it streams block by block with the column types its first block suggests, else
    None. pyarrow.csv.read_csv infers from the first block and loosens a type (int64 -> double -> string ...)
    when a later block does not convert; the streaming reader cannot, it fails. Where the whole file streams the
    two give the same table, so its shards may stream; otherwise they read the whole file as before (the same
    ids, the same errors). One pass over the file, once per process (cached; the plan records the verdict)."""
    import pyarrow as pa
    key = (file, os.path.getmtime(file), os.path.getsize(file))
    if key not in _CSV_STREAMS:
        try:
            with open_shard(file, compression) as f:
                _CSV_STREAMS[key] = sum(batch.num_rows for batch in _open_csv(f))
        except pa.ArrowInvalid:
            _CSV_STREAMS[key] = None
    return _CSV_STREAMS[key]


_CSV_STREAMS: dict = {}


def _parquet_rows(file: str, columns: list[str], a: int, b: int, batch_size: int = 8192):
    """Rows [a, b) of `columns` of a Parquet file, reading only the row groups that hold them and those a batch
    at a time (unbuffered column chunks): memory and I/O ~ the shard, not the file (pq.read_table of the whole
    file for every shard was N^2 / shard_size I/O, and a 10k-row shard of a 115 MB file peaked at 460 MB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)
    groups, first, start = [], 0, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if start < b and start + n > a:
            first = start if not groups else first
            groups.append(g)
        start += n
    batches = _rows_in_range(pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns,
                                             use_threads=False), first, a, b) if groups else []
    schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
    return pa.Table.from_batches(batches, schema=batches[0].schema if batches else schema)


def _rows_in_range(batches, row: int, a: int, b: int) -> list:
    """The slices of record `batches` (the first one starting at row number `row`) that hold rows [a, b); stops
    reading after row b."""
    out = []
    for batch in batches:
        lo, hi = max(a, row), min(b, row + batch.num_rows)
        if hi > lo:
            out.append(batch.slice(lo - row, hi - lo))
        row += batch.num_rows
        if row >= b:
            break
    return out


def _csv_rows(file: str, compression: str, a: int, b: int, stream: bool | None = None):
    """(column names, rows [a, b) as a table) of a CSV file, streamed a block at a time when it can be
    (`stream`, else _csv_streams; the rows before `a` are still parsed: CSV has no row index), else read whole."""
    import pyarrow as pa
    if stream is None:
        stream = _csv_streams(file, compression) is not None
    if not stream:
        t = _read_csv(file, compression)
        return t.column_names, t.slice(a, b - a)
    with open_shard(file, compression) as f:
        reader = _open_csv(f)
        return reader.schema.names, pa.Table.from_batches(_rows_in_range(reader, 0, a, b), schema=reader.schema)


def read_embeddings(file: str, a: int, b: int, rc):
    """Rows [a, b) of a .npy matrix or a Parquet list column, L2-normalised, in batches."""
    if file.lower().endswith(".npy"):
        X = np.load(file, mmap_mode="r")
        if not np.issubdtype(X.dtype, np.floating):
            raise ValueError(f"{file}: embeddings must be floating point, got {X.dtype}")

        def batches():
            for s in range(a, b, 65536):
                yield l2_normalize(X[s:min(b, s + 65536)], f"{file} (rows from {s})")
        return None, batches()
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(file)
    names = pf.schema_arrow.names
    if rc.embedding_field not in names:
        raise RecipeConfigError(f"{file}: no column recipe.embedding_field={rc.embedding_field!r} "
                                f"(columns: {names})")
    cols = [rc.embedding_field] + ([rc.id_field] if rc.id_field in names else [])
    t = _parquet_rows(file, cols, a, b)
    col = t[rc.embedding_field].combine_chunks()
    lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lens) and ((lens != lens[0]) | np.isnan(lens.astype(float))).any():
        bad = int(np.flatnonzero((lens != lens[0]) | np.isnan(lens.astype(float)))[0])
        raise ValueError(f"{file}: row {a + bad} of {rc.embedding_field!r} has length {lens[bad]}, "
                         f"row {a} has {lens[0]}")
    X = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
    ids = t[rc.id_field].combine_chunks() if rc.id_field in names else None
    return ids, iter([l2_normalize(X, f"{file} (rows from {a})")])


def read_texts(file: str, a: int, b: int, rc, csv_stream: bool | None = None, seek: list | None = None):
    """(ids or None, texts) of rows [a, b) of a .jsonl / .parquet / .csv / .txt file (line formats .gz / .zst too).
    A text field missing from the data is a config problem (RecipeConfigError) naming the fields there.
    `seek` ([byte, line number] of row a's line in an uncompressed line file, from _line_starts): the shard starts
    reading there; else (compressed, or a plan from before seeks) it reads from byte 0 and skips the rows before a:
    the shards of one file then read N^2 / (2 shard_size) rows in all."""
    import pyarrow as pa
    fmt, comp = shard_format(file, TEXT_FORMATS)
    if fmt in ("parquet", "csv"):
        # only the shard's rows (Parquet: its row groups and the text / id columns), not the whole file
        if fmt == "parquet":
            import pyarrow.parquet as pq
            names = pq.ParquetFile(file).schema_arrow.names
            t = None
        else:
            names, t = _csv_rows(file, comp, a, b, csv_stream)
        if rc.text_field not in names:
            raise RecipeConfigError(f"{file}: no column recipe.text_field={rc.text_field!r} "
                                    f"(columns: {', '.join(names)})")
        if t is None:
            t = _parquet_rows(file, list(dict.fromkeys([rc.text_field] + [c for c in [rc.id_field] if c in names])),
                              a, b)
        texts = t[rc.text_field].to_pylist()
        for i, s in enumerate(texts):
            if not isinstance(s, str):
                raise ValueError(f"{file}: row {a + i}: {rc.text_field!r} is {type(s).__name__}, not text")
        ids = t[rc.id_field].combine_chunks() if rc.id_field in t.column_names else None
        return ids, texts
    # lines end at b"\n" only (CRLF too), as count_rows and _line_starts split them: a lone \r or a U+2028 inside
    # a string is not a line break (universal newlines split there, and the count and the rows disagreed)
    texts, ids, row, lineno = [], [], -1, 0
    with open_shard(file, comp) as f:
        if seek is not None:
            f.seek(seek[0])
            row, lineno = a - 1, seek[1] - 1
        for line in f:
            lineno += 1
            if lineno == 1:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            row += 1
            if row < a:
                continue
            if row >= b:
                break
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                why = f"{e.reason} at byte {e.start} of the line"
                raise ValueError(f"{file}:{lineno}: not UTF-8 text ({why})") from None
            if fmt == "txt":
                texts.append(line.removesuffix("\n").removesuffix("\r"))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and rc.text_field not in obj:
                raise RecipeConfigError(f"{file}:{lineno}: no text field recipe.text_field={rc.text_field!r} "
                                        f"(fields there: {', '.join(sorted(obj))})")
            if not isinstance(obj, dict) or not isinstance(obj.get(rc.text_field), str):
                raise ValueError(f"{file}:{lineno}: no text field recipe.text_field={rc.text_field!r}")
            texts.append(obj[rc.text_field])
            ids.append(obj.get(rc.id_field))
    has_ids = ids and all(i is not None for i in ids)
    if ids and not has_ids and any(i is not None for i in ids):
        raise ValueError(f"{file}: some rows have an id field {rc.id_field!r} and some do not")
    if has_ids and len({type(i) for i in ids}) > 1:   # 7 and "doc-7" in one file: ids as text (as across files)
        ids = [str(i) for i in ids]
    return (pa.array(ids) if has_ids else None), texts


def plot_quota_vs_size(cols: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure                   # no pyplot: no GUI backend, faster import
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    sc = ax.scatter(cols["size"], cols["quota"], c=cols["complexity"], s=12, cmap="viridis")
    n, q = cols["size"].sum(), cols["quota"].sum()
    lim = max(1, int(cols["size"].max()))
    ax.plot([0, lim], [0, lim], "k:", lw=0.8, label="quota = size (keep all)")
    ax.plot([0, lim], [0, lim * q / max(n, 1)], "r--", lw=0.8, label="proportional (random pruning)")
    ax.set_xlabel("cluster size after SemDeDup")
    ax.set_ylabel("quota (samples kept)")
    ax.set_title(f"DBP quotas: {q} of {n} kept, k={len(cols['size'])}")
    fig.colorbar(sc, ax=ax, label="complexity d_intra * d_inter")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
