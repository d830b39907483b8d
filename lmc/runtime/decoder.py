"""Generation: prefill and single-token steps over the decode pass's step graph.

    dec = Decoder(model)                         # model: an LmcModel (weights are shared)
    state = dec.init_state(batch=1)
    logits, state = dec(prompt_ids, state)       # prefill: the whole prompt in parallel form
    logits, state = dec(next_id[:, None], state) # then one token at a time

The state is a dict of tensors named after where they come from (``layers.0.attn.cache``);
`state["P"]`-style bookkeeping is not needed: the number of past tokens is held by the
Decoder per state object (`past`), and checked against the caches' lengths.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from ..errors import LmcError
from ..ops.reference import RefCtx
from ..passes.decode import StepGraph, decode_step
from .executor import bind_dims, run_graph


class State(dict):
    """The decode state: tensors by name, and how many tokens it has seen."""
    past: int = 0


class Decoder:
    def __init__(self, model, backend: Optional[str] = None):
        self.model = model
        self.step: StepGraph = decode_step(model.graph)
        self.backend = backend or getattr(model, "backend", "torch")
        self.graph = self.step.graph
        self.impl = None
        if self.backend == "triton":
            from .triton_backend import TritonProgram
            prog = TritonProgram(self.graph)
            self.graph, self.impl = prog.graph, prog.impl
        self.token_input = self.graph.inputs[0].attrs["name"]
        self.max_seq = model.config.get("max_seq")

    def init_state(self, batch: int = 1, device=None) -> State:
        device = device or next(self.model.parameters()).device
        st = State()
        for s in self.step.states:
            st[s.name] = torch.zeros(s.concrete(batch), dtype=s.dtype.torch(), device=device)
        st.past = 0
        return st

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        """Logits [B, T, V] for the T new tokens `ids` [B, T], and the advanced state."""
        if ids.dim() != 2:
            raise LmcError(f"decode takes token ids shaped [B, T], got {list(ids.shape)}")
        if self.max_seq is not None and state.past + ids.shape[1] > self.max_seq:
            raise LmcError(f"context of {state.past + ids.shape[1]} tokens exceeds the model's "
                           f"max_seq {self.max_seq}")
        bound = dict(self.model.named_parameters())
        bound[self.token_input] = ids
        bound.update(state)
        past = torch.tensor([state.past], dtype=torch.int64, device=ids.device)
        bound.update({k: fn(past, ids.shape[1]) for k, fn in self.step.aux.items()})
        dims = bind_dims(self.graph, bound)
        if dims.setdefault("P", state.past) != state.past:
            raise LmcError(f"the state's caches hold {dims['P']} positions but it has seen "
                           f"{state.past} tokens")
        ctx = RefCtx(dims=dims, device=ids.device, training=False)
        outs = run_graph(self.graph, bound, ctx, self.impl)
        new = State({s.name: outs[s.out] for s in self.step.states})
        new.past = state.past + ids.shape[1]
        return outs[self.step.logits], new

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
        """Yield new token ids for one prompt [T] (prefill, then one step per token)."""
        gen = torch.Generator(device=prompt.device).manual_seed(seed)
        state = self.init_state(1, prompt.device)
        ids = prompt.reshape(1, -1)
        for _ in range(max_new_tokens):
            logits, state = self(ids, state)
            tok = sample(logits[0, -1].float(), temperature, top_k, top_p, gen)
            yield tok
            ids = torch.tensor([[tok]], device=prompt.device)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           gen: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / temperature) cut to the top-k
    tokens and to the smallest set whose probability reaches top_p."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # the first token always stays
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))
