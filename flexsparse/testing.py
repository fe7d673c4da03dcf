"""Test helpers shared by the test suite and the benchmarks (not public API).

The tolerance rule: a fast path computed in low precision must be about as close to the float64
reference as plain PyTorch at the same low precision is. ``assert_close_to_ref`` checks
``max|fast - ref64| <= factor * max|lowp - ref64| + floor`` and that nothing is NaN.
"""

from __future__ import annotations

import torch

__all__ = ["assert_close_to_ref", "max_abs_err", "nan_like", "random_qkv", "FLOOR"]

# A small absolute floor so that exactly representable results (e.g. all-zero rows) do not
# demand a zero error from the fast path. Per dtype, in units of the dtype's resolution.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute elementwise difference, computed in float64 (NaN if either has NaN)."""
    d = (a.double() - b.double()).abs()
    if d.numel() == 0:
        return 0.0
    if torch.isnan(d).any():
        return float("nan")
    return d.max().item()


def assert_close_to_ref(
    name: str,
    fast: torch.Tensor,
    ref64: torch.Tensor,
    lowp: torch.Tensor | None = None,
    *,
    factor: float = 2.0,
    floor: float | None = None,
) -> None:
    """Assert ``fast`` is within ``factor`` x the low-precision baseline's error of ``ref64``.

    Args:
        name: label used in the failure message (e.g. ``"dq"``).
        fast: output of the path under test, any float dtype.
        ref64: the float64 reference, same shape.
        lowp: the plain-PyTorch reference computed at ``fast``'s precision; if None the bound is
            ``floor`` alone (use for float32/float64 checks).
        factor: allowed multiple of the baseline error.
        floor: absolute slack; defaults to ``FLOOR[fast.dtype]``.
    """
    if fast.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(fast.shape)} != reference {tuple(ref64.shape)}")
    if torch.isnan(fast).any():
        raise AssertionError(f"{name}: fast path produced NaN")
    if floor is None:
        floor = FLOOR.get(fast.dtype, 1e-5)
    err = max_abs_err(fast, ref64)
    base = 0.0 if lowp is None else max_abs_err(lowp, ref64)
    bound = factor * base + floor
    if not err <= bound:
        raise AssertionError(
            f"{name}: max abs error {err:.3e} > bound {bound:.3e} "
            f"(baseline error {base:.3e} x {factor} + floor {floor:.1e})"
        )


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``t`` filled with NaN (float) or -1 (int): poison for outputs."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, -1)


def random_qkv(
    B: int,
    Hq: int,
    Hkv: int,
    N: int,
    D: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    requires_grad: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random ``q [B,Hq,N,D]``, ``k, v [B,Hkv,N,D]`` (standard normal) in ``dtype``."""
    q = torch.randn(B, Hq, N, D, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v
