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
whose one reduction sums axis 0 of its row space [..., N] (keepdim off), computed by
pointwise ops, its other outputs (if any) pointwise values of the whole space, followed by
kernels that each only sum axis 0 of the previous one until [N] remains (the chain must be
read by nothing else); and a reduction kernel R along the last axis of the same space that
reads a full-size input of S, or one of S's other outputs, or produces one (R's output),
with every other input of S defined before R, and R before whatever reads S's results (R
may come after S: a LayerNorm's bias gradient, the sum of dy, is made before the row
kernel; views of the results between S and R move after R). S's other outputs become row
stores of the merged kernel where something besides R reads them, and values in registers
where only R does: a gated norm's backward groups the weight gradient's first sum over B
with the gate's gradient and the norm's upstream gradient, which R reads (minimax's
lightning output norm, blues01's and yoco's gated norms: one kernel instead of three).
N must be static and at most COL_MAX, so a row is one chunk of the kernel and its column
accumulators fit in registers. Of several such R, the one sharing the most full-size values
with S takes it. Where no such R exists but the summed value is a row store of a kernel
along T (`_along_rows`), that kernel sums it along its own rows instead. Each merge and each
decline is recorded in ``meta["fusions"]``.
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


def _column_start(n: Node) -> Optional[Tuple[Node, int, List[int]]]:
    """When kernel n computes, by pointwise ops from its inputs, one sum over axis 0 (keepdim
    off) of a value of its row space: that SUM, its output index and the indices of the
    kernel's other outputs, each a pointwise value of the whole row space (they become row
    stores of the row kernel); else None."""
    body = n.attrs["body"]
    outs = list(body.outputs.values())
    sums = [k for k, o in enumerate(outs) if o.op is Op.SUM]
    if len(sums) != 1:
        return None
    s = outs[sums[0]]
    x = s.inputs[0]
    if x.type.rank < 2 or s.attrs["axis"] % x.type.rank != 0 or s.attrs.get("keepdim"):
        return None
    ops = [m for m in body.nodes if m.op not in (Op.INPUT, Op.CONST) and m is not s]
    if any(m.op.kind is not Kind.POINTWISE or m.op is Op.INDEX_COPY or s in m.inputs
           for m in ops):     # (nothing may read the sum: the kernel has it at its end)
        return None
    extra = [k for k in range(len(outs)) if k != sums[0]]
    if any(outs[k].op in (Op.INPUT, Op.CONST) or outs[k].type.shape != x.type.shape
           for k in extra):
        return None
    return s, sums[0], extra


def _chain(s: Node, users, outputs) -> Optional[Tuple[List[Node], Node, List[Node]]]:
    """S's kernel and the kernels summing its output further, to the GETITEM of [N], and the
    GETITEMs of S's other outputs; None when S is not the start of a column sum over every
    row."""
    start = _column_start(s)
    if start is None or any(u.op is not Op.GETITEM for u in users[s]):
        return None
    k = start[1]
    mine = [u for u in users[s] if u.attrs["index"] == k]
    if len(mine) != 1:
        return None
    gi, extras = mine[0], [u for u in users[s] if u.attrs["index"] != k]
    chain = [s]
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
    return chain, gi, extras


def _space(r: Node):
    from ..codegen.reduction import Plan
    return Plan(r.attrs["body"]).space


def _shared(s: Node, r: Node, space, extras: List[Node]) -> int:
    """How many of S's full-size inputs kernel r reads or produces, and of S's other outputs
    it reads."""
    return sum(1 for x in s.inputs if x.type.shape == space and (
        x in r.inputs or (x.op is Op.GETITEM and x.inputs[0] is r))) + \
        sum(e in r.inputs for e in extras)


def _late(r: Node, last: Node, extras: List[Node], users, order) -> Optional[List[Node]]:
    """When R stands after S: the views of S's results that stand between them and so must
    move after R, where the merged kernel makes the results (None when something else reads
    a result before R). R itself may read S's other outputs (not a view of them, not the
    sum): the merged kernel computes them before R's own nodes."""
    moved: List[Node] = []
    stack = [last, *extras]
    while stack:
        x = stack.pop()
        for u in users[x]:
            if order[u] > order[r] or (u is r and x in extras):
                continue
            if u.op.kind is not Kind.VIEW or u.op is Op.CONCAT or len(u.inputs) != 1:
                return None
            moved.append(u)
            stack.append(u)
    return sorted(set(moved), key=order.__getitem__)


