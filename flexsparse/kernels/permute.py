"""Triton kernel: gather rows of ``[B, H, M, D]`` by a per-(batch, head) index, zero-filling.

``out[b, h, i, :] = x[b, h, idx[b, h, i], :]`` when ``0 <= idx[b, h, i] < M``, else 0.

The permuted patterns (hash, drop) move queries, keys, values and outputs between original
and sorted order with it, forward and backward (the backward of a gather by an injective
index is a gather by its inverse, so no atomics are needed). One program copies ``BLOCK_R``
rows of one (batch, head); ``x`` may have any strides (e.g. the transposed view a qkv
projection produces), the output is contiguous. Memory-bound: one read and one write of each
kept row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["H", "M", "L"])
def _gather_rows_kernel(
    x_ptr, idx_ptr, out_ptr, H, M, L, D,
    sxb, sxh, sxm,  # x strides in elements (last dim contiguous)
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rb = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < L
    src = tl.load(idx_ptr + bh * L + rows, mask=rmask, other=-1).to(tl.int64)
    valid = rmask & (src >= 0) & (src < M)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    x_rows = x_ptr + b * sxb + h * sxh + src * sxm
    vals = tl.load(x_rows[:, None] + cols[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
    out_rows = out_ptr + (bh * L + rows) * D
    tl.store(out_rows[:, None] + cols[None, :], vals, mask=rmask[:, None] & cmask[None, :])


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Contiguous ``[B, H, L, D]`` rows of ``x [B, H, M, D]`` picked by int ``idx [B, H, L]``;
    indices outside ``[0, M)`` give zero rows."""
    B, H, M, D = x.shape
    L = idx.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    idx = idx.contiguous()
    out = torch.empty(B, H, L, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, 8192 // block_d))
    grid = (triton.cdiv(L, block_r), B * H)
    _gather_rows_kernel[grid](
        x, idx, out, H, M, L, D, x.stride(0), x.stride(1), x.stride(2),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return out
