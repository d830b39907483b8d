"""The op table: every primitive, built through the Builder and run by the torch backend
(`run_graph` with dims from `bind_dims`), against an independently written expected result,
on hypothesis-drawn shapes with odd sizes.

Adding an op = adding a row to ROWS (tests/ops/test_registry.py fails otherwise). A row says

    inputs(S, p) -> [(shape, kind)]   the graph's inputs; S is the base shape, p the drawn params
    build(b, *tensors, S, p)          the op, made with a `Builder`
    expect(*values, s, p)             the expected result, without lmc (s: S at the bound sizes)
    params(S) -> strategy of dicts    what else to draw (axis, keepdim, bounds, ...)

Each row runs twice: on a static drawn shape, and (unless `sym=False`) as ONE graph declared
over [B, T, 63] that is run at several drawn (B, T). Every run checks the value against the
expectation (fp32 rtol = atol = 1e-5; exact for integer and bool results) and the runtime shape
and dtype against the node's TensorType evaluated at the bound dims.
"""
import math
from typing import Callable, List, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmc.frontend.builder import BlockDef, Builder
from lmc.ir.dims import Dim, evaluate
from lmc.ir.graph import Graph
from lmc.ir.ops import Kind, Op
from lmc.ops.reference import RefCtx
from lmc.passes.basic import inline
from lmc.runtime.executor import bind_dims, run_graph

B, T = Dim.sym("B"), Dim.sym("T")
NOP = lambda S: st.just({})  # noqa: E731


class Row(NamedTuple):
    op: Op
    variant: str
    inputs: Callable
    build: Callable
    expect: Callable
    params: Callable = NOP
    sym: bool = True          # the build depends only on S and p: one graph serves all B, T
    min_rank: int = 1
    training: bool = False


# -- input kinds -------------------------------------------------------------------------------
# "f": randn   "big": 30*randn   "pos": (0.1, 1.1)   "small": ints -2..2 as f32 (ties happen)
# "halves": k/2 as f32   "f16"/"bf16": randn in that dtype   "i": ints -3..3 as i64
# "ipos": 1..3 as i64   "bool"   ("int", hi[, dtype]): indices 0..hi-1 (hi may be symbolic)
def make(shape, kind, env, gen):
    if isinstance(kind, tuple):
        hi = evaluate(kind[1], env)
        return torch.randint(0, hi, shape, generator=gen).to(kind[2] if len(kind) > 2 else
                                                             torch.int64)
    if kind == "f":
        return torch.randn(shape, generator=gen)
    if kind == "big":
        return torch.randn(shape, generator=gen) * 30
    if kind == "pos":
        return torch.rand(shape, generator=gen) + 0.1
    if kind == "small":
        return torch.randint(-2, 3, shape, generator=gen).float()
    if kind == "halves":
        return torch.randint(-7, 8, shape, generator=gen).float() / 2
    if kind in ("f16", "bf16"):
        return torch.randn(shape, generator=gen).to(getattr(torch, {"f16": "float16",
                                                                    "bf16": "bfloat16"}[kind]))
    if kind == "i":
        return torch.randint(-3, 4, shape, generator=gen)
    if kind == "ipos":
        return torch.randint(1, 4, shape, generator=gen)
    if kind == "unit":  # -1, 0, 1 as i64: products never overflow
        return torch.randint(-1, 2, shape, generator=gen)
    if kind == "bool":
        return torch.randint(0, 2, shape, generator=gen).bool()
    raise ValueError(kind)


def dtype_of(kind):
    if isinstance(kind, tuple):
        return {torch.int64: "i64", torch.int32: "i32"}[kind[2] if len(kind) > 2 else torch.int64]
    return {"bool": "bool", "i": "i64", "ipos": "i64", "unit": "i64", "f16": "f16",
            "bf16": "bf16"}.get(kind, "f32")


# -- independent expectations (python floats, numpy, explicit loops) ----------------------------
def elementwise(fn, x):
    """Apply a Python float function to every element (computed in double)."""
    return torch.tensor([fn(v) for v in x.flatten().tolist()], dtype=torch.float64
                        ).reshape(x.shape)


def erf_ref(x):
    return elementwise(math.erf, x)


def along(x, axis, fn, keepdim=True):
    """Reduce along `axis` with a Python function of a list of floats."""
    xt = x.double().movedim(axis, -1)
    rows = xt.reshape(-1, xt.shape[-1]).tolist()
    out = torch.tensor([fn(r) for r in rows], dtype=torch.float64).reshape(*xt.shape[:-1], 1)
    out = out.movedim(-1, axis)
    return out if keepdim else out.squeeze(axis)


def scan(x, axis, fn):
    """Apply a list -> list Python function along `axis`."""
    xt = x.double().movedim(axis, -1)
    rows = [fn(r) for r in xt.reshape(-1, xt.shape[-1]).tolist()]
    return torch.tensor(rows, dtype=torch.float64).reshape(xt.shape).movedim(-1, axis)


def lse(v):
    m = max(v)
    return m + math.log(math.fsum(math.exp(a - m) for a in v))


