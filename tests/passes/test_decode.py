"""The decode pass: state layout per kind of sequence mixer, errors for what it cannot
decode, and prefill + steps = forward (the zoo-wide check runs in tests/zoo/test_verify_zoo)."""
import os

import pytest
import torch
from conftest import ZOO, decode_worst

import lmc
from lmc.errors import LmcError
from lmc.ir.dims import Dim
from lmc.passes.decode import decode_step
from lmc.runtime.decoder import Decoder, sample

LLAMA = os.path.join(ZOO, "llama.yaml")


def _states(path, **kw):
    c = lmc.compile_model(path, "tiny", kw)
    return decode_step(c.graph).states


def _static_worst(model, ids, k):
    """Prefill k tokens with the static (CUDA-graph) step, then one step per token: the worst
    logit difference to the forward's."""
    dec = Decoder(model, static=True, max_len=16)
    with torch.no_grad():
        full = model(ids)
        full = full["logits"] if isinstance(full, dict) else full
        st = dec.init_state(ids.shape[0])
        lg, st = dec(ids[:, :k], st)
        got = [lg]
        for t in range(k, ids.shape[1]):
            lg, st = dec(ids[:, t:t + 1], st)
            got.append(lg)
    return (torch.cat(got, 1) - full).abs().max().item()


def _decode_matches(model, ids, k):
    dec = Decoder(model)
    with torch.no_grad():
        full = model(ids)
        full = full["logits"] if isinstance(full, dict) else full
        return decode_worst(dec, ids, full, k)


def test_llama_caches_k_after_rope_and_v_per_layer():
    states = _states(LLAMA)
    assert [s.kind for s in states] == ["cache"] * 4  # K and V, two layers
    # named by what they hold, in the attention's scope (K's was its RoPE helper's,
    # layers.0.attn.rope_1.cache, and V's layers.0.attn.cache)
    assert [s.name for s in states] == [f"layers.{i}.attn.{kv}.cache" for i in range(2)
                                        for kv in "kv"]
    d, heads = 64, 4
    assert sum(s.bytes_per_token() for s in states) == 2 * 2 * d * 4  # 2 layers x (K+V) x f32
    k = [s for s in states if len(s.shape) == 4]
    assert len(k) == 2 and all(str(s.shape) == f"(B, {heads}, P, {d // heads})" for s in k)


@pytest.mark.parametrize("B,T,k", [(1, 1, 0), (1, 7, 1), (3, 13, 4), (2, 16, 15)])
def test_llama_prefill_then_steps_equal_forward(B, T, k):
    m = lmc.load(LLAMA, preset="tiny", seed=3).eval()
    ids = torch.randint(0, 512, (B, T))
    assert _decode_matches(m, ids, k) < 1e-5


def test_gqa_caches_only_the_kv_heads():
    """minimax's softmax layer (layer 1 of 2 at the tiny preset) is GQA: its K cache holds
    n_kv heads, not H."""
    c = lmc.compile_model(os.path.join(ZOO, "minimax.yaml"), "tiny")
    cfg = c.graph.meta["config"]
    states = decode_step(c.graph).states
    k_cache = [s for s in states if s.name.startswith("layers.1.") and len(s.shape) == 4]
    assert k_cache and all(s.shape[1] == cfg["kv_heads"] for s in k_cache)
    assert cfg["kv_heads"] < cfg["heads"]


def test_yoco_cross_decoder_shares_one_cache():
    states = _states(os.path.join(ZOO, "yoco.yaml"))
    cross = [s for s in states if "cross" in s.name]
    assert len(cross) == 2 and all(s.name.startswith("cross_kv.") for s in cross)


def test_mla_caches_only_the_latent_and_the_shared_rope_key():
    c = lmc.compile_model(os.path.join(ZOO, "optimus_prime.yaml"), "tiny")
    cfg = c.graph.meta["config"]
    states = decode_step(c.graph).states
    per_layer = sum(s.bytes_per_token() for s in states if s.name.startswith("layers.0."))
    assert per_layer == (cfg["latent"] + cfg["rope_dim"]) * 4  # [c_KV | k_R], f32


def test_running_mean_state_is_constant_in_length():
    states = _states(os.path.join(ZOO, "medit_one.yaml"))
    assert states and all(s.kind == "sum" and s.bytes_per_token() == 0 for s in states)


def test_a_mean_over_the_sequence_is_a_compile_error_with_its_line(tmp_path):
    src = open(LLAMA).read().replace(
        "- x = x + swiglu(rmsnorm(x, name='ffn_norm'), name='ffn')",
        "- x = x + swiglu(rmsnorm(x, name='ffn_norm'), name='ffn') - mean(x, 1)")
    bad = tmp_path / "leaky.yaml"
    bad.write_text(src)
    c = lmc.compile_model(str(bad), "tiny")
    with pytest.raises(LmcError) as e:
        decode_step(c.graph)
    msg = e.value.format()
    assert f"{bad}:" in msg and "mean" in msg and "sequence axis" in msg


