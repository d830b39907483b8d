"""`fuse_matmul`: a matmul with its pointwise epilogue becomes one kernel (lmc/codegen/matmul.py).

Each MATMUL (``[..., M, K] @ [..., K, N]``, batch dims broadcast; operands are often PERMUTE
views, which the kernel reads through their strides) becomes a FUSED node of kind "matmul"
whose body is the two operand placeholders, the MATMUL, and an *epilogue*: pointwise ops
computed from the fp32 accumulator in registers before the one store (bias, residual add,
activation, scale, mask, cast).

Epilogue rule (greedy, in topological order, fuse_pointwise's rule): a fusible pointwise node
joins the group holding one of its inputs when its output shape equals the matmul output's and
every other input is in the group, a source, or comes before the group's first node; so every
edge of the contracted graph points forward and fusion cannot create a cycle. Group values
read outside the group become extra outputs (one store each). A node read only by reductions
is left out: fuse_reductions takes it as its reduction's prologue, which reads the matmul's
output rather than storing a second tensor.

Gated form: two matmuls with the same A operand and the same output type whose results meet
in a same-shape pointwise chain (SwiGLU ``silu(x @ W1) * (x @ W3)``, GeGLU) are one group: the
kernel loads each A tile once, keeps two accumulators and stores only the combination. The
second B operand must be available where the first matmul stands; when it is computed later
but not from the first matmul (a weight's cast, as mixed_precision writes it), the nodes it
needs are moved up to just before the first matmul.

Horizontal form (`_merge_siblings`): matmuls of one A by different [K, N] weights, each with
its own epilogue or none (q, k, v projections; a gate's sigmoid(x @ Wg) beside them), are one
group whose kernel runs every product's column tiles in one launch; an RMSNorm they share
then becomes its prologue.

Vertical form: an add of two groups' sums of products, each read only by it, with a
distinct A per product (the backward's dX = dQ Wq^T + dK Wk^T + dV Wv^T) is one group whose
kernel runs one K loop per product into one accumulator, emitted where its last product stood.

A pointwise value computed only from values before a group and read, through pointwise ops,
only by its epilogue is computed in the epilogue (`_feeds_epilogue`: a backward's silu'(gate)
from the saved gate).

Every site is recorded in ``meta["fusions"]``: fused (with what) or declined (with why).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set

from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from .fuse_pointwise import _where, contract, feeds_one_group, fusible, is_source, make_fused
from .patterns import widened

# reductions fuse_reductions takes with their prologue (a node read only by these stays out)
_PROLOGUE_OF = (Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP, Op.SOFTMAX)
_FLOATS = ("f32", "f16", "bf16")


def _decline(m: Node) -> Optional[str]:
    """Why matmul `m` stays a torch op, or None."""
    dt = m.type.dtype.value
    if dt == "f64":
        return "f64 matmul is left to torch"
    if dt not in _FLOATS:
        return f"{dt} matmul is left to torch (tl.dot has no {dt} form)"
    return None


def _feeds_epilogue(n: Node, users, outputs: Set[Node], group_of, groups, order):
    """The group whose epilogue can compute pointwise `n` itself, or None (`feeds_one_group`):
    n reads only sources and values from before the group, and its readers are pointwise ops
    of its shape that the epilogue takes (not left to a reduction). A reader may read the
    group through a pointwise value of a member, visited after n: it joins the group then.
    A backward's activation derivative is this: silu(gate) and sigmoid(gate) * (1 + gate *
    (1 - sigmoid(gate))) recomputed from the saved gate, read by the epilogue of the down
    projection's dX matmul, cost no kernel and no stored tensor."""
    def reads(u: Node, v: Node):
        if u.type.shape != v.type.shape or _leave_to_reduction(u, users[u], outputs):
            return None
        return {group_of[x] for x in u.inputs if x in group_of} or {
            group_of[y] for x in u.inputs if x is not v and x.op.kind is Kind.POINTWISE
            for y in x.inputs if y in group_of}

    gid = feeds_one_group(n, users, outputs, reads, lambda v, gid: True, 8)
    if gid is None:
        return None
    grp = groups[gid]
    if n.type.shape != grp.shape or not all(is_source(x) or order[x] < grp.first
                                            for x in n.inputs):
        return None
    return gid


def _leave_to_reduction(n: Node, users: List[Node], outputs: Set[Node]) -> bool:
    if n in outputs or not users or n.type.dtype.value not in _FLOATS:
        return False
    return all(u.op in _PROLOGUE_OF and u.inputs[0] is n for u in users)


