"""`lmc verify`: passes on llama, and each check fails when what it guards is broken."""
import os

import pytest
from conftest import ZOO

from lmc.cli import main
from lmc.verify import verify

LLAMA = os.path.join(ZOO, "llama.yaml")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _rows(*args, **kw):
    return {r.check: r for r in verify(*args, **kw)}


def test_llama_passes_every_check(capsys):
    # one layer: the CLI's path (tests/zoo/test_verify_zoo.py verifies the whole tiny preset)
    assert main(["verify", LLAMA, "--set", "layers=1"]) == 0
    out = capsys.readouterr().out
    assert "preset tiny" in out and "6/6 checks passed" in out
    for label in ("passes = oracle", "causal", "gradients = oracle", "triton = oracle",
                  "decode = forward"):
        assert f"{label}" in out


def test_a_model_without_its_causal_mask_fails_causality(tmp_path, capsys):
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text(open(LLAMA).read().replace(
        "softmax(where(causal_mask(T), scores, -inf), -1)", "softmax(scores, -1)"))
    # (the triton and decode checks, which the mask does not concern, left out: 40 s)
    assert main(["verify", str(leaky), "--skip", "triton", "--skip", "decode"]) == 1
    out = capsys.readouterr().out
    assert "causal" in out and "FAIL" in out and "moved logits at positions" in out
    # a skipped check is counted neither passed nor failed: of the 6 rows 4 ran
    fails = out.split("FAILED: ")[1].strip().split(", ")
    assert f"{4 - len(fails)}/4 checks passed (2 skipped); FAILED: " in out, out
    rows = _rows(str(leaky), skip=["triton", "decode"])
    assert not rows["causal"].ok and rows["gradients = oracle"].ok


def test_a_model_reading_the_sequence_length_fails_causality(tmp_path):
    """Logits that depend on T (here a mean of iota(T) added to the residual stream): no
    perturbation of a later token moves them, but the first t+1 tokens alone give others
    (this passed the causal check: only decode = forward caught it, and not with --skip
    decode)."""
    lenT = tmp_path / "lenT.yaml"
    src = open(LLAMA).read()
    old = "    - logits = "
    assert old in src
    lenT.write_text(src.replace(old, "    - x = x + mean(cast(iota(T), 'f32'), -1, keepdim=False)"
                                " * 0.1\n" + old, 1))
    rows = _rows(str(lenT), skip=["triton", "decode", "grads"])
    assert not rows["causal"].ok and "the first 1 tokens alone gave other logits at " \
        "positions <= 0 than the whole sequence" in rows["causal"].detail, rows["causal"]
    rows = _rows(LLAMA, skip=["triton", "decode", "grads", "passes"])
    assert rows["causal"].ok and "the first t+1 tokens alone: max rel diff" in \
        rows["causal"].detail


def test_a_wrong_vjp_rule_fails_the_gradient_check(monkeypatch):
    from lmc.ir.ops import Op
    from lmc.passes import autodiff
    right = autodiff.VJP[Op.SILU]
    monkeypatch.setitem(autodiff.VJP, Op.SILU, lambda r: [g * 1.01 for g in right(r)])
    rows = _rows(LLAMA, skip=["triton", "decode"])
    assert not rows["gradients = oracle"].ok
    assert rows["passes = oracle"].ok and rows["causal"].ok


def test_a_wrong_kernel_fails_the_triton_check(monkeypatch):
    from lmc.codegen import pointwise
    from lmc.ir.ops import Op
    monkeypatch.setitem(pointwise._UNARY, Op.SILU, "({0}) * tl.sigmoid(1.001 * {0})")
    rows = _rows(LLAMA, skip=["grads", "decode"])
    assert not rows["triton = oracle"].ok
    assert rows["causal"].ok and rows["gradients = oracle"].skipped


def test_sizes_from_set_and_unknown_skip(capsys):
    rows = _rows(LLAMA, overrides=["vocab=64", "d=32", "heads=2", "ffn=48", "layers=1"],
                 skip=["triton"])
    # --set applies on top of the tiny preset (max_seq 128 comes from it): 64*32*2 + 1 layer
    assert "preset tiny" in rows["compiles"].detail and all(r.ok for r in rows.values())
    params = 64 * 32 * 2 + 32 + 4 * 32 * 32 + 3 * 32 * 48 + 2 * 32
    assert rows["compiles"].detail.startswith(f"{params:,} params")
    assert main(["verify", LLAMA, "--skip", "nonsense"]) == 2
    assert "no such check" in capsys.readouterr().err


