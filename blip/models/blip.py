"""The BLIP (v1) family's named architectures and inference tasks, and ``create``.

Task models live in :mod:`blip.models.blip_tasks` (tensor API) with string conveniences from
:mod:`blip.models.blip_strings`; the pretraining and fine-tuning objectives in :mod:`blip.objectives`.
"""
from __future__ import annotations

from torch import nn

from ..nn.transformer import TextConfig
from ..nn.vit import VisionConfig
from .blip_core import BlipConfig, BlipOutput, TextDecoder
from .blip_nlvr import BlipNLVR, NLVROutput
from .blip_tasks import BlipCaption, BlipFeatureExtractor, BlipRetrieval, BlipVQA, RankOutput, RetrievalOutput

__all__ = ["ARCHS", "TASKS", "create", "BlipConfig", "BlipCaption", "BlipRetrieval", "BlipVQA", "BlipFeatureExtractor",
           "BlipNLVR", "BlipOutput", "NLVROutput", "RankOutput", "RetrievalOutput", "TextDecoder"]

MED_DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)   # BLIP configs/med_config.json

ARCHS: dict[str, BlipConfig] = {
    # ViT-B/16 at 384 px + BERT-base MED (768 / 12 layers / 12 heads), vocab 30522 + [DEC] + [ENC]
    "blip_base": BlipConfig(VisionConfig(image_size=384, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
                            TextConfig(**MED_DROPOUT), embed_dim=256),
    # ViT-L/16 (drop-path 0.1 as BLIP's create_vit): the text stack cross-attends to 1024-wide image features
    "blip_large": BlipConfig(VisionConfig(image_size=384, patch_size=16, width=1024, depth=24, heads=16, mlp_dim=4096,
                                          drop_path=0.1),
                             TextConfig(encoder_width=1024, **MED_DROPOUT), embed_dim=256),
    # tests and the embedded training default: real vocab (the tokenizer works), tiny everything else
    "blip_tiny": BlipConfig(VisionConfig(image_size=64, patch_size=16, width=64, depth=2, heads=4, mlp_dim=256),
                            TextConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                                       encoder_width=64), embed_dim=32),
}

TASK_CLASSES: dict[str, type[nn.Module]] = {"caption": BlipCaption, "retrieval": BlipRetrieval, "vqa": BlipVQA,
                                            "feature_extractor": BlipFeatureExtractor, "nlvr": BlipNLVR}
TASKS: tuple[str, ...] = tuple(TASK_CLASSES)
# BLIP blip_vqa.py / blip_nlvr.py build their ViT with drop_path_rate=0.1 whatever its size
TASK_DROP_PATH: dict[str, float] = {"vqa": 0.1, "nlvr": 0.1}


def build(cfg: BlipConfig, task: str) -> nn.Module:
    """Build the ``task`` inference model for a config."""
    if task not in TASK_CLASSES:
        raise KeyError(f"unknown BLIP task {task!r}; known: {list(TASKS)}")
    return TASK_CLASSES[task](cfg)


def create(arch: str, task: str, **overrides) -> nn.Module:
    """Randomly initialised model, e.g. ``create("blip_base", "caption", image_size=224)``.

    overrides: ``image_size``, ``vision={...}`` / ``text={...}`` (VisionConfig / TextConfig fields), ``embed_dim``...
    Regularisation as BLIP unless overridden: MED dropout 0.1 (``text={"hidden_dropout", "attention_dropout"}``),
    ViT drop-path 0.1 for ViT-L and for the VQA / NLVR2 ViT (``vision={"drop_path": ...}``).
    """
    if arch not in ARCHS:
        raise KeyError(f"unknown BLIP arch {arch!r}; known: {sorted(ARCHS)}")
    vision = dict(overrides.pop("vision", None) or {})
    if task in TASK_DROP_PATH:
        vision.setdefault("drop_path", max(ARCHS[arch].vision.drop_path, TASK_DROP_PATH[task]))
    return build(ARCHS[arch].with_overrides(vision=vision, **overrides), task)
