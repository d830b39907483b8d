"""`fuse_matmul_reductions`: a reduction along a matmul output's rows, in the matmul's kernel.

Cross-entropy's logsumexp over the vocabulary reads the logits the head's matmul has just
stored: at B*T = 16,384 rows and a 50k vocabulary that is 1.6 GB read back in bf16 (6.6 GB
for minimax's 200k), by a kernel that does nothing else. Here the reduction joins the
matmul's epilogue: each output tile reduces its columns of the (rounded, widened) product to
one partial per row and stores it in an fp32 workspace [rows, column tiles]; the last of a
row tile's programs to finish (a per-row-tile counter, atomic, reset by that program) folds
the partials in column order, so the result does not depend on which finishes last, and
stores the reduction (`lmc/codegen/matmul.py`, `_row_reduction_code`). The logits are still
stored when anything else reads them (the loss's gather, the backward); when nothing does,
the matmul stores the reduction alone.

Runs after the fusion passes, on their FUSED nodes. Matched: a reduction kernel whose body
is one placeholder, an optional widening cast and one sum, mean, amax or logsumexp along the
last axis, storing only that reduction, where the placeholder is a whole output of a plain
matmul kernel (one accumulator or a gated pair, not the horizontal, vertical or rope forms)
with a static number of columns. Each merge is recorded in ``meta["fusions"]``; a candidate
that does not qualify is recorded with the reason.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ..frontend.builder import Builder
from ..ir.graph import Graph, Node
from ..ir.ops import Op

PASS = "fuse_matmul_reductions"
ROW_OPS = (Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP)


def row_reduction(body: Graph) -> Optional[Node]:
    """The reduction a matmul body computes along its output's rows (this pass's merge): an
    output reducing a value of the product's shape (an RMSNorm prologue's mean reduces A),
    or None."""
    mm = next((n for n in body.nodes if n.op is Op.MATMUL), None)
    outs = set(body.outputs.values())
    reds = [n for n in body.nodes if n.op in ROW_OPS and n in outs and mm is not None
            and n.inputs[0].type.shape == mm.type.shape]
    return reds[0] if reds else None


def _candidate(r: Node) -> Optional[Node]:
    """The reduction node of kernel `r` when its body is [x, cast?, reduction along x's last
    axis] storing only the reduction, else None."""
    body = r.attrs["body"]
    ops = [n for n in body.nodes if n.op not in (Op.INPUT, Op.CONST)]
    if len(r.inputs) != 1 or not ops or ops[-1].op not in ROW_OPS or \
            list(body.outputs.values()) != [ops[-1]]:
        return None
    red = ops[-1]
    x = red.inputs[0]
    if x.type.rank < 1 or red.attrs["axis"] not in (-1, x.type.rank - 1):
        return None
    if len(ops) == 2:
        c = ops[0]
        if c.op is not Op.CAST or x is not c or \
                c.type.dtype.itemsize < c.inputs[0].type.dtype.itemsize:
            return None
    elif len(ops) != 1:
        return None
    return red


def _why_not(mm: Node, x: Node) -> Optional[str]:
    from ..codegen.matmul import horizontal, vertical_sum

    body = mm.attrs["body"]
    if horizontal(body) or body.meta.get("rope"):
        return "the matmul kernel is the horizontal form (several products, one launch)"
    if vertical_sum(body):
        return "the matmul kernel sums products of different inputs (vertical form)"
    if row_reduction(body) is not None:
        return "the matmul kernel already computes a reduction"
    if not isinstance(x.type.shape[-1], int):
        return "the reduced axis has a symbolic size"
    if x.type.shape != next(n for n in body.nodes if n.op is Op.MATMUL).type.shape:
        return "the reduction reads a broadcast or reshaped view of the product"
    return None


def fuse_matmul_reductions(g: Graph) -> Graph:
    users = g.users()
    outputs = set(g.outputs.values())
    merges: Dict[Node, tuple] = {}        # matmul kernel -> (reduction kernel, index read)
    records: List[dict] = []
    for r in g.nodes:
        if r.op is not Op.FUSED or r.attrs.get("kind") != "reduction":
            continue
        red = _candidate(r)
        x = r.inputs[0]
        if red is None or x.op is not Op.GETITEM or x.inputs[0].op is not Op.FUSED or \
                x.inputs[0].attrs.get("kind") != "matmul":
            continue
        mm = x.inputs[0]
        why = _why_not(mm, x) or ("the matmul kernel already takes another reduction"
                                  if mm in merges else None)
        where = r.scope or "<model>"
        if why:
            records.append({"pass": PASS, "status": "declined", "where": where,
                            "reason": f"{red.op.value} of {mm.attrs['kernel']}'s output: "
                                      f"{why}"})
            continue
        merges[mm] = (r, x.attrs["index"])
        records.append({"pass": PASS, "status": "fused", "where": where,
                        "reason": f"{red.op.value} along the rows of {mm.attrs['kernel']}'s "
                                  f"output in its epilogue, {r.attrs['kernel']} removed"})
    out = _rewrite(g, merges, users, outputs) if merges else \
        g.with_nodes(list(g.nodes), dict(g.outputs))
    out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
    return out


def _merged(mm: Node, r: Node, j: int, keep_j: bool):
    """(the matmul kernel computing r's reduction of its output j, {old output index of mm:
    new index}, the reduction's index). Output j stays only when `keep_j`."""
    mbody, rbody = mm.attrs["body"], r.attrs["body"]
    b = Builder({}, {})
    b.nodes.extend(mbody.nodes)
    env = {next(n for n in rbody.nodes if n.op is Op.INPUT): mbody.outputs[str(j)]}
    for n in rbody.nodes:
        if n.op is not Op.INPUT:
            env[n] = Node(n.op, tuple(env[i] for i in n.inputs), n.attrs, n.type, n.loc,
                          n.scope)
            b.nodes.append(env[n])
    outs: Dict[str, Node] = {}
    where: Dict[int, int] = {}
    for k, o in mbody.outputs.items():
        if int(k) != j or keep_j:
            where[int(k)] = len(outs)
            outs[str(len(outs))] = o
    red_at = len(outs)
    outs[str(red_at)] = env[rbody.outputs["0"]]
    name = f"{mm.attrs['kernel']}_{env[rbody.outputs['0']].op.value}"
    nb = Graph(name, b.nodes, outs)
    nb.meta.update(mbody.meta)
    fused = Node.make(Op.FUSED, list(mm.inputs), {**mm.attrs, "kernel": name, "body": nb},
                      mm.loc, mm.scope)
    return fused, where, red_at


