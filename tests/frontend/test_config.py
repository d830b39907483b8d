"""The config section: derived values, presets, --set (applied after the preset, values are
expressions), cycles, and non-integer values used as dimensions."""
import json
import os
import re
import textwrap

import pytest

from lmc.cli import main
from lmc.errors import LmcError
from lmc.frontend.model import load_graph, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA = os.path.join(ROOT, "zoo", "llama.yaml")

MODEL = textwrap.dedent("""\
    name: cfg
    config:
      vocab: 64
      d: 768
      heads: 12
      head_dim: d / heads
      ffn: 4 * d
      layers: 2
      eps: 1.0e-5
      scale: head_dim ** -0.5
    presets:
      tiny: {d: 64, heads: 4, layers: 1}
      wide: {d: 2 * 96, ffn: d * 3}
    blocks:
      attn_proj:
        args: [x]
        params:
          wq: [d, heads * head_dim]
        body:
          - q = reshape(x @ wq, [B, T, heads, head_dim])
          - return reshape(q * scale, [B, T, d])
    model:
      inputs: {ids: [B, T]}
      params:
        embed: [vocab, d]
        head: [d, vocab]
      body:
        - x = embedding(embed, ids)
        - x = attn_proj(x)
        - logits = x @ head
      outputs: [logits]
    """)

LINE_RE = re.compile(r"^(?P<file>.+):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.+)$")


@pytest.fixture
def model(tmp_path):
    def make(text=MODEL, **subs):
        for old, new in subs.items():
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        p = tmp_path / "m.yaml"
        p.write_text(text)
        return str(p)
    return make


def config(path, preset=None, overrides=None):
    return load_graph(path, preset, overrides).meta["config"]


