"""Gated linear attention (per-channel data-dependent decays: GLA, RWKV-6-style): chunked
Triton kernels for training, and the torch reference they are tested against. The kernel
half of the `gated_linear_attention` op of lmc/passes/fuse_linear_attention.py.

The math, per (batch, head), with g <= 0 log decays per key channel:

    q, k, g: [B, H, T, d_k]   v: [B, H, T, d_v]
    G_t = g_0 + ... + g_t                                   (per channel, fp32)
    o_t = sum_{s <= t} (sum_c q_tc k_sc exp(G_tc - G_sc)) v_s
        = q_t S_t with S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t    (d_k x d_v)

Chunked (C = 16 rows; T need not be a multiple: padded rows read g = 0, k = v = 0). Within
chunk n, b_i = the decays summed from the chunk start to row i (per channel; every exponent
below is <= 0, so nothing overflows however long T is):

    A_ij  = sum_c q_ic k_jc exp(b_ic - b_jc)   (j <= i; a [C, C, d_k] product in registers:
                                                no factorisation into exp(b) and exp(-b),
                                                which would overflow)
    o_i   = (q_i * exp(b_i)) S_n + sum_{j <= i} A_ij v_j
    S_n+1 = diag(exp(b_L)) S_n + sum_j (k_j * exp(b_L - b_j))^T v_j

    _states       program per (d_v block, b*h), chunks in order: stores S_n (fp32) for
                  every chunk.
    _fwd_out      program per (d_v block, chunk, b*h): o.
Backward, with dH_n = dL/dS_n (dH_NC = 0, no final state is returned):

    dH_n  = diag(exp(b_L)) dH_n+1 + sum_i (q_i * exp(b_i))^T do_i
    dA_ij = do_i . v_j (j <= i)
    dq_i  = sum_j dA_ij k_j * exp(b_i - b_j) + (do_i S_n^T) * exp(b_i)
    dk_j  = sum_i dA_ij q_i * exp(b_i - b_j) + (v_j dH_n+1^T) * exp(b_L - b_j)
    dv_j  = sum_i A_ij do_i + (k_j * exp(b_L - b_j)) dH_n+1
    dG_t  = q_t * dq_t - k_t * dk_t (per channel), dg = its reverse cumsum along time (torch)

    _states       again (the states are recomputed, not saved from the forward)
    _states       with REVERSE, chunks in reverse (x = q, y = do, w = exp(b)): stores dH_n+1
                  for every chunk.
    _bwd          program per (chunk, b*h): dA, the state terms of dq and dk summed over
                  the d_v blocks (a loop), dv block by block, then dq and dk.

A program holds the whole key width (d_k up to 128: [16, 16, d_k] fp32 intra products, which
the forward recomputes per d_v block); d_v is split into blocks of at most 64. Dtypes: q, k,
v fp32/fp16/bf16 (one dtype), dots in it (fp32 dots IEEE) accumulating in fp32; decays and
states fp32; dq/dk/dv in the input dtype, dg in the gates'. Only long-stable Triton APIs
(the per-chunk cumsum is a masked sum), so the same source runs on Triton 3.6 and 3.9.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from . import interpreter_blocks
from .linear_attention import _check as check_qkv

Tensor = torch.Tensor
CHUNK = 16
MAX_HEAD_DIM = 128          # d_k: a program holds the whole key width
MAX_BLOCK_V = 64            # d_v is split over programs (states) or loops (the backward)
GPU_LAUNCH = {"num_warps": 4, "num_stages": 1}


@triton.jit
def _cum(g, tri):
    """b[i, c] = g[0, c] + ... + g[i, c] over one chunk (fp32) and the chunk's sum [c]."""
    b = tl.sum(tl.where(tri[:, :, None], g[None, :, :], 0.0), axis=1)
    return b, tl.sum(g, axis=0)


@triton.jit
def _tile(X, off, t, cols, st, sd, mask):
    """The [C, cols] tile of X at rows t from offset `off` (a b*h's), 0 where masked."""
    return tl.load(X + off + t[:, None] * st + cols[None, :] * sd, mask=mask, other=0.0)


@triton.jit
def _keys(Q, K, G, qoff, koff, goff, t, ck, sqt, sqd, skt, skd, sgt, sgd, mask, tri):
    """One chunk's q and k tiles and its decays b (fp32, per channel) and their sum."""
    q = _tile(Q, qoff, t, ck, sqt, sqd, mask)
    k = _tile(K, koff, t, ck, skt, skd, mask)
    b, b_last = _cum(_tile(G, goff, t, ck, sgt, sgd, mask).to(tl.float32), tri)
    return q, k, b, b_last


