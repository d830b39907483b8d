"""Every user error exits 2 with exactly one line ``FILE:LINE:COL: error: MESSAGE`` on stderr
(no traceback), pointing at the offending place in the YAML."""
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from lmc.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A minimal valid model; tests substitute one line (or a few) to break it.
BASE = textwrap.dedent("""\
    name: mini
    config:
      vocab: 64
      d: 32
      heads: 4
      head_dim: d / heads
      layers: 2
      eps: 1.0e-5
    presets:
      tiny: {d: 16, layers: 1}
    blocks:
      norm:
        args: [x]
        params:
          weight: {shape: [d], init: ones}
        body:
          - return x * rsqrt(mean(x * x, -1) + eps) * weight
      mlp:
        args: [x]
        params:
          w1: [d, 4 * d]
          w2: [4 * d, d]
        body:
          - h = silu(x @ w1)
          - return h @ w2
    model:
      inputs: {ids: [B, T]}
      params:
        embed: [vocab, d]
        head: [d, vocab]
      body:
        - x = embedding(embed, ids)
        - for: i
          in: layers
          body:
            - x = x + mlp(norm(x, name='n'), name='ffn')
        - logits = norm(x, name='final') @ head
      outputs: [logits]
    """)

LINE_RE = re.compile(r"^(?P<file>.+):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.+)$")


