"""A hand-written PyTorch blues01 (sandwich-norm GQA transformer, MoE on odd layers), independent
of lmc: the yardstick for zoo/blues01.yaml.

Functional: `forward(w, ids, cfg, training=False)` takes the weights by their lmc names
([in, out] layout). Attention uses F.scaled_dot_product_attention with repeated K/V heads; each
expert is applied with a loop over experts. In training the router noise is drawn as
lmc's gaussian_noise defines it: N(0, 1) from a CPU generator seeded with the seed, shaped
like the router logits, times sigma.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from reference_llama import rmsnorm, rope_cos_sin, rotate_half


def attention(w, p, x, cfg):
    B, T, _ = x.shape
    H, KV, dh = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q, k, v = (x @ w[p + "wqkv"]).split([H * dh, KV * dh, KV * dh], dim=-1)
    q = q.view(B, T, H, dh).transpose(1, 2)
    k = k.view(B, T, KV, dh).transpose(1, 2)
    v = v.view(B, T, KV, dh).transpose(1, 2)
    cos, sin = rope_cos_sin(T, dh, float(cfg["rope_base"]))
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(H // KV, dim=1)
    v = v.repeat_interleave(H // KV, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2).reshape(B, T, H * dh) @ w[p + "wo"]


def geglu(x, wg, w1, w2):
    return (F.gelu(x @ wg) * (x @ w1)) @ w2


def moe(w, p, x, cfg, layer, training):
    E, k = cfg["experts"], cfg["top_k"]
    logits = x @ w[p + "router"]
    if training:
        g = torch.Generator(device="cpu").manual_seed(cfg["noise_seed"] + 1009 * layer)
        logits = logits + cfg["router_noise"] * torch.randn(logits.shape, generator=g)
    probs = torch.softmax(logits, dim=-1)
    top_v, top_i = probs.topk(k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, top_i, top_v / top_v.sum(-1, keepdim=True))
    chosen = torch.zeros_like(probs).scatter(-1, top_i, 1.0)
    y = torch.zeros_like(x)
    for e in range(E):
        y = y + gates[..., e:e + 1] * geglu(x, w[p + "wg"][e], w[p + "w1"][e], w[p + "w2"][e])
    f = chosen.reshape(-1, E).mean(0) / k
    lb = E * (f * probs.reshape(-1, E).mean(0)).sum()
    return y, lb, chosen.reshape(-1, E).sum(0)


def forward(w, ids, cfg, training=False):
    eps = cfg["eps"]
    x = w["embed"][ids] * math.sqrt(cfg["d"])
    lbs, tokens = [], []
    for layer in range(cfg["layers"]):
        p = f"layers.{layer}."
        a = attention(w, p + "attn.", rmsnorm(x, w[p + "attn_pre.weight"], eps), cfg)
        x = x + rmsnorm(a, w[p + "attn_post.weight"], eps)
        h = rmsnorm(x, w[p + "ffn_pre.weight"], eps)
        if layer % 2 == 1:
            y, lb, tok = moe(w, p + "moe.", h, cfg, layer, training)
            lbs.append(lb)
            tokens.append(tok)
        else:
            y = geglu(h, w[p + "ffn.wg"], w[p + "ffn.w1"], w[p + "ffn.w2"])
        x = x + rmsnorm(y, w[p + "ffn_post.weight"], eps)
    logits = rmsnorm(x, w["norm.weight"], eps) @ w["embed"].T
    return {"logits": logits, "load_balance": torch.stack(lbs).mean(),
            "expert_tokens": torch.stack(tokens)}
