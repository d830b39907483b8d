"""Parameter initialisation specs, stored on PARAM nodes and applied by the runtime.

In YAML an init is an expression over the config, so depth scaling is just arithmetic:
``init: normal(0.02 / sqrt(2 * layers))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Init:
    kind: str            # normal | zeros | ones | constant | uniform | orthogonal
    args: tuple = ()

    def __str__(self):
        return f"{self.kind}({', '.join(f'{a:g}' for a in self.args)})"

    def apply(self, t, generator=None):
        import torch

        with torch.no_grad():
            if self.kind == "normal":
                std, mean = (self.args + (0.0,))[:2]
                return t.normal_(mean, std, generator=generator)
            if self.kind == "zeros":
                return t.zero_()
            if self.kind == "ones":
                return t.fill_(1.0)
            if self.kind == "constant":
                return t.fill_(self.args[0])
            if self.kind == "uniform":
                lo, hi = self.args
                return t.uniform_(lo, hi, generator=generator)
            if self.kind == "orthogonal":
                gain = self.args[0] if self.args else 1.0
                flat = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)
                rows, cols = flat.shape
                a = torch.randn(max(rows, cols), min(rows, cols), generator=generator,
                                dtype=torch.float64)
                q, r = torch.linalg.qr(a)
                q = q * torch.sign(torch.diagonal(r))  # uniform over the orthogonal group
                q = q if rows >= cols else q.T
                flat.copy_((gain * q[:rows, :cols]).to(t.dtype))
                return t
        raise ValueError(f"unknown init {self.kind!r}")


def _num(what: str, v, low: Optional[float] = None) -> float:
    """An initialiser's argument, checked when it is written (not by torch at load)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v!r}")
    if low is not None and v < low:
        raise ValueError(f"{what} must be >= {low:g}, got {v:g}")
    return float(v)


def normal(std: float = 0.02, mean: float = 0.0) -> Init:
    return Init("normal", (_num("normal: std", std, low=0), _num("normal: mean", mean)))


def zeros() -> Init:
    return Init("zeros")


def ones() -> Init:
    return Init("ones")


def constant(value: float) -> Init:
    return Init("constant", (_num("constant: value", value),))


def uniform(lo: float, hi: float) -> Init:
    lo, hi = _num("uniform: lo", lo), _num("uniform: hi", hi)
    if lo > hi:
        raise ValueError(f"uniform: lo must be <= hi, got lo={lo:g} > hi={hi:g}")
    return Init("uniform", (lo, hi))


def orthogonal(gain: float = 1.0) -> Init:
    return Init("orthogonal", (_num("orthogonal: gain", gain),))


INITS = {f.__name__: f for f in (normal, zeros, ones, constant, uniform, orthogonal)}
