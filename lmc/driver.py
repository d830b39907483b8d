"""The compile driver: model file -> passes -> a Compiled result (and `load` -> module)."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from . import ops as _ops  # noqa: F401
from .frontend.model import load_graph
from .ir.graph import Graph
from .ops import reference as _reference  # noqa: F401  (imports torch outside the timer)
from .passes import run_pipeline


@dataclass
class Compiled:
    source: Graph              # as the frontend built it (BLOCK nodes included)
    graph: Graph               # after the pass pipeline
    compile_s: float
    frontend_s: float
    passes: List[Dict[str, Any]] = field(default_factory=list)
    disable: Sequence[str] = ()  # passes left out, fusion passes included
    _kernels: Optional[Dict[str, Any]] = None

    def training_graph(self, precision: str) -> Graph:
        """The graph `lmc run --train` trains: `precision`'s mixed-precision pass (matmuls in
        bf16/f16, fp32 master weights), the loss appended, the pass pipeline run again."""
        from .passes.loss import with_loss
        from .passes.mixed_precision import mixed_precision
        return run_pipeline(with_loss(mixed_precision(self.graph, precision)))

    def kernels(self, train: Optional[str] = None) -> Dict[str, Any]:
        """The kernel plan of the forward and backward graphs: fused groups, their ops and
        the generated Triton source (text only: nothing is compiled or imported here).
        Default: the model's graph, every output taking a cotangent. `train` (a precision):
        the program `lmc run --train` runs, the loss appended under that mixed precision
        and gradients from the loss alone (forward' with its saved values)."""
        if self._kernels is None or self._kernels.get("train") != train:
            from .codegen import wrapper
            from .codegen.program import (
                apply_patterns,
                fuse,
                fusion_names,
                kernel_list,
                module_source,
            )
            from .ir.ops import Op
            from .passes.autodiff import differentiate

            t0 = time.perf_counter()
            out: Dict[str, Any] = {"train": train}
            if train:
                prog = differentiate(apply_patterns(self.training_graph(train), self.disable),
                                     outputs=["loss"])
                fwd = prog.forward
            else:
                fwd = apply_patterns(self.graph, self.disable)
                prog = differentiate(fwd)
            for name, g in (("forward", fwd), ("backward",
                                                     run_pipeline(prog.backward))):
                fused = fuse(g, [d for d in self.disable if d in fusion_names()])
                out[name] = {"kernels": kernel_list(fused),
                             "fusions": list(fused.meta.get("fusions", [])),
                             "torch_ops": sum(1 for n in fused.nodes if n.op not in (
                                 Op.FUSED, Op.GETITEM, Op.INPUT, Op.PARAM, Op.CONST)),
                             "source": module_source(fused),
                             "program": wrapper.generate(fused, name)}
            out["codegen_s"] = time.perf_counter() - t0
            self._kernels = out
        return self._kernels

    def summary(self) -> Dict[str, Any]:
        g = self.graph
        return {
            "model": g.name,
            "source": g.meta.get("source"),
            "preset": g.meta.get("preset"),
            "config": g.meta.get("config", {}),
            "params": g.param_count(),
            # marked `trainable: false` in the file (lmc run --train --freeze adds more)
            "frozen_params": sum(math.prod(int(d) for d in p.type.shape) for p in g.params
                                 if p.attrs.get("trainable", True) is False),
            # moved by an update rule after each step (model.updates)
            "updates": [{k: u[k] for k in ("rule", "params", "load", "rate")}
                        for u in g.meta.get("updates") or []],
            # what training adds to the cross-entropy (model.aux_losses)
            "aux_losses": [{"name": k, "coef": v, **(g.meta.get("predictions") or {}).get(k, {})}
                           for k, v in (g.meta.get("aux_losses") or {}).items()],
            "nodes_before": _flat_counts(self.source),
            "nodes_after": g.op_counts(),
            "passes": [h["pass"] for h in self.passes],
            "pass_history": self.passes,
            "fusions": list(g.meta.get("fusions", [])),
            "compile_s": self.compile_s,
            "frontend_s": self.frontend_s,
        }


def _flat_counts(g: Graph) -> Dict[str, int]:
    """Op counts of a graph with BLOCK bodies counted as what they contain (what the
    frontend produced, before any pass)."""
    from .ir.ops import Op

    counts: Dict[str, int] = {}
    stack = list(g.nodes)
    while stack:
        n = stack.pop()
        if n.op is Op.BLOCK:
            stack.extend(m for m in n.attrs["body"].nodes if m.op is not Op.INPUT)
            continue
        if n.op is Op.GETITEM:
            continue
        counts[n.op.value] = counts.get(n.op.value, 0) + 1
    return dict(sorted(counts.items()))


def compile_model(path: str, preset: Optional[str] = None, overrides=None, *,
                  disable: Sequence[str] = ()) -> Compiled:
    from .errors import LmcError
    if not isinstance(path, (str, os.PathLike)):
        raise LmcError(f"a model file path is needed, got {type(path).__name__}")
    path = os.fspath(path)
    if "\n" in path:
        raise LmcError("a model file path is needed, got text with newlines (YAML text? "
                       "write it to a file)")
    if preset is not None and not isinstance(preset, str):
        raise LmcError(f"preset must be a name, got {preset!r}")
    if isinstance(overrides, str):          # one "key=value" (a string is not read char by char)
        overrides = [overrides]
    if isinstance(disable, str):
        disable = [disable]
    t0 = time.perf_counter()
    source = load_graph(path, preset, overrides)
    t1 = time.perf_counter()
    from .codegen.program import fusion_names

    graph = run_pipeline(source, disable=[d for d in disable if d not in fusion_names()])
    t2 = time.perf_counter()
    return Compiled(source, graph, t2 - t0, t1 - t0, list(graph.meta["history"]),
                    tuple(disable))


def load(path: str, preset: Optional[str] = None, *, backend: str = "torch", seed: int = 0,
         device=None, **overrides):
    """Compile a model file and return it as an `nn.Module` with initialised parameters.

        model = lmc.load("zoo/llama.yaml", preset="tiny", d=128)
        logits = model(ids)            # ids: int64 [B, T]
    """
    from .errors import LmcError
    from .runtime.module import LmcModel

    if backend not in ("torch", "triton"):
        raise LmcError(f"unknown backend {backend!r} (available: torch, triton)")
    compiled = compile_model(path, preset, overrides)
    model = LmcModel(compiled.graph, seed=seed, device=device, backend=backend)
    model.compiled = compiled
    return model