def _row_kernel(s: Node, last: Node, extras: List[Node], users, order
                ) -> Tuple[Optional[Node], str, List[Node]]:
    """The row kernel taking S's column sum (whose result `last` is) and S's other outputs
    (`extras`), or None and why not, and the views to move after it. It may stand after S (a
    LayerNorm's bias gradient, the sum of dy, comes first) when everything reading the
    results, but views, comes after it."""
    space = _column_start(s)[0].inputs[0].type.shape
    n = space[-1]
    if not isinstance(n, int):
        return None, f"its rows have a symbolic length ({n}): a row must be one chunk", []
    if n > COL_MAX:
        return None, f"its rows have {n} > {COL_MAX} elements: a row must be one chunk", []
    # the kernels reading one of S's full-size inputs or producing one
    full = [x for x in s.inputs if x.type.shape == space]
    near = [u for x in full + extras for u in users[x] if _is_red(u)] + \
        [x.inputs[0] for x in full if x.op is Op.GETITEM and _is_red(x.inputs[0])]
    best, score, late = None, 0, []
    for r in dict.fromkeys(near):
        if r is s or r.attrs.get("axis") != len(space) - 1:
            continue
        views = _late(r, last, extras, users, order) if order[r] > order[s] else []
        if views is None:
            continue
        k = _shared(s, r, space, extras)
        if k <= score or _space(r) != space or \
                any(m.op is Op.INDEX_COPY for m in r.attrs["body"].nodes):
            continue
        if all(x in r.inputs or (x.op is Op.GETITEM and x.inputs[0] is r) or
               is_source(x) or order[x] < order[r] for x in s.inputs):
            best, score, late = r, k, views
    if best is None:
        return None, ("no reduction kernel along the rows of the same space reads or "
                      "produces the values it sums (before its result is read)"), []
    return best, "", late


def _merged(r: Node, sites: List[Tuple[List[Node], Node, List[Node]]], kept) -> Node:
    """R's kernel also storing each site's other outputs that are `kept` (row stores, after
    R's own) and then each site's column sum (the last outputs, as lmc/codegen/reduction.py
    expects). A site whose other outputs R reads is copied in before R's nodes, and R reads
    them from there."""
    rbody = r.attrs["body"]
    inner = {e for _, _, extras in sites for e in extras}    # computed in the kernel
    first: List[tuple] = []     # the sites whose outputs R reads, or a site before R reads
    reads = set(r.inputs)
    while True:
        more = [st for st in sites if st not in first and any(e in reads for e in st[2])]
        if not more:
            break
        first += more
        reads.update(x for st in more for x in st[0][0].inputs)
    first.sort(key=sites.index)
    ext = [x for x in r.inputs if x not in inner]
    for chain, _, _ in first + [st for st in sites if st not in first]:
        ext += [x for x in chain[0].inputs if x not in ext and x not in inner
                and not (x.op is Op.GETITEM and x.inputs[0] is r)]
    b = Body(ext)
    sums: Dict[int, Node] = {}

    def site(j: int) -> None:
        chain, _, extras = sites[j]
        sbody = chain[0].attrs["body"]
        sph = [m for m in sbody.nodes if m.op is Op.INPUT]
        for ph, x in zip(sph, chain[0].inputs):
            if x.op is Op.GETITEM and x.inputs[0] is r:
                b.env[ph] = b.env[rbody.outputs[str(x.attrs["index"])]]
            else:
                b.env[ph] = b.env[x]
        b.copy([m for m in sbody.nodes if m.op is not Op.INPUT])
        for e in extras:
            b.env[e] = b.env[sbody.outputs[str(e.attrs["index"])]]
        v = b.env[_column_start(chain[0])[0]]
        for c in chain[1:]:
            sm = c.attrs["body"].outputs["0"]
            v = b.add(Node(Op.SUM, (v,), sm.attrs, sm.type, sm.loc, sm.scope))
        sums[j] = v

    for j, st in enumerate(sites):
        if st in first:
            site(j)
    for ph, x in zip([m for m in rbody.nodes if m.op is Op.INPUT], r.inputs):
        b.env[ph] = b.env[x]
    b.copy([m for m in rbody.nodes if m.op is not Op.INPUT])
    for j, st in enumerate(sites):
        if st not in first:
            site(j)
    outs = [b.env[o] for o in rbody.outputs.values()]
    outs += [b.env[e] for _, _, extras in sites for e in extras if e in kept]
    name = re.sub(r"_(\d+)$", r"_colsum_\1", r.attrs["kernel"])
    nb = b.graph(name, outs + [sums[j] for j in range(len(sites))], **rbody.meta,
                 column_sums=len(sites))
    return Node.make(Op.FUSED, ext, {**r.attrs, "kernel": name, "body": nb}, r.loc, r.scope)


