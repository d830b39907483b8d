"""`scan`: a recurrence with a step body graph. Forward against hand-written torch loops, the
VJP in float64 gradcheck and against torch autograd, ragged T, a YAML model that uses it is
causal and trains, and every graph pass leaves the body alone."""
import math
import os

import pytest
import torch

import lmc
from lmc.errors import LmcError
from lmc.frontend.builder import BlockDef, Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.ir.types import DType
from lmc.ops.reference import RefCtx
from lmc.passes import run_pipeline
from lmc.passes.autodiff import differentiate
from lmc.passes.basic import cse, dce, fold_constants, inline
from lmc.passes.fuse_pointwise import fuse_pointwise
from lmc.passes.verify import verify
from lmc.runtime.executor import bind_dims, run_graph
from lmc.runtime.function import GraphFunction

B, T = Dim.sym("B"), Dim.sym("T")
D, H = 5, 4


def _cell(b, h, x, *, hidden):
    """h' = tanh(x Wx + h Wh + bias); y = h' (an Elman RNN step)."""
    wx = b.param("wx", [D, hidden])
    wh = b.param("wh", [hidden, hidden])
    bias = b.param("bias", [hidden])
    hn = b.tanh(x @ wx + h @ wh + bias)
    return hn, hn


CELL = BlockDef("cell", _cell, ["h", "x"], {"hidden": H})


def _rnn_graph(dtype="f32"):
    b = Builder({}, {"cell": CELL}, default_dtype=DType.of(dtype))
    x = b.input("x", [B, T, D], dtype)
    h0 = b.input("h0", [B, H], dtype)
    ys, hT = b.scan("cell", h0, x, 1)
    return Graph("rnn", b.nodes, {"ys": ys.node, "hT": hT.node})


def _rnn_loop(x, h0, P):
    """The same recurrence, by hand."""
    h, ys = h0, []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ P["cell.wx"] + h @ P["cell.wh"] + P["cell.bias"])
        ys.append(h)
    return torch.stack(ys, 1), h


def _params(g, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n.attrs["name"]: 0.5 * torch.randn(n.type.concrete({}), generator=gen, dtype=dtype)
            for n in g.params}


