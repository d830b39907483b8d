"""A roofline model of one lmc training step, from the compiled program alone (no GPU).

For every launch of the triton backend's forward' and backward programs (fused kernels,
templates, and the torch ops left between them): the bytes it must move (its inputs read once,
its outputs written once) and, for matmuls and attention, the FLOPs it must do. At a device's
peak bandwidth and matmul throughput, max(bytes / bandwidth, FLOPs / throughput) is a lower
bound on that launch's time; their sum is a lower bound on the step (no optimizer, no launch
overhead, no imperfect kernel). It is a model, not a measurement: it shows where the bytes
go and what a change to the compiler saves, on a machine without the GPU.

    python benchmarks/roofline.py                                 # llama default, bf16, 16x1024
    python benchmarks/roofline.py --model blues01 --top 20 --json out.json

Counting: a broadcast input (an expand) counts at its source's size; gather and embedding
read only the rows they pick (output + indices); scatter_add writes its output twice (zeros,
then the accumulation). Views are free (a strided copy one makes is not counted). Matmul
FLOPs are 2*M*N*K; a template's FLOPs are its primitive body's matmuls, attention's at half
for a causal mask (the kernels skip masked blocks), the backward's as seven T x T products
(scores, dV, dP and dK in one pass; scores, dP and dQ in another) where its body holds six.
An MoE layer's body is the dense every-expert form it replaces; its kernels run the experts on
the routed rows only: N*k rows (an upper bound under a capacity) through the three expert
products forward, six backward (dh, the two-term dx, three weight gradients), plus the router's
product (rerun in the backward, with its dx and dW_r).
Also reported: the activation bytes forward' saves for the backward.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zoo")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "bool": 1}
H100_SMS = 132      # a kernel with column sums runs COL_PROGRAMS_PER_SM programs per SM


def training_model(model: str, preset, precision: str, sets):
    """The triton backend's LmcModel for training, built the way `lmc run --train` builds it
    (its program(): forward' and backward, fused)."""
    import lmc
    from lmc.passes import run_pipeline
    from lmc.passes.loss import with_loss
    from lmc.passes.mixed_precision import mixed_precision
    from lmc.runtime.module import LmcModel

    c = lmc.compile_model(model_path(model), preset, sets)
    g = run_pipeline(with_loss(mixed_precision(c.graph, precision)))
    try:
        return LmcModel(g, backend="triton", grad_outputs=["loss"])
    except TypeError:   # a checkout from before grad_outputs: every output takes a cotangent
        return LmcModel(g, backend="triton")


def model_path(model: str) -> str:
    """A zoo model's name (llama), an example's (examples/gpt2.yaml: gpt2), or a YAML path."""
    if model.endswith(".yaml"):
        return model
    path = os.path.join(ZOO, f"{model}.yaml")
    example = os.path.join(ZOO, "..", "examples", f"{model}.yaml")
    return path if os.path.exists(path) or not os.path.exists(example) else example


def _program(model: str, preset, precision: str, sets):
    return training_model(model, preset, precision, sets).program()


def step_args(ap) -> None:
    """The options naming a training step: model, preset, --set, precision, B, T."""
    ap.add_argument("--model", default="llama",
                    help="a zoo model (llama), an example (gpt2), or a YAML file")
    ap.add_argument("--preset", default="default", help="a preset name, or 'default'")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)


