"""Reverse-mode autodiff as a pass over the IR.

`differentiate(g)` turns a forward graph into

    forward'  the same outputs plus ``saved:<k>`` outputs: what the backward needs, made explicit
    backward  inputs ``grad:<output>`` (cotangents) and ``saved:<k>``; outputs ``grad:<name>``
              for every parameter and float input

Both are ordinary graphs, so every later pass (fusion, codegen) applies to the backward too.
VJP rules live in the `VJP` table keyed by op and are written with the same `Builder` the
frontend uses. Sources with no inputs (constants, iota, masks) are recomputed in the backward
rather than saved, and so is a widening cast (f16/bf16 -> f32) from its narrow input.

Rules for ops with no useful derivative, stated once:
  comparisons, topk (indices), iota, causal_mask, integer casts: no gradient (None);
  sign and round: zero gradient, as torch defines them;
  maximum/minimum: ties split the gradient in half between the operands (torch's rule);
  amax: ties share the gradient equally; relu: zero gradient at 0.
Straight-through estimators are written with the explicit `stop_gradient` op (identity
forward, no gradient: `x + stop_gradient(q(x) - x)`); nothing flows through it, so a target
reached only through it gets an exact zero.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import LmcError
from ..frontend.builder import Builder, Tensor
from ..ir.dims import dims_equal
from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from ..ir.types import DType
from .patterns import widened

VJP: Dict[Op, Callable] = {}
_RECOMPUTE = {Op.CONST, Op.IOTA, Op.CAUSAL_MASK}


def vjp(*ops: Op):
    def deco(fn):
        for op in ops:
            VJP[op] = fn
        return fn
    return deco


@dataclass
class Differentiated:
    forward: Graph
    backward: Graph
    wrt: List[str]        # names of the params/inputs the backward returns gradients for
    outputs: List[str]    # forward outputs that take a cotangent
    saved: List[str]      # forward' outputs carried to the backward
    forward_exec: object = None   # backend programs (e.g. TritonProgram) for the two graphs;
    backward_exec: object = None  # None: run the graphs op by op with the torch references


class Rule:
    """What a VJP rule sees: the backward builder `b`, the node, its cotangent `g`, and
    `x(i)` / `out()` to use forward values (which saves or recomputes them on demand)."""

    def __init__(self, b: Builder, node: Node, g: Tensor, fwd: Callable[[Node], Tensor],
                 item: Optional[Callable[[Node, int], Tensor]] = None):
        self.b, self.node, self.g, self._fwd, self._item = b, node, g, fwd, item
        self.attrs = node.attrs

    def x(self, i: int) -> Tensor:
        return self._fwd(self.node.inputs[i])

    def out(self) -> Tensor:
        return self._fwd(self.node)

    def item(self, k: int) -> Tensor:
        """Output k of a multi-output node (a fused op), as the backward reads it: saved
        from forward', through the forward graph's GETITEM of it (made if none reads it)."""
        return self._item(self.node, k)

    def shape(self, i: int):
        return self.node.inputs[i].type.shape

    def zeros(self, shape, dtype: Optional[DType] = None) -> Tensor:
        return self.b.expand(self.b.const(0.0, dtype or self.g.dtype), shape)

    def unbroadcast(self, g: Tensor, shape) -> Tensor:
        """Sum `g` over the axes broadcasting added or stretched, back to `shape`."""
        b = self.b
        for _ in range(g.rank - len(shape)):
            g = b.sum(g, 0, keepdim=False)
        for ax, d in enumerate(shape):
            if dims_equal(d, 1) and not dims_equal(g.shape[ax], 1):
                g = b.sum(g, ax, keepdim=True)
        return g

    def keep(self, v: Tensor) -> Tensor:
        """A reduction's result (or cotangent) with the reduced axis restored as size 1."""
        if self.attrs.get("keepdim", True):
            return v
        shape = list(v.shape)
        shape.insert(self.attrs["axis"], 1)
        return self.b.reshape(v, shape)


