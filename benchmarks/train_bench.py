"""Training throughput: zoo/llama on lmc's triton backend next to a hand-written PyTorch
Llama (tests/reference_llama.py) in eager mode and under torch.compile, in one run.

    python benchmarks/train_bench.py                      # H100: default size, B=16, T=1024
    python benchmarks/train_bench.py --tiny               # CPU smoke run (interpreter)

Each contender runs whole training steps (forward, cross-entropy, backward, AdamW step) on
the same batch; the figure is the median step time over --steps timed steps after --warmup
untimed ones (CUDA: events around each step; CPU: perf_counter, labelled as CPU), as tokens/s,
with the peak memory allocated during the timed steps, and the wall time of the first step
(compilation and autotuning included). lmc computes in bf16 through its mixed-precision pass
(fp32 master weights); the references under torch.autocast(bf16). The JSON is rewritten after
every contender, and a contender that fails is recorded with its error.
Prints a table and writes JSON (device, torch/triton versions, date, every figure).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lmc  # noqa: E402,F401  (sets TRITON_INTERPRET without CUDA, before triton is imported)
from lmc.bench import Clock  # noqa: E402


def measure(name, step, args, device, tokens):
    clock = Clock(device)
    t0 = time.perf_counter()         # the first step: compiles and autotunes (wall clock)
    step()
    clock.sync()
    first = time.perf_counter() - t0
    times = clock.repeat(lambda i: step(), args.steps, max(args.warmup - 1, 0))
    med = statistics.median(times)
    peak = clock.peak_gib()
    r = {"name": name, "median_step_s": med, "tokens_per_s": tokens / med,
         "min_step_s": min(times), "peak_gib": peak, "steps": len(times),
         "first_step_s": first}
    print(f"{name:<28} {tokens / med:>12,.0f} tokens/s   step {med * 1e3:8.1f} ms"
          + (f"   peak {peak:6.2f} GiB" if peak is not None else "")
          + f"   first step {first:6.1f} s", flush=True)
    return r


def lmc_step(args, device, ids, targets):
    from lmc.driver import compile_model
    from lmc.passes import run_pipeline
    from lmc.passes.loss import with_loss
    from lmc.passes.mixed_precision import mixed_precision
    from lmc.runtime.module import LmcModel

    c = compile_model(os.path.join(ROOT, "zoo", "llama.yaml"), args.preset, args.set)
    g = run_pipeline(with_loss(mixed_precision(c.graph, args.precision)))
    model = LmcModel(g, backend=args.backend, grad_outputs=["loss"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(ids, targets=targets)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, c.graph.meta["config"], model


def reference_step(cfg, device, ids, targets, precision, compiled):
    from reference_llama import Llama

    model = Llama.from_config(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if compiled else model
    dt = {"bf16": torch.bfloat16, "f16": torch.float16}.get(precision)

    def step():
        with torch.autocast(device.type, dtype=dt, enabled=dt is not None):
            logits = fwd(ids)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default="bf16", choices=["f32", "bf16", "f16"])
    ap.add_argument("--backend", default="triton", choices=["triton", "torch"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["lmc", "eager", "compile"])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "train_bench.json"))
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke run: tiny preset, B=2, T=16, 2 steps, f32, no compile")
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.batch_size, args.seq_len = "tiny", 2, 16
        args.steps, args.warmup, args.precision = 2, 1, "f32"
        args.skip = sorted(set(args.skip) | {"compile"})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    import triton

    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "timing": "cuda events" if device.type == "cuda" else "cpu perf_counter",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "preset": args.preset,
            "set": args.set, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "precision": args.precision, "lmc_backend": args.backend}
    print(json.dumps(meta))
    tokens = args.batch_size * args.seq_len
    gen = torch.Generator().manual_seed(0)
    results = []

    def save():   # after every contender: a run cut short keeps what it measured
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**meta, "results": results}, f, indent=2)
    from lmc.driver import compile_model
    cfg = compile_model(os.path.join(ROOT, "zoo", "llama.yaml"), args.preset,
                        args.set).graph.meta["config"]
    ids = torch.randint(0, cfg["vocab"], (args.batch_size, args.seq_len), generator=gen)
    targets = torch.randint(0, cfg["vocab"], (args.batch_size, args.seq_len), generator=gen)
    ids, targets = ids.to(device), targets.to(device)
    contenders = []
    if "lmc" not in args.skip:
        contenders.append((f"lmc ({args.backend})",
                           lambda: lmc_step(args, device, ids, targets)[0]))
    for name, compiled in (("eager", False), ("compile", True)):
        if name not in args.skip:
            contenders.append((f"pytorch {'torch.compile' if compiled else 'eager'}",
                               (lambda c: lambda: reference_step(cfg, device, ids, targets,
                                                                 args.precision, c))(compiled)))
    for name, make in contenders:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            results.append(measure(name, make(), args, device, tokens))
            if name.startswith("lmc") and args.backend == "triton":
                from lmc.codegen import warm
                from lmc.codegen.matmul import tuned_configs
                results[-1]["matmul_configs"] = tuned_configs()   # the autotuner's picks
                # the first step's warm pass (GPU): compiles, failures, its wait
                results[-1]["warm_passes"] = list(warm.HISTORY)
        except Exception as e:  # noqa: BLE001 - one contender failing must not lose the rest
            first = (str(e).strip().splitlines() or [""])[0]
            results.append({"name": name, "error": f"{type(e).__name__}: {first}"})
            print(f"{name:<28} failed: {results[-1]['error']}", flush=True)
        save()
    save()
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
