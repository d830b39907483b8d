"""canonicalize: differential attention, (softmax(s1) - lam * softmax(s2)) @ v, is written as
two attentions (equal values, both then fused); a factor that varies along the keys is not
a row scale and is left alone. (Attention sinks: tests/passes/test_fuse_rope_attention.py.)"""
import re

import pytest
import torch

from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.passes import run_pipeline
from lmc.passes.fuse_rope_attention import fuse_rope_attention
from lmc.runtime.executor import bind_dims, run_graph

B, T = Dim.sym("B"), Dim.sym("T")
H, D = 2, 16


def _diff(lam_shape, third=False, disable=()):
    """(softmax(s1) - lam * softmax(s2) [+ softmax(s3) * 0.5]) @ v over inputs."""
    b = Builder({}, {})
    q1, q2, k1, k2 = (b.input(n, [B, H, T, D], "f32") for n in ("q1", "q2", "k1", "k2"))
    v = b.input("v", [B, H, T, 2 * D], "f32")
    lam = b.input("lam", lam_shape, "f32")

    def attn(q, k):
        s = (q @ b.transpose(k, -2, -1)) * D ** -0.5
        return b.softmax(b.where(b.causal_mask(T, T), s, -float("inf")), -1)
    a = attn(q1, k1) - lam * attn(q2, k2)
    if third:
        a = a + attn(q2, k1) * 0.5
    return run_pipeline(Graph("diff", b.nodes, {"o": (a @ v).node}), disable=disable)


@pytest.mark.parametrize("lam_shape,third", [([1], False), ([B, H, T, 1], False),
                                             ([H, 1, 1], True)],
                         ids=["scalar", "per-row", "per-head-three-maps"])
def test_differential_attention_becomes_separate_attentions(lam_shape, third):
    g = _diff(lam_shape, third)
    raw = _diff(lam_shape, third, disable=["canonicalize"])
    n_maps = 3 if third else 2
    pv = [n for n in g.nodes if n.op is Op.MATMUL and n.inputs[0].op is Op.SOFTMAX]
    assert len(pv) == n_maps
    gen = torch.Generator().manual_seed(1)
    shape = {"q1": (2, H, 9, D), "q2": (2, H, 9, D), "k1": (2, H, 9, D), "k2": (2, H, 9, D),
             "v": (2, H, 9, 2 * D),
             "lam": tuple(9 if d == T else 2 if d == B else d for d in lam_shape)}
    vals = {k: torch.randn(*s, generator=gen, dtype=torch.float64).float()
            for k, s in shape.items()}
    ctx = RefCtx(dims=bind_dims(g, vals))
    torch.testing.assert_close(run_graph(g, vals, ctx)["o"], run_graph(raw, vals, ctx)["o"],
                               rtol=1e-5, atol=1e-6)
    recs = [r for r in fuse_rope_attention(g).meta["fusions"]
            if r["pass"] == "fuse_rope_attention"]
    assert [r["status"] for r in recs] == ["fused"] * n_maps, recs


def test_a_factor_that_varies_along_the_keys_is_not_distributed():
    g = _diff([B, H, T, T])
    assert not any(n.op is Op.MATMUL and n.inputs[0].op is Op.SOFTMAX for n in g.nodes)


def test_softmaxes_over_features_are_not_distributed():
    """(softmax(a) - 0.5 * softmax(b)) @ W over a feature axis is no attention: left alone
    (distributing would add a product)."""
    b = Builder({}, {})
    a, c = (b.input(n, [B, T, 8], "f32") for n in "ac")
    w = b.input("w", [8, 4], "f32")
    y = (b.softmax(a, -1) - b.softmax(c, -1) * 0.5) @ w
    g = run_pipeline(Graph("mix", b.nodes, {"y": y.node}))
    assert sum(n.op is Op.MATMUL for n in g.nodes) == 1


def _retention(form, lg_shape=(H, 1, 1), disable=()):
    """RetNet's parallel retention with a fixed per-head decay written from positions:
    D = gamma^(t - s), as exp(where(mask, L (p_t - p_s), -inf)) (form "exp") or
    where(mask, exp(L (p_t - p_s)), 0) (form "masked"); L a log-decay input."""
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, H, T, D], "f32") for n in ("q", "k", "v"))
    L = b.input("L", list(lg_shape), "f32")
    pos = b.cast(b.iota(T), "f32")
    diff = L * (b.reshape(pos, [T, 1]) - b.reshape(pos, [1, T]))
    mask = b.causal_mask(T, T)
    if form == "exp":
        Dm = b.exp(b.where(mask, diff, -float("inf")))
    else:
        Dm = b.where(mask, b.exp(diff), 0.0)
    o = ((q @ b.transpose(k, -2, -1)) * Dm) @ v
    return run_pipeline(Graph("ret", b.nodes, {"o": o.node}), disable=disable)


@pytest.mark.parametrize("form", ["exp", "masked"])
@pytest.mark.parametrize("lg_shape", [(H, 1, 1), (1, H, 1, 1)])
def test_a_decay_written_from_positions_becomes_the_cumsum_form(form, lg_shape):
    """L (t - s) becomes G_t - G_s with G = cumsum of L (and a mask after the exp moves before
    it): the same values, and fuse_linear_attention then makes it one chunked op (it declined
    both spellings: 'the decay exponent is mul' / 'the factor beside q @ k^T is where')."""
    from lmc.passes.fuse_linear_attention import fuse_linear_attention

    g = _retention(form, lg_shape)
    raw = _retention(form, lg_shape, disable=["canonicalize"])
    assert any(n.op is Op.CUMSUM for n in g.nodes)
    assert not any(n.op is Op.CUMSUM for n in raw.nodes)
    gen = torch.Generator().manual_seed(2)
    for t in (1, 5, 37):
        vals = {n: torch.randn(2, H, t, D, generator=gen) for n in ("q", "k", "v")}
        vals["L"] = torch.log(torch.tensor([0.9, 0.5])).reshape(lg_shape)
        ctx = RefCtx(dims=bind_dims(g, vals))
        torch.testing.assert_close(run_graph(g, vals, ctx)["o"], run_graph(raw, vals, ctx)["o"],
                                   rtol=1e-5, atol=1e-5)
    recs = [r for r in fuse_linear_attention(g).meta["fusions"]
            if r["pass"] == "fuse_linear_attention"]
    assert [r["status"] for r in recs] == ["fused"], recs
    raw_recs = [r for r in fuse_linear_attention(raw).meta["fusions"]
                if r["pass"] == "fuse_linear_attention"]
    assert [r["status"] for r in raw_recs] == ["declined"], raw_recs


def test_positions_against_a_non_position_or_a_varying_factor_are_left_alone():
    """Only L (p_t - p_s) with p an iota and L constant along both time axes is a decay."""
    b = Builder({}, {})
    L = b.input("L", [H, 1, 1], "f32")
    p = b.input("p", [T], "f32")                  # not positions: any vector
    x = b.input("x", [H, T, T], "f32")
    pos = b.cast(b.iota(T), "f32")
    a = L * (b.reshape(p, [T, 1]) - b.reshape(p, [1, T]))
    c = x * (b.reshape(pos, [T, 1]) - b.reshape(pos, [1, T]))      # varies along t, s
    g = run_pipeline(Graph("g", b.nodes, {"a": a.node, "c": c.node}))
    assert not any(n.op is Op.CUMSUM for n in g.nodes)


