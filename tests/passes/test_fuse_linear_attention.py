"""fuse_linear_attention: decayed linear attention written in its parallel form
((q @ k^T * exp(G_t - G_s)) @ v, G = cumsum of log-decays) becomes one fused op whose chunked
kernels (lmc/codegen/linear_attention.py, in Triton's interpreter here) equal the primitives,
forward and every gradient (q, k, v and the gates, through the op's fused backward); the zoo's
retention and lightning layers fuse; near misses say which condition failed.

Errors are max |got - want| / max |want| per tensor (fp32: < 1e-5). The gates' gradient is the
reverse cumsum of q.dq - k.dk, a difference of terms that cancel exactly when T = 1 (the output
does not depend on the gate there): it is measured against max(|dg|, |q.dq|)."""
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ZOO

import lmc
from lmc.cli import main
from lmc.codegen.program import apply_patterns
from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.passes import run_pipeline
from lmc.passes.autodiff import differentiate
from lmc.passes.fuse_linear_attention import fuse_linear_attention
from lmc.passes.mixed_precision import mixed_precision
from lmc.runtime.executor import bind_dims, run_graph
from lmc.runtime.triton_backend import TritonProgram

B, T = Dim.sym("B"), Dim.sym("T")
H, DK, DV = 2, 16, 8
ERRORS = {}     # case -> max errors (printed with -s)


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def rel(got, want, floor=0.0):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(max(floor, 1e-30))).item()


def _decay_matrix(b, ld, heads=H, window=0, fill=-float("inf")):
    G = b.cumsum(ld, -1)
    lead = [ld.shape[0], heads] if ld.rank == 3 else [heads]
    diff = b.reshape(G, lead + [T, 1]) - b.reshape(G, lead + [1, T])
    return b.exp(b.where(b.causal_mask(T, T, window=window), diff, fill))


def _linear_attention(gates="token", scale=None, dtype="f32", product="low", qk_heads=H):
    """o = ((q @ k^T) [* scale] * D) @ v over inputs q, k, v (and ld [B, H, T] for per-token
    gates; a fixed per-head decay expanded from [1, H, 1] ("head") or [H, 1] ("head2")
    constants otherwise). In a low dtype the fp32 D is cast down (product "low"), or the
    scores are cast up and the fp32 product rounded for the product with v ("f32", as the
    mixed-precision pass writes a data-dependent decay's product). qk_heads=1: one q and one
    k shared by every head (Mamba-2's C and B), broadcast by the products."""
    b = Builder({}, {})
    q, k = (b.input(n, [B, qk_heads, T, DK], dtype) for n in "qk")
    v = b.input("v", [B, H, T, DV], dtype)
    if gates == "token":
        ld = b.input("ld", [B, H, T], "f32")
    elif gates == "head":
        s = torch.tensor([-0.3, -0.02]).view(1, H, 1)
        ld = b.expand(b.const(s), [1, H, T])
    else:                  # "head2": the fixed decay as [H, T]
        ld = b.expand(b.const(torch.tensor([[-0.1], [-0.7]])), [H, T])
    s = q @ b.transpose(k, -2, -1)
    if scale is not None:
        s = s * scale
    D = _decay_matrix(b, ld)
    if dtype != "f32" and product == "f32":
        o = b.cast(b.cast(s, "f32") * D, dtype) @ v
    else:
        if dtype != "f32":     # a fixed decay under mixed precision: D cast to q's dtype
            D = b.cast(D, dtype)
        o = (s * D) @ v
    return run_pipeline(Graph("la", b.nodes, {"o": o.node}))


def _records(g, status=None):
    return [f for f in g.meta["fusions"] if f["pass"] == "fuse_linear_attention"
            and (status is None or f["status"] == status)]


def _values(t, gates, seed, qk_heads=H):
    gen = torch.Generator().manual_seed(seed)
    vals = {"q": torch.randn(2, qk_heads, t, DK, generator=gen),
            "k": torch.randn(2, qk_heads, t, DK, generator=gen) * DK ** -0.5,
            "v": torch.randn(2, H, t, DV, generator=gen)}
    if gates == "token":   # yoco's gates: logsigmoid(.)/16 is mild; these decay faster
        vals["ld"] = F.logsigmoid(2 * torch.randn(2, H, t, generator=gen) + 1)
    return vals, gen


def _run_both(g, f, vals, wrt, gen):
    """Forward and gradients (random cotangent) of the primitive graph by the torch oracle
    and of the fused graph by the triton program (interpreter)."""
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)["o"]
    got = TritonProgram(f).run(vals, ctx)["o"]
    gy = torch.randn(want.shape, generator=gen)
    grads, kinds = [], set()
    for graph, tri in ((g, False), (f, True)):
        prog = differentiate(graph, wrt)
        back = run_pipeline(prog.backward)
        fw = (TritonProgram(prog.forward).run if tri else
              (lambda b, c, gr=prog.forward: run_graph(gr, b, c)))(vals, ctx)
        bound = {s: fw[s] for s in prog.saved}
        bound["grad:o"] = gy
        if tri:
            bp = TritonProgram(back, label="backward")
            kinds = {n.attrs["kind"] for n in bp.graph.nodes if n.op is Op.FUSED}
            grads.append(bp.run(bound, ctx))
        else:
            grads.append(run_graph(back, bound, ctx))
    return got, want, grads[1], grads[0], kinds


