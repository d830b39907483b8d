"""`triton.autotune` as lmc's kernels use it on a GPU: configs compiled in parallel, short
timings, choices kept on disk.

Triton's autotuner meets a new key (shapes, dtypes) by compiling and timing each config in
turn (zoo/llama's first bf16 training step: 238 compiles, kernels and autotuner configs,
benchmarks/warm_check.py), which made that step minutes long, and 125 ms of timing per
config (`triton.testing.do_bench`'s defaults). Here

- the configs of a key are compiled together on a thread pool before they are timed (Triton's
  `AsyncCompileMode`: the compiler's passes and ptxas run without the GIL), so a key costs
  about its slowest compile rather than the sum;
- each config is timed for `LMC_AUTOTUNE_MS` (default "5,25": warm-up and measured ms),
  enough repetitions for kernels of microseconds to milliseconds;
- the chosen config is cached on disk with the compiled kernels (Triton's `cache_results`,
  keyed by the key, the configs, the kernel's source and the GPU), so a second process skips
  the timing; `LMC_AUTOTUNE_CACHE=0` turns that off.

`LMC_COMPILE_THREADS` bounds the pool (default: the CPU count, at most 32; 1 compiles in
turn). The interpreter never autotunes (fixed blocks), so this is GPU-only code. The warm pass
(warm.py) compiles whole programs on the same pool; inside one, the hooks below warm a known
key's choice, or every config of a new key, and time nothing.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from ..errors import LmcError
from . import warm

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    global _POOL
    _POOL = None


# a forked child has the pool object but not its threads: it makes its own
os.register_at_fork(after_in_child=_forget_pool)


def _ints(name: str, default: str, n: int) -> tuple:
    v = os.environ.get(name, default)
    try:
        out = tuple(int(x) for x in v.split(","))
    except ValueError:
        out = ()
    if len(out) != n or min(out) < 0:
        want = "a count" if n == 1 else f"{n} comma-separated counts"
        raise LmcError(f"{name}={v!r}: expected {want} (default {default})")
    return out


def compile_threads() -> int:
    """LMC_COMPILE_THREADS, default the CPU count (at most 32)."""
    (n,) = _ints("LMC_COMPILE_THREADS", str(max(1, min(32, os.cpu_count() or 1))), 1)
    return max(1, n)


def bench_ms() -> tuple:
    """LMC_AUTOTUNE_MS: (warm-up, measured) milliseconds per config."""
    return _ints("LMC_AUTOTUNE_MS", "5,25", 2)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(compile_threads(), thread_name_prefix="lmc-compile")
        return _POOL


def precompile(tuner, configs, args, kwargs) -> None:
    """Compile `configs` of the autotuned kernel for the call (args, kwargs) on the thread
    pool, waiting for all: each goes into the kernel's in-memory cache (and Triton's disk
    cache), so timing it launches at once. A config that fails to compile is left to the
    autotuner, which compiles it again, alone, and skips it as it always has."""
    from triton.runtime._async_compile import AsyncCompileMode, active_mode

    if active_mode.get() is not None:     # the caller's own async compile: leave it be
        return
    with AsyncCompileMode(_pool(), ignore_errors=True):
        _warm_configs(tuner, configs, args, kwargs)


def _warm_configs(tuner, configs, args, kwargs) -> None:
    """Ask for a warm-up (a compile, under the active AsyncCompileMode) of each config."""
    kw = {k: v for k, v in kwargs.items() if k != "warmup"}
    for c in configs:
        try:
            tuner.fn.warmup(*args, **kw, **c.all_kwargs())
        except Exception:     # binding errors: the serial path reports them
            pass


class _Miss(Exception):
    """The warm pass met a key neither cache holds."""


class _Warmed(Exception):
    """The warm pass asked for every config of a new key: nothing to launch."""


def autotune(kernel, configs, key, prune=None):
    """`triton.autotune(configs, key, prune_configs_by={"early_config_prune": prune})` of
    `kernel`, with the parallel compile, the short timings and the disk cache above."""
    import triton
    import triton.testing

    warm, rep = bench_ms()

    def do_bench(fn, quantiles):
        return triton.testing.do_bench(fn, warmup=warm, rep=rep, quantiles=quantiles)

    tuner = triton.autotune(
        configs=configs, key=key, do_bench=do_bench,
        prune_configs_by={"early_config_prune": prune} if prune else None,
        cache_results=os.environ.get("LMC_AUTOTUNE_CACHE", "1") != "0")(kernel)
    return parallel(tuner)


def parallel(tuner):
    """Make `tuner` (a triton Autotuner) compile a new key's configs on the pool before it
    times them. The hook is the autotuner's benchmark step, which runs only when neither its
    memory nor its disk cache holds the key: a cached key compiles only the config it uses."""
    if not hasattr(tuner, "check_disk_cache") or not hasattr(tuner, "run"):
        return tuner                # an autotuner this code does not know
    run, check = tuner.run, tuner.check_disk_cache
    call = threading.local()      # the arguments of the call being tuned, per thread

    def run_(*args, **kwargs):
        call.args = (args, kwargs)
        try:
            return run(*args, **kwargs)
        except _Warmed:       # a launch the warm pass saw (its configs are compiling)
            warm.active().launches.append(warm.describe(
                tuner.fn, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}))
            return None
        finally:
            call.args = None

    def check_(tuning_key, configs, bench, disk=True):
        if len(configs) == 1:
            # Triton >= 3.7 takes a lone surviving config without timing it; 3.6 (the
            # H100 image's) times it and, with the disk cache, writes it: do as the newer
            tuner.cache[tuning_key] = configs[0]
            return True
        disk_key = tuning_key if disk else None     # None: Triton only benches
        if warm.active() is not None:
            # the warm pass (codegen/warm.py): a choice on disk warms that config (the
            # launch that follows is a warm-up); a new key warms every config, nothing is
            # timed or written, and the real run times them
            def miss():
                raise _Miss()
            try:
                return check(disk_key, configs, miss)
            except _Miss:
                args = getattr(call, "args", None)
                if args is not None:
                    _warm_configs(tuner, configs, *args)
                raise _Warmed() from None

        def bench_():
            args = getattr(call, "args", None)
            if len(configs) > 1 and args is not None:
                precompile(tuner, configs, *args)
            return bench()
        return check(disk_key, configs, bench_)

    tuner.run, tuner.check_disk_cache = run_, check_
    tuner._lmc_parallel = True
    if not tuner.cache_results:
        # without the disk cache Triton benches directly; with a key of None its
        # check_disk_cache only benches (and reports a miss): the hook again
        tuner.cache_results = True
        tuner.check_disk_cache = lambda tuning_key, configs, bench: check_(
            tuning_key, configs, bench, disk=False)
    return tuner
