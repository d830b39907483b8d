"""Graph-stage compile time: `lmc compile` (frontend + passes) for a zoo model.

    .venv/bin/python benchmarks/compile_time.py [zoo/llama.yaml] [--repeat 7]

Prints and appends to benchmarks/results/compile_time.jsonl: the median in-process compile
time (imports warm), and the wall time of a whole fresh `lmc compile` process (cold: Python
and torch imports included), with the machine, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file", nargs="?", default=os.path.join(ROOT, "zoo", "llama.yaml"))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import torch

    import lmc

    lmc.compile_model(args.file)  # warm imports
    runs = []
    for _ in range(args.repeat):
        c = lmc.compile_model(args.file)
        runs.append((c.compile_s, c.frontend_s))
    exe = os.path.join(os.path.dirname(sys.executable), "lmc")
    t0 = time.perf_counter()
    subprocess.run([exe, "compile", args.file], check=True, capture_output=True)
    cold = time.perf_counter() - t0
    s = c.summary()
    rec = {
        "benchmark": "compile_time",
        "file": os.path.relpath(args.file, ROOT),
        "params": s["params"],
        "nodes_before": sum(s["nodes_before"].values()),
        "nodes_after": sum(s["nodes_after"].values()),
        "compile_s_median": statistics.median(r[0] for r in runs),
        "frontend_s_median": statistics.median(r[1] for r in runs),
        "passes_s_median": statistics.median(r[0] - r[1] for r in runs),
        "cold_process_s": cold,
        "repeat": args.repeat,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(rec, indent=2))
    if not args.no_record:
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "compile_time.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
