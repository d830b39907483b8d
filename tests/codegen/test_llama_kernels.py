"""Every generated kernel of zoo/llama's small preset (the real 100,352-token vocabulary),
forward and backward, against the oracle: each launch is checked, on the activations the
model really produces, against its own body graph run by the torch references."""
import os

import pytest
import torch
from conftest import ZOO

import lmc
from lmc.passes import run_pipeline
from lmc.passes.loss import with_loss
from lmc.runtime.executor import run_graph
from lmc.runtime.module import LmcModel

LLAMA = os.path.join(ZOO, "llama.yaml")


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def _checked(program, seen):
    """Wrap a TritonProgram's launchers so each launch is compared with its body."""
    def wrap(kind, go):
        def launch(kernel, xs, outs, node, ctx):
            go(kernel, xs, outs, node, ctx)
            body = node.attrs["body"]
            names = [n.attrs["name"] for n in body.nodes if n.op.value == "input"]
            want = run_graph(body, dict(zip(names, xs)), ctx)
            for o, (k, w) in zip(outs, want.items()):
                tol = 1e-5 * max(1.0, float(w.abs().max())) if w.is_floating_point() else 0
                err = float((o.double() - w.double()).abs().max()) if o.numel() else 0.0
                assert err <= tol, f"{node.attrs['kernel']} output {k}: max err {err:.3g}"
            seen[kind] = seen.get(kind, 0) + 1
        return launch
    program._launch = {k: wrap(k, go) for k, go in program._launch.items()}


def test_every_llama_small_kernel_matches_its_body():
    graph = run_pipeline(with_loss(lmc.load(LLAMA, preset="small").graph))
    model = LmcModel(graph, backend="triton", seed=3)      # with the training loss
    prog = model.program()
    seen = {}
    _checked(prog.forward_exec, seen)
    _checked(prog.backward_exec, seen)
    ids = torch.randint(0, 100352, (2, 7))
    targets = torch.randint(0, 100352, (2, 7))
    targets[0, 0] = -1                                      # an ignored position
    out = model(ids, targets=targets)
    (out["loss"] * 3.0 + (out["logits"] * torch.randn_like(out["logits"])).sum()).backward()
    kinds = {n.attrs["kind"] for p in (prog.forward_exec, prog.backward_exec)
             for n in p.graph.nodes if n.op.value == "fused"}
    assert kinds <= set(seen), (kinds, seen)
    launched = sum(seen.values())
    assert launched == prog.forward_exec.launches + prog.backward_exec.launches
    assert all(p.grad is not None for p in model.parameters())


def test_identical_kernels_are_one_function():
    """The same block in every layer generates the same kernel but for its name: the module
    defines it once and binds the other names to it (one compile, one autotune per shape),
    while kernels that differ in anything else stay separate."""
    from lmc.codegen.program import fused_nodes, kind_module

    model = LmcModel(run_pipeline(with_loss(lmc.load(LLAMA, preset="tiny").graph)),
                     backend="triton", seed=0)
    prog = model.program()
    for p in (prog.forward_exec, prog.backward_exec):
        srcs = {}
        for n in fused_nodes(p.graph):
            src = kind_module(n.attrs["kind"]).generate(n.attrs["body"], n.attrs["kernel"])
            if src:
                srcs[n.attrs["kernel"]] = src.replace(n.attrs["kernel"], "@")
        by_obj = {}
        for name in srcs:
            by_obj.setdefault(id(p.kernels[name]), []).append(name)
        assert len(by_obj) == len(set(srcs.values())) < len(srcs)
        for names in by_obj.values():          # one function: one source up to the name
            assert len({srcs[k] for k in names}) == 1
            assert p.kernels[names[0]].__name__ == names[0]    # the first launched holds it
            for k in names[1:]:
                assert f"\n{k} = {names[0]}\n" in p.source


