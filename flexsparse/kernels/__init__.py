"""Triton kernels (imported lazily: TRITON_INTERPRET must be set before import on CPU)."""
