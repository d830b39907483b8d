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
import os
import sys
import warnings
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
        code = getattr(f, "__code__", None)
        where = Loc(code.co_filename, code.co_firstlineno, 1) if code is not None else None
        try:
            sig = inspect.signature(f)
        except (TypeError, ValueError):
            raise LmcError(f"lmc.block: cannot read the parameters of {f!r} (a builtin?): "
                           "define the block with def") from None
        params = list(sig.parameters.values())
        if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD):
            raise LmcError(f"block {f.__name__}: the first parameter must be the builder",
                           where)
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
                raise LmcError(f"block {f.__name__}: *args/**kwargs are not supported", where)
        bname = name or f.__name__
        if not isinstance(bname, str) or not bname.isidentifier():
            raise LmcError(f"block name {bname!r} must be an identifier", where)
        if bname in BUILTIN_NAMES:
            raise LmcError(f"block name {bname!r} shadows a built-in function", where)
        bdef = BlockDef(bname, f, args, options, None, required)
        _warn_if_redefined(REGISTRY.get(bname), where)
        REGISTRY[bname] = bdef
        f.lmc_block = bdef
        return f

    return register(fn) if fn is not None else register


def _where(bdef: BlockDef) -> Optional[Loc]:
    code = getattr(bdef.fn, "__code__", None)
    return Loc(code.co_filename, code.co_firstlineno, 1) if code is not None else None


def _warn_if_redefined(old: Optional[BlockDef], where: Optional[Loc]) -> None:
    """A second definition of a name replaces the first. Running the same definition again
    (a module reloaded, a notebook cell re-run) is quiet; one from elsewhere is worth a word,
    since two libraries may both call their block ``geglu``."""
    if old is None:
        return
    was = _where(old)
    if was is not None and where is not None and (was.file, was.line) == (where.file,
                                                                           where.line):
        return
    at = f" at {was.file}:{was.line}" if was is not None else ""
    # reported at the user's @lmc.block line, however many of our frames are between
    here = os.path.dirname(__file__) + os.sep
    level, f = 1, sys._getframe(0)
    while f is not None and f.f_code.co_filename.startswith(here):
        level, f = level + 1, f.f_back
    warnings.warn(f"block {old.name!r} redefined (the definition{at} is replaced; "
                  f"lmc.block(name=...) gives a block another name)", stacklevel=level)


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)
