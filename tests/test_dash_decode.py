"""Tests of DashAttention decoding (flexsparse.patterns.dash_cache, flexsparse.kernels.dash_decode).

Oracle: ``reference.dash_attention`` on the whole sequence in float64; decoding the last rows
(token by token, or ``q_len`` rows per step) after a prefix must reproduce its last rows. The
Triton kernels run under the interpreter on CPU in float32 and are held to the tolerance rule
against the float32 PyTorch twin (``dash_decode_torch``), with outputs poisoned with NaN before
the kernels write them; the selected chunk lists are compared with the reference router's
``pbar > 0``. GPU tests (bf16, 4096 tokens of context, D = 128, G = 16, CUDA graphs) carry the
``gpu`` marker.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flexsparse import reference as R
from flexsparse.nn import DashAttention
from flexsparse.patterns.dash_cache import (
    DashKVCache,
    dash_decode,
    dash_decode_torch,
    dash_module_prefill,
    dash_module_step,
)
from flexsparse.testing import FLOOR, assert_close_to_ref, nan_like

F64 = torch.float64


def _inputs(B, Hq, Hkv, N, D, device="cpu"):
    """float64 q, k, v and a non-zero summary vector w (attention pooling, not the mean)."""
    q = torch.randn(B, Hq, N, D, dtype=F64, device=device)
    k = torch.randn(B, Hkv, N, D, dtype=F64, device=device)
    v = torch.randn(B, Hkv, N, D, dtype=F64, device=device)
    w = 0.5 * torch.randn(Hkv, D, dtype=F64, device=device)
    return q, k, v, w


def _selection64(q, k, w, C, gamma):
    """Reference selection ``pbar > 0``: bool ``[B, Hkv, N, N // C]``."""
    return R.dash_router(q, k, w, chunk_size=C, gamma=gamma) > 0


def _decode(q, k, v, w, *, C, P, T, step, gamma, ed, sigma, splits, dtype=torch.float32, capacity=None):
    """Fill a cache with the first P tokens, then decode T tokens ``step`` at a time with the kernels
    and with the PyTorch twin at ``dtype``. Returns ``(out, twin, [(rows, aux), ...])``."""
    B, Hkv, N, D = k.shape
    cache = DashKVCache(B, Hkv, capacity or P + T, D, chunk_size=C, dtype=dtype, device=q.device)
    qd, kd, vd, wd = (t.to(dtype) for t in (q, k, v, w))
    cache.append(kd[:, :, :P], vd[:, :, :P], wd)
    outs, twins, auxes = [], [], []
    n = P
    kw = dict(chunk_size=C, gamma=gamma, estimate_diagonal=ed, sigma=sigma)
    while n < P + T:
        L = min(step, P + T - n)
        cache.append(kd[:, :, n : n + L], vd[:, :, n : n + L], wd)
        qs = qd[:, :, n : n + L]
        o, aux = dash_decode(
            qs, cache, wd, backend="triton", num_splits=splits, out=nan_like(qs), return_aux=True, **kw
        )
        outs.append(o)
        twins.append(dash_decode_torch(qs, cache, wd, **kw))
        auxes.append((list(range(n, n + L)), aux))
        n += L
    assert cache.length == P + T and int(cache.seq_len) == P + T
    return torch.cat(outs, 2), torch.cat(twins, 2), auxes


def _check_selection(auxes, sel64):
    """Kernel lists (ids[:count], increasing) == the reference's selected chunks, row by row."""
    for rows, aux in auxes:
        for j, row in enumerate(rows):
            ref = sel64[:, :, row]  # [B, Hkv, N // C]
            cnt = aux["count"][:, :, j]
            assert torch.equal(cnt.long(), ref.sum(-1)), f"row {row}: counts {cnt.tolist()} != {ref.sum(-1).tolist()}"
            for b in range(ref.shape[0]):
                for h in range(ref.shape[1]):
                    got = aux["ids"][b, h, j, : int(cnt[b, h])].tolist()
                    want = ref[b, h].nonzero().flatten().tolist()
                    assert got == want, f"row {row}, batch {b}, KV head {h}: chunks {got} != {want}"


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize(
    "C,capacity,pieces", [(8, 53, [5, 1, 20, 3, 1, 17]), (16, 40, [16, 1, 15, 8]), (3, 10, [1, 1, 1, 4, 3])]
)
def test_cache_append_summaries(C, capacity, pieces, impl, device):
    """k, v land at the right positions; kbar of every complete chunk equals
    ``reference.chunk_summaries`` (torch: float64, exact; triton kernel: float32 inputs)."""
    B, Hkv, D = 2, 3, 12
    dtype = F64 if impl == "torch" else torch.float32
    dev = "cpu" if impl == "torch" else device
    k = torch.randn(B, Hkv, sum(pieces), D, dtype=F64).to(dtype).to(dev)
    v = torch.randn_like(k)
    w = torch.randn(Hkv, D, dtype=F64).to(dtype).to(dev)
    cache = DashKVCache(B, Hkv, capacity, D, chunk_size=C, dtype=dtype, device=dev, append_impl=impl)
    assert cache.capacity % C == 0 and cache.capacity >= capacity and cache.capacity - capacity < C
    assert cache.kbar.shape == (B, Hkv, cache.capacity // C, D)
    n = 0
    for L in pieces:
        cache.append(k[:, :, n : n + L], v[:, :, n : n + L], w)
        n += L
        assert cache.length == n and int(cache.seq_len) == n
        torch.testing.assert_close(cache.k[:, :, :n], k[:, :, :n], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[:, :, :n], v[:, :, :n], rtol=0, atol=0)
        ref = R.chunk_summaries(k[:, :, :n].double(), w.double(), C)
        tol = 1e-12 if dtype == F64 else 2e-6
        torch.testing.assert_close(cache.kbar[:, :, : n // C].double(), ref, rtol=tol, atol=tol)


def test_cache_errors():
    B, Hkv, D, C = 2, 2, 16, 8
    cache = DashKVCache(B, Hkv, 20, D, chunk_size=C)
    w = torch.zeros(Hkv, D)
    k = torch.randn(B, Hkv, 5, D)
    with pytest.raises(ValueError, match=r"\[B, Hkv, L, D\] = \[2, 2, L, 16\]"):
        cache.append(k[:, :1], k[:, :1], w)
    with pytest.raises(ValueError, match="float32"):
        cache.append(k.double(), k.double(), w)
    with pytest.raises(ValueError, match="v_new"):
        cache.append(k, k[:, :, :4], w)
    with pytest.raises(ValueError, match=r"\[Hkv, D\] = \[2, 16\]"):
        cache.append(k, k, torch.zeros(Hkv, D + 1))
    cache.append(k, k, w)
    with pytest.raises(ValueError, match="capacity 24"):
        cache.append(torch.randn(B, Hkv, 20, D), torch.randn(B, Hkv, 20, D), w)
    w.add_(1.0)  # the cache is tied to w
    with pytest.raises(ValueError, match="modified in place"):
        cache.append(k, k, w)
    cache.reset()
    assert cache.length == 0 and int(cache.seq_len) == 0
    cache.append(k, k, w)
    with pytest.raises(ValueError, match="append_impl='triton'"):
        DashKVCache(B, Hkv, 20, D, chunk_size=C, dtype=F64, append_impl="triton").append(k.double(), k.double(), w)
    for bad in (dict(batch=0), dict(capacity=-1), dict(chunk_size=0), dict(dtype=torch.int32), dict(append_impl="x")):
        args = dict(batch=1, kv_heads=1, capacity=8, head_dim=4, chunk_size=4)
        args.update(bad)
        with pytest.raises(ValueError):
            DashKVCache(args.pop("batch"), args.pop("kv_heads"), args.pop("capacity"), args.pop("head_dim"), **args)


def test_decode_errors():
    B, Hkv, D, C = 1, 2, 16, 8
    cache = DashKVCache(B, Hkv, 32, D, chunk_size=C)
    w = torch.zeros(Hkv, D)
    cache.append(torch.randn(B, Hkv, 10, D), torch.randn(B, Hkv, 10, D), w)
    q = torch.randn(B, 4, 1, D)
    with pytest.raises(ValueError, match=r"\[B, Hq, L, D\] = \[1, Hq, L, 16\]"):
        dash_decode(q[..., :8], cache, w)
    with pytest.raises(ValueError, match="multiple"):
        dash_decode(torch.randn(B, 3, 1, D), cache, w)
    with pytest.raises(ValueError, match="holds only 10"):
        dash_decode(torch.randn(B, 4, 11, D), cache, w)
    with pytest.raises(ValueError, match="float32"):
        dash_decode(q.double(), cache, w)
    with pytest.raises(ValueError, match="chunk_size"):
        dash_decode(q, cache, w, chunk_size=16)
    with pytest.raises(ValueError, match="backend"):
        dash_decode(q, cache, w, backend="flex")
    with pytest.raises(ValueError, match="num_splits"):
        dash_decode(q, cache, w, backend="triton", num_splits=0)
    with pytest.raises(ValueError, match="gamma"):
        dash_decode(q, cache, w, gamma=float("nan"))
    with pytest.raises(ValueError, match=r"\[Hkv, D\]"):
        dash_decode(q, cache, torch.zeros(Hkv + 1, D))
    with pytest.raises(ValueError, match="out"):
        dash_decode(q, cache, w, backend="triton", out=torch.empty(B, 4, 2, D))
    with pytest.raises(ValueError, match="DashKVCache"):
        dash_decode(q, object(), w)


# --------------------------------------------------------------------------------------------
# the PyTorch twin against the reference (cheap: many shapes)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G,Hkv,C,D", [(1, 2, 16, 16), (4, 1, 32, 64), (16, 2, 16, 16), (3, 2, 5, 8)])
@pytest.mark.parametrize("gamma,ed,sigma", [(0.0, False, 1.0), (4.0, True, 0.6), (64.0, False, 1.0), (16.0, True, 2.0)])
@pytest.mark.parametrize("L", [1, 3])
def test_twin_matches_reference(G, Hkv, C, D, gamma, ed, sigma, L):
    B, N = 2, 3 * C + 7
    q, k, v, w = _inputs(B, G * Hkv, Hkv, N, D)
    ref = R.dash_attention(q, k, v, w, chunk_size=C, gamma=gamma, estimate_diagonal=ed, sigma=sigma)
    cache = DashKVCache(B, Hkv, N, D, chunk_size=C, dtype=F64)
    cache.append(k, v, w)
    kw = dict(gamma=gamma, estimate_diagonal=ed, sigma=sigma)
    out, aux = dash_decode_torch(q[:, :, N - L :], cache, w, return_aux=True, **kw)
    torch.testing.assert_close(out, ref[:, :, N - L :], rtol=1e-10, atol=1e-10)
    sel = _selection64(q, k, w, C, gamma)[:, :, N - L :]
    assert torch.equal(aux["count"], sel.sum(-1))


# --------------------------------------------------------------------------------------------
# the Triton kernels (interpreter on CPU)
# --------------------------------------------------------------------------------------------

# (G, Hkv, C, D, gamma, estimate_diagonal, sigma, num_splits, B, prefix P, decoded T, step)
_CASES = [
    pytest.param(1, 2, 16, 16, 2.0, False, 1.0, 1, 2, 37, 6, 1, id="G1-C16-D16-dense-1split"),
    pytest.param(4, 2, 16, 64, 16.0, True, 0.7, 3, 2, 45, 5, 1, id="G4-C16-D64-est-3splits"),
    pytest.param(16, 1, 32, 16, 64.0, False, 1.0, 8, 2, 61, 5, 1, id="G16-C32-sparse-8splits"),
    pytest.param(4, 1, 32, 64, 0.0, True, 1.3, 2, 1, 92, 6, 1, id="G4-C32-D64-uniform-est"),
    pytest.param(16, 2, 16, 16, 8.0, True, 0.5, 5, 1, 155, 3, 1, id="G16-10chunks-route-tiles"),
    pytest.param(4, 2, 16, 16, 4.0, False, 1.0, None, 2, 1, 19, 1, id="from-token-0-default-splits"),
    pytest.param(4, 2, 16, 16, 8.0, False, 1.0, 3, 2, 40, 9, 3, id="qlen3-G4"),
    pytest.param(16, 1, 32, 64, 16.0, True, 0.8, 1, 2, 58, 9, 3, id="qlen3-G16-est"),
    pytest.param(16, 1, 16, 16, 4.0, False, 1.0, 2, 1, 70, 10, 5, id="qlen5-G16-two-row-tiles"),
]


@pytest.mark.triton
@pytest.mark.parametrize("G,Hkv,C,D,gamma,ed,sigma,splits,B,P,T,step", _CASES)
def test_decode_matches_reference(G, Hkv, C, D, gamma, ed, sigma, splits, B, P, T, step, device):
    N = P + T
    q, k, v, w = _inputs(B, G * Hkv, Hkv, N, D, device)
    ref = R.dash_attention(q, k, v, w, chunk_size=C, gamma=gamma, estimate_diagonal=ed, sigma=sigma)[:, :, P:]
    out, twin, auxes = _decode(
        q, k, v, w, C=C, P=P, T=T, step=step, gamma=gamma, ed=ed, sigma=sigma, splits=splits, capacity=N + 5
    )
    assert_close_to_ref("decode", out, ref, twin, floor=2 * FLOOR[torch.float32])
    _check_selection(auxes, _selection64(q, k, w, C, gamma))


@pytest.mark.triton
def test_decode_splits_agree(device):
    """Every split count (1 .. more splits than items) gives the same output, and empty splits are harmless."""
    G, Hkv, C, D, B, N = 4, 2, 16, 16, 1, 83
    q, k, v, w = _inputs(B, G * Hkv, Hkv, N, D, device)
    q, k, v, w = (t.float() for t in (q, k, v, w))
    cache = DashKVCache(B, Hkv, N, D, chunk_size=C, device=device)
    cache.append(k, v, w)
    counts = (1, 2, 7, 16)
    outs = [dash_decode(q[:, :, -2:], cache, w, gamma=8.0, num_splits=s, backend="triton") for s in counts]
    for s, o in zip(counts[1:], outs[1:]):
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=2e-6, msg=f"num_splits={s}")


@pytest.mark.triton
def test_decode_auto_backend_and_strided_q(device):
    """backend='auto' runs the kernels under the interpreter; a strided q (a transposed view) works."""
    G, Hkv, C, D, B, N = 2, 2, 16, 16, 1, 50
    q, k, v, w = _inputs(B, G * Hkv, Hkv, N, D, device)
    q, k, v, w = (t.float() for t in (q, k, v, w))
    cache = DashKVCache(B, Hkv, N, D, chunk_size=C, device=device)
    cache.append(k, v, w)
    qs = q[:, :, -3:].transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, L, D], non-contiguous
    out, aux = dash_decode(qs, cache, w, gamma=3.0, return_aux=True)
    assert "ids" in aux  # the kernels ran
    torch.testing.assert_close(out, dash_decode_torch(qs, cache, w, gamma=3.0), rtol=1e-5, atol=2e-6)


# --------------------------------------------------------------------------------------------
# the module step
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("rotary,ed", [(False, False), (True, True)])
def test_module_step_matches_forward(rotary, ed, device):
    B, dim, heads, kv_heads, C = 2, 64, 4, 2, 16
    P, steps = 27, [1, 1, 3, 1, 1]
    mod = DashAttention(dim, heads, kv_heads=kv_heads, chunk_size=C, gamma=8.0, estimate_diagonal=ed, sigma=0.8,
                        rotary=rotary, backend="reference").to(device)
    with torch.no_grad():
        mod.summary.normal_(0.0, 0.5)
    mod64 = copy.deepcopy(mod).double()
    N = P + sum(steps)
    x = torch.randn(B, N, dim, device=device)
    with torch.no_grad():
        y64 = mod64(x.double())
        y32 = mod(x)
    cache = DashKVCache(B, kv_heads, N, mod.head_dim, chunk_size=C, device=device)
    y_pre = dash_module_prefill(mod, x[:, :P], cache)
    torch.testing.assert_close(y_pre, y32[:, :P])
    outs, n = [], P
    for L in steps:
        outs.append(dash_module_step(mod, x[:, n : n + L], cache, backend="triton", num_splits=2))
        n += L
    out = torch.cat(outs, 1)
    assert out.shape == (B, N - P, dim)
    assert_close_to_ref("module step", out, y64[:, P:], y32[:, P:], floor=2 * FLOOR[torch.float32])


def test_module_step_errors():
    mod = DashAttention(32, 4, kv_heads=2, chunk_size=8, backend="reference")
    cache = DashKVCache(1, 2, 16, mod.head_dim, chunk_size=16)
    with pytest.raises(ValueError, match="chunk_size"):
        dash_module_step(mod, torch.randn(1, 1, 32), cache)
    cache = DashKVCache(1, 2, 16, mod.head_dim, chunk_size=8)
    with pytest.raises(ValueError, match=r"\[B, L, dim\] = \[1, L, 32\]"):
        dash_module_step(mod, torch.randn(1, 1, 16), cache)
    topk = DashAttention(32, 4, kv_heads=2, chunk_size=8, router="topk", top_k=2, backend="reference")
    with pytest.raises(ValueError, match="entmax"):
        dash_module_step(topk, torch.randn(1, 1, 32), cache)
    with pytest.raises(ValueError, match="DashAttention"):
        dash_module_step(torch.nn.Linear(2, 2), torch.randn(1, 1, 32), cache)


def test_module_step_torch_backend():
    """The module step on the PyTorch twin (no kernels): float64 end to end, exact."""
    B, dim, heads, C = 1, 32, 4, 8
    mod = DashAttention(dim, heads, kv_heads=1, chunk_size=C, gamma=4.0, rotary=True, backend="reference").double()
    with torch.no_grad():
        mod.summary.normal_()
    N, P = 21, 13
    x = torch.randn(B, N, dim, dtype=F64)
    with torch.no_grad():
        y = mod(x)
    cache = DashKVCache(B, 1, N, mod.head_dim, chunk_size=C, dtype=F64)
    dash_module_prefill(mod, x[:, :P], cache)
    outs = [dash_module_step(mod, x[:, n : n + 1], cache, backend="torch") for n in range(P, N)]
    torch.testing.assert_close(torch.cat(outs, 1), y[:, P:], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# GPU (bf16, 4096 tokens of context, D = 128, G = 16)
# --------------------------------------------------------------------------------------------


def _gpu_caches(B, Hkv, N, D, C, k, v, w):
    c16 = DashKVCache(B, Hkv, N + 64, D, chunk_size=C, dtype=torch.bfloat16, device="cuda")
    c64 = DashKVCache(B, Hkv, N + 64, D, chunk_size=C, dtype=F64, device="cuda")
    c16.append(k.bfloat16(), v.bfloat16(), w.bfloat16())
    c64.append(k, v, w)
    return c16, c64


@pytest.mark.gpu
@pytest.mark.parametrize("ed,sigma,gamma", [(False, 1.0, 8.0), (True, 0.8, 16.0)])
@pytest.mark.parametrize("L,splits", [(1, None), (1, 1), (3, None)])
def test_gpu_decode_bf16(ed, sigma, gamma, L, splits):
    B, Hkv, G, D, C, N = 2, 2, 16, 128, 64, 4096 - 37
    q, k, v, w = _inputs(B, G * Hkv, Hkv, N, D, "cuda")
    c16, c64 = _gpu_caches(B, Hkv, N, D, C, k, v, w)
    kw = dict(gamma=gamma, estimate_diagonal=ed, sigma=sigma)
    qs = q[:, :, N - L :]
    ref = dash_decode_torch(qs, c64, w, **kw)
    lowp = dash_decode_torch(qs.bfloat16(), c16, w.bfloat16(), **kw)
    out = dash_decode(qs.bfloat16(), c16, w.bfloat16(), num_splits=splits, out=nan_like(qs.bfloat16()), **kw)
    assert_close_to_ref("decode bf16", out, ref, lowp)


@pytest.mark.gpu
def test_gpu_decode_matches_reference_float32():
    """Kernels in float32 on the GPU against the full-sequence reference (1k tokens)."""
    B, Hkv, G, D, C, N, T = 1, 2, 16, 128, 64, 1000, 4
    q, k, v, w = _inputs(B, G * Hkv, Hkv, N, D, "cuda")
    ref = R.dash_attention(q, k, v, w, chunk_size=C, gamma=16.0)[:, :, N - T :]
    out, twin, auxes = _decode(q, k, v, w, C=C, P=N - T, T=T, step=1, gamma=16.0, ed=False, sigma=1.0, splits=None)
    assert_close_to_ref("decode fp32 gpu", out, ref, twin, floor=1e-4)
    _check_selection(auxes, _selection64(q, k, w, C, 16.0))


@pytest.mark.gpu
def test_gpu_decode_cuda_graph():
    """append + dash_decode captured once in a CUDA graph, replayed for the following tokens."""
    B, Hkv, G, D, C, P, T = 2, 2, 16, 128, 64, 4000, 70  # crosses the chunk boundary at 4032
    q, k, v, w = _inputs(B, G * Hkv, Hkv, P + T + 1, D, "cuda")
    qb, kb, vb, wb = (t.bfloat16() for t in (q, k, v, w))
    cache = DashKVCache(B, Hkv, P + T + 1, D, chunk_size=C, dtype=torch.bfloat16, device="cuda")
    ref_cache = DashKVCache(B, Hkv, P + T + 1, D, chunk_size=C, dtype=F64, device="cuda")
    cache.append(kb[:, :, :P], vb[:, :, :P], wb)
    ref_cache.append(k[:, :, :P], v[:, :, :P], w)
    q_in, k_in, v_in = qb[:, :, :1].clone(), kb[:, :, :1].clone(), vb[:, :, :1].clone()
    out = torch.empty_like(q_in)
    kw = dict(gamma=8.0)

    def step():
        cache.append(k_in, v_in, wb)
        dash_decode(q_in, cache, wb, out=out, **kw)

    # warm-up (compiles the kernels) on a side stream: decodes token P for real
    q_in.copy_(qb[:, :, P : P + 1]); k_in.copy_(kb[:, :, P : P + 1]); v_in.copy_(vb[:, :, P : P + 1])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # recorded, not run: only the host length moved
    cache.sync_length()
    assert cache.length == P + 1
    ref_cache.append(k[:, :, P : P + 1], v[:, :, P : P + 1], w)
    for n in range(P + 1, P + T + 1):
        q_in.copy_(qb[:, :, n : n + 1]); k_in.copy_(kb[:, :, n : n + 1]); v_in.copy_(vb[:, :, n : n + 1])
        graph.replay()
        ref_cache.append(k[:, :, n : n + 1], v[:, :, n : n + 1], w)
        if n % 7 == 0 or n == P + T:
            torch.cuda.synchronize()
            ref = dash_decode_torch(q[:, :, n : n + 1], ref_cache, w, **kw)
            assert cache.sync_length() == n + 1
            lowp = dash_decode_torch(qb[:, :, n : n + 1], cache, wb, **kw)
            assert_close_to_ref(f"graph step {n}", out, ref, lowp)
