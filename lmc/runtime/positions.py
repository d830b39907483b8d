"""The decode step's position tables, one small kernel per ring size on a GPU.

The decode pass (lmc/passes/decode.py) lists the i64 inputs a step reads besides the ids and
the state as functions of (P, T) (`StepGraph.aux`): `decode.pos` (P .. P + T - 1) and, per
sliding-window size W, `decode.ringW.keys` (the positions of [W ring slots | T new keys]) and
`decode.ringW.src` (for each slot, where its next content sits in [ring | new]). Their torch
forms are a dozen small ops each (aranges, remainders, a cat, a where), every one a launch
inside the captured step: 23 for one ring, 2 for `decode.pos` alone. `Tables` computes the
same values on a CUDA device with `_tables`, one program per block of slots reading P from
the device (so a captured CUDA graph replays at new positions): one launch for `decode.pos`
and the first ring's tables, one more per further ring size. Other devices (CPU, the meta
tensors of the warm pass) and unknown names run the torch functions. The kernel is checked
against them in Triton's interpreter (tests/runtime/test_positions.py).
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List

import torch
import triton
import triton.language as tl

POS = "decode.pos"
_RING = re.compile(r"decode\.ring(\d+)\.(keys|src)$")


@triton.jit
def _tables(P_ptr, POS_OUT, KEYS, SRC, T, W, HAS_POS: tl.constexpr, HAS_RING: tl.constexpr,
            BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    P = tl.load(P_ptr)
    if HAS_POS:
        tl.store(POS_OUT + i, P + i, mask=i < T)
    if HAS_RING:
        # slot j holds the latest position below P that is j mod W (negative: never written);
        # Triton's % keeps the dividend's sign, so the remainder is made non-negative first
        a = P - 1 - i
        held = (P - 1) - ((a % W) + W) % W
        tl.store(KEYS + i, tl.where(i < W, held, P + i - W), mask=i < W + T)
        # slot j's next content: the newest position j mod W below P + T, taken from the new
        # keys (index W + its offset) when it is one of them, else the slot itself
        b = P + T - 1 - i
        latest = (P + T - 1) - ((b % W) + W) % W
        tl.store(SRC + i, tl.where(latest >= P, W + latest - P, i), mask=i < W)


class Tables:
    """Computes a step's aux inputs: `Tables(step.aux)(P, T) -> {name: tensor}` with P a
    1-element i64 tensor on the step's device."""

    def __init__(self, aux: Dict[str, Callable]):
        self.aux = dict(aux)
        self.rings: List[int] = sorted({int(m.group(1)) for m in map(_RING.match, aux) if m})
        self.kernel_names = {POS} | {f"decode.ring{w}.{k}" for w in self.rings
                                     for k in ("keys", "src")}

    def launches(self) -> int:
        """The launches computing the tables on a GPU (the step's position ops)."""
        n = len(self.rings) or (1 if POS in self.aux else 0)
        return n + sum(_torch_ops(fn) for name, fn in self.aux.items()
                       if name not in self.kernel_names)

    def __call__(self, P: torch.Tensor, T: int) -> Dict[str, torch.Tensor]:
        if P.device.type != "cuda" or _interpreting():
            return {k: fn(P, T) for k, fn in self.aux.items()}
        return self.kernel(P, T)

    def kernel(self, P: torch.Tensor, T: int) -> Dict[str, torch.Tensor]:
        """The tables from `_tables` (on any device Triton runs on: in the interpreter too)."""
        out: Dict[str, torch.Tensor] = {}
        dev = P.device
        pos = torch.empty(T, dtype=torch.int64, device=dev) if POS in self.aux else None
        if pos is not None:
            out[POS] = pos
        block = 1024
        if not self.rings and pos is not None and T:
            _tables[(triton.cdiv(T, block),)](P, pos, pos, pos, T, 1, HAS_POS=True,
                                              HAS_RING=False, BLOCK=block)
        for j, w in enumerate(self.rings):
            keys = torch.empty(w + T, dtype=torch.int64, device=dev)
            src = torch.empty(w, dtype=torch.int64, device=dev)
            first = j == 0 and pos is not None and T > 0
            _tables[(triton.cdiv(w + T, block),)](P, pos if first else keys, keys, src, T, w,
                                                  HAS_POS=first, HAS_RING=True, BLOCK=block)
            for k, v in (("keys", keys), ("src", src)):
                if f"decode.ring{w}.{k}" in self.aux:
                    out[f"decode.ring{w}.{k}"] = v
        for k, fn in self.aux.items():
            if k not in out:
                out[k] = fn(P, T)
        return out


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def _torch_ops(fn: Callable) -> int:
    """The torch ops (each a launch on a GPU) `fn(P, T)` runs, counted on meta tensors."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    P = torch.zeros(1, dtype=torch.int64, device="meta")
    with Count():
        fn(P, 1)
    return Count.n
