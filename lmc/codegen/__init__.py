"""Triton code generation: one module per kernel kind.

A fusion pass (lmc/passes/fuse_*.py) turns a group of IR nodes into one FUSED node with
attrs ``kernel`` (its name), ``kind`` and ``body`` (a small graph: INPUT placeholders for the
group's external inputs, the member ops, literal CONSTs; outputs "0".."k-1"). Each kind's
module provides

    generate(body, name) -> str
        the Triton source of the kernel(s) (``@triton.jit`` functions; helpers are shared)
    launch(kernel, xs, outs, body, ctx, interpret) -> None
        run it: ``xs`` are the external inputs in placeholder order, ``outs`` preallocated
        contiguous tensors for the body's outputs, ``ctx`` the RefCtx (symbolic dims)

and `KINDS` maps the ``kind`` attr to that module.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

# generated kinds; every other kind is a hand-written template put in the graph by a pattern
# pass (codegen/templates.py dispatches it by its body's meta)
_MODULES = {"pointwise": "pointwise", "reduction": "reduction", "matmul": "matmul"}


def interpreter_blocks() -> bool:
    """Block sizes and launch options for Triton's interpreter (few, large programs: it pays
    per program and per loop trip) rather than a GPU's. True under TRITON_INTERPRET=1 unless
    LMC_GPU_BLOCKS=1, with which benchmarks/compile_check.py records, in the interpreter, the
    launches a GPU would make so that it can compile them for one. Autotuned kernels are not
    affected (the script compiles each of their GPU configurations)."""
    return (os.environ.get("TRITON_INTERPRET") == "1"
            and os.environ.get("LMC_GPU_BLOCKS") != "1")


def kind_module(kind: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{_MODULES.get(kind, 'templates')}")
