"""The IR: Node, Graph, the Op enum, TensorType with symbolic dims, the printer."""
from .dims import Dim
from .graph import Graph, Node
from .ops import Kind, Op
from .types import DType, TensorType

__all__ = ["Dim", "Graph", "Node", "Kind", "Op", "DType", "TensorType"]
