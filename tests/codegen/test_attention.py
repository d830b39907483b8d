"""Fused RoPE + attention kernels (lmc/codegen/attention.py) in Triton's interpreter against the
torch reference run in fp64: the forward (out and lse), every gradient under a random upstream
gradient, and flash-decoding, on odd shapes (T 63, 17, 1; head dims 32, 64 and 48; n_kv 1, 2,
4 under H 4; windows shorter and longer than T; partial rotary; both RoPE layouts; full and
paired tables; XPos tables; query/key position offsets; rows that see no key; strided inputs;
several block sizes), decode over padded caches in several splits and over ring-buffer slots
with explicit key positions (unfilled slots hold NaN, shuffled slots, per-sequence layouts),
one split writing the output without the combine launch; decode with keys in two parts from
two tensors (MLA's latent and k_R, values the latent; MQA/GQA, rings, several splits); the
reference itself
against independent formulations (complex rotation, SDPA with an explicit mask); and the
benchmark script's CPU run."""
import importlib.util
import json
import math
import os

import pytest
import torch
from conftest import ROOT

import lmc  # noqa: F401  (TRITON_INTERPRET=1 before triton is imported, without CUDA)
from lmc.codegen import attention as A

F32_TOL = 1e-5       # max abs error, fp32 kernels vs the fp64 reference (gradients included)
F16_REL = 2e-3       # fp16: max abs error / max |reference| (fp16's unit roundoff: 4.9e-4)


def _randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _max_err(got, want):
    return (got.double() - want.double()).abs().max().item()


def run_case(B, H, HKV, T, S, D, *, rot, interleaved=False, paired=False, causal=True,
             window=None, q_offset=None, k_offset=0, rope_k=True, xpos=False,
             dtype=torch.float32, strided=False, seed=0, dv=None, softcap=None, alibi=False,
             keys_only=False, sinks=False):
    """Fused forward + backward vs the fp64 reference: max abs error of out, lse, dq, dk, dv
    (and of the sinks' gradient with sinks=True; the largest reference magnitude, for
    fp16's relative bound)."""
    gen = torch.Generator().manual_seed(seed)
    dv = D if dv is None else dv     # v's head dim (MLA: narrower than q/k's)
    if strided:   # [B, T, H, D] activations seen as [B, H, T, D], as a model's permute makes
        q = _randn(B, T, H, D, gen=gen, dtype=dtype).transpose(1, 2)
        k = _randn(B, S, HKV, D, gen=gen, dtype=dtype).transpose(1, 2)
        v = _randn(B, S, HKV, dv, gen=gen, dtype=dtype).transpose(1, 2)
    else:
        q = _randn(B, H, T, D, gen=gen, dtype=dtype)
        k = _randn(B, HKV, S, D, gen=gen, dtype=dtype)
        v = _randn(B, HKV, S, dv, gen=gen, dtype=dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    qo = S - T if q_offset is None else q_offset
    tabs = dict(cos=None, sin=None)
    if rot:
        cos, sin = A.rope_tables(max(qo + T, k_offset + S) + 3, rot, interleaved=interleaved,
                                 paired=paired)
        tabs = dict(cos=cos, sin=sin)
        if xpos:
            qc, qs, kc, ks = A.xpos_tables(cos, sin, rot_dim=rot, interleaved=interleaved)
            tabs = dict(cos=qc, sin=qs, k_cos=kc, k_sin=ks)
    kw = dict(rot_dim=rot, interleaved=interleaved, causal=causal, window=window,
              q_offset=q_offset, k_offset=k_offset, rope_k=rope_k, softcap=softcap)
    if alibi:       # ALiBi's geometric slopes, 2^(-8 (h + 1) / H)
        kw["alibi"] = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float32) / H)
        kw["alibi_keys_only"] = keys_only
    wrt = (q, k, v)
    if sinks:       # gpt-oss's sink logits, some large enough to take most of a row
        kw["sinks"] = (torch.randn(H, generator=gen) * 2.0).requires_grad_()
        wrt += (kw["sinks"],)
    out, lse = A.rope_attention(q, k, v, **tabs, **kw, return_lse=True)
    assert out.dtype == dtype and out.shape == (B, H, T, dv) and lse.dtype == torch.float32
    do = _randn(B, H, T, dv, gen=gen, dtype=dtype)
    grads = torch.autograd.grad(out, wrt, do)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    tabs64 = {n: (t.double() if t is not None else None) for n, t in tabs.items()}
    if alibi:
        kw["alibi"] = kw["alibi"].double()
    wrt64 = (q64, k64, v64)
    if sinks:
        kw["sinks"] = kw["sinks"].detach().double().requires_grad_()
        wrt64 += (kw["sinks"],)
    ref, ref_lse = A.rope_attention_reference(q64, k64, v64, **tabs64, **kw, return_lse=True)
    rgrads = torch.autograd.grad(ref, wrt64, do.double())

    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows that see no key"
    errs = {"out": _max_err(out, ref),
            "lse": _max_err(lse[~empty], ref_lse[~empty]) if (~empty).any() else 0.0}
    scale = {"out": ref.abs().max().item(), "lse": ref_lse[~empty].abs().max().item()}
    if sinks:
        errs["dsinks"] = _max_err(grads[3], rgrads[3])
        scale["dsinks"] = rgrads[3].abs().max().item()
        assert grads[3].shape == (H,) and scale["dsinks"] > 1e-3
    for name, got, want in zip(("dq", "dk", "dv"), grads, rgrads):
        assert got.shape == want.shape and got.dtype == dtype
        errs[name] = _max_err(got, want)
        scale[name] = want.abs().max().item()
    return errs, scale


def _assert_close(errs, scale, dtype):
    print({k: f"{v:.1e}" + ("" if dtype == torch.float32 else f" (max |ref| {scale[k]:.1f})")
           for k, v in errs.items()})
    for name, e in errs.items():
        if dtype == torch.float32:
            assert e <= F32_TOL, (name, e)
        else:
            assert e <= F16_REL * max(scale[name], 1.0), (name, e, scale[name])


