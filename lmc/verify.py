"""`lmc verify`: the invariants every architecture must hold, checked on random weights.

Each check compares the compiled program with the oracle — the source graph (before any
pass) run op by op in torch and differentiated by torch autograd — or tests a property of
the model itself. A check that raises is a failure with its one-line reason; the others
still run. Later issues append checks to CHECKS (decode = forward).

The weights (`Subject.model`, shared by the oracle): the model's own init, then
`off_default` (constant-initialised parameters, biases and norm weights, moved off their
constant) and `unit_scale` (every projection matrix drawn from a normal init re-drawn at
N(0, 1/fan_in), embedding tables at N(0, 1)), so attention scores are O(1) and the scores'
ops (RoPE, scale, soft cap, masks) move the logits; MoE routers, vectors and parameters with
a uniform, orthogonal or constant init keep the model's values. An untied logits head is then
scaled down where the largest logit exceeds LOGIT_BOUND (a model without norms grows its
activations at unit scale), which keeps decode = forward's absolute tolerance meaningful.
Deterministic from the seed.

    rows = verify("zoo/llama.yaml")            # the file's tiny preset
    all(r.ok for r in rows)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import InterpreterBf16Error, LmcError, UsageError
from .ir.ops import Kind, Op
from .passes.loss import logits_vocab


@dataclass
class Row:
    check: str
    ok: bool
    detail: str
    skipped: bool = False

    @property
    def result(self) -> str:
        return "skip" if self.skipped else "pass" if self.ok else "FAIL"


@dataclass
class Subject:
    """What the checks share: the compiled model, its oracle, and test inputs."""
    path: str
    preset: Optional[str]
    overrides: Sequence[str]
    compiled: object
    vocab: int
    ids: torch.Tensor
    seed: int

    def model(self, *, autodiff: str = "lmc", backend: str = "torch"):
        """The compiled model holding verify's weights: its own init, then `off_default`
        (constants perturbed) and `unit_scale` (projections and embeddings re-drawn at unit
        scale, an untied logits head scaled down to LOGIT_BOUND)."""
        from .runtime.module import LmcModel
        m = LmcModel(self.compiled.graph, seed=self.seed, autodiff=autodiff, backend=backend)
        off_default(m, self.seed)
        roles, head = self._roles()
        unit_scale(m, self.seed, roles)
        if head is not None:
            factor = self._head_factor(head)
            if factor < 1.0:
                with torch.no_grad():
                    m.get_parameter(head).mul_(factor)
        return m

    def _roles(self) -> Tuple[Dict[str, str], Optional[str]]:
        got = getattr(self, "_roles_cache", None)
        if got is None:
            from .passes.basic import inline
            g = inline(self.compiled.source)
            got = self._roles_cache = (param_roles(g), logits_head(g))
        return got

    def _head_factor(self, head: str) -> float:
        """What scales the head so the largest logit on `ids` (eval forward, torch backend)
        is at most LOGIT_BOUND: 1 when it is already."""
        f = getattr(self, "_head_factor_cache", None)
        if f is None:
            from .runtime.module import LmcModel
            m = LmcModel(self.compiled.graph, seed=self.seed)
            off_default(m, self.seed)
            unit_scale(m, self.seed, self._roles()[0])
            with torch.no_grad():
                top = _outputs(m.eval(), self.ids)["logits"].abs().max().item()
            f = self._head_factor_cache = min(1.0, LOGIT_BOUND / top) if top > 0 else 1.0
        return f

    def oracle(self):
        """The source graph with blocks spliced in and no other pass, run op by op and
        differentiated by torch autograd, holding the compiled model's weights."""
        from .passes.basic import inline
        from .runtime.module import LmcModel
        ref = LmcModel(inline(self.compiled.source), seed=self.seed, autodiff="torch")
        missing, unexpected = ref.load_state_dict(self.model().state_dict(), strict=False)
        if unexpected:
            raise LmcError(f"the passes invented parameters: {', '.join(unexpected[:3])}")
        return ref  # "missing": parameters the passes removed as unused keep their init