def softmax_list(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    z = math.fsum(e)
    return [a / z for a in e]


def cumsum_list(v):
    out, acc = [], 0.0
    for a in v:
        acc += a
        out.append(acc)
    return out


def cumprod_list(v):
    out, acc = [], 1.0
    for a in v:
        acc *= a
        out.append(acc)
    return out


def _scan_step(b, h, x):
    hn = b.tanh(h * 0.5 + x)
    return hn, hn * 2.0


SCAN_STEP = BlockDef("step", _scan_step, ["h", "x"], {})


def _scan_build(b, x, S, p):
    """scan of the step along the drawn axis, from a zero carry; p["out"] picks ys or carry_T."""
    ax = p["axis"] % len(S)
    h0 = b.expand(b.const(0.0), [d for i, d in enumerate(S) if i != ax])
    return b.scan(SCAN_STEP, h0, x, p["axis"])[p["out"]]


def scan_ref(x, axis, out):
    """h_t = tanh(h_{t-1} / 2 + x_t) from h = 0; y_t = 2 h_t, stacked along `axis`."""
    xt = x.double().movedim(axis, 0)
    h, ys = torch.zeros(xt.shape[1:], dtype=torch.float64), []
    for v in xt:
        h = torch.tanh(h * 0.5 + v)
        ys.append(h * 2)
    return torch.stack(ys, 0).movedim(0, axis) if out == 0 else h


def topk_ref(x, k, axis):
    """Indices of the k largest along `axis`, ties to the lower index: sort by (-value, index)."""
    xt = x.movedim(axis, -1)
    rows = [sorted(range(len(r)), key=lambda i: (-r[i], i))[:k]
            for r in xt.reshape(-1, xt.shape[-1]).tolist()]
    return torch.tensor(rows, dtype=torch.int64).reshape(*xt.shape[:-1], k).movedim(-1, axis)


def causal_ref(rows, cols, window=0):
    """Row i is the query at position i + cols - rows; it sees keys at or before it (tril with
    that diagonal), and with a window only the last `window` of them."""
    d = cols - rows
    m = torch.ones(rows, cols, dtype=torch.bool).tril(d)
    if window:
        m &= ~torch.ones(rows, cols, dtype=torch.bool).tril(d - window)
    return m


def matmul_ref(x, y):
    return (x.double().unsqueeze(-1) * y.double().unsqueeze(-3)).sum(-2)


def gather_ref(x, idx, axis):
    return torch.from_numpy(np.take_along_axis(x.numpy(), idx.numpy().astype(np.int64), axis))


def scatter_add_ref(x, idx, src, axis):
    out = x.double().numpy().copy()
    where = list(np.indices(idx.shape))
    where[axis] = idx.numpy()
    np.add.at(out, tuple(where), src.double().numpy())
    return torch.from_numpy(out)


def slice_ref(x, axis, start, stop, step):
    sl = [slice(None)] * x.dim()
    sl[axis] = slice(start, stop, step)
    return torch.from_numpy(np.ascontiguousarray(x.numpy()[tuple(sl)]))


def np_ref(fn):
    """A view op's expectation computed by numpy on the values."""
    return lambda *a: torch.from_numpy(np.array(fn(*a)))


# -- drawn parameters ----------------------------------------------------------------------------
ODD = [1, 2, 3, 7, 8, 63, 64, 65]
SMALL = [1, 2, 3, 5, 7]


def axis_p(S, **more):
    return st.fixed_dictionaries({"axis": st.integers(-len(S), len(S) - 1), **more})


def reduce_p(S):
    return axis_p(S, keepdim=st.booleans())


def bcast_p(S):
    return st.fixed_dictionaries({"bcast": st.sampled_from(["same", "last", "col", "one",
                                                            "scalar"]),
                                  "swap": st.booleans()})


def bshape(S, how):
    """The second operand's shape for a broadcasting binary op."""
    return {"same": tuple(S), "last": tuple(S[-1:]), "col": tuple(S[:-1]) + (1,),
            "one": (1,) * len(S), "scalar": ()}[how]


@st.composite
def slice_p(draw, S):
    axis = draw(st.integers(-len(S), len(S) - 1))
    n = S[axis]
    if isinstance(n, Dim):  # symbolic length: step 1 and bounds valid for every T >= 1
        start, stop = draw(st.sampled_from([(0, None), (1, None), (0, -1), (-1, None)]))
        return {"axis": axis, "start": start, "stop": stop, "step": 1}
    a = draw(st.integers(0, n))
    c = draw(st.integers(a, n))
    start = draw(st.sampled_from([a, a - n]))          # negative bounds count from the end
    stop = draw(st.sampled_from([c, c - n, None] if c == n else [c, c - n]))
    if stop == 0 and c == n:
        stop = None
    return {"axis": axis, "start": start, "stop": stop, "step": draw(st.sampled_from([1, 2, 3]))}


@st.composite
def gather_p(draw, S):
    axis = draw(st.integers(-len(S), len(S) - 1))
    return {"axis": axis, "m": draw(st.sampled_from([1, 2, 5]))}


@st.composite
def index_copy_p(draw, S):
    axis = draw(st.integers(-len(S), len(S) - 1))
    n = S[axis]  # symbolic (T >= 1 at run time): one slice
    return {"axis": axis, "m": draw(st.integers(1, min(n, 5))) if isinstance(n, int) else 1}


def _last_reversed(b, S, p):
    """Index [n-1, n-2, ..., n-m] along the axis: distinct, and not the identity."""
    return b.iota(p["m"]) * -1 + b.const(S[p["axis"]] - 1, "i64")


def index_copy_ref(x, y, s, p):
    out = np.moveaxis(x.numpy().copy(), p["axis"], 0)
    src = np.moveaxis(y.numpy(), p["axis"], 0)
    for i in range(p["m"]):
        out[s[p["axis"]] - 1 - i] = src[i]
    return torch.from_numpy(np.moveaxis(out, 0, p["axis"]).copy())


@st.composite
def topk_p(draw, S):
    axis = draw(st.integers(-len(S), len(S) - 1))
    n = S[axis]
    return {"axis": axis, "k": 1 if isinstance(n, Dim) else draw(st.integers(1, n))}


@st.composite
def expand_p(draw, S):
    ones = [isinstance(d, int) and draw(st.booleans()) for d in S]
    return {"ones": ones, "lead": draw(st.sampled_from([(), (2,), (3, 1)]))}


@st.composite
def reshape_p(draw, S):
    hole = draw(st.integers(-1, len(S) - 1))  # -1: no hole
    return {"hole": hole}


def with_axis(S, axis, size):
    s = list(S)
    s[axis] = size
    return tuple(s)


def _reshape_target(S, p):
    tgt = list(reversed(S))
    if p["hole"] >= 0:
        tgt[p["hole"]] = -1
    return tgt


def un(op, name, expect, kind="f", variant="", **kw):
    return Row(op, variant, lambda S, p: [(S, kind)],
               lambda b, x, S, p: getattr(b, name)(x, **kw), lambda x, s, p: expect(x))


def binop(op, fn, expect, kinds=("f", "f"), variant=""):
    """A broadcasting binary row: the second operand's shape and the operand order are drawn."""
    def inputs(S, p):
        return [(S, kinds[0]), (bshape(S, p["bcast"]), kinds[1])]

    def build(b, x, y, S, p):
        return fn(b, y, x) if p["swap"] else fn(b, x, y)

    def exp(x, y, s, p):
        return expect(y, x) if p["swap"] else expect(x, y)
    return Row(op, variant, inputs, build, exp, bcast_p)


def maxi(x, y):
    return torch.where(x > y, x, y)


def mini(x, y):
    return torch.where(x < y, x, y)


ROWS: List[Row] = [
    # -- sources ----------------------------------------------------------------------------------
    Row(Op.INPUT, "", lambda S, p: [(S, "f")], lambda b, x, S, p: x, lambda x, s, p: x),
    Row(Op.PARAM, "", lambda S, p: [(S, "f")],
        lambda b, x, S, p: x * b.param("w", [S[-1]]), lambda x, w, s, p: x * w),
    Row(Op.CONST, "scalar", lambda S, p: [(S, "f")], lambda b, x, S, p: x + b.const(1.5),
        lambda x, s, p: x + 1.5),
    Row(Op.CONST, "tensor", lambda S, p: [(S, "f")],
        lambda b, x, S, p: x * b.const(torch.arange(S[-1], dtype=torch.float32)),
        lambda x, s, p: x * torch.tensor([float(i) for i in range(s[-1])])),
    Row(Op.CONST, "nested_list", lambda S, p: [],
        lambda b, S, p: b.const([[float(i + 3 * j) for i in range(3)] for j in range(2)]),
        lambda s, p: torch.tensor([[0.0, 1, 2], [3, 4, 5]]), sym=False),
    Row(Op.CONST, "int", lambda S, p: [(S, "i")], lambda b, x, S, p: x + 2,
        lambda x, s, p: x + 2),
    Row(Op.IOTA, "", lambda S, p: [(S, "f")],
        lambda b, x, S, p: x + b.cast(b.iota(S[-1]), "f32"),
        lambda x, s, p: x + torch.tensor([float(i) for i in range(s[-1])])),
    Row(Op.IOTA, "dtype", lambda S, p: [(S, "f")], lambda b, x, S, p: b.iota(S[0], p["dtype"]),
        lambda x, s, p: torch.tensor(list(range(s[0])), dtype=getattr(torch, p["dtype"])),
        lambda S: st.fixed_dictionaries({"dtype": st.sampled_from(["int64", "int32"])})),
    Row(Op.CAUSAL_MASK, "square", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.causal_mask(S[-2], window=p["window"]),
        lambda x, s, p: causal_ref(s[-2], s[-2], p["window"]),
        lambda S: st.fixed_dictionaries({"window": st.sampled_from([0, 1, 2, 5])}), min_rank=2),
    Row(Op.CAUSAL_MASK, "rows_lt_cols", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.causal_mask(S[-2], S[-2] + p["extra"], window=p["window"]),
        lambda x, s, p: causal_ref(s[-2], s[-2] + p["extra"], p["window"]),
        lambda S: st.fixed_dictionaries({"window": st.sampled_from([0, 1, 3]),
                                         "extra": st.sampled_from([1, 2, 7])}), min_rank=2),
    Row(Op.CAUSAL_MASK, "applied", lambda S, p: [((S[-2], S[-2]), "f")],
        lambda b, x, S, p: b.where(b.causal_mask(S[-2]), x, float("-inf")),
        lambda x, s, p: x.masked_fill(~causal_ref(s[-2], s[-2]), float("-inf")), min_rank=2),
    # -- unary ------------------------------------------------------------------------------------
    un(Op.NEG, "neg", lambda x: 0 - x),
    un(Op.NEG, "neg", lambda x: 0 - x, "i", "int"),
    un(Op.EXP, "exp", lambda x: elementwise(math.exp, x)),
    un(Op.LOG, "log", lambda x: elementwise(math.log, x), "pos"),
    un(Op.SQRT, "sqrt", lambda x: elementwise(math.sqrt, x), "pos"),
    un(Op.RSQRT, "rsqrt", lambda x: 1 / torch.sqrt(x.double()), "pos"),
    un(Op.SIGMOID, "sigmoid", lambda x: elementwise(lambda v: 1 / (1 + math.exp(-v)), x)),
    un(Op.TANH, "tanh", lambda x: elementwise(math.tanh, x)),
    un(Op.SILU, "silu", lambda x: elementwise(lambda v: v / (1 + math.exp(-v)), x)),
    un(Op.GELU, "gelu", lambda x: 0.5 * x * (1 + erf_ref(x / math.sqrt(2)))),
    un(Op.GELU, "gelu", lambda x: 0.5 * x * (1 + elementwise(
        lambda v: math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)), x)),
        variant="tanh", approximate="tanh"),
    un(Op.ERF, "erf", erf_ref),
    un(Op.SIN, "sin", lambda x: elementwise(math.sin, x)),
    un(Op.COS, "cos", lambda x: elementwise(math.cos, x)),
    un(Op.ABS, "abs", lambda x: torch.where(x < 0, -x, x)),
    un(Op.ABS, "abs", lambda x: torch.where(x < 0, -x, x), "i", "int"),
    un(Op.SIGN, "sign", lambda x: (x > 0).float() - (x < 0).float(), "small"),
    un(Op.SIGN, "sign", lambda x: (x > 0).long() - (x < 0).long(), "i", "int"),
    un(Op.ROUND, "round", lambda x: elementwise(lambda v: float(round(v)), x), "halves"),  # even
    un(Op.RELU, "relu", lambda x: torch.where(x > 0, x, torch.zeros(()))),
    # "big" inputs (30 * randn) reach |x| > 80, where a naive log(1 + exp(x)) overflows in fp32
    un(Op.SOFTPLUS, "softplus", lambda x: elementwise(lambda v: math.log(1 + math.exp(v)), x),
       "big"),
    un(Op.SOFTPLUS, "softplus", lambda x: elementwise(lambda v: math.log(1 + math.exp(v)), x),
       "bf16", "bf16"),
    un(Op.LOGSIGMOID, "logsigmoid",
       lambda x: elementwise(lambda v: -math.log(1 + math.exp(-v)), x), "big"),
    un(Op.LOGSIGMOID, "logsigmoid",
       lambda x: elementwise(lambda v: -math.log(1 + math.exp(-v)), x), "f", "small_range"),
    un(Op.STOP_GRADIENT, "stop_gradient", lambda x: x.clone()),
    un(Op.STOP_GRADIENT, "stop_gradient", lambda x: x.clone(), "i", "int"),
    un(Op.STOP_GRADIENT, "stop_gradient", lambda x: x.clone(), "bool", "bool"),
    un(Op.RELU, "relu", lambda x: x * (x > 0), "i", "int"),
    Row(Op.CLAMP, "", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.clamp(x, p["lo"], p["hi"]),
        lambda x, s, p: _clamp_ref(x, p["lo"], p["hi"]),
        lambda S: st.fixed_dictionaries({"lo": st.sampled_from([None, -0.5, 0.0]),
                                         "hi": st.sampled_from([None, 0.25, 1.0])})),
    Row(Op.CLAMP, "int", lambda S, p: [(S, "i")], lambda b, x, S, p: b.clamp(x, -1, 2),
        lambda x, s, p: _clamp_ref(x, -1, 2)),
    Row(Op.CAST, "", lambda S, p: [(S, p["src"])], lambda b, x, S, p: b.cast(x, p["dst"]),
        lambda x, s, p: _cast_ref(x, p["dst"]),
        lambda S: st.fixed_dictionaries({
            "src": st.sampled_from(["small", "i", "bool", "f"]),
            "dst": st.sampled_from(["f32", "f16", "bf16", "f64", "i64", "i32", "bool"])})),
    # -- binary (the second operand's shape and the order are drawn: broadcasting both ways) ----
    binop(Op.ADD, lambda b, x, y: x + y, lambda x, y: x + y),
    binop(Op.ADD, lambda b, x, y: x + y, lambda x, y: x + y, ("i", "i"), "int"),
    binop(Op.SUB, lambda b, x, y: x - y, lambda x, y: x + (-y)),
    binop(Op.SUB, lambda b, x, y: x - y, lambda x, y: x + (-y), ("i", "i"), "int"),
    binop(Op.MUL, lambda b, x, y: x * y, lambda x, y: x * y),
    binop(Op.MUL, lambda b, x, y: x * y, lambda x, y: x * y, ("i", "i"), "int"),
    binop(Op.DIV, lambda b, x, y: x / y, lambda x, y: x.double() * (1 / y.double()),
          ("pos", "pos")),
    binop(Op.POW, lambda b, x, y: b.pow(x, y),
          lambda x, y: torch.exp(y.double() * torch.log(x.double())), ("pos", "pos")),
    binop(Op.POW, lambda b, x, y: b.pow(x, y), lambda x, y: _int_pow(x, y), ("ipos", "ipos"),
          "int"),
    binop(Op.MAX, lambda b, x, y: b.maximum(x, y), maxi, ("small", "small")),
    binop(Op.MAX, lambda b, x, y: b.maximum(x, y), maxi, ("i", "i"), "int"),
    binop(Op.MIN, lambda b, x, y: b.minimum(x, y), mini, ("small", "small")),
    binop(Op.MIN, lambda b, x, y: b.minimum(x, y), mini, ("i", "i"), "int"),
    binop(Op.LT, lambda b, x, y: x < y, lambda x, y: ~(x >= y), ("small", "small")),
    binop(Op.LT, lambda b, x, y: x < y, lambda x, y: ~(x >= y), ("i", "i"), "int"),
    binop(Op.LE, lambda b, x, y: x <= y, lambda x, y: ~(x > y), ("small", "small")),
    binop(Op.GT, lambda b, x, y: x > y, lambda x, y: ~(x <= y), ("small", "small")),
    binop(Op.GE, lambda b, x, y: x >= y, lambda x, y: ~(x < y), ("small", "small")),
    binop(Op.EQ, lambda b, x, y: b.eq(x, y), lambda x, y: (x - y) == 0, ("small", "small")),
    binop(Op.EQ, lambda b, x, y: b.eq(x, y), lambda x, y: ~(x ^ y), ("bool", "bool"),
          "bool"),
    binop(Op.NE, lambda b, x, y: b.ne(x, y), lambda x, y: (x - y) != 0, ("small", "small")),
    Row(Op.WHERE, "", lambda S, p: [(bshape(S, p["c"]), "bool"), (S, "f"),
                                    (bshape(S, p["y"]), "f")],
        lambda b, c, x, y, S, p: b.where(c, x, y),
        lambda c, x, y, s, p: c * x + (~c) * y,
        lambda S: st.fixed_dictionaries({"c": st.sampled_from(["same", "last", "col", "one"]),
                                         "y": st.sampled_from(["same", "last", "scalar"])})),
    Row(Op.WHERE, "scalar_branches", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.where(x > 0.0, 1.0, -2.0),
        lambda x, s, p: (x > 0).float() * 3 - 2),
    # -- reductions and scans: every axis, keepdim both ways ---------------------------------------
    Row(Op.SUM, "", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.sum(x, p["axis"], keepdim=p["keepdim"]),
        lambda x, s, p: along(x, p["axis"], math.fsum, p["keepdim"]), reduce_p),
    Row(Op.SUM, "int", lambda S, p: [(S, "i")],
        lambda b, x, S, p: b.sum(x, p["axis"], keepdim=p["keepdim"]),
        lambda x, s, p: along(x, p["axis"], sum, p["keepdim"]).long(), reduce_p),
    Row(Op.SUM, "f16", lambda S, p: [(S, "f16")],
        lambda b, x, S, p: b.sum(x, p["axis"], keepdim=p["keepdim"]),
        lambda x, s, p: along(x, p["axis"], math.fsum, p["keepdim"]), reduce_p),
    Row(Op.MEAN, "", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.mean(x, p["axis"], keepdim=p["keepdim"]),
        lambda x, s, p: along(x, p["axis"], lambda v: math.fsum(v) / len(v), p["keepdim"]),
        reduce_p),
    Row(Op.AMAX, "", lambda S, p: [(S, "small")],
        lambda b, x, S, p: b.amax(x, p["axis"], keepdim=p["keepdim"]),
        lambda x, s, p: along(x, p["axis"], max, p["keepdim"]), reduce_p),
    Row(Op.AMAX, "int", lambda S, p: [(S, "i")],
        lambda b, x, S, p: b.amax(x, p["axis"], keepdim=p["keepdim"]),
        lambda x, s, p: along(x, p["axis"], max, p["keepdim"]).long(), reduce_p),
    Row(Op.LOGSUMEXP, "", lambda S, p: [(S, "big")],
        lambda b, x, S, p: b.logsumexp(x, p["axis"], keepdim=p["keepdim"]),
        lambda x, s, p: along(x, p["axis"], lse, p["keepdim"]), reduce_p),
    Row(Op.SOFTMAX, "", lambda S, p: [(S, "big")], lambda b, x, S, p: b.softmax(x, p["axis"]),
        lambda x, s, p: scan(x, p["axis"], softmax_list), axis_p),
    Row(Op.SOFTMAX, "masked", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.softmax(b.where(b.causal_mask(S[-2], S[-1]), x, float("-inf"))),
        lambda x, s, p: scan(x.masked_fill(~causal_ref(s[-2], s[-1]), float("-inf")), -1,
                             softmax_list), min_rank=2),
    Row(Op.SOFTMAX, "bf16", lambda S, p: [(S, "bf16")], lambda b, x, S, p: b.softmax(x, -1),
        lambda x, s, p: scan(x, -1, softmax_list)),
    Row(Op.CUMSUM, "", lambda S, p: [(S, "f")], lambda b, x, S, p: b.cumsum(x, p["axis"]),
        lambda x, s, p: scan(x, p["axis"], cumsum_list), axis_p),
    Row(Op.CUMSUM, "int", lambda S, p: [(S, "i")], lambda b, x, S, p: b.cumsum(x, p["axis"]),
        lambda x, s, p: scan(x, p["axis"], cumsum_list).long(), axis_p),
    Row(Op.CUMPROD, "", lambda S, p: [(S, "f")], lambda b, x, S, p: b.cumprod(x, p["axis"]),
        lambda x, s, p: scan(x, p["axis"], cumprod_list), axis_p),
    Row(Op.CUMPROD, "zeros", lambda S, p: [(S, "small")],   # -2..2: zeros and exact products
        lambda b, x, S, p: b.cumprod(x, p["axis"]),
        lambda x, s, p: scan(x, p["axis"], cumprod_list), axis_p),
    Row(Op.CUMPROD, "int", lambda S, p: [(S, "unit")], lambda b, x, S, p: b.cumprod(x, p["axis"]),
        lambda x, s, p: scan(x, p["axis"], cumprod_list).long(), axis_p),
    Row(Op.SCAN, "", lambda S, p: [(S, "f")], _scan_build,
        lambda x, s, p: scan_ref(x, p["axis"], p["out"]),
        lambda S: axis_p(S, out=st.sampled_from([0, 1]))),
    # -- matmul -----------------------------------------------------------------------------------
    Row(Op.MATMUL, "", lambda S, p: [(S, "f"), ((S[-1], p["n"]), "f")],
        lambda b, x, y, S, p: x @ y, lambda x, y, s, p: matmul_ref(x, y),
        lambda S: st.fixed_dictionaries({"n": st.sampled_from(ODD)}), min_rank=2),
    Row(Op.MATMUL, "batched", lambda S, p: [(S, "f"), (S[:-2] + (S[-1], p["n"]), "f")],
        lambda b, x, y, S, p: x @ y, lambda x, y, s, p: matmul_ref(x, y),
        lambda S: st.fixed_dictionaries({"n": st.sampled_from(SMALL)}), min_rank=3),
    Row(Op.MATMUL, "broadcast_batch",
        lambda S, p: [((2, 1) + tuple(S[-2:]), "f"), ((3, S[-1], p["n"]), "f")],
        lambda b, x, y, S, p: x @ y, lambda x, y, s, p: matmul_ref(x, y),
        lambda S: st.fixed_dictionaries({"n": st.sampled_from(SMALL)}), min_rank=2),
    Row(Op.MATMUL, "transposed", lambda S, p: [(S, "f"), (S, "f")],
        lambda b, x, y, S, p: x @ b.transpose(y), lambda x, y, s, p: matmul_ref(
            x, torch.from_numpy(np.ascontiguousarray(np.swapaxes(y.numpy(), -1, -2)))),
        min_rank=2),
    # -- views ------------------------------------------------------------------------------------
    Row(Op.RESHAPE, "reversed", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.reshape(x, _reshape_target(S, p)),
        lambda x, s, p: np_ref(lambda v: v.numpy().reshape(tuple(reversed(s))))(x), reshape_p),
    Row(Op.RESHAPE, "flatten_lead", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.reshape(x, [-1, S[-1]]),
        lambda x, s, p: np_ref(lambda v: v.numpy().reshape(-1, s[-1]))(x)),
    Row(Op.RESHAPE, "split_last", lambda S, p: [(tuple(S[:-1]) + (2 * S[-1],), "f")],
        lambda b, x, S, p: b.reshape(x, list(S[:-1]) + [2, -1]),
        lambda x, s, p: torch.stack([x[..., : s[-1]], x[..., s[-1]:]], -2)),
    Row(Op.RESHAPE, "index_squeeze", lambda S, p: [(S, "f")], lambda b, x, S, p: x[..., -1],
        lambda x, s, p: np_ref(lambda v: v.numpy()[..., -1])(x)),
    Row(Op.PERMUTE, "", lambda S, p: [(S, "f")], lambda b, x, S, p: b.permute(x, p["perm"]),
        lambda x, s, p: np_ref(lambda v: np.transpose(v.numpy(), [a % len(s)
                                                                  for a in p["perm"]]))(x),
        lambda S: st.permutations(range(len(S))).flatmap(
            lambda perm: st.lists(st.booleans(), min_size=len(S), max_size=len(S)).map(
                lambda neg: {"perm": [a - len(S) if n else a for a, n in zip(perm, neg)]}))),
    Row(Op.EXPAND, "", lambda S, p: [(tuple(1 if o else d for d, o in zip(S, p["ones"])), "f")],
        lambda b, x, S, p: b.expand(x, p["lead"] + tuple(S)),
        lambda x, s, p: np_ref(lambda v: np.broadcast_to(v.numpy(), p["lead"] + tuple(s)))(x),
        expand_p),
    Row(Op.SLICE, "", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.slice(x, p["axis"], p["start"], p["stop"], p["step"]),
        lambda x, s, p: slice_ref(x, p["axis"], p["start"], p["stop"], p["step"]), slice_p),
    Row(Op.SLICE, "getitem", lambda S, p: [(S, "f")], lambda b, x, S, p: x[..., 1:, :-1:2],
        lambda x, s, p: np_ref(lambda v: v.numpy()[..., 1:, :-1:2])(x), min_rank=2,
        sym=False),
    Row(Op.SLICE, "shift", lambda S, p: [(S, "f")],
        lambda b, x, S, p: x[:, 1:] - x[:, :-1],
        lambda x, s, p: x[:, 1:] - x[:, :-1], min_rank=2),
    Row(Op.CONCAT, "", lambda S, p: [(S, "f"), (with_axis(S, p["axis"], p["k"]), "f"),
                                     (S, "f")],
        lambda b, x, y, z, S, p: b.concat([x, y, z], p["axis"]),
        lambda x, y, z, s, p: np_ref(lambda *v: np.concatenate([a.numpy() for a in v],
                                                               p["axis"]))(x, y, z),
        lambda S: axis_p(S, k=st.sampled_from([1, 2, 7]))),
    Row(Op.CONCAT, "single", lambda S, p: [(S, "f")], lambda b, x, S, p: b.concat([x], 0),
        lambda x, s, p: x),
    # -- indexing ---------------------------------------------------------------------------------
    Row(Op.EMBEDDING, "", lambda S, p: [((p["v"], p["d"]), "f"),
                                        (S, ("int", p["v"], p["ids"]))],
        lambda b, t, i, S, p: b.embedding(t, i),
        lambda t, i, s, p: torch.from_numpy(t.numpy()[i.numpy()]),
        lambda S: st.fixed_dictionaries({"v": st.sampled_from([1, 2, 11, 65]),
                                         "d": st.sampled_from([1, 3, 8]),
                                         "ids": st.sampled_from([torch.int64, torch.int32])})),
    Row(Op.GATHER, "", lambda S, p: [(S, "f"), (with_axis(S, p["axis"], p["m"]),
                                                ("int", S[p["axis"]]))],
        lambda b, x, i, S, p: b.gather(x, i, p["axis"]),
        lambda x, i, s, p: gather_ref(x, i, p["axis"]), gather_p),
    Row(Op.SCATTER_ADD, "", lambda S, p: [(S, "f"), (with_axis(S, p["axis"], p["m"]),
                                                     ("int", S[p["axis"]])),
                                          (with_axis(S, p["axis"], p["m"]), "f")],
        lambda b, x, i, y, S, p: b.scatter_add(x, i, y, p["axis"]),
        lambda x, i, y, s, p: scatter_add_ref(x, i, y, p["axis"]), gather_p),
    Row(Op.INDEX_COPY, "", lambda S, p: [(S, "f"), (with_axis(S, p["axis"], p["m"]), "f")],
        lambda b, x, y, S, p: b.node(Op.INDEX_COPY, (x, _last_reversed(b, S, p), y),
                                     {"axis": p["axis"]}),
        lambda x, y, s, p: index_copy_ref(x, y, s, p), index_copy_p),
    Row(Op.TOPK, "", lambda S, p: [(S, "small")], lambda b, x, S, p: b.topk(x, p["k"], p["axis"]),
        lambda x, s, p: topk_ref(x, p["k"], p["axis"]), topk_p),
    Row(Op.TOPK, "values", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.gather(x, b.topk(x, 1), -1),
        lambda x, s, p: along(x, -1, max)),
    # -- random: eval mode is the identity, and so is p = 0 in training --------------------------
    Row(Op.DROPOUT, "eval", lambda S, p: [(S, "f")], lambda b, x, S, p: b.dropout(x, 0.5, 3),
        lambda x, s, p: x),
    Row(Op.DROPOUT, "train_p0", lambda S, p: [(S, "f")], lambda b, x, S, p: b.dropout(x, 0.0, 3),
        lambda x, s, p: x, training=True),
    Row(Op.GAUSSIAN_NOISE, "eval", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.gaussian_noise(x, 0.5, 3), lambda x, s, p: x),
    Row(Op.GAUSSIAN_NOISE, "train_std0", lambda S, p: [(S, "f")],
        lambda b, x, S, p: b.gaussian_noise(x, 0.0, 3), lambda x, s, p: x, training=True),
]


