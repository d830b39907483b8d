"""Decayed linear attention (gated retention, lightning attention): chunked Triton kernels for
training, a recurrent kernel for decode, and the torch references they are tested against.
The kernel half of issue 9; the `fuse_linear_attention` pass (lmc/passes) replaces the zoo's
parallel form with a fused op whose forward and backward `launch_template` (at the end) runs
with these kernels.

The math, per (batch, head), exactly the zoo's `decayed_linear_attention` block:

    q, k: [B, H, T, d_k]   v: [B, H, T, d_v]   g: log-decays <= 0, broadcastable to [B, H, T]
    G_t = g_0 + ... + g_t                                  (inclusive cumsum, fp32)
    o_t = scale * sum_{s <= t} (q_t . k_s) exp(G_t - G_s) v_s          (the parallel form)

so the decay of s itself is not applied to k_s v_s (G_t - G_s sums g_{s+1} .. g_t), and the
recurrent form is, in the zoo's order (decay, then add, then read):

    S_t = exp(g_t) S_{t-1} + k_t^T v_t        (d_k x d_v, S_{-1} = initial_state or 0)
    o_t = scale * q_t S_t

`scale` defaults to 1: neither zoo form scales inside the block (yoco scales k before it).
Gated retention passes per-token gates g: [B, H, T]; lightning a fixed per-head decay, either
as the zoo builds it ([1, H, T], expanded) or as g: [H] (log lambda_h); broadcast dims are read
with stride 0 and their gradient is summed back.

Chunked forward (chunk C, a power of two >= 16; T need not be a multiple of C: the last chunk
is masked, its padded gates read as 0). Within chunk n (rows t = nC + i) the decays are taken
relative to the chunk start: b_i = g_{nC} + ... + g_{nC+i} (a C x C masked row sum in fp32),
so every exponent below is <= 0 and nothing overflows however long T is (no global cumsum is
ever formed: with strong decay a global G reaches -1e5 and beyond by T = 32k, where fp32
differences G_t - G_s keep only a few digits, and exp(-G_s) alone would overflow):

    S_n   = the state entering chunk n (fp32, d_k x d_v; S_0 = initial_state)
    o_i   = scale * (exp(b_i) q_i S_n + sum_{j <= i} (q_i . k_j) exp(b_i - b_j) v_j)
    S_n+1 = exp(b_L) S_n + sum_j exp(b_L - b_j) k_j^T v_j              (b_L: the chunk's sum)

    _fwd_states   program per (d_k block, d_v block, b*h); walks the chunks in order, storing
                  S_n for every chunk (fp32 [B*H, NC, d_k, d_v]) and the final state.
    _fwd_out      program per (d_v block, chunk, b*h), all chunks in parallel: the intra-chunk
                  masked product (QK^T * D) V plus exp(b) Q S_n.

Saved vs recomputed: the autograd function saves only q, k, v, g (and the initial state); the
per-chunk states (NC * d_k * d_v fp32 per head: at C = 64, d = 128 twice the elements of q,
4x its bf16 bytes) are recomputed by `_fwd_states` in the backward (one extra sequential pass
of k^T v products: at C = 64, d = 128 a third of the forward's flops, an eighth of the
backward's) rather than held from forward to
backward, so a layer's activation memory between the passes is its inputs, as for flash
attention. Transient memory: the forward holds the states while `_fwd_out` runs; the backward
holds them and their gradients (2 x 4 NC d_k d_v bytes per head) plus an fp32 [NK, B, H, T]
buffer for dg; nothing is T x T.

Backward. dH_n = dL/dS_n obeys the reverse recurrence (dH_NC = the final state's gradient)

    dH_n  = exp(b_L) dH_n+1 + scale * sum_i exp(b_i) q_i^T do_i
    dq_i  = scale * (exp(b_i) do_i S_n^T + sum_{j <= i} (do_i . v_j) exp(b_i - b_j) k_j)
    dk_j  = scale * sum_{i >= j} (do_i . v_j) exp(b_i - b_j) q_i + exp(b_L - b_j) v_j dH_n+1^T
    dv_j  = scale * sum_{i >= j} (q_i . k_j) exp(b_i - b_j) do_i + exp(b_L - b_j) k_j dH_n+1

    _fwd_states   again (recompute S_n)
    _bwd_dstates  program per (d_k block, d_v block, b*h), chunks in reverse: stores dH_n+1
                  for every chunk and dH_0 (the initial state's gradient).
    _bwd_dqdk     program per (d_k block, chunk, b*h): dq, dk and the row sums q.dq, k.dk.
    _bwd_dv       program per (d_v block, chunk, b*h): dv.

Gradient of the log-decays. Every term of o depends on G through a_ts = scale (q_t . k_s)
exp(G_t - G_s) (do_t . v_s), s <= t: dL/dG_t = sum_s a_ts - sum_u a_ut = q_t.dq_t - k_t.dk_t
(the initial state's terms are in dq, the final state's key terms in dk), plus
<S_T, dS_T> at t = T - 1 (the final state is exp(G_{T-1} - G_s)-weighted); and since G is the
cumsum of g, dg_s = sum_{t >= s} dL/dG_t, a reverse cumsum (torch, fp32, O(BHT)).

Decode: `_recurrent` runs the recurrent form over a few new tokens for one (d_v block, b*h)
per program, the state tile in fp32 registers: state update and output in one launch, the new
state written in place if asked (CUDA-graph friendly). `prefill` is the chunked forward
returning its final state.

Grids: the sequential kernels run B*H*NK*NV programs (d = 128, 64-wide tiles: 4 per head),
the parallel ones (B*H*blocks, NC), so T / C <= 65535.

Dtypes: q, k, v fp32, fp16 or bf16 (one dtype); tensor-core dots take the input dtype
(fp32 dots are IEEE, no TF32), accumulate in fp32, decays and states are fp32, outputs and
dq/dk/dv take the input dtype, dg the gates' dtype. Only long-stable Triton APIs (tl.dot,
masked tl.load/tl.store, tl.where, tl.exp, tl.sum, tl.trans, tl.program_id), so the same
source runs on Triton 3.6 and 3.9.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import interpreter_blocks

Tensor = torch.Tensor

# largest d_k / d_v tile: a head dim above it is split over programs (d = 128: 2 x 64)
MAX_BLOCK = 64
# launch options on the GPU (fixed, not autotuned; two stages keep the fp32 backward's
# pipelined state tiles well inside the H100's shared memory)
GPU_LAUNCH = {"num_warps": 4, "num_stages": 2}


# --------------------------------------------------------------------------------------------
# kernels: index tiles and pointers are formed once per program and advanced in the loops
# --------------------------------------------------------------------------------------------
@triton.jit
def _decays(g, tri):
    """b_i = g_0 + ... + g_i over one chunk's gates (fp32, a masked row sum: the decay of row
    i relative to the chunk start) and b_L, the whole chunk's sum. Padded rows hold g = 0."""
    b = tl.sum(tl.where(tri, g[None, :], 0.0), axis=1)
    return b, tl.sum(g, axis=0)


