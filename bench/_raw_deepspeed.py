"""The plain training loop a user writes around `deepspeed.initialize`, shared by bench/trainer_overhead.py and
bench/offload.py: the sft recipe's data (same seed, shuffling DataLoader) and loss (`lm_loss`), no runx trainer."""
from __future__ import annotations

import time


def raw_steps(engine, recipe, train, cfg, label: str = "") -> dict:
    """cfg.trainer.max_steps optimizer steps of cfg.trainer.grad_accum micro-batches each; per step: wall time
    (device-synchronised), tokens and loss."""
    import torch
    g = torch.Generator().manual_seed(int(cfg.seed))
    loader = torch.utils.data.DataLoader(train, batch_size=int(cfg.trainer.micro_batch_size), shuffle=True,
                                         generator=g, collate_fn=recipe.collate, drop_last=True)
    cuda = engine.device.type == "cuda" if hasattr(engine.device, "type") else str(engine.device).startswith("cuda")
    it, times, tokens, losses = iter(loader), [], [], []
    for _ in range(int(cfg.trainer.max_steps)):
        t0, tok = time.perf_counter(), 0
        for _m in range(int(cfg.trainer.grad_accum)):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
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
