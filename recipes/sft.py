"""Full fine-tuning: sequence classification (cross-entropy on the label) or causal LM (next-token loss).

The baseline row every method recipe is compared against. The LM loss can use the fused linear
log-prob kernel (`recipe.fused_logprob=true`), which never materialises [tokens x vocab] logits.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from runx.recipes.text_data import (STDLIB_TOPICS, CausalLMDataset, ClassificationDataset, load_rows,
                                    pack_collate, pad_collate, resolve_chat_template)
from runx.trainers.hf import count_params, head_size_problem, load_model, load_tokenizer
from runx.trainers.recipe import RecipeConfigError, TrainingRecipe


def check_packed_attention(model, key: str = "data.packing") -> None:
    """Packing (`key`=true) relies on the model masking packed samples off from each other given restarting
    position ids (transformers' packed-sequence masking). Two short sequences, packed and apart, must give the
    same logits; a model whose attention ignores this (custom code, older architectures) is refused before
    training. Skipped for weights already partitioned (ZeRO-3 under zero.Init): they are not here to run."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_status") for p in params) or not params or params[0].device.type == "meta":
        return
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0)).to(params[0].device)
    pos = torch.cat([torch.arange(5), torch.arange(7)]).to(ids.device)[None]
    was = model.training
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
        apart = torch.cat([model(input_ids=ids[:, :5], use_cache=False).logits.float(),
                           model(input_ids=ids[:, 5:], use_cache=False).logits.float()], 1)
    model.train(was)
    tol = 1e-3 if params[0].dtype == torch.float32 else 5e-2
    diff = float((packed - apart).abs().max() / apart.abs().max().clamp_min(1e-6))
    if diff > tol:
        from runx.trainers.recipe import RecipeConfigError
        raise RecipeConfigError(f"{key}=true: {type(model).__name__} lets packed samples attend to each other "
                                f"(relative logit difference {diff:.2g} between packed and separate sequences). "
                                f"Valid values: {key}=false for this model.")


def check_positions(model, max_length: int, key: str = "data.max_length", warn: bool = True) -> None:
    """A model with learned position embeddings (BERT, GPT-2, OPT) cannot encode a sample longer than its
    max_position_embeddings: that is a config problem (it would fail with an index error, on a GPU a device-side
    assert, at the first long batch). Rotary models (Llama, Qwen) run past it, with a warning."""
    conf = getattr(model, "config", None)
    limit = getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None)
    if not isinstance(limit, int) or max_length <= limit:
        return
    learned = any(isinstance(m, torch.nn.Embedding) and ("position" in name or name.endswith(("wpe", "pos")))
                  for name, m in model.named_modules())
    if learned:
        from runx.trainers.recipe import RecipeConfigError
        raise RecipeConfigError(f"{key}={max_length}: {type(model).__name__} has learned position embeddings for "
                                f"{limit} tokens, so a longer sample cannot be encoded. Valid values: {key} <= {limit}.")
    if not warn:
        return
    import logging
    logging.getLogger("runx.sft").warning("%s=%d is beyond %s's max_position_embeddings (%d): samples that long run "
                                          "past the positions it was trained on", key, max_length,
                                          type(model).__name__, limit)


def model_config(model_cfg):
    """The model's transformers config (model.from_config, or the checkpoint's config.json: no weights read);
    None where it cannot be read here (a hub id not in the cache: the model's load reports that)."""
    try:
        import transformers
        from omegaconf import OmegaConf

        from runx.trainers.hf import resolve_path
        if model_cfg.get("from_config"):
            conf = dict(OmegaConf.to_container(model_cfg.from_config, resolve=True))
            return transformers.AutoConfig.for_model(conf.pop("model_type"), **conf)
        return transformers.AutoConfig.from_pretrained(resolve_path(str(model_cfg.path)),
                                                       trust_remote_code=bool(model_cfg.get("trust_remote_code")))
    except Exception:
        return None


