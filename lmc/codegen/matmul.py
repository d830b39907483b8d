"""Triton source for a matmul FUSED group: a tiled matmul with its epilogue in registers.

The output ``[*batch, M, N]`` is cut into BLOCK_M x BLOCK_N tiles; one program owns one tile
of one batch entry (batch dims flattened into the one grid axis, the flat index split with
the batch sizes at the start). It loops over K in BLOCK_K steps, accumulating ``tl.dot`` in
fp32 (``input_precision="ieee"`` for fp32 operands, so results match torch's fp32 matmul,
not TF32), then computes the epilogue from the accumulator(s) with the pointwise lowering
(`pointwise._expr`), reading epilogue inputs through broadcast strides, and stores every
output with masks, cast to its dtype. The gated form (two matmuls sharing A) keeps two
accumulators and loads each A tile once. The horizontal form (matmuls sharing A, each
product its own outputs) runs the column tiles of every product in one launch, one branch
per product: a tile helper stores a plain product's tile (or writes it into a cache, or
stores RoPE of it), or returns it to the branch, which runs that product's epilogue.

Every operand is read through its own strides (batch strides 0 where it is broadcast), so
PERMUTE views (``k^T``, a transposed weight) are read in place, not copied. Offsets are int64.
Sizes and strides are kernel arguments: a new batch size or length reuses the same code. At
launch, batch dims that collapse into M (``x[B, T, K] @ W[K, N]``) are folded into it, so the
tiles span B*T rows. Programs are ordered in groups of GROUP_M row tiles so the B tiles they
share stay in L2. On a GPU the block sizes are autotuned per (M, N, K) over a few configs
pruned to the problem size; Triton's interpreter gets one configuration of large tiles (it
pays per program and per op, not per element).

Split-K (the plain and horizontal forms; few rows, or a deep K with few tiles): a decode
step's matmul has M = batch rows, so an output of a few hundred columns is a few dozen tiles;
on a GPU of 132 SMs most sit idle while each busy one streams all of K alone (and a weight
gradient's 768 x 768 output is 36 tiles over K = B * T). There the autotuner may also pick
SPLIT_K programs per tile, each summing one slice of K; they meet in an fp32 workspace, and
the last of them to finish (a per-tile counter, atomic, reset by that program) adds the
slices in slice order and runs the epilogue, so the result does not depend on which
finishes last. The horizontal form's tile helpers do the same per product (each product
its own region of the workspace; a rotated product's partner accumulator too).

    @triton.jit
    def lmc_mm_matmul_add_0(in0_ptr, in1_ptr, in2_ptr, out0_ptr, M, N, K,
                            a_s0, a_sm, a_sk, b0_s0, b0_sk, b0_sn, e2_s0, e2_sm, e2_sn,
                            ws_ptr, cnt_ptr, ZM, SPLIT_MAX,
                            BLOCK_M: tl.constexpr, ..., SPLIT_K: tl.constexpr): ...

A kernel declares the parameters its body reads (`params.prune`; here not Z0, the one batch
axis's size: its index is the flat batch index) and the autotuner's key (SPLIT_MAX, which
only the autotuner reads, said in a comment).
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, List

from ..errors import LmcError
from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from ..ir.types import DType
from ..passes.fuse_matmul import norm_prologue, with_weight_cast
from ..passes.fuse_matmul_reductions import row_reduction
from . import params
from .pointwise import (  # noqa: F401  (HELPERS: program.py)
    HELPERS,
    TL_DTYPE,
    _expr,
    literal,
    split_index,
)
from .reduction import fold_init, fold_step, fold_value

_HALF = (DType.f16, DType.bf16)


def _layout(body: Graph):
    """(inputs, matmuls, A placeholder, epilogue placeholders, RMSNorm prologue or None) of a
    matmul body. With a prologue the placeholder read as A is the norm's input x."""
    inputs = [n for n in body.nodes if n.op is Op.INPUT]
    mms = [n for n in body.nodes if n.op is Op.MATMUL]
    if not mms or any(m.inputs[0] is not mms[0].inputs[0] for m in mms):
        raise LmcError(f"internal: matmul body {body.name} needs matmuls sharing one A")
    a = mms[0].inputs[0]
    pa, pb = operand_prologues(body)
    pro = None if pa else _prologue(mms)
    if pro is not None:
        if any(v is not None and v.op is not Op.INPUT for v in (pro.x, pro.w, pro.bias)):
            raise LmcError(f"internal: matmul body {body.name}: A is computed, not a norm")
        a = pro.x
    elif a.op is not Op.INPUT and not pa:
        raise LmcError(f"internal: matmul body {body.name}: A is computed, not an RMSNorm")
    skip = set(pro.members if pro else pa).union(*pb.values())
    return inputs, mms, a, _epilogue_inputs(body, inputs, skip), pro


_VIEWS = (Op.RESHAPE, Op.PERMUTE)
_OPERAND_PROLOGUES: "weakref.WeakKeyDictionary[Graph, tuple]" = weakref.WeakKeyDictionary()


def _cone(v: Node) -> List[Node]:
    """The nodes computing v from placeholders and constants, v last, inputs before readers."""
    seen: Dict[Node, None] = {}

    def visit(n: Node):
        if n in seen or n.op in (Op.INPUT, Op.CONST):
            return
        for x in n.inputs:
            visit(x)
        seen[n] = None
    visit(v)
    return list(seen)


def operand_prologues(body: Graph):
    """(the nodes computing A in the loads, {product j: the nodes computing its B}) of a
    matmul body (fuse_matmul_prologues): pointwise ops of placeholders and constants, then at
    most one reshape or permute view, the operand last; ([], {}) for plain operands. An
    RMSNorm computing A (a reduction in its cone) is `_prologue`'s, not this."""
    return _prologue_cones(body)[:2]


def a_prologues(body: Graph) -> Dict[int, List[Node]]:
    """{product j: the nodes computing its A in the loads} (the vertical form: each product
    its own A; fuse_matmul_prologues)."""
    return _prologue_cones(body)[2]


def _prologue_cones(body: Graph):
    hit = _OPERAND_PROLOGUES.get(body)
    if hit is not None:
        return hit

    def pointwise(v: Node) -> List[Node]:
        if v.op is Op.INPUT:
            return []
        c = _cone(v)
        ok = all(n.op.kind is Kind.POINTWISE for n in c if n is not v) and \
            (v.op.kind is Kind.POINTWISE or (v.op in _VIEWS and len(c) > 1))
        return c if ok else []
    mms = [n for n in body.nodes if n.op is Op.MATMUL]
    pas = {j: pointwise(m.inputs[0]) for j, m in enumerate(mms)}
    pbs = {j: pointwise(m.inputs[1]) for j, m in enumerate(mms)}
    hit = _OPERAND_PROLOGUES[body] = (
        pas.get(0, []), {j: c for j, c in pbs.items() if c},
        {j: c for j, c in pas.items() if c})
    return hit


def _operand_code(cone: List[Node], idx, side: str, dot_ty: str, boff) -> List[str]:
    """The K-loop lines computing operand `side` ("a" or "b{j}") from its prologue's inputs:
    each input's tile read through its strides (p{i}_sm, p{i}_sk for A; p{i}_sk, p{i}_sn for
    B; widened to fp32 when half), the pointwise ops in fp32 as the pointwise kernel computes
    them, lanes outside the tile zeroed (a prologue of 0 need not be 0), cast to the dot's
    dtype as the pointwise kernel's store would."""
    ind = "        "
    rows, cols = (("rm", "sm"), ("kk", "sk")) if side == "a" else (("kk", "sk"), ("rn", "sn"))
    mask = "mask_m[:, None] & mask_k[None, :]" if side == "a" else \
        "mask_k[:, None] & mask_n[None, :]"
    val: Dict[Node, str] = {}
    lines = [f"{ind}# {side.upper()[0]} computed here from its prologue's inputs"]
    for x in _cone_inputs(cone):
        i = idx[x]
        lines.append(f"{ind}x{i} = {_tile_load(i, f'p{i}', rows, cols, mask, boff, x)}")
        val[x] = f"x{i}"
    for n in cone:
        for x in n.inputs:
            if x.op is Op.CONST:
                val.setdefault(x, literal(x))
        if n.op in _VIEWS:       # the view is in the strides the launcher computed
            val[n] = val[n.inputs[0]]
            continue
        k = f"{side}_{len(val)}"
        lines.append(f"{ind}p{k} = {_expr(n, [val[x] for x in n.inputs])}"
                     f"  # {n.op.value} -> {n.type}")
        val[n] = f"p{k}"
    lines.append(f"{ind}{side} = tl.where({mask}, {val[cone[-1]]}, 0.0).to({dot_ty})")
    return lines


def _cone_inputs(cone: List[Node]) -> List[Node]:
    """The placeholders a prologue reads, in first-read order."""
    return list(dict.fromkeys(x for n in cone for x in n.inputs if x.op is Op.INPUT))


def _operand_args(v: Node, cone: List[Node], idx, name: str, ends, nb: int) -> List[str]:
    """The stride arguments of operand v (`name`_s<d>.., `name`_<end>..), or, when a prologue
    `cone` computes it, of each of its inputs (p<i>_s<d>.., p<i>_<end>..)."""
    out: List[str] = []
    for p in [f"p{idx[x]}" for x in _cone_inputs(cone)] if cone else [name]:
        out += [f"{p}_s{d}" for d in range(nb)] + [f"{p}_{e}" for e in ends]
    return out


def _operand_strides(xs, idx, v: Node, cone: List[Node], batch, dims, ctx) -> List[List[int]]:
    """The launch-side twin of `_operand_args`: the strides of operand v seen as
    [*batch, *dims], or of each input of its prologue `cone` (xs then holds the tensors the
    kernel reads: through the prologue's view, which may copy)."""
    if not cone:
        return [list(xs[idx[v]].expand(*batch, *dims).stride())]
    out = []
    for x in _cone_inputs(cone):
        xs[idx[x]] = _operand_tensor(xs[idx[x]], cone, ctx)
        out.append(list(xs[idx[x]].expand(*batch, *dims).stride()))
    return out


def _operand_tensor(x, cone: List[Node], ctx):
    """Placeholder value x as the operand's prologue reads it: broadcast to the prologue's
    shape and through its view (a reshape that cannot view the broadcast copies it)."""
    view = cone[-1] if cone[-1].op in _VIEWS else None
    if view is None:
        return x
    from ..ops.reference import REFERENCE
    src = view.inputs[0]
    x = x.expand([ctx.dim(d) for d in src.type.shape])
    return REFERENCE[view.op](ctx, [x], view.attrs)


def _epilogue_inputs(body: Graph, inputs: List[Node], skip) -> List[Node]:
    """The placeholders the epilogue reads: inputs of body nodes other than the matmuls and
    `skip` (a prologue's nodes, a vertical sum's adds)."""
    return [p for p in inputs if any(p in m.inputs for m in body.nodes
                                     if m.op not in (Op.INPUT, Op.CONST, Op.MATMUL)
                                     and m not in skip)]


