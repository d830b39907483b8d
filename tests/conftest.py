import os
import sys

import pytest

import lmc  # noqa: F401  (on a machine without CUDA: TRITON_INTERPRET=1 before triton loads)
from lmc.codegen import interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = os.path.join(ROOT, "zoo")
sys.path.insert(0, os.path.join(ROOT, "tests"))
# kernels launched by the tests directly (not through a TritonProgram, which installs it)
# skip the interpreter's repeated patch at helper calls too (lmc/codegen/interpreter.py)
interpreter.install()


# -- shared by the zoo's parity tests ------------------------------------------------------------
def copy_weights(model, ref):
    """Load an lmc model's weights into a hand-written nn.Module reference with the same
    parameter names: `embed` into `ref.embed.weight`, vectors as they are, and matrices
    transposed (lmc stores [in, out], nn.Linear [out, in] under `<name>.weight`)."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embed":
                ref.embed.weight.copy_(p)
            elif p.dim() == 1:
                ref.get_parameter(name).copy_(p)
            else:
                ref.get_parameter(name + ".weight").copy_(p.T)


def weights(model, requires_grad=False):
    """The model's parameters as a dict of detached copies (for functional references)."""
    return {k: p.detach().clone().requires_grad_(requires_grad)
            for k, p in model.named_parameters()}


def layer_params(graph, layer):
    """Names of layer `layer`'s parameters, relative to `layers.<layer>.`."""
    pre = f"layers.{layer}."
    return {p.attrs["name"][len(pre):] for p in graph.params if p.attrs["name"].startswith(pre)}



# -- shared by the training-program tests ---------------------------------------------------------
def loss_and_grads(graph, backend, ids, targets, *, seed=0, scale=1.0):
    """One training step's loss and parameter gradients of `graph` (loss appended) on
    `backend`: the loss multiplied by `scale` before backward and the gradients divided after
    (as the f16 trainer's loss scaling does). Returns (model, loss, {name: grad}) for the
    trainable parameters (a frozen one has none)."""
    import torch

    from lmc.runtime.module import LmcModel

    m = LmcModel(graph, seed=seed, backend=backend)
    torch.manual_seed(0)
    out = m(ids, targets=targets)
    (out["loss"] * scale).backward()
    return m, out["loss"].item(), {k: p.grad / scale for k, p in m.named_parameters()
                                   if p.requires_grad}

def triton_step_equals_torch(graph, ids, targets):
    """One training step of `graph` on the triton backend equals the torch backend's: the
    loss (rel 1e-5) and every parameter gradient. Returns (the triton model, its grads)."""
    import torch

    m, lt, gt = loss_and_grads(graph, "triton", ids, targets)
    _, lr, gr = loss_and_grads(graph, "torch", ids, targets)
    assert abs(lt - lr) <= 1e-5 * abs(lr), (lt, lr)
    for k in gr:
        torch.testing.assert_close(gt[k], gr[k], rtol=1e-4, atol=1e-6, msg=k)
    return m, gt


