"""A hand-written PyTorch RWKV-6 ("Finch"), independent of lmc: the yardstick for
examples/rwkv6.yaml.

Functional: `forward(w, ids, cfg)` takes the weights by their lmc names ([in, out] layout) and
the config dict. The time mix runs RWKV-6's recurrence token by token, as its reference
kernel does:

    y_t = r_t (S + diag(u) k_t^T v_t),   then   S = diag(w_t) S + k_t^T v_t

(the state read before the current token's update, the bonus u on the current token only),
with the token shift as `F.pad` of the sequence, LayerNorm and the per-head GroupNorm as
torch's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_shift(x):
    """x_{t-1} at t (zeros at t = 0), x: [B, T, C]."""
    return F.pad(x, (0, 0, 1, -1))


def layer_norm(x, w, p, eps):
    return F.layer_norm(x, x.shape[-1:], w[p + "weight"], w[p + "bias"], eps)


def decay_ramp(layer, cfg):
    d, L = cfg["d"], cfg["layers"]
    n = torch.arange(d, dtype=torch.float32) / (d - 1)
    return -6.0 + 5.0 * n ** (0.7 + 1.3 * layer / L)


def wkv(r, k, v, logw, u, inclusive=False):
    """r, k, v, logw: [B, T, H, N]; u: [H, N]. The recurrence, one token at a time
    (`inclusive`: a wrong variant for tests to tell apart, reading the state after
    the update as GLA does)."""
    B, T, H, N = r.shape
    S = r.new_zeros(B, H, N, N)
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]                  # [B, H, N, N]
        if inclusive:
            S = torch.exp(logw[:, t])[..., None] * S + kv
            ys.append(torch.einsum("bhi,bhij->bhj", r[:, t], S + u[None, :, :, None] * kv))
            continue
        ys.append(torch.einsum("bhi,bhij->bhj", r[:, t], S + u[None, :, :, None] * kv))
        S = torch.exp(logw[:, t])[..., None] * S + kv
    return torch.stack(ys, dim=1)                                       # [B, T, H, N]


def time_mix(w, p, x, layer, cfg, inclusive=False):
    B, T, d = x.shape
    H, N = cfg["heads"], cfg["head_size"]
    sx = token_shift(x) - x
    xxx = torch.tanh((x + sx * w[p + "mu_x"]) @ w[p + "mix_a"])
    m = dict(zip("wkvrg", xxx.chunk(5, dim=-1)))
    mixed = {c: x + sx * (w[p + "mu_" + c] + m[c] @ w[p + "mix_" + c]) for c in "wkvrg"}
    r, k, v = (mixed[c] @ w[p + "w" + c] for c in "rkv")
    g = F.silu(mixed["g"] @ w[p + "wg"])
    logw = -torch.exp(decay_ramp(layer, cfg) + w[p + "decay"]
                      + torch.tanh(mixed["w"] @ w[p + "decay_a"]) @ w[p + "decay_b"])
    heads = [t.view(B, T, H, N) for t in (r, k, v, logw)]
    y = wkv(*heads, w[p + "bonus"].view(H, N), inclusive).reshape(B * T, d)
    y = F.group_norm(y, H, w[p + "gn_w"], w[p + "gn_b"], cfg["gn_eps"]).view(B, T, d)
    return (y * g) @ w[p + "wo"]


def channel_mix(w, p, x):
    sx = token_shift(x) - x
    k = torch.relu((x + sx * w[p + "mu_k"]) @ w[p + "wk"]) ** 2
    return torch.sigmoid((x + sx * w[p + "mu_r"]) @ w[p + "wr"]) * (k @ w[p + "wv"])


def forward(w, ids, cfg, inclusive=False):
    eps = cfg["eps"]
    x = layer_norm(F.embedding(ids, w["embed"]), w, "ln0.", eps)
    for i in range(cfg["layers"]):
        p = f"layers.{i}."
        x = x + time_mix(w, p + "att.", layer_norm(x, w, p + "ln1.", eps), i, cfg,
                             inclusive)
        x = x + channel_mix(w, p + "ffn.", layer_norm(x, w, p + "ln2.", eps))
    return layer_norm(x, w, "ln_out.", eps) @ w["head"]
