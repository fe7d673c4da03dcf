"""flexsparse: dynamic sparse causal attention for PyTorch.

Public surface: block-mask builders (Triton kernels on the GPU), dense reference oracles
(``flexsparse.reference``), the functional ops (hash-sparse, query/key drop, DashAttention), their
mask builders and routers, and ``nn.Module`` layers.
"""

__version__ = "0.1.0"

from flexsparse import reference  # noqa: F401
from flexsparse.functional import dash_attention, hash_sparse_attention, qk_sparse_attention
from flexsparse.nn import DashAttention, HashSparseAttention, QKSparseAttention
from flexsparse.patterns.blockmask import (
    EMPTY,
    FULL,
    PARTIAL,
    block_mask_from_states,
    block_states,
    build_block_mask,
    states_mask_mod,
)
from flexsparse.patterns.dash_cache import DashKVCache, dash_decode
from flexsparse.patterns.dash import DashBlockMask, dash_block_mask, dash_sparsity, entmax_log_prior_table, topk_selection
from flexsparse.patterns.drop import drop_block_mask
from flexsparse.patterns.hash import hash_block_mask
from flexsparse.patterns.permuted import PermutedBlockMask
from flexsparse.patterns.router import entmax_router, router_tau

__all__ = [
    "__version__",
    "reference",
    "EMPTY",
    "PARTIAL",
    "FULL",
    "build_block_mask",
    "block_mask_from_states",
    "block_states",
    "states_mask_mod",
    "hash_sparse_attention",
    "qk_sparse_attention",
    "hash_block_mask",
    "drop_block_mask",
    "PermutedBlockMask",
    "HashSparseAttention",
    "QKSparseAttention",
    "dash_attention",
    "DashAttention",
    "dash_block_mask",
    "DashBlockMask",
    "dash_sparsity",
    "entmax_log_prior_table",
    "entmax_router",
    "router_tau",
    "topk_selection",
    "DashKVCache",
    "dash_decode",
]
