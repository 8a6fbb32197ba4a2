"""runx's training step vs a plain `deepspeed.initialize` loop: identical DeepSpeed config, model, batches, seed.

Both run in this process, alternating A/B rounds (odd rounds run raw first); each round builds a fresh engine
per side, swapping into its own fresh NVMe folder, and times N steps.
The ratio is median(raw step time) / median(runx step time): >= 0.98 means runx adds <= 2%. Both sides draw the
same micro-batches in the same order from the same initial weights, and the bench reports how far their losses differ.

    python bench/trainer_overhead.py --quick                         # CPU: tiny Llama, ZeRO-0 and ZeRO-3
    python bench/trainer_overhead.py --device cuda --trainers zero3,zero3_cpu_offload,zero3_nvme --model gpu_llama
Writes bench/results/trainer_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

GPU_LLAMA = [  # ~0.3B Llama built from a config (no download), bf16
    "model=tiny_llama", "++model.from_config.hidden_size=1024", "++model.from_config.intermediate_size=2816",
    "++model.from_config.num_hidden_layers=16", "++model.from_config.num_attention_heads=16",
    "++model.from_config.num_key_value_heads=16", "++model.from_config.vocab_size=32000",
    "++model.from_config.max_position_embeddings=1024", "model.path=builtin:bytes", "trainer.precision=bf16",
]


class Phases:
    """--phases: device-synchronised wall time inside DeepSpeedEngine.forward / backward / step, per side and
    optimizer step, so a gap between the sides shows whether it is inside DeepSpeed's calls (a different engine
    state or config) or outside them (the loop's own bookkeeping: "other" = step wall time - the three). The
    synchronisations cost both sides alike."""

    def __init__(self):
        import deepspeed
        from _raw_deepspeed import synced_call
        self.cur, self.steps = {}, []
        eng = deepspeed.runtime.engine.DeepSpeedEngine
        for name in ("forward", "backward", "step"):
            orig = getattr(eng, name)

            def timed(self_, *args, _orig=orig, _name=name, **kw):
                out, seconds = synced_call(_orig, self_, *args, **kw)
                self.cur[_name] = self.cur.get(_name, 0.0) + seconds
                if _name == "step":   # one engine.step() per micro-batch
                    self.steps.append(self.cur)
                    self.cur = {}
                return out
            setattr(eng, name, timed)

    def take(self, step_s, grad_accum):
        """This side's per-step phases (warm-up steps dropped like the step times), with "other"."""
        micro, self.steps, self.cur = self.steps, [], {}
        rows = []
        for i in range(0, len(micro), grad_accum):
            r = {}
            for m in micro[i:i + grad_accum]:
                for k, v in m.items():
                    r[k] = r.get(k, 0.0) + v
            rows.append(r)
        rows = [dict(r, other=w - sum(r.values())) for r, w in zip(rows, step_s)]
        return rows[2:]


def compose(overrides):
    import runx.conf  # noqa: F401
    from runx.cli.config import compose as c
    return c(overrides)


def runx_round(cfg, run_dir):
    from runx.recipes.sft import SFT
    from runx.trainers.deepspeed_trainer import Trainer
    tr = Trainer(cfg, run_dir)
    try:
        tr.fit(SFT(cfg, run_dir))
    finally:
        tr.close()
    from runx.trainers.tracking import read_metrics
    m = read_metrics(run_dir)
    return [r["step_time_s"] for r in m], [r["loss"] for r in m]


def raw_round(cfg, ds_config):
    """The plain DeepSpeed loop a user would write: same model, config, optimizer, batches."""
    import deepspeed
    import torch
    from runx.recipes.sft import SFT
    from runx.trainers import runtime
    from runx.trainers.optim import build_optimizer, default_param_groups, lr_lambda
    if str(cfg.trainer.offload_param).startswith("nvme"):
        # the NVMe prefetch fix runx applies (trainers/ds_patches.py); a plain loop needs it too, and the raw
        # warm-up run comes before any runx build would have applied it
        from runx.trainers import ds_patches
        ds_patches.apply()
    runtime.seed_everything(int(cfg.seed))
    recipe = SFT(cfg, tempfile.mkdtemp())
    keep = None
    if int(cfg.trainer.zero_stage) == 3:  # built partitioned (zero.Init), as DeepSpeed documents and runx does
        from transformers.integrations import HfDeepSpeedConfig
        # HF's own init under zero.Init draws other random weights than a plain build; the same weights as
        # runx's run (a plain build of this seed, copied into the partitioned model) make the losses comparable
        reference = recipe.build_model()
        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841
        runtime.seed_everything(int(cfg.seed))
        model = recipe.build_model()
        from runx.trainers.deepspeed_trainer import copy_into_partitioned
        copy_into_partitioned(model, reference, rank=0)  # (one process)
        del reference
    else:
        model = recipe.build_model()
    train, _ = recipe.build_data()
    opt = build_optimizer(cfg.optim, default_param_groups(model, float(cfg.optim.weight_decay), str(cfg.optim.name)))
    fn = lr_lambda(cfg.optim, int(cfg.trainer.max_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config,
                                           lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, fn))
    from _raw_deepspeed import raw_steps
    res = raw_steps(engine, recipe, train, cfg)
    from runx.trainers.ds_patches import release_engine
    release_engine(engine)   # engine.destroy() alone leaves a ZeRO-3 engine allocated (trainers/ds_patches.py)
    return res["step_s"], res["losses"]


def config_diff(a, b, path=""):
    """Keys whose values differ between two DeepSpeed configs, nvme_path values aside (each side has its own)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) if k != "nvme_path"
                for d in config_diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trainers", default="zero0,zero3")
    ap.add_argument("--model", default="tiny", choices=["tiny", "llama_m", "gpu_llama"])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "trainer_overhead.json"))
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                    help="an untimed 2-step raw run before the rounds (default: on CUDA)")
    ap.add_argument("--phases", action="store_true",
                    help="also time forward / backward / step inside DeepSpeed per side (adds syncs to both)")
    a = ap.parse_args()
    rounds = a.rounds or (2 if a.quick else 3)
    steps = a.steps or (12 if a.quick else 25)
    if a.warmup is None:
        a.warmup = a.device == "cuda"
    if a.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    model = {"tiny": ["model=tiny_llama"], "llama_m": ["model=llama_m"], "gpu_llama": GPU_LLAMA}[a.model]
    rows = []
    phases = Phases() if a.phases else None
    for trainer in a.trainers.split(","):
        base = ["recipe=sft", "data=tiny_text", f"trainer={trainer}", f"trainer.device={a.device}", *model,
                f"trainer.max_steps={steps}", "trainer.ckpt_every=0", "trainer.eval_every=0", "logger=none",
                "trainer.progress=false", "trainer.micro_batch_size=8", "data.max_length=128"]
        if a.device == "cuda" and a.model == "gpu_llama":
            base += ["trainer.micro_batch_size=8", "data.max_length=512"]
        from runx.trainers.deepspeed_trainer import Trainer
        aio = None
        if "nvme" in trainer:
            # one aio block for both sides: each side's fresh folder would otherwise get its own (noisy) probe,
            # i.e. possibly another block size or queue depth (before 2026-11-27 the sides could differ so)
            from runx.trainers.nvme import DEEPSPEED_AIO_DEFAULTS, resolve_aio
            probe_dir = tempfile.mkdtemp(prefix="runx_nvme_probe_")
            aio = resolve_aio(compose(base + [f"trainer.nvme_path={probe_dir}"]).trainer)
            base += [f"trainer.aio.{k}={aio[k]}" for k in DEEPSPEED_AIO_DEFAULTS]
            base += ["trainer.aio.tune=false"]
            shutil.rmtree(probe_dir, ignore_errors=True)
        A, B, worst, same_config = [], [], 0.0, True
        PA, PB = [], []

        def raw_side(raw_cfg):
            tr = Trainer(raw_cfg, raw_cfg.run_dir)  # same config builder -> identical DeepSpeed config
            from runx.recipes.sft import SFT
            m = SFT(raw_cfg, raw_cfg.run_dir).build_model()
            ds_config = tr.build_ds_config(m)
            del m
            return raw_round(raw_cfg, ds_config) + (ds_config,)

        if a.warmup:
            # the process's first engine pays once for what later ones reuse (CUDA context and kernels, the aio
            # and CPU-Adam ops, first pinned allocations); measured on an H200 it made the first side's steps of
            # round 1 up to 1.4x slower than its later ones. An untimed 2-step raw run takes that cost here
            wdir = tempfile.mkdtemp(prefix="runx_nvme_warmup_")
            raw_side(compose(base + [f"run_dir={tempfile.mkdtemp(prefix='runx_bench_warmup_')}",
                                     f"trainer.nvme_path={wdir}", "trainer.max_steps=2"]))
            shutil.rmtree(wdir, ignore_errors=True)
            if phases:
                phases.take([], 1)
        for r in range(rounds):
            # each side swaps into its own fresh folder (no swap files left by the other side), and odd rounds
            # run raw first: neither side always meets a cold disk, allocator or page cache
            nvme_dirs = [tempfile.mkdtemp(prefix="runx_nvme_") for _ in range(2)]
            run_dir = tempfile.mkdtemp(prefix="runx_bench_")
            cfg = compose(base + [f"run_dir={run_dir}", f"trainer.nvme_path={nvme_dirs[0]}"])
            raw_cfg = compose(base + [f"run_dir={tempfile.mkdtemp(prefix='runx_bench_raw_')}",
                                      f"trainer.nvme_path={nvme_dirs[1]}"])
            for side in (("raw", "runx") if r % 2 else ("runx", "raw")):
                if side == "runx":
                    ta, la = runx_round(cfg, run_dir)
                    A += ta[2:]  # drop warm-up steps
                    if phases:
                        PA += phases.take(ta, int(cfg.trainer.grad_accum))
                else:
                    tb, lb, ds_config = raw_side(raw_cfg)
                    B += tb[2:]
                    if phases:
                        PB += phases.take(tb, int(raw_cfg.trainer.grad_accum))
                # its swap files gone and written back before the other side starts: on an H200 the side that
                # ran second, beside the first side's ~5 GB of swap files, was the slower one in rounds 2 and 3
                shutil.rmtree(nvme_dirs[0 if side == "runx" else 1], ignore_errors=True)
                os.sync()
            # the runx side's DeepSpeed config (saved in its run dir) against the raw side's, swap folders aside
            with open(os.path.join(run_dir, "ds_config.json")) as f:
                differ = config_diff(json.load(f), ds_config)
            if differ:
                same_config = False
                print(f"WARNING: the two sides ran different DeepSpeed configs: {differ}", flush=True)
            # the same work on both sides: same batches, same init, same losses (up to float noise in offload)
            worst = max(worst, max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb)))
            ra, rb = statistics.median(A), statistics.median(B)
            row = {"trainer": trainer, "device": a.device, "model": a.model, "steps_per_round": steps,
                   "rounds": r + 1, "runx_step_s": ra, "raw_deepspeed_step_s": rb,
                   "throughput_ratio_runx_over_raw": rb / ra, "max_rel_loss_diff_runx_vs_raw": worst,
                   "same_ds_config": same_config, **({"aio": aio} if aio else {}),
                   # every timed step, in order (rounds alternate which side runs first): how much is spread
                   "runx_steps_s": [round(x, 5) for x in A], "raw_deepspeed_steps_s": [round(x, 5) for x in B]}
            if phases:
                row["phases_s"] = {side: {k: round(statistics.median(r.get(k, 0.0) for r in P), 5)
                                          for k in ("forward", "backward", "step", "other")}
                                   for side, P in (("runx", PA), ("raw", PB)) if P}
                print(f"  phases (median s per step): {row['phases_s']}", flush=True)
            if r + 1 < rounds:  # a time-boxed GPU run keeps the rounds it finished
                write(a, rows + [dict(row, partial=f"{r + 1} of {rounds} rounds")])
        rows.append(row)
        print(f"{trainer:>18}  runx {ra*1e3:8.1f} ms/step   raw DeepSpeed {rb*1e3:8.1f} ms/step   ratio {rb/ra:.3f}"
              f"   (losses differ by <= {worst:.1e} relative)", flush=True)
        write(a, rows)  # after every row: a time-boxed GPU run keeps what it measured


def write(a, rows):
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    prev = {}
    if os.path.exists(a.out):
        prev = json.load(open(a.out))
    kept = [r for r in prev.get(a.device, {}).get("rows", []) if r["trainer"] not in {x["trainer"] for x in rows}]
    prev[a.device] = {"rows": kept + rows, "target": ">= 0.98", "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    json.dump(prev, open(a.out, "w"), indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
