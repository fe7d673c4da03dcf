"""DashAttention decoding: a KV cache with chunk summaries, and the decode op for small ``q_len``.

The math is :func:`flexsparse.reference.dash_attention` restricted to the last ``L`` rows of the
sequence held by the cache (``L = 1`` for token-by-token decoding, a few rows for speculative
decoding or chunked prefill). A query at absolute position ``i`` (the cache holds keys ``0..i``
and more) routes over the complete chunks ``c < c_i = i // C`` with the cached summaries
``kbar``: ``p = 1.5-entmax(gamma * scale * q . kbar_c)`` per query head, ``pbar`` = mean over the
``G`` heads of the KV group; it attends to the selected past chunks (``pbar > 0``) with the
log-prior ``log pbar`` (or ``(log pbar - mean log pbar) / sigma`` with ``estimate_diagonal``) and
to its own, possibly partial, chunk ``c_i`` with prior 1, causally (keys ``<= i``).

* :class:`DashKVCache`: preallocated keys, values and summaries; ``append`` writes new tokens at
  device-side positions and refreshes the summaries of the chunks they touch, so one decode step
  (append + :func:`dash_decode`) launches with shapes that depend only on the capacity: it can
  be captured in a CUDA graph (the host-side ``length`` is then not advanced by replays; see
  :meth:`DashKVCache.sync_length`).
* :func:`dash_decode`: the Triton kernels of :mod:`flexsparse.kernels.dash_decode` (CUDA, or CPU
  under ``TRITON_INTERPRET=1``) or their PyTorch twin :func:`dash_decode_torch`.
* :func:`dash_module_step` / :func:`dash_module_prefill`: incremental decoding with a
  :class:`flexsparse.DashAttention` module (duck-typed: this module does not import ``nn``).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from flexsparse.reference import (
    _check_chunk_size,
    _check_gamma_sigma,
    _expand_heads,
    _fmt,
    _shape,
    attention,
    entmax15,
)

__all__ = ["DashKVCache", "dash_decode", "dash_decode_torch", "dash_module_prefill", "dash_module_step"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_BACKENDS = ("auto", "triton", "torch")


def _check_pos_int(name: str, x, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {x!r}")
    return x


# ----------------------------------------------------------------------------------------------
# the cache


class DashKVCache:
    """Keys, values and chunk summaries of ``batch`` sequences of one equal length.

    Args:
        batch, kv_heads, head_dim: ``B``, ``Hkv``, ``D``.
        capacity: the most tokens the cache will hold; rounded up to a multiple of
            ``chunk_size``.
        chunk_size: ``C`` (must equal the model's).
        dtype, device: of ``k``, ``v``, ``kbar`` (default: torch's default dtype, CPU).
        append_impl: ``"triton"`` (one kernel: :func:`flexsparse.kernels.dash_decode.cache_append`;
            CUDA, or CPU under ``TRITON_INTERPRET=1``; fp16/bf16/fp32), ``"torch"`` (index_copy_
            and einsum, any dtype), or ``"auto"`` (triton where it can run, else torch).

    Attributes:
        k, v: ``[B, Hkv, capacity, D]``; positions ``>= length`` hold stale values (zeros at
            first).
        kbar: ``[B, Hkv, capacity // C, D]``; row ``c`` is the summary of chunk ``c``, valid for
            the complete chunks ``c < length // C`` (the chunk that holds the last token may
            hold the summary of its incomplete prefix: it is rewritten when it completes).
        length: tokens held (host int). seq_len: the same as an int32 ``[1]`` device tensor,
            the one the kernels read.

    The summaries are pooled with the ``w`` given to :meth:`append`
    (``kbar_c = sum_{j in c} softmax_j(w . k_j / sqrt(D)) k_j``), so **a cache is tied to w**:
    when ``w`` changes (a training step, another layer), ``reset()`` and append the sequence
    again. In-place updates of the very tensor of the first ``append`` are detected (ValueError);
    a different tensor with other values is not (checking values would synchronise the device).
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        chunk_size: int = 64,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        append_impl: str = "auto",
    ):
        B = _check_pos_int("batch", batch)
        Hkv = _check_pos_int("kv_heads", kv_heads)
        D = _check_pos_int("head_dim", head_dim)
        cap = _check_pos_int("capacity", capacity)
        C = _check_chunk_size(chunk_size)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if append_impl not in ("auto", "triton", "torch"):
            raise ValueError(f"append_impl must be 'auto', 'triton' or 'torch', got {append_impl!r}")
        self.append_impl = append_impl
        cap = -(-cap // C) * C
        self.batch, self.kv_heads, self.head_dim, self.chunk_size, self.capacity = B, Hkv, D, C, cap
        self.dtype = dtype
        self.k = torch.zeros(B, Hkv, cap, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.kbar = torch.zeros(B, Hkv, cap // C, D, dtype=dtype, device=device)
        self.device = self.k.device
        self.seq_len = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.length = 0
        self._w_key: tuple | None = None

    def __repr__(self) -> str:
        return (
            f"DashKVCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"chunk_size={self.chunk_size}, length={self.length}/{self.capacity}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    def reset(self) -> None:
        """Empty the cache (and untie it from ``w``); buffers are kept."""
        self.length = 0
        self.seq_len.zero_()
        self._w_key = None

    def sync_length(self) -> int:
        """Read the device counter back into ``length`` (after CUDA-graph replays); synchronises."""
        self.length = int(self.seq_len.item())
        return self.length

    # -- w tie ------------------------------------------------------------------------------

    @staticmethod
    def _version(w: Tensor):
        try:
            return w._version
        except RuntimeError:  # inference tensors have no version counter
            return None

    def _check_w(self, w, where: str) -> None:
        exp_w = _fmt("Hkv, D", [self.kv_heads, self.head_dim])
        shape = (self.kv_heads, self.head_dim)
        if not isinstance(w, Tensor) or not w.dtype.is_floating_point or tuple(w.shape) != shape:
            raise ValueError(f"{where}: w must be a floating-point tensor of shape {exp_w}, got {_shape(w)}")
        if w.device != self.device:
            raise ValueError(f"{where}: w must be on the cache's device ({self.device}), got {w.device}")
        if self._w_key is not None:
            ref, version = self._w_key  # ref is kept alive, so its memory cannot be reused
            if w.data_ptr() == ref.data_ptr() and version is not None and self._version(w) != version:
                raise ValueError(
                    f"{where}: w was modified in place since the cache's summaries were computed; "
                    "a cache is tied to its w: reset() it and append the sequence again"
                )

    # -- append -----------------------------------------------------------------------------

    def append(self, k_new: Tensor, v_new: Tensor, w: Tensor) -> None:
        """Append ``L`` tokens and refresh the summaries of the chunks they touch.

        Args:
            k_new, v_new: ``[B, Hkv, L, D]`` in the cache's dtype and device (keys after rotary,
                as the attention uses them).
            w: ``[Hkv, D]`` summary vectors (cast to the cache dtype, pooled in float32 or
                better); the cache is tied to it (see the class docstring).

        Positions are computed on the device from ``seq_len`` (no host synchronisation).
        """
        B, Hkv, D, C = self.batch, self.kv_heads, self.head_dim, self.chunk_size
        exp = _fmt("B, Hkv, L, D", [B, Hkv, "L", D])
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if (
                not isinstance(t, Tensor)
                or t.dim() != 4
                or t.shape[0] != B
                or t.shape[1] != Hkv
                or t.shape[3] != D
                or t.dtype != self.dtype
                or t.device != self.device
            ):
                raise ValueError(
                    f"{name} must be a {self.dtype} tensor on {self.device} of shape {exp}, got {_shape(t)}"
                )
        if v_new.shape != k_new.shape:
            raise ValueError(f"v_new must have the shape of k_new {list(k_new.shape)}, got {list(v_new.shape)}")
        self._check_w(w, "append")
        L = k_new.shape[2]
        if L == 0:
            return
        if self.length + L > self.capacity:
            raise ValueError(
                f"appending L = {L} tokens to a cache holding {self.length} exceeds its capacity {self.capacity}"
            )
        if self._use_triton():
            from flexsparse.kernels.dash_decode import cache_append

            wk = w.detach().to(self.dtype).contiguous()
            cache_append(k_new.detach(), v_new.detach(), self.k, self.v, self.kbar, wk, self.seq_len, C)
        else:
            self._append_torch(k_new.detach(), v_new.detach(), w)
        self.seq_len.add_(L)
        self.length += L
        if self._w_key is None:
            self._w_key = (w, self._version(w))

    def _use_triton(self) -> bool:
        if self.append_impl == "torch":
            return False
        runs = self.device.type == "cuda" or _interpreting()
        ok = self.dtype in _TRITON_DTYPES and self.head_dim <= _MAX_HEAD_DIM and runs
        if self.append_impl == "triton" and not ok:
            raise ValueError(
                f"append_impl='triton' needs a {_TRITON_DTYPES} cache with head_dim <= {_MAX_HEAD_DIM} on CUDA "
                f"(or TRITON_INTERPRET=1 on CPU), this one is {self!r}"
            )
        return ok

    def _append_torch(self, k_new: Tensor, v_new: Tensor, w: Tensor) -> None:
        B, Hkv, D, C = self.batch, self.kv_heads, self.head_dim, self.chunk_size
        L = k_new.shape[2]
        dev = self.device
        start = self.seq_len.to(torch.int64)  # [1]
        pos = start + torch.arange(L, device=dev)
        self.k.index_copy_(2, pos, k_new)
        self.v.index_copy_(2, pos, v_new)

        # Every chunk the new tokens touch (a static count, so no host branch on the length):
        # complete ones get their final summary, the partial last one a provisional one.
        n_chunks = self.capacity // C
        n_touch = min((L + C - 2) // C + 1, n_chunks)
        cidx = (start // C + torch.arange(n_touch, device=dev)).clamp(max=n_chunks - 1)
        tok = (cidx[:, None] * C + torch.arange(C, device=dev)).reshape(-1)
        work = torch.promote_types(self.dtype, torch.float32)
        kc = self.k.index_select(2, tok).to(work).reshape(B, Hkv, n_touch, C, D)
        wk = w.detach().to(self.dtype).to(work)
        weights = torch.softmax(torch.einsum("bhcjd,hd->bhcj", kc, wk) / math.sqrt(D), dim=-1)
        kb = torch.einsum("bhcj,bhcjd->bhcd", weights, kc).to(self.dtype)
        self.kbar.index_copy_(2, cidx, kb)


# ----------------------------------------------------------------------------------------------
# decode


def _check_decode(q, cache, w, chunk_size, gamma, sigma, scale) -> tuple[int, int, float]:
    """Validate a decode call; return ``(G, L, scale)``."""
    if not isinstance(cache, DashKVCache):
        raise ValueError(f"cache must be a DashKVCache, got {type(cache).__name__}")
    B, Hkv, D = cache.batch, cache.kv_heads, cache.head_dim
    exp_q = _fmt("B, Hq, L, D", [B, "Hq", "L", D])
    if not isinstance(q, Tensor) or q.dim() != 4 or q.shape[0] != B or q.shape[3] != D:
        raise ValueError(f"q must be a tensor of shape {exp_q} (the cache is {cache!r}), got {_shape(q)}")
    Hq, L = q.shape[1], q.shape[2]
    if Hq < 1 or Hq % Hkv:
        raise ValueError(
            f"the number of query heads Hq = {Hq} of q [B, Hq, L, D] = {list(q.shape)} must be a multiple "
            f"of the cache's Hkv = {Hkv}"
        )
    if q.dtype != cache.dtype or q.device != cache.device:
        raise ValueError(f"q must be {cache.dtype} on {cache.device} like the cache, got {_shape(q)}")
    if L > cache.length:
        raise ValueError(
            f"q has L = {L} rows but the cache holds only {cache.length} tokens: append the new tokens' "
            "keys and values before decoding (q row r sits at position length - L + r)"
        )
    if chunk_size is not None and _check_chunk_size(chunk_size) != cache.chunk_size:
        raise ValueError(f"chunk_size = {chunk_size} differs from the cache's chunk_size = {cache.chunk_size}")
    _check_gamma_sigma(gamma, sigma)
    cache._check_w(w, "dash_decode")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return Hq // Hkv, L, float(scale)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dash_decode(
    q: Tensor,
    cache: DashKVCache,
    w: Tensor,
    *,
    chunk_size: int | None = None,
    gamma: float = 1.0,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
    scale: float | None = None,
    backend: str = "auto",
    num_splits: int | None = None,
    out: Tensor | None = None,
    return_aux: bool = False,
    blocks: dict | None = None,
):
    """DashAttention for the last ``L`` positions of the cached sequence (decode step).

    Row ``r`` of ``q`` is the query at position ``i = cache.length - L + r``: the new tokens'
    keys and values must already be appended. Equal to the last ``L`` rows of
    ``reference.dash_attention(q_all, k_all, v_all, w, ...)`` on the whole sequence.

    Args:
        q: ``[B, Hq, L, D]`` in the cache's dtype and device, ``Hq % Hkv == 0``.
        cache: a :class:`DashKVCache` holding ``>= L`` tokens. w: ``[Hkv, D]``, the ``w`` the
            cache was filled with (checked for shape and in-place changes only).
        chunk_size: must equal ``cache.chunk_size`` (None: the cache's).
        gamma, estimate_diagonal, sigma, scale: as in ``reference.dash_attention``.
        backend: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``; fp16/bf16/fp32,
            ``D <= 256``), ``"torch"`` (:func:`dash_decode_torch`), or ``"auto"`` (triton on
            CUDA or under the interpreter, else torch).
        num_splits: KV splits per row for the triton backend (None: enough to fill the GPU,
            from the batch, KV heads, ``L`` and the cache capacity; a given count is used as is).
        out: optional ``[B, Hq, L, D]`` output written in place (triton backend).
        return_aux: also return ``{"ids", "log_pbar", "count", "shift", "tau"}`` (triton backend,
            see :func:`flexsparse.kernels.dash_decode.decode_route`; the torch backend returns
            ``{"pbar" [B, Hkv, L, length // C], "count"}``).
        blocks: kernel tile overrides (tuning).

    Returns:
        ``[B, Hq, L, D]`` in ``q.dtype`` (or ``(out, aux)``).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    G, L, scale = _check_decode(q, cache, w, chunk_size, gamma, sigma, scale)
    if backend == "auto":
        backend = "triton" if (q.is_cuda or _interpreting()) and q.dtype in _TRITON_DTYPES else "torch"
    if backend == "torch":
        return dash_decode_torch(
            q, cache, w, chunk_size=chunk_size, gamma=gamma, estimate_diagonal=estimate_diagonal,
            sigma=sigma, scale=scale, return_aux=return_aux,
        )
    if q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"backend='triton' supports {_TRITON_DTYPES}, got q of dtype {q.dtype}")
    if cache.head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head_dim <= {_MAX_HEAD_DIM}, got {cache.head_dim}")
    if not q.is_cuda and not _interpreting():
        raise ValueError("backend='triton' on CPU needs TRITON_INTERPRET=1 set before triton is imported")
    if num_splits is not None:
        _check_pos_int("num_splits", num_splits)
    B, Hq, _, D = q.shape
    if out is not None and (
        not isinstance(out, Tensor) or tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype
        or out.device != q.device or out.stride(-1) != 1
    ):
        raise ValueError(f"out must be a {q.dtype} tensor of shape [B, Hq, L, D] = {list(q.shape)} "
                         f"with a contiguous last dim, got {_shape(out)}")

    from flexsparse.kernels import dash_decode as K  # the kernels (import triton lazily)

    if q.stride(-1) != 1:
        q = q.contiguous()
    Hkv, C = cache.kv_heads, cache.chunk_size
    x = K.decode_scores(q, cache.kbar, cache.seq_len, C, gamma * scale, blocks=blocks)
    ids, lp, cnt, shift, tau = K.decode_route(
        x, cache.seq_len, Hkv, C, estimate_diagonal=estimate_diagonal, blocks=blocks
    )
    min_per = 2 if q.is_cuda else 1
    if num_splits is None:
        num_splits = K.default_num_splits(B, Hkv, L, cache.capacity // C + 1, q.device, min_per)
    else:
        min_per = 1
    o = K.decode_attention(
        q, cache.k, cache.v, cache.seq_len, ids, lp, cnt, shift, C, scale=scale,
        sigma=sigma if estimate_diagonal else 1.0,
        num_splits=num_splits, min_per=min_per, out=out, blocks=blocks,
    )
    if return_aux:
        return o, {"ids": ids, "log_pbar": lp, "count": cnt, "shift": shift, "tau": tau}
    return o


def dash_decode_torch(
    q: Tensor,
    cache: DashKVCache,
    w: Tensor,
    *,
    chunk_size: int | None = None,
    gamma: float = 1.0,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
    scale: float | None = None,
    return_aux: bool = False,
):
    """PyTorch twin of :func:`dash_decode` (dense over the cached prefix, in ``q.dtype``).

    Scores against the cached summaries, ``reference.entmax15`` over the past chunks, group mean,
    prior, and ``reference.attention`` with a per-key bias over the ``length`` cached tokens.
    Any float dtype (float64 for oracles, bf16 as the plain-PyTorch baseline) and device.

    Returns:
        ``[B, Hq, L, D]`` (or ``(out, {"pbar" [B, Hkv, L, length // C], "count" [B, Hkv, L]})``).
    """
    G, L, scale = _check_decode(q, cache, w, chunk_size, gamma, sigma, scale)
    B, Hq, _, D = q.shape
    Hkv, C, N = cache.kv_heads, cache.chunk_size, cache.length
    dev = q.device
    nF = N // C
    k, v, kbar = cache.k[:, :, :N], cache.v[:, :, :N], cache.kbar[:, :, :nF]
    pos = torch.arange(N - L, N, device=dev)
    ci = pos // C  # [L]
    z = torch.matmul(q, _expand_heads(kbar, G).transpose(-1, -2)) * (gamma * scale)  # [B, Hq, L, nF]
    past = torch.arange(nF, device=dev)[None, :] < ci[:, None]  # [L, nF]
    p = entmax15(z, mask=past, dim=-1)
    pbar = p.reshape(B, Hkv, G, L, nF).mean(dim=2)  # [B, Hkv, L, nF]
    sel = past & (pbar > 0)
    log_p = torch.where(sel, torch.log(torch.where(sel, pbar, 1.0)), 0.0)
    count = sel.sum(dim=-1)
    if estimate_diagonal:
        log_g = log_p.sum(dim=-1, keepdim=True) / count.clamp(min=1).unsqueeze(-1).to(log_p.dtype)
        log_p = (log_p - log_g) / sigma
    # per-key bias: the prior of the key's chunk; diagonal chunk 0 up to the query; else -inf
    key_chunk = torch.arange(N, device=dev) // C  # [N]
    in_past = key_chunk[None, :] < ci[:, None]  # [L, N]
    kc = key_chunk.clamp(max=max(nF - 1, 0))
    if nF > 0:
        prior = log_p.index_select(-1, kc)  # [B, Hkv, L, N]
        chosen = sel.index_select(-1, kc)
    else:
        prior = q.new_zeros(B, Hkv, L, N)
        chosen = torch.zeros(B, Hkv, L, N, dtype=torch.bool, device=dev)
    diag = (key_chunk[None, :] == ci[:, None]) & (torch.arange(N, device=dev)[None, :] <= pos[:, None])
    allowed = (in_past & chosen) | diag  # [B, Hkv, L, N]
    bias = torch.where(in_past & chosen, prior, 0.0)
    out = attention(
        q, k, v, mask=_expand_heads(allowed, G), bias=_expand_heads(bias, G).to(q.dtype), scale=scale
    )
    if return_aux:
        return out, {"pbar": pbar, "count": count}
    return out


# ----------------------------------------------------------------------------------------------
# module-level incremental decoding (flexsparse.DashAttention, duck-typed)


def _rotary_at(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotary embedding of ``x [B, H, L, D]`` at absolute ``positions [L]`` (integer, any device):
    the same numbers as ``flexsparse.nn._rotary`` gives rows ``positions`` of a full sequence."""
    D = x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = positions.to(device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _check_module(module, x, cache) -> None:
    for attr in ("qkv", "out", "heads", "kv_heads", "head_dim", "chunk_size", "gamma", "estimate_diagonal",
                 "sigma", "summary", "rotary", "rotary_base", "_finish"):
        if not hasattr(module, attr):
            raise ValueError(f"module must be a flexsparse.DashAttention (missing attribute {attr!r})")
    if getattr(module, "router", "entmax") != "entmax":
        raise ValueError(f"decoding supports the entmax router only, the module has router={module.router!r}")
    if not isinstance(cache, DashKVCache):
        raise ValueError(f"cache must be a DashKVCache, got {type(cache).__name__}")
    if (cache.kv_heads, cache.head_dim, cache.chunk_size) != (module.kv_heads, module.head_dim, module.chunk_size):
        raise ValueError(
            f"the cache (kv_heads, head_dim, chunk_size) = {(cache.kv_heads, cache.head_dim, cache.chunk_size)} "
            f"must match the module's {(module.kv_heads, module.head_dim, module.chunk_size)}"
        )
    dim = module.qkv.in_features
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[0] != cache.batch or x.shape[2] != dim:
        raise ValueError(f"x must have shape [B, L, dim] = [{cache.batch}, L, {dim}], got {_shape(x)}")


def _project(module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, L, _ = x.shape
    D = module.head_dim
    q, k, v = module.qkv(x).split([module.heads * D, module.kv_heads * D, module.kv_heads * D], -1)
    q, k, v = (t.view(B, L, -1, D).transpose(1, 2) for t in (q, k, v))
    if module.rotary:
        q = _rotary_at(q, positions, module.rotary_base)
        k = _rotary_at(k, positions, module.rotary_base)
    return q, k, v


def dash_module_step(module, x: Tensor, cache: DashKVCache, **decode_kwargs) -> Tensor:
    """One incremental step of a :class:`flexsparse.DashAttention` layer with a KV cache.

    Projects ``x [B, L, dim]`` (the tokens at positions ``cache.length .. cache.length + L - 1``;
    rotary at those absolute positions, computed on the device), appends their keys and values
    (pooled with ``module.summary``) and returns the layer output ``[B, L, dim]``: the last ``L``
    rows of ``module(x_all)`` on the whole sequence. ``decode_kwargs`` go to :func:`dash_decode`
    (``backend``, ``num_splits``, ...). The cache must be built with the module's ``kv_heads``,
    ``head_dim``, ``chunk_size`` and the dtype of ``x``'s projections. Inference only (runs
    under ``torch.no_grad()``).
    """
    _check_module(module, x, cache)
    L = x.shape[1]
    with torch.no_grad():
        positions = cache.seq_len.to(torch.int64) + torch.arange(L, device=cache.device)
        q, k, v = _project(module, x, positions)
        w = module.summary
        cache.append(k, v, w)
        o = dash_decode(
            q, cache, w, chunk_size=module.chunk_size, gamma=module.gamma,
            estimate_diagonal=module.estimate_diagonal, sigma=module.sigma, **decode_kwargs,
        )
        return module._finish(o)


def dash_module_prefill(module, x: Tensor, cache: DashKVCache) -> Tensor:
    """Run ``module(x)`` on a prompt ``x [B, N, dim]`` and fill an empty cache with its keys and
    values (positions ``0 .. N-1``); returns ``module(x)`` ``[B, N, dim]``. Decode the following
    tokens with :func:`dash_module_step`. (The qkv projection runs twice: once inside the
    module's forward, once for the cache.)"""
    _check_module(module, x, cache)
    if cache.length != 0:
        raise ValueError(f"dash_module_prefill needs an empty cache, this one holds {cache.length} tokens")
    y = module(x)
    with torch.no_grad():
        _, k, v = _project(module, x, torch.arange(x.shape[1], device=cache.device))
        cache.append(k, v, module.summary)
    return y
