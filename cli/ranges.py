"""Value ranges of the numeric keys that a bad value would otherwise break only mid-run (a zero batch, a
negative learning rate, a keep fraction above 1), and the value checks that span two keys. Checked by
`validate` after the types, each problem naming the key, the value and the valid values.
"""
from __future__ import annotations

import math
import os


class Range:
    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False, none_ok=False):
        self.lo, self.hi, self.lo_open, self.hi_open, self.none_ok = lo, hi, lo_open, hi_open, none_ok

    def ok(self, v) -> bool:
        if v is None:
            return self.none_ok
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return True  # a type problem (nan, inf included), reported by the type check
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def text(self) -> str:
        if self.hi is None:
            s = f"{'>' if self.lo_open else '>='} {self.lo}"
        else:
            s = f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        return s + (" or null" if self.none_ok else "")


POS = Range(0, lo_open=True)            # > 0
NONNEG = Range(0)                       # >= 0
COUNT = Range(1)                        # >= 1
PROB = Range(0, 1)                      # [0, 1]
FRACTION = Range(0, 1, hi_open=True)    # [0, 1)
SHARE = Range(0, 1, lo_open=True)       # (0, 1]

# key -> range for every recipe
COMMON = {
    "optim.lr": POS, "optim.head_lr": Range(0, lo_open=True, none_ok=True), "optim.weight_decay": NONNEG,
    "optim.eps": POS, "optim.momentum": FRACTION, "optim.warmup_steps": NONNEG, "optim.warmup_ratio": FRACTION,
    "optim.min_lr_ratio": PROB, "optim.lars_eta": POS,
    "trainer.micro_batch_size": COUNT, "trainer.grad_accum": COUNT, "trainer.max_steps": COUNT,
    "trainer.epochs": Range(0, lo_open=True, none_ok=True),
    "trainer.eval_every": NONNEG, "trainer.log_every": COUNT, "trainer.ckpt_every": NONNEG,
    "trainer.keep_last": COUNT, "trainer.early_stop_patience": NONNEG, "trainer.early_stop_min_delta": NONNEG,
    "trainer.grad_clip": NONNEG, "trainer.num_procs": COUNT,
    "trainer.dataloader_workers": NONNEG,
    "data.val_fraction": FRACTION, "data.max_length": COUNT, "data.max_train_samples": Range(1, none_ok=True),
    "data.max_eval_samples": Range(0, none_ok=True),   # 0: no evaluation; null: every held-out sample
    "model.num_labels": COUNT, "launcher.num_nodes": COUNT,
    "launcher.master_port": Range(0, 65535),   # 0: a free port (one node) or torchrun's 29500 (several)
    "plan.gpus": Range(-1),   # -1: this machine; N: a described machine with N GPUs per node
}
_CHUNK = {"logprob_chunk": Range(1, none_ok=True)}
_LORA = {"rank": COUNT, "alpha": POS, "dropout": FRACTION, **_CHUNK}
# recipe name -> {key under recipe.: range}
RECIPE = {
    "sft": _CHUNK,
    "lora": _LORA,
    "lora_ga": {**_LORA, "grad_batches": COUNT, "stable_gamma": POS, "svd_niter": NONNEG},
    "verifree": {"group_size": COUNT, "temperature": NONNEG, "top_p": SHARE, "max_new_tokens": COUNT,
                 "kl_coef": NONNEG, "vllm_gpu_memory_utilization": SHARE, "rollout_chunk": NONNEG,
                 **_CHUNK, "eval_samples": NONNEG, "warmup_steps": NONNEG,
                 "warmup_examples": NONNEG, "warmup_batch_size": COUNT, "warmup_lr": POS,
                 "warmup_corrupt_fraction": PROB, "eval_max_new_tokens": Range(1, none_ok=True),
                 "task_steps": COUNT, "task_max_operand": COUNT, "task_train_size": COUNT, "task_eval_size": COUNT},
    "swav": {"flip_prob": PROB, "color_jitter_prob": PROB, "grayscale_prob": PROB, "blur_prob": PROB,
             "feat_dim": COUNT, "nmb_prototypes": Range(2), "temperature": POS, "epsilon": POS,
             "hidden_mlp": NONNEG, "backbone_width": COUNT, "generated_train_size": COUNT,
             "generated_eval_size": COUNT, "generated_image_size": COUNT, "probe_train_samples": COUNT,
             "linear_probe_l2": NONNEG,
             "sinkhorn_iterations": COUNT, "freeze_prototypes_steps": NONNEG, "queue_length": NONNEG,
             "queue_start_epoch": NONNEG, "knn_k": COUNT, "knn_temperature": POS, "linear_probe_steps": NONNEG},
    "preselect": {"num_workers": COUNT, "bpc_window": Range(2), "bpc_stride": COUNT, "bpc_batch_size": COUNT,
                  "positive_quantile": Range(0, 1, lo_open=True, hi_open=True), "heldout_fraction": FRACTION,
                  "ft_word_ngrams": COUNT, "ft_epoch": COUNT, "ft_lr": POS, "ft_dim": COUNT, "ft_bucket": COUNT,
                  "ft_threads": COUNT, "keep_fraction": SHARE, "predict_batch": COUNT, "min_positives": COUNT,
                  "histogram_bins": COUNT, "student_order": COUNT, "world.num_facts": COUNT,
                  "world.pool_shards": COUNT, "world.docs_per_pool_shard": COUNT, "world.sample_shards": COUNT,
                  "world.docs_per_sample_shard": COUNT, "world.reference_chars": COUNT,
                  "world.benchmark_items": COUNT},
    "concept_prune": {"batch_size": COUNT, "shard_size": COUNT, "epsilon": Range(0, 2, hi_open=True),
                      "dedup_clusters": NONNEG, "num_clusters": COUNT, "kmeans_iters": COUNT, "keep_fraction": SHARE,
                      "num_neighbors": COUNT, "temperature": POS, "balance": PROB, "num_workers": COUNT,
                      "max_points_per_centroid": COUNT, "max_length": COUNT, "image_size": COUNT,
                      "dup_fraction": PROB, "max_copies": COUNT, "dup_noise": NONNEG, "embed_dim": COUNT},
}


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def range_problems(data: dict) -> list[str]:
    """Problems for the keys of `data` (an unresolved plain-dict config) outside their valid range, and for
    pairs of keys whose values do not go together."""
    name = (data.get("recipe") or {}).get("name")
    rules = dict(COMMON)
    rules.update({f"recipe.{k}": r for k, r in RECIPE.get(name, {}).items()})
    out = []
    for key, rng in rules.items():
        v = _get(data, key)
        if v is _ABSENT or (isinstance(v, str) and "${" in v):
            continue
        if not rng.ok(v):
            out.append(f"{key}={v}: out of range. Valid values: {rng.text()}.")
    from runx.trainers.plan import size_problem   # light: no torch
    sizes = {"plan.gpu_mem": ("auto",), "plan.cpu_mem": ("auto",), "plan.nvme_free": ("auto",)}
    if name == "lora_ga":
        sizes["recipe.grad_sum_budget"] = ("auto", "none")
    for key, words in sizes.items():
        v = _get(data, key)
        problem = None if v is _ABSENT else size_problem(key, v, words)
        if problem:
            out.append(problem)
    rec, dat = data.get("recipe") or {}, data.get("data") or {}
    head_lr, kind = (data.get("optim") or {}).get("head_lr"), (data.get("model") or {}).get("kind")
    kind_known = isinstance(kind, str) and "${" not in kind
    if head_lr is not None and kind_known and kind != "seq_cls":
        out.append(f"optim.head_lr={head_lr}: only a sequence classifier has a new task head to give its own lr "
                   f"(model.kind={kind}). Valid choices: null, or model.kind=seq_cls.")
    out += _pair_problems(name, data)
    overrides = (data.get("trainer") or {}).get("ds_overrides")
    if isinstance(overrides, dict) and overrides:
        out += ds_override_problems(overrides)
    if dat.get("num_workers") not in (0, None):
        out.append(f"data.num_workers={dat['num_workers']}: read by nothing (kept so that saved runs load). Valid "
                   f"choices: trainer.dataloader_workers={dat['num_workers']} for the data loader's workers.")
    if dat.get("extra") and dat.get("kind") != "hf":
        out.append(f"data.extra={dat['extra']}: keyword arguments of datasets.load_dataset, which data.kind="
                   f"{dat.get('kind')} does not call. Valid choices: data.extra={{}}, or data=hf with a hub id.")
    if dat.get("group_by_length") is True and name not in ("sft", "lora", "lora_ga"):
        out.append(f"data.group_by_length=true: only the text fine-tuning recipes draw tokenised batches "
                   f"(recipe={name}). Valid values: false, or recipe=sft|lora|lora_ga.")
    if dat.get("packing") is True and (name not in ("sft", "lora", "lora_ga") or isinstance(kind, str)
                                       and kind != "causal_lm"):
        out.append(f"data.packing=true: only causal LM fine-tuning packs samples (recipe={name}, "
                   f"model.kind={kind}). Valid values: false, or recipe=sft|lora|lora_ga with model.kind=causal_lm.")
    if name == "verifree" and rec.get("pack_sequences") is True and rec.get("fused_logprob") is False:
        out.append("recipe.pack_sequences=true: packing scores the sequences through the decoder and the fused head. "
                   "Valid values: false, or recipe.fused_logprob=true.")
    from_config = (data.get("model") or {}).get("from_config")
    if isinstance(from_config, dict) and "model_type" not in from_config:
        out.append("model.from_config: no model_type, so no model can be built from it. Valid choices: "
                   "model.from_config.model_type=<e.g. llama, bert>, or model.from_config=null (load model.path).")
    precision = (data.get("trainer") or {}).get("precision")
    if name in ("sft", "lora", "lora_ga", "verifree") and (data.get("model") or {}).get("dtype") == "bf16" \
            and precision in ("fp32", "amp_bf16"):
        out.append(f"model.dtype=bf16 with trainer.precision={precision}: the optimizer would step the bf16 "
                   "weights themselves, with no fp32 master copy, and lose every update smaller than their "
                   "rounding step. Valid choices: trainer.precision=bf16 (fp32 master weights), or model.dtype=fp32.")
    launcher = data.get("launcher") or {}
    if launcher.get("kind") == "torchrun" and isinstance(launcher.get("num_nodes"), int) and launcher["num_nodes"] > 1:
        if not data.get("run_dir"):   # each node composes its own config: ${now:...} differs between them
            out.append(f"launcher.num_nodes={launcher['num_nodes']}: every node runs this command, and all must "
                       "write one run folder. Set run_dir=<path on a shared filesystem>.")
        if launcher.get("master_addr") in ("127.0.0.1", "localhost"):
            out.append(f"launcher.master_addr={launcher['master_addr']}: the other nodes cannot reach it. Valid "
                       "values: the first node's hostname or address, the same on every node.")
    metrics = _eval_metrics(name, data)
    out += _monitor_problems(name, data.get("trainer") or {}, metrics)
    out += _objective_problems(name, data.get("objective"), (data.get("trainer") or {}).get("monitor"), metrics)
    out += _logger_problems(data.get("logger") or {})
    if name == "swav":
        out += _swav_list_problems(rec)
    if name == "lora_ga" and rec.get("save_init") is False and data.get("export_at_end") is True:
        out.append("recipe.save_init=false with export_at_end=true: the export rebuilds the offset base from the "
                   "saved init. Valid choices: recipe.save_init=true, or export_at_end=false.")
    fractions = rec.get("eval_fractions")
    if name == "concept_prune" and isinstance(fractions, list) and not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions):
        out.append(f"recipe.eval_fractions={fractions}: out of range. Valid values: each in (0, 1].")
    if name == "verifree":
        out += [f"recipe.{k}={rec.get(k)!r}: empty. Valid values: a non-empty string (the paper's "
                f"{ {'answer_split': '<answer', 'stop_string': '</answer>'}[k]})."
                for k in ("answer_split", "stop_string") if rec.get(k) == ""]
    group = rec.get("group_size")
    if name == "verifree" and rec.get("advantage") in ("rloo", "grpo") and isinstance(group, int) and group < 2:
        out.append(f"recipe.group_size={group}: the {rec['advantage']} baseline needs at least 2 samples per "
                   "question. Valid values: >= 2, or recipe.advantage=naive.")
    return out


