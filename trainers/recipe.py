"""The contract between a training recipe and the DeepSpeed trainer.

A recipe knows the paper (model, data, loss, evaluation); the trainer knows DeepSpeed (engine, ZeRO,
offload, loop, checkpoints, metrics) and never a recipe's internals. Override what you need:

    class MyMethod(TrainingRecipe):
        def build_model(self): ...                 # an nn.Module (HF model, peft model, torchvision net)
        def build_data(self): ...                  # (train Dataset, eval Dataset or None)
        def loss(self, model, batch, step): ...    # -> (scalar loss, {metric: float})
        def evaluate(self, model, loader): ...     # -> {metric: float}, called on every rank

Call order in Trainer.fit: build_model -> build_data -> prepare(trainer, model) [before the
DeepSpeed engine exists; distributed is initialised] -> deepspeed.initialize -> after_engine(engine)
-> loop {on_step_start, loss, backward, step} -> evaluate -> export on demand.
"""
from __future__ import annotations

from typing import Any


class TrainingRecipe:
    #: "tokens" or "samples": the unit of throughput in logs
    throughput_unit = "samples"

    #: True under `runx eval` / `runx export`: the recipe serves a finished run (build_data must number classes
    #: as the run did and leave the run dir as it is)
    serving_run = False

    def __init__(self, cfg, run_dir: str):
        self.cfg = cfg            # the whole resolved config (OmegaConf DictConfig)
        self.run_dir = run_dir

    # ---- building ---------------------------------------------------------------------------
    def build_model(self):
        raise NotImplementedError

    def build_data(self):
        """(train_dataset, eval_dataset | None): map-style torch Datasets."""
        raise NotImplementedError

    def collate(self, examples: list) -> Any:
        """Batch a list of dataset items (default: torch's default_collate)."""
        from torch.utils.data import default_collate
        return default_collate(examples)

    def model_init_context(self, trainer):
        """Context the model is built in. The trainer passes deepspeed.zero.Init for NVMe param offload."""
        import contextlib
        return contextlib.nullcontext()

    def needs_whole_weights_before_engine(self) -> bool:
        """True when prepare() reads or writes the model's full weights (e.g. a warm start from a state dict):
        the trainer then builds it whole under plain ZeRO-3 instead of already partitioned (see
        builds_partitioned)."""
        return False

    def param_groups(self, model) -> list[dict] | None:
        """Optimizer parameter groups; None = all trainable parameters in one group."""
        return None

    def prepare(self, trainer, model) -> Any:
        """Runs once before the DeepSpeed engine is built (e.g. LoRA-GA's gradient-SVD init).
        May return a replacement model. Skipped when resuming from a checkpoint (its state is in it)."""
        return model

    def after_engine(self, trainer, engine) -> None:
        """Runs once after deepspeed.initialize (and after a resume load)."""

    # ---- the loop -------------------------------------------------------------------------
    def on_step_start(self, trainer, engine, step: int) -> None:
        """Before each optimizer step's first micro-batch (e.g. SwAV normalises prototypes)."""

    def loss(self, model, batch, step: int):
        """(loss tensor, metrics dict of python floats) for one micro-batch. The metrics' keys are the same on
        every rank and micro-batch (the trainer logs each one's mean over the step's micro-batches and ranks)."""
        raise NotImplementedError

    # Set by the trainer around each optimizer step when `loss_items` counts: world x grad_accum / (the step's
    # items on all ranks). A loss that is a mean over a varying number of items (tokens) multiplies its sum by
    # it: after DeepSpeed's 1/grad_accum and the ranks' gradient average, the step's gradient is that of the
    # mean over all its items, not a mean of micro-batch means. None outside the training loop (evaluation,
    # LoRA-GA's estimate): the micro-batch's own mean.
    loss_norm: float | None = None

    def loss_items(self, batch) -> int | None:
        """How many items this micro-batch's loss averages over, when that number varies (a causal LM's label
        tokens); None: the loss is a per-sample mean over equal micro-batches and needs no step-wide norm."""
        return None

    def after_backward(self, trainer, engine, step: int) -> None:
        """After backward, before the optimizer step (e.g. SwAV zeroes prototype grads while frozen)."""

    def evaluate(self, model, loader) -> dict:
        return {}

    def batch_size(self, batch) -> int:
        """Samples in a micro-batch (for samples/s)."""
        if isinstance(batch, dict):
            return len(next(iter(batch.values())))
        if isinstance(batch, (list, tuple)):
            return len(batch[0])
        return len(batch)

    def batch_tokens(self, batch) -> int:
        """Tokens in a micro-batch (for tokens/s and model FLOPs); 0 if not a token model."""
        if isinstance(batch, dict) and "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return 0

    def flops_per_token(self, model) -> float:
        """Training FLOPs per token (6N by default for transformers; 0 = unknown: no MFU)."""
        return 0.0

    # ---- saving -------------------------------------------------------------------------
    def export(self, model, state_dict: dict, out_dir: str) -> None:
        """Write user-loadable weights (HF safetensors / PEFT adapter) from a full fp32 state dict, in the
        model's dtype (a bf16 model's export is bf16, as its config.json says, not fp32 at twice the size)."""
        import torch
        if self.cfg.get("model") is not None and self.cfg.model.get("dtype") == "bf16":
            state_dict = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state_dict.items()}
        unwrapped = getattr(model, "module", model)
        unwrapped.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)

    def final_metrics(self) -> dict:
        """Extra numbers for the end-of-run summary."""
        return {}


