"""Triton kernel: DashAttention chunk selection -> FlexAttention block states.

Input: a pbar-like selection ``p [B, Hkv, N, N // C]`` (the GQA-averaged entmax router output,
or a hard top-k selection holding 1.0/0.0). Row ``i`` (in chunk ``c_i = i // C``) *selects*
chunk ``c`` iff ``c < c_i and p[i, c] > 0`` (a past chunk in the router's support) or
``c == c_i`` (the diagonal chunk, attended causally).

Output: int8 block states ``[B, Hq, nQ, nC]`` for query blocks of ``q_block`` rows and KV blocks
of exactly one chunk (``nQ = ceil(N / q_block)``, ``nC = ceil(N / C)``):

* FULL (2): every row of the query block (rows ``< N``) selects ``c``, and ``c`` lies strictly
  before the chunk of the block's first row, so no causal cut falls inside the block;
* EMPTY (0): no row of the block selects ``c``;
* PARTIAL (1): otherwise (the exact ``mask_mod`` decides per element).

The ``G = Hq / Hkv`` query heads of a KV head share its selection; the kernel writes the state row
of each of them directly (FlexAttention wants block masks over query heads). Optionally it also
writes the number of selected *past* chunks of every row, int32 ``[B, Hkv, N]`` (for the sparsity
statistics), from the same single read of ``p``.

One launch, one program per (query block, batch * KV head), no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Block states (flexsparse.patterns.blockmask.EMPTY/PARTIAL/FULL) appear as literals below:
# 0 empty, 1 partial, 2 full.


@triton.jit(do_not_specialize=["N", "NF", "NC", "NQ", "C", "QB", "G", "HKV"])
def _dash_states_kernel(
    p_ptr,
    states_ptr,
    counts_ptr,
    N,
    NF,
    NC,
    NQ,
    C,
    QB,
    G,
    HKV,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WITH_COUNTS: tl.constexpr,
):
    qblk = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)  # b * HKV + kv head
    b = bh // HKV
    hk = bh % HKV
    lane = tl.arange(0, BLOCK_R)
    r0 = qblk * QB
    rows = r0 + lane
    rvalid = (lane < QB) & (rows < N)
    ci = rows // C  # chunk of each row
    c_first = r0 // C  # chunk of the block's first row
    p_rows = p_ptr + (bh * N + rows) * NF  # int64 offsets
    cnt = tl.zeros([BLOCK_R], dtype=tl.int32)
    out_base = states_ptr + ((b * HKV + hk) * G * NQ + qblk) * NC  # first query head of the group
    for c0 in range(0, NC, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        # c < c_i implies c < NF (c_i <= (N - 1) // C <= N // C), so masked loads stay in bounds
        past = rvalid[:, None] & (cols[None, :] < ci[:, None])
        p = tl.load(p_rows[:, None] + cols[None, :], mask=past, other=0)
        sel_past = past & (p > 0)
        sel = sel_past | (rvalid[:, None] & (cols[None, :] == ci[:, None]))
        any_sel = tl.max(sel.to(tl.int32), axis=0)
        all_sel = tl.min((sel | ~rvalid[:, None]).to(tl.int32), axis=0)
        full = (all_sel > 0) & (cols < c_first)
        state = tl.where(full, 2, tl.where(any_sel > 0, 1, 0)).to(tl.int8)
        cmask = cols < NC
        for g in range(G):
            tl.store(out_base + g * NQ * NC + cols, state, mask=cmask)
        if WITH_COUNTS:
            cnt += tl.sum(sel_past.to(tl.int32), axis=1)
    if WITH_COUNTS:
        tl.store(counts_ptr + bh * N + rows, cnt, mask=rvalid)


def dash_block_states(
    p: torch.Tensor,
    *,
    chunk_size: int,
    q_block: int,
    groups: int,
    with_counts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block states of a DashAttention selection (see the module docstring).

    Args:
        p: float ``[B, Hkv, N, N // C]`` (pbar or a 1.0/0.0 selection); only ``p > 0`` on past
            chunks matters. Read once; made contiguous if needed.
        chunk_size: ``C``, also the KV block size. q_block: query rows per block.
        groups: ``G = Hq / Hkv``.
        with_counts: also return the selected past chunks per row.

    Returns:
        ``(states, counts)``: int8 ``[B, Hkv * G, ceil(N / q_block), ceil(N / C)]`` and int32
        ``[B, Hkv, N]`` (``None`` unless ``with_counts``).
    """
    B, Hkv, N, NF = p.shape
    C = chunk_size
    NC = -(-N // C)
    NQ = -(-N // q_block)
    p = p.detach().contiguous()
    states = torch.empty(B, Hkv * groups, NQ, NC, dtype=torch.int8, device=p.device)
    counts = torch.empty(B, Hkv, N, dtype=torch.int32, device=p.device) if with_counts else None
    if states.numel() == 0:
        if counts is not None:
            counts.zero_()
        return states, counts
    block_r = max(16, triton.next_power_of_2(q_block))
    block_c = max(16, min(triton.next_power_of_2(NC), max(1, 4096 // block_r)))
    _dash_states_kernel[(NQ, B * Hkv)](
        p, states, states if counts is None else counts,
        N, NF, NC, NQ, C, q_block, groups, Hkv,
        BLOCK_R=block_r, BLOCK_C=block_c, WITH_COUNTS=with_counts, num_warps=4,
    )
    return states, counts
