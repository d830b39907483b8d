"""Node and Graph: the one IR that every stage reads and writes.

A `Node` is op + inputs + attrs + type (plus where it came from). Nodes are created through
`Node.make`, which runs the op's shape rule, so a node's type is always consistent with its
inputs. A `Graph` is a topologically ordered list of nodes and a dict of named outputs; passes
are functions Graph -> Graph that build new graphs rather than mutating old ones.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable, List, Optional

from ..errors import Loc, ShapeError
from .ops import Op

_ids = itertools.count()


class Node:
    __slots__ = ("op", "inputs", "attrs", "type", "loc", "scope", "id")

    def __init__(self, op: Op, inputs: tuple, attrs: dict, type, loc: Optional[Loc] = None,
                 scope: str = ""):
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = attrs
        self.type = type  # TensorType, or a tuple of them for a BLOCK node
        self.loc = loc
        self.scope = scope  # instance path, e.g. "layers.3.attn": where the node came from
        self.id = next(_ids)

    @staticmethod
    def make(op: Op, inputs: Iterable["Node"] = (), attrs: Optional[dict] = None,
             loc: Optional[Loc] = None, scope: str = "") -> "Node":
        from ..ops.shapes import infer

        inputs = tuple(inputs)
        attrs = dict(attrs or {})
        if op.arity is not None and len(inputs) != op.arity:
            raise ShapeError(f"{op.value} takes {op.arity} tensor input(s), got {len(inputs)}", loc)
        try:
            t = infer(op, [i.type for i in inputs], attrs)
        except ShapeError as e:
            raise e.with_loc(loc)
        return Node(op, inputs, attrs, t, loc, scope)

    def replace(self, inputs=None, attrs=None) -> "Node":
        """A copy with new inputs/attrs (type re-inferred), keeping loc and scope."""
        return Node.make(self.op, self.inputs if inputs is None else inputs,
                         self.attrs if attrs is None else attrs, self.loc, self.scope)

    def remapped(self, new: Dict["Node", "Node"]) -> "Node":
        """This node reading new.get(x, x) for each input x: itself when nothing changes,
        else a copy keeping its type (a replacement has its original's type), loc and
        scope. The rewiring step of a pass that replaces nodes while walking a graph."""
        ins = tuple(new.get(i, i) for i in self.inputs)
        if ins == self.inputs:
            return self
        return Node(self.op, ins, self.attrs, self.type, self.loc, self.scope)

    @property
    def name(self) -> Optional[str]:
        return self.attrs.get("name")

    def __repr__(self):
        return f"<{self.op.value}#{self.id} {self.type}>"


class Graph:
    def __init__(self, name: str, nodes: List[Node], outputs: Dict[str, Node],
                 meta: Optional[Dict[str, Any]] = None):
        self.name = name
        self.nodes = list(nodes)
        self.outputs = dict(outputs)
        self.meta = dict(meta or {})  # config, source file, pass history, fusions

    # -- views --------------------------------------------------------------------------
    @property
    def inputs(self) -> List[Node]:
        return [n for n in self.nodes if n.op is Op.INPUT]

    @property
    def params(self) -> List[Node]:
        return [n for n in self.nodes if n.op is Op.PARAM]

    def users(self) -> Dict[Node, List[Node]]:
        out: Dict[Node, List[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def op_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for n in self.nodes:
            counts[n.op.value] = counts.get(n.op.value, 0) + 1
        return dict(sorted(counts.items()))

    def param_count(self, env=None) -> int:
        from .dims import evaluate

        total = 0
        for p in self.params:
            n = 1
            for d in p.type.shape:
                n *= evaluate(d, env or {})
            total += n
        return total

    def nx(self):
        """The dataflow graph as a networkx DiGraph (edges input -> user)."""
        import networkx as nx

        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n)
            for i in n.inputs:
                g.add_edge(i, n)
        return g

    def with_nodes(self, nodes: List[Node], outputs: Dict[str, Node]) -> "Graph":
        return Graph(self.name, nodes, outputs, self.meta)

    def __len__(self):
        return len(self.nodes)

    def __str__(self):
        from .printer import format_graph

        return format_graph(self)


def toposort(outputs: Iterable[Node], keep: Iterable[Node] = ()) -> List[Node]:
    """Nodes reachable from `outputs` (and `keep`), inputs before users, in a deterministic
    order (creation order among ready nodes), via networkx."""
    import networkx as nx

    g = nx.DiGraph()
    stack = list(outputs) + list(keep)
    seen = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        g.add_node(n)
        for i in n.inputs:
            g.add_edge(i, n)
            stack.append(i)
    return list(nx.lexicographical_topological_sort(g, key=lambda n: n.id))