def _clamp_ref(x, lo, hi):
    y = x
    if lo is not None:
        y = torch.where(y < lo, torch.full_like(y, lo), y)
    if hi is not None:
        y = torch.where(y > hi, torch.full_like(y, hi), y)
    return y


def _cast_ref(x, dst):
    if dst == "bool":
        return torch.tensor([v != 0 for v in x.flatten().tolist()],
                            dtype=torch.bool).reshape(x.shape)
    if dst in ("i64", "i32"):  # truncation toward zero
        return torch.tensor([int(v) for v in x.flatten().tolist()]).reshape(x.shape)
    return torch.tensor([float(v) for v in x.flatten().tolist()],
                        dtype=torch.float64).reshape(x.shape)


def _int_pow(x, y):
    x, y = torch.broadcast_tensors(x, y)
    return torch.tensor([a ** b for a, b in zip(x.flatten().tolist(), y.flatten().tolist())],
                        dtype=torch.int64).reshape(x.shape)


# -- the runner -----------------------------------------------------------------------------------
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def build(row: Row, S, p):
    b = Builder(config={}, blocks={})
    specs = row.inputs(S, p)
    ins = [b.input(f"in{k}", shape, dtype_of(kind)) for k, (shape, kind) in enumerate(specs)]
    out = row.build(b, *ins, S, p)
    return Graph(row.op.value, b.nodes, {"out": out.node}), specs


