"""LoRA-GA's gradient estimate on a model trained with gradient checkpointing: peak memory of the estimation
pass with the checkpointing kept (runx since 2026-11-27) and without it (transformers' eval mode turns it
off), each in a fresh process, alternating; side by side in one run.

    python bench/lora_ga_estimation_memory.py [--rounds 2]   ->  bench/results/lora_ga_estimation_memory.json

A randomly initialised 12-layer Llama (hidden 512) built from a config, one micro-batch of 8 x 512 tokens, all
linear layers targeted, 1 torch thread. Peak RSS rise over the process's state before the pass (CPU).
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
MODEL = ["model=tiny_llama", "data=tiny_text", "model.gradient_checkpointing=true",
         "model.from_config.hidden_size=512", "model.from_config.intermediate_size=1376",
         "model.from_config.num_hidden_layers=12", "model.from_config.num_attention_heads=8",
         "model.from_config.num_key_value_heads=8", "model.from_config.max_position_embeddings=1024"]
BATCH, TOKENS = 8, 512


def child(keep: bool) -> None:
    import resource
    import time

    import torch
    torch.set_num_threads(1)
    import runx.recipes.lora_ga as L
    from runx.cli.config import compose
    if not keep:                                   # the behaviour before: eval mode, no checkpointing
        L._keep_checkpointing = lambda model: None
    recipe = L.LoRAGA(compose(["recipe=lora_ga", "logger=none", *MODEL]), tempfile.mkdtemp())
    torch.manual_seed(0)
    model = recipe.build_model()
    ids = torch.randint(0, 256, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    weights = {n: layer.get_base_layer().weight for n, layer in L.lora_ga_targets(model).items()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    L.estimate_full_gradients(model, weights, [batch], lambda b: recipe.loss(model, b, 0)[0])
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_rise_mib": (after - before) / 1024, "pass_s": wall}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=["keep", "off"])
    a = ap.parse_args()
    if a.child:
        child(a.child == "keep")
        return 0
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    runs = {"checkpointing_kept": [], "checkpointing_off": []}
    for r in range(a.rounds):
        order = ["keep", "off"] if r % 2 == 0 else ["off", "keep"]
        for arm in order:
            p = subprocess.run([sys.executable, __file__, "--child", arm], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise SystemExit(p.stderr[-3000:])
            res = json.loads(p.stdout.strip().splitlines()[-1])
            runs["checkpointing_kept" if arm == "keep" else "checkpointing_off"].append(res)
            print(f"round {r} {arm}: {res}", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("peak_rss_rise_mib", "pass_s")}
           for k, v in runs.items()}
    out = {"command": f"python bench/lora_ga_estimation_memory.py --rounds {a.rounds}", "model": MODEL,
           "batch": [BATCH, TOKENS], "runs": runs, "median": med,
           "memory_ratio_kept_over_off": med["checkpointing_kept"]["peak_rss_rise_mib"]
           / med["checkpointing_off"]["peak_rss_rise_mib"],
           "time_ratio_kept_over_off": med["checkpointing_kept"]["pass_s"] / med["checkpointing_off"]["pass_s"]}
    path = os.path.join(HERE, "results", "lora_ga_estimation_memory.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"estimation pass, checkpointing kept / off: memory {out['memory_ratio_kept_over_off']:.2f}x, "
          f"time {out['time_ratio_kept_over_off']:.2f}x; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