def differentiate(g: Graph, wrt: Optional[Sequence[str]] = None,
                  outputs: Optional[Sequence[str]] = None) -> Differentiated:
    """wrt: the params/inputs to return gradients for (default: every param and float
    input). outputs: the outputs that take a cotangent (default: every float output that
    depends on one of them); the rest are values only, with no ``grad:`` input."""
    by_name = {n.attrs["name"]: n for n in g.nodes if n.op in (Op.PARAM, Op.INPUT)}
    if wrt is None:
        wrt = [n.attrs["name"] for n in g.nodes
               if n.op is Op.PARAM or (n.op is Op.INPUT and n.type.dtype.is_float)]
    targets = [by_name[w] for w in wrt]
    target_set = set(targets)

    # which values depend (differentiably) on a target
    depends: Dict[Node, bool] = {}
    for n in g.nodes:
        multi = isinstance(n.type, tuple)  # a scan: its GETITEMs check their own dtypes
        depends[n] = n in target_set or (
            (multi or n.type.dtype.is_float) and any(depends[i] for i in n.inputs)
            and n.op not in (Op.TOPK, Op.STOP_GRADIENT))

    b = Builder({}, {})
    saved_nodes: List[Node] = []
    fwd_memo: Dict[Node, Tensor] = {}

    def fwd(n: Node) -> Tensor:
        if n not in fwd_memo:
            if n.op in _RECOMPUTE:
                fwd_memo[n] = b.node(n.op, (), dict(n.attrs))
            # a cast from f16/bf16 to f32 is exact: save the narrow value (half the bytes; the
            # loss's fp32 copy of bf16 logits is never stored) and widen it again here
            elif widened(n):
                fwd_memo[n] = b.cast(fwd(n.inputs[0]), n.type.dtype)
            else:
                fwd_memo[n] = b.input(f"saved:{len(saved_nodes)}", n.type.shape, n.type.dtype)
                saved_nodes.append(n)
        return fwd_memo[n]

    # GETITEMs of multi-output nodes: the graph's own, and those a rule reads that nothing in
    # the graph did (a fused op's output only its backward uses, e.g. attention's row
    # log-sum-exp); forward' gets the new ones right after their node
    items: Dict[tuple, Node] = {(n.inputs[0], n.attrs["index"]): n
                                for n in reversed(g.nodes) if n.op is Op.GETITEM}
    new_items: Dict[Node, List[Node]] = {}

    def item(n: Node, k: int) -> Tensor:
        got = items.get((n, k))
        if got is None:
            got = Node.make(Op.GETITEM, [n], {"index": k}, n.loc, n.scope)
            items[(n, k)] = got
            new_items.setdefault(n, []).append(got)
        return fwd(got)

    ct: Dict[Node, Tensor] = {}
    with_ct = set(g.outputs if outputs is None else outputs)
    outputs = []
    for name, o in g.outputs.items():
        if name in with_ct and depends.get(o) and o.type.dtype.is_float:
            outputs.append(name)
            gin = b.input(f"grad:{name}", o.type.shape, o.type.dtype)
            ct[o] = gin if o not in ct else ct[o] + gin

    for n in reversed(g.nodes):
        gn = ct.pop(n, None)
        if gn is None or n.op in (Op.PARAM, Op.INPUT):
            if gn is not None:
                ct[n] = gn  # a target's gradient: kept for the outputs below
            continue
        if n.op is Op.GETITEM:  # one output of a scan: the cotangent goes to its slot
            slots = ct.setdefault(n.inputs[0], {})
            k = n.attrs["index"]
            slots[k] = slots[k] + gn if k in slots else gn
            continue
        rule = VJP.get(n.op)
        if rule is None:
            raise LmcError(f"no VJP rule for {n.op.value}", n.loc)
        b.loc = n.loc
        b.scope = n.scope  # backward nodes belong to the forward node's block instance
        grads = rule(Rule(b, n, gn, fwd, item))
        for i, gi in zip(n.inputs, grads):
            if gi is None or not depends.get(i):
                continue
            if gi.shape != i.type.shape and not all(
                    dims_equal(a, c) for a, c in zip(gi.shape, i.type.shape)):
                raise LmcError(f"internal: VJP of {n.op.value} gave a {gi.shape} cotangent "
                               f"for a {i.type.shape} input", n.loc)
            ct[i] = _accumulate(b, ct[i], gi) if i in ct else gi
    b.loc = None
    b.scope = ""

    grads_out = {}
    for name, t in zip(wrt, targets):
        gt = ct.get(t)
        if gt is None:
            gt = b.expand(b.const(0.0, t.type.dtype), t.type.shape)
        grads_out[f"grad:{name}"] = gt.node
    nodes = g.nodes
    if new_items:
        nodes = []
        for n in g.nodes:
            nodes.append(n)
            nodes += new_items.get(n, [])
    order = {n: i for i, n in enumerate(nodes)}
    bnodes, grads_out, kept = _rematerialize(b.nodes, grads_out, saved_nodes, fwd_memo, order)
    # a VJP rule also builds the cotangent of an input that takes none (the loss's count);
    # the values only such dead nodes read are not saved (forward' would return them)
    live, stack = set(), list(grads_out.values())
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.inputs)
    dead = {fwd_memo[n].node for n in kept if fwd_memo[n].node not in live}
    bnodes = [n for n in bnodes if n in live or (n.op is Op.INPUT and n not in dead)]
    kept = {n for n in kept if fwd_memo[n].node not in dead}
    backward = Graph(f"{g.name}.backward", bnodes, grads_out, {"config": g.meta.get("config")})
    fwd_outputs = dict(g.outputs)
    saved_names = []
    for k, n in enumerate(saved_nodes):
        if n in kept:
            fwd_outputs[f"saved:{k}"] = n
            saved_names.append(f"saved:{k}")
    forward = g.with_nodes(nodes, fwd_outputs)
    from . import debug_dump, debugging
    if debugging():
        debug_dump(forward, "forward' (autodiff: with the values saved for the backward)")
        debug_dump(backward, "backward (autodiff)")
    return Differentiated(forward, backward, list(wrt), outputs, saved_names)


