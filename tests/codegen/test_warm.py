"""codegen/warm.py: the warm pass runs a program on meta tensors with every Triton launch
turned into a warm-up, so a GPU compiles the kernels of a first run together.

On a GPU the pass runs by itself (warm.wanted); here, in the interpreter, the tests force it
and check what a GPU relies on: the pass reaches every launch the real run makes, with the
same kernel, dtypes, sizes, strides, pointer alignment and scalar arguments (so Triton's
cache keys agree), runs no kernel and changes no tensor, and the real run after it computes
what it computes without it."""
import os

import pytest
import torch

import lmc
from lmc.codegen import warm
from lmc.errors import LmcError
from lmc.passes import run_pipeline
from lmc.passes.loss import with_loss
from lmc.runtime.decoder import Decoder
from lmc.runtime.module import LmcModel

ZOO = os.path.join(os.path.dirname(__file__), "..", "..", "zoo")


@pytest.fixture
def record(monkeypatch):
    """Force the warm pass (as on a GPU) and record: every pass, and the real run's launches
    described as the pass describes its own."""
    from triton.runtime.interpreter import InterpretedFunction

    passes, real = [], []
    monkeypatch.setattr(warm, "wanted", _wanted_here)

    class Recorded(warm.WarmPass):
        def __enter__(self):
            passes.append(self)
            return super().__enter__()
    monkeypatch.setattr(warm, "WarmPass", Recorded)
    warm._install()
    run = InterpretedFunction.run

    def run_(self, *args, grid, warmup, **kwargs):
        if not warmup and warm.active() is None:
            real.append(warm.describe(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", run_)
    return passes, real


def _wanted_here(program, ctx, ignore=()):
    """warm.wanted without its GPU conditions (CUDA, not the interpreter)."""
    if warm.active() is not None:
        return False
    key = tuple(sorted((k, v) for k, v in ctx.dims.items() if k not in ignore))
    if key in program.warmed:
        return False
    program.warmed.add(key)
    return True


def _model(name, loss=True, **kw):
    graph = lmc.load(os.path.join(ZOO, f"{name}.yaml"), preset="tiny", **kw).graph
    graph = run_pipeline(with_loss(graph)) if loss else graph
    return LmcModel(graph, backend="triton", seed=0)


def _step(model, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = model.config["vocab"]
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    out = model(ids, targets=targets)
    out["loss"].backward()
    return out["loss"].detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["llama", "blues01", "minimax"])
def test_training_pass_reaches_every_launch_of_forward_and_backward(record, name):
    """llama; blues01's noisy routing and MoE dispatch; minimax's lightning attention,
    partial RoPE and capacity."""
    passes, real = record
    model = _model(name)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss, grads = _step(model, 2, 7)
    (w,) = passes                      # one pass: the forward and the backward together
    assert w.stopped is None and w.programs == ["forward", "backward"]
    assert len(real) > 20 and w.launches == real
    prog = model.program()
    assert prog.forward_exec.warmed and prog.backward_exec.warmed
    # the pass wrote nothing: the parameters are as they were before the first step
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())
    if name != "llama":           # the rest once (the suite's time)
        return
    # new dims: a new pass; the same dims again: none
    model.zero_grad()
    real.clear()
    _step(model, 3, 5)
    assert len(passes) == 2 and passes[1].launches == real
    model.zero_grad()
    _step(model, 3, 5)
    assert len(passes) == 2
    # a fresh model without passes gives the same loss and gradients
    plain = _model(name)
    with warm_off():
        loss2, grads2 = _step(plain, 2, 7)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[k], grads2[k]) for k in grads)


class warm_off:
    """No warm pass inside (warm.wanted says no)."""

    def __enter__(self):
        self._orig, warm.wanted = warm.wanted, lambda *a, **k: False

    def __exit__(self, *exc):
        warm.wanted = self._orig


@pytest.mark.parametrize("name,kw", [("minimax", {}), ("medit_one", {"moe": 1})])
@pytest.mark.parametrize("static", [False, True])
def test_decode_pass_reaches_every_launch_of_prefill_and_step(record, name, kw, static):
    """The decoder's prefill (T = 3) takes its first step (T = 1) into the same pass, on the
    state it leaves (meta); later steps need none: a dynamic decoder's growing past length P
    is not a new size."""
    passes, real = record
    model = _model(name, loss=False, **kw)
    dec = Decoder(model, backend="triton", static=static, max_len=8 if static else None)
    ids = torch.randint(0, model.config["vocab"], (2, 6),
                        generator=torch.Generator().manual_seed(1))
    state = dec.init_state(batch=2)
    snapshot = {k: v.clone() for k, v in state.items()}
    marks = []
    logits = []
    for t in (slice(0, 3), slice(3, 4), slice(4, 5), slice(5, 6)):
        marks.append(len(real))
        out, state = dec(ids[:, t], state)
        logits.append(out)
    marks.append(len(real))
    assert len(passes) == 1 and passes[0].stopped is None
    assert passes[0].launches == real[marks[0]:marks[2]]       # the prefill and first step
    if static:     # later steps: the same launches (a dynamic cache grows: new shapes)
        assert real[marks[2]:marks[3]] == real[marks[1]:marks[2]]
    # the same logits without passes
    dec2 = Decoder(model, backend="triton", static=static, max_len=8 if static else None)
    state2 = dec2.init_state(batch=2)
    assert all(torch.equal(snapshot[k], v) for k, v in state2.items())
    with warm_off():
        for t, want in zip((slice(0, 3), slice(3, 4), slice(4, 5), slice(5, 6)), logits):
            got, state2 = dec2(ids[:, t], state2)
            assert torch.equal(got, want)


