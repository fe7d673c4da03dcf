"""Triton kernels that build FlexAttention block lists.

Two kernels, both O(B * H * nQ * nKV) work on int8/int32 data and no host synchronisation:

* ``scatter_block_lists`` turns per-row KV block lists (partial and full) into a dense int8 block
  state map ``states [B, H, nQ, nKV]`` (0 empty, 1 partial, 2 full; a block listed as both
  partial and full is partial, so the exact ``mask_mod`` decides).
* ``compact_block_states`` turns a state map into the four ordered list pairs FlexAttention
  wants: ``kv_*`` and ``full_kv_*`` per query-block row, and their exact transposes ``q_*`` and
  ``full_q_*`` per KV-block column, in one launch. Each output row lists the selected block ids
  in ascending order followed by the unselected ids in ascending order, which is exactly the
  layout of ``torch.argsort(row, descending=True, stable=True)`` that ``create_block_mask`` and
  ``BlockMask.from_kv_blocks`` produce, so every entry of every row is a valid block id.

Both kernels write 0/1 flags (one per program, so nothing needs zeroing first) instead of
writing out of bounds when they meet an invalid index, count or state; the caller decides
whether to read them (a host synchronisation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EMPTY = 0
PARTIAL = 1
FULL = 2


@triton.jit
def _scatter_one_list(states_row, num_ptr, idx_ptr, row, W, n_cols, value, BLOCK_W: tl.constexpr):
    """Write ``value`` at the listed columns of one state row; return the number of bad entries."""
    n = tl.load(num_ptr + row)
    nbad = ((n < 0) | (n > W)).to(tl.int32)
    n = tl.minimum(tl.maximum(n, 0), W)
    for w0 in range(0, W, BLOCK_W):
        offs = w0 + tl.arange(0, BLOCK_W)
        listed = offs < n
        idx = tl.load(idx_ptr + row * W + offs, mask=listed, other=0)
        ok = (idx >= 0) & (idx < n_cols)
        tl.store(states_row + idx, value, mask=listed & ok)
        nbad += tl.sum((listed & ~ok).to(tl.int32), axis=0)
    return nbad


@triton.jit
def _scatter_kernel(
    states_ptr,
    num_ptr,
    idx_ptr,
    full_num_ptr,
    full_idx_ptr,
    flag_ptr,
    W,
    FW,
    n_cols,
    HAS_FULL: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program per (batch, head, query-block) row: zero the state row, write the full
    entries, then the partial ones (partial wins), and a 0/1 flag for invalid entries."""
    row = tl.program_id(0).to(tl.int64)
    states_row = states_ptr + row * n_cols
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        tl.store(states_row + cols, tl.zeros([BLOCK_C], dtype=tl.int8), mask=cols < n_cols)
    tl.debug_barrier()
    nbad = tl.zeros([1], dtype=tl.int32)
    if HAS_FULL:
        nbad += _scatter_one_list(states_row, full_num_ptr, full_idx_ptr, row, FW, n_cols, 2, BLOCK_W)
        tl.debug_barrier()
    nbad += _scatter_one_list(states_row, num_ptr, idx_ptr, row, W, n_cols, 1, BLOCK_W)
    tl.store(flag_ptr + row + tl.arange(0, 1), (nbad > 0).to(tl.int32))


@triton.jit
def _write_ordered_chunk(idx_ptr, row_off, rmask, s, value, cols, c0, C, cnt, run, C_CHUNK: tl.constexpr):
    """Write one chunk of columns of an ordered row: the chunk's selected columns go to the
    contiguous run ``run ...`` and its unselected ones after the row's ``cnt`` selected ones.
    A sort of the chunk (selected first, each group ascending) makes both stores contiguous."""
    BIG: tl.constexpr = 1 << 30
    sel = s == value
    key = tl.where(sel, cols, cols + BIG)  # columns past C are never selected: they sort last
    key = tl.sort(key, dim=1)
    val = tl.where(key >= BIG, key - BIG, key)
    k = tl.sum(sel.to(tl.int32), axis=1)
    t = tl.arange(0, C_CHUNK)[None, :]
    pos = tl.where(t < k[:, None], run[:, None] + t, cnt[:, None] + (c0 - run[:, None]) + (t - k[:, None]))
    tl.store(idx_ptr + row_off + pos, val, mask=rmask[:, None] & (t < C - c0))
    return run + k


