"""benchmarks/roofline.py models a training step's bytes and FLOPs from the compiled program
(the before/after figures in benchmarks/README.md come from it)."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_roofline_of_llama_tiny(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    import roofline
    out = tmp_path / "r.json"
    assert roofline.main(["--preset", "tiny", "--batch-size", "2", "--seq-len", "64",
                          "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "roofline step" in text and "saved for the backward" in text
    r = json.loads(out.read_text())
    rows = r["rows"]
    assert r["launches"]["forward"] == sum(x["graph"] == "forward" for x in rows) > 0
    assert r["launches"]["backward"] == sum(x["graph"] == "backward" for x in rows) > 0
    for x in rows:
        assert x["bytes"] > 0 and x["flops"] >= 0
        assert x["seconds"] == max(x["bytes"] / r["bandwidth"], x["flops"] / r["flops_rate"])
    assert abs(r["roofline_step_s"] - sum(x["seconds"] for x in rows)) < 1e-12
    # the tiny llama's matmul FLOPs: 6 * tokens * (matmul params) forward + backward, plus
    # attention (causal: half of 4*B*H*T*T*D forward, 7/2 of that backward)
    cfg = {"d": 64, "layers": 2, "ffn": 128, "vocab": 512, "heads": 4}
    per_layer = 4 * cfg["d"] ** 2 + 3 * cfg["d"] * cfg["ffn"]
    params = cfg["layers"] * per_layer + cfg["d"] * cfg["vocab"]
    tokens = 2 * 64
    attn_fwd = cfg["layers"] * 4 * 2 * 64 * 64 * cfg["d"] // 2
    want = 6 * tokens * params + attn_fwd + attn_fwd * 7 // 2
    assert sum(x["flops"] for x in rows) == want


def test_roofline_counts_the_routed_moe_work(tmp_path, monkeypatch, capsys):
    """An MoE layer's FLOPs are those of the routed rows (N*k through the expert products),
    not the dense every-expert body its fused op replaces."""
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    import roofline
    out = tmp_path / "r.json"
    assert roofline.main(["--model", "blues01", "--preset", "tiny", "--batch-size", "2",
                          "--seq-len", "32", "--json", str(out)]) == 0
    capsys.readouterr()
    rows = json.loads(out.read_text())["rows"]
    N, d, E, F, k = 2 * 32, 64, 4, 64, 2          # blues01 tiny: one MoE layer (layer 1)
    fwd = [x for x in rows if x["kind"] == "moe_layer"]
    bwd = [x for x in rows if x["kind"] == "moe_layer_bwd"]
    assert len(fwd) == len(bwd) == 1
    assert fwd[0]["flops"] == 2 * N * d * E + 3 * 2 * N * k * d * F
    assert bwd[0]["flops"] == 3 * 2 * N * d * E + 6 * 2 * N * k * d * F
