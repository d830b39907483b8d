"""codegen/autotune.py: a new key's configs are compiled together on the thread pool (under
Triton's AsyncCompileMode) before the autotuner times them; a known key compiles nothing.
Triton's real Autotuner, in the interpreter, where a warm-up compiles nothing: the test sees
which warm-ups were asked for, in what mode, and that the timed launches came after them."""
import pytest
import torch

from lmc.codegen import autotune as at  # lmc first: it sets TRITON_INTERPRET on a CPU
from lmc.codegen import warm


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _scale(X, Y, n, s, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i, mask=i < n) * s, mask=i < n)
    return _scale


@pytest.fixture
def tuner(monkeypatch):
    import triton
    import triton.testing
    from triton.runtime import _async_compile

    monkeypatch.setenv("LMC_COMPILE_THREADS", "2")
    monkeypatch.setattr(at, "_POOL", None)
    warm._install()     # the warm pass's launch hook sits under the recorder below
    events = []
    timed = iter(range(100, 0, -1))       # each config timed faster than the one before

    def bench(fn, warmup, rep, quantiles):
        events.append(("time",))
        fn()
        t = float(next(timed))
        return [t, t, t]
    monkeypatch.setattr(triton.testing, "do_bench", bench)
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (16, 32, 64) for w in (1, 2)]

    def prune(configs, nargs, **kw):        # tiles no wider than the problem
        return [c for c in configs if c.kwargs["BLOCK"] <= max(16, nargs["n"])]
    t = at.autotune(_kernel(), configs, ["n"], prune=prune)
    run = t.fn.run

    def record(*args, grid, warmup, **kw):
        events.append(("warmup" if warmup else "launch", kw["BLOCK"], kw["num_warps"],
                       _async_compile.active_mode.get() is not None))
        return run(*args, grid=grid, warmup=warmup, **kw)
    monkeypatch.setattr(t.fn, "run", record)
    return t, events


def _call(t, n):
    import triton

    x = torch.randn(n)
    y = torch.empty(n)
    t[lambda m: (triton.cdiv(n, m["BLOCK"]),)](x, y, n, 3.0)
    assert torch.equal(y, x * 3.0)


def test_new_key_compiles_its_configs_in_parallel_before_timing(tuner):
    t, events = tuner
    _call(t, 40)                  # BLOCK 64 pruned: four configs
    warm = [e for e in events if e[0] == "warmup"]
    assert sorted(e[1:3] for e in warm) == [(16, 1), (16, 2), (32, 1), (32, 2)]
    assert all(e[3] for e in warm)                  # each under AsyncCompileMode
    first_time = events.index(("time",))
    assert all(events.index(e) < first_time for e in warm)
    assert [e[0] for e in events].count("time") == 4
    assert not any(e[3] for e in events if e[0] == "launch")   # timed and run outside it
    # the fastest (last timed) config runs the call
    assert events[-1][:3] == ("launch", 32, 2)
    events.clear()
    _call(t, 40)                  # the same key: no warm-up, no timing, one launch
    assert events == [("launch", 32, 2, False)]
    _call(t, 20)                  # a new key: its two configs, warmed again
    assert sorted(e[1:3] for e in events if e[0] == "warmup") == [(16, 1), (16, 2)]


def test_warm_pass_compiles_a_new_keys_configs_and_runs_nothing(tuner):
    """codegen/warm.py: inside a warm pass a new key warms every pruned config (in the pass's
    AsyncCompileMode) and nothing is timed or run; the real call after it times them; a key
    the autotuner knows warms only its choice."""
    import triton

    t, events = tuner
    x = torch.randn(40)
    y = torch.full((40,), float("nan"))
    grid = lambda m: (triton.cdiv(40, m["BLOCK"]),)  # noqa: E731
    with warm.WarmPass() as w:
        assert t[grid](x, y, 40, 3.0) is None
    assert torch.isnan(y).all()                      # no kernel ran
    assert [d[0] for d in w.launches] == ["_scale"]  # the launch the pass saw
    assert ("time",) not in events
    warmed = [e for e in events if e[0] == "warmup"]
    assert sorted(e[1:3] for e in warmed) == [(16, 1), (16, 2), (32, 1), (32, 2)]
    assert all(e[3] for e in warmed) and len(warmed) == len(events)
    events.clear()
    _call(t, 40)                                     # the real run times the four
    assert [e[0] for e in events].count("time") == 4
    events.clear()
    with warm.WarmPass() as w:
        t[grid](x, y, 40, 3.0)
    assert torch.isnan(y).all() and ("time",) not in events and len(w.launches) == 1
    assert [e[1:3] for e in events] == [(32, 2)]     # the choice only, as a warm-up


def test_one_thread_compiles_in_turn(tuner, monkeypatch):
    """LMC_COMPILE_THREADS=1: the same hooks (a tuner made under one setting may run
    inside a warm pass under another), on a pool of one worker, so a new key's configs
    compile one after another as Triton's own would."""
    t, events = tuner
    monkeypatch.setenv("LMC_COMPILE_THREADS", "1")
    monkeypatch.setattr(at, "_POOL", None)
    assert t._lmc_parallel and at._pool()._max_workers == 1
    _call(t, 40)
    assert sorted(e[1:3] for e in events if e[0] == "warmup") == \
        [(16, 1), (16, 2), (32, 1), (32, 2)]


@pytest.mark.parametrize("disk", ["1", "0"])
def test_a_lone_surviving_config_is_taken_without_timing(disk, monkeypatch):
    """Pruning that leaves one config: the tuner takes it, times nothing and writes nothing,
    with or without the disk cache (Triton 3.9 does so itself; 3.6, the H100 image's, would
    time the one config and cache the timing: the hook does as 3.9 on both)."""
    import triton

    monkeypatch.setenv("LMC_AUTOTUNE_CACHE", disk)
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32)]
    t = at.autotune(_kernel(), configs, ["n"])

    def bench():
        raise AssertionError("a lone config was timed")
    assert t.check_disk_cache((7, "torch.float32"), configs[1:], bench) is True
    assert t.cache[(7, "torch.float32")] is configs[1]


@pytest.mark.parametrize("name,value", [("LMC_COMPILE_THREADS", "many"),
                                        ("LMC_AUTOTUNE_MS", "5"), ("LMC_AUTOTUNE_MS", "5,-1")])
def test_bad_settings_are_one_line_errors(name, value, monkeypatch):
    from lmc.errors import LmcError

    monkeypatch.setenv(name, value)
    with pytest.raises(LmcError, match=f"{name}={value!r}: expected"):
        at.compile_threads() if name == "LMC_COMPILE_THREADS" else at.bench_ms()
