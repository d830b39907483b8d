"""Launch entry of the "ring_update" fused op (lmc/passes/fuse_cache_writes.py): a sliding-
window attention's ring of W slots, updated in place with the step's new entries.

    inputs  the ring R (the static step's state buffer, W slots along `axis`: written in
            place), the new entries x (T along `axis`, R's other axes; any strides), the
            ring's slot map decode.ringW.src [W] (read by the op's body, the oracle: slot j's
            next content in [R | x]) and the new tokens' positions decode.pos [T]
    output  R itself: R' = gather(concat(R, x), src) along the axis

Position a lives in slot a mod W, so R' is R with the last min(T, W) new tokens stored at
the slots of their positions (consecutive positions: no two share a slot), which is what
the slot map says (a slot takes a new token exactly when one of the last W has its residue).
One program per (outer index, new token, block of inner elements) loads the token's entry and
stores it over its slot: it reads x only (through its strides: the axes before the slots and
those after them each merged into at most two), so R is written in place, after every reader
of the old ring (the op follows them in the step). min(T, W) entries moved per step, where
the concatenation and the gather moved the W slots and the Decoder copied them back.
"""
from __future__ import annotations

from typing import List

import triton
import triton.language as tl

from . import interpreter_blocks


@triton.jit
def _ring_update(R, X, POS, T, W, T_OFF, C, I2, O2, srb, srw, src, sx1, sx2, sxt, sxi1, sxi2,
                 spos, BLOCK_C: tl.constexpr):
    # R is [O, W, C] (the state buffer); X is [O1, O2, T, I1, I2] through its strides (its
    # axes before the slots as two, after them as two: O = O1 O2, C = I1 I2)
    o = tl.program_id(0).to(tl.int64)
    t = T_OFF + tl.program_id(1)             # one of the last min(T, W) new tokens
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    slot = tl.load(POS + t * spos).to(tl.int64) % W
    c64 = cols.to(tl.int64)
    x_off = (o // O2) * sx1 + (o % O2) * sx2 + t.to(tl.int64) * sxt + \
        (c64 // I2) * sxi1 + (c64 % I2) * sxi2
    x = tl.load(X + x_off, mask=ok)
    tl.store(R + o * srb + slot * srw + c64 * src, x.to(R.dtype.element_ty), mask=ok)


def _two(shape, strides):
    """Axes (sizes, strides) as exactly two: adjacent axes merged where their strides allow
    (a row-major run), size-1 axes dropped; None if more than two remain."""
    ax = [(n, st) for n, st in zip(shape, strides) if n != 1]
    merged = []
    for n, st in ax:
        if merged and merged[-1][1] == st * n:
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    if len(merged) > 2:
        return None
    merged = [(1, 0)] * (2 - len(merged)) + merged
    return merged


def launch_template(template: str, xs: List, outs: List, opts: dict) -> None:
    ring, x, _src, pos = xs
    (out,) = outs
    axis = int(opts["axis"]) % ring.dim()
    if out.data_ptr() != ring.data_ptr():     # not in place (a test): the old ring first
        out.copy_(ring)
    W, T = out.shape[axis], x.shape[axis]
    if T == 0 or out.numel() == 0:
        return
    n_outer = 1
    for d in out.shape[:axis]:
        n_outer *= d
    r3 = out.view(n_outer, W, -1)                   # the state buffer: contiguous
    outer = _two(x.shape[:axis], x.stride()[:axis])
    inner = _two(x.shape[axis + 1:], x.stride()[axis + 1:])
    if outer is None or inner is None:        # axes no stride pattern merges into two
        x = x.contiguous()
        outer = _two(x.shape[:axis], x.stride()[:axis])
        inner = _two(x.shape[axis + 1:], x.stride()[axis + 1:])
    (_, sx1), (O2, sx2) = outer
    (_, sxi1), (I2, sxi2) = inner
    n = min(T, W)
    C = r3.shape[2]
    block_c = 1024 if interpreter_blocks() else min(1024, max(32, triton.next_power_of_2(C)))
    for first in range(T - n, T, 65535):       # a grid's second axis holds 65535 programs
        grid = (n_outer, min(65535, T - first), triton.cdiv(C, block_c))
        _ring_update[grid](r3, x, pos, T, W, first, C, I2, O2, *r3.stride(), sx1, sx2,
                           x.stride(axis), sxi1, sxi2, pos.stride(0), BLOCK_C=block_c)
