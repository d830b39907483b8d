"""Append the training loss to a model graph, in primitives.

`with_loss(g)` adds an int64 input ``targets`` shaped like the token input and an output
``loss``: mean next-token cross-entropy over positions whose target is >= 0 (a negative target
is ignored, e.g. padding). Written as logsumexp - gather so the autodiff pass differentiates it
like everything else, and fused/codegen'd later like everything else.

Auxiliary losses: a model file may name scalar outputs under ``model.aux_losses`` with a
coefficient each (``{load_balance: lb_coef}``; the frontend puts them in
``graph.meta["aux_losses"]``). Then ``loss = ce_loss + sum(coef * aux)`` is what training
optimises, and the cross-entropy alone stays an output, ``ce_loss``, so it can be logged and
compared with models that have no auxiliary losses. The aux outputs themselves are kept.

Multi-token prediction (DeepSeek-V3's MTP): an aux loss may instead name a logits output and
an offset (``{mtp: {logits: mtp_logits, ahead: 2, coef: 0.3}}``, in
``graph.meta["predictions"]``). Its value is the same cross-entropy of those logits against
the token `ahead` positions after each input's (``targets`` moved ahead - 1 positions
earlier; the last ahead - 1 positions, whose token lies outside the window, are ignored),
added as an output under the loss's name.
"""
from __future__ import annotations

from ..errors import LmcError
from ..frontend.builder import Builder, Tensor
from ..ir.graph import Graph


def logits_vocab(g: Graph, purpose: str, logits: str = "logits") -> int:
    """The vocabulary of g's logits output, checked to be one row of scores per token:
    [*token input's shape, vocab] in a float dtype, vocab a number. `purpose` begins the
    error ("training", "lmc run --generate", ...)."""
    if logits not in g.outputs:
        raise LmcError(f"{purpose} needs a {logits!r} output (outputs: "
                       f"{', '.join(g.outputs)})")
    lg = g.outputs[logits]
    ids = g.inputs[0] if g.inputs else None
    extra = [n for n in g.inputs[1:] if n.attrs.get("name") != "targets"]
    if extra:
        names = ", ".join(repr(n.attrs["name"]) for n in extra)
        raise LmcError(f"{purpose} feeds the model its token ids only, and it also reads "
                       f"{names} (the Python API passes more: model(ids, "
                       f"{extra[0].attrs['name']}=...))", extra[0].loc)
    if ids is None or lg.type.dtype.value not in ("f32", "f16", "bf16", "f64") or \
            lg.type.rank != ids.type.rank + 1 or lg.type.shape[:-1] != ids.type.shape or \
            not isinstance(lg.type.shape[-1], int):
        want = ", ".join(map(str, ids.type.shape)) if ids is not None else "B, T"
        raise LmcError(f"{purpose} needs {logits} shaped [{want}, vocab] in a float dtype "
                       f"(one row of scores per token, vocab a number), got {lg.type}", lg.loc)
    return lg.type.shape[-1]


def with_loss(g: Graph, logits: str = "logits") -> Graph:
    if g.meta.get("loss_appended"):    # appended already
        return g
    logits_vocab(g, "training", logits)
    for name in ("loss", "ce_loss", "targets"):
        if name in g.outputs:
            raise LmcError(f"an output may not be named {name!r}: training appends it "
                           "(rename the output)", g.outputs[name].loc)
    for n in g.inputs:
        if n.attrs.get("name") == "targets":
            raise LmcError("an input may not be named 'targets': training appends it "
                           "(rename the input)", n.loc)
    lg = g.outputs[logits]
    ids = g.inputs[0]
    b = Builder({}, {})
    b.nodes = list(g.nodes)
    b.scope = "loss"
    b.loc = lg.loc          # the loss's nodes point at the logits' line (not a Python caller)
    x = Tensor(lg, b)
    targets = b.input("targets", ids.type.shape, "i64")
    vocab = x.shape[-1]
    loss = cross_entropy(b, x, targets)
    outputs = dict(g.outputs)
    aux = g.meta.get("aux_losses") or {}
    predictions = g.meta.get("predictions") or {}
    if aux:
        if "ce_loss" in g.outputs:
            raise LmcError("a model with aux_losses cannot have an output named 'ce_loss' "
                           "(the training loss adds it)")
        outputs["ce_loss"] = loss.node
        for name, coef in aux.items():
            if name in predictions:
                p = predictions[name]
                a = cross_entropy(b, Tensor(g.outputs[p["logits"]], b),
                                  targets_ahead(b, targets, p["ahead"]))
                outputs[name] = a.node
            else:
                a = Tensor(g.outputs[name], b)
                a = a if a.dtype.value == "f32" else b.cast(a, "f32")
            loss = loss + a * float(coef)
    outputs["loss"] = loss.node
    out = g.with_nodes(b.nodes, outputs)
    out.meta["vocab"] = vocab
    out.meta["loss_appended"] = True
    return out


def cross_entropy(b: Builder, x: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits x [.., vocab] against targets [..] over the targets >= 0
    (a negative one is ignored), in fp32."""
    valid = b.cast(targets >= 0, "f32")                            # [B, T]
    safe = b.maximum(targets, 0)
    xf = x if x.dtype.value == "f32" else b.cast(x, "f32")          # loss math in fp32
    lse = b.logsumexp(xf, -1, keepdim=False)                        # [B, T]
    # gather from the logits as they are and widen the B*T picked values, so the fp32 copy
    # of low-precision logits is read only by logsumexp (fused into its kernel, never stored)
    picked = b.gather(x, b.reshape(safe, list(safe.shape) + [1]), -1)
    picked = picked if picked.dtype.value == "f32" else b.cast(picked, "f32")
    nll = (lse - b.reshape(picked, list(safe.shape))) * valid
    count = b.maximum(b.sum(b.reshape(valid, [-1]), 0, keepdim=False), 1.0)
    return b.sum(b.reshape(nll, [-1]), 0, keepdim=False) / count


def targets_ahead(b: Builder, targets: Tensor, ahead: int) -> Tensor:
    """The token `ahead` positions after each input: next-token targets [B, T] moved
    ahead - 1 positions earlier along T, the last ahead - 1 positions -1 (ignored). (The
    trainer refuses windows shorter than `ahead` tokens.)"""
    n = ahead - 1
    if n == 0:
        return targets
    B, T = targets.shape
    pad = b.expand(b.const(-1, "i64"), [B, n])
    return b.concat([b.slice(targets, 1, n, T), pad], 1)
