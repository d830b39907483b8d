"""The one error type users see: a message with a source location, printed as
``FILE:LINE:COL: error: MESSAGE`` by the CLI (never a traceback)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Loc:
    file: str
    line: int = 1
    col: int = 1

    def __str__(self):
        return f"{self.file}:{self.line}:{self.col}"


class LmcError(Exception):
    def __init__(self, message: str, loc: Optional[Loc] = None):
        super().__init__(message)
        self.message = message
        self.loc = loc

    def with_loc(self, loc: Optional[Loc]) -> "LmcError":
        """Attach a location if the error does not have one yet."""
        if self.loc is None and loc is not None:
            self.loc = loc
        return self

    def format(self) -> str:
        where = str(self.loc) if self.loc else "lmc"
        msg = " ".join(self.message.split())  # always one line
        return f"{where}: error: {msg}"

    def __str__(self):
        return self.format()


class UsageError(LmcError):
    """A command-line problem (a flag's value, an output path): printed as ``lmc: error:``,
    never placed at a line of the model file."""

    def with_loc(self, loc: Optional[Loc]) -> "LmcError":
        return self


class InterpreterBf16Error(LmcError):
    """A kernel would compute on bf16 tensors in Triton's interpreter (no CUDA), which
    computes bf16 on bit patterns: refused rather than returning garbage."""


class ShapeError(LmcError):
    """A shape or dtype rule rejected its inputs."""