def _vertical_layout(body: Graph):
    """(inputs, products, the adds summing them, their sum, epilogue placeholders) of a
    vertical body (`vertical_sum`)."""
    mms, chain, total = vertical_sum(body)
    inputs = [n for n in body.nodes if n.op is Op.INPUT]
    skip = set(mms) | set(chain)
    skip = skip.union(*a_prologues(body).values(), *operand_prologues(body)[1].values())
    return inputs, mms, chain, total, _epilogue_inputs(body, inputs, skip)


def _prologue(mms: List[Node]):
    """The norm computing the body's A in the kernel (fuse_matmul's NormPrologue), or None
    when A is a plain input."""
    a = mms[0].inputs[0] if mms else None
    if a is None or a.op is Op.INPUT:
        return None
    pro = norm_prologue(a)
    return pro and with_weight_cast(pro)


def norm_args(pro, idx) -> str:
    """The norm prologue's vectors as kernel (and tile helper) arguments: w, its stride, and
    the bias's."""
    if pro is None:
        return ""
    return f"in{idx[pro.w]}_ptr, w_sk, " + (
        f"in{idx[pro.bias]}_ptr, nb_sk, " if pro.bias is not None else "")


def _norm_stride_args(pro) -> List[str]:
    if pro is None:
        return []
    return ["w_sk"] + (["nb_sk"] if pro.bias is not None else [])


def _norm_comment(pro, idx, a: Node) -> str:
    if pro is None:
        return ""
    return (f"{pro.kind}(in{idx[a]}) * in{idx[pro.w]}"
            + (f" + in{idx[pro.bias]}" if pro.bias is not None else "") + ", computed here: ")


def norm_strides(pro, xs, idx) -> List[int]:
    """The launch's values of norm_args' strides."""
    if pro is None:
        return []
    return [xs[idx[pro.w]].stride(-1)] + (
        [xs[idx[pro.bias]].stride(-1)] if pro.bias is not None else [])


def _prologue_code(pro, idx, dot_ty: str, accs: List[str], indent: str):
    """The norm in the kernel (NormPrologue): (lines before the K loop, lines in it after `a`
    (an x tile) is loaded, lines after it). An RMSNorm without a bias feeding a bf16 or fp32
    dot accumulates the rows' sums of squares along the loop while it multiplies each tile by
    w, and the accumulators are scaled by rsqrt(mean + eps) after the loop, since (x * r *
    w) @ B = r * ((x * w) @ B). Otherwise first loops over the rows' K read x for the
    statistics and each tile is normalised before its cast, as the unfused norm does: an f16
    dot (x * w unscaled may exceed f16's 65,504 where x * r * w does not), a bias (it does not
    commute with r), a LayerNorm (its mean, then the variance about it: two loops)."""
    w = idx[pro.w]
    load_w = (f"{indent}wk = tl.load(in{w}_ptr + kk * w_sk, mask=mask_k, other=0.0)"
              ".to(tl.float32)")
    load_b = [] if pro.bias is None else [
        f"{indent}bk = tl.load(in{idx[pro.bias]}_ptr + kk * nb_sk, mask=mask_k, other=0.0)"
        ".to(tl.float32)"]
    rstd = (f"rs = tl.rsqrt(ss / K + {literal(pro.eps)})[:, None]  "
            f"# {'LayerNorm' if pro.center else 'RMSNorm'}'s per-row scale")
    top = indent[:-4]
    if dot_ty == "tl.float16" or pro.bias is not None or pro.center:
        load = (f"{indent}xs = tl.load(a_rows + kk[None, :] * a_sk, mask=mask_m[:, None] & "
                "(kk < K)[None, :], other=0.0).to(tl.float32)")
        before = []
        if pro.center:
            before += [
                f"{top}# LayerNorm: the rows' mean, then their variance about it",
                f"{top}mu = tl.full((BLOCK_M,), 0.0, tl.float32)",
                f"{top}for k0 in range(0, K, BLOCK_K):",
                f"{indent}kk = k0 + rk",
                load,
                f"{indent}mu += tl.sum(xs, axis=1)",
                f"{top}mu = (mu / K)[:, None]",
                f"{top}ss = tl.full((BLOCK_M,), 0.0, tl.float32)",
                f"{top}for k0 in range(0, K, BLOCK_K):",
                f"{indent}kk = k0 + rk",
                load,
                f"{indent}xc = tl.where((kk < K)[None, :], xs - mu, 0.0)",
                f"{indent}ss += tl.sum(xc * xc, axis=1)",
            ]
            x = "(a.to(tl.float32) - mu)"
        else:
            before += [
                f"{top}# RMSNorm: the rows' sums of squares first (x * w alone could overflow "
                "f16; a bias does not commute with the scale)",
                f"{top}ss = tl.full((BLOCK_M,), 0.0, tl.float32)",
                f"{top}for k0 in range(0, K, BLOCK_K):",
                f"{indent}kk = k0 + rk",
                load,
                f"{indent}ss += tl.sum(xs * xs, axis=1)",
            ]
            x = "a.to(tl.float32)"
        before.append(f"{top}{rstd}")
        plus = " + bk[None, :]" if pro.bias is not None else ""
        inside = [load_w] + load_b + [
            f"{indent}a = ({x} * rs * wk[None, :]{plus}).to({dot_ty})  # {pro.kind}(x)"]
        return before, inside, []
    before = [f"{top}ss = tl.full((BLOCK_M,), 0.0, tl.float32)"]
    inside = [f"{indent}af = a.to(tl.float32)",
              f"{indent}ss += tl.sum(af * af, axis=1)  # RMSNorm: sum of squares along K",
              load_w,
              f"{indent}a = (af * wk[None, :]).to({dot_ty})  # x * w; * rsqrt(mean + eps) after"]
    after = [f"{top}{rstd}"] + [f"{top}{acc} = {acc} * rs" for acc in accs]
    return before, inside, after


def _site(m: Node) -> str:
    return m.op.value + (f"@{m.loc.file.rsplit('/', 1)[-1]}:{m.loc.line}" if m.loc else "")


# where `_head` leaves the signature for `_finish`, which knows what the body reads
_SIGNATURE = "    <signature>"
# the GPU autotuner's key (and SPLIT_MAX for a kernel that may split K): kernel arguments
_KEY = ("M", "N", "K")


def _head(body: Graph) -> List[str]:
    """The @triton.jit line of a matmul kernel, its signature's place and its IR-nodes
    comment."""
    return ["@triton.jit", _SIGNATURE,
            "    # IR nodes: " + ", ".join(_site(m) for m in body.nodes
                                          if m.op not in (Op.INPUT, Op.CONST))]


def _finish(lines: List[str], name: str, every: List[str], split: bool) -> str:
    """The kernel's source: `lines` with its signature in `_head`'s place, declaring the
    parameters of `every` that the body reads, and the GPU autotuner's key (M, N, K, and
    SPLIT_MAX where the launch may split K) whether the body reads it or not."""
    at = lines.index(_SIGNATURE)
    code = "\n".join(lines[at + 1:])
    args = params.prune(every, code, _KEY + (("SPLIT_MAX",) if split else ()))
    key_only = params.unread(args, code)
    lines[at:at + 1] = [
        f"def {name}({', '.join(args)},",
        "        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, "
        "GROUP_M: tl.constexpr" + (", SPLIT_K: tl.constexpr):" if split else "):")] + ([
            f"    # {', '.join(key_only)}: not read here, the GPU autotuner's key"]
        if key_only else [])
    return "\n".join(lines) + "\n"


def _ranges() -> List[str]:
    """The tile's row, column and K offsets (int64) and the row and column masks."""
    return ["    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)",
            "    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)",
            "    rk = tl.arange(0, BLOCK_K).to(tl.int64)",
            "    mask_m = rm < M",
            "    mask_n = rn < N"]


def _batch_offset(nb: int):
    """prefix -> a tensor's batch offset: its stride on each batch axis times the index."""
    return lambda prefix: "".join(f" + {_z(d, nb)} * {prefix}_s{d}" for d in range(nb))


def _z(d: int, nb: int) -> str:
    """The index along batch axis d: the flat batch index z itself when there is one axis."""
    return "z" if nb == 1 else f"z{d}"


def _run_tiles(kernel, args, nbatch: int, M: int, N: int, K: int, interpret: bool,
               split_max: int = 0) -> None:
    """Launch one program per output tile per batch entry (times SPLIT_K for the plain
    form, `split_max` > 0: it may split K up to that many ways): in the interpreter one small
    configuration for M, N, K (it pays per program), on a GPU the autotuner's pick (keyed on
    the kernel's own M, N, K and SPLIT_MAX arguments)."""
    import triton

    if interpret:
        bm, bn, bk = interpret_blocks(M, N, K)
        extra = {}
        if split_max:
            extra["SPLIT_K"] = INTERPRET_SPLIT_K if INTERPRET_SPLIT_K <= split_max else 1
        grid = (nbatch * triton.cdiv(M, bm) * triton.cdiv(N, bn) * extra.get("SPLIT_K", 1),)
        kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, **extra)
        return

    def grid(meta):
        return (nbatch * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
                * meta.get("SPLIT_K", 1),)
    _autotuned(kernel, split=bool(split_max))[grid](*args)


def _split_args(device, nbatch: int, M: int, N: int, naccs: int, K: int = 0,
                per_split=None):
    """The plain form's last kernel arguments: (workspace, counters, ZM, SPLIT_MAX). A launch
    may split K when it has at most SPLIT_ROWS rows (over all batch entries) and SPLIT_TILES
    output tiles (decode), or when K is deep (at least DEEP_K) and its output is fewer than
    DEEP_TILES tiles of 128 x 128 (a weight gradient x^T dy: K = B * T, a 768 x 768 output
    is 36 such tiles, a quarter of an H100's SMs); any other gets a one-element stand-in
    workspace and SPLIT_MAX = 1 (never split). per_split: the workspace's fp32 elements per
    slice (default naccs planes of [ZM, N] and one [ZM] of sums of squares)."""
    import torch
    import triton

    zm = nbatch * M
    dummy, counters = _split_buffers(device)
    few = zm <= SPLIT_ROWS and nbatch * triton.cdiv(M, 16) * triton.cdiv(N, 32) <= SPLIT_TILES
    deep = K >= DEEP_K and nbatch * triton.cdiv(M, 128) * triton.cdiv(N, 128) < DEEP_TILES
    if not (few or deep):
        return [dummy, counters, zm, 1]
    top = max(SPLITS)
    per_split = naccs * zm * N + zm if per_split is None else per_split
    ws = torch.empty(top * per_split, dtype=torch.float32, device=device)
    return [ws, counters, zm, top]


