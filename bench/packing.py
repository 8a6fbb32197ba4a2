"""data.packing on causal LM fine-tuning: the same run with and without packing, side by side (alternating,
fresh processes): padding share of the token slots, rows per micro-batch, training-loop time and final loss.

    python bench/packing.py [--rounds 2] [--steps 30]   ->  bench/results/packing.json

The run: `runx train recipe=sft` on a randomly initialised Llama (hidden 256, 4 layers) built from a config,
the `tiny_text` data (Python's own docstrings, byte tokens, up to data.max_length=256), micro-batch 16, 1 torch
thread on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = ["recipe=sft", "model=tiny_llama", "data=tiny_text", "data.max_length=256", "trainer.micro_batch_size=16",
       "model.from_config.hidden_size=256", "model.from_config.intermediate_size=688",
       "model.from_config.num_hidden_layers=4", "model.from_config.max_position_embeddings=512",
       "trainer.eval_every=0", "trainer.ckpt_every=0", "logger=none", "trainer.progress=false"]


def padding(packing: bool, steps: int) -> dict:
    """Token slots vs real tokens over the run's first `steps` micro-batches (the training order)."""
    from runx.cli.config import compose
    from runx.recipes.sft import SFT
    from runx.trainers.deepspeed_trainer import StepBatchSampler
    cfg = compose(RUN + [f"data.packing={str(packing).lower()}"])
    recipe = SFT(cfg, tempfile.mkdtemp())
    train, _ = recipe.build_data()
    sampler = StepBatchSampler(len(train), 16, 1, 1, 0, int(cfg.seed), 0, steps)
    slots = real = rows = 0
    for idx in sampler:
        b = recipe.collate([train[i] for i in idx])
        slots += b["input_ids"].numel()
        real += int(b["attention_mask"].sum())
        rows += b["input_ids"].shape[0]
    return {"padding_share": 1 - real / slots, "rows_per_micro_batch": rows / steps}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    root = tempfile.mkdtemp(prefix="runx_packing_")
    runs = {"plain": [], "packed": []}
    for r in range(a.rounds):
        for arm in (("plain", "packed") if r % 2 == 0 else ("packed", "plain")):
            run_dir = os.path.join(root, f"{arm}_{r}")
            cmd = [sys.executable, "-m", "runx.cli.main", "train", *RUN, f"trainer.max_steps={a.steps}",
                   f"data.packing={str(arm == 'packed').lower()}", f"run_dir={run_dir}"]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise SystemExit(p.stderr[-3000:])
            with open(os.path.join(run_dir, "summary.json")) as f:
                s = json.load(f)
            runs[arm].append({k: s[k] for k in ("train_wall_s", "tokens_per_s", "final_loss", "first_loss")})
            print(f"round {r} {arm}: {runs[arm][-1]}", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    pad = {"plain": padding(False, a.steps), "packed": padding(True, a.steps)}
    out = {"command": f"python bench/packing.py --rounds {a.rounds} --steps {a.steps}", "run": RUN,
           "steps": a.steps, "runs": runs, "median": med, "batches": pad,
           "train_wall_ratio_packed_over_plain": med["packed"]["train_wall_s"] / med["plain"]["train_wall_s"]}
    path = os.path.join(HERE, "results", "packing.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"padding share {pad['plain']['padding_share']:.2f} -> {pad['packed']['padding_share']:.2f}, rows per "
          f"micro-batch {pad['plain']['rows_per_micro_batch']:.1f} -> {pad['packed']['rows_per_micro_batch']:.1f}; "
          f"training loop {out['train_wall_ratio_packed_over_plain']:.2f}x; final loss "
          f"{med['plain']['final_loss']:.4f} vs {med['packed']['final_loss']:.4f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