class _Group:
    def __init__(self, m: Node, first: int):
        self.first = first          # position of the first member in the original order
        self.shape = m.type.shape   # the matmul output's shape: every member's shape
        self.members: List[Node] = [m]
        self.matmuls: List[Node] = [m]
        self.horizontal = False     # matmuls of one A, each its own outputs (_merge_siblings)
        self.prologue: Optional["NormPrologue"] = None   # A computed in the kernel
        # vertical form: the sum of its products so far (the group holds only products and
        # the adds summing them while `total` is its last member); emitted at its last product
        self.total: Optional[Node] = m
        self.anchor = m

    def what(self) -> str:
        if self.prologue:
            return f"{self.prologue.kind} prologue + " + self._what()
        return self._what()

    def _what(self) -> str:
        pro = set(self.prologue.members) if self.prologue else set()
        epi = [m.op.value for m in self.members if m.op is not Op.MATMUL and m not in pro]
        if self.horizontal:
            return f"{len(self.matmuls)} matmuls sharing A, one launch" + (
                " + epilogues " + "+".join(epi) if epi else "")
        if self.vertical:
            rest = epi[len(self.matmuls) - 1:]     # after the adds summing the products
            return f"{len(self.matmuls)} matmuls summed in one accumulator" + (
                " + " + "+".join(rest) if rest else "")
        if len(self.matmuls) == 2:
            ops = set(epi)
            kind = ("swiglu" if Op.SILU.value in ops else "geglu" if Op.GELU.value in ops
                    else "dual")
            return f"gated {kind}: 2 matmuls sharing A + " + "+".join(epi)
        return "+".join(["matmul"] + epi)

    @property
    def vertical(self) -> bool:
        return len(self.matmuls) > 1 and not self.horizontal and \
            len({m.inputs[0] for m in self.matmuls}) == len(self.matmuls)

    def pure_sum(self) -> bool:
        """Holds only its products and the adds summing them (no epilogue yet)."""
        return self.total is not None and self.members[-1] is self.total and \
            len(self.members) == 2 * len(self.matmuls) - 1


def _vertical_merge(n: Node, users, outputs: Set[Node], group_of, groups, order,
                    partner: Dict[Node, Node]) -> bool:
    """Vertical form: `n = a + b` where a and b are the sums of two groups' products, each
    read only by n (the backward's dX = dQ Wq^T + dK Wk^T + dV Wv^T, dG Wg^T + dU Wu^T): the
    earlier group joins the later, whose kernel then runs one K loop per product into one
    accumulator and is emitted at its last product, after every operand. Products of one A
    are the horizontal or gated forms instead; shapes and dtypes must match (no broadcast)."""
    if n.op is not Op.ADD:
        return False
    a, b = n.inputs
    if a not in group_of or b not in group_of or group_of[a] == group_of[b]:
        return False
    ga, gb = groups[group_of[a]], groups[group_of[b]]
    for grp, v in ((ga, a), (gb, b)):
        if grp.total is not v or not grp.pure_sum() or grp.horizontal or users[v] != [n] \
                or v in outputs or v.type != n.type:
            return False
    prods = ga.matmuls + gb.matmuls
    if len({m.inputs[0] for m in prods}) != len(prods) or \
            len({m.type.rank for m in prods}) != 1 or any(
                m in partner or m in partner.values() for m in prods):
        return False    # a gated pair's matmul stays in its pair
    early, late = (ga, gb) if ga.first < gb.first else (gb, ga)
    gid = group_of[late.members[0]]
    for m in early.members:
        group_of[m] = gid
    late.members = sorted(early.members + late.members, key=order.get) + [n]
    late.matmuls = sorted(early.matmuls + late.matmuls, key=order.get)
    late.anchor = late.matmuls[-1]
    late.first = order[late.anchor]
    late.total = n
    group_of[n] = gid
    early.members, early.matmuls, early.total = [], [], None
    return True


def _late_cone(w: Node, m1: Node, order: Dict[Node, int]) -> Optional[List[Node]]:
    """The nodes `w` needs that stand after `m1` (in order), or None if `w` depends on `m1`:
    those can be moved to just before `m1`."""
    cone: Set[Node] = set()
    stack = [w]
    while stack:
        n = stack.pop()
        if n in cone or order[n] < order[m1]:
            continue
        if n is m1:
            return None
        cone.add(n)
        stack.extend(n.inputs)
    return sorted(cone, key=order.get)