@triton.jit
def _compact_tile(
    states_ptr,
    num_ptr,
    idx_ptr,
    full_num_ptr,
    full_idx_ptr,
    flag_ptr,
    bh,
    tile,
    R,
    C,
    stride_r,
    stride_c,
    R_TILE: tl.constexpr,
    C_CHUNK: tl.constexpr,
):
    """Ordered lists for output rows ``tile*R_TILE ...`` of one (batch, head).

    Output row r lists the columns c whose state (at ``r*stride_r + c*stride_c``) is partial
    (resp. full): selected columns ascending, then the others ascending. Writes 1 to
    ``flag_ptr`` if a state is outside {0, 1, 2}, else 0.
    """
    rows = tile * R_TILE + tl.arange(0, R_TILE)
    rmask = rows < R
    base = states_ptr + bh * R * C
    cnt_p = tl.zeros([R_TILE], dtype=tl.int32)
    cnt_f = tl.zeros([R_TILE], dtype=tl.int32)
    nbad = tl.zeros([R_TILE], dtype=tl.int32)
    for c0 in range(0, C, C_CHUNK):
        cols = c0 + tl.arange(0, C_CHUNK)[None, :]
        m = rmask[:, None] & (cols < C)
        s = tl.load(base + rows[:, None] * stride_r + cols * stride_c, mask=m, other=0)
        cnt_p += tl.sum((s == 1).to(tl.int32), axis=1)
        cnt_f += tl.sum((s == 2).to(tl.int32), axis=1)
        nbad += tl.sum(((s < 0) | (s > 2)).to(tl.int32), axis=1)
    out_rows = bh * R + rows
    tl.store(num_ptr + out_rows, cnt_p, mask=rmask)
    tl.store(full_num_ptr + out_rows, cnt_f, mask=rmask)
    tl.store(flag_ptr, (tl.sum(nbad, axis=0) > 0).to(tl.int32))

    run_p = tl.zeros([R_TILE], dtype=tl.int32)
    run_f = tl.zeros([R_TILE], dtype=tl.int32)
    row_off = out_rows.to(tl.int64)[:, None] * C
    for c0 in range(0, C, C_CHUNK):
        cols = c0 + tl.arange(0, C_CHUNK)[None, :]
        m = rmask[:, None] & (cols < C)
        s = tl.load(base + rows[:, None] * stride_r + cols * stride_c, mask=m, other=0)
        run_p = _write_ordered_chunk(idx_ptr, row_off, rmask, s, 1, cols, c0, C, cnt_p, run_p, C_CHUNK)
        run_f = _write_ordered_chunk(full_idx_ptr, row_off, rmask, s, 2, cols, c0, C, cnt_f, run_f, C_CHUNK)


