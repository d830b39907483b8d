"""The oracle: a torch implementation of every op, ``ref(ctx, inputs, attrs) -> Tensor``.

These define what each op means. The torch backend runs graphs with them, and every later
stage (fused kernels, autodiff, decode, codegen) is tested against them. Reductions, softmax
and logsumexp accumulate in fp32 whatever the input dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from ..errors import LmcError
from ..ir.dims import Dim, evaluate
from ..ir.ops import Op
from ..ir.types import DType
from . import philox

REFERENCE: Dict[Op, Callable] = {}


@dataclass
class RefCtx:
    """What a reference needs beyond its inputs: the values of the symbolic dims, where to
    put new tensors, and whether randomness (dropout) is active."""
    dims: Dict[str, int] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    training: bool = False
    params: Dict[str, torch.Tensor] = field(default_factory=dict)  # for BLOCK bodies
    rng_step: int = 0  # the training loop's draw counter: random ops draw anew each step

    def dim(self, d) -> int:
        return evaluate(d, self.dims)

    def seed(self, seed) -> int:
        """The generator seed of a random op: its explicit seed at draw 0, mixed with the
        draw counter after, so masks and noise differ between steps yet replay exactly."""
        return (int(seed) + self.rng_step * 0x9E3779B97F4A7C15) % (1 << 63)


def ref(*ops: Op):
    def deco(fn):
        for op in ops:
            REFERENCE[op] = fn
        return fn
    return deco


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Low-precision floats are promoted for accumulation."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# -- sources ---------------------------------------------------------------------------
@ref(Op.INPUT, Op.PARAM)
def _bound(ctx, xs, attrs):
    raise RuntimeError(f"{attrs['name']!r} is bound by the executor, not computed")


@ref(Op.CONST)
def _const(ctx, xs, attrs):
    v = attrs["value"]
    dt = DType.of(attrs["dtype"]).torch()
    if isinstance(v, torch.Tensor):
        return v.to(device=ctx.device, dtype=dt)
    if isinstance(v, Dim):  # a symbolic size as a value (e.g. the divisor of a mean's VJP)
        v = ctx.dim(v)
    t = torch.tensor(v, dtype=dt, device=ctx.device)
    if t.dim() == 0 and attrs.get("shape"):  # a scalar filling a declared shape
        t = t.expand([ctx.dim(d) for d in attrs["shape"]])
    return t


@ref(Op.IOTA)
def _iota(ctx, xs, attrs):
    return torch.arange(ctx.dim(attrs["length"]), dtype=DType.of(attrs["dtype"]).torch(),
                        device=ctx.device)


@ref(Op.CAUSAL_MASK)
def _causal_mask(ctx, xs, attrs):
    rows, cols = ctx.dim(attrs["rows"]), ctx.dim(attrs["cols"])
    # query i sits at absolute position i + (cols - rows): the last `rows` of `cols` keys
    q = torch.arange(rows, device=ctx.device)[:, None] + (cols - rows)
    k = torch.arange(cols, device=ctx.device)[None, :]
    mask = k <= q
    if attrs["window"]:
        mask &= k > q - attrs["window"]
    return mask


# -- pointwise -------------------------------------------------------------------------
_UNARY = {
    Op.NEG: torch.neg, Op.EXP: torch.exp, Op.LOG: torch.log, Op.SQRT: torch.sqrt,
    Op.RSQRT: torch.rsqrt, Op.SIGMOID: torch.sigmoid, Op.TANH: torch.tanh, Op.SILU: F.silu,
    Op.ERF: torch.erf,
    Op.SIN: torch.sin, Op.COS: torch.cos, Op.ABS: torch.abs, Op.SIGN: torch.sign,
    Op.ROUND: torch.round, Op.RELU: torch.relu,
}
_BINARY = {
    Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.div,
    Op.POW: torch.pow, Op.MAX: torch.maximum, Op.MIN: torch.minimum, Op.LT: torch.lt,
    Op.LE: torch.le, Op.GT: torch.gt, Op.GE: torch.ge, Op.EQ: torch.eq, Op.NE: torch.ne,
}
for _op, _fn in _UNARY.items():
    REFERENCE[_op] = (lambda fn: lambda ctx, xs, attrs: fn(xs[0]))(_fn)
for _op, _fn in _BINARY.items():
    REFERENCE[_op] = (lambda fn: lambda ctx, xs, attrs: fn(xs[0], xs[1]))(_fn)


@ref(Op.GELU)
def _gelu(ctx, xs, attrs):
    return F.gelu(xs[0], approximate=attrs.get("approximate", "none"))


def _softplus_f32(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|): e^-|x| <= 1 never overflows and log1p keeps
    the tiny values of very negative x (computed in fp32 at least)."""
    x = _f32(x)
    return torch.clamp_min(x, 0) + torch.log1p(torch.exp(-x.abs()))


