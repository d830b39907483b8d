"""Mixture-of-experts kernels: fused top-k gating and sorted dispatch with grouped GEMMs, their
backward, autograd wrappers and the torch references they are tested against. The kernel half
of issue 8; the `fuse_moe_gating` pass replaces the zoo's dense router region with `moe_gating`
and the dense "every expert on every token, then mask" form with `moe_layer`.

The math, exactly the zoo's (blues01 / minimax `moe` blocks, medit_one's `routed` gate), per
token t of a [B, T] batch flattened to N = B*T rows:

    logits_t = x_t @ W_r (+ noise_t)          noise given as a tensor (the zoo's gaussian_noise
                                              is drawn outside), so everything is deterministic
    p_t      = softmax(logits_t) in fp32;  lse_t = logsumexp(logits_t)  (z-loss)
               (or p_t = sigmoid(logits_t), a sigmoid router's independent scores: the
               backward's dlogits = dp p (1 - p); no z-loss gradient then)
    top      = the k largest p_t (1 <= k <= 8), or of p_t + bias (DeepSeek-V3's balancing
               bias: it selects, the weights below stay p's); ties go to the lower expert
               index (the zoo's topk is a stable descending sort). Group-limited
               (DeepSeek-V3, groups = (G, kept, m)): the E experts are G consecutive groups,
               each scored by the sum of its m (1 or 2) largest selection scores; the top k
               is taken among the experts of the `kept` best groups only
    w_tj     = p_t[top_j] / sum_j' p_t[top_j']          (renormalize=True; else p_t[top_j])
    capacity (optional, minimax): per sequence along T, pos_te = number of tokens s <= t of the
               same sequence that chose e; slot j of token t is kept iff
               (pos_{t,top_j} - 1) * E * 100 < capacity_pct * k * (t + 1);  dropped slots get
               weight 0 (renormalised before dropping, as GShard/the zoo)
    stats    counts_e = slots choosing e (f_e = counts_e / (N k)), kept_e = slots kept,
               prob_sum_e = sum_t p_te (P_e = prob_sum_e / N)
    y_t      = sum_j w_tj FFN_{top_j}(x_t),  FFN_e(u) = (act(u Wg_e) * (u W1_e)) W2_e,
               act = silu (SwiGLU, minimax) or exact-erf gelu (GeGLU, blues01)

Kernels (all grids from sizes known on the host or upper bounds of them: no host sync):

    _gate_fwd      one launch: router matmul, noise, softmax, top-k, renormalisation, capacity
                   and per-program partial stats. Without capacity one program per block of
                   tokens; with capacity one program per sequence walking its tokens in order
                   with running per-expert counts (the block-local inclusive count is a
                   triangular [BT, BT] x [BT, E] dot of 0/1 values, exact in fp16). Writes
                   idx/weights/kept [N, k], probs [N, E] fp32 (saved for the backward: E
                   values per token, the only E x N tensor) and lse [N].
    _gate_bwd      d logits from the gradients of the weights, prob sums and lse:
                     dp_i = (g_i kept_i - sum_j g_j w_j) / S  (selected i; S = sum of the k
                     selected p; without renormalisation dp_i = g_i kept_i) + d prob_sum,
                     dlogits = p * (dp - <p, dp>) + dlse * p
                   then dx = dlogits W_r^T and dW_r = x^T dlogits as two small matmuls.
    _route_hist    per block of the N*k (token, slot) assignments: block-local rank of each
                   kept assignment within its expert (triangular dot) and block histograms;
                   torch cumsums over the [blocks, E] histograms give the expert offsets and
                   each block's offset within an expert (device-side prefix sums).
    _route_scatter sorted position of every kept assignment: expert_off + block_off + rank;
                   writes the sorted token ids, slot ids (t k + j) and weights and each
                   slot's sorted row (-1 when dropped). Order inside an expert: token order
                   (deterministic).
    _gmm           grouped GEMM over the sorted rows: program (row tile, column tile); the row
                   tile's expert is found from the device-side tile table (tile_end = cumsum
                   of ceil(count_e / BM)), the grid uses the bound ceil(N k / BM) + E and idle
                   programs return. Modes: up projection with the gated epilogue (stores the
                   pre-activations a, b for the backward and h = act(a) * b), plain product
                   (down projection), dh with the gated backward epilogue (da, db), and the
                   two-term product da Wg^T + db W1^T (dx of the sorted rows). Rows of x are
                   gathered through the sorted token ids; nothing is copied into sorted order.
                   Two row layouts: sorted (h, da, db: operands of the next product) and
                   slot (a, b, the expert outputs Y and dx: row t k + j for token t's slot j,
                   written through the sorted slot ids), so the combine reads each token's k
                   rows in place and the saved a, b, Y are values the dense oracle also
                   computes (gathered per slot; fuse_moe_gating's body saves them).
    _wgrad         per expert dW_e = A_e^T D_e, looping over that expert's rows (a loop bound
                   read from device memory); for dW2 A_e = h is rebuilt from the saved a, b.
    _combine       y_t = sum_j w_tj Y[t k + j] over kept slots (no atomics: deterministic);
                   also sums the slots' dx back to tokens (weights 1).
    _combine_bwd   dw_tj = <dy_t, Y[t k + j]>.

Few tokens (N k <= E, nothing saved for a backward: a decode step; `direct`): no routing.
    _direct_up     per kept slot and column tile: h = act(x_t Wg_e) * (x_t W1_e), reading
                   the slot's expert's rows itself (e from the gating's idx).
    _direct_down   per token and column tile: y_t = sum_j w_tj (h_tj W2_e) in slot order.
    Three launches (gating, up, down) reading the k chosen experts' weights per token, where
    the dense step graph reads all E. A decode step's capacity counts on from the sequence's
    earlier tokens: _gate_fwd starts its running counts from the carried state [B, E] and
    tests against the tokens' positions (`carry`), and stores the running count after the
    step's tokens, the next step's state (`count`); it writes the 0/1 choices itself when
    the graph reads them (`chosen`).

The backward reads the forward's a, b, Y (and reruns only the gating and the routing, a few
launches over [N, E] and [N k] values): its expert products are dh (with da, db), dx and the
three weight gradients, none of the forward's three.

Matmuls accumulate in fp32; a, b, h, Y are stored in x's dtype (as torch autocast would keep
them); fp32 inputs use IEEE dots (no tf32).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..errors import LmcError
from . import interpreter_blocks

ACTS = ("silu", "gelu")
MAX_K = 8            # experts per token: the gating kernels unroll k argmax passes
GPU_GEMM = dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
# fp32 operands: half the K step, or the two-term product (four operand tiles per stage)
# needs 256 KiB of shared memory, over the H100's 227 KiB (benchmarks/compile_check.py)
GPU_GEMM_F32 = dict(GPU_GEMM, BK=32)
CPU_GEMM = dict(BM=16, BN=32, BK=32)


def _interpret() -> bool:
    """Interpreter block sizes (codegen.interpreter_blocks)."""
    return interpreter_blocks()


def _p2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


# -- gating -------------------------------------------------------------------------------------
@triton.jit
def _round(v, ROUND: tl.constexpr):
    """v rounded to the dtype a mixed-precision program stores it in (1 f16, 2 bf16), as fp32:
    the logits and probabilities the oracle's top-k compares."""
    if ROUND == 1:
        return v.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        return v.to(tl.bfloat16).to(tl.float32)
    else:
        return v


@triton.jit
def _group_limit(sc, cols, EG, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                 GROUP_TOP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                 BG: tl.constexpr, ROUND_G: tl.constexpr):
    """Group-limited routing (DeepSeek-V3's): the experts are GROUPS consecutive groups of EG;
    a group's score is the sum of its GROUP_TOP largest selection scores (1: its maximum);
    the TOPK_GROUPS best groups stay (ties to the lower group), the other experts' scores
    become -inf, so the top-k that follows picks only inside the kept groups. ROUND_G: the
    group scores rounded as the program stores them (0: fp32)."""
    gcol = cols // EG                                # each expert's group
    gc = tl.arange(0, BG)
    gs = tl.full([BT, BG], float("-inf"), tl.float32)
    for g in tl.static_range(GROUPS):
        sg = tl.where(gcol[None, :] == g, sc, float("-inf"))
        tot = tl.zeros([BT], tl.float32)
        for j in tl.static_range(GROUP_TOP):
            v = tl.max(sg, 1)
            i = tl.min(tl.where(sg == v[:, None], cols[None, :], BE), 1)
            tot += v
            sg = tl.where(cols[None, :] == i[:, None], float("-inf"), sg)
        gs = tl.where(gc[None, :] == g, _round(tot, ROUND_G)[:, None], gs)
    keep = gcol[None, :] < 0                         # [1, BE], all false
    for j in tl.static_range(TOPK_GROUPS):
        v = tl.max(gs, 1)
        gi = tl.min(tl.where(gs == v[:, None], gc[None, :], BG), 1)
        keep = keep | (gcol[None, :] == gi[:, None])
        gs = tl.where(gc[None, :] == gi[:, None], float("-inf"), gs)
    return tl.where(keep, sc, float("-inf"))


