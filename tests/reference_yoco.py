"""A hand-written PyTorch YOCO, independent of lmc: the yardstick for zoo/yoco.yaml.

The intended math of shared/ZOO.md, written the ordinary torch way: nn.Linear layers
(weights [out, in]), F.logsigmoid, F.scaled_dot_product_attention with repeat_interleave for
GQA, an explicit boolean band for the sliding window, BitNet b1.58 linears with the usual
`x + (q(x) - x).detach()` straight-through estimator. Gated retention has two forms: the
parallel one (what training computes) and the recurrent one (what decode will compute),
S_t = exp(γ̂_t)·S_{t-1} + k_tᵀ v_t, o_t = q_t S_t.

Module names mirror the YAML's parameter names (`self_layers.0.mixer.wq`), so weights copy
across by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from reference_llama import RMSNorm, rope_cos_sin, rotate_half
from torch import nn


def rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class BitLinear(nn.Linear):
    """nn.Linear, or BitNet b1.58 (ternary absmean weights, per-token absmax int8
    activations, straight-through gradients) when `bitnet` is set."""

    def __init__(self, d_in, d_out, bitnet=False):
        super().__init__(d_in, d_out, bias=False)
        self.bitnet = bitnet

    def forward(self, x):
        if not self.bitnet:
            return super().forward(x)
        w = self.weight
        beta = w.abs().mean().clamp(min=1e-5)
        w_q = (w / beta).round().clamp(-1, 1) * beta
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        x_q = (x * (127 / s)).round().clamp(-128, 127) * (s / 127)
        return F.linear(x + (x_q - x).detach(), w + (w_q - w).detach())


def split_heads(x, heads):
    B, T, _ = x.shape
    return x.view(B, T, heads, -1).transpose(1, 2)


def merge_heads(x):
    B, H, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * dh)


def retention_parallel(q, k, v, ld):
    """O = (QKᵀ ⊙ D)V, D_ts = exp(G_t - G_s) for s <= t. ld: [B, H, T] log decays."""
    T = q.shape[-2]
    G = ld.cumsum(-1)
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    D = (G[..., :, None] - G[..., None, :]).masked_fill(~keep, float("-inf")).exp()
    return (q @ k.transpose(-2, -1) * D) @ v


def retention_recurrent(q, k, v, ld):
    """S_t = exp(ld_t)·S_{t-1} + k_tᵀ v_t, o_t = q_t S_t, one step at a time."""
    B, H, T, dk = q.shape
    S = q.new_zeros(B, H, dk, v.shape[-1])
    out = []
    for t in range(T):
        S = ld[..., t, None, None].exp() * S + k[..., t, :, None] * v[..., t, None, :]
        out.append((q[..., t, None, :] @ S).squeeze(-2))
    return torch.stack(out, -2)


class GatedRetention(nn.Module):
    def __init__(self, d, heads, eps, gate_norm, bitnet, recurrent=False):
        super().__init__()
        self.heads, self.eps, self.gate_norm, self.recurrent = heads, eps, gate_norm, recurrent
        self.wq, self.wk, self.wv, self.wg, self.wo = (BitLinear(d, d, bitnet) for _ in range(5))
        self.wgamma = BitLinear(d, heads, bitnet)

    def forward(self, x, cos, sin):
        q = rope(split_heads(self.wq(x), self.heads), cos, sin)
        k = rope(split_heads(self.wk(x), self.heads), cos, sin) / math.sqrt(q.shape[-1])
        v = split_heads(self.wv(x), self.heads)
        ld = F.logsigmoid(self.wgamma(x)).transpose(1, 2) / self.gate_norm   # [B, H, T]
        o = (retention_recurrent if self.recurrent else retention_parallel)(q, k, v, ld)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.wo(F.silu(self.wg(x)) * merge_heads(o))


class WindowAttention(nn.Module):
    def __init__(self, d, heads, window, bitnet):
        super().__init__()
        self.heads, self.window = heads, window
        self.wq, self.wk, self.wv, self.wo = (BitLinear(d, d, bitnet) for _ in range(4))

    def forward(self, x, cos, sin):
        q = rope(split_heads(self.wq(x), self.heads), cos, sin)
        k = rope(split_heads(self.wk(x), self.heads), cos, sin)
        v = split_heads(self.wv(x), self.heads)
        T = x.shape[1]
        pos = torch.arange(T)
        band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.window)
        return self.wo(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=band)))


class GlobalKV(nn.Module):
    def __init__(self, d, kv_heads, head_dim, eps, bitnet):
        super().__init__()
        self.kv_heads = kv_heads
        self.kv_norm = RMSNorm(d, eps)
        self.wk = BitLinear(d, kv_heads * head_dim, bitnet)
        self.wv = BitLinear(d, kv_heads * head_dim, bitnet)

    def forward(self, x, cos, sin):
        z = self.kv_norm(x)
        return (rope(split_heads(self.wk(z), self.kv_heads), cos, sin),
                split_heads(self.wv(z), self.kv_heads))


class CrossAttention(nn.Module):
    def __init__(self, d, heads, bitnet):
        super().__init__()
        self.heads = heads
        self.wq, self.wo = BitLinear(d, d, bitnet), BitLinear(d, d, bitnet)

    def forward(self, x, k, v, cos, sin):
        q = rope(split_heads(self.wq(x), self.heads), cos, sin)
        rep = self.heads // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return self.wo(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


class FFN(nn.Module):
    def __init__(self, d, ffn, bitnet):
        super().__init__()
        self.w1, self.w3 = BitLinear(d, ffn, bitnet), BitLinear(d, ffn, bitnet)
        self.w2 = BitLinear(ffn, d, bitnet)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    def __init__(self, mixer, d, ffn, eps, bitnet):
        super().__init__()
        self.mixer_norm, self.mixer = RMSNorm(d, eps), mixer
        self.ffn_norm, self.ffn = RMSNorm(d, eps), FFN(d, ffn, bitnet)

    def forward(self, x, *args):
        x = x + self.mixer(self.mixer_norm(x), *args)
        return x + self.ffn(self.ffn_norm(x))


class YOCO(nn.Module):
    def __init__(self, vocab, d, layers, ffn, ret_heads, heads, kv_heads, *, sliding_window=0,
                 bitnet=False, gate_norm=16.0, rope_base=10000.0, eps=1e-5, recurrent=False):
        super().__init__()
        self.d, self.rope_base = d, rope_base
        self.ret_head_dim, self.head_dim = d // ret_heads, d // heads

        def self_mixer():
            if sliding_window:
                return WindowAttention(d, ret_heads, sliding_window, bitnet)
            return GatedRetention(d, ret_heads, eps, gate_norm, bitnet, recurrent)

        self.embed = nn.Embedding(vocab, d)
        self.self_layers = nn.ModuleList(Layer(self_mixer(), d, ffn, eps, bitnet)
                                         for _ in range(layers // 2))
        self.cross_kv = GlobalKV(d, kv_heads, self.head_dim, eps, bitnet)
        self.cross_layers = nn.ModuleList(Layer(CrossAttention(d, heads, bitnet), d, ffn, eps,
                                                bitnet) for _ in range(layers // 2))
        self.norm = RMSNorm(d, eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        T = ids.shape[1]
        cos_s, sin_s = rope_cos_sin(T, self.ret_head_dim, self.rope_base)
        cos_c, sin_c = rope_cos_sin(T, self.head_dim, self.rope_base)
        x = self.embed(ids) * math.sqrt(self.d)
        for layer in self.self_layers:
            x = layer(x, cos_s, sin_s)
        k, v = self.cross_kv(x, cos_c, sin_c)
        for layer in self.cross_layers:
            x = layer(x, k, v, cos_c, sin_c)
        return self.lm_head(self.norm(x))

    @classmethod
    def from_config(cls, cfg, **kw):
        return cls(cfg["vocab"], cfg["d"], cfg["layers"], cfg["ffn"], cfg["ret_heads"],
                   cfg["heads"], cfg["kv_heads"], sliding_window=cfg["sliding_window"],
                   bitnet=bool(cfg["bitnet"]), gate_norm=float(cfg["gate_norm"]),
                   rope_base=float(cfg["rope_base"]), eps=cfg["eps"], **kw)
