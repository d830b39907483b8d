"""What one decode step launches, per zoo model: the static step of the triton backend's
Decoder (the one a CUDA graph captures), counted from its graph with `lmc.bench.step_ops`:
fused ops (each a generated kernel or a template's launch pair) + the other ops that launch a
torch kernel (views excluded). No GPU and no kernel run needed: the count comes from the
compiled step graph. Also the weight bytes a step reads at batch 1 in bf16
(`lmc.bench.step_weight_bytes`: embedding rows, the chosen experts of an MoE layer).

    python benchmarks/step_ops.py                          # every zoo model, tiny preset
    python benchmarks/step_ops.py --models llama --preset default
"""
from __future__ import annotations

import argparse
import os
import sys

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zoo")
MODELS = ["llama", "blues01", "minimax", "yoco", "optimus_prime", "medit_one"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--preset", default="tiny", help="a preset name, or 'default'")
    a = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")    # codegen only; nothing is launched
    import lmc
    from lmc.bench import step_ops, step_weight_bytes
    from lmc.runtime.decoder import Decoder

    for name in a.models.split(","):
        preset = None if a.preset == "default" else a.preset
        m = lmc.load(os.path.join(ZOO, f"{name}.yaml"), preset=preset, backend="triton").eval()
        dec = Decoder(m, backend="triton", static=True, max_len=16, cuda_graph=False)
        ops = step_ops(dec.graph, dec.step.aux)
        mb = step_weight_bytes(dec.graph) / 1e6
        print(f"{name:14s} {a.preset:8s} {ops['fused']:4d} fused + {ops['torch']:3d} torch ops "
              f"+ {ops['positions']} position-table launches per static step; weights read "
              f"{mb:.2f} MB per token at batch 1 (bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
