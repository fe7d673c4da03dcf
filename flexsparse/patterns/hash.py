"""Hash-sparse attention (SCFA): sort queries and keys per head by bucket, build the BlockMask.

Mask in original positions: ``q_bucket[i] == k_bucket[j] AND i >= j``. Queries (per query head)
and keys (per KV head) are sorted stably by bucket, so each bucket is contiguous and
time-ordered inside. With a known bucket count the sort is a Triton counting sort, and each
bucket may start at a block boundary (``align``): no block then straddles two buckets, which
turns most off-diagonal blocks of a bucket FULL. In sorted coordinates the mask is
``(qb_sorted[b,h,q] == kb_sorted[b,h//G,kv]) & (qpos_sorted[b,h,q] >= kpos_sorted[b,h//G,kv])``;
the Triton kernel classifies blocks from per-block min/max of (bucket, position).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flexsparse.patterns.blockmask import _choose_impl, _is_capturing, _normalize_block_size, _raise_if_flagged
from flexsparse.patterns.permuted import PermutedBlockMask, build_permuted, side_layout
from flexsparse.reference import _check_per_token

__all__ = ["hash_block_mask", "hash_layout_length"]

_KERNEL_MAX_BUCKETS = 256


def hash_layout_length(N: int, n_buckets: int | None, block_size: int | tuple[int, int] = 128, align: bool | None = None) -> tuple[int, int]:
    """``(L, align_block)``: slots of the sorted problem and the block each bucket is aligned to
    (0 = packed). Aligning costs at most ``n_buckets * (block - 1)`` extra (empty) slots, so it
    is on by default only while that is at most ``N / 4``."""
    qb, kb = _normalize_block_size(block_size)
    blk = math.lcm(qb, kb)
    if n_buckets is None:
        if align:
            raise ValueError("align=True needs n_buckets (the number of buckets bounds the padding)")
        return N, 0
    if align is None:
        align = n_buckets * (blk - 1) <= N // 4
    if not align or N == 0:
        return N, 0
    L = N + n_buckets * (blk - 1)
    return -(-L // blk) * blk, blk


def hash_block_mask(
    q_buckets: Tensor,
    k_buckets: Tensor,
    *,
    n_buckets: int | None = None,
    align: bool | None = None,
    block_size: int | tuple[int, int] = 128,
    impl: str = "auto",
    validate: bool | None = None,
) -> PermutedBlockMask:
    """BlockMask of hash-sparse causal attention, in sorted coordinates.

    Args:
        q_buckets: integer ``[B, Hq, N]``, bucket of each query per query head.
        k_buckets: integer ``[B, Hkv, N]``, bucket of each key per KV head (``Hq % Hkv == 0``;
            query head ``h`` uses KV head ``h // (Hq // Hkv)``).
        n_buckets: the number of buckets, if every id lies in ``[0, n_buckets)``: enables the
            Triton counting sort (up to 256 buckets) and bucket alignment. ``None``: any integer
            ids (negative or huge too), sorted with ``torch.sort``, no alignment.
        align: start every bucket at a block boundary (padding with empty slots). Default: on
            when ``n_buckets * (block - 1) <= N / 4``; needs ``n_buckets``.
        block_size: FlexAttention block size, int or ``(q_block, kv_block)``.
        impl: mask kernels: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton where it runs).
        validate: check that ids lie in ``[0, n_buckets)`` (one host synchronisation). Default:
            True except while compiling or capturing a CUDA graph. Out-of-range ids are
            otherwise treated as dropped tokens.

    Returns:
        A :class:`~flexsparse.patterns.permuted.PermutedBlockMask` over ``(L, L)`` slots (``L = N``
        unless aligned): ``block_mask`` with the exact element ``mask_mod`` in sorted coordinates
        (FULL blocks where one bucket fills both blocks strictly causally), the layouts and
        sorted buckets (int32; int64 ids stay int64 without ``n_buckets``). Use
        ``pm.permute_q(q)``, ``pm.permute_kv(k)``, FlexAttention with ``pm.block_mask``, then
        ``pm.unpermute_q(out)``; ``pm.compose(mod)`` adds your own ``mask_mod`` written in original
        positions.
    """
    _, _, _, N = _check_per_token("q_buckets", q_buckets, "k_buckets", k_buckets, "integer")
    if n_buckets is not None and (isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1):
        raise ValueError(f"n_buckets must be a positive int or None, got {n_buckets!r}")
    L, blk = hash_layout_length(N, n_buckets, block_size, align)
    impl = _choose_impl(impl, q_buckets.device)
    kernel = impl == "triton" and n_buckets is not None and n_buckets <= _KERNEL_MAX_BUCKETS
    q_layout, q_flags = side_layout(q_buckets, n_buckets, L, align=blk, invalid_pos=-1, with_bucket=True, kernel=kernel)
    k_layout, k_flags = side_layout(k_buckets, n_buckets, L, align=blk, invalid_pos=N, with_bucket=True, kernel=kernel)
    if validate is None:
        validate = not _is_capturing()
    if validate and n_buckets is not None:
        _raise_if_flagged(torch.cat([q_flags, k_flags]), f"bucket ids must lie in [0, n_buckets = {n_buckets})")
    return build_permuted(q_layout, k_layout, block_size, impl)