@triton.jit
def _fwd_states(K, V, G, S0, HS, SF,
                skb, skh, skt, skd, svb, svh, svt, svd, sgb, sgh, sgt,
                T, H, NC, DK, DV,
                CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
                NV: tl.constexpr, HAS_S0: tl.constexpr, STORE_SF: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """Program (d_k block x d_v block, b*h), chunks in order: stores S_n (the state entering
    chunk n) into HS[bh, n], then S_n+1 = exp(b_L) S_n + (k * exp(b_L - b))^T v; the final
    state into SF."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // (NK * NV)
    kb = (pid // NV) % NK
    vb = pid % NV
    bb, hh = bh // H, bh % H
    dt = K.dtype.element_ty
    i = tl.arange(0, CHUNK)
    rk = kb * BK + tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    k_ptr = K + bb * skb + hh * skh + i[:, None] * skt + rk[None, :] * skd
    v_ptr = V + bb * svb + hh * svh + i[:, None] * svt + cv[None, :] * svd
    g_ptr = G + bb * sgb + hh * sgh + i * sgt
    k_cols = (rk < DK)[None, :]
    v_cols = (cv < DV)[None, :]
    s_loc = rk[:, None] * DV + cv[None, :]
    s_mask = (rk < DK)[:, None] & v_cols
    tri = i[None, :] <= i[:, None]
    if HAS_S0:
        state = tl.load(S0 + bh * DK * DV + s_loc, mask=s_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    h_ptr = HS + bh * NC * DK * DV + s_loc
    for n in range(NC):
        t0 = n * CHUNK
        rows = (t0 + i) < T
        tl.store(h_ptr + n * DK * DV, state, mask=s_mask)
        g = tl.load(g_ptr + t0 * sgt, mask=rows, other=0.0).to(tl.float32)
        b, b_last = _decays(g, tri)
        k = tl.load(k_ptr + t0 * skt, mask=rows[:, None] & k_cols, other=0.0)
        v = tl.load(v_ptr + t0 * svt, mask=rows[:, None] & v_cols, other=0.0)
        kw = (k.to(tl.float32) * tl.exp(b_last - b)[:, None]).to(dt)
        state = state * tl.exp(b_last) + tl.dot(tl.trans(kw), v, input_precision=DOT_PREC)
    if STORE_SF:
        tl.store(SF + bh * DK * DV + s_loc, state, mask=s_mask)


@triton.jit
def _fwd_out(Q, K, V, G, HS, OUT,
             sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sgb, sgh, sgt,
             sob, soh, sot, sod,
             T, H, NC, DK, DV, scale,
             CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
             NV: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (d_v block, chunk n, b*h): o = scale (exp(b) q S_n + ((q k^T) * D) v) with
    D_ij = exp(b_i - b_j) for j <= i, summing the d_k blocks."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // NV
    vb = pid % NV
    n = tl.program_id(1)
    bb, hh = bh // H, bh % H
    dt = Q.dtype.element_ty
    t0 = n * CHUNK
    i = tl.arange(0, CHUNK)
    rows = ((t0 + i) < T)[:, None]
    ck = tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    rk = tl.arange(0, BK)
    q_ptr = Q + bb * sqb + hh * sqh + (t0 + i)[:, None] * sqt + ck[None, :] * sqd
    k_ptr = K + bb * skb + hh * skh + (t0 + i)[:, None] * skt + ck[None, :] * skd
    h_ptr = HS + (bh * NC + n) * DK * DV + rk[:, None] * DV + cv[None, :]
    v_cols = (cv < DV)[None, :]
    g = tl.load(G + bb * sgb + hh * sgh + (t0 + i) * sgt, mask=(t0 + i) < T, other=0.0)
    tri = i[None, :] <= i[:, None]
    b, b_last = _decays(g.to(tl.float32), tri)
    scores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    inter = tl.zeros([CHUNK, BV], dtype=tl.float32)
    for kb in range(NK):
        kmask = rows & ((kb * BK + ck) < DK)[None, :]
        q = tl.load(q_ptr + kb * BK * sqd, mask=kmask, other=0.0)
        k = tl.load(k_ptr + kb * BK * skd, mask=kmask, other=0.0)
        scores = tl.dot(q, tl.trans(k), acc=scores, input_precision=DOT_PREC)
        smask = ((kb * BK + rk) < DK)[:, None] & v_cols
        state = tl.load(h_ptr + kb * BK * DV, mask=smask, other=0.0)
        inter = tl.dot(q, state.to(dt), acc=inter, input_precision=DOT_PREC)
    decay = tl.exp(tl.where(tri, b[:, None] - b[None, :], float("-inf")))
    v = tl.load(V + bb * svb + hh * svh + (t0 + i)[:, None] * svt + cv[None, :] * svd,
                mask=rows & v_cols, other=0.0)
    out = inter * (scale * tl.exp(b))[:, None]
    out = tl.dot((scores * decay * scale).to(dt), v, acc=out, input_precision=DOT_PREC)
    tl.store(OUT + bb * sob + hh * soh + (t0 + i)[:, None] * sot + cv[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=rows & v_cols)


@triton.jit
def _bwd_dstates(Q, DO, G, DSF, DHS, DS0,
                 sqb, sqh, sqt, sqd, sdb, sdh, sdt, sdd, sgb, sgh, sgt,
                 T, H, NC, DK, DV, scale,
                 CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
                 NV: tl.constexpr, HAS_DSF: tl.constexpr, STORE_DS0: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """Program (d_k block x d_v block, b*h), chunks in reverse: stores dH_n+1 = dL/dS_n+1
    (the gradient of the state leaving chunk n) into DHS[bh, n], then
    dH_n = exp(b_L) dH_n+1 + (q * scale exp(b))^T do; dH_0 into DS0."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // (NK * NV)
    kb = (pid // NV) % NK
    vb = pid % NV
    bb, hh = bh // H, bh % H
    dt = Q.dtype.element_ty
    i = tl.arange(0, CHUNK)
    rk = kb * BK + tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    q_ptr = Q + bb * sqb + hh * sqh + i[:, None] * sqt + rk[None, :] * sqd
    d_ptr = DO + bb * sdb + hh * sdh + i[:, None] * sdt + cv[None, :] * sdd
    g_ptr = G + bb * sgb + hh * sgh + i * sgt
    k_cols = (rk < DK)[None, :]
    v_cols = (cv < DV)[None, :]
    s_loc = rk[:, None] * DV + cv[None, :]
    s_mask = (rk < DK)[:, None] & v_cols
    tri = i[None, :] <= i[:, None]
    if HAS_DSF:
        dstate = tl.load(DSF + bh * DK * DV + s_loc, mask=s_mask, other=0.0).to(tl.float32)
    else:
        dstate = tl.zeros([BK, BV], dtype=tl.float32)
    h_ptr = DHS + bh * NC * DK * DV + s_loc
    for r in range(NC):
        n = NC - 1 - r
        t0 = n * CHUNK
        rows = (t0 + i) < T
        tl.store(h_ptr + n * DK * DV, dstate, mask=s_mask)
        g = tl.load(g_ptr + t0 * sgt, mask=rows, other=0.0).to(tl.float32)
        b, b_last = _decays(g, tri)
        q = tl.load(q_ptr + t0 * sqt, mask=rows[:, None] & k_cols, other=0.0)
        do = tl.load(d_ptr + t0 * sdt, mask=rows[:, None] & v_cols, other=0.0).to(dt)
        qw = (q.to(tl.float32) * (scale * tl.exp(b))[:, None]).to(dt)
        dstate = dstate * tl.exp(b_last) + tl.dot(tl.trans(qw), do, input_precision=DOT_PREC)
    if STORE_DS0:
        tl.store(DS0 + bh * DK * DV + s_loc, dstate, mask=s_mask)


@triton.jit
def _bwd_dqdk(Q, K, V, G, DO, HS, DHS, DQ, DK_, DGP,
              sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sgb, sgh, sgt,
              sdb, sdh, sdt, sdd, s_dqb, s_dqh, s_dqt, s_dqd, s_dkb, s_dkh, s_dkt, s_dkd,
              T, H, NC, DK, DV, scale,
              CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
              NV: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (d_k block, chunk n, b*h), summing the d_v blocks:
    dq = scale (exp(b) do S_n^T + (dP * D) k),  dk = exp(b_L - b) v dH_n+1^T + scale (dP * D)^T q
    with dP = do v^T; and this block's share of dL/dG_t = q_t . dq_t - k_t . dk_t (fp32)."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // NK
    kb = pid % NK
    n = tl.program_id(1)
    bb, hh = bh // H, bh % H
    dt = Q.dtype.element_ty
    t0 = n * CHUNK
    i = tl.arange(0, CHUNK)
    rows = ((t0 + i) < T)[:, None]
    rk = kb * BK + tl.arange(0, BK)
    cv = tl.arange(0, BV)
    kmask = rows & (rk < DK)[None, :]
    d_ptr = DO + bb * sdb + hh * sdh + (t0 + i)[:, None] * sdt + cv[None, :] * sdd
    v_ptr = V + bb * svb + hh * svh + (t0 + i)[:, None] * svt + cv[None, :] * svd
    s_loc = (bh * NC + n) * DK * DV + rk[:, None] * DV + cv[None, :]
    g = tl.load(G + bb * sgb + hh * sgh + (t0 + i) * sgt, mask=(t0 + i) < T, other=0.0)
    tri = i[None, :] <= i[:, None]
    b, b_last = _decays(g.to(tl.float32), tri)
    dp = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)          # do_i . v_j
    dq_state = tl.zeros([CHUNK, BK], dtype=tl.float32)      # do S_n^T
    dk_state = tl.zeros([CHUNK, BK], dtype=tl.float32)      # v dH_n+1^T
    for vb in range(NV):
        vcols = (vb * BV + cv) < DV
        do = tl.load(d_ptr + vb * BV * sdd, mask=rows & vcols[None, :], other=0.0).to(dt)
        v = tl.load(v_ptr + vb * BV * svd, mask=rows & vcols[None, :], other=0.0)
        dp = tl.dot(do, tl.trans(v), acc=dp, input_precision=DOT_PREC)
        smask = (rk < DK)[:, None] & vcols[None, :]
        state = tl.load(HS + s_loc + vb * BV, mask=smask, other=0.0).to(dt)
        dq_state = tl.dot(do, tl.trans(state), acc=dq_state, input_precision=DOT_PREC)
        dstate = tl.load(DHS + s_loc + vb * BV, mask=smask, other=0.0).to(dt)
        dk_state = tl.dot(v, tl.trans(dstate), acc=dk_state, input_precision=DOT_PREC)
    decay = tl.exp(tl.where(tri, b[:, None] - b[None, :], float("-inf")))
    ds = (dp * decay * scale).to(dt)                         # [i, j]
    q_off = bb * sqb + hh * sqh + (t0 + i)[:, None] * sqt + rk[None, :] * sqd
    k_off = bb * skb + hh * skh + (t0 + i)[:, None] * skt + rk[None, :] * skd
    q = tl.load(Q + q_off, mask=kmask, other=0.0)
    k = tl.load(K + k_off, mask=kmask, other=0.0)
    dq = dq_state * (scale * tl.exp(b))[:, None]
    dq = tl.dot(ds, k, acc=dq, input_precision=DOT_PREC)
    dk = dk_state * tl.exp(b_last - b)[:, None]
    dk = tl.dot(tl.trans(ds), q, acc=dk, input_precision=DOT_PREC)
    dq_off = bb * s_dqb + hh * s_dqh + (t0 + i)[:, None] * s_dqt + rk[None, :] * s_dqd
    dk_off = bb * s_dkb + hh * s_dkh + (t0 + i)[:, None] * s_dkt + rk[None, :] * s_dkd
    tl.store(DQ + dq_off, dq.to(DQ.dtype.element_ty), mask=kmask)
    tl.store(DK_ + dk_off, dk.to(DK_.dtype.element_ty), mask=kmask)
    dgt = tl.sum(q.to(tl.float32) * dq - k.to(tl.float32) * dk, axis=1)
    tl.store(DGP + (kb * (tl.num_programs(0) // NK) + bh) * T + t0 + i, dgt,
             mask=(t0 + i) < T)


@triton.jit
def _bwd_dv(Q, K, G, DO, DHS, DV_,
            sqb, sqh, sqt, sqd, skb, skh, skt, skd, sgb, sgh, sgt, sdb, sdh, sdt, sdd,
            svb, svh, svt, svd,
            T, H, NC, DK, DV, scale,
            CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
            NV: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (d_v block, chunk n, b*h), summing the d_k blocks:
    dv = exp(b_L - b) k dH_n+1 + scale ((k q^T) * D^T) do."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // NV
    vb = pid % NV
    n = tl.program_id(1)
    bb, hh = bh // H, bh % H
    dt = Q.dtype.element_ty
    t0 = n * CHUNK
    i = tl.arange(0, CHUNK)
    rows = ((t0 + i) < T)[:, None]
    ck = tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    v_cols = (cv < DV)[None, :]
    q_ptr = Q + bb * sqb + hh * sqh + (t0 + i)[:, None] * sqt + ck[None, :] * sqd
    k_ptr = K + bb * skb + hh * skh + (t0 + i)[:, None] * skt + ck[None, :] * skd
    h_ptr = DHS + (bh * NC + n) * DK * DV + ck[:, None] * DV + cv[None, :]
    g = tl.load(G + bb * sgb + hh * sgh + (t0 + i) * sgt, mask=(t0 + i) < T, other=0.0)
    tri = i[None, :] <= i[:, None]
    b, b_last = _decays(g.to(tl.float32), tri)
    scores_t = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)    # [j, i] = k_j . q_i
    dv_state = tl.zeros([CHUNK, BV], dtype=tl.float32)      # k dH_n+1
    for kb in range(NK):
        kmask = rows & ((kb * BK + ck) < DK)[None, :]
        q = tl.load(q_ptr + kb * BK * sqd, mask=kmask, other=0.0)
        k = tl.load(k_ptr + kb * BK * skd, mask=kmask, other=0.0)
        scores_t = tl.dot(k, tl.trans(q), acc=scores_t, input_precision=DOT_PREC)
        smask = ((kb * BK + ck) < DK)[:, None] & v_cols
        dstate = tl.load(h_ptr + kb * BK * DV, mask=smask, other=0.0).to(dt)
        dv_state = tl.dot(k, dstate, acc=dv_state, input_precision=DOT_PREC)
    tri_t = i[:, None] <= i[None, :]                         # [j, i]: j <= i
    decay_t = tl.exp(tl.where(tri_t, b[None, :] - b[:, None], float("-inf")))
    do = tl.load(DO + bb * sdb + hh * sdh + (t0 + i)[:, None] * sdt + cv[None, :] * sdd,
                 mask=rows & v_cols, other=0.0).to(dt)
    dv = dv_state * tl.exp(b_last - b)[:, None]
    dv = tl.dot((scores_t * decay_t * scale).to(dt), do, acc=dv, input_precision=DOT_PREC)
    tl.store(DV_ + bb * svb + hh * svh + (t0 + i)[:, None] * svt + cv[None, :] * svd,
             dv.to(DV_.dtype.element_ty), mask=rows & v_cols)


# --------------------------------------------------------------------------------------------
# decode: the recurrent form over a few new tokens
# --------------------------------------------------------------------------------------------
@triton.jit
def _recurrent(Q, K, V, G, S_IN, S_OUT, OUT,
               sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sgb, sgh, sgt,
               sob, soh, sot, sod,
               T, H, DK, DV, scale,
               BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr):
    """Program (d_v block, b*h): the [d_k, BV] state tile in fp32 registers; per new token
    S = exp(g_t) S + k_t^T v_t, then o_t = scale q_t S; the state is stored once at the end
    (S_OUT may be S_IN: each program reads its tile before writing it)."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // NV
    vb = pid % NV
    bb, hh = bh // H, bh % H
    r = tl.arange(0, BK)
    c = vb * BV + tl.arange(0, BV)
    r_ok = r < DK
    c_ok = c < DV
    s_idx = bh * DK * DV + r[:, None] * DV + c[None, :]
    s_mask = r_ok[:, None] & c_ok[None, :]
    state = tl.load(S_IN + s_idx, mask=s_mask, other=0.0).to(tl.float32)
    q_ptr = Q + bb * sqb + hh * sqh + r * sqd
    k_ptr = K + bb * skb + hh * skh + r * skd
    v_ptr = V + bb * svb + hh * svh + c * svd
    o_ptr = OUT + bb * sob + hh * soh + c * sod
    g_ptr = G + bb * sgb + hh * sgh
    for t in range(T):
        decay = tl.exp(tl.load(g_ptr + t * sgt).to(tl.float32))
        k = tl.load(k_ptr + t * skt, mask=r_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * svt, mask=c_ok, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + t * sqt, mask=r_ok, other=0.0).to(tl.float32)
        state = state * decay + k[:, None] * v[None, :]
        o = tl.sum(q[:, None] * state, axis=0) * scale
        tl.store(o_ptr + t * sot, o.to(OUT.dtype.element_ty), mask=c_ok)
    tl.store(S_OUT + s_idx, state, mask=s_mask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def _p2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def _blocks(d: int) -> int:
    return min(_p2(d), max(16, MAX_BLOCK))


def _s4(x: Tensor) -> Tuple[int, int, int, int]:
    return tuple(x.stride())


def _gates(g: Tensor, B: int, H: int, T: int) -> Tensor:
    """g as a (possibly stride-0) [B, H, T] view: a 1-d g is a fixed per-head log-decay [H];
    anything else must broadcast to [B, H, T] ([1, H, T] as the zoo's lightning writes it)."""
    if g.dim() == 1:
        if g.shape[0] != H:
            raise ValueError(f"a fixed per-head log-decay g must be [H] = [{H}], got "
                             f"{list(g.shape)}")
        g = g.view(1, H, 1)
    if g.dim() > 3:
        raise ValueError(f"log-decays g must be [H] or broadcastable to [B, H, T] = "
                         f"{[B, H, T]}: got {list(g.shape)}")
    try:
        return g.expand(B, H, T)
    except RuntimeError:
        raise ValueError(f"log-decays g of shape {list(g.shape)} do not broadcast to "
                         f"[B, H, T] = {[B, H, T]}") from None


def _check(q: Tensor, k: Tensor, v: Tensor, chunk: int):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, H, T, d_k] and v [B, H, T, d_v]: got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16,
                                                                torch.bfloat16):
        raise ValueError(f"q, k, v must share one float dtype (f32, f16, bf16): got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")


class _Plan:
    """Sizes, blocks and launch options of one call."""

    def __init__(self, q: Tensor, v: Tensor, chunk: int, scale: Optional[float]):
        self.B, self.H, self.T, self.DK = q.shape
        self.DV = v.shape[-1]
        self.C = int(chunk)
        self.NC = triton.cdiv(self.T, self.C)
        self.BK, self.BV = _blocks(self.DK), _blocks(self.DV)
        self.NK, self.NV = triton.cdiv(self.DK, self.BK), triton.cdiv(self.DV, self.BV)
        self.scale = 1.0 if scale is None else float(scale)
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"
        self.warps = {} if interpreter_blocks() else dict(GPU_LAUNCH)

    def states(self, k, v, g, s0, store_final: bool) -> Tuple[Tensor, Optional[Tensor]]:
        BH = self.B * self.H
        hs = torch.empty((BH, self.NC, self.DK, self.DV), dtype=torch.float32, device=k.device)
        sf = torch.empty((self.B, self.H, self.DK, self.DV), dtype=torch.float32,
                         device=k.device) if store_final else None
        _fwd_states[(BH * self.NK * self.NV,)](
            k, v, g, s0 if s0 is not None else hs, hs, sf if sf is not None else hs,
            *_s4(k), *_s4(v), *g.stride(), self.T, self.H, self.NC, self.DK, self.DV,
            CHUNK=self.C, BK=self.BK, BV=self.BV, NK=self.NK, NV=self.NV,
            HAS_S0=s0 is not None,
            STORE_SF=store_final, DOT_PREC=self.prec, **self.warps)
        return hs, sf


def _state0(s: Optional[Tensor], p: _Plan) -> Optional[Tensor]:
    if s is None:
        return None
    want = (p.B, p.H, p.DK, p.DV)
    if tuple(s.shape) != want:
        raise ValueError(f"initial_state must be [B, H, d_k, d_v] = {list(want)}, got "
                         f"{list(s.shape)}")
    return s.contiguous()


def _forward(q, k, v, g, s0, p: _Plan, store_final: bool, out: Optional[Tensor] = None):
    hs, sf = p.states(k, v, g, s0, store_final)
    o = out if out is not None else \
        torch.empty(q.shape[:3] + (p.DV,), dtype=q.dtype, device=q.device)
    _fwd_out[(p.B * p.H * p.NV, p.NC)](
        q, k, v, g, hs, o, *_s4(q), *_s4(k), *_s4(v), *g.stride(), *_s4(o),
        p.T, p.H, p.NC, p.DK, p.DV, p.scale,
        CHUNK=p.C, BK=p.BK, BV=p.BV, NK=p.NK, NV=p.NV, DOT_PREC=p.prec, **p.warps)
    return o, sf


def _backward(do, dsf, q, k, v, g, s0, p: _Plan, need_ds0: bool, into=(None, None, None)):
    """into: buffers for (dq, dk, dv) the kernels write directly (through their strides), each
    None or of its operand's shape and dtype."""
    BH = p.B * p.H
    hs, sf = p.states(k, v, g, s0, dsf is not None)
    dhs = torch.empty_like(hs)
    ds0 = torch.empty((p.B, p.H, p.DK, p.DV), dtype=torch.float32, device=q.device) \
        if need_ds0 else None
    do = do if do.dtype == q.dtype else do.to(q.dtype)
    dsf_c = dsf.float().contiguous() if dsf is not None else None
    _bwd_dstates[(BH * p.NK * p.NV,)](
        q, do, g, dsf_c if dsf_c is not None else hs, dhs, ds0 if ds0 is not None else hs,
        *_s4(q), *_s4(do), *g.stride(), p.T, p.H, p.NC, p.DK, p.DV, p.scale,
        CHUNK=p.C, BK=p.BK, BV=p.BV, NK=p.NK, NV=p.NV, HAS_DSF=dsf_c is not None,
        STORE_DS0=need_ds0, DOT_PREC=p.prec, **p.warps)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) if o is None else o
                  for x, o in zip((q, k, v), into))
    dgp = torch.empty((p.NK, p.B, p.H, p.T), dtype=torch.float32, device=q.device)
    _bwd_dqdk[(BH * p.NK, p.NC)](
        q, k, v, g, do, hs, dhs, dq, dk, dgp,
        *_s4(q), *_s4(k), *_s4(v), *g.stride(), *_s4(do), *_s4(dq), *_s4(dk),
        p.T, p.H, p.NC, p.DK, p.DV, p.scale,
        CHUNK=p.C, BK=p.BK, BV=p.BV, NK=p.NK, NV=p.NV, DOT_PREC=p.prec, **p.warps)
    _bwd_dv[(BH * p.NV, p.NC)](
        q, k, g, do, dhs, dv,
        *_s4(q), *_s4(k), *g.stride(), *_s4(do), *_s4(dv),
        p.T, p.H, p.NC, p.DK, p.DV, p.scale,
        CHUNK=p.C, BK=p.BK, BV=p.BV, NK=p.NK, NV=p.NV, DOT_PREC=p.prec, **p.warps)
    dG = dgp.sum(0)
    if dsf is not None:     # the final state carries exp(G_{T-1}): d/dG_{T-1} = <S_T, dS_T>
        dG[..., -1] += (sf * dsf_c).sum((-2, -1))
    dg = dG.flip(-1).cumsum(-1).flip(-1)                     # G = cumsum(g)
    return dq, dk, dv, dg, ds0


def _grid_check(p: "_Plan"):
    if p.NC > 65535:
        raise ValueError(f"T = {p.T} is {p.NC} chunks of {p.C}: at most 65535 (use a larger "
                         f"chunk)")


class _ChunkedLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, chunk, scale):
        B, H, T, _ = q.shape
        ge = _gates(g, B, H, T)
        p = _Plan(q, v, chunk, scale)
        _grid_check(p)
        s0c = _state0(s0, p)
        o, sf = _forward(q, k, v, ge, s0c, p, store_final=True)
        ctx.save_for_backward(q, k, v, g, s0c)
        ctx.plan = p
        ctx.set_materialize_grads(False)
        return o, sf

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dsf):
        q, k, v, g, s0 = ctx.saved_tensors
        p = ctx.plan
        if do is None:
            do = torch.zeros(q.shape[:3] + (p.DV,), dtype=q.dtype, device=q.device)
        ge = _gates(g, p.B, p.H, p.T)
        dq, dk, dv, dg, ds0 = _backward(do, dsf, q, k, v, ge, s0, p,
                                        need_ds0=s0 is not None and ctx.needs_input_grad[4])
        if g.dim() == 1:
            dg = dg.sum((0, 2))
        elif tuple(g.shape) != tuple(dg.shape):
            dg = dg.sum_to_size((1,) * (3 - g.dim()) + tuple(g.shape)).reshape(g.shape)
        dg = dg.to(g.dtype)
        if ds0 is not None:
            ds0 = ds0.to(s0.dtype)
        return dq, dk, dv, dg, ds0, None, None


