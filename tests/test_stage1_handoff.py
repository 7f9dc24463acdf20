"""The one stage-1 -> stage-2 hand-off (blip.convert.blip2_handoff.init_from_stage1), used by
blip.create_model(qformer_from=) and by stage-2 training: strict, with a report of what was loaded, kept and ignored by
name."""
import pytest
import torch

import blip
from blip.checkpoints import CheckpointError
from blip.convert.blip2_handoff import init_from_stage1


@pytest.fixture(scope="module")
def stage1():
    torch.manual_seed(1)
    return blip.create_model("blip2_tiny_qformer", "stage1")   # the training objective: keys under model.*


def test_training_checkpoint_hands_off_with_a_report(stage1, tmp_path):
    torch.save({"model": stage1.state_dict(), "step": 3}, tmp_path / "state.pt")   # a run's state.pt
    model = blip.create_model("blip2_tiny_opt", "stage2")
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    report = init_from_stage1(model, tmp_path / "state.pt")
    ours, theirs = model.state_dict(), stage1.model.state_dict()
    taken = [k for k in ours if k.startswith(("qformer.", "image_encoder."))]
    assert sorted(report.loaded) == sorted(taken)
    assert all(torch.equal(ours[k], theirs[k]) for k in taken)   # the frozen ViT too: the file has it
    assert {k.split(".")[0] for k in report.expected_missing} == {"llm", "llm_proj"}
    assert "temp" in report.unused and "qformer.transformer.embeddings.word.weight" in report.unused
    assert all(torch.equal(v, llm_before[k]) for k, v in model.llm.state_dict().items())
    assert model.stage1_report is report


def test_refusals_name_the_file(stage1, tmp_path):
    model = blip.create_model("blip2_tiny_opt", "stage2")
    sd = stage1.model.state_dict()
    torch.save({**sd, "qformer.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="extra.pth"):
        init_from_stage1(model, tmp_path / "extra.pth")   # a key no stage-1 model has
    torch.save({k: v for k, v in sd.items() if not k.startswith("qformer.transformer.layers.3.")},
               tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="missing"):
        init_from_stage1(model, tmp_path / "short.pth")   # a Q-Former layer the model needs is absent
    torch.save(model.state_dict(), tmp_path / "stage2.pth")
    with pytest.raises(CheckpointError, match="stage-2"):
        init_from_stage1(model, tmp_path / "stage2.pth")
    other = blip.create_model("blip2_lavis_tiny_qformer", "qformer")   # another Q-Former width
    torch.save(other.state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match="shape"):
        init_from_stage1(model, tmp_path / "narrow.pth")