# (id, shape B H HKV T S D, options)
CASES = [
    ("mha-rotate-half-strided", (1, 4, 4, 63, 63, 32), dict(rot=32, strided=True)),
    ("mqa-interleaved-partial-window16", (1, 4, 1, 63, 63, 64),
     dict(rot=32, interleaved=True, window=16)),
    ("gqa-partial-window-longer-than-T", (1, 4, 2, 63, 63, 32), dict(rot=16, window=100)),
    ("prefill-after-cache-interleaved-paired", (2, 4, 2, 17, 40, 64),
     dict(rot=64, interleaved=True, paired=True, window=9)),
    ("offsets-q30-k3-paired", (1, 4, 4, 17, 40, 32), dict(rot=32, paired=True, q_offset=30,
                                                          k_offset=3)),
    ("single-query", (1, 4, 2, 1, 33, 64), dict(rot=64)),
    ("no-rope-not-causal", (1, 4, 2, 63, 50, 32), dict(rot=0, causal=False)),
    ("rope-q-only-keys-prerotated", (1, 4, 1, 63, 63, 32), dict(rot=32, rope_k=False)),
    ("xpos-partial-gqa", (1, 4, 2, 63, 63, 32), dict(rot=16, xpos=True)),
    ("rows-that-see-no-key", (1, 4, 2, 17, 20, 32), dict(rot=32, q_offset=0, k_offset=10)),
    ("head-dim-48-window-not-causal", (1, 4, 2, 17, 17, 48),
     dict(rot=32, paired=True, causal=False, window=5)),
    # v narrower / wider than q and k (MLA: q, k = [rope part | pass part], v the pass width)
    ("mla-qk-48-v-32", (1, 4, 4, 63, 63, 48), dict(rot=16, dv=32)),
    ("v-wider-64-than-qk-32-gqa-window", (1, 4, 2, 63, 63, 32), dict(rot=32, dv=64, window=20)),
    # a soft cap on the scores (Gemma 2): a cap of 1.5 saturates many of them, so tanh's
    # derivative in dS matters; with RoPE, GQA and a window, and with none of them
    ("softcap-gqa-partial-rope-window", (1, 4, 2, 63, 63, 32),
     dict(rot=16, window=20, softcap=1.5)),
    ("softcap-no-rope-not-causal-offsets", (2, 2, 2, 17, 40, 32),
     dict(rot=0, causal=False, softcap=1.5, q_offset=30, k_offset=3)),
    # ALiBi (BLOOM, MPT): per-head slopes times the key-query distance, by absolute position
    ("alibi-no-rope-gqa", (1, 4, 2, 63, 63, 32), dict(rot=0, alibi=True)),
    ("alibi-window-offsets-not-causal", (2, 4, 1, 17, 40, 32),
     dict(rot=0, alibi=True, causal=False, window=9, q_offset=30, k_offset=3)),
    ("alibi-with-rope-and-softcap", (1, 4, 4, 33, 33, 32),
     dict(rot=32, alibi=True, softcap=2.0)),
    ("alibi-keys-only-bloom-offsets", (2, 4, 2, 17, 40, 32),
     dict(rot=0, alibi=True, keys_only=True, q_offset=23, k_offset=3, window=30)),
    # attention sinks (gpt-oss): a logit per head in every row's softmax denominator; with
    # a window, and in rows that see no key at all (the sink takes the whole row)
    ("sinks-gqa-rope-window", (1, 4, 2, 63, 63, 32), dict(rot=32, window=20, sinks=True)),
    ("sinks-no-rope-softcap-alibi", (2, 4, 4, 33, 33, 32),
     dict(rot=0, softcap=2.0, alibi=True, sinks=True)),
    ("sinks-rows-that-see-no-key", (1, 4, 2, 17, 20, 32),
     dict(rot=32, q_offset=0, k_offset=10, sinks=True)),
]


@pytest.mark.parametrize("shape,opts", [pytest.param(s, o, id=i) for i, s, o in CASES])
def test_forward_and_gradients_fp32(shape, opts):
    errs, scale = run_case(*shape, **opts)
    _assert_close(errs, scale, torch.float32)


@pytest.mark.parametrize("blocks", [(16, 16), (64, 64)], ids=["blocks-16", "blocks-64"])
def test_block_sizes(blocks, monkeypatch):
    """Many small blocks (every segment of the key loop: masked window start, unmasked
    middle, masked diagonal) and blocks larger than T."""
    bm, bn = blocks
    for kind in ("fwd", "dkdv", "dq"):
        monkeypatch.setitem(A.INTERPRETER_BLOCKS, kind, dict(BLOCK_M=bm, BLOCK_N=bn))
    errs, scale = run_case(1, 4, 2, 63, 63, 32, rot=32, window=40)
    _assert_close(errs, scale, torch.float32)


def test_fp16():
    errs, scale = run_case(1, 4, 2, 63, 63, 64, rot=64, interleaved=True, window=20,
                           dtype=torch.float16)
    _assert_close(errs, scale, torch.float16)


def test_softcap_fp16_and_blocks(monkeypatch):
    for kind in ("fwd", "dkdv", "dq"):     # every segment of the key loop
        monkeypatch.setitem(A.INTERPRETER_BLOCKS, kind, dict(BLOCK_M=16, BLOCK_N=16))
    errs, scale = run_case(1, 4, 1, 63, 63, 32, rot=32, window=40, softcap=2.0,
                           dtype=torch.float16)
    _assert_close(errs, scale, torch.float16)


def test_alibi_fp16_and_blocks(monkeypatch):
    for kind in ("fwd", "dkdv", "dq"):     # every segment of the key loop
        monkeypatch.setitem(A.INTERPRETER_BLOCKS, kind, dict(BLOCK_M=16, BLOCK_N=16))
    errs, scale = run_case(1, 4, 2, 63, 63, 32, rot=0, window=40, alibi=True,
                           dtype=torch.float16)
    _assert_close(errs, scale, torch.float16)


