"""`fuse_column_sums`: a sum over every row of a row kernel's space, in that kernel.

A norm's weight gradient is sum over B and T of dy * x * rstd, a vector [N]. After
fuse_reductions it is two column-sum kernels (autodiff's unbroadcast sums axis 0 twice: over
B, then over T) and the first reads dy and x again, right after the norm backward's row
kernel (dx: a reduction along N) has read them: for llama at B=16, T=1024 that is 75 MB a
norm, 25 norms a step. Here the sum joins the row kernel (lmc/codegen/reduction.py): each
program walks its share of the row blocks (a persistent loop), adds every row's values into
fp32 column accumulators it keeps in registers, and stores one partial row; a second small
launch adds the programs' partials in a fixed order, so the result does not depend on
scheduling. Two launches instead of three, and dy and x are read once.

Runs after the other fusion passes, on their FUSED nodes. Matched: a reduction kernel S
summing axis 0 of its row space [..., N] (keepdim off) and storing only that sum, followed by
kernels that each only sum axis 0 of the previous one until [N] remains (the chain must be
read by nothing else); and a reduction kernel R along the last axis of the same space that
reads a full-size input of S or produces one (R's output), with every other input of S
defined before R, and R before whatever reads the sum (R may come after S: a LayerNorm's
bias gradient, the sum of dy, is made before the row kernel). N must be static and at most
COL_MAX, so a row is one chunk of the kernel and its column accumulators fit in registers.
Of several such R, the one sharing the most full-size inputs with S takes it. Each merge
and each decline is recorded in ``meta["fusions"]``.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from ..codegen.reduction import COL_BLOCK_MAX
from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from .fuse_pointwise import is_source
from .patterns import Body

PASS = "fuse_column_sums"
# N up to which a row is one chunk of the kernel (its widest BLOCK_N on a GPU)
COL_MAX = COL_BLOCK_MAX


def _is_red(n: Node) -> bool:
    return n.op is Op.FUSED and n.attrs.get("kind") == "reduction"


def _single_sum(n: Node) -> Optional[Node]:
    """The SUM node when kernel n stores exactly one value, a sum over axis 0 (keepdim off)
    of a value of its row space, computed by pointwise ops from its inputs; else None."""
    body = n.attrs["body"]
    outs = list(body.outputs.values())
    if len(outs) != 1 or outs[0].op is not Op.SUM:
        return None
    s = outs[0]
    x = s.inputs[0]
    if x.type.rank < 2 or s.attrs["axis"] % x.type.rank != 0 or s.attrs.get("keepdim"):
        return None
    ops = [m for m in body.nodes if m.op not in (Op.INPUT, Op.CONST) and m is not s]
    if any(m.op.kind is not Kind.POINTWISE or m.op is Op.INDEX_COPY for m in ops):
        return None
    return s


def _chain(s: Node, users, outputs) -> Optional[Tuple[List[Node], Node]]:
    """S's kernel and the kernels summing its output further, to the GETITEM of [N]; None
    when S is not the start of a column sum over every row."""
    sm = _single_sum(s)
    if sm is None:
        return None
    chain = [s]
    gi = next(iter(users[s]), None)
    if gi is None or len(users[s]) != 1:
        return None
    while gi.type.rank > 1:
        rd = users[gi]
        if gi in outputs or len(rd) != 1 or not _is_red(rd[0]) or len(rd[0].inputs) != 1:
            return None
        c = rd[0]
        body = c.attrs["body"]
        ops = [m for m in body.nodes if m.op is not Op.INPUT]
        if len(ops) != 1 or ops[0].op is not Op.SUM or list(body.outputs.values()) != ops \
                or ops[0].attrs["axis"] % gi.type.rank != 0 or ops[0].attrs.get("keepdim"):
            return None
        chain.append(c)
        if len(users[c]) != 1:
            return None
        gi = users[c][0]
    return chain, gi


def _space(r: Node):
    from ..codegen.reduction import Plan
    return Plan(r.attrs["body"]).space


def _shared(s: Node, r: Node, space) -> int:
    """How many of S's full-size inputs kernel r reads or produces."""
    return sum(1 for x in s.inputs if x.type.shape == space and (
        x in r.inputs or (x.op is Op.GETITEM and x.inputs[0] is r)))


