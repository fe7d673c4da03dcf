"""DashAttention on FlexAttention: block states (Triton kernel and PyTorch twin) vs brute force,
the chunk-major prior table vs the reference log-prior, eager CPU FlexAttention vs the float64
reference (both prior modes, top-k, composed masks), sparsity statistics, one compiled CPU
FlexAttention run; GPU: bf16 compiled forward + backward (dq, dk, dv, dw) vs float64."""

import math
import os

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from flexsparse import reference as ref
from flexsparse.patterns.blockmask import EMPTY, FULL, PARTIAL, block_states
from flexsparse.patterns.dash import (
    PRIOR_FILLER,
    SELECTED_THRESHOLD,
    _block_states_torch,
    dash_attention_flex,
    dash_block_mask,
    dash_sparsity,
    entmax_log_prior_table,
    entmax_router_torch,
    gpu_kernel_options,
    topk_selection,
)
from flexsparse.testing import assert_close_to_ref, random_qkv

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# ---------------------------------------------------------------------------------------------
# helpers: random selections, dense masks, brute-force block classes, dense twins


def random_selection(B, Hkv, N, C, density, dtype=torch.float32):
    """pbar-like ``[B, Hkv, N, N // C]``: positive on a random ``density`` share of past chunks."""
    nF = N // C
    p = torch.rand(B, Hkv, N, nF, dtype=dtype) + 0.01
    p = p * (torch.rand(B, Hkv, N, nF) < density)
    past = torch.arange(nF)[None, :] < (torch.arange(N) // C)[:, None]
    return torch.where(past, p, 0.0).to(dtype)


def chunk_selection(p, N, C):
    """bool ``[B, Hkv, N, nC]``: row i selects chunk c (past with p > 0, or its own chunk)."""
    nF, nC = N // C, -(-N // C)
    q_chunk = torch.arange(N) // C
    chunk = torch.arange(nC)
    pp = torch.cat([p, p.new_zeros(*p.shape[:3], nC - nF)], -1)
    return ((chunk[None, :] < q_chunk[:, None]) & (pp > 0)) | (chunk[None, :] == q_chunk[:, None])


def dense_allowed(p, N, C):
    """bool ``[B, Hkv, N, N]``: causal AND the key's chunk selected by the row."""
    sel = chunk_selection(p, N, C)
    tok = sel[..., torch.arange(N) // C]
    return tok & ref.causal_mask(N)


def brute_states(allowed, N, C, qb, G):
    """Block classes read off the dense element mask: EMPTY when no pair is allowed, FULL when
    every pair of the real rows is allowed and the chunk ends at or before the block's first row."""
    B, H = allowed.shape[:2]
    nQ, nC = -(-N // qb), -(-N // C)
    a = torch.zeros(B, H, nQ * qb, nC * C, dtype=torch.bool)
    a[..., :N, :N] = allowed
    row_ok = torch.zeros(nQ * qb, dtype=torch.bool)
    row_ok[:N] = True
    any_ = a.view(B, H, nQ, qb, nC, C).any(-1).any(-2)
    all_ = (a | ~row_ok[:, None]).view(B, H, nQ, qb, nC, C).all(-1).all(-2)
    r0 = torch.arange(nQ) * qb
    full = all_ & ((torch.arange(nC)[None, :] + 1) * C <= r0[:, None])
    st = torch.where(full, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
    return st.repeat_interleave(G, dim=1)


def dense_from_table(table, N, C, G):
    """Dense ``(mask, bias)`` ``[B, Hq, N, N]`` read off a prior table the way the mods read it."""
    tok = table[:, :, torch.arange(N) // C, :].transpose(-1, -2)  # [B, Hkv, N(q), N(kv)]
    tok = tok.repeat_interleave(G, dim=1)
    mask = (tok > SELECTED_THRESHOLD) & ref.causal_mask(N)
    return mask, torch.where(mask, tok, 0.0)


def dash_dense(q, k, v, pbar, C, estimate_diagonal=False, sigma=1.0, extra_mask=None, scale=None):
    """Stage 2 of the reference for a given selection (reference log-prior, dense attention)."""
    N = q.shape[2]
    G = q.shape[1] // k.shape[1]
    lp = ref.dash_log_prior(pbar, N, chunk_size=C, estimate_diagonal=estimate_diagonal, sigma=sigma)
    tok = lp[..., torch.arange(N, device=q.device) // C].repeat_interleave(G, dim=1)
    mask = ref.causal_mask(N, device=q.device) & (tok > float("-inf"))
    if extra_mask is not None:
        mask = mask & extra_mask
    return ref.attention(q, k, v, mask=mask, bias=torch.where(mask, tok, 0.0), scale=scale)


def topk_brute(q, kbar, C, top_k, scale):
    """Top-k selection by explicit per-row ranking (scores computed as topk_selection does)."""
    B, Hq, N, D = q.shape
    Hkv, nF = kbar.shape[1], kbar.shape[2]
    G = Hq // Hkv
    s = torch.matmul(q.float(), kbar.float().repeat_interleave(G, dim=1).transpose(-1, -2)) * scale
    s = s.view(B, Hkv, G, N, nF).mean(2)
    sel = torch.zeros(B, Hkv, N, nF)
    for b in range(B):
        for h in range(Hkv):
            for i in range(N):
                past = list(range(i // C))
                best = sorted(past, key=lambda c: (-s[b, h, i, c].item(), c))[:top_k]
                sel[b, h, i, best] = 1.0
    return sel


def topk_reference_attention(q, k, v, w, *, chunk_size, top_k, scale=None):
    """Dense twin of ``dash_attention_flex(router="topk")``: causal attention over the diagonal
    chunk and the ``top_k`` best past chunks (no prior)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kbar = ref.chunk_summaries(k.float(), w.float(), chunk_size)
    sel = topk_brute(q.detach(), kbar.detach(), chunk_size, top_k, scale)
    return dash_dense(q, k, v, sel.to(q.dtype), chunk_size, scale=scale)


# ---------------------------------------------------------------------------------------------
# block states


STATE_CASES = [  # B, Hq, Hkv, N, C, q_block, density
    (2, 4, 2, 77, 16, 16, 0.5),
    (1, 2, 2, 150, 16, 32, 0.9),
    (1, 4, 1, 257, 32, 32, 0.3),
    (2, 2, 1, 257, 32, 64, 1.0),
    (1, 4, 4, 300, 64, 64, 0.6),
    (1, 2, 1, 383, 64, 128, 1.0),
    (1, 2, 2, 200, 16, 24, 0.95),  # q blocks not aligned to chunks
    (1, 2, 1, 100, 32, 64, 0.0),  # diagonal only
    (1, 1, 1, 5, 16, 16, 1.0),  # shorter than a chunk
]


@pytest.mark.triton
@pytest.mark.parametrize("B,Hq,Hkv,N,C,qb,density", STATE_CASES)
def test_block_states_vs_brute_force(B, Hq, Hkv, N, C, qb, density, device):
    G = Hq // Hkv
    p = random_selection(B, Hkv, N, C, density)
    allowed = dense_allowed(p, N, C)
    want = brute_states(allowed, N, C, qb, G)
    from flexsparse.kernels.dash_mask import dash_block_states

    st, counts = dash_block_states(p.to(device), chunk_size=C, q_block=qb, groups=G, with_counts=True)
    st_t, counts_t = _block_states_torch(p, N, C, qb, G, True)
    assert st.dtype == torch.int8 and st.shape == want.shape
    assert torch.equal(st.cpu(), want)
    assert torch.equal(st_t, want)
    q_chunk = torch.arange(N) // C
    want_counts = ((torch.arange(N // C)[None, :] < q_chunk[:, None]) & (p > 0)).sum(-1)
    assert counts.dtype == torch.int32 and torch.equal(counts.cpu().long(), want_counts)
    assert torch.equal(counts_t.long(), want_counts)
    if density == 1.0 and N > 2 * max(qb, C):  # every past chunk selected: FULL blocks exist
        assert (want == FULL).any()
    # the BlockMask: lists equal the states, mask_mod equals the dense element mask
    dm = dash_block_mask(p.to(device), N, chunk_size=C, groups=G, q_block=qb)
    assert torch.equal(dm.states.cpu(), want)
    assert torch.equal(block_states(dm.block_mask, impl="torch").cpu(), want)
    assert dm.block_mask.BLOCK_SIZE == (qb, C) and dm.block_mask.seq_lengths == (N, N)
    mask = create_mask(dm.mask_mod, B, Hq, N, N, device=device)
    assert torch.equal(mask.cpu(), allowed.repeat_interleave(G, dim=1))


def test_block_states_torch_impl_builds_same_mask():
    B, Hq, Hkv, N, C, qb = 1, 4, 2, 190, 16, 32
    p = random_selection(B, Hkv, N, C, 0.7)
    a = dash_block_mask(p, N, chunk_size=C, groups=2, q_block=qb, impl="torch")
    b = dash_block_mask(p, N, chunk_size=C, groups=2, q_block=qb)
    for x, y in zip(a.block_mask.as_tuple()[2:10], b.block_mask.as_tuple()[2:10]):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# prior table


@pytest.mark.parametrize("estimate_diagonal,sigma", [(False, 1.0), (True, 1.0), (True, 0.3)])
@pytest.mark.parametrize("N,C", [(77, 16), (256, 32), (130, 64)])
def test_prior_table_matches_reference(N, C, estimate_diagonal, sigma):
    B, Hq, Hkv, D = 2, 4, 2, 16
    q, k, _ = random_qkv(B, Hq, Hkv, N, D, dtype=torch.float64)
    w = torch.randn(Hkv, D, dtype=torch.float64)
    pbar = ref.dash_router(q, k, w, chunk_size=C, gamma=3.0).requires_grad_()
    table = entmax_log_prior_table(pbar, N, chunk_size=C, estimate_diagonal=estimate_diagonal, sigma=sigma)
    assert table.dtype == torch.float32 and table.is_contiguous() and table.shape == (B, Hkv, -(-N // C), N)
    lp = ref.dash_log_prior(pbar, N, chunk_size=C, estimate_diagonal=estimate_diagonal, sigma=sigma)
    lp_t = lp.transpose(-1, -2)
    sel = lp_t > float("-inf")
    assert torch.equal(table > SELECTED_THRESHOLD, sel)
    assert torch.isfinite(table).all() and (table[~sel] == PRIOR_FILLER).all()
    assert_close_to_ref("table", table[sel], lp_t[sel], floor=1e-5 * (1 + lp_t[sel].abs().max().item()))
    # gradients: the same upstream gradient on selected entries gives the reference's d pbar
    g = torch.randn_like(lp_t)
    (d_table,) = torch.autograd.grad(table, pbar, torch.where(sel, g, 0.0).float())
    (d_ref,) = torch.autograd.grad(lp_t, pbar, torch.where(sel, g, 0.0))
    assert torch.isfinite(d_table).all()
    assert_close_to_ref("d pbar", d_table, d_ref, floor=1e-5 * (1 + d_ref.abs().max().item()))


@pytest.mark.triton
@pytest.mark.parametrize("estimate_diagonal,sigma", [(False, 1.0), (True, 0.7)])
@pytest.mark.parametrize(
    "N,C,qb,dtype", [(77, 16, 32, torch.float32), (160, 32, 32, torch.float64), (130, 64, 128, torch.float32)]
)
def test_fused_table_matches_torch(N, C, qb, dtype, estimate_diagonal, sigma, device):
    """The Triton kernel's table (and the PyTorch backward of the fused op) equal
    entmax_log_prior_table; the kernel's states equal the twin's."""
    B, Hkv, G = 2, 2, 2
    p = random_selection(B, Hkv, N, C, 0.6, dtype=dtype)
    p[0, 0, -1] = 0.0  # a row with no past chunk selected
    pd = p.to(device).requires_grad_()
    pt = p.clone().requires_grad_()
    kw = dict(chunk_size=C, groups=G, q_block=qb, estimate_diagonal=estimate_diagonal, sigma=sigma)
    a = dash_block_mask(pd, N, impl="triton", **kw)
    b = dash_block_mask(pt, N, impl="torch", **kw)
    assert a.table.dtype == torch.float32 and a.table.is_contiguous() and a.table.requires_grad
    assert torch.equal(a.states.cpu(), b.states)
    sel = b.table > SELECTED_THRESHOLD
    assert torch.equal(a.table.cpu() > SELECTED_THRESHOLD, sel)
    assert (a.table.cpu()[~sel] == PRIOR_FILLER).all()
    tol = 1e-6 if dtype == torch.float64 else 2e-5
    assert torch.allclose(a.table.cpu(), b.table, rtol=tol, atol=tol)
    g = torch.randn(b.table.shape) * sel
    (da,) = torch.autograd.grad(a.table, pd, g.to(device))
    (db,) = torch.autograd.grad(b.table, pt, g)
    assert da.dtype == dtype
    assert torch.allclose(da.cpu(), db, rtol=1e-4, atol=1e-4 * (1 + db.abs().max().item()))


def test_table_gradient_reaches_router_like_reference():
    """The dense emulation of the two mods (gathering the table) is differentiable into q, k, v
    and w, with the reference's gradients (the path FlexAttention's captured-buffer gradient
    takes on the GPU)."""
    B, Hq, Hkv, N, D, C = 1, 4, 2, 97, 16, 16
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=torch.float64, requires_grad=True)
    w = (0.5 * torch.randn(Hkv, D, dtype=torch.float64)).requires_grad_()
    for ed in (False, True):
        kbar = ref.chunk_summaries(k, w, C)
        pbar = entmax_router_torch(q, kbar, chunk_size=C, gamma=2.0)
        table = entmax_log_prior_table(pbar, N, chunk_size=C, estimate_diagonal=ed)
        mask, bias = dense_from_table(table, N, C, Hq // Hkv)
        out = ref.attention(q, k, v, mask=mask, bias=bias)
        want = ref.dash_attention(q, k, v, w, chunk_size=C, gamma=2.0, estimate_diagonal=ed)
        do = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v, w), do)
        exp = torch.autograd.grad(want, (q, k, v, w), do)
        assert_close_to_ref("out", out, want, floor=1e-5)
        for name, a, b in zip(("dq", "dk", "dv", "dw"), got, exp):
            assert_close_to_ref(name, a, b, floor=1e-5 * (1 + b.abs().max().item()))
        assert exp[3].abs().max() > 0  # the router really is trained


# ---------------------------------------------------------------------------------------------
# eager CPU FlexAttention vs the reference


FLEX_CASES = [  # B, Hq, Hkv, N, D, C, q_block, gamma, exact mask_mod
    (1, 2, 2, 150, 16, 16, 32, 0.05, True),  # nearly dense
    (2, 4, 2, 211, 64, 32, 32, 2.0, True),
    (1, 4, 1, 257, 16, 16, 16, 30.0, True),  # very sparse
    (1, 8, 2, 300, 16, 64, 128, 8.0, True),
    (1, 4, 2, 177, 16, 16, 32, 4.0, False),  # causal mask_mod, the filler removes unselected keys
]


@pytest.mark.parametrize("B,Hq,Hkv,N,D,C,qb,gamma,exact", FLEX_CASES)
def test_flex_eager_matches_reference(B, Hq, Hkv, N, D, C, qb, gamma, exact):
    q, k, v = random_qkv(B, Hq, Hkv, N, D)
    w = 0.5 * torch.randn(Hkv, D)
    with torch.no_grad():
        out, stats = dash_attention_flex(
            q, k, v, w, chunk_size=C, gamma=gamma, q_block=qb, return_stats=True, exact_mask_mod=exact
        )
    assert out.dtype == torch.float32 and out.shape == q.shape
    x64 = [t.double() for t in (q, k, v, w)]
    want, aux = ref.dash_attention(*x64, chunk_size=C, gamma=gamma, return_aux=True)
    assert_close_to_ref("out", out, want)
    assert abs(stats["kept_fraction"].item() - aux["kept_fraction"].item()) < 0.02
    if gamma >= 30:
        assert stats["kept_fraction"] < 0.75  # ~0.58 is the floor at 16 chunks (one past chunk)
    if gamma <= 0.05:
        assert stats["kept_fraction"] > 0.95


@pytest.mark.parametrize(
    "B,Hq,Hkv,N,D,C,qb,gamma,sigma",
    [(1, 4, 2, 161, 16, 16, 32, 3.0, 1.0), (1, 4, 4, 203, 64, 32, 64, 1.0, 0.5), (2, 4, 1, 150, 16, 16, 16, 10.0, 2.0)],
)
def test_flex_eager_estimate_diagonal(B, Hq, Hkv, N, D, C, qb, gamma, sigma):
    """float64 inputs: the router then matches the reference bit for bit (this prior mode is
    discontinuous where a chunk enters the support, so float32 routing could flip a chunk)."""
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=torch.float64)
    w = 0.5 * torch.randn(Hkv, D, dtype=torch.float64)
    kw = dict(chunk_size=C, gamma=gamma, estimate_diagonal=True, sigma=sigma)
    with torch.no_grad():
        out = dash_attention_flex(q, k, v, w, q_block=qb, **kw)
    want = ref.dash_attention(q, k, v, w, **kw)
    assert_close_to_ref("out", out, want, floor=2e-5)


def test_router_callable_and_twin():
    B, Hq, Hkv, N, D, C = 1, 4, 2, 130, 16, 16
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=torch.float64)
    w = torch.randn(Hkv, D, dtype=torch.float64)
    pbar = ref.dash_router(q, k, w, chunk_size=C, gamma=2.0, scale=0.2)
    twin = entmax_router_torch(q, ref.chunk_summaries(k, w, C), chunk_size=C, gamma=2.0, scale=0.2)
    assert torch.equal(pbar, twin)
    calls = []

    def router(q_, kbar, *, chunk_size, gamma, scale):
        calls.append((chunk_size, gamma, scale))
        return entmax_router_torch(q_, kbar, chunk_size=chunk_size, gamma=gamma, scale=scale)

    with torch.no_grad():
        out = dash_attention_flex(q, k, v, w, chunk_size=C, gamma=2.0, scale=0.2, router=router, q_block=32)
    assert calls == [(C, 2.0, 0.2)]
    assert_close_to_ref("out", out, ref.dash_attention(q, k, v, w, chunk_size=C, gamma=2.0, scale=0.2), floor=1e-5)


# ---------------------------------------------------------------------------------------------
# top-k


@pytest.mark.parametrize("Hq,Hkv,N,C,top_k", [(4, 2, 150, 16, 3), (2, 2, 97, 16, 1), (4, 1, 200, 32, 0), (2, 1, 90, 16, 50)])
def test_topk_selection_vs_brute_force(Hq, Hkv, N, C, top_k):
    B, D = 2, 16
    q = torch.randn(B, Hq, N, D)
    kbar = torch.randn(B, Hkv, N // C, D)
    kbar[:, :, 1::3] = kbar[:, :, :1]  # exact ties: equal summaries, the lower index must win
    sel = topk_selection(q, kbar, chunk_size=C, top_k=top_k, scale=0.25)
    assert sel.dtype == torch.float32 and sel.shape == (B, Hkv, N, N // C) and not sel.requires_grad
    assert torch.equal(sel, topk_brute(q, kbar, C, top_k, 0.25))
    n = sel.sum(-1)
    assert torch.equal(n, torch.minimum(torch.arange(N) // C, torch.tensor(top_k)).float().expand_as(n))


@pytest.mark.parametrize("B,Hq,Hkv,N,D,C,qb,top_k", [(1, 4, 2, 170, 16, 16, 32, 2), (2, 2, 1, 129, 64, 32, 64, 1)])
def test_topk_flex_matches_dense_twin(B, Hq, Hkv, N, D, C, qb, top_k):
    q, k, v = random_qkv(B, Hq, Hkv, N, D)
    w = torch.randn(Hkv, D)
    with torch.no_grad():
        out, stats = dash_attention_flex(q, k, v, w, chunk_size=C, router="topk", top_k=top_k, q_block=qb, return_stats=True)
    want = topk_reference_attention(q.double(), k.double(), v.double(), w, chunk_size=C, top_k=top_k)
    assert_close_to_ref("out", out, want)
    q_chunk = torch.arange(N) // C
    exp_kept = ((torch.clamp(q_chunk, max=top_k) + 1).float() / (q_chunk + 1).float()).mean()
    assert torch.allclose(stats["kept_fraction"], exp_kept)


def test_topk_block_mask_has_no_prior():
    N, C = 100, 16
    q, kbar = torch.randn(1, 2, N, 8), torch.randn(1, 1, N // C, 8)
    dm = dash_block_mask(topk_selection(q, kbar, chunk_size=C, top_k=2), N, chunk_size=C, groups=2, q_block=32, with_prior=False)
    assert dm.score_mod is None
    sel = dm.table > SELECTED_THRESHOLD
    assert (dm.table[sel] == 0).all()


# ---------------------------------------------------------------------------------------------
# compose with user masks


def test_compose_document_mask():
    B, Hq, Hkv, N, D, C, qb = 1, 4, 2, 181, 16, 16, 32
    q, k, v = random_qkv(B, Hq, Hkv, N, D)
    pbar = random_selection(B, Hkv, N, C, 0.8)
    pbar[..., 0] = torch.where(torch.arange(N) >= C, 0.7, 0.0)  # chunk 0 always: FULL blocks
    dm = dash_block_mask(pbar, N, chunk_size=C, groups=2, q_block=qb)
    assert (dm.states == FULL).any()

    def doc(b, h, q_idx, kv_idx):
        return (q_idx // 70) == (kv_idx // 70)

    bm = dm.compose(doc)
    assert int(bm.full_kv_num_blocks.sum()) == 0  # FULL demoted: the user mask may cut into them
    with torch.no_grad():
        out = flex_attention(q, k, v, score_mod=dm.score_mod, block_mask=bm, enable_gqa=True)
    pos = torch.arange(N)
    extra = (pos[:, None] // 70) == (pos[None, :] // 70)
    want = dash_dense(q.double(), k.double(), v.double(), pbar.double(), C, extra_mask=extra)
    assert_close_to_ref("out", out, want)


def test_compose_sliding_window_with_states():
    B, Hq, Hkv, N, D, C, qb, window = 1, 2, 1, 260, 16, 16, 32, 50
    q, k, v = random_qkv(B, Hq, Hkv, N, D)
    pbar = random_selection(B, Hkv, N, C, 1.0)  # everything selected: the window decides
    dm = dash_block_mask(pbar, N, chunk_size=C, groups=2, q_block=qb)

    def sliding(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < window

    user = block_states(create_block_mask(sliding, 1, 1, N, N, device="cpu", BLOCK_SIZE=(qb, C)), impl="torch")
    bm = dm.compose(sliding, states=user)
    st = block_states(bm, impl="torch")
    assert (st == EMPTY).sum() > (dm.states == EMPTY).sum()  # far blocks are skipped now
    with torch.no_grad():
        out = flex_attention(q, k, v, score_mod=dm.score_mod, block_mask=bm, enable_gqa=True)
    pos = torch.arange(N)
    extra = (pos[:, None] - pos[None, :]) < window
    want = dash_dense(q.double(), k.double(), v.double(), pbar.double(), C, extra_mask=extra)
    assert_close_to_ref("out", out, want)
    with pytest.raises(ValueError, match="int8"):
        dm.compose(sliding, states=user[..., :-1])


# ---------------------------------------------------------------------------------------------
# sparsity


@pytest.mark.parametrize("N,C,density", [(300, 16, 0.4), (4200, 64, 0.3), (4500, 128, 0.9), (40, 64, 0.5)])
def test_sparsity_matches_reference_exactly(N, C, density, device):
    B, Hkv = 2, 2
    p = random_selection(B, Hkv, N, C, density)
    for sel in (p, p.to(device)):
        # same device as the reference: float32 reductions may be ordered differently on a GPU
        kept_ref, sp_ref = ref.dash_selection_stats(ref.dash_log_prior(sel, N, chunk_size=C), C, N)
        kept, sp = dash_sparsity(sel, chunk_size=C)
        assert kept.dtype == sp.dtype == torch.float32 and kept.dim() == 0
        assert torch.equal(kept, kept_ref) and torch.equal(sp, sp_ref)
    if N < 1000:  # the kernel's per-row counts (the long cases would be slow in the interpreter)
        dm = dash_block_mask(p.to(device), N, chunk_size=C, groups=1, q_block=128, with_counts=True)
        kept, sp = dm.sparsity()
        assert torch.equal(kept.cpu(), kept_ref) and torch.equal(sp.cpu(), sp_ref)


# ---------------------------------------------------------------------------------------------
# compiled CPU FlexAttention (the only compiled signature of this file): it skips blocks by the
# lists, so EMPTY/FULL classification errors would show


@pytest.mark.parametrize("exact", [True, False])
def test_compiled_cpu_flex_uses_lists(exact):
    if os.environ.get("FLEXSPARSE_SKIP_COMPILE") == "1":
        pytest.skip("compile disabled")
    B, Hq, Hkv, N, D, C, qb = 1, 4, 2, 200, 16, 32, 32
    pbar = random_selection(B, Hkv, N, C, 0.5)
    pbar[..., 0] = torch.where(torch.arange(N) >= C, 0.7, 0.0)  # chunk 0 always: FULL blocks
    dm = dash_block_mask(pbar, N, chunk_size=C, groups=2, q_block=qb, exact_mask_mod=exact)
    assert (dm.states == FULL).any() and (dm.states == EMPTY).any() and (dm.states == PARTIAL).any()
    q, k, v = random_qkv(B, Hq, Hkv, N, D)
    fn = torch.compile(flex_attention, dynamic=False)
    with torch.no_grad():
        out = fn(q, k, v, score_mod=dm.score_mod, block_mask=dm.block_mask, enable_gqa=True)
    want = dash_dense(q.double(), k.double(), v.double(), pbar.double(), C)
    assert_close_to_ref("out", out, want, floor=1e-4)


# ---------------------------------------------------------------------------------------------
# options and validation


def test_gpu_kernel_options():
    o = gpu_kernel_options(torch.bfloat16, 64, 128)
    assert o == {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 4,
                 "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64}
    o = gpu_kernel_options(torch.bfloat16, 32, 128, {"BLOCK_M": 32, "bwd_num_warps": 4})
    assert o["fwd_BLOCK_N"] == 32 and o["bwd_BLOCK_N1"] == 32 and o["bwd_BLOCK_M1"] == 32
    assert "fwd_BLOCK_M" not in o and o["BLOCK_M"] == 32 and o["bwd_num_warps"] == 4
    with pytest.raises(ValueError, match="multiples of 16"):
        gpu_kernel_options(torch.bfloat16, 24, 128)


def test_validation_errors():
    B, Hq, Hkv, N, D, C = 1, 4, 2, 40, 8, 16
    q, k, v = random_qkv(B, Hq, Hkv, N, D)
    w = torch.zeros(Hkv, D)
    with pytest.raises(ValueError, match="router"):
        dash_attention_flex(q, k, v, w, chunk_size=C, router="dense")
    with pytest.raises(ValueError, match="top_k"):
        dash_attention_flex(q, k, v, w, chunk_size=C, router="topk")
    with pytest.raises(ValueError, match="top_k"):
        dash_attention_flex(q, k, v, w, chunk_size=C, top_k=2)
    with pytest.raises(ValueError, match=r"\[Hkv, D\]"):
        dash_attention_flex(q, k, v, w[:1], chunk_size=C)
    with pytest.raises(ValueError, match="multiple"):
        dash_attention_flex(q[:, :3], k, v, w, chunk_size=C)
    with pytest.raises(ValueError, match="q_block"):
        dash_attention_flex(q, k, v, w, chunk_size=C, q_block=0)
    with pytest.raises(RuntimeError, match="inference-only"):
        dash_attention_flex(q.requires_grad_(), k, v, w, chunk_size=C)
    p = random_selection(B, Hkv, N, C, 0.5)
    with pytest.raises(ValueError, match=r"\[B, Hkv, N, N // C\] = \[\?, \?, 40, 2\]"):
        dash_block_mask(p[..., :1], N, chunk_size=C, groups=2)
    with pytest.raises(ValueError, match="groups"):
        dash_block_mask(p, N, chunk_size=C, groups=0)
    with pytest.raises(ValueError, match="with_prior"):
        dash_block_mask(p, N, chunk_size=C, groups=2, with_prior=False, exact_mask_mod=False)
    with pytest.raises(ValueError, match="sigma"):
        entmax_log_prior_table(p, N, chunk_size=C, estimate_diagonal=True, sigma=0.0)
    with pytest.raises(ValueError, match="kbar"):
        topk_selection(q, torch.randn(B, Hkv, 3, D), chunk_size=C, top_k=1)
    with pytest.raises(ValueError, match="selection"):
        dash_sparsity(torch.zeros(2, 3), chunk_size=C)


def test_empty_sequence():
    q = torch.randn(1, 2, 0, 8)
    out, stats = dash_attention_flex(q, q, q, torch.zeros(2, 8), chunk_size=16, return_stats=True)
    assert out.shape == (1, 2, 0, 8) and stats["kept_fraction"] == 1 and stats["sparsity"] == 0


# ---------------------------------------------------------------------------------------------
# GPU: compiled FlexAttention forward + backward in bf16 vs the float64 reference


def _check_fwd_bwd(out, inputs, do, reference_fn):
    """``out`` and its gradients (dq, dk, dv, dw) vs ``reference_fn`` in float64, with the same
    reference at the inputs' precision as the yardstick (DESIGN.md §5)."""
    grads = torch.autograd.grad(out, inputs, do)
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    out64 = reference_fn(*x64)
    g64 = torch.autograd.grad(out64, x64, do.double())
    xl = [t.detach().clone().requires_grad_() for t in inputs]
    outl = reference_fn(*xl)
    gl = torch.autograd.grad(outl, xl, do)
    assert_close_to_ref("out", out, out64, outl)
    for name, g, w, g_low in zip(("dq", "dk", "dv", "dw"), grads, g64, gl):
        assert_close_to_ref(name, g, w, g_low)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "N,D,estimate_diagonal", [(1000, 128, False), (2048, 128, False), (1000, 64, False), (2048, 64, True)]
)
def test_gpu_fwd_bwd_bf16(N, D, estimate_diagonal):
    B, Hq, Hkv, C, gamma = 1, 8, 2, 64, 16.0
    dev = "cuda"
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=torch.bfloat16, device=dev, requires_grad=True)
    w = (0.5 * torch.randn(Hkv, D, device=dev)).to(torch.bfloat16).requires_grad_()
    do = torch.randn(B, Hq, N, D, device=dev, dtype=torch.bfloat16)
    kw = dict(chunk_size=C, gamma=gamma, estimate_diagonal=estimate_diagonal)
    out, stats = dash_attention_flex(q, k, v, w, return_stats=True, **kw)
    assert 0.05 < stats["kept_fraction"].item() < 0.95  # really sparse, really not empty
    _check_fwd_bwd(out, (q, k, v, w), do, lambda q, k, v, w: ref.dash_attention(q, k, v, w, **kw))
    # the mask kernels agree with their PyTorch twins on the device
    pbar = ref.dash_router(q.detach().float(), k.detach().float(), w.detach().float(), chunk_size=C, gamma=gamma)
    a = dash_block_mask(pbar, N, chunk_size=C, groups=Hq // Hkv, with_counts=True)
    b = dash_block_mask(pbar, N, chunk_size=C, groups=Hq // Hkv, with_counts=True, impl="torch")
    assert torch.equal(a.states, b.states) and torch.equal(a.counts, b.counts)
    for x, y in zip(a.block_mask.as_tuple()[2:10], b.block_mask.as_tuple()[2:10]):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_gpu_topk_fwd_bwd_bf16():
    B, Hq, Hkv, N, D, C, top_k = 1, 8, 2, 1000, 128, 64, 4
    dev = "cuda"
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=torch.bfloat16, device=dev, requires_grad=True)
    w = torch.zeros(Hkv, D, device=dev, dtype=torch.bfloat16)
    do = torch.randn(B, Hq, N, D, device=dev, dtype=torch.bfloat16)
    out = dash_attention_flex(q, k, v, w, chunk_size=C, router="topk", top_k=top_k)
    grads = torch.autograd.grad(out, (q, k, v), do)
    kbar = ref.chunk_summaries(k.detach(), w, C)  # as dash_attention_flex computes it (no near-tie flips)
    sel = topk_selection(q.detach(), kbar, chunk_size=C, top_k=top_k)  # the selection is hard: fixed
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = dash_dense(*x64, sel.double(), C)
    g64 = torch.autograd.grad(out64, x64, do.double())
    xl = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    outl = dash_dense(*xl, sel.to(torch.bfloat16), C)
    gl = torch.autograd.grad(outl, xl, do)
    assert_close_to_ref("out", out, out64, outl)
    for name, g, w64, g_low in zip(("dq", "dk", "dv"), grads, g64, gl):
        assert_close_to_ref(name, g, w64, g_low)