def _split_buffers(device):
    """(a one-element fp32 stand-in workspace, the split-K tile counters: SPLIT_TILES int32
    zeros, each reset by the program that used it), made once per device. Made outside any
    CUDA-graph capture: a capture would record their zeroing without running it."""
    import torch

    key = str(device)
    hit = _SPLIT_BUFFERS.get(key)
    if hit is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise LmcError("internal: the matmul split-K counters are made on the first launch; "
                           "run the program once before capturing it in a CUDA graph")
        hit = (torch.zeros(1, dtype=torch.float32, device=device),
               torch.zeros(SPLIT_TILES, dtype=torch.int32, device=device))
        _SPLIT_BUFFERS[key] = hit
    return hit


def _tile_order(nb: int) -> List[str]:
    """From pid, num_m and num_n: the batch entry z (and, with several batch axes, its
    index along each, z0, z1, ...) and the tile (pid_m, pid_n), in grouped order: GROUP_M
    row tiles walk the column tiles together, so the B tiles they share stay in L2."""
    lines = [
        "    z = (pid // (num_m * num_n)).to(tl.int64)  # flat batch index",
        "    t = pid % (num_m * num_n)",
        "    # grouped order: GROUP_M row tiles walk the column tiles together (B stays in L2)",
        "    per_group = GROUP_M * num_n",
        "    first_m = (t // per_group) * GROUP_M",
        "    rows = tl.minimum(num_m - first_m, GROUP_M)",
        "    pid_m = first_m + (t % per_group) % rows",
        "    pid_n = (t % per_group) // rows",
    ]
    return lines + (split_index("z", "z", "Z", nb) if nb > 1 else [])


# per body graph (immutable once fused): horizontal()'s answer and _segments()'s, which
# every launch asks for
_HORIZONTAL: "weakref.WeakKeyDictionary[Graph, bool]" = weakref.WeakKeyDictionary()
_SEGMENTS: "weakref.WeakKeyDictionary[Graph, list]" = weakref.WeakKeyDictionary()


def horizontal(body: Graph) -> bool:
    """Matmuls of one A by different weights, each product its own outputs (fuse_matmul's
    sibling merge: the q, k, v projections, a gate's projection with its activation): one
    launch whose column tiles run over every B in turn. A product is stored as it is, written
    into a cache (fuse_cache_writes), or first runs its own pointwise epilogue (`products`)."""
    hit = _HORIZONTAL.get(body)
    if hit is None:
        mms = [n for n in body.nodes if n.op is Op.MATMUL]
        hit = _HORIZONTAL[body] = len(mms) > 1 and all(
            m.inputs[0] is mms[0].inputs[0] for m in mms) and \
            products(body, mms, _prologue(mms)) is not None
    return hit


def products(body: Graph, mms: List[Node], pro, skip_outs=()) -> "List[dict] | None":
    """Per matmul j of a body whose matmuls share A: {"outs": the output indices computed
    from it, "epi": the pointwise nodes computing them from its accumulator (body order),
    "cache": the output index of its cache write or None}; None when an output is computed
    from two products (the gated form), from none, or through anything but pointwise ops (a
    cache write of the product or of an epilogue value read by nothing else excepted: GPT-2's
    keys with their bias), or when a node computes no
    output. Outputs in `skip_outs` (the rotations fuse_rope_epilogue computes from a
    product) are left out."""
    skip = set(pro.members) if pro else set()
    j_of = {m: j for j, m in enumerate(mms)}
    users: Dict[Node, List[Node]] = {}
    for n in body.nodes:
        for x in n.inputs:
            users.setdefault(x, []).append(n)
    per = [{"outs": [], "epi": set(), "cache": None} for _ in mms]
    covered: set = set()      # the nodes computing the outputs left out (a rotation's)
    for k, o in enumerate(body.outputs.values()):
        if k in skip_outs:
            stack = [o]
            while stack:
                n = stack.pop()
                if n not in covered and n.op not in (Op.INPUT, Op.CONST, Op.MATMUL):
                    covered.add(n)
                    stack.extend(n.inputs)
            continue
        cone, found, stack = set(), set(), [o]
        while stack:
            n = stack.pop()
            if n in cone or n.op in (Op.INPUT, Op.CONST) or n in skip:
                continue
            if n.op is Op.MATMUL:
                found.add(j_of[n])
                continue
            if n.op is Op.INDEX_COPY:     # a cache write of the product or of its epilogue
                v = n.inputs[2]
                if n is not o or users[v] != [n] or not (
                        v.op is Op.MATMUL or v.op.kind is Kind.POINTWISE):
                    return None
            elif n.op.kind is not Kind.POINTWISE:
                return None
            cone.add(n)
            stack.extend(n.inputs)
        if len(found) != 1:
            return None
        p = per[found.pop()]
        p["outs"].append(k)
        if o.op is Op.INDEX_COPY:
            p["cache"] = k
        p["epi"] |= {n for n in cone if n.op is not Op.INDEX_COPY}
    covered |= set().union(*(p["epi"] for p in per))
    outs = list(body.outputs.values())
    if any(not (n in covered or n in skip or n.op in (Op.INPUT, Op.CONST, Op.MATMUL)
                or (n.op is Op.INDEX_COPY and n in outs)) for n in body.nodes):
        return None          # a node in no product's cone: dead, or a gated pair's combination
    for p in per:
        p["epi"] = [n for n in body.nodes if n in p["epi"]]
        if p["cache"] is not None and not p["epi"] and len(p["outs"]) != 1:
            return None
    return per


def _segments(body: Graph, mms: List[Node], pro):
    """Per matmul, how its tiles store: ("rope", spec) for a product RoPE is applied to
    (fuse_rope_epilogue's spec), ("plain", output index), ("cache", output index, the cache
    write), or ("epi", products()'s entry) for a product with its own epilogue."""
    hit = _SEGMENTS.get(body)
    if hit is None:
        hit = _SEGMENTS[body] = _segments_of(body, mms, pro)
    return hit


def _segments_of(body: Graph, mms: List[Node], pro):
    outs = list(body.outputs.values())
    rope = {r["product"]: r for r in body.meta.get("rope", ())}
    per = products(body, mms, pro, {r["out"] for r in rope.values()})
    if per is None:
        raise LmcError(f"internal: matmul body {body.name} is not one A's products")
    seg = []
    for j, (m, p) in enumerate(zip(mms, per)):
        if j in rope:
            seg.append(("rope", rope[j]))
        elif p["cache"] is not None and not p["epi"]:
            seg.append(("cache", p["cache"], outs[p["cache"]]))
        elif not p["epi"] and len(p["outs"]) == 1 and outs[p["outs"][0]] is m:
            seg.append(("plain", p["outs"][0]))
        elif p["outs"]:
            seg.append(("epi", p))
        else:
            raise LmcError(f"internal: matmul body {body.name}: product {j} is stored nowhere")
    return seg


def _table_strides(tab, layout: str, heads) -> List[int]:
    """A rope table's strides as the rotation tile reads it: [along t, along h (when it
    varies along the heads), along d], 0 along a broadcast axis; the table seen as
    [1, A1, A2, R] against the rotated [B, H, T, R] ("bhtd") or [B, T, H, R] ("bthd")."""
    tab = tab.reshape((1,) * (4 - tab.dim()) + tuple(tab.shape))
    t_ax, h_ax = (2, 1) if layout == "bhtd" else (1, 2)

    def st(a: int) -> int:
        return tab.stride(a) if tab.shape[a] > 1 else 0
    return [st(t_ax)] + ([st(h_ax)] if heads else []) + [tab.stride(3)]


def _rope_tile_helper(tile: str, pro, idx, dot_ty: str, prod_ty: str, prec: str,
                      r: dict, out_ty: str) -> List[str]:
    """A jit helper computing one BLOCK_M x BLOCK_N tile of P = A @ B and storing RoPE of it
    (fuse_rope_epilogue): a second accumulator holds the partner columns (B loaded at them),
    and the tile stores y[b, h, t, d] = x[d] cos[t, d] + sign(d) x[partner(d)] sin[t, d]
    for d < R (x[d] itself up to W), to [B, H, T, W] or, with a cache, at rows pos[t]."""
    w_args = norm_args(pro, idx)
    pre, inside, post = _prologue_code(pro, idx, dot_ty, ["acc", "accp"], "        ") \
        if pro else ([], [], [])
    D, R, W = r["D"], r["R"], r["W"]
    half = R // 2
    cast = (f".to({TL_DTYPE[DType.of(r['cast'])]}).to(tl.float32)" if r["cast"] else
            ".to(tl.float32)")
    rnd = "" if prod_ty == "tl.float32" else f".to({prod_ty}).to(tl.float32)"
    biased = r.get("bias") is not None
    heads = bool(r.get("heads"))      # tables varying along the heads: read at [t, h, d]
    part = R < D                      # partial rotary: columns d >= R are stored as they are
    pairs = bool(r.get("pairs"))      # interleaved: columns (2i, 2i + 1) rotate together
    ch, sh = ("cos_sh, ", "sin_sh, ") if heads else ("", "")

    def table(name: str) -> str:      # where the tile reads table `name` (cos or sin)
        cols = f"(h * {name}_sh + d * {name}_sd)[None, :]" if heads else \
            f"d[None, :] * {name}_sd"
        return f"{name}_ptr + t[:, None] * {name}_st + {cols}"
    lines = [
        "@triton.jit",
        f"def {tile}(a_rows, a_sk, mask_m, rm, z, b_ptr, b_sk, b_sn, o_ptr, tile_n, M, N, K,",
        f"        {w_args}cos_ptr, cos_st, {ch}cos_sd, sin_ptr, sin_st, {sh}sin_sd, T, o_sb, o_sh, "
        f"o_st, o_sd, pos_ptr, pos_s, {'bias_ptr, bias_s, ' if biased else ''}"
        f"{_SPLIT_PARAMS.rstrip()}",
        "        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, "
        "SPLIT_K: tl.constexpr, CACHE: tl.constexpr):",
        "    # one BLOCK_M x BLOCK_N tile of P = A @ B"
        + (f", A = {pro.kind}(x) * w computed here" if pro else "")
        + f", stored as RoPE of its heads (head dim {D}, "
          f"{'interleaved pairs' if pairs else 'rotate-half'} over the first {R}, "
          f"{W} stored): y[d] = x[d] cos[t, d] + sign(d) x[partner(d)] sin[t, d]",
        "    rn = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)",
        "    rk = tl.arange(0, BLOCK_K).to(tl.int64)",
        "    mask_n = rn < N",
        f"    h = rn // {D}",
        f"    d = rn % {D}",
    ] + ([f"    rot = d < {R}"] if part else []) + ([
        "    # interleaved pairs: partner d ^ 1, sign -1 at even d, +1 at odd",
        f"    pn = h * {D} + " + ("tl.where(rot, d ^ 1, d)" if part else "(d ^ 1)"),
    ] if pairs else [
        f"    # rotate-half: partner d + {half} (sign -1) below {half}, d - {half} (+1) up to {R}",
        f"    pn = h * {D} + tl.where(d < {half}, d + {half}, "
        + (f"tl.where(rot, d - {half}, d))" if part else f"d - {half})"),
    ]) + [
        "    b_cols = b_ptr + rn[None, :] * b_sn",
        "    p_cols = b_ptr + pn[None, :] * b_sn",
        "    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)",
        "    accp = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)",
    ] + pre + _K_SLICE + [
        "        a = tl.load(a_rows + kk[None, :] * a_sk, mask=mask_m[:, None] & mask_k[None, :],"
        " other=0.0)",
    ] + inside + [
        "        bmask = mask_k[:, None] & mask_n[None, :]",
        "        b = tl.load(b_cols + kk[:, None] * b_sk, mask=bmask, other=0.0)",
        "        bp = tl.load(p_cols + kk[:, None] * b_sk, mask=bmask, other=0.0)",
        f"        acc = tl.dot(a, b, acc=acc{prec})",
        f"        accp = tl.dot(a, bp, acc=accp{prec})",
    ] + _split_code(["acc", "accp"], bool(post), "tid") + post + [
        f"    x = acc{rnd}  # the product as stored in its dtype",
        f"    xp = accp{rnd}",
    ] + ([
        "    # + the bias at the columns and at their partners, the sum rounded as stored",
        "    x = (x + tl.load(bias_ptr + rn * bias_s, mask=mask_n, other=0.0)"
        f".to(tl.float32)[None, :]){rnd}",
        "    xp = (xp + tl.load(bias_ptr + pn * bias_s, mask=mask_n, other=0.0)"
        f".to(tl.float32)[None, :]){rnd}",
    ] if biased else []) + [
        "    r = z * M + rm  # the row of [B * T]: batch entry r // T, new position r % T",
        "    t = r % T",
        "    tmask = mask_m[:, None] & "
        + ("(mask_n & rot)[None, :]" if part else "mask_n[None, :]"),
        f"    c = tl.load({table('cos')}, mask=tmask, other=0.0){cast}",
        f"    s = tl.load({table('sin')}, mask=tmask, other=0.0){cast}",
        ("    xr = tl.where((d % 2 == 0)[None, :], -xp, xp)" if pairs else
         f"    xr = tl.where((d < {half})[None, :], -xp, xp)"),
        "    y = " + ("tl.where(rot[None, :], x * c + xr * s, x)" if part else "x * c + xr * s"),
    ] + ([f"    y = y * {float(r['scale'])!r}  # the rotated value's scale"]
         if r.get("scale") is not None else []) + [
        "    if CACHE:",
        "        tt = tl.load(pos_ptr + t * pos_s, mask=mask_m, other=0)",
        "    else:",
        "        tt = t",
        "    out = (r // T)[:, None] * o_sb + h[None, :] * o_sh + tt[:, None] * o_st + "
        "d[None, :] * o_sd",
        f"    tl.store(o_ptr + out, y.to({out_ty}), mask=mask_m[:, None] & "
        + (f"(mask_n & (d < {W}))[None, :])" if W < D else "mask_n[None, :])"),
    ]
    return lines


