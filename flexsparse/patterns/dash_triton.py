"""DashAttention on the hand-written Triton kernel: exact token-level two-stage attention.

The function of :func:`flexsparse.reference.dash_attention`, computed as

* stage 0: chunk summaries ``kbar = reference.chunk_summaries(k, w, C)`` (PyTorch, autograd);
* stage 1: the router's threshold ``tau [B, Hq, N]`` (:func:`flexsparse.patterns.router.router_tau`,
  Triton); nothing else of the router is materialised in the forward;
* stage 2: :func:`flexsparse.kernels.dash_attn.dash_attn_forward`, which recomputes the
  selection and the prior from ``tau`` and ``kbar`` inside the kernel and runs the prior-biased
  online softmax over the selected chunks only.

Backward (:class:`_DashTritonFn`): the stage-2 kernels give ``dq, dk, dv`` and ``d pbar``;
:func:`flexsparse.kernels.router.router_backward` turns ``d pbar`` into the router's share of
``dq`` and into ``d kbar``, which autograd carries through ``chunk_summaries`` into ``k`` and ``w``.

Every kernel is reached through the registered ops of :mod:`flexsparse.ops`
(``dash_attn_forward``, ``dash_attn_backward``, ``router_tau``, ``router_backward``), so
``torch.compile(fullgraph=True)`` traces the whole path, forward and backward, into one graph
(Inductor inlines the Triton kernels on CUDA); in eager mode the ops launch the kernels directly.
The tile overrides ``blocks`` are eager only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flexsparse import reference
from flexsparse.patterns.blockmask import _choose_impl
from flexsparse.patterns.dash import dash_sparsity
from flexsparse.patterns.router import router_tau
from flexsparse.reference import _check_chunk_size, _check_gamma_sigma, _check_qkv, _check_w, _shape

__all__ = ["dash_attention_triton"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


class _DashTritonFn(torch.autograd.Function):
    """``(q, k, v, kbar, tau) -> (out, counts)``; gradients for ``q, k, v, kbar``.

    The kernels are reached through the registered ops of :mod:`flexsparse.ops` (direct launches
    in eager mode, ``torch.ops.flexsparse.dash_attn_*`` / ``router_backward`` under
    ``torch.compile``, where Dynamo traces this Function's forward and backward into one graph)."""

    @staticmethod
    def forward(ctx, q, k, v, kbar, tau, C, zscale, scale, estimate_diagonal, sigma, blocks):
        from flexsparse import ops

        out, lse, mu, counts = ops.dash_attn_forward(
            q, k, v, kbar, tau, C, zscale, scale,
            estimate_diagonal=estimate_diagonal, sigma=sigma, blocks=None if blocks is None else blocks.get("fwd"),
        )
        ctx.save_for_backward(q, k, v, kbar, tau, out, lse, mu)
        ctx.cfg = (C, zscale, scale, estimate_diagonal, sigma, None if blocks is None else blocks.get("bwd"))
        ctx.mark_non_differentiable(counts)
        return out, counts

    @staticmethod
    def backward(ctx, dout, dcounts):
        from flexsparse import ops

        q, k, v, kbar, tau, out, lse, mu = ctx.saved_tensors
        C, zscale, scale, estimate_diagonal, sigma, bwd_blocks = ctx.cfg
        nq, nk, nv, nkb = ctx.needs_input_grad[:4]
        if dout is None:
            return (None,) * 11
        dq, dk, dv, dpbar = ops.dash_attn_backward(
            q, k, v, kbar, tau, out, lse, mu, dout, C, zscale, scale,
            estimate_diagonal=estimate_diagonal, sigma=sigma, blocks=bwd_blocks,
        )
        dkbar = None
        if nq or nkb:
            # the router's share of dq in float32, summed with the attention part before rounding
            dq_router, dkbar, _ = ops.router_backward(q, kbar, tau, dpbar, C, zscale, dq_float32=True)
            dq += dq_router
            dkbar = dkbar.to(kbar.dtype) if nkb else None
        return (
            dq.to(q.dtype) if nq else None,
            dk if nk else None,
            dv if nv else None,
            dkbar,
            None, None, None, None, None, None, None,
        )


def dash_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    *,
    chunk_size: int = 64,
    gamma: float = 1.0,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
    scale: float | None = None,
    return_stats: bool = False,
    blocks: dict | None = None,
):
    """DashAttention with the fused Triton kernels: exactly :func:`flexsparse.reference.dash_attention`.

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` (one dtype: float16, bfloat16 or float32;
            ``Hq % Hkv == 0``, ``D <= 256``); w: ``[Hkv, D]`` summary vectors. CUDA tensors, or
            CPU tensors with ``TRITON_INTERPRET=1`` set before importing flexsparse.
        chunk_size: ``C``. gamma: router logit multiplier (larger = sparser).
        estimate_diagonal, sigma: prior mode, see :func:`flexsparse.reference.dash_log_prior`.
        scale: logit scale of router and attention, default ``1 / sqrt(D)``.
        return_stats: also return ``{"kept_fraction", "sparsity"}`` (see
            :func:`flexsparse.patterns.dash.dash_sparsity`), from per-row counts the forward
            kernel writes.
        blocks: tile overrides, ``{"fwd": {...}, "bwd": {...}}`` (see
            :func:`flexsparse.kernels.dash_attn.attn_config`); eager mode only (they are not
            arguments of the registered ops: ``ValueError`` under ``torch.compile``).

    Returns:
        ``[B, Hq, N, D]`` in ``q.dtype`` (differentiable in ``q, k, v, w``), or ``(out, stats)``.
    """
    C = _check_chunk_size(chunk_size)
    _check_gamma_sigma(gamma, sigma)
    B, Hq, Hkv, N, _, D = _check_qkv(q, k, v, self_attention=True)
    _check_w(w, Hkv, D, k)
    if q.dtype not in _DTYPES:
        raise ValueError(f"dash_attention_triton needs float16, bfloat16 or float32 q, k, v, got {q.dtype}")
    if D > _MAX_HEAD_DIM:
        raise ValueError(f"dash_attention_triton needs head dim D <= {_MAX_HEAD_DIM}, got q of shape {_shape(q)}")
    if blocks is not None and (not isinstance(blocks, dict) or set(blocks) - {"fwd", "bwd"}):
        raise ValueError(f"blocks must be a dict with keys 'fwd' and/or 'bwd', got {blocks!r}")
    _choose_impl("triton", q.device)  # raises unless CUDA or the interpreter
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    scale = float(scale)
    zscale = float(gamma) * scale

    if q.numel() == 0:
        out = q.new_zeros(q.shape) + 0 * (k.sum() + v.sum() + w.sum())  # keeps the graph connected
        if not return_stats:
            return out
        kept, sp = dash_sparsity(torch.zeros(B, Hkv, N, dtype=torch.int32, device=q.device), chunk_size=C)
        return out, {"kept_fraction": kept, "sparsity": sp}

    kbar = reference.chunk_summaries(k, w, C)
    tau = router_tau(q, kbar, chunk_size=C, gamma=gamma, scale=scale, impl="triton")
    out, counts = _DashTritonFn.apply(
        q, k, v, kbar, tau, C, zscale, scale, bool(estimate_diagonal), float(sigma), blocks
    )
    if not return_stats:
        return out
    kept, sp = dash_sparsity(counts, chunk_size=C)
    return out, {"kept_fraction": kept, "sparsity": sp}
