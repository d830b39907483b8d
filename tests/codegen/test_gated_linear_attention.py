"""Gated linear attention's chunked kernels (lmc/codegen/gated_linear_attention.py, Triton's
interpreter) against the fp64 parallel form: forward and every gradient (q, k, v and the
per-channel log-decays) on ragged shapes (T = 1, a prime, chunk +- 1, several chunks),
strided inputs, fp16, and decays strong enough that a factored exp(G) exp(-G) would
overflow; and the fuse_linear_attention pass on a model written in primitives."""
import os

import pytest
import torch
import torch.nn.functional as F

from lmc.codegen import gated_linear_attention as G

TOL = 1e-5          # fp32, relative to the largest reference value (as the scalar kernels)


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _inputs(B, H, T, DK, DV, seed, strength=1.0, strided=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    if strided:       # [B, T, H, d] activations seen as [B, H, T, d], as a model's permute
        q, k, g = (r(B, T, H, DK).transpose(1, 2) for _ in range(3))
        v = r(B, T, H, DV).transpose(1, 2)
    else:
        q, k, g, v = r(B, H, T, DK), r(B, H, T, DK), r(B, H, T, DK), r(B, H, T, DV)
    g = F.logsigmoid(2 * g + 1) * strength       # log decays <= 0
    return q, k * DK ** -0.5, v, g


def _errors(B, H, T, DK, DV, *, seed=0, strength=1.0, strided=False, dtype=torch.float32):
    q, k, v, g = _inputs(B, H, T, DK, DV, seed, strength, strided)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    ref = G.gla_reference(*leaves)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64)
    want = torch.autograd.grad(ref, leaves, do)
    low = [x.to(dtype) for x in (q, k, v)] + [g.float()]
    out = G.gla_forward(*low)
    got = G.gla_backward(do.to(dtype), *low)
    assert out.dtype == dtype and all(x.dtype == dtype for x in got[:3])
    assert got[3].dtype == torch.float32

    def rel(a, b, floor=0.0):
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(max(floor, 1e-30))).item()
    errs = {"o": rel(out, ref)}
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        errs[name] = rel(a, b)
    # dg cancels exactly at T = 1 (o does not depend on g there): measured against q * dq
    errs["dg"] = rel(got[3], want[3], (q * want[0]).abs().max().item())
    return errs


@pytest.mark.parametrize("shape", [(2, 2, 37, 8, 16), (1, 2, 16, 16, 16), (1, 2, 17, 16, 8),
                                   (1, 1, 15, 8, 8), (1, 1, 1, 8, 8), (1, 2, 63, 32, 24),
                                   (1, 1, 33, 16, 130)],    # d_v in three blocks of 64
                         ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_fp32(shape):
    errs = _errors(*shape, seed=sum(shape))
    assert max(errs.values()) < TOL, errs


def test_strided_inputs():
    errs = _errors(2, 3, 40, 16, 16, seed=3, strided=True)
    assert max(errs.values()) < TOL, errs


def test_strong_decays_do_not_overflow():
    """Log decays near -20 a step (G falls below -6000 by T = 300): every exponent the kernels
    take is a decay within a chunk (<= 0); the factored form exp(G_t) exp(-G_s) would be
    inf * 0 here."""
    errs = _errors(1, 2, 300, 8, 8, seed=5, strength=20.0)
    assert max(errs.values()) < TOL, errs


def test_fp16():
    errs = _errors(1, 2, 45, 16, 16, seed=7, dtype=torch.float16)
    assert max(errs.values()) < 2e-3, errs      # measured 8.5e-4 (dv): fp16 rounding


def _recurrence(q, k, v, g, s0):
    """S = diag(exp(g_t)) S + k_t^T v_t, o_t = q_t S token by token from s0 (fp64):
    (o [B, H, T, d_v], the final S)."""
    S, out = s0.clone(), []
    for t in range(q.shape[2]):
        S = torch.exp(g[:, :, t, :, None]) * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append((q[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(out, 2), S


@pytest.mark.parametrize("T,DV", [(1, 16), (3, 130)])
def test_the_decode_step_continues_a_state(T, DV):
    """gla_step: T new tokens from a random state (d_v over blocks), against the recurrence
    S = diag(exp(g_t)) S + k_t^T v_t, o_t = q_t S in fp64; the new state written as given."""
    B, H, DK = 2, 2, 16
    q, k, v, g = _inputs(B, H, T, DK, DV, seed=T)
    s0 = torch.randn(B, H, DK, DV, generator=torch.Generator().manual_seed(9),
                     dtype=torch.float64)
    want, S = _recurrence(q, k, v, g, s0)
    out = torch.empty(B, H, T, DV)
    new = torch.empty(B, H, DK, DV)
    G.gla_step(*(x.float() for x in (q, k, v, g, s0)), out, new)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.double(), S, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [17, 40, 64])
def test_a_long_prefill_continues_a_state_through_the_chunked_kernels(T):
    """The decode op over more than RECURRENT_MAX new tokens runs gla_forward from the state
    (the states kernel starting from it, storing the state after the last chunk): output and
    new state equal the recurrence in fp64, and the recurrent kernel's, with T a multiple of
    the chunk and not."""
    from lmc.codegen import decode_linear_attention as D

    B, H, DK, DV = 1, 2, 16, 80
    q, k, v, g = _inputs(B, H, T, DK, DV, seed=T + 1)
    s0 = torch.randn(B, H, DK, DV, generator=torch.Generator().manual_seed(3),
                     dtype=torch.float64)
    want, S = _recurrence(q, k, v, g, s0)
    assert T > D.RECURRENT_MAX
    out, new = torch.empty(B, H, T, DV), torch.empty(B, H, DK, DV)
    D.launch_template("decode_gated_linear_attention",
                      [x.float() for x in (q, k, v, g, s0)], [out, new], {})
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.double(), S, rtol=1e-5, atol=1e-5)
    out2, new2 = torch.empty_like(out), torch.empty_like(new)
    G.gla_step(*(x.float() for x in (q, k, v, g, s0)), out2, new2)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)


def test_key_head_dims_above_128_are_refused():
    x = torch.zeros(1, 1, 4, 136)
    with pytest.raises(ValueError, match="up to 128"):
        G.gla_forward(x, x, x[..., :8], x)


GLA = os.path.join(os.path.dirname(__file__), "..", "passes", "test_decode.py")


def test_the_pass_fuses_a_model_written_in_primitives(tmp_path):
    """The GLA model of tests/passes/test_decode.py (its head dims 8 and 16): lmc verify's
    triton = oracle runs forward and every gradient through the fused kernels
    (tests/test_examples.py checks the ops the pass makes, on examples/gla.yaml)."""
    import sys
    sys.path.insert(0, os.path.dirname(GLA))
    from test_decode import GLA_YAML

    from lmc.verify import format_rows, verify
    p = tmp_path / "gla.yaml"
    p.write_text(GLA_YAML)
    rows = verify(str(p), skip=["passes", "causal", "decode"])
    assert all(r.ok for r in rows), format_rows(rows)
    assert "launches" in next(r.detail for r in rows if r.check == "triton = oracle")
