"""The wrapper program: one plain Python function per compiled graph that runs it.

It calls the graph's kernels and torch ops in order and allocates kernel outputs from a
memory plan made at compile time by liveness:

- every kernel output gets a *slot*: a flat buffer of its (symbolic) size and dtype;
- a slot is free again after the last use of every value that may alias it (a view or any
  torch op's result is assumed to alias its inputs; a kernel's output never does);
- a later kernel output of the same symbolic size and dtype reuses a free slot as a view, so
  one forward allocates a handful of buffers rather than one per kernel;
- slots reachable from a graph output (what the caller keeps, e.g. activations saved for the
  backward) are never reused.

Values are dropped (``del``) after their last use, as the interpreter-style executor does.

A concatenation whose pieces are outputs of kernels that write through strides (the
attention templates, reduction row outputs, pointwise outputs, which then store through
strides), each read only by it through views it can invert (GPT-2's q, k, v gradients
[B, H, T, D] -> permute -> reshape [B, T, d] -> concat [B, T, 3d]; the gradient of a split
projection), is not run: its buffer is allocated first and each kernel writes its piece
into a strided view of it (`concat_aliases`).
The source is what `lmc compile -o DIR` writes as ``program_<graph>.py``.
"""
from __future__ import annotations

from typing import Dict, List, Set

from ..ir.dims import Dim, unit_axes_only
from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op


def py_dim(d) -> str:
    """A symbolic size as a Python expression over the dims' local names."""
    if not isinstance(d, Dim):
        return str(int(d))
    parts = []
    for mono, coef in sorted(d.terms.items()):
        factors = ([str(coef)] if coef != 1 or not mono else []) + list(mono)
        parts.append("*".join(factors))
    return " + ".join(parts) if parts else "0"


def _numel(shape):
    n = 1
    for d in shape:
        n = n * d
    return n


# kernels that write every output through the strides of the tensor they are given, whatever
# they are (a view into a concatenation's buffer): the attention and linear-attention
# templates' launchers, generated reduction kernels (row outputs, and 1-d column sums: their
# finishing kernel takes the one stride) and pointwise kernels (the outputs
# `mark_strided_outputs` marks; a cache write stores into its cache). Matmul kernels store
# contiguously.
ALIASABLE_KINDS = ("rope_attention", "rope_attention_bwd", "linear_attention",
                   "linear_attention_bwd", "reduction", "pointwise")


def _aliasable(y: Node) -> bool:
    """y, an output of a FUSED kernel, can be written into a view it is given."""
    f = y.inputs[0]
    kind = f.attrs.get("kind")
    if kind not in ALIASABLE_KINDS:
        return False
    if kind not in ("pointwise", "reduction"):
        return True
    body = f.attrs["body"]
    o = list(body.outputs.values())[y.attrs["index"]]
    if o.op is Op.INDEX_COPY:
        return False
    if kind == "reduction":
        from .reduction import Plan as ReductionPlan
        return o.type.rank == 1 or o not in ReductionPlan(body).columns
    return True


