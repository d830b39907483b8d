"""`fuse_rope_attention`: RoPE on q and k, then scaled, masked, softmaxed attention, as one op.

Matched on primitives (no block names): from each softmax over the last axis, the pass walks

    out = softmax(where(causal_mask(T, T, window), (rope(q) @ rope(k)^T) * scale, -inf)) @ v
    rope(x) = x * cos + concat(-x[..., D/2:], x[..., :D/2]) * sin      (rotate-half layout)

with cos/sin [T, D] tables computed from positions alone, and replaces the region with one
FUSED node of kind "rope_attention" (inputs q, k, v, cos, sin; output the attention output).
Its body is the matched primitives, so the torch backend and every
check still run the exact oracle; the triton backend runs lmc/codegen/attention.py's kernels
(RoPE applied to tiles inside a flash-attention kernel, never materialising T x T). The
autodiff pass differentiates a FUSED node by its body, and the backward op (kind
"rope_attention_bwd") runs the fused backward kernel.

It runs before autodiff on the program being trained or run on the triton backend, not in the
compile pipeline: the decode pass derives its step from the unfused graph. Where a region
almost matches, a declined record says which condition failed (`lmc compile --explain`).
Not matched yet: interleaved-pair RoPE, partial rotary, GQA through an expand, MLA's
decoupled RoPE, cross-attention without RoPE, XPos.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..ir.graph import Graph, Node, toposort
from ..ir.ops import Op
from .fuse_pointwise import _where


class _NoMatch(Exception):
    pass


def _const_value(n: Node) -> Optional[float]:
    if n.op is Op.CONST and n.type.rank == 0 and not hasattr(n.attrs["value"], "shape"):
        try:
            return float(n.attrs["value"])
        except (TypeError, ValueError):
            return None
    return None


def _need(cond: bool, why: str):
    if not cond:
        raise _NoMatch(why)


def _split_mul(n: Node, want_table) -> Tuple[Node, Node]:
    """n = a * t with t a table satisfying `want_table`: (a, t)."""
    _need(n.op is Op.MUL, f"{n.op.value} where x*cos or rot(x)*sin was expected")
    a, b = n.inputs
    if want_table(b):
        return a, b
    if want_table(a):
        return b, a
    raise _NoMatch("no [T, D] position table in the RoPE product")


def _rope(n: Node, static) -> Tuple[Node, Node, Node]:
    """n = rope(x): (x, cos, sin), rotate-half layout over the whole head dim."""
    _need(n.op is Op.ADD, f"{n.op.value} where rope's add of x*cos and rot(x)*sin was expected")

    def table(t):
        return t.type.rank == 2 and static(t)
    first, second = n.inputs
    for p, q in ((first, second), (second, first)):
        try:
            x, cos = _split_mul(p, table)
            r, sin = _split_mul(q, table)
        except _NoMatch:
            continue
        if r.op is not Op.CONCAT:
            continue
        # under mixed precision the fp32 tables reach x through one cast each
        c0 = cos.inputs[0] if cos.op is Op.CAST else cos
        s0 = sin.inputs[0] if sin.op is Op.CAST else sin
        _need(c0.op is Op.COS and s0.op is Op.SIN,
              "rope tables are not cos/sin of the same angles")
        _need(c0.inputs[0] is s0.inputs[0], "rope's cos and sin are of different angles")
        D = x.type.shape[-1]
        _need(isinstance(D, int) and D % 2 == 0, "head dim is not a static even size")
        _need(r.attrs["axis"] == x.type.rank - 1 and len(r.inputs) == 2,
              "rotation is not a concat of two halves on the last axis")
        neg, lo = r.inputs
        if neg.op is not Op.NEG:
            raise _NoMatch("interleaved or other rotation layout: only rotate-half is matched")
        hi = neg.inputs[0]
        for s, (start, stop) in ((hi, (D // 2, D)), (lo, (0, D // 2))):
            _need(s.op is Op.SLICE and s.inputs[0] is x and s.attrs["axis"] == x.type.rank - 1
                  and s.attrs["start"] == start and s.attrs["stop"] == stop
                  and s.attrs.get("step", 1) == 1,
                  "rotation halves are not x[..., D/2:] and x[..., :D/2] (partial rotary?)")
        _need(tuple(cos.type.shape)[-1] == D, "partial rotary (table narrower than the head)")
        return x, cos, sin
    raise _NoMatch("not x*cos + rotate_half(x)*sin")


def match(sm: Node, users: Dict[Node, List[Node]], static) -> dict:
    _need(sm.attrs["axis"] == sm.type.rank - 1, "softmax not over the last axis")
    _need(sm.type.dtype.value in ("f32", "f16", "bf16"), "attention in a non-float dtype")
    outs = users.get(sm, [])
    _need(len(outs) == 1 and outs[0].op is Op.MATMUL and outs[0].inputs[0] is sm,
          "probabilities are not used once, as probs @ v")
    pv = outs[0]
    v = pv.inputs[1]
    x = sm.inputs[0]
    causal, window = False, 0
    region = [sm, pv]
    if x.op is Op.WHERE:
        mask, s, fill = x.inputs
        _need(mask.op is Op.CAUSAL_MASK, "masked by something other than causal_mask")
        _need(_const_value(fill) == float("-inf"), "masked scores are not set to -inf")
        causal, window = True, int(mask.attrs.get("window") or 0)
        region += [x]
        x = s
    scale = 1.0
    if x.op in (Op.MUL, Op.DIV):
        a, c = x.inputs
        if x.op is Op.MUL and _const_value(a) is not None:
            a, c = c, a
        cv = _const_value(c)
        _need(cv is not None, "scores scaled by a tensor")
        scale = cv if x.op is Op.MUL else 1.0 / cv
        region += [x]
        x = a
    _need(x.op is Op.MATMUL, f"{x.op.value} where q @ k^T was expected")
    mm = x
    qr, kt = mm.inputs
    _need(kt.op is Op.PERMUTE and tuple(kt.attrs["perm"]) == (0, 1, 3, 2),
          "keys are not transposed from [B, H, S, D]")
    kr = kt.inputs[0]
    q, cos, sin = _rope(qr, static)
    k, kcos, ksin = _rope(kr, static)
    _need(cos is kcos and sin is ksin, "q and k use different rope tables")
    _need(q.type.shape[1] == k.type.shape[1] == v.type.shape[1],
          "q, k and v have different head counts (GQA through an expand is not matched yet)")
    _need(q.type.dtype == k.type.dtype == v.type.dtype, "q, k, v dtypes differ")
    region += [mm, kt, qr, kr]
    for r in (qr, kr):
        mul_a, mul_b = r.inputs
        rot = [m for m in (mul_a, mul_b)
               if any(i.op is Op.CONCAT for i in m.inputs)][0].inputs
        rot = [i for i in rot if i.op is Op.CONCAT][0]
        region += [mul_a, mul_b, rot] + list(rot.inputs) + [rot.inputs[0].inputs[0]]
    inside = set(region)
    for n in region:
        if n is pv:
            continue
        _need(all(u in inside for u in users.get(n, [])),
              f"{n.op.value} inside the attention is also used outside it")
    return {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "out": pv, "region": inside,
            "causal": causal, "window": window, "scale": scale, "scores": mm,
            "masked": sm.inputs[0]}


def _body(m: dict, name: str) -> Graph:
    """The matched region as a body graph over placeholders in0..in4 (q, k, v, cos, sin)."""
    from ..frontend.builder import Builder

    b = Builder({}, {})
    env: Dict[Node, Node] = {}
    for i, key in enumerate(("q", "k", "v", "cos", "sin")):
        x = m[key]
        env[x] = b.input(f"in{i}", x.type.shape, x.type.dtype).node
    for n in toposort([m["out"]], ()):
        if n in env or n not in m["region"]:
            continue
        for i in n.inputs:
            if i not in env:              # a source read by the region (mask, constants)
                assert not i.inputs and i.op not in (Op.INPUT, Op.PARAM), i
                env[i] = Node(i.op, (), dict(i.attrs), i.type, i.loc, i.scope)
                b.nodes.append(env[i])
        c = Node(n.op, tuple(env[i] for i in n.inputs), n.attrs, n.type, n.loc, n.scope)
        env[n] = c
        b.nodes.append(c)
    body = Graph(name, b.nodes, {"0": env[m["out"]]})
    body.meta["module"] = "attention"          # lmc/codegen/attention.py's launch_template
    body.meta["template"] = "rope_attention"
    body.meta["options"] = {"causal": m["causal"], "window": m["window"], "scale": m["scale"]}
    return body


def fuse_rope_attention(g: Graph) -> Graph:
    users = g.users()
    static: Dict[Node, bool] = {}
    for n in g.nodes:
        static[n] = n.op not in (Op.INPUT, Op.PARAM) and all(static[i] for i in n.inputs)
    records, matches = [], []
    for n in g.nodes:
        # candidates: softmaxes over the keys of [B, H, T, S] scores (a router's softmax
        # over experts is not attention and is not reported)
        if n.op is not Op.SOFTMAX or n.type.rank != 4:
            continue
        try:
            m = match(n, users, lambda t: static.get(t, False))
        except _NoMatch as e:
            records.append({"pass": "fuse_rope_attention", "status": "declined",
                            "where": _where(n), "reason": str(e)})
            continue
        matches.append(m)
    if not matches:
        out = g.with_nodes(g.nodes, g.outputs)
        out.meta["fusions"] = list(g.meta.get("fusions", [])) + records
        return out
    replace: Dict[Node, Node] = {}
    new_nodes: Dict[Node, List[Node]] = {}
    for i, m in enumerate(matches):
        name = f"lmc_rope_attention_{i}"
        body = _body(m, name)
        fused = Node.make(Op.FUSED, [m[k] for k in ("q", "k", "v", "cos", "sin")],
                          {"kernel": name, "kind": "rope_attention", "body": body,
                           "no_grad": (3, 4)},   # position tables: no gradient
                          m["out"].loc, m["out"].scope)
        get = Node.make(Op.GETITEM, [fused], {"index": 0}, m["out"].loc, m["out"].scope)
        replace[m["out"]] = get
        new_nodes[m["out"]] = [fused, get]
        records.append({"pass": "fuse_rope_attention", "status": "fused",
                        "where": _where(m["out"]),
                        "reason": f"rope + {'causal ' if m['causal'] else ''}"
                                  f"{'window ' + str(m['window']) + ' ' if m['window'] else ''}"
                                  f"attention, scale {m['scale']:.4g}"})
    dead = set().union(*[m["region"] for m in matches]) - set(replace)
    nodes: List[Node] = []
    new: Dict[Node, Node] = {}
    for n in g.nodes:
        if n in dead:
            continue
        if n in new_nodes:
            fused, get = new_nodes[n]
            fused = Node(fused.op, tuple(new.get(i, i) for i in fused.inputs), fused.attrs,
                         fused.type, fused.loc, fused.scope)
            get = Node(get.op, (fused,), get.attrs, get.type, get.loc, get.scope)
            nodes += [fused, get]
            new[n] = get
            continue
        ins = tuple(new.get(i, i) for i in n.inputs)
        c = n if ins == n.inputs else Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        new[n] = c
        nodes.append(c)
    out = g.with_nodes(nodes, {k: new.get(v, v) for k, v in g.outputs.items()})
    out.meta["fusions"] = list(g.meta.get("fusions", [])) + records
    from .basic import dce
    return dce(out)
