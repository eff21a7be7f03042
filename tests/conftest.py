"""Test-wide settings. Imported before any test module, so child processes (ray start, Ray workers, ray job
submit) inherit the environment set here."""

import os

import pytest
import torch

# Ray resolves 127.0.0.1 to the host's primary interface address unless "cluster mode" is off; with it off,
# every Ray process of a test (GCS, raylet, workers, metrics agent, service-discovery file) stays on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Model tests run single-threaded: on 2 shared cores two OpenMP threads fighting other processes run up
    to 10x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
