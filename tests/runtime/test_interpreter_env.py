"""The interpreter's environment checks: a Triton whose interpreter cannot run with the
installed NumPy is a clear one-line error, not an InterpreterError deep in a kernel."""
import re

import numpy as np
import pytest
import triton

from lmc.errors import LmcError
from lmc.runtime import triton_backend


@pytest.mark.parametrize("tv,nv,bad", [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                       ("3.9.0", "2.4.6", False), ("3.2.0+git1", "2.5.0", True)])
def test_old_triton_interpreter_with_numpy_2_4(monkeypatch, tv, nv, bad):
    monkeypatch.setattr(triton, "__version__", tv)
    monkeypatch.setattr(np, "__version__", nv)
    if bad:
        with pytest.raises(LmcError, match=rf"Triton {re.escape(tv)}'s interpreter .* NumPy {nv}: "
                                           r"install 'numpy<2.4'"):
            triton_backend._check_numpy()
    else:
        triton_backend._check_numpy()


def test_this_environment_passes():
    triton_backend._check_numpy()
