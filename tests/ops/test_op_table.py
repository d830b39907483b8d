"""The op table: every primitive, built through the Builder and run by the torch backend,
against an independently written torch expression, on hypothesis-drawn shapes with odd sizes.

Adding an op = adding a row here (tests/ops/test_registry.py fails otherwise).
A row: the op, a variant name, the inputs it takes (from the drawn shape s), how to build it,
and the expected result computed without lmc.
"""
import math
from typing import Callable, List, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.runtime.executor import bind_dims, run_graph


class Row(NamedTuple):
    op: Op
    variant: str
    inputs: Callable      # s -> [(shape, kind)]   kind: f | pos | small | bool | int:N
    build: Callable       # (b, *tensors, s) -> Tensor
    expect: Callable      # (*values, s) -> torch.Tensor


def F(s): return [(s, "f")]
def FF(s): return [(s, "f"), (s, "f")]
def FB(s): return [(s, "f"), (s[-1:], "f")]      # broadcast the last axis
def SS(s): return [(s, "small"), (s, "small")]   # small integers as floats: ties happen


def un(op, name, expect, kind="f", **kw):
    return Row(op, "", lambda s: [(s, kind)], lambda b, x, s: getattr(b, name)(x, **kw),
               lambda x, s: expect(x))


def erf_ref(x):
    return torch.tensor([math.erf(v) for v in x.flatten().tolist()]).reshape(x.shape)


def topk_ref(x, k):
    # ties to the lower index: sort (value desc, index asc) explicitly
    flat = x.reshape(-1, x.shape[-1])
    rows = []
    for r in flat.tolist():
        order = sorted(range(len(r)), key=lambda i: (-r[i], i))[:k]
        rows.append(order)
    return torch.tensor(rows).reshape(*x.shape[:-1], k)


def causal_ref(rows, cols, window=0):
    m = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        pos = i + cols - rows
        for j in range(cols):
            m[i, j] = j <= pos and (window == 0 or j > pos - window)
    return m


PARAM_VALUE = [None]


def np_log(x):
    return torch.tensor([math.log(v) for v in x.flatten().tolist()]).reshape(x.shape)


def _lse(v):
    m = max(v)
    return m + math.log(sum(math.exp(a - m) for a in v))


def _fold(x, axis, fn):
    """Reduce along `axis` with a Python function over lists (keepdim)."""
    xt = x.movedim(axis, -1)
    flat = xt.reshape(-1, xt.shape[-1]).tolist()
    out = torch.tensor([fn(r) for r in flat], dtype=x.dtype).reshape(*xt.shape[:-1], 1)
    return out.movedim(-1, axis)


def _softmax(x, axis):
    def sm(r):
        m = max(r)
        e = [math.exp(a - m) for a in r]
        return [a / sum(e) for a in e]
    xt = x.movedim(axis, -1)
    flat = [sm(r) for r in xt.reshape(-1, xt.shape[-1]).tolist()]
    return torch.tensor(flat).reshape(xt.shape).movedim(-1, axis)


def _cumsum(x):
    flat = x.reshape(-1, x.shape[-1]).tolist()
    out = [[sum(r[: i + 1]) for i in range(len(r))] for r in flat]
    return torch.tensor(out).reshape(x.shape)


def _matmul(x, y):
    return (x.unsqueeze(-1) * y.unsqueeze(-3)).sum(-2)


def _gather(x, i):
    out = torch.empty_like(x)
    fx, fi, fo = x.reshape(-1, x.shape[-1]), i.reshape(-1, i.shape[-1]), out.view(-1, x.shape[-1])
    for r in range(fx.shape[0]):
        for c in range(fi.shape[1]):
            fo[r, c] = fx[r, fi[r, c]]
    return out


def _scatter(x, i, y):
    out = x.clone()
    fo, fi, fy = out.view(-1, x.shape[-1]), i.reshape(-1, i.shape[-1]), y.reshape(-1, x.shape[-1])
    for r in range(fo.shape[0]):
        for c in range(fi.shape[1]):
            fo[r, fi[r, c]] += fy[r, c]
    return out


