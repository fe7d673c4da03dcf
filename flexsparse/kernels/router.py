"""Triton kernels of the DashAttention stage-1 router (1.5-entmax over past chunks).

Notation: ``q [B, Hq, N, D]``, chunk summaries ``kbar [B, Hkv, nF, D]`` (``nF = N // C``
complete chunks), ``G = Hq / Hkv``, query head ``h`` reads KV head ``h // G``. Row ``i`` of a
query head routes over the chunks ``c < c_i = i // C`` (``c_i <= nF`` always, so rows of a
trailing partial chunk route over all ``nF`` chunks). With ``xs = zscale / 2``::

    x[h, i, c] = xs * q[h, i] . kbar[h // G, c]          (x = z / 2, z = zscale * q . kbar)
    p[h, i, c] = (x - tau[h, i])_+^2,   sum_{c < c_i} p = 1
    pbar[g, i, c] = mean over the G heads of group g of p

No kernel ever writes a score: every pass recomputes ``x`` tile by tile with ``tl.dot``.

Kernels:

* ``_tau_kernel``, one program per (batch * query head, block of rows): pass 0 takes the row
  maximum ``m`` and mean of ``x``; ``tau`` lies in ``[max(m - 1, mean - 1/sqrt(n)), m - 1/sqrt(n)]``
  (``n = c_i``). Each later pass evaluates, at the current ``tau``, the support statistics
  ``A1 = sum a``, ``A2 = sum a^2``, ``cnt`` (``a = (x - tau)_+``) and the smallest support /
  largest non-support offsets. From them: the closed-form root of the quadratic that ``f`` is
  on the current support (exact when that support is the final one, which the offsets
  certify), Newton and Halley steps, and a bracket kept with bisection whenever a step leaves
  it. ``f = sum (x - tau)_+^2 - 1`` is convex and decreasing, so a Newton step from the left
  and the closed-form step from the right are lower bounds, the closed-form step from the left
  an upper bound, which shrinks the bracket on both sides per pass. Rows stop when the root is
  certified or the bracket is below ~3 float32 ulps; the block stops when all its rows have.
  Rows without a past chunk get ``tau = +inf`` (every ``p`` is 0).
* ``_pbar_kernel``, one program per (batch * KV head, block of rows): the ``G`` heads of the
  group are stacked along the tile's M dimension (``m = g * BLOCK_R + r``), so one ``tl.dot``
  scores all of them and the group mean is a reshape and a sum. Writes every entry of the
  ``[B, Hkv, N, nF]`` float32 output (zeros where ``c >= c_i``).
* ``_dq_kernel``, per (batch * query head, block of rows): with ``s = (x - tau)_+`` and
  ``g = dpbar / G``, pass 1 accumulates ``r = sum s g / sum s`` (stored, float32 ``[B, Hq, N]``),
  pass 2 ``dq = zscale * sum_c s (g - r) kbar_c``.
* ``_dkbar_kernel``, per (batch * KV head, block of chunks, row split): loops over the rows that
  can see those chunks with the group stacked as in ``_pbar_kernel``, recomputes ``s`` and
  ``dz = s (g - r)`` and accumulates ``dkbar = zscale * sum dz q``. Row splits write separate
  float32 partial sums that are added afterwards (no atomics).

Accumulation is float32 throughout; ``tl.dot`` takes bf16/fp16 operands as they are (``dz`` is
cast to the input dtype for the backward products, as FlashAttention does with ``dS``) and
float32 operands in IEEE precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["router_tau", "router_pbar", "router_backward", "MAX_ITER"]

# Upper bound on solver passes after the max pass; bisection alone needs ~22 to close a bracket
# of width 1 to float32 resolution. Typical rows stop after 1-5 passes.
MAX_ITER = 40



# ----------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _chunk_scores(q, kb_ptr, cols, cmask, dcols, dmask, skc, xs, DOT_PREC: tl.constexpr):
    """``x = xs * q @ kbar[cols]^T`` for a ``[M, BLOCK_D]`` query tile, float32 ``[M, BLOCK_N]``."""
    kb = tl.load(kb_ptr + cols[:, None] * skc + dcols[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
    return tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * xs, kb


# ----------------------------------------------------------------------------------------------
# forward: tau


@triton.jit
def _tau_bracket(m, sx, ci):
    """Starting bracket of the 1.5-entmax threshold from the row maximum ``m`` and sum ``sx`` of
    ``x = z/2`` over the row's ``ci`` chunks (scalars or vectors): ``f(m - 1/sqrt(n)) <= 0`` and
    ``f(max(m - 1, mean - 1/sqrt(n))) >= 0``. Returns ``(has, lo, hi, tol, done)``."""
    has = ci > 0
    n = tl.maximum(ci, 1).to(tl.float32)
    rs = 1.0 / tl.sqrt(n)
    m = tl.where(has, m, 0.0)
    hi = m - rs
    lo = tl.minimum(tl.maximum(m - 1.0, sx / n - rs), hi)
    tol = 4e-7 * (tl.abs(m) + 1.0)
    done = (hi - lo <= tol) | (ci == 0)
    return has, lo, hi, tol, done


@triton.jit
def _tau_step(tau, lo, hi, tol, a1, a2, cnt, min_in, max_out):
    """One step of the threshold solver from the support statistics at ``tau`` (``a1 = sum a``,
    ``a2 = sum a^2``, ``cnt`` = support size over ``a = x - tau > 0``; ``min_in`` the smallest
    ``a`` inside, ``max_out`` the largest outside): the closed-form root on the current support
    (final when that support is consistent), else a Halley step, bisecting whenever a step leaves
    the bracket, which Newton and closed-form bounds tighten (f is convex and decreasing).
    Returns ``(tau, lo, hi, finished)``."""
    f = a2 - 1.0
    disc = a1 * a1 - cnt * f
    has_root = disc >= 0
    den = a1 + tl.sqrt(tl.maximum(disc, 0.0))
    d = tl.where(den > 0, f / tl.where(den > 0, den, 1.0), lo - tau)
    piece = tau + d  # root of the quadratic f is on the current support
    exact = has_root & (d >= max_out) & (d < min_in)  # ... and that support is the final one
    left = f > 0
    newton = tau + f / tl.where(a1 > 0, 2.0 * a1, 1.0)
    lo_n = tl.where(left, tl.maximum(lo, newton), tl.where(has_root, tl.maximum(lo, piece), lo))
    hi_n = tl.where(left, tl.where(has_root, tl.minimum(hi, piece), hi), tl.minimum(hi, tau))
    hden = 4.0 * a1 * a1 - f * cnt
    halley = tau + 2.0 * f * a1 / tl.where(hden != 0, hden, 1.0)
    halley = tl.where(hden != 0, halley, lo_n - 1.0)  # (out of the bracket: bisect)
    cand = tl.where(has_root, piece, halley)
    inside = (cand >= lo_n) & (cand <= hi_n)
    cand = tl.where(inside, cand, 0.5 * (lo_n + hi_n))
    cand = tl.where(exact, piece, cand)
    return cand, lo_n, hi_n, exact | (hi_n - lo_n <= tol)


@triton.jit(do_not_specialize=["Hq", "G", "N", "NF", "C", "D", "xs"])
def _tau_kernel(
    q_ptr, kb_ptr, tau_ptr,
    Hq, G, N, NF, C, D, xs,
    sqb, sqh, sqn, skb, skh, skc,
    MAX_ITER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    xs = tl.cast(xs, tl.float32)  # Inductor passes Python floats as fp64
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < N
    ci = tl.where(rmask, rows // C, 0)  # number of past chunks of each row
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqn + dcols[None, :],
        mask=rmask[:, None] & dmask[None, :], other=0.0,
    )
    kb_base = kb_ptr + b * skb + hk * skh
    n_vis = (tl.minimum(row0 + BLOCK_M, N) - 1) // C  # chunks any row of the block can see

    # pass 0: row maximum and mean over the past chunks
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sx = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, n_vis, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        x, kb = _chunk_scores(q, kb_base, cols, cols < n_vis, dcols, dmask, skc, xs, DOT_PREC)
        valid = cols[None, :] < ci[:, None]
        m = tl.maximum(m, tl.max(tl.where(valid, x, float("-inf")), 1))
        sx += tl.sum(tl.where(valid, x, 0.0), 1)

    has, lo, hi, tol, done = _tau_bracket(m, sx, ci)
    tau = lo

    it = 0
    todo = tl.sum((done == 0).to(tl.int32), 0)
    while (todo > 0) & (it < MAX_ITER):
        a1 = tl.zeros([BLOCK_M], tl.float32)
        a2 = tl.zeros([BLOCK_M], tl.float32)
        cnt = tl.zeros([BLOCK_M], tl.float32)
        min_in = tl.full([BLOCK_M], float("inf"), tl.float32)
        max_out = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for c0 in range(0, n_vis, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            x, kb = _chunk_scores(q, kb_base, cols, cols < n_vis, dcols, dmask, skc, xs, DOT_PREC)
            valid = cols[None, :] < ci[:, None]
            a = x - tau[:, None]
            pos = valid & (a > 0)
            ap = tl.where(pos, a, 0.0)
            a1 += tl.sum(ap, 1)
            a2 += tl.sum(ap * ap, 1)
            cnt += tl.sum(pos.to(tl.float32), 1)
            min_in = tl.minimum(min_in, tl.min(tl.where(pos, a, float("inf")), 1))
            max_out = tl.maximum(max_out, tl.max(tl.where(valid & (a <= 0), a, float("-inf")), 1))
        cand, lo_n, hi_n, finished = _tau_step(tau, lo, hi, tol, a1, a2, cnt, min_in, max_out)
        tau = tl.where(done, tau, cand)
        lo = tl.where(done, lo, lo_n)
        hi = tl.where(done, hi, hi_n)
        done = done | finished
        todo = tl.sum((done == 0).to(tl.int32), 0)
        it += 1

    tau = tl.where(has, tau, float("inf"))
    tl.store(tau_ptr + bh * N + rows, tau, mask=rmask)


# ----------------------------------------------------------------------------------------------
# forward: group-mean probabilities


@triton.jit(do_not_specialize=["Hkv", "G", "N", "NF", "C", "D", "xs"])
def _pbar_kernel(
    q_ptr, kb_ptr, tau_ptr, out_ptr,
    Hkv, G, N, NF, C, D, xs, inv_g,
    sqb, sqh, sqn, skb, skh, skc,
    BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    inv_g = tl.cast(inv_g, tl.float32)  # Inductor passes Python floats as fp64
    xs = tl.cast(xs, tl.float32)  # Inductor passes Python floats as fp64
    pid_r = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)
    b = bk // Hkv
    hk = bk % Hkv
    row0 = pid_r * BLOCK_R
    BLOCK_M: tl.constexpr = BLOCK_G * BLOCK_R
    mm = tl.arange(0, BLOCK_M)
    g = mm // BLOCK_R
    rows = row0 + mm % BLOCK_R
    mvalid = (g < G) & (rows < N)
    head = (hk * G + g).to(tl.int64)
    ci = tl.where(mvalid, rows // C, 0)
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    q = tl.load(
        q_ptr + b * sqb + head[:, None] * sqh + rows[:, None].to(tl.int64) * sqn + dcols[None, :],
        mask=mvalid[:, None] & dmask[None, :], other=0.0,
    )
    tau = tl.load(tau_ptr + (b * (Hkv * G) + head) * N + rows, mask=mvalid, other=float("inf"))
    kb_base = kb_ptr + b * skb + hk * skh

    orows = row0 + tl.arange(0, BLOCK_R)
    omask = orows < N
    out_base = out_ptr + bk * N * NF + orows[:, None].to(tl.int64) * NF
    n_vis = (tl.minimum(row0 + BLOCK_R, N) - 1) // C
    for c0 in range(0, n_vis, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        x, kb = _chunk_scores(q, kb_base, cols, cols < n_vis, dcols, dmask, skc, xs, DOT_PREC)
        s = tl.maximum(x - tau[:, None], 0.0)
        p = tl.where(cols[None, :] < ci[:, None], s * s, 0.0)
        pb = tl.sum(tl.reshape(p, (BLOCK_G, BLOCK_R, BLOCK_N)), 0) * inv_g
        tl.store(out_base + cols[None, :], pb, mask=omask[:, None] & (cols[None, :] < NF))
    zero = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for c0 in range(n_vis, NF, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        tl.store(out_base + cols[None, :], zero, mask=omask[:, None] & (cols[None, :] < NF))


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit(do_not_specialize=["Hq", "G", "N", "NF", "C", "D", "xs", "zscale"])
def _dq_kernel(
    q_ptr, kb_ptr, tau_ptr, dp_ptr, r_ptr, dq_ptr,
    Hq, G, N, NF, C, D, xs, zscale, inv_g,
    sqb, sqh, sqn, skb, skh, skc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    inv_g = tl.cast(inv_g, tl.float32)  # Inductor passes Python floats as fp64
    xs = tl.cast(xs, tl.float32)  # Inductor passes Python floats as fp64
    zscale = tl.cast(zscale, tl.float32)  # Inductor passes Python floats as fp64
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < N
    ci = tl.where(rmask, rows // C, 0)
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqn + dcols[None, :],
        mask=rmask[:, None] & dmask[None, :], other=0.0,
    )
    tau = tl.load(tau_ptr + bh * N + rows, mask=rmask, other=float("inf"))
    kb_base = kb_ptr + b * skb + hk * skh
    dp_base = dp_ptr + (b * (Hq // G) + hk) * N * NF + rows[:, None].to(tl.int64) * NF
    n_vis = (tl.minimum(row0 + BLOCK_M, N) - 1) // C

    # pass 1: r = sum s g / sum s
    ssg = tl.zeros([BLOCK_M], tl.float32)
    ss = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, n_vis, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        x, kb = _chunk_scores(q, kb_base, cols, cols < n_vis, dcols, dmask, skc, xs, DOT_PREC)
        valid = cols[None, :] < ci[:, None]
        s = tl.where(valid, tl.maximum(x - tau[:, None], 0.0), 0.0)
        gr = tl.load(dp_base + cols[None, :], mask=valid, other=0.0) * inv_g
        ssg += tl.sum(s * gr, 1)
        ss += tl.sum(s, 1)
    r = ssg / tl.where(ss > 0, ss, 1.0)
    tl.store(r_ptr + bh * N + rows, r, mask=rmask)

    # pass 2: dq = zscale * sum_c s (g - r) kbar_c
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for c0 in range(0, n_vis, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        x, kb = _chunk_scores(q, kb_base, cols, cols < n_vis, dcols, dmask, skc, xs, DOT_PREC)
        valid = cols[None, :] < ci[:, None]
        s = tl.where(valid, tl.maximum(x - tau[:, None], 0.0), 0.0)
        gr = tl.load(dp_base + cols[None, :], mask=valid, other=0.0) * inv_g
        dz = s * (gr - r[:, None])
        acc += tl.dot(dz.to(kb.dtype), kb, input_precision=DOT_PREC)
    dq = acc * zscale
    tl.store(
        dq_ptr + bh * N * D + rows[:, None].to(tl.int64) * D + dcols[None, :],
        dq.to(dq_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :],
    )


@triton.jit(do_not_specialize=["Hkv", "G", "N", "NF", "C", "D", "rows_per_split", "xs", "zscale"])
def _dkbar_kernel(
    q_ptr, kb_ptr, tau_ptr, dp_ptr, r_ptr, ws_ptr,
    Hkv, G, N, NF, C, D, rows_per_split, xs, zscale, inv_g,
    sqb, sqh, sqn, skb, skh, skc,
    BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    inv_g = tl.cast(inv_g, tl.float32)  # Inductor passes Python floats as fp64
    xs = tl.cast(xs, tl.float32)  # Inductor passes Python floats as fp64
    zscale = tl.cast(zscale, tl.float32)  # Inductor passes Python floats as fp64
    pid_c = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n_bk = tl.num_programs(1)
    b = bk // Hkv
    hk = bk % Hkv
    c0 = pid_c * BLOCK_N
    cols = c0 + tl.arange(0, BLOCK_N)
    cmask = cols < NF
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    kb = tl.load(
        kb_ptr + b * skb + hk * skh + cols[:, None] * skc + dcols[None, :],
        mask=cmask[:, None] & dmask[None, :], other=0.0,
    )
    BLOCK_M: tl.constexpr = BLOCK_G * BLOCK_R
    mm = tl.arange(0, BLOCK_M)
    g = mm // BLOCK_R
    gmask = g < G
    head = (hk * G + g).to(tl.int64)
    hq_rows = (b * (Hkv * G) + head) * N  # row offset of each stacked head in tau / r
    dp_base = dp_ptr + bk * N * NF

    # rows that can see chunk c0 start at (c0 + 1) * C; this split owns [s * L, (s + 1) * L)
    row_lo = tl.maximum((c0 + 1) * C, split * rows_per_split)
    row_hi = tl.minimum(N, (split + 1) * rows_per_split)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for row0 in range(row_lo, row_hi, BLOCK_R):
        rows = row0 + mm % BLOCK_R
        mvalid = gmask & (rows < row_hi)
        ci = tl.where(mvalid, rows // C, 0)
        q = tl.load(
            q_ptr + b * sqb + head[:, None] * sqh + rows[:, None].to(tl.int64) * sqn + dcols[None, :],
            mask=mvalid[:, None] & dmask[None, :], other=0.0,
        )
        tau = tl.load(tau_ptr + hq_rows + rows, mask=mvalid, other=float("inf"))
        r = tl.load(r_ptr + hq_rows + rows, mask=mvalid, other=0.0)
        x = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * xs
        valid = cols[None, :] < ci[:, None]
        s = tl.where(valid, tl.maximum(x - tau[:, None], 0.0), 0.0)
        gr = tl.load(dp_base + rows[:, None].to(tl.int64) * NF + cols[None, :], mask=valid, other=0.0) * inv_g
        dz = s * (gr - r[:, None])
        acc += tl.dot(tl.trans(dz.to(q.dtype)), q, input_precision=DOT_PREC)
    ws = ws_ptr + ((split * n_bk + bk) * NF + cols[:, None].to(tl.int64)) * D + dcols[None, :]
    tl.store(ws, acc * zscale, mask=cmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------
# host wrappers


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _defaults(D: int, device: torch.device, backward: bool) -> tuple[int, int, int]:
    """``(rows of a tile M, chunks of a tile BLOCK_N, num_warps)``.

    On the GPU: M = 64 and 64 chunks (32 for D > 128); the backward kernels hold an extra
    ``[M, D]`` or ``[BLOCK_N, D]`` float32 accumulator and take 8 warps (M = 32 for D > 128),
    which keeps every kernel free of register spills on sm_90 (checked with ptxas). On the CPU
    interpreter, whose cost is per tile op, chunk tiles of 16 (several tiles per row in tests).
    """
    bd = _block_d(D)
    if device.type != "cuda":
        return 64, 16, 4
    if backward:
        return (64, 64, 8) if bd <= 128 else (32, 32, 8)
    return 64, (64 if bd <= 128 else 32), (4 if bd <= 64 else 8)


def _row_config(D: int, blocks: dict | None, device: torch.device, backward: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` of the per-query-head kernels; ``blocks`` overrides."""
    block_m, block_n, warps = _defaults(D, device, backward)
    if blocks:
        block_m = blocks.get("BLOCK_M", block_m)
        block_n = blocks.get("BLOCK_N", block_n)
        warps = blocks.get("num_warps", warps)
    return block_m, block_n, warps


