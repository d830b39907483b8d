"""Inline, constant folding, CSE, DCE, verify and the pipeline runner."""
import os

import pytest
import torch
from conftest import ZOO
from hypothesis import given, settings
from hypothesis import strategies as st

import lmc
from lmc.errors import LmcError
from lmc.frontend.builder import Builder
from lmc.frontend.model import load_graph
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph, Node
from lmc.ir.ops import Kind, Op
from lmc.ops.reference import RefCtx
from lmc.passes import PIPELINE, run_pipeline
from lmc.passes.basic import cse, dce, fold_constants, inline
from lmc.passes.verify import verify
from lmc.runtime.executor import bind_dims, run_graph

LLAMA = os.path.join(ZOO, "llama.yaml")


def _run(g, **inputs):
    return run_graph(g, inputs, RefCtx(dims=bind_dims(g, inputs)))


def test_inline_removes_every_block_and_keeps_params():
    src = load_graph(LLAMA, "tiny")
    assert any(n.op is Op.BLOCK for n in src.nodes)
    g = inline(src)
    assert not any(n.op.kind is Kind.STRUCTURAL for n in g.nodes)
    names = sorted(p.attrs["name"] for p in g.params)
    assert "layers.1.attn.wo" in names and "norm.weight" in names
    assert len(names) == len(set(names))
    # scope survives inlining: each node says which instance it came from
    assert any(n.scope == "layers.1.attn" for n in g.nodes)
    verify(g, inlined=True)


def test_cse_merges_the_per_layer_causal_masks():
    g = inline(load_graph(LLAMA, "tiny", {"layers": 5}))
    assert sum(n.op is Op.CAUSAL_MASK for n in g.nodes) == 5
    g2 = cse(g)
    assert sum(n.op is Op.CAUSAL_MASK for n in g2.nodes) == 1
    ids = torch.randint(0, 512, (2, 7))
    model = lmc.load(LLAMA, preset="tiny", layers=5)
    params = dict(model.named_parameters())
    with torch.no_grad():
        a = _run(g, ids=ids, **params)["logits"]
        b = _run(dce(g2), ids=ids, **params)["logits"]
    assert torch.equal(a, b)


def test_fold_constants_evaluates_rope_frequencies():
    g = fold_constants(inline(load_graph(LLAMA, "tiny")))
    consts = [n for n in g.nodes if n.op is Op.CONST and hasattr(n.attrs["value"], "shape")]
    assert any(tuple(n.type.shape) == (8,) for n in consts)  # inv_freq: head_dim/2 = 8
    assert not any(n.op is Op.POW for n in g.nodes)
    # things that depend on T are not folded
    assert any(n.op is Op.IOTA and isinstance(n.type.shape[0], Dim) for n in g.nodes)


def test_dropout_zero_and_zero_noise_fold_to_their_input():
    # GPT-2 style configs turn dropout off with p = 0: no kernel and no draw is left; a
    # nonzero p stays (training mode decides at run time)
    T_ = Dim.sym("T")
    b = Builder({}, {})
    x = b.input("x", [T_, 8], "f32")
    y = b.dropout(x, 0.0, 1) + b.gaussian_noise(x, 0.0, 2) + b.dropout(x, 0.1, 3)
    g = fold_constants(Graph("d", b.nodes, {"y": y.node}))
    ops = [n.op for n in dce(g).nodes]
    assert ops.count(Op.DROPOUT) == 1 and Op.GAUSSIAN_NOISE not in ops
    vals = {"x": torch.randn(5, 8)}
    for training in (False, True):
        ctx = RefCtx(dims={"T": 5}, training=training)
        src = Graph("d", b.nodes, {"y": y.node})
        torch.testing.assert_close(run_graph(g, vals, ctx)["y"], run_graph(src, vals, ctx)["y"])


def test_dce_drops_dead_nodes_but_keeps_the_interface():
    b = Builder({}, {})
    x = b.input("x", [3], "f32")
    w = b.param("unused", [4])
    dead = b.exp(x)
    y = x * 2.0
    g = dce(Graph("t", b.nodes, {"y": y.node}))
    assert dead.node not in g.nodes
    assert w.node in g.nodes and x.node in g.nodes