def chunked_linear_attention(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, chunk: int = 64,
                             scale: Optional[float] = None,
                             initial_state: Optional[Tensor] = None,
                             return_state: bool = False):
    """Decayed linear attention, o_t = scale sum_{s<=t} (q_t.k_s) exp(G_t - G_s) v_s with
    G = cumsum(g) along T, by the chunked Triton kernels; differentiable in q, k, v, g and
    initial_state.

    q, k: [B, H, T, d_k]; v: [B, H, T, d_v] (any strides, one dtype of f32/f16/bf16);
    g: log-decays <= 0, [H] (fixed per head) or broadcastable to [B, H, T]; chunk: a power of
    two >= 16 (T need not be a multiple); scale: None means 1 (as the zoo's block);
    initial_state: [B, H, d_k, d_v] (fp32 recommended), the state before position 0.
    Returns o ([B, H, T, d_v], q's dtype), and with return_state=True also the final state
    ([B, H, d_k, d_v], fp32; differentiable)."""
    _check(q, k, v, chunk)
    if q.shape[2] == 0:
        raise ValueError("chunked_linear_attention needs T >= 1")
    o, sf = _ChunkedLinearAttention.apply(q, k, v, g, initial_state, chunk, scale)
    return (o, sf) if return_state else o


def prefill(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, chunk: int = 64,
            scale: Optional[float] = None,
            initial_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The chunked forward returning (o, final state): the state `recurrent_step` continues."""
    return chunked_linear_attention(q, k, v, g, chunk=chunk, scale=scale,
                                    initial_state=initial_state, return_state=True)


def recurrent_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, *,
                   scale: Optional[float] = None,
                   inplace: bool = False, out: Optional[Tensor] = None,
                   new_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Decode: S <- exp(g_t) S + k_t^T v_t, then o_t = scale q_t S, for each new token in order,
    in one launch (no autograd).

    q, k: [B, H, d_k] (one token) or [B, H, n, d_k] (n new tokens); v likewise with d_v;
    g: [H] or broadcastable to [B, H] (one token) / [B, H, n]; state: [B, H, d_k, d_v]
    (fp32). Returns (o, new state); with inplace=True the new state is written into `state`
    (which must then be a contiguous fp32 tensor) and returned. `out` (o's shape, any
    strides) and `new_state` (a contiguous fp32 [B, H, d_k, d_v], not `state`) receive the
    results instead of fresh tensors when given."""
    single = q.dim() == 3
    if single:
        q, k, v = q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)
        if g.dim() == 2:
            g = g.unsqueeze(-1)
    _check(q, k, v, 16)
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    if tuple(state.shape) != (B, H, DK, DV):
        raise ValueError(f"state must be [B, H, d_k, d_v] = {[B, H, DK, DV]}, got "
                         f"{list(state.shape)}")
    ge = _gates(g, B, H, T)
    if inplace:
        if state.dtype != torch.float32 or not state.is_contiguous():
            raise ValueError("inplace=True needs a contiguous fp32 state")
        s_in = s_out = state
    else:
        s_in = state.contiguous()
        s_out = new_state if new_state is not None else \
            torch.empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
        if tuple(s_out.shape) != (B, H, DK, DV) or s_out.dtype != torch.float32 \
                or not s_out.is_contiguous():
            raise ValueError("new_state must be a contiguous fp32 [B, H, d_k, d_v] tensor")
    o = torch.empty((B, H, T, DV), dtype=q.dtype, device=q.device) if out is None else \
        (out.unsqueeze(2) if single else out)
    if tuple(o.shape) != (B, H, T, DV):
        raise ValueError(f"out must be {[B, H, T, DV] if not single else [B, H, DV]}, got "
                         f"{list(out.shape)}")
    BK = _p2(DK)
    BV = min(_p2(DV), 64)
    warps = {} if interpreter_blocks() else dict(GPU_LAUNCH)
    NV = triton.cdiv(DV, BV)
    _recurrent[(B * H * NV,)](
        q, k, v, ge, s_in, s_out, o, *_s4(q), *_s4(k), *_s4(v), *ge.stride(), *_s4(o),
        T, H, DK, DV, 1.0 if scale is None else float(scale), BK=BK, BV=BV, NV=NV, **warps)
    return (o[:, :, 0] if single else o), s_out