def _gated_pairs(g: Graph, declined: list):
    """(graph, {second matmul: first matmul}) for pairs sharing A whose results meet in a
    same-shape pointwise chain. The second's B operand must be available where the first
    stands: when it is computed later but not from the first (a weight's cast under mixed
    precision), what it needs is moved up to just before the first."""
    order = {n: i for i, n in enumerate(g.nodes)}
    roots: Dict[Node, frozenset] = {}
    pair: Dict[Node, Node] = {}
    paired: Set[Node] = set()
    hoist: Dict[Node, List[Node]] = {}
    for n in g.nodes:
        if n.op is Op.MATMUL and _decline(n) is None:
            roots[n] = frozenset([n])
        elif n.op.kind is Kind.POINTWISE and fusible(n)[0]:
            r = frozenset().union(*[roots[x] for x in n.inputs
                                    if x in roots and x.type.shape == n.type.shape])
            if r:
                roots[n] = r
            if len(r) < 2:
                continue
            ms = sorted(r, key=order.get)
            for i, m1 in enumerate(ms):
                for m2 in ms[i + 1:]:
                    if (m1 in paired or m2 in paired or m1.inputs[0] is not m2.inputs[0]
                            or m1.type != m2.type):
                        continue
                    cone = _late_cone(m2.inputs[1], m1, order)
                    if cone is None:
                        declined.append((m2, "gated form: the second matmul's B operand is "
                                             "computed from the first matmul's result"))
                        continue
                    pair[m2] = m1
                    paired.update((m1, m2))
                    if cone:
                        hoist[m1] = cone
    if not hoist:
        return g, pair
    return _hoisted(g, hoist, order), pair


def _hoisted(g: Graph, hoist: Dict[Node, List[Node]], order: Dict[Node, int]) -> Graph:
    """`g` with each list of nodes in `hoist` moved to just before its key (each list closed
    under the inputs that stand after the key: `_late_cone`), in their original order."""
    moved = {h for cone in hoist.values() for h in cone}
    nodes: List[Node] = []
    placed: Set[Node] = set()
    for n in g.nodes:
        for h in sorted(hoist.get(n, []), key=order.get):
            if h not in placed:
                nodes.append(h)
                placed.add(h)
        if n not in moved:
            nodes.append(n)
    return g.with_nodes(nodes, g.outputs)


def _depends_on(y: Node, group: Set[Node], order: Dict[Node, int], first: int) -> bool:
    """Whether `y` is computed from a member of `group` (only nodes after `first` can be)."""
    stack, seen = [y], set()
    while stack:
        n = stack.pop()
        if n in group:
            return True
        if n in seen or order[n] <= first:
            continue
        seen.add(n)
        stack.extend(n.inputs)
    return False


class NormPrologue:
    """A matmul's A operand computed as a norm of x along K: RMSNorm ``[cast](x * rsqrt(mean(x
    * x, -1) + eps) * w [+ b])`` or LayerNorm, the same of xc = x - mean(x, -1) (`center`),
    w and b [K] vectors (b optional; either operand order at each op). The kernel then
    reads x itself and the norm costs no launch; its output is never stored.

    RMSNorm: the kernel accumulates sum(x * x) per row along its K loop, multiplies each A
    tile by w before the dot, and scales the accumulators by rsqrt(sum / K + eps) after it,
    since (x * r * w) @ B = r * ((x * w) @ B) for a per-row r. An f16 dot, or a bias, first
    sums x * x over the row in a loop of its own and normalises each tile before its cast
    (x * w alone could overflow f16; a bias does not commute with r). LayerNorm: two loops
    over the row first, its mean and then the variance about it (as the unfused norm
    computes them: no E[x^2] - E[x]^2 cancellation), and each tile is (x - mean) * r * w + b
    before its cast."""

    def __init__(self, x: Node, w: Node, eps: Node, members: List[Node],
                 bias: Optional[Node] = None, center: bool = False):
        self.x, self.w, self.eps, self.members = x, w, eps, members
        self.bias, self.center = bias, center

    @property
    def kind(self) -> str:
        return "layernorm" if self.center else "rmsnorm"


def norm_prologues(a: Node) -> List[NormPrologue]:
    """The norms that can compute `a` (a graph node or a body node), the widest first: a
    LayerNorm, then the RMSNorm of its centred x (which leaves the centring to another
    kernel); empty when none."""
    members = []
    n = a
    if n.op is Op.CAST:
        members.append(n)
        n = n.inputs[0]
    if n.type.rank < 1:
        return []
    k = n.type.shape[-1]
    scaled = [(n, None)]
    if n.op is Op.ADD:          # + b, a [K] vector
        scaled = [(s, b) for s, b in (n.inputs, n.inputs[::-1])
                  if b.type.shape == (k,) and s.type.shape == n.type.shape]
        members.append(n)
    for sc, bias in scaled:
        if sc.op is not Op.MUL:
            continue
        for xr, w in (sc.inputs, sc.inputs[::-1]):
            if xr.op is not Op.MUL or w.type.shape != (k,) or xr.type.shape != sc.type.shape:
                continue
            for x, r in (xr.inputs, xr.inputs[::-1]):
                chain = _rstd_of(r, x)
                if chain is None:
                    continue
                found = [NormPrologue(x, w, chain[0], members + [sc, xr] + chain[1], bias)]
                c = _centred(x)
                if c is not None:
                    found.insert(0, NormPrologue(c[0], w, chain[0], found[0].members + c[1],
                                                 bias, center=True))
                return found
    return []


