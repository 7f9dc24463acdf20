"""The BLIP-2 family's loaders for its own layout and LAVIS stage 1, export and save.

Which file is in which layout: :data:`blip.convert.formats.FORMATS`. The layouts' key maps:

- LAVIS ``.pth`` (stage 1, stage 2, InstructBLIP): :mod:`blip.convert.blip2_lavis`;
- HF directories (``Blip2ForImageTextRetrieval``, ``Blip2ForConditionalGeneration``,
  ``InstructBlipForConditionalGeneration``): :mod:`blip.convert.blip2_hf`;
- blip's own layout (``.safetensors`` with the config in its metadata, training checkpoints): :mod:`.blip2_ours`;
- the parts every BLIP-2 model shares (image encoder, Q-Former): :mod:`blip.convert.blip2_parts`.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..checkpoints import CheckpointError, LoadReport, StateDict
from ..models.blip2_llm import Blip2LanguageModel
from ..models.blip2_qformer import Blip2Qformer
from .blip2_hf import export_hf_llm, export_hf_qformer
from .blip2_lavis import load_lavis_stage1
from .blip2_ours import load_ours, save_safetensors

log = logging.getLogger(__name__)

__all__ = ["load_ours_layout", "load_lavis_stage1_as_task", "export_hf", "save_safetensors"]
QFORMER_TASKS = ("qformer", "stage1")


def load_ours_layout(sd: StateDict, source: str, arch: str | None = None, task: str | None = None, llm=None,
                     vision_weights=None, **overrides) -> nn.Module:
    """A blip-layout BLIP-2 state dict (an export, a training objective's weights) -> model in eval mode."""
    if vision_weights is not None:
        raise CheckpointError(f"{source} is in blip's own layout and carries its ViT: drop vision_weights=")
    if any(k.startswith(("llm_proj.", "model.llm_proj.")) for k in sd):
        return load_ours(sd, source, arch=arch, task=task, llm=llm, **overrides).eval()
    return as_task(load_ours(sd, source, arch=arch, llm=llm, **overrides), task)


def load_lavis_stage1_as_task(sd: StateDict, source: str, arch: str | None = None, task: str | None = None,
                              llm=None, vision_weights=None, **overrides) -> nn.Module:
    """A LAVIS stage-1 ``.pth`` -> the Q-Former model (task "qformer") or its training objective ("stage1").

    vision_weights: the frozen ViT file (``eva_vit_g.pth`` / ``clip_vit_L.pth``) for files saved without it."""
    if llm is not None:
        raise CheckpointError(f"{source} is a stage-1 (Q-Former) checkpoint: it has no language model, drop llm=")
    return as_task(load_lavis_stage1(sd, source, arch=arch, vision_weights=vision_weights, **overrides), task)


def export_hf(model: nn.Module, directory: str | Path, image_token_index: int | None = None) -> Path:
    """Write ``model`` as the HF directory transformers loads: ``Blip2ForImageTextRetrieval`` (stage 1),
    ``Blip2ForConditionalGeneration`` or ``InstructBlipForConditionalGeneration`` (LLM models; HF marks the query
    positions with ``image_token_index``, an id of the LLM vocabulary, default: the one the model was loaded with)."""
    model = getattr(model, "model", model)   # a training objective holds its model
    if isinstance(model, Blip2Qformer):
        return export_hf_qformer(model, directory)
    if isinstance(model, Blip2LanguageModel):
        return export_hf_llm(model, directory, image_token_index)
    raise TypeError(f"{type(model).__name__} is not a BLIP-2 model")


def as_task(model: Blip2Qformer, task: str | None) -> nn.Module:
    """A loaded stage-1 model as task "qformer" (itself) or "stage1" (its training objective), in eval mode."""
    if task not in (None, *QFORMER_TASKS):
        raise CheckpointError(f"{model.load_report.source} is a stage-1 (Q-Former) checkpoint: task must be one of "
                              f"{QFORMER_TASKS}, not {task!r}")
    if task == "stage1":
        from ..objectives.blip2_stage1 import Blip2Stage1Objective
        return Blip2Stage1Objective(model).eval()
    return model.eval()


def describe(report: LoadReport) -> str:
    """One line per part: the file its weights came from."""
    return "\n".join(f"{part}: {where}" for part, where in sorted(report.origins.items()))
