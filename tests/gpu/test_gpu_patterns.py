"""On a GPU (marked `gpu`, skipped without CUDA; run with `pytest -m gpu`): every zoo model on
the triton backend with its pattern passes, the hand-written templates compiled natively (the
CPU suite runs them only in Triton's interpreter).

- fp32 training step (loss and every gradient) equals the torch backend's (the oracle);
- the bf16 program (mixed-precision pass) stays close to its oracle: the fp32 program for
  dense models; the bf16 torch program for MoE models, whose router picks are only defined
  against the same rounding;
- decode on the triton backend (fused decode attention / recurrent linear attention), static
  with CUDA-graph capture, equals the full forward across replays.
"""
import os

import pytest
import torch
from conftest import ZOO, decode_worst

import lmc
from lmc.codegen.program import apply_patterns
from lmc.passes import run_pipeline
from lmc.passes.loss import with_loss
from lmc.passes.mixed_precision import mixed_precision
from lmc.runtime.decoder import Decoder
from lmc.runtime.module import LmcModel
from lmc.verify import off_default

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (file, overrides, the pattern kinds its triton program must hold, MoE routing)
MODELS = [
    ("llama.yaml", {}, {"rope_attention"}, False),
    ("blues01.yaml", {}, {"rope_attention", "moe_layer"}, True),
    ("minimax.yaml", {}, {"rope_attention", "linear_attention", "moe_layer"}, True),
    ("yoco.yaml", {}, {"rope_attention", "linear_attention"}, False),
    ("yoco.yaml", {"sliding_window": 5}, {"rope_attention"}, False),
    ("optimus_prime.yaml", {}, {"rope_attention"}, False),
    ("medit_one.yaml", {"moe": 1}, {"moe_gating"}, True),
    # outside the zoo (examples/): no RoPE with a biased q/k/v projection, soft-capped
    # scores with QK-norm (a cap that saturates), ALiBi (with a window too; BLOOM's form),
    # a sigmoid MoE router, SSD (linear attention with q and k shared by the heads),
    # attention sinks, differential attention, gated linear attention (GLA's, RWKV-6's)
    ("examples/gpt2.yaml", {}, {"rope_attention"}, False),
    ("examples/gemma2.yaml", {"attn_cap": 1.5}, {"rope_attention"}, False),
    # kv width (4 x 32) above d (64): v cached by its projection's output, not recomputed
    ("examples/gemma2.yaml", {"kv_heads": 4, "head_dim": 32}, {"rope_attention"}, False),
    ("examples/mpt.yaml", {}, {"rope_attention"}, False),
    ("examples/mpt.yaml", {"window": 5}, {"rope_attention"}, False),
    ("examples/bloom.yaml", {}, {"rope_attention"}, False),
    ("examples/deepseek_moe.yaml", {}, {"rope_attention", "moe_layer"}, True),
    ("examples/mamba2.yaml", {}, {"linear_attention"}, False),
    ("examples/gpt_oss.yaml", {}, {"rope_attention"}, False),
    ("examples/diff_transformer.yaml", {}, {"rope_attention"}, False),
    ("examples/gla.yaml", {}, {"gated_linear_attention"}, False),
    ("examples/rwkv6.yaml", {}, {"gated_linear_attention"}, False),
    # the parallel block with MQA (LayerNorm prologues, both output projections summed)
    ("examples/falcon.yaml", {}, {"rope_attention"}, False),
    # RoPE as pairs and the kv repeat before the heads' transpose (canonicalize moves it)
    ("examples/llama3_meta.yaml", {}, {"rope_attention"}, False),
]
IDS = [f"{os.path.basename(f)[:-5]}{''.join(f'-{k}{v}' for k, v in o.items())}"
       for f, o, _, _ in MODELS]


def _file(path):
    """A zoo file, or one of examples/ (named with that prefix)."""
    return os.path.join(ZOO, "..", path) if path.startswith("examples/") else \
        os.path.join(ZOO, path)


@pytest.fixture(autouse=True)
def _no_tf32(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 oracle is ieee fp32


def _graph(path, sets, precision="f32"):
    g = lmc.load(_file(path), preset="tiny", **sets).graph
    return run_pipeline(with_loss(mixed_precision(g, precision)))


def _batch(vocab, B=2, T=67):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, vocab, (B, T), generator=g).cuda(),
            torch.randint(0, vocab, (B, T), generator=g).cuda())


def _step(graph, backend, ids, targets):
    m = LmcModel(graph, seed=5, backend=backend)
    off_default(m, 5)     # biases, norm weights, sinks, selection biases off their inits
    m = m.cuda()
    out = m(ids, targets=targets)
    # random-direction upstream gradient on the logits besides the loss
    w = torch.randn(out["logits"].shape, generator=torch.Generator().manual_seed(1)).cuda()
    (out["loss"] + (out["logits"].float() * w).mean()).backward()
    return m, out, {k: p.grad for k, p in m.named_parameters() if p.grad is not None}


def _kinds(graph):
    return {n.attrs["kind"] for n in apply_patterns(graph).nodes if n.op.value == "fused"}


