"""PreSelect: predictive strength, BPC, the char n-gram LM, exact top-fraction filtering, resumability, splitting,
bad shards, and the CLI end to end (debug=smoke)."""
from __future__ import annotations

import gzip
import itertools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from omegaconf import OmegaConf
from conftest import child_env

from runx.recipes import preselect as P
from runx.recipes.preselect_ngram import CharNgramLM

# pytest-xdist (tests/run.sh runs 2 workers) keeps this file on one worker: its smoke job runs once
pytestmark = pytest.mark.xdist_group("preselect")


def smoke_cfg(**recipe) -> "OmegaConf":
    return OmegaConf.create({"seed": 0, "smoke": True, "recipe": {"name": "preselect", **recipe}})


def snapshot(folder: str) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def output_docs(out_dir: str) -> list[dict]:
    docs = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("part-"):
            docs += P._read_objects(os.path.join(out_dir, name))
    return docs


# ------------------------------------------------------------------------------------------ Eq. (2): S(d)
def brute_force_strength(losses: np.ndarray, ability: np.ndarray) -> np.ndarray:
    n = len(ability)
    out = []
    for row in losses:
        agree = 0
        for i in range(n):
            for j in range(i + 1, n):
                if ability[i] > ability[j] and row[i] < row[j]:
                    agree += 1
                elif ability[i] < ability[j] and row[i] > row[j]:
                    agree += 1
        out.append(agree / (n * (n - 1) / 2))
    return np.array(out)


def test_strength_matches_brute_force_pair_count_with_ties():
    rng = np.random.default_rng(0)
    for n_models in (2, 3, 6, 7):
        losses = rng.integers(0, 3, size=(300, n_models)).astype(float)     # many loss ties
        ability = rng.integers(0, 4, size=n_models).astype(float)           # ability ties too
        S, agree = P.predictive_strength(losses, ability)
        np.testing.assert_allclose(S, brute_force_strength(losses, ability))
        np.testing.assert_array_equal(agree, np.round(S * n_models * (n_models - 1) / 2).astype(int))
    # direction: the abler model must have the *lower* loss
    S, _ = P.predictive_strength(np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(S, [1.0, 0.0])


def test_strength_is_kendall_tau_without_ties():
    from scipy.stats import kendalltau
    rng = np.random.default_rng(1)
    for n_models in (3, 6, 9):
        ability = rng.permutation(n_models).astype(float) + rng.random(n_models) * 0.1
        losses = rng.normal(size=(200, n_models))
        S, _ = P.predictive_strength(losses, ability)
        tau = np.array([kendalltau(ability, -row).statistic for row in losses])
        np.testing.assert_allclose(S, (tau + 1) / 2, atol=1e-12)


def test_labels_positives_perfect_negatives_lowest():
    S = np.array([1.0, 0.2, 1.0, 0.0, 0.6, 0.2, 1.0, 0.4])
    agree = np.round(S * 5).astype(int)
    pos, neg = P.choose_labels(S, agree, 5, "perfect", 0.1, seed=0)
    np.testing.assert_array_equal(pos, [0, 2, 6])
    assert sorted(S[neg]) == [0.0, 0.2, 0.2]
    pos_q, neg_q = P.choose_labels(S, agree, 5, "quantile", 0.5, seed=0)
    assert set(pos_q) >= {0, 2, 6} and len(neg_q) == len(pos_q) and not set(pos_q) & set(neg_q)



def test_quantile_positives_are_exactly_the_quantile_when_scores_tie():
    """3 references: S takes 4 values, so a cut at a score level would take a whole tied level."""
    rng = np.random.default_rng(0)
    agree = rng.choice(4, size=300, p=[0.1, 0.12, 0.2, 0.58])
    S = agree / 3
    for q in (0.1, 0.3):
        pos, neg = P.choose_labels(S, agree, 3, "quantile", q, seed=0)
        assert len(pos) == len(neg) == round(q * 300) and not set(pos) & set(neg)
        assert S[pos].min() >= S[np.setdiff1d(np.arange(300), pos)].max()        # the highest S first
        assert S[neg].max() <= S[np.setdiff1d(np.arange(300), neg)].min()        # the lowest S first
        again, _ = P.choose_labels(S, agree, 3, "quantile", q, seed=0)
        other, _ = P.choose_labels(S, agree, 3, "quantile", q, seed=1)
        np.testing.assert_array_equal(pos, again)                               # seeded tie-break
        assert set(other) != set(pos)

# ------------------------------------------------------------------------------------------ Eq. (1): BPC
def brute_force_witten_bell(train: list[str], order: int, text: str) -> float:
    from collections import Counter, defaultdict
    pad = "\0" * (order - 1)
    joint, ctx, types = Counter(), Counter(), defaultdict(set)
    for t in train:
        s = pad + t
        for i in range(order - 1, len(s)):
            for k in range(order):
                c = s[i - k:i]
                joint[(c, s[i])] += 1
                ctx[c] += 1
                types[c].add(s[i])
    s, bits = pad + text, 0.0
    for i in range(order - 1, len(s)):
        p = 1.0 / 128
        for k in range(order):
            c = s[i - k:i]
            if ctx[c]:
                p = (joint[(c, s[i])] + len(types[c]) * p) / (ctx[c] + len(types[c]))
        bits -= math.log2(p)
    return bits


def test_char_ngram_matches_brute_force_witten_bell_and_normalises():
    train = ["the cat sat on the mat.", "the dog sat.", "a cat and a dog", "zz top"]
    tests = ["the cat sat.", "a dog and the cat", "qqq unseen!", "", "t"]
    for order in (1, 3, 5):
        lm = CharNgramLM(order).fit(train)
        got = lm.doc_bits(tests)
        want = [brute_force_witten_bell(train, order, t) for t in tests]
        np.testing.assert_allclose(got, want, rtol=1e-10)
        # the conditional distribution after a context sums to one over the 128 codes
        prompts = ["the ca"] * 127
        conts = [chr(c) for c in range(1, 128)]
        total = np.sum(2.0 ** -lm.continuation_bits(prompts, conts))
        # code 0 (the document-start pad) is never a target: at most the 1/128 base mass is lost to it
        assert 1.0 - 1.0 / 128 <= total <= 1.0 + 1e-9


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory):
    """Three randomly initialised tiny Llamas saved as local HF folders, with the byte tokenizer."""
    import torch
    import transformers
    from runx.trainers.hf import byte_tokenizer
    tok = byte_tokenizer()
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        conf = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=96,
                                        pad_token_id=256, bos_token_id=257, eos_token_id=258)
        model = transformers.AutoModelForCausalLM.from_config(conf)
        d = str(tmp_path_factory.mktemp(f"llama{seed}"))
        model.save_pretrained(d)
        tok.save_pretrained(d)
        paths.append(d)
    return paths


