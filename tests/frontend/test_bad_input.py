"""Bad input found by a sweep: each case is one line ``FILE:LINE:COL: error: MESSAGE`` in the
user's terms (exit 2, no traceback), never a hang. Built on the minimal model of test_errors."""
import re
import warnings

import pytest
import torch
from test_errors import BASE, H, check, find, variant, write

import lmc
from lmc.cli import main
from lmc.errors import LmcError

# statements added in block mlp (x: [B, T, 32]) or in the model body (ids: [B, T])
AT_H = "      - h = silu(x @ w1)"


def stmt_error(tmp_path, capsys, stmt, at, *words, extra=()):
    """Add `stmt` before block mlp's first statement; the error must be on that line, at the
    column where `at` starts (the call or the offending part)."""
    p, line = variant(tmp_path, H, f"      - {stmt}\n{AT_H}")
    _, col = find(p, at)
    return check(capsys, p, line, col, *words, extra=extra)


# --- 1. a tensor where a list is expected: an error, not an endless x[0], x[1], ... --------------
@pytest.mark.parametrize("stmt,words", [
    ("z = concat(x, -1)", ("concat expects a list of tensors, got a tensor",)),
    ("z = permute(x, x)", ("permute expects a list of axes, got a tensor",)),
    ("a, b = split(x, x, -1)", ("split expects a number of pieces or a list of sizes",
                                "got a tensor")),
    ("z = reshape(x, x)", ("reshape expects a shape", "got a tensor")),
    ("z = expand(x, x)", ("expand expects a shape", "got a tensor")),
    ("z = split(x, [x, x], -1)", ("split: dimension 0 must be an integer, got a tensor",)),
    ("z = scan(mlp, [[x]], x, 1)", ("scan: carry must be a tensor or a list of tensors",)),
])
def test_tensor_where_a_list_is_expected(tmp_path, capsys, stmt, words):
    name = stmt.split("= ")[1].split("(")[0]
    stmt_error(tmp_path, capsys, stmt, f"{name}(", *words)


def test_concat_of_model_input(tmp_path, capsys):
    p, line = variant(tmp_path, "    - x = embedding(embed, ids)",
                      "    - z = concat(ids, 0)\n    - x = embedding(embed, ids)")
    check(capsys, p, line, 11, "concat expects a list of tensors, got a tensor i64[B,T]")


def test_python_api_iterating_a_tensor_is_an_error():
    from lmc.frontend.builder import Builder
    b = Builder({}, {})
    x = b.input("x", [2, 3], "f32")
    with pytest.raises(LmcError, match="cannot iterate over a tensor"):
        list(x)
    with pytest.raises(LmcError, match="concat expects a list of tensors"):
        b.concat(x, 0)


# --- 2. axes out of range are refused, not wrapped ----------------------------------------------
@pytest.mark.parametrize("stmt,words", [
    ("z = transpose(reshape(x, [B, T, 4, 8]), 2, 9)", ("transpose: axis 9 out of range",
                                                       "rank-4")),
    ("z = transpose(x, 0, 9)", ("transpose: axis 9 out of range for a rank-3 tensor",)),
    ("z = transpose(x, -4, 0)", ("transpose: axis -4 out of range",)),
    ("z = split(x, 2, 10)", ("split: axis 10 out of range for a rank-3 tensor",)),
    ("z = split(x, 2, -9)", ("split: axis -9 out of range for a rank-3 tensor",)),
    ("z = shape(x, 9)", ("shape: axis 9 out of range for a rank-3 tensor",)),
    ("z = shape(x, -4)", ("shape: axis -4 out of range",)),
    ("z = gather(x, cast(x, 'i64'), 3)", ("axis 3 out of range",)),
    ("z = scatter_add(x, cast(x, 'i64'), x, -4)", ("axis -4 out of range",)),
    ("z = topk(x, 1, 3)", ("axis 3 out of range",)),
    ("z = softmax(x, 3)", ("axis 3 out of range",)),
    ("z = cumprod(x, -4)", ("axis -4 out of range",)),
    ("z = slice(x, 3, 0, 1)", ("axis 3 out of range",)),
])
def test_axis_out_of_range(tmp_path, capsys, stmt, words):
    name = stmt.split("= ")[1].split("(")[0]
    stmt_error(tmp_path, capsys, stmt, f"{name}(", *words)


