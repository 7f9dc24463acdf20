"""The BLIP-2 hand-offs between structures: a model with a frozen LLM starts from a stage-1 Q-Former, strictly
(:func:`init_from_stage1`); a stage-2 model becomes question-aware (:func:`question_aware`, BLIP-2 VQA fine-tuning),
its Q-Former's new text parts from a stage-1 checkpoint, an HF BERT directory or the query FFN."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoints import CheckpointError, LoadReport, StateDict, fold_names, load_into
from ..models.blip2_finetune import is_question_text_part, question_aware_structure, text_ffn_from_query_ffn
from ..models.blip2_llm import Blip2LanguageModel, InstructBlipLanguageModel
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


def is_stage1_checkpoint(source: str | Path | Checkpoint) -> bool:
    """Whether ``source`` is a BLIP-2 stage-1 checkpoint (what :func:`init_from_stage1` takes): a stage-1 format
    with query tokens and no LLM parts. Stage-2 / InstructBLIP files and runs are loaded by name instead."""
    checkpoint = read_checkpoint(source, "init_from")
    if checkpoint.format.name not in STAGE1_FORMATS:
        return False
    sd = checkpoint.state
    return "qformer.query_tokens" in sd and not any(k.startswith(("llm.", "llm_proj.")) for k in sd)


def question_text_state(model: InstructBlipLanguageModel, source: str | Path | Checkpoint) -> tuple[StateDict, str]:
    """The Q-Former text parts (word / position embeddings, text FFN) of ``source`` under the model's names ->
    (state, what was resized). source: a stage-1 BLIP-2 run or export, LAVIS ``blip2_pretrained*.pth``, an
    InstructBLIP checkpoint or an HF BERT directory (``bert-base-uncased``: its FFN, as LAVIS's InstructBLIP starts)."""
    checkpoint = read_checkpoint(source, "text_init")
    prefix = "qformer.transformer."
    if checkpoint.format.tower == "text":
        converted, _, resized = checkpoint.format.tower_map(checkpoint.raw, model.qformer.transformer)
        state = {prefix + k: v for k, v in converted.items()}
    elif checkpoint.format.tower is None:
        state, resized = dict(checkpoint.state), []
    else:
        raise CheckpointError(f"text_init={checkpoint.name}: a {checkpoint.format.description}, which has no Q-Former "
                              "text parts; pass a BLIP-2 stage-1 run / file or an HF BERT directory")
    own = model.state_dict()
    keys = [k for k in own if is_question_text_part(k)]
    word = prefix + "embeddings.word.weight"
    if word in state and state[word].shape[0] < own[word].shape[0]:   # BERT's 30522 rows: [DEC] keeps its init
        rows = state[word].shape[0]
        state[word] = torch.cat([state[word].to(own[word].dtype), own[word][rows:].detach()])
        resized.append(f"{word} {rows} -> {own[word].shape[0]} rows (new rows keep their init)")
    missing = [k for k in keys if k not in state]
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in keys
           if k in state and state[k].shape != own[k].shape]
    if missing or bad:
        raise CheckpointError(f"text_init={checkpoint.name} does not hold this Q-Former's text parts: "
                              f"missing {fold_names(missing)[:4]}, other shapes {bad[:3]}. Pass a stage-1 checkpoint "
                              "of this Q-Former's size or an HF BERT directory of its width")
    return {k: state[k] for k in keys}, "; ".join(resized)


def init_question_text(model: InstructBlipLanguageModel, text_init: str | Path | Checkpoint | None = None
                       ) -> LoadReport:
    """Set the question-aware Q-Former's text parts: from ``text_init`` (:func:`question_text_state`) when given,
    else each layer's text FFN copied from its query FFN
    (:func:`~blip.models.blip2_finetune.text_ffn_from_query_ffn`) with the word / position embeddings kept at their
    initialisation (normal, std 0.02: BERT's). Returns the report (logged)."""
    if text_init is None:
        report = LoadReport("query FFN copy")
        report.loaded = text_ffn_from_query_ffn(model)
        report.expected_missing = [k for k in model.state_dict() if is_question_text_part(k)
                                   and k not in report.loaded]
    else:
        state, resized = question_text_state(model, text_init)
        report = LoadReport(read_checkpoint(text_init, "text_init").name)
        with torch.no_grad():
            own = model.state_dict()
            for k, v in state.items():
                own[k].copy_(v.to(own[k].dtype))
        report.loaded = sorted(state)
        report.resized = [resized] if resized else []
    log.info("question-aware Q-Former text parts %s", report.summary())
    return report


def question_aware(model: Blip2LanguageModel, text_init: str | Path | Checkpoint | None = None
                   ) -> InstructBlipLanguageModel:
    """A stage-2 BLIP-2 model -> the instruction-aware structure (InstructBLIP's; BLIP-2's VQA fine-tuning conditions
    the Q-Former on the question) sharing every existing weight
    (:func:`~blip.models.blip2_finetune.question_aware_structure`), its new text parts set by
    :func:`init_question_text` (from ``text_init``: a stage-1 BLIP-2 run / LAVIS stage-1 file / HF BERT directory;
    else the text FFN copied from the query FFN, embeddings at their init). An InstructBLIP model is returned as is.
    The report is ``model.question_report``."""
    if getattr(model, "instruct", False):
        return model
    aware = question_aware_structure(model)
    aware.question_report = init_question_text(aware, text_init)
    return aware
