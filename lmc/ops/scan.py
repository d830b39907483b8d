"""`scan`: a general recurrence over the sequence axis, with a body graph.

    ys, carry_T = scan(step, carry0, xs, axis)

`step` is a block taking (carry..., x_t...) and returning (new_carry..., y_t...): the new
carries first, with the carries' exact types, then at least one per-step output. `carry0` and
`xs` are a tensor or a list of tensors; each x is cut along `axis` (x_t has that axis removed)
and each y_t is stacked along `axis` of the result (a negative axis counts from the end of each
tensor). Nothing mixes positions except through the carry, so a scan is causal by construction.

The IR node (`Op.SCAN`, structural, read through GETITEM) holds the step as a body Graph of
primitives, already inlined. Its inputs are carries, xs, then the step's parameters: the body
refers to those through INPUT placeholders, so the parameters stay PARAM nodes of the model
(registered, initialised and differentiated like any other) while the body stays opaque to the
graph passes. Outputs are (ys..., carries...).

The reverse-mode rule (lmc/passes/autodiff.py) differentiates the body once with the same
`differentiate` and emits `Op.SCAN_BWD`, whose reference (`run_backward`) reruns the forward
loop keeping each step's saved values and then walks the steps backwards, feeding the carry's
cotangent from step t+1 into step t. Second derivatives through a scan are not supported.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..errors import LmcError, ShapeError
from ..ir.dims import dims_equal
from ..ir.graph import Graph, Node
from ..ir.ops import Op
from ..ir.types import TensorType


def same_type(a: TensorType, b: TensorType) -> bool:
    return a.dtype == b.dtype and a.rank == b.rank and all(
        dims_equal(x, y) for x, y in zip(a.shape, b.shape))


def _axis(axis, rank: int) -> int:
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ShapeError(f"scan axis must be an integer, got {axis!r}")
    if not -rank <= axis < rank:
        raise ShapeError(f"scan axis {axis} out of range for a rank-{rank} tensor")
    return axis % rank


def step_types(seqs: Sequence[TensorType], axis) -> tuple:
    """(types of x_t, the common length along the axis) for the scanned inputs."""
    if not seqs:
        raise ShapeError("scan needs at least one input sequence")
    steps, length = [], None
    for t in seqs:
        ax = _axis(axis, t.rank)
        if length is None:
            length, first = t.shape[ax], t
        elif not dims_equal(t.shape[ax], length):
            raise ShapeError(f"scan inputs differ in length along axis {axis}: {first} and {t}")
        steps.append(TensorType(t.shape[:ax] + t.shape[ax + 1:], t.dtype))
    return steps, length


def infer(types: List[TensorType], attrs: dict, what: str = "scan") -> tuple:
    """The shape rule: the inputs must match the body's placeholders; the body's first outputs
    must have the carries' types. Returns (ys..., carries...)."""
    body: Graph = attrs["body"]
    nc, nx = attrs["n_carry"], attrs["n_x"]
    placeholders = body.inputs
    if len(types) < nc + nx or len(placeholders) != len(types):
        raise ShapeError(f"{what}: {len(types)} inputs for a body with {len(placeholders)}")
    carries, seqs, consts = types[:nc], types[nc:nc + nx], types[nc + nx:]
    steps, length = step_types(seqs, attrs["axis"])
    for got, ph in zip(carries + steps + consts, placeholders):
        if not same_type(got, ph.type):
            raise ShapeError(f"{what}: body input {ph.attrs['name']!r} is {ph.type}, given {got}")
    outs = list(body.outputs.values())
    if len(outs) <= nc:
        raise ShapeError(f"{what}: the step returns {len(outs)} value(s); it must return its "
                         f"{nc} new carr{'y' if nc == 1 else 'ies'} and at least one output")
    for o, c in zip(outs, carries):
        if not same_type(o.type, c):
            raise ShapeError(f"{what}: the step returns a carry of type {o.type} for a carry "
                             f"of type {c}")
    ys = []
    for o in outs[nc:]:
        ax = _axis(attrs["axis"], o.type.rank + 1)
        ys.append(TensorType(o.type.shape[:ax] + (length,) + o.type.shape[ax:], o.type.dtype))
    return tuple(ys) + tuple(carries)


