"""Text data inputs of the language recipes (runx.recipes.text_data): which files are which split, and rows whose
labels or text cannot be trained on. CPU only, no model is built (the byte tokenizer tokenises)."""
from __future__ import annotations

import copy
import gzip
import json
import logging

import pytest


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(a, b, **extra):
    return [{"text": f"row {i}", "label": i % 2, **extra} for i in range(a, b)]


def _data_cfg(*overrides):
    from runx.cli.config import compose
    return compose(["recipe=sft", "model=tiny_bert", *overrides])


def _data(*overrides):
    return _data_cfg("data=jsonl", *overrides).data


def _tok():
    from runx.trainers.hf import byte_tokenizer
    return byte_tokenizer()


def test_shard_files_and_split_folders_are_their_splits_not_one_training_pool(tmp_path, caplog):
    """datasets' shard names (train-00000-of-00001.jsonl + validation-00000-of-00001.jsonl) and split folders
    (train/part-0.jsonl + validation/part-0.jsonl) were read as one training pool, val_fraction of it held out at
    random: the user's validation rows were trained on. A data.eval_path inside data.path was read as training data
    too, and a data.train_split naming no split of a split folder read the whole folder."""
    from runx.recipes.text_data import read_local_splits
    from runx.trainers.recipe import RecipeConfigError
    layouts = {"hf": ("train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl", "validation-00000-of-00001.jsonl"),
               "folders": ("train/part-0.jsonl", "train/part-1.jsonl", "validation/part-0.jsonl"),
               "underscore": ("train_0.jsonl", "train_1.jsonl", "validation_0.jsonl")}
    for name, (t0, t1, v0) in layouts.items():
        _jsonl(tmp_path / name / t0, _rows(0, 20))
        _jsonl(tmp_path / name / t1, _rows(20, 40))
        _jsonl(tmp_path / name / v0, _rows(100, 110))
        train, held = read_local_splits(_data(f"data.path={tmp_path / name}"))
        assert len(train) == 40 and sorted(r["text"] for r in held) == [f"row {i}" for i in range(100, 110)], name
    # a folder of shards named for no split is still training data as a whole (val_fraction is held out later)
    _jsonl(tmp_path / "pool" / "part-0.jsonl", _rows(0, 20))
    _jsonl(tmp_path / "pool" / "part-1.jsonl", _rows(20, 40))
    train, held = read_local_splits(_data(f"data.path={tmp_path / 'pool'}"))
    assert len(train) == 40 and held is None
    # data.eval_path inside data.path: held out, not also trained on
    _jsonl(tmp_path / "pool" / "heldout.jsonl", _rows(100, 110))
    with caplog.at_level(logging.INFO, logger="runx.text_data"):
        train, held = read_local_splits(_data(f"data.path={tmp_path / 'pool'}",
                                              f"data.eval_path={tmp_path / 'pool' / 'heldout.jsonl'}"))
    assert len(train) == 40 and len(held) == 10 and not {r["text"] for r in train} & {r["text"] for r in held}
    assert "held out, not trained on" in caplog.text
    # (the same file for both, as runx eval names a file to evaluate whole, is still read as both)
    train, held = read_local_splits(_data(f"data.path={tmp_path / 'pool' / 'heldout.jsonl'}",
                                          f"data.eval_path={tmp_path / 'pool' / 'heldout.jsonl'}"))
    assert len(train) == len(held) == 10
    # data.train_split naming no split of a folder whose files name splits (a typo): refused, naming those found
    with pytest.raises(RecipeConfigError, match=r"data.train_split=trian: no such split in data.path=.*hf, whose files "
                                                r"name the split\(s\) train, validation.*Valid choices: "
                                                r"data.train_split=train \| validation"):
        read_local_splits(_data(f"data.path={tmp_path / 'hf'}", "data.train_split=trian"))
    # names that only look like splits: shards of another name (data-00000-of-00002), files that merely start with
    # a split word (test_results, training_notes), or split-named files without a training split: the folder is
    # read whole, as before split names were read
    for name, files in {"datashards": ("data-00000-of-00002.jsonl", "data-00001-of-00002.jsonl"),
                        "words": ("corpus.jsonl", "test_results.jsonl"),
                        "notes": ("a.jsonl", "training_notes.jsonl"),
                        "devonly": ("dev/x.jsonl", "other/y.jsonl")}.items():
        _jsonl(tmp_path / name / files[0], _rows(0, 20))
        _jsonl(tmp_path / name / files[1], _rows(20, 40))
        train, held = read_local_splits(_data(f"data.path={tmp_path / name}"))
        assert len(train) == 40 and held is None, name
    # runx eval naming a folder as both (the run's training files moved): the folder is evaluated whole
    _jsonl(tmp_path / "evalset" / "test_part1.jsonl", _rows(0, 5))
    _jsonl(tmp_path / "evalset" / "test.jsonl", _rows(5, 10))
    train, held = read_local_splits(_data(f"data.path={tmp_path / 'evalset'}",
                                          f"data.eval_path={tmp_path / 'evalset'}"))
    assert len(train) == len(held) == 10