def test_valid_negative_axes_still_work(tmp_path, capsys):
    p, _ = variant(tmp_path, H, "      - a, b = split(transpose(x, -1, 0), 2, -3)\n"
                                "      - c = shape(x, -1) + shape(x, 0)\n" + AT_H)
    assert lmc.compile_model(p) is not None


# --- 3. tracebacks: shape() index, deep expressions, bad inits ---------------------------------
def test_shape_axis_out_of_range_points_at_the_call(tmp_path, capsys):
    stmt_error(tmp_path, capsys, "z = shape(x, 9)", "shape(", "axis 9 out of range")


def test_very_long_expression_in_body(tmp_path, capsys):
    long = "+".join(["1"] * 5000)
    p, line = variant(tmp_path, H, f"      - z = {long}\n{AT_H}")
    check(capsys, p, line, 9, "expression too long or too deeply nested")


def test_long_but_shallow_enough_expression_is_fine(tmp_path):
    p, _ = variant(tmp_path, H, "      - z = " + "+".join(["x"] * 150) + "\n" + AT_H)
    assert lmc.compile_model(p) is not None


def test_very_long_expression_in_config(tmp_path, capsys):
    long = "+".join(["1"] * 5000)
    p, line = variant(tmp_path, "  vocab: 64", f"  vocab: {long}")
    check(capsys, p, line, 10, "expression too long or too deeply nested")


def test_very_long_set_value(tmp_path, capsys):
    p = write(tmp_path, BASE)
    msg = check(capsys, p, 2, 1, "--set d=", "expression too long",
                extra=("--set", "d=" + "+".join(["1"] * 5000)))
    assert len(msg) < 200, msg  # the value is shortened in the message


INIT = "      w2: [4 * d, d]"


@pytest.mark.parametrize("init,words", [
    ("normal(-1)", ("normal(): std must be >= 0, got -1",)),
    ("'normal(0.02, mean=inf)'", ("mean must be finite",)),
    ("'uniform(1, 0)'", ("uniform(): lo must be <= hi",)),
    ("orthogonal('a')", ("orthogonal(): gain must be a number, got the string 'a'",)),
    ("constant(1 / 0)", ("division by zero",)),
    ("[1]", ("expected an expression, got a list",)),
    ("{a: 1}", ("expected an expression, got a mapping",)),
])
def test_bad_init(tmp_path, capsys, init, words):
    p, line = variant(tmp_path, INIT, "      w2: {shape: [4 * d, d], init: %s}" % init)
    msg = check(capsys, p, line, None, *words)
    assert "YList" not in msg and "YMap" not in msg


def test_good_inits_still_compile(tmp_path):
    p, _ = variant(tmp_path, INIT, "      w2: {shape: [4 * d, d], init: 'uniform(-0.1, 0.1)'}\n"
                                   "      w3: {shape: [d], init: 'normal(0, mean=1)'}\n"
                                   "      w4: {shape: [d, d], init: orthogonal}")
    assert lmc.compile_model(p) is not None


