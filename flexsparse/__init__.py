"""flexsparse: dynamic sparse causal attention for PyTorch.

Public surface: block-mask builders (Triton kernels on the GPU), dense reference oracles
(``flexsparse.reference``), the SCFA functional ops (hash-sparse, query/key drop), their mask
builders and ``nn.Module`` layers.
"""

__version__ = "0.1.0"

from flexsparse import reference  # noqa: F401
from flexsparse.functional import hash_sparse_attention, qk_sparse_attention
from flexsparse.nn import HashSparseAttention, QKSparseAttention
from flexsparse.patterns.blockmask import (
    EMPTY,
    FULL,
    PARTIAL,
    block_mask_from_states,
    block_states,
    build_block_mask,
    states_mask_mod,
)
from flexsparse.patterns.drop import drop_block_mask
from flexsparse.patterns.hash import hash_block_mask
from flexsparse.patterns.permuted import PermutedBlockMask

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
]
