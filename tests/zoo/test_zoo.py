"""Every zoo file builds at its defaults and at its tiny preset, and is causal."""
import glob
import os

import pytest
import torch
from conftest import ZOO

import lmc

FILES = sorted(glob.glob(os.path.join(ZOO, "*.yaml")))


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_builds_at_default_size(path):
    c = lmc.compile_model(path)
    assert c.summary()["params"] > 0


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_tiny_preset_is_causal(path):
    model = lmc.load(path, preset="tiny", seed=0)
    vocab = model.config["vocab"]
    ids = torch.randint(0, vocab, (2, 12))

    def logits(ids):  # a model with aux outputs (MoE losses, stats) returns a dict
        out = model(ids)
        return out["logits"] if isinstance(out, dict) else out

    with torch.no_grad():
        base = logits(ids)
        for t in (0, 5, 10):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % vocab
            out = logits(changed)
            # positions <= t do not see token t+1; position t+1 does
            assert torch.equal(out[:, : t + 1], base[:, : t + 1])
            assert not torch.equal(out[:, t + 1], base[:, t + 1])
