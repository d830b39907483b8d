"""Forward outputs saved for a fused op's backward (body meta "saved"): the autodiff pass gives
the `<kind>_bwd` op the forward op's outputs it names (GETITEMs, made where the graph read
none), fuse_rope_attention saves its output and row log-sum-exp, and the attention backward
template reads them instead of rerunning the flash-attention forward."""
import math
import os

import pytest
import torch
from conftest import ZOO
from test_fuse_rope_attention import _attention, _variant

import lmc
from lmc.codegen import attention
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.passes import run_pipeline
from lmc.passes.autodiff import differentiate
from lmc.passes.fuse_rope_attention import fuse_rope_attention
from lmc.passes.loss import with_loss
from lmc.passes.verify import verify
from lmc.runtime.executor import bind_dims, run_graph
from lmc.runtime.module import LmcModel
from lmc.runtime.triton_backend import TritonProgram


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def launches(monkeypatch):
    """The attention kernels launched through attention._launch, by kind, in order."""
    seen = []
    real = attention._launch

    def spy(kind, grid, *args, **kw):
        seen.append(kind)
        return real(kind, grid, *args, **kw)
    monkeypatch.setattr(attention, "_launch", spy)
    return seen


def _fused_node(g):
    (n,) = [x for x in g.nodes if x.op is Op.FUSED]
    return n


