"""The graph builder shared by the YAML frontend and the Python block API.

`Builder` methods create IR nodes; `Tensor` is a handle on a node with Python operators, so a
block reads like the math (``x * rsqrt(mean(x * x, -1) + eps)``). Calling a block creates a
BLOCK node whose body is a graph of its own (params included); the inline pass later splices
bodies into the parent, so nothing downstream depends on block names.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import LmcError, Loc
from ..ir import init as inits
from ..ir.dims import Dim, as_dim, dims_equal, norm
from ..ir.graph import Graph, Node
from ..ir.ops import Op
from ..ir.types import DType

Number = (int, float)


@dataclass
class BlockDef:
    """A reusable subgraph: `fn(builder, *tensor_args, **options) -> Tensor | tuple`."""
    name: str
    fn: Callable
    args: Sequence[str]                  # tensor argument names
    options: Dict[str, Any] = field(default_factory=dict)  # static options and defaults
    loc: Optional[Loc] = None
    required: Sequence[str] = ()         # options with no default (looked up in config)


class Tensor:
    """A handle on a graph node. Arithmetic with numbers lifts them to constants of the
    tensor's dtype."""
    __slots__ = ("node", "b")
    __array_priority__ = 1000

    def __init__(self, node: Node, b: "Builder"):
        self.node, self.b = node, b

    @property
    def shape(self):
        return self.node.type.shape

    @property
    def dtype(self) -> DType:
        return self.node.type.dtype

    @property
    def rank(self) -> int:
        return self.node.type.rank

    def __add__(self, o): return self.b.add(self, o)
    def __radd__(self, o): return self.b.add(o, self)
    def __sub__(self, o): return self.b.sub(self, o)
    def __rsub__(self, o): return self.b.sub(o, self)
    def __mul__(self, o): return self.b.mul(self, o)
    def __rmul__(self, o): return self.b.mul(o, self)
    def __truediv__(self, o): return self.b.div(self, o)
    def __rtruediv__(self, o): return self.b.div(o, self)
    def __pow__(self, o): return self.b.pow(self, o)
    def __rpow__(self, o): return self.b.pow(o, self)
    def __matmul__(self, o): return self.b.matmul(self, o)
    def __neg__(self): return self.b.neg(self)
    # == and != build eq / ne as in YAML (and as torch does); anything but a tensor or a
    # number compares by identity. Hashing stays by identity: a Tensor is a handle.
    def __eq__(self, o):
        return self.b.eq(self, o) if isinstance(o, (Tensor, Number)) else NotImplemented

    def __ne__(self, o):
        return self.b.ne(self, o) if isinstance(o, (Tensor, Number)) else NotImplemented

    __hash__ = object.__hash__

    def __lt__(self, o): return self.b.lt(self, o)
    def __le__(self, o): return self.b.le(self, o)
    def __gt__(self, o): return self.b.gt(self, o)
    def __ge__(self, o): return self.b.ge(self, o)

    def __getitem__(self, idx):
        return self.b.index(self, idx)

    def __iter__(self):
        # without this Python would iterate through __getitem__ (x[0], x[1], ... never ending)
        raise LmcError("cannot iterate over a tensor (a list of tensors or of dimensions was "
                       "expected here)", self.b._where())

    def __bool__(self):
        raise LmcError("a tensor has no truth value at compile time (use where(...); "
                       "maximum(a, b) for max(a, b))", self.b._where())

    def __repr__(self):
        return f"Tensor({self.node.type})"


def _exact_in(x: Number, dt: DType) -> bool:
    """Whether the number x is a value of the integer or bool dtype dt (1.0 is an int; 0.5,
    inf and nan are not; a bool tensor takes 0 and 1)."""
    try:
        if dt is DType.bool:
            return x in (0, 1)
        return float(x).is_integer()
    except (TypeError, ValueError, OverflowError):
        return False