def _errors(got, want, gg, gw, vals, wrt, shapes=False):
    """The output's and each gradient's error relative to the oracle's; the decay's measured
    against the largest |q . dq| (its gradient is a difference of such terms; shapes: each
    gradient of its input's shape)."""
    errs = {"o": rel(got, want)}
    for w in wrt:
        if shapes:
            assert gg[f"grad:{w}"].shape == vals[w].shape
        floor = (vals["q"] * gw["grad:q"]).sum(-1).abs().max().item() if w == "ld" else 0.0
        errs[w] = rel(gg[f"grad:{w}"], gw[f"grad:{w}"], floor)
    return errs


CASES = [  # T, chunk, gates, scale: chunks that do (32/16, 64/32) and do not divide T
    (63, 16, "token", None),
    (200, 32, "token", 0.5),
    (200, 64, "head", None),
    (32, 16, "token", None),
    (64, 32, "head", 0.25),
    (63, 32, "head2", None),
    (1, 16, "token", None),
    (1, 64, "head", None),
]


@pytest.mark.parametrize("t,chunk,gates,scale", CASES)
def test_fused_equals_primitives_forward_and_gradients(t, chunk, gates, scale):
    g = _linear_attention(gates, scale)
    f = fuse_linear_attention(g, chunk=chunk)
    (r,) = _records(f)
    assert r["status"] == "fused" and f"chunk {chunk}" in r["reason"]
    (fused,) = [n for n in f.nodes if n.op is Op.FUSED]
    assert fused.attrs["kind"] == "linear_attention" and not any(
        n.op in (Op.CUMSUM, Op.EXP, Op.MATMUL) for n in f.nodes)
    opts = fused.attrs["body"].meta["options"]
    assert opts["scale"] == (1.0 if scale is None else scale) and opts["chunk"] == chunk
    assert opts["decay"] == ("per_token" if gates == "token" else "per_head")
    assert opts["decay_grad"] == (gates == "token")
    assert fused.attrs.get("no_grad", ()) == (() if gates == "token" else (3,))
    vals, gen = _values(t, gates, seed=t + chunk)
    wrt = ["q", "k", "v"] + (["ld"] if gates == "token" else [])
    got, want, gg, gw, kinds = _run_both(g, f, vals, wrt, gen)
    assert kinds == {"linear_attention_bwd"}
    errs = _errors(got, want, gg, gw, vals, wrt)
    ERRORS[(t, chunk, gates, scale)] = errs
    print((t, chunk, gates, scale), " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("t,chunk,gates", [(63, 16, "token"), (200, 64, "head"),
                                          (1, 16, "token")])
def test_q_and_k_shared_by_every_head_fuse(t, chunk, gates):
    """q, k [B, 1, T, d_k] read by every head of v [B, H, T, d_v] (Mamba-2's C and B, one
    group): the kernels read them at stride 0 and sum their gradients over the heads."""
    g = _linear_attention(gates, qk_heads=1)
    f = fuse_linear_attention(g, chunk=chunk)
    (r,) = _records(f)
    assert r["status"] == "fused", r
    vals, gen = _values(t, gates, seed=t, qk_heads=1)
    wrt = ["q", "k", "v"] + (["ld"] if gates == "token" else [])
    got, want, gg, gw, kinds = _run_both(g, f, vals, wrt, gen)
    assert kinds == {"linear_attention_bwd"} and got.shape == (2, H, t, DV)
    errs = _errors(got, want, gg, gw, vals, wrt, shapes=True)
    assert max(errs.values()) < 1e-5, errs


def test_backward_kernels_write_the_gradient_outputs(monkeypatch):
    """dq, dk, dv are written by the backward kernels into the op's outputs (no copy after);
    only the decay's gradient (summed to its broadcast shape) is copied out."""
    from lmc.codegen import linear_attention as LA
    copied = []
    real_copy, real_launch = torch.Tensor.copy_, LA.launch_template

    def launch(template, xs, outs, opts):
        monkeypatch.setattr(torch.Tensor, "copy_",
                            lambda self, src, *a: copied.append(tuple(self.shape))
                            or real_copy(self, src, *a))
        try:
            real_launch(template, xs, outs, opts)
        finally:
            monkeypatch.setattr(torch.Tensor, "copy_", real_copy)
    monkeypatch.setattr(LA, "launch_template", launch)
    g = _linear_attention("token", None)
    f = fuse_linear_attention(g, chunk=16)
    vals, gen = _values(63, "token", seed=1)
    got, want, gg, gw, _ = _run_both(g, f, vals, ["q", "k", "v", "ld"], gen)
    assert copied == [(2, H, 63)]               # the decay's gradient alone
    for w in "qkv":
        assert rel(gg[f"grad:{w}"], gw[f"grad:{w}"]) < 1e-5


@pytest.mark.parametrize("gates,product", [("token", "low"), ("head", "low"),
                                           ("token", "f32")])