def _rewrite(g: Graph, merges, users, outputs) -> Graph:
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    gone = {r for r, _ in merges.values()}
    for n in g.nodes:
        if n in gone or (n.op is Op.GETITEM and (n.inputs[0] in gone
                                                 or n.inputs[0] in merges)):
            continue                          # its outputs are re-made with the merged kernel
        if n in merges:
            r, j = merges[n]
            read = [gi for gi in users[n] if gi is not None and gi.op is Op.GETITEM
                    and gi.attrs["index"] == j]
            keep_j = any(u is not r for gi in read for u in users[gi]) or \
                any(gi in outputs for gi in read)
            fused, where, red_at = _merged(n, r, j, keep_j)
            fused = Node.make(Op.FUSED, [new.get(x, x) for x in fused.inputs], fused.attrs,
                              fused.loc, fused.scope)
            nodes.append(fused)
            for gi in users[n]:
                if gi is not None and gi.op is Op.GETITEM and gi.attrs["index"] in where:
                    new[gi] = Node.make(Op.GETITEM, [fused],
                                        {"index": where[gi.attrs["index"]]}, gi.loc, gi.scope)
                    nodes.append(new[gi])
            for gi in users[r]:
                if gi is not None and gi.op is Op.GETITEM:
                    new[gi] = Node.make(Op.GETITEM, [fused], {"index": red_at}, gi.loc,
                                        gi.scope)
                    nodes.append(new[gi])
            continue
        new[n] = n.remapped(new)
        nodes.append(new[n])
    return g.with_nodes(nodes, {k: new.get(v, v) for k, v in g.outputs.items()})