# --- 4. messages in the user's terms, not Python's ----------------------------------------------
@pytest.mark.parametrize("stmt,words,bad", [
    ("z = split(x, 0, -1)", ("split: the number of pieces must be at least 1, got 0",),
     "modulo"),
    ("z = permute(x, 3)", ("permute expects a list of axes, got the number 3",), "iterable"),
    ("z = reshape(x, 3)", ("reshape expects a shape", "got the number 3"), "iterable"),
    ("z = split(x, 1.5, -1)", ("split expects a number of pieces or a list of sizes",
                               "got the number 1.5"), "iterable"),
    ("z = dropout(x, 0.1, 'a')", ("dropout: seed must be an integer, got the string 'a'",),
     "literal"),
    ("z = dropout(x, 'a', 1)", ("dropout: p must be a number",), "convert"),
    ("z = shape(x, 'a')", ("shape: axis must be an integer",), "tuple indices"),
    ("z = split(x, [8, 8], -1)", ("split: sizes [8, 8] add up to 16, but axis 2 has size 32",),
     "Traceback"),
    ("z = causal_mask(T, T, 1.5)", ("causal_mask: window must be an integer",), "int()"),
    ("z = clamp(x, 'a', 1)", ("clamp: lo must be a number",), "Traceback"),
    ("z = clamp(x, 1, -1)", ("clamp: lo must be <= hi",), "Traceback"),
    ("z = iota(x)", ("iota: the length must be an integer, got a tensor",), "Tensor("),
    ("z = x @ mlp", ("expected a tensor or a number, got the block 'mlp'",), "BlockDef"),
    ("z = scan(x, x, x, 1)", ("expected a block, got a tensor",), "Tensor("),
])
def test_messages_in_user_terms(tmp_path, capsys, stmt, words, bad):
    rhs = stmt.split("= ")[1]
    at = rhs.split("(")[0] + "(" if "(" in rhs else rhs
    msg = stmt_error(tmp_path, capsys, stmt, at, *words)
    assert bad not in msg, msg


@pytest.mark.parametrize("where,value", [
    ("for_in", "[1, 2]"),
    ("config", "[1, 2]"),
    ("config", "{a: 1}"),
])
def test_yaml_kind_named_not_python_class(tmp_path, capsys, where, value):
    if where == "config":
        p, line = variant(tmp_path, "  layers: 2", f"  layers: {value}")
        col = 11
    else:
        p, line = variant(tmp_path, "      in: layers", f"      in: {value}")
        col = 11
    msg = check(capsys, p, line, col, "got a list" if value.startswith("[") else "got a mapping")
    assert "YList" not in msg and "YMap" not in msg


# --- 5. accepted although invalid ----------------------------------------------------------------
X = "        - x = x + mlp(norm(x, name='n'), name='ffn')"


def test_duplicate_keyword_argument(tmp_path, capsys):
    p, line = variant(tmp_path, X, "        - x = x + mlp(norm(x, name='n'), name='ffn', "
                                   "name='g')")
    _, col = find(p, "name='g'")
    check(capsys, p, line, col, "mlp(): keyword argument 'name' given twice")


@pytest.mark.parametrize("name,words", [
    ("-3", ("block instance name must be a name", "the number -3")),
    ("''", ("block instance name must be a name", "the string ''")),
    ("'a b'", ("block instance name must be a name", "'a b'")),
    ("'a..b'", ("block instance name must be a name", "'a..b'")),
])
def test_bad_instance_name(tmp_path, capsys, name, words):
    p, line = variant(tmp_path, X, f"        - x = x + mlp(norm(x, name='n'), name={name})")
    _, col = find(p, "mlp(")
    check(capsys, p, line, col, *words)


def test_if_without_then(tmp_path, capsys):
    p, line = variant(tmp_path, "    - logits = norm(x, name='final') @ head",
                      "    - {if: 1}\n    - logits = norm(x, name='final') @ head")
    check(capsys, p, line, 7, "if statement needs 'then' or 'else'")


def test_forms_that_stay_valid(tmp_path, capsys):
    """Written before the checks above and still meant: a loop index or a dotted name as an
    instance name, an if with only an else, keepdim as 0/1, a bare normal init (std 0.02)."""
    for old, new in (("name='ffn')", "name=3)"), ("name='ffn')", "name='ffn.a')"),
                     ("- x = x + mlp(",
                      "- {if: 0, else: ['z = sum(x, -1, 1)']}\n        - x = x + mlp(")):
        p, _ = variant(tmp_path, X, X.replace(old, new))
        assert main(["compile", str(p)]) == 0, capsys.readouterr()
    p, _ = variant(tmp_path, INIT, "      w2: {shape: [4 * d, d], init: normal}")
    assert main(["compile", str(p)]) == 0, capsys.readouterr()
    capsys.readouterr()


