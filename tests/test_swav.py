"""SwAV recipe: loss, Sinkhorn codes, prototypes, multi-crop data, data-parallel equivalence, CLI smoke."""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from runx.cli.config import compose  # noqa: E402
from runx.recipes import swav as S  # noqa: E402
from runx.recipes import swav_data  # noqa: E402

# small everywhere: 2x16 px + 2x8 px crops, a 8-wide CNN, 16 prototypes
TINY = ["recipe=swav", "recipe.size_crops=[16,8]", "recipe.nmb_crops=[2,2]", "recipe.backbone_width=8",
        "recipe.hidden_mlp=32", "recipe.feat_dim=16", "recipe.nmb_prototypes=16", "recipe.generated_image_size=16",
        "recipe.generated_train_size=64", "recipe.generated_eval_size=32", "recipe.probe_train_samples=64",
        "recipe.linear_probe_steps=10", "logger.backend=none"]


def cfg(*overrides):
    return compose(TINY + list(overrides))


class FixedScores(torch.nn.Module):
    """A stand-in network whose forward returns given per-crop scores (and unit embeddings)."""

    def __init__(self, scores: list):
        super().__init__()
        self.scores = [torch.as_tensor(s, dtype=torch.float64) for s in scores]
        self.queue = None

    def forward(self, crops, freeze_prototypes=False, with_queue=False):
        s = torch.cat(self.scores)
        return torch.nn.functional.normalize(torch.ones(len(s), 2), dim=1), s, None


def batch_of(n_crops: int, b: int):
    return {"crops": [torch.zeros(b, 3, 4, 4, dtype=torch.uint8)] * n_crops, "label": torch.zeros(b, dtype=torch.long)}


# ------------------------------------------------------------------------------------------------ loss
def test_loss_equals_hand_computed_value_symmetric_example():
    # B = 2 images, K = 2 prototypes, 2 crops. Scores [[a, b], [b, a]] are symmetric, so Sinkhorn's row and
    # column sums are equal from the start and the codes are the plain softmax with eps:
    #   Q = [[s, 1-s], [1-s, s]],  s = e^{a/eps} / (e^{a/eps} + e^{b/eps}).
    a, b, c, d, eps, T = 0.3, -0.2, 0.6, 0.1, 0.05, 0.1
    s0 = math.exp(a / eps) / (math.exp(a / eps) + math.exp(b / eps))
    s1 = math.exp(c / eps) / (math.exp(c / eps) + math.exp(d / eps))
    p0 = math.exp(a / T) / (math.exp(a / T) + math.exp(b / T))   # softmax(scores / T) of crop 0, its max entry
    p1 = math.exp(c / T) / (math.exp(c / T) + math.exp(d / T))
    # crop 0's codes predicted from crop 1, and crop 1's from crop 0; each image contributes the same
    l01 = -(s0 * math.log(p1) + (1 - s0) * math.log(1 - p1))
    l10 = -(s1 * math.log(p0) + (1 - s1) * math.log(1 - p0))
    expected = (l01 + l10) / 2
    rec = S.SwAV(cfg("recipe.nmb_crops=[2]", "recipe.size_crops=[16]", "recipe.min_scale_crops=[0.4]",
                     "recipe.max_scale_crops=[1.0]", "recipe.nmb_prototypes=2"), "/tmp/unused")
    model = FixedScores([[[a, b], [b, a]], [[c, d], [d, c]]])
    loss, metrics = rec.loss(model, batch_of(2, 2), step=0)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert metrics["code_entropy"] == pytest.approx(1.0, abs=1e-6)   # equipartitioned by symmetry


