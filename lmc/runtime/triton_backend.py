"""The triton backend: FUSED groups run as generated Triton kernels, everything else (views,
indexing, and whatever no fusion pass claimed) by its torch reference.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on CPU
tensors: slow, but the same kernels, which is how CI tests them.
"""
from __future__ import annotations

import os
from typing import Dict, Sequence

import torch

from ..codegen import cache, interpreter, kind_module, warm, wrapper
from ..codegen.program import fuse, module_source
from ..errors import InterpreterBf16Error, LmcError
from ..ir.graph import Graph
from ..ir.ops import Op
from ..ops.reference import REFERENCE
from .executor import check_lengths


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
    elif os.environ.get("TRITON_INTERPRET") != "1":
        return False
    _check_numpy()
    interpreter.install()
    return True


def _check_numpy() -> None:
    """Triton 3.6's interpreter (and older) converts a loop bound computed from program_id, a
    1-element array, with int(), which NumPy 2.4 refuses (seen: triton 3.6.0 + numpy 2.4.6
    fails, + numpy 2.3.5 runs; triton 3.9 squeezes the array first)."""
    import numpy as np
    import triton

    def version(v):
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2] if p.isdigit())
    if version(triton.__version__) < (3, 7) and version(np.__version__) >= (2, 4):
        raise LmcError(f"Triton {triton.__version__}'s interpreter (kernels on CPU) fails with "
                       f"NumPy {np.__version__}: install 'numpy<2.4', or a newer Triton "
                       "(make venv installs one that works)")


# benchmarks/compile_check.py sets this to run a bf16 program in the interpreter only to
# record its kernels' launches (argument types, constexprs) for the GPU compiler: the values
# it computes are garbage, and nothing else may read them
BF16_SHAPES_ONLY = False

class TritonProgram:
    """A graph with its fusion groups compiled to Triton kernels."""

    def __init__(self, graph: Graph, disable: Sequence[str] = (), label: str = "forward",
                 cache_writes: bool = False, decode: bool = False):
        """cache_writes: the graph's index_copy writes into its cache inputs may be done in
        place by the kernels computing the values (the static Decoder's step); decode: the
        graph is a Decoder's step (codegen.program.fuse)."""
        self.interpret = _interpret()
        self.label = label
        self.warmed = set()        # dims the warm pass ran for (codegen/warm.py)
        self.warm_failed = None    # why a warm pass stopped, once
        self.graph = fuse(graph, disable, cache_writes, decode)
        self.source = module_source(self.graph)
        self.program_source = wrapper.generate(self.graph, label)
        # kernels and wrapper live in one cached module: one hash covers both
        module = cache.load_module(self.source + "\n\n" + self.program_source)
        # template kinds (codegen/templates.py) have no generated kernel: None
        self.kernels = {n.attrs["kernel"]: getattr(module, n.attrs["kernel"], None)
                        for n in self.graph.nodes if n.op is Op.FUSED}
        self._run = module.run
        self.impl = {Op.FUSED: self._run_fused}   # for run_graph (the node-by-node path)
        # per fused op, the outputs some node reads (a GETITEM of it): the others are passed
        # as None, as the wrapper program passes them (a template op's output only a
        # backward needs, in a program with no backward: a Decoder's step)
        self._read = {}
        for n in self.graph.nodes:
            if n.op is Op.GETITEM and n.inputs[0].op is Op.FUSED:
                self._read.setdefault(n.inputs[0].attrs["kernel"], set()).add(n.attrs["index"])
        self._ref = {i: REFERENCE[n.op] for i, n in enumerate(self.graph.nodes)
                     if n.op is not Op.FUSED and n.op in REFERENCE}
        self._launch = {kind: self._launcher(kind) for kind in
                        {n.attrs["kind"] for n in self.graph.nodes if n.op is Op.FUSED}}
        self.launches = 0

    def _launcher(self, kind: str):
        launch = kind_module(kind).launch

        def go(kernel, xs, outs, node, ctx):
            self._go(launch, kernel, xs, outs, node.attrs, ctx)
        return go

    def _go(self, launch, kernel, xs, outs, attrs, ctx):
        """One launch, by the wrapper program or node by node (run_graph with `impl`)."""
        pass_ = warm.active()
        if self.interpret:  # numpy warns on lanes masked off (e.g. -inf - -inf): quiet
            # (a warm pass computes nothing: its bf16 meta tensors are only shapes)
            if not BF16_SHAPES_ONLY and pass_ is None and any(
                    t.dtype is torch.bfloat16 for t in list(xs) + list(outs)
                    if isinstance(t, torch.Tensor)):
                raise InterpreterBf16Error(f"kernel {attrs['kernel']}: Triton's interpreter "
                               "(no CUDA here) computes bf16 on bit patterns and would "
                               "return garbage; on CPU use f16 or f32 (lmc run "
                               "--precision), or a GPU")
            import numpy as np
            with np.errstate(all="ignore"):
                launch(kernel, xs, outs, attrs["body"], ctx, True)
        else:
            launch(kernel, xs, outs, attrs["body"], ctx, False)
        if pass_ is None:
            self.launches += 1

    def run(self, bound: Dict[str, torch.Tensor], ctx) -> Dict[str, torch.Tensor]:
        """Run the generated wrapper program: values for the graph's inputs and params by
        name -> its outputs by name."""
        missing = [n.attrs["name"] for n in self.graph.nodes
                   if n.op in (Op.INPUT, Op.PARAM) and n.attrs["name"] not in bound]
        if missing:
            raise LmcError(f"no value given for {missing[0]!r}")
        check_lengths(self.graph, ctx.dims)
        if warm.wanted(self, ctx):      # first run for these dims on a GPU: compile ahead
            with warm.WarmPass() as w:
                w.program(self, bound, ctx)
        return self.run_program(ctx, bound)

    def run_program(self, ctx, bound: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The wrapper program itself (no checks, no warm pass)."""
        return self._run(ctx, bound, self.kernels, self._launch, self._ref, self.graph.nodes)

    def _run_fused(self, ctx, xs, attrs):
        body = attrs["body"]
        inplace = attrs.get("inplace", {})   # output -> the input it is written into
        read = self._read.get(attrs["kernel"], ())
        outs = tuple(xs[inplace[i]] if i in inplace else
                     torch.empty(o.type.concrete(ctx.dims), dtype=o.type.dtype.torch(),
                                 device=ctx.device) if i in read else None
                     for i, o in enumerate(body.outputs.values()))
        self._go(kind_module(attrs["kind"]).launch, self.kernels[attrs["kernel"]], xs, outs,
                 attrs, ctx)
        return outs

