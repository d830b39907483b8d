"""`lmc run FILE --train`: a training loop you can read top to bottom (nanoGPT style).

    model  = the compiled graph + a loss head (lmc.passes.loss), gradients from lmc's autodiff
    data   = Corpus (default: this Python's stdlib sources), get_batch(seed, step, micro)
    loop   = AdamW, warmup + cosine, grad clipping, grad accumulation, periodic val loss,
             metrics.jsonl, loss-curve PNG, atomic checkpoints, exact resume, NaN guard

Auxiliary losses (model.aux_losses, e.g. an MoE load-balance loss) are already inside the
graph's ``loss`` (lmc.passes.loss); the loop logs the cross-entropy (``ce_loss``) and each aux
loss separately, averaged like the loss, and every output with a static shape (no B or T,
e.g. ``expert_tokens``: tokens per expert) under ``stats``, summed over the step's global
batch. ``val_loss`` is the cross-entropy, comparable across models with and without aux losses.
Parameters under an update rule (model.updates, e.g. DeepSeek-V3's expert selection bias) move
by their rule after each optimizer step, from those summed outputs (apply_updates).

Distributed: under torchrun (WORLD_SIZE > 1) the model is wrapped in DDP, or with --fsdp in
FSDP2's fully_shard (which also runs on CPU with gloo); each rank reads its own rows of every
global batch, so losses equal a single-process run with the same global batch.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import LmcError
from ..ioutil import atomic_write
from .data import Corpus, get_batch, get_tokenizer


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8           # global batch (sequences per optimizer step, all ranks)
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    val_fraction: float = 0.05       # the corpus's tail held out for validation
    log_every: int = 10
    ckpt_every: int = 100
    seed: int = 0
    out: str = "runs/train"
    data: Optional[str] = None
    tokenizer: str = "cl100k_base"
    resume: Optional[str] = None     # a run directory (its latest checkpoint) or a ckpt-* one
    init: Optional[str] = None       # a checkpoint whose weights a new run starts from
    model_note: Optional[str] = None  # how the model differs from the checkpoint's (said
    #                                   once it loads, or as the reason it does not fit)
    backend: str = "torch"
    precision: Optional[str] = None  # f32 | bf16 | f16; None: bf16 on CUDA, f32 on CPU
    device: Optional[str] = None     # cpu | cuda; None: cuda when available
    fsdp: bool = False
    freeze: List[str] = field(default_factory=list)   # fnmatch patterns of frozen parameters
    overwrite: bool = False          # replace a run already in `out` (else refused)
    progress: bool = True
    imports: List[str] = field(default_factory=list)   # --import files (absolute), recorded
    extra: Dict[str, Any] = field(default_factory=dict)


# -- learning rate -------------------------------------------------------------------------------
def get_lr(step: int, c: TrainConfig) -> float:
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    if step >= c.steps:
        return c.min_lr
    ratio = (step - c.warmup) / max(c.steps - c.warmup, 1)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.lr - c.min_lr)


# -- distributed -----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: Optional[str] = None) -> Dist:
    """The rank's place: under torchrun (WORLD_SIZE > 1) a process group, NCCL on CUDA and
    Gloo on CPU. device: 'cpu' or 'cuda' (None: cuda when available)."""
    if device not in (None, "cpu", "cuda"):
        raise LmcError(f"--device {device}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise LmcError("--device cuda: no CUDA device here")
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return Dist(rank, world, torch.device("cuda", local))
    dist.init_process_group("gloo")
    return Dist(rank, world, torch.device("cpu"))


def _sum_over_ranks(t: torch.Tensor) -> None:
    """all_reduce t in place, and hold it until the backend's worker has let go of it.

    Gloo's worker thread drops its references to t just after the wait returns. Were t's last
    Python reference gone first, that drop would free t's Python object and need the GIL; in
    a rank that exits right after its last collective the worker gets the GIL only during
    interpreter shutdown, and the process aborts ("terminate called without an active
    exception") after finishing its work. So t stays referenced here until only we hold it."""
    import torch.distributed as dist

    dist.all_reduce(t)
    if t.device.type != "cpu":
        return      # NCCL: its watchdog thread may hold the work long after; not waited on
    deadline = time.monotonic() + 10.0
    while t._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(1e-4)  # releases the GIL for the worker


def _leave_process_group(finished: bool) -> None:
    """The end of a torchrun rank. After a run every rank finished, a barrier first: a rank
    whose part of the last collective is done (an all-gather of the checkpoint's shards) must
    not exit while its peer still sends or receives (the peer's next read fails, "Connection
    closed by peer"). Then, with the GIL released a moment, Gloo's worker threads drop the
    work objects they still hold; one that needs the GIL only once the interpreter is
    shutting down aborts the process ("terminate called without an active exception"). An
    interrupted or failed rank skips the barrier (its peers may never reach it)."""
    import torch.distributed as dist

    if finished:
        dist.barrier()
    dist.destroy_process_group()
    for _ in range(20):
        time.sleep(0.005)


def all_mean(x: float, d: Dist) -> float:
    if d.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    _sum_over_ranks(t)
    return t.item() / d.world


def all_reduce(values: Dict[str, torch.Tensor], d: Dist, mean: bool) -> Dict[str, Any]:
    """Per-rank values (float64 tensors) -> their mean or sum over ranks, as Python
    numbers/lists. One all_reduce for all of them."""
    if not values:
        return {}
    flat = torch.cat([v.reshape(-1).double().cpu() for v in values.values()])
    if d.world > 1:
        flat = flat.to(d.device)
        _sum_over_ranks(flat)
        flat = flat.cpu() / (d.world if mean else 1)
    out, i = {}, 0
    for k, v in values.items():
        n = v.numel()
        part = flat[i:i + n].reshape(v.shape)
        i += n
        out[k] = part.item() if part.dim() == 0 else _plain(part.tolist())
    return out


def _plain(x):
    """Whole-number floats as ints (token counts read as counts)."""
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return int(x) if float(x).is_integer() else x


# the first loss scale of an f16 run (torch.amp.GradScaler's default)
INIT_LOSS_SCALE = 2.0 ** 16


# -- update rules (model.updates) ----------------------------------------------------------------
def apply_updates(model: torch.nn.Module, updates: List[dict], stats: Dict[str, Any]) -> None:
    """Move parameters by the model's update rules, after an optimizer step. `stats`: the
    step's logged outputs, summed over the global batch (every rank holds the same sums, so
    every rank moves its parameters, or its shards of them, alike).

    load_balance (DeepSeek-V3's auxiliary-loss-free balancing): each parameter is a vector of
    per-expert selection biases and takes its slice of the `load` output (tokens per expert,
    parameters in declaration order); an expert that took more tokens than its layer's mean
    has its bias lowered by `rate`, one that took fewer has it raised, so top-k picks it
    less (more) often at the next step."""
    for u in updates:
        if u["rate"] == 0:
            continue
        load = torch.as_tensor(stats[u["load"]], dtype=torch.float64).reshape(-1)
        at = 0
        for name in u["params"]:
            p = model.get_parameter(name)
            n = p.shape[0]
            row = load[at:at + n]
            at += n
            delta = (u["rate"] * torch.sign(row.mean() - row)).to(p.dtype).to(p.device)
            if hasattr(p, "device_mesh"):     # an FSDP2 DTensor: the same shards as p's
                from torch.distributed.tensor import distribute_tensor
                delta = distribute_tensor(delta, p.device_mesh, p.placements)
            with torch.no_grad():
                p.add_(delta)


# -- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(out: str, step: int, model, opt, cfg: TrainConfig, d: Dist,
                    extra: Dict[str, Any], scaler=None,
                    ours: Optional[set] = None) -> Optional[str]:
    """Write ckpt-<step>/ via a temp dir + rename, then point `latest` at it (atomic).
    `ours`: the steps of this run's checkpoints in `out` (step is added), the only ones
    pruned: a run resumed from an earlier checkpoint leaves the later ones of the
    continuation it replaces alone."""
    from safetensors.torch import save_file

    fsdp = d.world > 1 and cfg.fsdp
    state = _model_state(model, fsdp)
    optim = _optim_state(model, opt, fsdp)
    if not d.main:
        return None
    final = os.path.join(out, f"ckpt-{step:07d}")
    tmp = os.path.join(out, f".tmp-ckpt-{step:07d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:  # readable without unpickling
        json.dump({"step": step, **extra, "config": _settings(cfg)}, f)
    torch.save({"step": step, "optimizer": optim, "config": asdict(cfg), "extra": extra,
                "grad_scaler": scaler.state_dict() if scaler is not None and
                scaler.is_enabled() else None,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}},
               os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(os.path.join(out, "latest"), os.path.basename(final) + "\n")
    # keep the last two by step, never the one just written (a resume may find later ones)
    if ours is not None:
        ours.add(step)
    steps = sorted((n, p) for p in os.listdir(out) if (n := ckpt_step(p)) is not None
                   and n <= step and (ours is None or n in ours))
    for _, old in steps[:-2]:
        shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    return final


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _model_state(model, fsdp: bool):
    if fsdp:  # gather the sharded parameters into one full state dict
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())
    return getattr(model, "module", model).state_dict()


