"""`canonicalize`: equivalent spellings rewritten into the one form the pattern passes and the
decode pass read. Exact algebra only (same values up to rounding), so the oracle is unchanged.

Attention sinks (gpt-oss; StreamingLLM's sink logit): a learned per-head logit z that joins
every row's softmax as one more key with no value, written as a concatenation along the keys
and a slice of the probabilities back to the real keys:

    p = slice(softmax(concat([s, z], -1), -1), -1, 0, S)        z: [.., 1] on the key axis

becomes, with lse = logsumexp(s, -1) (keepdim),

    p = softmax(s, -1) * sigmoid(lse - z)

(exp(s_j) / (sum_k exp(s_k) + exp(z)) = softmax(s)_j * Z / (Z + exp(z)), Z = exp(lse)). The
concatenation along the key axis is gone: the decode pass reads the scores over the cache
as it reads any attention's (a softmax and a logsumexp over the keys, z taken per query), and
fuse_rope_attention / fuse_decode_attention match the product, the sink an input of the
flash kernels (added to each row's softmax denominator). Only a slice of the real keys'
probabilities, read by nothing else, is rewritten.

A causal convolution over a padded sequence: xp = concat([pad, x], t) with a pad of P
positions, and its windows slice(xp, t, j, j + T) for j = 0 .. P (pad once, take every tap's
window, as F.pad and a Conv1d do) become x shifted P - j positions,
concat([pad[j:P], x[:T - (P - j)]], t), the causal shift the decode pass keeps a state for
(and j = P is x itself).

Differential attention (DIFF Transformer): the difference of two attention maps weighting one
set of values,

    (softmax(s1) - lam * softmax(s2)) @ v    becomes    softmax(s1) @ v - lam * (softmax(s2) @ v)

(lam constant along the keys: a scalar or [.., 1]; any sum or difference of such terms), so
each map is an ordinary attention that fuse_rope_attention makes one flash-attention op and
the decode pass reads over the cache, instead of two [B, H, T, T] maps stored and subtracted.

A fixed decay written from positions (RetNet's D_ts = gamma^(t - s)):

    L * (p_t - p_s),  p = [cast] iota(T),  L: [.., 1, 1] (a log-decay per head)

becomes G_t - G_s with G = cumsum(expand(L, [.., T]), -1) (G_t = (t + 1) L), and a decay
masked after its exp, where(causal_mask, exp(x), 0), becomes exp(where(causal_mask, x, -inf))
(exp(-inf) = 0; the gradient no longer multiplies 0 by the exp of a large masked exponent):
the canonical decayed linear attention fuse_linear_attention makes chunked and the decode pass
decodes with a d_k x d_v state instead of a cache.
"""
from __future__ import annotations

from typing import Dict, List

from ..ir.dims import Dim, norm
from ..ir.graph import Graph, Node
from ..ir.ops import Op
from .patterns import const_value


def _sink_slice(n: Node, users: Dict[Node, List[Node]]):
    """n = slice(softmax(concat([s, z], -1), -1), -1, 0, S) as above: (s, z), else None."""
    if n.op is not Op.SLICE or n.attrs["axis"] % n.type.rank != n.type.rank - 1 or \
            n.attrs["start"] != 0 or n.attrs.get("step", 1) != 1:
        return None
    sm = n.inputs[0]
    if sm.op is not Op.SOFTMAX or sm.attrs["axis"] % sm.type.rank != sm.type.rank - 1 or \
            len(users.get(sm, [])) != 1:
        return None
    c = sm.inputs[0]
    if c.op is not Op.CONCAT or len(c.inputs) != 2 or \
            c.attrs["axis"] % c.type.rank != c.type.rank - 1 or len(users.get(c, [])) != 1:
        return None
    s, z = c.inputs
    if z.type.shape[-1] != 1 or norm(n.attrs["stop"]) != norm(s.type.shape[-1]):
        return None
    return s, z