@pytest.mark.parametrize("old, new, op", [
    # the mask left out: softmax over every key
    ("softmax(where(causal_mask(T), scores, -inf), -1)", "softmax(scores, -1)", "softmax"),
    # probabilities from a sigmoid, no mask: the p @ v contraction reads every key
    ("softmax(where(causal_mask(T), scores, -inf), -1)", "sigmoid(scores)", "matmul"),
])
def test_attention_over_unmasked_keys_is_a_compile_error_with_its_line(tmp_path, old, new, op):
    """Unmasked attention reads later positions: its step (one query over the cache) would
    not be its forward. It was derived as if masked and differed from the forward silently
    (lmc verify's checks failed; lmc compile --mode decode and lmc graph said nothing)."""
    src = open(LLAMA).read()
    assert old in src
    bad = tmp_path / "unmasked.yaml"
    bad.write_text(src.replace(old, new))
    c = lmc.compile_model(str(bad), "tiny")
    line = next(i for i, ln in enumerate(src.splitlines(), 1) if old in ln)
    with pytest.raises(LmcError) as e:
        decode_step(c.graph)
    assert e.value.loc.file == str(bad), e.value.format()
    assert f"cannot derive the decode step: {op} reduces over key positions that no causal " \
           "mask reached" in e.value.message
    if op == "softmax":
        assert e.value.loc.line == line, e.value.format()
    # a mask written by hand as a comparison of positions is a mask
    hand = ("softmax(where(reshape(iota(T), [T, 1]) >= reshape(iota(T), [1, T]), scores, "
            "-inf), -1)")
    ok = tmp_path / "hand.yaml"
    ok.write_text(src.replace(old, hand))
    m = lmc.load(str(ok), preset="tiny").eval()
    assert _decode_matches(m, torch.randint(0, 64, (1, 7)), 3) < 1e-5


# a model of two residual layers of a block `mixer` (the files below define it)
_MIXER_MODEL = """
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d], head: [d, vocab]}
  body:
    - x = embedding(embed, ids)
    - for: i
      in: layers
      body:
        - x = x + mixer(x * rsqrt(mean(x * x, -1) + eps), name='mix')
    - logits = x @ head
  outputs: [logits]
"""
SHIFT_YAML = """
name: shifts
config: {vocab: 37, d: 16, layers: 2, eps: 1.0e-5}
blocks:
  shift:                        # x one (or s) positions later; the first s read the pad
    args: [x, pad]
    options: {s: 1}
    body:
      - return concat([pad, x[:, :T - s]], 1)
  mixer:
    args: [x]
    params:
      conv: {shape: [4, d], init: normal(0.5)}
      w: [d, d]
      mu: {shape: [d], init: constant(0.3)}
      first: {shape: [1, 2, d], init: normal(1.0)}
    body:
      - zero = expand(cast(0, 'f32'), [B, 3, d])
      - c = x * conv[3] + shift(x, zero[:, :1], s=1) * conv[2]
      - c = c + shift(x, zero[:, :2], s=2) * conv[1] + shift(x, zero, s=3) * conv[0]
      - h = silu(c) @ w
      - h = h * mu + shift(h, expand(cast(0.5, 'f32'), [B, 1, d])) * (1.0 - mu)
      - return h + shift(h, expand(first, [B, 2, d]), s=2)
""" + _MIXER_MODEL


def test_token_shifts_and_a_short_convolution_decode_with_the_last_inputs_as_state(tmp_path):
    """A causal shift concat([pad, x[:, :T-s]], 1) (a token shift, a tap of a short causal
    convolution) decodes from a state of x's last S inputs, S its longest shift, shared by
    all its taps; positions before the first token read the pad, whatever it is (zeros, a
    constant, a learned parameter), for prefills shorter and longer than the shifts."""
    p = tmp_path / "shifts.yaml"
    p.write_text(SHIFT_YAML)
    m = lmc.load(str(p), seed=5).eval()
    for static in (False, True):
        states = decode_step(m.graph, static=static).states
        # per layer: x's 3 last inputs (one state for the convolution's three taps), then
        # one for each of the two shifted h
        assert [(s.kind, s.concrete(1)) for s in states] == \
            [("shift", [1, 3, 16]), ("shift", [1, 1, 16]), ("shift", [1, 2, 16])] * 2
        assert all(s.bytes_per_token() == 0 for s in states)
    ids = torch.randint(0, 37, (2, 9))
    for k in (0, 1, 2, 5):
        assert _decode_matches(m, ids, k) < 1e-5
    assert _static_worst(m, ids, 1) < 1e-5    # the same buffers replayed at every position


PADDED_CONV = """
name: conv_pad
config: {vocab: 37, d: 16, layers: 2, eps: 1.0e-5}
blocks:
  mixer:
    args: [x]
    params:
      conv: {shape: [4, d], init: normal(0.5)}
      w: [d, d]
    body:
      - xp = concat([expand(cast(0.25, 'f32'), [B, 3, d]), x], 1)
      - c = xp[:, 0:T] * conv[0] + xp[:, 1:T + 1] * conv[1] + xp[:, 2:T + 2] * conv[2]
      - return silu(c + xp[:, 3:T + 3] * conv[3]) @ w
""" + _MIXER_MODEL


