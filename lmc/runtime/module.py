"""A compiled graph as a torch `nn.Module` with real `nn.Parameter`s.

Parameter names follow the graph (``layers.3.attn.wq``) through a tree of submodules, so
`state_dict()` keys are the familiar dotted names and any torch optimizer works.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..errors import LmcError
from ..ir.graph import Graph
from ..ir.ops import Op
from ..ops.reference import RefCtx
from .executor import bind_dims, run_graph
from .function import GraphFunction


class LmcModel(nn.Module):
    def __init__(self, graph: Graph, *, seed: int = 0, device=None, autodiff: str = "lmc",
                 backend: str = "torch", grad_outputs: Optional[Sequence[str]] = None,
                 freeze: Sequence[str] = ()):
        """grad_outputs: the outputs gradients flow back from (lmc autodiff). None: every
        float output. Training names only ``loss``: the other outputs (logits, logged
        statistics) are then returned without gradient, and the backward neither takes nor
        reads a zero cotangent of each (for the logits, a [B, T, vocab] tensor).
        freeze: patterns (fnmatch, on dotted names: ``embed``, ``layers.*.attn.*``) of
        parameters that take no gradient, beside those the file marks ``trainable: false``:
        they are nn.Parameters with requires_grad False, and the backward graph computes no
        gradient for them (a frozen head's weight-gradient product is not run)."""
        super().__init__()
        if not isinstance(graph, Graph):
            hint = " (pass its .graph, or use lmc.load)" if hasattr(graph, "graph") else ""
            raise LmcError(f"LmcModel takes a Graph, got {type(graph).__name__}{hint}")
        if isinstance(freeze, str):              # one pattern
            freeze = [freeze]
        if isinstance(grad_outputs, str):
            grad_outputs = [grad_outputs]
        if backend not in ("torch", "triton"):
            raise LmcError(f"unknown backend {backend!r} (available: torch, triton)")
        self.backend = backend
        self._inference = None
        if autodiff not in ("lmc", "torch"):
            raise LmcError(f"autodiff must be 'lmc' (the IR pass) or 'torch', got {autodiff!r}")
        self.graph = graph
        # "lmc": gradients come from the autodiff pass's backward graph (the default);
        # "torch": torch autograd differentiates the op-by-op execution (the oracle)
        self.autodiff = autodiff
        # random ops (dropout, router noise) in train mode draw from (seed, rng_step): the same
        # masks until it changes, so a run replays exactly; a training loop sets it before
        # each forward (lmc run --train: step, micro-batch and rank)
        self.rng_step = 0
        self.disable = ()  # fusion passes left out of the triton backend (lmc bench)
        self._program = None
        unknown = [n for n in grad_outputs or () if n not in graph.outputs]
        if unknown:
            raise LmcError(f"grad_outputs: {', '.join(unknown)} not an output of the model "
                           f"(outputs: {', '.join(graph.outputs)})")
        self.grad_outputs = None if grad_outputs is None else list(grad_outputs)
        self.config: Dict[str, Any] = dict(graph.meta.get("config", {}))
        self.name = graph.name
        self._param_names = []
        names = [p.attrs["name"] for p in graph.params]
        for pat in freeze:
            if not fnmatch.filter(names, pat):
                raise LmcError(f"--freeze {pat}: no parameter matches (parameters: "
                               f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
        self.frozen = {p.attrs["name"] for p in graph.params
                       if p.attrs.get("trainable", True) is False
                       or any(fnmatch.fnmatchcase(p.attrs["name"], pat) for pat in freeze)}
        gen = torch.Generator().manual_seed(seed)
        for p in graph.params:
            name = p.attrs["name"]
            shape = [int(d) for d in p.type.shape]
            t = torch.empty(shape, dtype=p.type.dtype.torch())
            p.attrs["init"].apply(t, gen)
            self._register(name, nn.Parameter(t, requires_grad=name not in self.frozen))
            self._param_names.append(name)
        if device is not None:
            self.to(device)

    def _register(self, dotted: str, param: nn.Parameter) -> None:
        *path, leaf = dotted.split(".")
        mod: nn.Module = self
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        mod.register_parameter(leaf, param)

    def forward(self, ids: Optional[torch.Tensor] = None, **inputs):
        """forward(ids) -> logits (or a dict when the graph has several outputs)."""
        if ids is not None:
            first = self.graph.inputs[0].attrs["name"]
            inputs[first] = ids
        max_seq = self.config.get("max_seq")
        bound = dict(self.named_parameters())
        self._check_call(bound, inputs)
        bound.update(inputs)
        dims = bind_dims(self.graph, bound)
        if max_seq is not None and dims.get("T", 0) > max_seq:
            raise LmcError(f"sequence length {dims['T']} exceeds the model's max_seq {max_seq}")
        dev = next(iter(bound.values())).device if bound else torch.device("cpu")
        ctx = RefCtx(dims=dims, device=dev, training=self.training, rng_step=self.rng_step)
        if self.autodiff == "lmc" and torch.is_grad_enabled() and any(
                v.requires_grad for v in bound.values()):
            self._follow_requires_grad()
            names = list(bound)
            results = GraphFunction.apply(self.program(), names, ctx,
                                          *[bound[n] for n in names])
            outs = dict(zip(self.graph.outputs, results))
        elif self.backend == "triton":
            outs = self.inference_program().run(bound, ctx)
        else:
            outs = run_graph(self.graph, bound, ctx)
        return next(iter(outs.values())) if len(outs) == 1 else outs

    def _check_call(self, params: Dict[str, Any], inputs: Dict[str, Any]) -> None:
        """The keyword inputs are the graph's inputs (their values: bind_dims), and the
        parameters still have the graph's shapes and dtypes (one was replaced, or
        model.half() cast them: lmc compiles a precision into the graph, `--precision` /
        mixed_precision)."""
        names = [n.attrs["name"] for n in self.graph.inputs]
        for k in inputs:
            if k not in names:
                what = "a parameter, not an input" if k in params else "not an input"
                raise LmcError(f"{k!r} is {what} of the model (inputs: {', '.join(names)})")
        for p in self.graph.params:
            name = p.attrs["name"]
            t = params.get(name)
            want = tuple(int(d) for d in p.type.shape)
            # (the torch backend in fp64 is the oracle lmc verify breaks ties with)
            cast = t is not None and t.dtype != p.type.dtype.torch() and not (
                self.backend == "torch" and t.dtype == torch.float64)
            if t is None or tuple(t.shape) != want or cast:
                got = "missing" if t is None else \
                    f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"
                raise LmcError(f"parameter {name!r} is {got}, the model's is "
                               f"{p.type.dtype.value} {list(want)} (a parameter replaced, or "
                               "the model cast: set a precision with --precision / "
                               "passes.mixed_precision instead of .half())")

    def _follow_requires_grad(self) -> None:
        """A parameter frozen or unfrozen after construction (requires_grad_) changes what the
        backward graph differentiates: the program is built again for the new set (else an
        unfrozen parameter silently got no gradient)."""
        now = {n for n, p in self.named_parameters() if not p.requires_grad}
        if now != self.frozen:
            self.frozen = now
            self._program = None

    def program(self):
        """The differentiated program (forward' + backward), built on first use."""
        if self._program is None:
            from ..passes import run_pipeline
            from ..passes.autodiff import differentiate

            g = self.pattern_graph()
            # every parameter but the frozen ones, and float inputs
            wrt = [n.attrs["name"] for n in g.nodes
                   if (n.op is Op.PARAM and n.attrs["name"] not in self.frozen)
                   or (n.op is Op.INPUT and n.type.dtype.is_float)]
            prog = differentiate(g, wrt=wrt, outputs=self.grad_outputs)
            prog.backward = run_pipeline(prog.backward)  # the backward is cleaned like any graph
            if self.backend == "triton":  # both graphs are fused and code-generated alike
                from .triton_backend import TritonProgram
                prog.forward_exec = TritonProgram(prog.forward, self.disable, "forward")
                prog.backward_exec = TritonProgram(prog.backward, self.disable, "backward")
            self._program = prog
        return self._program

    def pattern_graph(self):
        """The graph the backend runs: on the triton backend, pattern fusions (rope +
        attention) put their fused ops in before autodiff, so the VJP is the fused backward;
        the torch backend runs the primitives (the oracle)."""
        if self.backend != "triton":
            return self.graph
        from ..codegen.program import apply_patterns
        return apply_patterns(self.graph, self.disable)

    def inference_program(self):
        """The forward graph compiled for the backend (no gradients needed)."""
        if self._inference is None:
            from .triton_backend import TritonProgram
            self._inference = TritonProgram(self.pattern_graph(), self.disable)
        return self._inference

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
