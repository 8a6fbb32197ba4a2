"""A character n-gram language model, vectorised with numpy: PreSelect's embedded reference models and students.

Interpolated Witten-Bell smoothing over every context length 0..order-1:

    P_k(x | c_k) = (n(c_k, x) + T(c_k) * P_{k-1}(x | c_{k-1})) / (n(c_k) + T(c_k))     if n(c_k) > 0
                 = P_{k-1}(x | c_{k-1})                                                  otherwise
    P_{-1}(x)    = 1 / VOCAB

where c_k is the k characters before x, n(.) are training counts and T(c_k) the number of distinct characters
seen after c_k. Characters are 7-bit codes (code 0 = "before the document start", non-ASCII -> 127), so a
context of k <= 8 characters plus the next character packs exactly into one uint64: no hashing, no collisions.
Counting is one np.unique per order; scoring is one np.searchsorted per order over all positions at once.
"""
from __future__ import annotations

import io
import math

import numpy as np

VOCAB = 128          # code 0 is the start-of-document pad; 1..127 are characters
MAX_ORDER = 9        # 8 context chars * 7 bits + 7 bits for the next char = 63 bits
_ASCII = np.arange(256, dtype=np.uint8)
_ASCII[128:] = 127
_ASCII[0] = 127      # a literal NUL in text must not look like the document-start pad