def _optim_state(model, opt, fsdp: bool):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=_full_options())
    return opt.state_dict()


def read_latest(run_dir: str, flag: str) -> str:
    """The checkpoint directory a run's `latest` names (not checked to exist)."""
    pointer = os.path.join(run_dir, "latest")
    try:
        with open(pointer, encoding="utf-8") as f:
            return os.path.join(run_dir, f.read().strip())
    except (OSError, UnicodeDecodeError) as e:
        raise LmcError(f"{flag} {pointer}: unreadable ({e})") from None


def ckpt_step(name: str) -> Optional[int]:
    """The step of a run's checkpoint directory name, ckpt-<7+ digits> (a user's ckpt-best
    beside them is not the run's), else None."""
    m = re.fullmatch(r"ckpt-(\d{7,})", name)
    return int(m.group(1)) if m else None


def checkpoint_dir(path: str, flag: str = "--checkpoint") -> str:
    """The checkpoint a run directory's `latest` names, or the ckpt-* directory given."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    if os.path.isfile(os.path.join(path, "latest")):
        ck = read_latest(path, flag)
        if os.path.isfile(os.path.join(ck, "model.safetensors")):
            return ck
        raise LmcError(f"{flag} {path}: 'latest' names {ck}, which holds no "
                       "model.safetensors")
    raise LmcError(f"{flag} {path}: neither a run directory with a 'latest' checkpoint "
                   "nor a ckpt-* directory holding model.safetensors")


def _meta_json(ck: str) -> Dict[str, Any]:
    """A checkpoint's meta.json as a dict, or {} where it is missing or unreadable (the
    fields read from it have older or stricter sources: state.pt, cli._read_meta)."""
    try:
        with open(os.path.join(ck, "meta.json"), encoding="utf-8") as f:
            got = json.load(f)
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def recorded_imports(path: str, flag: str) -> List[str]:
    """The --import files the run at `path` (a run or ckpt-* directory) was trained with,
    from its checkpoint's meta.json: a resumed run, or --generate from it, needs its Python
    blocks again. One that is gone is an error naming it."""
    try:
        ck = checkpoint_dir(path, flag)
    except LmcError:
        return []           # no such checkpoint: the later checks say so
    got = _meta_json(ck).get("imports") or []     # (none in an older checkpoint)
    if not isinstance(got, list) or not all(isinstance(x, str) for x in got):
        return []
    for p in got:
        if not os.path.isfile(p):
            raise LmcError(f"{flag} {path}: the run imported its blocks from {p}, which is "
                           "gone: give the file's new place with --import")
    return got


def is_checkpoint(path: str) -> bool:
    """A ckpt-* directory (weights and training state), not a run directory."""
    return os.path.isfile(os.path.join(path, "state.pt")) and \
        os.path.isfile(os.path.join(path, "model.safetensors"))


def resume_run_dir(path: str) -> str:
    """The run directory --resume continues: the one given, or a ckpt-* directory's run."""
    return (os.path.dirname(os.path.normpath(path)) or ".") if is_checkpoint(path) else path


