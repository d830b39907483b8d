"""The training loss head (lmc.passes.loss): cross-entropy, and auxiliary losses declared under
model.aux_losses that the optimised loss adds with their coefficients."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import ZOO

import lmc
from lmc.cli import main
from lmc.passes import run_pipeline
from lmc.passes.loss import with_loss
from lmc.runtime.module import LmcModel

MINIMAX = os.path.join(ZOO, "minimax.yaml")
LLAMA = os.path.join(ZOO, "llama.yaml")


def _trainable(path, seed=0, autodiff="lmc", **overrides):
    g = run_pipeline(with_loss(lmc.compile_model(path, "tiny", overrides).graph))
    return g, LmcModel(g, seed=seed, autodiff=autodiff)


def _batch(vocab, B=2, T=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    targets = torch.randint(0, vocab, (B, T), generator=gen)
    targets[0, -3:] = -1  # ignored positions
    return ids, targets


def test_loss_is_ce_plus_weighted_aux_losses():
    g, model = _trainable(MINIMAX, lb_coef=0.5, z_coef=0.25)
    assert g.meta["aux_losses"] == {"load_balance": 0.5, "z_loss": 0.25}
    assert {"loss", "ce_loss", "load_balance", "z_loss", "logits"} <= set(g.outputs)
    ids, targets = _batch(model.config["vocab"])
    with torch.no_grad():
        out = model(ids, targets=targets)
    ce = F.cross_entropy(out["logits"].reshape(-1, out["logits"].shape[-1]),
                         targets.reshape(-1), ignore_index=-1)
    assert torch.allclose(out["ce_loss"], ce, rtol=1e-6, atol=1e-6)
    want = ce + 0.5 * out["load_balance"] + 0.25 * out["z_loss"]
    assert torch.allclose(out["loss"], want, rtol=1e-6, atol=1e-6)
    # the aux terms are not negligible here, so the check above can tell them apart
    assert 0.5 * out["load_balance"].item() > 0.1 and 0.25 * out["z_loss"].item() > 0.1


def test_load_balance_loss_has_a_gradient_on_the_router_and_is_in_the_loss_gradient():
    g, model = _trainable(MINIMAX, lb_coef=0.5, z_coef=0.0)
    ids, targets = _batch(model.config["vocab"])

    def router_grads(name):
        model.zero_grad(set_to_none=True)
        model(ids, targets=targets)[name].backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()
                if k.endswith("moe.router")}

    lb = router_grads("load_balance")
    assert len(lb) == model.config["layers"]
    for k, v in lb.items():
        assert v.abs().max().item() > 1e-6, f"no load-balance gradient on {k}"
    full, ce = router_grads("loss"), router_grads("ce_loss")
    for k in lb:
        # d loss = d ce + 0.5 d lb (z_coef 0): the aux loss is part of what is optimised
        assert torch.allclose(full[k], ce[k] + 0.5 * lb[k], rtol=1e-4, atol=1e-7), k
        assert not torch.allclose(full[k], ce[k], rtol=1e-3, atol=1e-6), k


def test_aux_gradient_matches_torch_autograd():
    ids, targets = _batch(512)
    grads = []
    for autodiff in ("lmc", "torch"):
        _, model = _trainable(MINIMAX, autodiff=autodiff)
        model(ids, targets=targets)["loss"].backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6), k


def test_a_model_without_aux_losses_is_unchanged():
    g, model = _trainable(LLAMA)
    assert g.meta["aux_losses"] == {} and "ce_loss" not in g.outputs
    ids, targets = _batch(model.config["vocab"])
    with torch.no_grad():
        out = model(ids, targets=targets)
    ce = F.cross_entropy(out["logits"].reshape(-1, out["logits"].shape[-1]),
                         targets.reshape(-1), ignore_index=-1)
    assert torch.allclose(out["loss"], ce, rtol=1e-6, atol=1e-6)


# -- the aux_losses key: a small model file of our own ----------------------------------------
MODEL = """\
name: aux
config: {vocab: 16, d: 8, coef: 0.5}
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d], head: [d, vocab], head2: [d, vocab]}
  body:
    - x = embedding(embed, ids)
    - logits = x @ head
    - penalty = mean(reshape(x * x, [B * T * d]), 0, keepdim=False)
    - per_token = sum(x, -1)
    - mtp_logits = tanh(x + embedding(embed, concat([ids[:, 1:], ids[:, :1]], 1))) @ head2
  outputs: [logits, penalty, per_token, mtp_logits]
  aux_losses: {AUX}
