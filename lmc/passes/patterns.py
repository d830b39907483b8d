"""What the pattern passes (fuse_rope_attention, fuse_linear_attention, fuse_moe_gating and the
decode-step passes) share: the vocabulary of a matcher, and the rewrite that puts one FUSED
op in place of each matched region.

A matcher walks primitives from a candidate node and raises `NoMatch` with the condition that
failed (`need(cond, why)`); the pass turns that message into a declined record. A match
becomes a `Region`: the FUSED node (made over the graph's own nodes), the region's nodes that
the rest of the graph reads, in the order of the op's outputs, and every node of the region.
`splice` rebuilds the graph with each region replaced: the fused op and one GETITEM per read
output, each placed after its inputs (a region's inputs may be computed after its first
node), everything else in its old order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..errors import LmcError
from ..ir.graph import Graph, Node
from ..ir.ops import Op
from ..ir.types import DType


class NoMatch(Exception):
    """A candidate failed a condition of the pattern; the message says which."""


def need(cond: bool, why: str) -> None:
    if not cond:
        raise NoMatch(why)


def static_nodes(g: Graph) -> Dict[Node, bool]:
    """For each node of g: is it computed from no input and no parameter (constants, iota,
    masks: a position table, a fixed decay)?"""
    static: Dict[Node, bool] = {}
    for n in g.nodes:
        static[n] = n.op not in (Op.INPUT, Op.PARAM) and all(static[i] for i in n.inputs)
    return static


def const_value(n: Node) -> Optional[float]:
    """The value of a scalar constant node, else None."""
    if n.op is Op.CONST and n.type.rank == 0 and not hasattr(n.attrs["value"], "shape"):
        try:
            return float(n.attrs["value"])
        except (TypeError, ValueError):
            return None
    return None


def const_scale(x: Node) -> Tuple[Node, float]:
    """x = y * c, c * y or y / c (repeatedly), c a constant scalar (finite, nonzero): (y, the
    product of the factors). A scale on q or k before the product (`(q * d ** -0.5) @ k^T`)
    is a scale of the scores: the kernel's."""
    f = 1.0
    while x.op in (Op.MUL, Op.DIV):
        a, c = x.inputs
        if x.op is Op.MUL and const_value(a) is not None:
            a, c = c, a
        cv = const_value(c)
        if cv is None or cv == 0.0 or cv != cv or abs(cv) == float("inf") or \
                tuple(a.type.shape) != tuple(x.type.shape) or a.type.dtype != x.type.dtype:
            break
        f, x = (f * cv if x.op is Op.MUL else f / cv), a
    return x, f


def widened(x: Node) -> bool:
    """x is a low-precision value cast up to fp32 (exact): the mixed-precision pass's cast in
    front of an op on autocast's fp32 list (a softmax over bf16 scores), which the pattern
    passes match through and autodiff recomputes from the narrow value instead of saving."""
    return (x.op is Op.CAST and x.type.dtype is DType.f32
            and x.inputs[0].type.dtype in (DType.f16, DType.bf16))


