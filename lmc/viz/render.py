"""A small drawing model (nodes, edges, nested clusters) written as Graphviz DOT, laid out
and rendered by the `graphviz-pure` program (a self-contained port of Graphviz's `dot`
installed with lmc) or, failing that, a system `dot`.

Labels are Graphviz HTML-like labels built with `esc`; tooltips are plain text and end up as
``xlink:title`` in the SVG, which browsers show on hover (the .html output adds a panel that
shows the clicked node's tooltip, and works offline: everything is inline).
"""
from __future__ import annotations

import html
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import LmcError

FORMATS = ("svg", "png", "html", "dot")

FONT = "Helvetica"


def esc(s) -> str:
    """Text for an HTML-like label."""
    return html.escape(str(s), quote=True)


def _q(s) -> str:
    """A DOT quoted string."""
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(a: Dict[str, object]) -> str:
    out = []
    for k, v in a.items():
        if v is None:
            continue
        if k == "label" and isinstance(v, str) and v.startswith("<") and v.endswith(">"):
            out.append(f"{k}={v}")
        else:
            out.append(f"{k}={_q(v)}")
    return ", ".join(out)


@dataclass
class Cluster:
    label: str                          # an HTML-like label, "<...>"
    attrs: Dict[str, object] = field(default_factory=dict)


@dataclass
class View:
    title: str
    nodes: Dict[str, Tuple[Dict[str, object], Tuple[str, ...]]] = field(default_factory=dict)
    edges: Dict[Tuple[str, str], Dict[str, object]] = field(default_factory=dict)
    clusters: Dict[Tuple[str, ...], Cluster] = field(default_factory=dict)
    graph_attrs: Dict[str, object] = field(default_factory=dict)

    def node(self, nid: str, path: Tuple[str, ...] = (), **attrs) -> None:
        self.nodes[nid] = (attrs, tuple(path))

    def edge(self, a: str, b: str, **attrs) -> None:
        if a == b or (a, b) in self.edges:
            return
        self.edges[(a, b)] = attrs

    def cluster(self, path: Tuple[str, ...], label: str, **attrs) -> None:
        self.clusters[tuple(path)] = Cluster(label, attrs)

    def dot(self) -> str:
        g = {"rankdir": "TB", "newrank": "true", "fontname": FONT, "fontsize": 13,
             "nodesep": 0.18, "ranksep": 0.26, "labelloc": "t", "labeljust": "l",
             "bgcolor": "white", "pad": 0.15, "tooltip": self.title,
             "label": f"<<b>{esc(self.title)}</b>>"}
        g.update(self.graph_attrs)
        lines = ["digraph lmc {", f"  graph [{_attrs(g)}];",
                 f'  node [shape=box, style="rounded,filled", fillcolor="#eef2fb", '
                 f'color="#4a5a80", fontname="{FONT}", fontsize=10, height=0.3, '
                 f'margin="0.08,0.03", penwidth=0.9];',
                 f'  edge [fontname="{FONT}", fontsize=7.5, fontcolor="#555555", '
                 f'color="#808080", arrowsize=0.6, penwidth=0.8];']
        # the cluster tree: every prefix of a node's path is a cluster
        children: Dict[Tuple[str, ...], List[Tuple[str, ...]]] = {}
        members: Dict[Tuple[str, ...], List[str]] = {}
        for nid, (_, path) in self.nodes.items():
            members.setdefault(path, []).append(nid)
            for i in range(len(path)):
                parent, child = path[:i], path[:i + 1]
                kids = children.setdefault(parent, [])
                if child not in kids:
                    kids.append(child)
        counter = [0]

        def emit(path: Tuple[str, ...], indent: str):
            for nid in members.get(path, []):
                lines.append(f"{indent}{nid} [{_attrs(self.nodes[nid][0])}];")
            for child in children.get(path, []):
                counter[0] += 1
                c = self.clusters.get(child) or Cluster(f"<{esc(child[-1])}>")
                a = {"label": c.label, "style": "rounded", "color": "#9aa5b8",
                     "fontsize": 11, "margin": 8}
                a.update(c.attrs)
                lines.append(f"{indent}subgraph cluster_{counter[0]} {{")
                lines.append(f"{indent}  graph [{_attrs(a)}];")
                emit(child, indent + "  ")
                lines.append(f"{indent}}}")

        emit((), "  ")
        for (a, b), attrs in self.edges.items():
            lines.append(f"  {a} -> {b}" + (f" [{_attrs(attrs)}]" if attrs else "") + ";")
        lines.append("}")
        return "\n".join(lines) + "\n"


def find_renderer() -> str:
    """The layout program: $LMC_DOT, graphviz-pure (installed with lmc), or Graphviz's dot."""
    env = os.environ.get("LMC_DOT")
    if env:
        if shutil.which(env) is None:
            raise LmcError(f"LMC_DOT={env}: no such program")
        return shutil.which(env)
    dirs = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    for d in dirs:
        p = os.path.join(d or "", "graphviz-pure")
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    for name in ("graphviz-pure", "dot"):
        p = shutil.which(name)
        if p:
            return p
    raise LmcError("no graph renderer found: `pip install graphviz-pure` (a lmc dependency, "
                   "a self-contained dot) or install Graphviz's dot; .dot output needs neither")


def layout(dot: str, fmt: str) -> bytes:
    exe = find_renderer()
    try:
        r = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True,
                           timeout=600)
    except OSError as e:
        raise LmcError(f"graph renderer {exe} could not run: {e}") from None
    except subprocess.TimeoutExpired:
        raise LmcError(f"graph renderer {exe} took over 600 s") from None
    if r.returncode != 0 or not r.stdout:
        lines = r.stderr.decode(errors="replace").splitlines()
        err = ([ln for ln in lines if ln.startswith("Error")]
               or [ln for ln in lines if ln.strip() and "non-ASCII" not in ln])
        raise LmcError(f"graph renderer {os.path.basename(exe)} failed (exit {r.returncode})"
                       + (f": {err[0]}" if err else ""))
    return r.stdout


