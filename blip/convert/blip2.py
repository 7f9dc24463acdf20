"""The BLIP-2 family's checkpoint facade: which files it owns, how each loads, export and save.

- LAVIS ``.pth`` (stage 1, stage 2, InstructBLIP): :mod:`blip.convert.blip2_lavis`;
- HF directories (``Blip2ForImageTextRetrieval``, ``Blip2ForConditionalGeneration``,
  ``InstructBlipForConditionalGeneration``): :mod:`blip.convert.blip2_hf`;
- blip's own layout (``.safetensors`` with the config in its metadata, training checkpoints): here;
- the parts every BLIP-2 model shares (image encoder, Q-Former): :mod:`blip.convert.blip2_parts`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from ..checkpoints import (CheckpointError, LoadReport, StateDict, check_fits_before_building, load_into,
                           read_state_dict)
from ..models.blip2 import qformer_arch_config
from ..models.blip2_llm import Blip2LanguageModel
from ..models.blip2_qformer import Blip2Qformer, Blip2QformerConfig
from ..models.qformer import QFormerConfig
from ..nn.transformer import TextConfig
from ..nn.vit import VisionConfig
from .blip2_hf import HF_LOADERS, export_hf_llm, export_hf_qformer
from .blip2_lavis import ARCH_BY_WIDTH, is_lavis_llm, load_lavis_llm, load_lavis_stage1
from .blip2_parts import is_lavis_blip2, lavis_qformer_to_ours, lavis_vision_to_ours

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
    if is_lavis_llm(sd):
        return load_lavis_llm(sd, source, arch=arch, task=task, llm=llm, vision_weights=vision_weights, **overrides)
    if task not in (None, *QFORMER_TASKS):
        raise CheckpointError(f"{source} is a stage-1 (Q-Former) checkpoint: task must be one of {QFORMER_TASKS}")
    if is_ours(sd):
        if any(k.startswith(("llm.", "llm_proj.", "model.llm.", "model.llm_proj.")) for k in sd):
            raise CheckpointError(f"{source}: a blip-layout BLIP-2 LLM state dict; load it with its model's "
                                  "load_state_dict (or a LAVIS / HF checkpoint through blip.load)")
        if vision_weights is not None:
            raise CheckpointError(f"{source} is in blip's own layout and carries its ViT: drop vision_weights=")
        return load_ours(sd, source, arch=arch, task=task, **overrides)
    return as_task(load_lavis_stage1(sd, source, arch=arch, vision_weights=vision_weights, **overrides), task)


def exports(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside a training objective) is a BLIP-2 model this facade writes."""
    return isinstance(getattr(model, "model", model), (Blip2Qformer, Blip2LanguageModel))


