"""On a GPU (marked `gpu`, skipped without CUDA; run with `pytest -m gpu`): the generated
kernels compiled natively, not interpreted. fp32 programs equal the oracle; the bf16
program (mixed-precision pass) is checked against the fp32 oracle, since the interpreter
cannot run bf16 at all."""
import os

import pytest
import torch
from conftest import ZOO, decode_worst

import lmc
from lmc.passes import run_pipeline
from lmc.passes.loss import with_loss
from lmc.passes.mixed_precision import mixed_precision
from lmc.runtime.executor import run_graph
from lmc.runtime.module import LmcModel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
LLAMA = os.path.join(ZOO, "llama.yaml")


@pytest.fixture(autouse=True)
def _no_tf32(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 oracle is ieee fp32


def _graph(preset, precision="f32", **sets):
    g = lmc.load(LLAMA, preset=preset, **sets).graph
    return run_pipeline(with_loss(mixed_precision(g, precision)))


def _step(graph, backend, ids, targets, seed=5):
    m = LmcModel(graph, seed=seed, backend=backend).cuda()
    out = m(ids, targets=targets)
    (out["loss"] + (out["logits"].float() * 1e-3).square().mean()).backward()
    return m, out, {k: p.grad for k, p in m.named_parameters()}


def _batch(vocab, B=4, T=67):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, vocab, (B, T), generator=g).cuda(),
            torch.randint(0, vocab, (B, T), generator=g).cuda())


def _max_rel(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max())
               for k in b)

