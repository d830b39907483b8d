"""Decode throughput: zoo/llama single-token generation on lmc's static decode step (CUDA
graph) next to a hand-written PyTorch Llama with a static KV cache (benchmarks/
static_kv_llama.py), eager and under torch.compile(mode="reduce-overhead"), in one run.

    python benchmarks/decode_bench.py                               # H100: default size, bf16
    python benchmarks/decode_bench.py --preset tiny --device cpu --tokens 8   # CPU smoke run

All contenders hold the same weights (lmc's initialisation, copied into the reference), the
same batch (default 1) and the same cache length (max_len = prompt + warm-up + timed tokens,
every cache preallocated to it). Each prefills the same random prompt, then generates greedily
with the next token chosen on the device (argmax; no host sync inside the loop): --warmup
untimed steps (compilation and CUDA-graph capture happen there), then --repeats runs of
--tokens timed steps (CUDA: events around each run; CPU: perf_counter, labelled as CPU). The
figure is batch x tokens / the median run time. `agree` is the fraction of generated tokens
equal to the eager reference's (bf16 rounding may make greedy paths part after a while).

lmc in bf16: the forward graph goes through the mixed-precision pass (matmuls in bf16) and
then `low_precision_weights` (lmc/passes/mixed_precision.py) stores the parameters
themselves in bf16 (a matmul reads its weight as stored, no per-step cast; an embedding
gathers bf16 rows), so weights cost 2 bytes/parameter per token as in the reference. lmc's
static decoder reports whether it captured a CUDA graph (`cuda_graph`) and, if not, why
(`cuda_graph_off`). Prints a table and writes JSON (device, torch/triton versions, date,
every figure).
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
sys.path.insert(0, HERE)

import torch  # noqa: E402

import lmc  # noqa: E402,F401  (sets TRITON_INTERPRET without CUDA, before triton is imported)

LLAMA = os.path.join(ROOT, "zoo", "llama.yaml")
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


# -- lmc ----------------------------------------------------------------------------------------
def lmc_contender(f32_model, args, device, backend):
    from lmc.passes.mixed_precision import low_precision_weights
    from lmc.runtime.decoder import Decoder
    from lmc.runtime.module import LmcModel

    g = low_precision_weights(f32_model.graph, args.dtype)
    model = LmcModel(g, backend=backend)
    dt = DTYPES[args.dtype]
    model.load_state_dict({k: v.to(dt) for k, v in f32_model.state_dict().items()})
    model = model.to(device).eval()
    dec = Decoder(model, backend=backend, static=True, max_len=args.max_len)
    state = dec.init_state(args.batch_size, device)

    def prefill(ids):
        nonlocal state
        logits, state = dec(ids, state)
        return logits

    def step(ids):
        nonlocal state
        logits, state = dec(ids, state)
        return logits
    from lmc.bench import step_ops

    # what one step launches (fused ops, each a kernel or a template's launch pair, + other
    # torch ops): at batch 1 this bounds the step time under a CUDA graph
    info = {"backend": backend, "ops_per_step": step_ops(dec.graph, dec.step.aux)}
    from lmc.codegen import warm
    from lmc.codegen.matmul import tuned_configs

    # the autotuner's picks (block sizes, SPLIT_K) for the generated matmuls, by (M, N, K);
    # the warm pass before the prefill, which takes the first step along (GPU): its compiles
    # and wait
    return prefill, step, lambda: {**info, "cuda_graph": dec.cuda_graph,
                                   "cuda_graph_off": dec.cuda_graph_off,
                                   "matmul_configs": tuned_configs() if backend == "triton"
                                   else [], "warm_passes": list(warm.HISTORY)}


# -- the hand-written reference ---------------------------------------------------------------
def reference_contender(f32_model, args, device, compiled):
    from conftest import copy_weights
    from reference_llama import Llama
    from static_kv_llama import StaticKVLlama

    ref = Llama.from_config(f32_model.config)
    copy_weights(f32_model, ref)
    ref = ref.to(device=device, dtype=DTYPES[args.dtype]).eval()
    kv = StaticKVLlama(ref, args.batch_size, args.max_len)
    run = torch.compile(kv, mode="reduce-overhead", fullgraph=True) if compiled else kv
    pos = torch.zeros(1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def prefill(ids):
        T = ids.shape[1]
        logits = kv(ids, torch.arange(T, device=device))   # eager: one shape, run once
        pos.fill_(T)
        return logits

    @torch.no_grad()
    def step(ids):
        logits = run(ids, pos)
        pos.add_(1)
        return logits
    return prefill, step, lambda: {}


# -- timing ---------------------------------------------------------------------------------------
def measure(name, make, args, device, prompt):
    """Prefill, --warmup untimed greedy steps, then --repeats timed runs of --tokens steps."""
    prefill, step, info = make()
    B = args.batch_size
    total = args.warmup + args.repeats * args.tokens
    out = torch.zeros(B, total, dtype=torch.int64, device=device)
    with torch.no_grad():
        ids = prefill(prompt)[:, -1:].argmax(-1)                 # [B, 1]
        t_first = 0

        def run(n):
            nonlocal ids, t_first
            for _ in range(n):
                out[:, t_first] = ids[:, 0]
                ids = step(ids)[:, -1:].argmax(-1)
                t_first += 1
        run(args.warmup)
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                run(args.tokens)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                run(args.tokens)
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    r = {"name": name, "tokens_per_s": B * args.tokens / med, "median_run_s": med,
         "min_run_s": min(times), "runs": len(times), **info()}
    print(f"{name:<44} {r['tokens_per_s']:>10,.1f} tokens/s   {med / args.tokens * 1e3:8.3f} "
          f"ms/token" + (f"   ({r['cuda_graph_off']})" if r.get("cuda_graph_off") else ""),
          flush=True)
    return r, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="zoo/llama preset (default: full size)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="weights and compute (default: bf16 on CUDA, f32 on CPU)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="default: 128, or max_seq/4 for a shorter model")
    ap.add_argument("--tokens", type=int, default=256, help="timed tokens per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--lmc-backends", default=None,
                    help="comma-separated lmc backends (default: torch,triton on CUDA, torch "
                         "on CPU)")
    ap.add_argument("--skip", nargs="*", default=None, choices=["lmc", "eager", "compile"],
                    help="default on CPU: compile (reduce-overhead needs CUDA graphs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "decode_bench.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but CUDA is not available")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "f32")
    backends = (args.lmc_backends or ("torch,triton" if device.type == "cuda" else "torch"))
    backends = [b for b in backends.split(",") if b]
    skip = set(args.skip if args.skip is not None else
               (["compile"] if device.type == "cpu" else []))
    for name, v in (("--tokens", args.tokens), ("--repeats", args.repeats),
                    ("--batch-size", args.batch_size)):
        if v < 1:
            ap.error(f"{name} must be >= 1")
    from lmc.driver import load
    from lmc.frontend.model import parse_overrides

    f32 = load(LLAMA, args.preset, seed=args.seed, **parse_overrides(args.set)).eval()
    cfg = f32.config
    max_seq = int(cfg["max_seq"])
    if args.prompt_len is None:
        args.prompt_len = min(128, max_seq // 4)
    args.max_len = args.prompt_len + args.warmup + args.repeats * args.tokens
    if args.prompt_len < 1 or args.max_len > max_seq:
        ap.error(f"prompt {args.prompt_len} + warm-up {args.warmup} + {args.repeats} x "
                 f"{args.tokens} tokens = {args.max_len} must be within max_seq {max_seq}")
    import triton

    params = sum(p.numel() for p in f32.parameters())
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "timing": "cuda events" if device.type == "cuda" else "cpu perf_counter",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": "zoo/llama.yaml", "preset": args.preset, "set": args.set,
            "params": params, "dtype": args.dtype, "batch_size": args.batch_size,
            "prompt_len": args.prompt_len, "tokens": args.tokens, "repeats": args.repeats,
            "warmup": args.warmup, "max_len": args.max_len, "skipped": sorted(skip)}
    print(json.dumps(meta), flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg["vocab"], (args.batch_size, args.prompt_len), generator=gen)
    prompt = prompt.to(device)
    contenders = []
    if "eager" not in skip:
        contenders.append(("pytorch static KV, eager",
                           lambda: reference_contender(f32, args, device, False)))
    if "compile" not in skip:
        contenders.append(("pytorch static KV, torch.compile reduce-overhead",
                           lambda: reference_contender(f32, args, device, True)))
    if "lmc" not in skip:
        for b in backends:
            contenders.append((f"lmc static step ({b} backend)",
                               (lambda b: lambda: lmc_contender(f32, args, device, b))(b)))
    results, tokens = [], {}
    for name, make in contenders:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            r, toks = measure(name, make, args, device, prompt)
        except Exception as e:  # noqa: BLE001 - one contender failing must not lose the rest
            first = (str(e).strip().splitlines() or [""])[0]
            r, toks = {"name": name, "error": f"{type(e).__name__}: {first}"}, None
            print(f"{name:<44} failed: {r['error']}", flush=True)
        results.append(r)
        tokens[name] = toks
    base = tokens.get("pytorch static KV, eager")
    for r in results:
        t = tokens.get(r["name"])
        if base is not None and t is not None:
            r["agree"] = (t == base).float().mean().item()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({**meta, "results": results}, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
