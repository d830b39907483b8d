"""The mixed-precision pass: torch.autocast's policy in the graph. Matmuls in the low
dtype, fp32 master weights and gradients, position tables untouched; the f16 program is
close to the fp32 one, and the triton backend runs the same program as the torch one."""
import os

import pytest
import torch
from conftest import ZOO, loss_and_grads

import lmc
from lmc.errors import LmcError
from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.passes import mixed_precision as mp
from lmc.passes import run_pipeline
from lmc.passes.autodiff import differentiate
from lmc.passes.loss import with_loss
from lmc.passes.mixed_precision import mixed_precision
from lmc.runtime.executor import RefCtx, bind_dims, run_graph
from lmc.runtime.module import LmcModel

LLAMA = os.path.join(ZOO, "llama.yaml")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _graph(dtype):
    g = lmc.load(LLAMA, preset="tiny").graph
    return run_pipeline(with_loss(mixed_precision(g, dtype)))


def test_the_policy_on_llama():
    g = _graph("f16")
    mms = [n for n in g.nodes if n.op is Op.MATMUL]
    assert mms and all(n.type.dtype.value == "f16" for n in mms)
    assert all(p.type.dtype.value == "f32" for p in g.params)
    assert g.outputs["logits"].type.dtype.value == "f16"
    assert g.outputs["loss"].type.dtype.value == "f32"
    # RoPE's tables are computed from positions in fp32, then cast once to the activations'
    # dtype, so roped q and k (and a decode K cache) stay f16
    sins = [n for n in g.nodes if n.op is Op.SIN]
    assert sins and all(n.type.dtype.value == "f32" for n in sins)
    users = g.users()
    assert all(u.op is Op.CAST and u.type.dtype.value == "f16" for s in sins for u in users[s])
    roped = [n for n in g.nodes if n.op is Op.MUL and any(x in users.get(s, []) for s in sins
                                                          for x in n.inputs)]
    assert roped and all(n.type.dtype.value == "f16" for n in roped)
    # one cast per weight, shared by its uses
    casts = [n for n in g.nodes if n.op is Op.CAST and n.inputs[0].op is Op.PARAM]
    assert len(casts) == len({n.inputs[0] for n in casts})


def _loss_and_grads(graph, backend, ids, targets):
    return loss_and_grads(graph, backend, ids, targets, seed=4)[1:]


def _max_rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_low_precision_training_step_is_close_to_fp32(dtype):
    gen = torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, 512, (2, 16), generator=gen), torch.randint(
        0, 512, (2, 16), generator=gen)
    l32, g32 = _loss_and_grads(_graph("f32"), "torch", ids, targets)
    l16, g16 = _loss_and_grads(_graph(dtype), "torch", ids, targets)
    eps = {"f16": 2 ** -10, "bf16": 2 ** -7}[dtype]
    assert abs(l16 - l32) / l32 < eps / 16                     # a mean over many tokens
    assert all(g.dtype == torch.float32 for g in g16.values())   # master-weight gradients
    assert _max_rel(g16, g32) < 4 * eps       # a few roundings (measured 2.4e-3, 1.4e-2)


def test_triton_backend_runs_the_same_f16_program():
    gen = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 512, (2, 13), generator=gen), torch.randint(
        0, 512, (2, 13), generator=gen)
    g = _graph("f16")
    lt, gt = _loss_and_grads(g, "torch", ids, targets)
    lk, gk = _loss_and_grads(g, "triton", ids, targets)
    # the same program; the kernels keep fused intermediates in fp32 where torch rounds each
    # op to f16, so they differ by a few f16 roundings, not more
    prog = LmcModel(g, backend="triton").program()   # rope + attention fused in f16 too
    assert "rope_attention" in {n.attrs["kind"] for n in prog.forward_exec.graph.nodes
                                if n.op is Op.FUSED}
    assert abs(lk - lt) / lt < 2 ** -10 / 16
    assert _max_rel(gk, gt) < 4 * 2 ** -10                      # measured 1.6e-3


def test_unknown_precision_is_an_error():
    with pytest.raises(LmcError, match="bf16 or f16"):
        mixed_precision(lmc.load(LLAMA, preset="tiny").graph, "i32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only without CUDA")
