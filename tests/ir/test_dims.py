"""Symbolic dimensions (integer polynomials over B and T) and tensor types."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmc.ir.dims import Dim, as_dim, dims_equal, evaluate, norm, product
from lmc.ir.types import MAX_ELEMENTS, DType, TensorType

B, T = Dim.sym("B"), Dim.sym("T")


# -- arithmetic and printing -------------------------------------------------------------------
def test_products_and_shifts():
    assert str(B * T) == "B*T" and B * T == T * B
    assert str(T - 1) == "T-1"
    assert str(1 - T) == "-T+1"
    assert str(2 * B * T + T - 1) == "2*B*T+T-1"
    assert str(T * T * 3 - T) == "3*T*T-T"
    assert str(-(B * T)) == "-B*T"
    assert (T + 1) - 1 == T
    assert (B * T) * 4 == 4 * (T * B) == B * (2 * T) * 2
    assert (B + T) * (B - T) == B * B - T * T


def test_constant_results_are_plain_ints():
    for d in (T - T, (T + 3) - T, (B * T) * 0, 0 * T, -as_dim(3), as_dim(4) - 1):
        assert isinstance(norm(d), int)
    assert isinstance(T - T, int) and T - T == 0
    assert isinstance((T + 3) - T, int) and (T + 3) - T == 3
    assert isinstance(-as_dim(3), int) and -as_dim(3) == -3


def test_equality_with_ints_and_hash():
    assert as_dim(3) == 3 and 3 == as_dim(3)
    assert T != 3 and not dims_equal(T, 3) and dims_equal(as_dim(3), 3)
    assert T != "T" and (T == "T") is False
    assert hash(B * T) == hash(T * B)
    # a Dim equal to an int hashes like it, so either finds the other in a dict or set
    c = Dim({(): 3})
    assert c == 3 and hash(c) == hash(3)
    assert {3: "x"}[c] == "x" and c in {3}
    assert len({B * T, T * B, B * T + 0}) == 1


def test_exact_division():
    assert (B * T * 12).exact_div(12) == B * T
    assert (B * T * 12).exact_div(T) == 12 * B
    assert (B * T * 12).exact_div(4 * B) == 3 * T
    assert (B * T).exact_div(5) is None
    assert (B * T).exact_div(B * B) is None
    assert (T + 1).exact_div(T) is None
    assert (T + 1).exact_div(T + 1) == 1
    assert as_dim(12).exact_div(5) is None and as_dim(12).exact_div(4) == 3
    # polynomial divisors: exact when the quotient is an integer polynomial
    assert (B * T - B).exact_div(T - 1) == B
    assert (T * T - 1).exact_div(T + 1) == T - 1
    assert (B * T * 63 - 63 * B).exact_div(63 * T - 63) == B
    assert (2 * T + 2).exact_div(T + 1) == 2
    assert (T + 1).exact_div(2 * T + 2) is None   # 1/2 is not an integer dimension
    assert (T * T + 1).exact_div(T + 1) is None   # a remainder
    # zero
    assert as_dim(0).exact_div(T) == 0
    assert T.exact_div(0) is None and as_dim(0).exact_div(0) is None


def test_division_operators_are_exact():
    """`/` and `//` on dims: the exact quotient (a Dim or an int), or ValueError naming both
    sides; never a rounded shape."""
    assert (B * T * 6) / 3 == 2 * B * T and (2 * T) // 2 == T and (B * T) // T == B
    assert isinstance((B * T) // (B * T), int) and 12 // as_dim(4) == 3
    assert 0 // T == 0 and (T * T - 1) / (T + 1) == T - 1
    for a, b, msg in ((T, 2, "symbolic dimension T is not divisible by 2"),
                      (T + 1, T, "symbolic dimension T+1 is not divisible by T"),
                      (T, 0, "not divisible by 0"),
                      (6, T, "6 is not divisible by symbolic dimension T")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            a // b
        with pytest.raises(ValueError, match=re.escape(msg)):
            a / b
    with pytest.raises(TypeError):
        T / 2.0
    with pytest.raises(TypeError):
        T / True


def _poly():
    """Small integer polynomials over B and T (or plain ints)."""
    term = st.tuples(st.integers(-3, 3), st.integers(0, 2), st.integers(0, 2))
    return st.lists(term, min_size=1, max_size=4).map(
        lambda ts: norm(sum((c * Dim({tuple(sorted(("B",) * i + ("T",) * j)): 1})
                             for c, i, j in ts), as_dim(0))))


ENV = st.fixed_dictionaries({"B": st.integers(-5, 9), "T": st.integers(-5, 9)})


@settings(max_examples=60, deadline=None)
@given(p=_poly(), q=_poly(), env=ENV)
def test_arithmetic_agrees_with_evaluation(p, q, env):
    ev = lambda d: evaluate(d, env)
    assert ev(as_dim(p) + q) == ev(p) + ev(q)
    assert ev(as_dim(p) - q) == ev(p) - ev(q)
    assert ev(as_dim(p) * q) == ev(p) * ev(q)
    assert ev(-as_dim(p)) == -ev(p)
    assert ev(product([p, q, 3])) == ev(p) * ev(q) * 3


@settings(max_examples=60, deadline=None)
@given(p=_poly(), q=_poly(), env=ENV)
def test_exact_div_inverts_multiplication(p, q, env):
    if dims_equal(q, 0):
        assert as_dim(p).exact_div(q) is None
        return
    assert dims_equal(as_dim(p * q).exact_div(q), p)
    r = as_dim(p).exact_div(q)
    if r is not None:   # whenever it answers, the answer is exact
        assert dims_equal(as_dim(r) * q, p)
        assert evaluate(r, env) * evaluate(q, env) == evaluate(p, env)


def test_evaluate():
    assert (2 * B * T - 1).evaluate({"B": 3, "T": 5}) == 29
    assert evaluate(7, {}) == 7 and evaluate(T - 1, {"T": 1}) == 0
    with pytest.raises(KeyError, match="'T'"):
        T.evaluate({"B": 1})
    assert product([B, T, 4]) == 4 * B * T and product([2, 3]) == 6 and product([]) == 1
    assert B.symbols() == {"B"} and (B * T + 1).symbols() == {"B", "T"}
    assert (T + 4).const() == 4 and not (T + 4).is_const()


def test_not_dimensions():
    for bad in (True, 2.5, "T", None):
        with pytest.raises(TypeError):
            norm(bad)
    with pytest.raises(TypeError):
        as_dim(True)
    with pytest.raises(TypeError):
        T + 1.5
    assert norm(64.0) == 64 and isinstance(norm(64.0), int)


# -- TensorType ------------------------------------------------------------------------------------
def test_tensor_type():
    t = TensorType((B, T, 64.0), DType.f32)
    assert t.shape[2] == 64 and isinstance(t.shape[2], int)
    assert t.rank == 3 and t.numel() == 64 * B * T
    assert not t.is_static() and t.concrete({"B": 2, "T": 3}) == (2, 3, 64)
    assert str(t) == "f32[B,T,64]"
    assert str(TensorType((), DType.i64)) == "i64[]" and TensorType((), DType.i64).numel() == 1
    s = TensorType((2, 3), DType.bf16)
    assert s.is_static() and s.numel() == 6 and s.concrete({}) == (2, 3)
    assert t.with_shape([B * T, 64]).shape == (B * T, 64)
    assert t.with_dtype("float16").dtype is DType.f16 and t.with_dtype("f16").shape == t.shape
    # frozen and hashable, equal by value (symbolic dims included)
    assert TensorType((B, T - 1), DType.f32) == TensorType((B, T - 1), DType.f32)
    assert len({TensorType((B, T), DType.f32), TensorType((B, T), DType.f32)}) == 1
    assert TensorType((B, T), DType.f32) != TensorType((B, T), DType.f16)
    with pytest.raises(Exception):
        t.shape = (1,)
    with pytest.raises(TypeError):
        TensorType((2.5,), DType.f32)
    assert MAX_ELEMENTS == 2**31


def test_dtypes():
    assert DType.of("float16") is DType.f16 and DType.of(torch.bfloat16) is DType.bf16
    assert DType.of("long") is DType.i64 and DType.of(DType.i32) is DType.i32
    assert DType.of("bool") is DType.bool and DType.of(torch.bool) is DType.bool
    with pytest.raises(ValueError, match="unknown dtype"):
        DType.of("f8")
    for d in DType:
        assert DType.of(d.torch()) is d
        assert d.itemsize == torch.empty((), dtype=d.torch()).element_size()
        assert d.is_float == d.torch().is_floating_point
        assert d.is_int == (d in (DType.i32, DType.i64))
