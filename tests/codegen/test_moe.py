"""MoE kernels (lmc/codegen/moe.py) in Triton's interpreter on CPU tensors, against the torch
references of the zoo's dense math (gating_reference / moe_reference: every expert on every
token, then mask), gradients by torch autograd through the references with random upstream
gradients for the output, the combine weights, the probability sums (load balance) and the
logsumexp (z-loss). Errors are max |got - want| / max |want| per tensor; fp32 tolerance 1e-5."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmc  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA)
from lmc.codegen import moe

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(
        1e-30)).item()


def make(N, E, d=24, F=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    wr = torch.randn(d, E, generator=g) * 0.5
    wg = torch.randn(E, d, F, generator=g) * 0.2
    w1 = torch.randn(E, d, F, generator=g) * 0.2
    w2 = torch.randn(E, F, d, generator=g) * 0.2
    noise = torch.randn(N, E, generator=g)
    return [t.to(dtype) for t in (x, wr, wg, w1, w2, noise)]


def seq_of(N):
    return {1: 1, 7: 7, 63: 21}[N]


CASES = [(N, E, k, cap) for N in (1, 7, 63) for E in (4, 8) for k in (1, 2)
         for cap in (None, 100)]


def _upstream(N, E, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, k, generator=g), torch.randn(E, generator=g),
            torch.randn(N, generator=g))


def _dense(idx, vals, E):
    return torch.zeros(idx.shape[0], E, dtype=vals.dtype).scatter_add(1, idx.long(), vals)


def check_gating(x, wr, noise, k, cap, T, renorm=True, sigmoid=False, bias=None, groups=None):
    N, E = x.shape[0], wr.shape[1]
    gw, gp, gl = _upstream(N, E, k)
    if sigmoid:
        gl = torch.zeros_like(gl)           # a sigmoid router takes no z-loss gradient
    xa, wa = x.clone().requires_grad_(), wr.clone().requires_grad_()
    got = moe.moe_gating(xa, wa, noise, k=k, renormalize=renorm, capacity_pct=cap, seq_len=T,
                         sigmoid=sigmoid, bias=bias, groups=groups)
    xb, wb = x.clone().requires_grad_(), wr.clone().requires_grad_()
    ref = moe.gating_reference(xb, wb, noise, k=k, renormalize=renorm, capacity_pct=cap,
                               seq_len=T, sigmoid=sigmoid, bias=bias, groups=groups)
    assert torch.equal(got.idx.long(), ref["top"])
    assert torch.equal(_dense(got.idx, got.kept.float(), E), ref["kept"])
    assert torch.equal(got.counts, ref["counts"])
    assert torch.equal(got.kept_counts, ref["kept_counts"])
    errs = {"weights": rel(_dense(got.idx, got.weight, E), ref["gates"]),
            "prob_sum": rel(got.prob_sum, ref["prob_sum"]), "lse": rel(got.lse, ref["lse"])}
    ((got.weight * gw).sum() + (got.prob_sum * gp).sum() + (got.lse * gl).sum()).backward()
    ((ref["gates"] * _dense(got.idx, gw, E)).sum() + (ref["prob_sum"] * gp).sum()
     + (ref["lse"] * gl).sum()).backward()
    errs["dx"] = rel(xa.grad, xb.grad)
    errs["dw_router"] = rel(wa.grad, wb.grad)
    assert max(errs.values()) <= TOL, errs
    return got, ref


@pytest.mark.parametrize("N,E,k,cap", CASES)
def test_gating(N, E, k, cap):
    x, wr, _, _, _, noise = make(N, E)
    check_gating(x, wr, noise if cap is None else None, k, cap, seq_of(N))


def test_gating_no_renormalize():
    x, wr, _, _, _, noise = make(63, 8)
    check_gating(x, wr, noise, 2, 100, 21, renorm=False)
    check_gating(x, wr, None, 1, None, None, renorm=False)


# wider top-k (Qwen3-MoE, OLMoE, DeepSeek-V3: k = 4..8 of many experts), sigmoid routers,
# with and without capacity, N odd and prime
WIDE_CASES = [(7, 16, 3, None, False), (63, 16, 4, 100, False), (63, 64, 8, None, True),
              (17, 8, 8, None, False), (63, 32, 6, 150, True), (1, 64, 8, None, False)]


@pytest.mark.parametrize("N,E,k,cap,sigmoid", WIDE_CASES)
def test_gating_wide_top_k(N, E, k, cap, sigmoid):
    x, wr, _, _, _, noise = make(N, E, seed=N + E + k)
    T = {1: 1, 7: 7, 17: 17, 63: 21}[N]
    check_gating(x, wr, noise if cap is None else None, k, cap, T, sigmoid=sigmoid)


def _balancing_bias(wr, x, k):
    """A selection bias large enough to change which experts some tokens pick."""
    E = wr.shape[1]
    bias = torch.linspace(-0.3, 0.3, E)[torch.randperm(E, generator=torch.Generator()
                                                      .manual_seed(4))]
    p = torch.sigmoid(x @ wr)
    plain = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :k]
    biased = torch.sort(p + bias, dim=-1, descending=True, stable=True).indices[:, :k]
    assert not torch.equal(plain, biased)   # the bias changes some tokens' choice
    return bias


@pytest.mark.parametrize("N,E,k,cap", [(63, 16, 4, None), (63, 8, 2, 100), (7, 64, 8, None)])
def test_gating_selection_bias(N, E, k, cap):
    """DeepSeek-V3's balancing bias: it picks the experts, the weights are the plain
    sigmoid scores renormalised over the picked ones; no gradient reaches it."""
    x, wr, *_ = make(N, E, seed=2)
    bias = _balancing_bias(wr, x, k)
    got, ref = check_gating(x, wr, None, k, cap, {63: 21, 7: 7}[N], sigmoid=True, bias=bias)
    sel = torch.zeros(N, E).scatter_(1, got.idx.long(), 1.0)
    want_w = (ref["probs"] * sel) / (ref["probs"] * sel).sum(-1, keepdim=True)
    kept = _dense(got.idx, got.kept.float(), E)
    assert rel(_dense(got.idx, got.weight, E), want_w * kept) <= TOL


# DeepSeek-V3's group-limited routing: (G, kept groups, a group scored by its top m)
GROUP_CASES = [(63, 64, 6, None, (8, 4, 2), True), (63, 16, 4, 100, (4, 2, 2), False),
               (17, 32, 8, None, (16, 5, 1), True), (7, 8, 3, None, (4, 2, 2), False)]


@pytest.mark.parametrize("N,E,k,cap,groups,bias", GROUP_CASES)
def test_gating_group_limited(N, E, k, cap, groups, bias):
    """The top k only among the experts of the `kept` best groups (a group scored by the sum
    of its top m selection scores); the weights are the picked experts' plain scores."""
    x, wr, *_ = make(N, E, seed=3)
    b = _balancing_bias(wr, x, k) if bias else None
    T = {63: 21, 17: 17, 7: 7}[N]
    got, ref = check_gating(x, wr, None, k, cap, T, sigmoid=True, bias=b, groups=groups)
    free = moe.gating_reference(x, wr, None, k=k, capacity_pct=cap, seq_len=T, sigmoid=True,
                                bias=b)
    assert not torch.equal(ref["top"], free["top"])      # the limit moved some tokens
    G, kept, _ = groups
    picked_groups = (got.idx.long() // (E // G))
    assert all(len(set(row.tolist())) <= kept for row in picked_groups)


def test_layer_group_limited():
    x, wr, wg, w1, w2, _ = make(63, 16, seed=9)
    err, errs = _layer(x, wr, wg, w1, w2, None, 4, None, 21, "silu", sigmoid=True,
                       bias=_balancing_bias(wr, x, 4), groups=(4, 2, 2))
    assert err <= TOL, errs


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_group_limited_selection_matches_the_reference(data):
    """Any group shape (E not a power of 2, one group, one expert per group), kept groups,
    k, router and bias: the kernel picks what the reference picks from the kernel's own
    probabilities (so a last-bit difference of exp or the matmul cannot decide a pick).
    Integer logits and biases in eighths make ties between experts and between groups
    common; both go to the lower index."""
    G = data.draw(st.sampled_from([1, 2, 3, 4, 8]), "G")
    EG = data.draw(st.sampled_from([1, 2, 3, 4, 8]), "EG")
    E = G * EG
    m = data.draw(st.sampled_from([1, 2] if EG > 1 else [1]), "m")
    kept = data.draw(st.integers(1, G), "kept")
    k = data.draw(st.integers(1, min(8, kept * EG)), "k")
    N = data.draw(st.sampled_from([1, 5, 17, 33]), "N")
    sigmoid = data.draw(st.booleans(), "sigmoid")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), "seed"))
    x = torch.randint(-1, 2, (N, 8), generator=gen).float()
    wr = torch.randint(-1, 2, (8, E), generator=gen).float()
    bias = (torch.randint(-4, 5, (E,), generator=gen).float() / 8
            if data.draw(st.booleans(), "bias") else None)
    g = moe._gating_forward(x, wr, None, k, True, None, None, sigmoid=sigmoid, bias=bias,
                            groups=(G, kept, m))
    score = g.probs + bias if bias is not None else g.probs
    want = moe.select_reference(score, k, (G, kept, m))
    assert torch.equal(g.idx.long(), want)


