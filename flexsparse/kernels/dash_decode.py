"""Triton kernels of DashAttention decoding with a KV cache (``q_len`` small, split-KV).

Notation: the cache holds ``N`` tokens (read on the device from ``len_ptr``, an int32 scalar, so
a step can be captured in a CUDA graph), keys/values ``k, v [B, Hkv, cap, D]`` and the summaries
of the complete chunks ``kbar [B, Hkv, cap // C, D]`` (``NFS = cap // C`` columns). The ``L``
query rows ``q [B, Hq, L, D]`` sit at positions ``i = N - L + r``; row ``r`` lies in chunk
``c_i = i // C`` and routes over the complete chunks ``c < c_i``. ``G = Hq / Hkv``; query head
``h`` reads KV head ``h // G``. With ``xs = gamma * scale / 2``::

    x[h, r, c] = xs * q[h, r] . kbar[h // G, c]            (x = z / 2)
    p[h, r, c] = (x - tau[h, r])_+^2,   sum_{c < c_i} p = 1
    pbar[g, r, c] = mean of p over the G heads of KV head g;  selected: c < c_i and pbar > 0
    prior of a selected chunk = (log pbar - shift) / sigma   (shift = 0, sigma = 1 by default;
        estimate_diagonal: shift = mean of log pbar over the row's selected chunks)
    the diagonal chunk c_i: prior 0 (pi = 1), keys c_i * C .. i

Kernels (five launches per step):

* ``_scores_kernel``, grid (chunk tiles, row tiles, B * Hkv): the ``G * L`` query rows of a KV
  head are stacked along M (``m = g * L + r``, padded to >= 16) so one ``tl.dot`` of
  ``[M, D] x [D, BLOCK_N]`` scores every head of the group against a tile of summaries; ``x``
  goes to a float32 scratch ``[B, Hq, L, NFS]`` (small: ``G * L`` rows per KV head). Spreading
  this over chunk tiles keeps the one pass over ``kbar`` parallel even at batch 1.
* ``_tau_kernel``, grid (L, B * Hq): one program per (batch, query head, row) streams its row
  of scores in ``[BLOCK_C]`` tiles (one tile up to 2048 chunks on the GPU, so every pass after
  the first reads L1): maximum and mean, then ``tau`` by the solver of
  :mod:`flexsparse.kernels.router` with scalar state (bracket inside ``[max - 1, max]`` in x
  units, the closed-form root of ``f(tau) = sum (x - tau)_+^2 - 1`` on the current support,
  which is exact once the support is final, Halley steps, bisection whenever a step leaves the
  bracket; float32 ``[B, Hq, L]``, ``+inf`` for rows without a past chunk). One program per
  head rather than per group: with a ``[G, BLOCK_C]`` tile every thread held all ``G`` values
  of each of the solver's vectors (Triton spreads a loaded tile along its contiguous axis) and
  the kernel spilled.
* ``_select_kernel``, grid (L, B * Hkv): per (batch, KV head, row), one pass over
  ``[BLOCK_G, BLOCK_C]`` tiles: ``pbar`` = mean over the heads of ``(x - tau)_+^2``, then a compact
  list of the selected chunk ids with their ``log pbar`` (prefix sums keep the chunk order),
  the count and the row's ``shift``.
* ``_split_kernel``, grid (S, B * Hkv * L): split ``s`` of a row takes items
  ``[s * per, min(T, (s + 1) * per))`` of the row's ``T = count + 1`` items (the selected chunks,
  then the diagonal chunk), ``per = max(ceil(T / S), min_per)``; splits past the end write an
  empty partial. Group-centric: the ``G`` heads of the KV head form the M dimension of one tile,
  so every K/V chunk is loaded once for the whole group. Online softmax in base 2 with the
  prior added to the logits; partials ``(m, l, acc)`` in float32 (or the normalised output
  directly when ``S == 1``).
* ``_combine_kernel``, grid (B * Hq * L): ``out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s``.

The cache append is one more launch (``_append_kernel``, grid (chunks touched, B * Hkv)): it
writes the new keys and values at device-side positions and recomputes the summary of each
chunk that holds a new token from the merged ``[C, D]`` tile.

Accumulation is float32; ``tl.dot`` takes bf16/fp16 operands as they are and float32 operands
in IEEE precision (the interpreter path).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flexsparse.kernels.router import _tau_bracket, _tau_step

__all__ = ["MAX_ITER", "cache_append", "decode_attention", "decode_route", "decode_scores", "default_num_splits"]

# Solver passes after the max pass (bisection alone closes a bracket of width 1 in ~22).
MAX_ITER = 40

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# stage 1: scores of all G heads of a group against the cached summaries


@triton.jit(do_not_specialize=["Hkv", "G", "L", "D", "NFS", "xs"])
def _scores_kernel(
    q_ptr, kb_ptr, len_ptr, x_ptr,
    Hkv, G, L, D, NFS, xs,
    sqb, sqh, sql, skb, skh, skc,
    C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    bk = tl.program_id(2).to(tl.int64)
    b = bk // Hkv
    hk = bk % Hkv
    N = tl.load(len_ptr)
    NF = N // C
    GL = G * L
    mm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mvalid = mm < GL
    g = mm // L
    r = mm % L
    head = (hk * G + g).to(tl.int64)
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    q = tl.load(
        q_ptr + b * sqb + head[:, None] * sqh + r[:, None].to(tl.int64) * sql + dcols[None, :],
        mask=mvalid[:, None] & dmask[None, :], other=0.0,
    )
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < NF
    kb = tl.load(
        kb_ptr + b * skb + hk * skh + cols[:, None].to(tl.int64) * skc + dcols[None, :],
        mask=cmask[:, None] & dmask[None, :], other=0.0,
    )
    x = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * xs
    rows = bk * GL + mm  # row of the [B, Hq, L] scratch (h = hk * G + g)
    tl.store(x_ptr + rows[:, None] * NFS + cols[None, :], x, mask=mvalid[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# stage 1: tau per head (one row of scores per program: the solver state is scalar)


@triton.jit(do_not_specialize=["L", "NFS"])
def _tau_kernel(
    x_ptr, len_ptr, tau_ptr,
    L, NFS,
    C: tl.constexpr, MAX_ITER: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * Hq + h
    N = tl.load(len_ptr)
    ci = (N - L + r) // C  # past chunks of this row (all complete: c_i <= N // C)
    row = bh * L + r
    xrow = x_ptr + row * NFS

    # pass 0: maximum and mean over the past chunks
    m = tl.full([], float("-inf"), tl.float32)
    sx = tl.zeros([], tl.float32)
    for c0 in range(0, ci, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        valid = cols < ci
        x = tl.load(xrow + cols, mask=valid, other=float("-inf"))
        m = tl.maximum(m, tl.max(x, 0))
        sx += tl.sum(tl.where(valid, x, 0.0), 0)

    has, lo, hi, tol, done = _tau_bracket(m, sx, ci)
    tau = lo
    it = 0
    while (done == 0) & (it < MAX_ITER):
        a1 = tl.zeros([], tl.float32)
        a2 = tl.zeros([], tl.float32)
        cnt = tl.zeros([], tl.float32)
        min_in = tl.full([], float("inf"), tl.float32)
        max_out = tl.full([], float("-inf"), tl.float32)
        for c0 in range(0, ci, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            valid = cols < ci
            x = tl.load(xrow + cols, mask=valid, other=float("-inf"))
            a = x - tau
            pos = valid & (a > 0)
            ap = tl.where(pos, a, 0.0)
            a1 += tl.sum(ap, 0)
            a2 += tl.sum(ap * ap, 0)
            cnt += tl.sum(pos.to(tl.float32), 0)
            min_in = tl.minimum(min_in, tl.min(tl.where(pos, a, float("inf")), 0))
            max_out = tl.maximum(max_out, tl.max(tl.where(valid & (a <= 0), a, float("-inf")), 0))
        tau, lo, hi, done = _tau_step(tau, lo, hi, tol, a1, a2, cnt, min_in, max_out)
        it += 1
    tl.store(tau_ptr + row, tl.where(has, tau, float("inf")))


# ----------------------------------------------------------------------------------------------
# stage 1: pbar over the group and the compact selection


@triton.jit(do_not_specialize=["G", "L", "NFS", "inv_g"])
def _select_kernel(
    x_ptr, tau_ptr, len_ptr, ids_ptr, lp_ptr, cnt_ptr, shift_ptr,
    G, L, NFS, inv_g,
    C: tl.constexpr, ESTIMATE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)  # b * Hkv + hk
    N = tl.load(len_ptr)
    ci = (N - L + r) // C
    gg = tl.arange(0, BLOCK_G)
    gmask = gg < G
    hrow = (bk * G + gg) * L + r  # rows of the [B, Hq, L] tau / scores of the group's heads
    tau = tl.load(tau_ptr + hrow, mask=gmask, other=float("inf"))  # padded heads: p = 0
    xrow = x_ptr + hrow[:, None] * NFS
    row = bk * L + r
    base = row * NFS
    count = tl.zeros([], tl.int32)
    slog = tl.zeros([], tl.float32)
    for c0 in range(0, ci, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cvalid = cols < ci
        x = tl.load(xrow + cols[None, :], mask=gmask[:, None] & cvalid[None, :], other=float("-inf"))
        s = tl.maximum(x - tau[:, None], 0.0)
        pb = tl.sum(s * s, 0) * inv_g
        sel = cvalid & (pb > 0)
        si = sel.to(tl.int32)
        slot = count + tl.cumsum(si, 0) - si  # selected chunks kept in increasing order
        lpb = tl.log(tl.where(sel, pb, 1.0))
        tl.store(ids_ptr + base + slot, cols, mask=sel)
        tl.store(lp_ptr + base + slot, lpb, mask=sel)
        count += tl.sum(si, 0)
        slog += tl.sum(lpb, 0)
    tl.store(cnt_ptr + row, count)
    if ESTIMATE:
        shift = slog / tl.maximum(count, 1).to(tl.float32)
    else:
        shift = slog * 0.0
    tl.store(shift_ptr + row, shift)


# ----------------------------------------------------------------------------------------------
# cache append: write the new tokens and refresh the summaries of the chunks they touch


@triton.jit(do_not_specialize=["Hkv", "L", "D", "NCH", "inv_sqrt_d"])
def _append_kernel(
    kn_ptr, vn_ptr, k_ptr, v_ptr, kb_ptr, w_ptr, len_ptr,
    Hkv, L, D, NCH, inv_sqrt_d,
    snb, snh, snl, svnb, svnh, svnl, skb, skh, skn, svb, svh, svn, sbb, sbh, sbc,
    C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_c = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)
    b = bk // Hkv
    hk = bk % Hkv
    start = tl.load(len_ptr)  # the length before this append
    c = start // C + pid_c
    j = tl.arange(0, BLOCK_T)
    pos = (c * C + j).to(tl.int64)
    newi = pos - start
    jmask = j < tl.where(c < NCH, C, 0)  # (no scalar & vector bool: the interpreter rejects it)
    is_new = jmask & (newi >= 0) & (newi < L)
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    m_new = is_new[:, None] & dmask[None, :]
    m_old = (jmask & (is_new == 0))[:, None] & dmask[None, :]
    kc = k_ptr + b * skb + hk * skh + pos[:, None] * skn + dcols[None, :]
    kt = tl.load(kn_ptr + b * snb + hk * snh + newi[:, None] * snl + dcols[None, :], mask=m_new, other=0.0)
    kt = tl.where(m_new, kt, tl.load(kc, mask=m_old, other=0.0))
    tl.store(kc, kt, mask=m_new)
    vt = tl.load(vn_ptr + b * svnb + hk * svnh + newi[:, None] * svnl + dcols[None, :], mask=m_new, other=0.0)
    tl.store(v_ptr + b * svb + hk * svh + pos[:, None] * svn + dcols[None, :], vt, mask=m_new)
    # summary of the chunk (provisional while it is incomplete): softmax_j(w . k_j / sqrt(D)) k_j
    w = tl.load(w_ptr + hk * D + dcols, mask=dmask, other=0.0).to(tl.float32)
    kf = kt.to(tl.float32)
    sc = tl.sum(kf * w[None, :], 1) * inv_sqrt_d
    sc = tl.where(j < C, sc, float("-inf"))
    e = tl.exp(sc - tl.max(sc, 0))
    kbar = tl.sum(e[:, None] * kf, 0) / tl.sum(e, 0)
    n_new = tl.sum(is_new.to(tl.int32), 0)
    tl.store(
        kb_ptr + b * sbb + hk * sbh + c * sbc + dcols, kbar.to(kb_ptr.dtype.element_ty),
        mask=dcols < tl.where(n_new > 0, D, 0),
    )


# ----------------------------------------------------------------------------------------------
# stage 2: split-KV attention over the selected chunks and the diagonal chunk


@triton.jit(do_not_specialize=["Hkv", "G", "L", "D", "NFS", "S", "min_per", "qk_scale", "prior_scale"])
def _split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, ids_ptr, lp_ptr, cnt_ptr, shift_ptr,
    o_ptr, m_ptr, l_ptr,
    Hkv, G, L, D, NFS, S, min_per, qk_scale, prior_scale,
    sqb, sqh, sql, skb, skh, skn, svb, svh, svn, sob, soh, sol,
    C: tl.constexpr, CHUNK_TILES: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    s = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)  # (b * Hkv + hk) * L + r
    bk = row // L
    r = row % L
    b = bk // Hkv
    hk = bk % Hkv
    N = tl.load(len_ptr)
    i = N - L + r
    ci = i // C
    n_sel = tl.load(cnt_ptr + row)
    shift = tl.load(shift_ptr + row)
    T = n_sel + 1
    per = tl.maximum((T + S - 1) // S, min_per)
    t0 = s * per
    t1 = tl.minimum(T, t0 + per)

    gg = tl.arange(0, BLOCK_M)
    gmask = gg < G
    head = (hk * G + gg).to(tl.int64)
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    q = tl.load(
        q_ptr + b * sqb + head[:, None] * sqh + r * sql + dcols[None, :],
        mask=gmask[:, None] & dmask[None, :], other=0.0,
    )
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    list_base = row * NFS

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(t0, t1):
        past = t < n_sel
        cid = tl.load(ids_ptr + list_base + t, mask=past, other=0)
        lpv = tl.load(lp_ptr + list_base + t, mask=past, other=0.0)
        chunk = tl.where(past, cid, ci)
        bias = tl.where(past, (lpv - shift) * prior_scale, 0.0)
        n_keys = tl.where(past, C, i - ci * C + 1)
        for jt in range(0, CHUNK_TILES):
            j = jt * BLOCK_N + tl.arange(0, BLOCK_N)
            kmask = j < n_keys
            pos = (chunk * C + j).to(tl.int64)
            kt = tl.load(k_base + pos[:, None] * skn + dcols[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            vt = tl.load(v_base + pos[:, None] * svn + dcols[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            sc = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale + bias
            sc = tl.where(kmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile past the diagonal's last key
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
            m_i = m_new

    if SINGLE:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            o_ptr + b * sob + head[:, None] * soh + r * sol + dcols[None, :],
            out.to(o_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :],
        )
    else:
        part = ((b * (Hkv * G) + head) * L + r) * S + s  # [B, Hq, L, S]
        tl.store(m_ptr + part, m_i, mask=gmask)
        tl.store(l_ptr + part, l_i, mask=gmask)
        tl.store(o_ptr + part[:, None] * D + dcols[None, :], acc, mask=gmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["Hq", "L", "D", "S"])
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    Hq, L, D, S, sob, soh, sol,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * L + r
    r = row % L
    h = (row // L) % Hq
    b = row // (L * Hq)
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    mx = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mx = tl.maximum(mx, tl.load(m_ptr + row * S + ss, mask=ss < S, other=float("-inf")))
    big = tl.max(mx, 0)  # finite: the diagonal item holds key i itself
    num = tl.zeros([BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        smask = ss < S
        ms = tl.load(m_ptr + row * S + ss, mask=smask, other=float("-inf"))
        ls = tl.load(l_ptr + row * S + ss, mask=smask, other=0.0)
        acc = tl.load(
            acc_ptr + (row * S + ss)[:, None] * D + dcols[None, :], mask=smask[:, None] & dmask[None, :], other=0.0
        )
        wgt = tl.exp2(ms - big)
        den += wgt * ls
        num += tl.sum(wgt[:, None] * acc, 0)
    out = num / tl.sum(den, 0)
    tl.store(out_ptr + b * sob + h * soh + r * sol + dcols, out.to(out_ptr.dtype.element_ty), mask=dmask)


# ----------------------------------------------------------------------------------------------
# host wrappers (no validation here: see flexsparse.patterns.dash_cache)


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, x))


def _opt(blocks: dict | None, name: str, default: int) -> int:
    return default if not blocks or name not in blocks else int(blocks[name])


def default_num_splits(
    batch: int, kv_heads: int, q_len: int, max_items: int, device: torch.device, min_per: int
) -> int:
    """Splits per row: enough ``(split, row)`` programs to fill the GPU twice (132 SMs on an H100),
    at most ``ceil(max_items / min_per)`` (``max_items``: an upper bound of the items of a row, the
    cached chunk capacity + 1, so the launch does not depend on the current length) and 128."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    rows = max(1, batch * kv_heads * q_len)
    return max(1, min(triton.cdiv(target, rows), triton.cdiv(max(1, max_items), max(1, min_per)), 128))


