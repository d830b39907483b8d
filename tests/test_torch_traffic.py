"""benchmarks/torch_traffic.py: the bytes torch ops move around lmc's kernels."""
import importlib.util
import os

import torch
from conftest import ROOT


def _tool():
    spec = importlib.util.spec_from_file_location(
        "torch_traffic", os.path.join(ROOT, "benchmarks", "torch_traffic.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counting_sees_copies_and_skips_views():
    tt = _tool()
    x = torch.randn(8, 16)
    assert tt.count_traffic(lambda: x.reshape(-1).t()) == {}            # views only
    got = tt.count_traffic(lambda: x.t().reshape(-1))                  # must copy
    assert sum(b for _, b in got.values()) == 2 * x.numel() * 4
    y = torch.zeros(8, 16, dtype=torch.bfloat16)
    got = tt.count_traffic(lambda: y.copy_(x))
    assert got == {"copy_": [1, x.numel() * 4 + y.numel() * 2]}


def test_llama_training_step_moves_no_data_outside_kernels_but_the_graphs_torch_ops():
    """A bf16 training step of llama (kernels skipped): only the graph's own torch ops
    (embedding and its scatter_add gradient, the loss's gather, the loss seed) and the split-K
    counters' one-time zeros touch memory: no reshape copies, no attention temporaries, no
    copies into output buffers."""
    stats = _tool().measure("llama", "tiny", "bf16", None, 2, 16)
    assert set(stats) <= {"embedding", "gather", "scatter_add", "arange", "zeros",
                          "ones_like"}, stats
