"""Tests of the dense reference oracles (flexsparse.reference).

Every oracle is checked against an independent implementation: PyTorch SDPA, the `entmax`
package, or a brute-force per-(batch, head, row) Python loop written here. Inputs are fresh
random draws (conftest seeds each test); lengths are odd, GQA ratios 1/2/4, head dims 16/32/64.
"""

from __future__ import annotations

import math

import entmax as entmax_pkg
import pytest
import torch
import torch.nn.functional as F

from flexsparse import reference as R
from flexsparse.testing import max_abs_err, random_qkv

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# helpers (independent of flexsparse.reference)
# --------------------------------------------------------------------------------------------


def _vjp(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _assert_all_close(name, a, b, atol=1e-10):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = max_abs_err(a, b)
    assert err <= atol, f"{name}: max abs err {err:.3e} > {atol:.1e}"


def _loop_attention(q, k, v, keys_of, scale=None, bias_of=None):
    """Brute force: for each (b, h, i), softmax over the keys listed by keys_of(b, h, i).

    bias_of(b, h, i, js) returns an additive bias vector for those keys (or None).
    """
    B, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rows = []
    for b in range(B):
        for h in range(Hq):
            g = h // G
            for i in range(N):
                js = keys_of(b, h, i)
                if not js:
                    rows.append(torch.zeros(D, dtype=q.dtype))
                    continue
                idx = torch.tensor(js)
                logits = (k[b, g, idx] @ q[b, h, i]) * scale
                if bias_of is not None:
                    logits = logits + bias_of(b, h, i, js)
                a = torch.softmax(logits, dim=0)
                rows.append(a @ v[b, g, idx])
    return torch.stack(rows).reshape(B, Hq, N, D)


def _loop_dash(q, k, v, w, C, gamma, estimate_diagonal, sigma):
    """Brute-force DashAttention (stage 0, 1 with the `entmax` package, 2) in Python loops."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    n_full = N // C
    # stage 0
    kbar = {}
    for b in range(B):
        for g in range(Hkv):
            for c in range(n_full):
                kc = k[b, g, c * C : (c + 1) * C]
                a = torch.softmax(kc @ w[g] / math.sqrt(D), dim=0)
                kbar[b, g, c] = a @ kc
    # stage 1 + prior: prior[b, g, i] = {chunk: log prior}
    prior = {}
    for b in range(B):
        for g in range(Hkv):
            for i in range(N):
                ci = i // C
                logs = {}
                if ci >= 1:
                    ps = []
                    for h in range(g * G, (g + 1) * G):
                        z = torch.stack([gamma * (q[b, h, i] @ kbar[b, g, c]) / math.sqrt(D) for c in range(ci)])
                        ps.append(entmax_pkg.entmax15(z, dim=0))
                    pbar = torch.stack(ps).mean(0)
                    logs = {c: torch.log(pbar[c]) for c in range(ci) if pbar[c] > 0}
                    if estimate_diagonal and logs:
                        log_g = torch.stack(list(logs.values())).mean()
                        logs = {c: (lp - log_g) / sigma for c, lp in logs.items()}
                logs[ci] = torch.zeros((), dtype=q.dtype)
                prior[b, g, i] = logs

    def keys_of(b, h, i):
        sel = prior[b, h // G, i]
        return [j for j in range(i + 1) if j // C in sel]

    def bias_of(b, h, i, js):
        sel = prior[b, h // G, i]
        return torch.stack([sel[j // C] for j in js])

    return _loop_attention(q, k, v, keys_of, bias_of=bias_of)


def _rand_w(Hkv, D, dtype=F64, requires_grad=False):
    w = torch.randn(Hkv, D, dtype=dtype)
    return w.requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------------
# attention / causal_mask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B,Hq,Hkv,N,D",
    [(2, 4, 4, 37, 16), (1, 4, 2, 100, 32), (2, 8, 2, 131, 64), (1, 2, 1, 1, 16)],
)
def test_attention_causal_matches_sdpa(B, Hq, Hkv, N, D):
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64, requires_grad=True)
    out = R.attention(q, k, v, mask=R.causal_mask(N))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.dtype == F64 and out.shape == (B, Hq, N, D)
    _assert_all_close("out", out, ref)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", _vjp(out, (q, k, v), g), _vjp(ref, (q, k, v), g)):
        _assert_all_close(f"d{name}", a, b)


@pytest.mark.parametrize("bias_shape", ["full", "per_head_col", "2d"])
def test_attention_bias_matches_sdpa(bias_shape):
    B, Hq, Hkv, N, M, D = 2, 4, 2, 29, 41, 32
    q = torch.randn(B, Hq, N, D, dtype=F64, requires_grad=True)
    k = torch.randn(B, Hkv, M, D, dtype=F64, requires_grad=True)
    v = torch.randn(B, Hkv, M, D, dtype=F64, requires_grad=True)
    shape = {"full": (B, Hq, N, M), "per_head_col": (1, Hq, 1, M), "2d": (N, M)}[bias_shape]
    bias = (2 * torch.randn(shape, dtype=F64)).requires_grad_(True)
    scale = 0.3 + torch.rand(()).item()
    out = R.attention(q, k, v, bias=bias, scale=scale)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)
    _assert_all_close("out", out, ref)
    g = torch.randn_like(out)
    for name, a, b in zip(["q", "k", "v", "bias"], _vjp(out, (q, k, v, bias), g), _vjp(ref, (q, k, v, bias), g)):
        _assert_all_close(f"d{name}", a, b)


def test_attention_default_scale_and_bool_mask_match_sdpa():
    B, Hq, Hkv, N, D = 2, 4, 1, 37, 64
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64, requires_grad=True)
    mask = torch.rand(B, 1, N, N) < 0.4
    mask[..., torch.arange(N), torch.randint(0, N, (N,))] = True  # every row has a key
    out = R.attention(q, k, v, mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    _assert_all_close("out", out, ref)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", _vjp(out, (q, k, v), g), _vjp(ref, (q, k, v), g)):
        _assert_all_close(f"d{name}", a, b)
    # an explicit scale of 1/sqrt(D) is the default
    torch.testing.assert_close(R.attention(q, k, v, mask=mask, scale=1 / math.sqrt(D)), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_attention_empty_rows_are_zero_with_zero_gradient(dtype):
    B, Hq, Hkv, N, D = 2, 4, 2, 23, 16
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=dtype, requires_grad=True)
    mask = torch.rand(B, Hq, N, N) < 0.5
    mask[..., torch.arange(N), torch.arange(N)] = True
    empty_mask = torch.rand(B, Hq, N) < 0.3  # rows with no allowed key
    mask[empty_mask] = False
    bias = torch.randn(B, Hq, N, N, dtype=dtype)
    empty_bias = (torch.rand(B, Hq, N) < 0.3) & ~empty_mask  # rows whose logits are all -inf
    bias[empty_bias] = float("-inf")
    bias[(torch.rand(B, Hq, N, N) < 0.2)] = float("-inf")  # scattered -inf entries elsewhere
    empty = empty_mask | empty_bias | ~(mask & torch.isfinite(bias)).any(-1)
    assert empty.any() and (~empty).any()

    out = R.attention(q, k, v, mask=mask, bias=bias)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out[empty] == 0).all()
    g = torch.randn_like(out)
    dq, dk, dv = _vjp(out, (q, k, v), g)
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (dq[empty] == 0).all()
    # the empty rows contribute nothing to dk, dv: same result with their upstream gradient zeroed
    out2 = R.attention(q, k, v, mask=mask, bias=bias)
    _, dk2, dv2 = _vjp(out2, (q, k, v), g.masked_fill(empty[..., None], 0))
    assert torch.equal(dk, dk2) and torch.equal(dv, dv2)

    if dtype == F64:  # non-empty rows agree with SDPA (empty rows patched to attend key 0)
        patched = mask & torch.isfinite(bias)
        patched[empty] = True
        ref = F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.where(patched, bias.masked_fill(~torch.isfinite(bias), 0), float("-inf")),
            enable_gqa=True,
        )
        _assert_all_close("out", out[~empty], ref[~empty])


def test_attention_gradcheck_with_empty_rows():
    B, Hq, Hkv, N, D = 1, 2, 1, 7, 4
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64, requires_grad=True)
    mask = R.causal_mask(N).expand(B, Hq, N, N).clone()
    mask[0, 0, 3] = False
    bias = torch.randn(B, Hq, N, N, dtype=F64)
    bias[0, 1, 5] = float("-inf")
    bias = bias.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: R.attention(*t[:3], mask=mask, bias=t[3]), (q, k, v, bias))


def test_causal_mask():
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(R.causal_mask(3), expected)
    N, M = int(torch.randint(1, 20, ())), int(torch.randint(1, 20, ()))
    m = R.causal_mask(N, M)
    assert m.shape == (N, M) and m.dtype == torch.bool
    i, j = torch.meshgrid(torch.arange(N), torch.arange(M), indexing="ij")
    assert torch.equal(m, i >= j)  # aligned at the start, not at the end
    assert R.causal_mask(1).item() is True


# --------------------------------------------------------------------------------------------
# hash-sparse
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Hq,Hkv,N,D,nb", [(4, 2, 13, 16, 3), (4, 1, 9, 32, 2), (2, 2, 11, 16, 4)])
def test_hash_sparse_matches_loop(Hq, Hkv, N, D, nb):
    B = 2
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64, requires_grad=True)
    qb = torch.randint(0, nb, (B, Hq, N), dtype=torch.int32)
    kb = torch.randint(0, nb, (B, Hkv, N))
    G = Hq // Hkv
    out = R.hash_sparse_attention(q, k, v, qb, kb)
    ref = _loop_attention(
        q, k, v, lambda b, h, i: [j for j in range(i + 1) if int(qb[b, h, i]) == int(kb[b, h // G, j])]
    )
    _assert_all_close("out", out, ref)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", _vjp(out, (q, k, v), g), _vjp(ref, (q, k, v), g)):
        _assert_all_close(f"d{name}", a, b)


def test_hash_mask_gqa_expansion():
    B, Hq, Hkv, N = 2, 8, 2, 17
    G = Hq // Hkv
    qb = torch.randint(0, 3, (B, Hq, N))
    kb = torch.randint(0, 3, (B, Hkv, N))
    m = R.hash_mask(qb, kb)
    assert m.shape == (B, Hq, N, N) and m.dtype == torch.bool
    for b in range(B):
        for h in range(Hq):
            same = qb[b, h][:, None] == kb[b, h // G][None, :]
            assert torch.equal(m[b, h], same & torch.ones(N, N, dtype=torch.bool).tril())


def test_hash_one_bucket_equals_dense_causal():
    B, Hq, Hkv, N, D = 2, 4, 1, 100, 32
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64)
    bucket = int(torch.randint(0, 100, ()))
    qb = torch.full((B, Hq, N), bucket)
    kb = torch.full((B, Hkv, N), bucket)
    out = R.hash_sparse_attention(q, k, v, qb, kb)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    _assert_all_close("out", out, ref)


# --------------------------------------------------------------------------------------------
# query/key drop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Hq,Hkv,N,D", [(4, 2, 13, 16), (4, 4, 10, 32), (4, 1, 7, 16)])
def test_qk_sparse_matches_loop(Hq, Hkv, N, D):
    B = 2
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64, requires_grad=True)
    qk = torch.rand(B, Hq, N) < 0.6
    kk = torch.rand(B, Hkv, N) < 0.6
    G = Hq // Hkv
    out = R.qk_sparse_attention(q, k, v, qk, kk)
    ref = _loop_attention(
        q, k, v, lambda b, h, i: [j for j in range(i + 1) if bool(qk[b, h, i]) and bool(kk[b, h // G, j])]
    )
    _assert_all_close("out", out, ref)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", _vjp(out, (q, k, v), g), _vjp(ref, (q, k, v), g)):
        _assert_all_close(f"d{name}", a, b)
    # the standalone mask agrees with the GQA expansion h -> h // G
    m = R.drop_mask(qk, kk)
    for h in range(Hq):
        expect = qk[:, h, :, None] & kk[:, h // G, None, :] & torch.ones(N, N, dtype=torch.bool).tril()
        assert torch.equal(m[:, h], expect)


def test_qk_sparse_special_cases():
    B, Hq, Hkv, N, D = 2, 4, 2, 37, 16
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64, requires_grad=True)
    # everything kept == dense causal
    out = R.qk_sparse_attention(q, k, v, torch.ones(B, Hq, N, dtype=torch.bool), torch.ones(B, Hkv, N, dtype=torch.bool))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    _assert_all_close("all kept", out, ref)

    # dropped queries are exactly 0; kept queries whose causal keys are all dropped are 0
    qk = torch.rand(B, Hq, N) < 0.5
    kk = torch.rand(B, Hkv, N) < 0.5
    first = int(torch.randint(3, 10, ()))
    kk[..., :first] = False  # queries before `first` have no causal key at all
    out = R.qk_sparse_attention(q, k, v, qk, kk)
    assert (out[~qk] == 0).all()
    assert (out[..., :first, :] == 0).all()
    G = Hq // Hkv
    has_key = torch.cumsum(kk.repeat_interleave(G, dim=1).long(), dim=-1) > 0
    live = qk & has_key
    assert (out[live].abs().sum(-1) > 0).all()
    dq, dk, dv = _vjp(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert (dq[~live] == 0).all()
    # dropped keys receive no gradient
    assert (dk[~kk] == 0).all() and (dv[~kk] == 0).all()


def test_single_token_sequences():
    B, Hq, Hkv, D = 2, 4, 2, 16
    q, k, v = random_qkv(B, Hq, Hkv, 1, D, dtype=F64)
    expect = v.repeat_interleave(Hq // Hkv, dim=1)
    _assert_all_close("attention", R.attention(q, k, v, mask=R.causal_mask(1)), expect)
    kb = torch.randint(0, 4, (B, Hkv, 1))
    qb = kb.repeat_interleave(Hq // Hkv, dim=1)
    _assert_all_close("hash", R.hash_sparse_attention(q, k, v, qb, kb), expect)
    _assert_all_close("other bucket", R.hash_sparse_attention(q, k, v, qb + 1, kb), torch.zeros_like(expect))
    keep = torch.rand(B, Hq, 1) < 0.5
    out = R.qk_sparse_attention(q, k, v, keep, torch.ones(B, Hkv, 1, dtype=torch.bool))
    _assert_all_close("drop", out, expect * keep[..., None])
    out, aux = R.dash_attention(q, k, v, _rand_w(Hkv, D), chunk_size=4, return_aux=True)
    _assert_all_close("dash", out, expect)
    assert aux["pbar"].shape == (B, Hkv, 1, 0) and aux["log_prior"].shape == (B, Hkv, 1, 1)
    assert (aux["log_prior"] == 0).all()


# --------------------------------------------------------------------------------------------
# entmax15
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 37, 100])
@pytest.mark.parametrize("spread", [0.5, 4.0])
def test_entmax15_matches_package(n, spread):
    z = (spread * torch.randn(64, n, dtype=F64)).requires_grad_(True)
    p = R.entmax15(z)
    ref = entmax_pkg.entmax15(z, dim=-1)
    _assert_all_close("p", p, ref, atol=1e-12)
    g = torch.randn_like(p)
    _assert_all_close("dz", _vjp(p, (z,), g)[0], _vjp(ref, (z,), g)[0], atol=1e-10)
    # it is a distribution of the form [z/2 - tau]_+^2
    assert (p >= 0).all()
    _assert_all_close("sum", p.sum(-1), torch.ones(64, dtype=F64), atol=1e-12)
    x = z.detach() / 2
    supp = p > 0
    tau = torch.where(supp, x - p.detach().sqrt(), float("inf")).amin(-1, keepdim=True)
    assert (torch.where(supp, (x - p.detach().sqrt() - tau).abs(), 0) < 1e-12).all()
    assert (x[~supp] <= tau.expand_as(x)[~supp] + 1e-12).all()


def test_entmax15_masked_and_dim():
    R_, n = 40, 23
    z = (2 * torch.randn(R_, n, dtype=F64)).requires_grad_(True)
    mask = torch.rand(R_, n) < 0.6
    mask[:3] = False  # fully masked rows
    mask[3, :] = False
    mask[3, 5] = True  # a single unmasked entry
    p = R.entmax15(z, mask=mask)
    g = torch.randn_like(p)
    (dz,) = _vjp(p, (z,), g)
    assert torch.isfinite(p).all() and torch.isfinite(dz).all()
    assert (p[~mask] == 0).all() and (dz[~mask] == 0).all()
    assert (p[:3] == 0).all()
    assert p[3, 5] == 1
    for r in range(3, R_):
        m = mask[r]
        zr = z.detach()[r, m].clone().requires_grad_(True)
        ref = entmax_pkg.entmax15(zr, dim=0)
        _assert_all_close(f"row {r}", p[r, m], ref, atol=1e-12)
        _assert_all_close(f"drow {r}", dz[r, m], _vjp(ref, (zr,), g[r, m])[0], atol=1e-10)
    # -inf entries count as masked
    z_inf = z.detach().masked_fill(~mask, float("-inf"))
    _assert_all_close("-inf", R.entmax15(z_inf), p.detach(), atol=0)
    # dim argument and a broadcast mask
    z3 = torch.randn(3, n, 5, dtype=F64)
    m3 = torch.rand(1, n, 1) < 0.7
    m3[0, 0, 0] = True
    p3 = R.entmax15(z3, mask=m3, dim=1)
    ref3 = R.entmax15(z3.transpose(1, 2), mask=m3.transpose(1, 2), dim=-1).transpose(1, 2)
    _assert_all_close("dim=1", p3, ref3, atol=0)
    _assert_all_close("dim sums", p3.sum(1), torch.ones(3, 5, dtype=F64), atol=1e-12)


def test_entmax15_closed_cases():
    _assert_all_close("[0, 0]", R.entmax15(torch.zeros(2, dtype=F64)), torch.tensor([0.5, 0.5], dtype=F64), 1e-15)
    assert R.entmax15(torch.tensor([1.5])).item() == 1.0
    n = int(torch.randint(1, 50, ()))
    c = torch.randn(()).item()
    _assert_all_close("uniform", R.entmax15(torch.full((n,), c, dtype=F64)), torch.full((n,), 1 / n, dtype=F64), 1e-14)
    # a gap of more than 2 in z between the top entry and the rest gives one-hot
    z = torch.randn(10, 8, dtype=F64)
    top = torch.randint(0, 8, (10,))
    z[torch.arange(10), top] = z.max() + 2.0 + torch.rand(10, dtype=F64)
    assert torch.equal(R.entmax15(z), F.one_hot(top, 8).to(F64))
    # exactly two entries with a gap d < 2: p = ((1 +- d/2) / 2)^2 ... solve: x1-tau = a, x2-tau = a-d/2
    d = 1.2 * torch.rand(()).item()
    p = R.entmax15(torch.tensor([d, 0.0], dtype=F64))
    # a^2 + (a - d/2)^2 = 1 -> a = (d/2 + sqrt(2 - d^2/4)) / 2
    a = (d / 2 + math.sqrt(2 - d * d / 4)) / 2
    _assert_all_close("two", p, torch.tensor([a * a, (a - d / 2) ** 2], dtype=F64), 1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_entmax15_low_precision_and_large_inputs(dtype):
    z = 3 * torch.randn(32, 40)
    z[:4] *= 1e3  # huge logits
    z[4:8] -= 5e3  # far below zero
    zl = z.to(dtype).requires_grad_(True)
    mask = torch.rand(32, 40) < 0.8
    mask[:, 0] = True
    p = R.entmax15(zl, mask=mask)
    assert p.dtype == dtype
    (dz,) = _vjp(p, (zl,), torch.randn_like(p))
    assert torch.isfinite(p).all() and torch.isfinite(dz).all()
    ref = R.entmax15(zl.detach().double(), mask=mask)
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    assert max_abs_err(p, ref) < tol
    assert max_abs_err(p.double().sum(-1), torch.ones(32)) < 4 * tol


def test_entmax15_gradcheck():
    z = torch.randn(6, 9, dtype=F64, requires_grad=True)
    mask = torch.rand(6, 9) < 0.7
    mask[0] = False
    assert torch.autograd.gradcheck(lambda t: R.entmax15(t, mask=mask), (z,))


# --------------------------------------------------------------------------------------------
# DashAttention: stage 0 and 1
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,C", [(37, 8), (100, 16), (5, 8), (64, 64)])
def test_chunk_summaries_mean_pooling_at_zero_w(N, C):
    B, Hkv, D = 2, 2, 32
    k = torch.randn(B, Hkv, N, D, dtype=F64)
    kbar = R.chunk_summaries(k, torch.zeros(Hkv, D, dtype=F64), C)
    nF = N // C
    assert kbar.shape == (B, Hkv, nF, D)
    _assert_all_close("mean", kbar, k[:, :, : nF * C].reshape(B, Hkv, nF, C, D).mean(3), 1e-12)


def test_chunk_summaries_matches_loop():
    B, Hkv, N, D, C = 2, 4, 45, 16, 7
    k = torch.randn(B, Hkv, N, D, dtype=F64, requires_grad=True)
    w = _rand_w(Hkv, D, requires_grad=True)
    kbar = R.chunk_summaries(k, w, C)
    ref = torch.zeros_like(kbar)
    for b in range(B):
        for h in range(Hkv):
            for c in range(N // C):
                ks = k[b, h, c * C : (c + 1) * C]
                e = torch.exp(torch.stack([ks[j] @ w[h] for j in range(C)]) / math.sqrt(D))
                ref = ref.index_put((torch.tensor(b), torch.tensor(h), torch.tensor(c)), (e / e.sum()) @ ks)
    _assert_all_close("kbar", kbar, ref, 1e-12)
    g = torch.randn_like(kbar)
    for name, a, b in zip("kw", _vjp(kbar, (k, w), g), _vjp(ref, (k, w), g)):
        _assert_all_close(f"d{name}", a, b)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (8, 2)])
def test_dash_router_structure_and_group_mean(Hq, Hkv):
    B, N, D, C = 2, 43, 16, 8
    G = Hq // Hkv
    q, k, _ = random_qkv(B, Hq, Hkv, N, D, dtype=F64)
    w = _rand_w(Hkv, D)
    gamma = 0.5 + 3 * torch.rand(()).item()
    pbar = R.dash_router(q, k, w, chunk_size=C, gamma=gamma)
    nF = N // C
    assert pbar.shape == (B, Hkv, N, nF) and pbar.dtype == F64
    ci = torch.arange(N) // C
    assert (pbar[..., ci == 0, :] == 0).all()  # rows in chunk 0 have no past chunk
    future = torch.arange(nF)[None, :] >= ci[:, None]
    assert (pbar[..., future] == 0).all()
    _assert_all_close("sums", pbar[..., ci >= 1, :].sum(-1), torch.ones(B, Hkv, int((ci >= 1).sum()), dtype=F64), 1e-12)
    # independent recomputation: per head entmax (package) over past chunks, mean over the group
    kbar = R.chunk_summaries(k, w, C)
    for b in range(B):
        for g in range(Hkv):
            for i in range(C, N):
                c_i = i // C
                ps = [
                    entmax_pkg.entmax15(gamma * (kbar[b, g, :c_i] @ q[b, h, i]) / math.sqrt(D), dim=0)
                    for h in range(g * G, (g + 1) * G)
                ]
                _assert_all_close(f"pbar[{b},{g},{i}]", pbar[b, g, i, :c_i], torch.stack(ps).mean(0), 1e-12)


def test_dash_router_gamma_controls_sparsity():
    B, Hq, Hkv, N, D, C = 1, 4, 2, 512, 32, 8
    q, k, _ = random_qkv(B, Hq, Hkv, N, D, dtype=torch.float32)
    w = _rand_w(Hkv, D, dtype=torch.float32)
    counts = {}
    for gamma in (0.0, 0.1, 10.0):
        counts[gamma] = (R.dash_router(q, k, w, chunk_size=C, gamma=gamma) > 0).sum(-1).double()
    ci = (torch.arange(N) // C).double()
    assert torch.equal(counts[0.0], ci.expand_as(counts[0.0]))  # gamma = 0: every past chunk
    late = ci >= 16
    lo, hi = counts[0.1][..., late].mean(), counts[10.0][..., late].mean()
    assert hi < 0.5 * lo, (lo.item(), hi.item())
    # gamma = 0 routes uniformly
    p0 = R.dash_router(q, k, w, chunk_size=C, gamma=0.0)
    rows = ci >= 1
    expect = torch.where(torch.arange(N // C)[None, :] < ci[rows, None], 1 / ci[rows, None], 0.0)
    _assert_all_close("uniform", p0[..., rows, :].double(), expect.expand(B, Hkv, -1, -1), 1e-6)


# --------------------------------------------------------------------------------------------
# DashAttention: prior, stats, full pipeline
# --------------------------------------------------------------------------------------------


def test_dash_log_prior_hand_built():
    N, C = 10, 4  # chunks 0..1 complete, chunk 2 partial (2 tokens)
    pbar = torch.zeros(1, 1, N, 2, dtype=F64)
    pbar[0, 0, 4:8, 0] = 1.0  # rows of chunk 1: their only past chunk
    a = 0.2 + 0.6 * torch.rand(()).item()
    pbar[0, 0, 8, :] = torch.tensor([a, 1 - a], dtype=F64)
    pbar[0, 0, 9, :] = torch.tensor([0.0, 1.0])  # chunk 0 not selected
    pbar[0, 0, 1, 1] = 0.7  # a "future" entry must be ignored
    pbar.requires_grad_(True)
    inf = float("-inf")
    lp = R.dash_log_prior(pbar, N, chunk_size=C)
    expect = torch.full((1, 1, N, 3), inf, dtype=F64)
    expect[0, 0, :4, 0] = 0
    expect[0, 0, 4:8, :2] = 0
    expect[0, 0, 8] = torch.tensor([math.log(a), math.log(1 - a), 0], dtype=F64)
    expect[0, 0, 9] = torch.tensor([inf, 0, 0])
    assert lp.shape == (1, 1, N, 3)
    assert torch.equal(torch.isinf(lp), torch.isinf(expect))
    _assert_all_close("default", lp[torch.isfinite(lp)], expect[torch.isfinite(expect)], 1e-14)

    sigma = 0.5 + torch.rand(()).item()
    lpe = R.dash_log_prior(pbar, N, chunk_size=C, estimate_diagonal=True, sigma=sigma)
    log_g = (math.log(a) + math.log(1 - a)) / 2
    expect[0, 0, 8] = torch.tensor([(math.log(a) - log_g) / sigma, (math.log(1 - a) - log_g) / sigma, 0], dtype=F64)
    expect[0, 0, 9] = torch.tensor([inf, 0, 0])  # single selected chunk: log pbar - log g = 0
    assert torch.equal(torch.isinf(lpe), torch.isinf(expect))
    _assert_all_close("estimate", lpe[torch.isfinite(lpe)], expect[torch.isfinite(expect)], 1e-14)

    # gradients: finite, exactly zero on unselected entries, d/dp log p = 1/p on selected ones
    g = torch.randn_like(lp)
    (dp,) = _vjp(lp, (pbar,), g)
    assert torch.isfinite(dp).all()
    sel = torch.zeros_like(pbar, dtype=torch.bool)
    sel[0, 0, 4:8, 0] = True
    sel[0, 0, 8, :] = True
    sel[0, 0, 9, 1] = True
    assert (dp[~sel] == 0).all()
    _assert_all_close("dlogp", dp[sel], g[..., :2][sel] / pbar.detach()[sel], 1e-12)
    (dpe,) = _vjp(lpe, (pbar,), g)
    assert torch.isfinite(dpe).all() and (dpe[~sel] == 0).all()


@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 16), (4, 1, 32), (2, 2, 64)])
def test_dash_gamma0_estimate_diagonal_is_dense_causal(Hq, Hkv, D):
    B, N, C = 2, 100, 16
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64, requires_grad=True)
    w = _rand_w(Hkv, D)
    out, aux = R.dash_attention(
        q, k, v, w, chunk_size=C, gamma=0.0, estimate_diagonal=True, sigma=1e12, return_aux=True
    )
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    _assert_all_close("out", out, ref)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", _vjp(out, (q, k, v), g), _vjp(ref, (q, k, v), g)):
        _assert_all_close(f"d{name}", a, b)
    assert aux["kept_fraction"].item() == 1.0
    ci = torch.arange(N) // C
    tokens = torch.minimum((ci + 1) * C, torch.tensor(N))
    assert abs(aux["sparsity"].item() - (1 - tokens / N).mean().item()) < 1e-6


@pytest.mark.parametrize(
    "Hq,Hkv,N,C,estimate_diagonal,sigma",
    [(4, 2, 19, 4, False, 1.0), (4, 2, 21, 4, True, 1.0), (2, 1, 17, 3, True, 0.6), (2, 2, 16, 4, False, 1.0)],
)
def test_dash_attention_matches_loop(Hq, Hkv, N, C, estimate_diagonal, sigma):
    B, D = 2, 16
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64, requires_grad=True)
    w = _rand_w(Hkv, D, requires_grad=True)
    gamma = 1.0 + 3 * torch.rand(()).item()  # large enough for a mix of selected and dropped chunks
    kw = {"chunk_size": C, "gamma": gamma, "estimate_diagonal": estimate_diagonal, "sigma": sigma}
    out = R.dash_attention(q, k, v, w, **kw)
    ref = _loop_dash(q, k, v, w, C, gamma, estimate_diagonal, sigma)
    _assert_all_close("out", out, ref)
    g = torch.randn_like(out)
    for name, a, b in zip("qkvw", _vjp(out, (q, k, v, w), g), _vjp(ref, (q, k, v, w), g)):
        _assert_all_close(f"d{name}", a, b, atol=1e-9)


def _router_margin(q, k, w, C, gamma):
    """Smallest |z/2 - tau| over the routed entries of every query head (x units)."""
    D = q.shape[-1]
    G = q.shape[1] // k.shape[1]
    kbar = R.chunk_summaries(k, w, C).repeat_interleave(G, dim=1)
    x = gamma * (q @ kbar.transpose(-1, -2)) / math.sqrt(D) / 2
    N = q.shape[2]
    past = torch.arange(N // C)[None, :] < (torch.arange(N) // C)[:, None]
    p = R.entmax15(2 * x, mask=past)
    tau = torch.where(p > 0, x - p.sqrt(), float("-inf")).amax(-1, keepdim=True)
    gap = torch.where(past, (x - tau).abs(), float("inf"))
    return gap.min().item()


@pytest.mark.parametrize("estimate_diagonal", [False, True])
def test_dash_attention_gradcheck(estimate_diagonal):
    B, Hq, Hkv, N, D, C, gamma = 1, 2, 1, 20, 8, 4, 2.0
    for _ in range(100):  # redraw until no routed entry sits on the entmax support boundary
        q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64, requires_grad=True)
        w = _rand_w(Hkv, D, requires_grad=True)
        if _router_margin(q, k, w, C, gamma) > 0.02:
            break
    else:
        pytest.fail("could not draw inputs away from the support boundary")

    def fn(q, k, v, w):
        return R.dash_attention(q, k, v, w, chunk_size=C, gamma=gamma, estimate_diagonal=estimate_diagonal, sigma=1.0)

    assert torch.autograd.gradcheck(fn, (q, k, v, w), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("estimate_diagonal", [False, True])
def test_dash_router_receives_gradient(estimate_diagonal):
    B, Hq, Hkv, N, D, C = 1, 4, 2, 64, 16, 8
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=torch.float32, requires_grad=True)
    w = _rand_w(Hkv, D, dtype=torch.float32, requires_grad=True)
    kw = {"chunk_size": C, "gamma": 2.0, "estimate_diagonal": estimate_diagonal, "sigma": 1.0}
    out, aux = R.dash_attention(q, k, v, w, return_aux=True, **kw)
    target = torch.randn_like(out)
    loss = ((out - target) ** 2).sum()
    (dw,) = torch.autograd.grad(loss, (w,))
    assert torch.isfinite(dw).all() and (dw.abs() > 0).all()
    # a gradient step on w lowers the loss and moves the router
    with torch.no_grad():
        w2 = w - 1e-3 * dw / dw.norm()
        out2, aux2 = R.dash_attention(q, k, v, w2, return_aux=True, **kw)
        assert ((out2 - target) ** 2).sum() < loss
        assert not torch.equal(aux2["pbar"], aux["pbar"])


def test_dash_estimate_diagonal_large_sigma_is_pure_mask():
    B, Hq, Hkv, N, D, C = 2, 4, 2, 131, 32, 16
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64)
    w = _rand_w(Hkv, D)
    out, aux = R.dash_attention(
        q, k, v, w, chunk_size=C, gamma=4.0, estimate_diagonal=True, sigma=1e12, return_aux=True
    )
    lp = aux["log_prior"]
    assert lp.shape == (B, Hkv, N, math.ceil(N / C))
    assert aux["pbar"].shape == (B, Hkv, N, N // C)
    sel = torch.isfinite(lp)[..., torch.arange(N) // C]  # [B, Hkv, N, N] key j's chunk selected
    mask = sel.repeat_interleave(Hq // Hkv, dim=1) & torch.ones(N, N, dtype=torch.bool).tril()
    _assert_all_close("out", out, R.attention(q, k, v, mask=mask))
    assert 0 < aux["kept_fraction"].item() < 1  # gamma = 4 drops some chunks
    # the aux tensors are what the public stage functions return
    pbar = R.dash_router(q, k, w, chunk_size=C, gamma=4.0)
    torch.testing.assert_close(aux["pbar"], pbar, rtol=0, atol=0)
    torch.testing.assert_close(
        lp, R.dash_log_prior(pbar, N, chunk_size=C, estimate_diagonal=True, sigma=1e12), rtol=0, atol=0
    )


def test_dash_first_chunk_and_short_sequences_are_dense_causal():
    B, Hq, Hkv, D, C = 2, 4, 2, 16, 16
    # N < C: one (partial) diagonal chunk -> dense causal
    N = int(torch.randint(2, C, ()))
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=F64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    _assert_all_close("short", R.dash_attention(q, k, v, _rand_w(Hkv, D), chunk_size=C, gamma=5.0), ref)
    # rows in chunk 0 of a longer sequence are dense causal too
    q, k, v = random_qkv(B, Hq, Hkv, 77, D, dtype=F64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = R.dash_attention(q, k, v, _rand_w(Hkv, D), chunk_size=C, gamma=5.0)
    _assert_all_close("chunk 0", out[..., :C, :], ref[..., :C, :])


def test_dash_selection_stats_hand_count():
    N, C = 10, 4  # chunk lengths 4, 4, 2
    inf = float("-inf")
    lp = torch.full((1, 1, N, 3), inf)
    for i in range(N):
        lp[0, 0, i, i // C] = 0.0  # diagonal
    lp[0, 0, 4:6, 0] = -0.5  # rows 4, 5: chunks {0, 1}; rows 6, 7: {1}
    lp[0, 0, 8, :2] = -1.0  # row 8: {0, 1, 2}; row 9: {1, 2}
    lp[0, 0, 9, 1] = -2.0
    lp[0, 0, 2, 2] = -0.1  # finite future entry: not counted
    kept, sparsity = R.dash_selection_stats(lp, C, N)
    assert abs(kept.item() - (4 + 2 + 2 * 0.5 + 1 + 2 / 3) / 10) < 1e-6
    tokens = [4] * 4 + [8, 8, 4, 4, 10, 6]
    assert abs(sparsity.item() - sum(1 - t / N for t in tokens) / N) < 1e-6
    # two KV heads and a batch: per-head values are averaged
    lp2 = torch.cat([lp, torch.where(torch.isfinite(lp), 0.0, inf)], dim=1).expand(2, 2, N, 3)
    lp2 = lp2.clone()
    lp2[:, 1, 4:8, 0] = 0.0
    lp2[:, 1, 8:, :] = 0.0
    kept2, sparsity2 = R.dash_selection_stats(lp2, C, N)
    assert abs(kept2.item() - (kept.item() + 1.0) / 2) < 1e-6
    dense_sp = sum(1 - min((i // C + 1) * C, N) / N for i in range(N)) / N
    assert abs(sparsity2.item() - (sparsity.item() + dense_sp) / 2) < 1e-6


def test_dash_selection_stats_skips_first_4096_positions():
    C = 64
    for N in (4096, 4100):
        nC = math.ceil(N / C)
        lp = torch.full((1, 2, N, nC), float("-inf"))
        lp[..., torch.arange(N), torch.arange(N) // C] = 0.0  # diagonal only
        kept, sparsity = R.dash_selection_stats(lp, C, N)
        ci = torch.arange(N) // C
        assert abs(kept.item() - (1 / (ci + 1).double()).mean().item()) < 1e-6
        if N > 4096:  # rows 4096..4099 sit in the partial chunk 64 of length 4
            expect = 1 - 4 / N
        else:
            expect = 1 - C / N
        assert abs(sparsity.item() - expect) < 1e-6, (N, sparsity.item(), expect)


# --------------------------------------------------------------------------------------------
# low precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    B, Hq, Hkv, N, D, C = 2, 4, 2, 100, 32, 16
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=dtype, requires_grad=True)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    w = 0.3 * torch.randn(Hkv, D)
    qb = torch.randint(0, 3, (B, Hq, N))
    kb = torch.randint(0, 3, (B, Hkv, N))
    qk = torch.rand(B, Hq, N) < 0.7
    kk = torch.rand(B, Hkv, N) < 0.7
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    cases = {
        "causal": (lambda q, k, v: R.attention(q, k, v, mask=R.causal_mask(N))),
        "hash": (lambda q, k, v: R.hash_sparse_attention(q, k, v, qb, kb)),
        "drop": (lambda q, k, v: R.qk_sparse_attention(q, k, v, qk, kk)),
        "dash": (lambda q, k, v: R.dash_attention(q, k, v, w, chunk_size=C, gamma=1.0)),
    }
    for name, fn in cases.items():
        out = fn(q, k, v)
        assert out.dtype == dtype, name
        ref = fn(q64, k64, v64)
        err = max_abs_err(out, ref)
        assert err < tol, f"{name}: {err:.3e} >= {tol:.1e}"
        grads = _vjp(out, (q, k, v), torch.randn_like(out))
        assert all(torch.isfinite(t).all() for t in grads), name


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------


def _bad_inputs():
    B, Hq, Hkv, N, D = 2, 4, 2, 37, 16
    q, k, v = random_qkv(B, Hq, Hkv, N, D)
    qb = torch.randint(0, 4, (B, Hq, N))
    kb = torch.randint(0, 4, (B, Hkv, N))
    qk = torch.ones(B, Hq, N, dtype=torch.bool)
    kk = torch.ones(B, Hkv, N, dtype=torch.bool)
    w = torch.zeros(Hkv, D)
    pbar = torch.zeros(B, Hkv, N, N // 8)
    meta_k = torch.empty(B, Hkv, N, D, device="meta")
    k3 = torch.randn(B, 3, N, D)
    return [
        (lambda: R.attention(q[0], k, v), r"q must be a 4-D tensor of shape \[B, Hq, N, D\], got \[4, 37, 16\]"),
        (lambda: R.attention(q, k[..., :8], v), r"k must be a tensor of shape \[B, Hkv, M, D\] = \[2, \?, \?, 16\]"),
        (lambda: R.attention(q, k[:1], v[:1]), r"\[B, Hkv, M, D\] = \[2, \?, \?, 16\]"),
        (lambda: R.attention(q, k3, k3), r"Hq = 4 must be a multiple of .*Hkv = 3"),
        (lambda: R.attention(q, k, v[:, :, :5]), r"v must have the shape of k, \[B, Hkv, M, D\] = \[2, 2, 37, 16\]"),
        (lambda: R.attention(q, k, v.double()), r"share one dtype"),
        (lambda: R.attention(q, k.long(), v), r"k must be a floating-point tensor"),
        (lambda: R.attention(q, k, v, mask=torch.ones(N, N)), r"mask must be a bool tensor broadcastable to \[B, Hq, N, M\] = \[2, 4, 37, 37\]"),
        (lambda: R.attention(q, k, v, mask=torch.ones(N, N + 1, dtype=torch.bool)), r"mask must be broadcastable to \[B, Hq, N, M\] = \[2, 4, 37, 37\]"),
        (lambda: R.attention(q, k, v, bias=torch.ones(3, N, N)), r"bias must be broadcastable to \[B, Hq, N, M\] = \[2, 4, 37, 37\]"),
        (lambda: R.attention(q, k, v, bias=torch.ones(N, N, dtype=torch.long)), r"bias must be a floating-point tensor"),
        (lambda: R.attention(q, meta_k, meta_k), r"k must be on the same device as q"),
        (lambda: R.hash_sparse_attention(q, k, v, qb.float(), kb), r"q_buckets must be an integer tensor of shape \[B, Hq, N\] = \[2, 4, 37\], got \[2, 4, 37\]"),
        (lambda: R.hash_sparse_attention(q, k, v, qb, kb[..., :-1]), r"k_buckets must be an integer tensor of shape \[B, Hkv, N\] = \[2, 2, 37\]"),
        (lambda: R.hash_sparse_attention(q, k, v, qb, kb.bool()), r"k_buckets must be an integer tensor"),
        (lambda: R.hash_sparse_attention(q, k[:, :, :-1], v[:, :, :-1], qb, kb), r"k must be a tensor of shape \[B, Hkv, N, D\] = \[2, \?, 37, 16\]"),
        (lambda: R.hash_mask(qb, qb[:, :3]), r"Hq = 4 heads, which must be a multiple of the Hkv = 3"),
        (lambda: R.qk_sparse_attention(q, k, v, qk.long(), kk), r"q_keep must be a bool tensor of shape \[B, Hq, N\] = \[2, 4, 37\]"),
        (lambda: R.qk_sparse_attention(q, k, v, qk, kk[:1]), r"k_keep must be a bool tensor of shape \[B, Hkv, N\] = \[2, 2, 37\]"),
        (lambda: R.drop_mask(qk, kk[:, :, :5]), r"k_keep must be a bool tensor of shape \[B, Hkv, N\] = \[2, \?, 37\]"),
        (lambda: R.entmax15(q, mask=torch.ones(D)), r"mask must be a bool tensor"),
        (lambda: R.entmax15(q, mask=torch.ones(3, dtype=torch.bool)), r"mask must be broadcastable to z's shape"),
        (lambda: R.chunk_summaries(k, w, 0), r"chunk_size must be an integer >= 1"),
        (lambda: R.dash_attention(q, k, v, w, chunk_size=2.0), r"chunk_size must be an integer >= 1"),
        (lambda: R.dash_attention(q, k, v, w[:1]), r"w must be a floating-point tensor of shape \[Hkv, D\] = \[2, 16\]"),
        (lambda: R.dash_attention(q, k, v, w, sigma=0.0), r"sigma must be a finite number > 0"),
        (lambda: R.dash_router(q, k, w.long()), r"w must be a floating-point tensor of shape \[Hkv, D\] = \[2, 16\]"),
        (lambda: R.dash_log_prior(pbar[..., :-1], N, chunk_size=8), r"pbar must be a floating-point tensor of shape \[B, Hkv, N, N // C\] = \[\?, \?, 37, 4\]"),
        (lambda: R.dash_selection_stats(pbar, 8, N), r"log_prior must be a floating-point tensor of shape \[B, Hkv, N, ceil\(N / C\)\] = \[\?, \?, 37, 5\]"),
        (lambda: R.causal_mask(-1), r"N must be a non-negative integer"),
    ]


def test_input_validation():
    cases = _bad_inputs()
    assert len(cases) >= 25
    for i, (fn, pattern) in enumerate(cases):
        with pytest.raises(ValueError, match=pattern):
            fn()
