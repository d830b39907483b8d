"""Compile every Triton kernel a model launches for an NVIDIA GPU, on a machine without one.

The CPU suite runs kernels in Triton's interpreter, which accepts programs the GPU compiler
rejects (dot tiles under 16, some type mixes, ...) and has no notion of shared memory. This
script runs one training step and a few decode steps of each zoo model (tiny preset) on the
triton backend in the interpreter, records every kernel launch (the kernel, its argument
types and constexpr values), then compiles each distinct launch with Triton's own compiler
for a target GPU (default sm_90, the H100) down to a cubin, in a second process with the
interpreter off, and checks its shared memory against the device's limit. A kernel the GPU
autotunes is compiled in each of its GPU configurations instead of the interpreter's; every
other kernel is recorded with the block sizes and launch options it gets on a GPU
(LMC_GPU_BLOCKS=1, lmc.codegen.interpreter_blocks). The bf16 programs (mixed-precision
training, bf16-weight decode) run in the interpreter too, only to be recorded: Triton's
interpreter computes bf16 on bit patterns, so their values are garbage and unused.

    .venv/bin/python benchmarks/compile_check.py [--models llama,yoco] [--arch 90] [--limit N]
                                                 [--precision f32,bf16] [--jobs P] [--threads N]
                                                 [--only MODULE_PREFIX] [--kernels NAME_PREFIX]
                                                 [--compiler-python /path/to/venv/bin/python]

Exit 1 when a kernel fails to compile or needs more shared memory than the GPU has (an
autotuned kernel's config over the limit is reported as skipped: the autotuner skips a config
that cannot launch; it fails only if none of the configs fits). Shapes
are the tiny presets' (block sizes chosen from shapes can differ at full size).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zoo")
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
MODELS = {"llama": {}, "blues01": {}, "minimax": {}, "yoco": {},
          "yoco-window": {"sliding_window": 5}, "optimus_prime": {},
          "medit_one": {"moe": 1},
          # outside the zoo (examples/): attention with no RoPE, soft-capped scores, ALiBi
          # (both forms), a sigmoid MoE router
          "gpt2": {}, "gemma2": {}, "mpt": {}, "bloom": {},
          # the default's router: 64 experts, top-6 from 4 of 8 groups
          "deepseek_moe": {"experts": 64, "top_k": 6, "groups": 8, "topk_groups": 4},
          "mamba2": {}, "gpt_oss": {},
          "diff_transformer": {}, "gla": {},
          "rwkv6": {"d": 128, "head_size": 64},     # the default head size
          "falcon": {}, "retnet": {}, "llama3_meta": {}}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376}      # bytes per block (opt-in maximum)


def record(models, out_path, precisions=("f32",)):
    """Interpreter side: run each model in each precision, write the distinct launches to
    out_path. The kernels take the block sizes and launch options a GPU would
    (LMC_GPU_BLOCKS=1). bf16 ("bf16": the mixed-precision program for training, bf16 weights
    for decode, as benchmarks/decode_bench.py runs it) executes in the interpreter only to be
    recorded: it computes on bit patterns, so its values are garbage and go nowhere."""
    import torch
    import triton.runtime.interpreter as interp

    import lmc
    import lmc.runtime.triton_backend as tb
    from lmc.passes import run_pipeline
    from lmc.passes.loss import with_loss
    from lmc.passes.mixed_precision import low_precision_weights, mixed_precision
    from lmc.runtime.decoder import Decoder
    from lmc.runtime.module import LmcModel

    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8",
             torch.int8: "i8"}
    seen = {}
    orig = interp.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        sig = inspect.signature(fn)
        bound = sig.bind(*args, **kwargs)
        signature, consts = {}, {}
        for name, p in sig.parameters.items():
            if name in bound.arguments:
                v = bound.arguments[name]
            elif p.default is not inspect.Parameter.empty:
                v = p.default
            else:
                continue
            if "constexpr" in str(p.annotation) or v is None:
                signature[name] = "constexpr"
                consts[name] = getattr(v, "value", v)
            elif torch.is_tensor(v):
                signature[name] = "*" + types[v.dtype]
            elif isinstance(v, bool):
                signature[name] = "i1"
            elif isinstance(v, int):
                signature[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
            elif isinstance(v, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{fn.__qualname__}: argument {name} of type {type(v)}")
        item = {"module": fn.__module__, "file": inspect.getsourcefile(fn), "name": fn.__name__,
                "signature": signature, "constexprs": consts, "options": options}
        seen[json.dumps(item, sort_keys=True)] = item
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs, **options)

    interp.InterpretedFunction.run = run
    os.environ["LMC_GPU_BLOCKS"] = "1"
    try:
        for name in models:
            sets = MODELS[name]
            base = name.split("-")[0] + ".yaml"
            path = os.path.join(ZOO, base)
            if not os.path.exists(path):
                path = os.path.join(EXAMPLES, base)
            f32 = lmc.load(path, preset="tiny", backend="triton", **sets).eval()
            for prec in precisions:
                tb.BF16_SHAPES_ONLY = prec == "bf16"
                g = run_pipeline(with_loss(mixed_precision(f32.graph, prec)))
                m = LmcModel(g, backend="triton")
                vocab = m.config["vocab"]
                ids = torch.randint(0, vocab, (2, 19),
                                    generator=torch.Generator().manual_seed(0))
                m(ids, targets=ids)["loss"].backward()
                model = f32
                if prec != "f32":
                    model = LmcModel(low_precision_weights(f32.graph, prec), backend="triton")
                    dt = {"bf16": torch.bfloat16, "f16": torch.float16}[prec]
                    model.load_state_dict({k: v.to(dt) for k, v in f32.state_dict().items()})
                    model = model.eval()
                for static in (False, True):
                    dec = Decoder(model, "triton", static=static,
                                  max_len=24 if static else None)
                    st = dec.init_state(2)
                    with torch.no_grad():
                        # a 17-token prefill (past the linear attentions' recurrent limit
                        # of 16: their chunked kernels from a state), then one step
                        _, st = dec(ids[:, :17], st)
                        _, st = dec(ids[:, 17:18], st)
                print(f"recorded {name} {prec}: {len(seen)} distinct launches so far",
                      flush=True)
    finally:
        interp.InterpretedFunction.run = orig
        tb.BF16_SHAPES_ONLY = False
        os.environ.pop("LMC_GPU_BLOCKS", None)
    with open(out_path, "w") as f:
        json.dump(list(seen.values()), f)


def compile_all(in_path, arch, limit_variants=None, only=None, shard=(0, 1),
                threads=1, kernels=None) -> int:
    """Compiler side (interpreter off): compile each recorded launch for the target (the
    launches i with i % n == k for shard (k, n)), on `threads` threads (Triton's compiler
    drops the GIL, as lmc/codegen/autotune.py relies on for an autotuned key's configs)."""
    from concurrent.futures import ThreadPoolExecutor

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from lmc.codegen.matmul import gpu_configs
    items = [it for i, it in enumerate(json.load(open(in_path)))
             if (only is None or it["module"].startswith(only))
             and (kernels is None or it["name"].startswith(kernels))
             and i % shard[1] == shard[0]]
    modules = {}
    target = GPUTarget("cuda", arch, 32)
    limit = SMEM_LIMIT.get(arch)
    failed, skipped, worst = [], [], (0, "")
    t0 = time.perf_counter()
    # every launch's variants (an autotuned kernel: each of its GPU configurations), then
    # each distinct variant compiled once
    launches, tasks = [], {}
    for it in items:
        f = it["file"]
        if f not in modules:
            if it["module"].startswith("lmc."):      # a template: lmc/codegen/*.py
                modules[f] = importlib.import_module(it["module"])
            else:                                   # a generated module in the kernel cache
                spec = importlib.util.spec_from_file_location(f"_cc_{len(modules)}", f)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = mod
                spec.loader.exec_module(mod)
                modules[f] = mod
        obj = getattr(modules[f], it["name"])
        fn = obj
        while not isinstance(fn, JITFunction):       # an Autotuner/Heuristics wrapper
            fn = fn.fn
        # on a GPU an autotuned kernel runs one of its configurations, not the block sizes
        # the interpreter used: compile each of those instead
        variants = [(it["constexprs"], it["options"])]
        configs = obj.configs if isinstance(obj, Autotuner) else None
        tuned = {id(j): k for k, j in getattr(modules[f], "_JIT", {}).items()}
        if id(obj) in tuned:           # attention.py autotunes at launch: _configs(kind)
            configs = modules[f]._configs(tuned[id(obj)])
        if it["name"].startswith("lmc_mm_"):   # generated matmuls: codegen/matmul.py's list
            configs = gpu_configs(split="SPLIT_K" in fn.arg_names)
        if configs:
            variants = [({**it["constexprs"], **c.kwargs},
                         {"num_warps": c.num_warps, "num_stages": c.num_stages})
                        for c in configs]
        keys = []
        for consts, options in variants:
            key = json.dumps([f, it["name"], it["signature"], consts, options], sort_keys=True)
            if key not in tasks and (limit_variants is None or len(tasks) < limit_variants):
                what = f"{os.path.basename(f)}:{it['name']} {consts} {options or ''}"
                tasks[key] = (fn, it["signature"], consts, options, what)
            if key in tasks:
                keys.append(key)
        launches.append((bool(configs), keys))

    def build(task):
        fn, signature, consts, options, what = task
        try:
            src = ASTSource(fn=fn, signature=signature, constexprs=consts)
            return triton.compile(src, target=target, options=options or None).metadata.shared
        except Exception as e:          # report every failure, not just the first
            msg = str(e).strip().splitlines()
            return f"{what}: {type(e).__name__}: {msg[-1] if msg else ''}"
    with ThreadPoolExecutor(max(1, threads)) as pool:
        result = dict(zip(tasks, pool.map(build, tasks.values())))
    reported = set()
    for autotuned, keys in launches:
        over, fits = [], 0
        for key in keys:
            what, shared = tasks[key][4], result[key]
            if isinstance(shared, str):
                if key not in reported:
                    failed.append(shared)
                    reported.add(key)
            elif limit is not None and shared > limit:
                over.append((key, f"{what}: needs {shared} B of shared memory (limit {limit})"))
            else:
                fits += 1
                worst = max(worst, (shared, what))
        # an autotuner skips a config that cannot launch (Triton's OutOfResources): one over
        # the limit is a failure only for a kernel launched as it is, or if no config fits
        for key, line in over:
            if key not in reported:
                (skipped if autotuned and fits else failed).append(line)
                reported.add(key)
    print(f"compiled {len(tasks) - len(failed) - len(skipped)}/{len(tasks)} kernel variants "
          f"({len(items)} launches) with Triton {triton.__version__} for sm_{arch} in "
          f"{time.perf_counter() - t0:.0f} s on {max(1, threads)} thread(s); {len(skipped)} "
          f"autotuner configs over the shared memory (skipped at run time); most shared "
          f"memory {worst[0]} B ({worst[1]})")
    for line in skipped:
        print("SKIPPED", line)
    for line in failed:
        print("FAILED", line)
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    ap.add_argument("--precision", default="f32,bf16",
                    help="comma-separated programs to record: f32, bf16, f16 (default "
                         "f32,bf16: what the GPU tests and benchmarks run)")
    ap.add_argument("--launches", default=None, help="where to keep the recorded launches")
    ap.add_argument("--only", default=None, metavar="MODULE_PREFIX",
                    help="compile only kernels of these modules (lmc.codegen: the templates)")
    ap.add_argument("--kernels", default=None, metavar="NAME_PREFIX",
                    help="compile only kernels whose name starts so (lmc_red_: the "
                         "reduction kernels)")
    ap.add_argument("--compiler-python", default=sys.executable, metavar="PYTHON",
                    help="the Python (and so the Triton) that compiles the recorded launches, "
                         "e.g. a venv with the GPU machine's Triton release")
    ap.add_argument("--limit", type=int, default=None,
                    help="compile at most this many kernel variants (a quick check)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="compiler processes (each takes every n-th launch)")
    ap.add_argument("--threads", type=int, default=1,
                    help="compiler threads in each process")
    ap.add_argument("--compile-only", metavar="FILE", help=argparse.SUPPRESS)
    ap.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.compile_only:
        k, n = map(int, a.shard.split("/"))
        return compile_all(a.compile_only, a.arch, a.limit, a.only, (k, n), a.threads,
                           a.kernels)
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        print(f"compile_check: unknown model {bad[0]!r} (known: {', '.join(MODELS)})",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_INTERPRET", "1")
    path = a.launches or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                      f"lmc_launches_{os.getpid()}.json")
    precs = [p for p in a.precision.split(",") if p]
    if any(p not in ("f32", "bf16", "f16") for p in precs):
        print(f"compile_check: unknown precision in {a.precision!r} (f32, bf16, f16)",
              file=sys.stderr)
        return 2
    record(models, path, precs)
    env = dict(os.environ, TRITON_INTERPRET="0")
    extra = ([] if a.limit is None else ["--limit", str(a.limit)]) + \
        ([] if a.only is None else ["--only", a.only]) + ["--threads", str(a.threads)] + \
        ([] if a.kernels is None else ["--kernels", a.kernels])
    jobs = max(1, a.jobs)
    procs = [subprocess.Popen([a.compiler_python, os.path.abspath(__file__), "--compile-only",
                               path, "--arch", str(a.arch), "--shard", f"{k}/{jobs}", *extra],
                              env=env) for k in range(jobs)]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
