"""Fixtures for every test: a cache folder of the session's own, and a fixed, restored torch thread count.

Shared constants live in ``testkit.py`` (the ``tests`` folder is on the path through pytest's ``pythonpath``), so
no test imports this folder as a package that an installed distribution could shadow.
"""

import os

import pytest
import torch

#: Intra-op threads of a test: OMP_NUM_THREADS when it is set, else 2 (the machines here have 2 cores).
THREADS = int(os.environ.get("OMP_NUM_THREADS") or 2)


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Every test caches into the session's own folder (never the user's) and starts with THREADS threads."""
    monkeypatch.setenv("FRUGALDIFF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture
def one_thread():
    """One intra-op thread: for tests of small tensors, where a second thread only contends on a busy machine
    (10× slower under load). Modules ask for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    torch.set_num_threads(1)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache folder of this test alone (for tests of the cache itself)."""
    monkeypatch.setenv("FRUGALDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
