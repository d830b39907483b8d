"""`lmc graph`: every zoo model, every stage, as SVG and PNG; the fused picture names every
fusion site `lmc compile --json` reports; folding; bad input is one line."""
from __future__ import annotations

import glob
import html
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmc import cli
from lmc.driver import compile_model
from lmc.errors import LmcError
from lmc.viz import STAGES, stage_view, write
from lmc.viz import render as viz_render
from lmc.viz.fold import fold, layer_key, representative

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = sorted(os.path.splitext(os.path.basename(p))[0]
             for p in glob.glob(os.path.join(ROOT, "zoo", "*.yaml")))


def _svg_text(path: str) -> str:
    with open(path) as f:
        return html.unescape(f.read())


@pytest.mark.parametrize("model", ZOO)
def test_zoo_every_stage_svg_and_png(model, tmp_path, capsys):
    path = os.path.join(ROOT, "zoo", f"{model}.yaml")
    c = compile_model(path, "tiny")
    jobs = []
    for stage in STAGES:
        view, notes = stage_view(c, stage)
        for ext in ("svg", "png"):
            jobs.append((view, str(tmp_path / f"{stage}.{ext}"), notes))
    with ThreadPoolExecutor(2) as pool:      # the renderer is a subprocess
        list(pool.map(lambda j: write(*j), jobs))
    for stage in STAGES:
        svg = tmp_path / f"{stage}.svg"
        png = tmp_path / f"{stage}.png"
        text = svg.read_text()
        assert "<svg" in text and text.rstrip().endswith("</svg>"), stage
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000

    # every fusion site `lmc compile --json` reports is named in the fused picture: each
    # forward kernel (a cluster, or in the tooltip of the folded layer drawn for it) and
    # each fusion record's place; the backward graph's kernels are in the kernels picture
    assert cli.main(["compile", path, "--preset", "tiny", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    fused = _svg_text(str(tmp_path / "fused.svg"))
    kernels = _svg_text(str(tmp_path / "kernels.svg"))
    assert s["kernels"]["forward"]["count"] > 0
    for k in s["kernels"]["forward"]["list"]:
        assert k["kernel"] in fused, k
        assert k["kernel"] in kernels, k
    for k in s["kernels"]["backward"]["list"]:
        assert k["kernel"] in kernels, k
    for r in s["fusions"]:
        assert f"{r['pass']}: {r['status']} at {r['where']}" in fused, r


def test_fused_clusters_and_decode_states(tmp_path):
    c = compile_model(os.path.join(ROOT, "zoo", "yoco.yaml"), "tiny")
    view, _ = stage_view(c, "fused")
    dot = view.dot()
    assert "subgraph cluster_" in dot and "· pointwise" in dot      # kernels as clusters
    assert "B×T×64" in dot                                          # shapes on edges
    assert "yoco.yaml:" in dot                                      # YAML lines
    view, _ = stage_view(c, "decode")
    out = tmp_path / "decode.svg"
    write(view, str(out))
    text = _svg_text(str(out))
    from lmc.passes.decode import decode_step
    for st in decode_step(c.graph).states:
        assert st.name in text
    assert "B per token" in text and "cylinder" in view.dot()


def test_deep_model_folds_to_one_layer():
    """llama at its default size: 12 layers drawn once, ×12."""
    c = compile_model(os.path.join(ROOT, "zoo", "llama.yaml"))
    view, notes = stage_view(c, "source")
    dot = view.dot()
    assert "layers.0 … layers.11" in dot and "×12" in dot
    assert dot.count("attention ·") == 1          # one attention block box, not twelve
    view, _ = stage_view(c, "source", fold=False)
    assert view.dot().count("attention ·") == 12
    # after fusion too: the causal mask CSE'd into layer 0 and read by every layer's
    # attention kernel does not make each layer look different (it did: only two folded)
    view, notes = stage_view(c, "fused")
    dot = view.dot()
    assert "layers.0 … layers.11" in dot and "×12" in dot, [
        ln for ln in dot.splitlines() if "<b>layers." in ln]
    assert dot.count("· rope_attention") == 1
    assert "11 repeated layers folded" in notes[-1], notes


def test_fused_stage_folds_layers_sharing_values_computed_once():
    """yoco's cross layers read one global K, V (its repeat for the heads CSE'd into the
    first cross layer) and minimax's MoE layers capacity positions from one iota: the
    layers still fold (cross layer 0 shares its input norm's statistics with the global
    K, V norm, and minimax's first layer starts the aux-loss statistics: those differ)."""
    import re
    for model, want in (("yoco", ["self_layers.0 … self_layers.11", "cross_layers.0",
                                  "cross_layers.1 … cross_layers.11"]),
                        ("minimax", ["layers.0", "layers.1 … layers.6", "layers.7",
                                     "layers.8 … layers.14", "layers.15"])):
        c = compile_model(os.path.join(ROOT, "zoo", f"{model}.yaml"))
        dot = stage_view(c, "fused")[0].dot()
        got = sorted(set(re.findall(r"<b>([a-z_]*layers\.\d+(?: … [a-z_]*layers\.\d+)?)</b>",
                                    dot)))
        assert got == sorted(want), (model, got)


def test_fold_sequences():
    assert [(i.start, i.period, i.count) for i in fold(list("aaaa"))] == [(0, 1, 4)]
    # minimax-like: a first layer of its own, then (6 linear + 1 softmax) and 7 linear + 1
    seq = ["a0"] + ["a"] * 6 + ["b"] + ["a"] * 7 + ["b"]
    items = fold(seq)
    rep = representative(items)
    drawn = sorted(set(rep.values()))
    assert drawn == [0, 1, 7, 8, 15]
    assert rep[14] == 8 and rep[3] == 1
    alt = ["d", "m"] * 6                          # blues01: dense / MoE alternating
    items = fold(alt)
    assert [(i.start, i.period, i.count) for i in items] == [(0, 2, 6)]
    assert sorted(set(representative(items).values())) == [0, 1]
    assert layer_key("layers.3.attn") == ("layers", 3)
    assert layer_key("cross_kv.rope") is None


def test_html_is_offline_and_dot_needs_no_renderer(tmp_path, monkeypatch):
    path = os.path.join(ROOT, "zoo", "llama.yaml")
    out = tmp_path / "g.html"
    assert cli.main(["graph", path, "--preset", "tiny", "-o", str(out)]) == 0
    text = out.read_text()
    assert "<svg" in text and "<script>" in text
    assert "<script src" not in text and "<link" not in text
    assert "http" not in text.replace("http://www.w3.org/", "")
    monkeypatch.setenv("LMC_DOT", str(tmp_path / "no-such-dot"))
    dot = tmp_path / "g.dot"
    assert cli.main(["graph", path, "--preset", "tiny", "-o", str(dot)]) == 0
    assert dot.read_text().startswith("digraph")


def test_missing_renderer_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("LMC_DOT", raising=False)
    monkeypatch.setattr(viz_render.sysconfig, "get_path", lambda name: "/nonexistent")
    monkeypatch.setattr(viz_render.sys, "executable", "/nonexistent/python")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LmcError, match="no graph renderer found: `pip install graphviz-pure`"):
        viz_render.find_renderer()


@pytest.mark.parametrize("args, message", [
    (["--stage", "bogus"], "unknown stage 'bogus' (stages: source, fused, kernels, decode)"),
    (["-o", "x.pdf"], "unknown output format .pdf"),
    (["-o", "noext"], "unknown output format (none)"),
])
def test_bad_input_is_one_line(args, message, capsys, monkeypatch):
    monkeypatch.delenv("LMC_DEBUG", raising=False)
    assert cli.main(["graph", os.path.join(ROOT, "zoo", "llama.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("lmc: error: ")


def test_unknown_model_file_is_one_line(tmp_path, capsys):
    assert cli.main(["graph", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{tmp_path / 'nope.yaml'}:1:1: error: no such file"]
    assert cli.main(["graph", str(tmp_path)]) == 2      # a directory: said so, as compile does
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{tmp_path}:1:1: error: is a directory, expected a YAML file"]


def test_an_existing_file_is_replaced_only_if_lmc_graph_wrote_it(tmp_path, capsys):
    """-o over a user's file (or a link) is refused before compiling unless --overwrite;
    a file an earlier lmc graph wrote, in each format, is replaced; an -o whose directory is
    a file says so."""
    path = os.path.join(ROOT, "zoo", "llama.yaml")
    mine = tmp_path / "mine.html"
    mine.write_text("my notes\n")
    assert cli.main(["graph", path, "--preset", "tiny", "-o", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists, and lmc graph did not write it" in err[0] and \
        "--overwrite" in err[0], err
    assert mine.read_text() == "my notes\n"
    link = tmp_path / "link.svg"
    link.symlink_to(mine)
    assert cli.main(["graph", path, "--preset", "tiny", "-o", str(link)]) == 2
    assert "exists, and lmc graph did not write it" in capsys.readouterr().err
    assert mine.read_text() == "my notes\n"
    assert cli.main(["graph", path, "--preset", "tiny", "-o", str(mine), "--overwrite"]) == 0
    for ext in ("svg", "png", "html", "dot"):
        out = tmp_path / f"g.{ext}"
        for _ in range(2):      # the second run replaces the first's file
            assert cli.main(["graph", path, "--preset", "tiny", "-o", str(out)]) == 0, \
                capsys.readouterr().err
        assert b"written by lmc graph" in out.read_bytes()
    png = (tmp_path / "g.png").read_bytes()
    assert png.startswith(b"\x89PNG") and png.endswith(b"IEND\xaeB`\x82")
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert cli.main(["graph", path, "-o", str(tmp_path / "afile" / "x.svg")]) == 2
    assert capsys.readouterr().err.strip().endswith("afile is not a directory")
