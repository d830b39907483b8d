"""`lmc compile`: summary, --json, --print-ir, -o, --set, --import."""
import json
import os
import subprocess
import sys

import pytest
import torch
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
    assert s["passes"] == ["inline", "fold_constants", "canonicalize", "cse", "dce"]
    assert s["nodes_after"]["matmul"] == 12 * 9 + 1  # 7 projections + 2 attention per layer
    assert s["nodes_before"]["causal_mask"] == 12 and s["nodes_after"]["causal_mask"] == 1
    assert isinstance(s["fusions"], list)
    for g in ("forward", "backward"):
        assert s["kernels"][g]["count"] > 0
        assert all(k["kernel"].startswith("lmc_") and k["ops"] and k["kind"]
                   for k in s["kernels"][g]["list"])
    kinds = {k["kind"] for k in s["kernels"]["forward"]["list"]}
    assert {"pointwise", "matmul"} <= kinds
    fw = s["kernels"]["forward"]["list"]
    # in the (inference) forward the 25 RMSNorms (2 per layer + final) are the prologues of
    # the matmuls reading them, not kernels; each layer's rope + attention is one fused
    # rope-attention (forward) and its fused backward
    assert sum(k["kind"] == "reduction" for k in fw) == 0
    assert sum(f["reason"].startswith("rmsnorm prologue") for f in s["fusions"]) == 25
    assert sum(k["kind"] == "rope_attention" for k in fw) == 12
    assert sum(k["kind"] == "rope_attention_bwd" for k in s["kernels"]["backward"]["list"]) == 12
    rope = [f for f in s["fusions"] if f["pass"] == "fuse_rope_attention"]
    assert len(rope) == 12 and all(f["status"] == "fused" for f in rope)
    assert {f["pass"] for f in s["fusions"]} >= {"fuse_reductions", "fuse_matmul"}


def test_compile_summary_text(capsys):
    assert main(["compile", LLAMA, "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "params" in out and "matmul" in out and "compile" in out


def test_compile_mode_train_shows_the_training_program(capsys):
    """--mode train: the kernels of what `lmc run --train` runs (the loss appended, bf16 by
    default, gradients from the loss alone), so the loss's fusions show: its logsumexp in
    the head matmul's kernel. --precision without it is a usage error."""
    assert main(["compile", LLAMA, "--preset", "tiny", "--mode", "train", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mode"].startswith("train (bf16)")
    fused = [f for f in s["fusions"] if f["pass"] == "fuse_matmul_reductions"]
    assert [(f["status"], f["graph"]) for f in fused] == [("fused", "forward")]
    assert "logsumexp along the rows" in fused[0]["reason"]
    head = [k for k in s["kernels"]["forward"]["list"] if k["kernel"].endswith("_logsumexp")]
    assert [k["kind"] for k in head] == ["matmul"] and "logsumexp" in head[0]["ops"]
    assert not [k for k in s["kernels"]["forward"]["list"]
                if k["kind"] == "reduction" and "logsumexp" in k["ops"]]
    assert main(["compile", LLAMA, "--preset", "tiny"]) == 0   # the model's own graph
    assert "fuse_matmul_reductions" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["compile", LLAMA, "--precision", "f16"])
    assert e.value.code == 2 and "--mode train" in capsys.readouterr().err


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
            "kernels_backward.py", "program_forward.py", "program_backward.py"} <= set(
                os.listdir(out))
    prog = (out / "program_forward.py").read_text()
    assert "def run(ctx, env, K, LAUNCH, REF, NODES):" in prog and "LAUNCH[" in prog
    compile(prog, "program_forward.py", "exec")
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


def _tiny_run(tmp_path):
    import numpy as np
    data = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 512, 4096).astype(np.uint32).tofile(data)
    out = tmp_path / "run"
    assert main(["run", LLAMA, "--train", "--preset", "tiny", "--data", str(data), "--steps",
                 "2", "--batch-size", "2", "--seq-len", "16", "--no-progress", "--out",
                 str(out)]) == 0
    return out


def test_generate_from_a_checkpoint_is_greedy_and_reproducible(tmp_path, capsys):
    out = _tiny_run(tmp_path)
    capsys.readouterr()
    args = ["run", LLAMA, "--generate", "--checkpoint", str(out), "--prompt", "a",
            "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args) == 0  # preset tiny comes from the checkpoint's meta.json
    first = capsys.readouterr()
    assert first.out.startswith("a") and "tokens/s" in first.err
    assert main(args) == 0
    assert capsys.readouterr().out == first.out
    # the static step (preallocated caches; eager here, a CUDA graph on CUDA) says so and
    # generates the same greedy text
    assert main(args + ["--static", "--device", "cpu"]) == 0
    static = capsys.readouterr()
    assert static.out == first.out and "static step without a CUDA graph" in static.err
    # --set without --preset applies on top of the checkpoint's preset (a longer max_seq
    # fits the same weights), not on top of the default-size model
    assert main(args + ["--set", "max_seq=256"]) == 0
    assert capsys.readouterr().out == first.out



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_generate_in_f16_decodes_the_f16_weights_greedily(tmp_path, capsys, backend):
    """--precision f16 (bf16 is the default on CUDA): the checkpoint's fp32 weights rounded
    to f16 once, matmuls in f16; the text is the greedy continuation the full forward of
    that program gives, token by token (dynamic and static steps)."""
    import lmc
    from lmc.passes.mixed_precision import low_precision_weights
    from lmc.runtime.data import get_tokenizer
    from lmc.runtime.module import LmcModel
    from lmc.runtime.train import latest_checkpoint, read_weights

    out = _tiny_run(tmp_path)
    capsys.readouterr()
    args = ["run", LLAMA, "--generate", "--checkpoint", str(out), "--prompt", "a",
            "--max-new-tokens", "5", "--temperature", "0", "--precision", "f16",
            "--backend", backend, "--device", "cpu"]
    assert main(args) == 0
    got = capsys.readouterr()
    assert ", f16, " in got.err
    assert main(args + ["--static"]) == 0
    assert capsys.readouterr().out == got.out
    m = lmc.load(LLAMA, "tiny")
    m.load_state_dict(read_weights(latest_checkpoint(str(out)), "--checkpoint"))
    low = LmcModel(low_precision_weights(m.graph, "f16")).eval()
    low.load_state_dict(m.state_dict())
    assert {p.dtype for p in low.parameters()} == {torch.float16}
    enc = get_tokenizer("cl100k_base")
    ids = enc.encode_ordinary("a")
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(low(torch.tensor([ids]))[0, -1].argmax()))
    assert got.out == enc.decode(ids) + "\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs bf16 kernels natively")
