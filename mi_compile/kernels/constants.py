"""Numbers every pattern, the index builder and the kernels agree on (defined here only)."""

#: Query / key block: the kernels walk 64-row query blocks and 64-key tiles.
BLOCK = 64
#: "No entry" in sorted int32 tables; larger than any position.
SENTINEL = 1 << 30
#: Band (and prefix) of heads without a local window / with every key.
WIDE = 1 << 30
#: Parameters travel to the kernels as int32 (a value past n means "all of them").
MAX_PARAM = 2**31 - 1
#: Ints per head in the flat ``int[]`` an op schema carries (pattern id + 3 parameters).
INTS_PER_HEAD = 4
#: Vertical-slash: keys / offsets below this are always kept, and the estimate scores the last
#: this many queries (one query block).
FORCED = BLOCK
LAST_QUERIES = BLOCK

# Head kinds in ``IndexPlan.meta``: which code path of the fused table builder
# (:mod:`mi_compile.kernels.index_tables`) writes a head's rows.
KIND_OTHER, KIND_A_SHAPE, KIND_VS, KIND_BS = 0, 1, 2, 3

# Data-dependent selection phases of the index builder (a pattern's ``selection``).
PHASE_VERTICAL_SLASH = "vertical_slash"   # estimate + top-k columns and slash offsets
PHASE_BLOCK_SPARSE = "block_sparse"       # pooled block scores + top-k blocks
PHASE_BLOCK_SELECT = "block_select"       # the spec writes blocks + block_count itself
                                          # (PatternSpec.select_block_table; e.g. xattention)
PHASE_TABLE_SELECT = "table_select"       # the spec writes columns, offsets and blocks itself
                                          # (PatternSpec.select_tables; e.g. flex_prefill)
