"""YAML -> Graph: safe loading, config and expressions, blocks, the model section."""
from .model import load_graph

__all__ = ["load_graph"]
