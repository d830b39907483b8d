"""Every op has every rule and a row in the op table; shape rules refuse bad input clearly, and
the dtype a rule promises is the dtype the reference produces."""
import pytest
import torch
from test_op_table import ROWS

from lmc.errors import LmcError, ShapeError
from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import BINARY, REDUCTIONS, UNARY, Kind, Op
from lmc.ops.reference import REFERENCE, RefCtx
from lmc.ops.shapes import SHAPE_RULES
from lmc.passes.autodiff import VJP
from lmc.runtime.executor import bind_dims, run_graph

STRUCTURAL = {Op.BLOCK, Op.GETITEM, Op.FUSED, Op.SCAN_BWD}  # BLOCK/GETITEM: via Builder.call +
# inline; FUSED: via the fusion pass tests (tests/codegen/test_pointwise.py); SCAN_BWD: made only
# by scan's VJP and tested through it (tests/ops/test_scan.py); it has no VJP of its own (no
# second derivatives through a scan)


# -- the registry ----------------------------------------------------------------------------------
@pytest.mark.parametrize("table,name", [(SHAPE_RULES, "shape rule"), (REFERENCE, "reference")])
def test_every_op_has_a_rule(table, name):
    missing = [op.value for op in Op if op not in table]
    assert not missing, f"ops without a {name}: {missing}"


def test_every_op_has_a_vjp_rule():
    missing = [op.value for op in Op if op not in VJP and op not in STRUCTURAL]
    assert not missing, f"ops without a VJP rule: {missing}"


def test_every_op_has_a_row_in_the_op_table():
    assert {Op.BLOCK, Op.GETITEM} <= STRUCTURAL
    covered = {r.op for r in ROWS}
    missing = [op.value for op in Op if op not in covered and op not in STRUCTURAL]
    assert not missing, f"ops without a row in tests/ops/test_op_table.py: {missing}"


# the primitives added for the zoo (issue 5), each complete: shape, reference, VJP, a table row,
# and a Triton lowering for the pointwise ones
ZOO_OPS = [Op.LOGSIGMOID, Op.SOFTPLUS, Op.STOP_GRADIENT, Op.CUMPROD, Op.GAUSSIAN_NOISE, Op.SCAN]


@pytest.mark.parametrize("op", ZOO_OPS, ids=[op.value for op in ZOO_OPS])
def test_zoo_ops_are_complete(op):
    from lmc.codegen.pointwise import _UNARY as TRITON_UNARY
    assert op in SHAPE_RULES and op in REFERENCE and op in VJP and op in {r.op for r in ROWS}
    assert op.kind is not Kind.POINTWISE or op in TRITON_UNARY


def test_op_enum_is_consistent():
    assert len({op.value for op in Op}) == len(Op)
    for op in Op:
        assert isinstance(op.kind, Kind)
        assert op.arity is None or (isinstance(op.arity, int) and op.arity >= 0)
        assert (op.arity == 0) == (op.kind is Kind.SOURCE)
    assert all(op.arity == 1 for op in UNARY) and all(op.arity == 2 for op in BINARY)


def _b():
    return Builder(config={}, blocks={})


B, T = Dim.sym("B"), Dim.sym("T")


# -- shape errors name both shapes ----------------------------------------------------------------
def test_matmul_mismatch_names_both_shapes():
    b = _b()
    with pytest.raises(ShapeError, match=r"\[B, T, 64\] @ \[32, 64\]"):
        b.input("x", [B, T, 64], "f32") @ b.input("w", [32, 64], "f32")
    with pytest.raises(ShapeError, match=r"batch .*\[2, 3, 4\] @ \[5, 4, 6\]"):
        b.input("p", [2, 3, 4], "f32") @ b.input("q", [5, 4, 6], "f32")
    with pytest.raises(ShapeError, match=r"rank >= 2.*\[4\] @ \[4, 2\]"):
        b.input("v", [4], "f32") @ b.input("m", [4, 2], "f32")


def test_broadcast_mismatch_names_both_shapes():
    b = _b()
    with pytest.raises(ShapeError, match=r"\[B, 3\] and \[4\]"):
        b.input("x", [B, 3], "f32") + b.input("y", [4], "f32")
    with pytest.raises(ShapeError, match=r"\[B, T\] and \[T, B\]"):
        b.input("p", [B, T], "f32") * b.input("q", [T, B], "f32")


