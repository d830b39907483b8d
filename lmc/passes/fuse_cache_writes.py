"""`fuse_cache_writes`: the static decode step's cache writes stored by the kernels that
compute the written values.

Runs only on the static step graph of the Decoder on the triton backend, after the fusion
passes (`TritonProgram(..., cache_writes=True)`). There the decode pass writes each new key or
value into its preallocated cache as ``index_copy(cache, pos, value)``, and the Decoder runs
that write in place: the cache is a step input that nothing else reads (checked when the
Decoder is built). Each write is one more launch per cache per layer; here it becomes the
store of the kernel that computes `value`:

- a pointwise kernel (rope of k): its index space stays the value's, and the output is stored
  at the cache offset with the index along the write axis replaced by ``pos[i]``;
- a horizontal matmul (the q, k, v projections; `fuse_matmul._merge_siblings`) whose output
  is `value` itself, written along the row axis of ``[B, T, N]``: each tile stores its rows
  at ``(b, pos[t])``;
- a reduction kernel (an RMSNorm: MLA's latent c_KV) whose output is a value of its row
  space, written along a row axis (not the reduced one): each row is stored at its slot
  ``pos[i_w]``.

The FUSED node's body gains the cache and the positions as placeholders and the INDEX_COPY
itself (so the torch backend, and any test comparing a kernel with its body, still computes
the functional write), its output becomes the cache, and ``attrs["inplace"]`` maps that
output to the cache input: the kernel writes into the cache it was given and the output *is*
that tensor (`TritonProgram._run_fused`, the wrapper program). A write whose value is read
elsewhere too, or whose cache is read by anything else, stays a torch op.

A carried state (a decoded linear attention's, plain or gated; an MoE layer's capacity count;
a running sum a reduction kernel carries) is updated the same way: when its op is the only
reader of the state input, ``attrs["inplace"]`` maps the new-state output to that input.
Those kernels read each element of the state before writing it (`_reads_before_writes`),
so the Decoder's buffer is updated where it lies, with no copy of the state after every step.
A causal shift's history, which the step's taps read, is updated by a "shift_update" op
emitted after its readers (`shift_histories`, run after the last fusion pass); a sliding-
window attention's ring, which its attention reads, by a "ring_update" op (`ring_updates`, run
before the fusion passes so the ring's concatenation is not stored where only the update read
it); both are moved just after the last reader of the state they overwrite (`updates_last`).
"""
from __future__ import annotations

from typing import Dict, List

from ..frontend.builder import Builder
from ..ir.dims import as_dim
from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from .basic import dce
from .decode import state_outputs
from .patterns import Body

PASS = "fuse_cache_writes"


def _target(n: Node, users, outputs) -> str:
    """Why the write `n` cannot be stored by its value's kernel, or "" if it can."""
    cache, pos, value = n.inputs
    if cache.op is not Op.INPUT or users[cache] != [n]:
        return "the cache is read besides this write"
    if pos.type.rank != 1:
        return "positions are not a vector"
    if value.op is not Op.GETITEM or value.inputs[0].op is not Op.FUSED:
        return (f"the value is a {value.op.value} view, not a kernel's output"
                if value.op.kind.value == "view" else "the value is not a kernel's output")
    if users[value] != [n] or value in outputs:
        return "the value is read besides this write"
    f = value.inputs[0]
    body = f.attrs["body"]
    o = body.outputs[str(value.attrs["index"])]
    if f.attrs["kind"] == "pointwise":
        if o.type.shape != next(iter(body.outputs.values())).type.shape:
            return "the kernel's outputs differ in shape"
        return ""
    if f.attrs["kind"] == "matmul":
        from ..codegen.matmul import horizontal
        stored = o.op is Op.MATMUL or o.op.kind is Kind.POINTWISE
        if not horizontal(body) or not stored or any(o in u.inputs for u in body.nodes):
            return ("only a horizontal matmul's product or epilogue value read by nothing "
                    "else is stored to a cache")
        if o.type.rank != 3 or n.attrs["axis"] not in (1, -2):
            return "a matmul stores to a cache along the rows of [B, T, N] only"
        return ""
    if f.attrs["kind"] == "reduction":
        from ..codegen.reduction import Plan
        p = Plan(body)
        if p.level.get(o) != "row":
            return "a reduction kernel stores to a cache only a value of its row space"
        if n.attrs["axis"] % p.rank == p.axis:
            return "the write axis is the kernel's reduced axis"
        return ""
    return f"a {f.attrs['kind']} kernel does not store to a cache"