def test_labels_that_are_no_class_and_text_that_is_no_text_are_refused(tmp_path):
    """Multi-label lists ([0, 2]) and dicts were read as class names, fractional (regression) labels numbered as
    classes (the message recommended model.num_labels=47 for 47 distinct floats); a list or dict in a text field was
    trained on as its Python repr, in either task. Each is a config problem naming the key, the row (file:line) and
    the value's type."""
    from runx.recipes.text_data import CausalLMDataset, ClassificationDataset, read_files
    from runx.trainers.recipe import RecipeConfigError
    tok = _tok()
    for label, words in (([0, 2], r"a list: several classes, multi-label"), ({"a": 1}, r"a dict"),
                         (2.5, r"a float: a regression target")):
        _jsonl(tmp_path / "l.jsonl", _rows(0, 5) + [{"text": "odd", "label": label}])
        rows = read_files(str(tmp_path / "l.jsonl"), "jsonl")
        with pytest.raises(RecipeConfigError, match=rf"data.label_field='label': training row 6 \(.*l.jsonl:6\) has "
                                                    rf"label .*\({words}\): regression and multi-label classification "
                                                    rf"are not supported"):
            ClassificationDataset(rows, tok, "text", "label", 16, num_labels=4)
    rows = [{"text": "a", "label": 0}, {"text": ["para 1", "para 2"], "label": 1}]
    with pytest.raises(RecipeConfigError, match=r"data.text_field='text': training row 2 has a list .*not text"):
        ClassificationDataset(rows, tok, "text", "label", 16, num_labels=2)
    tok.eos_token = tok.pad_token
    with pytest.raises(RecipeConfigError, match=r"data.prompt_field='prompt': row 2 has a dict .*not text"):
        CausalLMDataset([{"prompt": "q", "response": "a"}, {"prompt": {"q": 1}, "response": "a"}], tok, "text", 16)
    with pytest.raises(RecipeConfigError, match=r"data.text_field='text': row 1 has a list .*"
                                                r"data.messages_field='text'"):
        CausalLMDataset([{"text": [{"role": "user", "content": "hi"}]}], tok, "text", 16)


def test_json_lines_with_unicode_line_separators_inside_strings_are_read(tmp_path):
    """U+2028 / U+2029 / U+0085 inside a JSON string are valid JSON, and json.dumps(ensure_ascii=False) writes them
    unescaped: str.splitlines() broke such a line in two ("invalid JSON")."""
    from runx.recipes.text_data import read_files
    rows = [{"text": f"a\u2028b\u2029c\x85d {i}", "label": 0} for i in range(3)]
    (tmp_path / "u.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                                      encoding="utf-8")
    assert read_files(str(tmp_path / "u.jsonl"), "jsonl") == rows


def test_a_row_after_the_first_thousand_without_the_field_is_named(tmp_path):
    """Only the first 1000 rows were checked for the text / label fields: a later row was a KeyError traceback."""
    from runx.recipes.text_data import ClassificationDataset, read_files
    from runx.trainers.recipe import RecipeConfigError
    rows = _rows(0, 1200)
    rows[1100] = {"sentence": "renamed", "label": 1}
    _jsonl(tmp_path / "late.jsonl", rows)
    with pytest.raises(RecipeConfigError, match=r"data rows need fields 'text' and 'label' .*training row 1101 "
                                                r"\(.*late.jsonl:1101\) has \['label', 'sentence'\]"):
        ClassificationDataset(read_files(str(tmp_path / "late.jsonl"), "jsonl"), _tok(), "text", "label", 16, 2)


def test_a_corrupt_or_truncated_compressed_file_is_named(tmp_path):
    """A truncated .gz was an EOFError traceback, a .gz that is not gzip a BadGzipFile one; a truncated .zst lost
    its last rows silently (zstandard's stream reader ends a cut frame without an error)."""
    import zstandard

    from runx.recipes.text_data import read_files
    from runx.trainers.recipe import RecipeConfigError
    data = "".join(json.dumps(r) + "\n" for r in _rows(0, 2000)).encode()
    gz, zst = gzip.compress(data), zstandard.ZstdCompressor().compress(data)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "plain.jsonl.gz").write_bytes(data)
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[: len(zst) - 20])
    (tmp_path / "plain.jsonl.zst").write_bytes(data)
    for name, what in (("cut.jsonl.gz", "gzip"), ("plain.jsonl.gz", "gzip"), ("cut.jsonl.zst", "zstd"),
                       ("plain.jsonl.zst", "zstd")):
        with pytest.raises(RecipeConfigError, match=rf"{name}: corrupt or not {what} data"):
            read_files(str(tmp_path / name), "jsonl")
    # several zstandard frames (concatenated files, pzstd) are read whole
    (tmp_path / "frames.jsonl.zst").write_bytes(zst + zst)
    assert len(read_files(str(tmp_path / "frames.jsonl.zst"), "jsonl")) == 4000


