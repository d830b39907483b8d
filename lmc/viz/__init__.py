"""`lmc graph`: pictures of a model and of what the compiler did to it.

    lmc graph zoo/llama.yaml --stage fused -o llama.png

Stages (stages.py): ``source`` (the block instances the YAML declares), ``fused`` (the
forward graph after the passes and the fusion pipeline, each kernel one coloured cluster),
``kernels`` (the launch sequence of one forward and backward step, each kernel's ops) and
``decode`` (the decode step graph, its state tensors highlighted with their sizes). Repeated
layers are folded to one drawn layer marked ×N (fold.py). Layout and rendering are
Graphviz's (render.py): .svg, .png, .html (the SVG inline, works offline) or .dot.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

from ..errors import LmcError, Loc
from .render import View, check_out, write
from .stages import STAGES

__all__ = ["STAGES", "build", "graph_command", "stage_view", "write"]


def stage_view(c, stage: str, fold: bool = True) -> Tuple[View, List[str]]:
    """The picture of one stage of a compiled model (`driver.Compiled`): (view, notes)."""
    if stage not in STAGES:
        raise LmcError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    if stage == "fused":
        try:   # the backward graph's fusion records, as `lmc compile` reports them
            back = c.kernels()["backward"]["fusions"]
        except LmcError:
            back = []
        return STAGES[stage](c, fold, back)
    return STAGES[stage](c, fold)


def build(path: str, stage: str, preset: Optional[str] = None, overrides=None, *,
          fold: bool = True) -> Tuple[View, List[str]]:
    """Compile the model file at `path` and draw one stage: (view, notes)."""
    from ..driver import compile_model

    if stage not in STAGES:
        raise LmcError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    if not os.path.exists(path):
        raise LmcError("no such file", Loc(path, 1, 1))
    if os.path.isdir(path):
        raise LmcError("is a directory, expected a YAML file", Loc(path, 1, 1))
    return stage_view(compile_model(path, preset, overrides), stage, fold)


def graph_command(path: str, stage: str, out: Optional[str], preset: Optional[str] = None,
                  overrides: Sequence[str] = (), *, fold: bool = True,
                  overwrite: bool = False) -> str:
    """Draw `stage` of the model at `path` into `out` (default <model>-<stage>.svg);
    returns the path written. An existing file there is replaced only if lmc graph wrote
    it, or with `overwrite`."""
    if stage not in STAGES:
        raise LmcError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    if out is None:
        out = f"{os.path.splitext(os.path.basename(path))[0]}-{stage}.svg"
    check_out(out, overwrite)   # a bad extension or place fails before compiling
    view, notes = build(path, stage, preset, overrides, fold=fold)
    write(view, out, notes, overwrite)
    return out
