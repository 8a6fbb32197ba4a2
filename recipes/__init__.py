"""The recipes runx knows. Importing this package is cheap: each recipe module is imported only when run.

kind "train": a TrainingRecipe run by the DeepSpeed trainer (runx.trainers.deepspeed_trainer).
kind "data":  a DataJob of sharded, resumable stages (runx.trainers.datajob).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    kind: str            # "train" | "data"
    module: str          # module holding the recipe class
    cls: str             # class name inside the module
    schema: str          # "module:DataclassName" of the `recipe:` section
    description: str
    paper: str = ""
    eval_metrics: tuple = ()   # names its evaluation can report (as eval/<name>): what trainer.monitor may name
    input_keys: str = ""       # a data job's own keys for its input (it reads no data.* key)
    model_keys: str = ""       # a data job's own keys for the models it loads (it loads no model.* model)
    zero_stages: tuple = (0, 1, 2, 3)   # the ZeRO stages its training runs under (runx plan offers only those)
    # a training recipe's data sources: (data.kind, the data.name values it reads for that kind, () = any name)
    data_sources: tuple = ()

    def data_problem(self, kind, name) -> str | None:
        """The problem with data.kind / data.name for this recipe, or None."""
        names = dict(self.data_sources)
        if not self.data_sources or (kind in names and (not names[kind] or name in names[kind])):
            return None
        choices = ", ".join(f"{k} (data.name={'|'.join(n)})" if n else k for k, n in self.data_sources)
        return (f"data.kind={kind} data.name={name}: not a data source of recipe={self.name}. Valid choices: "
                f"data.kind={choices}")

    def load(self):
        return getattr(importlib.import_module(self.module), self.cls)

    def load_schema(self):
        mod, name = self.schema.split(":")
        return getattr(importlib.import_module(mod), name)


TEXT_SOURCES = (("builtin", ("stdlib_topics", "tiny_text")), ("jsonl", ()), ("parquet", ()), ("csv", ()), ("hf", ()))

RECIPES: dict[str, RecipeInfo] = {r.name: r for r in [
    RecipeInfo("sft", "train", "runx.recipes.sft", "SFT", "runx.conf.schema.baselines:SFTConfig",
               "Full fine-tuning (causal LM or sequence classification): the baseline row.",
               eval_metrics=("loss", "accuracy", "perplexity"), data_sources=TEXT_SOURCES),
    RecipeInfo("lora", "train", "runx.recipes.lora", "LoRA", "runx.conf.schema.baselines:LoRAConfig",
               "Vanilla LoRA through peft: the baseline for LoRA-GA.", eval_metrics=("loss", "accuracy", "perplexity"),
               data_sources=TEXT_SOURCES),
    RecipeInfo("lora_ga", "train", "runx.recipes.lora_ga", "LoRAGA", "runx.conf.schema.lora_ga:LoRAGAConfig",
               "LoRA with A/B initialised from the SVD of the estimated full fine-tuning gradient.",
               "Wang, Yu, Li 2024 (arXiv 2407.05000)", eval_metrics=("loss", "accuracy", "perplexity"),
               data_sources=TEXT_SOURCES),
    RecipeInfo("verifree", "train", "runx.recipes.verifree", "VeriFree", "runx.conf.schema.verifree:VeriFreeConfig",
               "Verifier-free RL: reward = policy's probability of the reference answer after its reasoning.",
               "Zhou et al. 2025 (arXiv 2505.21493)",
               eval_metrics=("acc", "acc_sampled", "no_tag_frac", "response_len"),
               data_sources=(("generated", ("verifree_arith",)), ("jsonl", ()), ("parquet", ()), ("csv", ()),
                             ("hf", ()))),
    RecipeInfo("swav", "train", "runx.recipes.swav", "SwAV", "runx.conf.schema.swav:SwAVConfig",
               "Self-supervised image pretraining: multi-crop + Sinkhorn-Knopp swapped prediction.",
               "Caron et al. 2020 (arXiv 2006.09882)",
               eval_metrics=("knn_acc", "linear_acc", "assign_entropy", "prototypes_used", "z_std", "feature_std"),
               data_sources=(("generated", ("shapes", "shapes_gray", "shapes_colour", "digits", "synthetic")),
                             ("imagefolder", ()), ("hf", ())), zero_stages=(0, 1, 2)),
    RecipeInfo("preselect", "data", "runx.recipes.preselect", "PreSelect", "runx.conf.schema.preselect:PreSelectConfig",
               "Score docs by how well model losses predict model ranking; fastText filter; filter a corpus.",
               "Shum et al. 2025 (arXiv 2503.00808)",
               input_keys="recipe.pool=<file|folder|glob> recipe.sample=<file|folder|glob>",
               model_keys="recipe.references=[{name, kind: hf, path: <id or folder>, score}, ...]"),
    RecipeInfo("concept_prune", "data", "runx.recipes.concept_prune", "ConceptPrune",
               "runx.conf.schema.concept_prune:ConceptPruneConfig",
               "Embed, SemDeDup, cluster; complexity-weighted cluster quotas; keep least prototypical samples.",
               "Abbas et al. ICLR 2024 (arXiv 2401.04578)",
               input_keys="recipe.input=embeddings|text|images recipe.path=<file|folder|glob>",
               model_keys="recipe.encoder=<id or folder> (recipe.encoder_weights for images)"),
]}
