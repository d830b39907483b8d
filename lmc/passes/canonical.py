"""`canonicalize`: equivalent spellings rewritten into the one form the pattern passes and the
decode pass read. Exact algebra only (same values up to rounding), so the oracle is unchanged.

Attention sinks (gpt-oss; StreamingLLM's sink logit): a learned per-head logit z that joins
every row's softmax as one more key with no value, written as a concatenation along the keys
and a slice of the probabilities back to the real keys:

    p = slice(softmax(concat([s, z], -1), -1), -1, 0, S)        z: [.., 1] on the key axis

(or the sink first: slice(softmax(concat([z, s], -1), -1), -1, 1, 1 + S)) becomes, with
lse = logsumexp(s, -1) (keepdim),

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

That decay's G_t - G_s written with unit dims: G = cumsum(x, a) over a tensor whose other
non-unit dims are lead's and whose dims after a are all 1 ([B, H, T, 1], cumsum along T),
read through views that only add, drop or move unit dims (reshapes, transposes: G -
transpose(G, -2, -1) for a [.., T, 1] G, or reshape(cumsum(x4, 2), [B, H, T]) then the
usual reshapes), as a: lead + [T, 1] minus b: lead + [1, T], becomes

    reshape(G', lead + [T, 1]) - reshape(G', lead + [1, T]),  G' = cumsum(x', len(lead))

with x' = x over lead + [T] (its unit views dropped, an expand, a fixed per-head decay's,
kept outermost): the same sums in the same order, so the same values bitwise. Views that move
a non-unit dim and a cumsum along any other axis (a unit one: no sum at all) are left alone.

An additive mask (Hugging Face's): s + where(m, 0, -inf), either operand order, the where
possibly cast between float dtypes, reshaped or expanded to broadcast (mask[None, None]) and
its condition likewise, becomes where(m, s, -inf) (s + 0 = s; a masked score is -inf either
way, and softmax's gradient there is 0 in both), the masked scores fuse_rope_attention and
the decode pass read. Only a true branch of constant 0.0 and a false branch of constant -inf
(a finite fill such as finfo.min is not the same values), and only where the sum has s's
shape and dtype (the mask broadcasts to s, never s to the mask).

A bias added after the mask (MPT's combined bias, s + (alibi + mask), once the additive mask
is rewritten; or where(m, s, -inf) + b written directly): where(m, x, -inf) + b, either order,
the where read by the sum alone, becomes where(m, x + b, -inf), the bias inside the mask where
fuse_rope_attention reads ALiBi (x + b is the unmasked sum; a masked entry is -inf + b = -inf
for every finite b, the one value change an inf or NaN bias would make), repeatedly for a chain
of biases.

RoPE with half-width tables (GPT-NeoX's and many reference implementations'): c, s of width
R/2 (cos and sin of the angles, broadcast over x's leading axes), x1 = x[..., :R/2],
x2 = x[..., R/2:],

    concat([x1*c - x2*s, x2*c + x1*s], -1)   becomes   concat([-x2, x1], -1) * S + x * C

with C = concat([c, c], -1), S likewise, pushed through cos/sin, casts and leading-unit
reshapes to the angles: C = cos(concat([a, a], -1)), the full-width table fuse_rope_attention
and the decode pass read (x1*c - x2*s = x1*c + (-x2)*s exactly, so the values are the same
bitwise; the rotated term comes first in the sum so torch lays it out as the concat was, and
the products after it stay bitwise too). The interleaved form, x1 = x[..., 0::2],
x2 = x[..., 1::2] and the two halves stacked as pairs (reshape(concat([reshape(lo,
[.., R/2, 1]), reshape(hi, [.., R/2, 1])], -1), x's shape)), becomes the interleaved
rotation with each table entry repeated twice; its halves may also be read as Meta's Llama
reads them, through x viewed as pairs: x1 = reshape(xp[..., 0:1], [.., R/2]), x2 likewise
from 1:2, xp = reshape(x, [.., R/2, 2]) (the rotation then reads those xp[..., j:j+1]).
Products in either order, the terms of a sum in either order, the minus as a subtraction or
a negation; only the two halves of one x (up to duplicate computations cse would merge),
tables exactly R/2 wide, and the same c and s in both halves.

RoPE and the kv heads' repeat computed before the heads permute, in the [B, T, H, D] layout
(Meta's Llama: rope on q, k viewed as [B, T, H, D] with tables [T, 1, R] or [1, T, 1, R],
repeat_kv's reshape(expand(reshape(k, [B, T, n, 1, D]), [B, T, n, G, D]), [B, T, n*G, D]),
then transpose(x, 1, 2)): a first step moves permute(y, [0, 2, 1, 3]) down through y, each op
rebuilt on its operands swapped the same way (rank-5 views of the last axis swap their first
three axes alike): RoPE's arithmetic on a position table (static, computed from cos or sin)
and its sums, negations, casts, slices and concats along the head dim, reshapes of the head
dim alone, expands, and the repeat (rebuilt as the [B, n, 1, T, D] -> [B, n, G, T, D] ->
[B, n*G, T, D] repeat of the swapped k); a table is laid out again by a reshape (a unit dim
moves: [T, 1, R] becomes [T, R], the table fuse_rope_attention reads); anything else (the
projection's reshape, a norm before RoPE) is permuted where RoPE reads it. Elementwise ops
on permuted operands give the same values, so q' and k' are bitwise as before (the scores'
matmul may round differently: it reads them in another memory layout). Then the rewrites
above run on that graph (a half-table RoPE so laid out is widened like any other). Only a
permute whose y nothing else reads (but the same permute) and that moves past a table
product or a repeat (a table:
computed from cos or sin and not folded to a constant; a node inside RoPE that something
else also reads stays for that reader, its work done twice).

Before all of these, a table over positions sliced to the first T rows, slice(X, a, 0, T)
with X computed from iota(N), N >= max_seq (RoPE's cos and sin precomputed for max_seq
positions, as Meta's freqs_cis[:T]; fold_constants leaves that iota unfolded), becomes X
computed from iota(T): the slice pushed through elementwise ops, casts, concats along other
axes and unit-dim reshapes down to the iota (the same values bitwise, T <= max_seq <= N at
run time): the [T, R] table the RoPE patterns and the decode pass read.

A full-width table (static: no input or parameter) made by repeating the half table after
its cos or sin (GPT-J's
repeat_interleave of sin and cos, reshape(expand(reshape(cos(a), [.., n, 1]), [.., n, 2]),
[.., 2n]), or concat([cos(a), cos(b)], -1)) becomes cos of the angles so repeated (the same
values bitwise): the cos and sin of one angles tensor the RoPE patterns read. Broadcasts
over other axes keep cos(a) at the table's size.

Keys transposed straight from the [B, T, H, D] layout, q @ permute(k, [0, 2, 3, 1]) (older
GPT-2 code), become q @ transpose(permute(k, [0, 2, 1, 3]), -2, -1), the same view, before
the step above (so RoPE and the kv repeat on k move under that heads permute too).

Likewise a cumsum (or cumprod) computed before a permute, permute(cumsum(x, a), p), becomes
cumsum(permute(x, p), p.index(a)) (an expand of x kept outermost): log-decays summed along T
in the [B, T, H] layout and then moved to [B, H, T] are the cumsum along the last axis the
decay rewrites above and fuse_linear_attention read (the same sums in the same order).
"""
from __future__ import annotations