def export_hf(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` as the HF directory transformers loads: ``Blip2ForImageTextRetrieval`` (stage 1),
    ``Blip2ForConditionalGeneration`` or ``InstructBlipForConditionalGeneration`` (LLM models)."""
    model = getattr(model, "model", model)   # a training objective holds its model
    if isinstance(model, Blip2Qformer):
        return export_hf_qformer(model, directory)
    if isinstance(model, Blip2LanguageModel):
        return export_hf_llm(model, directory)
    raise TypeError(f"{type(model).__name__} is not a BLIP-2 model")


# ---------------------------------------------------------------------------------------------------------------
# blip's own layout (``save_safetensors``, training checkpoints of the stage-1 objective)

def is_ours(sd: StateDict) -> bool:
    """Our Blip2Qformer keys, bare or under the objective's ``model.`` prefix (training checkpoints)."""
    return "qformer.query_tokens" in sd or "model.qformer.query_tokens" in sd


def save_safetensors(model: Blip2Qformer, path: str | Path) -> Path:
    """Our layout as ``.safetensors`` with the exact config in its metadata (``blip.load(path)`` rebuilds it)."""
    from safetensors.torch import save_file
    meta = {"format": "pt", "blip_family": "blip2", "blip_task": "qformer",
            "blip_config": json.dumps(dataclasses.asdict(model.cfg)), "blip_has_lm_head": str(model.has_lm_head)}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return Path(path)


def config_from_dict(d: dict) -> Blip2QformerConfig:
    d = dict(d)
    q = d.pop("qformer")
    return Blip2QformerConfig(vision=VisionConfig(**d.pop("vision")),
                              qformer=QFormerConfig(TextConfig(**q["text"]), q["num_query_tokens"]), **d)


def _saved_metadata(source: str) -> dict:
    if not str(source).endswith(".safetensors") or not Path(source).is_file():
        return {}
    from safetensors import safe_open
    with safe_open(str(source), "pt") as f:
        meta = f.metadata() or {}
    return meta if meta.get("blip_family") == "blip2" else {}


def load_ours(sd: StateDict, source: str, arch: str | None = None, task: str | None = None, **overrides) -> nn.Module:
    """A state dict in our layout -> :class:`Blip2Qformer` (config: ``arch``, else the file's metadata, else
    guessed from the widths). Training checkpoints of the objective (keys under ``model.``) are accepted."""
    if "model.qformer.query_tokens" in sd:
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    meta = _saved_metadata(source)
    saved = json.loads(meta["blip_config"]) if "blip_config" in meta else None
    if arch is not None or saved is None:
        key = (sd["qformer.query_tokens"].shape[-1], sd["image_encoder.ln_vision.weight"].shape[0])
        if arch is None and key not in ARCH_BY_WIDTH:
            raise CheckpointError(f"{source}: cannot tell the arch of a Q-Former of width {key[0]}; pass arch=")
        cfg = qformer_arch_config(arch or ARCH_BY_WIDTH[key], **overrides)
    else:
        cfg = dataclasses.replace(config_from_dict(saved), **overrides)
    check_fits_before_building(lambda: Blip2Qformer(cfg), sd, source)
    model = Blip2Qformer(cfg)
    model.has_lm_head = meta.get("blip_has_lm_head", "True") == "True"
    report = load_into(model, sd, source)
    report.origins.update({p: source for p in ("image_encoder", "qformer", "lm_head", "vision_proj", "text_proj",
                                               "itm_head", "temp")})
    model.load_report = report
    return as_task(model, task)


def as_task(model: Blip2Qformer, task: str | None) -> nn.Module:
    """A loaded stage-1 model as task "qformer" (itself) or "stage1" (its training objective), in eval mode."""
    if task not in (None, *QFORMER_TASKS):
        raise CheckpointError(f"a stage-1 (Q-Former) checkpoint: task must be one of {QFORMER_TASKS}, not {task!r}")
    if task == "stage1":
        from ..objectives.blip2_stage1 import Blip2Stage1Objective
        return Blip2Stage1Objective(model).eval()
    return model.eval()


def describe(report: LoadReport) -> str:
    """One line per part: the file its weights came from."""
    return "\n".join(f"{part}: {where}" for part, where in sorted(report.origins.items()))


# ---------------------------------------------------------------------------------------------------------------
# stage 1 -> stage 2

def init_from_stage1(model: nn.Module, path: str | Path) -> LoadReport:
    """Initialise ``query_tokens``, ``ln_vision`` and the Q-Former of a stage-2 / InstructBLIP model from a stage-1
    checkpoint (LAVIS ``blip2_pretrained.pth`` or blip's own keys). Parts the stage-2 model does not have (the ITC/ITM
    heads, ``temp``, the LM head, and without instructions the Q-Former's text embeddings and text FFN) are dropped;
    every Q-Former / ln_vision key of the model must be covered. The ViT and LLM are untouched."""
    sd = read_state_dict(path)
    if any(k.startswith("Qformer.") for k in sd):
        out, _ = lavis_vision_to_ours(sd)
        qf, _ = lavis_qformer_to_ours(sd)
        out.update(qf)
    else:
        out = dict(sd)
    own = model.state_dict()
    wanted = [k for k in own if k.startswith("qformer.") or k.startswith("image_encoder.ln_vision.")]
    lacking = [k for k in wanted if k not in out]
    if lacking:
        raise CheckpointError(f"{path}: not a stage-1 checkpoint for this model; lacks {lacking[:6]}")
    sub = {k: out[k] for k in wanted}
    report = load_into(model, sub, str(path), expected_missing=[r"image_encoder\.visual_encoder\..*", r"llm\..*",
                                                                r"llm_proj\..*"])
    report.origins.update({"qformer": str(path), "image_encoder.ln_vision": str(path)})
    model.stage1_report = report
    return report