def _accumulate(b, a: Tensor, c: Tensor) -> Tensor:
    """a + c, two cotangent contributions to one value. Where both are zero-padded
    concatenations along one axis (the slices' VJPs: split(qkv) gives [g_q | 0 | 0],
    [0 | g_k | 0], [0 | 0 | g_v]), the sum is one concatenation of the pieces, zeros only
    where neither has a piece: [g_q | g_k | g_v], not three padded tensors and two adds."""
    merged = _merge_padded(b, a, c)
    return a + c if merged is None else merged


def _padded(t: Tensor):
    """t as (axis, [(piece or None for zeros, size)]) when it is a concatenation of pieces
    and zeros with static sizes; else None."""
    n = t.node
    if n.op is not Op.CONCAT:
        return None
    ax = n.attrs["axis"] % n.type.rank
    blocks = []
    for x in n.inputs:
        size = x.type.shape[ax]
        if not isinstance(size, int):
            return None
        z = x.op is Op.EXPAND and x.inputs[0].op is Op.CONST and \
            x.inputs[0].type.rank == 0 and x.inputs[0].attrs["value"] == 0
        blocks.append((None if z else Tensor(x, t.b), size))
    return ax, blocks


def _merge_padded(b, a: Tensor, c: Tensor) -> Optional[Tensor]:
    pa, pc = _padded(a), _padded(c)
    if pa is None or pc is None or pa[0] != pc[0] or a.dtype != c.dtype or \
            tuple(a.shape) != tuple(c.shape):
        return None
    ax = pa[0]
    cuts = sorted({0} | {e for p in (pa[1], pc[1])
                         for e in itertools.accumulate(size for _, size in p)})

    def piece(blocks, lo, hi):
        """The block of `blocks` covering [lo, hi): its piece, None (zeros), or False (a
        piece cut by the other side's boundaries: not merged)."""
        start = 0
        for x, size in blocks:
            if start <= lo and hi <= start + size:
                return x if x is None or (start, start + size) == (lo, hi) else False
            start += size
        return False
    out: List[Tuple[Optional[Tensor], int]] = []
    for lo, hi in zip(cuts, cuts[1:]):
        x, y = piece(pa[1], lo, hi), piece(pc[1], lo, hi)
        if x is False or y is False:
            return None
        s = x if y is None else y if x is None else x + y
        if s is None and out and out[-1][0] is None:      # adjacent zeros: one block
            out[-1] = (None, out[-1][1] + hi - lo)
        else:
            out.append((s, hi - lo))
    parts = [x if x is not None else
             b.expand(b.const(0.0, a.dtype), [size if i == ax else d
                                              for i, d in enumerate(a.shape)])
             for x, size in out]
    return parts[0] if len(parts) == 1 else b.concat(parts, ax)


