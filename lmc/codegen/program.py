"""From an optimised graph to a kernel program: the fusion passes, then one Triton module.

`FUSION_PASSES` is the scheduling pipeline, in order: each pass claims groups of nodes the
earlier ones left and turns each into a FUSED node (lmc/codegen/__init__.py describes the
contract). A pass may be disabled by name (``lmc bench --disable``) to measure what it buys.
"""
from __future__ import annotations

import importlib
import re
from typing import Dict, List, Sequence, Set, Tuple

from ..errors import UsageError
from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from ..passes.fuse_column_sums import fuse_column_sums
from ..passes.fuse_matmul import fuse_matmul
from ..passes.fuse_matmul_prologues import fuse_matmul_prologues
from ..passes.fuse_matmul_reductions import fuse_matmul_reductions
from ..passes.fuse_pointwise import fuse_pointwise, fusible, is_source
from ..passes.fuse_reductions import fuse_reductions
from ..passes.verify import verify
from . import kind_module

FUSION_PASSES: List[Tuple[str, object]] = [
    ("fuse_matmul", fuse_matmul),          # a matmul with its pointwise epilogue
    ("fuse_reductions", fuse_reductions),  # a reduction with its prologue and epilogue
    ("fuse_pointwise", fuse_pointwise),    # chains of elementwise ops
    # a reduction along a matmul output's rows (the loss's logsumexp) in the matmul kernel
    ("fuse_matmul_reductions", fuse_matmul_reductions),
    # a pointwise kernel read only as matmul operands (the loss's dlogits) in their loads
    ("fuse_matmul_prologues", fuse_matmul_prologues),
    # a sum over every row (a norm's weight gradient) in the row kernel reading its values
    ("fuse_column_sums", fuse_column_sums),
]


# pattern passes run before autodiff (their fused op's VJP is the fused backward), on the
# program the triton backend trains or runs; each is the function of the same name in
# lmc/passes/<name>.py, and --disable knows them
PATTERN_PASSES = [
    "fuse_rope_attention",
    "fuse_linear_attention",
    "fuse_moe_gating",
    "split_gated_projection",   # not a fusion itself: makes a fused W_gate|W_up's halves
]                               # the two products fuse_matmul gates in one kernel


def apply_patterns(g: Graph, disable: Sequence[str] = ()) -> Graph:
    """The pattern passes, on a primitive graph before autodiff."""
    from ..passes import debug_dump, debugging
    for name in PATTERN_PASSES:
        if name not in disable:
            g = getattr(importlib.import_module(f"lmc.passes.{name}"), name)(g)
            if debugging():
                debug_dump(g, f"after {name}")
    return g


# the pattern passes of a decode step graph (lmc/passes/decode.py), in order: the step's
# attention over its cache as one flash-decoding op, its decayed linear attention as one
# recurrent step, and its MoE layers as the routed moe_layer (only the k chosen experts'
# weights read per token, where the dense step graph multiplies by every expert's)
DECODE_PATTERN_PASSES = [
    "fuse_decode_attention",
    "fuse_decode_linear_attention",
    "fuse_moe_gating",
    "split_gated_projection",
]


# their options on a step graph: an MoE layer's op there also adds the residual after it
# (no backward to derive from its body)
DECODE_PASS_OPTIONS = {"fuse_moe_gating": {"residual": True}}


def apply_decode_patterns(g: Graph, disable: Sequence[str] = ()) -> Graph:
    """The decode pattern passes, on a decode step graph (a Decoder's on the triton backend);
    `disable` leaves out fuse_moe_gating when the model's training program leaves it out."""
    for name in DECODE_PATTERN_PASSES:
        if name not in disable:
            g = getattr(importlib.import_module(f"lmc.passes.{name}"), name)(
                g, **DECODE_PASS_OPTIONS.get(name, {}))
    return g


def fusion_names() -> List[str]:
    return PATTERN_PASSES + [n for n, _ in FUSION_PASSES]


