"""Dropout and noise draw anew at each training step (the draw counter), replay exactly, and
their gradients stay consistent with the forward's draw."""
import os

import torch
from conftest import ZOO

import lmc
from lmc.runtime.module import LmcModel

OPTIMUS = os.path.join(ZOO, "optimus_prime.yaml")   # has dropout
BLUES = os.path.join(ZOO, "blues01.yaml")           # has a noisy router


def _out(m, ids):
    out = m(ids)
    return out["logits"] if isinstance(out, dict) else out


def test_masks_change_with_the_draw_counter_and_replay():
    for path, extra in ((OPTIMUS, {"p_drop": 0.5}), (BLUES, {})):
        m = lmc.load(path, preset="tiny", seed=0, **extra).train()
        ids = torch.randint(0, 512, (2, 9))
        with torch.no_grad():
            m.rng_step = 0
            a = _out(m, ids)
            m.rng_step = 1
            b = _out(m, ids)
            m.rng_step = 0
            a2 = _out(m, ids)
        assert torch.equal(a, a2), path
        assert not torch.equal(a, b), path
        m.eval()
        with torch.no_grad():
            m.rng_step = 0
            e0 = _out(m, ids)
            m.rng_step = 7
            assert torch.equal(e0, _out(m, ids))  # no randomness in eval


def test_gradients_use_the_same_draw_as_the_forward():
    c = lmc.compile_model(OPTIMUS, "tiny", {"p_drop": 0.5})
    ours = LmcModel(c.graph, seed=1)
    oracle = LmcModel(c.graph, seed=1, autodiff="torch")
    ids = torch.randint(0, 512, (2, 9))
    gy = torch.randn(2, 9, 512)
    for m in (ours, oracle):
        m.train()
        m.rng_step = 5
        (_out(m, ids) * gy).sum().backward()
    for (n, p), q in zip(ours.named_parameters(), oracle.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max() + 1e-7, n