def upstream(roots: Sequence[Node], stop) -> Set[Node]:
    """The nodes `roots` are computed from, walking inputs and stopping at the `stop` nodes
    and at sources (nodes with no inputs, which a Body copies): a region to fuse."""
    out: Set[Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in out or n in stop or not n.inputs:
            continue
        out.add(n)
        stack.extend(n.inputs)
    return out


def softcap(x: Node):
    """x = cap * tanh(s / cap) (or tanh(s * (1 / cap)) * cap, operands in either order), a
    soft cap on attention scores as Gemma 2 writes it: (cap, s); None for anything else."""
    if x.op is not Op.MUL:
        return None
    for t, c in (x.inputs, x.inputs[::-1]):
        cap = const_value(c)
        if t.op is not Op.TANH or cap is None or not cap > 0:
            continue
        inner = t.inputs[0]
        if inner.op not in (Op.MUL, Op.DIV):
            continue
        for s, d in (inner.inputs, inner.inputs[::-1]):
            dv = const_value(d)
            if dv is None or dv == 0 or (inner.op is Op.DIV and s is not inner.inputs[0]):
                continue
            inv = dv if inner.op is Op.DIV else 1.0 / dv
            if abs(inv - cap) <= 1e-6 * cap:
                return cap, s
    return None


def alibi(x: Node, H, causal: bool, static, positions):
    """x = s + bias, bias = slopes * (kpos - qpos) (ALiBi, MPT's): (s, slopes, qpos, kpos),
    slopes a static tensor with one value per query head ([H, 1, 1] or [1, H, 1, 1]), qpos
    and kpos the position tensors under the distance's reshapes to [T, 1] and [1, S] (and a
    cast to float) for which `positions(n, axis)` holds (axis 0: queries, 1: keys). The
    distance is kpos - qpos, -(qpos - kpos), or under a causal mask -|qpos - kpos|; or the
    bias is slopes * kpos alone (BLOOM's form, [1, S] or [1, 1, S]: the same probabilities),
    and qpos is None. The bias may reach the scores through casts. NoMatch otherwise."""
    def strip(n):
        while n.op is Op.CAST:
            n = n.inputs[0]
        return n

    def pos(n, shape, axis):
        if n.op is not Op.RESHAPE or tuple(n.type.shape) != tuple(shape):
            return None
        src = n.inputs[0]
        if src.op is Op.CAST:
            src = src.inputs[0]
        return src if src.type.rank == 1 and positions(src, axis) else None

    def distance(d):
        def sub(n, k_first):
            if n.op is not Op.SUB or n.type.rank != 2:
                return None
            a, b = n.inputs if k_first else n.inputs[::-1]
            T, S = n.type.shape
            k, q = pos(a, (1, S), 1), pos(b, (T, 1), 0)
            return (q, k) if k is not None and q is not None else None
        if d.op is Op.NEG and d.inputs[0].op is Op.ABS:
            if not causal:      # -|i - j| = j - i only where j <= i: under the mask
                return None
            a = d.inputs[0].inputs[0]
            return sub(a, True) or sub(a, False)
        if d.op is Op.NEG:
            return sub(d.inputs[0], False)
        if d.op is Op.RESHAPE and d.type.rank in (2, 3):     # BLOOM's slopes * kpos
            k = pos(d, (1,) * (d.type.rank - 1) + (d.type.shape[-1],), 1)
            return None if k is None else (None, k)
        return sub(d, True)

    why = "scores plus a term that is not ALiBi's slopes * (key position - query position)"
    for s, bias in (x.inputs, x.inputs[::-1]):
        b = strip(bias)
        if not static(bias) or b.op is not Op.MUL:
            continue
        for sl, d in (b.inputs, b.inputs[::-1]):
            shape = tuple(sl.type.shape)
            if not static(sl) or len(shape) > 4 or not all(isinstance(n, int) for n in shape) \
                    or (1,) * (4 - len(shape)) + shape != (1, H, 1, 1):
                continue
            qk = distance(d)
            if qk is not None:
                return s, sl, qk[0], qk[1]
        why = ("ALiBi's bias is not [H, 1, 1] slopes times the key-query distance "
               "kpos - qpos (nor -|qpos - kpos| under a causal mask) over positions")
    raise NoMatch(why)


def sink_logit(mul: Node, sm: Node) -> Node:
    """mul = softmax(x) * sigmoid(logsumexp(x) - z), x the softmax's own input: attention
    sinks as lmc/passes/canonical.py writes them. Returns z, or raises NoMatch saying why
    not."""
    g = other(mul, sm)
    need(g is not None and g.op is Op.SIGMOID and g.inputs[0].op is Op.SUB,
         "probabilities scaled by something other than an attention sink's "
         "sigmoid(logsumexp(s) - z)")
    lse, z = g.inputs[0].inputs
    need(lse.op is Op.LOGSUMEXP and lse.inputs[0] is sm.inputs[0]
         and lse.attrs["axis"] % lse.type.rank == lse.type.rank - 1
         and lse.attrs.get("keepdim", True),
         "an attention sink's gate is not sigmoid(logsumexp(scores) - z) over the same scores")
    return z


def sink_gate(mul: Node, sm: Node, H):
    """`sink_logit` with z one logit per head broadcast over the batch and the queries (what
    the attention kernels take). Returns (the tensor z is expanded from, the gate's nodes:
    sigmoid, sub, logsumexp and the expands), or raises NoMatch saying why not."""
    z = sink_logit(mul, sm)
    g = other(mul, sm)
    nodes = [g, g.inputs[0], g.inputs[0].inputs[0]]
    src = z
    while src.op is Op.EXPAND:
        nodes.append(src)
        src = src.inputs[0]
    shape = (1,) * (4 - src.type.rank) + tuple(src.type.shape)
    need(src.type.rank <= 4 and shape == (1, H, 1, 1),
         f"attention sinks {list(src.type.shape)} are not one logit per head ([1, {H}, 1, 1] "
         f"broadcast over the batch and the queries)")
    return src, nodes


def uncast(n: Node) -> Node:
    """n without a cast between float dtypes in front (the mixed-precision pass's)."""
    return n.inputs[0] if n.op is Op.CAST and n.type.dtype.is_float and \
        n.inputs[0].type.dtype.is_float else n


def gated_linear_attention(out: Node):
    """out = A @ v, gated linear attention (per-channel decays: GLA, RWKV-6-style) written with
    [.., T, T, d_k] products:
        A   = sum(reshape(q, [.., T, 1, dk]) * reshape(k, [.., 1, T, dk]) * D, -1)
        D   = exp(where(reshape(causal_mask(T, T), [T, T, 1]), G_t - G_s, -inf))
        G_t - G_s = reshape(G, [.., T, 1, dk]) - reshape(G, [.., 1, T, dk]), G = cumsum(g)
    along time (casts between float dtypes around the factors allowed). Returns (q, k, v, g)
    or raises NoMatch with the failed condition. The shape both fuse_linear_attention (the
    chunked kernels) and the decode pass (the recurrent state) read."""
    need(out.op is Op.MATMUL, f"{out.op.value} where A @ v was expected")
    a, v = uncast(out.inputs[0]), out.inputs[1]
    need(a.op is Op.SUM and not a.attrs.get("keepdim", True)
          and a.attrs["axis"] % a.inputs[0].type.rank == a.inputs[0].type.rank - 1,
          "the product is not summed over the key channels (the last axis, keepdim False)")
    leaves, stack = [], [a.inputs[0]]
    while stack:
        x = uncast(stack.pop())
        if x.op is Op.MUL:
            stack.extend(x.inputs)
        else:
            leaves.append(x)
    need(len(leaves) == 3, f"the summed product has {len(leaves)} factors, not q, k and the "
                           f"decays")
    dm = next((x for x in leaves if x.op is Op.EXP), None)
    need(dm is not None and dm.inputs[0].op is Op.WHERE,
          "no factor exp(where(mask, G_t - G_s, -inf)) among the summed product's")
    mask, diff, fill = dm.inputs[0].inputs
    if mask.op is Op.RESHAPE:
        mask = mask.inputs[0]
    need(mask.op is Op.CAUSAL_MASK and not mask.attrs.get("window")
          and mask.attrs["rows"] == mask.attrs["cols"],
          "the decays are not masked by causal_mask(T, T) (windows are not matched)")
    need(const_value(fill) == float("-inf"), "masked decay exponents are not -inf")
    need(diff.op is Op.SUB and all(x.op is Op.RESHAPE for x in diff.inputs)
          and diff.inputs[0].inputs[0] is diff.inputs[1].inputs[0],
          "the decay exponent is not G_t - G_s of one G")
    G = diff.inputs[0].inputs[0]
    r = G.type.rank
    need(G.op is Op.CUMSUM and r >= 2 and G.attrs["axis"] % r == r - 2,
          "G is not a cumsum along time of [.., T, d_k] log-decays")
    lead, T, dk = tuple(G.type.shape[:-2]), G.type.shape[-2], G.type.shape[-1]
    need(T == mask.attrs["rows"], "the mask and G have different lengths")
    need(tuple(diff.inputs[0].type.shape) == lead + (T, 1, dk)
          and tuple(diff.inputs[1].type.shape) == lead + (1, T, dk),
          "G_t - G_s is not G[.., t, None, :] - G[.., None, s, :]")
    qe, ke = [x for x in leaves if x is not dm]
    if tuple(qe.type.shape[-3:-1]) == (1, T):
        qe, ke = ke, qe
    need(qe.op is Op.RESHAPE and ke.op is Op.RESHAPE
          and tuple(qe.type.shape[-3:]) == (T, 1, dk) and tuple(ke.type.shape[-3:]) == (1, T, dk)
          and tuple(qe.inputs[0].type.shape[-2:]) == (T, dk)
          and tuple(ke.inputs[0].type.shape[-2:]) == (T, dk),
          "q and k are not reshaped to [.., T, 1, d_k] and [.., 1, T, d_k]")
    return qe.inputs[0], ke.inputs[0], v, G.inputs[0]


def narrowing(n: Node) -> bool:
    """n casts a float to a narrower float: a mixed-precision program's cast in front of a
    product (a cache holds the narrow value, a kernel reads it)."""
    return n.op is Op.CAST and n.type.dtype.is_float and n.inputs[0].type.dtype.is_float \
        and n.type.dtype.itemsize < n.inputs[0].type.dtype.itemsize


def is_swap(n: Node) -> bool:
    """n transposes the last two axes (k^T of a batched product)."""
    r = n.type.rank
    return n.op is Op.PERMUTE and tuple(n.attrs["perm"]) == tuple(range(r - 2)) + (r - 1, r - 2)


def other(n: Node, x: Node) -> Optional[Node]:
    """The input of the binary op n that is not x (None if x is not one of them)."""
    a, b = n.inputs
    return b if a is x else a if b is x else None


def match_all(g: Graph, candidates, match, pass_name: str):
    """(matches, declined records): `match(n)` for each node of g that `candidates(n)` picks,
    a NoMatch turned into a declined record at that node."""
    from .fuse_pointwise import _where

    matches, records = [], []
    for n in g.nodes:
        if not candidates(n):
            continue
        try:
            matches.append(match(n))
        except NoMatch as e:
            records.append({"pass": pass_name, "status": "declined", "where": _where(n),
                            "reason": str(e)})
    return matches, records


@dataclass
class Region:
    fused: Node                    # the FUSED node, its inputs the graph's (old) nodes
    outputs: Sequence[Optional[Node]]   # the nodes its outputs replace, by index (None: unread)
    nodes: Set[Node]               # the whole region, dropped (sources others read stay)


def splice(g: Graph, regions: List[Region], records: List[dict]) -> Graph:
    """g with every region replaced by its fused op, the records appended to
    meta["fusions"], then dead code removed."""
    from .basic import dce

    if not regions:
        out = g.with_nodes(g.nodes, g.outputs)
        out.meta["fusions"] = list(g.meta.get("fusions", [])) + records
        return out
    made: Dict[Node, Region] = {o: r for r in regions for o in r.outputs if o is not None}
    dead = set().union(*[r.nodes for r in regions])
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []

    def emit(root: Node) -> None:
        # iterative post-order: a node is made once every input has its new node
        stack = [root]
        while stack:
            n = stack[-1]
            if n in new:
                stack.pop()
                continue
            r = made.get(n)
            if r is None and n in dead and n.inputs:
                # (a source, e.g. a mask CSE shares with another layer, may stay)
                raise LmcError(f"internal: {n.op.value} of a fused region is read outside it",
                               n.loc)
            ins = r.fused.inputs if r is not None else n.inputs
            todo = [i for i in ins if i not in new]
            if todo:
                stack.extend(reversed(todo))
                continue
            stack.pop()
            if r is None:
                ins2 = tuple(new[i] for i in n.inputs)
                c = n if ins2 == n.inputs else Node(n.op, ins2, n.attrs, n.type, n.loc, n.scope)
                new[n] = c
                nodes.append(c)
                continue
            f = r.fused
            fused = Node(f.op, tuple(new[i] for i in f.inputs), f.attrs, f.type, f.loc,
                         f.scope)
            nodes.append(fused)
            for j, o in enumerate(r.outputs):
                if o is not None:
                    new[o] = Node.make(Op.GETITEM, [fused], {"index": j}, o.loc, o.scope)
                    nodes.append(new[o])

    for n in g.nodes:
        if n not in dead or n in made:
            emit(n)
    out = g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()})
    out.meta["fusions"] = list(g.meta.get("fusions", [])) + records
    return dce(out)


