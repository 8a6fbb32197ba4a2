"""Text datasets for the language recipes: the built-in stdlib_topics set, JSONL / Parquet / CSV files or
folders of shards, and Hugging Face `datasets` (hub name or a local saved dataset); and the shard files the
data recipes (preselect, concept_prune) read: which files a path names, their format and compression.

Classification rows: {text, label}. Causal-LM rows: {text}, {prompt, response} (prompt tokens masked out of the
loss; the field names are data.prompt_field / data.response_field) or {messages: [{role, content}, ...]} rendered
with the tokenizer's chat template (or data.chat_template), the assistant turns trained on, the rest masked.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import io
import itertools
import json
import logging
import math
import numbers
import os
import random
import re

import numpy as np

from runx.trainers.recipe import RecipeConfigError

log = logging.getLogger("runx.text_data")

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
STDLIB_TOPICS = ["text", "maths", "files_os", "network"]


# ---- shard files: <name>.<format>[.gz | .zst] ----------------------------------------------------------------
FORMAT_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv",
                   ".txt": "txt"}
COMPRESSION_SUFFIXES = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
OTHER_COMPRESSION_SUFFIXES = (".bz2", ".xz", ".lz4", ".zip", ".7z")   # recognised, not read


def shard_format(path: str, formats: tuple[str, ...] = ("jsonl", "parquet")) -> tuple[str, str] | None:
    """(format, compression) of a shard from its name, or None if it is not a readable file of `formats`.
    Line formats (jsonl, csv, txt) may be gzip or zstandard compressed; Parquet compresses inside the file."""
    name, comp = path.lower(), "none"
    for suffix, c in COMPRESSION_SUFFIXES.items():
        if name.endswith(suffix):
            name, comp = name[: -len(suffix)], c
            break
    fmt = next((f for suffix, f in FORMAT_SUFFIXES.items() if name.endswith(suffix)), None)
    if fmt not in formats or (fmt == "parquet" and comp != "none"):
        return None
    return fmt, comp


def open_shard(path: str, compression: str):
    """The file's bytes, decompressed (binary, line-iterable)."""
    f = open(path, "rb")
    if compression == "gz":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if compression == "zst":
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, closefd=True))
    return f


def files_at(spec: str, recursive: bool) -> list[str]:
    """The files a path option names: a file, a folder's files (`recursive`: its subfolders' too) or a glob."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if recursive:
            return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        return [f for f in (os.path.join(path, f) for f in os.listdir(path)) if os.path.isfile(f)]
    if any(ch in path for ch in "*?["):
        return [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    return [path] if os.path.isfile(path) else []


def select_shards(files: list[str], formats: tuple[str, ...], key: str) -> list[str]:
    """The shards among `files`, sorted (shard index = position). A data file of `formats` in a compression
    that is not read (.bz2, a compressed .parquet, ...) is an error rather than silently missing from the
    job; any other file left out is logged."""
    shards = sorted(f for f in files if shard_format(f, formats))
    unread = sorted(f for f in set(files) - set(shards) if _compressed_data_file(f, formats))
    if unread:
        raise ValueError(f"{key}: cannot read {unread[0]}" + (f" (and {len(unread) - 1} more)" if len(unread) > 1
                         else "") + ": compress JSONL / CSV / text with gzip (.gz) or zstandard (.zst), and "
                         "leave Parquet files uncompressed (Parquet compresses inside the file)")
    skipped = sorted(os.path.basename(f) for f in set(files) - set(shards))
    if skipped:
        log.warning("%s: skipped %d file(s) that are not %s: %s%s", key, len(skipped), " / ".join(formats),
                    ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
    return shards


def _compressed_data_file(path: str, formats: tuple[str, ...]) -> bool:
    name = path.lower()
    for suffix in (*COMPRESSION_SUFFIXES, *OTHER_COMPRESSION_SUFFIXES):
        if name.endswith(suffix):
            inner = name[: -len(suffix)]
            return any(inner.endswith(s) for s, f in FORMAT_SUFFIXES.items() if f in formats)
    return False


class Row(dict):
    """A row read from a file, which remembers where (`origin`: "file:line", or "file row n" for Parquet), so that a
    problem with one row among thousands can name the line to fix. Equal to the plain dict of its fields."""
    __slots__ = ("origin",)

    def __init__(self, fields, origin: str):
        super().__init__(fields)
        self.origin = origin


def row_at(rows, i: int, split: str = "training") -> str:
    """'<split> row <i+1>', with the file and line it was read from when known ('training row 5 (a.jsonl:5)')."""
    origin = getattr(rows[i], "origin", None)
    return f"{split} row {i + 1}".lstrip() + (f" ({origin})" if origin else "")


def _zstd_bytes(raw: bytes) -> bytes:
    """A .zst file's bytes, every frame of it (concatenated files, pzstd). A truncated frame is an error: zstandard's
    stream reader ends it silently, which lost the file's last rows (or cut one mid-line)."""
    import zstandard
    out = []
    while raw:
        d = zstandard.ZstdDecompressor().decompressobj()
        out.append(d.decompress(raw))
        if not d.eof:
            raise EOFError("the file ends inside a zstandard frame (truncated)")
        raw = d.unused_data
    return b"".join(out)


def _read_text(path: str) -> str:
    """A (.gz / .zst compressed) text file's text; a leading UTF-8 byte-order mark is not data. A compressed file
    that does not decompress (truncated by an interrupted copy, or not compressed at all) is a problem naming it."""
    fmt = shard_format(path, ("jsonl", "csv", "txt"))
    comp = fmt[1] if fmt else "none"
    with open(path, "rb") as f:
        data = f.read()
    if comp != "none":
        import zstandard
        try:
            data = _zstd_bytes(data) if comp == "zst" else gzip.decompress(data)
        except (OSError, EOFError, zstandard.ZstdError) as e:   # (gzip.BadGzipFile is an OSError)
            raise RecipeConfigError(f"{path}: corrupt or not {'gzip' if comp == 'gz' else 'zstd'} data ({e}). "
                                    f"Valid choices: a complete {'.gz' if comp == 'gz' else '.zst'} file (copy it "
                                    f"again), or the file without the {os.path.splitext(path)[1]} suffix if it is "
                                    f"not compressed") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}). Valid choices: UTF-8 "
                                f"JSON Lines / CSV, optionally .gz or .zst compressed") from None


# a row of JSON Lines: a line (ended by a line feed only) with a character other than white space (group 1: from the
# start of its line), matched from the line feed before it (a search for "^..." tried every character: 4x slower)
JSONL_ROW, FIRST_JSONL_ROW = re.compile(r"\n([^\S\n]*\S)"), re.compile(r"([^\S\n]*\S)")
JSON_ARRAY = re.compile(r"\s*\[")   # a JSON array (alpaca-style .json), not JSON Lines


