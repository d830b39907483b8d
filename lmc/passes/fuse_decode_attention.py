"""`fuse_decode_attention`: the decode step's softmax attention over a K/V cache, as one op.

Runs on the step graph of the decode pass (`lmc/passes/decode.py`) when the Decoder uses the
triton backend, never on a training or forward program. Matched on primitives: from each
softmax over the last axis of [B, H, T, S] scores, the pass walks

    out = softmax(where(mask, cap((q @ k4^T) * scale) [+ alibi], -inf)) @ v4
          (scale optional, * or /; cap(s) = cap * tanh(s / cap), Gemma 2's soft cap,
          optional; alibi = slopes * (kpos - qpos) over the query positions decode.pos and
          the key positions the mask uses (the slots, or a ring's keys): the slopes and
          decode.pos become inputs of the op)
    (mixed precision: softmax(cast(where(..), f32)), cast back to v's dtype before @ v4;
    attention sinks: softmax(..) * sigmoid(logsumexp(the same scores) - z), z one logit per
    head, an input of the op, option "sinks")
    k4 = k  |  expand(k, [B, H, S, D]) (k with one head)
            |  reshape(expand(reshape(k, [B, Hkv, 1, S, D]), [B, Hkv, G, S, D]), [B, H, S, D])
    (v4 alike: the GQA/MQA broadcast of n_kv heads, query head h reading kv head h // G; a
    single head [B, 1, S, D] broadcast by the matmul itself is MQA too)

with k [B, Hkv, S, D] and v [B, Hkv, S, Dv] of one dtype (Dv may differ from D: MLA's, a
Differential Transformer's values twice as wide); or scores written in parts over separate
caches,

    (q_1 @ k4_1^T + q_2 @ k4_2^T) * scale,   values = one of the k_i (the same view of it)

which is MLA's absorbed form (q_C W_UK^T against the latent c_KV, q_R against k_R; values
the latent), or written as one product of concatenations along the head dim,

    q @ [k4_1 | k4_2]^T,   values their own cache      (q_1, q_2: q's two slices)

which is partial RoPE's with the pass-through keys cached apart (the decode pass keeps a
cache per piece where a piece reaches the concat through layout ops, a projection of its
own reshaped into heads, say, or is read elsewhere; minimax's [rope(k[:R]) | k[R:]], each
piece read by the concat alone, is one cache written whole; q comes whole, its kernel
unchanged, options q_split the first part's width): the decode kernel takes keys in two
parts from two tensors, so the launch hands it both caches where the decode pass keeps
them (k_1 and k_2, the values the part they are, q_1 and q_2 likewise) and the score is
the sum of the two partial products: no per-step copy of a cache (only a long dynamic
prefill, on the forward kernel, runs on [q_1 | q_2] against [k_1 | k_2], copied once). The
mask is one of the decode pass's three key layouts:

    dynamic step: causal_mask(rows T, cols S, window)  with S = P + T (cache ++ new keys):
                  query i sits at position S - T + i, key j at j (read from the shapes);
    static step:  le(max(-(qpos - kpos) [, (qpos - kpos) - (W - 1)]), 0)  with
                  qpos = reshape(decode.pos, [T, 1]), kpos = reshape(iota(L), [1, L]):
                  slot j holds position j, the query positions are the `decode.pos` input;
    ring (sliding window W, dynamic and static step alike):
                  le(max(-(qpos - kpos), (qpos - kpos) - (W - 1), -kpos), 0)  with
                  kpos = reshape(decode.ringW.keys, [1, W + T]): the keys are [W ring slots |
                  T new], slot j holding the position the `decode.ringW.keys` input gives it
                  (position a in slot a mod W; negative: never written), so they are not in
                  position order and the kernel masks by those positions, not by slot. The
                  -kpos term is required (the kernel masks negative positions).

The region (scores, mask, softmax, P @ V and the broadcast of k, v) becomes one FUSED node of
kind "decode_attention" whose inputs are q (as the graph computes it: RoPE, if any, stays
outside as its own pointwise kernel), k and v (the whole key/value tensors after the cache
write: the concat of the dynamic step, the in-place `index_copy` of the static one, which
stay outside the op; with score parts: q_1..q_n, k_1..k_n) and, in the static step,
`decode.pos`, for a ring `decode.pos` and `decode.ringW.keys` (options: static for the
first, kpos for the second). A ring's keys and values, views (reshapes that keep the slot
axis whole, permutes) of concat([R, new]) along the slots with R the ring's state input of W
slots, come as two segments each (option segments; inputs q, k_R, k_new, v_R, v_new, then
the positions): the same views of R and of the new entries, read by the kernel where they
lie, so the concatenation is not stored to be attended over (the static step updates R in
place after the attention, `fuse_cache_writes.ring_updates`). Its body is the matched
primitives, so the torch backend and the autodiff pass still see the exact oracle;
lmc/codegen/decode_attention.py runs attention.py's kernels:

    dynamic: H/Hkv * T <= 64 query rows per kv head: `rope_attention_decode` (flash-decoding,
             position S - T); more (a long prefill): `rope_attention_fwd` with q_offset S - T.
    static:  `rope_attention_decode` over chunks of at most 64 rows (one launch for a decode
             step), positions read on the device from `decode.pos` (never `.item()`), so the
             T = 1 step can be captured in a CUDA graph and replayed at new positions.
    ring:    as static, the keys' positions passed as `kpos` (read on the device too), the
             ring's slots and the new keys as the kernel's two segments.

Declined, with the failed condition recorded (`lmc compile --mode decode --explain`): keys
and values of different shapes (unless the scores come in parts and the values are one of
their keys); probabilities or scores used outside; position masks without the causal term,
with key positions neither iota(L) nor an i64 `decode.*` input, or with such an input but no
term masking its negative (never-written) slots; masks of any other form; non-float or mixed
dtypes. Softmaxes over a fixed-size axis (routers, medit_one's) are not candidates and get no
record.
"""
from __future__ import annotations

