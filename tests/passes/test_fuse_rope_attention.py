"""fuse_rope_attention: hand-written RoPE + attention in primitives becomes one fused op whose
kernels (lmc/codegen/attention.py, in Triton's interpreter here) equal the primitives, forward
and gradients (through the op's fused backward); near misses say which condition failed."""
import json
import math
import os

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
    nomask = fuse_rope_attention(_attention(16, causal=False))
    assert [r["status"] for r in _records(nomask)] == ["fused"]   # non-causal still fuses
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, 2, T, 16], "f32") for n in "qkv")
    cos, sin = _tables(b, 16)
    s = q @ b.transpose(_rope_half(b, k, cos, sin, 16), -2, -1)          # k rotated, q not
    o = b.softmax(s, -1) @ v
    (r,) = _records(fuse_rope_attention(run_pipeline(Graph("a", b.nodes, {"o": o.node}))))
    assert r["status"] == "declined" and "k rotated in columns where q is not" in r["reason"]
    # kv heads tiled (query head h reads kv head h mod n_kv): the kernel cannot read that
    g = _variant(H=4, HKV=2, D=16, tiled=True)
    (r,) = _records(fuse_rope_attention(g))
    assert r["status"] == "declined" and "tiled" in r["reason"]
    # a table that depends on the input is not a position table: the attention fuses with
    # q and k as computed, and the record says why their RoPE did not join it
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, 2, T, 16], "f32") for n in "qkv")
    w = b.input("w", [T, 16], "f32")
    s = _rope_half(b, q, b.cos(w), b.sin(w), 16) @ b.transpose(_rope_half(
        b, k, b.cos(w), b.sin(w), 16), -2, -1)
    o = b.softmax(b.where(b.causal_mask(T, T), s, -float("inf")), -1) @ v
    (r,) = _records(fuse_rope_attention(run_pipeline(Graph("a", b.nodes, {"o": o.node}))))
    assert r["status"] == "fused" and r["reason"].startswith("no rope") and \
        "RoPE not matched: no [T, R] position table" in r["reason"]
    # q and k split differently along the head dim
    g = _variant(H=2, HKV=2, D=16, rot=8, k_rot=4)
    (r,) = _records(fuse_rope_attention(g))
    assert r["status"] == "declined" and "split alike" in r["reason"]