def off_default(model, seed: int) -> None:
    """Parameters whose init is a constant (zeros: biases, sinks, selection biases; ones: norm
    weights) get noise of a tenth of |c|, of 1 for zeros (so a positive constant, a variance a
    model takes the log or root of, stays positive): a check on their init value would not
    see a kernel that drops a bias or a norm weight, or a branch only a non-zero value
    takes."""
    gen = torch.Generator().manual_seed(seed + 7)
    inits = {p.attrs["name"]: p.attrs["init"] for p in model.graph.params}
    with torch.no_grad():
        for name, t in model.named_parameters():
            init = inits.get(name)
            if init is None or init.kind not in ("zeros", "ones", "constant"):
                continue
            c = {"zeros": 0.0, "ones": 1.0}[init.kind] if not init.args else init.args[0]
            t.add_(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype),
                   alpha=0.1 * (abs(c) if c else 1.0))


def param_roles(graph) -> Dict[str, str]:
    """What `unit_scale` does with each parameter of `graph` (the source graph, blocks
    spliced in): "table" for an embedding table (the table an embedding op reads), "router"
    for a matrix whose product reaches a top-k before any other matmul (an MoE router: its
    scale is the model's routing, left as it is), "projection" for any other matrix or
    stack of matrices (2-D or more) drawn from a normal init; the rest are not named."""
    users = graph.users()
    roles: Dict[str, str] = {}
    for p in graph.params:
        name, init = p.attrs["name"], p.attrs["init"]
        if len(p.type.shape) < 2 or init.kind != "normal" or not init.args[0] > 0:
            continue
        if any(u.op is Op.EMBEDDING and u.inputs[0] is p for u in users.get(p, ())):
            roles[name] = "table"
            continue
        seen, todo, router = set(), [(p, 0)], False
        while todo and not router:
            n, matmuls = todo.pop()
            for u in users.get(n, ()):
                m = matmuls + (u.op is Op.MATMUL)
                if u.op is Op.TOPK:
                    router = True
                elif m <= 1 and u not in seen:
                    seen.add(u)
                    todo.append((u, m))
        roles[name] = "router" if router else "projection"
    return roles


# the largest logit verify's weights give (on its ids): an untied head larger than this is
# scaled down, so DECODE_TOL (absolute) stays 1e-5 of the largest logit, FWD_TOL
LOGIT_BOUND = 10.0


def logits_head(graph) -> Optional[str]:
    """The parameter W of an untied logits head, logits = f(x @ W) with f ops of one
    tensor input (a soft cap, a cast) and W (or a view of it) read by nothing else: scaling
    it scales the logits alone. None for a tied head (an embedding table) or another form."""
    n = graph.outputs.get("logits")
    users = graph.users()

    def one_input(node):
        ins = [i for i in node.inputs if i.op is not Op.CONST]
        return ins[0] if len(ins) == 1 else None

    while n is not None and n.op is not Op.MATMUL:
        n = one_input(n) if n.op not in (Op.PARAM, Op.INPUT) else None
    if n is None:
        return None
    w = n.inputs[1]
    while w.op.kind is Kind.VIEW and len(users.get(w, ())) == 1:
        w = one_input(w)
        if w is None:
            return None
    if w.op is not Op.PARAM or len(users.get(w, ())) != 1:
        return None
    return w.attrs["name"]


