"""Triton kernels of exact token-level DashAttention (stage 2 with in-kernel routing), forward
and backward.

Notation: ``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]``, chunk size ``C``, ``nF = N // C``
complete chunks with summaries ``kbar [B, Hkv, nF, D]``, ``nC = ceil(N / C)`` chunks, ``G = Hq /
Hkv``, query head ``h`` reads KV head ``h // G``, ``c_i = i // C``. With ``tau [B, Hq, N]`` the
router's threshold (:func:`flexsparse.kernels.router.router_tau`, ``+inf`` on rows of chunk 0)
and ``xs = gamma * scale / 2``::

    x[h, i, c]    = xs * q[h, i] . kbar[h // G, c]
    p[h, i, c]    = (x - tau[h, i])_+^2                    for c < c_i (complete chunks only)
    pbar[g, i, c] = mean of p over the G heads of group g
    selected      = {c < c_i : pbar > 0}  +  the diagonal chunk c_i (causal, prior 1)
    log pi        = log pbar                                (default)
                  = (log pbar - mu[g, i]) / sigma           (estimate_diagonal; mu = mean of
                                                             log pbar over the selected past chunks)
    out[h, i]     = softmax_{j <= i, c(j) selected}(scale * q[h, i] . k[g, j] + log pi[g, i, c(j)]) v

No ``[N, nC]`` table is read or written by the forward: every program recomputes the routing of
its rows from ``tau`` and ``kbar``.

Layout of a program's query tile ("group-centric"): one program owns ``BLOCK_R`` consecutive
positions of one (batch, KV head) and stacks the ``BLOCK_G = next_pow2(G)`` query heads of the
group along the tile's rows (row ``m = head * BLOCK_R + r``, ``M = BLOCK_G * BLOCK_R >= 16``), so
every K/V chunk it loads serves all G heads, and the group mean of ``p`` is a reshape and a sum.

Kernels:

* ``_fwd_kernel``, grid ``(cdiv(N, BLOCK_R), B * Hkv)``. Chunks ``0 .. last chunk of the block``
  are walked in tiles of ``BLOCK_NC`` chunks: one ``tl.dot`` ``[M, D] x [D, BLOCK_NC]`` scores the
  tile's summaries, giving ``pbar``, the selection and ``log pi`` of every (position, chunk) of the
  tile; the tile's *active* chunks (selected by some position of the block, or diagonal for one)
  are compacted with a cumsum and visited in order; chunks no position needs are skipped without
  touching K/V. Per active chunk, K/V sub-tiles of ``BLOCK_N`` keys: ``S = scale q k^T + log pi``
  (base-2 units), masked per row (unselected rows, causal, sequence end), online softmax in
  float32. Writes ``out``, ``lse`` (base 2, float32 ``[B, Hq, N]``), the per-position count of
  selected past chunks (int32 ``[B, Hkv, N]``, for statistics) and, with ``estimate_diagonal``,
  ``mu`` (float32 ``[B, Hkv, N]``, from a first routing-only pass).
* ``_bwd_dq_kernel``, same grid and walk: ``Delta = rowsum(dO * O)`` (stored for the dK/dV
  kernel), ``dS = P (dP - Delta)``, ``dq = scale dS K`` (float32), and the gradient of the prior,
  ``d log pi[g, i, c] = sum over the G heads and the chunk's tokens of dS``, converted in the
  kernel to ``d pbar`` (float32 ``[B, Hkv, N, nF]``, every entry written, 0 off the selection):
  ``d log pi / pbar`` by default; with ``estimate_diagonal``, ``(d log pi - mean_sel d log pi) /
  (sigma pbar)`` (a second routing pass rewrites the raw values once the row mean is known).
  It also writes the block-level activity flags (int8 ``[B, Hkv, nC, nQB]``, chunk-major).
* ``_bwd_dkdv_kernel``, grid ``(nC * cdiv(C, BLOCK_N), B * Hkv)``: one program per ``BLOCK_N``
  keys of one chunk; it walks the query blocks that can see them, skipping (``FLAG_T`` at a time,
  from the flags) those that do not attend the chunk, recomputes the routing of the chunk for the
  block's rows and accumulates ``dV += P^T dO``, ``dK += scale dS^T Q``. No atomics anywhere.

``d pbar`` goes to :func:`flexsparse.kernels.router.router_backward`, which gives the router's
share of ``dq`` and ``d kbar``.

The head dim ``D`` is specialised (it is the row stride: 16-divisibility gives vectorised,
async-copy-pipelined K/V loads); sequence sizes are not, so new lengths do not recompile.

Numerics: float32 accumulation; ``P`` and ``dS`` are cast to the input dtype for the tensor-core
products (as FlashAttention does); float32 inputs use IEEE-precision dots (interpreter / CI).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dash_attn_forward", "dash_attn_backward", "attn_config"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _stack(v, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr):
    """``[BLOCK_R]`` per position -> ``[BLOCK_G * BLOCK_R]`` per stacked row (``m = h * R + r``)."""
    return tl.reshape(tl.broadcast_to(v[None, :], (BLOCK_G, BLOCK_R)), (BLOCK_G * BLOCK_R,))



@triton.jit
def _group_sum(v, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr):
    """``[BLOCK_G * BLOCK_R]`` per stacked row -> ``[BLOCK_R]`` summed over the heads."""
    return tl.sum(tl.reshape(v, (BLOCK_G, BLOCK_R)), 0)


@triton.jit
def _route_tile(q, tau, ci_m, kb_base, ccols, NF, D, dcols, dmask, xs, inv_g,
                BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_NC: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """Group-mean entmax probabilities of the chunks ``ccols`` for the block's positions, float32
    ``[BLOCK_R, BLOCK_NC]`` (0 where ``c >= c_i``, and on rows past ``N``)."""
    kb = tl.load(
        kb_base + ccols[:, None].to(tl.int64) * D + dcols[None, :],
        mask=(ccols < NF)[:, None] & dmask[None, :], other=0.0,
    )
    x = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * xs
    s = tl.maximum(x - tau[:, None], 0.0)
    p = tl.where(ccols[None, :] < ci_m[:, None], s * s, 0.0)
    return tl.sum(tl.reshape(p, (BLOCK_G, BLOCK_R, BLOCK_NC)), 0) * inv_g


@triton.jit
def _log_prior(pbar, ccols, ci_r, rvalid, mu, inv_sigma, ESTIMATE: tl.constexpr):
    """``(log pi, selected)`` of a ``[BLOCK_R, BLOCK_NC]`` tile: natural log, 0 on the diagonal
    chunk, ``-inf`` where the position does not attend the chunk."""
    sel = pbar > 0
    lg = tl.log(tl.where(sel, pbar, 1.0))
    if ESTIMATE:
        lg = (lg - mu[:, None]) * inv_sigma
    diag = (ccols[None, :] == ci_r[:, None]) & rvalid[:, None]
    return tl.where(sel, lg, tl.where(diag, 0.0, float("-inf"))), sel


@triton.jit
def _kv_scores(q, k_ptr, v_ptr, kv_base, c, j0, C, N, D, rows, lp2, act_m, qk2, dcols, dmask,
               BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Keys and values ``c * C + j0 + [0, BLOCK_N)`` of chunk ``c``, the biased logits (base 2)
    and where they are allowed (active row, key inside the chunk and the sequence, causal)."""
    koff = j0 + tl.arange(0, BLOCK_N)
    kpos = c * C + koff
    kvalid = (koff < C) & (kpos < N)
    kvo = kv_base + kpos[:, None].to(tl.int64) * D + dcols[None, :]
    kvm = kvalid[:, None] & dmask[None, :]
    k = tl.load(k_ptr + kvo, mask=kvm, other=0.0)
    v = tl.load(v_ptr + kvo, mask=kvm, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk2 + lp2[:, None]
    allowed = act_m[:, None] & kvalid[None, :] & (kpos[None, :] <= rows[:, None])
    return k, v, s, allowed


@triton.jit
def _softmax_update(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """One online-softmax step with logits ``s`` (base 2, ``-inf`` where masked) and values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_tile(q, k_ptr, v_ptr, kv_base, c, j0, C, N, D, rows, lp2, act_m, m_i, l_i, acc, qk2,
              dcols, dmask, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax update with keys ``c * C + j0 + [0, BLOCK_N)`` of chunk ``c``."""
    k, v, s, allowed = _kv_scores(q, k_ptr, v_ptr, kv_base, c, j0, C, N, D, rows, lp2, act_m, qk2, dcols, dmask,
                                  BLOCK_N, DOT_PREC)
    return _softmax_update(tl.where(allowed, s, float("-inf")), v, m_i, l_i, acc, DOT_PREC)


@triton.jit
def _dq_tile(q, do, k_ptr, v_ptr, kv_base, c, j0, C, N, D, rows, lp2, act_m, lse, delta, dq, dl_m,
             qk2, dcols, dmask, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """``dq += dS K`` and ``dl_m += rowsum(dS)`` with keys ``c * C + j0 + [0, BLOCK_N)``."""
    k, v, s, allowed = _kv_scores(q, k_ptr, v_ptr, kv_base, c, j0, C, N, D, rows, lp2, act_m, qk2, dcols, dmask,
                                  BLOCK_N, DOT_PREC)
    p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dl_m += tl.sum(ds, 1)
    return dq, dl_m


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_tile_past(q, k_ptr, v_ptr, kv_base, c, j0, C, D, lp2, m_i, l_i, acc, qk2, dcols, dmask,
                   BLOCK_N: tl.constexpr, MASK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax update with keys ``c * C + j0 + [0, BLOCK_N)`` of a chunk that lies wholly
    before the block's rows (complete, no causal mask). Rows that do not attend the chunk carry
    ``lp2 = -inf``, which masks them without a select on the tile."""
    koff = j0 + tl.arange(0, BLOCK_N)
    kvo = kv_base + (c * C + koff)[:, None].to(tl.int64) * D + dcols[None, :]
    if MASK_K:
        kvm = (koff < C)[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kvo, mask=kvm, other=0.0)
        v = tl.load(v_ptr + kvo, mask=kvm, other=0.0)
    else:
        k = tl.load(k_ptr + kvo, mask=dmask[None, :], other=0.0)
        v = tl.load(v_ptr + kvo, mask=dmask[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk2 + lp2[:, None]
    if MASK_K:
        s = tl.where((koff < C)[None, :], s, float("-inf"))
    return _softmax_update(s, v, m_i, l_i, acc, DOT_PREC)


@triton.jit(do_not_specialize=["Hkv", "G", "N", "NF", "NCH", "C", "xs", "qk2", "inv_g", "inv_sigma"])
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, kb_ptr, tau_ptr, o_ptr, lse_ptr, mu_ptr, cnt_ptr, ids_ptr, lpt_ptr,
    Hkv, G, N, NF, NCH, C, D, xs, qk2, inv_g, inv_sigma,
    ESTIMATE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_NC: tl.constexpr, BLOCK_D: tl.constexpr, ONE_SUB: tl.constexpr, MASK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Inductor passes Python floats as fp64: float32 before they meet loop-carried values
    xs = tl.cast(xs, tl.float32)
    qk2 = tl.cast(qk2, tl.float32)
    inv_g = tl.cast(inv_g, tl.float32)
    inv_sigma = tl.cast(inv_sigma, tl.float32)
    pid = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)  # b * Hkv + KV head
    row0 = pid * BLOCK_R
    M: tl.constexpr = BLOCK_G * BLOCK_R
    mm = tl.arange(0, M)
    hh = mm // BLOCK_R
    rl = mm % BLOCK_R
    rows = row0 + rl
    mvalid = (hh < G) & (rows < N)
    qrow = (bk * G + hh) * N + rows  # flat row of q / o / tau / lse
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    qmask = mvalid[:, None] & dmask[None, :]
    q = tl.load(q_ptr + qrow[:, None] * D + dcols[None, :], mask=qmask, other=0.0)
    tau = tl.load(tau_ptr + qrow, mask=mvalid, other=float("inf"))
    ci_m = tl.where(mvalid, rows // C, 0)
    rr = row0 + tl.arange(0, BLOCK_R)
    rvalid = rr < N
    ci_r = rr // C
    first = row0 // C  # chunks >= first hold rows of the block (the diagonal ones)
    n_blk = (tl.minimum(row0 + BLOCK_R, N) - 1) // C + 1  # chunks 0 .. last chunk of the block
    kb_base = kb_ptr + bk * NF * D
    kv_base = bk * N * D
    # this program's scratch: active chunk ids [NCH] and their log priors [NCH, BLOCK_R]
    sbase = (bk * tl.cdiv(N, BLOCK_R) + pid) * NCH
    ids_base = ids_ptr + sbase
    lpt_base = lpt_ptr + sbase * BLOCK_R

    mu = tl.zeros([BLOCK_R], tl.float32)
    if ESTIMATE:
        # routing-only pass: mean of log pbar over each position's selected past chunks
        slog = tl.zeros([BLOCK_R], tl.float32)
        nsel = tl.zeros([BLOCK_R], tl.int32)
        for t0 in range(0, n_blk, BLOCK_NC):
            ccols = t0 + tl.arange(0, BLOCK_NC)
            pbar = _route_tile(q, tau, ci_m, kb_base, ccols, NF, D, dcols, dmask, xs, inv_g,
                               BLOCK_G, BLOCK_R, BLOCK_NC, DOT_PREC)
            sel = pbar > 0
            slog += tl.sum(tl.where(sel, tl.log(tl.where(sel, pbar, 1.0)), 0.0), 1)
            nsel += tl.sum(sel.to(tl.int32), 1)
        mu = slog / tl.maximum(nsel, 1).to(tl.float32)
        tl.store(mu_ptr + bk * N + rr, mu, mask=rvalid)

    # phase 1: route every chunk of the block; write the compact list of the chunks some
    # position attends (in order) and their log priors (natural log, -inf where a position
    # does not attend the chunk) to the scratch
    count = tl.zeros([BLOCK_R], tl.int32)
    n_tot = 0
    for t0 in range(0, n_blk, BLOCK_NC):
        ccols = t0 + tl.arange(0, BLOCK_NC)
        pbar = _route_tile(q, tau, ci_m, kb_base, ccols, NF, D, dcols, dmask, xs, inv_g,
                           BLOCK_G, BLOCK_R, BLOCK_NC, DOT_PREC)
        lp, sel = _log_prior(pbar, ccols, ci_r, rvalid, mu, inv_sigma, ESTIMATE)
        count += tl.sum(sel.to(tl.int32), 1)
        act = lp > float("-inf")
        active = tl.max(act.to(tl.int32), 0)  # [BLOCK_NC]
        slot = n_tot + tl.cumsum(active, 0) - 1
        tl.store(ids_base + slot, ccols, mask=active > 0)
        tl.store(lpt_base + slot[None, :] * BLOCK_R + tl.arange(0, BLOCK_R)[:, None], lp,
                 mask=(active > 0)[None, :])
        n_tot += tl.sum(active, 0)
    tl.debug_barrier()  # the scratch is read back by other threads of the program

    # phase 2: attention over the listed chunks; those before the block need no causal mask
    n_tail = n_blk - first  # the diagonal chunks, always listed, at the end of the list
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, BLOCK_D], tl.float32)
    for t in range(0, n_tot - n_tail):
        c = tl.load(ids_base + t)
        lp2 = tl.load(lpt_base + t * BLOCK_R + rl, mask=mvalid, other=float("-inf")) * _LOG2E
        if ONE_SUB:
            m_i, l_i, acc = _fwd_tile_past(q, k_ptr, v_ptr, kv_base, c, 0, C, D, lp2, m_i, l_i, acc, qk2,
                                           dcols, dmask, BLOCK_N, MASK_K, DOT_PREC)
        else:
            for j0 in range(0, C, BLOCK_N):
                m_i, l_i, acc = _fwd_tile_past(q, k_ptr, v_ptr, kv_base, c, j0, C, D, lp2, m_i, l_i, acc,
                                               qk2, dcols, dmask, BLOCK_N, MASK_K, DOT_PREC)
    for t in range(n_tot - n_tail, n_tot):
        c = tl.load(ids_base + t)
        lp2 = tl.load(lpt_base + t * BLOCK_R + rl, mask=mvalid, other=float("-inf")) * _LOG2E
        act_m = (lp2 > float("-inf")) & mvalid
        for j0 in range(0, C, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, k_ptr, v_ptr, kv_base, c, j0, C, N, D, rows, lp2, act_m,
                                      m_i, l_i, acc, qk2, dcols, dmask, BLOCK_N, DOT_PREC)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + qrow[:, None] * D + dcols[None, :], out.to(o_ptr.dtype.element_ty), mask=qmask)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("inf"))
    tl.store(lse_ptr + qrow, lse, mask=mvalid)
    tl.store(cnt_ptr + bk * N + rr, count, mask=rvalid)


# ----------------------------------------------------------------------------------------------
# backward: dq, Delta, d pbar, activity flags


@triton.jit(do_not_specialize=["Hkv", "G", "N", "NF", "NCH", "NQB", "C", "xs", "qk2", "scale",
                               "inv_g", "inv_sigma"])
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kb_ptr, tau_ptr, o_ptr, do_ptr, lse_ptr, mu_ptr,
    dq_ptr, delta_ptr, dpbar_ptr, flag_ptr, wid_ptr, wlp_ptr,
    Hkv, G, N, NF, NCH, NQB, C, D, xs, qk2, scale, inv_g, inv_sigma,
    ESTIMATE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_NC: tl.constexpr, BLOCK_D: tl.constexpr, ONE_SUB: tl.constexpr, LIST_WALK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Inductor passes Python floats as fp64: float32 before they meet loop-carried values
    xs = tl.cast(xs, tl.float32)
    qk2 = tl.cast(qk2, tl.float32)
    scale = tl.cast(scale, tl.float32)
    inv_g = tl.cast(inv_g, tl.float32)
    inv_sigma = tl.cast(inv_sigma, tl.float32)
    pid = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)
    row0 = pid * BLOCK_R
    M: tl.constexpr = BLOCK_G * BLOCK_R
    mm = tl.arange(0, M)
    hh = mm // BLOCK_R
    rows = row0 + mm % BLOCK_R
    mvalid = (hh < G) & (rows < N)
    qrow = (bk * G + hh) * N + rows
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    qmask = mvalid[:, None] & dmask[None, :]
    q = tl.load(q_ptr + qrow[:, None] * D + dcols[None, :], mask=qmask, other=0.0)
    do = tl.load(do_ptr + qrow[:, None] * D + dcols[None, :], mask=qmask, other=0.0)
    o = tl.load(o_ptr + qrow[:, None] * D + dcols[None, :], mask=qmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + qrow, delta, mask=mvalid)
    tau = tl.load(tau_ptr + qrow, mask=mvalid, other=float("inf"))
    lse = tl.load(lse_ptr + qrow, mask=mvalid, other=0.0)
    ci_m = tl.where(mvalid, rows // C, 0)
    rr = row0 + tl.arange(0, BLOCK_R)
    rvalid = rr < N
    ci_r = rr // C
    n_blk = (tl.minimum(row0 + BLOCK_R, N) - 1) // C + 1
    kb_base = kb_ptr + bk * NF * D
    kv_base = bk * N * D
    if ESTIMATE:
        mu = tl.load(mu_ptr + bk * N + rr, mask=rvalid, other=0.0)
    else:
        mu = tl.zeros([BLOCK_R], tl.float32)
    dp_base = dpbar_ptr + (bk * N + rr)[:, None] * NF  # [BLOCK_R, 1]
    flag_base = flag_ptr + bk * NCH * NQB + pid
    # LIST_WALK scratch of this program: a routing tile's active chunk ids [BLOCK_NC], their log
    # priors and their d log pi, each [BLOCK_NC, BLOCK_R]
    wid = wid_ptr + (bk * NQB + pid) * BLOCK_NC
    wlp = wlp_ptr + (bk * NQB + pid) * BLOCK_NC * BLOCK_R * 2
    wdl = wlp + BLOCK_NC * BLOCK_R
    rl = tl.arange(0, BLOCK_R)
    rl_m = mm % BLOCK_R

    dq = tl.zeros([M, BLOCK_D], tl.float32)
    dsum = tl.zeros([BLOCK_R], tl.float32)
    nsel = tl.zeros([BLOCK_R], tl.int32)
    for t0 in range(0, n_blk, BLOCK_NC):
        ccols = t0 + tl.arange(0, BLOCK_NC)
        pbar = _route_tile(q, tau, ci_m, kb_base, ccols, NF, D, dcols, dmask, xs, inv_g,
                           BLOCK_G, BLOCK_R, BLOCK_NC, DOT_PREC)
        lp, sel = _log_prior(pbar, ccols, ci_r, rvalid, mu, inv_sigma, ESTIMATE)
        active = tl.max((lp > float("-inf")).to(tl.int32), 0)
        tl.store(flag_base + ccols.to(tl.int64) * NQB, active.to(tl.int8), mask=ccols < NCH)
        order = tl.cumsum(active, 0) - 1
        n_act = tl.sum(active, 0)
        dl = tl.zeros([BLOCK_R, BLOCK_NC], tl.float32)
        if LIST_WALK:
            tl.debug_barrier()  # the previous tile's lists have been read
            tl.store(wid + order, ccols, mask=active > 0)
            tl.store(wlp + order[None, :] * BLOCK_R + rl[:, None], lp, mask=(active > 0)[None, :])
            tl.debug_barrier()  # read back by other threads of the program
        for t in range(0, n_act):
            if LIST_WALK:
                c = tl.load(wid + t)
                lp2 = tl.load(wlp + t * BLOCK_R + rl_m, mask=mvalid, other=float("-inf")) * _LOG2E
            else:
                c = tl.sum(tl.where((active > 0) & (order == t), ccols, 0), 0)
                lp_c = tl.sum(tl.where(ccols[None, :] == c, lp, 0.0), 1)
                lp2 = _stack(lp_c, BLOCK_G, BLOCK_R) * _LOG2E
            act_m = (lp2 > float("-inf")) & mvalid
            dl_m = tl.zeros([M], tl.float32)
            if ONE_SUB:
                dq, dl_m = _dq_tile(q, do, k_ptr, v_ptr, kv_base, c, 0, C, N, D, rows, lp2, act_m, lse,
                                    delta, dq, dl_m, qk2, dcols, dmask, BLOCK_N, DOT_PREC)
            else:
                for j0 in range(0, C, BLOCK_N):
                    dq, dl_m = _dq_tile(q, do, k_ptr, v_ptr, kv_base, c, j0, C, N, D, rows, lp2, act_m, lse,
                                        delta, dq, dl_m, qk2, dcols, dmask, BLOCK_N, DOT_PREC)
            dl_r = _group_sum(dl_m, BLOCK_G, BLOCK_R)
            if LIST_WALK:
                tl.store(wdl + t * BLOCK_R + rl, dl_r)
            else:
                dl = tl.where(ccols[None, :] == c, dl_r[:, None], dl)
        if LIST_WALK:
            tl.debug_barrier()
            dl = tl.load(wdl + order[None, :] * BLOCK_R + rl[:, None], mask=(active > 0)[None, :], other=0.0)
        dl = tl.where(sel, dl, 0.0)  # the diagonal chunk's prior is a constant
        cm = rvalid[:, None] & (ccols[None, :] < NF)
        if ESTIMATE:
            dsum += tl.sum(dl, 1)
            nsel += tl.sum(sel.to(tl.int32), 1)
            tl.store(dp_base + ccols[None, :], dl, mask=cm)  # raw d log pi, finished below
        else:
            tl.store(dp_base + ccols[None, :], tl.where(sel, dl / tl.where(sel, pbar, 1.0), 0.0), mask=cm)
    # columns no tile reached (chunks after the block's last one) get 0
    zero = tl.zeros([BLOCK_R, BLOCK_NC], tl.float32)
    for t0 in range((n_blk + BLOCK_NC - 1) // BLOCK_NC * BLOCK_NC, NF, BLOCK_NC):
        ccols = t0 + tl.arange(0, BLOCK_NC)
        tl.store(dp_base + ccols[None, :], zero, mask=rvalid[:, None] & (ccols[None, :] < NF))
    if ESTIMATE:
        # d log pbar_c = (d log pi_c - mean over the selection of d log pi) / sigma
        tl.debug_barrier()
        dmean = dsum / tl.maximum(nsel, 1).to(tl.float32)
        for t0 in range(0, n_blk, BLOCK_NC):
            ccols = t0 + tl.arange(0, BLOCK_NC)
            pbar = _route_tile(q, tau, ci_m, kb_base, ccols, NF, D, dcols, dmask, xs, inv_g,
                               BLOCK_G, BLOCK_R, BLOCK_NC, DOT_PREC)
            sel = pbar > 0
            cm = rvalid[:, None] & (ccols[None, :] < NF)
            dl = tl.load(dp_base + ccols[None, :], mask=cm & sel, other=0.0)
            g = tl.where(sel, (dl - dmean[:, None]) * inv_sigma / tl.where(sel, pbar, 1.0), 0.0)
            tl.store(dp_base + ccols[None, :], g, mask=cm)
    tl.store(dq_ptr + qrow[:, None] * D + dcols[None, :], dq * scale, mask=qmask)


# ----------------------------------------------------------------------------------------------
# backward: dk, dv (one program per BLOCK_N keys of one chunk)


@triton.jit(do_not_specialize=["Hkv", "G", "N", "NF", "NCH", "NQB", "NSUB", "C", "xs", "qk2",
                               "scale", "inv_g", "inv_sigma"])
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, kb_ptr, tau_ptr, do_ptr, lse_ptr, delta_ptr, mu_ptr, flag_ptr, qbl_ptr,
    dk_ptr, dv_ptr,
    Hkv, G, N, NF, NCH, NQB, NSUB, C, D, xs, qk2, scale, inv_g, inv_sigma,
    ESTIMATE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, FLAG_T: tl.constexpr, LIST_WALK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Inductor passes Python floats as fp64: float32 before they meet loop-carried values
    xs = tl.cast(xs, tl.float32)
    qk2 = tl.cast(qk2, tl.float32)
    scale = tl.cast(scale, tl.float32)
    inv_g = tl.cast(inv_g, tl.float32)
    inv_sigma = tl.cast(inv_sigma, tl.float32)
    pid = tl.program_id(0)
    bk = tl.program_id(1).to(tl.int64)
    c = pid // NSUB
    sub = pid % NSUB
    koff = sub * BLOCK_N + tl.arange(0, BLOCK_N)
    kpos = c * C + koff
    kvalid = (koff < C) & (kpos < N)
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < D
    kvo = bk * N * D + kpos[:, None].to(tl.int64) * D + dcols[None, :]
    kvm = kvalid[:, None] & dmask[None, :]
    k = tl.load(k_ptr + kvo, mask=kvm, other=0.0)
    v = tl.load(v_ptr + kvo, mask=kvm, other=0.0)
    # the chunk's summary as row 0 of a 16-row tile (a tensor-core dot needs >= 16 columns)
    kr = tl.arange(0, 16)
    kbt = tl.load(
        kb_ptr + (bk * NF + c) * D + kr[:, None] * 0 + dcols[None, :],
        mask=((kr == 0) & (c + kr * 0 < NF))[:, None] & dmask[None, :], other=0.0,
    )

    M: tl.constexpr = BLOCK_G * BLOCK_R
    mm = tl.arange(0, M)
    hh = mm // BLOCK_R
    rl = mm % BLOCK_R
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = (c * C + sub * BLOCK_N) // BLOCK_R  # first query block holding a row >= these keys
    fbase = flag_ptr + (bk * NCH + c) * NQB
    # LIST_WALK: each window's active query blocks go to this program's scratch first and the
    # walk loads them as scalars (as the forward's v2 walk does), instead of extracting each
    # index by a reduction inside the loop
    qbl_base = qbl_ptr + ((bk * NCH + c) * NSUB + sub) * FLAG_T
    for f0 in range(first, NQB, FLAG_T):
        fidx = f0 + tl.arange(0, FLAG_T)
        active = (tl.load(fbase + fidx, mask=fidx < NQB, other=0) != 0).to(tl.int32)
        order = tl.cumsum(active, 0) - 1
        n_act = tl.sum(active, 0)
        if LIST_WALK:
            tl.debug_barrier()  # the previous window's list has been read
            tl.store(qbl_base + order, fidx, mask=active > 0)
            tl.debug_barrier()  # read back by other threads of the program
        for t in range(0, n_act):
            if LIST_WALK:
                qb = tl.load(qbl_base + t)
            else:
                qb = tl.sum(tl.where((active > 0) & (order == t), fidx, 0), 0)
            row0 = qb * BLOCK_R
            rows = row0 + rl
            mvalid = (hh < G) & (rows < N)
            qrow = (bk * G + hh) * N + rows
            qmask = mvalid[:, None] & dmask[None, :]
            q = tl.load(q_ptr + qrow[:, None] * D + dcols[None, :], mask=qmask, other=0.0)
            do = tl.load(do_ptr + qrow[:, None] * D + dcols[None, :], mask=qmask, other=0.0)
            tau = tl.load(tau_ptr + qrow, mask=mvalid, other=float("inf"))
            lse = tl.load(lse_ptr + qrow, mask=mvalid, other=0.0)
            delta = tl.load(delta_ptr + qrow, mask=mvalid, other=0.0)
            ci_m = tl.where(mvalid, rows // C, 0)
            rr = row0 + tl.arange(0, BLOCK_R)
            rvalid = rr < N
            # routing of chunk c for the block's positions
            x = tl.dot(q, tl.trans(kbt), input_precision=DOT_PREC) * xs
            xc = tl.sum(tl.where(kr[None, :] == 0, x, 0.0), 1)
            sr = tl.maximum(xc - tau, 0.0)
            pr = tl.where(c < ci_m, sr * sr, 0.0)
            pbar = _group_sum(pr, BLOCK_G, BLOCK_R) * inv_g
            sel = pbar > 0
            lg = tl.log(tl.where(sel, pbar, 1.0))
            if ESTIMATE:
                mu = tl.load(mu_ptr + bk * N + rr, mask=rvalid, other=0.0)
                lg = (lg - mu) * inv_sigma
            lp = tl.where(sel, lg, tl.where(((rr // C) == c) & rvalid, 0.0, float("-inf")))
            lp2 = _stack(lp, BLOCK_G, BLOCK_R) * _LOG2E
            act_m = (lp2 > float("-inf")) & mvalid
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk2 + lp2[:, None]
            allowed = act_m[:, None] & kvalid[None, :] & (kpos[None, :] <= rows[:, None])
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    tl.store(dk_ptr + kvo, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kvm)
    tl.store(dv_ptr + kvo, dv.to(dv_ptr.dtype.element_ty), mask=kvm)


# ----------------------------------------------------------------------------------------------
# host side


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


_CONFIG_KEYS = ("BLOCK_R", "BLOCK_N", "BLOCK_NC", "FLAG_T", "LIST_WALK", "num_warps", "num_stages")


def attn_config(G: int, D: int, C: int, device: torch.device, *, dtype: torch.dtype = torch.bfloat16,
                backward: bool = False, blocks: dict | None = None) -> dict:
    """Tile configuration of the kernels, as a dict of their meta-parameters.

    * ``BLOCK_G = next_pow2(G)`` heads and ``BLOCK_R`` positions per program (``M = BLOCK_G *
      BLOCK_R`` stacked rows, at least 16; default ``M = 64`` on the GPU: one warpgroup's wgmma
      rows). The dq and dk/dv kernels must share ``BLOCK_R`` (the flags are per query block).
    * ``BLOCK_N`` keys per K/V sub-tile (``min(next_pow2(C), 64)``, 32 for rows of 512 bytes,
      16 beyond: bf16 D = 256, float32 D >= 128): a chunk is loaded in ``ceil(C / BLOCK_N)``
      sub-tiles (and the dk/dv grid has that many programs per chunk).
    * ``BLOCK_NC`` chunks per routing tile (32 on the GPU, 16 on the CPU interpreter).
    * ``FLAG_T`` query blocks per flag vector of the dk/dv walk.
    * ``LIST_WALK`` (backward kernels, default False): the dq kernel writes each routing tile's
      active chunks (ids, log priors) and the dk/dv kernel each flag window's active query blocks
      to a scratch, and both walk them with scalar loads (the forward's v2 scheme) instead of
      extracting each index by a reduction. An experiment awaiting its GPU timing.
    * ``num_warps``, ``num_stages``.

    ``blocks`` overrides any of these keys (``BLOCK_R``, ``BLOCK_N``, ``BLOCK_NC``, ``FLAG_T``,
    ``num_warps``, ``num_stages``). The GPU defaults compile for sm_90 with wgmma, at most a
    few bytes of register spills for bf16/fp16 at D <= 128 (ptxas, both prior modes), and fit
    shared memory up to D = 256 (float32 included); they are untimed starting points.
    """
    bd = _block_d(D)
    block_g = triton.next_power_of_2(G)
    row_bytes = bd * dtype.itemsize
    cap = 64 if row_bytes <= 256 else (32 if row_bytes <= 512 else 16)
    cfg = {
        "BLOCK_R": max(1, 64 // block_g),
        "BLOCK_N": max(16, min(triton.next_power_of_2(C), cap)),
        "BLOCK_NC": 32,
        "FLAG_T": 64,
        "LIST_WALK": False,
        "num_warps": 4 if bd <= 128 else 8,
        "num_stages": 3 if bd <= 64 and not backward else 2,
    }
    if device.type != "cuda":
        cfg["BLOCK_NC"] = 16
        cfg["FLAG_T"] = 16
    if blocks:
        unknown = set(blocks) - set(_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown tile keys {sorted(unknown)}; expected some of {list(_CONFIG_KEYS)}")
        cfg.update(blocks)
    cfg["BLOCK_G"] = block_g
    for key in ("BLOCK_R", "BLOCK_N", "BLOCK_NC", "FLAG_T"):
        val = cfg[key]
        if not isinstance(val, int) or val < 1 or val & (val - 1):
            raise ValueError(f"{key} must be a power of two, got {val!r}")
    if block_g * cfg["BLOCK_R"] < 16 or cfg["BLOCK_N"] < 16 or cfg["BLOCK_NC"] < 16:
        raise ValueError(
            f"tiles too small for tl.dot: need BLOCK_G * BLOCK_R >= 16 (BLOCK_G = {block_g}, "
            f"BLOCK_R = {cfg['BLOCK_R']}), BLOCK_N >= 16 and BLOCK_NC >= 16, got {cfg}"
        )
    return cfg


def _prepare(q, k, v, kbar, tau, chunk_size, zscale, scale):
    q, k, v, kbar, tau = (t.contiguous() for t in (q, k, v, kbar, tau))
    B, Hq, N, D = q.shape
    Hkv, NF = k.shape[1], kbar.shape[2]
    consts = dict(xs=float(zscale) / 2.0, qk2=float(scale) / _LN2, inv_g=1.0 / (Hq // Hkv))
    return q, k, v, kbar, tau, B, Hq, Hkv, N, NF, D, Hq // Hkv, consts


def dash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kbar: torch.Tensor,
    tau: torch.Tensor,
    chunk_size: int,
    zscale: float,
    scale: float,
    *,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
    blocks: dict | None = None,
    outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DashAttention forward with in-kernel routing.

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]``; kbar: ``[B, Hkv, N // C, D]`` (all one
            dtype: float16, bfloat16 or float32; CUDA, or CPU under ``TRITON_INTERPRET=1``).
        tau: float32 ``[B, Hq, N]`` (:func:`flexsparse.kernels.router.router_tau` with the same
            ``zscale``). chunk_size: ``C``. zscale: ``gamma * scale`` of the router.
        scale: logit scale of the attention. estimate_diagonal, sigma: prior mode.
        blocks: tile overrides (see :func:`attn_config`).
        outs: optional preallocated contiguous ``(out, lse, mu, counts)`` as described below
            (every entry is written).

    Returns:
        ``(out, lse, mu, counts)``: ``out [B, Hq, N, D]`` in ``q.dtype``; ``lse`` float32
        ``[B, Hq, N]``, the log-sum-exp of each row's logits in base 2 (``log2 sum 2^(log2(e) S)``);
        ``mu`` float32 ``[B, Hkv, N]`` (mean log pbar over the selected past chunks, estimate
        mode only; an empty tensor otherwise); ``counts`` int32 ``[B, Hkv, N]``, selected past
        chunks per position.
    """
    q, k, v, kbar, tau, B, Hq, Hkv, N, NF, D, G, cs = _prepare(q, k, v, kbar, tau, chunk_size, zscale, scale)
    dev = q.device
    if outs is None:
        out = torch.empty_like(q)
        lse = torch.empty(B, Hq, N, dtype=torch.float32, device=dev)
        mu = torch.empty(B, Hkv, N if estimate_diagonal else 0, dtype=torch.float32, device=dev)
        counts = torch.empty(B, Hkv, N, dtype=torch.int32, device=dev)
    else:
        out, lse, mu, counts = outs
    if q.numel() == 0:
        return out, lse, mu, counts
    cfg = attn_config(G, D, chunk_size, dev, dtype=q.dtype, blocks=blocks)
    nqb = triton.cdiv(N, cfg["BLOCK_R"])
    nch = triton.cdiv(N, chunk_size)
    # per-program scratch of the chunk lists (int32) and log priors (float32 x BLOCK_R)
    ids = torch.empty(B * Hkv * nqb * nch, dtype=torch.int32, device=dev)
    lpt = torch.empty(B * Hkv * nqb * nch * cfg["BLOCK_R"], dtype=torch.float32, device=dev)
    # without estimate_diagonal the kernel never touches mu_ptr: a stand-in of its own (under
    # torch.compile an output passed twice to one launch may come back unwritten)
    mu_arg = mu if estimate_diagonal else torch.empty(1, dtype=torch.float32, device=dev)
    _fwd_kernel[(nqb, B * Hkv)](
        q, k, v, kbar, tau, out, lse, mu_arg, counts, ids, lpt,
        Hkv, G, N, NF, nch, chunk_size, D, cs["xs"], cs["qk2"], cs["inv_g"], 1.0 / float(sigma),
        ESTIMATE=bool(estimate_diagonal), BLOCK_G=cfg["BLOCK_G"], BLOCK_R=cfg["BLOCK_R"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_NC=cfg["BLOCK_NC"], BLOCK_D=_block_d(D),
        ONE_SUB=chunk_size <= cfg["BLOCK_N"], MASK_K=chunk_size % cfg["BLOCK_N"] != 0,
        DOT_PREC=_dot_prec(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse, mu, counts


def dash_attn_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kbar: torch.Tensor,
    tau: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mu: torch.Tensor,
    dout: torch.Tensor,
    chunk_size: int,
    zscale: float,
    scale: float,
    *,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
    blocks: dict | None = None,
    outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`dash_attn_forward` through stage 2 (the router's Jacobian is
    :func:`flexsparse.kernels.router.router_backward`, fed with the ``dpbar`` returned here).

    Args:
        q, k, v, kbar, tau, chunk_size, zscale, scale, estimate_diagonal, sigma: as in the forward.
        out, lse, mu: the forward's outputs. dout: ``[B, Hq, N, D]`` gradient of ``out``.
        blocks: tile overrides (see :func:`attn_config`, ``backward=True``).
        outs: optional preallocated contiguous ``(dq, dk, dv, dpbar)`` as described below
            (every entry is written).

    Returns:
        ``(dq, dk, dv, dpbar)``: ``dq`` float32 ``[B, Hq, N, D]`` (the attention part, without
        the router's share); ``dk, dv [B, Hkv, N, D]`` in ``k.dtype`` (the attention part; the
        summaries add theirs through ``d kbar``); ``dpbar`` float32 ``[B, Hkv, N, N // C]``,
        the gradient of the group-mean router probabilities (0 off the selection).
    """
    q, k, v, kbar, tau, B, Hq, Hkv, N, NF, D, G, cs = _prepare(q, k, v, kbar, tau, chunk_size, zscale, scale)
    out, lse, dout = out.contiguous(), lse.contiguous(), dout.contiguous()
    dev = q.device
    C = chunk_size
    NCH = triton.cdiv(N, C)
    if outs is None:
        dq = torch.empty(B, Hq, N, D, dtype=torch.float32, device=dev)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dpbar = torch.empty(B, Hkv, N, NF, dtype=torch.float32, device=dev)
    else:
        dq, dk, dv, dpbar = outs
    if q.numel() == 0:
        return dq, dk, dv, dpbar
    cfg = attn_config(G, D, C, dev, dtype=q.dtype, backward=True, blocks=blocks)
    BR, BN = cfg["BLOCK_R"], cfg["BLOCK_N"]
    NQB = triton.cdiv(N, BR)
    delta = torch.empty(B, Hq, N, dtype=torch.float32, device=dev)
    flags = torch.empty(B, Hkv, NCH, NQB, dtype=torch.int8, device=dev)
    mu_arg = mu.contiguous() if estimate_diagonal else torch.empty(1, dtype=torch.float32, device=dev)
    common = dict(
        ESTIMATE=bool(estimate_diagonal), BLOCK_G=cfg["BLOCK_G"], BLOCK_R=BR, BLOCK_N=BN,
        BLOCK_D=_block_d(D), DOT_PREC=_dot_prec(q.dtype), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    inv_sigma = 1.0 / float(sigma)
    walk = bool(cfg["LIST_WALK"])
    BNC = cfg["BLOCK_NC"]
    wid = torch.empty(B * Hkv * NQB * BNC if walk else 1, dtype=torch.int32, device=dev)
    wlp = torch.empty(B * Hkv * NQB * BNC * BR * 2 if walk else 1, dtype=torch.float32, device=dev)
    _bwd_dq_kernel[(NQB, B * Hkv)](
        q, k, v, kbar, tau, out, dout, lse, mu_arg, dq, delta, dpbar, flags, wid, wlp,
        Hkv, G, N, NF, NCH, NQB, C, D, cs["xs"], cs["qk2"], float(scale), cs["inv_g"], inv_sigma,
        BLOCK_NC=BNC, ONE_SUB=C <= BN, LIST_WALK=walk, **common,
    )
    nsub = triton.cdiv(C, BN)
    qbl = torch.empty(B * Hkv * NCH * nsub * cfg["FLAG_T"] if walk else 1, dtype=torch.int32, device=dev)
    _bwd_dkdv_kernel[(NCH * nsub, B * Hkv)](
        q, k, v, kbar, tau, dout, lse, delta, mu_arg, flags, qbl, dk, dv,
        Hkv, G, N, NF, NCH, NQB, nsub, C, D, cs["xs"], cs["qk2"], float(scale), cs["inv_g"], inv_sigma,
        FLAG_T=cfg["FLAG_T"], LIST_WALK=walk, **common,
    )
    return dq, dk, dv, dpbar
