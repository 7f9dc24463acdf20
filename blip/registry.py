"""Every ``(arch, task)`` blip can build, in two explicit tables.

- :data:`MODELS`: inference models (tensor API + string API), e.g. ``("blip_base", "caption")``,
  ``("blip2_vitg_qformer", "qformer")``, ``("blip2_vitg_opt2.7b", "stage2")``;
- :data:`OBJECTIVES`: training objectives (``forward(batch) -> {"loss", ...}``), e.g. ``("blip_base", "pretrain")``,
  ``("blip_base", "caption")`` (BLIP fine-tuning around the caption model), ``("blip2_vitg_qformer", "stage1")``.

A builder is ``fn(arch, task, **overrides) -> nn.Module``; objective builders also take ``objective={...}``, the
objective's own settings (queue length, prompt, text length...). Builders import their modules when called, so
``import blip`` stays light. To add an architecture, add its config to ``blip.models.<family>.ARCHS``; to add a task,
write the model or objective and add its builder here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from .models.blip import ARCHS as BLIP_ARCHS
from .models.blip import TASKS as BLIP_TASKS
from .models.blip2 import LLM_ARCHS, QFORMER_ARCHS
from .models.blip2_qformer import Blip2QformerConfig
from .models.family import Family

Builder = Callable[..., nn.Module]
LLM_TASKS = ("stage2", "instruct")
BLIP_FINETUNE_TASKS = ("caption", "retrieval", "vqa", "nlvr")


def _blip_model(arch: str, task: str, **overrides) -> nn.Module:
    from .models.blip import create
    return create(arch, task, **overrides)


def _blip_pretrain(arch: str, task: str, *, objective: dict | None = None, **overrides) -> nn.Module:
    from .objectives.blip_pretrain import BlipPretrain
    return BlipPretrain(BLIP_ARCHS[arch].with_overrides(**overrides), **(objective or {}))


def _blip_finetune(arch: str, task: str, *, objective: dict | None = None, **overrides) -> nn.Module:
    from .objectives.blip_finetune import wrap_objective
    return wrap_objective(task, _blip_model(arch, task, **overrides), **(objective or {}))


def _blip2_qformer(arch: str, task: str, **overrides) -> nn.Module:
    from .models.blip2 import qformer_arch_config
    from .models.blip2_qformer import Blip2Qformer
    return Blip2Qformer(qformer_arch_config(arch, **overrides))


def _blip2_stage1(arch: str, task: str, *, objective: dict | None = None, tokenizer=None, **overrides) -> nn.Module:
    from .objectives.blip2_stage1 import Blip2Stage1Objective
    return Blip2Stage1Objective(_blip2_qformer(arch, "qformer", **overrides), tokenizer=tokenizer, **(objective or {}))


def _blip2_llm(arch: str, task: str, *, qformer_from=None, **overrides) -> nn.Module:
    """qformer_from: a stage-1 checkpoint whose Q-Former and ln_vision initialise the model (the hand-off)."""
    from .models.blip2_llm import create
    model = create(arch, task, **overrides)
    if qformer_from is not None:
        from .convert.blip2_handoff import init_from_stage1
        init_from_stage1(model, qformer_from)
    return model


def _blip2_stage2(arch: str, task: str, *, objective: dict | None = None, llm_tokenizer: str | None = None,
                  **overrides) -> nn.Module:
    """llm_tokenizer: an HF tokenizer directory, or "synthetic" (the word-level tokenizer of the synthetic
    captions, for the tiny LLM of the embedded default)."""
    from .objectives.blip2_stage2 import Blip2Stage2Objective
    model = _blip2_llm(arch, task, **overrides)
    if llm_tokenizer == "synthetic":
        from .data.synthetic import synthetic_llm_tokenizer
        model.tokenizer = synthetic_llm_tokenizer()
    elif llm_tokenizer:
        model.config.tokenizer = llm_tokenizer
    return Blip2Stage2Objective(model, **(objective or {}))


MODELS: dict[tuple[str, str], Builder] = {
    **{(arch, task): _blip_model for arch in BLIP_ARCHS for task in BLIP_TASKS},
    **{(arch, "qformer"): _blip2_qformer for arch in QFORMER_ARCHS},
    **{(arch, task): _blip2_llm for arch in LLM_ARCHS for task in LLM_TASKS},
}
OBJECTIVES: dict[tuple[str, str], Builder] = {
    **{(arch, "pretrain"): _blip_pretrain for arch in BLIP_ARCHS},
    **{(arch, task): _blip_finetune for arch in BLIP_ARCHS for task in BLIP_FINETUNE_TASKS},
    **{(arch, "stage1"): _blip2_stage1 for arch in QFORMER_ARCHS},
    **{(arch, task): _blip2_stage2 for arch in LLM_ARCHS for task in LLM_TASKS},
}


def register_qformer_arch(arch: str, cfg: Blip2QformerConfig) -> None:
    """Add a BLIP-2 Q-Former arch of other sizes: its ``qformer`` model, ``stage1`` objective, and its widths for
    the loaders that tell a file's arch from them (e.g. the sizes of a small test checkpoint)."""
    if arch in QFORMER_ARCHS and QFORMER_ARCHS[arch] != cfg:
        raise ValueError(f"arch {arch!r} already exists with other sizes")
    QFORMER_ARCHS[arch] = cfg
    MODELS[arch, "qformer"] = _blip2_qformer
    OBJECTIVES[arch, "stage1"] = _blip2_stage1