"""


def _write(tmp_path, aux):
    p = tmp_path / "aux.yaml"
    p.write_text(MODEL.replace("{AUX}", aux))
    return str(p)


def test_coefficient_is_a_config_expression(tmp_path):
    path = _write(tmp_path, "{penalty: coef * 4}")
    g = run_pipeline(with_loss(lmc.compile_model(path).graph))
    assert g.meta["aux_losses"] == {"penalty": 2.0}
    model = LmcModel(g, seed=0)
    ids = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        out = model(ids, targets=ids)
    assert torch.allclose(out["loss"], out["ce_loss"] + 2.0 * out["penalty"], atol=1e-6)
    assert torch.allclose(out["penalty"], model.embed[ids].pow(2).mean(), atol=1e-7)


@pytest.mark.parametrize("aux,message,col", [
    ("{nothing: 1}", "aux loss 'nothing' is not one of the model outputs", 16),
    ("{per_token: 1}", "aux loss 'per_token' must be a floating-point scalar", 16),
    ("{penalty: unknown_name}", "unknown_name", 25),
    ("{penalty: inf}", "the coefficient must be a finite number", 25),
    ("{loss: 1}", "the name is taken by the training loss", 16),
    ("[penalty]", "model.aux_losses must map output names to coefficients", 15),
    ("{mtp_logits: 1}", "must be a floating-point scalar, got f32[B,T,16] (a logits output "
     "takes {logits: mtp_logits, ahead: 2, coef: EXPR} under a new name)", 16),
    ("{mtp: {logits: mtp_logits, ahead: 2}}", "a prediction loss needs 'coef'", 21),
    ("{mtp: {logits: mtp_logits, ahead: 2, coef: 1, depth: 1}}", "unknown key 'depth'", 61),
    ("{mtp: {logits: nothing, ahead: 2, coef: 1}}",
     "logits 'nothing' is not one of the model outputs", 30),
    ("{mtp: {logits: penalty, ahead: 2, coef: 1}}",
     "logits 'penalty' must be [B, T, vocab] scores in a float dtype, got f32[]", 30),
    ("{mtp: {logits: mtp_logits, ahead: 0, coef: 1}}", "ahead must be an integer >= 1", 49),
    ("{mtp: {logits: mtp_logits, ahead: 1.5, coef: 1}}", "ahead must be an integer >= 1",
     49),
    ("{mtp: {logits: mtp_logits, ahead: 2, coef: 1.0e999}}",
     "the coefficient must be a finite number", 58),
    ("{penalty: {logits: mtp_logits, ahead: 2, coef: 1}}",
     "a prediction loss is computed by training under its own name, which an output "
     "already has", 16),
])
def test_bad_aux_losses_give_one_located_line(tmp_path, capsys, aux, message, col):
    path = _write(tmp_path, aux)
    assert main(["compile", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    line = MODEL.splitlines().index("  aux_losses: {AUX}") + 1
    assert err.startswith(f"{path}:{line}:{col}: error:"), err
    assert message in err


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_a_prediction_loss_is_the_cross_entropy_of_the_token_ahead(tmp_path, ahead):
    """`{mtp: {logits: mtp_logits, ahead: k, coef: c}}`: training outputs `mtp`, the mean
    cross-entropy of mtp_logits at position t against the token k after input t (targets
    t + k - 1; the last k - 1 positions and the ignored targets left out), and adds c times
    it to the loss; lmc's gradients of that loss equal torch autograd's."""
    path = _write(tmp_path, f"{{penalty: coef, mtp: {{logits: mtp_logits, ahead: {ahead}, "
                            f"coef: 0.25}}}}")
    g = run_pipeline(with_loss(lmc.compile_model(path).graph))
    assert g.meta["aux_losses"] == {"penalty": 0.5, "mtp": 0.25}
    assert g.meta["predictions"] == {"mtp": {"logits": "mtp_logits", "ahead": ahead}}
    gen = torch.Generator().manual_seed(ahead)
    ids = torch.randint(0, 16, (3, 9), generator=gen)
    targets = torch.randint(0, 16, (3, 9), generator=gen)
    targets[1, 4] = targets[2, -1] = -1                  # ignored, mid-window and last
    grads = []
    for autodiff in ("lmc", "torch"):
        model = LmcModel(g, seed=1, autodiff=autodiff)
        with torch.no_grad():         # confident logits, so the target's position matters
            model.embed.mul_(30.0)
            model.head2.mul_(100.0)
        out = model(ids, targets=targets)
        out["loss"].backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    n = ahead - 1
    lg = out["mtp_logits"].detach()[:, :9 - n]
    want = F.cross_entropy(lg.reshape(-1, 16), targets[:, n:].reshape(-1), ignore_index=-1)
    assert torch.allclose(out["mtp"], want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out["loss"], out["ce_loss"] + 0.5 * out["penalty"]
                          + 0.25 * out["mtp"], rtol=1e-6, atol=1e-6)
    if n:       # the unshifted cross-entropy of those logits differs: the test can tell
        flat = out["mtp_logits"].detach().reshape(-1, 16)
        assert abs(F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1) - want) > 1e-3
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6), k
    assert grads[0]["head2"].abs().max() > 1e-4     # the prediction loss trains its head


def test_training_from_the_loss_alone_equals_every_output_taking_a_cotangent():
    """LmcModel(grad_outputs=["loss"]) (what `lmc run --train` and `lmc bench` build): the
    logits come back without gradient and the backward takes no zero [B, T, vocab]
    cotangent for them; the gradients equal those of the default program (both lmc autodiff)
    and the torch-autograd oracle's."""
    g = run_pipeline(with_loss(lmc.compile_model(LLAMA, "tiny", {}).graph))
    ours = LmcModel(g, seed=3, grad_outputs=["loss"])
    every = LmcModel(g, seed=3)
    oracle = LmcModel(g, seed=3, autodiff="torch")
    ids, targets = _batch(ours.config["vocab"])
    grads = []
    for m in (ours, every, oracle):
        out = m(ids, targets=targets)
        out["loss"].backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    assert not ours(ids, targets=targets)["logits"].requires_grad
    assert "grad:logits" not in {n.attrs["name"] for n in ours.program().backward.inputs}
    assert "grad:logits" in {n.attrs["name"] for n in every.program().backward.inputs}
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grads[0][k], grads[2][k], rtol=1e-4, atol=1e-6)
    with pytest.raises(lmc.LmcError, match="grad_outputs: nope not an output"):
        LmcModel(g, grad_outputs=["nope"])