def _grads(graph, vals, ctx, gy):
    """The gradients of q, k and v under the cotangent gy of output "o" (lmc's autodiff, the
    backward run op by op)."""
    from lmc.passes.autodiff import differentiate
    prog = differentiate(graph, ["q", "k", "v"])
    fw = run_graph(prog.forward, vals, ctx)
    bound = {s: fw[s] for s in prog.saved}
    bound["grad:o"] = gy
    return run_graph(run_pipeline(prog.backward), bound, ctx)


def _additive(form, disable=()):
    """Attention masked the Hugging Face way, by adding where(mask, 0, -inf) to the scores,
    in the spellings models use; o = softmax(...) @ v."""
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, H, T, D], "f32") for n in ("q", "k", "v"))
    s = (q @ b.transpose(k, -2, -1)) * D ** -0.5
    ninf = -float("inf")
    m = b.causal_mask(T, T)
    if form == "scores-first":
        a = s + b.where(m, 0.0, ninf)
    elif form == "mask-first":
        a = b.where(m, 0.0, ninf) + s
    elif form == "mask-4d":            # mask[None, None] expanded over batch and heads
        w = b.reshape(b.where(m, 0.0, ninf), [1, 1, T, T])
        a = s + b.expand(w, [B, 1, T, T])
    elif form == "cond-4d":            # the bool mask reshaped before the where
        a = b.where(b.reshape(m, [1, 1, T, T]), 0.0, ninf) + s
    elif form == "cast":               # a mask built in another float dtype
        a = s + b.cast(b.where(m, b.cast(b.const(0.0), "bf16"), b.cast(b.const(ninf), "bf16")),
                       "f32")
    elif form == "padding":            # any bool mask: [B, 1, 1, T] of an input
        keep = b.input("keep", [B, 1, 1, T], "bool")
        a = s + b.where(keep, 0.0, ninf)
    elif form.startswith("alibi-"):    # ALiBi's bias added with the mask, in four orders
        slopes = b.const(torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]
                                      ).reshape(H, 1, 1))
        pos = b.cast(b.iota(T), "f32")
        alibi = slopes * (b.reshape(pos, [1, T]) - b.reshape(pos, [T, 1]))
        a = {"alibi-after-mask": lambda: (s + b.where(m, 0.0, ninf)) + alibi,   # (s+mask)+alibi
             "alibi-combined": lambda: s + (alibi + b.where(m, 0.0, ninf)),     # MPT's bias
             "alibi-first": lambda: alibi + (b.where(m, 0.0, ninf) + s),
             "alibi-after-where": lambda: b.where(m, s, ninf) + alibi}[form]()
    else:
        raise ValueError(form)
    o = b.softmax(a, -1) @ v
    return run_pipeline(Graph("additive", b.nodes, {"o": o.node}), disable=disable)


@pytest.mark.parametrize("form", ["scores-first", "mask-first", "mask-4d", "cond-4d", "cast",
                                  "padding"])
def test_an_additive_mask_becomes_the_masked_scores(form):
    """s + where(m, 0, -inf) is where(m, s, -inf) (s + 0 = s; a masked score is -inf either
    way): rewritten so, equal forward and gradients, and (a causal mask) fused as flash
    attention, which the additive spelling was not ('scores plus a term that is not
    ALiBi's')."""

    g = _additive(form)
    raw = _additive(form, disable=["canonicalize"])
    (sm,) = [n for n in g.nodes if n.op is Op.SOFTMAX]
    w = sm.inputs[0]
    assert w.op is Op.WHERE and w.inputs[1].op is Op.MUL and \
        w.inputs[0].op is (Op.INPUT if form == "padding" else Op.CAUSAL_MASK)
    gen = torch.Generator().manual_seed(3)
    for t in (1, 6, 19):
        vals = {n: torch.randn(2, H, t, D, generator=gen) for n in ("q", "k", "v")}
        if form == "padding":
            vals["keep"] = torch.rand(2, 1, 1, t, generator=gen) < 0.7
            vals["keep"][..., 0] = True
        ctx = RefCtx(dims=bind_dims(g, vals))
        torch.testing.assert_close(run_graph(g, vals, ctx)["o"], run_graph(raw, vals, ctx)["o"],
                                   rtol=0, atol=0)
        gy = torch.randn(2, H, t, D, generator=gen)
        grads = [_grads(graph, vals, ctx, gy) for graph in (g, raw)]
        for n in ("grad:q", "grad:k", "grad:v"):
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-6)
    if form != "padding":
        recs = [r for r in fuse_rope_attention(g).meta["fusions"]
                if r["pass"] == "fuse_rope_attention"]
        assert [r["status"] for r in recs] == ["fused"], recs


@pytest.mark.parametrize("form", ["alibi-after-mask", "alibi-combined", "alibi-first",
                                  "alibi-after-where"])
def test_a_bias_added_after_the_mask_moves_inside_it(form):
    """ALiBi's bias added with or after the mask ((s + mask) + alibi; MPT's combined bias
    s + (alibi + mask); where(m, s, -inf) + alibi) is where(m, s + alibi, -inf), bitwise the
    same forward; it fuses as flash attention with ALiBi (before: declined)."""
    g = _additive(form)
    raw = _additive(form, disable=["canonicalize"])
    (sm,) = [n for n in g.nodes if n.op is Op.SOFTMAX]
    w = sm.inputs[0]
    assert w.op is Op.WHERE and w.inputs[0].op is Op.CAUSAL_MASK and w.inputs[1].op is Op.ADD
    gen = torch.Generator().manual_seed(5)
    for t in (1, 6, 19):
        vals = {n: torch.randn(2, H, t, D, generator=gen) for n in ("q", "k", "v")}
        ctx = RefCtx(dims=bind_dims(g, vals))
        assert torch.equal(run_graph(g, vals, ctx)["o"], run_graph(raw, vals, ctx)["o"]), t
    for graph, want in ((g, "fused"), (raw, "declined")):
        recs = [r for r in fuse_rope_attention(graph).meta["fusions"]
                if r["pass"] == "fuse_rope_attention"]
        assert [r["status"] for r in recs] == [want], recs
        assert want == "declined" or "alibi" in recs[0]["reason"].lower(), recs


def test_a_bias_after_a_mask_read_elsewhere_or_masked_twice_is_left_alone():
    """The where read by something else besides the sum stays (moving the bias would need
    the where twice); a second additive mask is the additive rewrite's, not a bias."""
    b = Builder({}, {})
    s = b.input("s", [B, H, T, T], "f32")
    bias = b.input("bias", [1, H, T, T], "f32")
    w = b.where(b.causal_mask(T, T), s, -float("inf"))
    g = run_pipeline(Graph("g", b.nodes, {"a": (w + bias).node, "w": w.node}))
    assert g.outputs["a"].op is Op.ADD


