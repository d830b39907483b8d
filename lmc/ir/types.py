"""Tensor types: a dtype and a shape whose entries are ints or symbolic `Dim`s."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .dims import Dim, DimLike, evaluate, norm, product

# The largest tensor the compiler accepts, in elements, with B=1 and T at the model's max.
MAX_ELEMENTS = 2**31


class DType(enum.Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    f64 = "f64"
    i64 = "i64"
    i32 = "i32"
    bool = "bool"

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f16, DType.bf16, DType.f64)

    @property
    def is_int(self) -> bool:
        return self in (DType.i64, DType.i32)

    @property
    def itemsize(self) -> int:
        return {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8, "i32": 4, "bool": 1}[self.value]

    def torch(self):
        import torch

        return {
            "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
            "f64": torch.float64, "i64": torch.int64, "i32": torch.int32, "bool": torch.bool,
        }[self.value]

    @staticmethod
    def of(x) -> "DType":
        """DType from a DType, its name ('f32', 'float32', ...) or a torch dtype."""
        if isinstance(x, DType):
            return x
        name = str(x).replace("torch.", "")
        alias = {"float32": "f32", "float": "f32", "float16": "f16", "half": "f16",
                 "bfloat16": "bf16", "float64": "f64", "double": "f64", "int64": "i64",
                 "long": "i64", "int32": "i32", "int": "i32"}
        try:
            return DType(alias.get(name, name))
        except ValueError:
            raise ValueError(f"unknown dtype {x!r} (expected one of "
                             f"{', '.join(d.value for d in DType)})") from None


@dataclass(frozen=True)
class TensorType:
    shape: tuple  # of DimLike
    dtype: DType

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(norm(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def numel(self) -> DimLike:
        return product(self.shape)

    def concrete(self, env) -> tuple:
        return tuple(evaluate(d, env) for d in self.shape)

    def is_static(self) -> bool:
        return not any(isinstance(d, Dim) for d in self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype) -> "TensorType":
        return TensorType(self.shape, DType.of(dtype))

    def __str__(self):
        return f"{self.dtype.value}[{','.join(str(d) for d in self.shape)}]"
