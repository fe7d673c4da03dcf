"""Timing helpers shared by the benchmark scripts (GPU only)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from rich.console import Console

console = Console(width=160)


def graph_time(fn: Callable[[], object], timer: Callable[[Callable[[], object]], float]) -> float | None:
    """``timer`` applied to a CUDA-graph replay of ``fn`` (GPU time, no Python or launch
    overhead), or None if ``fn`` cannot be captured (the reason is printed)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return timer(g.replay)
    except Exception as e:  # noqa: BLE001 - report instead
        console.print(f"[yellow]not capturable: {type(e).__name__}: {str(e)[:160]}[/]")
        torch.cuda.synchronize()
        return None


def causal_block_mask(N: int, device="cuda", block: int = 128):
    """Dense causal ``BlockMask`` for the FlexAttention baselines, built from block states by
    flexsparse (FULL below the diagonal, PARTIAL on it) instead of a compiled
    ``create_block_mask``, whose compilation for a new length took minutes inside the training
    benchmark."""
    import flexsparse

    n = -(-N // block)
    i = torch.arange(n, device=device)
    states = torch.where(i[:, None] > i[None, :], flexsparse.FULL,
                         torch.where(i[:, None] == i[None, :], flexsparse.PARTIAL, flexsparse.EMPTY))
    return flexsparse.block_mask_from_states(states.to(torch.int8)[None, None], seq_lengths=(N, N),
                                             block_size=block, mask_mod=lambda b, h, q, k: q >= k)
