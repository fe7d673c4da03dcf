"""DashAttention on FlexAttention: entmax (or top-k) chunk selection as a BlockMask plus the
log-prior as a ``score_mod``.

Pieces (chunk size ``C``, ``nF = N // C`` complete chunks, ``nC = ceil(N / C)`` chunks):

* a *selection* ``p [B, Hkv, N, nF]``: the GQA-averaged 1.5-entmax router output ``pbar``
  (:func:`flexsparse.reference.dash_router`, or the Triton router), or a hard top-k selection
  holding 1.0/0.0 (:func:`topk_selection`). Row ``i`` selects past chunk ``c < c_i`` iff
  ``p[i, c] > 0``; its own (diagonal) chunk ``c_i`` is always selected, causally.
* the *prior table* (:func:`entmax_log_prior_table`): float32 ``[B, Hkv, nC, N]``, chunk-major,
  holding ``log pi`` of every selected (row, chunk) and the finite filler ``-1e30`` elsewhere.
  One table serves both mods: the ``score_mod`` adds ``table[b, h // G, kv // C, q]`` (it is
  differentiable: FlexAttention's captured-buffer gradient flows back through it into the router),
  and the ``mask_mod`` tests ``table[...] > -1e28`` on a detached alias of the same storage
  (mask_mod buffers may not require grad), so no ``-inf`` ever enters arithmetic.
* the *block states* (:mod:`flexsparse.kernels.dash_mask`): query blocks of ``q_block`` rows,
  KV blocks of exactly one chunk; FULL where every row of the block selected the chunk strictly
  before the block, EMPTY where none did. They become the ``BlockMask`` through
  :func:`flexsparse.patterns.blockmask.block_mask_from_states`.

Why chunk-major: inside one FlexAttention tile (``BLOCK_M`` consecutive query rows x one KV block
of one chunk) the score_mod reads ``table[b, h // G, c, q0 : q0 + BLOCK_M]``, one contiguous run
of ``BLOCK_M`` floats broadcast over the tile's columns (and the backward's gradient atomics hit
the same run). A row-major ``[N, nC]`` table would put those ``BLOCK_M`` values ``nC`` floats
apart, one cache line each: that scattered per-token gather is what cost ~4.7x in DESIGN.md §4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flexsparse import reference
from flexsparse.patterns.blockmask import (
    EMPTY,
    FULL,
    PARTIAL,
    _cdiv,
    _choose_impl,
    block_mask_from_states,
)
from flexsparse.patterns.router import entmax_router
from flexsparse.reference import (
    _check_chunk_size,
    _check_device,
    _check_float,
    _check_gamma_sigma,
    _check_qkv,
    _check_w,
    _expand_heads,
    _fmt,
    _shape,
)

__all__ = [
    "DashBlockMask",
    "dash_attention_flex",
    "dash_block_mask",
    "dash_sparsity",
    "entmax_log_prior_table",
    "entmax_router_torch",
    "topk_selection",
]

# Unselected entries of the prior table. Finite, so `score + table` never produces inf/NaN; far
# below any selected value (those are clamped to +-_PRIOR_LIMIT, and exp(-1e25) is 0 anyway).
PRIOR_FILLER = -1.0e30
SELECTED_THRESHOLD = -1.0e28  # selected iff table > SELECTED_THRESHOLD
_PRIOR_LIMIT = 1.0e25

Router = Literal["entmax", "topk"]


# ----------------------------------------------------------------------------------------------
# input checks


def _check_int(name: str, x, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {x!r}")
    return x


def _check_selection(p, N: int, C: int, name: str = "pbar") -> None:
    """``p [B, Hkv, N, N // C]`` floating point."""
    def exp():  # built on failure only (cheap success path under torch.compile)
        return _fmt("B, Hkv, N, N // C", ["?", "?", N, N // C])

    _check_float(name, p, exp)
    if p.dim() != 4 or p.shape[2] != N or p.shape[3] != N // C:
        raise ValueError(f"{name} must be a floating-point tensor of shape {exp()}, got {_shape(p)}")


# ----------------------------------------------------------------------------------------------
# routers


def entmax_router_torch(q: Tensor, kbar: Tensor, *, chunk_size: int, gamma: float = 1.0, scale: float | None = None) -> Tensor:
    """PyTorch twin of the Triton entmax router (the math of :func:`flexsparse.reference.dash_router`
    from given chunk summaries), computed in float32 (float64 for float64 inputs).

    Args:
        q: ``[B, Hq, N, D]``; kbar: ``[B, Hkv, N // C, D]`` chunk summaries (``Hq % Hkv == 0``).
        chunk_size: ``C``. gamma: router logit multiplier. scale: default ``1 / sqrt(D)``.

    Returns:
        pbar ``[B, Hkv, N, N // C]`` (float32, or float64), differentiable: rows in chunk 0 are 0,
        other rows sum to 1 over ``c < c_i``, entries ``c >= c_i`` are 0.
    """
    B, Hq, N, D = q.shape
    Hkv, n_full = kbar.shape[1], kbar.shape[2]
    groups = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    dt = torch.promote_types(q.dtype, torch.float32)
    z = torch.matmul(q.to(dt), _expand_heads(kbar.to(dt), groups).transpose(-1, -2)) * (gamma * scale)
    q_chunk = torch.arange(N, device=q.device) // chunk_size
    past = torch.arange(n_full, device=q.device)[None, :] < q_chunk[:, None]
    p = reference.entmax15(z, mask=past, dim=-1)
    return p.reshape(B, Hkv, groups, N, n_full).mean(dim=2)


def _entmax_router(device: torch.device) -> Callable:
    """The entmax router used by ``router="entmax"``: the Triton kernels on CUDA
    (:func:`flexsparse.patterns.router.entmax_router`), else :func:`entmax_router_torch`."""
    return entmax_router if device.type == "cuda" else entmax_router_torch


def topk_selection(q: Tensor, kbar: Tensor, *, chunk_size: int, top_k: int, scale: float | None = None) -> Tensor:
    """Hard top-k chunk selection (NSA / MoBA / InfLLM-v2 style), in the pbar-like form.

    Per KV head, row ``i`` scores each past chunk ``c < c_i`` by the mean over the ``G`` query
    heads of the group of ``scale * q[b, h, i] . kbar[b, h // G, c]`` and keeps the ``top_k``
    best (ties: the lower chunk index first; rows with at most ``top_k`` past chunks keep them
    all). The diagonal chunk is always attended by the mask and is not part of the selection.

    Args:
        q: ``[B, Hq, N, D]``; kbar: ``[B, Hkv, N // C, D]`` chunk summaries.
        chunk_size: ``C``. top_k: past chunks kept per row (``>= 0``). scale: default ``1/sqrt(D)``.

    Returns:
        float32 ``[B, Hkv, N, N // C]``: 1.0 on selected past chunks, 0 elsewhere; no gradient.
    """
    C = _check_chunk_size(chunk_size)
    _check_int("top_k", top_k, 0)
    _check_float("q", q, "[B, Hq, N, D]")
    if q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor of shape [B, Hq, N, D], got {_shape(q)}")
    B, Hq, N, D = q.shape

    def exp():
        return _fmt("B, Hkv, N // C, D", [B, "?", N // C, D])

    _check_float("kbar", kbar, exp)
    if kbar.dim() != 4 or kbar.shape[0] != B or kbar.shape[2] != N // C or kbar.shape[3] != D:
        raise ValueError(f"kbar must be a floating-point tensor of shape {exp()}, got {_shape(kbar)}")
    Hkv, n_full = kbar.shape[1], kbar.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q has Hq = {Hq} heads, which must be a multiple of the Hkv = {Hkv} heads of kbar")
    _check_device(q, "q", kbar=kbar)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    G = Hq // Hkv
    with torch.no_grad():
        dt = torch.promote_types(q.dtype, torch.float32)
        s = torch.matmul(q.to(dt), _expand_heads(kbar.to(dt), G).transpose(-1, -2)) * scale  # [B, Hq, N, nF]
        s = s.view(B, Hkv, G, N, n_full).mean(dim=2)
        q_chunk = torch.arange(N, device=q.device) // C
        past = torch.arange(n_full, device=q.device)[None, :] < q_chunk[:, None]  # [N, nF]
        s = torch.where(past, s, float("-inf"))
        sel = torch.zeros(B, Hkv, N, n_full, dtype=torch.float32, device=q.device)
        k = min(top_k, n_full)
        if k > 0:
            # stable descending sort: equal scores keep ascending chunk order
            vals, idx = torch.sort(s, dim=-1, descending=True, stable=True)
            vals, idx = vals[..., :k], idx[..., :k]
            sel.scatter_(-1, idx, (vals > float("-inf")).to(torch.float32))
        sel = torch.where(past, sel, 0.0)  # masked entries that slipped in (all -inf rows) -> 0
    return sel


# ----------------------------------------------------------------------------------------------
# prior table


def entmax_log_prior_table(
    pbar: Tensor,
    N: int,
    *,
    chunk_size: int = 64,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
) -> Tensor:
    """The DashAttention log-prior in chunk-major layout, for a FlexAttention ``score_mod``.

    ``table[b, h, c, i]`` equals ``reference.dash_log_prior(pbar, N, ...)[b, h, i, c]`` on the
    selected entries (past chunks with ``pbar > 0``: ``log pbar``, or the ``estimate_diagonal``
    form; the diagonal chunk: 0) and holds the finite :data:`PRIOR_FILLER` (``-1e30``) where the
    reference has ``-inf``, so the same table encodes the selection:
    ``selected = table > SELECTED_THRESHOLD``. Selected values are clamped to ``+-1e25`` (their
    ``exp`` is 0 or overflows long before; keeps them apart from the filler).

    Args:
        pbar: ``[B, Hkv, N, N // C]`` floating point (router output or a 1.0/0.0 selection),
            differentiable.
        N: sequence length. chunk_size: ``C``.
        estimate_diagonal, sigma: prior mode, see :func:`flexsparse.reference.dash_log_prior`.

    Returns:
        float32 contiguous ``[B, Hkv, ceil(N / C), N]``; gradients flow to ``pbar`` through the
        selected entries only (exactly 0 elsewhere).
    """
    C = _check_chunk_size(chunk_size)
    _check_gamma_sigma(0.0, sigma)
    _check_int("N", N, 0)
    _check_selection(pbar, N, C)
    B, Hkv = pbar.shape[:2]
    n_full, n_chunks = N // C, _cdiv(N, C)
    dev = pbar.device
    dt = torch.promote_types(pbar.dtype, torch.float32)
    pt = pbar.to(dt).transpose(-1, -2)  # [B, Hkv, nF, N]
    q_chunk = torch.arange(N, device=dev) // C
    past = torch.arange(n_full, device=dev)[:, None] < q_chunk[None, :]  # [nF, N]
    sel = past & (pt > 0)
    # log only where selected; the safe inner branch keeps unselected gradients at exactly 0
    log_p = torch.where(sel, torch.log(torch.where(sel, pt, 1.0)), 0.0)
    if estimate_diagonal:
        n_sel = sel.sum(dim=-2, keepdim=True)
        log_g = log_p.sum(dim=-2, keepdim=True) / n_sel.clamp(min=1).to(dt)
        log_p = (log_p - log_g) / sigma
    vals = torch.where(sel, log_p.clamp(-_PRIOR_LIMIT, _PRIOR_LIMIT), PRIOR_FILLER).to(torch.float32)
    if n_chunks > n_full:  # the trailing partial chunk is only ever a diagonal chunk
        vals = torch.cat([vals, vals.new_full((B, Hkv, n_chunks - n_full, N), PRIOR_FILLER)], dim=-2)
    diag = torch.arange(n_chunks, device=dev)[:, None] == q_chunk[None, :]  # [nC, N]
    return torch.where(diag, 0.0, vals).contiguous()


# ----------------------------------------------------------------------------------------------
# block states (PyTorch twin of flexsparse.kernels.dash_mask)


def _block_states_torch(
    p: Tensor, N: int, C: int, q_block: int, groups: int, with_counts: bool
) -> tuple[Tensor, Tensor | None]:
    """PyTorch twin of :func:`flexsparse.kernels.dash_mask.dash_block_states`."""
    B, Hkv, _, n_full = p.shape
    n_chunks, nQ = _cdiv(N, C), _cdiv(N, q_block)
    dev = p.device
    p = p.detach()
    q_chunk = torch.arange(N, device=dev) // C
    past = torch.arange(n_full, device=dev)[None, :] < q_chunk[:, None]  # [N, nF]
    sel_past = past & (p > 0)  # [B, Hkv, N, nF]
    chunk = torch.arange(n_chunks, device=dev)
    sel = torch.cat([sel_past, sel_past.new_zeros(B, Hkv, N, n_chunks - n_full)], dim=-1)
    sel = sel | (chunk[None, :] == q_chunk[:, None])  # [B, Hkv, N, nC]
    pad = nQ * q_block - N
    any_ = torch.cat([sel, sel.new_zeros(B, Hkv, pad, n_chunks)], 2).view(B, Hkv, nQ, q_block, n_chunks).any(3)
    all_ = torch.cat([sel, sel.new_ones(B, Hkv, pad, n_chunks)], 2).view(B, Hkv, nQ, q_block, n_chunks).all(3)
    first_chunk = (torch.arange(nQ, device=dev) * q_block) // C
    full = all_ & (chunk[None, :] < first_chunk[:, None])
    states = torch.where(full, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
    states = states.repeat_interleave(groups, dim=1).contiguous()
    counts = sel_past.sum(-1, dtype=torch.int32) if with_counts else None
    return states, counts


# ----------------------------------------------------------------------------------------------
# fused Triton path: states, counts and table in one launch, with a PyTorch backward


def _table_backward(p: Tensor, d_table: Tensor, C: int, estimate_diagonal: bool, sigma: float) -> Tensor:
    """Gradient of the prior table with respect to ``p [B, Hkv, N, nF]`` (clamping ignored: it
    only bites at ``sigma`` below ~1e-23)."""
    N, n_full = p.shape[2], p.shape[3]
    dt = torch.promote_types(p.dtype, torch.float32)
    q_chunk = torch.arange(N, device=p.device) // C
    past = torch.arange(n_full, device=p.device)[None, :] < q_chunk[:, None]
    pp = p.to(dt)
    sel = past & (pp > 0)
    g = torch.where(sel, d_table[:, :, :n_full, :].transpose(-1, -2).to(dt), 0.0)  # d log pi
    if estimate_diagonal:  # log pi_c = (l_c - mean_sel l) / sigma
        n_sel = sel.sum(dim=-1, keepdim=True).clamp(min=1).to(dt)
        g = torch.where(sel, (g - g.sum(dim=-1, keepdim=True) / n_sel) / sigma, 0.0)
    return torch.where(sel, g / torch.where(sel, pp, 1.0), 0.0).to(p.dtype)


class _FusedMaskTables(torch.autograd.Function):
    """``p -> (table, states, counts)`` by :func:`flexsparse.kernels.dash_mask.dash_mask_tables`
    (through its registered op, :func:`flexsparse.ops.dash_mask_tables`, so it traces under
    ``torch.compile``); only the table is differentiable."""

    @staticmethod
    def forward(ctx, p, C, q_block, groups, with_counts, estimate_diagonal, sigma):
        from flexsparse.ops import dash_mask_tables

        states, counts, table = dash_mask_tables(
            p, chunk_size=C, q_block=q_block, groups=groups, with_counts=with_counts,
            estimate_diagonal=estimate_diagonal, sigma=sigma, filler=PRIOR_FILLER, limit=_PRIOR_LIMIT,
        )
        ctx.save_for_backward(p)
        ctx.consts = (C, estimate_diagonal, sigma)
        ctx.mark_non_differentiable(states, *([] if counts is None else [counts]))
        return table, states, counts

    @staticmethod
    def backward(ctx, d_table, d_states, d_counts):
        (p,) = ctx.saved_tensors
        d_p = None if d_table is None else _table_backward(p, d_table, *ctx.consts)
        return d_p, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# the public mask builder


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _make_mods(table: Tensor, groups: int, C: int, with_prior: bool, exact: bool) -> tuple[Callable, Callable | None]:
    G = groups
    sel = table.detach()  # mask_mod buffers may not require grad; same storage as the score table

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (sel[b, h // G, kv_idx // C, q_idx] > SELECTED_THRESHOLD)

    if not exact:
        mask_mod = _causal

    if not with_prior:
        return mask_mod, None

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[b, h // G, kv_idx // C, q_idx]

    return mask_mod, score_mod


@dataclass(frozen=True)
class DashBlockMask:
    """A DashAttention selection as FlexAttention inputs.

    Use ``flex_attention(q, k, v, score_mod=dm.score_mod, block_mask=dm.block_mask,
    enable_gqa=True)``; ``dm.compose(mod)`` restricts the selection by your own ``mask_mod``.

    Attributes:
        block_mask: ``BlockMask`` over ``(N, N)``, ``Hq`` heads, block size ``(q_block, C)``, with
            the exact element ``mask_mod``: ``q >= kv AND row q selected kv's chunk``.
        score_mod: adds the log-prior ``table[b, h // G, kv // C, q]`` (None for a hard selection
            without prior, e.g. top-k).
        table: float32 ``[B, Hkv, ceil(N / C), N]`` prior table (see
            :func:`entmax_log_prior_table`); differentiable when the selection was.
        states: int8 ``[B, Hq, ceil(N / q_block), ceil(N / C)]`` block states.
        selection: the (detached) ``[B, Hkv, N, N // C]`` selection the mask was built from.
        counts: int32 ``[B, Hkv, N]`` selected past chunks per row (when asked for), else None.
        chunk_size, groups: ``C`` and ``G = Hq / Hkv``.
    """

    block_mask: BlockMask
    score_mod: Callable | None
    table: Tensor
    states: Tensor
    selection: Tensor
    counts: Tensor | None
    chunk_size: int
    groups: int

    @property
    def mask_mod(self) -> Callable:
        """The exact element mask ``(b, h, q_idx, kv_idx) -> bool``."""
        return self.block_mask.mask_mod

    def compose(self, mask_mod: Callable, states: Tensor | None = None) -> BlockMask:
        """A ``BlockMask`` for ``selection AND mask_mod`` (document masks, sliding windows, ...).

        Args:
            mask_mod: ``(b, h, q_idx, kv_idx) -> bool`` in original positions (``h`` a query head).
            states: optional int8 block states of ``mask_mod`` at the same block size
                (``[B or 1, Hq or 1, nQ, nC]``, e.g. ``block_states(create_block_mask(...))``):
                blocks EMPTY there become EMPTY (skipped), FULL in both stay FULL. Without it,
                FULL blocks become PARTIAL (the user mask may cut into them) and nothing more is
                skipped.

        Returns:
            A ``BlockMask`` (use with this object's ``score_mod``).
        """
        base = self.block_mask.mask_mod

        def mod(b, h, q_idx, kv_idx):
            return base(b, h, q_idx, kv_idx) & mask_mod(b, h, q_idx, kv_idx)

        own = self.states
        new = torch.where(own == FULL, PARTIAL, own)
        if states is not None:
            if not isinstance(states, Tensor) or states.dtype != torch.int8 or states.dim() != 4 or (
                tuple(states.shape[2:]) != tuple(own.shape[2:])
                or states.shape[0] not in (1, own.shape[0])
                or states.shape[1] not in (1, own.shape[1])
            ):
                raise ValueError(
                    f"states must be an int8 tensor of shape {_fmt('B or 1, Hq or 1, nQ, nC', ['?', '?', *own.shape[2:]])}, "
                    f"got {_shape(states)}"
                )
            states = states.to(own.device)
            new = torch.where(states == EMPTY, EMPTY, torch.where((own == FULL) & (states == FULL), FULL, new))
        bm = self.block_mask
        return block_mask_from_states(
            new.to(torch.int8).contiguous(), seq_lengths=bm.seq_lengths, block_size=bm.BLOCK_SIZE, mask_mod=mod
        )

    def sparsity(self) -> tuple[Tensor, Tensor]:
        """``(kept_fraction, sparsity)`` of the selection, see :func:`dash_sparsity`."""
        return dash_sparsity(self.counts if self.counts is not None else self.selection, chunk_size=self.chunk_size)


def dash_block_mask(
    pbar: Tensor,
    N: int,
    *,
    chunk_size: int = 64,
    groups: int,
    q_block: int = 128,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
    with_prior: bool = True,
    with_counts: bool = False,
    exact_mask_mod: bool = True,
    impl: str = "auto",
) -> DashBlockMask:
    """Build the FlexAttention inputs of a DashAttention selection (the public mask builder).

    Args:
        pbar: ``[B, Hkv, N, N // C]`` floating point: the router's GQA-averaged entmax
            probabilities (differentiable: the prior's gradient flows back into it), or a hard
            1.0/0.0 selection (e.g. :func:`topk_selection`). Row ``i`` selects past chunk
            ``c < i // C`` iff ``pbar[..., i, c] > 0``, plus its own chunk (causally).
        N: sequence length (``>= 1``). chunk_size: ``C``, also the KV block size.
        groups: ``G = Hq / Hkv``; query head ``h`` uses KV head ``h // G``.
        q_block: query rows per block (128 on the GPU).
        estimate_diagonal, sigma: prior mode, see :func:`flexsparse.reference.dash_log_prior`.
        with_prior: attach the ``score_mod`` adding the log-prior (False: a pure mask, e.g. top-k).
        with_counts: also count the selected past chunks of every row (for :func:`dash_sparsity`;
            free in the Triton kernel).
        exact_mask_mod: True: the element mask_mod is ``q >= kv AND selected``. False (needs
            ``with_prior``): the mask_mod is only causal and the ``score_mod``'s ``-1e30`` filler
            removes unselected keys (their weight underflows to exactly 0, gradients too, and every
            row keeps its diagonal): the same attention, one table read fewer per element of
            PARTIAL blocks, but ``block_mask.mask_mod`` alone no longer describes the pattern.
        impl: ``"triton"`` (one kernel writes the states, counts and prior table; its backward is
            PyTorch), ``"torch"`` (:func:`entmax_log_prior_table` and a PyTorch twin of the
            kernel) or ``"auto"`` (Triton where it runs); the BlockMask lists follow the same.

    Returns:
        A :class:`DashBlockMask`.
    """
    C = _check_chunk_size(chunk_size)
    _check_int("N", N, 1)
    _check_int("groups", groups, 1)
    _check_int("q_block", q_block, 1)
    _check_gamma_sigma(0.0, sigma)
    _check_selection(pbar, N, C)
    if not exact_mask_mod and not with_prior:
        raise ValueError("exact_mask_mod=False needs with_prior=True (the score_mod then removes unselected keys)")
    impl = _choose_impl(impl, pbar.device)
    if impl == "triton":  # one launch: states, counts and table
        table, states, counts = _FusedMaskTables.apply(pbar, C, q_block, groups, with_counts, estimate_diagonal, sigma)
    else:
        table = entmax_log_prior_table(pbar, N, chunk_size=C, estimate_diagonal=estimate_diagonal, sigma=sigma)
        states, counts = _block_states_torch(pbar, N, C, q_block, groups, with_counts)
    mask_mod, score_mod = _make_mods(table, groups, C, with_prior, exact_mask_mod)
    bm = block_mask_from_states(
        states, seq_lengths=(N, N), block_size=(q_block, C), mask_mod=mask_mod, impl=impl, validate=False
    )
    return DashBlockMask(bm, score_mod, table, states, pbar.detach(), counts, C, groups)


# ----------------------------------------------------------------------------------------------
# sparsity


def dash_sparsity(selection: Tensor, *, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Kept fraction and paper-style sparsity of a DashAttention selection.

    The same numbers as :func:`flexsparse.reference.dash_selection_stats` (see there for the
    definitions: active chunks = selected past chunks + the diagonal one; sparsity averages
    ``1 - attended tokens / N`` over rows past the first 4096 when ``N > 4096``), from per-row
    counts: O(B * Hkv * N) work on the device, no host synchronisation.

    Args:
        selection: either the selection ``[B, Hkv, N, N // C]`` (floating point, selected where
            ``> 0`` on past chunks), or int32/int64 counts ``[B, Hkv, N]`` of selected past chunks
            per row (``DashBlockMask.counts``).
        chunk_size: ``C``.

    Returns:
        ``(kept_fraction, sparsity)``, float32 0-d tensors on the selection's device.
    """
    C = _check_chunk_size(chunk_size)
    if isinstance(selection, Tensor) and selection.dim() == 3 and not selection.dtype.is_floating_point:
        counts = selection
        N = counts.shape[-1]
    elif isinstance(selection, Tensor) and selection.dim() == 4 and selection.dtype.is_floating_point:
        N = selection.shape[2]
        _check_selection(selection, N, C, "selection")
        q_chunk = torch.arange(N, device=selection.device) // C
        past = torch.arange(N // C, device=selection.device)[None, :] < q_chunk[:, None]
        counts = (past & (selection.detach() > 0)).sum(-1)
    else:
        raise ValueError(
            "selection must be a floating-point tensor of shape [B, Hkv, N, N // C] or integer "
            f"counts of shape [B, Hkv, N], got {_shape(selection)}"
        )
    dev = counts.device
    if counts.numel() == 0:
        return torch.ones((), device=dev), torch.zeros((), device=dev)
    # the same float32 operations, on the same values, as reference.dash_selection_stats
    q_chunk = torch.arange(N, device=dev) // C
    counts = counts.to(torch.float32)
    n_active = counts + 1.0
    kept = (n_active / (q_chunk + 1).to(torch.float32)).mean()
    diag_len = (N - q_chunk * C).clamp(max=C).to(torch.float32)
    tokens = counts * C + diag_len
    per_row = 1.0 - tokens / N
    if N > reference._SPARSITY_SKIP:
        per_row = per_row[..., reference._SPARSITY_SKIP :]
    sparsity = per_row.mean(dim=-1).mean()
    return kept, sparsity


# ----------------------------------------------------------------------------------------------
# the op


_compiled: dict[bool, Callable] = {}


def _compiled_flex(autotune: bool) -> Callable:
    fn = _compiled.get(autotune)
    if fn is None:
        # static shapes (see flexsparse.functional._compiled_flex); max-autotune only where the
        # backward needs it: with 64-wide KV blocks the default backward config (N1 = 128 on
        # sm90) does not divide the block and is dropped before kernel_options apply
        fn = torch.compile(flex_attention, dynamic=False, options={"max_autotune": True} if autotune else None)
        _compiled[autotune] = fn
    return fn


def _flex(*args, autotune: bool = False, **kwargs):
    """FlexAttention compiled on CUDA (plain ``flex_attention`` when already compiling); each
    new signature compiles once, up to 64 of them are kept."""
    if torch.compiler.is_compiling():
        return flex_attention(*args, **kwargs)
    cfg = torch._dynamo.config
    limit = max(64, cfg.cache_size_limit)
    with cfg.patch(cache_size_limit=limit, accumulated_cache_size_limit=max(limit, cfg.accumulated_cache_size_limit)):
        return _compiled_flex(autotune)(*args, **kwargs)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two ``<= cap`` dividing ``n``."""
    return min(n & -n, cap)


def gpu_kernel_options(dtype: torch.dtype, chunk_size: int, q_block: int, user: dict | None = None) -> dict:
    """FlexAttention ``kernel_options`` for KV blocks of one chunk: forward tiles
    ``BLOCK_M x BLOCK_N`` = 64 x 64 (fp16/bf16, 2 stages) and 64 x 64 backward tiles, shrunk to divide
    ``q_block`` and ``chunk_size``; ``user`` entries win (an unprefixed key replaces both the
    ``fwd_`` and ``bwd_`` defaults of that name)."""
    low = dtype in (torch.float16, torch.bfloat16)
    m, n = _pow2_divisor(q_block, 128 if low else 64), _pow2_divisor(chunk_size, 64 if low else 32)
    bm, bn = _pow2_divisor(q_block, 64 if low else 32), _pow2_divisor(chunk_size, 64 if low else 32)
    if min(m, n, bm, bn) < 16:
        raise ValueError(
            f"on the GPU, chunk_size and q_block must be multiples of 16 (FlexAttention tiles), "
            f"got chunk_size={chunk_size}, q_block={q_block}"
        )
    # forward: 128 x 64 tiles with 3 stages need 256 KiB of shared memory on the H100 with D=128
    # (no valid config); 64 x 64 with 2 stages compiled and ran fastest of the variants measured
    # (benchmarks/probe_dash_flex.py: 4.2 ms vs 4.5-17 ms at 8k, 56% kept)
    m = min(m, 64)
    opts = {
        "fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_stages": 2, "fwd_num_warps": 4,
        # backward: BLOCK_N1 % BLOCK_M1 == 0 and BLOCK_M2 % BLOCK_N2 == 0
        "bwd_BLOCK_M1": min(bm, bn), "bwd_BLOCK_N1": bn, "bwd_BLOCK_M2": bm, "bwd_BLOCK_N2": min(bm, bn),
    }
    for key, val in (user or {}).items():
        if not key.startswith(("fwd_", "bwd_")):
            opts.pop("fwd_" + key, None)
            opts.pop("bwd_" + key, None)
        opts[key] = val
    return opts


def dash_attention_flex(
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
    router: Router | Callable = "entmax",
    top_k: int | None = None,
    q_block: int = 128,
    kernel_options: dict | None = None,
    return_stats: bool = False,
    exact_mask_mod: bool = True,
    impl: str = "auto",
    autotune: bool | None = None,
):
    """DashAttention through FlexAttention: the function of :func:`flexsparse.reference.dash_attention`.

    Stage 0 chunk summaries (PyTorch), stage 1 router, then one FlexAttention call with the
    entmax BlockMask (:func:`dash_block_mask`) and the log-prior ``score_mod``. Compiled on CUDA
    (training with 64-wide KV blocks compiles with max-autotune, see ``_compiled_flex``); on CPU
    eager FlexAttention, inference only (inputs requiring grad raise).

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` (one dtype, ``Hq % Hkv == 0``);
            w: ``[Hkv, D]`` summary vectors.
        chunk_size: ``C`` (the KV block size). gamma: router logit multiplier (entmax only).
        estimate_diagonal, sigma: prior mode (entmax only), see ``reference.dash_log_prior``.
        scale: logit scale of router and attention, default ``1 / sqrt(D)``.
        router: ``"entmax"`` (the DashAttention router: Triton kernel on CUDA when available,
            else :func:`entmax_router_torch`), ``"topk"`` (:func:`topk_selection`, a hard mask
            with no prior; ``w`` gets no gradient), or a callable with the entmax router's
            contract ``router(q, kbar, chunk_size=, gamma=, scale=) -> pbar [B, Hkv, N, N // C]``.
        top_k: past chunks per row for ``router="topk"``.
        q_block: query rows per block. kernel_options: passed to FlexAttention (on CUDA merged
            over :func:`gpu_kernel_options`).
        return_stats: also return ``{"kept_fraction", "sparsity"}`` (see :func:`dash_sparsity`).
        exact_mask_mod: see :func:`dash_block_mask` (entmax routers only; top-k always uses the
            exact mask).
        impl: mask kernels (``"auto"``, ``"triton"``, ``"torch"``).
        autotune: compile FlexAttention with max-autotune (CUDA). Default: only for training with
            KV blocks that are not multiples of 128 (see ``_compiled_flex``).

    Returns:
        ``[B, Hq, N, D]`` in ``q.dtype``, or ``(out, stats)``.
    """
    C = _check_chunk_size(chunk_size)
    _check_gamma_sigma(gamma, sigma)
    B, Hq, Hkv, N, _, D = _check_qkv(q, k, v, self_attention=True)
    _check_w(w, Hkv, D, k)
    _check_int("q_block", q_block, 1)
    if router == "topk":
        if top_k is None:
            raise ValueError("router='topk' needs top_k (past chunks kept per query)")
        _check_int("top_k", top_k, 0)
    elif not (router == "entmax" or callable(router)):
        raise ValueError(f"router must be 'entmax', 'topk' or a callable, got {router!r}")
    elif top_k is not None:
        raise ValueError("top_k is only used with router='topk'")
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, w)):
        raise RuntimeError(
            "dash_attention_flex on CPU is inference-only (CPU FlexAttention does not support autograd): "
            "call under torch.no_grad() or use flexsparse.reference.dash_attention"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    G = Hq // Hkv
    if N == 0:
        out = q.new_zeros(q.shape)
        if return_stats:
            kept, sp = dash_sparsity(torch.zeros(B, Hkv, 0, dtype=torch.int32, device=q.device), chunk_size=C)
            return out, {"kept_fraction": kept, "sparsity": sp}
        return out

    if router == "topk":
        with torch.no_grad():
            kbar = reference.chunk_summaries(k, w, C)
        p = topk_selection(q, kbar, chunk_size=C, top_k=top_k, scale=scale)
        dm = dash_block_mask(p, N, chunk_size=C, groups=G, q_block=q_block, with_prior=False, with_counts=return_stats, impl=impl)
    else:
        fn = router if callable(router) else _entmax_router(q.device)
        kbar = reference.chunk_summaries(k, w, C)
        p = fn(q, kbar, chunk_size=C, gamma=gamma, scale=scale)
        dm = dash_block_mask(
            p, N, chunk_size=C, groups=G, q_block=q_block, estimate_diagonal=estimate_diagonal, sigma=sigma,
            with_counts=return_stats, exact_mask_mod=exact_mask_mod, impl=impl,
        )

    kw = dict(score_mod=dm.score_mod, block_mask=dm.block_mask, scale=scale, enable_gqa=G > 1)
    if q.is_cuda:
        train = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v)) or dm.table.requires_grad)
        if autotune is None:
            autotune = train and (C % 128 != 0 or q_block % 128 != 0)
        out = _flex(q, k, v, kernel_options=gpu_kernel_options(q.dtype, C, q_block, kernel_options), autotune=autotune, **kw)
    else:
        out = flex_attention(q, k, v, kernel_options=kernel_options, **kw)
    if not return_stats:
        return out
    kept, sp = dm.sparsity()
    return out, {"kept_fraction": kept, "sparsity": sp}