@pytest.mark.parametrize("name,kw", [("blues01", {}), ("yoco", {}), ("optimus_prime", {}),
                                     ("yoco", {"sliding_window": 5})])
def test_pass_completes_on_every_zoo_program(record, name, kw):
    """The training step and the static decode step (prefill and T = 1) of the other zoo
    models run through the pass on meta tensors, with no op it cannot take."""
    from lmc.ops.reference import RefCtx
    from lmc.runtime.executor import bind_dims
    from lmc.runtime.function import _warm

    passes, real = record
    model = _model(name, **kw)
    prog = model.program()
    g = torch.Generator().manual_seed(0)
    V = model.config["vocab"]
    bound = dict(model.named_parameters())
    bound[model.graph.inputs[0].attrs["name"]] = torch.randint(0, V, (2, 5), generator=g)
    bound["targets"] = torch.randint(0, V, (2, 5), generator=g)
    _warm(prog, bound, RefCtx(dims=bind_dims(model.graph, bound), training=True))
    dec = Decoder(_model(name, loss=False, **kw), backend="triton", static=True, max_len=8)
    state = dec.init_state(batch=2)
    for T in (3, 1):
        ids = torch.randint(0, V, (2, T), generator=g)
        b = dec._bind(ids, state, torch.tensor([3 if T == 1 else 0]))
        dec._warm(b, RefCtx(dims=bind_dims(dec.graph, b)), state)
    # training; the prefill with its step; the step again: already warmed
    assert len(passes) == 2 and all(w.stopped is None for w in passes)
    assert all(len(w.launches) > 5 for w in passes)


def test_meta_like_keeps_layout():
    x = torch.randn(6, 10)[:, 3:]
    m = warm.meta_like(x)
    assert m.device.type == "meta" and m.shape == x.shape and m.stride() == x.stride()
    assert m.storage_offset() == x.storage_offset() and m.dtype == x.dtype
    assert warm.meta_like(3) == 3


def test_wanted_only_on_a_gpu(monkeypatch):
    class Prog:
        interpret = True
        warmed = set()

    class Ctx:
        device = torch.device("cuda")
        dims = {"B": 1, "T": 4}
    assert not warm.wanted(Prog(), Ctx())          # the interpreter: nothing to compile
    Prog.interpret = False
    Ctx.device = torch.device("cpu")
    assert not warm.wanted(Prog(), Ctx())
    # a GPU (its capture state stood in for): once per dims, with a pool, outside passes
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setenv("LMC_COMPILE_THREADS", "2")
    Ctx.device = torch.device("cuda")
    p = Prog()
    p.warmed = set()
    capturing[0] = True
    assert not warm.wanted(p, Ctx()) and not p.warmed   # not inside a capture, not marked
    capturing[0] = False
    monkeypatch.setenv("LMC_WARM", "0")
    assert not warm.wanted(p, Ctx())
    monkeypatch.setenv("LMC_WARM", "1")
    monkeypatch.setenv("LMC_COMPILE_THREADS", "1")
    assert not warm.wanted(p, Ctx())
    monkeypatch.setenv("LMC_COMPILE_THREADS", "2")
    with warm.WarmPass():
        assert not warm.wanted(p, Ctx())
    assert warm.wanted(p, Ctx()) and not warm.wanted(p, Ctx())      # once
    Ctx.dims = {"B": 1, "T": 1, "P": 7}
    assert warm.wanted(p, Ctx(), ignore=("P",))
    Ctx.dims = {"B": 1, "T": 1, "P": 8}
    assert not warm.wanted(p, Ctx(), ignore=("P",))                  # P is not a new size


@pytest.mark.parametrize("value", ["2", "on", ""])
def test_bad_setting_is_a_one_line_error(value, monkeypatch):
    monkeypatch.setenv("LMC_WARM", value)
    with pytest.raises(LmcError, match="LMC_WARM="):
        warm.enabled()


