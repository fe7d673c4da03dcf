"""Dense reference oracles for every attention pattern in flexsparse.

Plain PyTorch, written for clarity rather than speed: every function materialises the full
``[B, Hq, N, M]`` score matrix. These are the ground truth that the fast paths (FlexAttention
block masks, Triton kernels) are tested against, usually computed in float64.

Conventions
-----------
* Layout ``[batch, heads, seq, dim]``. Queries ``q [B, Hq, N, D]``, keys and values
  ``k, v [B, Hkv, M, D]`` (``M = N`` for the causal self-attention patterns).
* GQA: ``Hq % Hkv == 0``; query head ``h`` uses KV head ``h // (Hq // Hkv)``.
* Causality is aligned at the start: query ``i`` may see key ``j`` iff ``i >= j``.
* Everything runs on any device (CPU included), supports autograd (no detach, no stop-gradient)
  and computes in the dtype of its inputs, so calling an oracle with bfloat16 inputs *is* the
  "plain PyTorch at low precision" baseline of the tolerance rule in ``flexsparse.testing``.
* A query row with no allowed key outputs exactly 0 and receives zero gradient; no NaN is ever
  produced, forward or backward.
* Invalid inputs raise ``ValueError`` naming the expected shape.

Patterns
--------
* hash-sparse (SCFA): ``same bucket AND causal``.
* query/key drop (SCFA): ``q kept AND k kept AND causal``; dropped queries output 0.
* DashAttention: chunk summaries (stage 0) -> 1.5-entmax router over strictly earlier complete
  chunks, averaged over each GQA group (stage 1) -> softmax over the selected chunks plus the
  diagonal chunk with an additive log-prior per chunk (stage 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "attention",
    "causal_mask",
    "chunk_summaries",
    "dash_attention",
    "dash_log_prior",
    "dash_router",
    "dash_selection_stats",
    "dash_topk_attention",
    "drop_mask",
    "entmax15",
    "hash_mask",
    "hash_sparse_attention",
    "qk_sparse_attention",
]

# In x = z/2 units, the entmax support always lies within 1 of the row maximum. Entries below
# max - 1 can never be in the support, so inside the sorted arithmetic they (and masked entries)
# are replaced by this finite value (relative to the row maximum); squares stay small even in fp16.
_ENTMAX_FLOOR = -3.0

# The paper's sparsity excludes the first 4096 query positions when the sequence is longer.
_SPARSITY_SKIP = 4096


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _fmt(names: str, values) -> str:
    """``"[B, Hq, N] = [2, 8, 100]"``; ``values`` may contain ``"?"`` for unconstrained dims."""
    return f"[{names}] = [{', '.join(str(v) for v in values)}]"


def _shape(t) -> str:
    if isinstance(t, Tensor):
        return f"{list(t.shape)} ({t.dtype}, {t.device})"
    return f"a {type(t).__name__}"


def _is_int_tensor(t) -> bool:
    return (
        isinstance(t, Tensor)
        and not t.dtype.is_floating_point
        and not t.dtype.is_complex
        and t.dtype != torch.bool
    )


def _check_device(ref: Tensor, ref_name: str, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}"
            )


def _check_float(name: str, t, expected) -> None:
    """``expected``: the expected shape as a string, or a callable building it (called only on
    failure: formatting sizes is host work that breaks graphs with symbolic sizes)."""
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        exp = expected() if callable(expected) else expected
        raise ValueError(f"{name} must be a floating-point tensor of shape {exp}, got {_shape(t)}")


def _check_qkv(q, k, v, *, self_attention: bool) -> tuple[int, int, int, int, int, int]:
    """Validate ``q [B,Hq,N,D]``, ``k, v [B,Hkv,M,D]``; return ``(B, Hq, Hkv, N, M, D)``.

    Error messages are built only on failure (no string work on the success path, which runs
    inside ``torch.compile`` graphs)."""
    _check_float("q", q, "[B, Hq, N, D]")
    if q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor of shape [B, Hq, N, D], got {_shape(q)}")
    B, Hq, N, D = q.shape
    kv_len = "N" if self_attention else "M"

    def exp_k():
        return _fmt(f"B, Hkv, {kv_len}, D", [B, "?", N if self_attention else "?", D])

    _check_float("k", k, exp_k)
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D or (self_attention and k.shape[2] != N):
        raise ValueError(
            f"k must be a tensor of shape {exp_k()} (q is [B, Hq, N, D] = {list(q.shape)}), "
            f"got {_shape(k)}"
        )
    Hkv, M = k.shape[1], k.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"the number of query heads Hq = {Hq} must be a multiple of the number of KV heads "
            f"Hkv = {Hkv} (q is [B, Hq, N, D] = {list(q.shape)}, k is [B, Hkv, {kv_len}, D] = "
            f"{list(k.shape)})"
        )
    _check_float("v", v, lambda: _fmt(f"B, Hkv, {kv_len}, D", list(k.shape)))
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"v must have the shape of k, [B, Hkv, {kv_len}, D] = {list(k.shape)}, got {_shape(v)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_device(q, "q", k=k, v=v)
    return B, Hq, Hkv, N, M, D


def _check_broadcastable(name: str, t: Tensor, target: tuple[int, ...], names: str) -> None:
    try:
        ok = t.dim() <= len(target) and tuple(torch.broadcast_shapes(t.shape, target)) == tuple(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be broadcastable to {_fmt(names, target)}, got {_shape(t)}")


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return chunk_size


def _expand_heads(t: Tensor, groups: int) -> Tensor:
    """``[B, Hkv, ...] -> [B, Hkv * groups, ...]``: query head h reads KV head h // groups."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