def _reads_before_writes(f: Node, i: int, o: int) -> bool:
    """f's kernel reads each element of its input i before writing output o's value there, so
    o may be stored over i: a decoded linear attention's state, plain or gated (one program
    owns a tile, its d_v block of a head's state; the chunked prefill finishes reading the
    state before its final store); an MoE op's capacity count carried across steps (one
    program per sequence loads its counts first and stores them last); a reduction kernel's
    per-row output of input i's shape stored after its last pass (every read of the input,
    once per row or broadcast along the reduced axis, comes before that store in the program
    owning the row: medit_one's running sum, the carry plus the new tokens' sum)."""
    kind = f.attrs.get("kind") if f.op is Op.FUSED else None
    if kind in ("decode_linear_attention", "decode_gated_linear_attention"):
        return (i, o) == (4, 1)
    if kind in ("moe_layer", "moe_gating"):
        opts = f.attrs["body"].meta.get("options", {})
        # the inputs x, W_r[, Wg, W1, W2][, residual], then the carried count
        at = 2 if kind == "moe_gating" else 6 if opts.get("residual") else 5
        outs = list(opts.get("outputs", ()))
        return bool(opts.get("carry")) and "count" in outs and (i, o) == (at, outs.index("count"))
    if kind == "reduction":
        from ..codegen.reduction import Plan
        body = f.attrs["body"]
        ph = [n for n in body.nodes if n.op is Op.INPUT][i]
        out = body.outputs[str(o)]
        p = Plan(body)
        return (out.op is not Op.INDEX_COPY and out.type.shape == ph.type.shape and
                p.level.get(out) == "per_row" and p.depth.get(out) == p.passes)
    return False


def fuse_cache_writes(g: Graph) -> Graph:
    """The caches and carried states written in place; the shift histories' updates are
    `shift_histories`, which the fusion pipeline runs last."""
    return _states_in_place(_cache_writes(g))


def shift_histories(g: Graph) -> Graph:
    """A causal shift's new history, concat(H, x, 1)[:, T:T + S] of the history input H
    [B, S, C], becomes one "shift_update" op writing H in place (lmc/codegen/shift_update.py),
    placed after every reader of H (`updates_last`), so every read of the old history (the
    shift's taps) comes first: one launch for the step's torch.cat and the Decoder's copy back
    into H."""
    users = g.users()
    found: Dict[Node, tuple] = {}              # the new history -> (H, x)
    for h, v in state_outputs(g):
        c = v.inputs[0] if v.op is Op.SLICE else None
        if c is None or c.op is not Op.CONCAT or c.inputs[0] is not h or \
                len(c.inputs) != 2 or h.type.rank != 3 or c.attrs["axis"] % 3 != 1 or \
                v.attrs["axis"] % 3 != 1 or v.attrs.get("step", 1) != 1 or \
                users[c] != [v] or users.get(v) or not isinstance(h.type.shape[1], int):
            continue
        x = c.inputs[1]
        S = h.type.shape[1]
        if as_dim(v.attrs["start"]) != as_dim(x.type.shape[1]) or \
                as_dim(v.attrs["stop"]) != as_dim(x.type.shape[1]) + S or \
                x.type.dtype.value not in ("f32", "f16", "bf16"):
            continue
        found[v] = (h, x)
    if not found:
        return g
    records, tail, outs = [], [], {}
    for i, (v, (h, x)) in enumerate(found.items()):
        name = f"lmc_shift_update_{i}"
        b = Body([h, x])
        b.copy([v.inputs[0], v])
        body = b.graph(name, [v], module="shift_update", template="shift_update", options={})
        f = Node.make(Op.FUSED, [h, x], {"kernel": name, "kind": "shift_update", "body": body,
                                         "inplace": {0: 0}}, v.loc, v.scope)
        gi = Node.make(Op.GETITEM, [f], {"index": 0}, v.loc, v.scope)
        tail += [f, gi]
        outs[v] = gi
        records.append({"pass": PASS, "status": "fused", "where": v.scope or "<model>",
                        "reason": f"state updated in place by {name} (the shift history "
                                  f"{h.attrs['name']})"})
    gone = set(found) | {v.inputs[0] for v in found}
    out = g.with_nodes([n for n in g.nodes if n not in gone] + tail,
                       {k: outs.get(v, v) for k, v in g.outputs.items()})
    out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
    return out