def _jsonl_lines(text: str, want=None, path: str = "<text>"):
    """(line number, line) of a JSON Lines text's rows, its non-blank lines; `want`: only the rows of these numbers
    (sorted; 0: the first row), found without splitting the text. A line ends at a line feed only (CRLF too):
    U+2028 / U+2029 / U+0085 inside a string are valid JSON, which json.dumps(..., ensure_ascii=False) writes
    unescaped, and str.splitlines() broke such a line in two."""
    if want is None:
        for lineno, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")
            if line.strip():
                yield lineno, line
        return
    first = FIRST_JSONL_ROW.match(text)
    rows = itertools.chain([first] if first else [], JSONL_ROW.finditer(text))
    lineno, at = 1, 0   # (the line number of position `at`)
    for a, b in zip([-1, *want], want):
        row = next(itertools.islice(rows, b - a - 1, None), None)   # (the rows between skipped at C speed)
        if row is None:   # (fewer rows than counted a moment ago)
            raise RecipeConfigError(f"{path}: row {b + 1} is gone (the file changed while it was read)")
        lineno, at = lineno + text.count("\n", at, row.start(1)), row.start(1)
        end = text.find("\n", at)
        yield lineno, text[at:end if end >= 0 else len(text)].removesuffix("\r")


def _read_jsonl(path: str, want=None) -> list[dict]:
    """Rows of a JSON Lines file (.gz too), or of a .json file that holds one JSON array of rows (`_jsonl_lines`);
    `want`: only the rows of these numbers (sorted; 0: the first row), the other lines not parsed."""
    text = _read_text(path)
    if JSON_ARRAY.match(text):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        numbers = range(len(rows)) if want is None else want
        rows, origins = [rows[i] for i in numbers], [f"{path} row {i + 1}" for i in numbers]
    else:
        rows, origins = [], []
        for lineno, line in _jsonl_lines(text, want, path):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecipeConfigError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            origins.append(f"{path}:{lineno}")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise RecipeConfigError(f"{path}: row {(bad if want is None else want[bad]) + 1} is a JSON "
                                f"{type(rows[bad]).__name__}, not an object ({{field: value, ...}})")
    return [Row(r, o) for r, o in zip(rows, origins)]


def _count_jsonl(path: str) -> int:
    """The rows of a JSON Lines file, its lines not parsed (a JSON array is)."""
    text = _read_text(path)
    if JSON_ARRAY.match(text):
        return len(_read_jsonl(path))
    return bool(FIRST_JSONL_ROW.match(text)) + len(JSONL_ROW.findall(text))


# the metadata files of a datasets save_to_disk folder (a DatasetDict's, and each split's)
HF_SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def kind_mismatch(key: str, path: str, kind: str) -> str | None:
    """The problem with a file whose name says another format than data.kind (a .jsonl read as Parquet), or None."""
    named = shard_format(path, ("jsonl", "parquet", "csv")) if os.path.isfile(os.path.expanduser(path)) else None
    if named and named[0] != kind:
        return (f"data.kind={kind}: {key}={path} is a {named[0]} file. Valid choices: data.kind={named[0]}, or a "
                f"{' / '.join(FILE_EXTENSIONS[kind])} file")
    return None


def data_files(path: str, kind: str, key: str = "data.path") -> list[str]:
    """The files of data.kind that data.path (or data.eval_path: `key`) names: the file itself, a folder's files
    (its subfolders' too, hidden ones left out, as a save_to_disk folder's metadata .json files), or the files a
    glob matches (`runx validate` accepts a glob, so the run reads one too)."""
    ext = FILE_EXTENSIONS[kind]
    full = os.path.expanduser(path)
    if os.path.isdir(full) and any(os.path.exists(os.path.join(full, m)) for m in HF_SAVED_MARKERS):
        raise RecipeConfigError(f"{key}={path}: a saved Hugging Face dataset (save_to_disk), not "
                                f"{kind} files. Valid choices: data=hf data.hf_name={path}")
    if os.path.isdir(full):
        files = glob.glob(os.path.join(full, "**", "*"), recursive=True)
    elif os.path.isfile(full):
        files = [full]
    else:   # a glob (files_at: nothing when it is neither)
        files = files_at(full, recursive=True)
    if not os.path.isfile(full):
        files = sorted(f for f in files if f.endswith(ext) and os.path.isfile(f)
                       and os.path.basename(f) not in HF_SAVED_MARKERS)
    if not files:
        raise RecipeConfigError(f"{key}={path}: no {' / '.join(ext)} files there (data.kind={kind})")
    problem = kind_mismatch(key, path, kind)
    if problem:
        raise RecipeConfigError(problem)
    return files


def read_rows(files: list[str], kind: str, key: str = "data.path", keep=None, counts=None) -> list[dict]:
    """The rows of these JSONL (or JSON array) / Parquet / CSV files, each a `Row` that knows its file and line.
    `keep`: only the rows of these numbers (0: the first row of the first file; `counts`: the rows of each file, as
    `row_counts` gives them), in that order; the other rows are not read as dicts (nor checked)."""
    if keep is None:
        return [r for f in files for r in _file_rows(f, kind, key)]
    numbers = np.unique(np.asarray(keep, dtype=np.int64))
    starts = np.cumsum([0, *counts])
    file_of = np.searchsorted(starts, numbers, side="right") - 1
    rows = {}
    for j in np.unique(file_of).tolist():   # (files with no kept row are not read; those kept whole, read whole)
        mine = numbers[file_of == j]
        want = None if len(mine) == counts[j] else (mine - starts[j]).tolist()
        rows.update(zip(mine.tolist(), _file_rows(files[j], kind, key, want)))
    return [rows[i] for i in keep]


def row_counts(files: list[str], kind: str, key: str = "data.path") -> list[int]:
    """The rows of each of these files, not read as dicts: JSON Lines' non-blank lines, Parquet's metadata, CSV's
    records (as csv.DictReader reads them: after the header, empty ones skipped)."""
    def count(f):
        if kind == "jsonl":
            return _count_jsonl(f)
        if kind == "parquet":
            import pyarrow.parquet as pq
            with _parquet_problem(f, key), pq.ParquetFile(f) as pf:
                return pf.metadata.num_rows
        records = csv.reader(_csv_lines(_read_text(f)))
        next(records, None)   # (the header)
        return sum(1 for r in records if r)
    return [count(f) for f in files]


