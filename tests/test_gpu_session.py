"""benchmarks/gpu_session.sh runs only on a lent GPU: check here that it parses, writes the
machine line with no phase, names every phase its header lists, and refuses an unknown one
(a broken script would cost a device call)."""
import os
import re
import subprocess
import sys

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")


def _run(tmp_path, *phases):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PY=sys.executable,
               LMC_CACHE=str(tmp_path / "cache"))
    return subprocess.run(["bash", SCRIPT, *phases], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_no_phase_writes_the_machine_line(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    line = (tmp_path / "out" / "machine.txt").read_text().splitlines()[0]
    assert re.match(r"device .+; torch .+; triton .+; \d{4}-\d\d-\d\d", line), line


def test_unknown_phase_is_refused(tmp_path):
    r = _run(tmp_path, "no-such-phase")
    assert r.returncode == 2 and "unknown phase no-such-phase" in r.stderr


def test_every_listed_phase_has_a_case():
    src = open(SCRIPT).read()
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    cases = set(re.findall(r"^\s+([a-z:*]+)\)", src, re.M))
    for phase in ("tests", "patterns", "train", "train:lmc", "train:ref", "train:prologue",
                  "decode",
                  "attention", "linear", "moe", "bench"):
        assert phase in cases, phase
    assert "bench:*" in cases


def test_an_unknown_phase_is_refused_before_any_runs(tmp_path):
    r = _run(tmp_path, "decode", "no-such-phase")
    assert r.returncode == 2 and "unknown phase no-such-phase" in r.stderr
    assert not (tmp_path / "out" / "phases.txt").exists()


def test_budget_skips_a_phase_without_time_left(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGET_S", "30")
    r = _run(tmp_path, "tests")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "out" / "phases.txt").read_text()
    assert re.search(r"tests: skipped, (29|30) s of BUDGET_S=30 left", log), log
    assert "exit" not in log
    monkeypatch.setenv("BUDGET_S", "9m")
    r = _run(tmp_path, "tests")
    assert r.returncode == 2 and "BUDGET_S=9m: expected whole seconds" in r.stderr
