"""Test configuration.

Without a CUDA GPU, Triton kernels run under the interpreter: TRITON_INTERPRET=1 must be set
before any kernel module is imported, so it is set here, before flexsparse is imported.
Tests marked ``gpu`` are skipped without CUDA.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device kernels run on: CUDA when present, else CPU (Triton interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs per test, but reproducible from the printed seed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with the captured output of a failing test
    yield seed