# -- building (Builder.scan) ---------------------------------------------------------------------
def build(b, step, carry, xs, axis: int = 1, name=None, options=None):
    """Make the SCAN node in builder `b`; returns (ys, carry_T), each a Tensor when given one
    (a tuple of them otherwise)."""
    from ..frontend.builder import Builder, Tensor
    from ..passes.basic import inline

    where = b._where()
    multi_c, multi_x = isinstance(carry, (list, tuple)), isinstance(xs, (list, tuple))
    for what, vals in (("carry", carry if multi_c else [carry]), ("xs", xs if multi_x else [xs])):
        for v in vals:
            if not isinstance(v, (Tensor, int, float)):
                from ..frontend.builder import describe
                raise LmcError(f"scan: {what} must be a tensor or a list of tensors, got "
                               f"{'a list holding ' if multi_c or multi_x else ''}"
                               f"{describe(v)}", where)
    carries = [b.lift(c) for c in (carry if multi_c else [carry])]
    seqs = [b.lift(x) for x in (xs if multi_x else [xs])]
    if not carries:
        raise LmcError("scan needs a carry (a tensor or a list of tensors)", where)
    try:
        steps, _ = step_types([x.node.type for x in seqs], axis)
    except ShapeError as e:
        raise e.with_loc(where)

    # the step is built like a block call, on placeholders of the per-step types, in a scratch
    # builder sharing our scope, parameter table and instance names (so its params are named
    # <scope>.<instance>.<param> and a second scan of the same step gets its own)
    scratch = Builder(b.config, b.blocks, b.scope, params=b.params, stack=b.stack,
                      default_dtype=b.default_dtype)
    scratch.instances, scratch.loc = b.instances, where
    args = [scratch.input(f"carry{i}", c.shape, c.dtype) for i, c in enumerate(carries)]
    args += [scratch.input(f"x{i}", t.shape, t.dtype) for i, t in enumerate(steps)]
    scratch.call(step, *args, name=name, **(options or {}))
    call = next(n for n in scratch.nodes if n.op is Op.BLOCK)
    body = inline(call.attrs["body"])

    # the step's params become trailing inputs of the scan (and PARAM nodes of the caller)
    inside = set(body.nodes)
    for n in body.nodes:
        for i in n.inputs:
            if i not in inside:
                raise LmcError(f"scan: the step block {call.attrs['block']!r} uses a tensor "
                               f"from outside it; pass it as an argument", where)
    args_in = [n for n in body.nodes if n.op is Op.INPUT]
    params = [n for n in body.nodes if n.op is Op.PARAM]
    remap: Dict[Node, Node] = {}
    nodes: List[Node] = list(args_in)
    for p in params:
        remap[p] = Node(Op.INPUT, (), {"name": p.attrs["name"], "shape": p.type.shape,
                                       "dtype": p.type.dtype}, p.type, p.loc, p.scope)
        nodes.append(remap[p])
    for n in body.nodes:
        if n.op in (Op.INPUT, Op.PARAM):
            continue
        remap[n] = n.remapped(remap)
        nodes.append(remap[n])
    body = Graph(call.attrs["block"], nodes,
                 {k: remap.get(v, v) for k, v in body.outputs.items()})

    saved, b.loc = b.loc, where
    try:
        b.nodes.extend(params)
        node = b.node(Op.SCAN, carries + seqs + [Tensor(p, b) for p in params],
                      {"body": body, "n_carry": len(carries), "n_x": len(seqs), "axis": axis,
                       "block": call.attrs["block"], "instance": call.attrs["instance"]})
        outs = [b.node(Op.GETITEM, (node,), {"index": i}) for i in range(len(node.node.type))]
    finally:
        b.loc = saved
    ny = len(outs) - len(carries)
    ys, cs = outs[:ny], outs[ny:]
    return (tuple(ys) if ny > 1 else ys[0]), (tuple(cs) if multi_c else cs[0])


# -- running (the references) -------------------------------------------------------------------
def _split(xs, attrs):
    nc, nx = attrs["n_carry"], attrs["n_x"]
    return list(xs[:nc]), list(xs[nc:nc + nx]), list(xs[nc + nx:])


def _names(body: Graph) -> List[str]:
    return [n.attrs["name"] for n in body.inputs]


