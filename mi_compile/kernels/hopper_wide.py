"""Hopper (sm_90) kernel in Gluon for the layers the wide Triton kernel serves (opt-in).

Same contract as :func:`mi_compile.kernels.sparse_attention._wide_attention_kernel`: every
head dense or A-shape (``prefix``, ``sink``, ``band`` of the :class:`SparseIndex`; contiguous key
ranges per query block, nothing data-dependent), unpadded or padded inputs (``seq_start`` /
``seq_len``), native GQA (query head ``h`` reads KV head ``h // (Hq / Hkv)``), a chunk that
continues a cache (``nq < n``: query row ``r`` is key position ``n - nq + r``), head dim 64 or
128, fp16 / bf16. Every output element is written once by one launch, padding rows zero.

Program ``(p, b * Hq + h)`` owns 128 query rows ``[m0, m0 + 128)`` (heaviest first, the chunk
mapping of the wide kernel); its 8 warps are two warpgroups of 64 rows that share each K/V tile.
Per program:

* Q is loaded once (masked rows zero) into shared memory;
* the key tiles of the four ranges of the wide kernel form one flat sequence (prefix
  ``[0, min(prefix, m0))``, band edge ``[lo, edge)`` with the element test, interior
  ``[edge, m0)`` without masks, diagonal ``[m0, m0 + 128)`` with the causal test), so the loads
  of the next ranges' tiles are in flight while the current range computes;
* K and V tiles come by TMA (4D descriptors over ``[B, Hkv, n, D]``, any 16-byte aligned
  strides; rows past ``n`` read zeros) into a ``STAGES``-deep shared-memory ring, each slot with
  its own K and V mbarrier, so QK^T starts as soon as K has landed;
* S = Q K^T and O += P V are ``warpgroup_mma`` (wgmma), P taken from registers; the softmax is
  online in float32 with ``exp2`` and the log2(e)-prescaled scale, as in the Triton kernels;
* a slot is refilled (tile ``t + STAGES``) right after both warpgroups finished tile ``t``
  (one CTA barrier per tile).

Only tiles that need it apply a mask (the last partial prefix tile: keys ``< bound``; band edge
and diagonal: ``j <= i`` and ``j < sink or i - j < band``; all: keys ``< bound``).

With ``WARP_SPECIALIZE`` (``MI_COMPILE_HOPPER=ws``) the kernel does the same work warp-specialised
(``gl.warp_specialize``): the launch's 4 warps and a second warpgroup each own 64 of the 128
rows and run their own tile loops, and one producer warp issues the TMA loads; a slot goes back
to the producer when both consumers arrived on its ``free`` mbarrier. No CTA barrier per tile,
so one warpgroup's softmax can overlap the other's wgmma; inside a warpgroup, tile t's softmax
runs while tile t-1's P V wgmma is in flight. Registers per partition by ``setmaxnreg`` (232 /
232 / 40), so the ring is one slot deeper.

``MI_COMPILE_HOPPER=ws_persist`` runs that program persistent (``PERSISTENT``): one program an
SM walks many blocks, the ring's tile count running on across them, so the producer loads the
next block's first tiles while the consumers finish this one's (docs/kernels.md, "Persistent").

This module imports Gluon lazily (:func:`available`): with a triton without Gluon or without
the Hopper pieces, or on another device, the caller keeps the Triton wide kernel.
"""
from __future__ import annotations

import functools
import types

import torch
import triton

from .constants import WIDE
from .dispatch import HOPPER_ENV, hopper_opt_in

LOG2E = 1.4426950408889634
ENV = HOPPER_ENV
BLOCK_M = 128          # query rows per program: two warpgroups of 64
NUM_WARPS = 8
# Key tile width and ring depth per variant and head dim (the compile-time resource report,
# benchmarks/kernel_resources.py --hopper, picks them: no spills, shared memory in budget).
# "ws" has the registers of a warpgroup per 64 rows and a producer warp, so its ring is deeper
# (head dim 128: 3 x 64 KiB of K/V + 32 KiB of Q = 225 KiB of the 227 KiB).
CONFIGS = {"wide": {64: {"block_n": 128, "stages": 3}, 128: {"block_n": 128, "stages": 2}},
           "ws": {64: {"block_n": 128, "stages": 4}, 128: {"block_n": 128, "stages": 3}}}
CONFIGS["ws_persist"] = CONFIGS["ws"]      # the same program, persistent
HEAD_DIMS = (64, 128)
_LENGTH_ARGS = ["n", "num_programs", "q_offset"]


def unavailable_reason(device=None) -> str | None:
    """Why the Gluon kernel cannot run here (None: it can): no Gluon API, no CUDA, not sm_90."""
    if GLUON_ERROR is not None:
        return GLUON_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = _capability(torch.device(device) if device is not None else torch.device("cuda"))
    if (major, minor) != (9, 0):
        return f"device is sm_{major}{minor}, the kernel is for sm_90"
    return None


@functools.lru_cache(maxsize=None)
def _capability_of(index: int):
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device):
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def _tma_strides(t) -> list:
    """The strides a K/V descriptor gets: the tensor's, a size-1 dim's (never stepped) set to
    ``shape[-1]`` elements so that it meets TMA's 16-byte rule whatever torch reports."""
    return [t.shape[-1] if size == 1 and i < t.dim() - 1 else stride
            for i, (size, stride) in enumerate(zip(t.shape, t.stride()))]