def _file_rows(f: str, kind: str, key: str, want=None) -> list[dict]:
    """The rows of one file; `want`: only the rows of these numbers (sorted; 0: its first row)."""
    if kind == "jsonl":
        return _read_jsonl(f, want)
    if kind == "parquet":
        import pyarrow.parquet as pq
        with _parquet_problem(f, key):
            if want is None:
                return [Row(r, f"{f} row {i + 1}") for i, r in enumerate(pq.read_table(f).to_pylist())]
            with pq.ParquetFile(f) as pf:
                rows = [r for batch in parquet_rows_at(pf, np.asarray(want, np.int64)) for r in batch.to_pylist()]
            return [Row(r, f"{f} row {i + 1}") for i, r in zip(want, rows)]
    reader = csv.DictReader(_csv_lines(_read_text(f)))
    if want is None:
        return [Row(r, f"{f}:{reader.line_num}") for r in reader]   # (the line a record ends on)
    reader.fieldnames   # (the header read)
    records, rows = filter(None, reader.reader), []   # (DictReader's records: it skips empty ones)
    for a, b in zip([-1, *want], want):
        next(itertools.islice(records, b - a - 1, b - a - 1), None)   # the records between: parsed, not made dicts
        rows.append(Row(next(reader), f"{f}:{reader.line_num}"))
    return rows


def parquet_rows_at(pf, rows: np.ndarray, batch_size: int = 8192):
    """The rows numbered `rows` (0-based, sorted, unique) of a pyarrow ParquetFile, as record batches in file order:
    only the row groups that hold one are read, a batch at a time, and nothing after the last."""
    import pyarrow as pa
    start = 0
    for g in range(pf.metadata.num_row_groups):
        if np.searchsorted(rows, start) == len(rows):
            return
        n = pf.metadata.row_group(g).num_rows
        if np.searchsorted(rows, start + n) > np.searchsorted(rows, start):   # a wanted row in this group
            at = start
            for batch in pf.iter_batches(batch_size=batch_size, row_groups=[g]):
                lo, hi = np.searchsorted(rows, [at, at + batch.num_rows])
                if hi > lo:
                    yield batch.take(pa.array(rows[lo:hi] - at))
                at += batch.num_rows
        start += n


def _csv_lines(text: str):
    """The lines of a CSV text as a file opened with newline="" gives them to the csv module (ended by \\r\\n, \\r or
    \\n, kept), read from 1 MB pieces that end at a line feed: an io.StringIO of the whole text held a copy of it, 4
    bytes a character."""
    def pieces(at=0):
        while at < len(text):
            end = text.find("\n", at + (1 << 20)) + 1 or len(text)
            yield text[at:end]
            at = end
    return itertools.chain.from_iterable(io.StringIO(piece, newline="") for piece in pieces())


@contextlib.contextmanager
def _parquet_problem(f: str, key: str):
    """A file that is not Parquet is a config problem naming it."""
    import pyarrow
    try:
        yield
    except (pyarrow.ArrowInvalid, OSError) as e:
        raise RecipeConfigError(f"{key}={f}: not a readable Parquet file ({str(e).splitlines()[0]}). "
                                f"Valid choices: data.kind=jsonl|csv for text files") from None


def read_files(path: str, kind: str, key: str = "data.path") -> list[dict]:
    """The rows of a JSONL (or JSON array) / Parquet / CSV file, of every such file in a folder (recursive), or of
    the files a glob matches."""
    return read_rows(data_files(path, kind, key), kind, key)


FILE_EXTENSIONS = {"jsonl": tuple(f"{e}{c}" for e in (".jsonl", ".json", ".ndjson") for c in ("", ".gz", ".zst")),
                   "parquet": (".parquet",), "csv": (".csv", ".csv.gz", ".csv.zst")}

# names that make a file or folder of a data.path folder a split of it (besides data.train_split / data.eval_split):
# a folder of shards with other names (part-0.jsonl, ...) is training data as a whole
SPLIT_NAMES = ("train", "training", "validation", "valid", "val", "dev", "eval", "evaluation", "test", "testing")
HF_SHARD = re.compile(r"(.+?)-\d+-of-\d+")    # datasets' (and the hub's) shard names: train-00000-of-00004


def _split_of(rel: str, ext: tuple[str, ...], names) -> str | None:
    """The split a file of a data.path folder belongs to (`rel`: its path in the folder), or None: it lies in a
    <split>/ folder (at the top of data.path), or is named <split>.<ext>, a shard <split>-NNNNN-of-NNNNN.<ext> (as
    datasets writes a split), or <split>-<number>... / <split>_<number>... Other names that merely start with a
    split word (test_results.jsonl, training_notes.jsonl) name no split."""
    *folders, name = rel.split(os.sep)
    if folders and folders[0] in names:
        return folders[0]
    stem = next((name[: -len(e)] for e in sorted(ext, key=len, reverse=True) if name.endswith(e)), name)
    shard = HF_SHARD.fullmatch(stem)
    if shard and shard.group(1) in names:
        return shard.group(1)
    if stem in names:
        return stem
    return next((n for n in sorted(names, key=len, reverse=True)
                 if re.match(re.escape(n) + r"[-_]\d", stem)), None)


def read_local_splits(dcfg) -> tuple[list[dict], list[dict] | None]:
    """(train rows, held-out rows or None) of local files (data.kind jsonl / parquet / csv): `local_split_files`."""
    files, eval_files = local_split_files(dcfg)
    return read_rows(files, dcfg.kind, "data.path"), (read_rows(eval_files, dcfg.kind, "data.eval_path")
                                                      if eval_files is not None else None)


