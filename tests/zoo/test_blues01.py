"""zoo/blues01.yaml: MoE on odd layers and dense GeGLU on even ones (on the compiled graph), the
tied head, parity with a hand-written blues01 (tests/reference_blues01.py) in eval and in
training (router noise), lmc autodiff = torch autograd."""
import os

import pytest
import reference_blues01 as ref
import torch
from conftest import ZOO, layer_params, weights

import lmc
from lmc.ir.ops import Op

BLUES = os.path.join(ZOO, "blues01.yaml")


def test_layer_1_is_moe_and_layer_0_dense():
    g = lmc.compile_model(BLUES, "tiny", {"layers": 4}).graph
    for layer in range(4):
        names = layer_params(g, layer)
        moe = layer % 2 == 1
        assert ("moe.router" in names) == moe, (layer, names)
        assert ("ffn.wg" in names) == (not moe), (layer, names)
        assert {"attn.wqkv", "attn.wo", "attn_pre.weight", "attn_post.weight",
                "ffn_pre.weight", "ffn_post.weight"} <= names
    experts = next(p for p in g.params if p.attrs["name"] == "layers.1.moe.w1")
    assert tuple(experts.type.shape) == (4, 64, 64)  # [experts, d, expert_ffn], stacked

    def ops_in(scope):
        return {n.op for n in g.nodes if n.scope.startswith(scope)}
    assert Op.TOPK in ops_in("layers.1.") and Op.TOPK not in ops_in("layers.0.")
    assert Op.GAUSSIAN_NOISE in ops_in("layers.1.moe")


def test_default_size_tied_head_and_mqa_shapes():
    g = lmc.compile_model(BLUES).graph
    assert g.param_count() == 554_803_968  # the header's breakdown
    names = {p.attrs["name"] for p in g.params}
    assert "lm_head" not in names  # tied: the head is embed^T
    head = g.outputs["logits"]
    assert head.op is Op.MATMUL and head.inputs[1].op is Op.PERMUTE
    assert head.inputs[1].inputs[0].attrs["name"] == "embed"
    wqkv = next(p for p in g.params if p.attrs["name"] == "layers.0.attn.wqkv")
    assert tuple(wqkv.type.shape) == (768, (12 + 2 * 4) * 64)  # H query + n_kv K and V heads
    assert sum(1 for n in names if n.endswith("moe.router")) == 6


@pytest.mark.parametrize("overrides", [{}, {"kv_heads": 1, "layers": 4}],
                         ids=["gqa", "mqa-4-layers"])
def test_eval_forward_matches_handwritten_blues01(overrides):
    model = lmc.load(BLUES, preset="tiny", seed=3, **overrides).eval()
    cfg = model.config
    ids = torch.randint(0, cfg["vocab"], (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids)
        want = ref.forward(weights(model), ids, cfg)
    scale = want["logits"].abs().max().item()
    assert (got["logits"] - want["logits"]).abs().max().item() < 1e-5 * max(scale, 1.0)
    assert torch.allclose(got["load_balance"], want["load_balance"], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["expert_tokens"], want["expert_tokens"])


def test_router_noise_only_in_training():
    model = lmc.load(BLUES, preset="tiny", seed=4)
    cfg = model.config
    ids = torch.randint(0, cfg["vocab"], (2, 16), generator=torch.Generator().manual_seed(1))
    w = weights(model)
    with torch.no_grad():
        train = model.train()(ids)
        train_again = model(ids)
        evald = model.eval()(ids)
        want_train = ref.forward(w, ids, cfg, training=True)
        want_eval = ref.forward(w, ids, cfg, training=False)
    assert torch.equal(train["logits"], train_again["logits"])  # the draw is fixed by the seed
    assert not torch.equal(train["expert_tokens"], evald["expert_tokens"])  # noise rerouted
    for got, want in ((train, want_train), (evald, want_eval)):
        scale = want["logits"].abs().max().item()
        assert (got["logits"] - want["logits"]).abs().max().item() < 1e-5 * max(scale, 1.0)
        assert torch.equal(got["expert_tokens"], want["expert_tokens"])


def test_lmc_gradients_equal_torch_autograd_on_the_reference():
    model = lmc.load(BLUES, preset="tiny", seed=7).train()  # noisy router, lmc autodiff
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg["vocab"], (2, 11), generator=gen)
    cot = torch.randn(2, 11, cfg["vocab"], generator=gen)

    def objective(out):
        return (out["logits"] * cot).sum() + 5.0 * out["load_balance"]

    objective(model(ids)).backward()
    w = weights(model, requires_grad=True)
    objective(ref.forward(w, ids, cfg, training=True)).backward()
    for name, p in model.named_parameters():
        want = w[name].grad
        assert p.grad is not None, name
        # relative to the tensor's largest entry (fp32 sums of large terms)
        assert (p.grad - want).abs().max() <= 1e-5 * want.abs().max(), name
    assert model.get_parameter("layers.1.moe.router").grad.abs().max() > 0
