"""The static decode step (preallocated caches written in place, positions as tensors, fixed
shapes) equals the dynamic step and the full forward for every zoo model; slots not yet written
are never read; the CUDA-graph path falls back on CPU and says so; on a GPU, capture and replay
equal the forward (marked gpu)."""
import glob
import os

import pytest
import torch
from conftest import ZOO

import lmc
from lmc.errors import LmcError
from lmc.ir.dims import Dim
from lmc.ops.reference import REFERENCE
from lmc.runtime.decoder import Decoder

FILES = sorted(glob.glob(os.path.join(ZOO, "*.yaml")))
LLAMA = os.path.join(ZOO, "llama.yaml")
TOL = 1e-5  # fp32, max abs difference of logits (issue 6 asks 1e-4; measured <= 3e-7)


def _forward(m, ids):
    with torch.no_grad():
        out = m(ids)
    return out["logits"] if isinstance(out, dict) else out


def _decode(dec, ids, k, fill=None):
    """Prefill k tokens, then one step per token; the logits of every position. `fill`: a
    value written into every cache slot first (slots are written as positions arrive)."""
    st = dec.init_state(ids.shape[0])
    if fill is not None:
        for s in dec.step.states:
            if s.kind == "cache":
                st[s.name].fill_(fill)
    got = []
    if k:
        lg, st = dec(ids[:, :k], st)
        got.append(lg)
    for t in range(k, ids.shape[1]):
        lg, st = dec(ids[:, t:t + 1], st)
        got.append(lg)
    return torch.cat(got, 1), st


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_static_step_equals_dynamic_step_and_forward(path):
    """Prefill of 0, 1 and 4 tokens then at least 5 single-token steps (T = 10), with every
    cache slot holding 1e30 before it is written: unfilled slots must get weight exactly 0."""
    m = lmc.load(path, preset="tiny", seed=3).eval()
    ids = torch.randint(0, m.config["vocab"], (2, 10), generator=torch.Generator().manual_seed(1))
    full = _forward(m, ids)
    dyn, sta = Decoder(m), Decoder(m, static=True, max_len=16)
    assert sta.static and all(s.kind != "cache" or s.shape[s.axis] == Dim.sym("L")
                              for s in sta.step.states)
    for k in (0, 1, 4):
        d, _ = _decode(dyn, ids, k)
        s, st = _decode(sta, ids, k, fill=1e30)
        assert st.past == 10
        assert (s - full).abs().max().item() < TOL, (k, (s - full).abs().max().item())
        assert (s - d).abs().max().item() < TOL, (k, (s - d).abs().max().item())


def test_static_step_with_a_sliding_window_keeps_the_ring():
    """yoco with a 4-token window: the self-decoder keeps its 4-slot rings in the static step
    too (the cross-decoder's global K,V gets the max_len slots); 13 tokens, prompts shorter and
    longer than the window."""
    m = lmc.load(os.path.join(ZOO, "yoco.yaml"), preset="tiny", seed=10, sliding_window=4).eval()
    dec = Decoder(m, static=True, max_len=16)
    kinds = {s.name: s.kind for s in dec.step.states}
    assert {k for k, v in kinds.items() if v == "ring"} and all(
        v == "cache" for k, v in kinds.items() if k.startswith("cross_kv."))
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(5))
    full = _forward(m, ids)
    for k in (0, 2, 7):
        got, _ = _decode(dec, ids, k, fill=1e30)
        assert (got - full).abs().max().item() < TOL, k


def test_a_written_slot_is_read():
    """The counterpart of the unfilled-slot check: the same garbage in a slot that holds a past
    position does change the next logits (so the check above would see a slot that leaked)."""
    m = lmc.load(LLAMA, preset="tiny", seed=4).eval()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(2))
    dec = Decoder(m, static=True, max_len=12)

    def next_logits(poison_slot):
        st = dec.init_state(1)
        _, st = dec(ids[:, :5], st)
        if poison_slot is not None:
            for s in dec.step.states:
                if s.kind == "cache":
                    st[s.name].narrow(s.axis, poison_slot, 1).fill_(1e30)
        lg, _ = dec(ids[:, 5:], st)
        return lg
    clean = next_logits(None)
    assert torch.equal(next_logits(9), clean)                         # unfilled: not read
    diff = (next_logits(2) - clean).abs()                             # filled: read
    assert not torch.isfinite(diff).all() or diff.max().item() > 100 * TOL


