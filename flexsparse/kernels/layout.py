"""Triton kernel: the sorted slot layout of the permuted patterns (a stable counting sort).

Each row (one (batch, head)) holds ``N`` integer keys: ``0 <= key < nb`` places the token in
segment ``key`` (a hash bucket; the kept tokens for drop), anything else excludes it (a dropped
token). Segments are laid out in key order, each in time order (stable), each starting at a
multiple of ``BS`` when ``ALIGN`` (so no block of ``BS`` slots straddles two buckets), in ``L``
slots. Outputs per row:

* ``src [L]`` int32: the token each slot holds, ``N`` for a slot holding none (padding);
* ``dst [N]`` int32: the slot of each token, ``L`` for an excluded token;
* ``pos [L]`` int32: the token's position, ``invalid_pos`` on padding;
* ``bkt [L]`` int32 (optional): the segment's key, also on its padding slots (trailing slots
  take the last non-empty segment's key, 0 if the row is empty);
* ``flag [1]`` int32: 1 if the row held a key outside ``[0, nb)`` that was not ``-1`` (the
  caller decides whether to read it), or if the layout did not fit in ``L`` slots.

One program per row, two passes over the keys in chunks (histogram; ranks by a cumulative sum
of one-hot rows) and one over the slots (padding). ``O(N * nb)`` work per row: meant for small
``nb`` (the functional layer falls back to a sort for large or unknown bucket counts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N", "L", "nb", "BS", "invalid_pos"])
def _layout_kernel(
    key_ptr, src_ptr, dst_ptr, pos_ptr, bkt_ptr, flag_ptr,
    N, L, nb, BS, invalid_pos,
    NB: tl.constexpr, CH: tl.constexpr, ALIGN: tl.constexpr, HAS_BKT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ids = tl.arange(0, NB)
    key_row = key_ptr + row * N
    counts = tl.zeros([NB], dtype=tl.int32)
    nbad = 0
    for c0 in range(0, N, CH):
        offs = c0 + tl.arange(0, CH)
        m = offs < N
        key = tl.load(key_row + offs, mask=m, other=-1).to(tl.int32)
        hot = (key[:, None] == ids[None, :]) & (ids[None, :] < nb)
        counts += tl.sum(hot.to(tl.int32), axis=0)
        nbad += tl.sum((m & (key != -1) & ((key < 0) | (key >= nb))).to(tl.int32), axis=0)
    if ALIGN:
        seglen = (counts + BS - 1) // BS * BS
    else:
        seglen = counts
    start = tl.cumsum(seglen, axis=0) - seglen
    total = tl.sum(seglen, axis=0)
    nbad += (total > L).to(tl.int32)
    last = tl.max(tl.where(counts > 0, ids, 0), axis=0)
    tl.store(flag_ptr + row, (nbad > 0).to(tl.int32))

    src_row = src_ptr + row * L
    pos_row = pos_ptr + row * L
    bkt_row = bkt_ptr + row * L
    # pass 1: slots that hold no token (segment padding and the tail)
    for s0 in range(0, L, CH):
        slots = s0 + tl.arange(0, CH)
        m = slots < L
        inseg = (slots[:, None] >= start[None, :]) & (slots[:, None] < (start + seglen)[None, :])
        taken = tl.max((inseg & (slots[:, None] < (start + counts)[None, :])).to(tl.int32), axis=1) > 0
        empty = m & ~taken
        tl.store(src_row + slots, N + slots * 0, mask=empty)
        tl.store(pos_row + slots, invalid_pos + slots * 0, mask=empty)
        if HAS_BKT:
            seg = tl.sum(tl.where(inseg, ids[None, :], 0), axis=1)
            seg = tl.where(tl.max(inseg.to(tl.int32), axis=1) > 0, seg, last)
            tl.store(bkt_row + slots, seg, mask=empty)
    # pass 2: every token goes to start[key] + (tokens of its key before it)
    running = tl.zeros([NB], dtype=tl.int32)
    dst_row = dst_ptr + row * N
    for c0 in range(0, N, CH):
        offs = c0 + tl.arange(0, CH)
        m = offs < N
        key = tl.load(key_row + offs, mask=m, other=-1).to(tl.int32)
        hot = (key[:, None] == ids[None, :]) & (ids[None, :] < nb)
        hot_i = hot.to(tl.int32)
        incl = tl.cumsum(hot_i, axis=0)
        base = start + running
        slot = tl.sum(tl.where(hot, incl - 1 + base[None, :], 0), axis=1)
        valid = m & (tl.max(hot_i, axis=1) > 0) & (slot < L)
        tl.store(src_row + slot, offs, mask=valid)
        tl.store(pos_row + slot, offs, mask=valid)
        if HAS_BKT:
            tl.store(bkt_row + slot, key, mask=valid)
        tl.store(dst_row + offs, tl.where(valid, slot, L), mask=m)
        running += tl.sum(hot_i, axis=0)


def sorted_layout(
    keys: torch.Tensor, nb: int, L: int, *, align: int = 0, invalid_pos: int = -1, with_bucket: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(src [R, L], dst [R, N], pos [R, L], bkt [R, L] | None, flags [R])`` (all int32) for
    integer ``keys [R, N]``; ``align`` = block size to align segments to (0 = packed)."""
    R, N = keys.shape
    keys = keys.contiguous()
    dev = keys.device
    src = torch.empty(R, L, dtype=torch.int32, device=dev)
    dst = torch.empty(R, N, dtype=torch.int32, device=dev)
    pos = torch.empty(R, L, dtype=torch.int32, device=dev)
    bkt = torch.empty(R, L, dtype=torch.int32, device=dev) if with_bucket else None
    flags = torch.empty(R, dtype=torch.int32, device=dev)
    if R == 0 or N == 0:
        return src, dst, pos, bkt, flags.zero_()
    NB = max(2, triton.next_power_of_2(nb))
    CH = max(16, min(1024, 16384 // NB))
    _layout_kernel[(R,)](
        keys, src, dst, pos, src if bkt is None else bkt, flags,
        N, L, nb, max(1, align), invalid_pos,
        NB=NB, CH=CH, ALIGN=align > 0, HAS_BKT=with_bucket, num_warps=4 if NB <= 64 else 8,
    )
    return src, dst, pos, bkt, flags
