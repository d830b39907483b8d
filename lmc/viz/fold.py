"""Folding repeated structure so a deep model stays one readable picture.

`fold(sigs)` takes a sequence of unit signatures (one per layer, or one per kernel launch)
and finds consecutive repeats: a block of `period` units that occurs `count` times in a row
is drawn once with "×count". Blocks may nest (minimax: seven linear-attention layers then one
softmax layer, twice, is `[lightning ×7, softmax] ×2`). The choice is greedy: the repeat
covering the most units wins (ties: the shorter period, then the earlier start), then the
units before and after it and the repeated block itself are folded the same way.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple


def layer_key(scope: str) -> Optional[Tuple[str, int]]:
    """(loop name, index) of the first numbered component of a scope path, or None."""
    if not scope:
        return None
    parts = scope.split(".")
    for i, p in enumerate(parts):
        if p.isdigit() and i > 0:
            return (".".join(parts[:i]), int(p))
    return None


def strip_layer(text: str, key: Optional[Tuple[str, int]]) -> str:
    """A scope or parameter name relative to its layer: "layers.3.attn.wq" -> "attn.wq"."""
    if key is None:
        return text
    pre = f"{key[0]}.{key[1]}"
    if text == pre:
        return ""
    if text.startswith(pre + "."):
        return text[len(pre) + 1:]
    return text


@dataclass
class Item:
    """A folded piece of the sequence: units [start, start + period) repeated `count` times;
    `inner` folds the block itself (count 1 and no inner: a plain run of units)."""
    start: int
    period: int
    count: int = 1
    inner: List["Item"] = field(default_factory=list)

    @property
    def stop(self) -> int:
        return self.start + self.period * self.count


def _candidates(sigs: Sequence[Hashable], lo: int, hi: int, min_period: int) -> List[int]:
    n = hi - lo
    if n <= 400:
        return list(range(min_period, n // 2 + 1))
    last: Dict[Hashable, int] = {}
    gaps: Counter = Counter()
    for j in range(lo, hi):
        s = sigs[j]
        if s in last:
            gaps[j - last[s]] += 1
        last[s] = j
    return sorted(p for p, _ in gaps.most_common(24) if min_period <= p <= n // 2)


def _best(sigs, lo, hi, min_period, min_cover):
    best = None   # (cover, -period, -start)
    for p in _candidates(sigs, lo, hi, min_period):
        j = lo
        while j + p < hi:
            if sigs[j] != sigs[j + p]:
                j += 1
                continue
            k = j
            while k + p < hi and sigs[k] == sigs[k + p]:
                k += 1
            r = (k - j) // p + 1
            if r >= 2 and p * r >= min_cover:
                key = (p * r, -p, -j)
                if best is None or key > best[0]:
                    best = (key, j, p, r)
            j = k + 1
    return None if best is None else best[1:]


def fold(sigs: Sequence[Hashable], min_period: int = 1, min_cover: int = 2,
         lo: int = 0, hi: Optional[int] = None) -> List[Item]:
    hi = len(sigs) if hi is None else hi
    if hi <= lo:
        return []
    b = _best(sigs, lo, hi, min_period, min_cover)
    if b is None:
        return [Item(lo, hi - lo)]
    s, p, r = b
    inner = fold(sigs, min_period, min_cover, s, s + p)
    if len(inner) == 1 and inner[0].count == 1:
        inner = []
    return (fold(sigs, min_period, min_cover, lo, s) + [Item(s, p, r, inner)]
            + fold(sigs, min_period, min_cover, s + p * r, hi))


def representative(items: List[Item]) -> Dict[int, int]:
    """unit index -> the unit drawn for it (itself when it is drawn)."""
    rep: Dict[int, int] = {}

    def walk(its: List[Item]):
        for it in its:
            for k in range(it.period * it.count):
                rep[it.start + k] = it.start + k % it.period
            if it.inner:
                walk(it.inner)

    walk(items)
    out = {}
    for u in rep:
        v = u
        while rep[v] != v:
            v = rep[v]
        out[u] = v
    return out
