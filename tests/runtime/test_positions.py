"""The decode step's position tables (lmc/runtime/positions.py): the one-kernel form, run in
Triton's interpreter, equals the decode pass's torch functions for every past length P and
new-token count T tried (P = 0, rings not yet full, T past the window, W = 1), and the
launch counts that `step_ops` reports."""
import os

import pytest
import torch
from conftest import ZOO

import lmc
from lmc.passes.decode import _pos_fn, _ring_keys_fn, _ring_src_fn, decode_step
from lmc.runtime.positions import Tables, _torch_ops

EXAMPLES = os.path.join(os.path.dirname(ZOO), "examples")


def _aux(*windows, pos=True):
    aux = {"decode.pos": _pos_fn} if pos else {}
    for w in windows:
        aux[f"decode.ring{w}.keys"] = _ring_keys_fn(w)
        aux[f"decode.ring{w}.src"] = _ring_src_fn(w)
    return aux


@pytest.mark.parametrize("windows", [(), (1,), (5,), (3, 128)])
@pytest.mark.parametrize("T", [1, 2, 7])
def test_the_kernel_equals_the_torch_tables(windows, T):
    aux = _aux(*windows)
    tables = Tables(aux)
    for P in (0, 1, 4, 5, 6, 130, 1000):
        p = torch.tensor([P])
        got = tables.kernel(p, T)
        assert got.keys() == aux.keys()
        for k, fn in aux.items():
            want = fn(p, T)
            assert got[k].dtype == torch.int64 and torch.equal(got[k], want), (k, P, T)


def test_off_a_gpu_the_torch_functions_run():
    """CPU (and meta) tensors take the decode pass's functions themselves."""
    aux = _aux(4)
    got = Tables(aux)(torch.tensor([9]), 3)
    for k, fn in aux.items():
        assert torch.equal(got[k], fn(torch.tensor([9]), 3))


def test_an_unknown_input_falls_back_to_its_function():
    aux = dict(_aux(4), **{"decode.other": lambda P, T: P * 2 + torch.arange(T, device=P.device)})
    t = Tables(aux)
    got = t.kernel(torch.tensor([3]), 2)
    assert torch.equal(got["decode.other"], torch.tensor([6, 7]))
    assert t.launches() == 1 + 3       # the kernel, and the function's mul, arange, add


@pytest.mark.parametrize("path,launches,torch_ops", [
    (os.path.join(ZOO, "llama.yaml"), 1, 2),
    (os.path.join(EXAMPLES, "gpt_oss.yaml"), 1, 23),
])
def test_launches_per_step(path, launches, torch_ops):
    """A step's position inputs cost one launch on a GPU (per ring size), where their torch
    functions were 2 ops (decode.pos) and 23 with a ring."""
    step = decode_step(lmc.load(path, preset="tiny").graph, static=True)
    assert Tables(step.aux).launches() == launches
    assert sum(_torch_ops(fn) for fn in step.aux.values()) == torch_ops


def test_a_static_decoder_on_the_kernel_tables_equals_the_forward(monkeypatch):
    """gpt_oss (a 5-slot ring beside full caches), its static triton step fed by the kernel
    (as on a GPU): prefill then steps past several wraps equal the full forward."""
    from conftest import decode_worst

    from lmc.runtime.decoder import Decoder
    calls = []

    def kernel(self, P, T):
        calls.append(T)
        return Tables.kernel(self, P, T)
    monkeypatch.setattr(Tables, "__call__", kernel)
    m = lmc.load(os.path.join(EXAMPLES, "gpt_oss.yaml"), preset="tiny", seed=2,
                 backend="triton").eval()
    ids = torch.randint(0, 512, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(ids)
    dec = Decoder(m, "triton", static=True, max_len=16)
    assert decode_worst(dec, ids, full, 3) < 1e-5
    assert calls[:2] == [3, 1] and len(calls) == 14 - 3 + 1
