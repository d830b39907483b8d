"""`mixed_precision`: torch.autocast's policy written into the graph, so both backends (and
the generated kernels) run the same mixed-precision program.

    g16 = mixed_precision(g, "bf16")

- every float MATMUL reads its operands in the low-precision dtype (a CAST is inserted; a
  weight's cast is shared by its uses after CSE) and produces that dtype, accumulating in fp32;
- the ops torch.autocast runs in fp32 (exp, log, rsqrt, pow, softplus, a reciprocal
  `c / x`, sum, logsumexp, softmax, cumsum, cumprod), and a square `x * x` (torch code's
  `x.pow(2)`), read their low-precision inputs cast to fp32 and produce fp32: a norm's mean
  of squares and rstd, a softmax's probabilities and a running sum of log-decays keep
  fp32's range and precision (in f16 a norm's backward overflows: rstd**3 of activations
  ~0.02 is ~1e5 > 65,504, and the gradient of an f16 mean of squares is that, cast down; a
  bf16 prefix sum over thousands of tokens keeps 8 bits);
- a bias added to a product, `x @ W + b` (b a 1-D parameter), is added in the product's
  dtype: that is nn.Linear, and autocast's F.linear runs it so (without this rule a biased
  q, k, v projection would come out fp32 and its K cache too);
- every other op follows type promotion: when its float inputs differ, the narrower ones are
  cast up to the widest, except that a scalar constant takes the tensor's dtype (as a
  Python scalar does in torch) and so does a table computed from positions alone (RoPE's
  cos/sin, cast to q's dtype as Hugging Face's models do, so roped q, k and the K cache stay
  low precision);
- parameters stay fp32 (the optimizer's master weights), so their gradients are fp32: the
  autodiff pass differentiates the inserted casts like any op.

So, as under autocast, an fp32 value spreads by promotion (rstd times a bf16 activation is
fp32) until the next matmul casts it down. Other reductions (mean, amax) keep their input
dtype (the mean of an fp32 square is fp32) and accumulate in fp32 (the references and
kernels do);
the training loss casts the logits to fp32 itself (lmc/passes/loss.py). Position tables are
computed in fp32 and cast once where they meet activations.
"""
from __future__ import annotations

from typing import Dict, List

from ..errors import LmcError
from ..ir.graph import Graph, Node
from ..ir.ops import Op
from ..ir.types import DType

_WIDTH = {DType.f16: 1, DType.bf16: 1, DType.f32: 2, DType.f64: 3}
# torch.autocast's "ops that autocast to float32" (CUDA), as far as lmc has them
FP32_OPS = frozenset({Op.EXP, Op.LOG, Op.RSQRT, Op.POW, Op.SOFTPLUS, Op.SUM, Op.LOGSUMEXP,
                      Op.SOFTMAX, Op.CUMSUM, Op.CUMPROD})


def _square(n: Node) -> bool:
    """x * x: torch code's x.pow(2), on autocast's fp32 list."""
    return n.op is Op.MUL and len(n.inputs) == 2 and n.inputs[0] is n.inputs[1]


