"""The library API: a block defined in Python and used from YAML equals the same block in YAML;
per-layer variation; block instance naming."""
import textwrap

import pytest
import torch

import lmc
from lmc.blocks import unregister
from lmc.ir.ops import Op

MODEL = """
name: geglu_test
config: {vocab: 61, d: 24, ff: 40, layers: 3, max_seq: 32}
blocks:
  geglu_yaml:
    args: [x]
    params:
      w1: [d, ff]
      wg: [d, ff]
      w2: [ff, d]
    body:
      - return (gelu(x @ wg) * (x @ w1)) @ w2
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
        - x = x + BLOCK(x, name='ffn')
    - logits = x @ head
  outputs: [logits]
"""


@pytest.fixture
def geglu():
    @lmc.block
    def geglu_py(b, x, *, d, ff):
        w1 = b.param("w1", [d, ff])
        wg = b.param("wg", [d, ff])
        w2 = b.param("w2", [ff, d])
        return (b.gelu(x @ wg) * (x @ w1)) @ w2

    yield geglu_py
    unregister("geglu_py")


def _write(tmp_path, text, name="m.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_python_block_equals_yaml_block(tmp_path, geglu):
    py = lmc.load(_write(tmp_path, MODEL.replace("BLOCK", "geglu_py"), "py.yaml"), seed=3)
    ym = lmc.load(_write(tmp_path, MODEL.replace("BLOCK", "geglu_yaml"), "ym.yaml"), seed=3)
    assert list(py.state_dict()) == list(ym.state_dict())  # same names: layers.0.ffn.w1 ...
    ym.load_state_dict(py.state_dict())
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        a, b = py(ids), ym(ids)
    assert torch.equal(a, b)
    # both inline to the same primitives: nothing downstream knows about blocks
    assert py.graph.op_counts() == ym.graph.op_counts()
    assert Op.BLOCK.value not in py.graph.op_counts()


def test_python_block_options_come_from_config_or_call(tmp_path, geglu):
    text = MODEL.replace("BLOCK(x, name='ffn')", "geglu_py(x, ff=8, name='ffn')")
    m = lmc.load(_write(tmp_path, text), seed=0)
    assert tuple(m.get_parameter("layers.0.ffn.w1").shape) == (24, 8)


def test_python_block_error_points_at_python_line(tmp_path):
    @lmc.block
    def bad_block(b, x):
        return x @ b.param("w", [7, 7])  # shape mismatch: d=24

    try:
        with pytest.raises(lmc.LmcError) as e:
            lmc.load(_write(tmp_path, MODEL.replace("BLOCK", "bad_block")))
        assert "test_blocks.py" in str(e.value.loc.file)
        assert "[B, T, 24]" in e.value.message and "[7, 7]" in e.value.message
    finally:
        unregister("bad_block")


def test_a_python_exception_in_a_block_points_at_its_line(tmp_path):
    """A plain Python mistake in a block (a misspelt builder method) is reported at the
    block's line that raised it, naming the YAML call site (it was the call site alone)."""
    import inspect

    @lmc.block
    def typo_block(b, x):
        return b.gleu(x)
    line = inspect.getsourcelines(typo_block)[1] + 2
    try:
        path = _write(tmp_path, MODEL.replace("BLOCK", "typo_block"))
        with pytest.raises(lmc.LmcError) as e:
            lmc.load(path)
        assert e.value.loc.file == __file__ and e.value.loc.line == line, e.value.format()
        assert "block typo_block raised AttributeError" in e.value.message
        assert "'gleu'" in e.value.message and "(called at m.yaml:" in e.value.message
    finally:
        unregister("typo_block")


def test_dims_divide_exactly_in_python_blocks(tmp_path):
    """`B * T // B`, `2 * T / 2` in a block are exact dims; a remainder (T // 2) is an error
    at the block's line naming both sides (it was a TypeError saying nothing of dims)."""
    import inspect

    @lmc.block
    def fold_block(b, x):
        B, T, d = x.shape
        flat = b.reshape(x, [B * T, d])
        n = flat.shape[0] // B                   # == T
        back = b.reshape(b.concat([flat, flat], 0), [2 * B, (2 * n * B) / (2 * B), d])
        return b.slice(back, 0, 0, B) * 0.5

    @lmc.block
    def halve_block(b, x):
        B, T, d = x.shape
        return b.reshape(x, [B, T // 2, 2 * d])
    line = inspect.getsourcelines(halve_block)[1] + 3
    try:
        m = lmc.load(_write(tmp_path, MODEL.replace("BLOCK", "fold_block")), seed=1)
        ids = torch.randint(0, 61, (2, 7))
        with torch.no_grad():
            assert m(ids).shape == (2, 7, 61)
        with pytest.raises(lmc.LmcError) as e:
            lmc.load(_write(tmp_path, MODEL.replace("BLOCK", "halve_block"), "h.yaml"))
        assert e.value.loc.file == __file__ and e.value.loc.line == line, e.value.format()
        assert "symbolic dimension T is not divisible by 2" in e.value.message
    finally:
        unregister("fold_block")
        unregister("halve_block")


def test_an_input_a_block_declares_is_one_model_input(tmp_path):
    """b.input in a block called per layer is one model input (it was a 'duplicate input'
    error from the second layer on); the same name with another type is an error at the
    block's line; training, which feeds token ids only, says what else the model reads."""
    import inspect

    @lmc.block
    def masked_ffn(b, x, *, d):
        B, T, _ = x.shape
        keep = b.input("keep", [B, T, 1], "f32")
        return b.tanh(x @ b.param("w", [d, d])) * keep

    @lmc.block
    def clash_block(b, x):
        return x * b.input("ids", [x.shape[0], x.shape[1], 1], "f32")
    line = inspect.getsourcelines(clash_block)[1] + 2
    try:
        path = _write(tmp_path, MODEL.replace("BLOCK", "masked_ffn"))
        m = lmc.load(path, seed=2)
        assert [n.attrs["name"] for n in m.graph.inputs] == ["ids", "keep"]
        ids = torch.randint(0, 61, (2, 9))
        keep = (torch.rand(2, 9, 1) > 0.5).float()
        with torch.no_grad():
            out = m(ids, keep=keep)
            x = m.get_parameter("embed")[ids]
            for i in range(3):
                x = x + torch.tanh(x @ m.get_parameter(f"layers.{i}.ffn.w")) * keep
            assert torch.allclose(out, x @ m.get_parameter("head"), atol=1e-5)
        with pytest.raises(lmc.LmcError) as e:
            lmc.load(_write(tmp_path, MODEL.replace("BLOCK", "clash_block"), "c.yaml"))
        assert e.value.loc.file == __file__ and e.value.loc.line == line, e.value.format()
        assert "input 'ids' is declared twice with different types" in e.value.message
        from lmc.passes.loss import with_loss
        with pytest.raises(lmc.LmcError, match="training feeds the model its token ids only, "
                                               "and it also reads 'keep'"):
            with_loss(m.graph)
    finally:
        unregister("masked_ffn")
        unregister("clash_block")


def test_builder_api_without_yaml():
    """The same builder builds graphs directly from Python."""
    from lmc.frontend.builder import Builder
    from lmc.ir.dims import Dim
    from lmc.ir.graph import Graph
    from lmc.ops.reference import RefCtx
    from lmc.passes import run_pipeline
    from lmc.runtime.executor import bind_dims, run_graph

    b = Builder({}, {})
    x = b.input("x", [Dim.sym("B"), 5], "f32")
    y = b.softmax(x * 2.0 - b.amax(x, -1), -1)
    g = run_pipeline(Graph("t", b.nodes, {"y": y.node}))
    xv = torch.randn(3, 5)
    out = run_graph(g, {"x": xv}, RefCtx(dims=bind_dims(g, {"x": xv})))["y"]
    assert torch.allclose(out, torch.softmax(xv * 2, -1), atol=1e-6)


HYBRID = """
name: hybrid
config: {vocab: 32, d: 16, layers: 8, max_seq: 16}
blocks:
  mix_a:
    args: [x]
    params: {w: [d, d]}
    body: ["return x @ w"]
  mix_b:
    args: [x]
    params: {u: [d, d]}
    body: ["return tanh(x @ u)"]
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d]}
  body:
    - x = embedding(embed, ids)
    - for: l
      in: layers
      body:
        - x = x + (mix_b(x, name='mixer') if (l + 1) % 4 == 0 else mix_a(x, name='mixer'))
        - if: l % 2 == 1
          then: ["x = x * 0.5"]
          else: ["x = x * 2.0"]
    - logits = x @ transpose(embed, 0, 1)
  outputs: [logits]
"""


def test_per_layer_variation(tmp_path):
    m = lmc.load(_write(tmp_path, HYBRID))
    names = [n for n, _ in m.named_parameters()]
    for layer in range(8):
        kind = "u" if (layer + 1) % 4 == 0 else "w"
        assert f"layers.{layer}.mixer.{kind}" in names
    assert m.graph.op_counts()["tanh"] == 2  # layers 3 and 7
    assert m(torch.randint(0, 32, (1, 4))).shape == (1, 4, 32)


def test_duplicate_instance_names_get_suffixes(tmp_path):
    text = MODEL.replace("- x = x + BLOCK(x, name='ffn')",
                         "- x = x + geglu_yaml(x) + geglu_yaml(x)")
    m = lmc.load(_write(tmp_path, text))
    names = {n.rsplit(".", 1)[0] for n, _ in m.named_parameters()}
    assert {"layers.0.geglu_yaml", "layers.0.geglu_yaml_1"} <= names


def test_a_block_the_file_defines_takes_precedence_over_a_python_block(tmp_path):
    """docs/yaml.md: the file's own definitions are its local scope."""
    @lmc.block(name="geglu_yaml")
    def other(b, x):
        return x * 0.0

    try:
        p = tmp_path / "m.yaml"
        p.write_text(textwrap.dedent(MODEL).replace("BLOCK", "geglu_yaml"))
        m = lmc.load(str(p), seed=0)
        assert any(n.startswith("layers.0.ffn.w1") for n, _ in m.named_parameters())
    finally:
        unregister("geglu_yaml")


SMALL = """
name: cmp_test
config: {vocab: 32, d: 16, max_seq: 16}
model:
  inputs: {ids: [B, T]}
  params: {embed: [vocab, d]}
  body:
    - x = embedding(embed, ids)
    - y = BODY
  outputs: [y]
"""


def test_equality_in_python_blocks_builds_eq_and_ne(tmp_path):
    """x == y in a Python block is eq (as in YAML and torch); it compared the handles and
    handed where() a Python bool."""
    @lmc.block(name="cmp_eq")
    def cmp_eq(b, x):
        return b.where(x == x * 1.0, x, 0.0) + b.where(x != x * 1.0, 1.0, 0.0) + \
            b.where(x == 0.25, 100.0, 0.0)
    try:
        path = tmp_path / "m.yaml"
        path.write_text(SMALL.replace("BODY", "cmp_eq(x)"))
        m = lmc.load(str(path))
        with torch.no_grad():
            m.embed[3, 0] = 0.25
        ids = torch.tensor([[1, 3]])
        want = m.embed[ids].detach().clone()
        want[0, 1, 0] += 100.0
        assert torch.equal(m(ids), want)
    finally:
        unregister("cmp_eq")


@pytest.mark.parametrize("body,ok", [
    ("cast(ids * 0.5, 'f32')", False), ("cast(0.5 * ids, 'f32')", False),
    ("cast(ids >= 10.5, 'f32')", False), ("cast(ids + 1.7, 'f32')", False),
    ("cast((ids > 3) * 0.5, 'f32')", False), ("cast(ids * 2.0 + 1, 'f32')", True),
    ("cast(ids, 'f32') * 0.5", True)])
def test_a_fraction_with_an_integer_tensor_is_an_error(tmp_path, body, ok):
    """A number takes the tensor's dtype: with an int or bool tensor 0.5 silently became 0
    (ids * 0.5 was all zeros); a number the dtype holds exactly is still fine."""
    path = tmp_path / "m.yaml"
    path.write_text(SMALL.replace("BODY", body))
    if ok:
        ids = torch.tensor([[3, 10, 11]])
        got = lmc.load(str(path))(ids)
        assert torch.equal(got, eval(body.replace("cast(", "torch.Tensor.to(").replace(
            "'f32'", "torch.float32"), {"torch": torch, "ids": ids}))
        return
    with pytest.raises(lmc.LmcError, match="tensor would become .*: cast the tensor first"):
        lmc.load(str(path))


@pytest.mark.parametrize("make,msg", [
    (lambda b, x: b.param("w", [16], init=lmc.init.zeros),
     r"init must be an initialiser .*got a function \(call it: lmc.init.zeros\(\)\)"),
    (lambda b, x: b.param("w", [16], init=0.02), "init must be an initialiser"),
    (lambda b, x: b.param("w", [x.shape[1], 16]), r"the shape must be static .*got \[T, 16\]"),
    (lambda b, x: b.param("", [16]), "the name must be an identifier, got the string ''"),
    (lambda b, x: b.param(3, [16]), "the name must be an identifier, got the number 3")])
def test_python_param_mistakes_are_errors_at_the_call(tmp_path, make, msg):
    """b.param's init, shape and name are checked where the block calls it; they failed at
    load with an AttributeError / TypeError inside the runtime, or registered 'blk.3'."""
    @lmc.block(name="bad_param")
    def bad_param(b, x):
        return x * make(b, x)
    try:
        path = tmp_path / "m.yaml"
        path.write_text(SMALL.replace("BODY", "bad_param(x)"))
        with pytest.raises(lmc.LmcError, match=msg) as e:
            lmc.load(str(path))
        assert "test_blocks.py:" in str(e.value)        # the block's line, in Python
    finally:
        unregister("bad_param")


def test_init_arguments_are_checked_when_written():
    for f, msg in ((lambda: lmc.init.normal(-1), "normal: std must be >= 0, got -1"),
                   (lambda: lmc.init.normal(float("nan")), "std must be a finite number"),
                   (lambda: lmc.init.uniform(1, 0), "lo must be <= hi"),
                   (lambda: lmc.init.constant("a"), "value must be a finite number")):
        with pytest.raises(ValueError, match=msg):
            f()