from typing import Dict, List

from ..ir.graph import Graph, Node
from ..ir.ops import Op
from .fuse_pointwise import _where
from .patterns import (
    Body,
    NoMatch,
    Region,
    alibi,
    const_value,
    match_all,
    need,
    sink_gate,
    softcap,
    splice,
    upstream,
    widened,
)

PASS = "fuse_decode_attention"
POS = "decode.pos"


def _kv_heads(x: Node, H, region: List[Node]) -> Node:
    """The [B, Hkv, S, D] tensor x broadcasts to H heads (itself when it has H heads)."""
    if x.op is Op.EXPAND and x.type.rank == 4:
        k = x.inputs[0]
        need(k.type.rank == 4 and k.type.shape[1] == 1
              and tuple(k.type.shape[i] for i in (0, 2, 3)) ==
              tuple(x.type.shape[i] for i in (0, 2, 3)),
              "keys/values expanded along an axis other than the heads")
        region.append(x)
        return k
    if x.op is Op.RESHAPE and x.type.rank == 4 and x.inputs[0].op is Op.EXPAND:
        e = x.inputs[0]
        r = e.inputs[0]
        b, h, s, d = x.type.shape
        ok = (e.type.rank == 5 and r.op is Op.RESHAPE and r.type.rank == 5
              and r.inputs[0].type.rank == 4)
        if ok:
            k = r.inputs[0]
            hkv = k.type.shape[1]
            ok = (tuple(r.type.shape) == (b, hkv, 1, s, d)
                  and tuple(k.type.shape) == (b, hkv, s, d)
                  and tuple(e.type.shape[:2]) == (b, hkv) and tuple(e.type.shape[3:]) == (s, d)
                  and e.type.shape[1] * e.type.shape[2] == h)
        need(ok, "keys/values broadcast to the query heads in a layout other than "
                  "reshape [B, Hkv, 1, S, D] -> expand -> reshape [B, H, S, D]")
        region += [x, e, r]
        return k
    return x