def test_group_limit_arguments_are_checked():
    x, wr, *_ = make(7, 16)
    for groups in [(3, 1, 2), (4, 5, 2), (4, 2, 3), (8, 1, 2)]:    # k = 4: 8 x 1 hold 2
        with pytest.raises(ValueError, match="groups"):
            moe.moe_gating(x, wr, k=4, sigmoid=True, groups=groups)


def test_capacity_drops_happen():
    x, wr, *_ = make(63, 4)
    wr[:, 0] += 2.0                          # a popular expert: its queue overflows
    got, ref = check_gating(x, wr, None, 2, 100, 21)
    assert (got.kept_counts < got.counts).any()
    assert (got.kept == 0).any()


def test_ties():
    """Equal probabilities: the zoo's stable descending sort keeps the lowest expert index."""
    x, wr, *_ = make(7, 8)
    wr[:, 5] = wr[:, 2]
    wr[:, 6] = wr[:, 2]                      # experts 2, 5, 6 always tie
    wr[:, 3] = wr[:, 1]
    x[0] = 0.0                               # every logit 0: all 8 experts tie
    for k in (1, 2, 5, 8):
        got, ref = check_gating(x, wr, None, k, None, None)
        assert got.idx[0].tolist() == list(range(k))
    err, errs = _layer(x, wr, *make(7, 8)[2:5], None, 2, None, None, "silu")
    assert err <= TOL, errs


