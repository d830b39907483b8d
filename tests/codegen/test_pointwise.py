"""Fused pointwise kernels in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) against
the oracle: random graphs, ragged and symbolic shapes, broadcasting; the kernel cache; the
llama forward, gradients and training steps on the triton backend."""
import os

import pytest
import torch
from conftest import ZOO, triton_matches_oracle
from hypothesis import given, settings
from hypothesis import strategies as st

import lmc
from lmc.codegen import cache
from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.passes.fuse_pointwise import fuse_pointwise
from lmc.runtime.executor import bind_dims, run_graph
from lmc.runtime.triton_backend import TritonProgram

LLAMA = os.path.join(ZOO, "llama.yaml")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


_UN = ["exp", "tanh", "sigmoid", "silu", "neg", "abs", "sin", "cos", "relu", "erf", "gelu",
       "sign", "round", "softplus", "logsigmoid",
       "stop_gradient"]
_BIN = ["add", "sub", "mul", "maximum", "minimum"]


@st.composite
def pointwise_graph(draw):
    last = draw(st.sampled_from([1, 3, 31, 63, 64, 65, 129]))
    mid = draw(st.sampled_from([1, 2, 5]))
    b = Builder({}, {})
    full = b.input("x", [Dim.sym("B"), mid, last], "f32")
    row = b.input("r", [last], "f32")             # broadcast along the leading axes
    col = b.input("c", [Dim.sym("B"), mid, 1], "f32")
    vals = [full, row, col]
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["un", "bin", "where", "clamp", "f16", "pow", "lit",
                                     "roll", "window", "row", "iota"]))
        a = draw(st.sampled_from(vals))
        if kind == "roll" and a.rank == 3 and a.shape[-1] == last > 1:   # concat in a kernel
            k = draw(st.integers(1, last - 1))
            v = b.concat([b.neg(b.slice(a, -1, k, last)), b.slice(a, -1, 0, k)], -1)
        elif kind == "window" and a.shape[-1] == last:    # a slice with a start of a concat
            k = draw(st.integers(0, last))
            v = b.slice(b.concat([b.tanh(a), a * 0.5], -1), -1, k, k + last)
        elif kind == "row" and a.rank == 1:               # a computed row seen as [1, 1, n]
            v = b.reshape(b.sin(a) * 2.0, [1, 1, last])
        elif kind == "iota":                              # the index, computed in the kernel
            v = a + b.reshape(b.cast(b.iota(last), "f32"), [1, 1, last]) * 0.125
        elif kind == "un":
            v = getattr(b, draw(st.sampled_from(_UN)))(a)
        elif kind == "bin":
            v = getattr(b, draw(st.sampled_from(_BIN)))(a, draw(st.sampled_from(vals)))
        elif kind == "where":
            v = b.where(a > 0.1, draw(st.sampled_from(vals)), -float("inf"))
            v = b.maximum(v, -3.0)  # keep infinities out of later arithmetic
        elif kind == "clamp":
            v = b.clamp(a, -0.5, 0.7)
        elif kind == "f16":
            v = b.cast(b.cast(a, "f16") * 2.0, "f32")
        elif kind == "pow":
            v = b.pow(b.abs(a) + 0.5, draw(st.sampled_from([2.0, 0.5, -0.5, -1.0, 3.0])))
        else:
            v = a * draw(st.floats(-3, 3, allow_nan=False)) + 1.25
        vals.append(v)
    outs = {f"o{i}": v.node for i, v in enumerate(vals[3:][-draw(st.integers(1, 3)):])}
    return Graph("pw", b.nodes, outs), last, mid


@settings(max_examples=25, deadline=None)
@given(gm=pointwise_graph(), batch=st.sampled_from([1, 2, 3]), seed=st.integers(0, 1000))
def test_random_pointwise_graphs_match_the_oracle(gm, batch, seed):
    g, last, mid = gm
    gen = torch.Generator().manual_seed(seed)
    vals = {"x": torch.randn(batch, mid, last, generator=gen),
            "r": torch.randn(last, generator=gen),
            "c": torch.randn(batch, mid, 1, generator=gen)}
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)
    p = TritonProgram(g)
    got = run_graph(p.graph, vals, ctx, p.impl)
    assert p.launches >= 1
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=2e-6, equal_nan=True)


