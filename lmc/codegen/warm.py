"""Compile a program's kernels together before its first run on a GPU: the warm pass.

On a GPU, Triton compiles a kernel (each new specialization of it: dtypes, sizes divisible
by 16, ...) when it is first launched, and a generated program launches its kernels one
after another, so a first run waits for every compile in turn: about a second each, a few
hundred for a model's first training step. lmc/codegen/autotune.py compiles the configs of
one autotuned call together; the warm pass does it for the whole program:

- the wrapper program runs once on **meta tensors** (the inputs' sizes, strides, storage
  offsets and dtypes, no memory and no data), the torch ops in it and in the launchers
  computing only shapes, and every Triton launch is turned into a `warmup` (compile, do not
  run) under Triton's `AsyncCompileMode`, so the compiles go to the thread pool of
  autotune.py and run together, and the pass waits for them all at its end;
- a meta tensor specializes as its real counterpart does (dtype, and a pointer 16-byte
  aligned when its storage offset is: real storages are), so the real run that follows finds
  its kernels compiled;
- an autotuned kernel whose choice is known (in memory, or in Triton's disk cache) warms that
  config; a new key warms all its pruned configs, which the real run then times;
- training warms the backward program in the same pass, on the forward's meta outputs
  (runtime/function.py): one batch of compiles for the whole step.

`TritonProgram.run` runs it before the first run for new dims, on CUDA only, outside CUDA
graph capture, with a pool of at least two threads (LMC_COMPILE_THREADS). It is best-effort: a
torch op that cannot run on meta tensors stops it (said once on stderr), and the kernels it
did not reach compile at their first launch as before. LMC_WARM=0 turns it off.

It works by wrapping `run` of Triton's JITFunction (and, for the tests, the interpreter's
InterpretedFunction) once per process: while a pass is active in the calling context, a
launch becomes a warm-up; otherwise the call is Triton's, unchanged.
"""
from __future__ import annotations

import copy
import os
import sys
import threading
import time
from collections import deque
from contextvars import ContextVar
from typing import Callable, Deque, Dict, Optional

import torch

from ..errors import LmcError

_MODE: ContextVar[Optional["WarmPass"]] = ContextVar("lmc_warm_pass", default=None)
# what the passes of this process did, latest last (benchmarks report it with first_step_s)
HISTORY: Deque[dict] = deque(maxlen=64)
_INSTALLED = False
_LOCK = threading.Lock()


def active() -> Optional["WarmPass"]:
    """The warm pass running in this context, if any."""
    return _MODE.get()


def enabled() -> bool:
    """LMC_WARM: 1 (default) or 0."""
    v = os.environ.get("LMC_WARM", "1")
    if v not in ("0", "1"):
        raise LmcError(f"LMC_WARM={v!r}: expected 1 (warm pass on, the default) or 0")
    return v == "1"


def _install() -> None:
    """Wrap `run` of Triton's JIT (and interpreted) functions: a launch inside a warm pass
    becomes a warm-up. Once per process; outside a pass the call is unchanged."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        from triton.runtime.jit import JITFunction
        classes = [JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction
            classes.append(InterpretedFunction)
        except ImportError:     # pragma: no cover - every supported Triton has it
            pass
        for cls in classes:
            cls.run = _wrapped(cls.run)
        _INSTALLED = True


def _wrapped(run):
    def run_(self, *args, grid, warmup, **kwargs):
        w = _MODE.get()
        if w is not None and not warmup:
            w.launches.append(describe(self, args, kwargs))
            warmup = True
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    run_.__wrapped__ = run
    return run_


def describe(fn, args, kwargs) -> tuple:
    """A launch as the warm pass saw it: the kernel, and per argument its dtype, sizes and
    strides (a tensor) or its value (the tests compare it with the real run's launches)."""
    def arg(a):
        if isinstance(a, torch.Tensor):
            return (str(a.dtype), tuple(a.shape), tuple(a.stride()),
                    a.storage_offset() * a.element_size() % 16)
        return a
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "?")
    return (name, tuple(arg(a) for a in args),
            tuple(sorted((k, arg(v)) for k, v in kwargs.items())))


