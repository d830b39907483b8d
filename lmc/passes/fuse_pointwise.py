"""`fuse_pointwise`: group chains of same-shape elementwise ops into FUSED kernel nodes.

Each group becomes one FUSED node whose body is a small graph (placeholders for the group's
external inputs, the member ops, scalar constants copied in as literals) followed by GETITEMs
for the values used outside the group. The torch backend runs a FUSED node by running its
body; the triton backend runs the generated kernel (lmc/codegen/pointwise.py).

Grouping rule (greedy, in topological order): a pointwise node joins the group of one of its
pointwise inputs when their output shapes are identical and every input the node takes from
outside that group comes before the group's first node. With that rule every edge of the
contracted graph points forward in the original order, so fusion can never create a cycle.
External inputs of other shapes are read with broadcasting (stride 0): `silu(x - m) * 2` with
m of shape [B, T, 1] is one kernel. A computed value of another shape read directly (with
broadcasting) stays a group of its own (its kernel stores it once rather than recomputing it
per element of its reader); reductions and their prologues are fuse_reductions' kernels.

Then groups fold into their one reader (`_merge_into_consumer`): at the same shape, as
concat pieces (rope's -x2), or through index views (`index_view`: slices with a numeric
start, reshapes adding or dropping size-1 axes), which the kernel evaluates by mapping the
index it reads at; an iota read by one group's members is computed there (`_take_iotas`).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

from ..ir.dims import Dim, as_dim, unit_axes_only
from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op

# pow lowers to exp2(b * log2(a)) only for a > 0; other exponents stay torch ops (declined)
_POW_EXPONENTS = {2.0, 3.0, 0.5, -0.5, -1.0, 1.0}


def fusible(n: Node) -> tuple:
    """(ok, reason) for putting `n` in a pointwise kernel. Dropout joins too (its mask is
    Triton's tl.rand of the element's index, ops/philox.py) when its seed is a literal
    integer: the kernel gets the step's seed at launch."""
    if n.op is Op.DROPOUT:
        s = n.inputs[1]
        if not (_is_scalar_const(s) and isinstance(s.attrs["value"], int)):
            return False, "dropout with a computed seed is left to torch"
        if n.type.dtype.value == "f64":
            return False, "f64 is left to torch"
        return True, ""
    if n.op.kind is not Kind.POINTWISE:
        return False, "not pointwise"
    if n.op is Op.POW:
        e = n.inputs[1]
        if not (e.op is Op.CONST and e.type.rank == 0 and not hasattr(e.attrs["value"], "shape")
                and float(e.attrs["value"]) in _POW_EXPONENTS):
            return False, "pow with a tensor or unusual exponent has no exact kernel lowering"
    if n.type.dtype.value == "f64":
        return False, "f64 is left to torch"
    return True, ""


def _is_scalar_const(n: Node) -> bool:
    # a symbolic size as a value (e.g. 1/(B*T) in a mean's VJP) is known only at run time:
    # it stays a kernel input rather than a literal
    if n.op is not Op.CONST or n.type.rank != 0:
        return False
    v = n.attrs["value"]
    return not hasattr(v, "shape") and not isinstance(v, Dim)


