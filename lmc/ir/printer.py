"""A readable text form of a Graph (`lmc compile --print-ir`).

    %12 = matmul %10, %11 : f32[B,T,768]                  # layers.0.attn  llama.yaml:31:9
"""
from __future__ import annotations

from typing import Dict

from .graph import Graph, Node
from .ops import Op


def _attr(v) -> str:
    if hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (int, float)):
        return f"<tensor {list(v.shape)}>"
    if isinstance(v, tuple):
        return "[" + ",".join(_attr(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    if hasattr(v, "value") and hasattr(v, "name") and not isinstance(v, str):  # enums
        return str(v.value)
    return str(v)


def format_node(n: Node, names: Dict[Node, str], *, locs: bool = True) -> str:
    args = ", ".join(names.get(i, "?") for i in n.inputs)
    attrs = {k: v for k, v in n.attrs.items() if k not in ("body",) and not k.startswith("_")}
    if n.op in (Op.INPUT, Op.PARAM):
        head = f'{n.op.value} "{attrs.pop("name")}"'
        attrs.pop("shape", None)
        attrs.pop("dtype", None)
    else:
        head = n.op.value + (" " + args if args else "")
    if n.op is Op.CONST:
        attrs.pop("dtype", None)
    extra = " ".join(f"{k}={_attr(v)}" for k, v in attrs.items())
    if isinstance(n.type, tuple):
        ty = "(" + ", ".join(str(t) for t in n.type) + ")"
    else:
        ty = str(n.type)
    line = f"{names[n]} = {head}{(' ' + extra) if extra else ''} : {ty}"
    if locs and (n.scope or n.loc):
        where = "  ".join(x for x in (n.scope, _short(n.loc)) if x)
        line = f"{line:<78} # {where}"
    return line


def _short(loc) -> str:
    if loc is None:
        return ""
    return f"{loc.file.rsplit('/', 1)[-1]}:{loc.line}:{loc.col}"


def format_graph(g: Graph, *, locs: bool = True, indent: str = "") -> str:
    names = {n: f"%{i}" for i, n in enumerate(g.nodes)}
    lines = [f"{indent}graph {g.name} {{"]
    for n in g.nodes:
        lines.append(indent + "  " + format_node(n, names, locs=locs))
        if n.op in (Op.BLOCK, Op.SCAN):
            lines.append(format_graph(n.attrs["body"], locs=locs, indent=indent + "    "))
    outs = ", ".join(f"{k}={names.get(v, '?')}" for k, v in g.outputs.items())
    lines.append(f"{indent}  return {outs}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)
