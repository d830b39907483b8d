"""zoo/optimus_prime.yaml: multi-head latent attention with ONE shared rotary key.

The distinguishing fact (issue 5): k_R is one d_R-wide projection of h (W_KR is [d, d_R], not
one per head), computed once per layer, and every head's score uses it. Checked on the
compiled graph and its parameters; then parity with a hand-written PyTorch MLA
(tests/reference_optimus_prime.py), its absorbed decode form, and gradients.
"""
import os

import pytest
import torch
from conftest import ZOO, copy_weights
from reference_optimus_prime import OptimusPrime

import lmc
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.runtime.executor import run_graph

PATH = os.path.join(ZOO, "optimus_prime.yaml")


def _pair(seed=1, **overrides):
    model = lmc.load(PATH, preset="tiny", seed=seed, **overrides)
    ref = OptimusPrime(model.config)
    copy_weights(model, ref)
    return model, ref


def _score_matmul(graph, layer):
    """The [B, H, T, T] score matmul of a layer, found by its shape and place in the graph."""
    found = [n for n in graph.nodes if n.op is Op.MATMUL and n.scope == f"layers.{layer}.attn"
             and n.type.rank == 4 and n.type.shape[-1] == n.type.shape[-2]]
    assert len(found) == 1
    return found[0]


def _ancestors(node):
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.inputs)
    return seen


def test_rotary_key_is_one_shared_projection():
    model = lmc.load(PATH, preset="tiny")
    cfg, g = model.config, model.graph
    d, H, d_h, d_r = cfg["d"], cfg["heads"], cfg["head_dim"], cfg["rope_dim"]
    assert H > 1 and d_r != d_h
    params = {p.attrs["name"]: p for p in g.params}
    users = g.users()
    for i in range(cfg["layers"]):
        w_kr = params[f"layers.{i}.attn.w_kr"]
        assert [int(s) for s in w_kr.type.shape] == [d, d_r]  # not [d, H * d_r]
        # W_KR is applied once per layer, and its result reaches the scores as a single
        # [B, 1, T, d_R] tensor expanded over the heads: the rotary half of every head's key
        (proj,) = users[w_kr]
        assert proj.op is Op.MATMUL
        score = _score_matmul(g, i)
        k = score.inputs[1].inputs[0]
        assert k.op is Op.CONCAT and [int(s) for s in k.type.shape[1:2]] == [H]
        k_c, k_r = k.inputs
        assert [int(s) for s in k_r.type.shape[-1:]] == [d_r]
        assert k_r.op is Op.EXPAND and [int(s) for s in k_r.inputs[0].type.shape[1:2]] == [1]
        assert proj in _ancestors(k_r) and proj not in _ancestors(k_c)
        # of the layer's attention weights, the rotary key depends on W_KR alone (k_R comes
        # from h, not from the latent c_KV)
        mine = {n.attrs["name"] for n in _ancestors(k_r) if n.op is Op.PARAM
                and n.attrs["name"].startswith(f"layers.{i}.attn.")}
        assert mine == {f"layers.{i}.attn.w_kr"}


def test_every_head_scores_against_the_same_rotary_key():
    """Evaluated on the compiled graph: the d_R rotary columns of the key entering the score
    matmul are identical across heads, and changing W_KR changes every head's scores."""
    model = lmc.load(PATH, preset="tiny", seed=3).eval()
    g, cfg = model.graph, model.config
    score = _score_matmul(g, 0)
    k = score.inputs[1].inputs[0]
    probe = g.with_nodes(g.nodes, {"k": k, "scores": score})
    ids = torch.randint(0, cfg["vocab"], (2, 9))

    def run(overrides=None):
        bound = dict(model.named_parameters())
        bound.update(overrides or {})
        bound["ids"] = ids
        ctx = RefCtx(dims={"B": 2, "T": 9}, device=torch.device("cpu"), training=False)
        with torch.no_grad():
            return run_graph(probe, bound, ctx)

    base = run()
    k_rot = base["k"][..., cfg["head_dim"]:]
    for h in range(1, cfg["heads"]):
        assert torch.equal(k_rot[:, h], k_rot[:, 0])
    w_kr = model.get_parameter("layers.0.attn.w_kr")
    moved = run({"layers.0.attn.w_kr": w_kr + 0.5 * torch.randn_like(w_kr)})
    delta = (moved["scores"] - base["scores"]).abs().flatten(3).amax(-1)  # [B, H, T]
    assert (delta[:, :, 1:] > 1e-4).all()  # every head, every position past the first


