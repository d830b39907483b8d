"""The hand-written PyTorch Llama (tests/reference_llama.py) decoding with a static KV cache:
the yardstick for lmc's static decode step in benchmarks/decode_bench.py.

    kv = StaticKVLlama(llama, batch=1, max_len=512)   # shares llama's weights
    logits = kv(prompt_ids, torch.arange(T))          # prefill
    logits = kv(next_ids, pos)                        # pos: [1] i64 tensor, the position

Every layer's K and V live in buffers of max_len slots allocated once; a call writes the new
tokens' K/V in place at `pos` (index_copy_) and attends over all max_len slots with the mask
slot <= position, so slots not yet written never contribute and no shape depends on the
position: the single-token call can run under torch.compile(mode="reduce-overhead") (CUDA
graphs) as written.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from reference_llama import rope_cos_sin, rotate_half  # noqa: E402


class StaticKVLlama(nn.Module):
    def __init__(self, llama, batch: int, max_len: int):
        super().__init__()
        self.llama = llama
        p = next(llama.parameters())
        heads = llama.layers[0].attn.heads
        hd = llama.head_dim
        for i in range(len(llama.layers)):
            for kind in ("k", "v"):
                self.register_buffer(f"{kind}{i}", torch.zeros(batch, heads, max_len, hd,
                                                               dtype=p.dtype, device=p.device))
        cos, sin = rope_cos_sin(max_len, hd, llama.rope_base, p.device)
        self.register_buffer("cos", cos.to(p.dtype))
        self.register_buffer("sin", sin.to(p.dtype))
        self.register_buffer("slots", torch.arange(max_len, device=p.device))

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of the T tokens `ids` [B, T] at positions `pos` [T]."""
        m = self.llama
        B, T = ids.shape
        cos, sin = self.cos[pos], self.sin[pos]                   # [T, hd]
        mask = self.slots[None, :] <= pos[:, None]                # [T, max_len]
        x = m.embed(ids)
        for i, layer in enumerate(m.layers):
            a = layer.attn
            h = layer.attn_norm(x)
            q, k, v = (w(h).view(B, T, a.heads, a.head_dim).transpose(1, 2)
                       for w in (a.wq, a.wk, a.wv))
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            kc, vc = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
            x = x + a.wo(o.transpose(1, 2).reshape(B, T, -1))
            x = x + layer.ffn(layer.ffn_norm(x))
        return m.lm_head(m.norm(x))


if __name__ == "__main__":     # a module of decode_bench.py, not a script
    print(__doc__)
