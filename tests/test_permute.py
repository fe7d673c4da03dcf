"""Row gather kernel (sorted <-> original order) and its autograd rule."""

import pytest
import torch

from flexsparse.kernels.permute import gather_rows as kernel
from flexsparse.patterns.permuted import gather_rows


@pytest.mark.triton
@pytest.mark.parametrize("D", [1, 8, 24, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_picks_rows_and_zero_fills(device, D, dtype):
    B, H, M, L = 2, 3, 37, 41
    x = torch.randn(B, M, H, D, device=device).to(dtype).transpose(1, 2)  # strided like a projection
    idx = torch.randint(-3, M + 3, (B, H, L), device=device)
    out = kernel(x, idx)
    valid = (idx >= 0) & (idx < M)
    want = torch.gather(x, 2, idx.clamp(0, M - 1).unsqueeze(-1).expand(B, H, L, D))
    want = torch.where(valid.unsqueeze(-1), want, torch.zeros((), dtype=dtype, device=device))
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, want)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_gather_backward_is_the_inverse_gather(path, monkeypatch):
    from flexsparse.patterns import permuted

    if path == "torch":
        monkeypatch.setattr(permuted, "_use_triton_gather", lambda x: False)
    B, H, N, L, D = 2, 2, 30, 20, 5
    # an injective partial map: slots 0..L-1 read distinct rows, 4 slots read nothing (index N)
    perm = torch.stack([torch.randperm(N) for _ in range(B * H)]).view(B, H, N)
    src = perm[..., :L].clone()
    src[..., -4:] = N
    dst = torch.full((B, H, N), L)
    dst.scatter_(-1, src[..., :-4], torch.arange(L - 4).expand(B, H, L - 4).contiguous())
    x = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    out = gather_rows(x, src, dst)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    xe = x.detach().clone().requires_grad_()
    padded = torch.cat([xe, xe.new_zeros(B, H, 1, D)], 2)
    want = torch.gather(padded, 2, src.unsqueeze(-1).expand(B, H, L, D))
    (dwant,) = torch.autograd.grad(want, xe, g)
    assert torch.equal(out, want.detach())
    assert torch.equal(dx, dwant)
