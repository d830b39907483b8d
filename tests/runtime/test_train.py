"""`lmc run --train`: metrics and checkpoints, exact resume after SIGKILL, the NaN guard,
torchrun with gloo matching a single process, tokenizer and vocab checks."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, ZOO

from lmc.cli import main

LLAMA = os.path.join(ZOO, "llama.yaml")
DEEPSEEK = os.path.join(ROOT, "examples", "deepseek_moe.yaml")
BIN = os.path.dirname(sys.executable)
TINY = ["--preset", "tiny", "--set", "vocab=100352", "d=32", "heads=2", "ffn=64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text("".join(open(os.path.join(root, f)).read()
                         for f in ("argparse.py", "textwrap.py", "heapq.py")))
    return str(p)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _args(out, corpus, *extra):
    return [LLAMA, "--train", *TINY, "--data", corpus, "--out", str(out), "--batch-size", "4",
            "--seq-len", "16", "--no-progress", "--log-every", "1", "--lr", "1e-2", *extra]


def _metrics(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]


def test_train_writes_metrics_curve_and_checkpoint(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["run", *_args(out, corpus, "--steps", "6", "--eval-every", "3",
                               "--ckpt-every", "3")]) == 0
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        assert {"step", "train_loss", "lr", "tokens_per_s"} <= set(r)
    assert "val_loss" in recs[2] and "val_loss" in recs[5]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert (out / "loss.png").stat().st_size > 1000
    latest = (out / "latest").read_text().strip()
    assert latest == "ckpt-0000006"
    assert {"model.safetensors", "state.pt"} <= set(os.listdir(out / latest))
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]
    assert "val" in capsys.readouterr().out


def test_resume_after_sigkill_is_bitwise(tmp_path, corpus):
    steps = 10
    full = tmp_path / "full"
    assert main(["run", *_args(full, corpus, "--steps", str(steps), "--ckpt-every", "2")]) == 0
    want = {r["step"]: r["train_loss"] for r in _metrics(full)}

    killed = tmp_path / "killed"
    kill_after = random.Random().randint(3, 8)
    proc = subprocess.Popen([os.path.join(BIN, "lmc"), "run", *_args(
        killed, corpus, "--steps", str(steps), "--ckpt-every", "2")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ))
    deadline = time.time() + 120
    while time.time() < deadline:
        path = killed / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= kill_after:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (killed / "latest").exists(), "no checkpoint before the kill"
    resumed_from = int((killed / "latest").read_text().split("-")[1])
    assert 0 < resumed_from < steps
    assert main(["run", *_args(killed, corpus, "--steps", str(steps), "--ckpt-every", "2",
                               "--resume", str(killed))]) == 0
    got = {r["step"]: r["train_loss"] for r in _metrics(killed)}
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want  # bitwise: the same floats, every step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus, capsys):
    """A learning rate far too high: the run stops at the first non-finite loss or weights
    (an update can make the weights inf from a finite loss, and the next loss says so only
    after a checkpoint would have saved them), and every checkpoint it left, the one named
    last good included, holds finite weights; a resume of it stops the same way, naming the
    checkpoint it resumed."""
    from safetensors.torch import load_file
    out = tmp_path / "nan"
    rc = main(["run", *_args(out, corpus, "--steps", "20", "--ckpt-every", "1", "--lr", "1e6")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "loss became nan" in err or "loss became inf" in err or \
        "the weights became inf or nan" in err, err
    latest = (out / "latest").read_text().strip()
    assert err.endswith(f"the last good checkpoint is {out / latest}"), err
    for ck in (p for p in out.iterdir() if p.name.startswith("ckpt-")):
        w = load_file(str(ck / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values()), ck
    assert all(np.isfinite(r["train_loss"]) for r in _metrics(out))
    assert main(["run", LLAMA, "--train", "--no-progress", "--resume", str(out)]) == 2
    err2 = capsys.readouterr().err.strip()
    assert err2.endswith(f"the last good checkpoint is {out / latest}"), err2


def test_the_weights_check_names_an_earlier_checkpoint_and_reading_nan_weights_is_refused(
        tmp_path, corpus, capsys):
    """lr 1e3 on this model: the step-2 update makes the weights non-finite while the loss
    it followed was finite (it was saved as good before the check); a checkpoint holding
    non-finite weights (written by an older lmc, or another tool) is refused by --generate,
    --resume and --checkpoint in one line."""
    from safetensors.torch import load_file, save_file
    out = tmp_path / "w"
    rc = main(["run", *_args(out, corpus, "--steps", "20", "--ckpt-every", "1", "--lr", "1e3",
                             "--warmup", "0")])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "the weights became inf or nan at step" in err, err
    step = int(err.split(" at step ")[1].split(" ")[0])
    assert (out / "latest").read_text().strip() == f"ckpt-{step - 1:07d}"
    assert err.endswith(f"the last good checkpoint is {out / f'ckpt-{step - 1:07d}'}"), err
    ck = out / f"ckpt-{step - 1:07d}"
    w = load_file(str(ck / "model.safetensors"))
    w["embed"][0, 0] = float("nan")
    save_file(w, str(ck / "model.safetensors"))
    for cmd in (["run", LLAMA, "--generate", "--checkpoint", str(ck), "--max-new-tokens", "2"],
                ["run", LLAMA, "--train", "--no-progress", "--resume", str(out)]):
        assert main(cmd) == 2
        e = capsys.readouterr().err.strip()
        assert len(e.splitlines()) == 1 and "1 of " in e and "weights hold inf or nan " \
            "(embed): training diverged before this checkpoint; use an earlier one" in e, e


def _torchrun(logs, *args):
    """`lmc run ARGS` as two gloo ranks. --standalone lets torchrun's rendezvous pick a free
    port on this host (a fixed or random port can collide with another run on the machine).
    Each rank's output goes to a file under `logs` (--tee), quoted in full on a failure: a
    rank that dies says why there, not in torchrun's summary."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2",
                        "--log-dir", str(logs), "--tee", "3", "-m", "lmc.cli", "run", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0:
        ranks = "".join(f"\n--- {f}\n" + open(os.path.join(d, f)).read()[-4000:]
                        for d, _, fs in sorted(os.walk(logs)) for f in sorted(fs))
        raise AssertionError(r.stderr[-2000:] + ranks)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-f16"])