ROWS: List[Row] = [
    # sources
    Row(Op.INPUT, "", F, lambda b, x, s: x, lambda x, s: x),
    Row(Op.PARAM, "", F, lambda b, x, s: x * b.param("w", list(s)),
        lambda x, s: x * PARAM_VALUE[0]),
    Row(Op.CONST, "", F, lambda b, x, s: x + b.const(1.5), lambda x, s: x + 1.5),
    Row(Op.IOTA, "", F, lambda b, x, s: x + b.cast(b.iota(s[-1]), "f32"),
        lambda x, s: x + torch.tensor(list(range(s[-1])), dtype=torch.float32)),
    Row(Op.CAUSAL_MASK, "", lambda s: [((s[-1], s[-1]), "f")],
        lambda b, x, s: b.where(b.causal_mask(s[-1]), x, 0.0),
        lambda x, s: x * causal_ref(s[-1], s[-1])),
    Row(Op.CAUSAL_MASK, "window_offset", lambda s: [((2, s[-1] + 2), "f")],
        lambda b, x, s: b.where(b.causal_mask(2, s[-1] + 2, window=3), x, 0.0),
        lambda x, s: x * causal_ref(2, s[-1] + 2, 3)),
    # unary
    un(Op.NEG, "neg", lambda x: 0 - x),
    un(Op.EXP, "exp", lambda x: math.e ** x),
    un(Op.LOG, "log", np_log, "pos"),
    un(Op.SQRT, "sqrt", lambda x: x ** 0.5, "pos"),
    un(Op.RSQRT, "rsqrt", lambda x: 1 / x ** 0.5, "pos"),
    un(Op.SIGMOID, "sigmoid", lambda x: 1 / (1 + math.e ** -x)),
    un(Op.TANH, "tanh", lambda x: (math.e ** (2 * x) - 1) / (math.e ** (2 * x) + 1)),
    un(Op.SILU, "silu", lambda x: x / (1 + math.e ** -x)),
    un(Op.GELU, "gelu", lambda x: 0.5 * x * (1 + erf_ref(x / math.sqrt(2)))),
    Row(Op.GELU, "tanh", F, lambda b, x, s: b.gelu(x, approximate="tanh"),
        lambda x, s: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
    un(Op.ERF, "erf", erf_ref),
    un(Op.SIN, "sin", lambda x: torch.tensor([math.sin(v) for v in x.flatten().tolist()]
                                              ).reshape(x.shape)),
    un(Op.COS, "cos", lambda x: torch.tensor([math.cos(v) for v in x.flatten().tolist()]
                                              ).reshape(x.shape)),
    un(Op.ABS, "abs", lambda x: torch.where(x < 0, -x, x)),
    un(Op.SIGN, "sign", lambda x: (x > 0).float() - (x < 0).float(), "small"),
    un(Op.ROUND, "round", lambda x: torch.tensor([float(round(v)) for v in x.flatten().tolist()]
                                                  ).reshape(x.shape)),  # half to even
    un(Op.RELU, "relu", lambda x: torch.where(x > 0, x, torch.zeros(()))),
    Row(Op.CLAMP, "", F, lambda b, x, s: b.clamp(x, -0.5, 0.25),
        lambda x, s: torch.minimum(torch.maximum(x, torch.tensor(-0.5)), torch.tensor(0.25))),
    Row(Op.CAST, "", F, lambda b, x, s: b.cast(x, "f16"), lambda x, s: x.half()),
    Row(Op.CAST, "to_int", lambda s: [(s, "small")], lambda b, x, s: b.cast(x, "i64"),
        lambda x, s: x.long()),
    # binary
    Row(Op.ADD, "", FB, lambda b, x, y, s: x + y, lambda x, y, s: x + y),
    Row(Op.SUB, "", FB, lambda b, x, y, s: y - x, lambda x, y, s: y - x),
    Row(Op.MUL, "", FB, lambda b, x, y, s: x * y, lambda x, y, s: x * y),
    Row(Op.DIV, "", lambda s: [(s, "f"), (s, "pos")], lambda b, x, y, s: x / y,
        lambda x, y, s: x / y),
    Row(Op.POW, "", lambda s: [(s, "pos"), (s, "f")], lambda b, x, y, s: b.pow(x, y),
        lambda x, y, s: math.e ** (y * np_log(x))),
    Row(Op.MAX, "", SS, lambda b, x, y, s: b.maximum(x, y),
        lambda x, y, s: torch.where(x > y, x, y)),
    Row(Op.MIN, "", SS, lambda b, x, y, s: b.minimum(x, y),
        lambda x, y, s: torch.where(x < y, x, y)),
    Row(Op.LT, "", SS, lambda b, x, y, s: x < y, lambda x, y, s: x < y),
    Row(Op.LE, "", SS, lambda b, x, y, s: x <= y, lambda x, y, s: x <= y),
    Row(Op.GT, "", SS, lambda b, x, y, s: x > y, lambda x, y, s: x > y),
    Row(Op.GE, "", SS, lambda b, x, y, s: x >= y, lambda x, y, s: x >= y),
    Row(Op.EQ, "", SS, lambda b, x, y, s: b.eq(x, y), lambda x, y, s: x == y),
    Row(Op.NE, "", SS, lambda b, x, y, s: b.ne(x, y), lambda x, y, s: x != y),
    Row(Op.WHERE, "", lambda s: [(s, "bool"), (s, "f"), (s[-1:], "f")],
        lambda b, c, x, y, s: b.where(c, x, y), lambda c, x, y, s: c * x + (~c) * y),
    # reductions
    Row(Op.SUM, "last", F, lambda b, x, s: b.sum(x, -1), lambda x, s: _fold(x, -1, sum)),
    Row(Op.SUM, "first_nokeep", F, lambda b, x, s: b.sum(x, 0, keepdim=False),
        lambda x, s: _fold(x, 0, sum).squeeze(0)),
    Row(Op.MEAN, "last", F, lambda b, x, s: b.mean(x, -1),
        lambda x, s: _fold(x, -1, lambda v: sum(v) / len(v))),
    Row(Op.MEAN, "first_nokeep", F, lambda b, x, s: b.mean(x, 0, keepdim=False),
        lambda x, s: _fold(x, 0, lambda v: sum(v) / len(v)).squeeze(0)),
    Row(Op.AMAX, "last", F, lambda b, x, s: b.amax(x, -1), lambda x, s: _fold(x, -1, max)),
    Row(Op.AMAX, "first_nokeep", F, lambda b, x, s: b.amax(x, 0, keepdim=False),
        lambda x, s: _fold(x, 0, max).squeeze(0)),
    Row(Op.LOGSUMEXP, "last", lambda s: [(s, "big")], lambda b, x, s: b.logsumexp(x, -1),
        lambda x, s: _fold(x, -1, _lse)),
    Row(Op.LOGSUMEXP, "first_nokeep", lambda s: [(s, "big")],
        lambda b, x, s: b.logsumexp(x, 0, keepdim=False),
        lambda x, s: _fold(x, 0, _lse).squeeze(0)),
    Row(Op.SOFTMAX, "last", lambda s: [(s, "big")], lambda b, x, s: b.softmax(x, -1),
        lambda x, s: _softmax(x, -1)),
    Row(Op.SOFTMAX, "first", F, lambda b, x, s: b.softmax(x, 0), lambda x, s: _softmax(x, 0)),
    Row(Op.CUMSUM, "", F, lambda b, x, s: b.cumsum(x, -1), lambda x, s: _cumsum(x)),
    # matmul
    Row(Op.MATMUL, "", lambda s: [(s[:-1] + (5,), "f"), ((5, 3), "f")] if len(s) > 1 else
        [((s[0], 5), "f"), ((5, 3), "f")],
        lambda b, x, y, s: x @ y, lambda x, y, s: _matmul(x, y)),
    Row(Op.MATMUL, "batched", lambda s: [((2,) + s[-1:] + (4,), "f"), ((1, 4, 3), "f")],
        lambda b, x, y, s: x @ y, lambda x, y, s: _matmul(x, y.expand(2, 4, 3))),
    # views
    Row(Op.RESHAPE, "", F, lambda b, x, s: b.reshape(x, [-1]), lambda x, s: x.flatten()),
    Row(Op.RESHAPE, "split_axis", lambda s: [((2 * s[-1],), "f")],
        lambda b, x, s: b.reshape(x, [2, -1]), lambda x, s: torch.stack([x[: s[-1]], x[s[-1]:]])),
    Row(Op.PERMUTE, "", F, lambda b, x, s: b.permute(x, list(reversed(range(len(s))))),
        lambda x, s: x.permute(*reversed(range(len(s))))),
    Row(Op.EXPAND, "", F, lambda b, x, s: b.expand(b.sum(x, 0), (3,) + s),
        lambda x, s: _fold(x, 0, sum).expand(3, *s)),
    Row(Op.SLICE, "", F, lambda b, x, s: b.slice(x, -1, 0, -1) if s[-1] > 1 else x,
        lambda x, s: x[..., :-1] if s[-1] > 1 else x),
    Row(Op.SLICE, "step", F, lambda b, x, s: b.slice(x, -1, 1 if s[-1] > 1 else 0, None, 2),
        lambda x, s: x[..., (1 if s[-1] > 1 else 0)::2]),
    Row(Op.SLICE, "index_syntax", F, lambda b, x, s: x[..., -1],
        lambda x, s: x[..., -1]),
    Row(Op.CONCAT, "", FF, lambda b, x, y, s: b.concat([x, y, x], -1),
        lambda x, y, s: torch.cat([x, y, x], -1)),
    # indexing
    Row(Op.EMBEDDING, "", lambda s: [((11, 6), "f"), (s, "int:11")],
        lambda b, t, i, s: b.embedding(t, i), lambda t, i, s: t[i]),
    Row(Op.GATHER, "", lambda s: [(s, "f"), (s, "int:last")],
        lambda b, x, i, s: b.gather(x, i, -1), lambda x, i, s: _gather(x, i)),
    Row(Op.SCATTER_ADD, "", lambda s: [(s, "f"), (s, "int:last"), (s, "f")],
        lambda b, x, i, y, s: b.scatter_add(x, i, y, -1), lambda x, i, y, s: _scatter(x, i, y)),
    Row(Op.TOPK, "", lambda s: [(s, "small")], lambda b, x, s: b.topk(x, min(2, s[-1]), -1),
        lambda x, s: topk_ref(x, min(2, s[-1]))),
    # random: eval mode (the default RefCtx) is the identity
    Row(Op.DROPOUT, "eval", F, lambda b, x, s: b.dropout(x, 0.5, 3), lambda x, s: x),
]

def make(shape, kind, gen):
    if kind == "f":
        return torch.randn(shape, generator=gen)
    if kind == "big":
        return torch.randn(shape, generator=gen) * 30  # exercise the max-subtraction
    if kind == "pos":
        return torch.rand(shape, generator=gen) + 0.1
    if kind == "small":
        return torch.randint(-2, 3, shape, generator=gen).float()
    if kind == "bool":
        return torch.randint(0, 2, shape, generator=gen).bool()
    if kind.startswith("int:"):
        hi = shape[-1] if kind == "int:last" else int(kind[4:])
        return torch.randint(0, hi, shape, generator=gen)
    raise ValueError(kind)


def _dtype(kind):
    return "bool" if kind == "bool" else "i64" if kind.startswith("int:") else "f32"


ODD = st.sampled_from([1, 2, 3, 7, 8, 63, 64, 65])
SHAPES = st.lists(ODD, min_size=1, max_size=3).filter(lambda s: math.prod(s) <= 4096)


def run_row(row: Row, s: tuple, seed: int, symbolic: bool = False):
    gen = torch.Generator().manual_seed(seed)
    specs = row.inputs(s)
    vals = [make(shape, kind, gen) for shape, kind in specs]
    b = Builder({}, {})
    ins = []
    for k, ((shape, kind), v) in enumerate(zip(specs, vals)):
        decl = list(shape)
        if symbolic and len(decl) == len(s) > 1 and decl[0] == s[0]:
            decl[0] = Dim.sym("B")  # one graph, any leading size
        ins.append(b.input(f"in{k}", decl, _dtype(kind)))
    out = row.build(b, *ins, s)
    g = Graph(row.op.value, b.nodes, {"out": out.node})
    bound = {f"in{k}": v for k, v in enumerate(vals)}
    params = [n for n in g.nodes if n.op is Op.PARAM]
    for p in params:
        PARAM_VALUE[0] = torch.randn(p.type.concrete({}), generator=gen)
        bound[p.attrs["name"]] = PARAM_VALUE[0]
    dims = bind_dims(g, bound)
    got = run_graph(g, bound, RefCtx(dims=dims))["out"]
    want = row.expect(*vals, s)
    node_t = g.outputs["out"].type
    assert tuple(got.shape) == node_t.concrete(dims), (got.shape, node_t)
    assert got.dtype == node_t.dtype.torch()
    assert tuple(got.shape) == tuple(want.shape)
    if got.dtype.is_floating_point:
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want.to(got.dtype))


IDS = [f"{r.op.value}{'-' + r.variant if r.variant else ''}" for r in ROWS]


@pytest.mark.parametrize("row", ROWS, ids=IDS)
@settings(max_examples=15, deadline=None)
@given(s=SHAPES, seed=st.integers(0, 2**31 - 1))
def test_op_matches_independent_torch(row, s, seed):
    run_row(row, tuple(s), seed)


@pytest.mark.parametrize("row", [r for r in ROWS if r.op.kind.value in
                                 ("pointwise", "reduction", "view")], ids=lambda r: r.op.value)
def test_one_graph_serves_several_leading_sizes(row):
    for lead in (1, 3, 7):
        run_row(row, (lead, 5), seed=lead, symbolic=True)
