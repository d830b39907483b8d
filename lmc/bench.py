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
           torch.compile (mode="reduce-overhead" on CUDA), lmc with each fusion pass that
           fused something in its step left out in turn (batch 1), with the ops one step runs
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

import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
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
    the yardsticks the per-kernel figures are read against. Sized to the device: on a GPU a
    1 GiB copy and an 8192^3 bf16 matmul; on a CPU a 64 MiB copy and a 1024^3 fp32 matmul
    (an 8192^3 one takes minutes there, and tiny sizes time thread start-up, not peaks)."""
    dev = clock.device
    gpu = dev.type != "cpu"
    n = (1 << 28) if gpu else (1 << 24)
    x = torch.empty(n, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    reps = 3 if quick else 10
    t = statistics.median(clock.repeat(lambda i: y.copy_(x), reps, 1))
    m = 8192 if gpu else 1024
    dt = torch.bfloat16 if gpu else torch.float32
    a = torch.randn(m, m, device=dev, dtype=dt)
    b = torch.randn(m, m, device=dev, dtype=dt)
    tm = statistics.median(clock.repeat(lambda i: a @ b, reps, 1))
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
                r["flops"] += kernel_flops(node, ctx)
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


def kernel_flops(node, ctx) -> int:
    """2 * M * N * K for each matmul of a fused kernel's body, at the launch's sizes. An MoE
    kernel's body is the dense form (every expert on every token: the oracle's), while its
    kernels run each token through its k chosen experts: a matmul with the expert axis
    ([.., E, ..] at axis 1) counts k/E of its dense work (tokens dropped over a capacity
    still counted). Attention counts the full T x T scores (no halving for the mask)."""
    from .ir.ops import Op

    body = node.attrs["body"]
    opts = body.meta.get("options") or {}
    routed = node.attrs["kind"].startswith("moe") and "E" in opts and "k" in opts
    total = 0
    for m in body.nodes:
        if m.op is not Op.MATMUL:
            continue
        shape = m.type.concrete(ctx.dims)
        k = ctx.dim(m.inputs[0].type.shape[-1])
        n = 1
        for d in shape:
            n *= d
        f = 2 * n * k
        if routed and any(len(t.type.shape) == 4 and t.type.shape[1] == opts["E"]
                          for t in (m, *m.inputs)):
            f = f * min(opts["k"], opts["E"]) // opts["E"]
        total += f
    return total


def bench_train(path, preset, sets, args, clock: Clock, peaks,
                on_row: Callable[[str, Dict[str, Any]], None] = lambda mode, row: None,
                into: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
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
    rows: List[Dict[str, Any]] = []
    kernels: List[Dict[str, Any]] = []
    out = into if into is not None else {}
    out.update(batch_size=B, seq_len=T, tokens_per_step=tokens, configs=rows, kernels=kernels)
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
            with _quiet_dynamo():
                times = clock.repeat(step, args.steps, args.warmup)
            med = statistics.median(times)
            row.update(median_step_s=med, min_step_s=min(times), tokens_per_s=tokens / med,
                       peak_gib=clock.peak_gib(), steps=len(times))
            if c["name"] == "lmc":
                kernels += _fusion_kernel_profile(model, step, clock, peaks)
                prog = model.program()
                lmc_fused = fused_passes(prog.forward_exec.graph, prog.backward_exec.graph)
            del model, step, fwd
        except Exception as e:  # a baseline that cannot run here is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        on_row("train", row)
        if clock.cuda:
            torch.cuda.empty_cache()
    return out


def _decode_times(step_fn, dec, ids, new: int, warmup: int, clock: Clock) -> List[float]:
    """Seconds of each of `new` single-token steps after prefilling `ids`, from the last of
    warmup + 1 rounds (each from a fresh state)."""
    per_token: List[float] = []
    for _ in range(warmup + 1):
        state = dec.init_state(ids.shape[0])
        logits, state = step_fn(ids, state)
        nxt = logits[:, -1:].argmax(-1)
        per_token = []
        for _ in range(new):
            def one():
                nonlocal logits, state
                logits, state = step_fn(nxt, state)
            per_token.append(clock.time(one))
            nxt = logits[:, -1:].argmax(-1)
    return per_token


@contextlib.contextmanager
def _quiet_dynamo():
    """torch.compile's Dynamo warns, once per frame, about what it cannot trace in lmc's
    Python (the oracle's program is built on first call, inside the compiled region): a
    screenful per baseline that says nothing about the measurement."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._dynamo.*")
        yield


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