def read_local_kept(dcfg) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of local files as load_rows keeps them (`_split`, `_at_most`), with only those
    read: as with data=hf, which rows are kept is decided on row numbers first (`row_counts`; the numbers shuffled
    as the rows were, so that the same rows are drawn), and a few rows kept of many (data.max_train_samples) are the
    only ones read as dicts."""
    kind = dcfg.kind
    files, eval_files = local_split_files(dcfg)
    counts = row_counts(files, kind, "data.path")
    if eval_files is None:   # data.val_fraction of the training rows held out (the files read once for both)
        train, evals = _at_most(*_split(range(sum(counts)), dcfg.val_fraction, seed=0), dcfg)
        rows = read_rows(files, kind, "data.path", [*train, *evals], counts)
        return rows[:len(train)], rows[len(train):]
    eval_counts = row_counts(eval_files, kind, "data.eval_path")
    train, evals = _at_most(range(sum(counts)), range(sum(eval_counts)), dcfg)
    return (read_rows(files, kind, "data.path", train, counts),
            read_rows(eval_files, kind, "data.eval_path", evals, eval_counts))


def local_split_files(dcfg) -> tuple[list[str], list[str] | None]:
    """(train files, held-out files or None) of local files (data.kind jsonl / parquet / csv). A data.path folder
    whose files name splits (`_split_of`: train.jsonl + validation.jsonl, datasets' train-00000-of-00001.jsonl shards,
    train/ + validation/ folders) is read as those splits: data.train_split is the training data and
    data.eval_split, if there, the held-out data (the other files are not read); a folder of shards with no split
    names is training data as a whole. data.eval_path (a file, folder or glob) names the held-out data outright;
    its files are not training data even where they lie inside data.path (unless they are all of data.path's files,
    as runx eval names a file to evaluate whole). None: no held-out files were named."""
    kind = dcfg.kind
    files = data_files(dcfg.path, kind, "data.path")
    eval_files = data_files(dcfg.eval_path, kind, "data.eval_path") if dcfg.get("eval_path") else None
    if eval_files:
        held = {os.path.realpath(f) for f in eval_files}
        inside = [f for f in files if os.path.realpath(f) in held]
        if inside and len(inside) < len(files):   # (the same files: runx eval's data.path=<file> evaluated whole)
            files = [f for f in files if os.path.realpath(f) not in held]
            log.info("data.eval_path=%s: %d file(s) inside data.path=%s are held out, not trained on", dcfg.eval_path,
                     len(inside), dcfg.path)
    folder = os.path.expanduser(dcfg.path)
    same = eval_files is not None and {os.path.realpath(f) for f in files} <= {os.path.realpath(f) for f in eval_files}
    if os.path.isdir(folder) and not same:   # (same: a folder runx eval evaluates whole, as data.eval_path too)
        names = {*SPLIT_NAMES, dcfg.train_split, dcfg.eval_split}
        splits: dict = {}
        for f in files:
            splits.setdefault(_split_of(os.path.relpath(f, folder), FILE_EXTENSIONS[kind], names), []).append(f)
        rest = splits.pop(None, [])
        if splits and dcfg.train_split not in splits and not {"train", "training"} & set(splits):
            # split-named files but no training split (corpus.jsonl + test.jsonl, dev/ + other/): the folder is
            # training data as a whole, as before split names were read; said, since a held-out file is in it
            log.warning("data.path=%s: file(s) named for the split(s) %s, but none for data.train_split=%s: the "
                        "whole folder is training data (name the splits with data.train_split / data.eval_split, "
                        "or the held-out files with data.eval_path)", dcfg.path, ", ".join(sorted(splits)),
                        dcfg.train_split)
            splits = {}
        if splits:
            if dcfg.train_split not in splits:   # (a training split under another name: data.train_split mistyped)
                unnamed = (f", and {len(rest)} file(s) named for no split ({os.path.relpath(rest[0], folder)}"
                           f"{', ...' if len(rest) > 1 else ''})" if rest else "")
                raise RecipeConfigError(
                    f"data.train_split={dcfg.train_split}: no such split in data.path={dcfg.path}, whose files name "
                    f"the split(s) {', '.join(sorted(splits))} (<split>.<ext>, <split>-*.<ext>, <split>_*.<ext> or a "
                    f"<split>/ folder){unnamed}. Valid choices: data.train_split={' | '.join(sorted(splits))}, or "
                    f"data.path / data.eval_path naming the training and held-out files")
            if rest:
                log.warning("data.path=%s: %d file(s) named for no split are not read (data.train_split=%s is): %s%s",
                            dcfg.path, len(rest), dcfg.train_split,
                            ", ".join(os.path.relpath(f, folder) for f in rest[:5]), ", ..." if len(rest) > 5 else "")
            if eval_files is None:
                split = held_out_split(sorted(splits), dcfg, dcfg.path)
                eval_files = splits[split] if split else None
            files = splits[dcfg.train_split]
    return files, eval_files


def held_out_split(splits, dcfg, src: str) -> str | None:
    """The split of a source's `splits` that is evaluated on: data.eval_split. A source with no split besides
    data.train_split gives None (data.val_fraction of the training rows is held out); one whose other splits do
    not include data.eval_split is a config problem naming them, rather than an evaluation on carved-off
    training rows while the source's own held-out split goes unused."""
    splits = list(splits)
    if dcfg.eval_split in splits:
        return dcfg.eval_split
    others = [s for s in splits if s != dcfg.train_split]
    if others:
        raise RecipeConfigError(f"data.eval_split={dcfg.eval_split}: not a split of {src}. Valid choices: "
                                f"{', '.join(others)}.")
    log.info("%s has no split besides data.train_split=%s: data.val_fraction=%s of it is held out for evaluation",
             src, dcfg.train_split, dcfg.val_fraction)
    return None


def load_hf_splits(src: str, train_split: str, load_kwargs: dict | None = None):
    """A Hugging Face dataset as {split: rows}: a `save_to_disk` folder of a DatasetDict, or of a single Dataset
    (which is then the `train_split`), or a hub / cache name (datasets.load_dataset(src, **data.extra): a
    subset's name, a revision)."""
    import datasets
    path = os.path.expanduser(src)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, m)) for m in HF_SAVED_MARKERS):
            kinds = sorted({fmt[0] for fmt in (shard_format(f, ("jsonl", "parquet", "csv"))
                                                for f in files_at(path, True)) if fmt})
            raise RecipeConfigError(f"data.hf_name={src}: a folder, but not a saved Hugging Face dataset "
                                    f"(save_to_disk writes {' / '.join(HF_SAVED_MARKERS)}). Valid choices: "
                                    + (f"data=jsonl data.kind={kinds[0]} data.path={src} for its "
                                       f"{' / '.join(kinds)} files, or " if kinds else "")
                                    + "a save_to_disk folder, or a hub id")
        ds = datasets.load_from_disk(path)
        ds = {train_split: ds} if isinstance(ds, datasets.Dataset) else ds
    else:
        from runx.trainers.hf import load_hub_dataset
        ds = load_hub_dataset("data.hf_name", src, **dict(load_kwargs or {}))
    if train_split not in ds:
        raise RecipeConfigError(f"data.train_split={train_split}: not a split of {src}. Valid choices: "
                                f"{', '.join(ds)}.")
    return ds


def require_rows(train: list, dcfg) -> None:
    """A data source with no training row is a config problem naming it (not a ZeroDivisionError later)."""
    if not train:
        src = f"data.hf_name={dcfg.hf_name}" if dcfg.kind == "hf" and dcfg.hf_name else f"data.path={dcfg.path}"
        raise RecipeConfigError(f"{src}: 0 training rows (data.kind={dcfg.kind})")


