"""MoE gating and the whole MoE layer (issue 8): lmc's Triton kernels against an eager torch
implementation and the same under torch.compile, forward and forward+backward.

    python benchmarks/moe_bench.py                      # H100: bf16, N 16384 tokens, d 768,
                                                        # E 8, top-2, expert hidden 3072
    python benchmarks/moe_bench.py --tiny --out /tmp/moe.json   # CPU smoke run (interpreter)
    python benchmarks/moe_bench.py --router deepseek    # DeepSeek-V3's routing: sigmoid
                    # scores, a selection bias, top-8 of 256 from 4 of 8 groups (d 2048,
                    # expert hidden 512: a V3 layer scaled down to fit beside its baselines)

Parts and contenders, all on the same x [N, d], router [d, E], noise [N, E] (blues01's noisy
top-2 router; the noise is an input, drawn once), experts w_gate, w_up [E, d, F], w_down
[E, F, d] (SwiGLU), top-k renormalised, no capacity:

    gating  lmc       lmc.codegen.moe.moe_gating (one fused launch; backward kernel + 2 mm)
            eager     logits = x W_r + noise, softmax (fp32), topk, renormalise, counts
                      (one_hot sum), prob sums, logsumexp
            compiled  torch.compile(eager)
    layer   lmc       lmc.codegen.moe.moe_layer (gating, device-side routing, grouped GEMMs,
                      gather combine)
            eager     the eager router, then per expert index_select / gated FFN / index_add_
                      (lmc.codegen.moe.moe_eager)
            compiled  torch.compile(eager) (data-dependent shapes: graph breaks where needed)

fwd_bwd is one forward plus torch.autograd.grad of <outputs, random cotangents> with respect to
x and every weight (gating: the combine weights, prob sums and lse all get cotangents, as with
a load-balance and z-loss). Timing: CUDA events around each call after --warmup calls, the
median of --reps (CPU: perf_counter, labelled CPU). lmc's layer output is checked against the
fp32 dense reference (moe_reference) on the first --check tokens: max_rel_err =
max |diff| / max |ref| (in bf16 a token whose top-2 is decided by rounding can differ).
Prints a table and writes JSON (device, torch/triton versions, date, arguments, rows).
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


def time_ms(fn, device, warmup: int, reps: int) -> float:
    """Median milliseconds (CUDA events on a GPU, perf_counter on CPU: lmc.bench.Clock)."""
    from lmc.bench import Clock
    return Clock(device).median(fn, warmup, reps) * 1e3


def eager_gating(x, wr, noise, k, sigmoid=False, bias=None, groups=None):
    import torch

    from lmc.codegen.moe import eager_select
    logits = x @ wr + noise if noise is not None else x @ wr
    lf = logits.float()
    probs = torch.sigmoid(lf) if sigmoid else torch.softmax(lf, -1)
    val, idx = eager_select(probs, k, bias, groups)
    w = val / val.sum(-1, keepdim=True)
    counts = torch.nn.functional.one_hot(idx, wr.shape[1]).sum((0, 1))
    return w, probs.sum(0), torch.logsumexp(lf, -1), idx, counts


def build(args, device, dtype):
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)
    N, d, E, F = args.tokens, args.d, args.experts, args.ffn
    mk = (lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device,
                                                                        dtype=dtype))
    x = mk(N, d)
    ws = dict(wr=mk(d, E, std=d ** -0.5), wg=mk(E, d, F, std=d ** -0.5),
              w1=mk(E, d, F, std=d ** -0.5), w2=mk(E, F, d, std=F ** -0.5))
    noise = mk(N, E) if args.router == "noisy-softmax" else None
    cot = dict(y=mk(N, d), w=torch.randn(N, args.k, generator=g).to(device),
               ps=torch.randn(E, generator=g).to(device), lse=torch.randn(N, generator=g).to(
                   device))
    return x, ws, noise, cot


def contenders(args, x, ws, noise, cot):
    import torch

    from lmc.codegen import moe
    k = args.k
    r = dict(sigmoid=True, bias=args.bias, groups=args.groups) if args.router == "deepseek" \
        else {}
    n_gate = 2 if r else 3         # a sigmoid router has no z-loss: no lse output to time
    xa = x.detach().requires_grad_()
    wa = {n: t.detach().requires_grad_() for n, t in ws.items()}

    def gate_lmc():
        g = moe.moe_gating(xa, wa["wr"], noise, k=k, **r)
        return (g.weight, g.prob_sum, g.lse)[:n_gate]

    def gate_eager():
        return eager_gating(xa, wa["wr"], noise, k, **r)[:n_gate]

    def layer_lmc():
        y, _ = moe.moe_layer(xa, wa["wr"], wa["wg"], wa["w1"], wa["w2"], noise, k=k, **r)
        return (y,)

    def layer_eager():
        return (moe.moe_eager(xa, wa["wr"], wa["wg"], wa["w1"], wa["w2"], noise, k=k,
                              **r)[0],)

    compiled = {}
    if not args.no_compile:
        compiled = {"gating": torch.compile(gate_eager), "layer": torch.compile(layer_eager)}
    table = {"gating": {"lmc": gate_lmc, "eager": gate_eager},
             "layer": {"lmc": layer_lmc, "eager": layer_eager}}
    for part, fn in compiled.items():
        table[part]["compiled"] = fn
    gate_inputs = (xa, wa["wr"])
    layer_inputs = (xa, wa["wr"], wa["wg"], wa["w1"], wa["w2"])

    def fwd_bwd(part, fn):
        inputs = gate_inputs if part == "gating" else layer_inputs
        cots = (cot["w"], cot["ps"], cot["lse"])[:n_gate] if part == "gating" else (cot["y"],)

        def run():
            outs = fn()
            return torch.autograd.grad(outs, inputs, [c.to(o.dtype) for o, c in zip(outs, cots)])
        return run
    return table, fwd_bwd, wa


def check(args, x, ws, noise):
    import torch

    from lmc.codegen import moe
    n = min(args.check, x.shape[0])
    r = dict(sigmoid=True, bias=args.bias, groups=args.groups) if args.router == "deepseek" \
        else {}
    nz = noise[:n] if noise is not None else None
    with torch.no_grad():
        y, _ = moe.moe_layer(x[:n], ws["wr"], ws["wg"], ws["w1"], ws["w2"], nz, k=args.k, **r)
        f = (lambda t: t.float() if t is not None else None)
        yr, _ = moe.moe_reference(f(x[:n]), f(ws["wr"]), f(ws["wg"]), f(ws["w1"]), f(ws["w2"]),
                                  f(nz), k=args.k, **r)
    return ((y.float() - yr).abs().max() / yr.abs().max()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--router", choices=["noisy-softmax", "deepseek"], default="noisy-softmax")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d", type=int, default=None, help="default 768 (deepseek: 2048)")
    p.add_argument("--experts", type=int, default=None, help="default 8 (deepseek: 256)")
    p.add_argument("--k", type=int, default=None, help="default 2 (deepseek: 8)")
    p.add_argument("--ffn", type=int, default=None, help="default 3072 (deepseek: 512)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=None, help="default 10 (--tiny: 1)")
    p.add_argument("--reps", type=int, default=None, help="default 50 (--tiny: 1)")
    p.add_argument("--check", type=int, default=2048)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU interpreter smoke run")
    p.add_argument("--out", default=os.path.join(HERE, "results", "moe_bench.json"))
    args = p.parse_args(argv)
    ds = args.router == "deepseek"
    for name, plain, v3 in (("d", 768, 2048), ("experts", 8, 256), ("k", 2, 8),
                            ("ffn", 3072, 512)):
        if getattr(args, name) is None:
            setattr(args, name, v3 if ds else plain)
    if args.tiny:
        args.tokens, args.d, args.ffn = 63, 32, 48
        args.experts, args.k = (8, 2) if ds else (4, 2)
        args.dtype, args.check, args.no_compile = "f32", 63, True
    # a warm-up call keeps the first call's compiles out of the timed one (also on CPU)
    args.warmup = (1 if args.tiny else 10) if args.warmup is None else args.warmup
    args.reps = (1 if args.tiny else 50) if args.reps is None else args.reps
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before triton is imported
    import torch
    import triton

    import lmc  # noqa: F401  (interpreter mode without CUDA)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    # DeepSeek-V3's routing: 8 groups (4 at --tiny), a token's experts from half of them,
    # a group scored by its two best; a selection bias of the size its update rule reaches
    args.groups = ((8 if args.experts % 8 == 0 and not args.tiny else 4), 4 if not args.tiny
                   else 2, 2) if ds else None
    args.bias = (torch.randn(args.experts, generator=torch.Generator().manual_seed(1)) * 0.05
                 ).to(device) if ds else None
    x, ws, noise, cot = build(args, device, dtype)
    table, fwd_bwd, _ = contenders(args, x, ws, noise, cot)
    err = check(args, x, ws, noise)
    rows = []
    for part, fns in table.items():
        for name, fn in fns.items():
            row = {"part": part, "contender": name,
                   "max_rel_err": err if (name == "lmc" and part == "layer") else None}
            for mode, run in (("fwd", fn), ("fwd_bwd", fwd_bwd(part, fn))):
                try:
                    row[f"{mode}_ms"] = time_ms(run, device, args.warmup, args.reps)
                except Exception as e:  # noqa: BLE001 - recorded, not fatal (e.g. compile)
                    row[f"{mode}_ms"] = None
                    row[f"{mode}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
    unit = "ms" if device.type == "cuda" else "ms (CPU)"
    print(f"{'part':8} {'contender':10} {'fwd ' + unit:>16} {'fwd+bwd ' + unit:>18} "
          f"{'vs eager fwd/fb':>16}")
    base = {r["part"]: r for r in rows if r["contender"] == "eager"}
    for r in rows:
        b = base[r["part"]]
        sp = [f"{b[m] / r[m]:.2f}x" if r.get(m) and b.get(m) else "-"
              for m in ("fwd_ms", "fwd_bwd_ms")]
        fmt = (lambda v: f"{v:.3f}" if v is not None else "error")
        print(f"{r['part']:8} {r['contender']:10} {fmt(r['fwd_ms']):>16} "
              f"{fmt(r['fwd_bwd_ms']):>18} {'/'.join(sp):>16}"
              + ("" if device.type == "cuda" else "  [CPU: meaningless]"))
    print(f"lmc layer max_rel_err vs fp32 dense reference: {err:.2e}")
    meta = {"device": (torch.cuda.get_device_name() if device.type == "cuda"
                       else f"CPU ({platform.processor() or platform.machine()})"),
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "args": {k: v for k, v in vars(args).items() if k != "bias"}, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