def test_bf16_on_the_interpreter_is_refused_before_anything_runs(tmp_path, capsys):
    """--backend triton --precision bf16 without CUDA: one line, exit 2, before a prompt is
    echoed or a run directory made (each kernel used to refuse it mid-stream)."""
    tiny = ["--preset", "tiny", "--set", "vocab=100352"]
    gen = ["run", LLAMA, "--generate", *tiny, "--prompt", "hi", "--backend", "triton",
           "--precision", "bf16"]
    out = tmp_path / "run"
    train = ["run", LLAMA, "--train", *tiny, "--steps", "1", "--backend", "triton",
             "--precision", "bf16", "--out", str(out), "--no-progress"]
    for args in (gen, train):
        assert main(args) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and "Triton's interpreter, which computes bf16" in cap.err
        assert "Traceback" not in cap.err
    assert not out.exists()

def test_generate_bad_input_is_one_line(tmp_path, capsys):
    out = _tiny_run(tmp_path)
    capsys.readouterr()
    cases = [
        (["--checkpoint", str(tmp_path / "nowhere")], "neither a run directory"),
        (["--checkpoint", str(out), "--preset", "tiny", "--set", "d=32"],
         "does not fit this model"),
        (["--preset", "tiny", "--prompt", "zzzzzzzz qqqq"], "outside the model's vocab"),
        (["--preset", "tiny", "--prompt", "a", "--max-new-tokens", "500"],
         "exceeds the model's max_seq"),
        (["--preset", "tiny", "--prompt", "a", "--top-p", "0"], "--top-p"),
    ]
    for extra, msg in cases:
        assert main(["run", LLAMA, "--generate", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("lmc: error:") or ": error:" in err[-1], err
        assert msg in err[-1], (extra, err)


def test_generate_says_what_differs_from_the_checkpoint_and_why_it_stopped(tmp_path, capsys,
                                                                            monkeypatch):
    """Another --tokenizer than the checkpoint's is noted (it was taken silently); a meta.json
    naming an unknown tokenizer says where the name came from; a stop at the end of text
    is said; prompt + new tokens may reach max_seq + 1 (the last is never fed back)."""
    from lmc.runtime.decoder import Decoder
    out = _tiny_run(tmp_path)
    capsys.readouterr()
    args = ["run", LLAMA, "--generate", "--checkpoint", str(out), "--prompt", "ab",
            "--max-new-tokens", "3", "--temperature", "0"]
    assert main(args + ["--tokenizer", "bytes"]) == 0
    assert "trained with --tokenizer cl100k_base; generating with bytes" in \
        capsys.readouterr().err
    real = Decoder.generate

    def ends(self, *a, **k):
        yield from list(real(self, *a, **k))[:1]
        yield 256                                   # bytes: the end of text
    monkeypatch.setattr(Decoder, "generate", ends)
    assert main(args + ["--tokenizer", "bytes"]) == 0
    assert "lmc: 1 tokens (then the end of text)" in capsys.readouterr().err
    monkeypatch.setattr(Decoder, "generate", real)
    # the tiny preset's max_seq is 128: a 2-token prompt and 127 new tokens fit
    for static in ("--no-static", "--static"):
        assert main(args[:-4] + ["--max-new-tokens", "127", "--tokenizer", "bytes",
                                 static]) == 0
        assert "tokens/s" in capsys.readouterr().err
    assert main(args[:-4] + ["--max-new-tokens", "128", "--tokenizer", "bytes"]) == 2
    assert "exceeds the model's max_seq 128 + 1" in capsys.readouterr().err
    ck = sorted(p for p in os.listdir(out) if p.startswith("ckpt-"))[-1]
    meta = out / ck / "meta.json"
    meta.write_text(meta.read_text().replace('"cl100k_base"', '"nope"'))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown tokenizer 'nope'" in err and "meta.json names" in err, err


def test_compile_mode_decode_reports_the_state(tmp_path, capsys):
    assert main(["compile", LLAMA, "--preset", "tiny", "--mode", "decode", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    d = s["decode"]
    assert len(d["states"]) == 4 and d["bytes_per_token"] == 2 * 2 * 64 * 4
    assert d["bytes_at_max_seq"] == d["bytes_per_token"] * 128
    # the static step's cache writes, stored by the kernels computing k (rope) and v (qkv)
    writes = [f for f in s["fusions"] if f["pass"] == "fuse_cache_writes"]
    assert [(f["status"], f["graph"]) for f in writes] == [("fused", "decode static")] * 4
    # the static step's launches, as benchmarks/step_ops.py counts the Decoder's (the tiny
    # llama: 12 fused ops + the embedding + decode.pos's kernel), and its weight bytes at
    # batch 1
    st = d["static_step"]
    assert (st["fused"], st["torch"], st["positions"]) == (12, 1, 1)
    assert st["weight_bytes_batch1_bf16"] > 0
    assert main(["compile", LLAMA, "--preset", "tiny", "--mode", "decode", "-o",
                 str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "B per token of context" in out
    assert ("static step on the triton backend: 12 fused ops + 1 torch op + 1 position-table "
            "launch;") in out
    # --disable applies to the step as the Decoder's model.disable does
    assert main(["compile", LLAMA, "--preset", "tiny", "--mode", "decode", "--json",
                 "--disable", "fuse_pointwise"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["decode"]["static_step"]["torch"] > st["torch"]
    # a pipeline pass too (it applies before the step is derived; fuse() takes fusion passes)
    assert main(["compile", LLAMA, "--preset", "tiny", "--mode", "decode", "--json",
                 "--disable", "cse"]) == 0
    assert json.loads(capsys.readouterr().out)["decode"]["static_step"]["fused"] > 0
    assert (tmp_path / "o" / "ir_decode.txt").exists()
    # the step's kernels and wrapper, as the triton backend's Decoder compiles them
    import lmc
    from lmc.runtime.decoder import Decoder
    m = lmc.load(LLAMA, preset="tiny", backend="triton")
    for name, static in (("decode", False), ("decode_static", True)):
        prog = Decoder(m, static=static).program
        assert (tmp_path / "o" / f"program_{name}.py").read_text() == prog.program_source
        assert (tmp_path / "o" / f"kernels_{name}.py").read_text() == prog.source
    assert "@triton.jit" in prog.source and "decode_attention" in prog.program_source


def test_usage_and_os_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    # argparse's usage errors: one line, exit 2
    for argv in (["compile", LLAMA, "--mode", "bogus"], ["compile"],
                 ["run", LLAMA, "--train", "--seed", "-5"],
                 ["verify", LLAMA, "--seed", str(2 ** 70)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ": error: " in err[0] and "--help" in err[0], (argv, err)
    # a path the machine refuses: one line naming it, no temp file left beside it
    out = tmp_path / "o"
    (out / "summary.json").mkdir(parents=True)
    assert main(["compile", LLAMA, "--preset", "tiny", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds summary.json, not written by lmc compile" in err[0], err
    assert main(["compile", LLAMA, "--preset", "tiny", "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lmc: error: {out / 'summary.json'}: Is a directory"], err
    assert not [p for p in os.listdir(out) if ".tmp." in p]
    (tmp_path / "g.svg").mkdir()
    assert main(["graph", LLAMA, "--preset", "tiny", "-o", str(tmp_path / "g.svg")]) == 2
    assert capsys.readouterr().err.strip().endswith("g.svg: is a directory")
    # --import of something that is not a Python file; --disable of a pass that is not optional
    assert main(["compile", LLAMA, "--import", LLAMA]) == 2
    assert "--import takes a Python file" in capsys.readouterr().err
    assert main(["compile", LLAMA, "--preset", "tiny", "--disable", "inline"]) == 2
    assert "inlining is not optional" in capsys.readouterr().err
    # a flag's value, not a line of the model file
    for argv in (["compile", LLAMA, "--disable", "fuse_decode_attention"],
                 ["bench", LLAMA, "--quick", "--disable", "cse"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmc: error: "), err


def test_generate_refuses_damaged_checkpoint_files(tmp_path, capsys):
    out = _tiny_run(tmp_path)
    ck = out / open(out / "latest").read().strip()
    meta = (ck / "meta.json").read_bytes()
    capsys.readouterr()
    for text, msg in (("{bad", "meta.json: unreadable"), ("[1, 2]", "not an lmc checkpoint"),
                      ('{"overrides": [3]}', "not an lmc checkpoint"),
                      ('{"preset": ["tiny"]}', "not an lmc checkpoint")):
        (ck / "meta.json").write_text(text)
        assert main(["run", LLAMA, "--generate", "--checkpoint", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("lmc: error: --checkpoint") and msg in err[-1], err
    (ck / "meta.json").write_bytes(meta)
    latest = (out / "latest").read_bytes()
    (out / "latest").write_text("ckpt-0000999\n")
    assert main(["run", LLAMA, "--generate", "--checkpoint", str(out)]) == 2
    assert "'latest' names" in capsys.readouterr().err
    (out / "latest").write_bytes(b"\xff\xfe")
    assert main(["run", LLAMA, "--generate", "--checkpoint", str(out)]) == 2
    assert "latest: unreadable" in capsys.readouterr().err
    (out / "latest").write_bytes(latest)
    assert main(["run", LLAMA, "--generate", "--checkpoint", str(out), "--max-new-tokens",
                 "2", "--temperature", "nan"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert main(["run", LLAMA, "--generate", "--resume", str(out)]) == 2
    assert "--generate reads a checkpoint's weights with --checkpoint DIR" in \
        capsys.readouterr().err


def test_bench_fails_when_lmc_itself_fails(tmp_path, capsys, monkeypatch):
    from lmc import bench
    result = {"train": {"configs": [{"name": "lmc", "error": "LmcError: boom"},
                                    {"name": "oracle eager", "tokens_per_s": 1.0}]}}
    monkeypatch.setattr(bench, "run", lambda args, command: result)
    monkeypatch.setattr(bench, "table", lambda r: "table")
    assert main(["bench", LLAMA, "--quick", "--out", str(tmp_path)]) == 1
    assert "the lmc configuration failed (train): LmcError: boom" in capsys.readouterr().err
    result["train"]["configs"][0] = {"name": "lmc", "tokens_per_s": 1.0}
    assert main(["bench", LLAMA, "--quick", "--out", str(tmp_path)]) == 0


def test_load_refuses_what_is_not_a_model_path():
    import pathlib

    import lmc
    from lmc.errors import LmcError
    for bad, msg in ((3, "got int"), (None, "got NoneType"),
                     ("name: x\nconfig: {}\n", "YAML text?")):
        with pytest.raises(LmcError, match=msg):
            lmc.load(bad)
    with pytest.raises(LmcError, match="preset must be a name"):
        lmc.load(LLAMA, preset=["tiny"])
    assert lmc.load(pathlib.Path(LLAMA), preset="tiny") is not None


def test_a_model_called_with_float_ids_says_so():
    import lmc
    from lmc.errors import LmcError
    m = lmc.load(LLAMA, preset="tiny")
    with pytest.raises(LmcError, match="input 'ids' holds i64 values, got a float32 tensor"):
        m(torch.zeros(1, 4))
    assert m(torch.zeros(1, 4, dtype=torch.int32)).shape == (1, 4, 512)


def test_a_model_call_checks_its_inputs_and_parameters():
    """Keyword inputs that are not the graph's were ignored (or, named like a parameter,
    replaced its weights); a parameter replaced with another shape or cast by .half() ran
    (broadcast, or failed deep in a matmul)."""
    import lmc
    from lmc.errors import LmcError
    ids = torch.randint(0, 512, (1, 4))
    m = lmc.load(LLAMA, preset="tiny")
    want = m(ids)
    for kwargs, msg in (({"targets": ids}, "'targets' is not an input of the model"),
                        ({"embed": torch.zeros(512, 64)}, "'embed' is a parameter, not an input")):
        with pytest.raises(LmcError, match=msg):
            m(ids, **kwargs)
    with pytest.raises(LmcError, match="input 'ids' must be a torch tensor, got list"):
        m([[1, 2]])
    with pytest.raises(LmcError, match=r"parameter 'lm_head' is float32 \[64, 100\], the "
                                       r"model's is f32 \[64, 512\]"):
        m.lm_head = torch.nn.Parameter(torch.zeros(64, 100))
        m(ids)
    m = lmc.load(LLAMA, preset="tiny")
    with pytest.raises(LmcError, match="parameter 'embed' is float16"):
        m.half()(ids)
    assert m.float()(ids).shape == want.shape                  # cast back (values rounded)
    # the torch backend in fp64 is verify's tie-break oracle: allowed
    assert m.double()(ids).dtype == torch.float64


@pytest.mark.parametrize("logits,want", [
    ("- out = rmsnorm(x, name='norm') @ lm_head\n  outputs: [out]",
     "needs a 'logits' output (outputs: out)"),
    ("- logits = sum(rmsnorm(x, name='norm') @ lm_head, -1, keepdim=False)\n"
     "  outputs: [logits]", "needs logits shaped [B, T, vocab] in a float dtype")])
def test_logits_that_are_not_scores_per_token_are_one_line(tmp_path, capsys, logits, want):
    """run --train, run --generate and verify read the logits' vocab: a model without
    logits of [B, T, vocab] is one error line (with the logits' line), not a traceback."""
    src = open(LLAMA).read()
    old = "- logits = rmsnorm(x, name='norm') @ lm_head\n  outputs: [logits]"
    assert old in src
    path = tmp_path / "bad.yaml"
    path.write_text(src.replace(old, logits))
    data = tmp_path / "c.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    for purpose, argv in (
            ("training", ["run", str(path), "--train", "--preset", "tiny", "--set",
                          "vocab=100352", "--steps", "1", "--batch-size", "2", "--seq-len",
                          "8", "--data", str(data), "--out", str(tmp_path / "r"),
                          "--no-progress"]),
            ("lmc run --generate", ["run", str(path), "--generate", "--preset", "tiny",
                                    "--prompt", "x", "--max-new-tokens", "1"]),
            ("lmc verify", ["verify", str(path)])):
        capsys.readouterr()
        assert main(argv) == 2, purpose
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"error: {purpose} {want}" in err[0], (purpose, err)
        if "shaped" in want:
            assert err[0].startswith(f"{path}:"), err       # the line of the logits
    assert not (tmp_path / "r").exists()


def test_a_cache_variable_naming_a_file_is_named_in_the_error(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    monkeypatch.setenv("LMC_CACHE", str(afile))
    data = tmp_path / "c.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    assert main(["run", LLAMA, "--train", "--preset", "tiny", "--set", "vocab=100352",
                 "--steps", "1", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"(a path under LMC_CACHE={afile})"), err
    assert afile.read_text() == "mine"


def test_compile_takes_print_ir_or_json_not_both(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", LLAMA, "--print-ir", "--json"])
    assert e.value.code == 2
    assert "--json: not allowed with argument --print-ir" in capsys.readouterr().err


def test_compile_out_replaces_its_own_files_only_and_writes_nothing_on_failure(tmp_path,
                                                                                capsys):
    """-o DIR: a second compile replaces the first's files and removes those it does not
    write (a decode compile's kernels), so DIR describes one compile; a user's file of the
    same name is refused unless --overwrite, other files are left alone; a compile that
    fails writes nothing."""
    out = tmp_path / "o"
    assert main(["compile", LLAMA, "--preset", "tiny", "--mode", "decode", "-o", str(out)]) == 0
    assert (out / "kernels_decode.py").exists() and (out / "ir_decode.txt").exists()
    (out / "notes.md").write_text("mine\n")
    assert main(["compile", LLAMA, "--preset", "tiny", "-o", str(out)]) == 0
    names = set(os.listdir(out))
    assert "kernels_decode.py" not in names and "ir_decode.txt" not in names, names
    assert {"kernels_forward.py", "summary.json", "notes.md"} <= names
    assert json.loads((out / "summary.json").read_text())["model"] == "llama"
    user = tmp_path / "u"
    user.mkdir()
    (user / "ir.txt").write_text("my notes\n")
    capsys.readouterr()
    assert main(["compile", LLAMA, "--preset", "tiny", "-o", str(user)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds ir.txt, not written by lmc compile" in err[0] and \
        "--overwrite" in err[0], err
    assert os.listdir(user) == ["ir.txt"] and (user / "ir.txt").read_text() == "my notes\n"
    assert main(["compile", LLAMA, "--preset", "tiny", "-o", str(user), "--overwrite"]) == 0
    assert (user / "ir.txt").read_text().startswith("graph llama")
    # a decode step that cannot be derived: an error, and no directory
    bad = tmp_path / "future.yaml"
    bad.write_text(open(LLAMA).read().replace(
        "    - logits = ", "    - x = x + concat([x[:, 1:], x[:, :1]], 1)\n    - logits = ", 1))
    assert main(["compile", str(bad), "--preset", "tiny", "--mode", "decode", "-o",
                 str(tmp_path / "f")]) == 2
    assert "cannot derive the decode step" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_usage_errors_name_the_subcommand_and_ignored_flags_are_said(tmp_path, capsys):
    for argv, sub in ((["run", LLAMA, "--stepz", "3"], "run"),
                      (["verify", LLAMA, "--only", "x"], "verify"),
                      (["compile", LLAMA, "--precision", "bf16"], "compile")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lmc {sub}: error: ") and \
            err[0].endswith(f"(see lmc {sub} --help)"), err
    # a training flag under --generate, generation flags (one abbreviated) under --train
    assert main(["run", LLAMA, "--generate", "--preset", "tiny", "--tokenizer", "bytes",
                 "--steps", "3", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert "lmc: note: --steps is for --train: ignored" in capsys.readouterr().err
    import sysconfig
    data = os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
    assert main(["run", LLAMA, "--train", "--preset", "tiny", "--tokenizer", "bytes",
                 "--data", data, "--steps", "2", "--warmup", "5", "--batch-size", "2",
                 "--seq-len", "8", "--no-progress", "--out", str(tmp_path / "r"),
                 "--prompt", "hi", "--temp", "0"]) == 0
    err = capsys.readouterr().err
    assert "lmc: note: --prompt, --temperature are for --generate: ignored" in err, err
    assert "lmc: note: --warmup 5 is capped at a tenth of --steps: warming up over 1 " \
           "steps" in err, err


def test_compile_train_mode_prints_and_writes_the_training_graph(tmp_path, capsys):
    assert main(["compile", LLAMA, "--preset", "tiny", "--mode", "train", "--print-ir"]) == 0
    ir = capsys.readouterr().out
    assert "targets" in ir and "loss" in ir and "cast" in ir
    assert main(["compile", LLAMA, "--preset", "tiny", "--mode", "train", "-o",
                 str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "ir_train.txt").read_text() == ir
