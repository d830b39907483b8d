"""examples/: architectures outside the zoo, written as a user would (GPT-2: learned positions,
LayerNorm with biases, a tied head; a Gemma 2-style model: soft-capped attention scores,
alternating local/global layers, QK-norm, a soft-capped head; an MPT-style model: ALiBi;
a BLOOM-style model: ALiBi written as slopes * key position; a DeepSeek-style MoE: a sigmoid
router and a shared expert; a Mamba-2-style state-space model: a short causal convolution and
SSD, decayed linear attention with q and k shared by the heads; a gpt-oss-style model:
attention sinks, sliding-window layers; a Differential Transformer: the difference of two
attention maps weighting one set of values; a GLA model: linear attention with per-channel
data-dependent decays; an RWKV-6-style model: exclusive decays and a bonus, data-dependent
token shifts; a Falcon-style model: the parallel block, multi-query attention; a RetNet-style
model: retention with a fixed decay per head written as the paper writes it; Llama 3 as Meta's
reference code writes it: RoPE as complex pairs and the kv heads' repeat in the [B, T, H, D]
layout, before the transpose). `lmc verify`
passes on each,
and the fusions fire on what they hold: plain causal attention with no RoPE, soft-capped
scores, ALiBi in both forms, sigmoid routing, SSD as chunked linear attention, in training and
in the decode step."""
import glob
import os

import pytest

import lmc
from lmc.ir.ops import Op
from lmc.passes import run_pipeline
from lmc.passes.decode import decode_step
from lmc.passes.fuse_decode_attention import fuse_decode_attention
from lmc.passes.loss import with_loss
from lmc.runtime.module import LmcModel
from lmc.verify import format_rows, verify

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
FILES = sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml")))
# a cap small enough that tanh saturates on the tiny models' scores (Gemma 2's 50 barely
# bends them): the capped kernels' values and gradients are tested where the cap matters
SETS = {"gemma2.yaml": ["attn_cap=1.5"]}
DECODE = {"gpt2.yaml": "", "gemma2.yaml": ", scores soft-capped at 1.5", "mpt.yaml": ", ALiBi",
          "bloom.yaml": ", ALiBi", "deepseek_moe.yaml": ", scale 0.25", "mamba2.yaml": None,
          "gpt_oss.yaml": ", attention sinks", "diff_transformer.yaml": ", scale 0.25",
          "gla.yaml": None, "rwkv6.yaml": None, "falcon.yaml": ", scale 0.25",
          "retnet.yaml": None, "llama3_meta.yaml": ", scale 0.25"}
# what the fused attention records say per layer (tiny presets)
ATTENTION = {
    "gpt2.yaml": ["no rope: causal attention, scale 0.25"] * 2,
    "gemma2.yaml": ["rope + causal window 6 GQA attention (4 heads, 2 kv) with scores "
                    "soft-capped at 1.5, scale 0.25",
                    "rope + causal GQA attention (4 heads, 2 kv) with scores soft-capped at "
                    "1.5, scale 0.25"],
    "mpt.yaml": ["no rope: causal attention with ALiBi, scale 0.25"] * 2,
    "bloom.yaml": ["no rope: causal attention with ALiBi (slopes * key position), "
                   "scale 0.25"] * 2,
    # two layers and the multi-token prediction block (trained, never decoded)
    "deepseek_moe.yaml": ["rope + causal GQA attention (4 heads, 2 kv), scale 0.25"] * 3,
    "mamba2.yaml": [],      # no attention (SSD: tests below)
    "gla.yaml": [],         # no softmax attention (gated linear attention: below)
    "rwkv6.yaml": [],       # the same (below)
    "retnet.yaml": [],      # retention: decayed linear attention (below)
    # two attention maps per layer, each its own flash attention
    "diff_transformer.yaml": ["rope + causal attention, scale 0.25"] * 4,
    "falcon.yaml": ["rope + causal MQA attention (4 heads, 1 kv), scale 0.25"] * 2,
    # RoPE (as pairs) and the kv repeat before the heads' transpose: moved by canonicalize
    "llama3_meta.yaml": ["interleaved rope + causal GQA attention (4 heads, 2 kv), "
                         "scale 0.25"] * 2,
    "gpt_oss.yaml": ["rope + causal window 5 GQA attention (4 heads, 2 kv) with attention "
                     "sinks, scale 0.25",
                     "rope + causal GQA attention (4 heads, 2 kv) with attention sinks, "
                     "scale 0.25"],
}
WITH_ATTENTION = [f for f in FILES if ATTENTION.get(os.path.basename(f))]
TRAINING_ONLY = {"deepseek_moe.yaml": 1}    # attentions the decode step drops (MTP's)


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def test_every_example_is_listed():
    assert sorted(os.path.basename(f) for f in FILES) == sorted(ATTENTION)