def concat_aliases(g: Graph) -> Dict[Node, List[tuple]]:
    """{concat: [(kernel output, its view into the concat's buffer), ...]} for each CONCAT
    along the last axis (it may be a graph output: the caller keeps its buffer) whose every
    piece is a kernel output of ALIASABLE_KINDS (not a graph output, not written in place)
    seen through views read only on the way to the concat: permutes, reshapes merging the
    last two axes (undone by splitting the piece's last axis, a view of a narrowed
    contiguous buffer), reshapes adding or dropping axes of size 1, and, before any permute
    (nearest the concat), reshapes that regroup the leading axes and the trailing ones
    separately (both shapes end in axes whose product is the piece's size: the rows of a
    narrowed buffer stay evenly strided, its columns contiguous). The view is (offset,
    size, [("view", shape) | ("permute", perm), ...]) from the concat's buffer to the kernel
    output."""
    readers = g.users()
    outs = set(g.outputs.values())
    found: Dict[Node, List[tuple]] = {}
    for c in g.nodes:
        if c.op is not Op.CONCAT or c.attrs["axis"] % c.type.rank != c.type.rank - 1 or \
                len(set(c.inputs)) != len(c.inputs):
            continue
        pieces, off, ok = [], 0, True
        for x in c.inputs:
            size = x.type.shape[-1]
            steps, y, above = [], x, c
            while ok and y.op in (Op.PERMUTE, Op.RESHAPE):
                if len(readers.get(y, [])) != 1 or y in outs:
                    ok = False
                    break
                if y.op is Op.PERMUTE:
                    perm = list(y.attrs["perm"])
                    steps.append(("permute", [perm.index(d) for d in range(len(perm))]))
                else:
                    src, dst = y.inputs[0].type.shape, y.type.shape
                    merge = len(src) == len(dst) + 1 and tuple(src[:-2]) == tuple(dst[:-1]) \
                        and all(isinstance(d, int) for d in src[-2:]) \
                        and src[-2] * src[-1] == dst[-1]
                    regroup = all(op == "view" for op, _ in steps) and \
                        _ends_in(src, size) and _ends_in(dst, size)
                    if not (merge or regroup or unit_axes_only(src, dst)):
                        ok = False
                        break
                    steps.append(("view", tuple(src)))
                above, y = y, y.inputs[0]
            ok = ok and isinstance(size, int) and y.op is Op.GETITEM and \
                y.inputs[0].op is Op.FUSED and _aliasable(y) and \
                inplace_source(y) is None and y not in outs and \
                readers.get(y, []) == [above] and readers.get(x, []) == [c]
            if not ok:
                break
            pieces.append((y, (off, size, steps)))
            off += size
        if ok and pieces:
            found[c] = pieces
    return found


def _ends_in(shape, n) -> bool:
    """shape's trailing axes (all numbers) multiply to exactly n."""
    if not isinstance(n, int):
        return False
    p = 1
    for d in reversed(shape):
        if p == n:
            return True
        if not isinstance(d, int):
            return False
        p *= d
    return p == n


class Plan:
    """The memory plan of a graph: slot per kernel output, and what to free where."""

    def __init__(self, g: Graph):
        self.slot_of: Dict[Node, int] = {}         # kernel output value (GETITEM) -> slot
        self.slot_size: List[object] = []          # symbolic numel per slot
        self.slot_dtype: List[object] = []
        self.free_after: Dict[int, List[Node]] = {}  # position -> values dropped after it
        roots: Dict[Node, Set[int]] = {}
        users_pos: Dict[Node, int] = {}
        for i, n in enumerate(g.nodes):
            for x in n.inputs:
                users_pos[x] = i
        outs = set(g.outputs.values())
        escaping: Set[int] = set()
        free_slots: List[int] = []
        slot_last: Dict[int, int] = {}      # slot -> last position any alias is used
        release_at: Dict[int, List[int]] = {}
        # the last use of a slot is the last use of any value aliasing it; computed first
        for i, n in enumerate(g.nodes):
            if inplace_source(n) is not None:     # the kernel wrote into one of its inputs
                roots[n] = roots.get(inplace_source(n), set())
            elif n.op is Op.GETITEM and n.inputs[0].op is Op.FUSED:
                roots[n] = {("v", n)}
            else:
                roots[n] = set().union(*[roots.get(x, set()) for x in n.inputs]) \
                    if n.inputs else set()
        last_alias: Dict[object, int] = {}
        for n in g.nodes:
            for r in roots[n]:
                last_alias[r] = max(last_alias.get(r, -1), users_pos.get(n, -1))
        esc_roots = set().union(*[roots[o] for o in outs]) if outs else set()
        # assign slots in order, reusing those whose aliases are all dead; a kernel's
        # outputs are placed when it runs, so never in a buffer one of its inputs uses
        gets: Dict[Node, List[Node]] = {}
        aliased = {y for pieces in concat_aliases(g).values() for y, _ in pieces}
        for n in g.nodes:
            if n.op is Op.GETITEM and n.inputs[0].op is Op.FUSED and \
                    inplace_source(n) is None and n not in aliased:
                gets.setdefault(n.inputs[0], []).append(n)
        for i, n in enumerate(g.nodes):
            for s in release_at.pop(i - 1, []):
                free_slots.append(s)
            for gi in sorted(gets.get(n, []), key=lambda u: u.attrs["index"]):
                size, dt = _numel(gi.type.shape), gi.type.dtype
                reuse = next((s for s in free_slots if self.slot_dtype[s] is dt
                              and _same(self.slot_size[s], size)), None)
                if reuse is None:
                    reuse = len(self.slot_size)
                    self.slot_size.append(size)
                    self.slot_dtype.append(dt)
                else:
                    free_slots.remove(reuse)
                self.slot_of[gi] = reuse
                r = ("v", gi)
                if r in esc_roots:
                    escaping.add(reuse)
                else:
                    end = max(last_alias.get(r, i), i)
                    slot_last[reuse] = end
                    release_at.setdefault(end, []).append(reuse)
        for x, i in users_pos.items():
            if x not in outs:
                self.free_after.setdefault(i, []).append(x)
        self.escaping = escaping
        # a slot's buffer is dropped after the last use of the last value placed in it
        self.drop_after: Dict[int, List[int]] = {}
        for s, end in slot_last.items():
            if s not in escaping:
                self.drop_after.setdefault(end, []).append(s)


