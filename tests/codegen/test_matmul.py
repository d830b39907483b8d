"""Matmul kernels with fused epilogues in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors)
against the oracle (the unfused graph run op by op): ragged and odd shapes, fp32 and fp16,
batched and broadcast operands, permuted (strided) operands, epilogues, the gated dual matmul,
intermediate outputs, declines, random graphs, and the llama on the triton backend."""
import os

import pytest
import torch
from conftest import ZOO
from hypothesis import given, settings
from hypothesis import strategies as st

import lmc
from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.passes.fuse_matmul import fuse_matmul
from lmc.runtime.executor import bind_dims, run_graph
from lmc.runtime.triton_backend import TritonProgram

LLAMA = os.path.join(ZOO, "llama.yaml")
B, T = Dim.sym("B"), Dim.sym("T")
TOL = {"f32": dict(rtol=1e-5, atol=1e-5), "f16": dict(rtol=1e-2, atol=1e-2)}


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _mm_kernels(p: TritonProgram):
    return [n for n in p.graph.nodes if n.op is Op.FUSED and n.attrs["kind"] == "matmul"]


def check(g: Graph, vals, dtype="f32", kernels=None):
    """Run `g` through the fused program and the oracle; every output must agree."""
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)
    p = TritonProgram(g)
    got = run_graph(p.graph, vals, ctx, p.impl)
    if kernels is not None:
        assert len(_mm_kernels(p)) == kernels, p.graph
    assert not any(n.op is Op.MATMUL for n in p.graph.nodes), p.graph
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        tol = TOL["f16" if dtype == "f16" or want[k].dtype == torch.float16 else "f32"]
        torch.testing.assert_close(got[k].float(), want[k].float(), **tol)
    return p


def rand(*shape, dtype="f32", gen=None):
    return torch.randn(*shape, generator=gen).to(getattr(torch, {"f32": "float32",
                                                                 "f16": "float16"}[dtype]))


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 17, 31), (17, 33, 3), (31, 65, 64),
                                   (33, 1, 65), (64, 64, 17), (65, 3, 33), (1, 65, 64)])
def test_odd_shapes_with_a_bias_epilogue(m, n, k, dtype):
    b = Builder({}, {})
    x = b.input("x", [m, k], dtype)
    w = b.input("w", [k, n], dtype)
    bias = b.input("bias", [n], dtype)
    g = Graph("mm", b.nodes, {"y": b.relu(x @ w + bias).node})
    check(g, {"x": rand(m, k, dtype=dtype), "w": rand(k, n, dtype=dtype),
              "bias": rand(n, dtype=dtype)}, dtype, kernels=1)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_projection_residual_and_activations(dtype):
    """x[B, T, K] @ W: B*T rows in one 2-D product; epilogues from bias to cast; an
    intermediate read outside the group is a second output of the same kernel."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 33], dtype)
    w = b.input("w", [33, 65], dtype)
    res = b.input("res", [B, T, 65], dtype)
    bias = b.input("bias", [65], dtype)
    h = x @ w + bias
    gl = b.gelu(h) * 0.5 + res
    outs = {"h": h.node, "gl": gl.node, "t": b.tanh(h).node,
            "c": b.cast(b.silu(x @ w), "f32" if dtype == "f16" else "f16").node,
            "v": b.reshape(x @ w, [B, T, 5, 13]).node}
    g = Graph("proj", b.nodes, outs)
    vals = {"x": rand(2, 5, 33, dtype=dtype), "w": rand(33, 65, dtype=dtype) * 0.3,
            "res": rand(2, 5, 65, dtype=dtype), "bias": rand(65, dtype=dtype)}
    p = check(g, vals, dtype)
    assert len(_mm_kernels(p)) <= 3


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (17, 33, 65), (64, 65, 31)])
def test_an_f16_product_read_by_its_epilogue_is_rounded_first(m, n, k):
    """The graph's f16 matmul yields f16 values: an epilogue reading the product (a weight
    gradient's cast to f32, a residual add) reads it rounded to f16, as the oracle does, not
    the wider fp32 accumulator. Every value of cast(x @ w) is an f16 value, and with the add
    the result equals the oracle's f16 sum to its rounding."""
    b = Builder({}, {})
    x, w = b.input("x", [m, k], "f16"), b.input("w", [k, n], "f16")
    res = b.input("res", [m, n], "f16")
    prod = x @ w
    g = Graph("mm", b.nodes, {"y": b.cast(prod, "f32").node, "z": (prod + res).node})
    gen = torch.Generator().manual_seed(2)
    vals = {"x": rand(m, k, dtype="f16", gen=gen), "w": rand(k, n, dtype="f16", gen=gen),
            "res": rand(m, n, dtype="f16", gen=gen)}
    p = check(g, vals, "f16", kernels=1)
    ctx = RefCtx(dims=bind_dims(g, vals))
    y = run_graph(p.graph, vals, ctx, p.impl)["y"]
    assert y.dtype == torch.float32 and torch.equal(y.half().float(), y)
    src = p.source
    assert ".to(tl.float16).to(tl.float32)" in src


def test_batched_broadcast_operands():
    """Batch dims broadcast on either side (stride 0), epilogue inputs broadcast over the
    batch but not over rows (no folding into M), and a rank-2 A against a batched B."""
    b = Builder({}, {})
    x = b.input("x", [B, 1, T, 17], "f32")
    w = b.input("w", [3, 17, 31], "f32")
    cos = b.input("cos", [T, 31], "f32")
    hs = b.input("hs", [B, 3, 1, 1], "f32")
    a2 = b.input("a2", [T, 5], "f32")
    w2 = b.input("w2", [B, 5, 3], "f32")
    y = (x @ w) * cos + hs
    g = Graph("bmm", b.nodes, {"y": y.node, "z": b.exp(a2 @ w2).node})
    for bb, tt in [(2, 7), (1, 1), (3, 33)]:
        check(g, {"x": rand(bb, 1, tt, 17), "w": rand(3, 17, 31), "cos": rand(tt, 31),
                  "hs": rand(bb, 3, 1, 1), "a2": rand(tt, 5), "w2": rand(bb, 5, 3)},
              kernels=2)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_permuted_operands_attention_scores(dtype):
    """q @ k^T with both operands PERMUTE views of projections, read through their strides;
    a transposed weight; scale and mask in the epilogue."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 32], dtype)
    wq = b.input("wq", [32, 32], dtype)
    wk = b.input("wk", [32, 32], dtype)
    wt = b.input("wt", [17, 32], dtype)   # stored [out, in]: applied as x @ wt^T
    q = b.permute(b.reshape(x @ wq, [B, T, 2, 16]), [0, 2, 1, 3])
    k = b.permute(b.reshape(x @ wk, [B, T, 2, 16]), [0, 2, 1, 3])
    s = b.where(b.causal_mask(T), (q @ b.transpose(k, -2, -1)) * 0.25, -1e4)
    g = Graph("att", b.nodes, {"s": s.node, "o": (x @ b.transpose(wt, 0, 1)).node})
    for bb, tt in [(2, 9), (1, 1)]:
        check(g, {"x": rand(bb, tt, 32, dtype=dtype), "wq": rand(32, 32, dtype=dtype) * 0.3,
                  "wk": rand(32, 32, dtype=dtype) * 0.3, "wt": rand(17, 32, dtype=dtype)},
              dtype, kernels=2)   # x @ wq, x @ wk and x @ wt^T: one horizontal launch


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_projections_of_one_input_are_one_launch(dtype):
    """x @ Wq, x @ Wk, x @ Wv with GQA-sized k, v (N 40, 6, 6: ragged, not block multiples),
    a transposed weight view as a fourth sibling and silu(x @ W0) as a fifth (a product with
    its own epilogue): one kernel, each output its own store."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 24], dtype)
    ws = [b.input(f"w{i}", [24, n], dtype) for i, n in enumerate([40, 6, 6])]
    wt = b.transpose(b.input("wt", [9, 24], dtype), 0, 1)   # a view standing before x @ w0
    outs = {f"o{i}": x @ w for i, w in enumerate([wt] + ws)}
    outs["e"] = b.silu(x @ ws[0])                            # an epilogue: joins too
    g = Graph("qkv", b.nodes, {k: v.node for k, v in outs.items()})
    gen = torch.Generator().manual_seed(0)
    for bb, tt in [(1, 1), (2, 9), (3, 70)]:
        vals = {"x": rand(bb, tt, 24, dtype=dtype, gen=gen),
                **{f"w{i}": rand(24, n, dtype=dtype, gen=gen) * 0.3
                   for i, n in enumerate([40, 6, 6])},
                "wt": rand(9, 24, dtype=dtype, gen=gen) * 0.3}
        p = check(g, vals, dtype, kernels=1)
    (h,) = _mm_kernels(p)
    assert sum(m.op is Op.MATMUL for m in h.attrs["body"].nodes) == 5
    rec = [f for f in p.graph.meta["fusions"] if f["pass"] == "fuse_matmul"]
    assert any(f["reason"] == "5 matmuls sharing A, one launch + epilogues silu"
               for f in rec), rec


