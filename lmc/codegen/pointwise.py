"""Triton source for a pointwise FUSED group.

One program handles BLOCK elements of the (contiguous) output. The flat index is split into
per-axis indices with the output's sizes, and each input is read through its own strides,
which are 0 on broadcast axes, so `x * rsqrt(m)` with m of shape [B, T, 1] needs no copy.
Sizes and strides are kernel arguments: a new batch size or length reuses the same code.
Floating-point values are computed in fp32 whatever they are stored as.

    @triton.jit
    def lmc_fused_add_rsqrt_2(in0_ptr, out0_ptr, N, S1, S2, in0_s0, in0_s1, in0_s2,
                              BLOCK: tl.constexpr): ...

The kernel declares only the parameters its body reads (`params.prune`: here not S0, the
outermost size, which the flat index's split never needs).
"""
from __future__ import annotations

import re
from typing import Dict, List

from ..errors import LmcError
from ..ir.dims import as_dim
from ..ir.graph import Graph, Node
from ..ir.ops import Op
from ..ir.types import DType
from . import interpreter_blocks, params, tlmath

TL_DTYPE = {DType.f32: "tl.float32", DType.f16: "tl.float16", DType.bf16: "tl.bfloat16",
            DType.i64: "tl.int64", DType.i32: "tl.int32", DType.bool: "tl.int1"}

HELPERS = '''
@triton.jit
def _round_half_even(x):
    # torch.round: halves go to the even neighbour
    r = tl.floor(x + 0.5)
    return tl.where((r - x == 0.5) & (r % 2 != 0), r - 1.0, r)


''' + tlmath.source(tlmath._tanh) + '''

@triton.jit
def _log1p(y):
    # log(1 + y) without losing small y: correct log(u) by the rounding error of u = 1 + y
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)): exp never overflows, never log(0)
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))
'''

_UNARY = {
    Op.NEG: "-({0})", Op.EXP: "tl.exp({0})", Op.LOG: "tl.log({0})", Op.SQRT: "tl.sqrt({0})",
    Op.RSQRT: "tl.rsqrt({0})", Op.SIGMOID: "tl.sigmoid({0})", Op.TANH: "_tanh({0})",
    Op.SILU: "({0}) * tl.sigmoid({0})", Op.ERF: "tl.erf({0})", Op.SIN: "tl.sin({0})",
    Op.COS: "tl.cos({0})", Op.ABS: "tl.abs({0})", Op.ROUND: "_round_half_even({0})",
    Op.RELU: "tl.where({0} > 0, {0}, 0.0)",
    Op.SOFTPLUS: "_softplus({0})", Op.LOGSIGMOID: "(-_softplus(-({0})))",
    Op.STOP_GRADIENT: "{0}",  # the backward was derived before fusion: here it is the identity
}
_BINARY = {
    Op.ADD: "{0} + {1}", Op.SUB: "{0} - {1}", Op.MUL: "{0} * {1}", Op.DIV: "{0} / {1}",
    Op.MAX: "tl.maximum({0}, {1})", Op.MIN: "tl.minimum({0}, {1})", Op.LT: "{0} < {1}",
    Op.LE: "{0} <= {1}", Op.GT: "{0} > {1}", Op.GE: "{0} >= {1}", Op.EQ: "{0} == {1}",
    Op.NE: "{0} != {1}",
}


def literal(n: Node) -> str:
    v = n.attrs["value"]
    if n.type.dtype is DType.bool:
        return "True" if v else "False"
    if n.type.dtype.is_int:
        return str(int(v))
    v = float(v)
    if v != v:
        return 'float("nan")'
    if v in (float("inf"), float("-inf")):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(v)