@triton.jit
def _states(X, Y, G, HS, S0, SF, sxb, sxh, sxt, sxd, syb, syh, syt, syd, sgb, sgh, sgt, sgd,
            T, H, NC, DK, DV, CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            REVERSE: tl.constexpr, DOT_PREC: tl.constexpr, HAS_INIT: tl.constexpr = False,
            FINAL: tl.constexpr = False):
    """Program (d_v block, b*h) walking the chunks, storing the running state before each
    chunk into HS[bh, n], then state = diag(exp(b_L)) state + (x * w)^T y. Forward (X = k,
    Y = v, w = exp(b_L - b), in order): S_n, from S0 (HAS_INIT: a decode prefill continuing
    a state; else zeros), the state after the last chunk into SF (FINAL). Backward (X = q,
    Y = do, w = exp(b), in reverse): dH_n+1. S0, SF: contiguous fp32 [B*H, d_k, d_v]."""
    vb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bb, hh = bh // H, bh % H
    dt = X.dtype.element_ty
    i = tl.arange(0, CHUNK)
    ck = tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    kc = (ck < DK)[None, :]
    vc = (cv < DV)[None, :]
    tri = i[None, :] <= i[:, None]
    s_loc = ck[:, None] * DV + cv[None, :]
    s_mask = (ck < DK)[:, None] & vc
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        state += tl.load(S0 + bh * DK * DV + s_loc, mask=s_mask, other=0.0)
    for m in range(NC):
        n = NC - 1 - m if REVERSE else m
        t = n * CHUNK + i
        rows = (t < T)[:, None]
        tl.store(HS + (bh * NC + n) * DK * DV + s_loc, state, mask=s_mask)
        g = _tile(G, bb * sgb + hh * sgh, t, ck, sgt, sgd, rows & kc).to(tl.float32)
        b, b_last = _cum(g, tri)
        x = _tile(X, bb * sxb + hh * sxh, t, ck, sxt, sxd, rows & kc).to(tl.float32)
        y = _tile(Y, bb * syb + hh * syh, t, cv, syt, syd, rows & vc)
        w = tl.exp(b) if REVERSE else tl.exp(b_last[None, :] - b)
        state = state * tl.exp(b_last)[:, None] + tl.dot(tl.trans((x * w).to(dt)), y.to(dt),
                                                         input_precision=DOT_PREC)
    if FINAL:
        tl.store(SF + bh * DK * DV + s_loc, state, mask=s_mask)


@triton.jit
def _intra(q, k, b, tri):
    """A_ij = sum_c q_ic k_jc exp(b_ic - b_jc) for j <= i (0 above the diagonal), fp32, and
    the [C, C, d_k] decay factors."""
    e = tl.exp(tl.where(tri[:, :, None], b[:, None, :] - b[None, :, :], float("-inf")))
    return tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :] * e, axis=2), e