def _position_mask(mask: Node, region: List[Node]) -> dict:
    """le(max(terms), 0) over qpos - kpos: the static step's position mask (key positions the
    slots 0 .. L-1) or a ring's (key positions a decode input, never-written slots negative)."""
    need(mask.op is Op.LE and const_value(mask.inputs[1]) == 0,
          f"masked by {mask.op.value}, not causal_mask or the decode step's position mask")
    region.append(mask)
    terms, stack = [], [mask.inputs[0]]
    while stack:
        t = stack.pop()
        if t.op is Op.MAX:
            region.append(t)
            stack += list(t.inputs)
        else:
            terms.append(t)
    dists, causal, window, never = [], False, 0, None
    for t in terms:
        region.append(t)
        if t.op is Op.NEG and t.inputs[0].op is Op.SUB:       # -(q - k) <= 0: k <= q
            dists.append(t.inputs[0])
            causal = True
        elif t.op is Op.SUB and const_value(t.inputs[1]) is not None:   # (q - k) - (W - 1) <= 0
            window = int(const_value(t.inputs[1])) + 1
            need(window >= 1, f"window term {t.inputs[1].attrs['value']} below 0")
            dists.append(t.inputs[0])
        elif t.op is Op.NEG and t.inputs[0].op is Op.RESHAPE:   # -k <= 0: never-written slots
            never = t.inputs[0]
        else:
            raise NoMatch(f"{t.op.value} in the position mask")
    need(causal, "position mask without the causal term -(q - k)")
    dist = dists[0]
    need(all(d is dist for d in dists), "window term of another distance")
    need(dist.op is Op.SUB, "position mask without q - k")
    qr, kr = dist.inputs
    need(qr.op is Op.RESHAPE and kr.op is Op.RESHAPE and qr.type.rank == 2
          and kr.type.rank == 2 and qr.type.shape[1] == 1 and kr.type.shape[0] == 1,
          "position mask not over query positions [T, 1] and key positions [1, S]")
    qpos, kpos = qr.inputs[0], kr.inputs[0]
    need(qpos.op is Op.INPUT and qpos.attrs["name"] == POS,
          "query positions are not the decode.pos input")
    region += [dist, qr, kr]
    if kpos.op is Op.IOTA:
        need(never is None, "position mask with a never-written-slot term over the slots "
                             "0 .. L-1")
        region.append(kpos)
        return {"pos": qpos, "kpos": None, "window": window, "length": kpos.attrs["length"]}
    need(kpos.op is Op.INPUT and kpos.attrs["name"].startswith("decode.")
          and kpos.type.rank == 1 and kpos.type.dtype.value == "i64",
          "key positions are neither the slots 0 .. L-1 nor an i64 decode position input")
    need(never is kr, f"key positions {kpos.attrs['name']} without the term masking "
                       "negative (never-written) slots")
    return {"pos": qpos, "kpos": kpos, "window": window, "length": kr.type.shape[1]}


