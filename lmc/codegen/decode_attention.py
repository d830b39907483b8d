"""Launch entry of the "decode_attention" fused op (lmc/passes/fuse_decode_attention.py):
the decode step's softmax attention of T new queries over a K/V cache, run by
lmc/codegen/attention.py's kernels (no RoPE inside: the cache holds rotated keys and q comes
rotated).

    inputs  q [B, H, T, D], k and v [B, Hkv, S, D] (any strides: the cache after its write,
            possibly a permuted view), and for the static step decode.pos [T] (i64: the new
            tokens' positions P .. P+T-1).
    output  [B, H, T, D] in q's dtype.

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
"""
from __future__ import annotations

from typing import List

from .attention import rope_attention_decode, rope_attention_fwd

ROWS = 64   # query rows (query heads of one kv head x new tokens) per decode-kernel tile


def launch_template(template: str, xs: List, outs: List, opts: dict) -> None:
    if template != "decode_attention":
        raise ValueError(f"decode_attention has no template {template!r}")
    q, k, v = xs[:3]
    out = outs[0]
    B, H, T, D = q.shape
    S, G = k.shape[2], H // k.shape[1]
    window = int(opts.get("window") or 0) or None
    scale = float(opts["scale"])
    if not opts.get("static"):
        offset = S - T
        if G * T <= ROWS:
            rope_attention_decode(q, k, v, offset, causal=True, window=window, scale=scale,
                                  out=out)
        else:
            o, _ = rope_attention_fwd(q, k, v, causal=True, window=window, q_offset=offset,
                                      scale=scale)
            out.copy_(o)
        return
    pos = xs[3]
    chunk = max(1, ROWS // G)
    for c in range(0, T, chunk):
        rope_attention_decode(q[:, :, c:c + chunk], k, v, pos[c:c + 1], causal=True,
                              window=window, scale=scale, out=out[:, :, c:c + chunk])