def norm_prologue(a: Node) -> Optional[NormPrologue]:
    """The norm computing `a` in a matmul body (the widest of `norm_prologues`: the body
    holds the nodes its group took), or None."""
    found = norm_prologues(a)
    return found[0] if found else None


def _centred(xc: Node):
    """(x, nodes) if xc = x - mean(x, last axis, keepdim), else None."""
    if xc.op is not Op.SUB:
        return None
    x, mean = xc.inputs
    if (mean.op is Op.MEAN and mean.inputs[0] is x and mean.attrs["keepdim"]
            and mean.attrs["axis"] in (-1, x.type.rank - 1) and x.type == xc.type):
        return x, [xc, mean]
    return None


def with_weight_cast(pro: NormPrologue) -> NormPrologue:
    """The prologue reading w (and b) before its widening cast (a norm weight stored in bf16
    and widened to fp32 each step): the kernel loads it in its own dtype and widens it,
    exactly as the cast does."""
    w, b, extra = pro.w, pro.bias, []
    if widened(w):
        extra.append(w)
        w = w.inputs[0]
    if b is not None and widened(b):
        extra.append(b)
        b = b.inputs[0]
    if not extra:
        return pro
    return NormPrologue(pro.x, w, pro.eps, pro.members + extra, b, pro.center)


def _rstd_of(r: Node, x: Node):
    """(eps, nodes) if r = rsqrt(mean(x * x, last axis, keepdim) + eps), else None."""
    if r.op is not Op.RSQRT or x.type.rank < 1 or x.type.dtype.value not in _FLOATS:
        return None
    add = r.inputs[0]
    if add.op is not Op.ADD:
        return None
    for mean, eps in (add.inputs, add.inputs[::-1]):
        if (mean.op is Op.MEAN and eps.op is Op.CONST and eps.type.rank == 0
                and not hasattr(eps.attrs["value"], "shape")
                and mean.attrs["axis"] in (-1, x.type.rank - 1) and mean.attrs["keepdim"]
                and mean.inputs[0].op is Op.MUL
                and all(i is x for i in mean.inputs[0].inputs)):
            return eps, [r, add, mean, mean.inputs[0]]
    return None


def _take_prologues(groups: List["_Group"], users, outputs: Set[Node],
                    declined: Optional[list] = None) -> None:
    """Each group whose matmuls share an A computed by a norm that nothing else reads takes
    the norm's nodes in (NormPrologue): a LayerNorm whole where its centring is read by
    nothing else either, else the RMSNorm part. Where the norm's output is read elsewhere too
    (a mixed-precision training forward saves its bf16 cast for the weight gradient; an fp32
    one saves x and the statistics, and the backward recomputes it) the norm stays its own
    kernel."""
    grouped = {m for grp in groups for m in grp.members}

    def alone(pro, grp) -> bool:    # its values read only inside the group, in no other group
        inside = set(pro.members) | set(grp.matmuls)
        return not any(m in grouped or m in outputs or any(u not in inside for u in users[m])
                       for m in pro.members)
    for grp in groups:
        if not grp.members or grp.vertical:
            continue
        found = norm_prologues(grp.matmuls[0].inputs[0])
        pro = next((p for p in found if alone(p, grp)), None)
        if pro is None:
            # said where other matmul kernels read the norm too (a parallel block's one norm
            # feeding attention's q, k, v and a gated MLP: two launches sharing A), the case
            # a model's layout decides; a norm saved for the backward is the usual rule
            mine = set(grp.matmuls)
            others = {u for p in found[:1] for m in p.members for u in users[m]
                      if u.op is Op.MATMUL and u not in mine}
            if found and others and declined is not None:
                declined.append((grp.matmuls[0],
                                 f"the {found[0].kind} computing A is also read by "
                                 f"{len(others)} matmul(s) of another kernel (a gated pair or "
                                 f"another product group): it stays its own kernel, a "
                                 f"prologue being computed by one kernel"))
            continue
        if alone(with_weight_cast(pro), grp):
            pro = with_weight_cast(pro)
        grp.members = pro.members[::-1] + grp.members   # stays topological: sorted below
        grp.prologue = pro
        grouped.update(pro.members)