def encode(texts: list[str], order: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents, each preceded by order-1 pad codes (0).

    Returns (codes uint8, doc_of_position int64 for every scored position or -1 on pads)."""
    pad = order - 1
    chunks, owners = [], []
    for i, t in enumerate(texts):
        if not t.isascii():
            t = "".join(c if ord(c) < 128 else "\x7f" for c in t)
        b = np.frombuffer(t.encode("ascii"), dtype=np.uint8)
        chunks.append(np.zeros(pad, np.uint8))
        chunks.append(_ASCII[b])
        owners.append(np.full(pad, -1, np.int64))
        owners.append(np.full(len(b), i, np.int64))
    if not chunks:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64)
    return np.concatenate(chunks), np.concatenate(owners)


def _full_context(codes: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    """Key of the `width` characters before each position, the most recent char in the highest 7-bit slot.

    The key of a shorter context is this key with its low slots cleared, so one sort by the full key sorts
    every shorter context too (scoring sorts its queries once for all orders)."""
    key = np.zeros(len(positions), np.uint64)
    for j in range(1, width + 1):
        key |= codes[positions - j].astype(np.uint64) << np.uint64(7 * (width - j))
    return key


def _context_mask(k: int, width: int) -> np.uint64:
    """Keeps the k most recent characters of a full-width context key."""
    return np.uint64(((1 << (7 * k)) - 1) << (7 * (width - k)))


class CharNgramLM:
    def __init__(self, order: int):
        if not 1 <= order <= MAX_ORDER:
            raise ValueError(f"n-gram order={order} is out of range: valid 1..{MAX_ORDER}")
        self.order = order
        # per context length k: sorted context keys, their counts n(c), distinct followers T(c),
        # and sorted joint keys (c << 7 | x) with counts n(c, x)
        self.ctx_keys: list[np.ndarray] = []
        self.ctx_count: list[np.ndarray] = []
        self.ctx_types: list[np.ndarray] = []
        self.joint_keys: list[np.ndarray] = []
        self.joint_count: list[np.ndarray] = []
        self.train_chars = 0

    # ---- counting ----------------------------------------------------------------------------
    def fit(self, texts: list[str]) -> "CharNgramLM":
        codes, owner = encode(texts, self.order)
        pos = np.flatnonzero(owner >= 0)
        self.train_chars = int(len(pos))
        nxt = codes[pos].astype(np.uint64)
        width = self.order - 1
        full = _full_context(codes, pos, width)
        for k in range(self.order):
            ctx = full & _context_mask(k, width)
            joint, jcount = np.unique((ctx << np.uint64(7)) | nxt, return_counts=True)
            cks, first = np.unique(joint >> np.uint64(7), return_index=True)
            self.ctx_keys.append(cks)
            self.ctx_count.append(np.add.reduceat(jcount, first).astype(np.int64) if len(first) else
                                  np.zeros(0, np.int64))
            self.ctx_types.append(np.diff(np.append(first, len(joint))).astype(np.int64))
            self.joint_keys.append(joint)
            self.joint_count.append(jcount.astype(np.int64))
        return self

    # ---- scoring -----------------------------------------------------------------------------
    def position_log2prob(self, codes: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """log2 P(codes[p] | preceding chars) for every p in pos (pos must have order-1 pads before it).

        Queries are sorted once by their full context, so every order's context column is sorted too:
        each distinct context is looked up once, and the lookups walk the tables in order."""
        width = self.order - 1
        full = _full_context(codes, pos, width)
        perm = np.argsort(full, kind="stable")
        full = full[perm]
        nxt = codes[pos][perm].astype(np.uint64)
        p = np.full(len(pos), 1.0 / VOCAB)
        active = np.arange(len(pos))       # positions whose context was seen at every lower order
        for k in range(self.order):
            keys = self.ctx_keys[k]
            if len(active) == 0 or len(keys) == 0:
                break
            ctx = full[active] & _context_mask(k, width)
            first = np.ones(len(ctx), bool)
            first[1:] = ctx[1:] != ctx[:-1]
            group = np.cumsum(first) - 1
            uctx = ctx[first]
            i = np.minimum(np.searchsorted(keys, uctx), len(keys) - 1)
            seen = (keys[i] == uctx)[group]
            # an unseen context at order k is unseen at every higher order: P stays at the order below
            active, ctx, i = active[seen], ctx[seen], i[group][seen]
            joint = (ctx << np.uint64(7)) | nxt[active]
            jk = self.joint_keys[k]
            j = np.minimum(np.searchsorted(jk, joint), len(jk) - 1)
            njoint = np.where(jk[j] == joint, self.joint_count[k][j], 0)
            n, t = self.ctx_count[k][i], self.ctx_types[k][i]
            p[active] = (njoint + t * p[active]) / (n + t)
        out = np.empty(len(pos))
        out[perm] = np.log2(p)
        return out

    def doc_bits(self, texts: list[str], chunk_docs: int = 4096) -> np.ndarray:
        """Total bits (-log2 likelihood) of each document."""
        out = np.zeros(len(texts))
        for s in range(0, len(texts), chunk_docs):
            part = texts[s:s + chunk_docs]
            codes, owner = encode(part, self.order)
            pos = np.flatnonzero(owner >= 0)
            if len(pos):
                out[s:s + len(part)] = -np.bincount(owner[pos], weights=self.position_log2prob(codes, pos),
                                                    minlength=len(part))
        return out

    def bits_per_char(self, texts: list[str]) -> np.ndarray:
        chars = np.array([max(len(t), 1) for t in texts], dtype=np.float64)
        return self.doc_bits(texts) / chars

    def continuation_bits(self, prompts: list[str], continuations: list[str]) -> np.ndarray:
        """-log2 P(continuation | prompt) for each pair (the prompt is scored as context only)."""
        codes, owner = encode([p + c for p, c in zip(prompts, continuations)], self.order)
        pos = np.flatnonzero(owner >= 0)
        # position of each scored char within its document, to drop the prompt part
        starts = np.searchsorted(owner[pos], np.arange(len(prompts)))
        within = np.arange(len(pos)) - starts[owner[pos]]
        plen = np.array([len(p) for p in prompts])
        keep = within >= plen[owner[pos]]
        lp = self.position_log2prob(codes, pos[keep])
        return -np.bincount(owner[pos][keep], weights=lp, minlength=len(prompts))

    # ---- saving ------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        arrays = {"order": np.array(self.order), "train_chars": np.array(self.train_chars)}
        for k in range(self.order):
            arrays[f"ck{k}"], arrays[f"cc{k}"], arrays[f"ct{k}"] = \
                self.ctx_keys[k], self.ctx_count[k], self.ctx_types[k]
            arrays[f"jk{k}"], arrays[f"jc{k}"] = self.joint_keys[k], self.joint_count[k]
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        from runx.trainers.datajob import atomic_write_bytes
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str) -> "CharNgramLM":
        z = np.load(path)
        lm = cls(int(z["order"]))
        lm.train_chars = int(z["train_chars"])
        for k in range(lm.order):
            lm.ctx_keys.append(z[f"ck{k}"])
            lm.ctx_count.append(z[f"cc{k}"])
            lm.ctx_types.append(z[f"ct{k}"])
            lm.joint_keys.append(z[f"jk{k}"])
            lm.joint_count.append(z[f"jc{k}"])
        return lm


LN2 = math.log(2.0)