def _rematerialize(nodes: List[Node], outputs: Dict[str, Node], saved: List[Node],
                   memo: Dict[Node, Tensor], order: Dict[Node, int]):
    """Saved values the backward can recompute where it reads them, instead of forward'
    storing them: a pointwise node of the forward whose inputs are saved anyway (or
    recomputed this way, or sources), at most one of them as large as the node itself (so the
    kernels reading it read no more bytes), and whose backward readers are all pointwise ops
    and reductions (through views), so the recomputation fuses into those kernels. SwiGLU's
    silu(gate) and RMSNorm's x * rstd (saved for the norm weight's gradient) are recomputed
    from the gate and from x and rstd; an input that is a widening cast of a saved bf16/f16
    value is widened again (mixed precision's cast(x) * rstd, an fp32 [B, T, d] otherwise
    saved at 4 bytes where x is at 2). Returns (backward nodes, outputs, saved nodes kept)."""
    users: Dict[Node, List[Node]] = {}
    for n in nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n)
    outs = set(outputs.values())

    def fusable(v: Node) -> bool:
        if v in outs:
            return False
        for u in users.get(v, ()):
            kind = u.op.kind
            if kind is Kind.VIEW and u.op is not Op.CONCAT:
                if not fusable(u):
                    return False
            elif kind not in (Kind.POINTWISE, Kind.REDUCTION):
                return False
        return True

    avail: Dict[Node, Node] = {n: memo[n].node for n in saved}   # forward -> backward
    remat: Dict[Node, Node] = {}
    fresh: List[Node] = []
    for n in sorted(saved, key=order.__getitem__):
        if (n.op.kind is not Kind.POINTWISE or not fusable(avail[n])
                or any(x not in avail and x.op not in _RECOMPUTE
                       and not (widened(x) and x.inputs[0] in avail) for x in n.inputs)
                or sum(x.type.shape == n.type.shape for x in n.inputs) > 1):
            continue
        ins = []
        for x in n.inputs:
            if x not in avail and widened(x):   # cast(x) of a saved bf16 x: widened again
                avail[x] = Node.make(Op.CAST, (avail[x.inputs[0]],), dict(x.attrs), x.loc,
                                     x.scope)
                fresh.append(avail[x])
            elif x not in avail:      # a constant, iota or mask: made again
                avail[x] = Node.make(x.op, (), dict(x.attrs), x.loc, x.scope)
                fresh.append(avail[x])
            ins.append(avail[x])
        new = Node.make(n.op, ins, dict(n.attrs), n.loc, n.scope)
        fresh.append(new)
        remat[avail[n]] = new
        avail[n] = new
    if not remat:
        return nodes, outputs, set(saved)
    # the recomputations after the inputs they read (the fusion passes' sink moves each
    # beside the kernel that reads it), then the rest with the saved inputs replaced
    new_of: Dict[Node, Node] = dict(remat)
    out_nodes = [n for n in nodes if n.op is Op.INPUT and n not in remat] + fresh
    for n in nodes:
        if n.op is Op.INPUT:
            continue
        ins = tuple(new_of.get(i, i) for i in n.inputs)
        if ins != n.inputs:
            new_of[n] = Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        out_nodes.append(new_of.get(n, n))
    kept = {n for n in saved if memo[n].node not in remat}
    return out_nodes, {k: new_of.get(v, v) for k, v in outputs.items()}, kept


# -- pointwise ---------------------------------------------------------------------------------
def _un(fn):
    return lambda r: [fn(r)]


VJP[Op.NEG] = _un(lambda r: -r.g)
VJP[Op.EXP] = _un(lambda r: r.g * r.out())
VJP[Op.LOG] = _un(lambda r: r.g / r.x(0))
VJP[Op.SQRT] = _un(lambda r: r.g / (r.out() * 2.0))
VJP[Op.RSQRT] = _un(lambda r: r.g * (r.out() * r.out() * r.out()) * -0.5)
VJP[Op.SIGMOID] = _un(lambda r: r.g * r.out() * (1.0 - r.out()))
VJP[Op.TANH] = _un(lambda r: r.g * (1.0 - r.out() * r.out()))
VJP[Op.SIN] = _un(lambda r: r.g * r.b.cos(r.x(0)))
VJP[Op.COS] = _un(lambda r: -(r.g * r.b.sin(r.x(0))))
VJP[Op.ABS] = _un(lambda r: r.g * r.b.sign(r.x(0)))
VJP[Op.SIGN] = _un(lambda r: r.zeros(r.shape(0)))
VJP[Op.ROUND] = _un(lambda r: r.zeros(r.shape(0)))
VJP[Op.ERF] = _un(lambda r: r.g * r.b.exp(-(r.x(0) * r.x(0))) * (2.0 / math.sqrt(math.pi)))
VJP[Op.RELU] = _un(lambda r: r.b.where(r.out() > 0.0, r.g, 0.0))
VJP[Op.SOFTPLUS] = _un(lambda r: r.g * r.b.sigmoid(r.x(0)))
VJP[Op.LOGSIGMOID] = _un(lambda r: r.g * r.b.sigmoid(-r.x(0)))  # 1 - sigmoid(x), no cancellation