from typing import Dict, List

from ..ir.dims import Dim, dims_equal, norm, unit_axes_only
from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from .patterns import NoMatch, const_value, static_nodes


def _sink_slice(n: Node, users: Dict[Node, List[Node]]):
    """n = slice(softmax(concat([s, z], -1), -1), -1, 0, S) as above, or its mirror with the
    sink first, slice(softmax(concat([z, s], -1), -1), -1, 1, 1 + S): (s, z), else None."""
    if n.op is not Op.SLICE or n.attrs["axis"] % n.type.rank != n.type.rank - 1 or \
            n.attrs.get("step", 1) != 1:
        return None
    sm = n.inputs[0]
    if sm.op is not Op.SOFTMAX or sm.attrs["axis"] % sm.type.rank != sm.type.rank - 1 or \
            len(users.get(sm, [])) != 1:
        return None
    c = sm.inputs[0]
    if c.op is not Op.CONCAT or len(c.inputs) != 2 or \
            c.attrs["axis"] % c.type.rank != c.type.rank - 1 or len(users.get(c, [])) != 1:
        return None
    start = n.attrs["start"]
    s, z = c.inputs if start == 0 else c.inputs[::-1]
    if start not in (0, 1) or z.type.shape[-1] != 1 or \
            norm(n.attrs["stop"]) != norm(start + s.type.shape[-1]):
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


def _unit_view(n: Node) -> bool:
    """n is a reshape or permute that only adds, drops or moves unit dims: the other dims keep
    their order, so n holds its input's values in the same row-major order."""
    if n.op is Op.RESHAPE:
        return unit_axes_only(n.type.shape, n.inputs[0].type.shape)
    if n.op is Op.PERMUTE:
        src = n.inputs[0].type.shape
        kept = [p for p in n.attrs["perm"] if not dims_equal(src[p], 1)]
        return kept == sorted(kept)
    return False


def _unit_base(n: Node) -> Node:
    while _unit_view(n):
        n = n.inputs[0]
    return n


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


def unit_decay_views(n: Node):
    """n = a - b, a: lead + [T, 1] and b: lead + [1, T] (T not 1), both views of one tensor G
    through reshapes and permutes that only add, drop or move unit dims, G's non-unit dims
    lead's then T: (G, lead, T), else None. (fuse_linear_attention reads it to say why such a
    difference is not a decay when G is not a cumsum along T.)"""
    if n.op is not Op.SUB or not n.type.dtype.is_float or n.type.rank < 2:
        return None
    a, b = n.inputs
    if a.type.rank != n.type.rank or b.type.rank != n.type.rank:
        return None
    T, lead = a.type.shape[-2], tuple(a.type.shape[:-2])
    if dims_equal(T, 1) or not dims_equal(a.type.shape[-1], 1) or \
            not _same_shape(b.type.shape, lead + (1, T)):
        return None
    G = _unit_base(a)
    if G is not _unit_base(b) or not unit_axes_only(G.type.shape, lead + (T,)):
        return None
    return G, lead, T


def is_time_cumsum(G: Node, T) -> bool:
    """G = cumsum(x, a) with x's dim a of length T and every dim after it 1 (so a is the last
    non-unit dim: the one a view of G as lead + [T] calls time)."""
    if G.op is not Op.CUMSUM:
        return False
    ax, shape = G.attrs["axis"], G.type.shape
    return dims_equal(shape[ax], T) and all(dims_equal(d, 1) for d in shape[ax + 1:])


def _unit_decay(n: Node):
    """n = G_t - G_s written with unit dims, G = cumsum along T (module docstring), not
    already the canonical reshape(G, lead + [T, 1]) - reshape(G, lead + [1, T]) of a
    lead + [T] G: (G, lead, T), else None."""
    m = unit_decay_views(n)
    if m is None or not is_time_cumsum(m[0], m[2]):
        return None
    G, lead, T = m
    a, b = n.inputs
    if a.op is Op.RESHAPE and b.op is Op.RESHAPE and a.inputs[0] is G and b.inputs[0] is G \
            and _same_shape(G.type.shape, lead + (T,)):
        return None
    return m


