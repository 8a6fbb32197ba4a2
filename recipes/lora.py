"""Vanilla LoRA (Hu et al. 2021) through peft: W + (alpha/r)·B·A with A ~ Kaiming, B = 0.

The baseline of LoRA-GA; everything but the model wrapping is the SFT recipe.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from runx.recipes.sft import SFT


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
                          modules_to_save=None if (self.task == "cls" and r.train_head) else [])

    def build_model(self):
        from peft import get_peft_model
        model = super().build_model()
        cfg = self.peft_config()
        if self.task == "cls" and not self.cfg.recipe.train_head:
            cfg.modules_to_save = []
        return get_peft_model(model, cfg)

    def export(self, model, state_dict, out_dir):
        """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) + the tokenizer."""
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
