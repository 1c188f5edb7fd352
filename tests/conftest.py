"""Shared test fixtures: deterministic seeds, a clean param store, CUDA skipping."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from the same seed with an empty param store and validation on."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


def pytest_configure(config):
    # Under pytest-xdist each worker gets one core: torch's default of one thread per core
    # would oversubscribe the machine and make timings erratic.
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
