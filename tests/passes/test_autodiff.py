"""The autodiff pass: for every differentiable primitive, gradients from lmc's backward graph
equal torch autograd on the oracle (fp32, rel err < 1e-5), and pass float64 gradcheck through
the autograd bridge. Random upstream gradients, hypothesis-drawn ragged shapes."""
import math
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
from lmc.passes import run_pipeline
from lmc.passes.autodiff import differentiate
from lmc.runtime.executor import bind_dims, run_graph
from lmc.runtime.function import GraphFunction

DIMS = st.sampled_from([1, 2, 3, 5, 7, 8, 9])
POS = {"log", "sqrt", "rsqrt", "pow"}  # ops whose first input must be positive


def _unary(name, **kw):
    return lambda b, x, y: getattr(b, name)(x, **kw)


def _index_copy(b, x, y):
    n, m = x.shape[-1], y.shape[-1]
    return b.node(Op.INDEX_COPY, (x, b.iota(m) * -1 + (n - 1), y), {"axis": -1})


# name -> (build(b, x, y) -> Tensor, y shape from x shape or None)
CASES = {
    **{n: (_unary(n), None) for n in ["neg", "exp", "log", "sqrt", "rsqrt", "sigmoid", "tanh",
                                      "silu", "erf", "sin", "cos", "abs", "relu", "sign",
                                      "round", "logsigmoid", "softplus"]},
    "gelu": (_unary("gelu"), None),
    "stop_gradient": (lambda b, x, y: x * y + b.stop_gradient(x * y) * 3.0, lambda s: s),
    "gelu_tanh": (_unary("gelu", approximate="tanh"), None),
    "clamp": (lambda b, x, y: b.clamp(x, -0.3, 0.4), None),
    "clamp_lo": (lambda b, x, y: b.clamp(x, lo=0.1), None),
    "cast": (lambda b, x, y: b.cast(b.cast(x, "f64"), x.dtype) * 3.0, None),
    "add_bcast": (lambda b, x, y: x + y, lambda s: s[-1:]),
    "sub_bcast": (lambda b, x, y: x - y, lambda s: (1,) + s[1:]),
    "mul_bcast": (lambda b, x, y: x * y, lambda s: s[:-1] + (1,)),
    "div": (lambda b, x, y: x / (b.abs(y) + 0.5), lambda s: s),
    "pow": (lambda b, x, y: b.pow(x, y), lambda s: s),
    "maximum_ties": (lambda b, x, y: b.maximum(x, b.round(y)), lambda s: s),
    "minimum_ties": (lambda b, x, y: b.minimum(b.round(x), y), lambda s: s),
    "where": (lambda b, x, y: b.where(x > 0.0, x * 2.0, y), lambda s: s[-1:]),
    "sum": (lambda b, x, y: b.sum(x, -1), None),
    "sum_nokeep": (lambda b, x, y: b.sum(x, 0, keepdim=False), None),
    "mean": (lambda b, x, y: b.mean(x, 0), None),
    "mean_nokeep": (lambda b, x, y: b.mean(x, -1, keepdim=False), None),
    "amax": (lambda b, x, y: b.amax(x, -1), None),
    "amax_ties": (lambda b, x, y: b.amax(b.round(x * 0.5) + x * 0.0, 0, keepdim=False) + x,
                  None),
    "logsumexp": (lambda b, x, y: b.logsumexp(x, -1, keepdim=False), None),
    "softmax": (lambda b, x, y: b.softmax(x, -1), None),
    "softmax0": (lambda b, x, y: b.softmax(x, 0), None),
    "cumsum": (lambda b, x, y: b.cumsum(x, -1), None),
    "cumprod": (lambda b, x, y: b.cumprod(x, -1), None),
    "cumprod0": (lambda b, x, y: b.cumprod(x, 0), None),
    # zeros inside the scanned values (y > 0.3 picks ~40%): several per row, at any place
    "cumprod_zeros": (lambda b, x, y: b.cumprod(b.where(y > 0.3, x, 0.0), -1), lambda s: s),
    "matmul": (lambda b, x, y: x @ y, lambda s: s[:-2] + (s[-1], 4)),
    "matmul_bcast": (lambda b, x, y: x @ y, lambda s: (s[-1], 3)),
    "reshape": (lambda b, x, y: b.reshape(x, [-1]) * 2.0, None),
    "permute": (lambda b, x, y: b.permute(x, list(reversed(range(x.rank)))), None),
    "expand": (lambda b, x, y: b.expand(b.sum(x, 0), [3] + list(x.shape)), None),
    "slice": (lambda b, x, y: b.slice(x, -1, 1, None) * 1.5, None),
    "slice_step": (lambda b, x, y: b.slice(x, -1, 0, None, 2), None),
    "slice_neg": (lambda b, x, y: b.slice(x, 0, -1, None) + 0.0, None),
    "concat": (lambda b, x, y: b.concat([x, y * 2.0, x], -1), lambda s: s[:-1] + (2,)),
    "split": (lambda b, x, y: b.split(b.concat([x, x], -1), 2, -1)[1] * 3.0, None),
    # written at the last m positions of the last axis, reversed (m = 1, and m = all)
    "index_copy": (lambda b, x, y: _index_copy(b, x, y), lambda s: s[:-1] + (1,)),
    "index_copy_all": (lambda b, x, y: _index_copy(b, x, y) * 2.0, lambda s: s),
    "softmax_attention": (lambda b, x, y: b.softmax(
        b.where(b.causal_mask(x.shape[-1]), x * 0.5, -float("inf")), -1) @ y,
        lambda s: s[:-1] + (4,)),
}
SQUARE = {"softmax_attention"}  # x is a [.., T, T] score matrix