def match(sm: Node, users: Dict[Node, List[Node]]) -> dict:
    need(sm.attrs["axis"] == sm.type.rank - 1, "softmax not over the last axis")
    need(sm.type.dtype.value in ("f32", "f16", "bf16"), "attention in a non-float dtype")
    region = [sm]
    p, outs = sm, users.get(sm, [])
    sink = None
    if len(outs) == 1 and outs[0] is not None and outs[0].op is Op.MUL:
        # attention sinks (lmc/passes/canonical.py): softmax(s) * sigmoid(logsumexp(s) - z)
        sink = sink_gate(outs[0], sm, sm.type.shape[1])
        region += [outs[0]] + sink[1]
        sink = sink[0]
        p, outs = outs[0], users.get(outs[0], [])
    if len(outs) == 1 and outs[0] is not None and outs[0].op is Op.CAST:
        p, outs = outs[0], users.get(outs[0], [])     # rounded to v's dtype for probs @ v
        region.append(p)
    need(len(outs) == 1 and outs[0] is not None and outs[0].op is Op.MATMUL
          and outs[0].inputs[0] is p, "probabilities are not used once, as probs @ v")
    pv = outs[0]
    region.append(pv)
    wh = sm.inputs[0]
    if widened(wh):      # mixed precision's fp32 softmax over low-precision scores
        region.append(wh)
        wh = wh.inputs[0]
    sdt = wh.type.dtype
    need(wh.op is Op.WHERE, "scores are not masked (the decode step's attention is causal)")
    mask, x, fill = wh.inputs
    need(const_value(fill) == float("-inf"), "masked scores are not set to -inf")
    region.append(wh)
    mregion: List[Node] = []
    if mask.op is Op.CAUSAL_MASK:
        mregion.append(mask)
        minfo = {"pos": None, "window": int(mask.attrs.get("window") or 0),
                 "rows": mask.attrs["rows"], "length": mask.attrs["cols"]}
    else:
        minfo = _position_mask(mask, mregion)
    slopes, bias = None, []
    if x.op is Op.ADD:           # ALiBi: + slopes * (key position - query position)
        def positions(n, axis):  # the kernel's: decode.pos, and the slots or the ring's keys
            if axis == 0:
                return n.op is Op.INPUT and n.attrs["name"] == POS
            return n is minfo["kpos"] if minfo.get("kpos") is not None else n.op is Op.IOTA
        region.append(x)
        x, slopes, qsrc, _ = alibi(x, sm.type.shape[1], True, _fixed, positions)
        # ALiBi's bias, which the body recomputes (the graph keeps it while others read it)
        bias = upstream([i for i in region[-1].inputs if i is not x],
                        {x} | {n for n in (slopes, qsrc) if n is not None})
        if widened(x):
            region.append(x)
            x = x.inputs[0]
    cap = softcap(x)             # cap * tanh(s / cap) on the scaled scores (Gemma 2)
    if cap is not None:
        tanh = next(i for i in x.inputs if i.op is Op.TANH)
        region += [x, tanh, tanh.inputs[0]]
        cap, x = cap
    scale = None
    if x.op in (Op.MUL, Op.DIV):
        a, c = x.inputs
        if x.op is Op.MUL and const_value(a) is not None:
            a, c = c, a
        cv = const_value(c)
        need(cv is not None and cv != 0, "scores scaled by a tensor")
        scale = cv if x.op is Op.MUL else 1.0 / cv
        region.append(x)
        x = a
    if x.op is Op.ADD and all(i.op is Op.MATMUL for i in x.inputs):
        region.append(x)           # [q_1 | q_2] @ [k_1 | k_2]^T written as its two parts
        parts = list(x.inputs)
    else:
        need(x.op is Op.MATMUL, f"{x.op.value} where q @ k^T was expected")
        parts = [x]
    H = parts[0].type.shape[1]
    # views of k and v (transpose, head broadcast) may be shared with other attentions
    # (yoco's cross layers read one K, V): the body copies them, the graph keeps them if used
    layout: List[Node] = []
    qs, ks = [], []
    for mm in parts:
        q, kt = mm.inputs
        need(kt.op is Op.PERMUTE and tuple(kt.attrs["perm"]) == (0, 1, 3, 2),
              "keys are not transposed from [B, H, S, D]")
        need(q.type.rank == 4 and q.type.shape[1] == H, "queries are not [B, H, T, D]")
        region.append(mm)
        layout.append(kt)
        k = _kv_heads(kt.inputs[0], H, layout)
        need(k.type.shape[3] == q.type.shape[3], "q and k head dims differ")
        qs.append(q)
        ks.append(k)
    v = _kv_heads(pv.inputs[1], H, layout)
    q_split = None
    if len(ks) == 1 and _head_concat(ks[0]):
        # q @ [k_1 | k_2]^T with the keys concatenated from two caches per step (partial
        # RoPE: the rotated and the pass-through parts): q's two slices against the two
        # caches, a sum of two products with no per-step copy of the caches into one (the
        # concat is a view for the body, kept in the graph only if something else reads it)
        layout.append(ks[0])
        q_split = ks[0].inputs[0].type.shape[3]
        ks = list(ks[0].inputs)
    q, k = qs[0], ks[0]
    hkv = k.type.shape[1]
    v_part = None
    if len(ks) == 1:
        need(tuple(k.type.shape[:3]) == tuple(v.type.shape[:3]),
              f"keys {list(k.type.shape)} and values {list(v.type.shape)} differ in batch, "
              "heads or slots: the decode kernel reads K [B, Hkv, S, D] and V [B, Hkv, S, Dv]")
    else:
        need(all(tuple(x.type.shape[:3]) == tuple(q.type.shape[:3]) for x in qs)
              and all(tuple(x.type.shape[:3]) == tuple(k.type.shape[:3]) for x in ks),
              "the score parts' queries or keys differ in batch, heads or length")
        # the values: one of the keys (MLA's absorbed form reads the latent as keys and
        # values) or a cache of their own over the same slots
        v_part = next((i for i, x in enumerate(ks) if _same(x, v)), None)
        need(v_part is not None or tuple(v.type.shape[:3]) == tuple(k.type.shape[:3]),
              "the values are none of the score parts' keys and not over the same batch, "
              "heads and slots")
    need(isinstance(H, int) and isinstance(hkv, int) and H % hkv == 0,
          f"{H} query heads are not a multiple of {hkv} kv heads")
    need(all(x.type.dtype == sdt for x in qs + ks + [v]),
          "q, k, v and the scores differ in dtype")
    T, S = q.type.shape[2], k.type.shape[2]
    need(S == minfo["length"], "the mask's keys are not the cache's")
    if minfo["pos"] is None:
        need(minfo["rows"] == T, "the mask's rows are not the new queries")
    inside = set(region)
    for n in region:
        if n is pv:
            continue
        need(all(u in inside for u in users.get(n, [])),
              f"{n.op.value} inside the attention is also used outside it")
    positions = [x for x in (minfo["pos"], minfo.get("kpos")) if x is not None]
    kv = ks + ([v] if v_part is None else [])
    segments = None
    if len(ks) == 1 and minfo.get("kpos") is not None:
        # a ring: [R | new] read as two segments, R and the new keys where they lie
        sk = _segments(k, minfo["kpos"])
        sv = sk if v is k else _segments(v, minfo["kpos"])
        if sk is not None and sv is not None:
            segments = {k: sk, v: sv}
            kv = [*sk, *sv]
    ins = qs + kv + positions
    at_slopes = at_sink = None
    if slopes is not None:       # ALiBi reads the query positions (dynamic step: not read
        if qsrc is not None and qsrc not in ins:   # by the launch, which has them from
            ins.append(qsrc)                        # the shapes) and slopes
        ins.append(slopes)
        at_slopes = len(ins) - 1
    if sink is not None:
        ins.append(sink)
        at_sink = len(ins) - 1
    return {"inputs": ins, "sinks": at_sink,
            "v": v, "v_as": None if v_part is None else ks[v_part],
            "out": pv, "region": inside | set(mregion) | set(layout) | set(bias),
            "alibi": at_slopes,
            "alibi_keys_only": slopes is not None and qsrc is None,
            "window": minfo["window"], "scale": 1.0 if scale is None else scale,
            "softcap": cap,
            "parts": len(ks), "v_part": v_part, "heads": (H, hkv), "q_split": q_split,
            "static": minfo["pos"] is not None and minfo.get("kpos") is None,
            "kpos": minfo.get("kpos"), "n_pos": len(ins) - len(qs + kv),
            "segments": segments}


