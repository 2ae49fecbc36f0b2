"""Test configuration: the `gpu` marker (skipped without CUDA), one torch seed per
test, reported when the test fails, and a dispatch cache of the session's own
(FASTDDPM_CACHE_DIR, inherited by subprocesses), so tests never read or write the
user's ~/.cache/fastddpm."""
import os
import random
import shutil
import tempfile
import zlib

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


def test_seed(nodeid: str) -> int:
    """The seed a test runs under: FASTDDPM_TEST_SEED when set (an int replays a
    failure, "random" draws fresh inputs for a sweep), else a hash of the test's id,
    so that CI draws the same inputs whatever the order or selection of the tests."""
    env = os.environ.get("FASTDDPM_TEST_SEED", "")
    if env == "random":
        return random.SystemRandom().randrange(2**31 - 1)
    if env:
        return int(env)
    return zlib.crc32(nodeid.encode())


test_seed.__test__ = False   # a helper, not a test


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test starts from torch.manual_seed(seed) (CPU and CUDA generators)."""
    seed = test_seed(request.node.nodeid)
    request.node.fastddpm_seed = seed
    torch.manual_seed(seed)
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = getattr(item, "fastddpm_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("seed", f"torch seed {seed}: rerun with FASTDDPM_TEST_SEED={seed}"))


@pytest.fixture
def one_thread():
    """One compute thread for the test: on a busy 2-core machine the Inception network
    runs ~2x faster on one than on two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