def test_softcap_changes_the_result():
    # the cap is applied (a test whose cap were ignored would pass the cases above only if
    # the reference ignored it too)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_randn(1, 2, 9, 16, gen=gen) * 3 for _ in range(3))
    plain = A.rope_attention(q, k, v)
    capped = A.rope_attention(q, k, v, softcap=1.0)
    assert (plain - capped).abs().max() > 1e-2
    torch.testing.assert_close(capped, A.rope_attention_reference(q, k, v, softcap=1.0),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="softcap"):
        A.rope_attention(q, k, v, softcap=0.0)


# -- decode ----------------------------------------------------------------------------------
def run_decode(B, H, HKV, TQ, S_MAX, D, *, rot, pos, kv_len=None, rope_k=False, causal=True,
               window=None, splits=None, paired=False, interleaved=False,
               dtype=torch.float32, seed=0, dv=None, softcap=None, alibi=False,
               keys_only=False, sinks=False):
    """Flash-decoding over a cache padded to S_MAX (padding slots hold large values that would
    show if read) vs the fp64 reference over the raw keys."""
    gen = torch.Generator().manual_seed(seed)
    q = _randn(B, H, TQ, D, gen=gen, dtype=dtype)
    k_raw = _randn(B, HKV, S_MAX, D, gen=gen, dtype=dtype)
    v = _randn(B, HKV, S_MAX, D if dv is None else dv, gen=gen, dtype=dtype)
    pos_t = torch.as_tensor(pos)
    valid = pos_t.reshape(-1) + TQ if kv_len is None else torch.as_tensor(kv_len).reshape(-1)
    valid = valid.expand(B)
    for b in range(B):
        k_raw[b, :, valid[b]:] = 1e3
        v[b, :, valid[b]:] = -1e3
    cos = sin = None
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float32) / H) if alibi else None
    if rot:
        cos, sin = A.rope_tables(S_MAX + TQ + 2, rot, interleaved=interleaved, paired=paired)
    k_cache = k_raw if rope_k or not rot else \
        A.apply_rope(k_raw, cos, sin, 0, rot, interleaved).to(dtype)
    z = torch.randn(H, generator=gen) * 2.0 if sinks else None
    out = A.rope_attention_decode(q, k_cache, v, pos_t, cos, sin, kv_len=kv_len,
                                  rope_k=rope_k, rot_dim=rot, interleaved=interleaved,
                                  causal=causal, window=window, num_splits=splits,
                                  softcap=softcap, alibi=slopes, alibi_keys_only=keys_only,
                                  sinks=z)
    assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == dtype
    ref = A.rope_attention_reference(
        q.double(), k_raw.double(), v.double(), None if cos is None else cos.double(),
        None if sin is None else sin.double(), rot_dim=rot, interleaved=interleaved,
        causal=causal, window=window, q_offset=pos_t, kv_len=valid, softcap=softcap,
        alibi=None if slopes is None else slopes.double(), alibi_keys_only=keys_only,
        sinks=None if z is None else z.double())
    return _max_err(out, ref), ref.abs().max().item()


DECODE = [
    ("gqa-padded-3-splits", (3, 4, 2, 1, 80, 32), dict(rot=32, pos=[0, 37, 70], splits=3)),
    ("mqa-raw-key-cache-window-5-splits", (3, 4, 1, 1, 80, 64),
     dict(rot=32, pos=[5, 40, 70], rope_k=True, window=16, splits=5, interleaved=True,
          paired=True)),
    ("mha-3-queries-kv-len-not-causal", (2, 4, 4, 3, 64, 32),
     dict(rot=32, pos=[7, 50], kv_len=[10, 61], causal=False, splits=4)),
    ("one-position-for-all-one-split", (2, 4, 2, 1, 40, 32), dict(rot=32, pos=25, splits=1)),
    ("more-splits-than-blocks-no-rope", (1, 4, 2, 2, 33, 32), dict(rot=0, pos=30, splits=9)),
    ("v-narrower-than-qk", (2, 4, 2, 1, 50, 48), dict(rot=16, pos=[10, 45], splits=3, dv=32)),
    ("softcap-gqa-window-3-splits", (3, 4, 2, 2, 80, 32),
     dict(rot=32, pos=[0, 37, 70], splits=3, window=20, softcap=1.5)),
    ("alibi-gqa-3-queries-4-splits", (2, 4, 2, 3, 64, 32),
     dict(rot=0, pos=[7, 50], splits=4, alibi=True)),
    ("alibi-keys-only-2-splits", (2, 4, 2, 1, 50, 32),
     dict(rot=0, pos=[9, 40], splits=2, alibi=True, keys_only=True)),
    # attention sinks, joined in the combine (one split goes through it too)
    ("sinks-gqa-window-3-splits", (3, 4, 2, 2, 80, 32),
     dict(rot=32, pos=[0, 37, 70], splits=3, window=20, sinks=True)),
    ("sinks-one-split", (2, 4, 2, 1, 40, 32), dict(rot=32, pos=[3, 25], splits=1, sinks=True)),
]


@pytest.mark.parametrize("shape,opts", [pytest.param(s, o, id=i) for i, s, o in DECODE])
def test_decode_fp32(shape, opts):
    err, _ = run_decode(*shape, **opts)
    print(f"decode max abs err {err:.1e}")
    assert err <= F32_TOL


def test_decode_fp16():
    err, scale = run_decode(2, 4, 2, 1, 70, 64, rot=64, pos=[20, 65], splits=4,
                            dtype=torch.float16)
    print(f"decode fp16 max abs err {err:.1e} (max |ref| {scale:.2f})")
    assert err <= F16_REL * max(scale, 1.0)


def test_decode_positions_are_read_from_the_tensor():
    """The position lives on the device: changing the tensor in place changes the result the
    same call computes (what a replayed CUDA graph relies on)."""
    gen = torch.Generator().manual_seed(3)
    q = _randn(1, 2, 1, 32, gen=gen)
    k = _randn(1, 2, 48, 32, gen=gen)
    v = _randn(1, 2, 48, 32, gen=gen)
    cos, sin = A.rope_tables(64, 32)
    pos = torch.tensor([20])
    first = A.rope_attention_decode(q, k, v, pos, cos, sin, num_splits=2)
    pos.fill_(40)
    second = A.rope_attention_decode(q, k, v, pos, cos, sin, num_splits=2)
    ref = A.rope_attention_reference(q, k, v, cos, sin, rope_k=False, q_offset=pos,
                                     kv_len=pos + 1)
    assert not torch.allclose(first, second)
    assert _max_err(second, ref) <= F32_TOL


