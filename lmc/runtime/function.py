"""The bridge to torch autograd: one `torch.autograd.Function` runs a differentiated program.

Forward runs forward' (the graph plus its ``saved:*`` outputs) and keeps the saved values;
backward runs the backward graph produced by the autodiff pass. Torch's autograd only sees
one node per model call, so every gradient comes from lmc's own backward graph.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from ..ops.reference import RefCtx
from ..passes.autodiff import Differentiated
from .executor import run_graph


def _warm(prog: Differentiated, bound, ctx) -> None:
    """Before the first training step for new dims on a GPU: one warm pass compiles the
    kernels of the forward and the backward together (codegen/warm.py); the backward is
    warmed on the forward's meta outputs (its saved values, with their real strides) and
    contiguous cotangents, as the real backward gets them."""
    from ..codegen import warm
    fx, bx = getattr(prog, "forward_exec", None), getattr(prog, "backward_exec", None)
    if fx is None or not warm.wanted(fx, ctx):
        return
    backward = bx is not None and warm.wanted(bx, ctx)

    def backward_inputs(outs):
        mb = {s: outs[s] for s in prog.saved}
        for name in prog.outputs:
            node = prog.forward.outputs[name]
            mb[f"grad:{name}"] = torch.empty(node.type.concrete(ctx.dims), device="meta",
                                             dtype=node.type.dtype.torch())
        return mb, ctx
    with warm.WarmPass() as w:
        outs = w.program(fx, bound, ctx)
        if backward:
            w.follow(bx, warm.dims_key(ctx), outs, backward_inputs)


def _run(graph, program, bound, ctx):
    if program is None:
        return run_graph(graph, bound, ctx)
    return program.run(bound, ctx)


class GraphFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prog: Differentiated, names: Sequence[str], refctx: RefCtx, *values):
        bound = dict(zip(names, values))
        _warm(prog, bound, refctx)
        outs = _run(prog.forward, prog.forward_exec, bound, refctx)
        ctx.prog, ctx.names, ctx.refctx = prog, names, refctx
        ctx.save_for_backward(*[outs[s] for s in prog.saved])
        results = [v for k, v in outs.items() if not k.startswith("saved:")]
        ctx.out_names = [k for k in outs if not k.startswith("saved:")]
        # an output the backward takes no cotangent for (an integer, or left out by
        # LmcModel(grad_outputs=...)) is returned without gradient
        takes = {id(v) for k, v in zip(ctx.out_names, results) if k in prog.outputs}
        ctx.mark_non_differentiable(*[v for v in results if id(v) not in takes])
        ctx.set_materialize_grads(False)   # unused outputs: None, zeros made below if needed
        return tuple(results)

    @staticmethod
    def backward(ctx, *grads):
        prog: Differentiated = ctx.prog
        bound: Dict[str, torch.Tensor] = dict(zip(prog.saved, ctx.saved_tensors))
        by_name = dict(zip(ctx.out_names, grads))
        for name in prog.outputs:
            g = by_name[name]
            if g is None:  # an output that did not reach the loss: a zero cotangent
                node = prog.forward.outputs[name]
                g = torch.zeros(node.type.concrete(ctx.refctx.dims), device=ctx.refctx.device,
                                dtype=node.type.dtype.torch())
            bound[f"grad:{name}"] = g
        outs = _run(prog.backward, prog.backward_exec, bound, ctx.refctx)
        wanted = set(prog.wrt)
        return (None, None, None) + tuple(
            outs[f"grad:{n}"] if n in wanted and ctx.needs_input_grad[3 + i] else None
            for i, n in enumerate(ctx.names))
