"""`fuse_reductions`: a reduction with its pointwise prologue and epilogue becomes one kernel.

RMSNorm (``x * rsqrt(mean(x * x) + eps) * w``), softmax, log-softmax and cross-entropy's
logsumexp are each one FUSED node of kind "reduction" (lmc/codegen/reduction.py): every
program owns a block of rows of the *row space* S (the shape the reductions read) and reduces
along one axis of it, the *reduced axis*, so a group holds

    row values       shape S: the prologue feeding the reductions, and the epilogue that
                     broadcasts per-row results back over the row (x * rsqrt(...) * w);
    per-row values   S with the reduced axis 1 (keepdim) or removed: the reductions and the
                     pointwise ops on their results (+ eps, rsqrt).

Softmax is first written as ``exp(x - logsumexp(x))``, so it is a one-pass online
logsumexp and a write pass. Grouping is greedy in topological order with fuse_pointwise's rule
(a node joins a group holding one of its inputs when every other input is in the group, a
source, or comes before the group's first node), which keeps the contracted graph acyclic.
A group that ends up holding no reduction joins a reduction group it feeds or reads where
the union can stand as one kernel (`_merge_leftovers`); the others are left for
fuse_pointwise. Each reduction that does not fuse is recorded with the reason.

A float cumsum is a scan along the group's axis (a row value; the kernel walks the row's
chunks in order with a carry), so it sets the axis as a reduction does. A reduction or scan
whose input another group already reduces along the same axis joins that group (`sibling`):
one pass over the rows serves both.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from .fuse_pointwise import (
    _where,
    contract,
    feeds_one_group,
    fusible,
    is_source,
    kernel_record,
    make_fused,
)

RED_OPS = (Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP)


def per_row_shapes(space, axis):
    """The two shapes of a per-row value of row space `space` reduced along `axis`."""
    keep = tuple(1 if i == axis else d for i, d in enumerate(space))
    drop = tuple(d for i, d in enumerate(space) if i != axis)
    return keep, drop


def _decline_reason(n: Node) -> Optional[str]:
    t = n.inputs[0].type
    if n.type.dtype.value not in ("f32", "f16", "bf16"):
        return f"{n.type.dtype.value} reduction is left to torch"
    if t.rank == 0:
        return "reduction of a scalar is the identity"
    if isinstance(t.shape[n.attrs["axis"]], int) and t.shape[n.attrs["axis"]] == 1:
        return "reduction over a size-1 axis is a copy"
    return None


def _expand_softmax(g: Graph) -> Graph:
    """softmax(x, a) -> exp(x - logsumexp(x, a, keepdim)) for float x, so the reduction
    kernel sees one online reduction and a pointwise epilogue."""
    if not any(n.op is Op.SOFTMAX for n in g.nodes):
        return g
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    for n in g.nodes:
        ins = tuple(new[i] for i in n.inputs)
        if n.op is Op.SOFTMAX and n.type.dtype.value in ("f32", "f16", "bf16"):
            x = ins[0]
            lse = Node.make(Op.LOGSUMEXP, [x], {"axis": n.attrs["axis"], "keepdim": True},
                            n.loc, n.scope)
            d = Node.make(Op.SUB, [x, lse], {}, n.loc, n.scope)
            e = Node.make(Op.EXP, [d], {}, n.loc, n.scope)
            nodes += [lse, d, e]
            new[n] = e
            continue
        c = n if ins == n.inputs else Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        new[n] = c
        nodes.append(c)
    return g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()})


class _Group:
    def __init__(self, first: int, space):
        self.first = first
        self.space = space      # row space S
        self.axis = None        # reduced axis, set by the first reduction
        self.members: List[Node] = []

    def level(self, shape) -> Optional[str]:
        if shape == self.space:
            return "row"
        if self.axis is not None and shape in per_row_shapes(self.space, self.axis):
            return "row_value"
        return None


def _feeds_group(n: Node, users, group_of, groups, outputs) -> Optional[int]:
    """The reduction group that can compute pointwise `n`, read from no group, itself
    (`feeds_one_group`): every reader of n is a pointwise op of a shape the group holds (row
    or per-row) that reads a member of that group, or itself feeds only such ops. A norm
    backward's per-row rstd * rstd * rstd, recomputed from the saved rstd, joins the kernel
    whose per-row values read it rather than being a launch of its own."""
    def held(gid: int, shape) -> bool:
        return groups[gid].axis is not None and groups[gid].level(shape) is not None

    def reads(u: Node, v: Node):
        mine = {group_of[x] for x in u.inputs if x in group_of}
        return None if any(not held(k, u.type.shape) for k in mine) else mine

    return feeds_one_group(n, users, outputs, reads, lambda v, gid: held(gid, v.type.shape), 6)


def _absorb_inputs(n: Node, gid: int, groups: List[_Group], group_of: Dict[Node, int],
                   users, ordered) -> None:
    """`n` just joined group `gid`: a group it reads that holds no reduction, of gid's row
    shape, whose values only n and gid read, moves into gid, which computes them where it
    reads them. Otherwise that group is left holding no reduction, its own pointwise kernel
    storing what n reads. (A norm backward's weight-gradient term cast(dy) * (x * rstd):
    the cast and x * rstd each start a group before their product; a cast that
    fuse_matmul left to its readers comes before the reduction group that reads it.) A
    group read elsewhere too stays apart: it is a row prologue another reduction, perhaps
    along another axis, may take (medit_one's norms), and one kernel reduces along one
    axis. Only where each moved member may be computed where gid stands."""
    into = groups[gid]
    for k in dict.fromkeys(group_of[x] for x in n.inputs if x in group_of):
        grp = groups[k]
        if k == gid or grp.axis is not None or grp.space != into.space:
            continue
        if not all(group_of.get(u) in (k, gid) for m in grp.members for u in users[m]):
            continue
        if not all(ordered(m, gid) for m in grp.members):
            continue
        for m in grp.members:
            into.members.append(m)
            group_of[m] = gid
        grp.members = []


def _merge_leftovers(groups: List[_Group], group_of: Dict[Node, int], level_of, users,
                     order: Dict[Node, int]) -> None:
    """A group left holding no reduction (it would be a pointwise kernel of its own) moves
    into a reduction group of its row space that it feeds or reads, where the union can be
    one kernel: it stands at one of its members' places, with everything it reads before
    and everything that reads it after (`_merge_leftover`). Greedy
    grouping in order leaves such groups where a pointwise node reads two groups and may
    join only the later one (a norm backward under mixed precision: dy * w in one group,
    cast(x) * (dy * w) and the row sum in the group of cast(x), dx's direct term and the
    final adds apart): merged, the norm's backward is one kernel again. Repeated until
    nothing moves: a leftover that feeds another leftover joins once that one has joined."""
    moved = True
    while moved:
        moved = False
        for k, grp in enumerate(groups):
            if grp.axis is None and grp.members:
                moved |= _merge_leftover(k, groups, group_of, level_of, users, order)


def _merge_leftover(k: int, groups: List[_Group], group_of: Dict[Node, int], level_of, users,
                    order: Dict[Node, int]) -> bool:
    """Move leftover group k into a reduction group it feeds or reads; whether it moved."""
    grp = groups[k]
    near = {group_of[u] for m in grp.members for u in users[m] if u in group_of}
    near |= {group_of[x] for m in grp.members for x in m.inputs if x in group_of}
    for j in sorted(near, key=lambda i: groups[i].first):
        into = groups[j]
        if j == k or into.axis is None or into.space != grp.space:
            continue
        union = into.members + grp.members

        def stands_at(at: int) -> bool:
            # emitted at order `at`: what it reads stands before, what reads it after
            return all(group_of.get(x) in (j, k) or order[x] < at or is_source(x)
                       for m in union for x in m.inputs) and \
                all(group_of.get(u) in (j, k) or order[u] > at
                    for m in union for u in users[m])
        # the kernel stands where one of its members stood (its anchor, members[0]): the
        # earliest that can (a leftover that stands before the values the union reads,
        # computed from what stands before them and read only by the union, moves there:
        # the load-balance statistic's mean(chosen) / k before the product with a mean that
        # comes after it)
        anchor = next((m for m in sorted(union, key=order.__getitem__)
                       if stands_at(order[m])), None)
        if anchor is None:
            continue
        into.members = [anchor] + [m for m in union if m is not anchor]
        into.first = order[anchor]
        for m in grp.members:
            group_of[m], level_of[m] = j, "row"
        grp.members = []
        return True
    return False


def _piece_of(n: Node, grp: _Group) -> bool:
    """n has the row space's shape but for a static, narrower size along the reduced axis."""
    sp, sh = grp.space, n.type.shape
    ax = grp.axis
    return len(sh) == len(sp) and all(a == b for i, (a, b) in enumerate(zip(sh, sp))
                                      if i != ax) and isinstance(sh[ax], int) and \
        isinstance(sp[ax], int) and sh[ax] < sp[ax]


def _pieces(x: Node, grp: _Group, users, outputs, group_of, order) -> Optional[List[Node]]:
    """Slices of row value x along the reduced axis that come back together in the kernel
    (RoPE's rotate-half of a QK-normed q or k: ``x1, x2 = split(x)``, ``concat([-x2, x1])``),
    in topological order: the slices, the pointwise ops on them (*pieces*, narrower along
    the axis) and the concats along the axis that make rows again. The kernel computes a
    concat's row by evaluating each piece at the shifted column (lmc/codegen/reduction.py),
    so pieces are never stored: None unless every reader of a piece is a piece or such a
    concat, no piece is a graph output, and every piece reads only pieces, x, sources,
    per-row values of the group, or values before it. Slices of a row value that a scan
    (cumsum) computes are left out: the kernel has a scan only at its own columns."""
    if grp.axis is None or x.type.shape != grp.space or x.op is Op.CUMSUM:
        return None
    gid = group_of[x]
    seen, stack = set(), [x]          # x's row-level ancestry in the group: no scan
    while stack:
        m = stack.pop()
        if m in seen or group_of.get(m) != gid:
            continue
        seen.add(m)
        if m.op is Op.CUMSUM or m.op is Op.DROPOUT:
            return None
        if m.type.shape == grp.space:
            stack.extend(m.inputs)
    ax = grp.axis

    def slice_ok(s: Node, of: Node) -> bool:
        a = s.attrs
        return s.op is Op.SLICE and s.inputs[0] is of and a["axis"] % s.type.rank == ax and \
            a.get("step", 1) == 1 and isinstance(a["start"], int) and a["start"] >= 0 and \
            _piece_of(s, grp)
    found: List[Node] = [s for s in users[x] if slice_ok(s, x)]
    inside = set(found)
    concats: List[Node] = []
    i = 0
    while i < len(found):
        m = found[i]
        i += 1
        if m in outputs:
            return None
        for u in users[m]:
            if u in inside or u in concats:
                continue
            if u.op is Op.CONCAT and u.attrs["axis"] % u.type.rank == ax and \
                    u.type.shape == grp.space:
                concats.append(u)
            elif u.op is Op.CONCAT and u.attrs["axis"] % u.type.rank == ax and \
                    _piece_of(u, grp):      # a narrower concat: partial RoPE's rotation
                inside.add(u)
                found.append(u)
            elif slice_ok(u, m) or (u.op.kind is Kind.POINTWISE and fusible(u)[0]
                                    and _piece_of(u, grp)):   # (a slice of a piece too)
                inside.add(u)
                found.append(u)
            else:
                return None
    if not concats:
        return None
    first = grp.first
    for m in found:
        for y in m.inputs:
            if not (y in inside or y is x or is_source(y) or order[y] < first or (
                    group_of.get(y) == gid and y.type.shape != grp.space
                    and y.type.shape in per_row_shapes(grp.space, ax))):
                return None
    if not all(y in inside for c in concats + [m for m in found if m.op is Op.CONCAT]
               for y in c.inputs):
        return None
    return sorted(found + concats, key=order.__getitem__)


def fuse_reductions(g: Graph) -> Graph:
    g = _expand_softmax(g)
    order = {n: i for i, n in enumerate(g.nodes)}
    users = g.users()
    outputs = set(g.outputs.values())
    group_of: Dict[Node, int] = {}
    level_of: Dict[Node, str] = {}
    groups: List[_Group] = []
    declined = []

    def ordered(n: Node, gid: int) -> bool:
        first = groups[gid].first
        return all(group_of.get(y) == gid or order[y] < first or is_source(y)
                   for y in n.inputs)

    def add(n: Node, gid: int, level: str):
        groups[gid].members.append(n)
        group_of[n] = gid
        level_of[n] = level

    def sibling(n: Node, x: Node, ax: int) -> Optional[int]:
        """A group already reducing or scanning `x` (not one of its own values) along `ax`:
        n, read from the same rows, joins it (medit_one's decode step: the running mean's cumsum
        and the new running sum, one pass over the step's rows)."""
        for u in users[x]:
            gid = group_of.get(u)
            if gid is not None and u.op in RED_OPS + (Op.CUMSUM,) and u.inputs[0] is x \
                    and groups[gid].axis == ax and groups[gid].space == x.type.shape \
                    and ordered(n, gid):
                return gid
        return None

    for n in g.nodes:
        if n in group_of:            # joined ahead of its turn (_pieces)
            continue
        if n.op is Op.SLICE and n.inputs[0] in group_of:
            gid = group_of[n.inputs[0]]
            pieces = _pieces(n.inputs[0], groups[gid], users, outputs, group_of, order)
            if pieces is not None:
                for m in pieces:
                    add(m, gid, "row" if m.op is Op.CONCAT else "piece")
            continue
        if n.op is Op.CUMPROD or (n.op is Op.CUMSUM and (
                n.type.dtype.value not in ("f32", "f16", "bf16") or n.type.rank == 0)):
            declined.append((n, "cumsum of a scalar is the identity" if n.type.rank == 0
                             else f"{n.op.value} of {n.type.dtype.value} is a scan left to "
                                  "torch"))
            continue
        if n.op in RED_OPS or n.op is Op.CUMSUM:
            why = _decline_reason(n) if n.op in RED_OPS else None
            if why:
                declined.append((n, why))
                continue
            # a reduction (a per-row value) or a scan along the kernel's axis (a row value):
            # in the group of its prologue, or of a sibling over the same rows, or a new one
            x, ax = n.inputs[0], n.attrs["axis"] % n.inputs[0].type.rank
            level = "row" if n.op is Op.CUMSUM else "row_value"
            gid = group_of.get(x)
            if gid is not None and level_of[x] == "row" and groups[gid].axis in (None, ax):
                groups[gid].axis = ax
            else:
                gid = sibling(n, x, ax)
                if gid is None:
                    groups.append(_Group(order[n], x.type.shape))
                    gid = len(groups) - 1
                    groups[gid].axis = ax
            add(n, gid, level)
            continue
        if n.op.kind is not Kind.POINTWISE or not fusible(n)[0]:
            continue
        if not any(x in group_of for x in n.inputs):
            gid = _feeds_group(n, users, group_of, groups, outputs)
            if gid is not None and ordered(n, gid):
                add(n, gid, groups[gid].level(n.type.shape))
                continue
        for x in n.inputs:
            gid = group_of.get(x)
            if gid is None:
                continue
            lvl = groups[gid].level(n.type.shape)
            if lvl is None or not ordered(n, gid):
                continue
            add(n, gid, lvl)
            _absorb_inputs(n, gid, groups, group_of, users, ordered)
            break
        else:
            grp = _Group(order[n], n.type.shape)
            groups.append(grp)
            add(n, len(groups) - 1, "row")

    _merge_leftovers(groups, group_of, level_of, users, order)
    kept = [grp for grp in groups if grp.axis is not None]
    for grp in groups:
        if grp.axis is None:
            for m in grp.members:
                del group_of[m]

    def build(members, gid, used, new):
        grp = kept[gid]
        reds = [m for m in members if m.op in RED_OPS + (Op.CUMSUM,)]
        fusions.append(kernel_record("fuse_reductions", members, reds[0]))
        return make_fused(members, f"{gid}", used, new, kind="reduction", prefix="lmc_red_",
                          extra={"axis": grp.axis})

    fusions: List[dict] = []
    # emitted where each group's first node stood; members absorbed from before it
    # (_absorb_inputs) are sorted in, computed from what stands before that node
    anchors = [grp.members[0] for grp in kept]
    for grp in kept:
        grp.members.sort(key=order.get)
    out = contract(g, [grp.members for grp in kept], build, anchors)
    out.meta["fusions"] = list(g.meta.get("fusions", [])) + fusions + [
        {"pass": "fuse_reductions", "status": "declined", "where": _where(n), "reason": why}
        for n, why in declined]
    return out
