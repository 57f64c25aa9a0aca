"""Graph dumps and the explain table: see what the backend rewrote, and why not elsewhere."""
from .explain import explain, format_table

__all__ = ["explain", "format_table"]
