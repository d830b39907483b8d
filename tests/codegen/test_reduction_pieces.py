"""A reduction kernel whose epilogue slices its row value along the reduced axis and puts the
slices back together (RoPE's rotate-half after a per-head QK-norm, gemma2's and Qwen3's
q and k): one kernel, the slices never stored (fuse_reductions._pieces, the `shifted`
emitter of lmc/codegen/reduction.py). Triton's interpreter against the oracle on ragged
sizes, rows of one chunk and of several (the pieces crossing chunk edges), partial rotary,
a piece reading a per-row value, fp16; the forms that must not fuse; and a model's decode
and gradients with the fusion in place."""
import os

import pytest
import torch
from conftest import triton_matches_oracle

import lmc
from lmc.codegen import reduction
from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.runtime.decoder import Decoder

B, T = Dim.sym("B"), Dim.sym("T")
H = 3
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "examples")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _normed_rope(D, R=None, form="rope", dtype="f32"):
    """q [B, H, T, D] RMS-normed over D, then rotated on its first R columns."""
    R = D if R is None else R
    b = Builder({}, {})
    q = b.input("q", [B, H, T, D], dtype)
    w = b.input("w", [D], dtype)
    cos = b.input("cos", [T, R], dtype)
    sin = b.input("sin", [T, R], dtype)
    rstd = b.rsqrt(b.mean(q * q, -1) + 1e-6)
    y = q * rstd * w
    rot = b.slice(y, -1, 0, R) if R < D else y
    x1, x2 = b.split(rot, 2, -1)
    if form == "per_row":          # a piece reads the per-row rstd as well
        spun = b.concat([-x2 * rstd, x1], -1)
    else:
        spun = b.concat([-x2, x1], -1)
    out = rot * cos + spun * sin
    if R < D:                      # partial rotary: the rest of the head passes through
        out = b.concat([out, b.slice(y, -1, R, D)], -1)
    return Graph("normed_rope", b.nodes, {"out": out.node})


