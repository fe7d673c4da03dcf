"""Tests of the fused DashAttention Triton kernels (flexsparse.kernels.dash_attn) and their
autograd wrapper (flexsparse.patterns.dash_triton).

On CPU the kernels run under TRITON_INTERPRET=1 in float32 (one float16 case) on tiny shapes and
are compared with ``reference.dash_attention`` in float64: the output and the gradients of a random
linear loss with respect to q, k, v and w, with plain PyTorch (the reference) in float32 as the
yardstick (``flexsparse.testing.assert_close_to_ref``). Kernel-level tests poison every output
buffer with NaN and check the saved statistics (lse, per-row selection counts) and ``d pbar``
against float64 computations written here. GPU tests (bf16/fp16, N up to 4096) carry the ``gpu``
marker.

The ``estimate_diagonal`` prior is discontinuous where a chunk enters the router's support (the
mean of log pbar jumps), and its gradient has terms ~ 1 / (x - tau) on the support, so in float32
it is checked on inputs whose router scores stay 1e-5 away from the threshold, with the float32
reference's own error (x 5, plus 1e-4 of the gradient's scale) as the bound.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from flexsparse import reference as R
from flexsparse.kernels import dash_attn as K
from flexsparse.patterns.dash_triton import dash_attention_triton
from flexsparse.patterns.router import router_tau
from flexsparse.testing import FLOOR, assert_close_to_ref, nan_like

F64 = torch.float64
LOG2E = 1.0 / math.log(2.0)


# --------------------------------------------------------------------------------------------
# helpers (independent of the code under test)
# --------------------------------------------------------------------------------------------


def _inputs(B, Hq, Hkv, N, D, dtype=torch.float32, device="cpu", head_corr=False):
    if head_corr:  # the G heads of a group share a direction (as trained GQA heads do)
        G = Hq // Hkv
        q = torch.randn(B, Hkv, 1, N, D, device=device) + 0.5 * torch.randn(B, Hkv, G, N, D, device=device)
        q = q.reshape(B, Hq, N, D).to(dtype)
    else:
        q = torch.randn(B, Hq, N, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, N, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, N, D, device=device).to(dtype)
    w = (0.5 * torch.randn(Hkv, D, device=device)).to(dtype)
    return q, k, v, w


def _routing_margin(q, k, w, C, gamma):
    """Smallest ``|x - tau|`` (float64, per query head) over the past chunks of rows ``i >= C``:
    how far the inputs are from a chunk entering or leaving the entmax support."""
    q, k, w = (t.double() for t in (q, k, w))
    B, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    kbar = R.chunk_summaries(k, w, C)
    nF = kbar.shape[2]
    if nF == 0 or N <= C:
        return math.inf
    x = (q @ kbar.repeat_interleave(G, 1).transpose(-1, -2)) * (gamma / math.sqrt(D) / 2)
    past = torch.arange(nF)[None, :] < (torch.arange(N) // C)[:, None]
    p = R.entmax15(2 * x, mask=past)
    x_max, arg = torch.where(past, x, -math.inf).max(-1, keepdim=True)
    tau = x_max - p.gather(-1, arg).sqrt()
    rows = (torch.arange(N) >= C)[:, None]
    return torch.where(past & rows, (x - tau).abs(), math.inf).min().item()


def _well_routed_inputs(B, Hq, Hkv, N, D, C, gamma, tries=20):
    for _ in range(tries):
        x = _inputs(B, Hq, Hkv, N, D)
        if _routing_margin(x[0], x[1], x[3], C, gamma) > 1e-5:
            return x
    raise AssertionError("could not draw inputs away from the router threshold")


def _run(inputs, dtype, fn, do):
    """``fn(*inputs)`` at ``dtype`` and the gradients of ``<out, do>`` w.r.t. all four inputs."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    stats = None
    if isinstance(out, tuple):
        out, stats = out
    grads = torch.autograd.grad(out, leaves, do.to(dtype))
    return out.detach(), [g.detach() for g in grads], stats


