"""The kernel cache across processes: two processes compiling the same model at once write
one identical file each time, a later process imports it without rewriting, and new batch
sizes and lengths reuse the code (no new module)."""
import os
import subprocess
import sys

import torch
from conftest import ZOO

import lmc

LLAMA = os.path.join(ZOO, "llama.yaml")
CODE = ("import lmc, torch\n"
        f"m = lmc.load({LLAMA!r}, preset='tiny', backend='triton', seed=1).eval()\n"
        "with torch.no_grad():\n"
        "    print(round(float(m(torch.arange(7).reshape(1, 7)).double().sum()), 3))\n")


def _snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[p] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
    return out


def test_processes_share_the_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LMC_CACHE"] = str(tmp_path / "cache")
    run = [sys.executable, "-c", CODE]
    procs = [subprocess.Popen(run, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]          # compiling at once
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert outs[0][0] == outs[1][0]
    kernels = tmp_path / "cache" / "kernels"
    first = _snapshot(kernels)
    assert first and not any(".tmp." in p for p in first)   # no temp file left behind
    again = subprocess.run(run, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == outs[0][0]
    assert _snapshot(kernels) == first                        # read, not rewritten


def test_new_sizes_reuse_the_code(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    m = lmc.load(LLAMA, preset="tiny", backend="triton").eval()
    with torch.no_grad():
        m(torch.zeros(1, 3, dtype=torch.long))
        files = _snapshot(tmp_path / "cache")
        mods = {k for k in sys.modules if k.startswith("lmc_kernels_")}
        for B, T in [(2, 1), (3, 17), (1, 64)]:
            m(torch.zeros(B, T, dtype=torch.long))
    assert _snapshot(tmp_path / "cache") == files
    assert {k for k in sys.modules if k.startswith("lmc_kernels_")} == mods
