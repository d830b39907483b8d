"""`lmc bench --quick` on CPU: the harness runs every configuration and writes a bench.json
of the documented schema, a report and charts (CPU figures, labelled as such)."""
import json
import os

import pytest
from conftest import ZOO

from lmc.cli import main
from lmc.codegen.program import fusion_names

LLAMA = os.path.join(ZOO, "llama.yaml")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def test_bench_quick_writes_a_valid_bench_json(tmp_path, capsys):
    out = tmp_path / "b"
    # --quick's baselines: eager only (Dynamo traces the oracle for minutes on a CPU)
    assert main(["bench", LLAMA, "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train  B=2 T=16" in text and "decode" in text and "cpu perf_counter" in text
    r = json.loads((out / "bench.json").read_text())
    assert r["schema"] == 1 and r["model"] == "llama" and r["preset"] == "tiny"
    assert r["command"].startswith("lmc bench ") and "--quick" in r["command"]
    for k in ("device", "timing", "torch", "triton"):
        assert r["machine"][k]
    assert r["peaks"]["copy_GBps"] > 0 and r["peaks"]["matmul_TFLOPs"] > 0
    names = [c["name"] for c in r["train"]["configs"]]
    # llama: of the pattern passes only fuse_rope_attention fires, so only it is timed off
    assert names == ["lmc"] + [f"lmc -{p}" for p in fusion_names()
                               if p not in ("fuse_moe_gating", "fuse_linear_attention",
                                            "split_gated_projection")] \
        + ["oracle eager"]
    for c in r["train"]["configs"]:
        assert "error" not in c, c
        assert c["tokens_per_s"] > 0 and c["median_step_s"] > 0 and c["steps"] == 1
    ks = r["train"]["kernels"]
    assert ks and {k["kind"] for k in ks} == {"reduction", "pointwise", "matmul",
                                              "rope_attention", "rope_attention_bwd"}
    assert {k["graph"] for k in ks} == {"forward", "backward"}
    assert 0 < sum(k["share"] for k in ks) <= 1.0
    assert all(k["ops"] and k["launches"] >= 1 and k["bytes"] > 0 for k in ks)
    assert all(k["TFLOPs"] > 0 for k in ks if k["kind"] == "matmul")
    dec = r["decode"]["configs"]
    # lmc, then lmc with each fusion pass that fused something in its step left out (batch
    # 1: its contribution to a token's latency), then the oracle
    left_out = [c["name"] for c in dec if c["name"].startswith("lmc -")]
    assert [(c["name"], c["batch"]) for c in dec] == [("lmc", 1), ("lmc", 2)] + \
        [(n, 1) for n in left_out] + [("oracle eager", 1), ("oracle eager", 2)]
    assert "lmc -fuse_matmul" in left_out and "lmc -fuse_pointwise" in left_out, left_out
    assert all("error" not in c and c["tokens_per_s"] > 0 for c in dec)
    for c in dec:
        if c["name"].startswith("lmc -"):        # more torch ops than lmc's step
            assert c["disable"] == [c["name"][5:]] and \
                c["ops_per_step"]["torch"] > dec[0]["ops_per_step"]["torch"], c
    # what one step runs: lmc's fused ops and the torch ops between them, the oracle's ops
    lmc_ops = dec[0]["ops_per_step"]
    ref_ops = next(c for c in dec if c["name"] == "oracle eager")["ops_per_step"]
    assert lmc_ops["fused"] > 0 and ref_ops["fused"] == 0
    assert lmc_ops["fused"] + lmc_ops["torch"] < ref_ops["torch"] / 2, (lmc_ops, ref_ops)
    assert f"{lmc_ops['fused']} + {lmc_ops['torch']}" in text
    for f in ("report.md", "bench_train.png", "bench_kernels.png", "bench_decode.png"):
        assert (out / f).stat().st_size > 0


def test_a_fusion_pass_that_fused_nothing_is_not_timed_again():
    from lmc.bench import worth_timing

    cfg = {"name": "lmc -fuse_matmul_prologues", "pass": "fuse_matmul_prologues"}
    assert worth_timing(cfg, None)                      # lmc has not run (or failed)
    assert worth_timing(cfg, {"fuse_matmul_prologues", "fuse_matmul"})
    assert not worth_timing(cfg, {"fuse_matmul"})
    # every fusion pass records its sites; baselines are always timed
    assert not worth_timing({"name": "lmc -fuse_pointwise", "pass": "fuse_pointwise"}, set())
    assert worth_timing({"name": "oracle eager"}, set())


def test_bench_rejects_bad_options(tmp_path, capsys):
    assert main(["bench", LLAMA, "--quick", "--disable", "nope", "--out", str(tmp_path)]) == 2
    assert "not a fusion pass" in capsys.readouterr().err
    assert main(["bench", LLAMA, "--quick", "--compare", "jax", "--out", str(tmp_path)]) == 2
    assert "--compare" in capsys.readouterr().err
    for extra, msg in ((["--warmup", "-1"], "--warmup must be >= 0"),
                       (["--decode-tokens", "0"], "--decode-tokens must be >= 1"),
                       (["--decode-batch", "0"], "--decode-batch must be >= 1"),
                       (["--steps", "0"], "--steps must be >= 1")):
        assert main(["bench", LLAMA, "--quick", *extra, "--out", str(tmp_path)]) == 2, extra
        assert msg in capsys.readouterr().err, extra
    # an --out that is a file is refused before minutes of measuring, and left as it was
    f = tmp_path / "afile"
    f.write_text("mine")
    assert main(["bench", LLAMA, "--quick", "--out", str(f)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert f.read_text() == "mine"
    # sizes past the model's max_seq (the tiny preset's 128), before measuring anything
    out = tmp_path / "b"
    for extra, msg in ((["--quick", "--seq-len", "1000"],
                        "--seq-len 1000 exceeds the model's max_seq"),
                       (["--preset", "tiny", "--mode", "decode", "--decode-tokens", "500"],
                        "--decode-tokens 500 after the 16-token prompt exceeds")):
        assert main(["bench", LLAMA, *extra, "--out", str(out)]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not (out / "bench.json").exists()


def test_train_step_runs_the_compiled_module_it_is_given():
    """The torch.compile row's step calls the compiled module: an nn.Module with no len()
    (LmcModel, and what torch.compile returns for it) was once tested for truth, which
    raised, so that baseline always failed."""
    import torch

    import lmc
    from lmc.bench import _batches, _train_step
    from lmc.passes.loss import with_loss
    from lmc.runtime.module import LmcModel
    model = lmc.load(LLAMA, preset="tiny")
    m = LmcModel(with_loss(model.graph), seed=0, grad_outputs=["loss"])
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __len__(self):
            raise TypeError("no len()")

        def forward(self, *a, **k):
            calls.append(1)
            return self.inner(*a, **k)
    step = _train_step(m, _batches(512, 2, 8, "cpu", n=2), Counting(m))
    step(0)
    step(1)
    assert len(calls) == 2


@pytest.mark.slow
def test_bench_quick_with_the_torch_compile_baselines(tmp_path, capsys):
    """The oracle under torch.compile, training and decode (about 3 minutes on 2 CPU cores,
    most of it Dynamo tracing the decoder): every row runs."""
    out = tmp_path / "b"
    assert main(["bench", LLAMA, "--quick", "--compare", "eager,compile", "--out",
                 str(out)]) == 0
    r = json.loads((out / "bench.json").read_text())
    rows = r["train"]["configs"] + r["decode"]["configs"]
    assert [c["name"] for c in rows].count("oracle torch.compile") == 3
    assert all("error" not in c and c["tokens_per_s"] > 0 for c in rows), rows


def test_decode_runs_in_the_given_precision(tmp_path, capsys, monkeypatch):
    """--precision applies to decode too (it used to run the fp32 graph whatever the flag,
    while bench.json said bf16): the weights stored in f16, every config on that program."""
    from lmc.runtime import module

    seen = []
    real = module.LmcModel.__init__

    def spy(self, graph, *a, **k):
        seen.append({p.type.dtype.value for p in graph.params})
        real(self, graph, *a, **k)
    monkeypatch.setattr(module.LmcModel, "__init__", spy)
    out = tmp_path / "b"
    assert main(["bench", LLAMA, "--quick", "--mode", "decode", "--precision", "f16",
                 "--out", str(out)]) == 0
    r = json.loads((out / "bench.json").read_text())
    assert r["precision"] == "f16"
    assert all("error" not in c and c["tokens_per_s"] > 0 for c in r["decode"]["configs"])
    assert len(seen) == len(r["decode"]["configs"]) >= 4 and all(s == {"f16"} for s in seen), seen


def test_an_earlier_run_is_kept_unless_overwrite_and_decode_honours_disable(tmp_path, capsys):
    """An --out holding a run is refused before measuring (nothing touched); --overwrite
    replaces it, removing an earlier chart this run does not draw and nothing else. --disable
    applies to lmc's decode step too (it used to be silently ignored there)."""
    import lmc
    from lmc.bench import step_ops
    from lmc.runtime.decoder import Decoder

    out = tmp_path / "b"
    out.mkdir()
    (out / "bench.json").write_text("earlier")
    (out / "bench_train.png").write_text("earlier chart")
    (out / "notes.txt").write_text("mine")
    args = ["bench", LLAMA, "--quick", "--mode", "decode", "--compare", "none",
            "--disable", "fuse_matmul", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an earlier run (bench.json)" in err[0] \
        and "--overwrite" in err[0], err
    assert (out / "bench.json").read_text() == "earlier"
    assert main(args + ["--overwrite"]) == 0
    r = json.loads((out / "bench.json").read_text())
    assert r["complete"] and r["disable"] == ["fuse_matmul"] and r["compare"] == []
    assert r["lmc"]["version"] and r["machine"]["torch_threads"] >= 1
    assert not (out / "bench_train.png").exists() and (out / "bench_decode.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    rows = [c for c in r["decode"]["configs"] if c["name"] == "lmc"]
    assert [c["batch"] for c in rows] == [1, 2]
    assert all("fuse_matmul" in c["disable"] for c in r["decode"]["configs"])
    m = lmc.load(LLAMA, preset="tiny", backend="triton").eval()
    full = step_ops(Decoder(m, backend="triton").graph)
    m.disable = ("fuse_matmul",)
    without = step_ops(Decoder(m, backend="triton").graph)
    assert without != full
    assert all(c["disable"] == ["fuse_matmul"] and
               {k: c["ops_per_step"][k] for k in without} == without for c in rows), rows
    assert "lmc (-fuse_matmul)" in capsys.readouterr().out


def test_bf16_on_a_cpu_is_refused_before_measuring(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", LLAMA, "--quick", "--precision", "bf16", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision bf16 needs a GPU" in err[0], err
    assert not (out / "bench.json").exists()


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    """bench.json is rewritten after each configuration (a phase under a time limit keeps what
    it measured): cut during the second decode row, the first is there, marked incomplete."""
    from lmc import bench

    real, calls = bench._decode_times, []

    def cut(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(bench, "_decode_times", cut)
    out = tmp_path / "b"
    assert main(["bench", LLAMA, "--quick", "--mode", "decode", "--out", str(out)]) != 0
    r = json.loads((out / "bench.json").read_text())
    assert r["complete"] is False
    assert [(c["name"], c["batch"]) for c in r["decode"]["configs"]] == [("lmc", 1)]
    assert r["decode"]["configs"][0]["tokens_per_s"] > 0
    assert "bench: decode lmc B=1: " in capsys.readouterr().err


def test_moe_kernel_flops_count_the_routed_tokens_only():
    """An MoE kernel's body is the dense oracle form; its flops count k of E experts per
    token (blues01 tiny: E=4, k=2), the router in full."""
    import lmc
    from lmc.bench import kernel_flops
    from lmc.ir.ops import Op
    from lmc.ops.reference import RefCtx
    from lmc.passes.loss import with_loss
    from lmc.runtime.module import LmcModel

    base = lmc.load(os.path.join(ZOO, "blues01.yaml"), preset="tiny")
    m = LmcModel(with_loss(base.graph), grad_outputs=["loss"], backend="triton")
    fwd = m.program().forward_exec.graph
    moe = next(n for n in fwd.nodes if n.op is Op.FUSED and n.attrs["kind"] == "moe_layer")
    opts = moe.attrs["body"].meta["options"]
    assert (opts["E"], opts["k"]) == (4, 2)
    ctx = RefCtx(dims={"B": 2, "T": 8})
    d = 64
    N = 16
    router = 2 * N * d * opts["E"]
    experts = 3 * 2 * N * d * d * opts["k"]     # gate, up and down per chosen expert
    assert kernel_flops(moe, ctx) == router + experts
