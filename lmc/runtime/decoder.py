"""Generation: prefill and single-token steps over the decode pass's step graph.

    dec = Decoder(model)                         # model: an LmcModel (weights are shared)
    state = dec.init_state(batch=1)
    logits, state = dec(prompt_ids, state)       # prefill: the whole prompt in parallel form
    logits, state = dec(next_id[:, None], state) # then one token at a time

The state is a dict of tensors named after where they come from (``layers.0.attn.k.cache``);
the number of past tokens is held by the state object (`past`) and checked against the
caches' lengths.

Static mode, for GPUs: ``Decoder(model, static=True, max_len=N)`` runs the static step graph
(`decode_step(..., static=True)`): every cache is allocated once at N slots (default: the
model's max_seq) by `init_state`, the step writes the new tokens' K/V in place at their
positions (`index_copy_`, the positions a tensor input) and masks the slots not yet written,
so no tensor shape changes from token to token. The state's tensors are updated in place and
the call returns the same state object. Slots never written hold zeros from `init_state` and
are masked; they must stay finite (the masked attention weights are exactly 0, and 0 * NaN
would still be NaN).

On CUDA the single-token step (T = 1) is then captured in a CUDA graph per state, on its
first call (that call runs eagerly on a side stream, which is the warm-up), and replayed:
the ids and the position are copied into static input buffers, the graph replays, the logits
are copied out. Where capture is not possible (a CPU device, the triton backend in Triton's
interpreter, or capture raising) the static step runs eagerly: `cuda_graph` is False and
`cuda_graph_off` says why, printed once to stderr when a step first falls back.
"""
from __future__ import annotations

import math
import sys
from typing import Iterator, Optional, Sequence, Tuple

import torch

from ..errors import LmcError
from ..ir.ops import Op
from ..ops.reference import REFERENCE, RefCtx
from ..passes.decode import StepGraph, decode_step
from .executor import bind_dims, run_graph
from .positions import Tables


class State(dict):
    """The decode state: tensors by name, how many tokens it has seen, and the decoder that
    made it (a state's layout is its decoder's: static or not, max_len)."""
    past: int = 0
    owner: Optional[tuple] = None
    batch: Optional[int] = None


def _index_copy_inplace(ctx, xs, attrs):
    """The static step's cache write, in place: the decoder owns the cache buffers and the
    graph reads the cache only through this node (checked when the Decoder is built)."""
    return xs[0].index_copy_(attrs["axis"], xs[1], xs[2])


class _Captured:
    """One CUDA graph of the T = 1 step with its static input and output buffers."""

    def __init__(self, graph, ids, past, logits):
        self.graph, self.ids, self.past, self.logits = graph, ids, past, logits