def check(row: Row, S, p, runs):
    """Build the row once over the declared shape S; run it at each (env, seed) in `runs`."""
    g, specs = build(row, S, p)
    assert any(n.op is row.op for n in g.nodes), f"the row never builds a {row.op.value} node"
    node_t = g.outputs["out"].type
    for env, seed in runs:
        gen = torch.Generator().manual_seed(seed)
        vals = [make(tuple(evaluate(d, env) for d in shape), kind, env, gen)
                for shape, kind in specs]
        bound = {f"in{k}": v for k, v in enumerate(vals)}
        pvals = []
        for n in g.params:
            pvals.append(torch.randn(n.type.concrete(env), generator=gen))
            bound[n.attrs["name"]] = pvals[-1]
        dims = bind_dims(g, bound)
        assert {k: v for k, v in env.items() if k in dims} == dims
        got = run_graph(g, bound, RefCtx(dims=dims, training=row.training))["out"]
        s = tuple(evaluate(d, env) for d in S)
        want = row.expect(*vals, *pvals, s, p)
        # (b) the runtime tensor is what the node's type says, at the bound dims
        assert tuple(got.shape) == node_t.concrete(dims), (tuple(got.shape), str(node_t), env)
        assert got.dtype == node_t.dtype.torch(), (got.dtype, str(node_t))
        # (a) the value is the independent expectation
        assert tuple(want.shape) == tuple(got.shape), (tuple(want.shape), tuple(got.shape))
        if got.dtype.is_floating_point:
            tol = TOL[got.dtype]
            torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol,
                                       equal_nan=True)
        else:
            assert torch.equal(got, want.to(got.dtype)), (got, want)


