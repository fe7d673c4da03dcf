"""A tiny pre-norm transformer made of flexsparse attention layers, for compile and training tests.

``tiny_model(["hash", "qk"])`` builds embedding -> blocks (pre-norm attention + MLP) -> norm ->
vocabulary head, one block per entry. Add a layer kind to ``LAYERS`` to test it in a whole model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flexsparse import DashAttention, HashSparseAttention, QKSparseAttention


def dash_layer(
    dim: int, heads: int, kv_heads: int, *, chunk_size: int, q_block: int, router: str = "entmax",
    gamma: float = 64.0, top_k: int | None = None, track_sparsity: bool = True, backend: str = "auto",
) -> DashAttention:
    """A :class:`flexsparse.DashAttention` layer with a random (not mean-pooling) summary vector
    and a large router gamma, so that in a freshly initialised model the entmax router drops
    chunks (kept fraction below 1 from about 4 chunks on) and the mask is not trivially dense.
    ``track_sparsity``: the layer keeps ``last_stats`` (a module attribute set in ``forward``).
    ``backend``: the layer's DashAttention backend (``"auto"``: the fused Triton kernels on CUDA
    for the entmax router, FlexAttention for top-k)."""
    layer = DashAttention(
        dim, heads, kv_heads=kv_heads, chunk_size=chunk_size, q_block=q_block, gamma=gamma, router=router,
        top_k=top_k, track_sparsity=track_sparsity, backend=backend,
    )
    with torch.no_grad():
        layer.summary.normal_()
    return layer


# kind -> constructor(dim, heads, kv_heads, block_size) of a causal self-attention layer
# ``x [B, N, dim] -> [B, N, dim]`` whose forward takes optional keyword inputs. The dash layers
# use chunks of min(block_size, 64) (16 with the CPU tests' block size, 64 on the GPU) and
# query blocks of block_size.
LAYERS: dict[str, Callable[..., nn.Module]] = {
    "hash": lambda dim, heads, kv_heads, block_size: HashSparseAttention(
        dim, heads, kv_heads=kv_heads, n_buckets=4, block_size=block_size
    ),
    "qk": lambda dim, heads, kv_heads, block_size: QKSparseAttention(
        dim, heads, kv_heads=kv_heads, drop_rate=0.5, rotary=True, block_size=block_size
    ),
    "dash": lambda dim, heads, kv_heads, block_size: dash_layer(
        dim, heads, kv_heads, chunk_size=min(block_size, 64), q_block=block_size
    ),
    "dash_topk": lambda dim, heads, kv_heads, block_size: dash_layer(
        dim, heads, kv_heads, chunk_size=min(block_size, 64), q_block=block_size, router="topk", top_k=1
    ),
}


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, attn: nn.Module, dim: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, attn_inputs: dict[str, Tensor]) -> Tensor:
        x = x + self.attn(self.norm1(x), **attn_inputs)
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """``forward(tokens [B, N] int64, attn_inputs=None) -> logits [B, N, vocab]``.

    ``attn_inputs``: one dict of keyword tensors per block (e.g. ``{"q_buckets": ...,
    "k_buckets": ...}`` or ``{"q_keep": ..., "k_keep": ...}``), or None: every layer draws its
    own (LSH buckets, random keep masks)."""

    def __init__(self, vocab: int, dim: int, attns: list[nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(a, dim) for a in attns)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor, attn_inputs: list[dict[str, Tensor]] | None = None) -> Tensor:
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, {} if attn_inputs is None else attn_inputs[i])
        return self.head(self.norm(x))


def tiny_model(
    kinds: list[str], *, vocab: int = 61, dim: int = 32, heads: int = 4, kv_heads: int = 2, block_size: int = 16
) -> TinyTransformer:
    """A :class:`TinyTransformer` with one block per entry of ``kinds`` (keys of ``LAYERS``)."""
    return TinyTransformer(vocab, dim, [LAYERS[k](dim, heads, kv_heads, block_size) for k in kinds])


def random_attn_inputs(model: TinyTransformer, B: int, N: int, device=None) -> list[dict[str, Tensor]]:
    """Fresh given inputs for every block: random buckets (ids in ``[0, n_buckets)``) for hash
    layers, keep masks (about half kept) for query/key-drop layers, nothing for the others
    (DashAttention routes by itself)."""
    out = []
    for block in model.blocks:
        a = block.attn
        if isinstance(a, HashSparseAttention):
            nb = a.n_buckets
            out.append(
                {
                    "q_buckets": torch.randint(0, nb, (B, a.heads, N), device=device, dtype=torch.int32),
                    "k_buckets": torch.randint(0, nb, (B, a.kv_heads, N), device=device, dtype=torch.int32),
                }
            )
        elif isinstance(a, QKSparseAttention):
            out.append(
                {
                    "q_keep": torch.rand(B, a.heads, N, device=device) < 0.5,
                    "k_keep": torch.rand(B, a.kv_heads, N, device=device) < 0.5,
                }
            )
        else:
            out.append({})
    return out


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy in float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
