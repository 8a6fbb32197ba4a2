"""LoRA-GA (recipes/lora_ga.py): the init's invariants, its first step, multi-process equality, exports.

Acceptance (issue #4):
  - output at init == base model's (<= 1e-5, fp32): test_init_output_equals_base[minilm|tiny_llama]
  - one SGD step ~ best rank-2r approximation of the full-FT step (cos >= 0.99): test_first_sgd_step_*
  - same init on 1 process and 2 ZeRO-3 processes, and with zero3_cpu_offload: test_same_init_*
  - exported merged weights == trained engine's logits: test_export_reproduces_engine_logits
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import OFFLINE_ENV, losses, run_cli

from runx.cli.config import compose
from runx.recipes.lora_ga import (LoRAGA, estimate_full_gradients, gradient_svd, lora_ga_factors,
                                  lora_ga_targets, read_lora_ga_init)

TINY_LLAMA = ["model=tiny_llama", "data=tiny_text"]


def make_recipe(tmp_path, overrides):
    cfg = compose(["recipe=lora_ga", "debug=smoke", "logger=none", *overrides])
    return LoRAGA(cfg, str(tmp_path))


class EstimationTrainer:
    """The part of runx's Trainer that LoRA-GA's prepare uses, for a world of one: fast unit tests."""
    device, rank, world_size, ds_config = "cpu", 0, 1, {}

    def __init__(self, batches):
        self.batches = batches

    def train_loader_for_estimation(self, n_batches, batch_size=None, by_length=False):
        return self.batches          # the caller passes exactly the micro-batches of n_batches steps

    def to_device(self, batch):
        return batch


def fixed_batches(recipe, n, bs):
    train, _ = recipe.build_data()
    return [recipe.collate([train[i * bs + j] for j in range(bs)]) for i in range(n)]


def build_pair(recipe, seed=0):
    """(pristine base model, peft LoRA model on identical base weights)."""
    torch.manual_seed(seed)
    base = recipe.__class__.__mro__[2].build_model(recipe)      # SFT.build_model: the bare HF model
    torch.manual_seed(seed)
    peft_model = recipe.build_model()
    return base.eval(), peft_model


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


# ============================================================================ init invariance
@pytest.mark.parametrize("overrides", [["model=minilm", "data.max_length=32"], TINY_LLAMA],
                         ids=["minilm", "tiny_llama"])
def test_init_output_equals_base(tmp_path, overrides):
    recipe = make_recipe(tmp_path, overrides + ["recipe.grad_batches=2"])
    batches = fixed_batches(recipe, 3, 4)
    base, model = build_pair(recipe)
    W0 = {n: l.get_base_layer().weight.detach().clone() for n, l in lora_ga_targets(model).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    model = recipe.prepare(EstimationTrainer(batches[:2]), model)
    # the estimation pass leaves no gradient, hook, requires_grad change or mode change behind
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    # the init really moved things: B0 != 0 and the base weights are shifted by eta*B0*A0
    for name, layer in lora_ga_targets(model).items():
        assert layer.lora_B["default"].weight.abs().max() > 0
        shift = W0[name] - layer.get_base_layer().weight
        eta = layer.scaling["default"]
        expect = eta * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(shift, expect, atol=1e-6, rtol=1e-4)
        assert eta == pytest.approx(16 / 8 ** 0.5)            # paper: alpha / sqrt(r)
    diff = (logits(model, batches[2]) - logits(base, batches[2])).abs().max().item()
    assert diff <= 1e-5, diff


def test_bf16_model_gets_its_offset_computed_in_fp32(tmp_path):
    recipe = make_recipe(tmp_path, TINY_LLAMA + ["model.dtype=bf16", "recipe.grad_batches=2"])
    batches = fixed_batches(recipe, 3, 4)
    base, model = build_pair(recipe)
    W0 = {n: l.get_base_layer().weight.detach().clone() for n, l in lora_ga_targets(model).items()}
    model = recipe.prepare(EstimationTrainer(batches[:2]), model)
    for name, layer in lora_ga_targets(model).items():
        W = layer.get_base_layer().weight
        assert W.dtype == torch.bfloat16
        A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
        want = (W0[name].float() - layer.scaling["default"] * (B @ A)).to(torch.bfloat16)
        assert torch.equal(W, want), name          # one rounding, from the fp32 result
    diff = (logits(model, batches[2]) - logits(base, batches[2])).abs().max().item()
    assert diff <= 0.1, diff                       # bf16 rounding of W_init only


def test_estimation_keeps_one_gradient_alive(tmp_path):
    recipe = make_recipe(tmp_path, TINY_LLAMA)
    batches = fixed_batches(recipe, 2, 4)
    _, model = build_pair(recipe)
    targets = lora_ga_targets(model)
    weights = {n: l.get_base_layer().weight.requires_grad_(True) for n, l in targets.items()}
    alive = []

    def probe(_grad):  # runs when a target's gradient is computed, before it is accumulated
        alive.append(sum(w.grad is not None for w in weights.values()))
    probes = [w.register_hook(probe) for w in weights.values()]
    sums, n = estimate_full_gradients(model, weights, batches, lambda b: recipe.loss(model, b, 0)[0])
    for h in probes:
        h.remove()
    assert n == 2 and set(sums) == set(weights)
    assert len(alive) == 2 * len(weights) and max(alive) == 0      # each gradient consumed as it appears
    assert all(p.grad is None for p in model.parameters())
    # the sums are the real gradients: compare with plain autograd on one layer
    name = next(iter(weights))
    ref = copy.deepcopy(model)
    with ref.disable_adapter():
        w = dict(ref.named_parameters())[name + ".base_layer.weight"]
        w.requires_grad_(True)
        ref.eval()
        sum(recipe.loss(ref, b, 0)[0] for b in batches).backward()
    assert sums[name].dtype == torch.float64
    torch.testing.assert_close(sums[name].float(), w.grad, atol=1e-6, rtol=1e-4)


def test_bf16_estimation_of_an_fp32_model_moves_g_little_and_keeps_the_init_exact(tmp_path):
    """recipe.estimation_dtype=bf16: the passes run under bf16 autocast (G changes, so autocast took effect),
    G and its top-2r subspace stay close to the fp32 estimate, and the step-0 output is still the base's."""
    recipe = make_recipe(tmp_path, TINY_LLAMA + ["recipe.grad_batches=2"])
    batches = fixed_batches(recipe, 3, 4)
    base, model = build_pair(recipe)
    weights = {n: l.get_base_layer().weight for n, l in lora_ga_targets(model).items()}
    loss = lambda b: recipe.loss(model, b, 0)[0]
    g32, _ = estimate_full_gradients(model, weights, batches[:2], loss)
    g16, _ = estimate_full_gradients(model, weights, batches[:2], loss, autocast_bf16=True)
    k = 2 * int(recipe.cfg.recipe.rank)
    for name in weights:
        a, b = g32[name], g16[name]
        assert b.dtype == torch.float64 and not torch.equal(a, b), name
        rel = float((a - b).norm() / a.norm())
        assert rel < 2e-2, (name, rel)
        Ua = torch.linalg.svd(a)[0][:, :k]
        Ub = torch.linalg.svd(b)[0][:, :k]
        # mean squared cosine of the principal angles between the two top-2r column spaces
        overlap = float(torch.linalg.matrix_norm(Ua.T @ Ub) ** 2 / k)
        assert overlap > 0.99, (name, overlap)
    recipe = make_recipe(tmp_path, TINY_LLAMA + ["recipe.grad_batches=2", "recipe.estimation_dtype=bf16"])
    model = recipe.prepare(EstimationTrainer(batches[:2]), build_pair(recipe)[1])
    diff = (logits(model, batches[2]) - logits(base, batches[2])).abs().max().item()
    assert diff <= 1e-5, diff