@vjp(Op.SILU)
def _silu(r):
    x = r.x(0)
    s = r.b.sigmoid(x)
    return [r.g * s * (1.0 + x * (1.0 - s))]


@vjp(Op.GELU)
def _gelu(r):
    b, x = r.b, r.x(0)
    if r.attrs.get("approximate", "none") == "tanh":
        k = math.sqrt(2.0 / math.pi)
        x2 = x * x
        t = b.tanh((x + x2 * x * 0.044715) * k)
        d = (1.0 + t) * 0.5 + x * (1.0 - t * t) * (1.0 + x2 * (3 * 0.044715)) * (0.5 * k)
        return [r.g * d]
    cdf = (1.0 + b.erf(x * (1.0 / math.sqrt(2.0)))) * 0.5
    pdf = b.exp(x * x * -0.5) * (1.0 / math.sqrt(2.0 * math.pi))
    return [r.g * (cdf + x * pdf)]


@vjp(Op.CLAMP)
def _clamp(r):
    b, x, g = r.b, r.x(0), r.g
    lo, hi = r.attrs["lo"], r.attrs["hi"]
    if lo is not None:
        g = b.where(x >= lo, g, 0.0)
    if hi is not None:
        g = b.where(x <= hi, g, 0.0)
    return [g]


@vjp(Op.CAST)
def _cast(r):
    src = r.node.inputs[0].type.dtype
    return [r.b.cast(r.g, src) if src.is_float else None]


@vjp(Op.ADD)
def _add(r):
    return [r.unbroadcast(r.g, r.shape(0)), r.unbroadcast(r.g, r.shape(1))]


@vjp(Op.SUB)
def _sub(r):
    return [r.unbroadcast(r.g, r.shape(0)), r.unbroadcast(-r.g, r.shape(1))]


@vjp(Op.MUL)
def _mul(r):
    return [r.unbroadcast(r.g * r.x(1), r.shape(0)), r.unbroadcast(r.g * r.x(0), r.shape(1))]


@vjp(Op.DIV)
def _div(r):
    a, c = r.x(0), r.x(1)
    ga = r.g / c
    return [r.unbroadcast(ga, r.shape(0)), r.unbroadcast(-(ga * a / c), r.shape(1))]


@vjp(Op.POW)
def _pow(r):
    b, a, e = r.b, r.x(0), r.x(1)
    ga = b.where(b.eq(e, 0.0), 0.0, r.g * e * b.pow(a, e - 1.0))
    gb = None
    if r.node.inputs[1].type.dtype.is_float:
        ge = r.g * r.out() * b.log(a)
        gb = b.where(b.eq(a, 0.0), b.where(e >= 0.0, 0.0, ge), ge)
    return [r.unbroadcast(ga, r.shape(0)), None if gb is None else r.unbroadcast(gb, r.shape(1))]


def _minmax(r, first_loses):
    b, a, c = r.b, r.x(0), r.x(1)
    half = b.where(b.eq(a, c), r.g * 0.5, r.g)
    lose_a, lose_c = (a < c, a > c) if first_loses == "lt" else (a > c, a < c)
    return [r.unbroadcast(b.where(lose_a, 0.0, half), r.shape(0)),
            r.unbroadcast(b.where(lose_c, 0.0, half), r.shape(1))]


VJP[Op.MAX] = lambda r: _minmax(r, "lt")
VJP[Op.MIN] = lambda r: _minmax(r, "gt")
for _op in (Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE):
    VJP[_op] = lambda r: [None, None]


@vjp(Op.WHERE)
def _where(r):
    c = r.x(0)
    return [None, r.unbroadcast(r.b.where(c, r.g, 0.0), r.shape(1)),
            r.unbroadcast(r.b.where(c, 0.0, r.g), r.shape(2))]


# -- reductions --------------------------------------------------------------------------------
@vjp(Op.SUM)
def _sum(r):
    return [r.b.expand(r.keep(r.g), r.shape(0))]


@vjp(Op.MEAN)
def _mean(r):
    n = r.shape(0)[r.attrs["axis"]]
    return [r.b.expand(r.keep(r.g), r.shape(0)) / r.b.const(n, r.g.dtype)]


@vjp(Op.AMAX)
def _amax(r):
    b, x = r.b, r.x(0)
    mask = b.cast(b.eq(x, r.keep(r.out())), x.dtype)
    return [r.keep(r.g) * mask / b.sum(mask, r.attrs["axis"], keepdim=True)]