def test_torchrun_two_gloo_processes_match_single_process(tmp_path, corpus, mode):
    """fsdp-f16: the loss scaled, ShardedGradScaler agreeing across the ranks' shards; the
    losses within f16's rounding of each other (measured 1.9e-5 apart at 11.5: the ranks
    sum the gradients in another order, and the next step's f16 weights round apart)."""
    prec = ["--precision", "f16", "--backend", "torch"] if mode.endswith("f16") else []
    single = tmp_path / "single"
    assert main(["run", *_args(single, corpus, "--steps", "3", "--batch-size", "4",
                               *prec)]) == 0
    ddp = tmp_path / "ddp"
    _torchrun(tmp_path / "logs", *_args(ddp, corpus, "--steps", "3", "--batch-size", "4",
                                        *prec),
              *(["--fsdp"] if mode.startswith("fsdp") else []))
    a, b = _metrics(single), _metrics(ddp)
    assert [x["step"] for x in a] == [x["step"] for x in b]
    assert [x.get("loss_scale") for x in a] == [x.get("loss_scale") for x in b]
    tol = 1e-4 if prec else 1e-5
    for x, y in zip(a, b):
        assert abs(x["train_loss"] - y["train_loss"]) < tol


def test_fsdp_with_frozen_and_rule_moved_parameters_matches_single_process(tmp_path,
                                                                          small_ids):
    """examples/deepseek_moe (tiny) as FSDP2 over two gloo ranks, with --freeze embed and the
    file's trainable: false selection biases among the sharded parameters; the biases move
    by the load_balance rule, each rank its own shards, from the loads summed over ranks:
    the losses, the loads and the final biases equal a single process's."""
    args = [DEEPSEEK, "--train", "--preset", "tiny", "--data", small_ids, "--batch-size", "4",
            "--seq-len", "16", "--no-progress", "--log-every", "1", "--lr", "1e-2",
            "--steps", "3", "--freeze", "embed", "--set", "balance_rate=0.01"]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    assert main(["run", *args, "--out", str(single)]) == 0
    _torchrun(tmp_path / "logs", *args, "--out", str(fsdp), "--fsdp")
    a, b = _metrics(single), _metrics(fsdp)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-5
        assert x["stats"] == y["stats"]
    from safetensors.torch import load_file
    wa, wb = (load_file(str(o / (o / "latest").read_text().strip() / "model.safetensors"))
              for o in (single, fsdp))
    for i in range(2):
        k = f"layers.{i}.moe.balance"
        assert wa[k].abs().max() > 0
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-7)
    torch.testing.assert_close(wa["embed"], wb["embed"], rtol=0, atol=0)


