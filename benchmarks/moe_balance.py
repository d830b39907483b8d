"""What DeepSeek-V3's load_balance update rule does to expert loads: trains
examples/deepseek_moe.yaml once per rate, the same seed and data, with the rule off
(balance_rate=0) and on, and compares how evenly each layer's experts were picked.

    .venv/bin/python benchmarks/moe_balance.py [--preset small] [--steps 200] [--rates 0,0.001]

Imbalance of a layer at a step: its busiest expert's tokens / the mean per expert (1 is
perfectly even; E / top_k when every token picks the same k experts).
Prints per-run figures, writes the chart benchmarks/results/moe_balance_loads.png and
appends one record to benchmarks/results/moe_balance.jsonl (machine, versions, date, the commands).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODEL = os.path.join(ROOT, "examples", "deepseek_moe.yaml")


def imbalance(rec, experts):
    """Busiest expert / mean load, per MoE block (the layers', then the multi-token
    prediction block's)."""
    import numpy as np
    load = np.asarray(rec["stats"]["expert_tokens"], dtype=float).reshape(-1, experts)
    return (load.max(1) / load.mean(1)).tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rates", default="0,0.001,0.01",
                    help="comma-separated balance_rate values, one run each")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "moe_balance"))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    from lmc.driver import compile_model
    experts = compile_model(MODEL, args.preset).graph.meta["config"]["experts"]
    lmc_bin = os.path.join(os.path.dirname(sys.executable), "lmc")
    runs = {}
    for rate in (float(r) for r in args.rates.split(",")):
        name = f"rate{rate:g}"
        out = os.path.join(args.out, name)
        cmd = [lmc_bin, "run", MODEL, "--train", "--preset", args.preset, "--steps",
               str(args.steps), "--batch-size", str(args.batch_size), "--seq-len",
               str(args.seq_len), "--log-every", "1", "--eval-every", str(args.steps),
               "--no-progress", "--out", out, "--overwrite", "--set", f"balance_rate={rate}"]
        shown = [os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd]
        print("$", " ".join(shown), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        recs = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
        per_step = np.asarray([imbalance(r, experts) for r in recs])  # [steps, blocks]
        last = per_step[-len(per_step) // 4:]
        runs[name] = {"rate": rate, "command": " ".join(shown[1:]),
                      "imbalance_mean_last_quarter": float(last.mean()),
                      "imbalance_worst_last_quarter": float(last.max()),
                      "imbalance_first_step": float(per_step[0].mean()),
                      "final_train_loss": recs[-1]["train_loss"],
                      "val_loss": recs[-1].get("val_loss"),
                      "curve": per_step.mean(1).tolist()}
        print(f"  rate {rate:g}: busiest expert / mean, MoE blocks averaged: first step "
              f"{runs[name]['imbalance_first_step']:.2f}, last quarter mean "
              f"{runs[name]['imbalance_mean_last_quarter']:.2f} (worst "
              f"{runs[name]['imbalance_worst_last_quarter']:.2f}); final train loss "
              f"{recs[-1]['train_loss']:.3f}, val loss {recs[-1].get('val_loss')}", flush=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, r in runs.items():
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=f"balance_rate={r['rate']:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("busiest expert / mean load")
    ax.set_title(f"deepseek_moe ({args.preset}): expert load, MoE blocks averaged")
    ax.legend()
    fig.tight_layout()
    chart = os.path.join(args.out, "loads.png") if args.no_record else \
        os.path.join(HERE, "results", "moe_balance_loads.png")
    fig.savefig(chart, dpi=110)
    print("chart:", os.path.relpath(chart, ROOT))
    if not args.no_record:
        rec = {"date": datetime.date.today().isoformat(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores (CPU)",
               "torch": torch.__version__, "python": platform.python_version(),
               "preset": args.preset, "steps": args.steps,
               "runs": {k: {kk: vv for kk, vv in v.items() if kk != "curve"}
                        for k, v in runs.items()}}
        path = os.path.join(HERE, "results", "moe_balance.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print("recorded:", os.path.relpath(path, ROOT))


if __name__ == "__main__":
    main()