def _segments(x: Node, kpos: Node):
    """x [B, Hkv, W + T, D] as views (reshapes, permutes) of a ring's concatenation along the
    slots, concat([R, new]) with R the ring's state input of W slots (kpos the input
    decode.ringW.keys): (the same views of R, of new) as graph nodes, else None."""
    chain, axis, n = [], 2, x      # (view, its output's slot axis, its input's), x downwards
    while n.op in (Op.PERMUTE, Op.RESHAPE):
        out_axis = axis
        if n.op is Op.PERMUTE:
            axis = n.attrs["perm"][axis]
        else:            # a reshape keeping the slot axis whole, with the same extent before it
            src, shape = n.inputs[0].type.shape, n.type.shape
            before = _product(shape[:axis])
            axis = next((a for a in range(len(src)) if src[a] == shape[axis]
                         and _product(src[:a]) == before), None)
            if axis is None:
                return None
        chain.append((n, out_axis, axis))
        n = n.inputs[0]
    if n.op is not Op.CONCAT or len(n.inputs) != 2 or n.attrs["axis"] % n.type.rank != axis:
        return None
    ring, new = n.inputs
    W = ring.type.shape[axis]
    if ring.op is not Op.INPUT or not isinstance(W, int) or \
            kpos.attrs["name"] != f"decode.ring{W}.keys":
        return None

    def views(piece: Node) -> Node:
        for v, out_axis, in_axis in reversed(chain):
            if v.op is Op.PERMUTE:
                piece = Node.make(Op.PERMUTE, [piece], dict(v.attrs), v.loc, v.scope)
            else:
                shape = list(v.type.shape)
                shape[out_axis] = piece.type.shape[in_axis]
                piece = Node.make(Op.RESHAPE, [piece], {"shape": tuple(shape)}, v.loc, v.scope)
        return piece
    return views(ring), views(new)


def _product(dims):
    out = 1
    for d in dims:
        out = out * d
    return out


def _fixed(n: Node) -> bool:
    """n depends on no parameter and no input but the step's position inputs (decode.*)."""
    if n.op is Op.PARAM or (n.op is Op.INPUT and not n.attrs["name"].startswith("decode.")):
        return False
    return all(_fixed(i) for i in n.inputs)


