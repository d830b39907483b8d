"""zoo/yoco.yaml: the cross-decoder shares one K,V; parity, gradients and both switches
(sliding window, BitNet b1.58) against the hand-written reference in tests/reference_yoco.py."""
import os

import pytest
import torch
from conftest import ZOO, copy_weights
from reference_llama import rope_cos_sin
from reference_yoco import YOCO, retention_parallel, retention_recurrent

import lmc
from lmc.ir.ops import Op

PATH = os.path.join(ZOO, "yoco.yaml")
CROSS_LAYER_PARAMS = {"mixer_norm.weight", "mixer.wq", "mixer.wo", "ffn_norm.weight",
                      "ffn.w1", "ffn.w2", "ffn.w3"}


def _pair(seed=1, **overrides):
    """The lmc model on the tiny preset (plus overrides) and the reference with its weights."""
    model = lmc.load(PATH, preset="tiny", seed=seed, **overrides)
    ref = YOCO.from_config(model.config)
    copy_weights(model, ref)
    return model, ref


def _ref_param(ref, name, p):
    if name == "embed":
        return ref.embed.weight, False
    if p.dim() == 1:
        return ref.get_parameter(name), False
    return ref.get_parameter(name + ".weight"), True


def _cross_layer_params(names, layers):
    by_layer = {}
    for n in names:
        if n.startswith("cross_layers."):
            _, i, rest = n.split(".", 2)
            by_layer.setdefault(int(i), set()).add(rest)
    assert sorted(by_layer) == list(range(layers // 2))
    return by_layer


# -- the distinguishing fact: one K,V for the whole cross-decoder ------------------------------
@pytest.mark.parametrize("preset,overrides", [("tiny", {"layers": 6}), (None, {})],
                         ids=["tiny-6-layers", "default"])
def test_cross_layers_share_one_global_kv(preset, overrides):
    c = lmc.compile_model(PATH, preset, overrides)
    cfg, graph = c.graph.meta["config"], c.graph
    params = {p.attrs["name"]: tuple(p.type.shape) for p in graph.params}
    kv_width = cfg["kv_heads"] * cfg["head_dim"]
    # every cross layer holds a query and an output projection, an FFN and norms: no K, no V
    for i, names in _cross_layer_params(params, cfg["layers"]).items():
        assert names == CROSS_LAYER_PARAMS, i
    # exactly one WK and one WV outside the self-decoder: the global pair, n_kv heads wide
    kv = {n: s for n, s in params.items()
          if n.rsplit(".", 1)[-1] in ("wk", "wv") and not n.startswith("self_layers.")}
    assert kv == {"cross_kv.wk": (cfg["d"], kv_width), "cross_kv.wv": (cfg["d"], kv_width)}
    # ... each applied once (one matmul), and that one K feeds the attention of every cross layer
    users = graph.users()
    wk = next(p for p in graph.params if p.attrs["name"] == "cross_kv.wk")
    (k_proj,) = [u for u in users[wk] if u.op is Op.MATMUL]
    reached, stack = set(), [k_proj]
    while stack:
        n = stack.pop()
        for u in users.get(n, ()):
            if u not in reached:
                reached.add(u)
                stack.append(u)
    softmax_layers = {n.scope.split(".")[1] for n in reached
                      if n.op is Op.SOFTMAX and n.scope.startswith("cross_layers.")}
    assert softmax_layers == {str(i) for i in range(cfg["layers"] // 2)}
    wv = next(p for p in graph.params if p.attrs["name"] == "cross_kv.wv")
    assert len([u for u in users[wv] if u.op is Op.MATMUL]) == 1


def test_default_size_parameter_count():
    c = lmc.compile_model(PATH)
    cfg = c.graph.meta["config"]
    assert (cfg["d"], cfg["ffn"], cfg["layers"], cfg["ret_heads"], cfg["heads"]) == \
        (1024, 3072, 24, 4, 8)
    assert c.summary()["params"] == 522_160_128     # the header's breakdown


# -- parity with the reference ---------------------------------------------------------------
@pytest.mark.parametrize("B,T", [(1, 1), (2, 13)])
@pytest.mark.parametrize("overrides", [{}, {"kv_heads": 1}, {"kv_heads": 4, "layers": 4},
                                       {"sliding_window": 3}],
                         ids=["gqa", "mqa", "mha-4-layers", "window"])
def test_forward_matches_reference(B, T, overrides):
    torch.manual_seed(0)
    model, ref = _pair(**overrides)
    ids = torch.randint(0, 512, (B, T))
    with torch.no_grad():
        got, want = model(ids), ref(ids)
    assert got.shape == (B, T, 512)
    assert (got - want).abs().max().item() < 1e-5


def test_retention_parallel_form_equals_recurrent_form():
    """The reference's parallel form (what the YAML writes) equals the recurrence decode uses,
    on its own and through the whole model."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 5)
    ld = torch.nn.functional.logsigmoid(torch.randn(2, 3, 11) * 3)   # strong and weak decays
    assert torch.allclose(retention_parallel(q, k, v, ld), retention_recurrent(q, k, v, ld),
                          atol=1e-5)
    model, _ = _pair()
    rec = YOCO.from_config(model.config, recurrent=True)
    _, ref = _pair()
    rec.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert (model(ids) - rec(ids)).abs().max().item() < 1e-5


def _check_grads(model, ref, ids):
    g = torch.randn(*ids.shape, model.config["vocab"])
    (model(ids) * g).sum().backward()
    (ref(ids) * g).sum().backward()
    for name, p in model.named_parameters():
        r, transposed = _ref_param(ref, name, p)
        assert p.grad is not None, name
        rg = r.grad.T if transposed else r.grad
        assert torch.allclose(p.grad, rg, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4}], ids=["retention", "window"])
def test_lmc_gradients_match_torch_autograd(overrides):
    torch.manual_seed(0)
    model, ref = _pair(**overrides)
    assert model.autodiff == "lmc"
    _check_grads(model, ref, torch.randint(0, 512, (2, 9)))


# -- the switches ----------------------------------------------------------------------------
def _assert_causal(model):
    vocab = model.config["vocab"]
    ids = torch.randint(0, vocab, (2, 12))
    with torch.no_grad():
        base = model(ids)
        for t in (0, 5, 10):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % vocab
            out = model(changed)
            assert torch.equal(out[:, : t + 1], base[:, : t + 1])
            assert not torch.equal(out[:, t + 1], base[:, t + 1])


def test_window_switch_builds_and_is_causal():
    model = lmc.load(PATH, preset="tiny", sliding_window=4, seed=0)
    names = {n for n, _ in model.named_parameters()}
    assert {"self_layers.0.mixer.wq", "self_layers.0.mixer.wo"} <= names
    assert not any(n.endswith((".wg", ".wgamma")) for n in names)  # no retention gates
    assert model.graph.op_counts().get("cumsum", 0) == 0           # and no decays
    _assert_causal(model)


def test_reference_window_band_and_lmc_mask():
    """The reference's band is W tokens wide (t-W+1 .. t), and lmc's self-decoder softmax
    reads a causal mask of window W."""
    _, ref = _pair(sliding_window=3)
    h = (ref.embed(torch.randint(0, 512, (1, 10))) * ref.d ** 0.5).requires_grad_(True)
    cos, sin = rope_cos_sin(10, ref.ret_head_dim, ref.rope_base)
    (grad,) = torch.autograd.grad(ref.self_layers[0](h, cos, sin)[0, 7].sum(), h)
    assert (grad[0].abs().sum(-1) > 0).tolist() == [False] * 5 + [True] * 3 + [False] * 2
    graph = lmc.compile_model(PATH, "tiny", {"sliding_window": 3}).graph
    windows = sorted(n.attrs["window"] for n in graph.nodes if n.op is Op.CAUSAL_MASK)
    assert windows == [0, 3]          # the cross-decoder's full mask, the self-decoder's band


def test_bitnet_switch_builds_and_is_causal():
    model = lmc.load(PATH, preset="tiny", bitnet=True, seed=0)
    assert model.graph.op_counts().get("round", 0) > 0
    _assert_causal(model)
    _assert_causal(lmc.load(PATH, preset="tiny", bitnet=True, sliding_window=4, seed=0))


def test_bitnet_matches_reference_and_quantises():
    torch.manual_seed(0)
    model, ref = _pair(bitnet=True)
    full, _ = _pair()                           # same weights, full precision
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        got, want, fp = model(ids), ref(ids), full(ids)
    assert (got - want).abs().max().item() < 1e-4
    assert not torch.allclose(got, fp, rtol=1e-3, atol=1e-3)   # the switch changes the logits


def test_bitnet_gradients_flow_through_the_ste_to_latent_weights():
    torch.manual_seed(0)
    model, ref = _pair(bitnet=True)
    _check_grads(model, ref, torch.randint(0, 512, (2, 9)))
    for name, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, name