def _row_kernel(s: Node, last: Node, users, order) -> Tuple[Optional[Node], str]:
    """The row kernel taking S's column sum (whose result `last` is), or None and why not.
    It may stand after S (a LayerNorm's bias gradient, the sum of dy, comes first) when
    everything reading the result comes after it."""
    space = _single_sum(s).inputs[0].type.shape
    n = space[-1]
    if not isinstance(n, int):
        return None, f"its rows have a symbolic length ({n}): a row must be one chunk"
    if n > COL_MAX:
        return None, f"its rows have {n} > {COL_MAX} elements: a row must be one chunk"
    # the kernels reading one of S's full-size inputs or producing one
    full = [x for x in s.inputs if x.type.shape == space]
    near = [u for x in full for u in users[x] if _is_red(u)] + \
        [x.inputs[0] for x in full if x.op is Op.GETITEM and _is_red(x.inputs[0])]
    best, score = None, 0
    for r in dict.fromkeys(near):
        if r is s or r.attrs.get("axis") != len(space) - 1:
            continue
        if order[r] > order[s] and not all(order[u] > order[r] for u in users[last]):
            continue
        k = _shared(s, r, space)
        if k <= score or _space(r) != space or \
                any(m.op is Op.INDEX_COPY for m in r.attrs["body"].nodes):
            continue
        if all(x in r.inputs or (x.op is Op.GETITEM and x.inputs[0] is r) or
               is_source(x) or order[x] < order[r] for x in s.inputs):
            best, score = r, k
    if best is None:
        return None, ("no reduction kernel along the rows of the same space reads or "
                      "produces the values it sums (before its result is read)")
    return best, ""


def _merged(r: Node, sites: List[Tuple[List[Node], Node]]) -> Node:
    """R's kernel also storing each site's column sum (outputs after R's own)."""
    rbody = r.attrs["body"]
    ext = list(r.inputs)
    for chain, _ in sites:
        ext += [x for x in chain[0].inputs
                if x not in ext and not (x.op is Op.GETITEM and x.inputs[0] is r)]
    rph = [m for m in rbody.nodes if m.op is Op.INPUT]
    b = Body(ext, alias=dict(zip(rph, r.inputs)))
    b.copy([m for m in rbody.nodes if m.op is not Op.INPUT])
    outs = [b.env[o] for o in rbody.outputs.values()]
    for chain, _ in sites:
        sbody = chain[0].attrs["body"]
        sph = [m for m in sbody.nodes if m.op is Op.INPUT]
        for ph, x in zip(sph, chain[0].inputs):
            if x.op is Op.GETITEM and x.inputs[0] is r:
                b.env[ph] = b.env[rbody.outputs[str(x.attrs["index"])]]
            else:
                b.env[ph] = b.env[x]
        b.copy([m for m in sbody.nodes if m.op is not Op.INPUT])
        v = b.env[sbody.outputs["0"]]
        for c in chain[1:]:
            sm = c.attrs["body"].outputs["0"]
            v = b.add(Node(Op.SUM, (v,), sm.attrs, sm.type, sm.loc, sm.scope))
        outs.append(v)
    name = re.sub(r"_(\d+)$", r"_colsum_\1", r.attrs["kernel"])
    nb = b.graph(name, outs, **rbody.meta, column_sums=len(sites))
    return Node.make(Op.FUSED, ext, {**r.attrs, "kernel": name, "body": nb}, r.loc, r.scope)


def fuse_column_sums(g: Graph) -> Graph:
    users = g.users()
    outputs = set(g.outputs.values())
    order = {n: i for i, n in enumerate(g.nodes)}
    records: List[dict] = []
    plan: Dict[Node, List[Tuple[List[Node], Node]]] = {}
    seen = set()        # kernels of a chain met already (a later link is no new start)
    for s in g.nodes:
        if not _is_red(s) or s in seen:
            continue
        found = _chain(s, users, outputs)
        if found is None:
            continue
        seen.update(found[0])
        where = s.scope or "<model>"
        r, why = _row_kernel(s, found[1], users, order)
        if r is None:
            records.append({"pass": PASS, "status": "declined", "where": where,
                            "reason": f"{s.attrs['kernel']} stays a kernel: {why}"})
            continue
        plan.setdefault(r, []).append(found)
        names = ", ".join(c.attrs["kernel"] for c in found[0])
        records.append({"pass": PASS, "status": "fused", "where": where,
                        "reason": f"the sum over every row ({names}) in the row kernel "
                                  f"{r.attrs['kernel']}: its kernels removed"})
    if not plan:
        out = g.with_nodes(list(g.nodes), dict(g.outputs))
        out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
        return out
    gone = set()
    for sites in plan.values():
        for chain, _ in sites:
            gone.update(chain)
            gone.update(users[c][0] for c in chain)
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    for n in g.nodes:
        if n in gone:
            continue
        if n in plan:     # R's kernel with the column sums, then GETITEMs of the sums
            new[n] = m = _merged(n, plan[n]).remapped(new)
            nodes.append(m)
            k = len(n.attrs["body"].outputs)
            for j, (_, last) in enumerate(plan[n]):
                new[last] = Node.make(Op.GETITEM, [m], {"index": k + j}, last.loc, last.scope)
                nodes.append(new[last])
            continue
        new[n] = c = n.remapped(new)
        nodes.append(c)
    out = g.with_nodes(nodes, {k: new.get(v, v) for k, v in g.outputs.items()})
    out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
    return out