def reference_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """SwAV's `distributed_sinkhorn` (one process), written out in float64."""
    q = np.exp(scores / eps).T            # K x B
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def test_loss_equals_reference_on_asymmetric_example():
    rng = np.random.default_rng(0)
    n_crops, b, k = 4, 5, 7
    scores = [np.tanh(rng.normal(size=(b, k))) for _ in range(n_crops)]
    expected = 0.0
    for a in (0, 1):                       # crops_for_assign
        q = reference_sinkhorn(scores[a], 0.05, 3)
        sub = 0.0
        for v in range(n_crops):
            if v == a:
                continue
            x = scores[v] / 0.1
            logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
            sub -= float((q * logp).sum(axis=1).mean())
        expected += sub / (n_crops - 1)
    expected /= 2
    rec = S.SwAV(cfg(f"recipe.nmb_prototypes={k}"), "/tmp/unused")
    loss, _ = rec.loss(FixedScores(scores), batch_of(n_crops, b), step=0)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_codes_have_the_required_marginals():
    torch.manual_seed(0)
    b, k = 64, 16
    cos = torch.nn.functional.normalize(torch.randn(b, 8), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(k, 8), dim=1).T
    rc = cfg().recipe
    for scores in (cos, 0.1 * cos):   # widely spread scores (|s / eps| up to 20) and early-training ones
        q = S.compute_codes(scores, rc)
        assert q.shape == (b, k)
        assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)   # each image's code is a distribution
        # SwAV's 3 iterations exactly (the reference loop in float64) ...
        assert torch.allclose(q.double(), torch.from_numpy(reference_sinkhorn(scores.double().numpy(), 0.05, 3)),
                              atol=1e-5)
    # ... give near-equipartition for early-training scores: each prototype within 1% of B/K (softmax: 35%)
    assert torch.allclose(q.sum(0), torch.full((k,), b / k), rtol=0.01)
    assert not torch.allclose(torch.softmax(0.1 * cos / 0.05, 1).sum(0), torch.full((k,), b / k), rtol=0.3)
    # and with enough iterations the prototype marginals are exact for any scores
    rc.sinkhorn_iterations = 100
    assert torch.allclose(S.compute_codes(cos, rc).sum(0), torch.full((k,), b / k), rtol=1e-4)
    # the ablation (no equipartition) does not balance the prototypes
    rc.codes = "softmax"
    assert not torch.allclose(S.compute_codes(cos, rc).sum(0), torch.full((k,), b / k), rtol=0.3)


def test_queue_fills_fifo_and_is_used_only_when_full():
    c = cfg("recipe.queue_length=8", "recipe.queue_start_epoch=0", "trainer.micro_batch_size=4")
    rec = S.SwAV(c, "/tmp/unused")
    torch.manual_seed(0)
    model = rec.build_model()
    train, _ = rec.build_data()
    assert model.queue.shape == (2, 8, 16)
    batches = [rec.collate([train[i] for i in range(j, j + 4)]) for j in (0, 4, 8)]
    used = []
    orig = S.compute_codes
    S.compute_codes = lambda s, rc: (used.append(len(s)), orig(s, rc))[1]
    try:
        for step, bt in enumerate(batches):
            rec.loss(model, bt, step)
    finally:
        S.compute_codes = orig
    # 2 assigned crops per step; steps 0-1 fill the queue (8 = 2 batches of 4), step 2 uses it: 8 + 4 rows
    assert used == [4, 4, 4, 4, 12, 12]
    assert bool(model.queue_in_use)
    with torch.no_grad():   # newest batch first: queue[i, :4] holds the last batch's assigned-crop embeddings
        z, _, _ = model(batches[2]["crops"])
    assert torch.allclose(model.queue[0, :4], z[:4], atol=1e-5)
    assert torch.allclose(model.queue[1, :4], z[4:8], atol=1e-5)


# ------------------------------------------------------------------------------------------------ prototypes
def test_prototypes_are_unit_norm_and_frozen_prototypes_get_no_gradient():
    rec = S.SwAV(cfg("recipe.freeze_prototypes_steps=2"), "/tmp/unused")
    torch.manual_seed(0)
    model = rec.build_model()
    train, _ = rec.build_data()
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    S.normalize_prototypes_(model)
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(16), atol=1e-6)
    bt = rec.collate([train[i] for i in range(8)])
    loss, _ = rec.loss(model, bt, step=1)      # frozen
    loss.backward()
    assert model.prototypes.weight.grad is None
    assert model.head[0].weight.grad is not None and model.head[0].weight.grad.abs().sum() > 0
    loss, _ = rec.loss(model, bt, step=2)      # no longer frozen
    loss.backward()
    assert model.prototypes.weight.grad.abs().sum() > 0


class RecordingSwAV(S.SwAV):
    """Records the prototypes at each step start (after renormalisation) and scales them at build time,
    so that a missing renormalisation of DeepSpeed's fp32 master copy would show."""

    def build_model(self):
        model = super().build_model()
        with torch.no_grad():
            model.prototypes.weight.mul_(3.0)
        self.seen, self.before = [], []
        return model

    def on_step_start(self, trainer, engine, step):
        self.before.append(engine.module.prototypes.weight.detach().float().clone())   # what the optimizer left
        super().on_step_start(trainer, engine, step)
        self.seen.append(engine.module.prototypes.weight.detach().float().clone())


