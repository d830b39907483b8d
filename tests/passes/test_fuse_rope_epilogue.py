"""fuse_rope_epilogue: in the decode step on the triton backend, RoPE of q and k is computed
by the q/k/v projection's kernel (a partner-column accumulator; rotated outputs and cache
rows stored by the matmul tiles), so the rope pointwise kernel of each layer is gone; the
logits equal the forward and the torch decoder's, and the caches hold the same rows, in
Triton's interpreter."""
import os

import pytest
import torch
from conftest import ZOO

import lmc
from lmc.codegen import matmul
from lmc.ir.ops import Op
from lmc.runtime.decoder import Decoder

TOL = 1e-5


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _rope_kernels(g):
    """Pointwise kernels computing a rotate-half (neg and concat in one body)."""
    return [n for n in g.nodes if n.op is Op.FUSED and n.attrs["kind"] == "pointwise"
            and {Op.NEG, Op.CONCAT} <= {b.op for b in n.attrs["body"].nodes}]


def _small_tiles(monkeypatch, width: int):
    """16 x 16 x 16 tiles for the matmuls at most `width` (the model's d) columns wide: the
    q/k/v projections these tests concern (tiles crossing head boundaries, partner columns
    in other tiles) and the output projections; the interpreter's usual tiles for the FFN and
    the head, where tiny tiles only cost time."""
    real = matmul.interpret_blocks
    monkeypatch.setattr(matmul, "interpret_blocks",
                        lambda M, N, K: (16, 16, 16) if N <= width else real(M, N, K))


def _decode(dec, ids, k):
    """Prefill k tokens, then one step per token: (logits of every position, state)."""
    st = dec.init_state(ids.shape[0])
    if dec.static:
        for s in dec.step.states:
            if s.kind == "cache":
                st[s.name].fill_(torch.finfo(st[s.name].dtype).max)   # a read would show
    lg, st = dec(ids[:, :k], st)
    got = [lg]
    for t in range(k, ids.shape[1]):
        lg, st = dec(ids[:, t:t + 1], st)
        got.append(lg)
    return torch.cat(got, 1), st


# model, sets, rope kernels merged, declined (and why)
CASES = [
    ("llama", {}, 2, []),                     # q and k in one kernel per layer (MHA)
    ("llama", {"d": 72, "heads": 3}, 2, []),  # head dim 24: tiles cross head boundaries
    ("blues01", {}, 4, []),                   # GQA: q and k kernels apart, both merged
    ("yoco", {}, 3, []),                      # retention keys: rope(k) * a scalar; the
                                              # cross-decoder q: a one-product projection
    ("optimus_prime", {}, 4, []),             # MLA: k_R one head [B, 1, T, D]; layer
                                              # 0's tables moved before its projection
    ("minimax", {}, 2, []),                   # partial rotary: [rope(k[:R]) | k[R:]] is
                                              # one cache the projection's tiles write
    ("medit_one", {}, 4, []),                 # [B, T, H, D] heads, no permute; tables
                                              # [H, D] (a head's position is its index)
    ("medit_one", {"d": 48, "d_embed": 96}, 4, []),  # head dim 12: tiles cross head boundaries
]


@pytest.mark.parametrize("name,sets,merged,declined", CASES,
                         ids=[c[0] + "".join(f"-{k}{v}" for k, v in c[1].items()) for c in CASES])
def test_zoo_rope_joins_the_projection(name, sets, merged, declined, monkeypatch):
    if sets:        # small tiles: a tile's partner columns lie in other tiles
        _small_tiles(monkeypatch, sets["d"])
    m = lmc.load(os.path.join(ZOO, f"{name}.yaml"), preset="tiny", seed=5, backend="triton",
                 **sets).eval()
    vocab = m.graph.outputs["logits"].type.shape[-1]
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(ids)
    want = want["logits"] if isinstance(want, dict) else want
    ref = Decoder(m, backend="torch", static=True, max_len=12)
    _, st_ref = _decode(ref, ids, 4)
    for static in (False, True):
        dec = Decoder(m, backend="triton", static=static, max_len=12 if static else None)
        rec = [f for f in dec.graph.meta["fusions"] if f["pass"] == "fuse_rope_epilogue"]
        assert sum(r["status"] == "fused" for r in rec) == merged, rec
        why = [r["reason"] for r in rec if r["status"] == "declined"]
        assert len(why) == len(declined) and all(w in r for w, r in zip(declined, why)), why
        assert len(_rope_kernels(dec.graph)) == len(declined)
        ropes = [r for n in dec.graph.nodes if n.op is Op.FUSED
                 for r in n.attrs["body"].meta.get("rope", ())]
        assert len(ropes) >= merged
        got, st = _decode(dec, ids, 4)
        if static:
            for s in dec.step.states:        # the same rows; the fill in unwritten slots
                torch.testing.assert_close(st[s.name], st_ref[s.name], rtol=1e-5, atol=1e-5)
        assert (got - want).abs().max().item() < TOL


