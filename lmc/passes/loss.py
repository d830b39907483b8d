"""Append the training loss to a model graph, in primitives.

`with_loss(g)` adds an int64 input ``targets`` shaped like the token input and an output
``loss``: mean next-token cross-entropy over positions whose target is >= 0 (a negative target
is ignored, e.g. padding). Written as logsumexp - gather so the autodiff pass differentiates it
like everything else, and fused/codegen'd later like everything else.
"""
from __future__ import annotations

from ..errors import LmcError
from ..frontend.builder import Builder, Tensor
from ..ir.graph import Graph


def with_loss(g: Graph, logits: str = "logits") -> Graph:
    if logits not in g.outputs:
        raise LmcError(f"model has no {logits!r} output to train on (outputs: "
                       f"{', '.join(g.outputs)})")
    if "loss" in g.outputs:
        return g
    lg = g.outputs[logits]
    ids = g.inputs[0]
    b = Builder({}, {})
    b.nodes = list(g.nodes)
    b.scope = "loss"
    x = Tensor(lg, b)
    targets = b.input("targets", ids.type.shape, "i64")
    valid = b.cast(targets >= 0, x.dtype)                          # [B, T]
    safe = b.maximum(targets, 0)
    vocab = x.shape[-1]
    xf = x if x.dtype.value == "f32" else b.cast(x, "f32")          # loss math in fp32
    lse = b.logsumexp(xf, -1, keepdim=False)                        # [B, T]
    picked = b.gather(xf, b.reshape(safe, list(safe.shape) + [1]), -1)
    nll = (lse - b.reshape(picked, list(safe.shape))) * valid
    count = b.maximum(b.sum(b.reshape(valid, [-1]), 0, keepdim=False), 1.0)
    loss = b.sum(b.reshape(nll, [-1]), 0, keepdim=False) / count
    outputs = dict(g.outputs)
    outputs["loss"] = loss.node
    out = g.with_nodes(b.nodes, outputs)
    out.meta["vocab"] = vocab
    return out