def _stack(steps: List[torch.Tensor], node: Node, axis, ctx, rank_plus: int = 1):
    """Stack per-step values along the scan axis (an empty sequence gives a 0-length axis)."""
    ax = _axis(axis, node.type.rank + rank_plus)
    if steps:
        return torch.stack(steps, dim=ax)
    shape = list(node.type.concrete(ctx.dims))
    shape.insert(ax, 0)
    return torch.empty(shape, dtype=node.type.dtype.torch(), device=ctx.device)


def run_forward(ctx, xs, attrs):
    from ..runtime.executor import run_graph

    body: Graph = attrs["body"]
    carries, seqs, consts = _split(xs, attrs)
    axes = [_axis(attrs["axis"], s.dim()) for s in seqs]
    names, nc = _names(body), attrs["n_carry"]
    outs = list(body.outputs.values())
    per_step: List[List[torch.Tensor]] = [[] for _ in outs[nc:]]
    for t in range(seqs[0].shape[axes[0]]):
        x_t = [s.select(ax, t) for s, ax in zip(seqs, axes)]
        vals = list(run_graph(body, dict(zip(names, carries + x_t + consts)), ctx).values())
        carries = vals[:nc]
        for j, y in enumerate(vals[nc:]):
            per_step[j].append(y)
    ys = [_stack(steps, o, attrs["axis"], ctx) for steps, o in zip(per_step, outs[nc:])]
    return tuple(ys) + tuple(carries)


def run_backward(ctx, xs, attrs):
    """SCAN_BWD: inputs (carries0, xs, consts, cotangents of ys, cotangent of carry_T);
    outputs the gradients of (carries0, xs, consts)."""
    from ..runtime.executor import run_graph

    body: Graph = attrs["body"]
    prog = attrs["_vjp"]                    # differentiate(body), backward cleaned
    names, nc = _names(body), attrs["n_carry"]
    n_in = len(names)
    carries, seqs, consts = _split(xs[:n_in], attrs)
    out_names = list(body.outputs)
    ny = len(out_names) - nc
    g_ys, g_carry = list(xs[n_in:n_in + ny]), list(xs[n_in + ny:])
    axes = [_axis(attrs["axis"], s.dim()) for s in seqs]
    y_axes = [_axis(attrs["axis"], o.type.rank + 1) for o in list(body.outputs.values())[nc:]]
    T = seqs[0].shape[axes[0]]

    saved = []                              # what each step's backward needs
    for t in range(T):
        x_t = [s.select(ax, t) for s, ax in zip(seqs, axes)]
        outs = run_graph(prog.forward, dict(zip(names, carries + x_t + consts)), ctx)
        saved.append({k: outs[k] for k in prog.saved})
        carries = [outs[k] for k in out_names[:nc]]

    def zeros(i):
        return torch.zeros(body.inputs[i].type.concrete(ctx.dims), device=ctx.device,
                           dtype=body.inputs[i].type.dtype.torch())

    wrt = set(prog.wrt)
    g_consts = [zeros(nc + len(seqs) + j) for j in range(len(consts))]
    g_steps: List[List[torch.Tensor]] = [[] for _ in seqs]
    takes = set(prog.outputs)
    for t in reversed(range(T)):
        bound = dict(saved[t])
        for k, name in enumerate(out_names):
            if name in takes:
                bound[f"grad:{name}"] = (g_carry[k] if k < nc
                                         else g_ys[k - nc].select(y_axes[k - nc], t))
        got = run_graph(prog.backward, bound, ctx)

        def grad(i):
            return got[f"grad:{names[i]}"] if names[i] in wrt else zeros(i)

        g_carry = [grad(i) for i in range(nc)]
        for j in range(len(seqs)):
            g_steps[j].append(grad(nc + j))
        for j in range(len(consts)):
            g_consts[j] = g_consts[j] + grad(nc + len(seqs) + j)
    g_seqs = []
    for j, steps in enumerate(g_steps):
        steps.reverse()
        ph = body.inputs[nc + j]
        g_seqs.append(_stack(steps, ph, attrs["axis"], ctx) if steps else
                      torch.zeros_like(seqs[j]))
    return tuple(g_carry) + tuple(g_seqs) + tuple(g_consts)
