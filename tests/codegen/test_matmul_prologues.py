"""fuse_matmul_prologues and the matmul kernels computing an operand in their loads, in
Triton's interpreter against the oracle: the loss backward's form (dlogits from the logits,
the log-sum-exp, the targets and a scale, read as A by dX = dlogits @ W and, through a
reshape, as B by dW = x^T @ dlogits), a B operand through a permute, a gated pair's shared
A, lanes outside the tile whose prologue is not finite, fp32 and fp16, ragged sizes; and
the declines."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmc.frontend.builder import Builder
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.runtime.executor import bind_dims, run_graph
from lmc.runtime.triton_backend import TritonProgram

B, T = Dim.sym("B"), Dim.sym("T")
TOL = {"f32": dict(rtol=1e-5, atol=1e-5), "f16": dict(rtol=1e-2, atol=1e-2)}
V, D = 37, 19          # a vocabulary and a width that no block size divides


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _kernels(p: TritonProgram, kind: str):
    return [n for n in p.graph.nodes if n.op is Op.FUSED and n.attrs["kind"] == kind]


def _records(p: TritonProgram, status: str):
    return [f["reason"] for f in p.graph.meta["fusions"]
            if f["pass"] == "fuse_matmul_prologues" and f["status"] == status]


def run(g: Graph, vals, dtype="f32", disable=()):
    """The fused program's outputs equal the oracle's; returns the program."""
    ctx = RefCtx(dims=bind_dims(g, vals))
    want = run_graph(g, vals, ctx)
    p = TritonProgram(g, disable=disable)
    got = run_graph(p.graph, vals, ctx, p.impl)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.isfinite(got[k].float()).all(), k
        torch.testing.assert_close(got[k].float(), want[k].float(), **TOL[dtype])
    return p


def rand(*shape, dtype="f32", gen=None):
    return torch.randn(*shape, generator=gen).to(
        {"f32": torch.float32, "f16": torch.float16}[dtype])


def _loss_backward(dtype, D=D):
    """The shape of the cross-entropy backward under mixed precision (width D)."""
    b = Builder({}, {})
    logits = b.input("logits", [B, T, V], dtype)
    lse = b.input("lse", [B, T], "f32")
    scale = b.input("scale", [B, T], "f32")
    tgt = b.input("tgt", [B, T], "i64")
    x = b.input("x", [B, T, D], dtype)
    w = b.input("w", [V, D], dtype)
    s = b.reshape(scale, [B, T, 1])
    soft = b.exp(b.cast(logits, "f32") - b.reshape(lse, [B, T, 1])) * s
    hit = b.where(b.eq(b.reshape(tgt, [B, T, 1]), b.iota(V)), s, 0.0)
    dl = b.cast(soft - hit, dtype)
    dx = dl @ w
    dw = b.transpose(b.reshape(x, [B * T, D]), 0, 1) @ b.reshape(dl, [B * T, V])
    return Graph("loss_bwd", b.nodes, {"dx": dx.node, "dw": dw.node})


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_the_loss_backward_computes_dlogits_in_both_matmuls(dtype):
    g = _loss_backward(dtype)
    gen = torch.Generator().manual_seed(0)
    for bb, tt in [(1, 1), (2, 9), (3, 70)]:
        logits = rand(bb, tt, V, dtype=dtype, gen=gen)
        vals = {"logits": logits, "lse": torch.logsumexp(logits.float(), -1),
                "scale": torch.rand(bb, tt, generator=gen),
                "tgt": torch.randint(0, V, (bb, tt), generator=gen),
                "x": rand(bb, tt, D, dtype=dtype, gen=gen),
                "w": rand(V, D, dtype=dtype, gen=gen)}
        p = run(g, vals, dtype)
        assert not _kernels(p, "pointwise")             # dlogits is never stored
        assert len(_kernels(p, "matmul")) == 2
        (rec,) = _records(p, "fused")
        assert "A/B operand loads" in rec and "its kernel removed" in rec, rec
        # the same graph with the pass off: dlogits is a kernel of its own, same results
        q = run(g, vals, dtype, disable=("fuse_matmul_prologues",))
        assert len(_kernels(q, "pointwise")) == 1


def test_an_exp_recomputed_by_many_tiles_stays_in_its_kernel():
    """At a width of 300 (five column tiles of 64 in dX, five row tiles in dW) the exp would
    run five times per element: dlogits stays a kernel, and the record says why."""
    p = TritonProgram(_loss_backward("f32", D=300))
    assert len(_kernels(p, "pointwise")) == 1 and not _records(p, "fused")
    (why,) = _records(p, "declined")
    assert "its exp would run again in each of the 5 column tiles" in why, why
    assert "(N = 300); its kernel computes it once" in why, why


def test_the_recompute_rule_can_be_lifted_to_measure_it(monkeypatch):
    """LMC_PROLOGUE_RECOMPUTE=1 (gpu_session.sh train:prologue) takes the exp anyway."""
    monkeypatch.setenv("LMC_PROLOGUE_RECOMPUTE", "1")
    g = _loss_backward("f32", D=300)
    p = TritonProgram(g)
    assert not _kernels(p, "pointwise") and len(_records(p, "fused")) == 1
    gen = torch.Generator().manual_seed(9)
    logits = rand(2, 5, V, gen=gen)
    run(g, {"logits": logits, "lse": torch.logsumexp(logits, -1),
            "scale": torch.rand(2, 5, generator=gen),
            "tgt": torch.randint(0, V, (2, 5), generator=gen),
            "x": rand(2, 5, 300, gen=gen), "w": rand(V, 300, gen=gen)})


def test_the_generated_loads_read_the_prologue_inputs():
    p = TritonProgram(_loss_backward("f32"))
    src = p.source
    mm = [n.attrs["kernel"] for n in _kernels(p, "matmul")]
    assert sorted(mm) == [f"lmc_mm_cast_sub_exp_mul_matmul_{i}" for i in (0, 1)], mm
    assert "# A computed here from its prologue's inputs" in src
    assert "# B computed here from its prologue's inputs" in src
    assert src.count("tl.exp(") >= 2


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_b_through_a_permute_and_a_gated_pairs_shared_a(dtype):
    """y = x @ (relu(w) * c)^T (the prologue's value permuted), and a SwiGLU whose A is
    pointwise of one tensor and a per-row scale: one A prologue, two accumulators (its tanh
    is taken: 29 columns are one column tile)."""
    b = Builder({}, {})
    x = b.input("x", [B, T, D], dtype)
    w = b.input("w", [23, D], dtype)
    c = b.input("c", [D], dtype)
    h = b.input("h", [B, T, D], dtype)
    r = b.input("r", [B, T, 1], dtype)
    w1 = b.input("w1", [D, 29], dtype)
    w3 = b.input("w3", [D, 29], dtype)
    y = x @ b.transpose(b.relu(w) * c + 0.1, 0, 1)
    a = b.tanh(h) * r + 0.5
    z = b.silu(a @ w1) * (a @ w3)
    g = Graph("pro", b.nodes, {"y": y.node, "z": z.node})
    gen = torch.Generator().manual_seed(1)
    for bb, tt in [(1, 1), (2, 33)]:
        vals = {"x": rand(bb, tt, D, dtype=dtype, gen=gen), "w": rand(23, D, dtype=dtype,
                                                                      gen=gen),
                "c": rand(D, dtype=dtype, gen=gen), "h": rand(bb, tt, D, dtype=dtype, gen=gen),
                "r": rand(bb, tt, 1, dtype=dtype, gen=gen),
                "w1": rand(D, 29, dtype=dtype, gen=gen) * 0.3,
                "w3": rand(D, 29, dtype=dtype, gen=gen) * 0.3}
        p = run(g, vals, dtype)
        assert not _kernels(p, "pointwise") and len(_kernels(p, "matmul")) == 2
        assert sorted(r.split(" operand")[0].rsplit(" ", 1)[1] for r in _records(p, "fused")) \
            == ["A", "B"]


def test_a_reshape_the_broadcast_cannot_view_is_read_from_a_copy():
    """B = reshape(a * c, [B*T, V]) with c [B, 1, V]: broadcast over T, c cannot be seen as
    [B*T, V] through strides, so the launch passes a copy; a [B, T, V] and a [V] can."""
    b = Builder({}, {})
    a = b.input("a", [B, T, V], "f32")
    c = b.input("c", [B, 1, V], "f32")
    e = b.input("e", [V], "f32")
    x = b.input("x", [B, T, D], "f32")
    dw = b.transpose(b.reshape(x, [B * T, D]), 0, 1) @ b.reshape(a * c + e, [B * T, V])
    g = Graph("copy", b.nodes, {"dw": dw.node})
    gen = torch.Generator().manual_seed(3)
    for bb, tt in [(1, 1), (3, 10)]:
        p = run(g, {"a": rand(bb, tt, V, gen=gen), "c": rand(bb, 1, V, gen=gen),
                    "e": rand(V, gen=gen), "x": rand(bb, tt, D, gen=gen)})
        assert not _kernels(p, "pointwise") and len(_kernels(p, "matmul")) == 1


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_both_operands_computed_in_one_kernel(dtype):
    """relu(x) * r @ (w * c + 0.5): A's prologue taken in one round, B's in the next."""
    b = Builder({}, {})
    x = b.input("x", [B, T, D], dtype)
    r = b.input("r", [B, T, 1], dtype)
    w = b.input("w", [D, 29], dtype)
    c = b.input("c", [29], dtype)
    g = Graph("both", b.nodes, {"y": ((b.relu(x) * r) @ (w * c + 0.5)).node})
    gen = torch.Generator().manual_seed(6)
    for bb, tt in [(1, 1), (2, 21)]:
        p = run(g, {"x": rand(bb, tt, D, dtype=dtype, gen=gen),
                    "r": rand(bb, tt, 1, dtype=dtype, gen=gen),
                    "w": rand(D, 29, dtype=dtype, gen=gen) * 0.3,
                    "c": rand(29, dtype=dtype, gen=gen)}, dtype)
        assert not _kernels(p, "pointwise") and len(_kernels(p, "matmul")) == 1
        assert len(_records(p, "fused")) == 2
    assert "# A computed here" in p.source and "# B computed here" in p.source


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_the_vertical_form_takes_a_products_a_and_another_products_b(dtype):
    """dX = (g * s) @ W1 + x2 @ W2 (products of different A in one accumulator: the first
    A computed in its K loop), and dW = u^T @ reshape(h * c) + v^T @ y2 (the first B computed
    through a reshape, batch rows folded), as medit_one's attention backward has them."""
    b = Builder({}, {})
    gg = b.input("g", [B, T, D], dtype)
    sc = b.input("s", [B, T, 1], dtype)
    x2 = b.input("x2", [B, T, 13], dtype)
    w1 = b.input("w1", [D, 24], dtype)
    w2 = b.input("w2", [13, 24], dtype)
    dx = (gg * sc) @ w1 + x2 @ w2
    h = b.input("h", [B, T, 4, 6], dtype)
    c = b.input("c", [6], dtype)
    u = b.input("u", [B * T, 11], dtype)
    v = b.input("v", [B * T, 11], dtype)
    y2 = b.input("y2", [B * T, 24], dtype)
    dw = b.transpose(u, 0, 1) @ b.reshape(h * c, [B * T, 24]) + b.transpose(v, 0, 1) @ y2
    g = Graph("vertical", b.nodes, {"dx": dx.node, "dw": dw.node})
    gen = torch.Generator().manual_seed(8)
    for bb, tt in [(1, 1), (2, 37)]:
        r = bb * tt
        p = run(g, {"g": rand(bb, tt, D, dtype=dtype, gen=gen),
                    "s": rand(bb, tt, 1, dtype=dtype, gen=gen),
                    "x2": rand(bb, tt, 13, dtype=dtype, gen=gen),
                    "w1": rand(D, 24, dtype=dtype, gen=gen) * 0.3,
                    "w2": rand(13, 24, dtype=dtype, gen=gen) * 0.3,
                    "h": rand(bb, tt, 4, 6, dtype=dtype, gen=gen),
                    "c": rand(6, dtype=dtype, gen=gen),
                    "u": rand(r, 11, dtype=dtype, gen=gen) * 0.3,
                    "v": rand(r, 11, dtype=dtype, gen=gen) * 0.3,
                    "y2": rand(r, 24, dtype=dtype, gen=gen)}, dtype)
        assert not _kernels(p, "pointwise") and len(_kernels(p, "matmul")) == 2
        assert len(_records(p, "fused")) == 2
    assert p.source.count("one K loop per product into one accumulator") == 2
    assert "# A computed here" in p.source and "# B computed here" in p.source


def test_a_node_of_the_pointwise_body_that_nothing_reads_is_left_behind():
    """No DCE runs inside a fused body: a dead exp there is neither copied into the matmul
    kernel (it would be taken for an epilogue node) nor counted by the cost rule."""
    b = Builder({}, {})
    x = b.input("x", [B, T, D], "f32")
    w = b.input("w", [D, 200], "f32")
    a = b.relu(x) * 2.0
    b.exp(a) + 1.0                          # read by nothing
    g = Graph("dead", b.nodes, {"y": (a @ w).node})
    gen = torch.Generator().manual_seed(7)
    p = run(g, {"x": rand(2, 5, D, gen=gen), "w": rand(D, 200, gen=gen)})
    assert not _kernels(p, "pointwise") and len(_records(p, "fused")) == 1
    (mm,) = _kernels(p, "matmul")
    assert not any(n.op is Op.EXP for n in mm.attrs["body"].nodes)


def test_a_b_prologue_counts_the_rows_of_every_batch_entry():
    """x[8, 40, K] @ exp(w): the batch folds into 320 rows, 5 row tiles of 64 each running
    the exp again; one batch entry of 40 rows is one tile."""
    def graph(batch):
        b = Builder({}, {})
        x = b.input("x", [batch, 40, D], "f32")
        w = b.input("w", [D, 23], "f32")
        return Graph("rows", b.nodes, {"y": (x @ b.exp(w * 0.1)).node})
    p = TritonProgram(graph(8))
    (why,) = _records(p, "declined")
    assert "its exp would run again in each of the 5 row tiles" in why and "rows = 320" in why
    p = TritonProgram(graph(1))
    assert _records(p, "fused") and not _records(p, "declined")


def test_lanes_outside_the_tile_are_zero_even_where_the_prologue_is_not_finite():
    """1 / x of the zeros a masked load reads is inf; times a zero of the other operand
    that would be NaN in every output. K = 37 leaves masked lanes in the last K block."""
    b = Builder({}, {})
    x = b.input("x", [13, V], "f32")
    w = b.input("w", [V, 11], "f32")
    g = Graph("recip", b.nodes, {"y": ((1.0 / x) @ w).node})
    x0 = torch.rand(13, V) + 0.5
    p = run(g, {"x": x0, "w": torch.randn(V, 11)})
    assert len(_kernels(p, "matmul")) == 1 and not _kernels(p, "pointwise")


def test_declines_say_why():
    """Each case its own row count, so fuse_pointwise does not merge them into one kernel."""
    b = Builder({}, {})
    w = b.input("w", [16, 16], "f32")
    xs = {f"x{i}": b.input(f"x{i}", [m, 16], "f32") for i, m in enumerate([7, 7, 7, 5, 9])}
    sq = b.input("sq", [16, 16], "f32")
    twice = b.relu(sq) * 2.0                      # A and, through a permute, B of one matmul
    three = xs["x0"] * xs["x1"] + xs["x2"]        # three tensors of the operand's size
    shared = b.tanh(xs["x3"]) * 2.0               # also read through a view, not multiplied
    seen = b.exp(xs["x4"])                        # also read by the epilogue
    g = Graph("declines", b.nodes, {
        "a": (three @ w).node, "c": (shared @ w).node, "d": b.reshape(shared, [80]).node,
        "e": ((seen @ w) + seen).node, "f": (twice @ b.transpose(twice, 0, 1)).node})
    gen = torch.Generator().manual_seed(2)
    vals = {k: rand(*x.shape, gen=gen) for k, x in xs.items()}
    p = run(g, {**vals, "w": rand(16, 16, gen=gen), "sq": rand(16, 16, gen=gen)})
    why = " | ".join(_records(p, "declined"))
    assert "reads 3 tensors of its output's size" in why, why
    assert "reshape reads it too" in why, why
    assert "the epilogue reads the value too" in why, why
    assert "a matmul kernel reads it twice" in why, why
    assert not _records(p, "fused")
    assert len(_kernels(p, "matmul")) == 4 and len(_kernels(p, "pointwise")) == 4


@st.composite
def prologue_graph(draw):
    """A pointwise chain over a [B, T, K] tensor, a per-row [B, T, 1], a per-column [K] and
    maybe a second full tensor, read as A of (x @ W) or, through a reshape or a permute, as
    B of a product; ops cheap and costly; K ragged."""
    k = draw(st.sampled_from([1, 5, 17, 40]))
    n = draw(st.sampled_from([3, 16, 33]))
    dtype = draw(st.sampled_from(["f32", "f16"]))
    b = Builder({}, {})
    x = b.input("x", [B, T, k], dtype)
    row = b.input("row", [B, T, 1], dtype)
    col = b.input("col", [k], "f32")
    x2 = b.input("x2", [B, T, k], dtype)
    h = b.cast(x, "f32")
    used = set()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["row", "col", "x2", "tanh", "relu", "where", "exp", "div"]))
        used.add(op)
        if op == "row":
            h = h * b.cast(row, "f32")
        elif op == "col":
            h = h + col
        elif op == "x2":
            h = h - b.cast(x2, "f32")
        elif op == "tanh":
            h = b.tanh(h)
        elif op == "relu":
            h = b.relu(h) * 0.5
        elif op == "where":
            h = b.where(h > 0.1, h, col * 0.25)
        elif op == "exp":
            h = b.exp(b.minimum(h, 2.0))
        else:
            h = h / (b.abs(h) + 1.0)
    a = b.cast(h, dtype)
    role = draw(st.sampled_from(["A", "B-reshape", "B-permute"]))
    if role == "A":
        out = a @ b.input("w", [k, n], dtype)
    elif role == "B-reshape":       # y[n, k] = v^T[n, B*T] @ a[B*T, k]
        v = b.input("w", [B, T, n], dtype)
        out = b.transpose(b.reshape(v, [B * T, n]), 0, 1) @ b.reshape(a, [B * T, k])
    else:                           # y[B, n, T] = w[n, k] @ a^T[B, k, T]
        out = b.input("w", [n, k], dtype) @ b.transpose(a, 1, 2)
    # tensors of the operand's size it reads: x, x2, and at K = 1 the per-row one too
    full = 1 + ("x2" in used) + (k == 1 and "row" in used)
    return Graph("prologue", b.nodes, {"y": out.node}), k, n, dtype, role, full


