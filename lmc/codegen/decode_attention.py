"""Launch entry of the "decode_attention" fused op (lmc/passes/fuse_decode_attention.py):
the decode step's softmax attention of T new queries over a K/V cache, run by
lmc/codegen/attention.py's kernels (no RoPE inside: the cache holds rotated keys and q comes
rotated).

    inputs  q [B, H, T, D], k and v [B, Hkv, S, D] (any strides: the cache after its write,
            possibly a permuted view), and for the static step decode.pos [T] (i64: the new
            tokens' positions P .. P+T-1); for a ring (options kpos) decode.pos and the keys'
            positions decode.ringW.keys [S = W + T] (i64, negative: slot never written).
    output  [B, H, T, D] in q's dtype.
    With score parts (options parts = 2, MLA's absorbed form): inputs q_1, q_2, k_1, k_2
    [, v when v_part is None (partial RoPE's two key caches, values their own)]; with
    options q_split (partial RoPE) one q, its first q_split columns q_1, the rest q_2
    [, decode.pos [, keys' positions]]; scores q_1 k_1^T + q_2 k_2^T, values k_{v_part} or v:
    the decode kernel reads the two caches where they lie (k = k_1, k2 = k_2, v = the
    value part, q and q2 likewise: no copy of a cache or of q per step) and writes the output
    directly. Only a long dynamic prefill (the forward kernel, one K) runs on
    [q_1 | q_2] against K = [k_1 | k_2], a copy made once per prefill, not per token.

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
        instead of by slot. With options segments (inputs q, k_R, k_new, v_R, v_new, pos,
        kpos) the kernel reads the ring's W slots and the T new keys from their own tensors
        (`k_new`, `v_new`: its second segment), so no [ring | new] copy is made per step.
        A long prefill runs every chunk over all W + T keys (the kernel cannot bound the
        slots it reads from unordered positions): quadratic in T, as the unfused step's
        [T, W + T] scores are.
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
    if opts.get("alibi") is not None:       # ALiBi's slopes, one per query head
        opts = dict(opts, slopes=xs[int(opts["alibi"])])
    if opts.get("sinks") is not None:       # attention sinks' logits, one per query head
        opts = dict(opts, sink_logits=xs[int(opts["sinks"])].reshape(-1))
    ring = bool(opts.get("kpos"))
    has_pos = bool(opts.get("static")) or ring     # decode.pos [, the keys' positions]
    out = outs[0]
    if n == 1 and opts.get("segments"):     # a ring's slots and the new keys, apart
        q, k, kn, v, vn, pos, kpos = xs[:7]
        _attend(q, k, v, pos, kpos, out, opts, k_new=kn, v_new=vn)
        return
    if n == 1:
        q, k, v = xs[:3]
        pos = xs[3] if has_pos else None
        kpos = xs[4] if ring else None
        _attend(q, k, v, pos, kpos, out, opts)
        return
    # scores in two parts over separate caches, the values one of the keys (MLA's absorbed
    # form: (q_C W_UK^T) c_KV^T + q_R k_R^T, values c_KV) or their own (partial RoPE): the
    # decode kernel's two-part keys read both caches in place (the pass matches two parts)
    if n != 2:
        raise LmcError(f"decode_attention takes scores in 1 or 2 parts: got {n}")
    if opts.get("q_split"):       # q whole, sliced here (views): partial RoPE's form
        d1 = int(opts["q_split"])
        q1, q2 = xs[0][..., :d1], xs[0][..., d1:]
        xs = [q1, q2] + list(xs[1:])
    (q1, q2), (k1, k2) = xs[:2], xs[2:4]
    if opts.get("v_part") is None:      # values a cache of their own (partial RoPE's keys)
        v, rest = xs[4], xs[5:]
    else:
        v, rest = xs[2 + int(opts["v_part"])], xs[4:]
    pos = rest[0] if has_pos else None
    kpos = rest[1] if ring else None
    _attend(q1, k1, v, pos, kpos, out, opts, q2, k2)


def _attend(q, k, v, pos, kpos, out, opts: dict, q2=None, k2=None, k_new=None,
            v_new=None) -> None:
    B, H, T, D = q.shape
    S, G = k.shape[2], H // k.shape[1]
    window = int(opts.get("window") or 0) or None
    scale = float(opts["scale"])
    cap = opts.get("softcap")             # Gemma 2's soft cap on the scores, or None
    slopes = opts.get("slopes")           # ALiBi's, or None
    keys_only = bool(opts.get("alibi_keys_only"))
    sinks = opts.get("sink_logits")       # attention sinks', or None
    if pos is None:
        offset = S - T
        if G * T <= ROWS:
            rope_attention_decode(q, k, v, offset, causal=True, window=window, scale=scale,
                                  softcap=cap, alibi=slopes, alibi_keys_only=keys_only,
                                  out=out, q2=q2, k2_cache=k2, sinks=sinks)
        else:   # a long prefill: the forward kernel reads one K (a copy, once per prefill)
            if k2 is not None:
                q, k = torch.cat([q, q2], -1), torch.cat([k, k2], -1)
            o, _ = rope_attention_fwd(q, k, v, causal=True, window=window, q_offset=offset,
                                      scale=scale, softcap=cap, alibi=slopes,
                                      alibi_keys_only=keys_only, sinks=sinks)
            out.copy_(o)
        return
    chunk = max(1, ROWS // G)
    for c in range(0, T, chunk):
        rope_attention_decode(q[:, :, c:c + chunk], k, v, pos[c:c + 1], causal=True,
                              window=window, scale=scale, softcap=cap, alibi=slopes,
                              alibi_keys_only=keys_only, sinks=sinks,
                              out=out[:, :, c:c + chunk],
                              kpos=kpos, q2=None if q2 is None else q2[:, :, c:c + chunk],
                              k2_cache=k2, k_new=k_new, v_new=v_new)