def test_an_unlabelled_held_out_split_says_so(tmp_path):
    """A GLUE-style test split (every label -1) said "class id(s) -1 outside 0..2. Valid choices:
    model.num_labels=0"; CSV's "-1" was read as a class name, renumbering the held-out classes."""
    from runx.recipes.text_data import ClassificationDataset, read_files
    from runx.trainers.recipe import RecipeConfigError
    tok = _tok()
    _jsonl(tmp_path / "test.jsonl", [{"text": f"t{i}", "label": -1} for i in range(4)])
    with pytest.raises(RecipeConfigError, match=r"data.label_field='label': 4 held-out row\(s\) have label -1 \(first: "
                                                r"held-out row 1 \(.*test.jsonl:1\)\): a negative label marks an "
                                                r"unlabelled row.*Valid choices: another data.eval_split") as e:
        ClassificationDataset(read_files(str(tmp_path / "test.jsonl"), "jsonl"), tok, "text", "label", 16, 3,
                              split="held-out")
    assert "num_labels" not in str(e.value)
    # a datasets source's test split: the message names it (the rows remember their split)
    import datasets

    from runx.recipes.sft import SFT
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(0, 12)),
                          "test": datasets.Dataset.from_list([{"text": "t", "label": -1}] * 3)}).save_to_disk(
        str(tmp_path / "glue"))
    with pytest.raises(RecipeConfigError, match=r"3 held-out row\(s\) have label -1 \(first: held-out row 1 "
                                                r"\(.*glue\[test\] row 1\)\): a negative label marks an "
                                                r"unlabelled row"):
        SFT(_data_cfg("data=hf", f"data.hf_name={tmp_path / 'glue'}", "data.eval_split=test"),
            str(tmp_path)).build_data()
    # CSV's "-1" is a class id too (it was a class name, and the held-out ids silently shifted)
    (tmp_path / "test.csv").write_text("text,label\na,1\nb,-1\n")
    with pytest.raises(RecipeConfigError, match=r"1 held-out row\(s\) have label -1 .*test.csv:3"):
        ClassificationDataset(read_files(str(tmp_path / "test.csv"), "csv"), tok, "text", "label", 16, 3,
                              split="held-out")