@pytest.mark.parametrize("path,sets", [(f, SETS.get(os.path.basename(f), [])) for f in FILES]
                         + [(os.path.join(EXAMPLES, "mpt.yaml"), ["window=5"])],
                         ids=lambda x: os.path.basename(x) if isinstance(x, str) else
                         ",".join(x) or "-")
def test_verify_passes(path, sets):
    # (mpt with window=5: ALiBi in sliding-window attention, on a cache masked by position)
    rows = verify(path, overrides=sets)
    assert all(r.ok and not r.skipped for r in rows), format_rows(rows)
    # the triton decoder runs the flash-decoding kernel in every attention layer (the routed
    # MoE kernels in every MoE layer, the recurrent linear-attention kernel in every SSD one)
    fused = {"deepseek_moe.yaml": " (2 decode_attention, 2 moe_layer)",
             "mamba2.yaml": " (2 decode_linear_attention)",
             "diff_transformer.yaml": " (4 decode_attention)",
             "gla.yaml": " (2 decode_gated_linear_attention)",
             "retnet.yaml": " (2 decode_linear_attention)",
             "rwkv6.yaml": " (2 decode_gated_linear_attention)"}.get(os.path.basename(path),
                                                                  " (2 decode_attention)")
    assert f"triton k in [1, 5]{fused}:" in rows[-1].detail, rows[-1].detail
    if "window=5" in sets or "mamba2" in path:  # rings; SSD and convolution states: no growth
        assert "state 4 tensors, 0 B/token + " in rows[-1].detail, rows[-1].detail
    if "gla" in path or "retnet" in path:   # one d_k x d_v state per layer, no cache
        assert "state 2 tensors, 0 B/token + " in rows[-1].detail, rows[-1].detail
    if "rwkv6" in path:     # per layer the state and five shifted inputs (x twice, k, v, g)
        assert "state 12 tensors, 0 B/token + 10,752 B/sequence" in rows[-1].detail, \
            rows[-1].detail
    if "gpt_oss" in path:   # the window-5 layer's K, V in 5-slot rings (sinks and all)
        assert "state 4 tensors, 256 B/token + 1,280 B/sequence" in rows[-1].detail, \
            rows[-1].detail


def test_alibi_shared_by_layers_of_different_windows_keeps_full_caches(tmp_path):
    """One ALiBi bias read by a sliding-window layer and a full one: a node has one key
    layout in the decode step, so both keep a full cache (masked by position) and decode
    still equals the forward."""
    src = open(os.path.join(EXAMPLES, "mpt.yaml")).read()
    src = src.replace("    args: [x, alibi]\n", "    args: [x, alibi]\n    options: {win: 0}\n")
    src = src.replace("causal_mask(T, T, window)", "causal_mask(T, T, win)")
    src = src.replace("alibi, name='attn')", "alibi, win=5 if i % 2 == 0 else 0, name='attn')")
    path = tmp_path / "mpt_mixed.yaml"
    path.write_text(src)
    rows = verify(str(path))
    assert all(r.ok and not r.skipped for r in rows), format_rows(rows)
    assert "state 4 tensors, 1,024 B/token + 0 B/sequence" in rows[-1].detail, rows[-1].detail


@pytest.mark.parametrize("path", WITH_ATTENTION, ids=os.path.basename)
def test_attention_fuses_in_training_and_decode(path):
    name = os.path.basename(path)
    sets = dict(s.split("=") for s in SETS.get(name, ()))
    model = lmc.load(path, preset="tiny", **{k: float(v) for k, v in sets.items()})
    prog = LmcModel(run_pipeline(with_loss(model.graph)), backend="triton").program()
    recs = [r for r in prog.forward_exec.graph.meta["fusions"]
            if r["pass"] == "fuse_rope_attention"]
    n = len(ATTENTION[name])        # attentions in the tiny model (two layers)
    assert [r["status"] for r in recs] == ["fused"] * n
    assert [r["reason"] for r in recs] == ATTENTION[name]
    kinds = [n.attrs.get("kind") for n in prog.backward_exec.graph.nodes
             if n.op.value == "fused"]
    assert kinds.count("rope_attention_bwd") == n
    from lmc.passes.mixed_precision import low_precision_weights
    low = low_precision_weights(model.graph, "bf16")   # the decoder's bf16 weights on a GPU
    for static, graph in ((False, model.graph), (True, model.graph), (False, low), (True, low)):
        step = fuse_decode_attention(decode_step(graph, static=static).graph)
        recs = [r for r in step.meta["fusions"] if r["pass"] == "fuse_decode_attention"]
        assert [r["status"] for r in recs] == ["fused"] * (n - TRAINING_ONLY.get(name, 0))
        assert all(r["reason"].endswith(DECODE[name]) for r in recs), recs


