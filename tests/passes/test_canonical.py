"""canonicalize: differential attention, (softmax(s1) - lam * softmax(s2)) @ v, is written as
two attentions (equal values, both then fused); a factor that varies along the keys is not
a row scale and is left alone. (Attention sinks: tests/passes/test_fuse_rope_attention.py.)"""
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
