"""The plain training loop a user writes around `deepspeed.initialize`, shared by bench/trainer_overhead.py and
bench/offload.py: the sft recipe's data (the micro-batches runx would draw, in its order) and loss (`lm_loss`), no
runx trainer."""
from __future__ import annotations

import time


def raw_steps(engine, recipe, train, cfg, label: str = "") -> dict:
    """cfg.trainer.max_steps optimizer steps of cfg.trainer.grad_accum micro-batches each; per step: wall time
    (device-synchronised), tokens and loss."""
    import torch

    from runx.trainers.deepspeed_trainer import StepBatchSampler
    t = cfg.trainer
    # the same micro-batches, in the same order, as the runx run it is compared with: with variable-length text a
    # different shuffle means different padded lengths, i.e. different work per step
    sampler = StepBatchSampler(len(train), int(t.micro_batch_size), int(t.grad_accum), 1, 0, int(cfg.seed), 0,
                               int(t.max_steps))
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=recipe.collate)
    cuda = torch.device(engine.device).type == "cuda"
    it, times, tokens, losses = iter(loader), [], [], []  # the sampler yields exactly max_steps x grad_accum
    for _ in range(int(t.max_steps)):
        t0, tok = time.perf_counter(), 0
        for _m in range(int(t.grad_accum)):
            batch = next(it)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = recipe.lm_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            tok += int(batch["attention_mask"].sum())
        losses.append(float(loss))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(tok)
        if label:
            print(f"raw {label} step {len(times)}: {times[-1]:.3f}s loss {losses[-1]:.4f}", flush=True)
    return {"step_s": times, "tokens": tokens, "losses": losses}


def synced_call(fn, *args, **kwargs):
    """(fn(*args, **kwargs), its wall time in seconds), the device synchronised before and after on CUDA: how the
    benches time one DeepSpeed call on the side (offload.py: the optimizer step; trainer_overhead.py --phases)."""
    import torch
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0