def _siblings(dtype, K=24):
    """x @ W0..W3, each product its own epilogue: a bias and gelu; a scale and a residual
    (and the product itself returned too); sigmoid times a [T, N] table broadcast over B
    (batch dims then cannot fold into M); none. N 40, 9, 6, 33: ragged."""
    b = Builder({}, {})
    x = b.input("x", [B, T, K], dtype)
    ws = [b.input(f"w{i}", [K, n], dtype) for i, n in enumerate([40, 9, 6, 33])]
    bias = b.input("bias", [40], dtype)
    res = b.input("res", [B, T, 9], dtype)
    tab = b.input("tab", [T, 6], dtype)
    p1 = x @ ws[1]
    outs = {"o0": b.gelu(x @ ws[0] + bias), "o1": p1 * 0.5 + res, "p1": p1,
            "o2": b.sigmoid(x @ ws[2]) * tab, "o3": x @ ws[3]}
    g = Graph("siblings", b.nodes, {k: v.node for k, v in outs.items()})

    def values(bb, tt, gen):
        return {"x": rand(bb, tt, K, dtype=dtype, gen=gen),
                **{f"w{i}": rand(K, n, dtype=dtype, gen=gen) * 0.3
                   for i, n in enumerate([40, 9, 6, 33])},
                "bias": rand(40, dtype=dtype, gen=gen), "res": rand(bb, tt, 9, dtype=dtype,
                                                                    gen=gen),
                "tab": rand(tt, 6, dtype=dtype, gen=gen)}
    return g, values


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_siblings_with_their_own_epilogues_are_one_launch(dtype):
    """Matmuls of one A whose products each run their own pointwise epilogue (the gate and
    the q, k, v projections of a linear-attention layer) are one horizontal launch: every
    column tile runs its product's epilogue and stores that product's outputs. Ragged B, T
    (1 row; 70 rows: two row tiles), equal to the oracle; the kernel is generated once."""
    g, values = _siblings(dtype)
    gen = torch.Generator().manual_seed(3)
    for bb, tt in [(1, 1), (2, 9), (3, 70)]:
        p = check(g, values(bb, tt, gen), dtype, kernels=1)
    (h,) = _mm_kernels(p)
    assert sum(m.op is Op.MATMUL for m in h.attrs["body"].nodes) == 4
    (rec,) = [f["reason"] for f in p.graph.meta["fusions"]
              if f["pass"] == "fuse_matmul" and f["status"] == "fused"]
    assert rec.startswith("4 matmuls sharing A, one launch + epilogues "), rec
    for op in ("gelu", "sigmoid"):
        assert op in rec, rec
    if dtype == "f32":      # training: the forward' and backward programs, ragged T
        vals = values(2, 7, gen)
        assert len(_check_grads(g, vals, gen)) == len(vals)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_sibling_epilogues_under_split_k(dtype, monkeypatch):
    """Few rows: the horizontal launch splits K; each product's last slice runs its epilogue
    (the others' masks are off). 16x16x16 tiles and K = 70 (five K steps, three slices):
    equal to the oracle, bitwise the same twice, every tile counter back at zero."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "interpret_blocks", lambda m, n, k: (16, 16, 16))
    monkeypatch.setattr(matmul, "INTERPRET_SPLIT_K", 3)
    g, values = _siblings(dtype, K=70)
    gen = torch.Generator().manual_seed(4)
    for bb, tt in [(1, 1), (3, 1), (2, 5)]:
        vals = values(bb, tt, gen)
        p = check(g, vals, dtype, kernels=1)
        ctx = RefCtx(dims=bind_dims(g, vals))
        one, two = (run_graph(p.graph, vals, ctx, p.impl) for _ in range(2))
        assert all(torch.equal(one[k], two[k]) for k in one)
    _, counters = matmul._split_buffers(torch.device("cpu"))
    assert not counters.any()
    src = matmul.generate(_mm_kernels(p)[0].attrs["body"], "k")
    assert "SPLIT_K > 1" in src and "_acc(" in src


def test_siblings_with_epilogues_take_their_shared_rmsnorm(monkeypatch):
    """RMSNorm read by three products, two with epilogues: once they are one launch, the norm
    is read only inside it and becomes its prologue (no norm kernel)."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "INTERPRET_TILE", 16 * 16)
    b = Builder({}, {})
    K = 37
    x = b.input("x", [B, T, K], "f32")
    w = b.input("w", [K], "f32")
    h = _rmsnorm(b, x, w)
    ws = [b.input(f"w{i}", [K, n], "f32") for i, n in enumerate([24, 5, 7])]
    g = Graph("norm_siblings", b.nodes, {"q": b.silu(h @ ws[0]).node,
                                         "g": b.sigmoid(h @ ws[1]).node,
                                         "v": (h @ ws[2]).node})
    gen = torch.Generator().manual_seed(6)
    for bb, tt in [(1, 1), (2, 9)]:
        vals = {"x": rand(bb, tt, K, gen=gen) * 3, "w": rand(K, gen=gen),
                **{f"w{i}": rand(K, n, gen=gen) * 0.2 for i, n in enumerate([24, 5, 7])}}
        p = check(g, vals, kernels=1)
    assert len([n for n in p.graph.nodes if n.op is Op.FUSED]) == 1   # no norm kernel
    (rec,) = [f["reason"] for f in p.graph.meta["fusions"]
              if f["pass"] == "fuse_matmul" and f["status"] == "fused"]
    assert rec.startswith("rmsnorm prologue + 3 matmuls sharing A, one launch + "), rec


def test_a_norm_read_by_two_matmul_kernels_says_why_it_is_its_own_kernel():
    """A parallel block: one RMSNorm feeding three projections and a gated pair (SwiGLU):
    two launches share A, so the norm is not a prologue, and --explain says so for each
    (it said nothing). Equal to the oracle."""
    b = Builder({}, {})
    K = 19
    x = b.input("x", [B, T, K], "f32")
    w = b.input("w", [K], "f32")
    h = _rmsnorm(b, x, w)
    qkv = [b.input(f"w{i}", [K, 8], "f32") for i in range(3)]
    wg, wu = b.input("wg", [K, 6], "f32"), b.input("wu", [K, 6], "f32")
    outs = {f"p{i}": (h @ wi).node for i, wi in enumerate(qkv)}
    outs["mlp"] = (b.silu(h @ wg) * (h @ wu)).node
    g = Graph("parallel", b.nodes, outs)
    gen = torch.Generator().manual_seed(3)
    vals = {"x": rand(2, 5, K, gen=gen), "w": rand(K, gen=gen),
            **{f"w{i}": rand(K, 8, gen=gen) for i in range(3)},
            "wg": rand(K, 6, gen=gen), "wu": rand(K, 6, gen=gen)}
    p = check(g, vals)
    why = [f["reason"] for f in p.graph.meta["fusions"]
           if f["pass"] == "fuse_matmul" and f["status"] == "declined"
           and "computing A is also read by" in f["reason"]]
    assert sorted(why) == sorted([
        "the rmsnorm computing A is also read by 2 matmul(s) of another kernel (a gated "
        "pair or another product group): it stays its own kernel, a prologue being computed "
        "by one kernel",
        "the rmsnorm computing A is also read by 3 matmul(s) of another kernel (a gated "
        "pair or another product group): it stays its own kernel, a prologue being computed "
        "by one kernel"]), why