def test_a_convolution_over_a_padded_sequence_decodes_as_shifts(tmp_path):
    """Pad once and take each tap's window, xp = concat([pad, x]); xp[:, j:T + j]: the
    pipeline writes the windows as shifts of x, so the decode step keeps the last 3 inputs
    (one state per layer) and equals the forward, prefills shorter than the pad included."""
    p = tmp_path / "conv_pad.yaml"
    p.write_text(PADDED_CONV)
    m = lmc.load(str(p), seed=6).eval()
    states = decode_step(m.graph).states
    assert [(s.kind, s.concrete(1)) for s in states] == [("shift", [1, 3, 16])] * 2
    ids = torch.randint(0, 37, (2, 9))
    for k in (0, 1, 2, 5):
        assert _decode_matches(m, ids, k) < 1e-5
    assert _static_worst(m, ids, 1) < 1e-5


def test_a_forward_shorter_than_the_pad_is_refused_at_its_line(tmp_path):
    """The windows' rewrite, x[:, :T - (P - j)], holds for T >= P - j only (at T = 1 torch
    would count the slice from the end and return a wrong-sized result): a shorter forward
    is one error naming the line and the least T, on both backends; T = 3 runs."""
    p = tmp_path / "conv_pad.yaml"
    p.write_text(PADDED_CONV)
    for backend in ("torch", "triton"):
        run = lmc.load(str(p), seed=6, backend=backend).eval()
        for T in (1, 2):
            with pytest.raises(LmcError, match=r"conv_pad.yaml:12:.*length T-\d = -\d at "
                                               rf"T={T}: this model needs T >= 3"):
                run(torch.randint(0, 37, (2, T)))
        assert run(torch.randint(0, 37, (2, 3))).shape == (2, 3, 37)


def test_the_length_check_is_not_carried_to_a_rebuilt_graph():
    """A pass's rebuilt graph copies meta: the lengths checked for the old node list must
    not stand for the new one (x[:T - 5] at T=3 ran and returned 4 rows)."""
    from lmc.frontend.builder import Builder
    from lmc.ir.graph import Graph
    from lmc.ops.reference import RefCtx
    from lmc.runtime.executor import run_graph

    def sliced(s):
        b = Builder({}, {})
        x = b.input("x", [Dim.sym("T"), 4], "f32")
        return Graph("g", b.nodes, {"y": b.slice(x, 0, 0, Dim.sym("T") - s).node})
    g1, x = sliced(1), torch.randn(3, 4)
    assert run_graph(g1, {"x": x}, RefCtx(dims={"T": 3}))["y"].shape == (2, 4)
    g2 = sliced(5)
    g2 = g1.with_nodes(g2.nodes, g2.outputs)
    with pytest.raises(LmcError, match="length T-5 = -2 at T=3: this model needs T >= 5"):
        run_graph(g2, {"x": x}, RefCtx(dims={"T": 3}))


SINK_FIRST = """
name: sink_first
config: {vocab: 37, d: 16, layers: 1, eps: 1.0e-5}
blocks:
  mixer:
    args: [x]
    params: {wq: [d, d], wk: [d, d], wv: [d, d], z: [1]}
    body:
      - s = where(causal_mask(T), (x @ wq) @ transpose(x @ wk, -2, -1), -inf)
      - p = softmax(concat([expand(reshape(z, [1, 1, 1]), [B, T, 1]), s], -1), -1)
      - return p[..., 1:] @ (x @ wv)
""" + _MIXER_MODEL


def test_an_attention_sink_written_first_decodes(tmp_path):
    """An attention sink written first (the mirror of gpt-oss's sink-last form; it was an
    error, 'concatenates along the key axis'): canonicalize rewrites it as the sink-last form,
    so the step reads the scores over the cache; decode = forward, dynamic and static, on both
    backends, and the same decode attention as sink-last."""
    p = tmp_path / "sink_first.yaml"
    p.write_text(SINK_FIRST)
    m = lmc.load(str(p), seed=3).eval()
    tri = lmc.load(str(p), backend="triton", seed=3).eval()
    tri.load_state_dict(m.state_dict())
    assert [s.kind for s in decode_step(m.graph).states] == ["cache"] * 2
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)
    for model, backend in ((m, "torch"), (tri, "triton")):
        for static in (False, True):
            dec = Decoder(model, backend, static=static, **({"max_len": 12} if static else {}))
            for k in (0, 1, 5):
                assert decode_worst(dec, ids, full, k) < 1e-5, (backend, static, k)
    # a concat along the keys that is not a sink is still an error naming the forms that decode
    p.write_text(SINK_FIRST.replace("p[..., 1:]", "p[..., :T]"))
    with pytest.raises(LmcError, match=r"sink_first.yaml:10:.*concatenates along the key axis"
                                       r".*causal shift.*attention sink"):
        decode_step(lmc.load(str(p)).graph)


