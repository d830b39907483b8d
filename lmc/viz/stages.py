"""The four pictures of `lmc graph`: source, fused, kernels, decode.

`source`, `fused` and `decode` draw a dataflow graph with one shared drawer (`_Flat`):
every drawn thing is a *unit* (a block instance, a primitive op, a member op of a fused
kernel, an input or output); parameters and scalar constants are written into their
consumer's label rather than drawn. Units in numbered scopes (`layers.3...`) belong to a
layer; layers of one loop whose units have the same ops, shapes and connections fold into one
drawn layer marked ×N (fold.py), and an edge from one layer into the next becomes a dashed
back edge inside the folded cluster.

Fusion sites are read generically from the graph: every FUSED node (attrs ``kernel``,
``kind``, ``body``) is drawn as one cluster holding its body's ops, coloured by kind; the
records in ``graph.meta["fusions"]`` ({pass, status, where, reason}) are listed in a table and
the ops they name are outlined. A new fusion pass shows up without a change here.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from .fold import fold, layer_key, representative, strip_layer
from .render import View, esc

# ---------------------------------------------------------------------------------------------
# text helpers


def fmt_dim(d) -> str:
    s = str(d).replace("*", "·").replace(" ", "")
    return f"({s})" if any(ch in s for ch in "+-·") else s


def fmt_shape(t) -> str:
    """`B×T×64`, with the dtype in front when it is not f32."""
    if t is None or not hasattr(t, "shape"):
        return ""
    s = "×".join(fmt_dim(d) for d in t.shape) or "scalar"
    return s if t.dtype.value == "f32" else f"{t.dtype.value} {s}"


def shape_sig(t) -> tuple:
    """A shape for comparing layers: dtype, rank and the symbolic dims; sizes may differ
    (a per-layer statistic concatenated layer after layer grows by one row each time)."""
    if isinstance(t, tuple):
        return tuple(shape_sig(x) for x in t)
    if t is None or not hasattr(t, "shape"):
        return ()
    return (t.dtype.value,) + tuple("n" if isinstance(d, int) else fmt_dim(d) for d in t.shape)


def _rel_scope(scope: str, key) -> tuple:
    """A scope relative to the layer `key`: a kernel may hold ops of the next layer (the
    residual add of layer i fused with layer i+1's norm), which are marked +1."""
    own = layer_key(scope)
    if own is not None and key is not None and own[0] == key[0]:
        return (strip_layer(scope, own), own[1] - key[1])
    return (strip_layer(scope, key), 0)


def short_loc(loc) -> str:
    return f"{os.path.basename(loc.file)}:{loc.line}" if loc else ""


def full_loc(loc) -> str:
    return f"{loc.file}:{loc.line}:{loc.col}" if loc else "(no source line)"


def where(n: Node) -> str:
    """The "where" of a fusion record for this node (as fusion passes write it)."""
    loc = f" {n.loc.file.rsplit('/', 1)[-1]}:{n.loc.line}" if n.loc else ""
    return f"{n.scope or '<model>'}{loc}"


def small(text: str, color: str = "#6b7280", size: float = 7.5) -> str:
    return f'<font point-size="{size}" color="{color}">{esc(text)}</font>'


def _const_text(n: Node) -> Optional[str]:
    if n.op is not Op.CONST or n.type.rank != 0:
        return None
    v = n.attrs.get("value")
    if hasattr(v, "shape"):
        return None
    if isinstance(v, float):
        if v == float("inf"):
            return "∞"
        if v == float("-inf"):
            return "−∞"
        return f"{v:.4g}"
    return str(v)


def _attr_text(n: Node) -> str:
    out = []
    for k, v in n.attrs.items():
        if k in ("body", "name", "init", "dtype", "shape", "value"):
            continue
        out.append(f"{k}={v}")
    return ", ".join(out)


_SYMBOL = {Op.ADD: "+", Op.MUL: "×", Op.SUB: "−", Op.DIV: "÷"}

# fill colours of kernel kinds; kinds not listed get a colour from their name
_KIND_COLOURS = {"pointwise": ("#ffe6c2", "#d9822b"), "reduction": ("#d8ecff", "#2f7fc1"),
                 "matmul": ("#daf5dc", "#3b9a47")}
_EXTRA = [("#f1e0ff", "#8a4fc7"), ("#ffe0ea", "#c0406e"), ("#e0f7f7", "#2a9a9a"),
          ("#fff4b8", "#a88a00")]       # (grey is torch ops')


def kind_colours(kind: str) -> Tuple[str, str]:
    """A kernel kind's (fill, line) colours; a backward kind (rope_attention_bwd) takes its
    forward kind's."""
    kind = kind[:-len("_bwd")] if kind.endswith("_bwd") else kind
    if kind in _KIND_COLOURS:
        return _KIND_COLOURS[kind]
    h = int(hashlib.sha256(kind.encode()).hexdigest(), 16)
    return _EXTRA[h % len(_EXTRA)]


def body_ops(body: Graph) -> List[str]:
    return [m.op.value for m in body.nodes if m.op not in (Op.INPUT, Op.CONST)]


def wrap_ops(ops: List[str], width: int = 46) -> List[str]:
    lines, cur = [], ""
    for i, o in enumerate(ops):
        piece = o if not cur else " → " + o
        if cur and len(cur) + len(piece) > width:
            lines.append(cur + " →")
            cur = o
        else:
            cur += piece
    if cur:
        lines.append(cur)
    return lines


# ---------------------------------------------------------------------------------------------
# the dataflow drawer


@dataclass
class Unit:
    id: str
    order: int
    key: Optional[Tuple[str, int]]       # the layer, or None outside the layers
    scope: str                           # for the scope cluster (a fused node's, for its ops)
    sig: tuple                           # structure, for folding (inputs are added later)
    attrs: Dict[str, object]             # DOT node attributes
    fusion: Optional[int] = None         # the FUSED node's id, for members of a kernel
    where: str = ""
    node: Optional[Node] = None


@dataclass
class Fusion:
    node: Node
    units: List[str] = field(default_factory=list)
    also: List[str] = field(default_factory=list)   # kernels of the folded layers drawn here
    outs: Dict[int, Optional[str]] = field(default_factory=dict)  # output index -> unit


class _Flat:
    def __init__(self, g: Graph, stage: str, states=None, home: Optional[str] = None):
        self.g = g
        self.home = home or g.meta.get("source")
        # an edge label is a virtual node in dot's ranking and doubles a tall graph's height;
        # an xlabel is placed after layout
        self.edge_label = "label" if stage == "source" else "xlabel"
        self.stage = stage
        self.states = {st.name: st for st in (states or [])}
        self.state_outs = {st.out: st for st in (states or [])}
        self.units: Dict[str, Unit] = {}
        self.value: Dict[Node, Optional[str]] = {}
        self.edges: List[Tuple[str, str, str]] = []
        self.fusions: Dict[int, Fusion] = {}
        self.fused_outs: Dict[int, Dict[int, Optional[str]]] = {}
        self.inputs_of: Dict[str, List[str]] = {}
        self.loops: Dict[Node, frozenset] = {}
        for n in g.nodes:
            self._node(n)
        for name, n in g.outputs.items():
            self._output(name, n)

    def _loops(self, x: Node) -> frozenset:
        """The loops (`layers`, ...) whose parameters or state x is computed from (see
        _op_unit); ops drawn as units are entered there, in order."""
        got = self.loops.get(x)
        if got is not None:
            return got
        if x.op in (Op.PARAM, Op.INPUT):
            k = layer_key(str(x.attrs.get("name"))) or (
                layer_key(x.scope) if x.op is Op.INPUT else None)
            got = frozenset([k[0]]) if k else frozenset()
        elif x.op is Op.GETITEM and x.inputs[0].op is Op.FUSED:   # the kernel's output's
            f = x.inputs[0]
            body = f.attrs["body"]
            out = body.outputs.get(str(x.attrs["index"]))
            holders = [m for m in body.nodes if m.op is Op.INPUT]
            if out in holders:
                got = self._loops(f.inputs[holders.index(out)])
            else:
                got = self.loops.get(out) if out is not None else None
            if got is None:
                got = self._loops(f)
        else:   # CONST; GETITEM, FUSED from their inputs
            got = frozenset().union(*(self._loops(i) for i in x.inputs))
        self.loops[x] = got
        return got

    # -- units --------------------------------------------------------------------------
    def _add(self, uid: str, n: Optional[Node], key, scope: str, sig: tuple, attrs: dict,
             fusion: Optional[int] = None) -> str:
        self.units[uid] = Unit(uid, len(self.units), key, scope, sig, attrs, fusion,
                               where(n) if n is not None else "", n)
        self.inputs_of[uid] = []
        return uid

    def _extras(self, n: Node, ins, resolve) -> Tuple[List[str], List[str], List[tuple]]:
        """(label bits for params and constants, tooltip lines, signature bits) of n's
        non-drawn inputs; edges from drawn inputs are recorded by the caller."""
        bits, tips, sig = [], [], []
        for x in ins:
            src = resolve(x)
            if src is not None:
                continue
            if x.op is Op.PARAM:
                name = x.attrs.get("name", "?")
                short = name.rsplit(".", 1)[-1]
                bits.append(short)
                tips.append(f"param {name} [{fmt_shape(x.type)}]")
                sig.append(("p", strip_layer(name, layer_key(x.scope) or layer_key(name)),
                            fmt_shape(x.type)))
            else:
                c = _const_text(x)
                if c is not None:
                    bits.append(c)
                    sig.append(("c", shape_sig(x.type)))
                elif x.op is Op.CONST:
                    bits.append("const")
                    tips.append(f"constant [{fmt_shape(x.type)}]")
                    sig.append(("C", shape_sig(x.type)))
        return bits, tips, sig

    def _line(self, loc) -> str:
        if loc.file == self.home:
            return f":{loc.line}"
        return short_loc(loc)

    def _op_unit(self, uid: str, n: Node, ins, resolve, key, scope, fusion=None) -> str:
        bits, tips, psig = self._extras(n, ins, resolve)
        op = n.op.value
        if self.stage == "source" and n.op in _SYMBOL and not bits:
            label = f"<<b>{esc(_SYMBOL[n.op])}</b>>"
            attrs = {"shape": "circle", "width": 0.26, "height": 0.26, "fixedsize": "true",
                     "fillcolor": "#ffffff", "fontsize": 12}
        else:
            head = f"<b>{esc(op)}</b>" + (" " + esc(" ".join(bits)) if bits else "")
            if self.stage == "source":
                label = f"<{head}<br/>{small(short_loc(n.loc))}>" if n.loc else f"<{head}>"
            else:   # one line: the op, then its YAML line (the file when not the model's)
                label = f"<{head}  {small(self._line(n.loc))}>" if n.loc else f"<{head}>"
            attrs = {}
            if n.op.kind is Kind.MATMUL:
                attrs["fillcolor"] = "#e4ecfa"
            elif n.op.kind is Kind.VIEW:
                attrs["fillcolor"] = "#f3f4f6"
                attrs["color"] = "#9ca3af"
        extra = _attr_text(n)
        tip = [f"{op} -> [{fmt_shape(n.type)}]", f"scope {n.scope or '(model)'}",
               full_loc(n.loc)] + ([extra] if extra else []) + tips
        attrs.update(label=label, tooltip="\n".join(tip))
        # an op computed from none of its loop's parameters (a causal mask, capacity
        # positions from an iota, the cross-decoder's shared K, V) is CSE'd across the
        # layers and keeps the first one's scope: which layer that is says nothing
        loops = self.loops[n] = frozenset().union(*(self._loops(x) for x in ins))
        own = layer_key(n.scope)
        rel = (strip_layer(n.scope, own), 0) if own is not None and own[0] not in loops \
            else _rel_scope(n.scope, key)
        sig = ("op", op, rel, shape_sig(n.type),
               tuple(sorted(k for k in n.attrs if k != "body")), tuple(psig))
        return self._add(uid, n, key, scope, sig, attrs, fusion)

    def _edges_in(self, uid: str, ins, resolve) -> None:
        for x in ins:
            src = resolve(x)
            if src is not None:
                self.edges.append((src, uid, fmt_shape(x.type)))
                self.inputs_of[uid].append(src)

    def _resolve(self, x: Node) -> Optional[str]:
        return self.value.get(x)

    def _node(self, n: Node) -> None:
        key = layer_key(n.scope)
        op = n.op
        if op in (Op.PARAM, Op.CONST):
            self.value[n] = None
            return
        if op is Op.GETITEM:
            src = n.inputs[0]
            if src.op is Op.FUSED:
                self.value[n] = self.fused_outs[src.id].get(n.attrs["index"])
            else:
                self.value[n] = self.value.get(src)
            return
        if op is Op.INPUT:
            self.value[n] = self._input(n, key)
            return
        if op is Op.FUSED:
            self._fused(n, key)
            return
        if op is Op.BLOCK:
            uid = self._block(n, key)
        else:
            uid = self._op_unit(f"n{n.id}", n, n.inputs, self._resolve, key, n.scope)
        self._edges_in(uid, n.inputs, self._resolve)
        self.value[n] = uid

    def _input(self, n: Node, key) -> str:
        name = n.attrs.get("name", "input")
        st = self.states.get(name)
        if st is not None:
            if st.kind == "cache":
                size = f"{st.bytes_per_token():,} B per token"
            else:
                size = f"{st.bytes(1, 0):,} B, constant"
            rel = strip_layer(name, key)
            label = (f"<<b>{esc(rel)}</b><br/>{esc(st.kind)} [{esc(fmt_shape_tuple(st.shape))}] "
                     f"{esc(st.dtype.value)}<br/>{small(size, '#8a3b00', 8)}>")
            attrs = {"shape": "cylinder", "fillcolor": "#ffd49e", "color": "#c0660f",
                     "penwidth": 1.6, "label": label,
                     "tooltip": f"state {name}\nkind {st.kind}, shape "
                                f"[{fmt_shape_tuple(st.shape)}] {st.dtype.value}\n{size} "
                                f"(batch 1)\nfrom {st.source}"}
            sig = ("state", rel, st.kind, fmt_shape_tuple(st.shape))
        else:
            attrs = {"shape": "ellipse", "fillcolor": "#dbeafe", "color": "#3b6fb6",
                     "label": f"<<b>{esc(name)}</b><br/>{small(fmt_shape(n.type))}>",
                     "tooltip": f"input {name} [{fmt_shape(n.type)}]\n{full_loc(n.loc)}"}
            sig = ("in", strip_layer(name, key), shape_sig(n.type))
        return self._add(f"n{n.id}", n, key, n.scope, sig, attrs)

    def _output(self, name: str, n: Node) -> None:
        src = self.value.get(n)
        if src is None:
            return
        st = self.state_outs.get(name)
        key = layer_key(name[:-1]) if st is not None else None
        if st is not None:
            attrs = {"shape": "cylinder", "fillcolor": "#ffe9cc", "color": "#c0660f",
                     "style": "filled,dashed",
                     "label": f"<<b>{esc(strip_layer(name, key))}</b><br/>"
                              f"{small('next state', '#8a3b00')}>",
                     "tooltip": f"output {name}: the next value of state {st.name}"}
        else:
            attrs = {"shape": "ellipse", "fillcolor": "#dcfce7", "color": "#2f8a4c",
                     "label": f"<<b>{esc(name)}</b><br/>{small(fmt_shape(n.type))}>",
                     "tooltip": f"output {name} [{fmt_shape(n.type)}]"}
        uid = self._add(f"out_{len(self.units)}", None, key, "", ("out", strip_layer(name, key)),
                        attrs)
        self.edges.append((src, uid, fmt_shape(n.type)))
        self.inputs_of[uid].append(src)

    def _block(self, n: Node, key) -> str:
        inst = n.attrs.get("instance", "")
        block = n.attrs.get("block", "?")
        rel = strip_layer(inst, key) or inst
        body = n.attrs["body"]
        params, counts = _block_contents(body)
        nparams = sum(c for _, _, c in params)
        bits, tips, psig = self._extras(n, n.inputs, self._resolve)
        sub = f"{block}" + (f" · {len(params)} param{'s' if len(params) > 1 else ''}, "
                             f"{nparams:,}" if params else "")
        outs = ", ".join(fmt_shape(t) for t in n.type) if isinstance(n.type, tuple) else ""
        label = (f"<<b>{esc(rel)}</b>" + (" " + esc(" ".join(bits)) if bits else "")
                 + f"<br/>{small(sub, '#374151', 8)}<br/>{small(short_loc(n.loc))}>")
        tip = ([f"block {block}, instance {inst}", full_loc(n.loc), f"outputs: {outs}"]
               + ([f"params ({nparams:,} weights):"] + [f"  {p} [{s}]" for p, s, _ in params]
                  if params else ["no params"])
               + ["ops: " + ", ".join(f"{o} {c}" for o, c in sorted(counts.items()))] + tips)
        attrs = {"label": label, "tooltip": "\n".join(tip), "fillcolor": _block_colour(block),
                 "margin": "0.12,0.04"}
        sig = ("block", block, rel, outs, tuple(psig))
        return self._add(f"n{n.id}", n, key, n.scope, sig, attrs)

    def _fused(self, f: Node, key) -> None:
        body: Graph = f.attrs["body"]
        fu = Fusion(f)
        self.fusions[f.id] = fu
        holders = [m for m in body.nodes if m.op is Op.INPUT]
        outer = {m: x for m, x in zip(holders, f.inputs)}
        local: Dict[Node, Optional[str]] = {}

        def resolve(x: Node) -> Optional[str]:
            if x in outer:
                return self.value.get(outer[x])
            return local.get(x)

        def typed(x: Node) -> Node:
            return outer.get(x, x)

        for m in body.nodes:
            if m.op is Op.INPUT:
                continue
            if m.op is Op.CONST:
                local[m] = None
                continue
            uid = self._op_unit(f"f{f.id}_{m.id}", m, [typed(x) for x in m.inputs],
                                lambda x: resolve(x) if x in local else self.value.get(x),
                                key, f.scope, fusion=f.id)
            for x in m.inputs:
                src = resolve(x)
                if src is not None:
                    self.edges.append((src, uid, fmt_shape(typed(x).type)))
                    self.inputs_of[uid].append(src)
            local[m] = uid
            fu.units.append(uid)
        for i, m in body.outputs.items():
            fu.outs[int(i)] = resolve(m)
        self.fused_outs[f.id] = fu.outs
        if not fu.units:   # a kernel that only forwards its inputs: nothing to draw
            del self.fusions[f.id]

    # -- folding and drawing ------------------------------------------------------------
    def _hoist(self) -> None:
        """A unit that reads nothing from its layer but is used by other layers (a causal
        mask CSE'd across layers, say) belongs to no layer: it would stop the folding."""
        users: Dict[str, List[str]] = {}
        for s, d, _ in self.edges:
            users.setdefault(s, []).append(d)
        for u in self.units.values():
            if u.key is None or u.fusion is not None:
                continue
            if any(self.units[s].key == u.key for s in self.inputs_of[u.id]):
                continue
            if any(self.units[d].key not in (u.key, None) for d in users.get(u.id, [])):
                u.key = None

    def draw(self, view: View, fold_layers: bool, records: List[dict]) -> Dict[str, object]:
        self._hoist()
        units = self.units
        by_layer: Dict[Tuple[str, int], List[str]] = {}
        for u in units.values():
            if u.key is not None:
                by_layer.setdefault(u.key, []).append(u.id)
        # canonical order within a layer: fusion passes may list a kernel's ops in another
        # order in each layer, so units are labelled by their structure (op, shapes, and the
        # labels of their in-layer inputs, then of their in-layer users) and sorted by label
        users: Dict[str, List[str]] = {}
        for uid, ins in self.inputs_of.items():
            for s in ins:
                users.setdefault(s, []).append(uid)
        group = {fid: (fu.node.attrs.get("kind"), tuple(sorted(body_ops(fu.node.attrs["body"]))))
                 for fid, fu in self.fusions.items()}
        up: Dict[str, int] = {}
        for u in units.values():          # units are in topological order
            ins = sorted(up[s] if units[s].key == u.key and s in up else 0
                         for s in self.inputs_of[u.id])
            up[u.id] = hash((u.sig, group.get(u.fusion), tuple(ins)))
        label: Dict[str, int] = {}
        for u in reversed(list(units.values())):
            outs = sorted(label.get(d, 0) for d in users.get(u.id, []) if units[d].key == u.key)
            label[u.id] = hash((up[u.id], tuple(outs)))
        for k, lst in by_layer.items():
            lst.sort(key=lambda uid: (label[uid], units[uid].order))
        pos = {uid: i for lst in by_layer.values() for i, uid in enumerate(lst)}

        def unit_sig(uid: str) -> tuple:
            u = units[uid]
            ins = tuple(sorted(pos[s] if units[s].key == u.key else -1
                               for s in self.inputs_of[uid]))
            same = (None if u.fusion is None else
                    tuple(sorted(pos[x] for x in self.fusions[u.fusion].units
                                 if units[x].key == u.key)))
            return (label[uid], ins, same)

        # fold each loop's layers
        rep_layer: Dict[Tuple[str, int], Tuple[str, int]] = {k: k for k in by_layer}
        layer_path: Dict[Tuple[str, int], Tuple[str, ...]] = {}
        loops: Dict[str, List[int]] = {}
        for (name, i) in by_layer:
            loops.setdefault(name, []).append(i)
        folded_count = 0
        for name, idx in loops.items():
            idx.sort()
            keys = [(name, i) for i in idx]
            sigs = [tuple(unit_sig(uid) for uid in by_layer[k]) for k in keys]
            items = fold(sigs) if fold_layers else [fold_plain(len(keys))]
            rep = representative(items)
            for j, k in enumerate(keys):
                rep_layer[k] = keys[rep[j]]
            folded_count += sum(1 for j in rep if rep[j] != j)
            layer_clusters(view, name, keys, items, (), layer_path)

        # map every unit to the one drawn for it
        def rep_unit(uid: str) -> str:
            u = units[uid]
            if u.key is None or rep_layer[u.key] == u.key:
                return uid
            return by_layer[rep_layer[u.key]][pos[uid]]

        drawn = [u for u in units.values() if rep_unit(u.id) == u.id]
        also: Dict[str, List[str]] = {}
        for u in units.values():
            r = rep_unit(u.id)
            if r != u.id:
                also.setdefault(r, []).append(u.key and f"{u.key[0]}.{u.key[1]}")
                if u.fusion is not None and u.fusion in self.fusions:
                    rf = units[r].fusion
                    if rf in self.fusions:
                        k = self.fusions[u.fusion].node.attrs["kernel"]
                        if k not in self.fusions[rf].also:
                            self.fusions[rf].also.append(k)

        # cluster paths: layer, then scope (where it holds 2+ units), then kernel
        def scope_comp(u: Unit) -> Optional[str]:
            rel = strip_layer(u.scope, u.key)
            return rel.split(".")[0] if rel else None

        count: Dict[tuple, int] = {}
        for u in drawn:
            c = scope_comp(u)
            if c is not None:
                base = layer_path.get(u.key, ())
                count[base + (c,)] = count.get(base + (c,), 0) + 1
        fusion_drawn: Dict[int, int] = {}
        for u in drawn:
            if u.fusion is not None and u.fusion in self.fusions:
                fusion_drawn[u.fusion] = fusion_drawn.get(u.fusion, 0) + 1

        # fusion records name a place (scope file:line): attach each to the first unit there
        # (drawn for it, in a folded layer); those that name no unit go to the table
        # (several ops share a place: the op the reason starts with, else the first there;
        # a declined op is outlined in red only when the reason names it and it is in no
        # kernel)
        at: Dict[str, List[Unit]] = {}
        for u in units.values():
            if u.where:
                at.setdefault(u.where, []).append(u)
        recs: Dict[str, List[dict]] = {}
        outlined = set()
        unplaced = []
        for r in records:
            cands = at.get(r.get("where"), [])
            if not cands:
                unplaced.append(r)
                continue
            first = (r.get("reason") or "").split(" ", 1)[0]
            named = next((u for u in cands if u.node is not None and u.node.op.value == first),
                         None)
            pick = named or cands[0]
            recs.setdefault(rep_unit(pick.id), []).append(r)
            if named is not None and r.get("status") != "fused":
                outlined.add(rep_unit(named.id))
        fusion_recs: Dict[int, List[dict]] = {}
        for uid, rs in recs.items():
            if units[uid].fusion is not None:
                fusion_recs.setdefault(units[uid].fusion, []).extend(rs)

        for u in drawn:
            path = layer_path.get(u.key, ()) if u.key is not None else ()
            c = scope_comp(u)
            if c is not None and count.get(path + (c,), 0) >= 2:
                path = path + ("s:" + c,)
                view.cluster(path, f"<{esc(c)}>", style="rounded,dashed", color="#b8c0cc",
                             fontsize=9, fontcolor="#6b7280", tooltip=f"scope {u.scope}")
            attrs = dict(u.attrs)
            if u.fusion is not None and u.fusion in self.fusions:
                fu = self.fusions[u.fusion]
                kname, kind = fu.node.attrs["kernel"], fu.node.attrs.get("kind", "?")
                fill, line = kind_colours(kind)
                tip = _fusion_tip(fu) + _records_text(fusion_recs.get(u.fusion, []))
                if fusion_drawn[u.fusion] >= 2:
                    path = path + (f"f{u.fusion}",)
                    view.cluster(path, f"<{esc(kname)} {small('· ' + kind, line, 8)}>",
                                 style="rounded,filled", fillcolor=fill, color=line,
                                 fontsize=8, tooltip=tip, penwidth=1.2)
                else:
                    attrs["fillcolor"] = fill
                    attrs["color"] = line
                    attrs["penwidth"] = 1.2
                    lab = attrs["label"]
                    attrs["label"] = lab[:-1] + f"<br/>{small(kname, line, 7)}>"
                    attrs["tooltip"] = tip + "\n\n" + attrs["tooltip"]
            rec = recs.get(u.id)
            if rec and u.fusion is None:
                if u.id in outlined:
                    attrs["color"] = "#c81e1e"
                    attrs["penwidth"] = 1.6
                    attrs["style"] = "rounded,filled,dashed"
                attrs["tooltip"] = attrs["tooltip"] + _records_text(rec)
            if also.get(u.id) and u.sig[0] == "state":
                st = self.states[u.node.attrs["name"]]
                n_layers = len(also[u.id]) + 1
                per = st.bytes_per_token() if st.kind == "cache" else st.bytes(1, 0)
                what = "B per token" if st.kind == "cache" else "B"
                attrs["label"] = attrs["label"][:-1] + "<br/>" + small(
                    f"×{n_layers} layers: {n_layers * per:,} {what}", "#8a3b00", 8) + ">"
            if also.get(u.id):
                attrs["tooltip"] = (attrs["tooltip"] + "\nalso drawn for: "
                                    + ", ".join(dict.fromkeys(x for x in also[u.id] if x)))
            view.node(u.id, path, **attrs)

        order = {u.id: u.order for u in units.values()}
        back = 0
        for s, d, label in self.edges:
            rs, rd = rep_unit(s), rep_unit(d)
            if rs == rd:
                continue
            if order[rs] >= order[rd]:
                back += 1
                view.edge(rs, rd, style="dashed", constraint="false", color="#b0b7c3",
                          arrowsize=0.5, tooltip="carried to the next layer")
            else:
                view.edge(rs, rd, **{self.edge_label: " " + label})
        return {"units": len(units), "drawn": len(drawn), "folded_layers": folded_count,
                "kernels": len(self.fusions), "unplaced": unplaced}


def fold_plain(n: int):
    from .fold import Item
    return Item(0, n)


def fmt_shape_tuple(shape) -> str:
    return ", ".join(fmt_dim(d) for d in shape)


def _fusion_tip(fu: Fusion) -> str:
    n = fu.node
    ops = body_ops(n.attrs["body"])
    extra = {k: v for k, v in n.attrs.items() if k not in ("kernel", "kind", "body")}
    lines = [f"kernel {n.attrs['kernel']} ({n.attrs.get('kind', '?')}): {len(ops)} ops",
             "ops: " + " → ".join(ops), f"at {where(n)}"]
    if extra:
        lines.append("attrs: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    if fu.also:
        lines.append("the same kernel in the folded layers: " + ", ".join(fu.also))
    return "\n".join(lines)


def _block_contents(body: Graph):
    """([(param name, shape, elements)], {op: count}) of a block body, nested blocks included."""
    params, counts = [], {}
    stack = list(body.nodes)
    while stack:
        m = stack.pop()
        if m.op is Op.BLOCK:
            stack.extend(m.attrs["body"].nodes)
            continue
        if m.op is Op.PARAM:
            n = 1
            for d in m.type.shape:
                n *= d if isinstance(d, int) else 1
            params.append((m.attrs.get("name", "?"), fmt_shape(m.type), n))
            continue
        if m.op in (Op.INPUT, Op.GETITEM, Op.CONST):
            continue
        counts[m.op.value] = counts.get(m.op.value, 0) + 1
    params.sort()
    return params, counts


_BLOCK_FILLS = ["#e0ecff", "#fde7d4", "#dcf3e4", "#efe3fb", "#fbf3c8", "#e2f2f6", "#fbe1e8"]


def _block_colour(block: str) -> str:
    h = int(hashlib.sha256(block.encode()).hexdigest(), 16)
    return _BLOCK_FILLS[h % len(_BLOCK_FILLS)]


_TABLE_NOTE = "forward records are on the ops they name (hover); listed here: the rest"


def _records_text(records: List[dict]) -> str:
    if not records:
        return ""
    return "\nfusion records here:\n" + "\n".join(
        f"  {r.get('pass')}: {r.get('status')} at {r.get('where')}"
        + (f" ({r['reason']})" if r.get("reason") else "") for r in records)


def _records_table(view: View, records: List[dict], unplaced: List[dict],
                   limit: int = 10) -> None:
    """A summary of all fusion records (counts per pass and status) and the rows of those
    that name no drawn op (the backward graph's, say)."""
    if not records:
        return
    counts: Dict[Tuple[str, str], int] = {}
    for r in records:
        k = (r.get("pass", "?") + (f" [{r['graph']}]" if r.get("graph") else ""),
             r.get("status", "?"))
        counts[k] = counts.get(k, 0) + 1
    summary = "; ".join(f"{p}: {n} {st}" for (p, st), n in counts.items())
    records = unplaced
    rows = []
    for r in records[:limit]:
        colour = "#1f7a35" if r.get("status") == "fused" else "#b91c1c"
        g = f" [{r['graph']}]" if r.get("graph") else ""
        rows.append(f"<tr><td align=\"left\">{esc(r.get('pass', '?'))}</td>"
                    f"<td align=\"left\"><font color=\"{colour}\">{esc(r.get('status', '?'))}"
                    f"</font></td><td align=\"left\">{esc(r.get('where', ''))}{esc(g)}</td>"
                    f"<td align=\"left\">{esc(r.get('reason', '') or '')}</td></tr>")
    more = len(records) - limit
    if more > 0:
        rows.append(f"<tr><td colspan=\"4\">… {more} more (in the tooltip)</td></tr>")
    label = ("<<table border=\"0\" cellborder=\"1\" cellspacing=\"0\" cellpadding=\"3\">"
             "<tr><td colspan=\"4\" bgcolor=\"#eeeeee\" align=\"left\"><b>fusion records</b> "
             f"{esc(summary)}<br/>{small(_TABLE_NOTE, '#555555', 8)}</td></tr>"
             + "".join(rows) + "</table>>")
    tip = "\n".join(f"{r.get('pass')}: {r.get('status')} at {r.get('where')}"
                    + (f" [{r['graph']}]" if r.get("graph") else "")
                    + (f" ({r['reason']})" if r.get("reason") else "") for r in records)
    view.node("fusion_records", (), shape="plain", label=label, tooltip=tip, fontsize=8)
    for nid, (attrs, path) in list(view.nodes.items()):   # below the outputs
        if nid.startswith("out_") and not path:
            view.edge(nid, "fusion_records", style="invis")


# ---------------------------------------------------------------------------------------------
# the stages


def _subtitle(g: Graph) -> str:
    preset = g.meta.get("preset")
    return f"{g.meta.get('source') or g.name}" + (f", preset {preset}" if preset else "")


def source_view(c, fold_layers: bool = True) -> Tuple[View, List[str]]:
    g = c.source
    flat = _Flat(g, "source")
    view = View(f"{g.name}: the model as written ({_subtitle(g)}) — "
                f"{c.graph.param_count():,} params")
    st = flat.draw(view, fold_layers, [])
    notes = [f"{st['drawn']} of {st['units']} boxes drawn; {st['folded_layers']} repeated "
             "layers folded (×N)"]
    return view, notes


def fused_view(c, fold_layers: bool = True, backward_records: Optional[List[dict]] = None):
    from ..codegen.program import apply_patterns, fuse

    g = fuse(apply_patterns(c.graph))
    records = list(g.meta.get("fusions", []))
    flat = _Flat(g, "fused")
    kinds: Dict[str, int] = {}
    for n in g.nodes:
        if n.op is Op.FUSED:
            kinds[n.attrs.get("kind", "?")] = kinds.get(n.attrs.get("kind", "?"), 0) + 1
    torch_ops = sum(1 for n in g.nodes if n.op not in (Op.FUSED, Op.GETITEM, Op.INPUT,
                                                        Op.PARAM, Op.CONST))
    kk = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "none"
    view = View(f"{g.name}: forward graph after passes and fusion ({_subtitle(g)}) — "
                f"{sum(kinds.values())} kernels ({kk}), {torch_ops} ops left to torch")
    back = [dict(r, graph="backward") for r in (backward_records or [])]
    st = flat.draw(view, fold_layers, records)
    all_records = records + back
    _records_table(view, all_records, st["unplaced"] + back)
    notes = [f"coloured clusters are kernels: {kk}; uncoloured ops run one by one",
             f"{st['drawn']} of {st['units']} ops drawn; {st['folded_layers']} repeated "
             "layers folded (×N)"]
    if not all_records:
        notes.append("no fusion records (declines or pattern matches) for this model")
    return view, notes


def decode_view(c, fold_layers: bool = True):
    from ..passes.decode import decode_step

    step = decode_step(c.graph)
    g = step.graph
    per_tok = sum(s.bytes_per_token() for s in step.states)
    fixed = sum(s.bytes(1, 0) for s in step.states)
    flat = _Flat(g, "decode", step.states, c.graph.meta.get("source"))
    view = View(f"{c.graph.name}: decode step (T new tokens after P past; {_subtitle(c.graph)})"
                f" — state {per_tok:,} B per token + {fixed:,} B per sequence (batch 1)")
    st = flat.draw(view, fold_layers, [])
    notes = [f"{len(step.states)} state tensors (orange): "
             + ", ".join(f"{s.name} ({s.kind})" for s in step.states),
             f"{st['drawn']} of {st['units']} ops drawn; {st['folded_layers']} repeated "
             "layers folded (×N)"]
    return view, notes


def layer_clusters(view: View, name: str, keys, items, path, out) -> None:
    """Clusters for one loop's folded layers; `out` maps each drawn layer to its path."""
    for it in items:
        ks = keys[it.start:it.stop]
        if it.count > 1:
            cid = path + (f"r:{name}.{keys[it.start][1]}:{len(path)}",)
            first, last = ks[0], ks[-1]
            span = f"{name}.{first[1]} … {name}.{last[1]}"
            what = (f"×{it.count}" if it.period == 1
                    else f"{it.period} layers, ×{it.count}")
            view.cluster(cid, f"<<b>{esc(span)}</b>  <font color=\"#b45309\"><b>"
                              f"{esc(what)}</b></font>>",
                         style="rounded,filled", fillcolor="#f7f7f9", color="#8b95a7",
                         penwidth=1.3,
                         tooltip=f"{len(ks)} layers with the same ops, shapes and "
                                 f"connections: drawn once ({span}); dashed edges carry "
                                 "values to the next layer")
            block = keys[it.start:it.start + it.period]
            if it.inner:
                layer_clusters(view, name, keys, it.inner, cid, out)
            elif it.period == 1:
                out[block[0]] = cid
            else:
                for k in block:
                    out[k] = cid + (f"l:{name}.{k[1]}",)
                    view.cluster(out[k], f"<{esc(f'{name}.{k[1]}')}>", style="rounded",
                                 color="#9aa5b8")
        else:
            for k in ks:
                out[k] = path + (f"l:{name}.{k[1]}",)
                view.cluster(out[k], f"<<b>{esc(f'{name}.{k[1]}')}</b>>",
                             style="rounded,filled", fillcolor="#f7f7f9", color="#8b95a7")


# -- kernels ----------------------------------------------------------------------------------


@dataclass
class Launch:
    index: int                            # 1-based position in the step
    sig: tuple
    cells: Tuple[str, str, str, str]      # name, kind, ops, shape (HTML)
    kernel: Optional[str]
    key: Optional[Tuple[str, int]]        # the layer it belongs to
    text: str                             # for the tooltip
    parts: tuple = ()                     # one signature per op (a row may merge views)


def _launches(g: Graph, key_of) -> List[Launch]:
    """The launch sequence of a fused graph: one row per kernel, one per op left to torch
    (consecutive view ops of one layer share a row)."""
    out: List[Launch] = []
    views: List[Node] = []
    count = [0]

    def add(sig, cells, kernel, key, text, parts=None):
        count[0] += 1
        out.append(Launch(count[0], sig, cells, kernel, key, text,
                          parts if parts is not None else (sig,)))

    def flush():
        if views:
            ops = [v.op.value for v in views]
            add(("views", tuple(ops)), ("torch", "view", esc(", ".join(ops)),
                                        esc(fmt_shape(views[-1].type))),
                None, key_of(views[0]), "torch views: " + ", ".join(ops),
                tuple(("view", v.op.value, shape_sig(v.type)) for v in views))
            views.clear()

    for n in g.nodes:
        if n.op in (Op.GETITEM, Op.INPUT, Op.PARAM, Op.CONST):
            continue
        key = key_of(n)
        if n.op.kind is Kind.VIEW:
            if views and key_of(views[0]) != key:
                flush()
            views.append(n)
            continue
        flush()
        if n.op is Op.FUSED:
            kind = n.attrs.get("kind", "?")
            ops = body_ops(n.attrs["body"])
            _, line = kind_colours(kind)
            name = n.attrs["kernel"]
            shape = fmt_shape(n.type[0] if isinstance(n.type, tuple) and n.type else n.type)
            add(("k", kind, tuple(ops), shape_sig(n.type)),
                (f"<font color=\"{line}\"><b>{esc(name)}</b></font>", esc(kind),
                 "<br align=\"left\"/>".join(esc(t) for t in wrap_ops(ops))
                 + "<br align=\"left\"/>", esc(shape)),
                name, key, f"{name} ({kind}) at {where(n)}: " + " → ".join(ops))
        else:
            ins = ", ".join(fmt_shape(x.type) for x in n.inputs if x.op is not Op.CONST)
            add(("t", n.op.value, shape_sig(n.type)),
                ("torch", esc(n.op.kind.value), esc(n.op.value), esc(fmt_shape(n.type))),
                None, key, f"torch {n.op.value}({ins}) at {where(n)}")
    flush()
    return out


def _graph_keys(g: Graph, anchor) -> Dict[Node, Optional[Tuple[str, int]]]:
    """The layer of every node of `g`. `anchor(n)` gives a node's own layer where it is known
    (its scope; a parameter's name; the forward scope of a saved value), False where it is
    known to lie outside the layers, else None. A node
    with no anchor takes the layer of its inputs (the first one's where they differ); source
    ops and values shared by several layers (a causal mask CSE'd across layers) take none."""
    keys: Dict[Node, Optional[Tuple[str, int]]] = {}
    users: Dict[Node, List[Node]] = {}
    for n in g.nodes:
        for x in n.inputs:
            users.setdefault(x, []).append(n)
    for n in g.nodes:
        k = anchor(n)
        if n.op is Op.GETITEM:
            keys[n] = keys.get(n.inputs[0])
            continue
        if n.op in (Op.INPUT, Op.PARAM, Op.CONST):
            keys[n] = k or None
            continue
        from_inputs = [keys.get(x) for x in n.inputs if x.op not in (Op.PARAM, Op.CONST)
                       and keys.get(x) is not None]
        # inputs that know their layer (a parameter, a saved forward value) decide first
        params = [keys[x] for x in n.inputs if x.op in (Op.PARAM, Op.INPUT)
                  and keys.get(x) is not None]
        if k is False:                   # known to lie outside the layers
            keys[n] = None
            continue
        if k is None:
            k = params[0] if params else (from_inputs[0] if from_inputs else None)
        if k is not None and k not in from_inputs and not params:
            # reads nothing of its layer: hoisted if other layers use it
            if any(anchor(u) not in (None, False, k) for u in users.get(n, [])):
                k = None
        keys[n] = k
    return keys


def _forward_anchor(n: Node):
    """Forward nodes know their scope: a layer, or False (outside the layers)."""
    if n.op is Op.PARAM:
        return layer_key(n.attrs.get("name", "")) or False
    return layer_key(n.scope) or False


def _backward_anchor(fwd: Graph):
    saved = {name: layer_key(n.scope) for name, n in fwd.outputs.items()}

    def anchor(n: Node):
        if n.op is Op.PARAM:
            return layer_key(n.attrs.get("name", ""))
        if n.op is Op.INPUT:
            return saved.get(n.attrs.get("name", ""))
        return layer_key(n.scope)
    return anchor


def _table(title: str, rows: List[Launch], title_fill: str = "#eef2fb") -> str:
    body = []
    for ln in rows:
        name, kind, ops, shape = ln.cells
        fc = "#6b7280" if ln.kernel is None else "#111111"
        body.append(f"<tr><td align=\"right\">{_font(str(ln.index), '#9ca3af')}</td>"
                    f"<td align=\"left\">{_font(name, fc)}</td>"
                    f"<td align=\"left\">{_font(kind, fc)}</td>"
                    f"<td align=\"left\" balign=\"left\">{_font(ops, fc)}</td>"
                    f"<td align=\"left\">{_font(shape, '#6b7280')}</td></tr>")
    return ("<<table border=\"0\" cellborder=\"0\" cellspacing=\"0\" cellpadding=\"2\" "
            "bgcolor=\"#ffffff\" color=\"#9aa5b8\">"
            f"<tr><td colspan=\"5\" bgcolor=\"{title_fill}\" align=\"left\"><b>{esc(title)}</b>"
            "</td></tr>" + "".join(body) + "</table>>")


def _font(text: str, colour: str) -> str:
    """Coloured text for a table cell (Graphviz rejects an empty <font>)."""
    return f"<font color=\"{colour}\">{text}</font>" if text else " "


def _kernel_column(view: View, name: str, g: Graph, anchor, fold_layers: bool):
    """One column: the launches in order, cut into tables where the layer changes. The
    layers of a loop whose launches are the same (as multisets: the scheduler may order them
    differently) fold: only the first is drawn, its title says which layers it stands for."""
    keys_of = _graph_keys(g, anchor)
    launches = _launches(g, lambda n: keys_of.get(n))
    n_k = sum(1 for ln in launches if ln.kernel)
    n_t = sum(len(ln.parts) for ln in launches if not ln.kernel)   # as lmc compile counts
    col = (f"c:{name}",)
    view.cluster(col, f"<<b>{esc(name)}</b>: {n_k} Triton kernels, {n_t} ops run by torch "
                      f"(consecutive views share a row); a table per layer, in order of its "
                      f"first launch>",
                 style="rounded", color="#8b95a7", fontsize=12)
    by_layer: Dict[Tuple[str, int], List[Launch]] = {}
    for ln in launches:
        if ln.key is not None:
            by_layer.setdefault(ln.key, []).append(ln)
    rep_layer = {k: k for k in by_layer}
    loops: Dict[str, List[int]] = {}
    for (loop, i) in by_layer:
        loops.setdefault(loop, []).append(i)
    for loop, idx in loops.items():
        keys = [(loop, i) for i in sorted(idx)]
        sigs = [tuple(sorted(repr(p) for ln in by_layer[k] for p in ln.parts)) for k in keys]
        items = fold(sigs) if fold_layers else [fold_plain(len(keys))]
        rep = representative(items)
        for j, k in enumerate(keys):
            rep_layer[k] = keys[rep[j]]
    stands: Dict[Tuple[str, int], List[Tuple[str, int]]] = {}
    for k in sorted(rep_layer):
        stands.setdefault(rep_layer[k], []).append(k)

    # one table per drawn layer (its launches in order, wherever the scheduler put them)
    # and one per stretch of launches outside the layers; tables in order of first launch
    groups: List[List[Launch]] = []
    of_layer: Dict[Tuple[str, int], List[Launch]] = {}
    for ln in launches:
        if ln.key is None:
            if not groups or groups[-1][0].key is not None or groups[-1][-1].index != ln.index - 1:
                groups.append([])
            groups[-1].append(ln)
        elif rep_layer[ln.key] == ln.key:   # folded layers are drawn as their representative
            if ln.key not in of_layer:
                of_layer[ln.key] = []
                groups.append(of_layer[ln.key])
            of_layer[ln.key].append(ln)
    tables: List[str] = []
    for rows in groups:
        k = rows[0].key
        tid = f"{name}_{len(tables) + 1}"
        rng = f"{rows[0].index}–{rows[-1].index}" if len(rows) > 1 else f"{rows[0].index}"
        title = f"launches {rng}" + (f" · {k[0]}.{k[1]}" if k else "")
        if rows[-1].index - rows[0].index + 1 != len(rows):
            title += f" ({len(rows)} of them)"
        tip = title + "\n" + "\n".join(ln.text for ln in rows)
        fill = "#eef2fb"
        group = stands.get(k, []) if k else []
        if len(group) > 1:
            title += f"  ×{len(group)}: stands for {_layer_list(group)}"
            fill = "#fde7c8"
            tip += ("\nthe kernels of all the layers drawn here: "
                    + ", ".join(ln.kernel for g_ in group for ln in by_layer[g_] if ln.kernel))
        view.node(tid, col, shape="plain", label=_table(title, rows, fill), tooltip=tip)
        tables.append(tid)
    for a, b in zip(tables, tables[1:]):
        view.edge(a, b)
    folded = sum(1 for k, r in rep_layer.items() if k != r)
    return {"launches": len(launches), "kernels": n_k, "torch_ops": n_t,
            "folded_layers": folded}


def _layer_list(keys: List[Tuple[str, int]]) -> str:
    """layers.0–6, 8–14"""
    runs: List[List[int]] = []
    for _, i in keys:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = [f"{r[0]}–{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs]
    return f"{keys[0][0]}." + ", ".join(parts)


def kernels_view(c, fold_layers: bool = True):
    from ..codegen.program import apply_patterns, fuse
    from ..passes import run_pipeline
    from ..passes.autodiff import differentiate

    patterned = apply_patterns(c.graph)
    prog = differentiate(patterned)
    fwd = fuse(patterned)
    bwd = fuse(run_pipeline(prog.backward))
    view = View(f"{c.graph.name}: kernel sequence of one training step ({_subtitle(c.graph)})")
    view.graph_attrs.update(nodesep=0.5, ranksep=0.25)
    a = _kernel_column(view, "forward", fwd, _forward_anchor, fold_layers)
    b = _kernel_column(view, "backward", bwd, _backward_anchor(prog.forward), fold_layers)
    notes = [f"forward: {a['kernels']} Triton kernels and {a['torch_ops']} ops run by torch; "
             f"backward: {b['kernels']} and {b['torch_ops']}; grey rows run as torch ops",
             f"folded layers: forward {a['folded_layers']}, backward {b['folded_layers']}"]
    return view, notes


STAGES = {"source": source_view, "fused": fused_view, "kernels": kernels_view,
          "decode": decode_view}
