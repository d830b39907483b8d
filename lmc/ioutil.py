"""Writing files the user reads: atomically, and failing cleanly."""
from __future__ import annotations

import os
from typing import Union


def atomic_write(path: str, data: Union[str, bytes]) -> None:
    """Write `data` to `path` through a temp file and a rename, so a reader never sees a
    half-written file. On failure the temp file is removed and the OSError names `path`
    (not the temp file); whatever was at `path` is left as it was."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OSError(e.errno, e.strerror, path) from None
