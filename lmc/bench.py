"""`lmc bench`: what fusion buys on one architecture, measured side by side in one run.

    lmc bench zoo/llama.yaml [--mode train|decode|both] [--batch-size --seq-len]
              [--disable PASS ...] [--compare eager,compile] [--out DIR] [--quick]

(--quick: the tiny preset, one timed step and no warm-up, two decode tokens, and the eager
oracle only unless --compare names compile: about 25 s on a 2-core CPU, where Dynamo tracing
the oracle decoder alone takes minutes.)

Configurations (each a fresh model with the same weights seed):

  train    lmc (triton backend, every fusion pass), lmc with each fusion pass disabled in turn
           (that pass's own contribution), the oracle in eager torch (the torch backend: the
           primitive graph op by op), the oracle under torch.compile. One step = forward, loss,
           backward, AdamW; tokens/s from the median step time and the peak memory.
  decode   prefill a 16-token prompt, then single-token steps: tokens/s and per-token latency at
           batch 1 and a larger batch, for lmc (triton), the oracle eagerly and under
           torch.compile (mode="reduce-overhead" on CUDA), with the ops one step runs
           (`ops_per_step`: lmc's fused ops + the torch ops left between them; the oracle's
           ops; a static step's state copies back into their buffers after it, when any),
           which at batch 1 bound a CUDA-graph step as much as the bytes it reads.
           In --precision (bf16 by default on CUDA): the weights stored in it, matmuls in it
           (mixed_precision.low_precision_weights), the same program for every config.
  kernels  one lmc training step with each launch timed: the top kernels by time, their share
           of the step, achieved bandwidth (bytes in + out) and, for matmul kernels, FLOP/s,
           against the device's measured peaks (a large copy and a large matmul at start).

GPU timing uses CUDA events with warm-up and medians over repeats, inputs rotated between
steps; CPU timing (perf_counter; Triton in interpreter mode) is labelled as such and is not
comparable with GPU figures. Output: a table on the terminal, DIR/bench.json, DIR/report.md
and DIR/bench_train.png, bench_decode.png, bench_kernels.png.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .errors import LmcError, UsageError

SCHEMA_VERSION = 1
DECODE_PROMPT = 16     # tokens of the decode benchmark's prompt, before --decode-tokens steps


# -- timing ------------------------------------------------------------------------------------
class Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.label = "cuda events" if self.cuda else "cpu perf_counter (interpreter for Triton)"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def repeat(self, fn, steps: int, warmup: int, reset_peak: bool = True) -> List[float]:
        """Seconds of fn(i) for `steps` calls after `warmup` untimed ones (i counts all
        calls, so callers can rotate inputs); the peak-memory counter restarts after warm-up."""
        for i in range(warmup):
            fn(i)
        self.sync()
        if self.cuda and reset_peak:
            torch.cuda.reset_peak_memory_stats()
        return [self.time(lambda i=i: fn(warmup + i)) for i in range(steps)]

    def median(self, fn, warmup: int, repeats: int) -> float:
        """Median seconds of fn() (the benchmarks/ scripts' timer)."""
        return statistics.median(self.repeat(lambda i: fn(), repeats, warmup, reset_peak=False))

    def peak_gib(self) -> Optional[float]:
        return torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None


def device_peaks(clock: Clock, quick: bool) -> Dict[str, float]:
    """A copy (bytes read + written per second) and a matmul (FLOP/s) timed on this device:
    the yardsticks the per-kernel figures are read against."""
    dev = clock.device
    n = (1 << 20) if quick else (1 << 28)
    x = torch.empty(n, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    t = statistics.median(clock.repeat(lambda i: y.copy_(x), 3 if quick else 10, 1))
    m = 256 if quick else 8192
    dt = torch.float32 if dev.type == "cpu" else torch.bfloat16
    a = torch.randn(m, m, device=dev, dtype=dt)
    b = torch.randn(m, m, device=dev, dtype=dt)
    tm = statistics.median(clock.repeat(lambda i: a @ b, 3 if quick else 10, 1))
    return {"copy_GBps": 2 * n * 4 / t / 1e9, "matmul_TFLOPs": 2 * m ** 3 / tm / 1e12,
            "matmul_dtype": str(dt).replace("torch.", "")}


# -- models ------------------------------------------------------------------------------------
def _train_graph(compiled, precision: str):
    from .passes import run_pipeline
    from .passes.loss import with_loss
    from .passes.mixed_precision import mixed_precision
    return run_pipeline(with_loss(mixed_precision(compiled.graph, precision)))


def _batches(vocab: int, B: int, T: int, device, n: int = 4):
    """A few distinct batches, rotated between steps so caches do not flatter."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (B, T), generator=g).to(device),
             torch.randint(0, vocab, (B, T), generator=g).to(device)) for _ in range(n)]


def _train_step(model, batches, compiled_fwd=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = compiled_fwd if compiled_fwd is not None else model   # (a Module has no bool)

    def step(i):
        ids, targets = batches[i % len(batches)]
        loss = fwd(ids, targets=targets)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _fusion_kernel_profile(model, step, clock: Clock, peaks) -> List[Dict[str, Any]]:
    """Time every launch of one training step (synchronised around each)."""
    from .ir.ops import Op

    prog = model.program()
    rows: Dict[str, Dict[str, Any]] = {}

    def wrap(program, graph_name):
        orig = dict(program._launch)

        def make(kind, go):
            def launch(kernel, xs, outs, node, ctx):
                clock.sync()
                t = clock.time(lambda: go(kernel, xs, outs, node, ctx))
                name = node.attrs["kernel"]
                r = rows.setdefault((graph_name, name), {
                    "kernel": name, "kind": kind, "graph": graph_name, "seconds": 0.0,
                    "launches": 0, "bytes": 0, "flops": 0,
                    "ops": [m.op.value for m in node.attrs["body"].nodes
                            if m.op not in (Op.INPUT, Op.CONST)]})
                r["seconds"] += t
                r["launches"] += 1
                r["bytes"] += sum(x.numel() * x.element_size() for x in list(xs) + list(outs)
                                  if isinstance(x, torch.Tensor))
                for m in node.attrs["body"].nodes:
                    if m.op is Op.MATMUL:
                        shape = m.type.concrete(ctx.dims)
                        k = ctx.dim(m.inputs[0].type.shape[-1])
                        n = 1
                        for s in shape:
                            n *= s
                        r["flops"] += 2 * n * k
            return launch
        program._launch = {k: make(k, go) for k, go in orig.items()}
        return orig

    saved = [(p, wrap(p, g)) for p, g in ((prog.forward_exec, "forward"),
                                          (prog.backward_exec, "backward"))]
    try:
        clock.sync()
        t0 = time.perf_counter()
        step(0)
        clock.sync()
        total = time.perf_counter() - t0
    finally:
        for p, orig in saved:
            p._launch = orig
    out = sorted(rows.values(), key=lambda r: -r["seconds"])
    for r in out:
        r["share"] = r["seconds"] / total
        r["GBps"] = r["bytes"] / r["seconds"] / 1e9 if r["seconds"] else 0.0
        r["bandwidth_of_peak"] = r["GBps"] / peaks["copy_GBps"]
        r["TFLOPs"] = r["flops"] / r["seconds"] / 1e12 if r["flops"] and r["seconds"] else None
        r["flops_of_peak"] = (r["TFLOPs"] / peaks["matmul_TFLOPs"]) if r["TFLOPs"] else None
    return out


def bench_train(path, preset, sets, args, clock: Clock, peaks) -> Dict[str, Any]:
    from .codegen.program import PATTERN_PASSES, apply_patterns, fusion_names
    from .driver import compile_model
    from .runtime.module import LmcModel

    compiled = compile_model(path, preset, sets)
    graph = _train_graph(compiled, args.precision)
    vocab = graph.outputs["logits"].type.shape[-1]
    B, T = args.batch_size, args.seq_len
    batches = _batches(vocab, B, T, clock.device)
    tokens = B * T
    configs: List[Dict[str, Any]] = [{"name": "lmc", "backend": "triton",
                                      "disable": list(args.disable)}]
    # a pattern pass that matches nothing in this model would time the same program twice
    fired = fused_passes(apply_patterns(graph))
    for p in fusion_names():
        if p not in args.disable and (p not in PATTERN_PASSES or p in fired):
            configs.append({"name": f"lmc -{p}", "backend": "triton", "pass": p,
                            "disable": list(args.disable) + [p]})
    if "eager" in args.compare:
        configs.append({"name": "oracle eager", "backend": "torch", "disable": []})
    if "compile" in args.compare:
        configs.append({"name": "oracle torch.compile", "backend": "torch", "disable": [],
                        "compile": True})
    rows, kernels = [], []
    lmc_fused = None      # the fusion passes that fused something in the lmc program
    for c in configs:
        if not worth_timing(c, lmc_fused):
            continue          # nothing to take out: the same program as lmc's
        row = {"name": c["name"], "disable": c["disable"]}
        try:
            model = LmcModel(graph, seed=0, backend=c["backend"],
                             grad_outputs=["loss"]).to(clock.device)
            model.disable = c["disable"]
            fwd = torch.compile(model) if c.get("compile") else None
            step = _train_step(model, batches, fwd)
            times = clock.repeat(step, args.steps, args.warmup)
            med = statistics.median(times)
            row.update(median_step_s=med, min_step_s=min(times), tokens_per_s=tokens / med,
                       peak_gib=clock.peak_gib(), steps=len(times))
            if c["name"] == "lmc":
                kernels = _fusion_kernel_profile(model, step, clock, peaks)
                prog = model.program()
                lmc_fused = fused_passes(prog.forward_exec.graph, prog.backward_exec.graph)
            del model, step, fwd
        except Exception as e:  # a baseline that cannot run here is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        if clock.cuda:
            torch.cuda.empty_cache()
    return {"batch_size": B, "seq_len": T, "tokens_per_step": tokens, "configs": rows,
            "kernels": kernels}


def fused_passes(*graphs) -> set:
    """The passes with a "fused" record in the graphs' meta["fusions"]."""
    return {f["pass"] for g in graphs for f in g.meta.get("fusions", [])
            if f["status"] == "fused"}


def worth_timing(config: Dict[str, Any], lmc_fused) -> bool:
    """Whether a configuration differs from lmc's: one leaving out a fusion pass that fused
    nothing in lmc's program (`lmc_fused`: the passes with a "fused" record there, as every
    fusion pass records each site; None before lmc has run) would time the same program
    again."""
    p = config.get("pass")
    return lmc_fused is None or p is None or p in lmc_fused


def step_ops(graph, aux=None) -> Dict[str, int]:
    """What one decode step runs, from its graph: `fused`, the fused ops lmc launches (each a
    generated kernel or a template's launch sequence: flash-decoding may add a combine), and
    `torch`, every other op that launches a kernel (views, constants and graph plumbing
    excluded), and `state_copies`, the new states the static Decoder copies into their
    buffers after the step (those no kernel wrote in place: a cache's index_copy and a state
    its op updated in place, `fuse_cache_writes`, are not copied); given the step's position
    inputs (`StepGraph.aux`), `positions`, the launches computing them on a GPU
    (lmc/runtime/positions.py). At batch 1 a step is a chain of small kernels, so under a
    CUDA graph this count bounds the step time as much as the bytes read do."""
    from .codegen.wrapper import inplace_source
    from .ir.ops import Op
    from .passes.decode import state_outputs

    free = {Op.INPUT, Op.PARAM, Op.CONST, Op.GETITEM, Op.RESHAPE, Op.PERMUTE, Op.SLICE,
            Op.EXPAND, Op.FUSED}
    copies = sum(1 for _, v in state_outputs(graph)
                 if v.op not in (Op.INPUT, Op.INDEX_COPY) and inplace_source(v) is None)
    out = {"fused": sum(n.op is Op.FUSED for n in graph.nodes),
           "torch": sum(n.op not in free for n in graph.nodes), "state_copies": copies}
    if aux is not None:
        from .runtime.positions import Tables
        out["positions"] = Tables(aux).launches()
    return out


def step_weight_bytes(graph, batch: int = 1, itemsize: int = 2) -> int:
    """The parameter bytes one decode step of `batch` sequences must read (one new token
    each), at `itemsize` bytes per element (2: bf16 weights), from its graph: a table read only
    through embedding/gather counts the rows it picks; an MoE op's expert stacks (inputs 2-4
    of a fused moe_layer) the min(E, batch * k) experts its tokens can choose; every other
    parameter in full. A model of the weight traffic (caches and activations not counted)."""
    from .ir.dims import evaluate
    from .ir.ops import Op

    users = graph.users()
    views = (Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE, Op.CAST)

    def readers(n):
        out = []
        for u in users.get(n, []):
            out += readers(u) if u.op in views else [(u, n)]
        return out
    total = 0
    for p in graph.nodes:
        if p.op is not Op.PARAM:
            continue
        shape = [evaluate(d, {"B": batch, "T": 1}) for d in p.type.shape]
        numel = 1
        for d in shape:
            numel *= d
        rs = readers(p)
        frac = 1.0
        if rs and all(u.op in (Op.EMBEDDING, Op.GATHER) for u, _ in rs):
            frac = min(1.0, batch / shape[0])
        elif rs and all(u.op is Op.FUSED and u.attrs["kind"] == "moe_layer"
                        and u.inputs.index(x) in (2, 3, 4) for u, x in rs):
            opts = rs[0][0].attrs["body"].meta["options"]
            frac = min(opts["E"], batch * opts["k"]) / opts["E"]
        total += int(numel * frac) * itemsize
    return total


def bench_decode(path, preset, sets, args, clock: Clock) -> Dict[str, Any]:
    from .driver import compile_model
    from .passes.mixed_precision import low_precision_weights
    from .runtime.decoder import Decoder
    from .runtime.module import LmcModel

    # --precision: the weights stored in that dtype, matmuls in it (lmc and the oracle alike)
    graph = low_precision_weights(compile_model(path, preset, sets).graph, args.precision)

    prompt, new = DECODE_PROMPT, args.decode_tokens
    rows = []
    batches = [1] + ([args.decode_batch] if args.decode_batch > 1 else [])
    configs = [("lmc", "triton", False)]
    if "eager" in args.compare:
        configs.append(("oracle eager", "torch", False))
    if "compile" in args.compare:
        configs.append(("oracle torch.compile", "torch", True))
    for name, backend, compiled in configs:
        for B in batches:
            row = {"name": name, "batch": B}
            try:
                model = LmcModel(graph, seed=0, backend=backend,
                                 device=clock.device).eval()
                # on CUDA: the static step (preallocated caches, fixed shapes), lmc's under
                # its CUDA graph, the oracle's under torch.compile's
                static = clock.cuda
                dec = Decoder(model, backend=backend, static=True, max_len=prompt + new + 1,
                              cuda_graph=not compiled) if static else Decoder(model, backend)
                row["static"] = static
                row["ops_per_step"] = step_ops(dec.graph, dec.step.aux)
                step_fn = dec
                if compiled:
                    mode = "reduce-overhead" if clock.cuda else "default"
                    step_fn = torch.compile(dec.__call__, mode=mode, dynamic=True)
                vocab = model.graph.outputs["logits"].type.shape[-1]
                g = torch.Generator().manual_seed(1)
                ids = torch.randint(0, vocab, (B, prompt), generator=g).to(clock.device)
                per_token: List[float] = []
                for rep in range(args.warmup + 1):
                    state = dec.init_state(B)
                    logits, state = step_fn(ids, state)
                    nxt = logits[:, -1:].argmax(-1)
                    times = []
                    for _ in range(new):
                        def one():
                            nonlocal logits, state
                            logits, state = step_fn(nxt, state)
                        times.append(clock.time(one))
                        nxt = logits[:, -1:].argmax(-1)
                    per_token = times
                med = statistics.median(per_token)
                if static:
                    row["cuda_graph"] = bool(dec.cuda_graph)
                    row["cuda_graph_off"] = dec.cuda_graph_off
                row.update(latency_ms=med * 1e3, tokens_per_s=B / med, new_tokens=new,
                           prompt=prompt)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
    return {"prompt": prompt, "configs": rows}


# -- report ------------------------------------------------------------------------------------
def table(result: Dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"lmc bench  {result['model']}  preset={result['preset']}  on {m['device']} "
             f"({m['timing']}; torch {m['torch']}, triton {m['triton']}, {result['date']})",
             f"device peaks: copy {result['peaks']['copy_GBps']:.1f} GB/s, matmul "
             f"{result['peaks']['matmul_TFLOPs']:.3f} TFLOP/s ({result['peaks']['matmul_dtype']})"]
    if "train" in result:
        t = result["train"]
        base = next((r for r in t["configs"] if r["name"] == "lmc" and "error" not in r), None)
        lines += ["", f"train  B={t['batch_size']} T={t['seq_len']}",
                  f"  {'configuration':<32}{'tokens/s':>12}{'step ms':>10}{'peak GiB':>10}"
                  f"{'vs lmc':>8}"]
        for r in t["configs"]:
            if "error" in r:
                lines.append(f"  {r['name']:<32}  failed: {r['error']}")
                continue
            rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
            pk = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            lines.append(f"  {r['name']:<32}{r['tokens_per_s']:>12,.0f}"
                         f"{r['median_step_s'] * 1e3:>10.1f}{pk:>10}{rel:>8}")
        if t["kernels"]:
            lines += ["", "  top kernels of one lmc step (share of step, achieved bandwidth, "
                      "FLOP/s; fraction of device peak)"]
            for r in t["kernels"][:10]:
                fl = (f"  {r['TFLOPs']:.3g} TFLOP/s ({r['flops_of_peak']:.1%})"
                      if r["TFLOPs"] else "")
                lines.append(f"  {r['share']:>6.1%}  {r['kernel']:<40} {r['graph'][:3]} "
                             f"{r['launches']:>3}x {r['GBps']:9.3g} GB/s "
                             f"({r['bandwidth_of_peak']:.1%}){fl}")
    if "decode" in result:
        lines += ["", f"decode  prompt {result['decode']['prompt']} tokens, then one at a time",
                  f"  {'configuration':<32}{'batch':>6}{'tokens/s':>12}{'ms/token':>10}"
                  f"{'ops/step (fused + torch)':>27}"]
        for r in result["decode"]["configs"]:
            if "error" in r:
                lines.append(f"  {r['name']:<32}{r['batch']:>6}  failed: {r['error']}")
                continue
            ops = r.get("ops_per_step")
            copies = ops.get("state_copies", 0) if ops and r.get("static") else 0
            pos = ops.get("positions", 0) if ops and r.get("static") else 0
            ops = (f"{ops['fused']} + {ops['torch']}" + (f" + {pos} pos" if pos else "")
                   + (f" + {copies} copies" if copies else "") if ops else "-")
            lines.append(f"  {r['name']:<32}{r['batch']:>6}{r['tokens_per_s']:>12,.1f}"
                         f"{r['latency_ms']:>10.2f}{ops:>27}")
    return "\n".join(lines)


def charts(result: Dict[str, Any], out: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    note = f"{result['machine']['device']} — {result['machine']['timing']}"
    if "train" in result:
        rows = [r for r in result["train"]["configs"] if "error" not in r]
        fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(len(rows), 1)))
        ax.barh([r["name"] for r in rows], [r["tokens_per_s"] for r in rows], color="#4c72b0")
        ax.invert_yaxis()
        ax.set_xlabel("training tokens/s (higher is better)")
        ax.set_title(f"{result['model']} train B={result['train']['batch_size']} "
                     f"T={result['train']['seq_len']}\n{note}", fontsize=9)
        fig.tight_layout()
        written.append(os.path.join(out, "bench_train.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        ks = result["train"]["kernels"][:15]
        if ks:
            fig, ax = plt.subplots(figsize=(9, 0.5 + 0.35 * len(ks)))
            colors = {"matmul": "#dd8452", "reduction": "#55a868", "pointwise": "#4c72b0"}
            ax.barh([f"{k['kernel'][:40]} ({k['graph'][0]})" for k in ks],
                    [100 * k["share"] for k in ks],
                    color=[colors.get(k["kind"], "#8172b3") for k in ks])
            ax.invert_yaxis()
            ax.set_xlabel("% of one lmc training step (f: forward, b: backward)")
            ax.set_title(f"{result['model']}: top kernels\n{note}", fontsize=9)
            fig.tight_layout()
            written.append(os.path.join(out, "bench_kernels.png"))
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    if "decode" in result:
        rows = [r for r in result["decode"]["configs"] if "error" not in r]
        fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * max(len(rows), 1)))
        ax.barh([f"{r['name']} B={r['batch']}" for r in rows],
                [r["tokens_per_s"] for r in rows], color="#55a868")
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s (higher is better)")
        ax.set_title(f"{result['model']} decode\n{note}", fontsize=9)
        fig.tight_layout()
        written.append(os.path.join(out, "bench_decode.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def report_md(result: Dict[str, Any], pngs: Sequence[str]) -> str:
    body = ["# lmc bench: " + result["model"], "",
            f"Command: `{result['command']}`", "",
            "```", table(result), "```", ""]
    for p in pngs:
        body.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
    return "\n".join(body) + "\n"


# -- entry -------------------------------------------------------------------------------------
def _check_up_front(args, max_seq) -> None:
    """What would fail only after minutes of measuring: sizes past the model's max_seq, an
    --out that cannot be written (the CLI has checked the counts and an --out that is a
    file)."""
    if max_seq is not None:
        if args.mode in ("train", "both") and args.seq_len > max_seq:
            raise LmcError(f"--seq-len {args.seq_len} exceeds the model's max_seq {max_seq}")
        if args.mode in ("decode", "both") and DECODE_PROMPT + args.decode_tokens > max_seq:
            raise LmcError(f"--decode-tokens {args.decode_tokens} after the "
                           f"{DECODE_PROMPT}-token prompt exceeds the model's max_seq "
                           f"{max_seq}")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise LmcError(f"--out {args.out}: cannot create it ({e.strerror})") from None
    if not os.access(args.out, os.W_OK):
        raise LmcError(f"--out {args.out}: not writable")


def run(args, command: str) -> Dict[str, Any]:
    import triton

    from .driver import compile_model

    if args.quick:
        args.preset = args.preset or "tiny"
        args.batch_size = args.batch_size or 2
        args.seq_len = args.seq_len or 16
        # no warm-up: on a CPU the first step costs the kernels' load (the interpreter
        # compiles nothing), and --quick checks the harness, not the speed
        args.steps, args.warmup = 1, 0
        args.decode_tokens = min(args.decode_tokens, 2)
        args.decode_batch = min(args.decode_batch, 2)
    args.batch_size = args.batch_size or 16
    args.seq_len = args.seq_len or 1024
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = Clock(device)
    if args.precision is None:
        args.precision = "bf16" if clock.cuda else "f32"
    from .codegen.program import fusion_names
    bad = [p for p in args.disable if p not in fusion_names()]
    if bad:
        raise UsageError(f"--disable {bad[0]}: not a fusion pass (fusion passes: "
                       f"{', '.join(fusion_names())})")
    compiled = compile_model(args.file, args.preset, args.set)
    _check_up_front(args, compiled.graph.meta.get("config", {}).get("max_seq"))
    result: Dict[str, Any] = {
        "schema": SCHEMA_VERSION, "model": compiled.graph.name, "file": args.file,
        "preset": args.preset, "set": list(args.set or []), "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "precision": args.precision,
        "machine": {"device": torch.cuda.get_device_name() if clock.cuda else
                    f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
                    "timing": clock.label, "torch": torch.__version__,
                    "triton": triton.__version__, "python": platform.python_version()},
        "steps": args.steps, "warmup": args.warmup,
    }
    result["peaks"] = device_peaks(clock, args.quick)
    if args.mode in ("train", "both"):
        result["train"] = bench_train(args.file, args.preset, args.set, args, clock,
                                      result["peaks"])
    if args.mode in ("decode", "both"):
        result["decode"] = bench_decode(args.file, args.preset, args.set, args, clock)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    pngs = charts(result, args.out)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report_md(result, pngs))
    return result
