"""Every op has every rule, and a row in the op table; shape rules refuse bad input clearly."""
import pytest
from test_op_table import ROWS

from lmc.errors import ShapeError
from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.ops import Kind, Op
from lmc.ops.reference import REFERENCE
from lmc.ops.shapes import SHAPE_RULES
from lmc.passes.autodiff import VJP

STRUCTURAL = {op for op in Op if op.kind is Kind.STRUCTURAL}  # tested via blocks + inline


@pytest.mark.parametrize("table,name", [(SHAPE_RULES, "shape rule"), (REFERENCE, "reference")])
def test_every_op_has_a_rule(table, name):
    missing = [op.value for op in Op if op not in table]
    assert not missing, f"ops without a {name}: {missing}"


def test_every_op_has_a_vjp_rule():
    missing = [op.value for op in Op if op not in VJP and op not in STRUCTURAL]
    assert not missing, f"ops without a VJP rule: {missing}"


def test_every_op_has_a_row_in_the_op_table():
    covered = {r.op for r in ROWS}
    missing = [op.value for op in Op if op not in covered and op not in STRUCTURAL]
    assert not missing, f"ops without a row in tests/ops/test_op_table.py: {missing}"


def _b():
    return Builder({}, {})


B, T = Dim.sym("B"), Dim.sym("T")


def test_matmul_mismatch_names_both_shapes():
    b = _b()
    with pytest.raises(ShapeError, match=r"\[B, T, 64\] @ \[32, 64\]"):
        b.input("x", [B, T, 64], "f32") @ b.input("w", [32, 64], "f32")


def test_broadcast_mismatch_names_both_shapes():
    b = _b()
    with pytest.raises(ShapeError, match=r"\[B, 3\] and \[4\]"):
        b.input("x", [B, 3], "f32") + b.input("y", [4], "f32")


def test_concat_and_reshape_mismatch():
    b = _b()
    x, y = b.input("x", [2, 3], "f32"), b.input("y", [3, 3], "f32")
    with pytest.raises(ShapeError, match=r"\[2, 3\] and \[3, 3\]"):
        b.concat([x, y], -1)
    with pytest.raises(ShapeError, match=r"\[2, 3\] has 6 elements"):
        b.reshape(x, [4, 2])
    with pytest.raises(ShapeError, match="cannot infer"):
        b.reshape(b.input("z", [B, 3], "f32"), [2, -1])


def test_symbolic_reshape_and_slice():
    b = _b()
    x = b.input("x", [B, T, 12], "f32")
    assert b.reshape(x, [-1, 12]).shape == (B * T, 12)
    assert b.reshape(x, [B, T, 3, -1]).shape[-1] == 4
    assert b.slice(x, 1, 0, -1).shape == (B, T - 1, 12)


def test_dims_must_be_non_negative_and_bounded():
    b = _b()
    with pytest.raises(ShapeError, match="negative"):
        b.param("w", [-1, 4])
    with pytest.raises(ShapeError, match="2\\^31"):
        b.param("w", [100000, 100000])


def test_dtype_rules():
    b = _b()
    x, i = b.input("x", [3], "f32"), b.input("i", [3], "i64")
    with pytest.raises(ShapeError, match="mixed dtypes"):
        x + i
    with pytest.raises(ShapeError, match="condition must be bool"):
        b.where(x, x, x)
    assert (x < 1.0).dtype.value == "bool"
    assert b.topk(x, 2).dtype.value == "i64"
