"""`fuse_decode_linear_attention`: the decode step's decayed linear attention, as one op.

Runs on the step graph of the decode pass (`lmc/passes/decode.py`) when the Decoder uses the
triton backend, after `fuse_decode_attention`; never on a training or forward program. The
decode pass writes decayed linear attention (yoco's gated retention, minimax's lightning
attention) over the T new tokens and a d_k x d_v state S per head (a step-graph input named
`<scope>.state`, its new value a step-graph output) as

    G     = cumsum(ld, -1)                          ld: log-decays [.., T], lead dims -> [B, H]
    Gt    = reshape(G, [.., T, 1])      Gs = reshape(G, [.., 1, T])
    D     = exp(where(causal_mask(T, T), Gt - Gs, -inf))
    out   = ((q @ k^T) * D) @ V  +  (q * exp(Gt)) @ S
    G_end = reshape(slice(G, T-1 .. T), [.., 1, 1])
    S'    = exp(G_end) * S  +  permute(k * exp(G_end - Gt)) @ V

with q, k: [B, H, T, d_k] (or [.., 1, T, d_k]: shared by every head), V: [B, H, T, d_v]
(the decode pass's `absorb` leaves these products alone: it only moves up-projections of a
cached latent). S is fp32; in a
low-precision program the decay factors exp(Gt), exp(G_end - Gt) and D are cast to q's
dtype, S is read cast down for (q * exp(Gt)) @ S, and k^T V is widened to fp32 to add.

Candidates are the step graph's linear-attention state inputs (named `*.state`, `*.stateN`:
the decode pass names no other state so). From the state the pass walks its two reads
((q * exp(Gt)) @ S and exp(G_end) * S), the new state's sum and the output's sum; every
intermediate must be read only inside the region (the output and the new state may be read
anywhere). The region becomes one FUSED node of kind "decode_linear_attention" with inputs
q, k, V, ld, S and two outputs, the attention output and the new state; its body is
the matched primitives over INPUT placeholders, so the torch backend and the autodiff pass
still see the exact oracle. The state is returned, as the step graph returns it (the static
Decoder copies it into its buffer); nothing reads a position, so the static step is the same
op and nothing syncs with the host (the T = 1 step can be captured in a CUDA graph).

Gated linear attention (per-channel decays, the decode pass's `_gated_linear_attention_step`:
G = cumsum(ld) over [.., T, d_k] read directly, the state decayed by permute(exp(G_end)))
is matched by `match_gated` into a "decode_gated_linear_attention" op (inputs q, k, v, ld,
S) run by lmc/codegen/gated_linear_attention.py's recurrent kernel.

Declined, with the failed condition recorded (`lmc compile --mode decode --explain`): a state
read by anything else, any intermediate (G, D, the scores, the decayed keys) read outside,
a mask other than causal_mask(T, T) without a window, decays not a cumsum along the last
axis, q/k/V not [B, H, T, d] (rank 4), value products of different V, log-decays whose lead
dims do not broadcast to [B, H], non-float dtypes.
"""
from __future__ import annotations

import re
from typing import Dict, List

from ..ir.graph import Graph, Node
from ..ir.ops import Op
from .fuse_pointwise import _where
from .patterns import (
    Body,
    NoMatch,
    Region,
    const_value,
    is_swap,
    match_all,
    need,
    other,
    splice,
    uncast,
    upstream,
)

PASS = "fuse_decode_linear_attention"
STATE_NAME = re.compile(r"\.state\d*$")
DEFAULT_CHUNK = 64      # the chunked prefill's chunk (lowered for a short prompt)
FLOATS = ("f32", "f16", "bf16")


class _PerChannel(NoMatch):
    """The step's decays are per key channel: gated linear attention (`match_gated`)."""


def _same(a: Node, b: Node) -> bool:
    """The same value: one node, or the same view op with the same attrs of the same value."""
    return a is b or (a.op is b.op and a.op in (Op.RESHAPE, Op.PERMUTE, Op.EXPAND)
                      and a.attrs == b.attrs and _same(a.inputs[0], b.inputs[0]))


