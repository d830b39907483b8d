"""lmc: a compiler for language-model architectures.

    import lmc
    model = lmc.load("zoo/llama.yaml", preset="tiny")
    logits = model(ids)

Define blocks in Python with `@lmc.block` and use them from YAML by name.
"""
from .blocks import block
from .driver import Compiled, compile_model, load
from .errors import LmcError
from .frontend.builder import Builder, Tensor
from .ir import init

__version__ = "0.1.0"
__all__ = ["block", "compile_model", "load", "Compiled", "LmcError", "Builder", "Tensor",
           "init"]
