"""BLIP-2 stage-1 checkpoints <-> :class:`blip.models.blip2_qformer.Blip2Qformer`.

Where each part comes from (``model.load_report.origins``):

==============================  =========================================  ==========================================
our prefix                      LAVIS ``.pth``                             HF ``Blip2ForImageTextRetrieval`` dir
==============================  =========================================  ==========================================
``image_encoder.visual_encoder``  the file's ``visual_encoder.*`` (full    ``vision_model.*``
                                ``checkpoint.pth``, fine-tuned); else the
                                ``vision_weights=`` EVA file
                                (``eva_vit_g.pth``): trainable-only files
                                such as ``blip2_pretrained.pth`` lack it
``image_encoder.ln_vision``     ``ln_vision.*``                            ``vision_model.post_layernorm.*``
``qformer``                     ``query_tokens`` + ``Qformer.bert.*``      ``query_tokens``, ``qformer.*``,
                                                                           ``embeddings.*``
``lm_head``                     ``Qformer.cls.predictions.*``              absent (HF drops the ITG head)
heads, ``temp``                 ``vision_proj``, ``text_proj``,            ``vision_projection``,
                                ``itm_head``, ``temp``                     ``text_projection``, ``itm_head``; no temp
==============================  =========================================  ==========================================

Usage: ``blip.load("blip2_pretrained.pth", vision_weights="eva_vit_g.pth")``; ``blip.load(hf_dir)``;
:func:`export_hf` writes a directory that ``transformers.Blip2ForImageTextRetrieval.from_pretrained`` loads.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import (CheckpointError, LoadReport, StateDict, check_fits_before_building, hf_pretrained,
                           load_into, read_state_dict)
from ..models.blip2 import QFORMER_TASKS, qformer_arch_config
from ..models.blip2_qformer import Blip2Qformer, Blip2QformerConfig
from ..models.qformer import QFormerConfig
from ..nn.transformer import TextConfig
from ..nn.vit import VisionConfig
from .blip2 import (LAVIS_ALWAYS_UNUSED, hf_qformer_config, hf_qformer_to_ours, hf_vision_config, hf_vision_to_ours,
                    lavis_lm_head_to_ours, lavis_qformer_to_ours, lavis_vision_to_ours, ours_to_bert, ours_to_hf_qformer,
                    ours_to_hf_vision, to_hf_qformer_config, to_hf_vision_config, vision_file_to_ours)

log = logging.getLogger(__name__)
LAVIS_HEADS = ("vision_proj.", "text_proj.", "itm_head.")
HF_HEADS = {"vision_projection.": "vision_proj.", "text_projection.": "text_proj.", "itm_head.": "itm_head."}
# (Q-Former width, image feature width) -> arch
ARCH_BY_WIDTH = {(768, 1408): "blip2_vitg_qformer", (768, 1024): "blip2_vitL_qformer", (32, 48): "blip2_tiny_qformer",
                 (16, 48): "blip2_lavis_tiny_qformer"}


def guess_arch(sd: StateDict) -> str:
    """Stage-1 arch from the widths of ``query_tokens`` and ``ln_vision``."""
    if "query_tokens" not in sd or "ln_vision.weight" not in sd:
        raise CheckpointError("not a LAVIS BLIP-2 stage-1 checkpoint: no query_tokens / ln_vision.weight")
    key = (sd["query_tokens"].shape[-1], sd["ln_vision.weight"].shape[0])
    if key not in ARCH_BY_WIDTH:
        raise CheckpointError(f"cannot tell the arch of a Q-Former of width {key[0]} on image features of width "
                              f"{key[1]}; pass arch=")
    return ARCH_BY_WIDTH[key]


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


def _with_grid_of(cfg: Blip2QformerConfig, pos_embed: torch.Tensor | None) -> Blip2QformerConfig:
    """A checkpoint with its own ViT decides the image size (e.g. 364 px for LAVIS COCO fine-tuning)."""
    if pos_embed is None or pos_embed.shape[1] - 1 == cfg.vision.num_patches:
        return cfg
    side = math.isqrt(pos_embed.shape[1] - 1)
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=side * cfg.vision.patch_size))


def load_lavis_stage1(sd: StateDict, source: str, arch: str | None = None, task: str | None = None,
                      vision_weights: str | Path | StateDict | None = None, **overrides) -> nn.Module:
    """LAVIS ``blip2_pretrained*.pth`` / ``checkpoint.pth`` -> :class:`Blip2Qformer` (task "qformer") or its
    :class:`Blip2Stage1Objective` (task "stage1"), in eval mode, with ``model.load_report``.

    vision_weights: the frozen ViT file (``eva_vit_g.pth`` / ``clip_vit_L.pth``: a plain state dict, that dict, or a
    ``blip.zoo`` name) for files without ``visual_encoder.*``; a file that carries its own ViT refuses a second one.
    overrides: config fields
    (``freeze_vit``, ``vit_dtype``...).
    """
    if task not in (None, *QFORMER_TASKS):
        raise CheckpointError(f"{source} is a stage-1 (Q-Former) checkpoint: task must be one of {QFORMER_TASKS}")
    out, used = lavis_stage1_to_ours(sd)
    cfg = _with_grid_of(qformer_arch_config(arch or guess_arch(sd), **overrides),
                        out.get("image_encoder.visual_encoder.pos_embed"))
    model = Blip2Qformer(cfg)
    parts = ("image_encoder.ln_vision", "qformer", "lm_head", "vision_proj", "text_proj", "itm_head", "temp")
    origins = {p: source for p in parts}
    has_vit = any(k.startswith("image_encoder.visual_encoder.") for k in out)
    if has_vit and vision_weights is not None:
        raise CheckpointError(f"{source} carries its own visual_encoder weights; drop vision_weights= (LAVIS would "
                              "silently overwrite the EVA file with them)")
    if not has_vit:
        if vision_weights is None:
            raise CheckpointError(f"{source} has no visual_encoder.* weights (LAVIS saves only trainable parameters "
                                  "and the ViT is frozen): pass vision_weights=<eva_vit_g.pth> (or the zoo name "
                                  "'blip2-eva-vit-g')")
        if isinstance(vision_weights, str) and not Path(vision_weights).exists():
            from ..zoo import PRETRAINED, resolve
            if vision_weights in PRETRAINED:   # e.g. "blip2-eva-vit-g" under $BLIP_HOME
                vision_weights = resolve(vision_weights)
        vit_sd = vision_weights if isinstance(vision_weights, dict) else read_state_dict(vision_weights)
        try:
            out.update(vision_file_to_ours(vit_sd, depth=cfg.vision.depth, num_patches=cfg.vision.num_patches))
        except CheckpointError as e:
            raise CheckpointError(f"{vision_weights}: {e}") from e
    origins["image_encoder.visual_encoder"] = source if has_vit else str(
        "<state dict>" if isinstance(vision_weights, dict) else vision_weights)
    stray = [k for k in sd if k not in used]
    if stray:
        raise CheckpointError(f"{source}: keys a BLIP-2 stage-1 checkpoint does not have: {stray[:8]}")
    report = load_into(model, out, source)
    report.origins.update(origins)
    model.load_report = report
    if task == "stage1":
        from ..models.blip2_stage1 import Blip2Stage1Objective
        return Blip2Stage1Objective(model).eval()
    return model.eval()


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
    return _as_task(model, task)


def _as_task(model: Blip2Qformer, task: str | None) -> nn.Module:
    if task not in (None, *QFORMER_TASKS):
        raise CheckpointError(f"a stage-1 (Q-Former) checkpoint: task must be one of {QFORMER_TASKS}, not {task!r}")
    if task == "stage1":
        from ..models.blip2_stage1 import Blip2Stage1Objective
        return Blip2Stage1Objective(model).eval()
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
        out.update({k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.visual_encoder.")})
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
# HF Blip2ForImageTextRetrieval

def load_hf_retrieval(directory: str | Path, llm=None, vision_weights=None, **overrides) -> Blip2Qformer:
    """An HF ``Blip2ForImageTextRetrieval`` directory -> :class:`Blip2Qformer`.

    HF has no ITG head and no temperature: ``lm_head`` keeps its initialisation and ``generate`` / ``forward``
    refuse to run (``model.has_lm_head`` is False); ITC/ITM and the stage-1 objective work. ``ln_vision`` gets
    HF's eps (the vision ``layer_norm_eps``). HF strips ``num_query_tokens`` leading ids when the config has an
    ``image_token_index``; blip takes ids as given, so pass the text ids alone.
    """
    from transformers import AutoConfig
    directory = Path(directory)
    if llm is not None or vision_weights is not None:
        raise CheckpointError(f"{directory}: an HF Blip2ForImageTextRetrieval directory carries its ViT and has no LLM: "
                              "drop llm= / vision_weights=")
    hf = hf_pretrained(AutoConfig, directory)
    v, q = hf.vision_config.to_dict(), hf.qformer_config.to_dict()
    if not q.get("use_qformer_text_input", False):
        raise CheckpointError(f"{directory}: qformer_config.use_qformer_text_input is false: no text side to load")
    cfg = Blip2QformerConfig(vision=hf_vision_config(v), qformer=hf_qformer_config(q, hf.num_query_tokens),
                             embed_dim=hf.image_text_hidden_size, ln_vision_eps=v["layer_norm_eps"])
    model = Blip2Qformer(dataclasses.replace(cfg, **overrides))
    sd = read_state_dict(directory)
    out, used = hf_vision_to_ours(sd)
    qf, qf_used = hf_qformer_to_ours(sd)
    out.update(qf)
    used |= qf_used
    for k, value in sd.items():
        for src, dst in HF_HEADS.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = value
                used.add(k)
    stray = [k for k in sd if k not in used and not k.endswith("position_ids")]
    if stray:
        raise CheckpointError(f"{directory}: keys a Blip2ForImageTextRetrieval checkpoint does not have: {stray[:8]}")
    report = load_into(model, out, str(directory), expected_missing=[r"lm_head\..*", r"temp"])
    report.origins.update({p: str(directory) for p in ("image_encoder", "qformer", "vision_proj", "text_proj",
                                                       "itm_head")})
    model.load_report = report
    model.has_lm_head = False
    return model.eval()


HF_LOADERS = {"Blip2ForImageTextRetrieval": load_hf_retrieval}


def to_hf_state_dict(model: Blip2Qformer) -> StateDict:
    """Our weights under HF ``Blip2ForImageTextRetrieval`` names, float32 (no ``lm_head``, no ``temp``)."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = ours_to_hf_vision(sd)
    out.update(ours_to_hf_qformer(sd))
    for src, dst in HF_HEADS.items():
        out.update({src + k[len(dst):]: v for k, v in sd.items() if k.startswith(dst)})
    return out


