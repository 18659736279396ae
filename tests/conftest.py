"""Shared test configuration: hypothesis profiles and dtype parametrisation.

Profiles: ``ci`` (the default; fixed example count, ``derandomize=True``, so every run checks the
same examples) and ``dev`` (more examples, random). Choose with ``HYPOTHESIS_PROFILE=dev``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Test tensors are tiny: one intra-op thread is faster than two and keeps runs reproducible.
torch.set_num_threads(1)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """Both floating dtypes; tolerances are chosen per dtype inside each test."""
    return request.param


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards: for files of tiny tensors, where on a
    shared, loaded CPU two threads oversubscribe it (measured 15–20× slower per Euler step). Use it
    as ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
