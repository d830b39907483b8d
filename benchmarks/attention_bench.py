"""Fused RoPE + attention (lmc/codegen/attention.py) against torch: issue 7's acceptance run.

    .venv/bin/python benchmarks/attention_bench.py            # on the GPU (bf16)
    .venv/bin/python benchmarks/attention_bench.py --tiny     # CPU smoke run (interpreter)

Prefill (B 8, H 16, T 2048, D 64 and 128, causal, bf16): forward and forward+backward TFLOP/s
of the fused kernels against (a) RoPE in eager torch + F.scaled_dot_product_attention, (b) the
same function under torch.compile, (c) SDPA alone without RoPE. FLOPs are attention's only
(RoPE counted as free), causal: forward 4 B H T^2 D / 2, forward+backward 3.5 x that (the
backward's five products against the forward's two). Decode: one query per sequence against
caches of 1k to 32k positions (H 16 kv heads, D 128), achieved bandwidth = K and V bytes read
/ time, against the measured device-to-device copy bandwidth (read + write bytes / time).

Timing: CUDA events around each call, after warm-up (which also runs the autotuner), median of
--repeats. Before timing, the fused kernels are checked against the torch reference (fp32) on
a small shape; the errors are recorded with the timings. Prints a table and appends one JSON
object (device, torch/triton versions, date, every row) to --out
(default benchmarks/results/attention_bench.jsonl; --tiny writes only where --out says).

--tiny runs the same code end to end on the CPU: tiny shapes, fp32 (Triton's interpreter has
no bf16), torch.compile with the "eager" backend; its figures are wall-clock times of the
interpreter, labelled CPU, and say nothing about speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _timer(cuda: bool):
    """run(fn, warmup, repeats) -> median seconds (lmc.bench.Clock: CUDA events on a GPU)."""
    import torch

    from lmc.bench import Clock
    clock = Clock(torch.device("cuda" if cuda else "cpu"))
    return lambda fn, warmup, repeats: clock.median(fn, warmup, repeats)


def eager_rope(x, cos, sin):
    """RoPE as an eager model writes it (rotate-half, tables [T, D] in x's dtype)."""
    import torch
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rope_sdpa(q, k, v, cos, sin):
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(eager_rope(q, cos, sin), eager_rope(k, cos, sin), v,
                                          is_causal=True)


def check(A, device, dtype, D: int, T: int) -> dict:
    """Max abs errors of the fused forward, gradients and decode against the fp32 reference."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)
    B, H, HKV = 1, 4, 2
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(device, dtype).requires_grad_()
               for h in (H, HKV, HKV))
    cos, sin = A.rope_tables(T, D, paired=True, device=device)
    out = A.rope_attention(q, k, v, cos, sin, rot_dim=D)
    do = torch.randn(out.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = A.rope_attention_reference(q32, k32, v32, cos, sin, rot_dim=D)
    rgrads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    kr = A.apply_rope(k.detach(), cos, sin, 0, D).to(dtype)
    pos = torch.tensor([T - 1], device=device)
    dec = A.rope_attention_decode(q.detach()[:, :, -1:], kr, v.detach(), pos, cos, sin,
                                  rot_dim=D)
    errs = {"out": (out.float() - ref).abs().max().item()}
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        errs[name] = (a.float() - b).abs().max().item()
    errs["decode"] = (dec.float() - ref[:, :, -1:]).abs().max().item()
    return {"D": D, "T": T, "dtype": str(dtype).replace("torch.", ""), "max_abs_err": errs}


def prefill_rows(A, args, device, dtype, bench, D: int) -> list:
    import torch
    import torch.nn.functional as F
    B, H, T = args.batch, args.heads, args.seq
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, dtype) for _ in range(3))
    do = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    cos, sin = A.rope_tables(T, D, paired=True, device=device)        # fp32, one per pair
    cos_e, sin_e = (t.to(dtype) for t in A.rope_tables(T, D, device=device))  # eager: [T, D]
    compiled = torch.compile(rope_sdpa, backend=args.compile_backend)
    methods = {
        "fused rope+attention": lambda q, k, v: A.rope_attention(q, k, v, cos, sin, rot_dim=D),
        "(a) eager rope + sdpa": lambda q, k, v: rope_sdpa(q, k, v, cos_e, sin_e),
        "(b) torch.compile(rope + sdpa)": lambda q, k, v: compiled(q, k, v, cos_e, sin_e),
        "(c) sdpa alone": lambda q, k, v: F.scaled_dot_product_attention(q, k, v,
                                                                         is_causal=True),
    }
    fwd_flops = 4 * B * H * T * T * D / 2
    rows = []
    for name, fn in methods.items():
        def fwd():
            with torch.no_grad():
                fn(q, k, v)
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

        def fwd_bwd():
            torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), do)
        for label, f, flops in (("fwd", fwd, fwd_flops), ("fwd+bwd", fwd_bwd, 3.5 * fwd_flops)):
            t = bench(f, args.warmup, args.repeats)
            rows.append({"D": D, "method": name, "pass": label, "ms": t * 1e3,
                         "tflops": flops / t / 1e12})
    return rows


def copy_bandwidth(device, bench, args) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch
    n = (1 << 28) if device.type == "cuda" else (1 << 20)     # 512 MiB of bf16 / 4 MiB
    x = torch.empty(n, dtype=torch.float16 if device.type == "cuda" else torch.float32,
                    device=device)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), args.warmup, args.repeats)
    return 2 * x.numel() * x.element_size() / t


def decode_rows(A, args, device, dtype, bench, copy_bw: float) -> list:
    import torch
    import torch.nn.functional as F
    B, H, D = args.decode_batch, args.heads, args.decode_dim
    rows = []
    g = torch.Generator(device="cpu").manual_seed(2)
    for L in args.decode_lens:
        k = torch.randn(B, H, L, D, generator=g).to(device, dtype)
        v = torch.randn(B, H, L, D, generator=g).to(device, dtype)
        q = torch.randn(B, H, 1, D, generator=g).to(device, dtype)
        cos, sin = A.rope_tables(L, D, paired=True, device=device)
        pos = torch.full((B,), L - 1, device=device, dtype=torch.int32)
        nbytes = 2 * k.numel() * k.element_size()
        t = bench(lambda: A.rope_attention_decode(q, k, v, pos, cos, sin, rot_dim=D),
                  args.warmup, args.repeats)
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v), args.warmup,
                       args.repeats)
        rows.append({"L": L, "B": B, "H": H, "D": D, "ms": t * 1e3, "GB/s": nbytes / t / 1e9,
                     "frac_of_copy": nbytes / t / copy_bw,
                     "sdpa_ms (no rope, no split)": t_sdpa * 1e3})
    return rows


def summary(prefill: list) -> dict:
    by = {(r["D"], r["method"], r["pass"]): r["tflops"] for r in prefill}
    out = {}
    for D in sorted({r["D"] for r in prefill}):
        for p, target in (("fwd", 0.9), ("fwd+bwd", 0.8)):
            fused = by[(D, "fused rope+attention", p)]
            sdpa = by[(D, "(c) sdpa alone", p)]
            out[f"D{D} {p}"] = {
                "fused/sdpa": fused / sdpa, "target fused/sdpa": target,
                "fused/eager": fused / by[(D, "(a) eager rope + sdpa", p)],
                "fused/compiled": fused / by[(D, "(b) torch.compile(rope + sdpa)", p)],
                "met": fused >= target * sdpa
                and fused > by[(D, "(a) eager rope + sdpa", p)]
                and fused > by[(D, "(b) torch.compile(rope + sdpa)", p)]}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (interpreter)")
    ap.add_argument("--out", help="append the JSON record here")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--decode-batch", type=int, default=8)
    ap.add_argument("--decode-dim", type=int, default=128)
    ap.add_argument("--decode-lens", type=int, nargs="+",
                    default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--compile-backend", default="inductor")
    args = ap.parse_args(argv)

    import torch

    import lmc  # noqa: F401  (TRITON_INTERPRET=1 before triton is imported, without CUDA)
    from lmc.codegen import attention as A

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.dims = [32]
        args.batch, args.heads, args.seq = 1, 2, 32
        args.decode_batch, args.decode_dim, args.decode_lens = 1, 32, [64]
        args.warmup, args.repeats = 1, 1
        args.compile_backend = "eager"
        gpu = None
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on the GPU, or pass --tiny for the CPU smoke run")
        device, dtype = torch.device("cuda"), torch.bfloat16
        gpu = torch.cuda.get_device_name(0)
    bench = _timer(device.type == "cuda")

    checks = [check(A, device, dtype, D, 256 if gpu else 24) for D in args.dims]
    prefill = []
    for D in args.dims:
        prefill += prefill_rows(A, args, device, dtype, bench, D)
    decode, copy_bw = [], None
    if not args.no_decode:
        copy_bw = copy_bandwidth(device, bench, args)
        decode = decode_rows(A, args, device, dtype, bench, copy_bw)

    rec = {
        "benchmark": "attention",
        "device": gpu or f"CPU ({platform.machine()}, {os.cpu_count()} cores), Triton "
                         "interpreter",
        "timing": (f"CUDA events, median of {args.repeats} after {args.warmup} warm-up"
                   if gpu else "CPU wall clock of the interpreter: a smoke run, not a speed"),
        "dtype": str(dtype).replace("torch.", ""),
        "shape": {"B": args.batch, "H": args.heads, "T": args.seq, "causal": True},
        "torch": torch.__version__, "triton": A.triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "check": checks, "prefill": prefill,
        "copy_GB/s": None if copy_bw is None else copy_bw / 1e9, "decode": decode,
        "summary": summary(prefill),
    }

    unit = "TFLOP/s" if gpu else "TFLOP/s (CPU interpreter)"
    print(f"{rec['device']}; torch {rec['torch']}, triton {rec['triton']}; {rec['timing']}")
    for c in checks:
        print(f"check D={c['D']} ({c['dtype']}): " + ", ".join(
            f"{k} {v:.1e}" for k, v in c["max_abs_err"].items()))
    print(f"\n{'D':>4}  {'method':<32}{'pass':<9}{'ms':>10}  {unit}")
    for r in prefill:
        print(f"{r['D']:>4}  {r['method']:<32}{r['pass']:<9}{r['ms']:>10.3f}  "
              f"{r['tflops']:.4g}")
    if decode:
        print(f"\ndecode (B {args.decode_batch}, H {args.heads}, D {args.decode_dim}); copy "
              f"{rec['copy_GB/s']:.1f} GB/s")
        print(f"{'L':>7}{'ms':>10}{'GB/s':>10}{'of copy':>9}{'sdpa ms':>10}")
        for r in decode:
            print(f"{r['L']:>7}{r['ms']:>10.3f}{r['GB/s']:>10.1f}{r['frac_of_copy']:>9.0%}"
                  f"{r['sdpa_ms (no rope, no split)']:>10.3f}")
    print()
    for k, s in rec["summary"].items():
        print(f"{k}: fused/sdpa {s['fused/sdpa']:.2f} (target >= {s['target fused/sdpa']}), "
              f"fused/eager {s['fused/eager']:.2f}, fused/compiled {s['fused/compiled']:.2f}"
              + ("" if gpu else "  [CPU: meaningless]"))

    out = args.out or (None if args.tiny else
                       os.path.join(HERE, "results", "attention_bench.jsonl"))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"\nrecorded in {out}")
    assert all(math.isfinite(r["ms"]) for r in prefill)
    return rec


if __name__ == "__main__":
    main()
