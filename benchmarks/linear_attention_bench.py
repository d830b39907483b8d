"""Decayed linear attention (gated retention / lightning): lmc's chunked Triton kernels against
the unfused parallel form, causal softmax flash attention (SDPA) and, when it imports,
flash-linear-attention's chunked kernel, forward and forward+backward, over T (issue 9).

    python benchmarks/linear_attention_bench.py                 # H100: bf16, B 8, H 8, d 128,
                                                                # T = 2k, 4k, 8k, 16k
    python benchmarks/linear_attention_bench.py --tiny --out /tmp/la.json   # CPU smoke run

Contenders, all on the same q, k, v [B, H, T, d] and per-token log-decays g [B, H, T] <= 0:

    lmc_chunked        lmc.codegen.linear_attention.chunked_linear_attention (chunk --chunk)
    unfused_parallel   the zoo's block as lmc's unfused graph runs it under mixed precision:
                       G = cumsum(g) (fp32), D = exp(where(causal, G_t - G_s, -inf)),
                       o = ((q @ k^T) * D) @ v with the matmuls in the input dtype: T x T per
                       head, so it runs out of memory at large T (caught and reported)
    sdpa_causal        torch.nn.functional.scaled_dot_product_attention(is_causal=True): softmax
                       attention at the same shape (flash backend on the GPU)
    fla_chunk          fla.ops.simple_gla.chunk_simple_gla (the same recurrence: scalar gate
                       per head and token), if `fla` imports; else reported as skipped

Timing: CUDA events around each call after --warmup untimed calls, the median of --reps
(CPU: perf_counter, labelled CPU; never compare with GPU figures). fwd_bwd is one forward plus
torch.autograd.grad of (o * do).sum() with respect to every input. Peak memory: the CUDA
allocator's peak above what was allocated before one forward+backward (inputs excluded).
lmc's output is checked against the fp32 parallel reference on the first sequence (T up to
2048) and reported as max_rel_err (max |diff| / max |ref|). Prints a table and writes JSON
(device, torch/triton versions, date, arguments, one row per contender and T).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


# -- contenders: each returns (fwd, fwd_bwd) callables over prepared inputs --------------------
def _grad_fn(run, inputs, do):
    import torch

    def fwd_bwd():
        o = run()
        return torch.autograd.grad(o, inputs, do)
    return fwd_bwd


def lmc_chunked(q, k, v, g, do, args):
    from lmc.codegen.linear_attention import chunked_linear_attention

    def run():
        return chunked_linear_attention(q, k, v, g, chunk=args.chunk)
    return run, _grad_fn(run, (q, k, v, g), do)


def unfused_parallel(q, k, v, g, do, args):
    import torch
    T = q.shape[2]

    def run():
        G = g.float().cumsum(-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        D = torch.exp(torch.where(causal, G[..., :, None] - G[..., None, :],
                                  torch.tensor(float("-inf"), device=q.device)))
        return (((q @ k.transpose(-2, -1)) * D).to(q.dtype)) @ v
    return run, _grad_fn(run, (q, k, v, g), do)


def sdpa_causal(q, k, v, g, do, args):
    import torch.nn.functional as F

    def run():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run, _grad_fn(run, (q, k, v), do)


def fla_chunk(q, k, v, g, do, args):
    """flash-linear-attention's chunked simple-GLA kernel: S_t = exp(g_t) S_{t-1} + k_t^T v_t,
    o_t = scale q_t S_t, the same recurrence. Newer releases take [B, T, H, d] (older ones
    a head_first flag); the layout change is done once, outside the timed region."""
    import inspect

    from fla.ops.simple_gla import chunk_simple_gla
    params = inspect.signature(chunk_simple_gla).parameters
    if "head_first" in params:
        kw = {"head_first": True}
        qq, kk, vv, gg, dd = q, k, v, g, do
    else:
        kw = {}
        qq, kk, vv, dd = (x.transpose(1, 2).contiguous().detach().requires_grad_()
                          for x in (q, k, v, do))
        gg = g.transpose(1, 2).contiguous().detach().requires_grad_()

    def run():
        o, _ = chunk_simple_gla(qq, kk, vv, g=gg, scale=1.0, output_final_state=False, **kw)
        return o
    return run, _grad_fn(run, (qq, kk, vv, gg), dd)


CONTENDERS = {"lmc_chunked": lmc_chunked, "unfused_parallel": unfused_parallel,
              "sdpa_causal": sdpa_causal, "fla_chunk": fla_chunk}


# -- measurement -------------------------------------------------------------------------------
def _is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def time_ms(fn, device, warmup: int, reps: int) -> float:
    """Median milliseconds (CUDA events on a GPU, perf_counter on CPU: lmc.bench.Clock)."""
    from lmc.bench import Clock
    return Clock(device).median(fn, warmup, reps) * 1e3


def peak_mib(fn, device):
    import torch
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def inputs(B, H, T, d, dtype, device, seed=0):
    import torch
    import torch.nn.functional as F
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=gen)
    k = torch.randn(B, H, T, d, generator=gen) * d ** -0.5
    v = torch.randn(B, H, T, d, generator=gen)
    g = F.logsigmoid(torch.randn(B, H, T, generator=gen) + 2) / 4      # retention-like gates
    do = torch.randn(B, H, T, d, generator=gen)
    cast = lambda x: x.to(device=device, dtype=dtype).requires_grad_()   # noqa: E731
    return cast(q), cast(k), cast(v), g.to(device).requires_grad_(), do.to(device, dtype)


def check_lmc(q, k, v, g, args) -> float:
    """max |lmc - fp32 parallel reference| / max |reference| on the first sequence."""
    import torch

    from lmc.codegen.linear_attention import chunked_linear_attention, linear_attention_reference
    n = min(q.shape[2], 2048)
    xs = [x[:1, :, :n].detach() for x in (q, k, v)] + [g[:1, :, :n].detach()]
    with torch.no_grad():
        got = chunked_linear_attention(*xs, chunk=args.chunk).float()
        want = linear_attention_reference(*[x.float() for x in xs])
    return ((got - want).abs().max() / want.abs().max()).item()


def _measure(name, T, args, device, dtype):
    import torch
    row = {"name": name, "T": T, "status": "ok"}
    q, k, v, g, do = inputs(args.B, args.H, T, args.d, dtype, device)
    fwd, fwd_bwd = CONTENDERS[name](q, k, v, g, do, args)
    with torch.no_grad():
        row["fwd_ms"] = time_ms(fwd, device, args.warmup, args.reps)
    row["fwd_bwd_ms"] = time_ms(fwd_bwd, device, args.warmup, args.reps)
    row["peak_fwd_bwd_mib"] = peak_mib(fwd_bwd, device)
    row["fwd_bwd_ms_per_1k_tokens"] = row["fwd_bwd_ms"] / (T / 1024)
    if name == "lmc_chunked":
        row["max_rel_err"] = check_lmc(q, k, v, g, args)
    return row


def measure(name, T, args, device, dtype):
    """One contender at one T; an out-of-memory or a failure is a result, not a crash (the
    tensors of a failed run are released with its frame before the next one starts)."""
    import torch
    try:
        row = _measure(name, T, args, device, dtype)
    except ImportError as e:
        row = {"name": name, "T": T, "status": "skipped", "error": f"{type(e).__name__}: {e}"}
    except Exception as e:          # noqa: BLE001
        row = {"name": name, "T": T, "status": "oom" if _is_oom(e) else "error",
               "error": f"{type(e).__name__}: {e}"[:300]}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def device_info(device):
    import torch
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"kind": "cuda", "label": "GPU", "name": p.name,
                "memory_gib": round(p.total_memory / 2 ** 30, 1),
                "cuda": torch.version.cuda}
    return {"kind": "cpu", "label": "CPU", "name": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1"}


def table(rows):
    head = f"{'contender':<18}{'T':>7}{'fwd ms':>10}{'fwd+bwd ms':>12}{'ms/1k tok':>11}" \
           f"{'peak MiB':>10}  status"
    lines = [head, "-" * len(head)]
    fmt = lambda x, p: "-" if x is None else f"{x:.{p}f}"      # noqa: E731
    for r in rows:
        lines.append(f"{r['name']:<18}{r['T']:>7}{fmt(r.get('fwd_ms'), 3):>10}"
                     f"{fmt(r.get('fwd_bwd_ms'), 3):>12}"
                     f"{fmt(r.get('fwd_bwd_ms_per_1k_tokens'), 3):>11}"
                     f"{fmt(r.get('peak_fwd_bwd_mib'), 0):>10}  {r['status']}"
                     + (f" ({r['error'][:60]})" if r["status"] != "ok" else ""))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes on the CPU (Triton interpreter, fp32): a smoke run")
    ap.add_argument("--T", type=int, nargs="+", default=None)
    ap.add_argument("--B", type=int, default=None)
    ap.add_argument("--H", type=int, default=None)
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS),
                    choices=list(CONTENDERS))
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/"
                    "linear_attention_<gpu|cpu_tiny>.json)")
    args = ap.parse_args(argv)
    tiny = dict(T=[32, 64], B=1, H=1, d=16, dtype="f32", chunk=16, warmup=1, reps=1)
    full = dict(T=[2048, 4096, 8192, 16384], B=8, H=8, d=128, dtype="bf16", chunk=64,
                warmup=3, reps=10)
    for key, val in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before triton is imported
    import torch
    import triton

    import lmc  # noqa: F401  (sets TRITON_INTERPRET without CUDA)
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--tiny runs the kernels in Triton's interpreter: start it with "
                             "TRITON_INTERPRET=1 (triton was imported before this script)")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --tiny for a CPU smoke run")
        device = torch.device("cuda")
    dtype = getattr(torch, DTYPES[args.dtype])
    rows = []
    for T in args.T:
        for name in args.contenders:
            if name == "fla_chunk" and device.type != "cuda":
                rows.append({"name": name, "T": T, "status": "skipped",
                             "error": "flash-linear-attention needs CUDA"})
                continue
            rows.append(measure(name, T, args, device, dtype))
            print(table(rows[-1:]).split("\n")[-1], flush=True)
    res = {"benchmark": "linear_attention", "issue": 9,
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": device_info(device), "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version(),
           "shape": {"B": args.B, "H": args.H, "d_k": args.d, "d_v": args.d,
                     "dtype": args.dtype, "chunk": args.chunk},
           "timing": {"warmup": args.warmup, "reps": args.reps, "statistic": "median",
                      "clock": "cuda events" if device.type == "cuda" else "perf_counter"},
           "rows": rows}
    print(f"\n{res['device']['label']}: {res['device']['name']}  torch {res['torch']}  "
          f"triton {res['triton']}  B={args.B} H={args.H} d={args.d} {args.dtype}")
    print(table(rows))
    out = args.out or os.path.join(HERE, "results", "linear_attention_"
                                   + ("cpu_tiny" if args.tiny else "gpu") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
