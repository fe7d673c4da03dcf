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

Programs per (chunk of ``CH`` tokens, row): one launch counts each key per chunk, a cumulative
sum over chunks gives every chunk its starting rank per key, a second launch places the tokens
(rank inside the chunk = cumulative sum of one-hot rows) and fills the empty slots of its range.
``O(N * nb)`` work per row: meant for small ``nb`` (the pattern falls back to a sort for large
or unknown bucket counts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N", "C", "nb"])
def _count_kernel(key_ptr, cnt_ptr, bad_ptr, N, C, nb, NB: tl.constexpr, CH: tl.constexpr):
    """Per (chunk, row): tokens of each key in the chunk, and ids that are neither valid nor -1."""
    c = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    ids = tl.arange(0, NB)
    offs = c * CH + tl.arange(0, CH)
    m = offs < N
    key = tl.load(key_ptr + row * N + offs, mask=m, other=-1).to(tl.int32)
    hot = (key[:, None] == ids[None, :]) & (ids[None, :] < nb)
    tl.store(cnt_ptr + (row * C + c) * NB + ids, tl.sum(hot.to(tl.int32), axis=0))
    tl.store(bad_ptr + row * C + c, tl.sum((m & (key != -1) & ((key < 0) | (key >= nb))).to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["N", "L", "C", "nb", "BS", "invalid_pos"])
def _write_kernel(
    key_ptr, pre_ptr, tot_ptr, bad_ptr, src_ptr, dst_ptr, pos_ptr, bkt_ptr, flag_ptr,
    N, L, C, nb, BS, invalid_pos,
    NB: tl.constexpr, CH: tl.constexpr, ALIGN: tl.constexpr, HAS_BKT: tl.constexpr, CB: tl.constexpr,
):
    """Per (chunk, row): place the chunk's tokens (slot = segment start + tokens of the same key
    in earlier chunks + rank inside the chunk) and fill the chunk's range of empty slots."""
    c = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    ids = tl.arange(0, NB)
    counts = tl.load(tot_ptr + row * NB + ids)
    if ALIGN:
        seglen = (counts + BS - 1) // BS * BS
    else:
        seglen = counts
    start = tl.cumsum(seglen, axis=0) - seglen
    if c == 0:
        nbad = (tl.sum(seglen, axis=0) > L).to(tl.int32)
        for c0 in range(0, C, CB):
            cc = c0 + tl.arange(0, CB)
            nbad += tl.sum(tl.load(bad_ptr + row * C + cc, mask=cc < C, other=0), axis=0)
        tl.store(flag_ptr + row, (nbad > 0).to(tl.int32))
    # tokens of this chunk
    offs = c * CH + tl.arange(0, CH)
    m = offs < N
    key = tl.load(key_ptr + row * N + offs, mask=m, other=-1).to(tl.int32)
    hot = (key[:, None] == ids[None, :]) & (ids[None, :] < nb)
    incl = tl.cumsum(hot.to(tl.int32), axis=0)
    base = start + tl.load(pre_ptr + (row * C + tl.minimum(c, C - 1)) * NB + ids)
    slot = tl.sum(tl.where(hot, incl - 1 + base[None, :], 0), axis=1)
    valid = m & (tl.max(hot.to(tl.int32), axis=1) > 0) & (slot < L)
    tl.store(src_ptr + row * L + slot, offs.to(tl.int32), mask=valid)
    tl.store(pos_ptr + row * L + slot, offs.to(tl.int32), mask=valid)
    if HAS_BKT:
        tl.store(bkt_ptr + row * L + slot, key, mask=valid)
    tl.store(dst_ptr + row * N + offs, tl.where(valid, slot, L).to(tl.int32), mask=m)
    # empty slots in this chunk's range of slots
    slots = c * CH + tl.arange(0, CH)
    sm = slots < L
    inseg = (slots[:, None] >= start[None, :]) & (slots[:, None] < (start + seglen)[None, :])
    taken = tl.max((inseg & (slots[:, None] < (start + counts)[None, :])).to(tl.int32), axis=1) > 0
    empty = sm & ~taken
    tl.store(src_ptr + row * L + slots, (N + slots * 0).to(tl.int32), mask=empty)
    tl.store(pos_ptr + row * L + slots, (invalid_pos + slots * 0).to(tl.int32), mask=empty)
    if HAS_BKT:
        last = tl.max(tl.where(counts > 0, ids, 0), axis=0)
        seg = tl.sum(tl.where(inseg, ids[None, :], 0), axis=1)
        seg = tl.where(tl.max(inseg.to(tl.int32), axis=1) > 0, seg, last)
        tl.store(bkt_ptr + row * L + slots, seg.to(tl.int32), mask=empty)


def sorted_layout(
    keys: torch.Tensor, nb: int, L: int, *, align: int = 0, invalid_pos: int = -1, with_bucket: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(src [R, L], dst [R, N], pos [R, L], bkt [R, L] | None, flags [R])`` (all int32) for
    integer ``keys [R, N]``; ``align`` = block size to align segments to (0 = packed).

    Two launches over ``(chunk, row)`` programs (counts, then placement) with a cumulative sum
    over chunks between them."""
    R, N = keys.shape
    keys = keys.contiguous()
    dev = keys.device
    src = torch.empty(R, L, dtype=torch.int32, device=dev)
    dst = torch.empty(R, N, dtype=torch.int32, device=dev)
    pos = torch.empty(R, L, dtype=torch.int32, device=dev)
    bkt = torch.empty(R, L, dtype=torch.int32, device=dev) if with_bucket else None
    flags = torch.zeros(R, dtype=torch.int32, device=dev)
    if R == 0 or N == 0:
        if L:
            src.fill_(N)
            pos.fill_(invalid_pos)
            if bkt is not None:
                bkt.zero_()
        return src, dst, pos, bkt, flags
    NB = max(2, triton.next_power_of_2(nb))
    CH = max(16, min(1024, 2048 // NB))  # small tiles: no register spills, many programs
    C = triton.cdiv(N, CH)
    cnt = torch.empty(R, C, NB, dtype=torch.int32, device=dev)
    bad = torch.empty(R, C, dtype=torch.int32, device=dev)
    warps = 4
    _count_kernel[(C, R)](keys, cnt, bad, N, C, nb, NB=NB, CH=CH, num_warps=warps)
    tot = cnt.sum(1, dtype=torch.int32)
    pre = cnt.cumsum(1, dtype=torch.int32) - cnt
    grid = (max(C, triton.cdiv(L, CH)), R)
    _write_kernel[grid](
        keys, pre, tot, bad, src, dst, pos, src if bkt is None else bkt, flags,
        N, L, C, nb, max(1, align), invalid_pos,
        NB=NB, CH=CH, ALIGN=align > 0, HAS_BKT=with_bucket, CB=1024, num_warps=warps,
    )
    return src, dst, pos, bkt, flags