@pytest.mark.parametrize("t_len", [1, 5])
def test_rnn_forward_matches_a_torch_loop(t_len):
    g = run_pipeline(_rnn_graph())
    assert sorted(g.params, key=str) and sorted(n.attrs["name"] for n in g.params) == [
        "cell.bias", "cell.wh", "cell.wx"]
    P = _params(g)
    gen = torch.Generator().manual_seed(t_len)
    vals = {"x": torch.randn(2, t_len, D, generator=gen), "h0": torch.randn(2, H, generator=gen),
            **P}
    out = run_graph(g, vals, RefCtx(dims=bind_dims(g, vals)))
    ys, hT = _rnn_loop(vals["x"], vals["h0"], P)
    assert out["ys"].shape == (2, t_len, H) and out["hT"].shape == (2, H)
    torch.testing.assert_close(out["ys"], ys, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["hT"], hT, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t_len", [1, 5])
def test_rnn_vjp_gradcheck_float64(t_len):
    g = run_pipeline(_rnn_graph("f64"))
    prog = differentiate(g)
    prog.backward = run_pipeline(prog.backward)
    assert Op.SCAN_BWD in {n.op for n in prog.backward.nodes}
    names = ["x", "h0"] + sorted(n.attrs["name"] for n in g.params)
    P = _params(g, torch.float64, seed=1)
    gen = torch.Generator().manual_seed(2)
    vals = [torch.randn(2, t_len, D, generator=gen, dtype=torch.float64),
            torch.randn(2, H, generator=gen, dtype=torch.float64)] + [P[n] for n in names[2:]]
    ctx = RefCtx(dims={"B": 2, "T": t_len})

    def fn(*args):
        ys, hT = GraphFunction.apply(prog, names, ctx, *args)
        return ys, hT

    assert torch.autograd.gradcheck(fn, tuple(v.clone().requires_grad_() for v in vals))


def _grads(g, vals, cotangents, ctx):
    """lmc's backward graph, and torch autograd over the op-by-op oracle."""
    prog = differentiate(g)
    fwd = run_graph(prog.forward, vals, ctx)
    bound = {s: fwd[s] for s in prog.saved}
    for k in prog.outputs:
        bound[f"grad:{k}"] = cotangents[k]
    got = run_graph(run_pipeline(prog.backward), bound, ctx)
    leaves = {k: v.clone().requires_grad_(True) if v.is_floating_point() else v
              for k, v in vals.items()}
    outs = run_graph(g, leaves, ctx)
    keys = [k for k in prog.outputs]
    wrt = [k for k in prog.wrt]
    want = torch.autograd.grad([outs[k] for k in keys], [leaves[w] for w in wrt],
                               [cotangents[k] for k in keys], allow_unused=True)
    return {w: got[f"grad:{w}"] for w in wrt}, dict(zip(wrt, want))


def _lstmish(b, h, c, x, gate, *, hidden):
    """Two carries, two scanned inputs (one of another rank), two outputs; a nonlinear step."""
    w = b.param("w", [D, hidden])
    f = b.sigmoid(gate)                        # [B, 1]: a per-row forget gate from the input
    cn = c * f + b.tanh(x @ w) * (1.0 - f)
    hn = b.tanh(cn) * b.sigmoid(h)
    return hn, cn, hn * 2.0, b.sum(cn * cn, -1)


def test_several_carries_inputs_and_outputs_against_autograd():
    blocks = {"lstmish": BlockDef("lstmish", _lstmish, ["h", "c", "x", "gate"], {"hidden": H})}
    b = Builder({}, blocks)
    x = b.input("x", [B, T, D], "f32")
    gate = b.input("gate", [B, T, 1], "f32")
    h0 = b.input("h0", [B, H], "f32")
    c0 = b.input("c0", [B, H], "f32")
    (y2, sq), (hT, cT) = b.scan("lstmish", [h0, c0], [x, gate], 1, name="cell")
    g = run_pipeline(Graph("lstm", b.nodes, {"y2": y2.node, "sq": sq.node, "cT": cT.node}))
    assert sq.shape == (B, T, 1) and y2.shape == (B, T, H) and cT.shape == (B, H)
    gen = torch.Generator().manual_seed(3)
    vals = {"x": torch.randn(3, 6, D, generator=gen), "gate": torch.randn(3, 6, 1, generator=gen),
            "h0": torch.randn(3, H, generator=gen), "c0": torch.randn(3, H, generator=gen),
            "cell.w": torch.randn(D, H, generator=gen)}
    ctx = RefCtx(dims=bind_dims(g, vals))
    out = run_graph(g, vals, ctx)
    # by hand
    h, c, ys2, sqs = vals["h0"], vals["c0"], [], []
    for t in range(6):
        f = torch.sigmoid(vals["gate"][:, t])
        c = c * f + torch.tanh(vals["x"][:, t] @ vals["cell.w"]) * (1 - f)
        h = torch.tanh(c) * torch.sigmoid(h)
        ys2.append(h * 2)
        sqs.append((c * c).sum(-1, keepdim=True))
    torch.testing.assert_close(out["y2"], torch.stack(ys2, 1))
    torch.testing.assert_close(out["sq"], torch.stack(sqs, 1))
    torch.testing.assert_close(out["cT"], c)
    cts = {k: torch.randn(v.shape, generator=gen) for k, v in out.items()}
    got, want = _grads(g, vals, cts, ctx)
    assert set(got) == {"x", "gate", "h0", "c0", "cell.w"}
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    # only the final carry reaches the loss (the ys get no cotangent), and only one y
    for keep in (["cT"], ["sq"]):
        g1 = run_pipeline(Graph("one", g.nodes, {k: g.outputs[k] for k in keep}))
        got, want = _grads(g1, vals, cts, ctx)
        for k in got:
            w = torch.zeros_like(got[k]) if want[k] is None else want[k]
            torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-6)