def test_decode_without_the_position_offset_fails_decode_check(monkeypatch):
    """The step's new tokens given positions 0 .. T-1 again (the past P not added): RoPE
    rotates them as the first tokens, and decode = forward fails on the logits' values (not
    on a shape error: every shape is as before)."""
    import torch

    from lmc.passes import decode
    monkeypatch.setattr(decode, "_pos_fn", lambda P_, T_: torch.arange(T_, device=P_.device))
    rows = _rows(LLAMA, skip=["triton", "grads"])
    row = rows["decode = forward"]
    assert not row.ok and rows["causal"].ok
    worst = float(row.detail.split("max |diff| ")[1].split(";")[0])
    assert worst > 1e-2, row.detail


UNUSED = """\
config: {vocab: 97, d: 32}
presets: {tiny: {}}
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d], lm_head: [d, vocab]}
  body:
    - logits = embedding(embed, ids) @ transpose(embed, 0, 1)
  outputs: [logits]
"""


def test_an_unused_parameter_is_a_zero_gradient_not_a_failure(tmp_path):
    """A parameter no output reads (a declared lm_head the tied model does not use): torch
    autograd gives it no gradient, lmc's autodiff a zero one. Both mean zero; the checks
    pass and name it. A nonzero gradient on one side against none on the other still
    fails."""
    p = tmp_path / "unused.yaml"
    p.write_text(UNUSED)
    rows = _rows(str(p))
    for check in ("gradients = oracle", "triton = oracle"):
        assert rows[check].ok, rows[check].detail
        assert "unused (zero gradient): lm_head" in rows[check].detail
    import torch

    from lmc.verify import _grad_diff
    ok, why = _grad_diff({"w": torch.ones(3)}, {"w": None})
    assert not ok and "missing" in why


