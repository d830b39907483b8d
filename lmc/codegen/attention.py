"""Fused RoPE + flash attention: Triton kernels (forward, backward, decode) and their torch
reference, for the `fuse_rope_attention` pass (issue 7).

Hand-written templates rather than generated code: every variant of the pattern is a
combination of constexpr flags (RoPE layout, rotary width, causal, window) and runtime
scalars (positions, window, scale), so one module serves every model.

The math (also `rope_attention_reference`, the oracle and the torch backend's op):

    q, k: [B, H, T, D], [B, Hkv, S, D]; v: [B, Hkv, S, Dv] (Dv may differ from D: MLA's
    q/k carry the decoupled RoPE part, v does not); H % Hkv == 0, query head h reads
    kv head h // (H / Hkv) (GQA; Hkv == 1 is MQA).
    Positions: query row i sits at q_offset + i, key row j at k_offset + j (absolute).
    RoPE on the first R = rot_dim dims of a head (R == D: all; R == 0: none), from tables
    cos, sin: [max_pos, R] indexed by absolute position, in the layout of the rotated dims:
        rope(x)[d] = x[d] * cos[p, d] + rot(x)[d] * sin[p, d]          (d < R)
        rotate-half:  rot(x) = [-x[R/2:R], x[0:R/2]]
        interleaved:  rot(x)[2i] = -x[2i+1],  rot(x)[2i+1] = x[2i]
    or "paired" tables [max_pos, R/2], one column per rotary pair (both members share the
    angle, as in every RoPE): half the table loads. The tables are data, not a formula, so
    any base, scaling or precomputed table works. Keys may use their own tables (k_cos,
    k_sin; default: the queries'): XPos is exactly that (`xpos_tables` folds zeta^(+-p/base)
    into the two sets), and rope_k=False leaves k as given (already rotated: YOCO's shared
    cross-attention K).
    Visibility: key j is visible to query i iff  kpos <= qpos (causal)  and  kpos > qpos - W
    (window W)  [and kpos < kv_len (decode)];  a row that sees no key outputs 0 (lse -inf).
    out = softmax(scale * rope(q) rope(k)^T over the visible keys) v,  scale = 1/sqrt(D);
    optionally the scaled scores soft-capped, cap * tanh(s / cap) (softcap), and ALiBi's
    alibi[h] * (kpos - qpos) added (alibi: a slope per query head).

How RoPE enters the tiles. The head dim is split into three column groups: A and B, the two
members of each rotary pair (rotate-half: A = [0, R/2), B = [R/2, R); interleaved: A the even
and B the odd columns below R), and C = [R, D), not rotated. Each group is its own tile, so

    rope:       y_A = x_A cos_A - x_B sin_A      y_B = x_B cos_B + x_A sin_B      y_C = x_C
    transpose:  dx_A = dy_A cos_A + dy_B sin_B   dx_B = dy_B cos_B - dy_A sin_A   dx_C = dy_C
    scores:     q k^T = q_A k_A^T + q_B k_B^T + q_C k_C^T          (three tl.dot into one acc)

are elementwise on tiles that are already in registers: no second load of a tile at permuted
columns and no shuffle of an accumulator (the backward's R^T is applied to the dQ / dK
accumulators right before the store). RoPE is computed in fp32 and rounded to the input
dtype for the dot (bf16/fp16 tensor cores; an unfused model stores roped q, k in that dtype
too); V and dO are never rotated and stay whole [*, Dv] tiles. Nothing rotated is written
to memory: the backward rotates Q and K again from the raw inputs it saved.

Kernels (one program per (row block, batch * head)):

    _attn_fwd       Q block [BLOCK_M] vs K/V blocks [BLOCK_N]; online softmax in base 2 and
                    fp32 (running max m, sum l, acc rescaled by 2^(m_old - m_new)); stores
                    out and lse = ln sum_j exp(scale s_ij) per row. The key loop runs in
                    three segments: masked blocks at the window's start, fully visible blocks
                    with no mask arithmetic, masked blocks at the diagonal / the end of S.
    _attn_bwd_pre   delta_i = sum_d dO_id O_id (fp32)
    _attn_bwd_dkdv  one K/V block [BLOCK_N] of kv head g; loops over the H/Hkv query heads
                    that share it and their visible Q blocks, recomputing P = 2^(s - lse) from
                    the saved lse: dV += P^T dO, dS = P (dO V^T - delta), dK_r += dS^T Q_r;
                    GQA's sum over query heads happens in registers (no atomics, no
                    [B, H, S, D] temporary), then dK = R_k^T (scale dK_r).
    _attn_bwd_dq    one Q block; loops over its visible K/V blocks: dQ_r += dS K_r, then
                    dQ = R_q^T (scale dQ_r).  Recomputing the scores twice (dkdv and dq)
                    instead of accumulating dQ with atomics keeps the backward deterministic
                    and fp32 throughout.
    _decode_split   flash-decoding: program (split, b * Hkv + g) takes the H/Hkv query heads
                    of kv head g times the Tq new queries as the rows of one tile (so each
                    cached K/V block is read once per kv head) over its split of the cache,
                    and writes a normalised partial output and its base-2 lse; with a
                    single split, the output itself (no combine launch). Keys may come in
                    two parts from two tensors (k2 beside k, q2 beside q: one more tl.dot
                    into the score accumulator, as the groups A, B, C are), the values one
                    of them: MLA's latent c_KV and shared k_R, read from their own caches.
    _decode_combine per query row, weights the splits by 2^(lse_s - max) and normalises.

The decode kernel reads the query position and the valid cache length from device tensors
(one int per sequence), so a CUDA graph can replay it with new positions; the cache may be
padded past the valid length (those slots are masked), and its slot j holds position j, or
the position given for it in a key-position tensor (a ring buffer's slots, in any order;
negative: never written, masked), also read on the device.

Block sizes: `triton.autotune` on the GPU (keyed on T, S, D and the flags that change the
work); under the interpreter one fixed config (`INTERPRETER_BLOCKS`, tests may change it).
Only long-stable Triton APIs are used (tl.dot, masked tl.load/tl.store, tl.exp2, ...), so the
same source runs on Triton 3.6 and 3.9.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from . import interpreter_blocks
from .tlmath import _tanh

Tensor = torch.Tensor
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# block sizes under the interpreter (each program and loop trip costs Python time there)
INTERPRETER_BLOCKS = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=32),
    "dkdv": dict(BLOCK_M=32, BLOCK_N=32),
    "dq": dict(BLOCK_M=32, BLOCK_N=32),
    "decode": dict(BLOCK_N=16),
}
# one cache split: the split kernel writes the normalised output (no _decode_combine launch,
# the same values); tests turn it off to compare with the two-launch path
DIRECT_SINGLE_SPLIT = True


# --------------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _rope_columns(ROT: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                  PAIRED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Columns of the groups A, B (rotary pairs) and C (not rotated) with their masks, and the
    table columns of A and B (the pair index for PAIRED tables)."""
    r = tl.arange(0, BLOCK_R)
    if INTERLEAVED:
        col_a = 2 * r
        col_b = 2 * r + 1
    else:
        col_a = r
        col_b = r + ROT // 2
    if PAIRED:
        tcol_a = r
        tcol_b = r
    else:
        tcol_a = col_a
        tcol_b = col_b
    col_c = ROT + tl.arange(0, BLOCK_P)
    return col_a, col_b, r < ROT // 2, col_c, col_c < HEAD_DIM, tcol_a, tcol_b


@triton.jit
def _load_tables(pos, row_ok, COS, SIN, stride_cp, stride_cd, tcol_a, tcol_b, mask_r,
                 PAIRED: tl.constexpr):
    """cos, sin at positions `pos` for the columns of A and B, in fp32. PAIRED tables hold one
    column per rotary pair (both members share its angle): half the loads."""
    m2 = row_ok[:, None] & mask_r[None, :]
    t_off = pos.to(tl.int64)[:, None] * stride_cp
    ca = tl.load(COS + t_off + tcol_a[None, :] * stride_cd, mask=m2, other=0.0).to(tl.float32)
    sa = tl.load(SIN + t_off + tcol_a[None, :] * stride_cd, mask=m2, other=0.0).to(tl.float32)
    if PAIRED:
        cb = ca
        sb = sa
    else:
        cb = tl.load(COS + t_off + tcol_b[None, :] * stride_cd, mask=m2,
                     other=0.0).to(tl.float32)
        sb = tl.load(SIN + t_off + tcol_b[None, :] * stride_cd, mask=m2,
                     other=0.0).to(tl.float32)
    return ca, sa, cb, sb


@triton.jit
def _load_pair(X, row_off, stride_d, row_ok, pos, COS, SIN, stride_cp, stride_cd,
               col_a, col_b, mask_r, tcol_a, tcol_b, PAIRED: tl.constexpr,
               ROTATE: tl.constexpr):
    """Rows `row_off` of X at the columns of A and B, rotated at positions `pos` (if ROTATE)
    in fp32 and rounded to X's dtype (the dot's operands): (y_A, y_B)."""
    m2 = row_ok[:, None] & mask_r[None, :]
    xa = tl.load(X + row_off[:, None] + col_a[None, :] * stride_d, mask=m2, other=0.0)
    xb = tl.load(X + row_off[:, None] + col_b[None, :] * stride_d, mask=m2, other=0.0)
    if ROTATE:
        dt = X.dtype.element_ty
        xa = xa.to(tl.float32)
        xb = xb.to(tl.float32)
        ca, sa, cb, sb = _load_tables(pos, row_ok, COS, SIN, stride_cp, stride_cd, tcol_a,
                                      tcol_b, mask_r, PAIRED)
        ya = (xa * ca - xb * sa).to(dt)
        yb = (xb * cb + xa * sb).to(dt)
    else:
        ya = xa
        yb = xb
    return ya, yb


@triton.jit
def _rope_transpose(dya, dyb, row_ok, pos, COS, SIN, stride_cp, stride_cd, tcol_a, tcol_b,
                    mask_r, PAIRED: tl.constexpr):
    """R^T applied to a gradient held as its A and B tiles (fp32): (dx_A, dx_B)."""
    ca, sa, cb, sb = _load_tables(pos, row_ok, COS, SIN, stride_cp, stride_cd, tcol_a, tcol_b,
                                  mask_r, PAIRED)
    return dya * ca + dyb * sb, dyb * cb - dya * sa