# ============================================================================ SVD and the factors
def test_every_direction_gives_the_rank_2r_gradient_and_randomized_svd_matches_exact():
    torch.manual_seed(0)
    m, n, r = 48, 40, 3
    G = torch.randn(m, 6) @ torch.randn(6, n) + 0.05 * torch.randn(m, n)
    U, S, V = gradient_svd(G, 2 * r, "exact")
    G2r = U @ torch.diag(S) @ V.T
    c2 = m ** 0.5 / 16.0
    for direction in ("ArB2r", "A2rBr", "ArBr", "random"):
        A, B = lora_ga_factors(U, V, r, direction, "stable", 16.0, seed=1)
        assert A.shape == (r, n) and B.shape == (m, r)
        torch.testing.assert_close(B @ B.T @ G + G @ A.T @ A, c2 * G2r, atol=1e-4, rtol=1e-4)
    A, B = lora_ga_factors(U, V, r, "ArB2r", "stable", 16.0)
    torch.testing.assert_close(A, V[:, :r].T * c2 ** 0.5)       # A <- top-r right singular vectors
    torch.testing.assert_close(B, U[:, r:2 * r] * c2 ** 0.5)    # B <- left singular vectors r+1..2r
    Ur, Sr, Vr = gradient_svd(G, 2 * r, "randomized", niter=4, seed=3)
    cos_u = torch.linalg.svdvals(U.T @ Ur)                      # principal-angle cosines
    cos_v = torch.linalg.svdvals(V.T @ Vr)
    assert cos_u.min() >= 0.99 and cos_v.min() >= 0.99
    torch.testing.assert_close(Sr, S, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="recipe.rank"):
        gradient_svd(G, 2 * 30, "exact")


