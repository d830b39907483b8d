"""The warm pass (lmc/codegen/warm.py) through Triton's own JIT, on a machine without a GPU.

On a GPU, before a program's first run, the warm pass runs it on meta tensors with every
Triton launch turned into a compile under AsyncCompileMode, so the kernels (and each new
autotuner key's configs) compile together on the pool of lmc/codegen/autotune.py. This script
runs that pass here: the interpreter off, and a stand-in for Triton's driver that reports an
sm_90 device (compiling needs only the target; nothing is launched). It warms a zoo model's
training step (forward and backward in one pass, as runtime/function.py does before the first
step) for each thread count asked, each in a fresh process with an empty Triton cache, then
runs the pass a second time in the same process, which must compile nothing (every kernel the
step launches was compiled by the first), and no compile may fail. Meta tensors take no
memory, so the default size at the GPU benchmark's batch and length is cheap to warm here.

    .venv/bin/python benchmarks/warm_check.py [--model llama] [--preset tiny] [--precision bf16]
                                              [--mode train|decode] [--batch 2] [--seq 64]
                                              [--max-len 1024] [--threads 1,2] [--rng-steps 1,7]
                                              [--python /tmp/v36/bin/python] [--no-record]

--rng-steps (train) warms the step again at later draw counters, whose dropout seeds differ
from step 0's: each must compile nothing. --mode decode warms the static decoder as
benchmarks/decode_bench.py runs it (weights stored in the precision): the pass before its
prefill of --seq tokens, which takes its T = 1 step too.

Prints per thread count the launches the pass reached, the compiles it made (each kernel
variant and each config of a new autotuner key) and its wall
time (the compile time of a first training step, on this machine's CPUs), and appends them
to benchmarks/results/warm_check.jsonl with the machine, versions and date. Exit 1 if a pass
stopped or the second pass compiled anything.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(a) -> dict:
    """In a fresh process (TRITON_INTERPRET=0, LMC_COMPILE_THREADS and TRITON_CACHE_DIR set by
    the parent): the pass, twice, over the training step or the decoder's prefill and step."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    class StandIn:
        """Triton's driver as far as compiling goes: device 0, an sm_90 target."""
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True
    triton.runtime.driver.set_active(StandIn())
    sys.path.insert(0, ROOT)
    import lmc
    import lmc.runtime.triton_backend as tb
    from lmc.codegen import warm
    from lmc.ops.reference import RefCtx
    from lmc.passes import run_pipeline
    from lmc.passes.loss import with_loss
    from lmc.passes.mixed_precision import mixed_precision
    from lmc.runtime.executor import bind_dims
    from lmc.runtime.function import _warm
    from lmc.runtime.module import LmcModel

    tb._interpret = lambda: False       # kernels are Triton JIT functions, not interpreted
    passes = []

    class Recorded(warm.WarmPass):
        def __enter__(self):
            passes.append(self)
            return super().__enter__()
    warm.WarmPass = Recorded
    warm.wanted = lambda program, ctx, ignore=(): True      # no CUDA here to ask about
    preset = None if a.preset == "default" else a.preset
    g = lmc.load(os.path.join(ROOT, "zoo", f"{a.model}.yaml"), preset=preset).graph
    cuda = torch.device("cuda")
    if a.mode == "train":
        g = run_pipeline(with_loss(mixed_precision(g, a.precision)))
        model = LmcModel(g, backend="triton", seed=0)
        prog = model.program()
        bound = {k: warm.meta_like(p.detach()) for k, p in model.named_parameters()}
        for name in ("ids", "targets"):
            key = model.graph.inputs[0].attrs["name"] if name == "ids" else name
            bound[key] = torch.empty(a.batch, a.seq, dtype=torch.int64, device="meta")
        ctx = RefCtx(dims=bind_dims(model.graph, bound), device=cuda, training=True)
        steps = {"train": lambda: _warm(prog, bound, ctx)}
    else:
        # the static decoder as decode_bench.py runs it (weights stored in the precision):
        # the pass before its prefill of --seq tokens, which takes the T = 1 step too; the
        # flash-decoding split count
        # asks the GPU for its SMs: an H100's 132
        from lmc.passes.mixed_precision import low_precision_weights
        from lmc.runtime.decoder import Decoder
        torch.cuda.current_device = lambda: 0
        torch.cuda.get_device_properties = \
            lambda d=None: type("Props", (), {"multi_processor_count": 132})()
        model = LmcModel(low_precision_weights(g, a.precision), backend="triton", seed=0)
        dec = Decoder(model, backend="triton", static=True, max_len=a.max_len)
        state = dec.init_state(a.batch, torch.device("meta"))

        ids = torch.empty(a.batch, a.seq, dtype=torch.int64, device="meta")
        b = dec._bind(ids, state, torch.zeros(1, dtype=torch.int64, device="meta"))
        # the prefill's pass takes the T = 1 step too (runtime/decoder.py)
        steps = {"decode": lambda: dec._warm(
            b, RefCtx(dims=bind_dims(dec.graph, b), device=cuda), state)}
    out = {}
    for what, fn in steps.items():
        for i in range(2):
            t0 = time.perf_counter()
            fn()
            w = passes[-1]
            out[f"{what}{i + 1}"] = {"seconds": round(time.perf_counter() - t0, 2),
                                     "launches": len(w.launches), "compiles": w.compiles,
                                     "failed": w.failed, "stopped": w.stopped,
                                     "kernels": len({d[0] for d in w.launches})}
    if a.mode == "train":
        # later steps draw new dropout seeds: the step's kernels again at each rng_step
        out["rng_steps"] = {}
        for s in a.rng_steps:
            _warm(prog, bound, RefCtx(dims=ctx.dims, device=cuda, training=True, rng_step=s))
            out["rng_steps"][str(s)] = passes[-1].compiles
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--preset", default="tiny", help="a preset name, or 'default'")
    ap.add_argument("--mode", default="train", choices=["train", "decode"])
    ap.add_argument("--precision", default="bf16", choices=["f32", "bf16", "f16"])
    ap.add_argument("--max-len", type=int, default=1024, help="decode: the static cache length")
    ap.add_argument("--rng-steps", default="", metavar="S,S,...",
                    help="train: warm again at these draw counters (new dropout seeds); each "
                         "must compile nothing")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", default="1,2", help="comma-separated compile thread counts")
    ap.add_argument("--python", default=sys.executable,
                    help="the Python (and so the Triton) to run the pass with")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.rng_steps = [int(x) for x in a.rng_steps.split(",") if x]
    if a.child:
        print("RESULT " + json.dumps(child(a)))
        return 0
    rows, status = [], 0
    for n in [int(x) for x in a.threads.split(",") if x]:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, TRITON_INTERPRET="0", LMC_COMPILE_THREADS=str(n),
                       TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
                       LMC_CACHE=os.path.join(tmp, "lmc"), TRITON_DEFAULT_FP_FUSION="1")
            cmd = [a.python, os.path.abspath(__file__), "--child", "--model", a.model,
                   "--preset", a.preset, "--precision", a.precision, "--batch", str(a.batch),
                   "--seq", str(a.seq), "--mode", a.mode, "--max-len", str(a.max_len),
                   "--rng-steps", ",".join(map(str, a.rng_steps))]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            got = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not got:
                print(p.stdout[-2000:] + p.stderr[-4000:], file=sys.stderr)
                return 1
            r = json.loads(got[0][len("RESULT "):])
            triton_v = subprocess.run([a.python, "-c", "import triton; print(triton.__version__)"],
                                      capture_output=True, text=True).stdout.strip()
            for what in ("train",) if a.mode == "train" else ("decode",):
                first, second = r[f"{what}1"], r[f"{what}2"]
                later = r.get("rng_steps", {})
                ok = first["stopped"] is None and second["stopped"] is None and \
                    second["compiles"] == 0 and not first["failed"] and not any(later.values())
                status |= not ok
                print(f"{a.model} {a.preset} {a.precision} "
                      f"{'prefill + step' if what == 'decode' else what} B={a.batch} "
                      f"T={a.seq}, {n} thread(s), Triton "
                      f"{triton_v} for sm_90: warm pass {first['seconds']:.1f} s, "
                      f"{first['launches']} launches of {first['kernels']} kernels, "
                      f"{first['compiles']} compiles ({len(first['failed'])} failed); second "
                      f"pass {second['seconds']:.2f} s, {second['compiles']} compiles"
                      + (f"; at rng_step {', '.join(later)}: "
                         f"{', '.join(str(v) for v in later.values())} compiles" if later else "")
                      + ("" if ok else f"  FAILED {first} {second}"))
                rows.append({"model": a.model, "preset": a.preset, "precision": a.precision,
                             "what": what, "batch": a.batch, "seq": a.seq,
                             "max_len": a.max_len if a.mode == "decode" else None,
                             "threads": n, "triton": triton_v, "arch": 90,
                             "pass": first, "again": second, "rng_steps": later})
    if not a.no_record:
        import torch
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (no GPU: compile "
                           "only)", "torch": torch.__version__}
        with open(os.path.join(HERE, "results", "warm_check.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps({**meta, **r}) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