@pytest.mark.parametrize("precision", ["bf16", "f32"])
def test_the_loss_backward_writes_no_extra_vocab_sized_tensor(precision):
    """The cross-entropy's backward, from the loss alone: forward' keeps one [B, T, vocab]
    value for it, the logits as the LM head wrote them (not also their fp32 widening: the
    backward widens again), and the target's one-hot is `iota == target` inside the kernel
    computing the logits' gradient, not a dense zeros + scatter_add."""
    from lmc.codegen.program import apply_patterns, fuse
    from lmc.ir.ops import Op
    from lmc.passes.autodiff import differentiate
    from lmc.passes.mixed_precision import mixed_precision

    c = lmc.compile_model(LLAMA, "tiny", {})
    g = run_pipeline(with_loss(mixed_precision(c.graph, precision)))
    prog = differentiate(apply_patterns(g, ()), outputs=["loss"])
    vocab = c.graph.meta["config"]["vocab"]
    saved = [prog.forward.outputs[s] for s in prog.saved]
    big = [n for n in saved if n.type.rank == 3 and n.type.shape[-1] == vocab]  # [B, T, V]
    assert [n.type.dtype.value for n in big] == [precision], big
    bwd = fuse(run_pipeline(prog.backward), ("fuse_matmul_prologues",), False)
    assert not [n for n in bwd.nodes if n.op is Op.SCATTER_ADD
                and n.type.shape[-1] == vocab]
    (dlogits,) = [n for n in bwd.nodes if n.op is Op.FUSED and n.attrs["kind"] == "pointwise"
                  and any(t.type.shape[-1:] == (vocab,) for t in n.inputs if t.type.shape)]
    assert any(m.op is Op.EQ for m in dlogits.attrs["body"].nodes)   # the one-hot, in-kernel
    # at the tiny width (one tile of dX's columns, of dW's rows) the two matmuls reading
    # dlogits compute it in their loads instead (fuse_matmul_prologues): no kernel stores it
    bwd = fuse(run_pipeline(prog.backward), (), False)
    assert not [n for n in bwd.nodes if n.op is Op.FUSED and n.attrs["kind"] == "pointwise"
                and any(t.type.shape[-1:] == (vocab,) for t in n.inputs if t.type.shape)]
    assert len([n for n in bwd.nodes if n.op is Op.FUSED and n.attrs["kind"] == "matmul"
                and any(m.op is Op.EQ for m in n.attrs["body"].nodes)]) == 2
    fwd = fuse(prog.forward, (), False)
    head = [n for n in fwd.nodes if n.op is Op.FUSED and n.attrs["kind"] == "matmul"
            and any(o.type.shape[-1] == vocab for o in n.attrs["body"].outputs.values())]
    # the logits stored once, at the head's dtype, beside the loss's logsumexp computed in
    # the same kernel (fuse_matmul_reductions)
    assert len(head) == 1
    outs = list(head[0].attrs["body"].outputs.values())
    assert [o.type.shape[-1] == vocab for o in outs] == [True, False], outs
    assert outs[0].type.dtype.value == precision and outs[1].op is Op.LOGSUMEXP