def _tile_helper(tile: str, pro, idx, dot_ty: str, out_ty: str, prec: str,
                 store: str) -> List[str]:
    """A jit helper computing one BLOCK_M x BLOCK_N tile of A @ B. store "plain": it stores
    the tile to C (contiguous [*batch, M, N]); "cache": into a cache [B, L, N] at rows
    (b, pos[t]); "none": it returns (the fp32 tile, its columns, its mask) for the caller's
    epilogue (the mask is off in a split-K program that is not its tile's last)."""
    w_args = norm_args(pro, idx)
    cache_args = "pos_ptr, pos_s, T, c_s0, c_s1, c_s2, " if store == "cache" else ""
    c_arg = "" if store == "none" else "c_ptr, "
    pre, inside, post = _prologue_code(pro, idx, dot_ty, ["acc"], "        ") if pro else \
        ([], [], [])
    lines = [
        "@triton.jit",
        f"def {tile}(a_rows, a_sk, mask_m, rm, z, b_ptr, b_sk, b_sn, {c_arg}tile_n, M, N, K,",
        f"        {w_args}{cache_args}{_SPLIT_PARAMS}BLOCK_M: tl.constexpr, "
        "BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):",
        "    # one BLOCK_M x BLOCK_N tile of A @ B"
        + (f", A = {pro.kind}(x) * w computed here" if pro else "")
        + {"plain": "", "cache": "; stored into a cache at the new positions",
           "none": "; returned to the caller's epilogue"}[store],
        "    rn = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)",
        "    rk = tl.arange(0, BLOCK_K).to(tl.int64)",
        "    mask_n = rn < N",
        "    b_cols = b_ptr + rn[None, :] * b_sn",
        "    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)",
    ] + pre + _K_SLICE + [
        "        a = tl.load(a_rows + kk[None, :] * a_sk, mask=mask_m[:, None] & mask_k[None, :],"
        " other=0.0)",
    ] + inside + [
        "        b = tl.load(b_cols + kk[:, None] * b_sk, mask=mask_k[:, None] & mask_n[None, :],"
        " other=0.0)",
        f"        acc = tl.dot(a, b, acc=acc{prec})",
    ] + _split_code(["acc"], bool(post), "tid") + post
    if store == "none":
        return lines + ["    return acc, rn, mask_m[:, None] & mask_n[None, :]"]
    if store == "cache":
        lines += [
            "    r = z * M + rm  # the row of [B * T]: batch entry r // T, new position r % T",
            "    slot = tl.load(pos_ptr + (r % T) * pos_s, mask=mask_m, other=0)",
            "    out = (r // T)[:, None] * c_s0 + slot[:, None] * c_s1 + rn[None, :] * c_s2",
        ]
    else:
        lines.append("    out = (z * M + rm[:, None]) * N + rn[None, :]")
    lines.append(f"    tl.store(c_ptr + out, acc.to({out_ty}), "
                 "mask=mask_m[:, None] & mask_n[None, :])")
    return lines


def _tile_load(i: int, e: str, rows, cols, mask: str, boff, x: Node) -> str:
    """The tile of input i (placeholder x) at `rows` x `cols` (each (index name, stride
    suffix): an epilogue input's ("rm", "sm"), ("rn", "sn")) read through its strides e_<sfx>
    (and batch strides), widened to fp32 when it is half precision."""
    (r, sr), (c, sc) = rows, cols
    load = (f"tl.load(in{i}_ptr + ({r}[:, None] * {e}_{sr} + {c}[None, :] * {e}_{sc}"
            f"{boff(e)}), mask={mask}, other=0)")
    return load + (".to(tl.float32)" if x.type.dtype in _HALF else "")


def _epi_inputs(body: Graph, p: dict) -> List[Node]:
    """The placeholders a product's epilogue reads, in body order."""
    read = {x for n in p["epi"] for x in n.inputs}
    return [n for n in body.nodes if n.op is Op.INPUT and n in read]


def _product_epilogue(body: Graph, j: int, m: Node, p: dict, idx, boff) -> List[str]:
    """The branch of product j's tiles after its tile helper returned acc{j}, rn{j} and
    mask{j}: its epilogue in registers (fp32; names carry j, one branch each) and its stores
    (outputs contiguous [*batch, M, N{j}])."""
    ind = "        "
    val: Dict[Node, str] = {m: f"acc{j}"}
    lines = [f"{ind}# product {j}'s epilogue, in registers (fp32)"]
    if m.type.dtype in _HALF and any(m in n.inputs for n in p["epi"]):
        lines.append(f"{ind}acc{j} = acc{j}.to({TL_DTYPE[m.type.dtype]}).to(tl.float32)"
                     f"  # the product as {m.type.dtype.value}")
    for x in _epi_inputs(body, p):
        i = idx[x]
        load = _tile_load(i, f"e{j}_{i}", ("rm", "sm"), (f"rn{j}", "sn"), f"mask{j}", boff, x)
        lines.append(f"{ind}v{j}_{i} = {load}")
        val[x] = f"v{j}_{i}"
    for k, n in enumerate(body.nodes):
        if n.op is Op.CONST:
            val.setdefault(n, literal(n))
        elif n in p["epi"]:
            lines.append(f"{ind}t{j}_{k} = {_expr(n, [val[x] for x in n.inputs])}"
                         f"  # {n.op.value} -> {n.type}")
            val[n] = f"t{j}_{k}"
    outs = list(body.outputs.values())
    lines.append(f"{ind}o{j} = (z * M + rm[:, None]) * N{j} + rn{j}[None, :]")
    for k in p["outs"]:
        o = outs[k]
        if k == p["cache"]:     # into the cache [B, L, N] at rows (b, pos[t]), as "cache"
            c, pos = idx[o.inputs[0]], idx[o.inputs[1]]
            lines += [
                f"{ind}r{j} = z * M + rm  # the row of [B * T]: batch entry r // T, "
                "new position r % T",
                f"{ind}slot{j} = tl.load(in{pos}_ptr + (r{j} % T{j}) * p{j}_s, mask=mask_m, "
                "other=0)",
                f"{ind}tl.store(in{c}_ptr + (r{j} // T{j})[:, None] * c{j}_s0 + slot{j}[:, None]"
                f" * c{j}_s1 + rn{j}[None, :] * c{j}_s2, ({val[o.inputs[2]]})"
                f".to({TL_DTYPE[o.type.dtype]}), mask=mask{j})"]
            continue
        lines.append(f"{ind}tl.store(out{k}_ptr + o{j}, ({val[o]})"
                     f".to({TL_DTYPE[o.type.dtype]}), mask=mask{j})")
    return lines