GLA_YAML = """
name: gla
config: {vocab: 37, d: 32, layers: 2, heads: 2, dk: 8, dv: 16, eps: 1.0e-5}
blocks:
  mixer:                        # gated linear attention, per-channel data-dependent decays
    args: [x]
    params: {wq: [d, heads * dk], wk: [d, heads * dk], wv: [d, heads * dv],
             wg: [d, heads * dk], wo: [heads * dv, d]}
    body:
      - q = permute(reshape(x @ wq, [B, T, heads, dk]), [0, 2, 1, 3])
      - k = permute(reshape(x @ wk, [B, T, heads, dk]), [0, 2, 1, 3])
      - v = permute(reshape(x @ wv, [B, T, heads, dv]), [0, 2, 1, 3])
      - g = permute(reshape(logsigmoid(x @ wg) / 4.0, [B, T, heads, dk]), [0, 2, 1, 3])
      - G = cumsum(g, 2)
      - diff = reshape(G, [B, heads, T, 1, dk]) - reshape(G, [B, heads, 1, T, dk])
      - D = exp(where(reshape(causal_mask(T), [T, T, 1]), diff, -inf))
      - A = sum(reshape(q, [B, heads, T, 1, dk]) * reshape(k, [B, heads, 1, T, dk]) * D, -1, False)
      - return reshape(permute(A @ v, [0, 2, 1, 3]), [B, T, heads * dv]) @ wo
""" + _MIXER_MODEL


def test_gated_linear_attention_keeps_a_constant_dk_by_dv_state(tmp_path):
    """Per-channel decays (GLA, RWKV-6-style), written with [.., T, T, d_k] products: the
    decode step carries S' = diag(exp(g_t)) S + k_t^T v_t, fp32, d_k x d_v per head (no K, V
    cache), also for the bf16 decoder's weights; prefill + steps equal the forward."""
    from lmc.passes.mixed_precision import low_precision_weights
    p = tmp_path / "gla.yaml"
    p.write_text(GLA_YAML)
    m = lmc.load(str(p), seed=7).eval()
    for graph in (m.graph, low_precision_weights(m.graph, "bf16")):
        for static in (False, True):
            states = decode_step(graph, static=static).states
            assert [(s.kind, s.dtype.value, s.concrete(1)) for s in states] == \
                [("state", "f32", [1, 2, 8, 16])] * 2
    ids = torch.randint(0, 37, (2, 9))
    for k in (0, 1, 5):
        assert _decode_matches(m, ids, k) < 1e-5
    assert _static_worst(m, ids, 2) < 1e-5
    from lmc.verify import format_rows, verify
    rows = verify(str(p), skip=["passes", "causal"])   # the triton decoder's steps too
    assert all(r.ok for r in rows), format_rows(rows)
    assert "triton static k 5" in rows[-1].detail
    assert "state 2 tensors, 0 B/token + 2,048 B/sequence" in rows[-1].detail, rows[-1].detail


def test_shift_decode_on_the_triton_backend(tmp_path):
    """lmc verify: the triton decoder (dynamic and static steps) equals the forward too."""
    from lmc.verify import format_rows, verify
    p = tmp_path / "shifts.yaml"
    p.write_text(SHIFT_YAML)
    rows = verify(str(p))
    assert all(r.ok and not r.skipped for r in rows), format_rows(rows)
    assert "triton k in [1, 5]" in rows[-1].detail and "triton static k 5" in rows[-1].detail
    assert "state 6 tensors, 0 B/token + 768 B/sequence" in rows[-1].detail, rows[-1].detail


@pytest.mark.parametrize("line,what", [
    # the pad comes after the slice: each position sees the next one
    ("- h = concat([x[:, 1:], expand(cast(0, 'f32'), [B, 1, d])], 1) @ w", "slices along"),
    # the pad is the first token, a slice that is not a shift's
    ("- h = concat([x[:, :1], x[:, :-1]], 1) @ w", "slices along"),
    # the shifted slice read by something other than the shift's concat
    ("- h = concat([expand(cast(0, 'f32'), [B, 1, d]), x[:, :T - 1] * 2.0], 1) @ w",
     "slices along"),
])
def test_shifts_that_are_not_causal_are_compile_errors_with_their_line(tmp_path, line, what):
    src = SHIFT_YAML.replace("      - h = silu(c) @ w", "      " + line)
    bad = tmp_path / "bad.yaml"
    bad.write_text(src)
    with pytest.raises(LmcError) as e:
        decode_step(lmc.compile_model(str(bad), None).graph)
    msg = e.value.format()
    assert f"{bad}:" in msg and what in msg and "causal shift" in msg, msg


def test_context_past_max_seq_is_refused():
    m = lmc.load(LLAMA, preset="tiny", max_seq=8).eval()
    dec = Decoder(m)
    _, st = dec(torch.zeros(1, 8, dtype=torch.long), dec.init_state(1))
    with pytest.raises(LmcError, match="max_seq"):
        dec(torch.zeros(1, 1, dtype=torch.long), st)