@vjp(Op.LOGSUMEXP)
def _logsumexp(r):
    return [r.keep(r.g) * r.b.exp(r.x(0) - r.keep(r.out()))]


@vjp(Op.SOFTMAX)
def _softmax(r):
    y = r.out()
    return [y * (r.g - r.b.sum(r.g * y, r.attrs["axis"], keepdim=True))]


@vjp(Op.CUMSUM)
def _cumsum(r):
    ax = r.attrs["axis"]
    # reversed cumulative sum, without a flip: total - inclusive prefix + own term
    return [r.b.sum(r.g, ax, keepdim=True) - r.b.cumsum(r.g, ax) + r.g]


def _flip(b: Builder, v: Tensor, ax: int) -> Tensor:
    """`v` reversed along `ax` (a gather with indices n-1 ... 0; n may be symbolic)."""
    n = v.shape[ax]
    idx = b.const(n - 1, DType.i64) - b.iota(n)
    idx = b.reshape(idx, [n if i == ax else 1 for i in range(v.rank)])
    return b.gather(v, b.expand(idx, v.shape), ax)


def _reverse_cumsum(b: Builder, v: Tensor, ax: int) -> Tensor:
    """sum_{i >= k} v_i, exactly (no total-minus-prefix cancellation: products span decades)."""
    return _flip(b, b.cumsum(_flip(b, v, ax), ax), ax)


@vjp(Op.CUMPROD)
def _cumprod(r):
    # d y_i / d x_k = prod_{j <= i, j != k} x_j for i >= k. With z the first zero of a row:
    #   k < z: x_k != 0, so the gradient is revcumsum(g * y)_k / x_k (y_i = 0 for i >= z);
    #   k = z: revcumsum(g * E)_z, E = cumprod of x with that zero replaced by 1;
    #   k > z: every product includes x_z = 0, so the gradient is 0.
    b, x, ax, g = r.b, r.x(0), r.attrs["axis"], r.g
    zero = b.eq(x, 0.0)
    count = b.cumsum(b.cast(zero, DType.i64), ax)   # zeros at or before each position
    before = b.eq(count, 0)
    first = b.where(zero, b.eq(count, 1), False)
    g_before = _reverse_cumsum(b, g * r.out(), ax) / b.where(before, x, 1.0)
    e = b.cumprod(b.where(first, 1.0, x), ax)
    g_first = _reverse_cumsum(b, g * e, ax)
    return [b.where(before, g_before, b.where(first, g_first, 0.0))]


# -- scan ------------------------------------------------------------------------------------------
@vjp(Op.SCAN)
def _scan(r):
    # the body is differentiated once, like any graph; SCAN_BWD reruns the forward loop keeping
    # each step's saved values, then runs the body's backward from the last step to the first
    from . import run_pipeline

    node, b = r.node, r.b
    body = node.attrs["body"]
    try:
        prog = differentiate(body)
    except LmcError as e:
        raise LmcError(f"scan step {node.attrs.get('block', '')!r}: {e.message}",
                       e.loc or node.loc) from None
    prog.backward = run_pipeline(prog.backward)
    cts = [r.g.get(k) for k in range(len(node.type))]  # cotangents of (ys..., carries...)
    cts = [g if g is not None else r.zeros(t.shape, t.dtype) for g, t in zip(cts, node.type)]
    attrs = {k: v for k, v in node.attrs.items()}
    attrs["_vjp"] = prog
    bwd = b.node(Op.SCAN_BWD, [r.x(i) for i in range(len(node.inputs))] + cts, attrs)
    return [b.node(Op.GETITEM, (bwd,), {"index": i}) if x.type.dtype.is_float else None
            for i, x in enumerate(node.inputs)]