def load_rows(dcfg, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) for a `data:` section."""
    kind = dcfg.kind
    if kind == "builtin":
        if dcfg.name not in ("stdlib_topics", "tiny_text"):
            raise ValueError(f"data.name={dcfg.name!r} is not a built-in text dataset "
                             f"(valid choices: stdlib_topics, tiny_text)")
        rows = _read_jsonl(os.path.join(ASSETS, "stdlib_topics.jsonl"))
        train, evals = _split(rows, dcfg.val_fraction, seed=0)  # fixed split, whatever the run seed
    elif kind in ("jsonl", "parquet", "csv"):
        if dcfg.max_train_samples or dcfg.max_eval_samples is not None:   # some rows kept: only those are read
            train, evals = read_local_kept(dcfg)
        else:
            train, evals = read_local_splits(dcfg)
            if evals is None:
                train, evals = _split(train, dcfg.val_fraction, seed=0)
    elif kind == "hf":
        src = dcfg.hf_name or dcfg.path
        ds = load_hf_splits(src, dcfg.train_split, dcfg.extra)
        split = held_out_split(ds, dcfg, src)
        # which rows are kept is decided on row numbers first, and a few rows kept of many (data.max_train_samples)
        # are the only ones read as dicts (memory: every row of the split was). The numbers are shuffled as the rows
        # were (the same shuffle of as many items), so that the same rows are drawn.
        import datasets
        parts = {s: ds[s] if isinstance(ds[s], datasets.Dataset) else list(ds[s])   # (a streamed one: read whole)
                 for s in {dcfg.train_split, split} - {None}}
        train, evals = range(len(parts[dcfg.train_split])), range(len(parts[split]) if split else 0)
        if not evals:
            train, evals = _split(train, dcfg.val_fraction, seed=0)
            split = dcfg.train_split
        train, evals = _at_most(train, evals, dcfg)

        def rows_of(name, at):   # rows that name their split: a problem with one says "imdb[test] row 7"
            part = parts[name]
            if isinstance(part, datasets.Dataset) and 2 * len(at) < len(part):
                picked = part.select(at)   # a few rows: only those are read
            else:   # most rows: read whole, in order, once (faster than picking them: datasets reads those one by one)
                part = parts[name] = part if isinstance(part, list) else list(part)
                picked = [part[i] for i in at]
            return [Row(r, f"{src}[{name}] row {i + 1}") for i, r in zip(at, picked)]
        train, evals = rows_of(dcfg.train_split, train), rows_of(split, evals)
    else:
        raise ValueError(f"data.kind={kind!r} is not a text source (valid choices: builtin, jsonl, parquet, csv, hf)")
    require_rows(train, dcfg)
    if dcfg.max_eval_samples is None and len(evals) > MANY_EVAL_ROWS:
        log.warning("%d held-out rows, all evaluated at every evaluation (data.val_fraction=%s of the training rows, "
                    "or the held-out split); data.max_eval_samples=N evaluates the first N", len(evals),
                    dcfg.val_fraction)
    return _at_most(train, evals, dcfg)


MANY_EVAL_ROWS = 50_000   # more held-out rows than this, uncapped, are said (at 10M rows 20% is 2M per evaluation)


def _at_most(train, evals, dcfg):
    """The first data.max_train_samples training rows and data.max_eval_samples held-out rows."""
    if dcfg.max_train_samples:
        train = train[: int(dcfg.max_train_samples)]
    if dcfg.max_eval_samples is not None:   # 0: no evaluation (None: all held-out rows)
        evals = evals[: int(dcfg.max_eval_samples)]
    return train, evals


def _split(rows, frac, seed):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_eval = int(round(len(rows) * frac))
    return rows[n_eval:], rows[:n_eval]


def _missing_value(v) -> bool:
    """A null / NaN cell (JSON null, an empty CSV or Parquet cell as pandas reads it)."""
    return v is None or isinstance(v, float) and math.isnan(v)


INT_TEXT = re.compile(r"\s*-?\d+\s*")   # a class id as CSV gives it ("3", "-1")


def _class_id(label) -> int | None:
    """A label's class id: an int, a whole float (pandas writes an int column with gaps as floats) or an int's text
    (CSV); None for a class name (text; a bool is named "False" / "True": isinstance(True, int) left bool classes
    unnamed)."""
    if isinstance(label, bool):
        return None
    if isinstance(label, numbers.Integral) or isinstance(label, numbers.Real) and float(label).is_integer():
        return int(label)
    if isinstance(label, str) and INT_TEXT.fullmatch(label):
        return int(label)
    return None


def _not_a_class(label) -> str | None:
    """What a label that is neither a class id nor a class name is (a list: multi-label, a fraction: a regression
    target), or None. They were read as class names ("[0, 2]") or, for 0.5 / 1.5 / 2.5, numbered as classes."""
    if isinstance(label, (str, bool)) or isinstance(label, numbers.Real) and float(label).is_integer():
        return None
    if isinstance(label, numbers.Real):
        return f"a {type(label).__name__}: a regression target"
    if isinstance(label, (list, tuple, set)):
        return f"a {type(label).__name__}: several classes, multi-label"
    return f"a {type(label).__name__}"


def _not_text(value) -> bool:
    """A list / dict (anything but text or a number) in a text field: it was trained on as its Python repr."""
    return not isinstance(value, (str, numbers.Number))


def _not_text_problem(key: str, field: str, rows, i: int, split: str, lm: bool = False) -> RecipeConfigError:
    value = rows[i][field]
    chat = lm and isinstance(value, list) and value and all(isinstance(m, dict) for m in value)
    return RecipeConfigError(f"{key}={field!r}: {row_at(rows, i, split)} has a {type(value).__name__} "
                             f"({str(value)[:60]!r}), not text. Valid values: a string in every row"
                             + (f"; a conversation (list of turns) is read with data.messages_field={field!r}"
                                if chat else ""))


class TokenRows:
    """Rows of token ids (or labels, masks) of varying length, held as one flat numpy array plus int64 offsets.
    Memory: a list of Python ints holds 8-40 bytes a token, a tokenizer's BatchEncoding with its Rust per-row
    encodings ~220; this holds 4 (int32). Rows are appended while tokenising and moved into numpy every
    `CHUNK` tokens, so no list of every row's tokens is held either. Row i is given back as a list of Python ints,
    as it was before (the collators and token_lengths read lists)."""

    CHUNK = 1 << 16   # tokens buffered in a Python list before they move into a numpy array

    def __init__(self, dtype=np.int32):
        self.dtype = dtype
        self._buf: list[int] = []
        self._lens: list[int] = []
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []   # (tokens, row lengths) of the rows appended so far
        self.flat = np.zeros(0, dtype)
        self.offsets = np.zeros(1, np.int64)

    def append(self, row) -> None:
        self._buf.extend(row)
        self._lens.append(len(row))
        if len(self._buf) >= self.CHUNK:
            self._flush()

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)

    def _flush(self) -> None:
        if self._lens:
            self._parts.append((np.array(self._buf, self.dtype), np.array(self._lens, np.int64)))
            self._buf, self._lens = [], []

    def done(self) -> "TokenRows":
        """The rows appended so far, made one array (call once, after the last append)."""
        self._flush()
        if self._parts:
            self.flat = np.concatenate([t for t, _ in self._parts])
            self.offsets = np.concatenate([[0], np.cumsum(np.concatenate([n for _, n in self._parts]))])
        self._parts = []
        return self

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i) -> list[int]:
        i = range(len(self))[i]   # a negative index counts from the end, one past it is an IndexError, as in a list
        return self.flat[self.offsets[i]:self.offsets[i + 1]].tolist()


class ClassificationDataset:
    """Tokenised {text, label} rows. Labels are class ids 0..num_labels-1, or names: those are numbered in sorted
    order of the training split's names (`label_names`), which the held-out split is given so that its ids
    agree. A label outside the model's classes is a config problem naming model.num_labels; so is a label that is
    no class (a list, a fraction: multi-label and regression are not supported) and a negative one (an unlabelled
    row, as GLUE's test splits have). Training rows with fewer classes than model.num_labels are a warning."""

    CHUNK_ROWS = 1024   # rows tokenised per tokenizer call

    def __init__(self, rows, tokenizer, text_field: str, label_field: str, max_length: int,
                 num_labels: int | None = None, label_names: list | None = None, split: str = "training"):
        missing = next((i for i, r in enumerate(rows) if text_field not in r or label_field not in r), None)
        if missing is not None:   # (every row: one after the first 1000 was a KeyError traceback)
            raise RecipeConfigError(f"data rows need fields {text_field!r} and {label_field!r} (data.text_field / "
                                    f"data.label_field); {row_at(rows, missing, split)} has {sorted(rows[missing])}")
        no_text = next((i for i, r in enumerate(rows) if _missing_value(r[text_field])), None)
        if no_text is not None:   # (it was trained on as the text "None" / "nan")
            raise RecipeConfigError(f"data.text_field={text_field!r}: {row_at(rows, no_text, split)} has no text "
                                    f"({rows[no_text][text_field]!r}). Valid values: a string in every row (drop or "
                                    f"fill the rows without one)")
        odd = next((i for i, r in enumerate(rows) if _not_text(r[text_field])), None)
        if odd is not None:
            raise _not_text_problem("data.text_field", text_field, rows, odd, split)
        self.labels = [r[label_field] for r in rows]
        empty = next((i for i, l in enumerate(self.labels) if l is None or isinstance(l, float) and math.isnan(l)
                      or isinstance(l, str) and not l.strip()), None)
        if empty is not None:
            raise RecipeConfigError(f"data.label_field={label_field!r}: {row_at(rows, empty, split)} has no label "
                                    f"({self.labels[empty]!r}): {str(rows[empty].get(text_field))[:60]!r}. Valid "
                                    f"values: a class id or name in every row (drop or fill the unlabelled rows)")
        odd = next((i for i, l in enumerate(self.labels) if _not_a_class(l)), None)
        if odd is not None:
            raise RecipeConfigError(f"data.label_field={label_field!r}: {row_at(rows, odd, split)} has label "
                                    f"{str(self.labels[odd])[:60]} ({_not_a_class(self.labels[odd])}): regression "
                                    f"and multi-label classification are not supported. Valid values: one class id "
                                    f"(0..num_labels-1) or class name in every row")
        ids_given = all(_class_id(l) is not None for l in self.labels)
        if ids_given:   # (a float column of whole numbers, as pandas writes an int column with gaps: ids too)
            self.labels = [_class_id(l) for l in self.labels]      # class ids, as CSV gives them too ("3")
        names = label_names if label_names is not None else sorted(
            {str(l) for l in self.labels if not isinstance(l, int) or isinstance(l, bool)})
        self.label_names = list(names) if names else None
        if names and not ids_given:  # string labels -> ids, sorted for a stable mapping
            ids = {n: i for i, n in enumerate(names)}
            unknown = sorted({str(l) for l in self.labels} - set(ids))
            if unknown:
                hint = (" (held-out rows drawn from few rows by data.val_fraction can hold a class the training "
                        "rows lack: name held-out rows with data.eval_path, or give more rows)"
                        if split == "held-out" else "")
                raise RecipeConfigError(f"data.label_field={label_field!r}: the {split} rows have label(s) "
                                        f"{', '.join(unknown[:5])} that the training rows lack, so they have no class "
                                        f"id. Valid choices: {', '.join(map(str, names[:20]))}{hint}")
            self.labels = [ids[str(l)] for l in self.labels]
        negative = [i for i, l in enumerate(self.labels) if l < 0]
        if negative:   # (it said "outside 0..2. Valid choices: model.num_labels=0")
            fix = ("another data.eval_split (a labelled split, e.g. validation), data.eval_path=<a labelled file>, "
                   "or the held-out rows without the unlabelled ones" if split == "held-out" else
                   "another data.train_split, or the rows without the unlabelled ones (if -1 is a class, number "
                   "the classes from 0 or name them)")
            raise RecipeConfigError(f"data.label_field={label_field!r}: {len(negative)} {split} row(s) have label "
                                    f"{self.labels[negative[0]]} (first: {row_at(rows, negative[0], split)}): a "
                                    f"negative label marks an unlabelled row (a split whose labels are withheld, as "
                                    f"GLUE's test splits), which cannot be "
                                    f"{'evaluated' if split == 'held-out' else 'trained on'}. Valid choices: {fix}")
        if num_labels is not None:
            bad = sorted({l for l in self.labels if l >= num_labels})
            if bad:
                n = max(self.labels) + 1 if ids_given else len(names)
                fix = (f"model.num_labels={n} (the classes of data.label_field={label_field!r})" if n > num_labels
                       else f"class ids 0..{num_labels - 1} in data.label_field={label_field!r}")
                raise RecipeConfigError(f"model.num_labels={num_labels}: the {split} rows have class id(s) "
                                        f"{', '.join(map(str, bad[:5]))} outside 0..{num_labels - 1}. Valid choices: "
                                        f"{fix}")
            present = set(self.labels)
            if split == "training" and label_names is None and present and len(present) < num_labels:
                # (a run's own data; not the classes a finished run is evaluated with)
                unused = [i for i in range(num_labels) if i not in present]
                fits = max(present) + 1
                log.warning("data.label_field=%r: the training rows have %d class(es)%s, and model.num_labels=%d: "
                            "class id(s) %s%s have no training row, and the head's outputs for them are never "
                            "trained%s", label_field, len(present),
                            f" ({', '.join(map(str, names[:10]))})" if names and not ids_given else "", num_labels,
                            ", ".join(map(str, unused[:5])), ", ..." if len(unused) > 5 else "",
                            f". Valid choices: model.num_labels={fits}" if fits < num_labels else "")
        # tokenised a chunk of rows at a time into flat arrays (TokenRows): the whole BatchEncoding, with its Rust
        # per-row encodings, held ~220 bytes a token. Each row is tokenised on its own either way (no padding).
        self.input_ids, self.attention_mask = TokenRows(), TokenRows(np.int8)
        for at in range(0, len(rows), self.CHUNK_ROWS):
            enc = tokenizer([str(r[text_field]) for r in rows[at:at + self.CHUNK_ROWS]], truncation=True,
                            max_length=max_length)
            self.input_ids.extend(enc["input_ids"])
            self.attention_mask.extend(enc["attention_mask"])
        self.input_ids.done()
        self.attention_mask.done()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


# ---- chat rows: {messages: [{role, content}, ...]} ------------------------------------------------------------
# ChatML, for tokenizers without a chat template of their own (`data.chat_template=chatml`)
# chatml for a tokenizer that has no chat template: its <|im_end|> is plain text there, not the tokenizer's eos, so
# an assistant turn also ends with the eos token (trained on with the turn): generate() stops after a turn
CHAT_TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
               "{% if m['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "tool": "tool"}


def _chat_template_kind(value) -> str | None:
    """What `data.chat_template=value` is: unset, name (built-in), text (Jinja), file, or None (none of them)."""
    if value in (None, ""):
        return "unset"
    if value in CHAT_TEMPLATES:
        return "name"
    if "{{" in str(value) or "{%" in str(value):
        return "text"
    return "file" if os.path.isfile(os.path.expanduser(str(value))) else None


def chat_template_problem(value) -> str | None:
    """Why `data.chat_template=value` cannot be used, or None: a built-in name, Jinja text, or a .jinja file."""
    if _chat_template_kind(value) is not None:
        return None
    return (f"data.chat_template={value}: neither a built-in template, Jinja text nor a file on this machine. "
            f"Valid choices: {', '.join(CHAT_TEMPLATES)}, a Jinja template ('{{% for m in messages %}}...'), a path "
            f"to a .jinja file, or unset to use the tokenizer's own")


def resolve_chat_template(value, tokenizer, source: str) -> str:
    """The Jinja text a chat run renders with: data.chat_template (name, text or file), else the tokenizer's."""
    kind = _chat_template_kind(value)
    if kind is None:
        raise RecipeConfigError(chat_template_problem(value))
    if kind == "name":
        return CHAT_TEMPLATES[value]
    if kind == "text":
        return str(value)
    if kind == "file":
        with open(os.path.expanduser(str(value))) as f:
            return f.read()
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):                       # several named templates: the default one
        own = own.get("default")
    if not own:
        raise RecipeConfigError(f"data.chat_template: the tokenizer of {source} has no chat template, which chat "
                                f"rows (data.messages_field) need. Valid choices: {', '.join(CHAT_TEMPLATES)}, a "
                                f"Jinja template, or a path to a .jinja file")
    return own