def test_a_model_storing_bf16_skips_the_triton_check_without_a_gpu(tmp_path):
    """Triton's interpreter cannot compute bf16: on CPU the triton check says so and is
    skipped (it failed, pointing at a --precision flag verify does not have)."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU the check runs")
    p = tmp_path / "bf.yaml"
    p.write_text(UNUSED.replace("lm_head: [d, vocab]}", "}").replace(
        "    - logits = embedding(embed, ids) @ transpose(embed, 0, 1)\n",
        "    - h = cast(embedding(embed, ids) * 2.0, 'bf16')\n"
        "    - logits = cast(h @ cast(transpose(embed, 0, 1), 'bf16'), 'f32')\n"))
    rows = _rows(str(p))
    tri = rows["triton = oracle"]
    assert tri.skipped and "run lmc verify on a GPU" in tri.detail, tri
    assert all(r.ok for r in rows.values())


def test_an_fp64_tie_break_does_not_pass_a_wrong_gradient(tmp_path, monkeypatch):
    """Where the fp32 oracle cannot resolve a gradient (a cancelling sum: the Differential
    Transformer's lambda), the check compares both with the oracle in fp64 and passes within
    the tolerance or twice the fp32 oracle's own error; a gradient off by 1% still fails.
    (The lambda's gradient cancels at the model's own init, not at verify's unit-scale
    projections, where fp32 resolves it to ~1e-6: unit_scale is off here.)"""
    import torch

    from lmc import verify as V
    monkeypatch.setattr(V, "unit_scale", lambda model, seed, roles: None)
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "diff_transformer.yaml")
    rows = V.verify(path, skip=["passes", "causal", "triton", "decode"])
    grads = next(r for r in rows if r.check == "gradients = oracle")
    assert grads.ok and "against the oracle in fp64" in grads.detail, grads.detail
    from lmc.driver import compile_model
    c = compile_model(path, "tiny")       # the subject lmc verify builds (seed 0, B=2, T=11)
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    s = V.Subject(path, "tiny", [], c, 512, ids, 0)
    o = s.oracle()
    with torch.no_grad():
        cot = V._cotangents(s, V._outputs(o.train(), s.ids))
    ref = V._grads(o, s.ids, cot, s.seed)
    got = V._grads(s.model(), s.ids, cot, s.seed)
    assert V._grad_check(s, got, ref, cot)[0]
    name = "layers.1.attn.lk2"
    got[name] = got[name] * 1.01
    ok, detail = V._grad_check(s, got, ref, cot)
    assert not ok and name in detail, detail


def test_constant_initialised_parameters_are_checked_off_their_init(monkeypatch):
    """Biases init to zeros and norm weights to ones get noise in every check, so a kernel
    that drops one is caught: here the fused MoE gating ignoring deepseek_moe's selection
    bias (zeros at init, where dropping it changes nothing) fails the triton check."""
    import torch

    from lmc.codegen import moe
    from lmc.driver import compile_model
    from lmc.verify import Subject

    c = compile_model(os.path.join(os.path.dirname(ZOO), "examples", "deepseek_moe.yaml"),
                      "tiny", [])
    s = Subject("", "tiny", [], c, 512, torch.zeros(1, 2, dtype=torch.long), 0)
    m, o = s.model(), s.oracle()
    inits = {p.attrs["name"]: p.attrs["init"].kind for p in c.graph.params}
    for name, t in m.named_parameters():
        if inits[name] in ("zeros", "ones"):       # moved off the constant, shared by both
            base = 0.0 if inits[name] == "zeros" else 1.0
            assert (t - base).abs().max() > 0.01, name
        assert torch.equal(t, o.state_dict()[name]), name
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                 s.model().state_dict().values()))

    real = moe._gating_forward
    monkeypatch.setattr(moe, "_gating_forward",
                        lambda *a, **kw: real(*a, **{**kw, "bias": None}))
    rows = _rows(os.path.join(os.path.dirname(ZOO), "examples", "deepseek_moe.yaml"),
                 overrides=["layers=1"], skip=["decode", "grads", "causal"])
    assert not rows["triton = oracle"].ok, rows["triton = oracle"].detail
    assert rows["passes = oracle"].ok
    # at the init values the same broken kernel passes: what the noise is for
    monkeypatch.setattr("lmc.verify.off_default", lambda model, seed: None)
    rows = _rows(os.path.join(os.path.dirname(ZOO), "examples", "deepseek_moe.yaml"),
                 overrides=["layers=1"], skip=["decode", "grads", "causal"])
    assert rows["triton = oracle"].ok, rows["triton = oracle"].detail


LEARNED_CAP = """
name: capped
config: {vocab: 31, d: 32, heads: 4, head_dim: 8, max_seq: 64}
presets: {tiny: {}}
blocks:
  heads_of:
    args: [x]
    body:
      - return permute(reshape(x, [B, T, heads, head_dim]), [0, 2, 1, 3])
model:
  inputs: {ids: [B, T]}
  params:
    embed: [vocab, d]
    head: [d, vocab]
    wq: [d, d]
    wk: [d, d]
    wv: [d, d]
    cap: {shape: [1], init: constant(2.0)}
    spare: {shape: [4], init: zeros}
  body:
    - x = embedding(embed, ids)
    - s = (heads_of(x @ wq) @ transpose(heads_of(x @ wk), -2, -1)) * head_dim ** -0.5
    - p = softmax(where(causal_mask(T), tanh(s / cap) * cap, -inf), -1)
    - x = x + reshape(permute(p @ heads_of(x @ wv), [0, 2, 1, 3]), [B, T, d])
    - logits = x @ head
  outputs: [logits]
"""


def test_the_fp64_tie_break_passes_over_an_unused_parameter(tmp_path, monkeypatch):
    """A learned soft-cap's gradient cancels in fp32 (the tie-break decides it); a parameter
    no output reads (zeros from lmc, None from torch) is skipped there as in the fp32
    comparison (it used to end the tie-break, failing the check). (It cancels at the model's
    own init, scores ~1e-5 far below the cap: unit_scale is off here.) Whether the fp32
    comparison then fails depends on the CPU's summation order (it did on one machine,
    rel diff 1.4e-07 on another), so it is made to fail here: the tie-break always runs."""
    import lmc.verify as verify_mod

    monkeypatch.setattr("lmc.verify.unit_scale", lambda model, seed, roles: None)
    real = verify_mod._grad_diff
    monkeypatch.setattr(verify_mod, "_grad_diff", lambda got, ref: (False, real(got, ref)[1]))
    p = tmp_path / "capped.yaml"
    p.write_text(LEARNED_CAP)
    rows = _rows(str(p), skip=["causal", "decode"])
    for check in ("gradients = oracle", "triton = oracle"):
        assert rows[check].ok, rows[check].detail
        assert "unused (zero gradient): spare" in rows[check].detail
    assert "against the oracle in fp64" in rows["gradients = oracle"].detail


def _no_norm_llama(tmp_path):
    """zoo/llama.yaml without its RMSNorms: at its own init (N(0, 0.02) matrices) the
    attention scores are ~1e-5 and the softmax uniform to within as much."""
    src = open(LLAMA).read()
    for norm in ("attn_norm", "ffn_norm", "norm"):
        assert f"rmsnorm(x, name='{norm}')" in src
        src = src.replace(f"rmsnorm(x, name='{norm}')", "x")
    p = tmp_path / "no_norm.yaml"
    p.write_text(src)
    return str(p)


def test_verify_weights_make_the_attention_scores_matter(tmp_path, monkeypatch):
    """verify re-draws the projections at unit scale (unit_scale): a decode attention kernel
    that scales the scores by 1.5x the model's scale fails decode = forward. At the model's
    own init (unit_scale off: what verify used before) the same kernel passed, its logits
    within 4e-9 of the forward's: scores ~1e-5 times 1.5 are still ~1e-5."""
    from lmc.codegen import decode_attention
    path = _no_norm_llama(tmp_path)
    real = decode_attention._attend

    def wrong_scale(q, k, v, pos, kpos, out, opts, *a, **kw):
        return real(q, k, v, pos, kpos, out, {**opts, "scale": 1.5 * opts["scale"]}, *a, **kw)

    monkeypatch.setattr(decode_attention, "_attend", wrong_scale)
    skip = ["passes", "causal", "grads", "triton"]
    rows = _rows(path, overrides=["layers=1"], skip=skip)
    assert not rows["decode = forward"].ok, rows["decode = forward"].detail
    monkeypatch.setattr("lmc.verify.unit_scale", lambda model, seed, roles: None)
    rows = _rows(path, overrides=["layers=1"], skip=skip)
    assert rows["decode = forward"].ok, rows["decode = forward"].detail


