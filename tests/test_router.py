"""Tests of the DashAttention stage-1 router (flexsparse.patterns.router, flexsparse.kernels.router).

The Triton kernels run under the interpreter on CPU (float32 and float16) and are compared with
``reference.dash_router`` in float64: pbar, and the gradients of a random linear function of pbar
with respect to q, k and w (through ``reference.chunk_summaries``), each within the tolerance rule
of ``flexsparse.testing`` against plain PyTorch at the same precision. tau is checked against an
exact sort-based threshold written here, on inputs whose scores are exact in float32, so the
solver's own error is what is measured. GPU tests (bf16, long sequences) carry the ``gpu`` marker.
"""

from __future__ import annotations

import math

import pytest
import torch

from flexsparse import reference as R
from flexsparse.patterns.router import _tau_twin, entmax_router, router_tau
from flexsparse.testing import assert_close_to_ref, max_abs_err, nan_like

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# helpers (independent of the code under test)
# --------------------------------------------------------------------------------------------


def _scores64(q, kbar, C, zscale):
    """float64 ``x = zscale / 2 * q . kbar`` ``[B, Hq, N, nF]`` and the past-chunk mask ``[N, nF]``."""
    Hq, N = q.shape[1], q.shape[2]
    G = Hq // kbar.shape[1]
    nF = kbar.shape[2]
    kfull = kbar.double().repeat_interleave(G, dim=1)
    x = (q.double() @ kfull.transpose(-1, -2)) * (zscale / 2)
    past = torch.arange(nF, device=q.device)[None, :] < (torch.arange(N, device=q.device) // C)[:, None]
    return x, past


def _exact_tau(q, kbar, C, zscale):
    """Sort-based 1.5-entmax threshold in float64, ``+inf`` on rows without a past chunk; and
    the row maximum of x (0 where there is none)."""
    x, past = _scores64(q, kbar, C, zscale)
    nF = x.shape[-1]
    if nF == 0:
        none = torch.zeros(x.shape[:-1], dtype=F64, device=q.device)
        return none + math.inf, none
    xs = torch.where(past, x, -math.inf)
    srt = xs.sort(dim=-1, descending=True).values
    fin = torch.isfinite(srt)
    s0 = torch.where(fin, srt, 0.0)
    ks = torch.arange(1, nF + 1, dtype=F64, device=q.device)
    mean = s0.cumsum(-1) / ks
    mean_sq = (s0 * s0).cumsum(-1) / ks
    tau_k = mean - ((1 - ks * (mean_sq - mean * mean)) / ks).clamp(min=0).sqrt()
    ok = (tau_k <= srt) & fin
    support = (ok * torch.arange(1, nF + 1, device=q.device)).amax(-1, keepdim=True).clamp(min=1)
    tau = tau_k.gather(-1, support - 1).squeeze(-1)
    has = past.any(-1)
    m = torch.where(has, xs.amax(-1), 0.0)
    return torch.where(has, tau, math.inf), m


def _random_inputs(B, Hq, Hkv, N, D, device="cpu"):
    q = torch.randn(B, Hq, N, D, device=device)
    k = torch.randn(B, Hkv, N, D, device=device)
    w = 0.5 * torch.randn(Hkv, D, device=device)
    return q, k, w


def _ref_and_grads(q, k, w, cotangent, dtype, *, C, gamma):
    """``reference.dash_router`` at ``dtype`` and its gradients (pbar, dq, dk, dw)."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, w)]
    pbar = R.dash_router(*leaves, chunk_size=C, gamma=gamma)
    if pbar.numel():
        grads = torch.autograd.grad(pbar, leaves, cotangent.to(dtype))
    else:
        grads = [torch.zeros_like(t) for t in leaves]
    return [pbar.detach(), *grads]


def _fast_and_grads(q, k, w, cotangent, dtype, *, C, gamma, impl="triton"):
    """chunk summaries in torch + ``entmax_router`` at ``dtype``: (pbar, dq, dk, dw), tau."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, w)]
    kbar = R.chunk_summaries(leaves[1], leaves[2], C)
    pbar, tau = entmax_router(leaves[0], kbar, chunk_size=C, gamma=gamma, impl=impl, return_tau=True)
    if pbar.numel():
        grads = torch.autograd.grad(pbar, leaves, cotangent.to(pbar.dtype))
    else:
        grads = [torch.zeros_like(t) for t in leaves]
    return [pbar.detach(), *grads], tau, kbar.detach()


def _check_structure(pbar, N, C, atol):
    """Entries c >= c_i are exactly 0, rows of chunk >= 1 sum to 1, rows of chunk 0 are 0."""
    nF = pbar.shape[-1]
    past = torch.arange(nF)[None, :] < (torch.arange(N) // C)[:, None]
    assert (pbar.cpu()[..., ~past] == 0).all(), "pbar must be exactly 0 on c >= c_i"
    sums = pbar.double().sum(-1).cpu()
    expected = (torch.arange(N) // C >= 1).to(F64).expand_as(sums)
    assert max_abs_err(sums, expected) <= atol, "rows must sum to 1 (0 in chunk 0)"


# --------------------------------------------------------------------------------------------
# Triton under the interpreter (float32, float16) against the float64 reference
# --------------------------------------------------------------------------------------------

# (B, Hq, Hkv, N, D, C, gamma)
CASES = [
    (1, 2, 1, 1, 16, 16, 1.0),  # a single row: no chunk at all
    (2, 2, 2, 63, 64, 16, 1.0),  # trailing partial chunk, G = 1, B = 2
    (1, 4, 2, 200, 16, 32, 0.05),  # nearly dense
    (1, 4, 1, 333, 16, 16, 20.0),  # very sparse (mostly one chunk)
    (1, 16, 1, 100, 16, 16, 1.0),  # G = 16
    (1, 2, 1, 333, 128, 128, 1.0),  # C = 128, D = 128
    (1, 4, 1, 300, 64, 64, 3.0),  # C = 64, G = 4
    (1, 6, 2, 45, 16, 7, 2.0),  # G = 3 and C = 7 (neither a power of two)
]


@pytest.mark.triton
@pytest.mark.parametrize("B,Hq,Hkv,N,D,C,gamma", CASES)
def test_triton_float32_matches_reference(B, Hq, Hkv, N, D, C, gamma, device):
    q, k, w = _random_inputs(B, Hq, Hkv, N, D, device)
    cot = torch.randn(B, Hkv, N, N // C, dtype=F64, device=device)
    ref = _ref_and_grads(q, k, w, cot, F64, C=C, gamma=gamma)
    low = _ref_and_grads(q, k, w, cot, torch.float32, C=C, gamma=gamma)
    fast, tau, kbar = _fast_and_grads(q, k, w, cot, torch.float32, C=C, gamma=gamma)
    assert fast[0].dtype == torch.float32 and fast[0].shape == (B, Hkv, N, N // C)
    assert tau.dtype == torch.float32 and tau.shape == (B, Hq, N)
    for name, f, r, lo in zip(("pbar", "dq", "dk", "dw"), fast, ref, low):
        assert f.dtype == torch.float32
        assert_close_to_ref(name, f, r, lo)
    _check_structure(fast[0], N, C, atol=1e-5)
    # tau: +inf exactly on the rows without a past chunk, close to the exact threshold elsewhere
    exact, m = _exact_tau(q, kbar, C, gamma / math.sqrt(D))
    assert torch.equal(torch.isinf(tau), torch.isinf(exact))
    fin = torch.isfinite(exact)
    assert not torch.isnan(tau).any()
    assert ((tau.double() - exact).abs()[fin] <= 2e-6 * (m.abs() + 1)[fin]).all()


@pytest.mark.triton
def test_gamma_range_covers_dense_and_one_chunk_supports(device):
    """The gamma cases above really are nearly dense / mostly one chunk (so they test that)."""
    for gamma, check in ((0.05, lambda frac, one: frac > 0.9), (20.0, lambda frac, one: one > 0.3)):
        q, k, w = _random_inputs(1, 4, 1, 333, 16, device)
        kbar = R.chunk_summaries(k, w, 16)
        pbar, tau = entmax_router(q, kbar, chunk_size=16, gamma=gamma, impl="triton", return_tau=True)
        x, past = _scores64(q, kbar, 16, gamma / 4)
        supp = (x > tau.double()[..., None]) & past
        rows = past.any(-1).expand_as(supp[..., 0])
        frac = (supp.sum(-1)[rows].double() / past.sum(-1).expand_as(rows)[rows]).mean().item()
        one = (supp.sum(-1)[rows] == 1).double().mean().item()
        assert check(frac, one), (gamma, frac, one)


@pytest.mark.triton
def test_triton_float16_matches_reference(device):
    B, Hq, Hkv, N, D, C, gamma = 1, 4, 2, 201, 64, 16, 2.0
    q, k, w = _random_inputs(B, Hq, Hkv, N, D, device)
    cot = torch.randn(B, Hkv, N, N // C, dtype=F64, device=device)
    ref = _ref_and_grads(q, k, w, cot, F64, C=C, gamma=gamma)
    low = _ref_and_grads(q, k, w, cot, torch.float16, C=C, gamma=gamma)
    fast, tau, _ = _fast_and_grads(q, k, w, cot, torch.float16, C=C, gamma=gamma)
    assert fast[0].dtype == torch.float32
    assert [t.dtype for t in fast[1:]] == [torch.float16] * 3
    for name, f, r, lo in zip(("pbar", "dq", "dk", "dw"), fast, ref, low):
        assert_close_to_ref(name, f, r, lo)
    _check_structure(fast[0], N, C, atol=1e-5)


# --------------------------------------------------------------------------------------------
# tau: the solver against the exact threshold
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("gamma", [0.25, 2.0, 32.0])
def test_tau_is_float32_accurate(gamma, device):
    """Scores exact in float32 (entries k/8, D = 16, scale 1/4, gamma a power of two), many ties:
    the Triton solver and its torch twin are within 2 float32 ulps of the exact threshold."""
    B, Hq, Hkv, N, D, C = 1, 4, 2, 301, 16, 4
    q = torch.randint(-8, 9, (B, Hq, N, D), device=device).float() / 8
    kbar = torch.randint(-8, 9, (B, Hkv, N // C, D), device=device).float() / 8
    kbar[:, :, 10:20] = kbar[:, :, 10:11]  # a run of identical chunks (exact ties)
    exact, m = _exact_tau(q, kbar, C, gamma / 4)
    fin = torch.isfinite(exact)
    bound = 2.4e-7 * (m.abs() + 1)
    for name, tau in (
        ("triton", router_tau(q, kbar, chunk_size=C, gamma=gamma, impl="triton")),
        ("twin", router_tau(q, kbar, chunk_size=C, gamma=gamma, impl="torch")),
        ("twin direct", _tau_twin(q, kbar, C, gamma / 4)),
    ):
        assert tau.dtype == torch.float32 and tau.shape == (B, Hq, N), name
        assert torch.equal(torch.isinf(tau), ~fin), name
        err = (tau.double() - exact).abs()[fin]
        assert (err <= bound[fin]).all(), f"{name}: tau error {err.max():.3e}"


@pytest.mark.triton
def test_tau_uniform_and_single_chunk_rows(device):
    """Identical chunks give uniform p = 1 / c_i; a dominant chunk gives a one-hot row whose
    gradients vanish (the entmax Jacobian is 0 on a support of one)."""
    B, Hq, Hkv, N, D, C = 1, 2, 1, 150, 16, 16
    q = torch.randn(B, Hq, N, D, device=device)
    kbar = torch.randn(1, 1, 1, D, device=device).expand(B, Hkv, N // C, D).contiguous()
    pbar = entmax_router(q, kbar, chunk_size=C, impl="triton").cpu()
    ci = (torch.arange(N) // C).clamp(min=1).float()
    past = torch.arange(N // C)[None, :] < (torch.arange(N) // C)[:, None]
    expected = torch.where(past, 1.0 / ci[:, None], 0.0).expand_as(pbar)
    assert max_abs_err(pbar, expected) <= 1e-6

    # chunk 0 is far ahead of the others for every query: support {0}
    q = torch.randn(B, Hq, N, D, device=device).abs() + 0.5
    kb = 0.01 * torch.randn(B, Hkv, N // C, D, device=device)
    kb[:, :, 0] = 2.0
    kb.requires_grad_(True)
    qg = q.clone().requires_grad_(True)
    pbar = entmax_router(qg, kb, chunk_size=C, gamma=4.0, impl="triton")
    # (1 up to rounding: the kernels may round the same score differently in different tiles)
    assert max_abs_err(pbar[..., C:, 0], torch.ones_like(pbar[..., C:, 0])) <= 1e-5
    assert (pbar[..., 1:] == 0).all()
    dq, dkb = torch.autograd.grad(pbar, (qg, kb), torch.randn_like(pbar))
    assert dq.abs().max() <= 1e-5 and dkb.abs().max() <= 1e-5


@pytest.mark.triton
def test_tau_twin_matches_kernel_random(device):
    q, k, w = _random_inputs(2, 4, 2, 190, 32, device)
    kbar = R.chunk_summaries(k, w, 16)
    for gamma in (0.1, 1.0, 10.0):
        t_tr = router_tau(q, kbar, chunk_size=16, gamma=gamma, impl="triton")
        t_tw = router_tau(q, kbar, chunk_size=16, gamma=gamma, impl="torch")
        assert torch.equal(torch.isinf(t_tr), torch.isinf(t_tw))
        fin = torch.isfinite(t_tw)
        err = (t_tr[fin] - t_tw[fin]).abs()
        assert (err <= 1e-6 * (1 + t_tw[fin].abs())).all(), err.max()  # scores may round differently


# --------------------------------------------------------------------------------------------
# kernels directly: every output element written, tilings and row splits agree
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
def test_kernels_write_everything_and_tilings_agree(device):
    from flexsparse.kernels import router as K

    B, Hq, Hkv, N, D, C = 1, 8, 2, 157, 32, 8
    G, nF = Hq // Hkv, N // C
    zscale = 1.5 / math.sqrt(D)
    q = torch.randn(B, Hq, N, D, device=device)
    kbar = torch.randn(B, Hkv, nF, D, device=device) * 0.5
    dpbar = torch.randn(B, Hkv, N, nF, device=device)
    nan = dict(fill_value=math.nan, device=device)

    tau = K.router_tau(q, kbar, C, zscale, out=torch.full((B, Hq, N), **nan))
    pbar = K.router_pbar(q, kbar, tau, C, zscale, out=torch.full((B, Hkv, N, nF), **nan))
    outs = (nan_like(q), nan_like(kbar), torch.full((B, Hq, N), **nan))
    dq, dkbar, r = K.router_backward(q, kbar, tau, dpbar, C, zscale, splits=1, outs=outs)
    for name, t in (("tau", tau), ("pbar", pbar), ("dq", dq), ("dkbar", dkbar), ("r", r)):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) entries"

    # the same with other tiles (several chunk tiles per row, several heads per tile) and row splits
    blocks = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4}
    tau2 = K.router_tau(q, kbar, C, zscale, blocks=blocks)
    pbar2 = K.router_pbar(q, kbar, tau, C, zscale, blocks={"BLOCK_R": 8, "BLOCK_N": 16})
    outs2 = (nan_like(q), nan_like(kbar), torch.full((B, Hq, N), **nan))
    dq2, dkbar2, r2 = K.router_backward(q, kbar, tau, dpbar, C, zscale, splits=3, blocks={"BLOCK_N": 16}, outs=outs2)
    assert torch.equal(torch.isinf(tau2), torch.isinf(tau))
    assert max_abs_err(tau2.nan_to_num(posinf=0), tau.nan_to_num(posinf=0)) <= 1e-6
    assert max_abs_err(pbar2, pbar) <= 1e-6
    assert max_abs_err(dq2, dq) <= 1e-5 and max_abs_err(dkbar2, dkbar) <= 1e-5 and max_abs_err(r2, r) <= 1e-6

    # r and the gradients against the formula, from dense float64 scores
    x, past = _scores64(q, kbar, C, zscale)
    s = torch.where(past, (x - tau.double()[..., None]).clamp(min=0), 0.0)
    g = dpbar.double().repeat_interleave(G, dim=1) / G
    r64 = (s * g).sum(-1) / s.sum(-1).where(s.sum(-1) > 0, 1.0)
    dz = s * (g - r64[..., None])
    dq64 = zscale * dz @ kbar.double().repeat_interleave(G, dim=1)
    dkbar64 = zscale * (dz.transpose(-1, -2) @ q.double()).reshape(B, Hkv, G, nF, D).sum(2)
    assert max_abs_err(r, r64) <= 1e-5
    assert max_abs_err(dq, dq64) <= 1e-5
    assert max_abs_err(dkbar, dkbar64) <= 1e-4


# --------------------------------------------------------------------------------------------
# torch implementation, dispatch and validation
# --------------------------------------------------------------------------------------------


def test_torch_impl_is_the_reference():
    q, k, w = _random_inputs(1, 4, 2, 77, 16)
    q, k, w = q.double(), k.double(), w.double()
    kbar = R.chunk_summaries(k, w, 8)
    pbar, tau = entmax_router(q, kbar, chunk_size=8, gamma=1.7, impl="torch", return_tau=True)
    assert pbar.dtype == F64
    assert max_abs_err(pbar, R.dash_router(q, k, w, chunk_size=8, gamma=1.7)) <= 1e-12
    exact, _ = _exact_tau(q, kbar, 8, 1.7 / 4)
    assert torch.equal(torch.isinf(tau), torch.isinf(exact))
    fin = torch.isfinite(exact)
    assert max_abs_err(tau[fin], exact[fin]) <= 1e-6
    # float32 inputs: pbar float32; gradients flow in the input dtype
    qf = q.float().requires_grad_(True)
    kbf = kbar.float().requires_grad_(True)
    pf = entmax_router(qf, kbf, chunk_size=8, gamma=1.7, impl="torch")
    assert pf.dtype == torch.float32
    dq, dkb = torch.autograd.grad(pf.sum(), (qf, kbf))
    assert dq.dtype == torch.float32 and dkb.dtype == torch.float32


@pytest.mark.triton
def test_auto_dispatch_and_no_triton(monkeypatch, device):
    qd, kd, wd = _random_inputs(1, 2, 1, 40, 16, device)
    kbd = R.chunk_summaries(kd, wd, 8)
    # auto = triton on CUDA and under the interpreter (bitwise the same result)
    assert torch.equal(entmax_router(qd, kbd, chunk_size=8), entmax_router(qd, kbd, chunk_size=8, impl="triton"))
    # float64 or D > 256 with auto falls back to torch; asked by name, it is an error
    p64 = entmax_router(qd.double(), kbd.double(), chunk_size=8)
    assert p64.dtype == F64
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        entmax_router(qd.double(), kbd.double(), chunk_size=8, impl="triton")
    qb, kb = torch.randn(1, 1, 16, 272, device=device), torch.randn(1, 1, 2, 272, device=device)
    entmax_router(qb, kb, chunk_size=8)
    with pytest.raises(ValueError, match="D <= 256"):
        entmax_router(qb, kb, chunk_size=8, impl="triton")
    q, k, w = _random_inputs(1, 2, 1, 40, 16)  # CPU
    kbar = R.chunk_summaries(k, w, 8)
    # without CUDA and without the interpreter, triton is refused by name and auto uses torch
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        entmax_router(q, kbar, chunk_size=8, impl="triton")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        router_tau(q, kbar, chunk_size=8, impl="triton")
    ref = R.dash_router(q, k, w, chunk_size=8)
    assert max_abs_err(entmax_router(q, kbar, chunk_size=8), ref) <= 1e-5


def test_invalid_inputs():
    q = torch.randn(1, 4, 40, 16)
    kbar = torch.randn(1, 2, 5, 16)
    ok = dict(chunk_size=8)
    with pytest.raises(ValueError, match=r"q must be a 4-D floating-point tensor of shape \[B, Hq, N, D\]"):
        entmax_router(q[0], kbar, **ok)
    with pytest.raises(ValueError, match=r"q must be"):
        entmax_router(q.long(), kbar, **ok)
    expected = r"kbar must be a floating-point tensor of shape \[B, Hkv, N // C, D\] = \[1, \?, 5, 16\]"
    with pytest.raises(ValueError, match=expected):
        entmax_router(q, torch.randn(1, 2, 4, 16), **ok)  # wrong number of chunks
    with pytest.raises(ValueError, match=r"kbar must be"):
        entmax_router(q, torch.randn(1, 2, 5, 8), **ok)  # wrong head dim
    with pytest.raises(ValueError, match=r"kbar must be"):
        entmax_router(q, torch.randn(2, 2, 5, 16), **ok)  # wrong batch
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        entmax_router(q, torch.randn(1, 3, 5, 16), **ok)
    with pytest.raises(ValueError, match="share one dtype"):
        entmax_router(q, kbar.half(), **ok)
    with pytest.raises(ValueError, match="same device"):
        entmax_router(q, kbar.to("meta"), **ok)
    with pytest.raises(ValueError, match="chunk_size"):
        entmax_router(q, kbar, chunk_size=0)
    with pytest.raises(ValueError, match="gamma"):
        entmax_router(q, kbar, chunk_size=8, gamma=math.nan)
    with pytest.raises(ValueError, match="scale"):
        entmax_router(q, kbar, chunk_size=8, scale=math.inf)
    with pytest.raises(ValueError, match="impl must be"):
        entmax_router(q, kbar, chunk_size=8, impl="cuda")
    with pytest.raises(ValueError, match=r"kbar must be"):
        router_tau(q, kbar[:, :, :3], chunk_size=8)


# --------------------------------------------------------------------------------------------
# GPU (bf16, long sequences): run on the device machine
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "Hq,Hkv,N,D,C,gamma",
    [
        (8, 2, 1000, 64, 16, 1.0),
        (4, 4, 4096, 128, 64, 1.0),
        (16, 1, 2049, 128, 32, 0.3),
        (4, 2, 4096, 256, 16, 5.0),
    ],
)
def test_gpu_bf16_matches_reference(Hq, Hkv, N, D, C, gamma):
    q, k, w = _random_inputs(1, Hq, Hkv, N, D, device="cuda")
    cot = torch.randn(1, Hkv, N, N // C, dtype=F64, device="cuda")
    ref = _ref_and_grads(q, k, w, cot, F64, C=C, gamma=gamma)
    low = _ref_and_grads(q, k, w, cot, torch.bfloat16, C=C, gamma=gamma)
    fast, tau, _ = _fast_and_grads(q, k, w, cot, torch.bfloat16, C=C, gamma=gamma)
    assert fast[0].dtype == torch.float32 and [t.dtype for t in fast[1:]] == [torch.bfloat16] * 3
    for name, f, r, lo in zip(("pbar", "dq", "dk", "dw"), fast, ref, low):
        assert_close_to_ref(name, f, r, lo)
    _check_structure(fast[0], N, C, atol=1e-4)
    assert not torch.isnan(tau).any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_float32_float16_and_tau(dtype):
    Hq, Hkv, N, D, C, gamma = 8, 2, 3001, 64, 16, 2.0
    q, k, w = _random_inputs(1, Hq, Hkv, N, D, device="cuda")
    cot = torch.randn(1, Hkv, N, N // C, dtype=F64, device="cuda")
    ref = _ref_and_grads(q, k, w, cot, F64, C=C, gamma=gamma)
    low = _ref_and_grads(q, k, w, cot, dtype, C=C, gamma=gamma)
    fast, tau, kbar = _fast_and_grads(q, k, w, cot, dtype, C=C, gamma=gamma)
    for name, f, r, lo in zip(("pbar", "dq", "dk", "dw"), fast, ref, low):
        assert_close_to_ref(name, f, r, lo)
    if dtype == torch.float32:
        exact, m = _exact_tau(q, kbar, C, gamma / math.sqrt(D))
        fin = torch.isfinite(exact)
        assert torch.equal(torch.isinf(tau), ~fin)
        assert ((tau.double() - exact).abs()[fin] <= 2e-6 * (m.abs() + 1)[fin]).all()
