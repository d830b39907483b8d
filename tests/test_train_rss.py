"""benchmarks/train_rss.py measures a CPU training run's peak memory (the figure in
benchmarks/README.md comes from it)."""
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_train_rss_reports_peak_memory_and_loss(capsys):
    import train_rss
    assert train_rss.main(["--preset", "tiny", "--batch-size", "2", "--seq-len", "16",
                           "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "peak RSS" in out and "last loss" in out, out
    gib = float(out.split("peak RSS ")[1].split(" GiB")[0])
    assert 0 < gib < 64