# ZeRO-2 keeps a partitioned fp32 master copy (_hp_mapping); ZeRO-0 + bf16 an unfused fp32 copy per parameter
@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (0, "bf16")])
def test_prototypes_do_not_move_while_frozen_under_deepspeed(tmp_path, stage, precision):
    from runx.trainers.deepspeed_trainer import Trainer
    c = cfg(f"trainer.zero_stage={stage}", f"trainer.precision={precision}", "trainer.max_steps=4",
            "trainer.micro_batch_size=8", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.progress=false",
            "optim.name=sgd", "optim.lr=0.5", "optim.weight_decay=0", "recipe.freeze_prototypes_steps=2",
            "resume=never")
    rec = RecordingSwAV(c, str(tmp_path))
    trainer = Trainer(c, str(tmp_path))
    trainer.fit(rec)
    w = rec.seen
    tol = 1e-5 if precision == "fp32" else 8e-3          # bf16 rounding of a unit vector's entries
    for x in w:   # renormalised every step
        assert torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=tol)
    # ... also in DeepSpeed's fp32 master copy: the weights its (frozen) optimizer steps write back are unit
    # vectors too (the build-time scale of 3 would come back otherwise)
    for x in rec.before[1:3]:
        assert torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=tol)
    assert torch.allclose(w[0], w[1], atol=1e-6) and torch.allclose(w[1], w[2], atol=1e-6)  # steps 0, 1 frozen
    assert not torch.allclose(w[2], w[3], atol=1e-4)                                        # step 2 trains them
    after = trainer.engine.module.prototypes.weight.detach().float()
    assert not torch.allclose(after, w[3])


# ------------------------------------------------------------------------------------------------ data
def test_multicrop_batches_have_the_configured_shapes():
    rec = S.SwAV(cfg("recipe.nmb_crops=[2,3]", "recipe.size_crops=[16,8]", "recipe.min_scale_crops=[0.3,0.05]",
                     "recipe.max_scale_crops=[1.0,0.3]"), "/tmp/unused")
    train, evalset = rec.build_data()
    bt = rec.collate([train[i] for i in range(5)])
    assert [tuple(x.shape) for x in bt["crops"]] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 3
    assert all(x.dtype == torch.uint8 for x in bt["crops"]) and bt["label"].shape == (5,)
    assert not torch.equal(bt["crops"][0], bt["crops"][1])   # independent augmentations
    ev = rec.collate([evalset[i] for i in range(4)])
    assert tuple(ev["image"].shape) == (4, 3, 16, 16)
    model = rec.build_model()
    z, scores, _ = model(bt["crops"])
    assert z.shape == (25, 16) and scores.shape == (25, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(25), atol=1e-5)


def _batches(train, collate, seed, workers):
    torch.manual_seed(seed)          # what the trainer's seed_everything does before it builds the loader
    train.begin(0)                   # what SwAV.after_engine does before the trainer builds it (one pass per begin)
    dl = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate, num_workers=workers)
    return [b["crops"] for _, b in zip(range(2), dl)]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_is_deterministic_for_a_seed(workers):
    rec = S.SwAV(cfg(), "/tmp/unused")
    train, _ = rec.build_data()
    a, b, c = (_batches(train, rec.collate, s, workers) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))
    assert not all(torch.equal(x, y) for ba, bc in zip(a, c) for x, y in zip(ba, bc))


def _step_batches(train, collate, start, max_steps, workers, micro=4, accum=2, world=2, rank=1):
    """This rank's micro-batches from optimizer step `start` on, through the trainer's own sampler, as a (resumed)
    run's loader makes them."""
    from runx.trainers.deepspeed_trainer import StepBatchSampler
    train.begin(start)               # SwAV.after_engine: the step the engine resumed at
    sampler = StepBatchSampler(len(train), micro, accum, world, rank, 0, start, max_steps)
    dl = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    return [b["crops"] for b in dl]