def test_one_kernel_serves_every_size():
    b = Builder({}, {})
    x = b.input("x", [Dim.sym("B"), Dim.sym("T"), 48], "f32")
    m = b.input("m", [Dim.sym("B"), Dim.sym("T"), 1], "f32")
    y = b.silu(x - m) * 2.0 + 1e-5
    g = Graph("norm", b.nodes, {"y": y.node})
    p = TritonProgram(g)
    assert len(p.kernels) == 1  # sub, silu, mul, add: one kernel, m read with stride 0
    for B, T in [(1, 1), (2, 63), (3, 65)]:
        vals = {"x": torch.randn(B, T, 48), "m": torch.rand(B, T, 1)}
        got = run_graph(p.graph, vals, RefCtx(dims=bind_dims(g, vals)), p.impl)["y"]
        want = torch.nn.functional.silu(vals["x"] - vals["m"]) * 2.0 + 1e-5
        torch.testing.assert_close(got, want)


def test_fusion_keeps_the_graph_acyclic_and_equal():
    model = lmc.load(LLAMA, preset="tiny")
    fused = fuse_pointwise(model.graph)
    assert sum(n.op is Op.FUSED for n in fused.nodes) < sum(
        n.op.kind.value == "pointwise" for n in model.graph.nodes)
    import networkx as nx
    assert nx.is_directed_acyclic_graph(fused.nx())


def test_rope_rotate_half_is_one_kernel():
    """Rope's x*cos + concat(-x2, x1)*sin. The concat joins the kernel (each piece read at
    its shifted index, no stored concat), and x*cos, which starts a group of its own before
    the concat (groups grow forward from their inputs), folds into its only reader, the add:
    one launch, no intermediate stored."""
    b = Builder({}, {})
    x = b.input("x", [Dim.sym("B"), Dim.sym("T"), 16], "f32")
    cos = b.input("cos", [Dim.sym("T"), 16], "f32")
    sin = b.input("sin", [Dim.sym("T"), 16], "f32")
    rot = b.concat([b.neg(b.slice(x, -1, 8, 16)), b.slice(x, -1, 0, 8)], -1)
    xc = x * cos
    y = xc + rot * sin
    g = Graph("rope", b.nodes, {"y": y.node})
    fused = [n for n in fuse_pointwise(g).nodes if n.op is Op.FUSED]
    ops = [[m.op for m in n.attrs["body"].nodes if m.op is not Op.INPUT] for n in fused]
    assert ops == [[Op.NEG, Op.CONCAT, Op.MUL, Op.MUL, Op.ADD]]
    # x*cos read elsewhere too (a graph output) is stored: a second output of the kernel
    g2 = Graph("rope2", b.nodes, {"y": y.node, "xc": xc.node})
    (f2,) = [n for n in fuse_pointwise(g2).nodes if n.op is Op.FUSED]
    assert len(f2.attrs["body"].outputs) == 2
    p = TritonProgram(g)
    assert "# concat piece [8, 16) along axis 2" in p.source
    for B, T in [(1, 1), (2, 7)]:
        vals = {"x": torch.randn(B, T, 16), "cos": torch.randn(T, 16),
                "sin": torch.randn(T, 16)}
        got = run_graph(p.graph, vals, RefCtx(dims=bind_dims(g, vals)), p.impl)["y"]
        xv = vals["x"]
        want = xv * vals["cos"] + torch.cat([-xv[..., 8:], xv[..., :8]], -1) * vals["sin"]
        torch.testing.assert_close(got, want)


def test_concat_pieces_along_an_inner_axis_with_broadcast_inputs():
    """Three pieces along axis 1 (sizes 1, 3, 2), one computed in the kernel, one a strided
    view, one broadcast from [B, 1, 5]; the result read by a pointwise op."""
    b = Builder({}, {})
    x = b.input("x", [Dim.sym("B"), 6, 5], "f32")
    r = b.input("r", [Dim.sym("B"), 1, 5], "f32")
    c = b.concat([b.exp(b.slice(x, 1, 0, 1)), b.slice(x, 1, 1, 6, 2) * 2.0,
                  b.expand(r, [Dim.sym("B"), 2, 5])], 1)
    y = b.tanh(c) + 1.0
    g = Graph("cat3", b.nodes, {"y": y.node})
    fused = [n for n in fuse_pointwise(g).nodes if n.op is Op.FUSED]
    assert len(fused) == 1
    p = TritonProgram(g)
    for B in (1, 3):
        vals = {"x": torch.randn(B, 6, 5), "r": torch.randn(B, 1, 5)}
        got = run_graph(p.graph, vals, RefCtx(dims=bind_dims(g, vals)), p.impl)["y"]
        xv = vals["x"]
        want = torch.tanh(torch.cat([xv[:, :1].exp(), xv[:, 1::2] * 2.0,
                                     vals["r"].expand(B, 2, 5)], 1)) + 1.0
        torch.testing.assert_close(got, want)
    assert p.launches == 2


