"""A hand-written PyTorch MLA model, independent of lmc: the yardstick for zoo/optimus_prime.yaml.

Written from the intended math (shared/ZOO.md, DeepSeek-V2's multi-head latent attention):
nn.Linear layers (weights [out, in]) with the zoo file's parameter names, the score computed
as the SUM of a content term and a rotary term (q_C·k_C + q_R·k_R, the same value as the
concatenated form the YAML uses), and one rotary key of width d_R broadcast over the heads.
`MLA.absorbed` is the decode-time form: only [c_KV ‖ k_R] per token, with W_UK folded into
the query and W_UV into W_O; it must equal the plain form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from reference_llama import RMSNorm, rope_cos_sin, rotate_half
from torch import nn


def dropout(x, p, seed, training):
    """lmc's dropout op: element i is kept when Philox4x32-10 at counter (i, 0, 0, 0) and key
    `seed` gives u >= p (lmc's RNG contract, lmc/ops/philox.py; it is checked against
    Triton's tl.rand and a Random123 test vector in tests/ops/test_philox.py)."""
    from lmc.ops.philox import uniform

    if not training or p == 0:
        return x
    keep = uniform(int(seed), x.numel(), x.device).view(x.shape) >= p
    return torch.where(keep, x / (1 - p), torch.zeros((), dtype=x.dtype))


def rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class MLA(nn.Module):
    def __init__(self, d, heads, head_dim, rope_dim, latent, eps):
        super().__init__()
        self.heads, self.head_dim, self.rope_dim, self.latent = heads, head_dim, rope_dim, latent
        self.w_dq = nn.Linear(d, latent, bias=False)
        self.w_uq = nn.Linear(latent, heads * head_dim, bias=False)
        self.w_qr = nn.Linear(latent, heads * rope_dim, bias=False)
        self.w_dkv = nn.Linear(d, latent, bias=False)
        self.w_uk = nn.Linear(latent, heads * head_dim, bias=False)
        self.w_uv = nn.Linear(latent, heads * head_dim, bias=False)
        self.w_kr = nn.Linear(d, rope_dim, bias=False)
        self.w_o = nn.Linear(heads * head_dim, d, bias=False)
        self.q_norm, self.kv_norm = RMSNorm(latent, eps), RMSNorm(latent, eps)

    def _heads(self, x, width):
        B, T, _ = x.shape
        return x.view(B, T, self.heads, width).transpose(1, 2)

    def latents(self, h, cos, sin):
        """c_Q, c_KV and the shared rotary key k_R [B, 1, T, d_R]: what decode caches."""
        c_q = self.q_norm(self.w_dq(h))
        c_kv = self.kv_norm(self.w_dkv(h))
        k_r = rope(self.w_kr(h).unsqueeze(1), cos, sin)
        return c_q, c_kv, k_r

    def forward(self, h, cos, sin):
        B, T, _ = h.shape
        c_q, c_kv, k_r = self.latents(h, cos, sin)
        q_c = self._heads(self.w_uq(c_q), self.head_dim)
        q_r = rope(self._heads(self.w_qr(c_q), self.rope_dim), cos, sin)
        k_c = self._heads(self.w_uk(c_kv), self.head_dim)
        v = self._heads(self.w_uv(c_kv), self.head_dim)
        # one k_R for every head: [B, 1, T, d_R] broadcasts over the head axis
        scores = (q_c @ k_c.transpose(-2, -1) + q_r @ k_r.transpose(-2, -1))
        scores = scores / (self.head_dim + self.rope_dim) ** 0.5
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
        o = (probs @ v).transpose(1, 2).reshape(B, T, -1)
        return self.w_o(o)

    def absorbed(self, h, cos, sin):
        """The decode form: attention over the latent cache [c_KV ‖ k_R] only.
        q_C·k_C = (c_Q W_UQ_h)(c_KV W_UK_h)ᵀ = (q_C W_UK_hᵀ)·c_KV, and
        Σ_h (P_h c_KV W_UV_h) W_O_h = Σ_h (P_h c_KV)(W_UV_h W_O_h)."""
        B, T, _ = h.shape
        H, dh = self.heads, self.head_dim
        c_q, c_kv, k_r = self.latents(h, cos, sin)
        q_c = self._heads(self.w_uq(c_q), dh)                          # [B, H, T, dh]
        q_r = rope(self._heads(self.w_qr(c_q), self.rope_dim), cos, sin)
        w_uk = self.w_uk.weight.view(H, dh, self.latent)               # per head [dh, d_c]
        q_lat = q_c @ w_uk                                             # [B, H, T, d_c]
        cache = torch.cat([c_kv, k_r.squeeze(1)], -1)                  # [B, T, d_c + d_R]
        q_all = torch.cat([q_lat, q_r], -1)                            # [B, H, T, d_c + d_R]
        scores = q_all @ cache.unsqueeze(1).transpose(-2, -1)
        scores = scores / (dh + self.rope_dim) ** 0.5
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
        o_lat = probs @ c_kv.unsqueeze(1)                              # [B, H, T, d_c]
        w_uv = self.w_uv.weight.view(H, dh, self.latent)               # [H, dh, d_c]
        w_o = self.w_o.weight.view(-1, H, dh).permute(1, 2, 0)         # [H, dh, d]
        w_vo = w_uv.transpose(1, 2) @ w_o                              # [H, d_c, d]
        return (o_lat @ w_vo).sum(1)


class FFN(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.w1 = nn.Linear(d, ffn, bias=False)
        self.w3 = nn.Linear(d, ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, eps = cfg["d"], cfg["eps"]
        self.attn_norm = RMSNorm(d, eps)
        self.attn = MLA(d, cfg["heads"], cfg["head_dim"], cfg["rope_dim"], cfg["latent"], eps)
        self.ffn_norm, self.ffn = RMSNorm(d, eps), FFN(d, cfg["ffn"])


class OptimusPrime(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg["vocab"], cfg["d"])
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg["layers"]))
        self.norm = RMSNorm(cfg["d"], cfg["eps"])
        self.lm_head = nn.Linear(cfg["d"], cfg["vocab"], bias=False)

    def forward(self, ids, absorbed=False):
        c = self.cfg
        p, seed = c["p_drop"], c["drop_seed"]
        cos, sin = rope_cos_sin(ids.shape[1], c["rope_dim"], float(c["rope_base"]))
        x = dropout(self.embed(ids), p, seed, self.training)
        for i, layer in enumerate(self.layers):
            attn = layer.attn.absorbed if absorbed else layer.attn
            x = x + dropout(attn(layer.attn_norm(x), cos, sin), p, seed + 2 * i + 1,
                            self.training)
            x = x + dropout(layer.ffn(layer.ffn_norm(x)), p, seed + 2 * i + 2, self.training)
        return self.lm_head(self.norm(x))
