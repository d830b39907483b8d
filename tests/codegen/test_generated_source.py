"""What `lmc compile -o` writes reads cleanly: every generated kernel declares only the
parameters its body reads (the GPU autotuner's key excepted, and said so), no dead aliases or
always-true conditions, and the wrapper programs load or compute no value nobody reads, say
what each saved value is for, and tag each launch with the YAML lines of all it holds.
Text only: the numbers these kernels compute are the other codegen tests' business."""
import ast
import os
import re

import pytest
from conftest import ROOT, ZOO

from lmc.cli import main
from lmc.codegen import params

# the GPU autotuner's key of a generated matmul: kernel arguments it may declare unread
AUTOTUNER_KEY = {"M", "N", "K", "SPLIT_MAX"}
CASES = [("llama", "train", os.path.join(ZOO, "llama.yaml")),
         ("llama", "decode", os.path.join(ZOO, "llama.yaml")),
         ("minimax", "decode", os.path.join(ZOO, "minimax.yaml")),
         ("gemma2", "decode", os.path.join(ROOT, "examples", "gemma2.yaml"))]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{(model, mode): {file name: text}} of `lmc compile --preset tiny -o`."""
    out = {}
    for model, mode, path in CASES:
        d = tmp_path_factory.mktemp(f"{model}_{mode}")
        assert main(["compile", path, "--preset", "tiny", "--mode", mode, "-o", str(d),
                     "--json"]) == 0
        out[(model, mode)] = {f: (d / f).read_text() for f in os.listdir(d)
                              if f.endswith(".py")}
    return out


def _files(written, prefix):
    return [(k, f, src) for k, files in written.items() for f, src in sorted(files.items())
            if f.startswith(prefix)]


def _unread_params(f: ast.FunctionDef):
    used = {n.id for s in f.body for n in ast.walk(s) if isinstance(n, ast.Name)}
    return [a.arg for a in f.args.args
            if not (a.annotation is not None and "constexpr" in ast.unparse(a.annotation))
            and a.arg not in used]


def test_every_kernel_parameter_is_read(written):
    """No kernel (nor tile helper) takes an argument it never uses: not the outermost size
    of an index split (S0, RS0, Z0), not SPLIT_MAX where the kernel cannot split K (a row
    reduction's), not an output written in place through its input. A matmul may declare
    the autotuner's key unread, with a comment saying so."""
    checked = 0
    for key, name, src in _files(written, "kernels_"):
        for f in ast.parse(src).body:
            if not isinstance(f, ast.FunctionDef):
                continue
            checked += 1
            unread = _unread_params(f)
            where = f"{key} {name} {f.name}"
            if f.name.startswith("lmc_mm_") and not f.name.endswith(("_tile", "_acc")) \
                    and "_tile_" not in f.name:
                assert set(unread) <= AUTOTUNER_KEY, (where, unread)
                if unread:
                    note = f"# {', '.join(unread)}: not read here, the GPU autotuner's key"
                    assert note in ast.get_source_segment(src, f), (where, note)
            else:
                assert not unread, (where, unread)
    assert checked > 100


def test_row_reduction_matmul_has_no_split_k(written):
    """The head matmul with the loss's logsumexp never splits K: no SPLIT_K, no workspace,
    no SPLIT_MAX (its launch always passed 1), a plain loop over K."""
    src = written[("llama", "train")]["kernels_forward.py"]
    (f,) = [f for f in ast.parse(src).body if isinstance(f, ast.FunctionDef)
            and f.name.endswith("_logsumexp")]
    text = ast.get_source_segment(src, f)
    assert "SPLIT" not in text and "ws_ptr" not in text, text
    assert "for k0 in range(0, K, BLOCK_K):" in text


def test_no_dead_aliases_or_always_true_conditions(written):
    """An index split starts from the flat index itself (no `rem = rows`, `rem = offs`, `z0
    = z`); a RoPE tile rotating every column of its heads has no `rot` mask (d < D always
    holds), one rotating some (partial rotary: minimax) keeps it."""
    kept = 0
    for key, name, src in _files(written, "kernels_"):
        assert not re.search(r"^\s*(rem = (rows|offs|z)|z0 = z)$", src, re.M), (key, name)
        for f in ast.parse(src).body:
            if not isinstance(f, ast.FunctionDef):
                continue
            text = ast.get_source_segment(src, f)
            d = re.search(r"^\s*d = rn % (\d+)$", text, re.M)
            rot = re.search(r"^\s*rot = d < (\d+)$", text, re.M)
            assert rot is None or int(rot.group(1)) < int(d.group(1)), (key, name, f.name)
            kept += rot is not None
            for m in re.finditer(r"\(d < (\d+)\)\)\[None, :\]\)$", text, re.M):
                assert int(m.group(1)) < int(d.group(1)), (key, name, f.name)
    assert kept, "minimax's partial rotary keeps its mask"


def test_programs_load_and_compute_only_what_is_read(written):
    """Every value a program names is read: no constant a kernel inlined (the norm's eps),
    no saved value the backward's kernels no longer need (llama's loss values)."""
    for key, name, src in _files(written, "program_"):
        tree = ast.parse(src)
        stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                  and isinstance(n.ctx, ast.Store) and re.fullmatch(r"v\d+", n.id)}
        loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                  and isinstance(n.ctx, ast.Load)}
        assert not stored - loaded, (key, name, sorted(stored - loaded))
    fwd, back = (written[("llama", "train")][f"program_{g}.py"] for g in ("forward", "backward"))
    assert "# const llama.yaml:38" not in fwd + back      # eps: the norms' kernels inline it
    assert "env['saved:0']" not in back


def test_saved_values_say_what_they_are_for(written):
    back = written[("llama", "train")]["program_backward.py"]
    saved = [ln for ln in back.splitlines() if "env['saved:" in ln]
    assert saved and all(re.search(r"# \w+\[[^\]]*\], for the gradient (of|at) ", ln)
                         for ln in saved), saved
    assert any(ln.endswith("# f32[B,T,1], for the gradient of layers.0.attn_norm "
                           "(llama.yaml:38)") for ln in saved), saved


def test_launch_comments_give_every_line_of_the_kernel(written):
    """The q, k, v projections' launch names their three lines, not the first alone; in the
    decode step, the RMSNorm it computes as its prologue too."""
    fwd = written[("llama", "train")]["program_forward.py"]
    assert re.search(r"LAUNCH\['matmul'\]\(K\['lmc_mm_matmul_0'\].*# matmul llama\.yaml:62-64$",
                     fwd, re.M), fwd
    step = written[("llama", "decode")]["program_decode_static.py"]
    assert re.search(r"LAUNCH\['matmul'\].*# matmul llama\.yaml:38,\S*62-64", step), step


@pytest.mark.parametrize("code, keep, want", [
    # a comment's words are not read; a string's are (a "#" in it starts no comment)
    ("x = a + b  # c d\ny = 'e # f'", (), ["a", "b", "e", "f"]),
    ("tl.store(p + offs, v)", ("N",), ["p", "N"]),
])
def test_prune_reads_code_not_comments(code, keep, want):
    assert params.prune(["a", "b", "c", "d", "e", "f", "p", "N", "q: tl.int64"], code,
                        keep) == want