def test_bool_labels_are_named_and_fewer_classes_than_the_head_warn(tmp_path, caplog):
    """True / False labels gave no class names (isinstance(True, int)), so the exported config named no classes; a
    head with more outputs than the data has classes (model.num_labels' default 4, 2 classes) said nothing."""
    from runx.recipes.text_data import ClassificationDataset
    rows = [{"text": f"t{i}", "label": i % 3 == 0} for i in range(6)]
    with caplog.at_level(logging.WARNING, logger="runx.text_data"):
        ds = ClassificationDataset(rows, _tok(), "text", "label", 16, num_labels=4)
    assert ds.label_names == ["False", "True"] and ds.labels == [1, 0, 0, 1, 0, 0]
    assert "the training rows have 2 class(es) (False, True), and model.num_labels=4: class id(s) 2, 3 have no " \
           "training row" in caplog.text and "model.num_labels=2" in caplog.text
    held = ClassificationDataset([{"text": "h", "label": True}], _tok(), "text", "label", 16, 4, ds.label_names,
                                 "held-out")
    assert held.labels == [1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runx.text_data"):
        ClassificationDataset(rows, _tok(), "text", "label", 16, num_labels=2)
    assert "class(es)" not in caplog.text


def test_a_glob_in_data_path_is_read_as_validate_accepts_it(tmp_path):
    """runx validate accepted data.path=d/shards/*.jsonl (a glob match exists), and runx train said there were no
    files there."""
    from runx.cli.config import check_paths, compose
    from runx.recipes.text_data import load_rows, read_files
    _jsonl(tmp_path / "shards" / "part-0.jsonl", _rows(0, 10))
    _jsonl(tmp_path / "shards" / "part-1.jsonl", _rows(10, 20))
    (tmp_path / "shards" / "notes.txt").write_text("not data")
    pattern = str(tmp_path / "shards" / "*.jsonl")
    cfg = compose(["recipe=sft", "model=tiny_bert", "data=jsonl", f"data.path={pattern}", "data.val_fraction=0.25"])
    assert check_paths(cfg) == []
    train, held = load_rows(cfg.data)
    assert (len(train), len(held)) == (15, 5)
    assert len(read_files(str(tmp_path / "shards" / "*"), "jsonl")) == 20     # only the files of data.kind


@pytest.mark.parametrize("kind", ["sentencepiece", "bytelevel"])
def test_a_response_is_trained_on_the_tokens_the_model_reads_after_its_prompt(kind):
    """prompt + response are tokenised as one text: tokenised apart, a SentencePiece tokenizer marks the response's
    first word as a word start ("x=" + "4" trained as "x= 4") and a byte-level one splits a prompt's trailing space
    from the first word ("A: " + "4" as "A:", " ", "4"). A chat turn after a header ending in a space trains its
    first word (the token " cat" begins in the header's space)."""
    from conftest import word_tokenizer

    from runx.recipes.text_data import CausalLMDataset, chat_tokens
    tok = word_tokenizer(kind)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for prompt, response in (("Q: x=", "4"), ("Q: how many pens\nA: ", "4"), ("Q: how many\nA:", " 4 pens")):
        item, = CausalLMDataset([{"prompt": prompt, "response": response}], tok, "text", 64)
        ids, labels = item["input_ids"], item["labels"]
        assert ids == bos + tok(prompt + response, add_special_tokens=False).input_ids + [tok.eos_token_id]
        trained = tok.decode([t for t in labels if t != -100], skip_special_tokens=True)
        # (a token may begin in the prompt: "=4" or " 4" are one token, trained whole)
        assert trained.strip().endswith(response.strip()) and len(trained.strip()) <= len(response.strip()) + 1, \
            (prompt, response, trained)
        assert labels[-1] == tok.eos_token_id and labels[len(bos)] == -100
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
                "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    ids, labels = chat_tokens(tok, [{"role": "user", "content": "how many pens"},
                                    {"role": "assistant", "content": "cat has 4 pens"}], template)
    assert tok.decode([t for t in labels if t != -100], skip_special_tokens=True).strip() == "cat has 4 pens"


def test_prompt_response_rows_read_with_a_tokenizer_without_character_offsets():
    """A slow (Python) tokenizer gives no character offsets (transformers ignores return_offsets_mapping there):
    prompt/response rows are tokenised apart, as before, not stopped by a KeyError."""
    from transformers import PreTrainedTokenizer

    from runx.recipes.text_data import pair_tokens

    class CharTokenizer(PreTrainedTokenizer):
        def __init__(self, **kw):
            self.v = {chr(i): i for i in range(32, 127)} | {"</s>": 1, "<s>": 2}
            super().__init__(eos_token="</s>", bos_token="<s>", **kw)

        def get_vocab(self):
            return dict(self.v)

        @property
        def vocab_size(self):
            return len(self.v)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, t):
            return self.v.get(t, 0)

        def _convert_id_to_token(self, i):
            return {v: k for k, v in self.v.items()}.get(i, "?")
    tok = CharTokenizer()
    assert not tok.is_fast
    ids, labels = pair_tokens(tok, "Q: x=", "4")
    assert ids == [ord(c) for c in "Q: x=4"] + [1] and labels == [-100] * 5 + [ord("4"), 1]


# ---- held token data: compact, the same items -----------------------------------------------------------------
def _reference_classification(ds, rows, tok, max_length):
    """ClassificationDataset's items as they were built before the token data was held compactly: the whole
    BatchEncoding of every row."""
    enc = tok([str(r["text"]) for r in rows], truncation=True, max_length=max_length)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": ds.labels[i]}
            for i in range(len(rows))]