def _trim_epilogues(groups: List["_Group"], users, outputs: Set[Node], declined: list) -> None:
    """Epilogue values a group would store only for other kernels leave it when that stores
    fewer bytes: those kernels compute them from what the group stores anyway. A norm's
    backward after its dX matmul is the case: dy = cast(x @ W), g = dy * w and g * rstd
    were three fp32 tensors written by the matmul and read back by the norm's reductions;
    now the matmul stores dy alone and the reductions, which read dy anyway, multiply by w
    and rstd (broadcast vectors) themselves. A value leaves with every member reading it
    (a member cannot read a value computed after the group), and only when each reader
    outside is an ungrouped pointwise op or reduction (a kernel fuse_reductions or
    fuse_pointwise forms can take it in); never a graph output. Greedy, last member first,
    while the group's stored bytes (members read outside it or returned, at their dtype's
    size: every epilogue value has the group's shape) go down."""
    grouped = {m for grp in groups for m in grp.members}

    def stored(kept: Set[Node]) -> int:
        return sum(m.type.dtype.itemsize for m in kept
                   if m in outputs or any(u not in kept for u in users[m]))

    def movable(u: Node) -> bool:
        return u not in grouped and (u.op in _PROLOGUE_OF or (
            u.op.kind is Kind.POINTWISE and fusible(u)[0]))

    for grp in groups:
        if not grp.members or grp.horizontal:
            continue
        pro = set(grp.prologue.members) if grp.prologue else set()
        epi = [m for m in grp.members if m.op is not Op.MATMUL and m not in pro]
        if grp.vertical:
            epi = epi[len(grp.matmuls) - 1:]      # after the adds summing the products
        kept = set(grp.members)
        first = stored(kept)
        changed = True
        while changed:
            changed = False
            for m in reversed(epi):
                if m not in kept:
                    continue
                drop, stack = set(), [m]
                while stack:
                    d = stack.pop()
                    if d not in drop:
                        drop.add(d)
                        stack += [u for u in users[d] if u in kept]
                if (not drop <= set(epi) or drop & outputs
                        or not all(movable(u) for d in drop for u in users[d]
                                   if u not in drop)
                        or stored(kept - drop) >= stored(kept)):
                    continue
                kept -= drop
                grouped -= drop
                changed = True
        gone = [m for m in epi if m not in kept]
        if gone:
            declined.append((gone[0], f"epilogue {'+'.join(m.op.value for m in gone)} is left "
                                      f"to the kernels reading it: the matmul stores "
                                      f"{first} -> {stored(kept)} bytes per element"))
        grp.members = [m for m in grp.members if m in kept]


def _one_product(members: List[Node], m: Node, users, outputs: Set[Node], order) -> bool:
    """Whether a one-matmul group is a product the horizontal form can run: every value it
    stores (read outside it, or returned) is computed from its matmul m, and every member
    is on the way to one (no dead member, no stored value computed from inputs alone by a
    member whose reader left the group): `codegen.matmul.products` of the merged body."""
    inside = set(members)
    dep = {m}
    for e in sorted(members, key=order.get):
        if any(x in dep for x in e.inputs):
            dep.add(e)
    stored = {e for e in members if e in outputs or any(u not in inside for u in users[e])}
    if not stored or not stored <= dep:
        return False
    need, stack = set(), list(stored)
    while stack:
        n = stack.pop()
        if n in inside and n not in need:
            need.add(n)
            stack.extend(n.inputs)
    return need == inside