# -- decode with explicit key positions (a ring buffer's slots) ------------------------------
def _rotate_half_at(x, cos, sin, positions):
    """RoPE (rotate-half, full tables) of x [B, h, n, D] at per-row positions [B or 1, n],
    written out independently of attention.py: x cos + rot(x) sin, tables gathered by row."""
    c = cos[positions.clamp(min=0)][:, None]           # [B or 1, 1, n, D]
    s = sin[positions.clamp(min=0)][:, None]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * c + rot * s


def _kpos_reference(q, k, v, pos, kpos, *, window=None, scale, cos=None, sin=None,
                    rope_k=False):
    """fp64: key j of sequence b at kpos[b, j] (negative: never written), visible to query
    i at pos[b] + i iff 0 <= kpos <= qpos and kpos > qpos - window; no visible key: 0."""
    B, H, T, D = q.shape
    S, G = k.shape[2], H // k.shape[1]
    qp = pos.reshape(-1, 1) + torch.arange(T)                         # [B or 1, T]
    kp = kpos.reshape(-1, S)                                           # [B or 1, S]
    q, k, v = q.double(), k.double(), v.double()
    if cos is not None:
        q = _rotate_half_at(q, cos.double(), sin.double(), qp)
        if rope_k:
            k = _rotate_half_at(k, cos.double(), sin.double(), kp)
    k = torch.nan_to_num(k).repeat_interleave(G, 1)      # never-written slots: NaN here
    v = torch.nan_to_num(v).repeat_interleave(G, 1)
    vis = (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None])   # [B or 1, T, S]
    if window is not None:
        vis = vis & (kp[:, None, :] > qp[:, :, None] - window)
    vis = vis[:, None].expand(B, H, T, S)
    s = torch.where(vis, (q @ k.transpose(-1, -2)) * scale, float("-inf"))
    p = torch.softmax(torch.where(vis.any(-1, keepdim=True), s, 0.0), -1) * vis
    return p @ v


def _ring(B, W, T, P, gen):
    """The decode pass's ring layout per sequence b (P[b] past tokens): W slots, position a
    in slot a mod W (the latest below P[b]; negative: never written), then the T new tokens
    at P[b] .. P[b] + T - 1: [B, W + T] positions."""
    out = []
    for p in P:
        j = torch.arange(W)
        held = (p - 1) - torch.remainder(p - 1 - j, W)
        out.append(torch.cat([held, p + torch.arange(T)]))
    return torch.stack(out)


def run_decode_kpos(B, H, HKV, T, W, P, D, *, window, splits=None, shuffle=False,
                    per_sequence=True, rot=0, rope_k=False, dtype=torch.float32, seed=0,
                    segments=False):
    """Ring layout of W slots + T new keys (slots never written hold NaN: they must not be
    read), or a random permutation of it, vs the fp64 reference. segments: the W slots and
    the T new keys (and values) handed to the kernel as two tensors (k_new, v_new), the new
    ones in a [B, T, Hkv, D] layout (strides of their own), as the decode step keeps a ring
    and the projection's new keys."""
    gen = torch.Generator().manual_seed(seed)
    kpos = _ring(B, W, T, P, gen)
    if shuffle:
        kpos = kpos[:, torch.randperm(W + T, generator=gen)]
    q = _randn(B, H, T, D, gen=gen, dtype=dtype)
    k = _randn(B, HKV, W + T, D, gen=gen, dtype=dtype)
    v = _randn(B, HKV, W + T, D, gen=gen, dtype=dtype)
    unfilled = (kpos < 0)[:, None, :, None].expand_as(k)
    k[unfilled] = float("nan")
    v[unfilled] = float("nan")
    pos = torch.tensor(P)
    if not per_sequence:        # one layout for every sequence: kpos [S]
        assert len(set(P)) == 1
        kpos = kpos[0]
    cos = sin = None
    if rot:
        cos, sin = A.rope_tables(max(P) + T + 2, rot)
    scale = 0.3
    kw = dict(k_cache=k, v_cache=v)
    if segments:
        kw = dict(k_cache=k[:, :, :W].clone(), v_cache=v[:, :, :W].clone(),
                  k_new=k[:, :, W:].transpose(1, 2).contiguous().transpose(1, 2),
                  v_new=v[:, :, W:].transpose(1, 2).contiguous().transpose(1, 2))
        assert kw["k_new"].stride() != k[:, :, W:].contiguous().stride() or T == 1 or HKV == 1
    out = A.rope_attention_decode(q, pos=pos, cos=cos, sin=sin, rot_dim=rot, rope_k=rope_k,
                                  window=window, scale=scale, num_splits=splits, kpos=kpos,
                                  **kw)
    assert out.shape == q.shape and out.dtype == dtype and not out.isnan().any()
    ref = _kpos_reference(q, k, v, pos, kpos, window=window, scale=scale, cos=cos, sin=sin,
                          rope_k=rope_k)
    return _max_err(out, ref), ref.abs().max().item()


# (id, B H HKV T W P D, options): W ring slots + T new keys, P past tokens per sequence
DECODE_KPOS = [
    ("ring-window-3-gqa-one-step", (3, 4, 2, 1, 3, [0, 2, 11], 32), dict(window=3)),
    ("ring-partly-filled-mqa-3-new", (2, 4, 1, 3, 5, [1, 3], 32), dict(window=5, splits=2)),
    ("window-larger-than-the-keys", (2, 4, 4, 2, 7, [3, 20], 48), dict(window=40)),
    ("window-smaller-than-the-ring-no-window-term", (2, 2, 2, 4, 9, [12, 30], 16),
     dict(window=None, splits=3)),
    ("shuffled-slots-window-4-5-new", (2, 4, 2, 5, 6, [4, 17], 32),
     dict(window=4, shuffle=True, splits=4)),
    ("one-layout-for-all-window-2", (2, 4, 2, 1, 2, [7, 7], 32),
     dict(window=2, per_sequence=False)),
    ("rope-keys-at-their-positions-shuffled", (2, 4, 2, 2, 5, [2, 13], 32),
     dict(window=5, rot=32, rope_k=True, shuffle=True, splits=2)),
    ("odd-sizes-more-splits-than-blocks", (1, 6, 3, 3, 37, [50], 24), dict(window=30, splits=9)),
]