IDS = [f"{r.op.value}{'-' + r.variant if r.variant else ''}" for r in ROWS]


@st.composite
def shapes(draw, min_rank=1):
    rank = draw(st.integers(min_rank, 3))
    s = draw(st.lists(st.sampled_from(ODD), min_size=rank, max_size=rank)
             .filter(lambda s: math.prod(s) <= 4160))
    return tuple(s)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_op_matches_independent_torch(row, data):
    S = data.draw(shapes(max(row.min_rank, 1)), "shape")
    p = data.draw(row.params(S), "params")
    check(row, S, p, [({}, data.draw(st.integers(0, 2**31 - 1), "seed"))])


SYM = (B, T, 63)
ENVS = st.lists(st.fixed_dictionaries({"B": st.sampled_from([1, 2, 3]),
                                       "T": st.sampled_from([1, 2, 3, 7, 63, 64, 65])}),
                min_size=3, max_size=3)


@pytest.mark.parametrize("row", [r for r in ROWS if r.sym], ids=[i for r, i in zip(ROWS, IDS)
                                                               if r.sym])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_one_graph_serves_several_sizes(row, data):
    """Declared over [B, T, 63]: one graph, run at several (B, T)."""
    p = data.draw(row.params(SYM), "params")
    envs = data.draw(ENVS, "sizes")
    check(row, SYM, p, [(env, i) for i, env in enumerate(envs)])


