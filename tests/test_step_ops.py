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
    # 2 layers x 5 fused ops (RoPE inside the q/k/v projection) + rope tables (1) + the
    # head's norm + matmul (1); the embedding; decode.pos from one kernel
    assert line.split() == ["llama", "tiny", "12", "fused", "+", "1", "torch", "ops", "+", "1",
                            "position-table", "launches", "per", "static", "step;", "weights",
                            "read", "0.23", "MB", "per", "token", "at", "batch", "1",
                            "(bf16)"], line


def test_step_weight_bytes_count_the_chosen_experts(tmp_path, monkeypatch):
    """blues01 tiny (one MoE layer, top-2 of 4 experts, d = F = 64): the routed step reads two
    of the four experts' Wg, W1, W2 at batch 1, all four at batch 2; with fuse_moe_gating off
    the dense step reads all four. Every other parameter in full (the embedding too: it is
    also the tied head)."""
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    import lmc
    from lmc.bench import step_weight_bytes
    from lmc.runtime.decoder import Decoder

    def graph(disable=()):
        m = lmc.load(os.path.join(ROOT, "zoo", "blues01.yaml"), preset="tiny",
                     backend="triton").eval()
        m.disable = disable
        return Decoder(m, backend="triton", static=True, max_len=8, cuda_graph=False).graph
    routed, dense = graph(), graph(("fuse_moe_gating",))
    expert = 3 * 4 * 64 * 64 * 2                     # Wg, W1, W2 of 4 experts, bf16
    total = sum(p.numel() for p in lmc.load(os.path.join(ROOT, "zoo", "blues01.yaml"),
                                            preset="tiny").parameters()) * 2
    assert step_weight_bytes(dense) == total
    assert step_weight_bytes(routed) == total - expert // 2
    assert step_weight_bytes(routed, batch=2) == total


def test_step_weight_bytes_count_embedding_rows():
    """An embedding table read only by the embedding (llama's head is its own matrix) counts
    the rows a step picks: one per sequence."""
    import lmc
    from lmc.bench import step_weight_bytes
    from lmc.passes.decode import decode_step
    m = lmc.load(os.path.join(ROOT, "zoo", "llama.yaml"), preset="tiny")
    g = decode_step(m.graph, static=True).graph
    total = sum(p.numel() for p in m.parameters()) * 2
    embed = 512 * 64 * 2
    assert step_weight_bytes(g) == total - embed + 64 * 2
    assert step_weight_bytes(g, batch=3) == total - embed + 3 * 64 * 2