@pytest.mark.parametrize("path", WITH_ATTENTION, ids=os.path.basename)
def test_mixed_precision_training_fuses_attention_over_fp32_projections(path):
    """Under mixed precision (f16 here: the interpreter cannot compute bf16) q, k, v come out
    of fp32 ops (GPT-2: a bias added to the f16 product; Gemma 2: QK-norm, then RoPE, in
    fp32) and are cast down for the products: the attention still fuses, reading them cast
    (new cast nodes that join their producers' kernels). Loss and gradients of the triton
    program are as close to the fp32 program's as the torch backend's (which rounds every op
    where the kernels keep fp32)."""
    import torch
    from conftest import loss_and_grads

    from lmc.ir.ops import Op
    from lmc.passes.mixed_precision import mixed_precision

    name = os.path.basename(path)
    sets = {k: float(v) for k, v in (s.split("=") for s in SETS.get(name, ()))}
    src = lmc.load(path, preset="tiny", **sets).graph
    g = run_pipeline(with_loss(mixed_precision(src, "f16")))
    gen = torch.Generator().manual_seed(0)
    ids, targets = (torch.randint(0, 512, (2, 13), generator=gen) for _ in range(2))
    scale = 2.0 ** 8

    def worst(a, b):
        return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)

    m, lk, gk = loss_and_grads(g, "triton", ids, targets, scale=scale)
    fwd = m.program().forward_exec.graph
    attn = [n for n in fwd.nodes if n.op is Op.FUSED and n.attrs["kind"] == "rope_attention"]
    assert len(attn) == len(ATTENTION[name])
    assert all(x.type.dtype.value == "f16" for n in attn for x in n.inputs[:3])
    _, lt, gt = loss_and_grads(g, "torch", ids, targets, scale=scale)
    _, l32, g32 = loss_and_grads(run_pipeline(with_loss(src)), "torch", ids, targets,
                                 scale=scale)
    assert abs(lk - l32) / l32 < 2 ** -9
    floor = worst(gt, g32)
    assert worst(gk, g32) < 2 * floor, (worst(gk, g32), floor)



def test_sigmoid_router_fuses_in_training_and_decode():
    """deepseek_moe: its sigmoid router (and the routed experts) is one fused layer in the
    training program (both layers and the multi-token prediction block; the shared expert
    stays ordinary matmuls)."""
    path = os.path.join(EXAMPLES, "deepseek_moe.yaml")
    model = lmc.load(path, preset="tiny")
    prog = LmcModel(run_pipeline(with_loss(model.graph)), backend="triton").program()
    recs = [r for r in prog.forward_exec.graph.meta["fusions"]
            if r["pass"] == "fuse_moe_gating"]
    assert [r["status"] for r in recs] == ["fused"] * 3
    assert all(r["reason"].startswith("sigmoid top-4 of 8")
               and "selection bias" in r["reason"] and "grouped GEMMs" in r["reason"]
               for r in recs)
    kinds = [n.attrs.get("kind") for n in prog.backward_exec.graph.nodes
             if n.op.value == "fused"]
    assert kinds.count("moe_layer_bwd") == 3


