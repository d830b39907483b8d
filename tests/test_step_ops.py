"""benchmarks/step_ops.py counts what a static decode step launches (the figures in
benchmarks/README.md come from it)."""
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_step_ops_counts_llama_tiny(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    import step_ops
    assert step_ops.main(["--models", "llama"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # 2 layers x 5 fused ops (RoPE inside the q/k/v projection) + rope tables (2) + the
    # head's norm + matmul (1); the embedding
    assert line.split() == ["llama", "tiny", "13", "fused", "+", "1", "torch", "ops", "per",
                            "static", "step"], line
