"""fuse_cache_writes: in the static decode step on the triton backend, the kernels computing
new keys and values store them into the caches in place (rope's pointwise kernel, the
horizontal q/k/v matmul), so no index_copy launches remain; caches, logits and the wrapper
program equal the unfused writes, in Triton's interpreter."""
import os

import pytest
import torch
from conftest import ZOO

import lmc
from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph, Node
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.runtime.decoder import Decoder
from lmc.runtime.executor import bind_dims, run_graph
from lmc.runtime.triton_backend import TritonProgram

LLAMA = os.path.join(ZOO, "llama.yaml")
EXAMPLES = os.path.join(os.path.dirname(ZOO), "examples")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _run(dec, ids, k):
    st = dec.init_state(ids.shape[0])
    for s in dec.step.states:
        if s.kind == "cache":
            st[s.name].fill_(1e30)         # unwritten slots must never be read
    ptrs = {s.name: st[s.name].data_ptr() for s in dec.step.states}
    got = [dec(ids[:, :k], st)[0]]
    for t in range(k, ids.shape[1]):
        got.append(dec(ids[:, t:t + 1], st)[0])
    assert {s.name: st[s.name].data_ptr() for s in dec.step.states} == ptrs   # in place
    return torch.cat(got, 1), st


def test_llama_static_step_writes_its_caches_from_the_kernels():
    m = lmc.load(LLAMA, preset="tiny", seed=3, backend="triton").eval()
    dec = Decoder(m, backend="triton", static=True, max_len=12)
    assert not any(n.op is Op.INDEX_COPY for n in dec.graph.nodes)
    rec = [f for f in dec.graph.meta["fusions"] if f["pass"] == "fuse_cache_writes"]
    assert [f["status"] for f in rec] == ["fused"] * 4, rec          # k and v, 2 layers
    kinds = sorted(f["reason"].rsplit("(", 1)[1] for f in rec)
    assert kinds == ["matmul)", "matmul)", "pointwise)", "pointwise)"], kinds
    ids = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(0))
    _equals_forward_and_torch_step(m, dec, ids, 4)


def _equals_forward_and_torch_step(m, dec, ids, k):
    """Prefill k tokens, then one at a time: the logits equal the full forward's, and the
    caches hold the torch static step's values at the same slots, 1e30 elsewhere."""
    got, st = _run(dec, ids, k)
    with torch.no_grad():
        want = m(ids)
    assert (got - want).abs().max().item() < 1e-4
    ref = Decoder(m, backend="torch", static=True, max_len=12)
    _, st_ref = _run(ref, ids, k)
    n = ids.shape[1]
    for s in dec.step.states:
        torch.testing.assert_close(st[s.name], st_ref[s.name], rtol=1e-5, atol=1e-5)
        assert (st[s.name][:, :, n:] == 1e30).all() if st[s.name].dim() == 4 else \
            (st[s.name][:, n:] == 1e30).all()