def _is_run_of(run_dir: str, ck: str) -> bool:
    """run_dir is a run and ck one of its checkpoints: its `latest` names a ckpt-<step>
    directory in it, and ck is a ckpt-<step> directory in it."""
    try:
        with open(os.path.join(run_dir, "latest"), encoding="utf-8") as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return False
    return ckpt_step(name) is not None and os.path.isdir(os.path.join(run_dir, name)) and \
        ckpt_step(os.path.basename(os.path.normpath(ck))) is not None


def latest_checkpoint(run_dir: str) -> str:
    """The checkpoint --resume continues from: the run's latest, or the ckpt-* directory
    given."""
    if is_checkpoint(run_dir):
        return run_dir
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise LmcError(f"--resume {run_dir}: a file, not a run directory")
    if not os.path.exists(os.path.join(run_dir, "latest")):
        raise LmcError(f"--resume {run_dir}: no checkpoint there (no 'latest' file)")
    path = read_latest(run_dir, "--resume")
    if not os.path.isdir(path):
        raise LmcError(f"--resume {run_dir}: 'latest' names {path}, which is missing")
    return path


def check_config(c: TrainConfig) -> None:
    """Refuse settings no run can use, before anything is read or written (one line each)."""
    for flag, v, lo in (("--steps", c.steps, 1), ("--batch-size", c.batch_size, 1),
                        ("--seq-len", c.seq_len, 1), ("--grad-accum", c.grad_accum, 1),
                        ("--warmup", c.warmup, 0), ("--eval-every", c.eval_every, 1),
                        ("--ckpt-every", c.ckpt_every, 1), ("--log-every", c.log_every, 1)):
        if v < lo:
            raise LmcError(f"{flag} must be >= {lo}, got {v}")
    if not 0 < c.val_fraction < 1:     # (nan fails too)
        raise LmcError(f"--val-fraction must be in (0, 1), got {c.val_fraction}")
    if not (math.isfinite(c.lr) and c.lr > 0):
        raise LmcError(f"--lr must be a positive number, got {c.lr}")
    if not (math.isfinite(c.min_lr) and 0 <= c.min_lr <= c.lr):
        raise LmcError(f"min_lr must be in [0, lr], got {c.min_lr}")
    cpu_triton_check(c.device, c.backend)
    interpreter_bf16_check(c.backend, c.precision)
    if not 0 <= c.seed < 2 ** 32:
        raise LmcError(f"--seed must be in [0, 2**32), got {c.seed}")
    if c.resume is not None and os.path.exists(c.resume) and not os.path.isdir(c.resume):
        raise LmcError(f"--resume {c.resume}: a file, not a run directory")
    if c.resume is not None and c.init is not None:
        raise LmcError("--checkpoint starts a new run from a checkpoint's weights and --resume "
                       "continues a run: give one")
    if os.path.exists(c.out) and not os.path.isdir(c.out):
        raise LmcError(f"--out {c.out}: exists and is not a directory")
    same = c.resume is not None and os.path.realpath(resume_run_dir(c.resume)) == \
        os.path.realpath(c.out)
    if same and is_checkpoint(c.resume) and not _is_run_of(c.out, c.resume):
        raise LmcError(f"--resume {c.resume}: {c.out} is not its run (no 'latest' there "
                       f"naming a checkpoint beside it), and the continuation would write "
                       f"there: give it a run directory of its own with --out DIR")
    if same and c.overwrite:
        raise LmcError(f"--overwrite with --resume {c.resume}: the run would be continued and "
                       "replaced at once (drop one)")
    held = run_files(c.out)
    if held and not same and not c.overwrite:
        raise LmcError(f"--out {c.out} holds a run ({', '.join(held[:3])}"
                       f"{', ...' if len(held) > 3 else ''}): continue it with --resume "
                       f"{c.out}, replace it with --overwrite, or choose another --out")


