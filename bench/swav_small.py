"""SwAV in miniature: does swapped prediction of Sinkhorn codes learn features without collapse, and what
does the runner cost per step?

CPU (default), on the embedded default (`runx train recipe=swav`: small CNN, generated shapes, 2x32 + 4x16
crops), for each seed, all with the same encoder, initialisation, data and step budget:
  random      the encoder at initialisation
  swav        trained by the runner (DeepSpeed trainer + the swav recipe)
  no_sinkhorn the ablation: codes = softmax(scores / eps) of the view itself (no equipartition)
  supervised  the upper bound: the same backbone + a linear classifier, cross-entropy on the held-out labels,
              large-crop augmentation, the same optimiser, schedule and steps (plain PyTorch loop)
each evaluated on frozen backbone features: weighted kNN (k=20) and a linear probe on the test split, plus the
collapse monitor (entropy of the mean assignment, prototypes used, embedding spread).
Throughput: images/s of the training step, the runner vs an equivalent plain PyTorch loop (same model, loss,
data loader, optimiser, schedule; no DeepSpeed), run in alternating rounds so both see the same machine load.

--gpu: ResNet-50, 2x224 + 6x96 crops, batch 256, bf16, on ready-made synthetic crops (model step only), the
runner vs the plain loop (torch.autocast bf16), side by side on the GPU. Finishes in about a minute.

    python bench/swav_small.py [--quick] [--seeds 3] [--throughput-only [--rounds N]] [--gpu]
Writes bench/results/swav_small.json (--gpu: bench/results/swav_small_gpu.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from runx.cli.config import compose  # noqa: E402
from runx.recipes.swav import SwAV, normalize_prototypes_  # noqa: E402
from runx.trainers import runtime  # noqa: E402
from runx.trainers.deepspeed_trainer import StepBatchSampler, Trainer  # noqa: E402
from runx.trainers.optim import build_optimizer, lr_lambda  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = ["recipe=swav", "logger.backend=none", "trainer.progress=false", "trainer.ckpt_every=0", "resume=never"]


def make_cfg(overrides):
    return compose(COMMON + list(overrides))


# --------------------------------------------------------------------------------------- accuracy arms
def eval_random(overrides, seed):
    cfg = make_cfg(overrides + [f"seed={seed}"])
    rec = SwAV(cfg, "unused")
    runtime.seed_everything(seed)                 # the trainer's initialisation of the same seed
    model = rec.build_model()
    _, ev = rec.build_data()
    return rec.evaluate(model, torch.utils.data.DataLoader(ev, batch_size=512, collate_fn=rec.collate))


def train_runner(overrides, seed, tmp):
    run_dir = tempfile.mkdtemp(dir=tmp)
    cfg = make_cfg(overrides + [f"seed={seed}", f"run_dir={run_dir}"])
    t0 = time.perf_counter()
    final = Trainer(cfg, run_dir).fit(SwAV(cfg, run_dir))
    out = {k.removeprefix("eval/"): v for k, v in final.items() if k.startswith("eval/")}
    out.update(final_loss=final.get("final_loss"), wall_s=time.perf_counter() - t0,
               samples_per_s=final.get("samples_per_s"))
    return out


def train_supervised(overrides, seed):
    """Upper bound: cross-entropy on the labels, backbone + linear head, large-crop augmentation."""
    cfg = make_cfg(overrides + [f"seed={seed}"])
    rec = SwAV(cfg, "unused")
    runtime.seed_everything(seed)
    model = rec.build_model()
    train, ev = rec.build_data()
    n_cls = int(max(int(train.source.labels.max()), 1)) + 1
    clf = torch.nn.Linear(model.backbone.out_dim, n_cls)
    params = list(model.backbone.parameters()) + list(clf.parameters())
    opt = build_optimizer(cfg.optim, [{"params": params, "weight_decay": float(cfg.optim.weight_decay)}])
    steps = int(cfg.trainer.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, steps))
    loader = torch.utils.data.DataLoader(train, batch_sampler=StepBatchSampler(
        len(train), int(cfg.trainer.micro_batch_size), 1, 1, 0, seed, 0, steps), collate_fn=rec.collate)
    model.train()
    for batch in loader:
        logits = clf(model.features(batch["crops"][0]))
        loss = F.cross_entropy(logits, batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return rec.evaluate(model, torch.utils.data.DataLoader(ev, batch_size=512, collate_fn=rec.collate))


# --------------------------------------------------------------------------------------- throughput
def plain_loop_step_times(cfg, steps: int, device: str, amp_bf16: bool) -> list[float]:
    """The same training step without the runner: torch optimiser + LR schedule, model, SwAV loss."""
    rec = SwAV(cfg, "unused")
    runtime.seed_everything(int(cfg.seed))
    model = rec.build_model().to(device)
    train, _ = rec.build_data()
    opt = build_optimizer(cfg.optim, rec.param_groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, steps))
    t = cfg.trainer
    loader = torch.utils.data.DataLoader(
        train, batch_sampler=StepBatchSampler(len(train), int(t.micro_batch_size), 1, 1, 0, int(cfg.seed), 0, steps),
        collate_fn=rec.collate, num_workers=int(t.dataloader_workers), pin_memory=device == "cuda")
    times = []
    t0 = time.perf_counter()
    for step, batch in enumerate(loader):
        normalize_prototypes_(model)
        batch = {"crops": [c.to(device, non_blocking=True) for c in batch["crops"]], "label": batch["label"]}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp_bf16):
            loss, _ = rec.loss(model, batch, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        float(loss.detach())   # the runner reads the loss every step too
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - t0)
        t0 = now
    return times


def runner_step_times(cfg, run_dir) -> list[float]:
    Trainer(cfg, run_dir).fit(SwAV(cfg, run_dir))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step_time_s"] for line in f if line.strip()]


def throughput(overrides, rounds: int, steps: int, tmp: str, device: str, amp_bf16: bool) -> dict:
    """Alternating rounds runner / plain loop (the order flips every round, so that a drift in machine load
    hits both alike); the first 2 steps of each run (warm-up) are dropped."""
    runner, plain = [], []
    for r in range(rounds):
        run_dir = tempfile.mkdtemp(dir=tmp)
        cfg = make_cfg(overrides + [f"trainer.max_steps={steps}", "trainer.eval_every=0", f"run_dir={run_dir}"])
        for which in (("runner", "plain") if r % 2 == 0 else ("plain", "runner")):
            if which == "runner":
                runner += runner_step_times(cfg, run_dir)[2:]
            else:
                plain += plain_loop_step_times(cfg, steps, device, amp_bf16)[2:]
            if device == "cuda":
                import gc
                gc.collect()
                torch.cuda.empty_cache()
    batch = int(cfg.trainer.micro_batch_size)
    r_med, p_med = statistics.median(runner), statistics.median(plain)
    return {"runner_images_per_s": batch / r_med, "plain_images_per_s": batch / p_med,
            "runner_over_plain_step_time": r_med / p_med, "overhead_pct": 100 * (r_med / p_med - 1),
            "steps_measured_each": len(runner), "batch": batch}


# --------------------------------------------------------------------------------------- report
def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def cpu_bench(args) -> dict:
    steps = args.steps or (60 if args.quick else 150)
    over = [f"trainer.max_steps={steps}"]
    if args.quick:
        over += ["recipe.generated_train_size=2000", "recipe.generated_eval_size=500", "recipe.probe_train_samples=2000",
                 "recipe.freeze_prototypes_steps=15"]
    cfg0 = make_cfg(over)
    steps = int(cfg0.trainer.max_steps)
    over += [f"trainer.eval_every={steps}"]
    seeds = list(range(args.seeds))
    arms = {"random": [], "swav": [], "no_sinkhorn": [], "supervised": []}
    tmp = tempfile.mkdtemp(prefix="swav_bench_")
    t_all = time.perf_counter()
    for seed in seeds:
        arms["random"].append(eval_random(over, seed))
        arms["swav"].append(train_runner(over, seed, tmp))
        arms["no_sinkhorn"].append(train_runner(over + ["recipe.codes=softmax"], seed, tmp))
        arms["supervised"].append(train_supervised(over, seed))
        for name, res in arms.items():
            r = res[-1]
            print(f"seed {seed} {name:12s} knn {r['knn_acc']:.3f} linear {r['linear_acc']:.3f} "
                  f"assign_entropy {r['assign_entropy']:.3f} prototypes_used {r['prototypes_used']:.0f} "
                  f"z_std {r['z_std']:.3f}", flush=True)
    summary = {}
    for name, res in arms.items():
        summary[name] = {k: mean_sd([r.get(k) for r in res])
                         for k in ("knn_acc", "linear_acc", "assign_entropy", "prototypes_used", "z_std")}
    thr = throughput(over, rounds=args.rounds or (2 if args.quick else 3), steps=10 if args.quick else 20, tmp=tmp,
                     device="cpu", amp_bf16=False)
    swav_knn, rand_knn = summary["swav"]["knn_acc"][0], summary["random"]["knn_acc"][0]
    result = {
        "config": {"steps": steps, "seeds": seeds, "overrides": over, "quick": args.quick,
                   "batch": int(cfg0.trainer.micro_batch_size), "crops": list(cfg0.recipe.nmb_crops),
                   "sizes": list(cfg0.recipe.size_crops), "model": f"{cfg0.model.arch} width {cfg0.recipe.backbone_width}",
                   "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"},
        "per_seed": arms, "summary": summary, "throughput": thr,
        "checks": {
            "swav_minus_random_knn_points": 100 * (swav_knn - rand_knn),
            "swav_minus_random_linear_points": 100 * (summary["swav"]["linear_acc"][0] - summary["random"]["linear_acc"][0]),
            "beats_random_by_15_points": 100 * (swav_knn - rand_knn) >= 15,
            "swav_no_collapse": summary["swav"]["assign_entropy"][0] > 0.8 and summary["swav"]["z_std"][0] > 0.3,
            "no_sinkhorn_collapses_or_worse": summary["no_sinkhorn"]["knn_acc"][0] < swav_knn
            or summary["no_sinkhorn"]["assign_entropy"][0] < 0.5,
            "runner_overhead_le_5pct": thr["overhead_pct"] <= 5.0,
        },
        "wall_s": time.perf_counter() - t_all,
    }
    print("\n arm           kNN acc          linear acc       assign entropy   prototypes used  z_std")
    for name, s in summary.items():
        print(f" {name:12s}  " + "  ".join(f"{s[k][0]:.3f} ± {s[k][1]:.3f}  " for k in
                                          ("knn_acc", "linear_acc", "assign_entropy", "prototypes_used", "z_std")))
    print(f"\n throughput (batch {thr['batch']}): runner {thr['runner_images_per_s']:.1f} img/s, plain loop "
          f"{thr['plain_images_per_s']:.1f} img/s, runner/plain step time {thr['runner_over_plain_step_time']:.3f} "
          f"(overhead {thr['overhead_pct']:+.1f}%)")
    print(" checks:", json.dumps(result["checks"]))
    return result


def cpu_throughput(args) -> dict:
    thr = throughput([], rounds=args.rounds or 3, steps=args.steps or 20, tmp=tempfile.mkdtemp(prefix="swav_thr_"),
                     device="cpu", amp_bf16=False)
    print(f"throughput (batch {thr['batch']}): runner {thr['runner_images_per_s']:.1f} img/s, plain loop "
          f"{thr['plain_images_per_s']:.1f} img/s, runner/plain step time {thr['runner_over_plain_step_time']:.3f} "
          f"(overhead {thr['overhead_pct']:+.1f}%)")
    return {"config": {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "rounds": args.rounds or 3},
            "throughput": thr}


def gpu_bench(args) -> dict:
    if not torch.cuda.is_available() and not args.gpu_on_cpu:
        sys.exit("--gpu needs a CUDA device")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        # the trainer all-reduces CPU tensors (step metrics): give the process group a gloo side for them
        import torch.distributed as dist
        runtime.ensure_dist_env()
        if not dist.is_initialized():
            dist.init_process_group(backend="cpu:gloo,cuda:nccl", rank=0, world_size=1)
        torch.cuda.set_device(0)
    batch = args.gpu_batch
    over = ["model=resnet50", "data.name=synthetic", f"trainer.micro_batch_size={batch}",
            f"data.max_train_samples={batch * 64}", "recipe.generated_eval_size=64",
            "recipe.nmb_crops=[2,6]", f"recipe.size_crops=[{args.gpu_large},{args.gpu_small}]",
            "recipe.min_scale_crops=[0.14,0.05]", "recipe.max_scale_crops=[1,0.14]",
            "recipe.hidden_mlp=2048", "recipe.feat_dim=128", "recipe.nmb_prototypes=3000",
            "recipe.freeze_prototypes_steps=0", "optim.name=lars", "optim.lr=0.6", "optim.weight_decay=1e-6",
            f"trainer.dataloader_workers={min(8, os.cpu_count() or 1)}", f"recipe.sinkhorn_backend={args.sinkhorn_backend}"]
    if device == "cuda":  # the SwAV reference trains with apex O1 mixed precision: autocast, fp32 weights
        over.append(f"trainer.precision={args.gpu_precision}")
    tmp = tempfile.mkdtemp(prefix="swav_gpu_bench_")
    t0 = time.perf_counter()
    thr = throughput(over, rounds=1, steps=args.gpu_steps, tmp=tmp, device=device, amp_bf16=device == "cuda")
    if device == "cuda":
        thr["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    result = {"config": {"model": "resnet50", "crops": f"2x{args.gpu_large} + 6x{args.gpu_small}", "batch": batch,
                         "precision": f"runner: trainer.precision={args.gpu_precision}; plain: torch.autocast bf16, fp32 weights",
                         "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                         "steps": args.gpu_steps, "data": "synthetic uint8 crops, DataLoader workers",
                         "sinkhorn_backend": args.sinkhorn_backend},
              "throughput": thr, "wall_s": time.perf_counter() - t0}
    print(f"{result['config']['device']}: ResNet-50 {result['config']['crops']} batch {batch}: runner "
          f"{thr['runner_images_per_s']:.1f} img/s, plain loop {thr['plain_images_per_s']:.1f} img/s, "
          f"runner/plain step time {thr['runner_over_plain_step_time']:.3f} (overhead {thr['overhead_pct']:+.1f}%), "
          f"wall {result['wall_s']:.0f} s")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 80 steps, 2000 images: a few minutes")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 3; --quick: 1)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's max_steps)")
    ap.add_argument("--throughput-only", action="store_true", help="only the runner vs plain-loop images/s (CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 3; --quick: 2)")
    ap.add_argument("--gpu", action="store_true", help="ResNet-50 multi-crop throughput on a GPU")
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--gpu-large", type=int, default=224)
    ap.add_argument("--gpu-small", type=int, default=96)
    ap.add_argument("--gpu-steps", type=int, default=15)
    ap.add_argument("--gpu-precision", default="amp_bf16", choices=["amp_bf16", "bf16"],
                    help="runner precision on the GPU: amp_bf16 matches the plain loop (autocast, fp32 weights)")
    ap.add_argument("--sinkhorn-backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--gpu-on-cpu", action="store_true", help=argparse.SUPPRESS)   # exercise --gpu code on CPU
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.gpu:
        result, name = gpu_bench(args), "swav_small_gpu.json"
    elif args.throughput_only:
        result, name = cpu_throughput(args), "swav_small_throughput.json"
    else:
        result, name = cpu_bench(args), "swav_small.json"
    out = args.out or os.path.join(HERE, "results", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("wrote", out)


if __name__ == "__main__":
    main()
