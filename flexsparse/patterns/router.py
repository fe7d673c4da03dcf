"""DashAttention stage 1: the 1.5-entmax chunk router, averaged over each GQA group.

For query head ``h``, row ``i`` (in chunk ``c_i = i // C``) and complete chunk ``c < c_i``::

    z = gamma * scale * q[b, h, i] . kbar[b, h // G, c]
    p = 1.5-entmax(z) = (z / 2 - tau)_+^2,  tau such that sum_{c < c_i} p = 1
    pbar[b, g, i, c] = mean of p over the G query heads of KV head g

``kbar [B, Hkv, N // C, D]`` are the chunk summaries (``reference.chunk_summaries``: cheap and
differentiable, so they stay in PyTorch). Rows of chunk 0 have no past chunk: ``p = 0`` and
``tau = +inf``. Selection and prior follow from ``pbar`` (``reference.dash_log_prior``).

Two implementations:

* ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): :mod:`flexsparse.kernels.router`.
  The ``[N, nF]`` score matrix is never stored: ``tau`` is solved by recomputing scores tile by
  tile, ``pbar`` is written once, and the backward recomputes scores and the entmax Jacobian
  ``dz = s g - s (sum s g) / (sum s)`` (``s = sqrt(p)``, ``g = dpbar / G``) in two kernels without
  atomics. ``tau`` (float32 ``[B, Hq, N]``) is what later kernels keep: ``p`` is recomputed from
  ``tau`` and ``kbar`` wherever it is needed.
* ``"torch"``: the reference math (``reference.entmax15``), differentiable by autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flexsparse.patterns.blockmask import _choose_impl
from flexsparse.reference import _check_chunk_size, _check_gamma_sigma, _expand_heads, _fmt, _shape, entmax15

__all__ = ["entmax_router", "router_tau"]

# Solver passes after the max pass (bisection alone closes a bracket of width 1 in ~22).
_MAX_ITER = 40
_MAX_HEAD_DIM = 256
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# input checks


def _check_router_inputs(q, kbar, chunk_size) -> tuple[int, int, int, int, int, int, int]:
    """Validate ``q [B, Hq, N, D]``, ``kbar [B, Hkv, N // C, D]``; return ``(C, B, Hq, Hkv, N, nF, D)``."""
    C = _check_chunk_size(chunk_size)
    if not isinstance(q, Tensor) or not q.dtype.is_floating_point or q.dim() != 4:
        raise ValueError(f"q must be a 4-D floating-point tensor of shape [B, Hq, N, D], got {_shape(q)}")
    B, Hq, N, D = q.shape
    nF = N // C
    if (
        not isinstance(kbar, Tensor)
        or not kbar.dtype.is_floating_point
        or kbar.dim() != 4
        or kbar.shape[0] != B
        or kbar.shape[2] != nF
        or kbar.shape[3] != D
    ):
        raise ValueError(
            f"kbar must be a floating-point tensor of shape {_fmt('B, Hkv, N // C, D', [B, '?', nF, D])} "
            f"(q is [B, Hq, N, D] = {list(q.shape)}, chunk_size C = {C}), got {_shape(kbar)}"
        )
    Hkv = kbar.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"the number of query heads Hq = {Hq} must be a multiple of the number of KV heads "
            f"Hkv = {Hkv} (q is [B, Hq, N, D] = {list(q.shape)}, kbar is [B, Hkv, N // C, D] = "
            f"{list(kbar.shape)})"
        )
    if kbar.dtype != q.dtype:
        raise ValueError(f"q and kbar must share one dtype, got {q.dtype} and {kbar.dtype}")
    if kbar.device != q.device:
        raise ValueError(f"kbar must be on the same device as q ({q.device}), got {kbar.device}")
    return C, B, Hq, Hkv, N, nF, D


def _resolve(q: Tensor, kbar: Tensor, chunk_size, gamma, scale, impl: str):
    C, B, Hq, Hkv, N, nF, D = _check_router_inputs(q, kbar, chunk_size)
    _check_gamma_sigma(gamma)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    chosen = _choose_impl(impl, q.device)
    if chosen == "triton":
        problem = None
        if q.dtype not in _TRITON_DTYPES:
            problem = f"float16, bfloat16 or float32 inputs, got {q.dtype}"
        elif D > _MAX_HEAD_DIM:
            problem = f"head dim D <= {_MAX_HEAD_DIM}, got D = {D} (q is [B, Hq, N, D] = {list(q.shape)})"
        if problem is not None:
            if impl == "triton":
                raise ValueError(f"impl='triton' needs {problem}")
            chosen = "torch"
    return chosen, C, float(gamma) * float(scale)


# ----------------------------------------------------------------------------------------------
# torch implementations