def test_verify_catches_a_wrong_type():
    b = Builder({}, {})
    x = b.input("x", [3], "f32")
    y = b.exp(x)
    broken = Node(Op.EXP, (x.node,), {}, y.node.type.with_shape([4]))
    with pytest.raises(LmcError, match="its rule says"):
        verify(Graph("t", [x.node, broken], {"y": broken}))


def test_verify_catches_use_before_definition():
    b = Builder({}, {})
    x = b.input("x", [3], "f32")
    y = b.exp(x)
    with pytest.raises(LmcError, match="not defined before"):
        verify(Graph("t", [y.node, x.node], {"y": y.node}))


def test_pipeline_records_history_and_debug_prints(monkeypatch, capsys):
    monkeypatch.setenv("LMC_DEBUG", "1")
    g = run_pipeline(load_graph(LLAMA, "tiny"))
    assert [h["pass"] for h in g.meta["history"]] == [name for name, _ in PIPELINE]
    err = capsys.readouterr().err
    assert "after inline" in err and "after dce" in err


def test_unknown_disabled_pass_is_an_error():
    with pytest.raises(LmcError, match="unknown pass"):
        run_pipeline(load_graph(LLAMA, "tiny"), disable=["fuse_everything"])


# -- property: the pipeline never changes what a graph computes --------------------------------
_UN = ["exp", "tanh", "sigmoid", "silu", "neg", "abs", "sin", "cos", "relu"]
_BIN = ["add", "sub", "mul", "maximum", "minimum"]


@st.composite
def random_graph(draw):
    n = draw(st.integers(1, 9))
    shape = [Dim.sym("B"), draw(st.sampled_from([1, 3, 7, 63]))]
    b = Builder({}, {})
    vals = [b.input("x", shape, "f32"), b.input("y", shape, "f32")]
    for _ in range(draw(st.integers(2, 14))):
        kind = draw(st.sampled_from(["un", "bin", "red", "const", "soft", "dup"]))
        a = draw(st.sampled_from(vals))
        if kind == "un":
            vals.append(getattr(b, draw(st.sampled_from(_UN)))(a))
        elif kind == "bin":
            vals.append(getattr(b, draw(st.sampled_from(_BIN)))(a, draw(st.sampled_from(vals))))
        elif kind == "red":
            vals.append(a - getattr(b, draw(st.sampled_from(["sum", "mean", "amax",
                                                              "logsumexp"])))(a, -1))
        elif kind == "const":
            vals.append(a * (b.const(2.0) + b.const(draw(st.floats(-2, 2)))))
        elif kind == "soft":
            vals.append(b.softmax(a, -1))
        else:  # the same expression twice: CSE material
            vals.append(b.tanh(a) + b.tanh(a))
    outs = {f"o{i}": v.node for i, v in enumerate(vals[-draw(st.integers(1, 3)):])}
    return Graph("random", b.nodes, outs), n


@settings(max_examples=40, deadline=None)
@given(random_graph())
def test_pipeline_preserves_semantics(gb):
    g, batch = gb
    xs = {"x": torch.randn(batch, g.inputs[0].type.shape[1]),
          "y": torch.randn(batch, g.inputs[0].type.shape[1])}
    before = _run(g, **xs)
    after = _run(run_pipeline(Graph(g.name, g.nodes, g.outputs)), **xs)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_a_constant_holding_a_symbolic_size_is_not_folded():
    """b.const(T) (T symbolic) is known only when the graph runs: fold_constants left it
    alone only as an input of nothing foldable, and cast(const(T)) raised a raw KeyError."""
    import torch

    from lmc.frontend.builder import Builder
    from lmc.ir.dims import Dim
    from lmc.runtime.module import LmcModel
    B, T = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    x = b.input("x", [B, T, 4], "f32")
    y = b.cumsum(x, 1) / b.cast(b.const(T, "i64"), "f32") + x / b.const(T, "f32")
    m = LmcModel(run_pipeline(Graph("g", b.nodes, {"y": y.node})))
    for t in (1, 5):
        v = torch.randn(2, t, 4)
        with torch.no_grad():
            torch.testing.assert_close(m(x=v), v.cumsum(1) / t + v / t)
