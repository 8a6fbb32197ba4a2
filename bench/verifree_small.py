"""VeriFree in miniature (issue #5): does RL with R = pi(y*|x,z) improve held-out accuracy of a small
reasoning policy, and how does it compare with verifier-based RL at the same number of sampled responses?

From ONE warm-started policy (the recipe's supervised warm-up on worked traces, shared by all runs):
  before    held-out greedy exact-match accuracy of the warm-started policy
  verifree  after RL with recipe.reward=verifree  (RLOO on z + R-weighted answer log-likelihood)
  verifier  after RL with recipe.reward=verifier  (binary exact-match reward, RLOO on the whole response)
each over >= 3 seeds (the seed drives the prompt order and the sampling), same prompts per step, same G,
same steps -> the same number of sampled responses. The RL loop is the recipe's own loss() under a plain
torch AdamW step with grad-norm clipping (what the DeepSpeed trainer does at ZeRO-0, minus its bookkeeping).

Also reported: rollout tokens/s (generated tokens / generate time), update tokens/s (sequence tokens /
(scoring forward + backward + optimizer step)), and the peak memory of one update with and without the
fused log-prob (a fresh subprocess each; on CPU the resident set polled during the step, above its level
before the step; on CUDA max_memory_allocated above the resident tensors).

    python bench/verifree_small.py --quick      # 3 seeds, < 10 min on 2 CPU cores
    python bench/verifree_small.py              # more steps and seeds
Writes bench/results/verifree_small.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))


def make_cfg(overrides: list[str]):
    from runx.cli.config import compose
    return compose(["recipe=verifree", "logger=none", *overrides])


def warm_start(cfg, cache: str):
    """Build the model and run (or reuse) the recipe's cached supervised warm-up."""
    import torch
    from runx.recipes.verifree import VeriFree
    torch.manual_seed(0)                      # the same initial weights for every run
    recipe = VeriFree(cfg, cache)
    model = recipe.build_model()
    train, held_out = recipe.build_data()
    t0 = time.perf_counter()
    model = recipe.prepare(None, model)
    return recipe, model, train, held_out, time.perf_counter() - t0


def held_out_accuracy(recipe, model, held_out) -> dict:
    """Greedy ("acc") and sampled at the rollout temperature ("acc_sampled") exact match."""
    import torch
    loader = torch.utils.data.DataLoader(held_out, batch_size=100, collate_fn=recipe.collate)
    with torch.no_grad():
        return recipe.evaluate(model, loader)