def _along_rows(chain: List[Node], users, outputs) -> Optional[Node]:
    """When no row kernel along the last axis takes a sum over B then T of [B, T, N]: the
    kernel Rp along T (axis 1: medit_one's running mean backward, a reverse scan) that makes
    the summed value v as a row store only this chain reads, or None. Rp then sums v along
    its own rows (a per-row sum over T, accumulated in the pass that stores v now) and a
    small kernel sums the [B, N] result over B: v is never stored."""
    from ..codegen.reduction import Plan

    s = chain[0]
    body = s.attrs["body"]
    if len(chain) != 2 or len(s.inputs) != 1 or \
            len([m for m in body.nodes if m.op is not Op.INPUT]) != 1:
        return None        # the first kernel sums its input, nothing else
    v = s.inputs[0]
    if v.op is not Op.GETITEM or v in outputs or set(users[v]) != {s} or \
            not _is_red(v.inputs[0]) or v.type.dtype.value != "f32" or \
            body.outputs["0"].type.dtype.value != "f32":
        return None
    rp = v.inputs[0]
    rbody = rp.attrs["body"]
    if rbody.meta.get("column_sums") or any(m.op is Op.INDEX_COPY for m in rbody.nodes):
        return None
    plan = Plan(rbody)
    o = rbody.outputs[str(v.attrs["index"])]
    if plan.rank != 3 or plan.axis != 1 or plan.level.get(o) != "row" or \
            o.type.shape != plan.space:
        return None
    return rp


def _with_row_sums(rp: Node, sums: List[Node]) -> Node:
    """Rp's kernel storing, instead of each of its outputs in `sums` (GETITEMs), that output
    summed along Rp's axis (outputs after the ones it keeps)."""
    body = rp.attrs["body"]
    outs = list(body.outputs.values())
    drop = {v.attrs["index"] for v in sums}
    ph = [m for m in body.nodes if m.op is Op.INPUT]
    b = Body(rp.inputs, alias=dict(zip(ph, rp.inputs)))
    b.copy([m for m in body.nodes if m.op is not Op.INPUT])
    rows = [b.add(Node.make(Op.SUM, (b.env[outs[v.attrs["index"]]],),
                            {"axis": rp.attrs["axis"], "keepdim": False}, v.loc, v.scope))
            for v in sums]
    nb = b.graph(rp.attrs["kernel"], [b.env[o] for k, o in enumerate(outs) if k not in drop]
                 + rows, **body.meta)
    return Node.make(Op.FUSED, rp.inputs, {**rp.attrs, "body": nb}, rp.loc, rp.scope)


def _over_b(u: Node, c2: Node) -> Node:
    """The small kernel summing Rp's [B, N] per-row sums u over B (in place of c2)."""
    b = Body([u])
    sm = c2.attrs["body"].outputs["0"]
    out = b.add(Node.make(Op.SUM, (b.env[u],), {"axis": 0, "keepdim": False}, sm.loc,
                          sm.scope))
    nb = b.graph(c2.attrs["kernel"], [out], **c2.attrs["body"].meta)
    return Node.make(Op.FUSED, [u], {**c2.attrs, "body": nb}, c2.loc, c2.scope)


