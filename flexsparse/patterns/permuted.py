"""Shared machinery of the permuted patterns (hash-sparse and query/key drop).

Both patterns reorder queries and keys per head so that what attends to what becomes
block-sparse, then describe the reordered problem (``L`` slots) with a ``BlockMask`` in *sorted
coordinates*. The *layout* of one side (queries per query head, keys per KV head) is:

* ``src [B, H, L]``: the original token each slot holds, ``N`` for an empty slot (padding);
* ``dst [B, H, N]``: the slot of each original token, ``L`` for a token without one (dropped);
* ``pos [B, H, L]`` int32: the original position of each slot, *invalid* on empty slots:
  ``-1`` for queries and ``N`` for keys, so the causal test ``q_pos >= k_pos`` is False for
  every pair that touches an empty slot;
* ``bucket [B, H, L]`` (hash only): the bucket of each slot (padding takes its segment's bucket).

Moving tensors between orders is a row gather by ``src`` (zero rows on empty slots) whose
gradient is a gather by ``dst``, and back (:func:`gather_rows`).

The exact element mask is ``q_pos[b,h,q] >= k_pos[b,h//G,kv]`` (and equal buckets for hash).
Block states come from per-block min/max of (position, bucket) over the in-range slots, see
:mod:`flexsparse.kernels.hash`: a block is FULL when one bucket fills both blocks and every
valid query position is at or after every key position. Empty query slots may sit inside FULL
blocks (their outputs are never read and their output gradients are zero); empty key slots
never do (an empty key slot has the invalid position ``N``, which rules FULL out).
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
    _cdiv,
    _choose_impl,
    _normalize_block_size,
    block_mask_from_states,
)

__all__ = ["PermutedBlockMask"]


@dataclass(frozen=True)
class PermutedBlockMask:
    """A ``BlockMask`` in sorted coordinates plus the layouts that define them.

    Attributes:
        block_mask: FlexAttention ``BlockMask`` for ``(L, L)`` over ``Hq`` heads, with the exact
            element ``mask_mod`` (in sorted coordinates).
        q_src, k_src: int32 ``[B, Hq, L]`` / ``[B, Hkv, L]``: the original token of each slot,
            ``N`` on empty slots.
        q_dst, k_dst: int32 ``[B, Hq, N]`` / ``[B, Hkv, N]``: the slot of each original token,
            ``L`` where the token has none (dropped): unpermuted outputs are 0 there.
        q_pos: int32 ``[B, Hq, L]``: original position of each query slot, -1 where empty.
        k_pos: int32 ``[B, Hkv, L]``: original position of each key slot, N where empty.
        q_bucket, k_bucket: bucket of each slot ``[B, H, L]`` (hash pattern) or None.
        states: int8 ``[B, Hq, nQ, nKV]`` block states (EMPTY/PARTIAL/FULL) the mask was built from.
    """

    block_mask: BlockMask
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
    def seq_len(self) -> int:
        """Number of original tokens ``N``."""
        return self.q_dst.shape[-1]

    @property
    def groups(self) -> int:
        return self.q_src.shape[1] // self.k_src.shape[1]

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
        n = self.seq_len

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
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gather_rows_torch(x: Tensor, idx: Tensor) -> Tensor:
    M = x.shape[2]
    idx = idx.long()
    valid = (idx >= 0) & (idx < M)
    safe = torch.where(valid, idx, 0)
    out = torch.gather(x, 2, safe.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))
    return torch.where(valid.unsqueeze(-1), out, out.new_zeros(()))


def gather_rows(x: Tensor, idx: Tensor, back: Tensor) -> Tensor:
    """Differentiable row gather ``[B, H, M, D] -> [B, H, L, D]``: ``out[b,h,i] = x[b,h,idx[b,h,i]]``
    (0 for out-of-range ``idx``), with ``idx`` injective on its in-range entries and ``back[b,h,j]``
    the row of ``out`` that row ``j`` of ``x`` went to (out of range where none).

    On CUDA (or under the Triton interpreter) the registered Triton op
    :func:`flexsparse.ops.gather_rows`, whose gradient is the gather by ``back``, also inside
    ``torch.compile``; elsewhere PyTorch ops (autograd differentiates them)."""
    if _use_triton_gather(x):
        from flexsparse import ops

        return ops.gather_rows(x, idx, back)
    return _gather_rows_torch(x, idx)


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


def block_stats(pos: Tensor, bucket: Tensor | None, bs: int, skip_negative: bool = False) -> Tensor:
    """int64 ``[B, H, nBlocks, 4]`` = (pos_min, pos_max, bucket_min, bucket_max) per block;
    ``skip_negative`` leaves negative positions (empty query slots) out of ``pos_min``."""
    n_blocks = _cdiv(pos.shape[-1], bs)
    pos = pos.long()
    pmin = _block_min_max(torch.where(pos < 0, torch.iinfo(torch.int64).max, pos) if skip_negative else pos, bs, n_blocks)[0]
    pmax = _block_min_max(pos, bs, n_blocks)[1]
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


def sorted_layout_torch(
    keys: Tensor, nb: int | None, L: int, *, align: int = 0, invalid_pos: int = -1, with_bucket: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """PyTorch twin of :func:`flexsparse.kernels.layout.sorted_layout` for ``keys [R, N]``.

    ``nb=None`` accepts any integer keys (every token valid, segments = distinct values, no
    alignment; the bucket output keeps int64 keys as int64). Returns ``(src, dst, pos, bucket,
    flags)`` as the kernel does.
    """
    R, N = keys.shape
    dev = keys.device
    k64 = keys.long()
    if nb is None:
        valid = torch.ones_like(k64, dtype=torch.bool)
        bad = torch.zeros(R, dtype=torch.bool, device=dev)
    else:
        valid = (k64 >= 0) & (k64 < nb)
        bad = (~valid & (k64 != -1)).any(-1)
    # stable sort by key, then stably move excluded tokens to the back
    _, p1 = torch.sort(k64, dim=-1, stable=True)
    _, p2 = torch.sort((~valid.gather(-1, p1)).to(torch.uint8), dim=-1, stable=True)
    perm = p1.gather(-1, p2)
    sk, sv = k64.gather(-1, perm), valid.gather(-1, perm)
    j = torch.arange(N, device=dev).expand(R, N)
    if align and N:
        new = torch.ones(R, N, dtype=torch.bool, device=dev)
        new[:, 1:] = (sk[:, 1:] != sk[:, :-1]) | (sv[:, 1:] != sv[:, :-1])
        seg = torch.cumsum(new, -1) - 1
        lens = torch.zeros(R, N, dtype=torch.long, device=dev).scatter_add_(1, seg, sv.long())
        pad = (-lens) % align
        before = torch.cumsum(pad, -1) - pad
        slot = j + before.gather(1, seg)
    else:
        slot = j
    ok = sv & (slot < L)
    bad = bad | (sv & (slot >= L)).any(-1)
    tgt = torch.where(ok, slot, L)
    src = torch.full((R, L + 1), N, dtype=torch.int32, device=dev).scatter_(1, tgt, perm.int())[:, :L]
    pos = torch.full((R, L + 1), invalid_pos, dtype=torch.int32, device=dev).scatter_(1, tgt, perm.int())[:, :L]
    dst = torch.full((R, N), L, dtype=torch.int32, device=dev).scatter_(1, perm, tgt.int())
    bkt = None
    if with_bucket:
        out_dtype = torch.int64 if (nb is None and keys.dtype == torch.int64) else torch.int32
        at = torch.zeros(R, L + 1, dtype=torch.long, device=dev).scatter_(1, tgt, sk)[:, :L]
        filled = torch.zeros(R, L + 1, dtype=torch.bool, device=dev).scatter_(1, tgt, ok)[:, :L]
        ar = torch.arange(L, device=dev).expand(R, L)
        last = torch.where(filled, ar, -1).cummax(-1).values if L else ar
        bkt = torch.where(last >= 0, at.gather(1, last.clamp(min=0)), 0).to(out_dtype)
    return src.contiguous(), dst, pos.contiguous(), bkt, bad.int()


def side_layout(
    keys: Tensor, nb: int | None, L: int, *, align: int, invalid_pos: int, with_bucket: bool, kernel: bool
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor | None], Tensor]:
    """Layout of one side from integer ``keys [B, H, N]`` (see :func:`sorted_layout_torch`):
    ``((src, dst, pos, bucket), flags [B*H])``, by the Triton kernel when ``kernel`` else by
    the PyTorch twin."""
    B, H, N = keys.shape
    flat = keys.reshape(B * H, N)
    if kernel:
        from flexsparse.ops import sorted_layout as fn
    else:
        fn = sorted_layout_torch
    src, dst, pos, bkt, flags = fn(flat, nb, L, align=align, invalid_pos=invalid_pos, with_bucket=with_bucket)
    bkt = None if bkt is None else bkt.view(B, H, L)
    return (src.view(B, H, L), dst.view(B, H, N), pos.view(B, H, L), bkt), flags


def build_permuted(q_layout, k_layout, block_size, impl: str) -> PermutedBlockMask:
    """Assemble a :class:`PermutedBlockMask` from the query and key layouts
    ``(src [B,H,L], dst [B,H,N], pos [B,H,L], bucket [B,H,L] | None)``."""
    qb, kb = _normalize_block_size(block_size)
    q_src, q_dst, q_pos, q_bucket = q_layout
    k_src, k_dst, k_pos, k_bucket = k_layout
    Hq, L = q_src.shape[1], q_src.shape[2]
    G = Hq // k_src.shape[1]
    impl = _choose_impl(impl, q_src.device)
    if impl == "triton":
        from flexsparse import ops

        q_stats = ops.block_stats(q_pos, q_bucket, qb, skip_negative=True)
        k_stats = ops.block_stats(k_pos, k_bucket, kb)
        states = ops.sorted_block_states(q_stats, k_stats, G)
    else:
        states = states_torch(block_stats(q_pos, q_bucket, qb, True), block_stats(k_pos, k_bucket, kb), G)
    mod = make_mask_mod(q_pos, k_pos, G, q_bucket, k_bucket)
    bm = block_mask_from_states(
        states, seq_lengths=(L, L), block_size=(qb, kb), mask_mod=mod, impl=impl, validate=False
    )
    return PermutedBlockMask(bm, q_src, k_src, q_dst, k_dst, q_pos, k_pos, q_bucket, k_bucket, states)