def chat_messages(row_messages, row: int, field: str) -> list[dict]:
    """A row's conversation as [{role, content}]: OpenAI-style messages, or ShareGPT's {from, value} turns."""
    def bad(why):
        return RecipeConfigError(f"data.messages_field={field!r}: row {row}: {why}; a conversation is a list of "
                                 f"{{'role': 'user' | 'assistant' | 'system', 'content': text}}")
    if not isinstance(row_messages, (list, tuple)):
        raise bad(f"a {type(row_messages).__name__} ({str(row_messages)[:40]!r}), not a list of turns")
    if not row_messages:
        raise bad("an empty conversation")
    out = []
    for i, m in enumerate(row_messages):
        if not isinstance(m, dict):
            raise bad(f"turn {i} is a {type(m).__name__}")
        if "role" in m:
            role, content = m["role"], m.get("content")
        elif "from" in m:
            role, content = SHAREGPT_ROLES.get(m["from"], m["from"]), m.get("value")
        else:
            raise bad(f"turn {i} has no 'role' (fields {sorted(m)})")
        if isinstance(content, list):               # [{type: text, text: ...}, ...] parts
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad(f"turn {i} has non-text content parts")
            content = "".join(p.get("text", "") for p in content)
        if content is None and m.get("tool_calls"):
            content = ""                              # an assistant turn that only calls tools
        if not isinstance(content, str):
            raise bad(f"turn {i} ({role}) has content {type(content).__name__}, not text")
        out.append({**{k: v for k, v in m.items() if k not in ("from", "value")}, "role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise bad("no assistant turn to train on")
    return out


def chat_tokens(tokenizer, messages: list[dict], template: str, train_on_prompt: bool = False):
    """(input_ids, labels) of one conversation rendered with `template`: every assistant turn is trained on,
    from after its header to its end-of-turn marker included; everything else is -100 (all of it trained on with
    `train_on_prompt`). A turn's span is located by rendering the conversation up to it: the text before the
    turn is the render of the earlier turns plus the generation prompt, the text through it the render that ends
    with it. A template whose earlier turns change once later turns follow (e.g. one that drops past reasoning)
    cannot be split this way and is refused."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=gen)
    full = render(messages)
    spans = []
    if not train_on_prompt:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = _render_or_empty(render, messages[:i]), render(messages[: i + 1])
            if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
                raise RecipeConfigError(
                    "data.chat_template: the template renders a conversation's earlier turns differently once "
                    "later turns follow, so its assistant turns cannot be located in the text. Valid choices: "
                    "another template (data.chat_template=chatml, Jinja text or a .jinja file), or "
                    "data.train_on_prompt=true to train on every token")
            spans.append((len(before), len(through)))
    enc = with_offsets(tokenizer, full)
    if enc is None:
        raise RecipeConfigError("data.messages_field: chat rows need a fast tokenizer (one that maps tokens to "
                                "characters); this model's is not. Valid choices: model.tokenizer=<a fast "
                                "tokenizer>, or prompt/response rows") from None
    ids = list(enc["input_ids"])
    if train_on_prompt:
        return ids, list(ids)
    return ids, _labels_in(ids, enc["offset_mapping"], spans)


def with_offsets(tokenizer, text: str):
    """The encoding of `text` with each token's character offsets, or None for a tokenizer that has none (a slow,
    Python one: transformers ignores return_offsets_mapping there, or raises; a remote-code one)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):
        return None
    return enc if "offset_mapping" in enc else None


