"""Hash-sparse pattern: bucket sort, Triton block states vs brute force, FlexAttention forward
(eager and compiled on CPU) and the functional op vs the dense reference; GPU fwd+bwd in bf16."""

import os

import pytest
import torch
from permuted_checks import build_checked, check_fwd_bwd, check_block_states, check_permutations, sorted_dense_mask
from torch.nn.attention.flex_attention import flex_attention

import flexsparse
from flexsparse import EMPTY, FULL, PARTIAL, block_states, hash_block_mask, hash_sparse_attention
from flexsparse import reference as ref
from flexsparse.patterns import permuted
from flexsparse.testing import assert_close_to_ref, random_qkv

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def buckets(kind, B, H, N):
    if kind == "random4":
        return torch.randint(0, 4, (B, H, N))
    if kind == "one":
        return torch.full((B, H, N), 7)
    if kind == "tiny":  # many buckets of ~2 tokens
        return torch.randint(0, max(1, N // 2), (B, H, N))
    if kind == "unbalanced":  # one bucket holds ~90% of the tokens
        big = torch.rand(B, H, N) < 0.9
        return torch.where(big, 0, torch.randint(1, 9, (B, H, N)))
    if kind == "wide":  # negative and huge ids, int32
        return (torch.randint(-3, 3, (B, H, N)) * 100_003).to(torch.int32)
    raise ValueError(kind)


CASES = [  # B, Hq, Hkv, N, block_size, bucket kind
    (2, 4, 2, 100, 16, "random4"),
    (1, 2, 2, 257, 32, "one"),
    (1, 4, 2, 257, 16, "tiny"),
    (2, 2, 1, 257, 32, "unbalanced"),
    (1, 2, 1, 77, 16, "wide"),
    (1, 1, 1, 1, 16, "random4"),
]


N_BUCKETS = {"random4": lambda N: 4, "one": lambda N: 8, "tiny": lambda N: max(1, N // 2),
             "unbalanced": lambda N: 9, "wide": lambda N: None}


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["sort", "packed", "aligned"])
@pytest.mark.parametrize("B,Hq,Hkv,N,bs,kind", CASES)
def test_block_states_vs_brute_force(B, Hq, Hkv, N, bs, kind, layout, device):
    qb, kb = buckets(kind, B, Hq, N), buckets(kind, B, Hkv, N)
    if kind == "random4":  # keys usually share the queries' buckets (self-attention LSH)
        kb = torch.where(torch.rand(B, Hkv, N) < 0.5, qb[:, :: Hq // Hkv], kb)
    nb = N_BUCKETS[kind](N) if layout != "sort" else None
    if layout != "sort" and nb is None:
        pytest.skip("ids outside [0, n) need the sort layout")
    kw = {"n_buckets": nb, "align": layout == "aligned"} if nb is not None else {}
    pm = build_checked(hash_block_mask, qb, kb, device, block_size=bs, **kw)
    check_permutations(pm, N)
    check_block_states(pm, ref.hash_mask(qb, kb), bs)
    if layout == "aligned":  # every bucket starts at a block boundary
        starts = torch.ones_like(pm.q_bucket, dtype=torch.bool)
        starts[..., 1:] = pm.q_bucket[..., 1:] != pm.q_bucket[..., :-1]
        real = pm.q_src < N
        assert (torch.nonzero(starts & real)[:, -1] % bs == 0).all()
    else:
        assert pm.length == N
    if kind == "one":  # a single bucket is plain causal attention: the classification is exact
        n = -(-N // bs)
        i = torch.arange(n)
        want = torch.where(i[:, None] > i[None, :], FULL, torch.where(i[:, None] == i[None, :], PARTIAL, EMPTY))
        if N % bs == 1 and pm.length == N:  # a last block of one token sees itself only: full
            want[-1, -1] = FULL  # (with padding slots in the key block it stays partial)
        assert torch.equal(pm.states[..., :n, :n], want.to(torch.int8).expand(B, Hq, n, n))
        assert (pm.states[..., n:, :] == EMPTY).all() and (pm.states[..., :, n:] == EMPTY).all()
    # flex forward through the mask (eager: mask_mod) equals the reference
    q, k, v = random_qkv(B, Hq, Hkv, N, 16, dtype=torch.float64)
    with torch.no_grad():
        out = flex_attention(pm.permute_q(q), pm.permute_kv(k), pm.permute_kv(v), block_mask=pm.block_mask,
                             enable_gqa=Hq != Hkv)
    assert_close_to_ref("out", pm.unpermute_q(out), ref.hash_sparse_attention(q, k, v, qb, kb), floor=1e-10)


# (200 buckets, aligned) took 6 minutes in the CPU interpreter (one program per padded bucket);
# 200 buckets run packed, and (37, aligned) covers the multi-word aligned path
_LAYOUT_CASES = [(nb, extra, n, align) for nb, extra, n in [(1, 0, 203), (5, 0, 203), (5, 40, 2500), (37, 0, 203)]
                 for align in (0, 8)] + [(200, 3, 300, 0), (20, 3, 300, 8)]


@pytest.mark.triton
@pytest.mark.parametrize("nb,L_extra,N,align", _LAYOUT_CASES)
def test_layout_kernel_matches_torch(device, nb, L_extra, N, align):
    """Counting-sort kernel vs its PyTorch twin: excluded ids (-1), empty buckets, padding,
    spare tail slots, several chunks per row, and the out-of-range flag."""
    from flexsparse.kernels.layout import sorted_layout
    from flexsparse.patterns.permuted import sorted_layout_torch

    R = 5
    keys = torch.randint(-1, nb, (R, N), dtype=torch.int32)
    keys[0] = -1  # a row with nothing kept
    keys[1] = nb - 1  # one bucket only
    L = N + (nb * (align - 1) if align else 0) + L_extra
    want = sorted_layout_torch(keys, nb, L, align=align, invalid_pos=N)
    got = sorted_layout(keys.to(device), nb, L, align=align, invalid_pos=N)
    for name, g, w in zip(("src", "dst", "pos", "bucket", "flags"), got, want):
        assert torch.equal(g.cpu(), w), name
    assert not want[4].any()
    bad = keys.clone()
    bad[2, 7] = nb  # out of range
    bad[3, 9] = -5
    flags = sorted_layout(bad.to(device), nb, L, align=align, invalid_pos=N)[4].cpu()
    assert flags.tolist() == [0, 0, 1, 1, 0]
    assert torch.equal(flags, sorted_layout_torch(bad, nb, L, align=align, invalid_pos=N)[4])
    if L_extra == 0 and nb > 1:  # too few slots: flagged, never written out of bounds
        short = sorted_layout(keys.to(device), nb, N // 2, align=align, invalid_pos=N)[4].cpu()
        assert short[2:].all()


def test_alignment_cuts_partial_blocks():
    """Aligned buckets: no block straddles two buckets, so far fewer PARTIAL blocks (the reason
    for the padding), same function."""
    B, H, N, bs, nb = 1, 4, 2048, 64, 4
    qb, kb = torch.randint(0, nb, (B, H, N)), torch.randint(0, nb, (B, H, N))
    packed = hash_block_mask(qb, kb, n_buckets=nb, align=False, block_size=bs, impl="torch")
    aligned = hash_block_mask(qb, kb, n_buckets=nb, align=True, block_size=bs, impl="torch")
    assert aligned.length > N == packed.length
    n_part = [int((pm.states == PARTIAL).sum()) for pm in (packed, aligned)]
    assert n_part[1] < 0.8 * n_part[0], n_part


def test_bucket_ids_are_validated():
    qb = torch.randint(0, 4, (1, 2, 50))
    with pytest.raises(ValueError, match=r"bucket ids must lie in \[0, n_buckets = 3\)"):
        hash_block_mask(qb, qb, n_buckets=3, block_size=16)
    with pytest.raises(ValueError, match="align=True needs n_buckets"):
        hash_block_mask(qb, qb, align=True, block_size=16)
    with pytest.raises(ValueError, match="n_buckets must be a positive int"):
        hash_block_mask(qb, qb, n_buckets=0, block_size=16)


def test_tight_on_disjoint_buckets(device):
    """Queries and keys in different buckets: every block is EMPTY."""
    qb = torch.zeros(1, 2, 64, dtype=torch.long, device=device)
    pm = hash_block_mask(qb, qb + 1, block_size=16, impl="triton")
    assert (pm.states == EMPTY).all()
    assert int(pm.block_mask.kv_num_blocks.sum()) == 0


@pytest.mark.parametrize("gather", ["triton", "torch"])
@pytest.mark.parametrize("nb", [None, 3])
def test_permutation_gradients_through_sorted_reference(gather, nb, monkeypatch):
    """Gather q/k/v into sorted order, attend there with the sorted dense mask, gather back:
    forward and every gradient equal the reference in original order (float64); with padding
    slots too (aligned layout)."""
    B, Hq, Hkv, N, D = 2, 4, 2, 45, 8
    qb, kb = torch.randint(0, 3, (B, Hq, N)), torch.randint(0, 3, (B, Hkv, N))
    pm = hash_block_mask(qb, kb, block_size=16, n_buckets=nb, align=nb is not None)
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=torch.float64, requires_grad=True)
    if gather == "torch":
        monkeypatch.setattr(permuted, "_use_triton_gather", lambda x: False)
    mask_s = sorted_dense_mask(ref.hash_mask(qb, kb), pm)
    out = pm.unpermute_q(ref.attention(pm.permute_q(q), pm.permute_kv(k), pm.permute_kv(v), mask=mask_s))
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    want = ref.hash_sparse_attention(q, k, v, qb, kb)
    wgrads = torch.autograd.grad(want, (q, k, v), do)
    assert_close_to_ref("out", out, want, floor=1e-12)
    for name, g, w in zip(("dq", "dk", "dv"), grads, wgrads):
        assert_close_to_ref(name, g, w, floor=1e-12)


def test_compose_with_document_mask():
    B, H, N, bs = 1, 2, 90, 16
    qb = torch.randint(0, 3, (B, H, N))
    pm = hash_block_mask(qb, qb, block_size=bs)

    def doc(b, h, q, kv):
        return (q // 40) == (kv // 40)

    bm = pm.compose(doc)
    q, k, v = random_qkv(B, H, H, N, 8, dtype=torch.float64)
    with torch.no_grad():
        out = pm.unpermute_q(flex_attention(pm.permute_q(q), pm.permute_kv(k), pm.permute_kv(v), block_mask=bm))
    pos = torch.arange(N)
    mask = ref.hash_mask(qb, qb) & ((pos[:, None] // 40) == (pos[None, :] // 40))
    assert_close_to_ref("out", out, ref.attention(q, k, v, mask=mask), floor=1e-10)
    assert int(bm.full_kv_num_blocks.sum()) == 0  # FULL demoted: the user mask may cut into them


# ---------------------------------------------------------------------------------------------
# functional op


@pytest.mark.parametrize("B,Hq,Hkv,N,bs,kind", [(2, 4, 2, 100, 16, "random4"), (1, 2, 1, 257, 32, "unbalanced")])
def test_functional_flex_forward_matches_reference(B, Hq, Hkv, N, bs, kind):
    qb, kb = buckets(kind, B, Hq, N), buckets(kind, B, Hkv, N)
    q, k, v = random_qkv(B, Hq, Hkv, N, 16)
    scale = 0.3
    out = hash_sparse_attention(q, k, v, qb, kb, scale=scale, backend="flex", block_size=bs)
    assert out.dtype == torch.float32
    want = ref.hash_sparse_attention(q.double(), k.double(), v.double(), qb, kb, scale=scale)
    assert_close_to_ref("out", out, want)
    # auto without grad on CPU takes the flex path too
    auto = hash_sparse_attention(q, k, v, qb, kb, scale=scale, block_size=bs)
    assert torch.equal(auto, out)


def test_compiled_cpu_flex_uses_lists():
    """Compiled CPU FlexAttention skips blocks by the lists: must still equal the reference."""
    if os.environ.get("FLEXSPARSE_SKIP_COMPILE") == "1":
        pytest.skip("compile disabled")
    B, Hq, Hkv, N, bs = 1, 4, 2, 200, 32
    # two interleaved buckets (deterministic: FULL and EMPTY blocks exist), a few random moves
    qb = (torch.arange(N) % 2).expand(B, Hq, N).clone()
    kb = (torch.arange(N) % 2).expand(B, Hkv, N).clone()
    qb[torch.rand(B, Hq, N) < 0.05] = 2
    pm = hash_block_mask(qb, kb, block_size=bs)
    assert (pm.states == FULL).any() and (pm.states == EMPTY).any()
    q, k, v = random_qkv(B, Hq, Hkv, N, 16)
    fn = torch.compile(flex_attention, dynamic=False)
    with torch.no_grad():
        out = fn(pm.permute_q(q), pm.permute_kv(k), pm.permute_kv(v), block_mask=pm.block_mask, enable_gqa=True)
    want = ref.hash_sparse_attention(q.double(), k.double(), v.double(), qb, kb)
    assert_close_to_ref("out", pm.unpermute_q(out), want, floor=1e-4)


def test_backends():
    B, H, N = 1, 2, 40
    qb = torch.randint(0, 3, (B, H, N))
    q, k, v = random_qkv(B, H, H, N, 8, requires_grad=True)
    with pytest.raises(ValueError, match="backend"):
        hash_sparse_attention(q, k, v, qb, qb, backend="triton")
    with pytest.raises(RuntimeError, match="inference-only"):
        hash_sparse_attention(q, k, v, qb, qb, backend="flex", block_size=16)
    out = hash_sparse_attention(q, k, v, qb, qb)  # auto + grad on CPU -> reference
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    want = ref.hash_sparse_attention(q.detach(), k.detach(), v.detach(), qb, qb)
    assert torch.equal(out.detach(), want)
    r = hash_sparse_attention(q.detach(), k.detach(), v.detach(), qb, qb, backend="reference")
    assert torch.equal(r, want)
    with torch.no_grad():  # flex is fine without grad
        f = hash_sparse_attention(q, k, v, qb, qb, backend="flex", block_size=16)
    assert_close_to_ref("out", f, want)


def test_validation_errors():
    B, Hq, Hkv, N, D = 1, 4, 2, 30, 8
    q, k, v = random_qkv(B, Hq, Hkv, N, D)
    qb, kb = torch.zeros(B, Hq, N, dtype=torch.long), torch.zeros(B, Hkv, N, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[B, Hkv, N, D\]"):
        hash_sparse_attention(q, k[..., :-1, :], v, qb, kb)
    with pytest.raises(ValueError, match=r"\[B, Hq, N\] = \[1, 4, 30\]"):
        hash_sparse_attention(q, k, v, qb[:, :2], kb)
    with pytest.raises(ValueError, match=r"\[B, Hkv, N\] = \[1, 2, 30\]"):
        hash_sparse_attention(q, k, v, qb, qb)
    with pytest.raises(ValueError, match="integer"):
        hash_sparse_attention(q, k, v, qb.float(), kb)
    with pytest.raises(ValueError, match="multiple"):
        hash_sparse_attention(q[:, :3], k, v, qb[:, :3], kb)
    with pytest.raises(ValueError, match="block_size"):
        hash_sparse_attention(q, k, v, qb, kb, block_size=0)
    with pytest.raises(ValueError, match="multiple"):
        hash_block_mask(qb[:, :3], kb)


def test_empty_sequence():
    q = torch.randn(1, 2, 0, 8)
    b = torch.zeros(1, 2, 0, dtype=torch.long)
    assert hash_sparse_attention(q, q, q, b, b, backend="flex").shape == (1, 2, 0, 8)


def test_public_api():
    for name in ("hash_sparse_attention", "hash_block_mask", "PermutedBlockMask"):
        assert name in flexsparse.__all__ and hasattr(flexsparse, name)


# ---------------------------------------------------------------------------------------------
# GPU: compiled FlexAttention forward + backward in bf16, block size 128


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,Hq,Hkv,N,D,n_buckets",
    [(2, 4, 2, 1000, 64, 4), (1, 8, 2, 777, 128, 16), (1, 2, 2, 1300, 64, 1), (1, 4, 1, 900, 128, 200)],
)
@pytest.mark.parametrize("layout", ["sort", "aligned"])
def test_gpu_fwd_bwd_bf16(B, Hq, Hkv, N, D, n_buckets, layout):
    torch._dynamo.config.cache_size_limit = 64
    dev = "cuda"
    qb = torch.randint(0, n_buckets, (B, Hq, N), device=dev)
    kb = torch.randint(0, n_buckets, (B, Hkv, N), device=dev)
    kw = {} if layout == "sort" else {"n_buckets": n_buckets, "align": True}
    pm = hash_block_mask(qb, kb, block_size=128, **kw)
    assert torch.equal(pm.states, hash_block_mask(qb, kb, block_size=128, impl="torch", **kw).states)
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=torch.bfloat16, device=dev, requires_grad=True)
    do = torch.randn(B, Hq, N, D, device=dev, dtype=torch.bfloat16)
    out = hash_sparse_attention(q, k, v, qb, kb, backend="flex", block_size=128, **kw)
    check_fwd_bwd(out, (q, k, v), do, lambda q, k, v: ref.hash_sparse_attention(q, k, v, qb, kb))


@pytest.mark.gpu
def test_gpu_mask_build_128k():
    """128k tokens: the mask builds (no O(N^2) memory) and matches the PyTorch classification."""
    B, Hq, Hkv, N = 1, 16, 4, 131072
    qb = torch.randint(0, 16, (B, Hq, N), device="cuda", dtype=torch.int32)
    kb = torch.randint(0, 16, (B, Hkv, N), device="cuda", dtype=torch.int32)
    for kw in ({}, {"n_buckets": 16}):
        pm = hash_block_mask(qb, kb, block_size=128, **kw)
        assert pm.length == (N if not kw else N + 16 * 128)
        assert torch.equal(pm.states, hash_block_mask(qb, kb, block_size=128, impl="torch", **kw).states)
        assert torch.equal(block_states(pm.block_mask), pm.states)


@pytest.mark.triton
@pytest.mark.parametrize("N,bs", [(100, 16), (257, 32), (50, 24), (5, 128)])
def test_block_stats_kernel_matches_torch(device, N, bs):
    from flexsparse.kernels.hash import block_stats as stats_triton
    from flexsparse.patterns.permuted import block_stats as stats_torch

    pos = torch.randint(-1, N + 1, (2, 3, N), dtype=torch.int32, device=device)
    bkt = torch.randint(-(2**40), 2**40, (2, 3, N), device=device)
    for b in (bkt, None, (bkt % 7).int()):
        for skip in (False, True):
            assert torch.equal(stats_triton(pos, b, bs, skip).cpu(), stats_torch(pos, b, bs, skip).cpu())
