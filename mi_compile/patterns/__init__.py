"""Head patterns: the shared spec, one module per pattern (its registered
:class:`~mi_compile.patterns.registry.PatternSpec`: parameters, validation, index tables,
reference mask, search candidates), the unified kernel index and the float32 reference."""
from .spec import HeadPattern, PatternError, decode_heads, encode_heads  # noqa: F401
from .registry import PatternSpec, get, names, register, specs, unregister  # noqa: F401
# The built-in patterns, registered on import (a new built-in pattern adds its module here).
from . import dense, a_shape, vertical_slash, block_sparse, tri_shape  # noqa: F401,E401
from . import xattention  # noqa: F401,E401
from . import flex_prefill  # noqa: F401,E401
from . import vertical_slash_tiled  # noqa: F401,E401
from .index import SparseIndex, build_index  # noqa: F401