def _vals(D, R, bt, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bn, Tn = bt
    R = D if R is None else R
    return {"q": torch.randn(Bn, H, Tn, D, generator=g).to(dtype),
            "w": (1 + 0.5 * torch.randn(D, generator=g)).to(dtype),
            "cos": torch.randn(Tn, R, generator=g).to(dtype),
            "sin": torch.randn(Tn, R, generator=g).to(dtype)}


def _fused(p):
    return [n for n in p.graph.nodes if n.op is Op.FUSED]


@pytest.mark.parametrize("chunk", [0, 4, 16])      # 0: a row is one chunk
@pytest.mark.parametrize("D,R,form", [(8, None, "rope"), (6, None, "rope"),
                                      (64, None, "rope"), (24, None, "per_row"),
                                      (20, 8, "rope"), (64, 32, "rope"), (10, 2, "rope")])
def test_a_normed_rotation_is_one_reduction_kernel(D, R, form, chunk, monkeypatch):
    monkeypatch.setattr(reduction, "INTERPRET_BLOCK_N", chunk)
    g = _normed_rope(D, R, form)
    for bt in [(1, 1), (2, 5)]:
        p = triton_matches_oracle(g, _vals(D, R, bt))
    (k,) = _fused(p)
    assert k.attrs["kind"] == "reduction"
    ops = [n.op for n in k.attrs["body"].nodes]
    assert Op.CONCAT in ops and Op.SLICE in ops
    assert list(k.attrs["body"].outputs) == ["0"]          # the rotated rows alone stored


def test_fp16_normed_rotation(monkeypatch):
    monkeypatch.setattr(reduction, "INTERPRET_BLOCK_N", 8)
    g = _normed_rope(16, None, "rope", "f16")
    p = triton_matches_oracle(g, _vals(16, None, (2, 3), torch.float16), rtol=2e-3, atol=2e-3)
    assert [n.attrs["kind"] for n in _fused(p)] == ["reduction"]


def test_a_slice_read_elsewhere_keeps_the_rotation_apart():
    """x1 is also an output: a piece would have to be stored, so the rotation stays a
    pointwise kernel reading the norm's rows (and both still equal the oracle)."""
    D = 8
    b = Builder({}, {})
    q = b.input("q", [B, H, T, D], "f32")
    cos = b.input("cos", [T, D], "f32")
    sin = b.input("sin", [T, D], "f32")
    y = q * b.rsqrt(b.mean(q * q, -1) + 1e-6)
    x1, x2 = b.split(y, 2, -1)
    out = y * cos + b.concat([-x2, x1], -1) * sin
    g = Graph("g", b.nodes, {"out": out.node, "x1": x1.node})
    vals = {k: v for k, v in _vals(D, None, (2, 5)).items() if k != "w"}
    p = triton_matches_oracle(g, vals)
    kinds = sorted(n.attrs["kind"] for n in _fused(p))
    assert kinds == ["pointwise", "reduction"], kinds
    red = next(n for n in _fused(p) if n.attrs["kind"] == "reduction")
    assert not any(n.op is Op.CONCAT for n in red.attrs["body"].nodes)


def test_slices_of_a_scan_are_not_pieces():
    """A cumsum along the axis is computed chunk by chunk with a carry: its value at shifted
    columns is not at hand, so its slices stay out of the kernel."""
    D = 8
    b = Builder({}, {})
    q = b.input("q", [B, T, D], "f32")
    c = b.cumsum(q * 2.0, -1)
    x1, x2 = b.split(c, 2, -1)
    out = b.concat([x2, x1], -1) + 1.0
    g = Graph("g", b.nodes, {"out": out.node})
    p = triton_matches_oracle(g, {"q": torch.randn(2, 5, D)})
    assert not any(n.op is Op.CONCAT for k in _fused(p) if k.attrs["kind"] == "reduction"
                   for n in k.attrs["body"].nodes)


def test_gemma2_step_rotates_q_and_k_in_their_norm_kernels(monkeypatch):
    """gemma2's QK-norm then RoPE: per layer the step had a norm kernel and a rope kernel
    for each of q and k; now the norm kernel rotates (k's rotated rows written into its ring
    in place). The decode equals the forward over prefill and steps, both step kinds."""
    monkeypatch.setattr(reduction, "INTERPRET_BLOCK_N", 16)     # pieces cross chunk edges
    path = os.path.join(EXAMPLES, "gemma2.yaml")
    m = lmc.load(path, preset="tiny", backend="triton", seed=2, attn_cap=1.5).eval()
    vocab = m.graph.outputs["logits"].type.shape[-1]
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = m(ids)
    for static in (False, True):
        dec = Decoder(m, backend="triton", static=static, max_len=12 if static else None)
        kernels = [n for n in dec.graph.nodes if n.op is Op.FUSED]
        rotating = [k for k in kernels if k.attrs["kind"] == "reduction" and
                    any(n.op is Op.CONCAT for n in k.attrs["body"].nodes)]
        layers = m.config["layers"]
        assert len(rotating) == 2 * layers, [k.attrs["kernel"] for k in kernels]
        assert not any(k.attrs["kind"] == "pointwise" and any(
            n.op is Op.NEG for n in k.attrs["body"].nodes) for k in kernels)
        st = dec.init_state(2)
        got, st = dec(ids[:, :4], st)
        outs = [got]
        for t in range(4, 9):
            lg, st = dec(ids[:, t:t + 1], st)
            outs.append(lg)
        assert (torch.cat(outs, 1) - want).abs().max().item() < 1e-4


def test_gradients_through_a_normed_rotation_match_the_oracle(monkeypatch):
    """gemma2 with RoPE left out of attention (fuse_rope_attention disabled): the forward's
    norm kernels rotate, and every gradient equals the torch backend's."""
    monkeypatch.setattr(reduction, "INTERPRET_BLOCK_N", 16)
    path = os.path.join(EXAMPLES, "gemma2.yaml")
    kw = dict(preset="tiny", seed=3, attn_cap=1.5)
    ref = lmc.load(path, **kw)
    tri = lmc.load(path, backend="triton", **kw)
    tri.disable = ("fuse_rope_attention",)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    up = None
    for model in (ref, tri):
        out = model(ids)
        if up is None:
            up = torch.randn(out.shape, generator=g)
        (out * up).sum().backward()
    prog = tri.program()
    fwd = prog.forward_exec.graph
    assert any(k.op is Op.FUSED and k.attrs["kind"] == "reduction" and
               any(n.op is Op.CONCAT for n in k.attrs["body"].nodes) for k in fwd.nodes)
    for (name, a), (_, b) in zip(ref.named_parameters(), tri.named_parameters()):
        # fp32, sums in another order: within 1e-5 of the gradient's largest entry
        err = (b.grad - a.grad).abs().max().item()
        assert err <= 1e-5 * a.grad.abs().max().item(), (name, err)