def describe(v) -> str:
    """A value as the user wrote it: 'a tensor', 'the string 'a'', 'the number 1.5'."""
    if isinstance(v, Tensor):
        return f"a tensor {v.node.type}"
    if isinstance(v, bool):
        return f"the bool {v}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, Dim):
        return f"the dimension {v}"
    if isinstance(v, str):
        return f"the string {str(v)!r}"
    if isinstance(v, (list, tuple)):
        return "a list"
    if v is None:
        return "None"
    if isinstance(v, BlockDef):
        return f"the block {v.name!r}"
    return f"a {type(v).__name__}"


# lmc's own source files: a user's line is the first frame outside them
_LMC_SOURCES = os.path.dirname(os.path.dirname(__file__)) + os.sep


def _caller_loc() -> Optional[Loc]:
    """The first stack frame outside the lmc package: where a Python block called us (not
    lmc/ops/scan.py, which builds a scan for the block's ``b.scan``)."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(_LMC_SOURCES):
        f = f.f_back
    return Loc(f.f_code.co_filename, f.f_lineno, 1) if f is not None else None


def _block_error(name: str, e: Exception, called: Optional[Loc]) -> LmcError:
    """A Python exception from a block's function, as one error at the block's line that
    raised it (the innermost frame outside lmc), naming where the block was called."""
    import traceback
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(_LMC_SOURCES)]
    msg = f"block {name} raised {type(e).__name__}: {e}"
    if not frames:
        return LmcError(msg, called)
    f = frames[-1]
    at = Loc(f.filename, f.lineno or 1, (getattr(f, "colno", None) or 0) + 1)   # (3.11+)
    if called is not None and called.file != at.file:
        msg += f" (called at {os.path.basename(called.file)}:{called.line})"
    return LmcError(msg, at)


class Builder:
    """Creates nodes in one scope (the model, or one block instance)."""

    def __init__(self, config: Dict[str, Any], blocks: Dict[str, BlockDef], scope: str = "",
                 *, params: Optional[Dict[str, Node]] = None, stack: Sequence[str] = (),
                 default_dtype: DType = DType.f32):
        self.config = config
        self.blocks = blocks
        self.scope = scope
        self.nodes: List[Node] = []
        self.params = {} if params is None else params  # shared: full name -> PARAM node
        self.stack = tuple(stack)                       # block names being built (cycles)
        self.instances: Dict[str, int] = {}
        self.default_dtype = default_dtype
        self.loc: Optional[Loc] = None  # set by the YAML evaluator; else taken from the caller

    @contextlib.contextmanager
    def sub_scope(self, name: str):
        """Nodes, params and block instances created inside are named under `name`
        (a loop uses this for ``layers.3``)."""
        saved = self.scope, self.instances
        self.scope = f"{self.scope}.{name}" if self.scope else name
        self.instances = {}
        try:
            yield self
        finally:
            self.scope, self.instances = saved

    # -- node creation ---------------------------------------------------------------------
    def _where(self) -> Optional[Loc]:
        return self.loc if self.loc is not None else _caller_loc()

    def node(self, op: Op, inputs=(), attrs=None) -> Tensor:
        ins = [self.lift(x) for x in inputs]
        n = Node.make(op, [i.node for i in ins], attrs, self._where(), self.scope)
        self.nodes.append(n)
        return Tensor(n, self)

    def lift(self, x, like: Optional[Tensor] = None) -> Tensor:
        if isinstance(x, Tensor):
            return x
        if isinstance(x, bool):
            return self.const(x, DType.bool)
        if isinstance(x, Number):
            dt = like.dtype if like is not None else self.default_dtype
            if not dt.is_float and not _exact_in(x, dt):
                # an int or bool tensor takes a number as its own dtype: 0.5 would become 0
                art = "an" if dt.value[0] in "aeiou" else "a"
                self._fail(f"the number {x!r} with {art} {dt.value} tensor would become "
                           f"{dt.value} too: cast the tensor first, e.g. cast(x, 'f32') * {x!r}")
            return self.const(x, dt)
        raise LmcError(f"expected a tensor or a number, got {describe(x)}", self._where())

    def _pair(self, a, b):
        if isinstance(a, Tensor) and not isinstance(b, Tensor):
            return a, self.lift(b, a)
        if isinstance(b, Tensor) and not isinstance(a, Tensor):
            return self.lift(a, b), b
        return self.lift(a), self.lift(b)

    # -- argument checks (user-facing messages, not Python's) ----------------------------------
    def _fail(self, msg: str):
        raise LmcError(msg, self._where())

    def _list(self, fn: str, what: str, v, hint: str = "") -> list:
        # any iterable but a tensor (which refuses iteration) or a string (Python blocks may
        # pass a range or a generator)
        if isinstance(v, (Tensor, str, bytes)) or not hasattr(v, "__iter__"):
            self._fail(f"{fn} expects {what}, got {describe(v)}" + (f" ({hint})" if hint else ""))
        return list(v)

    def _dims(self, fn: str, v, what: str = "a shape (a list of dimensions)",
              hint: str = "e.g. [B, T, d]"):
        out = []
        for i, d in enumerate(self._list(fn, what, v, hint)):
            try:
                out.append(norm(d))
            except TypeError:
                self._fail(f"{fn}: dimension {i} must be an integer, got {describe(d)}")
        return out

    def _dim(self, fn: str, what: str, v):
        try:
            return norm(v)
        except TypeError:
            self._fail(f"{fn}: {what} must be an integer, got {describe(v)}")

    def _int(self, fn: str, what: str, v) -> int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            self._fail(f"{fn}: {what} must be an integer, got {describe(v)}")
        return v

    def _axis(self, fn: str, axis, rank: int, what: str = "axis") -> int:
        from ..ops.shapes import axis_of
        try:
            return axis_of(axis, rank, what)
        except LmcError as e:
            raise LmcError(f"{fn}: {e.message}", self._where()) from None

    def _number(self, fn: str, what: str, v) -> float:
        if isinstance(v, bool) or not isinstance(v, Number):
            self._fail(f"{fn}: {what} must be a number, got {describe(v)}")
        return v

    def _bool(self, fn: str, what: str, v) -> bool:
        if isinstance(v, int) and v in (0, 1):      # 0/1 as False/True, as before
            return bool(v)
        if not isinstance(v, bool):
            self._fail(f"{fn}: {what} must be True or False, got {describe(v)}")
        return v

    def _dtype(self, fn: str, v) -> DType:
        try:
            return DType.of(v)
        except ValueError as e:
            self._fail(f"{fn}: {e}")

    def _seed(self, fn: str, seed):
        if isinstance(seed, Tensor):
            return seed
        return self.const(self._int(fn, "seed", seed), DType.i64)

    # -- sources -----------------------------------------------------------------------------
    def input(self, name: str, shape, dtype="i64") -> Tensor:
        return self.node(Op.INPUT, (), {"name": name, "shape": tuple(shape),
                                        "dtype": self._dtype("input", dtype)})

    def param(self, name: str, shape, init: inits.Init = inits.normal(0.02), dtype=None) -> Tensor:
        if not isinstance(name, str) or not name.isidentifier():
            self._fail(f"param: the name must be an identifier, got {describe(name)}")
        shape = self._dims("param", shape)
        if not all(isinstance(d, int) for d in shape):
            self._fail(f"param {name!r}: the shape must be static (numbers and config values, "
                       f"not B or T), got [{', '.join(map(str, shape))}]")
        if not isinstance(init, inits.Init):
            hint = " (call it: lmc.init.zeros())" if callable(init) else ""
            self._fail(f"param {name!r}: init must be an initialiser such as "
                       f"lmc.init.normal(0.02), got {describe(init)}{hint}")
        full = f"{self.scope}.{name}" if self.scope else name
        if full in self.params:
            raise LmcError(f"duplicate parameter name {full!r}", self._where())
        t = self.node(Op.PARAM, (), {"name": full, "shape": tuple(shape),
                                     "dtype": self._dtype(f"param {name!r}",
                                                          dtype or self.default_dtype),
                                     "init": init})
        self.params[full] = t.node
        return t

    def const(self, value, dtype=None) -> Tensor:
        dt = self._dtype("const", dtype) if dtype is not None else self.default_dtype
        # a number, a torch tensor or nested lists of numbers (or a size, which autodiff
        # divides by); checked here, not when the graph first runs
        if not isinstance(value, Dim):
            self._const_value(value, dt)
        return self.node(Op.CONST, (), {"value": value, "dtype": dt})

    def _const_value(self, value, dt: DType) -> None:
        import torch
        what = "a number, a torch tensor or nested lists of numbers"
        if isinstance(value, torch.Tensor):
            t = value
        elif isinstance(value, numbers.Real):        # numpy's scalars too
            if not dt.is_float and not _exact_in(value, dt):
                self._fail(f"const: {value!r} is not a {dt.value} value")
            return
        elif isinstance(value, (list, tuple)):
            try:
                t = torch.tensor(value, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                self._fail(f"const: the value must be {what}, got a {type(value).__name__} "
                           "that is not (ragged, or not numbers)")
        else:
            self._fail(f"const: the value must be {what}, got {describe(value)}")
        if t.is_complex():
            self._fail(f"const: the value must be {what}, got a complex tensor")
        if not dt.is_float:
            ok = not t.is_floating_point() or bool((t.isfinite() & (t == t.round())).all())
            if dt is DType.bool and t.dtype is not torch.bool:
                ok = ok and bool(((t == 0) | (t == 1)).all())
            if not ok:
                self._fail(f"const: the value holds numbers that are not {dt.value} values")

    def iota(self, length, dtype="i64") -> Tensor:
        return self.node(Op.IOTA, (), {"length": self._dim("iota", "the length", length),
                                       "dtype": self._dtype("iota", dtype)})

    def causal_mask(self, rows, cols=None, window: int = 0) -> Tensor:
        rows = self._dim("causal_mask", "rows", rows)
        cols = rows if cols is None else self._dim("causal_mask", "cols", cols)
        return self.node(Op.CAUSAL_MASK, (), {"rows": rows, "cols": cols,
                                              "window": self._int("causal_mask", "window",
                                                                  window)})

    # -- pointwise -----------------------------------------------------------------------------
    def _unary(self, op: Op, x, **attrs) -> Tensor:
        return self.node(op, (self.lift(x),), attrs)

    def _binary(self, op: Op, a, b) -> Tensor:
        return self.node(op, self._pair(a, b))

    def neg(self, x): return self._unary(Op.NEG, x)
    def exp(self, x): return self._unary(Op.EXP, x)
    def log(self, x): return self._unary(Op.LOG, x)
    def sqrt(self, x): return self._unary(Op.SQRT, x)
    def rsqrt(self, x): return self._unary(Op.RSQRT, x)
    def sigmoid(self, x): return self._unary(Op.SIGMOID, x)
    def tanh(self, x): return self._unary(Op.TANH, x)
    def silu(self, x): return self._unary(Op.SILU, x)
    def erf(self, x): return self._unary(Op.ERF, x)
    def sin(self, x): return self._unary(Op.SIN, x)
    def cos(self, x): return self._unary(Op.COS, x)
    def abs(self, x): return self._unary(Op.ABS, x)
    def sign(self, x): return self._unary(Op.SIGN, x)
    def round(self, x): return self._unary(Op.ROUND, x)
    def relu(self, x): return self._unary(Op.RELU, x)
    def logsigmoid(self, x): return self._unary(Op.LOGSIGMOID, x)
    def softplus(self, x): return self._unary(Op.SOFTPLUS, x)
    def stop_gradient(self, x): return self._unary(Op.STOP_GRADIENT, x)

    def gelu(self, x, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise LmcError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}",
                           self._where())
        return self._unary(Op.GELU, x, approximate=approximate)

    def clamp(self, x, lo=None, hi=None):
        for what, v in (("lo", lo), ("hi", hi)):
            if v is not None:
                self._number("clamp", what, v)
        if lo is not None and hi is not None and lo > hi:
            self._fail(f"clamp: lo must be <= hi, got lo={lo} > hi={hi}")
        return self._unary(Op.CLAMP, x, lo=lo, hi=hi)

    def cast(self, x, dtype):
        return self._unary(Op.CAST, x, dtype=self._dtype("cast", dtype))

    def add(self, a, b): return self._binary(Op.ADD, a, b)
    def sub(self, a, b): return self._binary(Op.SUB, a, b)
    def mul(self, a, b): return self._binary(Op.MUL, a, b)
    def div(self, a, b): return self._binary(Op.DIV, a, b)
    def pow(self, a, b): return self._binary(Op.POW, a, b)
    def maximum(self, a, b): return self._binary(Op.MAX, a, b)
    def minimum(self, a, b): return self._binary(Op.MIN, a, b)
    def lt(self, a, b): return self._binary(Op.LT, a, b)
    def le(self, a, b): return self._binary(Op.LE, a, b)
    def gt(self, a, b): return self._binary(Op.GT, a, b)
    def ge(self, a, b): return self._binary(Op.GE, a, b)
    def eq(self, a, b): return self._binary(Op.EQ, a, b)
    def ne(self, a, b): return self._binary(Op.NE, a, b)

    def where(self, cond, a, b):
        a, b = self._pair(a, b)
        return self.node(Op.WHERE, (self.lift(cond), a, b))

    # -- reductions ------------------------------------------------------------------------------
    # keepdim defaults to True so that `x - mean(x, -1)` broadcasts as written
    def sum(self, x, axis=-1, keepdim=True):
        keepdim = self._bool("sum", "keepdim", keepdim)
        return self.node(Op.SUM, (x,), {"axis": axis, "keepdim": keepdim})

    def mean(self, x, axis=-1, keepdim=True):
        keepdim = self._bool("mean", "keepdim", keepdim)
        return self.node(Op.MEAN, (x,), {"axis": axis, "keepdim": keepdim})

    def amax(self, x, axis=-1, keepdim=True):
        keepdim = self._bool("amax", "keepdim", keepdim)
        return self.node(Op.AMAX, (x,), {"axis": axis, "keepdim": keepdim})

    def logsumexp(self, x, axis=-1, keepdim=True):
        keepdim = self._bool("logsumexp", "keepdim", keepdim)
        return self.node(Op.LOGSUMEXP, (x,), {"axis": axis, "keepdim": keepdim})

    def softmax(self, x, axis=-1):
        return self.node(Op.SOFTMAX, (x,), {"axis": axis})

    def cumsum(self, x, axis=-1):
        return self.node(Op.CUMSUM, (x,), {"axis": axis})

    def cumprod(self, x, axis=-1):
        return self.node(Op.CUMPROD, (x,), {"axis": axis})

    def matmul(self, a, b):
        return self.node(Op.MATMUL, (a, b))

    # -- views -----------------------------------------------------------------------------------
    def reshape(self, x, shape):
        return self.node(Op.RESHAPE, (x,), {"shape": tuple(self._dims("reshape", shape))})

    def permute(self, x, perm):
        perm = self._list("permute", "a list of axes", perm, "e.g. [0, 2, 1, 3]")
        return self.node(Op.PERMUTE, (x,), {"perm": tuple(perm)})

    def transpose(self, x, a=-2, b=-1):
        x = self.lift(x)
        perm = list(range(x.rank))
        a, b = (self._axis("transpose", v, x.rank) for v in (a, b))
        perm[a], perm[b] = perm[b], perm[a]
        return self.permute(x, perm)

    def expand(self, x, shape):
        return self.node(Op.EXPAND, (x,), {"shape": tuple(self._dims("expand", shape))})

    def slice(self, x, axis, start=0, stop=None, step=1):
        start = self._dim("slice", "start", start)
        stop = None if stop is None else self._dim("slice", "stop", stop)
        return self.node(Op.SLICE, (x,), {"axis": axis, "start": start, "stop": stop,
                                          "step": step})

    def concat(self, xs, axis=-1):
        xs = self._list("concat", "a list of tensors", xs, "write concat([a, b], axis)")
        return self.node(Op.CONCAT, tuple(xs), {"axis": axis})

    def split(self, x, parts, axis=-1):
        """`parts` equal pieces (an int) or pieces of the listed sizes, as slices."""
        x = self.lift(x)
        ax = self._axis("split", axis, x.rank)
        size = x.shape[ax]
        if isinstance(parts, float) and parts.is_integer():
            parts = int(parts)
        if isinstance(parts, int) and not isinstance(parts, bool):
            if parts < 1:
                self._fail(f"split: the number of pieces must be at least 1, got {parts}")
            q = Dim.exact_div(size, parts) if isinstance(size, Dim) else (
                size // parts if size % parts == 0 else None)
            if q is None:
                raise LmcError(f"split: axis {ax} of size {size} does not divide into "
                               f"{parts} parts", self._where())
            sizes = [q] * parts
        else:
            sizes = self._dims("split", parts, "a number of pieces or a list of sizes",
                               "e.g. split(x, 2, -1) or split(x, [d, 2 * d], -1)")
            if not sizes:
                self._fail("split: the list of sizes is empty")
            for s in sizes:
                if isinstance(s, int) and s < 0:
                    self._fail(f"split: negative size {s}")
            total = norm(sum(sizes[1:], as_dim(sizes[0])))
            if not dims_equal(total, size):
                self._fail(f"split: sizes [{', '.join(map(str, sizes))}] add up to {total}, "
                           f"but axis {ax} has size {size}")
        out, start = [], 0
        for s in sizes:
            out.append(self.slice(x, ax, start, norm(start + s)))
            start = norm(start + s)
        return tuple(out)

    def index(self, x, idx):
        """Basic slicing: x[..., a:b], x[:, 0:k:2] (ints index without keeping the axis)."""
        x = self.lift(x)
        idx = idx if isinstance(idx, tuple) else (idx,)
        n_ell = sum(1 for i in idx if i is Ellipsis)
        if n_ell > 1:
            raise LmcError("only one ... in an index", self._where())
        if n_ell:
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (x.rank - len(idx) + 1) + idx[k + 1:]
        if len(idx) > x.rank:
            raise LmcError(f"too many indices for a rank-{x.rank} tensor", self._where())
        squeeze = []
        for ax, i in enumerate(idx):
            if isinstance(i, slice):
                if (i.start, i.stop, i.step) != (None, None, None):
                    x = self.slice(x, ax, 0 if i.start is None else i.start, i.stop,
                                   1 if i.step is None else i.step)
            elif isinstance(i, (int, Dim)):
                i = norm(i)
                stop = (x.shape[ax] if i == -1 else norm(i + 1))
                x = self.slice(x, ax, i, stop)
                squeeze.append(ax)
            else:
                raise LmcError(f"unsupported index {i!r}", self._where())
        if squeeze:
            x = self.reshape(x, [d for a, d in enumerate(x.shape) if a not in squeeze])
        return x

    # -- indexing ---------------------------------------------------------------------------------
    def embedding(self, table, ids):
        return self.node(Op.EMBEDDING, (table, ids))

    def gather(self, x, idx, axis=-1):
        return self.node(Op.GATHER, (x, idx), {"axis": axis})

    def scatter_add(self, x, idx, src, axis=-1):
        return self.node(Op.SCATTER_ADD, (x, idx, src), {"axis": axis})

    def topk(self, x, k, axis=-1):
        """Indices of the k largest along `axis` (ties: lower index first); values are
        `gather(x, topk(x, k), axis)`."""
        return self.node(Op.TOPK, (x,), {"k": k, "axis": axis})

    def dropout(self, x, p, seed):
        p = self._number("dropout", "p", p)
        seed = self._seed("dropout", seed)
        return self.node(Op.DROPOUT, (x, seed), {"p": float(p)})

    def gaussian_noise(self, x, std, seed):
        """x + std * N(0, 1) in training mode (the draw fixed by seed and shape); x in eval."""
        seed = self._seed("gaussian_noise", seed)
        return self.node(Op.GAUSSIAN_NOISE, (x, seed), {"std": std})

    def scan(self, step, carry, xs, axis=1, name: Optional[str] = None, **options):
        """A recurrence over `axis`: ``ys, carry_T = scan(step, carry0, xs, axis)``, where the
        block `step(carry..., x_t...)` returns (new_carry..., y_t...). See lmc/ops/scan.py."""
        from ..ops.scan import build
        return build(self, step, carry, xs, axis, name, options)

    # -- blocks ---------------------------------------------------------------------------------
    def call(self, block, *args, name: Optional[str] = None, **options):
        """Instantiate a block: its nodes go into a BLOCK node's body graph, its params are
        named ``<scope>.<instance>.<param>``. Returns a Tensor or a tuple of them."""
        where = self._where()
        bdef = (self.blocks.get(block) if isinstance(block, str)
                else getattr(block, "lmc_block", block))
        if not isinstance(bdef, BlockDef):
            raise LmcError(f"unknown block {block!r}" if isinstance(block, str) else
                           f"expected a block, got {describe(block)}", where)
        if isinstance(name, int) and not isinstance(name, bool) and name >= 0:
            name = str(name)               # a loop index: name=i
        if name is not None and (not isinstance(name, str) or not name or not all(
                p.isidentifier() or p.isdigit() for p in name.split("."))):
            raise LmcError(f"block instance name must be a name (letters, digits, _, dots "
                           f"between them), got {describe(name)}", where)
        if bdef.name in self.stack:
            cycle = " -> ".join(self.stack[self.stack.index(bdef.name):] + (bdef.name,))
            raise LmcError(f"cyclic block reference: {cycle}", where)
        if len(args) != len(bdef.args):
            raise LmcError(f"block {bdef.name} takes {len(bdef.args)} tensor argument(s) "
                           f"({', '.join(bdef.args)}), got {len(args)}", where)
        unknown = set(options) - set(bdef.options) - set(bdef.required)
        if unknown:
            raise LmcError(f"block {bdef.name} has no option {sorted(unknown)[0]!r}", where)
        opts = {}
        for k in list(bdef.required) + list(bdef.options):
            if k in options:
                opts[k] = options[k]
            elif k in bdef.options:
                opts[k] = bdef.options[k]
            elif k in self.config:
                opts[k] = self.config[k]
            else:
                raise LmcError(f"block {bdef.name} needs option {k!r} (not in the config "
                               f"either)", where)
        inst = name or bdef.name
        n = self.instances.get(inst, 0)
        self.instances[inst] = n + 1
        if n and not name:
            inst = f"{inst}_{n}"
        elif n:
            raise LmcError(f"duplicate block instance name {inst!r} in scope "
                           f"{self.scope or '<model>'}", where)
        child = Builder(self.config, self.blocks, f"{self.scope}.{inst}" if self.scope else inst,
                        params=self.params, stack=self.stack + (bdef.name,),
                        default_dtype=self.default_dtype)
        ins = [self.lift(a) for a in args]
        placeholders = []
        for an, a in zip(bdef.args, ins):
            child.loc = where
            placeholders.append(child.input(an, a.shape, a.dtype))
        child.loc = None
        try:
            result = bdef.fn(child, *placeholders, **opts)
        except LmcError:
            raise
        except Exception as e:  # a bug in a user's Python block: say where, not a traceback
            raise _block_error(bdef.name, e, where) from e
        multi = isinstance(result, (tuple, list))
        outs = list(result) if multi else [result]
        for o in outs:
            if not isinstance(o, Tensor):
                raise LmcError(f"block {bdef.name} must return tensors, got {o!r}", where)
        body = Graph(bdef.name, child.nodes, {str(i): o.node for i, o in enumerate(outs)})
        self.loc, saved = where, self.loc
        call = self.node(Op.BLOCK, ins, {"block": bdef.name, "instance": child.scope,
                                        "body": body})
        got = [self.node(Op.GETITEM, (call,), {"index": i}) for i in range(len(outs))]
        self.loc = saved
        return tuple(got) if multi else got[0]