def output_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise LmcError(f"-o {path}: unknown output format {('.' + ext) if ext else '(none)'} "
                       f"(use {', '.join('.' + f for f in FORMATS)})")
    return ext


MARK = "written by lmc graph"     # in every file `write` makes: a later run may replace it


def check_out(path: str, overwrite: bool = False) -> None:
    """Refuse, before anything is compiled, an output path in no directory, or an existing
    file lmc graph did not write (a user's, or a link) unless `overwrite`."""
    output_format(path)
    d = os.path.dirname(path)
    if d and not os.path.isdir(d):
        why = "is not a directory" if os.path.exists(d) else "does not exist"
        raise LmcError(f"-o {path}: {d} {why}")
    if os.path.isdir(path):
        raise LmcError(f"-o {path}: is a directory")
    if overwrite or not os.path.lexists(path):
        return
    if not os.path.islink(path):
        try:
            with open(path, "rb") as f:
                if MARK.encode() in f.read(16 << 20):
                    return
        except OSError:
            pass
    raise LmcError(f"-o {path}: exists, and lmc graph did not write it: choose another "
                   "name, or replace it with --overwrite")


def _png_mark(png: bytes) -> bytes:
    """png with a tEXt chunk (Software: MARK) before its IEND."""
    import struct
    import zlib
    i = png.rfind(b"IEND")
    if i < 4:
        return png
    body = b"tEXt" + b"Software\x00" + MARK.encode()
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return png[:i - 4] + chunk + png[i - 4:]


def write(view: View, path: str, notes: Optional[List[str]] = None,
          overwrite: bool = False) -> None:
    """Lay out and write `view` to `path` (.svg, .png, .html or .dot), atomically; each
    format carries MARK (a comment, a PNG text chunk)."""
    fmt = output_format(path)
    check_out(path, overwrite)
    text = view.dot()
    if fmt == "dot":
        data = (text.rstrip("\n") + f"\n// {MARK}\n").encode()
    elif fmt == "html":
        data = _html(view.title, layout(text, "svg").decode(), notes or []).encode()
    elif fmt == "svg":
        svg = layout(text, fmt).decode()
        i = svg.find("<svg")
        data = (svg[:i] + f"<!-- {MARK} -->\n" + svg[i:] if i >= 0 else svg).encode()
    else:
        data = _png_mark(layout(text, fmt))
    from ..ioutil import atomic_write
    atomic_write(path, data)


_CSS = """
body { font: 13px Helvetica, Arial, sans-serif; margin: 0; color: #222; }
header { padding: 8px 14px; border-bottom: 1px solid #ddd; display: flex; gap: 12px;
         align-items: center; position: sticky; top: 0; background: #fff; z-index: 1; }
header h1 { font-size: 15px; margin: 0; flex: 1; }
button { font: inherit; padding: 2px 10px; }
#panel { position: fixed; right: 12px; bottom: 12px; max-width: 46ch; max-height: 45vh;
         overflow: auto; white-space: pre-wrap; background: #fffbe8; border: 1px solid #d8c68a;
         padding: 8px 10px; border-radius: 6px; font: 12px Menlo, Consolas, monospace;
         display: none; }
#wrap { padding: 10px; overflow: auto; }
#wrap.fit svg { max-width: 100%; height: auto; }
svg g.node:hover path, svg g.node:hover polygon, svg g.node:hover ellipse {
  stroke: #d0452f; stroke-width: 2; }
svg g.node { cursor: pointer; }
svg g.cluster text { cursor: pointer; }
ul.notes { margin: 4px 14px 10px; padding-left: 18px; color: #444; }
"""

# click a node (or a cluster's title): its tooltip (YAML line, shapes, ops, the kernels of the
# folded layers) in a panel; "fit" toggles fitting the picture to the window
_JS = """
(function () {
  var panel = document.getElementById('panel');
  function tip(el) {
    var a = el.querySelector('a');
    var t = a && (a.getAttribute('xlink:title') || a.getAttribute('title'));
    if (!t) { var tt = el.querySelector('title'); t = tt ? tt.textContent : ''; }
    return t;
  }
  document.querySelectorAll('svg g.node').forEach(function (n) {
    n.addEventListener('click', function (ev) {
      panel.textContent = tip(n); panel.style.display = 'block'; ev.stopPropagation();
    });
  });
  document.querySelectorAll('svg g.cluster').forEach(function (c) {
    c.addEventListener('click', function (ev) {
      if (ev.target.tagName !== 'text') return;
      panel.textContent = tip(c); panel.style.display = 'block'; ev.stopPropagation();
    });
  });
  document.body.addEventListener('click', function () { panel.style.display = 'none'; });
  document.getElementById('fit').addEventListener('click', function () {
    document.getElementById('wrap').classList.toggle('fit');
  });
})();
"""


def _html(title: str, svg: str, notes: List[str]) -> str:
    i = svg.find("<svg")
    svg = svg[i:] if i >= 0 else svg
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<meta name=\"generator\" content=\"{MARK}\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><button id=\"fit\">fit / full size</button></header>"
            + (f"<ul class=\"notes\">{items}</ul>" if items else "")
            + f"<div id=\"wrap\" class=\"fit\">{svg}</div><div id=\"panel\"></div>"
            f"<script>{_JS}</script></body></html>\n")
