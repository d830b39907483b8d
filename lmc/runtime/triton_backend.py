"""The triton backend: FUSED groups run as generated Triton kernels, everything else (matmuls,
views, reductions, indexing: the open part of the codegen issue) by its torch reference.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on CPU
tensors: slow, but the same kernels, which is how CI tests them.
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from ..codegen import cache
from ..codegen.pointwise import generate, module_source
from ..errors import LmcError
from ..ir.graph import Graph
from ..ir.ops import Op
from ..passes.fuse_pointwise import fuse_pointwise
from ..passes.verify import verify


def _interpret() -> bool:
    """Whether kernels run in Triton's interpreter (always, without CUDA).

    `import lmc` sets TRITON_INTERPRET=1 on such machines before triton is imported; if triton
    was imported earlier without it, its library functions are compiled-only and every kernel
    calling one would fail deep inside Triton, so say so now.
    """
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.sigmoid, InterpretedFunction):
            raise LmcError("the triton backend needs Triton's interpreter on a machine without "
                           "CUDA, but triton was imported before TRITON_INTERPRET=1 was set: "
                           "set TRITON_INTERPRET=1 in the environment or import lmc first")
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonProgram:
    """A graph with its pointwise groups fused and compiled."""

    def __init__(self, graph: Graph):
        self.interpret = _interpret()
        self.graph = verify(fuse_pointwise(graph), inlined=True)
        bodies = {n.attrs["kernel"]: n.attrs["body"] for n in self.graph.nodes
                  if n.op is Op.FUSED}
        self.source = module_source({k: generate(b, k) for k, b in bodies.items()})
        module = cache.load_module(self.source)
        self.kernels = {k: getattr(module, k) for k in bodies}
        self.impl = {Op.FUSED: self._run_fused}
        self.launches = 0

    def _run_fused(self, ctx, xs, attrs):
        import triton

        body = attrs["body"]
        outs = list(body.outputs.values())
        shape = outs[0].type.concrete(ctx.dims)
        results = tuple(torch.empty(shape, dtype=o.type.dtype.torch(), device=ctx.device)
                        for o in outs)
        n = 1
        for s in shape:
            n *= s
        if n == 0:
            return results
        sizes = list(shape) or [1]
        strides = []
        for x in xs:
            v = x.expand(shape) if shape else x.reshape(1)
            strides.extend(v.stride())  # 0 on broadcast axes
        # the interpreter pays per program, so it gets big blocks; a GPU gets 1024
        block = min(triton.next_power_of_2(n), 16384) if self.interpret else 1024
        grid = (triton.cdiv(n, block),)
        self.kernels[attrs["kernel"]][grid](*xs, *results, n, *sizes, *strides, BLOCK=block)
        self.launches += 1
        return results


def kernel_summary(p: TritonProgram) -> Dict[str, list]:
    return {n.attrs["kernel"]: [m.op.value for m in n.attrs["body"].nodes
                                if m.op not in (Op.INPUT, Op.CONST)]
            for n in p.graph.nodes if n.op is Op.FUSED}