def _past_mask(N: int, nF: int, C: int, device) -> Tensor:
    """Bool ``[N, nF]``: chunk ``c`` is strictly before row ``i``'s chunk."""
    return torch.arange(nF, device=device)[None, :] < (torch.arange(N, device=device) // C)[:, None]


def _torch_router(q: Tensor, kbar: Tensor, C: int, zscale: float) -> tuple[Tensor, Tensor]:
    """Reference math, differentiable: ``(pbar, tau)``; float32 (float64 for float64 inputs)."""
    B, Hq, N, _ = q.shape
    Hkv, nF = kbar.shape[1], kbar.shape[2]
    G = Hq // Hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qw, kw = q.to(work), kbar.to(work)
    z = torch.matmul(qw, _expand_heads(kw, G).transpose(-1, -2)) * zscale  # [B, Hq, N, nF]
    past = _past_mask(N, nF, C, q.device)
    p = entmax15(z, mask=past, dim=-1)
    pbar = p.reshape(B, Hkv, G, N, nF).mean(dim=2)
    # tau from the largest entry of each row (always in the support): x_max - sqrt(p_max).
    with torch.no_grad():
        if nF > 0:
            x = torch.where(past, z / 2, float("-inf"))
            x_max, arg = x.max(dim=-1, keepdim=True)
            tau = (x_max - p.gather(-1, arg).sqrt()).squeeze(-1)
            tau = torch.where(past.any(dim=-1), tau, float("inf"))
        else:
            tau = torch.full((B, Hq, N), float("inf"), dtype=work, device=q.device)
    return pbar, tau.to(torch.float32)


def _tau_twin(q: Tensor, kbar: Tensor, C: int, zscale: float, max_iter: int = _MAX_ITER) -> Tensor:
    """PyTorch twin of the Triton tau solver (same passes and updates, float32, dense scores)."""
    B, Hq, N, _ = q.shape
    Hkv, nF = kbar.shape[1], kbar.shape[2]
    f32 = torch.float32
    x = torch.matmul(q.to(f32), _expand_heads(kbar.to(f32), Hq // Hkv).transpose(-1, -2)) * (zscale / 2)
    ci = torch.arange(N, device=q.device) // C
    valid = _past_mask(N, nF, C, q.device).expand_as(x)
    inf = float("inf")
    m = torch.where(valid, x, -inf).amax(dim=-1) if nF > 0 else x.new_full((B, Hq, N), -inf)
    sx = torch.where(valid, x, 0.0).sum(dim=-1)
    has = (ci > 0).expand(B, Hq, N)
    n = ci.clamp(min=1).to(f32)
    rs = 1.0 / torch.sqrt(n)
    m = torch.where(has, m, 0.0)
    hi = m - rs
    lo = torch.minimum(torch.maximum(m - 1.0, sx / n - rs), hi)
    tol = 4e-7 * (m.abs() + 1.0)
    done = (hi - lo <= tol) | ~has
    tau = lo
    it = 0
    while bool((~done).any()) and it < max_iter:
        a = x - tau[..., None]
        pos = valid & (a > 0)
        ap = torch.where(pos, a, 0.0)
        a1, a2, cnt = ap.sum(-1), (ap * ap).sum(-1), pos.sum(-1).to(f32)
        min_in = torch.where(pos, a, inf).amin(-1)
        max_out = torch.where(valid & (a <= 0), a, -inf).amax(-1)
        f = a2 - 1.0
        disc = a1 * a1 - cnt * f
        has_root = disc >= 0
        den = a1 + torch.sqrt(disc.clamp(min=0.0))
        d = torch.where(den > 0, f / torch.where(den > 0, den, 1.0), lo - tau)
        piece = tau + d
        exact = has_root & (d >= max_out) & (d < min_in)
        left = f > 0
        newton = tau + f / torch.where(a1 > 0, 2.0 * a1, 1.0)
        lo_n = torch.where(left, torch.maximum(lo, newton), torch.where(has_root, torch.maximum(lo, piece), lo))
        hi_n = torch.where(left, torch.where(has_root, torch.minimum(hi, piece), hi), torch.minimum(hi, tau))
        hden = 4.0 * a1 * a1 - f * cnt
        halley = tau + 2.0 * f * a1 / torch.where(hden != 0, hden, 1.0)
        halley = torch.where(hden != 0, halley, lo_n - 1.0)
        cand = torch.where(has_root, piece, halley)
        inside = (cand >= lo_n) & (cand <= hi_n)
        cand = torch.where(inside, cand, 0.5 * (lo_n + hi_n))
        cand = torch.where(exact, piece, cand)
        finished = exact | (hi_n - lo_n <= tol)
        tau = torch.where(done, tau, cand)
        lo = torch.where(done, lo, lo_n)
        hi = torch.where(done, hi, hi_n)
        done = done | finished
        it += 1
    return torch.where(has, tau, inf)


# ----------------------------------------------------------------------------------------------
# Triton implementation


class _TritonRouter(torch.autograd.Function):
    """``(q, kbar) -> (pbar, tau)`` with the Triton kernels; ``tau`` carries no gradient.

    The kernels are reached through the registered ops of :mod:`flexsparse.ops` (direct launches
    in eager mode, ``torch.ops.flexsparse.router_*`` under ``torch.compile``, where Dynamo traces
    this Function's forward and backward into the graph)."""

    @staticmethod
    def forward(ctx, q: Tensor, kbar: Tensor, chunk_size: int, zscale: float):
        from flexsparse import ops

        tau = ops.router_tau(q, kbar, chunk_size, zscale, max_iter=_MAX_ITER)
        pbar = ops.router_pbar(q, kbar, tau, chunk_size, zscale)
        ctx.save_for_backward(q, kbar, tau)
        ctx.chunk_size = chunk_size
        ctx.zscale = zscale
        ctx.mark_non_differentiable(tau)
        return pbar, tau

    @staticmethod
    def backward(ctx, dpbar: Tensor | None, dtau: Tensor | None):
        from flexsparse import ops

        q, kbar, tau = ctx.saved_tensors
        if dpbar is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None
        dq, dkbar, _ = ops.router_backward(q, kbar, tau, dpbar, ctx.chunk_size, ctx.zscale)
        dq = dq if ctx.needs_input_grad[0] else None
        dkbar = dkbar.to(kbar.dtype) if ctx.needs_input_grad[1] else None
        return dq, dkbar, None, None


# ----------------------------------------------------------------------------------------------
# public API


def entmax_router(
    q: Tensor,
    kbar: Tensor,
    *,
    chunk_size: int,
    gamma: float = 1.0,
    scale: float | None = None,
    impl: str = "auto",
    return_tau: bool = False,
):
    """DashAttention stage-1 router: GQA-averaged 1.5-entmax over each row's past chunks.

    Args:
        q: ``[B, Hq, N, D]`` queries (float16/bfloat16/float32 for Triton; any float for torch).
        kbar: ``[B, Hkv, N // C, D]`` chunk summaries (``reference.chunk_summaries``), same dtype
            and device as ``q``; ``Hq % Hkv == 0``, query head ``h`` reads KV head ``h // G``.
        chunk_size: ``C >= 1``. gamma: router logit multiplier (larger = sparser).
        scale: logit scale, default ``1 / sqrt(D)``; ``z = gamma * scale * q . kbar``.
        impl: ``"triton"`` (CUDA, or CPU with ``TRITON_INTERPRET=1``; head dim ``D <= 256``),
            ``"torch"`` (reference math, autograd), or ``"auto"`` (Triton where it runs).
        return_tau: also return ``tau``.

    Returns:
        ``pbar`` float32 ``[B, Hkv, N, N // C]`` (float64 from the torch path for float64
        inputs): rows sum to 1 where ``i >= C``, rows of chunk 0 and entries ``c >= c_i`` are 0.
        Differentiable into ``q`` and ``kbar`` (gradients in their dtypes). With
        ``return_tau``: ``(pbar, tau)``, ``tau`` float32 ``[B, Hq, N]`` in ``z / 2`` units
        (``p = (z / 2 - tau)_+^2``), ``+inf`` on rows without a past chunk, no gradient.
    """
    chosen, C, zscale = _resolve(q, kbar, chunk_size, gamma, scale, impl)
    if chosen == "triton":
        pbar, tau = _TritonRouter.apply(q, kbar, C, zscale)
    else:
        pbar, tau = _torch_router(q, kbar, C, zscale)
    return (pbar, tau) if return_tau else pbar


def router_tau(
    q: Tensor,
    kbar: Tensor,
    *,
    chunk_size: int,
    gamma: float = 1.0,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """The router's 1.5-entmax threshold per (batch, query head, row), without ``pbar``.

    Later kernels recompute ``p = (gamma * scale * q . kbar / 2 - tau)_+^2`` from it over the
    chunks ``c < i // C``. ``impl="torch"`` runs a PyTorch twin of the Triton solver (same
    iteration, dense float32 scores).

    Args:
        q: ``[B, Hq, N, D]``; kbar: ``[B, Hkv, N // C, D]`` (same dtype and device).
        chunk_size, gamma, scale, impl: as in :func:`entmax_router`.

    Returns:
        float32 ``[B, Hq, N]`` (no gradient); ``+inf`` on rows without a past chunk.
    """
    chosen, C, zscale = _resolve(q, kbar, chunk_size, gamma, scale, impl)
    with torch.no_grad():
        if chosen == "triton":
            from flexsparse import ops

            return ops.router_tau(q.detach(), kbar.detach(), C, zscale, max_iter=_MAX_ITER)
        return _tau_twin(q.detach(), kbar.detach(), C, zscale)