def test_concats_with_one_symbolic_piece_join_the_kernel():
    """Along T: a causal shift concat([pad, x[:, :T - 2]]) (the symbolic piece last), its
    gradient's form concat([x[:, 3:], zeros]) (first) and a piece between two fixed ones: the
    offsets after the symbolic piece are the kernel's size less numbers, so one kernel serves
    every T (from 3, the shortest these slices allow)."""
    B, T = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    x = b.input("x", [B, T, 5], "f32")
    w = b.input("w", [5], "f32")
    zeros = b.expand(b.const(0.0), [B, 3, 5])
    pad = b.expand(w, [B, 2, 5])
    shifted = b.concat([pad, b.slice(x, 1, 0, T - 2)], 1)
    back = b.concat([b.slice(x, 1, 3, T), zeros], 1)
    mid = b.concat([b.slice(x, 1, 0, 1), b.exp(b.slice(x, 1, 1, T - 1)) * 2.0,
                    b.slice(x, 1, 0, 1) - 1.0], 1)
    y = b.tanh(shifted) * w + back - mid
    g = Graph("shifts", b.nodes, {"y": y.node})
    fused = [n for n in fuse_pointwise(g).nodes if n.op is Op.FUSED]
    assert len(fused) == 1 and sum(m.op is Op.CONCAT
                                   for m in fused[0].attrs["body"].nodes) == 3
    p = TritonProgram(g)
    for piece in ("[2, S1)", "[0, (S1 - 3))", "[(S1 - 3), S1)", "[1, (S1 - 1))",
                  "[(S1 - 1), S1)"):
        assert f"# concat piece {piece} along axis 1" in p.source, piece
    for Bv, Tv in ((1, 3), (2, 7), (3, 130)):
        vals = {"x": torch.randn(Bv, Tv, 5), "w": torch.randn(5)}
        got = run_graph(p.graph, vals, RefCtx(dims=bind_dims(g, vals)), p.impl)["y"]
        xv, wv = vals["x"], vals["w"]
        want = torch.tanh(torch.cat([wv.expand(Bv, 2, 5), xv[:, :Tv - 2]], 1)) * wv \
            + torch.cat([xv[:, 3:], torch.zeros(Bv, 3, 5)], 1) \
            - torch.cat([xv[:, :1], xv[:, 1:Tv - 1].exp() * 2.0, xv[:, :1] - 1.0], 1)
        torch.testing.assert_close(got, want)
    assert p.launches == 3


def test_a_concat_alone_or_along_a_symbolic_axis_stays_a_torch_op():
    b = Builder({}, {})
    x = b.input("x", [Dim.sym("B"), Dim.sym("T"), 4], "f32")
    cache = b.input("cache", [Dim.sym("B"), Dim.sym("P"), 4], "f32")
    grown = b.concat([cache, b.exp(x)], 1)          # two symbolic sizes along the axis
    pair = b.concat([x, x], -1)                     # nothing pointwise around it: a copy
    g = Graph("cats", b.nodes, {"grown": b.exp(grown).node, "pair": pair.node})
    out = fuse_pointwise(g)
    assert sum(n.op is Op.CONCAT for n in out.nodes) == 2
    for n in out.nodes:
        if n.op is Op.FUSED:
            assert all(m.op is not Op.CONCAT for m in n.attrs["body"].nodes)


def test_kernel_cache_rewrites_a_tampered_file(tmp_path):
    src = "import triton\nimport triton.language as tl\nVALUE = 41 + 1\n"
    d = str(tmp_path / "k")
    assert cache.load_module(src, d).VALUE == 42
    (path,) = [os.path.join(d, f) for f in os.listdir(d)]
    with open(path, "w") as f:
        f.write("raise SystemExit('tampered')\n")     # truncated / tampered
    import sys
    for name in [n for n in sys.modules if n.startswith("lmc_kernels_")]:
        del sys.modules[name]
    assert cache.load_module(src, d).VALUE == 42
    assert "tampered" not in open(path).read()


