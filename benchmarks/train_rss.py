"""Peak resident memory of a few CPU training steps of a zoo model (torch backend, fp32).

    python benchmarks/train_rss.py                       # llama default, B=4, T=512, 2 steps
    python benchmarks/train_rss.py --preset tiny --batch-size 2 --seq-len 32 --steps 1

A CPU figure (the process's maximum resident set size, as `/usr/bin/time -v` reports it),
not a GPU one: it shows what the training program keeps alive (saved activations,
cotangents, gradients, AdamW state) and that the loss is unchanged. On a checkout from before
`LmcModel(grad_outputs=...)` it falls back to every output taking a cotangent.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zoo")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--preset", default="default", help="a preset name, or 'default'")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args(argv)
    import torch

    import lmc
    from lmc.passes import run_pipeline
    from lmc.passes.loss import with_loss
    from lmc.runtime.module import LmcModel

    c = lmc.compile_model(os.path.join(ZOO, f"{a.model}.yaml"),
                          None if a.preset == "default" else a.preset, None)
    g = run_pipeline(with_loss(c.graph))
    try:
        model = LmcModel(g, grad_outputs=["loss"])
    except TypeError:
        model = LmcModel(g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = c.graph.meta["config"]["vocab"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (a.batch_size, a.seq_len), generator=gen)
    targets = torch.randint(0, vocab, (a.batch_size, a.seq_len), generator=gen)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = model(ids, targets=targets)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
    print(f"{a.model} ({a.preset}) B={a.batch_size} T={a.seq_len}, {a.steps} steps in "
          f"{dt:.1f} s on CPU: peak RSS {peak / 2**30:.2f} GiB, last loss {loss.item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
