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


def drop_block_mask(
    q_keep: Tensor, k_keep: Tensor, *, block_size: int | tuple[int, int] = 128, impl: str = "auto"
) -> PermutedBlockMask:
    """BlockMask of query/key-drop causal attention, in compacted coordinates.

    Args:
        q_keep: bool ``[B, Hq, N]`` (True = query kept).
        k_keep: bool ``[B, Hkv, N]`` (True = key kept), ``Hq % Hkv == 0``.
        block_size: int or ``(q_block, kv_block)``.
        impl: ``"triton"``, ``"torch"`` or ``"auto"``.

    Returns:
        A :class:`~flexsparse.patterns.permuted.PermutedBlockMask` (``q_bucket``/``k_bucket`` None;
        ``q_pos`` is -1 and ``k_pos`` is N on dropped slots).
    """
    _, _, _, N = _check_per_token("q_keep", q_keep, "k_keep", k_keep, "bool")
    q_perm, q_pos = compact_kept(q_keep, -1)
    k_perm, k_pos = compact_kept(k_keep, N)
    return build_permuted(q_perm, k_perm, q_pos, k_pos, None, None, block_size, impl)