def fuse(g: Graph, disable: Sequence[str] = (), cache_writes: bool = False,
         decode: bool = False) -> Graph:
    """The fusion passes; `cache_writes` (the static Decoder's step only, where the caches
    are written in place) also lets kernels store the values written into a cache; `decode`
    (a Decoder's step) computes RoPE of q and k in their projection's kernel
    (fuse_rope_epilogue)."""
    names = set(fusion_names())
    unknown = set(disable) - names
    if unknown:
        raise UsageError(f"unknown fusion pass {sorted(unknown)[0]!r} (fusion passes: "
                       f"{', '.join(n for n, _ in FUSION_PASSES)})")
    g = verify(sink_scalar_ops(split_widening_casts(sink_recomputations(
        drop_broadcast_expands(g)))), inlined=True)
    from ..passes import debug_dump, debugging
    if cache_writes:     # a ring's update, in place: no concatenation stored for it
        from ..passes.fuse_cache_writes import ring_updates
        g = verify(ring_updates(g), inlined=True)
    for name, fn in FUSION_PASSES:
        if name not in disable:
            g = verify(fn(g), inlined=True)
            if debugging():
                debug_dump(g, f"after {name}")
    if cache_writes:
        from ..passes.fuse_cache_writes import fuse_cache_writes
        g = verify(fuse_cache_writes(g), inlined=True)
    if decode:
        from ..passes.fuse_rope_epilogue import fuse_rope_epilogue
        g = verify(fuse_rope_epilogue(g), inlined=True)
    if cache_writes:     # last: the in-place updates stay after every read of the state
        from ..passes.fuse_cache_writes import updates_last
        g = verify(updates_last(g), inlined=True)
    from .wrapper import mark_strided_outputs
    return mark_strided_outputs(g)


def drop_broadcast_expands(g: Graph) -> Graph:
    """A pointwise op reading expand(x) reads x instead where another of its inputs already
    has the op's full shape: its output is the same (x broadcasts as the expand did), and the
    expand, a torch op between kernels, no longer separates x's producer from its reader. A
    mean's VJP is such an expand (expand(g / N) over the reduced axis): a norm backward's
    per-row sum [B, T, 1] then reaches its [B, T, d] consumer as a broadcast, which
    fuse_reductions takes into the reduction's kernel instead of launching one more."""
    outputs = set(g.outputs.values())
    repl: Dict[Node, Node] = {}
    nodes: List[Node] = []
    for n in g.nodes:
        ins = tuple(repl.get(x, x) for x in n.inputs)
        if n.op.kind is Kind.POINTWISE and n.type.rank:
            exp = [x for x in ins if x.op is Op.EXPAND]
            if len(exp) == 1 and n not in outputs and all(
                    x is exp[0] or x.type.rank == 0 for x in ins):
                # op(expand(x), scalars) = expand(op(x, scalars)): computed at x's size,
                # so the expand moves on to a reader that may drop it
                small = Node.make(n.op, [x.inputs[0] if x is exp[0] else x for x in ins],
                                  n.attrs, n.loc, n.scope)
                if small.type.dtype == n.type.dtype:
                    nodes.append(small)
                    repl[n] = Node(Op.EXPAND, (small,), exp[0].attrs, n.type, n.loc, n.scope)
                    nodes.append(repl[n])
                    continue
            full = [getattr(x.type, "shape", None) == n.type.shape for x in ins]
            ins = tuple(x.inputs[0] if x.op is Op.EXPAND and any(
                f for j, f in enumerate(full) if j != i) else x for i, x in enumerate(ins))
        if ins != n.inputs:
            repl[n] = Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        nodes.append(repl.get(n, n))
    if not repl:
        return g
    from ..passes.basic import dce
    return dce(g.with_nodes(nodes, {k: repl.get(v, v) for k, v in g.outputs.items()}))


_FUSED_REDUCTIONS = (Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP, Op.SOFTMAX)