def test_a_late_epilogue_node_leaves_the_sibling_launch():
    """sigmoid(x @ Wg) * s where s is computed from the first sibling's product (an
    attention output gated by a projection of the same input): the sigmoid runs in the one
    launch of x's products, the product with s is left out (said why) and runs after s, in
    the kernel computing s. Equal to the oracle; gradients too (random cotangents)."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 24], "f32")
    wq = b.input("wq", [24, 16], "f32")
    wg = b.input("wg", [24, 16], "f32")
    s = b.softmax(x @ wq, -1)
    g = Graph("late", b.nodes, {"y": (b.sigmoid(x @ wg) * s).node})
    gen = torch.Generator().manual_seed(7)
    vals = {"x": rand(2, 9, 24, gen=gen), "wq": rand(24, 16, gen=gen) * 0.3,
            "wg": rand(24, 16, gen=gen) * 0.3}
    p = check(g, vals, kernels=1)
    (h,) = _mm_kernels(p)
    assert sum(m.op is Op.MATMUL for m in h.attrs["body"].nodes) == 2
    assert any(f["status"] == "declined" and "left out of the launch of matmuls sharing A"
               in f["reason"] for f in p.graph.meta["fusions"]), p.graph.meta["fusions"]
    assert _check_grads(g, vals, gen) == {"grad:x", "grad:wq", "grad:wg"}


def test_scalar_ops_after_a_view_run_in_the_epilogue():
    """logsigmoid(x @ Wg) permuted to [B, H, T], then divided by a constant and scaled
    (yoco's retention gates): the division and the scale run before the view, in the
    matmul's epilogue, so there is no pointwise kernel. A view read twice stays as it is
    (its other reader needs the value before the op). Equal to the oracle, ragged shapes."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 24], "f32")
    wg = b.input("wg", [24, 5], "f32")
    gates = b.permute(b.logsigmoid(x @ wg), [0, 2, 1])
    sunk = (gates / 16.0) * 0.5
    twice = b.reshape(x @ wg, [B, T * 5])
    g = Graph("sink", b.nodes, {"g": sunk.node, "r": twice.node, "s": (twice * 2.0).node})
    gen = torch.Generator().manual_seed(9)
    for bb, tt in [(1, 1), (2, 9), (3, 70)]:
        p = check(g, {"x": rand(bb, tt, 24, gen=gen), "wg": rand(24, 5, gen=gen)})
    kinds = [n.attrs["kind"] for n in p.graph.nodes if n.op is Op.FUSED]
    assert kinds.count("matmul") == 1 and kinds.count("pointwise") == 1, kinds
    (mm,) = _mm_kernels(p)
    ops = {n.op for n in mm.attrs["body"].nodes}
    assert Op.DIV in ops and Op.PERMUTE not in ops


def test_a_dead_sibling_stays_out_of_the_launch():
    """A product nothing reads (no DCE before fusion here: hypothesis found it) does not join
    its siblings' launch, which stores only what is read."""
    b = Builder({}, {})
    x = b.input("x", [B, 3, 5], "f32")
    w, w3 = b.input("w", [5, 4], "f32"), b.input("w3", [5, 4], "f32")
    y = b.softplus(x @ w)
    x @ w3                                                   # read by nothing
    g = Graph("dead", b.nodes, {"y": y.node})
    gen = torch.Generator().manual_seed(8)
    p = check(g, {"x": rand(2, 3, 5, gen=gen), "w": rand(5, 4, gen=gen),
                  "w3": rand(5, 4, gen=gen)})
    assert all(sum(m.op is Op.MATMUL for m in n.attrs["body"].nodes) == 1
               for n in _mm_kernels(p))
    # a gated pair whose combination nothing reads is no horizontal launch (hypothesis too)
    b = Builder({}, {})
    x = b.input("x", [B, 1, 1], "f32")
    w, w3 = b.input("w", [1, 1], "f32"), b.input("w3", [1, 1], "f32")
    mm = x @ w
    b.clamp(mm + x @ w3, -30.0, 30.0)                        # read by nothing
    g = Graph("dead_gate", b.nodes, {"o": b.clamp(b.exp(mm), -30.0, 30.0).node})
    check(g, {"x": rand(2, 1, 1, gen=gen), "w": rand(1, 1, gen=gen),
              "w3": rand(1, 1, gen=gen)})


@pytest.mark.parametrize("n2", [7, 1])
def test_siblings_the_horizontal_form_cannot_run_stay_apart(n2):
    """A sibling is merged only when every value its group stores comes from its product
    and every member leads to one (the horizontal kernel stores per product): a member
    nothing reads (no DCE here), or exp(s) stored because its reader (pow with a tensor
    exponent, not fusible) was declined, keeps the sibling its own launch. Before, such a
    body fell to the single-product path with the first product's N: a shape error, or
    with a one-column sibling (n2 = 1) stores past its output. Equal to the oracle."""
    gen = torch.Generator().manual_seed(10)
    for case in ("dead", "stored"):
        b = Builder({}, {})
        x = b.input("x", [B, 3, 5], "f32")
        w1, w2 = b.input("w1", [5, 4], "f32"), b.input("w2", [5, n2], "f32")
        s = b.input("s", [B, 3, n2], "f32")
        y1, m2 = x @ w1, x @ w2
        if case == "dead":
            b.relu(m2)                                           # read by nothing
            outs = {"y1": y1, "y2": b.sigmoid(m2)}
        else:
            x2 = b.sigmoid(m2)
            outs = {"y1": y1, "x2": x2, "u": b.pow(b.exp(s), x2)}
        g = Graph(case, b.nodes, {k: v.node for k, v in outs.items()})
        p = check(g, {"x": rand(2, 3, 5, gen=gen), "w1": rand(5, 4, gen=gen),
                      "w2": rand(5, n2, gen=gen), "s": rand(2, 3, n2, gen=gen)})
        assert len(_mm_kernels(p)) == 2, case


def test_a_horizontal_launch_with_k_zero_still_stores():
    """K = 0: the products are zeros and the epilogues still run (sigmoid gives 0.5); the
    launch used to return early and leave its outputs unwritten."""
    b = Builder({}, {})
    x = b.input("x", [B, 3, 0], "f32")
    w1, w2 = b.input("w1", [0, 4], "f32"), b.input("w2", [0, 6], "f32")
    g = Graph("k0", b.nodes, {"y1": (x @ w1).node, "y2": b.sigmoid(x @ w2).node})
    p = check(g, {"x": torch.empty(2, 3, 0), "w1": torch.empty(0, 4),
                  "w2": torch.empty(0, 6)}, kernels=1)
    vals = {"x": torch.empty(2, 3, 0), "w1": torch.empty(0, 4), "w2": torch.empty(0, 6)}
    got = p.run(vals, RefCtx(dims=bind_dims(g, vals)))
    assert torch.equal(got["y2"], torch.full((2, 3, 6), 0.5))


def _check_grads(g: Graph, vals, gen):
    """The forward' and backward programs of `g` on the triton backend against the oracle's
    (random cotangents); returns the gradients' names."""
    from lmc.passes import run_pipeline
    from lmc.passes.autodiff import differentiate

    ctx = RefCtx(dims=bind_dims(g, vals))
    prog = differentiate(g)
    back = run_pipeline(prog.backward)
    fw = TritonProgram(prog.forward).run(vals, ctx)
    ref_fw = run_graph(prog.forward, vals, ctx)
    for k in ref_fw:
        torch.testing.assert_close(fw[k], ref_fw[k], rtol=1e-5, atol=1e-5)
    bound = {s: fw[s] for s in prog.saved}
    ref_bound = {s: ref_fw[s] for s in prog.saved}
    for name in prog.outputs:
        bound[f"grad:{name}"] = ref_bound[f"grad:{name}"] = torch.randn(
            fw[name].shape, generator=gen)
    got = TritonProgram(back, label="backward").run(bound, ctx)
    want = run_graph(back, ref_bound, ctx)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    return set(want)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_llama_qkv_projections_are_one_launch_per_layer(precision):
    """Also under mixed precision, where each weight's cast stands just before its matmul:
    the k and v casts move up to the q projection."""
    from lmc.passes.mixed_precision import mixed_precision

    g = lmc.load(LLAMA, preset="tiny").graph
    if precision != "f32":
        g = mixed_precision(g, precision)
    rec = [f["reason"] for f in fuse_matmul(g).meta["fusions"] if f["status"] == "fused"]
    # 2 layers; the attention norm is the kernel's prologue (nothing else reads it here)
    assert rec.count("rmsnorm prologue + 3 matmuls sharing A, one launch") == 2, rec


def _rmsnorm(b, x, w, order=0):
    r = b.rsqrt(b.mean(x * x, -1) + 1e-5)
    return (x * r) * w if order == 0 else w * (r * x)


def _norm_matmuls(b, h, K, kind, wdt):
    """The norm's output h read by matmuls by weights w0 [K, 24], w1, w2 [K, 5]: "gated":
    silu(h @ w1) * (h @ w2); "single": h @ w0; otherwise each h @ wi (horizontal)."""
    ws = [b.input(f"w{i}", [K, n], wdt) for i, n in enumerate([24, 5, 5])]
    if kind == "gated":
        outs = {"o": (b.silu(h @ ws[1]) * (h @ ws[2])).node}
    elif kind == "single":
        outs = {"o": (h @ ws[0]).node}
    else:
        outs = {f"o{i}": (h @ wi).node for i, wi in enumerate(ws)}
    return Graph("norm_mm", b.nodes, outs)


@pytest.mark.parametrize("kind,dtype", [(k, d) for k in ("horizontal", "gated", "single",
                                                           "cast") for d in ("f32", "f16")]
                         + [("wcast", "f32")])
def test_rmsnorm_is_the_matmul_prologue(kind, dtype, monkeypatch):
    """RMSNorm read only by the matmul(s): the kernel accumulates sum(x^2) along its K loop,
    scales A tiles by w and the accumulators by rsqrt(mean + eps): one kernel, no norm
    launch. Interpreter tiles of 16 x 16, so K = 37 takes three K steps (the last ragged)."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "INTERPRET_TILE", 16 * 16)
    b = Builder({}, {})
    K = 37
    x = b.input("x", [B, T, K], dtype)
    w = b.input("w", [K], "f16" if kind == "wcast" else dtype)
    if kind == "wcast":         # a norm weight stored in f16, widened where it is used
        w = b.cast(w, "f32")
    h = _rmsnorm(b, x, w, order=int(kind == "gated"))
    if kind == "cast":
        h = b.cast(h, "f16")
    g = _norm_matmuls(b, h, K, kind, {"cast": "f16", "wcast": "f32"}.get(kind, dtype))
    gen = torch.Generator().manual_seed(1)
    for bb, tt in [(1, 1), (2, 9)]:
        vals = {"x": rand(bb, tt, K, dtype=dtype, gen=gen) * 3,
                "w": rand(K, dtype="f16" if kind == "wcast" else dtype, gen=gen),
                **{f"w{i}": rand(K, n, dtype={"cast": "f16", "wcast": "f32"}.get(kind, dtype),
                                 gen=gen) * 0.2
                   for i, n in enumerate([24, 5, 5])}}
        p = check(g, vals, "f16" if kind == "cast" else dtype, kernels=1)
    assert len([n for n in p.graph.nodes if n.op is Op.FUSED]) == 1   # no norm kernel
    (rec,) = [f for f in p.graph.meta["fusions"]
              if f["pass"] == "fuse_matmul" and f["status"] == "fused"]
    assert rec["reason"].startswith("rmsnorm prologue + "), rec


def _layernorm(b, x, w, bias=None, order=0):
    xc = x - b.mean(x, -1)
    r = b.rsqrt(b.mean(xc * xc, -1) + 1e-5)
    y = (xc * r) * w if order == 0 else w * (r * xc)
    if bias is None:
        return y
    return y + bias if order == 0 else bias + y


@pytest.mark.parametrize("kind,dtype,bias", [(k, d, True) for k in ("horizontal", "gated",
                                                                     "single", "cast")
                                             for d in ("f32", "f16")]
                         + [("wcast", "f32", True), ("single", "f32", False),
                            ("cast", "f32", False), ("rms_bias", "f32", True),
                            ("rms_bias", "f16", True)])
def test_layernorm_is_the_matmul_prologue(kind, dtype, bias, monkeypatch):
    """LayerNorm (GPT-2's, with a bias; MPT's, without) or an RMSNorm with a bias, read only
    by the matmul(s): the kernel computes each row's statistics in first loops over K (the
    mean, then the variance about it) and normalises each A tile before the dot: one kernel,
    no norm launch. In fp32 x sits far from zero (mean 40, spread 3), where E[x^2] - E[x]^2
    would lose the variance (in f16 at mean 2: an f16 oracle rounds the mean to f16's 0.03
    steps at 40 and is the less exact one there); K = 37 in three 16-wide steps, the last
    ragged."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "INTERPRET_TILE", 16 * 16)
    b = Builder({}, {})
    K = 37
    vec = "f16" if kind == "wcast" else dtype
    x = b.input("x", [B, T, K], dtype)
    w = b.input("w", [K], vec)
    bv = b.input("b", [K], vec) if bias else None
    if kind == "wcast":         # weight and bias stored in f16, widened where they are used
        w, bv = b.cast(w, "f32"), b.cast(bv, "f32")
    if kind == "rms_bias":
        h = _rmsnorm(b, x, w) + bv
    else:
        h = _layernorm(b, x, w, bv, order=int(kind == "gated"))
    if kind == "cast":
        h = b.cast(h, "f16")
    wdt = {"cast": "f16", "wcast": "f32"}.get(kind, dtype)
    g = _norm_matmuls(b, h, K, kind, wdt)
    gen = torch.Generator().manual_seed(5)
    for bb, tt in [(1, 1), (2, 9)]:
        vals = {"x": ((40 if dtype == "f32" else 2) + rand(bb, tt, K, gen=gen) * 3).to(
                    rand(1, dtype=dtype).dtype),
                "w": rand(K, dtype=vec, gen=gen),
                **{f"w{i}": rand(K, n, dtype=wdt, gen=gen) * 0.2
                   for i, n in enumerate([24, 5, 5])}}
        if bias:
            vals["b"] = rand(K, dtype=vec, gen=gen)
        p = check(g, vals, "f16" if kind == "cast" else dtype, kernels=1)
    assert len([n for n in p.graph.nodes if n.op is Op.FUSED]) == 1   # no norm kernel
    (rec,) = [f for f in p.graph.meta["fusions"]
              if f["pass"] == "fuse_matmul" and f["status"] == "fused"]
    kind_name = "rmsnorm" if kind == "rms_bias" else "layernorm"
    assert rec["reason"].startswith(f"{kind_name} prologue + "), rec