def test_sampling_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample(logits, 0.0, 0, 1.0, g) == 1                       # greedy
    assert {sample(logits, 1.0, 1, 1.0, g) for _ in range(20)} == {1}  # top-1
    assert {sample(logits, 1.0, 2, 1.0, g) for _ in range(200)} == {1, 3}
    assert {sample(logits, 1.0, 0, 0.3, g) for _ in range(50)} == {1}  # nucleus of one
    a = [sample(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1                                           # seeded: reproducible


@pytest.mark.parametrize("name,prefix", [("yoco.yaml", "self_layers."),
                                         ("minimax.yaml", "layers.0.")])
def test_decayed_linear_attention_keeps_a_constant_dk_by_dv_state(name, prefix):
    """retention (yoco's self-decoder) and lightning (minimax layer 0): no per-token cache,
    one d_k x d_v state per head, and prefill of a ragged chunk + steps = forward."""
    path = os.path.join(ZOO, name)
    states = [s for s in _states(path) if s.name.startswith(prefix)]
    mix = [s for s in states if s.kind == "state"]
    assert mix and all(s.bytes_per_token() == 0 for s in states)
    assert all(len(s.shape) == 4 and s.shape[0] == Dim.sym("B") for s in mix)  # [B, H, dk, dv]
    m = lmc.load(path, preset="tiny", seed=1).eval()
    ids = torch.randint(0, m.config["vocab"], (2, 13))
    for k in (0, 7, 13):
        assert _decode_matches(m, ids, k) < 1e-5


def test_projections_of_new_tokens_only_are_not_absorbed():
    """absorb moves an up-projection only off a cached latent: yoco's retention values
    (x @ W_v of the new tokens) stay v = x @ W_v, since carrying W_v into the state products
    would cost d_k times more per step than forming v."""
    for path in ("yoco.yaml", "minimax.yaml", "llama.yaml"):
        m = lmc.load(os.path.join(ZOO, path), preset="tiny")
        for static in (False, True):
            assert decode_step(m.graph, static=static).graph.meta["absorbed"] == 0, path


def test_a_concat_of_keys_is_cached_whole_only_when_its_pieces_are_its_alone(tmp_path):
    """minimax's keys [rope(k[:R]) | k[R:]]: one cache of the concat (the pieces read by
    it alone). With values [k[R:] | k[R:]] the pass-through piece is read twice: a cache per
    piece, the values' and the keys' shared, as before (a whole cache of each concat would
    hold it three times). Decode = forward both ways."""
    from conftest import minimax_variant
    for path, want in [(os.path.join(ZOO, "minimax.yaml"),
                        [("layers.1.attn.k.cache", 16), ("layers.1.attn.v.cache", 32)]),
                       (minimax_variant(tmp_path, "shared"),
                        [("layers.1.attn.k.cache", 8), ("layers.1.attn.kv.cache", 8)])]:
        m = lmc.load(path, preset="tiny", seed=4).eval()
        states = decode_step(m.graph).states
        assert [(s.name, s.shape[-1]) for s in states if ".attn." in s.name
                and "decayed" not in s.name] == want
        ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
        assert _decode_matches(m, ids, 4) < 1e-5


def _projections_over_the_cache(g):
    """Matmuls of a parameter (or its cast) by a value that spans the cache (through views
    and casts): a projection recomputed over every cached position."""
    from lmc.ir.ops import Op
    views = (Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.CAST)

    def spans(x):
        while x.op in views:
            x = x.inputs[0]
        return (x.op is Op.CONCAT and any(i.op is Op.INPUT for i in x.inputs)) or \
            (x.op is Op.INDEX_COPY and x.inputs[0].op is Op.INPUT)
    out = []
    for n in g.nodes:
        if n.op is Op.MATMUL:
            w = n.inputs[1]
            w = w.inputs[0] if w.op is Op.CAST else w
            if w.op is Op.PARAM and spans(n.inputs[0]):
                out.append(n)
    return out


MIXED_LAYERS = """
name: mixed
config: {vocab: 512, d: 64, heads: 8, kv_heads: 4, head_dim: 32, eps: 1.0e-6, max_seq: 64}
presets: {tiny: {}}
blocks:
  rmsnorm:
    args: [x]
    params: {weight: {shape: [d], init: ones}}
    body:
      - return x * rsqrt(mean(x * x, -1) + eps) * weight
  heads:                        # [B, T, n * head_dim] -> [B, n, T, head_dim]
    args: [x]
    body:
      - return permute(reshape(x, [B, T, -1, head_dim]), [0, 2, 1, 3])
  attend:
    args: [q, k, v]
    params: {wo: [heads * head_dim, d]}
    body:
      - s = (q @ transpose(k, -2, -1)) * head_dim ** -0.5
      - probs = softmax(where(causal_mask(T), s, -inf), -1)
      - return reshape(permute(probs @ v, [0, 2, 1, 3]), [B, T, heads * head_dim]) @ wo
  mha:                          # no RoPE, one kv head per query head
    args: [x]
    params: {wq: [d, heads * head_dim], wk: [d, heads * head_dim], wv: [d, heads * head_dim]}
    body:
      - return attend(heads(x @ wq), heads(x @ wk), heads(x @ wv))
  gqa:                          # no RoPE, kv heads broadcast
    args: [x]
    params: {wq: [d, heads * head_dim], wk: [d, kv_heads * head_dim],
             wv: [d, kv_heads * head_dim]}
    body:
      - k = reshape(expand(reshape(heads(x @ wk), [B, kv_heads, 1, T, head_dim]),
                           [B, kv_heads, heads / kv_heads, T, head_dim]), [B, heads, T, head_dim])
      - v = reshape(expand(reshape(heads(x @ wv), [B, kv_heads, 1, T, head_dim]),
                           [B, kv_heads, heads / kv_heads, T, head_dim]), [B, heads, T, head_dim])
      - return attend(heads(x @ wq), k, v)
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d], wpe: [max_seq, d]}
  body:
    - x = embedding(embed, ids) + embedding(wpe, iota(T))
    - x = x + mha(rmsnorm(x, name='n0'), name='a0')
    - x = x + gqa(rmsnorm(x, name='n1'), name='a1')
    - logits = rmsnorm(x, name='nf') @ transpose(embed, 0, 1)
  outputs: [logits]
"""


@pytest.mark.parametrize("static", [False, True])
def test_a_layer_after_an_absorbed_one_caches_its_unabsorbed_projections(tmp_path, static):
    """Layer a0 (8 heads, no RoPE, k and v 256 wide over d = 64): both up-projections are
    absorbed, its normalised input is the cache. Layer a1 (4 kv heads broadcast: not
    absorbable) caches k and v: its projections were missed when a0's absorb had rebuilt
    them (new nodes), and ran over every cached position each step (review of 46402ba)."""
    path = tmp_path / "mixed.yaml"
    path.write_text(MIXED_LAYERS)
    m = lmc.load(str(path), preset="tiny", seed=2).eval()
    step = decode_step(m.graph, static=static)
    assert step.graph.meta["absorbed"] == 2
    assert [(s.name, s.shape[-1]) for s in step.states] == [
        ("n0.kv.cache", 64), ("a1.k.cache", 128), ("a1.v.cache", 128)]
    assert not _projections_over_the_cache(step.graph)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    assert (_static_worst(m, ids, 4) if static else _decode_matches(m, ids, 4)) < 1e-5


@pytest.mark.parametrize("static", [False, True])
def test_a_widening_projection_that_is_not_absorbed_caches_its_output(static):
    """Gemma 2 with kv_heads * head_dim (128) above d (64), as in Gemma-7B: the value
    projection widens, but its up-projection cannot be absorbed (the kv heads' broadcast
    stands between it and the attention), so the cache holds v itself, not the normalised
    input with v recomputed from it over every cached position each step (as it did); the
    keys were cached after RoPE either way. No projection reads the cache; decode = forward;
    the triton step fuses both attentions."""
    path = os.path.join(os.path.dirname(ZOO), "examples", "gemma2.yaml")
    m = lmc.load(path, preset="tiny", seed=1, kv_heads=4, head_dim=32).eval()
    step = decode_step(m.graph, static=static)
    assert step.graph.meta["absorbed"] == 0
    v = [s for s in step.states if ".v." in s.name]
    assert [s.name for s in v] == ["layers.0.attn.v.ring", "layers.1.attn.v.cache"]
    assert all(s.shape[-1] == 128 and s.source.startswith("matmul") for s in v), v
    assert not _projections_over_the_cache(step.graph)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    worst = _static_worst(m, ids, 4) if static else _decode_matches(m, ids, 4)
    assert worst < 1e-5
    tri = lmc.load(path, preset="tiny", seed=1, kv_heads=4, head_dim=32,
                   backend="triton").eval()
    dec = Decoder(tri, backend="triton", static=static, max_len=12 if static else None)
    assert [r["status"] for r in dec.graph.meta["fusions"]
            if r["pass"] == "fuse_decode_attention"] == ["fused", "fused"]
    cached = step.graph.meta["widening_cached"]
    assert len(cached) == 2 and all(w.endswith("examples/gemma2.yaml:71:29") for w in cached)


def test_compile_says_which_projections_are_absorbed_or_cached_by_their_outputs(capsys):
    """lmc compile --mode decode: MLA's up-projections absorbed (optimus_prime), gemma2's
    widening value projections (kv width 128 above d 64) cached by their outputs; neither
    line for llama; the JSON's decode section has both figures."""
    import json

    from lmc.cli import main
    gemma2 = os.path.join(os.path.dirname(ZOO), "examples", "gemma2.yaml")
    for args, absorbed, cached in [
            ([os.path.join(ZOO, "optimus_prime.yaml")], 4, []),
            ([gemma2, "--set", "kv_heads=4", "head_dim=32"], 0, ["gemma2.yaml:71:29"] * 2),
            ([LLAMA], 0, [])]:
        assert main(["compile", *args, "--preset", "tiny", "--mode", "decode"]) == 0
        out = capsys.readouterr().out
        assert ("absorbed    4 up-projections of a cached latent" in out) == (absorbed > 0)
        assert ("cached      2 widening projections by their outputs, not absorbable" in out) \
            == bool(cached), out
        assert main(["compile", *args, "--preset", "tiny", "--mode", "decode", "--json"]) == 0
        d = json.loads(capsys.readouterr().out)["decode"]
        assert d["absorbed"] == absorbed and len(d["widening_cached"]) == len(cached)
        assert all(w.startswith("matmul at ") and w.endswith(c)
                   for w, c in zip(d["widening_cached"], cached))


def test_mla_absorbs_w_uk_into_the_query_and_w_uv_into_the_output():
    """The step graph never up-projects the cached latent: W_UK multiplies the query and
    W_UV the attention-weighted latent; equal to the unabsorbed step graph and to forward."""
    from lmc.ir.ops import Op
    m = lmc.load(os.path.join(ZOO, "optimus_prime.yaml"), preset="tiny", seed=2).eval()
    absorbed = decode_step(m.graph)
    plain = decode_step(m.graph, absorb_projections=False)

    def up_projections(step):  # matmuls of something by w_uk / w_uv as written in the YAML
        return [n for n in step.graph.nodes if n.op is Op.MATMUL and n.inputs[1].op is Op.PARAM
                and n.inputs[1].attrs["name"].split(".")[-1] in ("w_uk", "w_uv")]
    layers = m.config["layers"]
    assert absorbed.graph.meta["absorbed"] == 2 * layers
    assert up_projections(absorbed) == [] and len(up_projections(plain)) == 2 * layers
    ids = torch.randint(0, m.config["vocab"], (2, 9))
    assert _decode_matches(m, ids, 4) < 1e-5
    dec_a, dec_p = Decoder(m), Decoder(m)
    dec_p.step, dec_p.graph = plain, plain.graph
    la, _ = dec_a(ids, dec_a.init_state(2))
    lp, _ = dec_p(ids, dec_p.init_state(2))
    assert (la - lp).abs().max().item() < 1e-5


def _rnn_yaml(tmp_path, h0="0.5", use_final=False):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from ops.test_scan import RNN_YAML
    src = RNN_YAML.replace("expand(cast(0, 'f32'), [B, h])", f"expand(cast({h0}, 'f32'), [B, h])")
    if use_final:
        src = src.replace("- return x + ys @ wo",
                          "- return x + ys @ wo + reshape(hT @ wo, [B, 1, d])")
    p = tmp_path / "rnn.yaml"
    p.write_text(src)
    return str(p)


def test_scan_decodes_with_its_carry_as_state(tmp_path):
    m = lmc.load(_rnn_yaml(tmp_path), seed=4).eval()
    states = decode_step(m.graph).states
    assert [s.kind for s in states] == ["carry", "carry"]  # one per layer, constant size
    assert all(s.bytes_per_token() == 0 for s in states)
    ids = torch.randint(0, 37, (2, 9))
    for k in (0, 1, 5):  # k = 0: the first step must start from carry0 (0.5), not zeros
        assert _decode_matches(m, ids, k) < 1e-5


def test_scan_static_step_equals_the_forward(tmp_path):
    """The static step (a scan's type is a tuple of types: the check that no shape depends on
    P reads each of them) replays to the forward's logits."""
    m = lmc.load(_rnn_yaml(tmp_path), seed=4).eval()
    step = decode_step(m.graph, static=True)
    assert [s.kind for s in step.states] == ["carry", "carry"]
    ids = torch.randint(0, 37, (2, 9))
    assert _static_worst(m, ids, 4) < 1e-5


def test_a_scan_final_carry_feeding_logits_is_a_compile_error(tmp_path):
    m = lmc.load(_rnn_yaml(tmp_path, use_final=True))
    with pytest.raises(LmcError, match="final carry"):
        decode_step(m.graph)


# -- sliding-window attention: a W-slot ring buffer ------------------------------------------------
YOCO = os.path.join(ZOO, "yoco.yaml")


def test_sliding_window_keeps_a_w_slot_ring_per_layer():
    """yoco's windowed self-decoder keeps K and V in W slots (constant in the context); its
    cross-decoder's one global K,V still grows."""
    W = 16
    c = lmc.compile_model(YOCO, "tiny", {"sliding_window": W})
    cfg = c.graph.meta["config"]
    states = decode_step(c.graph).states
    rings = [s for s in states if s.kind == "ring"]
    assert len(rings) == 2 * cfg["half"] and all(s.name.startswith("self_layers.") for s in rings)
    assert all(s.bytes_per_token() == 0 and W in s.shape for s in rings)
    k = [s for s in rings if len(s.shape) == 4]   # [B, heads, W, head_dim]: per head, not per q
    assert k and all(s.shape[1:] == (cfg["ret_heads"], W, cfg["ret_head_dim"]) for s in k)
    assert {s.name for s in states if s.kind == "cache"} == {"cross_kv.k.cache",
                                                             "cross_kv.v.cache"}


def test_compile_reports_the_ring_as_constant_per_sequence(capsys):
    import json

    from lmc.cli import main
    assert main(["compile", YOCO, "--set", "sliding_window=16", "--mode", "decode",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["decode"]
    rings = [s for s in d["states"] if s["kind"] == "ring"]
    assert rings and all(s["bytes_per_token"] == 0 and s["bytes_per_sequence"] > 0
                         for s in rings)
    # only the cross-decoder's global K,V grows: d * 2 (K and V) * 4 bytes per token
    assert d["bytes_per_token"] == 2 * 1024 * 4


@pytest.mark.parametrize("W", [1, 4, 9, 16])
def test_sliding_window_decode_equals_forward(W):
    """Windows smaller and larger than the prompt (k) and than the generated part (13 - k),
    prompts longer than the ring included."""
    m = lmc.load(YOCO, preset="tiny", seed=1, sliding_window=W).eval()
    ids = torch.randint(0, m.config["vocab"], (2, 13), generator=torch.Generator().manual_seed(W))
    for k in (0, 1, 3, 9, 13):
        assert _decode_matches(m, ids, k) < 1e-5, (W, k)


def test_ring_slots_hold_the_last_w_positions_at_position_mod_w():
    """After a 13-token prefill, a 4-slot ring holds positions 9..12, position p in slot p mod 4:
    the same vectors a 16-slot ring (holding every position) has at those positions (layer 0's
    K and V do not depend on the window). Token by token gives the same ring."""
    def rings(W, chunks):
        m = lmc.load(YOCO, preset="tiny", seed=5, sliding_window=W).eval()
        dec = Decoder(m)
        st = dec.init_state(1)
        ids = torch.arange(13).reshape(1, 13) * 7 % 512
        at = 0
        for n in chunks:
            _, st = dec(ids[:, at:at + n], st)
            at += n
        return {s.name: (st[s.name], s.axis) for s in dec.step.states if s.kind == "ring"}
    small, big = rings(4, [13]), rings(16, [13])
    assert small.keys() == big.keys()
    for name, (r4, ax) in small.items():
        r16 = big[name][0]
        for p in range(9, 13):
            assert torch.equal(r4.select(ax, p % 4), r16.select(ax, p)), (name, p)
    stepped = rings(4, [5, 1, 1, 6])
    for name, (r4, _) in small.items():
        torch.testing.assert_close(stepped[name][0], r4, rtol=0, atol=1e-6)


def test_sliding_window_decode_on_the_triton_backend():
    m = lmc.load(YOCO, preset="tiny", seed=2, sliding_window=3, backend="triton").eval()
    dec = Decoder(m, backend="triton")
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(ids)
        full = full["logits"] if isinstance(full, dict) else full
    lg, st = dec(ids[:, :4], dec.init_state(1))                # prompt longer than the window
    got = [lg]
    for t in range(4, 6):
        lg, st = dec(ids[:, t:t + 1], st)
        got.append(lg)
    assert (torch.cat(got, 1) - full).abs().max().item() < 1e-5


def test_scores_written_as_a_transposed_k_q_product_get_a_clear_error(tmp_path):
    """transpose(k @ transpose(q)) is q @ transpose(k), but the decode pass takes a score
    matmul's left operand's positions as the queries: the error says so and how to write it,
    at the line of the mask that reads the swapped scores."""
    p = tmp_path / "kq.yaml"
    p.write_text("""\
config: {vocab: 97, d: 32}
presets: {tiny: {}}
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d], wq: [d, d], wk: [d, d], lm_head: [d, vocab]}
  body:
    - x = embedding(embed, ids)
    - q = x @ wq
    - k = x @ wk
    - scores = transpose(k @ transpose(q, -2, -1), -2, -1) * 0.17
    - probs = softmax(where(causal_mask(T), scores, -inf), -1)
    - logits = (probs @ x) @ lm_head
  outputs: [logits]
""")
    m = lmc.load(str(p))
    with pytest.raises(LmcError, match=r"kq.yaml:11:.*query and key axes disagree.*"
                                       r"q @ transpose\(k\)"):
        decode_step(m.graph)


CUMPROD = """\
config: {{vocab: 11, d: 8}}
model:
  inputs: {{ids: [B, T]}}
  params: {{embed: [vocab, d], w: [d, d], head: [d, vocab]}}
  body:
    - x = embedding(embed, ids)
    - g = cumprod(sigmoid(x @ w), {axis})
    - logits = (x + g) @ head
  outputs: [logits]
"""


def test_a_cumprod_decodes_along_features_and_along_time(tmp_path):
    """Along the features a cumprod is position-wise; along time (before: 'cumprod runs along
    the sequence axis; ... no single-step form yet') its state is the product so far, one
    value per sequence and feature ("prod", 1 in its place at position 0 as states start at
    zero): prefills of 0, 1 and 4 tokens then single steps equal the forward, on both backends,
    dynamic and static, and a second sequence in a fresh state starts over."""
    p = tmp_path / "f.yaml"
    p.write_text(CUMPROD.format(axis=-1))
    m = lmc.load(str(p), seed=2).eval()
    ids = torch.randint(0, 11, (2, 7))
    for k in (0, 3):
        assert _decode_matches(m, ids, k) < 1e-5
    p.write_text(CUMPROD.format(axis=1))
    m = lmc.load(str(p), seed=2).eval()
    states = decode_step(m.graph).states
    assert [(s.kind, str(s.shape)) for s in states] == [("prod", "(B, 1, 8)")]
    tri = lmc.load(str(p), backend="triton", seed=2).eval()
    tri.load_state_dict(m.state_dict())
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(ids)
    assert full[:, -1].sub(full[:, 0]).abs().max() > 1e-3     # the product moves the logits
    for model, backend in ((m, "torch"), (tri, "triton")):
        for static in (False, True):
            dec = Decoder(model, backend, static=static, **({"max_len": 12} if static else {}))
            for k in (0, 1, 4):
                assert decode_worst(dec, ids, full, k) < 1e-5, (backend, static, k)