def fuse_column_sums(g: Graph) -> Graph:
    users = g.users()
    outputs = set(g.outputs.values())
    order = {n: i for i, n in enumerate(g.nodes)}
    records: List[dict] = []
    plan: Dict[Node, List[Tuple[List[Node], Node, List[Node]]]] = {}
    seen = set()        # kernels of a chain met already (a later link is no new start)
    moved: Dict[Node, Node] = {}    # a planned chain's kernel -> the row kernel taking it
    late: Dict[Node, List[Node]] = {}   # the row kernel -> views moved after it
    # a kernel along T -> the chains it sums along its rows instead (_along_rows)
    along: Dict[Node, List[Tuple[List[Node], Node, List[Node]]]] = {}
    for s in g.nodes:
        if not _is_red(s) or s in seen:
            continue
        found = _chain(s, users, outputs)
        if found is None:
            continue
        seen.update(found[0])
        where = s.scope or "<model>"
        r, why, views = _row_kernel(s, found[1], found[2], users, order)
        if r is not None and any(x.op is Op.GETITEM and moved.get(x.inputs[0], r) is not r
                                 for x in s.inputs):
            r, why = None, "it reads another column sum's kernel, merged already"
        if r is None:
            rp = _along_rows(found[0], users, outputs)
            if rp is not None:
                along.setdefault(rp, []).append(found)
                records.append({"pass": PASS, "status": "fused", "where": where, "reason": (
                    f"the sum over every row ({', '.join(c.attrs['kernel'] for c in found[0])})"
                    f": over T in {rp.attrs['kernel']}'s rows (its own axis), then over B in "
                    f"{found[0][1].attrs['kernel']}; the summed value is not stored")})
                continue
            records.append({"pass": PASS, "status": "declined", "where": where,
                            "reason": f"{s.attrs['kernel']} stays a kernel: {why}"})
            continue
        plan.setdefault(r, []).append(found)
        late.setdefault(r, []).extend(views)
        moved.update(dict.fromkeys(found[0], r))
        names = ", ".join(c.attrs["kernel"] for c in found[0])
        records.append({"pass": PASS, "status": "fused", "where": where,
                        "reason": f"the sum over every row ({names}) in the row kernel "
                                  f"{r.attrs['kernel']}: its kernels removed"})
    if not plan and not along:
        out = g.with_nodes(list(g.nodes), dict(g.outputs))
        out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
        return out
    gone = {v for views in late.values() for v in views}    # emitted after their kernel
    for sites in list(plan.values()) + list(along.values()):
        for chain, _, _ in sites:
            gone.update(chain)
            gone.update(u for c in chain for u in users[c])
    gone.update(u for rp in along for u in users[rp])      # Rp's outputs renumbered
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    for n in g.nodes:
        if n in gone:
            continue
        if n in plan:     # R's kernel with the column sums, then GETITEMs of what it adds
            # S's other outputs are stored when something besides R reads them
            mine = {n} | {c for chain, _, _ in plan[n] for c in chain}
            kept = {e for _, _, extras in plan[n] for e in extras
                    if e in outputs or any(u not in mine for u in users[e])}
            new[n] = m = _merged(n, plan[n], kept).remapped(new)
            nodes.append(m)
            k = len(n.attrs["body"].outputs)
            got = [e for _, _, extras in plan[n] for e in extras if e in kept] + \
                [last for _, last, _ in plan[n]]
            for j, old in enumerate(got):
                new[old] = Node.make(Op.GETITEM, [m], {"index": k + j}, old.loc, old.scope)
                nodes.append(new[old])
            for v in sorted(set(late[n]), key=order.__getitem__):
                new[v] = c = v.remapped(new)
                nodes.append(c)
            continue
        if n in along:    # Rp summing the chains' values along its rows, then the sums
            sums = [chain[0].inputs[0] for chain, _, _ in along[n]]
            new[n] = m = _with_row_sums(n, sums).remapped(new)
            nodes.append(m)
            kept = [k for k in range(len(n.attrs["body"].outputs))
                    if k not in {v.attrs["index"] for v in sums}]
            for gi in sorted((u for u in users[n] if u not in sums), key=order.__getitem__):
                new[gi] = Node.make(Op.GETITEM, [m], {"index": kept.index(gi.attrs["index"])},
                                    gi.loc, gi.scope)
                nodes.append(new[gi])
            for j, (chain, last, _) in enumerate(along[n]):
                u = Node.make(Op.GETITEM, [m], {"index": len(kept) + j}, last.loc, last.scope)
                t = _over_b(u, chain[1])
                new[last] = Node.make(Op.GETITEM, [t], {"index": 0}, last.loc, last.scope)
                nodes += [u, t, new[last]]
            continue
        new[n] = c = n.remapped(new)
        nodes.append(c)
    out = g.with_nodes(nodes, {k: new.get(v, v) for k, v in g.outputs.items()})
    out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
    return out
