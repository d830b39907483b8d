"""Launch entry of the "shift_update" fused op (lmc/passes/fuse_cache_writes.py): a decoded
causal shift's history, the last S values of x along time, updated in place.

    inputs  the history H [B, S, C] (the static step's state buffer: written in place) and
            the new values x [B, T, C] (any strides)
    output  H itself: H' = concat(H, x, 1)[:, T:T + S], the last S of the S + T positions

One program per (sequence, block of channels) loads its S rows of H' (row j reads H at j + T
while that is a history slot, x at j + T - S after), waits at a barrier until all its threads
have loaded (a row's load and the store over that slot may be different threads'), then stores
them; no other program touches those elements, so the update needs no second buffer: one
launch in place of the step's torch.cat and the Decoder's copy of the result back into the
state. A history longer than MAX_S slots (a register tile of S x BLOCK_C) is updated by torch.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from . import interpreter_blocks

MAX_S = 64      # history slots one program holds as a register tile


@triton.jit
def _shift_update(H, X, T, S, C, shb, shs, shc, sxb, sxt, sxc,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_S)
    src = rows + T                       # the row's position among the S + T
    keep = (rows < S)[:, None] & (cols < C)[None, :]
    old = keep & (src < S)[:, None]
    new = keep & (src >= S)[:, None]
    h = tl.load(H + b * shb + src[:, None] * shs + cols[None, :] * shc, mask=old, other=0.0)
    x = tl.load(X + b * sxb + (src - S)[:, None] * sxt + cols[None, :] * sxc, mask=new,
                other=0.0)
    v = tl.where(old, h.to(tl.float32), x.to(tl.float32))
    # a row's load and the store over it may be different threads': every thread's loads
    # are done before any store
    tl.debug_barrier()
    tl.store(H + b * shb + rows[:, None] * shs + cols[None, :] * shc, v.to(H.dtype.element_ty),
             mask=keep)


def launch_template(template: str, xs: List, outs: List, opts: dict) -> None:
    hist, x = xs
    (out,) = outs
    if out.data_ptr() != hist.data_ptr():     # not in place (a test, or the dynamic step)
        out.copy_(hist)
    B, S, C = out.shape
    T = x.shape[1]
    if T == 0 or B == 0 or S == 0:
        return
    if S > MAX_S:                              # the concatenation first, then the copy
        out.copy_(torch.cat([out, x.to(out.dtype)], 1)[:, T:T + S])
        return
    block_c = 1024 if interpreter_blocks() else 256
    grid = (B, triton.cdiv(C, block_c))
    _shift_update[grid](out, x, T, S, C, *out.stride(), *x.stride(),
                        BLOCK_S=max(2, triton.next_power_of_2(S)), BLOCK_C=block_c)
