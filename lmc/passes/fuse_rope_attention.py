"""`fuse_rope_attention`: RoPE on q and k, then scaled, masked, softmaxed attention, as one op.

Matched on primitives (no block names): from each softmax over the last axis, the pass walks

    out = softmax(where(causal_mask(T, T, window), cap((q' @ k'^T) * scale), -inf)) @ v'
          (the where may be absent: not causal; the scale a constant, or absent, and a
          constant scalar on q' or k' before the product, `(q * d ** -0.5) @ k^T`, q / c,
          rope(q * c) (RoPE is linear), joins it; cap(s) a soft cap cap * tanh(s / cap),
          Gemma 2's, or absent; ALiBi's bias may be added
          after it: + slopes * (kpos - qpos), slopes a static [H, 1, 1] tensor, the
          distance over positions iota(T), also written -(qpos - kpos) or, causal,
          -|qpos - kpos|, or BLOOM's slopes * kpos alone: `patterns.alibi`, the slopes an
          input of the op)

back through the scores and forward to the single `probs @ v'` (with attention sinks,
gpt-oss's, as lmc/passes/canonical.py writes them: `probs * sigmoid(logsumexp(s) - z) @ v'`,
z one logit per head broadcast over the batch and the queries, an input of the op and of its
gradient outputs when learned: option "sinks"), and reads q' and k' as a
concat along the head dim of parts (one part: no concat), each part one of

    rope(x) = x * cos + rot(x) * sin             RoPE, with cos/sin [T, R] tables computed from
                                                 positions alone (any base, offset or table)
        rotate-half:  rot(x) = concat(-x[..., R/2:], x[..., :R/2])
        interleaved:  rot(x) = reshape(concat(-xp[..., 1:2], xp[..., 0:1]), x's shape),
                      xp = reshape(x, [..., R/2, 2])        (pairs (2i, 2i+1)),
                      or the same from step-2 slices x[..., 1::2], x[..., 0::2]
    rope(x) * zeta, rope(x) / zeta               XPos: zeta a static [T, R] table
                                                 (tables may also be [1, 1, T, R])
    x                                            a part passed through (not rotated)

where x may be a slice of the head dim of a tensor (partial rotary: minimax's
concat(rope(q[..., :R]), q[..., R:])) or a tensor of its own (MLA's decoupled
concat(q_C, rope(q_R))), and k', v' (or any part of k') may be broadcast over the query heads
(GQA/MQA: reshape(expand(reshape(k, [B, n_kv, 1, S, D]), [B, n_kv, H/n_kv, S, D]),
[B, H, S, D]) or expand from one head; MLA's shared k_R). q' has exactly one rotated part and
k' the same split of the head dim; the k part facing it is either rotated here too or taken
as given (a rotated K computed once and shared by several attentions, as YOCO's
cross-decoder's, or keys with no RoPE): the kernel then rotates q only. With no rotated part
in q (learned or no positions: GPT-2, NoPE) and none in k, the region is plain attention and
fuses the same way with no rotation (the kernels' R = 0); where q or k is arithmetic that
almost was RoPE, the fused record says why its RoPE stayed outside.

The region becomes one FUSED node of kind "rope_attention" whose inputs are the tensors the
parts are cut from (each read once: k, v at n_kv heads), v, and the tables, and whose body is
the matched primitives, so the torch backend and every check still run the exact oracle; the
triton backend runs lmc/codegen/attention.py's kernels (RoPE applied to tiles inside a
flash-attention kernel, never materialising T x T), its `launch_template` reading the layout
from the body meta's `options`. Where q or k is made of parts of separate tensors (MLA's
[q_C | q_R] and [k_C | k_R] with k_R one head shared by all) the launch concatenates them with
torch first, rotated part first (a copy of q and k, no T x T; the kernels would need a second
pointer per operand to avoid it); GQA, partial rotary from one tensor, whole-head RoPE and a v
narrower than q/k are passed as they are.

The op has two outputs: "0" the attention output, "1" the row log-sum-exp of the masked,
scaled scores in fp32 ([B, H, T], natural log; computed in the body as
logsumexp(stop_gradient(scores)), so it takes no gradient), which the forward kernel writes
anyway. The body meta's "saved" lists both: the autodiff pass differentiates a FUSED node by
its body and gives the backward op (kind "rope_attention_bwd") the forward's out and lse, so
its kernels (dK/dV, dQ) run on them with no forward rerun. A program with no backward reads
only output 0 (the kernel then writes the lse to scratch).

Mixed precision: a softmax in fp32 over cast(bf16 scores) whose probabilities are cast back
to v's dtype for probs @ v (lmc/passes/mixed_precision.py: softmax is on autocast's fp32 list)
is matched through both casts; the kernels compute the scores and softmax in fp32 and round P
to v's dtype for the dot, as that program does.

It runs before autodiff on the program being trained or run on the triton backend, not in the
compile pipeline: the decode pass derives its step from the unfused graph. Where a region
almost matches, a declined record says which condition failed (`lmc compile --explain`).
Not matched: k rotated where q is not, a mask other than causal_mask (an additive
where(causal_mask, 0, -inf) is rewritten to it by canonicalize), a scale that is a tensor
(on the scores, or on q or k: the record names it), queries and keys of different lengths
(T != S), RoPE tables that depend on the input, RoPE on several parts of a head, kv heads
tiled (query head h reading kv head h mod n_kv), a softmax over anything but q @ k^T
(medit_one's feature attention), and probabilities used other than once as probs @ v.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from ..ir.graph import Graph, Node
from ..ir.ops import Op
from ..ir.types import DType
from .fuse_pointwise import _where
from .patterns import (
    Body,
    NoMatch,
    Region,
    alibi,
    const_scale,
    const_value,
    narrowing,
    need,
    sink_gate,
    softcap,
    splice,
    static_nodes,
    upstream,
    widened,
)


def _last(n: Node) -> int:
    return n.type.rank - 1


def _is_slice(s: Node, x: Node, start, stop, step=1) -> bool:
    if s.op is not Op.SLICE or s.inputs[0] is not x or s.attrs["axis"] != _last(x):
        return False
    end = s.attrs.get("stop")
    end = x.type.shape[-1] if end is None else end
    return s.attrs.get("start", 0) == start and end == stop and s.attrs.get("step", 1) == step


def _split_mul(n: Node, want_table) -> Tuple[Node, Node]:
    """n = a * t with t a table satisfying `want_table`: (a, t)."""
    need(n.op is Op.MUL, f"{n.op.value} where x*cos or rot(x)*sin was expected")
    a, b = n.inputs
    if want_table(b):
        return a, b
    if want_table(a):
        return b, a
    raise NoMatch("no [T, R] position table in the RoPE product")


def _rotation(r: Node, x: Node) -> bool:
    """Is r = rot(x)? True for interleaved pairs, False for rotate-half; else NoMatch."""
    R = x.type.shape[-1]
    need(isinstance(R, int) and R % 2 == 0, "rotary width is not a static even size")
    if r.op is Op.RESHAPE:                 # interleaved: pairs (2i, 2i+1) -> (-x[2i+1], x[2i])
        c = r.inputs[0]
        need(c.op is Op.CONCAT and len(c.inputs) == 2 and c.attrs["axis"] == _last(c)
              and c.type.shape[-1] == 2 and tuple(r.type.shape) == tuple(x.type.shape),
              "rotation is neither rotate-half nor interleaved pairs")
        neg, lo = c.inputs
        pairs = tuple(x.type.shape[:-1]) + (R // 2, 2)

        def half(s, first, negated):
            if negated:                    # -(half), or reshape(-(x[..., 1::2]))
                if s.op is Op.NEG:
                    s = s.inputs[0]
                elif s.op is Op.RESHAPE and s.inputs[0].op is Op.NEG:
                    return s.inputs[0].inputs[0].op is Op.SLICE and (
                        _is_slice(s.inputs[0].inputs[0], x, first, R, 2)
                        or _is_slice(s.inputs[0].inputs[0], x, first, R - 1 + first, 2))
                else:
                    return False
            if s.op is Op.SLICE and s.inputs[0].op is Op.RESHAPE:        # xp[..., j:j+1]
                xp = s.inputs[0]
                return (xp.inputs[0] is x and tuple(xp.type.shape) == pairs
                        and _is_slice(s, xp, first, first + 1))
            if s.op is Op.RESHAPE and s.inputs[0].op is Op.SLICE:        # x[..., j::2]
                return _is_slice(s.inputs[0], x, first, R, 2) or _is_slice(
                    s.inputs[0], x, first, R - 1 + first, 2)
            return False
        need(half(neg, 1, True) and half(lo, 0, False),
              "interleaved rotation halves are not x[..., 1::2] and x[..., 0::2]")
        return True
    need(r.op is Op.CONCAT and r.attrs["axis"] == _last(r) and len(r.inputs) == 2,
          "rotation is not a concat of two halves on the last axis")
    neg, lo = r.inputs
    need(neg.op is Op.NEG, "rotation is not concat(-x2, x1) (rotate-half) or interleaved pairs")
    hi = neg.inputs[0]
    need(_is_slice(hi, x, R // 2, R) and _is_slice(lo, x, 0, R // 2),
          "rotation halves are not x[..., R/2:] and x[..., :R/2] of the rotated x")
    return False


def _is_table(t: Node, static) -> bool:
    """A position table: static, [T, R] or [1, 1, T, R]."""
    return static(t) and (t.type.rank == 2 or (
        t.type.rank == 4 and tuple(t.type.shape[:2]) == (1, 1)))


def _strip_table(t: Node) -> Node:
    for _ in range(2):
        if t.op in (Op.CAST, Op.RESHAPE):
            t = t.inputs[0]
    return t


def _rope(n: Node, static) -> Tuple[Node, Node, Node, bool]:
    """n = rope(x): (x, cos, sin, interleaved)."""
    need(n.op is Op.ADD, f"{n.op.value} where rope's add of x*cos and rot(x)*sin was expected")

    def table(t):
        return _is_table(t, static)
    first, second = n.inputs
    why = "not x*cos + rot(x)*sin"
    for p, q in ((first, second), (second, first)):
        try:
            x, cos = _split_mul(p, table)
            r, sin = _split_mul(q, table)
        except NoMatch as e:
            why = str(e)
            continue
        if r.op not in (Op.CONCAT, Op.RESHAPE):
            continue
        # under mixed precision the fp32 tables reach x through one cast each (and a
        # [1, 1, T, R] table through a reshape)
        c0, s0 = _strip_table(cos), _strip_table(sin)
        need(c0.op is Op.COS and s0.op is Op.SIN,
              "rope tables are not cos/sin of the same angles")
        need(c0.inputs[0] is s0.inputs[0], "rope's cos and sin are of different angles")
        interleaved = _rotation(r, x)
        R = x.type.shape[-1]
        need(tuple(cos.type.shape)[-1] == R and tuple(sin.type.shape)[-1] == R,
              "rope table narrower or wider than the rotated dims")
        return x, cos, sin, interleaved
    raise NoMatch(why)


def _heads(x: Node) -> Tuple[Node, int]:
    """x = src broadcast over the query heads, query head h reading head h // G of src:
    (src, G); (x, 1) when x is not such a broadcast."""
    if x.type.rank != 4:
        return x, 1
    if x.op is Op.RESHAPE and x.inputs[0].op is Op.EXPAND and \
            x.inputs[0].inputs[0].op is Op.RESHAPE:
        e = x.inputs[0]
        r = e.inputs[0]
        src = r.inputs[0]
        if src.type.rank == 4:
            b, h, t, d = src.type.shape
            rs, es = tuple(r.type.shape), tuple(e.type.shape)
            if rs == (b, h, 1, t, d) and es[:2] == (b, h) and es[3:] == (t, d) and \
                    isinstance(es[2], int) and tuple(x.type.shape) == (b, h * es[2], t, d):
                return src, es[2]
            if rs == (b, 1, h, t, d) and es[0] == b and es[2:] == (h, t, d) and \
                    isinstance(es[1], int) and es[1] > 1 and \
                    tuple(x.type.shape) == (b, h * es[1], t, d):
                raise NoMatch("kv heads tiled (query head h reads kv head h mod n_kv); the "
                               "kernel shares each kv head among consecutive query heads")
    if x.op is Op.EXPAND:
        src = x.inputs[0]
        s, xs = tuple(src.type.shape), tuple(x.type.shape)
        if src.type.rank == 4 and s[1] == 1 and s[0] == xs[0] and s[2:] == xs[2:] and \
                isinstance(xs[1], int):
            return src, xs[1]
    return x, 1


def _part(p: Node, static, users) -> dict:
    """One concat part of q' or k' (columns of the scores' operands)."""
    p, g = _heads(p)
    part = {"width": p.type.shape[-1], "rope": False, "why": None, "top": p, "g_top": g,
            # arithmetic on q or k (RoPE's form) that is not RoPE: said in the record
            "arith": p.op in (Op.ADD, Op.MUL, Op.DIV)}
    inner, zeta = p, None
    if p.op in (Op.MUL, Op.DIV):          # XPos: rope(x) * zeta, rope(x) / zeta
        a, t = p.inputs
        if p.op is Op.MUL and _is_table(a, static):
            a, t = t, a
        if _is_table(t, static) and a.op is Op.ADD:
            inner, zeta = a, (t, "mul" if p.op is Op.MUL else "div")
    try:
        x, cos, sin, inter = _rope(inner, static)
        if zeta is not None:
            need(tuple(zeta[0].type.shape) == tuple(cos.type.shape),
                  "XPos table's shape differs from the rope tables'")
        part.update(rope=True, cos=cos, sin=sin, interleaved=inter, zeta=zeta)
    except NoMatch as e:
        part["why"] = str(e)
        x = p
    x, g2 = _heads(x)
    g *= g2
    if x.op is Op.SLICE and x.attrs["axis"] == _last(x) and x.attrs.get("step", 1) == 1 and \
            isinstance(x.attrs.get("start", 0), int):
        start = x.attrs.get("start", 0)
        part.update(src=x.inputs[0], start=start, stop=start + x.type.shape[-1])
    else:
        part.update(src=x, start=0, stop=x.type.shape[-1])
    part["g"] = g
    return part


def _side(x: Node, static, users, strip: bool = True) -> Tuple[List[dict], float]:
    """q' or k' as its parts along the head dim, and (strip) a constant scale taken off it
    (before or after a broadcast over the query heads)."""
    x, f = const_scale(x) if strip else (x, 1.0)
    x, g = _heads(x)
    x, f2 = const_scale(x) if strip else (x, 1.0)
    ps = list(x.inputs) if x.op is Op.CONCAT and x.attrs["axis"] == _last(x) else [x]
    parts = [_part(p, static, users) for p in ps]
    for p in parts:
        p["g"] *= g
        p["g_side"] = g
    return parts, f * f2


def _as_given(p: dict) -> dict:
    """A k part whose RoPE is computed outside the region (shared): taken as rotated."""
    q = dict(p)
    src = p["top"]
    q.update(rope=False, src=src, start=0, stop=src.type.shape[-1], given=True,
             g=p["g_top"] * p["g_side"])
    return q


def match(sm: Node, users: Dict[Node, List[Node]], static, order: Dict[Node, int]) -> dict:
    need(sm.attrs["axis"] == sm.type.rank - 1, "softmax not over the last axis")
    need(sm.type.dtype.value in ("f32", "f16", "bf16"), "attention in a non-float dtype")
    x = sm.inputs[0]
    if widened(x):       # mixed precision's fp32 softmax over low-precision scores
        x = x.inputs[0]
    causal, window = False, 0
    if x.op is Op.WHERE:
        mask, s, fill = x.inputs
        need(mask.op is Op.CAUSAL_MASK, "masked by something other than causal_mask")
        need(const_value(fill) == float("-inf"), "masked scores are not set to -inf")
        need(tuple(mask.type.shape) == tuple(sm.type.shape[-2:]),
              "causal mask is not [T, S] like the scores")
        causal, window = True, int(mask.attrs.get("window") or 0)
        x = s
    slopes, keys_only = None, False
    if x.op is Op.ADD:          # ALiBi: scores + slopes * (key position - query position)
        def iota(n, axis):      # training: query i and key j at positions i and j
            return n.op is Op.IOTA
        x, slopes, qpos, _ = alibi(x, sm.type.shape[1], causal, static, iota)
        keys_only = qpos is None
        if widened(x):          # mixed precision: the bias met the scores in fp32
            x = x.inputs[0]
    cap = softcap(x)            # Gemma 2's cap * tanh(s / cap) on the scaled scores
    if cap is not None:
        cap, x = cap
    x, scale = const_scale(x)  # (q @ k^T) * c, / c: the kernel's scale
    if x.op in (Op.MUL, Op.DIV):
        need(x.op is not Op.MUL or any(
            tuple(i.type.shape) != tuple(x.type.shape) for i in x.inputs),
            f"scores are an elementwise product of two {list(x.type.shape)} tensors, not "
            f"q @ k^T (a softmax over features, not attention across positions)")
        raise NoMatch("scores scaled by a tensor")
    need(x.op is Op.MATMUL, f"{x.op.value} where q @ k^T was expected (softmax over "
                             f"{list(sm.type.shape)} is not over scores of queries and keys)")
    mm = x
    p, outs = sm, users.get(sm, [])
    sink = None
    if len(outs) == 1 and isinstance(outs[0], Node) and outs[0].op is Op.MUL:
        sink = sink_gate(outs[0], sm, sm.type.shape[1])[0]   # attention sinks
        p, outs = outs[0], users.get(outs[0], [])
    if len(outs) == 1 and isinstance(outs[0], Node) and outs[0].op is Op.CAST:
        p, outs = outs[0], users.get(outs[0], [])     # rounded to v's dtype for probs @ v
    need(len(outs) == 1 and isinstance(outs[0], Node) and outs[0].op is Op.MATMUL
          and outs[0].inputs[0] is p,
          "probabilities are not used once, as probs @ v")
    pv = outs[0]
    qr, kt = mm.inputs
    # mixed precision: q, k (and v) computed in fp32 (a norm's output, a bias added to a
    # bf16 product) are cast down for the products; the kernels take them cast, as the
    # fused op's inputs (new nodes, which fuse into their producers' kernels)
    qr, kt = _narrowed(qr), _narrowed(kt)
    need(qr.type.rank == 4, "scores are not [B, H, T, S]")
    try:
        m = _sides(sm, pv, qr, kt, users, static, order, causal, window, scale, slopes,
                   sink, strip=True)
    except NoMatch as e:
        # a scaled q (or k) read outside this attention too (two attentions sharing it, an
        # output) cannot be taken inside: the scaled tensor is then the op's input
        try:
            m = _sides(sm, pv, qr, kt, users, static, order, causal, window, scale, slopes,
                       sink, strip=False)
        except NoMatch:
            raise e from None
    if cap is not None:
        m["opts"]["softcap"] = cap
    if keys_only:
        m["opts"]["alibi_keys_only"] = True
    return m


def _sides(sm, pv, qr, kt, users, static, order, causal, window, scale, slopes, sink,
           strip: bool) -> dict:
    """The region from q' and k^T on. strip: a constant scalar on q or k before the
    product, (q * c) @ k^T, rope(q) * c, q / c, q @ (k^T * c) (and rope(q * c), RoPE being
    linear), joins the kernel's scale; the product stays in the body (the region), so the
    oracle is unchanged."""
    if strip:
        kt, f = const_scale(kt)
        scale *= f
    need(kt.op is Op.PERMUTE and tuple(kt.attrs["perm"]) == (0, 1, 3, 2),
          "keys are not transposed from [B, H, S, D]")
    kr = kt.inputs[0]
    need(isinstance(qr.type.shape[1], int), "head count is not static")
    qparts, f = _side(qr, static, users, strip)
    scale *= f
    kparts, f = _side(kr, static, users, strip)
    scale *= f
    why = "; ".join(w for w in (_tensor_scale(qr, "q", static), _tensor_scale(kr, "k", static))
                    if w)

    def assemble(qparts, scale):
        try:
            return _assemble(sm, pv, qr, kr, qparts, kparts, users, static, order, causal,
                             window, scale, slopes, sink, why, given=False)
        except _Shared:
            # the k part's RoPE is computed outside this attention too (a rotated K shared by
            # several attentions, as YOCO's cross-decoder's): take it as given
            return _assemble(sm, pv, qr, kr, qparts, kparts, users, static, order, causal,
                             window, scale, slopes, sink, why, given=True)
    peeled = _unscaled_sources(qparts, kparts) if strip else None
    if peeled is not None:     # rope(q * c): the kernel reads q and takes c into its scale
        try:
            return assemble(peeled[0], scale * peeled[1])
        except NoMatch:        # (say, q * c read outside too): c stays in the op's input
            pass
    return assemble(qparts, scale)


class _Shared(NoMatch):
    pass


def _tensor_scale(x: Node, name: str, static) -> str:
    """Why q' (or k') is not read as RoPE's parts when it is multiplied (or divided) by a
    broadcast tensor that is neither a constant scalar (the kernel's scale) nor a position
    table (XPos): said in a declined record; "" otherwise."""
    x, _ = const_scale(_heads(const_scale(x)[0])[0])
    if x.op not in (Op.MUL, Op.DIV):
        return ""
    for a, t in ((x.inputs, x.inputs[::-1]) if x.op is Op.MUL else (x.inputs,)):
        if tuple(a.type.shape) == tuple(x.type.shape) and \
                tuple(t.type.shape) != tuple(x.type.shape) and \
                const_value(t) is None and not _is_table(t, static):
            return (f"{name} is {'multiplied' if x.op is Op.MUL else 'divided'} by a "
                    f"{list(t.type.shape)} tensor before the product: only a constant scalar "
                    f"joins the kernel's scale")
    return ""


def _unscaled_sources(qparts: List[dict], kparts: List[dict]):
    """q's parts all cut from sources scaled by one constant c (`rope(q * c)`, or q * c split
    for partial rotary): (the parts cut from the unscaled sources, c), else None. RoPE is
    linear, so rope(c q) = c rope(q): c is a scale of the scores."""
    fs, out = set(), []
    for p in qparts:
        src, f = const_scale(p["src"])
        if f == 1.0 or src.op is Op.CONST or any(p["src"] is k["src"] or p["src"] is k["top"]
                                                 for k in kparts):
            return None
        fs.add(f)
        out.append(dict(p, src=src))
    return (out, fs.pop()) if len(fs) == 1 else None


def _narrowed(x: Node) -> Node:
    """x without a narrowing cast (mixed precision's, before a product)."""
    return x.inputs[0] if narrowing(x) else x


def _assemble(sm, pv, qr, kr, qparts, kparts, users, static, order, causal, window, scale,
              slopes, sink, why: str, given: bool) -> dict:
    H, T = qr.type.shape[1], qr.type.shape[2]
    S = kr.type.shape[2]
    kparts = list(kparts)
    need(T == S, "queries and keys of different lengths (positions would not line up)")
    roped = [i for i, p in enumerate(qparts) if p["rope"]]
    need(len(roped) <= 1, "RoPE on several parts of q's head dim")
    need(len(qparts) == len(kparts) and all(
        a["width"] == b["width"] for a, b in zip(qparts, kparts)),
        f"q and k are not split alike along the head dim (q in parts "
        f"{[p['width'] for p in qparts]}, k in {[p['width'] for p in kparts]}"
        + (f"; {why})" if why else ": their rotated parts do not face)"))
    need(all(p["g"] == 1 for p in qparts), "queries broadcast over heads")
    if not roped:
        # no RoPE (learned or no positions, ALiBi-free GPT-2 style): plain flash attention;
        # a k rotated where q is not is not RoPE (the rotations would not cancel)
        need(not any(p["rope"] for p in kparts), "k rotated in columns where q is not"
             + (f" ({why})" if why else ""))
        j = 0
        note = "; ".join(p["why"] for p in qparts + kparts if p["arith"] and p["why"])
    else:
        j, note = roped[0], ""
        need(not any(p["rope"] for i, p in enumerate(kparts) if i != j),
              "k rotated in columns where q is not" + (f" ({why})" if why else ""))
    qp, kp = qparts[j], kparts[j]
    if kp["rope"] and (given or len(users.get(kp["top"], [])) > 1):
        # a rotated K shared by several attentions (YOCO's cross-decoder): taken as given
        kparts[j] = kp = _as_given(kp)
    rope_k = kp["rope"]
    if rope_k:
        need(kp["interleaved"] == qp["interleaved"], "q and k use different rotary layouts")
    for p, n in ((qp, T), (kp, S)):
        if p["rope"]:
            need(tuple(p["cos"].type.shape)[-2] == n,
                  f"rope table has {p['cos'].type.shape[-2]} positions, not the {n} rows")
    dot = pv.inputs[1].type.dtype        # the products' dtype: the kernels' inputs'
    vv = _narrowed(pv.inputs[1])
    v, gv = _heads(vv)
    need(all(isinstance(p["width"], int) for p in qparts), "head dim is not static")
    for p in kparts:
        need(H % p["g"] == 0, "k heads do not divide the query heads")
    kvh = [H // p["g"] for p in kparts] + [H // gv]
    HKV = max(kvh)
    need(all(HKV % h == 0 for h in kvh), "k and v parts' head counts do not nest")
    need(all(x.type.dtype in (dot, DType.f32) for x in (qr, kr, vv)), "q, k, v dtypes differ")

    # the fused op's inputs, each once: q's sources, k's, v, then the tables
    inputs: List[Node] = []

    def idx(n: Node) -> int:
        if n not in inputs:
            inputs.append(n)
        return inputs.index(n)
    korder = [j] + [i for i in range(len(qparts)) if i != j]   # kernel order: rope part first
    qlay = [[idx(qparts[i]["src"]), qparts[i]["start"], qparts[i]["stop"], 1] for i in korder]
    klay = [[idx(kparts[i]["src"]), kparts[i]["start"], kparts[i]["stop"],
             HKV // (H // kparts[i]["g"])] for i in korder]
    vi = idx(v)
    if sink is not None and not static(sink):
        idx(sink)             # learned sinks get a gradient (the backward's last)
    n_grad = len(inputs)
    opts = {"causal": causal, "window": window, "scale": scale,
            "rot_dim": qp["width"] if roped else 0,
            "interleaved": bool(roped) and qp["interleaved"], "rope_k": rope_k, "q": qlay,
            "k": klay, "v": [vi, HKV // (H // gv)], "heads": H, "kv_heads": HKV,
            "n_grad": n_grad}
    if roped:
        opts["cos"], opts["sin"] = idx(qp["cos"]), idx(qp["sin"])
    if slopes is not None:
        opts["alibi"] = idx(slopes)
    if sink is not None:
        opts["sinks"] = idx(sink)
    if rope_k and (kp["cos"] is not qp["cos"] or kp["sin"] is not qp["sin"]):
        opts["k_cos"], opts["k_sin"] = idx(kp["cos"]), idx(kp["sin"])
    for name, p in (("q_zeta", qp), ("k_zeta", kp)):
        if p["rope"] and p["zeta"] is not None:
            opts[name] = [idx(p["zeta"][0]), p["zeta"][1]]
    for n in inputs[:n_grad]:
        need(n.op not in (Op.CONST,), "a constant where q, k or v was expected")

    # the region: everything between the inputs and probs @ v (sources are copied)
    stop = set(inputs)
    region = upstream([pv], stop)
    for n in region:
        for i in n.inputs:
            need(i in region or i in stop or (not i.inputs and i.op not in (Op.INPUT, Op.PARAM)),
                  f"attention reads {i.op.value} besides q, k, v and the tables")
    # values used outside too stay in the graph: allowed for views of the inputs (the
    # broadcast of a shared K, V that CSE merged across layers), which the body recomputes
    keep = set()
    stack = [n for n in region if n is not pv and any(u not in region for u in users.get(n, []))]
    while stack:
        n = stack.pop()
        if n in keep or n not in region:
            continue
        keep.add(n)
        stack.extend(n.inputs)
    # (static values, ALiBi's bias shared by every layer, are recomputed by the body too)
    bad = sorted((n for n in keep if n.op not in _VIEWS and not static(n)),
                 key=order.__getitem__)
    if bad:
        if rope_k and not given and any(n in _rope_nodes(kp, region) for n in bad):
            raise _Shared("k's rope is shared")
        raise NoMatch(f"{bad[-1].op.value} inside the attention is also used outside it")
    # sources computed in fp32 for products in f16/bf16: the op reads them cast (new nodes
    # outside the region; the body widens them back for the region's fp32 ops)
    wide = {}
    for i, n in enumerate(inputs[:n_grad]):
        if n.type.dtype is not dot and i != opts.get("sinks"):   # sinks: read in fp32
            need(n.type.dtype is DType.f32, "q, k, v dtypes differ")
            inputs[i] = Node.make(Op.CAST, [n], {"dtype": dot}, n.loc, n.scope)
            wide[inputs[i]] = n
    return {"inputs": inputs, "n_grad": n_grad, "out": pv, "scores": sm.inputs[0],
            "wide": wide,
            "region": region, "note": note,
            "dead": region - keep, "opts": opts, "order": order}


_VIEWS = (Op.RESHAPE, Op.EXPAND, Op.PERMUTE, Op.SLICE)
_OUTPUT = object()


def _rope_nodes(p: dict, region) -> set:
    """The region's nodes between a rotated part's top and its source."""
    out, stack = set(), [p["top"]]
    while stack:
        n = stack.pop()
        if n in out or n not in region:
            continue
        out.add(n)
        stack.extend(n.inputs)
    return out


def _body(m: dict, name: str) -> Graph:
    """The matched region as a body graph over placeholders in0.. (the fused op's inputs)."""
    b = Body(m["inputs"])
    for c, src in m["wide"].items():   # an fp32 source the op reads cast down: widened back
        b.env[src] = b.add(Node.make(Op.CAST, (b.env[c],), {"dtype": DType.f32}, c.loc,
                                     c.scope))
    b.copy(sorted(m["region"], key=m["order"].__getitem__))
    # output 1: the row log-sum-exp of the masked, scaled scores in fp32 ([B, H, T]), which
    # the forward kernel writes anyway; only the backward reads it (saved with the output, so
    # the backward kernels need no forward rerun). It takes no gradient: stop_gradient.
    s = m["scores"]
    sg = b.add(Node.make(Op.STOP_GRADIENT, (b.env[s],), {}, s.loc, s.scope))
    if sg.type.dtype is not DType.f32:
        sg = b.add(Node.make(Op.CAST, (sg,), {"dtype": DType.f32}, s.loc, s.scope))
    lse = b.add(Node.make(Op.LOGSUMEXP, (sg,), {"axis": s.type.rank - 1, "keepdim": False},
                          s.loc, s.scope))
    if "sinks" in m["opts"]:   # the sink is one more term: lse + softplus(z - lse)
        z = m["inputs"][m["opts"]["sinks"]]
        mk = lambda op, ins, attrs=None: b.add(Node.make(op, ins, attrs or {}, s.loc,  # noqa
                                                         s.scope))
        zf = mk(Op.STOP_GRADIENT, (b.env[z],))
        if zf.type.dtype is not DType.f32:
            zf = mk(Op.CAST, (zf,), {"dtype": DType.f32})
        zf = mk(Op.RESHAPE, (zf,), {"shape": (m["opts"]["heads"], 1)})
        lse = mk(Op.ADD, (lse, mk(Op.SOFTPLUS, (mk(Op.SUB, (zf, lse)),))))
    return b.graph(name, [m["out"], lse],
                   module="attention",            # lmc/codegen/attention.py's launch_template
                   template="rope_attention", options=dict(m["opts"]),
                   saved=["0", "1"])              # the backward reads out and lse (autodiff)


def _describe(o: dict) -> str:
    H, HKV = o["heads"], o["kv_heads"]
    what = ["interleaved rope" if o["interleaved"] else "rope"]
    width = sum(stop - start for _, start, stop, _ in o["q"])
    if not o["rot_dim"]:
        what = ["no rope:"]
    elif o["rot_dim"] < width:
        what.append(f"on {o['rot_dim']} of {width} dims")
    if o["rot_dim"] and not o["rope_k"]:
        what.append("(q only; k given)")
    if "q_zeta" in o or "k_zeta" in o:
        what.append("+ xpos")
    if o["rot_dim"]:
        what.append("+")
    if o["causal"]:
        what.append("causal")
    if o["window"]:
        what.append(f"window {o['window']}")
    what.append("attention" if HKV == H else
                f"{'MQA' if HKV == 1 else 'GQA'} attention ({H} heads, {HKV} kv)")
    if o.get("softcap"):
        what.append(f"with scores soft-capped at {o['softcap']:.4g}")
    if "alibi" in o:
        what.append("with ALiBi" + (" (slopes * key position)" if o.get("alibi_keys_only")
                                    else ""))
    if "sinks" in o:
        what.append("with attention sinks")
    if len(o["q"]) > 1 and len({q[0] for q in o["q"]}) > 1:
        what.append("(decoupled rope part)")
    return " ".join(what) + f", scale {o['scale']:.4g}"


def fuse_rope_attention(g: Graph) -> Graph:
    users = g.users()
    for o in g.outputs.values():       # a graph output is a use outside any region
        users.setdefault(o, []).append(_OUTPUT)
    static = static_nodes(g)
    order = {n: i for i, n in enumerate(g.nodes)}
    records, matches = [], []
    for n in g.nodes:
        # candidates: softmaxes over the keys of [B, H, T, S] scores (a router's softmax
        # over experts is not attention and is not reported)
        if n.op is not Op.SOFTMAX or n.type.rank != 4:
            continue
        try:
            m = match(n, users, lambda t: static.get(t, False), order)
        except NoMatch as e:
            records.append({"pass": "fuse_rope_attention", "status": "declined",
                            "where": _where(n), "reason": str(e)})
            continue
        matches.append(m)
    regions = []
    for i, m in enumerate(matches):
        name = f"lmc_rope_attention_{i}"
        fused = Node.make(Op.FUSED, list(m["inputs"]),
                          {"kernel": name, "kind": "rope_attention", "body": _body(m, name),
                           # position tables: no gradient
                           "no_grad": tuple(range(m["n_grad"], len(m["inputs"])))},
                          m["out"].loc, m["out"].scope)
        regions.append(Region(fused, [m["out"], None], m["dead"]))
        why = _describe(m["opts"])
        if m["note"]:    # q or k is computed by arithmetic that is not RoPE's: say why
            why += f" (q and k computed before it: their RoPE not matched: {m['note']})"
        records.append({"pass": "fuse_rope_attention", "status": "fused",
                        "where": _where(m["out"]), "reason": why})
    return splice(g, regions, records)