def test_qkv_gradients_are_written_into_one_buffer():
    """GPT-2's fused q/k/v projection: the attention backward writes dq, dk, dv into strided
    views of the [B, T, 3d] gradient the projection's backward reads, so no concatenation
    runs (the program allocates that buffer first); a training step still equals the torch
    backend's, and the step's modelled bytes drop by the copies."""
    import torch

    from lmc.codegen.wrapper import concat_aliases
    from lmc.ir.ops import Op
    model = lmc.load(os.path.join(EXAMPLES, "gpt2.yaml"), preset="tiny")
    g = run_pipeline(with_loss(model.graph))
    tri = LmcModel(g, backend="triton", seed=3)
    prog = tri.program()
    back = prog.backward_exec
    aliases = concat_aliases(back.graph)
    assert len(aliases) == 2 and all(len(p) == 3 for p in aliases.values())   # per layer
    src = back.program_source
    assert src.count("concat written by its pieces' kernels") == 2
    assert src.count("its piece of the concat") == 6
    cats = [i for i, n in enumerate(back.graph.nodes) if n.op is Op.CONCAT]
    assert not any(f"REF[{i}]" in src for i in cats if back.graph.nodes[i] in aliases)
    ids, targets = (torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(s))
                    for s in (1, 2))
    ref = LmcModel(g, backend="torch", seed=3)
    losses = []
    for m in (tri, ref):
        out = m(ids, targets=targets)
        out["loss"].backward()
        losses.append(out["loss"].item())
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[1])
    for (n, p), (_, q) in zip(tri.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def _linear_attention_program(g, bwd_kind: str):
    """The triton training program of g, asserting fuse_linear_attention fused its two
    layers and the backward runs two ops of bwd_kind."""
    prog = LmcModel(run_pipeline(with_loss(g)), backend="triton").program()
    recs = [r for r in prog.forward_exec.graph.meta["fusions"]
            if r["pass"] == "fuse_linear_attention"]
    assert [r["status"] for r in recs] == ["fused"] * 2, recs
    kinds = [n.attrs.get("kind") for n in prog.backward_exec.graph.nodes
             if n.op.value == "fused"]
    assert kinds.count(bwd_kind) == 2
    return prog


def _decode_runs_recurrent_ops(graph, states):
    """The decode step of `graph`, with f32 and bf16 weights, dynamic and static, keeps
    `states` ((kind, shape at batch 1), sorted) and runs one fused recurrent op in each of
    the two layers; returns the last step's records."""
    from lmc.passes.fuse_decode_linear_attention import fuse_decode_linear_attention
    from lmc.passes.mixed_precision import low_precision_weights
    low = low_precision_weights(graph, "bf16")
    for static, g in ((False, graph), (True, graph), (False, low), (True, low)):
        step = decode_step(g, static=static)
        assert sorted((s.kind, tuple(s.concrete(1))) for s in step.states) == states
        recs = [r for r in fuse_decode_linear_attention(step.graph).meta["fusions"]
                if r["pass"] == "fuse_decode_linear_attention"]
        assert [r["status"] for r in recs] == ["fused"] * 2, recs
    return recs


def test_mamba2_ssd_fuses_in_training_and_decode():
    """mamba2: each layer's SSD (C and B shared by the heads, per-token decays dt * A) is one
    chunked linear attention in the training program, forward and backward, also under mixed
    precision, and one recurrent op in the decode step; its convolution decodes from the
    last d_conv - 1 inputs (a constant-size state, as SSD's)."""
    from lmc.passes.mixed_precision import mixed_precision
    model = lmc.load(os.path.join(EXAMPLES, "mamba2.yaml"), preset="tiny")
    for g in (model.graph, mixed_precision(model.graph, "bf16")):
        prog = _linear_attention_program(g, "linear_attention_bwd")
        recs = [r for r in prog.forward_exec.graph.meta["fusions"]
                if r["pass"] == "fuse_linear_attention"]
        assert all("per-token log-decays [B, 8, T] (learned)" in r["reason"] for r in recs)
        # per layer, the gradients of both splits (z | xbc | dt and x | B | C) are written
        # by their kernels into the concatenation's buffer (no concat runs)
        src = prog.backward_exec.program_source
        assert src.count("concat written by its pieces' kernels") == 4, src
    _decode_runs_recurrent_ops(model.graph, [("shift", (1, 3, 160))] * 2
                               + [("state", (1, 8, 16, 16))] * 2)


def test_gla_runs_chunked_kernels_in_training_and_a_constant_state_in_decode():
    """gla: each layer's gated linear attention (per-channel decays) is one chunked
    gated_linear_attention op in the training program (f32 and bf16), its backward one
    gated_linear_attention_bwd; the decode step keeps an fp32 d_k x d_v state per head and
    runs it as one recurrent op per layer (f32 and bf16 weights, dynamic and static)."""
    from lmc.passes.mixed_precision import mixed_precision
    model = lmc.load(os.path.join(EXAMPLES, "gla.yaml"), preset="tiny")
    for g in (model.graph, mixed_precision(model.graph, "bf16")):
        prog = _linear_attention_program(g, "gated_linear_attention_bwd")
        assert all(r["reason"].startswith("gated: ") for r in prog.forward_exec.graph.meta[
            "fusions"] if r["pass"] == "fuse_linear_attention")
    recs = _decode_runs_recurrent_ops(model.graph, [("state", (1, 2, 16, 32))] * 2)
    assert all(r["reason"].startswith("gated: 2 heads, state 16x32") for r in recs)


def test_retnet_paper_form_retention_runs_chunked_kernels_and_a_constant_state():
    """retnet: D_ts = gamma^(t-s) written from positions and masked after the exp (the paper's
    form) is rewritten by canonicalize into the cumsum form, so each layer's retention is one
    chunked linear attention in training (f32 and bf16; fixed per-head decays) and one
    recurrent op over a d_k x d_v state per head in the decode step."""
    from lmc.passes.mixed_precision import mixed_precision
    model = lmc.load(os.path.join(EXAMPLES, "retnet.yaml"), preset="tiny")
    for g in (model.graph, mixed_precision(model.graph, "bf16")):
        prog = _linear_attention_program(g, "linear_attention_bwd")
        recs = [r for r in prog.forward_exec.graph.meta["fusions"]
                if r["pass"] == "fuse_linear_attention"]
        assert all("G = cumsum of fixed per-head decay [2, T]" in r["reason"]
                   for r in recs), recs
    recs = _decode_runs_recurrent_ops(model.graph, [("state", (1, 2, 32, 32))] * 2)
    assert all(r["reason"] == "2 heads, state 32x32 per head, log-decays [2, T]"
               for r in recs), recs


def test_gla_long_prompt_chunks_continue_the_state(monkeypatch):
    """gla on the triton backend: a 5-token prefill (the recurrent kernel), then a 30-token
    chunk of the prompt from that state (the chunked kernels, starting from it and storing
    the final state), then single steps: every logit equals the full forward's."""
    import torch

    from lmc.codegen import gated_linear_attention as G
    from lmc.runtime.decoder import Decoder

    path = os.path.join(EXAMPLES, "gla.yaml")
    m = lmc.load(path, preset="tiny", backend="triton", seed=2).eval()
    oracle = lmc.load(path, preset="tiny", seed=2).eval()
    ids = torch.randint(0, m.config["vocab"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = oracle(ids)
    full = full["logits"] if isinstance(full, dict) else full
    chunked = []
    real = G.gla_forward

    def spy(*a, **kw):
        chunked.append(kw.get("initial_state") is not None)
        return real(*a, **kw)
    monkeypatch.setattr(G, "gla_forward", spy)
    dec = Decoder(m, "triton")
    state = dec.init_state(2)
    worst = 0.0
    for lo, hi in ((0, 5), (5, 35)) + tuple((t, t + 1) for t in range(35, 40)):
        logits, state = dec(ids[:, lo:hi], state)
        worst = max(worst, (logits - full[:, lo:hi]).abs().max().item())
    assert chunked == [True, True]          # the 30-token chunk, once per layer
    assert worst < 1e-4, worst


RWKV6 = os.path.join(EXAMPLES, "rwkv6.yaml")


@pytest.mark.parametrize("overrides", [{}, {"layers": 3, "head_size": 32}],
                         ids=["tiny", "3-layers-head-32"])
def test_rwkv6_equals_a_handwritten_recurrent_rwkv6(overrides):
    """rwkv6's parallel form (gated linear attention over keys, values and log-decays one
    token later, plus the bonus) equals RWKV-6 computed as its reference kernel does, token
    by token with the state read before the update (tests/reference_rwkv6.py), on the torch
    backend and on the triton one (the chunked kernels, T = 37: two chunks and a ragged
    third). The output projections are scaled up so the mixer dominates the logits; the
    same recurrence reading the state after the update (inclusive decays) is far off."""
    import reference_rwkv6 as ref
    import torch
    from conftest import weights

    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(4))
    for backend in ("torch", "triton"):
        model = lmc.load(RWKV6, preset="tiny", seed=6, backend=backend, **overrides).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("att.wo"):
                    p.mul_(30.0)
            got = model(ids)
            want = ref.forward(weights(model), ids, model.config)
            inclusive = ref.forward(weights(model), ids, model.config, inclusive=True)
        got = got["logits"] if isinstance(got, dict) else got
        tol = 1e-5 * max(want.abs().max().item(), 1.0)
        assert (got - want).abs().max().item() < tol, backend
        assert (got - inclusive).abs().max().item() > 100 * tol, backend


def test_rwkv6_runs_chunked_kernels_in_training_and_a_constant_state_in_decode():
    """rwkv6: each layer's time mix is one chunked gated_linear_attention op in the training
    program (f32 and bf16), its backward one gated_linear_attention_bwd; the decode step
    keeps per layer one fp32 head_size x head_size state per head and the five shifted
    inputs, the mixer one recurrent op (f32 and bf16 weights, dynamic and static)."""
    from lmc.passes.mixed_precision import mixed_precision
    model = lmc.load(RWKV6, preset="tiny")
    for g in (model.graph, mixed_precision(model.graph, "bf16")):
        prog = _linear_attention_program(g, "gated_linear_attention_bwd")
        assert all(r["reason"].startswith("gated: ") for r in prog.forward_exec.graph.meta[
            "fusions"] if r["pass"] == "fuse_linear_attention")
    recs = _decode_runs_recurrent_ops(model.graph, [("shift", (1, 1, 64))] * 10
                                      + [("state", (1, 4, 16, 16))] * 2)
    assert all(r["reason"].startswith("gated: 4 heads, state 16x16") for r in recs)


def test_falcon_parallel_block_is_three_launches_a_layer_in_decode():
    """Falcon's x + attn(h) + mlp(h), h = LayerNorm(x): in the static decode step the
    LayerNorm is the prologue of one launch computing q, k, v and the MLP's up projection
    with its GELU (the k and v written into the caches), and the two output projections are
    summed in one accumulator with the residual added: with flash-decoding, three launches
    a layer and the head's."""
    from lmc.runtime.decoder import Decoder

    m = LmcModel(lmc.load(os.path.join(EXAMPLES, "falcon.yaml"), preset="tiny").graph,
                 backend="triton").eval()
    dec = Decoder(m, backend="triton", static=True, max_len=12)
    kinds = [n.attrs["kind"] for n in dec.graph.nodes if n.op.value == "fused"]
    assert kinds.count("matmul") == 2 * 2 + 1 and kinds.count("decode_attention") == 2, kinds
    recs = [r["reason"] for r in dec.graph.meta["fusions"]
            if r["pass"] == "fuse_matmul" and r["status"] == "fused"]
    assert recs.count("layernorm prologue + 4 matmuls sharing A, one launch + epilogues "
                      "gelu") == 2, recs
    assert recs.count("2 matmuls summed in one accumulator + add") == 2, recs
    assert recs.count("layernorm prologue + matmul") == 1, recs


def test_mamba2_decoded_convolution_is_one_kernel_a_layer():
    """mamba2's static decode step: each layer's short convolution (three shifted copies of
    xBC read from the d_conv - 1 slot history, masked where a slot's position is negative,
    plus the bias and silu) is one pointwise kernel computing its positions itself (no torch
    arange); SSD's state and the convolution's history are updated in place (the history
    by a kernel after every read of it), so the Decoder copies nothing back."""
    from lmc.bench import step_ops
    from lmc.runtime.decoder import Decoder

    m = LmcModel(lmc.load(os.path.join(EXAMPLES, "mamba2.yaml"), preset="tiny").graph,
                 backend="triton").eval()
    dec = Decoder(m, backend="triton", static=True, max_len=12)
    conv = [n for n in dec.graph.nodes if n.op is Op.FUSED and n.attrs["kind"] == "pointwise"
            and sum(u.op is Op.CONCAT for u in n.attrs["body"].nodes) == 3]
    assert len(conv) == 2 and all(
        sum(u.op is Op.IOTA for u in f.attrs["body"].nodes) == 3 and
        any(u.op is Op.SILU for u in f.attrs["body"].nodes) for f in conv), conv
    assert not any(n.op is Op.IOTA for n in dec.graph.nodes)
    # per layer: the in-projection, dt, dt * A, the convolution, x * dt, SSD, the skip,
    # the gate, the out-projection, the history's update in place; then the head; torch:
    # the embedding
    assert step_ops(dec.graph) == {"fused": 2 * 10 + 1, "torch": 1, "state_copies": 0}
    nodes = dec.graph.nodes
    upd = [i for i, n in enumerate(nodes) if n.op is Op.FUSED and
           n.attrs["kind"] == "shift_update"]
    assert len(upd) == 2
    for i in upd:                     # after every read of the old history, not at the end
        hist = nodes[i].inputs[0]
        assert max(j for j, n in enumerate(nodes) if hist in n.inputs and j != i) < i
    assert upd[0] < nodes.index(conv[1])       # layer 0's, before layer 1's convolution
