"""Query/key-drop attention (SCFA): compact kept tokens to the front, build the BlockMask.

Mask in original positions: ``q_keep[i] AND k_keep[j] AND i >= j``. Per head, kept positions
are moved stably to the front (time order kept, so positions are monotone) and dropped ones to
the back. The sequence keeps its length N (static shapes, no host synchronisation): blocks made
only of dropped slots are EMPTY and cost nothing in FlexAttention. Dropped query slots carry
position -1 and dropped key slots position N, so the exact mask in sorted coordinates is just
``qpos_sorted[b,h,q] >= kpos_sorted[b,h//G,kv]``. Block states use the same Triton kernel as the
hash pattern (one bucket): FULL where both blocks are entirely kept and ``min q pos >= max k pos``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexsparse.patterns.blockmask import _is_capturing, _normalize_block_size
from flexsparse.patterns.permuted import PermutedBlockMask, build_permuted
from flexsparse.reference import _check_per_token

__all__ = ["drop_block_mask", "compact_kept"]


def compact_kept(keep: Tensor, invalid: int) -> tuple[Tensor, Tensor]:
    """Stable compaction of each bool ``[..., N]`` row.

    Returns ``(perm, pos)``: int64 ``perm`` (slot -> original position: kept positions ascending,
    then dropped ones ascending) and int32 ``pos`` (``perm`` with dropped slots set to ``invalid``).
    """
    N = keep.shape[-1]
    ar = torch.arange(N, device=keep.device)
    kept_before = torch.cumsum(keep, -1)  # kept positions <= i (int64)
    count = kept_before[..., -1:] if N else kept_before
    # O(N) stable partition: kept i -> slot kept_before - 1; dropped i -> count + dropped before
    slot = torch.where(keep, kept_before - 1, count + ar - kept_before)
    perm = torch.empty_like(slot).scatter_(-1, slot, ar.expand_as(slot))
    pos = torch.where(ar < count, perm, invalid).to(torch.int32)
    return perm, pos


def _capacity(N: int, block: int, q_count: Tensor, k_count: Tensor, capacity: int | None) -> int:
    """Slots of the compacted problem: the given ``capacity``, or the largest kept count rounded
    up to a multiple of ``~N/16`` (whole blocks) so that a few shapes cover all keep rates, or
    ``N`` while compiling / capturing (no host synchronisation there)."""
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= N:
            raise ValueError(f"capacity must be an int in [1, N = {N}], got {capacity!r}")
        if not _is_capturing() and N:
            need = int(torch.maximum(q_count.max(), k_count.max()))
            if need > capacity:
                raise ValueError(f"capacity = {capacity} is smaller than the largest kept count {need}")
        return capacity
    if _is_capturing() or N == 0:
        return N
    need = int(torch.maximum(q_count.max(), k_count.max()))
    step = block * max(1, -(-N // (16 * block)))
    return min(N, max(step, -(-need // step) * step))


def drop_block_mask(
    q_keep: Tensor,
    k_keep: Tensor,
    *,
    block_size: int | tuple[int, int] = 128,
    capacity: int | None = None,
    impl: str = "auto",
) -> PermutedBlockMask:
    """BlockMask of query/key-drop causal attention, in compacted coordinates.

    Args:
        q_keep: bool ``[B, Hq, N]`` (True = query kept).
        k_keep: bool ``[B, Hkv, N]`` (True = key kept), ``Hq % Hkv == 0``.
        block_size: int or ``(q_block, kv_block)``.
        capacity: slots ``L`` of the compacted problem, at least the largest kept count of any
            (batch, head), queries and keys. Default: that count (one host synchronisation)
            rounded up to a multiple of ``N/16`` in whole blocks, so the dropped tail is neither
            moved nor scanned; ``N`` while compiling or capturing a CUDA graph. Pass a fixed value
            to avoid the synchronisation.
        impl: ``"triton"``, ``"torch"`` or ``"auto"``.

    Returns:
        A :class:`~flexsparse.patterns.permuted.PermutedBlockMask` over ``(L, L)`` (``q_bucket``/
        ``k_bucket`` None; ``q_pos`` is -1 and ``k_pos`` is N on slots without a kept token;
        dropped queries unpermute to zero rows).
    """
    _, _, _, N = _check_per_token("q_keep", q_keep, "k_keep", k_keep, "bool")
    qb, kb = _normalize_block_size(block_size)
    q_count, k_count = q_keep.sum(-1), k_keep.sum(-1)
    L = _capacity(N, max(qb, kb), q_count, k_count, capacity)
    q_perm, q_pos = compact_kept(q_keep, -1)
    k_perm, k_pos = compact_kept(k_keep, N)
    return build_permuted(
        q_perm, k_perm, q_pos, k_pos, None, None, (qb, kb), impl, q_count=q_count, k_count=k_count, length=L
    )