def _expr(n: Node, a: List[str]) -> str:
    op = n.op
    if op in _UNARY:
        return _UNARY[op].format(*a)
    if op in _BINARY:
        return "(" + _BINARY[op].format(*a) + ")"
    if op is Op.WHERE:
        return f"tl.where({a[0]}, {a[1]}, {a[2]})"
    if op is Op.GELU:
        if n.attrs.get("approximate", "none") == "tanh":
            return (f"0.5 * {a[0]} * (1.0 + _tanh(0.7978845608028654 * ({a[0]} + 0.044715 * "
                    f"{a[0]} * {a[0]} * {a[0]})))")
        return f"0.5 * {a[0]} * (1.0 + tl.erf({a[0]} * 0.7071067811865476))"
    if op is Op.SIGN:
        return f"(tl.where({a[0]} > 0, 1.0, 0.0) - tl.where({a[0]} < 0, 1.0, 0.0))"
    if op is Op.CLAMP:
        x = a[0]
        if n.attrs["lo"] is not None:
            x = f"tl.maximum({x}, {float(n.attrs['lo'])!r})"
        if n.attrs["hi"] is not None:
            x = f"tl.minimum({x}, {float(n.attrs['hi'])!r})"
        return x
    if op is Op.CAST:
        if n.type.dtype in (DType.f16, DType.bf16):
            # rounded to the narrow type, then computed on in fp32 as every value of a kernel
            # (Triton's exp, tanh, ... take fp32 only); a store narrows it again, exactly
            return f"({a[0]}).to({TL_DTYPE[n.type.dtype]}).to(tl.float32)"
        return f"({a[0]}).to({TL_DTYPE[n.type.dtype]})"
    if op is Op.POW:
        e = float(n.inputs[1].attrs["value"])
        x = a[0]
        return {2.0: f"({x} * {x})", 3.0: f"({x} * {x} * {x})", 0.5: f"tl.sqrt({x})",
                -0.5: f"tl.rsqrt({x})", -1.0: f"(1.0 / {x})", 1.0: x}[e]
    raise LmcError(f"internal: no Triton lowering for {op.value}")