def inplace_source(n: Node):
    """For a kernel output the kernel writes into one of its inputs (a static decode step's
    cache: `fuse_cache_writes`), that input; else None."""
    if n.op is not Op.GETITEM or n.inputs[0].op is not Op.FUSED:
        return None
    f = n.inputs[0]
    k = f.attrs.get("inplace", {}).get(n.attrs["index"])
    return None if k is None else f.inputs[k]


def _same(a, b) -> bool:
    if isinstance(a, Dim) or isinstance(b, Dim):
        from ..ir.dims import dims_equal
        return dims_equal(a, b)
    return int(a) == int(b)


def generate(g: Graph, label: str) -> str:
    """Python source of ``run(ctx, env, K, LAUNCH, REF, NODES)`` for graph `g`."""
    plan = Plan(g)
    name: Dict[Node, str] = {}
    syms = sorted({s for n in g.nodes for d in (n.type.shape if not isinstance(n.type, tuple)
                                                  else ()) if isinstance(d, Dim)
                   for s in d.symbols()})
    readers = g.users()
    outputs = set(g.outputs.values())
    # a source no one reads (a constant a kernel inlined, a saved value the backward's
    # kernels no longer need) is not loaded or computed; random ops always run (they draw)
    unread = {n for n in g.nodes if not n.inputs and n.op is not Op.FUSED and
              n.op.kind is not Kind.RANDOM and not readers.get(n) and n not in outputs}
    kernels = sum(n.op is Op.FUSED for n in g.nodes)
    torch_ops = sum(n.op not in (Op.FUSED, Op.GETITEM, Op.INPUT, Op.PARAM) and n not in unread
                    for n in g.nodes)
    lines = [
        f'"""lmc program for graph {g.name!r} ({label}): {kernels} kernel launches, '
        f'{torch_ops} torch ops,',
        f"{len(plan.slot_size)} kernel-output buffers for "
        f"{len(plan.slot_of)} kernel outputs (liveness plan; "
        f"{len(plan.escaping)} kept for the caller).\"\"\"",
        "import torch",
        "",
        "",
        "def run(ctx, env, K, LAUNCH, REF, NODES):",
        "    dev = ctx.device",
    ]
    for s in syms:
        lines.append(f"    {s} = ctx.dims[{s!r}]")
    allocated: Set[int] = set()
    pos = {n: i for i, n in enumerate(g.nodes)}
    into: Dict[Node, tuple] = {}          # a kernel output written into a concat's buffer
    for c, pieces in concat_aliases(g).items():
        for y, (off, size, steps) in pieces:
            into[y] = (c, off, size, steps)
    skip = {v for y, (c, _, _, _) in into.items() for v in _chain(y, c)}
    gets: Dict[Node, List[Node]] = {}
    for n in g.nodes:
        if n.op is Op.GETITEM and n.inputs[0].op is Op.FUSED:
            gets.setdefault(n.inputs[0], []).append(n)
    for i, n in enumerate(g.nodes):
        ins = ", ".join(name.get(x, "") for x in n.inputs)
        where = yaml_lines([n])
        if n in unread:
            pass
        elif n.op in (Op.INPUT, Op.PARAM):
            name[n] = f"v{i}"
            lines.append(f"    v{i} = env[{n.attrs['name']!r}]" + _saved_note(n))
        elif n.op is Op.FUSED:
            # one entry per body output, None where nothing reads it (a template op's
            # output only a backward needs, in a program with no backward)
            outs = ["None"] * len(n.attrs["body"].outputs)
            for gi in sorted(gets.get(n, []), key=lambda u: u.attrs["index"]):
                if gi in into:     # its piece of a concatenation's buffer, allocated first
                    c, off, size, steps = into[gi]
                    if c not in name:
                        name[c] = f"v{pos[c]}"
                        shape = ", ".join(py_dim(d) for d in c.type.shape)
                        lines.append(f"    {name[c]} = torch.empty(({shape},), "
                                     f"dtype={_torch_dtype(c.type.dtype)}, device=dev)"
                                     f"  # concat written by its pieces' kernels")
                    view = f"{name[c]}.narrow(-1, {off}, {size})"
                    for op, arg in steps:
                        view += (f".view({', '.join(py_dim(d) for d in arg)})" if op == "view"
                                 else f".permute{tuple(arg)}")
                    name[gi] = f"v{pos[gi]}"
                    lines.append(f"    {name[gi]} = {view}  # its piece of the concat")
                    outs[gi.attrs["index"]] = name[gi]
                    continue
                src = inplace_source(gi)
                if src is not None:            # written in place: the output is the input
                    name[gi] = f"v{pos[gi]}"
                    lines.append(f"    v{pos[gi]} = {name[src]}  # written in place")
                    outs[gi.attrs["index"]] = name[gi]
                    continue
                s = plan.slot_of[gi]
                note = "  # reuses a dead buffer" if s in allocated else ""
                if s not in allocated:
                    lines.append(f"    buf{s} = torch.empty({py_dim(plan.slot_size[s])}, "
                                 f"dtype={_torch_dtype(plan.slot_dtype[s])}, device=dev)")
                    allocated.add(s)
                name[gi] = f"v{pos[gi]}"
                perm = _reader_layout(n, gi, readers)
                if perm is None:
                    shape = ", ".join(py_dim(d) for d in gi.type.shape) or "()"
                    lines.append(f"    v{pos[gi]} = buf{s}.view({shape}"
                                 f"{',' if len(gi.type.shape) == 1 else ''}){note}")
                else:       # laid out as its reader permutes it: that permute is contiguous
                    shape = ", ".join(py_dim(gi.type.shape[d]) for d in perm)
                    inv = [perm.index(d) for d in range(len(perm))]
                    lines.append(f"    v{pos[gi]} = buf{s}.view({shape}).permute"
                                 f"{tuple(inv)}  # stored in its reader's order{note}")
                outs[gi.attrs["index"]] = name[gi]
            for k, j in n.attrs.get("inplace", {}).items():
                if outs[k] == "None":            # a cache written in place, read by no one
                    outs[k] = name[n.inputs[j]]
            # the YAML lines of every node the kernel holds, not only of its first
            where = yaml_lines([m for m in n.attrs["body"].nodes
                                if m.op not in (Op.INPUT, Op.CONST)]) or where
            lines.append(f"    LAUNCH[{n.attrs['kind']!r}](K[{n.attrs['kernel']!r}], [{ins}], "
                         f"[{', '.join(outs)}], NODES[{i}], ctx)  # {n.attrs['kind']} {where}")
        elif n in name or n in skip:     # a kernel output, or a concat its pieces wrote
            pass
        else:
            name[n] = f"v{i}"
            lines.append(f"    v{i} = REF[{i}](ctx, [{ins}], NODES[{i}].attrs)  "
                         f"# {n.op.value} {where}")
        dead = [name[x] for x in plan.free_after.get(i, []) if x in name]
        dead += [f"buf{s}" for s in plan.drop_after.get(i, [])]
        if dead:
            lines.append(f"    del {', '.join(dead)}")
    lines.append("    return {" + ", ".join(f"{k!r}: {name[v]}" for k, v in g.outputs.items())
                 + "}")
    return "\n".join(lines) + "\n"