def split_widening_casts(g: Graph) -> Graph:
    """A widening cast (bf16 -> f32) read by several kernels' ops is one cast per reader,
    each just before it: every kernel that takes a copy in reads the narrow tensor and widens
    it in registers, where one shared cast would be stored at full width by the kernel that
    computed it and read back at full width by the others (a norm backward's dy, cast from
    the dX matmul, is read by the row reductions and by the weight gradient's column sum).
    A reader that is no pointwise op or reduction (a matmul, a torch op) keeps the original."""
    users = g.users()
    outputs = set(g.outputs.values())
    copies: Dict[Node, List[Node]] = {}     # reader -> the casts it gets its own copy of
    for n in g.nodes:
        if (n.op is Op.CAST and n not in outputs and len(set(users.get(n, ()))) > 1
                and n.type.dtype.itemsize > n.inputs[0].type.dtype.itemsize):
            readers = list(dict.fromkeys(users[n]))    # x * x reads its cast once
            take = [u for u in readers
                    if u.op.kind is Kind.POINTWISE or u.op in _FUSED_REDUCTIONS]
            keep = len(take) == len(readers)        # every reader has a copy: the first
            for u in take[1:] if keep else take:    # reader keeps the original
                copies.setdefault(u, []).append(n)
    if not copies:
        return g
    nodes: List[Node] = []
    repl: Dict[Node, Node] = {}
    for n in g.nodes:
        ins = tuple(repl.get(x, x) for x in n.inputs)
        for src in copies.get(n, ()):
            c = Node(Op.CAST, (repl.get(src.inputs[0], src.inputs[0]),), src.attrs, src.type,
                     src.loc, src.scope)
            nodes.append(c)
            ins = tuple(c if x is repl.get(src, src) else x for x in ins)
        if ins != n.inputs:
            repl[n] = Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        nodes.append(repl.get(n, n))
    return g.with_nodes(nodes, {k: repl.get(v, v) for k, v in g.outputs.items()})


def sink_scalar_ops(g: Graph) -> Graph:
    """op(view(y), scalars) -> view(op(y, scalars)): a pointwise op whose other operands are
    scalar constants, reading a permute or reshape (read by nothing else) of a computed
    value, runs before the view instead (the same values, moved), so it can join the
    epilogue of the kernel computing that value (a matmul's, a reduction's) or its
    pointwise kernel. yoco's retention gates are logsigmoid(x @ Wg),
    permuted to [B, H, T], then divided by a constant: the division was a kernel of its own.
    Chains of such ops sink one after another."""
    users = g.users()
    outputs = set(g.outputs.values())
    orig: Dict[Node, Node] = {}       # a node made here -> the node whose readers it has
    repl: Dict[Node, Node] = {}
    nodes: List[Node] = []
    gone: Set[Node] = set()
    for n in g.nodes:
        m = n.remapped(repl)
        views = [x for x in m.inputs if x.op in (Op.PERMUTE, Op.RESHAPE)]
        if (n.op.kind is Kind.POINTWISE and fusible(n)[0] and len(views) == 1
                and all(x is views[0] or (x.op is Op.CONST and x.type.rank == 0)
                        for x in m.inputs)):
            v = views[0]
            y = v.inputs[0]
            if (len(users[orig.get(v, v)]) == 1 and orig.get(v, v) not in outputs
                    and not is_source(y)):
                u = Node.make(n.op, [y if x is v else x for x in m.inputs], n.attrs, n.loc,
                              n.scope)
                w = Node.make(v.op, [u], v.attrs, v.loc, v.scope)
                if u.type.shape == y.type.shape and w.type.shape == n.type.shape:
                    gone.add(v)
                    nodes += [u, w]
                    orig[w] = n
                    repl[n] = w
                    continue
        if m is not n:
            repl[n] = m
            orig[m] = n
        nodes.append(m)
    if not gone:
        return g
    return g.with_nodes([n for n in nodes if n not in gone],
                        {k: repl.get(v, v) for k, v in g.outputs.items()})


def sink_recomputations(g: Graph) -> Graph:
    """Pointwise values computed only from graph inputs and constants (a backward's
    recomputations of values forward' did not save, autodiff._rematerialize, and activation
    derivatives of a saved gate) move to just before their first reader, inputs first, when
    every reader has their shape: the fusion passes group greedily in order, so there they
    join the kernel that reads them instead of being a kernel that stores them. A value read
    broadcast (a per-row [B, T, 1] piece of a norm's backward) cannot join its reader and
    stays where it was, beside its siblings, which can share its launch."""
    outputs = set(g.outputs.values())
    cone: set = set()
    for n in g.nodes:
        if n.op.kind is Kind.POINTWISE and n not in outputs and n.inputs and all(
                x.op in (Op.INPUT, Op.CONST) or x in cone for x in n.inputs):
            cone.add(n)
    if not cone:
        return g
    users = g.users()
    sink: set = set()
    for n in reversed(g.nodes):     # readers first
        if n in cone and users.get(n) and all(
                getattr(u.type, "shape", None) == n.type.shape   # a tuple: a multi-output op
                and (u not in cone or u in sink) for u in users[n]):
            sink.add(n)
    if not sink:
        return g
    nodes: List[Node] = []
    done: set = set()

    def emit(v: Node) -> None:
        if v in sink and v not in done:
            done.add(v)
            for x in v.inputs:
                emit(x)
            nodes.append(v)
    for n in g.nodes:
        if n in sink:
            continue
        for x in n.inputs:
            emit(x)
        nodes.append(n)
    return g.with_nodes(nodes, dict(g.outputs))