def test_additive_masks_other_than_zero_or_minus_inf_are_left_alone():
    """Only where(m, 0.0, -inf) added to a tensor of the sum's own shape is a mask: a finite
    fill (finfo.min, -1e4: s + fill is not fill) and the branches swapped stay as written;
    another kept value, or a mask that broadcasts the scores up, are a bias added after a
    mask (where(m, 1 + s, -inf), where(keep, 0 + s1, -inf)), the same values."""
    b = Builder({}, {})
    s = b.input("s", [B, H, T, T], "f32")
    s1 = b.input("s1", [1, H, T, T], "f32")
    keep = b.input("keep", [B, 1, T, T], "bool")
    m = b.causal_mask(T, T)
    outs = {"finite": s + b.where(m, 0.0, -1e4), "one": s + b.where(m, 1.0, -float("inf")),
            "swapped": s + b.where(m, -float("inf"), 0.0),
            "wider": s1 + b.where(keep, 0.0, -float("inf"))}
    g = run_pipeline(Graph("g", b.nodes, {k: v.node for k, v in outs.items()}))
    raw = run_pipeline(Graph("g", b.nodes, {k: v.node for k, v in outs.items()}),
                       disable=["canonicalize"])
    assert [g.outputs[k].op for k in outs] == [Op.ADD, Op.WHERE, Op.ADD, Op.WHERE]
    gen = torch.Generator().manual_seed(2)
    vals = {"s": torch.randn(2, H, 5, 5, generator=gen),
            "s1": torch.randn(1, H, 5, 5, generator=gen),
            "keep": torch.rand(2, 1, 5, 5, generator=gen) < 0.5}
    ctx = RefCtx(dims=bind_dims(g, vals))
    got, want = run_graph(g, vals, ctx), run_graph(raw, vals, ctx)
    assert all(torch.equal(got[k], want[k]) for k in outs)