@pytest.mark.parametrize("segments", [False, True], ids=["one-tensor", "ring-and-new-apart"])
@pytest.mark.parametrize("shape,opts", [pytest.param(s, o, id=i) for i, s, o in DECODE_KPOS])
def test_decode_key_positions_fp32(shape, opts, segments):
    err, _ = run_decode_kpos(*shape, **opts, segments=segments)
    print(f"decode with key positions: max abs err {err:.1e}")
    assert err <= F32_TOL


@pytest.mark.parametrize("segments", [False, True], ids=["one-tensor", "ring-and-new-apart"])
def test_decode_key_positions_fp16(segments):
    err, scale = run_decode_kpos(2, 4, 2, 2, 6, [3, 9], 64, window=6, shuffle=True,
                                 dtype=torch.float16, segments=segments)
    print(f"decode with key positions fp16: max abs err {err:.1e} (max |ref| {scale:.2f})")
    assert err <= F16_REL * max(scale, 1.0)


def test_decode_key_positions_mask_instead_of_slots():
    """The same K/V with the slots' positions permuted gives the permuted reference, not the
    slot-order one: the mask reads kpos (and a window of 1 sees only the query's own key)."""
    gen = torch.Generator().manual_seed(5)
    q = _randn(1, 2, 1, 16, gen=gen)
    k = _randn(1, 2, 8, 16, gen=gen)
    v = _randn(1, 2, 8, 16, gen=gen)
    kpos = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    own = A.rope_attention_decode(q, k, v, torch.tensor([7]), window=1, kpos=kpos)
    assert torch.allclose(own, v[:, :, :1].expand_as(own))      # position 7 is slot 0
    slots = A.rope_attention_decode(q, k, v, torch.tensor([7]), window=1)
    assert torch.allclose(slots, v[:, :, 7:].expand_as(slots))


class _Counting:
    """A jitted kernel whose launches are counted."""

    def __init__(self, fn):
        self.fn, self.launches = fn, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.fn[grid]


@pytest.mark.parametrize("kpos", [False, True], ids=["slots", "kpos"])
def test_decode_one_split_writes_the_output_itself(kpos, monkeypatch):
    """num_splits == 1: no combine launch, and bit for bit what the split + combine pair
    gives; several splits agree with it to rounding."""
    gen = torch.Generator().manual_seed(11)
    B, H, HKV, T, S, D = 2, 4, 2, 3, 45, 48
    q = _randn(B, H, T, D, gen=gen)
    k = _randn(B, HKV, S, D, gen=gen)
    v = _randn(B, HKV, S, D, gen=gen)
    pos = torch.tensor([20, 42])
    kw = dict(window=17, kpos=_ring(B, S - T, T, [20, 42], gen) if kpos else None)
    comb = _Counting(A._decode_combine)
    monkeypatch.setattr(A, "_decode_combine", comb)
    one = A.rope_attention_decode(q, k, v, pos, num_splits=1, **kw)
    assert comb.launches == 0
    monkeypatch.setattr(A, "DIRECT_SINGLE_SPLIT", False)
    two_launch = A.rope_attention_decode(q, k, v, pos, num_splits=1, **kw)
    assert comb.launches == 1
    assert torch.equal(one, two_launch)
    monkeypatch.setattr(A, "DIRECT_SINGLE_SPLIT", True)
    for n in (2, 3, 5):
        many = A.rope_attention_decode(q, k, v, pos, num_splits=n, **kw)
        assert _max_err(many, one) <= 1e-6, n
    # an empty row (every key masked) gives 0 on both paths
    far = torch.full((B, S), -1) if kpos else None
    if kpos:
        assert A.rope_attention_decode(q, k, v, pos, num_splits=1, kpos=far).abs().max() == 0


def test_decode_segments_read_each_tensor_at_its_own_rows():
    """The second segment's keys and values are rows 0.. of k_new and v_new: the same
    attention as over the concatenation, in one split or several (a split boundary inside
    either segment or at the seam), and a new key changed changes the output."""
    gen = torch.Generator().manual_seed(13)
    B, H, HKV, T, W, D = 2, 4, 2, 3, 9, 32
    P = [4, 30]
    q = _randn(B, H, T, D, gen=gen)
    k, v = _randn(B, HKV, W + T, D, gen=gen), _randn(B, HKV, W + T, D, gen=gen)
    kpos = _ring(B, W, T, P, gen)
    whole = A.rope_attention_decode(q, k, v, torch.tensor(P), window=W, kpos=kpos,
                                    num_splits=1)
    kn, vn = k[:, :, W:].clone(), v[:, :, W:].clone()
    for n in (1, 2, 3, 4, 12):
        got = A.rope_attention_decode(q, k[:, :, :W], v[:, :, :W], torch.tensor(P), window=W,
                                      kpos=kpos, num_splits=n, k_new=kn, v_new=vn)
        assert _max_err(got, whole) <= 1e-6, n
    vn[:, :, -1] += 1.0             # the newest value: every query's own key
    got = A.rope_attention_decode(q, k[:, :, :W], v[:, :, :W], torch.tensor(P), window=W,
                                  kpos=kpos, k_new=kn, v_new=vn)
    assert _max_err(got, whole) > 1e-3


def test_decode_segments_bad_arguments():
    q = torch.zeros(2, 4, 1, 16)
    k = v = torch.zeros(2, 2, 10, 16)
    new = torch.zeros(2, 2, 1, 16)
    for kw, why in [(dict(k_new=new), "come together"),
                    (dict(k_new=new, v_new=new[..., :8]), "k_new must be"),
                    (dict(k_new=new[:, :1], v_new=new[:, :1]), "k_new must be"),
                    (dict(k_new=new.half(), v_new=new.half()), "dtype"),
                    (dict(k_new=new, v_new=new, q2=q[..., :8], k2_cache=k[..., :8]),
                     "do not combine")]:
        with pytest.raises(ValueError, match=why):
            A.rope_attention_decode(q, k, v, 3, kpos=torch.zeros(11, dtype=torch.long), **kw)


