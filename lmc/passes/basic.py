"""Graph-cleaning passes: inline, constant folding, CSE, DCE.

Each is Graph -> Graph and leaves the input graph untouched. They share `rebuild`, which
walks nodes in order and lets a callback replace each (already input-remapped) node.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ..errors import LmcError
from ..ir.dims import Dim
from ..ir.graph import Graph, Node, toposort
from ..ir.ops import Kind, Op

FOLD_MAX_ELEMENTS = 1 << 16


def rebuild(g: Graph, fn: Callable[[Node], Optional[Node]]) -> Graph:
    """Copy `g`, remapping inputs; `fn(node)` may return a replacement (or None to keep)."""
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    for n in g.nodes:
        ins = tuple(new[i] for i in n.inputs)
        cur = n if ins == n.inputs else _copy(n, ins)
        rep = fn(cur)
        if rep is not None and rep is not cur:
            cur = rep
            if rep not in nodes:
                nodes.append(rep)
        else:
            nodes.append(cur)
        new[n] = cur
    return g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()})


def _copy(n: Node, inputs) -> Node:
    # Types only depend on input types, which replacement never changes; the verify pass
    # re-infers every type to catch a pass that breaks this.
    return Node(n.op, inputs, n.attrs, n.type, n.loc, n.scope)


# -- inline ------------------------------------------------------------------------------------
def inline(g: Graph) -> Graph:
    """Splice every BLOCK node's body into its parent; GETITEMs become the body outputs.

    A block may declare a model input of its own (`b.input` in a Python block: a mask every
    layer reads): the instances of one name become one input, so a block called in a loop
    declares it once; the same name with another type is an error at the second."""
    return _merge_inputs(_inline(g))


def _merge_inputs(g: Graph) -> Graph:
    first: Dict[str, Node] = {}
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    for n in g.nodes:
        if n.op is Op.INPUT:
            seen = first.setdefault(n.attrs["name"], n)
            if seen is not n:
                if seen.type != n.type:
                    at = f" ({seen.loc})" if seen.loc is not None else ""
                    raise LmcError(f"input {n.attrs['name']!r} is declared twice with "
                                   f"different types: {seen.type}{at} and {n.type}", n.loc)
                new[n] = seen
                continue
        ins = tuple(new.get(i, i) for i in n.inputs)
        c = n if ins == n.inputs else _copy(n, ins)
        new[n] = c
        nodes.append(c)
    if not any(c is not n for n, c in new.items()):
        return g
    return g.with_nodes(nodes, {k: new.get(v, v) for k, v in g.outputs.items()})


def _inline(g: Graph) -> Graph:
    nodes: List[Node] = []
    new: Dict[Node, object] = {}
    for n in g.nodes:
        ins = tuple(new[i] for i in n.inputs)
        if n.op is Op.BLOCK:
            body = _inline(n.attrs["body"])
            sub: Dict[Node, Node] = {}
            placeholders = [m for m in body.nodes if m.op is Op.INPUT]
            for ph, actual in zip(placeholders, ins):
                sub[ph] = actual
            for m in body.nodes:
                if m in sub:
                    continue
                m_ins = tuple(sub[i] for i in m.inputs)
                c = m if m_ins == m.inputs else _copy(m, m_ins)
                sub[m] = c
                nodes.append(c)
            new[n] = tuple(sub[o] for o in body.outputs.values())
        elif n.op is Op.GETITEM and n.inputs[0].op is Op.BLOCK:
            new[n] = ins[0][n.attrs["index"]]
        else:
            c = n if ins == n.inputs else _copy(n, ins)
            new[n] = c
            nodes.append(c)
    return g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()})


# -- constant folding ----------------------------------------------------------------------------
_NO_FOLD = {Op.INPUT, Op.PARAM, Op.CONST, Op.DROPOUT, Op.BLOCK, Op.GETITEM,
            Op.CAUSAL_MASK}  # masks stay visible as masks for the attention patterns


def first_rows(n: Node, g: Graph) -> Optional[int]:
    """N when n = slice(X, a, 0, T) takes the first T of X's N rows along a, T symbolic and N
    at least the model's max_seq (the runtime refuses T > max_seq, so T <= N wherever the
    graph runs); else None."""
    if n.op is not Op.SLICE or isinstance(n.attrs.get("stop"), int) or \
            n.attrs.get("stop") is None or n.attrs.get("start", 0) != 0 or \
            n.attrs.get("step", 1) != 1:
        return None
    N = n.inputs[0].type.shape[n.attrs["axis"]]
    max_seq = (g.meta.get("config") or {}).get("max_seq")
    if not isinstance(N, int) or not isinstance(max_seq, int) or N < max_seq:
        return None
    return N


def fold_constants(g: Graph) -> Graph:
    """Evaluate nodes whose inputs are all constants (and whose shape is concrete and small)
    with the reference implementation, replacing them by CONST nodes; dropout with p = 0
    and gaussian_noise with std = 0 become their input. The positions iota(N) of a table
    sliced to its first T rows (`first_rows`: RoPE tables precomputed for max_seq, sliced as
    Meta's freqs_cis[:T]) stay unfolded, for canonicalize to make the table one over
    iota(T) (where it cannot push the slice down, the table is computed each run)."""
    from ..ops.reference import REFERENCE, RefCtx

    ctx = RefCtx()
    static_iotas: Dict[Node, set] = {}     # node -> the iota nodes it is computed from
    keep = set()
    for n in g.nodes:
        if n.op is Op.IOTA:
            static_iotas[n] = {n}
        elif n.inputs and all(i in static_iotas or i.op is Op.CONST for i in n.inputs):
            static_iotas[n] = set().union(*(static_iotas.get(i, set()) for i in n.inputs))
        N = first_rows(n, g) if n.op is Op.SLICE and n.inputs[0] in static_iotas else None
        if N is not None:          # the positions (an iota over the N rows), not the others
            keep |= {i for i in static_iotas[n.inputs[0]] if i.type.shape[0] == N}

    def fold(n: Node):
        if n in keep:
            return None
        # dropout with p = 0 and noise with std = 0 are the identity in every mode (GPT-2's
        # configs turn dropout off so): no kernel, no random draw
        if (n.op is Op.DROPOUT and n.attrs["p"] == 0) or (
                n.op is Op.GAUSSIAN_NOISE and isinstance(n.attrs["std"], (int, float))
                and n.attrs["std"] == 0):
            return n.inputs[0]
        # random ops depend on the mode (training or not), which folding cannot know
        if n.op in _NO_FOLD or n.op.kind in (Kind.STRUCTURAL, Kind.RANDOM):
            return None
        # (a constant holding a symbolic size, const(T), is known only when the graph runs)
        if not all(i.op is Op.CONST and not isinstance(i.attrs["value"], Dim)
                   for i in n.inputs):
            return None
        if not n.type.is_static() or n.type.numel() > FOLD_MAX_ELEMENTS:
            return None
        if n.op is Op.IOTA and n.type.numel() > 4096:
            return None
        vals = [REFERENCE[Op.CONST](ctx, [], i.attrs) for i in n.inputs]
        out = REFERENCE[n.op](ctx, vals, n.attrs)
        value = out.item() if out.dim() == 0 else out.detach().clone()
        return Node(Op.CONST, (), {"value": value, "dtype": n.type.dtype}, n.type, n.loc,
                    n.scope)

    return rebuild(g, fold)


# -- common subexpression elimination ------------------------------------------------------
def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if hasattr(v, "numpy") and hasattr(v, "shape"):  # a folded tensor constant
        t = v.detach().cpu()
        if t.dtype == torch.bfloat16:      # numpy has none; widening to fp32 is exact
            t = t.float()
        return ("tensor", tuple(v.shape), str(v.dtype), t.numpy().tobytes())
    if isinstance(v, float) and v != v:
        return ("nan",)
    return v


def cse(g: Graph) -> Graph:
    """Merge nodes with the same op, inputs and attrs (params and inputs are never merged)."""
    seen: Dict[tuple, Node] = {}

    def merge(n: Node):
        if n.op in (Op.INPUT, Op.PARAM, Op.BLOCK, Op.FUSED):
            return None
        key = (n.op, tuple(id(i) for i in n.inputs),
               tuple(sorted((k, _freeze(v)) for k, v in n.attrs.items())))
        try:
            hit = seen.get(key)
        except TypeError:  # an unhashable attr: leave the node alone
            return None
        if hit is not None:
            return hit
        seen[key] = n
        return None

    return rebuild(g, merge)


# -- dead code elimination ------------------------------------------------------------------------
def dce(g: Graph) -> Graph:
    """Drop nodes no output depends on. Inputs and params are the model's interface and stay."""
    keep = [n for n in g.nodes if n.op in (Op.INPUT, Op.PARAM)]
    return g.with_nodes(toposort(g.outputs.values(), keep), g.outputs)
