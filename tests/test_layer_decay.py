"""Layer-wise LR decay from the layers a model declares (timm's group_matcher): BLIP and BLIP-2 models and their
training objectives give every ViT layer its own LR, decay ** (L + 1 - layer)."""
import pytest
import torch

import blip
from blip.registry import create_objective
from blip.train.optim import param_groups

DECAY, LR, DEPTH = 0.5, 1e-3, 2   # the tiny archs' ViTs have 2 blocks


@pytest.mark.parametrize("build,prefix", [
    (lambda: blip.create_model("blip_tiny", "caption"), "visual_encoder."),
    (lambda: create_objective("blip_tiny", "pretrain"), "visual_encoder."),
    (lambda: blip.create_model("blip2_tiny_qformer", "qformer", freeze_vit=False), "image_encoder.visual_encoder."),
    (lambda: create_objective("blip2_tiny_qformer", "stage1", freeze_vit=False), "model.image_encoder.visual_encoder."),
], ids=["blip", "blip-pretrain", "blip2-qformer", "blip2-stage1"])
def test_each_vit_layer_gets_its_lr(build, prefix):
    model = build()
    lr_of = {id(p): g["lr"] for g in param_groups(model, lr=LR, weight_decay=0.05, layer_decay=DECAY)
             for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named[prefix + "pos_embed"])] == pytest.approx(LR * DECAY ** (DEPTH + 1))
    assert lr_of[id(named[prefix + "patch_embed.proj.weight"])] == pytest.approx(LR * DECAY ** (DEPTH + 1))
    for i in range(DEPTH):
        assert lr_of[id(named[f"{prefix}blocks.{i}.attn.proj.weight"])] == pytest.approx(LR * DECAY ** (DEPTH - i))
    outside = [n for n in named if not n.startswith(prefix) and named[n].requires_grad]
    assert outside and all(lr_of[id(named[n])] == pytest.approx(LR) for n in outside)
    assert len({round(v, 12) for v in lr_of.values()}) == DEPTH + 2


def test_frozen_vit_leaves_one_lr_and_undeclared_models_are_refused():
    frozen = blip.create_model("blip2_tiny_qformer", "qformer")   # BLIP-2's default: the ViT is frozen
    assert all(g["lr"] == pytest.approx(LR) for g in param_groups(frozen, lr=LR, weight_decay=0.05, layer_decay=DECAY))
    with pytest.raises(ValueError, match="group_matcher"):
        param_groups(torch.nn.Linear(2, 2), lr=LR, weight_decay=0.05, layer_decay=DECAY)