def hf_guide_nats(model, ids: list[int], window: int, stride: int) -> float:
    """The Hugging Face perplexity guide's sliding window, one document at a time, via the model's own loss."""
    import torch
    x = torch.tensor([ids])
    total, prev_end = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        inp = x[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n:
            with torch.no_grad():
                total += float(model(inp, labels=labels).loss) * n
        prev_end = end
        if end == len(ids):
            break
    return total


@pytest.fixture
def one_torch_thread():
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a busy 2-core machine
    yield
    torch.set_num_threads(n)


def test_hf_bpc_sliding_window_matches_the_hf_guide_and_is_batch_invariant(tiny_llamas, one_torch_thread):
    from runx.trainers.hf import load_tokenizer
    import transformers
    path = tiny_llamas[0]
    tok = load_tokenizer(OmegaConf.create({"path": path, "tokenizer": None, "trust_remote_code": False}))
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    texts = ["short.", "a somewhat longer document that needs several windows " * 3, "x", "mid length text here"]
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for window, stride in ((96, 95), (16, 5), (12, 11)):
        got = P.causal_lm_doc_nats(model, tok, texts, window, stride, batch_size=1, device="cpu")
        want = [hf_guide_nats(model, i, window, stride) for i in ids]
        np.testing.assert_allclose(got, want, rtol=2e-5)
        batched = P.causal_lm_doc_nats(model, tok, texts, window, stride, batch_size=5, device="cpu")
        np.testing.assert_allclose(batched, got, rtol=2e-5)
    # full context for a short doc: one forward pass over BOS + tokens
    import torch
    with torch.no_grad():
        logp = model(torch.tensor([ids[1][:40]])).logits[0].log_softmax(-1)
    full = -sum(float(logp[t - 1, ids[1][t]]) for t in range(1, 40))
    text40 = tok.decode(ids[1][1:40])
    np.testing.assert_allclose(P.causal_lm_doc_nats(model, tok, [text40], 96, 32, 4, "cpu"), [full], rtol=2e-5)
    with pytest.raises(ValueError, match="bpc_stride"):
        P.causal_lm_doc_nats(model, tok, texts, 16, 16, 1, "cpu")


# ------------------------------------------------------------------------------------------ exact threshold
def test_rank_order_and_pass2_mask_agree_and_keep_fraction_within_one_doc():
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(1, 400))
        score = rng.integers(0, 6, size=n) / 5.0                        # heavy ties
        shard = np.sort(rng.integers(0, 4, size=n))
        line = np.concatenate([np.arange(1, (shard == s).sum() + 1) for s in range(4)])
        chars = rng.integers(0, 500, size=n)
        fraction = float(rng.uniform(0.01, 1.0))
        order = P.rank_order(score, shard, line)
        k = P.prefix_closest_to(chars[order], fraction * chars.sum())
        thr = {"keep_none": k == 0, "score": None, "shard": None, "line": None}
        if k:
            last = order[k - 1]
            thr.update(score=float(score[last]), shard=int(shard[last]), line=int(line[last]))
        mask = np.zeros(n, bool)
        for s in range(4):
            sel = shard == s
            mask[sel] = P.kept_mask(score[sel], s, line[sel], thr)
        assert mask.sum() == k and set(np.flatnonzero(mask)) == set(order[:k].tolist())
        kept = chars[mask].sum()
        assert abs(kept - fraction * chars.sum()) <= max(chars.max(), 1) / 2 + 1e-9


# ------------------------------------------------------------------------------------------ atomic writes
def test_atomically_written_files_get_the_umask_mode_not_0600(tmp_path):
    """Result files (summary.json, manifests, config.yaml) must be readable by the group like any other file."""
    import stat
    from runx.trainers.datajob import atomic_write_bytes, atomic_write_json
    old = os.umask(0o022)
    try:
        atomic_write_bytes(str(tmp_path / "a.bin"), b"x")
        atomic_write_json(str(tmp_path / "b.json"), {"k": 1})
        os.umask(0o027)
        atomic_write_bytes(str(tmp_path / "c.bin"), b"y")
    finally:
        os.umask(old)

    def mode(name):
        return stat.S_IMODE(os.stat(tmp_path / name).st_mode)
    assert (mode("a.bin"), mode("b.json"), mode("c.bin")) == (0o644, 0o644, 0o640)
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.json", "c.bin"]      # no temp file left behind
    # safetensors' save_file creates 0600 files: atomic_path and the exports give them the umask mode
    import torch
    from safetensors.torch import save_file
    from runx.trainers.datajob import atomic_path, readable_like_open
    old = os.umask(0o022)
    try:
        with atomic_path(str(tmp_path / "w.safetensors")) as tmp:
            save_file({"x": torch.zeros(2)}, tmp)
        (tmp_path / "export").mkdir()
        save_file({"x": torch.zeros(2)}, str(tmp_path / "export" / "model.safetensors"))
        readable_like_open(str(tmp_path / "export"))
    finally:
        os.umask(old)
    assert mode("w.safetensors") == 0o644 and mode("export/model.safetensors") == 0o644


# ------------------------------------------------------------------------------------------ the job
@pytest.fixture(scope="module")
def smoke_job(tmp_path_factory):
    """The embedded default under smoke, run up to the global threshold (the filter stage not yet run)."""
    run_dir = str(tmp_path_factory.mktemp("preselect_smoke"))
    job = P.PreSelect(smoke_cfg(), run_dir)
    before = [s.name for s in job.stages()]
    job.run(only=before[: before.index("filter")])
    return run_dir