# the settings a resumed run continues with; any other value makes a different run (--steps
# may grow: extending a run is what resume is for)
RESUMED_SETTINGS = ("batch_size", "seq_len", "grad_accum", "lr", "min_lr", "warmup",
                    "weight_decay", "grad_clip", "seed", "data", "tokenizer", "precision",
                    "backend", "val_fraction")
# what --resume takes from the run when not given (the above and the run's schedule)
RUN_SETTINGS = RESUMED_SETTINGS + ("steps", "eval_every", "ckpt_every", "log_every", "freeze")


def _settings(c: TrainConfig) -> Dict[str, Any]:
    d = asdict(c)
    return {k: d[k] for k in RUN_SETTINGS}


def run_settings(ck: str, flag: str) -> Dict[str, Any]:
    """The settings of the run checkpoint ck belongs to: from its meta.json, or (written
    before meta.json held them) its state.pt."""
    got = _meta_json(ck).get("config")
    if not isinstance(got, dict):
        got = read_state(ck, flag).get("config") or {}
    return {k: got[k] for k in RUN_SETTINGS if k in got}


def _note_changed_settings(was: Dict[str, Any], c: TrainConfig, main: bool) -> None:
    """Say (once, on stderr) which settings differ from the run being resumed: it continues,
    but not as the run it resumes would have."""
    now = asdict(c)
    flag = {"min_lr": "min_lr (lr/10, from --lr)"}
    show = lambda v: f"{v:.6g}" if isinstance(v, float) else v    # noqa: E731
    diff = [f"{flag.get(k, '--' + k.replace('_', '-'))} {show(now[k])} (the run: "
            f"{show(was[k])})" for k in RESUMED_SETTINGS if k in was and was[k] != now[k]]
    if diff and main:
        print("lmc: note: resuming with other settings than the run's: " + ", ".join(diff)
              + "; the continuation differs from the run it resumes", file=sys.stderr)


def cpu_triton_check(device: Optional[str], backend: str) -> None:
    """The triton backend runs Triton's interpreter on CPU tensors only where there is no
    CUDA: with CUDA present its kernels are compiled for the GPU."""
    if backend == "triton" and device == "cpu" and torch.cuda.is_available():
        raise LmcError("--backend triton with --device cpu: on a machine with CUDA the "
                       "generated kernels run on the GPU (drop --device cpu, or use "
                       "--backend torch)")


def interpreter_bf16_check(backend: str, precision: Optional[str]) -> None:
    """--backend triton --precision bf16 without CUDA: Triton's interpreter would compute bf16
    on bit patterns (each kernel refuses it); said before anything runs or is printed."""
    if backend == "triton" and precision == "bf16" and not torch.cuda.is_available():
        raise LmcError("--backend triton --precision bf16: without CUDA the kernels run in "
                       "Triton's interpreter, which computes bf16 on bit patterns; use "
                       "--precision f16 or f32 on CPU, or a GPU")


RUN_FILES = ("latest", "metrics.jsonl", "loss.png")


def run_files(out: str) -> List[str]:
    """What a run left in `out`: its checkpoints, `latest`, metrics and curve."""
    if not os.path.isdir(out):
        return []
    return sorted(p for p in os.listdir(out) if p in RUN_FILES or ckpt_step(p) is not None)


def _unreadable(flag: str, path: str, e: Exception) -> LmcError:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    ck = os.path.dirname(path)
    run, step = os.path.dirname(ck), ckpt_step(os.path.basename(ck))
    earlier = sorted((n, p) for p in (os.listdir(run) if step is not None and os.path.isdir(
        run) else []) if (n := ckpt_step(p)) is not None and n < step)
    hint = f"; the checkpoint before it: {flag} {os.path.join(run, earlier[-1][1])}" \
        if earlier else ""
    return LmcError(f"{flag} {path}: unreadable ({why}): a damaged checkpoint{hint}")


