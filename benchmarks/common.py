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