# DeepSpeed keys runx writes from its own settings: an override would make them disagree (DeepSpeed's batch-size
# assertion after the model was built) or change the run behind runx's back
_RUNX_SETS = {"train_batch_size": "trainer.micro_batch_size x trainer.grad_accum x processes",
              "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
              "gradient_accumulation_steps": "trainer.grad_accum", "zero_optimization.stage": "trainer.zero_stage"}
# DeepSpeed config sections that its runtime/constants.py does not name
_DS_SECTIONS = ("zero_optimization", "aio", "comet", "wandb", "tensorboard", "csv_monitor", "activation_checkpointing",
                "flops_profiler", "compression_training", "data_efficiency", "curriculum_learning", "nebula",
                "elasticity", "autotuning", "sparse_attention", "pipeline", "amp", "compile", "timers",
                "weight_quantization", "hybrid_engine", "sequence_parallel_size", "tensor_parallel", "zenflow")


def _deepspeed_keys() -> tuple[set, list, set]:
    """(the config key names in DeepSpeed's runtime/constants.py, the fields of its DeepSpeedZeroConfig, their
    aliases), read from its source: importing DeepSpeed takes seconds and probes the accelerator."""
    import ast
    import importlib.util
    spec = importlib.util.find_spec("deepspeed")
    root = os.path.dirname(spec.origin) if spec and spec.origin else None
    if root is None:
        return set(), [], set()

    def tree(*parts):
        with open(os.path.join(root, *parts)) as f:
            return ast.parse(f.read())
    known = {n.value.value for n in ast.walk(tree("runtime", "constants.py")) if isinstance(n, ast.Assign)
             and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str) and n.value.value.isidentifier()
             and all(isinstance(t, ast.Name) and t.id.isupper() and not t.id.endswith("_DEFAULT") for t in n.targets)}
    fields, aliases = [], set()
    for cls in ast.walk(tree("runtime", "zero", "config.py")):
        if isinstance(cls, ast.ClassDef) and cls.name == "DeepSpeedZeroConfig":
            for st in cls.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                    fields.append(st.target.id)
                    if isinstance(st.value, ast.Call):
                        aliases |= {k.value.value for k in st.value.keywords
                                    if k.arg == "alias" and isinstance(k.value, ast.Constant)}
    return known, sorted(fields), aliases


