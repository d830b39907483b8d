"""Symbolic dimensions: integer polynomials over B and T."""
import pytest

from lmc.ir.dims import Dim, as_dim, dims_equal, norm, product
from lmc.ir.types import DType, TensorType

B, T = Dim.sym("B"), Dim.sym("T")


def test_arithmetic_and_printing():
    assert str(B * T) == "B*T"
    assert str(T - 1) == "T-1"
    assert str(2 * T + B) == "2*T+B" or str(2 * T + B) == "B+2*T"
    assert (T + 1) - 1 == T
    assert (B * T) * 4 == 4 * (T * B)
    assert T - T == 0 and isinstance(norm(T - T), int)


def test_exact_division():
    assert (B * T * 12).exact_div(12) == B * T
    assert (B * T * 12).exact_div(T) == 12 * B
    assert (B * T).exact_div(5) is None
    assert (T + 1).exact_div(T) is None
    assert (T + 1).exact_div(T + 1) == 1


def test_equality_hash_and_evaluate():
    assert dims_equal(as_dim(3), 3) and not dims_equal(T, 3)
    assert hash(B * T) == hash(T * B)
    assert (2 * B * T - 1).evaluate({"B": 3, "T": 5}) == 29
    with pytest.raises(KeyError, match="T"):
        T.evaluate({"B": 1})
    assert product([B, T, 4]) == 4 * B * T
    assert product([2, 3]) == 6


def test_tensor_type():
    t = TensorType((B, T, 64.0), DType.f32)
    assert t.shape[2] == 64 and isinstance(t.shape[2], int)
    assert not t.is_static() and t.concrete({"B": 2, "T": 3}) == (2, 3, 64)
    assert str(t) == "f32[B,T,64]"
    assert DType.of("float16") is DType.f16
    with pytest.raises(ValueError, match="unknown dtype"):
        DType.of("f8")