def ring_updates(g: Graph) -> Graph:
    """A sliding-window attention's new ring, gather(concat(R, x), src) of the ring input R
    along its slots (`src` the input decode.ringW.src broadcast over R's other axes; see
    lmc/passes/decode.py), becomes one "ring_update" op writing R in place
    (lmc/codegen/ring_update.py: the last min(T, W) new entries stored at their positions'
    slots, read from decode.pos). Run before the fusion passes, so the concatenation is not
    stored where nothing else reads it (fuse_decode_attention takes the ring and the new keys
    as two segments; where it declines, the attention still reads the concatenation);
    `updates_last` then moves the op after the last reader of the old ring."""
    users = g.users()
    named = {n.attrs["name"]: n for n in g.nodes if n.op is Op.INPUT}
    pos = named.get("decode.pos")
    found: Dict[Node, tuple] = {}              # the new ring -> (R, x, src)
    for h, v in state_outputs(g):
        if pos is None or v.op is not Op.GATHER or users.get(v):
            continue
        c, idx = v.inputs
        ax = v.attrs["axis"] % v.type.rank
        if c.op is not Op.CONCAT or len(c.inputs) != 2 or c.inputs[0] is not h or \
                c.attrs["axis"] % c.type.rank != ax or idx.op is not Op.EXPAND:
            continue
        r = idx.inputs[0]
        src = r.inputs[0] if r.op is Op.RESHAPE else None
        W = h.type.shape[ax]
        along = tuple(W if a == ax else 1 for a in range(h.type.rank))  # the map on the slots
        if src is None or src.op is not Op.INPUT or tuple(r.type.shape) != along or \
                src.attrs["name"] != f"decode.ring{W}.src" or tuple(src.type.shape) != (W,) or \
                tuple(v.type.shape) != tuple(h.type.shape) or \
                pos.type.shape[0] != c.inputs[1].type.shape[ax]:
            continue
        found[v] = (h, c.inputs[1], src)
    if not found:
        return g
    records, repl = [], {}
    for i, (v, (h, x, src)) in enumerate(found.items()):
        name = f"lmc_ring_update_{i}"
        b = Body([h, x, src, pos])
        c, idx = v.inputs
        b.copy([c, idx.inputs[0], idx, v])
        body = b.graph(name, [v], module="ring_update", template="ring_update",
                       options={"axis": v.attrs["axis"] % v.type.rank})
        f = Node.make(Op.FUSED, [h, x, src, pos],
                      {"kernel": name, "kind": "ring_update", "body": body, "inplace": {0: 0},
                       "no_grad": (2, 3)}, v.loc, v.scope)
        repl[v] = (f, Node.make(Op.GETITEM, [f], {"index": 0}, v.loc, v.scope))
        records.append({"pass": PASS, "status": "fused", "where": v.scope or "<model>",
                        "reason": f"state updated in place by {name} (the ring "
                                  f"{h.attrs['name']}: the last new entries stored at their "
                                  f"slots)"})
    nodes = [m for n in g.nodes for m in (repl[n] if n in repl else (n,))]
    out = dce(g.with_nodes(nodes, {k: repl[v][1] if v in repl else v
                                   for k, v in g.outputs.items()}))   # the gather's inputs
    out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
    return out


def updates_last(g: Graph) -> Graph:
    """The shift histories' updates made (`shift_histories`), and every op that overwrites a
    state others read (a shift or ring update) moved to just after the last of them (a
    reader through views included) and after its own inputs: every read of the old state
    comes first, and the new entries it stores are not kept alive to the end of the step (a
    long prefill's keys)."""
    g = shift_histories(g)
    ups = [n for n in g.nodes if n.op is Op.FUSED and n.attrs["kind"] in
           ("ring_update", "shift_update")]
    if not ups:
        return g
    users = g.users()
    moving = set(ups) | {n for n in g.nodes if n.op is Op.GETITEM and n.inputs[0] in ups}
    order = [n for n in g.nodes if n not in moving]
    at = {n: i for i, n in enumerate(order)}
    after: Dict[int, List[Node]] = {}
    for f in ups:
        last = max(at[x] for x in f.inputs)
        stack, seen = [f.inputs[0]], set()
        while stack:                    # the readers of the state, through its views
            for u in users.get(stack.pop(), []):
                if u is f or u in seen:
                    continue
                seen.add(u)
                if u.op in (Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE):   # may alias
                    stack.append(u)
                last = max(last, at[u])
        after.setdefault(last, []).append(f)
    nodes = []
    for i, n in enumerate(order):
        nodes.append(n)
        for f in after.get(i, []):
            nodes += [f] + [u for u in users.get(f, []) if u.op is Op.GETITEM]
    out = g.with_nodes(nodes, dict(g.outputs))
    out.meta = dict(g.meta)
    return out


