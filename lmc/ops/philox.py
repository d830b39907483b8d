"""The uniform random numbers of lmc's random ops (dropout): Triton's `tl.rand(seed, i)`.

Element i of a draw of n numbers is `tl.rand(seed, i)`: Philox4x32 with 10 rounds, counter
(i, 0, 0, 0), key (seed's low and high 32 bits), its first word read as an int32 and mapped
to [0, 1) (a negative word w becomes -w - 1, times 4.6566127342e-10 in fp32). The numbers
depend only on (seed, i), never on the device: on CUDA one Triton kernel draws them; on any
other device the same integer arithmetic runs in torch (int64 tensors holding uint32 words),
bit for bit equal to the kernel (tests check it against the kernel in Triton's interpreter).
Before, dropout drew its mask from a CPU torch generator, which on a GPU meant generating
every mask on the host and copying it to the device each step.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10
_SCALE = 4.6566127342e-10        # the largest scale with (2^31 - 1) * scale < 1 in fp32


def _mul_hi_lo(a: int, b: torch.Tensor):
    """(high, low) 32-bit words of a * b for a uint32 constant a and uint32 words b, in int64
    without overflow: b split in 16-bit halves keeps every product under 2^48."""
    p1 = a * (b >> 16)
    p0 = a * (b & 0xFFFF)
    return (p1 + (p0 >> 16)) >> 16, (((p1 & 0xFFFF) << 16) + p0) & _M32


def uniform_torch(seed: int, n: int, device=None) -> torch.Tensor:
    """n fp32 numbers in [0, 1): element i is Triton's tl.rand(seed, i), computed in torch."""
    c0 = torch.arange(n, dtype=torch.int64, device=device)
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    w = torch.where(c0 >= 1 << 31, c0 - (1 << 32), c0)        # the word as an int32
    w = torch.where(w < 0, -w - 1, w)
    return w.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32, device=device)


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit(do_not_specialize=["seed"])       # one variant for every step's seed
        def lmc_uniform(out_ptr, seed: tl.int64, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(out_ptr + offs, tl.rand(seed, offs), mask=offs < n)
        _KERNEL = lmc_uniform
    return _KERNEL


def uniform_triton(seed: int, n: int, device) -> torch.Tensor:
    """The same numbers drawn by one Triton kernel (CUDA, or Triton's interpreter)."""
    import triton

    out = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        block = 1024
        _kernel()[(triton.cdiv(n, block),)](out, seed, n, BLOCK=block)
    return out


def uniform(seed: int, n: int, device=None) -> torch.Tensor:
    """n fp32 numbers in [0, 1), element i = tl.rand(seed, i): a Triton kernel on CUDA, torch
    elsewhere; the same bits either way."""
    if n >= 1 << 31:
        raise ValueError(f"a random draw of {n} numbers: at most 2^31 - 1 (int32 counters)")
    if not 0 <= seed < 1 << 63:
        raise ValueError(f"random seed {seed} must be in [0, 2^63)")
    if device is not None and torch.device(device).type == "cuda":
        return uniform_triton(seed, n, device)
    return uniform_torch(seed, n, device)
