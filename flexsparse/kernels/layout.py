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

Three launches:

1. per (chunk of ``CH`` tokens, row): how many tokens of each key the chunk holds;
2. per row: segment starts and lengths, each chunk's first slot per key (start + tokens of the
   same key in earlier chunks), the flag;
3. per (chunk, row): place the chunk's tokens (slot = that first slot + rank inside the chunk)
   and fill empty slots: the tail after the last segment by chunks of slots, and (aligned
   layouts) the padding of segment ``c`` (fewer than ``BS`` slots) in program ``c``.

Ranks and counts inside a chunk use *packed counters*: a token of key ``b`` adds ``1 << (FB *
(b % FPW))`` to word ``b // FPW`` of 64-bit words holding ``FPW`` fields of ``FB`` bits, so one
1-D cumulative sum per word ranks ``FPW`` keys at once (8 keys per word for chunks of up to 255
tokens). Work per token is ``O(nb / FPW)``; meant for small ``nb`` (the pattern falls back to a
sort for large or unknown bucket counts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _packed_word(key, valid, w, FB: tl.constexpr, FPW: tl.constexpr):
    """For word ``w``: which tokens it counts, their field shift, and their packed increments."""
    in_w = valid & (key >= w * FPW) & (key < (w + 1) * FPW)
    sh = ((key - w * FPW) * FB).to(tl.int64)
    one = tl.where(in_w, tl.full(key.shape, 1, tl.int64) << tl.where(in_w, sh, 0), 0)
    return in_w, sh, one


@triton.jit(do_not_specialize=["N", "C", "nb"])
def _count_kernel(
    key_ptr, cnt_ptr, bad_ptr, N, C, nb,
    NB: tl.constexpr, CH: tl.constexpr, FB: tl.constexpr, FPW: tl.constexpr, NW: tl.constexpr,
):
    """Per (chunk, row): tokens of each key in the chunk, and ids that are neither valid nor -1."""
    c = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    ids = tl.arange(0, NB)
    offs = c * CH + tl.arange(0, CH)
    m = offs < N
    key = tl.load(key_ptr + row * N + offs, mask=m, other=-1).to(tl.int32)
    valid = m & (key >= 0) & (key < nb)
    cnt = tl.zeros([NB], dtype=tl.int32)
    for w in tl.static_range(NW):
        _, _, one = _packed_word(key, valid, w, FB, FPW)
        tot = tl.sum(one, axis=0)
        field = ((tot >> ((ids % FPW) * FB).to(tl.int64)) & ((1 << FB) - 1)).to(tl.int32)
        cnt = tl.where(ids // FPW == w, field, cnt)
    tl.store(cnt_ptr + (row * C + c) * NB + ids, cnt)
    tl.store(bad_ptr + row * C + c, tl.sum((m & (key != -1) & ~valid).to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["L", "C", "BS"])
def _scan_kernel(
    cnt_ptr, bad_ptr, base_ptr, seg_ptr, flag_ptr, L, C, BS,
    NB: tl.constexpr, CB: tl.constexpr, ALIGN: tl.constexpr,
):
    """Per row: segment (start, count), each chunk's first slot per key, the flag."""
    row = tl.program_id(0).to(tl.int64)
    ids = tl.arange(0, NB)
    counts = tl.zeros([NB], dtype=tl.int32)
    nbad = tl.sum(tl.zeros([CB], dtype=tl.int32), axis=0)
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        cm = cc < C
        blk = tl.load(cnt_ptr + (row * C + cc[:, None]) * NB + ids[None, :], mask=cm[:, None], other=0)
        counts += tl.sum(blk, axis=0)
        nbad += tl.sum(tl.load(bad_ptr + row * C + cc, mask=cm, other=0), axis=0)
    if ALIGN:
        seglen = (counts + BS - 1) // BS * BS
    else:
        seglen = counts
    start = tl.cumsum(seglen, axis=0) - seglen
    used = tl.sum(seglen, axis=0)
    seg = seg_ptr + row * (2 * NB + 2)
    tl.store(seg + ids, start)
    tl.store(seg + NB + ids, counts)
    tl.store(seg + 2 * NB, used)
    tl.store(seg + 2 * NB + 1, tl.max(tl.where(counts > 0, ids, 0), axis=0))
    nbad += (used > L).to(tl.int32)
    tl.store(flag_ptr + row, (nbad > 0).to(tl.int32))
    run = start
    for c0 in range(0, C, CB):
        cc = c0 + tl.arange(0, CB)
        cm = cc < C
        blk = tl.load(cnt_ptr + (row * C + cc[:, None]) * NB + ids[None, :], mask=cm[:, None], other=0)
        incl = tl.cumsum(blk, axis=0)
        tl.store(base_ptr + (row * C + cc[:, None]) * NB + ids[None, :], run[None, :] + incl - blk, mask=cm[:, None])
        run += tl.sum(blk, axis=0)


@triton.jit(do_not_specialize=["N", "L", "C", "nb", "BS", "invalid_pos"])
def _write_kernel(
    key_ptr, base_ptr, seg_ptr, src_ptr, dst_ptr, pos_ptr, bkt_ptr,
    N, L, C, nb, BS, invalid_pos,
    NB: tl.constexpr, CH: tl.constexpr, FB: tl.constexpr, FPW: tl.constexpr, NW: tl.constexpr,
    ALIGN: tl.constexpr, HAS_BKT: tl.constexpr, PADB: tl.constexpr,
):
    """Per (chunk, row): place the chunk's tokens and fill empty slots (see the module docstring)."""
    c = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    # tokens of this chunk: slot = the chunk's first slot for the key + rank of the token
    offs = c * CH + tl.arange(0, CH)
    m = offs < N
    key = tl.load(key_ptr + row * N + offs, mask=m, other=-1).to(tl.int32)
    valid = m & (key >= 0) & (key < nb)
    rank = tl.zeros([CH], dtype=tl.int32)
    for w in tl.static_range(NW):
        in_w, sh, one = _packed_word(key, valid, w, FB, FPW)
        incl = tl.cumsum(one, axis=0)
        rank = tl.where(in_w, ((incl >> sh) & ((1 << FB) - 1)).to(tl.int32), rank)
    first = tl.load(base_ptr + (row * C + tl.minimum(c, C - 1)) * NB + tl.where(valid, key, 0), mask=valid, other=0)
    slot = first + rank - 1
    valid = valid & (slot < L)
    tl.store(src_ptr + row * L + slot, offs.to(tl.int32), mask=valid)
    tl.store(pos_ptr + row * L + slot, offs.to(tl.int32), mask=valid)
    if HAS_BKT:
        tl.store(bkt_ptr + row * L + slot, key, mask=valid)
    tl.store(dst_ptr + row * N + offs, tl.where(valid, slot, L).to(tl.int32), mask=m)
    # empty slots: the tail [used, L) by slot chunks, the padding of segment c (< BS slots) here
    seg = seg_ptr + row * (2 * NB + 2)
    used = tl.load(seg + 2 * NB)
    last = tl.load(seg + 2 * NB + 1)
    slots = c * CH + tl.arange(0, CH)
    tail = (slots >= used) & (slots < L)
    tl.store(src_ptr + row * L + slots, (N + slots * 0).to(tl.int32), mask=tail)
    tl.store(pos_ptr + row * L + slots, (invalid_pos + slots * 0).to(tl.int32), mask=tail)
    if HAS_BKT:
        tl.store(bkt_ptr + row * L + slots, (last + slots * 0).to(tl.int32), mask=tail)
    if ALIGN:
        if c < NB:
            cnt_c = tl.load(seg + NB + c)
            pad0 = tl.load(seg + c) + cnt_c
            npad = (cnt_c + BS - 1) // BS * BS - cnt_c
            ps = pad0 + tl.arange(0, PADB)
            pm = (tl.arange(0, PADB) < npad) & (ps < L)
            tl.store(src_ptr + row * L + ps, (N + ps * 0).to(tl.int32), mask=pm)
            tl.store(pos_ptr + row * L + ps, (invalid_pos + ps * 0).to(tl.int32), mask=pm)
            if HAS_BKT:
                tl.store(bkt_ptr + row * L + ps, (c + ps * 0).to(tl.int32), mask=pm)


# Chunk length per padded key count (a power of two); benchmarks may override it.
_CHUNK: dict[int, int] = {}


def _tiles(nb: int) -> tuple[int, int, int, int, int]:
    """``(NB, CH, FB, FPW, NW)``: padded key count, chunk length, field bits, fields per 64-bit
    word, words. Fields must hold a whole chunk's count: 8 bits up to 255 tokens, else 16."""
    NB = max(2, triton.next_power_of_2(nb))
    # measured on the H100 (benchmarks/bench_layout.py, 192 rows of 16k): 512 tokens for 1-4 keys,
    # 256 up to 16 keys, 128 beyond
    CH = _CHUNK.get(NB, 512 if NB <= 4 else 256 if NB <= 16 else 128)
    FB = 8 if CH < 256 else 16
    FPW = 64 // FB
    return NB, CH, FB, FPW, triton.cdiv(NB, FPW)


def sorted_layout(
    keys: torch.Tensor, nb: int, L: int, *, align: int = 0, invalid_pos: int = -1, with_bucket: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(src [R, L], dst [R, N], pos [R, L], bkt [R, L] | None, flags [R])`` (all int32) for
    integer ``keys [R, N]``; ``align`` = block size to align segments to (0 = packed).

    Three launches: counts per (chunk, row), a scan per row, placement per (chunk, row)."""
    R, N = keys.shape
    keys = keys.contiguous()
    dev = keys.device
    src = torch.empty(R, L, dtype=torch.int32, device=dev)
    dst = torch.empty(R, N, dtype=torch.int32, device=dev)
    pos = torch.empty(R, L, dtype=torch.int32, device=dev)
    bkt = torch.empty(R, L, dtype=torch.int32, device=dev) if with_bucket else None
    flags = torch.empty(R, dtype=torch.int32, device=dev)
    if R == 0 or N == 0:
        flags.zero_()
        if L:
            src.fill_(N)
            pos.fill_(invalid_pos)
            if bkt is not None:
                bkt.zero_()
        return src, dst, pos, bkt, flags
    NB, CH, FB, FPW, NW = _tiles(nb)
    C = triton.cdiv(N, CH)
    # counts and first slots [R, C, NB], segments [R, 2, NB + 1], bad [R, C]: separate tensors,
    # not views of one scratch buffer (Inductor's functionalisation of a triton_op that writes
    # into views of one allocation replayed them onto the wrong base: illegal memory accesses)
    cnt = torch.empty(R * C * NB, dtype=torch.int32, device=dev)
    base = torch.empty(R * C * NB, dtype=torch.int32, device=dev)
    seg = torch.empty(R * (2 * NB + 2), dtype=torch.int32, device=dev)
    bad = torch.empty(R * C, dtype=torch.int32, device=dev)
    warps = 4
    # an unused pointer gets its own one-element stand-in, never another output: under a compiled
    # triton_op each written argument is cloned apart, and an aliased output came back unwritten
    _count_kernel[(C, R)](keys, cnt, bad, N, C, nb, NB=NB, CH=CH, FB=FB, FPW=FPW, NW=NW, num_warps=warps)
    CB = max(1, min(128, 4096 // NB))
    _scan_kernel[(R,)](cnt, bad, base, seg, flags, L, C, max(1, align), NB=NB, CB=CB, ALIGN=align > 0, num_warps=4)
    grid = (max(C, triton.cdiv(L, CH), NB if align else 1), R)
    _write_kernel[grid](
        keys, base, seg, src, dst, pos, torch.empty(1, dtype=torch.int32, device=dev) if bkt is None else bkt,
        N, L, C, nb, max(1, align), invalid_pos,
        NB=NB, CH=CH, FB=FB, FPW=FPW, NW=NW, ALIGN=align > 0, HAS_BKT=with_bucket,
        PADB=max(16, triton.next_power_of_2(max(1, align))), num_warps=warps,
    )
    return src, dst, pos, bkt, flags