def _labels_in(ids: list[int], offsets, spans) -> list[int]:
    """Each token's label: itself where its characters overlap a trained span [a, b), else -100. A token that
    straddles the span's start (a header's trailing space merged into the first word, " cat") is the token the
    model writes there, so it is trained on."""
    return [t if any(start < b and max(end, start + 1) > a for a, b in spans) else -100
            for t, (start, end) in zip(ids, offsets)]


def pair_tokens(tokenizer, prompt: str, response: str, train_on_prompt: bool = False):
    """(input_ids, labels) of prompt + response + eos, tokenised as one text, the way the model reads it (apart,
    a SentencePiece tokenizer would start the response with a word-start mark, "x=" + "4" read as "x= 4", and a
    byte-level one split a prompt's trailing space from the first word); the response's tokens are labelled
    (`_labels_in`), the prompt's -100. A slow tokenizer (no character offsets) tokenises the two apart."""
    enc = with_offsets(tokenizer, prompt + response)
    if enc is not None:
        ids = list(enc["input_ids"])
        labels = list(ids) if train_on_prompt else _labels_in(ids, enc["offset_mapping"],
                                                              [(len(prompt), len(prompt) + len(response))])
    else:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = p + tokenizer(response, add_special_tokens=False)["input_ids"]
        labels = list(ids) if train_on_prompt else [-100] * len(p) + ids[len(p):]
    return ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]


def _render_or_empty(render, msgs) -> str:
    """The text before a turn: the earlier turns and the generation prompt (a template may refuse no turns)."""
    try:
        return render(msgs, gen=True)
    except Exception:
        if msgs:
            raise
        return ""


