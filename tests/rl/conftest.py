"""Fixtures of the RL tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny models are too small to gain from intra-op threads, and on a busy machine idle
    # OpenMP threads spin and multiply the CPU time of a test several times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
