"""Hash-sparse attention (SCFA): sort queries and keys per head by bucket, build the BlockMask.

Mask in original positions: ``q_bucket[i] == k_bucket[j] AND i >= j``. Queries (per query head)
and keys (per KV head) are sorted stably by ``(bucket, position)`` (key ``bucket * N + pos``), so
each bucket is contiguous and time-ordered inside it. In sorted coordinates the mask is
``(qb_sorted[b,h,q] == kb_sorted[b,h//G,kv]) & (qpos_sorted[b,h,q] >= kpos_sorted[b,h//G,kv])``;
the Triton kernel classifies blocks from per-block min/max of (bucket, position).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexsparse.patterns.permuted import PermutedBlockMask, build_permuted
from flexsparse.reference import _check_per_token

__all__ = ["hash_block_mask", "sort_by_bucket"]


def sort_by_bucket(buckets: Tensor) -> tuple[Tensor, Tensor]:
    """Stable sort of each ``[..., N]`` row by bucket.

    Returns ``(perm, sorted_buckets)``: int64 ``perm`` (sorted slot -> original position; inside a
    bucket positions ascend) and the buckets in sorted order (dtype of ``buckets``).
    """
    # a stable sort by bucket alone keeps positions ascending inside each bucket: the same order
    # as the key bucket * N + pos, without widening to int64 (and without overflow)
    sorted_buckets, perm = torch.sort(buckets, dim=-1, stable=True)
    return perm, sorted_buckets


def hash_block_mask(
    q_buckets: Tensor, k_buckets: Tensor, *, block_size: int | tuple[int, int] = 128, impl: str = "auto"
) -> PermutedBlockMask:
    """BlockMask of hash-sparse causal attention, in sorted coordinates.

    Args:
        q_buckets: integer ``[B, Hq, N]``, bucket of each query per query head.
        k_buckets: integer ``[B, Hkv, N]``, bucket of each key per KV head (``Hq % Hkv == 0``;
            query head ``h`` uses KV head ``h // (Hq // Hkv)``). Any integer values (negative
            too). int64 buckets stay int64 in the mask_mod tables; other integer dtypes become int32
            (cheaper loads inside partial blocks: prefer int32 bucket ids on the GPU).
        block_size: FlexAttention block size, int or ``(q_block, kv_block)``.
        impl: block-state kernel: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton where it runs).

    Returns:
        A :class:`~flexsparse.patterns.permuted.PermutedBlockMask`: ``block_mask`` (exact
        element ``mask_mod`` in sorted coordinates, FULL blocks where one bucket fills both
        blocks strictly causally), ``q_perm``, ``k_perm``, ``q_inv``, sorted positions and
        buckets. Use ``pm.permute_q(q)``, ``pm.permute_kv(k)``, FlexAttention with
        ``pm.block_mask``, then ``pm.unpermute_q(out)``; ``pm.compose(mod)`` adds your own
        ``mask_mod`` written in original positions.
    """
    _check_per_token("q_buckets", q_buckets, "k_buckets", k_buckets, "integer")
    q_perm, qb = sort_by_bucket(q_buckets)
    k_perm, kb = sort_by_bucket(k_buckets)
    if qb.dtype != torch.int64:
        qb, kb = qb.to(torch.int32), kb.to(torch.int32)
    return build_permuted(q_perm, k_perm, q_perm.to(torch.int32), k_perm.to(torch.int32), qb, kb, block_size, impl)