def _layer(x, wr, wg, w1, w2, noise, k, cap, T, act, sigmoid=False, bias=None, groups=None):
    N, E = x.shape[0], wr.shape[1]
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    _, gp, gl = _upstream(N, E, k)
    if sigmoid:
        gl = torch.zeros_like(gl)
    pa = [t.clone().requires_grad_() for t in (x, wr, wg, w1, w2)]
    y, g = moe.moe_layer(*pa, noise, k=k, capacity_pct=cap, seq_len=T, act=act,
                         sigmoid=sigmoid, bias=bias, groups=groups)
    pb = [t.clone().requires_grad_() for t in (x, wr, wg, w1, w2)]
    yr, ref = moe.moe_reference(*pb, noise, k=k, capacity_pct=cap, seq_len=T, act=act,
                                sigmoid=sigmoid, bias=bias, groups=groups)
    assert torch.equal(g.idx.long(), ref["top"])
    assert torch.equal(g.kept_counts, ref["kept_counts"])
    errs = {"y": rel(y, yr), "prob_sum": rel(g.prob_sum, ref["prob_sum"])}
    ((y * gy).sum() + (g.prob_sum * gp).sum() + (g.lse * gl).sum()).backward()
    ((yr * gy).sum() + (ref["prob_sum"] * gp).sum() + (ref["lse"] * gl).sum()).backward()
    for name, a, b in zip(("dx", "dw_router", "dw_gate", "dw_up", "dw_down"), pa, pb):
        errs[name] = rel(a.grad, b.grad)
    return max(errs.values()), errs