def _nested(b, h, x):
    """A step that itself scans (over the feature axis of its input)."""
    inner = BlockDef("acc", lambda b, a, v: (b.tanh(a + v), a * v), ["a", "v"], {})
    vs, a_end = b.scan(inner, h, b.reshape(x, [x.shape[0], D, 1]), 1)  # [B, D, 1], [B, 1]
    hn = b.tanh(h * 0.5 + a_end)
    return hn, b.sum(vs, 1, keepdim=False) + hn


def test_nested_scan_forward_and_gradcheck():
    b = Builder({}, {"nested": BlockDef("nested", _nested, ["h", "x"], {})},
                default_dtype=DType.f64)
    x = b.input("x", [B, T, D], "f64")
    h0 = b.input("h0", [B, 1], "f64")
    ys, _ = b.scan("nested", h0, x, 1)
    g = run_pipeline(Graph("n", b.nodes, {"ys": ys.node}))
    gen = torch.Generator().manual_seed(4)
    xv = torch.randn(2, 3, D, generator=gen, dtype=torch.float64)
    hv = torch.randn(2, 1, generator=gen, dtype=torch.float64)
    out = run_graph(g, {"x": xv, "h0": hv}, RefCtx(dims={"B": 2, "T": 3}))["ys"]
    h, want = hv, []
    for t in range(3):
        a, vs = h, []
        for i in range(D):
            vs.append(a * xv[:, t, i:i + 1])
            a = torch.tanh(a + xv[:, t, i:i + 1])
        h = torch.tanh(h * 0.5 + a)
        want.append(sum(vs) + h)
    torch.testing.assert_close(out, torch.stack(want, 1))
    prog = differentiate(g)
    ctx = RefCtx(dims={"B": 2, "T": 3})
    fn = lambda a, c: GraphFunction.apply(prog, ["x", "h0"], ctx, a, c)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (xv.requires_grad_(), hv.requires_grad_()))


def test_the_passes_keep_the_scan_opaque():
    g = _rnn_graph()
    scan = next(n for n in g.nodes if n.op is Op.SCAN)
    body = scan.attrs["body"]
    before = str(body)
    for p in (inline, fold_constants, cse, dce, fuse_pointwise):
        g = verify(p(g), inlined=True)
        (s,) = [n for n in g.nodes if n.op is Op.SCAN]
        assert s.attrs["body"] is body and str(body) == before
    text = str(g)
    assert "scan " in text and "graph cell {" in text  # the printer shows the body
    # only the final carry used: the ys GETITEM goes, the scan stays
    g2 = dce(Graph("t", g.nodes, {"hT": g.outputs["hT"]}))
    assert sum(n.op is Op.SCAN for n in g2.nodes) == 1


def test_the_triton_backend_runs_around_a_scan(tmp_path, monkeypatch):
    from lmc.runtime.triton_backend import TritonProgram

    monkeypatch.setenv("LMC_CACHE", str(tmp_path))
    b = Builder({}, {"cell": CELL})
    x = b.input("x", [B, T, D], "f32")
    h0 = b.input("h0", [B, H], "f32")
    ys, hT = b.scan("cell", b.silu(h0) * 2.0, b.exp(x) - 1.0, 1)
    g = run_pipeline(Graph("rnn", b.nodes, {"o": (b.sigmoid(ys) * 3.0).node}))
    P = _params(g)
    vals = {"x": torch.randn(2, 4, D), "h0": torch.randn(2, H), **P}
    ctx = RefCtx(dims=bind_dims(g, vals))
    p = TritonProgram(g)
    assert p.kernels
    torch.testing.assert_close(run_graph(p.graph, vals, ctx, p.impl)["o"],
                               run_graph(g, vals, ctx)["o"])


RNN_YAML = """\
name: rnn
config: {vocab: 37, d: 16, h: 12, layers: 2, max_seq: 32}
blocks:
  cell:
    args: [hprev, x]
    params:
      wx: {shape: [d, h], init: normal(0.3)}
      wh: {shape: [h, h], init: normal(0.3)}
      bias: {shape: [h], init: zeros}
    body:
      - hn = tanh(x @ wx + hprev @ wh + bias)
      - return hn, hn
  rnn:
    args: [x]
    params:
      wo: {shape: [h, d], init: normal(0.3)}
    body:
      - h0 = expand(cast(0, 'f32'), [B, h])
      - ys, hT = scan(cell, h0, x, 1)
      - return x + ys @ wo
model:
  inputs: {ids: [B, T]}
  params:
    emb: {shape: [vocab, d], init: normal(0.5)}
    head: [d, vocab]
  body:
    - x = embedding(emb, ids)
    - {for: i, in: layers, body: ["x = rnn(x)"]}
    - logits = x @ head
  outputs: [logits]
"""


