"""zoo/medit_one.yaml: attention across features; tokens mix only through the running mean.

The distinguishing fact (issue 5), checked on the compiled graph: the per-layer cumsum along T
is the only op that mixes positions; with it cut, every position's logits depend on its own
token alone; and logits at t depend on other tokens only through the running means m. Then
parity with a hand-written PyTorch medit_one (tests/reference_medit_one.py), its token-by-token
decode form (a running sum per layer), and gradients.
"""
import os

import pytest
import torch
from conftest import ZOO
from reference_medit_one import MeditOne

import lmc
from lmc.ir.dims import Dim
from lmc.ir.graph import Graph, Node
from lmc.ir.ops import Op
from lmc.ops.reference import RefCtx
from lmc.runtime.executor import run_graph

PATH = os.path.join(ZOO, "medit_one.yaml")
T_DIM = Dim.sym("T")


def _ref_tensors(ref, name):
    """The reference's tensors behind lmc parameter `name` and how lmc lays them out:
    "same", "T" (lmc stores [in, out], nn.Linear [out, in]) or "experts" (a routed
    projection's experts side by side: [din, experts * d])."""
    if name == "embed":
        return [ref.embed.weight], "same"
    if name.endswith(".weight"):
        return [ref.get_parameter(name)], "same"
    mod, _, leaf = name.rpartition(".")
    owner = ref.get_submodule(mod) if mod else ref
    if leaf == "w" and hasattr(owner, "experts"):
        return [e.weight for e in owner.experts], "experts"
    return [ref.get_parameter(name + ".weight")], "T"


def _as_lmc(ts, kind):
    return {"same": lambda: ts[0], "T": lambda: ts[0].T,
            "experts": lambda: torch.cat([t.T for t in ts], 1)}[kind]()


def _pair(seed=1, **overrides):
    model = lmc.load(PATH, preset="tiny", seed=seed, **overrides)
    ref = MeditOne(model.config)
    assert sum(t.numel() for t in ref.parameters()) == model.num_params()
    with torch.no_grad():
        for name, p in model.named_parameters():
            ts, kind = _ref_tensors(ref, name)
            if kind == "same":
                ts[0].copy_(p)
            elif kind == "T":
                ts[0].copy_(p.T)
            else:
                for t, chunk in zip(ts, p.split(ts[0].shape[0], 1)):
                    t.copy_(chunk.T)
            assert torch.equal(_as_lmc(ts, kind), p), name
    return model, ref


def _rewrite(g: Graph, replace) -> Graph:
    """A copy of `g` where each CUMSUM node c is replaced by replace(c, new_input)."""
    new, nodes = {}, []
    for n in g.nodes:
        ins = tuple(new[i] for i in n.inputs)
        if n.op is Op.CUMSUM:
            r = replace(n, ins[0])
            if r is not ins[0]:
                nodes.append(r)
            new[n] = r
            continue
        m = n if ins == n.inputs else n.replace(inputs=ins)
        nodes.append(m)
        new[n] = m
    inputs = [n for n in nodes if n.op is Op.INPUT]  # graph inputs first, for bind_dims
    nodes = inputs + [n for n in nodes if n.op is not Op.INPUT]
    return Graph(g.name, nodes, {k: new[v] for k, v in g.outputs.items()}, g.meta)


def _run(model, graph, ids, **extra):
    bound = dict(model.named_parameters())
    bound.update(extra, ids=ids)
    ctx = RefCtx(dims={"B": ids.shape[0], "T": ids.shape[1]}, device=torch.device("cpu"),
                 training=False)
    with torch.no_grad():
        return run_graph(graph, bound, ctx)


def _is_t(dim):
    return isinstance(dim, Dim) and dim == T_DIM


def test_only_the_running_mean_mixes_positions():
    """Structure: no causal mask, no reduction/softmax over T and no matmul contracting T;
    one cumsum along T per layer, divided by the 1-based position."""
    model = lmc.load(PATH, preset="tiny")
    g = model.graph
    assert not [n for n in g.nodes if n.op is Op.CAUSAL_MASK]
    cumsums = [n for n in g.nodes if n.op is Op.CUMSUM]
    assert len(cumsums) == model.config["layers"]
    for n in cumsums:
        assert _is_t(n.inputs[0].type.shape[n.attrs["axis"]])
    for n in g.nodes:
        if n.op in (Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP, Op.SOFTMAX):
            assert not _is_t(n.inputs[0].type.shape[n.attrs["axis"]]), n
        if n.op is Op.MATMUL:
            assert not _is_t(n.inputs[0].type.shape[-1]), n


def test_cutting_the_running_mean_leaves_every_position_on_its_own():
    """Each cumsum replaced by its input (m_t = n_t / t): perturbing token s then changes
    the logits at s only. With the cumsum in place, it changes every later position."""
    model = lmc.load(PATH, preset="tiny", seed=5).eval()
    g = model.graph
    cut = _rewrite(g, lambda c, x: x)
    assert not [n for n in cut.nodes if n.op is Op.CUMSUM]
    vocab, T = model.config["vocab"], 10
    ids = torch.randint(0, vocab, (2, T))
    base, base_cut = _run(model, g, ids)["logits"], _run(model, cut, ids)["logits"]
    for s in (0, 4, 9):
        other = ids.clone()
        other[:, s] = (other[:, s] + 7) % vocab
        full, alone = _run(model, g, other)["logits"], _run(model, cut, other)["logits"]
        for t in range(T):
            if t == s:
                assert not torch.equal(alone[:, t], base_cut[:, t])
            else:
                assert torch.equal(alone[:, t], base_cut[:, t]), (s, t)
            if t < s:
                assert torch.equal(full[:, t], base[:, t])
            else:  # the running mean carries token s to every later position
                assert (full[:, t] - base[:, t]).abs().max() > 1e-4, (s, t)


