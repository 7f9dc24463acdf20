"""The BLIP-2 stage-1 -> stage-2 hand-off: a model with a frozen LLM starts from a stage-1 Q-Former, strictly."""
from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoints import CheckpointError, LoadReport, load_into
from ..models.blip2_llm import Blip2LanguageModel
from .formats import Checkpoint, read_checkpoint

log = logging.getLogger(__name__)


STAGE1_FORMATS = ("run", "blip2", "lavis-blip2-stage1")   # rows of blip.convert.formats.FORMATS
# what a stage-1 checkpoint carries that a stage-2 model has no place for
STAGE1_ONLY = [r"lm_head\..*", r"(vision_proj|text_proj|itm_head)\..*", r"temp",
               r"qformer\.transformer\.embeddings\.(word|position)\..*", r"qformer\.transformer\.layers\.\d+\.ffn\..*"]


def init_from_stage1(model: Blip2LanguageModel, source: str | Path | Checkpoint) -> LoadReport:
    """The stage-1 -> stage-2 hand-off: a stage-2 / InstructBLIP model takes its query tokens, Q-Former and
    ``ln_vision`` (and the frozen ViT, when the file has one) from a stage-1 checkpoint, strictly.

    source: a LAVIS ``blip2_pretrained*.pth`` / ``checkpoint.pth``, a blip stage-1 export, a stage-1 run / its
    ``state.pt`` (anything :func:`~blip.convert.formats.read_checkpoint` reads, in a stage-1 format). Every Q-Former /
    ``ln_vision`` key of the model must come from the file with its shape; what only stage 1 has (ITC/ITM/ITG heads,
    ``temp``, and for a model without instructions the Q-Former's text embeddings and text FFN) is ignored; anything
    else in the file is an error. Returns (and sets as ``model.stage1_report``) the :class:`LoadReport`: ``loaded``
    (taken from the file), ``expected_missing`` (kept: the LLM, ``llm_proj`` and a ViT the file lacks), ``unused``
    (ignored stage-1 parts).
    """
    stage1 = read_checkpoint(source, "init_from")
    source, fmt = stage1.name, stage1.format
    if fmt.name not in STAGE1_FORMATS:
        raise CheckpointError(f"{source}: a {fmt.description}, not a BLIP-2 stage-1 checkpoint (LAVIS "
                              "blip2_pretrained*.pth, a blip stage-1 run or export)"
                              + (": load it with blip.load" if fmt.load is not None else ""))
    sd = stage1.state
    if any(k.startswith(("llm.", "llm_proj.")) for k in sd):
        raise CheckpointError(f"{source}: a stage-2 (LLM) checkpoint, not a stage-1 one: load it with blip.load")
    if "qformer.query_tokens" not in sd:
        raise CheckpointError(f"{source}: not a BLIP-2 stage-1 checkpoint (LAVIS blip2_pretrained*.pth, a blip "
                              "stage-1 run's state.pt or export); it has no query tokens")
    kept = [r"llm\..*", r"llm_proj\..*"]
    if not any(k.startswith("image_encoder.visual_encoder.") for k in sd):
        kept.append(r"image_encoder\.visual_encoder\..*")
    report = load_into(model, sd, source, expected_missing=kept, expected_unused=STAGE1_ONLY)
    report.origins.update({p: source for p in ("qformer", "image_encoder.ln_vision")})
    if len(kept) == 2:
        report.origins["image_encoder.visual_encoder"] = source
    log.info("stage-1 hand-off %s", report.summary())
    model.stage1_report = report
    return report