@pytest.fixture
def rnn_yaml(tmp_path):
    path = tmp_path / "rnn.yaml"
    path.write_text(RNN_YAML)
    return str(path)


def test_a_yaml_model_using_scan_is_causal(rnn_yaml):
    model = lmc.load(rnn_yaml, seed=0)
    assert {"layers.0.rnn.cell.wx", "layers.1.rnn.cell.wh"} <= dict(model.named_parameters()).keys()
    ids = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        base = model(ids)
        for t in (0, 5, 10):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % 37
            out = model(changed)
            assert torch.equal(out[:, : t + 1], base[:, : t + 1])
            assert not torch.equal(out[:, t + 1], base[:, t + 1])


def test_a_yaml_model_using_scan_trains_with_lmc_gradients(rnn_yaml):
    ours = lmc.load(rnn_yaml, seed=1)
    oracle = lmc.load(rnn_yaml, seed=1)
    oracle.autodiff = "torch"
    ids = torch.randint(0, 37, (2, 7))
    gy = torch.randn(2, 7, 37)
    (ours(ids) * gy).sum().backward()
    (oracle(ids) * gy).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), oracle.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max() + 1e-7, name
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    data = torch.arange(40).reshape(4, 10) % 37                # a learnable pattern
    losses = []
    for _ in range(12):
        logits = ours(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 37), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5 and losses[0] == pytest.approx(math.log(37), abs=0.5)


def _write(tmp_path, body_lines, cell_body="[\"hn = tanh(x + hprev)\", \"return hn, hn\"]"):
    text = f"""\
name: bad
config: {{d: 4}}
blocks:
  cell:
    args: [hprev, x]
    body: {cell_body}
model:
  inputs: {{x: {{shape: [B, T, d], dtype: f32}}}}
  body:
{os.linesep.join('    - ' + ln for ln in body_lines)}
  outputs: [y]
"""
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("lines,cell,match", [
    (["h0 = expand(cast(0, 'f32'), [B, 3])", "y, h = scan(cell, h0, x, 1)"], None,
     r"bad.yaml:6:\d+: .*\[B, 4\] and \[B, 3\] do not broadcast"),  # in the step's body
    (["h0 = expand(cast(0, 'f32'), [B, d])", "y, h = scan(cell, h0, x, 5)"], None,
     r"bad.yaml:11:\d+: .*scan axis 5 out of range"),
    (["h0 = expand(cast(0, 'f32'), [B, d])", "y, h = scan(cell, h0, [x, x[:, 1:]], 1)"], None,
     r"bad.yaml:11:\d+: .*differ in length"),
    (["h0 = expand(cast(0, 'f32'), [B, d])", "y, h = scan(nosuch, h0, x, 1)"], None,
     r"bad.yaml:11:\d+: .*undefined name 'nosuch'"),
    (["h0 = expand(cast(0, 'f32'), [B, d])", "y, h = scan(cell, h0, x, 1)"],
     "[\"return sum(x + hprev, -1), x\"]", r"bad.yaml:11:\d+: .*carry of type f32\[B,1\] for "
                                           r"a carry of type f32\[B,4\]"),
    (["h0 = expand(cast(0, 'f32'), [B, d])", "y, h = scan(cell, h0, x, 1)"],
     "[\"return x + hprev\"]", r"bad.yaml:11:\d+: .*at least one output"),
])
def test_bad_scans_are_one_line_errors(tmp_path, lines, cell, match):
    path = _write(tmp_path, lines, cell) if cell else _write(tmp_path, lines)
    with pytest.raises(LmcError) as e:
        lmc.compile_model(path)
    assert "\n" not in e.value.format()
    import re
    assert re.search(match, e.value.format()), e.value.format()