def cache_append(
    k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kbar: torch.Tensor,
    w: torch.Tensor, length: torch.Tensor, chunk_size: int, *, blocks: dict | None = None,
) -> None:
    """Write ``k_new, v_new [B, Hkv, L, D]`` into ``k, v [B, Hkv, cap, D]`` at positions
    ``length .. length + L - 1`` (``length`` int32 ``[1]`` on the device, not advanced here) and
    write the summary of every chunk that holds a new token into ``kbar [B, Hkv, cap // C, D]``
    (``w [Hkv, D]`` contiguous in the cache dtype; pooled in float32). ``cap % C == 0``. One launch.
    """
    B, Hkv, L, D = k_new.shape
    C = chunk_size
    NCH = kbar.shape[2]
    if L == 0 or NCH == 0:
        return
    n_touch = min((L + C - 2) // C + 1, NCH)
    block_t = _pow2(C)
    # the [C, D] tile lives in registers a few times over: C = 64, D = 128 spills below 16 warps
    tile = block_t * _block_d(D)
    warps = 16 if tile >= 8192 else (8 if tile >= 4096 else 4)
    _append_kernel[(n_touch, B * Hkv)](
        k_new, v_new, k, v, kbar, w, length, Hkv, L, D, NCH, 1.0 / math.sqrt(D),
        k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        kbar.stride(0), kbar.stride(1), kbar.stride(2),
        C=C, BLOCK_T=block_t, BLOCK_D=_block_d(D), num_warps=_opt(blocks, "append_warps", warps),
    )


def decode_scores(
    q: torch.Tensor, kbar: torch.Tensor, length: torch.Tensor, chunk_size: int, zscale: float,
    *, out: torch.Tensor | None = None, blocks: dict | None = None,
) -> torch.Tensor:
    """Router scores ``x = zscale / 2 * q . kbar`` of the ``L`` rows, float32 ``[B, Hq, L, NFS]``.

    ``q [B, Hq, L, D]``, ``kbar [B, Hkv, NFS, D]`` (one dtype, last dim contiguous), ``length``
    int32 ``[1]`` on the device (the cache length ``N``). Columns ``c >= N // C`` are not written.
    """
    B, Hq, L, D = q.shape
    Hkv, NFS = kbar.shape[1], kbar.shape[2]
    G = Hq // Hkv
    if out is None:
        out = torch.empty(B, Hq, L, NFS, dtype=torch.float32, device=q.device)
    if NFS == 0 or q.numel() == 0:
        return out
    gpu = q.device.type == "cuda"
    block_n = _opt(blocks, "SCORE_N", 64 if gpu else 16)
    block_m = _opt(blocks, "SCORE_M", min(64, max(16, _pow2(G * L))))
    grid = (triton.cdiv(NFS, block_n), triton.cdiv(G * L, block_m), B * Hkv)
    _scores_kernel[grid](
        q, kbar, length, out, Hkv, G, L, D, NFS, float(zscale) / 2.0,
        q.stride(0), q.stride(1), q.stride(2), kbar.stride(0), kbar.stride(1), kbar.stride(2),
        C=chunk_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        DOT_PREC=_dot_prec(q.dtype), num_warps=_opt(blocks, "score_warps", 4),
    )
    return out


def decode_route(
    x: torch.Tensor, length: torch.Tensor, kv_heads: int, chunk_size: int, *,
    estimate_diagonal: bool = False, max_iter: int = MAX_ITER, blocks: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entmax threshold, group mean and compact selection from the scores of :func:`decode_scores`.

    Returns ``(ids, log_pbar, count, shift, tau)``: ``ids`` int32 ``[B, Hkv, L, NFS]`` whose first
    ``count[b, g, r]`` entries are the selected past chunks of the row in increasing order (the
    rest is not written), ``log_pbar`` float32 (same layout) their ``log pbar``, ``count`` int32
    ``[B, Hkv, L]``, ``shift`` float32 ``[B, Hkv, L]`` (mean ``log pbar`` over the selection with
    ``estimate_diagonal``, else 0), ``tau`` float32 ``[B, Hq, L]`` in x units (``+inf`` for rows
    without a past chunk).
    """
    B, Hq, L, NFS = x.shape
    G = Hq // kv_heads
    dev = x.device
    ids = torch.empty(B, kv_heads, L, NFS, dtype=torch.int32, device=dev)
    lp = torch.empty(B, kv_heads, L, NFS, dtype=torch.float32, device=dev)
    cnt = torch.empty(B, kv_heads, L, dtype=torch.int32, device=dev)
    shift = torch.empty(B, kv_heads, L, dtype=torch.float32, device=dev)
    tau = torch.empty(B, Hq, L, dtype=torch.float32, device=dev)
    if cnt.numel() == 0:
        return ids, lp, cnt, shift, tau
    gpu = dev.type == "cuda"
    # GPU: a whole row of scores per tile up to 2048 chunks (64 registers, 4 warps, sm_90);
    # [BLOCK_G, BLOCK_C] selection tiles of up to 8192 elements with 8 warps (G = 16: 512
    # chunks, 78 registers; the group sum is thread-local, Triton lays the tile along the chunks)
    # so a long context takes few sequential steps. Interpreter: small tiles (several per row).
    tau_c = _opt(blocks, "TAU_C", min(2048, _pow2(NFS)) if gpu else 8)
    block_g = _pow2(G)
    sel_c = _opt(blocks, "SELECT_C", max(16, min(_pow2(NFS), 4096, 8192 // block_g)) if gpu else 8)
    _tau_kernel[(L, B * Hq)](
        x, length, tau, L, NFS, C=chunk_size, MAX_ITER=max_iter, BLOCK_C=tau_c,
        num_warps=_opt(blocks, "tau_warps", 4),
    )
    _select_kernel[(L, B * kv_heads)](
        x, tau, length, ids, lp, cnt, shift, G, L, NFS, 1.0 / G,
        C=chunk_size, ESTIMATE=bool(estimate_diagonal), BLOCK_G=block_g, BLOCK_C=sel_c,
        num_warps=_opt(blocks, "select_warps", 8 if gpu else 4),
    )
    return ids, lp, cnt, shift, tau


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor,
    ids: torch.Tensor, log_pbar: torch.Tensor, count: torch.Tensor, shift: torch.Tensor,
    chunk_size: int, *, scale: float, sigma: float = 1.0, num_splits: int = 1, min_per: int = 1,
    out: torch.Tensor | None = None, blocks: dict | None = None,
) -> torch.Tensor:
    """Split-KV stage 2 over the selected chunks (prior ``(log pbar - shift) / sigma``) and the
    diagonal chunk (prior 0, keys ``<= i``), then the combine.

    ``q [B, Hq, L, D]``; ``k, v [B, Hkv, cap, D]`` (last dim contiguous); the selection from
    :func:`decode_route`. Returns ``out [B, Hq, L, D]`` in ``q.dtype`` (written in place when
    ``out`` is given; any strides with a contiguous last dim).
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    NFS = ids.shape[-1]
    if out is None:
        out = torch.empty(B, Hq, L, D, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    gpu = q.device.type == "cuda"
    C = chunk_size
    # one 64-key tile per chunk up to C = 64; longer chunks in 32-key tiles when D > 64 (two
    # 64-key tiles spill on sm_90 with D = 128)
    block_n = _opt(blocks, "BLOCK_N", max(16, _pow2(C)) if C <= 64 else (32 if _block_d(D) > 64 else 64))
    block_m = max(16, _pow2(G))
    S = max(1, int(num_splits))
    single = S == 1
    if single:
        m_part = l_part = out  # unused
        o_buf = out
    else:
        m_part = torch.empty(B, Hq, L, S, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        o_buf = torch.empty(B, Hq, L, S, D, dtype=torch.float32, device=q.device)
    so = out.stride() if single else (0, 0, 0, 0)
    warps = _opt(blocks, "num_warps", 4)  # D = 128: 195 registers, no spills on sm_90 (8 warps spill)
    _split_kernel[(S, B * Hkv * L)](
        q, k, v, length, ids, log_pbar, count, shift, o_buf, m_part, l_part,
        Hkv, G, L, D, NFS, S, int(min_per), float(scale) * _LOG2E, _LOG2E / float(sigma),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), so[0], so[1], so[2],
        C=C, CHUNK_TILES=triton.cdiv(C, block_n), SINGLE=single,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D), DOT_PREC=_dot_prec(q.dtype),
        num_warps=warps, num_stages=_opt(blocks, "num_stages", 2) if gpu else 1,
    )
    if not single:
        _combine_kernel[(B * Hq * L,)](
            m_part, l_part, o_buf, out, Hq, L, D, S, out.stride(0), out.stride(1), out.stride(2),
            BLOCK_S=min(16, _pow2(S)), BLOCK_D=_block_d(D), num_warps=_opt(blocks, "combine_warps", 4),
        )
    return out