def fuse_pointwise(g: Graph) -> Graph:
    order = {n: i for i, n in enumerate(g.nodes)}
    group_of: Dict[Node, int] = {}
    groups: List[List[Node]] = []
    declined = []
    for n in g.nodes:
        ok, why = fusible(n)
        if not ok and n.op is Op.CONCAT:
            ok = _concat_fusible(n)
        if not ok:
            if why != "not pointwise":
                declined.append((n, why))
            continue
        chosen = None
        for x in n.inputs:
            gid = group_of.get(x)
            if gid is None or groups[gid][0].type.shape != n.type.shape:
                continue
            first = order[groups[gid][0]]
            # sources (params, literals) can be read wherever they stood: they go first
            if all(group_of.get(y) == gid or order[y] < first or is_source(y)
                   for y in n.inputs):
                chosen = gid
                break
        if chosen is None:
            chosen = len(groups)
            groups.append([])
        groups[chosen].append(n)
        group_of[n] = chosen

    _take_iotas(g, groups, group_of, order)
    groups, anchors = _merge_into_consumer(g, groups, order)
    groups, anchors = _merge_siblings(g, groups, anchors, order)
    # a group of concats alone would be a copy kernel in place of torch.cat: leave those
    keep = [i for i, grp in enumerate(groups)
            if any(m.op is not Op.CONCAT and m.op not in _INDEXED for m in grp)]
    groups, anchors = [groups[i] for i in keep], [anchors[i] for i in keep]
    fused: List[dict] = []

    def build(members, gid, used, new):
        fused.append(kernel_record("fuse_pointwise", members, members[0]))
        return make_fused(members, f"{gid}", used, new)
    out = contract(g, groups, build, anchors)
    out.meta["fusions"] = list(g.meta.get("fusions", [])) + fused + [
        {"pass": "fuse_pointwise", "status": "declined", "where": _where(n), "reason": why}
        for n, why in declined]
    return out


def _concat_fusible(n: Node) -> bool:
    """A concat joins a pointwise kernel when at most one of its pieces has a symbolic size
    along the axis (the kernel picks a piece by comparing the index with offsets: numbers
    before that piece, the axis's size less numbers after it): rope's concat(-x2, x1), and a
    causal shift concat([pad, x[:, :T - s]], 1) or its gradient's concat([g[:, s:], zeros]),
    then cost no launch and no store. A concat of two symbolic pieces (a dynamic cache of P
    positions growing by T) stays a torch op."""
    return n.type.dtype.value != "f64" and len(symbolic_pieces(n)) <= 1


def symbolic_pieces(n: Node) -> List[int]:
    """The indices of a concat's pieces whose size along its axis is not a number."""
    ax = n.attrs["axis"]
    return [i for i, x in enumerate(n.inputs) if not isinstance(x.type.shape[ax], int)]


# ops a kernel evaluates by mapping its index, never loading or storing them: an iota (the
# index itself) and the index views of `index_view`
_INDEXED = (Op.IOTA, Op.SLICE, Op.RESHAPE)


def index_view(v: Node) -> bool:
    """A view a pointwise kernel evaluates by mapping the index it reads its input at: a slice
    with step 1 and a numeric start (its value at i is x's at i + start along the axis), or a
    reshape that only adds or drops axes of size 1 (a mask's [s] seen as [1, s, 1]; rope's
    positions [T] seen as [T, 1]: a symbolic axis keeps its place whatever its size, and an
    axis of size 1 at run time is read at index 0 either way)."""
    if v.op is Op.SLICE:
        start = v.attrs["start"]
        return v.attrs.get("step", 1) == 1 and isinstance(start, int) and start >= 0
    if v.op is Op.RESHAPE:
        return unit_axes_only(v.inputs[0].type.shape, v.type.shape)
    return False


def _take_iotas(g: Graph, groups: List[List[Node]], group_of: Dict[Node, int], order):
    """An iota read only by members of one group joins it: the kernel computes the index
    itself (a decoded shift's positions P - s + [0, s)) instead of reading a torch.arange."""
    users = g.users()
    outputs = set(g.outputs.values())
    for n in g.nodes:
        if n.op is not Op.IOTA or n in outputs or not users.get(n):
            continue
        gids = {group_of.get(u) for u in users[n]}
        if len(gids) != 1 or None in gids:
            continue
        (gid,) = gids
        groups[gid] = sorted(groups[gid] + [n], key=order.__getitem__)
        group_of[n] = gid


