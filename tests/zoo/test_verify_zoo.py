"""`lmc verify` passes for every zoo file at its tiny preset (interpreter for triton)."""
import glob
import os

import pytest
from conftest import ZOO

from lmc.verify import format_rows, verify

FILES = sorted(glob.glob(os.path.join(ZOO, "*.yaml")))


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


# the triton decoder's fused decode ops and routed MoE layers, as the decode check reports
# them (tiny presets)
DECODE_FUSED = {"llama.yaml": "2 decode_attention",
                "blues01.yaml": "2 decode_attention, 1 moe_layer",
                "minimax.yaml": "1 decode_attention, 1 decode_linear_attention, 2 moe_layer",
                "yoco.yaml": "1 decode_attention, 1 decode_linear_attention",
                "optimus_prime.yaml": "2 decode_attention", "medit_one.yaml": None}


# the static triton step's cache writes stored by the kernels computing the values (k and v
# per attention layer; blues01's fused W_qkv product is split into one output per slice).
# (minimax's keys, rotated and pass-through columns, are one cache its projection's tiles
# write, the rotation in their epilogue); MLA's latent
# (a norm's output) is stored by its reduction kernel, its k_R by the rope kernel
CACHE_WRITES = {"llama.yaml": 4, "blues01.yaml": 4, "minimax.yaml": 2, "yoco.yaml": 2,
                "optimus_prime.yaml": 4, "medit_one.yaml": 0}
# and the carried states the step's kernels update in place (fuse_cache_writes): the decoded
# linear attention's (minimax's lightning layer, yoco's retention), minimax's MoE capacity
# counts (two layers) and medit_one's running sums (its reduction kernels')
IN_PLACE = {"minimax.yaml": 3, "yoco.yaml": 1, "medit_one.yaml": 2}


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_verify_passes(path):
    rows = verify(path)
    assert "preset tiny" in rows[0].detail
    assert all(r.ok and not r.skipped for r in rows), format_rows(rows)
    decode = rows[-1].detail
    want = DECODE_FUSED[os.path.basename(path)]
    assert (f"triton k in [1, 5] ({want}):" if want else "triton k in [1, 5]:") in decode
    writes = CACHE_WRITES[os.path.basename(path)]
    n = IN_PLACE.get(os.path.basename(path))
    states = f", {n} state{'s' if n and n > 1 else ''} updated in place" if n else ""
    assert f"triton static k 5 ({writes} cache writes stored by kernels{states}):" in decode, \
        decode