def _reference_causal_lm(rows, tok, max_length, chat_template=None, train_on_prompt=False):
    """CausalLMDataset's items as they were built before: lists of Python ints, the samples with no label dropped."""
    from runx.recipes.text_data import chat_messages, chat_tokens, pair_tokens, resolve_chat_template
    items = []
    for i, r in enumerate(rows):
        if "messages" in r:
            template = resolve_chat_template(chat_template, tok, "the model")
            ids, labels = chat_tokens(tok, chat_messages(r["messages"], i, "messages"), template, train_on_prompt)
            items.append((ids[:max_length], labels[:max_length]))
            continue
        if "prompt" in r and "response" in r:
            ids, labels = pair_tokens(tok, str(r["prompt"]), str(r["response"]), train_on_prompt)
        else:
            ids = tok(str(r["text"]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            labels = list(ids)
        if tok.bos_token_id is not None:
            ids, labels = [tok.bos_token_id] + ids, [-100] + labels
        items.append((ids[:max_length], labels[:max_length]))
    return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
            for ids, labels in items if any(t != -100 for t in labels[1:])]


def _same_items_and_batches(ds, ref, pad_id, max_length):
    """Every item equal to the reference's, value for value and type for type (lists of Python ints, an int
    label), and so every padded and packed batch tensor for tensor."""
    import torch

    from runx.recipes.text_data import pack_collate, pad_collate
    assert len(ds) == len(ref) > 0
    for i in range(len(ds)):
        got, want = ds[i], ref[i]
        assert got == want, i
        assert list(got) == list(want), i
        for key, value in got.items():
            assert type(value) is type(want[key]), (i, key)
            if isinstance(value, list):
                assert all(type(t) is int for t in value), (i, key)
    assert ds[-1] == ref[-1]
    with pytest.raises(IndexError):
        ds[len(ds)]
    from runx.trainers.deepspeed_trainer import token_lengths   # (read from the offsets: group_by_length's keys)
    assert token_lengths(ds) == [len(r["input_ids"]) for r in ref]
    collates = [pad_collate(pad_id)]
    if isinstance(ref[0]["labels"], list):
        collates.append(pack_collate(pad_id, max_length))
    for collate in collates:
        for at in range(0, len(ds), 7):
            got, want = collate([ds[i] for i in range(at, min(at + 7, len(ds)))]), collate(ref[at:at + 7])
            assert got.keys() == want.keys()
            for key in got:
                assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (at, key)


def test_held_token_data_gives_the_items_it_gave_as_python_lists(tmp_path):
    """The datasets hold their token ids, masks and labels as flat int32 arrays (their BatchEncoding with its Rust
    encodings held ~220 bytes a token, lists of Python ints ~44); the items, and so the batches, are the ones the
    lists gave: the embedded default classification data, the tiny_text causal-LM set and prompt/response and chat
    rows with both tokenizer families, truncated samples with no label left dropped."""
    from conftest import word_tokenizer

    from runx.cli.config import compose
    from runx.recipes.sft import SFT
    from runx.recipes.text_data import CausalLMDataset, load_rows
    from runx.trainers.hf import byte_tokenizer

    rec = SFT(compose(["recipe=sft", "model=tiny_bert"]), str(tmp_path))    # stdlib_topics
    train_ds, eval_ds = rec.build_data()
    d = rec.cfg.data
    train, evals = load_rows(d)
    for ds, rows in ((train_ds, train), (eval_ds, evals)):
        _same_items_and_batches(ds, _reference_classification(ds, rows, rec.tokenizer, d.max_length), 0,
                                d.max_length)
    short = [{"text": r["text"], "label": r["label"]} for r in train[:50]]
    from runx.recipes.text_data import ClassificationDataset
    ds = ClassificationDataset(short, rec.tokenizer, "text", "label", 5, num_labels=4)   # all truncated
    _same_items_and_batches(ds, _reference_classification(ds, short, rec.tokenizer, 5), 0, 5)

    rec = SFT(compose(["recipe=sft", "model=tiny_llama", "data=tiny_text"]), str(tmp_path))
    train_ds, eval_ds = rec.build_data()
    d = rec.cfg.data
    train, evals = load_rows(d)
    for ds, rows in ((train_ds, train), (eval_ds, evals)):
        _same_items_and_batches(ds, _reference_causal_lm(rows, rec.tokenizer, d.max_length),
                                rec.tokenizer.pad_token_id, d.max_length)

    chat = [{"messages": [{"role": "user", "content": f"how many pens {i}"},
                          {"role": "assistant", "content": "the cat has 4 pens " * (i % 5)}]} for i in range(12)]
    pairs = [{"prompt": f"Q: how many cups {i}\nA: " * (1 + i % 4), "response": f" {i} cups"} for i in range(12)]
    text = [{"text": f"the dog finds {i} pens " * (1 + i % 6)} for i in range(12)]
    for tok in (byte_tokenizer(), word_tokenizer("sentencepiece"), word_tokenizer("bytelevel")):
        for rows, max_length in ((chat + pairs + text, 24), (pairs + text, 64), (text, 8)):
            for train_on_prompt in (False, True):
                ds = CausalLMDataset(rows, tok, "text", max_length, chat_template="chatml",
                                     train_on_prompt=train_on_prompt)
                ref = _reference_causal_lm(rows, tok, max_length, "chatml", train_on_prompt)
                _same_items_and_batches(ds, ref, tok.pad_token_id or 0, max_length)
    assert len(CausalLMDataset(pairs, byte_tokenizer(), "text", 24)) < len(pairs)   # (some were dropped)


def _wide_tokenizer():
    """A word-level tokenizer whose ids are all >= 1000: Python caches the ints below 257, which would hide the
    int objects a list of token ids holds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = "the a cat dog has buys finds how many pens cups answer think so is".split()
    vocab = {"[UNK]": 1000, "</s>": 1001} | {w: 1002 + i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def test_held_token_data_takes_a_few_bytes_a_token(tmp_path):
    """A dataset's token data is held in ~4 bytes a token (int32), plus a little per row: the BatchEncoding that
    ClassificationDataset held took ~220 bytes a token with its Rust encodings (tracemalloc does not see those:
    ~50 without), CausalLMDataset's lists of Python ints ~44; 10M rows were hundreds of GB."""
    import gc
    import random
    import tracemalloc

    from transformers import BatchEncoding

    from runx.recipes.text_data import CausalLMDataset, ClassificationDataset, read_files
    rng = random.Random(0)
    words = "the a cat dog has buys finds how many pens cups answer think so is".split()
    _jsonl(tmp_path / "rows.jsonl", [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(10, 50))),
                                      "label": i % 4, "prompt": "how many " + rng.choice(words),
                                      "response": " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))}
                                     for i in range(8_000)])
    rows = read_files(str(tmp_path / "rows.jsonl"), "jsonl")
    lm_rows = [{"text": r["text"]} for r in rows]
    pair_rows = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
    tok = _wide_tokenizer()
    builds = {"classification": lambda: ClassificationDataset(rows, tok, "text", "label", 512, num_labels=4),
              "causal LM text": lambda: CausalLMDataset(lm_rows, tok, "text", 512),
              "causal LM prompt/response": lambda: CausalLMDataset(pair_rows, tok, "text", 512)}
    per_token = {}
    for name, build in builds.items():
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            ds = build()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        tokens = sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
        assert len(ds) == len(rows) and tokens > 10 * len(rows)
        assert not any(isinstance(v, BatchEncoding) for v in vars(ds).values()), name   # (nor its Rust encodings)
        per_token[name] = round(held / tokens, 1)
        del ds
    assert max(per_token.values()) < 16, f"bytes held a token: {per_token}"


