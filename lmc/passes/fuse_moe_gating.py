"""`fuse_moe_gating`: a mixture-of-experts router region (and, where the experts follow it in
the zoo's dense form, the whole MoE layer) as one fused op.

Matched on primitives (no block names): from each `topk` the pass walks back to

    probs = softmax(logits, -1),  logits = x @ W_r  or  gaussian_noise(x @ W_r, std, seed)
    (softmax([cast(] logits [, f32)]): mixed precision's fp32 softmax over bf16 logits)

(W_r [d, E], fp32, 1 <= k <= 8) and forward to the dense [.., E] combine weights in one of the
zoo's two spellings:

    one-hot    chosen = sum(cast(eq(reshape(top, [.., k, 1]), arange(E)), f32), -2)
               gates  = probs * chosen  (/ sum(probs * chosen, -1): renormalised)
               capacity (optional, along axis 1 of [B, T, E]):
                 kept  = chosen * cast((cast(cumsum(chosen, 1), int) - 1) * a < budget, f32)
                 budget = reshape((iota(T) + 1) * b, [T, 1]);   gates = gates * kept
    scatter    w = gather(probs, top, -1) (/ sum(w, -1)),
               gates = scatter_add(probs * 0.0, top, w, -1)
               (low-precision probabilities: w and the zeros widened to fp32 for the sum)

and, when present, `logsumexp(logits, -1)` (a router z-loss). The region becomes one FUSED
node of kind "moe_gating" with inputs (x, W_r[, noise]) and one output per region value the
rest of the graph reads: gates, probs, lse, chosen, kept, idx, count (a decode step's, see
below; `options["outputs"]` names them in order), read through GETITEMs; the load-balance
statistics (means of chosen and probs over tokens) stay in the graph, where fuse_reductions
takes them.

Whole layer: when the gates feed the dense "every expert on every token" combine of gated
FFNs on the router's own input (blues01, minimax)

    xe = reshape(x, [B, 1, T, d]);  ye = (act(xe @ Wg) * (xe @ W1)) @ W2        [B, E, T, d]
    y  = sum(ye * reshape(permute(gates, [0, 2, 1]), [B, E, T, 1]), 1)

(act silu or exact gelu; Wg, W1 [E, d, F], W2 [E, F, d] fp32), that is in the region too: the
op is of kind "moe_layer", inputs (x, W_r, Wg, W1, W2[, noise]), first output y, and its
kernels route the kept (token, expert) pairs on the device and run grouped GEMMs over only
those rows (no E-fold dense products). Where the experts do not match (medit_one's linear
experts) the gating alone is fused and the record says why the experts were not.

Bodies are the matched primitives (the torch backend runs the exact oracle); the triton
backend runs lmc/codegen/moe.py's kernels (launch_template), and the backward op
("<kind>_bwd", made by the autodiff pass from the body) its fused backward. A whole layer's
body has three more outputs, listed in its meta "saved" so the autodiff pass hands them to the
backward op: per (token, slot) the pre-activations a = x Wg_e, b = x W1_e [B, T, k, F] and the
expert output [B, T, k, d] of the slot's expert e, gathered from the dense values (0 for a slot
over capacity), under stop_gradient. The kernels write the same values in that layout, so the
backward reruns only the gating and routing (small next to the experts: the router matmul is
about E / (3 k F) of an expert GEMM) and none of the forward's expert products.

Decode steps: the triton Decoder runs this pass on its step graph too (codegen.program's
DECODE_PATTERN_PASSES), so a step computes the chosen experts only. There the capacity count is
cumsum(chosen, 1) + carry, the running count of the sequence's earlier tokens (an input
[B, 1, E], the decode state lmc/passes/decode.py made of the cumsum), and the budget reads the
tokens' positions (an input [T]) in place of iota(T); both become inputs of the op
(options["carry"]) and the budget is copied into its body. The new state, carry +
sum(chosen, 1, keepdim), joins the region as the op's `count` output (the gating kernel's
running count after the step's tokens). A step's layer also takes the residual add after it
(fuse_moe_gating(g, residual=True)): the op's y is y + r, with r an input after W2 that its
down-projection kernel adds, so no pointwise kernel follows the layer.

Train-time noise: gaussian_noise(l, std, seed) is l + std * z with z drawn from (seed, the
draw counter, shape). The pass leaves `noise = gaussian_noise(zeros, std, seed)` in the graph
(the same draw, so the same values; zeros in eval mode) and the body adds it to the router
logits: the op's last input, with no gradient.

Mixed precision: a router whose matmul is f16/bf16 is matched too, with its softmax in fp32
over the logits cast up (the mixed-precision pass's program: softmax is on autocast's fp32
list) or in the same low dtype (the gate arithmetic then reads cast(probs, f32)); the kernel
rounds the logits, noisy logits and (in the second form) the probabilities as the oracle
stores them, so its top-k compares the same values (ties after rounding go to the lower
expert). The experts then run
in that dtype with fp32 accumulation and an fp32 combine, as the program writes them.

A sigmoid router (DeepSeek-V3's independent per-expert scores, top-k and renormalised like
a softmax's) is matched too (options["router"] = "sigmoid"), unless a z-loss reads the
logits' logsumexp: its gradient needs the softmax, which the kernels do not keep. So is a
selection bias, `topk(probs + bias, k)` with bias one value per expert (a parameter, input or
constant; under mixed precision an fp32 bias meets the probabilities widened, and the sum is
compared in fp32): it picks the experts, the weights stay the
probabilities' (DeepSeek-V3's auxiliary-loss-free balancing). The bias becomes the op's last
input, with no gradient (none reaches it through top-k's indices in the oracle either).

Group-limited routing (DeepSeek-V3's): the top-k of `where(emask > 0, S, -inf)`, where S is
the selection scores above and emask keeps the experts of the `kept` best of G consecutive
groups, a group scored by the sum of its m largest scores (m = 1 or 2: `sum(gather(grp,
topk(grp, m, -1), -1), -1)` or `amax(grp, -1)` over `grp = reshape(S, [.., G, E / G])`), the
kept groups as a one-hot of `topk(gscore, kept)` against arange(G), expanded over each group's
experts (`_group_limit` has the spelling). The kernel scores and keeps the groups on its
[tokens, E] tile (ties to the lower group, as top-k's); options["groups"] = (G, kept, m).

Not matched (each near miss is a declined record with the failed condition): a router other
than softmax or sigmoid, top-k of anything but the router's probabilities (plus a bias), k > 8,
capacity not in the form above, an intermediate of the region read outside it (e.g. the
logits before the noise, or the gates before capacity).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..codegen.moe import MAX_GROUPS, MAX_K
from ..ir.graph import Graph, Node
from ..ir.ops import Kind, Op
from ..ir.types import DType
from .fuse_pointwise import _where
from .patterns import NoMatch, Region, const_value, need, splice, widened

# output roles, in the order the fused op returns them; the first three carry gradients
ROLES = ("y", "gates", "probs", "lse", "chosen", "kept", "idx", "count")
# a whole layer's outputs after those, only its backward reads: per-slot a, b, expert outputs
SAVED_ROLES = ("a", "b", "ye")
DIFF_ROLES = ("y", "gates", "probs", "lse")


def _scalar(n: Node) -> Optional[float]:
    if n.op is Op.CONST and n.type.rank == 0 and not hasattr(n.attrs["value"], "shape"):
        try:
            return n.attrs["value"]
        except (TypeError, ValueError):
            return None
    return None


def _is_arange(n: Node, E: int) -> bool:
    """A static [E] tensor holding 0 .. E-1 (iota, or a folded constant, maybe cast)."""
    while n.op is Op.CAST:
        n = n.inputs[0]
    if tuple(n.type.shape) != (E,):
        return False
    if n.op is Op.IOTA:
        return n.attrs["length"] == E
    if n.op is Op.CONST and hasattr(n.attrs["value"], "shape"):
        v = torch.as_tensor(n.attrs["value"])
        return v.shape == (E,) and bool((v.double() == torch.arange(E).double()).all())
    return False


def _other(n: Node, x: Node) -> Node:
    """The other operand of a binary node `n` one of whose operands is `x`."""
    a, b = n.inputs
    return b if a is x else a


def _one_user(users, n: Node, op: Op, why: str) -> Node:
    us = users.get(n, [])
    need(len(us) == 1 and us[0].op is op, why)
    return us[0]


def _users_of(users, n: Node, op: Op, pred=lambda u: True) -> List[Node]:
    return [u for u in users.get(n, []) if u.op is op and pred(u)]


def _static_value(n: Node) -> Optional[float]:
    while n.op in (Op.EXPAND, Op.RESHAPE, Op.CAST):
        n = n.inputs[0]
    return const_value(n)


def _group_structure(w: Node, static) -> tuple:
    """DeepSeek-V3's group-limited routing in front of the top-k:

        grp    = reshape(S, [.., G, E / G])                    S: the selection scores
        gscore = sum(gather(grp, topk(grp, m, -1), -1), -1, keepdim=False)   (m = 1 or 2;
                 or amax(grp, -1, keepdim=False) for m = 1)
        gmask  = sum(cast(eq(reshape(topk(gscore, kept, -1), [.., kept, 1]), arange(G)),
                          'f32'), -2, keepdim=False)            [.., G] 0/1
        emask  = reshape(expand(reshape(gmask, [.., G, 1]), [.., G, E / G]), [.., E])
        topk(where(emask > 0, S, -inf), k, -1)

    -> (S, (G, kept, m), the nodes between S and the top-k, the group scores' dtype); the
    sizes unchecked. (Under mixed precision the sum is fp32 over the widened picks.)"""
    cond, S, fill = w.inputs
    need(static(fill) and _static_value(fill) == float("-inf"),
         "top-k of a where that does not mask scores to -inf")
    E, rank = S.type.shape[-1], S.type.rank
    need(isinstance(E, int), "expert count is not static")
    need(cond.op in (Op.GT, Op.NE) and static(cond.inputs[1])
         and _static_value(cond.inputs[1]) == 0,
         "top-k of scores masked by something other than a group mask > 0")
    em = cond.inputs[0]
    ex = em.inputs[0] if em.op is Op.RESHAPE else em
    r1 = ex.inputs[0] if ex.op is Op.EXPAND else ex
    need(em.op is Op.RESHAPE and ex.op is Op.EXPAND and r1.op is Op.RESHAPE
         and ex.type.rank == rank + 1 and r1.type.shape[-1] == 1,
         "expert mask not a per-group mask expanded over each group's experts")
    G, EG = ex.type.shape[-2], ex.type.shape[-1]
    need(isinstance(G, int) and isinstance(EG, int) and G * EG == E,
         f"expert mask groups {G} x {EG}, not the {E} experts")
    gm = r1.inputs[0]
    need(gm.op is Op.SUM and gm.attrs["axis"] == rank - 1 and not gm.attrs.get("keepdim")
         and tuple(gm.type.shape) == tuple(r1.type.shape[:-1]),
         "group mask not a one-hot sum over the kept groups")
    c = gm.inputs[0]
    eq = c.inputs[0] if c.op is Op.CAST else None
    need(eq is not None and eq.op is Op.EQ, "group mask not a one-hot of the kept groups")
    rr = next((i for i in eq.inputs if i.op is Op.RESHAPE), None)
    need(rr is not None and _is_arange(_other(eq, rr), G),
         "kept groups not compared with arange(groups)")
    gtop = rr.inputs[0]
    need(gtop.op is Op.TOPK and gtop.attrs["axis"] == rank - 1
         and tuple(rr.type.shape) == tuple(gtop.type.shape) + (1,),
         "kept groups are not a top-k over the group scores")
    kept = gtop.attrs["k"]
    gs = gtop.inputs[0]
    nodes = [w, cond, em, ex, r1, gm, c, eq, rr, gtop, gs]
    need(gs.op in (Op.AMAX, Op.SUM) and gs.attrs["axis"] == rank and
         not gs.attrs.get("keepdim"), "group scores not a max or a top-m sum over each group")
    if gs.op is Op.AMAX:
        m, R = 1, gs.inputs[0]
    else:
        ga = gs.inputs[0]
        if widened(ga):        # mixed precision: the picks widened for an fp32 sum
            nodes.append(ga)
            ga = ga.inputs[0]
        t2 = ga.inputs[1] if ga.op is Op.GATHER else None
        need(t2 is not None and ga.attrs["axis"] == rank and t2.op is Op.TOPK
             and t2.inputs[0] is ga.inputs[0] and t2.attrs["axis"] == rank,
             "group scores not the sum of each group's top scores (gather of its top-k)")
        m, R = t2.attrs["k"], ga.inputs[0]
        nodes += [ga, t2]
    need(R.op is Op.RESHAPE and R.inputs[0] is S and tuple(R.type.shape[-2:]) == (G, EG),
         "group scores not of the masked scores reshaped to [.., groups, experts per group]")
    nodes.append(R)
    return S, (G, kept, m), nodes, gs.type.dtype.value


def _group_limit(w: Node, k: int, static) -> tuple:
    """_group_structure, with the sizes the gating kernel handles."""
    S, (G, kept, m), nodes, gdt = _group_structure(w, static)
    EG = S.type.shape[-1] // G
    need(m in (1, 2) and m <= EG, f"groups scored by their top {m}: the fused gating sums "
         "a group's top 1 or 2")
    need(G <= MAX_GROUPS, f"{G} groups: the fused gating handles {MAX_GROUPS}")
    need(kept * EG >= k, f"the {kept} kept groups hold {kept * EG} experts, fewer than k={k}")
    return S, (G, kept, m), nodes, gdt


def match(top: Node, users: Dict[Node, List[Node]], static, outputs,
          residual: bool = False) -> dict:
    rank = top.type.rank
    need(top.attrs["axis"] == rank - 1, "top-k not over the last axis")
    k = top.attrs["k"]
    need(1 <= k <= MAX_K, f"top-{k}: the fused gating handles k <= {MAX_K}")
    probs, bias, score, score_cast = top.inputs[0], None, None, None
    groups, group_nodes, group_dtype = None, [], None
    if probs.op is Op.WHERE:
        # DeepSeek-V3's group limit: top-k only among the experts of the best groups
        probs, groups, group_nodes, group_dtype = _group_limit(probs, k, static)
    if probs.op is Op.ADD:
        # DeepSeek-V3's balancing bias: topk(probs + bias) picks, the weights stay probs'
        # (mixed precision: low-precision probabilities widened to an fp32 bias's dtype)
        score = probs
        for pr, bs in (score.inputs, score.inputs[::-1]):
            inner = pr.inputs[0] if widened(pr) else pr
            if inner.op in (Op.SOFTMAX, Op.SIGMOID):
                probs, bias, score_cast = inner, bs, (pr if pr is not inner else None)
                break
        else:
            raise NoMatch("top-k of a sum, not of router probabilities + a per-expert bias")
        need(all(d == 1 for d in bias.type.shape[:-1]) and bias.type.rank >= 1
             and bias.type.shape[-1] == probs.type.shape[-1],
             f"selection bias of shape {list(bias.type.shape)}, not one value per expert")
        need(bias.type.dtype == score.type.dtype,
             f"selection bias in {bias.type.dtype.value}, the scores in "
             f"{score.type.dtype.value}")
        base = bias
        while base.op in (Op.RESHAPE, Op.CAST, Op.EXPAND):
            base = base.inputs[0]
        need(base.op in (Op.PARAM, Op.INPUT) or static(base),
             "selection bias computed in the step (not a parameter, input or constant)")
    router = "sigmoid" if probs.op is Op.SIGMOID else "softmax"   # DeepSeek-V3's: sigmoid
    need(probs.op in (Op.SOFTMAX, Op.SIGMOID),
         f"top-k of {probs.op.value}, not of softmax or sigmoid of the router logits")
    need(router == "sigmoid" or probs.attrs["axis"] == rank - 1,
         "router softmax not over the experts (last) axis")
    pdt = probs.type.dtype.value
    need(pdt in ("f32", "f16", "bf16"), f"router softmax in {pdt}")
    E = probs.type.shape[-1]
    need(isinstance(E, int), "expert count is not static")
    logits, widen = probs.inputs[0], None
    if widened(logits):
        # mixed precision: an fp32 softmax over the low-precision (noisy) logits
        widen, logits = logits, logits.inputs[0]
    dt = logits.type.dtype.value
    noise_node = None
    mm = logits
    if logits.op is Op.GAUSSIAN_NOISE:
        noise_node, mm = logits, logits.inputs[0]
        need(logits.inputs[1].op is Op.CONST, "noise seed is not a constant")
    need(mm.op is Op.MATMUL, f"router logits are {mm.op.value}, not x @ W_r")
    x, w = mm.inputs
    need(w.type.rank == 2 and x.type.rank >= 2, "router weight is not a [d, E] matrix")
    need(x.type.dtype.value == dt and w.type.dtype.value == dt and mm.type.dtype.value == dt,
          "router matmul and softmax in different dtypes")
    region = [mm, probs, top] + ([noise_node] if noise_node is not None else []) + \
        ([widen] if widen is not None else []) + ([score] if score is not None else []) + \
        ([score_cast] if score_cast is not None else []) + group_nodes
    role: Dict[str, Node] = {"probs": probs, "idx": top}
    renorm, capacity, carry, form = False, None, None, None
    tu = users.get(top, [])
    if any(u.op is Op.RESHAPE for u in tu):
        form = "one-hot"
        r = _one_user(users, top, Op.RESHAPE, "top-k indices used other than once, reshaped")
        need(tuple(r.type.shape) == tuple(top.type.shape) + (1,),
              "top-k indices not reshaped to [.., k, 1]")
        eq = _one_user(users, r, Op.EQ, "reshaped indices not compared with arange(E)")
        need(_is_arange(_other(eq, r), E), "indices compared with something other than "
              "arange(E)")
        c = _one_user(users, eq, Op.CAST, "one-hot comparison not cast to a float")
        need(c.type.dtype.value == "f32", "one-hot comparison not cast to f32")
        chosen = _one_user(users, c, Op.SUM, "one-hot not summed over the k slots")
        need(chosen.attrs["axis"] == rank - 1 and not chosen.attrs.get("keepdim", True),
              "one-hot not summed over the k slots")
        region += [r, eq, c, chosen]
        role["chosen"] = chosen
        g0s = _users_of(users, chosen, Op.MUL, lambda u: _widened(_other(u, chosen), probs))
        need(len(g0s) == 1, "no probs * chosen gate")
        gates = g0s[0]
        if _other(gates, chosen) is not probs:      # mixed precision: cast(probs, f32)
            region.append(_other(gates, chosen))
        region.append(gates)
        sums = _users_of(users, gates, Op.SUM,
                         lambda u: u.attrs["axis"] == rank - 1 and u.attrs.get("keepdim", True))
        if sums:
            divs = _users_of(users, gates, Op.DIV,
                             lambda u: u.inputs[0] is gates and u.inputs[1] is sums[0])
            need(len(divs) == 1, "gate sum not used to renormalise the gates")
            region += [sums[0], divs[0]]
            gates, renorm = divs[0], True
        cums = _users_of(users, chosen, Op.CUMSUM)
        if cums:
            gates, capacity, kept, more, carry = _capacity(cums[0], chosen, gates, users,
                                                           static, E)
            region += more
            role["kept"] = kept
            if carry is not None:
                # a decode step's new running count, carry + sum(chosen, 1): the gating
                # kernel's count after the step's tokens
                for sm in _users_of(users, chosen, Op.SUM, lambda u: u.attrs["axis"] == 1
                                    and u.attrs.get("keepdim", True)):
                    adds = _users_of(users, sm, Op.ADD, lambda u: _other(u, sm) is carry[0])
                    if len(users.get(sm, [])) == 1 and len(adds) == 1:
                        region += [sm, adds[0]]
                        role["count"] = adds[0]
                        break
    elif any(u.op is Op.GATHER for u in tu):
        form = "scatter"
        ga = _users_of(users, top, Op.GATHER,
                       lambda u: u.inputs[0] is probs and u.inputs[1] is top
                       and u.attrs["axis"] == rank - 1)
        need(len(ga) == 1, "top-k indices do not gather the router probabilities")
        kv = ga[0]
        region.append(kv)
        wide = _users_of(users, kv, Op.CAST, widened)
        if len(wide) == 1 and len(users.get(kv, [])) == 1:
            # mixed precision: the low-precision picks widened for the fp32 sum and division
            kv = wide[0]
            region.append(kv)
        wv = kv
        sums = _users_of(users, kv, Op.SUM, lambda u: u.attrs["axis"] == rank - 1)
        if sums:
            divs = _users_of(users, kv, Op.DIV,
                             lambda u: u.inputs[0] is kv and u.inputs[1] is sums[0])
            need(len(divs) == 1, "selected probabilities' sum not used to renormalise")
            region += [sums[0], divs[0]]
            wv, renorm = divs[0], True
        sc = _users_of(users, wv, Op.SCATTER_ADD,
                       lambda u: u.inputs[1] is top and u.inputs[2] is wv
                       and u.attrs["axis"] == rank - 1)
        need(len(sc) == 1, "gate weights not scattered back to [.., E] at the top-k experts")
        gates = sc[0]
        z = gates.inputs[0]
        if widened(z) and z.inputs[0].op is Op.MUL and probs in z.inputs[0].inputs:
            region.append(z)               # (mixed precision: the zeros widened too)
            z = z.inputs[0]
        if z.op is Op.MUL and probs in z.inputs and _scalar(_other(z, probs)) == 0:
            region.append(z)
        else:
            need(static(z) and _is_zero(z), "gate weights scattered into a non-zero tensor")
        region.append(gates)
    else:
        raise NoMatch("top-k indices are neither one-hot compared with arange(E) nor used "
                       "to gather the probabilities")
    role["gates"] = gates
    lses = _users_of(users, widen or logits, Op.LOGSUMEXP,
                     lambda u: u.attrs["axis"] == rank - 1)
    if lses:
        need(router == "softmax", "a z-loss (logsumexp of the logits) over a sigmoid "
             "router: the fused backward keeps the sigmoid's scores, not the softmax")
        region.append(lses[0])
        role["lse"] = lses[0]
    inside = set(region)
    # the probabilities widened to fp32 (mixed precision), read outside too (e.g. a balance
    # loss over the normalised scores, sharing the cast by CSE): the body widens its own copy,
    # the graph keeps the cast, of the op's probs output
    shared = {n for n in region if n.op is Op.CAST and n.inputs[0] is probs and n is not probs
              and (n in outputs or any(u not in inside for u in users.get(n, [])))}
    inside -= shared
    named = {v: r for r, v in role.items()}
    for n in region:
        if n in shared:
            continue
        out_users = [u for u in users.get(n, []) if u not in inside]
        if (out_users or n in outputs) and n not in named:
            raise NoMatch(f"{n.op.value} inside the router is also used outside it")
    m = {"x": x, "w": w, "mm": mm, "logits": logits, "noise": noise_node, "k": k, "E": E,
         "renorm": renorm, "capacity": capacity, "carry": carry, "form": form,
         "experts": None, "dtype": dt, "probs_dtype": pdt, "residual": None,
         "router": router, "bias": bias, "groups": groups, "group_dtype": group_dtype,
         "body_only": shared,
         "score_dtype": score.type.dtype.value if score is not None else pdt}
    try:
        ex = _experts(gates, x, users, outputs, E)
    except NoMatch as e:
        m["layer_why"] = str(e)
    else:
        m["experts"] = ex
        inside |= ex["region"]
        role["y"] = ex["y"]
        add = _residual_add(ex["y"], users, outputs, inside) if residual else None
        if add is not None:
            inside.add(add)
            role["y"], m["residual"] = add, _other(add, ex["y"])
    outs = [r for r in ROLES if r in role and (
        any(u not in inside for u in users.get(role[r], [])) or role[r] in outputs)]
    need("gates" in outs or "y" in outs, "the gates are not used")
    m.update(region=inside, roles=role, outputs=outs)
    return m


def _experts(gates: Node, x: Node, users, outputs, E: int) -> dict:
    """The dense combine of every expert's gated FFN on every token:

        xe = reshape(x, [B, 1, T, d]);  ye = (act(xe @ Wg) * (xe @ W1)) @ W2   [B, E, T, d]
        y  = sum(ye * reshape(permute(gates, [0, 2, 1]), [B, E, T, 1]), 1)

    act silu (SwiGLU) or exact gelu (GeGLU); Wg, W1 [E, d, F], W2 [E, F, d] in x's dtype;
    under mixed precision xe = cast(reshape(x32)) with x = cast(x32), and ye is widened to
    fp32 before the combine."""
    need(gates.type.rank == 3, "experts not fused: gates are not [B, T, E]")
    Bd, Td, _ = gates.type.shape
    perm = _users_of(users, gates, Op.PERMUTE, lambda u: tuple(u.attrs["perm"]) == (0, 2, 1))
    need(len(perm) == 1, "experts not fused: gates not permuted to [B, E, T] for a dense "
          "gated-FFN combine")
    pr = _one_user(users, perm[0], Op.RESHAPE, "experts not fused: gates not reshaped to "
                   "[B, E, T, 1]")
    cm = _one_user(users, pr, Op.MUL, "experts not fused: no gates * expert outputs")
    ye = _other(cm, pr)
    y = _one_user(users, cm, Op.SUM, "experts not fused: weighted outputs not summed")
    need(y.attrs["axis"] == 1 and not y.attrs.get("keepdim", True),
          "experts not fused: weighted outputs not summed over the experts")
    widen = None
    if ye.op is Op.CAST and ye.inputs[0].op is Op.MATMUL and ye.type.dtype.value == "f32":
        widen, ye = ye, ye.inputs[0]             # mixed precision: cast(ye, f32) * gates
    need(ye.op is Op.MATMUL, f"experts not fused: expert outputs are {ye.op.value}, "
          "not a gated FFN's down projection")
    h, w2 = ye.inputs
    need(h.op is Op.MUL, "experts not fused: not a gated FFN (act(x Wg) * (x W1))")
    for act_n, up in (h.inputs, h.inputs[::-1]):
        if act_n.op in (Op.SILU, Op.GELU) and act_n.inputs[0].op is Op.MATMUL \
                and up.op is Op.MATMUL:
            break
    else:
        raise NoMatch("experts not fused: not a gated FFN (silu/gelu(x Wg) * (x W1))")
    need(act_n.op is Op.SILU or act_n.attrs.get("approximate", "none") == "none",
          "experts not fused: tanh-approximate gelu (the kernel's GeGLU is exact)")
    a = act_n.inputs[0]
    xe, wg = a.inputs
    xe1, w1 = up.inputs
    need(xe is xe1, "experts not fused: gate and up projections read different inputs")
    lowp = None
    if xe.op is Op.CAST and x.op is Op.CAST and xe.type.dtype == x.type.dtype:
        # mixed precision: cast(reshape(x32)) for the experts, cast(x32) for the router
        lowp, xe = xe, xe.inputs[0]
        need(xe.op is Op.RESHAPE and xe.inputs[0] is x.inputs[0],
              "experts not fused: experts do not read the router's input")
    else:
        need(xe.op is Op.RESHAPE and xe.inputs[0] is x,
              "experts not fused: experts do not read the router's input")
    d = x.type.shape[-1]
    need(x.type.rank == 3 and tuple(xe.type.shape) == (Bd, 1, Td, d),
          "experts not fused: expert input not reshaped to [B, 1, T, d]")
    for wt in (wg, w1, w2, a, up, h, ye):
        need(wt.type.dtype == x.type.dtype, "experts not fused: experts not in the router "
              "input's dtype")
    need(y.type.dtype.value == "f32", "experts not fused: combine not in fp32")
    for wt in (wg, w1, w2):
        need(wt.type.rank == 3 and wt.type.shape[0] == E,
              "experts not fused: expert weights are not [E, ., .] stacks")
    F_ = wg.type.shape[2]
    need(tuple(wg.type.shape) == (E, d, F_) == tuple(w1.type.shape)
          and tuple(w2.type.shape) == (E, F_, d),
          "experts not fused: expert weights not [E, d, F], [E, d, F], [E, F, d]")
    region = {perm[0], pr, cm, ye, h, act_n, a, up, xe, y} | {
        n for n in (widen, lowp) if n is not None}
    for n in region - {y}:
        need(n not in outputs and all(u in region for u in users.get(n, [])),
              f"experts not fused: {n.op.value} inside the experts is also used outside")
    return {"region": region, "y": y, "wg": wg, "w1": w1, "w2": w2, "a": a, "up": up, "ye": ye,
            "act": "silu" if act_n.op is Op.SILU else "gelu",
            # in the body, cast(reshape(x32)) is read as reshape(x) (the same values)
            "xe": (lowp, xe) if lowp is not None else None}


def _residual_add(y: Node, users, outputs, region) -> Optional[Node]:
    """The add of a residual stream to the layer's output y, when that is y's only use and
    the other operand (same shape and dtype) does not depend on the layer: a decode step's
    op then returns y + residual, which its down-projection kernel adds (no pointwise kernel
    after the layer)."""
    us = users.get(y, [])
    if y in outputs or len(us) != 1 or us[0].op is not Op.ADD:
        return None
    add = us[0]
    r = _other(add, y)
    if r is y or r.type.dtype != y.type.dtype or \
            tuple(r.type.shape) != tuple(y.type.shape):
        return None
    seen, todo = set(), [r]
    while todo:                               # r computed without the layer (no cycle)
        n = todo.pop()
        if n in region:
            return None
        if n not in seen:
            seen.add(n)
            todo += n.inputs
    return add


def _widened(n: Node, probs: Node) -> bool:
    """n is probs, or probs cast to f32 (a mixed-precision program's gate arithmetic)."""
    return n is probs or (n.op is Op.CAST and n.inputs[0] is probs
                          and n.type.dtype.value == "f32")


def _is_zero(n: Node) -> bool:
    while n.op in (Op.EXPAND, Op.CAST, Op.RESHAPE):
        n = n.inputs[0]
    return _scalar(n) == 0


def _capacity(cum, chosen, gates, users, static, E):
    """kept = chosen * cast((cast(cumsum(chosen, 1), int) - 1) * a < budget, f32),
    budget = reshape((iota(T) + 1) * b, [T, 1]), gates * kept: (gates', (a, b), kept, nodes,
    carry). A decode step's form (lmc/passes/decode.py) counts on from the tokens before it:
    cumsum(chosen, 1) + carry (an input [B, 1, E], the running count), and its budget reads
    the tokens' positions (an input [T]) for iota(T); carry is then (carry, positions)."""
    need(cum.attrs["axis"] == 1 and chosen.type.rank == 3,
          "capacity count not a cumsum along T of [B, T, E] choices")
    Bd, T, _ = chosen.type.shape
    count, carry, more = cum, None, []
    us = users.get(cum, [])
    if len(us) == 1 and us[0].op is Op.ADD:
        c = _other(us[0], cum)
        need(c.op is Op.INPUT and tuple(c.type.shape) == (Bd, 1, E)
             and c.type.dtype.value == "f32",
             "capacity count plus something other than a carried [B, 1, E] f32 count")
        count, carry, more = us[0], c, [us[0]]
    pos = _one_user(users, count, Op.CAST, "capacity count not cast to an integer")
    need(not pos.type.dtype.is_float, "capacity count not cast to an integer")
    sub = _one_user(users, pos, Op.SUB, "capacity test not (pos - 1) * a < budget")
    need(sub.inputs[0] is pos and _scalar(sub.inputs[1]) == 1,
          "capacity test not (pos - 1) * a < budget")
    mul = _one_user(users, sub, Op.MUL, "capacity test not (pos - 1) * a < budget")
    a = _scalar(_other(mul, sub))
    need(isinstance(a, int) and a > 0, "capacity scale a is not a positive integer constant")
    lt = _one_user(users, mul, Op.LT, "capacity test not (pos - 1) * a < budget")
    need(lt.inputs[0] is mul, "capacity test not (pos - 1) * a < budget")
    budget = lt.inputs[1]
    b, positions = _budget(budget, T, static)
    need((carry is None) == (positions is None),
          "capacity count carried from earlier tokens but the budget counts from 0, or the "
          "other way round")
    cf = _one_user(users, lt, Op.CAST, "capacity test not cast to f32")
    need(cf.type.dtype.value == "f32", "capacity test not cast to f32")
    kept = _one_user(users, cf, Op.MUL, "capacity mask not multiplied into the choices")
    need(_other(kept, cf) is chosen, "capacity mask not multiplied into the choices")
    fin = _users_of(users, kept, Op.MUL, lambda u: _other(u, kept) is gates)
    need(len(fin) == 1, "gates not multiplied by the capacity mask")
    nodes = [cum] + more + [pos, sub, mul, lt, cf, kept, fin[0]]
    # a budget from the positions input (shared by the layers) is copied into the body
    return fin[0], (a, b), kept, nodes, (carry, positions) if carry is not None else None


def _budget(n: Node, T, static):
    """reshape((iota(T) + 1) * b, [T, 1]) with b a positive integer: (b, None); in a decode
    step reshape((positions + 1) * b, [T, 1]) with positions an i64 input [T]:
    (b, positions)."""
    why = "capacity budget not reshape((iota(T) + 1) * b, [T, 1])"
    need(n.op is Op.RESHAPE and n.type.rank == 2 and n.type.shape[1] == 1, why)
    m = n.inputs[0]
    need(m.op is Op.MUL, why)
    for p, c in (m.inputs, m.inputs[::-1]):
        b = _scalar(c)
        if isinstance(b, int) and b > 0 and p.op is Op.ADD:
            for i, one in (p.inputs, p.inputs[::-1]):
                if _scalar(one) != 1:
                    continue
                if i.op is Op.IOTA and i.attrs["length"] == T and static(n):
                    return b, None
                if i.op is Op.INPUT and tuple(i.type.shape) == (T,) \
                        and i.type.dtype.value == "i64":
                    return b, i
    raise NoMatch(why)


def _body(m: dict, name: str, static) -> Graph:
    """The region as a body graph over placeholders for `_inputs(m)` (x, W_r[, the experts'
    Wg, W1, W2][, the residual][, the carried count and the positions]), the noise last."""
    from ..frontend.builder import Builder

    b = Builder({}, {})
    env: Dict[Node, Node] = {}
    for i, t in enumerate(_inputs(m)):
        env[t] = b.input(f"in{i}", t.type.shape, t.type.dtype).node
    if m["noise"] is not None:
        nz = b.input(f"in{len(_inputs(m))}", m["logits"].type.shape, "f32").node
    if m["bias"] is not None:        # the last input: no gradient reaches it through top-k
        bs = m["bias"]
        env[bs] = b.input(f"in{len(_inputs(m)) + (m['noise'] is not None)}", bs.type.shape,
                          bs.type.dtype).node

    def copy_static(i: Node) -> Node:
        # static values, and a decode step's capacity budget from its positions input
        # (an input of the op, in env)
        if i not in env:
            assert (static(i) or m["carry"] is not None) and i.op not in (Op.INPUT, Op.PARAM), i
            env[i] = Node(i.op, tuple(copy_static(j) for j in i.inputs), dict(i.attrs),
                          i.type, i.loc, i.scope)
            b.nodes.append(env[i])
        return env[i]

    xe = m["experts"]["xe"] if m["experts"] else None
    for n in m["order"]:
        if xe is not None and n is xe[1]:
            continue
        if xe is not None and n is xe[0]:
            c = Node.make(Op.RESHAPE, (env[m["x"]],), {"shape": tuple(n.type.shape)}, n.loc,
                          n.scope)
        elif n is m["noise"]:          # gaussian_noise(l) = l + noise, the same draw, in fp32
            lg = env[n.inputs[0]]
            if lg.type.dtype.value == "f32":
                c = Node.make(Op.ADD, (lg, nz), {}, n.loc, n.scope)
            else:
                wide = Node.make(Op.CAST, (lg,), {"dtype": nz.type.dtype}, n.loc, n.scope)
                b.nodes.append(wide)
                add = Node.make(Op.ADD, (wide, nz), {}, n.loc, n.scope)
                b.nodes.append(add)
                c = Node.make(Op.CAST, (add,), {"dtype": lg.type.dtype}, n.loc, n.scope)
        else:
            c = Node(n.op, tuple(copy_static(i) if i not in env else env[i]
                                 for i in n.inputs), n.attrs, n.type, n.loc, n.scope)
        env[n] = c
        b.nodes.append(c)
    roles = m["roles"]
    outs = {str(j): env[roles[r]] for j, r in enumerate(m["outputs"])}
    names = list(m["outputs"])
    saved = []
    if m["experts"]:
        for role, v in zip(SAVED_ROLES, _slot_values(m, env, b.nodes)):
            saved.append(str(len(names)))
            outs[saved[-1]] = v
            names.append(role)
    body = Graph(name, b.nodes, outs)
    body.meta["module"] = "moe"                  # lmc/codegen/moe.py's launch_template
    body.meta["template"] = _kind(m)
    if saved:
        body.meta["saved"] = saved
    body.meta["options"] = {"k": m["k"], "E": m["E"], "router": m["router"],
                            "renormalise": m["renorm"], "noise": m["noise"] is not None,
                            "capacity": m["capacity"], "carry": m["carry"] is not None,
                            "bias": m["bias"] is not None, "groups": m["groups"],
                            "group_dtype": m["group_dtype"],
                            "residual": m["residual"] is not None,
                            "outputs": tuple(names),
                            "act": m["experts"]["act"] if m["experts"] else None,
                            "dtype": m["dtype"], "probs_dtype": m["probs_dtype"],
                            "score_dtype": m["score_dtype"]}
    return body


def _slot_values(m: dict, env: Dict[Node, Node], nodes: List[Node]) -> List[Node]:
    """What the layer's backward reads, per (token, slot): the pre-activations a = x Wg,
    b = x W1 [B, T, k, F] and the expert outputs [B, T, k, d] of the slot's expert, gathered
    from the dense [B, E, T, .] values (0 for a slot over capacity, which the kernels never
    compute), through stop_gradient: saved values take no cotangent."""
    ex, top = m["experts"], env[m["roles"]["idx"]]
    Bd, Td, k = top.type.shape

    def add(op, ins, **attrs):
        n = Node.make(op, tuple(ins), attrs, top.loc, top.scope)
        nodes.append(n)
        return n
    kept = add(Op.GATHER, (env[m["roles"]["kept"]], top), axis=2) if m["capacity"] else None
    slot = add(Op.RESHAPE, (top,), shape=(Bd, Td, k, 1))
    vals = []
    for n in (ex["a"], ex["up"], ex["ye"]):
        v = env[n]                                                       # [B, E, T, c]
        c = v.type.shape[-1]
        g = add(Op.GATHER, (add(Op.PERMUTE, (v,), perm=(0, 2, 1, 3)),
                            add(Op.EXPAND, (slot,), shape=(Bd, Td, k, c))), axis=2)
        if kept is not None:
            g = add(Op.MUL, (g, add(Op.CAST, (add(Op.RESHAPE, (kept,), shape=(Bd, Td, k, 1)),),
                                    dtype=v.type.dtype)))
        vals.append(add(Op.STOP_GRADIENT, (g,)))
    return vals


def _inputs(m: dict) -> List[Node]:
    """The fused op's inputs before the noise: x, W_r, for the whole layer Wg, W1, W2, in a
    decode step the residual its y adds (`residual=True`) and, with a capacity, the carried
    count [B, 1, E] and the positions [T]."""
    ex = m["experts"]
    return [m["x"], m["w"]] + ([ex["wg"], ex["w1"], ex["w2"]] if ex else []) + \
        ([m["residual"]] if m["residual"] is not None else []) + list(m["carry"] or ())


def _kind(m: dict) -> str:
    return "moe_layer" if m["experts"] else "moe_gating"


def _reason(m: dict) -> str:
    parts = [f"{m['router']} top-{m['k']} of {m['E']} ({m['form']})"]
    if m["probs_dtype"] != "f32":
        parts.append(f"router in {m['dtype']}: experts picked from rounded probabilities")
    elif m["dtype"] != "f32":
        parts.append(f"router logits in {m['dtype']}, softmax in f32")
    if m["noise"] is not None:
        parts.append(f"gaussian noise std {m['noise'].attrs['std']:g}")
    if m["bias"] is not None:
        parts.append("experts picked by probabilities + a selection bias")
    if m["groups"] is not None:
        G, kept, gm = m["groups"]
        parts.append(f"group-limited: among the top {kept} of {G} groups (scored by their "
                     f"top {gm})")
    parts.append("renormalised" if m["renorm"] else "not renormalised")
    if m["capacity"]:
        parts.append("capacity (pos-1)*%d < (t+1)*%d" % m["capacity"])
    if m["carry"]:
        parts.append("counts carried from earlier tokens (decode state)")
    if m["experts"]:
        act = {"silu": "SwiGLU", "gelu": "GeGLU"}[m["experts"]["act"]]
        parts.append(f"{act} experts: sorted dispatch, grouped GEMMs, combine")
        if m["residual"] is not None:
            parts.append("residual added")
    else:
        parts.append(f"gating only ({m.get('layer_why', 'experts not fused')})")
    parts.append("outputs " + ", ".join(m["outputs"]))
    return "; ".join(parts)


def fuse_moe_gating(g: Graph, residual: bool = False) -> Graph:
    """`residual` (a decode step's, codegen.program.DECODE_PASS_OPTIONS): a whole layer's op
    also takes the residual add after it (y + r, r an input of the op); the training graphs
    leave that add to the kernels after the layer, as the layer's backward op is the body's."""
    users = g.users()
    static: Dict[Node, bool] = {}
    for n in g.nodes:
        static[n] = (n.op not in (Op.INPUT, Op.PARAM) and n.op.kind is not Kind.RANDOM
                     and all(static[i] for i in n.inputs))
    outputs = set(g.outputs.values())
    records, matches = [], []
    taken: set = set()
    # a group-limited router's own top-ks (each group's top scores, the kept groups) are
    # part of the router: its record says what became of them
    inner: set = set()
    for n in g.nodes:
        if n.op is Op.TOPK and n.inputs[0].op is Op.WHERE:
            try:
                inner |= {t for t in _group_structure(n.inputs[0],
                                                      lambda t: static.get(t, False))[2]
                          if t.op is Op.TOPK}
            except NoMatch:
                pass
    for n in g.nodes:
        # candidates: every top-k (a router picks its experts with one)
        if n.op is not Op.TOPK or n in inner:
            continue
        try:
            m = match(n, users, lambda t: static.get(t, False), outputs, residual)
            need(not (m["region"] & taken), "overlaps another router region")
        except NoMatch as e:
            records.append({"pass": "fuse_moe_gating", "status": "declined",
                            "where": _where(n), "reason": str(e)})
            continue
        m["order"] = [x for x in g.nodes if x in m["region"] or x in m["body_only"]]
        taken |= m["region"]
        matches.append(m)
    regions = []
    for i, m in enumerate(matches):
        name = f"lmc_{_kind(m)}_{i}"
        body = _body(m, name, lambda t: static.get(t, False))
        loc, scope = m["logits"].loc, m["logits"].scope
        ins = _inputs(m)
        if m["noise"] is not None:     # the same draw, from zeros: the noise alone
            # fp32 zeros: the noise as the oracle adds it (to the logits widened to fp32)
            nl, dt = m["noise"].loc, DType.f32
            zero = Node.make(Op.CONST, [], {"value": 0.0, "dtype": dt}, nl, scope)
            zeros = Node.make(Op.EXPAND, [zero], {"shape": tuple(m["logits"].type.shape)},
                              nl, scope)
            s0 = m["noise"].inputs[1]
            seed = Node.make(Op.CONST, [], dict(s0.attrs), s0.loc, s0.scope)
            ins.append(Node.make(Op.GAUSSIAN_NOISE, [zeros, seed], dict(m["noise"].attrs),
                                 nl, scope))
        if m["bias"] is not None:
            ins.append(m["bias"])
        # no gradient to the carried count, positions, noise and selection bias
        first = len(ins) - len(m["carry"] or ()) - (m["noise"] is not None) - \
            (m["bias"] is not None)
        fused = Node.make(Op.FUSED, ins,
                          {"kernel": name, "kind": _kind(m), "body": body,
                           "no_grad": tuple(range(first, len(ins)))}, loc, scope)
        extra = [None] * len(SAVED_ROLES) if m["experts"] else []
        regions.append(Region(fused, [m["roles"][r] for r in m["outputs"]] + extra,
                              m["region"]))
        records.append({"pass": "fuse_moe_gating", "status": "fused",
                        "where": _where(m["logits"]), "reason": _reason(m)})
    return splice(g, regions, records)