def cost_rows(prog, env):
    """[{graph, kind, name, ops, bytes, flops}] per launch of forward' then backward."""
    from lmc.codegen.reduction import COL_PROGRAMS_PER_SM
    from lmc.ir import dims as D
    from lmc.ir.ops import Kind, Op

    def numel(t):
        n = 1
        for d in t.shape:
            n *= D.evaluate(d, env)
        return n

    def nbytes(n):
        while n.op is Op.EXPAND:          # a broadcast: read at its source's size
            n = n.inputs[0]
        return numel(n.type) * _BYTES.get(n.type.dtype.value, 4)

    def mm_flops(body):
        f = 0
        for b in body.nodes:
            if b.op is Op.MATMUL:
                f += 2 * numel(b.type) * D.evaluate(b.inputs[0].type.shape[-1], env)
        return f

    def moe_flops(body, backward):
        # the routed work of codegen/moe.py's kernels (see the module docstring)
        # the router's own top-k: the last (a group-limited router's group top-ks precede it)
        k = [b.attrs["k"] for b in body.nodes if b.op is Op.TOPK][-1]
        mms = [b for b in body.nodes if b.op is Op.MATMUL]
        router = next(b for b in mms if b.inputs[1].type.rank == 2)
        E = D.evaluate(router.inputs[1].type.shape[1], env)
        d = D.evaluate(router.inputs[1].type.shape[0], env)
        F = D.evaluate(next(b for b in mms if b.inputs[1].type.rank == 3)
                       .inputs[1].type.shape[2], env)
        N = numel(router.type) // E
        return (3 if backward else 1) * 2 * N * d * E + (6 if backward else 3) * 2 * N * k * d * F

    from lmc.codegen.wrapper import concat_aliases

    rows = []
    for graph_name, exe in (("forward", prog.forward_exec), ("backward", prog.backward_exec)):
        written = concat_aliases(exe.graph)     # concats their pieces' kernels write: no launch
        for n in exe.graph.nodes:
            if n in written:
                continue
            if n.op is Op.FUSED:
                body, kind = n.attrs["body"], n.attrs["kind"]
                by = sum(nbytes(x) for x in n.inputs) + sum(
                    nbytes(o) for o in body.outputs.values())
                fl = mm_flops(body) if kind != "pointwise" and kind != "reduction" else 0
                if kind in ("moe_layer", "moe_layer_bwd"):
                    fl = moe_flops(body, kind.endswith("_bwd"))
                if "attention" in kind and any(b.op is Op.CAUSAL_MASK for b in body.nodes):
                    fl //= 2
                if kind.endswith("_bwd") and "attention" in kind:
                    fl = fl * 7 // 6    # the body's 6 products; the kernels compute 7
                # fuse_column_sums: the kernel stores partial rows [programs, N] fp32 for
                # each column sum, a second launch adds them into the output
                cols = list(body.outputs.values())[len(body.outputs)
                                                   - body.meta.get("column_sums", 0):]
                finish = []
                for o in cols:
                    part = H100_SMS * COL_PROGRAMS_PER_SM * numel(o.type) * 4
                    by += part - nbytes(o)
                    finish.append({"graph": graph_name, "kind": kind,
                                   "name": n.attrs["kernel"] + ":column_sum_finish",
                                   "ops": ["sum"], "bytes": part + nbytes(o), "flops": 0})
                rows.append({"graph": graph_name, "kind": kind, "name": n.attrs["kernel"],
                             "ops": [m.op.value for m in body.nodes
                                     if m.op not in (Op.INPUT, Op.CONST)],
                             "bytes": by, "flops": fl})
                rows += finish
            elif n.op.kind in (Kind.POINTWISE, Kind.REDUCTION, Kind.MATMUL, Kind.INDEX,
                               Kind.RANDOM) or n.op is Op.CONCAT:
                if n.op in (Op.GATHER, Op.EMBEDDING):
                    by = nbytes(n) + nbytes(n.inputs[1])
                elif n.op is Op.SCATTER_ADD:
                    by = 2 * nbytes(n) + nbytes(n.inputs[1]) + nbytes(n.inputs[2])
                else:
                    by = sum(nbytes(x) for x in n.inputs) + nbytes(n)
                fl = 0
                if n.op is Op.MATMUL:
                    fl = 2 * numel(n.type) * D.evaluate(n.inputs[0].type.shape[-1], env)
                rows.append({"graph": graph_name, "kind": "torch:" + n.op.value,
                             "name": n.op.value, "ops": [n.op.value], "bytes": by, "flops": fl})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    step_args(ap)
    ap.add_argument("--bandwidth", type=float, default=3.0e12,
                    help="bytes/s (default 3.0e12: an H100's measured copy bandwidth)")
    ap.add_argument("--flops", type=float, default=700e12,
                    help="matmul FLOP/s (default 700e12: a dense bf16 rate an H100 sustains)")
    ap.add_argument("--top", type=int, default=12, help="list the N costliest launches")
    ap.add_argument("--json", metavar="PATH", help="also write every row and total here")
    a = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")    # codegen only; nothing is launched
    from lmc.ir import dims as D

    prog = _program(a.model, None if a.preset == "default" else a.preset, a.precision,
                    a.set or None)
    env = {"B": a.batch_size, "T": a.seq_len}
    rows = cost_rows(prog, env)
    for r in rows:
        r["seconds"] = max(r["bytes"] / a.bandwidth, r["flops"] / a.flops)
    total = sum(r["seconds"] for r in rows)
    tokens = a.batch_size * a.seq_len
    saved = 0
    for s in prog.saved:
        n = prog.forward.outputs[s]
        k = 1
        for d in n.type.shape:
            k *= D.evaluate(d, env)
        saved += k * _BYTES.get(n.type.dtype.value, 4)
    launches = {g: sum(r["graph"] == g for r in rows) for g in ("forward", "backward")}
    print(f"{a.model} ({a.preset}) {a.precision}, B={a.batch_size} T={a.seq_len}: modelled "
          f"at {a.bandwidth / 1e12:g} TB/s and {a.flops / 1e12:g} TFLOP/s")
    print(f"  launches      forward {launches['forward']}, backward {launches['backward']}")
    print(f"  bytes moved   {sum(r['bytes'] for r in rows) / 1e9:.2f} GB")
    print(f"  matmul FLOPs  {sum(r['flops'] for r in rows) / 1e12:.2f} TFLOP")
    print(f"  saved for the backward  {saved / 2**30:.2f} GiB")
    print(f"  roofline step {total * 1e3:.2f} ms  ({tokens / total:,.0f} tokens/s upper bound)")
    by_kind = collections.defaultdict(lambda: [0, 0, 0, 0.0])
    for r in rows:
        k = by_kind[(r["graph"], r["kind"])]
        k[0] += 1
        k[1] += r["bytes"]
        k[2] += r["flops"]
        k[3] += r["seconds"]
    print(f"  {'graph':9s} {'kind':24s} {'launches':>8s} {'GB':>8s} {'TFLOP':>7s} {'ms':>7s}")
    for (g, kind), (n, by, fl, sec) in sorted(by_kind.items(), key=lambda kv: -kv[1][3]):
        print(f"  {g:9s} {kind:24s} {n:8d} {by / 1e9:8.2f} {fl / 1e12:7.2f} {sec * 1e3:7.2f}")
    if a.top:
        print(f"  the {a.top} costliest launches:")
        for r in sorted(rows, key=lambda r: -r["seconds"])[:a.top]:
            print(f"  {r['graph']:9s} {r['name']:40s} {r['bytes'] / 1e9:7.3f} GB "
                  f"{r['flops'] / 1e12:6.3f} TFLOP {r['seconds'] * 1e3:6.3f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "preset": a.preset, "precision": a.precision,
                       "batch_size": a.batch_size, "seq_len": a.seq_len,
                       "bandwidth": a.bandwidth, "flops_rate": a.flops,
                       "roofline_step_s": total, "saved_bytes": saved, "launches": launches,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