def ds_override_problems(overrides: dict) -> list[str]:
    """trainer.ds_overrides checked before any model is built: a key runx sets itself, an unknown key of the
    zero_optimization block (DeepSpeed's pydantic model refused it only inside deepspeed.initialize), and a
    top-level key that is a near miss of one of DeepSpeed's (gradient_clippin was silently ignored, the clip
    the user asked for never applied). Imports DeepSpeed only when there are overrides."""
    import difflib

    from runx.trainers.runtime import flatten_overrides
    out = []
    flat = flatten_overrides(overrides)
    for key, where in _RUNX_SETS.items():
        if key in flat or (key == "zero_optimization.stage" and isinstance(overrides.get("zero_optimization"), int)):
            out.append(f"trainer.ds_overrides.{key}={flat.get(key)}: runx sets it from {where}. Valid choices: "
                       f"set {where.split(' x ')[0]} instead.")
    for key in ("bf16.enabled", "bfloat16.enabled", "torch_autocast.enabled"):   # (bfloat16: DeepSpeed's alias)
        if key in flat:
            out.append(f"trainer.ds_overrides.{key}={flat[key]}: runx sets it from trainer.precision. Valid "
                       "choices: set trainer.precision=fp32|bf16|amp_bf16 instead.")
    if any(flat.get(k) not in (None, False, "false") for k in ("fp16.enabled", "amp.enabled")):
        out.append("trainer.ds_overrides.fp16: runx trains in fp32, bf16 or amp_bf16. fp16's loss scaling skips the "
                   "optimizer step on an overflow, which runx would count as a step (its schedule, data and "
                   "checkpoints running ahead of the model). Valid choices: trainer.precision=bf16|amp_bf16.")
    known, fields, aliases = _deepspeed_keys()
    known.update(_DS_SECTIONS)
    zero_keys = set(fields) | aliases
    seen = set()
    for key in flat:   # dotted: {aio.queue_depth: 16} and nested blocks alike
        top, _, rest = str(key).partition(".")
        if top not in known and top not in seen:
            seen.add(top)
            near = difflib.get_close_matches(top, sorted(known), n=1, cutoff=0.85)
            if near:
                out.append(f"trainer.ds_overrides.{top}: not a DeepSpeed config key (DeepSpeed would ignore it). "
                           f"Did you mean trainer.ds_overrides.{near[0]}?")
        sub = rest.partition(".")[0]
        if top == "zero_optimization" and sub and sub not in zero_keys:
            near = difflib.get_close_matches(sub, sorted(zero_keys), n=1)
            out.append(f"trainer.ds_overrides.zero_optimization.{sub}: not a key of DeepSpeed's zero_optimization "
                       "block." + (f" Did you mean {near[0]}?" if near else f" Valid keys: {', '.join(sorted(fields))}."))
    return out