def test_a_pass_that_stops_says_so_once_and_the_backward_warms_at_its_own_run(record, capsys):
    """A forward that cannot run on meta tensors stops its pass (one line on stderr, not
    repeated); the backward, with no meta inputs then, gets its own pass at its first run;
    the step computes as without passes."""
    passes, real = record
    model = _model("llama")
    prog = model.program()
    fx = prog.forward_exec
    run = fx.run_program

    def picky(ctx, bound):
        if ctx.device.type == "meta":
            raise RuntimeError("no meta here\nsecond line")
        return run(ctx, bound)
    fx.run_program = picky
    loss, grads = _step(model, 2, 7)
    assert len(passes) == 2 and passes[0].stopped == "RuntimeError: no meta here"
    assert passes[1].stopped is None and passes[1].launches == real[-len(passes[1].launches):]
    assert len(passes[1].launches) > 10
    err = capsys.readouterr().err
    assert err.count("lmc: kernel warm-up of the forward program stopped (RuntimeError: no "
                     "meta here); its other kernels compile at their first launch") == 1
    model.zero_grad()
    _step(model, 3, 5)              # new dims: the forward stops again, said no more
    assert "warm-up" not in capsys.readouterr().err
    with warm_off():
        loss2, _ = _step(_model("llama"), 2, 7)
    assert torch.equal(loss, loss2)


def test_a_pass_with_compiles_says_how_many_and_how_long(monkeypatch, capsys):
    """On a GPU the pass's compiles are futures on the pool; the wait for them is announced
    (what the first step is waiting for) and timed, and failures are collected."""
    from concurrent.futures import Future

    from triton.runtime import _async_compile

    ok, bad = Future(), Future()
    ok.set_result("kernel")
    bad.set_exception(RuntimeError("ptxas says no\nlast line"))

    class Async:              # Triton's AsyncCompileMode, after two submissions
        def __init__(self, pool, ignore_errors):
            self.executor, self.raw_futures = pool, [ok, bad]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.raw_futures = []
    from lmc.codegen import autotune as at
    monkeypatch.setattr(_async_compile, "AsyncCompileMode", Async)
    monkeypatch.setenv("LMC_COMPILE_THREADS", "3")
    monkeypatch.setattr(at, "_POOL", None)
    with warm.WarmPass() as w:
        pass
    err = capsys.readouterr().err
    assert err.startswith("lmc: compiling (or loading from Triton's cache) 2 kernel variants "
                          "on 3 threads ... ") and \
        err.rstrip().endswith(" s"), err
    assert w.compiles == 2 and w.failed == ["RuntimeError: last line"]
    assert warm.HISTORY[-1] == {"programs": [], "launches": 0, "compiles": 2, "failed": 1,
                                "wait_s": round(w.wait_s, 3), "stopped": None}


def _submit(mode, key, fn, finalize):
    """AsyncCompileMode.submit across Triton releases (3.9 also takes a cleanup)."""
    try:
        return mode.submit(key, fn, finalize, lambda fk: None)
    except TypeError:
        return mode.submit(key, fn, finalize)


def test_an_interrupted_wait_leaves_no_compile_mode_on(monkeypatch):
    """Ctrl-C while the pass waits (here: raised where Triton finalizes a compile, in the
    waiting thread): Triton's AsyncCompileMode is off afterwards (Triton 3.6 would leave it
    on, and every later pass and autotuner warm-up would think someone else's was running)."""
    from triton.runtime._async_compile import active_mode

    def interrupt(kernel):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with warm.WarmPass() as w:
            _submit(w._async, "k", lambda: "kernel", interrupt)
    assert active_mode.get() is None and warm.active() is None


def test_an_interrupted_pass_drops_the_compiles_not_started(monkeypatch):
    import threading

    from triton.runtime._async_compile import active_mode

    from lmc.codegen import autotune as at
    monkeypatch.setenv("LMC_COMPILE_THREADS", "1")
    monkeypatch.setattr(at, "_POOL", None)
    gate = threading.Event()
    with pytest.raises(KeyboardInterrupt):
        with warm.WarmPass() as w:
            _submit(w._async, "k0", lambda: gate.wait(10) and "kernel", lambda k: None)
            for i in range(1, 5):
                _submit(w._async, f"k{i}", lambda: "kernel", lambda k: None)
            futures = list(w._async.raw_futures)
            threading.Timer(0.2, gate.set).start()
            raise KeyboardInterrupt
    assert sum(f.cancelled() for f in futures) == 4 and futures[0].result() == "kernel"
    assert active_mode.get() is None and w.compiles == 5 and w.failed == []


def test_a_users_error_is_left_to_the_real_run(record, capsys):
    """An LmcError in the pass (bad input) stops it without a note: the real run raises it,
    once, and a later genuine stop is still reported."""
    from lmc.codegen.warm import WarmPass

    model = _model("llama")
    fx = model.program().forward_exec

    def bad(ctx, bound):
        raise LmcError("sequence length 9 exceeds max_seq 8")
    fx.run_program = bad
    with WarmPass() as w:
        assert w.program(fx, {}, _Ctx()) is None
    assert w.stopped.startswith("LmcError:") and fx.warm_failed is None
    assert capsys.readouterr().err == ""


class _Ctx:
    dims = {"B": 1, "T": 1}
    device = torch.device("cpu")
