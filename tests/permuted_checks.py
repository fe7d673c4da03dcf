"""Shared checks for the permuted patterns (hash, drop): layouts and brute-force block classes."""

import torch
from torch.nn.attention.flex_attention import create_mask

from flexsparse import EMPTY, FULL, block_states
from flexsparse.testing import assert_close_to_ref


def sorted_dense_mask(mask_orig, pm):
    """Element mask ``[B, Hq, L, L]`` in sorted coordinates, read off the mask in original
    positions through the layouts (independent of the pattern's mask_mod); empty slots mask all."""
    B, Hq, N, _ = mask_orig.shape
    G = pm.groups
    L = pm.length
    qs = pm.q_src.long()
    ks = pm.k_src.long().repeat_interleave(G, dim=1)  # [B, Hq, L]
    padded = torch.nn.functional.pad(mask_orig, (0, 1, 0, 1), value=False)  # index N = empty slot
    rows = torch.gather(padded, 2, qs.unsqueeze(-1).expand(B, Hq, L, N + 1))
    return torch.gather(rows, 3, ks.unsqueeze(2).expand(B, Hq, L, L))


def check_permutations(pm, N):
    """src/dst are inverse partial maps, positions match src, empty slots carry invalid ones."""
    L = pm.length
    assert pm.seq_len == N
    for src, dst, pos, bad in ((pm.q_src, pm.q_dst, pm.q_pos, -1), (pm.k_src, pm.k_dst, pm.k_pos, N)):
        assert src.dtype == dst.dtype == pos.dtype == torch.int32
        assert src.shape[-1] == L and dst.shape[-1] == N and pos.shape == src.shape
        used = src < N
        assert ((src >= 0) & (src <= N)).all() and ((dst >= 0) & (dst <= L)).all()
        got = torch.gather(dst.long(), -1, src.long().clamp(max=N - 1))
        assert torch.equal(got[used], torch.arange(L).expand_as(src)[used])
        assert int(used.sum()) == int((dst < L).sum())
        assert torch.equal(pos, torch.where(used, src, bad))
        # time order inside each run of equal buckets (stable sort)
        valid_next = used[..., 1:] & used[..., :-1]
        same = valid_next
        bucket = pm.q_bucket if pos is pm.q_pos else pm.k_bucket
        if bucket is not None:
            same = same & (bucket[..., 1:] == bucket[..., :-1])
        assert (src[..., 1:] > src[..., :-1])[same].all()


def check_block_states(pm, mask_orig, block_size):
    """Every EMPTY block has no allowed pair, every FULL block is all allowed on its valid
    (non-empty, in-range) query rows and has no empty key slot; the mask_mod equals the
    permuted original mask; the lists match the states."""
    B, Hq, N, _ = mask_orig.shape
    dense = sorted_dense_mask(mask_orig, pm)
    L = pm.length
    got = create_mask(pm.block_mask.mask_mod, B, Hq, L, L, device="cpu")
    assert torch.equal(got, dense), "mask_mod differs from the permuted original mask"
    n = -(-L // block_size)
    pad = n * block_size - L
    allowed = torch.nn.functional.pad(dense, (0, pad, 0, pad), value=False)
    q_ok = torch.nn.functional.pad(pm.q_src < N, (0, pad), value=False)  # [B, Hq, n*bs] real query rows
    k_empty = torch.nn.functional.pad(pm.k_src == N, (0, pad), value=False).repeat_interleave(pm.groups, dim=1)
    blocks = allowed.view(B, Hq, n, block_size, n, block_size)
    any_ = blocks.any(-1).any(-2)
    # rows that are empty slots or out of range do not matter; columns must all be allowed
    col_range = torch.ones(n * block_size, dtype=torch.bool)
    col_range[L:] = False
    ok_elem = allowed | ~q_ok.unsqueeze(-1) | ~col_range
    all_ = ok_elem.view(B, Hq, n, block_size, n, block_size).all(-1).all(-2)
    has_empty_key = k_empty.view(B, Hq, n, block_size).any(-1)  # [B, Hq, nKV]
    st = pm.states
    assert st.shape == (B, Hq, n, n) and st.dtype == torch.int8
    assert not (any_ & (st == EMPTY)).any(), "an EMPTY block holds an allowed pair"
    assert (all_ | (st != FULL)).all(), "a FULL block holds a masked pair on a real query row"
    assert not ((st == FULL) & has_empty_key.unsqueeze(2)).any(), "a FULL block holds an empty key slot"
    assert torch.equal(block_states(pm.block_mask, impl="torch"), st)
    return any_, all_


def build_checked(builder, a, b, device, **kw):
    """Build with the Triton kernels on ``device`` and with PyTorch on the CPU: identical
    layouts, states and block lists. Returns the CPU build (for brute-force checks)."""
    pm_t = builder(a.to(device), b.to(device), impl="triton", **kw)
    pm = builder(a, b, impl="torch", **kw)
    for name in ("q_src", "k_src", "q_dst", "k_dst", "q_pos", "k_pos", "q_bucket", "k_bucket", "states"):
        x, y = getattr(pm_t, name), getattr(pm, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x.cpu(), y), name
    for x, y in zip(pm_t.block_mask.as_tuple()[2:10], pm.block_mask.as_tuple()[2:10]):
        assert torch.equal(x.cpu(), y)
    return pm


def check_fwd_bwd(out, inputs, do, reference):
    """``out`` (a fast low-precision path applied to ``inputs``) and its gradients against
    ``reference(*inputs)`` in float64, with the error of the same reference at the inputs'
    precision as the yardstick."""
    grads = torch.autograd.grad(out, inputs, do)
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    out64 = reference(*x64)
    g64 = torch.autograd.grad(out64, x64, do.double())
    xl = [t.detach().clone().requires_grad_() for t in inputs]
    outl = reference(*xl)
    gl = torch.autograd.grad(outl, xl, do)
    assert_close_to_ref("out", out, out64, outl)
    for name, g, w, g_low in zip(("dq", "dk", "dv"), grads, g64, gl):
        assert_close_to_ref(name, g, w, g_low)
