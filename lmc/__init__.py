"""lmc: a compiler for language-model architectures.

    import lmc
    model = lmc.load("zoo/llama.yaml", preset="tiny")
    logits = model(ids)

Define blocks in Python with `@lmc.block` and use them from YAML by name.
"""
import os as _os
import sys as _sys


def _interrupted_at_start() -> None:
    """Ctrl-C while the `lmc` command imports torch and lmc: one line, no traceback."""
    if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "lmc":
        print("lmc: interrupted", file=_sys.stderr)
        raise SystemExit(130) from None


try:
    import torch as _torch

    # Triton decides at import time whether its own library functions (tl.sigmoid, tl.sum,
    # ...) run in the interpreter, so on a machine without CUDA the switch must be set before
    # anything (torch._dynamo among others) imports triton. A user's explicit setting wins.
    if "triton" not in _sys.modules and not _torch.cuda.is_available():
        _os.environ.setdefault("TRITON_INTERPRET", "1")

    # the passes and code generators walk graphs recursively (a value's producers, a kernel
    # body's chains): a YAML loop unrolled into a chain of a few thousand ops needs more than
    # Python's default 1000 frames (3.11 keeps Python-to-Python calls off the C stack; 3.10's
    # frames are on it, so less there)
    _sys.setrecursionlimit(max(_sys.getrecursionlimit(),
                               60_000 if _sys.version_info >= (3, 11) else 8_000))

    from .blocks import block
    from .driver import Compiled, compile_model, load
    from .errors import LmcError
    from .frontend.builder import Builder, Tensor
    from .ir import init
except KeyboardInterrupt:
    _interrupted_at_start()
    raise

__version__ = "0.1.0"
__all__ = ["block", "compile_model", "load", "Compiled", "LmcError", "Builder", "Tensor",
           "init", "LmcModel", "Decoder"]


def __getattr__(name):
    """lmc.LmcModel and lmc.Decoder, imported on first use (the runtime is not needed to
    compile or to define blocks)."""
    if name == "LmcModel":
        from .runtime.module import LmcModel
        return LmcModel
    if name == "Decoder":
        from .runtime.decoder import Decoder
        return Decoder
    raise AttributeError(f"module 'lmc' has no attribute {name!r}")
