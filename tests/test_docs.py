"""docs/python-api.md's examples run as written: its block file and model file, loading,
a training loop, the Decoder and generate (CPU, the tiny model the page defines)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "python-api.md")


def _blocks():
    text = open(PAGE, encoding="utf-8").read()
    return [code for _, code in re.findall(r"```(\w+)\n(.*?)```", text, re.S)]


def _one(blocks, start):
    found = [c for c in blocks if c.startswith(start)]
    assert len(found) == 1, (start, len(found))
    return found[0]


def test_the_python_api_page_examples_run(tmp_path):
    blocks = _blocks()
    (tmp_path / "my_blocks.py").write_text(_one(blocks, "# my_blocks.py"))
    (tmp_path / "tiny.yaml").write_text(_one(blocks, "# tiny.yaml"))
    script = "\n".join([
        _one(blocks, "import torch, lmc\nimport my_blocks"),
        "assert logits.shape == (2, 8, 64)",
        _one(blocks, "import torch, torch.nn.functional as F, lmc"),
        "assert torch.isfinite(loss)",
        "from lmc.runtime.decoder import Decoder",
        _one(blocks, 'model = lmc.load("tiny.yaml").eval()'),
        "assert logits.shape == (2, 1, 64) and state.past == 6",
        _one(blocks, "sdec = Decoder("),
        _one(blocks, "prompt = torch.tensor("),
        "assert len(greedy) == 8 and len(sampled) == 8",
        "print('ok')",
    ])
    env = dict(os.environ, PYTHONPATH=ROOT, LMC_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_the_readme_library_example_runs(tmp_path):
    """README's "Library API" block, as written (a block defined, llama tiny loaded, called,
    decoded dynamic and static)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"## Library API.*?```python\n(.*?)```", text, re.S).group(1)
    env = dict(os.environ, PYTHONPATH=ROOT, LMC_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-c", block + "\nprint('ok')"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