def _group_config(
    G: int, D: int, blocks: dict | None, device: torch.device, backward: bool = False
) -> tuple[int, int, int, int]:
    """``(BLOCK_G, BLOCK_R, BLOCK_N, num_warps)`` of the group-stacked kernels: a tile holds
    ``BLOCK_R`` rows of all ``BLOCK_G = next_pow2(G)`` heads (``M = BLOCK_G * BLOCK_R >= 16``)."""
    block_m, block_n, warps = _row_config(D, blocks, device, backward)
    block_g = triton.next_power_of_2(G)
    block_r = max(1, block_m // block_g, 16 // block_g)
    if blocks:
        block_r = blocks.get("BLOCK_R", block_r)
    return block_g, block_r, block_n, warps


def _common(q: torch.Tensor, kbar: torch.Tensor, chunk_size: int, zscale: float):
    B, Hq, N, D = q.shape
    Hkv, NF = kbar.shape[1], kbar.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if kbar.stride(-1) != 1:
        kbar = kbar.contiguous()
    return q, kbar, B, Hq, Hkv, N, NF, D, Hq // Hkv, float(zscale) / 2.0


def router_tau(
    q: torch.Tensor,
    kbar: torch.Tensor,
    chunk_size: int,
    zscale: float,
    *,
    max_iter: int = MAX_ITER,
    out: torch.Tensor | None = None,
    blocks: dict | None = None,
) -> torch.Tensor:
    """1.5-entmax threshold per (batch, query head, row), float32 ``[B, Hq, N]``.

    ``q [B, Hq, N, D]`` and ``kbar [B, Hkv, N // C, D]`` share a dtype (fp16/bf16/fp32) and
    device; ``zscale = gamma * scale``. ``tau`` is in ``x = z / 2`` units; rows without a past
    chunk get ``+inf``. ``out`` (float32 ``[B, Hq, N]``) is written in place when given.
    """
    q, kbar, B, Hq, Hkv, N, NF, D, G, xs = _common(q, kbar, chunk_size, zscale)
    if out is None:
        out = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    block_m, block_n, warps = _row_config(D, blocks, q.device)
    grid = (triton.cdiv(N, block_m), B * Hq)
    _tau_kernel[grid](
        q, kbar, out, Hq, G, N, NF, chunk_size, D, xs,
        q.stride(0), q.stride(1), q.stride(2), kbar.stride(0), kbar.stride(1), kbar.stride(2),
        MAX_ITER=max_iter, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        DOT_PREC=_dot_prec(q.dtype), num_warps=warps,
    )
    return out


def router_pbar(
    q: torch.Tensor,
    kbar: torch.Tensor,
    tau: torch.Tensor,
    chunk_size: int,
    zscale: float,
    *,
    out: torch.Tensor | None = None,
    blocks: dict | None = None,
) -> torch.Tensor:
    """Group-mean entmax probabilities, float32 ``[B, Hkv, N, N // C]`` (0 where ``c >= c_i``).

    ``tau`` is the float32 ``[B, Hq, N]`` output of :func:`router_tau`. ``out`` (float32,
    contiguous, that shape) is written in place when given.
    """
    q, kbar, B, Hq, Hkv, N, NF, D, G, xs = _common(q, kbar, chunk_size, zscale)
    tau = tau.contiguous()
    if out is None:
        out = torch.empty(B, Hkv, N, NF, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    block_g, block_r, block_n, warps = _group_config(G, D, blocks, q.device)
    grid = (triton.cdiv(N, block_r), B * Hkv)
    _pbar_kernel[grid](
        q, kbar, tau, out, Hkv, G, N, NF, chunk_size, D, xs, 1.0 / G,
        q.stride(0), q.stride(1), q.stride(2), kbar.stride(0), kbar.stride(1), kbar.stride(2),
        BLOCK_G=block_g, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        DOT_PREC=_dot_prec(q.dtype), num_warps=warps,
    )
    return out


def _num_splits(B: int, Hkv: int, NF: int, N: int, block_n: int, block_r: int, device) -> int:
    """Row splits of the dkbar kernel: enough programs to fill the GPU, none without work."""
    progs = B * Hkv * triton.cdiv(NF, block_n)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2
    return max(1, min(triton.cdiv(target, progs), triton.cdiv(N, 4 * block_r), 64))


def router_backward(
    q: torch.Tensor,
    kbar: torch.Tensor,
    tau: torch.Tensor,
    dpbar: torch.Tensor,
    chunk_size: int,
    zscale: float,
    *,
    splits: int | None = None,
    blocks: dict | None = None,
    outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact backward of :func:`router_pbar` through the entmax Jacobian.

    Args:
        q, kbar, tau: as in the forward. dpbar: ``[B, Hkv, N, N // C]`` gradient of ``pbar``.
        splits: row splits of the dkbar kernel (None = by GPU size).
        outs: optional preallocated ``(dq, dkbar, r)``: ``dq`` shaped like ``q`` (its dtype),
            ``dkbar`` float32 ``[B, Hkv, nF, D]``, ``r`` float32 ``[B, Hq, N]``.

    Returns:
        ``(dq, dkbar, r)``: ``dq [B, Hq, N, D]`` in ``q.dtype``, ``dkbar [B, Hkv, nF, D]``
        float32, and ``r = sum s g / sum s`` float32 ``[B, Hq, N]``.
    """
    q, kbar, B, Hq, Hkv, N, NF, D, G, xs = _common(q, kbar, chunk_size, zscale)
    tau = tau.contiguous()
    dpbar = dpbar.to(torch.float32).contiguous()
    if outs is None:
        dq = torch.empty(B, Hq, N, D, dtype=q.dtype, device=q.device)
        dkbar = torch.empty(B, Hkv, NF, D, dtype=torch.float32, device=q.device)
        r = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    else:
        dq, dkbar, r = outs
    if q.numel() == 0:
        return dq, dkbar, r
    prec = _dot_prec(q.dtype)
    block_m, block_n, warps = _row_config(D, blocks, q.device, backward=True)
    _dq_kernel[(triton.cdiv(N, block_m), B * Hq)](
        q, kbar, tau, dpbar, r, dq, Hq, G, N, NF, chunk_size, D, xs, float(zscale), 1.0 / G,
        q.stride(0), q.stride(1), q.stride(2), kbar.stride(0), kbar.stride(1), kbar.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D), DOT_PREC=prec, num_warps=warps,
    )
    if NF == 0:
        return dq, dkbar, r
    block_g, block_r, block_n, warps = _group_config(G, D, blocks, q.device, backward=True)
    if splits is None:
        splits = _num_splits(B, Hkv, NF, N, block_n, block_r, q.device)
    rows_per_split = triton.cdiv(triton.cdiv(N, splits), block_r) * block_r
    splits = triton.cdiv(N, rows_per_split)
    ws = dkbar if splits == 1 else torch.empty(splits, B, Hkv, NF, D, dtype=torch.float32, device=q.device)
    _dkbar_kernel[(triton.cdiv(NF, block_n), B * Hkv, splits)](
        q, kbar, tau, dpbar, r, ws, Hkv, G, N, NF, chunk_size, D, rows_per_split,
        xs, float(zscale), 1.0 / G,
        q.stride(0), q.stride(1), q.stride(2), kbar.stride(0), kbar.stride(1), kbar.stride(2),
        BLOCK_G=block_g, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        DOT_PREC=prec, num_warps=warps,
    )
    if splits > 1:
        torch.sum(ws, dim=0, out=dkbar)
    return dq, dkbar, r