def test_crops_are_a_function_of_seed_step_and_image_not_of_the_loader_workers():
    """The crops came from each DataLoader worker's own RNG, seeded when the iterator was made: a run resumed with
    trainer.dataloader_workers>0 drew other crops than the uninterrupted run (its workers start afresh at the
    checkpoint). Now an image's crops at a step are a function of (seed, step, image): a loader resumed at step 2
    gives the uninterrupted loader's batches, with any number of workers."""
    rec = S.SwAV(cfg("trainer.grad_accum=2"), "/tmp/unused")
    train, _ = rec.build_data()
    # 2 accumulated micro-batches of 4 per step, rank 1 of 2; steps 0..3 (64 images: 16 per step, 1 epoch)
    whole = _step_batches(train, rec.collate, 0, 4, workers=2)
    assert len(whole) == 8
    for workers in (0, 1):
        resumed = _step_batches(train, rec.collate, 2, 4, workers=workers)
        assert len(resumed) == 4
        for a, b in zip(whole[4:], resumed):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), workers
    # a pure function: the same (seed, step, image) in any order and whatever the global RNG did before ...
    torch.manual_seed(123)
    one = train.sample(5, step=3)
    torch.rand(7)
    train.sample(6, step=3)
    again = train.sample(5, step=3)
    assert one[1] == again[1] and all(torch.equal(x, y) for x, y in zip(one[0], again[0]))
    # ... and a different one at another step or for another run seed (each epoch sees new crops)
    assert not torch.equal(one[0][0], train.sample(5, step=4)[0][0])
    other, _ = S.SwAV(cfg("seed=7"), "/tmp/unused").build_data()
    assert not torch.equal(one[0][0], other.sample(5, step=3)[0][0])


def test_subsets_are_seeded_random_draws_that_cover_every_class(monkeypatch):
    """data.max_train_samples / max_eval_samples (debug=smoke: 64 / 32) and the probe set took the FIRST images;
    torchvision's ImageFolder lists them class by class, so the kNN / linear probe saw only the first classes
    (ImageNet, 4000 probe images: about 3 of 1000). Now they are seeded random draws: every class, the same draw
    for the same seed (every rank, a resumed run), another for another seed."""
    n_cls, per = 10, 50
    images = torch.zeros(n_cls * per, 3, 16, 16, dtype=torch.uint8)
    for c in range(n_cls):
        images[c * per:(c + 1) * per] = 20 * c
    labels = torch.arange(n_cls).repeat_interleave(per)        # sorted by class, as ImageFolder lists them
    folder = swav_data.TensorImages(images, labels)
    monkeypatch.setattr(swav_data, "load_sources", lambda c: (folder, folder, False))

    def drawn(*overrides):
        rec = S.SwAV(cfg("data.max_train_samples=100", "data.max_eval_samples=60", "recipe.probe_train_samples=50",
                         *overrides), "x")
        train, ev = rec.build_data()
        return [[int(labels[i]) for i in ds.indices] for ds in (train, ev, rec._probe_train)]

    train, ev, probe = drawn()
    assert (len(train), len(ev), len(probe)) == (100, 60, 50)
    for subset in (train, ev, probe):
        assert set(subset) == set(range(n_cls)), subset           # the first N: classes 0-1 (probe: 0 only)
    assert drawn() == [train, ev, probe]
    assert drawn("seed=1") != [train, ev, probe]
    # no limit: every image, in order
    assert swav_data.subset(None, 7, 0, "train") == swav_data.subset(9, 7, 0, "train") == list(range(7))