def write(tmp_path, text, name="m.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def edit(tmp_path, changes):
    """BASE with each line containing an `old` key replaced by its `new` text (literal,
    possibly several lines). Returns the path."""
    lines = BASE.splitlines()
    for old, new in changes.items():
        hits = [i for i, ln in enumerate(lines) if old in ln]
        assert len(hits) == 1, f"{old!r} matches lines {hits}"
        lines[hits[0]:hits[0] + 1] = new.split("\n")
    return write(tmp_path, "\n".join(lines) + "\n")


def variant(tmp_path, old, new):
    """BASE with the one line containing `old` replaced by `new` (one line, or several joined
    with newlines, written with their full indentation). Returns (path, 1-based line of the
    first line of `new`)."""
    lines = BASE.splitlines()
    hits = [i for i, ln in enumerate(lines) if old in ln]
    assert len(hits) == 1, f"{old!r} matches lines {hits}"
    i = hits[0]
    lines[i:i + 1] = new.split("\n")
    return write(tmp_path, "\n".join(lines) + "\n"), i + 1


def find(path, snippet, nth=0):
    """(line, col), 1-based, of the nth occurrence of `snippet` in the file."""
    hits = []
    with open(path) as f:
        for n, ln in enumerate(f.read().splitlines(), 1):
            start = 0
            while (c := ln.find(snippet, start)) >= 0:
                hits.append((n, c + 1))
                start = c + 1
    assert len(hits) > nth, f"{snippet!r} not in {path}"
    return hits[nth]


def fail(capsys, path, *extra):
    """Run `lmc compile PATH ...` in-process; assert exit 2 and one error line; return
    (file, line, col, message)."""
    rc = main(["compile", str(path), *extra])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    m = LINE_RE.match(lines[0])
    assert m, lines[0]
    return m["file"], int(m["line"]), int(m["col"]), m["msg"]


def check(capsys, path, line=None, col=None, *words, extra=()):
    file, ln, cl, msg = fail(capsys, path, *extra)
    assert file == str(path), (file, msg)
    if line is not None:
        assert ln == line, (ln, cl, msg)
    if col is not None:
        assert cl == col, (ln, cl, msg)
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    return msg


def test_base_model_compiles(tmp_path, capsys):
    p = write(tmp_path, BASE)
    assert main(["compile", p, "--json"]) == 0
    assert main(["compile", p, "--preset", "tiny", "--json"]) == 0


# --- YAML syntax and structure -----------------------------------------------------------------
def test_yaml_syntax_error_unclosed_flow(tmp_path, capsys):
    p, line = variant(tmp_path, "tiny: {d: 16", "  tiny: {d: 16, layers: 1")
    _, ln, _, msg = fail(capsys, p)
    assert "YAML syntax error" in msg
    assert line <= ln <= line + 1  # where the flow mapping should have closed


def test_yaml_syntax_error_bad_indent(tmp_path, capsys):
    p, line = variant(tmp_path, "  layers: 2", "  layers: 2\n   bad: 3")
    check(capsys, p, line + 1, None, "YAML syntax error")


def test_yaml_syntax_error_tab(tmp_path, capsys):
    p, line = variant(tmp_path, "  eps: 1.0e-5", "\teps: 1.0e-5")
    check(capsys, p, line, 1, "YAML syntax error")


def test_empty_file(tmp_path, capsys):
    p = write(tmp_path, "")
    check(capsys, p, 1, 1, "empty")


def test_whitespace_only_file(tmp_path, capsys):
    p = write(tmp_path, "\n   \n\n")
    check(capsys, p, 1, 1, "empty")


def test_comment_only_file(tmp_path, capsys):
    p = write(tmp_path, "# just a comment\n   # another\n")
    check(capsys, p, 1, 1, "empty")


def test_missing_file(tmp_path, capsys):
    p = str(tmp_path / "nope.yaml")
    check(capsys, p, 1, 1, "no such file")


def test_directory(tmp_path, capsys):
    d = tmp_path / "dir.yaml"
    d.mkdir()
    check(capsys, str(d), 1, 1, "directory")


def test_top_level_not_a_mapping(tmp_path, capsys):
    p = write(tmp_path, "- a\n- b\n")
    check(capsys, p, 1, 1, "mapping")


def test_non_utf8(tmp_path, capsys):
    p = tmp_path / "m.yaml"
    p.write_bytes(b"name: \xff\xfe\n")
    check(capsys, str(p), 1, 1, "UTF-8")


# --- YAML tags, anchors, alias bombs: nothing is ever constructed or run -------------------------
@pytest.mark.parametrize("tag", [
    '!!python/object/apply:os.system ["touch {marker}"]',
    "!!python/name:os.system",
    '!!python/object/new:os.system ["touch {marker}"]',
    "!!python/module:os",
    "!custom foo",
])
def test_yaml_tags_refused_and_not_run(tmp_path, capsys, tag):
    marker = tmp_path / "pwned"
    p, line = variant(tmp_path, "  vocab: 64", "  vocab: " + tag.format(marker=marker))
    check(capsys, p, line, 10, "tag", "not allowed")
    assert not marker.exists()


def test_yaml_tag_on_key_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    p, line = variant(tmp_path, "name: mini",
                      f'? !!python/object/apply:os.system ["touch {marker}"]\n: mini')
    check(capsys, p, line, 3, "tag")
    assert not marker.exists()


def test_anchor_refused(tmp_path, capsys):
    p, line = variant(tmp_path, "  vocab: 64", "  vocab: &v 64\n  other: *v")
    check(capsys, p, line, 10, "anchor")


def test_billion_laughs_refused_fast(tmp_path, capsys):
    text = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for c in "bcdefghi":
        text.append(f"{c}: &{c} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = c
    text.append("model: *i")
    p = write(tmp_path, "\n".join(text) + "\n")
    t0 = time.perf_counter()
    check(capsys, p, 1, 4, "anchor")
    assert time.perf_counter() - t0 < 1.0


def test_alias_without_anchor_refused(tmp_path, capsys):
    # an alias to an undefined anchor is a YAML error; still one line, no traceback
    p, line = variant(tmp_path, "  vocab: 64", "  vocab: *nothing")
    check(capsys, p, line, None)


# --- duplicate names ---------------------------------------------------------------------------
def test_duplicate_yaml_key(tmp_path, capsys):
    p, line = variant(tmp_path, "  layers: 2", "  layers: 2\n  d: 48")
    check(capsys, p, line + 1, 3, "duplicate key", "'d'", "line 4")


def test_duplicate_block_name(tmp_path, capsys):
    p, line = variant(tmp_path, "  mlp:", "  norm:")
    check(capsys, p, line, 3, "duplicate key", "'norm'")


def test_duplicate_param_name_in_yaml(tmp_path, capsys):
    p, line = variant(tmp_path, "    head: [d, vocab]", "    head: [d, vocab]\n    embed: [d, d]")
    check(capsys, p, line + 1, 5, "duplicate key", "'embed'")


def test_duplicate_block_instance_name(tmp_path, capsys):
    p, line = variant(tmp_path, "    - logits = norm(x, name='final') @ head",
                      "    - y = norm(x, name='final')\n"
                      "    - logits = norm(y, name='final') @ head")
    _, col = find(p, "norm(y")
    check(capsys, p, line + 1, col, "duplicate block instance name", "'final'")


def test_duplicate_instance_name_in_loop_body(tmp_path, capsys):
    p, line = variant(tmp_path, "        - x = x + mlp(norm(x, name='n'), name='ffn')",
                      "        - x = x + mlp(norm(x, name='n'), name='ffn')\n"
                      "        - x = x + mlp(x, name='ffn')")
    _, col = find(p, "mlp(x, name")
    check(capsys, p, line + 1, col, "duplicate block instance name", "'ffn'")


def test_duplicate_param_from_reused_loop_scope(tmp_path, capsys):
    # a second loop with the same scope name instantiates layers.0.ffn again: its params clash
    # (reported at the clashing parameter's declaration, naming the full parameter name)
    p, _ = variant(tmp_path, "    - logits = norm(x, name='final') @ head",
                   "    - for: j\n      in: 1\n      scope: layers\n      body:\n"
                   "        - x = mlp(x, name='ffn')\n"
                   "    - logits = norm(x, name='final') @ head")
    line, col = find(p, "w1: [d, 4 * d]")
    check(capsys, p, line, col + 4, "duplicate parameter name 'layers.0.ffn.w1'")


def test_duplicate_block_arg(tmp_path, capsys):
    lines = BASE.splitlines()
    i = lines.index("    args: [x]")
    lines[i] = "    args: [x, x]"
    p = write(tmp_path, "\n".join(lines) + "\n")
    check(capsys, p, i + 1, 11, "duplicate argument")


# --- body expressions: unknown functions, arity, shapes, names --------------------------------
H = "      - h = silu(x @ w1)"          # a statement in block mlp
X = "        - x = x + mlp(norm(x, name='n'), name='ffn')"   # the loop body in the model


def body_error(tmp_path, capsys, old, new, at, *words):
    """Replace a body line; the error must be on that line, at the column where `at`
    starts."""
    p, line = variant(tmp_path, old, new)
    _, col = find(p, at)
    return check(capsys, p, line, col, *words)


def test_unknown_function(tmp_path, capsys):
    body_error(tmp_path, capsys, H, "      - h = frobnicate(x @ w1)", "frobnicate",
               "unknown function 'frobnicate'", "a Python block's file is given with --import")


def test_a_misspelt_function_gets_the_closest_name(tmp_path, capsys):
    body_error(tmp_path, capsys, H, "      - h = softmx(x @ w1)", "softmx",
               "unknown function 'softmx' (did you mean 'softmax'?)")


def test_unknown_function_in_config(tmp_path, capsys):
    p, line = variant(tmp_path, "  vocab: 64", "  vocab: frob(3)")
    check(capsys, p, line, 10, "unknown function 'frob'")


def test_wrong_arity_unary_op(tmp_path, capsys):
    body_error(tmp_path, capsys, H, "      - h = exp(x, x)", "exp(", "exp()", "2 were given")


def test_wrong_arity_no_args(tmp_path, capsys):
    body_error(tmp_path, capsys, H, "      - h = exp()", "exp(", "exp()", "missing")


def test_wrong_arity_where(tmp_path, capsys):
    body_error(tmp_path, capsys, H, "      - h = where(x > 0, x)", "where(", "where()",
               "missing", "'b'")


def test_unknown_keyword(tmp_path, capsys):
    body_error(tmp_path, capsys, H, "      - h = silu(x @ w1, approximate='tanh')", "silu(",
               "unexpected keyword", "approximate")


def test_block_called_with_too_many_tensor_args(tmp_path, capsys):
    body_error(tmp_path, capsys, X, "        - x = x + mlp(norm(x, name='n'), x, name='ffn')",
               "mlp(", "block mlp takes 1 tensor argument", "got 2")


def test_block_called_with_no_tensor_args(tmp_path, capsys):
    body_error(tmp_path, capsys, X, "        - x = x + mlp(name='ffn')", "mlp(",
               "block mlp takes 1 tensor argument", "got 0")


def test_block_unknown_option(tmp_path, capsys):
    body_error(tmp_path, capsys, X, "        - x = x + mlp(x, name='ffn', bogus=3)", "mlp(",
               "no option 'bogus'")


def test_shape_mismatch_matmul_names_both_shapes(tmp_path, capsys):
    # x: [B, T, 32] @ w2: [128, 32]
    msg = body_error(tmp_path, capsys, H, "      - h = silu(x @ w2)", "x @ w2", "matmul")
    assert "[B, T, 32]" in msg and "[128, 32]" in msg


def test_shape_mismatch_from_param_declaration(tmp_path, capsys):
    # the param is fine on its own; the mismatch is reported where it is used
    p, _ = variant(tmp_path, "      w2: [4 * d, d]", "      w2: [d, 2 * d]")
    line, col = find(p, "h @ w2")
    msg = check(capsys, p, line, col, "matmul")
    assert "[B, T, 128]" in msg and "[32, 64]" in msg


def test_shape_mismatch_matmul_3d_by_2d(tmp_path, capsys):
    p = edit(tmp_path, {"      w1: [d, 4 * d]": "      w1: [2 * d, 4 * d]"})
    line, col = find(p, "x @ w1")
    msg = check(capsys, p, line, col, "matmul")
    assert "[B, T, 32]" in msg and "[64, 128]" in msg


def test_shape_mismatch_broadcast(tmp_path, capsys):
    msg = body_error(tmp_path, capsys, H, "      - h = silu(x @ w1) + x", "silu(",
                     "broadcast")
    assert "[B, T, 128]" in msg and "[B, T, 32]" in msg


def test_undefined_name_in_body(tmp_path, capsys):
    body_error(tmp_path, capsys, H, "      - h = silu(y @ w1)", "y @", "undefined name 'y'")


def test_undefined_name_in_model_body(tmp_path, capsys):
    p, line = variant(tmp_path, "    - logits = norm(x, name='final') @ head",
                      "    - logits = norm(x, name='final') @ lm_head")
    _, col = find(p, "lm_head")
    check(capsys, p, line, col, "undefined name 'lm_head'")


def test_undefined_name_in_config(tmp_path, capsys):
    p, line = variant(tmp_path, "  head_dim: d / heads", "  head_dim: d / n_heads")
    check(capsys, p, line, 17, "undefined name 'n_heads'")


def test_undefined_name_in_shape(tmp_path, capsys):
    p, line = variant(tmp_path, "      w1: [d, 4 * d]", "      w1: [d, 4 * ffn]")
    check(capsys, p, line, find(p, "ffn")[1], "undefined name 'ffn'")


def test_undefined_output(tmp_path, capsys):
    p, line = variant(tmp_path, "  outputs: [logits]", "  outputs: [logitz]")
    check(capsys, p, line, find(p, "logitz")[1], "'logitz'")


def test_expression_syntax_error(tmp_path, capsys):
    p, line = variant(tmp_path, H, "      - h = silu(x @ w1")
    _, ln, cl, msg = fail(capsys, p)
    assert ln == line and "syntax error" in msg
    assert find(p, "h = silu")[1] <= cl


def test_unknown_key_in_param_with_mixed_type_keys(tmp_path, capsys):
    # unquoted commas in a flow mapping make int keys; must not crash sorting the keys
    p, line = variant(tmp_path, "      w1: [d, 4 * d]",
                      "      w1: {shape: [d, 4 * d], init: normal(1, 2, 3)}")
    check(capsys, p, line, None, "unknown key", "'w1'")


def test_statement_of_unknown_form(tmp_path, capsys):
    p, line = variant(tmp_path, H, "      - import os")
    check(capsys, p, line, 9, "not allowed")


# --- cycles ---------------------------------------------------------------------------------
def test_block_calls_itself(tmp_path, capsys):
    p, line = variant(tmp_path, "      - return h @ w2", "      - return mlp(h) @ w2")
    check(capsys, p, line, 9, "cyclic block reference", "mlp -> mlp")


def test_two_blocks_call_each_other(tmp_path, capsys):
    p = edit(tmp_path, {
        "      - return x * rsqrt(": "      - return mlp(x)",
        "      - return h @ w2": "      - return norm(h) @ w2",
    })
    _, ln, cl, msg = fail(capsys, p)
    assert "cyclic block reference" in msg
    assert "norm -> mlp -> norm" in msg or "mlp -> norm -> mlp" in msg
    assert (ln, cl) in (find(p, "return mlp(x)"), find(p, "return norm(h)"))


def test_cycle_through_loop_body(tmp_path, capsys):
    p = edit(tmp_path, {"      - return h @ w2": "      - for: j\n        in: 1\n        body:\n"
                        "          - h = mlp(h)\n      - return h @ w2"})
    line, col = find(p, "h = mlp(h)")
    check(capsys, p, line, col, "cyclic block reference", "mlp -> mlp")


def test_config_cycle_self(tmp_path, capsys):
    p, line = variant(tmp_path, "  vocab: 64", "  vocab: vocab + 1")
    check(capsys, p, line, 10, "cycle", "vocab -> vocab")


def test_config_cycle_two(tmp_path, capsys):
    p = edit(tmp_path, {"  vocab: 64": "  vocab: d * 2", "  d: 32": "  d: vocab / 2"})
    _, ln, cl, msg = fail(capsys, p)
    assert "cycle" in msg and ("vocab -> d -> vocab" in msg or "d -> vocab -> d" in msg)
    assert (ln, cl) in ((3, 10), (4, 6))


# --- config values --------------------------------------------------------------------------
@pytest.mark.parametrize("value,words", [
    ("[1, 2]", ("config 'vocab'", "number")),
    ("{a: 1}", ("config 'vocab'", "number")),
    ("null", ("config 'vocab'", "number")),
    ("seven", ("undefined name 'seven'",)),
    ("\"'seven'\"", ("config 'vocab'", "numeric", "'seven'")),
])
def test_non_numeric_config(tmp_path, capsys, value, words):
    p, line = variant(tmp_path, "  vocab: 64", "  vocab: " + value)
    check(capsys, p, line, 10, *words)


@pytest.mark.parametrize("expr", ["64 / 0", "64 // (d - 32)", "64 % 0", "0 ** -1"])
def test_config_division_by_zero(tmp_path, capsys, expr):
    p, line = variant(tmp_path, "  vocab: 64", "  vocab: " + expr)
    check(capsys, p, line, 10, "division by zero")


def test_config_division_by_zero_through_another_key(tmp_path, capsys):
    # heads: 0 makes head_dim = d / heads divide by zero: reported at head_dim's expression
    p = edit(tmp_path, {"  heads: 4": "  heads: 0"})
    line, col = find(p, "d / heads")
    check(capsys, p, line, col, "division by zero")


@pytest.mark.parametrize("expr,at", [
    ("silu(x @ w1) * (1 / 0)", "1 / 0"),
    ("silu(x @ w1) * (d // (heads - 4))", "d // "),
    ("silu(x @ w1) / 0", "silu("),
    ("silu(x @ w1) / (d - 32)", "silu("),
])
def test_body_division_by_zero(tmp_path, capsys, expr, at):
    body_error(tmp_path, capsys, H, "      - h = " + expr, at, "division by zero")


def test_config_number_too_large(tmp_path, capsys):
    p, line = variant(tmp_path, "  vocab: 64", "  vocab: 10 ** 10000")
    check(capsys, p, line, 10, "too large")


# --- dimensions -----------------------------------------------------------------------------
def test_negative_dim_in_param(tmp_path, capsys):
    p, line = variant(tmp_path, "      w1: [d, 4 * d]", "      w1: [d, d - 64]")
    check(capsys, p, line, find(p, "d - 64")[1], "negative dimension -32")


def test_negative_dim_in_input(tmp_path, capsys):
    p, line = variant(tmp_path, "  inputs: {ids: [B, T]}", "  inputs: {ids: [B, -3]}")
    check(capsys, p, line, find(p, "-3")[1], "negative dimension -3")


def test_negative_dim_in_body(tmp_path, capsys):
    body_error(tmp_path, capsys, H, "      - h = iota(d - 64)", "iota(", "negative dimension")


def test_negative_dim_from_set(tmp_path, capsys):
    p = write(tmp_path, BASE)
    line, col = find(p, "embed: [vocab, d]")
    check(capsys, p, line, col + len("embed: [vocab, "), "negative dimension -32",
          extra=("--set", "d=-32"))


def test_zero_dim_param_from_set(tmp_path, capsys):
    """vocab=0 was an error at the first reshape that met the empty axis (the logits' line,
    about a -1 the file never wrote)."""
    p = write(tmp_path, BASE)
    line, col = find(p, "embed: [vocab, d]")
    check(capsys, p, line, col + len("embed: "), "parameter 'embed' has shape [0, ",
          "every dimension must be at least 1", extra=("--set", "vocab=0"))


def test_huge_param_refused(tmp_path, capsys):
    p, line = variant(tmp_path, "    embed: [vocab, d]", "    embed: [100000, 100000]")
    msg = check(capsys, p, line, None, "2^31")
    assert "[100000, 100000]" in msg


def test_huge_input_refused(tmp_path, capsys):
    p, line = variant(tmp_path, "  inputs: {ids: [B, T]}", "  inputs: {ids: [B, 3000000000]}")
    check(capsys, p, line, None, "2^31")


def test_huge_intermediate_refused(tmp_path, capsys):
    body_error(tmp_path, capsys, H, "      - h = iota(100000 * 100000)", "iota(", "2^31")


def test_astronomical_dim_refused(tmp_path, capsys):
    p, line = variant(tmp_path, "    embed: [vocab, d]", "    embed: [vocab, 2 ** 10000]")
    check(capsys, p, line, find(p, "2 ** 10000")[1], "too large")


def test_float_dim_refused(tmp_path, capsys):
    p, line = variant(tmp_path, "      w1: [d, 4 * d]", "      w1: [d, d / 3]")
    check(capsys, p, line, find(p, "d / 3")[1], "must be an integer", "10.6")


# --- expressions outside the whitelist never run ------------------------------------------------
def _attack(marker):
    return f"__import__('os').system('touch {marker}')"


def test_import_in_body_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    p, line = variant(tmp_path, H, "      - h = " + _attack(marker))
    check(capsys, p, line, find(p, "__import__")[1], "not allowed")
    assert not marker.exists()


def test_import_in_config_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    p, line = variant(tmp_path, "  vocab: 64", "  vocab: " + _attack(marker))
    check(capsys, p, line, 10, "not allowed")
    assert not marker.exists()


def test_import_call_refused(tmp_path, capsys):
    p, line = variant(tmp_path, H, "      - h = __import__('os')")
    check(capsys, p, line, find(p, "__import__")[1], "'__import__'")


def test_import_in_init_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    p, line = variant(tmp_path, "      w1: [d, 4 * d]",
                      f"      w1: {{shape: [d, 4 * d], init: \"{_attack(marker)}\"}}")
    check(capsys, p, line, find(p, "__import__")[1], "not allowed")
    assert not marker.exists()


def test_import_in_set_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    p = write(tmp_path, BASE)
    check(capsys, p, None, None, "--set d=", "not allowed", extra=("--set", "d=" + _attack(marker)))
    assert not marker.exists()


@pytest.mark.parametrize("expr,at,words", [
    ("x.__class__", "x.__class__", ("attribute access",)),
    ("().__class__.__bases__", "()", ("attribute access",)),
    ("x.shape", "x.shape", ("attribute access",)),
    ('"(lambda: 1)()"', "lambda", ("lambda",)),
    ('"(lambda y: y)(x)"', "lambda", ("lambda",)),
    ('"silu(lambda: x)"', "lambda", ("lambda",)),
    ("[i for i in range(3)]", "[i for", ("comprehension",)),
    ("sum(i for i in (1, 2))", "(i for", ("comprehension",)),
    ("getattr(x, 'shape')", "getattr", ("unknown function 'getattr'",)),
    ("eval('1')", "eval", ("unknown function 'eval'",)),
    ("open('/etc/passwd')", "open", ("unknown function 'open'",)),
    ("__builtins__", "__builtins__", ("'__builtins__'", "not allowed")),
    ("silu(*x)", "*x", ("starred",)),
    ("silu(**x)", "silu", ("**kwargs",)),
    ("f'{x}'", "f'", ("f-string",)),
    ('"{1: 2}"', "{1", ("dict",)),
    ("(h := x)", "h :=", (":=",)),
])
def test_refused_expression(tmp_path, capsys, expr, at, words):
    # a quoted expression is written as a quoted YAML string (': ' would start a mapping)
    p, line = variant(tmp_path, H, "      - h = " + expr if not expr.startswith('"')
                      else '      - "h = ' + expr[1:])
    _, col = find(p, at)
    check(capsys, p, line, col, *words)


@pytest.mark.parametrize("expr,at,words", [
    ("().__class__.__bases__", "()", ("attribute access",)),
    ("'(lambda: 3)()'", "lambda", ("lambda",)),
    ("'[x for x in (1,)][0]'", "[x for", ("comprehension",)),
    ("d.real", "d.real", ("attribute access",)),
])
def test_refused_config_expression(tmp_path, capsys, expr, at, words):
    p, line = variant(tmp_path, "  vocab: 64", "  vocab: " + expr)
    check(capsys, p, line, find(p, at)[1], *words, "config expression")


# --- presets and --set --------------------------------------------------------------------------
def test_unknown_preset(tmp_path, capsys):
    p = write(tmp_path, BASE)
    line, col = find(p, "presets:")
    check(capsys, p, line, col, "unknown preset 'huge'", "tiny", extra=("--preset", "huge"))


def test_unknown_preset_without_presets_section(tmp_path, capsys):
    p = edit(tmp_path, {"presets:": "", "  tiny: {d: 16": ""})
    check(capsys, p, 1, 1, "unknown preset 'tiny'", "none", extra=("--preset", "tiny"))


def test_preset_sets_unknown_key(tmp_path, capsys):
    p, line = variant(tmp_path, "  tiny: {d: 16", "  tiny: {d: 16, ffn: 7}")
    check(capsys, p, line, find(p, "7}")[1], "preset 'tiny'", "unknown config key 'ffn'",
          extra=("--preset", "tiny"))


def test_set_unknown_key(tmp_path, capsys):
    p = write(tmp_path, BASE)
    msg = check(capsys, p, 2, 1, "--set", "unknown config key 'bogus'", extra=("--set", "bogus=3"))
    assert "vocab" in msg  # lists the known keys


@pytest.mark.parametrize("item", ["d", "=3", "d=", "  =  "])
def test_malformed_set(tmp_path, capsys, item):
    """A command-line problem: 'lmc: error:', not a place in the model file (so are -o at a
    file and verify --skip of no check)."""
    p = write(tmp_path, BASE)
    assert main(["compile", p, "--set", item]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [" ".join(f"lmc: error: --set expects key=value, got {item!r}".split())], err
    assert main(["compile", p, "-o", p]) == 2
    assert capsys.readouterr().err.strip() == f"lmc: error: -o {p}: exists and is not a directory"


@pytest.mark.parametrize("item,words", [
    ("d=seven", ("--set d=seven", "undefined name 'seven'")),
    ("d=[1]", ("--set d=[1]", "numeric")),
    ("d=1/0", ("--set d=1/0", "division by zero")),
    ("d==3", ("--set d==3", "syntax error")),
])
def test_bad_set_value(tmp_path, capsys, item, words):
    p = write(tmp_path, BASE)
    check(capsys, p, 2, 1, *words, extra=("--set", item))


def test_set_cycle_reported_once(tmp_path, capsys):
    p = write(tmp_path, BASE)
    msg = check(capsys, p, None, None, "cycle", extra=("--set", "d=vocab", "vocab=d"))
    assert msg.count("--set") == 1, msg


# --- the real command line ----------------------------------------------------------------------
# Each `python -m lmc.cli` start costs ~2 s (torch is imported), so the three runs start together
# in one fixture and the tests below check one result each.
@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    marker = d / "pwned"
    lines = BASE.splitlines()
    cases = {}  # name -> (argv after "compile", expected error line)
    i = lines.index("  vocab: 64")
    tag = d / "tag.yaml"
    tag.write_text("\n".join(lines[:i] + [f'  vocab: !!python/object/apply:os.system '
                                          f'["touch {marker}"]'] + lines[i + 1:]) + "\n")
    cases["tag"] = ([str(tag)], i + 1)
    j = lines.index(H)
    shape = d / "shape.yaml"
    shape.write_text("\n".join(lines[:j] + ["      - h = silu(x @ w2)"] + lines[j + 1:]) + "\n")
    cases["shape"] = ([str(shape)], j + 1)
    ok = d / "ok.yaml"
    ok.write_text(BASE)
    cases["set"] = ([str(ok), "--set", "nope=1"], 2)
    procs = {k: subprocess.Popen([sys.executable, "-m", "lmc.cli", "compile", *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=ROOT)
             for k, (args, _) in cases.items()}
    out = {}
    for k, pr in procs.items():
        so, se = pr.communicate(timeout=120)
        out[k] = (pr.returncode, so, se, cases[k][0][0], cases[k][1])
    out["marker"] = marker
    return out


def _one_error_line(run):
    rc, so, se, path, line = run
    assert rc == 2, run
    assert "Traceback" not in se
    assert so == ""
    lines = se.splitlines()
    assert len(lines) == 1, se
    m = LINE_RE.match(lines[0])
    assert m and m["file"] == path and int(m["line"]) == line, lines[0]
    return m


def test_subprocess_yaml_tag_not_executed(cli_runs):
    m = _one_error_line(cli_runs["tag"])
    assert m["col"] == "10" and "python/object/apply:os.system is not allowed" in m["msg"]
    assert not cli_runs["marker"].exists()


def test_subprocess_shape_error(cli_runs):
    m = _one_error_line(cli_runs["shape"])
    assert "[B, T, 32]" in m["msg"] and "[128, 32]" in m["msg"]


def test_subprocess_bad_set(cli_runs):
    assert "unknown config key 'nope'" in _one_error_line(cli_runs["set"])["msg"]