def test_decode_key_positions_bad_arguments():
    q = torch.zeros(2, 4, 1, 16)
    k = v = torch.zeros(2, 2, 10, 16)
    for bad, why in [(torch.zeros(10), "int32/int64"), (torch.zeros(9, dtype=torch.long),
                                                        r"\[S_max=10\]"),
                     (torch.zeros(3, 10, dtype=torch.long), r"\[B=2, S_max=10\]")]:
        with pytest.raises(ValueError, match=why):
            A.rope_attention_decode(q, k, v, 3, kpos=bad)


# -- decode with keys in two parts from two tensors (MLA's latent and k_R) -------------------
def run_decode_two_part(B, H, HKV, T, S, D, D2, *, pos, splits=None, kpos=False, window=None,
                        W=None, v_is_k=True, dv=None, rot=0, scale=0.3,
                        dtype=torch.float32, seed=0):
    """Keys [k | k2] from two tensors laid out as the decode pass keeps MLA's caches (the
    latent [B, S, D] seen as kv heads, k_R its own [B, Hkv, S, D2] tensor, here in a
    [B, S, Hkv, D2] layout and q2 a column slice: strides of their own), values the first
    part itself (v_is_k) or their own tensor; slots that must not be read hold NaN. Against
    the fp64 reference over [q | q2] and [k | k2] (RoPE, rotate-half at the positions, on the
    first part when rot): max abs error and the largest reference magnitude."""
    gen = torch.Generator().manual_seed(seed)
    q = _randn(B, H, T, D, gen=gen, dtype=dtype)
    q2 = _randn(B, H, T, 2 * D2, gen=gen, dtype=dtype)[..., D2:]
    k = _randn(B, S, HKV * D, gen=gen, dtype=dtype).reshape(B, S, HKV, D).transpose(1, 2)
    k2 = _randn(B, S, HKV, D2, gen=gen, dtype=dtype).transpose(1, 2)
    v = k if v_is_k else _randn(B, HKV, S, dv or D, gen=gen, dtype=dtype)
    P = torch.as_tensor(pos).expand(B)
    if kpos:     # a ring: W slots + T new keys (S = W + T), never-written slots negative
        kp = _ring(B, W, T, P.tolist(), gen)
        dead = kp < 0
    else:        # slot j = position j, the slots past the new keys not yet written
        kp = torch.arange(S).expand(B, S)
        dead = kp >= (P + T)[:, None]
    for x in {id(t): t for t in (k, k2, v)}.values():
        x.masked_fill_(dead[:, None, :, None], float("nan"))
    cos = sin = None
    if rot:
        cos, sin = A.rope_tables(int(P.max()) + S + T + 2, rot)
    out = A.rope_attention_decode(q, k, v, P, cos, sin, rot_dim=rot, rope_k=bool(rot),
                                  window=window, scale=scale, num_splits=splits,
                                  kpos=kp if kpos else None, q2=q2, k2_cache=k2)
    assert out.shape == (B, H, T, v.shape[-1]) and out.dtype == dtype
    assert not out.isnan().any()
    if scale is None:
        scale = 1 / math.sqrt(D + D2)
    q64, k64 = q.double(), torch.nan_to_num(k.double())
    if rot:   # RoPE on the first part's rot columns, at each query's and key's position
        qp = P[:, None] + torch.arange(T)
        q64 = torch.cat([_rotate_half_at(q64[..., :rot], cos.double(), sin.double(), qp),
                         q64[..., rot:]], -1)
        k64 = torch.cat([_rotate_half_at(k64[..., :rot], cos.double(), sin.double(), kp),
                         k64[..., rot:]], -1)
    ref = _kpos_reference(torch.cat([q64, q2.double()], -1),
                          torch.cat([k64, torch.nan_to_num(k2.double())], -1), v, P, kp,
                          window=window, scale=scale)
    return _max_err(out, ref), ref.abs().max().item()


# (id, B H HKV T S D D2, options); S = W + T for a ring
DECODE_TWO_PART = [
    ("mla-one-kv-head-one-step-one-split", (2, 4, 1, 1, 37, 32, 16), dict(pos=[5, 36],
                                                                        splits=1)),
    ("mla-dc48-3-new-4-splits", (2, 4, 1, 3, 41, 48, 16), dict(pos=[0, 38], splits=4)),
    ("mla-default-scale-window", (1, 8, 1, 2, 29, 32, 16), dict(pos=[20], splits=3,
                                                               window=7, scale=None)),
    ("gqa-own-values-dv24", (2, 4, 2, 2, 33, 32, 16), dict(pos=[3, 31], splits=3,
                                                          v_is_k=False, dv=24)),
    ("gqa-6-heads-over-2-rope-on-first-part", (1, 6, 2, 1, 23, 32, 16),
     dict(pos=[22], splits=2, rot=16)),
    ("mla-ring-kpos-one-step-2-splits", (2, 4, 1, 1, 10, 48, 16),
     dict(pos=[3, 20], kpos=True, W=9, window=9, splits=2)),
    ("gqa-ring-kpos-3-new-one-split", (2, 4, 2, 3, 10, 32, 16),
     dict(pos=[1, 14], kpos=True, W=7, window=None, splits=1)),
]


@pytest.mark.parametrize("shape,opts",
                         [pytest.param(s, o, id=i) for i, s, o in DECODE_TWO_PART])
def test_decode_two_part_keys_fp32(shape, opts):
    err, _ = run_decode_two_part(*shape, **opts)
    print(f"decode with two-part keys: max abs err {err:.1e}")
    assert err <= F32_TOL


def test_decode_two_part_keys_fp16():
    err, scale = run_decode_two_part(2, 4, 1, 1, 45, 48, 16, pos=[10, 44], splits=3,
                                     dtype=torch.float16)
    print(f"decode with two-part keys fp16: max abs err {err:.1e} (max |ref| {scale:.2f})")
    assert err <= F16_REL * max(scale, 1.0)