def generate(body: Graph, name: str) -> str:
    """The @triton.jit kernel for one pointwise body graph, as source text.

    Values are emitted on demand at an index (one index expression per output axis, and the
    mask of lanes that load). A concat picks its piece by the index along its axis: each
    piece is evaluated at the index shifted by the piece's offset, its loads masked to the
    lanes inside it, and tl.where selects. So `concat(-x2, x1) * sin` reads x2 and x1 in
    place, with no stored concat."""
    inputs = [n for n in body.nodes if n.op is Op.INPUT]
    outputs = list(body.outputs.values())
    rank = max(_space(outputs[0]).type.rank, 1)
    drops = dropouts(body)
    strided = sorted(body.meta.get("strided_outputs", ()))   # stored in a permuted layout
    src_nodes = [m for m in body.nodes if m.op is not Op.INPUT and m.op is not Op.CONST]
    # a dropout's seed changes every step: no specialisation on its value, and always int64
    # (a literal seed at step 0 fits int32, the draws after it do not: one variant, which
    # the warm pass compiles before step 0)
    jit = "@triton.jit" if not drops else "@triton.jit(do_not_specialize=[" + ", ".join(
        f'"seed{j}"' for j in range(len(drops))) + "])"
    lines = [
        jit,
        "",       # the signature: the parameters the body reads (params.prune), below
        "    # IR nodes: " + ", ".join(
            f"{m.op.value}" + (f"@{m.loc.file.rsplit('/', 1)[-1]}:{m.loc.line}" if m.loc else "")
            for m in src_nodes),
        "    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: large N",
        "    mask = offs < N",
    ] + split_index("offs", "i", "S", rank)
    input_no = {n: i for i, n in enumerate(inputs)}
    memo: Dict[tuple, str] = {}
    fresh = iter(range(1 << 30))

    def emit(m: Node, at: tuple) -> str:
        """The name (or literal) of m's value at index `at` = (axis expressions, mask)."""
        key = (m, at)
        if key in memo:
            return memo[key]
        idx, msk = at
        k = next(fresh)
        if m.op is Op.CONST:
            memo[key] = literal(m)
            return memo[key]
        if m.op is Op.INPUT:
            i = input_no[m]
            off = " + ".join(f"{idx[d]} * in{i}_s{d}" for d in range(rank))
            if all(d == "0" for d in idx):      # one element for every lane (a block load)
                off = "offs * 0"
            elif all(_const_index(d) is not None for d in idx):    # likewise, not the first
                off = f"offs * 0 + {off}"
            load = f"tl.load(in{i}_ptr + ({off}), mask={msk}, other=0)"
            if m.type.dtype in (DType.f16, DType.bf16):
                load += ".to(tl.float32)"  # compute in fp32
            lines.append(f"    v{k} = {load}")
        elif m.op is Op.DROPOUT:
            if at != top:
                raise LmcError("internal: a dropout evaluated at a shifted index (a concat "
                               "piece); its mask is drawn by the element's own index")
            j = drops.index(m)
            x = emit(m.inputs[0], at)
            lines.append(f"    t{k} = tl.where(tl.rand(seed{j}, offs.to(tl.int32)) >= p{j}, "
                         f"{x} / q{j}, 0.0)  # dropout: Philox of the element index")
        elif m.op is Op.IOTA:         # the index along its (the last) axis; 0 when size 1
            i = "(offs * 0)" if m.attrs["length"] == 1 else idx[rank - 1]
            memo[key] = f"({i}).to({TL_DTYPE[m.type.dtype]})"
            return memo[key]
        elif m.op is Op.SLICE:        # x at the index shifted by the slice's start
            ax = rank - m.type.rank + m.attrs["axis"] % m.type.rank
            start = m.attrs["start"]
            # on an axis where the slice has size 1 (or lacks) its reader broadcasts it: 0
            idx = tuple("0" if d < rank - m.type.rank or
                        m.type.shape[d - rank + m.type.rank] == 1 else idx[d]
                        for d in range(rank))
            shifted = idx[:ax] + ((f"({idx[ax]} + {start})" if start else idx[ax]),) + \
                idx[ax + 1:]
            memo[key] = emit(m.inputs[0], (shifted, msk))
            return memo[key]
        elif m.op is Op.RESHAPE:      # axes of size 1 added or dropped: x's index, aligned
            memo[key] = emit(m.inputs[0], (_unit_reshape_index(m, idx, rank), msk))
            return memo[key]
        elif m.op is Op.CONCAT:
            ax = rank - m.type.rank + m.attrs["axis"]
            offsets = _concat_offsets(m, ax, _space(outputs[0]))
            c = _const_index(idx[ax])
            if c is not None and all(isinstance(o, int) for o in offsets) and \
                    offsets[0] <= c < offsets[-1]:
                # read at one index along its axis (a size-1 slice of it): that piece alone
                j = max(j for j, o in enumerate(offsets[:-1]) if o <= c)
                shifted = idx[:ax] + (str(c - offsets[j]),) + idx[ax + 1:]
                memo[key] = emit(m.inputs[j], (shifted, msk))
                return memo[key]
            pieces = []
            for j, x in enumerate(m.inputs):
                start, stop = offsets[j], offsets[j + 1]
                lines.append(f"    j{k}_{j} = {idx[ax]} - {start}  # concat piece "
                             f"[{start}, {stop}) along axis {ax}")
                lines.append(f"    m{k}_{j} = {msk} & ({idx[ax]} >= {start}) & "
                             f"({idx[ax]} < {stop})")
                shifted = idx[:ax] + (f"j{k}_{j}",) + idx[ax + 1:]
                pieces.append((start, emit(x, (shifted, f"m{k}_{j}"))))
            expr = pieces[-1][1]
            for (_, v), (start, _) in zip(reversed(pieces[:-1]), reversed(pieces[1:])):
                expr = f"tl.where({idx[ax]} < {start}, {v}, {expr})"
            lines.append(f"    t{k} = {expr}  # concat -> {m.type}")
            memo[key] = f"t{k}"
            return memo[key]
        else:
            e = _expr(m, [emit(x, at) for x in m.inputs])
            lines.append(f"    t{k} = {e}  # {m.op.value} -> {m.type}")
        memo[key] = f"{'v' if m.op is Op.INPUT else 't'}{k}"
        return memo[key]

    top = (tuple(f"i{d}" for d in range(rank)), "mask")
    for i, o in enumerate(outputs):
        if o.op is Op.INDEX_COPY:       # fuse_cache_writes: stored into the cache, in place
            cache, pos, value = o.inputs
            c, p = input_no[cache], input_no[pos]
            ax = o.attrs["axis"] % o.type.rank
            v = emit(value, top)
            lines.append(f"    pos{i} = tl.load(in{p}_ptr + i{ax} * in{p}_s{rank - 1}, "
                         f"mask=mask, other=0)  # the cache slot of each new position")
            off = " + ".join(f"pos{i} * in{c}_s{d}" if d == ax else f"i{d} * in{c}_s{d}"
                             for d in range(rank))
            lines.append(f"    tl.store(in{c}_ptr + ({off}), ({v}).to("
                         f"{TL_DTYPE[o.type.dtype]}), mask=mask)  # out{i} is in{c}")
            continue
        v = emit(o, top)
        off = "offs" if i not in strided else "(" + " + ".join(
            f"i{d} * out{i}_s{d}" for d in range(rank)) + ")"
        lines.append(f"    tl.store(out{i}_ptr + {off}, ({v}).to({TL_DTYPE[o.type.dtype]}), "
                     f"mask=mask)" + ("  # a permuted layout" if i in strided else ""))
    args = params.prune(_params(body), "\n".join(lines[2:]))
    lines[1] = f"def {name}({', '.join(args)}, BLOCK: tl.constexpr):"
    return "\n".join(lines) + "\n"


