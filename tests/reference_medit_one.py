"""A hand-written PyTorch medit_one, independent of lmc: the yardstick for zoo/medit_one.yaml.

Written from the intended math (shared/ZOO.md): attention across the features of one token
(H items of d_h features, rotary position = head index), hx/cx states flowing up the depth,
and a causal running mean as the only path between tokens. nn.Linear layers (weights
[out, in]) carry the zoo file's parameter names. The running mean is written as a
lower-triangular averaging matrix here (the YAML uses cumsum / position), and `step` is the
decode form: per layer a running sum S and the step count, constant in T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from reference_llama import RMSNorm, rope_cos_sin, rotate_half
from torch import nn


class HiddenAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.w1 = nn.Linear(d, d, bias=False)
        self.w2 = nn.Linear(d, d, bias=False)
        self.w3 = nn.Linear(d, d, bias=False)
        self.w_h = nn.Linear(self.head_dim, heads, bias=False)

    def forward(self, n, hx, cx):
        """Everything here acts on each token alone: inputs [..., d], output [..., H*H]."""
        H, dh = self.heads, self.head_dim
        cos, sin = rope_cos_sin(H, dh, 10000.0)  # positions are the heads 0 .. H-1

        def split(t):
            return t.view(*t.shape[:-1], H, dh)

        def rope(t):
            return t * cos + rotate_half(t) * sin

        q = rope(split(self.w1(n))) / dh ** 0.5
        k = rope(split(self.w2(hx)))
        v = split(self.w3(cx))
        qq, kk, vv = self.w_h(q), self.w_h(k), self.w_h(v)          # [..., H, H]
        attn = torch.softmax(qq * kk, dim=-1)
        return (attn * vv).flatten(-2)


class Linear(nn.Module):
    """One projection u -> u W (lmc's name for the weight: `w`, stored [in, out])."""

    def __init__(self, din, d):
        super().__init__()
        self.w = nn.Linear(din, d, bias=False)

    def forward(self, u):
        return self.w(u)


class Routed(nn.Module):
    """The optional MoE projection: softmax router on u, top-k experts, renormalised."""

    def __init__(self, din, d, experts, top_k, eps):
        super().__init__()
        self.router = nn.Linear(din, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(din, d, bias=False) for _ in range(experts))
        self.top_k, self.eps = top_k, eps

    def forward(self, u):
        r = u / (u.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()   # scale-free choice
        probs = torch.softmax(self.router(r), -1)
        ranked = probs.sort(-1, descending=True).values
        # how far the choice is from a tie (tests need it well away from rounding)
        self.margin = (ranked[..., self.top_k - 1] - ranked[..., self.top_k]).min().item()
        kept, idx = probs.topk(self.top_k, -1)
        kept = kept / kept.sum(-1, keepdim=True)
        out = torch.zeros(*u.shape[:-1], self.experts[0].out_features)
        for e, expert in enumerate(self.experts):
            weight = (kept * (idx == e)).sum(-1, keepdim=True)  # 0 where e is not chosen
            out = out + weight * expert(u)
        return out


class FFN(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.w_gate = nn.Linear(d, ffn, bias=False)
        self.w_up = nn.Linear(d, ffn, bias=False)
        self.w_down = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.w_down(F.gelu(self.w_gate(x)) * self.w_up(x))


class Layer(nn.Module):
    def __init__(self, cfg, top):
        super().__init__()
        d, eps, H = cfg["d"], cfg["eps"], cfg["heads"]
        self.norm, self.out_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.attn = HiddenAttention(d, H)
        self.ffn = FFN(d, cfg["ffn"])

        def proj(din):
            if cfg["moe"]:
                return Routed(din, d, cfg["experts"], cfg["top_k"], cfg["router_eps"])
            return Linear(din, d)

        self.x_proj = proj(H * H)
        self.top = top
        if not top:  # the top layer hands no hx, cx on
            self.hx_proj, self.hx_norm, self.cx_proj = proj(H * H), RMSNorm(d, eps), proj(d)
        self.clip = float(cfg["clip"])

    def update(self, x, hx, cx, m):
        """The layer given its running mean m (position-wise from here on)."""
        a = self.attn(self.norm(x), hx, cx)
        o = m * self.x_proj(a).clamp(-self.clip, self.clip)
        o = self.out_norm(o + self.ffn(o))
        if not self.top:
            hx = self.hx_norm(hx + self.hx_proj(a).clamp(-self.clip, self.clip))
            cx = self.cx_proj(cx)
        return x + o, hx, cx

    def forward(self, x, hx, cx):
        T = x.shape[1]
        avg = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).float().unsqueeze(1)
        m = avg @ self.norm(x)                                        # m_t = mean_{i<=t} n_i
        return self.update(x, hx, cx, m)


class MeditOne(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg["vocab"], cfg["d_embed"])
        L = cfg["layers"]
        self.layers = nn.ModuleList(Layer(cfg, top=i == L - 1) for i in range(L))
        self.norm = RMSNorm(cfg["d"], cfg["eps"])
        self.head_up = nn.Linear(cfg["d"], cfg["d_embed"], bias=False)
        self.head_norm = RMSNorm(cfg["d_embed"], cfg["eps"])

    def stem(self, ids):
        e = self.embed(ids)
        h = e.view(*e.shape[:-1], self.cfg["d"], -1).mean(-1)        # adjacent bins
        return h, torch.ones_like(h), h                               # x, hx, cx

    def head(self, x):
        return self.head_norm(self.head_up(self.norm(x))) @ self.embed.weight.T

    def forward(self, ids):
        x, hx, cx = self.stem(ids)
        for layer in self.layers:
            x, hx, cx = layer(x, hx, cx)
        return self.head(x)

    def decode(self, ids):
        """Token by token with the decode state: per layer the running sum of n and the
        step count. Returns the logits at every position, [B, T, V]."""
        B, T = ids.shape
        sums = [torch.zeros(B, self.cfg["d"]) for _ in self.layers]
        out = []
        for t in range(T):
            x, hx, cx = self.stem(ids[:, t])
            for i, layer in enumerate(self.layers):
                sums[i] = sums[i] + layer.norm(x)
                x, hx, cx = layer.update(x, hx, cx, sums[i] / (t + 1))
            out.append(self.head(x))
        return torch.stack(out, 1)
