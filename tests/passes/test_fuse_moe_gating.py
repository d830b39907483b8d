"""fuse_moe_gating: a router written in primitives (the zoo's one-hot and scatter spellings,
noise, capacity, z-loss) becomes one fused gating op whose kernels (lmc/codegen/moe.py, in
Triton's interpreter here) equal the primitives, forward and gradients (through the op's
fused backward); ties in top-k go to the lower expert as in the oracle; near misses say why."""
import json

import pytest
import torch

from lmc.cli import main
from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.passes import run_pipeline
from lmc.passes.autodiff import differentiate
from lmc.passes.fuse_moe_gating import fuse_moe_gating
from lmc.passes.mixed_precision import mixed_precision
from lmc.runtime.executor import bind_dims, run_graph
from lmc.runtime.triton_backend import TritonProgram

B, T = Dim.sym("B"), Dim.sym("T")
D, F = 16, 24


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _router(E, k, *, form="one-hot", cap=None, noise=0.0, renorm=True, z=False,
            softmax=True, experts=None, bias=False, groups=None, seqbal=False):
    """The zoo's router on x [B, T, d] with weight w [d, E]; outputs the combine weights (or,
    with experts="silu"/"gelu", the dense gated-FFN experts combined with them, as blues01 and
    minimax write it) and the statistics the zoo's aux losses read."""
    b = Builder({}, {})
    x = b.input("x", [B, T, D], "f32")
    w = b.input("w", [D, E], "f32")
    logits = x @ w
    if noise:
        logits = b.node(Op.GAUSSIAN_NOISE, [logits, b.const(77, "i64")], {"std": noise})
    probs = b.softmax(logits, -1) if softmax else b.sigmoid(logits)
    # bias: DeepSeek-V3's balancing bias, it picks the experts and does not weigh them
    score = probs + b.input("bias", [E], "f32") if bias else probs
    if groups is not None:
        score = _group_limit(b, score, E, *groups)
    top = b.node(Op.TOPK, [score], {"k": k, "axis": -1})
    outs = {}
    if form == "one-hot":
        r = b.reshape(top, [B, T, k, 1])
        chosen = b.sum(b.cast(b.eq(r, b.iota(E)), "f32"), 2, keepdim=False)
        gates = probs * chosen
        if renorm:
            gates = gates / b.sum(gates, -1)
        kept = chosen
        if cap is not None:
            pos = b.cast(b.cumsum(chosen, 1), "i64")
            budget = b.reshape((b.iota(T) + 1) * (cap * k), [T, 1])
            kept = chosen * b.cast((pos - 1) * (E * 100) < budget, "f32")
            gates = gates * kept
        f = b.reshape(b.mean(b.reshape(chosen, [B * T, E]), 0), [E]) / k
        p = b.reshape(b.mean(b.reshape(probs, [B * T, E]), 0), [E])
        outs["lb"] = E * b.sum(f * p, 0, keepdim=False)
        outs["tokens"] = b.sum(b.reshape(kept, [B * T, E]), 0)
        if seqbal:   # DeepSeek-V3's sequence-wise balance loss: picks x normalised scores
            pn = b.mean(probs / b.sum(probs, -1), 1)
            outs["seqbal"] = b.mean(b.reshape(b.sum(b.mean(chosen, 1) * pn, -1), [B]), 0,
                                    keepdim=False)
    else:
        kv = b.gather(probs, top, -1)
        if renorm:
            kv = kv / b.sum(kv, -1)
        gates = b.scatter_add(probs * 0.0, top, kv, -1)
    if z:
        lz = b.reshape(b.logsumexp(logits, -1), [B * T])
        outs["z"] = b.mean(lz * lz, 0, keepdim=False)
    if experts:
        wg, w1 = b.input("wg", [E, D, F], "f32"), b.input("w1", [E, D, F], "f32")
        w2 = b.input("w2", [E, F, D], "f32")
        xe = b.reshape(x, [B, 1, T, D])
        a = xe @ wg
        ye = ((b.silu(a) if experts == "silu" else b.gelu(a)) * (xe @ w1)) @ w2
        outs["y"] = b.sum(ye * b.reshape(b.permute(gates, [0, 2, 1]), [B, E, T, 1]), 1,
                          keepdim=False)
    else:
        outs["gates"] = gates
    return run_pipeline(Graph("router", b.nodes, {k_: v.node for k_, v in outs.items()}))


