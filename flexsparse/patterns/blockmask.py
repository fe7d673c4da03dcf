"""Block lists -> FlexAttention ``BlockMask``, with the exact transposed ``q_*`` lists.

Every pattern in flexsparse ends here: its mask kernel emits either per-row KV block lists
(:func:`build_block_mask`) or a dense int8 block-state map (:func:`block_mask_from_states`), and
this module turns them into a complete ``BlockMask`` (partial and full KV lists, padded to the
full KV-block count, and their exact transposes for the backward pass) on the device, without a
host synchronisation and without ``BlockMask.from_kv_blocks``.

Block states: ``EMPTY = 0`` (skipped), ``PARTIAL = 1`` (``mask_mod`` decides per element),
``FULL = 2`` (every element attends; ``mask_mod`` is not evaluated by the compiled kernel).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
from torch.nn.attention.flex_attention import BlockMask, noop_mask

EMPTY, PARTIAL, FULL = 0, 1, 2

Impl = Literal["auto", "triton", "torch"]

__all__ = [
    "EMPTY",
    "PARTIAL",
    "FULL",
    "build_block_mask",
    "block_mask_from_states",
    "block_states",
    "states_mask_mod",
]


# ----------------------------------------------------------------------------------------------
# input checks


def _normalize_block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    try:
        if len(block_size) != 2 or any(isinstance(x, bool) or int(x) != x for x in block_size):
            raise ValueError
        qb, kb = (int(x) for x in block_size)
    except (TypeError, ValueError):
        raise ValueError(f"block_size must be an int or a (q_block, kv_block) pair, got {block_size!r}") from None
    if qb < 1 or kb < 1:
        raise ValueError(f"block_size entries must be positive, got {(qb, kb)}")
    return qb, kb


def _normalize_seq_lengths(seq_lengths) -> tuple[int, int]:
    try:
        q_len, kv_len = (int(x) for x in seq_lengths)
    except (TypeError, ValueError):
        raise ValueError(f"seq_lengths must be a (q_len, kv_len) pair of ints, got {seq_lengths!r}") from None
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"seq_lengths must be positive, got {(q_len, kv_len)}")
    return q_len, kv_len


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_capturing() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _choose_impl(impl: str, device: torch.device) -> str:
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    triton_ok = device.type == "cuda" or (device.type == "cpu" and interpret)
    if impl == "triton" and not triton_ok:
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"importing flexsparse); got tensors on {device}"
        )
    if impl == "auto":
        return "triton" if triton_ok else "torch"
    return impl


def _check_lists(name: str, num: torch.Tensor, idx: torch.Tensor, nQ: int) -> None:
    if not isinstance(num, torch.Tensor) or not isinstance(idx, torch.Tensor):
        raise ValueError(f"{name}: num_blocks and indices must be tensors")
    if num.dtype not in (torch.int32, torch.int64) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: num_blocks and indices must be int32 or int64, got {num.dtype} and {idx.dtype}")
    if idx.dim() != 4:
        raise ValueError(f"{name}_indices must have shape [B, H, nQ, W], got {tuple(idx.shape)}")
    B, H, rows, _ = idx.shape
    if rows != nQ:
        raise ValueError(
            f"{name}_indices must have shape [B, H, nQ, W] with nQ = ceil(q_len / q_block) = {nQ}, "
            f"got {tuple(idx.shape)}"
        )
    if tuple(num.shape) != (B, H, nQ):
        raise ValueError(f"{name}_num_blocks must have shape [B, H, nQ] = {[B, H, nQ]}, got {tuple(num.shape)}")
    if num.device != idx.device:
        raise ValueError(f"{name}: num_blocks on {num.device} but indices on {idx.device}")


def _raise_if_flagged(flags: torch.Tensor, what: str) -> None:
    if bool(flags.any()):
        raise ValueError(what)


# ----------------------------------------------------------------------------------------------
# pure-PyTorch implementation (CPU without the Triton interpreter; also a second oracle in tests)


def _scatter_torch(num, idx, full_num, full_idx, n_kv: int) -> tuple[torch.Tensor, bool]:
    B, H, nQ, _ = idx.shape
    states = torch.zeros(B, H, nQ, n_kv + 1, dtype=torch.int8, device=idx.device)
    bad = False
    for n, ix, value in ((full_num, full_idx, FULL), (num, idx, PARTIAL)):
        if ix is None:
            continue
        W = ix.shape[-1]
        bad |= bool(((n < 0) | (n > W)).any())
        listed = torch.arange(W, device=ix.device) < n.clamp(0, W).unsqueeze(-1)
        ok = (ix >= 0) & (ix < n_kv)
        bad |= bool((listed & ~ok).any())
        target = torch.where(listed & ok, ix.long(), n_kv)  # unlisted -> spare column
        states.scatter_(-1, target, value)
    return states[..., :n_kv].contiguous(), bad


def _ordered(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sel = sel.to(torch.int32)
    num = sel.sum(-1).to(torch.int32)
    idx = torch.argsort(sel, dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def _compact_torch(states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    st = states.transpose(-1, -2)
    return (
        *_ordered(states == PARTIAL),
        *_ordered(states == FULL),
        *_ordered(st == PARTIAL),
        *_ordered(st == FULL),
    )


# ----------------------------------------------------------------------------------------------
# public API


def _make_block_mask(lists, seq_lengths, block_size, mask_mod) -> BlockMask:
    kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx = lists
    # mask_mod is positional without a default in torch 2.11: always pass it
    return BlockMask(
        seq_lengths, kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx,
        block_size, noop_mask if mask_mod is None else mask_mod,
    )


def _states_to_lists(states: torch.Tensor, impl: str, validate: bool) -> tuple[torch.Tensor, ...]:
    if impl == "torch":
        if validate and bool(((states < 0) | (states > FULL)).any()):
            raise ValueError("states must hold only EMPTY=0, PARTIAL=1 or FULL=2")
        return _compact_torch(states)
    from flexsparse import ops

    lists, flags = ops.compact_block_states(states)
    if validate:
        _raise_if_flagged(flags, "states must hold only EMPTY=0, PARTIAL=1 or FULL=2")
    return lists


def block_mask_from_states(
    states: torch.Tensor,
    *,
    seq_lengths: tuple[int, int],
    block_size: int | tuple[int, int] = 128,
    mask_mod: Callable | None = None,
    impl: Impl = "auto",
    validate: bool | None = None,
) -> BlockMask:
    """Build a complete ``BlockMask`` from a dense block-state map.

    Args:
        states: int8 ``[B, H, nQ, nKV]`` with ``nQ = ceil(q_len / q_block)``,
            ``nKV = ceil(kv_len / kv_block)``; entries ``EMPTY=0``, ``PARTIAL=1``, ``FULL=2``.
            ``B`` and ``H`` may be 1 (broadcast by FlexAttention); H counts query heads.
        seq_lengths: ``(q_len, kv_len)`` the mask will be used with.
        block_size: sparse block size, an int or ``(q_block, kv_block)``.
        mask_mod: the exact element-level mask (applied inside PARTIAL blocks by compiled
            FlexAttention, and everywhere by eager FlexAttention). It must be True on every
            element of FULL blocks. ``None`` means all-True (noop).
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (PyTorch ops,
            any device) or ``"auto"`` (Triton where it can run, else PyTorch).
        validate: check the state values (one host synchronisation). Default: True except while
            compiling or capturing a CUDA graph.

    Returns:
        A ``BlockMask`` with int32 contiguous ``kv_*``/``full_kv_*`` lists ``[B,H,nQ,nKV]`` and
        their exact transposes ``q_*``/``full_q_*`` ``[B,H,nKV,nQ]``; all four pairs always
        present (empty lists rather than ``None``, so the compiled kernel signature is stable).
    """
    qb, kb = _normalize_block_size(block_size)
    q_len, kv_len = _normalize_seq_lengths(seq_lengths)
    nQ, nKV = _cdiv(q_len, qb), _cdiv(kv_len, kb)
    if not isinstance(states, torch.Tensor) or states.dim() != 4 or tuple(states.shape[2:]) != (nQ, nKV):
        got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        raise ValueError(f"states must have shape [B, H, nQ, nKV] = [B, H, {nQ}, {nKV}], got {got}")
    if states.dtype != torch.int8:
        raise ValueError(f"states must be int8, got {states.dtype}")
    if validate is None:
        validate = not _is_capturing()
    impl = _choose_impl(impl, states.device)
    lists = _states_to_lists(states.contiguous(), impl, validate)
    return _make_block_mask(lists, (q_len, kv_len), (qb, kb), mask_mod)


def build_block_mask(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None = None,
    full_kv_indices: torch.Tensor | None = None,
    *,
    seq_lengths: tuple[int, int],
    block_size: int | tuple[int, int] = 128,
    mask_mod: Callable | None = None,
    impl: Impl = "auto",
    validate: bool | None = None,
) -> BlockMask:
    """Build a complete ``BlockMask`` (with transposed ``q_*`` lists) from KV block lists.

    A fast replacement for ``BlockMask.from_kv_blocks``: two Triton launches, no dense
    ``[nQ, nKV]`` work on the host, no sort.

    Args:
        kv_num_blocks: int32/int64 ``[B, H, nQ]``, how many entries of each row of
            ``kv_indices`` are partial blocks.
        kv_indices: int32/int64 ``[B, H, nQ, W]`` (any width ``W``; any order; entries past
            ``kv_num_blocks`` are ignored).
        full_kv_num_blocks, full_kv_indices: the same for full blocks (optional; both or neither).
            A block listed both as partial and full is treated as partial.
        seq_lengths, block_size, mask_mod, impl, validate: as in :func:`block_mask_from_states`;
            ``validate`` checks that every listed id is in ``[0, nKV)`` and counts in ``[0, W]``.

    Returns:
        A ``BlockMask`` whose lists are canonical (ascending, deduplicated, padded to ``nKV``):
        identical to ``BlockMask.from_kv_blocks`` on sorted input.
    """
    qb, kb = _normalize_block_size(block_size)
    q_len, kv_len = _normalize_seq_lengths(seq_lengths)
    nQ, nKV = _cdiv(q_len, qb), _cdiv(kv_len, kb)
    _check_lists("kv", kv_num_blocks, kv_indices, nQ)
    if (full_kv_num_blocks is None) != (full_kv_indices is None):
        raise ValueError("full_kv_num_blocks and full_kv_indices must be given together")
    if full_kv_indices is not None:
        _check_lists("full_kv", full_kv_num_blocks, full_kv_indices, nQ)
        if full_kv_indices.shape[:2] != kv_indices.shape[:2]:
            raise ValueError(
                f"full_kv_indices must have the same [B, H] as kv_indices = {list(kv_indices.shape[:2])}, "
                f"got {list(full_kv_indices.shape[:2])}"
            )
        if full_kv_indices.device != kv_indices.device:
            raise ValueError(f"full lists on {full_kv_indices.device} but partial lists on {kv_indices.device}")
    if validate is None:
        validate = not _is_capturing()
    impl = _choose_impl(impl, kv_indices.device)

    def prep(t):
        return None if t is None else t.to(torch.int32).contiguous()

    num, idx, fnum, fidx = (prep(t) for t in (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices))
    bad_msg = f"block lists hold an index outside [0, nKV={nKV}) or a count outside [0, W]"
    if impl == "torch":
        states, bad = _scatter_torch(num, idx, fnum, fidx, nKV)
        if validate and bad:
            raise ValueError(bad_msg)
        lists = _compact_torch(states)
    else:
        from flexsparse import ops

        states, flags = ops.scatter_block_lists(num, idx, fnum, fidx, nKV)
        lists, _ = ops.compact_block_states(states)  # states written by the scatter are all valid
        if validate:
            _raise_if_flagged(flags, bad_msg)
    return _make_block_mask(lists, (q_len, kv_len), (qb, kb), mask_mod)


def block_states(block_mask: BlockMask, impl: Impl = "auto") -> torch.Tensor:
    """Dense int8 block-state map ``[B, H, nQ, nKV]`` (0 empty, 1 partial, 2 full) of a BlockMask.

    Reads only the KV lists. Useful for pictures, statistics and tests; O(B·H·nQ·nKV) memory.
    """
    q_len, kv_len = block_mask.seq_lengths
    qb, kb = block_mask.BLOCK_SIZE
    nKV = _cdiv(kv_len, kb)
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    fnum, fidx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    impl = _choose_impl(impl, idx.device)

    def prep(t):
        return None if t is None else t.to(torch.int32).contiguous()

    num, idx, fnum, fidx = (prep(t) for t in (num, idx, fnum, fidx))
    if impl == "torch":
        return _scatter_torch(num, idx, fnum, fidx, nKV)[0]
    from flexsparse import ops

    return ops.scatter_block_lists(num, idx, fnum, fidx, nKV)[0]


def states_mask_mod(
    states: torch.Tensor,
    block_size: int | tuple[int, int],
    element_mod: Callable | None = None,
) -> Callable:
    """Exact element-level ``mask_mod`` for a block-state map.

    ``mask_mod(b, h, q, kv) = FULL or (PARTIAL and element_mod(b, h, q, kv))`` where the state is
    ``states[b, h, q // q_block, kv // kv_block]`` (``b``/``h`` taken as 0 where the map has size 1).

    Args:
        states: int8 ``[B, H, nQ, nKV]``.
        block_size: int or ``(q_block, kv_block)``.
        element_mod: ``(b, h, q_idx, kv_idx) -> bool`` applied inside partial blocks; None = True.
    """
    qb, kb = _normalize_block_size(block_size)
    one_b, one_h = states.shape[0] == 1, states.shape[1] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        s = states[b * 0 if one_b else b, h * 0 if one_h else h, q_idx // qb, kv_idx // kb]
        inner = s == PARTIAL
        if element_mod is not None:
            inner = inner & element_mod(b, h, q_idx, kv_idx)
        return (s == FULL) | inner

    return mask_mod
