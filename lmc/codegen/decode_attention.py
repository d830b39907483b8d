"""Launch entry of the "decode_attention" fused op (lmc/passes/fuse_decode_attention.py):
the decode step's softmax attention of T new queries over a K/V cache, run by
lmc/codegen/attention.py's kernels (no RoPE inside: the cache holds rotated keys and q comes
rotated).

    inputs  q [B, H, T, D], k and v [B, Hkv, S, D] (any strides: the cache after its write,
            possibly a permuted view), and for the static step decode.pos [T] (i64: the new
            tokens' positions P .. P+T-1); for a ring (options kpos) decode.pos and the keys'
            positions decode.ringW.keys [S = W + T] (i64, negative: slot never written).
    output  [B, H, T, D] in q's dtype.
    With score parts (options parts = n > 1, MLA's absorbed form): inputs q_1..q_n,
    k_1..k_n [, decode.pos]; K = V = [k_1 | .. | k_n] and q = [q_1 | .. | q_n] (copies: the
    decode pass keeps the caches apart), output the columns of part v_part.

Which kernel:
    dynamic step (S = P + T keys, slot j = position j, queries at S - T + i; the offset is
        read from the shapes):
        (H / Hkv) * T <= ROWS: `rope_attention_decode` (flash-decoding: the cache split
            across programs, partial results combined), every query head of a kv head in one
            tile;
        more rows (a long prefill): `rope_attention_fwd` with q_offset = S - T (tiled over
            the queries, so it does not put every query in one tile).
    static step (L slots, slot j = position j, slots past the queries masked causally):
        `rope_attention_decode` over chunks of at most ROWS / (H / Hkv) queries, each chunk's
        position read on the device from decode.pos (a one-element slice, no host sync), so
        the T = 1 step is one launch pair that a captured CUDA graph replays at new positions.
        The forward kernel is not used there: it takes its query offset as a host integer.
    ring (W slots + T new keys, in either step; positions decode.ringW.keys): as the static
        step, with the keys' positions given to the kernel (`kpos`), which masks by them
        instead of by slot. A long prefill runs every chunk over all W + T keys (the kernel
        cannot bound the slots it reads from unordered positions): quadratic in T, as the
        unfused step's [T, W + T] scores are.
"""
from __future__ import annotations

from typing import List

import torch

from ..errors import LmcError
from .attention import rope_attention_decode, rope_attention_fwd

ROWS = 64   # query rows (query heads of one kv head x new tokens) per decode-kernel tile


def launch_template(template: str, xs: List, outs: List, opts: dict) -> None:
    if template != "decode_attention":
        # the autodiff pass can differentiate the op through its body, but decode is
        # inference: there is no fused backward kernel to run
        raise LmcError(f"decode_attention has no {template!r} kernel (the decode step runs "
                       "without gradients)")
    n = int(opts.get("parts") or 1)
    ring = bool(opts.get("kpos"))
    has_pos = bool(opts.get("static")) or ring     # decode.pos [, the keys' positions]
    out = outs[0]
    if n == 1:
        q, k, v = xs[:3]
        pos = xs[3] if has_pos else None
        kpos = xs[4] if ring else None
        _attend(q, k, v, pos, kpos, out, opts)
        return
    # scores in n parts over separate caches, the values one of the keys (MLA's absorbed
    # form: [q_C W_UK^T | q_R] @ [c_KV | k_R]^T, values c_KV): one K = V of the parts side by
    # side (a copy of the caches: they are kept apart by the decode pass), the output cut to
    # the value part's columns
    qs, ks = xs[:n], xs[n:2 * n]
    pos = xs[2 * n] if has_pos else None
    kpos = xs[2 * n + 1] if ring else None
    q = torch.cat(qs, -1)
    k = torch.cat(ks, -1)
    first = sum(x.shape[-1] for x in ks[:opts["v_part"]])
    wide = torch.empty(q.shape, dtype=out.dtype, device=out.device)
    _attend(q, k, k, pos, kpos, wide, opts)
    out.copy_(wide[..., first:first + out.shape[-1]])


def _attend(q, k, v, pos, kpos, out, opts: dict) -> None:
    B, H, T, D = q.shape
    S, G = k.shape[2], H // k.shape[1]
    window = int(opts.get("window") or 0) or None
    scale = float(opts["scale"])
    if pos is None:
        offset = S - T
        if G * T <= ROWS:
            rope_attention_decode(q, k, v, offset, causal=True, window=window, scale=scale,
                                  out=out)
        else:
            o, _ = rope_attention_fwd(q, k, v, causal=True, window=window, q_offset=offset,
                                      scale=scale)
            out.copy_(o)
        return
    chunk = max(1, ROWS // G)
    for c in range(0, T, chunk):
        rope_attention_decode(q[:, :, c:c + chunk], k, v, pos[c:c + 1], causal=True,
                              window=window, scale=scale, out=out[:, :, c:c + chunk],
                              kpos=kpos)
