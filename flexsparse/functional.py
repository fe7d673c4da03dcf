"""Functional ops: hash-sparse, query/key-drop and DashAttention causal attention.

``backend``:

* ``"reference"``: the dense oracle of :mod:`flexsparse.reference` (any device, autograd,
  O(N^2) memory).
* ``"flex"``: reorder q/k/v (differentiable gathers), build the BlockMask with our Triton kernel,
  run FlexAttention (``torch.compile``-d on CUDA; eager on CPU, where FlexAttention is
  inference-only: inputs requiring grad raise), and gather the output back to original order.
  Never falls back silently.
* ``"auto"``: ``"flex"`` on CUDA; on CPU ``"flex"`` when no gradient is needed, else
  ``"reference"``. :func:`dash_attention` also has ``"triton"`` (the fused DashAttention
  kernels), which its ``"auto"`` prefers on CUDA (see there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from flexsparse import reference
from flexsparse.patterns.blockmask import _normalize_block_size
from flexsparse.patterns.dash import dash_attention_flex
from flexsparse.patterns.dash_triton import _DTYPES as _TRITON_DTYPES
from flexsparse.patterns.dash_triton import _MAX_HEAD_DIM as _TRITON_MAX_HEAD_DIM
from flexsparse.patterns.dash_triton import dash_attention_triton
from flexsparse.patterns.drop import drop_block_mask
from flexsparse.patterns.hash import hash_block_mask
from flexsparse.patterns.permuted import PermutedBlockMask
from flexsparse.reference import _check_chunk_size, _check_device, _check_gamma_sigma, _check_per_token, _check_qkv, _check_w

__all__ = ["dash_attention", "hash_sparse_attention", "qk_sparse_attention"]

_BACKENDS = ("auto", "flex", "reference")
_compiled = None


def _compiled_flex():
    global _compiled
    if _compiled is None:
        # static shapes: with dynamic ones Inductor cannot prove the lengths are multiples of the
        # block, checks bounds in every block and ran 1.5x slower on the H100 (hash, 16k)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _flex(*args, **kwargs):
    """FlexAttention, compiled on CUDA. Each new (length, capacity) signature compiles once;
    up to 64 of them are kept (dynamo's default limit is 8)."""
    if torch.compiler.is_compiling():  # inside the user's compiled model: traced there
        return flex_attention(*args, **kwargs)
    cfg = torch._dynamo.config
    limit = max(64, cfg.cache_size_limit)
    with cfg.patch(cache_size_limit=limit, accumulated_cache_size_limit=max(limit, cfg.accumulated_cache_size_limit)):
        return _compiled_flex()(*args, **kwargs)


def _needs_grad(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _choose_backend(backend: str, q: Tensor, *params: Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if q.is_cuda or not _needs_grad(q, *params):
            return "flex"
        return "reference"
    if backend == "flex" and not q.is_cuda and _needs_grad(q, *params):
        raise RuntimeError(
            "backend='flex' on CPU is inference-only (CPU FlexAttention does not support autograd): "
            "call under torch.no_grad(), detach the inputs, or use backend='reference' (or 'auto')"
        )
    return backend


def _dash_auto_backend(
    device_type: str, router: str, dtype: torch.dtype, head_dim: int, needs_grad: bool, flex_options: bool = False
) -> str:
    """What ``dash_attention(backend="auto")`` runs: ``"triton"`` on CUDA when the fused kernels
    support the call (entmax router, float16/bfloat16/float32, head dim <= 256) and no
    FlexAttention ``kernel_options`` were given (``flex_options``), else ``"flex"`` on CUDA; on
    other devices ``"flex"`` without gradients, else ``"reference"``."""
    if device_type == "cuda":
        if (router == "entmax" and dtype in _TRITON_DTYPES and head_dim <= _TRITON_MAX_HEAD_DIM
                and not flex_options):
            return "triton"
        return "flex"
    return "reference" if needs_grad else "flex"


def _prologue(q, k, v, a_name, a, b_name, b, kind, block_size, backend) -> tuple[str, int]:
    """Validate the inputs of a permuted-pattern op; return ``(backend, N)``."""
    B, Hq, Hkv, N, _, _ = _check_qkv(q, k, v, self_attention=True)
    _check_per_token(a_name, a, b_name, b, kind, B=B, Hq=Hq, Hkv=Hkv, N=N)
    _check_device(q, "q", **{a_name: a, b_name: b})
    _normalize_block_size(block_size)
    return _choose_backend(backend, q, k, v), N


def _run_flex(q: Tensor, k: Tensor, v: Tensor, pm: PermutedBlockMask, scale, kernel_options) -> Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_s, k_s, v_s = pm.permute_q(q), pm.permute_kv(k), pm.permute_kv(v)
    fn = _flex if q.is_cuda else flex_attention
    out = fn(
        q_s, k_s, v_s, block_mask=pm.block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=kernel_options,
    )
    return pm.unpermute_q(out)


def hash_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_buckets: Tensor,
    k_buckets: Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
    n_buckets: int | None = None,
    align: bool | None = None,
    block_size: int | tuple[int, int] = 128,
    kernel_options: dict | None = None,
    validate: bool | None = None,
) -> Tensor:
    """Causal attention restricted to keys in the query's bucket (SCFA hash-sparse).

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` (float, one dtype, ``Hq % Hkv == 0``).
        q_buckets: integer ``[B, Hq, N]``; k_buckets: integer ``[B, Hkv, N]``.
        scale: logit scale, default ``1 / sqrt(D)``.
        backend: ``"auto"``, ``"flex"`` or ``"reference"`` (see the module docstring).
        n_buckets: the number of buckets when every id lies in ``[0, n_buckets)``: enables the
            fast Triton counting sort and bucket alignment (see :func:`flexsparse.hash_block_mask`).
            Strongly recommended on the GPU.
        align: start each bucket at a block boundary (default: when cheap; needs ``n_buckets``).
        validate: check the bucket ids against ``n_buckets`` (one host synchronisation; default
            True except while compiling or capturing).
        block_size: FlexAttention block size (128 on the GPU; any positive size on CPU).
        kernel_options: passed to ``flex_attention`` (e.g. ``{"BLOCK_M": 64, "BLOCK_N": 64}``,
            needed for the backward with 64-blocks on the GPU).

    Returns:
        ``[B, Hq, N, D]`` in ``q.dtype``; a query with no allowed key outputs 0.
    """
    backend, N = _prologue(q, k, v, "q_buckets", q_buckets, "k_buckets", k_buckets, "integer", block_size, backend)
    if backend == "reference" or N == 0:  # an empty sequence has no block mask
        return reference.hash_sparse_attention(q, k, v, q_buckets, k_buckets, scale=scale)
    pm = hash_block_mask(
        q_buckets, k_buckets, n_buckets=n_buckets, align=align, block_size=block_size, validate=validate
    )
    return _run_flex(q, k, v, pm, scale, kernel_options)


def qk_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_keep: Tensor,
    k_keep: Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
    block_size: int | tuple[int, int] = 128,
    capacity: int | None = None,
    kernel_options: dict | None = None,
    validate: bool | None = None,
) -> Tensor:
    """Causal attention over kept queries and kept keys only (SCFA query/key drop).

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]``.
        q_keep: bool ``[B, Hq, N]``; k_keep: bool ``[B, Hkv, N]`` (True = kept).
        scale, backend, block_size, kernel_options: as in :func:`hash_sparse_attention`.
        capacity: slots of the compacted problem (see :func:`flexsparse.drop_block_mask`);
            default: the largest kept count, rounded up (one host synchronisation).
        validate: check a given ``capacity`` on the host (see :func:`flexsparse.drop_block_mask`).

    Returns:
        ``[B, Hq, N, D]``. Dropped queries output exactly 0; a kept query whose causal keys were
        all dropped outputs 0 (never NaN).
    """
    backend, N = _prologue(q, k, v, "q_keep", q_keep, "k_keep", k_keep, "bool", block_size, backend)
    if backend == "reference" or N == 0:
        return reference.qk_sparse_attention(q, k, v, q_keep, k_keep, scale=scale)
    pm = drop_block_mask(q_keep, k_keep, block_size=block_size, capacity=capacity, validate=validate)
    return _run_flex(q, k, v, pm, scale, kernel_options)


def dash_attention(
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
    backend: str = "auto",
    router: str = "entmax",
    top_k: int | None = None,
    q_block: int = 128,
    kernel_options: dict | None = None,
    return_stats: bool = False,
):
    """DashAttention: chunk summaries, an alpha-entmax router over earlier chunks, and a causal
    softmax over the selected chunks with the routing probabilities as a prior.

    Stage 0: ``kbar = chunk_summaries(k, w, C)``; stage 1: 1.5-entmax of
    ``gamma * scale * q . kbar`` over the chunks before each query's own, averaged over each GQA
    group; stage 2: softmax over the selected chunks' keys (and the query's own chunk, causally)
    with logits ``+ log prior`` (see :func:`flexsparse.reference.dash_attention`, the definition).
    ``router="topk"`` swaps stage 1 for a hard top-k selection with no prior
    (:func:`flexsparse.reference.dash_topk_attention`).

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` (one float dtype, ``Hq % Hkv == 0``);
            w: ``[Hkv, D]`` summary vectors (zeros = mean pooling).
        chunk_size: ``C`` (64 by default; the KV block of the flex backend).
        gamma: router logit multiplier, the sparsity knob (larger = fewer chunks).
        estimate_diagonal, sigma: prior mode (see :func:`flexsparse.reference.dash_log_prior`).
        scale: logit scale, default ``1 / sqrt(D)``.
        backend: ``"reference"`` (dense oracle), ``"flex"`` (Triton router and mask kernels +
            FlexAttention, :func:`flexsparse.patterns.dash.dash_attention_flex`), ``"triton"``
            (the fused token-level Triton kernels, :func:`flexsparse.patterns.dash_triton.dash_attention_triton`;
            entmax router, float16/bfloat16/float32, head dim <= 256; CUDA, or CPU under
            ``TRITON_INTERPRET=1``; traceable by ``torch.compile(fullgraph=True)``, forward and
            backward) or ``"auto"``: on CUDA ``"triton"`` when it supports the call, else
            ``"flex"`` (the top-k router, other dtypes or head dims); on CPU ``"flex"`` without
            gradients, else ``"reference"``. A backend named explicitly never falls back: it
            runs or raises.
        router: ``"entmax"`` or ``"topk"`` (needs ``top_k``).
        q_block, kernel_options: FlexAttention query block and kernel options (flex backend
            only: the triton backend, which ``"auto"`` picks on CUDA for the entmax router, does
            not use ``q_block`` and refuses ``kernel_options``; ``"auto"`` given
            ``kernel_options`` runs flex).
        return_stats: also return ``{"kept_fraction", "sparsity"}`` (0-d float32 tensors, no
            host synchronisation; see :func:`flexsparse.reference.dash_selection_stats`).

    Returns:
        ``[B, Hq, N, D]`` in ``q.dtype``, or ``(out, stats)``.
    """
    C = _check_chunk_size(chunk_size)
    _check_gamma_sigma(gamma, sigma)
    _, _, Hkv, _, _, D = _check_qkv(q, k, v, self_attention=True)
    _check_w(w, Hkv, D, k)
    if router not in ("entmax", "topk"):
        raise ValueError(f"router must be 'entmax' or 'topk', got {router!r}")
    if router == "topk" and top_k is None:
        raise ValueError("router='topk' needs top_k (past chunks kept per query)")
    if router == "entmax" and top_k is not None:
        raise ValueError("top_k is only used with router='topk'")
    if backend == "auto":
        backend = _dash_auto_backend(q.device.type, router, q.dtype, D, _needs_grad(q, k, v, w), kernel_options is not None)
    if backend == "triton":
        if router != "entmax":
            raise ValueError("backend='triton' implements the entmax router only (use 'flex' or 'reference' for top-k)")
        if kernel_options is not None:
            raise ValueError("kernel_options are FlexAttention options (backend='flex'); backend='triton' takes none")
        return dash_attention_triton(
            q, k, v, w, chunk_size=C, gamma=gamma, estimate_diagonal=estimate_diagonal, sigma=sigma, scale=scale,
            return_stats=return_stats,
        )
    backend = _choose_backend(backend, q, k, v, w)
    if backend == "reference":
        if router == "topk":
            res = reference.dash_topk_attention(q, k, v, w, chunk_size=C, top_k=top_k, scale=scale, return_aux=return_stats)
        else:
            res = reference.dash_attention(
                q, k, v, w, chunk_size=C, gamma=gamma, estimate_diagonal=estimate_diagonal, sigma=sigma, scale=scale,
                return_aux=return_stats,
            )
        if not return_stats:
            return res
        out, aux = res
        return out, {"kept_fraction": aux["kept_fraction"], "sparsity": aux["sparsity"]}
    return dash_attention_flex(
        q, k, v, w, chunk_size=C, gamma=gamma, estimate_diagonal=estimate_diagonal, sigma=sigma, scale=scale,
        router=router, top_k=top_k, q_block=q_block, kernel_options=kernel_options, return_stats=return_stats,
    )