def rl_run(overrides: list[str], cache: str, arm: str, seed: int, steps: int, eval_every: int,
           start: dict) -> dict:
    import torch
    cfg = make_cfg(overrides + [f"recipe.reward={arm}", f"seed={seed}", "recipe.eval_before_rl=false"])
    recipe, model, train, held_out, _ = warm_start(cfg, cache)
    B = int(cfg.trainer.micro_batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.optim.lr), betas=tuple(cfg.optim.betas),
                            weight_decay=float(cfg.optim.weight_decay))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    curve = [(0, start)]
    t_roll = t_upd = 0.0
    n_roll = n_upd = 0
    hist = []
    for step in range(steps):
        batch = [train[i] for i in torch.randint(len(train), (B,), generator=gen).tolist()]
        model.train()
        loss, metrics = recipe.loss(model, batch, step)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.trainer.grad_clip))
        opt.step()
        tim = recipe.last_timing
        t_roll += tim["rollout_s"]
        n_roll += tim["rollout_tokens"]
        t_upd += tim["forward_s"] + time.perf_counter() - t0
        n_upd += tim["update_tokens"]
        hist.append(metrics)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, held_out_accuracy(recipe, model, held_out)))
    last = hist[-max(1, steps // 5):]
    return {"arm": arm, "seed": seed, "acc_after": curve[-1][1]["acc"],
            "acc_sampled_after": curve[-1][1].get("acc_sampled"), "curve": curve,
            "sampled_responses": steps * B * int(cfg.recipe.group_size),
            "train_reward_last": statistics.mean(m["reward"] for m in last),
            "train_acc_last": statistics.mean(m["acc"] for m in last),
            "rollout_tokens_per_s": n_roll / max(t_roll, 1e-9), "update_tokens_per_s": n_upd / max(t_upd, 1e-9)}


# ---- peak memory of one update, fused vs full-logits log-probs (fresh process each) -----------------------

def memory_probe(fused: bool, vocab: int, n_seqs: int, seq_len: int, chunk: int | None = None) -> float:
    """Peak extra memory (MiB) of one scoring forward + backward on n_seqs x seq_len tokens."""
    code = f"""
import json, threading, time, torch, psutil
from runx.recipes import verifree as vf
from runx.cli.config import compose
cfg = compose(["recipe=verifree", "logger=none", "model.from_config.vocab_size={vocab}"])
r = vf.VeriFree(cfg, "/tmp")
torch.manual_seed(0)
m = r.build_model()
ids = torch.randint(0, 256, ({n_seqs}, {seq_len}))
role = torch.zeros_like(ids); role[:, {seq_len // 2}:] = vf.THINK
batch = vf.ScoredBatch(ids, torch.ones_like(ids), role, None, None)
cuda = torch.cuda.is_available()

def step():
    logp, _ = vf.sequence_logprobs(m, batch, fused={fused}, chunk={chunk})
    (-logp.sum()).backward()

if cuda:
    m = m.cuda(); step(); m.zero_grad(set_to_none=True)          # warm the allocator and kernels
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    step(); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
else:
    # CPU: poll the resident set every 0.2 ms during the step (large tensors are mmap-backed, so their
    # pages come and go with them); the process high-water mark would include the import peak
    proc, samples, done = psutil.Process(), [], threading.Event()
    def poll():
        while not done.is_set():
            samples.append(proc.memory_info().rss); time.sleep(0.0002)
    base = proc.memory_info().rss
    th = threading.Thread(target=poll); th.start()
    step()
    done.set(); th.join()
    peak = max(samples + [base])
print(json.dumps({{"peak_extra_mib": (peak - base) / 2**20}}))
"""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 seeds, fewer RL steps: < 10 min on 2 CPU cores")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--cache", default=None, help="warm-up cache folder (default: a temp dir)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "verifree_small.json"))
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. optim.lr=3e-4")
    args = ap.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds or (3 if args.quick else 5)
    steps = args.steps or (40 if args.quick else 120)
    eval_every = max(1, steps // 2) if args.quick else max(1, steps // 4)
    overrides = list(args.overrides)
    cache = args.cache or tempfile.mkdtemp(prefix="verifree_bench_")
    cache = os.path.abspath(cache)
    overrides.append(f"recipe.warmup_cache={cache}")

    t_all, cpu_all = time.perf_counter(), time.process_time()
    cfg = make_cfg(overrides)
    recipe, model, _, held_out, warm_s = warm_start(cfg, cache)
    start = held_out_accuracy(recipe, model, held_out)                  # the start, as eval_before_rl reports it
    print(f"warm-up: {cfg.recipe.warmup_steps} steps on {cfg.recipe.warmup_examples} worked traces "
          f"({cfg.recipe.warmup_corrupt_fraction:.0%} flawed: {cfg.recipe.warmup_corrupt_kind}), {warm_s:.0f} s; "
          f"held-out ({len(held_out)} problems) greedy acc {start['acc']:.3f}, "
          f"sampled acc {start['acc_sampled']:.3f}", flush=True)

    runs = []
    for seed in range(seeds):
        for arm in ("verifree", "verifier"):
            t0 = time.perf_counter()
            r = rl_run(overrides, cache, arm, seed, steps, eval_every, start)
            r["wall_s"] = time.perf_counter() - t0
            runs.append(r)
            print(f"seed {seed} {arm:8s}: greedy {start['acc']:.3f} -> {r['acc_after']:.3f}, sampled "
                  f"{start['acc_sampled']:.3f} -> {r['acc_sampled_after']:.3f}  (last steps: train R "
                  f"{r['train_reward_last']:.3f}, sampled acc {r['train_acc_last']:.3f}) {r['wall_s']:.0f} s",
                  flush=True)

    def summarise(key, before):
        out = {}
        for arm in ("verifree", "verifier"):
            accs = [r[key] for r in runs if r["arm"] == arm]
            out[arm] = {"mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "accs": accs}
        spread = max(out["verifree"]["sd"], out["verifier"]["sd"])
        gain = out["verifree"]["mean"] - before
        out.update(before=before, seed_spread=spread, verifree_gain=gain,
                   verifier_gain=out["verifier"]["mean"] - before,
                   target_gain_gt_spread=gain > spread,
                   target_within_spread_of_verifier=out["verifree"]["mean"] >= out["verifier"]["mean"] - spread)
        return out

    result = {
        "config": {"seeds": seeds, "rl_steps": steps, "prompts_per_step": int(cfg.trainer.micro_batch_size),
                   "group_size": int(cfg.recipe.group_size), "lr": float(cfg.optim.lr),
                   "sampled_responses_per_run": runs[0]["sampled_responses"],
                   "warmup_steps": int(cfg.recipe.warmup_steps), "warmup_examples": int(cfg.recipe.warmup_examples),
                   "warmup_corrupt": [float(cfg.recipe.warmup_corrupt_fraction), str(cfg.recipe.warmup_corrupt_kind)],
                   "held_out": len(held_out), "eval_samples_per_question": int(cfg.recipe.eval_samples),
                   "threads": torch.get_num_threads(), "overrides": args.overrides, "quick": args.quick},
        "warmup_s": warm_s,
        "greedy": summarise("acc_after", start["acc"]),
        "sampled": summarise("acc_sampled_after", start["acc_sampled"]),
        "throughput": {arm: {"rollout_tokens_per_s": statistics.mean(r["rollout_tokens_per_s"] for r in runs
                                                                    if r["arm"] == arm),
                             "update_tokens_per_s": statistics.mean(r["update_tokens_per_s"] for r in runs
                                                                   if r["arm"] == arm)}
                       for arm in ("verifree", "verifier")},
        "runs": runs,
    }
    print(f"\nheld-out exact match, {seeds} seeds, {runs[0]['sampled_responses']} sampled responses per RL run:")
    for key, title in (("greedy", "greedy"), ("sampled", f"sampled (T={cfg.recipe.temperature}, "
                                                        f"{cfg.recipe.eval_samples}/question)")):
        r = result[key]
        print(f"  {title}")
        print(f"    before RL           {r['before']:.3f}")
        print(f"    after VeriFree      {r['verifree']['mean']:.3f} +- {r['verifree']['sd']:.3f}   "
              f"gain {r['verifree_gain']:+.3f}")
        print(f"    after verifier RL   {r['verifier']['mean']:.3f} +- {r['verifier']['sd']:.3f}   "
              f"gain {r['verifier_gain']:+.3f}")
        print(f"    VeriFree gain / seed spread = {r['verifree_gain'] / max(r['seed_spread'], 1e-9):.2f} "
              f"(target > 1: {'met' if r['target_gain_gt_spread'] else 'NOT met'});  VeriFree - verifier = "
              f"{r['verifree']['mean'] - r['verifier']['mean']:+.3f}, spread {r['seed_spread']:.3f} "
              f"(target >= -spread: {'met' if r['target_within_spread_of_verifier'] else 'NOT met'})")
    for arm, th in result["throughput"].items():
        print(f"  {arm:8s} rollout {th['rollout_tokens_per_s']:.0f} tok/s, update {th['update_tokens_per_s']:.0f} tok/s")

    if not args.skip_memory:
        n_seqs = int(cfg.trainer.micro_batch_size) * int(cfg.recipe.group_size)
        mem = {}
        for vocab in (int(cfg.model.from_config.vocab_size), 32000):
            full = memory_probe(False, vocab, n_seqs, 128)
            fused = memory_probe(True, vocab, n_seqs, 128)
            fused_256 = memory_probe(True, vocab, n_seqs, 128, chunk=256)
            mem[str(vocab)] = {"full_logits_mib": full, "fused_mib": fused, "fused_chunk256_mib": fused_256,
                               "ratio": fused / max(full, 1e-9), "ratio_chunk256": fused_256 / max(full, 1e-9)}
            print(f"  peak extra memory of one update ({n_seqs} x 128 tokens, half of them scored, vocab {vocab}): "
                  f"full logits {full:.0f} MiB, fused {fused:.0f} MiB ({fused / max(full, 1e-9):.2f}x), "
                  f"fused with recipe.logprob_chunk=256 {fused_256:.0f} MiB ({fused_256 / max(full, 1e-9):.2f}x)")
        result["memory"] = mem
    result["wall_s"] = time.perf_counter() - t_all
    result["cpu_s"] = time.process_time() - cpu_all
    print(f"  total wall time {result['wall_s']:.0f} s, CPU time of this process {result['cpu_s']:.0f} s "
          f"(load average now {os.getloadavg()[0]:.1f})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