def test_concat_mismatch_names_both_shapes():
    b = _b()
    x, y = b.input("x", [2, 3], "f32"), b.input("y", [3, 3], "f32")
    with pytest.raises(ShapeError, match=r"\[2, 3\] and \[3, 3\]"):
        b.concat([x, y], -1)
    assert b.concat([x, y], 0).shape == (5, 3)
    with pytest.raises(ShapeError, match=r"\[2, 3\] and \[3\]"):
        b.concat([x, b.input("z", [3], "f32")], 0)


def test_reshape_mismatch_names_both_shapes():
    b = _b()
    x = b.input("x", [2, 3], "f32")
    with pytest.raises(ShapeError, match=r"\[2, 3\] has 6 elements, target \[4, 2\] has 8"):
        b.reshape(x, [4, 2])
    with pytest.raises(ShapeError, match=r"cannot infer -1 reshaping \[B, 3\] to \[2, -1\]"):
        b.reshape(b.input("z", [B, 3], "f32"), [2, -1])
    with pytest.raises(ShapeError, match="at most one -1"):
        b.reshape(x, [-1, -1])
    with pytest.raises(ShapeError, match=r"cannot infer -1 reshaping \[2, 3\] to \[4, -1\]"):
        b.reshape(x, [4, -1])


def test_symbolic_reshape_and_slice():
    b = _b()
    x = b.input("x", [B, T, 12], "f32")
    assert b.reshape(x, [-1, 12]).shape == (B * T, 12)
    assert b.reshape(x, [B, T, 3, -1]).shape[-1] == 4
    assert b.reshape(x, [-1]).shape == (12 * B * T,)
    shifted = b.slice(x, 1, 0, -1)
    assert shifted.shape == (B, T - 1, 12)
    assert b.slice(x, 1, -1).shape == (B, 1, 12)
    assert b.slice(x, -1, 1, None, 2).shape == (B, T, 6)
    # a -1 whose size is a polynomial quotient
    assert b.reshape(shifted, [-1, T - 1, 12]).shape == (B, T - 1, 12)
    assert b.reshape(shifted, [B, -1]).shape == (B, 12 * T - 12)
    with pytest.raises(ShapeError, match="symbolic length needs step 1"):
        b.slice(x, 1, 0, None, 2)


def test_slice_bounds_are_checked():
    b = _b()
    x = b.input("x", [5, 7], "f32")
    assert b.slice(x, -1, -3).shape == (5, 3)
    assert b.slice(x, 0, -4, -1, 2).shape == (2, 7)
    assert b.slice(x, 1, 3, 3).shape == (5, 0)
    for start, stop in [(0, 8), (-8, None), (4, 2), (-1, -2)]:
        with pytest.raises(ShapeError, match=r"\[5, 7\]"):
            b.slice(x, 1, start, stop)
    with pytest.raises(ShapeError, match="step"):
        b.slice(x, 1, 0, 3, 0)
    with pytest.raises(ShapeError, match="out of range"):
        b.slice(x, 2, 0, 1)


def test_axes_are_checked_and_canonical():
    b = _b()
    x = b.input("x", [2, 3, 4], "f32")
    for make in (lambda a: b.sum(x, a), lambda a: b.softmax(x, a), lambda a: b.cumsum(x, a),
                 lambda a: b.cumprod(x, a),
                 lambda a: b.slice(x, a, 0, 1), lambda a: b.concat([x, x], a),
                 lambda a: b.topk(x, 1, a)):
        assert make(-1).node.attrs["axis"] == 2 and make(-3).node.attrs["axis"] == 0
        for bad in (3, -4):
            with pytest.raises(ShapeError, match="out of range"):
                make(bad)
    assert b.permute(x, [-1, 0, 1]).node.attrs["perm"] == (2, 0, 1)
    with pytest.raises(ShapeError, match="not a permutation"):
        b.permute(x, [0, 0, 1])
    with pytest.raises(ShapeError, match="integer"):
        b.sum(x, 1.0)


def test_reductions_of_scalars():
    b = _b()
    s = b.input("s", [], "f32")
    for keep in (True, False):
        y = b.sum(s, 0, keepdim=keep)
        assert y.shape == ()
        g = Graph("g", b.nodes, {"y": y.node})
        out = run_graph(g, {"s": torch.tensor(2.5)}, RefCtx())["y"]
        assert out.shape == () and out.item() == 2.5
    for axis_op in (lambda: b.slice(s, 0, 0, 1), lambda: b.topk(s, 1, 0),
                    lambda: b.concat([s, s], 0), lambda: b.gather(s, b.input("i", [], "i64"), 0)):
        with pytest.raises(ShapeError):
            axis_op()


