"""fuse_rope_attention: hand-written RoPE + attention in primitives becomes one fused op whose
kernels (lmc/codegen/attention.py, in Triton's interpreter here) equal the primitives, forward
and gradients (through the op's fused backward); near misses say which condition failed."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.passes import run_pipeline
from lmc.passes.autodiff import differentiate
from lmc.passes.fuse_rope_attention import fuse_rope_attention
from lmc.runtime.executor import bind_dims, run_graph
from lmc.runtime.triton_backend import TritonProgram

B, T = Dim.sym("B"), Dim.sym("T")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _tables(b, D):
    inv = b.const(torch.tensor([1.0 / 10000 ** (2 * i / D) for i in range(D // 2)]))
    ang = b.reshape(b.cast(b.iota(T), "f32"), [T, 1]) * b.reshape(inv, [1, D // 2])
    ang = b.concat([ang, ang], -1)
    return b.cos(ang), b.sin(ang)


def _rope_half(b, x, cos, sin, D):
    rot = b.concat([-b.slice(x, 3, D // 2, D), b.slice(x, 3, 0, D // 2)], -1)
    return x * cos + rot * sin


def _rope_pairs(b, x, cos, sin, D):     # interleaved pairs (x0, x1) -> (-x1, x0)
    xr = b.reshape(x, [B, 2, T, D // 2, 2])
    rot = b.concat([-b.slice(xr, 4, 1, 2), b.slice(xr, 4, 0, 1)], -1)
    return x * cos + b.reshape(rot, [B, 2, T, D]) * sin


def _attention(D, window=0, causal=True, rope=_rope_half):
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, 2, T, D], "f32") for n in "qkv")
    cos, sin = _tables(b, D)
    s = rope(b, q, cos, sin, D) @ b.transpose(rope(b, k, cos, sin, D), -2, -1)
    s = s * (1.0 / math.sqrt(D))
    if causal:
        s = b.where(b.causal_mask(T, T, window=window), s, -float("inf"))
    o = b.softmax(s, -1) @ v
    return run_pipeline(Graph("attn", b.nodes, {"o": o.node}))


def _records(g):
    return [f for f in g.meta["fusions"] if f["pass"] == "fuse_rope_attention"]


@settings(max_examples=6, deadline=None)
@given(D=st.sampled_from([16, 32]), t=st.sampled_from([1, 13, 33]),
       window=st.sampled_from([0, 5, 40]), seed=st.integers(0, 100))
def test_fused_equals_primitives_forward_and_gradients(D, t, window, seed):
    g = _attention(D, window)
    f = fuse_rope_attention(g)
    assert [r["status"] for r in _records(f)] == ["fused"]
    assert sum(n.op is Op.FUSED for n in f.nodes) == 1 and not any(
        n.op is Op.SOFTMAX for n in f.nodes)
    gen = torch.Generator().manual_seed(seed)
    vals = {n: torch.randn(2, 2, t, D, generator=gen) for n in "qkv"}
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)["o"]
    got = TritonProgram(f).run(vals, ctx)["o"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # gradients: the oracle differentiates the primitives; the fused graph's backward is the
    # fused backward op (its kernel recomputes the forward and runs dQ, dK, dV)
    gy = torch.randn(2, 2, t, D, generator=gen)
    grads = []
    for graph, tri in ((g, False), (f, True)):
        prog = differentiate(graph, ["q", "k", "v"])
        back = run_pipeline(prog.backward)
        fw = (TritonProgram(prog.forward).run if tri else
              (lambda b, c, gr=prog.forward: run_graph(gr, b, c)))(vals, ctx)
        bound = {s: fw[s] for s in prog.saved}
        bound["grad:o"] = gy
        run = TritonProgram(back, label="backward").run if tri else (
            lambda b, c, gr=back: run_graph(gr, b, c))
        grads.append(run(bound, ctx))
    if tri:
        kinds = {n.attrs["kind"] for n in TritonProgram(back).graph.nodes if n.op is Op.FUSED}
        assert "rope_attention_bwd" in kinds
    for k in ("grad:q", "grad:k", "grad:v"):
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5)


def test_near_misses_say_why():
    pairs = fuse_rope_attention(_attention(16, rope=_rope_pairs))
    (r,) = _records(pairs)
    assert r["status"] == "declined" and "rotate_half" in r["reason"]
    nomask = fuse_rope_attention(_attention(16, causal=False))
    assert [r["status"] for r in _records(nomask)] == ["fused"]   # non-causal still fuses
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, 2, T, 16], "f32") for n in "qkv")
    o = b.softmax(q @ b.transpose(k, -2, -1), -1) @ v                   # no rope at all
    (r,) = _records(fuse_rope_attention(run_pipeline(Graph("a", b.nodes, {"o": o.node}))))
    assert r["status"] == "declined" and r["reason"]
