"""The torch backend: run a Graph node by node with the reference implementations.

This is also the oracle's engine: an unfused primitive graph run here, differentiated by
torch autograd, is what every other stage is compared against.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch

from ..errors import LmcError
from ..ir.dims import Dim
from ..ir.graph import Graph, Node
from ..ir.ops import Op
from ..ops.reference import REFERENCE, RefCtx
from ..ops.shapes import shape_str


def bind_dims(g: Graph, bound: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """Solve the symbolic dims (B, T) from the actual shapes of the graph's inputs."""
    env: Dict[str, int] = {}
    for n in g.inputs:
        name = n.attrs["name"]
        if name not in bound:
            continue
        t = bound[name]
        if not isinstance(t, torch.Tensor):
            raise LmcError(f"input {name!r} must be a torch tensor, got {type(t).__name__}")
        if not n.type.dtype.is_float and (t.dtype.is_floating_point or t.dtype.is_complex):
            raise LmcError(f"input {name!r} holds {n.type.dtype.value} values, got "
                           f"a {str(t.dtype).replace('torch.', '')} tensor")
        if t.dim() != n.type.rank:
            raise LmcError(f"input {name!r} must have shape {shape_str(n.type.shape)}, got a "
                           f"rank-{t.dim()} tensor {list(t.shape)}")
        for d, actual in zip(n.type.shape, t.shape):
            if isinstance(d, Dim) and len(d.terms) == 1:
                (mono, coef), = d.terms.items()
                if len(mono) == 1 and coef == 1:
                    sym = mono[0]
                    if env.setdefault(sym, actual) != actual:
                        raise LmcError(f"input {name!r}: dimension {sym} is {actual} here but "
                                       f"{env[sym]} elsewhere")
    for n in g.inputs:
        name = n.attrs["name"]
        if name in bound:
            want = [d.evaluate(env) if isinstance(d, Dim) else d for d in n.type.shape]
            if list(bound[name].shape) != want:
                raise LmcError(f"input {name!r} must have shape {shape_str(n.type.shape)} = "
                               f"{want}, got {list(bound[name].shape)}")
    return env


def _last_uses(g: Graph) -> List[List[Node]]:
    """For each position, the nodes whose value is not needed after it (to free early)."""
    last: Dict[Node, int] = {}
    for i, n in enumerate(g.nodes):
        for x in n.inputs:
            last[x] = i
    outs = set(g.outputs.values())
    free: List[List[Node]] = [[] for _ in g.nodes]
    for x, i in last.items():
        if x not in outs:
            free[i].append(x)
    return free


def _lengths(g: Graph) -> List[tuple]:
    """Each distinct symbolic length of g's values (and slice bounds) that can be negative,
    with the first node that has it: (Dim, Node)."""
    seen: Dict[Dim, Node] = {}
    stack = [g]
    while stack:
        for n in stack.pop().nodes:
            if isinstance(n.attrs.get("body"), Graph):      # a fused group's, a scan's
                stack.append(n.attrs["body"])
            _note_lengths(n, seen)
    return list(seen.items())


def _note_lengths(n: Node, seen: Dict[Dim, Node]) -> None:
    types = n.type if isinstance(n.type, tuple) else (n.type,)
    ds = [d for t in types for d in getattr(t, "shape", ())]
    if n.op is Op.SLICE:
        ds += [n.attrs["start"], n.attrs["stop"]]
    for d in ds:
        if isinstance(d, Dim) and any(c < 0 for c in d.terms.values()):
            seen.setdefault(d, n)      # (all-positive terms are never negative)


def check_lengths(g: Graph, dims: Mapping[str, int]) -> None:
    """Refuse sizes at which a value of g would have a negative length: a causal shift
    written concat([pad, x[:, :T - s]], 1) (or a convolution's padded windows, which
    canonicalize rewrites so) has no meaning for T < s, where torch would count the slice
    from the end and return a wrong-sized result. Checked once per distinct dims."""
    key = tuple(sorted(dims.items()))
    cached = g.meta.get("_lengths")
    # keyed on the node list itself: a graph built from this one copies its meta
    if cached is None or cached[0] is not g.nodes or cached[1] != len(g.nodes):
        cached = g.meta["_lengths"] = (g.nodes, len(g.nodes), _lengths(g), set())
    cached = cached[1:]
    if not cached[1] or key in cached[2]:
        return
    bad = [(d, n) for d, n in cached[1]
           if d.symbols() <= dims.keys() and d.evaluate(dims) < 0]
    if bad:
        d, n = bad[0]
        at = ", ".join(f"{k}={v}" for k, v in sorted(dims.items()) if k in d.symbols())
        need = [next((t for t in range(dims["T"], 1 << 16) if e.evaluate({"T": t}) >= 0), 0)
                for e, _ in cached[1] if e.symbols() == {"T"}] if d.symbols() == {"T"} else []
        need = f": this model needs T >= {max(need)}" if need and max(need) else ""
        raise LmcError(f"{n.op.value} has a length {d} = {d.evaluate(dims)} at {at}{need} "
                       "(a causal shift x[:, :T - s], or a window xp[:, j:T + j] of a "
                       "sequence padded by s, is defined for T >= s)", n.loc)
    if len(cached[2]) > 4096:       # a decode step's P is new every step
        cached[2].clear()
    cached[2].add(key)


def run_graph(g: Graph, bound: Mapping[str, torch.Tensor], ctx: RefCtx,
              impl: Mapping[Op, object] = None) -> Dict[str, torch.Tensor]:
    """Evaluate `g` with `bound` values for its inputs and params (by name). `impl` overrides
    the reference for some ops (the triton backend runs FUSED nodes as kernels)."""
    table = REFERENCE if not impl else {**REFERENCE, **impl}
    # the plan depends on the node list and the outputs; meta is copied between graphs that
    # share nodes (e.g. forward' adds outputs), so the cache is keyed on both
    key = (len(g.nodes), tuple(id(o) for o in g.outputs.values()))
    cached = g.meta.get("_free")
    if cached is None or cached[0] != key:
        cached = g.meta["_free"] = (key, _last_uses(g))
    free = cached[1]
    check_lengths(g, ctx.dims)
    env: Dict[Node, torch.Tensor] = {}
    for idx, n in enumerate(g.nodes):
        if n.op is Op.INPUT or n.op is Op.PARAM:
            try:
                env[n] = bound[n.attrs["name"]]
            except KeyError:
                raise LmcError(f"no value given for {n.op.value} {n.attrs['name']!r}") from None
        else:
            env[n] = table[n.op](ctx, [env[i] for i in n.inputs], n.attrs)
        for x in free[idx]:
            env.pop(x, None)
    return {k: env[v] for k, v in g.outputs.items()}
