"""split_gated_projection: a gated FFN written with one fused W_gate|W_up weight and a split
of its product becomes the two-product form (each half a product with a slice of the weight),
which fuse_matmul gates in one kernel; training and decode on the triton backend equal the
torch backend; products split for anything but a gate are left alone, with the reason."""
import os

import pytest
import torch
from conftest import ZOO, triton_step_equals_torch

import lmc
from lmc.passes import run_pipeline
from lmc.passes.loss import with_loss
from lmc.passes.mixed_precision import mixed_precision
from lmc.passes.split_gated_projection import split_gated_projection
from lmc.verify import format_rows, verify

GATES = {   # the gated product as models write it, over the halves g (first) and u
    "swiglu": "(silu(g) * u)",
    "geglu-second": "(g * gelu(u, approximate='tanh'))",
    "silu-by-hand": "(g * sigmoid(g) * u)",
}


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _fused_llama(tmp_path, gate="swiglu"):
    src = open(os.path.join(ZOO, "llama.yaml")).read()
    src = src.replace("      w1: [d, ffn]\n      w3: [d, ffn]\n", "      w13: [d, 2 * ffn]\n")
    src = src.replace("      - return (silu(x @ w1) * (x @ w3)) @ w2",
                      f"      - g, u = split(x @ w13, 2, -1)\n      - return {GATES[gate]} @ w2")
    assert "w13" in src and "split(x @ w13" in src
    p = tmp_path / f"llama_{gate}.yaml"
    p.write_text(src)
    return str(p)


def _records(g, status=None):
    return [r for r in g.meta.get("fusions", []) if r["pass"] == "split_gated_projection"
            and (status is None or r["status"] == status)]


@pytest.mark.parametrize("gate", sorted(GATES))
def test_each_gated_split_becomes_two_products(tmp_path, gate):
    g = run_pipeline(lmc.load(_fused_llama(tmp_path, gate), preset="tiny").graph)
    out = split_gated_projection(g)
    assert [r["status"] for r in _records(out)] == ["fused"] * 2
    mm = [n for n in out.nodes if n.op.value == "matmul" and n.inputs[1].op.value == "slice"]
    assert len(mm) == 4 and all(n.inputs[1].inputs[0].op.value == "param" for n in mm)
    assert not any(n.op.value == "slice" and n.inputs[0].op.value == "matmul"
                   for n in out.nodes)


def test_training_step_equals_the_torch_backend_and_the_gate_is_an_epilogue(tmp_path):
    g = run_pipeline(with_loss(lmc.load(_fused_llama(tmp_path), preset="tiny").graph))
    gen = torch.Generator().manual_seed(3)
    ids, targets = (torch.randint(0, 512, (2, 13), generator=gen) for _ in range(2))
    m, gt = triton_step_equals_torch(g, ids, targets)
    assert gt["layers.0.ffn.w13"].shape == (64, 2 * 128)
    recs = m.program().forward_exec.graph.meta["fusions"]
    assert sum("gated swiglu: 2 matmuls sharing A + silu+mul" in r["reason"]
               for r in recs if r["pass"] == "fuse_matmul") == 2


def test_mixed_precision_weights_split_too(tmp_path):
    g = mixed_precision(run_pipeline(lmc.load(_fused_llama(tmp_path), preset="tiny").graph),
                        "bf16")
    assert [r["status"] for r in _records(split_gated_projection(g))] == ["fused"] * 2


def test_verify_and_the_decode_step(tmp_path):
    rows = verify(_fused_llama(tmp_path))
    assert all(r.ok and not r.skipped for r in rows), format_rows(rows)
    c = lmc.compile_model(_fused_llama(tmp_path), "tiny")
    from lmc.codegen.program import apply_decode_patterns
    from lmc.passes.decode import decode_step
    for static in (False, True):
        step = apply_decode_patterns(decode_step(c.graph, static=static).graph)
        assert [r["status"] for r in _records(step)] == ["fused"] * 2


def test_splits_that_are_not_a_gate_are_left_alone():
    """blues01's fused W_qkv: its q, k, v slices feed the attention (whose kernels read them
    in place), not a gate: declined with the reason, the graph unchanged."""
    g = run_pipeline(lmc.load(os.path.join(ZOO, "blues01.yaml"), preset="tiny").graph)
    out = split_gated_projection(g)
    recs = _records(out)
    assert recs and all(r["status"] == "declined" and "not a gated FFN" in r["reason"]
                        for r in recs)
    assert [n.op for n in out.nodes] == [n.op for n in g.nodes]