@pytest.mark.parametrize("B,T", [(1, 1), (2, 9), (3, 16)])
def test_forward_matches_reference(B, T):
    torch.manual_seed(0)
    model, ref = _pair()
    model.eval(), ref.eval()
    ids = torch.randint(0, model.config["vocab"], (B, T))
    with torch.no_grad():
        got, want = model(ids), ref(ids)
    assert got.shape == (B, T, model.config["vocab"])
    assert (got - want).abs().max().item() < 1e-5


def test_training_mode_dropout_matches_reference():
    model, ref = _pair()
    assert model.config["p_drop"] > 0
    model.train(), ref.train()
    ids = torch.randint(0, model.config["vocab"], (2, 11))
    with torch.no_grad():
        got, want = model(ids), ref(ids)
        evaluated = model.eval()(ids)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - evaluated).abs().max().item() > 1e-3  # dropout acted in training only


def test_absorbed_latent_cache_form_equals_the_graph():
    """The decode form (cache [c_KV ‖ k_R], W_UK into the query, W_UV into W_O) computes
    what the compiled graph computes."""
    model, ref = _pair(seed=4)
    model.eval(), ref.eval()
    ids = torch.randint(0, model.config["vocab"], (2, 13))
    with torch.no_grad():
        got, absorbed = model(ids), ref(ids, absorbed=True)
    assert (got - absorbed).abs().max().item() < 1e-4


def test_gradients_match_torch_autograd_on_reference():
    model, ref = _pair(seed=2)
    model.train(), ref.train()  # dropout on: its mask must be the same in both directions
    assert model.autodiff == "lmc"
    ids = torch.randint(0, model.config["vocab"], (2, 10))
    g = torch.randn(2, 10, model.config["vocab"])
    (model(ids) * g).sum().backward()
    (ref(ids) * g).sum().backward()
    for name, p in model.named_parameters():
        r = ref.embed.weight if name == "embed" else ref.get_parameter(
            name if p.dim() == 1 else name + ".weight")
        rg = r.grad if p.dim() == 1 or name == "embed" else r.grad.T
        assert p.grad is not None, name
        # fp32 sums over B*T*vocab terms: the error is measured against the gradient's scale
        err = (p.grad - rg).abs().max() / rg.abs().max()
        assert err < 1e-5, (name, err.item())


def test_triton_training_step_with_dropout_in_its_kernels_equals_the_torch_backend():
    """On the triton backend every dropout (forward and the backward's dropout of the
    cotangent) runs inside a generated pointwise kernel, drawing the torch backend's masks:
    the same loss and gradients at a draw counter other than 0."""
    from lmc.passes import run_pipeline
    from lmc.passes.loss import with_loss
    from lmc.runtime.module import LmcModel

    g = run_pipeline(with_loss(lmc.load(PATH, preset="tiny").graph))
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    got = []
    for backend in ("triton", "torch"):
        m = LmcModel(g, backend=backend, seed=1, grad_outputs=["loss"]).train()
        m.rng_step = 3
        loss = m(ids, targets=ids)["loss"]
        loss.backward()
        got.append((loss.item(), {k: p.grad for k, p in m.named_parameters()}))
        if backend == "triton":
            prog = m.program()
            assert not any(n.op is Op.DROPOUT for p in (prog.forward_exec, prog.backward_exec)
                           for n in p.graph.nodes)
    m.eval()
    with torch.no_grad():
        assert abs(m(ids, targets=ids)["loss"].item() - got[1][0]) > 1e-3   # dropout acted
    assert abs(got[0][0] - got[1][0]) < 1e-5
    for k in got[0][1]:
        torch.testing.assert_close(got[0][1][k], got[1][1][k], rtol=1e-4, atol=1e-6)
