"""Shared pytest fixtures, and the one way tests reach the files they read (tests/fixtures/, see its README.md)."""
from pathlib import Path

import pytest
import torch

from blip.models.blip2 import TINY_VISION
from blip.models.blip2_qformer import Blip2QformerConfig
from blip.models.qformer import QFormerConfig, qformer_config
from blip.registry import register_qformer_arch

# the photos and unusual images (images/) and the LAVIS reference fixtures (lavis/)
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The sizes of the LAVIS stage-1 test checkpoint (fixtures/lavis: blip2_qformer) as an arch of their own, so the
# parity tests load it like a released file (its arch told from its widths).
LAVIS_TINY_QFORMER = "blip2_lavis_tiny_qformer"
register_qformer_arch(LAVIS_TINY_QFORMER, Blip2QformerConfig(
    vision=TINY_VISION,
    qformer=QFormerConfig(qformer_config(48, hidden_size=16, num_heads=2, num_layers=4, intermediate_size=64), 8),
    embed_dim=24))


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and a busy machine cannot slow them down (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """``tests/fixtures``: read-only (copy a file to ``tmp_path`` before changing it)."""
    return FIXTURES


@pytest.fixture
def java():
    """Tests of the caption metrics (pycocoevalcap runs Java): skipped without Java locally, a failure in CI."""
    import os
    import shutil
    if shutil.which("java") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the caption metrics: install a JRE (.ci/run does when java is missing)")
        pytest.skip("pycocoevalcap needs Java (apt-get install default-jre-headless)")
