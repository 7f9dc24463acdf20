"""init_from for fine-tuning and stage 2: strict by name, bicubic position embeddings (online and momentum ViTs),
a by-name report, failure when a required part is not covered; a frozen tower never silently random."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from blip import create_model as create
from blip.checkpoints import CheckpointError
from blip.objectives.blip_finetune import wrap_objective
from blip.train.init import init_from_checkpoint, refuse_random_frozen
from blip.train.run import quote_stage_override, run
from conftest import FIXTURES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LAVIS = FIXTURES / "lavis"
pytestmark = pytest.mark.usefixtures("one_thread")


def save_run(tmp_path, model):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    torch.save({"model": model.state_dict()}, ckpt / "state.pt")
    return tmp_path / "run"


def bicubic(pos, old, new):
    """BLIP's interpolate_pos_embed written out (class token kept, align_corners=False)."""
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def test_pretrain_224_into_retrieval_384_resizes_online_and_momentum_pos_embed(tmp_path):
    torch.manual_seed(0)
    pre = create("blip_tiny", "pretrain", image_size=224)
    with torch.no_grad():
        pre.visual_encoder_m.pos_embed.add_(1.0)   # the EMA copy differs from the online one
    target = wrap_objective("retrieval", create("blip_tiny", "retrieval", image_size=384), queue_size=8)
    report = init_from_checkpoint(target, save_run(tmp_path, pre))
    for name in ("visual_encoder", "visual_encoder_m"):
        want = bicubic(getattr(pre, name).pos_embed.detach(), 14, 24)
        assert torch.allclose(getattr(target, name).pos_embed, want, atol=1e-6), name
    assert sorted(report.resized) == ["visual_encoder.pos_embed 197 -> 577 positions (bicubic)",
                                      "visual_encoder_m.pos_embed 197 -> 577 positions (bicubic)"]
    assert torch.equal(target.text_encoder.layers[1].ffn.fc2.weight, pre.text_encoder.layers[1].ffn.fc2.weight)
    assert "text_decoder.lm_head.bias" in report.unused        # the pretraining decoder: not part of retrieval


def test_a_checkpoint_of_another_architecture_is_refused_by_name(tmp_path):
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    target = wrap_objective("caption", create("blip_tiny", "caption", image_size=32))
    with pytest.raises(CheckpointError) as err:
        init_from_checkpoint(target, save_run(tmp_path, other))
    text = str(err.value)
    assert "visual_encoder: 0% loaded" in text and "text_decoder: 0% loaded" in text
    assert "ignored" not in text and "unused (2): 0" in text          # the file's own keys, by name


def test_fraction_threshold_and_momentum_follow_when_absent(tmp_path):
    caption = create("blip_tiny", "caption", image_size=32)
    sd = {k: v for k, v in caption.state_dict().items() if not k.startswith("text_decoder.transformer.layers.1.")}
    torch.save(sd, tmp_path / "partial.pth")
    target = wrap_objective("caption", create("blip_tiny", "caption", image_size=32))
    with pytest.raises(CheckpointError, match=r"text_decoder: \d+% loaded .*layers\.N\."):
        init_from_checkpoint(target, tmp_path / "partial.pth")
    init_from_checkpoint(target, tmp_path / "partial.pth", min_fraction=0.3)   # configured lower: loads
    retrieval = create("blip_tiny", "retrieval", image_size=32)
    torch.save(retrieval.state_dict(), tmp_path / "task.pth")                  # a task model: no momentum copies
    objective = wrap_objective("retrieval", create("blip_tiny", "retrieval", image_size=32), queue_size=8)
    init_from_checkpoint(objective, tmp_path / "task.pth")
    momentum, online = objective.visual_encoder_m.blocks[0].mlp.fc1, retrieval.visual_encoder.blocks[0].mlp.fc1
    assert torch.equal(momentum.weight, online.weight)


def test_released_blip_checkpoint_layout_is_converted():
    """The LAVIS BLIP caption fixture (original MED names) into a caption objective at twice its image size."""
    import blip
    from blip.models.blip import build

    ckpt = LAVIS / "blip_caption" / "checkpoint.pth"
    ref = blip.load(ckpt, task="caption", vision={"heads": 4}, text={"num_heads": 2})
    target = wrap_objective("caption", build(ref.cfg.with_overrides(image_size=128), "caption"))
    report = init_from_checkpoint(target, ckpt)
    assert report.resized == ["visual_encoder.pos_embed 17 -> 65 positions (bicubic)"]
    assert torch.allclose(target.visual_encoder.pos_embed, bicubic(ref.visual_encoder.pos_embed.detach(), 4, 8),
                          atol=1e-6)
    for k, v in ref.state_dict().items():
        if not k.endswith("pos_embed"):
            assert torch.equal(target.state_dict()[k], v), k


def config(tmp_path, overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("train", overrides=quote_stage_override(
            [f"run_dir={tmp_path}/run", f"output_root={tmp_path}/out", f"data.synthetic.cache_dir={tmp_path}/cache",
             "data.synthetic.num_train=32", "data.synthetic.num_val=8", "data.synthetic.shard_size=16",
             "trainer.batch_size=8", "trainer.max_steps=1", "trainer.progress_bar=false", "trainer.threads=null",
             "trainer.tensorboard=false", "eval.enabled=false", *overrides]))


def test_recipes_without_their_frozen_encoder_refuse_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_HOME", str(tmp_path / "home"))
    cfg = config(tmp_path, ["stage=1", "model=blip2_tiny_qformer", "model.vision_init=blip2-eva-vit-g"])
    with pytest.raises(FileNotFoundError, match=r"eva_vit_g\.pth is not there.*https://storage\.googleapis\.com/"):
        run(cfg)
    cfg = config(tmp_path, ["stage=1", "model=blip2_tiny_qformer", "model.vision_init=null",
                            "model.allow_random_frozen=false"])
    with pytest.raises(ValueError, match=r"frozen model\.image_encoder\.visual_encoder would stay at its random"):
        run(cfg)
    model = create("blip_tiny", "pretrain", image_size=32)
    model.visual_encoder.requires_grad_(False)
    refuse_random_frozen(model, {"visual_encoder.pos_embed"}, cfg.model)      # covered by a report: fine


def test_lavis_blip2_files_into_training_objectives():
    """blip2_pretrained.pth layout (the LAVIS Q-Former fixture, trainable parameters only) into the stage-1
    objective: everything trainable loads, the frozen ViT (not in the file) stays for vision_init."""
    import blip

    objective = blip.create_model("blip2_lavis_tiny_qformer", "stage1")
    ckpt = LAVIS / "blip2_qformer" / "checkpoint_trainable_only.pth"
    report = init_from_checkpoint(objective, ckpt)
    ref = blip.load(ckpt, vision_weights=LAVIS / "eva_vit_tiny.pth")
    for k, v in ref.state_dict().items():
        if not k.startswith("image_encoder.visual_encoder."):
            assert torch.equal(objective.state_dict()["model." + k], v), k
    assert not any(k.startswith("model.image_encoder.visual_encoder.") for k in report.loaded)
    stage2 = blip.create_model("blip2_tiny_opt", "stage2")
    opt_ckpt = LAVIS / "blip2_opt" / "checkpoint_trainable_only.pth"
    report = init_from_checkpoint(stage2, opt_ckpt)       # a LAVIS stage-2 file: llm_proj (opt_proj) loads too
    assert "llm_proj.weight" in report.loaded and "qformer.query_tokens" in report.loaded
