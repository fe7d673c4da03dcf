"""flexsparse: dynamic sparse causal attention for PyTorch.

Public surface: block-mask builders (Triton kernels on the GPU), dense reference oracles
(``flexsparse.reference``) and, as patterns land, the functional ops and ``nn.Module`` layers.
"""

__version__ = "0.1.0"