def _draw_shape(draw):
    return tuple(draw(st.lists(DIMS, min_size=2, max_size=3)))


def _build(name, xs, ys):
    build, _ = CASES[name]
    b = Builder({}, {})
    x = b.input("x", xs, "f32")
    y = b.input("y", ys if ys is not None else xs, "f32")
    out = build(b, x, y)
    return Graph(name, b.nodes, {"out": out.node})


def _grads_both(g, vals, gy):
    # oracle: run op by op with torch, differentiate with torch autograd
    leaves = {k: v.clone().requires_grad_(True) for k, v in vals.items()}
    ctx = RefCtx(dims=bind_dims(g, leaves))
    out = run_graph(g, leaves, ctx)["out"]
    want = torch.autograd.grad(out, list(leaves.values()), gy, allow_unused=True)
    # lmc: the autodiff pass's backward graph, run op by op
    prog = differentiate(g, ["x", "y"])
    fwd = run_graph(prog.forward, vals, ctx)
    bound = {s: fwd[s] for s in prog.saved}
    bound["grad:out"] = gy
    got = run_graph(run_pipeline(prog.backward), bound, ctx)
    return out, want, [got["grad:x"], got["grad:y"]]


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_vjp_matches_torch_autograd(name, data):
    xs = _draw_shape(data.draw)
    if name in SQUARE:
        xs = xs[:-1] + (xs[-2],)
    ys = CASES[name][1](xs) if CASES[name][1] else xs
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(xs)
    if name in POS:
        x = x.abs() + 0.5
    vals = {"x": x, "y": torch.randn(ys)}
    g = _build(name, xs, ys)
    out, want, got = _grads_both(g, vals, torch.randn(g.outputs["out"].type.concrete({})))
    for w, h in zip(want, got):
        w = torch.zeros_like(h) if w is None else w
        err = (h - w).abs().max().item()
        scale = max(w.abs().max().item(), 1.0)
        assert err / scale < 1e-5, (name, err, scale)


# finite differences are undefined at deliberately constructed ties; every other case is
# checked in float64 against numerical derivatives
TIES = {"maximum_ties", "minimum_ties", "amax_ties"}
# stop_gradient's VJP is zero by definition, not the numerical derivative of the identity
NOT_NUMERICAL = {"stop_gradient"}


@pytest.mark.parametrize("name", sorted(set(CASES) - TIES - NOT_NUMERICAL))
def test_gradcheck_float64(name):
    torch.manual_seed(0)
    xs = (5, 5) if name in SQUARE else (3, 5)
    ys = CASES[name][1](xs) if CASES[name][1] else xs
    b = Builder({}, {}, default_dtype=lmc.ir.DType.f64)
    x = b.input("x", xs, "f64")
    y = b.input("y", ys, "f64")
    g = Graph(name, b.nodes, {"out": CASES[name][0](b, x, y).node})
    prog = differentiate(g, ["x", "y"])
    xv = torch.randn(xs, dtype=torch.float64)
    if name in POS:
        xv = xv.abs() + 0.5
    yv = torch.randn(ys, dtype=torch.float64)
    ctx = RefCtx(dims={})
    fn = lambda a, c: GraphFunction.apply(prog, ["x", "y"], ctx, a, c)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (xv.requires_grad_(), yv.requires_grad_()))


