"""The pass pipeline: one flat, commented list of Graph -> Graph functions.

`run_pipeline` times each pass, records node counts in ``graph.meta["history"]``, verifies the
result, and with ``LMC_DEBUG=1`` prints the IR after every pass to stderr. Fusion passes
(later) append ``{"pass", "status", "where", "reason"}`` records to ``graph.meta["fusions"]``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

from ..ir.graph import Graph
from .basic import cse, dce, fold_constants, inline
from .canonical import canonicalize
from .verify import verify

Pass = Tuple[str, Callable[[Graph], Graph]]

PIPELINE: List[Pass] = [
    ("inline", inline),                 # splice block bodies: only primitives from here on
    ("fold_constants", fold_constants),  # evaluate constant subgraphs (rope frequencies, ...)
    ("canonicalize", canonicalize),     # one spelling of what is written several ways (sinks)
    ("cse", cse),                       # merge duplicate computations (shared tables, masks)
    ("dce", dce),                       # drop what no output needs
]


def debugging() -> bool:
    """LMC_DEBUG set (to anything but 0): tracebacks on errors, the IR after every pass."""
    return os.environ.get("LMC_DEBUG", "") not in ("", "0")


def debug_dump(g: Graph, what: str) -> None:
    """The IR of `g` on stderr, headed by its name and `what` happened (LMC_DEBUG)."""
    print(f"// ---- {g.name}: {what}", file=sys.stderr)
    print(g, file=sys.stderr)


def run_pipeline(g: Graph, passes: Optional[Sequence[Pass]] = None,
                 disable: Sequence[str] = ()) -> Graph:
    passes = PIPELINE if passes is None else passes
    unknown = set(disable) - {name for name, _ in passes}
    if unknown:
        from ..codegen.program import fusion_names
        from ..errors import UsageError  # a flag's value: not a line of the model file
        raise UsageError(f"unknown pass {sorted(unknown)[0]!r} (passes: "
                       f"{', '.join([n for n, _ in passes] + fusion_names())})")
    if "inline" in disable and any(name == "inline" for name, _ in passes):
        from ..errors import UsageError
        raise UsageError("--disable inline: inlining is not optional (every pass after it, "
                       "autodiff and codegen take primitives only)")
    debug = debugging()
    history = list(g.meta.get("history", []))
    inlined = False
    for name, fn in passes:
        if name in disable:
            continue
        before = len(g)
        t0 = time.perf_counter()
        g = fn(g)
        inlined = inlined or name == "inline"
        verify(g, inlined=inlined)
        history.append({"pass": name, "nodes_before": before, "nodes_after": len(g),
                        "seconds": time.perf_counter() - t0})
        if debug:
            debug_dump(g, f"after {name} ({before} -> {len(g)} nodes)")
    g.meta["history"] = history
    g.meta.setdefault("fusions", [])
    return g