LAYER_CASES = [(1, 4, 2, None), (7, 8, 1, 100), (7, 4, 2, None), (63, 8, 2, 100),
               (63, 4, 1, None), (63, 8, 2, None), (63, 4, 2, 100), (7, 8, 2, 100)]


@pytest.mark.parametrize("N,E,k,cap,bias", [(63, 16, 4, None, False), (63, 16, 6, 150, True),
                                             (17, 32, 8, None, True)])
def test_layer_wide_top_k_sigmoid(N, E, k, cap, bias):
    """DeepSeek-V3-style layers: a sigmoid router, k up to 8, a selection bias."""
    x, wr, wg, w1, w2, _ = make(N, E, seed=N + k)
    b = _balancing_bias(wr, x, k) if bias else None
    err, errs = _layer(x, wr, wg, w1, w2, None, k, cap, {63: 21, 17: 17}[N], "silu",
                       sigmoid=True, bias=b)
    assert err <= TOL, errs


@pytest.mark.parametrize("N,E,k,cap", LAYER_CASES)
def test_layer(N, E, k, cap):
    x, wr, wg, w1, w2, noise = make(N, E, seed=N + E + k)
    act = "gelu" if cap is None else "silu"          # blues01 GeGLU (noisy), minimax SwiGLU
    err, errs = _layer(x, wr, wg, w1, w2, noise if cap is None else None, k, cap,
                       seq_of(N), act)
    assert err <= TOL, errs


def test_layer_all_dropped_expert_and_empty_expert():
    """An expert no token chooses (its weight gradients are exactly 0) and heavy dropping."""
    x, wr, wg, w1, w2, _ = make(63, 8, seed=5)
    wr[:, 7] = -50.0                        # expert 7 never chosen
    wr[:, 0] += 3.0
    err, errs = _layer(x, wr, wg, w1, w2, None, 2, 100, 21, "silu")
    assert err <= TOL, errs


def test_layer_fp16():
    x, wr, wg, w1, w2, noise = make(63, 4, seed=9)
    h = [t.half() for t in (x, wr, wg, w1, w2)]
    y, g = moe.moe_layer(*h, k=2, act="silu")
    yr, ref = moe.moe_reference(*[t.float() for t in h], k=2, act="silu")
    assert torch.equal(g.idx.long(), ref["top"])
    assert y.dtype == torch.float16
    assert rel(y, yr) < 2e-3        # measured 5.4e-4: about one fp16 rounding


def _grouped_and_direct(x, wr, wg, w1, w2, noise, k, cap, T, act):
    """The layer's output for few tokens by the routed grouped GEMMs and by the direct
    kernels (a decode step's path), from the same gating."""
    N, E, F_ = x.shape[0], wr.shape[1], wg.shape[2]
    g = moe._gating_forward(x, wr, noise, k, True, cap, T)
    p = moe._Plan(x, E, F_)
    r = moe.route(g.idx, g.kept, g.weight, E, p.BM)
    _, _, ys = moe._experts_forward(p, x, r, wg, w1, w2, moe.ACTS.index(act), False)
    grouped = torch.empty((N, x.shape[1]), dtype=torch.float32)
    moe.combine(ys, r.slot, g.weight, grouped, weighted=True)
    got = torch.full((N, x.shape[1]), float("nan"))
    moe._experts_direct(x, g, wg, w1, w2, moe.ACTS.index(act), got)
    return got, grouped, g