class Decoder:
    def __init__(self, model, backend: Optional[str] = None, *, static: bool = False,
                 max_len: Optional[int] = None, cuda_graph: Optional[bool] = None):
        """static: preallocated caches and in-place writes (see the module docstring);
        max_len: their length (static only; default the model's max_seq); cuda_graph: capture
        and replay the T = 1 step (static only; default: on where possible)."""
        from .module import LmcModel
        if not isinstance(model, LmcModel):
            raise LmcError(f"Decoder takes a model from lmc.load (an LmcModel), got "
                           f"{type(model).__name__}")
        if not isinstance(static, bool):
            raise LmcError(f"Decoder: static must be True or False, got {static!r}")
        self.model = model
        self.static = bool(static)
        self.max_seq = model.config.get("max_seq")
        if not self.static and (max_len is not None or cuda_graph):
            raise LmcError("max_len and cuda_graph apply to the static decoder (static=True)")
        self.step: StepGraph = decode_step(model.graph, static=self.static)
        self.tables = Tables(self.step.aux)   # the position inputs: one kernel on a GPU
        self.backend = backend or getattr(model, "backend", "torch")
        if self.backend not in ("torch", "triton"):
            raise LmcError(f"unknown backend {self.backend!r} (available: torch, triton)")
        self.graph = self.step.graph
        self.impl = None
        self.interpret = False
        self.program = None
        if self.backend == "triton":
            from ..codegen.program import apply_decode_patterns
            from .triton_backend import TritonProgram
            # the step's attention over the cache as one flash-decoding op, its decayed linear
            # attention as one recurrent-step op, its MoE layers routed (the step graph keeps
            # the primitives: the torch backend runs them as the oracle); in the static step
            # the kernels that compute new keys and values store them into the caches
            # (fuse_cache_writes)
            disable = tuple(getattr(model, "disable", ()))
            prog = TritonProgram(apply_decode_patterns(self.graph, disable), disable,
                                 label="decode step", cache_writes=self.static, decode=True)
            self.graph, self.impl, self.interpret = prog.graph, prog.impl, prog.interpret
            self.program = prog
        self.token_input = self.graph.inputs[0].attrs["name"]
        self.max_len = None
        self.cuda_graph, self.cuda_graph_off = False, None
        if self.static:
            self.max_len = self._max_len(max_len)
            self._check_in_place()
            self._consts = {}
            self.impl = {**(self.impl or {}), Op.INDEX_COPY: _index_copy_inplace,
                         Op.CONST: self._const}
            self.cuda_graph, self.cuda_graph_off = self._graph_plan(cuda_graph)
        self._told = False

    # -- setup ---------------------------------------------------------------------------
    def _max_len(self, max_len) -> int:
        if max_len is None:
            if self.max_seq is None:
                raise LmcError("a static decoder needs max_len: the model sets no max_seq")
            return int(self.max_seq)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise LmcError(f"max_len must be a positive integer, got {max_len!r}")
        if self.max_seq is not None and max_len > self.max_seq:
            raise LmcError(f"max_len {max_len} exceeds the model's max_seq {self.max_seq}")
        return max_len

    def _check_in_place(self) -> None:
        """Writing a cache in place is sound only if nothing else reads the cache input."""
        users = {}
        for n in self.graph.nodes:
            for x in n.inputs:
                users.setdefault(x, []).append(n)
        for n in self.graph.nodes:
            if n.op is Op.INDEX_COPY:
                cache = n.inputs[0]
                if cache.op is not Op.INPUT or users.get(cache) != [n]:
                    raise LmcError("internal: a static cache is read besides its in-place "
                                   "write", n.loc)

    def _graph_plan(self, wanted: Optional[bool]):
        """(whether to capture the T = 1 step, why not). cuda_graph=True asks for it: where
        it cannot be (not on CUDA, the interpreter) that is an error, not a quiet fallback."""
        if wanted is False:
            return False, "turned off (cuda_graph=False)"
        device = next(self.model.parameters()).device
        why = None
        if device.type != "cuda":
            why = f"the model is on {device.type}; CUDA graphs need a CUDA device"
        elif self.interpret:
            why = "the triton backend runs its kernels in Triton's interpreter"
        if why and wanted:
            raise LmcError(f"cuda_graph=True, but {why} (cuda_graph=None captures where it "
                           "can)")
        return why is None, why

    def _const(self, ctx, xs, attrs):
        """Constants are made once per size: creating a tensor from Python values copies from
        the host, which a CUDA graph cannot capture."""
        key = (id(attrs), str(ctx.device), tuple(sorted(ctx.dims.items())))
        got = self._consts.get(key)
        if got is None:
            got = self._consts[key] = REFERENCE[Op.CONST](ctx, xs, attrs)
        return got

    def init_state(self, batch: int = 1, device=None) -> State:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise LmcError(f"init_state: batch must be a positive integer, got {batch!r}")
        device = device or next(self.model.parameters()).device
        st = State()
        shapes = [(s, s.concrete(batch, 0, self.max_len or 0)) for s in self.step.states]
        try:
            for s, shape in shapes:
                st[s.name] = torch.zeros(shape, dtype=s.dtype.torch(), device=device)
        except (RuntimeError, MemoryError) as e:    # (torch.OutOfMemoryError included)
            if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and \
                    "alloc" not in str(e).lower():
                raise                  # (an earlier asynchronous CUDA error, say)
            st.clear()
            need = sum(math.prod(shape) * s.dtype.torch().itemsize for s, shape in shapes)
            raise LmcError(f"the decode state for batch {batch}"
                           + (f" and max_len {self.max_len}" if self.static else "")
                           + f" needs {need / 2 ** 30:.2f} GiB on {device}, which could not "
                           f"be allocated ({(str(e).strip().splitlines() or [''])[0][:120]})"
                           ) from None
        st.past = 0
        st.owner = self._layout()
        st.batch = batch
        return st

    def _layout(self) -> tuple:
        """What a state must match: this step's states and, static, the caches' length."""
        return (self.static, self.max_len if self.static else None,
                tuple(s.name for s in self.step.states))

    # -- steps ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        """Logits [B, T, V] for the T new tokens `ids` [B, T], and the advanced state (in
        static mode: the same state object, updated in place)."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise LmcError("decode takes integer token ids shaped [B, T], got "
                           + (f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor)
                              else type(ids).__name__))
        if not isinstance(state, State):
            raise LmcError(f"decode takes a State (Decoder.init_state), got "
                           f"{type(state).__name__}")
        if state.owner != self._layout():
            raise LmcError("this state was made by another decoder (static or not, or another "
                           "max_len): use this decoder's init_state")
        if state.batch is not None and ids.shape[0] != state.batch:
            raise LmcError(f"the ids hold {ids.shape[0]} sequence(s) but the state was made "
                           f"for {state.batch}: init_state({ids.shape[0]})")
        end = state.past + ids.shape[1]
        if ids.shape[1] == 0:     # no new token (an empty prompt's prefill): no step
            lt = self.step.graph.outputs[self.step.logits].type
            vocab = lt.shape[-1]
            return torch.empty((ids.shape[0], 0, vocab), dtype=lt.dtype.torch(),
                               device=ids.device), state
        if self.static and end > self.max_len:
            raise LmcError(f"context of {end} tokens exceeds the static decoder's max_len "
                           f"{self.max_len}")
        if self.max_seq is not None and end > self.max_seq:
            raise LmcError(f"context of {end} tokens exceeds the model's max_seq {self.max_seq}")
        if not self.static:
            return self._dynamic(ids, state)
        if ids.shape[1] == 1 and self.cuda_graph:
            logits = self._replay(ids, state)
        else:
            if ids.shape[1] == 1:
                self._tell()
            past = torch.tensor([state.past], dtype=torch.int64, device=ids.device)
            logits = self._static(ids, state, past)
        state.past = end
        return logits, state

    def _bind(self, ids, state, past):
        bound = dict(self.model.named_parameters())
        bound[self.token_input] = ids
        bound.update(state)
        bound.update(self.tables(past, ids.shape[1]))
        return bound

    def _dynamic(self, ids, state):
        past = torch.tensor([state.past], dtype=torch.int64, device=ids.device)
        bound = self._bind(ids, state, past)
        dims = bind_dims(self.graph, bound)
        if dims.setdefault("P", state.past) != state.past:
            raise LmcError(f"the state's caches hold {dims['P']} positions but it has seen "
                           f"{state.past} tokens")
        ctx = RefCtx(dims=dims, device=ids.device, training=False)
        self._warm(bound, ctx, state)
        outs = run_graph(self.graph, bound, ctx, self.impl)
        new = State({s.name: outs[s.out] for s in self.step.states})
        new.past = state.past + ids.shape[1]
        new.owner, new.batch = state.owner, state.batch
        return outs[self.step.logits], new

    def _static(self, ids, state, past):
        """One static step: caches written in place, the other states copied back into their
        buffers, so every state tensor keeps its storage (what a CUDA graph replays on)."""
        bound = self._bind(ids, state, past)
        dims = bind_dims(self.graph, bound)
        ctx = RefCtx(dims=dims, device=ids.device, training=False)
        self._warm(bound, ctx, state)
        outs = run_graph(self.graph, bound, ctx, self.impl)
        for s in self.step.states:
            new, buf = outs[s.out], state[s.name]
            if new is not buf:
                buf.copy_(new)
        return outs[self.step.logits]

    def _warm(self, bound, ctx, state) -> None:
        """On a GPU, before the step first runs with new sizes: compile its kernels together
        (codegen/warm.py; the past length P, new every dynamic step, is not a new size). A
        prefill takes its T = 1 step into the same pass, on the state it leaves (meta): the
        first token follows the prefill at once, and its compiles would stall the stream."""
        from ..codegen import warm
        if self.program is None or not warm.wanted(self.program, ctx, ignore=("P",)):
            return
        step = None
        if ctx.dims.get("T") != 1:
            step = RefCtx(dims={**ctx.dims, "T": 1}, device=ctx.device, training=False)
            if not warm.wanted(self.program, step, ignore=("P",)):
                step = None

        def run(c, b):
            return run_graph(self.graph, b, c, self.impl)

        def step_inputs(outs):
            after = state if self.static else \
                State({s.name: outs[s.out] for s in self.step.states})
            ids = torch.empty(bound[self.token_input].shape[0], 1, dtype=torch.int64,
                              device="meta")
            b = self._bind(ids, after, torch.zeros(1, dtype=torch.int64, device="meta"))
            return b, RefCtx(dims=bind_dims(self.graph, b), device=ctx.device)
        with warm.WarmPass() as w:
            outs = w.program(self.program, bound, ctx, run=run)
            if step is not None:
                w.follow(self.program, warm.dims_key(step, ("P",)), outs, step_inputs,
                         run=run)

    def _replay(self, ids, state):
        cap = getattr(state, "captured", None)
        if cap is None:
            return self._capture(ids, state)
        cap.ids.copy_(ids)
        cap.past.fill_(state.past)
        cap.graph.replay()
        return cap.logits.clone()

    def _capture(self, ids, state):
        """Run this step eagerly on a side stream (the warm-up), then capture the same step
        reading the static buffers; the captured graph first runs at the next step."""
        ids_buf = ids.clone()
        past_buf = torch.tensor([state.past], dtype=torch.int64, device=ids.device)
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            logits = self._static(ids_buf, state, past_buf).clone()
        torch.cuda.current_stream(ids.device).wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                out = self._static(ids_buf, state, past_buf)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            torch.cuda.synchronize(ids.device)
            first = (str(e).strip().splitlines() or [""])[0]
            self.cuda_graph = False
            self.cuda_graph_off = f"capture failed ({type(e).__name__}: {first})"
            self._tell()
            return logits
        state.captured = _Captured(graph, ids_buf, past_buf, out)
        return logits

    def _tell(self) -> None:
        if not self._told and self.cuda_graph_off and not self.cuda_graph_off.startswith(
                "turned off"):
            print(f"lmc: CUDA graph off: {self.cuda_graph_off}; the static step runs eagerly",
                  file=sys.stderr)
        self._told = True

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 vocab: Optional[int] = None, exclude: Sequence[int] = ()) -> Iterator[int]:
        """Yield new token ids for one prompt [T] (prefill, then one step per token). The
        arguments are checked at the call, before the first token is asked for. `vocab`:
        sample among the ids below it only (a tokenizer smaller than the model's vocabulary,
        whose ids past it decode to nothing); `exclude`: ids never sampled (a tokenizer's
        unassigned ids and special tokens)."""
        for name, v, ok in (("max_new_tokens", max_new_tokens, lambda v: v >= 0),
                            ("vocab", 1 if vocab is None else vocab, lambda v: v >= 1),
                            ("temperature", temperature, lambda v: v >= 0),   # nan: refused
                            ("top_k", top_k, lambda v: v >= 0),
                            ("top_p", top_p, lambda v: 0 < v <= 1),
                            ("seed", seed, lambda v: 0 <= v < 2 ** 64)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v) or (
                    name in ("max_new_tokens", "top_k", "seed", "vocab")
                    and not isinstance(v, int)):
                raise LmcError(f"generate: bad {name}={v!r}")
        if not isinstance(prompt, torch.Tensor):
            raise LmcError(f"generate: the prompt must be a 1-D tensor of token ids, got "
                           f"{type(prompt).__name__}")
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise LmcError(f"generate: the prompt must be a non-empty 1-D tensor of token ids, "
                           f"got shape {list(prompt.shape)}")
        end = prompt.numel() + max_new_tokens
        for limit, what in ((self.max_seq, "the model's max_seq"),
                            (self.max_len if self.static else None, "the decoder's max_len")):
            if limit is not None and end > limit + 1:  # the last token is never fed back
                raise LmcError(f"generate: the prompt ({prompt.numel()} tokens) + "
                               f"{max_new_tokens} new ones exceed {what} {limit}")
        width = self.step.graph.outputs[self.step.logits].type.shape[-1]
        if vocab is not None:
            width = min(vocab, width) if isinstance(width, int) else vocab
        exclude = sorted({int(i) for i in exclude
                          if int(i) >= 0 and (not isinstance(width, int) or int(i) < width)})
        if isinstance(width, int) and len(exclude) >= width:
            raise LmcError("generate: exclude leaves no token to sample")
        # the state is made at the call (held until the generator goes): one that cannot be
        # allocated is an error before any token
        state = self.init_state(1, prompt.device)
        return self._generate(prompt, max_new_tokens, temperature, top_k, top_p, seed, vocab,
                              exclude, state)

    def _generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, vocab=None,
                  exclude=(), state=None):
        gen = torch.Generator(device=prompt.device).manual_seed(seed)
        state = state if state is not None else self.init_state(1, prompt.device)
        ids = prompt.reshape(1, -1)
        banned = torch.tensor(exclude, dtype=torch.int64, device=prompt.device)
        for _ in range(max_new_tokens):
            logits, state = self(ids, state)
            row = logits[0, -1, :vocab].float()
            if len(exclude):
                row = row.index_fill(0, banned, float("-inf"))
            tok = sample(row, temperature, top_k, top_p, gen)
            yield tok
            ids = torch.tensor([[tok]], device=prompt.device)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           gen: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / temperature) cut to the top-k
    tokens and to the smallest set whose probability reaches top_p."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    # in fp64 and relative to the largest logit: a tiny temperature sends the others to
    # -inf (greedy, in the limit) instead of overflowing to inf - inf = nan
    logits = logits.double()
    # (an excluded id's -inf stays -inf: -inf / inf would be nan)
    logits = torch.where(logits == float("-inf"), logits, (logits - logits.max()) / temperature)
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