def test_eval_mode_estimation_keeps_gradient_checkpointing(tmp_path):
    """transformers checkpoints only in training mode; the eval-mode estimation (no dropout) of a model built
    with model.gradient_checkpointing=true still checkpoints its layers and gives the gradients of the plain
    pass; the model's modes are restored."""
    out = {}
    for ckpt in (False, True):
        recipe = make_recipe(tmp_path, TINY_LLAMA + [f"model.gradient_checkpointing={str(ckpt).lower()}"])
        batches = fixed_batches(recipe, 2, 4)
        _, model = build_pair(recipe)
        model.train()
        weights = {n: l.get_base_layer().weight for n, l in lora_ga_targets(model).items()}
        calls = []
        for m in model.modules():      # the decoder layers' checkpoint function (transformers 5)
            if hasattr(m, "_gradient_checkpointing_func"):
                def counted(*a, _f=m._gradient_checkpointing_func, **k):
                    calls.append(1)
                    return _f(*a, **k)
                m._gradient_checkpointing_func = counted
        sums, _ = estimate_full_gradients(model, weights, batches, lambda b: recipe.loss(model, b, 0)[0])
        out[ckpt] = (sums, len(calls))
        assert model.training and all(m.training for m in model.modules())
    n_layers = recipe.cfg.model.from_config.num_hidden_layers
    assert out[False][1] == 0 and out[True][1] == 2 * n_layers       # 2 batches x each layer checkpointed
    for name, g in out[False][0].items():
        torch.testing.assert_close(out[True][0][name], g, rtol=1e-6, atol=1e-9)


def test_sum_groups_keep_each_ranks_fp64_sums_under_the_budget():
    from runx.recipes.lora_ga import SUM_BYTES, assign_owners, sum_groups
    shapes = {f"l{i}": (64, 32 * (1 + i % 3)) for i in range(10)}
    numel = {n: a * b for n, (a, b) in shapes.items()}
    assert sum_groups(shapes, 1, None) == [list(shapes)]
    assert sum_groups(shapes, 2, 1) == [[n] for n in shapes]          # below one layer: one layer per pass
    for world in (1, 2, 4):
        budget = SUM_BYTES * 3 * max(numel.values())
        groups = sum_groups(shapes, world, budget)
        assert [n for g in groups for n in g] == list(shapes)           # forward order, each layer once
        for g in groups:                                                # what each rank really holds
            owners = assign_owners({n: shapes[n] for n in g}, world)
            held = [SUM_BYTES * sum(numel[n] for n in g if owners[n] == k) for k in range(world)]
            assert max(held) <= budget, (world, g, held)
        assert len(groups) < len(shapes)


def test_a_small_grad_sum_budget_gives_the_same_init_in_several_passes(tmp_path):
    """recipe.grad_sum_budget below one layer's sums: one estimation pass per layer, the same A0, B0 and shifted
    weights as a single pass (each layer's gradient does not depend on which other weights require grad)."""
    out = {}
    for budget in ("none", "1KB"):
        recipe = make_recipe(tmp_path / budget, TINY_LLAMA + ["recipe.grad_batches=2", f"recipe.grad_sum_budget={budget}"])
        batches = fixed_batches(recipe, 2, 4)
        model = recipe.prepare(EstimationTrainer(batches), build_pair(recipe)[1])
        out[budget] = ({n: t.detach().clone() for n, t in model.named_parameters()},
                       recipe.init_stats["lora_ga/estimation_passes"])
    layers = len(lora_ga_targets(model))
    assert out["none"][1] == 1 and out["1KB"][1] == layers > 1
    for name, t in out["none"][0].items():
        assert torch.equal(t, out["1KB"][0][name]), name
    # runx plan's view (grad_sum_budget=auto: half the available memory): the per-rank sums of the largest
    # group, and the number of passes when the budget splits them
    recipe = make_recipe(tmp_path / "auto", TINY_LLAMA)
    numels = [l.get_base_layer().weight.numel() for l in lora_ga_targets(model).values()]
    ((label, need),) = recipe.extra_memory(model, world=1, available={"cpu": 2**40})["cpu"].items()
    assert need == 8 * sum(numels) and "passes" not in label
    ((label, need),) = recipe.extra_memory(model, world=1, available={"cpu": 2 * 8 * 2 * max(numels)})["cpu"].items()
    assert "passes" in label and max(numels) * 8 <= need <= 8 * 2 * max(numels), (label, need)
    # grad_accumulator=auto: the sums live on the GPU in a CUDA run (bounded by half its free memory)
    on_gpu = recipe.extra_memory(model, world=1, available={"cpu": 2**40, "device": 2 * 8 * 2 * max(numels)}, cuda=True)
    assert set(on_gpu) == {"device"} and "passes" in next(iter(on_gpu["device"]))
    with pytest.raises(ValueError, match="grad_sum_budget"):
        make_recipe(tmp_path, TINY_LLAMA + ["recipe.grad_sum_budget=lots"])


