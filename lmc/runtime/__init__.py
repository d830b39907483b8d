"""Execution: graphs as torch modules (torch backend now; Triton later)."""
