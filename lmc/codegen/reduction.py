"""Triton source for a reduction FUSED group (lmc/passes/fuse_reductions.py).

The row space S (the shape the reductions read) is viewed as R rows of N elements: N is the
reduced axis, R the product of the other axes. One program owns BLOCK_R rows and walks
their N elements in BLOCK_N chunks. A group may hold reductions that depend on earlier ones
(softmax's max before its sum, RMSNorm's mean before the scale), so the kernel makes one pass
over the row per reduction depth, recomputing the cheap row prologue rather than writing it
out, and a last pass that computes and stores the row epilogue:

    pass 1   for each chunk: load, prologue, accumulate mean(x * x)       -> [BLOCK_R]
             per-row epilogue: rsqrt(m + eps)
    pass 2   for each chunk: load, x * r[:, None] * w, store

Every tensor is addressed through strides (0 on broadcast axes), row offsets in int64, and
the reduced axis may be any axis (a column sum reads along a strided axis). Accumulators are
fp32; logsumexp is computed online (running max and rescaled sum) in one pass. A static
decode step's cache write (fuse_cache_writes) stores a row output into the cache in place:
the row's slot along the write axis is pos[i_w], loaded once per row. A cumsum along the
kernel's axis is a row value: in each pass that needs it a per-row fp32 carry starts at 0
and each chunk adds its inclusive prefix (`tl.cumsum`) to it.

Slices of a row value along the reduced axis that a concat puts back together (RoPE's
rotate-half after a per-head QK-norm: ``concat([-x2, x1])``) are *pieces*
(fuse_reductions._pieces): never stored, each evaluated where the concat reads it, at the
chunk's columns shifted by the piece's offset and the slice's start (`shifted`), its loads
masked to the piece's columns and `tl.where` choosing by column. A piece recomputes the
row value it slices at those columns (x * rstd * w: the row's elements at the partner
columns, the per-row rstd as it is).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set

from ..ir.graph import Graph, Node
from ..ir.ops import Op
from ..ir.types import DType
from . import interpreter_blocks, params
from .pointwise import (  # noqa: F401  (HELPERS: the module)
    HELPERS,
    TL_DTYPE,
    _expr,
    literal,
    split_index,
)

RED_OPS = (Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP)
# a kernel with column sums (fuse_column_sums): a row is one chunk of at most COL_BLOCK_MAX
# (the pass takes rows up to it); on a GPU COL_PROGRAMS_PER_SM programs per SM walk the row
# blocks (more programs hide more latency, fewer make a smaller workspace: 8 x 132 partial
# rows of 768 fp32 are 3.2 MB, against the 75 MB a llama norm's separate column sum read; a
# value to measure); under the interpreter at most INTERPRET_COL_PROGRAMS, INTERPRET_COL_ROWS
# rows a block (0: the interpreter's usual; tests set 1 or 2 so programs walk several blocks)
COL_BLOCK_MAX = 2048
COL_PROGRAMS_PER_SM = 8
INTERPRET_COL_PROGRAMS = 3
INTERPRET_COL_ROWS = 0
# the chunk width of a row kernel under the interpreter (0: the whole row, up to 4096; tests
# set a small one so a row takes several chunks and a concat's pieces cross chunk edges)
INTERPRET_BLOCK_N = 0
# a scan along the kernel's axis: a row value computed in the pass loop, the chunks walked in
# order with a per-row carry
SCAN_OPS = (Op.CUMSUM,)


class Plan:
    """What generate and launch agree on: the row space, the level of every body node, which
    inputs are read per element (row level) and which once per row, and the outputs'
    levels."""

    def __init__(self, body: Graph):
        self.level: Dict[Node, str] = {}
        self.depth: Dict[Node, int] = {}
        self.outputs = list(body.outputs.values())
        # fuse_column_sums: the last `column_sums` outputs each sum a row value over every
        # row (a chain of sums over axis 0, the row value a pointwise one); level "col",
        # accumulated per program
        k = body.meta.get("column_sums", 0)
        self.columns: Dict[Node, Node] = {}     # column output -> the row value it sums
        for o in self.outputs[len(self.outputs) - k:]:
            n = o
            while True:
                self.level[n] = "col"
                if n.inputs[0].op is not Op.SUM:
                    break
                n = n.inputs[0]
            self.columns[o] = n.inputs[0]
        # the row space: the first reduction or scan that is not a column sum's
        first = next(n for n in body.nodes if n.op in RED_OPS + SCAN_OPS
                     and n not in self.level)
        self.space = first.inputs[0].type.shape
        self.axis = first.attrs["axis"] % len(self.space)
        self.rank = len(self.space)
        assert all(v.type.shape == self.space for v in self.columns.values())
        reds = [n for n in body.nodes if n.op in RED_OPS and n not in self.level]
        for n in body.nodes:
            if n.op is Op.INPUT or n.op is Op.CONST:
                self.depth[n] = 0
                continue
            if self.level.get(n) == "col":   # summed in the pass its row value is made
                self.depth[n] = self.depth[n.inputs[0]] + (n.inputs[0].type.shape
                                                           == self.space)
                continue
            if n.op is Op.INDEX_COPY:     # fuse_cache_writes: its value, stored in a cache
                self.level[n] = self.level[n.inputs[2]]
                self.depth[n] = self.depth[n.inputs[2]]
                continue
            if n.op in RED_OPS:
                self.level[n] = "per_row"
                self.depth[n] = self.depth[n.inputs[0]] + 1
            elif n.op is Op.SLICE or any(self.level.get(x) == "piece" for x in n.inputs):
                # narrower along the axis: computed only where a concat of the row space
                # reads it, at the shifted column (fuse_reductions._pieces)
                self.level[n] = "row" if n.op is Op.CONCAT and n.type.shape == self.space \
                    else "piece"
                self.depth[n] = max(self.depth[x] for x in n.inputs)
            else:
                self.level[n] = "row" if n.type.shape == self.space else "per_row"
                self.depth[n] = max([self.depth[x] for x in n.inputs] or [0])
        self.inputs = [n for n in body.nodes if n.op is Op.INPUT]
        self.input_levels: Dict[Node, Set[str]] = {n: set() for n in self.inputs}
        for n in body.nodes:
            if n.op is Op.INDEX_COPY:
                # the cache is the output's buffer (written in place), never loaded; the
                # positions are read once per row
                self.input_levels[n.inputs[1]].add("pos")
                continue
            for x in n.inputs:
                if x.op is Op.INPUT:
                    self.input_levels[x].add(self.read_level(n))
        self.passes = max([self.depth[n] for n in reds]
                          + [self.depth[o] + 1 for o in self.outputs
                             if self.level.get(o) == "row"]
                          + [self.depth[o] for o in self.columns])
        self.scans = [n for n in body.nodes if n.op in SCAN_OPS]

    def read_level(self, n: Node) -> str:
        """The level at which n reads its inputs: per element ("row") for a reduction and a
        piece (a piece's element is a row element at a shifted column)."""
        return "row" if n.op in RED_OPS or self.level[n] == "piece" else self.level[n]

    def write_axis(self, o: Node) -> Optional[int]:
        """For a cache write output, its axis among the row dims (`_row_dims`)."""
        if o.op is not Op.INDEX_COPY:
            return None
        return _row_dims(self.rank, self.axis).index(o.attrs["axis"] % self.rank)

    def user_shape(self, x: Node, level: str, body: Graph):
        """The shape an input is broadcast to at a level (its users' shape there)."""
        for n in body.nodes:
            if x in n.inputs:
                if self.read_level(n) == level:
                    return self.space if n.op in RED_OPS else n.type.shape
        raise AssertionError("no user at that level")


def fold_init(op: Op, t, width: str) -> List[str]:
    """The running value of reduction `op` over rows of `width` (named acc{t}; logsumexp
    also keeps its running max, mx{t}), before the first chunk. With fold_step and
    fold_value, shared by the reduction kernels and a matmul's row reduction."""
    if op is Op.AMAX:
        return [f"acc{t} = tl.full([{width}], float('-inf'), tl.float32)"]
    if op is Op.LOGSUMEXP:
        return [f"mx{t} = tl.full([{width}], float('-inf'), tl.float32)",
                f"acc{t} = tl.zeros([{width}], tl.float32)"]
    return [f"acc{t} = tl.zeros([{width}], tl.float32)"]


def fold_step(op: Op, t, x: str, mask: str) -> List[str]:
    """Fold the chunk `x` [rows, columns] (its lanes where `mask`) into the running value."""
    if op in (Op.SUM, Op.MEAN):
        return [f"acc{t} += tl.sum(tl.where({mask}, {x}, 0.0), axis=1)"]
    if op is Op.AMAX:
        return [f"acc{t} = tl.maximum(acc{t}, tl.max(tl.where({mask}, {x}, "
                "float('-inf')), axis=1))"]
    # online logsumexp: rescale the running sum to the new running max
    return [f"xv{t} = tl.where({mask}, {x}, float('-inf'))",
            f"new{t} = tl.maximum(mx{t}, tl.max(xv{t}, axis=1))",
            f"ref{t} = tl.where(new{t} == float('-inf'), 0.0, new{t})",
            f"acc{t} = acc{t} * tl.exp(mx{t} - ref{t}) + "
            f"tl.sum(tl.exp(xv{t} - ref{t}[:, None]), axis=1)",
            f"mx{t} = new{t}"]


def fold_value(op: Op, t, n: Optional[str]) -> str:
    """The reduction from its running value; a mean divides by `n` (None: the sum, a
    partial a later fold adds up). A row of only -inf sums to 0: its logsumexp is -inf
    (log(0) without the warning the interpreter would print)."""
    if op is Op.MEAN and n is not None:
        return f"acc{t} / {n}"
    if op is Op.LOGSUMEXP:
        return (f"tl.where(acc{t} == 0.0, float('-inf'), mx{t} + "
                f"tl.log(tl.where(acc{t} == 0.0, 1.0, acc{t})))")
    return f"acc{t}"


def _row_dims(rank: int, axis: int) -> List[int]:
    return [d for d in range(rank) if d != axis]


def generate(body: Graph, name: str) -> str:
    p = Plan(body)
    rows = _row_dims(p.rank, p.axis)
    L = len(rows)
    src_nodes = [m for m in body.nodes if m.op is not Op.INPUT and m.op is not Op.CONST]
    head = [
        "@triton.jit",
        "",       # the signature: the parameters the body reads (params.prune), below
        "    # IR nodes: " + ", ".join(
            f"{m.op.value}" + (f"@{m.loc.file.rsplit('/', 1)[-1]}:{m.loc.line}" if m.loc else "")
            for m in src_nodes),
        f"    # rows of the row space reduced along axis {p.axis}; {p.passes} pass(es) per row",
    ]
    out_index = {o: j for j, o in enumerate(p.outputs)}
    if p.columns:
        head += [
            "    # and sum(s) over every row: each program walks row blocks pid, pid + programs,",
            "    # ... adding its rows column by column (a row is one chunk: BLOCK_N >= N) and",
            "    # stores one partial row; the launcher's second kernel adds the partials up",
            "    cols0 = tl.arange(0, BLOCK_N)",
        ] + [f"    colacc{out_index[o]} = tl.zeros([BLOCK_N], tl.float32)" for o in p.columns] + [
            "    for rb in range(tl.program_id(0), tl.cdiv(R, BLOCK_R), tl.num_programs(0)):"]
        first = "tl.arange(0, BLOCK_R).to(tl.int64) + rb * BLOCK_R"   # rb < R: no overflow
    else:
        first = "tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)"
    lines = [
        f"    rows = {first}",
        "    rmask = rows < R",
    ] + (split_index("rows", "i", "RS", L) if L else [])

    def row_off(prefix: str) -> str:
        return " + ".join(f"i{k} * {prefix}{k}" for k in range(L)) if L else "rows * 0"

    val: Dict[Node, str] = {}        # per-row values and literals
    rowval: Dict[Node, str] = {}     # element values, valid inside a pass loop
    for i, x in enumerate(p.inputs):
        if "row" in p.input_levels[x]:
            lines.append(f"    in{i}_row = {row_off(f'in{i}_rs')}")
        if "per_row" in p.input_levels[x]:
            load = f"tl.load(in{i}_ptr + ({row_off(f'in{i}_ps')}), mask=rmask, other=0)"
            if x.type.dtype in (DType.f16, DType.bf16):
                load += ".to(tl.float32)"
            lines.append(f"    p{i} = {load}")
            val[x] = f"p{i}"
    for j, o in enumerate(p.outputs):
        if o in p.columns:
            continue
        w = p.write_axis(o)
        if w is None:
            lines.append(f"    out{j}_row = {row_off(f'out{j}_s')}")
            continue
        # a cache write: the out pointer is the cache, the row's slot along the write axis
        # is pos[i_w] (fuse_cache_writes)
        q = p.inputs.index(o.inputs[1])
        lines.append(f"    pos{j} = tl.load(in{q}_ptr + i{w} * in{q}_s0, mask=rmask, "
                     f"other=0)  # the cache slot of each row's position")
        lines.append(f"    out{j}_row = " + " + ".join(
            f"{f'pos{j}' if k == w else f'i{k}'} * out{j}_s{k}" for k in range(L)))
    for m in body.nodes:
        if m.op is Op.CONST:
            val[m] = literal(m)
            rowval[m] = literal(m)
    index = {m: k for k, m in enumerate(body.nodes)}

    def store_row(o: Node, ind: str):
        j = out_index[o]
        lines.append(f"{ind}tl.store(out{j}_ptr + (out{j}_row[:, None] + cols[None, :] * "
                     f"out{j}_sax), ({rowval[_value(o)]}).to({TL_DTYPE[o.type.dtype]}), "
                     f"mask=m2)" + (f"  # out{j} is the cache" if o.op is Op.INDEX_COPY
                                    else ""))

    def store_per_row(o: Node, ind: str):
        j = out_index[o]
        lines.append(f"{ind}tl.store(out{j}_ptr + out{j}_row, ({val[o]})"
                     f".to({TL_DTYPE[o.type.dtype]}), mask=rmask)")

    def emit_per_row(depth: int):
        for m in body.nodes:
            if p.level.get(m) != "per_row" or p.depth[m] != depth or m.op in RED_OPS:
                continue
            lines.append(f"    t{index[m]} = {_expr(m, [val[x] for x in m.inputs])}"
                         f"  # {m.op.value} -> {m.type}")
            val[m] = f"t{index[m]}"
        for o in p.outputs:
            if p.level.get(o) == "per_row" and p.depth[o] == depth:
                store_per_row(o, "    ")

    at_shift: Dict[tuple, str] = {}
    names: Set[str] = set()

    def load_row(x: Node, col: str, mask: str) -> str:
        """Input x's elements of the block's rows at columns `col`, in fp32."""
        i = p.inputs.index(x)
        load = (f"tl.load(in{i}_ptr + (in{i}_row[:, None] + {col}[None, :] * in{i}_sax), "
                f"mask={mask}, other=0)")
        return load + ".to(tl.float32)" if x.type.dtype in (DType.f16, DType.bf16) else load

    def fresh(name: str) -> str:
        """A name not yet given in this pass (a value at one shift under two masks)."""
        k, out = 0, name
        while out in names:
            k += 1
            out = f"{name}_{k}"
        names.add(out)
        return out

    def shifted(m: Node, shift: int, mask: str, ind: str) -> str:
        """m's value at the chunk's columns + `shift` (a concat's piece: its columns, and a
        slice's source at the slice's start), loads masked by `mask`; the row values at the
        chunk's own columns are the ones already computed. The column is in range wherever
        the mask is on: a concat's piece mask keeps the piece's own columns."""
        if m.op is Op.CONST:
            return literal(m)
        if m.op is not Op.INPUT and p.level[m] == "per_row":
            return f"{val[m]}[:, None]"
        if shift == 0 and m in rowval:
            return rowval[m]
        key = (m, shift, mask)
        if key in at_shift:
            return at_shift[key]
        col = "cols" if shift == 0 else f"(cols {'+' if shift > 0 else '-'} {abs(shift)})"
        at = f"{'m' if shift < 0 else ''}{abs(shift)}"     # names: <value>_<shift>
        if m.op is Op.INPUT:
            v = fresh(f"v{p.inputs.index(m)}_{at}")
            lines.append(f"{ind}{v} = {load_row(m, col, mask)}")
            at_shift[key] = v
            return v
        if m.op is Op.SLICE:
            at_shift[key] = shifted(m.inputs[0], shift + m.attrs["start"], mask, ind)
            return at_shift[key]
        if m.op is Op.CONCAT:
            ax = m.attrs["axis"] % m.type.rank
            bounds = [0]
            for x in m.inputs:
                bounds.append(bounds[-1] + x.type.shape[ax])
            pieces = []
            for j, x in enumerate(m.inputs):
                lo, hi = bounds[j], bounds[j + 1]
                mj = fresh(f"m{index[m]}_{at}_{j}")
                lines.append(f"{ind}{mj} = {mask} & (({col} >= {lo}) & ({col} < {hi}))"
                             f"[None, :]  # concat piece [{lo}, {hi}) along axis {ax}")
                pieces.append(shifted(x, shift - lo, mj, ind))
            expr = pieces[-1]
            for v, lo in zip(reversed(pieces[:-1]), reversed(bounds[1:-1])):
                expr = f"tl.where(({col} < {lo})[None, :], {v}, {expr})"
            c = fresh(f"c{index[m]}_{at}")
            lines.append(f"{ind}{c} = {expr}  # concat -> {m.type}")
            at_shift[key] = c
            return c
        if m.op in RED_OPS or m.op in SCAN_OPS:
            raise AssertionError(f"internal: a {m.op.value} at shifted columns")
        e = _expr(m, [shifted(x, shift, mask, ind) for x in m.inputs])
        v = fresh(f"s{index[m]}_{at}")
        lines.append(f"{ind}{v} = {e}  # {m.op.value} -> {m.type}")
        at_shift[key] = v
        return v

    emit_per_row(0)
    for k in range(1, p.passes + 1):
        reds = [m for m in body.nodes if m.op in RED_OPS and p.depth[m] == k
                and p.level[m] != "col"]
        stores = [o for o in p.outputs if p.level.get(o) == "row" and p.depth[o] == k - 1]
        colsums = [o for o in p.columns if p.depth[o] == k]
        needed: Set[Node] = set()
        stack = [m.inputs[0] for m in reds] + [_value(o) for o in stores] + \
            [p.columns[o] for o in colsums]
        while stack:
            m = stack.pop()
            if m in needed or m.op is Op.CONST or (m.op is not Op.INPUT
                                                   and p.level[m] != "row"):
                continue
            needed.add(m)
            stack.extend(m.inputs if m.op is not Op.INPUT else ())
        lines.append(f"    # pass {k}: " + (", ".join(
            [f"{m.op.value}" for m in reds] + ["column sum"] * bool(colsums))
            or "store the row epilogue"))
        for m in reds:
            lines += ["    " + ln for ln in fold_init(m.op, index[m], "BLOCK_R")]
        for m in p.scans:
            if m in needed:          # the sum of the row's earlier chunks
                lines.append(f"    carry{index[m]} = tl.zeros([BLOCK_R], tl.float32)")
        lines += [
            "    for c0 in range(0, N, BLOCK_N):",
            "        cols = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)",
            "        m2 = rmask[:, None] & (cols < N)[None, :]",
        ]
        ind = "        "
        for m in body.nodes:
            if m not in needed:
                continue
            if m.op is Op.INPUT:
                i = p.inputs.index(m)
                lines.append(f"{ind}v{i} = {load_row(m, 'cols', 'm2')}")
                rowval[m] = f"v{i}"
                continue
            t = index[m]
            if m.op is Op.CONCAT:      # each piece at its shifted columns
                rowval[m] = shifted(m, 0, "m2", ind)
                continue
            a = [rowval[x] if x in rowval and (x.op is Op.CONST or x.op is Op.INPUT
                                               or p.level[x] == "row")
                 else f"{val[x]}[:, None]" for x in m.inputs]
            if m.op is Op.CUMSUM:    # inclusive prefix within the chunk, plus the carry
                lines.append(f"{ind}x{t} = tl.where(m2, ({a[0]}).to(tl.float32), 0.0)")
                lines.append(f"{ind}t{t} = carry{t}[:, None] + tl.cumsum(x{t}, 1)  "
                             f"# cumsum -> {m.type}")
                lines.append(f"{ind}carry{t} += tl.sum(x{t}, 1)")
            else:
                lines.append(f"{ind}t{t} = {_expr(m, a)}  # {m.op.value} -> {m.type}")
            rowval[m] = f"t{t}"
        for m in reds:
            lines += [ind + ln for ln in fold_step(m.op, index[m], rowval[m.inputs[0]], "m2")]
        for o in stores:
            store_row(o, ind)
        for o in colsums:
            lines.append(f"{ind}colacc{out_index[o]} += tl.sum(tl.where(m2, "
                         f"{rowval[p.columns[o]]}, 0.0), axis=0)")
        for m in reds:
            t = index[m]
            lines.append(f"    t{t} = {fold_value(m.op, t, 'N')}  # {m.op.value} -> {m.type}")
            val[m] = f"t{t}"
        # element values are loop-local: forget them before the next pass
        for m in needed:
            rowval.pop(m, None)
        at_shift.clear()
        names.clear()
        emit_per_row(k)
    if p.columns:
        lines = ["    " + ln for ln in lines]
        lines += [f"    tl.store(out{out_index[o]}_ptr + tl.program_id(0) * N + cols0, "
                  f"colacc{out_index[o]}, mask=cols0 < N)" for o in p.columns]
    args = params.prune(_params(p), "\n".join(head[2:] + lines))
    head[1] = f"def {name}({', '.join(args)}, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):"
    return "\n".join(head + lines) + "\n"


def _params(p: Plan) -> List[str]:
    """Every parameter a reduction kernel of plan `p` may read, in order: pointers, R, N,
    the row sizes, each input's strides per level it is read at, the outputs' strides. The
    kernel declares those it reads; `launch` passes values for all of them."""
    L = len(_row_dims(p.rank, p.axis))
    args = [f"in{i}_ptr" for i in range(len(p.inputs))]
    args += [f"out{j}_ptr" for j in range(len(p.outputs))]
    args += ["R", "N"] + [f"RS{k}" for k in range(L)]
    for i, x in enumerate(p.inputs):
        for lvl in sorted(p.input_levels[x]):
            if lvl == "pos":
                args.append(f"in{i}_s0")
                continue
            tag = "r" if lvl == "row" else "p"
            args += [f"in{i}_{tag}s{k}" for k in range(L)]
            if lvl == "row":
                args.append(f"in{i}_sax")
    for j, o in enumerate(p.outputs):
        if o in p.columns:       # a [programs, N] fp32 workspace, contiguous
            continue
        args += [f"out{j}_s{k}" for k in range(L)]
        if p.level[o] == "row":
            args.append(f"out{j}_sax")
    return args


def _value(o: Node) -> Node:
    """What an output stores: a cache write's new values, else itself."""
    return o.inputs[2] if o.op is Op.INDEX_COPY else o


def launch(kernel, xs, outs, body: Graph, ctx, interpret: bool) -> None:
    import torch
    import triton

    p = Plan(body)
    space = [ctx.dim(d) for d in p.space]
    rows = _row_dims(p.rank, p.axis)
    row_sizes = [space[d] for d in rows]
    R = 1
    for s in row_sizes:
        R *= s
    N = space[p.axis]
    if R == 0:      # no rows: a sum over every row is 0
        for o, t in zip(p.outputs, outs):
            if o in p.columns:
                t.zero_()
        return

    def strides_in_space(t, shape):
        """Strides of `t` broadcast to `shape`, in row-space coordinates (0 on the reduced
        axis when `shape` lacks it)."""
        shape = [ctx.dim(d) for d in shape]
        st = list(t.expand(shape).stride()) if shape else []
        if len(shape) == p.rank - 1:
            st.insert(p.axis, 0)
        return st

    # a column sum's kernel output is a [programs, N] fp32 workspace of partial sums
    programs = 0
    col = [o in p.columns for o in p.outputs]
    if any(col):
        bn = triton.next_power_of_2(max(N, 1))
        if N > COL_BLOCK_MAX:
            raise AssertionError(f"a kernel with column sums has rows of {N} > "
                                 f"{COL_BLOCK_MAX} elements")
        if interpret and interpreter_blocks():
            br = INTERPRET_COL_ROWS or max(1, min(triton.next_power_of_2(R), 16384 // bn))
            most = INTERPRET_COL_PROGRAMS
        else:
            br = max(1, min(triton.next_power_of_2(R), 2048 // bn))
            most = COL_PROGRAMS_PER_SM * _sm_count(outs[0].device)
        programs = max(1, min(triton.cdiv(R, br), most))
        work = [torch.empty((programs, N), dtype=torch.float32, device=outs[0].device)
                if c else t for c, t in zip(col, outs)]
    else:
        work = list(outs)
    args: list = list(xs) + work + [R, N] + row_sizes
    for x, t in zip(p.inputs, xs):
        for lvl in sorted(p.input_levels[x]):
            if lvl == "pos":
                args.append(t.stride(0))
                continue
            st = strides_in_space(t, p.user_shape(x, lvl, body))
            args += [st[d] for d in rows]
            if lvl == "row":
                args.append(st[p.axis])
    for o, t in zip(p.outputs, outs):
        if o in p.columns:
            continue
        st = strides_in_space(t, o.type.shape)     # a cache write's: the cache's own
        args += [st[d] for d in rows]
        if p.level[o] == "row":
            args.append(st[p.axis])
    # contiguous along the reduced axis: wide chunks of few rows; along another axis
    # (a column sum): many rows per program so neighbouring rows make coalesced loads
    along = all(st == 1 for st in [t.stride()[-1] if t.dim() else 1 for t in xs[:1]]) \
        and p.axis == p.rank - 1
    args = params.bind(kernel, params.of_body(body, "reduction", lambda: _params(p)), args)
    if programs:
        kernel[(programs,)](*args, BLOCK_R=br, BLOCK_N=bn)
        from .colsum import finish
        for c, w, t in zip(col, work, outs):
            if c:
                finish(w, t, interpret)
        return
    if interpret and interpreter_blocks():  # the interpreter pays per program and loop trip
        bn = INTERPRET_BLOCK_N or min(triton.next_power_of_2(max(N, 1)), 4096)
        br = max(1, min(triton.next_power_of_2(R), 16384 // bn))
    elif along:
        bn = min(triton.next_power_of_2(max(N, 1)), 2048)
        br = max(1, min(triton.next_power_of_2(R), 2048 // bn))
    else:
        bn = min(triton.next_power_of_2(max(N, 1)), 32)
        br = min(triton.next_power_of_2(R), 64)
    kernel[(triton.cdiv(R, br),)](*args, BLOCK_R=br, BLOCK_N=bn)


def _sm_count(device) -> int:
    """The SMs of `device`'s GPU; the warm pass's meta tensors count the current GPU's, so
    that it compiles the kernels the real run launches (Triton specializes on the sizes)."""
    import torch

    if device.type == "meta" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
