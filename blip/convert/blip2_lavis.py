"""LAVIS BLIP-2 checkpoints -> blip's BLIP-2 models, and a stage-1 model back to LAVIS.

- stage 1 (``blip2_pretrained*.pth``, fine-tuned ``checkpoint.pth``) -> :class:`blip.models.blip2_qformer.Blip2Qformer`;
  :func:`export_lavis` writes the inverse;
- stage 2 and InstructBLIP (``blip2_pretrained_opt2.7b.pth``, ``instruct_blip_*.pth``...) ->
  :mod:`blip.models.blip2_llm` models.

Where each part comes from (``model.load_report.origins``):

=================================  ================================================================================
our prefix                         LAVIS ``.pth``
=================================  ================================================================================
``image_encoder.visual_encoder``   the file's ``visual_encoder.*`` (full / fine-tuned checkpoints); else the
                                   ``vision_weights=`` file (``eva_vit_g.pth``, ViT-L: ``clip_vit_L.pth``):
                                   trainable-only files lack it
``image_encoder.ln_vision``        ``ln_vision.*``
``qformer``                        ``query_tokens`` + ``Qformer.bert.*``
``lm_head`` (stage 1)              ``Qformer.cls.predictions.*``
heads, ``temp`` (stage 1)          ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``
``llm_proj`` (stage 2)             ``opt_proj`` / ``t5_proj`` / ``llm_proj``
``llm`` (stage 2)                  the file if it has ``opt_model.*`` ... (full checkpoint), else the ``llm=`` HF
                                   directory
=================================  ================================================================================
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import CheckpointError, StateDict, load_into
from ..models import blip2_llm
from ..models.blip2 import LLM_ARCHS, llm_arch_of_sizes, qformer_arch_config, qformer_arch_of_widths
from ..models.blip2_qformer import Blip2Qformer
from ..models.qformer import CLIP_VIT_L, EVA_VIT_G
from .bert import ours_to_bert
from .blip2_parts import (LAVIS_ALWAYS_UNUSED, add_vision_weights, lavis_lm_head_to_ours, lavis_qformer_to_ours,
                          lavis_vision_to_ours, load_parts, vision_for_grid)

LAVIS_HEADS = ("vision_proj.", "text_proj.", "itm_head.")


def guess_qformer_arch(sd: StateDict, source: str = "this checkpoint") -> str:
    """Stage-1 arch from the widths of ``query_tokens`` and ``ln_vision``. source: the file, named in the error."""
    if "query_tokens" not in sd or "ln_vision.weight" not in sd:
        raise CheckpointError(f"{source} is not a LAVIS BLIP-2 stage-1 checkpoint: no query_tokens / ln_vision.weight")
    key = (sd["query_tokens"].shape[-1], sd["ln_vision.weight"].shape[0])
    arch = qformer_arch_of_widths(*key)
    if arch is None:
        raise CheckpointError(f"cannot tell the arch of {source}: a Q-Former of width {key[0]} on image features of "
                              f"width {key[1]}; pass arch=")
    return arch


def lavis_stage1_to_ours(sd: StateDict) -> tuple[StateDict, set[str]]:
    """Pure key conversion of a LAVIS ``Blip2Qformer`` state dict (any subset) -> (ours, consumed keys)."""
    out, used = lavis_vision_to_ours(sd)
    for convert in (lavis_qformer_to_ours, lavis_lm_head_to_ours):
        part, part_used = convert(sd)
        out.update(part)
        used |= part_used
    for k, v in sd.items():
        if k.startswith(LAVIS_HEADS) or k == "temp":
            out[k] = v
            used.add(k)
    used |= {k for k in sd if any(re.fullmatch(p, k) for p in LAVIS_ALWAYS_UNUSED)}
    return out, used


def load_lavis_stage1(sd: StateDict, source: str, arch: str | None = None,
                      vision_weights: str | Path | StateDict | None = None, **overrides) -> Blip2Qformer:
    """LAVIS ``blip2_pretrained*.pth`` / ``checkpoint.pth`` -> :class:`Blip2Qformer` in eval mode, with
    ``model.load_report``.

    vision_weights: the frozen ViT (see :func:`blip.convert.blip2_parts.add_vision_weights`) for files without
    ``visual_encoder.*``; a file that carries its own ViT refuses a second one. overrides: config fields
    (``freeze_vit``, ``vit_dtype``...).
    """
    out, used = lavis_stage1_to_ours(sd)
    cfg = qformer_arch_config(arch or guess_qformer_arch(sd, source), **overrides)
    cfg = replace(cfg, vision=vision_for_grid(cfg.vision, out.get("image_encoder.visual_encoder.pos_embed")))
    model = Blip2Qformer(cfg)
    parts = ("image_encoder.ln_vision", "qformer", "lm_head", "vision_proj", "text_proj", "itm_head", "temp")
    origins = {p: source for p in parts}
    has_vit = any(k.startswith("image_encoder.visual_encoder.") for k in out)
    if has_vit and vision_weights is not None:
        raise CheckpointError(f"{source} carries its own visual_encoder weights; drop vision_weights= (LAVIS would "
                              "silently overwrite the EVA file with them)")
    origins["image_encoder.visual_encoder"] = source if has_vit else add_vision_weights(out, vision_weights,
                                                                                         cfg.vision, source)
    stray = [k for k in sd if k not in used]
    if stray:
        raise CheckpointError(f"{source}: keys a BLIP-2 stage-1 checkpoint does not have: {stray[:8]}")
    report = load_into(model, out, source)
    report.origins.update(origins)
    model.load_report = report
    return model.eval()


def export_lavis(model: Blip2Qformer, trainable_only: bool = False) -> StateDict:
    """Our Blip2Qformer -> a LAVIS ``Blip2Qformer`` state dict (``torch.save({"model": sd}, path)`` gives a file
    LAVIS's ``load_from_pretrained`` and :func:`blip.load` read). EVA ViTs only (LAVIS's CLIP ViT-L has other names).

    trainable_only: leave out ``visual_encoder.*`` as LAVIS's runner does for a frozen ViT (``blip2_pretrained.pth``).
    The tied aliases (``Qformer.cls.predictions.decoder.*``) and the ``position_ids`` buffer are written as LAVIS does.
    """
    cfg = model.cfg
    if cfg.vision.pre_norm or cfg.vision.qkv_bias != "qv":
        raise CheckpointError("export_lavis writes EVA ViTs; this model has a CLIP-style ViT")
    sd = {k: v.detach() for k, v in model.state_dict().items()}   # on the model's device
    out: StateDict = {}
    if not trainable_only:
        out.update({k[len("image_encoder."):]: v for k, v in sd.items()
                    if k.startswith("image_encoder.visual_encoder.")})
    out.update({k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.ln_vision.")})
    out["query_tokens"] = sd["qformer.query_tokens"]
    out.update(ours_to_bert(sd, "qformer.transformer.", "Qformer.bert."))
    text = cfg.qformer.text
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(text.max_position_embeddings)[None]
    head = "Qformer.cls.predictions."
    for ours, lavis in (("lm_head.dense.", "transform.dense."), ("lm_head.norm.", "transform.LayerNorm.")):
        out.update({head + lavis + k[len(ours):]: v for k, v in sd.items() if k.startswith(ours)})
    out[head + "bias"] = out[head + "decoder.bias"] = sd["lm_head.bias"]
    out[head + "decoder.weight"] = out["Qformer.bert.embeddings.word_embeddings.weight"]
    out.update({k: v for k, v in sd.items() if k.startswith(LAVIS_HEADS) or k == "temp"})
    return out


# ---------------------------------------------------------------------------------------------------------------
# stage 2 / InstructBLIP

LLM_NAMES = ("opt", "t5", "llm")   # LAVIS prefixes: {name}_proj.*, {name}_model.*
# tied aliases of frozen LLM weights that LAVIS's trainable-only filter keeps
LLM_TIED_ALIASES = ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def is_lavis_llm(sd: StateDict) -> bool:
    """LAVIS files of LLM models: a projection or LLM weights (``opt_proj``/``t5_proj``/``llm_proj``, ``*_model.``)."""
    return any(k.startswith(f"{n}_proj.") or k.startswith(f"{n}_model.") for k in sd for n in LLM_NAMES)


def _llm_name(sd: StateDict) -> str:
    for n in LLM_NAMES:
        if any(k.startswith(f"{n}_proj.") or k.startswith(f"{n}_model.") for k in sd):
            return n
    raise CheckpointError("not a LAVIS BLIP-2 LLM checkpoint: no opt_proj / t5_proj / llm_proj keys")


def lavis_llm_task(sd: StateDict) -> str:
    """"instruct" for InstructBLIP files (their Q-Former reads the instruction: word embeddings), else "stage2"."""
    return "instruct" if "Qformer.bert.embeddings.word_embeddings.weight" in sd else "stage2"


def lavis_image_width(sd: StateDict) -> int | None:
    """Width of the image features the Q-Former reads (1408: EVA ViT-g, 1024: CLIP ViT-L): ``ln_vision`` normalises
    them and the cross-attention keys [768, width] project them; None when the file has neither."""
    if "ln_vision.weight" in sd:
        return sd["ln_vision.weight"].shape[0]
    keys = [v for k, v in sd.items() if k.startswith("Qformer.") and k.endswith("crossattention.self.key.weight")]
    return keys[0].shape[1] if keys else None


def guess_llm_arch(sd: StateDict, source: str = "this checkpoint") -> tuple[str, str]:
    """(arch, task) of a LAVIS LLM checkpoint from its key names and shapes: the LLM's prefix, the width the projection
    maps to, and the width of the image features (which ViT). source: the file, named in the error."""
    name, task = _llm_name(sd), lavis_llm_task(sd)
    instruct = task == "instruct"
    proj = sd.get(f"{name}_proj.weight")
    out = proj.shape[0] if proj is not None else None
    if proj is not None:   # an arch that carries its LLM's sizes
        sized = llm_arch_of_sizes({"llm": "llama"}.get(name, name), proj.shape[1], out)
        if sized is not None:
            return sized, task
    image = lavis_image_width(sd)
    vit_g, vit_l = EVA_VIT_G.width, CLIP_VIT_L.width
    table = {("opt", 2560, vit_g): "blip2_vitg_opt2.7b", ("opt", 4096, vit_g): "blip2_vitg_opt6.7b",
             ("t5", 2048, vit_g): "instructblip_flant5xl" if instruct else "blip2_vitg_flant5xl",
             ("t5", 2048, vit_l): "blip2_vitL_flant5xl", ("t5", 4096, vit_g): "blip2_vitg_flant5xxl",
             ("llm", 4096, vit_g): "instructblip_vicuna7b"}
    if (name, out, image) not in table:
        raise CheckpointError(f"cannot tell the architecture of {source} ({name} projection to {out}, image features "
                              f"of width {image}): pass arch=")
    return table[name, out, image], task


def lavis_llm_to_ours(sd: StateDict) -> tuple[StateDict, set[str]]:
    """Pure key conversion of a LAVIS LLM checkpoint (any subset of its keys) -> (ours, consumed keys)."""
    name = _llm_name(sd)
    out, used = lavis_vision_to_ours(sd)
    qf, qf_used = lavis_qformer_to_ours(sd)
    out.update(qf)
    used |= qf_used
    for src, dst in ((f"{name}_proj.", "llm_proj."), (f"{name}_model.", "llm.")):
        for k, v in sd.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                used.add(k)
    return out, used


def load_lavis_llm(sd: StateDict, source: str, arch: str | None = None, task: str | None = None,
                   llm: str | Path | None = None, vision_weights: str | Path | None = None, **overrides) -> nn.Module:
    """A LAVIS BLIP-2 LLM / InstructBLIP checkpoint -> model.

    llm: the HF directory of the frozen LLM (weights unless the file carries them, config, tokenizer).
    vision_weights: the frozen ViT file (``eva_vit_g.pth``; ViT-L archs: ``clip_vit_L.pth``) when the file has no
    ``visual_encoder.*`` keys.
    overrides: :class:`blip.models.blip2.Blip2LLMConfig` fields (e.g. ``frozen_dtype="bf16"``).
    """
    arch, task = arch or guess_llm_arch(sd, source)[0], task or lavis_llm_task(sd)
    name = _llm_name(sd)
    llm_keys = [k for k in sd if k.startswith(f"{name}_model.")]
    has_llm = any(k[len(name) + 7:] not in LLM_TIED_ALIASES for k in llm_keys)
    if not has_llm:  # only tied aliases of the frozen embeddings: the LLM comes from the llm= directory
        sd = {k: v for k, v in sd.items() if k not in llm_keys}
    if llm is None and not has_llm:
        raise CheckpointError(f"{source} carries no LLM weights (LAVIS saves only trainable parameters): pass "
                              "llm=<HF directory of the language model>")
    vision = overrides.get("vision", LLM_ARCHS[arch].vision)
    sized = vision_for_grid(vision, sd.get("visual_encoder.pos_embed"))   # fine-tuned at another size (364 px)
    if sized is not vision:
        overrides["vision"] = sized
    model = blip2_llm.create(arch, task, llm=llm, **overrides)
    out, used = lavis_llm_to_ours(sd)
    origins = {"image_encoder.ln_vision": source, "qformer": source, "llm_proj": source,
               "llm": source if has_llm else str(llm), "image_encoder.visual_encoder": source}
    has_vit = any(k.startswith("image_encoder.visual_encoder.") for k in out)
    if has_vit and vision_weights is not None:
        raise CheckpointError(f"{source} carries its own visual_encoder weights (fine-tuned ViT); drop vision_weights=")
    if not has_vit:
        origins["image_encoder.visual_encoder"] = add_vision_weights(out, vision_weights, model.config.vision, source)
    stray = [k for k in sd if k not in used and not any(re.fullmatch(p, k) for p in LAVIS_ALWAYS_UNUSED)
             and not k.startswith("Qformer.cls.")]
    if stray:
        raise CheckpointError(f"{source}: keys this converter does not know: {stray[:8]}")
    load_parts(model, out, source, origins)
    return model.eval()