def yaml_lines(nodes) -> str:
    """Where `nodes` come from: per file, their lines, runs of three or more as ranges
    ("llama.yaml:38,62-64"); "" when none has a place."""
    by_file: Dict[str, Set[int]] = {}
    for m in nodes:
        if m.loc:
            by_file.setdefault(m.loc.file.rsplit("/", 1)[-1], set()).add(m.loc.line)
    parts = []
    for f, ls in by_file.items():
        runs: List[List[int]] = []
        for ln in sorted(ls):
            if runs and ln == runs[-1][-1] + 1:
                runs[-1].append(ln)
            else:
                runs.append([ln])
        parts.append(f + ":" + ",".join(
            f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs))
    return " ".join(parts)


def _saved_note(n: Node) -> str:
    """For a backward's input holding a value the forward saved ("saved:<k>"): a comment
    with its type and the block (and YAML line) whose gradient reads it."""
    if not str(n.attrs.get("name", "")).startswith("saved:"):
        return ""
    line = yaml_lines([n])
    if n.scope:
        return f"  # {n.type}, for the gradient of {n.scope}" + (f" ({line})" if line else "")
    return f"  # {n.type}" + (f", for the gradient at {line}" if line else "")


# kinds whose kernels write every output through its strides (rope attention's lse is
# [B, H, T] and never permuted; linear attention's decay gradient is copied out; generated
# reduction kernels store through strides; matmul kernels store contiguously, pointwise
# kernels too but for the outputs `mark_strided_outputs` marks)
STRIDED_OUTPUT_KINDS = ("rope_attention", "rope_attention_bwd", "linear_attention",
                        "linear_attention_bwd", "reduction")


