"""Triton code generation (arrives with the codegen issue)."""