def _torch_lse(q, k, D, window):
    """logsumexp over keys of the masked, scaled scores of _attention's graph, in torch."""
    t = q.shape[2]
    inv = torch.tensor([1.0 / 10000 ** (2 * i / D) for i in range(D // 2)])
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)

    def rope(x):
        return x * ang.cos() + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * ang.sin()
    s = (rope(q).double() @ rope(k).double().transpose(-2, -1)) / math.sqrt(D)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    vis = j <= i
    if window:
        vis &= j > i - window
    return torch.logsumexp(s.masked_fill(~vis, float("-inf")), -1)


@pytest.mark.parametrize("window", [0, 5])
def test_lse_output_is_the_logsumexp_of_the_masked_scaled_scores(window):
    D, t = 16, 21
    f = fuse_rope_attention(_attention(D, window))
    fused = _fused_node(f)
    body = fused.attrs["body"]
    assert list(body.outputs) == ["0", "1"] and body.meta["saved"] == ["0", "1"]
    assert fused.type[1].dtype.value == "f32" and len(fused.type[1].shape) == 3
    # a program that reads the lse: the forward kernel writes it, the body computes it
    get = type(fused).make(Op.GETITEM, [fused], {"index": 1})
    g2 = f.with_nodes(f.nodes + [get], dict(f.outputs, lse=get))
    verify(g2)
    gen = torch.Generator().manual_seed(window)
    vals = {n: torch.randn(2, 2, t, D, generator=gen) for n in "qkv"}
    ctx = RefCtx(dims=bind_dims(g2, vals))
    want = _torch_lse(vals["q"], vals["k"], D, window)
    got = TritonProgram(g2).run(vals, ctx)
    oracle = run_graph(g2, vals, ctx)
    assert got["lse"].dtype == oracle["lse"].dtype == torch.float32
    assert got["lse"].shape == (2, 2, t)
    torch.testing.assert_close(got["lse"].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(oracle["lse"].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["o"], oracle["o"], rtol=1e-5, atol=1e-5)


def test_unread_lse_output_is_fine_without_a_backward():
    # inference: nothing reads the lse, the wrapper passes None for it, the kernel writes
    # scratch; the liveness plan has one buffer for the op (its output)
    g = _attention(16, 0)
    f = fuse_rope_attention(g)
    fused = _fused_node(f)
    assert [n.attrs["index"] for n in f.nodes if n.op is Op.GETITEM
            and n.inputs[0] is fused] == [0]
    prog = TritonProgram(f)
    (line,) = [x for x in prog.program_source.splitlines() if "LAUNCH['rope_attention']" in x]
    assert ", None]" in line
    gen = torch.Generator().manual_seed(1)
    vals = {n: torch.randn(1, 2, 9, 16, generator=gen) for n in "qkv"}
    ctx = RefCtx(dims=bind_dims(g, vals))
    torch.testing.assert_close(prog.run(vals, ctx)["o"], run_graph(g, vals, ctx)["o"],
                               rtol=1e-5, atol=1e-5)


def test_backward_op_reads_saved_outputs_and_lse_takes_no_cotangent():
    f = fuse_rope_attention(_variant(4, 2, 32, rot=16, window=9))
    fused = _fused_node(f)
    prog = differentiate(f)
    verify(prog.forward)
    # forward' reads the lse through a GETITEM made for it, right after the op; the output
    # is saved through the graph's own GETITEM (no second one)
    fw = prog.forward
    gets = {n.attrs["index"]: n for n in fw.nodes if n.op is Op.GETITEM and n.inputs[0] is fused}
    assert sorted(gets) == [0, 1]
    assert fw.nodes.index(gets[1]) == fw.nodes.index(fused) + 1
    saved = {fw.outputs[s]: s for s in prog.saved}
    assert gets[0] in saved and gets[1] in saved
    back = run_pipeline(prog.backward)
    (bwd,) = [n for n in back.nodes if n.op is Op.FUSED]
    opts = bwd.attrs["body"].meta["options"]
    n_in = len(fused.inputs)
    assert opts["n_inputs"] == n_in and opts["saved"] == ["0", "1"]
    assert opts["cotangents"] == ["0"]             # lse: stop_gradient in the body, none
    assert len(bwd.inputs) == n_in + 3
    names = [n.attrs["name"] for n in bwd.inputs[n_in:n_in + 2]]
    assert names == [saved[gets[0]], saved[gets[1]]]
    assert bwd.inputs[n_in + 2].attrs["name"] == "grad:o"
    # nothing T x T is built for the backward outside the op
    assert not any(n.type.rank == 4 and n.type.shape[-1] == n.type.shape[-2]
                   for n in back.nodes if n.op is not Op.FUSED)


@pytest.mark.parametrize("variant", ["mha", "mla"])
def test_backward_does_not_rerun_the_forward_kernel(variant, launches):
    if variant == "mha":
        g = _attention(16, 5)
        shapes = {n: (1, 2, 19, 16) for n in "qkv"}
    else:
        g = _variant(2, 2, 16, mla=8)
        shapes = {"qc": (1, 2, 19, 16), "qr": (1, 2, 19, 8), "kc": (1, 2, 19, 16),
                  "kr": (1, 1, 19, 8), "v": (1, 2, 19, 16)}
    f = fuse_rope_attention(g)
    prog = differentiate(f, list(shapes))
    fw_prog = TritonProgram(prog.forward)
    bw_prog = TritonProgram(run_pipeline(prog.backward), label="backward")
    gen = torch.Generator().manual_seed(2)
    vals = {n: torch.randn(*s, generator=gen) for n, s in shapes.items()}
    ctx = RefCtx(dims=bind_dims(g, vals))
    fw = fw_prog.run(vals, ctx)
    assert launches == ["fwd"]
    bound = {s: fw[s] for s in prog.saved}
    bound["grad:o"] = torch.randn(fw["o"].shape, generator=gen)
    del launches[:]
    grads = bw_prog.run(bound, ctx)
    assert launches == ["dkdv", "dq"]
    # and the gradients are the oracle's (the primitives differentiated op by op)
    ref = differentiate(g, list(shapes))
    rfw = run_graph(ref.forward, vals, ctx)
    rb = {s: rfw[s] for s in ref.saved}
    rb["grad:o"] = bound["grad:o"]
    want = run_graph(run_pipeline(ref.backward), rb, ctx)
    for n in shapes:
        torch.testing.assert_close(grads[f"grad:{n}"], want[f"grad:{n}"], rtol=1e-4, atol=1e-5)


def test_llama_training_step_backward_launches_no_attention_forward(launches):
    # a training step of zoo/llama (tiny, 2 layers) on the triton backend: the forward runs
    # the attention forward kernel once per layer, the backward only dK/dV and dQ
    graph = run_pipeline(with_loss(
        lmc.load(os.path.join(ZOO, "llama.yaml"), preset="tiny", layers=1, d=32, heads=2,
                 ffn=32, vocab=64).graph))
    model = LmcModel(graph, backend="triton", seed=0)
    prog = model.program()
    assert isinstance(prog.forward, Graph)
    ids = torch.randint(0, 64, (1, 11))
    out = model(ids, targets=torch.randint(0, 64, (1, 11)))
    assert launches == ["fwd"]
    del launches[:]
    out["loss"].backward()
    assert launches == ["dkdv", "dq"]
    assert all(p.grad is not None for p in model.parameters())
