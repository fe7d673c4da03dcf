"""Causal self-attention layers: ``x [B, N, dim] -> [B, N, dim]`` (SCFA patterns, DashAttention).

Each layer: one fused qkv projection, optional rotary embedding, GQA (``kv_heads``), the sparse
attention op of :mod:`flexsparse.functional`, and an output projection.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flexsparse.functional import dash_attention, hash_sparse_attention, qk_sparse_attention
from flexsparse.patterns.dash_cache import DashKVCache, dash_module_prefill, dash_module_step
from flexsparse.patterns.drop import capacity_for_rate

__all__ = ["DashAttention", "HashSparseAttention", "QKSparseAttention"]


def _rotary(x: Tensor, base: float) -> Tensor:
    """Rotary position embedding (rotate-half convention) of ``x [B, H, N, D]`` (D even)."""
    N, D = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.arange(N, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class _SparseSelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        backend: str = "auto",
        block_size: int = 128,
    ):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if heads < 1 or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"heads = {heads} must be a positive multiple of kv_heads = {kv_heads}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim = {dim} must be divisible by heads = {heads} (or pass head_dim)")
            head_dim = dim // heads
        if rotary and head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.rotary, self.rotary_base = rotary, rotary_base
        self.backend, self.block_size = backend, block_size
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim, bias=bias)
        self.out = nn.Linear(heads * head_dim, dim, bias=bias)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, N, dim] = [B, N, {self.dim}], got {list(x.shape)}")
        B, N, _ = x.shape
        D = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * D, self.kv_heads * D, self.kv_heads * D], -1)
        q, k, v = (t.view(B, N, -1, D).transpose(1, 2) for t in (q, k, v))
        if self.rotary:
            q, k = _rotary(q, self.rotary_base), _rotary(k, self.rotary_base)
        return q, k, v

    def _finish(self, o: Tensor) -> Tensor:
        B, _, N, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class HashSparseAttention(_SparseSelfAttention):
    """Hash-sparse causal self-attention (SCFA) with angular LSH buckets.

    Buckets: ``argmax([xR, -xR])`` with ``R [kv_heads, head_dim, n_buckets/2]`` random unit
    columns, one per KV head (the query heads of a group share their KV head's R), kept as the
    buffer ``rotations`` so evaluation is deterministic. ``redraw=True`` draws a fresh R on every
    call instead (the reference SCFA code's behaviour).

    Args:
        dim, heads: model width and query heads. kv_heads: KV heads (GQA), default ``heads``.
        n_buckets: even number of LSH buckets (default 16).
        redraw: redraw the rotations on every forward.
        head_dim, bias, rotary, rotary_base, backend, block_size: projection and op options.

    ``forward(x, q_buckets=None, k_buckets=None)``: ``x [B, N, dim]``; buckets may be given.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, n_buckets: int = 16,
                 redraw: bool = False, **kwargs):
        super().__init__(dim, heads, kv_heads=kv_heads, **kwargs)
        if n_buckets < 2 or n_buckets % 2:
            raise ValueError(f"n_buckets must be an even integer >= 2, got {n_buckets}")
        self.n_buckets, self.redraw = n_buckets, redraw
        self.register_buffer("rotations", self._draw(torch.device("cpu")))

    def _draw(self, device) -> Tensor:
        r = torch.randn(self.kv_heads, self.head_dim, self.n_buckets // 2, device=device)
        return r / r.norm(dim=1, keepdim=True)

    def buckets(self, x: Tensor, per_kv_head_rotations: Tensor) -> Tensor:
        """int32 ``[B, H, N]`` LSH buckets of ``x [B, H, N, D]`` (H a multiple of kv_heads)."""
        G = x.shape[1] // self.kv_heads
        r = per_kv_head_rotations.repeat_interleave(G, 0).to(x.dtype)  # [H, D, nb/2]
        proj = torch.einsum("bhnd,hdr->bhnr", x.detach(), r)
        return torch.cat([proj, -proj], -1).argmax(-1).to(torch.int32)

    def forward(self, x: Tensor, q_buckets: Tensor | None = None, k_buckets: Tensor | None = None) -> Tensor:
        q, k, v = self._project(x)
        given = q_buckets is not None or k_buckets is not None
        if q_buckets is None or k_buckets is None:
            rot = self._draw(x.device) if self.redraw else self.rotations
            q_buckets = self.buckets(q, rot) if q_buckets is None else q_buckets
            k_buckets = self.buckets(k, rot) if k_buckets is None else k_buckets
        # our LSH ids lie in [0, n_buckets): fast counting sort, no validation sync; user ids: any
        extra = {} if given else {"n_buckets": self.n_buckets, "validate": False}
        o = hash_sparse_attention(q, k, v, q_buckets, k_buckets, backend=self.backend, block_size=self.block_size, **extra)
        return self._finish(o)


class QKSparseAttention(_SparseSelfAttention):
    """Query/key-drop causal self-attention (SCFA).

    Each call drops every query (per query head) and every key (per KV head) independently with
    probability ``drop_rate`` (the SCFA paper's random drop), unless keep masks are given. Dropped
    queries output 0 before the output projection.

    ``forward(x, q_keep=None, k_keep=None)``: ``x [B, N, dim]``; keep masks bool ``[B, heads, N]``
    and ``[B, kv_heads, N]``.
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, drop_rate: float = 0.5, **kwargs):
        super().__init__(dim, heads, kv_heads=kv_heads, **kwargs)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate = drop_rate

    def forward(self, x: Tensor, q_keep: Tensor | None = None, k_keep: Tensor | None = None) -> Tensor:
        q, k, v = self._project(x)
        B, _, N, _ = q.shape
        drawn = q_keep is None and k_keep is None
        if q_keep is None:
            q_keep = torch.rand(B, self.heads, N, device=x.device) >= self.drop_rate
        if k_keep is None:
            k_keep = torch.rand(B, self.kv_heads, N, device=x.device) >= self.drop_rate
        extra = {}
        if drawn:  # our own random masks: a capacity from the rate, checked on the device (no sync)
            extra = {"capacity": capacity_for_rate(N, self.drop_rate, self.block_size), "validate": False}
        o = qk_sparse_attention(q, k, v, q_keep, k_keep, backend=self.backend, block_size=self.block_size, **extra)
        return self._finish(o)


class DashAttention(_SparseSelfAttention):
    """DashAttention causal self-attention (Huang et al., 2026).

    Chunk summaries of the keys (after rotary, i.e. on the keys the attention uses) pooled by a
    learned vector ``w`` per KV head (the parameter ``summary``, ``[kv_heads, head_dim]``,
    zero-initialised = mean pooling), a 1.5-entmax router over earlier chunks whose GQA-averaged
    probabilities select the chunks each query attends to and become the prior of the second
    softmax, so ``w``, the projections and the router all receive gradients. ``router="topk"``
    swaps in a hard top-k router (NSA / MoBA style, no prior) for comparisons at equal sparsity.

    Args:
        dim, heads: model width and query heads. kv_heads: KV heads (GQA), default ``heads``.
        chunk_size: ``C`` (default 64). gamma: router logit multiplier, the sparsity knob.
        estimate_diagonal, sigma: prior mode (see :func:`flexsparse.reference.dash_log_prior`).
        router: ``"entmax"`` or ``"topk"`` (with ``top_k``).
        track_sparsity: after each forward keep ``last_stats = {"kept_fraction", "sparsity"}``
            (0-d tensors, no host synchronisation; off by default: it costs a small reduction).
        head_dim, bias, rotary, rotary_base: projection options.
        backend: as in :func:`flexsparse.dash_attention`: ``"auto"`` (default) runs the fused
            Triton kernels on CUDA for the entmax router (float16/bfloat16/float32, head dim <=
            256; traceable by ``torch.compile(model, fullgraph=True)``) and the flex path for
            top-k; ``"triton"``, ``"flex"`` or ``"reference"`` force one (no fallback).
        q_block: FlexAttention query block (flex backend only).

    ``forward(x)``: ``x [B, N, dim] -> [B, N, dim]``. Incremental decoding (inference):
    ``cache = layer.new_cache(batch, capacity)``, ``layer.prefill(x_prompt, cache)``, then
    ``layer.step(x_new, cache)`` for ``x_new [B, q_len, dim]`` (see
    :mod:`flexsparse.patterns.dash_cache`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        chunk_size: int = 64,
        gamma: float = 1.0,
        estimate_diagonal: bool = False,
        sigma: float = 1.0,
        router: str = "entmax",
        top_k: int | None = None,
        track_sparsity: bool = False,
        q_block: int = 128,
        **kwargs,
    ):
        kwargs.setdefault("block_size", q_block)
        super().__init__(dim, heads, kv_heads=kv_heads, **kwargs)
        if router not in ("entmax", "topk"):
            raise ValueError(f"router must be 'entmax' or 'topk', got {router!r}")
        if router == "topk" and (top_k is None or top_k < 0):
            raise ValueError(f"router='topk' needs top_k >= 0, got {top_k!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.chunk_size, self.gamma = chunk_size, float(gamma)
        self.estimate_diagonal, self.sigma = estimate_diagonal, float(sigma)
        self.router, self.top_k = router, top_k
        self.track_sparsity, self.q_block = track_sparsity, q_block
        self.summary = nn.Parameter(torch.zeros(self.kv_heads, self.head_dim))
        self.last_stats: dict[str, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._project(x)
        res = dash_attention(
            q, k, v, self.summary.to(k.dtype), chunk_size=self.chunk_size, gamma=self.gamma,
            estimate_diagonal=self.estimate_diagonal, sigma=self.sigma, backend=self.backend, router=self.router,
            top_k=self.top_k if self.router == "topk" else None, q_block=self.q_block, return_stats=self.track_sparsity,
        )
        if self.track_sparsity:
            o, stats = res
            self.last_stats = {name: t.detach() for name, t in stats.items()}
        else:
            o = res
        return self._finish(o)

    def new_cache(self, batch: int, capacity: int, *, dtype=None, device=None) -> DashKVCache:
        """An empty :class:`~flexsparse.patterns.dash_cache.DashKVCache` for this layer: keys,
        values ``[batch, kv_heads, capacity, head_dim]`` and the summaries of completed chunks.
        The summaries depend on this layer's ``summary`` vector: a cache belongs to one layer."""
        return DashKVCache(batch, self.kv_heads, capacity, self.head_dim, chunk_size=self.chunk_size, dtype=dtype,
                           device=device)

    def prefill(self, x: Tensor, cache: DashKVCache) -> Tensor:
        """``forward(x)`` for a prompt ``x [B, N, dim]`` that also fills the empty ``cache``."""
        return dash_module_prefill(self, x, cache)

    def step(self, x: Tensor, cache: DashKVCache, **decode_kwargs) -> Tensor:
        """Decode ``x [B, q_len, dim]`` (the next ``q_len`` tokens) against ``cache``, appending
        them: ``[B, q_len, dim]``. Inference only (no gradients); entmax router only."""
        return dash_module_step(self, x, cache, **decode_kwargs)