def bench_decode(path, preset, sets, args, clock: Clock,
                 on_row: Callable[[str, Dict[str, Any]], None] = lambda mode, row: None,
                 into: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from .driver import compile_model
    from .passes.mixed_precision import low_precision_weights
    from .runtime.decoder import Decoder
    from .runtime.module import LmcModel

    # --precision: the weights stored in that dtype, matmuls in it (lmc and the oracle alike)
    graph = low_precision_weights(compile_model(path, preset, sets).graph, args.precision)

    from .codegen.program import fusion_names

    prompt, new = DECODE_PROMPT, args.decode_tokens
    rows: List[Dict[str, Any]] = []
    batches = [1] + ([args.decode_batch] if args.decode_batch > 1 else [])
    # (name, backend, under torch.compile, passes left out, batches); --disable: lmc's decode
    # step leaves the passes out too (the Decoder fuses its step graph with model.disable).
    # After lmc: lmc with each fusion pass that fused something in its step left out, at
    # batch 1 (the pass's own contribution to a token's latency)
    configs = [("lmc", "triton", False, list(args.disable), batches)]
    if "eager" in args.compare:
        configs.append(("oracle eager", "torch", False, [], batches))
    if "compile" in args.compare:
        configs.append(("oracle torch.compile", "torch", True, [], batches))
    out = into if into is not None else {}
    out.update(prompt=prompt, new_tokens=new, configs=rows)
    lmc_fused = None
    while configs:
        name, backend, compiled, disable, these = configs.pop(0)
        for B in these:
            row = {"name": name, "batch": B, "disable": disable}
            try:
                model = LmcModel(graph, seed=0, backend=backend,
                                 device=clock.device).eval()
                model.disable = disable
                # on CUDA: the static step (preallocated caches, fixed shapes), lmc's under
                # its CUDA graph, the oracle's under torch.compile's
                static = clock.cuda
                dec = Decoder(model, backend=backend, static=True, max_len=prompt + new,
                              cuda_graph=not compiled) if static else Decoder(model, backend)
                row["static"] = static
                row["ops_per_step"] = step_ops(dec.graph, dec.step.aux)
                if name == "lmc" and lmc_fused is None:
                    lmc_fused = fused_passes(dec.graph)
                    configs[0:0] = [(f"lmc -{p}", "triton", False, list(args.disable) + [p],
                                     [1]) for p in fusion_names()
                                    if p not in args.disable and p in lmc_fused]
                step_fn = dec
                if compiled:
                    mode = "reduce-overhead" if clock.cuda else "default"
                    step_fn = torch.compile(dec.__call__, mode=mode, dynamic=True)
                vocab = model.graph.outputs["logits"].type.shape[-1]
                g = torch.Generator().manual_seed(1)
                ids = torch.randint(0, vocab, (B, prompt), generator=g).to(clock.device)
                with _quiet_dynamo():
                    per_token = _decode_times(step_fn, dec, ids, new, args.warmup, clock)
                med = statistics.median(per_token)
                if static:
                    row["cuda_graph"] = bool(dec.cuda_graph)
                    row["cuda_graph_off"] = dec.cuda_graph_off
                row.update(latency_ms=med * 1e3, tokens_per_s=B / med, new_tokens=new,
                           prompt=prompt)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            on_row("decode", row)
    return out


# -- report ------------------------------------------------------------------------------------
def table(result: Dict[str, Any]) -> str:
    m = result["machine"]
    p = result["peaks"]
    lines = [f"lmc bench  {result['model']}  preset={result['preset']}  "
             f"precision={result['precision']}"
             + (f"  --disable {','.join(result['disable'])}" if result.get("disable") else ""),
             f"on {m['device']}: {m['timing']}; torch {m['torch']}, triton {m['triton']}; "
             f"{result['date']}",
             f"device peaks: copy {p['copy_GBps']:.1f} GB/s, matmul "
             f"{p['matmul_TFLOPs']:.3f} TFLOP/s ({p['matmul_dtype']})"]
    if result.get("quick"):
        lines.append("--quick: one step per configuration and no warm-up: these figures check "
                     "the harness, they do not compare configurations (the first row also "
                     "pays one-off start-up)")
    lmc_name = "lmc" + (f" (-{','.join(result['disable'])})" if result.get("disable") else "")
    if "train" in result:
        t = result["train"]
        base = next((r for r in t["configs"] if r["name"] == "lmc" and "error" not in r), None)
        lines += ["", f"train  B={t['batch_size']} T={t['seq_len']}: median of "
                  f"{result['steps']} step(s) after {result['warmup']} warm-up; vs lmc: the "
                  "row's tokens/s over lmc's (above 1 on an 'lmc -PASS' row: the pass slows "
                  "the step)",
                  f"  {'configuration':<32}{'tokens/s':>12}{'step ms':>10}{'peak GiB':>10}"
                  f"{'vs lmc':>8}"]
        for r in t["configs"]:
            name = lmc_name if r["name"] == "lmc" else r["name"]
            if "error" in r:
                lines.append(f"  {name:<32}  failed: {r['error']}")
                continue
            rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
            pk = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            lines.append(f"  {name:<32}{_rate(r['tokens_per_s']):>12}"
                         f"{r['median_step_s'] * 1e3:>10.1f}{pk:>10}{rel:>8}")
        if not any(r.get("peak_gib") is not None for r in t["configs"]):
            lines.append("  (peak GiB: measured by CUDA's allocator, on a GPU only)")
        if t["kernels"]:
            lines += ["", "  top kernels of one lmc step, each launch timed alone (fwd/bwd: "
                      "forward or backward graph; launches; achieved bandwidth and FLOP/s, "
                      "as a fraction of the device peaks)",
                      f"  {'share':>6}  {'kernel':<40} {'graph':<5} {'launch':>6} "
                      f"{'bandwidth':>10}"]
            for r in t["kernels"][:10]:
                fl = (f"  {r['TFLOPs']:.3g} TFLOP/s ({r['flops_of_peak']:.1%})"
                      if r["TFLOPs"] else "")
                lines.append(f"  {r['share']:>6.1%}  {r['kernel']:<40} "
                             f"{r['graph'][0] + 'wd':<5} {r['launches']:>6} "
                             f"{r['GBps']:6.3g} GB/s ({r['bandwidth_of_peak']:.1%}){fl}")
    if "decode" in result:
        d = result["decode"]
        lines += ["", f"decode  a {d['prompt']}-token prompt, then {d.get('new_tokens', '?')} "
                  "tokens one at a time (median per token"
                  + (f", after {result['warmup']} warm-up round(s)" if result['warmup'] else "")
                  + ")",
                  f"  {'configuration':<32}{'batch':>6}{'tokens/s':>12}{'ms/token':>10}"
                  f"{'ops/step (fused + torch)':>27}{'vs lmc':>8}"]
        base = {r["batch"]: r for r in d["configs"] if r["name"] == "lmc" and "error" not in r}
        for r in d["configs"]:
            name = lmc_name if r["name"] == "lmc" else r["name"]
            if "error" in r:
                lines.append(f"  {name:<32}{r['batch']:>6}  failed: {r['error']}")
                continue
            ops = r.get("ops_per_step")
            copies = ops.get("state_copies", 0) if ops and r.get("static") else 0
            pos = ops.get("positions", 0) if ops and r.get("static") else 0
            ops = (f"{ops['fused']} + {ops['torch']}" + (f" + {pos} pos" if pos else "")
                   + (f" + {copies} copies" if copies else "") if ops else "-")
            b = base.get(r["batch"])
            rel = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else ""
            lines.append(f"  {name:<32}{r['batch']:>6}{_rate(r['tokens_per_s']):>12}"
                         f"{r['latency_ms']:>10.2f}{ops:>27}{rel:>8}")
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
            other = "#8172b3"        # attention, MoE and the other templates
            ax.barh([f"{k['kernel'][:40]} ({k['graph'][0]})" for k in ks],
                    [100 * k["share"] for k in ks],
                    color=[colors.get(k["kind"], other) for k in ks])
            ax.invert_yaxis()
            from matplotlib.patches import Patch
            kinds = dict.fromkeys(k["kind"] if k["kind"] in colors else "template"
                                  for k in ks)
            ax.legend(handles=[Patch(color=colors.get(kd, other), label=kd) for kd in kinds],
                      fontsize=8, loc="lower right")
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
OUR_FILES = ("bench.json", "report.md", "bench_train.png", "bench_kernels.png",
             "bench_decode.png")


def _check_up_front(args, max_seq, clock: Clock) -> None:
    """What would fail only after minutes of measuring: sizes past the model's max_seq, bf16
    on a CPU, an --out that cannot be written or holds an earlier run (the CLI has checked
    the counts and an --out that is a file)."""
    if not clock.cuda and args.precision == "bf16":
        raise UsageError("--precision bf16 needs a GPU: Triton's interpreter computes bf16 on "
                         "its bit patterns (on a CPU use f16 or f32)")
    if max_seq is not None:
        if args.mode in ("train", "both") and args.seq_len > max_seq:
            raise LmcError(f"--seq-len {args.seq_len} exceeds the model's max_seq {max_seq}")
        if args.mode in ("decode", "both") and DECODE_PROMPT + args.decode_tokens > max_seq:
            raise LmcError(f"--decode-tokens {args.decode_tokens} after the "
                           f"{DECODE_PROMPT}-token prompt exceeds the model's max_seq "
                           f"{max_seq}")
    held = [f for f in OUR_FILES if os.path.exists(os.path.join(args.out, f))]
    if held and not args.overwrite:
        raise UsageError(f"--out {args.out} holds an earlier run ({held[0]}): give another "
                         "--out, or --overwrite to replace it")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise LmcError(f"--out {args.out}: cannot create it ({e.strerror})") from None
    if not os.access(args.out, os.W_OK):
        raise LmcError(f"--out {args.out}: not writable")


def run(args, command: str) -> Dict[str, Any]:
    from .driver import compile_model

    if args.quick:
        args.quick_preset = args.preset is None
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
    try:
        compiled = compile_model(args.file, args.preset, args.set)
    except LmcError as e:
        if getattr(args, "quick_preset", False) and "unknown preset 'tiny'" in e.message:
            raise LmcError(f"{e.message}; --quick takes the tiny preset: name another with "
                           "--preset", e.loc) from None
        raise
    _check_up_front(args, compiled.graph.meta.get("config", {}).get("max_seq"), clock)
    result: Dict[str, Any] = {
        "schema": SCHEMA_VERSION, "model": compiled.graph.name, "file": args.file,
        "preset": args.preset, "set": list(args.set or []), "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "precision": args.precision, "mode": args.mode, "quick": bool(args.quick),
        "disable": list(args.disable), "compare": list(args.compare),
        "machine": _machine(clock),
        "lmc": _lmc_version(),
        "steps": args.steps, "warmup": args.warmup,
        "decode_tokens": args.decode_tokens, "decode_batch": args.decode_batch,
        "complete": False,
    }
    path = os.path.join(args.out, "bench.json")

    def save():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, path)

    def on_row(mode: str, row: Dict[str, Any]):
        """Each configuration as it is measured: a line on stderr and bench.json rewritten,
        so a run cut short (a time limit) keeps what it measured."""
        if "error" in row:
            what = f"failed: {row['error']}"
        else:
            what = f"{_rate(row['tokens_per_s'])} tokens/s"
        at = f" B={row['batch']}" if "batch" in row else ""
        print(f"bench: {mode} {row['name']}{at}: {what}", file=sys.stderr, flush=True)
        save()

    for f in OUR_FILES:            # an earlier run's files (--overwrite) go first: a chart
        fp = os.path.join(args.out, f)      # this run does not draw must not stay beside it
        if os.path.exists(fp):
            os.remove(fp)
    result["peaks"] = device_peaks(clock, args.quick)
    save()
    if args.mode in ("train", "both"):
        result["train"] = {}        # filled as each configuration is measured
        bench_train(args.file, args.preset, args.set, args, clock, result["peaks"], on_row,
                    result["train"])
    if args.mode in ("decode", "both"):
        result["decode"] = {}
        bench_decode(args.file, args.preset, args.set, args, clock, on_row, result["decode"])
    result["complete"] = True
    save()
    pngs = charts(result, args.out)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report_md(result, pngs))
    return result


def _rate(x: float) -> str:
    """A tokens/s figure: whole numbers when large, three significant digits when small (a
    CPU's few tokens/s)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _machine(clock: Clock) -> Dict[str, Any]:
    import triton
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"device": torch.cuda.get_device_name() if clock.cuda else
            f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
            "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "timing": clock.label, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version()}


def _lmc_version() -> Dict[str, Any]:
    """lmc's version and, in a git checkout, its commit (and whether the tree had changes)."""
    import subprocess

    from . import __version__
    out: Dict[str, Any] = {"version": __version__}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=10)
            out["dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out
