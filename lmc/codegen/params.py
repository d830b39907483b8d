"""A generated kernel takes only the arguments its code reads.

A generator lists every parameter its template may read, in order, emits the kernel's body,
and declares those the body names (`prune`), plus any the GPU autotuner alone reads (its key:
a horizontal launch's total N, SPLIT_MAX). What a template variant leaves unread is then not
declared: the outermost size of a flat index's split (S0, RS0, Z0: nothing is taken modulo
it), the strides of an input read at one element for every lane, an output the kernel writes
through its input (a cache written in place). The launcher computes the values of the whole
list in the same order and passes those the kernel declares (`bind`, by the kernel's
`arg_names`), so generator and launcher decide per kernel, never by a second rule.
"""
from __future__ import annotations

import re
import weakref
from typing import Callable, Iterable, List, Sequence

from ..errors import LmcError

# a quoted string (kept: it is code), or a comment (dropped)
_COMMENT = re.compile(r"(\"[^\"\n]*\"|'[^'\n]*')|#[^\n]*")
_NAME = re.compile(r"[A-Za-z_]\w*")


def names_in(code: str) -> set:
    """The identifiers `code` uses outside its comments (a word inside a string counts: the
    answer may hold a name too many, never one too few)."""
    return set(_NAME.findall(_COMMENT.sub(lambda m: m.group(1) or "", code)))


def prune(params: Sequence[str], code: str, keep: Iterable[str] = ()) -> List[str]:
    """The parameters, in order, that the kernel body `code` reads or that are in `keep`."""
    used = names_in(code) | set(keep)
    return [p for p in params if p.split(":")[0].strip() in used]


def unread(params: Sequence[str], code: str) -> List[str]:
    """The parameters `code` does not read (those `prune` kept only for `keep`)."""
    used = names_in(code)
    return [p for p in params if p.split(":")[0].strip() not in used]


_PICK: dict = {}      # (kernel, the whole list) -> positions of the declared values


def bind(kernel, params: Sequence[str], values: Sequence) -> list:
    """The values of `params` (the generator's whole list; `values` in its order) that
    `kernel` declares, in its order: the positional arguments of its launch (the positions
    worked out once per kernel and list: a launch pays one lookup)."""
    if len(params) != len(values):
        raise LmcError(f"internal: {len(values)} launch values for {len(params)} kernel "
                       f"parameters ({getattr(kernel, '__name__', kernel)})")
    key = (kernel, tuple(params))
    pick = _PICK.get(key)
    if pick is None:
        at = {p.split(":")[0].strip(): i for i, p in enumerate(params)}
        pick = _PICK[key] = [at[a] for a in kernel.arg_names if a in at]
    return [values[i] for i in pick]


# per body graph (fixed once fused): its kernel's whole parameter list, which every launch
# asks for
_LISTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def of_body(body, key, make: Callable[[], List[str]]) -> List[str]:
    """make() (the whole parameter list of `body`'s kernel), computed once per (body, key)."""
    per = _LISTS.get(body)
    if per is None:
        per = _LISTS[body] = {}
    if key not in per:
        per[key] = make()
    return per[key]
