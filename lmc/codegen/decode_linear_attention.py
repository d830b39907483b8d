"""Launch entry of the "decode_linear_attention" fused op
(lmc/passes/fuse_decode_linear_attention.py): decayed linear attention of T new tokens
continuing a d_k x d_v state per head, run by lmc/codegen/linear_attention.py's kernels.

    inputs  q, k [B, H, T, d_k] (or broadcasting to it: shared by every head); the values
            v [B, H, T, d_v] (or anything broadcasting to it); ld, the log-decays,
            broadcastable to [B, H, T] ([B, H, T] per-token gates, [1, H, T] a fixed decay);
            S, the state [B, H, d_k, d_v] (fp32).
    outputs o [B, H, T, d_v] in q's dtype, and the new state [B, H, d_k, d_v]: a new tensor
            in a dynamic step (its old states stay valid); in the static step the state input
            itself (fuse_cache_writes' in-place update: each kernel below reads a state tile
            before it writes it, so the Decoder's buffer needs no copy after the step).

Which kernel (T is the number of new tokens, read from the shapes; nothing reads a value on
the host, so a T = 1 step can be captured in a CUDA graph):
    T <= RECURRENT_MAX: `recurrent_step`, one launch looping over the T tokens in order with
        the state tile in fp32 registers (S = exp(g_t) S + k_t^T v_t, o_t = q_t S), writing o
        and the new state straight into the op's outputs. A decode step (T = 1) and short
        prompts: the loop costs T state updates per program, against two launches and the
        per-chunk states of the chunked form.
    longer T (a prompt): `prefill`, the chunked parallel form (chunk options["chunk"], 64,
        lowered to the smallest power of two >= max(T, 16); T need not be a multiple)
        starting from S: intra-chunk masked products plus the fp32 state carried across
        chunks, returning the final state. Linear in T; nothing T x T.
The "decode_gated_linear_attention" op (per-channel decays) likewise: `gla_step` (the
recurrent kernel) for T <= RECURRENT_MAX, else the chunked `gla_forward` from S (its states
kernel starting from S and storing the state after the last chunk).
"""
from __future__ import annotations

from typing import List

import torch

from ..errors import LmcError
from .linear_attention import _p2, prefill, recurrent_step

RECURRENT_MAX = 16     # new tokens run by the recurrent kernel; more: the chunked prefill


def launch_template(template: str, xs: List, outs: List, opts: dict) -> None:
    if template == "decode_gated_linear_attention":
        _gated(xs, outs)
        return
    if template != "decode_linear_attention":
        raise LmcError(f"decode_linear_attention has no {template!r} kernel (the decode step "
                       "runs without gradients)")
    q, k, v, g, state = xs
    o, s_new = outs
    B, H, DK, DV = state.shape
    T = q.shape[2]
    q = q.expand(B, H, T, DK)      # q, k may be shared by every head (stride 0)
    k = k.expand(B, H, T, DK)
    v = v.expand(B, H, T, DV)
    if v.dtype != q.dtype:
        v = v.to(q.dtype)
    if T == 0:
        s_new.copy_(state)
        return
    if T <= RECURRENT_MAX:
        direct = s_new.dtype == torch.float32 and s_new.is_contiguous()
        _, s = recurrent_step(q, k, v, g, state, out=o,
                              new_state=s_new if direct else None)
        if not direct:
            s_new.copy_(s)
        return
    chunk = min(int(opts.get("chunk") or 64), _p2(T))
    y, s = prefill(q, k, v, g, chunk=chunk, initial_state=state.float())
    o.copy_(y)
    s_new.copy_(s)


def _gated(xs: List, outs: List) -> None:
    """Per-channel decays (gated linear attention): xs = (q, k, v, g [B, H, T, d_k] each or
    broadcasting, S), outs = (o, S'): the recurrent kernel over T <= RECURRENT_MAX new tokens,
    the chunked kernels (from S, storing the final state) over a longer prompt."""
    from .gated_linear_attention import gla_forward, gla_step
    q, k, v, g, state = xs
    o, s_new = outs
    B, H, DK, DV = state.shape
    T = q.shape[2]
    q, k, g = (x.expand(B, H, T, DK) for x in (q, k, g))
    v = v.expand(B, H, T, DV).to(q.dtype)
    direct_o = o.dtype == q.dtype
    direct_s = s_new.dtype == torch.float32 and s_new.is_contiguous()
    y = o if direct_o else torch.empty(o.shape, dtype=q.dtype, device=q.device)
    s = s_new if direct_s else torch.empty((B, H, DK, DV), dtype=torch.float32,
                                           device=q.device)
    if T <= RECURRENT_MAX:
        gla_step(q, k, v, g, state.float(), y, s)
    else:
        gla_forward(q, k, v, g, out=y, initial_state=state, final_state=s)
    if not direct_o:
        o.copy_(y)
    if not direct_s:
        s_new.copy_(s)