def test_generated_data_is_a_function_of_the_seed():
    a, b, c = swav_data.generate_shapes(20, 16, 0), swav_data.generate_shapes(20, 16, 0), \
        swav_data.generate_shapes(20, 16, 1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert sorted(a.labels.tolist()) == sorted([i % 10 for i in range(20)])


def test_imagefolder_and_hf_sources(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / "folder" / split / cls)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "folder" / split / cls / f"{i}.png")
    rec = S.SwAV(cfg("data.kind=imagefolder", f"data.path={tmp_path / 'folder'}", "data.eval_split=val"), "x")
    train, ev = rec.build_data()
    assert len(train) == 6 and len(ev) == 6
    assert [tuple(x.shape) for x in rec.collate([train[0], train[5]])["crops"]] == \
        [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)] * 2
    e = rec.collate([ev[0], ev[5]])
    assert tuple(e["image"].shape) == (2, 3, 16, 16) and e["label"].tolist() == [0, 1]
    # an eval split without class "a" keeps the training split's numbers (b stays 1, not 0)
    shutil.rmtree(tmp_path / "folder" / "val" / "a")
    _, ev = rec.build_data()
    assert len(ev) == 3 and {ev[i][1] for i in range(3)} == {1}
    # a class the training split lacks is an error naming the key and the class
    os.makedirs(tmp_path / "folder" / "val" / "zebra")
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "folder" / "val" / "zebra" / "0.png")
    with pytest.raises(ValueError, match="data.eval_split.*zebra"):
        rec.build_data()
    from runx.cli.config import check_paths, compose
    zebra = check_paths(compose(["recipe=swav", "data=imagefolder", f"data.path={tmp_path / 'folder'}"]))
    assert len(zebra) == 1 and "data.eval_split=val: classes the training split lacks" in zebra[0] and \
        "zebra" in zebra[0], zebra
    shutil.rmtree(tmp_path / "folder" / "val" / "zebra")
    # runx validate checks both split folders, and lists the ones there
    problems = check_paths(compose(["recipe=swav", "data.kind=imagefolder", f"data.path={tmp_path / 'folder'}"]))
    assert len(problems) == 1 and "data.eval_split=validation" in problems[0] and "train, val" in problems[0]
    assert any("data.path: empty" in p for p in check_paths(compose(["recipe=swav", "data.kind=imagefolder"])))
    # class folders without an image (or no class folder) are a config problem, not torchvision's traceback
    from runx.trainers.recipe import RecipeConfigError
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "empty" / "train" / cls)
    (tmp_path / "empty" / "train" / "a" / "notes.txt").write_text("no image")
    with pytest.raises(RecipeConfigError, match=r"data.path: .*empty/train holds no images to read \(class folders a, b are "
                                                r"empty"):
        S.SwAV(cfg("data.kind=imagefolder", f"data.path={tmp_path / 'empty'}", "data.eval_split=train"),
               "x").build_data()

    import datasets
    imgs = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(4)]
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"img": imgs, "label": [0, 1, 2, 3]}, features=feats)
                               for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "hf"))
    rec = S.SwAV(cfg("data.kind=hf", f"data.path={tmp_path / 'hf'}", "data.eval_split=test",
                     "recipe.image_field=img"), "x")
    train, ev = rec.build_data()
    assert len(train) == 4 and ev[3][1] == 3 and tuple(ev[0][0].shape) == (3, 16, 16)
    with pytest.raises(KeyError, match="recipe.image_field='image'.*columns"):
        S.SwAV(cfg("data.kind=hf", f"data.path={tmp_path / 'hf'}", "data.eval_split=test"), "x").build_data()
    with pytest.raises(RecipeConfigError, match=r"data.eval_split=validation: not a split of .*hf. Valid choices: "
                                                r"train, test\."):
        S.SwAV(cfg("data.kind=hf", f"data.path={tmp_path / 'hf'}", "recipe.image_field=img"), "x").build_data()
    # the same through datasets.load_dataset (a hub id; here its packaged imagefolder builder on the local folder):
    # a split the dataset lacks was datasets' ValueError traceback
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "hubish" / "train" / cls)
        imgs[0].save(tmp_path / "hubish" / "train" / cls / "0.png")
    with pytest.raises(RecipeConfigError, match=r"data.eval_split=validation: not a split of imagefolder\. Valid "
                                                r"choices: train\."):
        S.SwAV(cfg("data.kind=hf", "data.hf_name=imagefolder", f"++data.extra.data_dir={tmp_path / 'hubish'}",
                   "recipe.image_field=image"), "x").build_data()


def test_validate_reports_queue_length_and_triton_backend_problems(monkeypatch):
    """recipe.queue_length below the global micro-batch failed in build_model (a traceback, exit 1) and
    recipe.sinkhorn_backend=triton on a CPU at the first training step, both after `runx validate` had passed:
    now the recipe's config check reports them, naming the key, the value and the valid choices."""
    from runx.cli.main import _recipe_problems
    problems = _recipe_problems(compose(TINY + ["recipe.queue_length=100", "trainer.micro_batch_size=128"]))
    assert problems == ["recipe.queue_length=100 is smaller than the global micro-batch 128 (trainer.micro_batch_size"
                        "=128 x 1 process(es)): the queue is rounded down to a multiple of it, here none. Valid "
                        "choices: 0 (no queue), or at least 128 (best a multiple of it)"], problems
    # the processes the run will have count (validate runs in one, before any is started; an in-process run of an
    # earlier test made this one a world of one)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    assert "global micro-batch 32 (trainer.micro_batch_size=8 x 4 process(es))" in _recipe_problems(compose(TINY + [
        "recipe.queue_length=24", "trainer.micro_batch_size=8", "trainer.num_procs=2", "launcher=torchrun",
        "launcher.num_nodes=2"]))[0]
    assert _recipe_problems(compose(TINY + ["recipe.queue_length=16", "trainer.micro_batch_size=8",
                                            "trainer.num_procs=2"])) == []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    problems = _recipe_problems(compose(TINY + ["recipe.sinkhorn_backend=triton", "trainer.device=cpu"]))
    assert len(problems) == 1 and problems[0].startswith("recipe.sinkhorn_backend=triton runs a Triton kernel on "
                                                         "CUDA tensors") and "Valid choices: auto, torch" in \
        problems[0], problems
    if not torch.cuda.is_available():
        assert "no CUDA device here" in _recipe_problems(compose(TINY + ["recipe.sinkhorn_backend=triton"]))[0]
    # not a problem where the backend is unused, or where Triton's interpreter runs it on the CPU
    assert _recipe_problems(compose(TINY + ["recipe.sinkhorn_backend=triton", "recipe.codes=softmax",
                                            "trainer.device=cpu"])) == []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from runx.kernels._backend import triton_import_error
    if triton_import_error() is None:
        assert _recipe_problems(compose(TINY + ["recipe.sinkhorn_backend=triton", "trainer.device=cpu"])) == []