def test_filter_killed_midway_then_rerun_is_byte_identical(smoke_job, tmp_path):
    run_dir = str(tmp_path / "job")
    shutil.copytree(smoke_job, run_dir)
    job = P.PreSelect(smoke_cfg(), run_dir)
    job.run(only=["filter"])
    uninterrupted = {**snapshot(os.path.join(run_dir, "output")), **{
        "filter/" + k: v for k, v in snapshot(os.path.join(run_dir, "filter")).items()}}
    shutil.rmtree(os.path.join(run_dir, "filter"))
    for f in os.listdir(os.path.join(run_dir, "output")):
        if f.startswith("part-") or f == "manifest.json":
            os.unlink(os.path.join(run_dir, "output", f))
    # a separate process writes shard 0, starts shard 1, and is SIGKILLed halfway through writing it
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(OmegaConf.to_container(smoke_cfg())))
    script = textwrap.dedent(f"""
        import json, os, signal
        from omegaconf import OmegaConf
        import runx.recipes.preselect as P
        real = P.write_shard_lines
        calls = []
        def dying(path, lines, compression):
            calls.append(path)
            if len(calls) == 2:
                def half():
                    for i, line in enumerate(lines):
                        if i == 3:
                            os.kill(os.getpid(), signal.SIGKILL)
                        yield line
                return real(path, half(), compression)
            return real(path, lines, compression)
        P.write_shard_lines = dying
        cfg = OmegaConf.create(json.load(open({str(cfg_path)!r})))
        P.PreSelect(cfg, {run_dir!r}).run(only=["filter"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    done = [f for f in os.listdir(os.path.join(run_dir, "filter")) if f.endswith(".done.json")]
    assert done == ["00000.done.json"]                       # killed midway: one shard finished, not all
    assert any(f.startswith(".tmp-") for f in os.listdir(os.path.join(run_dir, "output")))  # half-written temp
    P.PreSelect(smoke_cfg(), run_dir).run(only=["filter"])
    resumed = {**snapshot(os.path.join(run_dir, "output")), **{
        "filter/" + k: v for k, v in snapshot(os.path.join(run_dir, "filter")).items()}}
    assert sorted(resumed) == sorted(uninterrupted)
    for k in uninterrupted:
        assert resumed[k] == uninterrupted[k], k


def _gone(pid: int) -> bool:
    """No process `pid` (a zombie, not yet reaped by whoever inherited it, is gone too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_fasttext_child_dies_with_the_run_and_its_temp_file_goes_on_the_rerun(tmp_path):
    """A SIGKILLed run's fastText training process used to train on as an orphan (competing with the rerun for
    the cores) and leave its temp file (~800 MB at 2M buckets) for good."""
    train = tmp_path / "train.txt"
    train.write_text("".join(f"{P.FT_POSITIVE if i % 2 else P.FT_NEGATIVE} doc {i} words {'ab' * (i % 5)}\n"
                             for i in range(40)))
    out = tmp_path / "train" / "classifier.bin"
    pid_file = tmp_path / "child.pid"
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "fasttext.py").write_text(textwrap.dedent(f"""
        import json, os, sys, time
        def train_supervised(**kw):     # a training that takes long: half of a model written, then waits
            with open(json.loads(sys.argv[1])["output"], "wb") as f:
                f.write(b"half a model")
            with open({str(pid_file)!r} + ".part", "w") as f:
                f.write(str(os.getpid()))
            os.replace({str(pid_file)!r} + ".part", {str(pid_file)!r})
            time.sleep(120)
    """))
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys; from runx.recipes.preselect import train_fasttext_clean_process as t; "
                               "t(sys.argv[1], sys.argv[2], {})", str(train), str(out)],
        env=child_env({"PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}))
    child = None
    try:
        for _ in range(600):
            if pid_file.exists() or parent.poll() is not None:
                break
            time.sleep(0.05)
        assert pid_file.exists(), f"the fastText child did not start (parent exit {parent.poll()})"
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)                # runx killed mid-training
        parent.wait(timeout=30)
        for _ in range(100):
            if _gone(child):
                break
            time.sleep(0.05)
        assert _gone(child), "the fastText child outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and not _gone(child):
            os.kill(child, signal.SIGKILL)
    left = [f for f in os.listdir(out.parent) if f.startswith(".tmp-")]
    assert left and left[0].endswith("-classifier.bin")   # what the killed run left
    live = out.parent / f".tmp-{os.getpid()}-classifier.bin.other"  # a live process's temp: not touched
    live.write_bytes(b"in use")
    # a killed run's temp from another node (a SLURM requeue elsewhere, a new container): one writer of this file
    elsewhere = out.parent / ".tmp-12345@0badf00d-classifier.bin"
    elsewhere.write_bytes(b"half a model")
    # (the recipe's settings but a small table: with epoch=1 and unigrams fastText stopped on "Encountered NaN" in
    # a third of the runs on these 40 lines)
    P.train_fasttext_clean_process(str(train), str(out), dict(wordNgrams=2, epoch=3, lr=0.1, dim=8, minCount=1,
                                                              bucket=20000, thread=1, seed=0, loss="softmax",
                                                              verbose=0))
    assert sorted(os.listdir(out.parent)) == sorted(["classifier.bin", live.name])


def test_kept_character_fraction_within_one_document(smoke_job, tmp_path):
    run_dir = str(tmp_path / "job")
    shutil.copytree(smoke_job, run_dir)
    for fraction, fmt in ((0.1, "same"), (0.37, "parquet")):
        for d in ("filter_threshold", "filter", "output"):
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
        if os.path.exists(os.path.join(run_dir, "preselect_job.json")):  # by hand: only the last stages rerun
            os.unlink(os.path.join(run_dir, "preselect_job.json"))
        P.PreSelect(smoke_cfg(keep_fraction=fraction, output_format=fmt), run_dir).run(
            only=["filter_threshold", "filter"])
        assert all(f.endswith(".parquet" if fmt == "parquet" else ".jsonl.zst")
                   for f in os.listdir(os.path.join(run_dir, "output")) if f.startswith("part-"))
        pool = [d for p in sorted(os.listdir(os.path.join(run_dir, "world", "pool")))
                for d in P._read_objects(os.path.join(run_dir, "world", "pool", p))]
        total = sum(len(d["text"]) for d in pool)
        kept = output_docs(os.path.join(run_dir, "output"))
        kept_chars = sum(len(d["text"]) for d in kept)
        longest = max(len(d["text"]) for d in pool)
        assert abs(kept_chars - fraction * total) <= longest, (kept_chars, fraction * total)
        manifest = json.load(open(os.path.join(run_dir, "output", "manifest.json")))
        assert manifest["kept_chars"] == kept_chars and manifest["kept_docs"] == len(kept)
        assert manifest["total_chars"] == total
        # the kept documents are exactly the top of the global score ranking
        scores = {}
        for k in ("00000", "00001", "00002"):
            z = np.load(os.path.join(run_dir, "filter_score", f"{k}.npz"))
            scores.update({(int(k), int(l)): float(s) for l, s in zip(z["line"], z["score"])})
        thr = manifest["threshold"]["score"]
        kept_ids = {d["id"] for d in kept}
        assert all(d["id"] in kept_ids for d in pool if scores[(int(d["id"].split("-")[1]),
                                                                int(d["id"].split("-")[2]) + 1)] > thr)


def test_compute_multiplier_does_not_depend_on_the_order_of_the_random_budgets(smoke_job, tmp_path):
    """The random curve is read as budgets grow: [2, 1] and [1, 2] train the same students and must give the
    same multiplier (it used to interpolate the curve in the config's order)."""
    filtered = str(tmp_path / "filtered")
    shutil.copytree(smoke_job, filtered)
    P.PreSelect(smoke_cfg(), filtered).run(only=["filter"])
    got = {}
    for multiples in ([1, 2], [2, 1]):
        run_dir = str(tmp_path / "x".join(map(str, multiples)))
        shutil.copytree(filtered, run_dir)
        os.unlink(os.path.join(run_dir, "preselect_job.json"))     # by hand: only the students rerun
        P.PreSelect(smoke_cfg(random_budget_multiples=multiples), run_dir).run(only=["students"])
        got[tuple(multiples)] = json.load(open(os.path.join(run_dir, "students", "all.done.json")))
    up, down = got[(1, 2)], got[(2, 1)]
    assert [c["multiple"] for c in down["students"]["random"]] == [1, 2]          # the curve in budget order
    assert down["students"]["random"] == up["students"]["random"]
    assert (down["compute_multiplier"], down["multiplier_bound"]) == (up["compute_multiplier"],
                                                                       up["multiplier_bound"])
    curve = up["students"]["random"]
    assert up["compute_multiplier"] == P.compute_multiplier(
        [c["chars"] for c in curve], [c["accuracy"] for c in curve], up["students"]["preselect"]["accuracy"],
        up["students"]["preselect"]["chars"])["multiplier"]


def test_split_across_tasks_and_workers_gives_identical_outputs(tmp_path):
    cfg = smoke_cfg(world={"compression": "gz"}, evaluate=False)
    one = str(tmp_path / "one")
    P.PreSelect(cfg, one).run(num_workers=2)
    two = str(tmp_path / "two")
    results = {}
    for _ in range(20):  # two SLURM array tasks taking turns until both finish
        for t in (1, 0):
            results[t] = P.PreSelect(cfg, two).run(task_index=t, num_tasks=2)
        if all("incomplete_stage" not in r for r in results.values()):
            break
    assert all("incomplete_stage" not in r for r in results.values())
    a, b = snapshot(os.path.join(one, "output")), snapshot(os.path.join(two, "output"))
    parts = [k for k in a if k.startswith("part-")]
    assert parts and all(k.endswith(".jsonl.gz") for k in parts)
    for k in parts + ["score_histogram.png"]:
        assert a[k] == b[k], k
    assert snapshot(os.path.join(one, "train")) == snapshot(os.path.join(two, "train"))
    # rerunning a finished job redoes nothing and changes nothing
    redone = []
    again = P.PreSelect(cfg, one).run(progress=lambda stage, todo, skipped, secs: redone.append((stage, todo)))
    assert [todo for _, todo in redone] == [0] * len(redone) and len(redone) >= 9
    assert snapshot(os.path.join(one, "output")) == a and again["kept_docs"] == results[0]["kept_docs"]


def write_pool_with_bad_shards(folder: str, rng) -> dict:
    """Good shards in every format, plus bad lines and unreadable files. Returns the expected bad count."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    words = "the quick brown fox jumps over a lazy dog while cats sleep and birds sing".split()

    def doc(i):
        return {"id": f"d{i}", "text": " ".join(rng.choice(words, size=int(rng.integers(5, 40))))}
    os.makedirs(folder)
    docs = [doc(i) for i in range(240)]
    lines = [json.dumps(d) for d in docs[:60]]
    lines.insert(5, '{"id": "broken", "text": "no closing brace"')            # invalid JSON
    lines.insert(9, json.dumps({"id": "x", "body": "wrong field"}))            # missing text field
    lines.insert(12, json.dumps({"id": "y", "text": 42}))                      # text not a string
    lines.insert(20, "")                                                       # empty line
    with open(os.path.join(folder, "a.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with gzip.open(os.path.join(folder, "b.jsonl.gz"), "wt") as f:
        f.write("".join(json.dumps(d) + "\n" for d in docs[60:120]))
    import zstandard
    with open(os.path.join(folder, "c.jsonl.zst"), "wb") as f:
        f.write(zstandard.ZstdCompressor().compress("".join(json.dumps(d) + "\n" for d in docs[120:180]).encode()))
    table = pa.Table.from_pylist(docs[180:240] + [{"id": "n", "text": None}])  # one null text row
    pq.write_table(table, os.path.join(folder, "d.parquet"))
    good_gz = gzip.compress("".join(json.dumps(d) + "\n" for d in docs[:50]).encode())
    with open(os.path.join(folder, "e.jsonl.gz"), "wb") as f:                   # truncated gzip
        f.write(good_gz[: len(good_gz) // 2])
    with open(os.path.join(folder, "f.parquet"), "wb") as f:                    # not a parquet file at all
        f.write(b"this is not parquet")
    return {"a.jsonl": 4, "d.parquet": 1, "e.jsonl.gz": 1, "f.parquet": 1}


def test_bad_shards_are_reported_with_path_and_line_and_counted(tiny_llamas, tmp_path, caplog, one_torch_thread):
    rng = np.random.default_rng(0)
    pool = str(tmp_path / "pool")
    expected = write_pool_with_bad_shards(pool, rng)
    sample = str(tmp_path / "sample")
    write_pool_with_bad_shards(sample, np.random.default_rng(1))
    refs = [{"name": f"llama{i}", "kind": "hf", "path": p, "score": float(i)} for i, p in enumerate(tiny_llamas)]
    cfg = OmegaConf.create({"seed": 0, "smoke": False, "recipe": {
        "name": "preselect", "pool": pool, "sample": sample, "references": refs, "bpc_window": 64,
        "bpc_stride": 32, "positives": "quantile", "positive_quantile": 0.3, "ft_bucket": 5000, "keep_fraction": 0.25, "output_format": "jsonl",
        "output_compression": "none"}})
    run_dir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="runx.preselect"):
        result = P.PreSelect(cfg, run_dir).run(num_workers=1)
    assert "incomplete_stage" not in result
    manifest = json.load(open(os.path.join(run_dir, "output", "manifest.json")))
    assert manifest["bad_lines"] == sum(expected.values()) == result["pool_bad_lines"]
    assert result["sample_bad_lines"] == sum(expected.values())
    bad = {}
    for f in sorted(os.listdir(os.path.join(run_dir, "filter_score"))):
        if f.endswith(".bad.jsonl"):
            for line in open(os.path.join(run_dir, "filter_score", f)):
                b = json.loads(line)
                bad.setdefault(os.path.basename(b["path"]), []).append((b["line"], b["error"]))
    assert {k: len(v) for k, v in bad.items()} == expected
    a_lines = dict(bad["a.jsonl"])
    assert "invalid JSON" in a_lines[6] and "missing field 'text'" in a_lines[10]
    assert "is int, expected a string" in a_lines[13] and a_lines[21] == "empty line"
    assert "unreadable" in bad["e.jsonl.gz"][0][1] and "parquet" in bad["f.parquet"][0][1]
    assert "null" in bad["d.parquet"][0][1] and bad["d.parquet"][0][0] == 61
    assert any("a.jsonl:6" in r.getMessage() for r in caplog.records)
    # every good document was scored: 56 + 60 + 60 + 60 + the readable head of the truncated gzip
    assert manifest["total_docs"] >= 236 and manifest["kept_docs"] > 0
    assert abs(manifest["kept_chars"] - 0.25 * manifest["total_chars"]) <= max(
        len(d["text"]) for d in output_docs(os.path.join(run_dir, "output")))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"recipe.keep_fraction=1.5"):
        P.PreSelect(smoke_cfg(keep_fraction=1.5), str(tmp_path))
    with pytest.raises(ValueError, match=r"recipe.references\[0\].kind=ngram: .*recipe.pool=builtin"):
        P.PreSelect(smoke_cfg(pool=str(tmp_path), sample=str(tmp_path)), str(tmp_path))
    with pytest.raises(ValueError, match=r"recipe.references\[1\].score=None: kind=hf needs"):
        P.PreSelect(smoke_cfg(references=[{"name": "a", "kind": "hf", "path": "x", "score": 1},
                                          {"name": "b", "kind": "hf", "path": "y"}]), str(tmp_path))
    with pytest.raises(ValueError, match=r"recipe.bpc_stride=10: must be in \[1, bpc_window-1\]"):
        P.PreSelect(smoke_cfg(bpc_window=10, bpc_stride=10), str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"recipe.pool='/nonexistent/\*.jsonl': no shards found"):
        P.list_shards("/nonexistent/*.jsonl", "pool")
    # the random curve's budgets: distinct and positive (checked whole, though smoke keeps only the first two)
    for bad in ([1, 1, 2], [0, 1], [1, -2], [1, 2, 4, 2], "2"):
        with pytest.raises(ValueError, match=r"recipe.random_budget_multiples=.*: must be distinct positive"):
            P.PreSelect(smoke_cfg(random_budget_multiples=bad), str(tmp_path))
    P.PreSelect(smoke_cfg(random_budget_multiples=[4, 1, 0.5]), str(tmp_path))   # any order is fine



# ------------------------------------------------------------------------------------------ one job per run dir
def own_data_cfg(pool: str, sample: str, **recipe) -> "OmegaConf":
    refs = [{"name": "a", "kind": "hf", "path": "hub-org/a", "score": 1.0},      # hub ids: never loaded here
            {"name": "b", "kind": "hf", "path": "hub-org/b", "score": 2.0}]
    return OmegaConf.create({"seed": 0, "smoke": False, "recipe": {
        "name": "preselect", "pool": pool, "sample": sample, "references": refs, **recipe}})


def write_docs(path, n: int, field: str = "text", start: int = 0) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": f"d{i}", field: f"document {i} about things"}) + "\n"
                     for i in range(start, start + n))
    return str(path)


def pin(cfg, run_dir, **kw) -> dict:
    """The run's settings check and nothing else: no stage is selected."""
    return P.PreSelect(cfg, str(run_dir)).run(only=["(no stage)"], **kw)


def test_rerun_with_other_settings_or_inputs_is_refused_and_resume_never_starts_over(tmp_path):
    from runx.trainers.recipe import RecipeConfigError
    for i in range(2):
        write_docs(tmp_path / "pool_a" / f"{i}.jsonl", 5, start=5 * i)
    write_docs(tmp_path / "pool_b" / "0.jsonl", 7)
    sample = write_docs(tmp_path / "sample.jsonl", 4)
    run = tmp_path / "run"
    cfg = own_data_cfg(str(tmp_path / "pool_a"), sample)
    pin(cfg, run)
    record = json.load(open(run / "preselect_job.json"))
    assert record["inputs"]["count"] == 3 and record["settings"]["recipe"]["keep_fraction"] == 0.1
    # nothing finished yet: other settings (a fixed typo) simply replace the record
    pin(own_data_cfg(str(tmp_path / "pool_a"), sample, text_field="body"), run)
    pin(cfg, run)
    write_docs(run / "sample" / "00000.done.json", 1)                 # a finished shard
    (run / "output").mkdir()
    (run / "output" / "part-00000.jsonl").write_text("{}\n")
    for other, named in ((own_data_cfg(str(tmp_path / "pool_b"), sample), r"recipe.pool \(.*pool_a.*pool_b"),
                         (own_data_cfg(str(tmp_path / "pool_a"), sample, keep_fraction=0.5),
                          r"recipe.keep_fraction \(0.1 -> 0.5\)")):
        with pytest.raises(RecipeConfigError, match=named) as err:
            pin(other, run)
        assert "resume=never" in str(err.value) and "run_dir=" in str(err.value)
    pin(own_data_cfg(str(tmp_path / "pool_a"), sample, bpc_batch_size=1, num_workers=3), run)   # how, not what
    with open(tmp_path / "pool_a" / "1.jsonl", "a") as f:
        f.write(json.dumps({"id": "new", "text": "one more document"}) + "\n")
    with pytest.raises(RecipeConfigError, match=r"input files \(3 files, .*1\.jsonl was modified"):
        pin(cfg, run)
    with pytest.raises(RecipeConfigError, match=r"resume=/elsewhere: .*run_dir=/elsewhere"):
        pin(cfg, run, resume="/elsewhere")
    other = own_data_cfg(str(tmp_path / "pool_b"), sample, keep_fraction=0.5)
    pin(other, run, resume="never")                                    # starts over: stale shards and outputs go
    assert not (run / "sample").exists() and not (run / "output" / "part-00000.jsonl").exists()
    assert json.load(open(run / "preselect_job.json"))["settings"]["recipe"]["keep_fraction"] == 0.5
    pin(other, run)


def test_a_shared_output_dir_belongs_to_one_run(tmp_path):
    from runx.trainers.recipe import RecipeConfigError
    pool = write_docs(tmp_path / "pool" / "0.jsonl", 5)
    out = tmp_path / "shared_out"
    cfg = own_data_cfg(pool, pool, output_dir=str(out))
    pin(cfg, tmp_path / "run1")
    (out / "part-00000.jsonl").write_text("{}\n")                       # run1's output
    pin(cfg, tmp_path / "run1")                                        # its own folder: fine
    with pytest.raises(RecipeConfigError, match=r"recipe.output_dir=.*shared_out already holds the outputs of "
                                                 r"run_dir=.*run1"):
        pin(cfg, tmp_path / "run2")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    with pytest.raises(RecipeConfigError, match=r"files no PreSelect run wrote \(notes.txt"):
        pin(own_data_cfg(pool, pool, output_dir=str(mine)), tmp_path / "run3")
    assert (mine / "notes.txt").exists() and (out / "part-00000.jsonl").exists()   # nothing deleted
    pin(cfg, tmp_path / "run1", resume="never")                        # run1 starting over clears its own parts
    assert sorted(os.listdir(out)) == [".runx_owner.json"]
    pin(cfg, tmp_path / "run2")                                        # an emptied folder can change hands


def test_config_problems_come_before_any_model_loads(tmp_path):
    """Empty pool listings, missing local references, a window too long for a reference: constructor problems."""
    sample = write_docs(tmp_path / "sample.jsonl", 6)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("plain text is not a PreSelect shard")
    with pytest.raises(ValueError, match=r"recipe.pool=.*txt.*: no shards found"):
        P.PreSelect(own_data_cfg(str(tmp_path / "txt"), sample), str(tmp_path / "r"))
    (tmp_path / "bz").mkdir()
    (tmp_path / "bz" / "a.jsonl.bz2").write_bytes(b"BZh9")
    with pytest.raises(ValueError, match=r"cannot read .*a\.jsonl\.bz2"):
        P.PreSelect(own_data_cfg(str(tmp_path / "bz"), sample), str(tmp_path / "r"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 96}))
    refs = [{"name": "a", "kind": "hf", "path": "/nope/m", "score": 1}, {"name": "b", "kind": "hf",
                                                                          "path": str(model), "score": 2}]
    with pytest.raises(ValueError, match=r"(?s)recipe.references\[0\].path=/nope/m: no such folder.*"
                                         r"bpc_window=128 exceeds b's max_position_embeddings=96"):
        P.PreSelect(own_data_cfg(sample, sample, references=refs, bpc_window=128, bpc_stride=64),
                    str(tmp_path / "r"))