class Body:
    """A matched region copied into a fused op's body graph: INPUT placeholders in0.. for
    the op's inputs, then the region's nodes (`copy`, in graph order) reading them; a source
    the region reads from outside (a mask, a constant, an iota) is copied in too.

        b = Body(inputs, alias={view: the input it stands for})
        b.copy(sorted(region, key=order.__getitem__))
        body = b.graph(name, [out], module="attention", template="rope_attention", options={})
    """

    def __init__(self, inputs: Sequence[Node], alias: Optional[Dict[Node, Node]] = None):
        from ..frontend.builder import Builder

        self._b = Builder({}, {})
        self.env: Dict[Node, Node] = {}
        for i, x in enumerate(inputs):
            self.env[x] = self._b.input(f"in{i}", x.type.shape, x.type.dtype).node
        for a, x in (alias or {}).items():
            self.env[a] = self.env[x]

    def add(self, n: Node) -> Node:
        """Append a node made over body nodes (one the region does not have, e.g. an lse)."""
        self._b.nodes.append(n)
        return n

    def copy(self, nodes: Sequence[Node]) -> None:
        for n in nodes:
            if n in self.env:
                continue
            for i in n.inputs:
                if i not in self.env:
                    if i.inputs or i.op in (Op.INPUT, Op.PARAM):
                        raise LmcError(f"internal: the fused region reads {i.op.value}, "
                                       "which is neither an input of the op nor a source", i.loc)
                    self.env[i] = self.add(Node(i.op, (), dict(i.attrs), i.type, i.loc,
                                                i.scope))
            self.env[n] = self.add(Node(n.op, tuple(self.env[i] for i in n.inputs), n.attrs,
                                        n.type, n.loc, n.scope))

    def graph(self, name: str, outputs: Sequence[Node], **meta) -> Graph:
        """The body, its outputs "0".. the copies of `outputs` (or body nodes made by `add`);
        meta: module, template, options (codegen/templates.py), saved (the autodiff pass)."""
        own = set(self._b.nodes)
        outs = {}
        for j, o in enumerate(outputs):
            if o not in self.env and o not in own:
                raise LmcError(f"internal: body output {o.op.value} is not in the body", o.loc)
            outs[str(j)] = self.env.get(o, o)
        g = Graph(name, self._b.nodes, outs)
        g.meta.update(meta)
        return g