# -- shared by the decode tests -------------------------------------------------------------------
def unit_init(model, seed=0):
    """Re-draw a model's matrices at unit scale (embeddings N(0, 1), a [n, m] weight
    N(0, 1 / n)), in place, so attention scores are O(1): a small default init leaves them
    near 0, where the attention (RoPE, the mask) barely moves the logits and a test of it
    could not fail. Vectors (norm gains) are left as they are."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 1.0 if "embed" in name else p.shape[-2] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def assert_grads_close(model, ref, rel=1e-5):
    """Every parameter's gradient of `model` equals `ref`'s within rel of its own largest
    magnitude (an absolute floor that stays meaningful whatever the gradients' scale)."""
    import torch
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        assert p.grad is not None and q.grad is not None, name
        top = p.grad.abs().max().item()
        assert top > 0, name
        torch.testing.assert_close(q.grad, p.grad, rtol=rel, atol=rel * top, msg=name)


def assert_fused_model_matches(m, tri, ids, gen, decode_kind="decode_attention", count=2):
    """The triton model `tri` (fused kernels) against `m` (the primitives, same weights) on
    `ids`: forward within 1e-6 of the largest logit, every gradient under random upstream
    gradients (`assert_grads_close`), and the dynamic and the static decode steps, each with
    `count` fused `decode_kind` ops, prefill 4 then steps equal to the forward."""
    import torch

    from lmc.ir.ops import Op
    from lmc.runtime.decoder import Decoder
    want, got = m(ids), tri(ids)
    top = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * top)
    gy = torch.randn(want.shape, generator=gen)
    (want * gy).sum().backward()
    (got * gy).sum().backward()
    assert_grads_close(tri, m)
    with torch.no_grad():
        full = m(ids)
    for static in (False, True):
        dec = Decoder(tri.eval(), "triton", static=static, **({"max_len": 16} if static else {}))
        kinds = [n.attrs["kind"] for n in dec.graph.nodes if n.op is Op.FUSED]
        assert kinds.count(decode_kind) == count, kinds
        assert decode_worst(dec, ids, full, 4) < 1e-6 * top


def decode_worst(dec, ids, full, k, state=None):
    """Prefill k tokens, then one step per token: the worst logit difference to `full` (the
    full forward's logits), inf if any is NaN (lmc.verify's decode check)."""
    from lmc.verify import decode_diff
    return decode_diff(dec, ids, full, k, state)


def triton_matches_oracle(g, vals, rtol=1e-5, atol=2e-6):
    """Run graph `g` as the triton backend's program (Triton's interpreter on CPU) and as the
    oracle on `vals`; assert every output equal (dtype, shape, values); return the program."""
    import torch

    from lmc.ops.reference import RefCtx
    from lmc.runtime.executor import bind_dims, run_graph
    from lmc.runtime.triton_backend import TritonProgram

    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)
    p = TritonProgram(g)
    got = p.run(vals, ctx)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, equal_nan=True)
    return p


def minimax_variant(tmp_path, kind):
    """zoo/minimax.yaml with its partial-rotary keys written another way, as a file in
    tmp_path: "decoupled", the pass-through columns from a projection of their own (the
    keys are then two caches, scores in two parts); "reshaped", the pass-through slice
    reshaped there and back (two caches again, both cut from one product); "shared", the
    values [k_pass | k_pass] (the pass-through piece read by two concats)."""
    src = open(os.path.join(ZOO, "minimax.yaml")).read()
    split = "      - k_rot, k_pass = split(k, [rope_dim, head_dim - rope_dim], -1)\n"
    wv = "      wv: [d, kv_heads * head_dim]\n"
    assert split in src and wv in src
    if kind == "decoupled":
        src = src.replace(split, "      - k_rot = slice(k, -1, 0, rope_dim)\n"
                          "      - k_pass = permute(reshape(x @ wkp, [B, T, kv_heads, "
                          "head_dim - rope_dim]), [0, 2, 1, 3])\n")
        src = src.replace(wv, wv + "      wkp: [d, kv_heads * (head_dim - rope_dim)]\n")
    elif kind == "shared":
        kc = "      - k = concat([k_rot, k_pass], -1)\n"
        assert kc in src
        src = src.replace(kc, kc + "      - v = concat([k_pass, k_pass], -1)\n")
    else:
        assert kind == "reshaped", kind
        src = src.replace(split, split + "      - k_pass = reshape(reshape(k_pass, [B, "
                          "kv_heads, T, 2, (head_dim - rope_dim) / 2]), [B, kv_heads, T, "
                          "head_dim - rope_dim])\n")
    path = tmp_path / f"minimax_{kind}.yaml"
    path.write_text(src)
    return str(path)


# -- shared by the training tests ----------------------------------------------------------------
@pytest.fixture
def small_ids(tmp_path):
    """Pretokenized data (a uint32 .bin) with ids below the tiny presets' vocab (512)."""
    import numpy as np

    data = tmp_path / "ids.bin"
    np.random.default_rng(1).integers(0, 500, 8000).astype(np.uint32).tofile(data)
    return str(data)
