"""The verifier: structural invariants every pass must preserve.

Run after every pass by the pipeline, so a pass that breaks the graph is caught at once and
named, rather than surfacing later as a wrong answer.
"""
from __future__ import annotations

from ..errors import LmcError
from ..ir.graph import Graph
from ..ir.ops import Op
from ..ops.shapes import infer


def verify(g: Graph, *, inlined: bool = False) -> Graph:
    seen = set()
    names = {}
    for n in g.nodes:
        for i in n.inputs:
            if i not in seen:
                raise LmcError(f"internal: {n} uses {i}, which is not defined before it", n.loc)
        if n.op.arity is not None and len(n.inputs) != n.op.arity:
            raise LmcError(f"internal: {n} has {len(n.inputs)} inputs, expected {n.op.arity}",
                           n.loc)
        if inlined and (n.op is Op.BLOCK or n.op is Op.GETITEM
                        and n.inputs[0].op not in (Op.FUSED, Op.SCAN, Op.SCAN_BWD)):
            raise LmcError(f"internal: {n} survived inlining", n.loc)
        if n.op is Op.SCAN:  # the step body is a graph of its own, kept opaque
            verify(n.attrs["body"], inlined=True)
        if n.op in (Op.INPUT, Op.PARAM):
            key = (n.op, n.attrs["name"])
            if key in names:
                raise LmcError(f"duplicate {n.op.value} name {n.attrs['name']!r}", n.loc)
            names[key] = n
        expect = infer(n.op, [i.type for i in n.inputs], dict(n.attrs))
        if expect != n.type:
            raise LmcError(f"internal: {n} has type {n.type}, its rule says {expect}", n.loc)
        seen.add(n)
    for k, o in g.outputs.items():
        if o not in seen:
            raise LmcError(f"internal: output {k!r} is not a node of the graph")
    return g