def _terms(a: Node, users, sign: int = 1):
    """a = a sum/difference of softmaxes along the last axis, each optionally scaled by a
    factor constant along that axis ([.., 1] or a scalar): [(sign, factor or None, softmax)],
    or None. Every node on the way is read by the next one only."""
    if a.op is Op.SOFTMAX and a.attrs["axis"] % a.type.rank == a.type.rank - 1:
        return [(sign, None, a)]
    if len(users.get(a, [])) != 1:
        return None
    if a.op in (Op.ADD, Op.SUB):
        left = _terms(a.inputs[0], users, sign)
        right = _terms(a.inputs[1], users, sign if a.op is Op.ADD else -sign)
        return None if left is None or right is None else left + right
    if a.op is Op.MUL:
        for p, c in (a.inputs, a.inputs[::-1]):
            if p.op is Op.SOFTMAX and p.attrs["axis"] % p.type.rank == p.type.rank - 1 and \
                    (c.type.rank == 0 or c.type.shape[-1] == 1) and \
                    len(users.get(p, [])) == 1:
                return [(sign, c, p)]
    return None


def _differential(n: Node, users):
    """n = (p1 - lam * p2 [+ ...]) @ v with the p softmaxes over the keys (differential
    attention, DIFF Transformer): its terms, else None."""
    if n.op is not Op.MATMUL or n.inputs[0].op not in (Op.ADD, Op.SUB):
        return None
    ts = _terms(n.inputs[0], users)
    if ts is None or len(ts) < 2:
        return None
    # attention maps over positions (queries x keys, both symbolic): elsewhere (a mixture of
    # softmaxes times a weight) distributing would only add products
    if not all(isinstance(p.type.shape[-1], Dim) and isinstance(p.type.shape[-2], Dim)
               for _, _, p in ts):
        return None
    r = n.type.rank
    if any(c is not None and c.type.rank > r for _, c, _ in ts):
        return None
    return ts


def _padded_window(n: Node):
    """n = slice(concat([pad, x], a), a, j, j + L), pad P (a number) long on axis a, x L long
    and 0 <= j <= P: x shifted P - j later with pad[j:P] in front. Returns (pad, x, a, j, P),
    else None."""
    if n.op is not Op.SLICE or n.attrs.get("step", 1) != 1:
        return None
    c = n.inputs[0]
    a = n.attrs["axis"] % n.type.rank
    if c.op is not Op.CONCAT or len(c.inputs) != 2 or c.attrs["axis"] % c.type.rank != a:
        return None
    pad, x = c.inputs
    P, L, j = pad.type.shape[a], x.type.shape[a], n.attrs["start"]
    if not isinstance(P, int) or isinstance(L, int) or not isinstance(j, int) or \
            not 0 <= j <= P or norm(n.attrs["stop"] - j) != norm(L):
        return None
    return pad, x, a, j, P


def _positions(n: Node):
    """n = [cast] iota(T) in a float dtype: T, else None."""
    if n.op is Op.CAST and n.type.dtype.is_float:
        n = n.inputs[0]
    return n.attrs["length"] if n.op is Op.IOTA else None


def _position_decay(n: Node):
    """n = L * (reshape(p, [T, 1]) - reshape(p, [1, T])) (either order), p positions of
    length T, L a float [.., 1, 1] with n of shape L's leading dims + [T, T]: (L, T)."""
    if n.op is not Op.MUL or not n.type.dtype.is_float:
        return None
    for L, d in (n.inputs, n.inputs[::-1]):
        if d.op is not Op.SUB or L.type.rank < 2 or tuple(L.type.shape[-2:]) != (1, 1):
            continue
        a, b = d.inputs
        if a.op is not Op.RESHAPE or b.op is not Op.RESHAPE or a.inputs[0] is not b.inputs[0]:
            continue
        T = _positions(a.inputs[0])
        if T is None or a.inputs[0].type.rank != 1 or \
                tuple(a.type.shape) != (T, 1) or tuple(b.type.shape) != (1, T):
            continue
        if tuple(n.type.shape) != tuple(L.type.shape[:-2]) + (T, T) or \
                L.type.dtype != n.type.dtype:
            continue
        return L, T
    return None


def _masked_after_exp(n: Node, users):
    """n = where(causal_mask, exp(x), 0), the exp read by n only: (mask, x), else None."""
    if n.op is not Op.WHERE:
        return None
    c, e, z = n.inputs
    if c.op is not Op.CAUSAL_MASK or e.op is not Op.EXP or len(users.get(e, [])) != 1:
        return None
    if const_value(z) != 0.0:
        return None
    return c, e.inputs[0]