def test_f16_inputs_fuse_and_match_the_f16_oracle(gates, product):
    """q, k, v in f16 (the interpreter has no bf16) and the fp32 decay matrix through a cast,
    or the fp32 product of the widened scores and D rounded to f16 (the mixed-precision
    pass's program for learned gates): the region fuses, and the kernels (fp32 state and
    decays) are at least as close to the fp32 math as the f16 primitives are."""
    g = _linear_attention(gates, dtype="f16", product=product)
    f = fuse_linear_attention(g, chunk=16)
    assert [r["status"] for r in _records(f)] == ["fused"]
    vals, gen = _values(40, gates, seed=3)
    vals.update({n: vals[n].half() for n in "qkv"})
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)["o"]
    got = TritonProgram(f).run(vals, ctx)["o"]
    assert got.dtype == want.dtype == torch.float16
    exact = run_graph(_linear_attention(gates), {n: x.float() for n, x in vals.items()},
                      ctx)["o"]
    e_fused, e_prims = rel(got, exact), rel(want, exact)
    print(gates, f"f16 fused {e_fused:.1e}, f16 primitives {e_prims:.1e}")
    assert e_fused < 2e-3 and e_fused <= 1.5 * e_prims, (e_fused, e_prims)


def test_fp32_inputs_under_mixed_precision_fuse():
    """f32 q, k, v under mixed precision: the pass casts each to f16 before its transpose
    (a cast of a view casts the viewed value), so the products read f16 inputs and the
    region fuses; the kernels match the f16 primitives' program as closely as above."""
    g = run_pipeline(mixed_precision(_linear_attention("head"), "f16"))
    f = fuse_linear_attention(g, chunk=16)
    assert [r["status"] for r in _records(f)] == ["fused"]
    vals, _ = _values(40, "head", seed=3)
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)["o"]
    got = TritonProgram(f).run(vals, ctx)["o"]
    exact = run_graph(_linear_attention("head"), vals, ctx)["o"]
    e_fused, e_prims = rel(got, exact), rel(want, exact)
    assert e_fused < 2e-3 and e_fused <= 1.5 * e_prims, (e_fused, e_prims)


@pytest.mark.parametrize("zoo,sites", [("yoco.yaml", 1), ("minimax.yaml", 1)])
def test_zoo_sites_fuse_under_mixed_precision(zoo, sites):
    g = lmc.compile_model(os.path.join(ZOO, zoo), "tiny").graph
    for dt in ("bf16", "f16"):
        f = fuse_linear_attention(run_pipeline(mixed_precision(g, dt)))
        assert [r["status"] for r in _records(f)] == ["fused"] * sites


def test_near_misses_say_why():
    # a sliding-window decay mask: the chunked kernels carry the whole past
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, H, T, DK], "f32") for n in "qkv")
    ld = b.input("ld", [B, H, T], "f32")
    o = ((q @ b.transpose(k, -2, -1)) * _decay_matrix(b, ld, window=8)) @ v
    (r,) = _records(fuse_linear_attention(run_pipeline(Graph("w", b.nodes, {"o": o.node}))))
    assert r["status"] == "declined" and r["reason"].startswith("sliding-window decay mask")
    # masked after the exp, where(mask, exp(diff), 0): canonicalize rewrites it into the
    # -inf form when the mask is a causal_mask (fused); any other mask is a near miss
    for causal in (True, False):
        b = Builder({}, {})
        q, k, v = (b.input(n, [B, H, T, DK], "f32") for n in "qkv")
        G = b.cumsum(b.input("ld", [B, H, T], "f32"), -1)
        diff = b.reshape(G, [B, H, T, 1]) - b.reshape(G, [B, H, 1, T])
        mask = b.causal_mask(T, T) if causal else b.input("m", [T, T], "bool")
        D = b.where(mask, b.exp(diff), 0.0)
        o = ((q @ b.transpose(k, -2, -1)) * D) @ v
        (r,) = _records(fuse_linear_attention(run_pipeline(Graph("z", b.nodes,
                                                                 {"o": o.node}))))
        if causal:
            assert r["status"] == "fused", r
        else:
            assert r["status"] == "declined" and r["reason"].startswith(
                "the factor beside q @ k^T is where, not a decay mask"), r
    # the decay matrix also read outside the attention
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, H, T, DK], "f32") for n in "qkv")
    D = _decay_matrix(b, b.input("ld", [B, H, T], "f32"))
    o = ((q @ b.transpose(k, -2, -1)) * D) @ v
    g = run_pipeline(Graph("u", b.nodes, {"o": o.node, "d": D.node}))
    (r,) = _records(fuse_linear_attention(g))
    assert r["status"] == "declined" and r["reason"] == \
        "exp inside the linear attention is also used outside it (by output d)"
    assert any(n.op is Op.EXP for n in fuse_linear_attention(g).nodes)
    # a cast between k^T and the product (written so: the mixed-precision pass casts k
    # before its transpose, test below)
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, H, T, DK], "f16") for n in "qkv")
    kt = b.cast(b.transpose(b.cast(k, "f32"), -2, -1), "f16")
    o = ((q @ kt) * b.cast(_decay_matrix(b, b.input("ld", [B, H, T], "f32")), "f16")) @ v
    (r,) = _records(fuse_linear_attention(run_pipeline(Graph("c", b.nodes, {"o": o.node}))))
    assert r["status"] == "declined" and r["reason"] == "a cast between k^T and q @ k^T"
    # scores scaled by a tensor
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, H, T, DK], "f32") for n in "qkv")
    ld = b.input("ld", [B, H, T], "f32")
    w = b.input("w", [B, H, T, 1], "f32")
    o = ((q @ b.transpose(k, -2, -1)) * w * _decay_matrix(b, ld)) @ v
    (r,) = _records(fuse_linear_attention(run_pipeline(Graph("s", b.nodes, {"o": o.node}))))
    assert r["status"] == "declined" and r["reason"] == \
        "scores scaled by a tensor, not a constant"
    # decays not from a cumsum (a cumprod of decays instead of a cumsum of log-decays)
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, H, T, DK], "f32") for n in "qkv")
    G = b.cumprod(b.input("ld", [B, H, T], "f32"), -1)
    diff = b.reshape(G, [B, H, T, 1]) - b.reshape(G, [B, H, 1, T])
    D = b.exp(b.where(b.causal_mask(T, T), diff, -float("inf")))
    o = ((q @ b.transpose(k, -2, -1)) * D) @ v
    (r,) = _records(fuse_linear_attention(run_pipeline(Graph("c", b.nodes, {"o": o.node}))))
    assert r["status"] == "declined" and r["reason"] == \
        "G is cumprod, not a cumsum of log-decays"