def fused_nodes(g: Graph):
    return [n for n in g.nodes if n.op is Op.FUSED]


def module_source(g: Graph) -> str:
    """One Python module holding every kernel of the fused graph `g`, in launch order: the
    device helpers the kernels call, the generated kernels, and a comment naming each
    template launch's hand-written kernels (lmc/codegen/<module>.py) and IR nodes."""
    kernels: Dict[str, str] = {}
    helpers: List[str] = []
    templates: List[str] = []
    for n in fused_nodes(g):
        mod = kind_module(n.attrs["kind"])
        for h in getattr(mod, "HELPERS_FOR", lambda: [mod.HELPERS])():
            if h and h not in helpers:
                helpers.append(h)
        body = n.attrs["body"]
        src = mod.generate(body, n.attrs["kernel"])
        if src:
            kernels[n.attrs["kernel"]] = src
        elif body.meta.get("module"):   # a template kind (codegen/templates.py)
            lines: Dict[str, Set[int]] = {}
            for m in body.nodes:
                if m.loc and m.op not in (Op.INPUT, Op.CONST):
                    lines.setdefault(m.loc.file.rsplit("/", 1)[-1], set()).add(m.loc.line)
            where = "; ".join(f"{f} lines {', '.join(map(str, sorted(ls)))}"
                              for f, ls in lines.items())
            templates.append(f"#   {n.attrs['kernel']}: {body.meta.get('template')} in "
                             f"lmc/codegen/{body.meta['module']}.py"
                             + (f", from {where}" if where else ""))
    head = ("# Generated by lmc: Triton kernels for one compiled graph.\n"
            "# Each kernel's comment lists the IR nodes (and YAML lines) it came from.\n"
            "import triton\nimport triton.language as tl\n")
    # a kernel whose source is another's but for its name (the same block in every layer)
    # is that kernel: compiled and autotuned once, not once per layer
    first: Dict[str, str] = {}
    defs, aliases = [], []
    for k in kernels:       # launch order: the first of identical kernels holds the source
        same = first.setdefault(kernels[k].replace(k, "@"), k)
        if same == k:
            defs.append(kernels[k])
        else:
            aliases.append(f"{k} = {same}")
    tail = ("\n\n# kernels identical to one above but for the name\n" + "\n".join(aliases)
            + "\n") if aliases else ""
    if templates:
        tail += ("\n\n# launched from hand-written templates (not generated, so not here):\n"
                 + "\n".join(templates) + "\n")
    return head + _used_helpers(helpers, "\n".join(defs)) + "\n\n" + "\n\n".join(defs) + tail


def _used_helpers(helpers: List[str], code: str) -> str:
    """The @triton.jit helpers (pointwise.HELPERS: _tanh, _softplus, ...) that `code` calls,
    directly or through another helper, in their order."""
    blocks = []
    for h in helpers:
        for part in re.split(r"(?m)^(?=@triton\.jit)", h):
            m = re.search(r"(?m)^def (\w+)\(", part)
            if m:
                blocks.append((m.group(1), part.strip("\n")))
    keep, text, grew = set(), code, True
    while grew:
        grew = False
        for name, src in blocks:
            if name not in keep and re.search(rf"\b{name}\(", text):
                keep.add(name)
                text += src
                grew = True
    return "".join(f"\n{src}\n\n" for name, src in blocks if name in keep)


def kernel_list(g: Graph) -> List[dict]:
    """[{kernel, kind, ops}] in launch order."""
    return [{"kernel": n.attrs["kernel"], "kind": n.attrs["kind"],
             "ops": [m.op.value for m in n.attrs["body"].nodes
                     if m.op is not Op.INPUT and m.op is not Op.CONST]}
            for n in fused_nodes(g)]