def test_estimation_micro_batches_by_length_are_the_same_samples_for_any_world_size(tmp_path):
    """grad_batching=by_length regroups the first grad_batches global batches' samples by length: the same
    samples as the training order, less padding, and the same global micro-batches for 1 and 2 processes."""
    from types import SimpleNamespace

    from runx.trainers.deepspeed_trainer import Trainer
    recipe = make_recipe(tmp_path, ["data.max_length=64"])
    train, _ = recipe.build_data()

    def shares(world, accum, by_length):
        out = []
        for rank in range(world):
            fake = SimpleNamespace(_train_ds=train, recipe=recipe, cfg=recipe.cfg, world_size=world, rank=rank,
                                   device="cpu", tcfg=SimpleNamespace(micro_batch_size=8, grad_accum=accum,
                                                                      dataloader_workers=0))
            fake.loader = lambda ds, rec, start, n, f=fake: Trainer.loader(f, ds, rec, start, n)
            out.append([b["input_ids"] for b in Trainer.train_loader_for_estimation(fake, 4, by_length=by_length)])
        return out

    plain, = shares(1, 2, False)
    one, = shares(1, 2, True)
    two = shares(2, 1, True)
    assert len(one) == len(plain) == 8 and len(two[0]) == len(two[1]) == 4
    rows = lambda bs: sorted(tuple(t for t in r.tolist() if t != 0) for b in bs for r in b)
    assert rows(one) == rows(plain)                              # the same 64 samples
    assert [b.tolist() for b in one] == [b.tolist() for pair in zip(*two) for b in pair]   # j -> rank j % 2
    assert sum(b.numel() for b in one) < 0.7 * sum(b.numel() for b in plain)             # far less padding


# ============================================================================ the first step
def _first_step_cosines(recipe, batches, lr, vanilla=False):
    """cos(change of W + eta·B·A after one SGD step, -G_2r) per target layer; G and its SVD by the test."""
    base, model = build_pair(recipe)
    r = int(recipe.cfg.recipe.rank)
    loss_of = lambda m: sum(recipe.loss(m, b, 0)[0] for b in batches) / len(batches)
    # the test's own full fine-tuning gradient and exact rank-2r truncation
    names = list(lora_ga_targets(model))
    bparams = dict(base.named_parameters())
    bkeys = {n: n.replace("base_model.model.", "") + ".weight" for n in names}
    loss_of(base.eval()).backward()
    G2r = {}
    layers = lora_ga_targets(model)
    for n in names:
        G = bparams[bkeys[n]].grad.double()
        G = G.T if layers[n].fan_in_fan_out else G            # HF Conv1D (GPT-2) stores W as [in, out]
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        G2r[n] = U[:, :2 * r] @ torch.diag(S[:2 * r]) @ Vh[:2 * r]
    if not vanilla:
        model = recipe.prepare(EstimationTrainer(batches), model)
    layers = lora_ga_targets(model)
    eff0 = {n: l.scaling["default"] * (l.lora_B["default"].weight @ l.lora_A["default"].weight).double()
            for n, l in layers.items()}
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.SGD(lora_params, lr=lr)
    model.eval()
    loss_of(model).backward()
    opt.step()
    cos = {}
    for n, l in layers.items():
        d = l.scaling["default"] * (l.lora_B["default"].weight @ l.lora_A["default"].weight).double() - eff0[n]
        cos[n] = float(torch.nn.functional.cosine_similarity(d.detach().flatten(), -G2r[n].flatten(), dim=0))
    return cos


@pytest.mark.parametrize("arch", [[], ["++model.from_config.model_type=gpt2"]], ids=["llama", "gpt2_conv1d"])
def test_first_sgd_step_follows_rank_2r_full_gradient(tmp_path, arch):
    recipe = make_recipe(tmp_path, TINY_LLAMA + arch + ["recipe.rank=4", "recipe.alpha=16", "recipe.grad_batches=2"])
    batches = fixed_batches(recipe, 2, 4)
    cos = _first_step_cosines(recipe, batches, lr=1e-3)
    assert min(cos.values()) >= 0.99, cos
    # the same probe separates vanilla LoRA (B = 0: the first step only moves B, along G·A0ᵀA0 random-ish)
    vanilla = _first_step_cosines(make_recipe(tmp_path / "vanilla", TINY_LLAMA + arch + ["recipe.rank=4"]), batches,
                                  lr=1e-3, vanilla=True)
    assert sum(vanilla.values()) / len(vanilla) < 0.9, vanilla


# ============================================================================ exports
@pytest.mark.parametrize("overrides", [TINY_LLAMA, TINY_LLAMA + ["++model.from_config.tie_word_embeddings=true"],
                                       ["model=tiny_bert"]], ids=["causal_lm", "causal_lm_tied", "classifier_with_head"])