@pytest.mark.parametrize("kind", ["horizontal", "single"])
def test_layernorm_prologue_with_split_k(kind, monkeypatch):
    """K split in 3 (decode's few rows): every slice's program computes the whole row's mean
    and variance in its first loops, then its share of the K loop; the slices' partial
    products are summed as the plain form's are."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "INTERPRET_TILE", 16 * 16)
    monkeypatch.setattr(matmul, "INTERPRET_SPLIT_K", 3)
    splits = []
    real = matmul._split_args
    monkeypatch.setattr(matmul, "_split_args", lambda *a: splits.append(real(*a)[-1])
                        or real(*a))
    b = Builder({}, {})
    K = 70
    x = b.input("x", [B, T, K], "f32")
    h = _layernorm(b, x, b.input("w", [K], "f32"), b.input("b", [K], "f32"))
    g = _norm_matmuls(b, h, K, kind, "f32")
    gen = torch.Generator().manual_seed(7)
    vals = {"x": 40 + rand(1, 2, K, gen=gen) * 3, "w": rand(K, gen=gen),
            "b": rand(K, gen=gen),
            **{f"w{i}": rand(K, n, gen=gen) * 0.2 for i, n in enumerate([24, 5, 5])}}
    check(g, vals, kernels=1)
    assert splits and all(sp >= 3 for sp in splits), splits


def test_layernorm_whose_centred_x_is_read_elsewhere_leaves_the_centring_out():
    """x - mean(x) read by another output too: the centring stays a kernel (which stores
    it), and the matmul takes the rest as an RMSNorm of the centred x."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 16], "f32")
    w = b.input("w", [16], "f32")
    xc = x - b.mean(x, -1)
    r = b.rsqrt(b.mean(xc * xc, -1) + 1e-5)
    g = Graph("centred", b.nodes, {"o": ((xc * r * w) @ b.input("w0", [16, 8], "f32")).node,
                                   "xc": xc.node})
    gen = torch.Generator().manual_seed(6)
    p = check(g, {"x": rand(2, 3, 16, gen=gen) + 5, "w": rand(16, gen=gen),
                  "w0": rand(16, 8, gen=gen)})
    recs = [f["reason"] for f in p.graph.meta["fusions"]
            if f["pass"] == "fuse_matmul" and f["status"] == "fused"]
    assert any(r.startswith("rmsnorm prologue + ") for r in recs), recs


def test_rmsnorm_prologue_of_an_f16_matmul_does_not_overflow(monkeypatch):
    """Mixed precision's form: the norm in fp32, its output cast to f16 for the dot. With x
    near 3000 and w near 100, x * w passes f16's 65,504 while rmsnorm(x) * w is near 100: the
    kernel scales its tiles by rsqrt(mean + eps) before the cast (a first loop over K sums
    x * x), so its output is the f16 oracle's, finite. Three K steps of 16, the last ragged."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "INTERPRET_TILE", 16 * 16)
    b = Builder({}, {})
    K = 37
    x = b.input("x", [B, T, K], "f32")
    w = b.input("w", [K], "f32")
    h = b.cast(_rmsnorm(b, x, w), "f16")
    ws = [b.input(f"w{i}", [K, n], "f16") for i, n in enumerate([24, 5])]
    g = Graph("norm_mm", b.nodes, {f"o{i}": (h @ wi).node for i, wi in enumerate(ws)})
    gen = torch.Generator().manual_seed(3)
    vals = {"x": 3000 + rand(2, 9, K, gen=gen) * 50, "w": 100 + rand(K, gen=gen),
            "w0": rand(K, 24, dtype="f16", gen=gen) * 0.1,
            "w1": rand(K, 5, dtype="f16", gen=gen) * 0.1}
    assert (vals["x"][..., None] * vals["w"]).abs().max() > 65504 * 4
    want = run_graph(g, vals, RefCtx(dims=bind_dims(g, vals)))
    assert all(torch.isfinite(v).all() for v in want.values())   # what check() compares with
    p = check(g, vals, "f16", kernels=1)
    (rec,) = [r for r in p.graph.meta["fusions"]
              if r["pass"] == "fuse_matmul" and r["status"] == "fused"]
    assert rec["reason"].startswith("rmsnorm prologue + "), rec


def test_rmsnorm_read_elsewhere_stays_its_own_kernel():
    """A training forward saves the normalised x for the weight gradient: then the norm is
    stored by its reduction kernel and the matmul reads it."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 16], "f32")
    w = b.input("w", [16], "f32")
    h = _rmsnorm(b, x, w)
    g = Graph("saved", b.nodes, {"o": (h @ b.input("w0", [16, 8], "f32")).node, "h": h.node})
    p = check(g, {"x": rand(2, 3, 16), "w": rand(16), "w0": rand(16, 8)}, kernels=1)
    assert any(n.op is Op.FUSED and n.attrs["kind"] == "reduction" for n in p.graph.nodes)