def test_a_rotated_product_read_elsewhere_keeps_its_kernel(tmp_path):
    """minimax with its pass-through keys reshaped there and back: they are a cache of their
    own (the decode pass splits the concat), written from the product besides the rotation,
    so that rope kernel stays (and says so); the query's rotation still joins the
    projection, and decode equals the forward."""
    from conftest import minimax_variant

    m = lmc.load(minimax_variant(tmp_path, "reshaped"), preset="tiny", seed=5,
                 backend="triton").eval()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(ids)
    want = want["logits"] if isinstance(want, dict) else want
    for static in (False, True):
        dec = Decoder(m, backend="triton", static=static, max_len=12 if static else None)
        rec = [(r["status"], r["where"]) for r in dec.graph.meta["fusions"]
               if r["pass"] == "fuse_rope_epilogue"]
        assert sorted(rec) == [("declined", "layers.1.attn.rope_1"),
                               ("fused", "layers.1.attn.rope")], rec
        assert "also read by" in next(r["reason"] for r in dec.graph.meta["fusions"]
                                      if r["status"] == "declined"
                                      and r["pass"] == "fuse_rope_epilogue")
        (k,) = _rope_kernels(dec.graph)
        assert any(b.op is Op.INDEX_COPY for b in k.attrs["body"].nodes) is static
        got, _ = _decode(dec, ids, 4)
        assert (got - want).abs().max().item() < TOL


def test_f16_rotation_in_the_epilogue_equals_the_rope_kernel_bitwise(monkeypatch):
    """Mixed precision (f16 products, f16 casts of the tables): the epilogue rounds the
    product to f16 before rotating, as the rope kernel read it, and computes in fp32: the
    same bits as the unfused step, logits and caches."""
    from lmc.passes.mixed_precision import mixed_precision
    from lmc.runtime.module import LmcModel

    m = lmc.load(os.path.join(ZOO, "llama.yaml"), preset="tiny", seed=2, backend="triton")
    model = LmcModel(mixed_precision(m.graph, "f16"), backend="triton")
    model.load_state_dict(m.state_dict())
    model.eval()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(4))
    _same_bits_as_the_rope_kernels(model, ids, monkeypatch)


def _same_bits_as_the_rope_kernels(model, ids, monkeypatch):
    """The static step with the rotations in the projection (one merge per layer of the
    tiny preset's two) and without: the same logits and caches, bit for bit."""
    from lmc.passes import fuse_rope_epilogue as fre

    fused = Decoder(model, backend="triton", static=True, max_len=10)
    assert [r["status"] for r in fused.graph.meta["fusions"]
            if r["pass"] == "fuse_rope_epilogue"] == ["fused"] * 2
    got, st = _decode(fused, ids, 3)
    monkeypatch.setattr(fre, "fuse_rope_epilogue", lambda g: g)
    plain = Decoder(model, backend="triton", static=True, max_len=10)
    assert len(_rope_kernels(plain.graph)) == 2
    want, st_want = _decode(plain, ids, 3)
    assert got.dtype == want.dtype and torch.equal(got, want)
    for s in fused.step.states:
        assert torch.equal(st[s.name], st_want[s.name])


@pytest.mark.parametrize("name,sets", [("llama", {"d": 72, "heads": 3}), ("blues01", {}),
                                       ("llama_pairs", {})])