# --------------------------------------------------------------------------------------------
# dense attention
# --------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    scale: float | None = None,
) -> Tensor:
    """Dense softmax attention with an optional boolean mask and additive bias.

    ``out[b,h,i] = sum_j softmax_j(scale * q[b,h,i].k[b,g(h),j] + bias[b,h,i,j] | mask) v[b,g(h),j]``
    with ``g(h) = h // (Hq // Hkv)``.

    Args:
        q: ``[B, Hq, N, D]`` floating point.
        k, v: ``[B, Hkv, M, D]``, same dtype and device as ``q``; ``Hq % Hkv == 0``.
        mask: bool, broadcastable to ``[B, Hq, N, M]``; True = may attend. None = everything.
        bias: floating point, broadcastable to ``[B, Hq, N, M]``, added to the scaled logits
            (cast to ``q.dtype``); may contain ``-inf``.
        scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, Hq, N, D]`` in ``q.dtype``. A row with no allowed key (or only ``-inf`` logits)
        is exactly 0 and passes zero gradient, never NaN.
    """
    B, Hq, Hkv, N, M, D = _check_qkv(q, k, v, self_attention=False)
    target = (B, Hq, N, M)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor broadcastable to {_fmt('B, Hq, N, M', target)}, "
                f"got {_shape(mask)}"
            )
        _check_broadcastable("mask", mask, target, "B, Hq, N, M")
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.dtype.is_floating_point:
            raise ValueError(
                f"bias must be a floating-point tensor broadcastable to {_fmt('B, Hq, N, M', target)}, "
                f"got {_shape(bias)}"
            )
        _check_broadcastable("bias", bias, target, "B, Hq, N, M")
    _check_device(q, "q", mask=mask, bias=bias)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    groups = Hq // Hkv
    k_full = _expand_heads(k, groups)  # [B, Hq, M, D]
    v_full = _expand_heads(v, groups)

    logits = torch.matmul(q, k_full.transpose(-1, -2)) * scale  # [B, Hq, N, M]
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    if mask is not None:
        logits = torch.where(mask, logits, float("-inf"))

    # Safe softmax: shift by the row maximum (replaced by 0 on rows that are entirely -inf),
    # exponentiate, and divide by the row sum (replaced by 1 where it is 0). Rows without any
    # allowed key therefore give p = 0 and zero gradient instead of 0/0.
    if M > 0:
        row_max = logits.amax(dim=-1, keepdim=True)
    else:
        row_max = logits.new_zeros(B, Hq, N, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    e = torch.exp(logits - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(denom > 0, denom, 1.0)
    return torch.matmul(probs, v_full)


def causal_mask(N: int, M: int | None = None, device: str | torch.device | None = None) -> Tensor:
    """Bool ``[N, M]`` (``M`` defaults to ``N``): ``mask[i, j] = i >= j`` (aligned at the start)."""
    if M is None:
        M = N
    for name, val in (("N", N), ("M", M)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {val!r}")
    q_pos = torch.arange(N, device=device)
    k_pos = torch.arange(M, device=device)
    return q_pos[:, None] >= k_pos[None, :]


# --------------------------------------------------------------------------------------------
# SCFA: hash-sparse and query/key drop
# --------------------------------------------------------------------------------------------


def _check_per_token(
    q_name: str,
    q_t,
    k_name: str,
    k_t,
    kind: str,
    *,
    B: int | None = None,
    Hq: int | None = None,
    Hkv: int | None = None,
    N: int | None = None,
) -> tuple[int, int, int, int]:
    """Validate a pair of per-token tensors ``[B, Hq, N]`` / ``[B, Hkv, N]``."""
    is_kind = _is_int_tensor if kind == "integer" else (lambda t: isinstance(t, Tensor) and t.dtype == torch.bool)

    def expected(heads_name, heads, b, n):
        return f"a{'n' if kind == 'integer' else ''} {kind} tensor of shape " + _fmt(
            f"B, {heads_name}, N", ["?" if x is None else x for x in (b, heads, n)]
        )

    if not is_kind(q_t) or q_t.dim() != 3 or (
        (B is not None and q_t.shape[0] != B)
        or (Hq is not None and q_t.shape[1] != Hq)
        or (N is not None and q_t.shape[2] != N)
    ):
        raise ValueError(f"{q_name} must be {expected('Hq', Hq, B, N)}, got {_shape(q_t)}")
    B, Hq, N = q_t.shape
    if not is_kind(k_t) or k_t.dim() != 3 or k_t.shape[0] != B or k_t.shape[2] != N or (
        Hkv is not None and k_t.shape[1] != Hkv
    ):
        raise ValueError(f"{k_name} must be {expected('Hkv', Hkv, B, N)}, got {_shape(k_t)}")
    Hkv = k_t.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"{q_name} has Hq = {Hq} heads, which must be a multiple of the Hkv = {Hkv} heads "
            f"of {k_name} (shapes [B, Hq, N] = {list(q_t.shape)} and [B, Hkv, N] = {list(k_t.shape)})"
        )
    _check_device(q_t, q_name, **{k_name: k_t})
    return B, Hq, Hkv, N


def hash_mask(q_buckets: Tensor, k_buckets: Tensor) -> Tensor:
    """Hash-sparse mask: ``q_buckets[b,h,i] == k_buckets[b,g(h),j] AND i >= j``.

    Args:
        q_buckets: integer ``[B, Hq, N]``, bucket id of each query per query head.
        k_buckets: integer ``[B, Hkv, N]``, bucket id of each key per KV head.

    Returns:
        bool ``[B, Hq, N, N]``; query head h compares with KV head ``h // (Hq // Hkv)``.
    """
    _, Hq, Hkv, N = _check_per_token("q_buckets", q_buckets, "k_buckets", k_buckets, "integer")
    kb = _expand_heads(k_buckets, Hq // Hkv)  # [B, Hq, N]
    same = q_buckets[..., :, None] == kb[..., None, :]
    return same & causal_mask(N, device=q_buckets.device)


def hash_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, q_buckets: Tensor, k_buckets: Tensor, *, scale: float | None = None
) -> Tensor:
    """Causal attention restricted to keys in the query's bucket (SCFA hash-sparse).

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` (float, one dtype).
        q_buckets: integer ``[B, Hq, N]``; k_buckets: integer ``[B, Hkv, N]``.
        scale: default ``1 / sqrt(D)``.

    Returns:
        ``[B, Hq, N, D]`` in ``q.dtype`` (``attention`` with ``hash_mask``). A query whose
        bucket holds no earlier-or-equal key outputs 0 (cannot happen when ``q`` and ``k``
        buckets agree on the diagonal).
    """
    B, Hq, Hkv, N, _, _ = _check_qkv(q, k, v, self_attention=True)
    _check_per_token("q_buckets", q_buckets, "k_buckets", k_buckets, "integer", B=B, Hq=Hq, Hkv=Hkv, N=N)
    _check_device(q, "q", q_buckets=q_buckets, k_buckets=k_buckets)
    return attention(q, k, v, mask=hash_mask(q_buckets, k_buckets), scale=scale)


def drop_mask(q_keep: Tensor, k_keep: Tensor) -> Tensor:
    """Query/key-drop mask: ``q_keep[b,h,i] AND k_keep[b,g(h),j] AND i >= j``.

    Args:
        q_keep: bool ``[B, Hq, N]`` (True = query kept).
        k_keep: bool ``[B, Hkv, N]`` (True = key kept).

    Returns:
        bool ``[B, Hq, N, N]``.
    """
    _, Hq, Hkv, N = _check_per_token("q_keep", q_keep, "k_keep", k_keep, "bool")
    kk = _expand_heads(k_keep, Hq // Hkv)
    both = q_keep[..., :, None] & kk[..., None, :]
    return both & causal_mask(N, device=q_keep.device)


def qk_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, q_keep: Tensor, k_keep: Tensor, *, scale: float | None = None
) -> Tensor:
    """Causal attention over kept queries and kept keys only (SCFA query/key drop).

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` (float, one dtype).
        q_keep: bool ``[B, Hq, N]``; k_keep: bool ``[B, Hkv, N]``.
        scale: default ``1 / sqrt(D)``.

    Returns:
        ``[B, Hq, N, D]`` in ``q.dtype``. Dropped queries output exactly 0; a kept query all of
        whose causal keys were dropped outputs 0.
    """
    B, Hq, Hkv, N, _, _ = _check_qkv(q, k, v, self_attention=True)
    _check_per_token("q_keep", q_keep, "k_keep", k_keep, "bool", B=B, Hq=Hq, Hkv=Hkv, N=N)
    _check_device(q, "q", q_keep=q_keep, k_keep=k_keep)
    return attention(q, k, v, mask=drop_mask(q_keep, k_keep), scale=scale)


# --------------------------------------------------------------------------------------------
# 1.5-entmax
# --------------------------------------------------------------------------------------------


def entmax15(z: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """Exact 1.5-entmax along ``dim``: ``p = [z/2 - tau]_+^2`` with ``sum p = 1``.

    Sort-based closed form: for the ``k`` largest values ``x_(1..k)`` of ``x = z/2``,
    ``tau_k = mean_k - sqrt((1 - sum x^2 + k mean_k^2) / k)``; the support is the largest ``k``
    with ``tau_k <= x_(k)``. Autograd through this gives the exact Jacobian
    ``diag(s) - s s^T / sum s`` with ``s = sqrt(p)``.

    Args:
        z: floating-point tensor of any shape (computed in its dtype).
        mask: optional bool tensor broadcastable to ``z.shape``; False entries are excluded
            (exactly 0, zero gradient). Entries equal to ``-inf`` are excluded as well.
        dim: the dimension to normalise over.

    Returns:
        Tensor shaped like ``z``. A slice with no unmasked entry is all zeros (never NaN,
        forward or backward).
    """
    _check_float("z", z, "[...]")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor broadcastable to z's shape {list(z.shape)}, got {_shape(mask)}"
            )
        try:
            ok = mask.dim() <= z.dim() and tuple(torch.broadcast_shapes(mask.shape, z.shape)) == tuple(z.shape)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask must be broadcastable to z's shape {list(z.shape)}, got {_shape(mask)}")
        _check_device(z, "z", mask=mask)
    if z.dim() == 0:
        raise ValueError("z must have at least one dimension, got a 0-d tensor")
    if not -z.dim() <= dim < z.dim():
        raise ValueError(f"dim {dim} is out of range for z of shape {list(z.shape)}")
    if z.numel() == 0:
        return z.clone()

    x = z.movedim(dim, -1) / 2
    valid = ~torch.isneginf(x)
    if mask is not None:
        valid = valid & mask.expand(z.shape).movedim(dim, -1)
    n = x.shape[-1]

    # Shift by the maximum over the valid entries (0 on rows with none: they are zeroed below).
    row_max = torch.where(valid, x, float("-inf")).amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    # Entries more than 1 below the maximum are never in the support; masked entries and those
    # become a finite floor so that no inf/NaN enters the sorted arithmetic (nor its gradient).
    xs = torch.where(valid, (x - row_max).clamp(min=_ENTMAX_FLOOR), _ENTMAX_FLOOR)

    srt, _ = torch.sort(xs, dim=-1, descending=True)
    ks = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
    mean = srt.cumsum(dim=-1) / ks
    mean_sq = (srt * srt).cumsum(dim=-1) / ks
    ss = ks * (mean_sq - mean * mean)  # sum of squared deviations from mean_k
    delta = (1 - ss) / ks
    positive = delta > 0
    # sqrt clamped at 0 with a safe branch, so the unused branch has no inf/NaN gradient.
    root = torch.where(positive, torch.sqrt(torch.where(positive, delta, 1.0)), 0.0)
    tau_k = mean - root

    n_valid = valid.sum(dim=-1, keepdim=True)
    k_int = torch.arange(1, n + 1, device=x.device)
    consistent = (tau_k <= srt) & (k_int <= n_valid)
    support = (consistent * k_int).amax(dim=-1, keepdim=True).clamp(min=1)
    tau = tau_k.gather(-1, support - 1)

    p = torch.clamp(xs - tau, min=0) ** 2
    p = torch.where(valid, p, 0.0)
    return p.movedim(-1, dim)


# --------------------------------------------------------------------------------------------
# DashAttention
# --------------------------------------------------------------------------------------------


def _check_w(w, Hkv: int, D: int, ref: Tensor) -> None:
    def exp_w():
        return _fmt("Hkv, D", [Hkv, D])

    _check_float("w", w, exp_w)
    if tuple(w.shape) != (Hkv, D):
        raise ValueError(f"w must be a floating-point tensor of shape {exp_w()}, got {_shape(w)}")
    _check_device(ref, "k", w=w)


def chunk_summaries(k: Tensor, w: Tensor, chunk_size: int) -> Tensor:
    """DashAttention stage 0: attention-pooled summary of every *complete* chunk of keys.

    ``kbar[b,h,c] = sum_{j in c} softmax_j(w[h].k[b,h,j] / sqrt(D)) k[b,h,j]``; with ``w = 0``
    this is mean pooling. A trailing partial chunk is ignored.

    Args:
        k: ``[B, Hkv, N, D]`` floating point.
        w: ``[Hkv, D]`` floating point (cast to ``k.dtype``).
        chunk_size: ``C >= 1``.

    Returns:
        ``[B, Hkv, N // C, D]`` in ``k.dtype``.
    """
    C = _check_chunk_size(chunk_size)
    _check_float("k", k, "[B, Hkv, N, D]")
    if k.dim() != 4:
        raise ValueError(f"k must be a 4-D tensor of shape [B, Hkv, N, D], got {_shape(k)}")
    B, Hkv, N, D = k.shape
    _check_w(w, Hkv, D, k)
    n_full = N // C
    kc = k[:, :, : n_full * C].reshape(B, Hkv, n_full, C, D)
    wk = w.to(k.dtype)
    scores = torch.einsum("bhcjd,hd->bhcj", kc, wk) / math.sqrt(D)
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhcj,bhcjd->bhcd", weights, kc)


def _is_finite_number(x) -> bool:
    """A finite Python number (not a bool). Written with comparisons (False for NaN), not
    ``math.isfinite``, so that symbolic floats (a module's float attributes under
    ``torch.compile(dynamic=True)``) are checked by a guard instead of breaking the graph."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and -math.inf < x < math.inf


def _check_gamma_sigma(gamma, sigma=None) -> None:
    if not _is_finite_number(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    if sigma is not None and (not _is_finite_number(sigma) or not sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def dash_router(
    q: Tensor,
    k: Tensor,
    w: Tensor,
    *,
    chunk_size: int = 64,
    gamma: float = 1.0,
    scale: float | None = None,
) -> Tensor:
    """DashAttention stage 1: 1.5-entmax routing over strictly earlier chunks, GQA-averaged.

    For query head h, row i (in chunk ``c_i = i // C``) and complete chunk ``c < c_i``:
    ``z = gamma * scale * q[b,h,i].kbar[b,g(h),c]``, ``p = entmax15(z)`` over those chunks.
    ``pbar`` is the mean of ``p`` over the ``G = Hq / Hkv`` query heads of each KV head.

    Args:
        q: ``[B, Hq, N, D]``; k: ``[B, Hkv, N, D]`` (one dtype); w: ``[Hkv, D]``.
        chunk_size: ``C >= 1``. gamma: sparsity knob (larger = fewer chunks).
        scale: default ``1 / sqrt(D)``.

    Returns:
        pbar ``[B, Hkv, N, N // C]`` in ``q.dtype``; rows sum to 1 when ``c_i >= 1``, rows in
        chunk 0 are all zero, entries ``c >= c_i`` are exactly 0.
    """
    C = _check_chunk_size(chunk_size)
    _check_gamma_sigma(gamma)
    B, Hq, Hkv, N, _, D = _check_qkv(q, k, k, self_attention=True)
    _check_w(w, Hkv, D, k)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    groups = Hq // Hkv
    kbar = chunk_summaries(k, w, C)  # [B, Hkv, nF, D]
    n_full = kbar.shape[2]
    z = torch.matmul(q, _expand_heads(kbar, groups).transpose(-1, -2)) * (gamma * scale)  # [B,Hq,N,nF]
    q_chunk = torch.arange(N, device=q.device) // C
    past = torch.arange(n_full, device=q.device)[None, :] < q_chunk[:, None]  # [N, nF]
    p = entmax15(z, mask=past, dim=-1)
    return p.reshape(B, Hkv, groups, N, n_full).mean(dim=2)


def dash_log_prior(
    pbar: Tensor,
    N: int,
    *,
    chunk_size: int = 64,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
) -> Tensor:
    """DashAttention stage-2 additive bias per (row, chunk).

    Selected chunks of row i: past chunks ``c < c_i`` with ``pbar > 0``, plus the diagonal chunk
    ``c_i`` (log-prior 0). Default: ``log pi_c = log pbar_c``. With ``estimate_diagonal``:
    ``log pi_c = (log pbar_c - log g) / sigma``, ``log g`` the mean of ``log pbar`` over the row's
    selected past chunks. Unselected and future chunks are ``-inf``. Gradients flow through
    ``log pbar`` (no detach); unselected entries get exactly zero gradient.

    Args:
        pbar: ``[B, Hkv, N, N // C]`` floating point (output of ``dash_router``).
        N: sequence length. chunk_size: ``C >= 1``.
        estimate_diagonal: prior mode (see above). sigma: temperature ``> 0`` of that mode only.

    Returns:
        ``[B, Hkv, N, ceil(N / C)]`` in ``pbar.dtype``.
    """
    C = _check_chunk_size(chunk_size)
    _check_gamma_sigma(0.0, sigma)
    if isinstance(N, bool) or not isinstance(N, int) or N < 0:
        raise ValueError(f"N must be a non-negative integer, got {N!r}")
    n_full = N // C
    n_chunks = -(-N // C)
    exp_p = _fmt("B, Hkv, N, N // C", ["?", "?", N, n_full])
    _check_float("pbar", pbar, exp_p)
    if pbar.dim() != 4 or pbar.shape[2] != N or pbar.shape[3] != n_full:
        raise ValueError(f"pbar must be a floating-point tensor of shape {exp_p}, got {_shape(pbar)}")

    # Pad with zero columns for the trailing partial chunk (only ever a diagonal chunk).
    pad = pbar.new_zeros(*pbar.shape[:3], n_chunks - n_full)
    p = torch.cat([pbar, pad], dim=-1)  # [B, Hkv, N, nC]

    q_chunk = torch.arange(N, device=pbar.device) // C
    chunk = torch.arange(n_chunks, device=pbar.device)
    past = chunk[None, :] < q_chunk[:, None]  # [N, nC]
    diag = chunk[None, :] == q_chunk[:, None]
    selected = past & (p > 0)  # [B, Hkv, N, nC]

    # log only where selected; the safe inner branch keeps unselected gradients at exactly 0.
    log_p = torch.where(selected, torch.log(torch.where(selected, p, 1.0)), 0.0)
    if estimate_diagonal:
        n_sel = selected.sum(dim=-1, keepdim=True)
        log_g = log_p.sum(dim=-1, keepdim=True) / n_sel.clamp(min=1).to(log_p.dtype)
        log_p = (log_p - log_g) / sigma
    rest = torch.where(diag, 0.0, float("-inf")).to(p.dtype)
    return torch.where(selected, log_p, rest)


def dash_selection_stats(log_prior: Tensor, chunk_size: int, N: int) -> tuple[Tensor, Tensor]:
    """Kept fraction and paper-style sparsity of a DashAttention selection.

    A chunk is active for row i when ``c <= c_i`` and its log-prior is not ``-inf``.

    * kept fraction: active chunks / causal chunks (``c_i + 1``, diagonal counted), averaged over
      batch, KV heads and rows: the share of dense causal work that remains.
    * sparsity: ``1 - attended_tokens / N`` with ``attended_tokens`` = the summed length of the
      active chunks (``active * C`` when ``C`` divides ``N``; a trailing partial chunk counts its
      real length, so the value stays in [0, 1]), averaged over rows ``i >= 4096`` if
      ``N > 4096`` else over all rows, per KV head, then over heads and batch.

    Args:
        log_prior: ``[B, Hkv, N, ceil(N / C)]`` floating point (``dash_log_prior`` output).
        chunk_size: ``C >= 1``. N: sequence length.

    Returns:
        ``(kept_fraction, sparsity)``, float32 0-d tensors on ``log_prior``'s device.
    """
    C = _check_chunk_size(chunk_size)
    if isinstance(N, bool) or not isinstance(N, int) or N < 0:
        raise ValueError(f"N must be a non-negative integer, got {N!r}")
    n_chunks = -(-N // C)
    exp_lp = _fmt("B, Hkv, N, ceil(N / C)", ["?", "?", N, n_chunks])
    _check_float("log_prior", log_prior, exp_lp)
    if log_prior.dim() != 4 or log_prior.shape[2] != N or log_prior.shape[3] != n_chunks:
        raise ValueError(f"log_prior must be a floating-point tensor of shape {exp_lp}, got {_shape(log_prior)}")
    dev = log_prior.device
    if log_prior.numel() == 0:
        return torch.ones((), device=dev), torch.zeros((), device=dev)

    q_chunk = torch.arange(N, device=dev) // C
    chunk = torch.arange(n_chunks, device=dev)
    causal = chunk[None, :] <= q_chunk[:, None]  # [N, nC]
    active = (log_prior > float("-inf")) & causal  # [B, Hkv, N, nC]

    n_active = active.sum(dim=-1).to(torch.float32)  # [B, Hkv, N]
    kept = (n_active / (q_chunk + 1).to(torch.float32)).mean()

    chunk_len = (N - chunk * C).clamp(max=C).to(torch.float32)  # [nC]
    tokens = (active.to(torch.float32) * chunk_len).sum(dim=-1)  # [B, Hkv, N]
    per_row = 1.0 - tokens / N
    if N > _SPARSITY_SKIP:
        per_row = per_row[..., _SPARSITY_SKIP:]
    sparsity = per_row.mean(dim=-1).mean()  # per KV head, then averaged
    return kept, sparsity


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
    return_aux: bool = False,
):
    """DashAttention: chunk summaries -> entmax router -> prior-biased sparse causal softmax.

    Stage 2: ``attention(q, k, v, mask=causal & selected chunk, bias=log prior of the key's
    chunk)``, where query head h uses the selection and prior of its KV head ``h // G``.

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` (one dtype); w: ``[Hkv, D]`` summary
            vectors (cast to ``k.dtype``).
        chunk_size: ``C >= 1``. gamma: router logit multiplier (larger = sparser).
        estimate_diagonal, sigma: prior mode, see ``dash_log_prior``.
        scale: logit scale of the router and of stage 2, default ``1 / sqrt(D)``.
        return_aux: also return a dict with ``pbar [B,Hkv,N,N//C]``,
            ``log_prior [B,Hkv,N,ceil(N/C)]``, ``kept_fraction`` and ``sparsity`` (0-d float
            tensors, see ``dash_selection_stats``).

    Returns:
        ``[B, Hq, N, D]`` in ``q.dtype``, or ``(out, aux)`` with ``return_aux=True``.
    """
    C = _check_chunk_size(chunk_size)
    _check_gamma_sigma(gamma, sigma)
    _, Hq, Hkv, N, _, D = _check_qkv(q, k, v, self_attention=True)
    _check_w(w, Hkv, D, k)

    pbar = dash_router(q, k, w, chunk_size=C, gamma=gamma, scale=scale)
    log_prior = dash_log_prior(pbar, N, chunk_size=C, estimate_diagonal=estimate_diagonal, sigma=sigma)

    token_chunk = torch.arange(N, device=q.device) // C
    token_bias = log_prior.index_select(-1, token_chunk)  # [B, Hkv, N, N]: prior of key j's chunk
    token_bias = _expand_heads(token_bias, Hq // Hkv)  # [B, Hq, N, N]
    mask = causal_mask(N, device=q.device) & (token_bias > float("-inf"))
    bias = torch.where(mask, token_bias, 0.0)
    out = attention(q, k, v, mask=mask, bias=bias, scale=scale)
    if not return_aux:
        return out
    kept, sparsity = dash_selection_stats(log_prior, C, N)
    aux = {"pbar": pbar, "log_prior": log_prior, "kept_fraction": kept, "sparsity": sparsity}
    return out, aux


def dash_topk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    *,
    chunk_size: int = 64,
    top_k: int = 8,
    scale: float | None = None,
    return_aux: bool = False,
):
    """Top-k chunk routing (NSA / MoBA / InfLLM-v2 style) on DashAttention's summaries: the
    hard-mask baseline to compare the entmax router with at equal sparsity.

    Per KV head, row ``i`` scores each past complete chunk ``c < c_i`` by the mean over the ``G``
    query heads of the group of ``scale * q[b,h,i] . kbar[b,h//G,c]`` and attends causally to the
    ``top_k`` best (ties: lower chunk index first; rows with at most ``top_k`` past chunks take
    them all) plus its diagonal chunk, with no prior. The selection is hard: no gradient reaches
    ``w`` or, through the scores, ``q`` and ``k``.

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]``; w: ``[Hkv, D]``.
        chunk_size: ``C >= 1``. top_k: past chunks kept per row (``>= 0``).
        scale: logit scale of the scores and the attention, default ``1 / sqrt(D)``.
        return_aux: also return ``{"selection" [B,Hkv,N,N//C] (1.0 selected), "log_prior",
            "kept_fraction", "sparsity"}`` (see ``dash_selection_stats``).

    Returns:
        ``[B, Hq, N, D]`` in ``q.dtype``, or ``(out, aux)``.
    """
    C = _check_chunk_size(chunk_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    _, Hq, Hkv, N, _, D = _check_qkv(q, k, v, self_attention=True)
    _check_w(w, Hkv, D, k)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    G = Hq // Hkv
    with torch.no_grad():
        kbar = chunk_summaries(k, w, C)
        n_full = kbar.shape[2]
        s = torch.matmul(q, _expand_heads(kbar, G).transpose(-1, -2)) * scale  # [B, Hq, N, nF]
        s = s.reshape(s.shape[0], Hkv, G, N, n_full).mean(dim=2)
        q_chunk = torch.arange(N, device=q.device) // C
        past = torch.arange(n_full, device=q.device)[None, :] < q_chunk[:, None]
        s = torch.where(past, s, float("-inf"))
        sel = torch.zeros_like(s, dtype=torch.bool)
        kk = min(top_k, n_full)
        if kk > 0:
            vals, idx = torch.sort(s, dim=-1, descending=True, stable=True)
            sel.scatter_(-1, idx[..., :kk], vals[..., :kk] > float("-inf"))
        sel = sel & past
    n_chunks = -(-N // C)
    chunk = torch.arange(n_chunks, device=q.device)
    diag = chunk[None, :] == (torch.arange(N, device=q.device) // C)[:, None]  # [N, nC]
    pad = sel.new_zeros(*sel.shape[:3], n_chunks - n_full)
    active = torch.cat([sel, pad], dim=-1) | diag  # [B, Hkv, N, nC]
    token_active = _expand_heads(active.index_select(-1, torch.arange(N, device=q.device) // C), G)
    mask = causal_mask(N, device=q.device) & token_active
    out = attention(q, k, v, mask=mask, scale=scale)
    if not return_aux:
        return out
    log_prior = torch.where(active, 0.0, float("-inf")).to(torch.float32)
    kept, sparsity = dash_selection_stats(log_prior, C, N)
    aux = {"selection": sel.to(torch.float32), "log_prior": log_prior, "kept_fraction": kept, "sparsity": sparsity}
    return out, aux