def test_output_use_is_reported_exactly():
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, H, T, DK], "f32") for n in "qkv")
    D = _decay_matrix(b, b.input("ld", [B, H, T], "f32"))
    o = ((q @ b.transpose(k, -2, -1)) * D) @ v
    g = run_pipeline(Graph("u", b.nodes, {"o": o.node, "d": (D * 2.0).node}))
    (r,) = _records(fuse_linear_attention(g))
    assert r["status"] == "declined" and r["reason"] == \
        "exp inside the linear attention is also used outside it (by mul)"


def test_shared_decay_matrix_fuses_both_attentions():
    """Two attentions over one D (CSE shares it): both fuse, each body recomputes D; with a
    third, outside reader of D, both decline and nothing is removed."""
    def build(outside):
        b = Builder({}, {})
        q, k, v, q2 = (b.input(n, [B, H, T, DK], "f32") for n in ("q", "k", "v", "q2"))
        D = _decay_matrix(b, b.input("ld", [B, H, T], "f32"))
        o1 = ((q @ b.transpose(k, -2, -1)) * D) @ v
        o2 = ((q2 @ b.transpose(k, -2, -1)) * D) @ v
        outs = {"o1": o1.node, "o2": o2.node}
        if outside:
            outs["d"] = b.sum(D, -1).node
        return run_pipeline(Graph("two", b.nodes, outs))
    f = fuse_linear_attention(build(False))
    assert [r["status"] for r in _records(f)] == ["fused", "fused"]
    assert sum(n.op is Op.FUSED for n in f.nodes) == 2 and not any(
        n.op is Op.EXP for n in f.nodes)
    f = fuse_linear_attention(build(True))
    assert [r["status"] for r in _records(f)] == ["declined", "declined"]
    assert all("also used outside" in r["reason"] for r in _records(f))
    assert not any(n.op is Op.FUSED for n in f.nodes)


def test_unrelated_graphs_get_no_records():
    for name in ("llama", "blues01", "medit_one", "optimus_prime"):
        g = lmc.compile_model(os.path.join(ZOO, f"{name}.yaml"), "tiny").graph
        assert _records(fuse_linear_attention(g)) == [], name
    # yoco in sliding-window mode has no linear attention
    g = lmc.compile_model(os.path.join(ZOO, "yoco.yaml"), "tiny",
                          {"sliding_window": 16}).graph
    assert _records(fuse_linear_attention(g)) == []


