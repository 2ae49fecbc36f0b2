"""Test configuration: the `gpu` marker (skipped without CUDA), and a dispatch
cache of the session's own (FASTDDPM_CACHE_DIR, inherited by subprocesses), so
tests never read or write the user's ~/.cache/fastddpm."""
import os
import shutil
import tempfile

import pytest
import torch

_CACHE = tempfile.mkdtemp(prefix="fastddpm-test-cache-")
os.environ["FASTDDPM_CACHE_DIR"] = _CACHE


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One compute thread for the test: on a busy 2-core machine the Inception network
    runs ~2x faster on one than on two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
