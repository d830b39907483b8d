"""zoo/llama.yaml through lmc equals a hand-written PyTorch Llama with the same weights."""
import os

import pytest
import torch
from conftest import ZOO, copy_weights
from reference_llama import Llama

import lmc

LLAMA = os.path.join(ZOO, "llama.yaml")


def _pair(**overrides):
    model = lmc.load(LLAMA, seed=1, **overrides)
    ref = Llama.from_config(model.config)
    copy_weights(model, ref)
    return model, ref


@pytest.mark.parametrize("B,T", [(1, 1), (2, 17), (3, 63)])
def test_forward_matches_handwritten_llama(B, T):
    torch.manual_seed(0)
    model, ref = _pair(vocab=97, d=64, layers=2, heads=4, ffn=96, max_seq=64)
    ids = torch.randint(0, 97, (B, T))
    with torch.no_grad():
        got, want = model(ids), ref(ids)
    assert got.shape == (B, T, 97)
    assert (got - want).abs().max().item() < 1e-5


def test_one_compile_serves_every_shape():
    """B and T are symbolic: the same graph runs at several sizes without recompiling."""
    model, ref = _pair(vocab=64, d=32, layers=1, heads=2, ffn=48, max_seq=40)
    graph = model.graph
    for B, T in [(1, 5), (4, 40), (2, 11)]:
        ids = torch.randint(0, 64, (B, T))
        with torch.no_grad():
            assert (model(ids) - ref(ids)).abs().max().item() < 1e-5
    assert model.graph is graph


def test_gradients_flow_to_every_parameter():
    model, ref = _pair(vocab=50, d=32, layers=2, heads=2, ffn=40, max_seq=16)
    ids = torch.randint(0, 50, (2, 9))
    g = torch.randn(2, 9, 50)
    (model(ids) * g).sum().backward()
    (ref(ids) * g).sum().backward()
    for name, p in model.named_parameters():
        r = ref.embed.weight if name == "embed" else ref.get_parameter(
            name if p.dim() == 1 else name + ".weight")
        rg = r.grad if p.dim() == 1 or name == "embed" else r.grad.T
        assert p.grad is not None, name
        assert torch.allclose(p.grad, rg, rtol=1e-4, atol=1e-6), name


def test_sequence_longer_than_max_seq_is_refused():
    model = lmc.load(LLAMA, preset="tiny")
    with pytest.raises(lmc.LmcError, match="max_seq"):
        model(torch.zeros(1, model.config["max_seq"] + 1, dtype=torch.long))


def test_state_dict_names_and_param_count():
    model = lmc.load(LLAMA, preset="tiny")
    keys = list(model.state_dict())
    assert "layers.1.attn.wq" in keys and "layers.0.ffn_norm.weight" in keys
    assert model.num_params() == model.compiled.summary()["params"]