def usable(q, k, v, out) -> bool:
    """A Gluon kernel takes these tensors: opted in, sm_90 with Gluon, fp16 / bf16, head dim
    64 or 128, and the TMA rules (16-byte aligned base and strides, unit last stride). Host
    metadata only (no device sync)."""
    if not hopper_opt_in() or q.device.type != "cuda":
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype == out.dtype):
        return False
    D = q.shape[-1]
    if D not in HEAD_DIMS or k.shape[-1] != D or v.shape[-1] != D:
        return False
    for t in (k, v):
        strides = _tma_strides(t)
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s <= 0 or (s * t.element_size()) % 16 for s in strides[:-1]):
            return False
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        return False
    return unavailable_reason(q.device) is None


try:   # Gluon (triton >= 3.5 ships it; the kernel is written against the 3.6 API)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    for _owner, _names in ((hopper, ("warpgroup_mma", "warpgroup_mma_wait", "fence_async_shared")),
                           (tma, ("async_copy_global_to_shared",)),
                           (mbarrier, ("init", "expect", "wait", "invalidate", "MBarrierLayout")),
                           (gl, ("NVMMADistributedLayout", "NVMMASharedLayout", "DotOperandLayout",
                                 "allocate_shared_memory", "thread_barrier"))):
        for _name in _names:
            getattr(_owner, _name)
    GLUON_ERROR = None
except (ImportError, AttributeError) as _exc:     # no Gluon, or an API without these pieces
    GLUON_ERROR = f"triton {triton.__version__} lacks the Gluon Hopper API ({_exc})"

