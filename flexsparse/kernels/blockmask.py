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

Both kernels raise an error flag (an int32 scalar on the device) instead of writing out of
bounds when they meet an invalid index, count or state; the caller decides whether to read it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EMPTY = 0
PARTIAL = 1
FULL = 2


@triton.jit
def _scatter_one_list(states_row, num_ptr, idx_ptr, row, W, n_cols, err_ptr, value, BLOCK_W: tl.constexpr):
    n = tl.load(num_ptr + row)
    bad_count = (n < 0) | (n > W)
    n = tl.minimum(tl.maximum(n, 0), W)
    nbad = bad_count.to(tl.int32)
    for w0 in range(0, W, BLOCK_W):
        offs = w0 + tl.arange(0, BLOCK_W)
        listed = offs < n
        idx = tl.load(idx_ptr + row * W + offs, mask=listed, other=0)
        ok = (idx >= 0) & (idx < n_cols)
        tl.store(states_row + idx, value, mask=listed & ok)
        nbad += tl.sum((listed & ~ok).to(tl.int32), axis=0)
    if nbad > 0:
        tl.store(err_ptr, 1)


@triton.jit
def _scatter_kernel(
    states_ptr,
    num_ptr,
    idx_ptr,
    full_num_ptr,
    full_idx_ptr,
    err_ptr,
    W,
    FW,
    n_cols,
    HAS_FULL: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    states_row = states_ptr + row * n_cols
    if HAS_FULL:
        _scatter_one_list(states_row, full_num_ptr, full_idx_ptr, row, FW, n_cols, err_ptr, 2, BLOCK_W)
        # Partial entries are written after full ones and win: order the two passes.
        tl.debug_barrier()
    _scatter_one_list(states_row, num_ptr, idx_ptr, row, W, n_cols, err_ptr, 1, BLOCK_W)


@triton.jit
def _compact_tile(
    states_ptr,
    num_ptr,
    idx_ptr,
    full_num_ptr,
    full_idx_ptr,
    err_ptr,
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
    (resp. full): selected columns ascending, then the others ascending.
    """
    rows = tile * R_TILE + tl.arange(0, R_TILE)
    rmask = rows < R
    base = states_ptr + bh * R * C
    cnt_p = tl.zeros([R_TILE], dtype=tl.int32)
    cnt_f = tl.zeros([R_TILE], dtype=tl.int32)
    nbad = tl.zeros([R_TILE], dtype=tl.int32)
    for c0 in range(0, C, C_CHUNK):
        cols = c0 + tl.arange(0, C_CHUNK)
        m = rmask[:, None] & (cols[None, :] < C)
        s = tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=m, other=0)
        cnt_p += tl.sum((s == 1).to(tl.int32), axis=1)
        cnt_f += tl.sum((s == 2).to(tl.int32), axis=1)
        nbad += tl.sum(((s < 0) | (s > 2)).to(tl.int32), axis=1)
    out_rows = bh * R + rows
    tl.store(num_ptr + out_rows, cnt_p, mask=rmask)
    tl.store(full_num_ptr + out_rows, cnt_f, mask=rmask)
    if tl.sum(nbad, axis=0) > 0:
        tl.store(err_ptr, 1)

    run_p = tl.zeros([R_TILE], dtype=tl.int32)
    run_f = tl.zeros([R_TILE], dtype=tl.int32)
    row_off = out_rows.to(tl.int64)[:, None] * C
    for c0 in range(0, C, C_CHUNK):
        cols = c0 + tl.arange(0, C_CHUNK)
        m = rmask[:, None] & (cols[None, :] < C)
        s = tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=m, other=0)
        # partial list
        sel = (s == 1).to(tl.int32)
        before = run_p[:, None] + tl.cumsum(sel, axis=1) - sel
        pos = tl.where(sel == 1, before, cnt_p[:, None] + cols[None, :] - before)
        tl.store(idx_ptr + row_off + pos, cols[None, :] + 0 * pos, mask=m)
        run_p += tl.sum(sel, axis=1)
        # full list
        sel = (s == 2).to(tl.int32)
        before = run_f[:, None] + tl.cumsum(sel, axis=1) - sel
        pos = tl.where(sel == 1, before, cnt_f[:, None] + cols[None, :] - before)
        tl.store(full_idx_ptr + row_off + pos, cols[None, :] + 0 * pos, mask=m)
        run_f += tl.sum(sel, axis=1)


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
    err_ptr,
    NQ,
    NKV,
    n_kv_tiles,
    R_TILE: tl.constexpr,
    C_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    if pid < n_kv_tiles:
        # rows = query blocks, columns = kv blocks (contiguous)
        _compact_tile(
            states_ptr, kv_num_ptr, kv_idx_ptr, full_kv_num_ptr, full_kv_idx_ptr, err_ptr,
            bh, pid, NQ, NKV, NKV, 1, R_TILE, C_CHUNK,
        )
    else:
        # rows = kv blocks, columns = query blocks: the transpose, read in place
        _compact_tile(
            states_ptr, q_num_ptr, q_idx_ptr, full_q_num_ptr, full_q_idx_ptr, err_ptr,
            bh, pid - n_kv_tiles, NKV, NQ, 1, NKV, R_TILE, C_CHUNK,
        )


def scatter_block_lists(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None,
    full_kv_indices: torch.Tensor | None,
    n_kv: int,
    err: torch.Tensor,
) -> torch.Tensor:
    """Dense int8 state map ``[B, H, nQ, n_kv]`` from block lists (inputs already validated).

    ``kv_num_blocks [B,H,nQ]`` and ``kv_indices [B,H,nQ,W]`` are int32 contiguous; the optional
    full lists likewise. Invalid entries set ``err[0] = 1`` and are skipped.
    """
    B, H, nQ, W = kv_indices.shape
    states = torch.zeros(B, H, nQ, n_kv, dtype=torch.int8, device=kv_indices.device)
    rows = B * H * nQ
    if rows == 0 or n_kv == 0:
        return states
    has_full = full_kv_indices is not None
    FW = full_kv_indices.shape[-1] if has_full else 0
    block_w = max(16, min(1024, triton.next_power_of_2(max(W, FW, 1))))
    _scatter_kernel[(rows,)](
        states,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks if has_full else kv_num_blocks,
        full_kv_indices if has_full else kv_indices,
        err,
        W,
        FW,
        n_kv,
        HAS_FULL=has_full,
        BLOCK_W=block_w,
        num_warps=1 if block_w <= 128 else 4,
    )
    return states


def compact_block_states(states: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All eight ordered list tensors from a contiguous int8 state map ``[B, H, nQ, nKV]``.

    Returns ``(kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx)``,
    int32 contiguous, with ``kv_idx [B,H,nQ,nKV]`` and ``q_idx [B,H,nKV,nQ]``.
    States outside {0, 1, 2} set ``err[0] = 1`` and count as empty.
    """
    B, H, nQ, nKV = states.shape
    dev = states.device
    i32 = torch.int32
    kv_num = torch.empty(B, H, nQ, dtype=i32, device=dev)
    full_kv_num = torch.empty(B, H, nQ, dtype=i32, device=dev)
    kv_idx = torch.empty(B, H, nQ, nKV, dtype=i32, device=dev)
    full_kv_idx = torch.empty(B, H, nQ, nKV, dtype=i32, device=dev)
    q_num = torch.empty(B, H, nKV, dtype=i32, device=dev)
    full_q_num = torch.empty(B, H, nKV, dtype=i32, device=dev)
    q_idx = torch.empty(B, H, nKV, nQ, dtype=i32, device=dev)
    full_q_idx = torch.empty(B, H, nKV, nQ, dtype=i32, device=dev)
    out = (kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx)
    if B * H == 0 or nQ == 0 or nKV == 0:
        return out
    r_tile = 32
    c_chunk = max(16, min(128, triton.next_power_of_2(max(nQ, nKV))))
    n_kv_tiles = triton.cdiv(nQ, r_tile)
    n_q_tiles = triton.cdiv(nKV, r_tile)
    _compact_kernel[(n_kv_tiles + n_q_tiles, B * H)](
        states,
        kv_num, kv_idx, full_kv_num, full_kv_idx,
        q_num, q_idx, full_q_num, full_q_idx,
        err,
        nQ,
        nKV,
        n_kv_tiles,
        R_TILE=r_tile,
        C_CHUNK=c_chunk,
        num_warps=4,
    )
    return out
