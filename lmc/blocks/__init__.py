"""The block library API: define a block in Python, use it from YAML by name.

    import lmc

    @lmc.block
    def geglu(b, x, *, d, ff):
        w1 = b.param("w1", [d, ff])
        wg = b.param("wg", [d, ff])
        w2 = b.param("w2", [ff, d])
        return (b.gelu(x @ wg) * (x @ w1)) @ w2

Positional parameters after the builder are tensor arguments; keyword-only parameters are
static options. An option not passed at the call site takes its Python default; one with no
default (like `d` and `ff` above) is taken from the model's config by the same name.
The function runs once per call site, building IR with the same builder the YAML frontend
uses, so the block inlines to primitives and nothing downstream knows it was a block.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional

from ..errors import LmcError, Loc
from ..frontend.builder import BlockDef
from ..frontend.model import BUILTIN_NAMES

REGISTRY: Dict[str, BlockDef] = {}


def block(fn: Optional[Callable] = None, *, name: Optional[str] = None):
    """Register `fn(b, *tensors, **options)` as a block (usable as @block or @block(name=))."""
    def register(f: Callable) -> Callable:
        if not callable(f) or inspect.isbuiltin(f) or inspect.isclass(f):
            raise LmcError(f"lmc.block takes a function (def or lambda), got {f!r}")
        if name is None and not isinstance(getattr(f, "__name__", None), str):
            raise LmcError(f"lmc.block: {f!r} has no __name__: give one, "
                           "lmc.block(name='...')(f)")
        try:
            sig = inspect.signature(f)
        except (TypeError, ValueError):
            raise LmcError(f"lmc.block: cannot read the parameters of {f!r} (a builtin?): "
                           "define the block with def") from None
        params = list(sig.parameters.values())
        if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD):
            raise LmcError(f"block {f.__name__}: the first parameter must be the builder")
        args, options, required = [], {}, []
        for p in params[1:]:
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                          inspect.Parameter.POSITIONAL_OR_KEYWORD):
                args.append(p.name)
            elif p.kind is inspect.Parameter.KEYWORD_ONLY:
                if p.default is inspect.Parameter.empty:
                    required.append(p.name)
                else:
                    options[p.name] = p.default
            else:
                raise LmcError(f"block {f.__name__}: *args/**kwargs are not supported")
        bname = name or f.__name__
        code = getattr(f, "__code__", None)
        where = Loc(code.co_filename, code.co_firstlineno, 1) if code is not None else None
        if not isinstance(bname, str) or not bname.isidentifier():
            raise LmcError(f"block name {bname!r} must be an identifier", where)
        if bname in BUILTIN_NAMES:
            raise LmcError(f"block name {bname!r} shadows a built-in function", where)
        bdef = BlockDef(bname, f, args, options, None, required)
        REGISTRY[bname] = bdef
        f.lmc_block = bdef
        return f

    return register(fn) if fn is not None else register


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)
