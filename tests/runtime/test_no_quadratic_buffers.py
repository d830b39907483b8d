"""With the pattern passes, the triton backend's training program holds no T x T value: every
attention (softmax, sliding-window, retention, lightning) runs as a kernel that never
materialises the scores, forward and backward. Without them the same programs do (so the
check can fail). The GPU peak-memory figure at T = 8192 is benchmarks/linear_attention_bench.py's;
this is the structural fact behind it, for every shape."""
import os

import pytest
from conftest import ZOO

import lmc
from lmc.codegen.program import PATTERN_PASSES
from lmc.passes import run_pipeline
from lmc.passes.loss import with_loss
from lmc.runtime.module import LmcModel


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _quadratic(graph):
    """Values of the graph (not inside fused bodies) with two axes of length T."""
    out = []
    for n in graph.nodes:
        types = n.type if isinstance(n.type, tuple) else (n.type,)
        for t in types:
            if sum(str(d) == "T" for d in t.shape) >= 2:
                out.append(f"{n.op.value} {list(t.shape)} at {n.scope}")
    return out


EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")


@pytest.mark.parametrize("path,sets", [
    ("llama.yaml", {}), ("blues01.yaml", {}), ("minimax.yaml", {}), ("yoco.yaml", {}),
    ("yoco.yaml", {"sliding_window": 5}), ("optimus_prime.yaml", {}),
    # outside the zoo: attention with no RoPE (GPT-2), soft-capped scores (Gemma 2 style)
    (os.path.join(EXAMPLES, "gpt2.yaml"), {}), (os.path.join(EXAMPLES, "gemma2.yaml"), {})])
def test_training_program_has_no_t_by_t_value(path, sets):
    g = run_pipeline(with_loss(lmc.load(os.path.join(ZOO, path), preset="tiny", **sets).graph))
    fused = LmcModel(g, backend="triton").program()
    for exe in (fused.forward_exec, fused.backward_exec):
        assert _quadratic(exe.graph) == []
    plain = LmcModel(g, backend="triton")
    plain.disable = list(PATTERN_PASSES)
    prog = plain.program()
    assert _quadratic(prog.forward_exec.graph) and _quadratic(prog.backward_exec.graph)