HF_KINDS = ("causal_lm", "seq_cls")   # model kinds built by transformers (from_pretrained / from_config)


def params_on_nvme(cfg) -> bool:
    """Whether DeepSpeed keeps the parameters on NVMe (ZeRO-Infinity; also "nvme_in_cpu"): such a model is always
    built partitioned."""
    from runx.trainers.nvme import deepspeed_param_device
    t = cfg.trainer
    return deepspeed_param_device(int(t.zero_stage), str(t.offload_param), str(t.offload_optimizer)).startswith("nvme")


def builds_partitioned(cfg, recipe) -> bool:
    """Whether the trainer builds the model already partitioned (ZeRO-3's zero.Init, through transformers'
    HfDeepSpeedConfig), so that no rank ever holds the whole model: always for NVMe parameter offload; for any
    other ZeRO-3 run of a Hugging Face model unless the recipe needs whole weights before the engine. Built
    whole, DeepSpeed would first move the entire model to each GPU (`module.to(device)` in the engine's init)
    and only then partition it: a 13B bf16 model needs 26 GB per GPU there, whatever ZeRO-3 saves later."""
    if params_on_nvme(cfg):
        return True
    return int(cfg.trainer.zero_stage) == 3 and zero3_builds_partitioned(cfg, recipe)


def zero3_builds_partitioned(cfg, recipe) -> bool:
    """Under ZeRO-3 (without NVMe) the model is built partitioned: a Hugging Face model whose recipe does not
    need whole weights before the engine."""
    return cfg.model.get("kind") in HF_KINDS and not recipe.needs_whole_weights_before_engine()


class RecipeConfigError(ValueError):
    """A ValueError raised while a recipe is built from the config (its cross-key checks run in the
    constructor, before any model or data is loaded): reported as a config problem, without a traceback."""


def build_recipe(cls, cfg, run_dir: str):
    """``cls(cfg, run_dir)``, its ValueErrors turned into RecipeConfigError (RUNX_TRACEBACK=1 keeps them raw)."""
    import os
    try:
        return cls(cfg, run_dir)
    except RecipeConfigError:
        raise
    except ValueError as e:
        if os.environ.get("RUNX_TRACEBACK"):
            raise
        raise RecipeConfigError(str(e)) from e
    except OSError as e:      # a hub id that cannot be fetched (offline, no network) is a config problem too
        from runx.trainers.hf import hub_unreachable
        problem = hub_unreachable(e, cfg)
        if problem is None or os.environ.get("RUNX_TRACEBACK"):
            raise
        raise RecipeConfigError(problem) from e
