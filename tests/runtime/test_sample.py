"""Sampling one token from logits (lmc.runtime.decoder.sample): greedy at temperature 0 and in
the limit of a tiny one, top-k and top-p cuts."""
import torch

from lmc.runtime.decoder import sample


def _gen():
    return torch.Generator().manual_seed(0)


def test_a_tiny_temperature_is_greedy_not_nan():
    """logits / 1e-40 overflows fp32 (inf - inf = nan in the softmax); relative to the largest
    logit, in fp64, the other tokens get probability 0."""
    logits = torch.tensor([1.0, 3.0, -2.0, 2.5])
    for t in (1e-40, 1e-300, 5e-324):
        assert sample(logits, t, 0, 1.0, _gen()) == 1
    masked = torch.tensor([float("-inf"), 0.5, 0.4])
    assert sample(masked, 1e-30, 2, 0.9, _gen()) == 1


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0, 4.8])
    seen = {sample(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(s)) for s in range(50)}
    assert seen == {1, 2}
    seen = {sample(logits, 1.0, 0, 0.5, torch.Generator().manual_seed(s)) for s in range(50)}
    assert seen <= {1, 2} and 1 in seen
    assert sample(logits, 0, 0, 1.0, _gen()) == 1
