"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests: tiny tensors on 2 shared CI cores only contend
    with more (seconds per op under load, ~10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
