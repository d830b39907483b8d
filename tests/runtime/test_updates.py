"""Update rules (model.updates): DeepSeek-V3's auxiliary-loss-free balancing moves each
layer's expert selection bias against the step's loads, after the optimizer step; errors in
the rule name the file's line."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT

from lmc.cli import main
from lmc.errors import LmcError
from lmc.frontend.model import load_graph
from lmc.runtime.train import apply_updates

DEEPSEEK = os.path.join(ROOT, "examples", "deepseek_moe.yaml")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def test_load_balance_lowers_the_overloaded_and_raises_the_underloaded():
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.tensor([0.5, 0.0, 0.0, -0.5]), requires_grad=False)
    m.b = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    # layer a: mean load 4 -> expert 0 over, 1 at the mean (unmoved), 2 and 3 under;
    # layer b: its own mean (2), not a's
    upd = [{"rule": "load_balance", "params": ["a", "b"], "load": "tok", "rate": 0.25}]
    apply_updates(m, upd, {"tok": [10, 4, 2, 0, 3, 1, 2]})
    assert m.a.tolist() == [0.25, 0.0, 0.25, -0.25]
    assert m.b.tolist() == [-0.25, 0.25, 0.0]


def test_training_moves_each_bias_by_its_layers_logged_loads(tmp_path, small_ids):
    """Three steps of examples/deepseek_moe (tiny): the final biases (both layers' and the
    multi-token prediction block's) equal the rule applied to each step's logged tokens per
    expert, in order. The step logs its aux losses, the multi-token prediction's among
    them."""
    out = tmp_path / "ds"
    assert main(["run", DEEPSEEK, "--train", "--preset", "tiny", "--data", small_ids,
                 "--out", str(out), "--batch-size", "4", "--seq-len", "16", "--steps", "3",
                 "--no-progress", "--log-every", "1", "--lr", "1e-2",
                 "--set", "balance_rate=0.01"]) == 0
    recs = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]
    layers, experts, k = 3, 8, 4
    want = np.zeros((layers, experts))
    for r in recs:
        assert set(r["aux_losses"]) == {"seq_balance", "mtp"}
        assert 5.0 < r["aux_losses"]["mtp"] < 7.0      # about ln 512 at the start
        load = np.asarray(r["stats"]["expert_tokens"], dtype=float).reshape(layers, experts)
        assert (load.sum(1) == 4 * 16 * k).all()       # every token picked k experts
        want += 0.01 * np.sign(load.mean(1, keepdims=True) - load)
    assert np.abs(want).max() > 0                      # the loads were uneven
    from safetensors.torch import load_file
    w = load_file(str(out / (out / "latest").read_text().strip() / "model.safetensors"))
    names = ["layers.0.moe.balance", "layers.1.moe.balance", "mtp.moe.balance"]
    for i, name in enumerate(names):
        np.testing.assert_allclose(w[name].numpy(), want[i], atol=1e-7)


def test_compile_summary_lists_the_update(capsys):
    assert main(["compile", DEEPSEEK, "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert ("update      load_balance: 3 params (layers.0.moe.balance, ...) by expert_tokens, "
            "rate 0.001") in out
    assert ("loss        cross-entropy + 0.0001 seq_balance + 0.3 mtp (cross-entropy of "
            "mtp_logits, 2 tokens ahead)") in out


MODEL = """\
name: m
config: {vocab: 16, d: 8, experts: 4, layers: 2}
blocks:
  gate:
    args: [x]
    params:
      bias: {shape: [experts], init: zeros, trainable: false}
      w: [d, experts]
    body:
      - s = x @ w + bias
      - return s, sum(reshape(s, [B * T, experts]), 0)
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d], head: [experts, vocab]}
  body:
    - x = embedding(embed, ids)
    - for: i
      in: layers
      body:
        - s, l_i = gate(x, name='g')
        - if: i == 0
          then: [load = l_i]
          else: ['load = concat([load, l_i], 0)']
    - logits = s @ head
  outputs: [logits, load, s]
  updates:
    - {UPDATE}
"""


@pytest.mark.parametrize("update, line, msg", [
    ("rule: load_balance, params: 'layers.*.g.bias', load: load, rate: -0.1",
     27, "rate must be a number >= 0 (0 turns the rule off), got -0.1"),
    ("rule: balance, params: 'layers.*.g.bias', load: load, rate: 0.1",
     27, "unknown update rule 'balance' (rules: load_balance)"),
    ("rule: load_balance, params: 'layers.*.x', load: load, rate: 0.1",
     27, "params layers.*.x: no parameter matches"),
    # one dead pattern among live ones (it was accepted, or blamed on the load's size)
    ("rule: load_balance, params: ['layers.*.g.bias', 'layer.*.g.bias'], load: load, "
     "rate: 0.1", 27, "params layer.*.g.bias: no parameter matches"),
    ("rule: load_balance, params: 'layers.*.g.w', load: load, rate: 0.1",
     27, "parameter layers.0.g.w has an update rule and is also trained by gradient"),
    ("rule: load_balance, params: 'layers.0.g.bias', load: load, rate: 0.1",
     27, "load 'load' must hold one count per biased expert (4: 1 parameters in order)"),
    ("rule: load_balance, params: 'layers.*.g.bias', load: s, rate: 0.1",
     27, "load 's' must hold one count per biased expert"),
    ("rule: load_balance, params: 'layers.*.g.bias', load: nope, rate: 0.1",
     27, "load 'nope' is not one of the model outputs (logits, load, s)"),
    ("rule: load_balance, params: 'layers.*.g.bias', load: [load], rate: 0.1",
     27, "load ['load'] is not one of the model outputs"),
    ("rule: load_balance, params: 7, load: load, rate: 0.1",
     27, "params must be a name pattern or a list of them"),
    ("rule: load_balance, params: 'layers.*.g.bias', load: load, rate: 0.1, every: 2",
     27, "unknown key 'every' in an update"),
    ("rule: load_balance, params: 'layers.*.g.bias', load: load",
     27, "the update needs 'rate'"),
])
def test_a_bad_update_names_its_line(tmp_path, update, line, msg):
    f = tmp_path / "m.yaml"
    f.write_text(MODEL.replace("{UPDATE}", "{" + update + "}"))
    with pytest.raises(LmcError) as e:
        load_graph(str(f))
    assert msg in str(e.value) and f"m.yaml:{line}:" in str(e.value), str(e.value)


def test_a_parameter_in_two_updates_is_refused(tmp_path):
    f = tmp_path / "m.yaml"
    u = "{rule: load_balance, params: ['layers.*.g.bias'], load: load, rate: 0.1}"
    f.write_text(MODEL.replace("    - {UPDATE}", f"    - {u}\n    - {u}"))
    with pytest.raises(LmcError, match=r"layers.0.g.bias is in two updates \(the other at "
                                       r".*m.yaml:27"):
        load_graph(str(f))


def test_a_window_too_short_for_the_prediction_loss_is_refused(tmp_path, small_ids, capsys):
    """deepseek_moe predicts 2 tokens ahead: a 1-token window holds no such target, so
    training refuses it in one line before a step."""
    assert main(["run", DEEPSEEK, "--train", "--preset", "tiny", "--data", small_ids,
                 "--out", str(tmp_path / "o"), "--seq-len", "1", "--steps", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lmc: error: --seq-len 1 is too short for the aux loss 'mtp': it predicts "
                   "2 tokens ahead (--seq-len >= 2)"), err
    assert not (tmp_path / "o").exists()