def test_a_window_too_long_for_a_local_gpt2_style_reference_is_a_config_problem(tmp_path):
    """GPT-2's config.json says n_positions (and n_ctx), not max_position_embeddings: the check must read it too,
    before any reference scores the sample, and agree with the check on the loaded model."""
    import transformers
    sample = write_docs(tmp_path / "sample.jsonl", 6)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_positions=128, n_embd=16, n_layer=1, n_head=2, vocab_size=260).save_pretrained(gpt2)
    assert "max_position_embeddings" not in json.loads((gpt2 / "config.json").read_text())
    refs = [{"name": "a", "kind": "hf", "path": "hub-org/a", "score": 1},
            {"name": "g", "kind": "hf", "path": str(gpt2), "score": 2}]
    with pytest.raises(ValueError, match=r"recipe.bpc_window=256 exceeds g's n_positions=128"):
        P.PreSelect(own_data_cfg(sample, sample, references=refs, bpc_window=256, bpc_stride=64),
                    str(tmp_path / "r"))
    P.PreSelect(own_data_cfg(sample, sample, references=refs, bpc_window=128, bpc_stride=64), str(tmp_path / "r2"))
    for config in ({"max_sequence_length": 100}, {"n_ctx": 100}, {"max_position_embeddings": 100, "n_ctx": 999}):
        (gpt2 / "config.json").write_text(json.dumps(config))
        key = next(iter(config))
        with pytest.raises(ValueError, match=rf"bpc_window=128 exceeds g's {key}=100"):
            P.PreSelect(own_data_cfg(sample, sample, references=refs, bpc_window=128, bpc_stride=64),
                        str(tmp_path / "r3"))
    # the loaded model's check reads the same keys
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=128, n_embd=16, n_layer=1, n_head=2,
                                                                 vocab_size=260))
    assert P.position_limit(model.config.to_dict()) == ("n_positions", 128)


