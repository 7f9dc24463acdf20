"""Fine-tuning a loaded model on custom data (``scripts/train.py task=custom``): which paper recipe applies, and the
training objective built around the model.

The family of the starting model (:class:`blip.models.family.Family`) and the kind of the data rows
(:data:`blip.data.custom.KINDS`) pick one recipe of ``configs/recipe/``:

=================  ================  =====================  ===============================================
family             caption rows      VQA rows               instruction rows
=================  ================  =====================  ===============================================
BLIP               blip_caption      blip_vqa               (BLIP has no instruction model: an error)
BLIP-2 + LLM       blip2_caption     blip2_vqa              blip2_instruct
BLIP-2 Q-Former    blip2_retrieval   (no LLM: an error)     (no LLM: an error)
=================  ================  =====================  ===============================================

:func:`finetune_objective` applies the recipe's model settings to the loaded model (the question-aware Q-Former for
BLIP-2 VQA and instructions, a trainable ViT, the caption prompt), wraps it in the objective training uses for that
family and kind, and adds LoRA adapters when ``lora.r > 0``. Training and :func:`blip.runs.load_run` call it alike, so a
run rebuilds exactly the model it trained.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from torch import nn

from .models.family import Family, family_of

log = logging.getLogger(__name__)

RECIPES: dict[tuple[Family, str], str] = {
    (Family.BLIP, "caption"): "blip_caption",
    (Family.BLIP, "vqa"): "blip_vqa",
    (Family.BLIP2_LLM, "caption"): "blip2_caption",
    (Family.BLIP2_LLM, "vqa"): "blip2_vqa",
    (Family.BLIP2_LLM, "instruction"): "blip2_instruct",
    (Family.BLIP2_QFORMER, "caption"): "blip2_retrieval",
}
# the model blip.load builds for a BLIP source: the task model of the data's kind
BLIP_LOAD_TASK = {"caption": "caption", "vqa": "vqa"}


def recipe_for(family: Family | str, kind: str) -> str:
    """The recipe (a ``configs/recipe`` name) of a model family and a data kind; ValueError naming what fits."""
    family = Family(family)
    if (family, kind) not in RECIPES:
        fits = sorted(k for f, k in RECIPES if f is family)
        raise ValueError(f"a {family.value} model cannot be fine-tuned on {kind} rows (it fits {fits}); start from "
                         f"a model that can (e.g. a BLIP-2 model with its LLM for instructions), or convert the rows")
    return RECIPES[family, kind]


def load_task(family: Family | str, kind: str) -> str | None:
    """The ``task`` to load a source of ``family`` with for ``kind`` rows (None: the checkpoint's own)."""
    return BLIP_LOAD_TASK.get(kind) if Family(family) is Family.BLIP else None


def _settings(cfg: Mapping | None) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "items") and not isinstance(cfg, dict):   # an OmegaConf node
        from omegaconf import OmegaConf
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in dict(cfg).items() if v is not None}


def set_image_size(model: nn.Module, image_size: int) -> None:
    """Fine-tune at ``image_size``: every ViT's position embedding resized once to the new grid (BLIP-2 364 px from
    a 224-px checkpoint, BLIP caption 384 / VQA 480), and the model's config says so (its string API preprocesses
    at that size)."""
    from dataclasses import replace

    from .nn.vit import VisionTransformer
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            module.set_image_size(image_size)
    config = getattr(model, "config", None)
    if getattr(config, "vision", None) is not None and config.vision.image_size != image_size:
        config.vision = replace(config.vision, image_size=image_size)


def finetune_objective(model: nn.Module, kind: str, model_cfg: Mapping) -> nn.Module:
    """The training objective around a loaded inference ``model`` for ``kind`` rows.

    model_cfg: the run's resolved ``model`` settings: ``objective`` (the objective's keyword arguments, e.g. prompt,
    max_txt_len), ``image_size``, ``freeze_vit`` / ``freeze_llm`` (BLIP-2), ``text_init`` (the Q-Former text parts of
    a question-aware model), ``lora`` (:class:`blip.models.lora.LoraSettings` fields) and ``freeze`` (extra regexes
    of frozen parameters).
    """
    family = family_of(model)
    recipe_for(family, kind)   # refuses a family / kind pair no recipe covers
    settings = _settings(model_cfg.get("objective"))
    if model_cfg.get("image_size"):
        set_image_size(model, int(model_cfg["image_size"]))
    if family is Family.BLIP:
        from .objectives.blip_finetune import wrap_objective
        objective = wrap_objective(BLIP_LOAD_TASK[kind], model, **settings)
    else:
        from .convert.blip2_handoff import question_aware
        from .models.blip2_finetune import set_vit_trainable
        if family is Family.BLIP2_LLM and kind in ("vqa", "instruction"):
            model = question_aware(model, model_cfg.get("text_init"))
        if model_cfg.get("freeze_vit") is False:
            set_vit_trainable(model, True)
        if family is Family.BLIP2_LLM:
            from .objectives.blip2_stage2 import Blip2Stage2Objective
            if model_cfg.get("freeze_llm") is False:   # every weight trains (the papers keep the LLM frozen)
                model.llm.requires_grad_(True)
                model.config.llm_train_mode = True
            objective = Blip2Stage2Objective(model, **settings)
        else:
            from .objectives.blip2_stage1 import Blip2Stage1Objective
            objective = Blip2Stage1Objective(model, **settings)
    lora = _settings(model_cfg.get("lora"))
    if lora.get("r"):
        from .models.lora import LoraSettings, apply_lora
        adapted = apply_lora(objective, LoraSettings.from_config(lora))
        log.info("LoRA r=%s on %d modules (%s ...)", lora["r"], len(adapted), ", ".join(adapted[:3]))
    freeze_matching(objective, model_cfg.get("freeze"))
    return objective


def freeze_matching(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """``model.freeze``: parameters whose name matches any of the regexes stop training; returns their names."""
    compiled = [re.compile(p) for p in patterns or []]
    frozen = [n for n, p in model.named_parameters() if any(r.search(n) for r in compiled)]
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    if compiled:
        log.info("frozen by model.freeze %s: %d parameter tensors", list(patterns), len(frozen))
    return frozen