# --------------------------------------------------------------------------------------------
# torch references
# --------------------------------------------------------------------------------------------
def _wide(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *,
                               scale: Optional[float] = None,
                               initial_state: Optional[Tensor] = None,
                               return_state: bool = False):
    """The parallel (T x T masked) form, as the zoo writes it, in fp32 (fp64 if given):
    G = cumsum(g), D_ts = exp(G_t - G_s) for s <= t, o = scale ((q k^T) * D) v; an initial
    state S_0 adds scale exp(G_t) q_t S_0; the final state is
    exp(G_{T-1}) S_0 + sum_s exp(G_{T-1} - G_s) k_s^T v_s. Differentiable by torch."""
    B, H, T, _ = q.shape
    qw, kw, vw = _wide(q), _wide(k), _wide(v)
    G = _wide(_gates(g, B, H, T)).cumsum(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    D = torch.exp(torch.where(causal, G[..., :, None] - G[..., None, :],
                              torch.tensor(float("-inf"), dtype=G.dtype, device=G.device)))
    s = 1.0 if scale is None else float(scale)
    o = ((qw @ kw.transpose(-2, -1)) * D) @ vw * s
    last = G[..., -1:]                                         # [B, H, 1]
    if initial_state is not None:
        s0 = _wide(initial_state).to(o.dtype)
        o = o + s * torch.exp(G)[..., None] * (qw @ s0)
    o = o.to(q.dtype)
    if not return_state:
        return o
    w = torch.exp(last - G)[..., None]                         # [B, H, T, 1]
    sf = (kw * w).transpose(-2, -1) @ vw
    if initial_state is not None:
        sf = sf + torch.exp(last)[..., None] * s0
    return o, sf


def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *,
                               scale: Optional[float] = None,
                               initial_state: Optional[Tensor] = None,
                               return_state: bool = False):
    """The recurrent form, token by token in fp32 (fp64 if given): S_t = exp(g_t) S_{t-1} +
    k_t^T v_t, o_t = scale q_t S_t. Differentiable by torch."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    qw, kw, vw = _wide(q), _wide(k), _wide(v)
    ge = _wide(_gates(g, B, H, T))
    s = 1.0 if scale is None else float(scale)
    S = torch.zeros(B, H, DK, DV, dtype=qw.dtype, device=q.device) if initial_state is None \
        else _wide(initial_state).to(qw.dtype)
    outs = []
    for t in range(T):
        S = torch.exp(ge[..., t])[..., None, None] * S + kw[:, :, t, :, None] * vw[:, :, t, None]
        outs.append(s * (qw[:, :, t, None, :] @ S)[:, :, 0])
    o = torch.stack(outs, 2).to(q.dtype) if T else qw.new_zeros(B, H, 0, DV).to(q.dtype)
    return (o, S) if return_state else o


# --------------------------------------------------------------------------------------------
# the fused op of lmc/passes/fuse_linear_attention.py (codegen/templates.py dispatches here)
# --------------------------------------------------------------------------------------------
def launch_template(template: str, xs, outs, opts) -> None:
    """"linear_attention": xs = (q, k, v, ld), outs[0] = o. "linear_attention_bwd":
    xs = (q, k, v, ld, do), outs = (dq, dk, dv[, dld when opts["decay_grad"]]). q and k may
    have 1 for B or H (one projection shared by every head: Mamba-2's B and C); the kernels
    read them at stride 0 and their gradients are summed back.

    The inputs come in the graph's dtype (f32, or f16/bf16 under mixed precision); the states
    and decays are fp32 whatever it is. The backward recomputes the per-chunk states (as the
    autograd function does) and needs no forward output, so no forward is rerun. The chunk is
    opts["chunk"], lowered to the smallest power of two >= max(T, 16) for a short T (the same
    math, less padding)."""
    q0, k0, v, g = xs[:4]
    B, H, T, _ = v.shape
    q, k = (x.expand(B, H, T, x.shape[-1]) for x in (q0, k0))  # shared by heads: stride 0
    chunk = min(int(opts["chunk"]), _p2(T))
    _check(q, k, v, chunk)
    if T == 0:
        for o in outs:
            o.zero_()
        return
    p = _Plan(q, v, chunk, opts.get("scale"))
    _grid_check(p)
    ge = _gates(g, B, H, T)
    if template == "linear_attention":
        o = outs[0]
        direct = o.dtype == q.dtype and tuple(o.shape) == (B, H, T, p.DV)   # any strides
        y, _ = _forward(q, k, v, ge, None, p, store_final=False, out=o if direct else None)
        if not direct:
            o.copy_(y)
        return
    assert template == "linear_attention_bwd", template
    into = tuple(o if o.shape == x.shape and o.dtype == x.dtype else None
                 for o, x in zip(outs, (q, k, v)))      # written by the kernels, no copy
    dq, dk, dv, dg, _ = _backward(xs[4], None, q, k, v, ge, None, p, need_ds0=False,
                                  into=into)
    # q, k shared by every head (or batch entry): their gradients summed over the heads
    grads = [dq.sum_to_size(q0.shape), dk.sum_to_size(k0.shape), dv]
    if opts.get("decay_grad", True):
        grads.append(dg.sum_to_size(g.shape))     # a broadcast decay's gradient summed back
    assert len(grads) == len(outs), (len(grads), len(outs))
    for o, d in zip(outs, grads):
        if o is not d:
            o.copy_(d)