def family(arch: str) -> Family:
    """The family of the arch's models (:class:`blip.models.family.Family`, what their ``family`` attribute says):
    BLIP (v1), a BLIP-2 stage-1 Q-Former or a BLIP-2 / InstructBLIP model with its LLM."""
    if arch in BLIP_ARCHS:
        return Family.BLIP
    if arch in QFORMER_ARCHS:
        return Family.BLIP2_QFORMER
    if arch in LLM_ARCHS:
        return Family.BLIP2_LLM
    raise KeyError(f"unknown arch {arch!r}; known: {sorted({a for a, _ in list_models()})}")


def list_models() -> list[tuple[str, str]]:
    """Every (arch, task) pair: inference models, then objectives of tasks that have no inference model."""
    return list(MODELS) + [key for key in OBJECTIVES if key not in MODELS]


def _build(table: dict[tuple[str, str], Builder], kind: str, arch: str, task: str, **overrides) -> nn.Module:
    if (arch, task) not in table:
        family(arch)   # unknown arch: name the known ones
        tasks = sorted(t for a, t in table if a == arch)
        raise KeyError(f"{arch} has no {kind} for task {task!r}; its tasks: {tasks}")
    return table[arch, task](arch, task, **overrides)


def create_model(arch: str, task: str, *, vision_init: str | Path | None = None, text_init: str | Path | None = None,
                 **overrides) -> nn.Module:
    """An inference model, e.g. ``create_model("blip_base", "caption", image_size=384)``; for a task with only a
    training objective (``"pretrain"``, ``"stage1"``) that objective. Randomly initialised, or with its towers from
    the unimodal weights the papers start from (:mod:`blip.convert.unimodal`; the report is printed):
    vision_init: a timm-layout ViT file (DeiT-B, ViT-L in21k), ``eva_vit_g.pth``, an OpenAI CLIP file, an HF CLIP
    directory or a ``blip.zoo`` name; text_init: an HF BERT directory (or the zoo's ``"bert-base-uncased"``)."""
    table = MODELS if (arch, task) in MODELS else OBJECTIVES
    model = _build(table, "model", arch, task, **overrides)
    if vision_init is not None or text_init is not None:
        from .convert.unimodal import init_unimodal
        init_unimodal(model, vision=vision_init, text=text_init, echo=print)
    return model


def create_objective(arch: str, task: str, **overrides) -> nn.Module:
    """A randomly initialised training objective, e.g. ``create_objective("blip_base", "caption", objective={
    "prompt": "a photo of "})`` (caption fine-tuning around a fresh caption model)."""
    return _build(OBJECTIVES, "training objective", arch, task, **overrides)