def _check_against_reference(inputs, kw, *, blocks=None, dtype=torch.float32, factor=2.0, rel_floor=0.0,
                             names=("dq", "dk", "dv", "dw")):
    do = torch.randn(inputs[0].shape, device=inputs[0].device).to(dtype).float()  # exact at `dtype`
    out, grads, stats = _run(inputs, dtype, lambda *x: dash_attention_triton(*x, return_stats=True, blocks=blocks, **kw), do)
    out64, g64, _ = _run(inputs, F64, lambda *x: R.dash_attention(*x, **kw), do)
    outl, gl, _ = _run(inputs, dtype, lambda *x: R.dash_attention(*x, **kw), do)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_close_to_ref("out", out, out64, outl, factor=factor)
    for name, g, g_ref, g_low in zip(("dq", "dk", "dv", "dw"), grads, g64, gl):
        assert g.dtype == dtype
        if name not in names:
            continue
        floor = rel_floor * g_ref.abs().max().item() + FLOOR[dtype]
        assert_close_to_ref(name, g, g_ref, g_low, factor=factor, floor=floor)
    return stats


def _dense_stage2(q, k, v, pbar, C, scale, estimate_diagonal=False, sigma=1.0):
    """Stage 2 of the reference from a given ``pbar`` (differentiable in it), and the natural
    log-sum-exp of every row's biased logits."""
    N = q.shape[2]
    G = q.shape[1] // k.shape[1]
    lp = R.dash_log_prior(pbar, N, chunk_size=C, estimate_diagonal=estimate_diagonal, sigma=sigma)
    bias = lp.index_select(-1, torch.arange(N) // C).repeat_interleave(G, 1)  # [B, Hq, N, N]
    mask = R.causal_mask(N) & (bias > -math.inf)
    bias = torch.where(mask, bias, 0.0)
    out = R.attention(q, k, v, mask=mask, bias=bias, scale=scale)
    kf = k.repeat_interleave(G, 1)
    logits = torch.where(mask, (q @ kf.transpose(-1, -2)) * scale + bias, -math.inf)
    return out, torch.logsumexp(logits, dim=-1), lp


# --------------------------------------------------------------------------------------------
# forward + backward against the float64 reference
# --------------------------------------------------------------------------------------------


CASES = [
    # B, Hq, Hkv, N, D, C, gamma, blocks
    (1, 2, 2, 77, 16, 16, 0.05, None),  # G = 1, dense routing
    (1, 4, 2, 150, 16, 16, 8.0, None),  # G = 2
    (1, 4, 1, 333, 16, 32, 20.0, None),  # G = 4, very sparse
    (1, 16, 1, 77, 16, 16, 3.0, None),  # G = 16 (4 positions per program)
    (1, 2, 1, 150, 64, 64, 2.0, {"BLOCK_N": 32}),  # D = 64, C = 64 in two key sub-tiles
    (2, 3, 1, 100, 16, 16, 4.0, {"BLOCK_R": 8, "FLAG_T": 16}),  # G = 3 (padded heads), B = 2
    (1, 4, 2, 150, 16, 16, 60.0, {"BLOCK_R": 8}),  # near top-1 per head: most chunks skipped
    (1, 4, 2, 13, 16, 32, 1.0, None),  # N < C: diagonal chunk only
    # the backward's list walks: 18 chunks = two dq routing tiles of 16, 75 query blocks = 5 flag windows
    (1, 4, 1, 300, 16, 16, 8.0, {"BLOCK_R": 4, "FLAG_T": 16, "LIST_WALK": True}),
]


@pytest.mark.triton
@pytest.mark.parametrize("B,Hq,Hkv,N,D,C,gamma,blocks", CASES)
def test_matches_reference(B, Hq, Hkv, N, D, C, gamma, blocks):
    inputs = _inputs(B, Hq, Hkv, N, D)
    kw = dict(chunk_size=C, gamma=gamma)
    both = None if blocks is None else {"fwd": blocks, "bwd": blocks}
    # the floor: float32 resolution of each gradient's scale (large gamma gives large router gradients)
    stats = _check_against_reference(inputs, kw, blocks=both, rel_floor=1e-5)
    with torch.no_grad():
        _, aux = R.dash_attention(*(t.double() for t in inputs), return_aux=True, **kw)
    for key in ("kept_fraction", "sparsity"):
        assert abs(stats[key].item() - aux[key].item()) < 5e-3, key
    if gamma <= 0.05 or N < C:
        assert stats["kept_fraction"].item() == 1.0
    if gamma >= 20:  # (floor: the diagonal chunk + one past chunk per head)
        assert stats["kept_fraction"].item() < 0.9


@pytest.mark.triton
@pytest.mark.parametrize(
    "B,Hq,Hkv,N,D,C,gamma,sigma", [(1, 4, 2, 150, 16, 16, 5.0, 1.0), (1, 2, 1, 161, 16, 32, 2.0, 0.5)]
)
def test_estimate_diagonal_matches_reference(B, Hq, Hkv, N, D, C, gamma, sigma):
    inputs = _well_routed_inputs(B, Hq, Hkv, N, D, C, gamma)
    kw = dict(chunk_size=C, gamma=gamma, estimate_diagonal=True, sigma=sigma)
    _check_against_reference(inputs, kw, factor=5.0, rel_floor=1e-4)


@pytest.mark.triton
def test_float16_matches_reference():
    inputs = _inputs(1, 4, 2, 100, 16)
    _check_against_reference(inputs, dict(chunk_size=16, gamma=4.0), dtype=torch.float16, factor=3.0)


@pytest.mark.triton
def test_partial_requires_grad():
    q, k, v, w = _inputs(1, 2, 1, 70, 16)
    v.requires_grad_(True)
    out = dash_attention_triton(q, k, v, w, chunk_size=16, gamma=3.0)
    (dv,) = torch.autograd.grad(out, (v,), torch.ones_like(out))
    v64 = v.detach().double().requires_grad_(True)
    out64 = R.dash_attention(q.double(), k.double(), v64, w.double(), chunk_size=16, gamma=3.0)
    (dv64,) = torch.autograd.grad(out64, (v64,), torch.ones_like(out64))
    assert_close_to_ref("dv", dv, dv64)


def test_auto_backend_choice():
    """``dash_attention(backend="auto")``: the fused kernels on CUDA wherever they support the call
    (entmax router, float16/bfloat16/float32, head dim <= 256), else flex there; on a CPU flex
    without gradients, else the reference (the kernels only run there under the interpreter)."""
    from flexsparse.functional import _dash_auto_backend as choose

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for D in (8, 100, 256):
            for grad in (False, True):
                assert choose("cuda", "entmax", dtype, D, grad) == "triton", (dtype, D, grad)
                assert choose("cuda", "topk", dtype, D, grad) == "flex", (dtype, D, grad)
                assert choose("cpu", "entmax", dtype, D, grad) == ("reference" if grad else "flex")
    assert choose("cuda", "entmax", torch.float64, 64, True) == "flex"
    assert choose("cuda", "entmax", torch.bfloat16, 257, True) == "flex"
    assert choose("cpu", "topk", torch.float32, 64, True) == "reference"
    assert choose("cpu", "topk", torch.float32, 64, False) == "flex"
    # FlexAttention kernel_options given: they only mean something to flex
    assert choose("cuda", "entmax", torch.bfloat16, 64, True, True) == "flex"


@pytest.mark.triton
def test_auto_runs_the_chosen_backend(monkeypatch):
    """With the choice made as on CUDA (the kernels run under the interpreter here), ``"auto"``
    runs the fused kernels for the entmax router, gradients included (the same result as
    ``backend="triton"``), and flex for top-k; a backend named explicitly never falls back."""
    import flexsparse.functional as Fn

    choose, called = Fn._dash_auto_backend, []
    monkeypatch.setattr(Fn, "_dash_auto_backend", lambda device_type, *a: choose("cuda", *a))
    for name in ("dash_attention_triton", "dash_attention_flex"):
        fn = getattr(Fn, name)
        monkeypatch.setattr(Fn, name, lambda *a, _fn=fn, _name=name, **kw: called.append(_name) or _fn(*a, **kw))
    q, k, v, w = _inputs(1, 4, 2, 45, 16)
    q.requires_grad_(True)
    kw = dict(chunk_size=8, gamma=3.0)
    out = Fn.dash_attention(q, k, v, w, **kw)
    assert called == ["dash_attention_triton"]
    assert torch.equal(out, Fn.dash_attention(q, k, v, w, backend="triton", **kw))
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0
    called.clear()
    Fn.dash_attention(q.detach(), k, v, w, chunk_size=8, router="topk", top_k=2)
    assert called == ["dash_attention_flex"]
    with pytest.raises(RuntimeError, match="inference-only"):  # no fallback to the reference
        Fn.dash_attention(q, k, v, w, backend="flex", **kw)
    with pytest.raises(ValueError, match="entmax router only"):
        Fn.dash_attention(q, k, v, w, backend="triton", chunk_size=8, router="topk", top_k=2)
    with pytest.raises(ValueError, match="kernel_options"):  # flex options are not silently dropped
        Fn.dash_attention(q, k, v, w, backend="triton", kernel_options={"BLOCK_M": 64}, **kw)
    called.clear()
    with torch.no_grad():  # auto with flex options runs flex
        Fn.dash_attention(q.detach(), k, v, w, kernel_options={}, **kw)
    assert called == ["dash_attention_flex"]


# --------------------------------------------------------------------------------------------
# kernel level: poisoned outputs, saved statistics, d pbar
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("list_walk", [False, True], ids=["reduce_walk", "list_walk"])
@pytest.mark.parametrize("estimate_diagonal,sigma", [(False, 1.0), (True, 0.7)])
def test_kernel_outputs(estimate_diagonal, sigma, list_walk):
    B, Hq, Hkv, N, D, C, gamma = 1, 4, 2, 123, 16, 16, 4.0
    G = Hq // Hkv
    q, k, v, w = _well_routed_inputs(B, Hq, Hkv, N, D, C, gamma)
    scale = 1.0 / math.sqrt(D)
    kbar = R.chunk_summaries(k, w, C)
    tau = router_tau(q, kbar, chunk_size=C, gamma=gamma, impl="triton")
    blocks = {"BLOCK_R": 8, "FLAG_T": 8, "LIST_WALK": list_walk}  # N = 123: 16 query blocks, two flag windows
    fo = (
        nan_like(q),
        torch.full((B, Hq, N), math.nan),
        torch.full((B, Hkv, N if estimate_diagonal else 0), math.nan),
        torch.full((B, Hkv, N), -1, dtype=torch.int32),
    )
    kw = dict(estimate_diagonal=estimate_diagonal, sigma=sigma, blocks=blocks)
    out, lse, mu, counts = K.dash_attn_forward(q, k, v, kbar, tau, C, gamma * scale, scale, outs=fo, **kw)
    assert all(t is o for t, o in zip((out, lse, mu, counts), fo))
    do = torch.randn_like(out)
    bo = (torch.full((B, Hq, N, D), math.nan), nan_like(k), nan_like(v), torch.full((B, Hkv, N, N // C), math.nan))
    dq, dk, dv, dpbar = K.dash_attn_backward(q, k, v, kbar, tau, out, lse, mu, do, C, gamma * scale, scale, outs=bo, **kw)
    for name, t in (("out", out), ("lse", lse), ("mu", mu), ("dq", dq), ("dk", dk), ("dv", dv), ("dpbar", dpbar)):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) entries"

    # stage 2 as a function of pbar, in float64 and (the yardstick) in float32
    factor = 5.0 if estimate_diagonal else 2.0
    ref = {}
    for dt in (F64, torch.float32):
        pbar = R.dash_router(q.to(dt), k.to(dt), w.to(dt), chunk_size=C, gamma=gamma).requires_grad_(True)
        x = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
        o, l, _ = _dense_stage2(*x, pbar, C, scale, estimate_diagonal, sigma)
        grads = torch.autograd.grad(o, [pbar, *x], do.to(dt))  # (dpbar, and the attention part of dq, dk, dv)
        sel = pbar.detach() > 0
        lg = torch.where(sel, pbar.detach().clamp_min(1e-30).log(), 0.0)
        mu_ref = lg.sum(-1) / sel.sum(-1).clamp(min=1)
        ref[dt] = (o.detach(), l.detach() * LOG2E, mu_ref, *grads, sel, pbar.detach())
    r64, r32 = ref[F64], ref[torch.float32]
    sel, pbar64 = r64[-2], r64[-1]
    assert torch.equal(counts, sel.sum(-1).to(torch.int32))
    assert torch.all(dpbar[~sel] == 0)
    names = ("out", "lse", "mu", "dpbar", "dq", "dk", "dv")
    fast = (out, lse, mu, dpbar, dq, dk, dv)
    for i, (name, f) in enumerate(zip(names, fast)):
        if name == "mu" and not estimate_diagonal:
            continue
        want, base = r64[i], r32[i]
        if name == "dpbar" and estimate_diagonal:
            # ~ (d log pi - its mean) / (sigma pbar): only well-conditioned where pbar is not tiny
            keep = pbar64 > 1e-3
            f, want, base = f[keep], want[keep], base[keep]
        floor = 1e-5 * (1.0 + want.abs().max().item())
        assert_close_to_ref(name, f, want, base, factor=factor, floor=floor)


@pytest.mark.triton
def test_config_and_validation():
    q, k, v, w = _inputs(1, 4, 2, 40, 16)
    with pytest.raises(ValueError, match=r"\[B, Hkv, N, D\]"):
        dash_attention_triton(q, k[:, :, :30], v, w, chunk_size=16)
    with pytest.raises(ValueError, match="multiple"):
        dash_attention_triton(q, k[:, :1].expand(1, 3, 40, 16), v[:, :1].expand(1, 3, 40, 16), w[:1].expand(3, 16), chunk_size=16)
    with pytest.raises(ValueError, match=r"w must .*\[Hkv, D\] = \[2, 16\]"):
        dash_attention_triton(q, k, v, w[:1], chunk_size=16)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        dash_attention_triton(q.double(), k.double(), v.double(), w.double(), chunk_size=16)
    with pytest.raises(ValueError, match="chunk_size"):
        dash_attention_triton(q, k, v, w, chunk_size=0)
    with pytest.raises(ValueError, match="sigma"):
        dash_attention_triton(q, k, v, w, chunk_size=16, estimate_diagonal=True, sigma=0.0)
    with pytest.raises(ValueError, match="blocks"):
        dash_attention_triton(q, k, v, w, chunk_size=16, blocks={"forward": {}})
    with pytest.raises(ValueError, match="unknown tile keys"):
        K.attn_config(2, 16, 16, q.device, blocks={"BLOCK_M": 64})
    with pytest.raises(ValueError, match="tl.dot"):
        K.attn_config(2, 16, 16, q.device, blocks={"BLOCK_R": 4})
    with pytest.raises(ValueError, match="power of two"):
        K.attn_config(2, 16, 16, q.device, blocks={"BLOCK_N": 48})
    cfg = K.attn_config(16, 128, 64, torch.device("cuda"))
    assert cfg["BLOCK_G"] * cfg["BLOCK_R"] == 64 and cfg["BLOCK_N"] == 64
    # an empty sequence
    e = torch.zeros(1, 4, 0, 16)
    out, stats = dash_attention_triton(e, e[:, :2], e[:, :2], w, chunk_size=16, return_stats=True)
    assert out.shape == e.shape and stats["kept_fraction"].item() == 1.0


# --------------------------------------------------------------------------------------------
# the kernels compiled for the H100 (sm_90) here, without a GPU
# --------------------------------------------------------------------------------------------


_SM90_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flexsparse.kernels import dash_attn as K

FLOATS = ("xs", "qk2", "scale", "inv_g", "inv_sigma")
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
results = []
for D, G, est, dtype in [(128, 16, False, "bf16"), (128, 1, True, "fp16"), (64, 16, False, "bf16")]:
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        fn = getattr(K, name)
        cfg = K.attn_config(G, D, 64, torch.device("cuda"), dtype=tdt, backward=name != "_fwd_kernel")
        consts = dict(ESTIMATE=est, BLOCK_G=cfg["BLOCK_G"], BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_PREC="tf32")
        if name == "_bwd_dkdv_kernel":
            consts.update(FLAG_T=cfg["FLAG_T"], LIST_WALK=cfg["LIST_WALK"])
        else:
            consts.update(BLOCK_NC=cfg["BLOCK_NC"], ONE_SUB=True)
            if name == "_bwd_dq_kernel":
                consts["LIST_WALK"] = cfg["LIST_WALK"]
            if name == "_fwd_kernel":
                consts["MASK_K"] = False
        sig, attrs = {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in consts:
                sig[a] = "constexpr"
            elif a.endswith("_ptr"):
                sig[a] = "*" + {"cnt_ptr": "i32", "ids_ptr": "i32", "flag_ptr": "i8", "lpt_ptr": "fp32",
                                  "qbl_ptr": "i32", "wid_ptr": "i32", "wlp_ptr": "fp32"}.get(
                    a, "fp32" if a[:2] in ("lse", "mu", "tau", "del", "dp", "dq") else dtype)
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[a] = "fp32" if a in FLOATS else "i32"
                if a == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        ptx = k.asm["ptx"]
        spills = None
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        for exe in ("ptxas-blackwell", "ptxas"):
            r = subprocess.run([os.path.join(bin_dir, exe), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                               capture_output=True, text=True)
            m = re.search(r"(\d+) bytes spill stores", r.stderr)
            if r.returncode == 0 and m:
                spills = int(m.group(1))
                break
        results.append(dict(kernel=name, D=D, G=G, est=est, dtype=dtype, shared=k.metadata.shared,
                            wgmma="wgmma.mma_async" in ptx, spills=spills))
print(json.dumps(results))
"""


@pytest.mark.triton
def test_kernels_compile_for_sm90():
    """The three kernels compile for the H100 (TTIR -> PTX, then ptxas): wgmma tensor-core dots,
    shared memory within sm_90's 227 KiB, and (where ptxas runs here) few register spills with
    the default tiles."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 9
    for r in results:
        assert r["wgmma"], r
        assert r["shared"] <= 232448, r
        # the backward kernels spill up to a few hundred bytes at 4 warps and D = 128, and were
        # still measured 1.8x faster on the H100 than with 8 warps and no spills (16k, bf16, G = 16)
        limit = 64 if r["kernel"] == "_fwd_kernel" else 512
        assert r["spills"] is None or r["spills"] <= limit, r


# --------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at realistic lengths
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "N,D,G,dtype,estimate_diagonal",
    [
        (1000, 64, 1, torch.bfloat16, False),
        (1000, 128, 16, torch.bfloat16, False),
        (4096, 128, 16, torch.bfloat16, False),
        (4096, 64, 1, torch.float16, False),
        (1000, 128, 16, torch.float16, False),
        (1000, 64, 16, torch.bfloat16, True),
    ],
)
def test_gpu_matches_reference(N, D, G, dtype, estimate_diagonal):
    Hkv = 2 if G == 1 else 1
    C, gamma = 64, 16.0
    # i.i.d. heads make the union over 16 heads nearly dense at N = 1000 (kept ~0.99); with
    # correlated heads about 60-70% (N = 1000) and 40% (N = 4096) of the chunks are kept
    inputs = _inputs(1, Hkv * G, Hkv, N, D, dtype=dtype, device="cuda", head_corr=G > 1)
    kw = dict(chunk_size=C, gamma=gamma, estimate_diagonal=estimate_diagonal)
    # estimate_diagonal: d log pi / d pbar has terms ~ 1 / (x - tau), so in bf16 the router's share
    # of dq and dw is dominated by which chunks sit at the support's edge (the bf16 reference
    # itself is off by ~4 on dq); those two are checked in float32 on inputs away from the edge
    # (test_gpu_float32_estimate_matches_reference)
    names = ("dk", "dv") if estimate_diagonal else ("dq", "dk", "dv", "dw")
    stats = _check_against_reference([t.float() for t in inputs], kw, dtype=dtype, factor=3.0, names=names)
    assert 0.05 < stats["kept_fraction"].item() < 0.95  # really sparse, really not empty


@pytest.mark.gpu
def test_gpu_float32_estimate_matches_reference():
    C, gamma = 64, 8.0
    inputs = [t.cuda() for t in _well_routed_inputs(1, 16, 1, 700, 64, C, gamma)]
    kw = dict(chunk_size=C, gamma=gamma, estimate_diagonal=True, sigma=0.7)
    _check_against_reference(inputs, kw, factor=5.0, rel_floor=1e-4)  # as the interpreter test


@pytest.mark.gpu
def test_gpu_float32_matches_reference():
    inputs = _inputs(1, 8, 2, 777, 128, device="cuda")
    _check_against_reference(inputs, dict(chunk_size=64, gamma=8.0))
