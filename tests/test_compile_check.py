"""benchmarks/compile_check.py: kernels recorded in the interpreter compile for sm_90 with
Triton's compiler, no GPU needed (slow: minutes per model; run with -m slow)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
def test_llama_kernels_compile_for_sm90(tmp_path):
    """The first generated kernels, and the attention templates in every GPU autotune
    configuration (the interpreter runs none of those block sizes)."""
    env = dict(os.environ, LMC_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"),
                        "--models", "llama", "--limit", "25", "--threads", "2",
                        "--launches", str(tmp_path / "launches.json")],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # every variant compiles; an autotuner config over the shared memory (fp32 operands at
    # the big Hopper tiles) is skipped, as the autotuner skips it at run time
    done = int(r.stdout.split("compiled ")[1].split("/")[0])
    over = int(r.stdout.split(" autotuner configs over")[0].rsplit(" ", 1)[1])
    assert "/25 kernel variants" in r.stdout and done + over == 25 and done > over, r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"),
                        "--compile-only", str(tmp_path / "launches.json"), "--only",
                        "lmc.codegen."], capture_output=True, text=True,
                       env=dict(env, TRITON_INTERPRET="0"), timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # llama: the rope-attention forward (8 configs), dK/dV and dQ (6 each), its delta
    # pre-kernel, and the decode split kernel (6 configs) at least
    n = int(r.stdout.split("compiled ")[1].split("/")[0])
    assert n >= 8 + 6 + 6 + 1 + 6, r.stdout