def test_symbolic_rows_really_are_symbolic():
    g, _ = build(ROWS[IDS.index("softmax-masked")], SYM, {})
    assert g.outputs["out"].type.shape == (B, T, 63)
    assert not g.outputs["out"].type.is_static()


# -- dropout in training mode ---------------------------------------------------------------------
def _dropout_graph(p, shape=(B, T, 63)):
    b = Builder(config={}, blocks={})
    x = b.input("x", shape, "f32")
    seed = b.input("seed", (), "i64")
    return Graph("dropout", b.nodes, {"out": b.dropout(x, p, seed).node})


def _run_dropout(g, x, seed, training=True):
    bound = {"x": x, "seed": torch.tensor(seed)}
    return run_graph(g, bound, RefCtx(dims=bind_dims(g, bound), training=training))["out"]


@settings(max_examples=10, deadline=None)
@given(p=st.sampled_from([0.1, 0.25, 0.5, 0.9]), seed=st.integers(0, 2**31 - 1),
       bt=st.sampled_from([(1, 65), (3, 7), (2, 64)]))
def test_dropout_training(p, seed, bt):
    g = _dropout_graph(p)
    x = torch.rand(bt + (63,), generator=torch.Generator().manual_seed(seed)) + 0.5  # nonzero
    y = _run_dropout(g, x, seed)
    assert y.shape == x.shape and y.dtype == x.dtype
    # deterministic for a seed, different for another
    assert torch.equal(y, _run_dropout(g, x, seed))
    assert not torch.equal(y, _run_dropout(g, x, seed + 1))
    # kept values are scaled by 1/(1-p), dropped ones are exactly 0
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    # the zero fraction is p, within 5 binomial standard deviations
    n = x.numel()
    assert abs((~kept).sum().item() / n - p) <= 5 * math.sqrt(p * (1 - p) / n)
    # eval mode: identity
    assert torch.equal(_run_dropout(g, x, seed, training=False), x)


