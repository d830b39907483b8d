"""Chunked decayed-linear-attention kernels (lmc/codegen/linear_attention.py) in Triton's
interpreter on CPU tensors, against the oracle: the zoo's own `decayed_linear_attention`
blocks (yoco: per-token gates [B, H, T]; minimax: a fixed per-head decay [1, H, T]) compiled
from the zoo files and run op by op by torch, gradients by torch autograd over that graph.
Cases with an initial or a final state (which the zoo block has not) use the module's parallel
reference, itself checked against the zoo graph and the recurrent form. Errors are
max |got - want| / max |want| per tensor; fp32 tolerance 1e-4."""
import importlib.util
import json
import os
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, ZOO

import lmc
from lmc.codegen import linear_attention as la

TOL = 3e-5      # fp32 against the fp64 recurrence: the worst case measured 1.2e-5


REPORT = {}


@pytest.fixture
def report():
    """Records a case's max errors (printed with -s; collected in REPORT)."""
    def record(case, errs):
        REPORT[case] = errs
        print(case, " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    return record


def rel(got: torch.Tensor, want: torch.Tensor, scale: float = 0.0) -> float:
    """max |got - want| / max(max |want|, scale)."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(max(scale, 1e-30))).item()


def dg_scale(q, dq) -> float:
    """The size of the terms q_t . dq_t whose differences make dL/dG (dg is exactly 0 at
    T = 1, so its own maximum is no scale there)."""
    return (q.double() * dq.double()).sum(-1).abs().max().item()


def grad_errs(names, got, want, q):
    """rel per gradient; the log-decays' gradient relative to max(|dg|, the q.dq terms)."""
    dq = want[names.index("dq")]
    return {n: rel(a, b, dg_scale(q, dq) if n == "dg" else 0.0)
            for n, a, b in zip(names, got, want)}


@lru_cache(maxsize=None)
def zoo_oracle(zoo: str, H: int, dk: int, dv: int):
    """The zoo file's decayed_linear_attention block as a model of its own (inputs q, k, v,
    ld; output o), run by the torch backend with torch autograd."""
    import tempfile
    with open(os.path.join(ZOO, zoo)) as f:
        block = yaml.safe_load(f)["blocks"]["decayed_linear_attention"]
    ld = ["B", "H", "T"] if zoo == "yoco.yaml" else [1, "H", "T"]
    spec = {"name": "dla_" + zoo.split(".")[0],
            "config": {"H": H, "dk": dk, "dv": dv},
            "blocks": {"decayed_linear_attention": block},
            "model": {"inputs": {"q": {"shape": ["B", "H", "T", "dk"], "dtype": "f32"},
                                 "k": {"shape": ["B", "H", "T", "dk"], "dtype": "f32"},
                                 "v": {"shape": ["B", "H", "T", "dv"], "dtype": "f32"},
                                 "ld": {"shape": ld, "dtype": "f32"}},
                      "body": ["o = decayed_linear_attention(q, k, v, ld)"],
                      "outputs": ["o"]}}
    path = os.path.join(tempfile.mkdtemp(prefix="lmc_dla_"), "dla.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    m = lmc.load(path)
    m.autodiff = "torch"
    return lambda q, k, v, ld: m(q=q, k=k, v=v, ld=ld)


def make(B, H, T, dk, dv, gates, seed=0, dtype=torch.float32):
    """q, k, v and the log-decays: 'token' per-token gates [B, H, T] (yoco's logsigmoid form),
    'head' a fixed per-head decay [H] (lightning), 'strong' per-token gates in [-31, -1]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, dk, generator=gen)
    k = torch.randn(B, H, T, dk, generator=gen) * dk ** -0.5
    v = torch.randn(B, H, T, dv, generator=gen)
    if gates == "token":
        g = F.logsigmoid(2 * torch.randn(B, H, T, generator=gen) + 1)
    elif gates == "head":
        g = -(2.0 ** (-8.0 * torch.arange(1, H + 1) / H)) * (1 + torch.rand(H, generator=gen))
    else:
        g = -1 - 30 * torch.rand(B, H, T, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), g


def leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def grads_of(outs, ups, inputs):
    """Gradients of sum(out * up) (an input the outputs do not depend on gets zeros)."""
    gs = torch.autograd.grad([(o * u).sum() for o, u in zip(outs, ups)], inputs,
                             allow_unused=True)
    return [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, gs)]


# -- the references ----------------------------------------------------------------------------
@pytest.mark.parametrize("zoo,gates", [("yoco.yaml", "token"), ("minimax.yaml", "head")])
def test_references_match_the_zoo_block(zoo, gates):
    """The module's parallel and recurrent references equal the zoo's primitive graph (forward
    and torch-autograd gradients, gates included)."""
    B, H, T, d = 2, 2, 37, 16
    q, k, v, g = make(B, H, T, d, d, gates, seed=1)
    ld = g if gates == "token" else g.view(1, H, 1).expand(1, H, T)
    oracle = zoo_oracle(zoo, H, d, d)
    xs = leaves(q, k, v, ld)
    want = oracle(*xs)
    up = torch.randn_like(want)
    gw = grads_of([want], [up], xs)
    for ref in (la.linear_attention_reference, la.linear_attention_recurrent):
        ys = leaves(q, k, v, ld)
        got = ref(*ys)
        assert rel(got, want) < 1e-6
        for a, b in zip(grads_of([got], [up], ys), gw):
            assert rel(a, b) < 1e-5


def test_reference_states_match_the_recurrent_form():
    q, k, v, g = make(2, 3, 29, 16, 8, "token", seed=2)
    s0 = torch.randn(2, 3, 16, 8)
    a, sa = la.linear_attention_reference(q, k, v, g, scale=0.7, initial_state=s0,
                                          return_state=True)
    b, sb = la.linear_attention_recurrent(q, k, v, g, scale=0.7, initial_state=s0,
                                          return_state=True)
    assert rel(a, b) < 1e-5 and rel(sa, sb) < 1e-5


# -- the chunked kernels against the zoo oracle: forward and every gradient -------------------
CASES = [  # T, chunk, d (= d_k = d_v), gates
    (1, 16, 16, "token"), (1, 64, 32, "head"),
    (63, 16, 16, "token"), (63, 32, 32, "head"), (63, 64, 16, "token"),
    (64, 32, 16, "head"), (64, 64, 32, "token"),
    (200, 16, 32, "token"), (200, 32, 16, "head"), (200, 64, 32, "token"),
    (192, 64, 16, "head"),
]


@pytest.mark.parametrize("T,chunk,d,gates", CASES)
def test_chunked_matches_the_zoo_oracle(T, chunk, d, gates, report):
    B, H = (2, 2) if T < 100 else (1, 2)
    q, k, v, g = make(B, H, T, d, d, gates, seed=T + chunk + d)
    zoo = "yoco.yaml" if gates == "token" else "minimax.yaml"
    xs = leaves(q, k, v, g)
    ld = xs[3] if gates == "token" else xs[3].view(1, H, 1).expand(1, H, T)
    want = zoo_oracle(zoo, H, d, d)(*xs[:3], ld)
    ys = leaves(q, k, v, g)
    got = la.chunked_linear_attention(*ys, chunk=chunk)
    assert got.shape == want.shape and got.dtype == want.dtype
    up = torch.randn_like(want)
    ga, gb = grads_of([got], [up], ys), grads_of([want], [up], xs)
    assert [a.shape for a in ga] == [b.shape for b in gb]
    errs = {"o": rel(got, want), **grad_errs(("dq", "dk", "dv", "dg"), ga, gb, q)}
    report(f"T={T} C={chunk} d={d} {gates}", errs)
    assert max(errs.values()) < TOL, errs


STATE_CASES = [  # T, chunk, d_k, d_v, gates, scale, max block
    (63, 16, 16, 32, "token", 0.25, 64),
    (200, 64, 32, 16, "head", None, 64),
    (70, 32, 24, 40, "token", 1.5, 16),        # d not a power of two, 2 x 3 state tiles
    (200, 64, 32, 32, "strong", None, 16),     # exp underflows inside chunks
]


@pytest.mark.parametrize("T,chunk,dk,dv,gates,scale,block", STATE_CASES)
def test_chunked_with_states_matches_the_reference(T, chunk, dk, dv, gates, scale, block,
                                                   monkeypatch, report):
    """initial_state in, final state out (both differentiable), a scale, split d_k / d_v tiles;
    against the parallel reference in fp64."""
    monkeypatch.setattr(la, "MAX_BLOCK", block)
    B, H = 1, 2
    q, k, v, g = make(B, H, T, dk, dv, gates, seed=T + dk)
    s0 = torch.randn(B, H, dk, dv)
    xs = leaves(q.double(), k.double(), v.double(), g.double(), s0.double())
    want, wsf = la.linear_attention_reference(*xs[:4], scale=scale, initial_state=xs[4],
                                              return_state=True)
    ys = leaves(q, k, v, g, s0)
    got, sf = la.chunked_linear_attention(*ys[:4], chunk=chunk, scale=scale,
                                          initial_state=ys[4], return_state=True)
    assert sf.dtype == torch.float32 and sf.shape == (B, H, dk, dv)
    ups = [torch.randn_like(want), torch.randn_like(wsf)]
    errs = {"o": rel(got, want), "state": rel(sf, wsf),
            **grad_errs(("dq", "dk", "dv", "dg", "ds0"), grads_of([got, sf], ups, ys),
                        grads_of([want, wsf], ups, xs), q)}
    report(f"T={T} C={chunk} dk={dk} dv={dv} {gates} scale={scale} block={block}", errs)
    assert max(errs.values()) < TOL, errs


def test_gradient_of_the_final_state_alone():
    """Only the final state is used: the output's gradient is None, the gates still get the
    <S_T, dS_T> term."""
    q, k, v, g = make(1, 2, 40, 16, 16, "token", seed=5)
    xs, ys = leaves(q, k, v, g), leaves(q.double(), k.double(), v.double(), g.double())
    _, sf = la.chunked_linear_attention(*xs, chunk=16, return_state=True)
    _, wsf = la.linear_attention_reference(*ys, return_state=True)
    up = torch.randn_like(wsf)
    for a, b in zip(grads_of([sf], [up], xs), grads_of([wsf], [up], ys)):
        assert rel(a, b) < TOL


def test_fp16_inputs():
    """fp16 q, k, v (fp16 tensor-core dots, fp32 accumulation and state) against the fp32
    reference of the same fp16 values."""
    q, k, v, g = make(1, 2, 63, 32, 32, "token", seed=6, dtype=torch.float16)
    xs = leaves(q, k, v, g)
    got = la.chunked_linear_attention(*xs, chunk=32)
    assert got.dtype == torch.float16
    ys = leaves(q.float(), k.float(), v.float(), g)
    want = la.linear_attention_reference(*ys)
    up = torch.randn_like(want)
    assert rel(got, want) < 2e-3
    ga, gb = grads_of([got], [up.half()], xs), grads_of([want], [up], ys)
    assert [a.dtype for a in ga] == [torch.float16] * 3 + [torch.float32]
    errs = grad_errs(("dq", "dk", "dv", "dg"), ga, gb, q)
    assert max(errs.values()) < 2e-3, errs


def test_strided_inputs_and_broadcast_gates():
    """q, k, v as permuted views of [B, T, H, d] (no copy; gradients come back in their
    shapes), gates [H, T] broadcast over B (the zoo oracle takes them as [1, H, T])."""
    B, T, H, d = 2, 45, 3, 16
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, T, H, d, generator=gen).permute(0, 2, 1, 3) for _ in range(3))
    g = F.logsigmoid(torch.randn(H, T, generator=gen))
    xs, ys = leaves(q, k, v, g), leaves(q, k, v, g[None])
    assert xs[0].stride() == q.stride() != q.contiguous().stride()
    got = la.chunked_linear_attention(*xs, chunk=16)
    want = zoo_oracle("minimax.yaml", H, d, d)(*ys)
    up = torch.randn_like(want)
    assert rel(got, want) < TOL
    ga, gb = grads_of([got], [up], xs), grads_of([want], [up], ys)
    assert ga[3].shape == (H, T)
    gb[3] = gb[3][0]
    errs = grad_errs(("dq", "dk", "dv", "dg"), ga, gb, q)
    assert max(errs.values()) < TOL, errs


def test_bad_arguments():
    q, k, v, g = make(1, 2, 10, 16, 16, "token")
    with pytest.raises(ValueError, match="power of two"):
        la.chunked_linear_attention(q, k, v, g, chunk=24)
    with pytest.raises(ValueError, match="broadcast"):
        la.chunked_linear_attention(q, k, v, g[..., :5])
    with pytest.raises(ValueError, match=r"\[H\]"):
        la.chunked_linear_attention(q, k, v, torch.zeros(3))
    with pytest.raises(ValueError, match="one float dtype"):
        la.chunked_linear_attention(q, k.half(), v, g)
    with pytest.raises(ValueError, match="initial_state"):
        la.chunked_linear_attention(q, k, v, g, initial_state=torch.zeros(1, 2, 16, 8))


# -- long sequences: decays relative to the chunk start never overflow --------------------------
def test_long_sequence_strong_decay_forward_t32k():
    """T = 32768, gates in [-31, -1] (a global cumsum reaches -5e5: exp(-G) would overflow and
    fp32 differences of G would lose three digits): output and final state finite and equal
    to the fp64 recurrent form."""
    q, k, v, g = make(1, 1, 32768, 16, 16, "strong", seed=8)
    o, sf = la.chunked_linear_attention(q, k, v, g, chunk=128, return_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(sf).all()
    want, wsf = la.linear_attention_recurrent(q.double(), k.double(), v.double(), g.double(),
                                              return_state=True)
    assert rel(o, want) < TOL and rel(sf, wsf) < TOL


def test_long_sequence_gradients_strong_and_weak_decay():
    """T = 2048, one head with gates in [-31, -1], one with |g| <= 1e-4 (state sums ~T terms):
    every gradient finite and equal to the fp64 parallel reference's."""
    T = 2048
    q, k, v, _ = make(1, 2, T, 16, 16, "token", seed=9)
    gen = torch.Generator().manual_seed(9)
    g = torch.stack([-1 - 30 * torch.rand(T, generator=gen),
                     -1e-4 * torch.rand(T, generator=gen)])[None]
    xs, ys = leaves(q, k, v, g), leaves(q.double(), k.double(), v.double(), g.double())
    got = la.chunked_linear_attention(*xs)
    want = la.linear_attention_reference(*ys)
    up = torch.randn_like(want)
    assert rel(got, want) < TOL
    for a, b in zip(grads_of([got], [up], xs), grads_of([want], [up], ys)):
        assert torch.isfinite(a).all() and rel(a, b) < TOL


@pytest.mark.slow
def test_long_sequence_t32k_forward_backward_finite():
    """T = 32768, a strong-decay and a nearly-undecayed head: forward, final state and every
    gradient finite, each head's output equal to the fp64 recurrent form."""
    T = 32768
    q, k, v, _ = make(1, 2, T, 16, 16, "token", seed=10)
    gen = torch.Generator().manual_seed(10)
    g = torch.stack([-1 - 30 * torch.rand(T, generator=gen),
                     -1e-4 * torch.rand(T, generator=gen)])[None]
    xs = leaves(q, k, v, g)
    o, sf = la.chunked_linear_attention(*xs, chunk=128, return_state=True)
    (o.sum() + sf.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(sf).all()
    assert all(torch.isfinite(x.grad).all() for x in xs)
    want = la.linear_attention_recurrent(q.double(), k.double(), v.double(), g.double())
    for h in range(2):
        assert rel(o[:, h], want[:, h]) < TOL


# -- decode ------------------------------------------------------------------------------------
@pytest.mark.parametrize("gates", ["token", "head"])
def test_recurrent_step_matches_the_recurrent_form(gates):
    B, H, n, dk, dv = 2, 3, 5, 16, 32
    q, k, v, g = make(B, H, n, dk, dv, gates, seed=11)
    s0 = torch.randn(B, H, dk, dv)
    o, s = la.recurrent_step(q, k, v, g, s0, scale=0.5)
    want, ws = la.linear_attention_recurrent(q.double(), k.double(), v.double(), g.double(),
                                             scale=0.5, initial_state=s0.double(),
                                             return_state=True)
    assert o.shape == (B, H, n, dv) and s.dtype == torch.float32
    assert rel(o, want) < TOL and rel(s, ws) < TOL
    # one token: [B, H, d] tensors, gates [B, H] (or [H])
    g1 = g[..., 0] if gates == "token" else g
    o1, s1 = la.recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g1, s0, scale=0.5)
    assert o1.shape == (B, H, dv)
    assert rel(o1, want[:, :, 0]) < TOL
    state = s0.clone()
    ptr = state.data_ptr()
    o2, s2 = la.recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g1, state, scale=0.5,
                               inplace=True)
    assert s2.data_ptr() == ptr and torch.equal(s2, s1) and torch.equal(o2, o1)


@pytest.mark.parametrize("gates,splits", [("token", (1, 17, 62)), ("head", (0, 40))])
def test_prefill_then_decode_equals_the_forward_everywhere(gates, splits):
    """Prefill P tokens with the chunked kernel (its final state), then decode the rest one
    token at a time: every position's output equals the full chunked forward and the zoo."""
    B, H, T, d = 2, 2, 63, 16
    q, k, v, g = make(B, H, T, d, d, gates, seed=12)
    full = la.chunked_linear_attention(q, k, v, g, chunk=16)
    ld = g if gates == "token" else g.view(1, H, 1).expand(1, H, T)
    with torch.no_grad():
        zoo = zoo_oracle("yoco.yaml" if gates == "token" else "minimax.yaml", H, d, d)(
            q, k, v, ld)
    assert rel(full, zoo) < TOL
    gt = g if gates == "token" else g.view(1, H, 1).expand(B, H, T)
    for P in splits:
        if P:
            o_pre, state = la.prefill(q[:, :, :P], k[:, :, :P], v[:, :, :P], gt[..., :P],
                                      chunk=16)
            outs = [o_pre]
        else:
            state, outs = torch.zeros(B, H, d, d), []
        for t in range(P, T):
            o_t, state = la.recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], gt[..., t],
                                           state, inplace=t % 2 == 0)
            outs.append(o_t[:, :, None])
        got = torch.cat(outs, 2)
        err = ((got - full).abs().amax((0, 1, 3)) / full.abs().max()).max().item()
        assert err < TOL, (P, err)
        assert rel(got, zoo) < TOL


