"""YAML model file -> primitive Graph (with BLOCK nodes; the inline pass flattens them).

File layout (see docs/yaml.md):

    name: llama
    config:  {d: 768, heads: 12, head_dim: d / heads, ...}   # numbers or expressions
    presets: {tiny: {d: 64, layers: 2}}                       # named override sets
    blocks:                                                   # reusable subgraphs
      rmsnorm:
        args: [x]                  # tensor arguments
        options: {dim: d}          # static options with defaults
        params: {weight: {shape: [dim], init: ones}}
        body: ["return x * rsqrt(mean(x * x, -1) + eps) * weight"]
    model:
      inputs: {ids: [B, T]}
      params: {...}
      body: [...statements, {for: i, in: layers, body: [...]}, {if: ..., then: [...]}]
      outputs: [logits]
"""
from __future__ import annotations

import ast
import fnmatch
import math
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from ..errors import LmcError, Loc, UsageError
from ..ir import init as inits
from ..ir.dims import Dim, norm
from ..ir.graph import Graph
from ..ir.ops import Op
from .builder import BlockDef, Builder, Tensor, describe
from .expr import MATH, Evaluator, _clean_typeerror, is_static, parse, text_base
from .yamlsrc import YList, YMap, YStr, load_yaml, yaml_kind

