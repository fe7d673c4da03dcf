"""Shared machinery of the permuted patterns (hash-sparse and query/key drop).

Both patterns reorder queries and keys per head so that what attends to what becomes
block-sparse, then describe the reordered problem with a ``BlockMask`` in *sorted coordinates*:

* slot ``i`` of query head ``h`` holds the original query ``q_perm[b, h, i]``;
  slot ``j`` of KV head ``g`` holds the original key ``k_perm[b, g, j]``;
* ``q_pos`` / ``k_pos`` (int32) hold the original position of each slot, with *invalid* slots
  (dropped tokens) encoded as ``-1`` for queries and ``N`` for keys, so that the causal test
  ``q_pos >= k_pos`` is False for every pair that touches an invalid slot;
* hash buckets (optional) ``q_bucket`` / ``k_bucket`` in sorted order.

The exact element mask is ``q_pos[b,h,q] >= k_pos[b,h//G,kv]`` (and equal buckets for hash).
Block states come from per-block min/max of (position, bucket) over the in-range slots
(the padded tail of the last block is excluded), see :mod:`flexsparse.kernels.hash`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from flexsparse.patterns.blockmask import (
    EMPTY,
    FULL,
    PARTIAL,
    _choose_impl,
    _normalize_block_size,
    block_mask_from_states,
)

__all__ = ["PermutedBlockMask"]


@dataclass(frozen=True)
class PermutedBlockMask:
    """A ``BlockMask`` in sorted coordinates plus the permutations that define them.

    The sorted problem has ``L`` slots (``L = N`` for hash; for drop ``L`` is the capacity, at
    least the largest kept count, so the tail of dropped tokens is not moved or attended).

    Attributes:
        block_mask: FlexAttention ``BlockMask`` for ``(L, L)`` over ``Hq`` heads, with the exact
            element ``mask_mod`` (in sorted coordinates).
        q_perm: int64 ``[B, Hq, N]``: sorted slot -> original query position (a permutation).
        k_perm: int64 ``[B, Hkv, N]``: sorted slot -> original key position.
        q_inv, k_inv: int64 ``[B, Hq, N]`` / ``[B, Hkv, N]``: original position -> sorted slot.
        q_src, k_src: int64 ``[B, H, L]``: the original row each slot reads, ``N`` where the slot
            holds nothing (a zero row).
        q_dst, k_dst: int64 ``[B, H, N]``: the slot each original row goes to, ``L`` where the row
            is not used (dropped): unpermuted outputs are 0 there.
        q_pos: int32 ``[B, Hq, L]``: original position of each query slot, -1 where invalid.
        k_pos: int32 ``[B, Hkv, L]``: original position of each key slot, N where invalid.
        q_bucket, k_bucket: sorted buckets ``[B, H, L]`` (hash pattern) or None.
        states: int8 ``[B, Hq, nQ, nKV]`` block states (EMPTY/PARTIAL/FULL) the mask was built from.
    """

    block_mask: BlockMask
    q_perm: Tensor
    k_perm: Tensor
    q_inv: Tensor
    k_inv: Tensor
    q_src: Tensor
    k_src: Tensor
    q_dst: Tensor
    k_dst: Tensor
    q_pos: Tensor
    k_pos: Tensor
    q_bucket: Tensor | None
    k_bucket: Tensor | None
    states: Tensor

    @property
    def groups(self) -> int:
        return self.q_perm.shape[1] // self.k_perm.shape[1]

    @property
    def length(self) -> int:
        """Number of sorted slots ``L``."""
        return self.q_pos.shape[-1]

    def permute_q(self, q: Tensor) -> Tensor:
        """``[B, Hq, N, D]`` in original order -> ``[B, Hq, L, D]`` sorted (differentiable)."""
        return gather_rows(q, self.q_src, self.q_dst)

    def permute_kv(self, t: Tensor) -> Tensor:
        """``[B, Hkv, N, D]`` keys or values in original order -> ``[B, Hkv, L, D]`` sorted."""
        return gather_rows(t, self.k_src, self.k_dst)

    def unpermute_q(self, out: Tensor) -> Tensor:
        """``[B, Hq, L, D]`` output in sorted order -> ``[B, Hq, N, D]`` original order (zero rows
        for queries that have no slot)."""
        return gather_rows(out, self.q_dst, self.q_src)

    def original_mask_mod(self, mask_mod: Callable) -> Callable:
        """Wrap a user ``mask_mod(b, h, q_idx, kv_idx)`` written in *original* positions into
        sorted coordinates (invalid slots read position 0 / clamp; the pattern's own mask keeps
        them out)."""
        q_pos, k_pos, G = self.q_pos, self.k_pos, self.groups
        n = self.k_perm.shape[-1]

        def mod(b, h, q, kv):
            qp = q_pos[b, h, q].clamp(min=0)
            kp = k_pos[b, h // G, kv].clamp(max=n - 1)
            return mask_mod(b, h, qp, kp)

        return mod

    def compose(self, mask_mod: Callable) -> BlockMask:
        """A ``BlockMask`` with the pattern's block lists and the element mask
        ``pattern AND mask_mod``, ``mask_mod`` written in original positions (e.g. a document
        mask). EMPTY blocks stay empty; FULL blocks become PARTIAL (the user mask may cut into
        them), so the result is exact for any ``mask_mod``."""
        base = self.block_mask.mask_mod
        user = self.original_mask_mod(mask_mod)

        def mod(b, h, q, kv):
            return base(b, h, q, kv) & user(b, h, q, kv)

        bm = self.block_mask
        # demote FULL blocks to PARTIAL: the user mask may cut into them
        states = torch.where(self.states == FULL, PARTIAL, self.states).to(torch.int8)
        return block_mask_from_states(states, seq_lengths=bm.seq_lengths, block_size=bm.BLOCK_SIZE, mask_mod=mod)


# ----------------------------------------------------------------------------------------------
# row gathers with inverse-gather backward


def _use_triton_gather(x: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False  # Inductor fuses the PyTorch expression into one kernel
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gather_rows_impl(x: Tensor, idx: Tensor) -> Tensor:
    if _use_triton_gather(x):
        from flexsparse.kernels.permute import gather_rows as kernel

        return kernel(x, idx)
    M = x.shape[2]
    valid = (idx >= 0) & (idx < M)
    safe = torch.where(valid, idx, 0).long()
    out = torch.gather(x, 2, safe.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))
    return torch.where(valid.unsqueeze(-1), out, out.new_zeros(()))


class _GatherRows(torch.autograd.Function):
    """``out[b,h,i] = x[b,h,idx[b,h,i]]`` (0 for out-of-range ``idx``), with ``idx`` injective on
    its in-range entries and ``back[b,h,j]`` the row of ``out`` that row ``j`` of ``x`` went to
    (out of range where none): the gradient is a gather too."""

    @staticmethod
    def forward(x: Tensor, idx: Tensor, back: Tensor) -> Tensor:
        return _gather_rows_impl(x, idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (back,) = ctx.saved_tensors
        return _gather_rows_impl(grad, back), None, None


def gather_rows(x: Tensor, idx: Tensor, back: Tensor) -> Tensor:
    """Differentiable row gather ``[B, H, M, D] -> [B, H, L, D]`` (see :class:`_GatherRows`)."""
    return _GatherRows.apply(x, idx, back)


def _inverse(perm: Tensor) -> Tensor:
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, ar)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_min_max(x: Tensor, bs: int, n_blocks: int) -> tuple[Tensor, Tensor]:
    """Per-block min and max of int64 ``x [B, H, N]`` over in-range elements only."""
    pad = n_blocks * bs - x.shape[-1]
    lo, hi = x, x
    if pad:
        info = torch.iinfo(torch.int64)
        shape = (*x.shape[:-1], pad)
        lo = torch.cat([x, x.new_full(shape, info.max)], -1)
        hi = torch.cat([x, x.new_full(shape, info.min)], -1)
    view = (*x.shape[:-1], n_blocks, bs)
    return lo.view(view).amin(-1), hi.view(view).amax(-1)


def block_stats(pos: Tensor, bucket: Tensor | None, bs: int) -> Tensor:
    """int64 ``[B, H, nBlocks, 4]`` = (pos_min, pos_max, bucket_min, bucket_max) per block."""
    n_blocks = _cdiv(pos.shape[-1], bs)
    pmin, pmax = _block_min_max(pos.long(), bs, n_blocks)
    if bucket is None:
        bmin = bmax = torch.zeros_like(pmin)
    else:
        bmin, bmax = _block_min_max(bucket.long(), bs, n_blocks)
    return torch.stack([pmin, pmax, bmin, bmax], -1).contiguous()


def states_torch(q_stats: Tensor, k_stats: Tensor, groups: int) -> Tensor:
    """PyTorch twin of :func:`flexsparse.kernels.hash.sorted_block_states`."""
    ks = k_stats.repeat_interleave(groups, dim=1)
    q = q_stats[..., :, None, :]
    k = ks[..., None, :, :]
    empty = (q[..., 3] < k[..., 2]) | (k[..., 3] < q[..., 2]) | (q[..., 1] < k[..., 0])
    full = (q[..., 2] == q[..., 3]) & (k[..., 2] == k[..., 3]) & (q[..., 2] == k[..., 2]) & (q[..., 0] >= k[..., 1])
    return torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)


def make_mask_mod(q_pos: Tensor, k_pos: Tensor, groups: int, q_bucket: Tensor | None, k_bucket: Tensor | None):
    """Exact element mask in sorted coordinates."""
    G = groups
    if q_bucket is None:

        def mask_mod(b, h, q, kv):
            return q_pos[b, h, q] >= k_pos[b, h // G, kv]

    else:

        def mask_mod(b, h, q, kv):
            hk = h // G
            return (q_bucket[b, h, q] == k_bucket[b, hk, kv]) & (q_pos[b, h, q] >= k_pos[b, hk, kv])

    return mask_mod


def _src_dst(perm: Tensor, inv: Tensor, count: Tensor | None, L: int) -> tuple[Tensor, Tensor]:
    """Gather indices of the first ``L`` slots: ``src`` (slot -> original row, N = none) and
    ``dst`` (original row -> slot, L = none). Slots at or past ``count`` (per row) read nothing."""
    N = perm.shape[-1]
    if count is None:
        return perm[..., :L].contiguous(), inv
    count = count.unsqueeze(-1)
    slots = torch.arange(L, device=perm.device)
    src = torch.where(slots < count, perm[..., :L], N)
    dst = torch.where(inv < count, inv, L)
    return src, dst


def build_permuted(
    q_perm: Tensor,
    k_perm: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    q_bucket: Tensor | None,
    k_bucket: Tensor | None,
    block_size,
    impl: str,
    *,
    q_count: Tensor | None = None,
    k_count: Tensor | None = None,
    length: int | None = None,
) -> PermutedBlockMask:
    """Assemble a :class:`PermutedBlockMask` from full permutations ``[B, H, N]`` and the sorted
    positions/buckets (length N; cut to ``length`` slots). ``q_count``/``k_count`` (``[B, H]``)
    mark how many leading slots hold real tokens (drop pattern); None = all."""
    qb, kb = _normalize_block_size(block_size)
    B, Hq, N = q_perm.shape
    L = N if length is None else length
    G = Hq // k_perm.shape[1]
    impl = _choose_impl(impl, q_perm.device)
    q_pos, k_pos = q_pos[..., :L].contiguous(), k_pos[..., :L].contiguous()
    if q_bucket is not None:
        q_bucket, k_bucket = q_bucket[..., :L].contiguous(), k_bucket[..., :L].contiguous()
    if impl == "triton":
        from flexsparse.kernels import hash as kernels

        q_stats = kernels.block_stats(q_pos, q_bucket, qb)
        k_stats = kernels.block_stats(k_pos, k_bucket, kb)
        states = kernels.sorted_block_states(q_stats, k_stats, G)
    else:
        states = states_torch(block_stats(q_pos, q_bucket, qb), block_stats(k_pos, k_bucket, kb), G)
    mod = make_mask_mod(q_pos, k_pos, G, q_bucket, k_bucket)
    bm = block_mask_from_states(
        states, seq_lengths=(L, L), block_size=(qb, kb), mask_mod=mod, impl=impl, validate=False
    )
    q_inv, k_inv = _inverse(q_perm), _inverse(k_perm)
    q_src, q_dst = _src_dst(q_perm, q_inv, q_count, L)
    k_src, k_dst = _src_dst(k_perm, k_inv, k_count, L)
    return PermutedBlockMask(
        bm, q_perm, k_perm, q_inv, k_inv, q_src, k_src, q_dst, k_dst, q_pos, k_pos, q_bucket, k_bucket, states
    )