def test_earlier_tokens_reach_t_only_through_the_running_means():
    """Feed every layer's running sum from the unperturbed run: with token s changed, the
    logits at every t != s are then exactly the unperturbed ones."""
    model = lmc.load(PATH, preset="tiny", seed=6).eval()
    g = model.graph
    cumsums = [n for n in g.nodes if n.op is Op.CUMSUM]
    probe = g.with_nodes(g.nodes, {**g.outputs, **{f"m{i}": c for i, c in enumerate(cumsums)}})
    names = {c: f"m{i}" for i, c in enumerate(cumsums)}
    fed = _rewrite(g, lambda c, x: Node.make(Op.INPUT, (), {
        "name": names[c], "shape": c.type.shape, "dtype": c.type.dtype}))
    vocab, T = model.config["vocab"], 9
    ids = torch.randint(0, vocab, (2, T))
    base = _run(model, probe, ids)
    sums = {k: v for k, v in base.items() if k.startswith("m")}
    for s in (0, 3, 7):
        other = ids.clone()
        other[:, s] = (other[:, s] + 11) % vocab
        changed = _run(model, g, other)["logits"]
        held = _run(model, fed, other, **sums)["logits"]
        for t in range(T):
            if t == s:
                assert not torch.equal(held[:, t], base["logits"][:, t])
            else:
                assert torch.equal(held[:, t], base["logits"][:, t]), (s, t)
            if t > s:  # without holding m, the change does reach t
                assert not torch.equal(changed[:, t], base["logits"][:, t])


@pytest.mark.parametrize("B,T", [(1, 1), (2, 9), (3, 16)])
@pytest.mark.parametrize("moe", [0, 1])
def test_forward_matches_reference(B, T, moe):
    torch.manual_seed(0)
    model, ref = _pair(moe=moe)
    ids = torch.randint(0, model.config["vocab"], (B, T))
    with torch.no_grad():
        got, want = model(ids), ref(ids)
    margins = [m.margin for m in ref.modules() if hasattr(m, "margin")]
    # the top-k choices sit well away from ties (fp32 rounding of the probabilities is ~1e-8)
    assert len(margins) == (4 if moe else 0) and all(g > 1e-6 for g in margins)
    assert got.shape == (B, T, model.config["vocab"])
    assert (got - want).abs().max().item() < 1e-5


def test_decode_with_a_running_sum_equals_the_forward():
    """The state decode will carry (per layer a running sum and the step count) reproduces
    the compiled forward at every position."""
    model, ref = _pair(seed=3)
    ids = torch.randint(0, model.config["vocab"], (2, 12))
    with torch.no_grad():
        got, stepped = model(ids), ref.decode(ids)
    assert (got - stepped).abs().max().item() < 1e-4


@pytest.mark.parametrize("moe", [0, 1])
def test_gradients_match_torch_autograd_on_reference(moe):
    model, ref = _pair(seed=2, moe=moe)
    assert model.autodiff == "lmc"
    ids = torch.randint(0, model.config["vocab"], (2, 10))
    g = torch.randn(2, 10, model.config["vocab"])
    (model(ids) * g).sum().backward()
    (ref(ids) * g).sum().backward()
    for name, p in model.named_parameters():
        ts, kind = _ref_tensors(ref, name)
        rg = _as_lmc([t.grad for t in ts], kind)
        assert p.grad is not None, name
        # fp32 sums over B*T*vocab terms: the error is measured against the gradient's scale
        err = (p.grad - rg).abs().max() / rg.abs().max()
        assert err < 1e-5, (name, err.item())


def test_moe_routers_depend_on_the_input_and_learn():
    """moe=1: each projection's router sends different tokens to different experts, and the
    router weights get a gradient (through the kept, renormalised probabilities)."""
    model = lmc.load(PATH, preset="tiny", seed=4, moe=1)
    g = model.graph
    routers = [p for p in g.params if p.attrs["name"].endswith(".router")]
    assert {r.attrs["name"] for r in routers} == {
        "layers.0.x_proj.router", "layers.0.hx_proj.router", "layers.0.cx_proj.router",
        "layers.1.x_proj.router"}
    picks = [n for n in g.nodes if n.op is Op.TOPK]
    assert len(picks) == len(routers)
    ids = torch.randint(0, model.config["vocab"], (2, 12))
    chosen = _run(model, g.with_nodes(g.nodes, {f"k{i}": n for i, n in enumerate(picks)}),
                  ids)
    for i in range(len(picks)):
        sets = {tuple(sorted(r.tolist())) for r in chosen[f"k{i}"].flatten(0, 1)}
        assert len(sets) > 1  # not one fixed choice for every token
    model(ids).square().mean().backward()
    for r in routers:
        assert model.get_parameter(r.attrs["name"]).grad.abs().max() > 0