def _squeezed(x: Node, target: tuple, new: Dict[Node, Node], mk) -> Node:
    """x (non-unit dims target's) as a tensor of shape target: x behind its unit views, an
    expand kept outermost (expand(reshape(y, ..), target): a fixed per-head decay stays the
    broadcast fuse_linear_attention reads as one), else a reshape of it."""
    x = _unit_base(x)
    if _same_shape(x.type.shape, target):
        return new[x]
    if x.op is Op.EXPAND:
        y, S = x.inputs[0], tuple(x.type.shape)
        ys = (1,) * (len(S) - y.type.rank) + tuple(y.type.shape)
        src = iter([i for i, d in enumerate(S) if not dims_equal(d, 1)])
        inner = tuple(1 if dims_equal(d, 1) else ys[next(src)] for d in target)
        return mk(Op.EXPAND, (_squeezed(y, inner, new, mk),), {"shape": target})
    return mk(Op.RESHAPE, (new[x],), {"shape": target})


def _broadcast_only(n: Node) -> Node:
    """n without views that only broadcast it (an expand; a reshape that adds or drops leading
    unit dims): against an operand it broadcasts to, the same values."""
    while True:
        if n.op is Op.EXPAND:
            n = n.inputs[0]
        elif n.op is Op.RESHAPE and _no_leading_ones(n.type.shape) == _no_leading_ones(
                n.inputs[0].type.shape):
            n = n.inputs[0]
        else:
            return n


def _no_leading_ones(shape) -> tuple:
    shape = [norm(d) for d in shape]
    while shape and dims_equal(shape[0], 1):
        shape.pop(0)
    return tuple(shape)


def _broadcasts(small, big) -> bool:
    """A tensor of shape `small` broadcasts to `big` (and is no wider)."""
    return len(small) <= len(big) and all(
        dims_equal(a, 1) or dims_equal(a, b) for a, b in zip(small[::-1], big[::-1]))


def _masked_sum(n: Node, users, masked: set, outs: set):
    """n = w + b or b + w, w = where(m, x, -inf) (or a node canonicalize rewrites into one:
    in `masked`) read by n alone (not a graph output), b of n's dtype and not itself masked:
    (w, b), else None."""
    if n.op is not Op.ADD or not n.type.dtype.is_float:
        return None
    for w, b in (n.inputs, n.inputs[::-1]):
        if b.type.dtype != n.type.dtype or b in masked or len(users.get(w, [])) != 1 or \
                w in outs:
            continue
        if w in masked or (w.op is Op.WHERE and w.type.dtype == n.type.dtype and
                           const_value(w.inputs[2]) == float("-inf")):
            return w, b
    return None


def _additive_mask(n: Node):
    """n = s + where(m, 0, -inf) (either order; the where possibly cast between float dtypes,
    reshaped or expanded to broadcast, and m likewise), n of s's shape and dtype: (m, s) with
    the views stripped, else None."""
    if n.op is not Op.ADD or not n.type.dtype.is_float:
        return None
    for s, w in (n.inputs, n.inputs[::-1]):
        while True:
            w = _broadcast_only(w)
            if w.op is Op.CAST and w.type.dtype.is_float and w.inputs[0].type.dtype.is_float:
                w = w.inputs[0]      # 0 and -inf are exact in every float dtype
                continue
            break
        if w.op is not Op.WHERE or s.type.dtype != n.type.dtype or \
                len(s.type.shape) != len(n.type.shape) or \
                not all(dims_equal(a, b) for a, b in zip(s.type.shape, n.type.shape)):
            continue
        m, zero, fill = w.inputs
        if const_value(zero) != 0.0 or const_value(fill) != float("-inf"):
            continue
        m = _broadcast_only(m)
        if _broadcasts(tuple(m.type.shape), tuple(n.type.shape)):
            return m, s
    return None


# -- RoPE with half-width tables -------------------------------------------------------------
def _classes(g: Graph) -> Dict[Node, Node]:
    """Each node's representative among the nodes computing the same thing (cse's key: op,
    inputs' representatives, attrs), before cse has merged them: x[..., :R/2] written twice,
    or one table computed per use, count as one."""
    from .basic import _freeze
    rep: Dict[Node, Node] = {}
    seen: Dict[tuple, Node] = {}
    for n in g.nodes:
        rep[n] = n
        if n.op in (Op.INPUT, Op.PARAM, Op.BLOCK, Op.FUSED):
            continue
        key = (n.op, tuple(id(rep[i]) for i in n.inputs),
               tuple(sorted((k, _freeze(v)) for k, v in n.attrs.items())))
        try:
            rep[n] = seen.setdefault(key, n)
        except TypeError:    # an unhashable attr: itself only
            pass
    return rep


def _products(a: Node, sign: int = 1):
    """a = a sum or difference of products u * t (negations anywhere: on a product or on a
    factor): [(sign, [(u, t), (t, u)])] per product, both operand orders, else None."""
    if a.op in (Op.ADD, Op.SUB):
        left = _products(a.inputs[0], sign)
        right = _products(a.inputs[1], sign if a.op is Op.ADD else -sign)
        return None if left is None or right is None else left + right
    if a.op is Op.NEG:
        return _products(a.inputs[0], -sign)
    if a.op is not Op.MUL:
        return None
    u, t = a.inputs
    if u.op is Op.NEG:
        u, sign = u.inputs[0], -sign
    if t.op is Op.NEG:
        t, sign = t.inputs[0], -sign
    return [(sign, a, [(u, t), (t, u)])]


def _rope_half_base(u: Node):
    """A half _half_rope accepted: (x, None) for x[..., j::step], (x, xp[..., j:j+1]) for
    Meta's reshape(xp[..., j:j+1], [.., R/2]) with xp = reshape(x, [.., R/2, 2])."""
    if u.op is Op.SLICE:
        return u.inputs[0], None
    return u.inputs[0].inputs[0].inputs[0], u.inputs[0]