def read_weights(ck: str, flag: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """ck/model.safetensors; a missing, truncated or damaged file is one LmcError naming it
    (the file is left as it is)."""
    from safetensors.torch import load_file

    path = os.path.join(ck, "model.safetensors")
    try:
        weights = load_file(path, device=device)
    except Exception as e:  # safetensors raises its own error type, OSError, ...
        raise _unreadable(flag, path, e) from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and
           not bool(torch.isfinite(v).all())]
    if bad:     # (lmc no longer writes such a checkpoint: an older one, or another tool's)
        raise LmcError(f"{flag} {ck}: {len(bad)} of {len(weights)} weights hold inf or nan "
                       f"({bad[0]}{', ...' if len(bad) > 1 else ''}): training diverged "
                       f"before this checkpoint; use an earlier one")
    return weights


def read_state(ck: str, flag: str) -> Dict[str, Any]:
    """ck/state.pt (optimizer, RNG states, step), or one LmcError naming it."""
    path = os.path.join(ck, "state.pt")
    try:
        st = torch.load(path, weights_only=False, map_location="cpu")   # a GPU run's, too
        if not isinstance(st, dict) or not {"optimizer", "rng", "step"} <= set(st):
            raise ValueError("not an lmc training state")
        return st
    except Exception as e:
        raise _unreadable(flag, path, e) from None


def check_fits(weights: Dict[str, torch.Tensor], mine: Dict[str, torch.Tensor], ck: str,
               flag: str, why: Optional[str] = None) -> None:
    """The checkpoint's tensors are the model's, name for name and shape for shape; `why`:
    how the model was chosen differently from the checkpoint's, said when they differ."""
    bad = sorted(set(mine) ^ set(weights)) or [
        k for k in mine if tuple(mine[k].shape) != tuple(weights[k].shape)]
    if bad:
        k = bad[0]
        have = tuple(weights[k].shape) if k in weights else "absent"
        want = tuple(mine[k].shape) if k in mine else "absent"
        raise LmcError(f"{flag} {ck} does not fit this model ({len(bad)} tensor(s) differ; "
                       f"{k}: checkpoint {have}, model {want}): "
                       + (why or "pass the --preset/--set it was trained with"))


