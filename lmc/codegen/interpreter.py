"""Triton's interpreter (kernels on CPU), spared a repeated patch at every helper call.

The interpreter runs a kernel by patching triton.language for the launch (its builtins become
NumPy implementations) and restoring it afterwards. It also patches again at every call of a
``@triton.jit`` helper from inside the kernel: ``inspect.getmembers`` over triton.language,
its tensor class and its math module, about 2 ms a call on the CI machine, while the launch's
patch is still in place, so the builtins are found patched already and the few attributes it
sets again get the values they have (and that second record is dropped, never restored).
lmc's kernels call helpers per tile and per key segment (the matmul tile helpers,
flash-decoding's ``_decode_keys``, the MoE kernels' expert loops): the repeats were about a
quarter of an interpreted decode step (examples/deepseek_moe tiny, five static steps, 16.4 s
-> 11.7 s, the same logits bit for bit).

`install` wraps the interpreter's ``_patch_lang``: when every triton.language module a helper
sees is patched already (a launch is running), it returns an empty patch scope; otherwise
Triton's own function runs.

It also turns off the interpreter's integer-overflow sanitizer while its ``debug`` option is
off (always, in Triton 3.6 to 3.9: nothing sets it). The sanitizer recomputes every integer
add, sub and mul in int64 and compares the result with the type's bounds, for a
``device_assert`` that returns at once without ``debug``: the check's result is thrown away,
and its casts, ops and comparisons were about a third of the interpreter's time on an
interpreted MoE model (examples/deepseek_moe tiny, `lmc verify`).

A Triton without these internals is left as it is. Only under TRITON_INTERPRET=1; GPU runs
never reach the interpreter.
"""
from __future__ import annotations

import dataclasses
import os

_INSTALLED = False
_triton_patch = None        # the interpreter's own _patch_lang, once wrapped


def install() -> bool:
    """Wrap the interpreter's per-call patch (once); whether the wrap is in place."""
    global _INSTALLED, _triton_patch
    if _INSTALLED:
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    patch = getattr(interp, "_patch_lang", None)
    scope = getattr(interp, "_LangPatchScope", None)
    is_builtin = getattr(tl.core, "is_builtin", None)
    if patch is None or scope is None or is_builtin is None or \
            not is_builtin(getattr(tl.core, "load", None)):
        return False            # not the internals this was written against

    def _patch_lang(fn):
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if langs and all(not is_builtin(getattr(v, "load", None)) for v in langs):
            return scope()      # patched by the running launch: nothing to add or restore
        return _triton_patch(fn)
    _triton_patch = patch
    interp._patch_lang = _patch_lang
    _drop_discarded_overflow_checks(interp)
    _INSTALLED = True
    return True


def _drop_discarded_overflow_checks(interp) -> bool:
    """Turn off the interpreter's overflow sanitizer when its asserts are no-ops (``debug``
    off); whether it was turned off."""
    builder = getattr(interp, "interpreter_builder", None)
    opts = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(opts) or getattr(opts, "debug", True) or \
            not getattr(opts, "sanitize_overflow", False):
        return False
    builder.options = dataclasses.replace(opts, sanitize_overflow=False)
    return True
