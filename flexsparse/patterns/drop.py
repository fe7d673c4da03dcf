"""Query/key-drop attention (SCFA): compact kept tokens to the front, build the BlockMask.

Mask in original positions: ``q_keep[i] AND k_keep[j] AND i >= j``. Per head, kept tokens are
moved stably to the front (time order kept, so positions are monotone) by the same Triton
counting-sort kernel as the hash pattern (one bucket; dropped tokens get no slot). The compacted
problem has ``L`` slots (the capacity, at least the largest kept count): slots past a head's
kept count are empty, carry position -1 (queries) or N (keys), and blocks made only of them are
EMPTY and cost nothing in FlexAttention. The exact mask in sorted coordinates is
``qpos_sorted[b,h,q] >= kpos_sorted[b,h//G,kv]``; FULL where every valid query of the block comes
at or after every key of the block and the key block has no empty slot.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexsparse.patterns.blockmask import _choose_impl, _is_capturing, _normalize_block_size
from flexsparse.patterns.permuted import PermutedBlockMask, build_permuted, side_layout
from flexsparse.reference import _check_per_token

__all__ = ["capacity_for_rate", "drop_block_mask", "drop_capacity"]


def _round_capacity(N: int, block: int, need: int) -> int:
    step = block * max(1, -(-N // (16 * block)))
    return min(N, max(step, -(-need // step) * step))


def capacity_for_rate(N: int, drop_rate: float, block_size: int | tuple[int, int] = 128) -> int:
    """A capacity for keep masks drawn independently per token with probability
    ``1 - drop_rate``: the mean kept count plus 8 standard deviations (exceeded with probability
    below 1e-15), rounded like :func:`drop_capacity`. No host synchronisation."""
    p = 1.0 - float(drop_rate)
    need = int(N * p + 8.0 * (N * p * (1.0 - p)) ** 0.5) + 1
    return _round_capacity(N, max(_normalize_block_size(block_size)), min(N, need))


def drop_capacity(
    q_keep: Tensor,
    k_keep: Tensor,
    block_size: int | tuple[int, int] = 128,
    capacity: int | None = None,
    validate: bool | None = None,
) -> int:
    """Slots of the compacted problem: ``capacity`` if given (checked against the largest kept
    count unless compiling/capturing), else the largest kept count of any (batch, head), queries
    and keys (one host synchronisation), rounded up to a multiple of ``~N/16`` in whole blocks
    so a few shapes cover all keep rates; ``N`` while compiling or capturing."""
    N = q_keep.shape[-1]
    block = max(_normalize_block_size(block_size))
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= max(N, 1):
            raise ValueError(f"capacity must be an int in [1, N = {N}], got {capacity!r}")
        if validate is None:
            validate = not _is_capturing()
        if validate and N:
            need = int(torch.maximum(q_keep.sum(-1).max(), k_keep.sum(-1).max()))
            if need > capacity:
                raise ValueError(f"capacity = {capacity} is smaller than the largest kept count {need}")
        return capacity
    if _is_capturing() or N == 0:
        return N
    need = int(torch.maximum(q_keep.sum(-1).max(), k_keep.sum(-1).max()))
    return _round_capacity(N, block, need)


def drop_block_mask(
    q_keep: Tensor,
    k_keep: Tensor,
    *,
    block_size: int | tuple[int, int] = 128,
    capacity: int | None = None,
    impl: str = "auto",
    validate: bool | None = None,
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
            to avoid the synchronisation (see :func:`drop_capacity`).
        impl: ``"triton"``, ``"torch"`` or ``"auto"``.
        validate: check a given ``capacity`` against the kept counts on the host (one
            synchronisation; default True except while compiling or capturing). Without it the
            check runs on the device (``torch._assert_async``): a too-small capacity stops the
            program instead of losing tokens.

    Returns:
        A :class:`~flexsparse.patterns.permuted.PermutedBlockMask` over ``(L, L)`` (``q_bucket``/
        ``k_bucket`` None; ``q_pos`` is -1 and ``k_pos`` is N on empty slots; dropped queries
        unpermute to zero rows).
    """
    _, _, _, N = _check_per_token("q_keep", q_keep, "k_keep", k_keep, "bool")
    _normalize_block_size(block_size)
    L = drop_capacity(q_keep, k_keep, block_size, capacity, validate)
    impl = _choose_impl(impl, q_keep.device)

    def layout(keep, invalid_pos):  # one segment (kept tokens); dropped ones (key -1) get no slot
        keys = torch.where(keep, 0, -1).to(torch.int8)
        return side_layout(keys, 1, L, align=0, invalid_pos=invalid_pos, with_bucket=False, kernel=impl == "triton")

    q_layout, q_flags = layout(q_keep, -1)
    k_layout, k_flags = layout(k_keep, N)
    if L < N and N:  # every kept token must have found a slot
        torch._assert_async(
            torch.maximum(q_flags.max(), k_flags.max()) == 0, "drop_block_mask: capacity below a kept count"
        )
    return build_permuted(q_layout, k_layout, block_size, impl)
