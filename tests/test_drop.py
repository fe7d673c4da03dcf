"""Query/key-drop pattern: stable compaction, Triton block states vs brute force, FlexAttention
forward (eager and compiled on CPU) and the functional op vs the dense reference; GPU fwd+bwd."""

import os

import pytest
import torch
from permuted_checks import build_checked, check_fwd_bwd, check_block_states, check_permutations, sorted_dense_mask
from torch.nn.attention.flex_attention import flex_attention

import flexsparse
from flexsparse import EMPTY, FULL, PARTIAL, block_states, drop_block_mask, qk_sparse_attention
from flexsparse import reference as ref
from flexsparse.patterns import permuted
from flexsparse.testing import assert_close_to_ref, random_qkv

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def keeps(kind, B, Hq, Hkv, N):
    if kind == "half":
        return torch.rand(B, Hq, N) < 0.5, torch.rand(B, Hkv, N) < 0.5
    if kind == "sparse":  # drop 80%
        return torch.rand(B, Hq, N) < 0.2, torch.rand(B, Hkv, N) < 0.2
    if kind == "none_dropped":
        return torch.ones(B, Hq, N, dtype=torch.bool), torch.ones(B, Hkv, N, dtype=torch.bool)
    if kind == "all_dropped":
        return torch.zeros(B, Hq, N, dtype=torch.bool), torch.zeros(B, Hkv, N, dtype=torch.bool)
    if kind == "dead_heads":  # query head 0 drops everything, KV head 1 drops every key
        qk, kk = torch.rand(B, Hq, N) < 0.6, torch.rand(B, Hkv, N) < 0.6
        qk[:, 0] = False
        kk[:, -1] = False
        return qk, kk
    if kind == "late_keys":  # kept early queries whose keys were all dropped
        qk = torch.rand(B, Hq, N) < 0.7
        kk = (torch.arange(N) >= N // 2).expand(B, Hkv, N) & (torch.rand(B, Hkv, N) < 0.7)
        return qk, kk.contiguous()
    raise ValueError(kind)


CASES = [  # B, Hq, Hkv, N, block_size, kind
    (2, 4, 2, 100, 16, "half"),
    (1, 2, 1, 257, 32, "sparse"),
    (1, 2, 2, 257, 32, "none_dropped"),
    (2, 2, 1, 100, 16, "all_dropped"),
    (1, 4, 2, 130, 16, "dead_heads"),
    (1, 2, 1, 99, 16, "late_keys"),
    (1, 1, 1, 1, 16, "half"),
]


@pytest.mark.triton
@pytest.mark.parametrize("B,Hq,Hkv,N,bs,kind", CASES)
def test_block_states_vs_brute_force(B, Hq, Hkv, N, bs, kind, device):
    qk, kk = keeps(kind, B, Hq, Hkv, N)
    pm = build_checked(drop_block_mask, qk, kk, device, block_size=bs)
    check_permutations(pm, N)
    check_block_states(pm, ref.drop_mask(qk, kk), bs)
    L = pm.length
    most = int(max(qk.sum(-1).max(), kk.sum(-1).max()))
    assert most <= L <= N and (L == N or L % bs == 0)
    n = -(-L // bs)
    if kind == "none_dropped":  # plain causal: the classification is exact
        i = torch.arange(n)
        want = torch.where(i[:, None] > i[None, :], FULL, torch.where(i[:, None] == i[None, :], PARTIAL, EMPTY))
        if N % bs == 1:
            want[-1, -1] = FULL
        assert torch.equal(pm.states, want.to(torch.int8).expand_as(pm.states))
    if kind == "all_dropped":
        assert (pm.states == EMPTY).all() and int(pm.block_mask.kv_num_blocks.sum()) == 0
    if kind == "dead_heads":
        assert (pm.states[:, 0] == EMPTY).all()
        assert (pm.states[:, -(Hq // Hkv):] == EMPTY).all()
    # blocks made only of dropped slots are empty
    q_dead = (pm.q_pos < 0)
    q_dead = torch.nn.functional.pad(q_dead, (0, n * bs - L), value=True).view(B, Hq, n, bs).all(-1)
    assert (pm.states[q_dead] == EMPTY).all()
    q, k, v = random_qkv(B, Hq, Hkv, N, 16, dtype=torch.float64)
    with torch.no_grad():
        out = flex_attention(pm.permute_q(q), pm.permute_kv(k), pm.permute_kv(v), block_mask=pm.block_mask,
                             enable_gqa=Hq != Hkv)
    want = ref.qk_sparse_attention(q, k, v, qk, kk)
    assert_close_to_ref("out", pm.unpermute_q(out), want, floor=1e-10)


def test_compaction_is_stable(device):
    keep = torch.rand(3, 2, 70) < 0.4
    pm = build_checked(drop_block_mask, keep, keep[:, :1].contiguous(), device, block_size=16, capacity=70)
    count = keep.sum(-1, keepdim=True)
    slot = torch.arange(70)
    kept_slot = slot < count
    assert torch.equal(pm.q_src < 70, kept_slot.expand_as(keep))  # kept first, then empty slots
    src = pm.q_src.long()
    assert torch.equal(src[kept_slot.expand_as(keep)], torch.nonzero(keep)[:, -1])  # time order
    assert torch.equal(pm.q_pos, torch.where(kept_slot, pm.q_src, -1))
    assert torch.equal(pm.q_dst < 70, keep)


@pytest.mark.parametrize("gather", ["triton", "torch"])
def test_permutation_gradients_through_sorted_reference(gather, monkeypatch):
    B, Hq, Hkv, N, D = 2, 4, 2, 45, 8
    qk, kk = keeps("half", B, Hq, Hkv, N)
    pm = drop_block_mask(qk, kk, block_size=16)
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=torch.float64, requires_grad=True)
    if gather == "torch":
        monkeypatch.setattr(permuted, "_use_triton_gather", lambda x: False)
    L = pm.length
    mask_s = sorted_dense_mask(ref.drop_mask(qk, kk), pm)[..., :L, :L]
    out = pm.unpermute_q(ref.attention(pm.permute_q(q), pm.permute_kv(k), pm.permute_kv(v), mask=mask_s))
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    want = ref.qk_sparse_attention(q, k, v, qk, kk)
    wgrads = torch.autograd.grad(want, (q, k, v), do)
    assert_close_to_ref("out", out, want, floor=1e-12)
    for name, g, w in zip(("dq", "dk", "dv"), grads, wgrads):
        assert_close_to_ref(name, g, w, floor=1e-12)


# ---------------------------------------------------------------------------------------------
# functional op


@pytest.mark.parametrize(
    "B,Hq,Hkv,N,bs,kind", [(2, 4, 2, 100, 16, "half"), (1, 4, 2, 130, 32, "dead_heads"), (1, 2, 1, 99, 16, "late_keys")]
)
def test_functional_flex_forward_matches_reference(B, Hq, Hkv, N, bs, kind):
    qk, kk = keeps(kind, B, Hq, Hkv, N)
    q, k, v = random_qkv(B, Hq, Hkv, N, 16)
    out = qk_sparse_attention(q, k, v, qk, kk, scale=0.25, backend="flex", block_size=bs)
    want = ref.qk_sparse_attention(q.double(), k.double(), v.double(), qk, kk, scale=0.25)
    assert_close_to_ref("out", out, want)
    assert torch.count_nonzero(out[~qk]) == 0  # dropped queries: exactly 0
    no_key = qk & ~ref.drop_mask(qk, kk).any(-1)
    assert torch.count_nonzero(out[no_key]) == 0  # kept queries without a kept key: exactly 0
    if kind == "late_keys":
        assert no_key.any()


def test_compiled_cpu_flex_uses_lists():
    if os.environ.get("FLEXSPARSE_SKIP_COMPILE") == "1":
        pytest.skip("compile disabled")
    B, Hq, Hkv, N, bs = 1, 4, 2, 200, 32
    qk, kk = keeps("dead_heads", B, Hq, Hkv, N)
    qk[:, 1, :64] = True
    kk[:, 0, :64] = True  # some fully kept blocks -> FULL blocks
    pm = drop_block_mask(qk, kk, block_size=bs)
    assert (pm.states == FULL).any() and (pm.states == EMPTY).any()
    q, k, v = random_qkv(B, Hq, Hkv, N, 16)
    fn = torch.compile(flex_attention, dynamic=False)
    with torch.no_grad():
        out = fn(pm.permute_q(q), pm.permute_kv(k), pm.permute_kv(v), block_mask=pm.block_mask, enable_gqa=True)
    out = torch.where(qk.unsqueeze(-1), pm.unpermute_q(out), 0.0)
    want = ref.qk_sparse_attention(q.double(), k.double(), v.double(), qk, kk)
    assert_close_to_ref("out", out, want, floor=1e-4)


def test_backends():
    B, H, N = 1, 2, 40
    qk, kk = keeps("half", B, H, H, N)
    q, k, v = random_qkv(B, H, H, N, 8, requires_grad=True)
    with pytest.raises(ValueError, match="backend"):
        qk_sparse_attention(q, k, v, qk, kk, backend="dense")
    with pytest.raises(RuntimeError, match="inference-only"):
        qk_sparse_attention(q, k, v, qk, kk, backend="flex", block_size=16)
    out = qk_sparse_attention(q, k, v, qk, kk)  # auto + grad on CPU -> reference
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    want = ref.qk_sparse_attention(q.detach(), k.detach(), v.detach(), qk, kk)
    assert torch.equal(out.detach(), want)
    with torch.no_grad():
        f = qk_sparse_attention(q, k, v, qk, kk, backend="flex", block_size=16)
    assert_close_to_ref("out", f, want)


def test_validation_errors():
    B, Hq, Hkv, N, D = 1, 4, 2, 30, 8
    q, k, v = random_qkv(B, Hq, Hkv, N, D)
    qk, kk = torch.ones(B, Hq, N, dtype=torch.bool), torch.ones(B, Hkv, N, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[B, Hq, N, D\]"):
        qk_sparse_attention(q[0], k, v, qk, kk)
    with pytest.raises(ValueError, match="bool"):
        qk_sparse_attention(q, k, v, qk.int(), kk)
    with pytest.raises(ValueError, match=r"\[B, Hkv, N\] = \[1, 2, 30\]"):
        qk_sparse_attention(q, k, v, qk, kk[..., :-1])
    with pytest.raises(ValueError, match=r"\[B, Hq, N\] = \[1, 4, 30\]"):
        qk_sparse_attention(q, k, v, qk[:, :1], kk)
    with pytest.raises(ValueError, match="block_size"):
        qk_sparse_attention(q, k, v, qk, kk, block_size=(16, 0))
    with pytest.raises(ValueError, match="bool"):
        drop_block_mask(qk.float(), kk)


def test_empty_sequence():
    q = torch.randn(1, 2, 0, 8)
    keep = torch.zeros(1, 2, 0, dtype=torch.bool)
    assert qk_sparse_attention(q, q, q, keep, keep, backend="flex").shape == (1, 2, 0, 8)


def test_public_api():
    for name in ("qk_sparse_attention", "drop_block_mask"):
        assert name in flexsparse.__all__ and hasattr(flexsparse, name)


# ---------------------------------------------------------------------------------------------
# GPU: compiled FlexAttention forward + backward in bf16, block size 128


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,Hq,Hkv,N,D,rate",
    [(2, 4, 2, 1000, 64, 0.5), (1, 8, 2, 777, 128, 0.8), (1, 2, 2, 1300, 64, 0.0), (1, 4, 1, 900, 128, 0.3)],
)
def test_gpu_fwd_bwd_bf16(B, Hq, Hkv, N, D, rate):
    torch._dynamo.config.cache_size_limit = 64
    dev = "cuda"
    qk = torch.rand(B, Hq, N, device=dev) >= rate
    kk = torch.rand(B, Hkv, N, device=dev) >= rate
    qk[:, 0] = False  # a query head with everything dropped
    pm = drop_block_mask(qk, kk, block_size=128)
    assert torch.equal(pm.states, drop_block_mask(qk, kk, block_size=128, impl="torch").states)
    q, k, v = random_qkv(B, Hq, Hkv, N, D, dtype=torch.bfloat16, device=dev, requires_grad=True)
    do = torch.randn(B, Hq, N, D, device=dev, dtype=torch.bfloat16)
    out = qk_sparse_attention(q, k, v, qk, kk, backend="flex", block_size=128)
    check_fwd_bwd(out, (q, k, v), do, lambda q, k, v: ref.qk_sparse_attention(q, k, v, qk, kk))
    assert torch.count_nonzero(out[~qk]) == 0


@pytest.mark.gpu
def test_gpu_mask_build_128k():
    B, Hq, Hkv, N = 1, 16, 4, 131072
    qk = torch.rand(B, Hq, N, device="cuda") < 0.2
    kk = torch.rand(B, Hkv, N, device="cuda") < 0.2
    pm = drop_block_mask(qk, kk, block_size=128)
    assert torch.equal(pm.states, drop_block_mask(qk, kk, block_size=128, impl="torch").states)
    assert torch.equal(block_states(pm.block_mask), pm.states)


def test_capacity_trims_the_dropped_tail_and_is_checked():
    B, Hq, Hkv, N, bs = 1, 2, 1, 256, 16
    qk, kk = torch.rand(B, Hq, N) < 0.2, torch.rand(B, Hkv, N) < 0.2
    most = int(max(qk.sum(-1).max(), kk.sum(-1).max()))
    pm = drop_block_mask(qk, kk, block_size=bs)
    assert pm.length == -(-most // bs) * bs  # N/16 = 16 = one block of rounding
    assert pm.block_mask.seq_lengths == (pm.length, pm.length)
    assert pm.states.shape == (B, Hq, pm.length // bs, pm.length // bs)
    pm2 = drop_block_mask(qk, kk, block_size=bs, capacity=most)
    assert pm2.length == most
    with pytest.raises(ValueError, match="smaller than the largest kept count"):
        drop_block_mask(qk, kk, block_size=bs, capacity=most - 1)
    with pytest.raises(ValueError, match="capacity must be an int"):
        drop_block_mask(qk, kk, block_size=bs, capacity=N + 1)
    q, k, v = random_qkv(B, Hq, Hkv, N, 8, dtype=torch.float64)
    want = ref.qk_sparse_attention(q, k, v, qk, kk)
    for c in (None, most, N):
        got = flexsparse.qk_sparse_attention(q, k, v, qk, kk, backend="flex", block_size=bs, capacity=c)
        assert_close_to_ref("out", got, want, floor=1e-10)
        assert (got[~qk] == 0).all()


def test_capacity_for_rate_and_device_side_check():
    from flexsparse.patterns.drop import capacity_for_rate

    N = 4096
    cap = capacity_for_rate(N, 0.8, 128)
    assert cap % 128 == 0 and 0.2 * N < cap <= 0.25 * N + 128
    assert capacity_for_rate(N, 0.0, 128) == N
    qk = torch.zeros(1, 2, 300, dtype=torch.bool)
    qk[..., :100] = True
    with pytest.raises(RuntimeError, match="capacity below a kept count"):  # on the CPU the device check is immediate
        drop_block_mask(qk, qk[:, :1], block_size=16, capacity=64, validate=False)
    pm = drop_block_mask(qk, qk[:, :1], block_size=16, capacity=112, validate=False)
    assert pm.length == 112