def test_bf16_in_the_interpreter_is_a_clear_error():
    m = LmcModel(_graph("bf16"), backend="triton")
    with pytest.raises(LmcError, match="bf16 on bit patterns"):
        m(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("path,sets", [
    ("llama.yaml", {}), ("blues01.yaml", {}), ("minimax.yaml", {}), ("yoco.yaml", {}),
    ("optimus_prime.yaml", {}), ("medit_one.yaml", {}), ("medit_one.yaml", {"moe": 1})])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_every_zoo_model_compiles_in_low_precision(path, sets, dtype):
    """The whole pipeline runs on every zoo program in low precision (cse once failed on a
    folded bf16 constant: numpy has no bfloat16), and the program's loss is finite on CPU.
    Not in f16: medit_one's MoE router, which normalises u ~ 1e-5 by rsqrt(mean(u * u) +
    1e-12): u * u underflows f16 (as under torch.autocast, which also keeps mul and mean in
    f16), so rsqrt(0) = inf; bf16 has fp32's range."""
    g = run_pipeline(with_loss(mixed_precision(
        lmc.load(os.path.join(ZOO, path), preset="tiny", **sets).graph, dtype)))
    assert any(n.op is Op.MATMUL and n.type.dtype.value == dtype for n in g.nodes)
    m = LmcModel(g, seed=0)
    ids = torch.randint(0, m.config["vocab"], (2, 7), generator=torch.Generator().manual_seed(0))
    loss = m(ids, targets=ids)["loss"]
    assert torch.isfinite(loss).item() or (dtype == "f16" and sets.get("moe"))


def _autocast_graph():
    """A bf16/f16 matmul output h fed to each op autocast runs in fp32, to ones it leaves in
    the low dtype (tanh, a product of two values), and to an RMSNorm whose square (torch
    code's pow(2)), mean and rsqrt are fp32."""
    B, T = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    x, w, g = b.input("x", [B, T, 16], "f32"), b.input("w", [16, 16], "f32"), \
        b.input("g", [16], "f32")
    h = x @ w
    outs = {"exp": b.exp(h), "log": b.log(b.abs(h) + 1.0), "pow": b.pow(h, 3.0),
            "softplus": b.softplus(h), "recip": 1.0 / h, "sum": b.sum(h, -1),
            "lse": b.logsumexp(h, -1), "softmax": b.softmax(h, -1), "cumsum": b.cumsum(h, 1),
            "cumprod": b.cumprod(h, 1), "tanh": b.tanh(h), "prod": h * b.tanh(h),
            "norm": h * b.rsqrt(b.mean(h * h, -1) + 1e-6) * g}
    return Graph("autocast", b.nodes, {k: v.node for k, v in outs.items()})


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_autocast_fp32_ops_read_fp32_and_produce_fp32(dtype):
    g = mixed_precision(_autocast_graph(), dtype)
    fp32 = [n for n in g.nodes if n.op in mp.FP32_OPS or (n.op is Op.DIV and n.inputs[
        0].op is Op.CONST) or (n.op is Op.MUL and n.inputs[0] is n.inputs[1])]
    assert {n.op for n in fp32} == set(mp.FP32_OPS) | {Op.DIV, Op.MUL}
    for n in fp32:
        assert n.type.dtype.value == "f32", n.op
        for x in n.inputs:   # cast up (or computed from a cast: abs(h) + 1, mean(h * h))
            assert x.type.dtype.value == "f32" and (x.op in (Op.CAST, Op.CONST) or
                                                   x.inputs[0].op is Op.CAST or
                                                   x.inputs[0].op is Op.MEAN), (n.op, x.op)
    o = g.outputs
    assert o["tanh"].type.dtype.value == dtype             # not on autocast's list
    assert o["prod"].type.dtype.value == dtype             # nor is a product
    # the norm: the square, its mean and rsqrt are fp32; the product promotes to fp32
    mean = next(n for n in g.nodes if n.op is Op.MEAN)
    assert mean.type.dtype.value == "f32" and o["norm"].type.dtype.value == "f32"
    assert o["sum"].type.dtype.value == o["cumsum"].type.dtype.value == "f32"


def _norm_graph(d: int) -> Graph:
    """y = RMSNorm(x @ w) * g: a norm of a matmul's output, x [B, T, 16], w [16, d]."""
    B, T = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    x, w, g = b.input("x", [B, T, 16], "f32"), b.input("w", [16, d], "f32"), \
        b.input("g", [d], "f32")
    h = x @ w
    y = h * b.rsqrt(b.mean(h * h, -1) + 1e-6) * g
    return Graph("norm", b.nodes, {"y": y.node})


def _norm_grads(graph, vals, cts):
    prog = differentiate(graph, ["x", "w", "g"])
    ctx = RefCtx(dims=bind_dims(graph, vals), training=True)
    fw = run_graph(prog.forward, vals, ctx)
    bound = {s: fw[s] for s in prog.saved}
    bound.update({f"grad:{o}": cts[o] for o in prog.outputs})
    return run_graph(run_pipeline(prog.backward), bound, ctx)


def test_f16_norm_of_small_activations_has_finite_gradients(monkeypatch):
    """The bugs this policy fixed: an RMSNorm of a matmul output of small values (|h| ~
    0.02, rstd ~ 50) kept rstd in f16, whose backward (rstd cubed ~ 1.2e5) overflows f16's
    65,504: inf and nan gradients on the torch backend (blues01, minimax and yoco trained
    to a nan loss at step 2 under --precision f16). With rsqrt in fp32 that is finite; with
    activations ten times smaller the gradient of mean(h * h), that rstd-cubed term, still
    overflowed in the cast back to the f16 mean (minimax's 3-layer training, the loss scaled
    by 256): h * h is fp32 now, as torch code's h.pow(2) is under autocast. Both are finite
    and close to the fp32 program's gradients; each old policy overflows."""
    graph = _norm_graph(16)
    gen = torch.Generator().manual_seed(0)
    vals = {"x": torch.randn(2, 5, 16, generator=gen) * 0.1,
            "w": torch.randn(16, 16, generator=gen) * 0.05,
            "g": 1.0 + 0.1 * torch.randn(16, generator=gen)}
    cts = {"y": torch.randn(2, 5, 16, generator=gen)}
    tiny = dict(vals, x=vals["x"] * 0.1)
    for v in (vals, tiny):
        want = _norm_grads(graph, v, cts)
        got = _norm_grads(mixed_precision(graph, "f16"), v, cts)
        for k in ("grad:x", "grad:w", "grad:g"):
            assert torch.isfinite(got[k]).all(), k
            err = float((got[k].float() - want[k]).abs().max() / want[k].abs().max())
            assert err < 8 * 2 ** -10, (k, err)

    def overflows(v):
        old = _norm_grads(mixed_precision(graph, "f16"), v, cts)
        return not all(torch.isfinite(old[k]).all() for k in ("grad:x", "grad:w"))
    # the square in f16 (x * x on type promotion alone): the smaller activations overflow
    monkeypatch.setattr(mp, "_square", lambda n: False)
    assert overflows(tiny) and not overflows(vals)
    # without the fp32 list either (the first policy), the larger ones overflow too
    monkeypatch.setattr(mp, "FP32_OPS", frozenset())
    assert overflows(vals)


@pytest.mark.parametrize("path,sets", [("llama.yaml", {}), ("blues01.yaml", {}),
                                       ("minimax.yaml", {}), ("yoco.yaml", {}),
                                       ("optimus_prime.yaml", {}), ("medit_one.yaml", {}),
                                       ("medit_one.yaml", {"moe": 1})],
                         ids=["llama", "blues01", "minimax", "yoco", "optimus_prime",
                              "medit_one", "medit_one-moe"])
def test_pattern_passes_fuse_the_same_sites_in_low_precision(path, sets):
    """The fp32 softmax over bf16 scores (attention, the MoE router) and the fp32 decay
    product (retention) are matched through the casts around them: every zoo site that
    fuses in fp32 fuses under mixed precision, with the same records."""
    from lmc.passes.fuse_linear_attention import fuse_linear_attention
    from lmc.passes.fuse_moe_gating import fuse_moe_gating
    from lmc.passes.fuse_rope_attention import fuse_rope_attention

    g = lmc.compile_model(os.path.join(ZOO, path), "tiny", sets).graph

    def records(dt):
        h = run_pipeline(mixed_precision(g, dt))
        out = []
        for f in (fuse_rope_attention, fuse_moe_gating, fuse_linear_attention):
            out += [(r["pass"], r["status"]) for r in f(h).meta.get("fusions", [])]
        return out
    want = records("f32")
    assert records("bf16") == want
    # every model but medit_one (no softmax attention) has a fused attention; medit_one's
    # MoE option a fused gating
    site = ("fuse_moe_gating" if sets else "fuse_rope_attention", "fused")
    assert site in want or (path == "medit_one.yaml" and not sets), want


def test_a_norms_fp32_x_rstd_is_recomputed_not_saved():
    """Under mixed precision a norm of a matmul output computes cast(h) * rstd in fp32; the
    backward recomputes it from the saved f16 h and the per-row rstd (cast(h) is exact from
    h), instead of forward' storing an fp32 [B, T, d] at twice h's bytes. Its gradients are
    those of the program that saves it."""
    graph = mixed_precision(_norm_graph(24), "f16")
    prog = differentiate(graph, ["x", "w", "g"])
    saved = [prog.forward.outputs[s].type for s in prog.saved]
    full = [t for t in saved if t.rank == 3 and t.shape[-1] == 24]       # [B, T, d]
    assert [t.dtype.value for t in full] == ["f16"], saved
    gen = torch.Generator().manual_seed(1)
    vals = {"x": torch.randn(2, 5, 16, generator=gen), "w": torch.randn(16, 24, generator=gen)
            * 0.3, "g": 1.0 + 0.1 * torch.randn(24, generator=gen)}
    cts = {"y": torch.randn(2, 5, 24, generator=gen)}
    got = _norm_grads(graph, vals, cts)
    want = _norm_grads(_norm_graph(24), vals, cts)                            # fp32
    for k in ("grad:x", "grad:w", "grad:g"):
        err = float((got[k].float() - want[k]).abs().max() / want[k].abs().max())
        assert err < 8 * 2 ** -10, (k, err)


def test_f16_gradients_need_the_loss_scale_the_trainer_applies():
    """Why f16 training scales its loss (lmc/runtime/train.py): yoco's cross-decoder norm
    weight has gradients ~1e-6, below f16's smallest normal, and unscaled they come out 27%
    off the fp32 program's; scaled by the trainer's first scale and divided after, every
    gradient is within a few f16 roundings (measured 1.6e-3)."""
    from lmc.runtime.train import INIT_LOSS_SCALE

    src = lmc.load(os.path.join(ZOO, "yoco.yaml"), preset="tiny").graph
    gen = torch.Generator().manual_seed(0)
    ids, targets = (torch.randint(0, 512, (2, 13), generator=gen) for _ in range(2))

    def grads(g, scale):
        return loss_and_grads(g, "torch", ids, targets, scale=scale)[2]

    ref = grads(run_pipeline(with_loss(src)), 1.0)
    f16 = run_pipeline(with_loss(mixed_precision(src, "f16")))
    unscaled, scaled = grads(f16, 1.0), grads(f16, INIT_LOSS_SCALE)
    name = "cross_layers.0.mixer_norm.weight"
    assert float(ref[name].abs().max()) < 2 ** -14          # f16's smallest normal
    assert _max_rel({name: unscaled[name]}, {name: ref[name]}) > 0.1
    assert _max_rel(scaled, ref) < 4 * 2 ** -10


EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_a_linear_bias_is_added_in_the_products_dtype(dtype):
    # x @ W + b is nn.Linear, whose bias autocast adds in the product's dtype: GPT-2's q, k,
    # v (and its MLP) stay low precision instead of promoting to fp32 at the bias
    g = mixed_precision(lmc.load(os.path.join(EXAMPLES, "gpt2.yaml"), preset="tiny").graph,
                        dtype)
    biased = [n for n in g.nodes if n.op is Op.ADD and any(i.op is Op.MATMUL for i in n.inputs)
              and any(i.op is Op.CAST and i.inputs[0].op is Op.PARAM for i in n.inputs)]
    assert len(biased) == 8                                  # qkv, out, fc1, fc2 per layer
    assert all(n.type.dtype.value == dtype for n in biased)
    # any other sum with an fp32 tensor still promotes (the residual stream stays fp32)
    resid = [n for n in g.nodes if n.op is Op.ADD and n.type.dtype.value == "f32"]
    assert resid


def test_a_narrowing_cast_of_a_view_casts_the_viewed_value():
    # cast(reshape(expand(reshape(k)))) for a product: cast k, then broadcast it (exact), so
    # a K cache holds GQA's kv heads in the low dtype and k's producer stores it narrow
    g = mixed_precision(lmc.load(os.path.join(EXAMPLES, "gemma2.yaml"), preset="tiny").graph,
                        "bf16")
    narrowing = [n for n in g.nodes if n.op is Op.CAST and n.type.dtype.value == "bf16"
                 and n.inputs[0].type.dtype.value == "f32"]
    assert narrowing and not any(n.inputs[0].op in (Op.PERMUTE, Op.RESHAPE, Op.EXPAND)
                                 for n in narrowing)
    from lmc.passes.decode import decode_step
    from lmc.passes.mixed_precision import low_precision_weights
    step = decode_step(low_precision_weights(
        lmc.load(os.path.join(EXAMPLES, "gemma2.yaml"), preset="tiny").graph, "bf16"))
    keys = [s for s in step.states if s.kind in ("ring", "cache") and len(s.shape) == 4]
    assert keys and all(s.dtype.value == "bf16" and s.shape[1] == 2 for s in keys)  # kv heads
