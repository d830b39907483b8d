"""The wrapper program's concat written by its pieces' kernels (`concat_aliases`): pieces from
pointwise kernels (stored through strides), reduction row outputs and the attention templates,
seen through the views it can invert, are written into strided views of the concat's buffer
and no concat runs; what it cannot alias stays a torch op. Run in Triton's interpreter against
the oracle."""
import pytest
import torch
from conftest import triton_matches_oracle, triton_step_equals_torch

import lmc
from lmc.codegen.wrapper import concat_aliases
from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.passes import run_pipeline
from lmc.passes.loss import with_loss

B, T = Dim.sym("B"), Dim.sym("T")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _pieces_graph():
    """concat([pointwise [B, T, 2, 2] seen as [B, T, 4], a norm's rows [B, T, 4], pointwise
    [B, 1, T, 4] seen as [B, T, 4]], -1) @ W: the shape of a split projection's gradient
    (behind views, the pieces are no pointwise kernel's own concat)."""
    b = Builder({}, {})
    x = b.input("x", [B, T, 12], "f32")
    w = b.input("w", [12, 5], "f32")
    a = b.exp(b.reshape(b.slice(x, -1, 0, 4), [B, T, 2, 2])) * 2.0
    r = b.slice(x, -1, 4, 8)
    r = r * b.rsqrt(b.mean(r * r, -1) + 1e-5)
    u = b.tanh(b.reshape(b.slice(x, -1, 8, 12), [B, 1, T, 4])) - 0.5
    cat = b.concat([b.reshape(a, [B, T, 4]), r, b.reshape(u, [B, T, 4])], -1)
    return Graph("pieces", b.nodes, {"y": (cat @ w).node})


def test_pieces_from_pointwise_and_reduction_kernels_write_into_the_concat():
    g = run_pipeline(_pieces_graph())
    gen = torch.Generator().manual_seed(0)
    for Bv, Tv in ((1, 1), (2, 7)):
        vals = {"x": torch.randn(Bv, Tv, 12, generator=gen),
                "w": torch.randn(12, 5, generator=gen)}
        p = triton_matches_oracle(g, vals)
    src = p.program_source
    assert src.count("concat written by its pieces' kernels") == 1, src
    assert src.count("its piece of the concat") == 3
    (pieces,) = concat_aliases(p.graph).values()
    kinds = sorted(y.inputs[0].attrs["kind"] for y, _ in pieces)
    assert kinds.count("pointwise") >= 1 and "reduction" in kinds, kinds
    # views of the buffer's narrowed columns back to each kernel's output: the last axis
    # split (and merged again, as the program's views went), a unit axis put back
    assert [(off, size, steps) for _, (off, size, steps) in pieces] == [
        (0, 4, [("view", (B, T, 2, 2)), ("view", (B, T, 4))]),
        (4, 4, []),
        (8, 4, [("view", (B, 1, T, 4)), ("view", (B, T, 4))])], pieces
    # pointwise pieces store through the strides of the view they are given
    assert "out0_s0" in p.source
    assert not any(n.op is Op.CONCAT for n in p.graph.nodes
                   if n not in concat_aliases(p.graph))


SPLIT_NORM = """
name: split_norm
config: {vocab: 29, d: 8}
model:
  inputs: {ids: [B, T]}
  params:
    embed: [vocab, d]
    norms: {shape: [2 * d], init: ones}
    w12: [d, 2 * d]
    head: [d, vocab]
  body:
    - x = embedding(embed, ids)
    - g1, g2 = split(norms, 2, -1)
    - x = x + x * rsqrt(mean(x * x, -1) + 1.0e-5) * g1
    - x = x + x * rsqrt(mean(x * x, -1) + 1.0e-5) * g2
    - h1, h2 = split(x @ w12, 2, -1)
    - logits = (silu(h1) * h2) @ head
  outputs: [logits]
"""


def test_split_gradients_train_equal_to_the_torch_backend(tmp_path):
    """The gradient of split norm weights, two 1-d column sums finished by their own kernel,
    is written into the concat's buffer; the gated projection's weight gradient, the halves'
    products (split_gated_projection made the fused w12 two products), stays a torch concat
    (matmul kernels store contiguously). A training step equals the torch backend's."""
    path = tmp_path / "split_norm.yaml"
    path.write_text(SPLIT_NORM)
    g = run_pipeline(with_loss(lmc.load(str(path)).graph))
    gen = torch.Generator().manual_seed(1)
    ids, targets = (torch.randint(0, 29, (2, 13), generator=gen) for _ in range(2))
    m, _ = triton_step_equals_torch(g, ids, targets)
    back = m.program().backward_exec
    aliased = concat_aliases(back.graph)
    cats = {tuple(str(d) for d in n.type.shape): n for n in back.graph.nodes
            if n.op is Op.CONCAT}
    assert sorted(cats) == [("16",), ("8", "16")]
    assert list(aliased) == [cats[("16",)]]
    (pieces,) = aliased.values()
    assert [y.inputs[0].attrs["kind"] for y, _ in pieces] == ["reduction"] * 2
    assert back.program_source.count("its piece of the concat") == 2