def split_index(flat: str, idx: str, size: str, rank: int, ind: str = "    ") -> List[str]:
    """Lines splitting the flat index `flat` into per-axis indices idx0 .. idx{rank-1}, the
    last fastest, with the sizes size1 .. size{rank-1} (the outermost size is not needed)."""
    if rank <= 1:
        return [f"{ind}{idx}0 = {flat}"]
    lines, rem = [], flat
    for d in reversed(range(1, rank)):
        lines.append(f"{ind}{idx}{d} = {rem} % {size}{d}")
        if d == 1:
            lines.append(f"{ind}{idx}0 = {rem} // {size}1")
        else:
            lines.append(f"{ind}rem = {rem} // {size}{d}")
            rem = "rem"
    return lines


def _params(body: Graph) -> List[str]:
    """Every parameter a pointwise kernel of `body` may read, in order: pointers, N, the
    output's sizes, the inputs' strides (and the strided outputs'), each dropout's seed, p
    and q. The kernel declares those it reads; `launch` passes values for all of them."""
    n_in = sum(m.op is Op.INPUT for m in body.nodes)
    outputs = list(body.outputs.values())
    rank = max(_space(outputs[0]).type.rank, 1)
    strided = sorted(body.meta.get("strided_outputs", ()))
    return [f"in{i}_ptr" for i in range(n_in)] + \
        [f"out{i}_ptr" for i in range(len(outputs))] + ["N"] + \
        [f"S{d}" for d in range(rank)] + \
        [f"in{i}_s{d}" for i in range(n_in) for d in range(rank)] + \
        [f"out{i}_s{d}" for i in strided for d in range(rank)] + \
        [f"{a}{j}" + (": tl.int64" if a == "seed" else "")
         for j in range(len(dropouts(body))) for a in ("seed", "p", "q")]


def _const_index(e: str) -> "int | None":
    """The value of index expression `e` when it is the same for every lane (numbers added
    and subtracted: a size-1 axis's "0", a slice's start added to it), else None."""
    if not re.fullmatch(r"[\d\s()+-]+", e):
        return None
    return int(eval(e))       # digits, parentheses, + and - only


def _concat_offsets(m: Node, ax: int, space: Node) -> List:
    """The pieces' start offsets along the concat's axis and its end, as kernel expressions:
    numbers up to the one symbolic piece, then the axis's size (the kernel's S{ax}) less the
    numbers after it (a causal shift's x[:, :T - s] after its s-position pad)."""
    sizes = [x.type.shape[m.attrs["axis"]] for x in m.inputs]
    sym = [j for j, d in enumerate(sizes) if not isinstance(d, int)]
    if not sym:
        out = [0]
        for d in sizes:
            out.append(out[-1] + d)
        return out
    # its extent: the kernel's size along the axis plus a number (a concat read through a
    # slice, concat(past, x)[:, :T], spans T + s where the kernel spans T)
    extra = as_dim(m.type.shape[m.attrs["axis"]]) - as_dim(space.type.shape[ax])
    if len(sym) > 1 or m.type.rank != space.type.rank or not isinstance(extra, int):
        raise LmcError(f"internal: a concat with symbolic pieces {sym} in a kernel over "
                       f"{space.type} (fuse_pointwise admits one, of the kernel's size along "
                       f"its axis plus a number)")
    (j0,) = sym
    head = [0]
    for d in sizes[:j0]:
        head.append(head[-1] + d)
    after = [sum(sizes[i:]) - extra for i in range(j0 + 1, len(sizes))]  # from S{ax}'s end
    end = f"S{ax}" if extra == 0 else f"(S{ax} + {extra})"
    return head + [f"(S{ax} - {r})" if r > 0 else f"(S{ax} + {-r})" if r else f"S{ax}"
                   for r in after] + [end]


