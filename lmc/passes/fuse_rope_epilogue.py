"""`fuse_rope_epilogue`: in a decode step, RoPE of q and k computed by the projection kernel.

Runs on the fused step graph of the Decoder on the triton backend (after the fusion passes
and `fuse_cache_writes`), never on a training program: there RoPE is inside the attention
kernels (`fuse_rope_attention`). In a decode step the q, k, v projections are one horizontal
matmul launch (`fuse_matmul._merge_siblings`, A read once, the RMSNorm before them as its
prologue), and RoPE of q and k was one pointwise kernel after it that read q and k back,
rotated them and stored q' (and k' into its cache). At batch 1 a step is a chain of small
launches, so that kernel, one per layer, cost about as much as the bytes it moved. Here it
joins the projection: a tile of product P = A W computes, besides its columns, the partner
columns RoPE pairs them with (a second dot over the same A tiles: B loaded at the partner
columns, from L1/L2 since the tile's own columns are the same rows of W), and stores

    y[b, h, t, d] = x[d] cos[t, d] + sign(d) x[partner(d)] sin[t, d]    (d < R)
    y[b, h, t, d] = x[d]                                                  (R <= d < W)

with x[d] = P[b, t, h D + d] rounded to P's dtype first (as the unfused kernel read it);
rotate-half: partner(d) = d + R/2 with sign -1 below R/2, d - R/2 with sign +1 above;
interleaved pairs: partner(d) = d ^ 1, sign -1 at even d, +1 at odd. The store goes to
the rotated output [B, H, T, W] through its strides, or into the cache [B, H, L, W] at rows
pos[t] where the pointwise kernel wrote it there (the [B, H, T, W] layouts only).

Matched on the fused graph: a pointwise kernel every node of which is one of

    rope = x * c + concat(-x[R/2:R], x[:R/2]) * s        (either operand order)
         | x * c + rot * s                               (interleaved pairs)
    y    = rope | concat(rope, x[R:D]), either optionally times a scalar constant
    out  = y | index_copy(cache, pos, y)

where each x piece is a head view of one product of the same horizontal matmul kernel
(``slice(permute(reshape(P, [B, T, H, D]), [0, 2, 1, 3]))``, or, one head,
``slice(reshape(P, [B, 1, T, D]))``, or the heads after the sequence, ``slice(reshape(P, [B,
T, H, D]))``: medit_one's attention across the heads of one token, which rotates head h by
its index), x covers columns [0, R) of the head, and c, s are tables that broadcast against
x without varying along B: [T, R] for the first two, [H, R] for the third (any values: the
kernel reads them at (t, h, d) through strides, 0 along a broadcast axis; a cast of a table
inside the kernel is kept). For interleaved pairs, rot is an input of the kernel,
reshape(Q, [.., R]) of a kernel Q computing only concat(-x5[.., 1:2], x5[.., 0:1]) with
x5 = reshape(x, [.., R/2, 2]) (canonicalize's spelling of the pairs; a pointwise kernel
does not read through a reshape that splits an axis, so the rotation was a kernel of its
own): Q is read by that reshape alone and goes too. The products it rotates must be read
by nothing else (but those kernels). Several
rope kernels of one projection merge together (GQA: q and k differ in heads, so they were
two kernels). The merged kernel keeps the matmul's other outputs (v, its cache write) and is
emitted right after the last value it reads (the projection's place: values computed from
the step's inputs alone, the position tables, are moved to the front of the step first);
what the projection and the rope kernels give to anything else must be read after that
point.
Anything else is declined with the failed condition (`lmc compile --mode decode --explain`,
graphs "decode" and "decode static"). XPos scaling is declined (left to the pointwise
kernel). A rotated product may carry a bias (``P + b``, b a [N]
vector: Qwen2's and gpt-oss's biased q and k): the tile adds b at its columns and at the
partner columns, rounded as the projection's epilogue rounded the sum, before rotating.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..frontend.builder import Builder
from ..ir.graph import Graph, Node
from ..ir.ops import Op
from .patterns import NoMatch, need

PASS = "fuse_rope_epilogue"
_VIEWS = (Op.SLICE, Op.PERMUTE, Op.RESHAPE)


def _head_view(x: Node):
    """(matmul kernel, output index, H, D, c0, c1, layout) when x is columns [c0, c1) of a
    head view of a matmul kernel's [B, T, H D] output: layout "bhtd" for [B, H, T, D] (the
    heads permuted before the sequence, or one head), "bthd" for [B, T, H, D] (the reshape
    alone: medit_one's attention across the heads of one token); else None."""
    cuts = []
    n = x
    while n.op is Op.SLICE:
        start, stop = n.attrs.get("start", 0) or 0, n.attrs.get("stop")
        if n.attrs["axis"] not in (3, -1) or n.attrs.get("step", 1) != 1 or start < 0 or \
                (stop is not None and stop < 0):
            return None
        cuts.append((start, stop))
        n = n.inputs[0]
    permuted = n.op is Op.PERMUTE
    if permuted:
        if tuple(n.attrs["perm"]) != (0, 2, 1, 3):
            return None
        n = n.inputs[0]
    if n.op is not Op.RESHAPE or n.type.rank != 4 or n.inputs[0].type.rank != 3:
        return None
    shape = tuple(n.type.shape)
    src = n.inputs[0]
    b, t, cols = src.type.shape
    if permuted:
        ok = shape[:2] == (b, t) and isinstance(shape[2], int) and isinstance(shape[3], int) \
            and isinstance(cols, int) and shape[2] * shape[3] == cols
        H, D = (shape[2], shape[3]) if ok else (0, 0)
        layout = "bhtd"
    elif shape[:3] == (b, 1, t):   # one head: [B, T, D] -> [B, 1, T, D]
        ok = shape[3] == cols and isinstance(cols, int)
        H, D, layout = 1, cols, "bhtd"
    else:                          # the heads after the sequence: [B, T, H, D]
        ok = shape[:2] == (b, t) and isinstance(shape[2], int) and \
            isinstance(shape[3], int) and isinstance(cols, int) and shape[2] * shape[3] == cols
        H, D = (shape[2], shape[3]) if ok else (0, 0)
        layout = "bthd"
    if not ok or src.op is not Op.GETITEM or src.inputs[0].op is not Op.FUSED or \
            src.inputs[0].attrs["kind"] != "matmul":
        return None
    c0, c1 = 0, D
    for start, stop in reversed(cuts):      # the innermost slice first
        width = c1 - c0
        stop = width if stop is None else min(stop, width)
        c0, c1 = c0 + start, c0 + stop
    return src.inputs[0], src.attrs["index"], H, D, c0, c1, layout


class _Body:
    """Reads a pointwise kernel's body with its placeholders resolved to the outer graph."""

    def __init__(self, f: Node):
        self.f = f
        self.body = f.attrs["body"]
        self.ph = [n for n in self.body.nodes if n.op is Op.INPUT]
        self.outer = dict(zip(self.ph, f.inputs))
        self.used: set = set()

    def view(self, p: Node):
        need(p.op is Op.INPUT, f"{p.op.value} where a head view of q or k was expected")
        v = _head_view(self.outer[p])
        need(v is not None, "a rotated value is not a head view of a projection's output")
        self.used.add(p)
        return v

    def table(self, p: Node, R: int, x: Node, layout: str):
        """(placeholder, its cast or None, whether it varies along the heads) for a table
        read against the rotated x [B, A1, A2, R] (A1, A2: H, T or T, H by layout): it
        broadcasts to x without varying along B (the tile reads it at [t, h, d] through
        strides, 0 along its broadcast axes)."""
        cast = None
        if p.op is Op.CAST:
            self.used.add(p)
            cast, p = p.type.dtype, p.inputs[0]
        need(p.op is Op.INPUT, "a rope table is computed inside the kernel")
        t = self.outer[p]
        shape = (1,) * (4 - t.type.rank) + tuple(t.type.shape)
        xs = tuple(x.type.shape)
        need(t.type.rank <= 4 and shape[0] == 1 and shape[3] == R and
             all(a == 1 or a == b for a, b in zip(shape[1:3], xs[1:3])),
             f"rope table {list(t.type.shape)} is not [T, {R}] or [H, {R}] read against "
             f"x {list(xs)} (broadcast, not along B)")
        self.used.add(p)
        return p, cast, shape[1 if layout == "bhtd" else 2] != 1

    def rope(self, n: Node) -> dict:
        need(n.op is Op.ADD, f"{n.op.value} where rope's x * cos + rot(x) * sin was expected")
        why = "not x * cos + rot(x) * sin"
        pairs_why = None
        made = [self.outer[x] for x in n.inputs if x.op is Op.INPUT]
        made = [x.inputs[0] if x.op is Op.GETITEM else x for x in made]
        made = [x for x in made if x.op is Op.FUSED]
        if made:      # a term computed by the kernel before (a QK-norm's reduction kernel)
            why = (f"x * cos + rot(x) * sin with a term computed by the {made[0].attrs['kind']}"
                   f" kernel {made[0].attrs['kernel']}, not from a projection's products")
        for p, q in (n.inputs, n.inputs[::-1]):
            if p.op is not Op.MUL or q.op is not Op.MUL:
                break
            for x, c in (p.inputs, p.inputs[::-1]):
                for r, s in (q.inputs, q.inputs[::-1]):
                    pairs = r.op is Op.INPUT and _pair_kernel(self.outer[r]) is not None
                    if x.op is not Op.INPUT or (r.op is not Op.CONCAT and not pairs):
                        continue
                    used = set(self.used)
                    try:
                        if pairs:
                            return self._rope_pairs(n, p, q, x, c, r, s)
                        return self._rope(n, p, q, x, c, r, s)
                    except NoMatch as e:
                        self.used = used            # a failed reading claims nothing
                        # a pairs' rotation beside a head view x that does not match
                        # it says more than the other operand orders' reasons
                        if pairs and _head_view(self.outer[x]) is not None:
                            pairs_why = str(e)
                        why = pairs_why or str(e)
        raise NoMatch(why)

    def _rope(self, n, p, q, x, c, r, s) -> dict:
        mm, j, H, D, c0, c1, lay = self.view(x)
        R = c1 - c0
        need(c0 == 0 and R % 2 == 0, "the rotated columns are not the first R of the head")
        need(r.attrs["axis"] in (3, -1) and len(r.inputs) == 2 and r.inputs[0].op is Op.NEG,
             "rotation is not concat(-x2, x1) over the head dim")
        hi, lo = r.inputs[0].inputs[0], r.inputs[1]
        vh, vl = self.view(hi), self.view(lo)
        need(vh[:4] == (mm, j, H, D) and vh[4:] == (R // 2, R, lay) and
             vl[:4] == (mm, j, H, D) and vl[4:] == (0, R // 2, lay),
             "the rotation's halves are not x[R/2:R] and x[:R/2] of the rotated x")
        spec = self._spec(x, c, s, (mm, j, H, D, R, lay), None)
        self.used.update((n, p, q, r, r.inputs[0]))
        return spec

    def _rope_pairs(self, n, p, q, x, c, r, s) -> dict:
        """Interleaved pairs: r reads, through a reshape, the pair kernel's
        concat(-x[.., 1::2], x[.., 0::2]) over [.., R/2, 2] of the rotated x itself."""
        mm, j, H, D, c0, c1, lay = self.view(x)
        R = c1 - c0
        need(c0 == 0 and R % 2 == 0, "the rotated columns are not the first R of the head")
        k1, odd, even = _pair_kernel(self.outer[r])
        v = _head_view(odd.inputs[0].inputs[0])
        need(v is not None and v[:4] == (mm, j, H, D) and v[4:] == (0, R, lay),
             "the pairs' rotation is not of the rotated x's own columns")
        spec = self._spec(x, c, s, (mm, j, H, D, R, lay), k1)
        self.used.update((n, p, q, r))
        return spec

    def _spec(self, x, c, s, view, pairs) -> dict:
        """The rotation's spec, its tables c (cos) and s (sin) read against x."""
        mm, j, H, D, R, lay = view
        cos, ccast, ch = self.table(c, R, self.outer[x], lay)
        sin, scast, sh = self.table(s, R, self.outer[x], lay)
        need(ccast == scast, "the rope tables are cast differently")
        return {"mm": mm, "j": j, "H": H, "D": D, "R": R, "W": R, "cos": cos, "sin": sin,
                "cast": ccast, "layout": lay, "heads": ch or sh, "pairs": pairs}

    def output(self, o: Node) -> dict:
        cache = None
        if o.op is Op.INDEX_COPY:
            c, pos, v = o.inputs
            need(o.attrs["axis"] in (2, -2) and c.op is Op.INPUT and pos.op is Op.INPUT,
                 "a cache write other than rows of [B, H, L, W] at the step's positions")
            cache = (c, pos)
            self.used.update((o, c, pos))
            o = v
        scale = None
        if o.op is Op.MUL:             # rope(x) * a scalar (yoco's retention keys)
            for v, c in (o.inputs, o.inputs[::-1]):
                if c.op is Op.CONST and c.type.rank == 0 and \
                        not hasattr(c.attrs["value"], "shape"):
                    scale = float(c.attrs["value"])
                    self.used.add(o)
                    o = v
                    break
        if o.op is Op.CONCAT:
            need(o.type.rank == 4, "a concat over [.., R/2, 2] that is not interleaved "
                                   "RoPE's rotation read whole by a rope kernel "
                                   "(x * cos + rot * sin)")
            need(o.attrs["axis"] in (3, -1) and len(o.inputs) == 2,
                 "a concat other than [rope | pass-through] on the head dim")
            spec = self.rope(o.inputs[0])
            mm, j, H, D, c0, c1, lay = self.view(o.inputs[1])
            need((mm, j, H, D, lay) == (spec["mm"], spec["j"], spec["H"], spec["D"],
                                        spec["layout"]) and (c0, c1) == (spec["R"], D),
                 "the pass-through columns are not x[R:D] of the rotated x")
            spec["W"] = D
            self.used.add(o)
        else:
            spec = self.rope(o)
        need(cache is None or spec["layout"] == "bhtd",
             "a cache write of [B, T, H, D] heads (a cache holds [B, H, L, D])")
        spec["cache"] = cache
        spec["scale"] = scale
        return spec


def _pair_kernel(v: Node):
    """(kernel, odd, even) when v is interleaved RoPE's rotation computed by a pointwise
    kernel of its own and seen whole: reshape(kernel's [.., R/2, 2] output, [.., R]), the
    kernel computing only concat(-odd, even) on its last axis, odd and even the size-1
    slices [1:2] and [0:1] of one reshape(x, [.., R/2, 2]) (canonicalize's spelling of the
    pairs' rotation, rot[2i] = -x[2i+1], rot[2i+1] = x[2i]); else None. The kernel stays
    apart from the one reading it because the reshape splits an axis, which a pointwise
    kernel's index does not."""
    if v.op is not Op.RESHAPE or v.inputs[0].op is not Op.GETITEM:
        return None
    k1 = v.inputs[0].inputs[0]
    if k1.op is not Op.FUSED or k1.attrs["kind"] != "pointwise":
        return None
    body = k1.attrs["body"]
    outs = list(body.outputs.values())
    src, dst = tuple(v.inputs[0].type.shape), tuple(v.type.shape)
    if len(outs) != 1 or len(src) != len(dst) + 1 or src[:-2] != dst[:-1] or \
            src[-1] != 2 or not isinstance(src[-2], int) or dst[-1] != 2 * src[-2]:
        return None
    o = outs[0]
    if o.op is not Op.CONCAT or o.attrs["axis"] not in (-1, len(src) - 1) or \
            len(o.inputs) != 2 or o.inputs[0].op is not Op.NEG:
        return None
    a, b = o.inputs[0].inputs[0], o.inputs[1]
    if a.op is not Op.INPUT or b.op is not Op.INPUT or \
            len([m for m in body.nodes if m.op not in (Op.INPUT, Op.CONST)]) != 2:
        return None
    outer = dict(zip([m for m in body.nodes if m.op is Op.INPUT], k1.inputs))
    odd, even = outer[a], outer[b]
    for h in (odd, even):
        if h.op is not Op.SLICE or h.attrs["axis"] not in (-1, len(src) - 1) or \
                h.attrs.get("step", 1) != 1 or h.type.shape[-1] != 1 or \
                h.inputs[0].op is not Op.RESHAPE or h.inputs[0] is not odd.inputs[0] or \
                tuple(h.inputs[0].type.shape) != src or \
                tuple(h.inputs[0].inputs[0].type.shape) != dst:
            return None
    if (odd.attrs.get("start") or 0) != 1 or (even.attrs.get("start") or 0) != 0:
        return None
    return k1, odd, even


def _match(f: Node) -> Tuple[Node, List[dict]]:
    b = _Body(f)
    outs = list(b.body.outputs.items())
    specs = []
    for k, o in outs:
        s = b.output(o)
        s["out"] = k
        specs.append(s)
    rest = [n for n in b.body.nodes if n not in b.used and n.op is not Op.CONST]
    need(not rest, f"the kernel also computes {rest[0].op.value}" if rest else "")
    mms = {s["mm"] for s in specs}
    need(len(mms) == 1, "q and k come from different projection kernels")
    (mm,) = mms
    need(len({s["j"] for s in specs}) == len(specs), "one product rotated twice")
    mbody = mm.attrs["body"]
    for s in specs:
        val = mbody.outputs[str(s["j"])]
        need(val.op is not Op.INDEX_COPY, "a rotated product is also written into a cache")
        prod, bias = _biased(val)
        need(prod is not None, f"a rotated value is the projection kernel's "
                               f"{val.op.value}, not one of its products (or one plus a "
                               f"bias vector)")
        s["prod"], s["val"], s["bias"] = prod, val, bias
    need(_plain_products(mbody, [(s["prod"], s["val"]) for s in specs]),
         "the projection kernel has an epilogue on a rotated product (only plain products of "
         "one A, or each plus a bias, take RoPE)")
    return mm, specs


def _biased(v: Node):
    """(matmul, bias placeholder or None) when v, a projection kernel's output, is one of
    its products or a product plus a bias vector [N] (Qwen2's and gpt-oss's q + b_q, k +
    b_k), each in either operand order; (None, None) otherwise."""
    if v.op is Op.MATMUL:
        return v, None
    if v.op is Op.ADD:
        n = v.type.shape[-1]
        for m, b in (v.inputs, v.inputs[::-1]):
            if (m.op is Op.MATMUL and b.op is Op.INPUT and m.type == v.type
                    and b.type.dtype == v.type.dtype and b.type.rank >= 1
                    and b.type.shape[-1] == n and all(d == 1 for d in b.type.shape[:-1])):
                return m, b
    return None, None


def _plain_products(body: Graph, rotated: List[Tuple[Node, Node]]) -> bool:
    """Matmuls of one A (the horizontal form, or one product), the rotated ones (product,
    stored value) with no epilogue but a bias add: each value stored once and read by
    nothing else, the product read only by its add (a norm prologue allowed); the others
    may be written into a cache or run their own epilogue."""
    from ..codegen.matmul import _prologue, horizontal

    mms = [n for n in body.nodes if n.op is Op.MATMUL]
    outs = list(body.outputs.values())

    def alone(p: Node, v: Node) -> bool:
        return outs.count(v) == 1 and not any(v in n.inputs for n in body.nodes) and \
            all(n is v for n in body.nodes if p in n.inputs)
    if horizontal(body):
        return all(alone(p, v) for p, v in rotated)
    pro = _prologue(mms)
    skip = set(pro.members) if pro else set()
    adds = {v for p, v in rotated if v is not p}
    return len(mms) == 1 and all(alone(p, v) for p, v in rotated) and all(
        n.op in (Op.INPUT, Op.CONST, Op.MATMUL) or n in skip or n in adds
        for n in body.nodes)


def _other_reader(g_users, mm: Node, js, fs: set) -> Optional[str]:
    """What else reads the kernel mm's outputs js, through views, besides the kernels fs
    (None: nothing): the reader's op, or "a graph output"."""
    stack = [u for u in g_users[mm] if u.op is Op.GETITEM and u.attrs["index"] in js]
    while stack:
        n = stack.pop()
        for u in g_users[n]:
            if u in fs:
                continue
            if u is None:
                return "a graph output"
            if u.op not in _VIEWS:
                return (f"the {u.attrs['kind']} kernel {u.attrs['kernel']}"
                        if u.op is Op.FUSED else u.op.value)
            stack.append(u)
    return None


def _positions_first(g: Graph) -> Graph:
    """The step with the values computed from graph inputs and constants alone (no
    parameter: the position tables from decode.pos, their casts) moved to the front, in
    order: a table computed after a layer's projection would keep the rotations out of it.
    A write in place (a cache's index_copy, a kernel updating a state) keeps its place after
    the reads of what it overwrites."""
    early: set = set()
    for n in g.nodes:
        writes = n.op is Op.INDEX_COPY or bool(n.attrs.get("inplace"))
        if n.op in (Op.INPUT, Op.CONST) or (n.inputs and n.op is not Op.PARAM and not writes
                                             and all(x in early for x in n.inputs)):
            early.add(n)
    nodes = [n for n in g.nodes if n in early] + [n for n in g.nodes if n not in early]
    if nodes == list(g.nodes):
        return g
    out = g.with_nodes(nodes, dict(g.outputs))
    out.meta = dict(g.meta)
    return out


def fuse_rope_epilogue(g: Graph) -> Graph:
    g = _positions_first(g)
    users = g.users()
    for o in g.outputs.values():
        users.setdefault(o, []).append(None)
    order = {n: i for i, n in enumerate(g.nodes)}
    records = []
    cands: Dict[Node, List[Tuple[Node, List[dict]]]] = {}   # matmul kernel -> rope kernels
    # interleaved pairs' rotations, each its own kernel before its reader's reshape: the
    # reader's record speaks for both
    pair_kernels = {_pair_kernel(x)[0] for f in g.nodes if f.op is Op.FUSED
                    and f.attrs["kind"] == "pointwise" for x in f.inputs if _pair_kernel(x)}
    for f in g.nodes:
        if f.op is not Op.FUSED or f.attrs["kind"] != "pointwise" or f in pair_kernels:
            continue
        body = f.attrs["body"]
        if (not any(n.op is Op.CONCAT for n in body.nodes) or
                not any(n.op is Op.NEG for n in body.nodes)) and \
                not any(_pair_kernel(x) for x in f.inputs):
            continue                 # not a rope kernel: no record
        try:
            mm, specs = _match(f)
            pk = {s["pairs"] for s in specs} - {None}
            for k1 in pk:            # the pair kernels: read by f alone, through a reshape
                need(all(u is not None and u.op is Op.GETITEM and
                         all(r is not None and r.op is Op.RESHAPE and
                             users[r] == [f] for r in users[u]) for u in users[k1]),
                     "the pairs' rotation is read besides the rope kernel")
            other = _other_reader(users, mm, {s["j"] for s in specs}, {f} | pk)
            need(other is None, f"a rotated product is also read by {other}, outside the "
                                "rope kernel (pass-through columns cached apart from "
                                "the rotated ones, say): "
                                "the product is stored, the rotation its own kernel")
        except NoMatch as e:
            records.append({"pass": PASS, "status": "declined", "where": f.scope or "<model>",
                            "reason": str(e)})
            continue
        cands.setdefault(mm, []).append((f, specs))
    merges: Dict[Node, Tuple[Node, List[Tuple[Node, List[dict]]]]] = {}   # anchor -> all
    for mm, fs in cands.items():
        try:
            js = [s["j"] for _, specs in fs for s in specs]
            need(len(set(js)) == len(js), "one product rotated by two kernels")
            rotated = set(js)
            # the merged kernel stands right after the last value it reads (the projection
            # itself, or a table or cache the rope kernels read): what the projection and
            # the rope kernels give to anything else must be read after that
            outer = [x for f, _ in fs for x in f.inputs
                     if (_head_view(x) or (None,))[0] is not mm and not _pair_kernel(x)]
            anchor = max([mm] + outer, key=order.get)
            given = [gi for gi in users[mm] if gi is not None and
                     gi.attrs.get("index") not in rotated] + \
                [gi for f, _ in fs for gi in users[f] if gi is not None]
            need(all(u is None or order[u] > order[anchor] for gi in given for u in users[gi]),
                 "an output of the projection is read before the rope tables are computed")
        except NoMatch as e:
            records += [{"pass": PASS, "status": "declined", "where": f.scope or "<model>",
                         "reason": str(e)} for f, _ in fs]
            continue
        merges[anchor] = (mm, sorted(fs, key=lambda fs_: order[fs_[0]]))
        records += [{"pass": PASS, "status": "fused", "where": f.scope or "<model>",
                     "reason": f"{len(specs)} rotation(s) in {mm.attrs['kernel']}'s epilogue, "
                               f"{f.attrs['kernel']} removed"} for f, specs in fs]
    out = _rewrite(g, merges, users) if merges else g.with_nodes(list(g.nodes),
                                                                 dict(g.outputs))
    out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
    return out


def _merged(mm: Node, fs: List[Tuple[Node, List[dict]]]):
    """The matmul kernel with the rope kernels `fs` in it: (FUSED node, {(old kernel, output
    index): new output index}) for mm's kept outputs and every rope kernel's outputs."""
    mbody = mm.attrs["body"]
    b = Builder({}, {})
    b.nodes.extend(mbody.nodes)
    inputs = list(mm.inputs)
    n_in = sum(n.op is Op.INPUT for n in mbody.nodes)
    specs = [(f, s) for f, ss in fs for s in ss]
    prods = {s["j"]: s["val"] for _, s in specs}    # the stored value: a product (+ bias)
    views: Dict[Node, Node] = {}
    envs: Dict[Node, Dict[Node, Node]] = {}
    shared: Dict[Node, Node] = {}            # an outer value two rope kernels read: one input

    def reroot(x: Node) -> Node:        # a view chain of product j, over the body's matmul
        if x not in views:
            if x.op is Op.GETITEM:
                views[x] = prods[x.attrs["index"]]
            else:
                views[x] = Node(x.op, (reroot(x.inputs[0]),), x.attrs, x.type, x.loc,
                                x.scope)
                b.nodes.append(views[x])
        return views[x]

    def inline(body: Graph, env: Dict[Node, Node]) -> None:   # placeholders bound in env
        for n in body.nodes:
            if n.op is not Op.INPUT:
                env[n] = Node(n.op, tuple(env[i] for i in n.inputs), n.attrs, n.type, n.loc,
                              n.scope)
                b.nodes.append(env[n])

    def pairs(x: Node, k1: Node) -> Node:    # the pair kernel's body, then its reshape
        kb = k1.attrs["body"]
        kenv = {ph: reroot(y) for ph, y in
                zip([n for n in kb.nodes if n.op is Op.INPUT], k1.inputs)}
        inline(kb, kenv)
        (o,) = kb.outputs.values()
        out = Node(x.op, (kenv[o],), x.attrs, x.type, x.loc, x.scope)
        b.nodes.append(out)
        return out
    for f, _ in fs:
        env = envs[f] = {}
        fbody = f.attrs["body"]
        for p, x in zip([n for n in fbody.nodes if n.op is Op.INPUT], f.inputs):
            v = _head_view(x)
            pk = _pair_kernel(x)
            if v is not None and v[0] is mm:
                env[p] = reroot(x)
            elif pk is not None and any(s["pairs"] is pk[0] for s in dict(fs)[f]):
                env[p] = pairs(x, pk[0])
            elif x in shared:
                env[p] = shared[x]
            else:
                env[p] = shared[x] = b.input(f"in{n_in}", x.type.shape, x.type.dtype).node
                n_in += 1
                inputs.append(x)
        inline(fbody, env)
    rotated = set(prods)
    outs: Dict[str, Node] = {}
    where: Dict[Tuple[Node, int], int] = {}
    for k, o in mbody.outputs.items():
        if int(k) not in rotated:
            where[(mm, int(k))] = len(outs)
            outs[str(len(outs))] = o
    for f, _ in fs:
        for k, o in f.attrs["body"].outputs.items():
            where[(f, int(k))] = len(outs)
            outs[str(len(outs))] = envs[f][o]
    pos_of = {p: i for i, p in enumerate(n for n in b.nodes if n.op is Op.INPUT)}
    inplace = {where[(mm, k)]: i for k, i in mm.attrs.get("inplace", {}).items()}
    for f, _ in fs:
        f_ph = [n for n in f.attrs["body"].nodes if n.op is Op.INPUT]
        for k, i in f.attrs.get("inplace", {}).items():
            inplace[where[(f, k)]] = pos_of[envs[f][f_ph[i]]]
    rope = []
    mms = [n for n in b.nodes if n.op is Op.MATMUL]   # "product": the matmul's index
    for f, s in specs:
        c, env = s["cache"], envs[f]
        rope.append({
            "product": mms.index(s["prod"]), "out": where[(f, int(s["out"]))], "H": s["H"],
            "D": s["D"], "R": s["R"], "W": s["W"], "layout": s["layout"],
            "heads": s["heads"], "cos": pos_of[env[s["cos"]]],
            "sin": pos_of[env[s["sin"]]],
            "cast": s["cast"].value if s["cast"] is not None else None,
            "scale": s["scale"], "pairs": s["pairs"] is not None,
            "cache": None if c is None else pos_of[env[c[0]]],
            "pos": None if c is None else pos_of[env[c[1]]],
            "bias": None if s["bias"] is None else pos_of[s["bias"]]})
    name = mm.attrs["kernel"] + "_rope"
    nb = Graph(name, b.nodes, outs)
    nb.meta.update(mbody.meta)
    nb.meta["rope"] = rope
    fused = Node.make(Op.FUSED, inputs, {**mm.attrs, "kernel": name, "body": nb,
                                         "inplace": inplace}, mm.loc, mm.scope)
    return fused, where


def _rewrite(g: Graph, merges, users) -> Graph:
    drop: set = set()
    for last, (mm, fs) in merges.items():
        js = {s["j"] for _, specs in fs for s in specs}
        gets = [u for u in users[mm] if u is not None and u.op is Op.GETITEM]
        drop.update(gets)
        # the rotated products' views (read only by their rope kernels) go with them
        views = [u for gi in gets if gi.attrs["index"] in js for u in users[gi]]
        while views:
            v = views.pop()
            if v is None or v.op is Op.FUSED or v in drop:
                continue
            drop.add(v)
            views += users[v]
        drop.add(mm)
        for f, specs in fs:
            drop.add(f)
            drop.update(u for u in users[f] if u is not None)
            for k1 in {s["pairs"] for s in specs} - {None}:   # the pair kernels, reshapes
                drop.add(k1)
                for gi in users[k1]:
                    drop.add(gi)
                    drop.update(users[gi])
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    for n in g.nodes:
        if n not in drop:
            new[n] = n.remapped(new)
            nodes.append(new[n])
        if n in merges:               # emitted right after its anchor (or in mm's place)
            mm, fs = merges[n]
            fused, where = _merged(mm, fs)
            fused = Node.make(Op.FUSED, [new.get(x, x) for x in fused.inputs], fused.attrs,
                              fused.loc, fused.scope)
            nodes.append(fused)
            for src in [mm] + [f for f, _ in fs]:
                for gi in users[src]:
                    if gi is None or gi.op is not Op.GETITEM or \
                            (src, gi.attrs["index"]) not in where:
                        continue
                    new[gi] = Node.make(Op.GETITEM, [fused],
                                        {"index": where[(src, gi.attrs["index"])]},
                                        gi.loc, gi.scope)
                    nodes.append(new[gi])
    return g.with_nodes(nodes, {k: new.get(v, v) for k, v in g.outputs.items()})


def rope_spec(body: Graph) -> Optional[List[dict]]:
    """The rotations a matmul body stores (this pass's merge), or None."""
    return body.meta.get("rope")