def _exp(n: Node) -> Node:
    """The exp under n: n itself, or n a cast of it (an fp32 decay factor cast to q's dtype
    under mixed precision); None if neither."""
    e = n.inputs[0] if n.op is Op.CAST else n
    return e if e.op is Op.EXP else None


def _exp_of(n: Node, why: str, region: List[Node]) -> Node:
    e = _exp(n)
    need(e is not None, why)
    if e is not n:
        region.append(e)
    return e.inputs[0]


def _values(mm: Node, left: Node, region: List[Node]) -> tuple:
    """mm = left @ V: ("v", V)."""
    need(mm.op is Op.MATMUL, f"{mm.op.value} where a product with the values was expected")
    a, w = mm.inputs
    need(a is left, "the values are not one tensor V in left @ V")
    region.append(mm)
    return ("v", w)


def _same_values(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and all(_same(x, y) for x, y in zip(a[1:], b[1:]))


def match(st: Node, users: Dict[Node, List[Node]]) -> dict:
    """The region around the state input `st`, or NoMatch naming the failed condition."""
    need(st.type.rank >= 2 and all(isinstance(d, int) for d in st.type.shape[-2:]),
          "the state is not d_k x d_v of fixed size")
    need(st.type.dtype.value in FLOATS, "the state is not a float tensor")
    reads = [u for u in users.get(st, []) if u is not None]
    need(len(reads) == len(users.get(st, [])), "the state input is itself a graph output")
    region: List[Node] = []
    st_low = None      # an fp32 state read cast to q's dtype for q @ S (mixed precision)
    for u in reads:
        us = users.get(u, [])
        if u.op is Op.CAST and len(us) == 1 and us[0] is not None and \
                us[0].op is Op.MATMUL and us[0].inputs[1] is u:
            st_low = u
            region.append(u)
            reads = [us[0] if x is u else x for x in reads]
    inter = [u for u in reads if u.op is Op.MATMUL and u.inputs[1] is (st_low or st)]
    decay = [u for u in reads if u.op is Op.MUL and other(u, st) is not None]
    need(len(reads) == 2 and len(inter) == 1 and len(decay) == 1,
          "the state is not read exactly as (q * exp(G)) @ S and exp(G_end) * S "
          f"(read by {', '.join(u.op.value for u in reads) or 'nothing'})")
    inter, decay = inter[0], decay[0]
    region += [inter, decay]
    # q * exp(Gt)
    qe = inter.inputs[0]
    need(qe.op is Op.MUL, "the state's query side is not q * exp(G)")
    region.append(qe)
    eg = next((x for x in qe.inputs if _exp(x) is not None), None)
    need(eg is not None, "the state's query side is not q * exp(G)")
    q = other(qe, eg)
    gt = _exp_of(eg, "", region)
    region.append(eg)
    # G = cumsum(ld) and its views
    if gt.op is Op.CUMSUM and gt.attrs["axis"] % gt.type.rank == gt.type.rank - 2:
        raise _PerChannel("per-channel decays (gated linear attention)")
    need(gt.op is Op.RESHAPE and gt.inputs[0].op is Op.CUMSUM,
          "the query-side decay is not a reshape of a cumsum (G = cumsum(ld))")
    g = gt.inputs[0]
    ld = g.inputs[0]
    need(g.attrs["axis"] == g.type.rank - 1, "the decays' cumsum is not along the last axis")
    need(q.type.rank == 4, f"queries are {q.type.rank}-d, not [B, H, T, d_k]")
    need(st.type.rank == 4, f"the state is {st.type.rank}-d, not [B, H, d_k, d_v]")
    B, H = st.type.shape[:2]
    T, dk = q.type.shape[2:]
    need(q.type.shape[0] in (1, B) and q.type.shape[1] in (1, H),
          f"queries {list(q.type.shape)} do not broadcast to the state's [B, H] = {[B, H]}")
    need(g.type.shape[-1] == T, "the decays' cumsum is not along the new tokens")
    lead = tuple(g.type.shape[:-1])
    need(len(lead) <= 2 and all(d == 1 or d == w for d, w in
                                 zip(lead[::-1], (H, B))),
          f"log-decays {list(ld.type.shape)} do not broadcast to [B, H, T]")
    need(tuple(gt.type.shape) == lead + (T, 1), "G_t is not reshape(G, [.., T, 1])")
    region += [g, gt]
    # exp(G_end) * S
    e_end = other(decay, st)
    g_end2 = _exp_of(e_end, "the state is not decayed by exp(G_end)", region)
    need(g_end2.op is Op.RESHAPE and g_end2.inputs[0].op is Op.SLICE,
          "the state's decay is not the cumsum's last entry")
    sl = g_end2.inputs[0]
    need(sl.inputs[0] is g and sl.attrs["axis"] == g.type.rank - 1
          and sl.attrs["start"] == T - 1 and sl.attrs["stop"] == T
          and sl.attrs.get("step", 1) == 1 and tuple(g_end2.type.shape) == lead + (1, 1),
          "the state's decay is not exp(G[.., T-1]) of the same cumsum")
    region += [e_end, g_end2, sl]
    # S' = exp(G_end) * S + permute(k * exp(G_end - Gt)) @ V
    ups = users.get(decay, [])
    need(len(ups) == 1 and ups[0] is not None and ups[0].op is Op.ADD,
          "the decayed state is not used once, in S' = exp(G_end) S + k^T V")
    new_state = ups[0]
    kv = other(new_state, decay)
    if kv is not None and kv.op is Op.CAST:     # k^T V widened to the fp32 state
        region.append(kv)
        kv = kv.inputs[0]
    need(kv is not None and kv.op is Op.MATMUL, "the state's update is not a product k^T V")
    kvl = kv.inputs[0]
    need(is_swap(kvl) and kvl.inputs[0].op is Op.MUL,
          "the state's update does not read permute(k * w)")
    kw = kvl.inputs[0]
    w = next((x for x in kw.inputs if _exp(x) is not None), None)
    need(w is not None, "the keys of the state's update are not decayed by exp(.)")
    k = other(kw, w)
    wd = _exp_of(w, "", region)
    need(wd.op is Op.SUB and wd.inputs[0] is g_end2 and wd.inputs[1] is gt,
          "the keys of the state's update are not decayed by exp(G_end - G_t)")
    region += [new_state, kvl, kw, w, wd]
    vals_state = _values(kv, kvl, region)
    # out = ((q @ k^T) * D) @ V + (q * exp(Gt)) @ S
    uo = users.get(inter, [])
    need(len(uo) == 1 and uo[0] is not None and uo[0].op is Op.ADD,
          "the state's read is not added once to the intra-chunk product")
    out = uo[0]
    intra = other(out, inter)
    need(intra is not None and intra.op is Op.MATMUL, "the output is not intra + q S")
    a = intra.inputs[0]
    need(a.op is Op.MUL, "the intra product is not ((q @ k^T) * D) @ V")
    scores = next((x for x in a.inputs if x.op is Op.MATMUL), None)
    need(scores is not None, "the intra product is not ((q @ k^T) * D) @ V")
    dmat = other(a, scores)
    need(scores.inputs[0] is q and is_swap(scores.inputs[1]) and scores.inputs[1].inputs[0] is k,
          "the intra scores are not q @ k^T of the state's q and k")
    wh = _exp_of(dmat, "the decay matrix is not exp(where(mask, G_t - G_s, -inf))", region)
    need(wh.op is Op.WHERE, "the decay matrix is not exp(where(mask, G_t - G_s, -inf))")
    mask, diff, fill = wh.inputs
    need(const_value(fill) == float("-inf"), "the decay matrix is not filled with -inf")
    need(mask.op is Op.CAUSAL_MASK and mask.attrs["rows"] == T and mask.attrs["cols"] == T,
          f"masked by {mask.op.value}, not causal_mask(T, T)")
    need(not mask.attrs.get("window"),
          f"windowed decay mask (window {mask.attrs.get('window')}): the state carries the "
          "whole past")
    need(diff.op is Op.SUB and diff.inputs[0] is gt and diff.inputs[1].op is Op.RESHAPE
          and diff.inputs[1].inputs[0] is g
          and tuple(diff.inputs[1].type.shape) == lead + (1, T),
          "the decay matrix is not over G_t - G_s of the same cumsum")
    region += [out, a, scores, scores.inputs[1], dmat, wh, mask, fill, diff, diff.inputs[1]]
    vals = _values(intra, a, region)
    need(_same_values(vals, vals_state),
          "the output and the state's update read different values")
    # shapes and dtypes
    need(tuple(k.type.shape) == tuple(q.type.shape),
          "keys are not [B, H, T, d_k] like the queries")
    dv = st.type.shape[-1]
    need(tuple(st.type.shape) == (B, H, dk, dv),
          f"the state {list(st.type.shape)} is not [B, H, d_k, d_v]")
    need(tuple(out.type.shape) == (B, H, T, dv) and tuple(new_state.type.shape)
          == tuple(st.type.shape), "the output or the new state is not [B, H, T | d_k, d_v]")
    vt = vals[1].type
    need(vt.rank == 4 and vt.shape[2] == T and vt.shape[3] == dv,
          "values are not [B, H, T, d_v]")
    ins_v = [vals[1]]
    dt = q.type.dtype
    need(dt.value in FLOATS and all(n.type.dtype == dt for n in [k, out] + ins_v),
          "q, k, the values and the output differ in dtype (or are not float)")
    need(ld.type.dtype.value in FLOATS, "log-decays are not float")
    inside = set(region)
    for n in region:
        if n is out or n is new_state or not n.inputs:   # sources are copied into the body
            continue
        need(all(u in inside for u in users.get(n, [])),
              f"{n.op.value} inside the linear attention is also used outside it")
    # the state's update may read its own copy of the views of V: the body reads the
    # output's
    dup = {a_: b_ for a_, b_ in zip(vals_state[1:], vals[1:]) if a_ is not b_}
    return {"inputs": [q, k] + ins_v + [ld, st], "out": out, "state": new_state,
            "region": inside, "dup": dup, "heads": H,
            "dims": (dk, dv), "decays": list(ld.type.shape)}


def match_gated(st: Node, users: Dict[Node, List[Node]]) -> dict:
    """The decode pass's step of gated linear attention (per-channel decays) around the state
    input `st` (lmc/passes/decode.py, `_gated_linear_attention_step`):
        inter = (q * exp(G)) @ S              G = cumsum(ld) along the new tokens [.., T, dk]
        out   = sum(q5 * k5 * exp(where(mask, G_t - G_s, -inf)), -1) @ v + inter
        S'    = permute(exp(G_end)) * S + permute(k * exp(G_end - G)) @ v
    (casts to q's dtype and back to fp32 between them). Raises NoMatch naming what differs."""
    reads = [u for u in users.get(st, []) if u is not None]
    need(len(reads) == len(users.get(st, [])), "the state input is itself a graph output")
    region: List[Node] = []
    ss = st
    for u in reads:
        if u.op is Op.CAST:
            region.append(u)
            ss = u
    inter = next((u for u in users.get(ss, []) if u is not None and u.op is Op.MATMUL
                  and u.inputs[1] is ss), None)
    dec = next((u for u in reads if u.op is Op.MUL), None)
    need(inter is not None and dec is not None,
          "the state is not read as (q * exp(G)) @ S and decay * S")
    qe = inter.inputs[0]
    need(qe.op is Op.MUL, "the state's query side is not q * exp(G)")
    eg = next((x for x in qe.inputs if uncast(x).op is Op.EXP), None)
    need(eg is not None, "the state's query side is not q * exp(G)")
    q = other(qe, eg)
    G = uncast(eg).inputs[0]
    need(G.op is Op.CUMSUM and G.attrs["axis"] % G.type.rank == G.type.rank - 2,
          "the query-side decays are not a cumsum along the new tokens of [.., T, d_k]")
    ld = G.inputs[0]
    ups = users.get(dec, [])
    need(len(ups) == 1 and ups[0] is not None and ups[0].op is Op.ADD,
          "the decayed state is not used once, in S' = decay * S + k^T v")
    new_state = ups[0]
    kv = uncast(other(new_state, dec))
    need(kv.op is Op.MATMUL and kv.inputs[0].op is Op.PERMUTE
          and kv.inputs[0].inputs[0].op is Op.MUL, "the state's update is not (k * w)^T @ v")
    kw = kv.inputs[0].inputs[0]
    w = next((x for x in kw.inputs if uncast(x).op is Op.EXP), None)
    need(w is not None, "the keys of the state's update are not decayed by exp(.)")
    k, v = other(kw, w), kv.inputs[1]
    uo = users.get(inter, [])
    need(len(uo) == 1 and uo[0] is not None and uo[0].op is Op.ADD,
          "the state's read is not added once to the intra-chunk product")
    out = uo[0]
    intra = other(out, inter)
    need(intra is not None and intra.op is Op.MATMUL and intra.inputs[1] is v
          and uncast(intra.inputs[0]).op is Op.SUM,
          "the output is not sum(q k D) @ v + (q * exp(G)) @ S over one v")
    B, H, DK, DV = st.type.shape
    T = q.type.shape[2]
    need(tuple(k.type.shape) == tuple(q.type.shape) and tuple(ld.type.shape) == tuple(
         q.type.shape) and q.type.shape[3] == DK and tuple(v.type.shape[2:]) == (T, DV),
         "q, k, the decays and v do not fit the state [B, H, d_k, d_v]")
    need(q.type.dtype.value in FLOATS and k.type.dtype == v.type.dtype == q.type.dtype,
          "q, k, v differ in dtype (or are not float)")
    inputs = [q, k, v, ld, st]
    region = list(upstream([out, new_state], set(inputs))) + region
    inside = set(region)
    for n in region:
        for i in n.inputs:
            need(i in inside or i in inputs or not i.inputs,
                  f"the gated linear attention's step reads {i.op.value} besides q, k, v, "
                  f"the decays and the state")
        if n is not out and n is not new_state:
            need(all(u in inside for u in users.get(n, [])),
                  f"{n.op.value} inside the gated linear attention is also used outside it")
    return {"inputs": inputs, "out": out, "state": new_state, "region": inside, "dup": {},
            "heads": H, "dims": (DK, DV), "decays": list(ld.type.shape), "gated": True}


def _match_any(st: Node, users) -> dict:
    """The scalar-decay step, else (its decays read per channel) the gated one."""
    try:
        return match(st, users)
    except _PerChannel:
        return match_gated(st, users)


def _body(m: dict, name: str, order: Dict[Node, int]) -> Graph:
    """The matched region as a body graph over placeholders in0.. for m["inputs"]
    (q, k, V or X, W, ld, S); outputs "0" (the attention output) and "1" (the new state)."""
    b = Body(m["inputs"], alias=m["dup"])   # a second copy of a view of V: the body reads one
    b.copy(sorted(m["region"], key=order.__getitem__))
    return b.graph(name, [m["out"], m["state"]],
                   module="decode_linear_attention",  # lmc/codegen/decode_linear_attention.py
                   template="decode_gated_linear_attention" if m.get("gated") else
                   "decode_linear_attention", options={"chunk": DEFAULT_CHUNK})


def fuse_decode_linear_attention(g: Graph) -> Graph:
    """The step graph with each matched linear attention as one FUSED
    "decode_linear_attention" node (outputs: the attention output, the new state); a record
    per candidate state input in meta["fusions"]."""
    users = g.users()
    for o in g.outputs.values():
        users.setdefault(o, []).append(None)      # a graph output is a use outside
    order = {n: i for i, n in enumerate(g.nodes)}
    matches, records = match_all(
        g, lambda n: n.op is Op.INPUT and STATE_NAME.search(n.attrs["name"]),
        lambda n: _match_any(n, users), PASS)
    regions = []
    for i, m in enumerate(matches):
        kind = "decode_gated_linear_attention" if m.get("gated") else \
            "decode_linear_attention"
        name = f"lmc_{kind}_{i}"
        fused = Node.make(Op.FUSED, list(m["inputs"]),
                          {"kernel": name, "kind": kind,
                           "body": _body(m, name, order)}, m["out"].loc, m["out"].scope)
        regions.append(Region(fused, [m["out"], m["state"]], m["region"]))
        dk, dv = m["dims"]
        records.append({
            "pass": PASS, "status": "fused", "where": _where(m["out"]),
            "reason": f"{'gated: ' if m.get('gated') else ''}{m['heads']} heads, state "
                      f"{dk}x{dv} per head, log-decays {m['decays']}"})
    return splice(g, regions, records)
