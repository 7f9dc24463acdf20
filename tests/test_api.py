"""blip.create_model / list_models / load dispatch."""
import pytest
import torch

import blip
from blip.checkpoints import CheckpointError


def test_every_listed_model_is_buildable_at_tiny_size():
    pairs = blip.list_models()
    assert ("blip_base", "caption") in pairs and ("blip2_vitg_qformer", "stage1") in pairs
    assert ("blip2_vitg_qformer", "stage2") not in pairs  # a Q-Former arch has no LLM
    for arch, task in pairs:
        if "tiny" in arch:
            model = blip.create_model(arch, task)
            assert isinstance(model, torch.nn.Module) and any(p.requires_grad for p in model.parameters()), (arch, task)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        blip.load(tmp_path / "nope.pth")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        blip.load(tmp_path / "dir")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        blip.load(bad)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        blip.load("blip-base-caption")