def test_a_text_field_typo_stops_in_the_sample_stage_and_can_be_fixed_in_place(tmp_path):
    from runx.trainers.recipe import RecipeConfigError
    sample = write_docs(tmp_path / "sample.jsonl", 6)
    run = str(tmp_path / "run")
    with pytest.raises(RecipeConfigError, match=r"recipe.text_field='txt' is not in .*sample.jsonl: line 1: "
                                                r"missing field 'txt' \(fields: \['id', 'text'\]\)"):
        P.PreSelect(own_data_cfg(sample, sample, text_field="txt"), run).run(only=["sample"])
    P.PreSelect(own_data_cfg(sample, sample), run).run(only=["sample"])        # the fixed command, same run_dir
    assert json.load(open(os.path.join(run, "sample", "00000.done.json")))["docs"] == 6
    # the min_positives message speaks of the chosen positives mode
    job = P.PreSelect(own_data_cfg(sample, sample, positives="quantile", positive_quantile=0.05), run)
    msg = job._too_few_positives(1, 20)
    assert "positive_quantile=0.05" in msg and "use recipe.positives=quantile" not in msg
    assert "S = 1" in P.PreSelect(own_data_cfg(sample, sample), run)._too_few_positives(1, 20)
    # 6 sample documents cannot give min_positives=10: said before every reference scores them (it was a
    # RuntimeError traceback after the scoring)
    with pytest.raises(RecipeConfigError, match=r"recipe.min_positives=10: recipe.sample holds 6 documents, so "
                                                r"the labels would have 6 positives \(at most all of them\); found "
                                                r"before the references score them"):
        P.PreSelect(own_data_cfg(sample, sample), run).run(only=["bpc"])
    assert not os.listdir(os.path.join(run, "bpc")) if os.path.isdir(os.path.join(run, "bpc")) else True