def _reader_layout(f: Node, gi: Node, readers) -> "List[int] | None":
    """For an output of a kernel that writes through strides (a kind of STRIDED_OUTPUT_KINDS,
    or a pointwise kernel's output marked by `mark_strided_outputs`), read by a permute
    (keeping the innermost axis) whose result is reshaped (attention's [B, H, T, D] seen as
    [B, T, H * D], which would copy): that permutation, so the output is allocated in its
    order and the reshape is a view. Else None (contiguous)."""
    kind = f.attrs.get("kind")
    if kind not in STRIDED_OUTPUT_KINDS and not (
            kind == "pointwise" and gi.attrs["index"] in
            f.attrs["body"].meta.get("strided_outputs", ())):
        return None
    return reader_permutation(gi, readers)


def reader_permutation(gi: Node, readers) -> "List[int] | None":
    """The permutation of a permute reading `gi` whose result a reshape reads (the innermost
    axis kept), or None."""
    for p in readers.get(gi, []):
        perm = list(p.attrs["perm"]) if p.op is Op.PERMUTE else []
        # the innermost axis stays innermost: stores along it stay contiguous (coalesced)
        if perm and perm[-1] == len(perm) - 1 and any(
                r.op is Op.RESHAPE for r in readers.get(p, [])):
            return perm
    return None


def mark_strided_outputs(g: Graph) -> Graph:
    """Mark, in each pointwise kernel's body meta ("strided_outputs"), the outputs the wrapper
    will allocate in a permuted order (`reader_permutation`) or as views into a concat's
    buffer (`concat_aliases`): the kernel then stores them through strides rather than at
    their flat index. Cache writes are never marked."""
    readers = g.users()
    pieces = {y for ps in concat_aliases(g).values() for y, _ in ps}   # written into a concat
    for n in g.nodes:
        if n.op is not Op.FUSED or n.attrs.get("kind") != "pointwise":
            continue
        outs = list(n.attrs["body"].outputs.values())
        marked = sorted(gi.attrs["index"] for gi in readers.get(n, [])
                        if gi.op is Op.GETITEM and outs[gi.attrs["index"]].op is not Op.INDEX_COPY
                        and (gi in pieces or reader_permutation(gi, readers) is not None))
        if marked:
            n.attrs["body"].meta["strided_outputs"] = tuple(marked)
    return g


def _chain(y: Node, c: Node) -> List[Node]:
    """The views from kernel output y up to concat c (excluded: y), and c itself."""
    out = [c]
    for x in c.inputs:
        chain, v = [], x
        while v is not y and v.op in (Op.PERMUTE, Op.RESHAPE):
            chain.append(v)
            v = v.inputs[0]
        if v is y:
            out += chain
    return out


def _torch_dtype(dt) -> str:
    return str(dt.torch())   # e.g. "torch.float32", as the generated source spells it
