"""Kernel kinds backed by hand-written Triton templates rather than generated source.

A pattern pass (lmc/passes/fuse_rope_attention.py, ...) makes FUSED nodes whose body is the
matched primitives, with ``body.meta["module"]`` naming the codegen module that holds the
kernels (``lmc/codegen/<module>.py``), ``body.meta["template"]`` the entry and
``body.meta["options"]`` its options; the autodiff pass makes the matching ``*_bwd`` node (its
body keeps the meta, with ``template`` suffixed ``_bwd``). Nothing is generated for them
(`generate` returns no source); `launch` calls the module's

    launch_template(template, xs, outs, options)

which runs the kernels on the inputs ``xs`` (placeholder order; a backward op's cotangents
follow its inputs) and writes the preallocated outputs ``outs``.
"""
from __future__ import annotations

import importlib

from ..errors import LmcError

HELPERS = ""


def generate(body, name: str) -> str:
    return ""


def launch(kernel, xs, outs, body, ctx, interpret: bool) -> None:
    module, template = body.meta.get("module"), body.meta.get("template")
    if not module or not template:
        raise LmcError(f"internal: fused op {body.name!r} names no kernel template")
    mod = importlib.import_module(f"{__package__}.{module}")
    mod.launch_template(template, list(xs), list(outs), body.meta.get("options", {}))
