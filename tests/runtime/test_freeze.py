"""Frozen parameters: `trainable: false` in a model file and `LmcModel(freeze=...)` (lmc run
--train --freeze). A frozen parameter takes no gradient: the backward graph has no product
for it, and the other gradients are those of the model with nothing frozen."""
import os

import pytest
import torch
from conftest import ZOO

import lmc
from lmc.cli import main
from lmc.errors import LmcError
from lmc.ir.ops import Op
from lmc.passes import run_pipeline
from lmc.passes.loss import with_loss
from lmc.runtime.module import LmcModel

LLAMA = os.path.join(ZOO, "llama.yaml")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, targets=ids)["loss"].backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_and_embedding_take_no_gradient_and_leave_the_rest_unchanged(backend):
    g = run_pipeline(with_loss(lmc.load(LLAMA, preset="tiny").graph))
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    full = LmcModel(g, seed=1, backend=backend, grad_outputs=["loss"])
    part = LmcModel(g, seed=1, backend=backend, grad_outputs=["loss"],
                    freeze=["lm_head", "embed"])
    assert part.frozen == {"lm_head", "embed"}
    p = dict(part.named_parameters())
    assert not p["lm_head"].requires_grad and p["layers.0.attn.wq"].requires_grad
    want, got = _grads(full, ids), _grads(part, ids)
    assert got["lm_head"] is None and got["embed"] is None
    for name, v in want.items():
        if name not in part.frozen:
            torch.testing.assert_close(got[name], v, rtol=1e-5, atol=1e-7)
    # the head's weight gradient (x^T dlogits, a [d, vocab] product) is not computed
    mm = (lambda m: sum(n.op is Op.MATMUL for n in m.program().backward.nodes))
    assert mm(part) == mm(full) - 1


def test_trainable_false_in_the_file(tmp_path, capsys):
    src = open(LLAMA).read()
    assert "      weight: {shape: [d], init: ones}\n" in src
    f = tmp_path / "frozen_norms.yaml"
    f.write_text(src.replace("      weight: {shape: [d], init: ones}\n",
                             "      weight: {shape: [d], init: ones, trainable: false}\n"))
    m = LmcModel(run_pipeline(with_loss(lmc.load(str(f), preset="tiny").graph)), seed=0,
                 grad_outputs=["loss"])
    norms = {n for n in m._param_names if n.endswith("norm.weight")}
    assert norms and m.frozen == norms
    ids = torch.randint(0, 512, (1, 5))
    grads = _grads(m, ids)
    assert all(grads[n] is None for n in norms) and grads["lm_head"] is not None
    assert main(["compile", str(f), "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"{(2 * 2 + 1) * 64:,} of them frozen (trainable: false)" in out, out
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("      weight: {shape: [d], init: ones}\n",
                               "      weight: {shape: [d], init: ones, trainable: no_way}\n"))
    assert main(["compile", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "trainable must be true or false, got 'no_way'" in err and "bad.yaml:" in err


def test_a_pattern_matching_nothing_is_refused():
    g = lmc.load(LLAMA, preset="tiny").graph
    with pytest.raises(LmcError, match=r"--freeze layers\.\*\.mlp: no parameter matches"):
        LmcModel(g, freeze=["layers.*.mlp"])


def test_requires_grad_changed_after_construction_is_followed():
    """Unfreezing (or freezing) a parameter after the model is built rebuilds the backward
    graph for the new set; an unfrozen parameter silently got no gradient."""
    g = lmc.compile_model(LLAMA, "tiny").graph
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(0))
    m = LmcModel(g, freeze=["embed"])
    m(ids).square().mean().backward()
    assert m.embed.grad is None and m.lm_head.grad is not None
    m.embed.requires_grad_(True)
    m.lm_head.requires_grad_(False)
    m.lm_head.grad = None
    m(ids).square().mean().backward()
    ref = LmcModel(g, autodiff="torch")
    ref.load_state_dict(m.state_dict())
    ref(ids).square().mean().backward()
    assert m.lm_head.grad is None
    torch.testing.assert_close(m.embed.grad, ref.embed.grad, rtol=1e-5, atol=1e-7)
