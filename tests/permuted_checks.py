"""Shared checks for the permuted patterns (hash, drop): brute-force block classification."""

import torch
from torch.nn.attention.flex_attention import create_mask

from flexsparse import EMPTY, FULL, block_states


def sorted_dense_mask(mask_orig, pm):
    """Element mask ``[B, Hq, N, N]`` in sorted coordinates, read off the mask in original
    positions through the permutations (independent of the pattern's mask_mod)."""
    B, Hq, N, _ = mask_orig.shape
    G = Hq // pm.k_perm.shape[1]
    kp = pm.k_perm.repeat_interleave(G, dim=1)  # [B, Hq, N]
    rows = torch.gather(mask_orig, 2, pm.q_perm.unsqueeze(-1).expand(B, Hq, N, N))
    return torch.gather(rows, 3, kp.unsqueeze(2).expand(B, Hq, N, N))


def check_permutations(pm, N):
    ar = torch.arange(N)
    for perm in (pm.q_perm, pm.k_perm):
        assert perm.dtype == torch.int64
        assert torch.equal(perm.sort(-1).values, ar.expand_as(perm))
    assert torch.equal(torch.gather(pm.q_perm, -1, pm.q_inv), ar.expand_as(pm.q_perm))
    assert torch.equal(torch.gather(pm.k_perm, -1, pm.k_inv), ar.expand_as(pm.k_perm))
    L = pm.length
    for src, dst in ((pm.q_src, pm.q_dst), (pm.k_src, pm.k_dst)):
        assert src.shape[-1] == L and dst.shape[-1] == N
        # src and dst are inverse partial maps: slot s reads row src[s] iff row src[s] goes to s
        used = src < N
        assert torch.equal(torch.gather(dst, -1, src.clamp(max=N - 1))[used], torch.arange(L).expand_as(src)[used])
        assert int(used.sum()) == int((dst < L).sum())


def check_block_states(pm, mask_orig, block_size):
    """Every EMPTY block has no allowed pair, every FULL block is all allowed (in-range part);
    the mask_mod equals the permuted original mask; the lists match the states."""
    B, Hq, N, _ = mask_orig.shape
    dense = sorted_dense_mask(mask_orig, pm)
    L = pm.length
    # slots past the capacity L hold no allowed pair (dropped tokens only)
    assert not dense[..., L:, :].any() and not dense[..., :, L:].any()
    dense, N = dense[..., :L, :L].contiguous(), L
    got = create_mask(pm.block_mask.mask_mod, B, Hq, N, N, device="cpu")
    assert torch.equal(got, dense), "mask_mod differs from the permuted original mask"
    n = -(-N // block_size)
    pad = n * block_size - N
    allowed = torch.nn.functional.pad(dense, (0, pad, 0, pad), value=False)
    in_range = torch.nn.functional.pad(torch.ones(N, N, dtype=torch.bool), (0, pad, 0, pad), value=False)
    blocks = allowed.view(B, Hq, n, block_size, n, block_size)
    any_ = blocks.any(-1).any(-2)
    all_ = (blocks | ~in_range.view(n, block_size, n, block_size)).all(-1).all(-2)
    st = pm.states
    assert st.shape == (B, Hq, n, n) and st.dtype == torch.int8
    assert not (any_ & (st == EMPTY)).any(), "an EMPTY block holds an allowed pair"
    assert (all_ | (st != FULL)).all(), "a FULL block holds a masked pair"
    assert torch.equal(block_states(pm.block_mask, impl="torch"), st)
    return any_, all_