# few tokens (N k <= E): odd d and F, fp32 and fp16, top-1/top-2, capacity drops
DIRECT_CASES = [(1, 4, 2, None, "gelu", torch.float32), (1, 8, 1, None, "silu", torch.float16),
                (3, 8, 2, 100, "silu", torch.float32), (4, 8, 2, 100, "gelu", torch.float16),
                (2, 4, 2, None, "silu", torch.float16), (4, 4, 1, 100, "gelu", torch.float32)]


@pytest.mark.parametrize("N,E,k,cap,act,dtype", DIRECT_CASES)
def test_direct_path_equals_grouped_and_reference(N, E, k, cap, act, dtype):
    x, wr, wg, w1, w2, noise = make(N, E, d=37, F=45, seed=N * 10 + E + k, dtype=dtype)
    if cap is not None:
        wr[:, 0] += 4.0                     # every token picks expert 0: the capacity binds
    assert moe.direct(N, k, E)
    got, grouped, g = _grouped_and_direct(x, wr, wg, w1, w2, None, k, cap, N if cap else None,
                                          act)
    if cap is not None and N > 2:
        assert (g.kept == 0).any()          # a dropped slot: the direct kernels skip it
    # the same rounded a, b, h and expert outputs; fp32 sums in another order
    assert rel(got, grouped) <= (TOL if dtype == torch.float32 else 2e-3), rel(got, grouped)
    want, _ = moe.moe_reference(*[t.float() for t in (x, wr, wg, w1, w2)], k=k,
                                capacity_pct=cap, seq_len=N if cap else None, act=act)
    assert rel(got, want.float()) <= (TOL if dtype == torch.float32 else 5e-3)


