"""Bytes the torch ops around lmc's kernels move in one training step, measured (no GPU).

`benchmarks/roofline.py` models what every kernel launch reads and writes, from the program.
What runs between the kernels in torch is only partly in its graph: a reshape that cannot be
a view copies, and a template's launcher (attention, linear attention, MoE) may make
temporaries, casts, zero fills and copies into its output buffers. This script runs one
forward and backward of the triton backend's training program with every Triton kernel
skipped (the interpreter's launch replaced by a no-op: values are garbage and unused, shapes
and allocations are real) under a TorchDispatchMode that records every aten op, and counts
the bytes each op that touches memory reads and writes: its tensor inputs and outputs, not
views, allocations or metadata ops. The optimizer step is not included.

    python benchmarks/torch_traffic.py                    # llama default, bf16, B=16 T=1024
    python benchmarks/torch_traffic.py --model yoco --preset tiny --batch-size 2 --seq-len 64
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zoo")

# aten ops that move no tensor data: allocations, views, metadata
_FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "view",
         "_unsafe_view", "as_strided", "permute", "expand", "slice", "select", "t",
         "transpose", "detach", "alias", "unsqueeze", "squeeze", "split", "split_with_sizes",
         "unbind", "_reshape_alias", "lift_fresh", "set_", "resize_", "is_same_size",
         "unfold", "narrow", "diagonal", "view_as", "expand_as", "reshape", "flatten",
         "movedim", "chunk", "_local_scalar_dense"}
_INDEXED = {"gather", "embedding", "index_select", "take"}
_WRITE_ONLY = {"zero_", "fill_", "zeros", "ones", "full", "zeros_like", "ones_like",
               "full_like", "arange", "randn", "rand", "normal_", "uniform_"}


def _sibling(name: str):
    """benchmarks/<name>.py as a module (this script is run by path, or loaded by a test)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"_lmc_bench_{name}", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(model: str, preset, precision: str, sets, batch: int, seq: int):
    """{aten op name: [calls, bytes]} for one forward + backward (kernels skipped)."""
    import torch
    import triton.runtime.interpreter as interp

    from lmc.runtime import triton_backend as tb

    roofline = _sibling("roofline")
    m = roofline.training_model(model, preset, precision, sets)
    m.program()                       # compile first: constant folding is not the step's
    vocab = m.config["vocab"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)

    real_run = interp.InterpretedFunction.run
    interp.InterpretedFunction.run = lambda self, *a, **k: None
    tb.BF16_SHAPES_ONLY = True        # the interpreter's bf16 refusal: nothing is computed
    try:
        def step():
            out = m(ids, targets=ids)
            out["loss"].backward()
        return count_traffic(step)
    finally:
        interp.InterpretedFunction.run = real_run
        tb.BF16_SHAPES_ONLY = False


def count_traffic(fn):
    """Run fn() and return {aten op name: [calls, bytes read and written]} of the ops it ran
    that touch tensor memory (views, allocations and metadata ops excluded; every allocation
    is zero-filled first, uncounted, so skipped kernels leave no out-of-range indices)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def tensors(xs):
        for x in xs:
            if isinstance(x, torch.Tensor):
                yield x
            elif isinstance(x, (list, tuple)):
                yield from tensors(x)

    def nbytes(t):
        return t.numel() * t.element_size()

    stats = collections.defaultdict(lambda: [0, 0])

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name.startswith("empty") or name.startswith("new_empty"):
                out.zero_()     # skipped kernels leave garbage: keep gather indices in range
            if name in _FREE:
                return out
            ins = list(tensors(list(args) + list((kwargs or {}).values())))
            outs = list(tensors([out]))
            storages = {t.untyped_storage().data_ptr() for t in ins}
            if outs and not name.endswith("_") and all(
                    o.untyped_storage().data_ptr() in storages for o in outs):
                return out      # a view of an input (a view op not listed in _FREE)
            if name in _INDEXED:       # reads rows or elements at indices, not the whole table
                by = 2 * sum(nbytes(o) for o in outs) + sum(
                    nbytes(t) for t in ins if not t.is_floating_point())
            elif name == "copy_":
                by = nbytes(ins[0]) + nbytes(ins[1])
            elif name in _WRITE_ONLY:
                by = sum(nbytes(o) for o in outs)
            elif name.endswith("_"):      # in place: reads its inputs, writes self
                by = sum(nbytes(t) for t in ins) + nbytes(ins[0])
            else:
                by = sum(nbytes(t) for t in ins) + sum(nbytes(o) for o in outs)
            s = stats[name]
            s[0] += 1
            s[1] += by
            return out

    with Count():
        fn()
    return dict(stats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _sibling("roofline").step_args(ap)
    a = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    stats = measure(a.model, None if a.preset == "default" else a.preset, a.precision,
                    a.set or None, a.batch_size, a.seq_len)
    total = sum(b for _, b in stats.values())
    print(f"{a.model} ({a.preset}) {a.precision}, B={a.batch_size} T={a.seq_len}: torch ops "
          f"around the kernels moved {total / 1e9:.2f} GB in one forward + backward")
    for name, (calls, by) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:28s} {calls:6d} calls {by / 1e9:9.3f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