def _unit_reshape_index(m: Node, idx: tuple, rank: int) -> tuple:
    """The index of reshape m's input, in the kernel's right-aligned axes, for m's index idx:
    the reshape adds or drops axes of size 1 only, so the input's axes of other sizes take,
    in order, the index of m's; its axes of size 1 (and those it lacks) take 0."""
    x = m.inputs[0]
    src = [idx[rank - m.type.rank + j] for j, d in enumerate(m.type.shape) if d != 1]
    out = ["0"] * (rank - x.type.rank)
    for d in x.type.shape:
        out.append("0" if d == 1 else src.pop(0))
    return tuple(out)


def dropouts(body: Graph) -> List[Node]:
    """The body's dropout nodes, in order: each takes (seed, p, q = 1 - p) kernel arguments."""
    return [m for m in body.nodes if m.op is Op.DROPOUT]


def _dropout_args(body: Graph, ctx) -> list:
    """Per dropout: the step's seed (its literal seed mixed with the draw counter, as the
    torch reference draws it), p (0 when not training: every element kept) and 1 - p."""
    args = []
    for m in dropouts(body):
        p = m.attrs["p"] if ctx.training else 0.0
        args += [ctx.seed(int(m.inputs[1].attrs["value"])), p, 1.0 - p]
    return args


def _space(o: Node) -> Node:
    """The value whose index space a kernel output spans: a cache write's new values."""
    return o.inputs[2] if o.op is Op.INDEX_COPY else o


def launch(kernel, xs, outs, body: Graph, ctx, interpret: bool) -> None:
    """One program per BLOCK elements of the output; inputs read through broadcast strides."""
    import triton

    shape = tuple(outs[0].shape)
    o = next(iter(body.outputs.values()))
    if o.op is Op.INDEX_COPY:     # written into a cache: the new values' index space
        pos = xs[[m for m in body.nodes if m.op is Op.INPUT].index(o.inputs[1])]
        shape = shape[:o.attrs["axis"]] + (pos.numel(),) + shape[o.attrs["axis"] + 1:]
    n = 1
    for d in shape:
        n *= d
    if n == 0:
        return
    sizes = list(shape) or [1]
    rank = len(sizes)
    strides = []
    for x in xs:
        # right-aligned with the output; 0 on broadcast (size-1) axes. An input read inside
        # a concat piece is smaller than the output along the concat's axis: its own strides
        pad = [0] * (rank - x.dim())
        strides.extend(pad + [0 if sz == 1 else st for sz, st in zip(x.shape, x.stride())])
    # the interpreter pays per program, so it gets big blocks; a GPU gets 1024
    block = min(triton.next_power_of_2(n), 16384) if interpret and interpreter_blocks() \
        else 1024
    if n >= 1 << 31 and dropouts(body):
        raise LmcError(f"dropout over {n} elements: at most 2^31 - 1 (int32 mask counters)")
    out_strides = [s for i in sorted(body.meta.get("strided_outputs", ()))
                   for s in outs[i].stride()]
    every = params.of_body(body, ("pointwise", tuple(body.meta.get("strided_outputs", ()))),
                           lambda: _params(body))
    args = params.bind(kernel, every, [*xs, *outs, n, *sizes, *strides, *out_strides,
                                       *_dropout_args(body, ctx)])
    kernel[(triton.cdiv(n, block),)](*args, BLOCK=block)