def _generate_horizontal(body: Graph, name: str) -> str:
    inputs, mms, a, _, pro = _layout(body)
    idx = {p: i for i, p in enumerate(inputs)}
    seg = _segments(body, mms, pro)
    nb = mms[0].type.rank - 2
    fp32 = mms[0].type.dtype is DType.f32
    prec = ', input_precision="ieee"' if fp32 else ""
    dot_ty = TL_DTYPE[mms[0].inputs[0].type.dtype]
    out_ty = TL_DTYPE[mms[0].type.dtype]
    w_args = norm_args(pro, idx)
    tile = f"{name}_tile"
    kinds = {sg[0] for sg in seg}
    lines = []
    for kind, suffix in (("plain", ""), ("cache", "_cache"), ("epi", "_acc")):
        if kind in kinds:
            lines += _tile_helper(tile + suffix, pro, idx, dot_ty, out_ty, prec,
                                  "none" if kind == "epi" else kind) + ["", ""]
    outs = list(body.outputs.values())
    helper: Dict[int, str] = {}    # product -> its rope tile helper (one per distinct source)
    made: Dict[str, str] = {}
    for j, sg in enumerate(seg):
        if sg[0] == "rope":
            r = sg[1]
            src = "\n".join(_rope_tile_helper("@", pro, idx, dot_ty, out_ty, prec, r,
                                               TL_DTYPE[outs[r["out"]].type.dtype]))
            if src not in made:
                made[src] = f"{tile}_rope{len(made)}"
                lines += src.replace("def @(", f"def {made[src]}(").split("\n") + ["", ""]
            helper[j] = made[src]

    def what(j: int, m: Node, sg) -> str:
        w = f"in{idx[m.inputs[1]]}"
        if sg[0] == "rope":
            cw = sg[1]
            bias = f" + in{cw['bias']}" if cw.get("bias") is not None else ""
            return (f"out{cw['out']} = rope(A @ {w}{bias}) (cos in{cw['cos']}, "
                    f"sin in{cw['sin']})"
                    + (f" written into in{cw['cache']} at rows in{cw['pos']}"
                       if cw["cache"] is not None else ""))
        if sg[0] == "cache":
            cw = sg[2]
            return (f"out{sg[1]} = in{idx[cw.inputs[0]]} with A @ {w} written at rows "
                    f"in{idx[cw.inputs[1]]}")
        if sg[0] == "plain":
            return f"out{sg[1]} = A @ {w} {m.inputs[1].type}"
        ops = "+".join(n.op.value for n in sg[1]["epi"])
        cw = sg[1]["cache"]
        return (", ".join(f"out{k}" for k in sg[1]["outs"]) + f" = {ops or 'copy'} of "
                f"A @ {w} {m.inputs[1].type}" + (
                    "" if cw is None else f" (out{cw} written into "
                    f"in{idx[outs[cw].inputs[0]]} at rows in{idx[outs[cw].inputs[1]]})"))
    lines += _head(body) + [
        f"    # A = in{idx[a]} {a.type}; "
        + "; ".join(what(j, m, sg) for j, (m, sg) in enumerate(zip(mms, seg))),
        "    # the column tiles of the first product, then of the second, ...: one launch",
        "    pid = tl.program_id(0)",
        "    split = pid % SPLIT_K  # this program's slice of K (split-K: see _split_code)",
        "    pid = pid // SPLIT_K",
        "    num_m = (M + BLOCK_M - 1) // BLOCK_M",
    ]
    # each product's region of the split-K workspace: per slice, its accumulators' planes of
    # [ZM, N_j] and a [ZM] plane of sums of squares
    region = "0"
    for j, sg in enumerate(seg):
        lines.append(f"    ws{j} = ws_ptr + SPLIT_K * ({region})")
        region += f" + {2 if sg[0] == 'rope' else 1} * ZM * N{j} + ZM"
    for j in range(len(mms)):
        lines.append(f"    nt{j} = (N{j} + BLOCK_N - 1) // BLOCK_N")
    lines.append("    num_n = " + " + ".join(f"nt{j}" for j in range(len(mms))))
    lines += _tile_order(nb)
    boff = _batch_offset(nb)("a")
    lines += [
        "    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)",
        "    mask_m = rm < M",
        f"    a_rows = in{idx[a]}_ptr + (rm[:, None] * a_sm{boff})",
    ]
    start = "0"
    for j, (m, sg) in enumerate(zip(mms, seg)):
        sp = f"ws{j}, cnt_ptr, pid, split, ZM"
        kw = "if" if j == 0 else "elif"
        stop = f"nt{j}" if j == 0 else f"{start} + nt{j}"
        head = f"    {kw} pid_n < {stop}:" if j < len(mms) - 1 else \
            "    else:" if j else "    if True:  # one product"
        b_of = f"in{idx[m.inputs[1]]}_ptr, b{j}_sk, b{j}_sn"
        if sg[0] == "rope":
            cw = sg[1]
            dst = f"in{cw['cache']}_ptr" if cw["cache"] is not None else f"out{cw['out']}_ptr"
            pos = f"in{cw['pos']}_ptr" if cw["pos"] is not None else dst
            ch, sh = (f"cs{j}_h, ", f"sn{j}_h, ") if cw.get("heads") else ("", "")
            call = [f"        {helper[j]}(a_rows, a_sk, mask_m, rm, z, {b_of}, {dst}, "
                    f"pid_n - ({start}), M, N{j}, K,\n"
                    f"                {w_args}in{cw['cos']}_ptr, cs{j}_t, {ch}cs{j}_d, "
                    f"in{cw['sin']}_ptr, sn{j}_t, {sh}sn{j}_d, T{j}, "
                    + ", ".join(f"o{j}_s{x}" for x in range(4)) + f", {pos}, p{j}_s,\n"
                    + (f"                in{cw['bias']}_ptr, bias{j}_s,\n"
                       if cw.get("bias") is not None else "")
                    + f"                {sp}, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, "
                    f"{cw['cache'] is not None})"]
        elif sg[0] == "plain":
            call = [f"        {tile}(a_rows, a_sk, mask_m, rm, z, {b_of}, out{sg[1]}_ptr, "
                    f"pid_n - ({start}), M, N{j}, K,\n"
                    f"                {w_args}{sp}, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)"]
        elif sg[0] == "cache":
            cw = sg[2]
            call = [f"        {tile}_cache(a_rows, a_sk, mask_m, rm, z, {b_of}, "
                    f"in{idx[cw.inputs[0]]}_ptr, pid_n - ({start}), M, N{j}, K,\n"
                    f"                {w_args}in{idx[cw.inputs[1]]}_ptr, p{j}_s, T{j}, "
                    f"c{j}_s0, c{j}_s1, c{j}_s2, {sp}, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)"]
        else:
            call = [f"        acc{j}, rn{j}, mask{j} = {tile}_acc(a_rows, a_sk, mask_m, rm, z, "
                    f"{b_of}, pid_n - ({start}), M, N{j}, K,\n"
                    f"                {w_args}{sp}, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)"]
            call += _product_epilogue(body, j, m, sg[1], idx, _batch_offset(nb))
        lines += [head] + call
        start = stop
    return _finish(lines, name, _horizontal_params(body), split=True)


def _horizontal_params(body: Graph) -> List[str]:
    """Every parameter a horizontal-form kernel of `body` may read, in order: pointers, M,
    N (all products' columns: the autotuner's key), K, each product's N, the batch sizes,
    A's and the weights' strides, the norm prologue's, each product's own (a rotation's T,
    tables and output strides; a cache write's; its epilogue inputs'), then split-K's
    workspace, tile counters, ZM and SPLIT_MAX."""
    inputs, mms, _, _, pro = _layout(body)
    idx = {p: i for i, p in enumerate(inputs)}
    nb = mms[0].type.rank - 2
    args = [f"in{i}_ptr" for i in range(len(inputs))] + \
        [f"out{k}_ptr" for k in range(len(body.outputs))] + ["M", "N", "K"] + \
        [f"N{j}" for j in range(len(mms))] + [f"Z{d}" for d in range(nb)] + \
        [f"a_s{d}" for d in range(nb)] + ["a_sm", "a_sk"] + \
        [f"b{j}_s{x}" for j in range(len(mms)) for x in "kn"] + _norm_stride_args(pro)
    for j, sg in enumerate(_segments(body, mms, pro)):
        if sg[0] == "rope":     # a rotation: T, the tables' and the output's strides
            hs = [f"cs{j}_h", f"sn{j}_h"] if sg[1].get("heads") else []
            args += [f"T{j}", f"cs{j}_t", *hs[:1], f"cs{j}_d", f"sn{j}_t", *hs[1:],
                     f"sn{j}_d"] + \
                [f"o{j}_s{x}" for x in range(4)] + [f"p{j}_s"] + \
                ([f"bias{j}_s"] if sg[1].get("bias") is not None else [])
        elif sg[0] == "cache":
            args += [f"T{j}", f"p{j}_s", f"c{j}_s0", f"c{j}_s1", f"c{j}_s2"]
        elif sg[0] == "epi":    # each epilogue input's strides over [*batch, M, N{j}]
            for x in _epi_inputs(body, sg[1]):
                args += [f"e{j}_{idx[x]}_s{d}" for d in range(nb)] + \
                    [f"e{j}_{idx[x]}_sm", f"e{j}_{idx[x]}_sn"]
            if sg[1]["cache"] is not None:      # and a cache write's, as "cache" has
                args += [f"T{j}", f"p{j}_s", f"c{j}_s0", f"c{j}_s1", f"c{j}_s2"]
    return args + ["ws_ptr", "cnt_ptr", "ZM", "SPLIT_MAX"]


def generate(body: Graph, name: str) -> str:
    """The @triton.jit kernel for one matmul body graph, as source text."""
    if horizontal(body) or body.meta.get("rope"):
        return _generate_horizontal(body, name)
    if vertical_sum(body):
        return _generate_vertical(body, name)
    inputs, mms, a, epi, pro = _layout(body)
    pa, pb = operand_prologues(body)
    outputs = list(body.outputs.values())
    idx = {p: i for i, p in enumerate(inputs)}
    nb = mms[0].type.rank - 2
    # a kernel with a row reduction never splits K (its launch cannot: see _run_tiles)
    split = row_reduction(body) is None
    skip = set(pro.members if pro else pa).union(*pb.values())
    fp32 = mms[0].type.dtype is DType.f32
    prec = ', input_precision="ieee"' if fp32 else ""  # fp32 as torch computes it: no TF32
    boff = _batch_offset(nb)
    dot_ty = TL_DTYPE[mms[0].inputs[0].type.dtype]
    accs = [f"acc{j}" for j in range(len(mms))]
    def operand(v: Node, cone: List[Node]) -> str:
        if not cone:
            return f"in{idx[v]} {v.type}"
        return (f"{v.type} computed from " + ", ".join(f"in{idx[x]}" for x in _cone_inputs(cone))
                + " (" + "+".join(dict.fromkeys(n.op.value for n in cone)) + ")")
    lines = _head(body) + [
        f"    # A = {_norm_comment(pro, idx, a)}"
        f"{operand(a, pa)}; " + "; ".join(
            f"acc{j} = A @ {operand(m.inputs[1], pb.get(j, []))}" for j, m in enumerate(mms))
        + ("; epilogue reads " + ", ".join(f"in{idx[p]} {p.type}" for p in epi) if epi else ""),
        "    pid = tl.program_id(0)",
    ] + ([
        "    split = pid % SPLIT_K  # this program's slice of K (split-K: see _split_code)",
        "    pid = pid // SPLIT_K",
    ] if split else []) + [
        "    num_m = (M + BLOCK_M - 1) // BLOCK_M",
        "    num_n = (N + BLOCK_N - 1) // BLOCK_N",
    ] + _tile_order(nb) + _ranges() + ([] if pa else [
        f"    a_rows = in{idx[a]}_ptr + (rm[:, None] * a_sm{boff('a')})",
    ])
    for j, m in enumerate(mms):
        if j not in pb:
            lines.append(f"    b{j}_cols = in{idx[m.inputs[1]]}_ptr + (rn[None, :] * b{j}_sn"
                         f"{boff(f'b{j}')})")
        lines.append(f"    acc{j} = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)")
    pre, inside, post = _prologue_code(pro, idx, dot_ty, accs, "        ") if pro else \
        ([], [], [])
    lines += pre + (_K_SLICE if split else _K_WHOLE) + (
        _operand_code(pa, idx, "a", dot_ty, boff) if pa else [
        "        a = tl.load(a_rows + kk[None, :] * a_sk, mask=mask_m[:, None] & mask_k[None, :],"
        " other=0.0)",
    ])
    lines += inside
    for j, m in enumerate(mms):
        if j in pb:
            lines += _operand_code(pb[j], idx, f"b{j}", TL_DTYPE[m.inputs[1].type.dtype],
                                   boff)
        else:
            lines.append(f"        b{j} = tl.load(b{j}_cols + kk[:, None] * b{j}_sk, "
                         f"mask=mask_k[:, None] & mask_n[None, :], other=0.0)")
        lines.append(f"        acc{j} = tl.dot(a, b{j}, acc=acc{j}{prec})")
    # the single-loop prologue's sums of squares are partial too; the f16 one read all of K
    lines += _split_code(accs, bool(post)) if split else []
    lines += post
    lines += _epilogue(body, {m: f"acc{j}" for j, m in enumerate(mms)}, skip, epi, idx,
                       outputs, boff)
    return _finish(lines, name, _plain_params(body), split)