def _merge_siblings(groups: List["_Group"], order: Dict[Node, int], users,
                    outputs: Set[Node], declined: list):
    """Horizontal form: matmuls of one A by different weights, each with its own epilogue or
    none (the q, k and v projections x @ Wq, x @ Wk, x @ Wv; a gate's projection with its
    activation, sigmoid(x @ Wg), beside them), become one group: one launch whose column
    tiles run over every weight in turn, each tile running its product's epilogue and storing
    to that product's outputs. A group of one matmul joins (gated pairs and vertical sums
    do not). The group is emitted where the first stood, so what a later sibling reads must
    be there already: its epilogue's other inputs must be sources or stand before the first
    matmul (else it stays its own launch), and its B operand too, or be computed from neither
    (a weight's cast under mixed precision): what B needs is then moved up to just before the
    first matmul (returned: {first matmul: nodes}). B must have no batch axes (the
    projections' [K, N] weights)."""
    by_a: Dict[Node, _Group] = {}
    hoist: Dict[Node, List[Node]] = {}
    grouped = {m for grp in groups for m in grp.members}
    for grp in groups:
        if len(grp.matmuls) != 1 or grp.prologue is not None:
            continue
        inside = set(grp.members)
        m = grp.matmuls[0]
        b = m.inputs[1]
        if b.type.rank != 2 or m.type.rank < 2:
            continue
        first = by_a.get(m.inputs[0])
        if first is None:
            if _one_product(grp.members, m, users, outputs, order):
                by_a[m.inputs[0]] = grp
            continue
        m0 = first.matmuls[0]
        if (m.type.dtype != m0.type.dtype or m.type.shape[:-1] != m0.type.shape[:-1]
                or b.type.dtype != m0.inputs[1].type.dtype):
            continue
        # epilogue nodes reading a value that stands after the first matmul (or reading
        # such a node) cannot run in the launch: left out when they read one value of the
        # rest (their only input from it, stored instead of their result: the gate's
        # sigmoid(x @ Wg), whose product with the attention output joins the kernel that
        # computes that output), else the sibling stays its own launch
        late: Set[Node] = set()
        for e in sorted(grp.members, key=order.get):
            if e is not m and any(x in late or (x not in inside and not is_source(x)
                                                and order[x] >= first.first)
                                  for x in e.inputs):
                late.add(e)
        if late:
            edge = {x for e in late for x in e.inputs if x in inside and x not in late}
            if len(edge) != 1:
                continue
        if not _one_product([e for e in grp.members if e not in late], m, users, outputs,
                            order):
            continue
        if not is_source(b) and order[b] > first.first:
            cone = _late_cone(b, m0, order)
            if cone is None or any(c in grouped for c in cone):   # only ungrouped nodes move
                continue
            hoist.setdefault(m0, []).extend(c for c in cone if c not in hoist.get(m0, []))
        if late:
            grp.members = [e for e in grp.members if e not in late]
            left = sorted(late, key=order.get)
            declined.append((left[0], f"epilogue {'+'.join(e.op.value for e in left)} is "
                                      f"left out of the launch of matmuls sharing A: it reads a "
                                      f"value computed after the first of them"))
        first.members.extend(grp.members)
        first.matmuls.append(m)
        first.horizontal = True
        grp.members, grp.matmuls = [], []
    return hoist


def _sliceable(v: Node, n: int, rank: int, order: Dict[Node, int], at: int) -> bool:
    """Whether v, an operand of a pointwise op over [..., n] values, can be cut along the last
    axis with them: a scalar, or a value of rank <= `rank` whose last axis is n (cut) or 1
    (kept), computed before position `at` or a source or a source's cast (a bias and its
    cast under mixed precision)."""
    if v.type.rank > rank or (v.type.rank and v.type.shape[-1] not in (n, 1)):
        return False
    return is_source(v) or order[v] < at or (v.op is Op.CAST and is_source(v.inputs[0]))


def _bias_chain(m: Node, users, outputs: Set[Node], order: Dict[Node, int]):
    """The pointwise ops after matmul m that a split by column slices can cut with it (a bias
    add, a cast: x @ W_qkv + b_qkv): each reads the previous value of the chain once and
    otherwise only `_sliceable` values, and is that value's only reader; none is a graph
    output. Returns the chain (possibly empty): its last value, or m, is what the slices
    read."""
    chain: List[Node] = []
    v, n = m, m.type.shape[-1]
    while len(users[v]) == 1 and v not in outputs:
        u = users[v][0]
        if (u.op.kind is not Kind.POINTWISE or not fusible(u)[0] or u.type.shape != m.type.shape
                or u.type.dtype.value not in _FLOATS or u.inputs.count(v) != 1
                or not all(x is v or _sliceable(x, n, m.type.rank, order, order[m])
                           for x in u.inputs)):
            break
        chain.append(u)
        v = u
    return chain


