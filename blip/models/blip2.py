"""The BLIP-2 family for ``blip.create_model`` / ``blip.load``: architectures and tasks.

- tasks "qformer" (the stage-1 model, :class:`Blip2Qformer`) and "stage1" (its training objective,
  :class:`Blip2Stage1Objective`) are built here;
- tasks "stage2" / "instruct" (frozen-LLM models) are delegated to :mod:`blip.models.blip2_llm`.

``ARCHS`` merges this module's Q-Former archs with ``blip2_llm.ARCHS`` at access time (the LLM module is optional).
"""
from __future__ import annotations

import dataclasses
import importlib

from torch import nn

from ..nn.vit import VisionConfig
from .blip2_qformer import Blip2Qformer, Blip2QformerConfig
from .qformer import CLIP_VIT_L, EVA_VIT_G, QFormerConfig, qformer_config

QFORMER_TASKS = ("qformer", "stage1")
LLM_TASKS = ("stage2", "instruct")

# tiny EVA (image 56 px, patch 14) shared by every tiny BLIP-2 arch
TINY_VISION = VisionConfig(image_size=56, patch_size=14, width=48, depth=2, heads=4, mlp_dim=209, qkv_bias="qv",
                           final_norm=False, layer_norm_eps=1e-6)

QFORMER_ARCHS: dict[str, Blip2QformerConfig] = {
    "blip2_vitg_qformer": Blip2QformerConfig(vision=EVA_VIT_G, qformer=QFormerConfig(qformer_config(1408), 32),
                                             embed_dim=256),
    "blip2_vitL_qformer": Blip2QformerConfig(vision=CLIP_VIT_L, qformer=QFormerConfig(qformer_config(1024), 32),
                                             embed_dim=256),
    # tests and the training default; same ViT and Q-Former sizes as blip2_tiny_opt / blip2_tiny_t5, so a tiny
    # stage-1 run initialises a tiny stage-2 run
    "blip2_tiny_qformer": Blip2QformerConfig(
        vision=TINY_VISION,
        qformer=QFormerConfig(qformer_config(48, hidden_size=32, num_heads=4, num_layers=4, intermediate_size=128), 8),
        embed_dim=24),
    # the sizes of the LAVIS fixture (/work/shared/fixtures/lavis/blip2_qformer): parity tests
    "blip2_lavis_tiny_qformer": Blip2QformerConfig(
        vision=TINY_VISION,
        qformer=QFormerConfig(qformer_config(48, hidden_size=16, num_heads=2, num_layers=4, intermediate_size=64), 8),
        embed_dim=24),
}


def _llm_module():
    try:
        return importlib.import_module("blip.models.blip2_llm")
    except ModuleNotFoundError as e:
        if e.name != "blip.models.blip2_llm":
            raise
        return None


def __getattr__(name: str):
    if name == "ARCHS":
        llm = _llm_module()
        return {**QFORMER_ARCHS, **(llm.ARCHS if llm is not None else {})}
    if name == "TASKS":
        llm = _llm_module()
        extra = tuple(t for t in getattr(llm, "TASKS", LLM_TASKS) if t not in QFORMER_TASKS) if llm else ()
        return QFORMER_TASKS + extra
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tasks_for(arch: str) -> tuple[str, ...]:
    """The tasks ``create`` can build for ``arch``: Q-Former archs -> qformer/stage1, LLM archs -> stage2/instruct."""
    return QFORMER_TASKS if arch in QFORMER_ARCHS else LLM_TASKS


def qformer_arch_config(arch: str, **overrides) -> Blip2QformerConfig:
    """The config of a Q-Former arch with top-level fields replaced (e.g. ``freeze_vit=False``, ``vit_dtype="bf16"``)."""
    if arch not in QFORMER_ARCHS:
        raise KeyError(f"unknown BLIP-2 Q-Former arch {arch!r}; known: {sorted(QFORMER_ARCHS)}")
    return dataclasses.replace(QFORMER_ARCHS[arch], **overrides)


def create(arch: str, task: str = "qformer", **overrides) -> nn.Module:
    """Build a randomly initialised BLIP-2 model.

    task "qformer" -> :class:`Blip2Qformer`; "stage1" -> :class:`Blip2Stage1Objective` around it (overrides for the
    objective: ``tokenizer``; the rest go to :class:`Blip2QformerConfig`); "stage2"/"instruct" -> ``blip2_llm.create``.
    """
    if task in QFORMER_TASKS:
        tokenizer = overrides.pop("tokenizer", None)
        model = Blip2Qformer(qformer_arch_config(arch, **overrides))
        if task == "qformer":
            return model
        from .blip2_stage1 import Blip2Stage1Objective
        return Blip2Stage1Objective(model, tokenizer=tokenizer)
    llm = _llm_module()
    if llm is None:
        raise KeyError(f"task {task!r} needs blip.models.blip2_llm (BLIP-2 LLM models), which is not available")
    return llm.create(arch, task, **overrides)