@ref(Op.SOFTPLUS)
def _softplus(ctx, xs, attrs):
    return _softplus_f32(xs[0]).to(xs[0].dtype)


@ref(Op.LOGSIGMOID)
def _logsigmoid(ctx, xs, attrs):
    # log sigmoid(x) = -softplus(-x): never log(0), even where sigmoid(x) underflows
    return (-_softplus_f32(-xs[0])).to(xs[0].dtype)


@ref(Op.STOP_GRADIENT)
def _stop_gradient(ctx, xs, attrs):
    # detached, so that torch autograd over the oracle also sees no gradient through it
    return xs[0].detach()


@ref(Op.CLAMP)
def _clamp(ctx, xs, attrs):
    x, lo, hi = xs[0], attrs["lo"], attrs["hi"]
    if lo is None and hi is None:
        return x
    if not x.is_floating_point():  # integer bounds (the shape rule checks), integer result
        lo, hi = (None if v is None else int(v) for v in (lo, hi))
    return torch.clamp(x, min=lo, max=hi)


@ref(Op.CAST)
def _cast(ctx, xs, attrs):
    return xs[0].to(DType.of(attrs["dtype"]).torch())


@ref(Op.WHERE)
def _where(ctx, xs, attrs):
    return torch.where(xs[0], xs[1], xs[2])


# -- reductions ------------------------------------------------------------------------
@ref(Op.SUM)
def _sum(ctx, xs, attrs):
    x = xs[0]
    return torch.sum(_f32(x), dim=attrs["axis"], keepdim=attrs["keepdim"]).to(x.dtype)


@ref(Op.MEAN)
def _mean(ctx, xs, attrs):
    x = xs[0]
    return torch.mean(_f32(x), dim=attrs["axis"], keepdim=attrs["keepdim"]).to(x.dtype)


@ref(Op.AMAX)
def _amax(ctx, xs, attrs):
    return torch.amax(xs[0], dim=attrs["axis"], keepdim=attrs["keepdim"])


@ref(Op.LOGSUMEXP)
def _logsumexp(ctx, xs, attrs):
    x = xs[0]
    return torch.logsumexp(_f32(x), dim=attrs["axis"], keepdim=attrs["keepdim"]).to(x.dtype)


@ref(Op.SOFTMAX)
def _softmax(ctx, xs, attrs):
    x = xs[0]
    return torch.softmax(_f32(x), dim=attrs["axis"]).to(x.dtype)


@ref(Op.CUMSUM)
def _cumsum(ctx, xs, attrs):
    x = xs[0]
    return torch.cumsum(_f32(x), dim=attrs["axis"]).to(x.dtype)


@ref(Op.CUMPROD)
def _cumprod(ctx, xs, attrs):
    x = xs[0]
    return torch.cumprod(_f32(x), dim=attrs["axis"]).to(x.dtype)


# -- matmul ----------------------------------------------------------------------------
@ref(Op.MATMUL)
def _matmul(ctx, xs, attrs):
    return torch.matmul(xs[0], xs[1])


# -- views -----------------------------------------------------------------------------
@ref(Op.RESHAPE)
def _reshape(ctx, xs, attrs):
    return xs[0].reshape([ctx.dim(d) for d in attrs["shape"]])


@ref(Op.PERMUTE)
def _permute(ctx, xs, attrs):
    return xs[0].permute(*attrs["perm"])


@ref(Op.EXPAND)
def _expand(ctx, xs, attrs):
    return xs[0].expand([ctx.dim(d) for d in attrs["shape"]])  # a list: [] (a scalar) too


