"""DashAttention: the functional op and the nn.Module (backends, routers, training, stats)."""

import pytest
import torch

import flexsparse
from flexsparse import reference as ref
from flexsparse.testing import assert_close_to_ref, random_qkv

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _w(Hkv, D, dtype=torch.float32, device="cpu"):
    return (0.3 * torch.randn(Hkv, D)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("estimate_diagonal", [False, True])
def test_reference_backend_is_the_oracle(estimate_diagonal):
    q, k, v = random_qkv(1, 4, 2, 150, 16, dtype=torch.float64)
    w = _w(2, 16, torch.float64)
    kw = dict(chunk_size=16, gamma=2.0, estimate_diagonal=estimate_diagonal, sigma=2.0)
    out, stats = flexsparse.dash_attention(q, k, v, w, backend="reference", return_stats=True, **kw)
    want, aux = ref.dash_attention(q, k, v, w, return_aux=True, **kw)
    assert torch.equal(out, want)
    assert torch.equal(stats["kept_fraction"], aux["kept_fraction"]) and torch.equal(stats["sparsity"], aux["sparsity"])


@pytest.mark.triton
@pytest.mark.parametrize("B,Hq,Hkv,N,D,C,gamma", [(1, 4, 2, 133, 16, 16, 3.0), (2, 2, 1, 97, 32, 32, 0.5)])
def test_flex_backend_matches_reference_cpu(B, Hq, Hkv, N, D, C, gamma):
    q, k, v = random_qkv(B, Hq, Hkv, N, D)
    w = _w(Hkv, D)
    with torch.no_grad():
        out, stats = flexsparse.dash_attention(q, k, v, w, chunk_size=C, gamma=gamma, q_block=C, return_stats=True)
    want, aux = ref.dash_attention(q.double(), k.double(), v.double(), w.double(), chunk_size=C, gamma=gamma, return_aux=True)
    assert_close_to_ref("out", out, want)
    assert abs(float(stats["kept_fraction"]) - float(aux["kept_fraction"])) < 1e-3


@pytest.mark.triton
def test_topk_flex_matches_topk_reference():
    q, k, v = random_qkv(1, 4, 2, 170, 16, dtype=torch.float64)
    w = _w(2, 16, torch.float64)
    with torch.no_grad():
        out, stats = flexsparse.dash_attention(
            q.float(), k.float(), v.float(), w.float(), chunk_size=16, router="topk", top_k=3, q_block=32, return_stats=True
        )
    want, aux = ref.dash_topk_attention(q, k, v, w, chunk_size=16, top_k=3, return_aux=True)
    assert_close_to_ref("out", out, want)
    assert torch.equal(stats["kept_fraction"], aux["kept_fraction"].float())
    # top-k rows keep min(top_k, past) past chunks plus the diagonal one
    n_sel = aux["selection"].sum(-1)
    assert torch.equal(n_sel, torch.clamp(torch.arange(170) // 16, max=3).double().expand_as(n_sel).to(n_sel.dtype))


def test_topk_reference_gradients_skip_the_router():
    q, k, v = random_qkv(1, 2, 1, 80, 8, dtype=torch.float64, requires_grad=True)
    w = _w(1, 8, torch.float64).requires_grad_(True)
    out = ref.dash_topk_attention(q, k, v, w, chunk_size=16, top_k=1)
    out.square().sum().backward()
    assert w.grad is None or not w.grad.any()
    assert q.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


def test_errors():
    q, k, v = random_qkv(1, 4, 2, 64, 16)
    w = _w(2, 16)
    with pytest.raises(ValueError, match="router"):
        flexsparse.dash_attention(q, k, v, w, router="nope")
    with pytest.raises(ValueError, match="top_k"):
        flexsparse.dash_attention(q, k, v, w, router="topk")
    with pytest.raises(ValueError, match="top_k"):
        flexsparse.dash_attention(q, k, v, w, top_k=3)
    with pytest.raises(ValueError, match=r"\[Hkv, D\]"):
        flexsparse.dash_attention(q, k, v, torch.zeros(4, 16))
    with pytest.raises(ValueError, match="backend"):
        flexsparse.dash_attention(q, k, v, w, backend="cuda")
    with pytest.raises(RuntimeError, match="inference-only"):
        flexsparse.dash_attention(q.requires_grad_(), k, v, w, backend="flex")
    with pytest.raises(ValueError, match="dim"):
        flexsparse.DashAttention(30, 4)
    with pytest.raises(ValueError, match="router"):
        flexsparse.DashAttention(32, 4, router="topk")


@pytest.mark.parametrize("router", ["entmax", "topk"])
def test_module_trains_on_cpu(router):
    """CPU training goes through the reference backend: the loss falls, and for the entmax router
    the summary vector ``w`` (zero-initialised) receives gradient through the prior."""
    torch.manual_seed(0)
    m = flexsparse.DashAttention(32, 4, kv_heads=2, chunk_size=16, gamma=4.0, router=router,
                                 top_k=2 if router == "topk" else None, rotary=True)
    assert m.summary.shape == (2, 8) and not m.summary.any()
    x, y = torch.randn(2, 90, 32), torch.randn(2, 90, 32)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = (m(x) - y).square().mean()
        loss.backward()
        if router == "entmax":
            assert m.summary.grad is not None and m.summary.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if router == "entmax":
        assert m.summary.abs().sum() > 0


@pytest.mark.triton
def test_module_stats_and_inference_path():
    m = flexsparse.DashAttention(32, 4, kv_heads=1, chunk_size=16, gamma=6.0, track_sparsity=True)
    with torch.no_grad():
        m.summary.normal_()
    x = torch.randn(1, 120, 32)
    with torch.no_grad():
        y = m(x)  # CPU FlexAttention (no grad)
        q, k, v = m._project(x)
        want, aux = ref.dash_attention(q.double(), k.double(), v.double(), m.summary.double(), chunk_size=16, gamma=6.0,
                                       return_aux=True)
        want = m._finish(want.float())
    assert_close_to_ref("y", y, want.double(), floor=1e-4)
    assert abs(float(m.last_stats["kept_fraction"]) - float(aux["kept_fraction"])) < 1e-3
    assert abs(float(m.last_stats["sparsity"]) - float(aux["sparsity"])) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("router", ["entmax", "topk"])
def test_module_gpu_bf16_grads(router):
    torch.manual_seed(0)
    m = flexsparse.DashAttention(256, 8, kv_heads=2, chunk_size=64, gamma=3.0, router=router,
                                 top_k=4 if router == "topk" else None).cuda()
    with torch.no_grad():
        m.summary.normal_()
    x = torch.randn(1, 1100, 256, device="cuda")
    # float64 reference through the reference backend, same weights
    ref_m = flexsparse.DashAttention(256, 8, kv_heads=2, chunk_size=64, gamma=3.0, router=router,
                                     top_k=4 if router == "topk" else None, backend="reference").cuda().double()
    ref_m.load_state_dict(m.state_dict())
    low_m = flexsparse.DashAttention(256, 8, kv_heads=2, chunk_size=64, gamma=3.0, router=router,
                                     top_k=4 if router == "topk" else None, backend="reference").cuda().bfloat16()
    low_m.load_state_dict(m.state_dict())
    m = m.bfloat16()
    outs = {}
    for name, mod, dt in (("flex", m, torch.bfloat16), ("ref", ref_m, torch.float64), ("low", low_m, torch.bfloat16)):
        xx = x.to(dt).requires_grad_(True)
        y = mod(xx)
        y.float().square().mean().backward()
        outs[name] = (y, xx.grad, mod.summary.grad, mod.qkv.weight.grad)
    for i, label in enumerate(("y", "dx", "dw", "dWqkv")):
        if outs["ref"][i] is None:
            continue
        assert_close_to_ref(label, outs["flex"][i], outs["ref"][i], outs["low"][i], factor=3.0)


@pytest.mark.triton
@pytest.mark.parametrize("rotary", [False, True])
def test_module_incremental_decoding_matches_forward(rotary):
    """prefill + step (one token, then three at a time) reproduce the full forward's rows."""
    m = flexsparse.DashAttention(64, 4, kv_heads=2, chunk_size=16, gamma=4.0, rotary=rotary)
    with torch.no_grad():
        m.summary.normal_()
    x = torch.randn(2, 61, 64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 80)
        outs = [m.prefill(x[:, :37], cache)]
        outs += [m.step(x[:, i : i + 1], cache) for i in range(37, 46)]
        outs += [m.step(x[:, i : i + 3], cache) for i in range(46, 61, 3)]
    got = torch.cat(outs, 1)
    assert_close_to_ref("decoded", got, full.double(), floor=1e-5)


@pytest.mark.triton
def test_triton_backend_matches_reference_cpu():
    """backend='triton' (fused token-level kernels, interpreter on CPU): forward and gradients."""
    q, k, v = random_qkv(1, 4, 2, 77, 16, requires_grad=True)
    w = _w(2, 16).requires_grad_(True)
    out = flexsparse.dash_attention(q, k, v, w, chunk_size=16, gamma=3.0, backend="triton")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, w), g)
    ins64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, w)]
    want = ref.dash_attention(*ins64, chunk_size=16, gamma=3.0)
    wgrads = torch.autograd.grad(want, ins64, g.double())
    assert_close_to_ref("out", out, want, floor=2e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dw"), grads, wgrads):
        assert_close_to_ref(name, a, b, floor=5e-5)
    with pytest.raises(ValueError, match="entmax router only"):
        flexsparse.dash_attention(q, k, v, w, backend="triton", router="topk", top_k=1)