@pytest.mark.parametrize("case", ["views", "epilogue", "whole"])
def test_a_fused_qkv_weight_read_through_slices_is_split(case):
    """x @ W_qkv read only through slices of its columns, each read by views (blues01's split
    into q, k, v heads) becomes x @ W[:, a:b] per slice, run as one horizontal launch with one
    output each. A piece with a pointwise reader (an epilogue to be) or the product read
    whole keeps one product, and the slices stay views."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 24], "f32")
    w = b.input("w", [24, 40], "f32")
    y = x @ w
    q, k, v = b.slice(y, -1, 0, 24), b.slice(y, -1, 24, 32), b.slice(y, -1, 32, 40)
    outs = {"q": b.reshape(q, [B, T, 3, 8]), "k": k, "v": v}
    if case == "epilogue":
        outs["k"] = k * 2.0
    if case == "whole":
        outs["y"] = y
    g = Graph("qkv", b.nodes, {n: t.node for n, t in outs.items()})
    gen = torch.Generator().manual_seed(2)
    for bb, tt in [(1, 1), (2, 7)]:
        p = check(g, {"x": rand(bb, tt, 24, gen=gen), "w": rand(24, 40, gen=gen)},
                  kernels=1)
    (mm,) = _mm_kernels(p)
    n_mm = sum(m.op is Op.MATMUL for m in mm.attrs["body"].nodes)
    assert n_mm == (3 if case == "views" else 1)


@pytest.mark.parametrize("case", ["bias", "bias_cast", "residual", "late"])
def test_a_biased_fused_qkv_projection_is_split_with_its_bias(case):
    """GPT-2's split(x @ W_qkv + b_qkv, 3, -1): the bias add (and a cast after it, a bias
    cast down under mixed precision, a full-size operand computed before the matmul) is cut
    with the product, so each piece is x @ W[:, a:b] + b[a:b] in one horizontal launch with
    an output per piece. An operand computed from the product itself ("late": y + y * 2)
    cannot be cut: one product, slices stay views."""
    b = Builder({}, {})
    dt = "f16" if case == "bias_cast" else "f32"
    x = b.input("x", [B, T, 24], dt)
    w = b.input("w", [24, 40], dt)
    bias = b.input("b", [40], "f32")
    y = x @ w
    if case == "bias":
        y = y + bias
    elif case == "bias_cast":
        y = b.cast(y + b.cast(bias, "f16"), "f32")
    elif case == "residual":
        y = y + b.input("r", [B, T, 40], dt)
    else:
        y = y + y * 2.0
    q, k, v = b.slice(y, -1, 0, 24), b.slice(y, -1, 24, 32), b.slice(y, -1, 32, 40)
    g = Graph("qkv", b.nodes, {"q": b.reshape(q, [B, T, 3, 8]).node, "k": k.node,
                               "v": v.node})
    gen = torch.Generator().manual_seed(3)
    for bb, tt in [(1, 1), (2, 7)]:
        vals = {"x": rand(bb, tt, 24, gen=gen, dtype=dt), "w": rand(24, 40, gen=gen, dtype=dt),
                "b": rand(40, gen=gen)}
        if case == "residual":
            vals["r"] = rand(bb, tt, 40, gen=gen, dtype=dt)
        p = check(g, vals, dt, kernels=1)
    (mm,) = _mm_kernels(p)
    n_mm = sum(m.op is Op.MATMUL for m in mm.attrs["body"].nodes)
    assert n_mm == (1 if case == "late" else 3)
    assert len(mm.attrs["body"].outputs) == (1 if case == "late" else 3)


def test_projections_of_a_strided_input_keep_the_batch_axis():
    """A whose batch axis does not fold into M (a permuted view): the horizontal kernel walks
    the batch entries (z) and each output's rows in place."""
    b = Builder({}, {})
    x = b.permute(b.input("x", [T, B, 16], "f32"), [1, 0, 2])     # [B, T, 16], strided
    w0, w1 = b.input("w0", [16, 20], "f32"), b.input("w1", [16, 3], "f32")
    g = Graph("qk", b.nodes, {"a": (x @ w0).node, "b": (x @ w1).node})
    for bb, tt in [(2, 5), (3, 1)]:
        check(g, {"x": rand(tt, bb, 16), "w0": rand(16, 20), "w1": rand(16, 3)},
              kernels=1)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_gated_dual_matmul_is_one_kernel(act, dtype):
    """silu(x @ W1) * (x @ W3): one kernel, both accumulators, only the product stored."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 48], dtype)
    w1 = b.input("w1", [48, 40], dtype)
    w3 = b.input("w3", [48, 40], dtype)
    w2 = b.input("w2", [40, 48], dtype)
    res = b.input("res", [B, T, 48], dtype)
    y = res + (getattr(b, act)(x @ w1) * (x @ w3)) @ w2
    g = Graph("ffn", b.nodes, {"y": y.node})
    p = check(g, {"x": rand(2, 7, 48, dtype=dtype), "w1": rand(48, 40, dtype=dtype) * 0.2,
                  "w3": rand(48, 40, dtype=dtype) * 0.2, "w2": rand(40, 48, dtype=dtype) * 0.2,
                  "res": rand(2, 7, 48, dtype=dtype)}, dtype, kernels=2)
    gated = _mm_kernels(p)[0]
    assert sum(m.op is Op.MATMUL for m in gated.attrs["body"].nodes) == 2
    assert len(gated.attrs["body"].outputs) == 1
    name = {"silu": "swiglu", "gelu": "geglu"}[act]
    assert any(f["pass"] == "fuse_matmul" and f["status"] == "fused"
               and f["reason"].startswith(f"gated {name}") for f in p.graph.meta["fusions"])
    assert "tl.dot(a, b1" in p.source


def test_gated_form_under_mixed_precision_casts():
    """As the mixed_precision pass writes it: the second weight's cast stands after the first
    matmul; it is moved up, and the pair is still one kernel. A B operand computed from the
    first matmul's result cannot be, and is declined."""
    b = Builder({}, {})
    x = b.input("x", [B, 12, 32], "f32")
    w1 = b.input("w1", [32, 24], "f32")
    w3 = b.input("w3", [32, 24], "f32")
    xh = b.cast(x, "f16")
    h1 = xh @ b.cast(w1, "f16")
    y = b.cast(b.silu(h1) * (xh @ b.cast(w3, "f16")), "f32")
    g = Graph("mp", b.nodes, {"y": y.node})
    p = check(g, {"x": rand(2, 12, 32), "w1": rand(32, 24) * 0.3, "w3": rand(32, 24) * 0.3},
              "f16", kernels=1)
    assert "tl.dot(a, b1" in p.source and "input_precision" not in p.source
    b = Builder({}, {})
    x = b.input("x", [8, 8], "f32")
    w1 = b.input("w1", [8, 8], "f32")
    m1 = x @ w1
    g = Graph("dep", b.nodes, {"y": (b.silu(m1) * (x @ b.transpose(m1, 0, 1))).node})
    assert any("computed from the first matmul" in r for r in _declines(g))
    check(g, {"x": rand(8, 8), "w1": rand(8, 8)}, kernels=2)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_small_tiles_many_programs(dtype, monkeypatch):
    """16x16x16 tiles, as a GPU would use: many programs in grouped order (more row tiles
    than GROUP_M), several K steps with a ragged last one, ragged M and N; one placeholder
    read both as an operand and by the epilogue, and x @ x."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "interpret_blocks", lambda m, n, k: (16, 16, 16))
    b = Builder({}, {})
    x = b.input("x", [B, 150, 33], dtype)
    w = b.input("w", [33, 33], dtype)
    w3 = b.input("w3", [33, 33], dtype)
    sq = b.input("sq", [19, 19], dtype)
    y = b.silu(x @ w) * (x @ w3) + x
    g = Graph("tiles", b.nodes, {"y": y.node, "sq": b.tanh(sq @ sq).node})
    check(g, {"x": rand(2, 150, 33, dtype=dtype), "w": rand(33, 33, dtype=dtype) * 0.3,
              "w3": rand(33, 33, dtype=dtype) * 0.3, "sq": rand(19, 19, dtype=dtype) * 0.3},
          dtype, kernels=2)


def test_gpu_launch_path_autotuner_and_pruning():
    """The GPU path (triton.autotune over GPU_CONFIGS, pruned to the problem) run in the
    interpreter on shapes where one config survives, so no benchmarking is needed."""
    import triton

    from lmc.codegen import matmul
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    cs = [triton.Config(dict(zip(keys, c))) for c in matmul.GPU_CONFIGS]

    def sizes(m, n, k):
        return {tuple(c.kwargs[x] for x in keys)
                for c in matmul.prune_configs(cs, {"M": m, "N": n, "K": k})}
    assert sizes(4096, 4096, 4096) == {c[:3] for c in matmul.GPU_CONFIGS}
    assert sizes(8, 4096, 4096) == {(16, 64, 64), (16, 32, 64)}     # decode: M = batch
    assert sizes(1, 3, 1) == {(16, 32, 64)}                          # nothing fits: smallest
    b = Builder({}, {})
    x = b.input("x", [20, 24], "f32")
    w1 = b.input("w1", [24, 40], "f32")
    w3 = b.input("w3", [24, 40], "f32")
    g = Graph("gpu", b.nodes, {"y": (b.silu(x @ w1) * (x @ w3) + 1.0).node})
    p = TritonProgram(g)
    (node,) = _mm_kernels(p)
    xs = [rand(20, 24), rand(24, 40), rand(24, 40)]
    out = torch.empty(20, 40)
    matmul.launch(p.kernels[node.attrs["kernel"]], xs, [out], node.attrs["body"], RefCtx(),
                  interpret=False)
    want = torch.nn.functional.silu(xs[0] @ xs[1]) * (xs[0] @ xs[2]) + 1.0
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    (pick,) = [r for r in matmul.tuned_configs() if r["kernel"] == node.attrs["kernel"]]
    assert pick["key"][:3] == [20, 40, 24] and (pick["BLOCK_M"], pick["SPLIT_K"]) == (32, 1)


def _declines(g):
    return [f["reason"] for f in fuse_matmul(g).meta["fusions"]
            if f["pass"] == "fuse_matmul" and f["status"] == "declined"]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_a_value_computed_from_inputs_for_the_epilogue_is_computed_in_it(dtype):
    """silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))) of an input g, read only by the
    epilogue (a SwiGLU backward: dg = (dh * u) * silu'(g) after dh = dy @ W^T) is computed
    in the matmul kernel from g: one kernel, nothing stored but the results."""
    b = Builder({}, {})
    dy = b.input("dy", [B, T, 24], dtype)
    w = b.input("w", [40, 24], dtype)
    g_, u = b.input("g", [B, T, 40], dtype), b.input("u", [B, T, 40], dtype)
    s = b.sigmoid(g_)
    dsilu = s * (1.0 + g_ * (1.0 - s))
    dh = dy @ b.transpose(w, 0, 1)
    graph = Graph("swiglu_bwd", b.nodes, {"dg": ((dh * u) * dsilu).node,
                                          "du": (dh * b.silu(g_)).node})
    gen = torch.Generator().manual_seed(4)
    for bb, tt in [(1, 1), (2, 9)]:
        vals = {"dy": rand(bb, tt, 24, dtype=dtype, gen=gen),
                "w": rand(40, 24, dtype=dtype, gen=gen) * 0.2,
                "g": rand(bb, tt, 40, dtype=dtype, gen=gen),
                "u": rand(bb, tt, 40, dtype=dtype, gen=gen)}
        p = check(graph, vals, dtype, kernels=1)
    assert [n.attrs["kind"] for n in p.graph.nodes if n.op is Op.FUSED] == ["matmul"]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_products_of_different_inputs_summed_are_one_kernel(dtype):
    """dX = dq @ Wq^T + dk @ Wk^T + dv @ Wv^T (+ a residual, a scale): one kernel whose K
    loops, one per product (K 40, 6, 17: ragged), accumulate into one accumulator. A partial
    sum read elsewhere is stored by its own (vertical) kernel, which the rest reads."""
    from lmc.codegen import matmul
    ks = [40, 6, 17]

    def graph(read_partial: bool) -> Graph:
        b = Builder({}, {})
        ds = [b.input(f"d{j}", [B, T, k], dtype) for j, k in enumerate(ks)]
        ws = [b.input(f"w{j}", [24, k], dtype) for j, k in enumerate(ks)]
        res = b.input("res", [B, T, 24], dtype)
        prods = [d @ b.transpose(w, 0, 1) for d, w in zip(ds, ws)]
        partial = prods[0] + prods[1]
        y = (partial + prods[2]) * 0.5 + res
        return Graph("dx", b.nodes, {"y": y.node, **({"p": partial.node} if read_partial
                                                       else {})})
    g, g2 = graph(False), graph(True)
    gen = torch.Generator().manual_seed(5)
    for bb, tt in [(1, 1), (2, 9), (3, 70)]:
        vals = {**{f"d{j}": rand(bb, tt, k, dtype=dtype, gen=gen) for j, k in enumerate(ks)},
                **{f"w{j}": rand(24, k, dtype=dtype, gen=gen) * 0.3 for j, k in enumerate(ks)},
                "res": rand(bb, tt, 24, dtype=dtype, gen=gen)}
        p = check(g, vals, dtype, kernels=1)
        p2 = check(g2, vals, dtype)
    (k,) = _mm_kernels(p)
    assert matmul.vertical_sum(k.attrs["body"]) is not None
    rec = [f["reason"] for f in p.graph.meta["fusions"] if f["status"] == "fused"]
    assert rec == ["3 matmuls summed in one accumulator + mul+add"], rec
    assert len(_mm_kernels(p2)) == 2   # p0 + p1 stored; p2's kernel reads it in its epilogue


@pytest.mark.parametrize("case", ["parallel", "product_first", "read_elsewhere", "cast"])
def test_a_residual_plus_two_products_is_summed_first(case):
    """A parallel block's x + a @ Wo + g @ W2 ((x + P1) + P2 as written) is summed as x +
    (P1 + P2): one vertical kernel, the residual in its epilogue ("product_first": P1 + x,
    then + P2, the same). A first sum read elsewhere is left as written (two kernels), and
    so is a product cast before its add (the vertical form rounds no product alone)."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 24], "f32")
    a = b.input("a", [B, T, 16], "f32")
    h = b.input("h", [B, T, 40], "f32")
    wo, w2 = b.input("wo", [16, 24], "f32"), b.input("w2", [40, 24], "f32")
    p1, p2 = a @ wo, h @ w2
    if case == "cast":
        p1 = b.cast(b.cast(p1, "f16"), "f32")
    first = p1 + x if case == "product_first" else x + p1
    outs = {"y": (first + p2).node}
    if case == "read_elsewhere":
        outs["first"] = first.node
    g = Graph("parallel", b.nodes, outs)
    gen = torch.Generator().manual_seed(9)
    for bb, tt in [(1, 1), (2, 9)]:
        vals = {"x": rand(bb, tt, 24, gen=gen), "a": rand(bb, tt, 16, gen=gen),
                "h": rand(bb, tt, 40, gen=gen), "wo": rand(16, 24, gen=gen) * 0.3,
                "w2": rand(40, 24, gen=gen) * 0.3}
        p = check(g, vals)
    rec = [f["reason"] for f in p.graph.meta["fusions"]
           if f["pass"] == "fuse_matmul" and f["status"] == "fused"]
    if case in ("parallel", "product_first"):
        assert rec == ["2 matmuls summed in one accumulator + add"], rec
    else:
        assert len(_mm_kernels(p)) == 2 and not any("summed" in r for r in rec), rec


def test_declined_sites_say_why_and_still_run():
    b = Builder({}, {})
    xi = b.input("xi", [4, 3], "i64")
    wi = b.input("wi", [3, 5], "i64")
    xd = b.input("xd", [4, 3], "f64")
    wd = b.input("wd", [3, 5], "f64")
    x = b.input("x", [4, 3], "f32")
    w = b.input("w", [3, 5], "f32")
    v = b.input("v", [4, 5], "f32")
    mm = x @ w
    late = b.exp(v)                        # computed after the matmul, and read elsewhere
    y = mm + late
    cyc = mm * b.sum(mm, -1)               # reads a reduction of the matmul's own result
    g = Graph("dec", b.nodes, {"i": (xi @ wi).node, "d": (xd @ wd).node, "y": y.node,
                               "c": cyc.node, "e": late.node})
    reasons = _declines(g)
    assert any("i64 matmul" in r for r in reasons)
    assert any("f64 matmul" in r for r in reasons)
    assert any("computed after the matmul" in r for r in reasons)
    assert any("cycle" in r for r in reasons)
    vals = {"xi": torch.randint(-5, 5, (4, 3)), "wi": torch.randint(-5, 5, (3, 5)),
            "xd": torch.randn(4, 3, dtype=torch.float64), "wd": torch.randn(3, 5,
                                                                           dtype=torch.float64),
            "x": torch.randn(4, 3), "w": torch.randn(3, 5), "v": torch.randn(4, 5)}
    ctx = RefCtx(dims=bind_dims(g, vals))
    p = TritonProgram(g)
    got, want = run_graph(p.graph, vals, ctx, p.impl), run_graph(g, vals, ctx)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
    assert len(_mm_kernels(p)) == 1


def test_a_parameter_cast_standing_after_the_matmul_joins_its_epilogue():
    """Mixed precision casts a vector parameter down where its reader stands, after the
    matmul (RWKV-6's token-shift mix x + sx * (mu + m @ W), the add in f16): the cast is
    moved up to the matmul, so the epilogue takes add+cast+mul+add and no kernel stores the
    product. Without the move the epilogue declined ('reads cast, which is computed after
    the matmul'). A value computed from an activation after the matmul still declines."""
    b = Builder({}, {})
    m = b.input("m", [B, T, 8], "f16")
    w = b.input("w", [8, 40], "f16")
    mu = b.input("mu", [40], "f32")
    x = b.input("x", [B, T, 40], "f32")
    sx = b.input("sx", [B, T, 40], "f32")
    mm = m @ w
    mu16 = b.cast(mu, "f16")
    mix = x + sx * b.cast(mm + mu16, "f32")
    g = Graph("mix", b.nodes, {"y": mix.node})
    assert g.nodes.index(mm.node) < g.nodes.index(mu16.node)
    gen = torch.Generator().manual_seed(6)
    for bb, tt in [(1, 1), (2, 9)]:
        vals = {"m": rand(bb, tt, 8, dtype="f16", gen=gen),
                "w": rand(8, 40, dtype="f16", gen=gen), "mu": rand(40, gen=gen),
                "x": rand(bb, tt, 40, gen=gen), "sx": rand(bb, tt, 40, gen=gen)}
        p = check(g, vals, "f16", kernels=1)
    fused = [f["reason"] for f in p.graph.meta["fusions"]
             if f["pass"] == "fuse_matmul" and f["status"] == "fused"]
    assert fused == ["matmul+add+cast+mul+add"], fused
    assert not any(n.op is Op.FUSED and n.attrs["kind"] == "pointwise"
                   and len(n.attrs["body"].nodes) > 3 for n in p.graph.nodes), p.graph
    b = Builder({}, {})
    m = b.input("m", [B, T, 8], "f16")
    w = b.input("w", [8, 40], "f16")
    v = b.input("v", [B, T, 40], "f32")
    mm = m @ w
    late = b.cast(b.exp(v), "f16")         # an activation's cast: not moved
    g = Graph("late", b.nodes, {"y": (mm + late).node, "e": late.node})
    assert any("computed after the matmul" in r for r in _declines(g))


def test_symbolic_sizes_reuse_one_kernel():
    b = Builder({}, {})
    x = b.input("x", [B, T, 24], "f32")
    w = b.input("w", [24, 40], "f32")
    g = Graph("proj", b.nodes, {"y": b.silu(x @ w).node})
    p = TritonProgram(g)
    assert len(p.kernels) == 1
    for bb, tt in [(1, 1), (2, 63), (3, 65)]:
        vals = {"x": torch.randn(bb, tt, 24), "w": torch.randn(24, 40)}
        got = run_graph(p.graph, vals, RefCtx(dims=bind_dims(g, vals)), p.impl)["y"]
        torch.testing.assert_close(got, torch.nn.functional.silu(vals["x"] @ vals["w"]),
                                   rtol=1e-5, atol=1e-5)


def test_batch_dims_fold_into_m_only_when_strides_allow():
    from lmc.codegen.matmul import fold_batch

    def fold(batch, M, rowed, cols):
        batch, rowed = list(batch), [list(s) for s in rowed]
        return fold_batch(batch, M, rowed, cols), batch, rowed
    # x[2, 5, 8] contiguous @ W[8, 4]: one product of 10 rows
    assert fold([2], 5, [[40, 8, 1]], [[0, 4, 1]])[:2] == (10, [1])
    # x a permuted view (T, B, K) -> (B, T, K): rows are not evenly spaced across the batch
    assert fold([2], 5, [[8, 16, 1]], [[0, 4, 1]])[:2] == (5, [2])
    # an epilogue input [T, N] broadcast over B (stride 0 on B) keeps the batch axis
    assert fold([2], 5, [[40, 8, 1], [0, 4, 1]], [[0, 4, 1]])[:2] == (5, [2])
    # a batched B operand keeps it too
    assert fold([2], 5, [[40, 8, 1]], [[32, 4, 1]])[:2] == (5, [2])
    # one row per batch entry (decode, T = 1): any batch stride folds, and becomes M's stride
    m, batch, rowed = fold([3, 2], 1, [[96, 48, 7, 1]], [[0, 0, 4, 1]])
    assert (m, batch, rowed[0][2]) == (6, [1, 1], 48)
    # [B, H, T, K] @ [K, N] with only the H dim foldable into T
    assert fold([2, 3], 5, [[100, 40, 8, 1], [0, 20, 4, 1]], [[0, 0, 4, 1]])[:2] == (15, [2, 1])


_UN = ["exp", "tanh", "sigmoid", "silu", "neg", "abs", "relu", "gelu", "softplus"]
_BIN = ["add", "sub", "mul", "maximum"]


@st.composite
def matmul_graph(draw):
    m = draw(st.sampled_from([1, 3, 17, 33]))
    n = draw(st.sampled_from([1, 3, 17, 65]))
    k = draw(st.sampled_from([1, 3, 31, 64]))
    b = Builder({}, {})
    shapes = {"x": [B, m, k], "r": [n], "c": [B, m, 1], "e": [B, m, n]}
    if draw(st.booleans()):   # A as a permuted view
        xt = b.input("x", [B, k, m], "f32")
        shapes["x"] = [B, k, m]
        x = b.transpose(xt, -2, -1)
    else:
        x = b.input("x", shapes["x"], "f32")
    wshape = draw(st.sampled_from([[k, n], [B, k, n], [n, k]]))
    shapes["w"] = wshape
    w = b.input("w", wshape, "f32")
    if wshape == [n, k]:
        w = b.transpose(w, 0, 1)
    live = [x @ w]                # values computed from a matmul: what the epilogue chains on
    vals = live + [b.input("r", [n], "f32"), b.input("c", [B, m, 1], "f32"),
                   b.input("e", [B, m, n], "f32")]
    shapes["r16"] = [n]           # an f16 vector whose widening cast stands after the matmul
    r16 = b.input("r16", [n], "f16")
    if draw(st.booleans()):   # a second matmul sharing A
        shapes["w3"] = [k, n]
        live.append(x @ b.input("w3", [k, n], "f32"))
        vals.append(live[-1])
    for _ in range(draw(st.integers(1, 6))):
        a = draw(st.sampled_from(live))
        kind = draw(st.sampled_from(["un", "bin", "lit"]))
        if kind == "un":
            v = getattr(b, draw(st.sampled_from(_UN)))(a)
        elif kind == "bin":
            other = draw(st.sampled_from(vals + ["cast"]))
            other = b.cast(r16, "f32") if isinstance(other, str) else other
            v = getattr(b, draw(st.sampled_from(_BIN)))(a, other)
        else:
            v = a * draw(st.floats(-2, 2, allow_nan=False)) + 0.5
        live.append(b.clamp(v, -30.0, 30.0))
        vals.append(live[-1])
    outs = {f"o{i}": v.node for i, v in enumerate(live[-draw(st.integers(1, 3)):])}
    return Graph("mmg", b.nodes, outs), shapes


@settings(max_examples=20, deadline=None)
@given(gs=matmul_graph(), batch=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_random_matmul_epilogue_graphs_match_the_oracle(gs, batch, seed):
    g, shapes = gs
    gen = torch.Generator().manual_seed(seed)
    vals = {k: torch.randn(*[batch if d == B else d for d in s], generator=gen) * 0.5
            for k, s in shapes.items()}
    vals["r16"] = vals["r16"].half()
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)
    p = TritonProgram(g)
    got = run_graph(p.graph, vals, ctx, p.impl)
    assert _mm_kernels(p)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)