def _every(body: Graph, make) -> List[str]:
    """make(body), a form's whole parameter list, once per body (every launch asks)."""
    return params.of_body(body, make.__name__, lambda: make(body))


def _plain_params(body: Graph) -> List[str]:
    """Every parameter a plain-form matmul kernel of `body` may read, in order (the kernel
    declares those it reads, `launch` passes values for all): pointers, M, N, K, the batch
    sizes, the operands' strides (a prologue's inputs'), the epilogue inputs' and the norm
    prologue's, then split-K's workspace, tile counters, ZM and SPLIT_MAX, or, with a row
    reduction, the counters and the partials' workspace [ZM, RW]."""
    inputs, mms, a, epi, pro = _layout(body)
    pa, pb = operand_prologues(body)
    idx = {p: i for i, p in enumerate(inputs)}
    nb = mms[0].type.rank - 2
    args = [f"in{i}_ptr" for i in range(len(inputs))] + \
        [f"out{i}_ptr" for i in range(len(body.outputs))] + ["M", "N", "K"] + \
        [f"Z{d}" for d in range(nb)]
    args += _operand_args(a, pa, idx, "a", ("sm", "sk"), nb)
    for j, m in enumerate(mms):
        args += _operand_args(m.inputs[1], pb.get(j, []), idx, f"b{j}", ("sk", "sn"), nb)
    for p in epi:
        args += [f"e{idx[p]}_s{d}" for d in range(nb)] + [f"e{idx[p]}_sm", f"e{idx[p]}_sn"]
    args += _norm_stride_args(pro)
    if row_reduction(body) is None:
        return args + ["ws_ptr", "cnt_ptr", "ZM", "SPLIT_MAX"]
    return args + ["cnt_ptr", "rw_ptr", "RW"]      # the row reduction's partials [ZM, RW]


# a horizontal tile helper's split-K parameters (its product's workspace region, the tile
# counters, the tile's index over all products, its K slice) and its loop over that slice
_SPLIT_PARAMS = "ws_ptr, cnt_ptr, tid, split, ZM, "
_K_SLICE = [
    "    k_per = (K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K) * BLOCK_K",
    "    k_end = tl.minimum(K, (split + 1) * k_per)",
    "    for k0 in range(split * k_per, k_end, BLOCK_K):",
    "        kk = k0 + rk",
    "        mask_k = kk < k_end",
]
# a kernel that never splits K (a row reduction's) walks all of it
_K_WHOLE = [
    "    for k0 in range(0, K, BLOCK_K):",
    "        kk = k0 + rk",
    "        mask_k = kk < K",
]


def _split_code(accs: List[str], ss: bool, tile_id: str = "pid") -> List[str]:
    """Split-K (SPLIT_K > 1, decode's few rows): the SPLIT_K programs of one output tile
    each sum a slice of K. Each stores its partial sums (the accumulators, [BLOCK_M, BLOCK_N],
    and with `ss` an RMSNorm prologue's sums of squares, [BLOCK_M]) to the fp32 workspace and
    counts itself in the tile's counter; the last to arrive reads the slices back, adds them
    in slice order (the same sum whichever program is last), resets the counter for the next
    launch, and alone runs the epilogue (everyone else's masks are off). Workspace: SPLIT_K x
    len(accs) planes of [ZM, N], then SPLIT_K x [ZM] sums of squares (ZM: rows of all batch
    entries)."""
    n = len(accs)
    ss_at = f"ws_ptr + SPLIT_K * {n} * plane + "
    lines = ["    if SPLIT_K > 1:",
             "        plane = ZM * N",
             "        wrow = z * M + rm",
             "        wofs = wrow[:, None] * N + rn[None, :]",
             "        wmask = mask_m[:, None] & mask_n[None, :]"]
    lines += [f"        tl.store(ws_ptr + (split * {n} + {j}) * plane + wofs, {acc}, mask=wmask)"
              for j, acc in enumerate(accs)]
    if ss:
        lines.append(f"        tl.store({ss_at}split * ZM + wrow, ss, mask=mask_m)")
    lines += ["        tl.debug_barrier()  # every thread's partials stored before the count",
              f"        arrived = tl.atomic_add(cnt_ptr + {tile_id}, 1, sem=\"acq_rel\")",
              "        last = arrived == SPLIT_K - 1",
              "        # as a row vector: Triton's interpreter turns row mask & scalar into int32",
              "        mask_m = mask_m & (arrived + tl.zeros_like(rm) == SPLIT_K - 1)",
              "        wmask = mask_m[:, None] & mask_n[None, :]"]
    for j, acc in enumerate(accs):
        lines += [f"        {acc} = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)",
                  "        for s in tl.static_range(SPLIT_K):",
                  f"            {acc} += tl.load(ws_ptr + (s * {n} + {j}) * plane + wofs, "
                  "mask=wmask, other=0.0, cache_modifier=\".cg\")"]
    if ss:
        lines += ["        ss = tl.full((BLOCK_M,), 0.0, tl.float32)",
                  "        for s in tl.static_range(SPLIT_K):",
                  f"            ss += tl.load({ss_at}s * ZM + wrow, mask=mask_m, other=0.0, "
                  "cache_modifier=\".cg\")"]
    lines.append(f"        tl.store(cnt_ptr + {tile_id}, 0, mask=last)  # ready for the next one")
    return lines


def _epilogue(body: Graph, val: Dict[Node, str], skip, epi, idx, outputs, boff) -> List[str]:
    """The epilogue in registers (fp32) from the accumulators named in `val`, and the stores:
    every body node not in `skip` that is no input, constant or matmul. A reduction along
    the rows (fuse_matmul_reductions) is left to `_row_reduction_code`."""
    red = row_reduction(body)
    skip = set(skip) | ({red} if red is not None else set())
    lines = ["    # epilogue, in registers (fp32)",
             "    mask = mask_m[:, None] & mask_n[None, :]"]
    for m, v in list(val.items()):
        # a bf16/f16 product as the graph defines it, rounded to its dtype, where the
        # epilogue reads it (a stored product is rounded by its store anyway)
        if m.type.dtype in _HALF and any(m in u.inputs for u in body.nodes if u not in skip):
            lines.append(f"    {v} = {v}.to({TL_DTYPE[m.type.dtype]}).to(tl.float32)"
                         f"  # the product as {m.type.dtype.value}")
    for p in epi:
        i = idx[p]
        load = _tile_load(i, f"e{i}", ("rm", "sm"), ("rn", "sn"), "mask", boff, p)
        lines.append(f"    v{i} = {load}")
        val[p] = f"v{i}"
    for k, m in enumerate(body.nodes):
        if m in skip or m in val:
            continue
        if m.op is Op.CONST:
            val[m] = literal(m)
        elif m.op not in (Op.INPUT, Op.MATMUL):
            lines.append(f"    t{k} = {_expr(m, [val[x] for x in m.inputs])}"
                         f"  # {m.op.value} -> {m.type}")
            val[m] = f"t{k}"
    lines.append("    out = (z * M + rm[:, None]) * N + rn[None, :]  # outputs are contiguous")
    for i, o in enumerate(outputs):
        if o is not red:
            lines.append(f"    tl.store(out{i}_ptr + out, ({val[o]})"
                         f".to({TL_DTYPE[o.type.dtype]}), mask=mask)")
    if red is not None:
        lines += _row_reduction_code(red, val[red.inputs[0]], outputs.index(red))
    return lines


def _row_reduction_code(red: Node, x: str, k: int) -> List[str]:
    """A reduction of `x` along the output's rows (fuse_matmul_reductions): this tile's
    columns reduce to one fp32 partial per row, stored at [row, pid_n] of the workspace
    (row stride RW); the last of the row tile's num_n programs to arrive (a per-row-tile
    counter, atomic, acq_rel; reset by it) folds the partials in column order, the same
    result whichever is last, and stores the reduction to output k."""
    op = red.op
    lines = [f"    # {op.value} along the rows: this tile's part, then the row tile's last "
             "program folds the parts in order"]
    lines += ["    " + ln for ln in fold_init(op, "p", "BLOCK_M") + fold_step(op, "p", x, "mask")]
    lines += [
        f"    part = {fold_value(op, 'p', None)}",
        "    wrow = z * M + rm",
        "    tl.store(rw_ptr + wrow * RW + pid_n, part, mask=mask_m)",
        "    tl.debug_barrier()  # every thread's part stored before the count",
        "    rt = z * num_m + pid_m",
        "    if tl.atomic_add(cnt_ptr + rt, 1, sem=\"acq_rel\") == num_n - 1:",
    ]
    ind = "        "
    lines += [ind + ln for ln in fold_init(op, "", "BLOCK_M")]
    lines += [
        f"{ind}for c0 in range(0, num_n, BLOCK_N):",
        f"{ind}    cc = c0 + tl.arange(0, BLOCK_N)",
        f"{ind}    pm = mask_m[:, None] & (cc < num_n)[None, :]",
        f"{ind}    p = tl.load(rw_ptr + wrow[:, None] * RW + cc[None, :], mask=pm, other=0.0, "
        "cache_modifier=\".cg\")"]
    lines += [ind + "    " + ln for ln in fold_step(op, "", "p", "pm")]
    lines += [f"{ind}res = {fold_value(op, '', 'N')}",
              f"{ind}tl.store(out{k}_ptr + wrow, res.to({TL_DTYPE[red.type.dtype]}), "
              "mask=mask_m)",
              f"{ind}tl.store(cnt_ptr + rt, 0)  # ready for the next launch"]
    return lines


