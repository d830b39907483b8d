"""The on-disk kernel cache: generated modules keyed by a content hash.

The file name holds the sha256 of (source + lmc, torch and triton versions). Writes go to a
temp file and are renamed into place, so two processes compiling at once each write a whole
file and the last rename wins with identical content. Before importing, the file (which
starts with its key) is compared with what would be written: a truncated or tampered file is
rewritten from the source, never imported.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from types import ModuleType

from ..runtime.data import cache_dir


def _versions() -> str:
    import torch
    import triton

    from .. import __version__
    return f"lmc {__version__} torch {torch.__version__} triton {triton.__version__}"


def key(source: str) -> str:
    return hashlib.sha256((_versions() + "\n" + source).encode()).hexdigest()


def load_module(source: str, directory: str = None) -> ModuleType:
    directory = directory or os.path.join(cache_dir(), "kernels")
    os.makedirs(directory, exist_ok=True)
    k = key(source)
    path = os.path.join(directory, f"lmc_{k[:32]}.py")
    stamped = f"# lmc-cache-key: {k}\n{source}"
    ok = False
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            ok = f.read() == stamped  # the whole file, byte for byte
    if not ok:
        from ..ioutil import atomic_write
        atomic_write(path, stamped)
    name = f"lmc_kernels_{k[:32]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