def test_other_shape_errors():
    b = _b()
    x, i = b.input("x", [3, 4], "f32"), b.input("i", [3, 4], "i64")
    with pytest.raises(ShapeError, match=r"cannot expand \[3, 4\] to \[3, 5\]"):
        b.expand(x, [3, 5])
    with pytest.raises(ShapeError, match="cannot expand"):
        b.expand(x, [4])
    with pytest.raises(ShapeError, match="k=5 exceeds"):
        b.topk(x, 5)
    with pytest.raises(ShapeError, match="positive"):
        b.topk(x, 0)
    with pytest.raises(ShapeError, match="must be integers"):
        b.gather(x, x)
    with pytest.raises(ShapeError, match=r"index \[3, 2\] and source \[3, 4\] differ off"):
        b.gather(x, b.input("j", [3, 2], "i64"), 0)
    with pytest.raises(ShapeError, match="must match"):
        b.scatter_add(x, i, b.input("y", [3, 3], "f32"))
    with pytest.raises(ShapeError, match="embedding table must be 2-D"):
        b.embedding(b.input("t", [3], "f32"), i)
    with pytest.raises(ShapeError, match="embedding ids must be integers"):
        b.embedding(x, x)
    with pytest.raises(ShapeError, match="dropout p"):
        b.dropout(x, 1.0, 0)
    with pytest.raises(ShapeError, match="seed"):
        b.dropout(x, 0.5, b.input("seed", [2], "i64"))
    for std in (-0.1, float("inf"), float("nan"), "big"):
        with pytest.raises(ShapeError, match="gaussian_noise std"):
            b.gaussian_noise(x, std, 0)
    with pytest.raises(ShapeError, match="gaussian_noise seed"):
        b.gaussian_noise(x, 0.1, b.input("seed2", [2], "i64"))
    with pytest.raises(ShapeError, match="floating-point"):
        b.gaussian_noise(i, 0.1, 0)
    with pytest.raises(ShapeError, match="window"):
        b.causal_mask(4, window=-1)
    with pytest.raises(ShapeError, match="takes 2 tensor input"):
        b.node(Op.ADD, (x,))


def test_dims_must_be_non_negative_and_bounded():
    b = _b()
    with pytest.raises(ShapeError, match="negative dimension -1"):
        b.param("w", [-1, 4])
    with pytest.raises(ShapeError, match="negative"):
        b.input("x", [B, -2], "f32")
    with pytest.raises(ShapeError, match="negative"):
        b.iota(-3)
    with pytest.raises(ShapeError, match="negative"):
        b.causal_mask(-1, 4)
    with pytest.raises(ShapeError, match="negative"):
        b.reshape(b.input("y", [2, 3], "f32"), [-2, -3])
    b.input("ok", [2**31], "f32")                          # exactly 2^31: accepted
    with pytest.raises(ShapeError, match=r"2\^31"):
        b.input("big", [2**31 + 1], "f32")
    with pytest.raises(ShapeError, match=r"2\^31"):
        b.param("w2", [100000, 100000])
    with pytest.raises(ShapeError, match=r"2\^31"):      # symbolic dims count as 1
        b.input("bt", [B, T, 2**16, 2**16], "f32")
    with pytest.raises(ShapeError, match=r"2\^31"):
        b.expand(b.input("one", [1, 1], "f32"), [2**16, 2**16])
    b.input("sym", [B, T, 2**20], "f32")


def test_dtype_rules():
    b = _b()
    x, i = b.input("x", [3], "f32"), b.input("i", [3], "i64")
    with pytest.raises(ShapeError, match="mixed dtypes"):
        x + i
    with pytest.raises(ShapeError, match="mixed dtypes"):
        b.concat([x, i])
    with pytest.raises(ShapeError, match="condition must be bool"):
        b.where(x, x, x)
    assert (x < 1.0).dtype.value == "bool" and b.eq(i, i).dtype.value == "bool"
    assert b.topk(x, 2).dtype.value == "i64"
    assert b.cast(x, "bf16").dtype.value == "bf16"
    assert b.iota(4).dtype.value == "i64" and b.causal_mask(3).dtype.value == "bool"