@vjp(Op.FUSED)
def _fused(r):
    # a fused op (made before autodiff by a pattern pass) is differentiated through its body;
    # the result is one backward FUSED node of kind "<kind>_bwd" whose body recomputes the
    # body's forward and runs its backward (the oracle), and whose kernel is the fused one.
    # Its inputs: the forward op's inputs, then the forward outputs the body's meta lists
    # under "saved" (body output keys: what the fused backward kernel reads instead of
    # recomputing, e.g. attention's output and row log-sum-exp; the oracle body ignores these
    # placeholders and recomputes), then the cotangents of the outputs that take one (float
    # outputs that depend differentiably on an input; an integer output, or one the body
    # computes through stop_gradient, gets none). The backward body's meta "options" gain
    # n_inputs, saved and cotangents so its template can tell them apart.
    from . import run_pipeline

    node, b = r.node, r.b
    body = node.attrs["body"]
    ins = [n for n in body.nodes if n.op is Op.INPUT]
    outs = list(body.outputs)
    keep = list(body.meta.get("saved", ()))
    for o in keep:
        if o not in body.outputs:
            raise LmcError(f"internal: fused op {node.attrs['kernel']!r} saves {o!r}, not "
                           f"one of its outputs {outs}", node.loc)
    skip = set(node.attrs.get("no_grad", ()))
    wrt = [n.attrs["name"] for i, (n, x) in enumerate(zip(ins, node.inputs))
           if x.type.dtype.is_float and i not in skip]
    prog = differentiate(body, wrt)
    prog.backward = run_pipeline(prog.backward)
    bb = Builder({}, {})
    ph = {n.attrs["name"]: bb.input(n.attrs["name"], n.type.shape, n.type.dtype).node
          for n in ins}
    for o in keep:   # placeholders only: the oracle body recomputes what it needs
        bb.input(f"out:{o}", body.outputs[o].type.shape, body.outputs[o].type.dtype)
    cts_ph = {o: bb.input(f"grad:{o}", body.outputs[o].type.shape,
                          body.outputs[o].type.dtype).node for o in prog.outputs}

    def splice(graph, bind):
        env = {}
        for n in graph.nodes:
            if n.op is Op.INPUT:
                env[n] = bind(n.attrs["name"])
                continue
            c = Node(n.op, tuple(env[i] for i in n.inputs), n.attrs, n.type, n.loc, n.scope)
            env[n] = c
            bb.nodes.append(c)
        return env
    fenv = splice(prog.forward, ph.__getitem__)
    saved = {s: fenv[prog.forward.outputs[s]] for s in prog.saved}
    benv = splice(prog.backward, lambda name: saved[name] if name.startswith("saved:")
                  else cts_ph[name[len("grad:"):]])
    grads = {str(j): benv[prog.backward.outputs[f"grad:{w}"]] for j, w in enumerate(wrt)}
    bwd_body = Graph(f"{body.name}_bwd", bb.nodes, grads)
    bwd_body.meta.update({k: v for k, v in body.meta.items() if k not in ("history", "saved")})
    bwd_body.meta["template"] = f"{body.meta.get('template', node.attrs['kind'])}_bwd"
    layout = {"n_inputs": len(ins), "saved": keep, "cotangents": list(prog.outputs)}
    opts = dict(body.meta.get("options", {}))
    clash = set(opts) & set(layout)
    if clash:
        raise LmcError(f"internal: fused op {node.attrs['kernel']!r} options use the "
                       f"backward's keys {sorted(clash)}", node.loc)
    bwd_body.meta["options"] = {**opts, **layout}
    cts = []
    for o in prog.outputs:
        k = outs.index(o)
        g = r.g.get(k) if isinstance(r.g, dict) else (r.g if k == 0 else None)
        t = node.type[k]
        cts.append(g if g is not None else r.zeros(t.shape, t.dtype))
    bwd = b.node(Op.FUSED, [r.x(i) for i in range(len(node.inputs))]
                 + [r.item(outs.index(o)) for o in keep] + cts,
                 {"kernel": f"{node.attrs['kernel']}_bwd", "kind": f"{node.attrs['kind']}_bwd",
                  "body": bwd_body})
    by_name = {w: j for j, w in enumerate(wrt)}
    return [b.node(Op.GETITEM, (bwd,), {"index": by_name[n.attrs["name"]]})
            if n.attrs["name"] in by_name else None for n in ins]


# -- matmul --------------------------------------------------------------------------------------
@vjp(Op.MATMUL)
def _matmul(r):
    b, a, c = r.b, r.x(0), r.x(1)
    ga = r.g @ b.transpose(c, -2, -1)
    if c.rank == 2 and a.rank > 2:
        # a weight shared by every batch position: one [K, M*] @ [M*, N] contraction over the
        # flattened batch, rather than a batched product summed over the batch afterwards
        a2 = b.reshape(a, [-1, a.shape[-1]])
        g2 = b.reshape(r.g, [-1, r.g.shape[-1]])
        return [r.unbroadcast(ga, r.shape(0)), b.transpose(a2, -2, -1) @ g2]
    gc = b.transpose(a, -2, -1) @ r.g
    return [r.unbroadcast(ga, r.shape(0)), r.unbroadcast(gc, r.shape(1))]