def _split_by_slices(g: Graph) -> Graph:
    """A matmul x @ W (W [K, N]) read only through slices of its last axis (blues01's fused
    W_qkv split into q, k and v), directly or through a chain of pointwise ops that cut with
    it (`_bias_chain`: GPT-2's and BLOOM's x @ W_qkv + b_qkv, its cast), becomes one matmul
    per slice, x @ W[:, a:b] (+ b[a:b]), the weight and bias slices views: the horizontal
    form then runs them as one launch as before, but each piece is its own output, which can
    take its own epilogue or be stored into a cache (fuse_cache_writes). Only where no piece
    is read by a pointwise op (such a piece would be a sibling with an epilogue, which the
    horizontal form now also takes; splitting those too changes no zoo model's launches, so
    the rule stays). The pieces stand where the chain's last op stood (a bias's cast may
    stand after the matmul). Runs on differentiated graphs only, so no gradient sees the
    split."""
    users = g.users()
    outputs = set(g.outputs.values())
    order = {n: i for i, n in enumerate(g.nodes)}
    repl: Dict[Node, Node] = {}
    split: Dict[Node, tuple] = {}     # the chain's last node -> (matmul, chain, slices)
    gone: Set[Node] = set()
    for n in g.nodes:
        if n.op is not Op.MATMUL or _decline(n) is not None or n.inputs[1].type.rank != 2:
            continue
        chain = _bias_chain(n, users, outputs, order)
        end = chain[-1] if chain else n
        us = users[end]
        if (end not in outputs and len(us) > 1
                and all(u.op is Op.SLICE and u.attrs["axis"] == n.type.rank - 1
                        and u.attrs["step"] == 1 and isinstance(u.attrs["start"], int)
                        and isinstance(u.attrs["stop"], (int, type(None)))
                        # no piece read by a pointwise op (see above)
                        and not any(r.op.kind is Kind.POINTWISE for r in users[u])
                        for u in us)):
            split[end] = (n, chain, us)
            gone.update([n] + chain[:-1] + us)
    if not split:
        return g
    nodes: List[Node] = []

    def cut(v: Node, u: Node) -> Node:      # v's piece for slice u (its last axis if n wide)
        if v.type.rank == 0 or v.type.shape[-1] == 1:
            return repl.get(v, v)
        piece = Node.make(Op.SLICE, [repl.get(v, v)],
                          {"axis": v.type.rank - 1, "start": u.attrs["start"],
                           "stop": u.attrs["stop"], "step": 1}, u.loc, u.scope)
        nodes.append(piece)
        return piece

    for n in g.nodes:
        if n in split:
            m, ops, us = split[n]
            # every weight and bias piece first: an epilogue may read only values that
            # stand before the horizontal launch's first product
            pieces = {(u, i): cut(i, u) for u in us
                      for i in dict.fromkeys([m.inputs[1]] + [i for o in ops for i in o.inputs])
                      if i is not m and i not in ops}
            for u in us:
                v = Node.make(Op.MATMUL, [repl.get(m.inputs[0], m.inputs[0]),
                                          pieces[u, m.inputs[1]]], {}, m.loc, m.scope)
                nodes.append(v)
                prev = m
                for o in ops:
                    v = Node.make(o.op, [v if i is prev else pieces[u, i] for i in o.inputs],
                                  dict(o.attrs), o.loc, o.scope)
                    nodes.append(v)
                    prev = o
                repl[u] = v
            continue
        if n in gone:
            continue                      # a split matmul, its chain, its slices
        ins = tuple(repl.get(i, i) for i in n.inputs)
        if ins != n.inputs:
            repl[n] = Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        nodes.append(repl.get(n, n))
    return g.with_nodes(nodes, {k: repl.get(v, v) for k, v in g.outputs.items()})


def _products_summed_first(g: Graph) -> Graph:
    """`(x + P1) + P2` with P1 and P2 products (matmuls of different A, each read only by
    its add, the inner add read only by the outer) becomes `x + (P1 + P2)`, so the vertical
    form sums both products in one accumulator and x joins its epilogue: a parallel block's
    residual, x + attn(h) @ Wo + mlp(h) @ W2 (Falcon, GPT-J, PaLM), is one kernel instead of
    two and the first product is never stored. Only where every value has one type (no
    broadcast, no cast between). The fused kernel adds in fp32 in its own order; the oracle
    keeps the graph's."""
    users = g.users()
    outputs = set(g.outputs.values())

    def product(v: Node) -> bool:
        return v.op is Op.MATMUL and _decline(v) is None and len(users[v]) == 1 and \
            v not in outputs

    repl: Dict[Node, Node] = {}
    inner: Set[Node] = set()
    for n in g.nodes:
        if n.op is not Op.ADD:
            continue
        for i1, p2 in (n.inputs, n.inputs[::-1]):
            if i1.op is not Op.ADD or users[i1] != [n] or i1 in outputs or not product(p2) \
                    or i1 in repl:      # (a chain of them: the first rewrite only)
                continue
            x, p1 = next(((a, b) for a, b in (i1.inputs, i1.inputs[::-1]) if product(b)),
                         (None, None))
            if p1 is None or product(x) or p1.inputs[0] is p2.inputs[0] or \
                    len({x.type, p1.type, p2.type, i1.type, n.type}) != 1:
                continue
            inner.add(i1)
            repl[n] = (x, p1, p2)
            break
    if not repl:
        return g
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    for n in g.nodes:
        if n in inner:
            continue
        if n in repl:
            x, p1, p2 = (new.get(v, v) for v in repl[n])
            both = Node.make(Op.ADD, [p1, p2], {}, n.loc, n.scope)
            new[n] = Node.make(Op.ADD, [x, both], {}, n.loc, n.scope)
            nodes += [both, new[n]]
            continue
        new[n] = n.remapped(new)
        nodes.append(new[n])
    return g.with_nodes(nodes, {k: new.get(v, v) for k, v in g.outputs.items()})