def unit_scale(model, seed: int, roles: Dict[str, str]) -> None:
    """Re-draw every projection at unit scale, N(mean, 1 / fan_in) with fan_in the
    weight's input size (lmc stores weights [in, out], y = x @ W: fan_in is shape[-2]), and
    every embedding table at N(mean, 1) (the roles of `param_roles`): at the models' own
    small inits (N(0, 0.02)) attention scores are near 0 and its softmax near uniform, so a
    kernel that computes the scores wrong (RoPE, the mask, the scale) barely moves the
    logits; a model without norms has scores ~1e-5 and a check of them cannot fail. At unit
    scale the scores are O(1) and every op moves the outputs. Left as they are: MoE routers
    (their scale is the routing), vectors (norm gains, biases: `off_default`'s) and
    parameters with a specific init (uniform: decay rates, dt biases, convolution taps,
    mixing coefficients; orthogonal; constants). Deterministic from the seed."""
    gen = torch.Generator().manual_seed(seed + 11)
    inits = {p.attrs["name"]: p.attrs["init"] for p in model.graph.params}
    with torch.no_grad():
        for name, t in model.named_parameters():
            role = roles.get(name)
            if role not in ("table", "projection") or name not in inits:
                continue
            mean = (inits[name].args + (0.0,))[1]
            std = 1.0 if role == "table" else t.shape[-2] ** -0.5
            t.copy_((mean + std * torch.randn(t.shape, generator=gen,
                                              dtype=torch.float64)).to(t.dtype))


def _outputs(model, ids) -> Dict[str, torch.Tensor]:
    out = model(ids)
    return out if isinstance(out, dict) else {"logits": out}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (1 when b is all zeros); inf on NaN/inf."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    scale = max(b.abs().max().item(), 1e-30) if b.numel() else 1.0
    return (a - b).abs().max().item() / scale if b.numel() else 0.0


FWD_TOL = 1e-5    # fp32, relative to the largest output: reassociation-level differences only
GRAD_TOL = 1e-4   # fp32 gradients through a whole model, relative per parameter


def _compare_outputs(got, ref) -> float:
    worst = 0.0
    for name, r in ref.items():
        if not r.is_floating_point():
            if not torch.equal(got[name], r):
                return float("inf")
            continue
        worst = max(worst, _max_rel(got[name].float(), r.float()))
    return worst


def check_passes(s: Subject) -> Row:
    """The optimised graph computes what the source graph computes (eval mode)."""
    m, o = s.model().eval(), s.oracle().eval()
    with torch.no_grad():
        d = _compare_outputs(_outputs(m, s.ids), _outputs(o, s.ids))
    from .passes.basic import inline
    return Row("passes = oracle", d <= FWD_TOL,
               f"{len(inline(s.compiled.source).nodes)} -> {len(s.compiled.graph.nodes)} nodes; "
               f"max rel diff {d:.1e} (tol {FWD_TOL:.0e})")


def _in_place(n: int) -> str:
    return f", {n} state{'s' if n > 1 else ''} updated in place" if n else ""