def test_bad_config_names_key_and_choices():
    with pytest.raises(ValueError, match=r"recipe.size_crops=\[16\].*one entry per crop group"):
        S.SwAV(cfg("recipe.size_crops=[16]"), "x")
    with pytest.raises(ValueError, match="crops_for_assign.*valid crop indices are 0..3"):
        S.SwAV(cfg("recipe.crops_for_assign=[0,7]"), "x")
    with pytest.raises(ValueError, match="needs a vision model.*small_cnn"):
        S.SwAV(cfg("model=minilm"), "x")
    with pytest.raises(ValueError, match="data.name='nope'.*shapes, shapes_gray, shapes_colour, digits, synthetic"):
        S.SwAV(cfg("data.name=nope"), "x").build_data()
    # the registry's list that `runx validate` checks names what load_sources draws, no more, no less
    from runx.recipes import RECIPES
    from runx.recipes.swav_data import SHAPE_PALETTES
    assert set(dict(RECIPES["swav"].data_sources)["generated"]) == {*SHAPE_PALETTES, "digits", "synthetic"}


# ------------------------------------------------------------------------------------------------ evaluation
def test_knn_linear_probe_and_collapse_monitor():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(200) % 4
    f = centers[y] + torch.randn(200, 16, generator=g)
    assert S.weighted_knn_accuracy(f[:100], y[:100], f[100:], y[100:], k=10, temperature=0.07) > 0.95
    assert S.linear_probe_accuracy(f[:100], y[:100], f[100:], y[100:], steps=50, l2=1e-4) > 0.95
    noise = torch.randn(200, 16, generator=g)
    assert S.weighted_knn_accuracy(noise[:100], y[:100], noise[100:], y[100:], k=10, temperature=0.07) < 0.5
    assert S.assignment_entropy(torch.full((10, 8), 1 / 8)) == pytest.approx(1.0)
    assert S.assignment_entropy(torch.eye(8)[[3] * 10]) == pytest.approx(0.0, abs=1e-6)


def test_evaluate_reports_knn_probe_and_collapse_metrics():
    rec = S.SwAV(cfg(), "/tmp/unused")
    torch.manual_seed(0)
    model = rec.build_model()
    _, ev = rec.build_data()
    dl = torch.utils.data.DataLoader(ev, batch_size=16, collate_fn=rec.collate)
    out = rec.evaluate(model, dl)
    assert set(out) == {"knn_acc", "linear_acc", "assign_entropy", "prototypes_used", "z_std", "feature_std"}
    assert 0 <= out["knn_acc"] <= 1 and 1 <= out["prototypes_used"] <= 16
    assert model.training   # restored


# ------------------------------------------------------------------------------------------------ 2 processes
# Ready-made crops (no augmentation randomness), GroupNorm and no BN in the head: images of a batch interact only
# through Sinkhorn's sums, so 2 processes x 8 images must give the loss of 1 process x 16 images.
DP = ["recipe=swav", "debug=smoke", "data.name=synthetic", "recipe.size_crops=[16,8]", "recipe.backbone_norm=group",
      "recipe.head_bn=false", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.ckpt_every=0",
      "trainer.zero_stage=2", "data.max_train_samples=64"]


REL = 2e-6   # float32 summation-order noise between 1 and 2 processes is ~1e-7