def test_a_saved_datasets_rows_kept_by_max_train_samples_are_the_rows_kept_before(tmp_path):
    """data=hf reads as dicts only the rows it keeps, when data.max_train_samples / max_eval_samples keep a few
    (every row of the split was made a dict first): the rows, their order and the row each names are the ones the
    whole read gave, with the source's own held-out split and with val_fraction of the training rows held out."""
    import datasets

    from runx.recipes.text_data import Row, _split, held_out_split, load_hf_splits, load_rows

    def whole_read(dcfg):   # data=hf as it was read before: every row a dict, then the subset
        src = dcfg.hf_name
        ds = load_hf_splits(src, dcfg.train_split, dcfg.extra)
        def rows_of(split):
            return [Row(r, f"{src}[{split}] row {i + 1}") for i, r in enumerate(ds[split])]
        train = rows_of(dcfg.train_split)
        split = held_out_split(ds, dcfg, src)
        evals = rows_of(split) if split else []
        if not evals:
            train, evals = _split(train, dcfg.val_fraction, seed=0)
        if dcfg.max_train_samples:
            train = train[: int(dcfg.max_train_samples)]
        if dcfg.max_eval_samples is not None:
            evals = evals[: int(dcfg.max_eval_samples)]
        return train, evals

    rows = [{"text": f"row {i}", "label": i % 3} for i in range(40)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:9])}).save_to_disk(str(tmp_path / "two"))
    for name in ("one", "two"):
        for caps in ((), ("data.max_train_samples=5",), ("data.max_train_samples=30", "data.max_eval_samples=2"),
                     ("data.max_eval_samples=0",), ("data.max_train_samples=1", "data.val_fraction=0.6")):
            dcfg = _data_cfg("data=hf", f"data.hf_name={tmp_path / name}", *caps).data
            got, want = load_rows(dcfg), whole_read(dcfg)
            for g, w in zip(got, want):
                assert g == w and [r.origin for r in g] == [r.origin for r in w], (name, caps)
                assert all(type(r) is Row for r in g)
            assert len(got[1]) == {("two", ()): 9, ("one", ()): 8}.get((name, caps), len(got[1]))