def test_logits_that_cannot_train_and_taken_output_names_are_refused(tmp_path):
    from lmc.errors import LmcError
    src = open(LLAMA).read()
    line = "    - logits = rmsnorm(x, name='norm') @ lm_head\n"
    assert line in src
    head = "rmsnorm(x, name='norm') @ lm_head"
    cases = [(src.replace(line, f"    - logits = cast({head}, 'i64')\n"),
              "training needs logits shaped [B, T, vocab] in a float dtype"),
             (src.replace(line, f"    - logits = sum({head}, 1, False)\n"),
              "training needs logits shaped [B, T, vocab]"),
             (src.replace("  outputs: [logits]", "  outputs: {logits: logits, loss: logits}"),
              "an output may not be named 'loss'"),
             (src.replace("  outputs: [logits]", "  outputs: {logits: logits, ce_loss: "
                          "logits}"), "an output may not be named 'ce_loss'")]
    for i, (text, msg) in enumerate(cases):
        p = tmp_path / f"m{i}.yaml"
        p.write_text(text)
        with pytest.raises(LmcError, match=msg.replace("[", r"\[")) as e:
            with_loss(lmc.compile_model(str(p), "tiny").graph)
        # at the logits' line (the taken names: the line of the value they name)
        assert e.value.loc is not None and e.value.loc.line == src[:src.index(line)].count(
            "\n") + 1, e.value.format()
    # applied twice: the second is a no-op (a graph with its loss and targets already)
    g = with_loss(lmc.compile_model(LLAMA, "tiny").graph)
    assert with_loss(g) is g


def test_an_input_named_targets_is_refused(tmp_path):
    from lmc.errors import LmcError
    src = open(LLAMA).read()
    assert "  inputs:\n    ids: [B, T]\n" in src
    src = src.replace("  inputs:\n    ids: [B, T]\n", "  inputs:\n    ids: [B, T]\n"
                      "    targets: [B, T]\n")
    p = tmp_path / "t.yaml"
    p.write_text(src)
    with pytest.raises(LmcError, match="an input may not be named 'targets'") as e:
        with_loss(lmc.compile_model(str(p), "tiny").graph)
    assert e.value.loc is not None and str(p) in e.value.format()