def test_rotations_with_split_k(name, sets, monkeypatch, tmp_path):
    """The projection kernel splits K at decode's few rows like the plain form (3 slices
    forced here, 16-column tiles crossing heads): the partner accumulator and the RMSNorm
    sums of squares are split too; logits equal the forward, counters back at zero. (Also
    with interleaved pairs: partner d ^ 1.)"""
    monkeypatch.setattr(matmul, "INTERPRET_SPLIT_K", 3)
    _small_tiles(monkeypatch, sets.get("d", 64))
    splits = []
    real = matmul._split_args
    monkeypatch.setattr(matmul, "_split_args", lambda *a: splits.append(real(*a)[-1])
                        or real(*a))
    path = _pairs_llama(tmp_path) if name == "llama_pairs" else \
        os.path.join(ZOO, f"{name}.yaml")
    m = lmc.load(path, preset="tiny", seed=6, backend="triton", **sets).eval()
    vocab = m.graph.outputs["logits"].type.shape[-1]
    ids = torch.randint(0, vocab, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():         # the oracle: the triton forward would split K too
        want = lmc.load(path, preset="tiny", seed=6, backend="torch", **sets).eval()(ids)
    want = want["logits"] if isinstance(want, dict) else want
    dec = Decoder(m, backend="triton", static=True, max_len=8)
    assert any(n.attrs["body"].meta.get("rope") for n in dec.graph.nodes
               if n.op is Op.FUSED)
    got, _ = _decode(dec, ids, 2)
    assert (got - want).abs().max().item() < TOL
    assert splits and all(s == max(matmul.SPLITS) for s in splits)
    _, counters = matmul._split_buffers(torch.device("cpu"))
    assert not counters.any()


def _pairs_llama(tmp_path, partial=False) -> str:
    """llama with RoPE written by hand as interleaved pairs ((x0, x1) -> (-x1, x0), tables
    with each angle twice side by side); partial: on the first half of each head's columns
    only, the rest passed through (tables cut to that width)."""
    src = open(os.path.join(ZOO, "llama.yaml")).read()
    src = src.replace(
        "      - emb = concat([freqs, freqs], -1)\n",
        "      - f3 = reshape(freqs, [T, head_dim / 2, 1])\n"
        "      - emb = reshape(concat([f3, f3], -1), [T, head_dim])\n")
    src = src.replace(
        "      - x1, x2 = split(x, 2, -1)\n"
        "      - return x * cos + concat([-x2, x1], -1) * sin\n",
        "      - x1, x2 = split(reshape(x, [B, heads, T, -1, 2]), 2, -1)\n"
        "      - return x * cos + reshape(concat([-x2, x1], -1), [B, heads, T, -1]) * sin\n")
    assert src.count("T, -1, 2]") == 1
    if partial:
        for p in ("q", "k"):
            old = f"      - {p} = rope({p}, cos, sin)\n"
            assert old in src
            src = src.replace(old, (
                f"      - {p} = concat([rope(slice({p}, -1, 0, head_dim / 2), "
                "slice(cos, -1, 0, head_dim / 2), slice(sin, -1, 0, head_dim / 2)), "
                f"slice({p}, -1, head_dim / 2, head_dim)], -1)\n"))
    path = tmp_path / f"llama_pairs{'_partial' if partial else ''}.yaml"
    path.write_text(src)
    return str(path)


@pytest.mark.parametrize("partial", [False, True], ids=["whole", "partial"])
def test_interleaved_pairs_rotate_in_the_projection(tmp_path, monkeypatch, partial):
    """llama with RoPE written as interleaved pairs: the pairs' rotation (its own kernel,
    before a reshape no pointwise kernel reads through) and the rope kernel reading it both
    go, the projection's tiles rotating each column with its partner d ^ 1 (16-column tiles
    crossing heads); on the whole head or its first half; the decode equals the forward,
    dynamic and static."""
    _small_tiles(monkeypatch, 64)
    path = _pairs_llama(tmp_path, partial)
    m = lmc.load(path, preset="tiny", seed=3, backend="triton").eval()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = lmc.load(path, preset="tiny", seed=3).eval()(ids)
    want = want["logits"] if isinstance(want, dict) else want
    for static in (False, True):
        dec = Decoder(m, backend="triton", static=static, max_len=10 if static else None)
        rec = [r for r in dec.graph.meta["fusions"] if r["pass"] == "fuse_rope_epilogue"]
        assert rec and all(r["status"] == "fused" for r in rec), rec
        assert not [n for n in dec.graph.nodes if n.op is Op.FUSED and
                    n.attrs["kind"] == "pointwise" and
                    Op.NEG in {b.op for b in n.attrs["body"].nodes}]
        ropes = [r for n in dec.graph.nodes if n.op is Op.FUSED
                 for r in n.attrs["body"].meta.get("rope", ())]
        assert len(ropes) == 4 and all(r["pairs"] for r in ropes)
        assert all((r["R"], r["W"]) == ((8, 16) if partial else (16, 16)) for r in ropes)
        got, _ = _decode(dec, ids, 3)
        assert (got - want).abs().max().item() < TOL


def test_pairs_of_another_tensor_are_declined_with_the_reason(tmp_path):
    """k rotated with the pairs of q's product (x * cos + rot(q) * sin: not RoPE of k): the
    records say the pairs are not of the rotated x's own columns (q's rotation shares k's
    kernel, so it stays there too), and the decode equals the forward."""
    src = open(_pairs_llama(tmp_path)).read()
    old = ("      - q = rope(q, cos, sin)\n"
           "      - k = rope(k, cos, sin)\n")
    assert old in src
    src = src.replace(old, "      - k = rope_other(k, q, cos, sin)\n"
                           "      - q = rope(q, cos, sin)\n")
    src = src.replace("  rope:", "  rope_other:\n"
                      "    args: [x, y, cos, sin]\n"
                      "    body:\n"
                      "      - y1, y2 = split(reshape(y, [B, heads, T, -1, 2]), 2, -1)\n"
                      "      - return x * cos + reshape(concat([-y2, y1], -1), "
                      "[B, heads, T, -1]) * sin\n\n  rope:", 1)
    path = tmp_path / "llama_pairs_other.yaml"
    path.write_text(src)
    m = lmc.load(str(path), preset="tiny", seed=3, backend="triton").eval()
    dec = Decoder(m, backend="triton", static=True, max_len=10)
    rec = [r for r in dec.graph.meta["fusions"] if r["pass"] == "fuse_rope_epilogue"]
    why = {r["reason"] for r in rec if r["status"] == "declined"}
    assert rec and why == {"the pairs' rotation is not of the rotated x's own columns"} and \
        all(r["status"] == "declined" for r in rec), rec
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = lmc.load(str(path), preset="tiny", seed=3).eval()(ids)
    want = want["logits"] if isinstance(want, dict) else want
    got, _ = _decode(dec, ids, 3)
    assert (got - want).abs().max().item() < TOL


def test_f16_interleaved_rotation_equals_the_pair_kernels_bitwise(tmp_path, monkeypatch):
    """Mixed precision, interleaved pairs: the tiles' rotation gives the bits the pair and
    rope kernels gave, logits and caches."""
    from lmc.passes import fuse_rope_epilogue as fre
    from lmc.passes.mixed_precision import mixed_precision
    from lmc.runtime.module import LmcModel

    m = lmc.load(_pairs_llama(tmp_path), preset="tiny", seed=2, backend="triton")
    model = LmcModel(mixed_precision(m.graph, "f16"), backend="triton")
    model.load_state_dict(m.state_dict())
    model.eval()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(4))
    fused = Decoder(model, backend="triton", static=True, max_len=10)
    rec = [r["status"] for r in fused.graph.meta["fusions"] if r["pass"] == "fuse_rope_epilogue"]
    assert rec and set(rec) == {"fused"}, rec
    assert len([r for n in fused.graph.nodes if n.op is Op.FUSED
                for r in n.attrs["body"].meta.get("rope", ())]) == 4
    got, st = _decode(fused, ids, 3)
    monkeypatch.setattr(fre, "fuse_rope_epilogue", lambda g: g)
    plain = Decoder(model, backend="triton", static=True, max_len=10)
    assert len(_rope_kernels(plain.graph)) >= 2           # the pairs' rotations
    want, st_want = _decode(plain, ids, 3)
    assert got.dtype == want.dtype and torch.equal(got, want)
    for s in fused.step.states:
        assert torch.equal(st[s.name], st_want[s.name])