def _local_sources(tmp_path):
    """{name: (data.kind, data.path, extra overrides)} of local files with what their readers must get right: JSONL
    (plain and .gz shards of one folder) with a BOM, blank / white-space / CRLF lines and U+2028 inside a string; a
    JSON array; Parquet of several row groups and value types; CSV with a quoted newline, CRLF, a blank line and
    short / long records; and a folder of named splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    lines = []
    for i in range(23):
        lines.append(json.dumps({"text": f"r{i}" + ("\u2028x\u2029y\x85z" if i % 5 == 2 else ""), "label": i % 3},
                                ensure_ascii=False) + ("\r\n" if i % 4 == 1 else "\n"))
        lines += [" \t\n", "\u3000\n", "\r\n", "\n"][i % 4:i % 4 + 1] if i % 3 == 0 else []
    (tmp_path / "jl").mkdir()
    (tmp_path / "jl" / "part-0.jsonl").write_bytes(("\ufeff" + "".join(lines[:20])).encode())
    (tmp_path / "jl" / "part-1.jsonl.gz").write_bytes(gzip.compress("".join(lines[20:]).rstrip("\n").encode()))
    (tmp_path / "a.json").write_text(json.dumps(_rows(0, 9), indent=1))
    (tmp_path / "pq").mkdir()
    for k, (a, b) in enumerate(((0, 11), (11, 18))):
        pq.write_table(pa.Table.from_pylist([{"text": f"p{i}", "label": i % 2, "score": None if i % 4 else i / 3,
                                              "tags": [f"t{j}" for j in range(i % 3)], "meta": {"n": i}}
                                             for i in range(a, b)]), tmp_path / "pq" / f"part-{k}.parquet",
                       row_group_size=4)
    records = [f'"line {i}\nmore, ""quoted""",{i % 2}' if i % 6 == 1 else f"c{i},{i % 2}" for i in range(17)]
    records[4], records[9] = "c4", "c9,1,extra"   # short and long records (restval / restkey)
    (tmp_path / "c.csv").write_bytes(("text,label\r\n" + "\r\n".join(records[:8]) + "\r\n\r\n"
                                      + "\n".join(records[8:]) + "\n").encode())
    _jsonl(tmp_path / "sp" / "train.jsonl", _rows(0, 25))
    _jsonl(tmp_path / "sp" / "validation.jsonl", _rows(100, 108))
    return {"jsonl": ("jsonl", tmp_path / "jl", ()), "json array": ("jsonl", tmp_path / "a.json", ()),
            "parquet": ("parquet", tmp_path / "pq", ()), "csv": ("csv", tmp_path / "c.csv", ()),
            "named splits": ("jsonl", tmp_path / "sp", ()),
            "eval_path": ("jsonl", tmp_path / "jl", (f"data.eval_path={tmp_path / 'sp' / 'validation.jsonl'}",))}


def test_local_rows_kept_by_max_samples_are_the_rows_the_whole_read_kept(tmp_path):
    """data.kind jsonl / parquet / csv read as dicts only the rows data.max_train_samples / max_eval_samples keep
    (every row of every file was read first): the rows, their values, order and origins (file:line) are the ones the
    whole read kept, with val_fraction of the training rows held out and with a held-out split of their own."""
    from runx.recipes.text_data import (Row, _at_most, _split, data_files, load_rows, read_files, read_local_splits,
                                        read_rows, row_counts)

    def whole_read(dcfg):   # as load_rows read local files before: every row a dict, then the split and the subset
        train, evals = read_local_splits(dcfg)
        if evals is None:
            train, evals = _split(train, dcfg.val_fraction, seed=0)
        return _at_most(train, evals, dcfg)

    sources = _local_sources(tmp_path)
    # the whole read of JSON Lines is the reading it was: lines split at \n only, \r stripped, blank lines skipped
    for name in ("part-0.jsonl", "part-1.jsonl.gz"):
        path = tmp_path / "jl" / name
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if name.endswith(".gz") else raw).decode("utf-8-sig")
        want = [(json.loads(line), f"{path}:{n}") for n, line in enumerate(text.split("\n"), 1)
                if line.removesuffix("\r").strip()]
        assert [(r, r.origin) for r in read_files(str(path), "jsonl")] == want
    for name, (kind, path, extra) in sources.items():
        base = _data_cfg("data=jsonl", f"data.kind={kind}", f"data.path={path}", *extra).data
        for caps in ({}, {"max_train_samples": 5}, {"max_train_samples": 7, "max_eval_samples": 3},
                     {"max_eval_samples": 0}, {"max_eval_samples": 2, "val_fraction": 0.5},
                     {"max_train_samples": 1, "val_fraction": 0}, {"max_train_samples": 1000}):
            dcfg = copy.deepcopy(base)
            for key, value in caps.items():
                setattr(dcfg, key, value)
            got, want = load_rows(dcfg), whole_read(dcfg)
            assert want[0] and (want[1] or {"max_eval_samples", "val_fraction"} & set(caps)), (name, caps)
            for g, w in zip(got, want):
                assert g == w and [r.origin for r in g] == [r.origin for r in w], (name, caps)
                assert all(type(r) is Row for r in g)
    # all rows of a file but one, in another order (a file whose rows are all kept is read whole)
    for kind, path, _ in sources.values():
        files = data_files(str(path), kind)
        whole, counts = read_rows(files, kind), row_counts(files, kind)
        keep = list(range(1, len(whole)))[::-1]
        assert [(r, r.origin) for r in read_rows(files, kind, keep=keep, counts=counts)] == \
            [(whole[i], whole[i].origin) for i in keep], path
    # (what the sources hold: the quoted newline is one value, U+2028 stays inside its row, the long record's rest)
    rows = read_files(str(tmp_path / "c.csv"), "csv")
    assert rows[1] == {"text": 'line 1\nmore, "quoted"', "label": "1"} and rows[1].origin.endswith("c.csv:4")
    assert rows[4] == {"text": "c4", "label": None} and rows[9] == {"text": "c9", "label": "1", None: ["extra"]}
    assert read_files(str(tmp_path / "jl"), "jsonl")[2]["text"] == "r2\u2028x\u2029y\x85z"
    assert read_files(str(tmp_path / "pq"), "parquet")[12] == {"text": "p12", "label": 0, "score": 4.0,
                                                               "tags": [], "meta": {"n": 12}}


