"""The BlockMask builder: Triton lists vs torch, ``from_kv_blocks`` and ``create_block_mask``;
FlexAttention through the built masks vs the dense reference."""

import os

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

import flexsparse
from flexsparse import EMPTY, FULL, PARTIAL, block_mask_from_states, block_states, build_block_mask, states_mask_mod
from flexsparse import reference as ref
from flexsparse.testing import assert_close_to_ref

FIELDS = ["kv_num", "kv_idx", "full_kv_num", "full_kv_idx", "q_num", "q_idx", "full_q_num", "full_q_idx"]


def lists_of(bm: BlockMask):
    return bm.as_tuple()[2:10]


def assert_same_lists(a: BlockMask, b: BlockMask):
    for name, x, y in zip(FIELDS, lists_of(a), lists_of(b)):
        assert x is not None and y is not None, name
        assert x.dtype == torch.int32 and x.is_contiguous(), name
        assert x.shape == y.shape, (name, x.shape, y.shape)
        assert torch.equal(x.cpu(), y.cpu()), name


def random_states(B, H, nQ, nKV, *, device="cpu", p=(0.4, 0.3, 0.3), special_rows=True):
    """Random int8 block states; some rows forced empty and some forced all-full."""
    probs = torch.tensor(p, dtype=torch.float)
    states = torch.multinomial(probs, B * H * nQ * nKV, replacement=True).view(B, H, nQ, nKV).to(torch.int8)
    if special_rows and nQ >= 3:
        states[:, :, 0] = EMPTY
        states[:, :, nQ // 2] = FULL
        states[0, 0, -1] = PARTIAL
    return states.to(device)


def states_to_lists(states, width=None, shuffle=True, junk=True):
    """Per-row partial/full lists in random order with junk past the count (inputs for builders)."""
    B, H, nQ, nKV = states.shape
    width = width or nKV
    out = []
    for value in (PARTIAL, FULL):
        sel = states == value
        num = sel.sum(-1).to(torch.int32)
        key = sel.float() * 2 + (torch.rand(sel.shape, device=states.device) if shuffle else 0)
        idx = torch.argsort(key, dim=-1, descending=True).to(torch.int32)
        if junk:  # entries past num are never read: fill them with out-of-range garbage
            pos = torch.arange(nKV, device=states.device)
            idx = torch.where(pos < num.unsqueeze(-1), idx, torch.randint_like(idx, -5, 10**6))
        if width > nKV:
            pad = torch.full((B, H, nQ, width - nKV), 10**7, dtype=torch.int32, device=states.device)
            idx = torch.cat([idx, pad], -1)
        out += [num, idx.contiguous()]
    return out


def dense_mask(states, block_size, q_len, kv_len, element=None):
    qb, kb = (block_size, block_size) if isinstance(block_size, int) else block_size
    s = states.repeat_interleave(qb, 2).repeat_interleave(kb, 3)[..., :q_len, :kv_len]
    inner = s == PARTIAL
    if element is not None:
        q = torch.arange(q_len, device=states.device)[:, None]
        k = torch.arange(kv_len, device=states.device)[None, :]
        inner = inner & element(None, None, q, k)
    return (s == FULL) | inner


def causal(b, h, q, kv):
    return q >= kv


def scattered(b, h, q, kv):
    return (q * 7 + kv * 3) % 5 != 0


SHAPES = [  # B, H, q_len, kv_len, block_size
    (2, 3, 100, 100, 16),
    (1, 1, 1, 1, 16),
    (1, 2, 250, 90, (32, 16)),
    (2, 1, 20 * 16 + 5, 23 * 16, 16),
]


def _nblocks(q_len, kv_len, bs):
    qb, kb = (bs, bs) if isinstance(bs, int) else bs
    return -(-q_len // qb), -(-kv_len // kb)


@pytest.mark.triton
@pytest.mark.parametrize("B,H,q_len,kv_len,bs", SHAPES)
def test_states_triton_matches_torch_and_from_kv_blocks(device, B, H, q_len, kv_len, bs):
    nQ, nKV = _nblocks(q_len, kv_len, bs)
    states = random_states(B, H, nQ, nKV, device=device)
    bm = block_mask_from_states(states, seq_lengths=(q_len, kv_len), block_size=bs, impl="triton")
    bm_torch = block_mask_from_states(states, seq_lengths=(q_len, kv_len), block_size=bs, impl="torch")
    assert_same_lists(bm, bm_torch)
    sel_p, sel_f = states == PARTIAL, states == FULL
    ref_bm = BlockMask.from_kv_blocks(
        sel_p.sum(-1).int(),
        torch.argsort(sel_p.int(), dim=-1, descending=True, stable=True).int(),
        sel_f.sum(-1).int(),
        torch.argsort(sel_f.int(), dim=-1, descending=True, stable=True).int(),
        BLOCK_SIZE=bs,
        seq_lengths=(q_len, kv_len),
    )
    assert_same_lists(bm, ref_bm)
    assert bm.seq_lengths == (q_len, kv_len)
    assert tuple(bm.BLOCK_SIZE) == ((bs, bs) if isinstance(bs, int) else bs)


@pytest.mark.triton
@pytest.mark.parametrize("B,H,q_len,kv_len,bs", SHAPES)
def test_lists_any_order_with_junk(device, B, H, q_len, kv_len, bs):
    nQ, nKV = _nblocks(q_len, kv_len, bs)
    states = random_states(B, H, nQ, nKV, device=device)
    num, idx, fnum, fidx = states_to_lists(states, width=nKV + 3)
    bm = build_block_mask(num, idx, fnum, fidx, seq_lengths=(q_len, kv_len), block_size=bs, impl="triton")
    assert torch.equal(block_states(bm).cpu(), states.cpu())
    expected = block_mask_from_states(states, seq_lengths=(q_len, kv_len), block_size=bs, impl="torch")
    assert_same_lists(bm, expected)
    bm_t = build_block_mask(num, idx, fnum, fidx, seq_lengths=(q_len, kv_len), block_size=bs, impl="torch")
    assert_same_lists(bm_t, expected)


@pytest.mark.triton
@pytest.mark.parametrize("block_max", [1024, 16])
def test_every_output_row_is_a_permutation(device, monkeypatch, block_max):
    """Outputs start as uninitialised memory; every entry must be written with a valid id,
    selected ids first (ascending, matching the states), then the rest (ascending). A small
    step makes the kernel walk each row in several chunks."""
    from flexsparse.kernels import blockmask as kernels

    monkeypatch.setattr(kernels, "_BLOCK_MAX", block_max)
    nQ, nKV = 13, 37
    states = random_states(2, 2, nQ, nKV, device=device)
    bm = block_mask_from_states(states, seq_lengths=(nQ * 16, nKV * 16), block_size=16, impl="triton")
    kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx = lists_of(bm)
    st = states.cpu()
    for num, idx, sel in (
        (kv_num, kv_idx, st == PARTIAL),
        (fkv_num, fkv_idx, st == FULL),
        (q_num, q_idx, (st == PARTIAL).transpose(-1, -2)),
        (fq_num, fq_idx, (st == FULL).transpose(-1, -2)),
    ):
        want = torch.argsort(sel.int(), dim=-1, descending=True, stable=True).int()
        assert torch.equal(idx.cpu(), want)
        assert torch.equal(num.cpu(), sel.sum(-1).int())


@pytest.mark.triton
@pytest.mark.parametrize(
    "name,mod",
    [
        ("causal", causal),
        ("sliding", lambda b, h, q, kv: (q >= kv) & (q - kv < 40)),
        ("document", lambda b, h, q, kv: ((q // 45) == (kv // 45)) & (q >= kv)),
        ("prefix", lambda b, h, q, kv: (kv < 30) | (q >= kv)),
    ],
)
def test_roundtrip_create_block_mask(device, name, mod):
    """States read off create_block_mask rebuild exactly create_block_mask's eight tensors."""
    q_len = kv_len = 203
    bm_ref = create_block_mask(mod, 1, 1, q_len, kv_len, device=device, BLOCK_SIZE=16)
    states = block_states(bm_ref)
    bm = block_mask_from_states(states, seq_lengths=(q_len, kv_len), block_size=16, mask_mod=mod, impl="triton")
    assert_same_lists(bm, bm_ref)
    assert torch.equal(bm.to_dense().cpu(), bm_ref.to_dense().cpu())


@pytest.mark.triton
def test_empty_and_full_masks(device):
    for value in (EMPTY, FULL, PARTIAL):
        states = torch.full((1, 2, 5, 6), value, dtype=torch.int8, device=device)
        bm = block_mask_from_states(states, seq_lengths=(80, 96), block_size=16, impl="triton")
        kv_num, _, fkv_num, _, q_num, _, fq_num, _ = lists_of(bm)
        assert int(kv_num.sum()) == (30 * 2 if value == PARTIAL else 0)
        assert int(fkv_num.sum()) == (30 * 2 if value == FULL else 0)
        assert int(q_num.sum()) == int(kv_num.sum()) and int(fq_num.sum()) == int(fkv_num.sum())


@pytest.mark.triton
def test_partial_wins_over_full_and_duplicates(device):
    # row 0 lists block 1 as both partial and full, and block 2 twice as full
    num = torch.tensor([[[1, 0]]], dtype=torch.int32, device=device)
    idx = torch.tensor([[[[1, 0, 0], [0, 0, 0]]]], dtype=torch.int32, device=device)
    fnum = torch.tensor([[[3, 1]]], dtype=torch.int32, device=device)
    fidx = torch.tensor([[[[2, 1, 2], [0, 9, 9]]]], dtype=torch.int32, device=device)
    for impl in ("triton", "torch"):
        bm = build_block_mask(num, idx, fnum, fidx, seq_lengths=(32, 48), block_size=16, impl=impl)
        st = block_states(bm).cpu()
        assert st.tolist() == [[[[EMPTY, PARTIAL, FULL], [FULL, EMPTY, EMPTY]]]]
        assert bm.full_kv_num_blocks.tolist() == [[[1, 1]]]


@pytest.mark.triton
def test_partial_lists_only(device):
    states = random_states(2, 2, 9, 9, device=device, p=(0.5, 0.5, 0.0), special_rows=False)
    num, idx, _, _ = states_to_lists(states)
    bm = build_block_mask(num, idx, seq_lengths=(9 * 16, 9 * 16), block_size=16, impl="triton")
    assert int(bm.full_kv_num_blocks.sum()) == 0 and int(bm.full_q_num_blocks.sum()) == 0
    assert torch.equal(block_states(bm).cpu(), states.cpu())


@pytest.mark.triton
def test_int64_inputs_accepted(device):
    states = random_states(1, 2, 6, 7, device=device)
    num, idx, fnum, fidx = (t.long() for t in states_to_lists(states, junk=False))
    bm = build_block_mask(num, idx, fnum, fidx, seq_lengths=(96, 112), block_size=16)
    assert torch.equal(block_states(bm).cpu(), states.cpu())


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.triton
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_out_of_range_index_raises(device, impl):
    num = torch.tensor([[[2, 1]]], dtype=torch.int32, device=device)
    idx = torch.tensor([[[[0, 7], [1, 0]]]], dtype=torch.int32, device=device)  # nKV = 3: 7 is out of range
    with pytest.raises(ValueError, match="outside"):
        build_block_mask(num, idx, seq_lengths=(32, 48), block_size=16, impl=impl)
    neg = idx.clone()
    neg[0, 0, 0, 1] = -1
    with pytest.raises(ValueError, match="outside"):
        build_block_mask(num, neg, seq_lengths=(32, 48), block_size=16, impl=impl)
    too_many = torch.tensor([[[3, 1]]], dtype=torch.int32, device=device)  # count > W = 2
    with pytest.raises(ValueError, match="count"):
        build_block_mask(too_many, idx.clamp(0, 2), seq_lengths=(32, 48), block_size=16, impl=impl)


@pytest.mark.triton
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bad_state_value_raises(device, impl):
    states = torch.zeros(1, 1, 2, 3, dtype=torch.int8, device=device)
    states[0, 0, 1, 2] = 3
    with pytest.raises(ValueError, match="EMPTY=0"):
        block_mask_from_states(states, seq_lengths=(32, 48), block_size=16, impl=impl)


def test_shape_errors_name_expected_shape():
    states = torch.zeros(1, 1, 2, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\[B, H, 3, 3\]"):
        block_mask_from_states(states, seq_lengths=(48, 48), block_size=16, impl="torch")
    with pytest.raises(ValueError, match="int8"):
        block_mask_from_states(states.int(), seq_lengths=(32, 48), block_size=16, impl="torch")
    num = torch.zeros(1, 1, 2, dtype=torch.int32)
    idx = torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"nQ = ceil\(q_len / q_block\) = 4"):
        build_block_mask(num, idx, seq_lengths=(64, 48), block_size=16, impl="torch")
    with pytest.raises(ValueError, match=r"\[B, H, nQ\] = \[1, 1, 2\]"):
        build_block_mask(num[..., :1], idx, seq_lengths=(32, 48), block_size=16, impl="torch")
    with pytest.raises(ValueError, match="int32 or int64"):
        build_block_mask(num.float(), idx, seq_lengths=(32, 48), block_size=16, impl="torch")
    with pytest.raises(ValueError, match="together"):
        build_block_mask(num, idx, num, None, seq_lengths=(32, 48), block_size=16, impl="torch")
    with pytest.raises(ValueError, match="block_size"):
        build_block_mask(num, idx, seq_lengths=(32, 48), block_size=0, impl="torch")
    with pytest.raises(ValueError, match="seq_lengths"):
        build_block_mask(num, idx, seq_lengths=(0, 48), block_size=16, impl="torch")
    with pytest.raises(ValueError, match="impl"):
        build_block_mask(num, idx, seq_lengths=(32, 48), block_size=16, impl="cuda")


def test_triton_impl_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    states = torch.zeros(1, 1, 2, 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        block_mask_from_states(states, seq_lengths=(32, 48), block_size=16, impl="triton")
    # auto picks the PyTorch implementation instead, and says nothing wrong
    bm = block_mask_from_states(states, seq_lengths=(32, 48), block_size=16, impl="auto")
    assert int(bm.kv_num_blocks.sum()) == 0


# ---------------------------------------------------------------------------------------------
# FlexAttention through the built masks


def test_states_mask_mod_is_exact():
    states = random_states(2, 3, 7, 6)
    mm = states_mask_mod(states, 16, scattered)
    from torch.nn.attention.flex_attention import create_mask

    got = create_mask(mm, 2, 3, 100, 90, device="cpu")
    assert torch.equal(got, dense_mask(states, 16, 100, 90, scattered))
    # broadcast maps (B = H = 1)
    one = states[:1, :1]
    got1 = create_mask(states_mask_mod(one, 16), 2, 3, 100, 90, device="cpu")
    assert torch.equal(got1, dense_mask(one, 16, 100, 90).expand(2, 3, -1, -1))


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2)])
def test_eager_flex_forward_matches_reference(Hq, Hkv):
    """Eager FlexAttention applies mask_mod densely: checks the mask_mod built beside the lists."""
    B, N, D, bs = 2, 77, 16, 16
    nQ = -(-N // bs)
    states = random_states(B, Hq, nQ, nQ)
    states = torch.where(torch.ones(nQ, nQ, dtype=torch.bool).tril(), states, torch.zeros_like(states))
    bm = block_mask_from_states(states, seq_lengths=(N, N), block_size=bs, mask_mod=states_mask_mod(states, bs, causal))
    q, k, v = (torch.randn(B, h, N, D, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    with torch.no_grad():
        out = flex_attention(q, k, v, block_mask=bm, enable_gqa=Hq != Hkv)
    want = ref.attention(q, k, v, mask=dense_mask(states, bs, N, N, causal))
    # eager flex gives NaN-free zeros for empty rows
    assert_close_to_ref("out", out, want, floor=1e-10)


@pytest.fixture(scope="module")
def compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2)])
def test_compiled_cpu_flex_forward_uses_lists(compiled_flex, Hq, Hkv):
    """Compiled CPU FlexAttention skips blocks by the lists: output must still equal the dense
    reference, and a mask whose lists are empty must give zeros (the lists are really read)."""
    if os.environ.get("FLEXSPARSE_SKIP_COMPILE") == "1":
        pytest.skip("compile disabled")
    device = "cpu"  # CPU FlexAttention (the GPU kernels need other block sizes: see the gpu tests)
    B, N, D, bs = 1, 200, 16, 32
    nQ = -(-N // bs)
    states = random_states(B, Hq, nQ, nQ, device=device)
    states = torch.where(torch.ones(nQ, nQ, dtype=torch.bool, device=device).tril(), states, torch.zeros_like(states))
    mm = states_mask_mod(states, bs, scattered)
    bm = block_mask_from_states(states, seq_lengths=(N, N), block_size=bs, mask_mod=mm)
    q, k, v = (torch.randn(B, h, N, D, device=device) for h in (Hq, Hkv, Hkv))
    with torch.no_grad():
        out = compiled_flex(q, k, v, block_mask=bm, enable_gqa=True)
    want = ref.attention(q.double(), k.double(), v.double(), mask=dense_mask(states, bs, N, N, scattered))
    assert_close_to_ref("out", out, want, floor=1e-4)
    # same mask_mod code, but the lists say "nothing": compiled flex must skip every block
    everything = torch.full_like(states, PARTIAL)
    empty = block_mask_from_states(
        torch.zeros_like(states), seq_lengths=(N, N), block_size=bs, mask_mod=states_mask_mod(everything, bs, scattered)
    )
    with torch.no_grad():
        out0 = compiled_flex(q, k, v, block_mask=empty, enable_gqa=True)
    assert torch.count_nonzero(out0) == 0


# ---------------------------------------------------------------------------------------------
# GPU: large masks, compiled FlexAttention forward + backward in bf16


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [128, 64])
def test_gpu_large_mask_matches_from_kv_blocks(bs):
    B, H, N = 2, 16, 16384
    nQ = N // bs
    states = random_states(B, H, nQ, nQ, device="cuda")
    num, idx, fnum, fidx = states_to_lists(states, shuffle=False, junk=False)
    bm = build_block_mask(num, idx, fnum, fidx, seq_lengths=(N, N), block_size=bs)
    ref_bm = BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=bs, seq_lengths=(N, N))
    assert_same_lists(bm, ref_bm)


def _random_causal_pattern(B, H, nQ, device, density=0.5):
    """Diagonal blocks partial (causal), earlier blocks kept with prob `density`: some full,
    some partial (scattered element mask)."""
    kept = torch.rand(B, H, nQ, nQ, device=device) < density
    partial = torch.rand(B, H, nQ, nQ, device=device) < 0.3
    states = torch.where(kept, torch.where(partial, PARTIAL, FULL), EMPTY).to(torch.int8)
    tril = torch.ones(nQ, nQ, dtype=torch.bool, device=device).tril(-1)
    states = torch.where(tril, states, torch.zeros_like(states))
    states[..., torch.arange(nQ), torch.arange(nQ)] = PARTIAL
    return states


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,Hq,Hkv,N,D,bs,backward",
    [(2, 4, 2, 1000, 64, 128, True), (1, 8, 2, 777, 128, 128, True), (1, 4, 4, 1100, 64, 64, False)],
)
def test_gpu_compiled_flex_fwd_bwd_matches_reference(B, Hq, Hkv, N, D, bs, backward):
    """bf16 compiled FlexAttention through a built mask vs the float64 dense reference, within
    2x the error of the plain-PyTorch bf16 reference. 64-blocks: forward only (the backward
    needs max-autotune kernel choices in torch 2.11, see DESIGN.md)."""
    torch._dynamo.config.cache_size_limit = 64
    nQ = -(-N // bs)
    states = _random_causal_pattern(B, Hq, nQ, "cuda")

    def element(b, h, q, kv):
        return (q >= kv) & ((q * 7 + kv * 3) % 5 != 0)

    bm = block_mask_from_states(states, seq_lengths=(N, N), block_size=bs, mask_mod=states_mask_mod(states, bs, element))
    mask = dense_mask(states, bs, N, N, element)
    opts = None if bs == 128 else {"BLOCK_M": 64, "BLOCK_N": 64}
    fn = torch.compile(flex_attention, dynamic=False)
    q, k, v = (torch.randn(B, h, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward) for h in (Hq, Hkv, Hkv))
    do = torch.randn(B, Hq, N, D, device="cuda", dtype=torch.bfloat16)
    out = fn(q, k, v, block_mask=bm, enable_gqa=Hq != Hkv, kernel_options=opts)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = ref.attention(q64, k64, v64, mask=mask)
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    outl = ref.attention(ql, kl, vl, mask=mask)
    assert_close_to_ref("out", out, out64, outl)
    if not backward:
        return
    grads = torch.autograd.grad(out, (q, k, v), do)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), do.double())
    gradsl = torch.autograd.grad(outl, (ql, kl, vl), do)
    for name, g, g64, gl in zip(("dq", "dk", "dv"), grads, grads64, gradsl):
        assert_close_to_ref(name, g, g64, gl)
