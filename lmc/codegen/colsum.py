"""The second launch of a reduction kernel with column sums (lmc/passes/fuse_column_sums.py).

The row kernel leaves one partial row per program in an fp32 workspace [programs, N]; this
kernel adds them up, column block by column block, in program order (so the sum does not
depend on which program finished first), and stores the result in the output's dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lmc_column_sum_finish(ws_ptr, out_ptr, P, N, out_s,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < N
    acc = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        part = tl.load(ws_ptr + ps[:, None] * N + cols[None, :],
                       mask=(ps < P)[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(part, axis=0)
    tl.store(out_ptr + cols * out_s, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def finish(ws, out, interpret: bool) -> None:
    """out[n] = sum over programs p of ws[p, n]."""
    from . import interpreter_blocks

    P, N = ws.shape
    if N == 0:
        return
    if interpret and interpreter_blocks():
        bp, bc = 2, min(triton.next_power_of_2(N), 1024)     # P > 2: several trips
    else:
        bp, bc = 64, 32
    lmc_column_sum_finish[(triton.cdiv(N, bc),)](ws, out, P, N, out.stride(0),
                                                 BLOCK_P=bp, BLOCK_C=bc)