def mixed_precision(g: Graph, dtype: str = "bf16") -> Graph:
    low = DType.of(dtype)
    if low is DType.f32:
        return g
    if low not in (DType.bf16, DType.f16):
        raise LmcError(f"mixed precision computes in bf16 or f16, not {dtype}")
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    memo: Dict[tuple, Node] = {}

    def cast(x: Node, dt: DType, like: Node) -> Node:
        if x.type.dtype is dt:
            return x
        key = (x, dt)
        if key not in memo:
            if _is_literal(x):
                c = Node.make(Op.CONST, [], {**x.attrs, "dtype": dt.value}, x.loc, x.scope)
            elif x.op in _VIEWS and _WIDTH.get(dt, 9) < _WIDTH.get(x.type.dtype, 9):
                # narrowing a view: cast the viewed value and view it again (exact), so a
                # K cache holds GQA's kv heads, not their broadcast, and the producer's
                # kernel stores the narrow value
                c = Node.make(x.op, [cast(x.inputs[0], dt, like)], x.attrs, x.loc, x.scope)
            else:
                c = Node.make(Op.CAST, [x], {"dtype": dt.value}, like.loc, like.scope)
            nodes.append(c)
            memo[key] = c
            static[c] = static[x]
        return memo[key]

    static: Dict[Node, bool] = {}   # computed from constants and positions only
    for n in g.nodes:
        ins = [new[i] for i in n.inputs]
        floats = [x for x in ins if x.type.dtype.is_float]
        if n.op is Op.SCAN:  # a body graph typed as written: give it what it was built for
            ins = [cast(x, o.type.dtype, n) for x, o in zip(ins, n.inputs)]
        elif n.op is Op.MATMUL and all(x.type.dtype.is_float for x in ins):
            ins = [cast(x, low, n) for x in ins]
        elif n.op is Op.ADD and _linear_bias(ins, low):
            # x @ W + b is nn.Linear: autocast's F.linear adds the bias in the product's
            # dtype (cuBLAS's epilogue), so q, k, v of a biased projection stay low precision
            ins = [cast(x, low, n) for x in ins]
        elif n.op in FP32_OPS or (n.op is Op.DIV and _is_literal(ins[0])) or _square(n):
            ins = [cast(x, DType.f32, n) if _WIDTH.get(x.type.dtype, 9) < 2 else x
                   for x in ins]
        elif n.op is not Op.CAST and len({x.type.dtype for x in floats}) > 1:
            tensors = [x for x in floats if not _is_literal(x)]
            # tables computed from positions alone (RoPE's cos/sin) take the activation's
            # dtype, as Hugging Face's models cast them: otherwise every roped q and k, and
            # the decode K cache, would be fp32
            data = [x for x in tensors if not static[x]]
            target = max((x.type.dtype for x in (data or tensors or floats)), key=_WIDTH.get)
            ins = [cast(x, target, n) if x.type.dtype.is_float else x for x in ins]
        if tuple(ins) == n.inputs:
            c = n
        else:
            c = Node.make(n.op, ins, n.attrs, n.loc, n.scope)
            if n.op is Op.FUSED or n.op is Op.BLOCK:
                raise LmcError("mixed_precision runs on the primitive graph, before fusion")
        new[n] = c
        nodes.append(c)
        static[c] = n.op not in (Op.INPUT, Op.PARAM) and all(static[x] for x in ins)
    out = g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()})
    out.meta["precision"] = low.value
    return out


_VIEWS = (Op.PERMUTE, Op.RESHAPE, Op.EXPAND)


def _linear_bias(ins: List[Node], low: DType) -> bool:
    """ins = (x @ W, b) in either order: a low-precision product and a 1-D parameter as wide
    as its last axis (a bias)."""
    if len(ins) != 2:
        return False
    for mm, b in (ins, ins[::-1]):
        if mm.op is Op.MATMUL and mm.type.dtype is low and b.op is Op.PARAM and \
                b.type.rank == 1 and b.type.dtype.is_float and \
                b.type.shape[0] == mm.type.shape[-1]:
            return True
    return False


def _is_literal(n: Node) -> bool:
    return n.op is Op.CONST and n.type.rank == 0 and not hasattr(n.attrs["value"], "shape")


def low_precision_weights(graph: Graph, dtype: str = "bf16") -> Graph:
    """For inference (decode, `lmc bench`): the mixed-precision program with the parameters
    themselves stored in `dtype`, so a step reads 2 bytes per weight: a matmul's cast of its
    weight becomes the weight, an embedding gathers low-precision rows and widens them, any
    other use (a norm's weight) widens the parameter. f32: the graph unchanged."""
    low = DType.of(dtype)
    g = mixed_precision(graph, dtype)
    if low is DType.f32:
        return g
    nodes: List[Node] = []
    new: Dict[Node, Node] = {}
    low_p: Dict[Node, Node] = {}
    wide: Dict[Node, Node] = {}

    def add(n: Node) -> Node:
        nodes.append(n)
        return n

    def widen(p: Node) -> Node:
        if p not in wide:
            wide[p] = add(Node.make(Op.CAST, (low_p[p],), {"dtype": p.type.dtype}, p.loc,
                                    p.scope))
        return wide[p]

    for n in g.nodes:
        if n.op is Op.PARAM and n.type.dtype.is_float and n.type.dtype is not low:
            low_p[n] = add(Node.make(Op.PARAM, (), {**n.attrs, "dtype": low}, n.loc, n.scope))
            continue
        if n.op is Op.CAST and n.inputs[0] in low_p and DType.of(n.attrs["dtype"]) is low:
            new[n] = low_p[n.inputs[0]]
            continue
        if n.op is Op.EMBEDDING and n.inputs[0] in low_p:
            e = add(Node.make(Op.EMBEDDING, (low_p[n.inputs[0]], new[n.inputs[1]]), n.attrs,
                              n.loc, n.scope))
            new[n] = add(Node.make(Op.CAST, (e,), {"dtype": n.type.dtype}, n.loc, n.scope))
            continue
        ins = tuple(widen(x) if x in low_p else new[x] for x in n.inputs)
        new[n] = add(n if ins == n.inputs else Node.make(n.op, ins, n.attrs, n.loc, n.scope))
    return g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()})
