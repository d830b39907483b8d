"""A hand-written PyTorch MiniMax (lightning-attention hybrid + MoE), independent of lmc: the
yardstick for zoo/minimax.yaml.

Functional: `forward(w, ids, cfg)` takes the weights by their lmc names ([in, out] layout)
and the config dict. Lightning attention is computed either as the recurrence
KV_t = lambda KV_{t-1} + k_t^T v_t, o_t = q_t KV_t (`lightning="recurrent"`) or with the
decay matrix lambda^(t-s) built directly (`"parallel"`); softmax layers use
F.scaled_dot_product_attention with repeated K/V heads; the MoE capacity is counted token by
token in Python with exact rationals.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from reference_llama import rmsnorm, rope_cos_sin, rotate_half


def decay_rates(layer, cfg):
    """s_h = 2^(-8h/H) * (1 - l/(L-1)), h = 1..H; the factor is 1 when L = 1."""
    H, L = cfg["heads"], cfg["layers"]
    factor = 1.0 - layer / (L - 1) if L > 1 else 1.0
    return torch.tensor([2.0 ** (-8.0 * h / H) * factor for h in range(1, H + 1)])


def lightning(w, p, x, layer, cfg, mode):
    B, T, _ = x.shape
    H, dh = cfg["heads"], cfg["head_dim"]
    q, k, v = F.silu(x @ w[p + "wqkv"]).chunk(3, dim=-1)
    q, k, v = (t.view(B, T, H, dh).transpose(1, 2) for t in (q, k, v))
    lam = torch.exp(-decay_rates(layer, cfg))                     # [H]
    if mode == "recurrent":
        state = x.new_zeros(B, H, dh, dh)
        outs = []
        for t in range(T):
            state = lam.view(1, H, 1, 1) * state + k[:, :, t, :, None] * v[:, :, t, None, :]
            outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
        o = torch.stack(outs, dim=2)
    else:
        t_idx = torch.arange(T)
        dist = (t_idx[:, None] - t_idx[None, :]).float()           # t - s
        decay = torch.where(dist >= 0, lam.view(H, 1, 1) ** dist.clamp(min=0),
                            torch.zeros(()))
        o = ((q @ k.transpose(-2, -1)) * decay) @ v
    o = rmsnorm(o.transpose(1, 2).reshape(B, T, H * dh), w[p + "norm.weight"], cfg["eps"])
    return (torch.sigmoid(x @ w[p + "wg"]) * o) @ w[p + "wo"]


def softmax_attention(w, p, x, cfg):
    B, T, _ = x.shape
    H, KV, dh, r = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["rope_dim"]
    q = (x @ w[p + "wq"]).view(B, T, H, dh).transpose(1, 2)
    k = (x @ w[p + "wk"]).view(B, T, KV, dh).transpose(1, 2)
    v = (x @ w[p + "wv"]).view(B, T, KV, dh).transpose(1, 2)
    cos, sin = rope_cos_sin(T, r, float(cfg["rope_base"]))
    qr, kr = q[..., :r], k[..., :r]
    qr = qr * cos + rotate_half(qr) * sin
    kr = kr * cos + rotate_half(kr) * sin
    if cfg["xpos"]:
        zeta = (torch.arange(0, r, 2).float() / r + 0.4) / 1.4
        zeta = torch.cat([zeta, zeta])
        power = torch.arange(T).float()[:, None] / cfg["xpos_base"]
        qr = qr * zeta ** power
        kr = kr * zeta ** (-power)
    q = torch.cat([qr, q[..., r:]], dim=-1)
    k = torch.cat([kr, k[..., r:]], dim=-1)
    k = k.repeat_interleave(H // KV, dim=1)
    v = v.repeat_interleave(H // KV, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2).reshape(B, T, H * dh) @ w[p + "wo"]


def capacity_keep(chosen, cfg):
    """keep[b, t, e] = chosen and (#tokens s <= t of sequence b that chose e) <=
    ceil(cf * k * (t + 1) / E), counted one token at a time."""
    B, T, E = chosen.shape
    cf = Fraction(str(cfg["capacity"]))
    keep = torch.zeros_like(chosen)
    for b in range(B):
        for e in range(E):
            count = 0
            for t in range(T):
                if chosen[b, t, e]:
                    count += 1
                    if count <= math.ceil(cf * cfg["top_k"] * (t + 1) / E):
                        keep[b, t, e] = 1.0
    return keep


def moe(w, p, x, cfg):
    E, k = cfg["experts"], cfg["top_k"]
    logits = x @ w[p + "router"]
    probs = torch.softmax(logits, dim=-1)
    top_v, top_i = probs.topk(k, dim=-1)
    chosen = torch.zeros_like(probs).scatter(-1, top_i, 1.0)
    gates = torch.zeros_like(probs).scatter(-1, top_i, top_v / top_v.sum(-1, keepdim=True))
    keep = capacity_keep(chosen.detach(), cfg)
    gates = gates * keep
    y = torch.zeros_like(x)
    for e in range(E):
        h = F.silu(x @ w[p + "w1"][e]) * (x @ w[p + "w3"][e])
        y = y + gates[..., e:e + 1] * (h @ w[p + "w2"][e])
    f = chosen.reshape(-1, E).mean(0) / k
    lb = E * (f * probs.reshape(-1, E).mean(0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return y, lb, z, keep.reshape(-1, E).sum(0), (chosen - keep).reshape(-1, E).sum(0)


def forward(w, ids, cfg, lightning_mode="parallel"):
    L = cfg["layers"]
    x = w["embed"][ids]
    lbs, zs, kept, dropped = [], [], [], []
    for layer in range(L):
        p = f"layers.{layer}."
        h = rmsnorm(x, w[p + "attn_norm.weight"], cfg["eps"])
        if (layer + 1) % cfg["attn_every"] == 0:
            x = x + softmax_attention(w, p + "attn.", h, cfg)
        else:
            x = x + lightning(w, p + "attn.", h, layer, cfg, lightning_mode)
        y, lb, z, kp, dr = moe(w, p + "moe.", rmsnorm(x, w[p + "ffn_norm.weight"], cfg["eps"]),
                               cfg)
        x = x + y
        lbs.append(lb)
        zs.append(z)
        kept.append(kp)
        dropped.append(dr)
    return {"logits": rmsnorm(x, w["norm.weight"], cfg["eps"]) @ w["lm_head"],
            "load_balance": torch.stack(lbs).mean(), "z_loss": torch.stack(zs).mean(),
            "expert_tokens": torch.stack(kept), "expert_dropped": torch.stack(dropped)}
