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

    Attributes:
        block_mask: FlexAttention ``BlockMask`` for ``(N, N)`` over ``Hq`` heads, with the exact
            element ``mask_mod`` (in sorted coordinates).
        q_perm: int64 ``[B, Hq, N]``: sorted slot -> original query position.
        k_perm: int64 ``[B, Hkv, N]``: sorted slot -> original key position.
        q_inv: int64 ``[B, Hq, N]``: original query position -> sorted slot.
        q_pos: int32 ``[B, Hq, N]``: original position of each query slot, -1 where invalid.
        k_pos: int32 ``[B, Hkv, N]``: original position of each key slot, N where invalid.
        q_bucket, k_bucket: sorted buckets (hash pattern) or None.
        states: int8 ``[B, Hq, nQ, nKV]`` block states (EMPTY/PARTIAL/FULL) the mask was built from.
    """

    block_mask: BlockMask
    q_perm: Tensor
    k_perm: Tensor
    q_inv: Tensor
    q_pos: Tensor
    k_pos: Tensor
    q_bucket: Tensor | None
    k_bucket: Tensor | None
    states: Tensor

    @property
    def groups(self) -> int:
        return self.q_perm.shape[1] // self.k_perm.shape[1]

    def permute_q(self, q: Tensor) -> Tensor:
        """``[B, Hq, N, D]`` in original order -> sorted order (differentiable gather)."""
        return _gather_rows(q, self.q_perm)

    def permute_kv(self, t: Tensor) -> Tensor:
        """``[B, Hkv, N, D]`` keys or values in original order -> sorted order."""
        return _gather_rows(t, self.k_perm)

    def unpermute_q(self, out: Tensor) -> Tensor:
        """``[B, Hq, N, D]`` output in sorted order -> original order."""
        return _gather_rows(out, self.q_inv)

    def original_mask_mod(self, mask_mod: Callable) -> Callable:
        """Wrap a user ``mask_mod(b, h, q_idx, kv_idx)`` written in *original* positions into
        sorted coordinates (invalid slots read position 0 / clamp; the pattern's own mask keeps
        them out)."""
        q_pos, k_pos, G = self.q_pos, self.k_pos, self.groups
        n = k_pos.shape[-1]

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


def _gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(t, 2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))


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


def build_permuted(
    q_perm: Tensor,
    k_perm: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    q_bucket: Tensor | None,
    k_bucket: Tensor | None,
    block_size,
    impl: str,
) -> PermutedBlockMask:
    qb, kb = _normalize_block_size(block_size)
    B, Hq, N = q_perm.shape
    G = Hq // k_perm.shape[1]
    impl = _choose_impl(impl, q_perm.device)
    if impl == "triton":
        from flexsparse.kernels import hash as kernels

        q_stats = kernels.block_stats(q_pos, q_bucket, qb)
        k_stats = kernels.block_stats(k_pos, k_bucket, kb)
        states = kernels.sorted_block_states(q_stats, k_stats, G)
    else:
        states = states_torch(block_stats(q_pos, q_bucket, qb), block_stats(k_pos, k_bucket, kb), G)
    mod = make_mask_mod(q_pos, k_pos, G, q_bucket, k_bucket)
    bm = block_mask_from_states(
        states, seq_lengths=(N, N), block_size=(qb, kb), mask_mod=mod, impl=impl, validate=False
    )
    return PermutedBlockMask(bm, q_perm, k_perm, _inverse(q_perm), q_pos, k_pos, q_bucket, k_bucket, states)