def test_llama_forward_and_gradients_on_triton_equal_torch():
    tri = lmc.load(LLAMA, preset="tiny", backend="triton", seed=2)
    ref = lmc.load(LLAMA, preset="tiny", backend="torch", seed=2)
    ids = torch.randint(0, 512, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(tri(ids), ref(ids), rtol=1e-5, atol=1e-6)
    gy = torch.randn(2, 13, 512)
    (tri(ids) * gy).sum().backward()
    (ref(ids) * gy).sum().backward()
    for (name, p), q in zip(tri.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max() + 1e-7, name
    prog = tri.program()
    assert prog.forward_exec.launches > 0 and prog.backward_exec.launches > 0


def test_three_training_steps_match_the_torch_backend(tmp_path, monkeypatch):
    import json
    import sysconfig

    from lmc.cli import main
    corpus = tmp_path / "c.txt"
    corpus.write_text(open(os.path.join(sysconfig.get_paths()["stdlib"], "heapq.py")).read())
    losses = {}
    for backend in ("torch", "triton"):
        out = tmp_path / backend
        assert main(["run", LLAMA, "--train", "--preset", "tiny", "--set", "vocab=100352",
                     "d=32", "heads=2", "ffn=64", "--data", str(corpus), "--steps", "3",
                     "--batch-size", "2", "--seq-len", "16", "--log-every", "1",
                     "--no-progress", "--backend", backend, "--out", str(out)]) == 0
        losses[backend] = [json.loads(ln)["train_loss"] for ln in open(out / "metrics.jsonl")]
    for a, b in zip(losses["torch"], losses["triton"]):
        assert abs(a - b) / abs(a) < 1e-4


def _clean_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LMC_CACHE"] = str(tmp_path / "cache")
    return env


def test_cli_triton_backend_in_a_fresh_process(tmp_path):
    """The console script, with nothing set in the environment: whatever imports triton first
    (torch._dynamo does, from the optimizer), its library functions must be interpreted."""
    import subprocess
    import sys

    import numpy as np
    data = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 512, 4096).astype(np.uint32).tofile(data)
    r = subprocess.run([sys.executable, "-m", "lmc.cli", "run", LLAMA, "--train", "--preset",
                        "tiny", "--data", str(data), "--steps", "2", "--batch-size", "2",
                        "--seq-len", "16", "--no-progress", "--backend", "triton", "--out",
                        str(tmp_path / "run")], capture_output=True, text=True,
                       env=_clean_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained     2 steps" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is forced only without CUDA")
def test_triton_imported_before_lmc_is_a_clear_error(tmp_path):
    import subprocess
    import sys
    code = ("import triton.language, torch, lmc\n"
            f"m = lmc.load({LLAMA!r}, preset='tiny', backend='triton')\n"
            "try:\n"
            "    m(torch.zeros(1, 4, dtype=torch.long))\n"
            "except lmc.LmcError as e:\n"
            "    print('LmcError:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_clean_env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LmcError:" in r.stdout and "TRITON_INTERPRET=1" in r.stdout


def test_softplus_logsigmoid_kernels_at_extreme_inputs():
    """fp32 in the kernel, no overflow, no log(0); tiny tails kept (log1p), as the oracle."""
    b = Builder({}, {})
    x = b.input("x", [Dim.sym("B"), 12], "f32")
    g = Graph("sp", b.nodes, {"sp": b.softplus(x).node, "ls": b.logsigmoid(x * 1.0).node})
    vals = {"x": torch.tensor([[-1e4, -200.0, -80.0, -20.0, -1e-3, 0.0, 1e-6, 1.0, 20.0, 80.0,
                                200.0, 1e4]])}
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)
    p = TritonProgram(g)
    got = run_graph(p.graph, vals, ctx, p.impl)
    for k in want:
        assert torch.isfinite(got[k]).all()
        torch.testing.assert_close(got[k], want[k], rtol=2e-6, atol=0)


def test_tanh_kernel_keeps_relative_accuracy_near_zero():
    """tanh (also inside gelu's tanh form) without cancellation: relative error within a few
    fp32 ulps from 1e-30 to 1e4 (2*sigmoid(2x) - 1 was off by 1e-7 absolute near 0, which a
    norm's rsqrt of a small mean amplified past the reduction tests' tolerance)."""
    b = Builder({}, {})
    x = b.input("x", [Dim.sym("B"), 401], "f32")
    g = Graph("th", b.nodes, {"t": b.tanh(x).node})
    mag = torch.logspace(-30, 4, 200, dtype=torch.float64)
    xs = torch.cat([-mag, torch.zeros(1, dtype=torch.float64), mag]).float()
    vals = {"x": xs[None]}
    p = TritonProgram(g)
    got = run_graph(p.graph, vals, RefCtx(dims=bind_dims(g, vals)), p.impl)["t"][0]
    want = torch.tanh(xs.double())
    rel = ((got.double() - want).abs() / want.abs().clamp_min(1e-300)).max()
    assert rel < 3e-7, float(rel)
    ends = {"x": torch.tensor([[float("inf"), float("-inf"), float("nan")] + [0.0] * 398])}
    got = run_graph(p.graph, ends, RefCtx(dims=bind_dims(g, ends)), p.impl)["t"][0, :3]
    assert got[0] == 1 and got[1] == -1 and torch.isnan(got[2])


def test_independent_neighbour_groups_share_a_launch():
    """Two chains with only views between them (rope of q, rope of k) are one kernel with two
    outputs; a torch op between them, or a reader of the first before the second, keeps
    them apart."""
    def build(between):
        b = Builder({}, {})
        x = b.input("x", [Dim.sym("B"), 6, 8], "f32")
        y = b.input("y", [Dim.sym("B"), 3, 16], "f32")
        first = b.exp(x) * 2.0
        if between == "scan":
            y = b.cumsum(y, 1)                      # a torch op between: no merge
        second = b.tanh(b.reshape(y, [Dim.sym("B"), 6, 8])) + 1.0   # a view between: merge
        if between == "reader":
            c = b.cumsum(first, 1)                  # reads the first before the second
            second = b.tanh(b.reshape(y, [Dim.sym("B"), 6, 8]) + c) + 1.0
        if between == "view-reader":                # the second reads the first through
            v = b.reshape(b.reshape(first, [Dim.sym("B"), 48]), [Dim.sym("B"), 6, 8])
            second = b.tanh(b.reshape(y, [Dim.sym("B"), 6, 8]) + v) + 1.0   # views: stored
        return Graph("sib", b.nodes, {"a": first.node, "b": second.node})

    for between, kernels in [("view", 1), ("scan", 2), ("reader", 2), ("view-reader", 2)]:
        g = build(between)
        assert sum(n.op is Op.FUSED for n in fuse_pointwise(g).nodes) == kernels, between
        p = TritonProgram(g)
        vals = {"x": torch.randn(2, 6, 8), "y": torch.randn(2, 3, 16)}
        ctx = RefCtx(dims=bind_dims(g, vals))
        want = run_graph(g, vals, ctx)
        got = run_graph(p.graph, vals, ctx, p.impl)
        for k in want:
            torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_dropout_is_computed_in_the_kernel(dtype):
    """Dropout with a literal seed joins the pointwise kernel: its mask is tl.rand of the
    element's flat index (the torch reference draws the same Philox numbers), the seed mixed
    with the draw counter at launch, p = 0 when not training. Equal to the oracle, with the
    same elements dropped, at several draw counters and sizes not a multiple of the block;
    so is the backward
    (dropout of the cotangent with the same seed), also one kernel."""
    from lmc.passes import run_pipeline
    from lmc.passes.autodiff import differentiate
    b = Builder({}, {})
    x = b.input("x", [Dim.sym("B"), 7, 33], dtype)
    r = b.input("r", [Dim.sym("B"), 7, 33], dtype)
    y = r + b.dropout(b.silu(x), 0.3, 1234) * 2.0
    g = Graph("drop", b.nodes, {"y": y.node})
    p = TritonProgram(g)
    assert not any(n.op is Op.DROPOUT for n in p.graph.nodes)
    (k,) = [n for n in p.graph.nodes if n.op is Op.FUSED]
    assert "dropout" in [m.op.value for m in k.attrs["body"].nodes]
    # the seed (a new value every step) is one int64 kernel argument, never specialized:
    # step 0's literal seed and the mixed ones after it share the variant a warm pass
    # compiled (Triton would type 1234 int32 and a mixed seed int64, and specialize 1 and
    # multiples of 16)
    assert '@triton.jit(do_not_specialize=["seed0"])' in p.source
    assert "seed0: tl.int64" in p.source
    dt = {"f32": torch.float32, "f16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(0)
    for bb, step, training in [(1, 0, True), (3, 5, True), (2, 7, False)]:
        vals = {"x": torch.randn(bb, 7, 33, generator=gen).to(dt),
                "r": torch.randn(bb, 7, 33, generator=gen).to(dt)}
        ctx = RefCtx(dims=bind_dims(g, vals), training=training, rng_step=step)
        want = run_graph(g, vals, ctx)["y"]
        got = run_graph(p.graph, vals, ctx, p.impl)["y"]
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == "f32" else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got, want, **tol)
        # the same elements dropped: y == r exactly where the mask is 0
        assert torch.equal(got == vals["r"], want == vals["r"])
        dropped = (want == vals["r"]).float().mean().item()
        assert (0.15 < dropped < 0.45) if training else dropped < 0.01
    prog = differentiate(g, ["x"])
    back = run_pipeline(prog.backward)
    bp = TritonProgram(back, label="backward")
    assert not any(n.op is Op.DROPOUT for n in bp.graph.nodes)
    vals = {"x": torch.randn(3, 7, 33, generator=gen).to(dt),
            "r": torch.randn(3, 7, 33, generator=gen).to(dt)}
    ctx = RefCtx(dims=bind_dims(g, vals), training=True, rng_step=3)
    fw = run_graph(prog.forward, vals, ctx)
    bound = {s: fw[s] for s in prog.saved}
    bound["grad:y"] = torch.randn(3, 7, 33, generator=gen).to(dt)
    want = run_graph(back, bound, ctx)["grad:x"]
    got = bp.run(bound, ctx)["grad:x"]
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if dtype == "f32" else 2e-3,
                               atol=1e-6 if dtype == "f32" else 2e-3)


