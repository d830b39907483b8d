"""Shape and dtype rules, one per op: ``rule(input_types, attrs) -> TensorType``.

Rules validate their inputs (raising `ShapeError` naming both shapes on a mismatch) and
canonicalise attrs in place (negative axes become non-negative), so that CSE, printing and
codegen see one form of each node.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from ..errors import ShapeError
from ..ir.dims import Dim, DimLike, as_dim, dims_equal, norm, product
from ..ir.ops import BINARY, COMPARISONS, REDUCTIONS, UNARY, Op
from ..ir.types import MAX_ELEMENTS, DType, TensorType

SHAPE_RULES: Dict[Op, Callable] = {}


def rule(*ops: Op):
    def deco(fn):
        for op in ops:
            SHAPE_RULES[op] = fn
        return fn
    return deco


# Ops whose result only makes sense in floating point (torch would silently return a float
# tensor for an integer input, or has no kernel), and ops torch has no bool kernel for.
FLOAT_ONLY = {Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.SIGMOID, Op.TANH, Op.SILU, Op.GELU, Op.ERF,
              Op.SIN, Op.COS, Op.DIV, Op.MEAN, Op.LOGSUMEXP, Op.SOFTMAX, Op.DROPOUT,
              Op.LOGSIGMOID, Op.SOFTPLUS, Op.GAUSSIAN_NOISE}
NO_BOOL = {Op.NEG, Op.ABS, Op.ROUND, Op.RELU, Op.CLAMP, Op.SUB, Op.POW, Op.MATMUL}


def check_dtypes(op: Op, types: List[TensorType]) -> None:
    if op in FLOAT_ONLY and not types[0].dtype.is_float:
        raise ShapeError(f"{op.value} needs a floating-point tensor, got {types[0]} "
                         f"(cast it first)")
    if op in NO_BOOL and any(t.dtype is DType.bool for t in types):
        raise ShapeError(f"{op.value} is not defined on bool tensors, got "
                         + ", ".join(str(t) for t in types))


def infer(op: Op, types: List[TensorType], attrs: dict):
    try:
        fn = SHAPE_RULES[op]
    except KeyError:
        raise ShapeError(f"op {op.value} has no shape rule") from None
    check_dtypes(op, types)
    t = fn(types, attrs)
    if isinstance(t, TensorType):
        check_shape(t.shape)
    return t


def shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_shape(shape) -> None:
    """Dims must be non-negative; a tensor may hold at most 2^31 elements (with every
    symbolic dim at 1, so the bound applies to what the model itself fixes)."""
    n = 1
    for d in shape:
        if isinstance(d, int):
            if d < 0:
                raise ShapeError(f"negative dimension {d} in shape {shape_str(shape)}")
            n *= d
        else:
            n *= max(sum(d.terms.values()), 1)
    if n > MAX_ELEMENTS:
        raise ShapeError(f"tensor of shape {shape_str(shape)} has {n} elements "
                         f"(more than 2^31)")


def axis_of(axis, rank: int, what: str = "axis", scalar_ok: bool = False) -> int:
    """A canonical (non-negative) axis. A rank-0 tensor has an axis only where `scalar_ok`
    (reductions and scans, where torch accepts axis 0 or -1 and returns the scalar)."""
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ShapeError(f"{what} must be an integer, got {axis!r}")
    if not -max(rank, scalar_ok) <= axis < max(rank, scalar_ok):
        raise ShapeError(f"{what} {axis} out of range for a rank-{rank} tensor")
    return axis % rank if rank else 0


def broadcast_shapes(*shapes) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dim: DimLike = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j < 0:
                continue
            d = s[j]
            if dims_equal(d, 1):
                continue
            if dims_equal(dim, 1):
                dim = d
            elif not dims_equal(dim, d):
                raise ShapeError("shapes " + " and ".join(shape_str(s) for s in shapes)
                                 + " do not broadcast")
        out.append(dim)
    return tuple(out)


def same_dtype(types: List[TensorType], what: str) -> DType:
    dts = {t.dtype for t in types}
    if len(dts) > 1:
        raise ShapeError(f"{what}: mixed dtypes " + ", ".join(t.dtype.value for t in types))
    return types[0].dtype


# -- sources ---------------------------------------------------------------------------
@rule(Op.INPUT, Op.PARAM)
def _declared(types, attrs):
    return TensorType(tuple(attrs["shape"]), DType.of(attrs["dtype"]))


@rule(Op.CONST)
def _const(types, attrs):
    v = attrs["value"]
    if hasattr(v, "shape"):
        shape = tuple(v.shape)
    elif isinstance(v, (list, tuple)):  # nested Python lists: their lengths
        shape = ()
        while isinstance(v, (list, tuple)):
            shape += (len(v),)
            v = v[0] if v else 0
    else:
        shape = tuple(attrs.get("shape", ()))
    return TensorType(shape, DType.of(attrs["dtype"]))


@rule(Op.IOTA)
def _iota(types, attrs):
    attrs.setdefault("dtype", DType.i64)
    return TensorType((attrs["length"],), DType.of(attrs["dtype"]))


@rule(Op.CAUSAL_MASK)
def _mask(types, attrs):
    attrs.setdefault("window", 0)
    if attrs["window"] < 0:
        raise ShapeError(f"window must be >= 0, got {attrs['window']}")
    return TensorType((attrs["rows"], attrs["cols"]), DType.bool)


# -- pointwise -------------------------------------------------------------------------
@rule(*UNARY)
def _unary(types, attrs):
    return types[0]


@rule(Op.CLAMP)
def _clamp(types, attrs):
    attrs.setdefault("lo", None)
    attrs.setdefault("hi", None)
    for v in (attrs["lo"], attrs["hi"]):
        if v is not None and not types[0].dtype.is_float and not float(v).is_integer():
            raise ShapeError(f"clamp of an integer tensor {types[0]} needs integer bounds, "
                             f"got {v!r}")
    return types[0]


@rule(Op.CAST)
def _cast(types, attrs):
    attrs["dtype"] = DType.of(attrs["dtype"])
    return types[0].with_dtype(attrs["dtype"])


def _binary_rule(op):
    def fn(types, attrs):
        a, b = types
        shape = broadcast_shapes(a.shape, b.shape)
        dt = same_dtype(types, op.value)
        return TensorType(shape, DType.bool if op in COMPARISONS else dt)
    return fn


for _op in BINARY:
    SHAPE_RULES[_op] = _binary_rule(_op)


@rule(Op.WHERE)
def _where(types, attrs):
    c, a, b = types
    if c.dtype is not DType.bool:
        raise ShapeError(f"where: condition must be bool, got {c.dtype.value}")
    shape = broadcast_shapes(c.shape, a.shape, b.shape)
    return TensorType(shape, same_dtype([a, b], "where"))


# -- reductions ------------------------------------------------------------------------
@rule(*REDUCTIONS)
def _reduce(types, attrs):
    (t,) = types
    ax = attrs["axis"] = axis_of(attrs["axis"], t.rank, scalar_ok=True)
    keep = attrs.setdefault("keepdim", True)
    if isinstance(keep, int) and keep in (0, 1):
        keep = attrs["keepdim"] = bool(keep)
    if not isinstance(keep, bool):
        raise ShapeError(f"keepdim must be True or False, got {keep!r}")
    shape = list(t.shape)
    if not shape:  # a scalar reduces to itself
        pass
    elif keep:
        shape[ax] = 1
    else:
        del shape[ax]
    return t.with_shape(shape)


@rule(Op.SOFTMAX, Op.CUMSUM, Op.CUMPROD)
def _along(types, attrs):
    (t,) = types
    attrs["axis"] = axis_of(attrs["axis"], t.rank, scalar_ok=True)
    return t


# -- matmul ----------------------------------------------------------------------------
@rule(Op.MATMUL)
def _matmul(types, attrs):
    a, b = types
    if a.rank < 2 or b.rank < 2:
        raise ShapeError(f"matmul needs rank >= 2 operands, got {shape_str(a.shape)} @ "
                         f"{shape_str(b.shape)}")
    if not dims_equal(a.shape[-1], b.shape[-2]):
        raise ShapeError(f"matmul inner dimensions differ: {shape_str(a.shape)} @ "
                         f"{shape_str(b.shape)}")
    try:
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ShapeError:
        raise ShapeError(f"matmul batch dimensions do not broadcast: {shape_str(a.shape)} @ "
                         f"{shape_str(b.shape)}") from None
    return TensorType(batch + (a.shape[-2], b.shape[-1]), same_dtype(types, "matmul"))


# -- views -----------------------------------------------------------------------------
@rule(Op.RESHAPE)
def _reshape(types, attrs):
    (t,) = types
    shape = [norm(d) for d in attrs["shape"]]
    holes = [i for i, d in enumerate(shape) if dims_equal(d, -1)]
    if len(holes) > 1:
        raise ShapeError("reshape: at most one -1 dimension")
    total = t.numel()
    if holes:
        known = product([d for i, d in enumerate(shape) if i != holes[0]])
        q = as_dim(total).exact_div(known)
        if q is None:
            raise ShapeError(f"reshape: cannot infer -1 reshaping {shape_str(t.shape)} to "
                             f"{shape_str(shape)}")
        shape[holes[0]] = norm(q)
    if not dims_equal(product(shape), total):
        raise ShapeError(f"reshape: {shape_str(t.shape)} has {total} elements, target "
                         f"{shape_str(shape)} has {product(shape)}")
    attrs["shape"] = tuple(shape)
    return t.with_shape(shape)


@rule(Op.PERMUTE)
def _permute(types, attrs):
    (t,) = types
    perm = tuple(axis_of(p, t.rank, "permute axis") for p in attrs["perm"])
    if sorted(perm) != list(range(t.rank)):
        raise ShapeError(f"permute: {list(attrs['perm'])} is not a permutation of "
                         f"{t.rank} axes")
    attrs["perm"] = perm
    return t.with_shape([t.shape[p] for p in perm])


@rule(Op.EXPAND)
def _expand(types, attrs):
    (t,) = types
    shape = tuple(norm(d) for d in attrs["shape"])
    if len(shape) < t.rank:
        raise ShapeError(f"expand: cannot expand {shape_str(t.shape)} to {shape_str(shape)}")
    for i, d in enumerate(t.shape):
        target = shape[len(shape) - t.rank + i]
        if not (dims_equal(d, target) or dims_equal(d, 1)):
            raise ShapeError(f"expand: cannot expand {shape_str(t.shape)} to "
                             f"{shape_str(shape)}")
    attrs["shape"] = shape
    return t.with_shape(shape)


@rule(Op.SLICE)
def _slice(types, attrs):
    (t,) = types
    ax = attrs["axis"] = axis_of(attrs["axis"], t.rank)
    size = t.shape[ax]
    start = norm(attrs.get("start", 0))
    stop = attrs.get("stop")
    stop = size if stop is None else norm(stop)
    step = attrs.setdefault("step", 1)
    if not isinstance(step, int) or step < 1:
        raise ShapeError(f"slice step must be a positive integer, got {step!r}")
    # negative bounds count from the end, as in Python
    if isinstance(start, int) and start < 0:
        start = norm(size + start) if isinstance(size, Dim) else size + start
    if isinstance(stop, int) and stop < 0:
        stop = norm(size + stop) if isinstance(size, Dim) else size + stop
    length = norm(as_dim(stop) - as_dim(start))
    if isinstance(length, int):
        if isinstance(size, int):
            if not (0 <= start <= stop <= size):
                raise ShapeError(f"slice [{start}:{stop}] out of range for axis {ax} of "
                                 f"{shape_str(t.shape)}")
        if length < 0:
            raise ShapeError(f"slice [{start}:{stop}] is empty-reversed on axis {ax} of "
                             f"{shape_str(t.shape)}")
        length = -(-length // step)
    elif step != 1:
        raise ShapeError("slice with a symbolic length needs step 1")
    attrs["start"], attrs["stop"] = start, stop
    shape = list(t.shape)
    shape[ax] = length
    return t.with_shape(shape)


@rule(Op.CONCAT)
def _concat(types, attrs):
    if not types:
        raise ShapeError("concat needs at least one input")
    ax = attrs["axis"] = axis_of(attrs["axis"], types[0].rank)
    for t in types[1:]:
        ok = t.rank == types[0].rank and all(
            dims_equal(a, b) for i, (a, b) in enumerate(zip(t.shape, types[0].shape))
            if i != ax)
        if not ok:
            raise ShapeError(f"concat along axis {ax}: shapes {shape_str(types[0].shape)} and "
                             f"{shape_str(t.shape)} differ off that axis")
    shape = list(types[0].shape)
    shape[ax] = _sum([t.shape[ax] for t in types])
    return TensorType(tuple(shape), same_dtype(types, "concat"))


def _sum(dims):
    total = as_dim(0)
    for d in dims:
        total = as_dim(total + d)
    return norm(total)


# -- indexing --------------------------------------------------------------------------
@rule(Op.EMBEDDING)
def _embedding(types, attrs):
    table, ids = types
    if table.rank != 2:
        raise ShapeError(f"embedding table must be 2-D, got {shape_str(table.shape)}")
    if not ids.dtype.is_int:
        raise ShapeError(f"embedding ids must be integers, got {ids.dtype.value}")
    return TensorType(ids.shape + (table.shape[1],), table.dtype)


@rule(Op.GATHER)
def _gather(types, attrs):
    x, idx = types
    if not idx.dtype.is_int:
        raise ShapeError(f"gather index must be integers, got {idx.dtype.value}")
    if x.rank != idx.rank:
        raise ShapeError(f"gather: index {shape_str(idx.shape)} must have the rank of "
                         f"{shape_str(x.shape)}")
    ax = attrs["axis"] = axis_of(attrs["axis"], x.rank)
    for i, (a, b) in enumerate(zip(x.shape, idx.shape)):
        if i != ax and not dims_equal(a, b):
            raise ShapeError(f"gather: index {shape_str(idx.shape)} and source "
                             f"{shape_str(x.shape)} differ off axis {ax}")
    return TensorType(idx.shape, x.dtype)


@rule(Op.SCATTER_ADD)
def _scatter_add(types, attrs):
    x, idx, src = types
    if not idx.dtype.is_int:
        raise ShapeError(f"scatter_add index must be integers, got {idx.dtype.value}")
    if not (x.rank == idx.rank == src.rank) or not all(
            dims_equal(a, b) for a, b in zip(idx.shape, src.shape)):
        raise ShapeError(f"scatter_add: index {shape_str(idx.shape)} and source "
                         f"{shape_str(src.shape)} must match, with the rank of "
                         f"{shape_str(x.shape)}")
    ax = attrs["axis"] = axis_of(attrs["axis"], x.rank)
    for i, (a, b) in enumerate(zip(x.shape, idx.shape)):
        if i != ax and not dims_equal(a, b):
            raise ShapeError(f"scatter_add: index {shape_str(idx.shape)} and target "
                             f"{shape_str(x.shape)} differ off axis {ax}")
    same_dtype([x, src], "scatter_add")
    return x


@rule(Op.INDEX_COPY)
def _index_copy(types, attrs):
    """index_copy(x, index, src, axis): x with src's slice i written at x's index[i] along
    `axis` (indices distinct). The static decode step writes new K/V into its caches with it."""
    x, idx, src = types
    if not idx.dtype.is_int or idx.rank != 1:
        raise ShapeError(f"index_copy index must be a 1-D integer tensor, got "
                         f"{idx.dtype.value}{shape_str(idx.shape)}")
    if x.rank != src.rank:
        raise ShapeError(f"index_copy: source {shape_str(src.shape)} must have the rank of "
                         f"{shape_str(x.shape)}")
    ax = attrs["axis"] = axis_of(attrs["axis"], x.rank)
    for i, (a, b) in enumerate(zip(x.shape, src.shape)):
        if i != ax and not dims_equal(a, b):
            raise ShapeError(f"index_copy: source {shape_str(src.shape)} and target "
                             f"{shape_str(x.shape)} differ off axis {ax}")
    if not dims_equal(idx.shape[0], src.shape[ax]):
        raise ShapeError(f"index_copy: index {shape_str(idx.shape)} must have one entry per "
                         f"slice of the source {shape_str(src.shape)} along axis {ax}")
    same_dtype([x, src], "index_copy")
    return x


@rule(Op.TOPK)
def _topk(types, attrs):
    (t,) = types
    ax = attrs["axis"] = axis_of(attrs.get("axis", -1), t.rank)
    k = attrs["k"]
    if not isinstance(k, int) or k < 1:
        raise ShapeError(f"topk: k must be a positive integer, got {k!r}")
    if isinstance(t.shape[ax], int) and k > t.shape[ax]:
        raise ShapeError(f"topk: k={k} exceeds axis {ax} of {shape_str(t.shape)}")
    shape = list(t.shape)
    shape[ax] = k
    return TensorType(tuple(shape), DType.i64)


# -- random ----------------------------------------------------------------------------
@rule(Op.DROPOUT)
def _dropout(types, attrs):
    x, seed = types
    if not 0 <= attrs["p"] < 1:
        raise ShapeError(f"dropout p must be in [0, 1), got {attrs['p']}")
    if seed.rank != 0 or not seed.dtype.is_int:
        raise ShapeError(f"dropout seed must be an integer scalar, got {seed}")
    return x


@rule(Op.GAUSSIAN_NOISE)
def _gaussian_noise(types, attrs):
    x, seed = types
    std = attrs["std"]
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 <= std < float("inf"):
        raise ShapeError(f"gaussian_noise std must be a finite number >= 0, got {std!r}")
    attrs["std"] = float(std)
    if seed.rank != 0 or not seed.dtype.is_int:
        raise ShapeError(f"gaussian_noise seed must be an integer scalar, got {seed}")
    return x


# -- structure -------------------------------------------------------------------------
@rule(Op.BLOCK, Op.FUSED)
def _block(types, attrs):
    body = attrs["body"]
    return tuple(n.type for n in body.outputs.values())


@rule(Op.SCAN)
def _scan(types, attrs):
    from .scan import infer as scan_infer
    return scan_infer(types, attrs)


@rule(Op.SCAN_BWD)
def _scan_bwd(types, attrs):
    # primal inputs, then one cotangent per scan output: gradients for the primal inputs
    from .scan import infer as scan_infer
    from .scan import same_type
    n_in = len(attrs["body"].inputs)
    outs = scan_infer(types[:n_in], attrs, "scan_bwd")
    cts = types[n_in:]
    if len(cts) != len(outs) or not all(same_type(a, b) for a, b in zip(cts, outs)):
        raise ShapeError("scan_bwd: the cotangents must match the scan's outputs")
    return tuple(types[:n_in])


@rule(Op.GETITEM)
def _getitem(types, attrs):
    return types[0][attrs["index"]]