def _decode_case(B, T):
    """The tiny llama on the triton backend, token ids [B, T] and the oracle's full-forward
    logits for them (what a decode must reproduce)."""
    m = lmc.load(LLAMA, preset="tiny", backend="triton", seed=8).eval().cuda()
    oracle = lmc.load(LLAMA, preset="tiny", seed=8).eval().cuda()
    ids = torch.randint(0, m.config["vocab"], (B, T),
                        generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        full = oracle(ids)
    return m, ids, full["logits"] if isinstance(full, dict) else full




def test_fp32_forward_and_gradients_equal_the_oracle():
    g = _graph("small")
    ids, targets = _batch(100352)
    _, ot, gt = _step(g, "triton", ids, targets)
    _, oo, go = _step(g, "torch", ids, targets)
    assert abs(ot["loss"].item() - oo["loss"].item()) / oo["loss"].item() < 1e-5
    assert _max_rel(gt, go) < 1e-4


def test_every_kernel_matches_its_body_on_the_gpu():
    g = _graph("small")
    m = LmcModel(g, seed=5, backend="triton").cuda()
    prog = m.program()
    errs = []

    def wrap(program):
        def make(go):
            def launch(kernel, xs, outs, node, ctx):
                go(kernel, xs, outs, node, ctx)
                body = node.attrs["body"]
                names = [n.attrs["name"] for n in body.nodes if n.op.value == "input"]
                want = run_graph(body, dict(zip(names, xs)), ctx)
                for o, w in zip(outs, want.values()):
                    if w.is_floating_point():
                        scale = max(1.0, float(w.abs().max()))
                        errs.append((float((o - w).abs().max()) / scale,
                                     node.attrs["kernel"]))
            return launch
        program._launch = {k: make(go) for k, go in program._launch.items()}
    wrap(prog.forward_exec)
    wrap(prog.backward_exec)
    ids, targets = _batch(100352, 2, 129)
    out = m(ids, targets=targets)
    out["loss"].backward()
    worst = max(errs)
    assert worst[0] < 1e-5, worst


def test_bf16_program_is_close_to_the_fp32_oracle():
    ids, targets = _batch(100352)
    _, o32, g32 = _step(_graph("small"), "torch", ids, targets)
    _, o16, g16 = _step(_graph("small", "bf16"), "triton", ids, targets)
    eps = 2 ** -7
    assert abs(o16["loss"].item() - o32["loss"].item()) / o32["loss"].item() < eps / 4
    assert all(g.dtype == torch.float32 for g in g16.values())
    assert _max_rel(g16, g32) < 4 * eps


def test_training_steps_match_the_torch_backend():
    g = _graph("small")
    losses = {}
    for backend in ("torch", "triton"):
        m = LmcModel(g, seed=7, backend=backend).cuda()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        losses[backend] = []
        for i in range(3):
            ids, targets = _batch(100352, 4, 64 + i)
            loss = m(ids, targets=targets)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
    for a, b in zip(losses["torch"], losses["triton"]):
        assert abs(a - b) / abs(a) < 1e-4


@pytest.mark.parametrize("split", [2, 4])
def test_split_k_decode_on_the_gpu_equals_forward_across_replays(split, monkeypatch):
    """Split-K as the GPU runs it (concurrent programs meeting through the atomic counter, the
    last one reducing): every launch that may split is made to take SPLIT_K = split (empty
    slices included, d = 64 in the tiny preset), in a static decode step captured in a CUDA
    graph and replayed; equal to the full forward at every position, and the counters are
    back to zero after."""
    from lmc.codegen import matmul
    from lmc.runtime.decoder import Decoder

    real = matmul.prune_configs

    def forced(configs, nargs, **kw):
        if int(nargs.get("SPLIT_MAX", 1)) > 1:
            return [c for c in configs if c.kwargs.get("SPLIT_K") == split
                    and c.kwargs["BLOCK_K"] == 64]
        return real(configs, nargs, **kw)
    monkeypatch.setattr(matmul, "prune_configs", forced)
    monkeypatch.setattr(matmul, "_TUNED", {})
    m, ids, full = _decode_case(2, 13)
    dec = Decoder(m, "triton", static=True, max_len=16)
    for k in (1, 5):
        err = decode_worst(dec, ids, full, k)
        assert dec.cuda_graph, dec.cuda_graph_off
        assert err < 1e-4, (k, err)
    picks = matmul.tuned_configs()
    assert picks and any(p["SPLIT_K"] == split for p in picks if "SPLIT_K" in p), picks
    torch.cuda.synchronize()
    for _, counters in matmul._SPLIT_BUFFERS.values():
        assert not counters.any()


def test_autotuned_kernels_compile_their_configs_in_parallel(tmp_path, monkeypatch):
    """codegen/autotune.py natively: with empty Triton caches, a tiny llama training step's
    autotuned kernels (generated matmuls, flash attention) meet each new key by compiling its
    configs together on the pool; every one of those lands in the kernel's in-memory cache
    before it is timed, and the step equals the torch backend's."""
    from lmc.codegen import autotune as at

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("LMC_AUTOTUNE_CACHE", "0")
    monkeypatch.setenv("LMC_COMPILE_THREADS", "8")
    monkeypatch.setenv("LMC_WARM", "0")     # the warm pass would compile them first
    monkeypatch.setattr(at, "_POOL", None)
    warmed = []
    real = at.precompile

    def precompile(tuner, configs, args, kwargs):
        real(tuner, configs, args, kwargs)
        # every config is now in the kernel's cache: warming it again compiles nothing
        fn = tuner.fn
        compile_ = fn.compile          # Triton's compiler, bound per JIT function

        def again(*a, **k):
            pytest.fail(f"{fn.__name__}: a config compiled again after the parallel warm-up")
        fn.compile = again
        try:
            kw = {k: v for k, v in kwargs.items() if k != "warmup"}
            for c in configs:
                fn.warmup(*args, **kw, **c.all_kwargs())
        finally:
            fn.compile = compile_
        warmed.append(len(configs))
    monkeypatch.setattr(at, "precompile", precompile)
    g = _graph("tiny")
    ids, targets = _batch(512, 2, 37)
    _, ot, gt = _step(g, "triton", ids, targets)
    _, oo, go = _step(g, "torch", ids, targets)
    assert warmed and all(n > 1 for n in warmed), warmed
    assert abs(ot["loss"].item() - oo["loss"].item()) / oo["loss"].item() < 1e-5
    assert _max_rel(gt, go) < 1e-4


def test_warm_pass_leaves_nothing_to_compile_at_a_launch(tmp_path, monkeypatch):
    """codegen/warm.py natively: with empty Triton caches, the warm pass before a tiny llama
    training step (forward and backward in one pass) and before a static decoder's prefill
    and first step compiles every kernel (and autotuner config) those runs launch: Triton
    meets no kernel to compile outside the passes; the step equals the torch backend's and
    the decode equals the forward across CUDA-graph replays."""
    import triton

    from lmc.codegen import autotune as at
    from lmc.codegen import warm
    from lmc.runtime.decoder import Decoder

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("LMC_AUTOTUNE_CACHE", "0")
    monkeypatch.setenv("LMC_COMPILE_THREADS", "8")
    monkeypatch.setattr(at, "_POOL", None)
    early, late = [], []

    def hook(*, fn, compile, **kw):     # Triton calls it before each compile
        (early if warm.active() is not None else late).append(
            f"{fn.name} {compile['constants']}")
        return False
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", hook)
    g = _graph("tiny")
    ids, targets = _batch(512, 2, 37)
    _, ot, gt = _step(g, "triton", ids, targets)
    assert early and not late, late
    _, oo, go = _step(g, "torch", ids, targets)
    assert abs(ot["loss"].item() - oo["loss"].item()) / oo["loss"].item() < 1e-5
    assert _max_rel(gt, go) < 1e-4
    early.clear()
    m, ids, full = _decode_case(2, 13)
    dec = Decoder(m, "triton", static=True, max_len=16)
    err = decode_worst(dec, ids, full, 5)
    assert dec.cuda_graph, dec.cuda_graph_off
    assert early and not late, late
    assert err < 1e-4


def test_dynamic_decode_does_not_retune_every_step():
    """The dynamic decoder's cache grows a slot a step: flash-decoding's autotuner is keyed on
    the slots' power of two (S_BUCKET), not on S, so 40 steps from a 3-token prompt (S from 3
    to 43: buckets 16, 32 and 64; the prefill's TQ is its own key) tune at most 4 keys, not
    41; decode = forward."""
    from lmc.codegen import attention
    from lmc.runtime.decoder import Decoder

    m, ids, full = _decode_case(1, 43)
    tuned = attention._TUNED.get("decode")
    before = set(tuned.cache) if tuned is not None else set()   # other tests' keys
    assert decode_worst(Decoder(m, "triton"), ids, full, 3) < 1e-4
    new = set(attention._TUNED["decode"].cache) - before
    assert len(new) <= 4, new


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_column_sums_walk_several_row_blocks_on_the_gpu(dtype):
    """fuse_column_sums' persistent kernel where each of its 8-per-SM programs walks several
    row blocks (B=8, T=1000, d=768: 4000 blocks of 2 rows), natively compiled: dx and the
    weight and bias gradients equal the fp32 oracle (bf16 inputs: within bf16 rounding)."""
    from passes.test_fuse_column_sums import _norm_backward, _vals

    from lmc.ops.reference import RefCtx
    from lmc.runtime.executor import bind_dims
    from lmc.runtime.triton_backend import TritonProgram

    d = 768
    vals32 = {k: v.cuda() for k, v in _vals((8, 1000), d, seed=2).items()}
    g32 = _norm_backward(d, bias=True)
    want = run_graph(g32, vals32, RefCtx(dims=bind_dims(g32, vals32)))
    g = _norm_backward(d, dtype=dtype, bias=True)
    vals = {k: v.to(torch.bfloat16) if dtype == "bf16" else v for k, v in vals32.items()}
    p = TritonProgram(g)
    got = p.run(vals, RefCtx(dims=bind_dims(g, vals)))
    assert [n.attrs["body"].meta.get("column_sums") for n in p.graph.nodes
            if n.op.value == "fused"] == [2]
    tol = 1e-5 if dtype == "f32" else 2 ** -6
    for k in want:
        scale = float(want[k].abs().max())
        assert float((got[k].float() - want[k]).abs().max()) / scale < tol, k


def test_cli_generate_on_cuda_decodes_bf16_weights_in_a_cuda_graph(capsys):
    """`lmc run --generate` on CUDA, as a user types it: bf16 weights by default (one
    rounding of the model's fp32 ones), the static step replayed as a CUDA graph on the
    triton backend, the same greedy text twice, and --precision f32 still available."""
    from lmc.cli import main

    args = ["run", LLAMA, "--generate", "--preset", "tiny", "--set", "vocab=100352",
            "--prompt", "def main():", "--max-new-tokens", "12", "--temperature", "0",
            "--backend", "triton"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "cuda, bf16, static step, CUDA graph" in first.err, first.err
    assert main(args) == 0
    assert capsys.readouterr().out == first.out
    assert main(args + ["--precision", "f32"]) == 0
    assert "cuda, f32, static step, CUDA graph" in capsys.readouterr().err


def test_position_tables_kernel_on_the_gpu_equals_the_torch_functions():
    """lmc/runtime/positions.py natively: decode.pos and two rings' keys and slot maps from
    one kernel per ring size equal the decode pass's torch functions, and a Decoder on CUDA
    takes the kernel (no torch op in the tables' launches)."""
    from lmc.passes.decode import _pos_fn, _ring_keys_fn, _ring_src_fn
    from lmc.runtime.positions import Tables
    aux = {"decode.pos": _pos_fn}
    for w in (5, 4096):
        aux[f"decode.ring{w}.keys"] = _ring_keys_fn(w)
        aux[f"decode.ring{w}.src"] = _ring_src_fn(w)
    t = Tables(aux)
    for P in (0, 3, 4095, 4096, 10_001):
        for T in (1, 7, 5000):
            p = torch.tensor([P], device="cuda")
            got = t(p, T)
            for k, fn in aux.items():
                assert torch.equal(got[k], fn(p, T)), (k, P, T)
    assert t.launches() == 2