TOP_KEYS = {"name", "description", "config", "presets", "blocks", "model"}
BLOCK_KEYS = {"args", "options", "params", "body", "doc"}
MODEL_KEYS = {"inputs", "params", "body", "outputs", "aux_losses", "updates"}
SYMBOLS = {"B": Dim.sym("B"), "T": Dim.sym("T")}
CONSTANTS = {"inf": float("inf"), "pi": math.pi}


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def parse_overrides(items: Union[None, Dict[str, Any], Iterable[str]]) -> Dict[str, Any]:
    """`--set k=v` strings (or a dict) -> {key: value or expression string}."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        if not k.strip() or not v.strip():
            raise UsageError(f"--set expects key=value, got {item!r}")
        v = v.strip()
        out[k.strip()] = {"true": True, "false": False}.get(v, v)  # as YAML spells them
    return out


def resolve_config(doc: YMap, path: str, preset: Optional[str],
                   overrides: Dict[str, Any]) -> Dict[str, Any]:
    cfg = doc.get("config", YMap())
    if not isinstance(cfg, YMap):
        raise LmcError("config must be a mapping of names to numbers or expressions",
                       doc.val_loc("config"))
    raw: Dict[str, Any] = {}
    locs: Dict[str, Loc] = {}
    for k in cfg:
        kl = cfg.key_loc(k)
        if not isinstance(k, str) or not k.isidentifier():
            raise LmcError(f"config key {k!r} must be an identifier", kl)
        if k in SYMBOLS:
            raise LmcError(f"config key {k!r} is reserved for the symbolic batch/sequence "
                           f"dimension", kl)
        raw[k], locs[k] = cfg[k], cfg.val_loc(k)

    def apply(source: Dict[str, Any], what: str, loc_of):
        for k, v in source.items():
            if k not in raw:
                raise LmcError(f"{what} sets unknown config key {k!r} (known: "
                               f"{', '.join(sorted(raw)) or 'none'})", loc_of(k))
            raw[k], locs[k] = v, loc_of(k)

    if "presets" in doc and not isinstance(doc["presets"], YMap):
        raise LmcError("presets must be a mapping of preset names to config overrides",
                       doc.val_loc("presets"))
    if preset is not None:
        presets = doc.get("presets", YMap())
        if not isinstance(presets, YMap) or preset not in presets:
            names = ", ".join(presets) if isinstance(presets, YMap) else ""
            raise LmcError(f"unknown preset {preset!r} (available: {names or 'none'})",
                           doc.key_loc("presets") if "presets" in doc else Loc(path, 1, 1))
        p = presets[preset]
        if not isinstance(p, YMap):
            raise LmcError(f"preset {preset!r} must be a mapping of config overrides",
                           presets.val_loc(preset))
        apply(p, f"preset {preset!r}", p.val_loc)
    cfg_loc = doc.key_loc("config") if "config" in doc else Loc(path, 1, 1)
    apply(overrides, "an override (--set)", lambda k: cfg_loc)
    set_keys = set(overrides)

    done: Dict[str, Any] = {}
    active: List[str] = []

    def get(name: str):
        if name in done:
            return done[name]
        if name not in raw:
            if name in CONSTANTS:
                return CONSTANTS[name]
            raise KeyError(name)
        if name in active:
            cycle = " -> ".join(active[active.index(name):] + [name])
            raise LmcError(f"config values refer to each other in a cycle: {cycle}", locs[name])
        active.append(name)
        v = raw[name]
        shown = v if len(str(v)) <= 60 else f"{str(v)[:40]}..."
        prefix = f"--set {name}={shown}: " if name in set_keys else ""
        try:
            if isinstance(v, bool) or isinstance(v, (int, float)):
                val = v
            elif isinstance(v, str):
                base = text_base(v) if isinstance(v, YStr) else locs[name]
                tree = parse(v, base)
                val = Evaluator(get, MATH, base, what="config expression").eval(tree)
                if not isinstance(val, (int, float)):  # numbers, or a bool like `d > 512`
                    raise LmcError(f"config {name!r} must be numeric, got {val!r}", locs[name])
            else:
                raise LmcError(f"config {name!r} must be a number or an arithmetic expression, "
                               f"got {yaml_kind(v)}", locs[name])
        except LmcError as e:
            if not e.message.startswith("--set "):  # the innermost --set value is the culprit
                e.message = prefix + e.message
            raise
        active.pop()
        done[name] = val
        return val

    for k in raw:
        get(k)
    return done


# ---------------------------------------------------------------------------------------------
# functions visible in bodies
# ---------------------------------------------------------------------------------------------
_UNARY = ["neg", "exp", "log", "sqrt", "rsqrt", "sigmoid", "tanh", "silu", "gelu", "erf", "sin",
          "cos", "abs", "sign", "round", "relu", "logsigmoid", "softplus",
          "stop_gradient"]
_DIRECT = ["where", "clamp", "cast", "maximum", "minimum", "sum", "mean", "amax", "logsumexp",
           "softmax", "cumsum", "matmul", "reshape", "permute", "transpose", "expand", "slice",
           "concat", "split", "iota", "causal_mask", "embedding", "gather", "scatter_add", "topk",
           "dropout", "eq", "ne", "lt", "le", "gt", "ge", "pow", "cumprod",
           "gaussian_noise", "scan"]
BUILTIN_NAMES = set(_UNARY) | set(_DIRECT) | set(MATH) | {"arange", "shape", "max", "min"}


def body_funcs(b: Builder) -> Dict[str, Any]:
    funcs: Dict[str, Any] = {}
    for name in _UNARY:
        meth, static = getattr(b, name), MATH.get(name)
        funcs[name] = (lambda meth, static: lambda x, **kw: (
            static(x) if static is not None and not isinstance(x, Tensor) and not kw
            else meth(x, **kw)))(meth, static)
    for name in _DIRECT:
        funcs[name] = getattr(b, name)
    for name, fn in MATH.items():
        funcs.setdefault(name, fn)
    funcs["arange"] = b.iota
    def _shape(x, axis):
        if not isinstance(x, Tensor):
            raise LmcError(f"shape expects a tensor, got {describe(x)}", b.loc)
        return x.shape[b._axis("shape", axis, x.rank)]

    funcs["shape"] = _shape

    def _max(x, *rest, **kw):
        if isinstance(x, Tensor) and (not rest or isinstance(rest[0], int) and not
                                      isinstance(rest[0], bool)):
            return b.amax(x, *rest, **kw)           # max(x, axis): a reduction
        if any(isinstance(v, Tensor) for v in (x,) + rest):
            return b.maximum(x, *rest)               # max(a, b): elementwise
        return max(x, *rest)

    def _min(x, *rest):
        if any(isinstance(v, Tensor) for v in (x,) + rest):
            return b.minimum(x, *rest)
        return min(x, *rest)

    funcs["max"], funcs["min"] = _max, _min
    for name in b.blocks:
        funcs[name] = (lambda n: lambda *a, **k: b.call(n, *a, **k))(name)
    return funcs


# ---------------------------------------------------------------------------------------------
# statements
# ---------------------------------------------------------------------------------------------
class _Return(Exception):
    def __init__(self, value):
        self.value = value


class Scope:
    """Name lookup for a body: locals, then block options, then config, then B and T."""

    def __init__(self, config: Dict[str, Any], options: Optional[Dict[str, Any]] = None):
        self.locals: Dict[str, Any] = {}
        self.options = options or {}
        self.config = config

    def __call__(self, name: str):
        for d in (self.locals, self.options, self.config, SYMBOLS, CONSTANTS):
            if name in d:
                return d[name]
        raise KeyError(name)


def run_body(stmts, b: Builder, scope: Scope, where: Loc):
    if not isinstance(stmts, YList):
        raise LmcError("body must be a list of statements", where)
    funcs = body_funcs(b)
    for k, item in enumerate(stmts[:-1]):     # a return ends the body
        if isinstance(item, YStr) and re.match(r"\s*return\b", str(item)):
            raise LmcError("unreachable: a statement after return", stmts.locs[k + 1])
    for item, loc in zip(stmts, stmts.locs):
        if isinstance(item, YStr):
            _run_statement(item, b, scope, funcs)
        elif isinstance(item, YMap) and "for" in item:
            _run_for(item, b, scope)
        elif isinstance(item, YMap) and "if" in item:
            _run_if(item, b, scope)
        else:
            raise LmcError("a statement is a string like 'y = f(x)', or a mapping with "
                           "'for' or 'if'", loc)


def _evaluator(b: Builder, scope: Scope, funcs, base: Loc) -> Evaluator:
    def on_loc(loc):
        b.loc = loc

    def lookup(name):
        try:
            return scope(name)
        except KeyError:
            if name in b.blocks:  # a block named as a value: scan(step, h0, x, 1)
                return b.blocks[name]
            raise
    return Evaluator(lookup, funcs, base, on_loc=on_loc, what="model expression")


def _run_statement(text: YStr, b: Builder, scope: Scope, funcs):
    base = text_base(text)
    tree = parse(text, base, mode="exec")
    ev = _evaluator(b, scope, funcs, base)
    if len(tree.body) != 1:
        raise LmcError("one statement per list item", base)
    st = tree.body[0]
    b.loc = ev.loc(st)
    try:
        if isinstance(st, ast.Return):
            if st.value is None:
                raise ev.error(st, "return needs a value")
            raise _Return(ev.eval(st.value))
        if isinstance(st, ast.Assign):
            if len(st.targets) != 1:
                raise ev.error(st, "chained assignment is not supported")
            _assign(st.targets[0], ev.eval(st.value), scope, ev)
            return
        if isinstance(st, ast.AugAssign):
            if not isinstance(st.target, ast.Name):
                raise ev.error(st, "augmented assignment needs a plain name")
            from .expr import _BINOPS
            cur = ev.eval(st.target)
            _assign(st.target, ev.apply(st, _BINOPS[type(st.op)], cur, ev.eval(st.value)),
                    scope, ev)
            return
        if isinstance(st, ast.Expr):
            raise ev.error(st, "expression result is unused (assign it, or return it)")
        raise ev.error(st, f"{type(st).__name__} statements are not allowed "
                           f"(use 'name = expression' or 'return expression')")
    finally:
        b.loc = None


def _assign(target, value, scope: Scope, ev: Evaluator):
    if isinstance(target, ast.Name):
        if target.id in SYMBOLS or target.id.startswith("__"):
            raise ev.error(target, f"cannot assign to {target.id!r}")
        scope.locals[target.id] = value
    elif isinstance(target, (ast.Tuple, ast.List)):
        if not isinstance(value, (tuple, list)):
            raise ev.error(target, f"cannot unpack a single value into "
                                   f"{len(target.elts)} names")
        if len(value) != len(target.elts):
            raise ev.error(target, f"cannot unpack {len(value)} values into "
                                   f"{len(target.elts)} names")
        for t, v in zip(target.elts, value):
            _assign(t, v, scope, ev)
    else:
        raise ev.error(target, "can only assign to names")


def static_eval(text, scope, loc: Loc, funcs=None, what="expression"):
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    if isinstance(text, bool):
        return text
    if not isinstance(text, str):
        raise LmcError(f"expected an expression, got {yaml_kind(text)}", loc)
    base = text_base(text) if isinstance(text, YStr) else loc
    return Evaluator(scope, funcs or MATH, base, what=what).eval(parse(text, base))


# loops are unrolled: a count past MAX_LOOP, or a graph past MAX_NODES, is an error rather
# than a compile that runs out of time or memory
MAX_LOOP = 10_000
MAX_NODES = 1_000_000


def _run_for(item: YMap, b: Builder, scope: Scope):
    extra = set(item) - {"for", "in", "scope", "body"}
    if extra:
        k = sorted(extra, key=str)[0]
        raise LmcError(f"unknown key {k!r} in a for statement (expected for, in, scope, body)",
                       item.key_loc(k))
    var = item["for"]
    if not isinstance(var, str) or not var.isidentifier():
        raise LmcError("for: expects a loop variable name", item.val_loc("for"))
    if "in" not in item or "body" not in item:
        raise LmcError("a for statement needs 'in' (a count) and 'body'", item.loc)
    count = static_eval(item["in"], scope, item.val_loc("in"))
    if isinstance(count, float) and count.is_integer():
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise LmcError(f"for ... in: expects a non-negative integer count, got {count!r}",
                       item.val_loc("in"))
    if count > MAX_LOOP:
        raise LmcError(f"for ... in: {count:,} iterations; a loop is unrolled into the graph, "
                       f"at most {MAX_LOOP:,}", item.val_loc("in"))
    name = item.get("scope")
    if name is not None and (not isinstance(name, str) or
                             not all(p.isidentifier() for p in name.split("."))):
        raise LmcError(f"scope: expects a name (like layers), got {yaml_kind(name)}",
                       item.val_loc("scope"))
    if name is None:
        src = item["in"]
        name = src if isinstance(src, str) and src.isidentifier() else var
    for i in range(count):
        scope.locals[var] = i
        with b.sub_scope(f"{name}.{i}"):
            run_body(item["body"], b, scope, item.val_loc("body"))
        if len(b.nodes) > MAX_NODES:
            raise LmcError(f"the graph passes {MAX_NODES:,} nodes at iteration {i} of this "
                           "loop (loops are unrolled)", item.val_loc("in"))
    scope.locals.pop(var, None)


def _run_if(item: YMap, b: Builder, scope: Scope):
    extra = set(item) - {"if", "then", "else"}
    if extra:
        k = sorted(extra, key=str)[0]
        raise LmcError(f"unknown key {k!r} in an if statement (expected if, then, else)",
                       item.key_loc(k))
    if "then" not in item and "else" not in item:
        raise LmcError("an if statement needs 'then' or 'else' (a list of statements)",
                       item.loc)
    cond = static_eval(item["if"], scope, item.val_loc("if"))
    if not is_static(cond):
        raise LmcError("if: needs a static condition (config values, loop indices)",
                       item.val_loc("if"))
    branch = "then" if cond else "else"
    if branch in item:
        run_body(item[branch], b, scope, item.val_loc(branch))


# ---------------------------------------------------------------------------------------------
# params, blocks, model
# ---------------------------------------------------------------------------------------------
def _init_arg(what: str, v, *, low: Optional[float] = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{what} must be a number, got {describe(v)}")
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v}")
    if low is not None and v < low:
        raise ValueError(f"{what} must be >= {low:g}, got {v:g}")
    return float(v)


def _normal(std=0.02, mean=0.0):          # bare `normal`: std 0.02, as the default init
    return inits.normal(_init_arg("std", std, low=0), _init_arg("mean", mean))


def _uniform(lo, hi):
    lo, hi = _init_arg("lo", lo), _init_arg("hi", hi)
    if lo > hi:
        raise ValueError(f"lo must be <= hi, got lo={lo:g} > hi={hi:g}")
    return inits.uniform(lo, hi)


def _constant(value):
    return inits.constant(_init_arg("value", value))


def _orthogonal(gain=1.0):
    return inits.orthogonal(_init_arg("gain", gain))


# The inits as YAML sees them: arguments checked here, at the param's line, rather than by
# torch when the model is first initialised (docs/yaml.md: `normal(std, mean=0)` ...).
YAML_INITS = {"normal": _normal, "zeros": inits.zeros, "ones": inits.ones,
              "constant": _constant, "uniform": _uniform, "orthogonal": _orthogonal}
assert set(YAML_INITS) == set(inits.INITS)
INIT_FUNCS = dict(MATH, **YAML_INITS)


def declare_params(spec, b: Builder, scope: Scope, where: Loc) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    if spec is None:
        return out
    if not isinstance(spec, YMap):
        raise LmcError("params must be a mapping of name -> {shape, init}", where)
    for name in spec:
        s, loc = spec[name], spec.val_loc(name)
        if not isinstance(name, str) or not name.isidentifier():
            raise LmcError(f"parameter name {name!r} must be an identifier", spec.key_loc(name))
        if isinstance(s, YList):
            s = YMap({"shape": s})
            s.loc, s.key_locs, s.val_locs = loc, {}, {"shape": loc}
        if not isinstance(s, YMap) or "shape" not in s:
            raise LmcError(f"parameter {name!r} needs a shape", loc)
        extra = set(s) - {"shape", "init", "dtype", "trainable"}
        if extra:
            k = sorted(extra, key=str)[0]
            hint = ""
            if isinstance(s.get("init"), str) and "(" in s["init"] and ")" not in s["init"]:
                # {shape: [d], init: uniform(-0.1, 0.1)}: YAML splits a flow mapping at commas
                hint = (f" (a comma in a {{...}} mapping ends the value: quote the init, "
                        f"init: '{s['init']}, ...)')")
            raise LmcError(f"unknown key {k!r} for parameter {name!r}{hint}", s.key_loc(k))
        shape = eval_shape(s["shape"], scope, s.val_loc("shape"), allow_symbols=False)
        if any(isinstance(d, int) and d < 1 for d in shape):
            raise LmcError(f"parameter {name!r} has shape [{', '.join(map(str, shape))}]: "
                           "every dimension must be at least 1 (a config value of 0 or less?)",
                           s.val_loc("shape"))
        init = s.get("init", "normal(0.02)")
        if isinstance(init, str) and init.strip() in YAML_INITS:
            try:
                iv = YAML_INITS[init.strip()]()   # `init: ones` is short for ones()
            except (TypeError, ValueError) as e:
                raise LmcError(f"{init.strip()}(): {_clean_typeerror(e)}",
                               s.val_loc("init")) from None
        else:
            iv = static_eval(init, scope, s.val_loc("init"), INIT_FUNCS, "init expression")
        if not isinstance(iv, inits.Init):
            raise LmcError(f"init must be one of {', '.join(inits.INITS)}, got {iv!r}",
                           s.val_loc("init"))
        trainable = s.get("trainable", True)
        if not isinstance(trainable, bool):
            raise LmcError(f"trainable must be true or false, got {trainable!r}",
                           s.val_loc("trainable"))
        b.loc = loc
        out[name] = b.param(name, shape, iv, s.get("dtype"))
        if not trainable:        # kept as initialised (or loaded): no gradient, no update
            out[name].node.attrs["trainable"] = False
        b.loc = None
    return out


def eval_shape(spec, scope, loc: Loc, *, allow_symbols=True) -> tuple:
    if not isinstance(spec, list):
        raise LmcError("a shape is a list of dimensions, e.g. [d, 4 * d]", loc)
    dims = []
    for i, d in enumerate(spec):
        dl = spec.locs[i] if isinstance(spec, YList) else loc
        v = static_eval(d, scope, dl, what="shape")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, Dim) and not allow_symbols:
            raise LmcError(f"parameter shapes must be concrete, got {v}", dl)
        if isinstance(v, bool) or not isinstance(v, (int, Dim)):
            what = f"dimension {d}" if isinstance(d, str) and str(d) != str(v) else "dimension"
            raise LmcError(f"{what} must be an integer, got {v!r}", dl)
        if isinstance(v, int) and v < 0:
            raise LmcError(f"negative dimension {v}", dl)
        dims.append(norm(v))
    return tuple(dims)


def yaml_block(name: str, spec: YMap, config: Dict[str, Any]) -> BlockDef:
    if not isinstance(spec, YMap):
        raise LmcError(f"block {name!r} must be a mapping with args/params/body", spec_loc(spec))
    extra = set(spec) - BLOCK_KEYS
    if extra:
        k = sorted(extra, key=str)[0]
        raise LmcError(f"unknown key {k!r} in block {name!r} (expected "
                       f"{', '.join(sorted(BLOCK_KEYS))})", spec.key_loc(k))
    args = spec.get("args", YList())
    if not isinstance(args, list) or not all(isinstance(a, str) and a.isidentifier()
                                             for a in args):
        raise LmcError(f"block {name!r}: args must be a list of names", spec.val_loc("args"))
    if len(set(args)) != len(args):
        raise LmcError(f"block {name!r}: duplicate argument name", spec.val_loc("args"))
    opts = spec.get("options", YMap())
    if not isinstance(opts, YMap):
        raise LmcError(f"block {name!r}: options must be a mapping", spec.val_loc("options"))
    if "body" not in spec:
        raise LmcError(f"block {name!r} has no body", spec.loc)
    cfg_scope = Scope(config)
    defaults = {k: static_eval(v, cfg_scope, opts.val_loc(k)) for k, v in opts.items()}

    def fn(b: Builder, *tensors, **options):
        scope = Scope(config, options)
        scope.locals.update(zip(args, tensors))
        scope.locals.update(declare_params(spec.get("params"), b, scope, spec.val_loc("params")))
        try:
            run_body(spec["body"], b, scope, spec.val_loc("body"))
        except _Return as r:
            return r.value
        raise LmcError(f"block {name!r} has no return statement", spec.val_loc("body"))

    return BlockDef(name, fn, list(args), defaults, spec.loc)


def spec_loc(x) -> Optional[Loc]:
    return getattr(x, "loc", None)


def check_block_cycles(blocks: YMap) -> None:
    """Refuse a YAML block that (directly or not) calls itself, at the call site."""
    import networkx as nx

    g = nx.DiGraph()
    sites = {}

    def walk(stmts, owner):
        if not isinstance(stmts, YList):
            return
        for st, loc in zip(stmts, stmts.locs):
            if isinstance(st, YStr):
                try:
                    tree = ast.parse(st)
                except (SyntaxError, ValueError, RecursionError, MemoryError):
                    continue  # reported with its location when the block is built
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                            node.func.id in blocks:
                        g.add_edge(owner, node.func.id)
                        sites.setdefault((owner, node.func.id), loc)
            elif isinstance(st, YMap):
                for k in ("body", "then", "else"):
                    walk(st.get(k), owner)

    for name, spec in blocks.items():
        g.add_node(name)
        if isinstance(spec, YMap):
            walk(spec.get("body"), name)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    path = " -> ".join([cycle[0][0]] + [v for _, v in cycle])
    raise LmcError(f"cyclic block reference: {path}", sites[cycle[-1]])


PREDICTION_KEYS = {"logits", "ahead", "coef"}


def _check_keys(m: YMap, keys, unknown, missing) -> None:
    """m holds exactly `keys`; `unknown(k)` and `missing(k)` word the error, at the stray key
    or at the mapping."""
    for k in m:
        if k not in keys:
            raise LmcError(unknown(k), m.key_loc(k))
    for k in sorted(keys):
        if k not in m:
            raise LmcError(missing(k), m.loc)


def _prediction(name, entry: YMap, kl: Loc, outputs: Dict[str, Any], scope: Scope, ids):
    """A multi-token prediction entry {logits, ahead, coef} of aux loss `name`, checked:
    {"logits": output, "ahead": k}."""
    _check_keys(entry, PREDICTION_KEYS,
                lambda k: f"aux loss {name!r}: unknown key {k!r} (a prediction loss takes "
                          f"{', '.join(sorted(PREDICTION_KEYS))})",
                lambda k: f"aux loss {name!r}: a prediction loss needs {k!r} "
                          f"({{logits: OUTPUT, ahead: 2, coef: EXPR}})")
    if name in outputs:
        raise LmcError(f"aux loss {name!r}: a prediction loss is computed by training under "
                       f"its own name, which an output already has (rename one)", kl)
    lg = entry["logits"]
    if not isinstance(lg, str) or lg not in outputs:
        raise LmcError(f"logits {lg!r} is not one of the model outputs "
                       f"({', '.join(outputs)})", entry.val_loc("logits"))
    t = outputs[lg].type
    if ids is not None and (not t.dtype.is_float or t.rank != ids.type.rank + 1
                            or tuple(t.shape[:-1]) != tuple(ids.type.shape)):
        raise LmcError(f"logits {lg!r} must be [{', '.join(map(str, ids.type.shape))}, vocab] "
                       f"scores in a float dtype, got {t}", entry.val_loc("logits"))
    ahead = static_eval(entry["ahead"], scope, entry.val_loc("ahead"), what="prediction offset")
    if isinstance(ahead, float) and ahead.is_integer():
        ahead = int(ahead)
    if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 1:
        raise LmcError(f"ahead must be an integer >= 1 (the token that many positions after "
                       f"the input's; next-token logits are 1), got {ahead!r}",
                       entry.val_loc("ahead"))
    return {"logits": str(lg), "ahead": ahead}


def aux_losses(model: YMap, outputs: Dict[str, Any], scope: Scope,
               ids=None) -> Tuple[Dict[str, float], Dict[str, dict]]:
    """`aux_losses: {name: coefficient}`: scalar outputs the training loss adds, each times
    its coefficient (a config expression), to the cross-entropy (lmc.passes.loss).
    `{name: {logits: OUTPUT, ahead: k, coef: EXPR}}`: a multi-token prediction loss, the
    cross-entropy of a logits output against the token k positions ahead (the main logits'
    is 1), which training computes and logs as `name`. Returns ({name: coef},
    {name: {"logits": output, "ahead": k}})."""
    spec = model.get("aux_losses")
    if spec is None:
        return {}, {}
    if not isinstance(spec, YMap):
        raise LmcError("model.aux_losses must map output names to coefficients, e.g. "
                       "{load_balance: lb_coef}", model.val_loc("aux_losses"))
    out: Dict[str, float] = {}
    predictions: Dict[str, dict] = {}
    for name in spec:
        kl = spec.key_loc(name)
        if name in ("loss", "ce_loss", "targets"):
            raise LmcError(f"aux loss {name!r}: the name is taken by the training loss", kl)
        coef_src, coef_loc = spec[name], spec.val_loc(name)
        if isinstance(spec[name], YMap):
            entry = spec[name]
            predictions[str(name)] = _prediction(name, entry, kl, outputs, scope, ids)
            coef_src, coef_loc = entry["coef"], entry.val_loc("coef")
        else:
            if name not in outputs:
                raise LmcError(f"aux loss {name!r} is not one of the model outputs "
                               f"({', '.join(outputs)})", kl)
            t = outputs[name].type
            if t.rank != 0 or not t.dtype.is_float:
                raise LmcError(f"aux loss {name!r} must be a floating-point scalar, got {t} "
                               f"(a logits output takes {{logits: {name}, ahead: 2, coef: "
                               f"EXPR}} under a new name)", kl)
        coef = static_eval(coef_src, scope, coef_loc, what="aux loss coefficient")
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or \
                not math.isfinite(coef):
            raise LmcError(f"aux loss {name!r}: the coefficient must be a finite number, got "
                           f"{coef!r}", coef_loc)
        out[str(name)] = float(coef)
    return out, predictions


# Update rules: how the trainer moves a parameter outside gradient descent, after each
# optimizer step. load_balance is DeepSeek-V3's auxiliary-loss-free balancing (Wang et al.,
# 2024): an expert's selection bias falls by `rate` when the expert took more than its
# layer's mean load of tokens that step and rises by `rate` when it took fewer.
UPDATE_RULES = ("load_balance",)
UPDATE_KEYS = {"rule", "params", "load", "rate"}


def _all_params(nodes) -> list:
    """Every PARAM node, those in block bodies included (inlined later), in order."""
    out: Dict[str, Any] = {}
    for n in nodes:
        if n.op is Op.PARAM:
            out.setdefault(n.attrs["name"], n)
        elif isinstance(n.attrs.get("body"), Graph):
            for m in _all_params(n.attrs["body"].nodes):
                out.setdefault(m.attrs["name"], m)
    return list(out.values())


def param_updates(model: YMap, outputs: Dict[str, Any], params, scope: Scope) -> List[dict]:
    """`updates: [{rule, params, load, rate}]` -> [{rule, params: [names], load, rate}]:
    the parameters a pattern matches (in declaration order, so layer order), each given its
    slice of the `load` output in that order (lmc.runtime.train.apply_updates)."""
    spec = model.get("updates")
    if spec is None:
        return []
    if not isinstance(spec, YList):
        raise LmcError("model.updates must be a list of {rule, params, load, rate}",
                       model.val_loc("updates"))
    by_name = {p.attrs["name"]: p for p in params}
    taken: Dict[str, Loc] = {}
    out: List[dict] = []
    for u, loc in zip(spec, spec.locs):
        if not isinstance(u, YMap):
            raise LmcError("an update is a mapping {rule, params, load, rate}", loc)
        _check_keys(u, UPDATE_KEYS,
                    lambda k: f"unknown key {k!r} in an update (expected "
                              f"{', '.join(sorted(UPDATE_KEYS))})",
                    lambda k: f"the update needs {k!r}")
        rule = u["rule"]
        if rule not in UPDATE_RULES:
            raise LmcError(f"unknown update rule {rule!r} (rules: {', '.join(UPDATE_RULES)})",
                           u.val_loc("rule"))
        pats = u["params"] if isinstance(u["params"], list) else [u["params"]]
        if not pats or not all(isinstance(p, str) for p in pats):
            raise LmcError("params must be a name pattern or a list of them "
                           "(e.g. 'layers.*.moe.balance')", u.val_loc("params"))
        dead = [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n in by_name)]
        if dead:    # each pattern matches something (a misspelt one among others would hide)
            raise LmcError(f"params {dead[0]}: no parameter matches", u.val_loc("params"))
        names = [n for n in by_name if any(fnmatch.fnmatchcase(n, p) for p in pats)]
        for n in names:
            if by_name[n].attrs.get("trainable", True) is not False:
                raise LmcError(f"parameter {n} has an update rule and is also trained by "
                               f"gradient descent: mark it trainable: false",
                               u.val_loc("params"))
            if n in taken:
                raise LmcError(f"parameter {n} is in two updates (the other at {taken[n]})",
                               u.val_loc("params"))
            taken[n] = u.val_loc("params")
            if by_name[n].type.rank != 1:
                raise LmcError(f"load_balance moves a vector of per-expert biases; {n} is "
                               f"{by_name[n].type}", u.val_loc("params"))
        load = u["load"]
        if not isinstance(load, str) or load not in outputs:
            raise LmcError(f"load {load!r} is not one of the model outputs "
                           f"({', '.join(outputs)})", u.val_loc("load"))
        t = outputs[load].type
        want = sum(int(by_name[n].type.shape[0]) for n in names)
        if not all(isinstance(d, int) for d in t.shape) or math.prod(t.shape) != want:
            raise LmcError(f"load {load!r} must hold one count per biased expert ({want}: "
                           f"{len(names)} parameters in order), got {t}", u.val_loc("load"))
        rate = static_eval(u["rate"], scope, u.val_loc("rate"), what="update rate")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or \
                not math.isfinite(rate) or rate < 0:
            raise LmcError(f"rate must be a number >= 0 (0 turns the rule off), got {rate!r}",
                           u.val_loc("rate"))
        out.append({"rule": str(rule), "params": names, "load": str(load),
                    "rate": float(rate)})
    return out


def load_graph(path: str, preset: Optional[str] = None, overrides=None,
               blocks: Optional[Dict[str, BlockDef]] = None) -> Graph:
    """Parse a model file into a Graph of primitives and BLOCK nodes."""
    from ..blocks import REGISTRY

    path = os.fspath(path)
    doc = load_yaml(path)
    if not isinstance(doc, YMap):
        raise LmcError("expected a mapping at the top of a model file (name, config, blocks, "
                       "model)", getattr(doc, "loc", Loc(path, 1, 1)))
    extra = set(doc) - TOP_KEYS
    if extra:
        k = sorted(extra, key=str)[0]
        raise LmcError(f"unknown top-level key {k!r} (expected "
                       f"{', '.join(sorted(TOP_KEYS))})", doc.key_loc(k))
    if "model" not in doc:
        raise LmcError("no 'model' section", doc.loc)
    if "name" in doc and (not isinstance(doc["name"], str) or not doc["name"].strip()):
        raise LmcError(f"name must be a non-empty string, got {yaml_kind(doc['name'])}",
                       doc.val_loc("name"))
    config = resolve_config(doc, path, preset, parse_overrides(overrides))

    all_blocks: Dict[str, BlockDef] = dict(REGISTRY)
    all_blocks.update(blocks or {})
    for name in all_blocks:
        if name in BUILTIN_NAMES:
            raise LmcError(f"block name {name!r} shadows a built-in function",
                           getattr(all_blocks[name], "loc", None))
    yblocks = doc.get("blocks", YMap())
    if not isinstance(yblocks, YMap):
        raise LmcError("blocks must be a mapping of name -> block", doc.val_loc("blocks"))
    for name in yblocks:
        if not isinstance(name, str) or not name.isidentifier():
            raise LmcError(f"block name {name!r} must be an identifier", yblocks.key_loc(name))
        if name in BUILTIN_NAMES:
            raise LmcError(f"block name {name!r} shadows a built-in function",
                           yblocks.key_loc(name))
    check_block_cycles(yblocks)
    for name in yblocks:
        all_blocks[name] = yaml_block(name, yblocks[name], config)

    model = doc["model"]
    if not isinstance(model, YMap):
        raise LmcError("model must be a mapping with inputs, params, body, outputs",
                       doc.val_loc("model"))
    extra = set(model) - MODEL_KEYS
    if extra:
        k = sorted(extra, key=str)[0]
        raise LmcError(f"unknown key {k!r} in model (expected "
                       f"{', '.join(sorted(MODEL_KEYS))})", model.key_loc(k))
    b = Builder(config, all_blocks)
    scope = Scope(config)
    inputs = model.get("inputs", YMap())
    if not isinstance(inputs, YMap) or not inputs:
        raise LmcError("model.inputs must name at least one input, e.g. {ids: [B, T]}",
                       model.val_loc("inputs") if "inputs" in model else model.loc)
    first_input = None
    for name, spec in inputs.items():
        loc = inputs.val_loc(name)
        dtype = "i64"
        if isinstance(spec, YMap):
            dtype = spec.get("dtype", "i64")
            spec = spec.get("shape")
        shape = eval_shape(spec, scope, loc)
        b.loc = loc
        try:
            scope.locals[name] = b.input(name, shape, dtype)
        except ValueError as e:
            raise LmcError(str(e), loc) from None
        first_input = first_input or scope.locals[name].node
        b.loc = None
    scope.locals.update(declare_params(model.get("params"), b, scope, model.val_loc("params")))
    if "body" not in model:
        raise LmcError("model has no body", model.loc)
    try:
        run_body(model["body"], b, scope, model.val_loc("body"))
    except _Return:
        raise LmcError("return is for blocks; the model names its outputs under 'outputs'",
                       b.loc or model.val_loc("body")) from None
    outs = model.get("outputs", YList())
    if isinstance(outs, YMap):
        pairs = [(k, outs[k], outs.val_loc(k)) for k in outs]
    elif isinstance(outs, YList) and outs:
        pairs = [(o, o, loc) for o, loc in zip(outs, outs.locs)]
    else:
        raise LmcError("model.outputs must list at least one output, e.g. [logits]",
                       model.val_loc("outputs") if "outputs" in model else model.loc)
    outputs = {}
    for name, var, loc in pairs:
        v = scope.locals.get(var) if isinstance(var, str) else None
        if not isinstance(v, Tensor):
            raise LmcError(f"output {var!r} is not a tensor defined in the model body", loc)
        outputs[str(name)] = v.node
    losses, predictions = aux_losses(model, outputs, Scope(config), first_input)
    meta = {"source": path, "config": config, "preset": preset,
            "overrides": parse_overrides(overrides), "history": [], "fusions": [],
            "aux_losses": losses, "predictions": predictions,
            "updates": param_updates(model, outputs, _all_params(b.nodes), Scope(config))}
    return Graph(str(doc.get("name", os.path.splitext(os.path.basename(path))[0])),
                 b.nodes, outputs, meta)