def test_dropout_mask_depends_only_on_seed_and_shape():
    g = _dropout_graph(0.5, (4, 63))
    x1, x2 = torch.rand(4, 63) + 1, torch.rand(4, 63) + 1
    assert torch.equal(_run_dropout(g, x1, 7) == 0, _run_dropout(g, x2, 7) == 0)


# -- gaussian noise in training mode ---------------------------------------------------------------
def _noise_graph(std, shape=(B, T, 63)):
    b = Builder(config={}, blocks={})
    x = b.input("x", shape, "f32")
    seed = b.input("seed", (), "i64")
    return Graph("noise", b.nodes, {"out": b.gaussian_noise(x, std, seed).node})


@settings(max_examples=10, deadline=None)
@given(std=st.sampled_from([0.01, 0.3, 1.0, 5.0]), seed=st.integers(0, 2**31 - 1),
       bt=st.sampled_from([(1, 65), (3, 7), (2, 64)]))
def test_gaussian_noise_training(std, seed, bt):
    g = _noise_graph(std)
    x = torch.randn(bt + (63,), generator=torch.Generator().manual_seed(seed))
    y = _run_dropout(g, x, seed)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, _run_dropout(g, x, seed))             # deterministic for a seed
    assert not torch.equal(y, _run_dropout(g, x, seed + 1))     # another seed, other noise
    z = ((y.double() - x.double()) / std).flatten()
    n = z.numel()
    # N(0, 1): the mean within 5 standard errors, the variance within 5 of its standard errors
    assert abs(z.mean().item()) <= 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) <= 5 * math.sqrt(2 / (n - 1))
    assert torch.equal(_run_dropout(g, x, seed, training=False), x)  # eval: identity