def vertical_sum(body: Graph):
    """(products, the adds summing them, their sum) when the body's matmuls have distinct A
    operands and are summed by adds read only inside the sum (fuse_matmul's vertical form),
    else None."""
    mms = [n for n in body.nodes if n.op is Op.MATMUL]
    if len(mms) < 2 or len({m.inputs[0] for m in mms}) != len(mms):
        return None
    chain: List[Node] = []
    part = set(mms)
    for n in body.nodes:
        if n.op is Op.ADD and all(x in part for x in n.inputs):
            chain.append(n)
            part.add(n)
    if len(chain) != len(mms) - 1:
        return None
    total = chain[-1]
    readers = [x for n in body.nodes if n not in chain for x in n.inputs]
    if any(x in part and x is not total for x in readers) or any(
            v in part and v is not total for v in body.outputs.values()):
        return None
    return mms, chain, total


def _generate_vertical(body: Graph, name: str) -> str:
    """Products of different A summed (dX = dQ Wq^T + dK Wk^T + dV Wv^T): one K loop per
    product into one fp32 accumulator, then the epilogue on the sum."""
    inputs, mms, chain, total, epi = _vertical_layout(body)
    pas, pbs = a_prologues(body), operand_prologues(body)[1]
    outputs = list(body.outputs.values())
    idx = {p: i for i, p in enumerate(inputs)}
    skip = (set(mms) | set(chain)).union(*pas.values(), *pbs.values())
    nb = mms[0].type.rank - 2
    prec = ', input_precision="ieee"' if mms[0].type.dtype is DType.f32 else ""
    boff = _batch_offset(nb)
    def of(cones, j: int, v: Node) -> str:
        if j not in cones:
            return f"in{idx[v]}"
        return "(" + "+".join(dict.fromkeys(n.op.value for n in cones[j])) + " of " + \
            ", ".join(f"in{idx[x]}" for x in _cone_inputs(cones[j])) + ")"
    lines = _head(body) + [
        "    # acc = " + " + ".join(f"{of(pas, j, m.inputs[0])} @ {of(pbs, j, m.inputs[1])}"
                                   for j, m in enumerate(mms))
        + ": one K loop per product into one accumulator"
        + ("; epilogue reads " + ", ".join(f"in{idx[p]} {p.type}" for p in epi) if epi else ""),
        "    pid = tl.program_id(0)",
        "    num_m = (M + BLOCK_M - 1) // BLOCK_M",
        "    num_n = (N + BLOCK_N - 1) // BLOCK_N",
    ] + _tile_order(nb) + _ranges() + [
        "    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)",
    ]
    for j, m in enumerate(mms):
        lines += [
            f"    # product {j}: {of(pas, j, m.inputs[0])} {m.inputs[0].type} @ "
            f"{of(pbs, j, m.inputs[1])} {m.inputs[1].type}",
        ] + ([] if j in pas else [
            f"    a_rows = in{idx[m.inputs[0]]}_ptr + (rm[:, None] * a{j}_sm{boff(f'a{j}')})",
        ]) + ([] if j in pbs else [
            f"    b_cols = in{idx[m.inputs[1]]}_ptr + (rn[None, :] * b{j}_sn{boff(f'b{j}')})",
        ]) + [
            f"    for k0 in range(0, K{j}, BLOCK_K):",
            "        kk = k0 + rk",
            f"        mask_k = kk < K{j}",
        ] + (_operand_code(pas[j], idx, "a", TL_DTYPE[m.inputs[0].type.dtype], boff)
             if j in pas else [
            f"        a = tl.load(a_rows + kk[None, :] * a{j}_sk, "
            "mask=mask_m[:, None] & mask_k[None, :], other=0.0)"]) + (
            _operand_code(pbs[j], idx, "b", TL_DTYPE[m.inputs[1].type.dtype], boff)
            if j in pbs else [
            f"        b = tl.load(b_cols + kk[:, None] * b{j}_sk, "
            "mask=mask_k[:, None] & mask_n[None, :], other=0.0)"]) + [
            f"        acc = tl.dot(a, b, acc=acc{prec})",
        ]
    lines += _epilogue(body, {total: "acc"}, skip, epi, idx, outputs, boff)
    return _finish(lines, name, _vertical_params(body), split=False)


def _vertical_params(body: Graph) -> List[str]:
    """Every parameter a vertical-form kernel of `body` may read, in order: pointers, M, N,
    K (the products' total: the autotuner's key), each product's K, the batch sizes, each
    product's operand strides, the epilogue inputs'."""
    inputs, mms, _, _, epi = _vertical_layout(body)
    pas, pbs = a_prologues(body), operand_prologues(body)[1]
    idx = {p: i for i, p in enumerate(inputs)}
    nb = mms[0].type.rank - 2
    args = [f"in{i}_ptr" for i in range(len(inputs))] + \
        [f"out{i}_ptr" for i in range(len(body.outputs))] + ["M", "N", "K"] + \
        [f"K{j}" for j in range(len(mms))] + [f"Z{d}" for d in range(nb)]
    for j, m in enumerate(mms):
        args += _operand_args(m.inputs[0], pas.get(j, []), idx, f"a{j}", ("sm", "sk"), nb)
        args += _operand_args(m.inputs[1], pbs.get(j, []), idx, f"b{j}", ("sk", "sn"), nb)
    for p in epi:
        args += [f"e{idx[p]}_s{d}" for d in range(nb)] + [f"e{idx[p]}_sm", f"e{idx[p]}_sn"]
    return args


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): a handful for the GPU autotuner; those
# with tiles far larger than the problem are pruned per launch (decode's M = batch rows).
# The first two are the large 8- and 4-warp tiles Hopper's bf16 tensor cores want; with fp32
# operands the first needs more shared memory than an H100 has, and the autotuner skips a
# config that cannot launch (Triton's OutOfResources), as benchmarks/compile_check.py counts
GPU_CONFIGS = [(128, 256, 64, 8, 3), (64, 256, 32, 4, 4),
               (128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
               (64, 64, 32, 4, 4), (32, 64, 32, 4, 4), (16, 64, 64, 4, 4), (16, 32, 64, 2, 4)]
GROUP_M = 8
# split-K, the plain form only: with few rows (decode's M = batch) an N of a few hundred
# columns is a few dozen tiles, too few programs to keep the GPU's memory system busy, each
# streaming all of K alone; SPLIT_K programs per tile each take a slice of K instead
SPLITS = (2, 4, 8)
SPLIT_BLOCKS = [(16, 64, 64, 4, 4), (16, 32, 128, 4, 3)]
SPLIT_ROWS = 64          # rows (all batch entries) up to which a launch may split
# and a training weight gradient (x^T dy, K = B * T) of a small output: few tiles, each
# streaming all of a deep K; big tiles, K in 2, 4 or 8 slices
DEEP_K = 4096
DEEP_TILES = 264         # fewer 128 x 128 output tiles than two waves of an H100's 132 SMs
DEEP_SPLITS = (2, 4, 8)
DEEP_BLOCKS = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4)]
SPLIT_TILES = 1 << 14    # output tiles of a launch that may split, at most (the counters)
RED_MIN_BN = 64          # the narrowest BLOCK_N offered to a kernel with a row reduction
INTERPRET_SPLIT_K = 1    # the interpreter's SPLIT_K where a launch may split (tests set it)
_SPLIT_BUFFERS: Dict[str, tuple] = {}
_TUNED: Dict[int, tuple] = {}


def gpu_configs(split: bool):
    """The autotuner's triton.Configs: GPU_CONFIGS, and for a kernel with SPLIT_K (the plain
    form) those with SPLIT_K = 1 plus SPLIT_BLOCKS at each of SPLITS."""
    import triton

    def cfg(bm, bn, bk, w, st, **kw):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M,
                              **kw}, num_warps=w, num_stages=st)
    if not split:
        return [cfg(*c) for c in GPU_CONFIGS]
    return [cfg(*c, SPLIT_K=1) for c in GPU_CONFIGS] + \
        [cfg(*c, SPLIT_K=k) for k in SPLITS for c in SPLIT_BLOCKS] + \
        [cfg(*c, SPLIT_K=k) for k in DEEP_SPLITS for c in DEEP_BLOCKS]