def _biased_llama(tmp_path) -> str:
    """llama with biases on its q, k and v projections (Qwen2's attention)."""
    src = open(os.path.join(ZOO, "llama.yaml")).read()
    for p in ("q", "k", "v"):
        src = src.replace(f"      w{p}: [d, d]\n",
                          f"      w{p}: [d, d]\n      b{p}: {{shape: [d], init: zeros}}\n")
        src = src.replace(f"reshape(x @ w{p}, ", f"reshape(x @ w{p} + b{p}, ")
    assert src.count("+ bq") == src.count("+ bk") == src.count("+ bv") == 1
    path = tmp_path / "llama_qkv_bias.yaml"
    path.write_text(src)
    return str(path)


def _random_biases(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.rsplit(".", 1)[-1] in ("bq", "bk", "bv"):
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(len(name)))


def test_biased_q_and_k_rotate_in_the_projection(tmp_path, monkeypatch):
    """Qwen2's q + b_q and k + b_k: the tile adds the bias at its columns and at the partner
    columns before rotating; no rope kernel is left, and the logits and caches equal the
    forward's and the torch step's (16-column tiles crossing heads, K split in 3; the f16
    test below runs the unsplit tiles)."""
    monkeypatch.setattr(matmul, "INTERPRET_SPLIT_K", 3)
    _small_tiles(monkeypatch, 64)
    path = _biased_llama(tmp_path)
    m = lmc.load(path, preset="tiny", seed=7, backend="triton").eval()
    _random_biases(m)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = m(ids)
    ref = Decoder(m, backend="torch", static=True, max_len=12)
    _, st_ref = _decode(ref, ids, 4)
    for static in (False, True):
        dec = Decoder(m, backend="triton", static=static, max_len=12 if static else None)
        rec = [r for r in dec.graph.meta["fusions"] if r["pass"] == "fuse_rope_epilogue"]
        assert [r["status"] for r in rec] == ["fused"] * 2, rec
        ropes = [r for n in dec.graph.nodes if n.op is Op.FUSED
                 for r in n.attrs["body"].meta.get("rope", ())]
        assert len(ropes) == 4 and all(r["bias"] is not None for r in ropes), ropes
        assert not _rope_kernels(dec.graph)
        got, st = _decode(dec, ids, 4)
        if static:
            for s in dec.step.states:
                torch.testing.assert_close(st[s.name], st_ref[s.name], rtol=1e-5, atol=1e-5)
        assert (got - want).abs().max().item() < TOL