def test_unit_scale_redraws_projections_and_tables_only():
    """Projections N(0, 1/fan_in) (fan_in = shape[-2], weights stored [in, out]) and
    embedding tables N(0, 1); MoE routers (deepseek_moe: sigmoid routing), vectors and
    uniform inits (mamba2's convolution taps, rwkv6's bonus) keep theirs; the same weights
    every time (from the seed) in the model and its oracle."""
    import torch

    from lmc.driver import compile_model
    from lmc.runtime.module import LmcModel
    from lmc.verify import Subject
    ex = os.path.join(os.path.dirname(ZOO), "examples")
    for name, kept in (("deepseek_moe.yaml", "layers.0.moe.router"),
                       ("mamba2.yaml", "layers.0.mixer.conv_w"),
                       ("rwkv6.yaml", "layers.0.att.bonus")):
        c = compile_model(os.path.join(ex, name), "tiny", [])
        s = Subject("", "tiny", [], c, 512, torch.zeros(1, 2, dtype=torch.long), 0)
        m, own = s.model(), LmcModel(c.graph, seed=0)
        w, init = dict(m.named_parameters()), dict(own.named_parameters())
        assert torch.equal(w[kept], init[kept]), kept
        assert abs(w["embed"].std().item() - 1.0) < 0.05
        kinds = {p.attrs["name"]: p.attrs["init"].kind for p in c.graph.params}
        for pname, t in w.items():
            if t.dim() < 2 or kinds[pname] != "normal" or pname == "embed":
                continue
            if "router" in pname:
                assert torch.equal(t, init[pname]), pname
                continue
            want = t.shape[-2] ** -0.5
            assert abs(t.std().item() / want - 1) < 0.3, (name, pname, t.std().item(), want)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                     s.model().state_dict().values()))
        o = s.oracle().state_dict()
        assert all(torch.equal(t, o[k]) for k, t in m.state_dict().items())


def test_an_untied_head_is_scaled_to_the_logit_bound(tmp_path):
    """Without norms, unit-scale weights grow the logits (llama without its norms: ~21); an
    untied head is scaled so the largest is LOGIT_BOUND (the decode check's absolute
    tolerance is then 1e-5 of it); a tied head (gpt2's wte) is left alone."""
    import torch

    from lmc import verify as V
    from lmc.driver import compile_model
    from lmc.passes.basic import inline
    c = compile_model(_no_norm_llama(tmp_path), "tiny", [])
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    s = V.Subject("", "tiny", [], c, 512, ids, 0)
    assert s._roles()[1] == "lm_head" and s._head_factor("lm_head") < 0.6
    with torch.no_grad():
        top = V._outputs(s.model().eval(), ids)["logits"].abs().max().item()
    assert abs(top - V.LOGIT_BOUND) < 1e-4 * V.LOGIT_BOUND, top
    gpt2 = compile_model(os.path.join(os.path.dirname(ZOO), "examples", "gpt2.yaml"), "tiny", [])
    assert V.logits_head(inline(gpt2.source)) is None
