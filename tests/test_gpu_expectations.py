"""The expectations of tests/gpu/test_gpu_patterns.py that need no GPU, checked on CPU: the
pattern kinds each model's fp32 and bf16 training programs must hold, and a fused decode op
in its static triton step. A wrong expectation there (gla's and rwkv6's step fuse
decode_gated_linear_attention, which the GPU test did not accept) would only show on a lent
GPU, at the cost of a device call."""
import importlib.util
import os

import pytest

import lmc
from lmc.runtime.decoder import Decoder

_spec = importlib.util.spec_from_file_location(
    "gpu_patterns", os.path.join(os.path.dirname(__file__), "gpu", "test_gpu_patterns.py"))
gp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gp)


@pytest.mark.parametrize("path,sets,kinds,moe", gp.MODELS, ids=gp.IDS)
def test_gpu_pattern_expectations_hold(path, sets, kinds, moe):
    for precision in ("f32", "bf16"):
        got = gp._kinds(gp._graph(path, sets, precision))
        assert kinds <= got, (precision, got)
    m = lmc.load(gp._file(path), preset="tiny", backend="triton", seed=8, **sets)
    assert gp.decode_fused(Decoder(m.eval(), "triton", static=True, max_len=16), kinds)