class CausalLMDataset:
    """Tokenised text; with prompt/response rows the prompt is masked (-100) in the labels, with chat rows
    (`messages_field`) everything but the assistant turns (`chat_tokens`); `train_on_prompt` trains on every
    token. Samples left with no label to predict after truncation to max_length (a prompt that fills it) are
    dropped, with a warning."""

    def __init__(self, rows, tokenizer, text_field: str, max_length: int, prompt_field: str = "prompt",
                 response_field: str = "response", messages_field: str = "messages", chat_template=None,
                 train_on_prompt: bool = False, source: str = "the model"):
        pair = lambda r: prompt_field in r and response_field in r   # noqa: E731
        chat = lambda r: messages_field in r   # noqa: E731
        bad = next((i for i, r in enumerate(rows) if not chat(r) and not pair(r) and text_field not in r), None)
        if bad is not None:
            raise RecipeConfigError(
                f"causal-LM rows need data.text_field ({text_field!r}), data.prompt_field + data.response_field "
                f"({prompt_field!r}, {response_field!r}) or data.messages_field ({messages_field!r}); "
                f"{row_at(rows, bad, '')} has {sorted(rows[bad])}")
        for field, uses in ((text_field, lambda r: not chat(r) and not pair(r)),
                            (prompt_field, pair), (response_field, pair)):   # the fields each row is read from
            key = {text_field: "data.text_field", prompt_field: "data.prompt_field"}.get(field, "data.response_field")
            hole = next((i for i, r in enumerate(rows) if uses(r) and _missing_value(r[field])), None)
            if hole is not None:   # (trained on as the text "None")
                raise RecipeConfigError(f"{key}={field!r}: {row_at(rows, hole, '')} has no text "
                                        f"({rows[hole][field]!r}). Valid values: a string in every row (drop or fill "
                                        "the rows without one)")
            odd = next((i for i, r in enumerate(rows) if uses(r) and _not_text(r[field])), None)
            if odd is not None:   # (trained on as its Python repr)
                raise _not_text_problem(key, field, rows, odd, "", lm=True)
        template = resolve_chat_template(chat_template, tokenizer, source) if any(map(chat, rows)) else None
        # ids and labels held as flat int32 arrays (TokenRows), not lists of Python ints (~44 bytes a token)
        self.input_ids, self.labels = TokenRows(), TokenRows()
        dropped = 0
        for i, r in enumerate(rows):
            if chat(r):                               # the template places bos / end-of-turn tokens itself
                ids, labels = chat_tokens(tokenizer, chat_messages(r[messages_field], i, messages_field), template,
                                          train_on_prompt)
            else:
                if pair(r):
                    ids, labels = pair_tokens(tokenizer, str(r[prompt_field]), str(r[response_field]),
                                              train_on_prompt)
                else:
                    ids = (tokenizer(str(r[text_field]), add_special_tokens=False)["input_ids"]
                           + [tokenizer.eos_token_id])
                    labels = list(ids)
                if tokenizer.bos_token_id is not None:
                    ids, labels = [tokenizer.bos_token_id] + ids, [-100] + labels
            ids, labels = ids[:max_length], labels[:max_length]
            if not any(t != -100 for t in labels[1:]):   # label t is predicted from t-1
                dropped += 1
                continue
            self.input_ids.append(ids)
            self.labels.append(labels)
        self.input_ids.done()
        self.labels.done()
        if dropped:
            if not len(self.input_ids):
                raise RecipeConfigError(f"data.max_length={max_length}: none of the {dropped} samples has a "
                                        f"response token left after truncation (the prompts fill it); raise "
                                        f"data.max_length or shorten the prompts")
            log.warning("dropped %d of %d samples with no response token within data.max_length=%d (the prompt "
                        "fills it)", dropped, len(self.input_ids) + dropped, max_length)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": self.labels[i]}


def pad_collate(pad_id: int):
    """Right-pad input_ids / attention_mask / per-token labels (-100) to the longest in the batch."""
    import torch

    def collate(items):
        n = max(len(it["input_ids"]) for it in items)
        out = {"input_ids": torch.full((len(items), n), pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(items), n), dtype=torch.long)}
        per_token = isinstance(items[0]["labels"], list)
        out["labels"] = torch.full((len(items), n), -100, dtype=torch.long) if per_token else \
            torch.tensor([it["labels"] for it in items], dtype=torch.long)
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            out["input_ids"][i, :k] = torch.tensor(it["input_ids"])
            out["attention_mask"][i, :k] = 1
            if per_token:
                out["labels"][i, :k] = torch.tensor(it["labels"])
        return out

    return collate


def first_fit(lengths: list[int], capacity: int) -> tuple[list[int], list[int], list[int]]:
    """Sequences of these lengths placed into rows of `capacity` tokens, longest first, each into the first row
    with room (a sequence longer than `capacity` gets a row of its own length). Returns (row of each sequence,
    its offset in that row, tokens used per row)."""
    row_of, offset = [0] * len(lengths), [0] * len(lengths)
    room: list[int] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((k for k, left in enumerate(room) if left >= lengths[i]), None)
        if r is None:
            room.append(max(capacity, lengths[i]))
            used.append(0)
            r = len(room) - 1
        row_of[i], offset[i] = r, used[r]
        room[r] -= lengths[i]
        used[r] += lengths[i]
    return row_of, offset, used


def pack_collate(pad_id: int, max_length: int):
    """Causal LM micro-batches packed into rows of at most `max_length` tokens (`first_fit`; a sample longer than
    that keeps a row to itself). Each sample restarts `position_ids` at 0, which transformers turns into a
    block-diagonal causal mask when no attention_mask is given; the first label of every sample is masked
    (-100) so that no token is predicted across a boundary, and the padding at the end of a row is a sequence of
    its own with no labels. `attention_mask` marks real tokens, for counting only: the loss leaves it out."""
    import torch

    def collate(items):
        lengths = [len(it["input_ids"]) for it in items]
        row_of, offset, used = first_fit(lengths, max_length)
        rows, width = len(used), max(used)
        out = {"input_ids": torch.full((rows, width), pad_id, dtype=torch.long),
               "attention_mask": torch.zeros((rows, width), dtype=torch.long),
               "labels": torch.full((rows, width), -100, dtype=torch.long),
               "position_ids": torch.zeros((rows, width), dtype=torch.long)}
        for it, r, at, k in zip(items, row_of, offset, lengths):
            out["input_ids"][r, at:at + k] = torch.tensor(it["input_ids"])
            out["attention_mask"][r, at:at + k] = 1
            out["labels"][r, at + 1:at + k] = torch.tensor(it["labels"][1:])
            out["position_ids"][r, at:at + k] = torch.arange(k)
        for r, u in enumerate(used):
            out["position_ids"][r, u:] = torch.arange(width - u)
        return out

    return collate
