"""`lmc verify` passes for every zoo file at its tiny preset (interpreter for triton)."""
import glob
import os

import pytest
from conftest import ZOO

from lmc.verify import format_rows, verify

FILES = sorted(glob.glob(os.path.join(ZOO, "*.yaml")))


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_verify_passes(path):
    rows = verify(path)
    assert "preset tiny" in rows[0].detail
    assert all(r.ok and not r.skipped for r in rows), format_rows(rows)