def test_pointwise_output_read_as_permute_then_reshape_is_stored_permuted():
    """A kernel output read as permute(0, 2, 1, 3) -> reshape (heads merged) is allocated in
    the permuted order and stored through strides (no copy for the reshape); another
    output of the same kernel, read plainly, stays contiguous. Equal to the oracle."""
    b = Builder({}, {})
    x = b.input("x", [Dim.sym("B"), 3, Dim.sym("T"), 8], "f32")
    s = b.input("s", [Dim.sym("B"), Dim.sym("T"), 24], "f32")
    y = b.silu(x)
    merged = b.reshape(b.permute(y, [0, 2, 1, 3]), [Dim.sym("B"), Dim.sym("T"), 24])
    # (a scalar factor would move before the views instead: program.sink_scalar_ops)
    g = Graph("perm", b.nodes, {"m": (merged * s).node, "y2": (y * 3.0).node})
    p = TritonProgram(g)
    assert "a permuted layout" in p.source and "stored in its reader's order" in \
        p.program_source
    for bb, tt in [(1, 1), (2, 5)]:
        vals = {"x": torch.randn(bb, 3, tt, 8), "s": torch.randn(bb, tt, 24)}
        ctx = RefCtx(dims=bind_dims(g, vals))
        want = run_graph(g, vals, ctx)
        got = p.run(vals, ctx)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["pointwise", "reduction", "epilogue", "prologue"])
