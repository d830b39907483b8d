"""`fuse_linear_attention`: decayed linear attention in its parallel form, as one op.

Matched on primitives (no block names): from each `a @ v` whose `a` is a product of
`x @ y^T` with something (the shape of O = (Q K^T * D) V), the pass walks

    out = ((q @ k^T) [* c | / c] * D) @ v                       (c a scalar constant)
    D   = [cast] exp(where(causal_mask(T, T), G_t - G_s, -inf))
    G_t - G_s = reshape(G, [.., T, 1]) - reshape(G, [.., 1, T]),  G = cumsum(ld, -1)

(the canonical form lmc/passes/decode.py also recognises and decodes with a d_k x d_v state;
under mixed precision D may reach the product through one cast, a fixed decay cast to the
scores' dtype, or the product may be cast(cast(q @ k^T, f32) * D) with a learned fp32 D, its
weights rounded to v's dtype: both as the mixed-precision pass writes them) with
q, k: [B, H, T, d_k] (or one [.., 1, T, d_k] shared by every head, as Mamba-2's B and C
projections), v: [B, H, T, d_v] of one float dtype and the log-decays ld (rank 2
or 3) broadcastable to [B, H, T]: per-token gates [B, H, T] (yoco's gated retention; they get a
gradient) or a fixed decay computed from constants ([1, H, T] expanded from [1, H, 1]:
minimax's lightning attention, no gradient). The region becomes one FUSED node of kind
"linear_attention" (inputs q, k, v, ld; output o) whose body is the matched primitives, so the
torch backend and every check still run the exact oracle; the triton backend runs
lmc/codegen/linear_attention.py's chunked kernels (intra-chunk masked products and an fp32
d_k x d_v state carried across chunks: linear in T, nothing T x T). The autodiff pass
differentiates the FUSED node by its body, and its backward op (kind "linear_attention_bwd")
runs the chunked backward kernels, which recompute the per-chunk states (no forward rerun).
Body options: chunk (a power of two >= 16, `chunk=` argument, 64 by default), scale (c, or 1),
decay ("per_token", "per_head" or "fixed") and decay_grad (whether ld gets a gradient).

Gated linear attention (per-channel decays: GLA, RWKV-6-style), written with [.., T, T, d_k]
products (`match_gated`: sum(reshape(q, [.., T, 1, dk]) * reshape(k, [.., 1, T, dk]) * D,
-1) @ v, D = exp(where(reshape(causal_mask(T), [T, T, 1]), G_t - G_s, -inf)), G = cumsum(g)
along time), becomes a FUSED node of kind "gated_linear_attention" (inputs q, k, v, g)
run by lmc/codegen/gated_linear_attention.py's chunked kernels (d_k <= 128).

It runs before autodiff on the program being trained or run on the triton backend, not in the
compile pipeline: the decode pass derives its step from the unfused graph. Where a candidate
almost matches, a declined record names the failed condition (`lmc compile --explain`).
Not matched: a sliding-window decay mask (the kernels carry the whole past), masks other than
a causal_mask filled with 0 after the exp (canonicalize rewrites where(causal_mask, exp(.), 0),
a fixed decay written from positions, L * (p_t - p_s), and G_t - G_s written with unit dims,
G - transpose(G, -2, -1) of a [.., T, 1] G or a cumsum reshaped to [.., T], into this form),
decays not from a cumsum along time (a cumsum along a unit axis is named), a
scale that is a tensor, casts between q/k/v and the products, q, k, v of different dtypes,
q and k of different shapes (GQA through an expand), normalised forms (retention's row
normalisation by sum |Q K^T * D|), and intermediates read outside the region (a D shared by
two attentions is fine when both are fused: each body recomputes it).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from ..ir.graph import Graph, Node, toposort
from ..ir.ops import Op
from ..ir.types import DType
from .canonical import is_time_cumsum, unit_decay_views
from .fuse_pointwise import _where
from .patterns import (
    Body,
    NoMatch,
    Region,
    const_value,
    gated_linear_attention,
    is_swap,
    need,
    splice,
    static_nodes,
    upstream,
    widened,
)

PASS = "fuse_linear_attention"
DEFAULT_CHUNK = 64


def _strip_cast(n: Node) -> Node:
    return n.inputs[0] if n.op is Op.CAST else n


def _unscale(n: Node) -> Tuple[Node, Optional[Node], Optional[float]]:
    """n = x * c, c * x or x / c with c a constant: (x, the scaling node, the factor);
    else (n, None, None)."""
    if n.op in (Op.MUL, Op.DIV):
        a, c = n.inputs
        if n.op is Op.MUL and const_value(a) is not None:
            a, c = c, a
        cv = const_value(c)
        if cv is not None:
            return a, n, (cv if n.op is Op.MUL else 1.0 / cv)
    return n, None, None


def _scores_like(n: Node) -> bool:
    """n looks like (scaled) x @ y^T: the candidate test, lenient on casts and scales."""
    x = _strip_cast(n)
    if x.op in (Op.MUL, Op.DIV):
        x = _strip_cast(x.inputs[0] if x.inputs[0].op is Op.MATMUL else x.inputs[-1])
    return x.op is Op.MATMUL and is_swap(_strip_cast(x.inputs[1]))


def candidate(n: Node) -> Optional[Tuple[Node, Node]]:
    """(the weights `a`, v) when n = a @ v with a = (x @ y^T) * m: the shape of decayed linear
    attention. Softmax attention (`probs @ v`) and gated FFNs (`(silu(x W1) * (x W3)) @ W2`:
    no transpose) are not candidates, so unrelated graphs get no records."""
    if n.op is not Op.MATMUL or n.type.rank != 4:
        return None
    a = _strip_cast(n.inputs[0])
    if a.op is not Op.MUL or not any(_scores_like(x) for x in a.inputs):
        return None
    return a, n.inputs[1]


def _decay(d: Node, region: List[Node]) -> Tuple[Node, Node]:
    """d = [cast] exp(where(causal_mask(T, T), G_t - G_s, -inf)), G = cumsum(ld, -1):
    (ld, the causal mask)."""
    if d.op is Op.CAST:
        region.append(d)
        d = d.inputs[0]
    need(d.op is Op.EXP, f"the factor beside q @ k^T is {d.op.value}, not a decay mask "
                          f"exp(where(causal_mask, G_t - G_s, -inf))")
    w = d.inputs[0]
    need(w.op is Op.WHERE, f"the decay exponent is {w.op.value}, not "
                            f"where(causal_mask, G_t - G_s, -inf)")
    mask, diff, fill = w.inputs
    need(mask.op is Op.CAUSAL_MASK, f"the decay is masked by {mask.op.value}, not causal_mask")
    need(not mask.attrs.get("window"),
          f"sliding-window decay mask (window {mask.attrs.get('window')}): the chunked kernels "
          f"carry the whole past")
    need(mask.attrs["rows"] == mask.attrs["cols"], "the causal mask is not square [T, T]")
    need(const_value(fill) == float("-inf"),
          "masked decay exponents are not set to -inf (exp(-inf) = 0)")
    need(diff.op is Op.SUB, f"the decay exponent is {diff.op.value}, not G_t - G_s")
    gt, gs = diff.inputs
    views = unit_decay_views(diff)
    if views is not None and not (gt.op is Op.RESHAPE and gs.op is Op.RESHAPE and
                                  gt.inputs[0] is gs.inputs[0] and
                                  gt.inputs[0].op is Op.CUMSUM):
        _unit_views(*views)
    need(gt.op is Op.RESHAPE and gs.op is Op.RESHAPE and gt.inputs[0] is gs.inputs[0],
          "G_t - G_s is not a difference of two reshapes of one G")
    G = gt.inputs[0]
    need(G.op is Op.CUMSUM, f"G is {G.op.value}, not a cumsum of log-decays")
    r = G.type.rank
    need(G.attrs["axis"] == r - 1, "G is a cumsum along an axis other than the last (time)")
    T = G.type.shape[-1]
    need(T == mask.attrs["rows"], "the mask and G have different lengths")
    lead = tuple(G.type.shape[:-1])
    need(tuple(gt.type.shape) == lead + (T, 1) and tuple(gs.type.shape) == lead + (1, T),
          "G_t - G_s is not G[.., t, None] - G[.., None, s] (query rows, key columns)")
    region += [d, w, diff, gt, gs, G]
    return G.inputs[0], mask


def _unit_views(G: Node, lead, T) -> None:
    """Why G_t - G_s read through views of G that only add, drop or move unit dims
    (G - transpose(G, -2, -1) of a [.., T, 1] G, reshapes of reshape(G, [.., T])) is no
    decay (raises NoMatch): canonicalize rewrites them into the reshapes of a cumsum over
    [.., T] when G is a cumsum along T; here they name what else G is."""
    need(G.op is Op.CUMSUM, f"G is {G.op.value}, not a cumsum of log-decays")
    dims = "[" + ", ".join(str(d) for d in G.type.shape) + "]"
    need(is_time_cumsum(G, T), f"G is a cumsum along axis {G.attrs['axis']} of {dims}, not "
                               f"along time (the axis of length {T}, only unit dims after it)")
    raise NoMatch("G_t - G_s reads G through transposes or unit-dim reshapes, which "
                  "canonicalize rewrites into reshapes of a cumsum over [.., T] (disabled?)")


def match(out: Node, static) -> dict:
    """The region of one candidate `out` (raises NoMatch with the failed condition)."""
    need(out.type.dtype.value in ("f32", "f16", "bf16"),
          f"linear attention in {out.type.dtype.value} (kernels: f32, f16, bf16)")
    a, v = out.inputs
    region = [out]
    if a.op is Op.CAST and a.type.dtype == v.type.dtype and a.inputs[0].op is Op.MUL \
            and a.inputs[0].type.dtype is DType.f32:
        # mixed precision: fp32 weights (an fp32 decay times the scores cast up) rounded to
        # v's dtype for the product
        region.append(a)
        a = a.inputs[0]
    need(a.op is Op.MUL, "a cast between (q @ k^T) * D and the product with v")
    region.append(a)
    first, second = a.inputs
    pairs = [(s, d) for s, d in ((first, second), (second, first)) if _scores_like(s)]
    errors = []
    for s, d in pairs:
        try:
            sub: List[Node] = []
            ld, mask = _decay(d, sub)
            break
        except NoMatch as e:
            errors.append(str(e))
    else:
        raise NoMatch(errors[0])
    region += sub
    if widened(s):
        region.append(s)
        s = s.inputs[0]
    mm, scaled, scale = _unscale(s)
    if scaled is not None:
        region.append(scaled)
    need(mm.op is Op.MATMUL, "a cast between q @ k^T and the decay product" if
          mm.op is Op.CAST else "scores scaled by a tensor, not a constant")
    q, kt = mm.inputs
    need(kt.op is not Op.CAST, "a cast between k^T and q @ k^T")
    need(is_swap(kt), "keys are not transposed (k^T) in q @ k^T")
    k = kt.inputs[0]
    region += [mm, kt]
    need(q.type.rank == 4, f"q is rank {q.type.rank}, not [B, H, T, d_k]")
    need(out.type.rank == 4, f"the output is rank {out.type.rank}, not [B, H, T, d_v]")
    B, H, T = tuple(out.type.shape[:3])
    need(tuple(k.type.shape) == tuple(q.type.shape),
          "q and k have different shapes (GQA through an expand is not matched)")
    need(q.type.shape[2] == T and q.type.shape[0] in (1, B) and q.type.shape[1] in (1, H),
          f"q and k {list(q.type.shape)} do not broadcast to the output's [B, H, T] = "
          f"{[B, H, T]}")
    need(v.type.rank == 4 and tuple(v.type.shape[:3]) == (B, H, T),
          "v is not [B, H, T, d_v] with the output's B, H, T")
    need(q.type.dtype == k.type.dtype == v.type.dtype,
          f"q, k, v dtypes differ ({q.type.dtype.value}, {k.type.dtype.value}, "
          f"{v.type.dtype.value})")
    need(mask.attrs["rows"] == T, "the decay mask's length is not q's time axis")
    ls = tuple(ld.type.shape)
    full = (1,) * (3 - len(ls)) + ls
    need(len(ls) in (2, 3) and full[2] == T and full[0] in (1, B) and full[1] in (1, H),
          f"log-decays of shape {list(ls)} do not broadcast to [B, H, T] = {[B, H, T]}")
    need(ld.type.dtype.is_float, "integer log-decays")
    fixed = static(ld)
    per_head = fixed and ld.op is Op.EXPAND and ld.inputs[0].type.shape[-1] == 1
    return {"q": q, "k": k, "v": v, "ld": ld, "out": out, "region": set(region),
            "scale": 1.0 if scale is None else scale,
            "decay": "per_token" if not fixed else "per_head" if per_head else "fixed",
            "decay_grad": not fixed}


def gated_candidate(n: Node) -> bool:
    """n = A @ v with A a sum over the last axis of a 5-d product: the shape of gated linear
    attention written with [.., T, T, d_k] products."""
    if n.op is not Op.MATMUL or n.type.rank != 4:
        return False
    a = _strip_cast(n.inputs[0])
    return a.op is Op.SUM and a.inputs[0].type.rank == 5


def match_gated(out: Node, static) -> dict:
    """Gated linear attention (per-channel decays: GLA, RWKV-6-style), the form
    `patterns.gated_linear_attention` reads, over [B, H, T, d] q, k, v and log-decays,
    with what the kernels take. Raises NoMatch with the failed condition."""
    need(out.type.dtype.value in ("f32", "f16", "bf16"),
          f"gated linear attention in {out.type.dtype.value} (kernels: f32, f16, bf16)")
    q, k, v, ld = gated_linear_attention(out)
    need(q.type.rank == 4, f"q is rank {q.type.rank}, not [B, H, T, d_k]")
    B, H, T, dk = q.type.shape
    need(tuple(q.type.shape) == tuple(k.type.shape) == (B, H, T, dk)
          and v.type.rank == 4 and tuple(v.type.shape[:3]) == (B, H, T),
          "q, k are not [B, H, T, d_k] with v [B, H, T, d_v]")
    need(q.type.dtype == k.type.dtype == v.type.dtype,
          f"q, k, v dtypes differ ({q.type.dtype.value}, {k.type.dtype.value}, "
          f"{v.type.dtype.value})")
    need(ld.type.dtype.is_float and tuple(ld.type.shape) == (B, H, T, dk),
          "log-decays are not float [B, H, T, d_k]")
    need(isinstance(dk, int) and isinstance(v.type.shape[3], int) and dk <= 128,
          "key head dim above 128 (the kernels hold the whole key width)")
    region = upstream([out], {q, k, v, ld})
    for n in region:
        for i in n.inputs:
            need(i in region or i in (q, k, v, ld) or (not i.inputs and i.op is not Op.INPUT
                                                        and i.op is not Op.PARAM),
                  f"the gated linear attention reads {i.op.value} besides q, k, v, g")
    fixed = static(ld)
    return {"q": q, "k": k, "v": v, "ld": ld, "out": out, "region": region, "gated": True,
            "scale": 1.0, "decay": "per_channel", "decay_grad": not fixed}


def _body(m: dict, name: str, chunk: int) -> Graph:
    """The matched region as a body graph over placeholders in0..in3 (q, k, v, ld)."""
    b = Body([m[k] for k in ("q", "k", "v", "ld")])
    b.copy([n for n in toposort([m["out"]], ()) if n in m["region"]])
    if m.get("gated"):
        return b.graph(name, [m["out"]],
                       module="gated_linear_attention",  # codegen/gated_linear_attention.py
                       template="gated_linear_attention",
                       options={"chunk": 16, "decay_grad": m["decay_grad"]})
    return b.graph(name, [m["out"]],
                   module="linear_attention",     # lmc/codegen/linear_attention.py
                   template="linear_attention",
                   options={"chunk": chunk, "scale": m["scale"], "decay": m["decay"],
                            "decay_grad": m["decay_grad"]})


def _reason(m: dict, chunk: int) -> str:
    dims = "[" + ", ".join(str(d) for d in m["ld"].type.shape) + "]"
    if m.get("gated"):
        return (f"gated: sum(q_t * k_s * exp(G_t - G_s)) @ v, G = cumsum of per-channel "
                f"log-decays {dims}{'' if m['decay_grad'] else ' (fixed)'}: chunked, chunk 16")
    decay = {"per_token": f"per-token log-decays {dims} (learned)",
             "per_head": f"fixed per-head decay {dims}",
             "fixed": f"fixed log-decays {dims}"}[m["decay"]]
    scale = f", scale {m['scale']:.4g}" if m["scale"] != 1.0 else ""
    return (f"(q @ k^T * exp(G_t - G_s)) @ v, G = cumsum of {decay}{scale}: chunked, "
            f"chunk {chunk}")


def fuse_linear_attention(g: Graph, chunk: int = DEFAULT_CHUNK) -> Graph:
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    users = g.users()
    static = static_nodes(g)
    records: List[dict] = []
    matches: List[dict] = []
    for n in g.nodes:
        if candidate(n) is None and not gated_candidate(n):
            continue
        try:
            matcher = match if candidate(n) is not None else match_gated
            matches.append(matcher(n, lambda t: static.get(t, False)))
        except NoMatch as e:
            records.append({"pass": PASS, "status": "declined", "where": _where(n),
                            "reason": str(e)})
    # a region's intermediates may be read only by matched regions (each body recomputes a
    # shared D); drop the matches that fail this until none does
    for name, o in g.outputs.items():
        users.setdefault(o, []).append(name)       # a graph output is an outside use
    while True:
        inside = set().union(*[m["region"] for m in matches]) if matches else set()
        bad = None
        for m in matches:
            for n in sorted(m["region"] - {m["out"]}, key=lambda x: x.id):
                outer = [u for u in users.get(n, []) if u not in inside]
                if outer:
                    by = outer[0] if isinstance(outer[0], str) else outer[0].op.value
                    bad = (m, f"{n.op.value} inside the linear attention is also used outside "
                              f"it (by {'output ' if isinstance(outer[0], str) else ''}{by})")
                    break
            if bad:
                break
        if bad is None:
            break
        matches.remove(bad[0])
        records.append({"pass": PASS, "status": "declined", "where": _where(bad[0]["out"]),
                        "reason": bad[1]})
    regions = []
    for i, m in enumerate(matches):
        kind = "gated_linear_attention" if m.get("gated") else "linear_attention"
        name = f"lmc_{kind}_{i}"
        attrs = {"kernel": name, "kind": kind, "body": _body(m, name, chunk)}
        if not m["decay_grad"]:
            attrs["no_grad"] = (3,)        # a fixed decay computed from constants
        fused = Node.make(Op.FUSED, [m[k] for k in ("q", "k", "v", "ld")], attrs,
                          m["out"].loc, m["out"].scope)
        regions.append(Region(fused, [m["out"]], m["region"]))
        records.append({"pass": PASS, "status": "fused", "where": _where(m["out"]),
                        "reason": _reason(m, chunk)})
    return splice(g, regions, records)
