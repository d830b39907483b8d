"""`fuse_matmul_prologues`: a pointwise kernel read only as a matmul operand is computed in
that matmul's operand loads.

yoco's retention output, normed and multiplied by its gate, is read only by the output
projection: the multiply is a kernel of its own that reads two [B, T, d] tensors and writes
one the projection reads back; computed in the projection's A loads it is gone (the decode
step launches 12 fewer kernels). medit_one's attention backward has a product read as A
by one matmul and as B of a weight gradient's vertical sum: 32 kernels fewer per training
step. The kernel reads the prologue's inputs tile by tile
through their strides and computes its ops in fp32 as the pointwise kernel would
(lmc/codegen/matmul.py, `_operand_code`).

Runs after the other fusion passes, on their FUSED nodes. Matched: a pointwise kernel P with
one output, every op of its body elementwise, reading at most MAX_FULL tensors of its
output's size (others broadcast: rows, columns, scalars), whose output is no graph output
and is read only by matmul kernels of the plain form (one accumulator or a gated pair; no
RMSNorm prologue) or the vertical form (products of different operands summed: one
product's A or B), not the horizontal or rope forms, each as its A operand or as one
product's B operand, directly or through one reshape or permute view (the view's
kernel-side effect is in the strides the launcher computes). Every reader takes P's body as
a prologue of that operand and P is removed; when any reader cannot take it, P stays and
the reason is recorded in ``meta["fusions"]``.

The cost of recomputing: an A prologue runs once per column tile of its matmul, a B
prologue once per row tile. Cheap ops (arithmetic, compares, selects, casts) cost less than
the memory round trip they replace; COSTLY ones (exp, log, div, ...) are taken only where
one tile spans that side. The loss backward's dlogits = softmax(logits) * dloss - onehot *
dloss, read by dX = dlogits @ W (768 columns) and dW = x^T @ dlogits, would save 3.3 GB a
step (llama, B=16, T=1024) but run its exp 3 to 12 times per element: it stays a kernel
until a GPU measurement says otherwise (the decline says so in --explain;
LMC_PROLOGUE_RECOMPUTE=1 lifts the rule to measure it).
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Tuple

from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from .patterns import Body

PASS = "fuse_matmul_prologues"
VIEWS = (Op.RESHAPE, Op.PERMUTE)
# ops a GPU runs on its special-function units or as several instructions: a pointwise kernel
# computes them once per element, a prologue once per element per tile of the matmul reading
# it (an A prologue per column tile, a B prologue per row tile); taken only where one tile
# spans the matmul's other side. The loss backward's exp is the case: dX = dlogits @ W has
# 768 columns, 3 to 12 column tiles, so its 0.8 G exps per step would run 2.5 to 10 G times.
COSTLY = {Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.SIGMOID, Op.TANH, Op.SILU, Op.GELU,
          Op.LOGSIGMOID, Op.SOFTPLUS, Op.ERF, Op.SIN, Op.COS, Op.DIV, Op.POW}
TILE = 64           # the tile width that count assumes (GPU_CONFIGS' tiles are 64 to 256
                    # wide, the split-K ones of a decode step 32 or 64 columns)
MAX_FULL = 2        # tensors of the operand's size a prologue may read (a kernel reads them
                    # and writes one, the matmul reads that one: two are no more traffic)


def _is_mm(n: Node) -> bool:
    return n.op is Op.FUSED and n.attrs.get("kind") == "matmul"


def _live(body: Graph) -> List[Node]:
    """The nodes computing a one-output body's output (no DCE runs inside a fused body: a
    node nothing reads may sit there), in body order."""
    from ..codegen.matmul import _cone

    cone = set(_cone(body.outputs["0"]))
    return [n for n in body.nodes if n in cone]


def _why_not_body(p: Node) -> Optional[str]:
    """Why the pointwise kernel p cannot be a prologue, from its body alone (or None)."""
    body = p.attrs["body"]
    if len(body.outputs) != 1:
        return "it stores several outputs"
    out = body.outputs["0"]
    ops = _live(body)
    odd = [n for n in ops if n.op.kind is not Kind.POINTWISE and n.op is not Op.IOTA]
    if odd:
        return f"its body holds {odd[0].op.value}, not elementwise"
    if out.type.dtype.value not in ("f32", "f16", "bf16"):
        return f"its output is {out.type.dtype.value}"
    full = [x for x in dict.fromkeys(x for n in ops for x in n.inputs)
            if x.op is Op.INPUT and x.type.shape == out.type.shape]
    if len(full) > MAX_FULL:
        return (f"it reads {len(full)} tensors of its output's size (each reader would read "
                f"them all instead of one)")
    return None


def _recomputed(p: Node, mm: Node, x: Node, role: str) -> Optional[str]:
    """Why p's costly ops should not run once per tile of mm, reading p's value as x (see
    COSTLY), or None. LMC_PROLOGUE_RECOMPUTE=1 takes them anyway: the setting that measures
    the rule (benchmarks/gpu_session.sh train:prologue, the loss backward's exp)."""
    costly = [n.op.value for n in _live(p.attrs["body"]) if n.op in COSTLY]
    if not costly or os.environ.get("LMC_PROLOGUE_RECOMPUTE", "0") == "1":
        return None
    out = next(n for n in mm.attrs["body"].nodes if n.op is Op.MATMUL).type.shape
    if role == "A":
        side, what, size = "column", "N", out[-1]
    else:       # the rows of every batch entry sharing one B (x broadcast over them)
        xb = list(x.type.shape[:-2])
        nb = len(out) - 2
        shared = [d for i, d in enumerate(out[:-2])
                  if i < nb - len(xb) or xb[i - (nb - len(xb))] == 1]
        dims = shared + [out[-2]]
        side, what = "row", "rows"
        size = math.prod(dims) if all(isinstance(d, int) for d in dims) else \
            " * ".join(map(str, dims))
    if isinstance(size, int) and size <= TILE:
        return None
    tiles = f"the {-(-size // TILE)} " if isinstance(size, int) else "the "
    return (f"its {costly[0]} would run again in each of {tiles}{side} tiles of "
            f"{mm.attrs['kernel']} ({what} = {size}); its kernel computes it once")


def _operand(mm: Node, x: Node) -> Tuple[Optional[str], Optional[str]]:
    """("A" or "B", None) when matmul kernel mm reads x only as its A operand or only as one
    product's B operand and can compute it in its loads; (None, why) otherwise."""
    from ..codegen.matmul import horizontal, operand_prologues, vertical_sum

    body = mm.attrs["body"]
    if horizontal(body) or body.meta.get("rope"):
        return None, "the horizontal form (several products, one launch)"
    places = [k for k, y in enumerate(mm.inputs) if y is x]
    if len(places) != 1:
        return None, "it reads the value twice"
    ph = [n for n in body.nodes if n.op is Op.INPUT][places[0]]
    mms = [n for n in body.nodes if n.op is Op.MATMUL]
    readers = [n for n in body.nodes if ph in n.inputs]
    if vertical_sum(body):      # products of different A summed: one product's A or B
        if len(readers) == 1 and readers[0].op is Op.MATMUL and \
                (readers[0].inputs[0] is ph) != (readers[0].inputs[1] is ph):
            return ("A" if readers[0].inputs[0] is ph else "B"), None
        return None, "the vertical form (products of different inputs summed) reads it " \
            "other than as one product's A or B"
    pa, pb = operand_prologues(body)
    if any(n in pa or any(n in c for c in pb.values()) for n in readers):
        return None, "its operand's prologue reads the value (a small input, computed once)"
    if any(n.op is not Op.MATMUL for n in readers):
        return None, "the epilogue reads the value too"
    if any(n.inputs[0] is ph and n.inputs[1] is ph for n in readers) or \
            len({n.inputs[0] is ph for n in readers}) > 1 or \
            (readers[0].inputs[1] is ph and len(readers) > 1):
        return None, "it is more than one operand of the kernel"
    if readers[0].inputs[0] is ph:
        # A: the matmuls' own A (an RMSNorm prologue is not combined with another)
        if pa or _rms(mms):
            return None, "its A is computed in the kernel already"
        return "A", None
    if _rms(mms):
        return None, "its A is an RMSNorm computed in the kernel"
    return "B", None


def _rms(mms: List[Node]) -> bool:
    """The body's A is an RMSNorm computed in the kernel (fuse_matmul's prologue)."""
    from ..codegen.matmul import _prologue

    return bool(mms) and mms[0].inputs[0].op is not Op.INPUT and _prologue(mms) is not None


def _readers(p: Node, users, outputs) -> Tuple[List[tuple], Optional[str]]:
    """[(matmul kernel, the value it reads, view or None)] of p's output, or a reason."""
    reads: List[tuple] = []
    for gi in users[p]:
        if gi.op is not Op.GETITEM or gi in outputs:
            return [], "its output is a graph output"
        for u in users[gi]:
            if _is_mm(u):
                reads.append((u, gi, None))
            elif u.op in VIEWS and u not in outputs and users[u] and \
                    all(_is_mm(w) for w in users[u]):
                reads += [(w, u, u) for w in dict.fromkeys(users[u])]
            elif u.op is Op.FUSED:
                return [], f"the {u.attrs['kind']} kernel {u.attrs['kernel']} reads it too"
            else:
                return [], f"{u.op.value} reads it too"
    if not reads:
        return [], "nothing reads it"
    if len({mm for mm, _, _ in reads}) != len(reads):
        return [], "a matmul kernel reads it twice"
    return reads, None


def _iotas(p: Node) -> List[Node]:
    """The iotas in p's body (fuse_pointwise takes one in: the loss backward's one-hot of the
    targets, iota(V) == target): a matmul's operand loads read placeholders, not an index
    along an axis a view may have moved, so its prologue reads each as an input."""
    return [n for n in p.attrs["body"].nodes if n.op is Op.IOTA]


def _with_prologue(mm: Node, p: Node, x: Node, view: Optional[Node],
                   extra: List[Node]) -> Node:
    """mm's kernel computing its operand x (p's output, through `view`) from p's inputs and
    `extra`, the graph's copies of p's iotas (read from placeholders after p's own)."""
    pbody, mbody = p.attrs["body"], mm.attrs["body"]
    k = list(mm.inputs).index(x)
    mph = [n for n in mbody.nodes if n.op is Op.INPUT]
    b = Body(mph[:k] + [n for n in pbody.nodes if n.op is Op.INPUT] + _iotas(p) + mph[k + 1:])
    b.copy(_live(pbody))
    val = b.env[pbody.outputs["0"]]
    if view is not None:
        val = b.add(Node(view.op, (val,), view.attrs, view.type, view.loc, view.scope))
    b.env[mph[k]] = val
    b.copy([n for n in mbody.nodes if n.op is not Op.INPUT])
    pops = re.sub(r"^lmc_fused_|_\d+$", "", p.attrs["kernel"])
    name = "lmc_mm_" + pops + "_" + re.sub(r"^lmc_mm_", "", mm.attrs["kernel"])
    nb = b.graph(name, list(mbody.outputs.values()), **mbody.meta)
    ins = list(mm.inputs[:k]) + list(p.inputs) + extra + list(mm.inputs[k + 1:])
    return Node.make(Op.FUSED, ins, {**mm.attrs, "kernel": name, "body": nb}, mm.loc,
                     mm.scope)


def _site(p: Node, users) -> bool:
    """A matmul kernel reads p's output, directly or through a view."""
    return any(_is_mm(u) or (u.op in VIEWS and any(_is_mm(w) for w in users[u]))
               for gi in users[p] for u in users[gi])


def _round(g: Graph, records: List[dict], seen: set) -> Optional[Graph]:
    """One round: the pointwise kernels whose readers all take them (a matmul taken by one
    kernel this round waits for the next for another operand); None when none."""
    users = g.users()
    outputs = set(g.outputs.values())
    plan: Dict[Node, List[tuple]] = {}
    claimed: Dict[Node, Node] = {}
    for p in g.nodes:
        if p.op is not Op.FUSED or p.attrs.get("kind") != "pointwise":
            continue
        why = _why_not_body(p)
        reads: List[tuple] = []
        if why is None:
            reads, why = _readers(p, users, outputs)
        if why is None:
            roles = []
            for mm, x, view in reads:
                role, why = _operand(mm, x)
                if why:
                    why = f"{mm.attrs['kernel']} cannot compute it: {why}"
                    break
                why = _recomputed(p, mm, x, role)
                if why:
                    break
                roles.append(role)
        if why is not None:
            name = p.attrs["kernel"]
            if name not in seen and _site(p, users) and \
                    why not in ("it stores several outputs", "its output is a graph output"):
                seen.add(name)
                records.append({"pass": PASS, "status": "declined",
                                "where": p.scope or "<model>",
                                "reason": f"{name} stays a kernel: {why}"})
            continue
        if any(mm in claimed for mm, _, _ in reads):
            continue
        for mm, _, _ in reads:
            claimed[mm] = p
        plan[p] = [(mm, x, view, role) for (mm, x, view), role in zip(reads, roles)]
    if not plan:
        return None
    new: Dict[Node, Node] = {}
    gone = set()
    repl: Dict[Node, Node] = {}
    sources: List[Node] = []            # iota nodes a prologue reads (`_iotas`)
    for p, reads in plan.items():
        gone.add(p)
        gone.update(gi for gi in users[p])
        gone.update(view for _, _, view, _ in reads if view is not None)
        extra = [Node.make(Op.IOTA, [], dict(n.attrs), n.loc, n.scope)   # one set for
                 for n in _iotas(p)]                                     # p's readers
        sources += extra
        for mm, x, view, role in reads:
            repl[mm] = _with_prologue(mm, p, x, view, extra)
        kernels = ", ".join(dict.fromkeys(mm.attrs["kernel"] for mm, _, _, _ in reads))
        sides = "/".join(dict.fromkeys(role for _, _, _, role in reads))
        records.append({"pass": PASS, "status": "fused", "where": p.scope or "<model>",
                        "reason": f"{p.attrs['kernel']} computed in the {sides} operand "
                                  f"loads of {kernels}, its kernel removed"})
    nodes: List[Node] = list(sources)
    for n in g.nodes:
        if n in gone:
            continue
        new[n] = c = repl.get(n, n).remapped(new)
        nodes.append(c)
    return g.with_nodes(nodes, {k: new.get(v, v) for k, v in g.outputs.items()})


def fuse_matmul_prologues(g: Graph) -> Graph:
    records: List[dict] = []
    seen: set = set()
    out = g
    while True:
        nxt = _round(out, records, seen)
        if nxt is None:
            break
        out = nxt
    if out is g:
        out = g.with_nodes(list(g.nodes), dict(g.outputs))
    out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
    return out