def _pair_problems(name, data: dict) -> list[str]:
    """Settings that are each valid but do not go together, which the trainer or a library refused only after
    the model was built (a traceback; LoRA-GA after its whole gradient estimate)."""
    out = []
    t, o, rec, lau = (data.get(k) or {} for k in ("trainer", "optim", "recipe", "launcher"))
    stage = t.get("zero_stage")
    for key, need in (("offload_param", 3), ("offload_optimizer", 1)):
        dev = t.get(key)
        if isinstance(stage, int) and dev in ("cpu", "nvme") and stage < need:
            out.append(f"trainer.{key}={dev} with trainer.zero_stage={stage}: DeepSpeed offloads "
                       f"{'parameters only at ZeRO stage 3' if need == 3 else 'the optimizer from ZeRO stage 1 on'}. "
                       f"Valid choices: trainer.zero_stage={'3' if need == 3 else '1|2|3'} (trainer=zero3"
                       f"{'_cpu_offload' if dev == 'cpu' else '_nvme'}), or trainer.{key}=none.")
    betas = o.get("betas")
    if isinstance(betas, list) and not (len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        out.append(f"optim.betas={betas}: Adam's two decay rates. Valid values: [beta1, beta2], each in [0, 1).")
    if o.get("head_lr") is not None and name == "lora" and rec.get("train_head") is False:
        out.append(f"optim.head_lr={o['head_lr']} with recipe.train_head=false: the head is frozen, nothing "
                   "trains at that lr. Valid choices: optim.head_lr=null, or recipe.train_head=true.")
    steps, warmup = t.get("max_steps"), o.get("warmup_steps")
    if t.get("epochs") is None and isinstance(steps, int) and isinstance(warmup, int) and 0 < steps <= warmup \
            and data.get("smoke") is not True:   # (debug=smoke: a few steps to check a setup, its warm-up as set)
        out.append(f"optim.warmup_steps={warmup} with trainer.max_steps={steps}: the run would end still warming "
                   f"up, below optim.lr. Valid values: optim.warmup_steps < {steps}.")
    nodes = lau.get("num_nodes")
    ds_nodes = lau.get("kind") == "deepspeed" and isinstance(nodes, int) and nodes > 1
    if ds_nodes and not lau.get("hostfile"):
        out.append(f"launcher.num_nodes={nodes} with launcher=deepspeed and no launcher.hostfile: the DeepSpeed "
                   "launcher finds the other nodes in a hostfile. Valid choices: launcher.hostfile=<file of "
                   "'host slots=N' lines>, or launcher=torchrun on every node.")
    if ds_nodes and not data.get("run_dir"):
        out.append(f"launcher.num_nodes={nodes} with launcher=deepspeed: the other nodes' processes read the run's "
                   "config from its folder and rank 0 writes there. Set run_dir=<path on a shared filesystem>.")
    if name == "verifree" and rec.get("rollout_backend") == "vllm":
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            out.append("recipe.rollout_backend=vllm: the vllm package is not installed here (pip install vllm). "
                       "Valid choices: hf, or vllm once installed.")
        if isinstance(stage, int) and stage == 3:
            out.append("recipe.rollout_backend=vllm with trainer.zero_stage=3: vLLM needs the whole weights on "
                       "each rank. Valid choices: trainer.zero_stage=0|1|2, or recipe.rollout_backend=hf.")
    if name == "swav":
        for key in ("normalize_mean", "normalize_std"):
            v = rec.get(key)
            if isinstance(v, list) and len(v) != 3:
                out.append(f"recipe.{key}={v}: one value per RGB channel. Valid values: 3 numbers.")
    return out


def _logger_problems(lg: dict) -> list[str]:
    """W&B's own rules for tags and project names, which it enforced only at wandb.init: after the model was
    built, as a traceback (a sweep counted the job crashed)."""
    if lg.get("backend") != "wandb":
        return []
    out = []
    tags = lg.get("tags")
    if isinstance(tags, list):
        bad = [t for t in tags if not isinstance(t, (str, int, float)) or isinstance(t, bool)
               or not 1 <= len(str(t)) <= 64]
        if bad:
            out.append(f"logger.tags={tags}: W&B takes tags of 1 to 64 characters (numbers are written as text); "
                       f"{bad[0]!r} is not one. Valid values: a list of short strings.")
    for key in ("project", "entity", "group"):
        v = lg.get(key)
        if isinstance(v, str) and "${" not in v and any(c in v for c in "/\\#?%:"):
            out.append(f"logger.{key}={v}: W&B refuses the characters / \\ # ? % : in it"
                       + (" (the team goes in logger.entity)" if key == "project" and "/" in v else "")
                       + ". Valid values: a name without them.")
    return out


def _swav_list_problems(rec: dict) -> list[str]:
    """SwAV's per-crop-group lists and augmentation pairs, whose bad values torchvision would reject only inside
    the data loader (a traceback at the first batch) or turn into a NaN loss (a zero normalisation std)."""
    out = []

    def numbers(key):
        v = rec.get(key)
        return v if isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                for x in v) else None
    for key, ok, valid in (("nmb_crops", lambda x: x >= 1, "each >= 1"), ("size_crops", lambda x: x >= 1,
                           "each >= 1 (pixels)"), ("min_scale_crops", lambda x: 0 < x <= 1, "each in (0, 1]"),
                           ("max_scale_crops", lambda x: 0 < x <= 1, "each in (0, 1]"),
                           ("normalize_std", lambda x: x > 0, "each > 0"), ("blur_sigma", lambda x: x > 0,
                           "each > 0"), ("color_jitter", lambda x: x >= 0, "each >= 0")):
        v = numbers(key)
        if v is not None and not all(ok(x) for x in v):
            out.append(f"recipe.{key}={v}: out of range. Valid values: {valid}.")
    lo, hi = numbers("min_scale_crops"), numbers("max_scale_crops")
    if lo and hi and len(lo) == len(hi) and any(a > b for a, b in zip(lo, hi)):
        out.append(f"recipe.min_scale_crops={lo} with recipe.max_scale_crops={hi}: a crop group's minimum scale "
                   "is above its maximum. Valid values: min_scale_crops[i] <= max_scale_crops[i].")
    sigma = numbers("blur_sigma")
    if sigma and (len(sigma) != 2 or sigma[0] > sigma[1]):
        out.append(f"recipe.blur_sigma={sigma}: the blur's [min, max] sigma. Valid values: two numbers, "
                   "0 < min <= max.")
    jitter = numbers("color_jitter")
    if jitter and len(jitter) == 4 and jitter[3] > 0.5:
        out.append(f"recipe.color_jitter={jitter}: the hue jitter (4th value) is {jitter[3]}. Valid values: "
                   "brightness, contrast, saturation >= 0 and hue in [0, 0.5].")
    return out