def test_only_the_local_rows_kept_are_parsed(tmp_path, monkeypatch):
    """With data.max_train_samples / max_eval_samples, the rows not kept are not made dicts (10M rows were read to
    keep 1000), nor parsed: an invalid JSON line among them is not read. A kept row that is invalid, or no object,
    is the problem the whole read names."""
    import runx.recipes.text_data as td
    from runx.trainers.recipe import RecipeConfigError
    n, caps = 300, ("data.max_train_samples=4", "data.max_eval_samples=3")
    train, evals = td._split(range(n), 0.2, seed=0)
    kept = [*train[:4], *evals[:3]]
    skipped = next(i for i in range(n // 2, n) if i not in kept)
    lines = [json.dumps(r) + "\n" + ("\n" if i % 7 == 0 else "") for i, r in enumerate(_rows(0, n))]
    path = tmp_path / "d.jsonl"

    def load(lines, *caps):
        path.write_text("".join(lines))
        return td.load_rows(_data_cfg("data=jsonl", f"data.path={path}", *caps).data)

    built = []

    class CountedRow(td.Row):
        def __init__(self, *a):
            super().__init__(*a)
            built.append(self)

    monkeypatch.setattr(td, "Row", CountedRow)
    bad = lines[:skipped] + ["{not json\n"] + lines[skipped + 1:]
    with pytest.raises(RecipeConfigError, match=r"d.jsonl:\d+: invalid JSON"):   # (the whole read)
        load(bad)
    got = load(bad, *caps)
    assert [r["text"] for r in [*got[0], *got[1]]] == [f"row {i}" for i in kept] and len(built) == len(kept)
    # Parquet and CSV: only the kept rows are made dicts too
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(_rows(0, n)), tmp_path / "d.parquet", row_group_size=50)
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(n)))
    for kind in ("parquet", "csv"):
        built.clear()
        got = td.load_rows(_data_cfg("data=jsonl", f"data.kind={kind}", f"data.path={tmp_path / f'd.{kind}'}",
                                     *caps).data)
        assert [r["text"] for r in [*got[0], *got[1]]] == [f"row {i}" for i in kept] and len(built) == len(kept), kind
    # a kept row that is not JSON, or not an object: the message of the whole read
    for line, problem in (("{not json\n", r"d.jsonl:\d+: invalid JSON"), ("[1, 2]\n", r"row \d+ is a JSON list")):
        bad = lines[:kept[5]] + [line] + lines[kept[5] + 1:]
        with pytest.raises(RecipeConfigError, match=problem) as whole:
            load(bad)
        with pytest.raises(RecipeConfigError) as kept_read:
            load(bad, *caps)
        assert str(kept_read.value) == str(whole.value)


def test_a_large_uncapped_held_out_set_is_said(tmp_path, monkeypatch, caplog):
    """data.val_fraction=0.2 of 10M rows is 2M held-out rows, every one evaluated at each evaluation: above
    MANY_EVAL_ROWS uncapped held-out rows the load says so and names data.max_eval_samples; a cap silences it."""
    import logging

    from runx.recipes import text_data
    from runx.recipes.text_data import load_rows
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(50)))
    monkeypatch.setattr(text_data, "MANY_EVAL_ROWS", 9)
    dcfg = _data_cfg("data=jsonl", f"data.path={tmp_path / 'd.jsonl'}").data
    with caplog.at_level(logging.WARNING, logger="runx.text_data"):
        assert len(load_rows(dcfg)[1]) == 10
    assert "10 held-out rows" in caplog.text and "data.max_eval_samples=N" in caplog.text
    caplog.clear()
    dcfg.max_eval_samples = 10
    with caplog.at_level(logging.WARNING, logger="runx.text_data"):
        assert len(load_rows(dcfg)[1]) == 10
    assert "held-out rows" not in caplog.text