# -- the variants: GQA/MQA, partial rotary, MLA, interleaved pairs, a shared rotated K, XPos,
# base and position offset, each against the primitives (forward and every gradient)
def _tables_for(b, R, *, base=10000.0, offset=0, interleaved=False, n=None):
    n = T if n is None else n
    inv = b.const(torch.tensor([1.0 / base ** (2 * i / R) for i in range(R // 2)]))
    pos = b.cast(b.iota(n), "f32") + float(offset)
    ang = b.reshape(pos, [n, 1]) * b.reshape(inv, [1, R // 2])
    if interleaved:      # each angle twice, side by side: [T, R/2, 2] -> [T, R]
        a3 = b.reshape(ang, [n, R // 2, 1])
        ang = b.reshape(b.concat([a3, a3], -1), [n, R])
    else:
        ang = b.concat([ang, ang], -1)
    return b.cos(ang), b.sin(ang)


def _rope_any(b, x, cos, sin, interleaved):
    R = x.shape[-1]
    if not interleaved:
        x1, x2 = b.split(x, 2, -1)
        return x * cos + b.concat([-x2, x1], -1) * sin
    shape = list(x.shape)
    xp = b.reshape(x, shape[:-1] + [R // 2, 2])
    rot = b.concat([-b.slice(xp, -1, 1, 2), b.slice(xp, -1, 0, 1)], -1)
    return x * cos + b.reshape(rot, shape) * sin


def _gqa(b, x, H, tiled=False):
    Bq, h, t, d = x.shape
    if h == H:
        return x
    if tiled:
        return b.reshape(b.expand(b.reshape(x, [Bq, 1, h, t, d]), [Bq, H // h, h, t, d]),
                         [Bq, H, t, d])
    return b.reshape(b.expand(b.reshape(x, [Bq, h, 1, t, d]), [Bq, h, H // h, t, d]),
                     [Bq, H, t, d])


def _variant(H, HKV, D, *, rot=None, k_rot=None, interleaved=False, window=0, xpos=False,
             base=10000.0, offset=0, tiled=False, shared_k=False, mla=0, cap=None,
             alibi=None, causal=True, sinks=None, disable=()):
    """Attention written in primitives as a model file would: RoPE by hand on the first rot
    dims (partial rotary: concat(rope(x[..., :rot]), x[..., rot:])), k, v broadcast from
    HKV heads, XPos scaling, a shared rotated K read by two attentions (YOCO), or MLA
    (q = [q_C | rope(q_R)], k = [k_C | expand(rope(k_R))], mla = d_R); cap: (cap_inside,
    cap_outside) soft-caps the scores as tanh(s * (1 / cap_inside)) * cap_outside; alibi:
    ALiBi's bias written as "sub" (kpos - qpos), "neg" (-(qpos - kpos)), "abs"
    (-|qpos - kpos|) or "keys" (BLOOM's slopes * kpos alone); sinks: attention sinks as
    gpt-oss writes them (an input "sinks" concatenated to the scores as one more column,
    the softmax, the column sliced off), "head" one logit per head, "head-first" the same
    concatenated before the scores, "query" one per head and query (not a sink the kernels
    take). disable: pipeline passes left out."""
    b = Builder({}, {})
    rot = D if rot is None else rot
    k_rot = rot if k_rot is None else k_rot
    ins = {}
    if mla:
        for n, h, d in (("qc", H, D), ("qr", H, mla), ("kc", H, D), ("kr", 1, mla),
                        ("v", H, D)):
            ins[n] = b.input(n, [B, h, T, d], "f32")
        cos, sin = _tables_for(b, mla, base=base, offset=offset, interleaved=interleaved)
        q = b.concat([ins["qc"], _rope_any(b, ins["qr"], cos, sin, interleaved)], -1)
        kr = _rope_any(b, ins["kr"], cos, sin, interleaved)
        k = b.concat([ins["kc"], b.expand(kr, [B, H, T, mla])], -1)
        s = (q @ b.transpose(k, -2, -1)) * ((D + mla) ** -0.5)
        o = b.softmax(b.where(b.causal_mask(T, T, window=window), s, -float("inf")),
                      -1) @ ins["v"]
        return run_pipeline(Graph("mla", b.nodes, {"o": o.node}))
    names = ["q", "q2"] if shared_k else ["q"]
    for n in names:
        ins[n] = b.input(n, [B, H, T, D], "f32")
    ins["k"] = b.input("k", [B, HKV, T, D], "f32")
    ins["v"] = b.input("v", [B, HKV, T, D], "f32")
    if sinks:
        ins["sinks"] = b.input("sinks", [H] if sinks.startswith("head") else [H, T], "f32")
    cos, sin = _tables_for(b, rot, base=base, offset=offset, interleaved=interleaved) \
        if rot else (None, None)
    kcos, ksin = (cos, sin) if k_rot == rot else _tables_for(b, k_rot, base=base,
                                                             offset=offset)
    z = None
    if xpos:
        zeta = b.const(torch.tensor([(2 * i / rot + 0.4) / 1.4 for i in range(rot // 2)] * 2))
        z = b.exp(b.log(b.reshape(zeta, [1, rot])) * b.reshape(
            b.cast(b.iota(T), "f32"), [T, 1]) / 512.0)

    def rope(x, c, s_, r, scale_op=None):
        if r == 0:                          # no RoPE: positions come from elsewhere, or none
            return x
        if r == D:
            y = _rope_any(b, x, c, s_, interleaved)
            return y if scale_op is None else scale_op(y)
        xr, xp = b.split(x, [r, D - r], -1)
        y = _rope_any(b, xr, c, s_, interleaved)
        return b.concat([y if scale_op is None else scale_op(y), xp], -1)
    k = rope(ins["k"], kcos, ksin, k_rot, (lambda y: y / z) if xpos else None)
    outs = {}
    for n in names:
        q = rope(ins[n], cos, sin, rot, (lambda y: y * z) if xpos else None)
        s = (q @ b.transpose(_gqa(b, k, H, tiled), -2, -1)) * (D ** -0.5)
        if cap is not None:
            s = b.tanh(s * (1.0 / cap[0])) * cap[1]
        if alibi is not None:
            slopes = b.const(torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]
                                          ).reshape(H, 1, 1))
            pos = b.cast(b.iota(T), "f32")
            kp, qp = b.reshape(pos, [1, T]), b.reshape(pos, [T, 1])
            dist = {"sub": lambda: kp - qp, "neg": lambda: -(qp - kp),
                    "abs": lambda: -b.abs(qp - kp),
                    "keys": lambda: b.reshape(pos, [1, 1, T])}[alibi]()
            s = s + slopes * dist
        if causal:
            s = b.where(b.causal_mask(T, T, window=window), s, -float("inf"))
        if sinks:
            z = b.reshape(ins["sinks"], [1, H, T, 1] if sinks == "query" else [1, H, 1, 1])
            z = b.expand(z, [B, H, T, 1])
            if sinks == "head-first":
                p = b.slice(b.softmax(b.concat([z, s], -1), -1), -1, 1, T + 1)
            else:
                p = b.slice(b.softmax(b.concat([s, z], -1), -1), -1, 0, T)
        else:
            p = b.softmax(s, -1)
        o = p @ _gqa(b, ins["v"], H, tiled)
        outs[n.replace("q", "o")] = o.node
    return run_pipeline(Graph("attn", b.nodes, outs), disable=disable)


def _check_triton_equals_oracle(g, f, shapes, seed=0):
    """Forward and the gradients of every input under random cotangents: the triton program
    of the fused graph f against the primitives g run op by op. Returns the max abs errors."""
    gen = torch.Generator().manual_seed(seed)
    vals = {n: torch.randn(*s, generator=gen) for n, s in shapes.items()}
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)
    got = TritonProgram(f).run(vals, ctx)
    errs = {}
    for o in g.outputs:
        torch.testing.assert_close(got[o], want[o], rtol=1e-5, atol=1e-5)
        errs[o] = (got[o] - want[o]).abs().max().item()
    gys = {f"grad:{o}": torch.randn(*want[o].shape, generator=gen) for o in g.outputs}
    grads = []
    for graph, tri in ((g, False), (f, True)):
        prog = differentiate(graph, list(shapes))
        back = run_pipeline(prog.backward)
        fw = (TritonProgram(prog.forward).run if tri else
              (lambda b, c, gr=prog.forward: run_graph(gr, b, c)))(vals, ctx)
        bound = {s: fw[s] for s in prog.saved}
        bound.update(gys)
        if tri:
            kinds = [n.attrs["kind"] for n in TritonProgram(back, label="backward").graph.nodes
                     if n.op is Op.FUSED]
            assert kinds.count("rope_attention_bwd") == len(g.outputs)
            grads.append(TritonProgram(back, label="backward").run(bound, ctx))
        else:
            grads.append(run_graph(back, bound, ctx))
    for n in shapes:
        torch.testing.assert_close(grads[1][f"grad:{n}"], grads[0][f"grad:{n}"], rtol=1e-4,
                                   atol=1e-5)
        errs[f"d{n}"] = (grads[1][f"grad:{n}"] - grads[0][f"grad:{n}"]).abs().max().item()
    return errs


def _fused_records(g, n=1):
    f = fuse_rope_attention(g)
    recs = _records(f)
    assert [r["status"] for r in recs] == ["fused"] * n, recs
    assert sum(x.op is Op.FUSED for x in f.nodes) == n and not any(
        x.op is Op.SOFTMAX for x in f.nodes)
    return f, recs


TQ = 63


@pytest.mark.parametrize("H,HKV,D,window", [(4, 1, 32, 0), (4, 2, 64, 17), (4, 4, 32, 100)])
def test_gqa_mqa(H, HKV, D, window):
    g = _variant(H, HKV, D, window=window)
    f, (r,) = _fused_records(g)
    assert ("MQA" if HKV == 1 else "GQA" if HKV < H else "rope + causal") in r["reason"]
    fused = next(x for x in f.nodes if x.op is Op.FUSED)
    assert fused.inputs[1].type.shape[1] == HKV         # k, v read at n_kv heads
    _check_triton_equals_oracle(g, f, {"q": (1, H, TQ, D), "k": (1, HKV, TQ, D),
                                       "v": (1, HKV, TQ, D)})


@pytest.mark.parametrize("H,HKV,D,window", [(2, 2, 32, 0), (4, 1, 16, 5), (4, 2, 64, 100)])
def test_attention_without_rope_is_flash_attention(H, HKV, D, window):
    # learned or no positions (GPT-2, NoPE): the same kernels with no rotation, never T x T
    g = _variant(H, HKV, D, rot=0, window=window)
    f, (r,) = _fused_records(g)
    assert r["reason"].startswith("no rope: causal") and "rope +" not in r["reason"]
    fused = next(x for x in f.nodes if x.op is Op.FUSED)
    assert len(fused.inputs) == 3 and fused.inputs[1].type.shape[1] == HKV   # q, k, v only
    _check_triton_equals_oracle(g, f, {"q": (1, H, TQ, D), "k": (1, HKV, TQ, D),
                                       "v": (1, HKV, TQ, D)})


@pytest.mark.parametrize("form", ["sub", "neg", "abs"])
def test_alibi(form):
    # ALiBi as BLOOM/MPT code writes it, in three spellings of the distance, with GQA and a
    # window: the kernels add slope_h * (kpos - qpos) to the scores
    g = _variant(4, 2, 32, rot=0, window=20, alibi=form)
    f, (r,) = _fused_records(g)
    assert r["reason"] == "no rope: causal window 20 GQA attention (4 heads, 2 kv) with ALiBi, " \
        "scale 0.1768"
    _check_triton_equals_oracle(g, f, {"q": (1, 4, TQ, 32), "k": (1, 2, TQ, 32),
                                       "v": (1, 2, TQ, 32)})


def test_alibi_bloom_form_and_near_misses():
    # BLOOM writes slopes * kpos alone (the same probabilities; the kernels add the same and
    # their lse is the body's); -|i - j| is j - i only where a causal mask keeps j <= i
    g = _variant(4, 2, 32, rot=0, alibi="keys")
    f, (r,) = _fused_records(g)
    assert r["reason"].endswith("with ALiBi (slopes * key position), scale 0.1768")
    _check_triton_equals_oracle(g, f, {"q": (1, 4, TQ, 32), "k": (1, 2, TQ, 32),
                                       "v": (1, 2, TQ, 32)})
    (r,) = _records(fuse_rope_attention(_variant(4, 4, 16, rot=0, alibi="abs", causal=False)))
    assert r["status"] == "declined" and "ALiBi" in r["reason"], r


def test_soft_capped_scores():
    # Gemma 2's cap * tanh(s / cap), here as tanh(s * (1 / cap)) * cap (test_examples.py has
    # the s / cap spelling): a cap of 1.5 saturates, so its derivative shows in the gradients
    g = _variant(4, 2, 32, rot=16, window=20, cap=(1.5, 1.5))
    f, (r,) = _fused_records(g)
    assert "soft-capped at 1.5" in r["reason"]
    fused = next(x for x in f.nodes if x.op is Op.FUSED)
    assert fused.attrs["body"].meta["options"]["softcap"] == pytest.approx(1.5)
    _check_triton_equals_oracle(g, f, {"q": (1, 4, TQ, 32), "k": (1, 2, TQ, 32),
                                       "v": (1, 2, TQ, 32)})
    # caps inside and outside tanh that differ are not a soft cap
    (r,) = _records(fuse_rope_attention(_variant(4, 2, 32, cap=(1.5, 2.0))))
    assert r["status"] == "declined" and "tanh where q @ k^T was expected" in r["reason"]


@pytest.mark.parametrize("rot,window,causal,sinks", [(32, 20, True, "head"),
                                                     (0, 0, False, "head"),
                                                     (32, 0, True, "head-first")],
                         ids=["rope-gqa-window", "no-rope-not-causal", "sink-first"])
def test_attention_sinks(rot, window, causal, sinks):
    """gpt-oss's sinks (a logit per head joining each row's softmax), after the scores or
    before them (the sink-first form was left as written, unfused): the pipeline writes the
    concat/softmax/slice as softmax(s) * sigmoid(logsumexp(s) - z), equal to it; the kernels
    take the sinks as an input, and their gradient matches the primitives'."""
    shapes = {"q": (2, 4, TQ, 32), "k": (2, 2, TQ, 32), "v": (2, 2, TQ, 32), "sinks": (4,)}
    g = _variant(4, 2, 32, rot=rot, window=window, causal=causal, sinks=sinks)
    assert not any(n.type.rank == 4 and n.type.shape[-1] == T + 1
                   for n in g.nodes)                           # no [.., T, T + 1] scores
    assert any(n.type.shape[-1] == T + 1 for n in _variant(
        4, 2, 32, sinks=sinks, disable=["canonicalize"]).nodes if n.type.rank == 4)
    raw = _variant(4, 2, 32, rot=rot, window=window, causal=causal, sinks=sinks,
                   disable=["canonicalize"])
    gen = torch.Generator().manual_seed(2)
    vals = {n: torch.randn(*sh, generator=gen) * (3.0 if n == "sinks" else 1.0)
            for n, sh in shapes.items()}
    ctx = RefCtx(dims=bind_dims(g, vals))
    torch.testing.assert_close(run_graph(g, vals, ctx)["o"], run_graph(raw, vals, ctx)["o"],
                               rtol=1e-5, atol=1e-6)
    f, (r,) = _fused_records(g)
    assert r["reason"].endswith("with attention sinks, scale 0.1768"), r
    errs = _check_triton_equals_oracle(g, f, shapes, seed=3)
    assert errs["dsinks"] < 1e-4


def test_sinks_that_vary_by_query_are_declined():
    (r,) = _records(fuse_rope_attention(_variant(4, 2, 32, sinks="query")))
    assert r["status"] == "declined" and "not one logit per head" in r["reason"], r


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_both_layouts(interleaved):
    g = _variant(4, 2, 32, rot=16, interleaved=interleaved, window=9)
    f, (r,) = _fused_records(g)
    assert "on 16 of 32 dims" in r["reason"]
    assert ("interleaved" in r["reason"]) == interleaved
    _check_triton_equals_oracle(g, f, {"q": (1, 4, TQ, 32), "k": (1, 2, TQ, 32),
                                       "v": (1, 2, TQ, 32)})


def test_hand_written_rope_in_both_layouts_fuses():
    for rope in (_rope_half, _rope_pairs):
        f, (r,) = _fused_records(_attention(16, rope=rope))
        assert ("interleaved" in r["reason"]) == (rope is _rope_pairs)


def test_interleaved_whole_head():
    g = _attention(32, rope=_rope_pairs, window=0)
    f, _ = _fused_records(g)
    _check_triton_equals_oracle(g, f, {n: (2, 2, TQ, 32) for n in "qkv"})


def test_mla_decoupled_rope():
    g = _variant(4, 4, 32, mla=16)
    f, (r,) = _fused_records(g)
    assert "decoupled" in r["reason"]
    _check_triton_equals_oracle(g, f, {"qc": (1, 4, TQ, 32), "qr": (1, 4, TQ, 16),
                                       "kc": (1, 4, TQ, 32), "kr": (1, 1, TQ, 16),
                                       "v": (1, 4, TQ, 32)})


def test_shared_rotated_k_cross_attention():
    # one rotated K (and V) read by two attentions, as YOCO's cross-decoder: each attention
    # fuses with q's RoPE only; the shared RoPE of K stays outside, computed once
    g = _variant(4, 2, 32, shared_k=True)
    f, recs = _fused_records(g, 2)
    assert all("q only" in r["reason"] for r in recs)
    assert sum(x.op is Op.ADD and x.type.rank == 4 for x in f.nodes) == 1   # K's rope, once
    _check_triton_equals_oracle(g, f, {"q": (1, 4, TQ, 32), "q2": (1, 4, TQ, 32),
                                       "k": (1, 2, TQ, 32), "v": (1, 2, TQ, 32)})


def test_xpos_base_and_offset():
    g = _variant(2, 1, 32, rot=16, xpos=True, base=500000.0, offset=7)
    f, (r,) = _fused_records(g)
    assert "xpos" in r["reason"]
    _check_triton_equals_oracle(g, f, {"q": (1, 2, TQ, 32), "k": (1, 1, TQ, 32),
                                       "v": (1, 1, TQ, 32)})


# -- the zoo: one fused rope-attention per attention layer at the default sizes
ZOO_COUNTS = [("llama", {}, 12, 0), ("blues01", {}, 12, 0), ("minimax", {}, 2, 0),
              ("minimax", {"xpos": 1}, 2, 0), ("optimus_prime", {}, 8, 0),
              ("yoco", {}, 12, 0), ("yoco", {"sliding_window": 64}, 24, 0),
              ("medit_one", {}, 0, 32)]


@pytest.mark.parametrize("model,overrides,fused,declined", ZOO_COUNTS)
def test_zoo_counts(model, overrides, fused, declined):
    from conftest import ZOO

    from lmc.driver import compile_model

    c = compile_model(os.path.join(ZOO, f"{model}.yaml"), None, overrides)
    recs = _records(fuse_rope_attention(c.graph))
    assert sum(r["status"] == "fused" for r in recs) == fused, recs
    assert sum(r["status"] == "declined" for r in recs) == declined, recs
    if model == "medit_one":     # attention across the features of one token: not matched
        assert all("not attention across positions" in r["reason"] for r in recs)


@pytest.mark.parametrize("model,sets,n", [("blues01", [], 2), ("minimax", [], 1),
                                          ("optimus_prime", [], 2), ("yoco", [], 1),
                                          ("yoco", ["sliding_window=8"], 2)])
def test_compile_kernel_kinds(model, sets, n, capsys):
    # `lmc compile --json` (tiny presets): each attention layer is one fused forward kernel
    # and one fused backward kernel, and the fusions list says so
    from conftest import ZOO

    from lmc.cli import main

    args = ["compile", os.path.join(ZOO, f"{model}.yaml"), "--preset", "tiny", "--json"]
    for kv in sets:
        args += ["--set", kv]
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out)
    fw, bw = s["kernels"]["forward"]["list"], s["kernels"]["backward"]["list"]
    assert sum(k["kind"] == "rope_attention" for k in fw) == n
    assert sum(k["kind"] == "rope_attention_bwd" for k in bw) == n
    rope = [f for f in s["fusions"] if f["pass"] == "fuse_rope_attention"]
    assert len(rope) == n and all(f["status"] == "fused" for f in rope)


def test_region_value_that_is_a_graph_output_is_not_fused_away():
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, 2, T, 16], "f32") for n in "qkv")
    cos, sin = _tables(b, 16)
    s = _rope_half(b, q, cos, sin, 16) @ b.transpose(_rope_half(b, k, cos, sin, 16), -2, -1)
    p = b.softmax(b.where(b.causal_mask(T, T), s * 0.25, -float("inf")), -1)
    g = run_pipeline(Graph("a", b.nodes, {"o": (p @ v).node, "p": p.node}))
    (r,) = _records(fuse_rope_attention(g))
    assert r["status"] == "declined" and "used once" in r["reason"]
    g = run_pipeline(Graph("a", b.nodes, {"o": (p @ v).node, "s": s.node}))
    (r,) = _records(fuse_rope_attention(g))
    assert r["status"] == "declined" and "also used outside" in r["reason"]


def test_rope_written_other_ways():
    # interleaved pairs through step-2 slices (rot = (-x[1::2], x[0::2]) stacked pairwise,
    # the minus inside or outside the reshape) and [1, 1, T, D] tables
    D = 32

    def rope_steps(b, x, cos, sin, neg_inside):
        shape = list(x.shape)
        odd, even = b.slice(x, -1, 1, D, 2), b.slice(x, -1, 0, D, 2)
        col = shape[:-1] + [D // 2, 1]
        a = b.reshape(-odd, col) if neg_inside else -b.reshape(odd, col)
        rot = b.reshape(b.concat([a, b.reshape(even, col)], -1), shape)
        return x * cos + rot * sin
    for neg_inside in (False, True):
        b = Builder({}, {})
        q, k, v = (b.input(n, [B, 2, T, D], "f32") for n in "qkv")
        cos, sin = _tables_for(b, D, interleaved=True)
        cos, sin = b.reshape(cos, [1, 1, T, D]), b.reshape(sin, [1, 1, T, D])
        s = rope_steps(b, q, cos, sin, neg_inside) @ b.transpose(
            rope_steps(b, k, cos, sin, neg_inside), -2, -1)
        o = b.softmax(b.where(b.causal_mask(T, T), s * D ** -0.5, -float("inf")), -1) @ v
        g = run_pipeline(Graph("a", b.nodes, {"o": o.node}))
        f, (r,) = _fused_records(g)
        assert "interleaved" in r["reason"]
    _check_triton_equals_oracle(g, f, {n: (1, 2, TQ, D) for n in "qkv"})


def test_whole_input_gradients_are_written_by_the_kernels(monkeypatch):
    """q, k, v each one whole input of the fused op: the backward kernels write their
    gradient outputs themselves (no fp32 accumulation buffer, no copy); pieces of inputs each
    read once (MLA's q_C | q_R, the shared k_R summed over its heads) are copied into their
    outputs, with no fp32 accumulation either; equal to the oracle. An input read by two
    operands is never written directly (the layout rule below)."""
    from lmc.codegen import attention as A
    calls = []
    real = A._scatter_grad
    monkeypatch.setattr(A, "_scatter_grad", lambda *a: calls.append(1) or real(*a))
    g = _attention(32, rope=_rope_pairs, window=0)
    f, _ = _fused_records(g)
    _check_triton_equals_oracle(g, f, {n: (2, 2, TQ, 32) for n in "qkv"})
    assert calls == []
    g = _variant(4, 4, 32, mla=16)
    f, _ = _fused_records(g)
    _check_triton_equals_oracle(g, f, {"qc": (1, 4, TQ, 32), "qr": (1, 4, TQ, 16),
                                       "kc": (1, 4, TQ, 32), "kr": (1, 1, TQ, 16),
                                       "v": (1, 4, TQ, 32)})
    assert calls == []
    x = torch.zeros(1, 2, 3, 4)
    lay = [[[0, 0, 4, 1]], [[0, 0, 4, 1]], [[1, 0, 4, 1]]]     # q and k read one input
    outs = [torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)]
    assert A._direct_grad(lay, 0, [x, x], outs, 2, x) is None
    assert A._direct_grad(lay, 2, [x, x], outs, 2, x) is outs[1]
    assert A._direct_grad(lay, 2, [x, x], outs, 1, x) is None      # no gradient wanted
    assert A._direct_grad(lay, 2, [x, x], [outs[0], outs[1].half()], 2, x) is None
    split = [[[0, 0, 1, 1], [0, 1, 4, 1]], [[1, 0, 4, 1]], [[2, 0, 4, 1]]]  # rotated | passed
    assert A._direct_grad(split, 0, [x, x, x], outs + [x], 3, x) is outs[0]
    gap = [[[0, 0, 1, 1], [0, 2, 4, 1]], [[1, 0, 4, 1]], [[2, 0, 4, 1]]]
    assert A._direct_grad(gap, 0, [x, x, x], outs + [x], 3, x) is None


def test_q_and_k_slices_of_one_input_accumulate_into_its_gradient(monkeypatch):
    """q and k two column ranges of one input (a fused q|k projection): that input's
    gradient is the sum of both pieces, accumulated in fp32 (the one path that still needs
    it); equal to the oracle."""
    from lmc.codegen import attention as A
    calls = []
    real = A._scatter_grad
    monkeypatch.setattr(A, "_scatter_grad", lambda *a: calls.append(1) or real(*a))
    D = 16
    b = Builder({}, {})
    qk = b.input("qk", [B, 2, T, 2 * D], "f32")
    v = b.input("v", [B, 2, T, D], "f32")
    q, k = b.slice(qk, -1, 0, D), b.slice(qk, -1, D, 2 * D)
    cos, sin = _tables(b, D)
    s = _rope_half(b, q, cos, sin, D) @ b.transpose(_rope_half(b, k, cos, sin, D), -2, -1)
    s = b.where(b.causal_mask(T, T), s * (1.0 / math.sqrt(D)), -float("inf"))
    g = run_pipeline(Graph("attn", b.nodes, {"o": (b.softmax(s, -1) @ v).node}))
    f, _ = _fused_records(g)
    _check_triton_equals_oracle(g, f, {"qk": (2, 2, TQ, 2 * D), "v": (2, 2, TQ, D)})
    assert calls


# -- a constant scale on q or k before the product (`(q * d ** -0.5) @ k^T`, rope(q * c),
# q / c, both by d ** -0.25) is a scale of the scores: it joins the kernel's
@pytest.mark.parametrize("form,H,HKV,rot", [
    ("after", 2, 2, 32), ("before", 2, 2, 32), ("div", 2, 2, 32), ("k", 2, 2, 32),
    ("both", 2, 2, 32), ("k-transposed", 2, 2, 32), ("after", 2, 2, 16), ("before", 2, 2, 16),
    ("k", 4, 1, 32), ("before", 4, 2, 32), ("none-after", 2, 2, 0)])
def test_a_constant_scale_on_q_or_k_joins_the_kernels_scale(form, H, HKV, rot):
    """Written so, RoPE'd attention declined ('k rotated in columns where q is not', with
    partial rotary 'q and k are not split alike'), which was untrue."""
    D = 32
    c = D ** -0.5
    b = Builder({}, {})
    q = b.input("q", [B, H, T, D], "f32")
    k, v = (b.input(n, [B, HKV, T, D], "f32") for n in "kv")
    cos, sin = _tables_for(b, rot) if rot else (None, None)

    def rope(x):
        if not rot:
            return x
        if rot == D:
            return _rope_any(b, x, cos, sin, False)
        xr, xp = b.split(x, [rot, D - rot], -1)
        return b.concat([_rope_any(b, xr, cos, sin, False), xp], -1)
    qs, ks = {"after": (rope(q) * c, rope(k)), "none-after": (rope(q) * c, rope(k)),
              "before": (rope(q * c), rope(k)), "div": (rope(q) / D ** 0.5, rope(k)),
              "k": (rope(q), rope(k) * c), "both": (rope(q) * c ** 0.5, rope(k) * c ** 0.5),
              "k-transposed": (rope(q), rope(k))}[form]
    kt = b.transpose(_gqa(b, ks, H), -2, -1)
    if form == "k-transposed":
        kt = kt * c
    s = b.where(b.causal_mask(T, T), qs @ kt, -float("inf"))
    o = b.softmax(s, -1) @ _gqa(b, v, H)
    g = run_pipeline(Graph("a", b.nodes, {"o": o.node}))
    f, (r,) = _fused_records(g)
    (op,) = [n for n in f.nodes if n.op is Op.FUSED]
    assert math.isclose(op.attrs["body"].meta["options"]["scale"], c, rel_tol=1e-6)
    assert r["reason"].startswith("rope" if rot else "no rope") and "scale 0.1768" in r["reason"]
    if form == "before":            # the op reads q itself, not q * c
        assert op.inputs[0].op is Op.INPUT
    _check_triton_equals_oracle(g, f, {"q": (1, H, 21, D), "k": (1, HKV, 21, D),
                                       "v": (1, HKV, 21, D)})


@pytest.mark.parametrize("case", ["q-shared", "q-output", "k-shared"])
def test_a_scaled_q_or_k_read_elsewhere_still_fuses_with_it_as_input(case):
    """A scaled q (or k) read outside the attention too (two attentions sharing it, or an
    output of the graph) cannot be taken inside the op: the match falls back to the scaled
    tensor as the op's input (scale 1), as before the scale was folded (it declined:
    'also used outside')."""
    D = 16
    c = D ** -0.5
    b = Builder({}, {})
    q, k, v, w = (b.input(n, [B, 2, T, D], "f32") for n in ("q", "k", "v", "w"))
    outs = {}
    if case == "k-shared":
        ks = k * c
        pairs = [(q, ks), (w, ks)]
    else:
        qs = q * c
        pairs = [(qs, k), (qs, w)] if case == "q-shared" else [(qs, k)]
        if case == "q-output":
            outs["qs"] = qs.node
    for i, (a, kk) in enumerate(pairs):
        s = b.where(b.causal_mask(T, T), a @ b.transpose(kk, -2, -1), -float("inf"))
        outs[f"o{i}"] = (b.softmax(s, -1) @ v).node
    g = run_pipeline(Graph("a", b.nodes, outs))
    n = len(pairs)
    f = fuse_rope_attention(g)
    recs = _records(f)
    assert [r["status"] for r in recs] == ["fused"] * n, recs
    for op in (x for x in f.nodes if x.op is Op.FUSED):
        assert op.attrs["body"].meta["options"]["scale"] == 1.0
    gen = torch.Generator().manual_seed(3)
    vals = {x: torch.randn(1, 2, 13, D, generator=gen) for x in ("q", "k", "v", "w")}
    ctx = RefCtx(dims=bind_dims(g, vals))
    want, got = run_graph(g, vals, ctx), TritonProgram(f).run(vals, ctx)
    for o in g.outputs:
        torch.testing.assert_close(got[o], want[o], rtol=1e-5, atol=1e-5)


def test_a_tensor_scale_on_q_is_named_in_the_record():
    """q multiplied by a per-head tensor after its RoPE is no kernel scale: declined, and the
    record says so (whole-head and partial rotary)."""
    for rot in (16, 8):
        b = Builder({}, {})
        q, k, v = (b.input(n, [B, 2, T, 16], "f32") for n in "qkv")
        w = b.input("w", [1, 2, 1, 1], "f32")
        cos, sin = _tables_for(b, rot)

        def rope(x):
            if rot == 16:
                return _rope_any(b, x, cos, sin, False)
            xr, xp = b.split(x, [rot, 16 - rot], -1)
            return b.concat([_rope_any(b, xr, cos, sin, False), xp], -1)
        s = (rope(q) * w) @ b.transpose(rope(k), -2, -1)
        o = b.softmax(b.where(b.causal_mask(T, T), s, -float("inf")), -1) @ v
        (r,) = _records(fuse_rope_attention(run_pipeline(Graph("a", b.nodes,
                                                               {"o": o.node}))))
        assert r["status"] == "declined" and \
            "q is multiplied by a [1, 2, 1, 1] tensor before the product" in r["reason"]
        if rot == 8:
            assert "q in parts [16], k in [8, 8]" in r["reason"]


# -- the same from a model file: attention as other code bases write it fuses in training
# (triton forward and gradients = the primitives) and in the decode step (decode = forward)
_FORMS_YAML = """
name: forms
config: {vocab: 64, d: 64, layers: 2, heads: 2, head_dim: d / heads, rot: ROT, max_seq: 32}
blocks:
  rope_tables:
    args: []
    body:
      - inv_freq = 1.0 / 10000 ** (cast(iota(rot / 2), 'f32') * 2 / rot)
      - freqs = reshape(cast(iota(T), 'f32'), [T, 1]) * reshape(inv_freq, [1, rot / 2])
      - emb = concat([freqs, freqs], -1)
      - return cos(emb), sin(emb)
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
      - SCORES
      - PROBS
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
_WHOLE = "- x1, x2 = split(x, 2, -1)\n      - return x * cos + concat([-x2, x1], -1) * sin"
_PARTIAL = ("- xr, xp = split(x, [rot, head_dim - rot], -1)\n      - x1, x2 = split(xr, 2, -1)\n"
            "      - return concat([xr * cos + concat([-x2, x1], -1) * sin, xp], -1)")
_SCALED = "scores = (q @ transpose(k, -2, -1)) * head_dim ** -0.5"
_MASKED = "probs = softmax(where(causal_mask(T), scores, -inf), -1)"
_FORMS = {
    "additive-mask": (_WHOLE, 32, _SCALED,
                      "probs = softmax(scores + where(causal_mask(T), 0.0, -inf), -1)"),
    "additive-mask-4d": (_WHOLE, 32, _SCALED, "probs = softmax(reshape(where(causal_mask(T), "
                                              "0.0, -inf), [1, 1, T, T]) + scores, -1)"),
    "prescaled-q": (_WHOLE, 32, "scores = (q * head_dim ** -0.5) @ transpose(k, -2, -1)",
                    _MASKED),
    "prescaled-q-partial-rotary": (_PARTIAL, 16, "scores = (q * head_dim ** -0.5) @ "
                                                 "transpose(k, -2, -1)", _MASKED),
}


@pytest.mark.parametrize("form", list(_FORMS))
def test_attention_as_other_code_bases_write_it_fuses_in_training_and_decode(form, tmp_path):
    """An additive causal mask (s + where(causal_mask(T), 0.0, -inf), Hugging Face's; before:
    'scores plus a term that is not ALiBi's ...', and the decode step unfused) and q scaled
    before the product (before: 'k rotated in columns where q is not' / 'q and k are not
    split alike'): one rope_attention per layer, forward and gradients equal to the
    primitives (within 1e-6 and 1e-5 of the largest, the weights drawn at unit scale so that
    RoPE moves the logits), the passes equal to the model as written, and one
    decode_attention per layer in the dynamic and the static step, decode = forward."""
    from conftest import assert_fused_model_matches, unit_init

    import lmc
    from lmc.driver import compile_model
    from lmc.runtime.module import LmcModel

    rope, rot, scores, probs = _FORMS[form]
    path = tmp_path / f"{form}.yaml"
    path.write_text(_FORMS_YAML.replace("ROPE", rope).replace("ROT", str(rot))
                    .replace("SCORES", scores).replace("PROBS", probs))
    m = unit_init(lmc.load(str(path), seed=1))      # scores O(1): RoPE moves the logits
    tri = lmc.load(str(path), backend="triton", seed=1)
    tri.load_state_dict(m.state_dict())
    recs = _records(tri.pattern_graph())
    assert [r["status"] for r in recs] == ["fused"] * 2, recs
    assert not any(n.op is Op.SOFTMAX for n in tri.pattern_graph().nodes)
    assert all(r["reason"].startswith("rope" + (" on 16 of 32 dims" if rot == 16 else "")) and
               r["reason"].endswith("causal attention, scale 0.1768") for r in recs), recs
    # the passes (canonicalize's rewrite) equal the model as written
    raw = LmcModel(compile_model(str(path), disable=["canonicalize"]).graph, seed=1)
    raw.load_state_dict(m.state_dict())
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (2, 11), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(raw(ids), m(ids), rtol=0, atol=0)
    # triton (the fused kernels) = the primitives, forward and gradients, and the decode
    # step: fused over the cache, decode = forward
    assert_fused_model_matches(m, tri, ids, gen)