@pytest.mark.parametrize("stmt,words", [
    ("z = sum(x, -1, 'yes')", ("sum: keepdim must be True or False, got the string 'yes'",)),
    ("z = logsumexp(x, -1, keepdim=2)", ("logsumexp: keepdim must be True or False",
                                         "got the number 2")),
    ("z = dropout(x, 0.1, 1.5)", ("dropout: seed must be an integer, got the number 1.5",)),
    ("z = gaussian_noise(x, 0.1, True)", ("gaussian_noise: seed must be an integer",)),
])
def test_bad_flag_or_seed(tmp_path, capsys, stmt, words):
    name = stmt.split("= ")[1].split("(")[0]
    stmt_error(tmp_path, capsys, stmt, f"{name}(", *words)


@pytest.mark.parametrize("value", ["!!int 64", "!!str '64'", "! 64"])
def test_any_explicit_yaml_tag_refused(tmp_path, capsys, value):
    p, line = variant(tmp_path, "  vocab: 64", f"  vocab: {value}")
    check(capsys, p, line, 10, "YAML tag", "not allowed")


def test_scope_must_be_a_name(tmp_path, capsys):
    p, line = variant(tmp_path, "      in: layers", "      in: layers\n      scope: 3")
    check(capsys, p, line + 1, 14, "scope: expects a name", "3")


def test_model_name_must_be_a_string(tmp_path, capsys):
    p, line = variant(tmp_path, "name: mini", "name: [1, 2]")
    check(capsys, p, line, 7, "name must be a non-empty string, got a list")


# --- 6. Python blocks cannot shadow built-in functions ------------------------------------------
def test_python_block_shadowing_builtin_refused():
    with pytest.raises(LmcError, match="block name 'silu' shadows a built-in function") as e:
        @lmc.block
        def silu(b, x):
            return x
    assert e.value.loc is not None and e.value.loc.file == __file__
    from lmc.blocks import REGISTRY
    assert "silu" not in REGISTRY


def test_python_block_named_like_builtin_via_name_refused():
    with pytest.raises(LmcError, match="shadows a built-in function"):
        lmc.block(lambda b, x: x, name="concat")
    with pytest.raises(LmcError, match="must be an identifier"):
        lmc.block(lambda b, x: x, name="a.b")


# --- a statement after return; presets that are not a mapping ------------------------------------
@pytest.mark.parametrize("after", ["y = undefined_name(x)", "return h @ w2 * 2"])
def test_a_statement_after_return_is_an_error(tmp_path, capsys, after):
    """Nothing after a return runs: an error at the unreachable statement, not a model that
    silently ignores it (or the second of two returns)."""
    p, line = variant(tmp_path, "      - return h @ w2", f"      - return h @ w2\n      - {after}")
    check(capsys, p, line + 1, 9, "unreachable: a statement after return")


@pytest.mark.parametrize("value", ["5", "[a]"])
def test_presets_that_are_not_a_mapping(tmp_path, capsys, value):
    lines = BASE.splitlines()
    line = lines.index("presets:") + 1
    lines[line - 1:line + 1] = [f"presets: {value}"]
    p = write(tmp_path, "\n".join(lines) + "\n")
    for extra in ((), ("--preset", "tiny")):
        check(capsys, p, line, 10, "presets must be a mapping", extra=extra)


def test_an_init_call_split_by_a_flow_mapping_comma_gets_a_hint(tmp_path, capsys):
    """{shape: [d], init: uniform(-0.1, 0.1)}: YAML ends the value at the comma; the unknown
    key error says so and how to quote it."""
    p, line = variant(tmp_path, "w1: [d, 4 * d]",
                      "      w1: {shape: [d, 4 * d], init: uniform(-0.1, 0.1)}")
    check(capsys, p, line, None, "unknown key '0.1)'", "quote the init")