@pytest.mark.parametrize("zoo,sites", [("yoco.yaml", 12), ("minimax.yaml", 14)])
def test_cli_reports_every_zoo_site(zoo, sites, capsys):
    """Default sizes: yoco's 12 retention self-decoder layers, minimax's 14 lightning layers
    (16 layers, softmax in layers 8 and 16): one fused record each, one forward and one
    backward kernel each."""
    assert main(["compile", os.path.join(ZOO, zoo), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    full = apply_patterns(lmc.compile_model(os.path.join(ZOO, zoo)).graph)
    for fusions in (s["fusions"], full.meta["fusions"]):
        recs = [f for f in fusions if f["pass"] == "fuse_linear_attention"]
        assert len(recs) == sites and all(f["status"] == "fused" for f in recs)
        assert len({f["where"] for f in recs}) == sites
    fw, bw = (s["kernels"][g]["list"] for g in ("forward", "backward"))
    assert sum(k["kind"] == "linear_attention" for k in fw) == sites
    assert sum(k["kind"] == "linear_attention_bwd" for k in bw) == sites
    assert main(["compile", os.path.join(ZOO, zoo), "--preset", "tiny", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "fuse_linear_attention" in out and "cumsum of" in out


# a linear-attention model written by hand in the parallel form (no zoo blocks): per layer a
# retention-like mixer with learned per-token gates and a scaled score, then a lightning-like
# one with a fixed per-head decay
HAND = """\
name: hand_linear_attention
config: {vocab: 48, d: 16, heads: 2, hd: 8, layers: 1, max_seq: 256}
blocks:
  gated:                  # learned per-token log-decays, scaled scores
    args: [x]
    params: {wq: [d, d], wk: [d, d], wv: [d, d], wgate: [d, heads], wo: [d, d]}
    body:
      - q = permute(reshape(x @ wq, [B, T, heads, hd]), [0, 2, 1, 3])
      - k = permute(reshape(x @ wk, [B, T, heads, hd]), [0, 2, 1, 3])
      - v = permute(reshape(x @ wv, [B, T, heads, hd]), [0, 2, 1, 3])
      - ld = permute(logsigmoid(x @ wgate), [0, 2, 1])
      - G = cumsum(ld, -1)
      - diff = reshape(G, [B, heads, T, 1]) - reshape(G, [B, heads, 1, T])
      - D = exp(where(causal_mask(T), diff, -inf))
      - o = ((q @ transpose(k, -2, -1)) * hd ** -0.5 * D) @ v
      - return reshape(permute(o, [0, 2, 1, 3]), [B, T, d]) @ wo
  fixed:                  # a fixed decay per head, as lightning attention
    args: [x]
    params: {wq: [d, d], wk: [d, d], wv: [d, d], wo: [d, d]}
    body:
      - q = silu(permute(reshape(x @ wq, [B, T, heads, hd]), [0, 2, 1, 3]))
      - k = silu(permute(reshape(x @ wk, [B, T, heads, hd]), [0, 2, 1, 3]))
      - v = permute(reshape(x @ wv, [B, T, heads, hd]), [0, 2, 1, 3])
      - lam = reshape(-(2.0 ** (-cast(iota(heads) + 1, 'f32'))), [1, heads, 1])
      - F = cumsum(expand(lam, [1, heads, T]), -1)
      - E = exp(where(causal_mask(T), reshape(F, [1, heads, T, 1]) - reshape(F, [1, heads, 1, T]),
                      -inf))
      - o = ((q @ transpose(k, -2, -1)) * E) @ v
      - return reshape(permute(o, [0, 2, 1, 3]), [B, T, d]) @ wo
model:
  inputs:
    ids: [B, T]
  params:
    embed: [vocab, d]
    head: [d, vocab]
  body:
    - x = embedding(embed, ids)
    - for: i
      in: layers
      body:
        - x = x + gated(x, name='mix')
        - x = x + fixed(x, name='mix2')
    - logits = x @ head
  outputs: [logits]
"""


@pytest.mark.parametrize("t", [63, 1])
def test_hand_written_model_triton_equals_torch(tmp_path, t):
    """The hand-written YAML: both mixers fuse (the compile summary lists them), and the
    triton model (fused kernels, interpreter) equals the torch model (primitives, torch
    autograd) in logits and every parameter's gradient, gates' projection included."""
    path = tmp_path / "hand.yaml"
    path.write_text(HAND)
    c = lmc.compile_model(str(path))
    recs = _records(fuse_linear_attention(c.graph))
    assert [r["status"] for r in recs] == ["fused", "fused"]
    assert "per-token" in recs[0]["reason"] and "scale 0.3536" in recs[0]["reason"]
    assert "fixed per-head" in recs[1]["reason"]
    tri = lmc.load(str(path), backend="triton")
    ref = lmc.load(str(path))
    ref.autodiff = "torch"
    ref.load_state_dict(tri.state_dict())
    gen = torch.Generator().manual_seed(t)
    ids = torch.randint(0, 48, (2, t), generator=gen)
    t0 = time.perf_counter()
    yt, yr = tri(ids), ref(ids)
    assert rel(yt, yr) < 1e-5
    up = torch.randn(yr.shape, generator=gen)
    (yt * up).sum().backward()
    (yr * up).sum().backward()
    pr = dict(ref.named_parameters())
    # at T = 1 the gate's true gradient is exactly 0 (D = 1) and the kernel's is rounding
    # (~1e-20): each gradient is measured against max(its own size, 1e-3 of the largest)
    top = max(p.grad.abs().max().item() for p in pr.values())
    for n, p in tri.named_parameters():
        assert rel(p.grad, pr[n].grad, 1e-3 * top) < 1e-4, n
    assert time.perf_counter() - t0 < 60
    prog = tri.program()
    for exe, kind in ((prog.forward_exec, "linear_attention"),
                      (prog.backward_exec, "linear_attention_bwd")):
        assert sum(n.op is Op.FUSED and n.attrs["kind"] == kind
                   for n in exe.graph.nodes) == 2



def test_hand_written_model_decodes_with_a_constant_state(tmp_path):
    """The decode step of the hand-written YAML: the mixer whose scale is on the scores,
    ((q @ k^T) * c * D) @ v, keeps a d_k x d_v state as the unscaled one does (it was decoded
    as softmax-free attention over K, V and G caches growing per token: 136 B/token), one
    decode_linear_attention each, and decode = forward on both backends, dynamic and static."""
    from conftest import decode_worst

    from lmc.passes.decode import decode_step
    from lmc.runtime.decoder import Decoder

    path = tmp_path / "hand.yaml"
    path.write_text(HAND)
    ref = lmc.load(str(path), seed=2).eval()
    tri = lmc.load(str(path), backend="triton", seed=2).eval()
    tri.load_state_dict(ref.state_dict())
    states = decode_step(ref.graph).states
    assert [(s.kind, s.bytes_per_token()) for s in states] == [("state", 0)] * 2
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ref(ids)
    for model, backend in ((ref, "torch"), (tri, "triton")):
        for static in (False, True):
            dec = Decoder(model, backend, static=static, **({"max_len": 12} if static else {}))
            if backend == "triton":
                kinds = [n.attrs["kind"] for n in dec.graph.nodes if n.op is Op.FUSED]
                assert kinds.count("decode_linear_attention") == 2, kinds
            for k in (0, 1, 4):
                assert decode_worst(dec, ids, full, k) < 1e-5, (backend, static, k)


def test_f16_fp32_product_gradients_are_as_close_as_the_primitives():
    """The mixed-precision form's gradients (q, k, v, the learned gates): the fused backward
    kernels and the f16 primitives, each against the fp32 program's."""
    g = _linear_attention("token", dtype="f16", product="f32")
    f = fuse_linear_attention(g, chunk=16)
    assert [r["status"] for r in _records(f)] == ["fused"]
    vals, gen = _values(37, "token", seed=5)
    vals.update({n: vals[n].half() for n in "qkv"})
    gy = torch.randn(2, H, 37, DV, generator=gen)
    wrt = ["q", "k", "v", "ld"]

    def grads(graph, xs, tri):
        prog = differentiate(graph, wrt)
        ctx = RefCtx(dims=bind_dims(graph, xs))
        fw = TritonProgram(prog.forward).run(xs, ctx) if tri else \
            run_graph(prog.forward, xs, ctx)
        bound = {s: fw[s] for s in prog.saved}
        bound["grad:o"] = gy.to(fw["o"].dtype)
        back = run_pipeline(prog.backward)
        if tri:
            bp = TritonProgram(back, label="backward")
            assert "linear_attention_bwd" in {n.attrs["kind"] for n in bp.graph.nodes
                                              if n.op is Op.FUSED}
            return bp.run(bound, ctx)
        return run_graph(back, bound, ctx)
    exact = grads(_linear_attention("token"), {n: x.float() for n, x in vals.items()}, False)
    fused, prims = grads(f, vals, True), grads(g, vals, False)
    for w in wrt:
        e_fused, e_prims = (rel(x[f"grad:{w}"], exact[f"grad:{w}"]) for x in (fused, prims))
        print(w, f"f16 fused {e_fused:.1e}, f16 primitives {e_prims:.1e}")
        assert e_fused < 4e-3 and e_fused <= 1.5 * e_prims + 1e-4, (w, e_fused, e_prims)


# -- G_t - G_s written with unit dims (canonicalize rewrites it into the reshapes above) -------
def _unit_dim_linear_attention(spelling, gates="token", disable=()):
    """((q @ k^T) * D) @ v with the decay written over a [.., T, 1] cumsum:
    "transpose": G = cumsum(ld4, 2) of a [.., T, 1] ld4, D = exp(where(mask, G - G^T, -inf));
    "reshaped": reshape(cumsum(ld4, 2), [.., T]) then the usual reshapes;
    "cumsum-of-reshape": G = cumsum(reshape(ld, [B, H, T, 1]), 2) of the [B, H, T] input, then
    G - G^T; "heads-swapped": G = transpose(cumsum(ld4, 1), 1, 2) of a [B, T, H, 1] ld4 (the
    gates summed in the projection's layout), then G - G^T. ld4 is the input ld [B, H, T, 1]
    ([B, T, H, 1] heads-swapped; per-token gates) or a fixed per-head decay expand([1, H, 1, 1]
    constant, [1, H, T, 1]) (likewise)."""
    b = Builder({}, {})
    q, k = (b.input(n, [B, H, T, DK], "f32") for n in "qk")
    v = b.input("v", [B, H, T, DV], "f32")
    lead = [B, H] if gates == "token" else [1, H]
    swapped = spelling == "heads-swapped"
    if gates == "token" and spelling == "cumsum-of-reshape":
        ld4 = b.reshape(b.input("ld", [B, H, T], "f32"), [B, H, T, 1])
    elif gates == "token":
        ld4 = b.input("ld", [B, T, H, 1] if swapped else [B, H, T, 1], "f32")
    else:
        decay = torch.tensor([-0.3, -0.02])
        ld4 = b.expand(b.const(decay.view(1, 1, H, 1)), [1, T, H, 1]) if swapped else \
            b.expand(b.const(decay.view(1, H, 1, 1)), [1, H, T, 1])
    G = b.transpose(b.cumsum(ld4, 1), 1, 2) if swapped else b.cumsum(ld4, 2)
    if spelling == "reshaped":
        G = b.reshape(G, lead + [T])
        diff = b.reshape(G, lead + [T, 1]) - b.reshape(G, lead + [1, T])
    else:
        diff = G - b.transpose(G, -2, -1)
    D = b.exp(b.where(b.causal_mask(T, T), diff, -float("inf")))
    o = ((q @ b.transpose(k, -2, -1)) * D) @ v
    return run_pipeline(Graph("la4", b.nodes, {"o": o.node}), disable=disable)


@pytest.mark.parametrize("spelling,gates", [
    ("transpose", "token"), ("transpose", "head"), ("reshaped", "token"),
    ("reshaped", "head"), ("cumsum-of-reshape", "token"), ("heads-swapped", "token"),
    ("heads-swapped", "head")])
def test_a_decay_over_unit_dims_fuses_and_equals_the_model_as_written(spelling, gates):
    """The decay over a [B, H, T, 1] cumsum (G - transpose(G, -2, -1), or the cumsum reshaped
    to [B, H, T]): canonicalize makes it the reshapes of a [B, H, T] cumsum (bitwise the same
    forward as written), so the pass fuses it (before: declined, 'G_t - G_s is not a
    difference of two reshapes of one G' / 'G is reshape, not a cumsum of log-decays'), and
    the kernels equal the graph as written, forward and every gradient. Summed along T in
    the [B, T, H, 1] layout and then transposed, the cumsum is moved after the transpose
    first (before: 'G is permute, not a cumsum of log-decays')."""
    raw = _unit_dim_linear_attention(spelling, gates, disable=["canonicalize"])
    g = _unit_dim_linear_attention(spelling, gates)
    (r,) = _records(fuse_linear_attention(raw))
    assert r["status"] == "declined" and r["reason"] == (
        "G is permute, not a cumsum of log-decays" if spelling == "heads-swapped" else
        "G_t - G_s reads G through transposes or unit-dim reshapes, which canonicalize "
        "rewrites into reshapes of a cumsum over [.., T] (disabled?)"), r
    (cum,) = [n for n in g.nodes if n.op is Op.CUMSUM]
    assert cum.type.rank == 3 and not any(n.op is Op.PERMUTE and n.type.shape[-1] == T
                                          and n.type.shape[-2] == 1 for n in g.nodes)
    f = fuse_linear_attention(g, chunk=16)
    (r,) = _records(f)
    assert r["status"] == "fused", r
    want = ("per-token log-decays [B, 2, T] (learned)" if gates == "token" else
            "fixed per-head decay [1, 2, T]")
    assert want in r["reason"], r
    (fused,) = [n for n in f.nodes if n.op is Op.FUSED]
    assert fused.attrs["body"].meta["options"]["decay"] == \
        ("per_token" if gates == "token" else "per_head")
    vals, gen = _values(37, gates, seed=11)
    if gates == "token" and spelling != "cumsum-of-reshape":
        vals["ld"] = vals["ld"][..., None]
    if gates == "token" and spelling == "heads-swapped":
        vals["ld"] = vals["ld"].transpose(1, 2).contiguous()
    ctx = RefCtx(dims=bind_dims(raw, vals))
    assert torch.equal(run_graph(g, vals, ctx)["o"], run_graph(raw, vals, ctx)["o"])
    wrt = ["q", "k", "v"] + (["ld"] if gates == "token" else [])
    got, want, gg, gw, kinds = _run_both(raw, f, vals, wrt, gen)
    assert kinds == {"linear_attention_bwd"}
    errs = _errors(got, want, gg, gw, vals, wrt, shapes=True)
    assert max(errs.values()) < 1e-5, errs


def _near_miss(case):
    b = Builder({}, {})
    q, k, v = (b.input(n, [B, H, T, DK], "f32") for n in "qkv")
    if case == "unit-axis":         # cumsum along the trailing unit axis: no sum over time
        G = b.cumsum(b.input("ld", [B, H, T, 1], "f32"), -1)
    elif case == "reshaped-unit-axis":      # the same, reshaped to [B, H, T] before G_t - G_s
        G = b.reshape(b.cumsum(b.input("ld", [B, H, T, 1], "f32"), -1), [B, H, T])
        diff = b.reshape(G, [B, H, T, 1]) - b.reshape(G, [B, H, 1, T])
    else:                           # "cumprod"
        G = b.cumprod(b.input("ld", [B, H, T, 1], "f32"), 2)
    if case != "reshaped-unit-axis":
        diff = G - b.transpose(G, -2, -1)
    D = b.exp(b.where(b.causal_mask(T, T), diff, -float("inf")))
    o = ((q @ b.transpose(k, -2, -1)) * D) @ v
    return run_pipeline(Graph("nm", b.nodes, {"o": o.node}))


@pytest.mark.parametrize("case,reason", [
    ("unit-axis", "G is a cumsum along axis 3 of [B, 2, T, 1], not along time (the axis of "
                  "length T, only unit dims after it)"),
    ("reshaped-unit-axis", "G is a cumsum along axis 3 of [B, 2, T, 1], not along time (the "
                           "axis of length T, only unit dims after it)"),
    ("cumprod", "G is cumprod, not a cumsum of log-decays")])
def test_unit_dim_decays_that_are_not_a_cumsum_over_time_decline(case, reason):
    """Only views that add, drop or move unit dims of a cumsum along T are rewritten: a
    cumsum along the unit axis or a cumprod keep their graph and decline, the record naming
    why. (A transpose that swaps heads and time after the cumsum is moved before it: the
    heads-swapped spelling above.)"""
    g = _near_miss(case)
    assert not any(n.op is Op.CUMSUM and n.type.rank == 3 for n in g.nodes)
    (r,) = _records(fuse_linear_attention(g))
    assert r["status"] == "declined" and r["reason"] == reason, r


# the hand-written model with its decays over [.., T, 1] cumsums: GATED and FIXED are each
# mixer's two lines computing the exponent `diff` (per-token gates ld4 [B, heads, T, 1];
# a fixed per-head decay lam [1, heads, T, 1])
UNIT_DIMS = """\
name: unit_dim_decays
config: {vocab: 48, d: 16, heads: 2, hd: 8, layers: 1, max_seq: 256}
blocks:
  gated:
    args: [x]
    params: {wq: [d, d], wk: [d, d], wv: [d, d], wgate: [d, heads], wo: [d, d]}
    body:
      - q = permute(reshape(x @ wq, [B, T, heads, hd]), [0, 2, 1, 3])
      - k = permute(reshape(x @ wk, [B, T, heads, hd]), [0, 2, 1, 3]) * hd ** -0.5
      - v = permute(reshape(x @ wv, [B, T, heads, hd]), [0, 2, 1, 3])
      - ld4 = reshape(permute(logsigmoid(x @ wgate), [0, 2, 1]), [B, heads, T, 1])
      GATED
      - D = exp(where(causal_mask(T), diff, -inf))
      - o = ((q @ transpose(k, -2, -1)) * D) @ v
      - return reshape(permute(o, [0, 2, 1, 3]), [B, T, d]) @ wo
  fixed:
    args: [x]
    params: {wq: [d, d], wk: [d, d], wv: [d, d], wo: [d, d]}
    body:
      - q = silu(permute(reshape(x @ wq, [B, T, heads, hd]), [0, 2, 1, 3]))
      - k = silu(permute(reshape(x @ wk, [B, T, heads, hd]), [0, 2, 1, 3]))
      - v = permute(reshape(x @ wv, [B, T, heads, hd]), [0, 2, 1, 3])
      - lam = reshape(-(2.0 ** (-cast(iota(heads) + 1, 'f32'))), [1, heads, 1, 1])
      FIXED
      - E = exp(where(causal_mask(T), diff, -inf))
      - o = ((q @ transpose(k, -2, -1)) * E) @ v
      - return reshape(permute(o, [0, 2, 1, 3]), [B, T, d]) @ wo
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d], head: [d, vocab]}
  body:
    - x = embedding(embed, ids)
    - for: i
      in: layers
      body:
        - x = x + gated(x, name='mix')
        - x = x + fixed(x, name='mix2')
    - logits = x @ head
  outputs: [logits]
"""
_UNIT_SPELLINGS = {   # name: (GATED, FIXED)
    "transpose": ("- G = cumsum(ld4, 2)\n      - diff = G - transpose(G, -2, -1)",
                  "- F = cumsum(expand(lam, [1, heads, T, 1]), 2)\n"
                  "      - diff = F - transpose(F, -2, -1)"),
    "reshaped": ("- G = reshape(cumsum(ld4, 2), [B, heads, T])\n"
                 "      - diff = reshape(G, [B, heads, T, 1]) - reshape(G, [B, heads, 1, T])",
                 "- F = reshape(cumsum(expand(lam, [1, heads, T, 1]), 2), [1, heads, T])\n"
                 "      - diff = reshape(F, [1, heads, T, 1]) - reshape(F, [1, heads, 1, T])"),
}


@pytest.mark.parametrize("spelling", list(_UNIT_SPELLINGS))
def test_a_model_with_unit_dim_decays_fuses_in_training_and_decode(tmp_path, spelling):
    """A YAML model whose two mixers write the decay over [B, H, T, 1] cumsums: the passes'
    forward equals the model as written bitwise, both mixers fuse (lmc compile --explain), the
    triton model equals the torch one in logits and gradients, and lmc verify's decode check
    passes with one decode_linear_attention per mixer and no per-token cache for them
    (before: both declined, and decode kept the decays' G per token)."""
    from lmc.driver import compile_model
    from lmc.runtime.module import LmcModel
    from lmc.verify import format_rows, verify

    gated, fixed = _UNIT_SPELLINGS[spelling]
    path = tmp_path / f"{spelling}.yaml"
    path.write_text(UNIT_DIMS.replace("GATED", gated).replace("FIXED", fixed))
    c = lmc.compile_model(str(path))
    recs = _records(fuse_linear_attention(c.graph))
    assert [r["status"] for r in recs] == ["fused", "fused"], recs
    assert "per-token log-decays [B, 2, T]" in recs[0]["reason"] and \
        "scale" not in recs[0]["reason"]
    assert "fixed per-head decay [1, 2, T]" in recs[1]["reason"]
    ref = lmc.load(str(path), seed=1)
    ref.autodiff = "torch"
    raw = LmcModel(compile_model(str(path), disable=["canonicalize"]).graph, seed=1)
    raw.load_state_dict(ref.state_dict())
    tri = lmc.load(str(path), backend="triton", seed=1)
    tri.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(3)
    for t in (1, 7, 40):
        ids = torch.randint(0, 48, (2, t), generator=gen)
        assert torch.equal(raw(ids), ref(ids)), t
    yt, yr = tri(ids), ref(ids)
    assert rel(yt, yr) < 1e-5
    up = torch.randn(yr.shape, generator=gen)
    (yt * up).sum().backward()
    (yr * up).sum().backward()
    pr = dict(ref.named_parameters())
    top = max(p.grad.abs().max().item() for p in pr.values())
    for n, p in tri.named_parameters():
        assert rel(p.grad, pr[n].grad, 1e-3 * top) < 1e-4, n
    rows = verify(str(path), skip=["causal", "grads", "triton"])
    assert all(r.ok for r in rows), format_rows(rows)
    assert "(2 decode_linear_attention)" in rows[-1].detail, rows[-1].detail
    assert "0 B/token" in rows[-1].detail, rows[-1].detail
    assert main(["compile", str(path), "--explain"]) == 0