def test_static_caches_are_written_in_place_at_the_position():
    m = lmc.load(LLAMA, preset="tiny", seed=5).eval()
    dec = Decoder(m, static=True, max_len=8)
    st = dec.init_state(1)
    bufs = {k: v.data_ptr() for k, v in st.items()}
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    _, st2 = dec(ids[:, :3], st)
    _, st2 = dec(ids[:, 3:4], st2)
    assert st2 is st and st.past == 4 and {k: v.data_ptr() for k, v in st.items()} == bufs
    dyn = Decoder(m)
    _, ds = dyn(ids[:, :4], dyn.init_state(1))
    for s in dec.step.states:  # slots 0..3 hold the dynamic cache, the rest are untouched zeros
        got = st[s.name]
        assert torch.allclose(got.narrow(s.axis, 0, 4), ds[s.name], atol=1e-6, rtol=0)
        assert torch.equal(got.narrow(s.axis, 4, 4), torch.zeros_like(got.narrow(s.axis, 4, 4)))


def test_static_step_shapes_do_not_change_from_token_to_token():
    """Every value the T = 1 step computes has the same shape at position 2 and at position 9
    (the dynamic step's attention widens with every token)."""
    m = lmc.load(os.path.join(ZOO, "minimax.yaml"), preset="tiny", seed=6).eval()

    def shapes_at(dec, positions):
        trace, table = [], {**REFERENCE, **(dec.impl or {})}

        def wrap(fn):
            def run(ctx, xs, attrs):
                out = fn(ctx, xs, attrs)
                trace.append(tuple(tuple(x.shape) for x in out) if isinstance(out, tuple)
                             else tuple(out.shape))
                return out
            return run
        dec.impl = {op: wrap(fn) for op, fn in table.items()}
        seen, st = {}, dec.init_state(1)
        for p in range(max(positions) + 1):
            trace.clear()
            _, st = dec(torch.tensor([[p % 7 + 1]]), st)
            seen[p] = list(trace)
        return [seen[p] for p in positions]
    s2, s9 = shapes_at(Decoder(m, static=True, max_len=12), (2, 9))
    assert s2 == s9 and len(s2) > 50
    d2, d9 = shapes_at(Decoder(m), (2, 9))
    assert len(d2) == len(d9) and d2 != d9


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_warm_static_step_makes_no_tensor_from_host_values(path, monkeypatch):
    """What a CUDA graph cannot capture: after the first step, a single-token step (position
    tables from a device `past` tensor) never builds a tensor from Python values."""
    m = lmc.load(path, preset="tiny", seed=9).eval()
    dec = Decoder(m, static=True, max_len=8)
    st = dec.init_state(1)
    ids = torch.tensor([[5]])
    _, st = dec(ids, st)

    def refuse(*a, **k):
        raise AssertionError("torch.tensor called inside a warm static step")
    past = torch.tensor([1])
    monkeypatch.setattr(torch, "tensor", refuse)
    dec._static(ids, st, past)


@pytest.mark.parametrize("split", [1, 3])
def test_static_step_on_the_triton_backend(split, monkeypatch):
    """split 3: every matmul launch of a few rows (the single-token steps, and here the
    prefill too) splits K three ways, as the GPU autotuner may choose for decode."""
    from lmc.codegen import matmul
    monkeypatch.setattr(matmul, "INTERPRET_SPLIT_K", split)
    launches = []
    real = matmul._split_args
    monkeypatch.setattr(matmul, "_split_args", lambda *a: launches.append(real(*a)[-1])
                        or real(*a))
    m = lmc.load(LLAMA, preset="tiny", seed=7, backend="triton").eval()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(3))
    dec = Decoder(m, backend="triton", static=True, max_len=8)
    got, _ = _decode(dec, ids, 3, fill=1e30)
    # against the torch backend: the triton forward's matmuls of a few rows split K too
    oracle = lmc.load(LLAMA, preset="tiny", seed=7, backend="torch").eval()
    assert (got - _forward(oracle, ids)).abs().max().item() < TOL
    assert not dec.cuda_graph
    assert launches and all(s == max(matmul.SPLITS) for s in launches)