def prune_configs(configs, nargs, **kwargs):
    """Configs whose tiles do not exceed the problem (rounded up to a power of two, at least
    16) along M, N and K; the smallest one if none fits. Split-K configs stay where the
    launch allows that split (SPLIT_MAX) and every slice gets at least one BLOCK_K."""
    import triton

    lim = {d: max(16, triton.next_power_of_2(max(int(nargs[d]), 1))) for d in "MNK"}
    whole = [c for c in configs if c.kwargs.get("SPLIT_K", 1) == 1]
    if "RW" in nargs:       # a row reduction: at most RW column tiles (its workspace)
        whole = [c for c in whole
                 if triton.cdiv(int(nargs["N"]), c.kwargs["BLOCK_N"]) <= int(nargs["RW"])]
    fit = [c for c in whole if c.kwargs["BLOCK_M"] <= lim["M"]
           and c.kwargs["BLOCK_N"] <= lim["N"] and c.kwargs["BLOCK_K"] <= lim["K"]]
    fit = fit or [min(whole, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    top = int(nargs.get("SPLIT_MAX", 1))
    # few rows split with the thin SPLIT_BLOCKS, a deep K with the DEEP_BLOCKS
    few = int(nargs.get("ZM", nargs["M"])) <= SPLIT_ROWS
    shapes = {tuple(b[:3]) for b in (SPLIT_BLOCKS if few else DEEP_BLOCKS)}
    return fit + [c for c in configs if 1 < c.kwargs.get("SPLIT_K", 1) <= top
                  and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) in shapes
                  and c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"] <= int(nargs["K"])
                  and c.kwargs["BLOCK_M"] <= lim["M"] and c.kwargs["BLOCK_N"] <= lim["N"]]


def _autotuned(kernel, split: bool = False):
    """`kernel` wrapped in triton.autotune (keyed on M, N, K, and SPLIT_MAX for a kernel
    that may split K; codegen/autotune.py: configs compiled in parallel), made once per
    kernel."""
    from .autotune import autotune

    hit = _TUNED.get(id(kernel))
    if hit is None or hit[0] is not kernel:
        key = list(_KEY) + (["SPLIT_MAX"] if split else [])
        hit = (kernel, autotune(kernel, gpu_configs(split), key, prune=prune_configs))
        _TUNED[id(kernel)] = hit
    return hit[1]


def tuned_configs() -> List[dict]:
    """What the GPU autotuner chose so far, per generated matmul kernel and key (M, N, K and
    SPLIT_MAX): block sizes, SPLIT_K, warps, stages. For benchmark reports."""
    rows = []
    for kernel, tuner in _TUNED.values():
        for key, cfg in getattr(tuner, "cache", {}).items():
            rows.append({"kernel": kernel.__name__, "key": [k for k in key if isinstance(k, int)],
                         **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return rows


def _block(n: int, hi: int) -> int:
    import triton

    return max(16, min(triton.next_power_of_2(max(n, 1)), hi))


# the interpreter pays per program and per loop step, not per element: big tiles (numpy does
# the arithmetic), capped at INTERPRET_TILE elements per operand tile
INTERPRET_TILE = 1 << 17


def interpret_blocks(M: int, N: int, K: int):
    bm = _block(M, 128)
    bn = _block(N, INTERPRET_TILE // bm)
    bk = _block(K, INTERPRET_TILE // max(bm, bn))
    return bm, bn, bk


def fold_batch(batch: List[int], M: int, rowed: List[List[int]], cols: List[List[int]]) -> int:
    """Fold trailing batch dims into M while every M-indexed tensor (`rowed`: A and the
    epilogue inputs, strides ``[*batch, M, ...]``) steps through them evenly and no B operand
    (`cols`) is batched along them: ``x[B, T, K] @ W[K, N]`` is one product of M = B*T rows.
    Updates `batch` (folded dims become 1) and the M strides in place; returns the new M."""
    nb = len(batch)
    for d in reversed(range(nb)):
        if batch[d] != 1:
            if any(s[d] != 0 for s in cols) or not all(
                    M == 1 or s[d] == s[nb] * M for s in rowed):
                break
            if M == 1:          # M had one row: its stride is free, take the batch dim's
                for s in rowed:
                    s[nb] = s[d]
        M *= batch[d]
        batch[d] = 1
    return M


def _out_space(out):
    """(shape, batch dims (a list), M, N) of a contiguous [*batch, M, N] output."""
    shape = tuple(out.shape)
    return shape, list(shape[:-2]), shape[-2], shape[-1]


def launch(kernel, xs, outs, body: Graph, ctx, interpret: bool) -> None:
    """One program per output tile per batch entry; operands read through their strides."""
    if horizontal(body) or body.meta.get("rope"):
        return _launch_horizontal(kernel, xs, outs, body, interpret)
    if vertical_sum(body):
        return _launch_vertical(kernel, xs, outs, body, ctx, interpret)
    inputs, mms, a, epi, pro = _layout(body)
    pa, pb = operand_prologues(body)
    idx = {p: i for i, p in enumerate(inputs)}
    red = row_reduction(body)
    shape = tuple(ctx.dim(d) for d in mms[0].type.shape)
    if math.prod(shape) == 0:
        return
    batch, M, N = list(shape[:-2]), shape[-2], shape[-1]
    K = ctx.dim(a.type.shape[-1]) if pa else xs[idx[a]].shape[-1]
    xs = list(xs)
    a_st = _operand_strides(xs, idx, a, pa, batch, (M, K), ctx)
    b_st = [s for j, m in enumerate(mms)
            for s in _operand_strides(xs, idx, m.inputs[1], pb.get(j, []), batch, (K, N), ctx)]
    e_st = [list(xs[idx[p]].expand(shape).stride()) for p in epi]
    M = fold_batch(batch, M, a_st + e_st, b_st)
    nbatch = math.prod(batch)
    args = [*xs, *outs, M, N, K, *batch]
    for s in a_st + b_st + e_st:
        args += s
    if pro:
        args += norm_strides(pro, xs, idx)
    if red is None:
        args += _split_args(outs[0].device, nbatch, M, N, len(mms), K)
    else:
        args += _row_reduction_args(outs[0].device, nbatch, M, N, K, interpret)
    _run_tiles(kernel, params.bind(kernel, _every(body, _plain_params), args), nbatch, M, N, K,
               interpret, split_max=args[-1] if red is None else 0)


def _row_reduction_args(device, nbatch: int, M: int, N: int, K: int, interpret: bool):
    """The last kernel arguments of a matmul with a row reduction (which never splits K):
    the row tile counters, then the partials' workspace and its row stride RW: one partial
    per column tile, at most ceil(N / RED_MIN_BN) (the pruner keeps the configs whose
    BLOCK_N gives no more; the interpreter's one BLOCK_N sets it)."""
    import torch
    import triton

    counters = _split_buffers(device)[1]
    rows = nbatch * triton.cdiv(M, 16)          # row tiles at the smallest BLOCK_M
    if rows > SPLIT_TILES:
        counters = torch.zeros(rows, dtype=torch.int32, device=device)
    bn = interpret_blocks(M, N, K)[1] if interpret else RED_MIN_BN
    rw = triton.cdiv(N, bn)
    ws = torch.empty(nbatch * M * rw, dtype=torch.float32, device=device)
    return [counters, ws, rw]


def _launch_vertical(kernel, xs, outs, body: Graph, ctx, interpret: bool) -> None:
    """One program per output tile per batch entry; each product's operands read through
    their strides (a computed A's prologue inputs through theirs), K the products' total (the
    autotuner's key)."""
    inputs, mms, _, _, epi = _vertical_layout(body)
    pas, pbs = a_prologues(body), operand_prologues(body)[1]
    idx = {p: i for i, p in enumerate(inputs)}
    if outs[0].numel() == 0:
        return
    shape, batch, M, N = _out_space(outs[0])
    xs = list(xs)
    ks = [ctx.dim(m.inputs[0].type.shape[-1]) if j in pas else xs[idx[m.inputs[0]]].shape[-1]
          for j, m in enumerate(mms)]
    a_st = [_operand_strides(xs, idx, m.inputs[0], pas.get(j, []), batch, (M, k), ctx)
            for j, (m, k) in enumerate(zip(mms, ks))]
    b_st = [_operand_strides(xs, idx, m.inputs[1], pbs.get(j, []), batch, (k, N), ctx)
            for j, (m, k) in enumerate(zip(mms, ks))]
    e_st = [list(xs[idx[p]].expand(shape).stride()) for p in epi]
    M = fold_batch(batch, M, [s for sa in a_st for s in sa] + e_st,
                   [s for sb in b_st for s in sb])
    nbatch = math.prod(batch)
    args = [*xs, *outs, M, N, sum(ks), *ks, *batch]
    for sa, sb in zip(a_st, b_st):
        args += [x for s in sa + sb for x in s]
    for s in e_st:
        args += s
    _run_tiles(kernel, params.bind(kernel, _every(body, _vertical_params), args), nbatch, M, N,
               max(ks), interpret)


def _launch_horizontal(kernel, xs, outs, body: Graph, interpret: bool) -> None:
    """One program per (row tile, column tile of any product) per batch entry (times
    SPLIT_K where the launch may split)."""
    import triton

    inputs, mms, a, _, pro = _layout(body)
    idx = {p: i for i, p in enumerate(inputs)}
    x = xs[idx[a]]
    batch, M, K = list(x.shape[:-2]), x.shape[-2], x.shape[-1]
    ns = [xs[idx[m.inputs[1]]].shape[-1] for m in mms]
    if math.prod(x.shape[:-1]) == 0 or not any(ns):
        return          # no rows or no columns to store (K = 0 still runs: A @ B is zeros)
    a_st = list(x.stride())
    b_st = [list(xs[idx[m.inputs[1]]].stride()) for m in mms]    # [K, N] weights: sk, sn
    seg = _segments(body, mms, pro)
    # an epilogue input's strides over its product's [*batch, M, N_j] (folded with A's)
    e_st = {j: [list(xs[idx[p]].expand(*batch, M, n).stride()) for p in _epi_inputs(body, sg[1])]
            for j, (sg, n) in enumerate(zip(seg, ns)) if sg[0] == "epi"}
    M = fold_batch(batch, M, [a_st] + [st for sts in e_st.values() for st in sts], [])
    nbatch = math.prod(batch)
    args = [*xs, *outs, M, sum(ns), K, *ns, *batch, *a_st] + [s for st in b_st for s in st]
    if pro:
        args += norm_strides(pro, xs, idx)
    for j, sg in enumerate(seg):
        if sg[0] == "epi":
            args += [s for st in e_st[j] for s in st]
            if sg[1]["cache"] is not None:      # as "cache" below
                cw = list(body.outputs.values())[sg[1]["cache"]]
                pos, cache = xs[idx[cw.inputs[1]]], xs[idx[cw.inputs[0]]]
                args += [pos.numel(), pos.stride(0) if pos.numel() > 1 else 0,
                         *cache.stride()]
        elif sg[0] == "rope":       # RoPE of the product, to [B, H, T, W] or a cache
            cw = sg[1]
            dst = xs[cw["cache"]] if cw["cache"] is not None else outs[cw["out"]]
            pos = xs[cw["pos"]] if cw["pos"] is not None else None
            args.append(x.shape[-2])
            for tab in (xs[cw["cos"]], xs[cw["sin"]]):
                args += _table_strides(tab, cw.get("layout", "bhtd"), cw.get("heads"))
            o_st = list(dst.stride())
            if cw.get("layout") == "bthd":    # [B, T, H, W]: the tile stores at (b, h, t, d)
                o_st[1], o_st[2] = o_st[2], o_st[1]
            args += [*o_st, pos.stride(0) if pos is not None and pos.numel() > 1 else 0]
            if cw.get("bias") is not None:
                args.append(xs[cw["bias"]].stride(-1))
        elif sg[0] == "cache":      # [B, T, N] rows stored into a cache [B, L, N] at pos[t]
            cw = sg[2]
            pos, cache = xs[idx[cw.inputs[1]]], xs[idx[cw.inputs[0]]]
            args += [pos.numel(), pos.stride(0) if pos.numel() > 1 else 0, *cache.stride()]

    # split-K as the plain form's (_split_args): each product's region of the workspace
    # holds, per slice, its accumulators (two for a rotated product) and the sums of squares
    zm = nbatch * M
    args += _split_args(x.device, nbatch, M, sum(ns), 1, K, zm * sum(
        (2 if sg[0] == "rope" else 1) * n + 1 for sg, n in zip(seg, ns)))   # per slice

    split_max = args[-1]
    args = params.bind(kernel, _every(body, _horizontal_params), args)

    def tiles(bm, bn):
        return nbatch * triton.cdiv(M, bm) * sum(triton.cdiv(n, bn) for n in ns)
    if interpret:
        bm, bn, bk = interpret_blocks(M, max(ns), K)
        sk = INTERPRET_SPLIT_K if INTERPRET_SPLIT_K <= split_max else 1
        kernel[(tiles(bm, bn) * sk,)](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                      GROUP_M=GROUP_M, SPLIT_K=sk)
        return
    _autotuned(kernel, split=True)[
        lambda meta: (tiles(meta["BLOCK_M"], meta["BLOCK_N"]) * meta.get("SPLIT_K", 1),)](*args)
