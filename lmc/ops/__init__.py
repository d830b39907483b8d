"""Per-op rule tables: shape/dtype rules (shapes.py) and torch references (reference.py)."""
