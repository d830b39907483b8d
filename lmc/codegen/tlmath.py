"""Device math shared by the generated kernels and the hand-written templates.

Each function here is an ordinary `@triton.jit` helper that `attention.py` calls directly;
`pointwise.HELPERS` (the text every generated kernel module starts with) carries the same
function's source, so the two never drift apart.
"""
import inspect

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # no cancellation near 0 (2*sigmoid(2x) - 1 loses the low bits of a small tanh): an odd
    # series below |x| = 1/8 (next term < 2e-9 relative), (1 - e) / (1 + e) with
    # e = exp(-2|x|) <= 0.78 above; +-inf give +-1, NaN stays NaN
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    x2 = x * x
    small = a * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                                                         + x2 * -0.05396825396825397)))
    t = tl.where(a < 0.125, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


def source(fn) -> str:
    """A helper's source text, decorator included, for a generated module."""
    return inspect.getsource(getattr(fn, "fn", fn))
