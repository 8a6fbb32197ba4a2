"""The one trainer every training recipe runs on: a DeepSpeed engine (ZeRO 0-3, CPU / NVMe offload)
plus the loop, evaluation, metrics, checkpoints and resume.

Data order is a pure function of (seed, optimizer step): step s consumes positions [s*G, (s+1)*G) of an
endless stream of per-epoch permutations, G = micro_batch * grad_accum * world. Each rank takes its slice
of every micro-step. So a resumed run sees exactly the batches the uninterrupted run would have, and
2 processes at micro-batch b see the same global batch as 1 process at micro-batch 2b.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time

import torch
from omegaconf import OmegaConf

from runx.trainers import runtime
from runx.trainers.runtime import flatten_overrides
from runx.trainers.datajob import atomic_write_bytes, atomic_write_json, readable_like_open, remove_stale_temps
from runx.trainers.optim import build_optimizer, default_param_groups, lr_lambda, with_head_lr
from runx.trainers.tracking import MetricsLog, WandbRun, console, redact, summary_table, write_summary

log = logging.getLogger("runx.trainer")


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batch index lists from optimizer step `start_step` on.

    With `lengths` (one per sample), batches are grouped by length as Hugging Face's LengthGroupedSampler does:
    the samples of GROUP_STEPS consecutive global batches (fewer in the last window, which ends at max_steps) are
    sorted by length, one epoch's before the next's, and cut into global batches again, which then run in a seeded
    random order. So the run sees the samples the ungrouped order would (trainer.epochs=1: each once), and a
    sample is twice in a batch no more often than there (two epochs' copies, sorted side by side, shared one).
    Each step's batch stays a function of (seed, step, max_steps), so a resumed run draws the same batches (a
    run resumed with a larger trainer.max_steps regroups its last window, whose remaining steps then draw from
    all of that window's samples again)."""

    GROUP_STEPS = 50

    def __init__(self, n: int, micro: int, accum: int, world: int, rank: int, seed: int, start_step: int,
                 max_steps: int, shuffle: bool = True, lengths: list[int] | None = None):
        self.n, self.micro, self.accum, self.world, self.rank = n, micro, accum, world, rank
        self.seed, self.start, self.max_steps, self.shuffle = seed, start_step, max_steps, shuffle
        self.lengths = lengths
        self._perms: dict[int, torch.Tensor] = {}
        self._groups: dict[int, list[list[int]]] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                self._perms = {epoch: torch.randperm(self.n, generator=g)}
            else:
                self._perms = {epoch: torch.arange(self.n)}
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        if self.lengths is not None:
            return self._grouped(step)
        return self._drawn(step)

    def _drawn(self, step: int) -> list[int]:
        g = self.micro * self.accum * self.world
        out = []
        for pos in range(step * g, (step + 1) * g):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out

    def _grouped(self, step: int) -> list[int]:
        first = step - step % self.GROUP_STEPS
        k = min(self.GROUP_STEPS, max(1, self.max_steps - first))
        if first not in self._groups:
            idx = [i for s in range(first, first + k) for i in self._drawn(s)]
            start = first * self.micro * self.accum * self.world    # (the stream position of idx[0]: its epoch)
            idx = [i for *_, i in sorted(((start + pos) // self.n, -self.lengths[i], pos, i)
                                         for pos, i in enumerate(idx))]
            g = len(idx) // k
            batches = [idx[b * g:(b + 1) * g] for b in range(k)]
            order = torch.randperm(k, generator=torch.Generator().manual_seed(self.seed * 7919 + first)).tolist()
            self._groups = {first: [batches[o] for o in order]}
        return self._groups[first][step - first]

    def __iter__(self):
        for step in range(self.start, self.max_steps):
            idx = self.global_indices(step)
            for m in range(self.accum):
                base = (m * self.world + self.rank) * self.micro
                yield idx[base: base + self.micro]

    def __len__(self):
        return (self.max_steps - self.start) * self.accum


def token_lengths(dataset) -> list[int] | None:
    """Each item's token count, for a tokenised text dataset (items are dicts with input_ids); else None."""
    first = dataset[0] if len(dataset) else None
    if not (isinstance(first, dict) and "input_ids" in first):
        return None
    held = getattr(dataset, "input_ids", None)   # text_data's flat arrays: the lengths without building each item
    if hasattr(held, "offsets") and len(held) == len(dataset):
        import numpy as np
        return np.diff(held.offsets).tolist()
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def copy_into_partitioned(model, reference, rank: int) -> None:
    """Copy `reference`'s weights (a plain build) into `model` built under ZeRO-3's zero.Init: each parameter is
    gathered, rank 0 writes it, and DeepSpeed re-partitions it (to NVMe when the parameters live there)."""
    import deepspeed
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                p.data.copy_(ref[name].data.to(p.dtype))


def _loader_workers(tcfg, device: str) -> dict:
    """A training loader's worker settings: trainer.dataloader_workers processes, which ignore the signals that
    stop the run (runtime.quiet_data_worker), pinned memory on CUDA."""
    workers = int(tcfg.dataloader_workers)
    return {"num_workers": workers, "pin_memory": device == "cuda",
            "worker_init_fn": runtime.quiet_data_worker if workers else None}


def keep_clipped_grad_norm(engine) -> None:
    """ZeRO-0 without bf16 (the default job): DeepSpeed clips the gradients and drops the norm it computed, so
    get_global_grad_norm() was None and metrics.jsonl had no grad_norm there. The same clip, keeping the norm."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients():
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine._global_grad_norm = float(norm)
    engine.clip_fp32_gradients = clip_fp32_gradients


def engine_forward_context(engine, autocast: bool = True):
    """What DeepSpeed's engine.forward does around the model call, for a recipe's loss, which may call the model
    or its parts directly (the decoder and a fused head, VeriFree's rollouts and scoring): ZeRO's
    start-of-micro-batch bookkeeping (ZeRO-3 advances its micro-step counter there; without it, with grad_accum > 1,
    each micro-batch's gradient replaced the one before instead of adding to it) and trainer.precision=amp_bf16's
    autocast (applied only inside engine.forward, so those paths trained in fp32). Repeating either in the engine's
    own forward changes nothing. autocast=False (evaluation): the bookkeeping only; a recipe's evaluation runs its
    own code in the precision it was written for (SwAV's kNN votes are fp32 sums), the engine's forward in amp."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    if isinstance(engine.optimizer, ZeROOptimizer):
        engine.optimizer.clear_backward_seen_flag()
    from deepspeed.accelerator import get_accelerator
    on = autocast and bool(engine.torch_autocast_enabled())
    return torch.autocast(get_accelerator().device_name(), dtype=engine.torch_autocast_dtype() if on else None,
                          enabled=on)


def _metrics_line(metrics: dict) -> str:
    """`key=value` for each number, as train.log gets a run's evaluations and final metrics."""
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                     if isinstance(v, (int, float)))


class Trainer:
    def __init__(self, cfg, run_dir: str):
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.run_dir = run_dir
        self.device = runtime.pick_device(self.tcfg.device)
        self.rank, self.world_size = runtime.init_distributed(self.device)
        self.is_main = self.rank == 0
        self.ds_config: dict = {}
        self.global_step = 0
        self.recipe = None
        # the training loop's clock: started at the wall time a resumed checkpoint carries (train_wall_s)
        self._prior_wall, self._loop_t0 = 0.0, None
        monitor = self.tcfg.get("monitor")
        self.best = runtime.BestTracker(monitor, self.tcfg.get("monitor_mode", "auto"),
                                        self.tcfg.get("early_stop_patience", 0),
                                        self.tcfg.get("early_stop_min_delta", 0.0)) if monitor else None

    @property
    def swaps_to_nvme(self) -> bool:
        return "nvme" in (str(self.tcfg.offload_param), str(self.tcfg.offload_optimizer))

    @property
    def swap_dir(self) -> str:
        """Where ZeRO-Infinity swaps this run's tensors: its own folder under trainer.nvme_path (nvme.run_swap_dir),
        removed when the run ends."""
        from runx.trainers.nvme import run_swap_dir
        return run_swap_dir(str(self.tcfg.nvme_path), self.run_dir)

    # ---------------------------------------------------------------- DeepSpeed config
    def build_ds_config(self, model, check_disk: bool = True) -> dict:
        t = self.tcfg
        zero: dict = {"stage": int(t.zero_stage)}
        if t.zero_stage == 3:
            zero.update(stage3_param_persistence_threshold=t.stage3_param_persistence_threshold,
                        stage3_max_live_parameters=t.stage3_max_live_parameters,
                        stage3_prefetch_bucket_size=t.stage3_prefetch_bucket_size,
                        stage3_gather_16bit_weights_on_model_save=True)
        pin = self.device == "cuda"
        param_dev = self.param_device()
        overrides = flatten_overrides(OmegaConf.to_container(t.ds_overrides, resolve=True))
        stats = trainable = None  # parameter sizes (all, trainable), walked once, when anything goes to NVMe
        if param_dev.startswith("nvme") or t.offload_optimizer == "nvme":
            from runx.trainers.nvme import param_stats
            stats = param_stats(model, self.world_size)
            trainable = param_stats(model, self.world_size, trainable_only=True)
        for kind, key in (("param", "offload_param"), ("optimizer", "offload_optimizer")):
            dev = getattr(t, key)
            if dev == "none":
                continue
            if t.zero_stage < (3 if kind == "param" else 1):
                raise ValueError(f"trainer.{key}={dev} needs trainer.zero_stage "
                                 f"{'3' if kind == 'param' else '>= 1'} (got {t.zero_stage})")
            in_cpu = kind == "param" and param_dev == "nvme_in_cpu"
            dev = "nvme" if in_cpu else dev
            block = {"device": dev, "pin_memory": pin}
            # (checked on the model itself, whose frozen weights have no optimizer state; `runx plan`'s check,
            # before anything is built, counts the recipe's trainable parameters the same way)
            if dev == "nvme" and check_disk and not getattr(self, "_nvme_checked", False):
                from runx.trainers.nvme import check_nvme_path, nvme_bytes_needed
                from runx.trainers.plan import optimizer_state_bytes
                check_nvme_path(str(t.nvme_path), nvme_bytes_needed(
                    stats["n_params"], param_dev.startswith("nvme"), t.offload_optimizer == "nvme",
                    2 if t.precision == "bf16" else 4,
                    optimizer_state_bytes(str(self.cfg.optim.name), float(self.cfg.optim.momentum)),
                    trainable["n_params"]))
                self._nvme_checked = True
            if dev == "nvme":
                block["nvme_path"] = self.swap_dir
                if kind == "param":
                    # the derived buffers also serve "nvme_in_cpu": until the engine moves the parameters
                    # into CPU memory (a LoRA-GA estimate runs before that) they are read from NVMe
                    settings = self._nvme_param_settings(
                        stats, overrides.get("zero_optimization.stage3_max_reuse_distance"))
                    zero["stage3_max_reuse_distance"] = settings.pop("stage3_max_reuse_distance")
                    if in_cpu:
                        settings["max_in_cpu"] = int(stats["n_params"]) + 1
                    block.update(settings)
                else:
                    from runx.trainers.nvme import nvme_optimizer_settings, swapped_state_count
                    opt = nvme_optimizer_settings(trainable, n_states=swapped_state_count(str(self.cfg.optim.name)))
                    block.update(opt["block"])
                    if opt["sub_group_size"]:
                        zero["sub_group_size"] = opt["sub_group_size"]
            zero[key] = block
        cfg = {
            "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
            "gradient_accumulation_steps": int(t.grad_accum),
            "train_batch_size": int(t.micro_batch_size * t.grad_accum * self.world_size),
            "gradient_clipping": float(t.grad_clip),
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
        }
        if t.precision == "bf16":
            cfg["bf16"] = {"enabled": True}
        elif t.precision == "amp_bf16":
            cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if self.swaps_to_nvme:
            from runx.trainers.nvme import resolve_aio
            cfg["aio"] = self._aio = getattr(self, "_aio", None) or resolve_aio(t)  # probe-tuned unless set
        reuse = zero.get("stage3_max_reuse_distance") if param_dev.startswith("nvme") else None
        for k, v in overrides.items():
            node = cfg
            *parents, leaf = k.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
        if reuse is not None:   # the distance the NVMe buffers were sized for (at most the user's, never more)
            zero["stage3_max_reuse_distance"] = reuse
        return cfg

    def param_device(self) -> str:
        """DeepSpeed's placement of the parameters: none | cpu | nvme | nvme_in_cpu (trainers/nvme.py)."""
        from runx.trainers.nvme import deepspeed_param_device
        t = self.tcfg
        return deepspeed_param_device(int(t.zero_stage), str(t.offload_param), str(t.offload_optimizer))

    def _nvme_param_settings(self, stats: dict, user=None) -> dict:
        """offload_param buffers + the ZeRO-3 reuse distance that cannot run out of buffers (trainers/nvme.py),
        from the model's `param_stats`; `user`: the user's zero_optimization.stage3_max_reuse_distance, which the
        buffers are sized for (it was merged over the fitted distance)."""
        from runx.trainers.nvme import nvme_param_settings, resolve_aio
        t = self.tcfg
        self._aio = getattr(self, "_aio", None) or resolve_aio(t)
        return nvme_param_settings(stats, 2 if t.precision == "bf16" else 4,
                                   t.nvme_buffer_count, t.nvme_buffer_size, self._aio["block_size"],
                                   None if user is None else float(user))

    def _build_model(self, recipe):
        """The recipe's model; under ZeRO-3 (Hugging Face models) and for ZeRO-Infinity, built already partitioned.

        Parameters on NVMe need the model built under zero.Init (on CPU a DeepSpeed dtype bug strikes
        otherwise, and a model larger than memory never exists whole); under plain ZeRO-3 a model built whole
        would be moved to each GPU entire before DeepSpeed partitions it (`builds_partitioned`). Hugging Face
        models do this themselves while a `HfDeepSpeedConfig` is alive: `from_config` / `from_pretrained`
        build under zero.Init and initialise / load each partition (an external zero.Init breaks HF's weight
        init). The NVMe buffers in that config are derived from the parameter shapes. A randomly initialised
        model (model.from_config) is built once normally and copied in, so that every ZeRO config of a
        seed starts from the same weights."""
        from runx.trainers.recipe import builds_partitioned
        if not builds_partitioned(self.cfg, recipe):
            with recipe.model_init_context(self):
                return recipe.build_model()
        from transformers.integrations import HfDeepSpeedConfig

        from runx.trainers import ds_patches
        ds_patches.apply()  # NVMe prefetch may list a parameter twice (trainers/ds_patches.py)
        random_init = bool(self.cfg.model.get("from_config"))
        if random_init:
            reference = recipe.build_model()
        else:   # only the shapes are needed: from_pretrained refuses the meta device, so from the checkpoint's config
            from runx.trainers.plan import build_on_meta
            reference = build_on_meta(self.cfg)[0]
        # transformers holds this config by weak reference: while it lives, every from_config / from_pretrained
        # builds under zero.Init (a collective). It lives for this build only: a later build on one rank (rank 0's
        # export builds a whole model to merge into) would otherwise wait forever for the other ranks.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        hf_ds_config = HfDeepSpeedConfig(self.build_ds_config(reference, check_disk=False))
        if self.is_main:
            log.info("ZeRO-3: building the model partitioned across %d rank(s) (zero.Init)", self.world_size)
        try:
            runtime.seed_everything(int(self.cfg.seed))
            model = recipe.build_model()
            if random_init:
                copy_into_partitioned(model, reference, self.rank)
        finally:
            unset_hf_deepspeed_config()
            del hf_ds_config
        del reference
        return model

    # ---------------------------------------------------------------- checkpoints
    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.run_dir, "ckpt")

    def find_resume(self) -> tuple[str, str] | None:
        """(checkpoint dir, tag) to resume from, per cfg.resume (auto | never | <path>)."""
        mode = str(self.cfg.resume)
        if mode == "never":
            return None
        root, tag = runtime.resume_target(mode, self.run_dir)   # (resume=<run>/ckpt/step_N: that checkpoint)
        latest = os.path.join(root, "latest")
        if runtime.is_complete(root, tag):
            return root, tag
        if mode != "auto":
            raise FileNotFoundError(f"resume={mode!r}: no complete checkpoint there (expected {latest})")
        # `latest` names no complete checkpoint (its folder was deleted by hand, or the disk lost it): the newest
        # complete one continues the run; a run dir holding only incomplete ones starts over, and says so
        steps = runtime.checkpoint_steps(root)
        complete = [d for d in steps if runtime.is_complete(root, d)]
        if complete:
            log.warning("%s names %s, which is not a complete checkpoint: resuming from %s, the newest complete one",
                        latest, tag, complete[-1])
            return root, complete[-1]
        if steps or tag:
            log.warning("%s holds no complete checkpoint (%s): this run starts over at step 0", root,
                        ", ".join(steps) or f"latest -> {tag}")
        return None

    def save_checkpoint(self, engine, step: int, best: bool = False) -> None:
        """Save step_<step>, point `latest` at it (and `best`, when it is trainer.monitor's best so far), then
        delete all but the newest keep_last checkpoints and the best one."""
        import torch.distributed as dist
        tag = f"step_{step}"
        # the training loop's wall time so far (earlier segments of a resumed run included)
        wall = time.perf_counter() - self._loop_t0 if self._loop_t0 is not None else 0.0
        client = {"runx_step": step, "runx_train_wall_s": wall}
        if self.best is not None:
            client["runx_best"] = self.best.state()
        marker = os.path.join(self.ckpt_dir, tag, "runx_complete.json")
        if self.is_main and os.path.exists(marker):
            # a save into an existing folder (a run rolled back with resume=<its ckpt/step_N>): the old marker
            # named a half-written mix of both saves complete if this one was cut short
            os.remove(marker)
        dist.barrier()
        engine.save_checkpoint(self.ckpt_dir, tag=tag, client_state=client, save_latest=False)
        torch.save(runtime.rng_state(), os.path.join(self.ckpt_dir, tag, f"rng_rank{self.rank}.pt"))
        dist.barrier()
        if self.is_main:
            remove_stale_temps(self.ckpt_dir)   # (`latest` / `best` pointers a killed save left half-written)
            atomic_write_json(os.path.join(self.ckpt_dir, tag, "runx_complete.json"), {"step": step})
            # `best` before `latest`: a run cut short between the two resumes from the earlier `latest`, whose
            # tracker state agrees with that (the other way round, the resumed tracker named this step best while
            # `best` still named the one before, which rotation then deleted)
            best_file = os.path.join(self.ckpt_dir, "best")
            if best:
                atomic_write_bytes(best_file, tag.encode())
            atomic_write_bytes(os.path.join(self.ckpt_dir, "latest"), tag.encode())
            keep = {open(best_file).read().strip()} if self.best is not None and os.path.exists(best_file) else set()
            tags = runtime.checkpoint_steps(self.ckpt_dir)
            complete = [d for d in tags if runtime.is_complete(self.ckpt_dir, d)]
            # a folder without runx_complete.json is a save a kill cut short (this one is complete by now): never
            # loadable, and it must not count among the newest keep_last (it pushed the checkpoint just written
            # out); the newest complete ones are kept, this one always
            stale = [d for d in tags if d not in complete and d != tag]
            old = [d for d in complete[:-max(1, int(self.tcfg.keep_last))] if d not in keep and d != tag]
            for d in stale + old:   # the marker first: a deletion cut short leaves no "complete" half
                runtime.remove_checkpoint(self.ckpt_dir, d)
        dist.barrier()

    def load_checkpoint(self, engine, root: str, tag: str) -> int:
        _, client = engine.load_checkpoint(root, tag=tag)
        rng = os.path.join(root, tag, f"rng_rank{self.rank}.pt")
        self._pending_rng = torch.load(rng, weights_only=False) if os.path.exists(rng) else None
        if self._pending_rng is None:
            log.warning("%s has no %s: the run resumes with fresh random streams (dropout, sampling), not the "
                        "ones it would have had", os.path.join(root, tag), os.path.basename(rng))
        self._prior_wall = float(client.get("runx_train_wall_s", 0.0))
        if self.best is not None:
            own = os.path.realpath(root) == os.path.realpath(self.ckpt_dir)
            if own:
                self.best.load(client.get("runx_best"))
                self._repair_best_pointer(root)
            elif client.get("runx_best"):
                # another run's best step is a checkpoint of that run, not of this one: imported, its summary
                # named a best step that `runx export --tag best` could not find here
                log.warning("resumed another run's checkpoint: %s starts afresh here (that run's best is in %s)",
                            self.best.key, root)
        return int(client["runx_step"])

    def _repair_best_pointer(self, root: str) -> None:
        """ckpt/best names the best step of the checkpoint resumed from (a save cut short before it was
        written left it naming an earlier one, or none), when that step's checkpoint is complete."""
        b = self.best.best_step
        if not self.is_main or b is None or not runtime.is_complete(root, f"step_{b}"):
            return
        best_file = os.path.join(root, "best")
        named = open(best_file).read().strip() if os.path.exists(best_file) else None
        if named != f"step_{b}":
            log.warning("ckpt/best named %s, not the best step of the checkpoint resumed (step_%d): corrected",
                        named or "nothing", b)
            atomic_write_bytes(best_file, f"step_{b}".encode())

    def _track_best(self, last_eval: dict) -> bool:
        """This evaluation's trainer.monitor value into the tracker (rank 0's value on every rank, so that all
        ranks take the same checkpoint and stopping decisions); True when it is the new best."""
        import torch.distributed as dist
        key = self.best.key
        if key not in last_eval:
            from runx.trainers.recipe import RecipeConfigError
            raise RecipeConfigError(f"trainer.monitor={key}: this run's evaluation does not report it. Valid "
                                    f"choices: {', '.join(sorted(last_eval))}, or null.")
        value = float(last_eval[key])
        if self.world_size > 1:
            t = torch.tensor([value], dtype=torch.float64,
                             device=torch.cuda.current_device() if self.device == "cuda" else "cpu")
            dist.broadcast(t, 0)
            value = float(t.item())
        return self.best.update(value, self.global_step)

    # ---------------------------------------------------------------- the run
    def planned_steps(self, n_train: int) -> int:
        """trainer.max_steps, or the steps of trainer.epochs passes over the n_train training samples."""
        t = self.tcfg
        epochs = t.get("epochs")
        if epochs is None:
            return int(t.max_steps)
        per_step = int(t.micro_batch_size) * int(t.grad_accum) * self.world_size
        steps = max(1, math.ceil(float(epochs) * n_train / per_step))
        log.info("trainer.epochs=%g: %d optimizer steps (%d training samples, %d per step)", float(epochs), steps,
                 n_train, per_step)
        return steps

    def loader(self, dataset, recipe, start_step: int, max_steps: int, shuffle=True, seed=None):
        t = self.tcfg
        lengths = None
        if shuffle and self.cfg.data.get("group_by_length"):
            lengths = token_lengths(dataset)
            if lengths is None:
                raise ValueError("data.group_by_length=true needs a tokenised text dataset (items with input_ids)")
        sampler = StepBatchSampler(len(dataset), int(t.micro_batch_size), int(t.grad_accum), self.world_size,
                                   self.rank, int(self.cfg.seed if seed is None else seed), start_step,
                                   max_steps, shuffle, lengths=lengths)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=recipe.collate,
                                           persistent_workers=False, **_loader_workers(t, self.device))

    def eval_loader(self, dataset, recipe, batch_size: int | None = None):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size or int(self.tcfg.micro_batch_size),
                                           shuffle=False, collate_fn=recipe.collate)

    def train_loader_for_estimation(self, n_batches: int, batch_size: int | None = None, by_length: bool = False):
        """This rank's share of the samples of the first `n_batches` global batches (for LoRA-GA's estimate).

        by_length: the same samples regrouped into micro-batches of similar length (less padding; for a
        per-sample mean loss the same sum of gradients). Global micro-batch j goes to rank j % world, so the
        micro-batches do not depend on the number of processes. Otherwise: the training order."""
        ds = self._train_ds
        lengths = token_lengths(ds) if by_length else None
        if lengths is None:
            return self.loader(ds, self.recipe, 0, n_batches)
        t = self.tcfg
        micro = int(t.micro_batch_size)
        s = StepBatchSampler(len(ds), micro, int(t.grad_accum), self.world_size, 0, int(self.cfg.seed), 0, n_batches)
        idx = [i for step in range(n_batches) for i in s.global_indices(step)]
        idx = [i for _, _, i in sorted((lengths[i], k, i) for k, i in enumerate(idx))]
        micro_batches = [idx[j:j + micro] for j in range(0, len(idx), micro)]
        mine = [b for j, b in enumerate(micro_batches) if j % self.world_size == self.rank]
        return torch.utils.data.DataLoader(ds, batch_sampler=mine, collate_fn=self.recipe.collate,
                                           **_loader_workers(t, self.device))

    def to_device(self, batch):
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v) for v in batch)
        return batch

    def fit(self, recipe) -> dict:
        import deepspeed
        import torch.distributed as dist

        t = self.tcfg
        self.recipe = recipe
        runtime.seed_everything(int(self.cfg.seed))
        # the data first: a problem in it stops the run before a large model loads; the model's init then draws
        # the same random numbers as it would have without the data built before it
        rng = runtime.rng_state()
        train_ds, eval_ds = recipe.build_data()
        if eval_ds is not None and len(eval_ds) == 0:   # (data.max_eval_samples=0) nothing to evaluate on
            eval_ds = None
        runtime.set_rng_state(rng)
        model = self._build_model(recipe)
        self._train_ds = train_ds
        resume = self.find_resume()
        if resume is None:
            runtime.seed_everything(int(self.cfg.seed) + 1)
            model = recipe.prepare(self, model)
        self.ds_config = self.build_ds_config(model)
        if self.is_main:  # the exact DeepSpeed config this run used, next to config.yaml
            atomic_write_json(os.path.join(self.run_dir, "ds_config.json"), redact(self.ds_config))
        groups = recipe.param_groups(model) or default_param_groups(model, float(self.cfg.optim.weight_decay),
                                                                        str(self.cfg.optim.name))
        if self.cfg.optim.get("head_lr") is not None:
            groups = with_head_lr(model, groups, float(self.cfg.optim.head_lr))
        optimizer = build_optimizer(self.cfg.optim, groups)
        max_steps = self.planned_steps(len(train_ds))
        sched_fn = lr_lambda(self.cfg.optim, max_steps)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched_fn))
        self.engine = engine   # from here on close() releases it, also after a failed run
        # DeepSpeed pickles engine.config into every checkpoint file: a secret in trainer.ds_overrides (a Comet
        # key) stayed there in clear. It reads only the config's keys after initialize.
        engine.config = redact(engine.config)
        keep_clipped_grad_norm(engine)
        start = 0
        if resume is not None:
            start = self.load_checkpoint(engine, *resume)
            log.info("resumed from %s/%s at step %d", resume[0], resume[1], start)
        recipe.after_engine(self, engine)
        self.global_step = start

        metrics_log = MetricsLog(os.path.join(self.run_dir, "metrics.jsonl"), resume_step=start) \
            if self.is_main else None
        if self.is_main and os.path.exists(os.path.join(self.run_dir, "summary.json")):
            # a finished run resumed for more steps: its summary describes the earlier end, and would mark this
            # run done (runx report, a sweep's failed-job list) if it stopped before writing its own
            os.remove(os.path.join(self.run_dir, "summary.json"))
        wb = WandbRun(self.cfg.logger, self.cfg, self.run_dir, os.path.basename(self.run_dir.rstrip("/")),
                      resumed=resume is not None) if self.is_main else None
        self._open_logs = (wb, metrics_log)   # close() ends them if the run fails
        loader = self.loader(train_ds, recipe, start, max_steps)
        eval_dl = self.eval_loader(eval_ds, recipe) if eval_ds is not None else None
        if self.best is not None and eval_dl is None:
            log.warning("trainer.monitor=%s: this run has no evaluation set (data.max_eval_samples=0?), so nothing "
                        "is monitored, no best checkpoint is kept and early stopping never triggers", self.best.key)
        flops_per_token = recipe.flops_per_token(getattr(engine, "module", engine))
        peak_tflops = runtime.device_peak_tflops()

        progress = None
        if self.is_main and t.progress:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console(), transient=False, refresh_per_second=4)
            task = progress.add_task(str(self.cfg.recipe.name), total=max_steps, completed=start, info="")
            progress.start()

        engine.train()
        last_eval: dict = {}
        micro_in_step, acc_loss, acc_metrics, samples, tokens = 0, 0.0, {}, 0, 0
        metric_keys_checked = False
        # the loop's settings as plain ints (an OmegaConf attribute read costs microseconds, several per step)
        grad_accum, eval_every, ckpt_every = int(t.grad_accum), int(t.eval_every or 0), int(t.ckpt_every or 0)
        stop_nonfinite = bool(t.get("stop_on_nonfinite_loss", True))
        log_every = max(1, int(t.log_every))
        step_t0 = time.perf_counter()
        if self.is_main:   # (train.log held nothing of a 1-process run: what a SLURM user reads)
            log.info("training %s on %d samples (%s held out): steps %d..%d, micro-batch %d x %d accumulation x %d "
                     "process(es); run dir %s", self.cfg.recipe.name, len(train_ds),
                     len(eval_ds) if eval_ds is not None else "none", start + 1, max_steps,
                     int(t.micro_batch_size), grad_accum, self.world_size, self.run_dir)
        # train_wall_s counts every segment of a resumed run up to its checkpoint, and this one
        self._loop_t0 = time.perf_counter() - self._prior_wall
        steps_done = 0
        batches = iter(loader)  # creating the iterator draws from the global RNG: do it before restoring it
        if self.best is not None and self.best.should_stop:    # resumed a run that had stopped early
            log.info("%s has not improved for %d evaluations (trainer.early_stop_patience=%d): no further steps",
                     self.best.key, self.best.bad_evals, self.best.patience)
            batches = iter(())
        if getattr(self, "_pending_rng", None) is not None:
            runtime.set_rng_state(self._pending_rng)
            self._pending_rng = None
        # SIGTERM (SLURM preemption, scancel), or the launching runx's request: save, then stop
        stop = runtime.StopOnSignal(runtime.parent_signal_file(self.run_dir)
                                    if os.environ.get("RUNX_WORKER") == "1" else None)
        try:
            for batch, norm in self._with_loss_norm(batches, recipe, grad_accum):
                if micro_in_step == 0:
                    recipe.on_step_start(self, engine, self.global_step)
                batch = self.to_device(batch)
                recipe.loss_norm = norm
                with engine_forward_context(engine):
                    loss, metrics = recipe.loss(engine, batch, self.global_step)
                recipe.loss_norm = None      # evaluation and anything else: each micro-batch's own mean
                engine.backward(loss)
                recipe.after_backward(self, engine, self.global_step)
                if micro_in_step + 1 == grad_accum:   # the lr this optimizer step applies (engine.step moves it on)
                    step_lr = scheduler.get_last_lr()[0] if scheduler is not None else float(self.cfg.optim.lr)
                engine.step()
                acc_loss += float(loss.detach())
                for k, v in metrics.items():
                    acc_metrics[k] = acc_metrics.get(k, 0.0) + float(v)
                samples += recipe.batch_size(batch)
                tokens += recipe.batch_tokens(batch)
                micro_in_step += 1
                if micro_in_step < grad_accum:
                    continue
                # ---- an optimizer step finished
                self.global_step += 1
                steps_done += 1
                micro_in_step = 0
                if self.device == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                # wall time between step ends: the previous step's bookkeeping (all-reduce, logging, progress)
                # counts, evaluation and checkpoint time below do not
                dt, step_t0 = now - step_t0, now
                # reduced on the device with several processes (NCCL cannot reduce CPU tensors); one process
                # skips the all-reduce (~50 us with gloo even alone) and the device round trip
                multi = self.world_size > 1
                # ... with the stop flag riding along: every rank stops after the same step if any got SIGTERM
                # ... and the recipe's metrics, the mean over ranks as the loss (a recipe's metric keys are the
                # same on every rank: they follow its config)
                keys = sorted(acc_metrics)
                if multi and not metric_keys_checked:   # once: tensors of different lengths would hang NCCL
                    every = [None] * self.world_size
                    dist.all_gather_object(every, keys)
                    if any(k != keys for k in every):
                        raise RuntimeError(f"the recipe's training metrics differ between ranks ({every}): "
                                           "recipe.loss must return the same keys on every rank")
                    metric_keys_checked = True
                red = torch.tensor([acc_loss / grad_accum, samples, tokens, float(stop.signalled),
                                    *(acc_metrics[k] for k in keys)], dtype=torch.float64,
                                   device=torch.cuda.current_device() if multi and self.device == "cuda" else "cpu")
                if multi:
                    dist.all_reduce(red)
                loss_sum, n_samples, n_tokens, n_stopping, *metric_sums = red.tolist()
                rec = {"step": self.global_step, "loss": loss_sum / self.world_size,
                       "lr": step_lr,
                       "samples_per_s": n_samples / dt, "step_time_s": dt}
                gn = engine.get_global_grad_norm()
                if gn is not None:
                    rec["grad_norm"] = float(gn)
                if n_tokens > 0:
                    rec["tokens_per_s"] = n_tokens / dt
                    if flops_per_token > 0:
                        tflops = n_tokens * flops_per_token / dt / 1e12 / self.world_size
                        rec["model_tflops_per_gpu"] = tflops
                        if peak_tflops:
                            rec["mfu"] = tflops / peak_tflops
                rec.update({k: v / grad_accum / self.world_size for k, v in zip(keys, metric_sums)})
                rec["peak_mem_gb"] = runtime.peak_memory_bytes(self.device) / 2**30
                if stop_nonfinite and not math.isfinite(rec["loss"]):   # the same reduced loss on every rank
                    self._diverged(rec, metrics_log, wb)
                improved = evaluated = False
                if eval_every and eval_dl is not None and (self.global_step % eval_every == 0
                                                             or self.global_step == max_steps):
                    evaluated = True
                    t_aside = time.perf_counter()
                    engine.eval()
                    with torch.no_grad(), engine_forward_context(engine, autocast=False):
                        last_eval = {f"eval/{k}": v for k, v in recipe.evaluate(engine, eval_dl).items()}
                    engine.train()
                    rec.update(last_eval)
                    if self.is_main:
                        log.info("step %d: %s", self.global_step, _metrics_line(last_eval))
                    if self.best is not None:
                        improved = self._track_best(last_eval)
                    step_t0 += time.perf_counter() - t_aside
                stop_early = self.best is not None and self.best.should_stop
                # (a step that evaluated is logged whatever log_every says, and so is the last one)
                if self.is_main and (self.global_step % log_every == 0 or evaluated or self.global_step == max_steps):
                    metrics_log.log(rec)
                    wb.log(rec, self.global_step)
                if progress is not None:
                    progress.update(task, completed=self.global_step,
                                    info=f"loss {rec['loss']:.4f} | {rec['samples_per_s']:.1f} samples/s")
                saved = bool(ckpt_every) and (self.global_step % ckpt_every == 0 or self.global_step == max_steps
                                              or improved or stop_early)
                if saved:
                    t_aside = time.perf_counter()
                    if metrics_log is not None:  # every line up to this checkpoint is on disk before it exists
                        metrics_log.flush()
                    self.save_checkpoint(engine, self.global_step, best=improved)
                    step_t0 += time.perf_counter() - t_aside
                if os.environ.get("RUNX_CRASH_AFTER_STEP") == str(self.global_step):
                    os._exit(17)  # a hard kill at a known point, for resume tests (no cleanup runs)
                acc_loss, acc_metrics, samples, tokens = 0.0, {}, 0, 0
                if n_stopping and self.global_step < max_steps:
                    if metrics_log is not None:
                        metrics_log.flush()
                    if not saved:
                        self.save_checkpoint(engine, self.global_step)
                    sync = wb.finish({}) if wb is not None else None   # the resumed run continues this W&B run
                    if stop.handing_over:   # a submitit job: submitit requeues it and exits this process
                        log.warning("checkpoint saved after step %d; asking submitit to requeue the job, which "
                                    "resumes from it", self.global_step)
                        stop.hand_over()
                    raise runtime.Stopped(f"stopped by {runtime.stop_cause(stop.signal_name, self.run_dir)} after step "
                                          f"{self.global_step}, checkpoint saved; "
                                          + runtime.resume_hint(self.cfg, self.run_dir)
                                          + (f". W&B so far: {sync}" if sync else ""))
                if stop_early:
                    log.info("early stop after step %d: %s has not improved on %.6g (step %d) for %d evaluations",
                             self.global_step, self.best.key, self.best.best, self.best.best_step,
                             self.best.bad_evals)
                    break
        finally:
            recipe.loss_norm = None
            stop.restore()
            if progress is not None:
                progress.stop()
        final = {"steps": self.global_step, "train_wall_s": time.perf_counter() - self._loop_t0}
        if steps_done == 0 and eval_dl is not None:  # resumed a finished run: evaluate once more
            engine.eval()
            with torch.no_grad(), engine_forward_context(engine, autocast=False):
                last_eval = {f"eval/{k}": v for k, v in recipe.evaluate(engine, eval_dl).items()}
        final.update(last_eval)
        if self.best is not None:
            final.update(self.best.summary())
            if self.best.should_stop:
                final["early_stopped_at"] = self.global_step
        if self.is_main:
            metrics_log.flush()
            hist = [r for r in _read(metrics_log.path)]
            if hist:
                final["final_loss"] = hist[-1]["loss"]
                final["first_loss"] = hist[0]["loss"]
                thr = [r["samples_per_s"] for r in hist[1:]] or [hist[0]["samples_per_s"]]
                final["samples_per_s"] = sorted(thr)[len(thr) // 2]
                final["peak_mem_gb"] = max(r["peak_mem_gb"] for r in hist)
                for key in ("tokens_per_s", "model_tflops_per_gpu", "mfu"):
                    vals = [r[key] for r in hist[1:] if key in r]
                    if vals:
                        final[key] = sorted(vals)[len(vals) // 2]
        final.update(recipe.final_metrics())
        if self.is_main:
            write_summary(self.run_dir, final)
            sync = wb.finish(final)
            metrics_log.close()
            self._open_logs = None
            log.info("finished: %s", _metrics_line(final), extra={"file_only": True})   # the console: the table below
            console().print(summary_table(f"runx {self.cfg.recipe.name} — {self.run_dir}", final))
            if sync:   # soft_wrap: a log file must keep the command on one line, to be pasted whole
                console().print(f"W&B run saved offline; upload it with: [bold]{sync}[/bold]", soft_wrap=True)
        return final

    def close(self) -> None:
        """Release the engine: its model, optimizer states and DeepSpeed's process-wide references to them
        (`ds_patches.release_engine`), so that the next job in this process starts with the memory this one
        started with. A Hydra sweep runs its jobs one after another in one process unless its launcher spawns
        them; before this, each finished ZeRO-3 job stayed allocated. Then this rank's NVMe swap files."""
        wb, metrics_log = getattr(self, "_open_logs", None) or (None, None)
        self._open_logs = None
        if wb is not None:   # a failed run's W&B run ends as failed: left open, the next job of an in-process
            try:             # sweep was handed it by wandb.init and logged its own curve into it
                wb.finish({}, exit_code=1)
            except Exception as e:   # (not in the way of the engine's release and the run's own error)
                log.warning("W&B: could not end the failed run's W&B run: %s", e)
        if metrics_log is not None:
            metrics_log.close()
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            from runx.trainers.ds_patches import release_engine
            release_engine(engine)
            del engine
            import gc
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()
        if self.swaps_to_nvme:
            from runx.trainers.nvme import remove_swap_files
            remove_swap_files(self.swap_dir, self.rank)

    def _with_loss_norm(self, batches, recipe, grad_accum: int):
        """(micro-batch, loss norm) in order. For a recipe whose loss is a mean over a varying number of items
        (`loss_items`: a causal LM's label tokens) each optimizer step's micro-batches are read ahead and their
        items summed over all ranks, so that every micro-batch's loss is its sum over world x grad_accum / that
        total: the step then trains on the mean over all of its tokens, as one large batch would (a mean of
        micro-batch means weighs a short micro-batch's tokens more; HF Trainer's num_items_in_batch). One
        all-reduce of one number per step, only for such recipes."""
        import torch.distributed as dist
        it = iter(batches)
        while True:
            group = list(itertools.islice(it, grad_accum))
            if not group:
                return
            counts = [recipe.loss_items(b) for b in group]
            norm = None
            if counts[0] is not None:
                total = torch.tensor([float(sum(counts))], dtype=torch.float64,
                                     device=torch.cuda.current_device() if self.world_size > 1
                                     and self.device == "cuda" else "cpu")
                if self.world_size > 1:
                    dist.all_reduce(total)
                n = float(total.item())
                norm = self.world_size * grad_accum / n if n > 0 else 0.0
            for b in group:
                yield b, norm

    def _diverged(self, rec: dict, metrics_log, wb) -> None:
        """A NaN / infinite training loss: log the step, end the W&B run, write the summary and stop without a
        checkpoint (the optimizer has already stepped on that gradient)."""
        step, sync = self.global_step, None
        if self.is_main:
            metrics_log.log(rec)
            metrics_log.flush()
            write_summary(self.run_dir, {"steps": step, "diverged_at": step})
            wb.log(rec, step)
            sync = wb.finish({"diverged_at": step}, exit_code=1)   # a failed W&B run, not a finished one
        latest = os.path.join(self.run_dir, "ckpt", "latest")
        saved = open(latest).read().strip() if os.path.exists(latest) else None
        gn = f", grad norm {rec['grad_norm']:.3g}" if "grad_norm" in rec else ""
        clip = float(self.tcfg.grad_clip)
        raise runtime.Diverged(
            f"the training loss is {rec['loss']} at step {step} (lr {rec['lr']:.3g}{gn}): the run diverged and "
            f"stopped without saving" + (f"; its last checkpoint is {saved}" if saved else "") + ". Lower "
            f"optim.lr, {'lower trainer.grad_clip (now ' + f'{clip:g})' if clip > 0 else 'set trainer.grad_clip'}, "
            f"or trainer.stop_on_nonfinite_loss=false to train on ({self.run_dir})"
            + (f". W&B: {sync}" if sync else ""))

    # ---------------------------------------------------------------- export
    def full_state_dict(self, engine) -> dict | None:
        """The full fp32 state dict on rank 0 (None elsewhere), gathered from ZeRO-3 partitions if needed."""
        module = engine.module
        if self.tcfg.zero_stage == 3:
            sd = engine._zero3_consolidated_16bit_state_dict()
            return {k: v.float() for k, v in sd.items()} if sd is not None else None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
            if self.is_main else None

    def export(self, engine, recipe, out_dir: str) -> None:
        sd = self.full_state_dict(engine)
        if self.is_main:
            recipe.export(engine.module, sd, out_dir)
            readable_like_open(out_dir)


def _read(path):
    import json
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                pass