@pytest.mark.parametrize("kpos", [False, True], ids=["slots", "kpos"])
def test_decode_two_part_one_split_writes_the_output_itself(kpos, monkeypatch):
    """Two-part keys with one split: no combine launch, bit for bit the two-launch result;
    and the second part counts (zeroing q2 changes the output)."""
    gen = torch.Generator().manual_seed(12)
    B, H, T, S, D, D2 = 2, 4, 1, 21, 32, 16
    q, q2 = _randn(B, H, T, D, gen=gen), _randn(B, H, T, D2, gen=gen)
    k, k2 = _randn(B, 1, S, D, gen=gen), _randn(B, 1, S, D2, gen=gen)
    pos = torch.tensor([6, 20])
    kw = dict(q2=q2, k2_cache=k2, kpos=_ring(B, S - T, T, [6, 20], gen) if kpos else None)
    comb = _Counting(A._decode_combine)
    monkeypatch.setattr(A, "_decode_combine", comb)
    one = A.rope_attention_decode(q, k, k, pos, num_splits=1, **kw)
    assert comb.launches == 0
    monkeypatch.setattr(A, "DIRECT_SINGLE_SPLIT", False)
    assert torch.equal(one, A.rope_attention_decode(q, k, k, pos, num_splits=1, **kw))
    assert comb.launches == 1
    kw["q2"] = torch.zeros_like(q2)
    assert _max_err(A.rope_attention_decode(q, k, k, pos, num_splits=1, **kw), one) > 1e-2


def test_decode_two_part_bad_arguments():
    q, q2 = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 8)
    k, k2 = torch.zeros(2, 1, 10, 16), torch.zeros(2, 1, 10, 8)
    for kw, why in [(dict(q2=q2), "come together"), (dict(k2_cache=k2), "come together"),
                    (dict(q2=q2, k2_cache=k2[..., :4]), "q2 must be"),
                    (dict(q2=q2, k2_cache=k2[:, :, :9]), "q2 must be"),
                    (dict(q2=q2.half(), k2_cache=k2.half()), "dtype")]:
        with pytest.raises(ValueError, match=why):
            A.rope_attention_decode(q, k, k, 3, **kw)