def _torch_matmuls_are_declined(g):
    left = [n for n in g.nodes if n.op is Op.MATMUL]
    declined = [f for f in g.meta["fusions"] if f["pass"] == "fuse_matmul"
                and f["status"] == "declined" and "matmul is left" in f["reason"]]
    return len(left) <= len(declined)


def test_llama_forward_and_gradients_with_matmul_kernels():
    tri = lmc.load(LLAMA, preset="tiny", backend="triton", seed=3)
    ref = lmc.load(LLAMA, preset="tiny", backend="torch", seed=3)
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(tri(ids), ref(ids), rtol=1e-5, atol=1e-6)
    gy = torch.randn(2, 11, 512)
    (tri(ids) * gy).sum().backward()
    (ref(ids) * gy).sum().backward()
    for (name, p), q in zip(tri.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max() + 1e-7, name
    prog = tri.program()
    for ex in (prog.forward_exec, prog.backward_exec):
        assert _mm_kernels(ex) and _torch_matmuls_are_declined(ex.graph)
    fwd = [f["reason"] for f in prog.forward_exec.graph.meta["fusions"]
           if f["pass"] == "fuse_matmul" and f["status"] == "fused"]
    assert sum(r.startswith("gated swiglu") for r in fwd) == 2   # one per layer
    assert "matmul+add" in fwd                                   # the residual adds


@pytest.mark.parametrize("split", [2, 3, 8])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_split_k_for_few_rows(split, dtype, monkeypatch):
    """Decode's matmuls have a few rows: the plain form may split K over SPLIT_K programs per
    tile, the last to finish adding the slices (in slice order) and running the epilogue.
    16x16x16 tiles: K = 70 is five K steps, so 8 slices leave three empty; a residual
    epilogue, the gated pair with the RMSNorm prologue (its sums of squares split too in
    fp32, read whole in the f16 form), batch dims that cannot fold into M. The same result
    twice (bitwise), and every tile counter back at zero for the next launch."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "interpret_blocks", lambda m, n, k: (16, 16, 16))
    monkeypatch.setattr(matmul, "INTERPRET_SPLIT_K", split)
    splits = []
    real = matmul._split_args
    monkeypatch.setattr(matmul, "_split_args",
                        lambda *a: splits.append(real(*a)[-1]) or real(*a))
    K = 70
    b = Builder({}, {})
    x = b.input("x", [B, T, K], dtype)
    nw = b.input("nw", [K], dtype)
    w0, w1, w2 = (b.input(f"w{i}", [K, n], dtype) for i, n in enumerate([33, 40, 40]))
    res = b.input("res", [B, T, 33], dtype)
    xb = b.input("xb", [B, 2, T, K], dtype)
    wb = b.input("wb", [2, K, 17], dtype)
    h = _rmsnorm(b, x, nw)
    g = Graph("split", b.nodes, {"y": (x @ w0 + res).node,
                                 "g": (b.silu(h @ w1) * (h @ w2)).node,
                                 "z": b.tanh(xb @ wb).node})
    gen = torch.Generator().manual_seed(5)
    for bb, tt in [(1, 1), (3, 1), (2, 5)]:
        vals = {"x": rand(bb, tt, K, dtype=dtype, gen=gen), "nw": rand(K, dtype=dtype, gen=gen),
                **{f"w{i}": rand(K, n, dtype=dtype, gen=gen) * 0.2
                   for i, n in enumerate([33, 40, 40])},
                "res": rand(bb, tt, 33, dtype=dtype, gen=gen),
                "xb": rand(bb, 2, tt, K, dtype=dtype, gen=gen),
                "wb": rand(2, K, 17, dtype=dtype, gen=gen) * 0.2}
        p = check(g, vals, dtype, kernels=3)
        ctx = RefCtx(dims=bind_dims(g, vals))
        one, two = (run_graph(p.graph, vals, ctx, p.impl) for _ in range(2))
        assert all(torch.equal(one[k], two[k]) for k in one)
    assert splits and all(s == max(matmul.SPLITS) for s in splits), splits
    _, counters = matmul._split_buffers(torch.device("cpu"))
    assert not counters.any()


def test_split_k_is_offered_only_for_few_rows():
    """The autotuner sees split configs only where the launch allows them: a few rows (SPLIT_MAX
    > 1), and no slice thinner than BLOCK_K; a training-sized launch never splits."""
    from lmc.codegen import matmul
    cs = matmul.gpu_configs(split=True)

    def splits(m, n, k, top):
        return {c.kwargs["SPLIT_K"] for c in matmul.prune_configs(
            cs, {"M": m, "N": n, "K": k, "SPLIT_MAX": top})}
    assert splits(1, 768, 3072, 8) == {1, 2, 4, 8}
    assert splits(1, 768, 128, 8) == {1, 2}               # 64 x 2 and 128 x 1 columns of K
    assert splits(1, 768, 3072, 1) == {1}
    assert matmul._split_args(torch.device("cpu"), 16, 1024, 768, 1)[-1] == 1
    assert matmul._split_args(torch.device("cpu"), 1, 4, 768, 1)[-1] == max(matmul.SPLITS)
    assert matmul._split_args(torch.device("cpu"), 1, 1, 50257 * 16, 1)[-1] == 1  # tiles


def test_deep_k_with_few_tiles_may_split():
    """A training weight gradient x^T dy (K = B * T = 16384) of a 768 x 768 weight is 36
    output tiles of 128 x 128: it may split K (big tiles, 2 to 8 slices); the LM head's
    gradient (768 x 50257) and a shallow K may not, and a few-rows launch keeps the thin
    blocks."""
    from lmc.codegen import matmul
    cpu = torch.device("cpu")
    cs = matmul.gpu_configs(split=True)

    def offered(m, n, k, zm):
        return {(c.kwargs["BLOCK_M"], c.kwargs["SPLIT_K"]) for c in matmul.prune_configs(
            cs, {"M": m, "N": n, "K": k, "ZM": zm, "SPLIT_MAX": max(matmul.SPLITS)})
            if c.kwargs["SPLIT_K"] > 1}
    assert matmul._split_args(cpu, 1, 768, 768, 1, 16384)[-1] == max(matmul.DEEP_SPLITS)
    assert matmul._split_args(cpu, 1, 768, 3072, 1, 16384)[-1] > 1
    assert matmul._split_args(cpu, 1, 768, 50257, 1, 16384)[-1] == 1
    assert matmul._split_args(cpu, 1, 768, 768, 1, 1024)[-1] == 1
    assert offered(768, 768, 16384, 768) == {(128, k) for k in matmul.DEEP_SPLITS}
    assert offered(1, 768, 3072, 1) == {(16, k) for k in matmul.SPLITS}


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_deep_split_k_in_a_weight_gradient(dtype, monkeypatch):
    """The deep split in the interpreter (DEEP_K lowered to this test's K): a weight
    gradient x^T dy of 96 rows (more than SPLIT_ROWS: not the few-rows split) in 3 slices
    equals the oracle, bitwise the same twice, counters back at zero."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "interpret_blocks", lambda m, n, k: (32, 16, 16))
    monkeypatch.setattr(matmul, "INTERPRET_SPLIT_K", 3)
    monkeypatch.setattr(matmul, "DEEP_K", 64)
    splits = []
    real = matmul._split_args
    monkeypatch.setattr(matmul, "_split_args",
                        lambda *a: splits.append(real(*a)[-1]) or real(*a))
    b = Builder({}, {})
    x = b.input("x", [T, 96], dtype)
    dy = b.input("dy", [T, 40], dtype)
    g = Graph("dw", b.nodes, {"dw": (b.permute(x, [1, 0]) @ dy).node})
    gen = torch.Generator().manual_seed(8)
    for tt in (70, 131):
        vals = {"x": rand(tt, 96, dtype=dtype, gen=gen), "dy": rand(tt, 40, dtype=dtype, gen=gen)}
        p = check(g, vals, dtype, kernels=1)
        ctx = RefCtx(dims=bind_dims(g, vals))
        one, two = (run_graph(p.graph, vals, ctx, p.impl) for _ in range(2))
        assert torch.equal(one["dw"], two["dw"])
    assert splits and all(s == max(matmul.DEEP_SPLITS) for s in splits), splits
    _, counters = matmul._split_buffers(torch.device("cpu"))
    assert not counters.any()


@pytest.mark.parametrize("op", ["logsumexp", "sum", "amax", "mean"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("n", [2, 17, 300])
def test_a_reduction_along_the_product_rows_is_in_its_kernel(op, dtype, n, monkeypatch):
    """Cross-entropy's logsumexp of the logits (or a sum, max, mean along the rows) runs in
    the matmul kernel (fuse_matmul_reductions): each column tile's partial per row, folded in
    column order by the row tile's last program. Small interpreter tiles make several column
    tiles (up to 10); a second run gives the same bits (the counters were reset)."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "INTERPRET_TILE", 1 << 9)
    b = Builder({}, {})
    x, w = b.input("x", [B, T, 24], dtype), b.input("w", [24, n], dtype)
    lg = x @ w
    r = getattr(b, op)(lg if dtype == "f32" else b.cast(lg, "f32"), -1, keepdim=op == "sum")
    g = Graph("ce", b.nodes, {"r": r.node, "logits": lg.node})
    gen = torch.Generator().manual_seed(5)
    vals = {"x": rand(3, 7, 24, dtype=dtype, gen=gen),
            "w": rand(24, n, dtype=dtype, gen=gen) * 0.3}
    p = check(g, vals, dtype, kernels=1)
    assert [n.attrs["kind"] for n in p.graph.nodes if n.op is Op.FUSED] == ["matmul"]
    (node,) = _mm_kernels(p)
    assert [o.op.value for o in node.attrs["body"].outputs.values()][-1] == op
    ctx = RefCtx(dims=bind_dims(g, vals))
    first = run_graph(p.graph, vals, ctx, p.impl)["r"]
    assert torch.equal(run_graph(p.graph, vals, ctx, p.impl)["r"], first)
    fused = [f for f in p.graph.meta["fusions"] if f["pass"] == "fuse_matmul_reductions"]
    assert [f["status"] for f in fused] == ["fused"]


def test_a_product_read_only_by_its_row_reduction_is_not_stored():
    """An evaluation loss: nothing but the logsumexp reads the logits, so the kernel stores
    the [B, T] reduction alone; a reduction of a horizontal launch's product is declined,
    with the reason."""
    b = Builder({}, {})
    x, w = b.input("x", [B, T, 16], "f32"), b.input("w", [16, 33], "f32")
    g = Graph("lse", b.nodes, {"r": b.logsumexp(x @ w, -1, keepdim=False).node})
    vals = {"x": rand(2, 5, 16), "w": rand(16, 33)}
    p = check(g, vals, kernels=1)
    (node,) = _mm_kernels(p)
    assert [str(t) for t in node.type] == ["f32[B,T]"]
    b = Builder({}, {})
    x = b.input("x", [B, T, 16], "f32")
    w1, w2 = b.input("w1", [16, 33], "f32"), b.input("w2", [16, 8], "f32")
    y1 = x @ w1
    g = Graph("h", b.nodes, {"r": b.logsumexp(y1, -1, keepdim=False).node, "y1": y1.node,
                             "y2": (x @ w2).node})
    p = check(g, {"x": rand(2, 5, 16), "w1": rand(16, 33), "w2": rand(16, 8)}, kernels=1)
    why = [f["reason"] for f in p.graph.meta["fusions"]
           if f["pass"] == "fuse_matmul_reductions" and f["status"] == "declined"]
    assert len(why) == 1 and "horizontal form" in why[0]


def test_row_reduction_configs_fit_their_workspace():
    """On a GPU a kernel with a row reduction gets a workspace of ceil(N / RED_MIN_BN)
    partials per row: the pruner drops the configs with narrower column tiles."""
    import triton

    from lmc.codegen import matmul
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    cs = [triton.Config(dict(zip(keys, c))) for c in matmul.GPU_CONFIGS]
    n = 50304
    rw = triton.cdiv(n, matmul.RED_MIN_BN)
    kept = matmul.prune_configs(cs, {"M": 16384, "N": n, "K": 768, "RW": rw})
    assert kept and all(triton.cdiv(n, c.kwargs["BLOCK_N"]) <= rw for c in kept)
    assert len(kept) < len(matmul.prune_configs(cs, {"M": 16384, "N": n, "K": 768}))
