"""Expressions: parsed with `ast`, evaluated by walking a whitelist of node types.

Nothing is ever passed to eval/exec. Names resolve through an explicit scope; calls must name
a whitelisted function (ops, blocks, a few math helpers); attribute access, comprehensions,
lambdas, starred arguments and the like are refused with the location of the offending part.
Static arithmetic (config values, shapes, loop indices) is done on Python numbers, with
division by zero and absurdly large numbers reported as errors rather than raised as Python
exceptions.
"""
from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable, Dict, Optional

from ..errors import LmcError, Loc
from ..ir.dims import Dim, norm
from .builder import Tensor, describe

MAX_NUMBER = 2**63

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.MatMult: operator.matmul,
}
_CMPOPS = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
_REFUSED = {
    ast.Attribute: "attribute access", ast.Lambda: "lambda", ast.ListComp: "a comprehension",
    ast.DictComp: "a comprehension", ast.SetComp: "a comprehension",
    ast.GeneratorExp: "a comprehension", ast.Starred: "a starred argument",
    ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield", ast.NamedExpr: ":=",
    ast.JoinedStr: "an f-string", ast.Dict: "a dict literal", ast.Set: "a set literal",
}

# Functions usable on static numbers (config values, shapes).
MATH: Dict[str, Callable] = {
    "sqrt": math.sqrt, "log": math.log, "log2": math.log2, "exp": math.exp,
    "floor": math.floor, "ceil": math.ceil, "min": min, "max": max, "abs": abs,
    "int": int, "float": float, "round": round, "sin": math.sin, "cos": math.cos,
    "tanh": math.tanh, "erf": math.erf, "rsqrt": lambda x: 1.0 / math.sqrt(x),
    "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-x)),
}


def is_static(v) -> bool:
    return isinstance(v, (int, float, bool, Dim, str)) or v is None or (
        isinstance(v, (list, tuple)) and all(is_static(x) for x in v))


