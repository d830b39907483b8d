"""Kernel kinds backed by hand-written Triton templates rather than generated source.

A pattern pass (lmc/passes/fuse_rope_attention.py) makes FUSED nodes whose body is the
matched primitives, with ``body.meta["template"]`` naming the template and
``body.meta["options"]`` its constexpr options; the autodiff pass makes the matching
``*_bwd`` node. Nothing is generated for them (`generate` returns no source); `launch` calls
the template's Python entry point and writes into the wrapper's preallocated outputs.
"""
from __future__ import annotations

HELPERS = ""


def generate(body, name: str) -> str:
    return ""


def _rope_attention(xs, outs, opts, backward: bool):
    from .attention import rope_attention_bwd, rope_attention_fwd

    q, k, v, cos, sin = xs[:5]
    kw = dict(causal=opts["causal"], window=opts["window"] or None, scale=opts["scale"],
              rot_dim=q.shape[-1], interleaved=False)
    out, lse = rope_attention_fwd(q, k, v, cos, sin, **kw)
    if not backward:
        outs[0].copy_(out)
        return
    # the forward's output and row log-sum-exp are recomputed rather than saved (one extra
    # forward, about a third of the backward's work): the fused op exposes only its output
    dq, dk, dv = rope_attention_bwd(xs[5], q, k, v, out, lse, cos, sin, **kw)
    for o, g in zip(outs, (dq, dk, dv)):
        o.copy_(g)


_TEMPLATES = {
    "rope_attention": lambda xs, outs, opts: _rope_attention(xs, outs, opts, False),
    "rope_attention_bwd": lambda xs, outs, opts: _rope_attention(xs, outs, opts, True),
}


def launch(kernel, xs, outs, body, ctx, interpret: bool) -> None:
    _TEMPLATES[body.meta["template"]](list(xs), list(outs), body.meta.get("options", {}))
