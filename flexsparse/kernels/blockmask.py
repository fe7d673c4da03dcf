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

import math

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
def _compact_row(
    states_ptr, num_ptr, idx_ptr, full_num_ptr, full_idx_ptr, flag_ptr,
    bh, r, R, C, stride_r, stride_c,
    BLOCK: tl.constexpr,
):
    """Ordered partial and full lists of output row ``r`` of one (batch, head).

    The row reads the states at ``r*stride_r + c*stride_c`` for c < C and lists the partial
    (resp. full) columns ascending, then the other columns ascending (every position written).
    Writes 1 to ``flag_ptr`` if a state is outside {0, 1, 2}, else 0.
    """
    base = states_ptr + bh * R * C + r * stride_r
    out = (bh * R + r).to(tl.int64)
    zero = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    cnt_p = zero
    cnt_f = zero
    nbad = zero
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        s = tl.load(base + cols * stride_c, mask=cols < C, other=0)
        cnt_p += tl.sum((s == 1).to(tl.int32), axis=0)
        cnt_f += tl.sum((s == 2).to(tl.int32), axis=0)
        nbad += tl.sum(((s < 0) | (s > 2)).to(tl.int32), axis=0)
    tl.store(num_ptr + out, cnt_p)
    tl.store(full_num_ptr + out, cnt_f)
    tl.store(flag_ptr, (nbad > 0).to(tl.int32))
    run_p = zero
    run_f = zero
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = cols < C
        s = tl.load(base + cols * stride_c, mask=m, other=0)
        # selected column -> its rank among selected; other column -> cnt + its rank among others
        sel = (s == 1).to(tl.int32)
        before = run_p + tl.cumsum(sel, axis=0) - sel
        pos = tl.where(sel == 1, before, cnt_p + cols - before)
        tl.store(idx_ptr + out * C + pos, cols, mask=m)
        run_p += tl.sum(sel, axis=0)
        sel = (s == 2).to(tl.int32)
        before = run_f + tl.cumsum(sel, axis=0) - sel
        pos = tl.where(sel == 1, before, cnt_f + cols - before)
        tl.store(full_idx_ptr + out * C + pos, cols, mask=m)
        run_f += tl.sum(sel, axis=0)


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
    BLOCK: tl.constexpr,
):
    """One program per output row: rows 0..NQ-1 are the kv lists of query blocks, rows
    NQ..NQ+NKV-1 the transposed q lists of kv blocks (read in place, strided)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    flag = flag_ptr + bh * (NQ + NKV) + pid
    if pid < NQ:
        _compact_row(
            states_ptr, kv_num_ptr, kv_idx_ptr, full_kv_num_ptr, full_kv_idx_ptr, flag,
            bh, pid, NQ, NKV, NKV, 1, BLOCK,
        )
    else:
        _compact_row(
            states_ptr, q_num_ptr, q_idx_ptr, full_q_num_ptr, full_q_idx_ptr, flag,
            bh, pid - NQ, NKV, NQ, 1, NKV, BLOCK,
        )


def _align(n: int) -> int:
    return -(-n // 16) * 16


def allocate_lists(
    B: int, H: int, nQ: int, nKV: int, device: torch.device, with_states: bool
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One device allocation holding everything a build writes, carved into views.

    Returns ``(lists, compact_flags, states, scatter_flags)``: the eight int32 contiguous list
    tensors (``kv_num [B,H,nQ]``, ``kv_idx [B,H,nQ,nKV]``, ``full_kv_*`` alike, ``q_num [B,H,nKV]``,
    ``q_idx [B,H,nKV,nQ]``, ``full_q_*`` alike), the compaction flags ``[B*H*(nQ+nKV)]``, and,
    with ``with_states``, an int8 state map ``[B,H,nQ,nKV]`` and scatter flags ``[B*H*nQ]``.
    Each region starts on a 16-byte boundary. (One allocation and cheap views cost far less
    host time than a dozen allocations; the build is launch-bound at small sizes.)
    """
    BH = B * H
    shapes = [(B, H, nQ), (B, H, nQ, nKV)] * 2 + [(B, H, nKV), (B, H, nKV, nQ)] * 2
    shapes += [(BH * (nQ + nKV),)] + ([(BH * nQ,)] if with_states else [])
    offsets, nbytes = [], 0
    for shape in shapes:
        offsets.append(nbytes)
        nbytes += _align(4 * math.prod(shape))
    states_off = nbytes
    if with_states:
        nbytes += _align(BH * nQ * nKV)
    raw = torch.empty(max(nbytes, 16), dtype=torch.int8, device=device)
    i32 = raw.view(torch.int32)
    views = []
    for shape, off in zip(shapes, offsets):
        strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        views.append(i32.as_strided(shape, strides, off // 4))
    states = None
    if with_states:
        states = raw.as_strided((B, H, nQ, nKV), (H * nQ * nKV, nQ * nKV, nKV, 1), states_off)
    return tuple(views[:8]), views[8], states, (views[9] if with_states else None)


def scatter_block_lists(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None,
    full_kv_indices: torch.Tensor | None,
    states: torch.Tensor,
    flags: torch.Tensor,
) -> None:
    """Fill the int8 state map ``states [B, H, nQ, nKV]`` from block lists (validated inputs).

    ``kv_num_blocks [B,H,nQ]`` and ``kv_indices [B,H,nQ,W]`` are int32 contiguous; the optional
    full lists likewise. ``flags`` (int32 ``[B*H*nQ]``) receives 1 where a row held an index
    outside ``[0, nKV)`` or a count outside ``[0, W]`` (such entries are skipped), else 0.
    """
    B, H, nQ, W = kv_indices.shape
    n_kv = states.shape[-1]
    rows = B * H * nQ
    if rows == 0 or n_kv == 0:
        flags.zero_()
        return
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


# Columns handled per step by the compaction kernel (a power of two). Module-level so tests can
# shrink it to exercise the multi-step path on tiny inputs.
_BLOCK_MAX = 1024


def compact_block_states(states: torch.Tensor, lists: tuple[torch.Tensor, ...], flags: torch.Tensor) -> None:
    """Write the eight ordered list tensors (see :func:`allocate_lists`) from a contiguous int8
    state map ``[B, H, nQ, nKV]``. ``flags [B*H*(nQ+nKV)]`` receives 1 for each output row that
    met a state outside {0, 1, 2} (such states count as empty), else 0."""
    B, H, nQ, nKV = states.shape
    BH = B * H
    if BH == 0 or nQ == 0 or nKV == 0:
        for t in (*lists, flags):
            t.zero_()
        return
    block = max(16, min(_BLOCK_MAX, triton.next_power_of_2(max(nQ, nKV))))
    _compact_kernel[(nQ + nKV, BH)](
        states,
        *lists,
        flags,
        nQ,
        nKV,
        BLOCK=block,
        num_warps=max(1, min(8, block // 256)),
    )
