"""`split_gated_projection`: a gated FFN's fused input projection as two projections.

Models often compute both halves of a gated FFN with one weight and split the product:

    g, u = split(x @ W_gu, 2, -1)          # W_gu = [W_gate | W_up], a parameter
    h    = act(g) * u                      # SwiGLU, GeGLU, ...

As written, the [.., 2 * ffn] product is stored and a pointwise kernel reads it back to gate
it. The pass rewrites each half as its own product with a slice of the weight (a strided
view of the parameter; its gradient is the concatenation of the halves' gradients):

    g = x @ W_gu[:, :ffn]      u = x @ W_gu[:, ffn:]

which is the separate-weights form fuse_matmul already makes one kernel of (two products
sharing A, the gate in their epilogue; in the backward, both halves' gradients in one
launch): the same arithmetic, exactly as a model with separate weights computes it.

Matched on primitives: a matmul whose right operand is a parameter (or its cast, under
mixed precision), read only by slices along its last axis, two of which are combined by one
multiplication, each factor computed elementwise from its own slice alone (act(g) * u,
g * sigmoid(g) * u, ...). Products split for other readers (attention's q, k, v: their
kernels read the fused product's pieces in place, and its backward is one product over the
whole width) are left alone. A record per site (`--explain`, pass name
split_gated_projection). Runs with the pattern passes, before autodiff, on the program the
triton backend trains or runs, and on its decode step.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set

from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from .fuse_pointwise import _where

PASS = "split_gated_projection"


def _weight(w: Node) -> bool:
    return w.op is Op.PARAM or (w.op is Op.CAST and w.inputs[0].op is Op.PARAM)


def _sources(n: Node, slices: Set[Node], memo: Dict[Node, Optional[frozenset]]):
    """The slices n is computed from through elementwise ops (constants aside), or None when
    it reads anything else."""
    if n in memo:
        return memo[n]
    if n in slices:
        out = frozenset([n])
    elif n.op is Op.CONST:
        out = frozenset()
    elif n.op.kind is Kind.POINTWISE:
        out = frozenset()
        for x in n.inputs:
            s = _sources(x, slices, memo)
            if s is None:
                out = None
                break
            out |= s
    else:
        out = None
    memo[n] = out
    return out


def _gated(m: Node, slices: List[Node], users) -> Optional[str]:
    """Why the slices of m are not a gated pair (None: they are)."""
    memo: Dict[Node, Optional[frozenset]] = {}
    seen: Set[Node] = set()
    stack = list(slices)
    chosen = set(slices)
    while stack:                     # every elementwise node computed from the slices
        n = stack.pop()
        for u in users.get(n, []):
            if u in seen or u.op.kind is not Kind.POINTWISE:
                continue
            seen.add(u)
            stack.append(u)
            if u.op is Op.MUL:
                a, b = (_sources(x, chosen, memo) for x in u.inputs)
                if a and b and len(a) == len(b) == 1 and a != b:
                    return None
    return "no product of two halves computed from one slice each (not a gated FFN)"


def split_gated_projection(g: Graph) -> Graph:
    users = g.users()
    outputs = set(g.outputs.values())
    halves: Dict[Node, Node] = {}       # a slice of a split product -> the product
    records = []
    for m in g.nodes:
        if m.op is not Op.MATMUL or m.type.rank < 2 or m in outputs:
            continue
        w = m.inputs[1]
        rs = users.get(m, [])
        r = m.type.rank
        if not _weight(w) or w.type.rank != 2 or len(rs) < 2 or not all(
                u.op is Op.SLICE and u.attrs["axis"] % r == r - 1 and u.attrs["step"] == 1
                and isinstance(u.attrs["start"], int) and isinstance(u.attrs["stop"], int)
                for u in rs):
            continue
        why = _gated(m, rs, users)
        if why is not None:
            records.append({"pass": PASS, "status": "declined", "where": _where(m),
                            "reason": why})
            continue
        halves.update((s, m) for s in rs)
        sizes = ", ".join(str(s.attrs["stop"] - s.attrs["start"]) for s in rs)
        records.append({"pass": PASS, "status": "fused", "where": _where(m),
                        "reason": f"x @ W split into {len(rs)} ({sizes}) and gated: one "
                                  f"product per slice of W"})
    if not records:
        return g
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    for n in g.nodes:
        m = halves.get(n)
        if m is not None:        # slice(x @ W) = x @ slice(W), W's slice a strided view
            ws = Node.make(Op.SLICE, (new[m.inputs[1]],),
                           {"axis": 1, "start": n.attrs["start"], "stop": n.attrs["stop"],
                            "step": 1}, m.inputs[1].loc, m.inputs[1].scope)
            new[n] = Node.make(Op.MATMUL, (new[m.inputs[0]], ws), {}, m.loc, m.scope)
            nodes += [ws, new[n]]
            continue
        ins = tuple(new[i] for i in n.inputs)
        cur = n if ins == n.inputs else Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        new[n] = cur
        nodes.append(cur)
    from .basic import dce
    out = dce(g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()}))
    out.meta["fusions"] = list(g.meta.get("fusions", [])) + records
    return out