def test_gpt2_static_step_stores_its_biased_keys_and_values_from_the_projection():
    """GPT-2's split(x @ W_qkv + b_qkv): the bias is cut with the product (fuse_matmul's
    split by slices), so the horizontal projection computes k + b_k and v + b_v in its
    epilogue and stores them into the caches; no index_copy is left."""
    m = lmc.load(os.path.join(EXAMPLES, "gpt2.yaml"), preset="tiny", seed=4,
                 backend="triton").eval()
    dec = Decoder(m, backend="triton", static=True, max_len=12)
    assert not any(n.op is Op.INDEX_COPY for n in dec.graph.nodes)
    rec = [f for f in dec.graph.meta["fusions"] if f["pass"] == "fuse_cache_writes"]
    assert [f["status"] for f in rec] == ["fused"] * 4, rec
    assert all(f["reason"].endswith("(matmul)") for f in rec), rec
    mm = [n for n in dec.graph.nodes if n.op is Op.FUSED and n.attrs["kind"] == "matmul"
          and any(u.op is Op.INDEX_COPY for u in n.attrs["body"].nodes)]
    assert len(mm) == 2 and all(       # per layer one launch: LayerNorm, q/k/v, biases
        sum(u.op is Op.MATMUL for u in f.attrs["body"].nodes) == 3 and
        sum(u.op is Op.ADD for u in f.attrs["body"].nodes) >= 3 for f in mm), mm
    with torch.no_grad():        # biases that matter (they start at zero)
        for name, p in m.named_parameters():
            if name.endswith("bqkv"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    _equals_forward_and_torch_step(m, dec, ids, 3)


def _graph(read_value_too=False):
    b = Builder({}, {})
    cache = b.input("cache", [Dim.sym("B"), 3, 7, 5], "f32")
    pos = b.input("pos", [Dim.sym("T")], "i64")
    x = b.input("x", [Dim.sym("B"), 3, Dim.sym("T"), 5], "f32")
    v = b.tanh(x) * 2.0
    new = b.node(Op.INDEX_COPY, (cache, pos, v), {"axis": 2})
    outs = {"cache": new.node, "y": b.exp(x).node}
    if read_value_too:
        outs["v"] = v.node
    return Graph("write", b.nodes, outs)


@pytest.mark.parametrize("read_value_too", [False, True])
def test_a_pointwise_kernel_stores_into_the_cache_in_place(read_value_too):
    """Positions out of order, T = 1 and T = 3, B = 2; through the wrapper program. A value
    read elsewhere too stays an index_copy (declined, with the reason)."""
    g = _graph(read_value_too)
    p = TritonProgram(g, cache_writes=True)
    fused_writes = not read_value_too
    assert any(n.op is Op.INDEX_COPY for n in p.graph.nodes) != fused_writes
    (rec,) = [f for f in p.graph.meta["fusions"] if f["pass"] == "fuse_cache_writes"]
    assert rec["status"] == ("fused" if fused_writes else "declined"), rec
    for pos in ([4], [6, 0, 2]):
        T = len(pos)
        cache = torch.randn(2, 3, 7, 5)
        vals = {"cache": cache.clone(), "pos": torch.tensor(pos), "x": torch.randn(2, 3, T, 5)}
        want = run_graph(g, {**vals, "cache": cache.clone()}, RefCtx(dims=bind_dims(g, vals)))
        got = p.run(vals, RefCtx(dims=bind_dims(g, vals)))
        torch.testing.assert_close(got["cache"], want["cache"])
        torch.testing.assert_close(got["y"], want["y"])
        if fused_writes:
            assert got["cache"] is vals["cache"]          # written in place


def test_without_cache_writes_the_write_stays_functional():
    """Any other program (training, the dynamic step) never writes an input in place."""
    g = _graph()
    p = TritonProgram(g)
    assert any(n.op is Op.INDEX_COPY for n in p.graph.nodes)
    vals = {"cache": torch.randn(1, 3, 7, 5), "pos": torch.tensor([1]),
            "x": torch.randn(1, 3, 1, 5)}
    before = vals["cache"].clone()
    p.run(vals, RefCtx(dims=bind_dims(g, vals)))
    assert torch.equal(vals["cache"], before)


def _norm_graph(axis, reduce_axis=-1):
    """RMSNorm of x [B, T, 6] (over `reduce_axis`) written into a cache along `axis`; its
    per-row scale is an output too (a second store of the kernel)."""
    b = Builder({}, {})
    x = b.input("x", [Dim.sym("B"), Dim.sym("T"), 6], "f32")
    w = b.input("w", [6], "f32")
    if axis % 3 == 1:
        cache = b.input("cache", [Dim.sym("B"), 9, 6], "f32")
        pos = b.input("pos", [Dim.sym("T")], "i64")
    else:
        cache = b.input("cache", [Dim.sym("B"), Dim.sym("T"), 9], "f32")
        pos = b.input("pos", [6], "i64")
    r = b.rsqrt(b.mean(x * x, reduce_axis) + 1e-6)
    v = x * r * w
    new = b.node(Op.INDEX_COPY, (cache, pos, v), {"axis": axis})
    return Graph("norm_write", b.nodes, {"cache": new.node, "r": r.node})


def test_a_reduction_kernel_stores_its_rows_into_the_cache_in_place():
    """MLA's latent: a norm's output written along T by the norm's kernel (the row's slot is
    pos[t]), positions out of order, T = 1 and 3, B = 2; the other rows untouched."""
    g = _norm_graph(1)
    p = TritonProgram(g, cache_writes=True)
    assert not any(n.op is Op.INDEX_COPY for n in p.graph.nodes)
    (rec,) = [f for f in p.graph.meta["fusions"] if f["pass"] == "fuse_cache_writes"]
    assert rec["status"] == "fused" and rec["reason"].endswith("(reduction)"), rec
    for pos in ([4], [6, 0, 2]):
        T = len(pos)
        cache = torch.full((2, 9, 6), 1e30)
        vals = {"x": torch.randn(2, T, 6), "w": torch.randn(6), "cache": cache.clone(),
                "pos": torch.tensor(pos)}
        want = run_graph(g, {**vals, "cache": cache.clone()}, RefCtx(dims=bind_dims(g, vals)))
        got = p.run(vals, RefCtx(dims=bind_dims(g, vals)))
        assert got["cache"] is vals["cache"]              # written in place
        torch.testing.assert_close(got["cache"], want["cache"])
        torch.testing.assert_close(got["r"], want["r"])
        assert (got["cache"][:, [i for i in range(9) if i not in pos]] == 1e30).all()
    # reduced along T (a column statistic), written along the last axis: strided rows
    g = _norm_graph(2, reduce_axis=1)
    p = TritonProgram(g, cache_writes=True)
    assert not any(n.op is Op.INDEX_COPY for n in p.graph.nodes)
    _equal_to_the_oracle(g, p, 5)


def _equal_to_the_oracle(g, p, T):
    """Program p of _norm_graph g against the oracle, the cache written along the last axis
    at scrambled positions."""
    vals = {"x": torch.randn(2, T, 6), "w": torch.randn(6), "cache": torch.randn(2, T, 9),
            "pos": torch.tensor([8, 0, 3, 5, 1, 2])}
    want = run_graph(g, {**vals, "cache": vals["cache"].clone()},
                     RefCtx(dims=bind_dims(g, vals)))
    got = p.run(dict(vals), RefCtx(dims=bind_dims(g, vals)))
    torch.testing.assert_close(got["cache"], want["cache"])
    torch.testing.assert_close(got["r"], want["r"])


def test_a_write_along_the_reduced_axis_stays_an_index_copy():
    g = _norm_graph(2, reduce_axis=2)
    p = TritonProgram(g, cache_writes=True)
    assert any(n.op is Op.INDEX_COPY for n in p.graph.nodes)
    (rec,) = [f for f in p.graph.meta["fusions"] if f["pass"] == "fuse_cache_writes"]
    assert rec == {**rec, "status": "declined",
                   "reason": "the write axis is the kernel's reduced axis"}, rec
    _equal_to_the_oracle(g, p, 3)


@pytest.mark.parametrize("name", ["gla", "mamba2"])
def test_recurrent_states_are_updated_in_place(name):
    """The static step's decoded linear attention (gla: gated, per-channel decays; mamba2:
    SSD) writes its new state over the old one, and mamba2's convolution history is updated
    in place by a shift_update kernel after its reads, so the Decoder copies no state after a
    step. Prefills of 3 tokens (the recurrent
    kernel) and 20 (the chunked kernels, past RECURRENT_MAX), then single steps: logits equal
    the full forward's and every state the torch static step's."""
    from lmc.bench import step_ops
    from lmc.codegen.wrapper import inplace_source
    m = lmc.load(os.path.join(EXAMPLES, f"{name}.yaml"), preset="tiny", seed=2,
                 backend="triton").eval()
    dec = Decoder(m, backend="triton", static=True, max_len=24)
    kinds = ("decode_linear_attention", "decode_gated_linear_attention")
    ops = [n for n in dec.graph.nodes if n.op is Op.FUSED and n.attrs["kind"] in kinds]
    assert len(ops) == 2 and all(n.attrs["inplace"] == {1: 4} for n in ops), ops
    states = [s for s in dec.step.states if s.kind == "state"]
    assert states and all(inplace_source(dec.graph.outputs[s.out]) is not None
                          for s in states)
    shifts = sum(s.kind == "shift" for s in dec.step.states)
    assert shifts == (2 if name == "mamba2" else 0)
    assert sum(n.op is Op.FUSED and n.attrs["kind"] == "shift_update"
               for n in dec.graph.nodes) == shifts
    assert step_ops(dec.graph)["state_copies"] == 0
    ids = torch.randint(0, m.config["vocab"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(ids)
    want = want["logits"] if isinstance(want, dict) else want
    ref = Decoder(m, backend="torch", static=True, max_len=24)
    for k in (3, 20):
        got, st = _run(dec, ids, k)
        assert (got - want).abs().max().item() < 1e-4
        _, st_ref = _run(ref, ids, k)
        for s in dec.step.states:
            torch.testing.assert_close(st[s.name], st_ref[s.name], rtol=1e-4, atol=1e-5)


def test_a_state_read_besides_its_update_is_copied():
    """The in-place update needs the op to be the state input's only reader: a state also
    read elsewhere (here a graph output reading it) gets a fresh tensor, declined with the
    reason."""
    from lmc.codegen.program import apply_decode_patterns, fuse
    from lmc.passes.decode import decode_step
    from lmc.passes.fuse_cache_writes import fuse_cache_writes
    m = lmc.load(os.path.join(EXAMPLES, "gla.yaml"), preset="tiny")
    g = fuse(apply_decode_patterns(decode_step(m.graph, static=True).graph), decode=True)
    op = next(n for n in g.nodes if n.op is Op.FUSED and
              n.attrs["kind"] == "decode_gated_linear_attention")
    peek = Node.make(Op.EXP, [op.inputs[4]], {})
    g2 = g.with_nodes(list(g.nodes) + [peek], dict(g.outputs, peek=peek))
    for graph, inplace in ((g, 2), (g2, 1)):
        out = fuse_cache_writes(graph)
        assert sum(bool(n.attrs.get("inplace")) for n in out.nodes if n.op is Op.FUSED and
                   n.attrs["kind"] == "decode_gated_linear_attention") == inplace
    recs = [f["reason"] for f in out.meta["fusions"] if f["pass"] == "fuse_cache_writes"
            and f["status"] == "declined"]
    assert recs == ["the state is read besides its update"]


def test_a_running_sum_is_updated_in_place_by_its_reduction_kernel():
    """medit_one's running mean carries a sum [B, 1, d] per layer: the reduction kernel that
    scans the new tokens (cumsum plus the carry) stores the new sum after its last pass,
    having read the carry for its rows first, so it writes over the carry; the Decoder copies
    nothing, and logits and states equal the forward's and the torch static step's."""
    from lmc.bench import step_ops
    from lmc.codegen.wrapper import inplace_source
    m = lmc.load(os.path.join(ZOO, "medit_one.yaml"), preset="tiny", seed=1,
                 backend="triton").eval()
    dec = Decoder(m, backend="triton", static=True, max_len=12)
    assert [s.kind for s in dec.step.states] == ["sum", "sum"]
    assert all(inplace_source(dec.graph.outputs[s.out]) is not None and
               dec.graph.outputs[s.out].inputs[0].attrs["kind"] == "reduction"
               for s in dec.step.states)
    assert step_ops(dec.graph)["state_copies"] == 0
    ids = torch.randint(0, m.config["vocab"], (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = m(ids)
    want = want["logits"] if isinstance(want, dict) else want
    got, st = _run(dec, ids, 4)
    assert (got - want).abs().max().item() < 1e-4
    _, st_ref = _run(Decoder(m, backend="torch", static=True, max_len=12), ids, 4)
    for s in dec.step.states:
        torch.testing.assert_close(st[s.name], st_ref[s.name], rtol=1e-5, atol=1e-5)


def test_the_history_update_stays_after_every_read_of_the_history():
    """A shift history whose new values come from the step's inputs alone: fuse_rope_epilogue
    moves such values to the front of the step, but not the shift_update op writing the
    history in place, which must follow the kernel reading the old history."""
    B, T = Dim.sym("B"), Dim.sym("T")
    b = Builder({}, {})
    x = b.input("x", [B, T, 8], "f32")
    h = b.input("h", [B, 2, 8], "f32")
    w = b.param("w", [8])          # the reader is not computed from inputs alone
    y = b.exp(x) * w + b.slice(h, 1, 1, 2) * w          # reads the newest slot
    new = b.slice(b.concat([h, x], 1), 1, T, T + 2)
    g = Graph("step", b.nodes, {"y": y.node, "h'": new.node})
    p = TritonProgram(g, cache_writes=True, decode=True)
    nodes = p.graph.nodes
    upd = [i for i, n in enumerate(nodes) if n.op is Op.FUSED and
           n.attrs["kind"] == "shift_update"]
    hist = next(n for n in nodes if n.op is Op.INPUT and n.attrs["name"] == "h")
    readers = [i for i, n in enumerate(nodes) if hist in n.inputs and i not in upd]
    assert len(upd) == 1 and readers and max(readers) < upd[0], \
        [n.attrs.get("kind", n.op.value) for n in nodes]
    for Tv in (1, 3):
        vals = {"x": torch.randn(2, Tv, 8), "h": torch.randn(2, 2, 8), "w": torch.randn(8)}
        want = run_graph(g, {k: v.clone() for k, v in vals.items()},
                         RefCtx(dims=bind_dims(g, vals)))
        got = p.run(vals, RefCtx(dims=bind_dims(g, vals)))
        torch.testing.assert_close(got["y"], want["y"])
        torch.testing.assert_close(got["h'"], want["h'"])
        assert got["h'"].data_ptr() == vals["h"].data_ptr()       # written in place


@pytest.mark.parametrize("name,sets", [("gpt_oss", {}), ("gemma2", {"attn_cap": 1.5})])
def test_rings_are_updated_in_place_after_the_attention_reads_them(name, sets):
    """A sliding-window layer's K and V rings (window 5 in gpt_oss's tiny preset, 6 in
    gemma2's): the decode attention reads the ring and the step's new keys as two segments,
    and a ring_update op per ring, after every other node, stores the last new entries at
    their slots in place. No [ring | new] concatenation and no gather is left, and the
    Decoder copies no state. Prefills shorter than, equal to and longer than the window,
    then single steps wrapping the ring several times, then a chunk of 3 tokens: logits
    equal the full forward's and the rings the torch static step's."""
    from lmc.bench import step_ops
    from lmc.codegen.wrapper import inplace_source
    m = lmc.load(os.path.join(EXAMPLES, f"{name}.yaml"), preset="tiny", seed=5,
                 backend="triton", **sets).eval()
    dec = Decoder(m, backend="triton", static=True, max_len=24)
    rings = [s for s in dec.step.states if s.kind == "ring"]
    assert len(rings) == 2, dec.step.states                # K and V of the window layer
    fused = [n for n in dec.graph.nodes if n.op is Op.FUSED]
    upd = [n for n in fused if n.attrs["kind"] == "ring_update"]
    assert len(upd) == 2 and all(n.attrs["inplace"] == {0: 0} for n in upd)
    assert all(inplace_source(dec.graph.outputs[s.out]) is not None for s in rings)
    att = [n for n in fused if n.attrs["kind"] == "decode_attention"
           and n.attrs["body"].meta["options"]["segments"]]
    assert len(att) == 1
    # the updates follow the attention reading the rings at once (the new keys are not kept
    # to the end of the step), and nothing after them reads a ring
    i = fused.index(att[0])
    assert fused[i + 1:i + 3] == upd, [n.attrs["kind"] for n in fused]
    later = dec.graph.nodes[dec.graph.nodes.index(upd[-1]) + 1:]
    assert not any(x is u.inputs[0] for u in upd for n in later for x in n.inputs)
    assert not any(n.op in (Op.GATHER, Op.CONCAT) for n in dec.graph.nodes), \
        [n.op.value for n in dec.graph.nodes if n.op in (Op.GATHER, Op.CONCAT)]
    assert step_ops(dec.graph)["state_copies"] == 0
    recs = [f["reason"] for f in dec.graph.meta["fusions"] if f["pass"] == "fuse_cache_writes"
            and "ring_update" in f["reason"]]
    assert len(recs) == 2 and all("the last new entries stored at their slots" in r
                                  for r in recs), recs
    ids = torch.randint(0, m.config["vocab"], (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = m(ids)
    want = want["logits"] if isinstance(want, dict) else want
    ref = Decoder(m, backend="torch", static=True, max_len=24)
    W = rings[0].shape[2]
    for k in (2, W, W + 4):
        got, st = _run(dec, ids[:, :16], k)
        assert (got - want[:, :16]).abs().max().item() < 1e-4, k
        _, st_ref = _run(ref, ids[:, :16], k)
        for s in dec.step.states:
            torch.testing.assert_close(st[s.name], st_ref[s.name], rtol=1e-5, atol=1e-5)
        logits, st = dec(ids[:, 16:19], st)           # a chunk after the ring wrapped
        assert (logits - want[:, 16:19]).abs().max().item() < 1e-4, k