def decode_fused(dec, kinds) -> bool:
    """The decoder's step holds a fused decode op of the model's sequence mixer (any model
    whose training program holds more than MoE kinds). tests/test_gpu_expectations.py checks
    this and the kinds on CPU, so a wrong expectation is not found on a lent GPU."""
    fused = {n.attrs["kind"] for n in dec.graph.nodes if n.op.value == "fused"}
    return bool(fused & {"decode_attention", "decode_linear_attention",
                         "decode_gated_linear_attention"} or not kinds - {"moe_layer",
                                                                         "moe_gating"})


@pytest.mark.parametrize("path,sets,kinds,moe", MODELS, ids=IDS)
def test_fp32_training_step_equals_the_oracle(path, sets, kinds, moe):
    g = _graph(path, sets)
    assert kinds <= _kinds(g)
    ids, targets = _batch(g.outputs["logits"].type.shape[-1])
    _, ot, gt = _step(g, "triton", ids, targets)
    _, oo, go = _step(g, "torch", ids, targets)
    assert gt.keys() == go.keys()
    assert abs(ot["loss"].item() - oo["loss"].item()) <= 1e-5 * abs(oo["loss"].item())
    worst = max((float((gt[k] - go[k]).abs().max() / go[k].abs().max().clamp_min(1e-30)), k)
                for k in go)
    assert worst[0] < 1e-4, worst


@pytest.mark.parametrize("path,sets,kinds,moe", MODELS, ids=IDS)
def test_bf16_program_is_close_to_its_oracle(path, sets, kinds, moe):
    g16 = _graph(path, sets, "bf16")
    assert kinds <= _kinds(g16)
    ref = _graph(path, sets, "bf16" if moe else "f32")
    ids, targets = _batch(g16.outputs["logits"].type.shape[-1])
    _, o16, g16s = _step(g16, "triton", ids, targets)
    _, oref, grefs = _step(ref, "torch", ids, targets)
    assert all(g.dtype == torch.float32 for g in g16s.values())
    assert abs(o16["loss"].item() - oref["loss"].item()) < 2 ** -7 * abs(oref["loss"].item())
    # per parameter, the error relative to the gradient's norm (bf16 keeps 8 bits)
    worst = max((float((g16s[k] - grefs[k]).norm() / grefs[k].norm().clamp_min(1e-30)), k)
                for k in grefs)
    assert worst[0] < 5e-2, worst


@pytest.mark.parametrize("path,sets,kinds,moe", MODELS, ids=IDS)
def test_triton_static_decode_replays_equal_forward(path, sets, kinds, moe):
    m = lmc.load(_file(path), preset="tiny", backend="triton", seed=8, **sets)
    oracle = lmc.load(_file(path), preset="tiny", seed=8, **sets)
    off_default(m, 8)
    off_default(oracle, 8)            # the same values in both
    m, oracle = m.eval().cuda(), oracle.eval().cuda()
    ids = torch.randint(0, m.config["vocab"], (2, 13),
                        generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        full = oracle(ids)
    full = full["logits"] if isinstance(full, dict) else full
    dec = Decoder(m, "triton", static=True, max_len=16)
    assert decode_fused(dec, kinds)
    for k in (0, 1, 5):
        err = decode_worst(dec, ids, full, k)      # one capture, then replays
        assert dec.cuda_graph, dec.cuda_graph_off
        assert err < 1e-4, (k, err)


@pytest.mark.parametrize("path,sets,kinds,moe", MODELS, ids=IDS)
def test_bf16_static_decode_replays_equal_the_bf16_forward(path, sets, kinds, moe):
    """The bf16 inference program (weights stored in bf16, as decode_bench and `lmc bench`
    run it): the static step under its CUDA graph keeps the fp32 program's state layout (a
    linear attention's fp32 state, MLA's latent cache, in bf16) and its logits equal the same
    program's full forward on the triton backend across replays, to a few bf16 roundings."""
    from lmc.passes.mixed_precision import low_precision_weights

    f32 = lmc.load(_file(path), preset="tiny", seed=8, **sets).eval()
    off_default(f32, 8)
    m = LmcModel(low_precision_weights(f32.graph, "bf16"), backend="triton")
    m.load_state_dict({k: v.to(torch.bfloat16) for k, v in f32.state_dict().items()})
    m = m.eval().cuda()
    ids = torch.randint(0, m.config["vocab"], (2, 13),
                        generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        full = m(ids)
    full = (full["logits"] if isinstance(full, dict) else full).float()
    dec = Decoder(m, "triton", static=True, max_len=16)
    ref = Decoder(f32, "torch", static=True, max_len=16)
    assert [(s.kind, s.shape) for s in dec.step.states] == \
        [(s.kind, s.shape) for s in ref.step.states]
    assert all(s.dtype.value == ("f32" if s.kind == "state" else "bf16")
               for s in dec.step.states if s.kind in ("state", "cache"))
    for k in (0, 1, 5):
        err = decode_worst(dec, ids, full, k) / full.abs().max().item()
        assert dec.cuda_graph, dec.cuda_graph_off
        assert err < 4 * 2 ** -8, (k, err)