def error(capsys, *argv):
    rc = main(["compile", *argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    m = LINE_RE.match(lines[0])
    assert m, lines[0]
    return m["file"], int(m["line"]), int(m["col"]), m["msg"]


def line_of(path, snippet):
    with open(path) as f:
        for n, ln in enumerate(f.read().splitlines(), 1):
            if snippet in ln:
                return n, ln.index(snippet) + 1
    raise AssertionError(snippet)


# --- derived values ------------------------------------------------------------------------------
def test_derived_head_dim_is_int(model):
    c = config(model())
    assert c["head_dim"] == 64 and type(c["head_dim"]) is int
    assert c["ffn"] == 3072 and type(c["ffn"]) is int
    assert c["scale"] == pytest.approx(64 ** -0.5)
    assert c["eps"] == 1e-5


def test_order_does_not_matter(model):
    # head_dim refers to keys defined before and after it
    p = model(**{"  head_dim: d / heads\n": "", "  scale: head_dim ** -0.5\n":
                 "  scale: head_dim ** -0.5\n  head_dim: d / heads\n"})
    assert config(p)["head_dim"] == 64


def test_inexact_division_stays_float_until_used(model):
    p = model(**{"      wq: [d, heads * head_dim]": "      wq: [d, d]",
                 "      - q = reshape(x @ wq, [B, T, heads, head_dim])": "      - q = x @ wq",
                 "      - return reshape(q * scale, [B, T, d])": "      - return q",
                 "  d: 768": "  d: 100", "  heads: 12": "  heads: 8"})
    c = config(p)
    assert c["head_dim"] == 12.5 and isinstance(c["head_dim"], float)


def test_integral_float_is_a_valid_dimension(model):
    p = model(**{"  ffn: 4 * d": "  ffn: d * 2.5", "      wq: [d, heads * head_dim]":
                 "      wq: [d, heads * head_dim]\n      w2: [d, ffn]"})
    g = load_graph(p)
    assert g.meta["config"]["ffn"] == 1920.0
    shapes = {n.attrs["name"]: n.attrs["shape"] for n in _params(g)}
    assert shapes["attn_proj.w2"] == (768, 1920)


def _params(g):
    from lmc.ir.ops import Op

    stack = list(g.nodes)
    while stack:
        n = stack.pop()
        if n.op is Op.BLOCK:
            stack.extend(n.attrs["body"].nodes)
        elif n.op is Op.PARAM:
            yield n


def test_constants_usable(model):
    p = model(**{"  eps: 1.0e-5": "  eps: 1.0e-5\n  big: -inf\n  circle: 2 * pi"})
    c = config(p)
    assert c["big"] == float("-inf") and c["circle"] == pytest.approx(6.283185307)


def test_bool_config_drives_if(model):
    p = model(**{"  eps: 1.0e-5": "  eps: 1.0e-5\n  tie: true",
                 "    - logits = x @ head":
                 "    - if: tie\n      then: ['logits = x @ transpose(embed)']\n"
                 "      else: ['logits = x @ head']"})
    assert config(p)["tie"] is True
    assert config(p, overrides=["tie=False"])["tie"] is False
    assert config(p, overrides=["tie=false"])["tie"] is False   # YAML spelling
    assert config(p, overrides=["tie=d > 512"])["tie"] is True  # an expression


def test_bool_config_as_dimension_is_an_error(model, capsys):
    p = model(**{"  eps: 1.0e-5": "  eps: 1.0e-5\n  tie: true", "    embed: [vocab, d]":
                 "    embed: [vocab, tie]"})
    _, line, col, msg = error(capsys, p)
    assert (line, col) == line_of(p, "tie]") and "must be an integer" in msg


# --- presets and --set ---------------------------------------------------------------------------
def test_preset_recomputes_derived_values(model):
    c = config(model(), "tiny")
    assert (c["d"], c["heads"], c["head_dim"], c["ffn"], c["layers"]) == (64, 4, 16, 256, 1)


def test_preset_values_are_expressions(model):
    c = config(model(), "wide")
    assert c["d"] == 192 and c["ffn"] == 576 and c["head_dim"] == 16


def test_set_applied_after_preset(model):
    c = config(model(), "tiny", ["d=48"])
    assert c["d"] == 48            # --set wins over the preset
    assert c["heads"] == 4 and c["layers"] == 1   # the rest of the preset still applies
    assert c["head_dim"] == 12 and c["ffn"] == 192


def test_set_value_expressions(model):
    c = config(model(), None, ["heads=8", "d=2*64"])
    assert c["d"] == 128 and type(c["d"]) is int and c["head_dim"] == 16
    c = config(model(), None, ["heads=8", "d=heads * 16"])
    assert c["d"] == 128 and c["head_dim"] == 16
    c = config(model(), None, ["eps=1e-6", "layers=max(1, 3 // 2)"])
    assert c["eps"] == 1e-6 and c["layers"] == 1


def test_set_later_item_wins():
    assert parse_overrides(["d=3", " d = 4 "]) == {"d": "4"}


def test_set_via_cli_after_preset(model, capsys):
    assert main(["compile", model(), "--preset", "tiny", "--set", "d=2*64", "heads=8",
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["preset"] == "tiny"
    assert s["config"]["d"] == 128 and s["config"]["head_dim"] == 16
    assert s["config"]["layers"] == 1


def test_set_dict_form(model):
    assert config(model(), overrides={"d": 96, "heads": 3})["head_dim"] == 32


# --- errors --------------------------------------------------------------------------------------
def test_config_cycle_two_keys(model, capsys):
    p = model(**{"  d: 768": "  d: head_dim * heads"})
    _, line, col, msg = error(capsys, p)
    assert "cycle" in msg and ("d -> head_dim -> d" in msg or "head_dim -> d -> head_dim" in msg)
    assert (line, col) in (line_of(p, "head_dim * heads"), line_of(p, "d / heads"))


def test_config_cycle_three_keys(model, capsys):
    p = model(**{"  vocab: 64": "  vocab: layers * 2", "  layers: 2": "  layers: eps + 1",
                 "  eps: 1.0e-5": "  eps: vocab / 3"})
    _, line, _, msg = error(capsys, p)
    assert "cycle" in msg and msg.count("->") == 3
    assert line in (3, 8, 9)


def test_config_cycle_through_set(model, capsys):
    _, line, col, msg = error(capsys, model(), "--set", "heads=d / 64", "d=heads * 64")
    assert "cycle" in msg and msg.count("--set") == 1
    assert (line, col) == (2, 1)   # --set values have no line of their own: the config key


def test_config_self_reference(model, capsys):
    p = model(**{"  layers: 2": "  layers: layers + 1"})
    _, line, col, msg = error(capsys, p)
    assert "layers -> layers" in msg and (line, col) == line_of(p, "layers + 1")


def test_non_integer_head_dim_in_reshape_is_named(model, capsys):
    # d / heads = 768 / 5 = 153.6: the error is at the reshape and names head_dim
    p = model(**{"      wq: [d, heads * head_dim]": "      wq: [d, d]"})
    _, line, col, msg = error(capsys, p, "--set", "heads=5")
    assert (line, col) == line_of(p, "reshape(x @ wq")
    assert "head_dim" in msg and "153.6" in msg


def test_non_integer_head_dim_in_param_shape_is_named(model, capsys):
    p = model(**{"      wq: [d, heads * head_dim]": "      wq: [d, d]\n      wk: [d, head_dim]"})
    _, line, col, msg = error(capsys, p, "--set", "heads=5")
    assert (line, col) == line_of(p, "head_dim]")
    assert "head_dim" in msg and "must be an integer" in msg


def test_non_integer_head_dim_in_llama_is_named(capsys):
    _, line, _, msg = error(capsys, LLAMA, "--preset", "tiny", "--set", "heads=3")
    assert "head_dim" in msg and "21.3" in msg
    with open(LLAMA) as f:
        assert "head_dim" in f.read().splitlines()[line - 1]


def test_reserved_config_key(model, capsys):
    p = model(**{"  layers: 2": "  layers: 2\n  T: 128"})
    _, line, col, msg = error(capsys, p)
    assert (line, col) == line_of(p, "T: 128") and "reserved" in msg


def test_config_not_a_mapping(model, capsys):
    p = model(**{"config:\n": "config: [1, 2]\nold_config:\n"})
    _, line, col, msg = error(capsys, p)
    # refused as an unknown top-level key (old_config) or as a config that is not a mapping
    assert (line, col) in ((2, 9), (3, 1)), msg


def test_preset_not_a_mapping(model, capsys):
    p = model(**{"  tiny: {d: 64, heads: 4, layers: 1}": "  tiny: 7"})
    _, line, col, msg = error(capsys, p, "--preset", "tiny")
    line0, col0 = line_of(p, "tiny: 7")
    assert (line, col) == (line0, col0 + 6) and "preset 'tiny'" in msg


def test_set_string_value_is_not_numeric(model, capsys):
    _, line, col, msg = error(capsys, model(), "--set", "d='wide'")
    assert "must be numeric" in msg and "--set d='wide'" in msg


def test_load_graph_raises_lmc_error(model):
    with pytest.raises(LmcError) as e:
        load_graph(model(), overrides=["d=1/0"])
    assert e.value.loc is not None and "division by zero" in e.value.message


def test_a_nan_config_value_is_an_error(model):
    """0 * inf in a config expression: an error at its line (it became a nan that
    `lmc compile --json` then printed as NaN, which is not JSON)."""
    with pytest.raises(LmcError) as e:
        load_graph(model(), overrides=["eps=0 * inf"])
    assert "0 * inf is not a number (nan)" in e.value.message, e.value.format()