def _half_rope(n: Node, rep: Dict[Node, Node]):
    """n = rope(x) with half-width tables c, s ([.., R/2], broadcast over x's leading axes):

        rotate-half:  concat([x1*c - x2*s, x2*c + x1*s], -1)       x1, x2 = x[:R/2], x[R/2:]
        interleaved:  reshape(concat([reshape(x1*c - x2*s, [.., R/2, 1]),
                                      reshape(x2*c + x1*s, [.., R/2, 1])], -1), x's shape)
                                                                  x1, x2 = x[0::2], x[1::2]
                      (or x1 = reshape(xp[..., 0:1], [.., R/2]), x2 from 1:2,
                       xp = reshape(x, [.., R/2, 2]): Meta's Llama)

    (products in either order, the terms of each sum in either order, the minus as a
    subtraction or a negation): (interleaved, x1, x2, c, s), else None."""
    interleaved = n.op is Op.RESHAPE
    c = n.inputs[0] if interleaved else n
    if c.op is not Op.CONCAT or len(c.inputs) != 2 or \
            c.attrs["axis"] % c.type.rank != c.type.rank - 1:
        return None
    lo, hi = c.inputs
    if interleaved:
        if lo.op is not Op.RESHAPE or hi.op is not Op.RESHAPE or \
                tuple(c.type.shape[-1:]) != (2,) or \
                tuple(lo.type.shape) != tuple(lo.inputs[0].type.shape) + (1,) or \
                tuple(hi.type.shape) != tuple(hi.inputs[0].type.shape) + (1,):
            return None
        lo, hi = lo.inputs[0], hi.inputs[0]
    R = n.type.shape[-1]
    if not isinstance(R, int) or R % 2 or lo.type != hi.type or \
            tuple(lo.type.shape) != tuple(n.type.shape[:-1]) + (R // 2,):
        return None
    first, second = _products(lo), _products(hi)
    if first is None or second is None or len(first) != 2 or len(second) != 2 or \
            sorted(sg for sg, _, _ in first) != [-1, 1] or \
            [sg for sg, _, _ in second] != [1, 1]:
        return None
    starts, step = ((0, 1), 2) if interleaved else ((0, R // 2), 1)

    def half(u, start):       # u = x[..., start::step] (R/2 of x's R last entries): x
        if interleaved and u.op is Op.RESHAPE and u.type == lo.type:
            # Meta's pairs: reshape(reshape(x, [.., R/2, 2])[..., j:j+1], [.., R/2])
            p = u.inputs[0]
            if p.op is not Op.SLICE or p.attrs["axis"] % p.type.rank != p.type.rank - 1 or \
                    p.attrs.get("step", 1) != 1 or p.attrs.get("start", 0) != start or \
                    tuple(p.type.shape) != tuple(lo.type.shape) + (1,) or \
                    p.inputs[0].op is not Op.RESHAPE or \
                    tuple(p.inputs[0].type.shape) != tuple(lo.type.shape) + (2,):
                return None
            u = p.inputs[0]
        elif u.op is not Op.SLICE or u.attrs["axis"] % u.type.rank != u.type.rank - 1 or \
                u.attrs.get("step", 1) != step or u.attrs.get("start", 0) != start or \
                u.type != lo.type:
            return None
        x = u.inputs[0]
        return x if tuple(x.type.shape) == tuple(n.type.shape) and \
            x.type.dtype == n.type.dtype else None

    def table(t):             # [.., R/2], broadcasting to the halves
        return t.type.shape[-1] == R // 2 and t.type.rank <= lo.type.rank and \
            _broadcasts(tuple(t.type.shape), tuple(lo.type.shape))

    def read(terms):          # {(sign, which half, table rep)} per operand order choice
        out = []
        for sg, prod, orders in terms:
            if prod.type != lo.type:
                return []
            opts = []
            for u, t in orders:
                for i, start in enumerate(starts):
                    x = half(u, start)
                    if x is not None and table(t):
                        opts.append((sg, i, rep[x], u, t))
            out.append(opts)
        return out
    a, b = read(first), read(second)
    if len(a) != 2 or len(b) != 2:
        return None
    # x1*c - x2*s, then x2*c + x1*s: the same x, c and s (up to cse) in all four products
    for p in a[0]:
        for q in a[1]:
            plus, minus = (p, q) if p[0] > 0 else (q, p)
            if plus[0] != 1 or minus[0] != -1 or plus[1] != 0 or minus[1] != 1 or \
                    plus[2] is not minus[2]:
                continue
            x1, cos, x2, sin = plus[3], plus[4], minus[3], minus[4]
            if rep[cos] is rep[sin] or cos.type != sin.type:
                continue
            want = {(1, rep[x2], rep[cos]), (0, rep[x1], rep[sin])}
            for r in b[0]:
                for w in b[1]:
                    if r[2] is plus[2] and w[2] is plus[2] and \
                            {(r[1], rep[r[3]], rep[r[4]]), (w[1], rep[w[3]], rep[w[4]])} == want:
                        return interleaved, x1, x2, cos, sin
    return None


_ARITH = (Op.ADD, Op.SUB, Op.MUL, Op.DIV)


def _swap_perm(rank: int) -> tuple:
    return (0, 2, 1) + tuple(range(3, rank))


def _swap_dims(shape) -> tuple:
    return (shape[0], shape[2], shape[1]) + tuple(shape[3:])


def _same_lead(a: Node, b: Node) -> bool:
    return a.type.rank == b.type.rank and all(
        dims_equal(x, y) for x, y in zip(a.type.shape[:3], b.type.shape[:3]))


def _head_repeat(m: Node):
    """m = reshape(expand(reshape(s, [B, T, n, 1, D]), [B, T, n, G, D]), [B, T, n*G, D]),
    the heads of s each repeated G times (Meta's repeat_kv): s, else None."""
    if m.op is not Op.RESHAPE or m.type.rank != 4 or m.inputs[0].op is not Op.EXPAND:
        return None
    e = m.inputs[0]
    r = e.inputs[0]
    if r.op is not Op.RESHAPE or r.inputs[0].type.rank != 4:
        return None
    s = r.inputs[0]
    b, t, n, d = s.type.shape
    G = e.type.shape[3]
    ok = _same_shape(r.type.shape, (b, t, n, 1, d)) and _same_shape(
        e.type.shape, (b, t, n, G, d)) and _same_shape(m.type.shape, (b, t, norm(n * G), d))
    return s if ok else None


def _sink_heads_permutes(g: Graph) -> Graph:
    """permute(y, [0, 2, 1, 3]) over RoPE and a repeat of the kv heads computed in the
    [B, T, H, D] layout (as Meta's Llama computes them) becomes the same computation on
    permute(x, [0, 2, 1, 3]) of the tensors they read: see the module docstring."""
    users = g.users()
    outs = set(g.outputs.values())
    static = static_nodes(g)
    table: Dict[Node, bool] = {}      # static, computed from cos or sin: a position table
    rotary: Dict[Node, bool] = {}     # arithmetic on such a table (x * cos, their sum, ...)
    for n in g.nodes:
        table[n] = static[n] and (n.op in (Op.COS, Op.SIN) or any(table[i] for i in n.inputs))
        rotary[n] = n.op in _ARITH and not static[n] and any(
            table[i] or rotary[i] for i in n.inputs)

    def rewrite(n: Node, new: Dict[Node, Node], mk):
        y = n.inputs[0] if n.inputs else None
        if n.op is Op.PERMUTE and n.type.rank == 4 and tuple(n.attrs["perm"]) == \
                _swap_perm(4) and y not in outs and all(   # (several: cse merges them)
                    u.op is Op.PERMUTE and u.attrs["perm"] == n.attrs["perm"]
                    for u in users.get(y, [])):
            memo: Dict[Node, Node] = {}
            gain = [0]

            def relay(o: Node, like: Node) -> Node:
                """o, an operand broadcast against `like`, laid out for swap(like)."""
                r = like.type.rank
                po = (1,) * (r - o.type.rank) + tuple(o.type.shape)
                if all(dims_equal(d, 1) for d in po[:3]):
                    return new[o]                   # broadcasts along both: as it is
                target = _swap_dims(po)
                if dims_equal(po[1], 1) or dims_equal(po[2], 1):    # a unit dim moves
                    shape = _no_leading_ones(target)
                    base = o.inputs[0] if o.op is Op.RESHAPE else o
                    if _same_shape(base.type.shape, shape):
                        return new[base]
                    return mk(Op.RESHAPE, (new[base],), {"shape": shape}, o)
                full = new[o] if o.type.rank == r else mk(Op.RESHAPE, (new[o],),
                                                          {"shape": po}, o)
                return mk(Op.PERMUTE, (full,), {"perm": _swap_perm(r)}, o)

            def swap(m: Node) -> Node:
                """A node equal to permute(m, [0, 2, 1, 3, ..]) (m of rank >= 4)."""
                if m in memo:
                    return memo[m]
                r, op = m.type.rank, m.op
                src = _head_repeat(m)
                if src is not None:         # the repeat of swap(src)'s heads, [B, n*G, T, D]
                    b, t, n_, d = src.type.shape
                    G = m.inputs[0].type.shape[3]
                    x = mk(Op.RESHAPE, (swap(src),), {"shape": (b, n_, 1, t, d)}, m.inputs[0])
                    x = mk(Op.EXPAND, (x,), {"shape": (b, n_, G, t, d)}, m.inputs[0])
                    out = mk(Op.RESHAPE, (x,), {"shape": _swap_dims(m.type.shape)}, m)
                    gain[0] += 1
                elif op is Op.EXPAND and m.inputs[0].type.rank == r:
                    out = mk(op, (swap(m.inputs[0]),), {"shape": _swap_dims(m.type.shape)}, m)
                    gain[0] += not dims_equal(m.inputs[0].type.shape[2], m.type.shape[2])
                elif op in _ARITH and rotary[m]:
                    ins = tuple(swap(i) if _same_lead(i, m) and not table[i] else
                                relay(i, m) for i in m.inputs)
                    out = mk(op, ins, m.attrs, m)
                    gain[0] += any(table[i] for i in m.inputs)
                elif op in (Op.NEG, Op.CAST) or (op in (Op.SLICE, Op.CONCAT)
                                                 and m.attrs["axis"] >= 3):
                    out = mk(op, tuple(swap(i) for i in m.inputs), m.attrs, m)
                elif op is Op.RESHAPE and m.inputs[0].type.rank >= 4 and \
                        all(dims_equal(a, b) for a, b in zip(m.inputs[0].type.shape[:3],
                                                           m.type.shape[:3])):
                    out = mk(op, (swap(m.inputs[0]),), {"shape": _swap_dims(m.type.shape)}, m)
                elif op is Op.PERMUTE and tuple(m.attrs["perm"]) == _swap_perm(r):
                    out = new[m.inputs[0]]              # swapped twice: as it was
                else:
                    out = mk(Op.PERMUTE, (new[m],), {"perm": _swap_perm(r)}, m)
                memo[m] = out
                return out
            out = swap(y)
            return out if gain[0] else None
        return None
    return _rebuild(g, rewrite)


def _split_key_permutes(g: Graph) -> Graph:
    """k^T taken straight from the [B, T, H, D] layout, q @ permute(k, [0, 2, 3, 1]) (older
    GPT-2 code splits the keys' heads so), becomes q @ transpose(permute(k, [0, 2, 1, 3]),
    -2, -1): the same view, as the heads permute and the transpose the attention patterns
    (and the step above, for RoPE on k) read."""
    def rewrite(n: Node, new: Dict[Node, Node], mk):
        if n.op is not Op.MATMUL or n.inputs[1].op is not Op.PERMUTE or \
                n.inputs[1].type.rank != 4 or tuple(n.inputs[1].attrs["perm"]) != (0, 2, 3, 1):
            return None
        kt = n.inputs[1]
        heads = mk(Op.PERMUTE, (new[kt.inputs[0]],), {"perm": (0, 2, 1, 3)}, kt)
        t = mk(Op.PERMUTE, (heads,), {"perm": (0, 1, 3, 2)}, kt)
        return mk(Op.MATMUL, (new[n.inputs[0]], t), n.attrs)
    return _rebuild(g, rewrite)


def _permuted_cumsums(g: Graph) -> Graph:
    """permute(cumsum(x, a), p) becomes cumsum(permute(x, p), p.index(a)) (cumprod alike; an
    expand of x stays outermost, expand(permute(y, p)), as a fixed per-head decay's): a
    decay summed along T in the [B, T, H] layout and then moved to [B, H, T] is the cumsum of
    log-decays along the last axis that fuse_linear_attention reads and the decode pass keeps
    a constant state for. The same sums in the same order: bitwise. Only a cumsum read by
    that permute alone."""
    users = g.users()
    outs = set(g.outputs.values())

    def rewrite(n: Node, new: Dict[Node, Node], mk):
        c = n.inputs[0] if n.op is Op.PERMUTE else None
        if c is None or c.op not in (Op.CUMSUM, Op.CUMPROD) or len(users[c]) != 1 or \
                c in outs:
            return None
        perm = tuple(n.attrs["perm"])
        x = c.inputs[0]
        if x.op is Op.EXPAND and x.inputs[0].type.rank == x.type.rank:
            # an expand stays outermost (a fixed per-head decay's broadcast is read as one)
            y = mk(Op.PERMUTE, (new[x.inputs[0]],), {"perm": perm}, x)
            x = mk(Op.EXPAND, (y,), {"shape": tuple(x.type.shape[p] for p in perm)}, x)
        else:
            x = mk(Op.PERMUTE, (new[x],), {"perm": perm}, x)
        return mk(c.op, (x,), {**c.attrs, "axis": perm.index(c.attrs["axis"])}, c)
    return _rebuild(g, rewrite)


def _position_slices(g: Graph) -> Graph:
    """slice(X, a, 0, T), X [.., N, ..] computed from positions iota(N) (a static table, say
    cos and sin over max_seq positions, as Meta's freqs_cis[:T] reads them), becomes X
    computed from iota(T): the slice pushed through X's elementwise ops, casts, concats along
    other axes and reshapes that only add or drop unit dims, down to the iota. The same
    values bitwise for T <= N (the table's first T rows); the table the RoPE patterns and the
    decode pass read. Only where N is at least the model's max_seq (`basic.first_rows`; the
    runtime refuses T > max_seq, so the table is never extended past its N rows).
    fold_constants leaves such an iota unfolded; anything else under the slice (a folded
    constant along a) and the slice stays."""
    from .basic import first_rows

    def rewrite(n: Node, new: Dict[Node, Node], mk):
        if first_rows(n, g) is None:
            return None
        stop = n.attrs["stop"]
        memo: Dict[tuple, Node] = {}

        def cut(m: Node, a: int) -> Node:
            """A node equal to slice(m, a, 0, stop)."""
            key = (m, a)
            if key in memo:
                return memo[key]
            N = m.type.shape[a]
            if not isinstance(N, int):
                raise NoMatch("not a static length")
            if m.op is Op.IOTA:
                out = mk(Op.IOTA, (), {**m.attrs, "length": stop}, m)
            elif m.op.kind is Kind.POINTWISE:
                ins = []
                for i in m.inputs:
                    ai = a - (m.type.rank - i.type.rank)
                    if ai < 0 or dims_equal(i.type.shape[ai], 1):
                        ins.append(new[i])        # broadcast along a: as it is
                    else:
                        ins.append(cut(i, ai))
                out = mk(m.op, tuple(ins), m.attrs, m)
            elif m.op is Op.CONCAT and m.attrs["axis"] != a:
                out = mk(m.op, tuple(cut(i, a) for i in m.inputs), m.attrs, m)
            elif m.op is Op.RESHAPE:
                src, dst = tuple(m.inputs[0].type.shape), tuple(m.type.shape)
                big = [i for i, d in enumerate(dst) if not dims_equal(d, 1)]
                big_in = [i for i, d in enumerate(src) if not dims_equal(d, 1)]
                if [dst[i] for i in big] != [src[i] for i in big_in] or a not in big:
                    raise NoMatch("a reshape that does more than add or drop unit dims")
                shape = dst[:a] + (stop,) + dst[a + 1:]
                out = mk(Op.RESHAPE, (cut(m.inputs[0], big_in[big.index(a)]),),
                         {"shape": shape}, m)
            else:
                raise NoMatch(f"{m.op.value} under the slice")
            memo[key] = out
            return out
        try:
            return cut(n.inputs[0], n.attrs["axis"])
        except NoMatch:
            return None
    return _rebuild(g, rewrite)


def _trig_of(x: Node):
    """x = reshape(..(f(a))) with f cos or sin, the reshapes only: (f node, the reshapes
    outermost first), else None."""
    views = []
    while x.op is Op.RESHAPE:
        views.append(x)
        x = x.inputs[0]
    return (x, views) if x.op in (Op.COS, Op.SIN) else None


def _repeated_tables(g: Graph) -> Graph:
    """A table whose entries are repeated after its cos or sin (GPT-J's repeat_interleave of
    sin and cos: reshape(expand(reshape(cos(a), [.., n, 1]), [.., n, 2]), [.., 2n]); or
    concat([cos(a), cos(b)], -1)) becomes cos of the angles so repeated, cos(reshape(expand(
    reshape(a, ..)))) or cos(concat([a, b], -1)): the same values bitwise, and the cos / sin
    of one angles tensor the RoPE patterns read. Tables only (computed from no input or
    parameter)."""
    static = static_nodes(g)

    def rewrite(n: Node, new: Dict[Node, Node], mk):
        if not static[n]:
            return None
        if n.op is Op.RESHAPE and n.inputs[0].op is Op.EXPAND:
            e = n.inputs[0]
            got = _trig_of(e.inputs[0])
            es, xs = tuple(e.type.shape), tuple(e.inputs[0].type.shape)
            if got is None or len(es) != len(xs) or not _same_shape(es[:-1], xs[:-1]) or \
                    not dims_equal(xs[-1], 1) or not _same_shape(
                        n.type.shape, es[:-2] + (norm(es[-2] * es[-1]),)):
                return None          # only a repeat of each entry along the last axis
            f, views = got
            y = new[f.inputs[0]]
            for v in reversed(views):
                y = mk(Op.RESHAPE, (y,), v.attrs, v)
            y = mk(Op.RESHAPE, (mk(Op.EXPAND, (y,), e.attrs, e),), n.attrs)
            return mk(f.op, (y,), f.attrs, f)
        if n.op is Op.CONCAT and n.attrs["axis"] == n.type.rank - 1:
            got = [_trig_of(i) for i in n.inputs]
            if any(t is None or t[1] or t[0].op is not got[0][0].op for t in got):
                return None
            y = mk(Op.CONCAT, tuple(new[t[0].inputs[0]] for t in got), n.attrs)
            return mk(got[0][0].op, (y,), got[0][0].attrs, got[0][0])
        return None
    return _rebuild(g, rewrite)


def _rebuild(g: Graph, rewrite) -> Graph:
    """g with each node n for which rewrite(n, new, mk) gives a node replaced by it (new: the
    rebuilt nodes so far, by original; mk(op, inputs, attrs={}, src=n) makes a node, placed
    before the replacement, with src's YAML place and scope), then dce; g itself when none
    is. Every step of canonicalize is such a rewrite."""
    new: Dict[Node, Node] = {}
    nodes: List[Node] = []
    changed = False
    for n in g.nodes:
        made: List[Node] = []

        def mk(op, ins, attrs=None, src=n, made=made):
            made.append(Node.make(op, ins, dict(attrs or {}), src.loc, src.scope))
            return made[-1]
        out = rewrite(n, new, mk)
        if out is not None:
            nodes += made
            new[n] = out
            changed = True
            continue
        ins = tuple(new[i] for i in n.inputs)
        cur = n if ins == n.inputs else Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        new[n] = cur
        nodes.append(cur)
    if not changed:
        return g
    from .basic import dce
    return dce(g.with_nodes(nodes, {k: new[v] for k, v in g.outputs.items()}))


def canonicalize(g: Graph) -> Graph:
    return _rewrite(_permuted_cumsums(_sink_heads_permutes(_split_key_permutes(
        _repeated_tables(_position_slices(g))))))


def _rewrite(g: Graph) -> Graph:
    users = g.users()
    found = {n: m for n in g.nodes if (m := _sink_slice(n, users)) is not None}
    diff = {n: m for n in g.nodes if (m := _differential(n, users)) is not None}
    windows = {n: m for n in g.nodes if (m := _padded_window(n)) is not None}
    decays = {n: m for n in g.nodes if (m := _position_decay(n)) is not None}
    unit_decays = {n: m for n in g.nodes if (m := _unit_decay(n)) is not None}
    after_exp = {n: m for n in g.nodes if (m := _masked_after_exp(n, users)) is not None}
    additive = {n: m for n in g.nodes if (m := _additive_mask(n)) is not None}
    masked, masked_sums, outs = set(additive), {}, set(g.outputs.values())
    for n in g.nodes:           # in order: a chain of biases after the mask, each in turn
        if n not in additive and (m := _masked_sum(n, users, masked, outs)) is not None:
            masked_sums[n] = m
            masked.add(n)
    rep = _classes(g)
    ropes = {n: m for n in g.nodes if n.op in (Op.CONCAT, Op.RESHAPE) and
             (m := _half_rope(n, rep)) is not None}
    if not found and not diff and not windows and not decays and not after_exp and \
            not additive and not ropes and not unit_decays and not masked_sums:
        return g
    wide: Dict[tuple, Node] = {}

    def widen(t: Node, pairs: bool, mk) -> Node:
        """concat([t, t], -1) (pairs: each entry twice, interleaved), pushed through the
        elementwise ops and leading-unit reshapes over t's angles: cos(concat([a, a], -1)),
        the full-width table fuse_rope_attention reads."""
        key = (t, pairs)
        if key in wide:
            return wide[key]
        shape = tuple(t.type.shape)
        full = shape[:-1] + (2 * shape[-1],)
        if t.op in (Op.COS, Op.SIN, Op.NEG, Op.CAST) and t.inputs[0].type.rank >= 1 and \
                t.inputs[0].type.shape[-1] == shape[-1]:
            out = mk(t.op, (widen(t.inputs[0], pairs, mk),), t.attrs)
        elif t.op is Op.RESHAPE and t.inputs[0].type.rank >= 1 and \
                t.inputs[0].type.shape[-1] == shape[-1] and \
                _no_leading_ones(shape) == _no_leading_ones(t.inputs[0].type.shape):
            out = mk(Op.RESHAPE, (widen(t.inputs[0], pairs, mk),), {"shape": full})
        elif pairs:
            col = mk(Op.RESHAPE, (t,), {"shape": shape + (1,)})
            out = mk(Op.RESHAPE, (mk(Op.CONCAT, (col, col), {"axis": len(shape)}),),
                     {"shape": full})
        else:
            out = mk(Op.CONCAT, (t, t), {"axis": len(shape) - 1})
        wide[key] = out
        return out

    def rewrite(n: Node, new: Dict[Node, Node], mk):
        if n in ropes:         # x*C + rot(x)*S, C and S the half tables each entry twice
            pairs, x1, x2, c, s = ropes[n]
            base = _rope_half_base(x1)[0]
            x = new[base]
            C, S = widen(new[c], pairs, mk), widen(new[s], pairs, mk)
            if pairs:       # (-x[2i+1], x[2i]) per pair, each half a [.., R/2, 1] column
                col = tuple(x1.type.shape) + (1,)

                def column(u, neg):  # the column fuse_rope_attention reads as that half
                    y, pair = _rope_half_base(u)
                    if pair is None:             # x[..., j::2]
                        h = new[u] if y is base else mk(Op.SLICE, (x,), u.attrs)
                        if neg:
                            h = mk(Op.NEG, (h,), {})
                        return mk(Op.RESHAPE, (h,), {"shape": col})
                    h = new[pair] if y is base else mk(Op.SLICE, (mk(
                        Op.RESHAPE, (x,), {"shape": tuple(pair.inputs[0].type.shape)}),),
                        pair.attrs)              # xp[..., j:j+1], xp = x as pairs
                    return mk(Op.NEG, (h,), {}) if neg else h
                rot = mk(Op.RESHAPE, (mk(Op.CONCAT, (column(x2, True), column(x1, False)),
                                         {"axis": len(col) - 1}),),
                         {"shape": tuple(x.type.shape)})
            else:
                h1 = new[x1]
                h2 = new[x2] if x2.inputs[0] is x1.inputs[0] else mk(Op.SLICE, (x,), x2.attrs)
                rot = mk(Op.CONCAT, (mk(Op.NEG, (h2,), {}), h1), {"axis": x.type.rank - 1})
            # rot(x) * S first: the sum is laid out as that contiguous operand (as the
            # concat was), not as x (often a permuted view): the product with it after
            # then runs the same matmul, so the torch backend's forward stays bitwise
            out = mk(Op.ADD, (mk(Op.MUL, (rot, S), {}), mk(Op.MUL, (x, C), {})), {})
            return out
        if n in decays:        # L (t - s) = G_t - G_s, G = cumsum of L along time
            L, T = decays[n]
            L = new[L]
            lead = tuple(L.type.shape[:-2])
            r = len(lead)
            col = mk(Op.RESHAPE, (L,), {"shape": lead + (1,)})
            per_step = mk(Op.EXPAND, (col,), {"shape": lead + (T,)})
            G = mk(Op.CUMSUM, (per_step,), {"axis": r})
            gt = mk(Op.RESHAPE, (G,), {"shape": lead + (T, 1)})
            gs = mk(Op.RESHAPE, (G,), {"shape": lead + (1, T)})
            out = mk(Op.SUB, (gt, gs), {})
            return out
        if n in unit_decays:   # G_t - G_s over unit dims: the same cumsum over lead + [T]
            G, lead, T = unit_decays[n]
            cum = mk(Op.CUMSUM, (_squeezed(G.inputs[0], lead + (T,), new, mk),),
                     {"axis": len(lead)})
            out = mk(Op.SUB, (mk(Op.RESHAPE, (cum,), {"shape": lead + (T, 1)}),
                              mk(Op.RESHAPE, (cum,), {"shape": lead + (1, T)})), {})
            return out
        if n in additive:      # s + where(m, 0, -inf) = where(m, s, -inf)
            m, s = (new[v] for v in additive[n])
            ninf = mk(Op.CONST, (), {"value": float("-inf"), "dtype": s.type.dtype})
            out = mk(Op.WHERE, (m, s, ninf), {})
            return out
        w = new[masked_sums[n][0]] if n in masked_sums else None
        if w is not None and w.op is Op.WHERE:   # where(m, x, -inf) + b = where(m, x + b, -inf)
            m, x, fill = w.inputs
            b = new[masked_sums[n][1]]
            total = mk(Op.ADD, (x, b) if n.inputs[0] is masked_sums[n][0] else (b, x), {})
            out = mk(Op.WHERE, (m, total, fill), {})
            return out
        if n in after_exp:     # where(mask, exp(x), 0) = exp(where(mask, x, -inf))
            c, x = (new[v] for v in after_exp[n])
            ninf = mk(Op.CONST, (), {"value": float("-inf"), "dtype": x.type.dtype})
            w = mk(Op.WHERE, (c, x, ninf), {})
            out = mk(Op.EXP, (w,), {})
            return out
        if n in windows:       # a window of [pad | x]: x shifted, the pad's tail in front
            pad, x, a, j, P = windows[n]
            pad, x = new[pad], new[x]
            if j == P:
                return x
            head = mk(Op.SLICE, (pad,), {"axis": a, "start": j, "stop": P, "step": 1})
            cut = mk(Op.SLICE, (x,), {"axis": a, "start": 0,
                                      "stop": norm(x.type.shape[a] - (P - j)), "step": 1})
            out = mk(Op.CONCAT, (head, cut), {"axis": a})
            return out
        if n in diff:          # (p1 - lam p2) @ v = p1 @ v - lam (p2 @ v): one attention each
            v = new[n.inputs[1]]
            out = None
            for sign, c, p in diff[n]:
                t = mk(Op.MATMUL, (new[p], v))
                if c is not None:
                    t = mk(Op.MUL, (new[c], t))
                if out is None:
                    if sign < 0:
                        t = mk(Op.NEG, (t,))
                    out = t
                else:
                    out = mk(Op.ADD if sign > 0 else Op.SUB, (out, t))
            return out
        if n in found:
            s, z = (new[x] for x in found[n])
            r = s.type.rank - 1
            lse = mk(Op.LOGSUMEXP, (s,), {"axis": r, "keepdim": True})
            sm = mk(Op.SOFTMAX, (s,), {"axis": r})
            gate = mk(Op.SIGMOID, (mk(Op.SUB, (lse, z)),))
            out = mk(Op.MUL, (sm, gate))
            return out
        return None
    return _rebuild(g, rewrite)