def test_a_narrowing_cast_then_a_math_function(kind):
    """cast(x, f16) then exp/tanh/silu in one kernel: the value is rounded to fp16 and the
    function computes in fp32 (Triton's math functions take fp32 only; an fp16 register
    value crashed every kernel kind), equal to the oracle within fp16 rounding."""
    Bs, Ts = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    x, W = b.input("x", [Bs, Ts, 7], "f32"), b.input("W", [7, 5], "f32")
    out = {"pointwise": lambda: b.exp(b.cast(x, "f16")),
           "reduction": lambda: b.sum(b.tanh(b.cast(x, "f16")), -1),
           "epilogue": lambda: b.silu(b.cast(x @ W, "f16")),
           "prologue": lambda: b.cast(b.exp(b.cast(x, "f16")), "f32") @ W}[kind]()
    g = Graph("g", b.nodes, {"y": out.node})
    gen = torch.Generator().manual_seed(3)
    for shape in [(2, 3), (1, 5)]:
        triton_matches_oracle(g, {"x": torch.randn(*shape, 7, generator=gen),
                                  "W": torch.randn(7, 5, generator=gen)}, rtol=2e-3, atol=2e-3)


def _decoded_conv(C: int, taps: int):
    """A short causal convolution as the decode pass writes it over T new tokens after P past
    ones: per shift s, the state's last s slots (the pad where position P - s + j < 0),
    then the new x, the first T of those; summed with per-tap weights, then silu."""
    B, T = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    x = b.input("x", [B, T, C], "f32")
    state = b.input("state", [B, taps - 1, C], "f32")
    pos = b.input("pos", [T], "i64")
    w = b.input("w", [taps, C], "f32")
    xe = b.exp(x) * 0.5                                  # a computed value, shifted
    y = xe * b.reshape(b.slice(w, 0, taps - 1, taps), [C])
    for s in range(1, taps):
        slot = b.slice(pos, 0, 0, 1) + (b.iota(s) - s)   # positions P - s .. P - 1
        past = b.where(b.reshape(slot, [1, s, 1]) >= 0,
                       b.slice(state, 1, taps - 1 - s, taps - 1), 0.0)
        shifted = b.slice(b.concat([past, xe], 1), 1, 0, T)
        y = y + shifted * b.reshape(b.slice(w, 0, taps - 1 - s, taps - s), [C])
    return Graph("conv", b.nodes, {"y": b.silu(y).node})