# -- the benchmark script, tiny and on CPU -----------------------------------------------------
def test_benchmark_runs_tiny_on_cpu(tmp_path):
    path = os.path.join(ROOT, "benchmarks", "linear_attention_bench.py")
    spec = importlib.util.spec_from_file_location("linear_attention_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "la.json"
    bench.main(["--tiny", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["device"]["kind"] == "cpu" and res["device"]["label"] == "CPU"
    for key in ("torch", "triton", "date", "shape", "rows"):
        assert key in res
    names = {r["name"] for r in res["rows"]}
    assert {"lmc_chunked", "unfused_parallel", "sdpa_causal"} <= names
    for r in res["rows"]:
        if r["name"] == "fla_chunk":
            continue
        assert r["status"] == "ok", r
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    checked = [r for r in res["rows"] if r["name"] == "lmc_chunked"]
    assert all(r["max_rel_err"] < 1e-4 for r in checked)


# -- on the GPU (run with -m gpu) --------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_forward_backward(dtype):
    B, H, T, d = 2, 4, 1000, 128
    q, k, v, g = (x.cuda() for x in make(B, H, T, d, d, "token", seed=13))
    xs = leaves(q.to(dtype), k.to(dtype), v.to(dtype), g)
    ys = leaves(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), g.double())
    got = la.chunked_linear_attention(*xs)
    want = la.linear_attention_reference(*ys)
    up = torch.randn_like(want)
    tol = TOL if dtype == torch.float32 else 2e-2
    assert rel(got, want) < tol
    ga, gb = grads_of([got], [up.to(dtype)], xs), grads_of([want], [up], ys)
    assert all(torch.isfinite(a).all() for a in ga)
    errs = grad_errs(("dq", "dk", "dv", "dg"), ga, gb, q)
    assert max(errs.values()) < (tol if dtype == torch.float32 else 5e-2), errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_long_sequence_bf16_and_decode():
    """bf16 at T = 32768 with strong and weak decay: finite everywhere; then prefill + decode
    steps continue the fp32 forward (CUDA tensors, fp32 state)."""
    T = 32768
    q, k, v, _ = (x.cuda() for x in make(1, 2, T, 128, 128, "token", seed=14))
    g = torch.stack([-1 - 30 * torch.rand(T), -1e-4 * torch.rand(T)])[None].cuda()
    xs = leaves(q.bfloat16(), k.bfloat16(), v.bfloat16(), g)
    o, sf = la.chunked_linear_attention(*xs, return_state=True)
    (o.float().sum() + sf.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(sf).all()
    assert all(torch.isfinite(x.grad).all() for x in xs)
    n = 300
    full = la.chunked_linear_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], g[..., :n])
    o_pre, state = la.prefill(q[:, :, :n - 4], k[:, :, :n - 4], v[:, :, :n - 4],
                              g[..., :n - 4])
    steps = []
    for t in range(n - 4, n):
        o_t, state = la.recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], g[..., t], state,
                                       inplace=True)
        steps.append(o_t[:, :, None])
    assert rel(torch.cat([o_pre] + steps, 2), full) < TOL
