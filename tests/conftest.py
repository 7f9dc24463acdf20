"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and a busy machine cannot slow them down (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared():
    """The shared read-only assets and fixtures beside the checkout (``../shared``)."""
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.fail(f"{path} is missing: tests need the shared assets and fixtures checked out beside the repo")
    return path


@pytest.fixture
def java():
    """Tests of the caption metrics (pycocoevalcap runs Java): skipped without Java locally, a failure in CI."""
    import os
    import shutil
    if shutil.which("java") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the caption metrics: install a JRE (.ci/run does when java is missing)")
        pytest.skip("pycocoevalcap needs Java (apt-get install default-jre-headless)")