# -- the loop ------------------------------------------------------------------------------------
def train(path: str, preset: Optional[str], overrides, c: TrainConfig) -> Dict[str, Any]:
    # what `lmc run --generate --checkpoint` needs to rebuild the same model
    sets = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, dict) \
        else list(overrides or [])
    ckpt_meta = {"tokenizer": c.tokenizer, "model": os.path.abspath(path), "preset": preset,
                 "overrides": sets, "imports": list(c.imports)}

    from ..driver import compile_model
    from .module import LmcModel

    check_config(c)
    d = setup_dist(c.device)
    if c.batch_size % (d.world * c.grad_accum):
        raise LmcError(f"--batch-size {c.batch_size} must divide evenly over {d.world} rank(s) "
                       f"x {c.grad_accum} accumulation step(s)")
    torch.manual_seed(c.seed)
    random.seed(c.seed)
    np.random.seed(c.seed)

    compiled = compile_model(path, preset, overrides)
    cfg = compiled.graph.meta["config"]
    enc = get_tokenizer(c.tokenizer)
    from ..passes.loss import logits_vocab
    vocab = logits_vocab(compiled.graph, "training")
    # (a .bin corpus is checked by its ids below)
    pretokenized = c.data is not None and c.data.lower().endswith(".bin")
    if vocab < enc.n_vocab and not pretokenized:
        raise LmcError(f"the model's vocab ({vocab}) is smaller than tokenizer "
                       f"{c.tokenizer!r} ({enc.n_vocab} tokens): use --set vocab="
                       f"{-(-enc.n_vocab // 64) * 64} or another --tokenizer"
                       + (" (bytes: 257 tokens)" if vocab >= 257 else ""))
    max_seq = cfg.get("max_seq")
    if max_seq is not None and c.seq_len > max_seq:
        raise LmcError(f"--seq-len {c.seq_len} exceeds the model's max_seq {max_seq} "
                       f"(--set max_seq={c.seq_len})")
    for name, p in (compiled.graph.meta.get("predictions") or {}).items():
        if c.seq_len < p["ahead"]:
            raise LmcError(f"--seq-len {c.seq_len} is too short for the aux loss {name!r}: "
                           f"it predicts {p['ahead']} tokens ahead (--seq-len >= "
                           f"{p['ahead']})")
    corpus = Corpus.load(c.data, c.tokenizer, enc, c.val_fraction)
    for split, ids in (("train", corpus.train), ("validation", corpus.val)):
        if len(ids) < c.seq_len + 1:     # checked here, before a step (get_batch checks too)
            hint = " (a larger --val-fraction holds out more)" if split == "validation" \
                else ""
            raise LmcError(f"the corpus's {split} split ({corpus.source}) holds {len(ids)} "
                           f"tokens, fewer than --seq-len {c.seq_len} + 1{hint}")
    if corpus.max_id >= vocab:
        raise LmcError(f"{corpus.source}: the data holds token id {corpus.max_id}, outside "
                       f"the model's vocab {vocab}")
    ckpt_meta["train_tokens"] = int(len(corpus.train))    # a resume checks it is the same
    if corpus.note and d.main:
        print(f"lmc: note: {corpus.source}: {corpus.note}", file=sys.stderr)

    # mixed precision is a pass over the graph (torch.autocast's policy, written in): both
    # backends run the same program, and parameters and optimizer state stay fp32
    precision = c.precision or ("bf16" if d.device.type == "cuda" else "f32")
    graph = compiled.training_graph(precision)
    # what is logged beside the loss: the cross-entropy and each aux loss (means, like the
    # loss), and outputs of static shape such as tokens per expert (summed over the batch)
    aux_names = list(graph.meta.get("aux_losses") or {})
    part_names = (["ce_loss"] if "ce_loss" in graph.outputs else []) + aux_names
    stat_names = [k for k, n in graph.outputs.items() if k not in part_names and k != "loss"
                  and all(isinstance(dim, int) for dim in n.type.shape)]
    ce_name = "ce_loss" if "ce_loss" in graph.outputs else "loss"
    # parameters moved by a rule after each step (model.updates), from a logged output
    updates = graph.meta.get("updates") or []
    # gradients flow from the loss only: the logits and logged values take no cotangent
    model = LmcModel(graph, seed=c.seed, backend=c.backend, grad_outputs=["loss"],
                     freeze=c.freeze).to(d.device)
    if len(model.frozen) == len(model._param_names):
        raise LmcError("every parameter is frozen (--freeze, trainable: false): nothing to "
                       "train")
    if c.init is not None:     # a new run from a checkpoint's weights (fresh optimizer, step 0)
        ck = checkpoint_dir(c.init)
        weights = read_weights(ck, "--checkpoint", device=str(d.device))
        check_fits(weights, model.state_dict(), ck, "--checkpoint", c.model_note)
        model.load_state_dict(weights)
        if c.model_note and d.main:
            print(f"lmc: note: {c.model_note}", file=sys.stderr)
    raw = model
    if d.world > 1:
        if c.fsdp:  # FSDP2: parameters sharded across ranks, gathered for each forward
            from torch.distributed.fsdp import fully_shard

            model = fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    # frozen parameters (requires_grad False) are neither updated nor decayed
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=c.lr, betas=(0.9, 0.95), eps=1e-8, fused=False, foreach=False)
    # f16 keeps 5 exponent bits: small gradients (a norm weight's, ~1e-6) fall below its
    # smallest normal (6e-5) and lose their digits. Dynamic loss scaling, as with
    # torch.autocast: the loss's gradient is multiplied by a scale, the gradients divided by
    # it before the update, and a step whose gradients overflowed is skipped and the scale
    # halved (doubled again after 2,000 good steps). bf16 and f32 have fp32's range: off.
    # (with FSDP each rank holds a shard of the gradients: ShardedGradScaler agrees across
    # ranks on whether any overflowed, so all skip or all step; DDP's are all-reduced)
    if d.world > 1 and c.fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as Scaler
    else:
        Scaler = torch.amp.GradScaler
    scaler = Scaler(d.device.type, init_scale=INIT_LOSS_SCALE, enabled=precision == "f16")

    start = 0
    if c.resume:
        ck = latest_checkpoint(c.resume)
        weights = read_weights(ck, "--resume", device=str(d.device))
        st = read_state(ck, "--resume")
        check_fits(weights, raw.state_dict(), ck, "--resume", c.model_note)
        if c.model_note and d.main:
            print(f"lmc: note: {c.model_note}", file=sys.stderr)
        was = sorted((st.get("config") or {}).get("freeze") or [])
        if was != sorted(c.freeze):
            how = f"with --freeze {' '.join(was)}" if was else "without --freeze"
            raise LmcError(f"--resume {c.resume}: the run froze {' '.join(was) or 'nothing'}, "
                           f"this run {' '.join(c.freeze) or 'nothing'} (--freeze); the "
                           f"optimizer state holds the run's trained parameters: resume {how}")
        if d.world > 1 and c.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            set_model_state_dict(model, weights, options=_full_options())
            set_optimizer_state_dict(model, opt, st["optimizer"], options=_full_options())
        else:
            raw.load_state_dict(weights)
            opt.load_state_dict(st["optimizer"])
        if scaler.is_enabled() and st.get("grad_scaler"):
            scaler.load_state_dict(st["grad_scaler"])
        random.setstate(st["rng"]["python"])
        np.random.set_state(st["rng"]["numpy"])
        torch.set_rng_state(st["rng"]["torch"])
        start = st["step"]
        _note_changed_settings(st.get("config") or {}, c, d.main)
        had = _meta_json(ck).get("train_tokens")
        if isinstance(had, int) and had != len(corpus.train) and d.main:
            print(f"lmc: note: the data ({corpus.source}) now holds {len(corpus.train):,} "
                  f"training tokens, the run's held {had:,}: the continuation reads another "
                  f"corpus", file=sys.stderr)
        if start >= c.steps:
            raise LmcError(f"--resume {c.resume}: the run is at step {start} already; --steps "
                           f"{c.steps} asks for no more (--steps counts from the run's start)")
    metrics_path = os.path.join(c.out, "metrics.jsonl")
    same = c.resume is not None and os.path.realpath(resume_run_dir(c.resume)) == \
        os.path.realpath(c.out)
    # the checkpoints of this run's history: with --resume into its own directory, those up
    # to the step it continues from (run_files: ckpt-<7+ digits>)
    ours = {n for p in run_files(c.out) if (n := ckpt_step(p)) is not None and n <= start} \
        if same else set()
    # resumed from an earlier checkpoint of its run: the records past it are cut from the
    # metrics, and with --overwrite the old run in `out` goes; both at this run's first write
    # (its first metrics record or checkpoint), so a run failing before it (a check, the
    # first step) or interrupted before it loses nothing
    kept = {"metrics": _kept_metrics(metrics_path, start) if d.main and same else None}
    replaced = run_files(c.out) if d.main and c.overwrite else []

    def clear_old():
        if kept["metrics"] is not None:
            atomic_write(metrics_path, kept["metrics"])
            kept["metrics"] = None
        while replaced:
            q = os.path.join(c.out, replaced.pop())
            shutil.rmtree(q, ignore_errors=True) if os.path.isdir(q) else os.remove(q)

    def nothing_written():
        return bool(replaced) or kept["metrics"] is not None
    os.makedirs(c.out, exist_ok=True)

    local = c.batch_size // (d.world * c.grad_accum)
    micro_global = c.batch_size // c.grad_accum

    def batch(split, step, micro):
        # the global batch of a step depends only on (seed, step): accumulation micro-step m
        # takes its rows, and rank r its share of those, so neither changes what is trained on
        ids = corpus.train if split == "train" else corpus.val
        lo = micro * micro_global + d.rank * local
        x, y = get_batch(ids, c.batch_size, c.seq_len,
                         seed=c.seed + (0 if split == "train" else 7919), step=step, micro=0,
                         rows=(lo, lo + local))
        return x.to(d.device), y.to(d.device)

    def autocast():  # the graph carries its precision: torch's autocast stays off
        return torch.autocast(d.device.type, enabled=False)

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        losses = []
        for i in range(c.eval_batches):
            x, y = batch("val", i, 0)
            with autocast():
                losses.append(model(x, targets=y)[ce_name].float().item())
        model.train()
        return all_mean(sum(losses) / len(losses), d)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = None
    if c.progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=c.steps, initial=start, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    tokens_per_step = c.batch_size * c.seq_len
    last_ckpt = ck if c.resume else None     # the last checkpoint of this run with sound weights
    wrote = {"ckpt": None}                   # the last one this invocation wrote
    summary: Dict[str, Any] = {"start_step": start}
    t_last = time.perf_counter()
    step = start

    def last_good() -> str:
        return (f"; the last good checkpoint is {last_ckpt}" if last_ckpt else
                " (no checkpoint of this run was written yet)")

    def check_weights():
        """A checkpoint holds finite weights: an update can make them inf or nan from a
        finite loss (a learning rate far too high), and the next step's loss says so only
        after they were saved."""
        bad = torch.zeros((), dtype=torch.float32, device=d.device)
        for p in raw.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p    # (an FSDP shard)
            bad += (~torch.isfinite(local.detach())).any().float()
        if d.world > 1:
            _sum_over_ranks(bad)
        if bad.item():
            raise LmcError(f"the weights became inf or nan at step {step} (the update of a "
                           f"finite loss: a learning rate too high? try a lower --lr): "
                           f"stopping without saving them{last_good()}")

    def checkpoint(at: int, first=None):
        """Save the weights (checked finite) as this run's checkpoint at step `at`, after
        `first` (the interrupted step's metrics record), and redraw the curve."""
        nonlocal last_ckpt
        check_weights()
        clear_old()
        if first is not None:
            first()
        saved = save_checkpoint(c.out, at, model, opt, c, d, ckpt_meta, scaler, ours)
        last_ckpt = wrote["ckpt"] = saved or last_ckpt
        if d.main:
            plot_losses(metrics_path, os.path.join(c.out, "loss.png"))
    model.train()
    finished = False
    try:
        while step < c.steps:
            lr = get_lr(step, c)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            parts = {k: torch.zeros((), dtype=torch.float64) for k in part_names}
            stats: Dict[str, torch.Tensor] = {}
            for micro in range(c.grad_accum):
                x, y = batch("train", step, micro)
                # fresh dropout masks / router noise per micro-batch and rank, replayable on resume
                raw.rng_step = (step * c.grad_accum + micro) * d.world + d.rank
                sync = micro == c.grad_accum - 1 or d.world == 1 or c.fsdp
                ctx = model.no_sync() if not sync and hasattr(model, "no_sync") else _null()
                with ctx, autocast():
                    out = model(x, targets=y)
                    loss = out["loss"] / c.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.item()
                for k in part_names:
                    parts[k] += out[k].detach().double().cpu() / c.grad_accum
                for k in stat_names:
                    v = out[k].detach().double().cpu()
                    stats[k] = stats[k] + v if k in stats else v
            train_loss = all_mean(loss_sum, d)
            parts_logged = all_reduce(parts, d, mean=True)
            stats_logged = all_reduce(stats, d, mean=False)
            if not math.isfinite(train_loss):
                raise LmcError(f"loss became {train_loss} at step {step + 1}: stopping before "
                               f"the update{last_good()}")
            scaler.unscale_(opt)      # (nothing without loss scaling)
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            scale = scaler.get_scale()
            scaler.step(opt)          # opt.step(), unless f16 gradients overflowed
            scaler.update()
            opt.zero_grad(set_to_none=True)
            stepped = not (scaler.is_enabled() and scaler.get_scale() < scale)
            if updates and stepped:   # a skipped step moves nothing
                apply_updates(raw, updates, stats_logged)
            step += 1
            now = time.perf_counter()
            rec = {"step": step, "train_loss": train_loss, "lr": lr,
                   "tokens_per_s": tokens_per_step / max(now - t_last, 1e-9)}
            if scaler.is_enabled():
                rec["loss_scale"] = scale
                if scaler.get_scale() < scale:
                    rec["skipped"] = True   # inf/nan gradients: no update at this step
                    summary["skipped"] = summary.get("skipped", 0) + 1
            if "ce_loss" in parts_logged:
                rec["ce_loss"] = parts_logged["ce_loss"]
            if aux_names:
                rec["aux_losses"] = {k: parts_logged[k] for k in aux_names}
            if stats_logged:
                rec["stats"] = stats_logged
            t_last = now
            if step % c.eval_every == 0 or step == c.steps:
                rec["val_loss"] = estimate_loss()
                summary["val_loss"] = rec["val_loss"]
                t_last = time.perf_counter()
            summary["train_loss"] = train_loss
            def log():
                clear_old()
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            logged = d.main and (step % c.log_every == 0 or "val_loss" in rec
                                 or step == c.steps)
            if logged:
                log()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if step % c.ckpt_every == 0 or step == c.steps:
                checkpoint(step)
            if stop["signal"] is not None:
                summary["interrupted"] = True
                if nothing_written():
                    # interrupted before this run's first write: the run it would replace
                    # (--overwrite) or cut back (a resume from an earlier checkpoint) stays
                    # as it was, and nothing is saved
                    summary["nothing_written"] = True
                    break
                # the checkpoint's step ends the curve
                checkpoint(step, log if d.main and not logged else None)
                break
        finished = stop["signal"] is None    # every rank ran the same collectives
    finally:
        if bar is not None:
            bar.close()
        for s, h in old.items():
            signal.signal(s, h)
        if d.world > 1:
            _leave_process_group(finished)
    summary.update({"steps": step, "checkpoint": wrote["ckpt"], "out": c.out,
                    "corpus": corpus.source, "train_tokens": int(len(corpus.train)),
                    "vocab": vocab})
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _kept_metrics(path: str, step: int) -> Optional[str]:
    """On resume, the metrics without the records past the checkpoint (the curve has each
    step once), to be written at the run's first write; None where nothing is cut. A damaged
    file is an LmcError naming it, left as it is."""
    if step == 0 or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        lines = [ln for ln in raw.splitlines(keepends=True) if ln.strip()]
        keep = []
        for i, ln in enumerate(lines):
            try:
                rec = json.loads(ln)
            except ValueError:
                if i == len(lines) - 1:   # a record torn by a kill mid-append: dropped
                    break
                raise
            if rec["step"] <= step:
                keep.append(ln if ln.endswith("\n") else ln + "\n")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LmcError(f"--resume: {path} is unreadable ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0]}); move it aside to resume") from None
    text = "".join(keep)
    return None if text == raw else text


def plot_losses(metrics_path: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):   # a checkpoint before the first record
        return
    recs = []
    with open(metrics_path, encoding="utf-8", errors="replace") as f:
        for ln in f:
            try:
                r = json.loads(ln)
            except ValueError:      # a torn last record (a kill mid-append)
                continue
            if isinstance(r, dict) and all(isinstance(r.get(k), (int, float))
                                           for k in ("step", "train_loss")):
                recs.append(r)
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    # with aux losses: train = CE + sum coef * aux
    aux = all(isinstance(r.get("ce_loss"), (int, float)) for r in recs)
    ax.plot([r["step"] for r in recs], [r["train_loss"] for r in recs],
            label="train (CE + aux losses)" if aux else "train")
    if aux:
        ax.plot([r["step"] for r in recs], [r["ce_loss"] for r in recs], label="train CE")
    val = [r for r in recs if isinstance(r.get("val_loss"), (int, float))]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)" if aux else "cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