class Evaluator:
    """Evaluates one expression. `lookup(name)` returns a value or raises KeyError;
    `funcs` maps callable names to Python callables. `base` is where the expression's text
    starts in the file, so errors point at the right column."""

    def __init__(self, lookup: Callable[[str], Any], funcs: Dict[str, Callable], base: Loc,
                 *, on_loc: Optional[Callable[[Loc], None]] = None, what: str = "expression"):
        self.lookup, self.funcs, self.base = lookup, funcs, base
        self.on_loc, self.what = on_loc, what

    def loc(self, node) -> Loc:
        line = getattr(node, "lineno", 1)
        col = getattr(node, "col_offset", 0)
        if line == 1:
            return Loc(self.base.file, self.base.line, self.base.col + col)
        return Loc(self.base.file, self.base.line + line - 1, col + 1)

    def error(self, node, msg) -> LmcError:
        return LmcError(msg, self.loc(node))

    def eval(self, node):
        kind = type(node)
        if kind in _REFUSED:
            raise self.error(node, f"{_REFUSED[kind]} is not allowed in a {self.what}")
        method = getattr(self, "_" + kind.__name__, None)
        if method is None:
            raise self.error(node, f"{kind.__name__} syntax is not allowed in a {self.what}")
        return method(node)

    # -- leaves ------------------------------------------------------------------------------
    def _Expression(self, node):
        return self.eval(node.body)

    def _Constant(self, node):
        v = node.value
        if isinstance(v, (int, float, bool, str)) or v is None or v is Ellipsis:
            return v
        raise self.error(node, f"constant {v!r} is not allowed in a {self.what}")

    def _Name(self, node):
        if node.id.startswith("__"):
            raise self.error(node, f"name {node.id!r} is not allowed")
        try:
            return self.lookup(node.id)
        except KeyError:
            if node.id in self.funcs:
                raise self.error(node, f"{node.id!r} is a function; call it") from None
            raise self.error(node, f"undefined name {node.id!r}") from None

    def _Tuple(self, node):
        return tuple(self.eval(e) for e in node.elts)

    def _List(self, node):
        return [self.eval(e) for e in node.elts]

    def _Slice(self, node):
        return slice(*(None if p is None else self.eval(p)
                       for p in (node.lower, node.upper, node.step)))

    # -- operators ---------------------------------------------------------------------------
    def _BinOp(self, node):
        a, b = self.eval(node.left), self.eval(node.right)
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise self.error(node, f"operator {type(node.op).__name__} is not allowed")
        return self.apply(node, op, a, b)

    def apply(self, node, op, a, b):
        static = not isinstance(a, Tensor) and not isinstance(b, Tensor)
        if static:
            for v in (a, b):
                if isinstance(v, bool) or not isinstance(v, (int, float, Dim)):
                    raise self.error(node, f"cannot apply {_opname(op)} to {describe(v)}")
            if op in (operator.truediv, operator.floordiv, operator.mod) and b == 0:
                raise self.error(node, "division by zero")
            if op is operator.pow and isinstance(a, (int, float)) and isinstance(b, (int, float)):
                if abs(a) > 1 and b * math.log2(abs(a)) > 64:
                    raise self.error(node, f"number too large: {a} ** {b}")
                if a == 0 and b < 0:
                    raise self.error(node, "division by zero (0 to a negative power)")
            if isinstance(a, Dim) or isinstance(b, Dim):
                if op is operator.truediv or op is operator.floordiv:
                    q = Dim.exact_div(a, b) if isinstance(a, Dim) else None
                    if q is None:
                        raise self.error(node, f"symbolic dimension {a} is not divisible by {b}")
                    return q
                if op not in (operator.add, operator.sub, operator.mul):
                    raise self.error(node, f"cannot apply {_opname(op)} to symbolic dimension")
                return norm(op(a, b))
        elif op in (operator.truediv, operator.floordiv, operator.mod) and \
                isinstance(b, (int, float)) and not isinstance(b, bool) and b == 0:
            raise self.error(node, "division by zero")  # tensor / 0
        else:
            self._mark(node)  # tensor arithmetic: nodes and shape errors point here
        try:
            out = op(a, b)
        except LmcError as e:
            raise e.with_loc(self.loc(node))
        except (ZeroDivisionError, OverflowError, ValueError, TypeError) as e:
            raise self.error(node, f"cannot evaluate {_opname(op)}: {e}") from None
        if op is operator.truediv and isinstance(out, float) and out.is_integer() and \
                isinstance(a, int) and isinstance(b, int):
            out = int(out)  # d / heads with exact division stays an int
        if isinstance(out, (int, float)) and not isinstance(out, bool) and abs(out) > MAX_NUMBER:
            raise self.error(node, f"number too large: {out:.3g}")
        if isinstance(out, float) and out != out:      # 0 * inf, inf - inf
            raise self.error(node, f"{a} {_opname(op)} {b} is not a number (nan)")
        return out

    def _UnaryOp(self, node):
        v = self.eval(node.operand)
        if isinstance(node.op, ast.USub):
            return -v
        if isinstance(node.op, ast.UAdd):
            return v
        if isinstance(node.op, ast.Not) and is_static(v):
            return not v
        raise self.error(node, f"operator {type(node.op).__name__} is not allowed here")

    def _Compare(self, node):
        left = self.eval(node.left)
        result = None
        for op, right_node in zip(node.ops, node.comparators):
            right = self.eval(right_node)
            fn = _CMPOPS.get(type(op))
            if fn is None:
                raise self.error(node, f"comparison {type(op).__name__} is not allowed")
            t = left if isinstance(left, Tensor) else right
            if isinstance(op, (ast.Eq, ast.NotEq)) and isinstance(t, Tensor):
                # elementwise, as eq/ne (Python's == on two objects would be identity)
                fn = t.b.eq if isinstance(op, ast.Eq) else t.b.ne
            r = self.apply(node, fn, left, right) if isinstance(left, Tensor) or \
                isinstance(right, Tensor) else fn(left, right)
            if len(node.ops) > 1 and isinstance(r, Tensor):
                raise self.error(node, "chained comparisons of tensors are not supported")
            result = r if result is None else (result and r)
            left = right
        return result

    def _BoolOp(self, node):
        vals = [self.eval(v) for v in node.values]
        if not all(is_static(v) for v in vals):
            raise self.error(node, "and/or need static values (use where() for tensors)")
        return all(vals) if isinstance(node.op, ast.And) else any(vals)

    def _IfExp(self, node):
        test = self.eval(node.test)
        if isinstance(test, Tensor):
            raise self.error(node, "a conditional expression needs a static condition "
                                   "(use where() for tensors)")
        return self.eval(node.body if test else node.orelse)

    def _Subscript(self, node):
        target = self.eval(node.value)
        idx = self.eval(node.slice)
        if isinstance(target, Tensor):
            self._mark(node)
            return target[idx]
        if isinstance(target, (list, tuple)) and isinstance(idx, int):
            try:
                return target[idx]
            except IndexError:
                raise self.error(node, f"index {idx} out of range") from None
        raise self.error(node, f"cannot index {describe(target)}")

    def _Call(self, node):
        if not isinstance(node.func, ast.Name):
            if type(node.func) in _REFUSED:  # x.f(), (lambda: ...)()
                raise self.error(node.func, f"{_REFUSED[type(node.func)]} is not allowed in a "
                                            f"{self.what}")
            raise self.error(node, "only named functions can be called")
        name = node.func.id
        fn = self.funcs.get(name)
        if fn is None:
            import difflib
            close = difflib.get_close_matches(name, list(self.funcs), n=1, cutoff=0.8)
            hint = (f"did you mean {close[0]!r}?" if close else
                    "not a built-in or a block of this file; a Python block's file is given "
                    "with --import")
            raise self.error(node.func, f"unknown function {name!r} ({hint})")
        args = [self.eval(a) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self.error(node, f"**kwargs is not allowed in a {self.what}")
            if kw.arg in kwargs:
                raise self.error(kw, f"{name}(): keyword argument {kw.arg!r} given twice")
            kwargs[kw.arg] = self.eval(kw.value)
        self._mark(node)
        try:
            return fn(*args, **kwargs)
        except LmcError as e:
            if "dimension" in e.message or "integer" in e.message:
                e.message += self._non_integer_names(node)
            raise e.with_loc(self.loc(node))
        except TypeError as e:
            msg = _clean_typeerror(e)
            if "dimension" in msg or "integer" in msg:
                msg += self._non_integer_names(node)
            raise self.error(node, f"{name}(): {msg}") from None
        except (ValueError, ZeroDivisionError, OverflowError) as e:
            raise self.error(node, f"{name}(): {e}") from None

    def _non_integer_names(self, node) -> str:
        """For a dimension error: name the values in the call's arguments that are not whole
        numbers (``head_dim = d / heads`` with d=768, heads=5), so the message says which."""
        bad = []
        for part in list(node.args) + [kw.value for kw in node.keywords]:
            for n in ast.walk(part):
                if isinstance(n, ast.Name) and not n.id.startswith("__"):
                    try:
                        v = self.lookup(n.id)
                    except (KeyError, LmcError):
                        continue
                    if isinstance(v, float) and not v.is_integer() and \
                            f"{n.id} = {v:g}" not in bad:
                        bad.append(f"{n.id} = {v:g}")
        return f" ({', '.join(bad)}: not an integer)" if bad else ""

    def _mark(self, node):
        if self.on_loc is not None:
            self.on_loc(self.loc(node))


def _opname(op) -> str:
    return {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
            operator.floordiv: "//", operator.mod: "%", operator.pow: "**",
            operator.matmul: "@"}.get(op, getattr(op, "__name__", str(op)))


def _clean_typeerror(e: TypeError) -> str:
    msg = str(e)
    # "Builder.mean() got an unexpected keyword argument 'x'" -> drop the Python qualname
    if "() " in msg:
        msg = msg.split("() ", 1)[1]
    return msg


# Deeper expressions are refused: the evaluator walks the tree recursively (a few Python frames
# a level), and no model needs more than a handful of levels.
MAX_DEPTH = 250
TOO_DEEP = "expression too long or too deeply nested"


def parse(text: str, base: Loc, mode: str = "eval"):
    try:
        tree = ast.parse(text, mode=mode)
    except SyntaxError as e:
        line = (e.lineno or 1)
        col = (e.offset or 1)
        loc = Loc(base.file, base.line + line - 1, (base.col + col - 1) if line == 1 else col)
        msg = e.msg
        if "too many nested" in msg or "too complex" in msg:
            msg = TOO_DEEP
        raise LmcError(f"syntax error in expression: {msg}", loc) from None
    except (RecursionError, MemoryError):
        raise LmcError(f"{TOO_DEEP} ({len(text)} characters)", base) from None
    except ValueError as e:  # e.g. "source code string cannot contain null bytes"
        raise LmcError(f"syntax error in expression: {e}", base) from None
    # iterative depth check, so that evaluation never overflows the Python stack
    todo = [(tree, 0)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise LmcError(f"{TOO_DEEP} (more than {MAX_DEPTH} levels)", base)
        todo.extend((c, depth + 1) for c in ast.iter_child_nodes(node))
    return tree


def text_base(s) -> Loc:
    """Where the text of a YAML string scalar starts (quotes skipped)."""
    loc = s.loc
    return Loc(loc.file, loc.line, loc.col + (1 if getattr(s, "quoted", False) else 0))