def meta_like(t):
    """`t` as a meta tensor: the same sizes, strides, storage offset and dtype, no data."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return t
    n = max(t.untyped_storage().nbytes() // max(t.element_size(), 1), 1)
    base = torch.empty(n, dtype=t.dtype, device="meta")
    return base.as_strided(t.size(), t.stride(), t.storage_offset())


def wanted(program, ctx, ignore=()) -> bool:
    """Whether `program` (a TritonProgram) should be warmed before it runs with `ctx`: on
    CUDA, not in the interpreter, not inside another pass or a CUDA graph capture, with a
    pool of two threads or more, once per dims (those in `ignore` left out of the key: a
    dynamic decoder's past length P, new every step); the key is then marked, warmed or
    not."""
    if program.interpret or getattr(ctx.device, "type", None) != "cuda":
        return False
    key = dims_key(ctx, ignore)
    if key in program.warmed:         # every later step: no more checks
        return False
    from .autotune import compile_threads
    if _MODE.get() is not None or not enabled() or compile_threads() < 2 or \
            torch.cuda.is_current_stream_capturing():
        return False
    program.warmed.add(key)
    return True


def dims_key(ctx, ignore=()) -> tuple:
    """What `wanted` marks a program warmed for."""
    return tuple(sorted((k, v) for k, v in ctx.dims.items() if k not in ignore))


class WarmPass:
    """A warm pass: `with WarmPass() as w: w.program(prog, bound, ctx)` (one or more
    programs); on leaving, it waits for every compile it started."""

    def __init__(self):
        self.launches = []          # each launch turned into a warm-up (describe)
        self.stopped: Optional[str] = None
        self.compiles = 0           # variants it compiled or loaded from Triton's disk cache
        self.failed = []            # those that failed: each is compiled again at its launch
        self.wait_s = 0.0           # how long the pass waited for them at its end
        self.programs = []          # the labels of the programs it ran
        self._async = None

    def __enter__(self):
        _install()
        from triton.runtime._async_compile import AsyncCompileMode, active_mode

        from .autotune import _pool
        if active_mode.get() is None:
            self._async = AsyncCompileMode(_pool(), ignore_errors=True)
            self._async.__enter__()
        self._token = _MODE.set(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        _MODE.reset(self._token)
        if self._async is not None:
            from triton.runtime._async_compile import active_mode

            # waits for every compile; one that failed is compiled again at its launch (no
            # Triton release keeps a failed one), where the error is reported as it always is
            futures = list(self._async.raw_futures)
            try:
                if exc_type is not None:     # interrupted (or a bug): drop what has not started
                    for f in futures:
                        f.cancel()
                elif futures:   # the user sees why the first step waits, and for how long
                    print(f"lmc: compiling (or loading from Triton's cache) {len(futures)} "
                          f"kernel variants on {self._pool_size()} threads ...", end="",
                          file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                self._async.__exit__(None, None, None)
                if futures and exc_type is None:
                    self.wait_s = time.perf_counter() - t0
                    print(f" {self.wait_s:.1f} s", file=sys.stderr, flush=True)
            finally:
                # Triton 3.6 leaves its mode on when the wait above is interrupted
                if active_mode.get() is self._async:
                    active_mode.set(None)
            self.compiles = len(futures)
            self.failed = [f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
                           for f in futures if not f.cancelled()
                           and (e := f.exception()) is not None]
        HISTORY.append({"programs": self.programs, "launches": len(self.launches),
                        "compiles": self.compiles, "failed": len(self.failed),
                        "wait_s": round(self.wait_s, 3), "stopped": self.stopped})
        return False

    def _pool_size(self) -> int:
        return getattr(getattr(self._async, "executor", None), "_max_workers", 0) or 1

    def program(self, program, bound: Dict[str, torch.Tensor], ctx,
                run: Optional[Callable] = None) -> Optional[dict]:
        """Run `program`'s wrapper (or `run(ctx, bound)`: a Decoder runs its step node by
        node) on meta copies of `bound`: its outputs (meta tensors), or None if a step could
        not run on meta tensors (`stop`)."""
        self.programs.append(program.label)
        try:
            mctx = copy.copy(ctx)
            mctx.device = torch.device("meta")
            mbound = {k: meta_like(v) for k, v in bound.items()}
            with torch.no_grad():
                return (run or program.run_program)(mctx, mbound)
        except Exception as e:       # best-effort: the real run compiles what is left
            self.stop(program, e)
            return None

    def follow(self, program, key: tuple, outs: Optional[dict], make: Callable,
               run: Optional[Callable] = None) -> None:
        """Warm `program` on inputs made from an earlier program's meta outputs `outs`
        (`make(outs)` -> (bound, ctx)): a backward on its forward's, a decode step on its
        prefill's. When there are none (the earlier one stopped) or making them fails, the
        program is unmarked for `key` (its dims as `wanted` marked them) and warms at its own
        first run."""
        if outs is not None:
            try:
                bound, ctx = make(outs)
            except Exception as e:       # best-effort, as `program`
                self.stop(program, e)
            else:
                self.program(program, bound, ctx, run=run)
                return
        program.warmed.discard(key)

    def stop(self, program, e: Exception) -> None:
        """The pass could not go on with `program`: said once per program on stderr, unless
        it is the user's error (an LmcError), which the real run reports itself."""
        msg = str(e).strip().splitlines()
        self.stopped = f"{type(e).__name__}: {msg[0] if msg else ''}"
        if not isinstance(e, LmcError) and not program.warm_failed:
            program.warm_failed = self.stopped
            print(f"lmc: kernel warm-up of the {program.label} program stopped "
                  f"({self.stopped}); its other kernels compile at their first launch",
                  file=sys.stderr)
