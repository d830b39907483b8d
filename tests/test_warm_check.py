"""benchmarks/warm_check.py: the warm pass through Triton's own JIT for sm_90, no GPU needed
(slow: a minute; run with -m slow)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
def test_llama_decode_warms_through_the_jit(tmp_path):
    """The tiny llama's static prefill and step (one pass): every launch reached (the
    autotuned ones included), no compile failed, and the same pass again compiles
    nothing."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "warm_check.py"),
                        "--mode", "decode", "--batch", "1", "--seq", "16", "--max-len", "64",
                        "--threads", "2", "--no-record"],
                       capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, LMC_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (ln,) = [ln for ln in r.stdout.splitlines() if "warm pass" in ln]
    assert "prefill + step B=1 T=16" in ln, ln
    launches = int(ln.split(" launches")[0].rsplit(" ", 1)[1])
    compiles = int(ln.split(" compiles (")[0].rsplit(" ", 1)[1])
    # prefill and step of 2 layers: 5 fused ops a layer, several of them template pairs
    assert launches >= 26 and compiles > 0, ln
    assert "(0 failed)" in ln and ln.endswith(", 0 compiles"), ln
