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

# Block states (flexsparse.patterns.blockmask.EMPTY/PARTIAL/FULL) appear as literals below:
# 0 empty, 1 partial, 2 full.


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


# Layout of the one int32 workspace a build writes (element offsets; each region rounded up to 4
# elements = 16 bytes): kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num,
# full_q_idx, compaction flags [BH*(nQ+nKV)], scatter flags [BH*nQ]; then the int8 states.
# The kernel recomputes the same offsets from (BH, nQ, nKV), so it takes one base pointer
# instead of ten tensors: the host cost of a launch grows with its tensor arguments.


@triton.jit
def _round4(n):
    return (n + 3) // 4 * 4


@triton.jit(do_not_specialize=["BH", "NQ", "NKV"])
def _compact_kernel(states_ptr, out_ptr, BH, NQ, NKV, BLOCK: tl.constexpr):
    """One program per output row: rows 0..NQ-1 are the kv lists of query blocks, rows
    NQ..NQ+NKV-1 the transposed q lists of kv blocks (read in place, strided)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bh_all = bh * 0 + BH  # int64 (sizes may pass 2**31)
    n_q = _round4(bh_all * NQ)
    n_kv = _round4(bh_all * NKV)
    n_map = _round4(bh_all * NQ * NKV)
    kv_num = out_ptr
    kv_idx = kv_num + n_q
    full_kv_num = kv_idx + n_map
    full_kv_idx = full_kv_num + n_q
    q_num = full_kv_idx + n_map
    q_idx = q_num + n_kv
    full_q_num = q_idx + n_map
    full_q_idx = full_q_num + n_kv
    flag = full_q_idx + n_map + bh * (NQ + NKV) + pid
    if pid < NQ:
        _compact_row(states_ptr, kv_num, kv_idx, full_kv_num, full_kv_idx, flag, bh, pid, NQ, NKV, NKV, 1, BLOCK)
    else:
        _compact_row(states_ptr, q_num, q_idx, full_q_num, full_q_idx, flag, bh, pid - NQ, NKV, NQ, 1, NKV, BLOCK)


def _round4_host(n: int) -> int:
    return -(-n // 4) * 4


class Workspace:
    """One device allocation holding everything a build writes, carved into views.

    Attributes: ``lists`` (the eight int32 contiguous list tensors ``kv_num [B,H,nQ]``,
    ``kv_idx [B,H,nQ,nKV]``, ``full_kv_*`` alike, ``q_num [B,H,nKV]``, ``q_idx [B,H,nKV,nQ]``,
    ``full_q_*`` alike), ``compact_flags [B*H*(nQ+nKV)]``, ``scatter_flags [B*H*nQ]`` and
    ``states`` (int8 ``[B,H,nQ,nKV]``, or None without ``with_states``). One allocation and a
    few views cost much less host time than a dozen allocations: at 16k tokens the build is
    bound by host work, not by the GPU.
    """

    def __init__(self, B: int, H: int, nQ: int, nKV: int, device: torch.device, with_states: bool):
        BH = B * H
        self.shape = (B, H, nQ, nKV)
        n_q, n_kv, n_map = _round4_host(BH * nQ), _round4_host(BH * nKV), _round4_host(BH * nQ * nKV)
        n_cf, n_sf = _round4_host(BH * (nQ + nKV)), _round4_host(BH * nQ)
        n_i32 = 2 * n_q + 4 * n_map + 2 * n_kv + n_cf + n_sf
        n_states = _round4_host(BH * nQ * nKV) if with_states else 0
        self.raw = torch.empty(4 * n_i32 + n_states, dtype=torch.int8, device=device)
        i32 = self.raw.view(torch.int32)
        self.base = i32
        num_kv = ((B, H, nQ), (H * nQ, nQ, 1), n_q)
        idx_kv = ((B, H, nQ, nKV), (H * nQ * nKV, nQ * nKV, nKV, 1), n_map)
        num_q = ((B, H, nKV), (H * nKV, nKV, 1), n_kv)
        idx_q = ((B, H, nKV, nQ), (H * nKV * nQ, nKV * nQ, nQ, 1), n_map)
        off = 0
        views = []
        for shape, stride, size in (num_kv, idx_kv, num_kv, idx_kv, num_q, idx_q, num_q, idx_q):
            views.append(i32.as_strided(shape, stride, off))
            off += size
        self.lists = tuple(views)
        self.compact_flags = i32.as_strided((BH * (nQ + nKV),), (1,), off)
        off += n_cf
        self.scatter_flags = i32.as_strided((BH * nQ,), (1,), off)
        off += n_sf
        self.states = (
            self.raw.as_strided((B, H, nQ, nKV), (H * nQ * nKV, nQ * nKV, nKV, 1), 4 * off) if with_states else None
        )


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


def compact_block_states(states: torch.Tensor, ws: Workspace | torch.Tensor) -> None:
    """Write the eight ordered list tensors of ``ws`` (a :class:`Workspace`, or its int32 base
    buffer as one plain tensor, the op path) from a contiguous int8 state map
    ``[B, H, nQ, nKV]``. ``ws.compact_flags`` receives 1 for each output row that met a state
    outside {0, 1, 2} (such states count as empty), else 0."""
    B, H, nQ, nKV = states.shape
    BH = B * H
    base = ws if isinstance(ws, torch.Tensor) else ws.base
    if BH == 0 or nQ == 0 or nKV == 0:
        base.zero_()
        return
    block = max(16, min(_BLOCK_MAX, triton.next_power_of_2(max(nQ, nKV))))
    _compact_kernel[(nQ + nKV, BH)](
        states, base, BH, nQ, nKV, BLOCK=block, num_warps=max(1, min(8, block // 256))
    )
