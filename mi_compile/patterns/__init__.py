"""Head patterns: the shared spec, one module per pattern (parameters, index builder,
reference mask), the unified kernel index and the float32 reference."""
from .spec import HeadPattern, PatternError, decode_heads, encode_heads  # noqa: F401
from .index import SparseIndex, build_index  # noqa: F401