def meta_skeleton(model_cfg, conf=None, num_labels: int | None = None):
    """The model's modules on the meta device (no memory, no weights), from its config; None where it cannot be
    built here. For the recipes' constructors, which `runx validate` runs: checks that need the layers' shapes."""
    conf = conf or model_config(model_cfg)
    if conf is None:
        return None
    try:
        import transformers
        auto = {"seq_cls": transformers.AutoModelForSequenceClassification,
                "causal_lm": transformers.AutoModelForCausalLM}.get(str(model_cfg.get("kind")), transformers.AutoModel)
        if num_labels is not None and model_cfg.get("kind") == "seq_cls":
            import copy
            conf = copy.deepcopy(conf)   # (the caller's config stays as read)
            conf.num_labels = num_labels
        with torch.device("meta"):
            return auto.from_config(conf)
    except Exception:
        return None


def check_positions_from_config(model_cfg, max_length: int, key: str = "data.max_length", conf=None) -> None:
    """check_positions before any weight is read (the recipe's constructor, which `runx validate` runs too): the
    checkpoint's config gives the position limit; only when max_length is beyond it is the model's skeleton built
    on the meta device to see whether its positions are learned. Best effort: a config that cannot be read here
    leaves the check to check_positions once the model is built. `conf`: model_config(model_cfg), when read."""
    conf = conf or model_config(model_cfg)
    limit = getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None)
    if not isinstance(limit, int) or max_length <= limit:
        return
    skeleton = meta_skeleton(model_cfg, conf)
    if skeleton is not None:
        check_positions(skeleton, max_length, key, warn=False)   # (the warning comes once the model is built)


def check_fused_head(conf, key: str = "recipe.fused_logprob") -> None:
    """The fused log-prob head computes log softmax(h W^T / T) from the decoder's hidden states. A model whose
    logits are transformed after the head (Gemma-2's final_logit_softcapping, Cohere's logit_scale, Granite's
    logits_scaling) would be trained and scored on another distribution than the one it samples from and is
    evaluated with: refused. `conf`: the model's transformers config (None: not readable here, no check)."""
    if conf is None:
        return
    found = [f"{name}={getattr(conf, name)}" for name, neutral in
             (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0))
             if getattr(conf, name, neutral) not in (neutral, None)]
    if found:
        raise ValueError(f"{key}=true: this model ({conf.model_type}) transforms its logits after the output "
                         f"layer ({', '.join(found)}), which the fused log-prob head leaves out. "
                         f"Valid choices: {key}=false.")


def causal_lm_tokenizer(model_cfg):
    """The tokenizer of a causal LM, which must have an end-of-sequence token (appended to every sample, and
    the padding when the tokenizer has none)."""
    tok = load_tokenizer(model_cfg)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer of {model_cfg.get('tokenizer') or model_cfg.path} has no eos_token, "
                         f"which a causal LM needs to end samples; set model.tokenizer=<a tokenizer with one>")
    return tok


class ExportsTokenizer:
    """Mixin for recipes with a `self.tokenizer`: the export folder gets the tokenizer beside the weights."""

    def export(self, model, state_dict, out_dir):
        super().export(model, state_dict, out_dir)
        self.tokenizer.save_pretrained(out_dir)