def _merge_into_consumer(g: Graph, groups: List[List[Node]], order):
    """Fold a group into the one group that reads it when nothing else does (x*cos in
    rope's x*cos + rot(x)*sin, whose other operand starts later, behind a concat): one kernel
    instead of two, and the intermediate never stored. The grouping rule grows groups forward
    from their inputs only, so such a producer is left on its own. Folding A into B is safe
    when A's values are read only by A and B (not graph outputs), the shapes match, or B
    reads A only as pieces of concats or through index views (`index_view`), which the
    kernel evaluates at shifted indices (rope's -x2 in concat(-x2, x1); a decoded causal
    shift's concat(past, x)[:, :T], and the [s] mask of its past slots seen as [1, s, 1]),
    and every input A takes from outside comes before B's first member: the merged group is
    then emitted where B's first member stood (its anchor), after all it reads. The views
    join the merged group. Returns the groups (members in topological order) and their
    anchors."""
    outputs = set(g.outputs.values())
    group_of = {m: gid for gid, grp in enumerate(groups) for m in grp}
    anchor = {gid: next(m for m in grp if m.op is not Op.IOTA)
              for gid, grp in enumerate(groups) if grp}
    shape = {gid: anchor[gid].type.shape for gid in anchor}
    concat_only = {gid: True for gid in range(len(groups))}   # read by other groups' concats
    readers: Dict[int, set] = {gid: set() for gid in range(len(groups))}
    views: Dict[int, List[Node]] = {gid: [] for gid in range(len(groups))}
    view_of: Dict[Node, int] = {}        # an index view of a group's value -> the group
    for n in g.nodes:
        if n not in group_of and index_view(n) and n not in outputs:
            a = group_of.get(n.inputs[0], view_of.get(n.inputs[0]))
            if a is not None:
                view_of[n] = a
                views[a].append(n)
                continue
        for x in n.inputs:
            a = group_of.get(x, view_of.get(x))
            if a is not None and group_of.get(n) != a:
                readers[a].add(group_of.get(n, -1))          # -1: a node in no group
                concat_only[a] = concat_only[a] and (n.op is Op.CONCAT or x in view_of)
    merged_into: Dict[int, int] = {}

    def root(gid):
        while gid in merged_into:
            gid = merged_into[gid]
        return gid
    for a in sorted(anchor, key=lambda gid: order[anchor[gid]]):
        rs = {root(r) if r >= 0 else -1 for r in readers[a]} - {a}
        if len(rs) != 1 or -1 in rs or any(m in outputs for m in groups[a]):
            continue
        (b,) = rs
        if (shape[b] != shape[a] and not concat_only[a]) or \
                order[anchor[b]] < order[anchor[a]]:
            continue
        members = groups[a] + views[a]
        if views[a] and not _evaluable_in(members, shape[b]):
            continue
        if shape[b] != shape[a] and not views[a] and any(m.op is Op.DROPOUT or (
                m.op is Op.CONCAT and symbolic_pieces(m)) for m in groups[a]):
            # read as concat pieces: a concat piece runs at shifted indices, where a mask
            # needs its own, and a concat with a symbolic piece there would be copied whole
            # into the reader's (a gradient's split, whose pieces' kernels write it in place)
            continue
        inside = set(members)
        if not all(x in inside or order[x] < order[anchor[b]] or is_source(x)
                   for m in members for x in m.inputs):
            continue
        groups[b] = sorted(groups[b] + members, key=order.__getitem__)
        groups[a] = []
        merged_into[a] = b      # A was read by B alone: B's readers are the merged group's
    live = [gid for gid, grp in enumerate(groups) if grp]
    return [groups[gid] for gid in live], [anchor[gid] for gid in live]


def _evaluable_in(members: List[Node], space) -> bool:
    """A kernel over `space` can evaluate `members` (a group, with the views it is read
    through) at the indices its reader asks: no dropout (a mask is drawn by the element's own
    index), no value of more axes than the kernel's, and each concat with a symbolic piece
    finds its own extent from the kernel's sizes (the space's along its axis plus a number:
    concat(past, x) of T + s positions read as its first T)."""
    rank = len(space)
    for m in members:
        if m.op is Op.DROPOUT or m.type.rank > rank or \
                any(x.type.rank > rank for x in m.inputs):
            return False
        if m.op is Op.CONCAT and symbolic_pieces(m):
            ax = m.attrs["axis"] % m.type.rank
            if m.type.rank != rank or not isinstance(
                    as_dim(m.type.shape[ax]) - as_dim(space[ax]), int):
                return False
    return True