# ------------------------------------------------------------------------------------------ end to end
def test_cli_smoke_end_to_end(tmp_path):
    run_dir = str(tmp_path / "run")
    env = child_env()
    p = subprocess.run([sys.executable, "-m", "runx.cli.main", "train", "recipe=preselect", "debug=smoke",
                        f"run_dir={run_dir}"], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    for stage in ("world", "references", "sample", "bpc", "score", "label", "train", "filter_score",
                  "filter_threshold", "filter", "students"):
        assert json.load(open(os.path.join(run_dir, stage, "manifest.json")))["complete"], stage
    manifest = json.load(open(os.path.join(run_dir, "output", "manifest.json")))
    assert os.path.getsize(os.path.join(run_dir, "output", "score_histogram.png")) > 1000
    assert abs(summary["kept_char_fraction"] - 0.1) * manifest["total_chars"] <= max(
        len(d["text"]) for d in output_docs(os.path.join(run_dir, "output")))
    # the students exist and PreSelect's selection is mostly the benchmark-aligned domain
    students = json.load(open(os.path.join(run_dir, "students", "all.done.json")))["students"]
    assert students["preselect"]["mix"]["facts"] > 0.5
    assert summary["acc_preselect"] > summary["acc_random_x1"]


def test_recipe_yaml_lists_every_schema_key_and_the_default_family():
    import dataclasses
    from importlib import resources
    from runx.conf.schema.preselect import PreSelectConfig, PreSelectWorldConfig, default_references
    yaml = OmegaConf.to_container(OmegaConf.create(
        resources.files("runx.conf").joinpath("recipe", "preselect.yaml").read_text()))["recipe"]
    assert set(yaml) == {f.name for f in dataclasses.fields(PreSelectConfig)}   # every key overridable from the CLI
    assert set(yaml["world"]) == {f.name for f in dataclasses.fields(PreSelectWorldConfig)}
    assert yaml["references"] == default_references()
    assert (yaml["ft_word_ngrams"], yaml["ft_epoch"], yaml["ft_lr"]) == (2, 3, 0.1)


def test_a_slurm_array_splits_a_data_job_but_a_submitit_sweep_job_is_whole(monkeypatch):
    """sbatch --array runs one command n times: task i takes its share of the shards. Hydra's submitit launcher
    submits a sweep as an array too, but there each array task is a whole job of the sweep."""
    from runx.trainers.datajob import slurm_array_task
    monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert slurm_array_task() == (3, 8)
    monkeypatch.setenv("SUBMITIT_FOLDER", "/shared/.submitit/123")
    assert slurm_array_task() == (0, 1)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    monkeypatch.delenv("SUBMITIT_FOLDER")
    assert slurm_array_task() == (0, 1)


def test_parquet_output_of_jsonl_keeps_every_field_and_mixed_types(tmp_path):
    """JSONL kept as Parquet took its columns from the first record only (a field the first record lacked was
    dropped from every document), and a field mixing 1 and "x4" ended the last stage in an ArrowInvalid."""
    import pyarrow as pa

    from runx.recipes.preselect import _jsonl_kept_batches
    records = [{"id": 0, "text": "a"}, {"id": 1, "text": "b", "source": "web", "meta": 1},
               {"id": 2, "text": "c", "meta": "x4"}]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    schema, batches = _jsonl_kept_batches(str(tmp_path / "pool.jsonl"), None, {1, 2, 3})
    table = pa.Table.from_batches(list(batches), schema)
    assert table.column_names == ["id", "text", "source", "meta"]
    assert table.column("source").to_pylist() == [None, "web", None]
    assert table.column("meta").to_pylist() == [None, "1", "x4"] and table.column("id").to_pylist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------ scale: AUC, filter write
def _rows_table(records: list[dict], where: str):
    """JSON records as an Arrow table built at once (the filter's JSONL -> Parquet path as first written)."""
    import pyarrow as pa

    from runx.recipes.preselect import _rows_column
    columns = {key: _rows_column(key, [r.get(key) for r in records], where)
               for key in dict.fromkeys(k for r in records for k in r)}
    return pa.table(columns) if columns else pa.table({})


def pairwise_auc(p: np.ndarray, y: np.ndarray):
    """The held-out AUC as it was first written: every positive against every negative, ties half."""
    pos, neg = p[y], p[~y]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / max(len(pos) * len(neg), 1)) if len(pos) and len(neg) else None