# -- the reference against independent formulations -----------------------------------------
@pytest.mark.parametrize("interleaved", [False, True])
def test_reference_rope_is_a_complex_rotation(interleaved):
    """Pair (a, b) of x at position p becomes (a + ib) e^{i p theta_pair}; dims past rot_dim
    are untouched."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 12, generator=gen, dtype=torch.float64)
    rot, base, off = 8, 100.0, 5
    cos, sin = A.rope_tables(20, rot, base=base, interleaved=interleaved)
    got = A.apply_rope(x, cos.double(), sin.double(), off, rot, interleaved)
    xr = x[..., :rot]
    a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else xr.chunk(2, -1)
    theta = base ** (-torch.arange(rot // 2, dtype=torch.float64) * 2 / rot)
    angle = (off + torch.arange(9, dtype=torch.float64))[:, None] * theta
    z = torch.complex(a, b) * torch.exp(1j * angle)
    want_r = torch.stack([z.real, z.imag], -1).flatten(-2) if interleaved else \
        torch.cat([z.real, z.imag], -1)
    torch.testing.assert_close(got[..., :rot], want_r, atol=1e-6, rtol=0)   # fp32 tables
    assert torch.equal(got[..., rot:], x[..., rot:])
    paired = A.rope_tables(20, rot, base=base, interleaved=interleaved, paired=True)
    assert torch.equal(A.apply_rope(x, *paired, off, rot, interleaved), got)


def test_reference_attention_matches_sdpa_with_an_explicit_mask():
    gen = torch.Generator().manual_seed(5)
    B, H, HKV, T, S, D, W = 2, 4, 2, 11, 19, 16, 6
    q = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HKV, S, D, generator=gen, dtype=torch.float64)
    got = A.rope_attention_reference(q, k, v, window=W, scale=0.3)
    i = torch.arange(T)[:, None] + (S - T)
    j = torch.arange(S)[None, :]
    mask = (j <= i) & (j > i - W)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_xpos_tables_scale_queries_up_and_keys_down():
    cos, sin = A.rope_tables(600, 8)
    qc, qs, kc, ks = A.xpos_tables(cos, sin)
    zeta = (torch.arange(4) * 2 / 8 + 0.4) / 1.4
    zeta = torch.cat([zeta, zeta])
    torch.testing.assert_close(qc[512] / cos[512], zeta, rtol=1e-5, atol=0)
    torch.testing.assert_close(ks[512] / sin[512], 1 / zeta, rtol=1e-5, atol=0)
    torch.testing.assert_close(qc * kc, cos * cos)


# -- errors ------------------------------------------------------------------------------------
def test_bad_arguments_are_refused_with_a_reason():
    q = torch.zeros(1, 3, 4, 8)
    k = torch.zeros(1, 2, 4, 8)
    cos, sin = A.rope_tables(4, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        A.rope_attention_fwd(q, k, k, cos, sin)
    q = torch.zeros(1, 4, 4, 8)
    with pytest.raises(ValueError, match="rot_dim must be even"):
        A.rope_attention_fwd(q, k, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="positions; queries need 6"):
        A.rope_attention_fwd(q, k, k, cos, sin, q_offset=2)
    with pytest.raises(ValueError, match="like cos"):
        A.rope_attention_fwd(q, k, k, cos, sin, k_cos=cos[:, :4], k_sin=sin[:, :4])
    with pytest.raises(ValueError, match="share one dtype"):
        A.rope_attention_fwd(q.half(), k, k, cos, sin)


# -- the benchmark's CPU run -----------------------------------------------------------------
def test_benchmark_runs_tiny_on_cpu(tmp_path):
    path = os.path.join(ROOT, "benchmarks", "attention_bench.py")
    spec = importlib.util.spec_from_file_location("attention_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.jsonl"
    rec = bench.main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text().splitlines()[-1])
    assert saved["date"] == rec["date"] and "interpreter" in saved["device"]
    assert "not a speed" in saved["timing"] and saved["torch"] and saved["triton"]
    methods = {(r["method"], r["pass"]) for r in saved["prefill"]}
    assert len(methods) == 8 and all(r["tflops"] > 0 for r in saved["prefill"])
    assert saved["decode"] and all(math.isfinite(r["GB/s"]) for r in saved["decode"])
    for c in saved["check"]:
        assert max(c["max_abs_err"].values()) <= F32_TOL


# -- on the GPU (autotuned blocks, bf16 / fp16 tensor cores): run with -m gpu -----------------
def _gpu_inputs(gen, B, H, HKV, T, D, dtype):
    """q, k, v (requiring gradients) and an upstream gradient, on the GPU in dtype."""
    dev = torch.device("cuda")
    q, k, v = (_randn(B, h, T, D, gen=gen).to(dev, dtype).requires_grad_()
               for h in (H, HKV, HKV))
    return q, k, v, _randn(B, H, T, D, gen=gen).to(dev, dtype)


def _assert_within_twice(fused, base, want, dec, dtype):
    """out and dq, dk, dv of the kernels (`fused`) and the decode output at the last
    position (`dec`) no further from the fp32 reference (`want`) than twice torch's own
    pipeline in the dtype (`base`), or two units in the last place of the largest value."""
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for name, f, b, w in zip(("out", "dq", "dk", "dv"), fused, base, want):
        ef, eb = _max_err(f, w), _max_err(b, w)
        print(f"{name}: fused {ef:.2e}, torch {eb:.2e}")
        assert ef <= max(2 * eb, 2 * unit * w.abs().max().item()), name
    ed, eb = _max_err(dec, want[0][:, :, -1:]), _max_err(base[0][:, :, -1:], want[0][:, :, -1:])
    print(f"decode: fused {ed:.2e}, torch {eb:.2e}")
    assert ed <= max(2 * eb, 2 * unit * want[0][:, :, -1:].abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("D,HKV,window", [(64, 16, None), (128, 4, 300)],
                         ids=["d64-mha-causal", "d128-gqa-window"])
def test_gpu_errors_within_twice_sdpa(dtype, D, HKV, window):
    """Errors against the fp32 reference no larger than twice those of torch's own pipeline
    in the same dtype (RoPE rounded to the dtype, then F.scaled_dot_product_attention): out,
    every gradient, and decode."""
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(6)
    B, H, T = 2, 16, 1000
    dev = torch.device("cuda")
    q, k, v, do = _gpu_inputs(gen, B, H, HKV, T, D, dtype)
    cos, sin = A.rope_tables(T, D, paired=True, device=dev)
    out = A.rope_attention(q, k, v, cos, sin, rot_dim=D, window=window)
    fused = (out, *torch.autograd.grad(out, (q, k, v), do))

    x32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = A.rope_attention_reference(*x32, cos, sin, rot_dim=D, window=window)
    want = (ref, *torch.autograd.grad(ref, x32, do.float()))

    xb = [x.detach().requires_grad_() for x in (q, k, v)]
    G = H // HKV
    qr = A.apply_rope(xb[0], cos, sin, 0, D).to(dtype)
    kr = A.apply_rope(xb[1], cos, sin, 0, D).to(dtype).repeat_interleave(G, 1)
    i, j = torch.arange(T, device=dev)[:, None], torch.arange(T, device=dev)[None, :]
    mask = (j <= i) & (j > i - (window or T + 1))
    sd = F.scaled_dot_product_attention(qr, kr, xb[2].repeat_interleave(G, 1), attn_mask=mask)
    base = (sd, *torch.autograd.grad(sd, xb, do))
    k_cache = A.apply_rope(k.detach(), cos, sin, 0, D).to(dtype)
    pos = torch.full((B,), T - 1, device=dev)
    dec = A.rope_attention_decode(q.detach()[:, :, -1:], k_cache, v.detach(), pos, cos, sin,
                                  rot_dim=D, window=window)
    _assert_within_twice(fused, base, want, dec, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("softcap,alibi,window", [(2.0, False, None), (None, True, 300),
                                                  (5.0, True, None)],
                         ids=["softcap", "alibi-window", "softcap-alibi"])
def test_gpu_softcap_and_alibi_errors_within_twice_torch(dtype, softcap, alibi, window):
    """The soft cap and ALiBi on the GPU: errors against the fp32 reference no larger than
    twice those of the same math in torch in the dtype (scores, cap and bias in the dtype,
    softmax in fp32), out and every gradient; and decode at the last position."""
    gen = torch.Generator().manual_seed(7)
    B, H, HKV, T, D = 2, 8, 2, 700, 64
    dev = torch.device("cuda")
    q, k, v, do = _gpu_inputs(gen, B, H, HKV, T, D, dtype)
    slopes = (2.0 ** (-8.0 * torch.arange(1, H + 1) / H)).to(dev) if alibi else None
    kw = dict(window=window, softcap=softcap, alibi=slopes)
    out = A.rope_attention(q, k, v, **kw)
    fused = (out, *torch.autograd.grad(out, (q, k, v), do))
    x32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = A.rope_attention_reference(*x32, **kw)
    want = (ref, *torch.autograd.grad(ref, x32, do.float()))

    xb = [x.detach().requires_grad_() for x in (q, k, v)]
    G = H // HKV
    s = (xb[0] @ xb[1].repeat_interleave(G, 1).transpose(-1, -2)) * D ** -0.5
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    i, j = torch.arange(T, device=dev)[:, None], torch.arange(T, device=dev)[None, :]
    if alibi:
        s = s + (slopes.view(1, H, 1, 1) * (j - i)).to(dtype)
    s = s.masked_fill(~((j <= i) & (j > i - (window or T + 1))), float("-inf"))
    p = torch.softmax(s.float(), -1).to(dtype)
    tb = p @ xb[2].repeat_interleave(G, 1)
    base = (tb, *torch.autograd.grad(tb, xb, do))
    dec = A.rope_attention_decode(q.detach()[:, :, -1:], k.detach(), v.detach(),
                                  torch.full((B,), T - 1, device=dev), **kw)
    _assert_within_twice(fused, base, want, dec, dtype)

