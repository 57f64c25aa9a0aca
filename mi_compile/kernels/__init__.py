"""Triton kernels: the sparse attention kernels, the vertical-slash estimate and the fused index
tables, with the index format they read. A leaf: nothing here imports the rest of the package
(the op that calls them is :mod:`mi_compile.op`)."""