def test_a_kernel_module_holds_the_helpers_it_calls_and_names_its_templates():
    """Only the device helpers a module's kernels call (through another helper too) are in
    it (every module held all four); template launches, whose kernels are hand-written, are
    listed with their file and the YAML lines they came from."""
    import re

    from lmc.codegen.program import module_source
    for path, called, absent in ((LLAMA, set(), {"_tanh", "_softplus", "_round_half_even"}),
                                 (os.path.join(ZOO, "..", "examples", "gemma2.yaml"),
                                  {"_tanh"}, {"_softplus", "_log1p"})):
        model = LmcModel(lmc.load(path, preset="tiny").graph, backend="triton", seed=0)
        for p in (model.program().forward_exec, model.program().backward_exec):
            src = module_source(p.graph)
            defined = set(re.findall(r"(?m)^def (_\w+)\(", src))
            assert defined == called and not defined & absent, defined
            for name in defined:
                assert re.search(rf"(?m)^def lmc_[\s\S]*\b{name}\(", src)
            assert "# launched from hand-written templates" in src
            assert re.search(r"#   lmc_rope_attention_0(_bwd)?: rope_attention(_bwd)? in "
                             r"lmc/codegen/attention\.py, from \w+\.yaml lines \d+", src), src
    # a helper reached only through another (_softplus calls _log1p) comes with it
    from lmc.codegen.pointwise import HELPERS
    from lmc.codegen.program import _used_helpers
    got = _used_helpers([HELPERS], "x = _softplus(y)")
    assert "def _softplus(" in got and "def _log1p(" in got and "def _tanh(" not in got


def test_the_loss_logsumexp_is_in_the_head_matmul_kernel():
    """Training forward: cross-entropy's logsumexp over the vocabulary is computed by the
    head's matmul kernel (fuse_matmul_reductions), which still stores the logits (the
    loss's gather and the backward read them): no reduction kernel reads them back."""
    from lmc.ir.ops import Op

    model = LmcModel(run_pipeline(with_loss(lmc.load(LLAMA, preset="tiny").graph)),
                     backend="triton", seed=0)
    g = model.program().forward_exec.graph
    red = [n for n in g.nodes if n.op is Op.FUSED and n.attrs["kind"] == "reduction"
           and any(b.op is Op.LOGSUMEXP for b in n.attrs["body"].nodes)]
    head = [n for n in g.nodes if n.op is Op.FUSED and n.attrs["kind"] == "matmul"
            and any(b.op is Op.LOGSUMEXP for b in n.attrs["body"].nodes)]
    assert not red and len(head) == 1
    assert [str(t) for t in head[0].type] == ["f32[B,T,512]", "f32[B,T]"], head[0].type


def _copying_reshapes(monkeypatch):
    """A list that gets the input shape of every reshape that copies (its result does not
    share the input's storage) from now on."""
    from lmc.ir.ops import Op
    from lmc.ops import reference as R
    copies = []
    real = R.REFERENCE[Op.RESHAPE]

    def reshape(ctx, xs, attrs):
        y = real(ctx, xs, attrs)
        if y.untyped_storage().data_ptr() != xs[0].untyped_storage().data_ptr():
            copies.append(tuple(xs[0].shape))
        return y
    monkeypatch.setitem(R.REFERENCE, Op.RESHAPE, reshape)
    return copies


def test_attention_outputs_are_stored_in_their_readers_order(monkeypatch):
    """Attention's out [B, H, T, D] (and the backward's dq, dk, dv) are read as permute ->
    reshape [B, T, H * D]: the wrapper allocates them in the permuted order, the kernels
    write through strides, and no reshape of the training step copies (one would cost a
    read and a write of the tensor per layer on a GPU); the step still equals the torch
    backend's."""
    copies = _copying_reshapes(monkeypatch)
    graph = run_pipeline(with_loss(lmc.load(LLAMA, preset="tiny").graph))
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    grads = []
    for backend in ("triton", "torch"):
        model = LmcModel(graph, backend=backend, seed=1, grad_outputs=["loss"])
        model(ids, targets=ids)["loss"].backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
        if backend == "triton":
            assert copies == []
            prog = model.program()
            layers = lmc.load(LLAMA, preset="tiny").config["layers"]
            for exe, n in ((prog.forward_exec, 1), (prog.backward_exec, 3)):
                assert exe.program_source.count("stored in its reader's order") == n * layers
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["minimax", "yoco"])
def test_linear_attention_output_is_stored_in_its_readers_order(model, monkeypatch):
    """minimax's lightning attention and yoco's retention (linear_attention kernels, yoco's
    group norm a reduction kernel, its rope backward a pointwise kernel) too: no reshape of
    the training step copies."""
    copies = _copying_reshapes(monkeypatch)
    graph = run_pipeline(with_loss(lmc.load(os.path.join(ZOO, f"{model}.yaml"),
                                            preset="tiny").graph))
    model = LmcModel(graph, backend="triton", seed=1, grad_outputs=["loss"])
    ids = torch.randint(0, model.config["vocab"], (2, 9),
                        generator=torch.Generator().manual_seed(0))
    model(ids, targets=ids)["loss"].backward()
    prog = model.program()
    kinds = {n.attrs["kind"] for n in prog.backward_exec.graph.nodes
             if n.op.value == "fused"}
    assert "linear_attention_bwd" in kinds and copies == []