def test_two_processes_give_the_loss_of_one_and_resume_their_queue_exactly(tmp_path):
    """2 processes x 8 images give the loss of 1 process x 16, with the queue in use too (2 x 8 rows per process
    fill it in steps 1-2, it is used from step 3 on). The queue was a per-process buffer, but DeepSpeed saves rank
    0's module state and every rank loads it: a resumed rank 1 continued with rank 0's queue (losses off by 1e-3).
    Every rank now keeps every rank's part (all-gathered each step), so the checkpoint carries them all: resumed
    from step 2's checkpoint, the run gives the uninterrupted run's steps 3-4 exactly."""
    from conftest import losses, run_cli
    from runx.trainers.deepspeed_trainer import Trainer
    queue = ["trainer.max_steps=4", "recipe.queue_length=32", "recipe.queue_start_epoch=0", "trainer.progress=false"]
    one_dir = str(tmp_path / "one")   # the 1-process reference runs in this process (DeepSpeed, world of one)
    c = compose(DP + queue + ["trainer.micro_batch_size=16", f"run_dir={one_dir}"])
    os.makedirs(one_dir)
    Trainer(c, one_dir).fit(S.SwAV(c, one_dir))
    args = ["train", *DP, *queue, "trainer.micro_batch_size=8", "trainer.num_procs=2", "trainer.ckpt_every=2"]
    run_cli([*args, f"run_dir={tmp_path / 'two'}"], timeout=300)
    one, two = losses(one_dir), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):   # step 2 on also checks the ZeRO-2 update (and the prototype renormalisation in it)
        assert two[step] == pytest.approx(one[step], rel=REL), (one, two)
    run_cli([*args, f"run_dir={tmp_path / 'resumed'}", f"resume={tmp_path / 'two' / 'ckpt' / 'step_2'}"],
            timeout=300)
    resumed = losses(tmp_path / "resumed")
    assert resumed == {3: two[3], 4: two[4]}, (two, resumed)


def test_two_process_comparison_is_sensitive_to_the_cross_process_sums():
    """What the 2 processes would compute without all-reducing Sinkhorn's sums is far outside REL."""
    from runx.trainers import runtime
    c = compose(DP)
    rec = S.SwAV(c, "x")
    runtime.seed_everything(int(c.seed))
    model = rec.build_model()
    train, _ = rec.build_data()
    items = [train[i] for i in range(16)]
    full = float(rec.loss(model, rec.collate(items), 0)[0].detach())
    halves = [float(rec.loss(model, rec.collate(items[r * 8:(r + 1) * 8]), 0)[0].detach()) for r in (0, 1)]
    assert abs(sum(halves) / 2 - full) > 50 * REL * abs(full)


# ------------------------------------------------------------------------------------------------ end to end
def test_cli_smoke_trains_end_to_end(tmp_path):
    """With trainer.precision=amp_bf16, as the ImageNet preset trains: its evaluation (kNN votes summed in fp32)
    crashed when the trainer ran it under autocast."""
    from conftest import read_metrics, run_cli
    run_dir = tmp_path / "run"
    run_cli(["train", "recipe=swav", "debug=smoke", "trainer.precision=amp_bf16", f"run_dir={run_dir}"],
            timeout=300)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert {"eval/knn_acc", "eval/linear_acc", "eval/assign_entropy", "eval/z_std"} <= set(rows[-1])
    from runx.recipes import RECIPES     # what trainer.monitor may name covers what the evaluation reports
    assert {k[5:] for k in rows[-1] if k.startswith("eval/")} == set(RECIPES["swav"].eval_metrics)
    assert all(k in rows[0] for k in ("assign_entropy", "code_entropy", "z_std", "samples_per_s"))


def test_run_with_dataloader_workers_resumes_exactly(tmp_path):
    """With trainer.dataloader_workers>0 the crops came from the workers' own RNG, which a resumed run seeds
    afresh: resumed from step 2's checkpoint, its steps 3-4 trained on other crops than the uninterrupted run's.
    The crops are now a function of (seed, step, image): the losses are the same exactly."""
    from conftest import losses
    from runx.trainers.deepspeed_trainer import Trainer
    args = ["debug=smoke", "trainer.max_steps=4", "trainer.eval_every=0", "trainer.ckpt_every=2",
            "trainer.dataloader_workers=1", "trainer.progress=false"]
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    for run_dir, resume in ((whole, "never"), (resumed, os.path.join(whole, "ckpt", "step_2"))):
        c = cfg(*args, f"run_dir={run_dir}", f"resume={resume}")
        os.makedirs(run_dir)
        trainer = Trainer(c, run_dir)
        try:
            trainer.fit(S.SwAV(c, run_dir))
        finally:
            trainer.close()
    assert sorted(losses(whole)) == [1, 2, 3, 4]
    assert losses(resumed) == {3: losses(whole)[3], 4: losses(whole)[4]}, (losses(whole), losses(resumed))