@triton.jit
def _gate_fwd(X, WR, NOISE, IDX, WOUT, KEPT, PROBS, LSE, PART, CARRY, POS, CHOSEN, COUNT,
              BIAS,
              N, T, D, E, n_iter, cap_a, cap_b,
              sxn, sxd, swd, swe, snn, sne,
              K: tl.constexpr, RENORM: tl.constexpr, HAS_NOISE: tl.constexpr,
              CAP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
              DOT_PREC: tl.constexpr, ROUND: tl.constexpr = 0, ROUND_P: tl.constexpr = 0,
              HAS_CARRY: tl.constexpr = False, HAS_CHOSEN: tl.constexpr = False,
              SIGMOID: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
              ROUND_S: tl.constexpr = 0, GROUPS: tl.constexpr = 0,
              TOPK_GROUPS: tl.constexpr = 0, GROUP_TOP: tl.constexpr = 2,
              BG: tl.constexpr = 1, ROUND_G: tl.constexpr = 0):
    pid = tl.program_id(0)
    cols = tl.arange(0, BE)
    emask = cols < E
    ar = tl.arange(0, BT)
    dr = tl.arange(0, BD)
    if CAP:
        base = pid * T          # one program per sequence, tokens in order
        limit = base + T
    else:
        base = pid * BT
        limit = N
    running = tl.zeros([BE], tl.float32)     # slots per expert so far in this sequence
    if HAS_CARRY:                            # a decode step: the count before its tokens
        running += tl.load(CARRY + pid * E + cols, mask=emask, other=0.0)
    cnt = tl.zeros([BE], tl.float32)
    kcnt = tl.zeros([BE], tl.float32)
    psum = tl.zeros([BE], tl.float32)
    tri = (ar[None, :] <= ar[:, None]).to(tl.float16)     # [r, r'] = r' <= r
    for it in range(0, n_iter):
        rows = base + it * BT + ar
        rmask = rows < limit
        acc = tl.zeros([BT, BE], tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + dr
            xk = tl.load(X + rows[:, None] * sxn + dd[None, :] * sxd,
                         mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
            wk = tl.load(WR + dd[:, None] * swd + cols[None, :] * swe,
                         mask=(dd[:, None] < D) & emask[None, :], other=0.0)
            acc = tl.dot(xk, wk, acc=acc, input_precision=DOT_PREC)
        logits = _round(acc, ROUND)
        if HAS_NOISE:
            nz = tl.load(NOISE + rows[:, None] * snn + cols[None, :] * sne,
                         mask=rmask[:, None] & emask[None, :], other=0.0)
            logits = _round(logits + nz.to(tl.float32), ROUND)
        logits = tl.where(emask[None, :], logits, float("-inf"))
        m = tl.max(logits, 1)
        ex = tl.exp(logits - m[:, None])
        s = tl.sum(ex, 1)
        if SIGMOID:     # independent scores per expert (DeepSeek-V3's router), not a softmax
            p = _round(tl.sigmoid(logits), ROUND_P)
        else:
            p = _round(ex / s[:, None], ROUND_P)
        tl.store(LSE + rows, m + tl.log(s), mask=rmask)
        tl.store(PROBS + rows[:, None] * E + cols[None, :], p,
                 mask=rmask[:, None] & emask[None, :])
        # top-k: the k largest selection scores (p, or p + bias: DeepSeek-V3's balancing
        # bias picks the experts, the weights stay p), ties to the lowest index (a stable
        # descending sort); k passes of argmax over the [BT, BE] tile
        if HAS_BIAS:
            bias = tl.load(BIAS + cols, mask=emask, other=0.0).to(tl.float32)
            sc = _round(p + bias[None, :], ROUND_S)
        else:
            sc = p
        sc = tl.where(emask[None, :], sc, float("-inf"))
        if GROUPS > 0:
            sc = _group_limit(sc, cols, E // GROUPS, GROUPS, TOPK_GROUPS, GROUP_TOP, BT, BE,
                              BG, ROUND_G)
        self_f = tl.zeros([BT, BE], tl.float32)
        scm = sc
        for j in tl.static_range(K):
            v = tl.max(scm, 1)
            i = tl.min(tl.where(scm == v[:, None], cols[None, :], BE), 1)
            s_j = cols[None, :] == i[:, None]
            self_f += s_j.to(tl.float32)
            scm = tl.where(s_j, float("-inf"), scm)
        self_f = tl.where(rmask[:, None], self_f, 0.0)
        sel = self_f > 0
        # the selected p's sum over the experts axis, as the oracle's sum(p * chosen, -1)
        tot = tl.sum(tl.where(sel, p, 0.0), 1)
        if HAS_CHOSEN:                       # the dense 0/1 [N, E] choices (the zoo's chosen)
            tl.store(CHOSEN + rows[:, None] * E + cols[None, :], self_f,
                     mask=rmask[:, None] & emask[None, :])
        cnt += tl.sum(self_f, 0)
        psum += tl.sum(tl.where(rmask[:, None] & emask[None, :], p, 0.0), 0)
        if CAP:
            local = tl.dot(tri, self_f.to(tl.float16), out_dtype=tl.float32)   # inclusive
            pos = (running[None, :] + local).to(tl.int64)
            t = (rows - base).to(tl.int64)
            if HAS_CARRY:                    # the tokens' positions in their sequence
                t = tl.load(POS + (rows - base), mask=rmask, other=0).to(tl.int64)
            ok = (pos - 1) * cap_a < (t[:, None] + 1) * cap_b
            keep = sel & ok
            running += tl.sum(self_f, 0)
        else:
            keep = sel
        kcnt += tl.sum(keep.to(tl.float32), 0)
        # the slots in rank order: the same k argmax passes again (cheap next to the matmul)
        scm = sc
        for j in tl.static_range(K):
            v = tl.max(scm, 1)
            i = tl.min(tl.where(scm == v[:, None], cols[None, :], BE), 1)
            s_j = cols[None, :] == i[:, None]
            pj = tl.sum(tl.where(s_j, p, 0.0), 1)
            if RENORM:
                wj = pj / tot
            else:
                wj = pj
            if CAP:
                kj = tl.sum(tl.where(s_j & keep, 1, 0), 1) > 0
            else:
                kj = rmask
            tl.store(IDX + rows * K + j, i, mask=rmask)
            tl.store(WOUT + rows * K + j, tl.where(kj, wj, 0.0), mask=rmask)
            tl.store(KEPT + rows * K + j, kj.to(tl.int32), mask=rmask)
            scm = tl.where(s_j, float("-inf"), scm)
    if HAS_CARRY:                            # the running count the next step starts from
        tl.store(COUNT + pid * E + cols, running, mask=emask)
    tl.store(PART + pid * 3 * BE + cols, cnt)
    tl.store(PART + pid * 3 * BE + BE + cols, kcnt)
    tl.store(PART + pid * 3 * BE + 2 * BE + cols, psum)


@triton.jit
def _gate_bwd(PROBS, IDX, KEPT, WOUT, DW, DPSUM, DLSE, DPROBS, DLOG, N, E,
              K: tl.constexpr, RENORM: tl.constexpr, HAS_DW: tl.constexpr,
              HAS_DPSUM: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_DPROBS: tl.constexpr,
              BT: tl.constexpr, BE: tl.constexpr, SIGMOID: tl.constexpr = False):
    pid = tl.program_id(0)
    cols = tl.arange(0, BE)
    emask = cols < E
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < N
    m2 = rmask[:, None] & emask[None, :]
    p = tl.load(PROBS + rows[:, None] * E + cols[None, :], mask=m2, other=0.0)
    dp = tl.zeros([BT, BE], tl.float32)
    if HAS_DW:
        g = tl.zeros([BT, BE], tl.float32)       # the slots' weight gradients, at their expert
        sel_f = tl.zeros([BT, BE], tl.float32)
        gw = tl.zeros([BT], tl.float32)          # sum_j g_j w_j
        for j in tl.static_range(K):
            i = tl.load(IDX + rows * K + j, mask=rmask, other=0)
            gj = tl.load(DW + rows * K + j, mask=rmask, other=0.0) * \
                tl.load(KEPT + rows * K + j, mask=rmask, other=0).to(tl.float32)
            s_j = cols[None, :] == i[:, None]
            g += tl.where(s_j, gj[:, None], 0.0)
            sel_f += s_j.to(tl.float32)
            if RENORM:
                gw += gj * tl.load(WOUT + rows * K + j, mask=rmask, other=0.0)
        sel = sel_f > 0
        if RENORM:
            tot = tl.sum(tl.where(sel, p, 0.0), 1)
            tot = tl.where(rmask, tot, 1.0)
            dp = tl.where(sel, (g - gw[:, None]) / tot[:, None], 0.0)
        else:
            dp = g
    if HAS_DPSUM:
        dp += tl.load(DPSUM + cols, mask=emask, other=0.0)[None, :]
    if HAS_DPROBS:     # a dense [N, E] gradient of the probabilities (fp32, contiguous)
        dp += tl.load(DPROBS + rows[:, None] * E + cols[None, :], mask=m2, other=0.0)
    if SIGMOID:         # p = sigmoid(l): dl = dp p (1 - p) (no lse: the host refuses one)
        dl = dp * p * (1.0 - p)
    else:
        dl = p * (dp - tl.sum(p * dp, 1)[:, None])
    if HAS_DLSE:
        dl += tl.load(DLSE + rows, mask=rmask, other=0.0)[:, None] * p
    tl.store(DLOG + rows[:, None] * E + cols[None, :], dl, mask=m2)


class Gating(NamedTuple):
    """The fused gating's results for N tokens, k slots, E experts."""
    idx: Tensor          # [N, k] int32 expert of each slot (by descending p, ties low index)
    weight: Tensor       # [N, k] fp32 combine weights (0 for dropped slots)
    kept: Tensor         # [N, k] int32 1 = within capacity (always 1 without capacity)
    counts: Tensor       # [E] fp32 slots choosing e (before capacity)
    kept_counts: Tensor  # [E] fp32 slots kept
    prob_sum: Tensor     # [E] fp32 sum over tokens of p_e (differentiable)
    lse: Tensor          # [N] fp32 logsumexp of the (noisy) router logits (differentiable)
    probs: Tensor        # [N, E] fp32 router probabilities (saved for the backward)
    count: Optional[Tensor] = None   # [B, E] fp32 with a carry: the running count after
    sigmoid: bool = False            # probs are sigmoid(logits), not their softmax


_ROUND = {None: 0, torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}   # _round's codes


def _gate_blocks(BE: int = 16):
    """(tokens, d) per block of the gating kernels: fewer tokens for wide routers, so the
    [tokens, E] fp32 tiles (logits, probabilities, scores, choices) stay at 4096 values each
    (Qwen3-MoE's 128 experts: 32 tokens; DeepSeek-V3's 256: 16)."""
    if _interpret():
        return 16, 32
    return max(16, min(64, 4096 // BE)), 64


def _gating_forward(x, w_router, noise, k, renormalize, capacity_pct, seq_len,
                    capacity=None, round_to=None, carry=None, chosen=None,
                    count=None, probs_round=None, sigmoid=False, bias=None,
                    score_round=None, groups=None, group_round=None) -> Gating:
    """capacity = (a, b) states the capacity test directly: slot kept iff
    (pos - 1) * a < (t + 1) * b (capacity_pct c is (E * 100, c * k)). round_to (torch.float16
    or torch.bfloat16): the logits, noisy logits and probabilities are rounded to it, as a
    mixed-precision program stores them, and the top-k compares the rounded values;
    probs_round (default round_to; torch.float32: not rounded) is the probabilities' own
    (mixed_precision's softmax is fp32 over low-precision logits). carry
    (a decode step, with a capacity) = (counts [B, E] f32 of the sequences' earlier choices,
    positions [T] of the step's tokens): pos counts on from the counts, t is the position.
    chosen: a contiguous fp32 [N, E] tensor the kernel writes the 0/1 choices into. With a
    carry the result's `count` [B, E] is the running count after the tokens (written into
    `count` when given). sigmoid: the probabilities are sigmoid(logits) (a sigmoid router,
    DeepSeek-V3's: top-k and renormalisation as for a softmax's); lse is logsumexp(logits).
    bias [E]: the experts are the top k of p + bias, rounded to score_round (default: as the
    probabilities are), the weights still p's (DeepSeek-V3's load-balancing bias: it picks,
    it does not weigh). groups = (G, kept, m): group-limited routing (DeepSeek-V3's): the
    experts are G consecutive groups; the `kept` groups whose m largest scores sum highest
    (m 1: the largest alone) are the only ones the top k picks from; group_round: the group
    scores' rounding (default: as the selection scores')."""
    N, D = x.shape
    E = w_router.shape[1]
    dev = x.device
    BE = _p2(E)
    BT, BD = _gate_blocks(BE)
    if bias is not None:
        bias = bias.reshape(E).contiguous()
    if capacity is None and capacity_pct is not None:
        capacity = (E * 100, int(capacity_pct) * k)
    cap = capacity is not None
    if cap:
        T = int(seq_len)
        if T <= 0 or N % T:
            raise ValueError(f"capacity needs N = B*T tokens with seq_len T: N={N}, T={seq_len}")
        grid, n_iter = N // T, triton.cdiv(T, BT)
    else:
        T, grid, n_iter = N, triton.cdiv(N, BT), 1
    grid = max(grid, 1)
    idx = torch.empty((N, k), dtype=torch.int32, device=dev)
    w = torch.empty((N, k), dtype=torch.float32, device=dev)
    kept = torch.empty((N, k), dtype=torch.int32, device=dev)
    probs = torch.empty((N, E), dtype=torch.float32, device=dev)
    lse = torch.empty((N,), dtype=torch.float32, device=dev)
    part = torch.empty((grid, 3, BE), dtype=torch.float32, device=dev)
    nz = noise if noise is not None else probs
    sn = noise.stride() if noise is not None else (0, 0)
    extra = {} if _interpret() else dict(num_warps=4)
    if carry is not None:
        if not cap:
            raise ValueError("carried counts need a capacity")
        counts = carry[0].reshape(grid, E).float().contiguous()
        positions = carry[1].reshape(T).contiguous()
        extra["HAS_CARRY"] = True
        if count is None:
            count = torch.empty((grid, E), dtype=torch.float32, device=dev)
        assert count.is_contiguous() and count.dtype == torch.float32 and \
            count.numel() == grid * E
    else:
        counts, positions, count = probs, idx, None      # not read
    if chosen is not None:
        assert chosen.is_contiguous() and chosen.dtype == torch.float32 and \
            chosen.shape == (N, E), chosen.shape
        extra["HAS_CHOSEN"] = True
    round_p = _ROUND[round_to if probs_round is None else probs_round]
    round_s = _ROUND[score_round] if score_round is not None else round_p
    round_g = _ROUND[group_round] if group_round is not None else round_s
    _gate_fwd[(grid,)](x, w_router, nz, idx, w, kept, probs, lse, part, counts, positions,
                       chosen if chosen is not None else probs,
                       count if count is not None else probs,
                       bias if bias is not None else probs,
                       N, T, D, E, n_iter, *(map(int, capacity) if cap else (0, 0)),
                       *x.stride(), *w_router.stride(), *sn,
                       K=k, RENORM=bool(renormalize), HAS_NOISE=noise is not None, CAP=cap,
                       BT=BT, BD=BD, BE=BE,
                       DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
                       ROUND=_ROUND[round_to],
                       ROUND_P=round_p, SIGMOID=bool(sigmoid), HAS_BIAS=bias is not None,
                       ROUND_S=round_s, **_group_args(groups, E, k, round_g), **extra)
    stats = part.sum(0)[:, :E]
    return Gating(idx, w, kept, stats[0], stats[1], stats[2], lse, probs,
                  count.view(grid, E) if count is not None else None, bool(sigmoid))


MAX_GROUPS = 16


def _group_args(groups, E: int, k: int, round_g: int) -> dict:
    """The gating kernel's group-limit constexprs (none without groups); round_g: the group
    scores' rounding."""
    if groups is None:
        return {}
    G, kept, m = (int(v) for v in groups)
    if not (1 <= G <= MAX_GROUPS and E % G == 0 and 1 <= kept <= G and m in (1, 2)
            and m <= E // G and kept * (E // G) >= k):
        raise ValueError(f"groups {groups}: need G in 1..{MAX_GROUPS} dividing E={E}, "
                         f"1 <= kept <= G, m in (1, 2) within a group, and kept groups "
                         f"holding at least k={k} experts")
    return dict(GROUPS=G, TOPK_GROUPS=kept, GROUP_TOP=m, BG=_p2(G, 2), ROUND_G=round_g)


def _gating_backward(g: Gating, dw, dpsum, dlse, k, renormalize, dprobs=None) -> Tensor:
    """d logits [N, E] fp32 from the gradients of weight [N, k], prob_sum [E], lse [N] and
    (optionally) the probabilities themselves [N, E]."""
    N, E = g.probs.shape
    if g.sigmoid and dlse is not None:
        raise ValueError("the gradient of logsumexp(logits) of a sigmoid router needs the "
                         "softmax the kernels do not keep")
    BT = _gate_blocks(_p2(E))[0]
    dlog = torch.empty_like(g.probs)
    f32 = (lambda t: t.float().contiguous() if t is not None else None)
    dw, dpsum, dlse, dprobs = f32(dw), f32(dpsum), f32(dlse), f32(dprobs)
    _gate_bwd[(max(triton.cdiv(N, BT), 1),)](
        g.probs, g.idx, g.kept, g.weight, dw if dw is not None else g.weight,
        dpsum if dpsum is not None else g.probs, dlse if dlse is not None else g.probs,
        dprobs if dprobs is not None else g.probs,
        dlog, N, E, K=k, RENORM=bool(renormalize), HAS_DW=dw is not None,
        HAS_DPSUM=dpsum is not None, HAS_DLSE=dlse is not None,
        HAS_DPROBS=dprobs is not None, BT=BT, BE=_p2(E), SIGMOID=g.sigmoid)
    return dlog


def _check_gating(x, w_router, noise, k, capacity_pct, seq_len):
    if x.dim() != 2 or w_router.dim() != 2 or w_router.shape[0] != x.shape[1]:
        raise ValueError(f"x must be [N, d] and w_router [d, E]: got {list(x.shape)}, "
                         f"{list(w_router.shape)}")
    if not 1 <= k <= MAX_K or w_router.shape[1] < k:
        raise ValueError(f"top-k needs 1 <= k <= {MAX_K} and at least k experts: k={k}, "
                         f"E={w_router.shape[1]}")
    if noise is not None and tuple(noise.shape) != (x.shape[0], w_router.shape[1]):
        raise ValueError(f"noise must be [N, E]: got {list(noise.shape)}")
    if capacity_pct is not None and seq_len is None:
        raise ValueError("capacity needs seq_len (the capacity runs per sequence along T)")


def _dtheta(x, w_router, dlog, need_x, need_w, dx=None):
    """The router's input and weight gradients from d logits [N, E] (fp32): dx = dlog
    W_r^T (into `dx` when given), dW_r = x^T dlog, each one launch reading x and W_r in their
    own dtypes (fp32 accumulation, no widened copies)."""
    if need_x:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if dx is None else dx
        combine(None, None, None, dx, router=(dlog, w_router))
    else:
        dx = None
    return dx, (router_wgrad(x, dlog).to(w_router.dtype) if need_w else None)


def router_wgrad(x: Tensor, dlog: Tensor) -> Tensor:
    """x^T dlog [D, E] in fp32 for x [N, D] and dlog [N, E] fp32 (`_router_wgrad`: split
    along the tokens, the splits added in order)."""
    N, D = x.shape
    E = dlog.shape[1]
    BN, BD = (16, 32) if _interpret() else (64, 64)
    rows = max(BN, triton.cdiv(triton.cdiv(max(N, 1), 128), BN) * BN)   # ~128 splits at most
    S = max(triton.cdiv(N, rows), 1)
    part = torch.empty((S, D, E), dtype=torch.float32, device=x.device)
    _router_wgrad[(triton.cdiv(D, BD), S)](x, dlog.contiguous(), part, N, D, E, *x.stride(),
                                           rows, BN=BN, BD=BD, BE=_p2(E))
    return part.sum(0) if S > 1 else part[0]


def combine(Y, slot, wgt, out, *, weighted=False, router=None, zero=None) -> None:
    """`_combine` into out [N, D]: the slots' rows of Y [N k, D] (slot layout; None: no
    slots), weighted by wgt [N, k] when `weighted`; router = (dlog [N, E] fp32, W_r [D, E]):
    plus dlog W_r^T; zero = (pa, pb) [N k, F]: the dropped slots' rows of Y, pa and pb set
    to zero."""
    N, D = out.shape
    BT, BD = (16, 32) if _interpret() else (32, 128)
    dlog, wr = router if router is not None else (out, out)
    dlog = dlog.contiguous()             # read as [N, E] rows
    pa, pb = zero if zero is not None else (out, out)
    _combine[(max(triton.cdiv(N, BT), 1), triton.cdiv(D, BD))](
        Y if Y is not None else out, slot if slot is not None else out,
        wgt if wgt is not None else out, out, dlog, wr, pa, pb, N, D,
        dlog.shape[1] if router is not None else 0, pa.shape[1] if zero is not None else 0,
        *(wr.stride() if router is not None else (0, 0)),
        K=slot.shape[1] if Y is not None else 0, WEIGHTED=weighted,
        ROUTER=router is not None, ZERO=zero is not None, BT=BT, BD=BD)


class MoEGatingFunction(torch.autograd.Function):
    """(x, w_router, noise) -> (weight, prob_sum, lse, idx, kept, counts, kept_counts);
    gradients flow from weight, prob_sum and lse to x, w_router and noise."""

    @staticmethod
    def forward(ctx, x, w_router, noise, k, renormalize, capacity_pct, seq_len, sigmoid, bias,
                groups):
        g = _gating_forward(x, w_router, noise, k, renormalize, capacity_pct, seq_len,
                            sigmoid=sigmoid, bias=bias, groups=groups)
        ctx.save_for_backward(x, w_router, g.idx, g.weight, g.kept, g.probs)
        ctx.conf = (k, renormalize, sigmoid)
        ctx.mark_non_differentiable(g.idx, g.kept, g.counts, g.kept_counts)
        return g.weight, g.prob_sum, g.lse, g.idx, g.kept, g.counts, g.kept_counts

    @staticmethod
    def backward(ctx, dw, dpsum, dlse, *_):
        x, w_router, idx, weight, kept, probs = ctx.saved_tensors
        k, renorm, sigmoid = ctx.conf
        g = Gating(idx, weight, kept, None, None, None, None, probs, sigmoid=sigmoid)
        dlog = _gating_backward(g, dw, dpsum, dlse if not sigmoid else None, k, renorm)
        dx, dwr = _dtheta(x, w_router, dlog, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        dn = dlog if ctx.needs_input_grad[2] else None
        return dx, dwr, dn, None, None, None, None, None, None, None


def moe_gating(x: Tensor, w_router: Tensor, noise: Optional[Tensor] = None, *, k: int = 2,
               renormalize: bool = True, capacity_pct: Optional[int] = None,
               seq_len: Optional[int] = None, sigmoid: bool = False,
               bias: Optional[Tensor] = None, groups=None) -> Gating:
    """Fused router for x [N, d] (N = B*T, sequences contiguous), w_router [d, E], optional
    noise [N, E] added to the logits. capacity_pct: the zoo's capacity factor in hundredths
    (minimax: 120), applied per sequence of seq_len tokens. sigmoid: p = sigmoid(logits)
    (no lse gradient then); bias [E]: the experts are the top k of p + bias (no gradient);
    groups (G, kept, m): group-limited routing (_gating_forward). Differentiable in weight,
    prob_sum and lse (autograd)."""
    _check_gating(x, w_router, noise, k, capacity_pct, seq_len)
    w, ps, lse, idx, kept, cnt, kc = MoEGatingFunction.apply(
        x, w_router, noise, k, renormalize, capacity_pct, seq_len, bool(sigmoid), bias,
        groups)
    return Gating(idx, w, kept, cnt, kc, ps, lse, None)


# -- dispatch -----------------------------------------------------------------------------------
@triton.jit
def _route_hist(IDX, KEPT, RANK, BCNT, NA, E, BA: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    a = pid * BA + tl.arange(0, BA)
    am = a < NA
    cols = tl.arange(0, BE)
    e = tl.load(IDX + a, mask=am, other=0)
    kp = tl.load(KEPT + a, mask=am, other=0) > 0
    oh = ((cols[None, :] == e[:, None]) & (kp & am)[:, None]).to(tl.float16)
    ar = tl.arange(0, BA)
    tri = (ar[None, :] <= ar[:, None]).to(tl.float16)
    local = tl.dot(tri, oh, out_dtype=tl.float32)
    rank = tl.sum(tl.where(cols[None, :] == e[:, None], local, 0.0), 1).to(tl.int32) - 1
    tl.store(RANK + a, rank, mask=am)
    tl.store(BCNT + pid * BE + cols, tl.sum(oh.to(tl.float32), 0).to(tl.int32))


@triton.jit
def _route_scatter(IDX, KEPT, WGT, RANK, BOFF, EOFF, STOK, SSID, SW, SLOT, NA,
                   K: tl.constexpr, BA: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    a = pid * BA + tl.arange(0, BA)
    am = a < NA
    e = tl.load(IDX + a, mask=am, other=0)
    kp = (tl.load(KEPT + a, mask=am, other=0) > 0) & am
    dest = tl.load(EOFF + e, mask=am, other=0) + tl.load(BOFF + pid * BE + e, mask=am, other=0) \
        + tl.load(RANK + a, mask=am, other=0)
    tl.store(STOK + dest, (a // K).to(tl.int32), mask=kp)
    tl.store(SSID + dest, a.to(tl.int32), mask=kp)
    tl.store(SW + dest, tl.load(WGT + a, mask=am, other=0.0), mask=kp)
    tl.store(SLOT + a, tl.where(kp, dest, -1).to(tl.int32), mask=am)


class Routing(NamedTuple):
    sorted_tok: Tensor   # [N k] int32 token of each sorted row (rows >= total unused)
    sorted_sid: Tensor   # [N k] int32 its slot id t k + j: its row in the slot layout
    sorted_w: Tensor     # [N k] fp32 its combine weight
    slot: Tensor         # [N, k] int32 sorted row of each slot, -1 when dropped
    counts: Tensor       # [E] int32 kept rows per expert
    eoff: Tensor         # [E] int32 first sorted row of each expert
    tile_start: Tensor   # [E] int32 first row tile of each expert (tiles of BM rows)
    tile_end: Tensor     # [E] int32 one past its last row tile
    max_tiles: int       # grid bound: ceil(N k / BM) + E


def route(idx: Tensor, kept: Tensor, weight: Tensor, E: int, BM: int) -> Routing:
    """Groups the kept (token, slot) assignments by expert, in token order within an expert:
    block histograms + device prefix sums, then a scatter. No host synchronisation."""
    N, k = idx.shape
    NA = N * k
    dev = idx.device
    BA, BE = 64, _p2(E)
    nb = max(triton.cdiv(NA, BA), 1)
    rank = torch.empty((NA,), dtype=torch.int32, device=dev)
    bcnt = torch.empty((nb, BE), dtype=torch.int32, device=dev)
    _route_hist[(nb,)](idx, kept, rank, bcnt, NA, E, BA=BA, BE=BE)
    csum = torch.cumsum(bcnt, 0, dtype=torch.int32)
    boff = (csum - bcnt).contiguous()
    counts = csum[-1, :E].contiguous()
    eoff = (torch.cumsum(counts, 0, dtype=torch.int32) - counts).contiguous()
    tiles = (counts + BM - 1) // BM
    tile_end = torch.cumsum(tiles, 0, dtype=torch.int32)
    tile_start = (tile_end - tiles).contiguous()
    stok = torch.zeros((max(NA, 1),), dtype=torch.int32, device=dev)
    ssid = torch.zeros((max(NA, 1),), dtype=torch.int32, device=dev)
    sw = torch.zeros((max(NA, 1),), dtype=torch.float32, device=dev)
    slot = torch.empty((N, k), dtype=torch.int32, device=dev)
    _route_scatter[(nb,)](idx, kept, weight.contiguous(), rank, boff, eoff, stok, ssid, sw,
                          slot, NA, K=k, BA=BA, BE=BE)
    return Routing(stok, ssid, sw, slot, counts, eoff, tile_start, tile_end.contiguous(),
                   triton.cdiv(NA, BM) + E)


@triton.jit
def _act(a, ACT: tl.constexpr):
    if ACT == 0:
        return a * tl.sigmoid(a)
    else:
        return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))


@triton.jit
def _act_grad(a, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(a)
        return s * (1.0 + a * (1.0 - s))
    else:
        return 0.5 * (1.0 + tl.erf(a * 0.7071067811865476)) + \
            a * tl.exp(-0.5 * a * a) * 0.3989422804014327


@triton.jit
def _gmm(A, A2, TOK, SID, SW, B, B2, C, C2, PA, PB,
         TSTART, TEND, EOFF, CNT, E, KD, ND,
         sa_r, sa_k, sb_e, sb_k, sb_n, sc_r, sp_r,
         MODE: tl.constexpr, GATHER: tl.constexpr, SAVE: tl.constexpr, ACT: tl.constexpr,
         DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
         BE: tl.constexpr):
    """Row tile pid_m of the sorted rows times expert weights. MODE 0: C = A B; 1: a = A B,
    b = A B2, C = act(a) * b (PA, PB = a, b when SAVE); 2: dh = w * (A B),
    C = dh * b * act'(a), C2 = dh * act(a) (a, b read from PA, PB); 3: C = A B + A2 B2.
    PA and PB are in the slot layout (row t k + j of token t's slot j: SID maps a sorted row
    to it), and so is C in modes 0 and 3 (the expert outputs and dx, which the combine reads
    per token); C in modes 1 and 2 (h, da, db: operands of the next product) is sorted. A
    (and A2) are read in their own dtype and rounded to B's in registers (an fp32 dy against
    bf16 weights: no narrowed copy)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = tl.arange(0, BE)
    te = tl.load(TEND + cols, mask=cols < E, other=2147483647)
    e = tl.sum((te <= pid_m).to(tl.int32), 0)
    if e >= E:
        return
    r0 = tl.load(EOFF + e) + (pid_m - tl.load(TSTART + e)) * BM
    rend = tl.load(EOFF + e) + tl.load(CNT + e)
    rows = r0 + tl.arange(0, BM)
    rm = rows < rend
    sid = tl.load(SID + rows, mask=rm, other=0).to(tl.int64)
    if GATHER:
        arow = tl.load(TOK + rows, mask=rm, other=0).to(tl.int64)
    else:
        arow = rows.to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    nm = n < ND
    kk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    acc2 = tl.zeros([BM, BN], tl.float32)
    wbase = e.to(tl.int64) * sb_e
    for k0 in range(0, KD, BK):
        km = (k0 + kk) < KD
        a = tl.load(A + arow[:, None] * sa_r + (k0 + kk)[None, :] * sa_k,
                    mask=rm[:, None] & km[None, :], other=0.0).to(B.dtype.element_ty)
        boff = wbase + (k0 + kk)[:, None] * sb_k + n[None, :] * sb_n
        bmask = km[:, None] & nm[None, :]
        b = tl.load(B + boff, mask=bmask, other=0.0)
        acc = tl.dot(a, b, acc=acc, input_precision=DOT_PREC)
        if MODE == 1:
            b2 = tl.load(B2 + boff, mask=bmask, other=0.0)
            acc2 = tl.dot(a, b2, acc=acc2, input_precision=DOT_PREC)
        if MODE == 3:
            a2 = tl.load(A2 + arow[:, None] * sa_r + (k0 + kk)[None, :] * sa_k,
                         mask=rm[:, None] & km[None, :], other=0.0).to(B2.dtype.element_ty)
            b2 = tl.load(B2 + boff, mask=bmask, other=0.0)
            acc = tl.dot(a2, b2, acc=acc, input_precision=DOT_PREC)
    cm = rm[:, None] & nm[None, :]
    if MODE == 0 or MODE == 3:
        coff = sid[:, None] * sc_r + n[None, :]
    else:
        coff = rows.to(tl.int64)[:, None] * sc_r + n[None, :]
    poff = sid[:, None] * sp_r + n[None, :]
    dt = C.dtype.element_ty
    if MODE == 1:
        if SAVE:
            tl.store(PA + poff, acc.to(dt), mask=cm)
            tl.store(PB + poff, acc2.to(dt), mask=cm)
        av = acc.to(dt).to(tl.float32)
        bv = acc2.to(dt).to(tl.float32)
        tl.store(C + coff, (_act(av, ACT) * bv).to(dt), mask=cm)
    elif MODE == 2:
        w = tl.load(SW + rows, mask=rm, other=0.0)
        dh = acc * w[:, None]
        av = tl.load(PA + poff, mask=cm, other=0.0).to(tl.float32)
        bv = tl.load(PB + poff, mask=cm, other=0.0).to(tl.float32)
        tl.store(C + coff, (dh * bv * _act_grad(av, ACT)).to(dt), mask=cm)
        tl.store(C2 + coff, (dh * _act(av, ACT)).to(dt), mask=cm)
    else:
        tl.store(C + coff, acc.to(dt), mask=cm)


@triton.jit
def _wgrad(A, A2, Dm, TOK, SID, SW, DW, EOFF, CNT, KD, ND,
           sa_r, sd_r, sw_e,
           GATHER_A: tl.constexpr, GATHER_D: tl.constexpr, SCALE_D: tl.constexpr,
           GATED_A: tl.constexpr, ACT: tl.constexpr,
           DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """DW[e] = A_e^T D_e over expert e's sorted rows: [KD, ND] per expert. GATED_A: A_e is
    h = act(a) * b, recomputed from the saved a (A) and b (A2) in the slot layout (rows
    through SID), rounded to their dtype as the forward stored h."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    mm = m < KD
    nm = n < ND
    r0 = tl.load(EOFF + e)
    cnt = tl.load(CNT + e)
    rr = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for s in range(0, cnt, BK):
        rows = r0 + s + rr
        rmk = (s + rr) < cnt
        if GATED_A:
            ar = tl.load(SID + rows, mask=rmk, other=0).to(tl.int64)
        elif GATHER_A:
            ar = tl.load(TOK + rows, mask=rmk, other=0).to(tl.int64)
        else:
            ar = rows.to(tl.int64)
        if GATHER_D:
            dr = tl.load(TOK + rows, mask=rmk, other=0).to(tl.int64)
        else:
            dr = rows.to(tl.int64)
        at = tl.load(A + ar[None, :] * sa_r + m[:, None], mask=rmk[None, :] & mm[:, None],
                     other=0.0)
        if GATED_A:
            bt = tl.load(A2 + ar[None, :] * sa_r + m[:, None],
                         mask=rmk[None, :] & mm[:, None], other=0.0)
            at = (_act(at.to(tl.float32), ACT) * bt.to(tl.float32)).to(A.dtype.element_ty)
        dv = tl.load(Dm + dr[:, None] * sd_r + n[None, :], mask=rmk[:, None] & nm[None, :],
                     other=0.0)
        if SCALE_D:
            w = tl.load(SW + rows, mask=rmk, other=0.0)
            dv = (dv.to(tl.float32) * w[:, None]).to(A.dtype.element_ty)
        acc = tl.dot(at, dv, acc=acc, input_precision=DOT_PREC)
    tl.store(DW + e.to(tl.int64) * sw_e + m[:, None] * ND + n[None, :],
             acc.to(DW.dtype.element_ty), mask=mm[:, None] & nm[None, :])


@triton.jit
def _combine(Y, SLOT, WGT, OUT, DLOG, WR, PA, PB, N, D, E, F, s_wd, s_we,
             K: tl.constexpr, WEIGHTED: tl.constexpr, ROUTER: tl.constexpr,
             ZERO: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """OUT[t] = sum over token t's kept slots j of (WGT[t, j] *) Y[t k + j] (Y in the slot
    layout), in fp32. ROUTER: plus the router's input gradient sum_e DLOG[t, e] WR[:, e]
    (DLOG [N, E] fp32, WR [D, E]). ZERO: the rows of Y, PA and PB [N k, F] of dropped slots
    are set to zero (as the zoo's dense form has them), masked stores: no kernel writes those
    rows otherwise, and only they are written here."""
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rm = rows < N
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = dd < D
    acc = tl.zeros([BT, BD], tl.float32)
    for j in tl.static_range(K):
        s = tl.load(SLOT + rows * K + j, mask=rm, other=-1)
        ok = s >= 0
        yrow = (rows.to(tl.int64) * K + j)[:, None]
        y = tl.load(Y + yrow * D + dd[None, :],
                    mask=(ok & rm)[:, None] & dm[None, :], other=0.0).to(tl.float32)
        if WEIGHTED:
            w = tl.load(WGT + rows * K + j, mask=rm, other=0.0)
            acc += w[:, None] * y
        else:
            acc += y
        if ZERO:
            drop = (rm & ~ok)[:, None]
            tl.store(Y + yrow * D + dd[None, :], tl.zeros([BT, BD], Y.dtype.element_ty),
                     mask=drop & dm[None, :])
            if tl.program_id(1) == 0:
                for f0 in range(0, F, BD):
                    ff = f0 + tl.arange(0, BD)
                    fm = drop & (ff < F)[None, :]
                    tl.store(PA + yrow * F + ff[None, :],
                             tl.zeros([BT, BD], PA.dtype.element_ty), mask=fm)
                    tl.store(PB + yrow * F + ff[None, :],
                             tl.zeros([BT, BD], PB.dtype.element_ty), mask=fm)
    if ROUTER:
        for e in range(0, E):
            g = tl.load(DLOG + rows.to(tl.int64) * E + e, mask=rm, other=0.0)
            w = tl.load(WR + dd * s_wd + e * s_we, mask=dm, other=0.0).to(tl.float32)
            acc += g[:, None] * w[None, :]
    tl.store(OUT + rows.to(tl.int64)[:, None] * D + dd[None, :], acc.to(OUT.dtype.element_ty),
             mask=rm[:, None] & dm[None, :])


@triton.jit
def _router_wgrad(X, DLOG, PART, N, D, E, s_xn, s_xd, ROWS,
                  BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    """The router weight's gradient x^T dlog, split along the tokens: program (i, s) sums
    rows [s ROWS, (s + 1) ROWS) for columns i BD .. of x into PART[s] [D, E] (fp32; the
    launcher adds the splits in order: deterministic). x is read in its own dtype and
    widened: no fp32 copy of the activations."""
    dd = tl.program_id(0) * BD + tl.arange(0, BD)
    dm = dd < D
    sp = tl.program_id(1)
    ee = tl.arange(0, BE)
    em = ee < E
    acc = tl.zeros([BD, BE], tl.float32)
    for r0 in range(sp * ROWS, tl.minimum(sp * ROWS + ROWS, N), BN):
        rr = r0 + tl.arange(0, BN)
        rmk = (rr < N) & (rr < sp * ROWS + ROWS)
        xt = tl.load(X + rr.to(tl.int64)[None, :] * s_xn + dd[:, None] * s_xd,
                     mask=rmk[None, :] & dm[:, None], other=0.0).to(tl.float32)
        g = tl.load(DLOG + rr.to(tl.int64)[:, None] * E + ee[None, :],
                    mask=rmk[:, None] & em[None, :], other=0.0)
        acc = tl.dot(xt, g, acc=acc, input_precision="ieee")
    tl.store(PART + sp.to(tl.int64) * D * E + dd[:, None] * E + ee[None, :], acc,
             mask=dm[:, None] & em[None, :])


@triton.jit
def _combine_bwd(Y, SLOT, DOUT, DWT, N, D, K: tl.constexpr, BT: tl.constexpr,
                 BD: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    rm = rows < N
    for j in tl.static_range(K):
        s = tl.load(SLOT + rows * K + j, mask=rm, other=-1)
        ok = (s >= 0) & rm
        acc = tl.zeros([BT], tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            dm = dd < D
            y = tl.load(Y + (rows.to(tl.int64) * K + j)[:, None] * D + dd[None, :],
                        mask=ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
            g = tl.load(DOUT + rows.to(tl.int64)[:, None] * D + dd[None, :],
                        mask=rm[:, None] & dm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(y * g, 1)
        tl.store(DWT + rows * K + j, acc, mask=rm)


class _Plan:
    def __init__(self, x: Tensor, E: int, F_: int):
        cfg = CPU_GEMM if _interpret() else GPU_GEMM if x.element_size() <= 2 else GPU_GEMM_F32
        self.BM, self.BN, self.BK = cfg["BM"], cfg["BN"], cfg["BK"]
        self.launch = {k: v for k, v in cfg.items() if k.startswith("num_")}
        self.prec = "ieee" if x.dtype == torch.float32 else "tf32"
        self.E, self.F, self.D = E, F_, x.shape[1]
        self.BE = _p2(E)

    def gmm(self, r: Routing, A, B, C, *, mode, ND, KD, gather, A2=None, B2=None, C2=None,
            PA=None, PB=None, save=False, act=0, sw=None):
        grid = (r.max_tiles, triton.cdiv(ND, self.BN))
        if PA is not None:
            assert PA.is_contiguous() and PB.is_contiguous() and PA.shape == PB.shape
        _gmm[grid](A, A2 if A2 is not None else A, r.sorted_tok, r.sorted_sid,
                   sw if sw is not None else r.sorted_w, B, B2 if B2 is not None else B,
                   C, C2 if C2 is not None else C, PA if PA is not None else C,
                   PB if PB is not None else C, r.tile_start, r.tile_end, r.eoff, r.counts,
                   self.E, KD, ND, A.stride(0), A.stride(1), B.stride(0), B.stride(1),
                   B.stride(2), C.stride(0), PA.stride(0) if PA is not None else 0,
                   MODE=mode, GATHER=gather, SAVE=save, ACT=act, DOT_PREC=self.prec,
                   BM=self.BM, BN=self.BN, BK=self.BK, BE=self.BE, **self.launch)

    def wgrad(self, r: Routing, A, Dm, out, *, gather_a, gather_d, scale_d, A2=None, act=0):
        """A2 given: A_e = act(A) * A2 (the saved a, b in the slot layout)."""
        KD, ND = A.shape[1], Dm.shape[1]
        BM = BN = 32 if _interpret() else 64
        BK = 16 if _interpret() else 64
        grid = (triton.cdiv(KD, BM), triton.cdiv(ND, BN), self.E)
        _wgrad[grid](A, A2 if A2 is not None else A, Dm, r.sorted_tok, r.sorted_sid,
                     r.sorted_w, out, r.eoff, r.counts, KD, ND,
                     A.stride(0), Dm.stride(0), out.stride(0),
                     GATHER_A=gather_a, GATHER_D=gather_d, SCALE_D=scale_d,
                     GATED_A=A2 is not None, ACT=act,
                     DOT_PREC=self.prec, BM=BM, BN=BN, BK=BK, **self.launch)


# -- few tokens (a decode step): the chosen experts' rows read directly, no routing ----------
@triton.jit
def _direct_up(X, IDX, KEPT, WG, W1, H, D, F, sxn, sxd, swe, swd, swf,
               K: tl.constexpr, ACT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """Slot r = t K + j: H[r, n-tile] = act(a) * b with a = x_t Wg_e, b = x_t W1_e (e the
    slot's expert; fp32 sums of exact products, a and b rounded to H's dtype as the grouped
    kernel stores them). A dropped slot's row is not written (nothing reads it)."""
    r = tl.program_id(0)
    if tl.load(KEPT + r) == 0:
        return
    t = (r // K).to(tl.int64)
    e = tl.load(IDX + r).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nm = n < F
    kk = tl.arange(0, BK)
    acc = tl.zeros([BN], tl.float32)
    acc2 = tl.zeros([BN], tl.float32)
    for k0 in range(0, D, BK):
        km = (k0 + kk) < D
        xv = tl.load(X + t * sxn + (k0 + kk) * sxd, mask=km, other=0.0)
        xv = xv.to(WG.dtype.element_ty).to(tl.float32)
        off = e * swe + (k0 + kk)[:, None] * swd + n[None, :] * swf
        m = km[:, None] & nm[None, :]
        acc += tl.sum(xv[:, None] * tl.load(WG + off, mask=m, other=0.0).to(tl.float32), 0)
        acc2 += tl.sum(xv[:, None] * tl.load(W1 + off, mask=m, other=0.0).to(tl.float32), 0)
    dt = H.dtype.element_ty
    av = acc.to(dt).to(tl.float32)
    bv = acc2.to(dt).to(tl.float32)
    tl.store(H + r.to(tl.int64) * F + n, (_act(av, ACT) * bv).to(dt), mask=nm)


@triton.jit
def _direct_down(H, IDX, KEPT, WGT, W2, RES, Y, F, D, swe, swf, swd, srn,
                 K: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, HAS_RES: tl.constexpr):
    """Token t, n-tile: Y[t] = sum over its kept slots j (in slot order) of
    w_tj * (H[t K + j] W2_e) in fp32, each expert output rounded to H's dtype first, as the
    grouped path stores it before its combine; with HAS_RES then + RES[t] (the residual
    add after the layer)."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nm = n < D
    kk = tl.arange(0, BK)
    y = tl.zeros([BN], tl.float32)
    for j in tl.static_range(K):
        r = t * K + j
        if tl.load(KEPT + r) != 0:
            e = tl.load(IDX + r).to(tl.int64)
            acc = tl.zeros([BN], tl.float32)
            for k0 in range(0, F, BK):
                km = (k0 + kk) < F
                hv = tl.load(H + r * F + k0 + kk, mask=km, other=0.0).to(tl.float32)
                wv = tl.load(W2 + e * swe + (k0 + kk)[:, None] * swf + n[None, :] * swd,
                             mask=km[:, None] & nm[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(hv[:, None] * wv, 0)
            y += tl.load(WGT + r) * acc.to(H.dtype.element_ty).to(tl.float32)
    if HAS_RES:     # the layer's output as stored (rounded to Y's dtype), plus the residual
        y = y.to(Y.dtype.element_ty).to(tl.float32) + \
            tl.load(RES + t * srn + n, mask=nm, other=0.0).to(tl.float32)
    tl.store(Y + t * D + n, y.to(Y.dtype.element_ty), mask=nm)


def direct(N: int, k: int, E: int) -> bool:
    """The direct path for N tokens: each kept slot reads its expert's rows itself, so it
    reads no more weight bytes than the dense every-expert product would (N k <= E), with
    three launches (gating, up, down + combine) and no routing."""
    return N * k <= E


def _experts_direct(x, g: Gating, w_gate, w_up, w_down, act, y, res=None) -> None:
    """y [N, d] (fp32 or x's dtype) = the layer's output for few tokens (`direct`), plus
    res [N, d] (rows of unit column stride) when given."""
    N, D = x.shape
    k = g.idx.shape[1]
    F_ = w_gate.shape[2]
    h = torch.empty((N * k, F_), dtype=x.dtype, device=x.device)
    (BK, BN), (BK2, BN2) = ((32, 32), (32, 32)) if _interpret() else ((64, 64), (128, 32))
    extra = {} if _interpret() else dict(num_warps=4)
    _direct_up[(N * k, triton.cdiv(F_, BN))](
        x, g.idx, g.kept, w_gate, w_up, h, D, F_, *x.stride(), *w_gate.stride(),
        K=k, ACT=act, BK=BK, BN=BN, **extra)
    if res is not None:
        assert res.shape == (N, D) and res.stride(1) == 1, (res.shape, res.stride())
    _direct_down[(N, triton.cdiv(D, BN2))](
        h, g.idx, g.kept, g.weight, w_down, res if res is not None else y, y, F_, D,
        *w_down.stride(), res.stride(0) if res is not None else 0,
        K=k, BK=BK2, BN=BN2, HAS_RES=res is not None, **extra)


def _experts_forward(p: _Plan, x, r: Routing, w_gate, w_up, w_down, act, save, pa=None,
                     pb=None, ys=None):
    """The experts on the sorted rows: (pa, pb, ys). pa, pb: the pre-activations a = x Wg,
    b = x W1 [N k, F] in the slot layout, written when save (into the given tensors, else
    new ones; None otherwise); ys: the expert outputs [N k, d], slot layout. A dropped slot's
    rows are not written."""
    R = r.sorted_tok.shape[0]
    dev, dt = x.device, x.dtype
    h = torch.empty((R, p.F), dtype=dt, device=dev)      # sorted: the down product's operand
    if save:
        pa = torch.empty((R, p.F), dtype=dt, device=dev) if pa is None else pa
        pb = torch.empty((R, p.F), dtype=dt, device=dev) if pb is None else pb
    else:
        pa = pb = None
    p.gmm(r, x, w_gate, h, B2=w_up, PA=pa, PB=pb, save=save, act=act, mode=1, ND=p.F,
          KD=p.D, gather=True)
    ys = torch.empty((R, p.D), dtype=dt, device=dev) if ys is None else ys
    p.gmm(r, h, w_down, ys, mode=0, ND=p.D, KD=p.F, gather=False)
    return pa, pb, ys


def _moe_forward(x, w_router, noise, w_gate, w_up, w_down, k, renormalize, capacity_pct,
                 seq_len, act, save, capacity=None, round_to=None, y_dtype=None, pa=None,
                 pb=None, ys=None, sigmoid=False, bias=None, groups=None):
    """The layer's forward: (y, Gating, Routing, (pa, pb, ys)) (pa, pb None unless save;
    written into the given tensors when given); y in y_dtype (default x's)."""
    E, _, F_ = w_gate.shape
    g = _gating_forward(x, w_router, noise, k, renormalize, capacity_pct, seq_len,
                        capacity=capacity, round_to=round_to, sigmoid=sigmoid, bias=bias,
                        groups=groups)
    p = _Plan(x, E, F_)
    r = route(g.idx, g.kept, g.weight, E, p.BM)
    pa, pb, ys = _experts_forward(p, x, r, w_gate, w_up, w_down, act, save, pa, pb, ys)
    y = torch.empty(x.shape, dtype=y_dtype or x.dtype, device=x.device)
    combine(ys, r.slot, g.weight, y, weighted=True)
    return y, g, r, (pa, pb, ys)


def _moe_backward(x, w_router, w_gate, w_up, w_down, g: Gating, r: Routing, pa, pb, ys,
                  dy, dpsum, dlse, k, renorm, act, need_wr=True, dprobs=None, dweight=None,
                  into=None):
    """The layer's backward from the forward's saved pre-activations pa, pb and expert
    outputs ys (slot layout): (dx, dw_router, dlogits, dw_gate, dw_up, dw_down). No expert
    product is recomputed: h = act(a) * b is rebuilt inside the dW2 kernel. dprobs: a dense
    [N, E] gradient of the router probabilities; dweight: an extra [N, k] gradient of the
    combine weights (both optional). into: {"dx", "dw_gate", "dw_up", "dw_down": a
    contiguous buffer of that gradient's shape and dtype} the kernels write directly."""
    E, D, F_ = w_gate.shape
    into = into or {}
    p = _Plan(x, E, F_)
    N = x.shape[0]
    dy = dy.contiguous() if dy is not None else torch.zeros_like(x)
    # combine: d weights
    dwt = torch.empty((N, k), dtype=torch.float32, device=x.device)
    BT, BD = (16, 32) if _interpret() else (64, 128)
    _combine_bwd[(max(triton.cdiv(N, BT), 1),)](ys, r.slot, dy, dwt, N, D, K=k, BT=BT,
                                                 BD=BD)
    if dweight is not None:
        dwt = dwt + dweight.float()
    # down projection: dh = w * dy[tok] W2^T, gated backward epilogue -> da, db
    R = r.sorted_tok.shape[0]
    da = torch.empty((R, F_), dtype=x.dtype, device=x.device)
    db = torch.empty_like(da)
    p.gmm(r, dy, w_down.transpose(1, 2), da, C2=db, PA=pa, PB=pb, act=act, mode=2,
          ND=F_, KD=D, gather=True)
    dw_down = into.get("dw_down", torch.empty_like(w_down))
    p.wgrad(r, pa, dy, dw_down, A2=pb, act=act, gather_a=False, gather_d=True, scale_d=True)
    dw_gate = into.get("dw_gate", torch.empty_like(w_gate))
    dw_up = into.get("dw_up", torch.empty_like(w_up))
    p.wgrad(r, x, da, dw_gate, gather_a=True, gather_d=False, scale_d=False)
    p.wgrad(r, x, db, dw_up, gather_a=True, gather_d=False, scale_d=False)
    dxs = torch.empty((R, D), dtype=x.dtype, device=x.device)
    p.gmm(r, da, w_gate.transpose(1, 2), dxs, A2=db, B2=w_up.transpose(1, 2), mode=3,
          ND=D, KD=F_, gather=False)
    # the router's d logits, then dx = the slots' dx rows + dlog W_r^T in one kernel
    dlog = _gating_backward(g, dwt, dpsum, dlse, k, renorm, dprobs=dprobs)
    dx = into.get("dx", torch.empty_like(x))
    combine(dxs, r.slot, None, dx, router=(dlog, w_router))
    dwr = router_wgrad(x, dlog).to(w_router.dtype) if need_wr else None
    return dx, dwr, dlog, dw_gate, dw_up, dw_down


class MoEFunction(torch.autograd.Function):
    """The whole MoE layer: fused gating, sorted dispatch, grouped gated-FFN GEMMs, combine.
    Outputs (y, prob_sum, lse, idx, kept, counts, kept_counts); y, prob_sum, lse carry
    gradients to x, w_router, noise and the expert weights."""

    @staticmethod
    def forward(ctx, x, w_router, noise, w_gate, w_up, w_down, k, renormalize, capacity_pct,
                seq_len, act, sigmoid, bias, groups):
        save = torch.is_grad_enabled() or any(ctx.needs_input_grad)
        y, g, r, (pa, pb, ys) = _moe_forward(x, w_router, noise, w_gate, w_up, w_down, k,
                                             renormalize, capacity_pct, seq_len, act, save,
                                             sigmoid=sigmoid, bias=bias, groups=groups)
        ctx.save_for_backward(x, w_router, w_gate, w_up, w_down, g.idx, g.weight, g.kept,
                              g.probs, pa, pb, ys, *r[:8])
        ctx.conf = (k, renormalize, act, r.max_tiles, sigmoid)
        ctx.mark_non_differentiable(g.idx, g.kept, g.counts, g.kept_counts)
        return y, g.prob_sum, g.lse, g.idx, g.kept, g.counts, g.kept_counts

    @staticmethod
    def backward(ctx, dy, dpsum, dlse, *_):
        (x, w_router, w_gate, w_up, w_down, idx, weight, kept, probs, pa, pb, ys,
         *rr) = ctx.saved_tensors
        k, renorm, act, max_tiles, sigmoid = ctx.conf
        r = Routing(*rr, max_tiles)
        g = Gating(idx, weight, kept, None, None, None, None, probs, sigmoid=sigmoid)
        dx, dwr, dlog, dw_gate, dw_up, dw_down = _moe_backward(
            x, w_router, w_gate, w_up, w_down, g, r, pa, pb, ys, dy, dpsum,
            dlse if not sigmoid else None, k, renorm, act, need_wr=ctx.needs_input_grad[1])
        dn = dlog if ctx.needs_input_grad[2] else None
        return (dx, dwr, dn, dw_gate, dw_up, dw_down) + (None,) * 8


def moe_layer(x: Tensor, w_router: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
              noise: Optional[Tensor] = None, *, k: int = 2, renormalize: bool = True,
              capacity_pct: Optional[int] = None, seq_len: Optional[int] = None,
              act: str = "silu", sigmoid: bool = False, bias: Optional[Tensor] = None,
              groups=None):
    """MoE layer on x [N, d]: w_router [d, E], experts w_gate, w_up [E, d, F], w_down [E, F, d]
    (y = sum_j w_j (act(x Wg) * (x W1)) W2; act "silu" = SwiGLU, "gelu" = exact GeGLU).
    Returns (y [N, d], Gating) with prob_sum and lse differentiable (load-balance / z-loss)."""
    _check_gating(x, w_router, noise, k, capacity_pct, seq_len)
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    E, D, F_ = w_gate.shape
    if (E != w_router.shape[1] or D != x.shape[1] or tuple(w_up.shape) != (E, D, F_)
            or tuple(w_down.shape) != (E, F_, D)):
        raise ValueError(f"expert weights must be [E, d, F], [E, d, F], [E, F, d] with E = "
                         f"{w_router.shape[1]}, d = {x.shape[1]}: got {list(w_gate.shape)}, "
                         f"{list(w_up.shape)}, {list(w_down.shape)}")
    x = x.contiguous()
    y, ps, lse, idx, kept, cnt, kc = MoEFunction.apply(
        x, w_router, noise, w_gate.contiguous(), w_up.contiguous(), w_down.contiguous(), k,
        renormalize, capacity_pct, seq_len, ACTS.index(act), bool(sigmoid), bias, groups)
    return y, Gating(idx, None, kept, cnt, kc, ps, lse, None)


# -- references (the zoo's dense math) ----------------------------------------------------------
def select_reference(score: Tensor, k: int, groups=None) -> Tensor:
    """The experts a router picks from its selection scores [.., E]: the k largest, ties to
    the lower index (a stable descending sort); with groups = (G, kept, m), only among the
    experts of the `kept` groups whose m largest scores sum highest (DeepSeek-V3's limit, as
    its reference code writes it)."""
    E = score.shape[-1]
    if groups is not None:
        G, kept_g, m = groups
        grp = score.reshape(*score.shape[:-1], G, E // G)
        gscore = torch.sort(grp, dim=-1, descending=True, stable=True).values[..., :m].sum(-1)
        gtop = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[..., :kept_g]
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(-1, gtop, True)
        score = score.masked_fill(~keep.repeat_interleave(E // G, -1), float("-inf"))
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]


def gating_reference(x: Tensor, w_router: Tensor, noise: Optional[Tensor] = None, *, k: int = 2,
                     renormalize: bool = True, capacity_pct: Optional[int] = None,
                     seq_len: Optional[int] = None, sigmoid: bool = False,
                     bias: Optional[Tensor] = None, groups=None) -> dict:
    """The zoo's router, op for op on [B, T, E] (B = N / seq_len): dense gates [N, E] (0 off
    the kept top k), chosen/kept 0/1 [N, E], top [N, k], probs, lse, counts, kept_counts,
    prob_sum."""
    N = x.shape[0]
    E = w_router.shape[1]
    T = int(seq_len) if seq_len is not None else N
    logits = x @ w_router
    if noise is not None:
        logits = logits + noise
    logits = logits.reshape(N // T, T, E)
    probs = torch.sigmoid(logits.float()) if sigmoid else torch.softmax(logits.float(), -1)
    score = probs + bias.float() if bias is not None else probs
    top = select_reference(score, k, groups)
    chosen = (top.unsqueeze(-1) == torch.arange(E, device=x.device)).float().sum(-2)
    gates = probs * chosen
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    kept = chosen
    if capacity_pct is not None:
        pos = torch.cumsum(chosen, 1).long()
        budget = ((torch.arange(T, device=x.device) + 1) * (capacity_pct * k)).reshape(T, 1)
        kept = chosen * ((pos - 1) * (E * 100) < budget).float()
        gates = gates * kept
    lse = torch.logsumexp(logits.float(), -1)
    f = (lambda t: t.reshape(N, *t.shape[2:]))
    return dict(gates=f(gates), chosen=f(chosen), kept=f(kept), top=f(top), probs=f(probs),
                lse=f(lse), counts=f(chosen).sum(0), kept_counts=f(kept).sum(0),
                prob_sum=f(probs).sum(0))


def moe_reference(x, w_router, w_gate, w_up, w_down, noise=None, *, k=2, renormalize=True,
                  capacity_pct=None, seq_len=None, act="silu", sigmoid=False, bias=None,
                  groups=None):
    """Every expert on every token, combined with the dense gates (the zoo's form). Returns
    (y, the gating_reference dict)."""
    g = gating_reference(x, w_router, noise, k=k, renormalize=renormalize,
                         capacity_pct=capacity_pct, seq_len=seq_len, sigmoid=sigmoid,
                         bias=bias, groups=groups)
    xe = x.unsqueeze(0)                                          # [1, N, d]
    a = xe @ w_gate
    h = (F.silu(a) if act == "silu" else F.gelu(a)) * (xe @ w_up)
    ye = h @ w_down                                              # [E, N, d]
    y = (ye * g["gates"].t().unsqueeze(-1)).sum(0)
    return y.to(x.dtype), g


def eager_select(probs: Tensor, k: int, bias: Optional[Tensor] = None, groups=None):
    """A typical eager router's pick, torch.topk throughout (DeepSeek-V3's reference code for
    the bias and the group limit): (the picked probabilities [N, k], their experts)."""
    score = probs + bias.float() if bias is not None else probs
    if groups is not None:
        G, kept, m = groups
        N, E = score.shape
        gs = score.view(N, G, E // G).topk(m, -1).values.sum(-1)
        drop = torch.ones(N, G, dtype=torch.bool, device=score.device).scatter_(
            1, gs.topk(kept, -1).indices, False)
        score = score.masked_fill(drop.repeat_interleave(E // G, 1), float("-inf"))
    idx = torch.topk(score, k, -1).indices
    return probs.gather(1, idx), idx


def moe_eager(x, w_router, w_gate, w_up, w_down, noise=None, *, k=2, renormalize=True,
              act="silu", sigmoid=False, bias=None, groups=None):
    """A typical sparse eager implementation (softmax or sigmoid, topk, per-expert
    index_select / index_add), without capacity: the benchmark's baseline."""
    logits = x @ w_router
    if noise is not None:
        logits = logits + noise
    probs = torch.sigmoid(logits.float()) if sigmoid else torch.softmax(logits.float(), -1)
    val, idx = eager_select(probs, k, bias, groups)
    if renormalize:
        val = val / val.sum(-1, keepdim=True)
    y = torch.zeros_like(x, dtype=torch.float32)
    flat = idx.reshape(-1)
    tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
    wv = val.reshape(-1)
    for e in range(w_gate.shape[0]):
        sel = (flat == e).nonzero().squeeze(1)
        t = tok[sel]
        xe = x.index_select(0, t)
        a = xe @ w_gate[e]
        he = (F.silu(a) if act == "silu" else F.gelu(a)) * (xe @ w_up[e])
        y.index_add_(0, t, (he @ w_down[e]).float() * wv[sel, None])
    return y.to(x.dtype), probs.sum(0), torch.logsumexp(logits.float(), -1)


# -- entry for the fused ops of lmc/passes/fuse_moe_gating.py (codegen/templates.py) -----------
_DIFF_ROLES = ("y", "gates", "probs", "lse")   # the fused op's outputs that carry gradients


def _role(role: str, g: Gating, N: int, E: int) -> Tensor:
    """One output of the fused gating op, as the zoo's dense [N, E] (or [N], [N, k]) value."""
    if role == "probs":
        return g.probs
    if role == "lse":
        return g.lse
    if role == "idx":
        return g.idx.long()
    if role == "count":
        return g.count
    src = {"gates": g.weight, "chosen": torch.ones_like(g.weight),
           "kept": g.kept.float()}[role]
    return torch.zeros((N, E), dtype=torch.float32, device=g.probs.device).scatter_(
        1, g.idx.long(), src)


def launch_template(template: str, xs, outs, opts) -> None:
    """moe_gating: xs = (x [.., d], W_r [d, E][, carry, positions][, noise [.., E]][, bias]);
    moe_layer: xs = (x, W_r, Wg, W1, W2[, residual][, carry, positions][, noise][, bias]); carry
    [B, 1, E] and positions [T] (opts["carry"]: a decode step's capacity counting on from
    earlier tokens); residual [.., d] (opts["residual"], a decode step's): y is the layer's
    output plus it.
    outs: the roles named by opts["outputs"] (y, gates, probs, lse,
    chosen, kept, idx; a layer also a, b, ye: the experts' pre-activations [.., k, F] and
    outputs [.., k, d] per slot, saved for the backward), None where nothing reads one. The
    *_bwd templates take the same inputs (opts["n_inputs"]), then the saved outputs named by
    opts["saved"] (body output keys), then the cotangents of opts["cotangents"]; outs = the
    gradients of x, W_r (and Wg, W1, W2). A layer's backward reruns only the gating and the
    routing (a few small launches) and reads a, b, ye: no expert product is recomputed."""
    layer = template.startswith("moe_layer")
    assert template in ("moe_gating", "moe_gating_bwd", "moe_layer", "moe_layer_bwd"), template
    k, E, renorm = opts["k"], opts["E"], opts["renormalise"]
    base = (6 if opts.get("residual") else 5) if layer else 2
    after = base + (2 if opts.get("carry") else 0)        # the noise, then the bias
    nin = after + (1 if opts["noise"] else 0) + (1 if opts.get("bias") else 0)
    x, wr = xs[0], xs[1]
    x2 = x.reshape(-1, x.shape[-1])
    N = x2.shape[0]
    noise = xs[after].reshape(N, E) if opts["noise"] else None
    bias = xs[nin - 1].reshape(E) if opts.get("bias") else None
    carry = (xs[base], xs[base + 1]) if opts.get("carry") else None
    cap = tuple(opts["capacity"]) if opts.get("capacity") else None
    seq = x.shape[-2] if cap else None
    dts = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    rnd = dts[opts.get("dtype", "f32")]                    # the logits' dtype
    prnd = dts[opts.get("probs_dtype", opts.get("dtype", "f32"))]
    roles = list(opts["outputs"])
    bwd = template.endswith("_bwd")
    got = dict(zip(roles, outs)) if not bwd else {}
    ch = got.get("chosen")
    ch = ch.view(N, E) if ch is not None and ch.is_contiguous() and \
        ch.dtype == torch.float32 and ch.numel() == N * E else None
    cn = got.get("count")
    cn = cn if cn is not None and cn.is_contiguous() and cn.dtype == torch.float32 else None
    g = _gating_forward(x2, wr, noise, k, renorm, None, seq, capacity=cap, round_to=rnd,
                        carry=carry, chosen=ch, count=cn, probs_round=prnd,
                        sigmoid=opts.get("router") == "sigmoid", bias=bias,
                        score_round=dts[opts.get("score_dtype", "f32")] if bias is not None
                        else None, groups=opts.get("groups"),
                        group_round=dts[opts["group_dtype"]] if opts.get("group_dtype")
                        else None)
    if layer:
        x2 = x2.contiguous()
        wg, w1, w2 = (t.contiguous() for t in xs[2:5])
        act = ACTS.index(opts["act"])
        E_, _, F_ = wg.shape
        flat = (lambda t, c: t.reshape(N * k, c) if t is not None else None)
        res = xs[5].reshape(N, -1) if opts.get("residual") else None
        if res is not None and res.stride(-1) != 1:
            res = res.contiguous()
    if not bwd:
        if layer and direct(N, k, E) and all(got.get(r) is None for r in ("a", "b", "ye")):
            # few tokens and nothing saved for a backward (a decode step): no routing
            y = got.get("y")
            if y is not None:
                yv = y.view(N, -1) if y.is_contiguous() else None
                y_ = yv if yv is not None else torch.empty((N, x2.shape[1]),
                                                           dtype=torch.float32, device=x.device)
                _experts_direct(x2, g, wg, w1, w2, act, y_, res)
                if yv is None:
                    y.copy_(y_.reshape(y.shape))
        elif layer:
            pa, pb, ys = flat(got.get("a"), F_), flat(got.get("b"), F_), flat(got.get("ye"),
                                                                              x2.shape[1])
            save = pa is not None and pb is not None
            p = _Plan(x2, E, F_)
            r = route(g.idx, g.kept, g.weight, E, p.BM)
            pa, pb, ys = _experts_forward(p, x2, r, wg, w1, w2, act, save, pa, pb, ys)
            # dropped slots are zero in the body's saved a, b, ye and no expert kernel
            # writes their rows: the combine stores those zeros (only those rows)
            zero = (pa, pb) if cap and save else None
            if got.get("y") is not None or zero is not None:
                y = got.get("y")
                y = y.view(N, -1) if y is not None and y.is_contiguous() else None
                y_ = y if y is not None else torch.empty((N, x2.shape[1]),
                                                         dtype=torch.float32, device=x.device)
                combine(ys, r.slot, g.weight, y_, weighted=True, zero=zero)
                if y is None and got.get("y") is not None:
                    got["y"].copy_(y_.reshape(got["y"].shape))
                if res is not None and got.get("y") is not None:     # the stored output + r
                    got["y"].add_(res.reshape(got["y"].shape))
            if cap and zero is None and got.get("ye") is not None:
                ys.view(N, k, -1).masked_fill_(g.kept.view(N, k, 1) == 0, 0)
        for role, out in zip(roles, outs):
            if out is None or role in ("y", "a", "b", "ye") or (role == "chosen"
                                                               and ch is not None) or \
                    (role == "count" and cn is not None):
                continue
            out.copy_(_role(role, g, N, E).reshape(out.shape))
        return
    n_in, saved = opts["n_inputs"], list(opts.get("saved", ()))
    cts = {roles[int(o)]: xs[n_in + len(saved) + i]
           for i, o in enumerate(opts["cotangents"])}
    dw = cts["gates"].reshape(N, E).float().gather(1, g.idx.long()) if "gates" in cts else None
    dprobs = cts["probs"].reshape(N, E) if "probs" in cts else None
    dlse = cts["lse"].reshape(N) if "lse" in cts else None
    if layer:
        sv = {roles[int(o)]: xs[n_in + i] for i, o in enumerate(saved)}
        if not {"a", "b", "ye"} <= set(sv):
            raise LmcError(f"internal: moe_layer backward without the saved a, b, ye "
                           f"(saved {sorted(sv)})")
        pa, pb = flat(sv["a"], F_).contiguous(), flat(sv["b"], F_).contiguous()
        ys = flat(sv["ye"], x2.shape[1]).contiguous()
        r = route(g.idx, g.kept, g.weight, E, _Plan(x2, E, F_).BM)
        dy = cts["y"].reshape(N, -1) if "y" in cts else None
        # gradient outputs the kernels can write themselves (no copy after)
        want = {"dx": (x2, (N, x2.shape[1])), "dw_gate": (wg, wg.shape),
                "dw_up": (w1, w1.shape), "dw_down": (w2, w2.shape)}
        into = {}
        for (name, (like, shape)), o in zip(want.items(), [outs[0]] + list(outs[2:5])):
            if o is not None and o.is_contiguous() and o.dtype == like.dtype and \
                    o.numel() == math.prod(shape):
                into[name] = o.view(shape)
        grads = _moe_backward(x2, wr, wg, w1, w2, g, r, pa, pb, ys, dy, None, dlse, k,
                              renorm, act, dprobs=dprobs, dweight=dw, into=into)
        grads = (grads[0], grads[1]) + tuple(grads[3:])
    else:
        dlog = _gating_backward(g, dw, None, dlse, k, renorm, dprobs=dprobs)
        o = outs[0]
        into = o.view(N, -1) if o is not None and o.is_contiguous() and \
            o.dtype == x2.dtype else None
        grads = _dtheta(x2, wr, dlog, True, True, dx=into)
    assert len(outs) == len(grads), (len(outs), len(grads))
    for out, v in zip(outs, grads):
        if v.data_ptr() != out.data_ptr():      # not written in place above
            out.copy_(v.reshape(out.shape))