def test_heldout_auc_equals_the_pairwise_formula_and_scales_to_200k(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for n, decimals in ((2000, 2), (2000, 4), (1999, 1), (37, 1)):
        p, y = np.round(rng.random(n), decimals), rng.random(n) < 0.3    # rounding: many ties
        assert P._roc_auc(p, y) == pairwise_auc(p, y)                    # the same float, not just close
    assert P._roc_auc(np.full(10, 0.5), np.arange(10) < 4) == 0.5
    assert P._roc_auc(np.linspace(0, 1, 6), np.arange(6) >= 3) == 1.0
    assert P._roc_auc(np.ones(3), np.ones(3, bool)) is None
    # through _heldout_metrics, on a held-out file
    p, y = np.round(rng.random(2000), 2), rng.random(2000) < 0.5
    held = tmp_path / "heldout.txt"
    held.write_text("".join(f"{P.FT_POSITIVE if v else P.FT_NEGATIVE} doc {i}\n" for i, v in enumerate(y)))
    monkeypatch.setattr(P, "positive_probability", lambda model, texts: p)
    assert P._heldout_metrics(None, str(held))["auc"] == pairwise_auc(p, y)
    # 200k held-out documents: the pairwise formula needed 2 x 10^10 booleans (~20 GB)
    import tracemalloc
    p, y = np.round(rng.random(200_000), 3), rng.random(200_000) < 0.5
    tracemalloc.start()
    t = time.perf_counter()
    auc = P._roc_auc(p, y)
    took, peak = time.perf_counter() - t, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 0.49 < auc < 0.51 and took < 2 and peak < 50e6, (took, peak)


def old_write_kept(path, out, keep, out_fmt, out_comp, text_field):
    """The filter write as it was first written, the whole shard at once: the reference for the streamed one."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    in_fmt, in_comp = P.shard_format(path)
    if in_fmt == "jsonl" and out_fmt == "jsonl":
        kept = [line for n, line in P._numbered_lines(path, in_comp) if n in keep]
        P.write_shard_lines(out, kept, out_comp)
        return len(kept)
    rows = sorted(keep)
    if in_fmt == "parquet" and rows:
        table = pq.read_table(path).take(pa.array([r - 1 for r in rows], type=pa.int64()))
    elif in_fmt == "parquet":
        table = pq.read_schema(path).empty_table()
    else:
        table = _rows_table([json.loads(line) for n, line in P._numbered_lines(path, in_comp) if n in keep], path)
    if out_fmt == "parquet":   # the row group pq.write_table uses by default: 1024 * 1024 rows
        pq.write_table(table, out, row_group_size=getattr(P, "PARQUET_ROW_GROUP", 1024 * 1024))
    else:
        P.write_shard_lines(out, (json.dumps(r).encode() for r in table.to_pylist()), out_comp)
    return table.num_rows


def _mixed_records(n: int, seed: int = 0) -> list[dict]:
    """Records whose fields come and go and change type between read batches (ints then floats, a field that
    mixes 1 and "x4", nested objects with different keys, a field that first appears late)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = {"id": i, "text": "x" * int(rng.integers(1, 60)) + f" doc {i}\nline"}
        if i % 7 == 0:
            r["meta"] = {"a": i, "b": [1.5, 2]} if i % 2 else {"b": [], "c": "x"}
        if i % 5 == 0:
            r["score"] = i if i < n // 2 else i + 0.5
        if i > n * 3 // 4:
            r["late"] = "z"
        if i in (n // 4, n - 2):
            r["mixed"] = 1 if i == n // 4 else "x4"
        if i % 11 == 0:
            r["null"] = None
        out.append(r)
    return out


@pytest.mark.parametrize("row_group", [None, 700])
def test_streamed_filter_write_equals_the_whole_shard_write(tmp_path, monkeypatch, row_group):
    """Every input/output format pair, compressed or not, with read batches (and row groups) smaller than the
    shard, gives the same bytes as writing the whole shard at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    monkeypatch.setattr(P, "READ_BATCH", 256, raising=False)   # raising: the old code has none
    if row_group:
        monkeypatch.setattr(P, "PARQUET_ROW_GROUP", row_group, raising=False)
    n = 3000
    recs = _mixed_records(n)
    lines = "".join(json.dumps(r) + "\n" for r in recs)
    (tmp_path / "a.jsonl").write_text(lines)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(lines)
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n)], "text": [r["text"] for r in recs],
                             "n": list(range(n))}), str(tmp_path / "a.parquet"), row_group_size=500)
    rng = np.random.default_rng(1)
    keeps = [set(), {n}, set(range(2, n + 1, 3)), {int(i) for i in rng.choice(np.arange(1, n + 1), 400, replace=False)},
             set(range(1, n + 1))]
    for src in ("a.jsonl", "a.jsonl.gz", "a.parquet"):
        for out_fmt, out_comp in (("jsonl", "none"), ("jsonl", "gz"), ("jsonl", "zst"), ("parquet", "none")):
            for k, keep in enumerate(keeps):
                old, new = str(tmp_path / f"old.{out_fmt}"), str(tmp_path / f"new.{out_fmt}")
                n_old = old_write_kept(str(tmp_path / src), old, keep, out_fmt, out_comp, "text")
                n_new = P._write_kept(str(tmp_path / src), new, keep, out_fmt, out_comp, "text", "id")
                assert n_new == n_old == len(keep)
                with open(old, "rb") as a, open(new, "rb") as b:
                    assert a.read() == b.read(), (src, out_fmt, out_comp, k)
    if row_group:   # several row groups really were written (the last: everything kept)
        assert pq.ParquetFile(str(tmp_path / "new.parquet")).metadata.num_row_groups > 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_filter_write_streams_the_kept_rows(tmp_path, monkeypatch):
    """The kept rows reach the writer as a stream, never as one list, and the memory the write needs does not
    grow with the shard (Python objects measured with tracemalloc, Arrow buffers with a proxy memory pool)."""
    import tracemalloc
    import pyarrow as pa
    import pyarrow.parquet as pq
    monkeypatch.setattr(P, "READ_BATCH", 200, raising=False)
    n = 20_000
    text = [f"document {i} " + "lorem ipsum dolor sit amet " * 8 for i in range(n)]   # ~230 characters
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(text)))
    size = src.stat().st_size
    real, seen = P.write_shard_lines, []

    def spy(path, lines, compression):
        seen.append(type(lines).__name__)
        assert not isinstance(lines, (list, tuple)), "the kept lines were collected in a list"
        return real(path, lines, compression)

    monkeypatch.setattr(P, "write_shard_lines", spy)
    everything = set(range(1, n + 1))
    for out_fmt in ("jsonl", "parquet"):
        tracemalloc.start()
        assert P._write_kept(str(src), str(tmp_path / f"out.{out_fmt}"), everything, out_fmt, "none", "text",
                             "id") == n
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < size / 10, (out_fmt, peak, size)      # the whole-shard write held > size in Python
    assert seen == ["generator"]
    # Parquet in: read by batches, not as one table (the file has row groups of 1000 rows; keep 1 row in 50)
    pq.write_table(pa.table({"id": list(range(n)), "text": text}), str(tmp_path / "big.parquet"),
                   row_group_size=1000)
    table_bytes = pq.read_table(str(tmp_path / "big.parquet")).nbytes
    default = pa.default_memory_pool()
    for out_fmt in ("jsonl", "parquet"):
        pool = pa.proxy_memory_pool(default)
        pa.set_memory_pool(pool)
        try:
            tracemalloc.start()
            assert P._write_kept(str(tmp_path / "big.parquet"), str(tmp_path / f"pq.{out_fmt}"),
                                 set(range(1, n + 1, 50)), out_fmt, "none", "text", "id") == n // 50
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        finally:
            pa.set_memory_pool(default)
        assert pool.max_memory() < table_bytes / 4 and peak < table_bytes / 10, \
            (out_fmt, pool.max_memory(), peak, table_bytes)
