"""The generated world behind PreSelect's embedded default: a multi-domain document pool and a benchmark task.

Everything comes from one seed, offline, in seconds. Five domains of short English-like documents:

  facts        statements of a fixed fact table ("it is said that the dorvak is melun."): the knowledge the
               benchmark asks about. Entities are drawn Zipf-like, so rare facts need more data to be learnt.
  lore         the same surface form over a *different* fact table: looks like `facts`, teaches nothing the
               benchmark asks (a classifier keyed on style alone cannot tell them apart).
  prose        sentences from a small grammar with its own vocabulary: learnable, not benchmark-aligned.
  noise        random letter strings: irreducible loss.
  boilerplate  near-duplicate web templates (cookie banners, footers): very low loss, nothing to learn.

The benchmark is multiple choice: "question: the <entity> is" with four same-length value words; a model picks the
continuation it gives the highest likelihood. The "question:" template never occurs in any document, so no
benchmark item is in the pool; the knowledge it probes is (in `facts` documents only).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOMAINS = ("facts", "lore", "prose", "noise", "boilerplate")
_CONS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_FACT_TEMPLATES = ["the {e} is {v}.", "we know that the {e} is {v}.", "in the old records the {e} is {v}.",
                   "it is said that the {e} is {v}.", "as everyone knows, the {e} is {v}.",
                   "and the {e} is {v}."]
_FACT_FILLER = ["this is well known.", "nobody doubts it.", "so it was written.", "many agree."]
_BOILERPLATE = ["subscribe to our newsletter for the latest news. copyright {y} {s}. all rights reserved.",
                "click here to accept cookies. we use cookies to improve your experience on {s}.",
                "home | about | contact | privacy policy | terms of use | {s} {y}",
                "share this page on social media. follow {s} for more updates.",
                "sign in or create an account to continue reading on {s}."]
_SITES = ["newsdaily", "bestdeals", "techhub", "myblog", "shopnow", "citypost", "webportal", "infozone"]
# stream ids: documents of different purposes never share a random stream
STREAMS = {"pool": 1, "sample": 2, "reference": 3, "benchmark": 4, "throughput": 5}


def _word(rng, syllables: int, closed: bool) -> str:
    w = "".join(_CONS[rng.integers(len(_CONS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(syllables))
    return w + (_CONS[rng.integers(len(_CONS))] if closed else "")


def _unique_words(rng, n: int, make, taken: set, suffix_taken: set | None = None, suffix: int = 0) -> list[str]:
    out = []
    while len(out) < n:
        w = make(rng)
        if w in taken or (suffix and w[-suffix:] in suffix_taken):
            continue
        taken.add(w)
        if suffix:
            suffix_taken.add(w[-suffix:])
        out.append(w)
    return out


@dataclass
class BenchmarkItem:
    prompt: str
    choices: list[str]
    answer: int


class World:
    """The fact tables and vocabularies, fixed by `seed`; documents are drawn from seeded streams."""

    def __init__(self, seed: int = 0, num_facts: int = 1500, num_values: int = 24, zipf: float = 1.0):
        rng = np.random.default_rng([seed, 0])
        self.seed = seed
        taken: set = set()
        suffixes: set = set()
        # entity names end in a 4-letter suffix unique across both tables, so an n-gram model with 8 chars of
        # context ("wxyz is ") can tell entities apart at the point where the value is predicted
        if 2 * num_facts > 3500:
            raise ValueError(f"num_facts={num_facts} is too large: at most 1750 (unique 4-letter entity suffixes)")
        ents = _unique_words(rng, 2 * num_facts, lambda r: _word(r, 2, True), taken, suffixes, suffix=4)
        self.values = _unique_words(rng, num_values, lambda r: _word(r, 2, True)[:5], taken)
        self.facts = {e: self.values[rng.integers(num_values)] for e in ents[:num_facts]}
        self.lore = {e: self.values[rng.integers(num_values)] for e in ents[num_facts:]}
        w = 1.0 / np.arange(1, num_facts + 1) ** zipf
        self.entity_cdf = np.cumsum(w / w.sum())
        self.nouns = _unique_words(rng, 40, lambda r: _word(r, 2, False), taken)
        self.verbs = _unique_words(rng, 25, lambda r: _word(r, 2, False) + "s", taken)
        self.adjs = _unique_words(rng, 25, lambda r: _word(r, 1, True) + "y", taken)

    # ---- documents ---------------------------------------------------------------------------
    def _fact_doc(self, rng, table: dict, length: int) -> str:
        ents = list(table)
        parts: list[str] = []
        n = 0
        while n < length:
            if rng.random() < 0.1:
                s = _FACT_FILLER[rng.integers(len(_FACT_FILLER))]
            else:
                e = ents[min(int(np.searchsorted(self.entity_cdf, rng.random(), side="right")), len(ents) - 1)]
                s = _FACT_TEMPLATES[rng.integers(len(_FACT_TEMPLATES))].format(e=e, v=table[e])
            parts.append(s)
            n += len(s) + 1
        return " ".join(parts)

    def _prose_doc(self, rng, length: int) -> str:
        def pick(xs):
            return xs[rng.integers(len(xs))]
        parts: list[str] = []
        n = 0
        while n < length:
            form = rng.integers(4)
            if form == 0:
                s = f"the {pick(self.adjs)} {pick(self.nouns)} {pick(self.verbs)} the {pick(self.nouns)}."
            elif form == 1:
                s = f"a {pick(self.nouns)} {pick(self.verbs)} near the {pick(self.adjs)} {pick(self.nouns)}."
            elif form == 2:
                s = f"then the {pick(self.nouns)} {pick(self.verbs)}, and a {pick(self.nouns)} {pick(self.verbs)}."
            else:
                s = f"every {pick(self.adjs)} {pick(self.nouns)} {pick(self.verbs)} with a {pick(self.nouns)}."
            parts.append(s)
            n += len(s) + 1
        return " ".join(parts)

    @staticmethod
    def _noise_doc(rng, length: int) -> str:
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
        words, n = [], 0
        while n < length:
            k = int(rng.integers(2, 10))
            words.append("".join(letters[rng.integers(len(letters), size=k)]))
            n += k + 1
        return " ".join(words)

    @staticmethod
    def _boilerplate_doc(rng, length: int) -> str:
        site, year = _SITES[rng.integers(len(_SITES))], int(rng.integers(2000, 2025))
        parts, n = [], 0
        while n < length:
            s = _BOILERPLATE[rng.integers(len(_BOILERPLATE))].format(y=year, s=site)
            parts.append(s)
            n += len(s) + 1
        return " ".join(parts)

    def document(self, rng, domain: str, length: int) -> str:
        if domain == "facts":
            return self._fact_doc(rng, self.facts, length)
        if domain == "lore":
            return self._fact_doc(rng, self.lore, length)
        if domain == "prose":
            return self._prose_doc(rng, length)
        if domain == "noise":
            return self._noise_doc(rng, length)
        if domain == "boilerplate":
            return self._boilerplate_doc(rng, length)
        raise ValueError(f"unknown domain {domain!r}: valid {list(DOMAINS)}")

    def documents(self, stream: str, index: int, num_docs: int, mixture: dict,
                  min_chars: int = 200, max_chars: int = 450) -> list[dict]:
        """`num_docs` documents of the given domain mixture from stream (`pool`, `sample`, ...) shard `index`."""
        names = [d for d in DOMAINS if mixture.get(d, 0) > 0]
        bad = sorted(set(mixture) - set(DOMAINS))
        if bad:
            raise ValueError(f"mixture has unknown domain(s) {bad}: valid {list(DOMAINS)}")
        w = np.array([float(mixture[d]) for d in names])
        rng = np.random.default_rng([self.seed, STREAMS[stream], index])
        doms = rng.choice(len(names), size=num_docs, p=w / w.sum())
        lens = rng.integers(min_chars, max_chars + 1, size=num_docs)
        return [{"id": f"{stream}-{index:05d}-{i:06d}", "text": self.document(rng, names[d], int(n)),
                 "domain": names[d]} for i, (d, n) in enumerate(zip(doms, lens))]

    def reference_corpus(self, index: int, mixture: dict, chars: int) -> list[str]:
        """About `chars` characters of training text for reference model `index`, domain fractions by chars."""
        names = [d for d in DOMAINS if mixture.get(d, 0) > 0]
        w = np.array([float(mixture[d]) for d in names])
        w = w / w.sum()
        rng = np.random.default_rng([self.seed, STREAMS["reference"], index])
        out = []
        for d, frac in zip(names, w):
            n = 0
            while n < frac * chars:
                t = self.document(rng, d, int(rng.integers(200, 451)))
                out.append(t)
                n += len(t)
        order = rng.permutation(len(out))
        return [out[i] for i in order]

    # ---- the benchmark -----------------------------------------------------------------------
    def benchmark(self, num_items: int) -> list[BenchmarkItem]:
        """Multiple choice over the `facts` table (uniform over entities, so rare facts count as much)."""
        rng = np.random.default_rng([self.seed, STREAMS["benchmark"]])
        ents = list(self.facts)
        pick = rng.choice(len(ents), size=min(num_items, len(ents)), replace=False)
        items = []
        for i in pick:
            e = ents[i]
            truth = self.facts[e]
            others = [v for v in self.values if v != truth]
            wrong = [others[j] for j in rng.choice(len(others), size=3, replace=False)]
            choices = [truth] + wrong
            perm = rng.permutation(4)
            items.append(BenchmarkItem(prompt=f"question: the {e} is",
                                       choices=[f" {choices[j]}." for j in perm],
                                       answer=int(np.flatnonzero(perm == 0)[0])))
        return items


def benchmark_accuracy(lm, items: list[BenchmarkItem]) -> float:
    """Fraction of items where the model gives the right choice the lowest bits (ties count as wrong)."""
    if not items:
        return 0.0
    prompts = [it.prompt for it in items for _ in it.choices]
    conts = [c for it in items for c in it.choices]
    bits = lm.continuation_bits(prompts, conts).reshape(len(items), -1)
    answers = np.array([it.answer for it in items])
    best = bits.min(axis=1)
    right = bits[np.arange(len(items)), answers]
    unique_best = (bits == best[:, None]).sum(axis=1) == 1
    return float(np.mean((right == best) & unique_best))