# --- the Python API: errors at the user's line, values checked when built ------------------------
def test_a_scan_error_points_at_the_blocks_line_not_lmcs():
    from lmc.frontend.builder import BlockDef, Builder
    from lmc.ir.dims import Dim

    def cell(b, h, x):
        return h + x, h
    b = Builder({}, {"cell": BlockDef("cell", cell, ["h", "x"], {})})
    x = b.input("x", [Dim.sym("B"), Dim.sym("T"), 4], "f32")
    for args, msg in ((("cell", "nope", x, 1), "carry must be a tensor"),
                      (("cell", x[:, 0], x, 7), "scan axis 7 out of range")):
        with pytest.raises(LmcError, match=msg) as e:
            b.scan(*args)
        assert e.value.loc is not None and e.value.loc.file == __file__, e.value.format()


@pytest.mark.parametrize("value,dtype,msg", [
    ("abc", None, "got the string 'abc'"),
    ([[1, 2], [3]], "f32", "const: the value must be a number, a torch tensor or nested lists "
                           "of numbers, got a list that is not (ragged, or not numbers)"),
    (["a"], "f32", "got a list that is not (ragged, or not numbers)"),
    (None, "i64", "const: the value must be a number, a torch tensor or nested lists of "
                  "numbers, got None"),
    (1j, None, "got a complex"),
    (torch.tensor([1j]), None, "got a complex tensor"),
    ([0.5, 1], "i64", "const: the value holds numbers that are not i64 values"),
    (torch.tensor([0, 2]), "bool", "const: the value holds numbers that are not bool values"),
    (0.5, "i64", "const: 0.5 is not a i64 value"),
    (2, "bool", "const: 2 is not a bool value"),
    (1, "float8", "const: unknown dtype 'float8'"),
])
def test_a_bad_const_is_refused_where_it_is_built(value, dtype, msg):
    from lmc.frontend.builder import Builder
    b = Builder({}, {})
    with pytest.raises(LmcError, match=re.escape(msg)) as e:
        b.const(value, dtype)
    assert e.value.loc.file == __file__
    for good, dt in ((1, "i64"), (True, "bool"), ([[1.0, 2], [3, 4]], "i64"), ([], "f32"),
                     (torch.tensor([True, False]), "bool"), (torch.arange(3.0), "f32")):
        assert b.const(good, dt).dtype.value == dt


def test_a_bad_dtype_name_is_one_error_naming_the_function():
    from lmc.frontend.builder import Builder
    b = Builder({}, {})
    x = b.input("x", [2], "f32")
    for call, fn in ((lambda: b.cast(x, "f8"), "cast"), (lambda: b.input("y", [2], "int3"),
                                                         "input"),
                     (lambda: b.param("w", [2], dtype="fp32x"), "param 'w'"),
                     (lambda: b.iota(3, "x"), "iota")):
        with pytest.raises(LmcError, match=rf"error: {re.escape(fn)}: unknown dtype"):
            call()


def test_a_block_redefined_elsewhere_warns_and_a_rerun_does_not():
    from lmc.blocks import REGISTRY, unregister
    try:
        for _ in range(2):                 # the same definition run again: quiet
            with warnings.catch_warnings():
                warnings.simplefilter("error")

                @lmc.block
                def twice_defined(b, x):
                    return x
        with pytest.warns(UserWarning, match=r"block 'twice_defined' redefined \(the "
                                             r"definition at .*test_bad_input.py:\d+ is "
                                             r"replaced") as w:
            lmc.block(name="twice_defined")(lambda b, x: x * 2)
        assert w[0].filename == __file__            # reported at the user's line
        assert REGISTRY["twice_defined"].fn(None, 3) == 6
    finally:
        unregister("twice_defined")


def test_a_block_signature_mistake_points_at_the_function():
    for src, msg in (("def f(*a):\n    return a", "the first parameter must be the builder"),
                     ("def g(b, *a):\n    return a", "*args/**kwargs are not supported")):
        ns: dict = {}
        exec(compile(src, __file__, "exec"), ns)
        fn = next(v for k, v in ns.items() if k in "fg")
        with pytest.raises(LmcError, match=re.escape(msg)) as e:
            lmc.block(fn)
        assert e.value.loc is not None and e.value.loc.file == __file__
