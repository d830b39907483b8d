"""The decode pass: from a forward graph, the step graph with explicit state.

The step graph consumes T new tokens after P already processed ones (T = prompt length for
prefill, 1 for a decode step: one graph serves both) and returns the logits of the new tokens
and the new state. Symbols: B, T (new tokens), P (past tokens); keys span S = P + T positions.

How it is derived, with no knowledge of blocks or model names:

1. Time labels. Every axis of every tensor whose size is the symbolic T is labelled: "q" (one
   entry per current token: everything computed position by position), "k" (one entry per
   key position: the second time axis of a [.., T, T] tensor such as attention scores or a
   decay mask), or "f" (time flattened into another axis, as in [B*T, d]). Sources: the token
   input and `iota(T)` are "q"; `causal_mask(T)` is ("q", "k"); a matmul or broadcast whose
   result has two "q" axes makes the later one "k". An edge where a "q" axis of an input lands
   on a "k" axis of the result is a *key use*: the consumer needs the input at every position.
2. Position-wise ops are copied as they are. `iota(T)` becomes the absolute positions of the
   new tokens, the i64 input `decode.pos` = P + arange(T) that the runtime supplies.
3. A key use reads the key-side version of its input: recomputed over all key positions when
   the input depends on no token (RoPE tables, fixed decays); reached through layout ops
   (permute, reshape, expand, cast, concat off the time axis) and through a projection by a
   parameter that widens the value (so MLA caches its latent [c_KV | k_R] and GQA its n_kv
   heads; a widening projection only where `absorb` then moves it onto the query or the
   attention's output: one left in the step would run over every cached position each
   step, so the step is derived again with that projection's output cached); otherwise
   cached: the state holds it for the past positions (a K,V cache). A
   concat whose pieces would each be cached as they are, each read by the concat alone,
   is cached whole (partial rotary's [rope(k[:R]) | k[R:]]: one cache, one write per
   step, the same bytes).
   Where the keys live is the attention's *key layout*:
   - full, dynamic step: the cache holds the P past positions and the step concatenates the
     T new ones (S = P + T keys); `causal_mask(T, T)` becomes `causal_mask(T, S)`.
   - full, static step (`static=True`): the cache is preallocated to L slots, slot = position;
     the step writes the new entries in place (`index_copy` at `decode.pos`) and attends over
     all L slots, masked by position (k <= q): slots not yet written never contribute, and no
     shape depends on P, so the T = 1 step can be captured in a CUDA graph.
   - ring (sliding-window attention, both steps): softmax(where(causal_mask(T, window=W),
     scores, -inf)) whose probabilities only weight values is matched; its K and V are kept
     in W slots, position a in slot a mod W. The step attends over [W ring slots | T new]
     with the mask built from the slots' positions (the input `decode.ringW.keys`; slots
     never written have negative positions) and writes the newest entry of each slot
     (`decode.ringW.src` indexes [ring | new]; with T > W only the last W tokens land):
     constant state in the context length. (On the triton backend the attention kernel
     reads the ring and the new keys apart, and the static step stores the new entries into
     the ring in place after it: fuse_decode_attention, fuse_cache_writes.ring_updates.)
4. `cumsum` along time becomes a running sum: state + cumsum(new), and the state advances by
   the sum of the new entries (running means).
   Decayed linear attention in its canonical parallel form, ((q @ k^T) * D) @ v with
   D_ts = exp(G_t - G_s) causally masked and G = cumsum(ld) (retention, lightning), becomes
   the chunked recurrence with a d_k x d_v state per head: constant in the context length.
   Gated linear attention, with per-channel decays (GLA, RWKV-6-style), written with
   [.., T, T, d_k] products, sum(q_t * k_s * exp(G_t - G_s) over d_k) @ v with G = cumsum(g)
   along time, likewise: S' = diag(exp(g_t)) S + k_t^T v_t.
   A `scan` along time runs over the new tokens from its carried state (carry0 at P = 0).
   A causal shift, concat([pad, x[.., :T - s]], time) with a pad of s positions that depends
   on no token (a token shift; the taps of a short causal convolution), reads x's last S
   past values from a state of S slots per shifted tensor (S its longest shift, one state
   for all of a convolution's taps): constant in the context length. Slots at negative
   positions (fewer than S tokens seen) read the pad (pad[p + s] at position p).
5. Anything else that mixes positions (a reduction, softmax, another slice or concat along
   time, a contraction over queries) is a compile error naming the op and its YAML line. Dropout and
   other train-only noise are the identity (generation runs in eval mode).

The runtime inputs besides the token ids and the state are i64 position tables, functions of
(P, T) listed in `StepGraph.aux` (name -> fn(P as a 1-element i64 tensor, T) -> tensor), so the
runtime fills them on the device (inside a captured CUDA graph too): on a GPU with one kernel
per ring size (lmc/runtime/positions.py), elsewhere with these torch functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import LmcError
from ..ir.dims import Dim, norm
from ..ir.graph import Graph, Node
from ..ir.ops import COMPARISONS, Kind, Op
from ..ir.types import DType
from .patterns import (
    NoMatch,
    const_scale,
    gated_linear_attention,
    narrowing,
    sink_logit,
    uncast,
)

Q, K, F = "q", "k", "f"
B_ = Dim.sym("B")
T = Dim.sym("T")
P = Dim.sym("P")
L = Dim.sym("L")     # the preallocated length of a static step's caches
S = norm(P + T)
POS = "decode.pos"   # the i64 input holding the new tokens' absolute positions P .. P+T-1

LAYOUT = {Op.PERMUTE, Op.RESHAPE, Op.EXPAND, Op.CAST}
TIME_REDUCE = {Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP, Op.SOFTMAX}


@dataclass
class StateSpec:
    """One state tensor of the step graph: its input name, output name and layout."""
    name: str            # the input; the output carrying its next value is name + "'"
    kind: str            # "cache" (P positions, grows by T; L slots in a static step),
    #                      "ring" (W slots), "shift" (S slots), "sum", "prod", "state",
    #                      "carry":
    #                      constant size
    shape: tuple         # symbolic, over B and P (L for a static cache)
    dtype: DType
    axis: Optional[int]  # the position axis of a cache or ring
    source: str          # what it holds: the op and YAML place it was taken from

    @property
    def out(self) -> str:
        return self.name + "'"

    def concrete(self, B: int = 1, P_: int = 0, L_: int = 0) -> List[int]:
        env = {"B": B, "P": P_, "L": L_}
        return [d.evaluate(env) if isinstance(d, Dim) else d for d in self.shape]

    def bytes(self, B: int = 1, P_: int = 0, L_: int = 0) -> int:
        n = 1
        for d in self.concrete(B, P_, L_):
            n *= d
        return n * self.dtype.itemsize

    def bytes_per_token(self) -> int:
        """Bytes added per token of context (0 for a constant-size state), batch 1."""
        return self.bytes(1, 1) - self.bytes(1, 0)


def state_outputs(g) -> List[Tuple[Node, Node]]:
    """(state input, the output carrying its next value) of a step graph, by the names
    `StateSpec` gives them (input X, output X')."""
    named = {n.attrs["name"]: n for n in g.nodes if n.op is Op.INPUT}
    return [(named[k[:-1]], v) for k, v in g.outputs.items()
            if k.endswith("'") and k[:-1] in named]


@dataclass
class StepGraph:
    graph: Graph
    states: List[StateSpec] = field(default_factory=list)
    logits: str = "logits"
    aux: Dict[str, Callable] = field(default_factory=dict)  # position inputs: fn(P, T)
    static: bool = False


_UNMASKED = ("reduces over key positions that no causal mask reached: each position would read "
             "later ones (mask the scores with causal_mask(T) before the softmax)")


def _err(n: Node, why: str) -> LmcError:
    return LmcError(f"cannot derive the decode step: {n.op.value} {why}", n.loc)


def _tlabel(d) -> Optional[str]:
    if isinstance(d, Dim) and "T" in d.symbols():
        return Q if d == T else F
    return None


def _subst(d, env):
    return norm(d.evaluate(env)) if isinstance(d, Dim) else d


class _Labels:
    """Time labels per node, and the key-use edges."""

    def __init__(self, g: Graph):
        self.lab: Dict[Node, Tuple] = {}
        self.keyuse = set()      # (node, input index)
        self.keyrole: Dict[Tuple[Node, int], str] = {}  # "k" (q @ k^T), "v" (probs @ v)
        self.shifts: Dict[Node, Tuple[Node, int, int]] = {}   # concat -> (x, axis, s)
        self._cut: Dict[Node, Tuple[Node, int, int]] = {}     # x[:T-s] along time, read by
        self.masked: Dict[Node, bool] = {}
        for n in g.nodes:                                     # a shift's concat only
            for x in n.inputs:
                if x in self._cut and self._shift(n) is None:
                    raise _err(x, "slices along the sequence axis; the one form that decodes "
                               "is a causal shift, concat([pad, x[:, :T - s]], axis) with a "
                               "pad of s positions")
            self.lab[n] = self._label(n)
            # reached by a mask: a causal_mask, or a comparison of positions giving a query x
            # key tensor (iota(T)[:, None] >= iota(T)[None, :] written by hand)
            self.masked[n] = n.op is Op.CAUSAL_MASK or any(self.masked[x] for x in n.inputs) \
                or (n.op in COMPARISONS and K in self.lab[n])

    def _shift(self, n: Node) -> Optional[Tuple[Node, int, int]]:
        """n = concat([pad, x[..:T-s]], time axis), pad s positions that depend on no token:
        x shifted s positions later (a token shift, one tap of a causal convolution)."""
        if n.op is not Op.CONCAT or len(n.inputs) != 2 or n.inputs[1] not in self._cut:
            return None
        pad, cut = n.inputs
        x, ax, s = self._cut[cut]
        if n.attrs["axis"] % len(n.type.shape) != ax or any(self.lab[pad]) or \
                pad.type.shape[ax] != s:
            return None
        return x, ax, s

    def _label(self, n: Node) -> Tuple:
        op, ins = n.op, n.inputs
        if op is Op.SCAN:
            return self._scan(n)
        if op is Op.GETITEM and ins[0].op is Op.SCAN:
            n_y = len(ins[0].type) - ins[0].attrs["n_carry"]
            if n.attrs["index"] >= n_y:
                raise _err(ins[0], "'s final carry feeds the logits: it has seen the whole "
                           "sequence, so earlier positions would see later ones")
            return tuple(_tlabel(d) for d in n.type.shape)
        shape = n.type.shape
        if op is Op.INPUT:
            return tuple(_tlabel(d) for d in shape)
        if op in (Op.PARAM, Op.CONST):
            if any(_tlabel(d) for d in shape):
                raise _err(n, "has a sequence-length shape, which the step cannot know")
            return (None,) * len(shape)
        if op is Op.IOTA:
            return (_tlabel(shape[0]),)
        if op is Op.CAUSAL_MASK:
            if _tlabel(shape[0]) == Q and _tlabel(shape[1]) == Q:
                return (Q, K)
            if any(_tlabel(d) for d in shape):
                raise _err(n, "is not a T x T causal mask")
            return (None, None)
        L = [self.lab[i] for i in ins]
        if op.kind is Kind.POINTWISE or op.kind is Kind.RANDOM:
            return self._broadcast(n, list(range(len(ins))))
        if op is Op.MATMUL:
            return self._matmul(n)
        if op in TIME_REDUCE or op in (Op.CUMSUM, Op.CUMPROD):
            ax = n.attrs["axis"]
            src = L[0]
            if src and src[ax] in (Q, F) and op not in (Op.CUMSUM, Op.CUMPROD):
                raise _err(n, "reduces over the sequence axis, so an early position would see "
                           "later ones; only causal mixing can be decoded")
            if src and src[ax] in (K, F) and op in (Op.CUMSUM, Op.CUMPROD):
                raise _err(n, "accumulates along a key or flattened axis")
            if src and src[ax] == K and not self.masked[ins[0]]:
                raise _err(n, _UNMASKED)
            if op in (Op.SOFTMAX, Op.CUMSUM, Op.CUMPROD) or not src:
                return src
            if n.attrs.get("keepdim", True):
                return src[:ax] + (None,) + src[ax + 1:]
            return src[:ax] + src[ax + 1:]
        if op is Op.PERMUTE:
            return tuple(L[0][p] for p in n.attrs["perm"])
        if op is Op.RESHAPE:
            return self._reshape(n)
        if op is Op.EXPAND:
            src, r = L[0], len(shape)
            out = []
            for j in range(r):
                i = j - (r - len(src))
                if i >= 0 and not (ins[0].type.shape[i] == 1 and shape[j] != 1):
                    out.append(src[i])
                else:
                    out.append(_tlabel(shape[j]))
            return self._two_q(n, tuple(out), [])
        if op is Op.SLICE:
            ax = n.attrs["axis"]
            if L[0][ax]:
                s = norm(T - n.attrs["stop"]) if isinstance(n.attrs["stop"], Dim) else None
                if L[0][ax] != Q or n.attrs["start"] != 0 or n.attrs["step"] != 1 or \
                        not isinstance(s, int) or s < 1:
                    raise _err(n, "slices along the sequence axis; the one form that decodes "
                               "is a causal shift, concat([pad, x[:, :T - s]], axis) with a "
                               "pad of s positions")
                self._cut[n] = (ins[0], ax, s)
                return L[0][:ax] + (F,) + L[0][ax + 1:]
            return L[0]
        if op is Op.CONCAT:
            sh = self._shift(n)
            if sh is not None:
                self.shifts[n] = sh
                return self.lab[sh[0]]
            along = {lb[n.attrs["axis"]] for lb in L if lb[n.attrs["axis"]]}
            if along:
                what = "the key axis (the positions attended to)" if K in along and Q not in \
                    along else "the sequence axis"
                raise _err(n, f"concatenates along {what}; the forms that decode are a causal "
                           "shift concat([pad, x[:, :T - s]]) and an attention sink after or "
                           "before the scores, softmax(concat([s, z], -1))[..., :S] or "
                           "softmax(concat([z, s], -1))[..., 1:]")
            return self._broadcast(n, list(range(len(ins))))
        if op is Op.EMBEDDING:
            return L[1] + (None,)
        if op in (Op.GATHER, Op.SCATTER_ADD, Op.TOPK):
            ax = n.attrs["axis"]
            if any(lb and ax < len(lb) and lb[ax] for lb in L):
                raise _err(n, "indexes along the sequence axis")
            return self._broadcast(n, list(range(len(ins))))
        raise _err(n, "has no single-step form yet")

    def _scan(self, n: Node) -> Tuple:
        """A scan along the per-query time axis decodes with its carry as the state."""
        nc, nx = n.attrs["n_carry"], n.attrs["n_x"]
        for k, x in enumerate(n.inputs):
            lab = self.lab[x]
            if k < nc or k >= nc + nx:
                if any(lab):
                    raise _err(n, "has a carry or parameter that varies along the sequence")
                continue
            ax = n.attrs["axis"] % len(lab)
            if lab[ax] != Q or any(lb for j, lb in enumerate(lab) if j != ax):
                raise _err(n, "does not run along the sequence axis of its inputs")
        return ()

    def _broadcast(self, n: Node, which: List[int]) -> Tuple:
        r = len(n.type.shape)
        out: List[Optional[str]] = [None] * r
        src_q = {j: [] for j in range(r)}
        for k in which:
            x = n.inputs[k]
            xl = self.lab[x]
            off = r - len(xl)
            for i, lb in enumerate(xl):
                if lb is None or x.type.shape[i] == 1:
                    continue
                j = i + off
                if lb == Q:
                    src_q[j].append(k)
                if out[j] in (None, lb):
                    out[j] = lb
                elif {out[j], lb} == {Q, K}:
                    out[j] = K
                else:
                    raise _err(n, "mixes a flattened sequence axis with a per-position one")
        for j in range(r):  # inputs giving "q" where the result is "k" are key uses
            if out[j] == K:
                for k in src_q[j]:
                    self.keyuse.add((n, k))
        return self._two_q(n, tuple(out), [(j, src_q[j]) for j in range(r)])

    def _two_q(self, n: Node, out: Tuple, sources) -> Tuple:
        qs = [j for j, lb in enumerate(out) if lb == Q]
        ks = [j for j, lb in enumerate(out) if lb == K]
        if len(ks) > 1 and len(qs) == 0:
            raise _err(n, "reads [T, T] values whose query and key axes disagree (the decode "
                          "pass takes a score matmul's left operand's positions as the "
                          "queries: write the scores as q @ transpose(k), not as a transpose "
                          "of k @ transpose(q))")
        if len(qs) + len(ks) > 2 or len(ks) > 1:
            raise _err(n, "has more than two sequence axes")
        if len(qs) == 2:  # a [.., T, T] result: the later axis runs over keys
            if not sources:
                raise _err(n, "makes two sequence axes in a way the decode pass cannot read")
            out = tuple(K if j == qs[1] else lb for j, lb in enumerate(out))
            for j, ks_ in sources:
                if j == qs[1]:
                    for k in ks_:
                        self.keyuse.add((n, k))
        return out

    def _matmul(self, n: Node) -> Tuple:
        a, b = n.inputs
        la, lb = self.lab[a], self.lab[b]
        r = len(n.type.shape)
        if la[-1] == Q or la[-1] == F:
            raise _err(n, "contracts over the query positions (a sum over the whole sequence)")
        if la[-1] == K and lb[-2] == Q:
            if not self.masked[a]:
                raise _err(n, _UNMASKED)
            self.keyuse.add((n, 1))
            self.keyrole[(n, 1)] = "v"
        batch: List[Optional[str]] = [None] * (r - 2)
        for x, lx in ((a, la), (b, lb)):
            off = (r - 2) - (len(lx) - 2)
            for i, lab in enumerate(lx[:-2]):
                if lab and x.type.shape[i] != 1:
                    if batch[i + off] not in (None, lab):
                        raise _err(n, "mixes sequence axes in its batch dimensions")
                    batch[i + off] = lab
        m, nn = la[-2], lb[-1]
        if m == Q and nn == Q:  # scores: the right operand's positions are keys
            self.keyuse.add((n, 1))
            self.keyrole[(n, 1)] = "k"
            nn = K
        return self._two_q(n, tuple(batch) + (m, nn), [])

    def _reshape(self, n: Node) -> Tuple:
        (x,) = n.inputs
        src = self.lab[x]
        out = [_tlabel(d) for d in n.type.shape]
        times_in = [lb for lb in src if lb]
        if K in times_in:
            whole_in = [lb for d, lb in zip(x.type.shape, src) if lb in (Q, K) and d == T]
            whole_out = [j for j, d in enumerate(n.type.shape) if d == T]
            if len(whole_in) != len(times_in) or len(whole_out) != len(whole_in):
                raise _err(n, "reshapes a query x key tensor across its sequence axes")
            for j, lb in zip(whole_out, whole_in):
                out[j] = lb
        elif not times_in:
            if any(out):
                raise _err(n, "creates a sequence axis from a tensor without one")
        return tuple(out)


@dataclass
class _LinAttn:
    """o = ((q @ k^T) * D) @ v with D_ts = exp(G_t - G_s) masked causally, G = cumsum(ld):
    decayed linear attention (retention, lightning), decoded with a constant-size state."""
    out: Node
    q: Node
    k: Node
    v: Node
    ld: Node
    gated: bool = False     # ld per key channel [.., T, d_k] (gated linear attention)
    scale: float = 1.0      # a constant on the scores, (q @ k^T) * c: applied to q


def _is_last_two_swap(n: Node) -> bool:
    r = len(n.type.shape)
    return n.op is Op.PERMUTE and tuple(n.attrs["perm"]) == tuple(range(r - 2)) + (r - 1, r - 2)


def _match_linear_attention(o: Node) -> Optional[_LinAttn]:
    """Also under mixed precision: the weights cast to v's dtype, the scores cast up to meet
    an fp32 decay matrix, or the decay matrix cast down to the scores' dtype."""
    if o.op is not Op.MATMUL or uncast(o.inputs[0]).op is not Op.MUL:
        return None
    a, v = uncast(o.inputs[0]), o.inputs[1]
    for scores, dmat in (a.inputs, a.inputs[::-1]):
        (scores, scale), dmat = const_scale(uncast(scores)), uncast(dmat)
        scores = uncast(scores)
        if not (scores.op is Op.MATMUL and _is_last_two_swap(scores.inputs[1])
                and dmat.op is Op.EXP and dmat.inputs[0].op is Op.WHERE):
            continue
        mask, diff, neg = dmat.inputs[0].inputs
        if not (mask.op is Op.CAUSAL_MASK and mask.attrs["rows"] == T
                and mask.attrs["cols"] == T and not mask.attrs["window"]
                and neg.op is Op.CONST and neg.attrs["value"] == float("-inf")
                and diff.op is Op.SUB):
            continue
        gt, gs = diff.inputs
        if not (gt.op is Op.RESHAPE and gs.op is Op.RESHAPE and gt.inputs[0] is gs.inputs[0]):
            continue
        g = gt.inputs[0]
        if not (g.op is Op.CUMSUM and g.attrs["axis"] == len(g.type.shape) - 1
                and g.type.shape[-1] == T
                and tuple(gt.type.shape) == tuple(g.type.shape) + (1,)
                and tuple(gs.type.shape) == tuple(g.type.shape[:-1]) + (1, T)):
            continue
        q, kt = scores.inputs
        return _LinAttn(o, q, kt.inputs[0], v, g.inputs[0], scale=scale)
    return None


def _match_gated_linear_attention(o: Node) -> Optional[_LinAttn]:
    """Gated linear attention (per-channel decays: GLA, RWKV-6-style) in the form
    `patterns.gated_linear_attention` reads, decoded with a d_k x d_v state per head,
    S' = diag(exp(g_t)) S + k_t^T v_t."""
    try:
        q, k, v, ld = gated_linear_attention(o)
    except NoMatch:
        return None
    return _LinAttn(o, q, k, v, ld, gated=True)


@dataclass(frozen=True)
class _Keys:
    """Where the keys of an attention live: "full" (every position: S = P + T of them in the
    dynamic step, the L preallocated slots in the static one) or "ring" (W slots holding the
    last W positions, then the T new ones)."""
    kind: str
    window: int = 0


FULL = _Keys("full")


def _windowed_attention(g: Graph, labels: "_Labels") -> Dict[Tuple[Node, int], _Keys]:
    """Key-use edges of sliding-window attentions, which may keep their keys in a ring.

    Matched: probs = softmax(where(causal_mask(T, window=W), s, -inf)) along the key axis
    (under mixed precision a cast up to fp32 before the softmax and one back after it;
    with an attention sink, probs * sigmoid(logsumexp(the same masked scores) - z)),
    s reached from scores = q @ k^T through pointwise ops whose other inputs carry no key axis
    or are computed from positions alone (ALiBi's bias: its key uses are taken over the ring's
    keys too, unless the bias is also read by attentions of another window, which then all
    keep full caches), each value on the way used once, and probs used only as the left
    operand of matmuls with the values: keys older than W then get weight exactly 0, so K and
    V need only W slots."""
    users: Dict[Node, List[Node]] = {}
    for n in g.nodes:
        for x in n.inputs:
            users.setdefault(x, []).append(n)
    for o in g.outputs.values():
        users.setdefault(o, []).append(None)
    lab, keyuse = labels.lab, labels.keyuse
    out: Dict[Tuple[Node, int], _Keys] = {}
    free: Dict[Node, bool] = {}

    def token_free(n: Node) -> bool:      # computed from positions and constants alone
        if n not in free:
            free[n] = n.op is not Op.INPUT and all(token_free(i) for i in n.inputs)
        return free[n]
    found = []      # (ring, its key-use edges, the path's nodes, positions-only side inputs)
    for sm in g.nodes:
        if sm.op is not Op.SOFTMAX or (lab[sm] or (None,))[sm.attrs["axis"]] != K:
            continue
        ax = sm.attrs["axis"] % sm.type.rank

        def only(n: Node, main: Node) -> bool:
            """n read by main, and besides only by logsumexps along the keys (an attention
            sink's gate, which masked keys leave unchanged too)."""
            us = users.get(n, [])
            return main in us and all(u is main or (
                u is not None and u.op is Op.LOGSUMEXP and u.attrs["axis"] % u.type.rank == ax)
                for u in us)
        wh, top = sm.inputs[0], sm
        if uncast(wh) is not wh and only(wh, sm):    # mixed precision: fp32 softmax
            wh, top = wh.inputs[0], wh
        if wh.op is not Op.WHERE or not only(wh, top):
            continue
        mask, s, fill = wh.inputs
        if not (mask.op is Op.CAUSAL_MASK and mask.attrs["window"] > 0
                and fill.op is Op.CONST and fill.type.rank == 0
                and not hasattr(fill.attrs["value"], "shape")
                and fill.attrs["value"] == float("-inf")):
            continue
        x, ok, path, side = s, True, [], []
        while ok and x.op is not Op.MATMUL:
            # the scores' path: one input with a key axis that depends on the tokens; the
            # others carry no time axis, or are computed from positions alone (ALiBi's
            # bias: recomputed over the ring's key positions)
            timed = [i for i in x.inputs if K in lab[i] and not token_free(i)]
            ok = (x.op.kind is Kind.POINTWISE and len(timed) == 1
                  and all(i is timed[0] or not any(lab[i]) or token_free(i)
                          for i in x.inputs)
                  and len(users.get(timed[0], [])) == 1)
            if ok:
                path.append(x)
                side += [i for i in x.inputs if i is not timed[0] and K in lab[i]]
            x = timed[0] if ok else x
        if not ok or (x, 1) not in keyuse or len(users.get(x, [])) != 1 or \
                not (s is x or len(users.get(s, [])) == 1):
            continue
        p, pv = sm, users.get(sm, [])
        if len(pv) == 1 and _sink_gate(pv[0], sm, lab):
            p, pv = pv[0], users.get(pv[0], [])      # softmax(s) * sigmoid(lse(s) - z)
        if len(pv) == 1 and pv[0] is not None and uncast(pv[0]) is not pv[0]:
            p, pv = pv[0], users.get(pv[0], [])      # rounded to v's dtype for probs @ v
        if not pv or not all(u is not None and u.op is Op.MATMUL and u.inputs[0] is p
                             and (u, 1) in keyuse for u in pv):
            continue
        ring = _Keys("ring", mask.attrs["window"])
        edges = [(x, 1)] + [(u, 1) for u in pv]
        for r in side:        # the key-use edges inside a positions-only side input
            stack, seen = [r], set()
            while stack:
                m = stack.pop()
                if m in seen:
                    continue
                seen.add(m)
                edges += [(m, j) for j in range(len(m.inputs)) if (m, j) in keyuse]
                stack.extend(m.inputs)
        found.append((ring, edges, set(path), side))
    # a side input shared by attentions must be read by ring attentions of one window only
    # (one layout per node): else those attentions keep the full cache
    readers: Dict[Node, set] = {}
    for ring, _, path, side in found:
        for r in side:
            readers.setdefault(r, set()).add(ring.window)
    on_paths = set().union(*[f[2] for f in found]) if found else set()
    for ring, edges, path, side in found:
        if any(len(readers[r]) > 1 or any(u not in on_paths for u in users.get(r, []))
               for r in side):
            continue
        for e in edges:
            out[e] = ring
    return out


def _sink_gate(u: Optional[Node], sm: Node, lab) -> bool:
    """u = softmax * sigmoid(logsumexp(scores) - z) over sm's own scores (an attention sink,
    `patterns.sink_logit`), z per query (no key axis)."""
    if u is None or u.op is not Op.MUL or sm not in u.inputs:
        return False
    try:
        return K not in lab[sink_logit(u, sm)]
    except NoMatch:
        return False


# -- the position inputs (functions of P, a 1-element i64 tensor, and T) -------------------
def _pos_fn(P_, T_: int):
    import torch
    return P_ + torch.arange(T_, device=P_.device)


def _ring_keys_fn(W: int):
    def ring_keys(P_, T_: int):
        """Positions of [ring slots | new tokens]: slot j holds the latest position below P
        that is j mod W (negative: never written)."""
        import torch
        j = torch.arange(W, device=P_.device)
        held = (P_ - 1) - torch.remainder(P_ - 1 - j, W)
        return torch.cat([held, P_ + torch.arange(T_, device=P_.device)])
    return ring_keys


def _ring_src_fn(W: int):
    def ring_src(P_, T_: int):
        """For each slot, where its next content sits in [ring | new]: the newest position
        j mod W below P + T, taken from the new tokens when it is one of them."""
        import torch
        j = torch.arange(W, device=P_.device)
        latest = (P_ + T_ - 1) - torch.remainder(P_ + T_ - 1 - j, W)
        return torch.where(latest >= P_, W + latest - P_, j)
    return ring_src


@dataclass
class _Builder:
    g: Graph
    labels: _Labels
    static: bool = False
    nodes: List[Node] = field(default_factory=list)
    new: Dict[Node, Node] = field(default_factory=dict)
    states: List[StateSpec] = field(default_factory=list)
    state_out: Dict[str, Node] = field(default_factory=dict)
    token_free: Dict[Node, bool] = field(default_factory=dict)
    aux: Dict[str, Callable] = field(default_factory=dict)
    aux_nodes: Dict[str, Node] = field(default_factory=dict)
    memo: Dict[tuple, Node] = field(default_factory=dict)      # (what, node, keys) -> node
    _roles: Optional[Dict[Node, tuple]] = None     # _cache_name: node -> (roles, scope)
    layout: Dict[Node, _Keys] = field(default_factory=dict)    # keys of a "k"-labelled node
    deferred: set = field(default_factory=set)  # "k" nodes made of masks: built per layout
    edge_keys: Dict[Tuple[Node, int], _Keys] = field(default_factory=dict)
    # widening projections walked through (the step's matmul over the keys -> the forward's
    # node), and those to cache instead (their up-projection was not absorbed: decode_step)
    widened: Dict[Node, Node] = field(default_factory=dict)
    keep_widening: set = field(default_factory=set)
    _users: Optional[Dict[Node, list]] = None       # _cached_whole: the forward's readers

    def add(self, op: Op, inputs, attrs, like: Node) -> Node:
        n = Node.make(op, inputs, attrs, like.loc, like.scope)
        self.nodes.append(n)
        return n

    def state(self, like: Node, kind: str, shape, axis, dtype: Optional[DType] = None,
              name: Optional[str] = None) -> Node:
        """A state input named `scope.kind` (name.kind with a name: `layers.0.attn.k.cache`),
        numbered from 2 on a repeat."""
        base = f"{name or like.scope or 'model'}.{kind}"
        name, k = base, 1
        while any(s.name == name for s in self.states):
            k += 1
            name = f"{base}{k}"
        where = f" at {like.loc}" if like.loc else ""
        dtype = dtype or like.type.dtype
        spec = StateSpec(name, kind, tuple(shape), dtype, axis,
                         f"{like.op.value}{where}")
        self.states.append(spec)
        return self.add(Op.INPUT, (), {"name": name, "shape": tuple(shape), "dtype": dtype},
                        like)

    def aux_input(self, name: str, shape, fn: Callable) -> Node:
        n = self.aux_nodes.get(name)
        if n is None:
            n = Node.make(Op.INPUT, (), {"name": name, "shape": tuple(shape),
                                         "dtype": DType.i64})
            self.nodes.append(n)
            self.aux_nodes[name], self.aux[name] = n, fn
        return n

    # -- key layouts ----------------------------------------------------------------------
    def length(self, keys: _Keys):
        if keys.kind == "ring":
            return norm(keys.window + T)
        return L if self.static else S

    def env(self, keys: _Keys) -> dict:
        return {"B": B_, "T": self.length(keys), "P": P}

    def qpos(self) -> Node:
        return self.aux_input(POS, (T,), _pos_fn)

    def positions(self, keys: _Keys, like: Node) -> Node:
        """The absolute position of every key of the layout, i64 [length]."""
        got = self.memo.get(("pos", None, keys))
        if got is None:
            if keys.kind == "ring":
                W = keys.window
                got = self.aux_input(f"decode.ring{W}.keys", (norm(W + T),), _ring_keys_fn(W))
            else:
                got = self.add(Op.IOTA, (), {"length": self.length(keys), "dtype": DType.i64},
                               like)
            self.memo[("pos", None, keys)] = got
        return got

    def mask(self, n: Node, keys: _Keys) -> Node:
        """causal_mask(T, T, window) for the layout's keys: [T, length] bool."""
        window = n.attrs["window"]
        if keys.kind == "full" and not self.static:
            return self.add(Op.CAUSAL_MASK, (), {"rows": T, "cols": S, "window": window}, n)
        add = lambda op, ins, attrs=None: self.add(op, ins, attrs or {}, n)  # noqa: E731
        const = lambda v: add(Op.CONST, (), {"value": v, "dtype": DType.i64})  # noqa: E731
        k = add(Op.RESHAPE, (self.positions(keys, n),), {"shape": (1, self.length(keys))})
        q = add(Op.RESHAPE, (self.qpos(),), {"shape": (T, 1)})
        dist = add(Op.SUB, (q, k))                       # q - k: visible iff 0 <= it < window
        worst = add(Op.NEG, (dist,))
        if window:
            worst = add(Op.MAX, (worst, add(Op.SUB, (dist, const(window - 1)))))
        if keys.kind == "ring":                          # slots never written: negative
            worst = add(Op.MAX, (worst, add(Op.NEG, (k,))))
        return add(Op.LE, (worst, const(0)))

    def keys_of(self, n: Node) -> _Keys:
        """The key layout node n works in: that of its key uses and of its keyed inputs."""
        found = set()
        for k, x in enumerate(n.inputs):
            if (n, k) in self.labels.keyuse:
                found.add(self.edge_keys.get((n, k), FULL))
            elif x in self.layout:
                found.add(self.layout[x])
        if len(found) > 1:
            raise _err(n, "combines keys of attentions with different windows; the decode "
                       "pass keeps one key layout per attention")
        return found.pop() if found else FULL

    def keyed(self, n: Node, keys: _Keys) -> Node:
        """A deferred node (a mask, or made from masks only) built for a key layout."""
        got = self.memo.get(("keyed", n, keys))
        if got is None:
            if n.op is Op.CAUSAL_MASK:
                got = self.mask(n, keys)
            else:
                ins = [self.keyed(x, keys) if x in self.deferred else self.new[x]
                       for x in n.inputs]
                got = self.add(n.op, ins, self._key_attrs(n, keys), n)
            self.memo[("keyed", n, keys)] = got
        return got

    def _key_attrs(self, n: Node, keys: _Keys) -> dict:
        attrs = dict(n.attrs)
        lab = self.labels.lab[n]
        if n.op in (Op.RESHAPE, Op.EXPAND) and K in lab:
            shape = list(attrs["shape"])
            shape[lab.index(K)] = self.length(keys)
            attrs["shape"] = tuple(shape)
        return attrs

    # -- token-free subgraphs (RoPE tables, fixed decays) are recomputed over all keys ------
    def is_token_free(self, n: Node) -> bool:
        v = self.token_free.get(n)
        if v is None:
            v = n.op is not Op.INPUT and all(self.is_token_free(i) for i in n.inputs)
            self.token_free[n] = v
        return v

    def clone_over_keys(self, n: Node, keys: _Keys) -> Node:
        """n computed at every key position of the layout (token-free: no state needed)."""
        got = self.memo.get(("clone", n, keys))
        if got is not None:
            return got
        if not any(self.labels.lab[n]):
            out = self.new[n]
        elif n.op is Op.IOTA:
            out = self.positions(keys, n)
            if n.attrs["dtype"] != DType.i64:
                out = self.add(Op.CAST, (out,), {"dtype": n.attrs["dtype"]}, n)
        else:
            env = self.env(keys)
            attrs = {k: _subst_attr(v, env) for k, v in n.attrs.items()}
            out = self.add(n.op, [self.clone_over_keys(i, keys) for i in n.inputs], attrs, n)
        self.memo[("clone", n, keys)] = out
        return out

    def key_side(self, n: Node, keys: _Keys) -> Node:
        """The value of n at every key position of the layout (n has one per-position axis)."""
        got = self.memo.get(("key", n, keys))
        if got is not None:
            return got
        lab = self.labels.lab[n]
        if not any(lab):
            return self.new[n]
        if K in lab or F in lab or lab.count(Q) != 1:
            raise _err(n, "is needed at every position but is not a per-position tensor")
        route = self._route(n)
        if route == "free":
            return self.clone_over_keys(n, keys)
        env = self.env(keys)
        if route == "layout":
            attrs = {k: _subst_attr(v, env) for k, v in n.attrs.items()}
            out = self.add(n.op, [self.key_side(n.inputs[0], keys)], attrs, n)
        elif route == "concat" and not self._cached_whole(n):
            out = self.add(Op.CONCAT, [self.key_side(i, keys) for i in n.inputs],
                           dict(n.attrs), n)
        elif route == "widen":
            a, w = n.inputs
            out = self.add(Op.MATMUL, [self.key_side(a, keys), self.new[w]], dict(n.attrs), n)
            self.widened[out] = n
        else:
            out = self._cache(n, lab.index(Q), keys)
        self.memo[("key", n, keys)] = out
        return out

    def _cache(self, n: Node, ax: int, keys: _Keys) -> Node:
        """The state holding n's past positions, and n at every key position of the layout."""
        name = self._cache_name(n)
        def shape(size):
            return [_subst(d, {"B": B_, "T": size, "P": P}) for d in n.type.shape]
        if keys.kind == "ring":  # W slots, position a in slot a mod W
            W = keys.window
            ring = self.state(n, "ring", shape(W), ax, name=name)
            spec = self.states[-1]
            out = self.add(Op.CONCAT, [ring, self.new[n]], {"axis": ax}, n)   # [ring | new]
            src = self.aux_input(f"decode.ring{W}.src", (W,), _ring_src_fn(W))
            one = [1] * len(n.type.shape)
            one[ax] = W
            idx = self.add(Op.EXPAND, (self.add(Op.RESHAPE, (src,), {"shape": tuple(one)}, n),),
                           {"shape": tuple(shape(W))}, n)
            self.state_out[spec.out] = self.add(Op.GATHER, (out, idx), {"axis": ax}, n)
            return out
        if self.static:          # L preallocated slots, the new entries written in place
            cache = self.state(n, "cache", shape(L), ax, name=name)
            out = self.add(Op.INDEX_COPY, (cache, self.qpos(), self.new[n]), {"axis": ax}, n)
            self.state_out[self.states[-1].out] = out
            return out
        past = self.state(n, "cache", shape(P), ax, name=name)  # past, the new ones appended
        out = self.add(Op.CONCAT, [past, self.new[n]], {"axis": ax}, n)
        self.state_out[self.states[-1].out] = out
        return out

    def _cache_name(self, n: Node) -> Optional[str]:
        """A cache's name by what it holds: `scope.k` (the keys of q @ k^T), `scope.v` (the
        values of probs @ v), `scope.kv` (both: MLA's latent), scope the longest one the
        value and its first attention share (`layers.0.attn`, not the RoPE helper's
        `layers.0.attn.rope_1`), else the value's outermost one (yoco's shared `cross_kv`);
        None (the value's scope) for other key uses (decays, biases)."""
        if self._roles is None:           # each key use's operand, walked back as key_side
            self._roles = {}               # walks (layouts, concats, projections)
            for (u, k), role in self.labels.keyrole.items():
                stack = [u.inputs[k]]
                while stack:
                    x = stack.pop()
                    roles, _ = self._roles.setdefault(x, (set(), u.scope))
                    if role in roles:
                        continue
                    roles.add(role)
                    if x.op in LAYOUT and not narrowing(x) or x.op is Op.CONCAT:
                        stack.extend(x.inputs[:1] if x.op in LAYOUT else x.inputs)
                    elif x.op is Op.MATMUL and _is_param(x.inputs[1]):
                        stack.append(x.inputs[0])
        got = self._roles.get(n)
        if got is None:
            return None
        roles, owner = got
        mine, theirs = (n.scope or "").split("."), owner.split(".")
        k = 0
        while k < min(len(mine), len(theirs)) and mine[k] == theirs[k] and mine[k]:
            k += 1
        scope = ".".join(mine[:k]) or mine[0] or "model"
        return f"{scope}.{''.join(sorted(roles))}"

    def _timed(self, n: Node) -> bool:
        return any(self.labels.lab[n])

    def _cached_whole(self, n: Node) -> bool:
        """A concat off the time axis is cached whole, one cache and one write per step, when
        each piece would be a cache of its own otherwise and is read by this concat alone,
        once (partial rotary's [rope(k[:R]) | k[R:]]): the same bytes. A piece reached
        through layouts or a widening projection (MLA's [up-projected latent | k_R]: the
        latent is cached, the narrower value), or read elsewhere (another key use would
        share its cache; a cache of the concat would hold it twice), keeps a cache per
        piece."""
        if self._users is None:
            self._users = self.g.users()
            for o in self.g.outputs.values():
                self._users.setdefault(o, []).append(None)
        return len(set(n.inputs)) == len(n.inputs) and all(
            any(self.labels.lab[i]) and self._route(i) == "cache" and self._users.get(i) == [n]
            for i in n.inputs)

    def _route(self, n: Node) -> str:
        """How key_side reaches a per-position n at every key: "free" (recomputed: it
        depends on no token), "layout" (through a layout op), "concat" (off the time axis:
        through its pieces, unless cached whole), "widen" (through a widening projection),
        or "cache"."""
        if self.is_token_free(n):
            return "free"
        if n.op in LAYOUT and self._timed(n.inputs[0]) and not narrowing(n):
            return "layout"
        if n.op is Op.CONCAT and self.labels.lab[n][n.attrs["axis"]] is None:
            return "concat"
        if n.op is Op.MATMUL and self._widening_projection(n):
            return "widen"
        return "cache"

    def _widening_projection(self, n: Node) -> bool:
        if n in self.keep_widening:
            return False
        a, w = n.inputs
        if not _is_param(w) or not self._timed(a) or self._timed(w):
            return False
        return _const_size(a.type.shape[-1]) < _const_size(n.type.shape[-1])

    # -- the query side ------------------------------------------------------------------
    def needed(self) -> set:
        """Nodes the outputs depend on, reading a matched linear attention through its
        q, k, v and log decays only (its T x T internals are not built)."""
        self.linattn = {}
        for n in self.g.nodes:
            m = _match_linear_attention(n) or _match_gated_linear_attention(n)
            if m is not None:
                self.linattn[n] = m
        need, stack = set(), list(self.g.outputs.values())
        while stack:
            n = stack.pop()
            if n in need:
                continue
            need.add(n)
            m = self.linattn.get(n)
            sh = self.labels.shifts.get(n)
            stack.extend((m.q, m.k, m.v, m.ld) if m else (n.inputs[0], sh[0]) if sh
                         else n.inputs)
        self.shift_len: Dict[Tuple[Node, int], int] = {}   # (x, axis) -> the longest shift
        for n, (x, ax, s) in self.labels.shifts.items():
            if n in need:
                self.shift_len[(x, ax)] = max(s, self.shift_len.get((x, ax), 0))
        return need

    def _deferrable(self, n: Node) -> bool:
        """A "k" node whose key axis comes from masks only: its layout is its consumer's."""
        return all((n, k) not in self.labels.keyuse and (x in self.deferred
                                                         or K not in self.labels.lab[x])
                   for k, x in enumerate(n.inputs))

    def build(self) -> None:
        lab, keyuse = self.labels.lab, self.labels.keyuse
        need = self.needed()
        self.edge_keys = _windowed_attention(self.g, self.labels)
        for n in self.g.nodes:
            if n not in need:
                continue
            if n in self.linattn:
                m = self.linattn[n]
                self.new[n] = self._gated_linear_attention_step(m) if m.gated else \
                    self._linear_attention_step(m)
                continue
            if n.op is Op.INPUT:
                self.nodes.append(n)
                self.new[n] = n
                continue
            if n.op.kind is Kind.RANDOM:  # dropout, noise: eval mode
                self.new[n] = self.new[n.inputs[0]]
                continue
            if n in self.labels.shifts:
                self.new[n] = self._shift_step(n)
                continue
            if K in lab[n] and self._deferrable(n):
                self.deferred.add(n)
                continue
            keys = self.keys_of(n)
            ins = [self.key_side(x, self.edge_keys.get((n, k), FULL)) if (n, k) in keyuse
                   else self.keyed(x, keys) if x in self.deferred else self.new[x]
                   for k, x in enumerate(n.inputs)]
            attrs = self._key_attrs(n, keys)
            if n.op is Op.IOTA and lab[n][0] == Q:  # absolute positions of the new tokens
                pos = self.qpos()
                self.new[n] = pos if attrs["dtype"] == DType.i64 else \
                    self.add(Op.CAST, (pos,), {"dtype": attrs["dtype"]}, n)
                continue
            if n.op is Op.SCAN:
                self.new[n] = self._scan_step(n, ins)
                continue
            if n.op is Op.CUMSUM and lab[n] and lab[n][attrs["axis"]] == Q:
                self.new[n] = self._running_sum(n, ins[0], attrs["axis"])
                continue
            if n.op is Op.CUMPROD and lab[n] and lab[n][attrs["axis"]] == Q:
                self.new[n] = self._running_prod(n, ins[0], attrs["axis"])
                continue
            self.new[n] = self.add(n.op, ins, attrs, n)
            if K in lab[n]:
                self.layout[n] = keys

    def _gated_linear_attention_step(self, m: _LinAttn) -> Node:
        """T new tokens against the state S (d_k x d_v per head, fp32) with per-channel
        decays: o = the intra form over the new tokens + (q * exp(G_t)) @ S, G the local
        cumulative log decays [.., T, d_k]; S' = exp(G_T)^T * S + (k * exp(G_T - G_s))^T @ v."""
        q, k, v, ld = (self.new[x] for x in (m.q, m.k, m.v, m.ld))
        at = m.out
        add = lambda op, ins, attrs=None: self.add(op, ins, attrs or {}, at)  # noqa: E731
        low = q.type.dtype

        def lowc(x: Node) -> Node:
            return x if x.type.dtype is low else add(Op.CAST, (x,), {"dtype": low})
        batch = tuple(m.out.type.shape[:-2])
        dk, dv = k.type.shape[-1], v.type.shape[-1]
        state = self.state(at, "state", batch + (dk, dv), None, dtype=DType.f32)
        r = len(ld.type.shape)
        g = add(Op.CUMSUM, (ld,), {"axis": r - 2})                          # [.., T, dk]
        lead = tuple(g.type.shape[:-2])
        gt = add(Op.RESHAPE, (g,), {"shape": lead + (T, 1, dk)})
        gs = add(Op.RESHAPE, (g,), {"shape": lead + (1, T, dk)})
        mask = add(Op.RESHAPE, (add(Op.CAUSAL_MASK, (), {"rows": T, "cols": T, "window": 0}),),
                   {"shape": (T, T, 1)})
        neg = add(Op.CONST, (), {"value": float("-inf"), "dtype": g.type.dtype})
        dmat = add(Op.EXP, (add(Op.WHERE, (mask, add(Op.SUB, (gt, gs)), neg)),))
        qe = add(Op.RESHAPE, (q,), {"shape": tuple(q.type.shape[:-2]) + (T, 1, dk)})
        ke = add(Op.RESHAPE, (k,), {"shape": tuple(k.type.shape[:-2]) + (1, T, dk)})
        scores = add(Op.SUM, (add(Op.MUL, (add(Op.MUL, (qe, ke)), lowc(dmat))),),
                     {"axis": r, "keepdim": False})
        intra = add(Op.MATMUL, (scores, v))
        inter = add(Op.MATMUL, (add(Op.MUL, (q, lowc(add(Op.EXP, (g,))))), lowc(state)))
        g_end = add(Op.SLICE, (g,), {"axis": r - 2, "start": T - 1, "stop": T, "step": 1})
        w = add(Op.EXP, (add(Op.SUB, (g_end, g)),))                        # [.., T, dk]
        kw = add(Op.PERMUTE, (add(Op.MUL, (k, lowc(w))),), {"perm": _swap_last(len(k.type.shape))})
        kv = add(Op.MATMUL, (kw, v))
        if kv.type.dtype is not DType.f32:
            kv = add(Op.CAST, (kv,), {"dtype": DType.f32})
        decay = add(Op.PERMUTE, (add(Op.EXP, (g_end,)),), {"perm": _swap_last(r)})  # [.., dk, 1]
        if decay.type.dtype is not DType.f32:
            decay = add(Op.CAST, (decay,), {"dtype": DType.f32})
        self.state_out[self.states[-1].out] = add(Op.ADD, (add(Op.MUL, (decay, state)), kv))
        return add(Op.ADD, (intra, inter))

    def _linear_attention_step(self, m: _LinAttn) -> Node:
        """T new tokens against the state S = sum_s exp(G_end - G_s) k_s^T v_s of the past:
        o = intra-chunk masked form + (q * exp(G_t)) @ S, with G the local cumulative log decay;
        S' = exp(G_T) S + (k * exp(G_T - G_s))^T @ v. The state is d_k x d_v per head."""
        q, k, v, ld = (self.new[x] for x in (m.q, m.k, m.v, m.ld))
        at = m.out
        add = lambda op, ins, attrs=None: self.add(op, ins, attrs or {}, at)  # noqa: E731
        low = q.type.dtype
        if m.scale != 1.0:     # (q @ k^T) * c = (q * c) @ k^T
            q = add(Op.MUL, (q, add(Op.CONST, (), {"value": m.scale, "dtype": low})))

        def lowc(x: Node) -> Node:
            """A decay factor (fp32 under mixed precision: the log-decays' cumsum is fp32)
            cast to q's dtype where it meets q, k or the state."""
            return x if x.type.dtype is low else add(Op.CAST, (x,), {"dtype": low})
        batch = tuple(m.out.type.shape[:-2])
        dk, dv = k.type.shape[-1], v.type.shape[-1]
        # the state accumulates in fp32 whatever q's dtype (a low-precision state would round
        # every step's update); a low-precision program reads it cast down for q @ S, as it
        # casts every matmul operand, and widens k^T v to add it
        state = self.state(at, "state", batch + (dk, dv), None, dtype=DType.f32)
        g = add(Op.CUMSUM, (ld,), {"axis": len(ld.type.shape) - 1})          # local G
        lead = tuple(g.type.shape[:-1])
        gt = add(Op.RESHAPE, (g,), {"shape": lead + (T, 1)})
        gs = add(Op.RESHAPE, (g,), {"shape": lead + (1, T)})
        mask = add(Op.CAUSAL_MASK, (), {"rows": T, "cols": T, "window": 0})
        neg = add(Op.CONST, (), {"value": float("-inf"), "dtype": g.type.dtype})
        dmat = add(Op.EXP, (add(Op.WHERE, (mask, add(Op.SUB, (gt, gs)), neg)),))
        kt = add(Op.PERMUTE, (k,), {"perm": _swap_last(len(k.type.shape))})
        intra = add(Op.MATMUL, (add(Op.MUL, (add(Op.MATMUL, (q, kt)), lowc(dmat))), v))
        inter = add(Op.MATMUL, (add(Op.MUL, (q, lowc(add(Op.EXP, (gt,))))), lowc(state)))
        g_end = add(Op.SLICE, (g,), {"axis": len(g.type.shape) - 1, "start": T - 1, "stop": T})
        g_end2 = add(Op.RESHAPE, (g_end,), {"shape": lead + (1, 1)})
        w = add(Op.EXP, (add(Op.SUB, (g_end2, gt)),))                         # [.., T, 1]
        kw = add(Op.PERMUTE, (add(Op.MUL, (k, lowc(w))),),
                 {"perm": _swap_last(len(k.type.shape))})
        kv = add(Op.MATMUL, (kw, v))
        if kv.type.dtype is not DType.f32:
            kv = add(Op.CAST, (kv,), {"dtype": DType.f32})
        e_end = add(Op.EXP, (g_end2,))
        if e_end.type.dtype is not DType.f32:
            e_end = add(Op.CAST, (e_end,), {"dtype": DType.f32})
        new_state = add(Op.ADD, (add(Op.MUL, (e_end, state)), kv))
        self.state_out[self.states[-1].out] = new_state
        return add(Op.ADD, (intra, inter))

    def fresh(self, like: Node) -> Node:
        """P == 0 as a bool scalar tensor: no token seen yet (a carried state is still the
        zeros `init_state` made; the first call starts from the state's initial value)."""
        first = self.add(Op.SLICE, (self.qpos(),), {"axis": 0, "start": 0, "stop": 1}, like)
        first = self.add(Op.RESHAPE, (first,), {"shape": ()}, like)       # P, as a tensor
        zero = self.add(Op.CONST, (), {"value": 0, "dtype": DType.i64}, like)
        return self.add(Op.EQ, (first, zero), {}, like)

    def _scan_step(self, n: Node, ins: List[Node]) -> Node:
        """The scan over the new tokens, starting from the carried state (from carry0 when no
        token has been seen: P == 0)."""
        nc = n.attrs["n_carry"]
        fresh = self.fresh(n)
        starts, carries = [], []
        for c0 in ins[:nc]:
            st = self.state(n, "carry", tuple(c0.type.shape), None, c0.type.dtype)
            carries.append(self.states[-1])
            starts.append(self.add(Op.WHERE, (fresh, c0, st), {}, n))
        scan = self.add(Op.SCAN, starts + list(ins[nc:]), dict(n.attrs), n)
        n_y = len(scan.type) - nc
        for j, spec in enumerate(carries):
            self.state_out[spec.out] = self.add(Op.GETITEM, (scan,), {"index": n_y + j}, n)
        return scan

    def _shift_step(self, n: Node) -> Node:
        """x shifted s positions later, over the new tokens: the state holds x at the last
        S past positions (S the longest shift of x, one state for all of a convolution's
        taps); a slot whose position is negative (fewer than S tokens seen) reads the pad."""
        x, ax, s = self.labels.shifts[n]
        add = lambda op, ins, attrs=None: self.add(op, ins, attrs or {}, n)  # noqa: E731
        const = lambda v: add(Op.CONST, (), {"value": v, "dtype": DType.i64})  # noqa: E731
        span = self.shift_len[(x, ax)]
        got = self.memo.get(("shift", x, ax))
        if got is None:
            shape = [_subst(d, {"B": B_, "T": span, "P": P}) for d in x.type.shape]
            st = self.state(x, "shift", shape, ax)
            both = add(Op.CONCAT, (st, self.new[x]), {"axis": ax})      # positions P-S .. P+T-1
            self.state_out[self.states[-1].out] = add(
                Op.SLICE, (both,), {"axis": ax, "start": T, "stop": norm(T + span), "step": 1})
            got = self.memo[("shift", x, ax)] = st
        last = add(Op.SLICE, (got,), {"axis": ax, "start": span - s, "stop": span, "step": 1})
        first = add(Op.SLICE, (self.qpos(),), {"axis": 0, "start": 0, "stop": 1, "step": 1})
        slot = add(Op.ADD, (first, add(Op.SUB, (add(Op.IOTA, (), {"length": s,
                                                                  "dtype": DType.i64}),
                                                const(s)))))        # positions P-s .. P-1
        r = len(x.type.shape)
        slot4 = add(Op.RESHAPE, (slot,), {"shape": (1,) * ax + (s,) + (1,) * (r - ax - 1)})
        pad = self.new[n.inputs[0]]
        if not _uniform_along(pad, ax):     # position p < 0 reads pad[p + s]
            idx = add(Op.MIN, (add(Op.MAX, (add(Op.ADD, (slot, const(s))), const(0))),
                               const(s - 1)))       # (slots >= 0 are not read from the pad)
            idx = add(Op.RESHAPE, (idx,), {"shape": (1,) * ax + (s,) + (1,) * (r - ax - 1)})
            idx = add(Op.EXPAND, (idx,), {"shape": tuple(pad.type.shape)})
            pad = add(Op.GATHER, (pad, idx), {"axis": ax})
        past = add(Op.WHERE, (add(Op.GE, (slot4, const(0))), last, pad))
        out = add(Op.CONCAT, (past, self.new[x]), {"axis": ax})
        return add(Op.SLICE, (out,), {"axis": ax, "start": 0, "stop": T, "step": 1})

    def _running_sum(self, n: Node, x: Node, ax: int) -> Node:
        shape = list(n.type.shape)
        shape[ax] = 1
        carry = self.state(n, "sum", shape, None)
        part = self.add(Op.CUMSUM, (x,), {"axis": ax}, n)
        out = self.add(Op.ADD, (part, carry), {}, n)
        total = self.add(Op.SUM, (x,), {"axis": ax, "keepdim": True}, n)
        self.state_out[self.states[-1].out] = self.add(Op.ADD, (carry, total), {}, n)
        return out

    def _running_prod(self, n: Node, x: Node, ax: int) -> Node:
        """cumprod along time: the product of the positions before, carried as state. States
        start at zero, so the first call of a sequence (position 0) uses 1 in its place; the
        next carry is the last of the new tokens' products (a product, unlike a sum, has no
        reduction op to total the new tokens with)."""
        shape = list(n.type.shape)
        shape[ax] = 1
        carry = self.state(n, "prod", shape, None)
        fresh = self.fresh(n)
        one = self.add(Op.CONST, (), {"value": 1.0, "dtype": carry.type.dtype}, n)
        carry = self.add(Op.WHERE, (fresh, one, carry), {}, n)
        out = self.add(Op.MUL, (self.add(Op.CUMPROD, (x,), {"axis": ax}, n), carry), {}, n)
        self.state_out[self.states[-1].out] = self.add(
            Op.SLICE, (out,), {"axis": ax, "start": norm(T - 1), "stop": T, "step": 1}, n)
        return out


def _uniform_along(n: Node, ax: int) -> bool:
    """n holds one value along axis ax (a constant, or expanded from size 1 there)."""
    if n.op is Op.CONST:
        return True
    if n.op in (Op.SLICE, Op.CAST):
        return _uniform_along(n.inputs[0], ax)
    if n.op is Op.EXPAND:
        x = n.inputs[0]
        i = ax - (len(n.type.shape) - len(x.type.shape))
        return i < 0 or x.type.shape[i] == 1
    return False


def _is_param(w: Node) -> bool:
    """w is a parameter, or its cast (a mixed-precision program's matmul operand)."""
    return w.op is Op.PARAM or (w.op is Op.CAST and w.inputs[0].op is Op.PARAM)


def _swap_last(r: int) -> tuple:
    return tuple(range(r - 2)) + (r - 1, r - 2)


def _const_size(d) -> float:
    return d if isinstance(d, int) else float("inf")


def _subst_attr(v, env):
    if isinstance(v, Dim):
        return _subst(v, env)
    if isinstance(v, tuple) and any(isinstance(d, Dim) for d in v):
        return tuple(_subst(d, env) for d in v)
    return v


# -- absorbing up-projections into the query and the output (MLA) -------------------------
def _swapped(x: Node) -> Optional[Node]:
    return x.inputs[0] if _is_last_two_swap(x) else None


def _heads(x: Optional[Node]):
    """x = permute(reshape(C @ W, [B, S, H, dh]), [0, 2, 1, 3]) with W a parameter: the per-head
    up-projection of a cached latent C. Returns (C, W, H, dh) or None."""
    if x is None or x.op is not Op.PERMUTE or tuple(x.attrs["perm"]) != (0, 2, 1, 3):
        return None
    r = x.inputs[0]
    if r.op is not Op.RESHAPE or len(r.type.shape) != 4:
        return None
    mm = r.inputs[0]
    if mm.op is not Op.MATMUL or not _is_param(mm.inputs[1]) or len(mm.type.shape) != 3:
        return None
    c, w = mm.inputs
    _, _, heads, dh = r.type.shape
    if r.type.shape[1] != c.type.shape[1] or heads * dh != w.type.shape[1]:
        return None
    if not _cached(c):
        # a latent of the new tokens only (yoco's retention values): up-projecting it is
        # cheaper than carrying the projection into the state products
        return None
    return c, w, heads, dh


def _cached(c: Node) -> bool:
    """c spans the cache: the past read from a state input joined with the new positions
    (`concat` in the dynamic step, the in-place `index_copy` in the static one)."""
    if c.op is Op.CONCAT:
        return any(i.op is Op.INPUT for i in c.inputs)
    return c.op is Op.INDEX_COPY and c.inputs[0].op is Op.INPUT


def _per_head(w: Node, heads, dh, like: Node) -> Node:
    """W [dc, H*dh] as [H, dc, dh]."""
    dc = w.type.shape[0]
    r = Node.make(Op.RESHAPE, (w,), {"shape": (dc, heads, dh)}, like.loc, like.scope)
    return Node.make(Op.PERMUTE, (r,), {"perm": (1, 0, 2)}, like.loc, like.scope)


def _latent4(c: Node, like: Node) -> Node:
    """C [B, S, dc] as [B, 1, S, dc]: one latent shared by every head."""
    b, s_, dc = c.type.shape
    return Node.make(Op.RESHAPE, (c,), {"shape": (b, 1, s_, dc)}, like.loc, like.scope)


def _absorb_matmul(n: Node) -> Optional[Node]:
    mk = lambda op, ins, attrs=None: Node.make(op, ins, attrs or {}, n.loc, n.scope)  # noqa: E731
    a, b = n.inputs
    kt = _swapped(b)
    if kt is not None and kt.op is Op.CONCAT and a.op is Op.CONCAT and \
            kt.attrs["axis"] == len(kt.type.shape) - 1 == a.attrs["axis"] and \
            len(a.inputs) == len(kt.inputs) and \
            all(x.type.shape[-1] == y.type.shape[-1] for x, y in zip(a.inputs, kt.inputs)) and \
            any(_heads(y) for y in kt.inputs):
        # [a1 | a2] @ [k1 | k2]^T = a1 @ k1^T + a2 @ k2^T, then absorb each part
        parts = []
        for x, y in zip(a.inputs, kt.inputs):
            sw = mk(Op.PERMUTE, (y,), {"perm": _swap_last(len(y.type.shape))})
            mm = mk(Op.MATMUL, (x, sw))
            parts.append(_absorb_matmul(mm) or mm)
        out = parts[0]
        for p_ in parts[1:]:
            out = mk(Op.ADD, (out, p_))
        return out
    hk = _heads(kt)
    if hk is not None:  # q @ (C W_UK,h)^T = (q @ W_UK,h^T) @ C^T: W_UK absorbed into the query
        c, w, heads, dh = hk
        wt = mk(Op.PERMUTE, (_per_head(w, heads, dh, n),), {"perm": (0, 2, 1)})  # [H, dh, dc]
        qa = mk(Op.MATMUL, (a, wt))
        ct = mk(Op.PERMUTE, (_latent4(c, n),), {"perm": (0, 1, 3, 2)})
        return mk(Op.MATMUL, (qa, ct))
    hv = _heads(b)
    if hv is not None:  # p @ (C W_UV,h) = (p @ C) @ W_UV,h: values never materialised
        c, w, heads, dh = hv
        pc = mk(Op.MATMUL, (a, _latent4(c, n)))
        return mk(Op.MATMUL, (pc, _per_head(w, heads, dh, n)))
    return None


def absorb(g: Graph, moved: Optional[Dict[Node, Node]] = None) -> Tuple[Graph, int]:
    """Rewrite attention over an up-projected cached latent so the up-projections act on the
    query and on the attention output instead of on every cached position. `moved`, when
    given, receives each node's counterpart in the result (a node whose inputs changed is a
    new one; one that went dead is not in the result's nodes)."""
    new: Dict[Node, Node] = {} if moved is None else moved
    count = 0
    for n in g.nodes:
        ins = tuple(new[i] for i in n.inputs)
        cur = n if ins == n.inputs else Node(n.op, ins, n.attrs, n.type, n.loc, n.scope)
        if cur.op is Op.MATMUL:
            rep = _absorb_matmul(cur)
            if rep is not None:
                if rep.type.shape != cur.type.shape:
                    raise LmcError(f"internal: absorbing changed a shape {cur.type} -> "
                                   f"{rep.type}", n.loc)
                cur, count = rep, count + 1
        new[n] = cur
    from .basic import dce
    return dce(g.with_nodes(list(new.values()), {k: new[v] for k, v in g.outputs.items()})), count


def decode_step(g: Graph, logits: str = "logits", *, absorb_projections: bool = True,
                static: bool = False) -> StepGraph:
    """Derive the step graph of a forward graph (after the optimisation pipeline).

    static: caches are preallocated to L slots and written in place (see the module
    docstring), so no shape of the step depends on P."""
    if logits not in g.outputs:
        raise LmcError(f"decode needs a {logits!r} output (outputs: {', '.join(g.outputs)})")
    ids = g.inputs
    if len(ids) != 1 or ids[0].type.shape[-1] != T:
        raise LmcError("decode needs one token input shaped [B, T]")
    from .basic import dce
    g = dce(g.with_nodes(g.nodes, {logits: g.outputs[logits]}))  # aux losses are not decoded
    labels = _Labels(g)
    keep: set = set()
    while True:
        b = _Builder(g, labels, static=static, keep_widening=set(keep))
        b.build()
        outputs = {logits: b.new[g.outputs[logits]]}
        outputs.update(b.state_out)
        step = dce(Graph(g.name, b.nodes, outputs, dict(g.meta)))  # inputs stay: ids first
        if not absorb_projections:     # the unabsorbed form, kept to check the absorbed one
            break
        moved: Dict[Node, Node] = {}
        step, n_abs = absorb(step, moved)
        step.meta["absorbed"] = n_abs
        # a widening projection's input is cached (the narrower value) only where absorb
        # moved the up-projection onto the query or the output (MLA); one left in the step
        # (itself, or its copy where an earlier layer's absorb changed what it reads) would
        # run over every cached position each step: its output is cached instead. A kept
        # projection is never walked through again, so this ends.
        live = set(step.nodes)
        left = {b.widened[o] for o, n in moved.items() if o in b.widened and n in live}
        if not left:
            break
        keep |= left
    # the widening projections cached by their outputs (lmc compile --mode decode lists them)
    step.meta["widening_cached"] = sorted(
        f"{n.op.value}" + (f" at {n.loc}" if n.loc else "") for n in keep)
    if static:
        _check_no_past(step)
    return StepGraph(step, b.states, logits, dict(b.aux), static)


def _has_p(v) -> bool:
    if isinstance(v, Dim):
        return "P" in v.symbols()
    if isinstance(v, (tuple, list)):
        return any(_has_p(x) for x in v)
    return False


def _check_no_past(step: Graph) -> None:
    """A static step must not depend on P through a shape or a constant: the runtime replays
    it at every position."""
    for n in step.nodes:
        types = n.type if isinstance(n.type, tuple) else (n.type,)   # a scan's: a tuple
        if any(_has_p(t.shape) for t in types) or any(_has_p(v) for v in n.attrs.values()):
            raise LmcError(f"internal: the static decode step depends on P at {n.op.value} "
                           f"{n.type}", n.loc)