def _states_in_place(g: Graph) -> Graph:
    """A carried state's new value written over the old one (`_reads_before_writes`) where
    the state input is read by its op alone: the static Decoder's buffer then is the new
    state, with no copy into it after the step."""
    users = g.users()
    records = []
    repl: Dict[Node, dict] = {}        # an op -> its attrs with the state in place
    for st, v in state_outputs(g):
        f = v.inputs[0] if v.op is Op.GETITEM else None
        if f is None or st not in f.inputs or not _reads_before_writes(
                f, f.inputs.index(st), v.attrs["index"]):
            continue
        where = f.scope or "<model>"
        if users[st] != [f]:
            records.append({"pass": PASS, "status": "declined", "where": where,
                            "reason": "the state is read besides its update"})
            continue
        attrs = repl.get(f, f.attrs)
        repl[f] = {**attrs, "inplace": {**attrs.get("inplace", {}),
                                        v.attrs["index"]: f.inputs.index(st)}}
        records.append({"pass": PASS, "status": "fused", "where": where,
                        "reason": f"state updated in place by {f.attrs['kernel']}"})
    nodes, new = [], {}
    for n in g.nodes:
        new[n] = n.remapped(new) if n not in repl else Node(
            n.op, tuple(new.get(x, x) for x in n.inputs), repl[n], n.type, n.loc, n.scope)
        nodes.append(new[n])
    out = g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()})
    out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
    return out


def _cache_writes(g: Graph) -> Graph:
    users = g.users()
    outputs = set(g.outputs.values())
    writes: Dict[Node, List[Node]] = {}       # FUSED node -> its index_copy writes
    records = []
    for n in g.nodes:
        if n.op is not Op.INDEX_COPY:
            continue
        why = _target(n, users, outputs)
        where = n.scope or "<model>"
        if why:
            records.append({"pass": PASS, "status": "declined", "where": where, "reason": why})
            continue
        f = n.inputs[2].inputs[0]
        writes.setdefault(f, []).append(n)
        records.append({"pass": PASS, "status": "fused", "where": where,
                        "reason": f"stored by {f.attrs['kernel']} ({f.attrs['kind']})"})
    if not writes:
        out = g.with_nodes(list(g.nodes), dict(g.outputs))
        out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
        return out
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    replaced = {w for ws in writes.values() for w in ws}
    for n in g.nodes:
        if n in replaced:
            continue                          # the kernel's output now is the written cache
        if n in writes:
            fused, gets = _with_writes(n, writes[n], new, users[n])
            nodes.append(fused)
            for old, gi in gets.items():
                new[old] = gi
            continue
        if n.op is Op.GETITEM and n.inputs[0] in writes:
            nodes.append(new[n])
            continue
        new[n] = n.remapped(new)
        nodes.append(new[n])
    out = g.with_nodes(nodes, {k: new.get(v, v) for k, v in g.outputs.items()})
    out.meta = dict(g.meta, fusions=list(g.meta.get("fusions", [])) + records)
    return out


def _with_writes(f: Node, ws: List[Node], new: Dict[Node, Node], readers: List[Node]):
    """The FUSED node `f` with each write of `ws` in its body; {old node: its replacement}
    for f's GETITEMs and for the writes (read as the cache's new value)."""
    body = f.attrs["body"]
    b = Builder({}, {})
    b.nodes.extend(body.nodes)
    outs = dict(body.outputs)
    inputs = list(f.inputs)
    inplace = dict(f.attrs.get("inplace", {}))
    n_in = sum(x.op is Op.INPUT for x in body.nodes)
    for w in ws:
        cache, pos, value = w.inputs
        k = str(value.attrs["index"])
        c_ph = b.input(f"in{n_in}", cache.type.shape, cache.type.dtype).node
        p_ph = b.input(f"in{n_in + 1}", pos.type.shape, pos.type.dtype).node
        n_in += 2
        inputs += [cache, pos]
        outs[k] = Node.make(Op.INDEX_COPY, [c_ph, p_ph, outs[k]], dict(w.attrs), w.loc,
                            w.scope)
        b.nodes.append(outs[k])
        inplace[int(k)] = len(inputs) - 2
    nb = Graph(body.name, b.nodes, outs)
    fused = Node.make(Op.FUSED, [new.get(x, x) for x in inputs],
                      {**f.attrs, "body": nb, "inplace": inplace}, f.loc, f.scope)
    gets: Dict[Node, Node] = {}
    by_index = {w.inputs[2].attrs["index"]: w for w in ws}
    for u in readers:                         # a FUSED node is read through GETITEMs
        gi = Node.make(Op.GETITEM, [fused], {"index": u.attrs["index"]}, u.loc, u.scope)
        gets[u] = gi
        if u.attrs["index"] in by_index:
            gets[by_index[u.attrs["index"]]] = gi
    return fused, gets

