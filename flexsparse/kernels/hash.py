"""Triton kernels: block states of a sorted (bucket, position) layout.

Used by the hash-sparse pattern (queries and keys sorted per head by bucket, then position) and
by the query/key-drop pattern (kept tokens compacted to the front: one bucket, invalid slots
encoded as impossible positions, see :mod:`flexsparse.patterns.permuted`).

``block_stats`` computes per-block statistics, int64 ``[rows, nBlocks, 4]`` contiguous, holding
``(pos_min, pos_max, bucket_min, bucket_max)`` over the in-range elements of each block of
``block_size`` sorted slots; ``sorted_block_states`` turns them into the int8 state map
``[B, Hq, nQ, nKV]``:

* EMPTY (0) when the bucket ranges cannot overlap, or ``max q pos < min k pos`` (no causal pair);
* FULL (2) when both blocks hold one single equal bucket and ``min q pos >= max k pos``;
* PARTIAL (1) otherwise.

States: one program per (query block, batch * query head); O(B * Hq * nQ * nKV) work, no host
sync.
GQA: query head ``h`` reads the statistics of KV head ``h // G``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["HQ", "G", "NQ", "NKV"])
def _sorted_states_kernel(qs_ptr, ks_ptr, out_ptr, HQ, G, NQ, NKV, BLOCK_KV: tl.constexpr):
    qblk = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HQ
    h = bh % HQ
    kvh = b * (HQ // G) + h // G
    qrow = qs_ptr + (bh * NQ + qblk) * 4
    qpmin = tl.load(qrow)
    qpmax = tl.load(qrow + 1)
    qbmin = tl.load(qrow + 2)
    qbmax = tl.load(qrow + 3)
    q_one = qbmin == qbmax
    out_row = out_ptr + (bh * NQ + qblk) * NKV
    for c0 in range(0, NKV, BLOCK_KV):
        cols = c0 + tl.arange(0, BLOCK_KV)
        m = cols < NKV
        krow = ks_ptr + (kvh * NKV + cols) * 4
        kpmin = tl.load(krow, mask=m, other=0)
        kpmax = tl.load(krow + 1, mask=m, other=0)
        kbmin = tl.load(krow + 2, mask=m, other=0)
        kbmax = tl.load(krow + 3, mask=m, other=0)
        empty = (qbmax < kbmin) | (kbmax < qbmin) | (qpmax < kpmin)
        full = q_one & (kbmin == kbmax) & (qbmin == kbmin) & (qpmin >= kpmax)
        s = tl.where(empty, 0, tl.where(full, 2, 1)).to(tl.int8)
        tl.store(out_row + cols, s, mask=m)


@triton.jit(do_not_specialize=["N", "BS"])
def _block_stats_kernel(
    pos_ptr, bkt_ptr, out_ptr, N, BS, BLOCK: tl.constexpr, HAS_BUCKET: tl.constexpr, SKIP_NEG: tl.constexpr
):
    """One program per (block, row): (pos_min, pos_max, bucket_min, bucket_max) over the
    in-range elements of the block (out-of-range lanes read the block's first element);
    ``SKIP_NEG`` leaves negative positions out of the minimum."""
    blk = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    start = row * N + blk * BS
    lane = tl.arange(0, BLOCK)
    m = (lane < BS) & (blk * BS + lane < N)
    p = tl.load(pos_ptr + start + lane, mask=m, other=0).to(tl.int64)
    p = tl.where(m, p, tl.load(pos_ptr + start).to(tl.int64))
    out = out_ptr + (row * tl.num_programs(0) + blk) * 4
    if SKIP_NEG:
        tl.store(out, tl.min(tl.where(p < 0, 9223372036854775807, p), axis=0))
    else:
        tl.store(out, tl.min(p, axis=0))
    tl.store(out + 1, tl.max(p, axis=0))
    if HAS_BUCKET:
        b = tl.load(bkt_ptr + start + lane, mask=m, other=0).to(tl.int64)
        b = tl.where(m, b, tl.load(bkt_ptr + start).to(tl.int64))
        tl.store(out + 2, tl.min(b, axis=0))
        tl.store(out + 3, tl.max(b, axis=0))
    else:
        tl.store(out + 2, blk * 0)
        tl.store(out + 3, blk * 0)


def block_stats(
    pos: torch.Tensor, bucket: torch.Tensor | None, block_size: int, skip_negative: bool = False
) -> torch.Tensor:
    """int64 ``[B, H, nBlocks, 4]`` = (pos_min, pos_max, bucket_min, bucket_max) per block of
    ``block_size`` slots of contiguous ``pos [B, H, N]`` (and ``bucket``, else zeros), over the
    in-range slots only; ``skip_negative`` leaves negative positions out of ``pos_min``."""
    B, H, N = pos.shape
    pos = pos.contiguous()
    bucket = None if bucket is None else bucket.contiguous()
    n_blocks = -(-N // block_size)
    out = torch.empty(B, H, n_blocks, 4, dtype=torch.int64, device=pos.device)
    if out.numel() == 0:
        return out
    block = triton.next_power_of_2(block_size)
    _block_stats_kernel[(n_blocks, B * H)](
        pos, pos if bucket is None else bucket, out, N, block_size,
        BLOCK=block, HAS_BUCKET=bucket is not None, SKIP_NEG=skip_negative, num_warps=1 if block <= 256 else 4,
    )
    return out


def sorted_block_states(q_stats: torch.Tensor, k_stats: torch.Tensor, groups: int) -> torch.Tensor:
    """int8 ``[B, Hq, nQ, nKV]`` block states from int64 contiguous statistics
    ``q_stats [B, Hq, nQ, 4]`` and ``k_stats [B, Hkv, nKV, 4]`` (``Hq = groups * Hkv``)."""
    B, Hq, nQ, _ = q_stats.shape
    nKV = k_stats.shape[2]
    out = torch.empty(B, Hq, nQ, nKV, dtype=torch.int8, device=q_stats.device)
    if out.numel() == 0:
        return out
    block = max(16, min(1024, triton.next_power_of_2(nKV)))
    _sorted_states_kernel[(nQ, B * Hq)](
        q_stats, k_stats, out, Hq, groups, nQ, nKV, BLOCK_KV=block, num_warps=1 if block <= 256 else 4
    )
    return out
