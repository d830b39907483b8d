"""The GPU benchmark scripts run end to end on CPU in their smoke mode (so they are not dead
code between GPU sessions) and write their JSON."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_train_bench_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))
    import train_bench
    out = tmp_path / "train.json"
    results = train_bench.main(["--tiny", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["timing"] == "cpu perf_counter" and data["torch"] and data["date"]
    names = [r["name"] for r in data["results"]]
    assert names == ["lmc (triton)", "pytorch eager"] and len(results) == 2
    assert all("error" not in r for r in data["results"]), data["results"]
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 2 and r["first_step_s"] > 0
               for r in data["results"])
