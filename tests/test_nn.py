"""SCFA layers: shapes, GQA, deterministic LSH buffer, flex path (no grad) vs reference path,
gradients through the CPU reference path; GPU fwd+bwd through the compiled flex path."""

import pytest
import torch

from flexsparse import HashSparseAttention, QKSparseAttention
from flexsparse import reference as ref
from flexsparse.testing import assert_close_to_ref

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize("rotary", [False, True])
def test_hash_layer_flex_matches_reference_and_is_deterministic(rotary):
    layer = HashSparseAttention(32, 4, kv_heads=2, n_buckets=4, rotary=rotary, block_size=16).double()
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)  # CPU, no grad: flex
        layer.backend = "reference"
        y_ref = layer(x)
    assert y.shape == x.shape
    assert_close_to_ref("y", y, y_ref, floor=1e-10)
    # buckets come from the buffer: same input, same output; the buffer is saved in state_dict
    assert "rotations" in layer.state_dict()
    with torch.no_grad():
        assert torch.equal(layer(x), y_ref)


def test_hash_layer_buckets_and_redraw():
    layer = HashSparseAttention(16, 2, n_buckets=8)
    x = torch.randn(1, 2, 10, 8)
    b = layer.buckets(x, layer.rotations)
    assert b.dtype == torch.int32 and b.shape == (1, 2, 10) and b.min() >= 0 and b.max() < 8
    # bucket of x and of -x are opposite halves (angular LSH)
    assert torch.equal(layer.buckets(-x, layer.rotations), (b + 4) % 8)
    redraw = HashSparseAttention(16, 2, n_buckets=8, redraw=True).requires_grad_(False)
    x = torch.randn(1, 200, 16)
    assert not torch.equal(redraw(x), redraw(x))


def test_hash_layer_trains_on_cpu():
    layer = HashSparseAttention(32, 4, kv_heads=1, n_buckets=2)
    x = torch.randn(2, 33, 32, requires_grad=True)
    qb = torch.zeros(2, 4, 33, dtype=torch.int32)  # one bucket: plain causal attention
    kb = torch.zeros(2, 1, 33, dtype=torch.int32)
    y = layer(x, qb, kb)  # grad needed on CPU: auto picks the reference
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    q, k, v = layer._project(x)
    want = layer._finish(ref.attention(q, k, v, mask=ref.causal_mask(33)))
    assert_close_to_ref("y", y, want, floor=1e-5)


def test_qk_layer():
    layer = QKSparseAttention(32, 4, kv_heads=2, drop_rate=0.5, block_size=16).double()
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    qk, kk = torch.rand(2, 4, 50) < 0.5, torch.rand(2, 2, 50) < 0.5
    with torch.no_grad():
        y = layer(x, qk, kk)
        q, k, v = layer._project(x)
        want = layer._finish(ref.qk_sparse_attention(q, k, v, qk, kk))
        assert_close_to_ref("y", y, want, floor=1e-10)
        assert layer(x).shape == x.shape  # random drop
    with pytest.raises(ValueError, match="drop_rate"):
        QKSparseAttention(32, 4, drop_rate=1.0)
    with pytest.raises(ValueError, match="kv_heads"):
        QKSparseAttention(32, 4, kv_heads=3)
    with pytest.raises(ValueError, match=r"\[B, N, dim\]"):
        layer(x[0])


@pytest.mark.gpu
@pytest.mark.parametrize("cls,kw", [(HashSparseAttention, {"n_buckets": 8}), (QKSparseAttention, {"drop_rate": 0.5})])
def test_gpu_layer_fwd_bwd_bf16(cls, kw):
    torch._dynamo.config.cache_size_limit = 64
    layer = cls(512, 8, kv_heads=2, rotary=True, **kw).cuda().bfloat16()
    x = torch.randn(2, 1000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