def canonicalize(g: Graph) -> Graph:
    users = g.users()
    found = {n: m for n in g.nodes if (m := _sink_slice(n, users)) is not None}
    diff = {n: m for n in g.nodes if (m := _differential(n, users)) is not None}
    windows = {n: m for n in g.nodes if (m := _padded_window(n)) is not None}
    decays = {n: m for n in g.nodes if (m := _position_decay(n)) is not None}
    after_exp = {n: m for n in g.nodes if (m := _masked_after_exp(n, users)) is not None}
    if not found and not diff and not windows and not decays and not after_exp:
        return g
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    for n in g.nodes:
        if n in decays:        # L (t - s) = G_t - G_s, G = cumsum of L along time
            L, T = decays[n]
            L = new[L]
            mk = lambda op, ins, attrs: Node.make(op, ins, attrs, n.loc, n.scope)  # noqa: E731
            lead = tuple(L.type.shape[:-2])
            r = len(lead)
            col = mk(Op.RESHAPE, (L,), {"shape": lead + (1,)})
            per_step = mk(Op.EXPAND, (col,), {"shape": lead + (T,)})
            G = mk(Op.CUMSUM, (per_step,), {"axis": r})
            gt = mk(Op.RESHAPE, (G,), {"shape": lead + (T, 1)})
            gs = mk(Op.RESHAPE, (G,), {"shape": lead + (1, T)})
            out = mk(Op.SUB, (gt, gs), {})
            nodes += [col, per_step, G, gt, gs, out]
            new[n] = out
            continue
        if n in after_exp:     # where(mask, exp(x), 0) = exp(where(mask, x, -inf))
            c, x = (new[v] for v in after_exp[n])
            mk = lambda op, ins, attrs: Node.make(op, ins, attrs, n.loc, n.scope)  # noqa: E731
            ninf = mk(Op.CONST, (), {"value": float("-inf"), "dtype": x.type.dtype})
            w = mk(Op.WHERE, (c, x, ninf), {})
            out = mk(Op.EXP, (w,), {})
            nodes += [ninf, w, out]
            new[n] = out
            continue
        if n in windows:       # a window of [pad | x]: x shifted, the pad's tail in front
            pad, x, a, j, P = windows[n]
            pad, x = new[pad], new[x]
            if j == P:
                new[n] = x
                continue
            mk = lambda op, ins, attrs: Node.make(op, ins, attrs, n.loc, n.scope)  # noqa: E731
            head = mk(Op.SLICE, (pad,), {"axis": a, "start": j, "stop": P, "step": 1})
            cut = mk(Op.SLICE, (x,), {"axis": a, "start": 0,
                                      "stop": norm(x.type.shape[a] - (P - j)), "step": 1})
            out = mk(Op.CONCAT, (head, cut), {"axis": a})
            nodes += [head, cut, out]
            new[n] = out
            continue
        if n in diff:          # (p1 - lam p2) @ v = p1 @ v - lam (p2 @ v): one attention each
            mk = lambda op, ins, attrs=None: Node.make(op, ins, attrs or {}, n.loc,  # noqa: E731
                                                      n.scope)
            v = new[n.inputs[1]]
            out = None
            for sign, c, p in diff[n]:
                t = mk(Op.MATMUL, (new[p], v))
                nodes.append(t)
                if c is not None:
                    t = mk(Op.MUL, (new[c], t))
                    nodes.append(t)
                if out is None:
                    if sign < 0:
                        t = mk(Op.NEG, (t,))
                        nodes.append(t)
                    out = t
                else:
                    out = mk(Op.ADD if sign > 0 else Op.SUB, (out, t))
                    nodes.append(out)
            new[n] = out
            continue
        if n in found:
            s, z = (new[x] for x in found[n])
            mk = lambda op, ins, attrs=None: Node.make(op, ins, attrs or {}, n.loc,  # noqa: E731
                                                      n.scope)
            r = s.type.rank - 1
            lse = mk(Op.LOGSUMEXP, (s,), {"axis": r, "keepdim": True})
            sm = mk(Op.SOFTMAX, (s,), {"axis": r})
            gate = mk(Op.SIGMOID, (mk(Op.SUB, (lse, z)),))
            out = mk(Op.MUL, (sm, gate))
            nodes += [lse, sm, gate.inputs[0], gate, out]
            new[n] = out
            continue
        ins = tuple(new[i] for i in n.inputs)
        cur = n if ins == n.inputs else Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        new[n] = cur
        nodes.append(cur)
    from .basic import dce
    return dce(g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()}))
