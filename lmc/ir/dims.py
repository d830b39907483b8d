"""Symbolic dimensions.

A dimension is an int or a `Dim`: a polynomial with integer coefficients over named symbols
(``B``, ``T``). Polynomials are closed under +, - and *, which covers every shape a model
writes (``B*T`` when flattening, ``T-1`` when shifting targets, ``2*T`` when concatenating).
Division is exact or an error: a shape is never silently rounded.

One compile serves every batch size and length because shapes stay symbolic until run time,
when `evaluate` substitutes the actual sizes.
"""
from __future__ import annotations

from typing import Mapping, Union

# A monomial is a sorted tuple of symbol names (with repetition for powers); () is the constant.
Monomial = tuple


class Dim:
    __slots__ = ("terms", "_hash")

    def __init__(self, terms: Mapping[Monomial, int]):
        self.terms = {m: c for m, c in terms.items() if c != 0}
        # a constant Dim equals its int (==), so it must hash like it too
        self._hash = (hash(self.const()) if self.is_const()
                      else hash(frozenset(self.terms.items())))

    @staticmethod
    def sym(name: str) -> "Dim":
        return Dim({(name,): 1})

    # -- classification ------------------------------------------------------------------
    def is_const(self) -> bool:
        return all(m == () for m in self.terms)

    def const(self) -> int:
        return self.terms.get((), 0)

    def symbols(self) -> set:
        return {s for m in self.terms for s in m}

    # -- arithmetic -------------------------------------------------------------------------
    def __add__(self, other):
        o = as_dim(other)
        t = dict(self.terms)
        for m, c in o.terms.items():
            t[m] = t.get(m, 0) + c
        return simplify(Dim(t))

    __radd__ = __add__

    def __neg__(self):
        return simplify(Dim({m: -c for m, c in self.terms.items()}))

    def __sub__(self, other):
        return self + (-as_dim(other))

    def __rsub__(self, other):
        return as_dim(other) - self

    def __mul__(self, other):
        o = as_dim(other)
        t: dict = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in o.terms.items():
                m = tuple(sorted(m1 + m2))
                t[m] = t.get(m, 0) + c1 * c2
        return simplify(Dim(t))

    __rmul__ = __mul__

    def __truediv__(self, other):
        """Exact division (``T*B / B``, ``2*T // 2``): a shape is never rounded, so a
        remainder is an error naming both sides, as in a YAML expression."""
        if isinstance(other, bool) or not isinstance(other, (int, Dim)):
            return NotImplemented
        q = self.exact_div(other)
        if q is None:
            raise ValueError(f"symbolic dimension {self} is not divisible by {other}")
        return q

    __floordiv__ = __truediv__

    def __rtruediv__(self, other):
        if isinstance(other, bool) or not isinstance(other, int):
            return NotImplemented
        q = as_dim(other).exact_div(self)
        if q is None:
            raise ValueError(f"{other} is not divisible by symbolic dimension {self}")
        return q

    __rfloordiv__ = __rtruediv__

    def exact_div(self, other):
        """self / other when the quotient is a polynomial with integer coefficients; None
        otherwise (a remainder, a fractional coefficient, or division by zero)."""
        o = as_dim(other)
        if not o.terms:
            return None
        # polynomial long division by the leading term (graded lex order); with one divisor
        # a leading term the divisor's does not divide means a nonzero remainder
        lead = max(o.terms, key=_order)
        lc = o.terms[lead]
        rest = dict(self.terms)
        q: dict = {}
        while rest:
            m = max(rest, key=_order)
            c = rest[m]
            left = list(m)
            for s in lead:
                if s not in left:
                    return None
                left.remove(s)
            if c % lc:
                return None
            qm, qc = tuple(left), c // lc
            q[qm] = qc
            for m2, c2 in o.terms.items():
                t = tuple(sorted(qm + m2))
                rest[t] = rest.get(t, 0) - qc * c2
                if rest[t] == 0:
                    del rest[t]
        return simplify(Dim(q))

    # -- comparison -------------------------------------------------------------------------
    def __eq__(self, other):
        if isinstance(other, (int, Dim)):
            return self.terms == as_dim(other).terms
        return NotImplemented

    def __hash__(self):
        return self._hash

    def evaluate(self, env: Mapping[str, int]) -> int:
        total = 0
        for m, c in self.terms.items():
            v = c
            for s in m:
                try:
                    v *= env[s]
                except KeyError:
                    raise KeyError(f"no value for symbolic dim {s!r}") from None
            total += v
        return total

    def __repr__(self):
        if not self.terms:
            return "0"
        parts = []
        for m in sorted(self.terms, key=lambda m: (-len(m), m)):
            c = self.terms[m]
            body = "*".join(m)
            if not body:
                s = str(abs(c))
            elif abs(c) == 1:
                s = body
            else:
                s = f"{abs(c)}*{body}"
            parts.append(("-" if c < 0 else "+", s))
        out = ("-" if parts[0][0] == "-" else "") + parts[0][1]
        for sign, s in parts[1:]:
            out += f"{sign}{s}"
        return out

    __str__ = __repr__


DimLike = Union[int, Dim]


def _order(m: Monomial):
    """Graded lexicographic order on monomials (a well-order, so division terminates)."""
    return (len(m), m)


def as_dim(x) -> Dim:
    if isinstance(x, Dim):
        return x
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"not a dimension: {x!r}")
    return Dim({(): x})


def simplify(d: Dim) -> DimLike:
    """Constant polynomials become plain ints so concrete shapes stay plain tuples of ints."""
    return d.const() if d.is_const() else d


def norm(x) -> DimLike:
    """Normalise a user-supplied dimension (int, Dim, or integral float) to int | Dim."""
    if isinstance(x, Dim):
        return simplify(x)
    if isinstance(x, bool):
        raise TypeError(f"not a dimension: {x!r}")
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, int):
        return x
    raise TypeError(f"not a dimension: {x!r}")


def evaluate(x: DimLike, env: Mapping[str, int]) -> int:
    return x.evaluate(env) if isinstance(x, Dim) else x


def product(dims) -> DimLike:
    out: DimLike = 1
    for d in dims:
        out = d * out if isinstance(d, Dim) else (out * d)
    return norm(out)


def dims_equal(a: DimLike, b: DimLike) -> bool:
    return as_dim(a) == as_dim(b)


def unit_axes_only(a, b) -> bool:
    """Shapes a and b differ by axes of size 1 only (a reshape between them moves no element:
    a view of any strided tensor)."""
    return [d for d in a if d != 1] == [d for d in b if d != 1]