def test_recipe_yaml_lists_every_schema_key():
    import dataclasses

    import yaml
    from runx.conf.schema.swav import SwAVConfig
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "conf", "recipe", "swav.yaml")) as f:
        section = yaml.safe_load(f)["recipe"]
    assert set(section) == {f.name for f in dataclasses.fields(SwAVConfig)}


def test_export_then_model_path_restores_the_backbone(tmp_path):
    rec = S.SwAV(cfg(), "x")
    torch.manual_seed(0)
    model = rec.build_model()
    rec.export(model, {k: v.detach().clone() for k, v in model.state_dict().items()}, str(tmp_path))
    torch.manual_seed(1)
    again = S.SwAV(cfg(f"model.path={tmp_path / 'backbone.safetensors'}"), "x").build_model()
    for (n, a), b in zip(model.backbone.state_dict().items(), again.backbone.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(FileNotFoundError, match="model.path='/nope'"):
        S.SwAV(cfg("model.path=/nope"), "x").build_model()


def test_digits_source():
    rec = S.SwAV(cfg("data=digits"), "x")
    train, ev = rec.build_data()
    assert len(train) + len(ev) == 1797 and len(ev) == round(0.2 * 1797)
    assert tuple(ev[0][0].shape) == (3, 16, 16)


def test_plan_traces_the_multi_crop_forward_and_matches_the_measured_peak(tmp_path):
    """`runx plan` sizes SwAV's activations from the recipe's own multi-crop forward on meta tensors (it had
    counted none for vision models): the plan's CPU total is within 15% of the peak RSS a short run measures."""
    import json

    from conftest import run_cli
    from runx.trainers.plan import make_plan
    overrides = ["recipe=swav", "model=resnet18", "trainer.micro_batch_size=256", "trainer.max_steps=3",
                 "trainer.eval_every=0", "trainer.ckpt_every=0", "logger=none", "trainer.progress=false"]
    run_cli(["train", *overrides, f"run_dir={tmp_path / 'run'}"], timeout=600)
    measured = json.loads((tmp_path / "run" / "summary.json").read_text())["peak_mem_gb"] * 2**30
    plan = make_plan(compose(overrides))
    assert "256 images x (2x32px + 4x16px)" in plan.facts.activation_how
    assert plan.facts.activation_bytes > 200 * 2**20
    predicted = plan.current.total("cpu")
    assert abs(predicted / measured - 1) <= 0.15, (predicted / 2**30, measured / 2**30)


def test_max_eval_samples_0_means_no_evaluation():
    """data.max_eval_samples=0 (in range) made an empty evaluation set, and SwAV's first evaluation then died in
    torch.cat after the training it had done; 0 now means no evaluation set, as for every recipe."""
    train, evalset = S.SwAV(cfg("data.max_eval_samples=0"), "x").build_data()
    assert len(train) > 0 and evalset is None
    assert len(S.SwAV(cfg("data.max_eval_samples=5"), "x").build_data()[1]) == 5


def test_image_folder_with_an_empty_class_and_a_corrupt_file_trains(tmp_path, caplog):
    """An empty class folder made the training split "hold no images to read" (it held many; validate had passed),
    and one undecodable file ended the run at whichever step first drew it. The empty class keeps its number,
    with a warning; a corrupt file is skipped for the next image, with a warning naming it."""
    from PIL import Image
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (40 * i, 90, 10)).save(tmp_path / "train" / cls / f"{i}.png")
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"not a png")
    with caplog.at_level("WARNING", logger="runx"):
        folder = swav_data.FolderImages(str(tmp_path / "train"))
        assert folder.classes == ["cat", "dog", "empty"] and len(folder) == 6
        images = [folder.get(i) for i in range(len(folder))]
    assert [label for _, label in images] == [0, 0, 0, 1, 1, 1]          # 1.png -> 2.png in its place
    assert all(img.mode == "RGB" for img, _ in images)
    assert "class folder(s) without images: empty" in caplog.text and "cat/1.png" in caplog.text