_VIEWS = (Op.RESHAPE, Op.PERMUTE, Op.SLICE, Op.EXPAND)


def _merge_siblings(g: Graph, groups: List[List[Node]], anchors: List[Node], order):
    """Fold a group into the next one when they are independent and nothing but views stands
    between them: rope of q and rope of k, one kernel with two outputs instead of two
    launches. A (earlier) joins B when both have the shape of B's anchor, no value of A is
    read before B's anchor (so emitting A's work there is in order), and every node between
    A's last member and B's anchor is a view, a source or one of B's. Only neighbours merge,
    so no kernel's work moves past another kernel (nor do tensors live longer across one)."""
    if len(groups) < 2:
        return groups, anchors
    readers: Dict[Node, List[Node]] = {}
    for n in g.nodes:
        for x in n.inputs:
            readers.setdefault(x, []).append(n)
    ids = sorted(range(len(groups)), key=lambda i: order[anchors[i]])
    out_groups: List[List[Node]] = []
    out_anchors: List[Node] = []
    for i in ids:
        grp, anc = groups[i], anchors[i]
        if out_groups:
            prev, panc = out_groups[-1], out_anchors[-1]
            mine = set(grp) | set(prev)
            last = max(order[m] for m in prev)
            between = [n for n in g.nodes[last + 1:order[anc]] if n not in mine]
            if (panc.type.shape == anc.type.shape
                    and any(m.op is not Op.CONCAT for m in prev)
                    and any(m.op is not Op.CONCAT for m in grp)
                    and all(r in mine or order[r] >= order[anc]
                            for m in prev for r in readers.get(m, ()))
                    and all(n.op in _VIEWS or is_source(n) for n in between)):
                out_groups[-1] = sorted(prev + grp, key=order.__getitem__)
                out_anchors[-1] = anc
                continue
        out_groups.append(grp)
        out_anchors.append(anc)
    return out_groups, out_anchors


def is_source(n: Node) -> bool:
    """A node with no tensor inputs (input, param, constant, iota, mask): it may be moved to
    the front of the graph, so a fusion group may read it wherever it stood."""
    return not n.inputs and n.op is not Op.FUSED


def feeds_one_group(n: Node, users, outputs, reads, fits, depth: int) -> Optional[int]:
    """The one group that pointwise `n`, read from no group, can join to be computed inside
    it, or None: every reader of n is a pointwise op that reads that group (`reads(u, v)`:
    the group ids reader u of v reads, empty when none, None when u cannot join) or itself
    feeds only such ops, up to `depth` readers deep; `fits(v, gid)` accepts each value on
    the way. fuse_matmul takes such values into an epilogue (a backward's silu'(gate) from
    the saved gate), fuse_reductions into a reduction kernel (a norm's per-row rstd^3)."""
    def target(v: Node, depth: int) -> Optional[int]:
        if depth == 0 or v in outputs or not users.get(v) or not fusible(v)[0]:
            return None
        found = set()
        for u in users[v]:
            mine = reads(u, v) if u.op.kind is Kind.POINTWISE else None
            if mine is None:
                return None
            t = mine or {target(u, depth - 1)}
            if None in t:
                return None
            found |= t
        if len(found) != 1:
            return None
        gid = found.pop()
        return gid if fits(v, gid) else None

    return target(n, depth)


