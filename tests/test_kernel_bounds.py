"""The kernels' bounds contract: whatever a SparseIndex holds, no access leaves its tensor.

Valid indices are built, then corrupted (out-of-range columns, key blocks, tile ranges,
counts past their table's width, negative prefix / band, sequence ranges past ``n``, random
``covered`` bytes, everything at once) and run through the interpreted kernel in the
pair-counting mode (1), the tile-counting mode (3) and the attention mode (0).

Out-of-bounds accesses are made visible: q, k, v and the outputs are views into larger
buffers whose guard regions are NaN (a read outside a tensor poisons the result) or a marker
value (a write outside a tensor changes it), and the rows outside each sequence are NaN too
(a key read outside the sequence's own range poisons its rows). Each case checks: no crash,
visited pairs only inside the sequence's causal square, tile counts within the bound the
table widths allow, every output element written and finite, guards untouched.

The interpreter can take the whole process down on a bad access, so the cases run in a
subprocess; a crash fails the test with the last case's name.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mi_compile.patterns.spec import HeadPattern as HP  # noqa: E402

ROOT = pathlib.Path(__file__).parents[1]
GUARD = 4096            # elements of guard before and after every buffer
MARK = -7               # guard value of the integer count buffers
EDGES = [-2**31, -2**30, -65, -64, -1, 0, 1, 63, 64, 65, 127, 128, 199, 200, 201, 2**30, 2**31 - 1]

GENERAL = [HP("vertical_slash", vertical=68, slash=8), HP("block_sparse", topk=2),
           HP("a_shape", sink=4, local=40), HP("dense")]
WIDE = [HP("a_shape", sink=4, local=40), HP("dense"), HP("a_shape", sink=0, local=64), HP("dense")]

CORRUPTIONS = ["none", "columns", "column_counts", "blocks", "block_counts", "tiles", "tile_counts",
               "covered", "prefix_band", "sequences", "everything"]
WIDE_CORRUPTIONS = ["none", "prefix_band", "sequences"]


def _guarded(shape, dtype, fill):
    """A contiguous tensor of ``shape`` inside a buffer with ``GUARD`` elements of ``fill``
    either side; returns ``(buffer, view)``."""
    numel = 1
    for s in shape:
        numel *= s
    buf = torch.full((numel + 2 * GUARD,), fill, dtype=dtype)
    return buf, buf[GUARD:GUARD + numel].view(shape)


def _guards_intact(buf, fill) -> bool:
    ends = torch.cat([buf[:GUARD], buf[-GUARD:]])
    return bool(ends.isnan().all()) if isinstance(fill, float) and fill != fill else bool((ends == fill).all())


def _noise(g, shape, lo=-2**31, hi=2**31 - 1):
    """int32 values: half from EDGES, half uniform in [lo, hi]."""
    edges = torch.tensor(EDGES, dtype=torch.int64)[torch.randint(len(EDGES), shape, generator=g)]
    uniform = torch.randint(lo, hi, shape, generator=g, dtype=torch.int64)
    pick = torch.rand(shape, generator=g) < 0.5
    return torch.where(pick, edges, uniform).to(torch.int32)


def corrupt(index, how: str, seed: int):
    """A copy of ``index`` with the tables ``how`` names overwritten by garbage (shapes and
    dtypes kept: those the host check refuses)."""
    import copy

    g = torch.Generator().manual_seed(seed)
    ix = copy.copy(index)
    for name in ("seq_start", "seq_len", "prefix", "sink", "band", "tile_start", "tile_end", "tiles_upto",
                 "columns", "columns_upto", "covered", "blocks", "block_count"):
        setattr(ix, name, getattr(index, name).clone())
    every = how == "everything"
    # (corruption, entry tables filled with garbage, its count table, how far counts overshoot);
    # "<name>_counts" instead fills only the count table with garbage
    for name, entries, counts, overshoot in (("columns", ("columns",), "columns_upto", 80),
                                             ("blocks", ("blocks",), "block_count", 5),
                                             ("tiles", ("tile_start", "tile_end"), "tiles_upto", 5)):
        if how == name or every:
            for table in entries:
                setattr(ix, table, _noise(g, getattr(ix, table).shape))
            width = getattr(ix, entries[0]).shape[-1]
            setattr(ix, counts, torch.randint(0, width + overshoot, getattr(ix, counts).shape, generator=g,
                                              dtype=torch.int32))
        if how == name.rstrip("s") + "_counts" or every:
            setattr(ix, counts, _noise(g, getattr(ix, counts).shape))
    if how == "covered" or every:
        ix.covered = torch.randint(0, 256, ix.covered.shape, generator=g, dtype=torch.int32).to(torch.uint8)
    if how == "prefix_band" or every:
        ix.prefix, ix.sink, ix.band = (_noise(g, ix.prefix.shape) for _ in range(3))
    if how == "sequences" or every:
        ix.seq_start = _noise(g, ix.seq_start.shape, -300, 500)
        ix.seq_len = _noise(g, ix.seq_len.shape, -300, 500)
    return ix


def clamped_sequences(index):
    """The sequence ranges the kernel uses: start in [0, n], len in [0, n - start]."""
    n = index.n
    start = index.seq_start.long().clamp(0, n)
    length = torch.minimum(index.seq_len.long().clamp(min=0), n - start)
    return start.tolist(), length.tolist()


def inputs(B, Hq, Hkv, n, D, dtype, index, seed):
    """Guarded q, k, v: NaN around every tensor and in every row outside the sequences."""
    g = torch.Generator().manual_seed(seed)
    starts, lengths = clamped_sequences(index)
    out = []
    for h in (Hq, Hkv, Hkv):
        buf, t = _guarded((B, h, n, D), dtype, float("nan"))
        t.copy_(torch.randn(B, h, n, D, generator=g).to(dtype))
        for b, (s, L) in enumerate(zip(starts, lengths)):
            t[b, :, :s] = float("nan")
            t[b, :, s + L:] = float("nan")
        out.append((buf, t))
    return out


def tile_bound(index, m0: int) -> int:
    """Most pairs a 64-row block can count in mode 3, from the table widths alone."""
    from mi_compile.kernels.sparse_attention import KERNEL_CONFIG

    bn, bc = KERNEL_CONFIG["block_n"], KERNEL_CONFIG["block_c"]
    keys = -(-m0 // bn) * bn + index.tile_start.shape[-1] * 64 + max(index.blocks.shape[-1] - 1, 0) * 64
    keys += -(-index.columns.shape[-1] // bc) * bc + 64
    return keys * 64


def run_case(heads, how, seed, n, dtype, seq_start, seq_len, B=2, Hkv=2, D=64):
    """Build, corrupt and run one case in all three modes; raises AssertionError on a breach."""
    from mi_compile.kernels import sparse_attention as ker
    from mi_compile.sparse import build_sparse_index

    Hq = len(heads)
    g = torch.Generator().manual_seed(seed)
    q0, k0 = (torch.randn(B, h, n, D, generator=g).to(dtype) for h in (Hq, Hkv))
    i32 = (lambda x: torch.tensor(x, dtype=torch.int32))
    index = build_sparse_index(q0, k0, heads, seq_start=i32(seq_start), seq_len=i32(seq_len))
    ix = corrupt(index, how, seed)
    starts, lengths = clamped_sequences(ix)
    (qb, q), (kb, k), (vb, v) = inputs(B, Hq, Hkv, n, D, dtype, ix, seed + 1)

    # mode 1: every visited pair, inside the clamped causal square of its sequence
    cb, counts = _guarded((B, Hq, n, n), torch.int32, MARK)
    counts.zero_()
    ker._launch(q, k, v, ix, 1.0, q, counts, mode=1)
    assert _guards_intact(cb, MARK), "mode 1 wrote outside the count tensor"
    assert (counts >= 0).all()
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    for b, (s, L) in enumerate(zip(starts, lengths)):
        inside = (i >= s) & (i < s + L) & (j >= s) & (j <= i)
        outside = counts[b][:, ~inside]
        assert not outside.any(), f"mode 1 counted a pair outside sequence {b}'s causal range"
    if how == "none":
        from mi_compile.sparse import selection_mask_from_index
        assert counts.max() <= 1 and torch.equal(counts.bool(), selection_mask_from_index(index))

    # mode 3: tile pairs per block within the widths' bound, 0 past each sequence's end
    tb, tiles = _guarded((B, Hq, ix.num_query_blocks), torch.int32, MARK)
    tiles.zero_()
    ker._launch(q, k, v, ix, 1.0, q, tiles, mode=3)
    assert _guards_intact(tb, MARK), "mode 3 wrote outside the count tensor"
    for b, L in enumerate(lengths):
        for m in range(ix.num_query_blocks):
            got = tiles[b, :, m]
            if 64 * m >= L:
                assert (got == 0).all(), f"mode 3 counted block {m} past sequence {b}'s end"
            else:
                assert ((got >= 0) & (got <= tile_bound(ix, 64 * m))).all(), f"mode 3 count {got.tolist()}"
    if how == "none" and not ker._wide_ok(ix, 64, ker.KERNEL_CONFIG):
        from mi_compile.patterns.cost import tile_pairs_per_block
        assert torch.equal(tiles.long(), tile_pairs_per_block(index))

    # mode 0: every output element written, finite (no NaN read from a guard or padding row)
    ob, out = _guarded((B, Hq, n, D), dtype, float("nan"))
    out.fill_(float("nan"))
    ker.sparse_attention_from_index(q, k, v, ix, D ** -0.5, out=out)
    assert _guards_intact(ob, float("nan")), "mode 0 wrote outside the output"
    assert torch.isfinite(out).all(), "output has NaN/inf: an element unwritten or a read out of range"
    for b, (s, L) in enumerate(zip(starts, lengths)):
        assert not out[b, :, :s].any() and not out[b, :, s + L:].any(), "padding rows not zero"
    for buf in (qb, kb, vb):
        assert _guards_intact(buf, float("nan"))


LAYERS = {"general": (GENERAL, CORRUPTIONS), "wide": (WIDE, WIDE_CORRUPTIONS)}
SHAPES = [  # n, dtype, seq_start, seq_len, corruptions (None: all of the layer's)
    (200, "float32", [0, 37], [200, 130], None),
    (130, "float16", [0, 0], [130, 67], ["none", "sequences", "everything"]),
]


def worker(layer: str) -> dict:
    """Run every case of ``layer`` (in the subprocess); returns case counts. Prints each case's
    name before it runs, so a crash names it."""
    heads, corruptions = LAYERS[layer]
    done = 0
    for n, dtype, start, length, only in SHAPES:
        for how in corruptions:
            if only is None or how in only:
                print(f"CASE {layer} n={n} {dtype} {how}", flush=True)
                run_case(heads, how, n, n, getattr(torch, dtype), start, length)
                done += 1
    return {"cases": done}


def _run_worker(layer):
    code = (f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
            f"import json, test_kernel_bounds as t; print('RESULT', json.dumps(t.worker({layer!r})))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=900)
    last = [x for x in res.stdout.splitlines() if x.startswith("CASE ")][-1:]
    assert res.returncode == 0, f"rc {res.returncode} in {last}:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return json.loads([x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):])


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_corrupted_index_stays_in_bounds(layer):
    """General kernel (every table) and 128-row kernel (prefix / sink / band, sequences)."""
    result = _run_worker(layer)
    corruptions = LAYERS[layer][1]
    assert result["cases"] == sum(len([c for c in corruptions if only is None or c in only])
                                  for *_, only in SHAPES)


# ------------------------------------------------------------------ host-side table checks

def _index_and_inputs(n=130):
    from mi_compile.sparse import build_sparse_index

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 64, generator=g) for h in (4, 2, 2))
    return build_sparse_index(q, k, GENERAL), q, k, v


@pytest.mark.parametrize("table, change, message", [
    ("columns", lambda t: t.long(), "index.columns must be torch.int32"),
    ("covered", lambda t: t.bool(), "index.covered must be torch.uint8"),
    ("blocks", lambda t: t[..., None], "index.blocks must have 4 dims"),
    ("tile_end", lambda t: torch.cat([t, t], -1), "index.tile_end has shape"),
    ("tiles_upto", lambda t: t[..., :-1], "index.tiles_upto has shape"),
    ("prefix", lambda t: t[:2], "index.prefix has shape"),
    ("seq_len", lambda t: t.repeat(2), "index.seq_len has shape"),
    ("covered", lambda t: t[..., :-1], "index.covered has shape"),
    ("block_count", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), "index.block_count must be contiguous"),
    ("columns", lambda t: t.to("meta"), "index.columns is on meta"),
    ("columns", lambda t: t[..., :0], "index.columns has shape"),
])
def test_host_check_names_the_bad_table(table, change, message):
    import copy

    from mi_compile.sparse import sparse_attention_from_index

    index, q, k, v = _index_and_inputs()
    bad = copy.copy(index)
    setattr(bad, table, change(getattr(index, table)))
    for impl in ("triton", "reference"):
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            sparse_attention_from_index(q, k, v, bad, impl=impl)


def test_host_check_length_heads_and_out():
    from mi_compile.sparse import sparse_attention_from_index

    index, q, k, v = _index_and_inputs()
    with pytest.raises(ValueError, match="index.n is 129, q has n = 130"):
        sparse_attention_from_index(q, k, v, _with(index, n=129))
    with pytest.raises(ValueError, match="got 3 head patterns for 4 query heads"):
        sparse_attention_from_index(q, k, v, _with(index, heads=index.heads[:3]))
    with pytest.raises(ValueError, match="index must be a SparseIndex"):
        sparse_attention_from_index(q, k, v, {"columns": index.columns})
    with pytest.raises(ValueError, match="out must have q's shape"):
        sparse_attention_from_index(q, k, v, index, out=torch.empty(1, 4, 130, 32))
    with pytest.raises(ValueError, match="index.blocks must be >= 0"):
        bad = _with(index, blocks=index.blocks - 5)
        sparse_attention_from_index(q, k, v, bad, impl="reference")
    # the index built for q runs on both paths and agrees
    a = sparse_attention_from_index(q, k, v, index, impl="triton")
    b = sparse_attention_from_index(q, k, v, index, impl="reference")
    assert torch.allclose(a, b, atol=1e-4)


def _with(index, **changes):
    import dataclasses
    return dataclasses.replace(index, **changes)