def check_causal(s: Subject) -> Row:
    """Perturbing token t+1 leaves every output at positions <= t unchanged, and changes t+1;
    the first t+1 tokens alone give the same logits there (a model reading the length T,
    a mean over the whole sequence say, passes the first test and fails this one)."""
    m = s.model().eval()
    T = s.ids.shape[1]
    ts = sorted({0, T // 2 - 1, T - 2} - {-1})
    worst, short = 0.0, []
    with torch.no_grad():
        base = _outputs(m, s.ids)["logits"]
        for t in ts:
            ids = s.ids.clone()
            ids[:, t + 1] = (ids[:, t + 1] + 1 + torch.arange(ids.shape[0])) % s.vocab
            out = _outputs(m, ids)["logits"]
            leak = (out[:, : t + 1] - base[:, : t + 1]).abs().max().item()
            if leak != 0.0:
                return Row("causal", False, f"changing token {t + 1} moved logits at positions "
                           f"<= {t} by up to {leak:.2e}")
            if torch.equal(out[:, t + 1], base[:, t + 1]):
                return Row("causal", False, f"changing token {t + 1} left its own logits "
                           "unchanged: the model ignores its input")
        for t in ts:
            try:
                pre = _outputs(m, s.ids[:, : t + 1])["logits"]
            except (LmcError, RuntimeError):   # a model that needs more tokens (a pad of s
                short.append(t + 1)            # positions wider than the sequence)
                continue
            d = _max_rel(pre, base[:, : t + 1])
            worst = max(worst, d)
            if d > FWD_TOL:
                return Row("causal", False, f"the first {t + 1} tokens alone gave other logits "
                           f"at positions <= {t} than the whole sequence (max rel diff "
                           f"{d:.1e}, tol {FWD_TOL:.0e}): the model reads the sequence's "
                           "length or later positions")
    runs = "" if not short else f" (it does not run on {', '.join(map(str, short))} tokens)"
    return Row("causal", True, f"token t+1 changed for t in {ts}: logits <= t bitwise equal; "
               f"the first t+1 tokens alone: max rel diff {worst:.1e}{runs}")


def _grads(model, ids, cotangents, seed) -> Dict[str, torch.Tensor]:
    model.train()
    outs = _outputs(model, ids)
    total = sum((outs[k].float() * c).sum() for k, c in cotangents.items())
    total.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _cotangents(s: Subject, outs) -> Dict[str, torch.Tensor]:
    """Random (not ones) upstream gradients for every float output."""
    gen = torch.Generator().manual_seed(s.seed + 1)
    return {k: torch.randn(v.shape, generator=gen, dtype=torch.float32)
            for k, v in outs.items() if v.is_floating_point()}


def _grads64(s: Subject, cotangents) -> Optional[Dict[str, torch.Tensor]]:
    """The oracle's gradients computed in fp64 (its weights, the same cotangents), or None
    when the source graph does not run so (an op that fixes its dtype)."""
    o = s.oracle().to(torch.float64)
    try:
        o.train()
        outs = _outputs(o, s.ids)
        total = sum((outs[k].double() * c.double()).sum() for k, c in cotangents.items())
        total.backward()
    except (RuntimeError, TypeError, LmcError):
        return None
    return {n: p.grad for n, p in o.named_parameters()}


def _grad_check(s: Subject, got, ref, cotangents) -> Tuple[bool, str]:
    """_grad_diff against the fp32 oracle; where that fails, the tie-break an fp32 oracle
    needs for a gradient that is a sum which cancels (its own rounding then exceeds the
    tolerance): both against the oracle in fp64. lmc passes if every parameter's gradient is
    within the tolerance of the fp64 one or no further from it than twice the fp32 oracle's
    own (the criterion of the GPU tests: no worse than torch's own pipeline); the detail
    gives both errors."""
    ok, detail = _grad_diff(got, ref)
    if ok:
        return ok, detail
    ref64 = _grads64(s, cotangents)
    if ref64 is None or set(got) != set(ref64):
        return ok, detail
    worst, where, own_there = 0.0, "", 0.0
    for n, r64 in ref64.items():
        g, r = got[n], ref.get(n)
        if r64 is None or g is None or r is None:
            if _unused(g, r64) or _unused(g, r) or g is None and r64 is None:
                continue
            return ok, detail
        mine, own = _max_rel(g.double(), r64), _max_rel(r.double(), r64)
        excess = mine / max(GRAD_TOL, 2 * own)
        if excess > worst:
            worst, where, own_there = excess, n, own
            mine_there = mine
    if not where:
        return ok, detail
    return worst <= 1.0, (f"{detail}; against the oracle in fp64 (cancelling sums): max rel "
                          f"diff {mine_there:.1e} at {where}, the fp32 oracle's own there "
                          f"{own_there:.1e} (pass: within {GRAD_TOL:.0e} or twice the "
                          f"oracle's own)")


def _unused(g, r) -> bool:
    """A parameter no output reads: torch autograd gives None, lmc's autodiff zeros."""
    return r is None and g is not None and not g.any() or \
        g is None and r is not None and not r.any()


def _grad_diff(got, ref) -> Tuple[bool, str]:
    """Whether every parameter's gradient matches, and the worst difference (or what is
    missing)."""
    worst, where, missing, unused = 0.0, "", [], []
    for n, r in ref.items():
        g = got.get(n)
        if r is None and g is None:
            continue
        if _unused(g, r):
            unused.append(n)
            continue
        if g is None or r is None:
            missing.append(n)
            continue
        d = _max_rel(g, r)
        if d > worst:
            worst, where = d, n
    if missing:
        return False, f"gradient missing on one side for {', '.join(missing[:3])}"
    note = f"; unused (zero gradient): {', '.join(unused[:3])}" if unused else ""
    return worst <= GRAD_TOL, (f"{len(ref)} params, random upstream gradients, max rel diff "
                               f"{worst:.1e}{' at ' + where if where else ''} "
                               f"(tol {GRAD_TOL:.0e}){note}")


def check_grads(s: Subject) -> Row:
    """Gradients from the autodiff pass equal torch autograd over the source graph."""
    o = s.oracle()
    with torch.no_grad():
        cot = _cotangents(s, _outputs(o.train(), s.ids))
    ref = _grads(o, s.ids, cot, s.seed)
    got = _grads(s.model(), s.ids, cot, s.seed)
    return Row("gradients = oracle", *_grad_check(s, got, ref, cot))


def check_triton(s: Subject) -> Row:
    """The triton backend (Triton's interpreter without a GPU): forward and gradients."""
    tri, o = s.model(backend="triton").eval(), s.oracle().eval()
    try:
        with torch.no_grad():
            ref_out = _outputs(o, s.ids)
            fwd = _compare_outputs(_outputs(tri, s.ids), ref_out)
            cot = _cotangents(s, ref_out)
        ref = _grads(o, s.ids, cot, s.seed)
        got = _grads(tri, s.ids, cot, s.seed)
    except InterpreterBf16Error:
        # a kernel stores a bf16 tensor the model computes: not checkable here
        return Row("triton = oracle", True, "a kernel stores bf16, which Triton's interpreter "
                   "cannot compute (no CUDA here): run lmc verify on a GPU", skipped=True)
    grads_ok, detail = _grad_check(s, got, ref, cot)
    prog = tri.program()
    launches = prog.forward_exec.launches + prog.backward_exec.launches
    return Row("triton = oracle", fwd <= FWD_TOL and grads_ok,
               f"forward max rel diff {fwd:.1e}; gradients: {detail}; {launches} launches")


DECODE_TOL = 1e-4  # fp32 CPU, max abs difference of logits (the bound)


def decode_diff(dec, ids, full, k: int, state=None) -> float:
    """Prefill k tokens, then decode the rest one by one (from `state`, default a fresh
    one); the worst logit difference against `full`, the full forward's logits, at every
    position (inf if any is NaN)."""
    state = state if state is not None else dec.init_state(ids.shape[0])
    worst = 0.0
    if k:
        logits, state = dec(ids[:, :k], state)
        worst = (logits - full[:, :k]).abs().max().item()
    for t in range(k, ids.shape[1]):
        logits, state = dec(ids[:, t:t + 1], state)
        worst = max(worst, (logits[:, 0] - full[:, t]).abs().max().item())
    return worst if worst == worst else float("inf")


def _decode_diff(model, dec, ids, k: int) -> float:
    with torch.no_grad():
        return decode_diff(dec, ids, _outputs(model, ids)["logits"], k)


def check_decode(s: Subject) -> Row:
    """Prefill of k tokens then token-by-token decode equals the full forward, on the torch
    backend for several k and on the triton backend for two."""
    from .runtime.decoder import Decoder
    T = s.ids.shape[1]
    m = s.model().eval()
    dec = Decoder(m, backend="torch")
    ks = sorted({0, 1, T // 2, T - 1})
    worst = max(_decode_diff(m, dec, s.ids, k) for k in ks)
    tri = s.model(backend="triton").eval()
    tdec = Decoder(tri, backend="triton")
    tks = sorted({1, T // 2})
    tworst = max(_decode_diff(tri, tdec, s.ids, k) for k in tks)
    # the static step (preallocated caches written in place, by the kernels computing the
    # new keys and values where fuse_cache_writes could)
    sdec = Decoder(tri, backend="triton", static=True, max_len=T, cuda_graph=False)
    sworst = _decode_diff(tri, sdec, s.ids, T // 2)
    recs = [f["reason"] for f in sdec.graph.meta.get("fusions", [])
            if f["pass"] == "fuse_cache_writes" and f["status"] == "fused"]
    in_place = sum(r.startswith("state updated in place") for r in recs)
    writes = len(recs) - in_place
    per_tok = sum(st.bytes_per_token() for st in dec.step.states)
    fixed = sum(st.bytes(1, 0) for st in dec.step.states)
    kinds = [n.attrs["kind"] for n in tdec.graph.nodes if n.op is Op.FUSED
             and n.attrs["kind"] in ("decode_attention", "decode_linear_attention",
                                     "decode_gated_linear_attention",
                                     "moe_layer", "moe_gating")]
    fused = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))
    return Row("decode = forward", max(worst, tworst, sworst) <= DECODE_TOL,
               f"prefill k in {ks} then steps: max |diff| {worst:.1e}; triton k in {tks}"
               f"{' (' + fused + ')' if fused else ''}: "
               f"{tworst:.1e}; triton static k {T // 2} ({writes} cache writes stored by "
               f"kernels{_in_place(in_place)}): "
               f"{sworst:.1e} (tol {DECODE_TOL:.0e}); state "
               f"{len(dec.step.states)} tensors, {per_tok:,} B/token + {fixed:,} B/sequence")


# (name for --skip, label in the table, check); later issues append theirs
CHECKS: List[Tuple[str, str, Callable[[Subject], Row]]] = [
    ("passes", "passes = oracle", check_passes),
    ("causal", "causal", check_causal),
    ("grads", "gradients = oracle", check_grads),
    ("triton", "triton = oracle", check_triton),
    ("decode", "decode = forward", check_decode),
]


def _preset_names(path: str) -> List[str]:
    from .frontend.yamlsrc import YMap, load_yaml
    doc = load_yaml(path)
    presets = doc.get("presets") if isinstance(doc, YMap) else None
    return [str(k) for k in presets] if isinstance(presets, YMap) else []


def verify(path: str, preset: Optional[str] = None, overrides: Sequence[str] = (), *,
           seed: int = 0, batch: int = 2, seq: int = 11, skip: Sequence[str] = ()) -> List[Row]:
    """Run every check on the file's `tiny` preset (with `overrides` on top) unless another
    preset is named."""
    from .driver import compile_model

    names = [n for n, _, _ in CHECKS]
    for name in skip:
        if name not in names:
            raise UsageError(f"--skip {name}: no such check (checks: {', '.join(names)})")
    # --set applies on top of the tiny preset: a full-size model is no place to check invariants
    if preset is None and "tiny" in _preset_names(path):
        preset = "tiny"
    compiled = compile_model(path, preset, list(overrides))
    g = compiled.graph
    vocab = logits_vocab(g, "lmc verify")     # one token input, one row of scores per token
    if g.inputs[0].type.dtype.value != "i64":
        raise LmcError("lmc verify needs a model with one int64 token input", g.inputs[0].loc)
    max_seq = g.meta.get("config", {}).get("max_seq")
    T = min(seq, int(max_seq)) if max_seq else seq
    if T < 2:
        raise LmcError(f"lmc verify needs max_seq >= 2, the model has {max_seq}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, T), generator=gen)
    s = Subject(path, preset, list(overrides), compiled, vocab, ids, seed)
    which = f" (preset {preset})" if preset else \
        " (no preset: the file has no tiny one, so its config as written" + \
        (" with --set" if overrides else "") + ")"
    rows = [Row("compiles", True, f"{compiled.summary()['params']:,} params{which}; "
                f"B={batch} T={T}")]
    for name, label, check in CHECKS:
        if name in skip:
            rows.append(Row(label, True, "--skip " + name, skipped=True))
            continue
        try:
            rows.append(check(s))
        except LmcError as e:
            rows.append(Row(label, False, e.format()))
        except Exception as e:  # a crash inside a check is that check's failure
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            rows.append(Row(label, False, f"{type(e).__name__}: {msg}"))
    return rows


def format_rows(rows: List[Row]) -> str:
    w = max(len(r.check) for r in rows)
    lines = [f"{'check':<{w}}  result  detail"]
    for r in rows:
        lines.append(f"{r.check:<{w}}  {r.result:<6}  {r.detail}")
    return "\n".join(lines)