@triton.jit
def _load_cols(X, row_off, stride_d, row_ok, cols, col_ok):
    return tl.load(X + row_off[:, None] + cols[None, :] * stride_d,
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _group_dot(acc, xa, xb, xc, ya, yb, yc, HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """acc + x y^T over the head dim, as the sum over the groups A, B, C."""
    if HAS_ROPE:
        acc = tl.dot(xa, tl.trans(ya), acc=acc, input_precision=DOT_PREC)
        acc = tl.dot(xb, tl.trans(yb), acc=acc, input_precision=DOT_PREC)
    if HAS_PASS:
        acc = tl.dot(xc, tl.trans(yc), acc=acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _scores(qk, qk_scale, cap_in, SOFTCAP: tl.constexpr):
    """Base-2 scores from the raw products: qk * scale * log2(e), or with SOFTCAP (a soft
    cap on the scores, as Gemma 2's) cap * tanh(qk * scale / cap) * log2(e)."""
    if SOFTCAP:
        return _tanh(qk * cap_in) * qk_scale
    return qk * qk_scale


@triton.jit
def _alibi(s, slope2, qpos, kpos, ALIBI: tl.constexpr):
    """ALiBi: base-2 scores s plus slope2 * (key position - query position) (ALIBI 1), or
    plus slope2 * key position (ALIBI 2: BLOOM's form, the same softmax), slope2 a head's
    slope times log2(e) (broadcast like qpos); s unchanged with ALIBI 0."""
    if ALIBI == 1:
        return s + slope2 * (kpos - qpos).to(tl.float32)
    if ALIBI == 2:
        return s + slope2 * kpos.to(tl.float32)
    return s


@triton.jit
def _visible(qpos, kpos, ok, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs of a tile are visible: `ok` (in range) and the masks, with
    qpos, kpos broadcastable to the tile."""
    if CAUSAL:
        ok = ok & (kpos <= qpos)
    if HAS_WINDOW:
        ok = ok & (kpos > qpos - window)
    return ok


@triton.jit
def _segments(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split the visible range [lo, hi) into masked [lo_b, f_lo), unmasked [f_lo, f_hi)
    (whole blocks whose every pair is visible) and masked [f_hi, hi). Values are clamped at
    0 before dividing (integer division of negatives differs between backends)."""
    lo = tl.maximum(lo, 0)
    lo_b = (lo // BLOCK) * BLOCK
    hi = tl.maximum(hi, lo_b)
    f_lo = ((tl.maximum(full_lo, 0) + BLOCK - 1) // BLOCK) * BLOCK
    f_lo = tl.minimum(tl.maximum(f_lo, lo_b), hi)
    f_hi = (tl.maximum(full_hi, 0) // BLOCK) * BLOCK
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), hi)
    return lo_b, f_lo, f_hi, hi


@triton.jit
def _key_range(q_first, q_last, S, k_offset, window, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key rows seen by queries at positions q_first..q_last, as _segments' four bounds."""
    lo = q_first * 0
    hi = S + lo
    full_lo = lo
    full_hi = hi
    if CAUSAL:
        hi = tl.minimum(hi, q_last - k_offset + 1)
        full_hi = tl.minimum(full_hi, q_first - k_offset + 1)
    if HAS_WINDOW:
        lo = q_first - window + 1 - k_offset
        full_lo = q_last - window + 1 - k_offset
    return _segments(lo, hi, full_lo, full_hi, BLOCK_N)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd(Q, K, V, COS_Q, SIN_Q, COS_K, SIN_K, SLOPES, SINKS, OUT, LSE,
              stride_qb, stride_qh, stride_qt, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_ot, stride_od,
              stride_cqp, stride_cqd, stride_ckp, stride_ckd,
              H, HKV, T, S, q_offset, k_offset, window, qk_scale, cap_in,
              HEAD_DIM: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
              PAIRED: tl.constexpr, ROPE_K: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              BLOCK_D: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DV: tl.constexpr, HAS_SINK: tl.constexpr):
    # out[b, h, i] = sum_j softmax_j(scale * rope(q_i) . rope(k_j)) v_j over visible j, and
    # lse[b, h, i] = ln sum_j exp(scale * rope(q_i) . rope(k_j))  (fp32, for the backward).
    # qk_scale = scale * log2(e): the softmax runs in base 2. SOFTCAP: the scores are
    # cap * tanh(scale * s / cap), with qk_scale = cap * log2(e) and cap_in = scale / cap.
    # HAS_SINK: each row's softmax has one more term, exp(sinks[h]) (an attention sink: a
    # key with no value), in the denominator and in lse; SINKS holds sinks * log2(e).
    HAS_ROPE: tl.constexpr = ROT > 0
    HAS_PASS: tl.constexpr = ROT < HEAD_DIM
    dt = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = (h // (H // HKV)).to(tl.int64)
    h = h.to(tl.int64)
    col_a, col_b, mask_r, col_c, mask_c, tcol_a, tcol_b = _rope_columns(
        ROT, HEAD_DIM, INTERLEAVED, PAIRED, BLOCK_R, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)          # columns of v, out, dO, dV (HEAD_DV of them)
    mask_d = offs_d < HEAD_DV
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + h)

    # the Q tile, rotated once: groups A, B (placeholders when empty) and C
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    qpos = q_offset + offs_m
    q_rows = b * stride_qb + h * stride_qh + offs_m.to(tl.int64) * stride_qt
    qa = tl.zeros([BLOCK_M, 16], dtype=dt)
    qb = qa
    qc = qa
    if HAS_ROPE:
        qa, qb = _load_pair(Q, q_rows, stride_qd, m_ok, qpos, COS_Q, SIN_Q, stride_cqp,
                            stride_cqd, col_a, col_b, mask_r, tcol_a, tcol_b, PAIRED, True)
    if HAS_PASS:
        qc = _load_cols(Q, q_rows, stride_qd, m_ok, col_c, mask_c)

    q_first = q_offset + pid_m * BLOCK_M
    q_last = q_offset + tl.minimum(pid_m * BLOCK_M + BLOCK_M, T) - 1
    lo_b, f_lo, f_hi, hi = _key_range(q_first, q_last, S, k_offset, window, CAUSAL,
                                      HAS_WINDOW, BLOCK_N)
    k_row0 = b * stride_kb + kvh * stride_kh
    v_row0 = b * stride_vb + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for seg in tl.static_range(3):
        # 0: masked blocks at the window's start; 1: blocks every row sees whole (no mask
        # arithmetic); 2: masked blocks at the diagonal and the end of S
        if seg == 0:
            start = lo_b
            stop = f_lo
        elif seg == 1:
            start = f_lo
            stop = f_hi
        else:
            start = f_hi
            stop = hi
        for start_n in range(start, stop, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < S
            kpos = k_offset + offs_n
            k_rows = k_row0 + offs_n.to(tl.int64) * stride_kn
            ka = qa
            kb = qa
            kc = qc
            if HAS_ROPE:
                ka, kb = _load_pair(K, k_rows, stride_kd, n_ok, kpos, COS_K, SIN_K, stride_ckp,
                                    stride_ckd, col_a, col_b, mask_r, tcol_a, tcol_b, PAIRED,
                                    ROPE_K)
            if HAS_PASS:
                kc = _load_cols(K, k_rows, stride_kd, n_ok, col_c, mask_c)
            qk = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            qk = _group_dot(qk, qa, qb, qc, ka, kb, kc, HAS_ROPE, HAS_PASS, DOT_PREC)
            qk = _scores(qk, qk_scale, cap_in, SOFTCAP)
            qk = _alibi(qk, slope2, qpos[:, None], kpos[None, :], ALIBI)
            if seg != 1:
                vis = _visible(qpos[:, None], kpos[None, :], n_ok[None, :] & m_ok[:, None],
                               window, CAUSAL, HAS_WINDOW)
                qk = tl.where(vis, qk, float("-inf"))
            # online softmax: rescale what was summed so far to the new running max
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # nothing visible yet
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(qk - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_cols(V, v_row0 + offs_n.to(tl.int64) * stride_vn, stride_vd, n_ok,
                           offs_d, mask_d)
            acc = tl.dot(p.to(dt), v, acc=acc * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new

    if HAS_SINK:                  # the sink's term, rescaled like any block's
        z2 = tl.load(SINKS + h)
        m_new = tl.maximum(m_i, z2)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(z2 - m_new)
        acc = acc * alpha[:, None]
        m_i = m_new
    empty = l_i == 0.0            # no visible key (and no sink): out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_rows = b * stride_ob + h * stride_oh + offs_m.to(tl.int64) * stride_ot
    tl.store(OUT + o_rows[:, None] + offs_d[None, :] * stride_od, out.to(dt),
             mask=m_ok[:, None] & mask_d[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + (b * H + h) * T + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_pre(OUT, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_od,
                  stride_db, stride_dh, stride_dt, stride_dd, H, T,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d]   (fp32)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    rows = offs_m.to(tl.int64)
    o = _load_cols(OUT, b * stride_ob + h * stride_oh + rows * stride_ot, stride_od, m_ok, offs_d,
                   mask_d).to(tl.float32)
    do = _load_cols(DO, b * stride_db + h * stride_dh + rows * stride_dt, stride_dd, m_ok,
                    offs_d, mask_d).to(tl.float32)
    tl.store(DELTA + (b * H + h) * T + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, COS_Q, SIN_Q, COS_K, SIN_K, SLOPES, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qh, stride_qt, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_db, stride_dh, stride_dt, stride_dd,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_cqp, stride_cqd, stride_ckp, stride_ckd,
                   H, HKV, T, S, q_offset, k_offset, window, qk_scale, cap_in, scale,
                   HEAD_DIM: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
                   PAIRED: tl.constexpr, ROPE_K: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                   BLOCK_D: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DV: tl.constexpr):
    # For the keys j of one block of kv head g, over the query heads h of g and their rows i:
    #   P_ij = 2^(qk_scale s_ij - lse2_i),  dV_j += sum_i P_ij dO_i,
    #   dS_ij = P_ij (dO_i . v_j - delta_i),  dK_r,j += sum_i dS_ij rope(q_i),
    # then dK_j = R_j^T (scale dK_r,j). SOFTCAP: P from the capped scores, and dS_ij times
    # the cap's derivative 1 - tanh^2. Computed transposed ([BLOCK_N, BLOCK_M] tiles) so the
    # K/V block stays resident while Q blocks stream past.
    HAS_ROPE: tl.constexpr = ROT > 0
    HAS_PASS: tl.constexpr = ROT < HEAD_DIM
    dt = K.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // HKV).to(tl.int64)
    kvh = (pid_bk % HKV).to(tl.int64)
    G = H // HKV
    col_a, col_b, mask_r, col_c, mask_c, tcol_a, tcol_b = _rope_columns(
        ROT, HEAD_DIM, INTERLEAVED, PAIRED, BLOCK_R, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)          # columns of v, out, dO, dV (HEAD_DV of them)
    mask_d = offs_d < HEAD_DV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < S
    kpos = k_offset + offs_n
    n64 = offs_n.to(tl.int64)
    k_rows = b * stride_kb + kvh * stride_kh + n64 * stride_kn
    ka = tl.zeros([BLOCK_N, 16], dtype=dt)
    kb = ka
    kc = ka
    if HAS_ROPE:
        ka, kb = _load_pair(K, k_rows, stride_kd, n_ok, kpos, COS_K, SIN_K, stride_ckp,
                            stride_ckd, col_a, col_b, mask_r, tcol_a, tcol_b, PAIRED, ROPE_K)
    if HAS_PASS:
        kc = _load_cols(K, k_rows, stride_kd, n_ok, col_c, mask_c)
    v = _load_cols(V, b * stride_vb + kvh * stride_vh + n64 * stride_vn, stride_vd, n_ok,
                   offs_d, mask_d)
    dka = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    dkb = dka
    dkc = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # query rows that see some key of this block: [lo, hi); all of it: [full_lo, full_hi).
    # Key rows past S only produce rows of dK, dV that are never stored: no mask for them.
    k_first = k_offset + pid_n * BLOCK_N
    k_last = k_offset + tl.minimum(pid_n * BLOCK_N + BLOCK_N, S) - 1
    lo = k_first * 0
    hi = T + lo
    full_lo = lo
    full_hi = hi
    if CAUSAL:
        lo = k_first - q_offset
        full_lo = k_last - q_offset
    if HAS_WINDOW:
        hi = tl.minimum(hi, k_last + window - q_offset)
        full_hi = tl.minimum(full_hi, k_first + window - q_offset)
    lo_b, f_lo, f_hi, hi = _segments(lo, hi, full_lo, full_hi, BLOCK_M)

    for g in range(0, G):            # GQA: the query heads sharing this kv head, summed here
        h = kvh * G + g
        q_row0 = b * stride_qb + h * stride_qh
        do_row0 = b * stride_db + h * stride_dh
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(SLOPES + h)
        for seg in tl.static_range(3):   # masked, whole blocks, masked (as in the forward)
            if seg == 0:
                start = lo_b
                stop = f_lo
            elif seg == 1:
                start = f_lo
                stop = f_hi
            else:
                start = f_hi
                stop = hi
            for start_m in range(start, stop, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                m_ok = offs_m < T
                qpos = q_offset + offs_m
                m64 = offs_m.to(tl.int64)
                q_rows = q_row0 + m64 * stride_qt
                qa = ka
                qb = ka
                qc = kc
                if HAS_ROPE:
                    qa, qb = _load_pair(Q, q_rows, stride_qd, m_ok, qpos, COS_Q, SIN_Q,
                                        stride_cqp, stride_cqd, col_a, col_b, mask_r, tcol_a,
                                        tcol_b, PAIRED, True)
                if HAS_PASS:
                    qc = _load_cols(Q, q_rows, stride_qd, m_ok, col_c, mask_c)
                do = _load_cols(DO, do_row0 + m64 * stride_dt, stride_dd, m_ok, offs_d, mask_d)
                lse2 = tl.load(LSE + (b * H + h) * T + offs_m, mask=m_ok, other=0.0)
                lse2 = lse2 * 1.4426950408889634
                lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows saw nothing
                delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=m_ok, other=0.0)

                sT = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                sT = _group_dot(sT, ka, kb, kc, qa, qb, qc, HAS_ROPE, HAS_PASS, DOT_PREC)
                tT = sT
                if SOFTCAP:
                    tT = _tanh(sT * cap_in)
                pT = tl.exp2(_alibi(tT * qk_scale, slope2, qpos[None, :], kpos[:, None], ALIBI)
                             - lse2[None, :])
                if seg != 1:
                    vis = _visible(qpos[None, :], kpos[:, None], m_ok[None, :] & n_ok[:, None],
                                   window, CAUSAL, HAS_WINDOW)
                    pT = tl.where(vis, pT, 0.0)
                dv = tl.dot(pT.to(dt), do, acc=dv, input_precision=DOT_PREC)
                dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                dsT = pT * (dpT - delta[None, :])
                if SOFTCAP:
                    dsT = dsT * (1.0 - tT * tT)
                dsT = dsT.to(dt)
                if HAS_ROPE:
                    dka = tl.dot(dsT, qa, acc=dka, input_precision=DOT_PREC)
                    dkb = tl.dot(dsT, qb, acc=dkb, input_precision=DOT_PREC)
                if HAS_PASS:
                    dkc = tl.dot(dsT, qc, acc=dkc, input_precision=DOT_PREC)

    dk_rows = b * stride_dkb + kvh * stride_dkh + n64 * stride_dkn
    if HAS_ROPE:
        dxa = dka * scale
        dxb = dkb * scale
        if ROPE_K:
            dxa, dxb = _rope_transpose(dxa, dxb, n_ok, kpos, COS_K, SIN_K, stride_ckp,
                                       stride_ckd, tcol_a, tcol_b, mask_r, PAIRED)
        m2 = n_ok[:, None] & mask_r[None, :]
        tl.store(DK + dk_rows[:, None] + col_a[None, :] * stride_dkd, dxa.to(dt), mask=m2)
        tl.store(DK + dk_rows[:, None] + col_b[None, :] * stride_dkd, dxb.to(dt), mask=m2)
    if HAS_PASS:
        tl.store(DK + dk_rows[:, None] + col_c[None, :] * stride_dkd, (dkc * scale).to(dt),
                 mask=n_ok[:, None] & mask_c[None, :])
    dv_rows = b * stride_dvb + kvh * stride_dvh + n64 * stride_dvn
    tl.store(DV + dv_rows[:, None] + offs_d[None, :] * stride_dvd, dv.to(dt),
             mask=n_ok[:, None] & mask_d[None, :])


@triton.jit
def _attn_bwd_dq(Q, K, V, COS_Q, SIN_Q, COS_K, SIN_K, SLOPES, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qh, stride_qt, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_db, stride_dh, stride_dt, stride_dd,
                 stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                 stride_cqp, stride_cqd, stride_ckp, stride_ckd,
                 H, HKV, T, S, q_offset, k_offset, window, qk_scale, cap_in, scale,
                 HEAD_DIM: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
                 PAIRED: tl.constexpr, ROPE_K: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                 BLOCK_D: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DV: tl.constexpr):
    # dQ_i = R_i^T (scale sum_j dS_ij rope(k_j)),  dS_ij = P_ij (dO_i . v_j - delta_i)
    HAS_ROPE: tl.constexpr = ROT > 0
    HAS_PASS: tl.constexpr = ROT < HEAD_DIM
    dt = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = (h // (H // HKV)).to(tl.int64)
    h = h.to(tl.int64)
    col_a, col_b, mask_r, col_c, mask_c, tcol_a, tcol_b = _rope_columns(
        ROT, HEAD_DIM, INTERLEAVED, PAIRED, BLOCK_R, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)          # columns of v, out, dO, dV (HEAD_DV of them)
    mask_d = offs_d < HEAD_DV

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    qpos = q_offset + offs_m
    m64 = offs_m.to(tl.int64)
    q_rows = b * stride_qb + h * stride_qh + m64 * stride_qt
    qa = tl.zeros([BLOCK_M, 16], dtype=dt)
    qb = qa
    qc = qa
    if HAS_ROPE:
        qa, qb = _load_pair(Q, q_rows, stride_qd, m_ok, qpos, COS_Q, SIN_Q, stride_cqp,
                            stride_cqd, col_a, col_b, mask_r, tcol_a, tcol_b, PAIRED, True)
    if HAS_PASS:
        qc = _load_cols(Q, q_rows, stride_qd, m_ok, col_c, mask_c)
    do = _load_cols(DO, b * stride_db + h * stride_dh + m64 * stride_dt, stride_dd, m_ok,
                    offs_d, mask_d)
    lse2 = tl.load(LSE + (b * H + h) * T + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=m_ok, other=0.0)
    dqa = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    dqb = dqa
    dqc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + h)

    q_first = q_offset + pid_m * BLOCK_M
    q_last = q_offset + tl.minimum(pid_m * BLOCK_M + BLOCK_M, T) - 1
    lo_b, f_lo, f_hi, hi = _key_range(q_first, q_last, S, k_offset, window, CAUSAL,
                                      HAS_WINDOW, BLOCK_N)
    k_row0 = b * stride_kb + kvh * stride_kh
    v_row0 = b * stride_vb + kvh * stride_vh
    for seg in tl.static_range(3):   # masked, whole blocks, masked (as in the forward)
        if seg == 0:
            start = lo_b
            stop = f_lo
        elif seg == 1:
            start = f_lo
            stop = f_hi
        else:
            start = f_hi
            stop = hi
        for start_n in range(start, stop, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < S
            kpos = k_offset + offs_n
            n64 = offs_n.to(tl.int64)
            k_rows = k_row0 + n64 * stride_kn
            ka = qa
            kb = qa
            kc = qc
            if HAS_ROPE:
                ka, kb = _load_pair(K, k_rows, stride_kd, n_ok, kpos, COS_K, SIN_K, stride_ckp,
                                    stride_ckd, col_a, col_b, mask_r, tcol_a, tcol_b, PAIRED,
                                    ROPE_K)
            if HAS_PASS:
                kc = _load_cols(K, k_rows, stride_kd, n_ok, col_c, mask_c)
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            s = _group_dot(s, qa, qb, qc, ka, kb, kc, HAS_ROPE, HAS_PASS, DOT_PREC)
            t = s
            if SOFTCAP:
                t = _tanh(s * cap_in)
            p = tl.exp2(_alibi(t * qk_scale, slope2, qpos[:, None], kpos[None, :], ALIBI)
                        - lse2[:, None])
            if seg != 1:
                vis = _visible(qpos[:, None], kpos[None, :], n_ok[None, :] & m_ok[:, None],
                               window, CAUSAL, HAS_WINDOW)
                p = tl.where(vis, p, 0.0)
            v = _load_cols(V, v_row0 + n64 * stride_vn, stride_vd, n_ok, offs_d, mask_d)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            ds = ds.to(dt)
            if HAS_ROPE:
                dqa = tl.dot(ds, ka, acc=dqa, input_precision=DOT_PREC)
                dqb = tl.dot(ds, kb, acc=dqb, input_precision=DOT_PREC)
            if HAS_PASS:
                dqc = tl.dot(ds, kc, acc=dqc, input_precision=DOT_PREC)

    dq_rows = b * stride_dqb + h * stride_dqh + m64 * stride_dqt
    if HAS_ROPE:
        dxa, dxb = _rope_transpose(dqa * scale, dqb * scale, m_ok, qpos, COS_Q, SIN_Q,
                                   stride_cqp, stride_cqd, tcol_a, tcol_b, mask_r, PAIRED)
        m2 = m_ok[:, None] & mask_r[None, :]
        tl.store(DQ + dq_rows[:, None] + col_a[None, :] * stride_dqd, dxa.to(dt), mask=m2)
        tl.store(DQ + dq_rows[:, None] + col_b[None, :] * stride_dqd, dxb.to(dt), mask=m2)
    if HAS_PASS:
        tl.store(DQ + dq_rows[:, None] + col_c[None, :] * stride_dqd, (dqc * scale).to(dt),
                 mask=m_ok[:, None] & mask_c[None, :])


# --------------------------------------------------------------------------------------------
# decode (flash-decoding)
# --------------------------------------------------------------------------------------------
@triton.jit
def _decode_keys(acc, m_i, l_i, lo, hi, base, K, V, K2, k_row0, k2_row0, v_row0,
                 stride_kn, stride_kd, stride_k2n, stride_k2d, stride_vn, stride_vd,
                 KPOS, kp_row0, stride_kpn, COS_K, SIN_K, stride_ckp, stride_ckd,
                 qa, qb, qc, q2, qpos, slope2, r_ok, window, qk_scale, cap_in,
                 col_a, col_b, mask_r, col_c, mask_c, tcol_a, tcol_b, col_2, mask_2,
                 offs_d, mask_d,
                 HAS_ROPE: tl.constexpr, HAS_PASS: tl.constexpr, HAS_K2: tl.constexpr,
                 PAIRED: tl.constexpr, ROPE_K: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                 HAS_KPOS: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    # The online softmax of one tile of query rows over the keys lo .. hi - 1, carried on in
    # (acc, m_i, l_i): key j is row j - base of K, V (and K2), at position j or (HAS_KPOS)
    # KPOS[j], a negative one masking the key (its K and V not read).
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        n64 = offs_n.to(tl.int64)
        if HAS_KPOS:
            kpos = tl.load(KPOS + kp_row0 + n64 * stride_kpn, mask=n_ok,
                           other=-1).to(tl.int32)
            n_ok = n_ok & (kpos >= 0)
        else:
            kpos = offs_n
        r64 = n64 - base
        k_rows = k_row0 + r64 * stride_kn
        ka = qa
        kb = qa
        kc = qc
        if HAS_ROPE:   # ROPE_K: the cache holds keys before RoPE
            ka, kb = _load_pair(K, k_rows, stride_kd, n_ok, kpos, COS_K, SIN_K, stride_ckp,
                                stride_ckd, col_a, col_b, mask_r, tcol_a, tcol_b, PAIRED,
                                ROPE_K)
        if HAS_PASS:
            kc = _load_cols(K, k_rows, stride_kd, n_ok, col_c, mask_c)
        qk = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        qk = _group_dot(qk, qa, qb, qc, ka, kb, kc, HAS_ROPE, HAS_PASS, DOT_PREC)
        if HAS_K2:
            k2 = _load_cols(K2, k2_row0 + r64 * stride_k2n, stride_k2d, n_ok, col_2, mask_2)
            qk = tl.dot(q2, tl.trans(k2), acc=qk, input_precision=DOT_PREC)
        qk = _scores(qk, qk_scale, cap_in, SOFTCAP)
        qk = _alibi(qk, slope2[:, None], qpos[:, None], kpos[None, :], ALIBI)
        vis = _visible(qpos[:, None], kpos[None, :], n_ok[None, :] & r_ok[:, None], window,
                       CAUSAL, HAS_WINDOW)
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(qk - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_cols(V, v_row0 + r64 * stride_vn, stride_vd, n_ok, offs_d, mask_d)
        acc = tl.dot(p.to(V.dtype.element_ty), v, acc=acc * alpha[:, None],
                     input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["S_MAX", "S_OLD", "CHUNK"])
def _decode_split(Q, K, V, COS_Q, SIN_Q, COS_K, SIN_K, SLOPES, POS, KV_LEN, KPOS, PART_O,
                  PART_L,
                  OUT, Q2, K2, KN, VN,
                  stride_qb, stride_qh, stride_qt, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_q2b, stride_q2h, stride_q2t, stride_q2d,
                  stride_k2b, stride_k2h, stride_k2n, stride_k2d,
                  stride_knb, stride_knh, stride_knn, stride_knd,
                  stride_vnb, stride_vnh, stride_vnn, stride_vnd,
                  stride_cqp, stride_cqd, stride_ckp, stride_ckd, stride_pos, stride_len,
                  stride_kpb, stride_kpn, stride_ob, stride_oh, stride_ot, stride_od,
                  H, HKV, TQ, S_MAX, S_OLD, CHUNK, NSPLIT, S_BUCKET, window, qk_scale,
                  cap_in,
                  HEAD_DIM: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
                  PAIRED: tl.constexpr, ROPE_K: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                  HAS_KV_LEN: tl.constexpr,
                  HAS_KPOS: tl.constexpr, HAS_NEW: tl.constexpr,
                  DIRECT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                  DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DV: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr):
    # Tile rows r = (query head g' of kv head g) * TQ + new query i: each cached K/V block of
    # kv head g is read once for all its query heads. Over the cache slots
    # [split * CHUNK, (split + 1) * CHUNK) below kv_len: the normalised partial output and its
    # base-2 lse, or (DIRECT: one split) the output itself in OUT. Query i of sequence b sits
    # at POS[b] + i; slot j holds position j, or (HAS_KPOS) KPOS[b, j], a negative one
    # marking a slot never written (masked; its K and V are not read).
    # S_BUCKET (the slots' power of two, at least 16; not read) keys the autotuner, and
    # S_MAX and CHUNK are not specialized: a dynamic cache grows one slot a step, which would
    # otherwise time the configs again every step and compile new variants as S crosses
    # 1 and multiples of 16.
    # HEAD_D2 > 0: every key has a second part, K2's row of HEAD_D2 columns (its own tensor
    # and strides, read as given: never rotated), and the score adds q2 . k2 (Q2's row) to
    # the first part's in the same fp32 accumulator, one more tile pair next to the groups
    # A, B, C (MLA: K = V = the latent c_KV, K2 = the shared rotated k_R). HEAD_D2 == 0
    # compiles none of it.
    # HAS_NEW: the keys come in two segments along the slots, [K | KN] and [V | VN]: slots
    # 0 .. S_OLD - 1 are K's and V's rows, S_OLD .. S_MAX - 1 rows 0.. of KN and VN (a ring's
    # W slots, then the step's new keys where the projection left them: no concatenation of
    # the ring and the new keys is stored). Without it S_OLD = S_MAX and KN, VN are not read.
    HAS_ROPE: tl.constexpr = ROT > 0
    HAS_PASS: tl.constexpr = ROT < HEAD_DIM
    HAS_K2: tl.constexpr = HEAD_D2 > 0
    dt = Q.dtype.element_ty
    pid_s = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // HKV).to(tl.int64)
    kvh = (pid_bk % HKV).to(tl.int64)
    G = H // HKV
    col_a, col_b, mask_r, col_c, mask_c, tcol_a, tcol_b = _rope_columns(
        ROT, HEAD_DIM, INTERLEAVED, PAIRED, BLOCK_R, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)          # columns of v, out, dO, dV (HEAD_DV of them)
    mask_d = offs_d < HEAD_DV

    pos0 = tl.load(POS + b * stride_pos).to(tl.int32)
    if HAS_KV_LEN:
        kv_len = tl.load(KV_LEN + b * stride_len).to(tl.int32)
    elif HAS_KPOS:
        kv_len = pos0 * 0 + S_MAX       # every slot: the positions say which are visible
    else:
        kv_len = pos0 + TQ
    kv_len = tl.minimum(kv_len, S_MAX)

    r = tl.arange(0, BLOCK_M)
    r_ok = r < G * TQ
    i = r % TQ
    h = kvh * G + (r // TQ)
    qpos = pos0 + i
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI:
        slope2 = tl.load(SLOPES + h, mask=r_ok, other=0.0)
    q_rows = b * stride_qb + h * stride_qh + i.to(tl.int64) * stride_qt
    qa = tl.zeros([BLOCK_M, 16], dtype=dt)
    qb = qa
    qc = qa
    if HAS_ROPE:
        qa, qb = _load_pair(Q, q_rows, stride_qd, r_ok, qpos, COS_Q, SIN_Q, stride_cqp,
                            stride_cqd, col_a, col_b, mask_r, tcol_a, tcol_b, PAIRED, True)
    if HAS_PASS:
        qc = _load_cols(Q, q_rows, stride_qd, r_ok, col_c, mask_c)
    q2 = qc
    col_2 = tl.arange(0, BLOCK_D2)
    mask_2 = col_2 < HEAD_D2
    if HAS_K2:
        q2 = _load_cols(Q2, b * stride_q2b + h * stride_q2h + i.to(tl.int64) * stride_q2t,
                        stride_q2d, r_ok, col_2, mask_2)

    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, kv_len)
    if not HAS_KPOS:    # slot = position: the mask bounds the slots read
        if CAUSAL:
            hi = tl.minimum(hi, pos0 + TQ)
        if HAS_WINDOW:
            lo = tl.maximum(lo, pos0 - window + 1)
    k_row0 = b * stride_kb + kvh * stride_kh
    k2_row0 = b * stride_k2b + kvh * stride_k2h
    v_row0 = b * stride_vb + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _decode_keys(
        acc, m_i, l_i, lo, tl.minimum(hi, S_OLD), 0, K, V, K2, k_row0, k2_row0, v_row0,
        stride_kn, stride_kd, stride_k2n, stride_k2d, stride_vn, stride_vd,
        KPOS, b * stride_kpb, stride_kpn, COS_K, SIN_K, stride_ckp, stride_ckd,
        qa, qb, qc, q2, qpos, slope2, r_ok, window, qk_scale, cap_in,
        col_a, col_b, mask_r, col_c, mask_c, tcol_a, tcol_b, col_2, mask_2, offs_d, mask_d,
        HAS_ROPE, HAS_PASS, HAS_K2, PAIRED, ROPE_K, CAUSAL, HAS_WINDOW, SOFTCAP, ALIBI,
        HAS_KPOS, DOT_PREC, BLOCK_M, BLOCK_N)
    if HAS_NEW:   # the second segment: keys S_OLD .. S_MAX - 1 are rows 0.. of KN, VN
        acc, m_i, l_i = _decode_keys(
            acc, m_i, l_i, tl.maximum(lo, S_OLD), hi, S_OLD, KN, VN, K2,
            b * stride_knb + kvh * stride_knh, k2_row0, b * stride_vnb + kvh * stride_vnh,
            stride_knn, stride_knd, stride_k2n, stride_k2d, stride_vnn, stride_vnd,
            KPOS, b * stride_kpb, stride_kpn, COS_K, SIN_K, stride_ckp, stride_ckd,
            qa, qb, qc, q2, qpos, slope2, r_ok, window, qk_scale, cap_in,
            col_a, col_b, mask_r, col_c, mask_c, tcol_a, tcol_b, col_2, mask_2, offs_d,
            mask_d, HAS_ROPE, HAS_PASS, HAS_K2, PAIRED, ROPE_K, CAUSAL, HAS_WINDOW, SOFTCAP,
            ALIBI, HAS_KPOS, DOT_PREC, BLOCK_M, BLOCK_N)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DIRECT:   # one split: what _decode_combine would write (weight 2^0 = 1, sum of one)
        o_rows = b * stride_ob + h * stride_oh + i.to(tl.int64) * stride_ot
        tl.store(OUT + o_rows[:, None] + offs_d[None, :] * stride_od,
                 (acc / l_safe[:, None]).to(OUT.dtype.element_ty),
                 mask=r_ok[:, None] & mask_d[None, :])
    else:
        prow = ((b * H + h) * TQ + i) * NSPLIT + pid_s     # row of [B, H, TQ, NSPLIT]
        tl.store(PART_O + prow[:, None] * HEAD_DV + offs_d[None, :], acc / l_safe[:, None],
                 mask=r_ok[:, None] & mask_d[None, :])
        tl.store(PART_L + prow, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)),
                 mask=r_ok)


@triton.jit
def _decode_combine(PART_O, PART_L, SINKS, OUT, stride_ob, stride_oh, stride_ot, stride_od,
                    H, TQ, NSPLIT, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_S: tl.constexpr, HAS_SINK: tl.constexpr):
    # out = sum_s 2^(lse_s - max) out_s / sum_s 2^(lse_s - max) over the splits of one row;
    # HAS_SINK: the denominator has one more term, 2^(sinks[h] - max) (SINKS in base 2)
    row = tl.program_id(0).to(tl.int64)       # (b * H + h) * TQ + i
    i = row % TQ
    h = (row // TQ) % H
    b = row // (TQ * H)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NSPLIT
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(PART_L + row * NSPLIT + s, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, 0)
    if HAS_SINK:
        z2 = tl.load(SINKS + h)
        mx = tl.maximum(mx, z2)
    mx_ref = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx_ref)   # empty splits weigh 0
    po = tl.load(PART_O + (row * NSPLIT + s)[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=s_ok[:, None] & mask_d[None, :], other=0.0)
    den = tl.sum(w, 0)
    if HAS_SINK:
        den += tl.exp2(z2 - mx_ref)
    out = tl.sum(w[:, None] * po, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(OUT + b * stride_ob + h * stride_oh + i * stride_ot + offs_d * stride_od,
             out.to(OUT.dtype.element_ty), mask=mask_d)


# --------------------------------------------------------------------------------------------
# launch: autotune on the GPU, fixed blocks under the interpreter
# --------------------------------------------------------------------------------------------
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs(kind: str):
    C = triton.Config
    if kind == "fwd":
        return [C(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3),
                                     (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
                                     (128, 64, 8, 4), (64, 128, 4, 2)]]
    if kind == "dkdv":   # BLOCK_N keys resident, BLOCK_M query rows streamed
        return [C(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                for bm, bn, w, s in [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3),
                                     (64, 64, 4, 3), (16, 128, 4, 4), (32, 128, 4, 2)]]
    if kind == "dq":     # BLOCK_M queries resident, BLOCK_N keys streamed
        return [C(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                for bm, bn, w, s in [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3),
                                     (64, 64, 4, 3), (128, 16, 4, 4), (64, 128, 4, 2)]]
    if kind == "decode":
        return [C(dict(BLOCK_N=bn), num_warps=w, num_stages=s)
                for bn, w, s in [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3),
                                 (256, 8, 2), (32, 4, 4)]]
    raise KeyError(kind)


_KEYS = {
    "fwd": ["T", "S", "HEAD_DIM", "HEAD_DV", "ROT", "CAUSAL", "HAS_WINDOW"],
    "dkdv": ["T", "S", "HEAD_DIM", "HEAD_DV", "ROT", "CAUSAL", "HAS_WINDOW"],
    "dq": ["T", "S", "HEAD_DIM", "HEAD_DV", "ROT", "CAUSAL", "HAS_WINDOW"],
    "decode": ["TQ", "S_BUCKET", "HEAD_DIM", "HEAD_DV", "HEAD_D2", "ROT", "ROPE_K",
               "HAS_KPOS", "HAS_NEW", "DIRECT"],
}
_JIT = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq, "decode": _decode_split}
_TUNED: dict = {}


def _launch(kind: str, grid, *args, **constexprs):
    """Launch kernel `kind`: `grid` is a function of the block sizes (a dict)."""
    if _interpret():
        blocks = INTERPRETER_BLOCKS[kind]
        _JIT[kind][grid(blocks)](*args, **constexprs, **blocks)
        return
    if kind not in _TUNED:
        from .autotune import autotune
        _TUNED[kind] = autotune(_JIT[kind], _configs(kind), _KEYS[kind])
    _TUNED[kind][grid](*args, **constexprs)


def _p2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(n, 1)))


# --------------------------------------------------------------------------------------------
# host API
# --------------------------------------------------------------------------------------------
class _Spec:
    """Checked shapes and resolved options of one call."""

    def __init__(self, q, k, v, cos, sin, k_cos, k_sin, rot_dim, interleaved, rope_k, causal,
                 window, q_offset, k_offset, scale, softcap=None, alibi=None,
                 alibi_keys_only=False, decode=False, sinks=None):
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"q, k, v must be [B, H, T, D]: got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        B, H, T, D = q.shape
        Bk, HKV, S, Dk = k.shape
        if k.shape[:3] != v.shape[:3] or Bk != B or Dk != D:
            raise ValueError(f"k must be [B, Hkv, S, D] with q's B and D, v [B, Hkv, S, Dv]: "
                             f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if HKV == 0 or H % HKV:
            raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({HKV})")
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16,
                                                                    torch.bfloat16):
            raise ValueError(f"q, k, v must share one dtype of f32, f16, bf16: got {q.dtype}, "
                             f"{k.dtype}, {v.dtype}")
        if rot_dim is None:
            rot_dim = 0 if cos is None else cos.shape[-1]
        if rot_dim < 0 or rot_dim > D or rot_dim % 2:
            raise ValueError(f"rot_dim must be even and in [0, D={D}]: got {rot_dim}")
        if rot_dim:
            if cos is None or sin is None:
                raise ValueError("rot_dim > 0 needs the cos and sin tables")
            k_cos = cos if k_cos is None else k_cos
            k_sin = sin if k_sin is None else k_sin
            width = cos.shape[-1] if cos.dim() == 2 else -1
            for name, t in (("cos", cos), ("sin", sin), ("k_cos", k_cos), ("k_sin", k_sin)):
                if t.dim() != 2 or t.shape[1] != width or width not in (rot_dim, rot_dim // 2):
                    raise ValueError(f"{name} must be [max_pos, rot_dim={rot_dim}] or, one "
                                     f"column per pair, [max_pos, {rot_dim // 2}] like cos: "
                                     f"got {tuple(t.shape)}")
                if t.device != q.device:
                    raise ValueError(f"{name} is on {t.device}, q on {q.device}")
            self.paired = width == rot_dim // 2
        else:   # no rope: any tensor serves as the (never read) table pointer
            cos = sin = k_cos = k_sin = q
            self.paired = False
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 (or None): got {window}")
        if softcap is not None and not (0 < softcap < float("inf")):
            raise ValueError(f"softcap must be a finite number > 0 (or None): got {softcap}")
        if not decode:
            if q_offset is None:
                q_offset = S - T   # bottom-right aligned: the last query sees the last key
            if rot_dim and (q_offset < 0 or (rope_k and k_offset < 0)):
                raise ValueError(f"RoPE needs positions >= 0: q_offset {q_offset}, k_offset "
                                 f"{k_offset}")
            if rot_dim and (q_offset + T > cos.shape[0]
                            or (rope_k and k_offset + S > k_cos.shape[0])):
                raise ValueError(f"RoPE tables have {cos.shape[0]} positions; queries need "
                                 f"{q_offset + T}, keys {k_offset + S}")
        self.B, self.H, self.T, self.D, self.HKV, self.S = B, H, T, D, HKV, S
        self.DV = v.shape[-1]
        self.cos, self.sin, self.k_cos, self.k_sin = cos, sin, k_cos, k_sin
        self.rot_dim, self.interleaved = rot_dim, bool(interleaved)
        self.rope_k, self.causal = bool(rope_k), bool(causal)
        self.window, self.q_offset, self.k_offset = window, q_offset, k_offset
        self.scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        self.softcap = None if softcap is None else float(softcap)
        if alibi is not None:
            if not isinstance(alibi, Tensor) or not alibi.dtype.is_floating_point or \
                    alibi.numel() != H or alibi.device != q.device:
                raise ValueError(f"alibi must be a float tensor of the {H} query heads' slopes "
                                 f"on {q.device}: got {getattr(alibi, 'shape', alibi)}")
            alibi = (alibi.reshape(H).float() * LOG2E).contiguous()   # base 2, as the scores
        self.alibi = alibi
        self.alibi_mode = 0 if alibi is None else 2 if alibi_keys_only else 1
        if sinks is not None:
            if not isinstance(sinks, Tensor) or not sinks.dtype.is_floating_point or \
                    sinks.numel() != H or sinks.device != q.device:
                raise ValueError(f"sinks must be a float tensor of the {H} query heads' sink "
                                 f"logits on {q.device}: got {getattr(sinks, 'shape', sinks)}")
            sinks = (sinks.reshape(H).float() * LOG2E).contiguous()   # base 2
        self.sinks = sinks
        self.dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"

    def tables(self):
        """The four tables, cos and sin sharing strides (one set of stride arguments each for
        the queries' and the keys' tables), and those strides."""
        if self.rot_dim and (self.cos.stride() != self.sin.stride()
                             or self.k_cos.stride() != self.k_sin.stride()):
            self.cos, self.sin = self.cos.contiguous(), self.sin.contiguous()
            self.k_cos, self.k_sin = self.k_cos.contiguous(), self.k_sin.contiguous()
        st = (self.cos.stride(0), self.cos.stride(-1), self.k_cos.stride(0),
              self.k_cos.stride(-1))
        return (self.cos, self.sin, self.k_cos, self.k_sin), st

    @property
    def score_args(self) -> Tuple[float, float]:
        """(qk_scale, cap_in): the kernels' base-2 score scale and, with a soft cap, the
        scale inside its tanh (scale / cap; unused without one)."""
        if self.softcap is None:
            return self.scale * LOG2E, 1.0
        return self.softcap * LOG2E, self.scale / self.softcap

    @property
    def slopes(self) -> Tensor:
        """ALiBi's per-head slopes times log2(e) (any tensor, never read, without ALiBi)."""
        return self.alibi if self.alibi is not None else self.cos

    @property
    def sink_args(self) -> Tuple[Tensor, bool]:
        """(the sink logits times log2(e), or any tensor never read; whether there are)."""
        return (self.sinks if self.sinks is not None else self.cos), self.sinks is not None

    def constexprs(self):
        return dict(HEAD_DIM=self.D, HEAD_DV=self.DV, ROT=self.rot_dim,
                    SOFTCAP=self.softcap is not None, ALIBI=self.alibi_mode,
                    INTERLEAVED=self.interleaved, PAIRED=self.paired, ROPE_K=self.rope_k,
                    CAUSAL=self.causal, HAS_WINDOW=self.window is not None,
                    BLOCK_D=_p2(self.DV),
                    BLOCK_R=_p2(self.rot_dim // 2), BLOCK_P=_p2(self.D - self.rot_dim),
                    DOT_PREC=self.dot_prec)

    @property
    def window_arg(self) -> int:
        return 0 if self.window is None else int(self.window)


def _run_fwd(sp: _Spec, q, k, v, out: Optional[Tensor] = None,
             lse: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """out (any strides) and lse (contiguous) may be given to be written in place."""
    if out is None:
        out = torch.empty((sp.B, sp.H, sp.T, sp.DV), dtype=q.dtype, device=q.device)
    assert tuple(out.shape) == (sp.B, sp.H, sp.T, sp.DV), out.shape
    if lse is None:
        lse = torch.empty((sp.B, sp.H, sp.T), dtype=torch.float32, device=q.device)
    assert tuple(lse.shape) == (sp.B, sp.H, sp.T) and lse.dtype == torch.float32 \
        and lse.is_contiguous(), lse.shape
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    tables, tstrides = sp.tables()
    sinks, has_sink = sp.sink_args
    _launch("fwd", lambda m: (triton.cdiv(sp.T, m["BLOCK_M"]), sp.B * sp.H),
            q, k, v, *tables, sp.slopes, sinks, out, lse, *q.stride(), *k.stride(),
            *v.stride(), *out.stride(), *tstrides, sp.H, sp.HKV, sp.T, sp.S, sp.q_offset,
            sp.k_offset, sp.window_arg, *sp.score_args, HAS_SINK=has_sink, **sp.constexprs())
    return out, lse


def _run_bwd(sp: _Spec, do, q, k, v, out, lse, dq=None, dk=None, dv=None
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv given (any strides, the operands' shapes and dtypes) are written in place."""
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((sp.B, sp.H, sp.T), dtype=torch.float32, device=q.device)
    block_m = 16 if interpreter_blocks() else 64
    _attn_bwd_pre[(triton.cdiv(sp.T, block_m), sp.B * sp.H)](
        out, do, delta, *out.stride(), *do.stride(), sp.H, sp.T, HEAD_DIM=sp.DV,
        BLOCK_D=_p2(sp.DV), BLOCK_M=block_m)
    tables, tstrides = sp.tables()
    common = (sp.H, sp.HKV, sp.T, sp.S, sp.q_offset, sp.k_offset, sp.window_arg,
              *sp.score_args, sp.scale)
    _launch("dkdv", lambda m: (triton.cdiv(sp.S, m["BLOCK_N"]), sp.B * sp.HKV),
            q, k, v, *tables, sp.slopes, do, lse, delta, dk, dv, *q.stride(), *k.stride(),
            *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *tstrides, *common,
            **sp.constexprs())
    _launch("dq", lambda m: (triton.cdiv(sp.T, m["BLOCK_M"]), sp.B * sp.H),
            q, k, v, *tables, sp.slopes, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(),
            *do.stride(), *dq.stride(), *tstrides, *common, **sp.constexprs())
    return dq, dk, dv


_OPTIONS_DOC = """
    q [B, H, T, D]; k [B, Hkv, S, D], v [B, Hkv, S, Dv] (H % Hkv == 0; query head h reads kv
        head h // (H / Hkv); out and dv are Dv wide); any strides; f32, f16 or bf16, all three
        alike.
    cos, sin: RoPE tables by absolute position, [max_pos, rot_dim] laid out like the rotated
        dims, or [max_pos, rot_dim / 2] with one column per rotary pair (`rope_tables`; any
        float dtype, read in fp32). k_cos, k_sin: the keys' own tables (default cos, sin;
        XPos: `xpos_tables`).
    rot_dim: RoPE on the first rot_dim dims of a head (default: the tables' width; 0 or no
        tables: no RoPE at all).
    interleaved: rotary pairs (2i, 2i+1) rather than (i, i + rot_dim / 2).
    rope_k: rotate the keys (default); False: k is already rotated and only q is (YOCO's
        cross-attention over its shared, once-rotated K).
    causal, window: key j visible to query i iff kpos <= qpos and kpos > qpos - window, in
        absolute positions; a row that sees no key gives 0.
    q_offset, k_offset: positions of query row 0 and key row 0 (default q_offset = S - T, so
        queries that follow S - T cached keys line up; k_offset 0).
    scale: on the scores (default 1/sqrt(D)).
    softcap: a soft cap on the scaled scores, cap * tanh(s / cap) before the mask (Gemma 2's
        attention logit soft-capping); None: none.
    alibi: ALiBi's slopes, a float tensor [H] (one per query head): the score of query i and
        key j gains alibi[h] * (kpos - qpos) (after the soft cap, if any); None: none.
    alibi_keys_only: the gain is alibi[h] * kpos (BLOOM's form: the same probabilities, the
        lse larger by alibi[h] * qpos).
"""


def rope_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor] = None,
                       sin: Optional[Tensor] = None, *, k_cos: Optional[Tensor] = None,
                       k_sin: Optional[Tensor] = None, rot_dim: Optional[int] = None,
                       interleaved: bool = False, rope_k: bool = True, causal: bool = True,
                       window: Optional[int] = None, q_offset: Optional[int] = None,
                       k_offset: int = 0, scale: Optional[float] = None,
                       softcap: Optional[float] = None, alibi: Optional[Tensor] = None,
                       alibi_keys_only: bool = False, out: Optional[Tensor] = None,
                       lse: Optional[Tensor] = None, sinks: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor]:
    """Forward kernel alone: (out [B, H, T, D] in q's dtype, lse [B, H, T] fp32, natural log,
    -inf for a row that sees no key). `out` (any strides) and `lse` (contiguous) given: the
    kernel writes them in place and returns them. sinks [H]: a sink logit per head (one more
    term exp(sinks[h]) in every row's softmax denominator and in lse; the backward kernels
    then need nothing more, and `sink_grad` gives the sinks' gradient)."""
    sp = _Spec(q, k, v, cos, sin, k_cos, k_sin, rot_dim, interleaved, rope_k, causal, window,
               q_offset, k_offset, scale, softcap, alibi, alibi_keys_only, sinks=sinks)
    return _run_fwd(sp, q, k, v, out, lse)


def sink_grad(do: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """The gradient of attention sinks [H] from the forward's out and lse (which includes the
    sink) and the upstream dO: d sinks[h] = -sum_{b, i} exp(sinks[h] - lse_bhi) (dO_bhi . O_bhi)
    (the sink's probability times each row's dO . O, the term the softmax's backward
    subtracts), in fp32."""
    H = lse.shape[1]
    delta = (do.float() * out.float()).sum(-1)                       # [B, H, T]
    p_sink = torch.exp(sinks.float().reshape(1, H, 1) - lse.float())
    return -(p_sink * delta).sum((0, 2))


def rope_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, *,
                       k_cos: Optional[Tensor] = None, k_sin: Optional[Tensor] = None,
                       rot_dim: Optional[int] = None, interleaved: bool = False,
                       rope_k: bool = True, causal: bool = True, window: Optional[int] = None,
                       q_offset: Optional[int] = None, k_offset: int = 0,
                       scale: Optional[float] = None, softcap: Optional[float] = None,
                       alibi: Optional[Tensor] = None, alibi_keys_only: bool = False,
                       dq: Optional[Tensor] = None,
                       dk: Optional[Tensor] = None, dv: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward kernels alone: (dq, dk, dv) with respect to the q, k, v given (before RoPE),
    from the forward's out and lse and the upstream gradient `do`; dk and dv are summed over
    the query heads that share each kv head. dq, dk, dv given (q's, k's, v's shapes and
    dtypes, any strides): the kernels write them in place."""
    sp = _Spec(q, k, v, cos, sin, k_cos, k_sin, rot_dim, interleaved, rope_k, causal, window,
               q_offset, k_offset, scale, softcap, alibi, alibi_keys_only)
    return _run_bwd(sp, do, q, k, v, out, lse, dq, dk, dv)


class RopeAttention(torch.autograd.Function):
    """(out, lse) = rope_attention(...): the forward kernel saves (q, k, v, out, lse) and the
    backward recomputes RoPE and the probabilities from them. No gradient for the tables
    (they are constants of the model; a graph that trains them is not fused)."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, k_cos, k_sin, rot_dim, interleaved, rope_k, causal,
                window, q_offset, k_offset, scale, softcap, alibi, alibi_keys_only, sinks):
        opts = (rot_dim, interleaved, rope_k, causal, window, q_offset, k_offset, scale,
                softcap, alibi, alibi_keys_only)
        sp = _Spec(q, k, v, cos, sin, k_cos, k_sin, *opts, sinks=sinks)
        out, lse = _run_fwd(sp, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse, cos, sin, k_cos, k_sin, sinks)
        ctx.opts = opts
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cos, sin, k_cos, k_sin, sinks = ctx.saved_tensors
        sp = _Spec(q, k, v, cos, sin, k_cos, k_sin, *ctx.opts, sinks=sinks)
        dq, dk, dv = _run_bwd(sp, dout, q, k, v, out, lse)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[18]:
            dsinks = sink_grad(dout, out, lse, sinks).to(sinks.dtype).reshape(sinks.shape)
        return (dq, dk, dv) + (None,) * 15 + (dsinks,)


def rope_attention(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor] = None,
                   sin: Optional[Tensor] = None, *, k_cos: Optional[Tensor] = None,
                   k_sin: Optional[Tensor] = None, rot_dim: Optional[int] = None,
                   interleaved: bool = False, rope_k: bool = True, causal: bool = True,
                   window: Optional[int] = None, q_offset: Optional[int] = None,
                   k_offset: int = 0, scale: Optional[float] = None,
                   softcap: Optional[float] = None, alibi: Optional[Tensor] = None,
                   alibi_keys_only: bool = False, return_lse: bool = False,
                   sinks: Optional[Tensor] = None):
    """Fused RoPE + attention with gradients: out [B, H, T, D] in q's dtype (and lse
    [B, H, T] fp32 with return_lse). sinks [H]: a learned sink logit per head (gpt-oss),
    one more term in every row's softmax denominator; it gets a gradient.
    """
    out, lse = RopeAttention.apply(q, k, v, cos, sin, k_cos, k_sin, rot_dim, interleaved,
                                   rope_k, causal, window, q_offset, k_offset, scale, softcap,
                                   alibi, alibi_keys_only, sinks)
    return (out, lse) if return_lse else out


rope_attention.__doc__ += _OPTIONS_DOC


def _split_count(S: int, B: int, HKV: int, device) -> int:
    """Splits of the cache for flash-decoding: about two programs per SM over B * Hkv, and no
    split under 256 slots. Depends on shapes only, so a captured CUDA graph keeps it."""
    if _interpret() or S == 0:
        return max(1, triton.cdiv(S, 64))
    if device.type == "meta":     # the warm pass (codegen/warm.py): the GPU in use
        device = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, B * HKV), triton.cdiv(S, 256)))


def _per_sequence(t, B: int, name: str, device) -> Tuple[Tensor, int]:
    """An int per sequence: [B] values (and their stride) or one value for all (stride 0)."""
    t = torch.as_tensor(t, device=device)
    if t.numel() == 1:
        return t.reshape(1), 0
    if t.shape != (B,):
        raise ValueError(f"{name} must be [B={B}] or a single value: got {tuple(t.shape)}")
    return t, t.stride(0)


def rope_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                          pos: Union[Tensor, int], cos: Optional[Tensor] = None,
                          sin: Optional[Tensor] = None, *,
                          kv_len: Union[Tensor, int, None] = None, rope_k: bool = False,
                          k_cos: Optional[Tensor] = None, k_sin: Optional[Tensor] = None,
                          rot_dim: Optional[int] = None, interleaved: bool = False,
                          causal: bool = True, window: Optional[int] = None,
                          scale: Optional[float] = None, softcap: Optional[float] = None,
                          alibi: Optional[Tensor] = None, alibi_keys_only: bool = False,
                          num_splits: Optional[int] = None,
                          out: Optional[Tensor] = None, kpos: Optional[Tensor] = None,
                          q2: Optional[Tensor] = None, k2_cache: Optional[Tensor] = None,
                          sinks: Optional[Tensor] = None, k_new: Optional[Tensor] = None,
                          v_new: Optional[Tensor] = None) -> Tensor:
    """Decode attention (flash-decoding): a few new queries per sequence against a cache.

    q [B, H, Tq, D] (Tq small, typically 1); k_cache, v_cache [B, Hkv, S_max, D], slot j
        holding position j, possibly padded past the valid length.
    pos: int tensor [B] (or one value for all): the absolute position of q's row 0; row i
        sits at pos + i. Read on the device, so a captured CUDA graph replays with new
        positions. The tables must cover every position used (not checked: that would sync).
    kpos: int tensor [S_max] (one layout for all sequences) or [B, S_max]: the position slot
        j holds, in place of j (a ring buffer: slots in any order), read on the device; a
        negative position marks a slot never written: masked, its K and V not read. The
        causal mask and the window compare these positions with the queries', and every
        slot below kv_len is visited (no bound on the slots read from the positions).
    kv_len: int tensor [B] (or one value): the valid slots, default pos + Tq (the new keys
        already written; with kpos: all S_max slots); slots >= kv_len are masked.
    rope_k: the cache holds keys before RoPE (rotated here at their slot's position); default
        False: it holds rotated keys (rotate once when writing, `apply_rope`), so the loop
        reads nothing but K and V.
    num_splits: how many programs share one sequence's cache (default: enough to fill the
        GPU, from the shapes alone). With one split the kernel writes the output itself (no
        combine launch; the same values). Other options as in `rope_attention`.
    out: where to write (a CUDA graph's static output); returned.
    q2 [B, H, Tq, D2], k2_cache [B, Hkv, S_max, D2] (both or neither): keys in two parts
        from two tensors, each with its own strides and head dim: the score of query i and
        key j is rope(q_i) . rope(k_j) + q2_i . k2_j (both partial products accumulated in
        fp32), as if q and the keys were [q | q2], [k | k2] — without forming those copies.
        k2 is read as given (no RoPE: the options above apply to k_cache and q only), and
        v_cache may be k_cache itself (MLA: k_cache = v_cache = the latent c_KV, k2_cache
        the shared rotated k_R, q2 the rotated q_R). Default scale 1/sqrt(D + D2).
    sinks [H]: a sink logit per head, added to each row's softmax denominator when the
        splits are combined (always through the combine kernel then).
    k_new [B, Hkv, Tn, D], v_new [B, Hkv, Tn, Dv] (both or neither): a second segment of
        slots after the cache's: the keys are [k_cache | k_new] and the values [v_cache |
        v_new] along the slots (S_max + Tn of them; kpos and kv_len count them all), each
        tensor read where it lies with its own strides (a ring's W slots and the step's new
        keys: no concatenation stored). Not with q2 / k2_cache.
    On the GPU the first call for a shape runs the autotuner: make it before capturing.
    """
    if (q2 is None) != (k2_cache is None):
        raise ValueError("q2 and k2_cache come together (the second part of the queries and "
                         "of the keys)")
    d2 = 0
    if k2_cache is not None:
        if q2.dim() != 4 or k2_cache.dim() != 4 or tuple(q2.shape[:3]) != tuple(q.shape[:3]) \
                or tuple(k2_cache.shape[:3]) != tuple(k_cache.shape[:3]) \
                or q2.shape[3] != k2_cache.shape[3] or q2.shape[3] == 0:
            raise ValueError(f"q2 must be [B, H, Tq, D2] with q's B, H, Tq and k2_cache "
                             f"[B, Hkv, S_max, D2] with k_cache's B, Hkv, S_max (D2 > 0): q "
                             f"{tuple(q.shape)}, q2 {tuple(q2.shape)}, k_cache "
                             f"{tuple(k_cache.shape)}, k2_cache {tuple(k2_cache.shape)}")
        if not (q2.dtype == k2_cache.dtype == q.dtype):
            raise ValueError(f"q2 and k2_cache must have q's dtype {q.dtype}: got {q2.dtype}, "
                             f"{k2_cache.dtype}")
        if q2.device != q.device or k2_cache.device != q.device:
            raise ValueError(f"q2 ({q2.device}) and k2_cache ({k2_cache.device}) must be on "
                             f"q's device {q.device}")
        d2 = q2.shape[3]
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[3] + d2)
    else:
        q2, k2_cache = q, k_cache       # not read
    sp = _Spec(q, k_cache, v_cache, cos, sin, k_cos, k_sin, rot_dim, interleaved, rope_k,
               causal, window, 0, 0, scale, softcap, alibi, alibi_keys_only, decode=True,
               sinks=sinks)
    B, H, TQ, DV, HKV, S = sp.B, sp.H, sp.T, sp.DV, sp.HKV, sp.S
    s_old, has_new = S, k_new is not None
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new come together (the second segment of the keys and "
                         "of the values)")
    if has_new:
        if d2:
            raise ValueError("k_new / v_new (a second segment of slots) do not combine with "
                             "q2 / k2_cache (a second part of the head dim)")
        if k_new.dim() != 4 or v_new.dim() != 4 or \
                tuple(k_new.shape[:2]) != tuple(k_cache.shape[:2]) or \
                k_new.shape[3] != k_cache.shape[3] or \
                tuple(v_new.shape) != (B, HKV, k_new.shape[2], DV):
            raise ValueError(f"k_new must be [B, Hkv, Tn, D] with k_cache's B, Hkv, D and "
                             f"v_new [B, Hkv, Tn, Dv] with v_cache's Dv: k_cache "
                             f"{tuple(k_cache.shape)}, k_new {tuple(k_new.shape)}, v_cache "
                             f"{tuple(v_cache.shape)}, v_new {tuple(v_new.shape)}")
        if not (k_new.dtype == v_new.dtype == q.dtype) or k_new.device != q.device or \
                v_new.device != q.device:
            raise ValueError(f"k_new and v_new must have q's dtype {q.dtype} and device "
                             f"{q.device}: got {k_new.dtype} on {k_new.device}, "
                             f"{v_new.dtype} on {v_new.device}")
        S = s_old + k_new.shape[2]
    else:
        k_new, v_new = k_cache, v_cache     # not read
    pos, stride_pos = _per_sequence(pos, B, "pos", q.device)
    if kv_len is None:
        kv_len_t, stride_len = pos, 0      # not read
    else:
        kv_len_t, stride_len = _per_sequence(kv_len, B, "kv_len", q.device)
    kpos_t, kpos_strides = _key_positions(kpos, B, S, q)
    if num_splits is None:
        num_splits = _split_count(S, B, HKV, q.device)
    num_splits = max(1, min(int(num_splits), max(S, 1)))
    chunk = triton.cdiv(S, num_splits) if S else 0
    if out is None:
        out = torch.empty((B, H, TQ, DV), dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    # the split kernel writes out itself (a sink joins the rows in the combine kernel)
    direct = num_splits == 1 and DIRECT_SINGLE_SPLIT and sinks is None
    if direct:
        part_o = part_l = out       # not read
    else:
        part_o = torch.empty((B, H, TQ, num_splits, DV), dtype=torch.float32, device=q.device)
        part_l = torch.empty((B, H, TQ, num_splits), dtype=torch.float32, device=q.device)
    tables, tstrides = sp.tables()
    _launch("decode", lambda m: (num_splits, B * HKV),
            q, k_cache, v_cache, *tables, sp.slopes, pos, kv_len_t, kpos_t, part_o, part_l, out,
            q2, k2_cache, k_new, v_new, *q.stride(), *k_cache.stride(), *v_cache.stride(),
            *(q2.stride() if d2 else (0,) * 4), *(k2_cache.stride() if d2 else (0,) * 4),
            *k_new.stride(), *v_new.stride(),
            *tstrides, stride_pos, stride_len, *kpos_strides, *out.stride(), H, HKV, TQ, S,
            s_old, chunk, num_splits, _p2(S), sp.window_arg, *sp.score_args,
            HAS_KV_LEN=kv_len is not None,
            HAS_KPOS=kpos is not None, HAS_NEW=has_new,
            DIRECT=direct, BLOCK_M=_p2(H // HKV * TQ),
            HEAD_D2=d2, BLOCK_D2=_p2(d2), **sp.constexprs())
    if not direct:
        sink_t, has_sink = sp.sink_args
        _decode_combine[(B * H * TQ,)](part_o, part_l, sink_t, out, *out.stride(), H, TQ,
                                       num_splits, HEAD_DIM=DV, BLOCK_D=_p2(DV),
                                       BLOCK_S=_p2(num_splits, 2), HAS_SINK=has_sink)
    return out


def _key_positions(kpos: Optional[Tensor], B: int, S: int, q: Tensor
                   ) -> Tuple[Tensor, Tuple[int, int]]:
    """kpos as the kernel reads it (any int tensor as the never-read pointer when absent) and
    its (batch, slot) strides."""
    if kpos is None:
        return q, (0, 0)
    if not isinstance(kpos, Tensor) or kpos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kpos must be an int32/int64 tensor: got "
                         f"{getattr(kpos, 'dtype', type(kpos).__name__)}")
    if kpos.device != q.device:
        raise ValueError(f"kpos is on {kpos.device}, q on {q.device}")
    if tuple(kpos.shape) == (S,):
        return kpos, (0, kpos.stride(0))
    if tuple(kpos.shape) == (B, S):
        return kpos, (kpos.stride(0), kpos.stride(1))
    raise ValueError(f"kpos must be [S_max={S}] or [B={B}, S_max={S}]: got "
                     f"{tuple(kpos.shape)}")


# --------------------------------------------------------------------------------------------
# tables and the torch reference
# --------------------------------------------------------------------------------------------
def rope_tables(max_pos: int, rot_dim: int, base: float = 10000.0, interleaved: bool = False,
                paired: bool = False, device=None) -> Tuple[Tensor, Tensor]:
    """cos, sin fp32 tables computed as the zoo's YAML does (fp32 throughout): pair i turns by
    p * base^(-2i/rot_dim) at position p. [max_pos, rot_dim] in the layout of the rotated
    dims, or with `paired` [max_pos, rot_dim / 2], one column per pair (half the loads in
    the kernels; pass rot_dim explicitly with those)."""
    inv_freq = 1.0 / base ** (torch.arange(rot_dim // 2, device=device, dtype=torch.float32)
                              * 2 / rot_dim)
    freqs = torch.arange(max_pos, device=device, dtype=torch.float32)[:, None] * inv_freq
    if not paired:
        freqs = freqs.repeat_interleave(2, -1) if interleaved else torch.cat([freqs, freqs], -1)
    return freqs.cos(), freqs.sin()


def _full_width(t: Tensor, rot_dim: int, interleaved: bool) -> Tensor:
    """A table in the layout of the rotated dims (paired tables repeated per pair member)."""
    if t.shape[-1] == rot_dim:
        return t
    return t.repeat_interleave(2, -1) if interleaved else torch.cat([t, t], -1)


def xpos_tables(cos: Tensor, sin: Tensor, *, rot_dim: Optional[int] = None,
                interleaved: bool = False, scale_base: float = 512.0
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """XPos folded into RoPE tables: (q_cos, q_sin, k_cos, k_sin), the queries' scaled by
    zeta^(p/scale_base) and the keys' by zeta^(-p/scale_base), zeta_i = (2i/r + 0.4)/1.4 for
    rotary pair i of r = rot_dim dims (as zoo/minimax.yaml writes it). Since rope(x) * z =
    x * (cos z) + rot(x) * (sin z), the kernels need nothing else. Tables full width or
    paired (then give rot_dim), as they come."""
    max_pos, width = cos.shape
    r = width if rot_dim is None else rot_dim
    zeta = (torch.arange(r // 2, dtype=torch.float32, device=cos.device) * 2 / r + 0.4) / 1.4
    if width == r:
        zeta = zeta.repeat_interleave(2) if interleaved else torch.cat([zeta, zeta])
    p = torch.arange(max_pos, dtype=torch.float32, device=cos.device)[:, None]
    z = torch.exp(torch.log(zeta)[None, :] * p / scale_base)
    return cos * z, sin * z, cos / z, sin / z


def _positions(offset, n: int, device) -> Tensor:
    """[B or 1, n] absolute positions from an int or an int tensor [B] / 0-d."""
    if isinstance(offset, torch.Tensor):
        return offset.reshape(-1, 1).to(device=device, dtype=torch.long) + \
            torch.arange(n, device=device)
    return (offset + torch.arange(n, device=device))[None, :]


def apply_rope(x: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
               offset: Union[int, Tensor] = 0, rot_dim: Optional[int] = None,
               interleaved: bool = False) -> Tensor:
    """RoPE on the first rot_dim dims of x [B, H, T, D] at positions offset + t (offset an int
    or an int tensor [B]), tables full width or paired. Computed in fp32 (fp64 for fp64 x) and
    returned so: round to x.dtype yourself, e.g. before writing a cache."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    rot_dim = (0 if cos is None else cos.shape[-1]) if rot_dim is None else rot_dim
    x = x.to(wide)
    if rot_dim == 0:
        return x
    p = _positions(offset, x.shape[-2], x.device)              # [B or 1, T]
    c = _full_width(cos.to(wide), rot_dim, interleaved)[p][:, None]   # [B or 1, 1, T, R]
    s = _full_width(sin.to(wide), rot_dim, interleaved)[p][:, None]
    xr, xp = x[..., :rot_dim], x[..., rot_dim:]
    if interleaved:
        rot = torch.stack([-xr[..., 1::2], xr[..., 0::2]], -1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, -1)
        rot = torch.cat([-x2, x1], -1)
    return torch.cat([xr * c + rot * s, xp], -1)


def rope_attention_reference(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor] = None,
                             sin: Optional[Tensor] = None, *, k_cos: Optional[Tensor] = None,
                             k_sin: Optional[Tensor] = None, rot_dim: Optional[int] = None,
                             interleaved: bool = False, rope_k: bool = True,
                             causal: bool = True, window: Optional[int] = None,
                             q_offset: Union[int, Tensor, None] = None, k_offset: int = 0,
                             scale: Optional[float] = None, softcap: Optional[float] = None,
                             alibi: Optional[Tensor] = None, alibi_keys_only: bool = False,
                             kv_len: Union[Tensor, int, None] = None,
                             return_lse: bool = False, sinks: Optional[Tensor] = None):
    """The same math in torch, op by op, differentiable: RoPE on q (and k), scaled scores,
    the mask, softmax, @ v; computed in fp32 (fp64 for fp64 inputs), out in q's dtype.
    Beyond `rope_attention`'s options, q_offset may be an int tensor [B] (per-sequence
    positions, as in decode) and kv_len masks key rows >= kv_len[b]. sinks [H]: a sink
    logit per head, one more key with no value in every row's softmax (gpt-oss's form:
    concatenated to the scores, sliced off after the softmax)."""
    B, H, T, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    if rot_dim is None:
        rot_dim = 0 if cos is None else cos.shape[-1]
    k_cos = cos if k_cos is None else k_cos
    k_sin = sin if k_sin is None else k_sin
    if q_offset is None:
        q_offset = S - T
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qr = apply_rope(q, cos, sin, q_offset, rot_dim, interleaved)
    kr = apply_rope(k, k_cos, k_sin, k_offset, rot_dim if rope_k else 0, interleaved)
    G = H // HKV
    kr = kr.repeat_interleave(G, 1)
    vv = v.to(qr.dtype).repeat_interleave(G, 1)
    s = (qr @ kr.transpose(-1, -2)) * scale                      # [B, H, T, S]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    qpos = _positions(q_offset, T, q.device)[:, None, :, None]   # [B or 1, 1, T, 1]
    kpos = (k_offset + torch.arange(S, device=q.device))[None, None, None, :]
    if alibi is not None:
        s = s + alibi.to(s.dtype).reshape(1, H, 1, 1) * (
            kpos if alibi_keys_only else kpos - qpos).to(s.dtype)
    vis = torch.ones(qpos.shape[0], 1, T, S, dtype=torch.bool, device=q.device)
    if causal:
        vis = vis & (kpos <= qpos)
    if window is not None:
        vis = vis & (kpos > qpos - window)
    if kv_len is not None:
        kv_len = torch.as_tensor(kv_len, device=q.device)
        vis = vis & (kpos < kv_len.reshape(-1, 1, 1, 1))
    vis = vis.expand(B, H, T, S)
    if sinks is not None:
        z = sinks.to(s.dtype).reshape(1, H, 1, 1).expand(B, H, T, 1)
        s = torch.cat([torch.where(vis, s, float("-inf")), z], -1)
        lse = torch.logsumexp(s, -1)
        out = (torch.softmax(s, -1)[..., :S] @ vv).to(q.dtype)
        return (out, lse) if return_lse else out
    any_vis = vis.any(-1, keepdim=True)
    s = torch.where(vis, s, float("-inf"))
    s = torch.where(any_vis, s, 0.0)                             # rows with nothing: no NaN
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1) * any_vis
    out = (p @ vv).to(q.dtype)
    if return_lse:
        return out, torch.where(any_vis[..., 0], lse, float("-inf"))
    return out


# -- entry for the fused ops of lmc/passes/fuse_rope_attention.py (codegen/templates.py) --------
def _operand(xs, layout) -> Tensor:
    """q or k as the kernels read it, from the fused op's inputs: `layout` lists the parts in
    kernel order (the rotated part first) as [input, first column, end column, rep], rep the
    times each head of that input repeats (a head shared by consecutive query heads). One
    input's leading columns are a strided view (no copy); anything else is concatenated."""
    i0, a0 = layout[0][0], layout[0][1]
    if all(i == i0 and rep == 1 for i, _, _, rep in layout) and a0 == 0 and all(
            layout[n][2] == layout[n + 1][1] for n in range(len(layout) - 1)):
        return xs[i0][..., 0:layout[-1][2]]
    parts = []
    for i, a, b, rep in layout:
        t = xs[i][..., a:b]
        if rep > 1:
            B, h, S, w = t.shape
            t = t[:, :, None].expand(B, h, rep, S, w).reshape(B, h * rep, S, w)
        parts.append(t)
    return torch.cat(parts, -1)


def _scatter_grad(grads, xs, i: int, a: int, b: int, g: Tensor) -> None:
    """Accumulate g, a piece of input i's gradient (its columns a:b), in fp32 (an input read
    by several pieces: q and k slices of one tensor)."""
    if i not in grads:
        grads[i] = torch.zeros(xs[i].shape, dtype=torch.float32, device=g.device)
    grads[i][..., a:b] += g


def _direct_grad(layouts, j: int, xs, outs, n_grad: int, operand: Tensor):
    """The gradient output operand j's kernel may write itself: operand j is one whole input
    (its parts, rep 1, cover the input's columns in order: partial rotary's rotated and
    passed parts) that no other operand reads, and its gradient output has its shape and
    dtype; else None."""
    lay = layouts[j]
    i = lay[0][0]
    ends = [0] + [b for _, _, b, _ in lay]
    whole = all(p[0] == i and p[3] == 1 and p[1] == ends[n] for n, p in enumerate(lay)) \
        and ends[-1] == xs[i].shape[-1]        # its parts tile one input's columns in order
    if not whole or i >= n_grad or any(
            part[0] == i for jj, other in enumerate(layouts) if jj != j for part in other):
        return None
    o = outs[i] if i < len(outs) else None
    if o is None or o.shape != operand.shape or o.dtype != operand.dtype:
        return None
    return o


def launch_template(template: str, xs, outs, opts) -> None:
    """Run a fused rope-attention op (or its backward) of fuse_rope_attention. `opts` (the body
    meta's options) say where q, k, v and the tables are among the inputs `xs` (see the pass's
    match: layouts of q and k, v and its head repeat, cos/sin, the keys' own tables, XPos
    scales) and the attention's options.

    rope_attention: outs = (out [B, H, T, Dv], lse [B, H, T] fp32, natural log), either None
    where the program reads no such output (the kernel then writes a scratch buffer).
    rope_attention_bwd: xs = the forward's inputs (opts["n_inputs"] of them), the forward
    outputs named by opts["saved"] (out "0" and lse "1": the backward kernels read them, no
    forward rerun), then the cotangents of opts["cotangents"] (out's only: lse takes no
    gradient); it writes the gradients of the first n_grad inputs (q, k, v sources, and
    learned attention sinks, opts["sinks"], whose gradient `sink_grad` computes from out and
    lse) in input order. A body that saves nothing (no "saved") recomputes out and lse first."""
    if "q" not in opts:            # the first layout: inputs (q, k, v, cos, sin), MHA
        opts = dict(opts, q=[[0, 0, xs[0].shape[-1], 1]], k=[[1, 0, xs[1].shape[-1], 1]],
                    v=[2, 1], cos=3, sin=4, rot_dim=xs[0].shape[-1], interleaved=False,
                    rope_k=True, n_grad=3)
    q, k = _operand(xs, opts["q"]), _operand(xs, opts["k"])
    vi, vrep = opts["v"]
    v = _operand(xs, [[vi, 0, xs[vi].shape[-1], vrep]])
    def table(i):               # [T, R], or [1, 1, T, R] seen as [T, R]
        t = xs[i]
        return t.reshape(t.shape[-2], t.shape[-1])
    cos = table(opts["cos"]) if "cos" in opts else None      # rot_dim 0: no RoPE
    sin = table(opts["sin"]) if "sin" in opts else None
    k_cos = table(opts["k_cos"]) if "k_cos" in opts else cos
    k_sin = table(opts["k_sin"]) if "k_sin" in opts else sin
    for key, which in (("q_zeta", "q"), ("k_zeta", "k")):
        if key in opts:         # XPos: rope(x) * zeta = x * (cos zeta) + rot(x) * (sin zeta)
            zi, op = opts[key]
            z = table(zi).float()
            z = z if op == "mul" else 1.0 / z
            if which == "q":
                cos, sin = cos.float() * z, sin.float() * z
            else:
                k_cos, k_sin = k_cos.float() * z, k_sin.float() * z
    kw = dict(k_cos=k_cos, k_sin=k_sin, rot_dim=opts["rot_dim"],
              interleaved=opts["interleaved"], rope_k=opts["rope_k"], causal=opts["causal"],
              window=opts["window"] or None, scale=opts["scale"],
              softcap=opts.get("softcap"),
              alibi=xs[opts["alibi"]] if "alibi" in opts else None,
              alibi_keys_only=bool(opts.get("alibi_keys_only")))
    sinks = xs[opts["sinks"]].reshape(-1) if "sinks" in opts else None
    if template == "rope_attention":
        out = outs[0] if outs and outs[0] is not None else None
        lse = outs[1] if len(outs) > 1 and outs[1] is not None else None
        o, _ = rope_attention_fwd(q, k, v, cos, sin, out=out if out is not None
                                  and out.dtype == q.dtype else None, lse=lse, sinks=sinks,
                                  **kw)
        if out is not None and o is not out:
            out.copy_(o)
        return
    assert template == "rope_attention_bwd", template
    n_in = opts.get("n_inputs", len(xs) - 1)
    saved = list(opts.get("saved", ()))
    cts = list(opts.get("cotangents", ["0"]))
    do = xs[n_in + len(saved) + cts.index("0")]
    if "0" in saved and "1" in saved:
        out, lse = xs[n_in + saved.index("0")], xs[n_in + saved.index("1")].contiguous()
    else:           # nothing saved: recompute the forward's output and row log-sum-exp
        out, lse = rope_attention_fwd(q, k, v, cos, sin, sinks=sinks, **kw)
    layouts = [opts["q"], opts["k"], [[vi, 0, xs[vi].shape[-1], vrep]]]
    operands = (q, k, v)
    # a gradient that is all of one input's, and that input's alone, is written by the
    # kernels into that input's gradient output directly (through its strides); the others
    # are accumulated in fp32 from the pieces and copied out
    direct = [_direct_grad(layouts, j, xs, outs, opts["n_grad"], operands[j])
              for j in range(3)]
    dq, dk, dv = rope_attention_bwd(do, q, k, v, out, lse, cos, sin, **kw, dq=direct[0],
                                    dk=direct[1], dv=direct[2])
    grads: dict = {}
    written = {lay[0][0] for lay, dd in zip(layouts, direct) if dd is not None}
    si = opts.get("sinks")
    if si is not None and si < opts["n_grad"]:        # learned sinks: their gradient
        outs[si].copy_(sink_grad(do, out, lse, sinks).reshape(outs[si].shape))
        written.add(si)
    # the other operands' pieces (d's columns c:c + w are input i's columns a:b, summed over
    # the heads that repeat it): a piece that is its input's only reader (MLA's q_C, q_R,
    # the shared k_R) is copied into that input's gradient output, the rest of its columns
    # zeroed; an input read by several pieces is accumulated in fp32 and copied out below
    reads = [part[0] for lay in layouts for part in lay]
    for lay, d, dd in zip(layouts, (dq, dk, dv), direct):
        c = 0
        for i, a, b, rep in lay if dd is None else ():
            w = b - a
            g = d[..., c:c + w]
            c += w
            if i >= opts["n_grad"]:
                continue
            if rep > 1:
                B, hr, S, _ = g.shape
                g = g.float().reshape(B, hr // rep, rep, S, w).sum(2)
            if reads.count(i) > 1:
                _scatter_grad(grads, xs, i, a, b, g)
                continue
            outs[i][..., a:b].copy_(g)
            outs[i][..., :a].zero_()
            outs[i][..., b:].zero_()
            written.add(i)
    for i in range(opts["n_grad"]):
        g = grads.get(i)
        if i in written:
            continue
        if g is None:
            outs[i].zero_()
        else:
            outs[i].copy_(g)