@pytest.mark.parametrize("taps", [2, 4])
def test_a_decoded_causal_convolution_is_one_kernel(taps):
    """The decoded shift's concat(past, x)[:, :T] is evaluated at the slice's index (the
    piece offsets from the kernel's T plus s), its mask's iota and [s] -> [1, s, 1] reshape
    in the kernel too: one launch, no torch arange or cat, for every T (1, below and above the
    taps) and every P (slots before position 0 read the pad)."""
    C = 37
    g = _decoded_conv(C, taps)
    p = TritonProgram(g)
    assert [n.attrs["kind"] for n in p.graph.nodes if n.op is Op.FUSED] == ["pointwise"]
    for s in range(1, taps):
        assert f"# concat piece [{s}, (S1 + {s})) along axis 1" in p.source
    for Bv, Tv, P in ((1, 1, 0), (2, 1, 1), (1, 1, 2), (3, 1, 9), (2, 2, 0), (1, 5, 1),
                      (2, 7, 4)):
        vals = {"x": torch.randn(Bv, Tv, C), "state": torch.randn(Bv, taps - 1, C),
                "pos": torch.arange(P, P + Tv), "w": torch.randn(taps, C)}
        ctx = RefCtx(dims=bind_dims(g, vals))
        got = run_graph(p.graph, vals, ctx, p.impl)["y"]
        want = run_graph(g, vals, RefCtx(dims=bind_dims(g, vals)))["y"]
        torch.testing.assert_close(got, want)
        # and by hand: x's history with the pad (zeros) before position 0
        hist = torch.cat([torch.zeros(Bv, taps - 1, C), vals["state"]], 1)[:, -(taps - 1):]
        hist = torch.where((torch.arange(taps - 1) + P - (taps - 1) >= 0)[None, :, None],
                           hist, 0.0)
        seq = torch.cat([hist, vals["x"].exp() * 0.5], 1)
        ref = sum(seq[:, taps - 1 - s: taps - 1 - s + Tv] * vals["w"][taps - 1 - s]
                  for s in range(taps))
        torch.testing.assert_close(got, torch.nn.functional.silu(ref))
    assert p.launches == len(((1, 1, 0), (2, 1, 1), (1, 1, 2), (3, 1, 9), (2, 2, 0),
                              (1, 5, 1), (2, 7, 4)))
    assert not [n for n in p.graph.nodes if n.op in (Op.IOTA, Op.CONCAT)]


def test_a_slice_of_a_computed_value_and_a_unit_reshape_join_their_reader():
    """exp(x)[:, 2:] (a slice with a start: evaluated at i + 2) and computed [C] vectors
    (one from an iota) seen as [1, 1, C], read by one kernel: computed there, never
    stored."""
    B, T = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    x = b.input("x", [B, T, 6], "f32")
    v = b.input("v", [6], "f32")
    z = b.input("z", [B, T, 6], "f32")
    e = b.exp(x) + 1.0
    later = b.slice(e, 1, 2, T)
    scale = b.reshape(b.tanh(v) * 3.0, [1, 1, 6])
    idx = b.reshape(b.cast(b.iota(6), "f32"), [1, 1, 6])
    y = later * scale + b.slice(z, 1, 0, T - 2) * idx
    g = Graph("views", b.nodes, {"y": y.node})
    fused = [n for n in fuse_pointwise(g).nodes if n.op is Op.FUSED]
    assert len(fused) == 1
    p = TritonProgram(g)
    for Bv, Tv in ((1, 3), (2, 8), (3, 67)):
        vals = {"x": torch.randn(Bv, Tv, 6), "v": torch.randn(6), "z": torch.randn(Bv, Tv, 6)}
        got = run_graph(p.graph, vals, RefCtx(dims=bind_dims(g, vals)), p.impl)["y"]
        want = (vals["x"][:, 2:].exp() + 1.0) * (vals["v"].tanh() * 3.0) \
            + vals["z"][:, :Tv - 2] * torch.arange(6.0)
        torch.testing.assert_close(got, want)
    assert p.launches == 3 and not [n for n in p.graph.nodes if n.op is Op.IOTA]


