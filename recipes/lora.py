"""Vanilla LoRA (Hu et al. 2021) through peft: W + (alpha/r)·B·A with A ~ Kaiming, B = 0.

The baseline of LoRA-GA; everything but the model wrapping is the SFT recipe.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from runx.recipes.sft import SFT
from runx.trainers.recipe import RecipeConfigError


def lora_target_modules(cfg_targets) -> list[str] | str:
    targets = list(OmegaConf.to_container(cfg_targets, resolve=True)) if not isinstance(cfg_targets, list) \
        else list(cfg_targets)
    return "all-linear" if targets in (["auto"], []) else targets


class LoRA(SFT):
    def peft_config(self):
        from peft import LoraConfig, TaskType
        r = self.cfg.recipe
        task = TaskType.SEQ_CLS if self.task == "cls" else TaskType.CAUSAL_LM
        return LoraConfig(r=int(r.rank), lora_alpha=float(r.alpha), lora_dropout=float(r.dropout),
                          target_modules=lora_target_modules(r.target_modules), task_type=task,
                          modules_to_save=None if (self.task == "cls" and r.train_head) else [],
                          use_rslora=r.get("scaling", "lora") == "rslora", use_dora=bool(r.get("use_dora", False)))

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        # the adapter placed on the model's skeleton (meta device, no weights): recipe.target_modules (and LoRA-GA's
        # rank) checked where `runx validate` sees them, not only once the model is loaded
        from runx.recipes.sft import meta_skeleton
        skeleton = meta_skeleton(cfg.model, self.hf_config, num_labels=self.num_labels)
        if skeleton is None:
            return
        import torch
        try:
            with torch.device("meta"):
                wrapped = self.wrap(skeleton)
        except RecipeConfigError:
            raise
        except Exception:   # best effort: the real model's build checks the same
            return
        self.check_adapter(wrapped)

    def check_adapter(self, peft_model) -> None:
        """Checks of the wrapped model that need its layers (LoRA-GA: the rank against their sizes)."""

    def wrap(self, model):
        """`model` with the LoRA adapter (peft); target modules peft finds no match for are a config problem."""
        import torch
        from peft import get_peft_model
        cfg = self.peft_config()
        wanted = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
        # a classifier's head (classifier / score) is trained whole (recipe.train_head), never adapted
        head = {"classifier", "score"} if self.task == "cls" else set()
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                        and not set(n.split(".")) & head})
        try:
            wrapped = get_peft_model(model, cfg)
        except ValueError as e:   # peft's NoMatchingPeftModuleError and its other target checks
            raise RecipeConfigError(f"recipe.target_modules={wanted}: {str(e).splitlines()[0]} Valid choices: auto "
                                    f"(every linear layer), or names among {', '.join(names)}.") from e
        if not isinstance(wanted, str):   # a list: every name must have got an adapter
            from peft.tuners.lora import LoraLayer
            adapted = [n for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)]
            idle = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in adapted)]
            heads = [t for t in idle if t.rsplit(".", 1)[-1] in head]
            if heads:   # (peft matched them, but a head it trains whole gets none: dropped without a word)
                raise RecipeConfigError(
                    f"recipe.target_modules={wanted}: {', '.join(heads)} is the classifier's head, which is trained "
                    f"whole (recipe.train_head), not adapted. Valid choices: auto (every linear layer), or names "
                    f"among {', '.join(names)}.")
            if idle:   # a list shared across models (q_proj on a BERT): peft adapts the names this model has
                import logging
                logging.getLogger("runx.lora").warning(
                    "recipe.target_modules: %s match no layer of this model (its linear layers: %s); the others "
                    "get the adapter", ", ".join(idle), ", ".join(names))
        return wrapped

    def build_model(self):
        peft_model = self.wrap(super().build_model())
        if self.task == "lm" and self.cfg.recipe.get("fused_logprob"):
            from peft.tuners.lora import LoraLayer
            head = peft_model.get_base_model().get_output_embeddings()
            if isinstance(head, LoraLayer):
                raise RecipeConfigError(
                    "recipe.fused_logprob=true with a LoRA adapter on the output layer (recipe.target_modules): the "
                    "fused log-prob kernel reads the layer's base weight, so the adapter would be skipped (not "
                    "trained; LoRA-GA's offset base uncorrected). Valid choices: recipe.fused_logprob=false, or "
                    "recipe.target_modules without the output layer")
        if self.task == "cls" and not self.cfg.recipe.train_head:
            # peft wraps a classifier's head (classifier / score) as trainable whatever modules_to_save says
            # (PeftModelForSequenceClassification adds them): train_head=false froze nothing
            for name, p in peft_model.named_parameters():
                if ".modules_to_save." in name:
                    p.requires_grad_(False)
        return peft_model

    def export(self, model, state_dict, out_dir):
        """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) + the tokenizer.

        A base model built from a config (no checkpoint to point at) is saved beside it in `base/`,
        and the adapter's base_model_name_or_path points there, so the folder loads on its own."""
        import json
        import os
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        names = self.class_names()
        if self.cfg.model.get("from_config"):
            base_dir = os.path.abspath(os.path.join(out_dir, "base"))
            base_sd = base_state_dict(state_dict)
            base = SFT.build_model(self)
            self.name_classes(base.config)     # the base's config names the classes (id2label)
            base.save_pretrained(base_dir, state_dict=base_sd, safe_serialization=True)
            conf_path = os.path.join(out_dir, "adapter_config.json")
            conf = json.load(open(conf_path))
            conf["base_model_name_or_path"] = base_dir
            json.dump(conf, open(conf_path, "w"), indent=2)
        elif self.task == "cls":   # the pretrained base's config has no head of this size: say how to load it
            from runx.trainers.datajob import atomic_write_bytes
            labels = (f"id2label={dict(enumerate(names))!r},\n      label2id={ {n: i for i, n in enumerate(names)}!r}"
                      if names else f"num_labels={self.num_labels}")
            atomic_write_bytes(os.path.join(out_dir, "README.txt"), (
                "A PEFT LoRA adapter with a sequence-classification head of "
                f"{self.num_labels} labels. Load it with\n"
                "  from peft import AutoPeftModelForSequenceClassification\n"
                f"  model = AutoPeftModelForSequenceClassification.from_pretrained(\n      <this folder>, "
                f"{labels})\n").encode())


def base_state_dict(peft_state_dict: dict) -> dict:
    """The frozen base model's weights inside a PeftModel state dict, under the base model's own names."""
    out = {}
    for k, v in peft_state_dict.items():
        if "lora_" in k or ".modules_to_save." in k:
            continue
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
        out[k] = v
    return out