def test_vocab_smaller_than_tokenizer_is_refused(tmp_path, corpus, capsys):
    rc = main(["run", LLAMA, "--train", "--preset", "tiny", "--data", corpus, "--out",
               str(tmp_path / "v"), "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "vocab (512) is smaller than tokenizer 'cl100k_base'" in err
    assert "--set vocab=100288" in err and "(bytes: 257 tokens)" in err


def test_the_bytes_tokenizer_trains_and_generates_a_tiny_preset(tmp_path, corpus, capsys):
    """--tokenizer bytes (UTF-8 bytes, 257 ids): the tiny preset (vocab 512) trains with no
    --set vocab, the checkpoint records it, and --generate decodes what it samples (ids the
    tokenizer lacks, 257..511, are never sampled: random weights would pick them half the
    time)."""
    from lmc.runtime.data import get_tokenizer
    enc = get_tokenizer("bytes")
    text = "héllo\n"
    assert enc.encode_ordinary(text) == list(text.encode()) and enc.n_vocab == 257
    assert enc.decode(enc.encode_ordinary(text) + [enc.eot_token]) == text
    out = tmp_path / "b"
    small = ["--preset", "tiny", "--set", "d=32", "heads=2", "ffn=64"]     # vocab 512
    assert main(["run", LLAMA, "--train", *small, "--data", corpus, "--out", str(out),
                 "--batch-size", "4", "--seq-len", "16", "--no-progress", "--steps", "2",
                 "--tokenizer", "bytes"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "ckpt-0000002" / "meta.json").read_text())
    assert meta["tokenizer"] == "bytes"
    for ck in ([], ["--checkpoint", str(out)]):   # random weights, then the trained ones
        assert main(["run", LLAMA, "--generate", *small, "--tokenizer", "bytes", "--prompt",
                     "ab", "--max-new-tokens", "40", "--seed", "1", "--temperature", "1",
                     *ck]) == 0, ck
        got = capsys.readouterr()
        assert got.out.startswith("ab") and "40 tokens in" in got.err, got


def test_unavailable_tokenizer_names_the_cache_dir(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    rc = main(["run", *_args(tmp_path / "t", corpus, "--steps", "1", "--tokenizer",
                             "o200k_base")])
    err = capsys.readouterr().err
    assert rc == 2 and "TIKTOKEN_CACHE_DIR" in err and "o200k_base" in err


def test_pretokenized_bin_and_resume_errors(tmp_path, capsys):
    data = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 1000, 5000).astype(np.uint32).tofile(data)
    out = tmp_path / "b"
    assert main(["run", *_args(out, str(data), "--steps", "2")]) == 0
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"abc")
    assert main(["run", *_args(tmp_path / "c", str(bad), "--steps", "1")]) == 2
    assert "multiple of 4" in capsys.readouterr().err
    assert main(["run", *_args(tmp_path / "d", str(data), "--steps", "1", "--resume",
                               str(tmp_path / "nowhere"))]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_settings_are_one_line_before_anything_is_written(tmp_path, corpus, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    cases = [(["--steps", "0"], "--steps must be >= 1, got 0"),
             (["--steps", "-1"], "--steps must be >= 1"),
             (["--batch-size", "0"], "--batch-size must be >= 1"),
             (["--grad-accum", "0"], "--grad-accum must be >= 1"),
             (["--eval-every", "0"], "--eval-every must be >= 1"),
             (["--warmup", "-2"], "--warmup must be >= 0"),
             (["--lr", "nan"], "--lr must be a positive number, got nan"),
             (["--lr", "-1"], "--lr must be a positive number")]
    import torch
    if not torch.cuda.is_available():   # --device applies to training too
        cases.append((["--device", "cuda"], "--device cuda: no CUDA device here"))
    for extra, msg in cases:
        out = tmp_path / "never"
        assert main(["run", *_args(out, corpus, *extra)]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmc: error: ") and msg in err[0], (extra, err)
        assert not out.exists(), extra
    assert main(["run", *_args(afile, corpus, "--steps", "1")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert afile.read_text() == "mine"
    args = _args(tmp_path / "x", corpus, "--steps", "1")
    args[args.index("--out"):args.index("--out") + 2] = ["--resume", str(afile)]
    assert main(["run", *args]) == 2
    assert f"--resume {afile}: a file, not a run directory" in capsys.readouterr().err
    assert afile.read_text() == "mine"


def test_resume_refuses_damaged_or_foreign_checkpoints_and_loses_nothing(tmp_path, corpus,
                                                                         capsys):
    out = tmp_path / "r"
    assert main(["run", *_args(out, corpus, "--steps", "2")]) == 0
    ck = out / open(out / "latest").read().strip()
    files = {p: p.read_bytes() for p in [out / "metrics.jsonl", *ck.iterdir()]}

    def refused(msg, *extra):
        capsys.readouterr()
        assert main(["run", *_args(out, corpus, "--resume", str(out), *extra)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmc: error: --resume"), err
        assert msg in err[0], err

    # a run already at --steps: nothing to do, said so
    refused("the run is at step 2 already; --steps 2 asks for no more", "--steps", "2")
    # another model's checkpoint (d=48 here, 32 there)
    refused("does not fit this model", "--steps", "3", "--set", "vocab=100352", "d=48")
    for name, damage in (("model.safetensors", lambda b: b[:1000]),
                         ("state.pt", lambda b: b"garbage\n")):
        (ck / name).write_bytes(damage(files[ck / name]))
        refused(f"{name}: unreadable", "--steps", "3")
        (ck / name).write_bytes(files[ck / name])
    assert all(p.read_bytes() == b for p, b in files.items())   # nothing rewritten
    assert main(["run", *_args(out, corpus, "--resume", str(out), "--steps", "3")]) == 0


@pytest.mark.parametrize("log_every", [1, 1000])
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus, log_every):
    """Interrupted, the run saves a checkpoint at the step it finished, logs that step (also
    when --log-every would not) and draws the curve; the summary names what exists."""
    out = tmp_path / "int"
    # the first record (or, logging every 1000 steps, the first checkpoint) says the loop runs
    args = _args(out, corpus, "--steps", "500", "--ckpt-every", "1000" if log_every == 1
                 else "1")
    args[args.index("--log-every") + 1] = str(log_every)
    proc = subprocess.Popen([os.path.join(BIN, "lmc"), "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    seen = out / ("metrics.jsonl" if log_every == 1 else "latest")
    while time.time() < deadline and not seen.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-1000:]
    assert "Traceback" not in stderr and "--resume" in stderr
    step = int((out / "latest").read_text().split("-")[1])
    assert 1 <= step < 500
    assert _metrics(out)[-1]["step"] == step
    assert (out / "loss.png").exists()
    wrote = next(ln for ln in stdout.splitlines() if ln.startswith("wrote"))
    assert all(os.path.exists(p) for p in wrote.split(None, 1)[1].split(", ")), wrote


def test_grad_accumulation_matches_one_big_batch(tmp_path, corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", *_args(a, corpus, "--steps", "3")]) == 0
    assert main(["run", *_args(b, corpus, "--steps", "3", "--grad-accum", "2")]) == 0
    for x, y in zip(_metrics(a), _metrics(b)):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-5


def test_data_directory(tmp_path, corpus):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    text = open(corpus).read()
    (d / "a.txt").write_text(text[: len(text) // 2])
    (d / "sub" / "b.md").write_text(text[len(text) // 2:])
    (d / "skip.bin").write_bytes(b"\0\1")
    assert main(["run", *_args(tmp_path / "o", str(d), "--steps", "1")]) == 0


def test_val_fraction_lets_a_small_corpus_train_and_a_resume_keeps_it(tmp_path, capsys):
    """The held-out tail is 5% by default: 600 bytes hold out 30 tokens, too few for
    --seq-len 32, and the error says which flag holds out more; --val-fraction 0.1 trains;
    a resume keeps the run's fraction and notes another."""
    import sysconfig
    text = tmp_path / "small.txt"
    text.write_text(open(os.path.join(sysconfig.get_paths()["stdlib"], "heapq.py")).read()[:600])
    out = tmp_path / "r"
    args = [LLAMA, "--train", "--preset", "tiny", "--tokenizer", "bytes", "--data", str(text),
            "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--no-progress", "--out",
            str(out)]
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "validation split" in err and "holds 30 tokens" in err and \
        "a larger --val-fraction holds out more" in err, err
    assert main(["run", *args, "--val-fraction", "0.1"]) == 0
    assert json.load(open(out / "ckpt-0000002" / "meta.json"))["config"]["val_fraction"] == 0.1
    capsys.readouterr()
    assert main(["run", LLAMA, "--train", "--resume", str(out), "--steps", "3",
                 "--no-progress"]) == 0
    assert "other settings" not in capsys.readouterr().err
    assert main(["run", LLAMA, "--train", "--resume", str(out), "--steps", "4",
                 "--no-progress", "--val-fraction", "0.2"]) == 0
    assert "--val-fraction 0.2 (the run: 0.1)" in capsys.readouterr().err
    assert main(["run", *args, "--val-fraction", "1", "--overwrite"]) == 2
    assert "--val-fraction must be in (0, 1), got 1.0" in capsys.readouterr().err


# -- auxiliary losses (MoE): logged beside the cross-entropy ---------------------------------
MINIMAX = os.path.join(ZOO, "minimax.yaml")


def _moe_args(out, data, *extra):
    return [MINIMAX, "--train", "--preset", "tiny", "--data", data, "--out", str(out),
            "--batch-size", "4", "--seq-len", "16", "--no-progress", "--log-every", "1",
            "--lr", "1e-2", *extra]


def test_moe_training_logs_ce_aux_losses_and_expert_utilisation(tmp_path, small_ids):
    out = tmp_path / "moe"
    assert main(["run", *_moe_args(out, small_ids, "--steps", "4", "--eval-every", "2")]) == 0
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    layers, experts = 2, 4  # the tiny preset
    for r in recs:
        assert {"step", "train_loss", "lr", "tokens_per_s", "ce_loss"} <= set(r)
        aux = r["aux_losses"]
        assert set(aux) == {"load_balance", "z_loss"}
        # the optimised loss is the cross-entropy plus the weighted aux losses
        want = r["ce_loss"] + 0.01 * aux["load_balance"] + 0.001 * aux["z_loss"]
        assert abs(r["train_loss"] - want) < 1e-5
        assert r["train_loss"] > r["ce_loss"]
        tokens, dropped = r["stats"]["expert_tokens"], r["stats"]["expert_dropped"]
        assert len(tokens) == layers and all(len(row) == experts for row in tokens)
        for kept, over in zip(tokens, dropped):
            # every token of the step's batch (4 x 16) made top-2 choices: kept or over capacity
            assert all(isinstance(v, int) and v >= 0 for v in kept + over)
            assert sum(kept) + sum(over) == 4 * 16 * 2
    assert "val_loss" in recs[1] and "val_loss" in recs[3]
    assert (out / "loss.png").stat().st_size > 1000


def test_moe_logged_values_under_torchrun_ddp(tmp_path, small_ids):
    """Two gloo ranks, each half of the batch: the CE and the token counts equal a single
    process's; aux losses are averaged over ranks like the loss (each rank's load-balance
    loss is of its own rows, as its gradient is), so the logged sum still holds."""
    single = tmp_path / "single"
    assert main(["run", *_moe_args(single, small_ids, "--steps", "2")]) == 0
    ddp = tmp_path / "ddp"
    _torchrun(tmp_path / "logs", *_moe_args(ddp, small_ids, "--steps", "2"))
    a, b = _metrics(single), _metrics(ddp)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2]
    x, y = a[0], b[0]  # step 1: the same weights, so the same forward
    assert abs(x["ce_loss"] - y["ce_loss"]) < 1e-5
    assert x["stats"] == y["stats"]
    for rec in b:
        aux = rec["aux_losses"]
        want = rec["ce_loss"] + 0.01 * aux["load_balance"] + 0.001 * aux["z_loss"]
        assert abs(rec["train_loss"] - want) < 1e-5
    assert abs(x["aux_losses"]["z_loss"] - y["aux_losses"]["z_loss"]) < 1e-5  # a token mean


def test_an_out_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, corpus,
                                                                       capsys):
    out = tmp_path / "p"
    # a checkpoint before the first metrics record (--ckpt-every below --log-every) is fine
    args = _args(out, corpus, "--steps", "3", "--ckpt-every", "1")
    args[args.index("--log-every") + 1] = "10"
    assert main(["run", *args]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert {"ckpt-0000002", "ckpt-0000003", "latest", "metrics.jsonl"} <= set(before)
    capsys.readouterr()
    assert main(["run", *_args(out, corpus, "--steps", "1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out} holds a run" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before   # untouched
    # --overwrite replaces it: only the new run's files, its checkpoint kept; a user's
    # ckpt-best beside the run is not the run's (checkpoints are ckpt-<7 digits>)
    (out / "ckpt-best").mkdir()
    (out / "ckpt-best" / "README").write_text("precious")
    assert main(["run", *_args(out, corpus, "--steps", "1", "--overwrite")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-0000001", "ckpt-best", "latest",
                                                     "loss.png", "metrics.jsonl"]
    assert (out / "ckpt-best" / "README").read_text() == "precious"
    assert [r["step"] for r in _metrics(out)] == [1]


def test_resume_with_damaged_metrics_is_one_line(tmp_path, corpus, capsys):
    out = tmp_path / "m"
    assert main(["run", *_args(out, corpus, "--steps", "2")]) == 0
    good = (out / "metrics.jsonl").read_bytes()
    for damage in (b"not json\n" + good, b"\xff\xfe"):
        (out / "metrics.jsonl").write_bytes(damage)
        capsys.readouterr()
        assert main(["run", *_args(out, corpus, "--steps", "3", "--resume", str(out))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "metrics.jsonl is unreadable" in err[0], err
        assert (out / "metrics.jsonl").read_bytes() == damage
    # a last record torn by a kill mid-append is dropped, and the run continues
    (out / "metrics.jsonl").write_bytes(good + b'{"step": 3, "train_lo')
    assert main(["run", *_args(out, corpus, "--steps", "3", "--resume", str(out))]) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]


def test_a_damaged_corpus_cache_is_tokenized_again(tmp_path, corpus, monkeypatch):
    from lmc.runtime.data import Corpus, cache_dir, get_tokenizer
    enc = get_tokenizer()
    first = Corpus.load(corpus, "cl100k_base", enc)
    # in memory: the arrays map tokens.bin, which is about to be cut short under them
    train, val = np.array(first.train), np.array(first.val)
    del first
    entry = next((p for p in (tmp_path / "cache" / "data").iterdir()))
    assert cache_dir() == str(tmp_path / "cache")
    for damage in ("truncate", "overwrite", "dir"):
        b = entry / "tokens.bin"
        if damage == "truncate":
            b.write_bytes(b.read_bytes()[:5])
        elif damage == "overwrite":     # the right size, other (valid) token ids
            b.write_bytes(bytes(b.stat().st_size))
        else:
            b.unlink()
            b.mkdir()
        again = Corpus.load(corpus, "cl100k_base", enc)
        assert (again.train == train).all() and (again.val == val).all()
        del again


def test_overwrite_replaces_only_at_the_first_write_and_resume_defaults_out(
        tmp_path, corpus, capsys, monkeypatch):
    import lmc.runtime.train as tr
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", *_args(a, corpus, "--steps", "3")]) == 0
    assert main(["run", *_args(b, corpus, "--steps", "6", "--ckpt-every", "1")]) == 0
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    # a run failing before its first write (here its first batch) leaves b as it was
    def boom(*a, **k):
        raise RuntimeError("first step failed")
    monkeypatch.setattr(tr, "get_batch", boom)
    with pytest.raises(RuntimeError, match="first step failed"):
        main(["run", *_args(b, corpus, "--steps", "5", "--resume", str(a), "--overwrite")])
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    assert (b / "ckpt-0000006").is_dir()
    monkeypatch.undo()
    # a corpus too short for --seq-len is refused before anything
    capsys.readouterr()
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x + 1\n" * 4)
    assert main(["run", *_args(b, str(short), "--steps", "5", "--overwrite")]) == 2
    assert "fewer than --seq-len 16 + 1" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    # --resume a --out b --overwrite: b holds a's continuation only (no stale step 6)
    assert main(["run", *_args(b, corpus, "--steps", "5", "--resume", str(a),
                               "--overwrite")]) == 0
    assert sorted(p.name for p in b.iterdir() if p.name.startswith("ckpt-")) == \
        ["ckpt-0000005"]
    assert [r["step"] for r in _metrics(b)] == [4, 5]
    # --overwrite of the run being resumed is a contradiction
    assert main(["run", *_args(a, corpus, "--steps", "5", "--resume", str(a),
                               "--overwrite")]) == 2
    assert "continued and replaced at once" in capsys.readouterr().err
    # --resume without --out continues in place
    args = _args(a, corpus, "--steps", "4", "--resume", str(a))
    i = args.index("--out")
    del args[i:i + 2]
    capsys.readouterr()
    assert main(["run", *args]) == 0
    assert (a / "ckpt-0000004").is_dir() and [r["step"] for r in _metrics(a)][-1] == 4
    assert "resuming with other settings" not in capsys.readouterr().err
    # other settings than the run's: it continues, and says which differ (--steps may grow)
    args[args.index("--lr") + 1] = "5e-3"
    args[args.index("--steps") + 1] = "5"
    assert main(["run", *args]) == 0
    err = capsys.readouterr().err
    assert "resuming with other settings than the run's: --lr 0.005 (the run: 0.01)" in err
    assert "--steps" not in err.split("note:")[1]


@pytest.mark.parametrize("model", ["blues01", "minimax", "yoco"])
def test_f16_training_on_the_torch_backend_stays_finite(tmp_path, small_ids, model):
    """Regression: the mixed-precision pass kept a norm's rstd of a matmul output in f16,
    whose backward overflowed on the torch backend (which rounds every op): these three
    trained to a nan loss at step 2 with --precision f16. rsqrt, softmax, exp and sums now
    compute in fp32, as under torch.autocast."""
    out = tmp_path / model
    args = _moe_args(out, small_ids, "--steps", "4", "--backend", "torch",
                     "--precision", "f16")
    args[0] = os.path.join(ZOO, f"{model}.yaml")
    assert main(["run", *args]) == 0
    losses = [r["train_loss"] for r in _metrics(out)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses


def test_f16_training_scales_the_loss_and_resumes_the_scale(tmp_path, small_ids):
    """--precision f16 trains with dynamic loss scaling (logged as loss_scale); a resumed
    run continues with the checkpoint's scale and growth count: its losses equal the
    uninterrupted run's, bit for bit. bf16 has fp32's range: no scaling, nothing logged."""
    def args(out, *extra):
        a = _moe_args(out, small_ids, "--backend", "torch", "--precision", "f16",
                      "--ckpt-every", "2", *extra)
        a[0] = LLAMA
        return a
    full = tmp_path / "full"
    assert main(["run", *args(full, "--steps", "4")]) == 0
    recs = _metrics(full)
    assert [r["loss_scale"] for r in recs] == [2.0 ** 16] * 4
    assert not any(r.get("skipped") for r in recs)
    part = tmp_path / "part"
    assert main(["run", *args(part, "--steps", "2")]) == 0
    assert main(["run", *args(part, "--steps", "4", "--resume", str(part))]) == 0
    assert [r["train_loss"] for r in _metrics(part)] == [r["train_loss"] for r in recs]
    state = torch.load(os.path.join(part, "ckpt-0000004", "state.pt"), weights_only=False)
    assert state["grad_scaler"]["_growth_tracker"] == 4
    bf = tmp_path / "bf16"
    a = args(bf, "--steps", "1")
    a[a.index("f16")] = "bf16"
    assert main(["run", *a]) == 0
    assert "loss_scale" not in _metrics(bf)[0]


def test_f16_overflowing_gradients_skip_the_step_and_halve_the_scale(tmp_path, small_ids,
                                                                    monkeypatch, capsys):
    """A scale so large that the f16 gradients overflow: the step is skipped (the weights
    stay as they were), logged as skipped, and the scale halves."""
    from safetensors.torch import load_file

    from lmc.runtime import train
    monkeypatch.setattr(train, "INIT_LOSS_SCALE", 2.0 ** 120)
    out = tmp_path / "skip"
    args = _moe_args(out, small_ids, "--backend", "torch", "--precision", "f16",
                     "--steps", "2", "--ckpt-every", "1")
    args[0] = LLAMA
    assert main(["run", *args]) == 0
    assert "skipped     2 update(s): f16 gradients overflowed" in capsys.readouterr().out
    recs = _metrics(out)
    assert [(r["loss_scale"], r.get("skipped")) for r in recs] == [(2.0 ** 120, True),
                                                                  (2.0 ** 119, True)]
    assert all(math.isfinite(r["train_loss"]) for r in recs)
    w1, w2 = (load_file(os.path.join(out, f"ckpt-000000{s}", "model.safetensors"))
              for s in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_frozen_parameters_keep_their_values_and_resume_needs_the_same_freeze(
        tmp_path, corpus, capsys):
    """--freeze: the matched parameters end as they started (no gradient, no decay), the
    rest train; the optimizer holds only the trained ones, so resuming with another --freeze
    is one line, and nothing is written."""
    from safetensors.torch import load_file

    from lmc.driver import compile_model
    from lmc.runtime.module import LmcModel

    out = tmp_path / "run"
    assert main(["run", *_args(out, corpus, "--steps", "3", "--ckpt-every", "3",
                               "--freeze", "embed", "layers.*.attn.*")]) == 0
    got = load_file(str(out / "ckpt-0000003" / "model.safetensors"))
    c = compile_model(LLAMA, "tiny", TINY[3:])
    init = LmcModel(c.training_graph("f32"), seed=0).state_dict()
    frozen = [k for k in got if k == "embed" or (k.startswith("layers.") and ".attn." in k)]
    assert "embed" in frozen and len(frozen) == 1 + 4 * 2       # embed, wq wk wv wo x 2
    for k in got:
        assert torch.equal(got[k], init[k]) == (k in frozen), k
    st = torch.load(out / "ckpt-0000003" / "state.pt", weights_only=False)
    held = sum(len(g["params"]) for g in st["optimizer"]["param_groups"])
    assert held == len(got) - len(frozen)
    before = sorted(os.listdir(out))
    capsys.readouterr()
    # (--resume without --freeze continues with the run's)
    assert main(["run", *_args(out, corpus, "--steps", "4", "--resume", str(out),
                               "--freeze", "embed")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the run froze embed layers.*.attn.*, this run embed" in err[0] \
        and "resume with --freeze embed layers.*.attn.*" in err[0], err
    assert sorted(os.listdir(out)) == before
    # a pattern matching nothing, and freezing everything
    assert main(["run", *_args(tmp_path / "b", corpus, "--steps", "1", "--freeze", "emb")]) == 2
    err = capsys.readouterr().err
    assert "--freeze emb: no parameter matches (parameters: embed, " in err
    assert main(["run", *_args(tmp_path / "c", corpus, "--steps", "1", "--freeze", "*")]) == 2
    assert "every parameter is frozen" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_resume_takes_the_runs_model_and_settings_and_an_earlier_checkpoint(
        tmp_path, corpus, capsys):
    """--resume DIR alone continues the run as it was started (model, schedule, data); a
    damaged latest checkpoint names the one before it, and --resume that ckpt-* directory
    rewinds the run to it: the same losses as a run never interrupted."""
    full, a = tmp_path / "full", tmp_path / "a"
    run = ["--steps", "5", "--ckpt-every", "2", "--eval-every", "100", "--warmup", "3"]
    assert main(["run", *_args(full, corpus, *run)]) == 0
    want = {r["step"]: r["train_loss"] for r in _metrics(full)}
    assert main(["run", *_args(a, corpus, *run)]) == 0
    assert sorted(p.name for p in a.iterdir() if p.name.startswith("ckpt-")) == \
        ["ckpt-0000004", "ckpt-0000005"]
    (a / "ckpt-0000005" / "state.pt").write_bytes(b"garbage\n")
    capsys.readouterr()
    resume = ["run", LLAMA, "--train", "--no-progress", "--resume"]
    assert main([*resume, str(a)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        f"a damaged checkpoint; the checkpoint before it: --resume {a / 'ckpt-0000004'}"), err
    # no --preset, --set, --steps, --data, --lr, ...: the run's (its model does not fit
    # the file's default preset, its corpus is not the default one)
    assert main([*resume, str(a / "ckpt-0000004")]) == 0
    out = capsys.readouterr()
    assert "note:" not in out.err and "trained     5 steps (from 4)" in out.out, out
    got = {r["step"]: r["train_loss"] for r in _metrics(a)}
    assert got == want                                   # bitwise, steps 1 to 5
    assert (a / "latest").read_text().strip() == "ckpt-0000005"
    assert main(["run", *_args(a, corpus, "--resume", str(a), "--steps", "6")]) == 0
    # a model that differs from the run's (not in shape: rope_base) is named
    capsys.readouterr()
    assert main([*resume, str(a), "--steps", "7", "--set", "rope_base=500"]) == 0
    err = capsys.readouterr().err
    assert "the checkpoint was trained as --preset tiny --set vocab=100352 d=32 heads=2 " \
           "ffn=64; this run: --preset tiny --set vocab=100352 d=32 heads=2 ffn=64 " \
           "rope_base=500" in err, err


def test_train_from_a_checkpoint_starts_a_new_run_at_its_weights(tmp_path, corpus, capsys):
    from safetensors.torch import load_file
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["run", *_args(a, corpus, "--steps", "3")]) == 0
    src = load_file(str(a / "ckpt-0000003" / "model.safetensors"))
    # no --preset/--set: the checkpoint's model; a learning rate too small to move it
    new = ["run", LLAMA, "--train", "--data", corpus, "--batch-size", "4", "--seq-len", "16",
           "--no-progress", "--steps", "1", "--lr", "1e-12"]
    assert main([*new, "--checkpoint", str(a), "--out", str(b)]) == 0
    assert "trained     1 steps (from 0)" in capsys.readouterr().out
    got = load_file(str(b / "ckpt-0000001" / "model.safetensors"))
    assert set(got) == set(src)
    assert max((got[k] - src[k]).abs().max().item() for k in src) < 1e-9
    # the same run without it starts from the initialisation, far from those weights
    assert main([*new, *TINY, "--out", str(c)]) == 0
    fresh = load_file(str(c / "ckpt-0000001" / "model.safetensors"))
    assert max((fresh[k] - src[k]).abs().max().item() for k in src) > 1e-3
    assert main([*new, "--checkpoint", str(a), "--resume", str(a)]) == 2
    assert "give one" in capsys.readouterr().err
    # another tokenizer than the checkpoint's is noted (it was taken silently)
    d = tmp_path / "d"
    assert main([*new, "--checkpoint", str(a), "--out", str(d), "--tokenizer", "bytes"]) == 0
    assert "was trained with --tokenizer cl100k_base; this run uses bytes" in \
        capsys.readouterr().err


def test_a_run_remembers_the_python_blocks_it_imported(tmp_path, corpus, capsys):
    """A model using a Python block trains with --import; --resume and --generate
    --checkpoint import the same file again without being told (they failed with "unknown
    function"); a file that has gone is named."""
    blocks = tmp_path / "my_blocks.py"
    blocks.write_text("import lmc\n\n\n@lmc.block\ndef scaled_ffn(b, x, *, d):\n"
                      "    w = b.param('w', [d, d])\n    return b.silu(x @ w) * 0.5\n")
    model = tmp_path / "m.yaml"
    src = open(LLAMA).read()
    old = "        - x = x + swiglu(rmsnorm(x, name='ffn_norm'), name='ffn')\n"
    assert old in src
    model.write_text(src.replace(old, "        - x = x + scaled_ffn(x, name='ffn')\n"))
    out = tmp_path / "run"
    common = [str(model), *TINY, "--data", corpus, "--batch-size", "2", "--seq-len", "16",
              "--no-progress"]
    from lmc.blocks import REGISTRY, unregister
    try:
        assert main(["run", "--train", *common, "--out", str(out), "--steps", "2",
                     "--import", str(blocks)]) == 0
        for call in (["run", "--train", *common, "--resume", str(out), "--steps", "3"],
                     ["run", str(model), "--generate", "--checkpoint", str(out),
                      "--max-new-tokens", "3"]):
            unregister("scaled_ffn")          # a new process would not have it
            assert main(call) == 0, call
            assert "scaled_ffn" in REGISTRY
        capsys.readouterr()
        unregister("scaled_ffn")
        blocks.rename(tmp_path / "moved.py")
        assert main(["run", "--train", *common, "--resume", str(out), "--steps", "4"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"imported its blocks from {blocks}, which is gone" in err[0]
    finally:
        unregister("scaled_ffn")


def test_ctrl_c_before_the_first_write_leaves_the_replaced_run_alone(tmp_path, corpus, capsys,
                                                                       monkeypatch):
    """--overwrite, interrupted before the new run's first write (a mistaken command stopped
    at once): the old run is untouched and nothing is saved; the same for a resume from an
    earlier checkpoint, whose cut of the metrics waits for that first write too."""
    import lmc.runtime.train as tr
    a = tmp_path / "a"
    assert main(["run", *_args(a, corpus, "--steps", "4", "--ckpt-every", "2")]) == 0
    before = {str(p.relative_to(a)): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    real = tr.get_batch
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:     # during the second step: Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    monkeypatch.setattr(tr, "get_batch", interrupted)
    capsys.readouterr()
    args = _args(a, corpus, "--steps", "50", "--overwrite", "--ckpt-every", "1000")
    args[args.index("--log-every") + 1] = "1000"
    assert main(["run", *args]) == 130
    err = capsys.readouterr().err
    assert "before this run's first write: nothing saved, and" in err, err
    assert {str(p.relative_to(a)): p.read_bytes() for p in a.rglob("*") if p.is_file()} == \
        before
    # a rewind to ckpt-2, interrupted before its first write: the records of steps 3, 4 stay
    calls["n"] = 0
    args = ["run", LLAMA, "--train", "--no-progress", "--resume", str(a / "ckpt-0000002"),
            "--steps", "50", "--log-every", "1000", "--ckpt-every", "1000"]
    assert main(args) == 130
    assert {str(p.relative_to(a)): p.read_bytes() for p in a.rglob("*") if p.is_file()} == \
        before
    # and one that fails before it (a loss gone nan) as well
    monkeypatch.setattr(tr, "get_batch", real)
    assert main(["run", LLAMA, "--train", "--no-progress", "--resume", str(a / "ckpt-0000002"),
                 "--lr", "1e30"]) == 2
    assert [r["step"] for r in _metrics(a)] == [1, 2, 3, 4]
    assert (a / "latest").read_text().strip() == "ckpt-0000004"


def test_resume_from_a_checkpoint_outside_its_run_needs_an_out(tmp_path, corpus, capsys):
    """A ckpt-* directory copied elsewhere: continuing it into that directory would write
    beside a user's files there (their metrics cut, their `latest` replaced): refused,
    naming --out; with --out the continuation is a run of its own. A foreign record in a
    run's metrics does not break the curve."""
    from lmc.runtime.train import plot_losses
    a = tmp_path / "a"
    assert main(["run", *_args(a, corpus, "--steps", "2", "--ckpt-every", "2")]) == 0
    dl = tmp_path / "downloads"
    dl.mkdir()
    import shutil
    shutil.copytree(a / "ckpt-0000002", dl / "ckpt-0000002")
    (dl / "metrics.jsonl").write_text('{"step": 50, "mine": true}\n')
    (dl / "latest").write_text("my notes\n")
    capsys.readouterr()
    resume = ["run", LLAMA, "--train", "--no-progress", "--steps", "3", "--resume",
              str(dl / "ckpt-0000002")]
    assert main(resume) == 2
    err = capsys.readouterr().err.strip()
    assert "is not its run" in err and "--out DIR" in err, err
    assert (dl / "metrics.jsonl").read_text() == '{"step": 50, "mine": true}\n'
    assert (dl / "latest").read_text() == "my notes\n"
    assert main([*resume, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "ckpt-0000003").is_dir()
    with open(a / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "mine": true}\n')
    plot_losses(str(a / "metrics.jsonl"), str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_a_run_records_its_data_absolutely_and_a_resume_says_when_it_changed(
        tmp_path, corpus, capsys, monkeypatch):
    """--data given relative to where the run started: a resume from another directory
    reads the same file; a resume whose data now holds another number of tokens says so."""
    import shutil
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(corpus, work / "data.txt")
    monkeypatch.chdir(work)
    a = tmp_path / "a"
    args = _args(a, "data.txt", "--steps", "2")
    assert main(["run", *args]) == 0
    meta = json.loads((a / "ckpt-0000002" / "meta.json").read_text())
    assert meta["config"]["data"] == str(work / "data.txt")
    assert meta["train_tokens"] > 1000
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    resume = ["run", LLAMA, "--train", "--no-progress", "--resume", str(a)]
    assert main([*resume, "--steps", "3"]) == 0
    assert "note:" not in capsys.readouterr().err
    with open(work / "data.txt", "a") as f:
        f.write(open(corpus).read()[:20000])
    assert main([*resume, "--steps", "4"]) == 0
    err = capsys.readouterr().err
    assert f"note: the data ({work / 'data.txt'}) now holds" in err and \
        f"the run's held {meta['train_tokens']:,}: the continuation reads another corpus" \
        in err, err