def test_export_rank2r_adapter_and_merged_weights_reproduce_logits(tmp_path, overrides):
    """Offline export pieces: after training moves A, B (and the head), the merged weights, the adapter on the
    rebuilt offset base, and the rank-2r adapter on the ORIGINAL base give the fine-tuned model's logits. With
    tied embeddings (the state dict of a ZeRO-0/1 checkpoint keeps lm_head and embed_tokens one tensor) the merged
    export stopped in safetensors' "tensors share memory" error, half written."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from runx.recipes.lora_ga import load_lora_ga_init
    recipe = make_recipe(tmp_path, overrides + ["recipe.grad_batches=2"])
    batches = fixed_batches(recipe, 3, 4)
    base, model = build_pair(recipe)
    pristine = copy.deepcopy(base)
    model = recipe.prepare(EstimationTrainer(batches[:2]), model)
    with torch.no_grad():  # stand-in for training: move every LoRA factor
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    want = logits(model, batches[2])
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}   # tied weights stay one tensor
    out = tmp_path / "export"
    recipe.export(model, sd, str(out))
    auto = AutoModelForCausalLM if recipe.task == "lm" else AutoModelForSequenceClassification
    merged = auto.from_pretrained(out / "merged")
    assert (logits(merged, batches[2]) - want).abs().max().item() <= 1e-5
    portable = PeftModel.from_pretrained(copy.deepcopy(pristine), out / "adapter_rank2r")
    assert (logits(portable, batches[2]) - want).abs().max().item() <= 1e-5
    # the rank-r adapter on the offset base rebuilt from the original base + lora_ga_init/
    from peft import get_peft_model
    offset = get_peft_model(copy.deepcopy(pristine), recipe.peft_config())
    load_lora_ga_init(offset, out / "lora_ga_init")
    rebuilt = PeftModel.from_pretrained(offset.unload(), out / "adapter_on_offset_base")
    assert (logits(rebuilt, batches[2]) - want).abs().max().item() <= 1e-5
    # that adapter names no base model: a loader cannot pair it with the original base on its own
    assert json.load(open(out / "adapter_on_offset_base" / "adapter_config.json"))["base_model_name_or_path"] is None
    assert not (out / "adapter_on_offset_base" / "README.md").exists()     # peft's card named the original base
    assert "adapter_rank2r/" in (out / "README.txt").read_text()
    tensors, meta = read_lora_ga_init(out / "lora_ga_init")
    assert meta["rank"] == 8 and len(tensors) == 2 * len(lora_ga_targets(model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_init_with_sums_on_the_device_equals_the_host_sums(tmp_path):
    """On CUDA, grad_accumulator=auto keeps the fp64 sums on the GPU (also in several passes under a small
    budget); the init equals the one made with host sums, and the output at init is the base model's."""
    class CudaTrainer(EstimationTrainer):
        device = "cuda"

        def to_device(self, batch):
            return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}

    inits = {}
    for acc, budget in (("cpu", "none"), ("auto", "none"), ("auto", "1KB")):
        recipe = make_recipe(tmp_path / f"{acc}_{budget}", TINY_LLAMA + [
            "recipe.grad_batches=2", f"recipe.grad_accumulator={acc}", f"recipe.grad_sum_budget={budget}"])
        batches = fixed_batches(recipe, 3, 4)
        base, model = build_pair(recipe)
        model = recipe.prepare(CudaTrainer(batches[:2]), model.cuda())
        inits[(acc, budget)] = read_lora_ga_init(tmp_path / f"{acc}_{budget}" / "lora_ga_init")[0]
        b = {k: v.cuda() for k, v in batches[2].items()}
        diff = (logits(model, b).cpu() - logits(base, batches[2])).abs().max().item()
        assert diff <= 1e-4, (acc, budget, diff)           # TF32-free fp32 on GPU vs CPU: round-off only
    ref = inits[("cpu", "none")]
    for key, init in inits.items():
        assert max((init[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5, key


# ============================================================================ several processes, ZeRO-3
# tiny Llama, rank 2; the 1-process reference runs the same micro-batches (micro 4 x grad_accum 2 = the two
# ranks' micro 4) with one thread per process, as torchrun's workers do: the gradient sums are fp64 (order
# independent), so any difference left would come from the distributed code, not from kernel round-off.
MP = ["recipe=lora_ga", "model=tiny_llama", "data=tiny_text", "debug=smoke", "logger=none", "recipe.rank=2",
      "recipe.grad_batches=4", "trainer.micro_batch_size=4", "trainer.max_steps=3", "trainer.ckpt_every=3",
      "trainer.eval_every=0", "trainer.progress=false"]

WORKER = textwrap.dedent('''
    import os, sys, torch
    os.environ["DS_ACCELERATOR"] = "cpu"
    from runx.cli.config import compose
    from runx.trainers.deepspeed_trainer import Trainer
    from runx.recipes.lora_ga import LoRAGA
    run_dir, partitioned, overrides = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
    cfg = compose([*overrides, f"run_dir={run_dir}"])

    class Recipe(LoRAGA):
        def build_model(self):
            model = super().build_model()
            # ZeRO-3 builds the base model under zero.Init (after a whole build of the random init to copy in);
            # peft's LoRA factors, made after it, are partitioned by the engine
            self.builds = getattr(self, "builds", []) + [all(getattr(p, "ds_status", None) is not None and
                                                             p.ds_status.name == "NOT_AVAILABLE"
                                                             for n, p in model.named_parameters() if "lora_" not in n)]
            return model

    trainer = Trainer(cfg, run_dir)
    if trainer.rank == 0:  # what `runx train` writes first; `runx export` reads it
        from runx.trainers.tracking import save_resolved_config
        save_resolved_config(cfg, os.path.join(run_dir, "config.yaml"))
    recipe = Recipe(cfg, run_dir)
    trainer.fit(recipe)
    if partitioned:  # prepare() saw every weight partitioned
        assert recipe.builds == [False, True], recipe.builds
    engine = trainer.engine
    trainer.export(engine, recipe, os.path.join(run_dir, "export_live"))
    train, _ = recipe.build_data()
    batch = recipe.collate([train[i] for i in range(6)])
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if trainer.rank == 0:
        torch.save({"batch": batch, "logits": logits}, os.path.join(run_dir, "engine_logits.pt"))
''')


def run_workers(tmp_path, name, overrides, partitioned=False, nproc=2):
    script = tmp_path / "lora_ga_worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, **OFFLINE_ENV)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    from runx.trainers.runtime import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "--log-dir", str(tmp_path / f"{name}_torchrun"),
           str(script), str(tmp_path / name),
           "1" if partitioned else "0", *MP, *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return tmp_path / name


def one_process_init(tmp_path):
    """The init of one process over the trainer's data order (StepBatchSampler, world 1, grad_accum 2)."""
    from runx.trainers.deepspeed_trainer import StepBatchSampler
    recipe = make_recipe(tmp_path / "one", MP[1:] + ["trainer.grad_accum=2"])
    train, _ = recipe.build_data()
    c = recipe.cfg
    sampler = StepBatchSampler(len(train), 4, 2, 1, 0, int(c.seed), 0, int(c.recipe.grad_batches))
    # recipe.grad_batching=by_length: the same samples, sorted by length (ties in draw order), in micro-batches of 4
    drawn = [i for idx in sampler for i in idx]
    drawn = sorted(drawn, key=lambda i: (len(train[i]["input_ids"]), drawn.index(i)))
    batches = [recipe.collate([train[i] for i in drawn[k:k + 4]]) for k in range(0, len(drawn), 4)]
    torch.manual_seed(int(c.seed))
    model = recipe.build_model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe.prepare(EstimationTrainer(batches), model)
    finally:
        torch.set_num_threads(threads)
    return read_lora_ga_init(tmp_path / "one" / "lora_ga_init")[0]


def max_init_diff(a: dict, run_dir) -> float:
    b = read_lora_ga_init(run_dir / "lora_ga_init")[0]
    assert set(a) == set(b) and len(a) == 28
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_export_matches_engine(run_dir, exports=("export_live", "export")):
    from transformers import AutoModelForCausalLM
    saved = torch.load(run_dir / "engine_logits.pt", weights_only=False)
    for export in exports:
        merged = AutoModelForCausalLM.from_pretrained(run_dir / export / "merged")
        diff = (logits(merged, saved["batch"]) - saved["logits"]).abs().max().item()
        assert diff <= 1e-5, (export, diff)


def test_same_init_one_process_and_two_zero3_processes_and_export_matches_engine(tmp_path):
    ref = one_process_init(tmp_path)
    run = run_workers(tmp_path, "zero3", ["trainer=zero3"])
    assert max_init_diff(ref, run) <= 1e-5
    # `runx export` from the ZeRO-3 checkpoint, and the live export, reproduce the trained engine's logits
    run_cli(["export", str(run)])
    assert_export_matches_engine(run)


@pytest.mark.slow
def test_same_init_with_zero3_cpu_offload_and_with_a_partitioned_model(tmp_path):
    ref = one_process_init(tmp_path)
    off = run_workers(tmp_path, "offload", ["trainer=zero3_cpu_offload"])
    assert max_init_diff(ref, off) <= 1e-5
    assert_export_matches_engine(off, exports=("export_live",))
    # ... and estimated in one pass per layer (a budget below every layer's sums): groups across ranks, each
    # pass with DeepSpeed's fetch hooks on the partitioned weights
    part = run_workers(tmp_path, "partitioned", ["trainer=zero3", "recipe.grad_sum_budget=1KB",
                                                 "trainer.stage3_param_persistence_threshold=0"], partitioned=True)
    # DeepSpeed's ZeRO-3 linear computes the weight gradient with its own kernel: round-off level only
    assert max_init_diff(ref, part) <= 1e-5
    summary = json.loads((part / "summary.json").read_text())
    assert summary["lora_ga/estimation_passes"] == 28 // 2, summary
    assert_export_matches_engine(part, exports=("export_live",))


# ============================================================================ the CLI, end to end
def test_cli_smoke_on_the_embedded_default(tmp_path):
    """`runx train recipe=lora_ga debug=smoke`: pretrained MiniLM classifier; the init is saved and logged."""
    run = tmp_path / "run"
    p = run_cli(["train", "recipe=lora_ga", "debug=smoke", f"run_dir={run}", "trainer.max_steps=2",
                 "trainer.eval_every=2", "trainer.ckpt_every=2", "trainer.progress=false", "recipe.grad_batches=2"])
    import json
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["lora_ga/grad_micro_batches"] == 2
    assert 0 < summary["lora_ga/init_s"] < summary["lora_ga/init_s"] + summary["train_wall_s"]
    assert 0.0 < summary["lora_ga/grad_energy_2r"] <= 1.0
    tensors, meta = read_lora_ga_init(run / "lora_ga_init")
    assert meta["rank"] == 8 and meta["direction"] == "ArB2r" and len(tensors) == 2 * len(meta["eta"])
    # the merged export's config names the classes; the offset-base adapter has no README of its own (the
    # export's README.txt says how to load it: not on the original base)
    p = run_cli(["export", str(run)])
    # no library noise: transformers' load report (calling the head, which the checkpoint fills, missing), peft's
    # deprecation warning
    assert "MISSING" not in p.stderr and "is_gradient_checkpointing" not in p.stderr, p.stderr[-2000:]
    from transformers import AutoConfig

    from runx.recipes.text_data import STDLIB_TOPICS
    merged = AutoConfig.from_pretrained(run / "export" / "merged")
    assert merged.id2label == dict(enumerate(STDLIB_TOPICS))
    assert merged.architectures == ["BertForSequenceClassification"]   # (the checkpoint's BertModel)
    assert not (run / "export" / "adapter_on_offset_base" / "README.txt").exists()


@pytest.mark.slow
def test_resume_skips_the_init_and_continues_exactly(tmp_path):
    args = [*MP, "trainer=zero3", "trainer.max_steps=4", "trainer.ckpt_every=2", "optim.scheduler=constant",
            "optim.warmup_ratio=0", "optim.lr=1e-3"]
    run_cli(["train", *args, f"run_dir={tmp_path / 'full'}"])
    run_cli(["train", *args, "trainer.max_steps=2", f"run_dir={tmp_path / 'part'}"])
    init = tmp_path / "part" / "lora_ga_init" / "init.safetensors"
    stamp = init.stat().st_mtime_ns
    p = run_cli(["train", *args, f"run_dir={tmp_path / 'part'}"])
    assert "LoRA-GA init:" not in p.stdout + p.stderr and init.stat().st_mtime_ns == stamp
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(part) == [1, 2, 3, 4] and all(abs(full[s] - part[s]) <= 1e-6 for s in full)


# ============================================================================ the benchmark's comparison
def test_benchmark_lora_and_lora_ga_arms_train_the_same_parameters_at_the_papers_scale(tmp_path):
    """bench/lora_ga_convergence.py: vanilla LoRA and LoRA-GA differ only in the init and eta (LoRA: alpha/r,
    LoRA-GA: alpha/sqrt(r), paper Alg. 1): same rank, alpha, dropout, target layers and trainable head, the
    same head init per seed. LoRA-GA's offset W - W_init = eta·B0·A0 has all r singular values equal to
    eta·c² = (alpha/sqrt(r))·sqrt(d_out)/gamma (stable scale, c = d_out^(1/4)/sqrt(gamma) on A0 and B0)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "lora_ga_bench", os.path.join(os.path.dirname(__file__), "..", "bench", "lora_ga_convergence.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    common = bench.common_overrides(4, 2, quick=True)

    def arm(method):
        cmd = bench.sweep_command(method, [3e-4], [0], common, str(tmp_path / method))
        over = [x for x in cmd[cmd.index(f"recipe={method}"):] if not x.startswith(("optim.lr=", "seed=",
                                                                                        "hydra."))]
        recipe = LoRAGA(compose(over), str(tmp_path / method)) if method == "lora_ga" else None
        if recipe is None:
            from runx.recipes.lora import LoRA
            recipe = LoRA(compose(over), str(tmp_path / method))
        torch.manual_seed(0)
        return recipe, recipe.build_model()

    (lora, m_lora), (ga, m_ga) = arm("lora"), arm("lora_ga")
    trainable = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}
    assert trainable(m_lora) == trainable(m_ga)
    assert any("classifier" in n for n in trainable(m_ga))                 # the new head trains in both arms
    head = lambda m: {n: p.detach() for n, p in m.named_parameters() if "classifier" in n}
    assert all(torch.equal(head(m_lora)[n], head(m_ga)[n]) for n in head(m_ga))
    c_lora, c_ga = lora.peft_config(), ga.peft_config()
    assert (c_lora.r, c_lora.lora_alpha, c_lora.lora_dropout) == (c_ga.r, c_ga.lora_alpha, c_ga.lora_dropout) \
        == (8, 16.0, 0.0)
    assert not c_lora.use_rslora and c_ga.use_rslora
    lora_layers, ga_layers = lora_ga_targets(m_lora), lora_ga_targets(m_ga)
    assert list(lora_layers) == list(ga_layers)
    assert all(l.scaling["default"] == pytest.approx(16 / 8) for l in lora_layers.values())
    # the init: offset magnitude and sign at MiniLM's shapes (d_out 384 and 1536)
    W0 = {n: l.get_base_layer().weight.detach().clone() for n, l in ga_layers.items()}
    ga.prepare(EstimationTrainer(fixed_batches(ga, 2, 8)), m_ga)
    eta, gamma = 16 / 8 ** 0.5, 16.0
    for name, layer in lora_ga_targets(m_ga).items():
        d_out = W0[name].shape[0]
        offset = W0[name] - layer.get_base_layer().weight.detach()
        sv = torch.linalg.svdvals(offset.double())
        torch.testing.assert_close(sv[:8], torch.full((8,), eta * d_out ** 0.5 / gamma, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5)
        assert sv[8] <= 1e-4 * sv[0]


def test_gradient_checkpointing_after_an_estimation_on_partitioned_weights(tmp_path):
    """The estimation on a ZeRO-3 partitioned model runs through temporary DeepSpeed hooks. DeepSpeed keeps on each
    module the backward Functions bound to the hooks that made them, and the engine reused them: a checkpointed
    layer's recompute then fetched through the dead ones ("Recomputed values ... different metadata"). With
    gradient checkpointing, ZeRO-3 (built partitioned) now trains with ZeRO-2's losses."""
    common = ["recipe=lora_ga", "model=tiny_bert", "model.gradient_checkpointing=true", "recipe.grad_batches=2", "trainer.max_steps=2",
              "data.max_train_samples=32", "trainer.micro_batch_size=8", "trainer.eval_every=0",
              "trainer.ckpt_every=0", "logger=none", "trainer.progress=false"]
    run_cli(["train", *common, "trainer=zero2", f"run_dir={tmp_path / 'z2'}"])
    run_cli(["train", *common, "trainer=zero3", f"run_dir={tmp_path / 'z3'}"])
    assert "building the model partitioned" in (tmp_path / "z3" / "train.log").read_text()
    a, b = losses(tmp_path / "z2"), losses(tmp_path / "z3")
    assert sorted(a) == sorted(b) == [1, 2] and all(abs(a[k] - b[k]) <= 1e-5 * abs(a[k]) for k in a), (a, b)


def test_a_rank_too_large_for_a_layer_is_a_config_problem_before_the_estimation(tmp_path):
    """recipe.rank with 2·rank above a target layer's smaller side passed validate and stopped in a traceback
    from the SVD, after the whole gradient estimation (hours on a 7B model), naming the first such layer only."""
    from runx.trainers.recipe import RecipeConfigError
    recipe = make_recipe(tmp_path, TINY_LLAMA)
    recipe.cfg.recipe.rank = 40
    with pytest.raises(RecipeConfigError, match=r"recipe.rank=40: LoRA-GA initialises A and B from 2·rank singular "
                                                r"vectors .* Valid values: recipe.rank <= \d+"):
        recipe.build_model()
    # and by the constructor, on the model's skeleton (meta device), so that runx validate names it too
    from runx.cli.config import compose
    from runx.cli.main import _recipe_problems
    problems = _recipe_problems(compose(["recipe=lora_ga", "recipe.rank=200"]))
    assert len(problems) == 1 and problems[0].startswith("recipe.rank=200: LoRA-GA initialises") and \
        "recipe.rank <= 192" in problems[0], problems
    problems = _recipe_problems(compose(["recipe=lora", "recipe.target_modules=[nothere]"]))
    assert len(problems) == 1 and problems[0].startswith("recipe.target_modules=['nothere']"), problems


def test_a_run_that_starts_at_step_0_estimates_its_own_init(tmp_path):
    """An init left in the run dir by an earlier run (killed before its first checkpoint, or finished without
    one) was re-applied to a new run starting at step 0, though estimated on other data or batches. It is
    reused only by a run that resumes a checkpoint."""
    import json

    from runx.recipes import lora_ga as LG
    recipe = make_recipe(tmp_path, TINY_LLAMA)
    init = tmp_path / LG.INIT_DIR
    init.mkdir()
    (init / LG.INIT_META).write_text(json.dumps(recipe._meta()))
    assert recipe._saved_init_dir() is None                     # nothing to resume
    (tmp_path / "ckpt" / "step_3").mkdir(parents=True)
    (tmp_path / "ckpt" / "step_3" / "runx_complete.json").write_text("{}")
    (tmp_path / "ckpt" / "latest").write_text("step_3")
    assert recipe._saved_init_dir() == str(init)                # a resumed run: the init its checkpoint needs


def test_a_bf16_models_merged_export_is_bf16(tmp_path):
    """The merged weights were written in fp32 whatever the model's dtype, while their config.json said bfloat16
    (a 7B model: 28 GB instead of 14 GB); the full fine-tune's export follows the model's dtype."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from runx.recipes.lora_ga import export_merged
    recipe = make_recipe(tmp_path, TINY_LLAMA + ["model.dtype=bf16", "trainer.precision=bf16",
                                                 "++model.from_config.tie_word_embeddings=true"])
    model = recipe.build_model()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    export_merged(model, sd, str(tmp_path / "merged"), torch.bfloat16)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert "lm_head.weight" not in f.keys()        # tied: written once, as save_pretrained does
    assert dtypes == {torch.bfloat16}
    assert AutoConfig.from_pretrained(tmp_path / "merged").dtype in (torch.bfloat16, "bfloat16")