@ref(Op.SLICE)
def _slice(ctx, xs, attrs):
    x, ax = xs[0], attrs["axis"]
    idx = [slice(None)] * x.dim()
    idx[ax] = slice(ctx.dim(attrs["start"]), ctx.dim(attrs["stop"]), attrs["step"])
    return x[tuple(idx)]


@ref(Op.CONCAT)
def _concat(ctx, xs, attrs):
    return torch.cat(list(xs), dim=attrs["axis"])


# -- indexing --------------------------------------------------------------------------
@ref(Op.EMBEDDING)
def _embedding(ctx, xs, attrs):
    try:
        return F.embedding(xs[1], xs[0])
    except IndexError:
        # (on CPU; on a GPU an id out of range is a device-side assert, not caught here:
        # checking every call would cost a host synchronisation)
        ids, rows = xs[1], xs[0].shape[0]
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise LmcError(f"token id {int(bad)} is out of range: the embedding table has {rows} "
                       f"rows (ids 0..{rows - 1})") from None


@ref(Op.GATHER)
def _gather(ctx, xs, attrs):
    return torch.gather(xs[0], attrs["axis"], xs[1])


@ref(Op.SCATTER_ADD)
def _scatter_add(ctx, xs, attrs):
    return torch.scatter_add(xs[0], attrs["axis"], xs[1], xs[2])


@ref(Op.INDEX_COPY)
def _index_copy(ctx, xs, attrs):
    # out of place: the decoder's static step swaps in the in-place form for its own caches
    return torch.index_copy(xs[0], attrs["axis"], xs[1].long(), xs[2])


@ref(Op.TOPK)
def _topk(ctx, xs, attrs):
    # ties go to the lower index: a stable descending sort makes that explicit, where
    # torch.topk leaves it to the implementation
    idx = torch.sort(xs[0], dim=attrs["axis"], descending=True, stable=True).indices
    return idx.narrow(attrs["axis"], 0, attrs["k"])


# -- random ----------------------------------------------------------------------------
@ref(Op.DROPOUT)
def _dropout(ctx, xs, attrs):
    x, seed = xs
    p = attrs["p"]
    if not ctx.training or p == 0:
        return x
    if x.device.type == "meta":     # shapes only (codegen/warm.py): nothing to draw
        return torch.empty_like(x)
    # the mask depends only on (seed, draw counter, element index): Philox numbers, drawn on
    # x's device (ops/philox.py), the same on every device
    keep = philox.uniform(ctx.seed(seed), x.numel(), x.device).view(x.shape) >= p
    return torch.where(keep, x / (1 - p), torch.zeros((), dtype=x.dtype, device=x.device))


@ref(Op.GAUSSIAN_NOISE)
def _gaussian_noise(ctx, xs, attrs):
    # the draw depends only on (seed, draw counter, shape), on the CPU generator so that every
    # device gets the same numbers (normal draws need log/cos, which differ across devices in
    # the last bits, so not Philox as dropout); added in fp32. It is the router's [N, E] noise
    x, seed = xs
    std = attrs["std"]
    if not ctx.training or std == 0:
        return x
    if x.device.type == "meta":     # shapes only (codegen/warm.py): nothing to draw
        return torch.empty_like(x)
    g = torch.Generator(device="cpu").manual_seed(ctx.seed(seed))
    noise = torch.randn(x.shape, generator=g).to(x.device)
    return (_f32(x) + std * noise).to(x.dtype)


# -- structure -------------------------------------------------------------------------
@ref(Op.BLOCK, Op.FUSED)
def _block(ctx, xs, attrs):
    from ..runtime.executor import run_graph

    body = attrs["body"]
    bound = dict(ctx.params)
    bound.update(zip([n.attrs["name"] for n in body.inputs], xs))
    outs = run_graph(body, bound, ctx)
    return tuple(outs[k] for k in body.outputs)


@ref(Op.SCAN)
def _scan(ctx, xs, attrs):
    from .scan import run_forward
    return run_forward(ctx, xs, attrs)  # a Python loop over T running the body graph


@ref(Op.SCAN_BWD)
def _scan_bwd(ctx, xs, attrs):
    from .scan import run_backward
    return run_backward(ctx, xs, attrs)


@ref(Op.GETITEM)
def _getitem(ctx, xs, attrs):
    return xs[0][attrs["index"]]