def test_a_slice_read_by_two_kernels_or_with_a_symbolic_start_is_stored():
    """A computed value whose slices two kernels of other shapes read is stored once (not
    computed twice); a slice starting at T (a decode state's newest slots) reads it stored."""
    B, T = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    x = b.input("x", [B, T, 4], "f32")
    e = b.exp(x)
    one = b.slice(e, 1, 1, T) * 2.0
    two = b.slice(e, 2, 0, 2) + 1.0
    cat = b.concat([b.input("st", [B, 3, 4], "f32"), b.tanh(x)], 1)
    new = b.slice(cat, 1, T, T + 3) * 3.0
    g = Graph("stored", b.nodes, {"one": one.node, "two": two.node, "new": new.node})
    out = fuse_pointwise(g)
    bodies = [n.attrs["body"] for n in out.nodes if n.op is Op.FUSED]
    assert not any(m.op is Op.SLICE for body in bodies for m in body.nodes)
    assert sum(any(m.op is Op.EXP for m in body.nodes) for body in bodies) == 1


@pytest.mark.parametrize("T", [Dim.sym("T"), 6])
def test_a_slice_of_size_one_its_reader_broadcasts(T):
    """exp(x)[:, k:k + 1] read by a [B, T, 4] op: every position reads the slice's one
    position (the index along a size-1 axis is 0, then shifted by the start)."""
    B = Dim.sym("B")
    for k in (0, 3):
        b = Builder({}, {})
        x = b.input("x", [B, T, 4], "f32")
        y = b.tanh(x) * b.slice(b.exp(x), 1, k, k + 1)
        g = Graph("bcast", b.nodes, {"y": y.node})
        p = TritonProgram(g)
        for Bv in (1, 3):
            vals = {"x": torch.randn(Bv, 6, 4)}
            got = run_graph(p.graph, vals, RefCtx(dims=bind_dims(g, vals)), p.impl)["y"]
            xv = vals["x"]
            torch.testing.assert_close(got, xv.tanh() * xv[:, k:k + 1].exp())


def test_a_unit_reshape_of_a_symbolic_shape_joins_its_reader():
    """Rope's tables from the positions: cast(pos [T]) seen as [T, 1] (a symbolic shape: the
    reshape adds an axis of size 1 whatever T is), times the frequencies, concatenated, then
    cos and sin: one kernel, right at T = 1 (the symbolic axis of size 1 at run time) and
    more; and a [B, T] value seen as [B, 1, T] by a [B, 3, T] reader."""
    B, T = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    pos = b.input("pos", [T], "i64")
    inv = b.input("inv", [1, 4], "f32")
    f = b.reshape(b.cast(pos, "f32") * 0.5, [T, 1]) * inv
    cat = b.concat([f, f], -1)
    x = b.input("x", [B, T], "f32")
    w = b.input("w", [B, 3, T], "f32")
    y = b.reshape(b.exp(x), [B, 1, T]) * w
    g = Graph("tables", b.nodes, {"cos": b.cos(cat).node, "sin": b.sin(cat).node,
                                  "y": y.node})
    p = TritonProgram(g)
    assert sum(n.op is Op.FUSED for n in p.graph.nodes) == 2
    assert not [n for n in p.graph.nodes if n.op is Op.RESHAPE]
    for Bv, Tv in ((1, 1), (2, 5)):
        vals = {"pos": torch.arange(7, 7 + Tv), "inv": torch.randn(1, 4),
                "x": torch.randn(Bv, Tv), "w": torch.randn(Bv, 3, Tv)}
        got = run_graph(p.graph, vals, RefCtx(dims=bind_dims(g, vals)), p.impl)
        fr = (vals["pos"].float() * 0.5)[:, None] * vals["inv"]
        torch.testing.assert_close(got["cos"], torch.cat([fr, fr], -1).cos())
        torch.testing.assert_close(got["sin"], torch.cat([fr, fr], -1).sin())
        torch.testing.assert_close(got["y"], vals["x"].exp()[:, None, :] * vals["w"])
    assert p.launches == 4


@pytest.mark.parametrize("start", [0, 1, 2])
def test_a_size_one_window_of_a_concat_reads_one_piece(start):
    """slice(concat([tanh(r), r * 0.5, r]), start, start + 1) of a [1] r (the random graphs'
    "window" at last = 1): the index along the concat is one number for every lane, so the
    kernel evaluates the one piece holding it (a pointer, not a block of them, met a block
    mask in Triton's interpreter)."""
    b = Builder({}, {})
    r = b.input("r", [1], "f32")
    y = b.exp(b.slice(b.concat([b.tanh(r), r * 0.5, r], -1), -1, start, start + 1))
    g = Graph("window", b.nodes, {"y": y.node})
    vals = {"r": torch.tensor([0.3])}
    p = triton_matches_oracle(g, vals)
    assert "tl.where" not in p.source.split("def lmc_")[-1]