def test_embedding_gather_scatter_dropout_grads():
    b = Builder({}, {})
    table = b.input("table", [11, 6], "f32")
    ids = b.input("ids", [3, 4], "i64")
    src = b.input("src", [3, 4, 6], "f32")
    e = b.embedding(table, ids)                          # [3, 4, 6]
    idx = b.topk(e, 2, -1)                               # no gradient through indices
    gat = b.gather(e, idx, -1)
    sc = b.scatter_add(e, b.expand(b.reshape(b.iota(6), [1, 1, 6]), [3, 4, 6]) * 0 + 1, src, -1)
    out = b.dropout(b.sum(gat, -1) + b.sum(sc, -1), 0.3, 7)
    g = Graph("idx", b.nodes, {"out": out.node})
    vals = {"table": torch.randn(11, 6), "ids": torch.randint(0, 11, (3, 4)),
            "src": torch.randn(3, 4, 6)}
    ctx = RefCtx(dims={}, training=True)
    leaves = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v)
              for k, v in vals.items()}
    o = run_graph(g, leaves, ctx)["out"]
    gy = torch.randn(o.shape)
    want = torch.autograd.grad(o, [leaves["table"], leaves["src"]], gy)
    prog = differentiate(g)
    assert prog.wrt == ["table", "src"]
    fwd = run_graph(prog.forward, vals, ctx)
    bound = {s: fwd[s] for s in prog.saved}
    bound["grad:out"] = gy
    got = run_graph(prog.backward, bound, ctx)
    torch.testing.assert_close(got["grad:table"], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["grad:src"], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis,idx_shape", [(-1, (3, 4, 1)), (1, (3, 1, 5)),
                                             (-1, (3, 4, 2)), (1, (3, 6, 5))])
def test_gather_gradient_one_index_per_row_is_pointwise(axis, idx_shape):
    """gather with one index per row (the loss picking each target's logit): its gradient is
    where(iota == index, g, 0), pointwise, no scatter_add into a dense zeros of x's size.
    Several indices per row keep the scatter.
    gradcheck in f64 with random cotangents (repeated indices included)."""
    b = Builder({}, {}, default_dtype=lmc.ir.DType.f64)
    x = b.input("x", [3, 4, 5], "f64")
    idx = b.input("idx", list(idx_shape), "i64")
    g = Graph("gather", b.nodes, {"out": (b.gather(x * x, idx, axis) * 1.5).node})
    prog = differentiate(g, ["x"])
    scatters = sum(n.op is Op.SCATTER_ADD for n in prog.backward.nodes)
    assert scatters == (idx_shape[axis] != 1)
    gen = torch.Generator().manual_seed(0)
    iv = torch.randint(0, [3, 4, 5][axis], idx_shape, generator=gen)
    ctx = RefCtx(dims={})
    fn = lambda a: GraphFunction.apply(prog, ["x", "idx"], ctx, a, iv)[0]  # noqa: E731
    xv = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(fn, (xv,))