def test_gaussian_noise_depends_only_on_seed_and_shape():
    g = _noise_graph(0.5, (4, 63))
    x1, x2 = torch.randn(4, 63), torch.randn(4, 63)
    torch.testing.assert_close(_run_dropout(g, x1, 7) - x1, _run_dropout(g, x2, 7) - x2,
                               rtol=0, atol=1e-6)


# -- the structural ops: BLOCK and GETITEM, made by Builder.call, removed by inline ------------
def _mlp(b, x, *, d, f):
    w1, w2 = b.param("w1", [d, f]), b.param("w2", [f, d])
    h = b.relu(x @ w1)
    return h @ w2, b.sum(h, -1)          # two outputs: two GETITEMs


def _outer(b, x, *, d):
    y, s = b.call("mlp", x, f=5)        # a block calling a block
    return y * s + x


BLOCKS = {"mlp": BlockDef("mlp", _mlp, ["x"], {"f": 4}, required=["d"]),
          "outer": BlockDef("outer", _outer, ["x"], {}, required=["d"])}


def _block_model():
    b = Builder(config={"d": 6}, blocks=BLOCKS)
    x = b.input("x", (B, T, 6), "f32")
    y1 = b.call("outer", x)
    y2 = b.call("outer", y1)              # a second instance: its own params
    return Graph("m", b.nodes, {"out": y2.node}), b.params


def _expected(x, P):
    def mlp(x, pre):
        h = torch.clamp_min(matmul_ref(x, P[pre + ".w1"]), 0)
        return matmul_ref(h, P[pre + ".w2"]), h.sum(-1, keepdim=True)

    def outer(x, pre):
        y, s = mlp(x, pre + ".mlp")
        return y * s + x
    return outer(outer(x.double(), "outer"), "outer_1")


@pytest.mark.parametrize("bt", [(1, 1), (2, 7), (3, 65)])
def test_block_and_getitem_via_call_and_inline(bt):
    g, params = _block_model()
    assert sorted(params) == ["outer.mlp.w1", "outer.mlp.w2", "outer_1.mlp.w1", "outer_1.mlp.w2"]
    assert {n.op for n in g.nodes} >= {Op.BLOCK, Op.GETITEM}
    blk = next(n for n in g.nodes if n.op is Op.BLOCK)
    assert blk.type == (g.outputs["out"].type,)           # a tuple of its outputs' types
    gen = torch.Generator().manual_seed(bt[1])
    P = {name: 0.3 * torch.randn(n.type.concrete({}), generator=gen)
         for name, n in params.items()}
    x = torch.randn(bt + (6,), generator=gen)
    want = _expected(x, P)
    # run with the BLOCK nodes in place (params reach the bodies through the context) ...
    dims = bind_dims(g, {"x": x})
    nested = run_graph(g, {"x": x}, RefCtx(dims=dims, params=P))["out"]
    # ... and after inlining, where no structural node remains and params are graph nodes
    flat = inline(g)
    assert not any(n.op.kind is Kind.STRUCTURAL for n in flat.nodes)
    assert sorted(n.attrs["name"] for n in flat.params) == sorted(P)
    got = run_graph(flat, {"x": x, **P}, RefCtx(dims=bind_dims(flat, {"x": x, **P})))["out"]
    for out in (nested, got):
        assert tuple(out.shape) == flat.outputs["out"].type.concrete(dims) == bt + (6,)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(nested, got)
