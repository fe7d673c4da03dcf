"""flexsparse: dynamic sparse causal attention for PyTorch.

Public surface: block-mask builders (Triton kernels on the GPU), dense reference oracles
(``flexsparse.reference``) and, as patterns land, the functional ops and ``nn.Module`` layers.
"""

__version__ = "0.1.0"

from flexsparse import reference  # noqa: F401
from flexsparse.patterns.blockmask import (
    EMPTY,
    FULL,
    PARTIAL,
    block_mask_from_states,
    block_states,
    build_block_mask,
    states_mask_mod,
)

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
]