def test_a_widening_cast_is_recomputed_not_saved():
    """sin(cast(x, f32)) needs the f32 value in its backward (cos x): the f16 x is saved
    (half the bytes) and widened again there, exactly."""
    b = Builder({}, {})
    x = b.input("x", [4, 7], "f16")
    xf = b.cast(x, "f32")
    g = Graph("wide", b.nodes, {"out": b.sum(b.sin(xf), -1).node})
    prog = differentiate(g, ["x"])
    saved = [prog.forward.outputs[s] for s in prog.saved]
    assert [n.type.dtype.value for n in saved] == ["f16"], saved
    xv = torch.randn(4, 7).half()
    gy = torch.randn(4, 1)
    leaf = xv.clone().requires_grad_()
    want, = torch.autograd.grad(run_graph(g, {"x": leaf}, RefCtx(dims={}))["out"], leaf, gy)
    fwd = run_graph(prog.forward, {"x": xv}, RefCtx(dims={}))
    got = run_graph(prog.backward, {**{s: fwd[s] for s in prog.saved}, "grad:out": gy},
                    RefCtx(dims={}))["grad:x"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("zoo", ["llama.yaml", "minimax.yaml"])
def test_forward_saves_only_what_the_backward_reads(zoo):
    """A VJP rule also builds the cotangent of an input that takes none (the loss's division
    by the token count): what only such dead nodes read is not saved. Before, forward'
    returned the loss's sum and a [B, T] difference nothing in the backward read, and its
    kernel stored them."""
    from lmc.passes.loss import with_loss
    g = run_pipeline(with_loss(lmc.load(os.path.join(ZOO, zoo), preset="tiny").graph))
    prog = differentiate(g, outputs=["loss"])
    bwd = run_pipeline(prog.backward)
    users = bwd.users()
    read = {n.attrs["name"] for n in bwd.nodes if n.op is Op.INPUT and users.get(n)}
    assert prog.saved and set(prog.saved) <= read, sorted(set(prog.saved) - read)
    assert sorted(k for k in prog.forward.outputs if k.startswith("saved:")) == \
        sorted(prog.saved)


@pytest.mark.parametrize("sizes,used", [((16, 16, 16), (0, 1, 2)), ((8, 24, 16), (0, 2)),
                                        ((8, 24, 16), (1,)), ((5, 11), (0, 1))])
def test_slices_gradients_accumulate_as_one_concatenation(sizes, used):
    """split(x) read piece by piece (a fused q/k/v projection): the slices' cotangents are
    zero-padded concatenations; their sum is one concatenation of the pieces (zeros where a
    slice is unused), no padded tensors added up. Exact against torch autograd."""
    b = Builder({}, {})
    T_ = Dim.sym("T")
    x = b.input("x", [T_, sum(sizes)], "f32")
    parts = b.split(x, list(sizes), -1)
    w = [b.input(f"w{i}", [sizes[i]], "f32") for i in range(len(sizes))]
    out = None
    for i in used:
        term = b.sum(b.sin(parts[i]) * w[i], -1)
        out = term if out is None else out + term
    g = Graph("split", b.nodes, {"out": out.node})
    prog = differentiate(g, ["x"])
    back = run_pipeline(prog.backward)
    cats = [n for n in back.nodes if n.op is Op.CONCAT]
    assert len(cats) <= 1 and not any(n.op is Op.ADD and any(i.op is Op.CONCAT
                                                             for i in n.inputs)
                                      for n in back.nodes)
    vals = {"x": torch.randn(5, sum(sizes))}
    vals.update({f"w{i}": torch.randn(s) for i, s in enumerate(sizes)})
    gy = torch.randn(5, 1)
    leaf = vals["x"].clone().requires_grad_()
    ctx = RefCtx(dims={"T": 5})
    want, = torch.autograd.grad(run_graph(g, {**vals, "x": leaf}, ctx)["out"], leaf, gy)
    fwd = run_graph(prog.forward, vals, ctx)
    got = run_graph(back, {**{s: fwd[s] for s in prog.saved}, "grad:out": gy}, ctx)["grad:x"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_outputs_without_a_cotangent_take_no_gradient_input():
    """differentiate(outputs=[...]): only those outputs take a cotangent; the backward has no
    grad: input for the others and computes the same gradients as with a zero for them."""
    b = Builder({}, {})
    x = b.input("x", [3, 5], "f32")
    w = b.input("w", [5, 4], "f32")
    logits = x @ w
    g = Graph("two", b.nodes, {"logits": logits.node, "loss": b.sum(b.sum(
        b.exp(logits), -1, keepdim=False), 0, keepdim=False).node})
    full, only = differentiate(g, ["w"]), differentiate(g, ["w"], outputs=["loss"])
    assert full.outputs == ["logits", "loss"] and only.outputs == ["loss"]
    assert "grad:logits" not in {n.attrs["name"] for n in only.backward.inputs}
    assert len(only.saved) <= len(full.saved)
    vals = {"x": torch.randn(3, 5), "w": torch.randn(5, 4)}
    ctx = RefCtx(dims={})
    res = []
    for prog, extra in ((full, {"grad:logits": torch.zeros(3, 4)}), (only, {})):
        fwd = run_graph(prog.forward, vals, ctx)
        bound = {**{s: fwd[s] for s in prog.saved}, "grad:loss": torch.tensor(1.0), **extra}
        res.append(run_graph(prog.backward, bound, ctx)["grad:w"])
    torch.testing.assert_close(res[0], res[1], rtol=0, atol=0)


def test_llama_every_parameter_gradient_equals_the_oracle():
    ids = torch.randint(0, 97, (2, 13))
    gy = torch.randn(2, 13, 97)
    cfg = dict(vocab=97, d=48, layers=2, heads=4, ffn=80, max_seq=32)
    ours = lmc.load(os.path.join(ZOO, "llama.yaml"), seed=5, **cfg)
    oracle = lmc.load(os.path.join(ZOO, "llama.yaml"), seed=5, **cfg)
    oracle.autodiff = "torch"
    (ours(ids) * gy).sum().backward()
    (oracle(ids) * gy).sum().backward()
    assert ours(ids).grad_fn.__class__.__name__ == "GraphFunctionBackward"
    for (name, p), q in zip(ours.named_parameters(), oracle.parameters()):
        err = (p.grad - q.grad).abs().max().item()
        assert err / max(q.grad.abs().max().item(), 1e-3) < 1e-5, (name, err)


def test_trains_with_a_torch_optimizer():
    model = lmc.load(os.path.join(ZOO, "llama.yaml"), preset="tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_softplus_logsigmoid_are_stable_for_large_inputs():
    """No overflow and no log(0) in fp32, forward and backward, far past exp's range."""
    xs = torch.tensor([-1e4, -200.0, -80.0, -20.0, 0.0, 20.0, 80.0, 200.0, 1e4])
    b = Builder({}, {})
    x = b.input("x", [9], "f32")
    g = Graph("sp", b.nodes, {"sp": b.softplus(x).node, "ls": b.logsigmoid(x).node})
    prog = differentiate(g, ["x"])
    ctx = RefCtx(dims={})
    fwd = run_graph(prog.forward, {"x": xs}, ctx)
    x64 = xs.double()
    want_sp = torch.where(x64 > 0, x64, torch.zeros(())) + torch.log1p(torch.exp(-x64.abs()))
    want_sp = want_sp.float().double()  # e^-200 is 0 in fp32: the correctly rounded answer
    torch.testing.assert_close(fwd["sp"].double(), want_sp, rtol=1e-6, atol=0)
    torch.testing.assert_close(fwd["ls"].double(), -torch.flip(want_sp, [0]), rtol=1e-6, atol=0)
    assert fwd["sp"][2] > 0 and fwd["ls"][-3] < 0  # e^-80 survives; -e^-80 too
    bound = {k: fwd[k] for k in prog.saved}
    bound.update({"grad:sp": torch.ones(9), "grad:ls": torch.zeros(9)})
    gsp = run_graph(run_pipeline(prog.backward), bound, ctx)["grad:x"]
    bound.update({"grad:sp": torch.zeros(9), "grad:ls": torch.ones(9)})
    gls = run_graph(run_pipeline(prog.backward), bound, ctx)["grad:x"]
    assert torch.isfinite(gsp).all() and torch.isfinite(gls).all()
    torch.testing.assert_close(gsp.double(), torch.sigmoid(x64).float().double(), rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(gls.double(), torch.sigmoid(-x64).float().double(), rtol=1e-6,
                               atol=0)


def _ste_graph():
    b = Builder({}, {})
    x = b.input("x", [4, 6], "f32")
    w = b.input("w", [6], "f32")
    # straight-through rounding: forward round(x), backward identity; and a value that only
    # reaches the output through stop_gradient (w), whose gradient must be exactly zero
    q = x + b.stop_gradient(b.round(x * 2.0) * 0.5 - x)
    out = q * 3.0 + b.stop_gradient(w * w)
    return Graph("ste", b.nodes, {"out": out.node})


def test_stop_gradient_survives_the_passes_and_stops_exactly():
    g = run_pipeline(_ste_graph())
    assert sum(n.op.value == "stop_gradient" for n in g.nodes) == 2
    vals = {"x": torch.randn(4, 6), "w": torch.randn(6)}
    ctx = RefCtx(dims={})
    out = run_graph(g, vals, ctx)["out"]
    torch.testing.assert_close(out, torch.round(vals["x"] * 2) * 1.5 + vals["w"] ** 2)
    prog = differentiate(g, ["x", "w"])
    fwd = run_graph(prog.forward, vals, ctx)
    bound = {s: fwd[s] for s in prog.saved}
    gy = torch.randn(4, 6)
    bound["grad:out"] = gy
    got = run_graph(run_pipeline(prog.backward), bound, ctx)
    assert torch.equal(got["grad:x"], gy * 3.0)           # straight through, exactly
    assert torch.equal(got["grad:w"], torch.zeros(6))     # stopped, exactly zero
    # the oracle agrees: torch autograd over the references (stop_gradient detaches)
    leaves = {k: v.clone().requires_grad_(True) for k, v in vals.items()}
    o = run_graph(g, leaves, ctx)["out"]
    (gx,) = torch.autograd.grad(o, [leaves["x"]], gy)
    assert torch.equal(gx, gy * 3.0)


def test_stop_gradient_on_the_triton_backend(tmp_path, monkeypatch):
    from lmc.runtime.triton_backend import TritonProgram

    monkeypatch.setenv("LMC_CACHE", str(tmp_path))
    g = run_pipeline(_ste_graph())
    vals = {"x": torch.randn(4, 6), "w": torch.randn(6)}
    ctx = RefCtx(dims={})
    p = TritonProgram(g)
    assert "stop_gradient" in p.source
    torch.testing.assert_close(run_graph(p.graph, vals, ctx, p.impl)["out"],
                               run_graph(g, vals, ctx)["out"])


@pytest.mark.parametrize("row", [
    [0.0, 1.5, -2.0, 0.5],          # first position zero
    [1.5, 0.0, -2.0, 0.5, 3.0],     # one zero inside
    [1.5, -0.7, 0.0, 0.0, 2.0],     # two zeros in a row
    [2.0, 0.0, 1.1, 0.0, 0.9],      # two zeros apart
    [0.8, -1.3, 2.0, 0.0],          # zero at the end
    [0.0, 0.0, 0.0],
])
def test_cumprod_gradient_with_zeros_in_the_input(row):
    """The leaf itself holds exact zeros: float64 gradcheck (cumprod is a polynomial, so finite
    differences are valid at 0) and the explicit sum over products, in both axes."""
    x = torch.tensor([row, [v * 0.5 + 0.25 for v in row]], dtype=torch.float64)
    for axis in (-1, 0):
        b = Builder({}, {}, default_dtype=lmc.ir.DType.f64)
        xi = b.input("x", list(x.shape), "f64")
        g = Graph("cp", b.nodes, {"out": b.cumprod(xi, axis).node})
        prog = differentiate(g, ["x"])
        ctx = RefCtx(dims={})
        fn = lambda a: GraphFunction.apply(prog, ["x"], ctx, a)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),))
        gy = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        xv = x.clone().requires_grad_()
        (fn(xv) * gy).sum().backward()
        xt, gt = x.movedim(axis, -1), gy.movedim(axis, -1)
        want = torch.zeros_like(xt)
        n = xt.shape[-1]
        for r in range(xt.shape[0]):
            for k in range(n):
                want[r, k] = sum(gt[r, i] * math.prod(xt[r, j] for j in range(i + 1) if j != k)
                                 for i in range(k, n))
        torch.testing.assert_close(xv.grad, want.movedim(-1, axis), rtol=1e-12, atol=1e-12)


def test_gaussian_noise_gradient_is_the_identity_in_training():
    b = Builder({}, {})
    x = b.input("x", [3, 5], "f32")
    y = b.input("y", [3, 5], "f32")
    g = Graph("noise", b.nodes, {"out": (b.gaussian_noise(x * y, 0.7, 11) * y).node})
    vals = {"x": torch.randn(3, 5), "y": torch.randn(3, 5)}
    gy = torch.randn(3, 5)
    ctx = RefCtx(dims={}, training=True)
    prog = differentiate(g, ["x", "y"])
    fwd = run_graph(prog.forward, vals, ctx)
    bound = {s: fwd[s] for s in prog.saved}
    bound["grad:out"] = gy
    got = run_graph(run_pipeline(prog.backward), bound, ctx)
    leaves = {k: v.clone().requires_grad_(True) for k, v in vals.items()}
    o = run_graph(g, leaves, ctx)["out"]
    assert torch.equal(o, fwd["out"]) and not torch.equal(o, vals["x"] * vals["y"] ** 2)
    want = torch.autograd.grad(o, [leaves["x"], leaves["y"]], gy)
    torch.testing.assert_close(got["grad:x"], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["grad:y"], want[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["grad:x"], gy * vals["y"] ** 2)