@settings(max_examples=20, deadline=None)
@given(case=prologue_graph(), bt=st.sampled_from([(1, 1), (2, 7), (3, 33)]),
       seed=st.integers(0, 1000))
def test_random_prologues_equal_the_oracle(case, bt, seed):
    g, k, n, dtype, role, full_inputs = case
    bb, tt = bt
    gen = torch.Generator().manual_seed(seed)
    w = {"A": (k, n), "B-reshape": (bb, tt, n), "B-permute": (n, k)}[role]
    vals = {"x": rand(bb, tt, k, dtype=dtype, gen=gen), "row": rand(bb, tt, 1, dtype=dtype,
                                                                     gen=gen),
            "col": rand(k, gen=gen), "x2": rand(bb, tt, k, dtype=dtype, gen=gen),
            "w": rand(*w, dtype=dtype, gen=gen) * 0.3}
    p = run(g, vals, dtype)
    if full_inputs > 2:
        assert any("reads 3 tensors of its output's size" in r
                   for r in _records(p, "declined")), _records(p, "declined")
        return
    # everything here is one tile wide on the other side (n <= 128, or B*T <= 128 rows of a
    # B prologue), so every chain is taken: one matmul kernel, no pointwise kernel of the
    # operand's size (fuse_pointwise may leave a per-row or per-column value, [B, T, 1] or
    # [K], a kernel of its own: computed once, read by the prologue as an input)
    full = next(n for n in g.nodes if n.op is Op.INPUT and n.attrs["name"] == "x").type.shape
    assert len(_kernels(p, "matmul")) == 1 and _records(p, "fused"), _records(p, "declined")
    assert all(n.type.shape != full for f in _kernels(p, "pointwise") for n in
               f.attrs["body"].outputs.values()), p.graph