def test_launch_takes_the_direct_path_for_few_tokens_only(monkeypatch):
    """launch_template runs the direct kernels when N k <= E and nothing is saved for a
    backward; more tokens (a prefill) go through the routing and grouped GEMMs."""
    calls = []
    real = moe._experts_direct
    monkeypatch.setattr(moe, "_experts_direct", lambda *a: calls.append(1) or real(*a))
    opts = {"k": 2, "E": 4, "renormalise": True, "noise": False, "capacity": None,
            "outputs": ("y", "chosen"), "act": "silu", "dtype": "f32"}
    for N, want_direct in ((2, True), (3, False)):
        x, wr, wg, w1, w2, _ = make(N, 4, seed=3)
        y = torch.empty(1, N, x.shape[1])
        chosen = torch.full((1, N, 4), -1.0)
        calls.clear()
        moe.launch_template("moe_layer", [x.reshape(1, N, -1), wr, wg, w1, w2], [y, chosen],
                            opts)
        assert bool(calls) == want_direct
        yr, ref = moe.moe_reference(x, wr, wg, w1, w2, k=2, act="silu")
        assert rel(y.reshape(N, -1), yr) <= TOL
        # the gating kernel wrote the 0/1 choices itself
        assert torch.equal(chosen.reshape(N, 4), (ref["gates"] > 0).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N", [2, 3])
def test_launch_adds_the_residual(N, dtype):
    """A decode step's layer op takes the residual add after it (opts["residual"], the input
    after W2): y is exactly the layer's output (as stored, in its dtype) + the residual, on
    the direct path (N k <= E, the down kernel adds it) and the routed one, with a residual
    whose rows are strided."""
    opts = {"k": 2, "E": 4, "renormalise": True, "noise": False, "capacity": None,
            "outputs": ("y",), "act": "gelu", "dtype": "f32"}
    x, wr, wg, w1, w2, _ = make(N, 4, seed=7, dtype=dtype)
    d = x.shape[1]
    res = torch.randn(1, N, d + 3)[..., 1:d + 1].to(dtype)    # row stride d + 3
    plain = torch.empty(1, N, d, dtype=dtype)
    added = torch.full((1, N, d), float("nan"), dtype=dtype)
    moe.launch_template("moe_layer", [x.reshape(1, N, -1), wr, wg, w1, w2], [plain], opts)
    moe.launch_template("moe_layer", [x.reshape(1, N, -1), wr, wg, w1, w2, res], [added],
                        dict(opts, residual=True))
    assert moe.direct(N, 2, 4) == (N == 2)
    assert torch.equal(added, plain + res)


@pytest.mark.parametrize("N", [1, 15, 17, 97, 2300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_router_wgrad(N, dtype):
    """x^T dlog split along the tokens (2300 rows: several splits, the last one partial),
    x read in its own dtype: equals the fp32 product of the widened x."""
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, 40, generator=g).to(dtype)
    dlog = torch.randn(N, 5, generator=g)
    got = moe.router_wgrad(x, dlog)
    want = x.double().t() @ dlog.double()
    assert got.dtype == torch.float32 and got.shape == (40, 5)
    assert rel(got, want) < 1e-6


@pytest.mark.parametrize("N,k", [(1, 1), (17, 2), (33, 2)])
def test_combine_adds_the_router_term_and_zeroes_only_dropped_rows(N, k):
    """The combine's ROUTER term (dx += dlog W_r^T) and ZERO (dropped slots' rows of ye, a,
    b set to 0): every other row keeps what it held (NaN here), only dropped rows change."""
    g = torch.Generator().manual_seed(N + k)
    D, F_, E = 40, 24, 6
    slot = torch.randint(0, 3, (N, k), generator=g).to(torch.int32) - 1    # -1: dropped
    slot[0, 0] = 5
    ys = torch.randn(N * k, D, generator=g).half()
    ys[(slot.reshape(-1) < 0)] = float("nan")
    pa = torch.full((N * k, F_), float("nan"), dtype=torch.float16)
    pb = pa.clone()
    wgt = torch.randn(N, k, generator=g)
    dlog = torch.randn(N, E, generator=g)
    wr = torch.randn(E, D, generator=g).half().t()          # [D, E], not contiguous
    out = torch.empty(N, D)
    moe.combine(ys, slot, wgt, out, weighted=True, router=(dlog, wr), zero=(pa, pb))
    kept = (slot >= 0).reshape(-1)
    y3 = ys.float().reshape(N, k, D)
    want = (torch.where(kept.reshape(N, k, 1), y3, 0) * wgt[..., None]).sum(1) \
        + dlog @ wr.float().t()
    assert rel(out, want) < 1e-6
    assert torch.equal(ys[~kept], torch.zeros_like(ys[~kept]))
    for t in (pa, pb):
        assert torch.equal(t[~kept], torch.zeros_like(t[~kept]))
        assert t[kept].isnan().all()


def test_expert_product_reads_an_fp32_gradient_against_f16_weights():
    """The dh product reads an fp32 dy and rounds each tile to the weights' dtype in the
    kernel: the same gate and up gradients as dy rounded to f16 first (dW_down and the
    combine weights' gradient read dy in fp32 either way)."""
    x, wr, wg, w1, w2, _ = make(33, 4, seed=3)
    h = [t.half() for t in (x, wr, wg, w1, w2)]
    y, gate, r, (pa, pb, ys) = moe._moe_forward(*h[:2], None, *h[2:], 2, True, None, None,
                                                0, True)
    dy = torch.randn(33, 24, generator=torch.Generator().manual_seed(2))
    got = moe._moe_backward(*h, gate, r, pa, pb, ys, dy, None, None, 2, True, 0)
    want = moe._moe_backward(*h, gate, r, pa, pb, ys, dy.half().float(), None, None, 2, True,
                             0)
    for a, b in zip(got[3:5], want[3:5]):      # dW_gate, dW_up
        assert a.abs().max() > 0 and torch.equal(a, b)


@pytest.mark.parametrize("router", ["noisy-softmax", "deepseek"])
def test_bench_tiny(tmp_path, router):
    out = tmp_path / "moe.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "moe_bench.py"),
                        "--tiny", "--router", router, "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {row["contender"] for row in data["rows"]} >= {"lmc", "eager"}
    assert all(row["max_rel_err"] is None or row["max_rel_err"] < 1e-4 for row in data["rows"])
    for row in data["rows"]:       # a contender that crashed while timed is recorded, not run
        assert not [k for k in row if k.endswith("_error")], row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
