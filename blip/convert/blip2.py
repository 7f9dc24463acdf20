"""The BLIP-2 family's checkpoint facade: which files it owns, how each loads, export and save.

- LAVIS ``.pth`` (stage 1, stage 2, InstructBLIP): :mod:`blip.convert.blip2_lavis`;
- HF directories (``Blip2ForImageTextRetrieval``, ``Blip2ForConditionalGeneration``,
  ``InstructBlipForConditionalGeneration``): :mod:`blip.convert.blip2_hf`;
- blip's own layout (``.safetensors`` with the config in its metadata, training checkpoints): here;
- the parts every BLIP-2 model shares (image encoder, Q-Former): :mod:`blip.convert.blip2_parts`.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..checkpoints import CheckpointError, LoadReport, StateDict, load_into, read_state_dict
from ..models.blip2_llm import Blip2LanguageModel
from ..models.blip2_qformer import Blip2Qformer
from .blip2_hf import HF_LOADERS, export_hf_llm, export_hf_qformer
from .blip2_lavis import is_lavis_llm, lavis_stage1_to_ours, load_lavis_llm, load_lavis_stage1
from .blip2_ours import is_ours, load_ours, save_safetensors, unwrap_objective
from .blip2_parts import is_lavis_blip2

log = logging.getLogger(__name__)

__all__ = ["HF_LOADERS", "owns", "load_original", "exports", "export_hf", "save_safetensors", "init_from_stage1"]
QFORMER_TASKS = ("qformer", "stage1")


def owns(sd: StateDict) -> bool:
    """Every LAVIS BLIP-2 checkpoint (keys ``Qformer.*`` or ``query_tokens``) and blip's own stage-1 layout
    (``qformer.query_tokens``, bare or under the stage-1 objective's ``model.``)."""
    return is_lavis_blip2(sd) or is_ours(sd)


def load_original(sd: StateDict, source: str, arch: str | None = None, task: str | None = None, llm=None,
                  vision_weights=None, **overrides) -> nn.Module:
    """A LAVIS BLIP-2 ``.pth`` or a blip-layout state dict -> model in eval mode (``model.load_report``).

    vision_weights: the frozen ViT file (``eva_vit_g.pth`` / ``clip_vit_L.pth``) for files saved without it;
    llm: the HF directory of the language model for LLM files that carry no LLM weights.
    """
    if is_ours(sd):   # before the LAVIS checks: LAVIS InstructBLIP-Vicuna files also say llm_proj
        if vision_weights is not None:
            raise CheckpointError(f"{source} is in blip's own layout and carries its ViT: drop vision_weights=")
        if any(k.startswith(("llm_proj.", "model.llm_proj.")) for k in sd):
            return load_ours(sd, source, arch=arch, task=task, llm=llm, **overrides).eval()
        return as_task(load_ours(sd, source, arch=arch, llm=llm, **overrides), task)
    if is_lavis_llm(sd):
        return load_lavis_llm(sd, source, arch=arch, task=task, llm=llm, vision_weights=vision_weights, **overrides)
    return as_task(load_lavis_stage1(sd, source, arch=arch, vision_weights=vision_weights, **overrides), task)


def exports(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside a training objective) is a BLIP-2 model this facade writes."""
    return isinstance(getattr(model, "model", model), (Blip2Qformer, Blip2LanguageModel))


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


# ---------------------------------------------------------------------------------------------------------------
# stage 1 -> stage 2

# what a stage-1 checkpoint carries that a stage-2 model has no place for
STAGE1_ONLY = [r"lm_head\..*", r"(vision_proj|text_proj|itm_head)\..*", r"temp",
               r"qformer\.transformer\.embeddings\.(word|position)\..*", r"qformer\.transformer\.layers\.\d+\.ffn\..*"]


def init_from_stage1(model: Blip2LanguageModel, source: str | Path) -> LoadReport:
    """The stage-1 -> stage-2 hand-off: a stage-2 / InstructBLIP model takes its query tokens, Q-Former and
    ``ln_vision`` (and the frozen ViT, when the file has one) from a stage-1 checkpoint, strictly.

    source: a LAVIS ``blip2_pretrained*.pth`` / ``checkpoint.pth``, a blip stage-1 export, or a stage-1 training
    checkpoint (``state.pt``: the objective's ``model.*`` keys). Every Q-Former / ``ln_vision`` key of the model must
    come from the file with its shape; what only stage 1 has (ITC/ITM/ITG heads, ``temp``, and for a model without
    instructions the Q-Former's text embeddings and text FFN) is ignored; anything else in the file is an error.
    Returns (and sets as ``model.stage1_report``) the :class:`LoadReport`: ``loaded`` (taken from the file),
    ``expected_missing`` (kept: the LLM, ``llm_proj`` and a ViT the file lacks), ``unused`` (ignored stage-1 parts).
    """
    sd = read_state_dict(source)
    if any(k.startswith(("llm.", "llm_proj.", "model.llm")) for k in sd) or (not is_ours(sd) and is_lavis_llm(sd)):
        raise CheckpointError(f"{source}: a stage-2 (LLM) checkpoint, not a stage-1 one: load it with blip.load")
    if is_lavis_blip2(sd):
        sd, _ = lavis_stage1_to_ours(sd)
    sd = unwrap_objective(sd)
    if "qformer.query_tokens" not in sd:
        raise CheckpointError(f"{source}: not a BLIP-2 stage-1 checkpoint (LAVIS blip2_pretrained*.pth, a blip "
                              "stage-1 run's state.pt or export); it has no query tokens")
    kept = [r"llm\..*", r"llm_proj\..*"]
    if not any(k.startswith("image_encoder.visual_encoder.") for k in sd):
        kept.append(r"image_encoder\.visual_encoder\..*")
    report = load_into(model, sd, str(source), expected_missing=kept, expected_unused=STAGE1_ONLY)
    report.origins.update({p: str(source) for p in ("qformer", "image_encoder.ln_vision")})
    if len(kept) == 2:
        report.origins["image_encoder.visual_encoder"] = str(source)
    log.info("stage-1 hand-off %s", report.summary())
    model.stage1_report = report
    return report
