"""`lmc compile`: summary, --json, --print-ir, -o, --set, --import."""
import json
import os
import subprocess
import sys

from conftest import ROOT, ZOO

from lmc.cli import main

LLAMA = os.path.join(ZOO, "llama.yaml")


def test_compile_default_llama_reports_162m_params(capsys):
    assert main(["compile", LLAMA, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert abs(s["params"] - 162e6) < 1e6
    for key in ("model", "params", "nodes_before", "nodes_after", "passes", "compile_s",
                "fusions"):
        assert key in s
    assert s["model"] == "llama"
    assert s["passes"] == ["inline", "fold_constants", "cse", "dce"]
    assert s["nodes_after"]["matmul"] == 12 * 9 + 1  # 7 projections + 2 attention per layer
    assert s["nodes_before"]["causal_mask"] == 12 and s["nodes_after"]["causal_mask"] == 1
    assert isinstance(s["fusions"], list)
    for g in ("forward", "backward"):
        assert s["kernels"][g]["count"] > 0
        assert all(k["kernel"].startswith("lmc_fused_") and k["ops"]
                   for k in s["kernels"][g]["list"])


def test_compile_summary_text(capsys):
    assert main(["compile", LLAMA, "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "params" in out and "matmul" in out and "compile" in out


def test_set_overrides_after_preset(capsys):
    assert main(["compile", LLAMA, "--preset", "tiny", "--set", "d=128", "heads=8",
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["config"]["d"] == 128 and s["config"]["head_dim"] == 16
    assert s["config"]["layers"] == 2  # from the preset


def test_print_ir(capsys):
    assert main(["compile", LLAMA, "--preset", "tiny", "--print-ir"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph llama {")
    assert 'param "layers.1.attn.wq"' in out and "llama.yaml:" in out


def test_out_dir(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compile", LLAMA, "--preset", "tiny", "-o", str(out)]) == 0
    assert {"ir.txt", "ir_source.txt", "summary.json", "kernels_forward.py",
            "kernels_backward.py"} <= set(os.listdir(out))
    src = (out / "kernels_backward.py").read_text()
    assert "@triton.jit" in src and "# IR nodes:" in src
    compile(src, "kernels_backward.py", "exec")  # valid Python
    assert "block" in (out / "ir_source.txt").read_text()
    assert json.loads((out / "summary.json").read_text())["model"] == "llama"


def test_import_python_blocks(tmp_path, capsys):
    blocks = tmp_path / "myblocks.py"
    blocks.write_text("import lmc\n\n@lmc.block\ndef double(b, x):\n    return x * 2.0\n")
    model = tmp_path / "m.yaml"
    model.write_text(open(LLAMA).read().replace(
        "- logits = rmsnorm(x, name='norm') @ lm_head",
        "- logits = double(rmsnorm(x, name='norm')) @ lm_head"))
    assert main(["compile", str(model), "--preset", "tiny", "--import", str(blocks)]) == 0
    from lmc.blocks import unregister
    unregister("double")


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "lmc")
    r = subprocess.run([exe, "compile", LLAMA, "--preset", "tiny"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "params" in r.stdout