def fuse_matmul(g: Graph) -> Graph:
    declined: list = []
    g = _products_summed_first(_split_by_slices(g))
    g, partner = _gated_pairs(g, declined)
    order = {n: i for i, n in enumerate(g.nodes)}
    users = g.users()
    outputs = set(g.outputs.values())
    group_of: Dict[Node, int] = {}
    groups: List[_Group] = []
    # a source's cast (a vector parameter's, under mixed precision): an epilogue may read
    # one that stands after its matmul; it is moved up to the matmul (below). (Not every
    # value of sources alone: in a backward that would let epilogues take chains that fuse
    # better as a reduction's prologue.)
    static = {n: n.op is Op.CAST and is_source(n.inputs[0]) for n in g.nodes}

    def add(n: Node, gid: int):
        groups[gid].members.append(n)
        group_of[n] = gid

    for n in g.nodes:
        if n.op is Op.MATMUL:
            why = _decline(n)
            if why:
                declined.append((n, why))
            elif partner.get(n) in group_of:
                gid = group_of[partner[n]]
                add(n, gid)
                groups[gid].matmuls.append(n)
            else:
                group_of[n] = len(groups)
                groups.append(_Group(n, order[n]))
            continue
        if n.op.kind is not Kind.POINTWISE:
            continue
        gids = list(dict.fromkeys(group_of[x] for x in n.inputs if x in group_of))
        if len(gids) == 2 and _vertical_merge(n, users, outputs, group_of, groups, order,
                                              partner):
            continue
        if not gids:
            gid = _feeds_epilogue(n, users, outputs, group_of, groups, order)
            if gid is not None:   # computed in the epilogue from what the group can read
                add(n, gid)
            continue
        ok, why = fusible(n)
        if not ok:
            declined.append((n, f"epilogue {n.op.value}: {why}"))
            continue
        reasons = []
        for gid in gids:
            grp = groups[gid]
            if n.type.shape != grp.shape:
                reasons.append(f"epilogue {n.op.value} broadcasts the matmul result to a "
                               f"larger shape")
                continue
            late = [y for y in n.inputs if group_of.get(y) != gid and order[y] >= grp.first
                    and not is_source(y) and not static[y]]
            if late:
                inside = set(grp.members)
                if any(_depends_on(y, inside, order, grp.first) for y in late):
                    reasons.append(f"epilogue {n.op.value} also reads a value computed from "
                                   f"the matmul outside the group (fusing would make a cycle)")
                else:
                    reasons.append(f"epilogue {n.op.value} reads {late[0].op.value}, which is "
                                   f"computed after the matmul")
                continue
            if _leave_to_reduction(n, users[n], outputs):
                reasons.append(f"{n.op.value} is read only by reductions: left to "
                               f"fuse_reductions as their prologue")
                continue
            add(n, gid)
            break
        else:
            declined.append((n, reasons[0]))

    # a group's epilogue is trimmed before siblings merge (the horizontal form keeps each
    # product's epilogue whole), and a merged group takes the RMSNorm its products share
    _trim_epilogues(groups, users, outputs, declined)
    hoist = _merge_siblings(groups, order, users, outputs, declined)
    _take_prologues(groups, users, outputs, declined)
    for grp in groups:      # the static values a group reads, moved up to its first matmul
        if not grp.members:
            continue
        first, inside = grp.matmuls[0], set(grp.members)
        for y in {y for m in grp.members for y in m.inputs if y not in inside}:
            if static[y] and order[y] > order[first]:
                cone = hoist.setdefault(first, [])
                cone.extend(c for c in _late_cone(y, first, order) if c not in cone)
    if hoist:
        g = _hoisted(g, hoist, order)
        order = {n: i for i, n in enumerate(g.nodes)}
    for grp in groups:
        grp.members.sort(key=order.get)
    fused: List[dict] = []

    def build(members, gid, used, new):
        grp = groups[gid]
        fused.append({"pass": "fuse_matmul", "status": "fused", "where": _where(members[0]),
                      "reason": grp.what()})
        return make_fused(members, f"{gid}", used, new, kind="matmul", prefix="lmc_mm_")

    # a group is emitted where its first matmul stood (an RMSNorm prologue stands before it,
    # and a later weight's cast may have been moved up only to there); a vertical group where
    # its last product stood (after every operand)
    out = contract(g, [grp.members for grp in groups], build,
                   [(grp.anchor if grp.vertical else grp.matmuls[0]) if grp.members else None
                    for grp in groups])
    out.meta["fusions"] = list(g.meta.get("fusions", [])) + fused + [
        {"pass": "fuse_matmul", "status": "declined", "where": _where(n), "reason": why}
        for n, why in declined]
    return out