@triton.jit
def _compact_kernel(
    states_ptr,
    kv_num_ptr,
    kv_idx_ptr,
    full_kv_num_ptr,
    full_kv_idx_ptr,
    q_num_ptr,
    q_idx_ptr,
    full_q_num_ptr,
    full_q_idx_ptr,
    flag_ptr,
    NQ,
    NKV,
    n_kv_tiles,
    R_TILE: tl.constexpr,
    C_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    flag = flag_ptr + bh * tl.num_programs(0) + pid
    if pid < n_kv_tiles:
        # rows = query blocks, columns = kv blocks (contiguous)
        _compact_tile(
            states_ptr, kv_num_ptr, kv_idx_ptr, full_kv_num_ptr, full_kv_idx_ptr, flag,
            bh, pid, NQ, NKV, NKV, 1, R_TILE, C_CHUNK,
        )
    else:
        # rows = kv blocks, columns = query blocks: the transpose, read in place
        _compact_tile(
            states_ptr, q_num_ptr, q_idx_ptr, full_q_num_ptr, full_q_idx_ptr, flag,
            bh, pid - n_kv_tiles, NKV, NQ, 1, NKV, R_TILE, C_CHUNK,
        )


def scatter_block_lists(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None,
    full_kv_indices: torch.Tensor | None,
    n_kv: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense int8 state map ``[B, H, nQ, n_kv]`` from block lists (inputs already validated).

    ``kv_num_blocks [B,H,nQ]`` and ``kv_indices [B,H,nQ,W]`` are int32 contiguous; the optional
    full lists likewise. Returns ``(states, flags)``: ``flags`` (int32, one per row) is 1 where
    a row held an index outside ``[0, n_kv)`` or a count outside ``[0, W]`` (those are skipped).
    """
    B, H, nQ, W = kv_indices.shape
    dev = kv_indices.device
    rows = B * H * nQ
    states = torch.empty(B, H, nQ, n_kv, dtype=torch.int8, device=dev)
    flags = torch.empty(rows, dtype=torch.int32, device=dev)
    if rows == 0 or n_kv == 0:
        return states.zero_(), flags.zero_()
    has_full = full_kv_indices is not None
    FW = full_kv_indices.shape[-1] if has_full else 0
    block_w = max(16, min(1024, triton.next_power_of_2(max(W, FW, 1))))
    _scatter_kernel[(rows,)](
        states,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks if has_full else kv_num_blocks,
        full_kv_indices if has_full else kv_indices,
        flags,
        W,
        FW,
        n_kv,
        HAS_FULL=has_full,
        BLOCK_W=block_w,
        BLOCK_C=max(16, min(1024, triton.next_power_of_2(n_kv))),
        num_warps=1 if max(block_w, n_kv) <= 128 else 4,
    )
    return states, flags


# Tile shape of the compaction kernel: rows per program, columns per step (a power of two).
# Module-level so tests can change them. Under the CPU interpreter, small tiles are much faster
# (its sort is slow on wide tiles), so CPU tensors use the _CPU values unless a test overrides.
_R_TILE = 32
_C_CHUNK_MAX = 128
_R_TILE_CPU = 8
_C_CHUNK_MAX_CPU = 32


def compact_block_states(states: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """All eight ordered list tensors from a contiguous int8 state map ``[B, H, nQ, nKV]``.

    Returns ``(lists, flags)`` with ``lists = (kv_num, kv_idx, full_kv_num, full_kv_idx, q_num,
    q_idx, full_q_num, full_q_idx)``, int32 contiguous views of one allocation, ``kv_idx
    [B,H,nQ,nKV]`` and ``q_idx [B,H,nKV,nQ]``; ``flags`` is nonzero where a state was outside
    {0, 1, 2} (such states count as empty).
    """
    B, H, nQ, nKV = states.shape
    BH = B * H
    on_cpu = states.device.type == "cpu"
    r_tile = _R_TILE_CPU if on_cpu else _R_TILE
    c_max = _C_CHUNK_MAX_CPU if on_cpu else _C_CHUNK_MAX
    n_kv_tiles = triton.cdiv(nQ, r_tile)
    n_tiles = n_kv_tiles + triton.cdiv(nKV, r_tile)
    sizes = [BH * nQ, BH * nQ * nKV] * 2 + [BH * nKV, BH * nKV * nQ] * 2 + [BH * n_tiles]
    buf = torch.empty(sum(sizes), dtype=torch.int32, device=states.device)
    parts = buf.split(sizes)
    shapes = [(B, H, nQ), (B, H, nQ, nKV)] * 2 + [(B, H, nKV), (B, H, nKV, nQ)] * 2
    lists = tuple(p.view(shape) for p, shape in zip(parts, shapes))
    flags = parts[-1]
    if BH == 0 or nQ == 0 or nKV == 0:
        buf.zero_()
        return lists, flags
    c_chunk = max(16, min(c_max, triton.next_power_of_2(max(nQ, nKV))))
    _compact_kernel[(n_tiles, BH)](
        states,
        *lists,
        flags,
        nQ,
        nKV,
        n_kv_tiles,
        R_TILE=r_tile,
        C_CHUNK=c_chunk,
        num_warps=4,
    )
    return lists, flags
