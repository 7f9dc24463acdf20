"""Shared pytest fixtures, and the one way tests reach the shared assets and fixtures beside the checkout."""
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
MISSING = (f"{SHARED} is missing: the tests need the shared assets and fixtures (LAVIS outputs, BERT vocabulary, "
           "photos) checked out as ../shared beside the repository")


def shared_dir() -> Path:
    """``../shared`` (for module-level constants); a clear error when it is not there."""
    if not SHARED.is_dir():
        raise FileNotFoundError(MISSING)
    return SHARED


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and a busy machine cannot slow them down (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared read-only assets and fixtures beside the checkout (``../shared``)."""
    if not SHARED.is_dir():
        pytest.fail(MISSING)
    return SHARED


@pytest.fixture
def java():
    """Tests of the caption metrics (pycocoevalcap runs Java): skipped without Java locally, a failure in CI."""
    import os
    import shutil
    if shutil.which("java") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the caption metrics: install a JRE (.ci/run does when java is missing)")
        pytest.skip("pycocoevalcap needs Java (apt-get install default-jre-headless)")