def _head_concat(n: Node) -> bool:
    """n concatenates two values along the head dim of [B, H, S, D]."""
    return n.op is Op.CONCAT and len(n.inputs) == 2 and \
        n.attrs["axis"] % n.type.rank == n.type.rank - 1 and n.type.rank == 4


def _same(a: Node, b: Node) -> bool:
    """The same value: one node, or the same view op with the same attrs of the same value."""
    return a is b or (a.op is b.op and a.op in (Op.RESHAPE, Op.PERMUTE, Op.EXPAND)
                      and a.attrs == b.attrs and _same(a.inputs[0], b.inputs[0]))


def _body(m: dict, name: str, order: Dict[Node, int]) -> Graph:
    """The matched region as a body graph over placeholders in0.. for m["inputs"] (q, k, v
    [, decode.pos], or q_1..q_n, k_1..k_n [, decode.pos] when the values are one of the keys)."""
    b = Body(m["inputs"], alias=None if m["v_as"] is None else {m["v"]: m["v_as"]})
    for x, (ring, new) in (m["segments"] or {}).items():    # [R | new] from the segments
        b.env[x] = b.add(Node.make(Op.CONCAT, [b.env[ring], b.env[new]], {"axis": 2}, x.loc,
                                   x.scope))
    b.copy(sorted(m["region"], key=order.__getitem__))
    return b.graph(name, [m["out"]],
                   module="decode_attention",      # lmc/codegen/decode_attention.py
                   template="decode_attention",
                   options={"static": m["static"], "window": m["window"], "scale": m["scale"],
                            "softcap": m["softcap"], "alibi": m["alibi"],
                            "alibi_keys_only": m["alibi_keys_only"],
                            "parts": m["parts"], "v_part": m["v_part"],
                            "q_split": m["q_split"], "kpos": m["kpos"] is not None,
                            "sinks": m["sinks"], "segments": m["segments"] is not None})


def fuse_decode_attention(g: Graph) -> Graph:
    """The step graph with each matched attention as one FUSED "decode_attention" node; a
    record per candidate softmax in meta["fusions"]."""
    users = g.users()
    for o in g.outputs.values():
        users.setdefault(o, []).append(None)      # a graph output is a use outside
    order = {n: i for i, n in enumerate(g.nodes)}
    # candidates: softmaxes over the keys of [B, H, T, S] scores, S symbolic (a router's
    # softmax over experts, medit_one's over a fixed axis, are not attention over a cache and
    # are not reported)
    matches, records = match_all(
        g, lambda n: n.op is Op.SOFTMAX and n.type.rank == 4
        and not isinstance(n.type.shape[-1], int), lambda n: match(n, users), PASS)
    regions = []
    for i, m in enumerate(matches):
        name = f"lmc_decode_attention_{i}"
        ins = m["inputs"]
        fused = Node.make(Op.FUSED, ins, {"kernel": name, "kind": "decode_attention",
                                          "body": _body(m, name, order),
                                          "no_grad": tuple(range(len(ins) - m["n_pos"],
                                                                 len(ins)))},
                          m["out"].loc, m["out"].scope)
        # nothing is forced out: a mask the layers share stays while a declined one reads it
        regions.append(Region(fused, [m["out"]], set()))
        H, hkv = m["heads"]
        heads = f"{H} heads" if hkv == H else f"{H} heads over {hkv} kv heads"
        if m["parts"] > 1:
            heads += (f", scores in {m['parts']} parts over separate caches (read in place), "
                      + (f"values = keys part {m['v_part']}" if m["v_part"] is not None
                         else "values a cache of their own"))
        if m["kpos"] is not None:
            cache = (f"ring cache (key positions {m['kpos'].attrs['name']}, never-written "
                     f"slots masked" + ("; the ring and the new keys read as two segments, "
                                        "not concatenated" if m["segments"] else "") + ")")
        else:
            cache = f"{'static' if m['static'] else 'dynamic'} cache"
        records.append({
            "pass": PASS, "status": "fused", "where": _where(m["out"]),
            "reason": f"{cache}, causal"
                      f"{' window ' + str(m['window']) if m['window'] else ''}, {heads}, "
                      f"scale {m['scale']:.4g}"
                      + (f", scores soft-capped at {m['softcap']:.4g}" if m["softcap"] else "")
                      + (", ALiBi" if m["alibi"] is not None else "")
                      + (", attention sinks" if m["sinks"] is not None else "")})
    return splice(g, regions, records)