def test_cuda_graph_fallback_is_stated_once_on_cpu(capsys):
    m = lmc.load(LLAMA, preset="tiny").eval()
    dec = Decoder(m, static=True, max_len=8)
    assert dec.cuda_graph is False and "cpu" in dec.cuda_graph_off
    _decode(dec, torch.zeros(1, 4, dtype=torch.long), 1)
    _decode(dec, torch.zeros(1, 4, dtype=torch.long), 0)
    err = capsys.readouterr().err
    assert err.count("CUDA graph off") == 1 and "runs eagerly" in err
    off = Decoder(m, static=True, cuda_graph=False)
    assert off.cuda_graph is False and off.max_len == m.config["max_seq"]
    _decode(off, torch.zeros(1, 3, dtype=torch.long), 1)
    assert capsys.readouterr().err == ""  # turned off on purpose: nothing to report


def test_static_decoder_refuses_bad_lengths():
    m = lmc.load(LLAMA, preset="tiny").eval()   # max_seq 128
    for bad in (0, -3, 1.5, 129):
        with pytest.raises(LmcError, match="max_len"):
            Decoder(m, static=True, max_len=bad)
    with pytest.raises(LmcError, match="static"):
        Decoder(m, max_len=8)
    dec = Decoder(m, static=True, max_len=4)
    _, st = dec(torch.zeros(1, 4, dtype=torch.long), dec.init_state(1))
    with pytest.raises(LmcError, match="max_len 4"):
        dec(torch.zeros(1, 1, dtype=torch.long), st)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", [LLAMA, os.path.join(ZOO, "minimax.yaml")],
                         ids=os.path.basename)
def test_cuda_graph_replays_equal_forward(path):
    """Capture on the first single-token step, then replays: logits equal the full forward
    (fp32) at every position, over several replays."""
    m = lmc.load(path, preset="tiny", seed=8).eval().cuda()
    ids = torch.randint(0, m.config["vocab"], (2, 12), generator=torch.Generator().manual_seed(4))
    ids = ids.cuda()
    full = _forward(m, ids)
    dec = Decoder(m, static=True, max_len=16)
    assert dec.cuda_graph, dec.cuda_graph_off
    for k in (0, 3):
        got, st = _decode(dec, ids, k, fill=1e30)
        assert dec.cuda_graph, dec.cuda_graph_off            # capture did not fall back
        assert getattr(st, "captured", None) is not None
        assert (got - full).abs().max().item() < TOL


def test_decoder_api_refuses_bad_arguments_in_one_line():
    m = lmc.load(LLAMA, preset="tiny").eval()
    dec = Decoder(m)
    st = dec.init_state(1)
    ids = torch.tensor([1, 2])
    bad = [(lambda: Decoder(m, backend="bogus"), "unknown backend 'bogus'"),
           (lambda: dec.init_state(0), "batch must be a positive integer"),
           (lambda: dec.init_state(1.5), "batch must be a positive integer"),
           (lambda: dec(torch.zeros(1, 2, dtype=torch.long), None), "decode takes a State"),
           (lambda: dec(torch.zeros(1, 2), st), "integer token ids"),
           (lambda: list(dec.generate(ids, 2, temperature=float("nan"))), "temperature=nan"),
           (lambda: list(dec.generate(ids, 2, top_p=0.0)), "top_p=0.0"),
           (lambda: list(dec.generate(ids, 2, top_k=-1)), "top_k=-1"),
           (lambda: list(dec.generate(ids, -2)), "max_new_tokens=-2"),
           (lambda: list(dec.generate(ids, 2, seed=10 ** 30)), "seed="),
           (lambda: list(dec.generate(torch.tensor([], dtype=torch.long), 2)), "non-empty")]
    for f, msg in bad:
        with pytest.raises(LmcError, match=msg.replace("(", r"\(")):
            f()
    assert len(list(dec.generate(ids, 3, temperature=0))) == 3