def export_hf(model: Blip2Qformer, directory: str | Path) -> Path:
    """Write ``model`` as an HF ``Blip2ForImageTextRetrieval`` directory (config.json + model.safetensors, fp32).

    Dropped (HF has no place for them): ``lm_head`` (the ITG head) and ``temp``. HF uses one LayerNorm eps for the
    ViT blocks and ``post_layernorm``: the ViT's is written; an ``ln_vision`` eps that differs (LAVIS 1e-5 vs EVA's
    1e-6) is logged, its effect is ~1e-6 relative.
    """
    from safetensors.torch import save_file
    from transformers import Blip2Config
    cfg = model.cfg
    if cfg.ln_vision_eps != cfg.vision.layer_norm_eps:
        log.warning("HF Blip2VisionModel has one layer_norm_eps: ln_vision eps %g is exported as %g",
                    cfg.ln_vision_eps, cfg.vision.layer_norm_eps)
    hf = Blip2Config(vision_config=to_hf_vision_config(cfg.vision), qformer_config=to_hf_qformer_config(cfg.qformer),
                     num_query_tokens=model.num_queries, image_text_hidden_size=cfg.embed_dim)
    hf.architectures = ["Blip2ForImageTextRetrieval"]
    out = to_hf_state_dict(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(directory))
    save_file({k: v.contiguous().clone() for k, v in out.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory


def describe(report: LoadReport) -> str:
    """One line per part: the file its weights came from."""
    return "\n".join(f"{part}: {where}" for part, where in sorted(report.origins.items()))