def _group_limit(b, score, E, G, kept, m):
    """DeepSeek-V3's group-limited routing as its reference code writes it: each group of
    E / G experts scored by the sum of its top m scores (m = "max": amax), the `kept` best
    groups' experts keep their scores, the others -inf."""
    grp = b.reshape(score, [B, T, G, E // G])
    if m == "max":
        gscore = b.amax(grp, -1, keepdim=False)
    else:
        gscore = b.sum(b.gather(grp, b.topk(grp, m, -1), -1), -1, keepdim=False)
    gtop = b.reshape(b.topk(gscore, kept, -1), [B, T, kept, 1])
    gmask = b.sum(b.cast(b.eq(gtop, b.iota(G)), "f32"), 2, keepdim=False)
    emask = b.reshape(b.expand(b.reshape(gmask, [B, T, G, 1]), [B, T, G, E // G]), [B, T, E])
    return b.where(emask > 0, score, float("-inf"))


def _records(g):
    return [f for f in g.meta["fusions"] if f["pass"] == "fuse_moe_gating"]


def _grads(graph, vals, ctx, cts, triton):
    prog = differentiate(graph, sorted(vals))
    back = run_pipeline(prog.backward)
    fwd = TritonProgram(prog.forward) if triton else None
    fw = fwd.run(vals, ctx) if triton else run_graph(prog.forward, vals, ctx)
    bound = {s: fw[s] for s in prog.saved}
    bound.update({f"grad:{o}": cts[o] for o in prog.outputs})
    bprog = TritonProgram(back, label="backward") if triton else None
    got = bprog.run(bound, ctx) if triton else run_graph(back, bound, ctx)
    kinds = ({n.attrs["kind"] for n in fwd.graph.nodes if n.op is Op.FUSED}
             | {n.attrs["kind"] for n in bprog.graph.nodes if n.op is Op.FUSED}
             if triton else set())
    return fw, got, kinds


CASES = [  # E, k, capacity (hundredths), form, noise std, renormalise, z-loss, softmax[, bias]
    (4, 2, None, "one-hot", 1.0, True, False, True),     # blues01
    (4, 2, 120, "one-hot", 0.0, True, True, True),       # minimax
    (8, 1, 120, "one-hot", 0.0, True, True, True),
    (8, 2, None, "scatter", 0.0, True, False, True),     # medit_one
    (4, 1, None, "scatter", 0.0, False, True, True),
    (8, 2, 100, "one-hot", 0.5, False, False, True),
    # a sigmoid router (DeepSeek-V3's independent scores), with and without capacity/noise
    (8, 2, None, "one-hot", 0.0, True, False, False),
    (4, 1, 120, "one-hot", 0.5, True, False, False),
    (8, 2, None, "scatter", 0.0, False, False, False),
    # wider top-k (Qwen3-MoE, OLMoE, DeepSeek-V3), k = E, and a selection bias
    (16, 4, None, "one-hot", 0.0, True, True, True),
    (16, 6, 150, "one-hot", 0.0, True, False, False, True),    # DeepSeek-V3 + capacity
    (8, 8, None, "scatter", 0.0, True, False, True),
    (16, 5, None, "scatter", 0.5, True, False, False, True),
    (8, 3, None, "one-hot", 0.0, False, True, True, True),      # a bias on softmax scores
]


@pytest.mark.parametrize("E,k,cap,form,noise,renorm,z,softmax,bias",
                         [c + (False,) * (9 - len(c)) for c in CASES])
def test_fused_equals_primitives_forward_and_gradients(E, k, cap, form, noise, renorm, z,
                                                       softmax, bias):
    g = _router(E, k, form=form, cap=cap, noise=noise, renorm=renorm, z=z, softmax=softmax,
                bias=bias)
    f = fuse_moe_gating(g)
    (r,) = _records(f)
    assert r["status"] == "fused", r
    assert r["reason"].startswith("softmax" if softmax else "sigmoid"), r
    assert ("capacity" in r["reason"]) == (cap is not None)
    assert ("noise" in r["reason"]) == bool(noise)
    assert ("selection bias" in r["reason"]) == bias
    assert sum(n.op is Op.FUSED for n in f.nodes) == 1
    assert not any(n.op in (Op.SOFTMAX, Op.SIGMOID, Op.TOPK, Op.CUMSUM) for n in f.nodes)
    gen = torch.Generator().manual_seed(E * 10 + k)
    t = 7 if cap is None else 9                                   # odd token counts
    vals = {"x": torch.randn(3, t, D, generator=gen), "w": torch.randn(D, E, generator=gen)}
    if bias:       # large enough to change some tokens' experts
        vals["bias"] = torch.randn(E, generator=gen) * (0.3 if softmax else 1.0)
        probs = (vals["x"] @ vals["w"]).softmax(-1) if softmax else \
            (vals["x"] @ vals["w"]).sigmoid()
        assert not torch.equal(torch.topk(probs, k).indices,
                               torch.topk(probs + vals["bias"], k).indices)
    ctx = RefCtx(dims=bind_dims(g, vals), training=True, rng_step=3)
    want = run_graph(g, vals, ctx)
    got = TritonProgram(f).run(vals, ctx)
    for o in want:
        torch.testing.assert_close(got[o], want[o], rtol=1e-5, atol=1e-6)
    if cap is not None:   # the capacity really dropped something here
        assert float(want["tokens"].sum()) < 3 * t * k
    cts = {o: torch.randn(want[o].shape, generator=gen) for o in want
           if want[o].dtype.is_floating_point}
    fw0, g0, _ = _grads(g, vals, ctx, cts, False)
    fw1, g1, kinds = _grads(f, vals, ctx, cts, True)
    assert {"moe_gating", "moe_gating_bwd"} <= kinds
    for o in want:
        torch.testing.assert_close(fw1[o], fw0[o], rtol=1e-5, atol=1e-6)
    for name in ("grad:x", "grad:w"):
        assert g0[name].abs().max() > 0
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5)
    if bias:     # top-k's indices carry no gradient to the bias, fused or not
        assert set(g1) == set(g0)
        for name in set(g0) & {"grad:bias"}:
            assert not g0[name].any() and not g1[name].any()


LAYER_CASES = [  # E, k, capacity, noise std, activation, softmax
    (4, 2, None, 1.0, "gelu", True),      # blues01
    (4, 2, 120, 0.0, "silu", True),       # minimax
    (8, 1, 100, 0.0, "silu", True),
    (8, 2, None, 0.0, "gelu", True),
    (8, 2, None, 0.0, "silu", False),     # a sigmoid router (no z-loss: see near misses)
    (4, 2, 120, 0.5, "silu", False),
    (16, 6, None, 0.0, "silu", False, True),     # DeepSeek-V3: sigmoid, k 6, selection bias
    (16, 4, 150, 0.0, "gelu", True, True),
]


@pytest.mark.parametrize("E,k,cap,noise,act,softmax,bias",
                         [c + (False,) * (7 - len(c)) for c in LAYER_CASES])
def test_whole_layer_equals_primitives(E, k, cap, noise, act, softmax, bias):
    g = _router(E, k, cap=cap, noise=noise, z=softmax, experts=act, softmax=softmax,
                bias=bias)
    f = fuse_moe_gating(g)
    (r,) = _records(f)
    assert r["status"] == "fused" and "experts: sorted dispatch" in r["reason"], r
    (fused,) = [n for n in f.nodes if n.op is Op.FUSED]
    assert fused.attrs["kind"] == "moe_layer"
    assert not any(n.op is Op.MATMUL for n in f.nodes)     # no dense expert products left
    gen = torch.Generator().manual_seed(E * 10 + k + 1)
    t = 7 if cap is None else 9
    vals = {"x": torch.randn(3, t, D, generator=gen), "w": torch.randn(D, E, generator=gen),
            "wg": torch.randn(E, D, F, generator=gen) * 0.3,
            "w1": torch.randn(E, D, F, generator=gen) * 0.3,
            "w2": torch.randn(E, F, D, generator=gen) * 0.3}
    if bias:
        vals["bias"] = torch.randn(E, generator=gen) * (0.3 if softmax else 1.0)
    ctx = RefCtx(dims=bind_dims(g, vals), training=True, rng_step=1)
    want = run_graph(g, vals, ctx)
    got = TritonProgram(f).run(vals, ctx)
    for o in want:
        torch.testing.assert_close(got[o], want[o], rtol=1e-5, atol=1e-5)
    if cap is not None:
        assert float(want["tokens"].sum()) < 3 * t * k
    cts = {o: torch.randn(want[o].shape, generator=gen) for o in want
           if want[o].dtype.is_floating_point}
    _, g0, _ = _grads(g, vals, ctx, cts, False)
    _, g1, kinds = _grads(f, vals, ctx, cts, True)
    assert {"moe_layer", "moe_layer_bwd"} <= kinds
    for name in ("grad:x", "grad:w", "grad:wg", "grad:w1", "grad:w2"):
        assert g0[name].abs().max() > 0
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5)


GROUP_CASES = [  # E, k, groups (G, kept, top m or "max"), form, softmax, bias, experts
    (16, 4, (4, 2, 2), "one-hot", False, True, None),       # DeepSeek-V3's router
    (16, 3, (8, 2, "max"), "scatter", True, False, None),   # groups scored by their max
    (16, 5, (4, 3, 1), "one-hot", False, False, None),      # ... by their top 1, gathered
    (8, 2, (4, 2, 2), "one-hot", False, True, "silu"),      # the whole layer
    (16, 6, (8, 4, 2), "one-hot", True, False, "gelu"),
]


@pytest.mark.parametrize("E,k,groups,form,softmax,bias,experts", GROUP_CASES)
def test_group_limited_routing_equals_primitives(E, k, groups, form, softmax, bias, experts):
    """DeepSeek-V3's group limit (top-k only among the experts of the best groups) fuses
    into the gating op; forward and gradients equal the primitives, and the limit changes
    which experts some tokens get."""
    g = _router(E, k, form=form, softmax=softmax, bias=bias, groups=groups, experts=experts)
    f = fuse_moe_gating(g)
    (r,) = _records(f)                 # the groups' own top-ks are inside the one region
    G, kept, m = groups
    assert r["status"] == "fused" and (
        f"group-limited: among the top {kept} of {G} groups (scored by their top "
        f"{1 if m == 'max' else m})") in r["reason"], r
    assert not any(n.op in (Op.TOPK, Op.WHERE, Op.GATHER) for n in f.nodes)
    gen = torch.Generator().manual_seed(E + k + kept)
    vals = {"x": torch.randn(3, 7, D, generator=gen), "w": torch.randn(D, E, generator=gen)}
    if bias:
        vals["bias"] = torch.randn(E, generator=gen) * 0.5
    if experts:
        vals.update(wg=torch.randn(E, D, F, generator=gen) * 0.3,
                    w1=torch.randn(E, D, F, generator=gen) * 0.3,
                    w2=torch.randn(E, F, D, generator=gen) * 0.3)
    ctx = RefCtx(dims=bind_dims(g, vals), training=True, rng_step=1)
    want = run_graph(g, vals, ctx)
    free = run_graph(_router(E, k, form=form, softmax=softmax, bias=bias, experts=experts),
                     vals, ctx)
    o = "y" if experts else "gates"
    assert not torch.allclose(want[o], free[o])          # the limit moved some tokens
    got = TritonProgram(f).run(vals, ctx)
    for o in want:
        torch.testing.assert_close(got[o], want[o], rtol=1e-5, atol=1e-5)
    cts = {o: torch.randn(want[o].shape, generator=gen) for o in want
           if want[o].dtype.is_floating_point}
    _, g0, _ = _grads(g, vals, ctx, cts, False)
    _, g1, kinds = _grads(f, vals, ctx, cts, True)
    kind = "moe_layer" if experts else "moe_gating"
    assert {kind, kind + "_bwd"} <= kinds
    for name in ("grad:x", "grad:w") + (("grad:wg", "grad:w1", "grad:w2") if experts else ()):
        assert g0[name].abs().max() > 0
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5)


def test_group_ties_go_to_the_lower_group():
    """Every group a copy of the first: all group scores tie, so the lower groups stay (and
    among equal experts the lower index), as the oracle's stable top-k has it."""
    E, G, k = 16, 4, 3
    g = _router(E, k, softmax=False, groups=(G, 2, 2))
    f = fuse_moe_gating(g)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(D, E // G, generator=gen).repeat(1, G)
    vals = {"x": torch.randn(2, 5, D, generator=gen), "w": w}
    ctx = RefCtx(dims=bind_dims(g, vals), training=False)
    want = run_graph(g, vals, ctx)["gates"]
    got = TritonProgram(f).run(vals, ctx)["gates"]
    assert not (want.reshape(-1, E)[:, 2 * E // G:] != 0).any()    # only groups 0 and 1
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_group_limit_near_misses_say_why():
    for groups, why in [((8, 1, 2), "the 1 kept groups hold 2 experts, fewer than k=4"),
                        ((4, 2, 3), "groups scored by their top 3: the fused gating sums a "
                                    "group's top 1 or 2")]:
        (r,) = _records(fuse_moe_gating(_router(16, 4, softmax=False, groups=groups)))
        assert r["status"] == "declined" and r["reason"] == why, r
    # scores masked by something other than a group mask
    b = Builder({}, {})
    x, w = b.input("x", [B, T, D], "f32"), b.input("w", [D, 8], "f32")
    probs = b.sigmoid(x @ w)
    top = b.topk(b.where(probs - 0.5 > 0, probs, float("-inf")), 2, -1)
    g = run_pipeline(Graph("r", b.nodes, {"kv": b.gather(probs, top, -1).node}))
    (r,) = _records(fuse_moe_gating(g))
    assert r["status"] == "declined" and r["reason"] == (
        "expert mask not a per-group mask expanded over each group's experts"), r


@pytest.mark.parametrize("k,cap", [(2, None), (2, 120), (1, 100)])
def test_layer_backward_reads_the_saved_activations(k, cap, monkeypatch):
    """The layer's body saves, per (token, slot), the experts' pre-activations a, b and
    outputs (0 for a slot over capacity); the kernel writes the same values in that layout,
    and the backward op reads them: its only expert products are the dh and dx products
    (no up or down projection rerun)."""
    from lmc.codegen import moe

    E = 4
    g = _router(E, k, cap=cap, z=True, experts="silu")
    f = fuse_moe_gating(g)
    (fused,) = [n for n in f.nodes if n.op is Op.FUSED]
    body = fused.attrs["body"]
    names = body.meta["options"]["outputs"]
    assert names[-3:] == ("a", "b", "ye")
    assert body.meta["saved"] == [str(len(names) - 3 + i) for i in range(3)]
    gen = torch.Generator().manual_seed(11 + k)
    t = 9
    vals = {"x": torch.randn(3, t, D, generator=gen), "w": torch.randn(D, E, generator=gen),
            "wg": torch.randn(E, D, F, generator=gen) * 0.3,
            "w1": torch.randn(E, D, F, generator=gen) * 0.3,
            "w2": torch.randn(E, F, D, generator=gen) * 0.3}
    ctx = RefCtx(dims=bind_dims(g, vals), training=True, rng_step=1)
    prog = differentiate(f, sorted(vals))
    got = TritonProgram(prog.forward).run(vals, ctx)
    want = run_graph(prog.forward, vals, ctx)          # the body: the dense primitives
    slots = [s for s in prog.saved if tuple(got[s].shape[-2:]) in ((k, F), (k, D))]
    assert len(slots) == 3
    for s in prog.saved:
        torch.testing.assert_close(got[s], want[s], rtol=1e-5, atol=1e-5)
    if cap is not None:   # dropped slots: zero rows in both
        dropped = (want[slots[0]] == 0).all(-1)
        assert dropped.any() and torch.equal((got[slots[0]] == 0).all(-1), dropped)
    modes = []
    real = moe._Plan.gmm

    def spy(self, *a, **kw):
        modes.append(kw["mode"])
        return real(self, *a, **kw)
    monkeypatch.setattr(moe._Plan, "gmm", spy)
    bound = {s: got[s] for s in prog.saved}
    bound.update({f"grad:{o}": torch.randn(got[o].shape, generator=gen)
                  for o in prog.outputs})
    back = run_pipeline(prog.backward)
    gb = TritonProgram(back, label="backward").run(bound, ctx)
    assert modes == [2, 3]                       # dh (gated backward) and dx only
    wb = run_graph(back, bound, ctx)
    for name in ("grad:x", "grad:w", "grad:wg", "grad:w1", "grad:w2"):
        torch.testing.assert_close(gb[name], wb[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k,form", [(1, "one-hot"), (2, "one-hot"), (2, "scatter")])
def test_ties_go_to_the_lower_expert(k, form):
    E = 4
    g = _router(E, k, form=form, z=False)
    f = fuse_moe_gating(g)
    gen = torch.Generator().manual_seed(5)
    col = torch.randn(D, 1, generator=gen)
    # experts 1, 2, 3 have identical router columns: their logits tie exactly for every
    # token, and expert 0 is below them (token rows positive, column 0 = -|col|)
    w = torch.cat([-col.abs() - 1, col.abs(), col.abs(), col.abs()], 1)
    x = torch.rand(2, 5, D, generator=gen) + 0.1
    vals = {"x": x, "w": w}
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)["gates"]
    got = TritonProgram(f).run(vals, ctx)["gates"]
    picked = (want > 0).reshape(-1, E)
    assert picked[:, 1].all() and not picked[:, 3].any() and not picked[:, 0].any()
    assert picked[:, 2].all() == (k == 2)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_near_misses_say_why():
    (r,) = _records(fuse_moe_gating(_router(4, 2, softmax=False, z=True)))
    assert r["status"] == "declined" and r["reason"].startswith(
        "a z-loss (logsumexp of the logits) over a sigmoid router")
    (r,) = _records(fuse_moe_gating(_router(16, 9)))
    assert r["status"] == "declined" and r["reason"] == "top-9: the fused gating handles k <= 8"
    # the gates before the capacity mask read outside the region
    b = Builder({}, {})
    x, w = b.input("x", [B, T, D], "f32"), b.input("w", [D, 4], "f32")
    probs = b.softmax(x @ w, -1)
    top = b.node(Op.TOPK, [probs], {"k": 2, "axis": -1})
    chosen = b.sum(b.cast(b.eq(b.reshape(top, [B, T, 2, 1]), b.iota(4)), "f32"), 2,
                   keepdim=False)
    g = run_pipeline(Graph("r", b.nodes, {"gates": (probs * chosen).node,
                                          "logits": (x @ w).node}))
    (r,) = _records(fuse_moe_gating(g))
    assert r["status"] == "declined" and r["reason"] == (
        "matmul inside the router is also used outside it")
    # a selection bias per token, or computed from the scores themselves
    for per_token in (True, False):
        b = Builder({}, {})
        x, w = b.input("x", [B, T, D], "f32"), b.input("w", [D, 4], "f32")
        probs = b.sigmoid(x @ w)
        bias = b.input("bias", [B, T, 4], "f32") if per_token else \
            b.reshape(b.mean(b.reshape(probs, [B * T, 4]), 0), [4])
        top = b.node(Op.TOPK, [probs + bias], {"k": 2, "axis": -1})
        g = run_pipeline(Graph("r", b.nodes, {"kv": b.gather(probs, top, -1).node}))
        (r,) = _records(fuse_moe_gating(g))
        assert r["status"] == "declined" and r["reason"] == (
            "selection bias of shape [B, T, 4], not one value per expert" if per_token else
            "selection bias computed in the step (not a parameter, input or constant)"), r
    # a graph without a top-k produces no record at all
    b = Builder({}, {})
    x = b.input("x", [B, T, D], "f32")
    g = run_pipeline(Graph("s", b.nodes, {"p": b.softmax(x, -1).node}))
    assert _records(fuse_moe_gating(g)) == []


@pytest.mark.parametrize("path,sets,sites,kind", [
    ("zoo/blues01.yaml", [], 1, "moe_layer"),         # tiny: 2 layers, layer 1 is MoE
    ("zoo/minimax.yaml", [], 2, "moe_layer"),         # every layer's FFN is MoE
    # x, hx, cx routers in layer 0, x in the top layer; linear experts: gating only
    ("zoo/medit_one.yaml", ["--set", "moe=1"], 4, "moe_gating"),
])
def test_zoo_sites_fire(path, sets, sites, kind, capsys):
    assert main(["compile", path, "--preset", "tiny", *sets, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    recs = [f for f in s["fusions"] if f["pass"] == "fuse_moe_gating"]
    assert len(recs) == sites and all(f["status"] == "fused" for f in recs), recs
    fw, bw = s["kernels"]["forward"]["list"], s["kernels"]["backward"]["list"]
    assert sum(k["kind"] == kind for k in fw) == sites
    assert sum(k["kind"] == f"{kind}_bwd" for k in bw) == sites
    assert not any(k["kind"].startswith("moe") and not k["kind"].startswith(kind)
                   for k in fw + bw)
    if kind == "moe_gating":
        assert all("gating only (experts not fused: gates not permuted" in f["reason"]
                   for f in recs)


def test_rewrite_keeps_one_copy_of_the_rest_of_the_graph():
    """Regression: a fused op whose inputs were remapped (a later MoE layer reads the first
    one's output) rebuilt its GETITEMs, but the graph kept reading the stale ones, so dce
    pulled a second copy of everything upstream back in (minimax: 75 norms instead of 47)."""
    from collections import Counter

    import lmc

    g = lmc.compile_model("zoo/minimax.yaml", preset="tiny", overrides={"layers": 4}).graph
    f = fuse_moe_gating(g)
    before = Counter(n.op for n in g.nodes)
    after = Counter(n.op for n in f.nodes)
    assert after[Op.FUSED] == 4
    for op in (Op.RSQRT, Op.EMBEDDING, Op.SOFTMAX):     # the router softmax is fused
        assert after[op] == before[op] - (4 if op is Op.SOFTMAX else 0), op


@pytest.mark.parametrize("E,k,cap,form,noise", [
    (4, 2, 120, "one-hot", 0.0),      # minimax under mixed precision
    (8, 2, None, "one-hot", 1.0),     # blues01's noisy router
    (4, 2, None, "scatter", 0.0),     # medit_one
])
@pytest.mark.parametrize("softmax_dt", ["f32", "f16"])
def test_f16_router_picks_what_the_f16_oracle_picks(E, k, cap, form, noise, softmax_dt,
                                                     monkeypatch):
    # under mixed precision the oracle's top-k compares the softmax of f16 logits (in fp32,
    # as the mixed-precision pass writes it; or in f16, a program written so: ties after
    # rounding go to the lower expert); the kernel rounds the logits (and the f16
    # probabilities) the same way, so it picks the same experts, and the values differ by a
    # few f16 roundings
    if softmax_dt == "f16":       # type promotion alone: the program without the fp32 list
        from lmc.passes import mixed_precision as mp
        monkeypatch.setattr(mp, "FP32_OPS", frozenset())
    g = mixed_precision(_router(E, k, form=form, cap=cap, noise=noise, z=True), "f16")
    assert {n.type.dtype.value for n in g.nodes if n.op is Op.SOFTMAX} == {softmax_dt}
    f = fuse_moe_gating(g)
    (r,) = _records(f)
    assert r["status"] == "fused" and ("router in f16" if softmax_dt == "f16" else
                                       "router logits in f16, softmax in f32") in r["reason"], r
    gen = torch.Generator().manual_seed(3)
    t = 9
    vals = {"x": torch.randn(3, t, D, generator=gen), "w": torch.randn(D, E, generator=gen)}
    # experts 0 and 1 tie exactly for the first sequence's tokens (same router column)
    vals["x"][0, :, 0] = 0.0
    vals["w"][1:, 1] = vals["w"][1:, 0]
    ctx = RefCtx(dims=bind_dims(g, vals), training=True, rng_step=2)
    kinds = _f16_equal(g, f, vals, ctx, gen, ("grad:x", "grad:w"))
    assert {"moe_gating", "moe_gating_bwd"} <= kinds


def _f16_equal(g, f, vals, ctx, gen, grads):
    """The fused f16 program picks the oracle's experts, and its outputs and the named
    gradients (random cotangents) are within a few f16 roundings of the oracle's; returns
    the fused kinds run."""
    want = run_graph(g, vals, ctx)
    got = TritonProgram(f).run(vals, ctx)
    if "gates" in want:
        assert torch.equal(got["gates"] > 0, want["gates"] > 0)       # the same experts
    if "tokens" in want:
        assert torch.equal(got["tokens"], want["tokens"])
    for o in want:
        torch.testing.assert_close(got[o].float(), want[o].float(), rtol=4 * 2 ** -10,
                                   atol=2 ** -10)
    cts = {o: torch.randn(want[o].shape, generator=gen).to(want[o].dtype) for o in want
           if want[o].dtype.is_floating_point}
    _, g0, _ = _grads(g, vals, ctx, cts, False)
    _, g1, kinds = _grads(f, vals, ctx, cts, True)
    for name in grads:
        err = float((g1[name] - g0[name]).abs().max() / g0[name].abs().max())
        assert err < 4 * 2 ** -10, (name, err)
    return kinds


@pytest.mark.parametrize("form,experts", [("one-hot", None), ("scatter", None),
                                          ("one-hot", "silu")])
def test_f16_sigmoid_router_with_an_fp32_selection_bias(form, experts):
    """DeepSeek-V3 under mixed precision: f16 sigmoid scores widened to meet the fp32 bias;
    the kernel adds the bias to the rounded scores in fp32, so it picks the oracle's experts
    (the bias changes some tokens' choice here)."""
    E, k = 16, 4
    g = mixed_precision(_router(E, k, form=form, softmax=False, bias=True, experts=experts),
                        "f16")
    f = fuse_moe_gating(g)
    (r,) = _records(f)
    assert r["status"] == "fused" and "selection bias" in r["reason"], r
    gen = torch.Generator().manual_seed(8)
    vals = _biased_vals(E, experts, gen)
    p = torch.sigmoid((vals["x"].half() @ vals["w"].half()).float()).half().float()
    assert not torch.equal(torch.topk(p, k).indices, torch.topk(p + vals["bias"], k).indices)
    _f16_router_equal(g, f, vals, experts, gen)


def _biased_vals(E, experts, gen):
    """Inputs of a router with a selection bias (and, with experts, the experts' weights)."""
    vals = {"x": torch.randn(3, 9, D, generator=gen), "w": torch.randn(D, E, generator=gen),
            "bias": torch.randn(E, generator=gen) * 0.2}
    if experts:
        vals.update(wg=torch.randn(E, D, F, generator=gen) * 0.3,
                    w1=torch.randn(E, D, F, generator=gen) * 0.3,
                    w2=torch.randn(E, F, D, generator=gen) * 0.3)
    return vals


def _f16_router_equal(g, f, vals, experts, gen):
    ctx = RefCtx(dims=bind_dims(g, vals), training=True)
    kinds = _f16_equal(g, f, vals, ctx, gen, ("grad:x", "grad:w") +
                       (("grad:wg", "grad:w1", "grad:w2") if experts else ()))
    assert ("moe_layer_bwd" if experts else "moe_gating_bwd") in kinds


@pytest.mark.parametrize("softmax", [True, False])
def test_f16_group_limited_router_without_a_bias(softmax):
    """f16 probabilities select directly: the kernel sums each group's two best as the f16
    program does (rounded to f16) and keeps the groups it keeps."""
    E, k = 16, 4
    g = mixed_precision(_router(E, k, softmax=softmax, groups=(4, 2, 2), z=softmax), "f16")
    f = fuse_moe_gating(g)
    (r,) = _records(f)
    assert r["status"] == "fused" and "group-limited" in r["reason"], r
    gen = torch.Generator().manual_seed(12)
    vals = {"x": torch.randn(3, 9, D, generator=gen), "w": torch.randn(D, E, generator=gen)}
    ctx = RefCtx(dims=bind_dims(g, vals), training=True)
    assert {"moe_gating", "moe_gating_bwd"} <= _f16_equal(g, f, vals, ctx, gen,
                                                          ("grad:x", "grad:w"))


@pytest.mark.parametrize("experts", [None, "silu"])
def test_f16_router_whose_widened_scores_a_balance_loss_also_reads(experts):
    """DeepSeek-V3 under mixed precision with its sequence-wise balance loss: the f16 scores
    widened once (CSE) for both the fp32 bias and the loss's normalised scores. The op keeps
    the widening inside for its own top-k and the graph keeps it for the loss, over the op's
    probs output (it declined: "cast inside the router is also used outside it")."""
    E, k = 16, 4
    g = mixed_precision(_router(E, k, softmax=False, bias=True, groups=(4, 2, 2),
                                seqbal=True, experts=experts), "f16")
    casts = [n for n in g.nodes if n.op is Op.CAST and n.inputs[0].op is Op.SIGMOID]
    assert len(casts) == 1 and len(g.users()[casts[0]]) >= 2      # one widening, shared
    f = fuse_moe_gating(g)
    (r,) = _records(f)
    assert r["status"] == "fused" and "probs" in r["reason"].split("outputs ")[1], r
    gen = torch.Generator().manual_seed(11)
    _f16_router_equal(g, f, _biased_vals(E, experts, gen), experts, gen)


@pytest.mark.parametrize("E,k,cap,noise,act", [(4, 2, 120, 0.0, "silu"), (8, 2, None, 1.0,
                                                                            "gelu")])
def test_f16_whole_layer_equals_the_f16_program(E, k, cap, noise, act):
    g = mixed_precision(_router(E, k, cap=cap, noise=noise, z=True, experts=act), "f16")
    f = fuse_moe_gating(g)
    (r,) = _records(f)
    assert r["status"] == "fused" and "experts: sorted dispatch" in r["reason"], r
    assert not any(n.op is Op.MATMUL for n in f.nodes)
    gen = torch.Generator().manual_seed(4)
    t = 9
    vals = {"x": torch.randn(3, t, D, generator=gen), "w": torch.randn(D, E, generator=gen),
            "wg": torch.randn(E, D, F, generator=gen) * 0.3,
            "w1": torch.randn(E, D, F, generator=gen) * 0.3,
            "w2": torch.randn(E, F, D, generator=gen) * 0.3}
    ctx = RefCtx(dims=bind_dims(g, vals), training=True, rng_step=2)
    want = run_graph(g, vals, ctx)
    got = TritonProgram(f).run(vals, ctx)
    for o in want:
        err = float((got[o].float() - want[o].float()).abs().max()
                    / want[o].float().abs().max())
        assert err < 4 * 2 ** -10, (o, err)
    cts = {o: torch.randn(want[o].shape, generator=gen).to(want[o].dtype) for o in want
           if want[o].dtype.is_floating_point}
    _, g0, _ = _grads(g, vals, ctx, cts, False)
    _, g1, kinds = _grads(f, vals, ctx, cts, True)
    assert {"moe_layer", "moe_layer_bwd"} <= kinds
    for name in ("grad:x", "grad:w", "grad:wg", "grad:w1", "grad:w2"):
        err = float((g1[name] - g0[name]).abs().max() / g0[name].abs().max())
        assert err < 4 * 2 ** -10, (name, err)
