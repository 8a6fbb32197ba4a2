"""Question/answer data for VeriFree: the generated arithmetic reasoning task and JSONL / HF loading.

Every example is a dict with `question` and `answer` (a short reference string, the y* of the paper);
the generated task also carries `trace`, a worked reasoning trace used only by the supervised warm-up
(RL itself sees question + reference answer only).

The generated task: multi-step arithmetic word problems from templates, e.g.

    question  "Ann has 7 pens. She buys 5. She loses 3. How many pens now?"
    trace     "7+5=12. 12-3=9. "
    answer    "9"

Each problem is a start value and `steps` (+/- operand) updates; the held-out split is by the numeric
signature (start, ops, operands), so an evaluation problem never appears in training under another name.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
from dataclasses import dataclass

NAMES = [("Ann", "She"), ("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Eva", "She"), ("Max", "He"),
         ("Zoe", "She"), ("Leo", "He")]
ITEMS = ["pens", "cups", "apples", "coins", "books", "stamps", "cards", "shells"]
GAIN = ["buys {n}", "finds {n}", "gets {n}", "wins {n}"]
LOSE = ["loses {n}", "gives away {n}", "sells {n}", "drops {n}"]


@dataclass(frozen=True)
class ArithmeticTask:
    """Generator of arithmetic word problems with a deterministic train / held-out split."""
    steps: int = 2             # number of +/- updates after the start value
    max_operand: int = 9       # start value and operands are drawn from 1..max_operand
    eval_fraction: float = 0.2  # fraction of numeric signatures reserved for evaluation
    seed: int = 1234

    def signature_is_eval(self, sig: tuple) -> bool:
        h = int(hashlib.sha1(repr((self.seed, sig)).encode()).hexdigest()[:8], 16)
        return (h % 10_000) < self.eval_fraction * 10_000

    def sample(self, rng: random.Random) -> dict:
        value = rng.randint(1, self.max_operand)
        start, ops, trace = value, [], []
        for _ in range(self.steps):
            # subtract only when it keeps the running value >= 0, so answers stay natural numbers
            if value >= 1 and rng.random() < 0.5:
                n = rng.randint(1, min(value, self.max_operand))
                trace.append(f"{value}-{n}={value - n}. ")
                value, op = value - n, "-"
            else:
                n = rng.randint(1, self.max_operand)
                trace.append(f"{value}+{n}={value + n}. ")
                value, op = value + n, "+"
            ops.append((op, n))
        name, pron = rng.choice(NAMES)
        item = rng.choice(ITEMS)
        sents = [f"{name} has {start} {item}."]
        for op, n in ops:
            sents.append(f"{pron} " + rng.choice(GAIN if op == "+" else LOSE).format(n=n) + ".")
        sents.append(f"How many {item} now?")
        return {"question": " ".join(sents), "answer": str(value), "trace": "".join(trace),
                "signature": repr((start, tuple(ops)))}

    def generate(self, n: int, split: str, seed: int | None = None) -> list[dict]:
        """n problems of one split ("train" or "eval"); eval problems have distinct signatures."""
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r}: valid choices are 'train', 'eval'")
        rng = random.Random(f"{self.seed if seed is None else seed}-{split}")
        out, seen, tries = [], set(), 0
        want_eval = split == "eval"
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 10_000:
                raise ValueError(f"cannot draw {n} {split} problems with steps={self.steps}, "
                                 f"max_operand={self.max_operand}: the problem space is too small")
            ex = self.sample(rng)
            if self.signature_is_eval(ex["signature"]) != want_eval:
                continue
            if want_eval:  # held-out problems are distinct so accuracy is over distinct questions
                if ex["signature"] in seen:
                    continue
                seen.add(ex["signature"])
            out.append(ex)
        return out


def corrupt_trace(example: dict, rng: random.Random, kind: str = "early_stop") -> dict:
    """A flawed worked trace whose answer follows the flaw (a noisy demonstration):
    early_stop: the reasoning stops after a random proper prefix of its steps and answers that intermediate
        value (the policy then often answers prematurely: RL has to learn to finish the reasoning);
    slip: one step's result is off by 1-2, later steps carry the wrong value on correctly."""
    steps = [s for s in example["trace"].split(". ") if s.strip()]
    parsed = []
    for s in steps:
        lhs, res = s.rstrip(".").split("=")
        op = "+" if "+" in lhs else "-"
        a, b = lhs.split(op)
        parsed.append([int(a), op, int(b), int(res)])
    if kind == "early_stop":
        if len(parsed) < 2:
            return example
        parsed = parsed[:rng.randrange(1, len(parsed))]
    elif kind == "slip":
        k = rng.randrange(len(parsed))
        value = None
        for i, st in enumerate(parsed):
            if value is not None:
                st[0] = value
            exact = st[0] + st[2] if st[1] == "+" else st[0] - st[2]
            st[3] = exact
            if i == k:
                st[3] = max(0, exact + rng.choice([-2, -1, 1, 2]))
                if st[3] == exact:
                    st[3] += 1
            value = st[3]
    else:
        raise ValueError(f"recipe.warmup_corrupt_kind={kind!r}: valid choices are 'early_stop', 'slip'")
    trace = "".join(f"{a}{op}{b}={r}. " for a, op, b, r in parsed)
    return {**example, "trace": trace, "answer": str(parsed[-1][3])}


# ---- external data: JSONL files / folders, HF datasets -------------------------------------------

def _check_fields(row, source: str, question_field: str, answer_field: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(row).__name__}")
    missing = [f for f in (question_field, answer_field) if f not in row]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}; has {sorted(row)} "
                         f"(set recipe.question_field / recipe.answer_field)")
    for field, key in ((question_field, "recipe.question_field"), (answer_field, "recipe.answer_field")):
        v = row[field]   # a number is text here (an answer 12 is "12"); null, "", a list or an object is no text
        if v is None or isinstance(v, (bool, list, dict)) or not str(v).strip():
            raise ValueError(f"{source}: {key}={field!r} is {json.dumps(v)[:60]}: every row needs a non-empty "
                             f"string or number there (a null or empty reference answer would be rewarded as the "
                             f"literal text). Drop or fix the row")
    out = {"question": str(row[question_field]), "answer": str(row[answer_field]).strip()}
    if "trace" in row:
        out["trace"] = str(row["trace"])
    return out


def qa_rows(rows, source: str, question_field: str = "question", answer_field: str = "answer") -> list[dict]:
    """{question, answer[, trace]} dicts from data rows (any field names); errors name the source and row."""
    return [_check_fields(row, f"{source} row {i + 1}", question_field, answer_field) for i, row in enumerate(rows)]


def split_rows(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train / held-out split of one list of rows."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(val_fraction * len(rows)))) if rows else 0
    ev = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in ev], [r for i, r in enumerate(rows) if i in ev]


class QADataset:
    """A map-style dataset of {question, answer[, trace]} dicts (torch's DataLoader accepts it)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]
