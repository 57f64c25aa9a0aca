"""Formatting what the backend did: the explain table, graph dumps, GPU profile reports.
Nothing here runs the backend (``mi_compile.explain`` does, in :mod:`mi_compile.backend`)."""
from .explain import ExplainResult, format_table

__all__ = ["ExplainResult", "format_table"]
