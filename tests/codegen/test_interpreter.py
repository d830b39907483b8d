"""lmc/codegen/interpreter.py: Triton's interpreter patches triton.language once per launch,
not again at every helper call; the kernels compute the same bits either way and the
language is restored after each launch."""
import os

import pytest
import torch

import lmc  # noqa: F401
from lmc.codegen import interpreter

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton's interpreter only")

SRC = '''
import triton
import triton.language as tl


@triton.jit
def _helper(x, i):
    return tl.sigmoid(x) * i + tl.sum(x, axis=0)


@triton.jit
def kernel(x_ptr, o_ptr, N, BLOCK: tl.constexpr, CALLS: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(CALLS):
        acc += _helper(x, i)
    tl.store(o_ptr + offs, acc, mask=m)
'''


@pytest.fixture
def kernel(tmp_path):
    import importlib.util
    path = tmp_path / "helper_kernel.py"
    path.write_text(SRC)
    spec = importlib.util.spec_from_file_location("helper_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.kernel


def test_one_patch_per_launch_and_the_same_bits(kernel, monkeypatch):
    import triton.language as tl
    from triton.runtime import interpreter as interp

    assert interpreter.install() and interpreter.install()      # idempotent
    real = interpreter._triton_patch
    calls = []

    def counting(fn):
        calls.append(fn.__name__)
        return real(fn)
    x = torch.randn(37, generator=torch.Generator().manual_seed(0))

    def run():
        out = torch.empty_like(x)
        kernel[(3,)](x, out, 37, BLOCK=16, CALLS=5)     # 3 programs, 5 helper calls each
        return out
    # installed: Triton's patch runs for the launch, not for the helper's 15 calls
    monkeypatch.setattr(interpreter, "_triton_patch", counting)
    got = run()
    assert calls.count("kernel") == 1 and "_helper" not in calls, calls
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.arange)   # restored
    # Triton's own path: a patch at every helper call, the same output bit for bit
    calls.clear()
    monkeypatch.setattr(interp, "_patch_lang", counting)
    want = run()
    assert calls.count("kernel") == 1 and calls.count("_helper") == 15, calls
    assert torch.equal(got, want)
    sums = torch.stack([x[p * 16:(p + 1) * 16].sum() for p in range(3)])
    ref = sum(torch.sigmoid(x) * i + sums.repeat_interleave(16)[:37] for i in range(5))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


OVERFLOW_SRC = '''
import triton
import triton.language as tl


@triton.jit
def kernel(x_ptr, o_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + offs, mask=m, other=0)
    tl.store(o_ptr + offs, x * 1073741824 + offs, mask=m)    # int32: 2^30 x overflows
'''


def test_the_discarded_overflow_check_is_not_computed(tmp_path, monkeypatch):
    import dataclasses
    import importlib.util

    from triton.runtime import interpreter as interp
    assert interpreter.install()
    opts = interp.interpreter_builder.options
    assert not opts.debug and not opts.sanitize_overflow
    path = tmp_path / "overflow_kernel.py"
    path.write_text(OVERFLOW_SRC)
    spec = importlib.util.spec_from_file_location("overflow_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = torch.arange(-9, 10, dtype=torch.int32)

    def run():
        out = torch.empty_like(x)
        mod.kernel[(2,)](x, out, 19, BLOCK=16)
        return out
    got = run()
    # Triton's own setting: the sanitizer recomputes the product in int64, finds the
    # overflow and hands it to a device_assert that does nothing without debug
    sanitized = []
    sem = type(interp.interpreter_semantic)
    real = sem.binary_op_sanitize_overflow_impl
    monkeypatch.setattr(sem, "binary_op_sanitize_overflow_impl",
                        lambda self, *a: sanitized.append(1) or real(self, *a))
    monkeypatch.setattr(interp.interpreter_builder, "options",
                        dataclasses.replace(opts, sanitize_overflow=True))
    want = run()
    assert sanitized and torch.equal(got, want)
    assert torch.equal(got, x * 1073741824 + torch.arange(19, dtype=torch.int32))  # wrapped


def test_the_overflow_check_stays_with_debug():
    import dataclasses
    import types

    @dataclasses.dataclass(frozen=True)
    class Options:
        debug: bool = True
        sanitize_overflow: bool = True
    fake = types.SimpleNamespace(interpreter_builder=types.SimpleNamespace(options=Options()))
    assert not interpreter._drop_discarded_overflow_checks(fake)
    assert fake.interpreter_builder.options.sanitize_overflow
    fake.interpreter_builder.options = Options(debug=False)
    assert interpreter._drop_discarded_overflow_checks(fake)
    assert not fake.interpreter_builder.options.sanitize_overflow