def _half_rope(b, x, c, s, form, Dh, other=False):
    """RoPE with half-width tables c, s ([T, Dh/2]) as reference code writes it (other: the
    second spelling of a form)."""
    if form == "interleaved":                          # pairs (x[2i], x[2i+1])
        x1, x2 = b.slice(x, 3, 0, Dh, 2), b.slice(x, 3, 1, Dh, 2)
    elif form == "interleaved-pairs":                  # Meta's: x viewed as pairs
        xp, half = b.reshape(x, [B, H, T, Dh // 2, 2]), [B, H, T, Dh // 2]
        x1, x2 = (b.reshape(b.slice(xp, -1, j, j + 1), half) for j in (0, 1))
    else:
        x1, x2 = b.slice(x, 3, 0, Dh // 2), b.slice(x, 3, Dh // 2, Dh)
    if form == "operands-swapped":                     # c * x1, terms of the sum swapped
        lo, hi = c * x1 - s * x2, s * x1 + c * x2
    elif form == "negated":                            # -(x2 * s) + x1 * c, (-x2) * s
        lo = x1 * c + (-x2) * s if other else -(x2 * s) + x1 * c
        hi = x2 * c + x1 * s
    else:
        lo, hi = x1 * c - x2 * s, x2 * c + x1 * s
    if form.startswith("interleaved"):                 # stack([lo, hi], -1), flattened
        col = [B, H, T, Dh // 2, 1]
        return b.reshape(b.concat([b.reshape(lo, col), b.reshape(hi, col)], -1), [B, H, T, Dh])
    return b.concat([lo, hi], -1)


def _half_rope_attention(form, disable=()):
    """softmax(causal(rope(q) @ rope(k)^T * scale)) @ v, RoPE with half-width tables."""
    b = Builder({}, {})
    Dh = 2 * D
    q, k, v = (b.input(n, [B, H, T, Dh], "f32") for n in "qkv")
    inv = b.const(torch.tensor([1.0 / 10000 ** (2 * i / Dh) for i in range(Dh // 2)]))
    ang = b.reshape(b.cast(b.iota(T), "f32"), [T, 1]) * b.reshape(inv, [1, Dh // 2])
    c, s = b.cos(ang), b.sin(ang)
    if form == "tables-4d":                            # cos[None, None]
        c, s = b.reshape(c, [1, 1, T, Dh // 2]), b.reshape(s, [1, 1, T, Dh // 2])
    sc = _half_rope(b, q, c, s, form, Dh) @ b.transpose(
        _half_rope(b, k, c, s, form, Dh, other=True), -2, -1)
    o = b.softmax(b.where(b.causal_mask(T, T), sc * Dh ** -0.5, -float("inf")), -1) @ v
    return run_pipeline(Graph("half_rope", b.nodes, {"o": o.node}), disable=disable)


@pytest.mark.parametrize("form", ["plain", "operands-swapped", "negated", "tables-4d",
                                  "interleaved", "interleaved-pairs"])
def test_rope_with_half_width_tables_becomes_the_full_width_form(form):
    """concat([x1*c - x2*s, x2*c + x1*s], -1) (GPT-NeoX's half tables; interleaved: the pairs
    stacked) is x * C + rot(x) * S with C = cos(concat([a, a])) the full-width table: the
    same values bitwise (a - b*s = a + (-b)*s), gradients equal, and fuse_rope_attention
    then takes RoPE into the kernel (before: 'their RoPE not matched: not x*cos +
    rot(x)*sin')."""

    g = _half_rope_attention(form)
    raw = _half_rope_attention(form, disable=["canonicalize"])
    (cos,) = [n for n in g.nodes if n.op is Op.COS]
    assert cos.type.shape[-1] == 2 * D          # one full-width table, read by x * C
    assert [n.op for n in raw.nodes if n.op is Op.COS and n.type.shape[-1] == D] == [Op.COS]
    assert not any(n.op is Op.SUB for n in g.nodes)
    gen = torch.Generator().manual_seed(5)
    for t in (1, 7, 23):
        vals = {n: torch.randn(2, H, t, 2 * D, generator=gen) for n in "qkv"}
        ctx = RefCtx(dims=bind_dims(g, vals))
        assert torch.equal(run_graph(g, vals, ctx)["o"], run_graph(raw, vals, ctx)["o"])
        gy = torch.randn(2, H, t, 2 * D, generator=gen)
        grads = [_grads(graph, vals, ctx, gy) for graph in (g, raw)]
        for n in ("grad:q", "grad:k", "grad:v"):
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-6)
    (r,) = [r for r in fuse_rope_attention(g).meta["fusions"]
            if r["pass"] == "fuse_rope_attention"]
    assert r["status"] == "fused" and r["reason"].startswith(
        "interleaved rope + causal" if form.startswith("interleaved") else "rope + causal"), r
    (r,) = [r for r in fuse_rope_attention(raw).meta["fusions"]
            if r["pass"] == "fuse_rope_attention"]
    assert r["reason"].startswith("no rope"), r


def test_near_misses_of_half_table_rope_are_left_alone():
    """Not RoPE, or not provably the same values as the full-width form: another table in
    the second half, halves of different tensors, the sign on the wrong term, the halves'
    roles swapped, a third part in the concat: left as written."""
    b = Builder({}, {})
    x, y = (b.input(n, [B, H, T, D], "f32") for n in "xy")
    c, c2, s = (b.input(n, [T, D // 2], "f32") for n in ("c", "c2", "s"))
    x1, x2 = b.slice(x, 3, 0, D // 2), b.slice(x, 3, D // 2, D)
    y2 = b.slice(y, 3, D // 2, D)
    outs = {
        "other-cos": b.concat([x1 * c - x2 * s, x2 * c2 + x1 * s], -1),
        "other-tensor": b.concat([x1 * c - y2 * s, y2 * c + x1 * s], -1),
        "sign": b.concat([x1 * c + x2 * s, x2 * c - x1 * s], -1),
        "three-parts": b.concat([x1 * c - x2 * s, x2 * c + x1 * s, x1], -1),
        "swapped-halves": b.concat([x2 * c - x1 * s, x1 * c + x2 * s], -1),
    }
    g = run_pipeline(Graph("g", b.nodes, {k: v.node for k, v in outs.items()}))
    rewritten = [k for k in outs if not (g.outputs[k].op is Op.CONCAT and any(
        i.op is Op.SUB for i in g.outputs[k].inputs))]
    assert rewritten == []


def test_near_misses_of_meta_pair_rope_are_left_alone():
    """Meta's pairs spelling, reshape(reshape(x, [.., R/2, 2])[..., j:j+1], [.., R/2]), near
    missed: x viewed as its halves ([.., 2, R/2], the same unit slices on that axis), x2
    from another tensor's pairs, x2 the pairs' first entry again: left as written (the
    strided-slice spelling's near misses: the test above)."""
    b = Builder({}, {})
    x, y = (b.input(n, [B, H, T, D], "f32") for n in "xy")
    c, s = (b.input(n, [T, D // 2], "f32") for n in ("c", "s"))
    half, col = [B, H, T, D // 2], [B, H, T, D // 2, 1]

    def pair(t, j):
        return b.reshape(b.slice(b.reshape(t, [B, H, T, D // 2, 2]), -1, j, j + 1), half)

    def halves(t, j):
        return b.reshape(b.slice(b.reshape(t, [B, H, T, 2, D // 2]), -2, j, j + 1), half)

    def rope(x1, x2):
        lo, hi = x1 * c - x2 * s, x2 * c + x1 * s
        return b.reshape(b.concat([b.reshape(lo, col), b.reshape(hi, col)], -1), [B, H, T, D])
    outs = {
        "meta": rope(pair(x, 0), pair(x, 1)),      # the form itself: rewritten
        "halves-layout": rope(halves(x, 0), halves(x, 1)),
        "other-tensor": rope(pair(x, 0), pair(y, 1)),
        "same-entry": rope(pair(x, 0), pair(x, 0)),
    }
    g = run_pipeline(Graph("g", b.nodes, {k: v.node for k, v in outs.items()}))

    def as_written(o):      # reshape(concat([reshape(lo), reshape(hi)])), lo a difference
        return o.op is Op.RESHAPE and o.inputs[0].op is Op.CONCAT and any(
            i.op is Op.RESHAPE and i.inputs[0].op is Op.SUB for i in o.inputs[0].inputs)
    assert [k for k in outs if not as_written(g.outputs[k])] == ["meta"]


_HALF_YAML = """
name: half_rope
config: {vocab: 64, d: 64, layers: 2, heads: 2, head_dim: d / heads, max_seq: 32}
blocks:
  rope_tables:                      # half width: cos, sin [T, head_dim / 2]
    args: []
    body:
      - inv_freq = 1.0 / 10000 ** (cast(iota(head_dim / 2), 'f32') * 2 / head_dim)
      - freqs = reshape(cast(iota(T), 'f32'), [T, 1]) * reshape(inv_freq, [1, head_dim / 2])
      - return cos(freqs), sin(freqs)
  rope:
    args: [x, cos, sin]
    body:
      ROPE
  attention:
    args: [x, cos, sin]
    params: {wq: [d, d], wk: [d, d], wv: [d, d], wo: [d, d]}
    body:
      - q = permute(reshape(x @ wq, [B, T, heads, head_dim]), [0, 2, 1, 3])
      - k = permute(reshape(x @ wk, [B, T, heads, head_dim]), [0, 2, 1, 3])
      - v = permute(reshape(x @ wv, [B, T, heads, head_dim]), [0, 2, 1, 3])
      - q = rope(q, cos, sin)
      - k = rope(k, cos, sin)
      - scores = (q @ transpose(k, -2, -1)) * head_dim ** -0.5
      - probs = softmax(where(causal_mask(T), scores, -inf), -1)
      - return reshape(permute(probs @ v, [0, 2, 1, 3]), [B, T, d]) @ wo
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d], head: [d, vocab]}
  body:
    - x = embedding(embed, ids)
    - cos, sin = rope_tables()
    - for: i
      in: layers
      body:
        - x = x + attention(x, cos, sin, name='attn')
    - logits = x @ head
  outputs: [logits]
"""
_HALF_ROPES = {
    "rotate-half": "- x1, x2 = split(x, 2, -1)\n"
                   "      - return concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)",
    "interleaved": "- x1 = slice(x, -1, 0, head_dim, 2)\n"
                   "      - x2 = slice(x, -1, 1, head_dim, 2)\n"
                   "      - lo = reshape(x1 * cos - x2 * sin, [B, heads, T, head_dim / 2, 1])\n"
                   "      - hi = reshape(x1 * sin + x2 * cos, [B, heads, T, head_dim / 2, 1])\n"
                   "      - return reshape(concat([lo, hi], -1), [B, heads, T, head_dim])",
    "interleaved-pairs":                # Meta's Llama: x viewed as pairs
        "- xp = reshape(x, [B, heads, T, head_dim / 2, 2])\n"
        "      - x1 = reshape(slice(xp, -1, 0, 1), [B, heads, T, head_dim / 2])\n"
        "      - x2 = reshape(slice(xp, -1, 1, 2), [B, heads, T, head_dim / 2])\n"
        "      - lo = reshape(x1 * cos - x2 * sin, [B, heads, T, head_dim / 2, 1])\n"
        "      - hi = reshape(x2 * cos + x1 * sin, [B, heads, T, head_dim / 2, 1])\n"
        "      - return reshape(concat([lo, hi], -1), [B, heads, T, head_dim])",
}


@pytest.mark.parametrize("form", list(_HALF_ROPES))
def test_a_model_with_half_width_rope_tables_fuses_in_training_and_decode(form, tmp_path,
                                                                          monkeypatch):
    """A llama-like model whose RoPE reads half-width tables (before: 'no rope: ... their
    RoPE not matched: not x*cos + rot(x)*sin', RoPE run outside the kernel): the passes equal
    the model as written bitwise, one rope_attention per layer with RoPE inside, triton
    forward and gradients equal to the primitives, and one decode_attention per layer in the
    dynamic and the static step, decode = forward."""
    from conftest import assert_fused_model_matches, unit_init

    import lmc
    from lmc.driver import compile_model
    from lmc.runtime.module import LmcModel

    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"{form}.yaml"
    path.write_text(_HALF_YAML.replace("ROPE", _HALF_ROPES[form]))
    m = unit_init(lmc.load(str(path), seed=1))      # scores O(1): RoPE moves the logits
    tri = lmc.load(str(path), backend="triton", seed=1)
    tri.load_state_dict(m.state_dict())
    recs = [r for r in tri.pattern_graph().meta["fusions"] if r["pass"] == "fuse_rope_attention"]
    want_why = ("interleaved rope" if form.startswith("interleaved") else "rope") + \
        " + causal attention, scale 0.1768"
    assert [(r["status"], r["reason"]) for r in recs] == [("fused", want_why)] * 2, recs
    kinds = [n.attrs["kind"] for n in tri.pattern_graph().nodes if n.op is Op.FUSED]
    assert kinds == ["rope_attention"] * 2
    raw = LmcModel(compile_model(str(path), disable=["canonicalize"]).graph, seed=1)
    raw.load_state_dict(m.state_dict())
    gen = torch.Generator().manual_seed(6)
    for t in (1, 5, 11, 23):      # bitwise, whatever the lengths
        ids = torch.randint(0, 64, (2, t), generator=gen)
        assert torch.equal(raw(ids), m(ids)), t
    ids = torch.randint(0, 64, (2, 11), generator=gen)
    assert_fused_model_matches(m, tri, ids, gen)


_META_YAML = """
name: meta_layout
config: {vocab: 64, d: 64, layers: 2, heads: 4, kv_heads: KV, head_dim: d / heads,
         max_seq: 32}
blocks:
  rope_tables:                      # TABLES, laid out for x: [B, T, heads, head_dim]
    args: []
    body:
      - inv_freq = 1.0 / 10000 ** (cast(iota(head_dim / 2), 'f32') * 2 / head_dim)
      - freqs = reshape(cast(iota(T), 'f32'), [T, 1]) * reshape(inv_freq, [1, head_dim / 2])
      TABLE_BODY
  rope:                             # on x: [B, T, n, head_dim], before the heads permute
    args: [x, cos, sin]
    body:
      ROPE
  repeat_kv:                        # [B, T, kv_heads, head_dim] -> [B, T, heads, head_dim]
    args: [x]
    body:
      - x = reshape(x, [B, T, kv_heads, 1, head_dim])
      - x = expand(x, [B, T, kv_heads, heads / kv_heads, head_dim])
      - return reshape(x, [B, T, heads, head_dim])
  attention:
    args: [x, cos, sin]
    params: {wq: [d, d], wk: [d, kv_heads * head_dim], wv: [d, kv_heads * head_dim],
             wo: [d, d]}
    body:
      - q = rope(reshape(x @ wq, [B, T, heads, head_dim]), cos, sin)
      - k = rope(reshape(x @ wk, [B, T, kv_heads, head_dim]), cos, sin)
      - v = reshape(x @ wv, [B, T, kv_heads, head_dim])
      - q = transpose(q, 1, 2)
      - k = transpose(repeat_kv(k), 1, 2)
      - v = transpose(repeat_kv(v), 1, 2)
      - scores = (q @ transpose(k, -2, -1)) * head_dim ** -0.5
      - probs = softmax(where(causal_mask(T), scores, -inf), -1)
      - return reshape(transpose(probs @ v, 1, 2), [B, T, d]) @ wo
""" + _HALF_YAML[_HALF_YAML.index("\nmodel:") + 1:]   # the same model around it
_META_ROPES = {
    # full-width tables [T, 1, head_dim], rotate-half
    "rotate-half": ("- emb = concat([freqs, freqs], -1)\n"
                    "      - return reshape(cos(emb), [T, 1, head_dim]), "
                    "reshape(sin(emb), [T, 1, head_dim])",
                    "- x1, x2 = split(x, 2, -1)\n"
                    "      - return x * cos + concat([-x2, x1], -1) * sin"),
    # Meta's Llama: half tables [1, T, 1, head_dim / 2], x viewed as pairs
    "meta-pairs": ("- return reshape(cos(freqs), [1, T, 1, head_dim / 2]), "
                   "reshape(sin(freqs), [1, T, 1, head_dim / 2])",
                   "- xp = reshape(x, [B, T, -1, head_dim / 2, 2])\n"
                   "      - half = [B, T, -1, head_dim / 2]\n"
                   "      - x1 = reshape(slice(xp, -1, 0, 1), half)\n"
                   "      - x2 = reshape(slice(xp, -1, 1, 2), half)\n"
                   "      - lo = reshape(x1 * cos - x2 * sin, [B, T, -1, head_dim / 2, 1])\n"
                   "      - hi = reshape(x2 * cos + x1 * sin, [B, T, -1, head_dim / 2, 1])\n"
                   "      - return reshape(concat([lo, hi], -1), [B, T, -1, head_dim])"),
}


@pytest.mark.parametrize("form,kv", [("rotate-half", 2), ("meta-pairs", 1)],
                         ids=["rotate-half-gqa", "meta-pairs-mqa"])
def test_rope_and_kv_repeat_before_the_heads_permute_fuse(form, kv, tmp_path, monkeypatch):
    """RoPE and the kv heads' repeat computed in the [B, T, H, D] layout, then transposed
    (Meta's Llama): canonicalize moves the permute under them, the same values (q' and k'
    bitwise; the logits to the matmul's rounding, torch laying q' out differently), so
    one rope_attention per layer takes RoPE and GQA/MQA into the kernel (before: 'no rope:
    causal attention', RoPE run outside and k, v copied to all query heads), gradients equal
    the primitives', and the decode step's attention reads the kv heads' cache (before: the
    cache copied to every query head each step), decode = forward."""
    from conftest import assert_fused_model_matches, unit_init

    import lmc
    from lmc.driver import compile_model
    from lmc.passes.decode import decode_step
    from lmc.passes.fuse_decode_attention import fuse_decode_attention
    from lmc.runtime.module import LmcModel

    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    tables, rope = _META_ROPES[form]
    path = tmp_path / f"{form}.yaml"
    path.write_text(_META_YAML.replace("TABLE_BODY", tables).replace("ROPE", rope)
                    .replace("KV", str(kv)))
    m = unit_init(lmc.load(str(path), seed=1))
    tri = lmc.load(str(path), backend="triton", seed=1)
    tri.load_state_dict(m.state_dict())
    recs = [r for r in tri.pattern_graph().meta["fusions"] if r["pass"] == "fuse_rope_attention"]
    want = ("interleaved rope" if form == "meta-pairs" else "rope") + " + causal " + \
        ("MQA" if kv == 1 else "GQA") + f" attention (4 heads, {kv} kv), scale 0.25"
    assert [(r["status"], r["reason"]) for r in recs] == [("fused", want)] * 2, recs
    raw_graph = compile_model(str(path), disable=["canonicalize"]).graph
    raw_recs = [r for r in fuse_rope_attention(raw_graph).meta["fusions"]
                if r["pass"] == "fuse_rope_attention"]
    assert all(r["reason"].startswith("no rope: causal attention,") for r in raw_recs)
    raw = LmcModel(raw_graph, seed=1)
    raw.load_state_dict(m.state_dict())
    gen = torch.Generator().manual_seed(6)
    for t in (1, 5, 11, 23):      # q', k' bitwise (the last test); the scores' matmul
        ids = torch.randint(0, 64, (2, t), generator=gen)   # reads them in another layout
        want = raw(ids)
        torch.testing.assert_close(m(ids), want, rtol=0, atol=1e-6 * want.abs().max().item())
    # decode: the attention kernel reads the kv heads' cache as GQA/MQA (before: a copy of
    # the whole cache broadcast to the 4 query heads each step)
    for graph, want in ((compile_model(str(path)).graph, f"4 heads over {kv} kv heads,"),
                        (raw_graph, "4 heads,")):
        step = fuse_decode_attention(decode_step(graph).graph)
        recs = [r["reason"] for r in step.meta["fusions"] if r["pass"] == "fuse_decode_attention"]
        assert len(recs) == 2 and all(want in r for r in recs), recs
    ids = torch.randint(0, 64, (2, 11), generator=gen)
    assert_fused_model_matches(m, tri, ids, gen)


def test_heads_permute_is_left_where_nothing_is_gained():
    """Only RoPE or a kv repeat under the permute moves it: a permute of plain arithmetic, of
    a RoPE also read elsewhere, or another permutation stays as written (a RoPE read by two
    equal permutes moves under both, merged into one); a norm before RoPE stays whole before
    the permute (its weight is not a position table)."""
    b = Builder({}, {})
    x, y = (b.input(n, [B, T, H, D], "f32") for n in "xy")
    w = b.input("w", [D], "f32")
    ang = b.reshape(b.cast(b.iota(T), "f32"), [T, 1, 1]) * b.reshape(
        b.const(torch.linspace(0.1, 1.0, D)), [1, 1, D])
    c, s = b.cos(ang), b.sin(ang)

    def rope(u):
        u1, u2 = b.slice(u, 3, 0, D // 2), b.slice(u, 3, D // 2, D)
        return u * c + b.concat([-u2, u1], -1) * s
    shared = rope(y)
    normed = x * b.rsqrt(b.mean(x * x, -1) + 1e-5) * w
    twice = rope(x + 1.0)
    outs = {"plain": b.permute(x * y + x, [0, 2, 1, 3]),
            "twice-a": b.permute(twice, [0, 2, 1, 3]), "twice-b": b.permute(twice, [0, 2, 1, 3]),
            "shared": b.permute(shared, [0, 2, 1, 3]), "shared-too": shared * 2.0,
            "other-perm": b.permute(rope(x), [2, 1, 0, 3]),
            "normed": b.permute(rope(normed), [0, 2, 1, 3])}
    g = run_pipeline(Graph("g", b.nodes, {k: v.node for k, v in outs.items()}))
    raw = run_pipeline(Graph("g", b.nodes, {k: v.node for k, v in outs.items()}),
                       disable=["canonicalize"])
    assert [k for k in outs if g.outputs[k].op is Op.PERMUTE] == [
        "plain", "shared", "other-perm"]
    assert g.outputs["twice-a"] is g.outputs["twice-b"]
    # the normed x is permuted whole: RoPE reads permute(x * rstd * w)
    perms = [n for n in g.nodes if n.op is Op.PERMUTE and n.inputs[0].op is Op.MUL
             and any(i.op is Op.INPUT and i.attrs["name"] == "w" for i in n.inputs[0].inputs)]
    assert len(perms) == 1
    gen = torch.Generator().manual_seed(3)
    vals = {"x": torch.randn(2, 7, H, D, generator=gen),
            "y": torch.randn(2, 7, H, D, generator=gen), "w": torch.randn(D, generator=gen)}
    ctx = RefCtx(dims=bind_dims(g, vals))
    got, want = run_graph(g, vals, ctx), run_graph(raw, vals, ctx)
    assert all(torch.equal(got[k], want[k]) for k in outs)


def test_yoco_with_its_decays_summed_before_the_heads_permute_fuses_and_decodes(tmp_path):
    """zoo/yoco with the retention's log-decays summed along T in the [B, T, H] layout and
    then permuted, permute(cumsum(ld, 1), [0, 2, 1]): canonicalize sums after the permute
    (bitwise the same forward), so the chunked linear attention fuses (before: declined, 'G
    is permute, not a cumsum of log-decays') and the decode step keeps the d_k x d_v state,
    the same state as the zoo's yoco, decode = forward."""
    from conftest import ZOO, decode_worst, unit_init

    import lmc
    from lmc.driver import compile_model
    from lmc.passes.decode import decode_step
    from lmc.passes.fuse_linear_attention import fuse_linear_attention
    from lmc.runtime.decoder import Decoder
    from lmc.runtime.module import LmcModel

    src = open(f"{ZOO}/yoco.yaml").read()
    for a, b in (("      - G = cumsum(ld, -1)", "      - G = permute(cumsum(ld, 1), [0, 2, 1])"),
                 ("      - ld = permute(logsigmoid(a), [0, 2, 1]) / gate_norm",
                  "      - ld = logsigmoid(a) / gate_norm")):
        assert src.count(a) == 1
        src = src.replace(a, b)
    path = tmp_path / "yoco_bth.yaml"
    path.write_text(src)

    def records(g):
        return [(r["status"], r["reason"].split(" (")[0] if r["status"] == "fused"
                 else r["reason"]) for r in fuse_linear_attention(g).meta["fusions"]
                if r["pass"] == "fuse_linear_attention"]
    g = compile_model(str(path), "tiny").graph
    raw = compile_model(str(path), "tiny", disable=["canonicalize"]).graph
    assert records(g) == records(compile_model(f"{ZOO}/yoco.yaml", "tiny").graph)
    assert {s for s, _ in records(g)} == {"fused"}
    assert {r for _, r in records(raw)} == {"G is permute, not a cumsum of log-decays"}
    states = {s.name: (s.shape, s.bytes_per_token()) for s in decode_step(g).states}
    zoo = {s.name: (s.shape, s.bytes_per_token())
           for s in decode_step(compile_model(f"{ZOO}/yoco.yaml", "tiny").graph).states}
    assert states == zoo
    m = unit_init(lmc.load(str(path), preset="tiny", seed=2))
    r = LmcModel(raw, seed=2)
    r.load_state_dict(m.state_dict())
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 512, (2, 13), generator=gen)
    with torch.no_grad():
        full = m(ids)
        assert torch.equal(full, r(ids))
        assert decode_worst(Decoder(m.eval()), ids, full, 4) < 1e-5 * full.abs().max().item()


def test_a_table_with_the_shape_of_x_is_laid_out_again_not_permuted():
    """Static batch 1 and one head: the [1, T, 1, D] table has x's own leading dims, and is
    still re-laid to [T, D] (a table the RoPE patterns read), not permuted with x; the
    attention then fuses with RoPE on q and k (before: 'q only; k given', or 'no rope')."""
    b = Builder({}, {})
    q, k, v = (b.input(n, [1, T, 1, D], "f32") for n in "qkv")
    ang = b.reshape(b.cast(b.iota(T), "f32"), [1, T, 1, 1]) * b.reshape(
        b.const(torch.linspace(0.1, 1.0, D)), [1, 1, 1, D])
    c, s = b.cos(ang), b.sin(ang)

    def rope(u):
        u1, u2 = b.slice(u, 3, 0, D // 2), b.slice(u, 3, D // 2, D)
        return b.permute(u * c + b.concat([-u2, u1], -1) * s, [0, 2, 1, 3])
    sc = (rope(q) @ b.transpose(rope(k), -2, -1)) * D ** -0.5
    o = b.softmax(b.where(b.causal_mask(T, T), sc, -float("inf")), -1) @ b.permute(
        v, [0, 2, 1, 3])
    g = run_pipeline(Graph("b1", b.nodes, {"o": o.node}))
    assert not any(n.op is Op.PERMUTE and n.inputs[0].op is Op.COS for n in g.nodes)
    (r,) = [r for r in fuse_rope_attention(g).meta["fusions"]
            if r["pass"] == "fuse_rope_attention"]
    assert r["status"] == "fused" and r["reason"].startswith("rope + causal attention"), r
    raw = run_pipeline(Graph("b1", b.nodes, {"o": o.node}), disable=["canonicalize"])
    gen = torch.Generator().manual_seed(8)
    vals = {n: torch.randn(1, 9, 1, D, generator=gen) for n in "qkv"}
    ctx = RefCtx(dims=bind_dims(g, vals))
    torch.testing.assert_close(run_graph(g, vals, ctx)["o"], run_graph(raw, vals, ctx)["o"],
                               rtol=0, atol=1e-6)


_MAX_SEQ_TABLES = {
    # the zoo's layout: [T, head_dim] tables, rotate-half
    "zoo": (_HALF_YAML.replace("ROPE", "- x1, x2 = split(x, 2, -1)\n"
                               "      - return x * cos + concat([-x2, x1], -1) * sin"),
            "      - return cos(freqs), sin(freqs)",
            "      - emb = concat([freqs, freqs], -1)\n"
            "      - return slice(cos(emb), 0, 0, T), slice(sin(emb), 0, 0, T)"),
    # Meta's: half tables over max_seq positions sliced, then [1, T, 1, head_dim / 2]
    "meta": (_META_YAML.replace("ROPE", _META_ROPES["meta-pairs"][1]).replace("KV", "2"),
             "      TABLE_BODY",
             "      - c = reshape(slice(cos(freqs), 0, 0, T), [1, T, 1, head_dim / 2])\n"
             "      - return c, reshape(slice(sin(freqs), 0, 0, T), [1, T, 1, head_dim / 2])"),
}


@pytest.mark.parametrize("layout", list(_MAX_SEQ_TABLES))
def test_rope_tables_precomputed_for_max_seq_and_sliced_fuse_and_decode(layout, tmp_path,
                                                                       monkeypatch):
    """RoPE tables computed over max_seq positions and sliced to the first T rows (Meta's
    freqs_cis[:T], llama2.c's freq_cis[:T]): fold_constants leaves their positions unfolded
    and canonicalize pushes the slice down to iota(T), the same values bitwise, so RoPE fuses
    into the attention kernel (before: 'no rope', 'rope tables are not cos/sin of the same
    angles' in the zoo's layout) and
    the decode step indexes the tables by position (before, in Meta's layout: 'cannot derive
    the decode step: reshape creates a sequence axis from a tensor without one')."""
    from conftest import assert_fused_model_matches, unit_init

    import lmc
    from lmc.driver import compile_model
    from lmc.runtime.module import LmcModel

    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    src, old, tables = _MAX_SEQ_TABLES[layout]
    src = src.replace("freqs = reshape(cast(iota(T), 'f32'), [T, 1])",
                      "freqs = reshape(cast(iota(max_seq), 'f32'), [max_seq, 1])")
    assert src.count(old) == 1 and "iota(max_seq)" in src
    path = tmp_path / f"{layout}.yaml"
    path.write_text(src.replace(old, tables))
    m = unit_init(lmc.load(str(path), seed=1))
    tri = lmc.load(str(path), backend="triton", seed=1)
    tri.load_state_dict(m.state_dict())
    recs = [r for r in tri.pattern_graph().meta["fusions"] if r["pass"] == "fuse_rope_attention"]
    assert [r["status"] for r in recs] == ["fused"] * 2 and all(
        "rope + causal" in r["reason"] and "not matched" not in r["reason"] for r in recs), recs
    raw_graph = compile_model(str(path), disable=["canonicalize"]).graph
    raw_recs = [r for r in fuse_rope_attention(raw_graph).meta["fusions"]
                if r["pass"] == "fuse_rope_attention"]
    assert len(raw_recs) == 2 and all(r["reason"].startswith("no rope") and (
        layout == "meta" or "rope tables are not cos/sin of the same angles" in r["reason"])
        for r in raw_recs), raw_recs
    raw = LmcModel(raw_graph, seed=1)
    raw.load_state_dict(m.state_dict())
    gen = torch.Generator().manual_seed(6)
    for t in (1, 11, 32):       # up to max_seq
        ids = torch.randint(0, 64, (2, t), generator=gen)
        want = raw(ids)
        torch.testing.assert_close(m(ids), want, rtol=0, atol=1e-6 * want.abs().max().item())
    ids = torch.randint(0, 64, (2, 11), generator=gen)
    assert_fused_model_matches(m, tri, ids, gen)


_REPEATED_TABLES = {
    # GPT-J: sin and cos repeat_interleave'd (each entry twice), x rotated every two
    "gptj-repeat": (
        "      - c = reshape(expand(reshape(cos(freqs), [T, head_dim / 2, 1]), "
        "[T, head_dim / 2, 2]), [T, head_dim])\n"
        "      - return c, reshape(expand(reshape(sin(freqs), [T, head_dim / 2, 1]), "
        "[T, head_dim / 2, 2]), [T, head_dim])",
        "- x1 = slice(x, -1, 0, head_dim, 2)\n"
        "      - x2 = slice(x, -1, 1, head_dim, 2)\n"
        "      - col = [B, heads, T, head_dim / 2, 1]\n"
        "      - rot = reshape(concat([reshape(-x2, col), reshape(x1, col)], -1), "
        "[B, heads, T, head_dim])\n"
        "      - return x * cos + rot * sin", "interleaved rope"),
    # the halves' cos and sin concatenated after the cos: concat([cos(f), cos(f)], -1)
    "concat-after-cos": (
        "      - return concat([cos(freqs), cos(freqs)], -1), concat([sin(freqs), sin(freqs)], -1)",
        "- x1, x2 = split(x, 2, -1)\n"
        "      - return x * cos + concat([-x2, x1], -1) * sin", "rope"),
}


@pytest.mark.parametrize("form", list(_REPEATED_TABLES))
def test_rope_tables_repeated_after_their_cos_fuse(form, tmp_path, monkeypatch):
    """Full-width tables made by repeating cos(f) and sin(f) (GPT-J's repeat_interleave, or a
    concat of the halves' cos): canonicalize takes the repeat inside the cos, cos(repeat(f)),
    the same values bitwise, so RoPE fuses into the attention kernel (before: 'rope tables
    are not cos/sin of the same angles'), gradients and decode as the primitives'."""
    from conftest import assert_fused_model_matches, unit_init

    import lmc
    from lmc.driver import compile_model
    from lmc.runtime.module import LmcModel

    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    tables, rope, kind = _REPEATED_TABLES[form]
    old = "      - return cos(freqs), sin(freqs)"
    assert _HALF_YAML.count(old) == 1
    path = tmp_path / f"{form}.yaml"
    path.write_text(_HALF_YAML.replace(old, tables).replace("ROPE", rope))
    m = unit_init(lmc.load(str(path), seed=1))
    tri = lmc.load(str(path), backend="triton", seed=1)
    tri.load_state_dict(m.state_dict())
    recs = [r for r in tri.pattern_graph().meta["fusions"] if r["pass"] == "fuse_rope_attention"]
    assert [(r["status"], r["reason"]) for r in recs] == \
        [("fused", f"{kind} + causal attention, scale 0.1768")] * 2, recs
    raw_graph = compile_model(str(path), disable=["canonicalize"]).graph
    raw_recs = [r for r in fuse_rope_attention(raw_graph).meta["fusions"]
                if r["pass"] == "fuse_rope_attention"]
    assert len(raw_recs) == 2 and all(
        "rope tables are not cos/sin of the same angles" in r["reason"] for r in raw_recs)
    raw = LmcModel(raw_graph, seed=1)
    raw.load_state_dict(m.state_dict())
    gen = torch.Generator().manual_seed(6)
    for t in (1, 11, 23):
        ids = torch.randint(0, 64, (2, t), generator=gen)
        assert torch.equal(raw(ids), m(ids)), t
    ids = torch.randint(0, 64, (2, 11), generator=gen)
    assert_fused_model_matches(m, tri, ids, gen)


def test_broadcasts_of_a_table_keep_their_cos_inside():
    """Only a repeat of each entry along the last axis (and a concat along it) moves inside
    the cos: a table expanded over a batch or over a new leading axis keeps cos(a) computed
    once, at the table's size."""
    b = Builder({}, {})
    a = b.reshape(b.cast(b.iota(T), "f32"), [T, 1]) * b.reshape(
        b.const(torch.linspace(0.1, 1.0, D // 2)), [1, D // 2])
    c = b.cos(a)
    outs = {"batch": b.expand(b.reshape(c, [1, T, D // 2]), [B, T, D // 2]),
            "middle": b.reshape(b.expand(b.reshape(c, [T, 1, D // 2]), [T, 2, D // 2]),
                                [T, D]),
            "repeat": b.reshape(b.expand(b.reshape(c, [T, D // 2, 1]), [T, D // 2, 2]),
                                [T, D])}
    g = run_pipeline(Graph("g", b.nodes, {k: v.node for k, v in outs.items()}))
    assert [k for k in outs if g.outputs[k].op is Op.COS] == ["repeat"]
    assert all(n.type.shape[-1] == D // 2 for n in g.nodes if n.op is Op.COS and
               n is not g.outputs["repeat"])


@pytest.mark.parametrize("max_seq,rewritten", [(8, True), (12, False), (None, False)])
def test_a_table_sliced_to_t_is_rebuilt_only_over_at_least_max_seq_rows(max_seq, rewritten):
    """slice(cos(f(iota(8))), 0, 0, T) becomes cos(f(iota(T))) only where the model's max_seq
    is at most the table's 8 rows (the runtime refuses T > max_seq): a shorter table, or a
    graph with no max_seq, keeps its slice, folded, and a T past its end still fails rather
    than extending the table; a cos of an activation repeated per entry is not a table and
    keeps its cos inside."""
    b = Builder({}, {})
    x = b.input("x", [T, D], "f32")
    pos = b.reshape(b.cast(b.iota(8), "f32"), [8, 1]) * b.reshape(
        b.const(torch.linspace(0.1, 1.0, D)), [1, D])
    act = b.reshape(b.expand(b.reshape(b.cos(x), [T, D, 1]), [T, D, 2]), [T, 2 * D])
    outs = {"o": x * b.slice(b.cos(pos), 0, 0, T), "act": act}
    meta = {"config": {"max_seq": max_seq}} if max_seq else {}
    g = run_pipeline(Graph("g", b.nodes, {k: v.node for k, v in outs.items()}, meta))
    iotas = [n for n in g.nodes if n.op is Op.IOTA]
    assert ([str(n.type.shape[0]) for n in iotas] == ["T"]) == rewritten, iotas
    assert rewritten or any(n.op is Op.SLICE for n in g.nodes)
    assert g.outputs["act"].op is Op.RESHAPE       # cos(x) stays at x's size
    gen = torch.Generator().manual_seed(1)
    for t in (5, 8, 9):
        vals = {"x": torch.randn(t, D, generator=gen)}
        ctx = RefCtx(dims=bind_dims(g, vals))
        if t > 8 and not rewritten:
            with pytest.raises(RuntimeError):
                run_graph(g, vals, ctx)
            continue
        raw = run_pipeline(Graph("g", b.nodes, {k: v.node for k, v in outs.items()}, meta),
                           disable=["canonicalize"])
        if t <= 8:
            assert torch.equal(run_graph(g, vals, ctx)["o"], run_graph(raw, vals, ctx)["o"])


@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "meta-rope-gqa"])
def test_keys_transposed_straight_from_the_token_layout_fuse(rope, tmp_path, monkeypatch):
    """q @ permute(k, [0, 2, 3, 1]), k^T taken straight from [B, T, H, D] (older GPT-2 code
    splits the keys' heads so; here also after Meta's RoPE and kv repeat): canonicalize
    writes it as the heads permute then the transpose, the same view, so the attention fuses
    (before: declined, 'keys are not transposed from [B, H, S, D]'), RoPE and GQA inside it."""
    from conftest import assert_fused_model_matches, unit_init

    import lmc
    from lmc.driver import compile_model
    from lmc.runtime.module import LmcModel

    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    if rope:
        src = _META_YAML.replace("TABLE_BODY", _META_ROPES["rotate-half"][0]).replace(
            "ROPE", _META_ROPES["rotate-half"][1]).replace("KV", "2")
        want = "rope + causal GQA attention (4 heads, 2 kv), scale 0.25"
    else:
        src = _HALF_YAML.replace("ROPE", "- return x")
        want = "no rope: causal attention, scale 0.1768"
    for a, b in ((re.compile(r"- k = (?:transpose|permute)\((.*), (?:1, 2|\[0, 2, 1, 3\])\)"),
                  r"- kt = permute(\1, [0, 2, 3, 1])"),
                 (re.compile(r"q @ transpose\(k, -2, -1\)"), "q @ kt")):
        src, count = a.subn(b, src)
        assert count == 1, a
    src = re.sub(r" *- k = rope\(k, cos, sin\)\n", "", src)     # RoPE'd before, or none
    path = tmp_path / "kt.yaml"
    path.write_text(src)
    m = unit_init(lmc.load(str(path), seed=1))
    tri = lmc.load(str(path), backend="triton", seed=1)
    tri.load_state_dict(m.state_dict())
    recs = [r for r in tri.pattern_graph().meta["fusions"] if r["pass"] == "fuse_rope_attention"]
    assert [(r["status"], r["reason"]) for r in recs] == [("fused", want)] * 2, recs
    raw_graph = compile_model(str(path), disable=["canonicalize"]).graph
    raw_recs = [r for r in fuse_rope_attention(raw_graph).meta["fusions"]
                if r["pass"] == "fuse_rope_attention"]
    assert [(r["status"], r["reason"]) for r in raw_recs] == [
        ("declined", "keys are not transposed from [B, H, S, D]")] * 2, raw_recs
    raw = LmcModel(raw_graph, seed=1)
    raw.load_state_dict(m.state_dict())
    gen = torch.Generator().manual_seed(6)
    for t in (1, 11, 23):
        ids = torch.randint(0, 64, (2, t), generator=gen)
        want_logits = raw(ids)
        torch.testing.assert_close(m(ids), want_logits, rtol=0,
                                   atol=1e-6 * want_logits.abs().max().item())
    ids = torch.randint(0, 64, (2, 11), generator=gen)
    assert_fused_model_matches(m, tri, ids, gen)
