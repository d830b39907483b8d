"""zoo/minimax.yaml: the hybrid layer pattern on the compiled graph, parity with a hand-written
MiniMax (tests/reference_minimax.py), lightning's parallel form = its recurrence, lmc autodiff
= torch autograd, and the causal MoE capacity."""
import os

import pytest
import reference_minimax as ref
import torch
from conftest import ZOO, layer_params, weights

import lmc

MINIMAX = os.path.join(ZOO, "minimax.yaml")


def test_layer_7_is_softmax_attention_and_layer_6_lightning():
    c = lmc.compile_model(MINIMAX, "tiny", {"layers": 8, "attn_every": 8})
    g = c.graph
    for layer in range(8):
        names = layer_params(g, layer)
        softmax_layer = layer == 7
        assert ("attn.wq" in names) == softmax_layer, (layer, names)
        assert ("attn.wqkv" in names) == (not softmax_layer), (layer, names)
        assert {"moe.router", "moe.w1", "moe.w2", "moe.w3"} <= names
    six, seven = layer_params(g, 6), layer_params(g, 7)
    assert {"attn.wqkv", "attn.wg", "attn.wo", "attn.norm.weight"} <= six
    assert {"attn.wq", "attn.wk", "attn.wv", "attn.wo"} <= seven
    # GQA: K and V are kv_heads wide; the graph's mixers are what the params say
    wk = next(p for p in g.params if p.attrs["name"] == "layers.7.attn.wk")
    assert tuple(wk.type.shape) == (64, 2 * 16)

    def ops_in(scope):
        return {n.op.value for n in g.nodes if n.scope.startswith(scope)}
    assert "softmax" in ops_in("layers.7.attn") and "softmax" not in ops_in("layers.6.attn")
    assert "cumsum" in ops_in("layers.6.attn") and "cumsum" not in ops_in("layers.7.attn")


def test_default_size_parameter_count():
    c = lmc.compile_model(MINIMAX)
    assert c.graph.param_count() == 325_246_464  # the header's breakdown
    names = {p.attrs["name"] for p in c.graph.params}
    assert {"layers.7.attn.wq", "layers.15.attn.wq"} <= names
    assert sum(1 for n in names if n.endswith("attn.wqkv")) == 14


@pytest.mark.parametrize("overrides", [{}, {"xpos": 1}, {"layers": 1}],
                         ids=["tiny", "xpos", "one-layer"])
def test_forward_matches_handwritten_minimax(overrides):
    model = lmc.load(MINIMAX, preset="tiny", seed=3, **overrides).eval()
    cfg = model.config
    ids = torch.randint(0, cfg["vocab"], (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids)
        want = ref.forward(weights(model), ids, cfg)
    scale = want["logits"].abs().max().item()
    assert (got["logits"] - want["logits"]).abs().max().item() < 1e-5 * max(scale, 1.0)
    for k in ("load_balance", "z_loss"):
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), k
    for k in ("expert_tokens", "expert_dropped"):
        assert torch.equal(got[k], want[k]), k
    assert want["expert_dropped"].sum() > 0  # the capacity was exercised


def test_lightning_parallel_form_equals_the_recurrence():
    model = lmc.load(MINIMAX, preset="tiny", seed=5, layers=3, attn_every=8)
    cfg = model.config
    ids = torch.randint(0, cfg["vocab"], (2, 16), generator=torch.Generator().manual_seed(1))
    w = weights(model)
    with torch.no_grad():
        par = ref.forward(w, ids, cfg, lightning_mode="parallel")["logits"]
        rec = ref.forward(w, ids, cfg, lightning_mode="recurrent")["logits"]
        got = model.eval()(ids)["logits"]
    scale = rec.abs().max().item()
    assert (par - rec).abs().max().item() < 1e-5 * max(scale, 1.0)
    assert (got - rec).abs().max().item() < 1e-5 * max(scale, 1.0)


def test_lmc_gradients_equal_torch_autograd_on_the_reference():
    model = lmc.load(MINIMAX, preset="tiny", seed=7)  # autodiff="lmc": the IR backward graph
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg["vocab"], (2, 11), generator=gen)
    cot = torch.randn(2, 11, cfg["vocab"], generator=gen)

    def objective(out):
        return (out["logits"] * cot).sum() + 3.0 * out["load_balance"] + 2.0 * out["z_loss"]

    objective(model(ids)).backward()
    w = weights(model, requires_grad=True)
    objective(ref.forward(w, ids, cfg)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        want = w[name].grad
        # relative to the tensor's largest entry (fp32 sums of large terms: embed grads ~1e2)
        assert (p.grad - want).abs().max() <= 1e-5 * want.abs().max(), name
    assert model.get_parameter("layers.0.moe.router").grad.abs().max() > 0


# -- the MoE capacity: causal, prefix-stable, zero output when over capacity ---------------------
def _forced_router(model):
    """Every token prefers experts 0 and 1: a large shared embedding feature that only the
    router columns of experts 0 and 1 read, so the capacity binds from position 2 on."""
    with torch.no_grad():
        model.embed[:, 0] = 20.0
        for layer in range(model.config["layers"]):
            r = model.get_parameter(f"layers.{layer}.moe.router")
            r.zero_()
            r[0, 0], r[0, 1] = 5.0, 4.0


def test_capacity_is_causal_and_does_not_depend_on_the_length():
    model = lmc.load(MINIMAX, preset="tiny", seed=11).eval()
    vocab = model.config["vocab"]
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        assert full["expert_dropped"].sum() > 0  # the capacity is active here
        for t in (2, 7, 12):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % vocab
            out = model(changed)["logits"]
            assert torch.equal(out[:, : t + 1], full["logits"][:, : t + 1])
            assert not torch.equal(out[:, t + 1], full["logits"][:, t + 1])
            # a prefix alone gives the same logits: what decode will see, token by token
            prefix = model(ids[:, : t + 1])["logits"]
            assert (prefix - full["logits"][:, : t + 1]).abs().max().item() < 1e-5


def test_over_capacity_tokens_get_zero_expert_output():
    # one lightning layer whose output projection is zero: x = E[ids] + MoE(RMSNorm E[ids])
    model = lmc.load(MINIMAX, preset="tiny", seed=13, layers=1, attn_every=8).eval()
    _forced_router(model)
    with torch.no_grad():
        model.get_parameter("layers.0.attn.wo").zero_()
    cfg = model.config
    T = 10
    ids = torch.randint(0, cfg["vocab"], (1, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids)
        no_moe = ref.rmsnorm(model.embed[ids], model.get_parameter("norm.weight"),
                             cfg["eps"]) @ model.lm_head
    # experts 0 and 1 at every position; position t keeps them while t + 1 <= ceil(0.6 (t + 1))
    kept = [t for t in range(T) if t + 1 <= -(-3 * (t + 1) // 5)]
    assert kept == [0, 1]
    assert out["expert_tokens"].tolist() == [[2, 2, 0, 0]]
    assert out["expert_dropped"].tolist() == [[T - 2, T - 2, 0, 0]]
    for t in range(T):
        same = torch.equal(out["logits"][0, t], no_moe[0, t])
        assert same == (t not in kept), t  # dropped by both experts: the residual alone