def contract(g: Graph, groups: List[List[Node]], build, anchors=None) -> Graph:
    """`g` with each group (members in topological order) replaced by what
    ``build(members, gid, used_outside, new)`` returns: a FUSED node and (member, GETITEM)
    pairs for the members read outside the group. Each group is emitted where its first member
    stood (or its anchor, a later member, when given) and source nodes go first, so a
    grouping in which every external input of a group is a source or comes before the group's
    anchor, and every member read outside is read after it, keeps the graph topologically
    ordered. A group that nothing reads is dropped (dead code)."""
    group_of = {m: gid for gid, grp in enumerate(groups) for m in grp}
    used_outside = set(g.outputs.values())
    for n in g.nodes:
        for x in n.inputs:
            if x in group_of and group_of.get(n) != group_of[x]:
                used_outside.add(x)
    new: Dict[Node, Node] = {}
    nodes: List[Node] = [n for n in g.nodes if is_source(n) and n not in group_of]
    new.update({n: n for n in nodes})
    first_of = {(anchors[gid] if anchors else grp[0]): gid
                for gid, grp in enumerate(groups) if grp}
    for n in g.nodes:
        if n in new:
            continue
        if n in first_of:
            members = groups[first_of[n]]
            if not any(m in used_outside for m in members):
                continue
            fused, outs = build(members, first_of[n], used_outside, new)
            nodes.append(fused)
            for m, gi in outs:
                nodes.append(gi)
                new[m] = gi
            continue
        if n in group_of:
            continue
        ins = tuple(new[i] for i in n.inputs)
        c = n if ins == n.inputs else Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        new[n] = c
        nodes.append(c)
    return g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()})


def kernel_record(pass_name: str, members: List[Node], at: Node) -> dict:
    """The "fused" record of a group made one kernel: how many ops, which."""
    ops = "+".join(dict.fromkeys(m.op.value for m in members))
    return {"pass": pass_name, "status": "fused", "where": _where(at),
            "reason": f"{len(members)} op{'s' if len(members) > 1 else ''} in one kernel: {ops}"}


def _where(n: Node) -> str:
    loc = f" {n.loc.file.rsplit('/', 1)[-1]}:{n.loc.line}" if n.loc else ""
    return f"{n.scope or '<model>'}{loc}"


def make_fused(members: List[Node], tag: str, used_outside, new: Dict[Node, Node],
               kind: str = "pointwise", prefix: str = "lmc_fused_", extra=None):
    """One FUSED node (and GETITEMs for the members used outside) for `members`, a group in
    topological order. `new` maps original nodes outside the group to their replacements;
    `extra` adds attrs (e.g. the reduction axis) beside kernel, kind and body."""
    from ..frontend.builder import Builder

    inside = set(members)
    b = Builder({}, {})
    body: Dict[Node, Node] = {}
    ext: List[Node] = []
    for m in members:
        for x in m.inputs:
            if x in inside or x in body:
                continue
            if _is_scalar_const(x):       # literals live in the kernel, not as arguments
                body[x] = Node(x.op, (), dict(x.attrs), x.type, x.loc, x.scope)
                b.nodes.append(body[x])
            else:                          # b.input appends the placeholder itself
                body[x] = b.input(f"in{len(ext)}", x.type.shape, x.type.dtype).node
                ext.append(x)
        c = Node(m.op, tuple(body[x] for x in m.inputs), m.attrs, m.type, m.loc, m.scope)
        body[m] = c
        b.nodes.append(c)
    outputs = [m for m in members if m in used_outside]
    # named for what it computes: an iota or index view is no work of its own
    ops = [m.op.value for m in members if m.op not in _INDEXED] or [m.op.value for m in members]
    name = prefix + "_".join(dict.fromkeys(ops[:4])) + f"_{tag}"
    name = re.sub(r"[^a-z0-9_]", "_", name)
    body_graph = Graph(name, b.nodes, {str(i): body[m] for i, m in enumerate(outputs)})
    first = members[0]
    fused = Node.make(Op.FUSED, [new[x] for x in ext],
                      {"kernel": name, "kind": kind, "body": body_graph, **(extra or {})},
                      first.loc, first.scope)
    gets = [(m, Node.make(Op.GETITEM, [fused], {"index": i}, m.loc, m.scope))
            for i, m in enumerate(outputs)]
    return fused, gets
