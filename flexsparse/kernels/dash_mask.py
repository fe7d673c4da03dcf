"""Triton kernel: DashAttention chunk selection -> FlexAttention block states and prior table.

Input: a pbar-like selection ``p [B, Hkv, N, N // C]`` (the GQA-averaged entmax router output,
or a hard top-k selection holding 1.0/0.0). Row ``i`` (in chunk ``c_i = i // C``) *selects*
chunk ``c`` iff ``c < c_i and p[i, c] > 0`` (a past chunk in the router's support) or
``c == c_i`` (the diagonal chunk, attended causally).

Outputs, from one read of ``p`` in one launch (one program per (query block, batch * KV head),
no host synchronisation):

* int8 block states ``[B, Hq, nQ, nC]`` for query blocks of ``q_block`` rows and KV blocks of
  exactly one chunk (``nQ = ceil(N / q_block)``, ``nC = ceil(N / C)``):

  - FULL (2): every row of the query block (rows ``< N``) selects ``c``, and ``c`` lies strictly
    before the chunk of the block's first row, so no causal cut falls inside the block;
  - EMPTY (0): no row of the block selects ``c``;
  - PARTIAL (1): otherwise (the exact ``mask_mod`` decides per element).

  The ``G = Hq / Hkv`` query heads of a KV head share its selection; the kernel writes the state
  row of each of them directly (FlexAttention wants block masks over query heads).
* optionally, int32 ``[B, Hkv, N]``: the number of selected *past* chunks of every row (for the
  sparsity statistics);
* optionally, the chunk-major float32 prior table ``[B, Hkv, nC, N]`` of
  :mod:`flexsparse.patterns.dash` (log-prior on selected entries, 0 on the diagonal, a finite
  filler elsewhere), stored as transposed tiles so the writes run along the rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Block states (flexsparse.patterns.blockmask.EMPTY/PARTIAL/FULL) appear as literals below:
# 0 empty, 1 partial, 2 full.


@triton.jit
def _prior_value(p, log_g, inv_sigma, sel_past, diag, FILLER: tl.constexpr, LIMIT: tl.constexpr, EST_DIAG: tl.constexpr):
    """Table value of a tile: the clamped log-prior where a past chunk is selected, 0 on the
    diagonal, FILLER elsewhere (the log's argument is 1 off the selection: no inf anywhere)."""
    lp = tl.log(tl.where(sel_past, p, 1.0))
    if EST_DIAG:
        lp = (lp - log_g[:, None]) * inv_sigma
    lp = tl.minimum(tl.maximum(lp, -LIMIT), LIMIT)
    return tl.where(sel_past, lp, tl.where(diag, 0.0, FILLER))


@triton.jit(do_not_specialize=["N", "NF", "NC", "NQ", "C", "QB", "G", "HKV", "inv_sigma"])
def _dash_mask_kernel(
    p_ptr,
    states_ptr,
    counts_ptr,
    table_ptr,
    logg_ptr,
    N,
    NF,
    NC,
    NQ,
    C,
    QB,
    G,
    HKV,
    inv_sigma,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WITH_COUNTS: tl.constexpr,
    WITH_TABLE: tl.constexpr,
    EST_DIAG: tl.constexpr,
    FILLER: tl.constexpr,
    LIMIT: tl.constexpr,
):
    inv_sigma = tl.cast(inv_sigma, tl.float32)  # Inductor passes Python floats as fp64
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
    t_base = table_ptr + bh * NC * N
    cnt = tl.zeros([BLOCK_R], dtype=tl.int32)
    lsum = tl.zeros([BLOCK_R], dtype=ACC)
    out_base = states_ptr + ((b * HKV + hk) * G * NQ + qblk) * NC  # first query head of the group
    for c0 in range(0, NC, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        # c < c_i implies c < NF (c_i <= (N - 1) // C <= N // C), so masked loads stay in bounds
        past = rvalid[:, None] & (cols[None, :] < ci[:, None])
        p = tl.load(p_rows[:, None] + cols[None, :], mask=past, other=0).to(ACC)
        sel_past = past & (p > 0)
        diag = rvalid[:, None] & (cols[None, :] == ci[:, None])
        sel = sel_past | diag
        any_sel = tl.max(sel.to(tl.int32), axis=0)
        all_sel = tl.min((sel | ~rvalid[:, None]).to(tl.int32), axis=0)
        full = (all_sel > 0) & (cols < c_first)
        state = tl.where(full, 2, tl.where(any_sel > 0, 1, 0)).to(tl.int8)
        cmask = cols < NC
        for g in range(G):
            tl.store(out_base + g * NQ * NC + cols, state, mask=cmask)
        cnt += tl.sum(sel_past.to(tl.int32), axis=1)
        if WITH_TABLE:
            if EST_DIAG:
                lsum += tl.sum(tl.log(tl.where(sel_past, p, 1.0)), axis=1)
            else:
                val = _prior_value(p, lsum, inv_sigma, sel_past, diag, FILLER, LIMIT, False)
                # chunk-major [NC, N]: store the transposed tile, contiguous along the rows
                t_ptr = t_base + cols[:, None] * N + rows[None, :]
                tl.store(t_ptr, tl.trans(val).to(tl.float32), mask=cmask[:, None] & rvalid[None, :])
    if WITH_COUNTS:
        tl.store(counts_ptr + bh * N + rows, cnt, mask=rvalid)
    if WITH_TABLE:
        if EST_DIAG:
            # log g = mean log pbar over the row's selected past chunks; second pass writes the table
            log_g = lsum / tl.maximum(cnt, 1).to(ACC)
            tl.store(logg_ptr + bh * N + rows, log_g.to(tl.float32), mask=rvalid)
            for c0 in range(0, NC, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                past = rvalid[:, None] & (cols[None, :] < ci[:, None])
                p = tl.load(p_rows[:, None] + cols[None, :], mask=past, other=0).to(ACC)
                sel_past = past & (p > 0)
                diag = rvalid[:, None] & (cols[None, :] == ci[:, None])
                val = _prior_value(p, log_g, inv_sigma, sel_past, diag, FILLER, LIMIT, True)
                t_ptr = t_base + cols[:, None] * N + rows[None, :]
                tl.store(t_ptr, tl.trans(val).to(tl.float32), mask=(cols < NC)[:, None] & rvalid[None, :])


def dash_mask_tables(
    p: torch.Tensor,
    *,
    chunk_size: int,
    q_block: int,
    groups: int,
    with_counts: bool = False,
    with_table: bool = True,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
    filler: float = -1.0e30,
    limit: float = 1.0e25,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Block states, per-row counts and the chunk-major prior table in one launch.

    Args:
        p: float ``[B, Hkv, N, N // C]`` (pbar or a 1.0/0.0 selection); read once (twice with
            ``estimate_diagonal``, whose table needs each row's mean log first). Not differentiated
            here (see ``flexsparse.patterns.dash`` for the autograd wrapper).
        chunk_size: ``C``, also the KV block size. q_block: query rows per block.
        groups: ``G = Hq / Hkv``.
        with_counts: also return the selected past chunks per row.
        with_table: also return the prior table: float32 ``[B, Hkv, ceil(N / C), N]`` with
            ``log p`` (or ``(log p - log g) / sigma``), clamped to ``+-limit``, on selected past
            chunks, 0 on the diagonal chunk and ``filler`` elsewhere; log-probabilities are
            computed in float32 (float64 for a float64 ``p``).
        estimate_diagonal, sigma: prior mode (see ``flexsparse.reference.dash_log_prior``).

    Returns:
        ``(states, counts, table)``: int8 ``[B, Hkv * G, ceil(N / q_block), ceil(N / C)]``,
        int32 ``[B, Hkv, N]`` or None, float32 table or None.
    """
    B, Hkv, N, NF = p.shape
    C = chunk_size
    NC = -(-N // C)
    NQ = -(-N // q_block)
    p = p.detach().contiguous()
    dev = p.device
    states = torch.empty(B, Hkv * groups, NQ, NC, dtype=torch.int8, device=dev)
    counts = torch.empty(B, Hkv, N, dtype=torch.int32, device=dev) if with_counts else None
    table = torch.empty(B, Hkv, NC, N, dtype=torch.float32, device=dev) if with_table else None
    if states.numel() == 0:
        if counts is not None:
            counts.zero_()
        return states, counts, table
    est = with_table and estimate_diagonal
    log_g = torch.empty(B, Hkv, N, dtype=torch.float32, device=dev) if est else None
    block_r = max(16, triton.next_power_of_2(q_block))
    block_c = max(16, min(triton.next_power_of_2(NC), max(1, 4096 // block_r)))
    # unused pointers get their own one-element stand-ins, never another output: under a compiled
    # triton_op each written argument is cloned apart and an aliased output came back unwritten
    # (wrong block states and NaN outputs in compiled DashAttention on the H100)
    def stand_in(t, dtype):
        return torch.empty(1, dtype=dtype, device=dev) if t is None else t

    _dash_mask_kernel[(NQ, B * Hkv)](
        p, states, stand_in(counts, torch.int32), stand_in(table, torch.float32), stand_in(log_g, torch.float32),
        N, NF, NC, NQ, C, q_block, groups, Hkv, 1.0 / sigma,
        ACC=tl.float64 if p.dtype == torch.float64 else tl.float32,
        BLOCK_R=block_r, BLOCK_C=block_c, WITH_COUNTS=with_counts, WITH_TABLE=with_table, EST_DIAG=est,
        FILLER=filler, LIMIT=limit, num_warps=4,
    )
    return states, counts, table


def dash_block_states(
    p: torch.Tensor,
    *,
    chunk_size: int,
    q_block: int,
    groups: int,
    with_counts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block states (and optional per-row counts) only, see :func:`dash_mask_tables`.

    Returns:
        ``(states, counts)``: int8 ``[B, Hkv * G, ceil(N / q_block), ceil(N / C)]`` and int32
        ``[B, Hkv, N]`` (``None`` unless ``with_counts``).
    """
    states, counts, _ = dash_mask_tables(
        p, chunk_size=chunk_size, q_block=q_block, groups=groups, with_counts=with_counts, with_table=False
    )
    return states, counts
