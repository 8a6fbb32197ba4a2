"""VeriFree's scoring pass (forward + backward of the G x prompts sequences of one micro-batch through the
decoder and the gradient-in-forward head) padded vs packed (recipe.pack_sequences), alternating, side by side.

    python bench/verifree_packing.py [--rounds 3]   ->  bench/results/verifree_packing.json

A randomly initialised Llama (hidden 256, 4 layers, byte vocabulary) built from a config; 16 sequences (2
prompts x G=8) of a 40-token prompt plus reasoning of 20..400 tokens (uniform, seeded) and a 12-token answer,
as sampled reasoning lengths vary; 1 torch thread on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = ["model=tiny_llama", "model.from_config.hidden_size=256", "model.from_config.intermediate_size=688",
         "model.from_config.num_hidden_layers=4", "model.from_config.max_position_embeddings=1024"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    torch.set_num_threads(1)
    from runx.cli.config import compose
    from runx.recipes import verifree as vf

    recipe = vf.VeriFree(compose(["recipe=verifree", "logger=none", *MODEL]), tempfile.mkdtemp())
    torch.manual_seed(0)
    model = recipe.build_model()
    gen = torch.Generator().manual_seed(0)
    think = torch.randint(20, 401, (16,), generator=gen).tolist()
    prompt_ids = [torch.randint(0, 256, (40,), generator=gen).tolist() for _ in range(2)]
    segs = [[(torch.randint(0, 256, (k,), generator=gen).tolist(), vf.THINK),
             (torch.randint(0, 256, (12,), generator=gen).tolist(), vf.ANSWER)] for k in think]
    ids, attn, role = vf.pack([prompt_ids[i // 8] for i in range(16)], segs, 256)
    batch = vf.ScoredBatch(ids, attn, role, torch.ones(16, dtype=torch.bool), torch.zeros(16, dtype=torch.bool))

    def objective(think_lp, answer_lp, answer_lp_detached):
        R = vf.verifree_rewards(answer_lp_detached, batch.has_answer)
        return vf.verifree_loss(think_lp, answer_lp, R, 8, "rloo", "reward", None)

    def step(packed: bool) -> float:
        model.zero_grad()
        t0 = time.perf_counter()
        loss, _, _ = vf.linear_objective_logprobs(model, batch, objective, packed=packed)
        loss.backward()
        return time.perf_counter() - t0

    step(False), step(True)                     # warm-up
    times = {"padded": [], "packed": []}
    for r in range(a.rounds):
        for arm in (("padded", "packed") if r % 2 == 0 else ("packed", "padded")):
            times[arm].append(step(arm == "packed"))
        print(f"round {r}: padded {times['padded'][-1]:.2f} s, packed {times['packed'][-1]:.2f} s", flush=True)
    rows = []
    hook = model.get_decoder().register_forward_pre_hook(lambda m, a_, kw: rows.append(kw["input_ids"].shape),
                                                         with_kwargs=True)
    step(True)
    hook.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    real = int(attn.sum())
    out = {"command": f"python bench/verifree_packing.py --rounds {a.rounds}", "model": MODEL,
           "sequences": 16, "tokens_real": real, "padded_shape": list(ids.shape), "packed_shape": list(rows[0]),
           "padding_share_padded": 1 - real / ids.numel(), "padding_share_packed": 1 - real / (rows[0][0] * rows[0][1]),
           "times_s": times, "median_s": med, "time_ratio_packed_over_padded": med["packed"] / med["padded"]}
    path = os.path.join(HERE, "results", "verifree_packing.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"scoring pass fwd+bwd: padded {list(ids.shape)} {med['padded']:.2f} s, packed {list(rows[0])} "
          f"{med['packed']:.2f} s ({out['time_ratio_packed_over_padded']:.2f}x); padding "
          f"{out['padding_share_padded']:.2f} -> {out['padding_share_packed']:.2f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