def _eval_metrics(name, data: dict) -> list[str] | None:
    """The evaluation metrics (eval/<name>) a run of this config reports: the recipe's, narrowed by the keys that
    decide them (a classifier reports accuracy, a causal LM perplexity; VeriFree's sampled accuracy needs
    recipe.eval_samples > 0). None: not a known recipe."""
    from runx.recipes import RECIPES
    if name not in RECIPES:
        return None
    metrics = list(RECIPES[name].eval_metrics)
    kind = (data.get("model") or {}).get("kind")
    if name in ("sft", "lora", "lora_ga") and kind in ("seq_cls", "causal_lm"):
        metrics.remove("perplexity" if kind == "seq_cls" else "accuracy")
    if (data.get("data") or {}).get("max_eval_samples") == 0 and RECIPES[name].kind == "train":
        return []   # no evaluation
    samples = (data.get("recipe") or {}).get("eval_samples")
    if name == "verifree" and isinstance(samples, int) and samples == 0:
        metrics.remove("acc_sampled")
    return [f"eval/{m}" for m in metrics]


def _monitor_problems(name, trainer: dict, valid: list[str] | None) -> list[str]:
    """trainer.monitor names one of the run's evaluation metrics, and there are evaluations to watch."""
    out = []
    monitor, patience = trainer.get("monitor"), trainer.get("early_stop_patience")
    if isinstance(monitor, str) and "${" not in monitor and valid is not None:
        if monitor not in valid:
            out.append(f"trainer.monitor={monitor}: not an evaluation metric of this run (recipe={name}). "
                       "Valid choices: "
                       f"{', '.join(valid + ['null']) if valid else 'null (this run does not evaluate)'}.")
        eval_every = trainer.get("eval_every")
        if isinstance(eval_every, int) and eval_every == 0:
            out.append(f"trainer.eval_every=0 with trainer.monitor={monitor}: nothing is evaluated to monitor. "
                       "Valid values: trainer.eval_every >= 1, or trainer.monitor=null.")
    if monitor is None and isinstance(patience, int) and not isinstance(patience, bool) and patience > 0:
        out.append(f"trainer.early_stop_patience={patience}: early stopping watches trainer.monitor, which is "
                   "null. Valid choices: trainer.monitor=eval/<metric>, or trainer.early_stop_patience=0.")
    return out


def _objective_problems(name, objective, monitor, valid: list[str] | None) -> list[str]:
    """An evaluation objective (eval/<metric>, or best/eval/<metric> of trainer.monitor) checked before any job
    runs; other final metrics are only known once a run ends (objective_value checks them then)."""
    if not isinstance(objective, str) or "${" in objective or valid is None \
            or not objective.startswith(("eval/", "best/eval/")):
        return []
    metric = objective.removeprefix("best/")
    if metric not in valid:
        return [f"objective={objective}: not an evaluation metric of this run (recipe={name}). Valid choices: "
                f"{', '.join(valid) if valid else 'none (this run does not evaluate)'} (with best/ in front when "
                f"trainer.monitor names it), or another final metric of the run."]
    if objective.startswith("best/") and monitor != metric:
        shown = "null" if monitor is None else monitor
        return [f"objective={objective}: only a run with trainer.monitor={metric} reports it (trainer.monitor="
                f"{shown}). Valid choices: trainer.monitor={metric}, or objective={metric}."]
    return []
