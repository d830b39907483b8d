"""Decode of a mixed-precision program (the f16 program here: the interpreter has no bf16).

The mixed-precision pass writes the ops on autocast's fp32 list in fp32 (softmax over f16
scores, the cumsum of log-decays), with casts around them; the decode pass must still find
each sequence mixer's single-step form (retention and lightning: the d_k x d_v state, never a
per-token cache) and the decode fusions must still fire. The linear attentions' state is
fp32 in any precision. Logits from prefill + token-by-token decode equal the full forward's
to a few f16 roundings."""
import os

import pytest
import torch
from conftest import ZOO, decode_worst

import lmc
from lmc.passes.mixed_precision import mixed_precision
from lmc.runtime.decoder import Decoder
from lmc.runtime.module import LmcModel

MODELS = [("llama", {}), ("blues01", {}), ("minimax", {}), ("yoco", {}),
          ("yoco", {"sliding_window": 5}), ("optimus_prime", {}), ("medit_one", {}),
          # top-4 of 8 experts picked by f16 sigmoid scores + an fp32 selection bias
          ("../examples/deepseek_moe", {})]


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _state(dec, B):
    """A fresh state, a static decoder's caches filled with the dtype's max: a read of an
    unfilled slot would show."""
    st = dec.init_state(B)
    if dec.static:
        for s in dec.step.states:
            if s.kind == "cache":
                st[s.name].fill_(torch.finfo(st[s.name].dtype).max)
    return st


def _records(dec):
    return sorted((r["pass"], r["status"]) for r in dec.graph.meta.get("fusions", [])
                  if r["pass"].startswith(("fuse_decode", "fuse_moe")))


@pytest.mark.parametrize("name,sets", MODELS,
                         ids=[os.path.basename(n) + "".join(f"-{k}{v}" for k, v in o.items())
                              for n, o in MODELS])
def test_f16_decode_keeps_the_state_layout_and_equals_forward(name, sets):
    from lmc.verify import off_default

    m = lmc.load(os.path.join(ZOO, f"{name}.yaml"), preset="tiny", seed=2, backend="triton",
                 **sets)
    off_default(m, 2)          # biases, norm weights, a selection bias: off their inits
    ids = torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(4))
    m.eval()
    for backend, static in (("torch", False), ("triton", True)):
        # each backend's decode against its own forward (the triton kernels keep fused
        # intermediates in fp32 where torch rounds every op to f16)
        f16 = LmcModel(mixed_precision(m.graph, "f16"), backend=backend)
        f16.load_state_dict(m.state_dict())
        f16.eval()
        with torch.no_grad():
            out = f16(ids)                   # the logits, or every output (aux losses too)
            full = (out["logits"] if isinstance(out, dict) else out).float()
        dec = Decoder(f16, backend=backend, static=True, max_len=10) if static else \
            Decoder(f16, backend=backend)
        # the same state as the fp32 program's: kinds and shapes (no cache in place of a
        # linear attention's state or of a sliding window's ring, MLA's latent cache and
        # not the up-projected K and V),
        # the caches in f16 (a cast that the products read is cached after it), the
        # linear attentions' state in fp32
        ref = Decoder(m, backend="torch", static=True, max_len=10) if static else \
            Decoder(m, backend="torch")
        assert [(s.kind, s.shape) for s in dec.step.states] == \
            [(s.kind, s.shape) for s in ref.step.states]
        assert all(s.dtype.value == "f16" for s in dec.step.states if s.kind == "cache")
        assert all(s.dtype.value == "f32" for s in dec.step.states if s.kind == "state")
        if backend == "triton":
            want = Decoder(m, backend="triton", static=True, max_len=10)
            assert _records(dec) == _records(want)
        for k in (0, 1, 5):
            with torch.no_grad():
                err = decode_worst(dec, ids, full, k, _state(dec, ids.shape[0])) \
                    / full.abs().max().item()
            assert err < 2 * 2 ** -10, (backend, k, err)


@pytest.mark.parametrize("static", [False, True])
def test_a_chunk_of_no_tokens_is_no_step(static):
    """Decoding zero new tokens (an empty prompt's prefill) returns [B, 0, V] logits and the
    state as it was; it used to run the step, whose linear attention reshaped an empty slice
    of the decays (a RuntimeError)."""
    m = lmc.load(os.path.join(ZOO, "minimax.yaml"), preset="tiny", seed=2).eval()
    dec = Decoder(m, backend="torch", static=True, max_len=8) if static else \
        Decoder(m, backend="torch")
    st = dec.init_state(2)
    before = {k: v.clone() for k, v in st.items()}
    lg, st2 = dec(torch.zeros((2, 0), dtype=torch.long), st)
    assert tuple(lg.shape) == (2, 0, 512) and st2.past == 0
    assert all(torch.equal(st2[k], before[k]) for k in before)