# -- the dtype a rule promises is the dtype the reference produces --------------------------------
def _ops_by_dtype():
    """(name, build(b, x, y) -> Tensor) for every op that takes a tensor of the probed dtype."""
    cases = [(op.value, (lambda op: lambda b, x, y: b.node(op, (x,), {}))(op)) for op in UNARY]
    cases += [(op.value, (lambda op: lambda b, x, y: b.node(op, (x, y), {}))(op))
              for op in BINARY]
    cases += [(op.value, (lambda op: lambda b, x, y: b.node(op, (x,), {"axis": -1}))(op))
              for op in REDUCTIONS + [Op.SOFTMAX, Op.CUMSUM, Op.CUMPROD]]
    cases += [
        ("gelu_tanh", lambda b, x, y: b.gelu(x, "tanh")),
        ("clamp", lambda b, x, y: b.clamp(x, 0, 2)),
        ("clamp_float_bounds", lambda b, x, y: b.clamp(x, 0.5, 2.5)),
        ("cast", lambda b, x, y: b.cast(x, "f32")),
        ("where", lambda b, x, y: b.where(b.input("c", [2, 3], "bool"), x, y)),
        ("matmul", lambda b, x, y: x @ b.permute(y, [1, 0])),
        ("reshape", lambda b, x, y: b.reshape(x, [-1])),
        ("permute", lambda b, x, y: b.permute(x, [1, 0])),
        ("expand", lambda b, x, y: b.expand(x, [4, 2, 3])),
        ("slice", lambda b, x, y: b.slice(x, -1, 1)),
        ("concat", lambda b, x, y: b.concat([x, y], 0)),
        ("embedding", lambda b, x, y: b.embedding(b.input("t", [5, 2], x.dtype), b.input(
            "ids", [4], "i64"))),
        ("gather", lambda b, x, y: b.gather(x, b.input("ix", [2, 3], "i64"))),
        ("scatter_add", lambda b, x, y: b.scatter_add(x, b.input("ix", [2, 3], "i64"), y)),
        ("topk", lambda b, x, y: b.topk(x, 2)),
        ("dropout_train", lambda b, x, y: b.dropout(x, 0.5, 1)),
        ("gaussian_noise_train", lambda b, x, y: b.gaussian_noise(x, 0.5, 1)),
    ]
    return cases


def _sample(shape, dtype):
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.rand(shape, generator=g) + 0.5).to(dtype)
    if dtype is torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    return torch.randint(0, 2, shape, generator=g).to(dtype)  # valid indices, small powers


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "f64", "i64", "i32", "bool"])
@pytest.mark.parametrize("name,make", _ops_by_dtype(), ids=[c[0] for c in _ops_by_dtype()])
def test_rule_dtype_is_runtime_dtype(name, make, dtype):
    """Either the shape rule refuses the dtype (a ShapeError, at compile time), or running the
    op gives exactly the shape and dtype its type says. Never a type that lies or a crash."""
    b = _b()
    x, y = b.input("x", [2, 3], dtype), b.input("y", [2, 3], dtype)
    try:
        out = make(b, x, y)
    except ShapeError:
        assert dtype not in ("f32", "f64"), f"{name} refuses {dtype}"
        return
    g = Graph("g", b.nodes, {"out": out.node})
    bound = {n.attrs["name"]: _sample(n.type.concrete({}), n.type.dtype.torch())
             for n in g.inputs}
    if "ix" in bound:
        bound["ix"] = bound["ix"].clamp(0, 1).long()
    if "ids" in bound:
        bound["ids"] = torch.tensor([0, 4, 2, 2])
    got = run_graph(g, bound, RefCtx(dims=bind_dims(g, bound), training=True))["out"]
    assert got.dtype == out.node.type.dtype.torch(), (name, str(out.node.type), got.dtype)
    assert tuple(got.shape) == out.node.type.concrete({})


def test_int_division_and_transcendentals_are_refused_by_name():
    b = _b()
    i = b.input("i", [3], "i64")
    with pytest.raises(ShapeError, match=r"div .*i64\[3\]"):
        i / i
    with pytest.raises(ShapeError, match=r"exp .*i64\[3\]"):
        b.exp(i)
    with pytest.raises(ShapeError, match="mean"):
        b.mean(i)
    # casting first is the way
    assert b.exp(b.cast(i, "f32")).dtype.value == "f32"
    assert isinstance(ShapeError("x"), LmcError)