def test_f16_biased_rotation_equals_the_rope_kernel_bitwise(tmp_path, monkeypatch):
    """In f16 the unfused step rounds the product, then the biased sum, before its rope
    kernel reads it; the epilogue rounds both the same way: the same bits."""
    from lmc.passes.mixed_precision import low_precision_weights
    from lmc.runtime.module import LmcModel

    path = _biased_llama(tmp_path)
    m = lmc.load(path, preset="tiny", seed=8, backend="triton")
    _random_biases(m)
    model = LmcModel(low_precision_weights(m.graph, "f16"), backend="triton")
    model.load_state_dict({k: v.half() for k, v in m.state_dict().items()})
    model.eval()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(6))
    _same_bits_as_the_rope_kernels(model, ids, monkeypatch)


def test_medit_one_heads_rotated_by_their_index(monkeypatch):
    """medit_one rotates the heads of one token ([B, T, H, D], no permute) by the head's
    index: the tile reads the [H, D] tables at each column's head. The attention weights are
    scaled up so the rotation shows in the logits (at init Q * K ~ 1e-5 and a softmax that
    flat hides it), with 16-column tiles crossing the 12-wide heads."""
    _small_tiles(monkeypatch, 48)
    m = lmc.load(os.path.join(ZOO, "medit_one.yaml"), preset="tiny", seed=3, backend="triton",
                 d=48, d_embed=96).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("attn.w1", "attn.w2", "attn.w_h")):
                p.mul_(30.0)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = m(ids)
    want = want["logits"] if isinstance(want, dict) else want
    dec = Decoder(m, backend="triton", static=True, max_len=8)
    ropes = [r for n in dec.graph.nodes if n.op is Op.FUSED
             for r in n.attrs["body"].meta.get("rope", ())]
    assert len(ropes) == 4 and all(r["layout"] == "bthd" and r["heads"] for r in ropes)
    assert not _rope_kernels(dec.graph)
    got, _ = _decode(dec, ids, 3)
    assert (got - want).abs().max().item() < TOL



def test_a_rotation_of_another_kernels_rows_says_which_kernel():
    """RoPE of RMS-normed rows whose half is also read elsewhere (so the rotation stays out
    of the norm's kernel, lmc/codegen/reduction.py's pieces): the norm kernel computes
    x * cos, and the decline names it (it used to say "not x * cos + rot(x) * sin", which the
    kernel is)."""
    from lmc.codegen.program import fuse
    from lmc.frontend.builder import Builder
    from lmc.ir.dims import Dim
    from lmc.ir.graph import Graph

    B, T = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    q = b.input("q", [B, 2, T, 8], "f32")
    cos, sin = b.input("cos", [T, 8], "f32"), b.input("sin", [T, 8], "f32")
    y = q * b.rsqrt(b.mean(q * q, -1) + 1e-6)
    x1, x2 = b.split(y, 2, -1)
    out = y * cos + b.concat([-x2, x1], -1) * sin
    g = fuse(Graph("g", b.nodes, {"out": out.node, "x1": x1.node}), decode=True)
    why = [r["reason"] for r in g.meta["fusions"] if r["pass"] == "fuse_rope_epilogue"]
    assert len(why) == 1 and "with a term computed by the reduction kernel lmc_red_" in why[0] \
        and "not from a projection's products" in why[0], why