if GLUON_ERROR is None:
    warpgroup_mma, warpgroup_mma_wait = hopper.warpgroup_mma, hopper.warpgroup_mma_wait
    fence_async_shared = hopper.fence_async_shared
    _wide = gl.constexpr(WIDE)

    @gluon.constexpr_function
    def kernel_layouts(warps, block_n, head_dim):
        """The register layouts of a kernel whose ``warps`` warps (16 rows each) hold the scores
        ``[rows, block_n]`` and the output ``[rows, head_dim]`` as wgmma accumulators: ``s``,
        ``o``, ``p`` (P as wgmma's register operand), ``io`` (tiles loaded or stored row by row
        in 16-byte vectors) and their row / column slices (``s_rows``, ``o_cols``, ...)."""
        s = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_n, 16])
        o = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, head_dim, 16])
        io = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (head_dim // 8), head_dim // 8],
                              warps_per_cta=[warps, 1], order=[1, 0])
        layouts = dict(s=s, o=o, io=io, p=gl.DotOperandLayout(operand_index=0, parent=o, k_width=2),
                       s_rows=gl.SliceLayout(1, s), s_cols=gl.SliceLayout(0, s), o_rows=gl.SliceLayout(1, o),
                       o_cols=gl.SliceLayout(0, o), io_rows=gl.SliceLayout(1, io), io_cols=gl.SliceLayout(0, io))
        # constexpr attributes: they pass into @gluon.jit helpers as layouts do
        return types.SimpleNamespace(**{name: gl.constexpr(layout) for name, layout in layouts.items()})

    @gluon.jit
    def _program_block(seq_start_ptr, seq_len_ptr, out_ptr, stride_ob, stride_oh, stride_on, n, num_heads,
                       heads_per_kv, num_programs, q_offset, L: gl.constexpr, BLOCK_M: gl.constexpr,
                       HEAD_DIM: gl.constexpr):
        """Program ``(p, b * Hq + h)`` -> ``(b, h, kv, seq_start, length, m, out_head)``: it owns
        query block ``m`` of ``BLOCK_M`` rows (heaviest first; a chunk's programs shifted onto its
        blocks: ``_program_rows`` of the Triton kernels with GROUP = 1) and writes its share of
        the padding rows as zeros (every output element is written once)."""
        return _item_block(gl.program_id(0), gl.program_id(1), seq_start_ptr, seq_len_ptr, out_ptr, stride_ob,
                           stride_oh, stride_on, n, num_heads, heads_per_kv, num_programs, q_offset, L, BLOCK_M,
                           HEAD_DIM, True)

    @gluon.jit
    def _item_block(x, bh, seq_start_ptr, seq_len_ptr, out_ptr, stride_ob, stride_oh, stride_on, n, num_heads,
                    heads_per_kv, num_programs, q_offset, L: gl.constexpr, BLOCK_M: gl.constexpr,
                    HEAD_DIM: gl.constexpr, PAD: gl.constexpr):
        """:func:`_program_block` of program ``(x, bh)``, wherever the caller runs (a persistent
        program visits many); the padding rows' zeros only with ``PAD``."""
        slot_block = num_programs - 1 - x
        b = bh // num_heads
        h = bh % num_heads
        seq_start = gl.minimum(gl.maximum(gl.load(seq_start_ptr + b), 0), n)
        length = gl.minimum(gl.maximum(gl.load(seq_len_ptr + b), 0), n - seq_start)
        m = slot_block + gl.maximum((length + BLOCK_M - 1) // BLOCK_M - num_programs, 0)
        out_head = out_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        if PAD:
            nq = n - q_offset
            real_lo = gl.minimum(gl.maximum(seq_start - q_offset, 0), nq)
            real_hi = gl.minimum(gl.maximum(seq_start + length - q_offset, real_lo), nq)
            slots = slot_block * BLOCK_M + gl.arange(0, BLOCK_M, layout=L.io_rows)
            io_dims = gl.arange(0, HEAD_DIM, layout=L.io_cols)
            pad_rows = gl.where(slots < real_lo, slots, slots + (real_hi - real_lo)).to(gl.int64)
            pad_ok = gl.expand_dims(slots < nq - (real_hi - real_lo), 1) & gl.expand_dims(io_dims < HEAD_DIM, 0)
            gl.store(out_head + gl.expand_dims(pad_rows * stride_on, 1) + gl.expand_dims(io_dims, 0),
                     gl.zeros([BLOCK_M, HEAD_DIM], out_ptr.dtype.element_ty, L.io), mask=pad_ok)
        return b, h, h // heads_per_kv, seq_start, length, m, out_head

    @gluon.jit
    def _query_tile(q_ptr, b, h, seq_start, length, m0, q_offset, stride_qb, stride_qh, stride_qn,
                    L: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr):
        """The block's query rows (sequence position ``p`` is q row ``seq_start + p - q_offset``;
        rows outside the sequence or before a chunk zero) in an NVMMA-swizzled shared tile,
        fenced for wgmma (the caller's CTA barrier publishes it)."""
        dtype: gl.constexpr = q_ptr.dtype.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype))
        _load_query(q_smem, q_ptr, b, h, seq_start, length, m0, q_offset, stride_qb, stride_qh, stride_qn, L)
        return q_smem

    @gluon.jit
    def _load_query(q_smem, q_ptr, b, h, seq_start, length, row0, q_offset, stride_qb, stride_qh, stride_qn,
                    L: gl.constexpr):
        """Query rows ``row0 + [0, ROWS)`` into ``q_smem`` as :func:`_query_tile` loads them, fenced
        for wgmma (the caller's barrier publishes them)."""
        ROWS: gl.constexpr = q_smem.shape[0]
        HEAD_DIM: gl.constexpr = q_smem.shape[1]
        io_pos = row0 + gl.arange(0, ROWS, layout=L.io_rows)
        io_dims = gl.arange(0, HEAD_DIM, layout=L.io_cols)
        io_ok = (io_pos < length) & (io_pos >= q_offset - seq_start)
        q_head = q_ptr + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh - q_offset.to(gl.int64) * stride_qn
        q_tile = gl.load(q_head + gl.expand_dims((seq_start + io_pos).to(gl.int64) * stride_qn, 1)
                         + gl.expand_dims(io_dims, 0),
                         mask=gl.expand_dims(io_ok, 1) & gl.expand_dims(io_dims < HEAD_DIM, 0), other=0.0)
        q_smem.store(q_tile)
        fence_async_shared()

    @gluon.jit
    def _store_rows(acc, l_i, out_head, stride_on, row0, seq_start, length, q_offset, L: gl.constexpr):
        """Normalise the running softmax and store the real rows of ``row0 + [0, ROWS)`` (output
        row ``seq_start + p - q_offset``)."""
        ROWS: gl.constexpr = acc.shape[0]
        HEAD_DIM: gl.constexpr = acc.shape[1]
        l_o = gl.convert_layout(l_i, L.o_rows)
        out = acc / gl.expand_dims(gl.where(l_o > 0, l_o, 1.0), 1)
        o_pos = row0 + gl.arange(0, ROWS, layout=L.o_rows)
        o_dims = gl.arange(0, HEAD_DIM, layout=L.o_cols)
        o_ok = (o_pos < length) & (o_pos >= q_offset - seq_start)
        o_rows_ix = (seq_start + o_pos).to(gl.int64) - q_offset
        gl.store(out_head + gl.expand_dims(o_rows_ix * stride_on, 1) + gl.expand_dims(o_dims, 0),
                 out.to(out_head.dtype.element_ty), mask=gl.expand_dims(o_ok, 1) & gl.expand_dims(o_dims < HEAD_DIM, 0))

    @gluon.jit
    def _ring_tile(ring, slot):
        """Slot ``slot`` of a K / V ring as a ``[BLOCK_N, HEAD_DIM]`` wgmma operand."""
        BLOCK_N: gl.constexpr = ring.shape[3]
        HEAD_DIM: gl.constexpr = ring.shape[4]
        return ring.index(slot).reshape([BLOCK_N, HEAD_DIM])

    @gluon.jit
    def _scores(q_smem, k_tile, L: gl.constexpr):
        """S = Q K^T (wgmma), waited for."""
        ROWS: gl.constexpr = q_smem.shape[0]
        BLOCK_N: gl.constexpr = k_tile.shape[0]
        s = warpgroup_mma(q_smem, k_tile.permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, L.s),
                          use_acc=False, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(s, ))

    @gluon.jit
    def _scores_beside_pv(q_smem, k_tile, p_op, v_tile, acc, L: gl.constexpr):
        """FA3's intra-warpgroup overlap: S_t = Q K_t^T and O += P_{t-1} V_{t-1} issued together,
        S_t waited for alone; the P V wgmma stays in flight through the softmax that follows."""
        ROWS: gl.constexpr = q_smem.shape[0]
        BLOCK_N: gl.constexpr = k_tile.shape[0]
        s = warpgroup_mma(q_smem, k_tile.permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, L.s),
                          use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, v_tile, acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        return s, acc

    @gluon.jit
    def _pv(p_op, v_tile, acc):
        """O += P V (wgmma, P from registers), waited for."""
        acc = warpgroup_mma(p_op, v_tile, acc, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    @gluon.jit
    def _rescale(acc, alpha, p, L: gl.constexpr, dtype: gl.constexpr):
        """O scaled by ``alpha`` (the running max moved), and P as the next P V's register operand."""
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, L.o_rows), 1)
        return acc, gl.convert_layout(p.to(dtype), L.p)

    @gluon.jit
    def _kv_ring(k_desc, v_desc, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """The K / V ring in shared memory (``STAGES`` slots, each a ``[1, 1, BLOCK_N, HEAD_DIM]``
        TMA box of the 4D descriptors) and one initialised mbarrier per slot for each."""
        dtype: gl.constexpr = k_desc.block_type.element_ty
        k_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(i), count=1)
            mbarrier.init(v_bar.index(i), count=1)
        return k_ring, v_ring, k_bar, v_bar

    @gluon.jit
    def _wide_ranges(prefix_ptr, sink_ptr, band_ptr, h, m0, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """Head ``h``'s key ranges for rows ``[m0, m0 + BLOCK_M)``, those of the wide Triton kernel
        (prefix, band edge, interior, diagonal) counted in ``BLOCK_N`` tiles: ``(sink, band,
        prefix_end, lo, edge, n_pre, n_edge, n_int, n_tiles)``, the arguments of :func:`_tile`."""
        prefix = gl.maximum(gl.load(prefix_ptr + h), 0)
        sink = gl.load(sink_ptr + h)
        band = gl.load(band_ptr + h)
        prefix_end = gl.minimum(prefix, m0)
        lo = gl.minimum(gl.maximum(prefix, m0 + 1 - band), m0)
        edge = gl.maximum(gl.minimum(m0, gl.maximum(prefix, m0 + BLOCK_M - band)), lo)
        edge = m0 - ((m0 - edge) // BLOCK_N) * BLOCK_N
        n_pre = (prefix_end + BLOCK_N - 1) // BLOCK_N
        n_edge = (edge - lo + BLOCK_N - 1) // BLOCK_N
        n_int = (m0 - edge) // BLOCK_N
        return sink, band, prefix_end, lo, edge, n_pre, n_edge, n_int, n_pre + n_edge + n_int + BLOCK_M // BLOCK_N

    @gluon.jit
    def _tile(t, n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band,
              BLOCK_N: gl.constexpr):
        """Tile ``t`` of the program's flat sequence: first key, key bound, mask flag and the
        sink / band of its element test (``WIDE``: no band test)."""
        in_edge = t >= n_pre
        in_int = t >= n_pre + n_edge
        in_diag = t >= n_pre + n_edge + n_int
        k0 = gl.where(in_diag, m0 + (t - n_pre - n_edge - n_int) * BLOCK_N,
                      gl.where(in_int, edge + (t - n_pre - n_edge) * BLOCK_N,
                               gl.where(in_edge, lo + (t - n_pre) * BLOCK_N, t * BLOCK_N)))
        bound = gl.where(in_diag, length, gl.where(in_int, m0, gl.where(in_edge, edge, prefix_end)))
        check = (in_edge & (t < n_pre + n_edge)) | in_diag
        masked = check | ((t < n_pre) & (k0 + BLOCK_N > prefix_end))
        tile_sink = gl.where(check, sink, _wide)
        tile_band = gl.where(check, band, _wide)
        return k0, bound, masked, tile_sink, tile_band

    @gluon.jit
    def _issue(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, tile, n_tiles, b, kv, seq_start,
               n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band,
               STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
        """Start the TMA loads of K and V tile ``tile`` (if it exists) into its ring slot."""
        _issue_at(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, tile, tile % STAGES, n_tiles, b, kv, seq_start,
                  n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band, BLOCK_N)

    @gluon.jit
    def _issue_at(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, tile, slot, n_tiles, b, kv, seq_start,
                  n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band, BLOCK_N: gl.constexpr):
        """:func:`_issue` into ring slot ``slot`` (a persistent program's tiles run on across its
        blocks, so a block's tile ``t`` need not sit in slot ``t % STAGES``)."""
        k0, bound, masked, tile_sink, tile_band = _tile(tile, n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length,
                                                        sink, band, BLOCK_N)
        _load_tile(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, slot, b, kv, seq_start + k0, tile < n_tiles)

    @gluon.jit
    def _load_tile(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, slot, b, kv, row, live):
        """TMA loads of the K and V rows ``[row, row + BLOCK_N)`` of KV head ``kv`` into ring slot
        ``slot``, each completing on its own mbarrier (predicated on ``live``)."""
        mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes, pred=live)
        tma.async_copy_global_to_shared(k_desc, [b, kv, row, 0], k_bar.index(slot), k_ring.index(slot), pred=live)
        mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes, pred=live)
        tma.async_copy_global_to_shared(v_desc, [b, kv, row, 0], v_bar.index(slot), v_ring.index(slot), pred=live)

    @gluon.jit(do_not_specialize=_LENGTH_ARGS)
    def hopper_wide_kernel(
            q_ptr, k_desc, v_desc, out_ptr,
            seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr,
            stride_qb, stride_qh, stride_qn,
            stride_ob, stride_oh, stride_on,
            n, num_heads, heads_per_kv, num_programs, q_offset,
            qk_scale,
            HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
            WARP_SPECIALIZE: gl.constexpr, PERSISTENT: gl.constexpr = False):
        """The module docstring's kernel: with ``WARP_SPECIALIZE`` the 4 warps of the launch and
        a second warpgroup each own 64 of the program's 128 rows (:func:`_ws_consume`), a fifth
        warp loads K / V (:func:`_ws_produce`); without, the launch's 8 warps (two warpgroups)
        run one loop in lock-step. ``PERSISTENT`` (with ``WARP_SPECIALIZE``): a grid of ``(P, B)``
        programs, each walking many blocks (:func:`_ws_consume_items`)."""
        # registers: S and O accumulators of wgmma, laid out over the warps of one partition
        L: gl.constexpr = kernel_layouts(gl.num_warps(), BLOCK_N, HEAD_DIM)
        if PERSISTENT:
            _persistent_wide(q_ptr, k_desc, v_desc, out_ptr, seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr,
                             band_ptr, stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, n, num_heads,
                             heads_per_kv, num_programs, q_offset, qk_scale, L, HEAD_DIM, BLOCK_N, STAGES)
        else:
            _one_block_wide(q_ptr, k_desc, v_desc, out_ptr, seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr,
                            band_ptr, stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, n, num_heads,
                            heads_per_kv, num_programs, q_offset, qk_scale, L, HEAD_DIM, BLOCK_N, STAGES,
                            WARP_SPECIALIZE)

    @gluon.jit
    def _persistent_wide(q_ptr, k_desc, v_desc, out_ptr, seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr,
                         stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, n, num_heads,
                         heads_per_kv, num_programs, q_offset, qk_scale, L: gl.constexpr, HEAD_DIM: gl.constexpr,
                         BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """The persistent warp-specialised program: its items' padding rows first, then one
        ``warp_specialize`` whose partitions walk all its items (see :func:`_ws_consume_items`)."""
        BLOCK_M: gl.constexpr = 128
        b = gl.program_id(1)
        for item in range(gl.program_id(0), num_programs * num_heads, gl.num_programs(0)):
            _item_block(item % num_programs, b * num_heads + item // num_programs, seq_start_ptr, seq_len_ptr,
                        out_ptr, stride_ob, stride_oh, stride_on, n, num_heads, heads_per_kv, num_programs, q_offset,
                        L, BLOCK_M, HEAD_DIM, True)
        dtype: gl.constexpr = q_ptr.dtype.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype))
        k_ring, v_ring, k_bar, v_bar = _kv_ring(k_desc, v_desc, STAGES, BLOCK_N, HEAD_DIM)
        free_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(free_bar.index(i), count=2)
        gl.thread_barrier()
        zero = gl.program_id(0) * 0          # partition arguments are IR values, not constants
        items = (seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr, out_ptr)
        shape = (n, num_heads, heads_per_kv, num_programs, q_offset)
        consume = (k_ring, v_ring, k_bar, v_bar, free_bar, q_ptr) + items + (
            stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on) + shape + (qk_scale, )
        gl.warp_specialize([
            (_ws_consume_items, (q_smem.slice(0, 64, dim=0), zero) + consume),
            (_ws_consume_items, (q_smem.slice(64, 64, dim=0), zero + 64) + consume),
            (_ws_produce_items, (k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar) + items
             + (stride_ob, stride_oh, stride_on) + shape),
        ], [4, 1], [232, 40])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(free_bar.index(i))
            mbarrier.invalidate(k_bar.index(i))
            mbarrier.invalidate(v_bar.index(i))

    @gluon.jit
    def _one_block_wide(q_ptr, k_desc, v_desc, out_ptr, seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr,
                        stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, n, num_heads, heads_per_kv,
                        num_programs, q_offset, qk_scale, L: gl.constexpr, HEAD_DIM: gl.constexpr,
                        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WARP_SPECIALIZE: gl.constexpr):
        """Program ``(p, b * Hq + h)``: one block of 128 rows, lock-step or warp-specialised."""
        BLOCK_M: gl.constexpr = 128
        b, h, kv, seq_start, length, m, out_head = _program_block(
            seq_start_ptr, seq_len_ptr, out_ptr, stride_ob, stride_oh, stride_on, n, num_heads, heads_per_kv,
            num_programs, q_offset, L, BLOCK_M, HEAD_DIM)
        m0 = m * BLOCK_M

        if (m0 < length) & (m0 + BLOCK_M > q_offset - seq_start):     # the block holds rows of q
            q_smem = _query_tile(q_ptr, b, h, seq_start, length, m0, q_offset, stride_qb, stride_qh, stride_qn,
                                 L, BLOCK_M, HEAD_DIM)
            # K / V ring (TMA destinations are [1, 1, BLOCK_N, D] boxes of the 4D descriptors)
            k_ring, v_ring, k_bar, v_bar = _kv_ring(k_desc, v_desc, STAGES, BLOCK_N, HEAD_DIM)
            sink, band, prefix_end, lo, edge, n_pre, n_edge, n_int, n_tiles = _wide_ranges(
                prefix_ptr, sink_ptr, band_ptr, h, m0, BLOCK_M, BLOCK_N)

            if WARP_SPECIALIZE:
                # a slot returns to the producer once both consumers arrived on its free mbarrier
                free_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
                for i in gl.static_range(STAGES):
                    mbarrier.init(free_bar.index(i), count=2)
                gl.thread_barrier()
                shared = (k_ring, v_ring, k_bar, v_bar, free_bar, out_head, stride_on, n_tiles,
                          n_pre, n_edge, n_int, prefix_end, lo, edge, m0)
                rest = (length, sink, band, seq_start, q_offset, qk_scale)
                gl.warp_specialize([
                    (_ws_consume, (q_smem.slice(0, 64, dim=0), ) + shared + (m0, ) + rest),
                    (_ws_consume, (q_smem.slice(64, 64, dim=0), ) + shared + (m0 + 64, ) + rest),
                    (_ws_produce, (k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar, n_tiles, b, kv, seq_start,
                                   n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band)),
                ], [4, 1], [232, 40])
                for i in gl.static_range(STAGES):
                    mbarrier.invalidate(free_bar.index(i))
            else:
                gl.thread_barrier()
                _wide_lockstep(q_smem, k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, out_head, stride_on, b, kv,
                               seq_start, length, m0, q_offset, qk_scale, sink, band, prefix_end, lo, edge,
                               n_pre, n_edge, n_int, n_tiles, L, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)
            for i in gl.static_range(STAGES):
                mbarrier.invalidate(k_bar.index(i))
                mbarrier.invalidate(v_bar.index(i))

    @gluon.jit
    def _wide_lockstep(q_smem, k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, out_head, stride_on, b, kv,
                       seq_start, length, m0, q_offset, qk_scale, sink, band, prefix_end, lo, edge,
                       n_pre, n_edge, n_int, n_tiles, L: gl.constexpr, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        """The 8 warps' loop: each tile's S, softmax and P V, then one CTA barrier before its
        slot is refilled with tile ``t + STAGES``."""
        dtype: gl.constexpr = q_smem.dtype
        for i in gl.static_range(STAGES):
            _issue(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, i, n_tiles, b, kv, seq_start,
                   n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band, STAGES, BLOCK_N)

        rows = m0 + gl.arange(0, BLOCK_M, layout=L.s_rows)
        cols = gl.arange(0, BLOCK_N, layout=L.s_cols)
        m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, L.s_rows)
        l_i = gl.zeros([BLOCK_M], gl.float32, L.s_rows)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, L.o)
        for t in range(n_tiles):
            slot = t % STAGES
            phase = (t // STAGES) & 1
            mbarrier.wait(k_bar.index(slot), phase)
            s = _scores(q_smem, _ring_tile(k_ring, slot), L)
            p, alpha, m_i, l_i = _softmax_step(s, t, m_i, l_i, rows, cols, qk_scale, n_pre, n_edge, n_int,
                                               prefix_end, lo, edge, m0, length, sink, band, BLOCK_N)
            acc, p_op = _rescale(acc, alpha, p, L, dtype)
            mbarrier.wait(v_bar.index(slot), phase)
            acc = _pv(p_op, _ring_tile(v_ring, slot), acc)
            # both warpgroups are done with this slot: refill it with tile t + STAGES
            gl.thread_barrier()
            _issue(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, t + STAGES, n_tiles, b, kv, seq_start,
                   n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band, STAGES, BLOCK_N)

        _store_rows(acc, l_i, out_head, stride_on, m0, seq_start, length, q_offset, L)

    @gluon.jit
    def _softmax_step(s, t, m_i, l_i, rows, cols, qk_scale, n_pre, n_edge, n_int, prefix_end, lo, edge, m0,
                      length, sink, band, BLOCK_N: gl.constexpr):
        """Tile ``t``'s scores ``s`` -> (P, the rescale factor of O, running max, running sum):
        scaled, masked where the tile needs it, online softmax in float32 with ``exp2``."""
        k0, bound, masked, tile_sink, tile_band = _tile(t, n_pre, n_edge, n_int, prefix_end, lo, edge, m0,
                                                        length, sink, band, BLOCK_N)
        s = s * qk_scale
        if masked:
            keys = k0 + cols
            keep = gl.expand_dims(keys < bound, 0) & (gl.expand_dims(keys, 0) <= gl.expand_dims(rows, 1))
            keep = keep & (gl.expand_dims(keys < tile_sink, 0)
                           | (gl.expand_dims(rows, 1) - gl.expand_dims(keys, 0) < tile_band))
            s = gl.where(keep, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    # Partition functions take no constexpr arguments (warp_specialize passes worker arguments as
    # IR values): ring depth, key tile and head dim come from the shared buffers' shapes.
    @gluon.jit
    def _ws_produce(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar, n_tiles, b, kv, seq_start,
                    n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band):
        """The producer warp: tile ``t``'s K and V by TMA into slot ``t % STAGES`` once both
        consumers released that slot's previous tile (``free_bar``)."""
        _ws_load_tiles(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar, 0, n_tiles, b, kv, seq_start,
                       n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band)

    @gluon.jit
    def _ws_load_tiles(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar, g0, n_tiles, b, kv, seq_start,
                       n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band):
        """A block's tiles into the ring, its tile ``t`` the ring's ``g0 + t``-th: slot
        ``(g0 + t) % STAGES``, issued once both consumers released that slot's previous tile."""
        STAGES: gl.constexpr = k_ring.shape[0]
        BLOCK_N: gl.constexpr = k_ring.shape[3]
        for t in range(n_tiles):
            g = g0 + t
            slot = g % STAGES
            mbarrier.wait(free_bar.index(slot), ((g // STAGES) + 1) & 1, pred=g >= STAGES)
            _issue_at(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, t, slot, n_tiles, b, kv, seq_start,
                      n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band, BLOCK_N)

    @gluon.jit
    def _ws_consume(q_half, k_ring, v_ring, k_bar, v_bar, free_bar, out_head, stride_on, n_tiles,
                    n_pre, n_edge, n_int, prefix_end, lo, edge, m0, row0, length, sink, band, seq_start, q_offset,
                    qk_scale):
        """One consumer warpgroup: rows ``row0 + [0, 64)`` (``q_half``) over the program's whole tile
        sequence, online softmax, then its rows of the output."""
        HEAD_DIM: gl.constexpr = k_ring.shape[4]
        L: gl.constexpr = kernel_layouts(4, k_ring.shape[3], HEAD_DIM)
        acc, l_i = _ws_tiles(q_half, k_ring, v_ring, k_bar, v_bar, free_bar, 0, n_tiles, n_pre, n_edge, n_int,
                             prefix_end, lo, edge, m0, row0, length, sink, band, qk_scale)
        _store_rows(acc, l_i, out_head, stride_on, row0, seq_start, length, q_offset, L)

    @gluon.jit
    def _ws_tiles(q_half, k_ring, v_ring, k_bar, v_bar, free_bar, g0, n_tiles, n_pre, n_edge, n_int,
                  prefix_end, lo, edge, m0, row0, length, sink, band, qk_scale):
        """A consumer's walk of one block: rows ``row0 + [0, 64)`` over the block's tiles, which are
        the ring's ``g0``-th onwards (see :func:`_ws_load_tiles`); returns (O, row sums). Each slot
        is released to the producer (``free_bar``, one arrival per consumer) once its P V wgmma
        is done."""
        ROWS: gl.constexpr = 64
        STAGES: gl.constexpr = k_ring.shape[0]
        BLOCK_N: gl.constexpr = k_ring.shape[3]
        HEAD_DIM: gl.constexpr = k_ring.shape[4]
        dtype: gl.constexpr = q_half.dtype
        L: gl.constexpr = kernel_layouts(4, BLOCK_N, HEAD_DIM)
        rows = row0 + gl.arange(0, ROWS, layout=L.s_rows)
        cols = gl.arange(0, BLOCK_N, layout=L.s_cols)
        m_i = gl.full([ROWS], -1.0e30, gl.float32, L.s_rows)
        l_i = gl.zeros([ROWS], gl.float32, L.s_rows)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, L.o)
        # Software pipeline (FA3's intra-warpgroup overlap): iteration t >= 1 issues S_t = Q K_t^T
        # and O += P_{t-1} V_{t-1}, waits for S_t only, and runs tile t's softmax while the P V
        # wgmma is still in flight; then waits for it, frees slot t-1 and rescales O.
        first = g0 % STAGES
        mbarrier.wait(k_bar.index(first), (g0 // STAGES) & 1)
        s = _scores(q_half, _ring_tile(k_ring, first), L)
        p, alpha, m_i, l_i = _softmax_step(s, 0, m_i, l_i, rows, cols, qk_scale, n_pre, n_edge, n_int,
                                           prefix_end, lo, edge, m0, length, sink, band, BLOCK_N)
        p_op = gl.convert_layout(p.to(dtype), L.p)
        mbarrier.wait(v_bar.index(first), (g0 // STAGES) & 1)
        for t in range(1, n_tiles):
            g = g0 + t
            slot = g % STAGES
            prev = (g - 1) % STAGES
            mbarrier.wait(k_bar.index(slot), (g // STAGES) & 1)
            s, acc = _scores_beside_pv(q_half, _ring_tile(k_ring, slot), p_op, _ring_tile(v_ring, prev), acc, L)
            p, alpha, m_i, l_i = _softmax_step(s, t, m_i, l_i, rows, cols, qk_scale, n_pre, n_edge, n_int,
                                               prefix_end, lo, edge, m0, length, sink, band, BLOCK_N)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(free_bar.index(prev), count=1)
            acc, p_op = _rescale(acc, alpha, p, L, dtype)
            mbarrier.wait(v_bar.index(slot), (g // STAGES) & 1)
        # the last tile's P V
        last = (g0 + n_tiles - 1) % STAGES
        acc = _pv(p_op, _ring_tile(v_ring, last), acc)
        mbarrier.arrive(free_bar.index(last), count=1)
        return acc, l_i

    # The persistent schedule (``PERSISTENT``): program ``(p, b)`` of ``P`` walks the items ``p,
    # p + P, ...`` of batch ``b``, item ``i`` being block ``i % num_programs`` of head ``i //
    # num_programs`` (the order the hardware launches the one-block programs in). All three
    # partitions walk the same items and skip the same ones, so the ring's tile count ``g`` runs on
    # across blocks in each: the producer loads the next block's first tiles while the consumers
    # finish this one's last tiles and store its rows.
    @gluon.jit
    def _persistent_item(item, b, seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr, out_ptr,
                         stride_ob, stride_oh, stride_on, n, num_heads, heads_per_kv, num_programs, q_offset,
                         BLOCK_N: gl.constexpr):
        """Item ``item``'s block in batch ``b``: ``(live, h, kv, seq_start, length, m0, out_head)``,
        ``live`` if the block holds rows of q, then its ranges (:func:`_wide_ranges`)."""
        L: gl.constexpr = kernel_layouts(4, BLOCK_N, 64)        # unused by _item_block without PAD
        b, h, kv, seq_start, length, m, out_head = _item_block(
            item % num_programs, b * num_heads + item // num_programs, seq_start_ptr, seq_len_ptr, out_ptr,
            stride_ob, stride_oh, stride_on, n, num_heads, heads_per_kv, num_programs, q_offset, L, 128, 64, False)
        m0 = m * 128
        live = (m0 < length) & (m0 + 128 > q_offset - seq_start)
        return (live, h, kv, seq_start, length, m0, out_head) + _wide_ranges(prefix_ptr, sink_ptr, band_ptr, h, m0,
                                                                             128, BLOCK_N)

    @gluon.jit
    def _ws_produce_items(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar, seq_start_ptr, seq_len_ptr,
                          prefix_ptr, sink_ptr, band_ptr, out_ptr, stride_ob, stride_oh, stride_on, n, num_heads,
                          heads_per_kv, num_programs, q_offset):
        """The persistent producer warp: every block's tiles, the ring's count running on."""
        BLOCK_N: gl.constexpr = k_ring.shape[3]
        b = gl.program_id(1)
        g = gl.program_id(1) * 0
        for item in range(gl.program_id(0), num_programs * num_heads, gl.num_programs(0)):
            (live, h, kv, seq_start, length, m0, out_head, sink, band, prefix_end, lo, edge, n_pre, n_edge, n_int,
             n_tiles) = _persistent_item(item, b, seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr, out_ptr,
                                         stride_ob, stride_oh, stride_on, n, num_heads, heads_per_kv, num_programs,
                                         q_offset, BLOCK_N)
            if live:
                _ws_load_tiles(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar, g, n_tiles, b, kv, seq_start,
                               n_pre, n_edge, n_int, prefix_end, lo, edge, m0, length, sink, band)
                g += n_tiles

    @gluon.jit
    def _ws_consume_items(q_half, half_row, k_ring, v_ring, k_bar, v_bar, free_bar, q_ptr, seq_start_ptr,
                          seq_len_ptr, prefix_ptr, sink_ptr, band_ptr, out_ptr, stride_qb, stride_qh, stride_qn,
                          stride_ob, stride_oh, stride_on, n, num_heads, heads_per_kv, num_programs, q_offset,
                          qk_scale):
        """A persistent consumer warpgroup: for every block, its 64 rows (``half_row`` into the
        block) loaded into ``q_half``, walked (:func:`_ws_tiles`) and stored."""
        BLOCK_N: gl.constexpr = k_ring.shape[3]
        HEAD_DIM: gl.constexpr = k_ring.shape[4]
        L: gl.constexpr = kernel_layouts(4, BLOCK_N, HEAD_DIM)
        b = gl.program_id(1)
        g = gl.program_id(1) * 0
        for item in range(gl.program_id(0), num_programs * num_heads, gl.num_programs(0)):
            (live, h, kv, seq_start, length, m0, out_head, sink, band, prefix_end, lo, edge, n_pre, n_edge, n_int,
             n_tiles) = _persistent_item(item, b, seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr, out_ptr,
                                         stride_ob, stride_oh, stride_on, n, num_heads, heads_per_kv, num_programs,
                                         q_offset, BLOCK_N)
            if live:
                row0 = m0 + half_row
                gl.thread_barrier()          # every warp of this warpgroup is done with the last block's Q
                _load_query(q_half, q_ptr, b, h, seq_start, length, row0, q_offset, stride_qb, stride_qh,
                            stride_qn, L)
                gl.thread_barrier()
                acc, l_i = _ws_tiles(q_half, k_ring, v_ring, k_bar, v_bar, free_bar, g, n_tiles, n_pre, n_edge,
                                     n_int, prefix_end, lo, edge, m0, row0, length, sink, band, qk_scale)
                _store_rows(acc, l_i, out_head, stride_on, row0, seq_start, length, q_offset, L)
                g += n_tiles

    # variant -> (kernel, warps of the launch)
    KERNELS = {"wide": (hopper_wide_kernel, NUM_WARPS), "ws": (hopper_wide_kernel, 4),
               "ws_persist": (hopper_wide_kernel, 4)}


def kv_layout(dtype, block_n: int, head_dim: int):
    """Shared layout of a ``[1, 1, block_n, head_dim]`` K or V box (TMA destination, wgmma operand)."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, block_n, head_dim], dtype)


def gl_dtype(dtype: torch.dtype):
    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[dtype]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_grid(programs: int, batch: int, heads: int, sms: int) -> tuple[int, int]:
    """``(P, B)``: ``P`` persistent programs per batch element, one an SM in all (one fits an SM:
    its shared memory), never more than the batch element's blocks."""
    return max(1, min(programs * heads, sms // batch)), batch


def launch(q, k, v, index, scale: float, out, programs: int, variant: str = "wide"):
    """Attention of the layer into ``out`` (``programs`` 128-row programs per head, as the wide
    kernel's launch computes them) by the ``variant`` kernel (``"wide"``: 8 warps in lock-step;
    ``"ws"``: warp-specialised; ``"ws_persist"``: warp-specialised, a program an SM walking many
    blocks). Returns the compiled kernel (for the resource report)."""
    if GLUON_ERROR is not None:
        raise RuntimeError(GLUON_ERROR)
    B, H, nq, D = q.shape
    n = k.shape[2]
    kernel, warps = KERNELS[variant]
    cfg = CONFIGS[variant][D]
    layout = kv_layout(gl_dtype(q.dtype), cfg["block_n"], D)
    box = [1, 1, cfg["block_n"], D]
    k_desc = TensorDescriptor(k, list(k.shape), _tma_strides(k), box, layout)
    v_desc = TensorDescriptor(v, list(v.shape), _tma_strides(v), box, layout)
    persistent = variant == "ws_persist"
    grid = persistent_grid(programs, B, H, _sm_count(q.device.index or 0)) if persistent else (programs, B * H)
    return kernel[grid](
        q, k_desc, v_desc, out,
        index.seq_start, index.seq_len, index.prefix, index.sink, index.band,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n, H, H // k.shape[1], programs, n - nq,
        scale * LOG2E,
        HEAD_DIM=D, BLOCK_N=cfg["block_n"], STAGES=cfg["stages"], WARP_SPECIALIZE=variant != "wide",
        PERSISTENT=persistent, num_warps=warps)