@triton.jit
def _fwd_out(Q, K, V, G, HS, OUT, sqb, sqh, sqt, sqd, skb, skh, skt, skd,
             svb, svh, svt, svd, sgb, sgh, sgt, sgd, sob, soh, sot, sod,
             T, H, NC, DK, DV, CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """Program (d_v block, chunk, b*h): o = (q * exp(b)) S_n + A v."""
    vb = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    bb, hh = bh // H, bh % H
    dt = Q.dtype.element_ty
    i = tl.arange(0, CHUNK)
    ck = tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    t = n * CHUNK + i
    rows = (t < T)[:, None]
    kc = (ck < DK)[None, :]
    vc = (cv < DV)[None, :]
    tri = i[None, :] <= i[:, None]
    q, k, b, b_last = _keys(Q, K, G, bb * sqb + hh * sqh, bb * skb + hh * skh,
                            bb * sgb + hh * sgh, t, ck, sqt, sqd, skt, skd, sgt, sgd,
                            rows & kc, tri)
    v = _tile(V, bb * svb + hh * svh, t, cv, svt, svd, rows & vc)
    a, e = _intra(q, k, b, tri)
    state = tl.load(HS + (bh * NC + n) * DK * DV + ck[:, None] * DV + cv[None, :],
                    mask=(ck < DK)[:, None] & vc, other=0.0)
    qw = (q.to(tl.float32) * tl.exp(b)).to(dt)
    out = tl.dot(qw, state.to(dt), input_precision=DOT_PREC)
    out = tl.dot(a.to(dt), v, acc=out, input_precision=DOT_PREC)
    tl.store(OUT + bb * sob + hh * soh + t[:, None] * sot + cv[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=rows & vc)


@triton.jit
def _bwd(Q, K, V, G, DO, HS, DHS, DQ, DK_, DV_,
         sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sgb, sgh, sgt, sgd,
         sdb, sdh, sdt, sdd, T, H, NC, DK, DV, NV,
         CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (chunk, b*h): dq and dk (summing the d_v blocks), then dv block by block."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bb, hh = bh // H, bh % H
    dt = Q.dtype.element_ty
    i = tl.arange(0, CHUNK)
    ck = tl.arange(0, BK)
    t = n * CHUNK + i
    rows = (t < T)[:, None]
    kc = (ck < DK)[None, :]
    tri = i[None, :] <= i[:, None]
    q, k, b, b_last = _keys(Q, K, G, bb * sqb + hh * sqh, bb * skb + hh * skh,
                            bb * sgb + hh * sgh, t, ck, sqt, sqd, skt, skd, sgt, sgd,
                            rows & kc, tri)
    a, e = _intra(q, k, b, tri)
    later = tl.exp(b_last[None, :] - b)                 # exp(b_L - b_j)
    da = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    dq_inter = tl.zeros([CHUNK, BK], dtype=tl.float32)
    dk_inter = tl.zeros([CHUNK, BK], dtype=tl.float32)
    s_row = (bh * NC + n) * DK * DV + ck[:, None] * DV
    for vb in range(NV):
        cv = vb * BV + tl.arange(0, BV)
        vc = (cv < DV)[None, :]
        v = _tile(V, bb * svb + hh * svh, t, cv, svt, svd, rows & vc)
        do = _tile(DO, bb * sdb + hh * sdh, t, cv, sdt, sdd, rows & vc)
        s_mask = (ck < DK)[:, None] & vc
        state = tl.load(HS + s_row + cv[None, :], mask=s_mask, other=0.0).to(dt)
        dnext = tl.load(DHS + s_row + cv[None, :], mask=s_mask, other=0.0).to(dt)
        da = tl.dot(do, tl.trans(v), acc=da, input_precision=DOT_PREC)
        dq_inter = tl.dot(do, tl.trans(state), acc=dq_inter, input_precision=DOT_PREC)
        dk_inter = tl.dot(v, tl.trans(dnext), acc=dk_inter, input_precision=DOT_PREC)
        dv = tl.dot(tl.trans(a.to(dt)), do, input_precision=DOT_PREC)
        dv = tl.dot((k.to(tl.float32) * later).to(dt), dnext, acc=dv, input_precision=DOT_PREC)
        tl.store(DV_ + bb * svb + hh * svh + t[:, None] * svt + cv[None, :] * svd,
                 dv.to(DV_.dtype.element_ty), mask=rows & vc)
    da = tl.where(tri, da, 0.0)
    dq = tl.sum(da[:, :, None] * k.to(tl.float32)[None, :, :] * e, axis=1) + dq_inter * tl.exp(b)
    dk = tl.sum(da[:, :, None] * q.to(tl.float32)[:, None, :] * e, axis=0) + dk_inter * later
    tl.store(DQ + bb * sqb + hh * sqh + t[:, None] * sqt + ck[None, :] * sqd,
             dq.to(DQ.dtype.element_ty), mask=rows & kc)
    tl.store(DK_ + bb * skb + hh * skh + t[:, None] * skt + ck[None, :] * skd,
             dk.to(DK_.dtype.element_ty), mask=rows & kc)


@triton.jit
def _recurrent(Q, K, V, G, S_IN, S_OUT, OUT, sqb, sqh, sqt, sqd, skb, skh, skt, skd,
               svb, svh, svt, svd, sgb, sgh, sgt, sgd, sob, soh, sot, sod,
               T, H, DK, DV, BK: tl.constexpr, BV: tl.constexpr):
    """Program (d_v block, b*h): the decode step over T new tokens in order, the state tile
    in fp32 registers: S = diag(exp(g_t)) S + k_t^T v_t, o_t = q_t S; the new state into
    S_OUT (both states contiguous fp32 [B, H, d_k, d_v])."""
    vb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bb, hh = bh // H, bh % H
    ck = tl.arange(0, BK)
    cv = vb * BV + tl.arange(0, BV)
    kc = ck < DK
    vc = cv < DV
    s_at = bh * DK * DV + ck[:, None] * DV + cv[None, :]
    s_mask = kc[:, None] & vc[None, :]
    state = tl.load(S_IN + s_at, mask=s_mask, other=0.0)
    for t in range(T):
        q = tl.load(Q + bb * sqb + hh * sqh + t * sqt + ck * sqd, mask=kc, other=0.0)
        k = tl.load(K + bb * skb + hh * skh + t * skt + ck * skd, mask=kc, other=0.0)
        g = tl.load(G + bb * sgb + hh * sgh + t * sgt + ck * sgd, mask=kc, other=0.0)
        v = tl.load(V + bb * svb + hh * svh + t * svt + cv * svd, mask=vc, other=0.0)
        state = state * tl.exp(g.to(tl.float32))[:, None] + \
            k.to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
        o = tl.sum(q.to(tl.float32)[:, None] * state, axis=0)
        tl.store(OUT + bb * sob + hh * soh + t * sot + cv * sod, o.to(OUT.dtype.element_ty),
                 mask=vc)
    tl.store(S_OUT + s_at, state, mask=s_mask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _bv(DV: int) -> int:
    return min(_p2(DV), MAX_BLOCK_V)


def _s4(x: Tensor) -> Tuple[int, int, int, int]:
    return tuple(x.stride())


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> None:
    check_qkv(q, k, v, CHUNK)
    if g.shape != q.shape:
        raise ValueError(f"g must be [B, H, T, d_k] like q: got {list(g.shape)}, q "
                         f"{list(q.shape)}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"key head dims up to {MAX_HEAD_DIM}: got d_k {q.shape[3]}")


def _launch_opts(q: Tensor) -> dict:
    opts = dict(CHUNK=CHUNK, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    if not interpreter_blocks():
        opts.update(GPU_LAUNCH)
    return opts


def _forward_states(k, v, g, B, H, T, NC, DK, DV, init: Tensor = None,
                    final: Tensor = None) -> Tensor:
    """The state before each chunk [B*H, NC, d_k, d_v] (fp32), from `init` (contiguous fp32
    [B, H, d_k, d_v]; zeros when None); the state after the last chunk into `final`."""
    hs = torch.empty((B * H, NC, DK, DV), dtype=torch.float32, device=k.device)
    BV = _bv(DV)
    _states[(triton.cdiv(DV, BV), B * H)](k, v, g, hs, init if init is not None else hs,
                                          final if final is not None else hs,
                                          *_s4(k), *_s4(v), *_s4(g), T, H, NC,
                                          DK, DV, BK=_p2(DK), BV=BV, REVERSE=False,
                                          HAS_INIT=init is not None, FINAL=final is not None,
                                          **_launch_opts(k))
    return hs


def gla_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, out: Tensor = None,
                initial_state: Tensor = None, final_state: Tensor = None) -> Tensor:
    """o [B, H, T, d_v] in q's dtype (`out`, any strides, written in place when given).
    initial_state: the fp32 [B, H, d_k, d_v] state the tokens continue (a decode prefill;
    zeros when None); final_state: a contiguous fp32 [B, H, d_k, d_v] tensor the state after
    the last token is written into."""
    _check(q, k, v, g)
    B, H, T, DK = q.shape
    DV = v.shape[3]
    if out is None:
        out = torch.empty((B, H, T, DV), dtype=q.dtype, device=q.device)
    if T == 0:
        if final_state is not None:
            final_state.copy_(initial_state if initial_state is not None else 0.0)
        return out
    NC = triton.cdiv(T, CHUNK)
    init = initial_state.float().contiguous() if initial_state is not None else None
    if final_state is not None:
        assert final_state.is_contiguous() and final_state.dtype == torch.float32
    hs = _forward_states(k, v, g, B, H, T, NC, DK, DV, init, final_state)
    BV = _bv(DV)
    _fwd_out[(triton.cdiv(DV, BV), NC, B * H)](q, k, v, g, hs, out, *_s4(q), *_s4(k), *_s4(v),
                                               *_s4(g), *_s4(out), T, H, NC, DK, DV,
                                               BK=_p2(DK), BV=BV, **_launch_opts(q))
    return out


def gla_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv in the inputs' dtype, dg in g's) from the upstream gradient of o; the
    per-chunk states are recomputed."""
    _check(q, k, v, g)
    B, H, T, DK = q.shape
    DV = v.shape[3]
    # the gradient buffers share q's, k's, v's strides, by which the kernel writes them
    # (broadcast inputs, stride 0, get contiguous buffers and contiguous copies)
    if 0 in q.stride() or 0 in k.stride() or 0 in v.stride():
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = (torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
                  for x in (q, k, v))
    if T == 0:
        return dq, dk, dv, torch.zeros_like(g)
    do = do.to(q.dtype)
    NC = triton.cdiv(T, CHUNK)
    hs = _forward_states(k, v, g, B, H, T, NC, DK, DV)
    dhs = torch.empty_like(hs)
    opts = _launch_opts(q)
    BV = _bv(DV)
    NV = triton.cdiv(DV, BV)
    _states[(NV, B * H)](q, do, g, dhs, dhs, dhs, *_s4(q), *_s4(do), *_s4(g), T, H, NC, DK, DV,
                         BK=_p2(DK), BV=BV, REVERSE=True, **opts)
    _bwd[(NC, B * H)](q, k, v, g, do, hs, dhs, dq, dk, dv, *_s4(q), *_s4(k), *_s4(v),
                      *_s4(g), *_s4(do), T, H, NC, DK, DV, NV, BK=_p2(DK), BV=BV, **opts)
    dG = q.float() * dq.float() - k.float() * dk.float()
    dg = dG.flip(2).cumsum(2).flip(2).to(g.dtype)
    return dq, dk, dv, dg


def gla_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, out: Tensor,
             new_state: Tensor) -> None:
    """The decode step over T new tokens from `state` (fp32 [B, H, d_k, d_v]): o into `out`
    (any strides, q's dtype), the next state into `new_state` (contiguous fp32), in one
    launch; nothing is read back on the host (CUDA-graph safe)."""
    B, H, T, DK = q.shape
    DV = v.shape[3]
    if T == 0:
        new_state.copy_(state)
        return
    BV = _bv(DV)
    warps = {} if interpreter_blocks() else {"num_warps": 4}
    _recurrent[(triton.cdiv(DV, BV), B * H)](
        q, k, v, g, state.contiguous(), new_state, out, *_s4(q), *_s4(k), *_s4(v), *_s4(g),
        *_s4(out), T, H, DK, DV, BK=_p2(DK), BV=BV, **warps)


def gla_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> Tensor:
    """The parallel form in torch (fp32, fp64 for fp64 inputs), out in q's dtype."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    qw, kw, vw, G = q.to(wide), k.to(wide), v.to(wide), g.to(wide).cumsum(2)
    T = q.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[:, :, None]
    d = torch.exp(torch.where(mask, G[:, :, :, None, :] - G[:, :, None, :, :],
                              torch.tensor(float("-inf"), dtype=wide)))
    a = (qw[:, :, :, None, :] * kw[:, :, None, :, :] * d).sum(-1)
    return (a @ vw).to(q.dtype)


# --------------------------------------------------------------------------------------------
# the fused op of lmc/passes/fuse_linear_attention.py (codegen/templates.py dispatches here)
# --------------------------------------------------------------------------------------------
def launch_template(template: str, xs: List, outs: List, opts: dict) -> None:
    """"gated_linear_attention": xs = (q, k, v, g), outs[0] = o.
    "gated_linear_attention_bwd": xs = (q, k, v, g, do), outs = (dq, dk, dv[, dg when
    opts["decay_grad"]]). Inputs broadcast to [B, H, T, d] are read expanded; gradients of
    broadcast inputs are summed back."""
    q0, k0, v0, g0 = xs[:4]
    B, H, T = v0.shape[:3]
    dk_ = q0.shape[-1]
    q, k, g = (x.expand(B, H, T, dk_) for x in (q0, k0, g0))
    v = v0
    if template == "gated_linear_attention":
        o = outs[0]
        direct = o.dtype == q.dtype and tuple(o.shape) == (B, H, T, v.shape[-1])
        y = gla_forward(q, k, v, g, out=o if direct else None)
        if not direct:
            o.copy_(y)
        return
    assert template == "gated_linear_attention_bwd", template
    dq, dk, dv, dg = gla_backward(xs[4], q, k, v, g)
    grads = [dq.sum_to_size(q0.shape), dk.sum_to_size(k0.shape), dv]
    if opts.get("decay_grad", True):
        grads.append(dg.sum_to_size(g0.shape))
    assert len(grads) == len(outs), (len(grads), len(outs))
    for o, d in zip(outs, grads):
        o.copy_(d)