# -- views ----------------------------------------------------------------------------------------
@vjp(Op.RESHAPE)
def _reshape(r):
    return [r.b.reshape(r.g, r.shape(0))]


@vjp(Op.PERMUTE)
def _permute(r):
    perm = r.attrs["perm"]
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return [r.b.permute(r.g, inv)]


@vjp(Op.EXPAND)
def _expand(r):
    return [r.unbroadcast(r.g, r.shape(0))]


@vjp(Op.SLICE)
def _slice(r):
    b, ax, shape = r.b, r.attrs["axis"], r.shape(0)
    start, stop, step = r.attrs["start"], r.attrs["stop"], r.attrs["step"]
    if step == 1:
        parts = []
        if not dims_equal(start, 0):
            parts.append(r.zeros([start if i == ax else d for i, d in enumerate(shape)]))
        parts.append(r.g)
        after = shape[ax] - stop
        if not dims_equal(after, 0):
            parts.append(r.zeros([after if i == ax else d for i, d in enumerate(shape)]))
        return [parts[0] if len(parts) == 1 else b.concat(parts, ax)]
    # strided: scatter the cotangent back to positions start, start+step, ...
    n = r.g.shape[ax]
    idx = b.iota(n) * step + start
    idx = b.reshape(idx, [n if i == ax else 1 for i in range(len(shape))])
    idx = b.expand(idx, r.g.shape)
    return [b.scatter_add(r.zeros(shape), idx, r.g, ax)]


@vjp(Op.CONCAT)
def _concat(r):
    ax, out, off = r.attrs["axis"], [], 0
    for i in range(len(r.node.inputs)):
        size = r.shape(i)[ax]
        out.append(r.b.slice(r.g, ax, off, off + size))
        off = off + size
    return out


# -- indexing -------------------------------------------------------------------------------------
@vjp(Op.EMBEDDING)
def _embedding(r):
    b = r.b
    table, ids = r.shape(0), r.x(1)
    n = 1
    for d in ids.shape:
        n = d * n
    idx = b.expand(b.reshape(ids, [n, 1]), [n, table[1]])
    g2 = b.reshape(r.g, [n, table[1]])
    return [b.scatter_add(r.zeros(table), idx, g2, 0), None]


@vjp(Op.GATHER)
def _gather(r):
    b, ax = r.b, r.attrs["axis"]
    xs, idx = r.shape(0), r.node.inputs[1]
    if dims_equal(idx.type.shape[ax], 1) and all(
            dims_equal(a, c) for d, (a, c) in enumerate(zip(idx.type.shape, xs)) if d != ax):
        # one index per row (the loss picking each target's logit): the cotangent lands where
        # iota along the axis equals the index. Pointwise, so it fuses into the kernel
        # computing the rest of x's gradient: no dense zeros + scatter of x's size.
        pos = b.reshape(b.iota(xs[ax], idx.type.dtype.value),
                        [d if i == ax else 1 for i, d in enumerate(xs)])
        return [b.where(b.eq(pos, r.x(1)), r.g, r.b.const(0.0, r.g.dtype)), None]
    return [b.scatter_add(r.zeros(xs), r.x(1), r.g, ax), None]


@vjp(Op.SCATTER_ADD)
def _scatter_add(r):
    return [r.g, None, r.b.gather(r.g, r.x(1), r.attrs["axis"])]


@vjp(Op.INDEX_COPY)
def _index_copy(r):
    # the written slices of x get no gradient; src gets the cotangent at the written slices
    b, ax, idx, src = r.b, r.attrs["axis"], r.x(1), r.shape(2)
    g_x = b.node(Op.INDEX_COPY, (r.g, idx, r.zeros(src)), {"axis": ax})
    at = b.expand(b.reshape(idx, [d if i == ax else 1 for i, d in enumerate(src)]), src)
    return [g_x, None, b.gather(r.g, at, ax)]


VJP[Op.TOPK] = lambda r: [None]
VJP[Op.STOP_GRADIENT] = lambda r: [None]


@vjp(Op.DROPOUT)
def _dropout(r):
    # the same seed draws the same mask: the VJP of dropout is dropout of the cotangent
    return [r.b.dropout(r.g, r.attrs["p"], r.x(1)), None]


@vjp(Op.GAUSSIAN_NOISE)
def _gaussian_noise(r):
    return [r.g, None]  # the noise is additive and independent of x


for _op in (Op.INPUT, Op.PARAM, Op.CONST, Op.IOTA, Op.CAUSAL_MASK):
    VJP[_op] = lambda r: []