class SFT(ExportsTokenizer, TrainingRecipe):
    throughput_unit = "tokens"

    def export(self, model, state_dict, out_dir):
        """A classifier's config names its classes (id2label: the label names of the training data)."""
        self.name_classes(getattr(getattr(model, "module", model), "config", None))
        super().export(model, state_dict, out_dir)

    def class_names(self, whole_head: bool = True) -> list[str] | None:
        """A classifier's class names: its training data's label names (saved by build_data), else None.
        `whole_head`: only when they name every output of the head (for id2label); else also when the head has
        more outputs than the data had classes (a numbering to keep)."""
        path = os.path.join(self.run_dir, ".runx", "label_names.json")
        if self.task != "cls" or not os.path.exists(path):
            return None
        with open(path) as f:
            names = [str(n) for n in json.load(f)]
        return names if len(names) == self.num_labels or not whole_head and len(names) <= self.num_labels else None

    def checkpoint_classes(self, rows) -> list[str] | None:
        """A classifier checkpoint's own class names (id2label), in its order, when the training rows' labels are
        names it has: fine-tuning that head keeps its numbering (sorted names scrambled it: roberta-large-mnli's
        contradiction/neutral/entailment head trained on entailment=0). None for a new head, default LABEL_i
        names, or class ids; names the checkpoint lacks are a warning (numbered in sorted order then)."""
        conf = self.hf_config
        if conf is None or self.cfg.model.get("from_config") or self.cfg.model.get("ignore_mismatched_sizes"):
            return None
        names = [str(conf.id2label[i]) for i in sorted(getattr(conf, "id2label", None) or {})]
        if len(names) != self.num_labels or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            return None
        from runx.recipes.text_data import _class_id
        field = self.cfg.data.label_field
        labels = {str(r[field]) for r in rows if field in r and r[field] is not None and _class_id(r[field]) is None}
        if not labels:
            return None
        if labels <= set(names):
            return names
        import logging
        logging.getLogger("runx.sft").warning(
            "model.path=%s names its classes %s; the data's labels %s are not all among them, so the classes are "
            "numbered in sorted order and the head's outputs are retrained under those numbers", self.cfg.model.path,
            ", ".join(names), ", ".join(sorted(labels - set(names))[:5]))
        return None

    def name_classes(self, conf) -> None:
        """Set a model config's id2label / label2id from class_names() (exported configs name the classes)."""
        names = self.class_names()
        if names and conf is not None:
            conf.id2label = dict(enumerate(names))
            conf.label2id = {n: i for i, n in enumerate(names)}

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir)
        task = cfg.recipe.task
        self.task = task if task != "auto" else ("lm" if cfg.model.kind == "causal_lm" else "cls")
        if self.task == "cls" and cfg.model.kind != "seq_cls":
            raise ValueError(f"recipe.task=cls needs model.kind=seq_cls (got {cfg.model.kind})")
        self.tokenizer = causal_lm_tokenizer(cfg.model) if self.task == "lm" else load_tokenizer(cfg.model)
        self.hf_config = model_config(cfg.model)   # (read once for the constructors' checks; None: not here)
        check_positions_from_config(cfg.model, int(cfg.data.max_length), conf=self.hf_config)
        if self.task == "lm" and cfg.recipe.get("fused_logprob"):
            check_fused_head(self.hf_config)
        if self.task == "lm" and cfg.data.get("chat_template"):   # trained with it: exported with it
            self.tokenizer.chat_template = resolve_chat_template(cfg.data.chat_template, self.tokenizer, "")
        self.num_labels = len(STDLIB_TOPICS) if cfg.data.kind == "builtin" else int(cfg.model.num_labels)
        if self.task == "cls" and cfg.data.kind == "builtin" and int(cfg.model.num_labels) != self.num_labels:
            import logging
            logging.getLogger("runx.sft").warning(
                "model.num_labels=%s is not used: the built-in data has %d classes, so the head has %d",
                cfg.model.num_labels, self.num_labels, self.num_labels)
        if self.task == "cls":
            problem = head_size_problem(cfg.model, self.num_labels)
            if problem:
                raise RecipeConfigError(problem)

    # -------------------------------------------------------------- model and data
    def build_model(self):
        model = load_model(self.cfg.model, num_labels=self.num_labels, tokenizer=self.tokenizer)
        check_positions(model, int(self.cfg.data.max_length))
        if self.task == "lm" and self.cfg.data.get("packing"):
            check_packed_attention(model)
        return model

    def build_data(self):
        d = self.cfg.data
        train, evals = load_rows(d, int(self.cfg.seed))
        if self.task == "cls":
            # a finished run's data (runx eval): its classes keep the numbers the run trained with, whatever
            # labels the evaluation file happens to hold
            trained = self.class_names(whole_head=False) if self.serving_run else self.checkpoint_classes(train)
            train_ds = ClassificationDataset(train, self.tokenizer, d.text_field, d.label_field, d.max_length,
                                             self.num_labels, trained)
            eval_ds = ClassificationDataset(evals, self.tokenizer, d.text_field, d.label_field, d.max_length,
                                            self.num_labels, trained or train_ds.label_names, "held-out") \
                if evals else None
            names = STDLIB_TOPICS if d.kind == "builtin" else train_ds.label_names
            if names and os.path.isdir(self.run_dir) and not self.serving_run:   # the exported id2label
                from runx.trainers.datajob import atomic_write_json
                atomic_write_json(os.path.join(self.run_dir, ".runx", "label_names.json"), list(names))
            return train_ds, eval_ds
        mk = lambda rows: CausalLMDataset(   # noqa: E731
            rows, self.tokenizer, d.text_field, d.max_length, d.prompt_field, d.response_field,
            messages_field=d.messages_field, train_on_prompt=d.train_on_prompt,   # the tokenizer carries
            source=self.cfg.model.get("tokenizer") or self.cfg.model.path)      # data.chat_template (__init__)
        return mk(train), (mk(evals) if evals else None)

    def collate(self, items):
        if self.task == "lm" and self.cfg.data.get("packing"):
            return pack_collate(self.tokenizer.pad_token_id, int(self.cfg.data.max_length))(items)
        return pad_collate(self.tokenizer.pad_token_id)(items)

    @staticmethod
    def lm_inputs(batch) -> dict:
        """The model's inputs for a causal LM batch: a packed one (position_ids) goes without attention_mask
        and without a KV cache, so that transformers masks each packed sample off from the others."""
        if "position_ids" in batch:
            return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # -------------------------------------------------------------- loss
    def loss(self, model, batch, step):
        if self.task == "cls":
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = F.cross_entropy(out.logits.float(), batch["labels"])
            acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
            return loss, {"acc": float(acc)}
        return self.lm_loss(model, batch), {}

    def loss_items(self, batch):
        """A causal LM's loss is a mean over label tokens, whose number varies between micro-batches."""
        return int((batch["labels"][:, 1:] != -100).sum()) if self.task == "lm" else None

    def lm_loss(self, model, batch):
        """Mean next-token NLL over the micro-batch's label tokens; in the training loop (`loss_norm` set) its
        sum scaled so that the optimizer step averages over all of the step's tokens on all ranks."""
        labels = batch["labels"][:, 1:]
        norm = self.loss_norm
        if self.cfg.recipe.get("fused_logprob"):
            # mean next-token NLL = sum_i w_i log p_i with w_i = -1/n: the head's gradient is made in its forward
            # (6·N·H·V FLOPs, no [N, V] logits), called through the head module so that ZeRO-3 gathers it
            from runx.kernels import linear_logprob_weighted_sum
            from runx.trainers.hf import through_module
            body = getattr(model, "module", model)
            hidden = body.get_decoder()(**self.lm_inputs(batch)).last_hidden_state[:, :-1]
            head = body.get_output_embeddings()
            t = labels.reshape(-1)
            w = torch.full(t.shape, -(norm if norm is not None else 1.0 / max(1, int((t != -100).sum()))),
                           device=t.device)
            return through_module(head, lambda h: linear_logprob_weighted_sum(
                h, head.weight, t, w, bias=getattr(head, "bias", None), chunk=self.cfg.recipe.get("logprob_chunk"),
                dw_accum=self.cfg.recipe.logprob_dw_accum),
                hidden.reshape(-1, hidden.shape[-1]))
        out = model(**self.lm_inputs(batch))
        logits = out.logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                              reduction="sum")
        if norm is not None:
            return nll * norm
        return nll / (labels != -100).sum().clamp_min(1)   # a micro-batch with no label gives 0, not NaN

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model, loader):
        device = next(getattr(model, "module", model).parameters()).device
        tot_loss, tot_n, correct = 0.0, 0, 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            if self.task == "cls":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                tot_loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
                tot_n += len(batch["labels"])
            else:
                n_tok = int((batch["labels"][:, 1:] != -100).sum())
                tot_loss += float(self.lm_loss(model, batch)) * n_tok
                tot_n += n_tok
        out = {"loss": tot_loss / max(1, tot_n)}
        if self.task == "cls":
            out["accuracy"] = correct / max(1, tot_n)
        else:
            out["perplexity"] = float(torch.exp(torch.tensor(out["loss"])))
        return out

    def batch_size(self, batch) -> int:
        """Samples in the micro-batch: with data.packing, the sequences that start in its rows (a row holds
        several), not its rows."""
        if "position_ids" in batch:
            return int(((batch["position_ids"] == 0) & (batch["attention_mask"] == 1)).sum())
        return len(batch["input_ids"])

    def batch_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def flops_per_token(self, model):
        """Model FLOPs per trained token: 2N forward and 2N for the activations' gradients over all N parameters,
        2N for the weights' gradients of the trainable ones only (full fine-tuning 6N; LoRA about 4N)."""
        return 4.0 * count_params(model) + 2.0 * count_params(model, trainable_only=True)
