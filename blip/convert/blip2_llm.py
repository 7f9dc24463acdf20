"""BLIP-2 LLM checkpoints (LAVIS stage 2 / fine-tuned / InstructBLIP ``.pth``, HF ``Blip2ForConditionalGeneration``
and ``InstructBlipForConditionalGeneration`` directories) -> :mod:`blip.models.blip2_llm` models.

Where each part comes from (every load reports it in ``model.load_report.origins``):

=========================  ==============================================  =====================================
part (our prefix)          LAVIS ``.pth``                                  HF directory
=========================  ==============================================  =====================================
``image_encoder.visual_``  the file if it has ``visual_encoder.*``         ``vision_model.*``
``encoder``                (fine-tuned / full), else ``vision_weights=``
                           (``eva_vit_g.pth``)
``image_encoder.ln_vision``  ``ln_vision.*``                               ``vision_model.post_layernorm``
``qformer``                ``query_tokens`` + ``Qformer.bert.*``           ``query_tokens`` + ``qformer.*``
``llm_proj``               ``opt_proj`` / ``t5_proj`` / ``llm_proj``       ``language_projection``
``llm``                    the file if it has ``opt_model.*`` ... (full    ``language_model.*``
                           checkpoint.pth), else the ``llm=`` HF directory
=========================  ==============================================  =====================================
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..checkpoints import (CheckpointError, LoadReport, StateDict, build_empty, hf_pretrained, load_into, ours_to_bert,
                           read_state_dict)
from ..models import blip2_llm
from .blip2 import (HF_QFORMER_EMB, LAVIS_ALWAYS_UNUSED, hf_qformer_config, hf_qformer_to_ours, hf_vision_config,
                    hf_vision_to_ours, lavis_qformer_to_ours, lavis_vision_to_ours, ours_to_hf_vision,
                    to_hf_qformer_config, to_hf_vision_config, vision_file_to_ours)
from .blip2_stage1 import describe  # noqa: F401  (one line per part: where its weights came from)

log = logging.getLogger(__name__)
LLM_NAMES = ("opt", "t5", "llm")   # LAVIS prefixes: {name}_proj.*, {name}_model.*
# tied aliases of frozen LLM weights that LAVIS's trainable-only filter keeps (LAVIS behaviour 10)
LLM_TIED_ALIASES = ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
INSTRUCT_HF_EMB = {"embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings":
                   "embeddings.position", "embeddings.layernorm": "embeddings.norm"}


def owns(sd: StateDict) -> bool:
    """LAVIS files of LLM models: a projection or LLM weights (``opt_proj``/``t5_proj``/``llm_proj``, ``*_model.``)."""
    return any(k.startswith(f"{n}_proj.") or k.startswith(f"{n}_model.") for k in sd for n in LLM_NAMES)


def _llm_name(sd: StateDict) -> str:
    for n in LLM_NAMES:
        if any(k.startswith(f"{n}_proj.") or k.startswith(f"{n}_model.") for k in sd):
            return n
    raise CheckpointError("not a LAVIS BLIP-2 LLM checkpoint: no opt_proj / t5_proj / llm_proj keys")


def guess_arch(sd: StateDict) -> tuple[str, str]:
    """(arch, task) of a LAVIS LLM checkpoint from its key names and shapes."""
    name = _llm_name(sd)
    instruct = "Qformer.bert.embeddings.word_embeddings.weight" in sd
    task = "instruct" if instruct else "stage2"
    q = sd.get("query_tokens")
    proj = sd.get(f"{name}_proj.weight")
    if q is not None and q.shape[-1] != 768:
        return {"opt": "blip2_tiny_opt", "t5": "blip2_tiny_t5", "llm": "blip2_tiny_llama"}[name], task
    out = proj.shape[0] if proj is not None else None
    table = {("opt", 2560): "blip2_vitg_opt2.7b", ("opt", 4096): "blip2_vitg_opt6.7b",
             ("t5", 2048): "instructblip_flant5xl" if instruct else "blip2_vitg_flant5xl",
             ("t5", 4096): "blip2_vitg_flant5xxl", ("llm", 4096): "instructblip_vicuna7b"}
    if (name, out) not in table:
        raise CheckpointError(f"cannot tell the architecture of this {name} checkpoint (projection to {out}): "
                              "pass arch=")
    return table[name, out], task


def lavis_to_ours(sd: StateDict) -> tuple[StateDict, set[str]]:
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


def _add_vision_file(out: StateDict, vision_weights, vision, source: str) -> str:
    """Put the frozen ViT file (path, zoo name such as "blip2-eva-vit-g", or state dict) into ``out``; returns its
    name."""
    if vision_weights is None:
        raise CheckpointError(f"{source} has no visual_encoder.* weights (LAVIS saves only trainable parameters): "
                              "pass vision_weights=<eva_vit_g.pth> (or the zoo name 'blip2-eva-vit-g')")
    if isinstance(vision_weights, str) and not Path(vision_weights).exists():
        from ..zoo import PRETRAINED, resolve
        if vision_weights in PRETRAINED:
            vision_weights = resolve(vision_weights)
    sd = vision_weights if isinstance(vision_weights, dict) else read_state_dict(vision_weights)
    try:
        out.update(vision_file_to_ours(sd, depth=vision.depth, num_patches=vision.num_patches))
    except CheckpointError as e:
        raise CheckpointError(f"{vision_weights}: {e}") from e
    return "<state dict>" if isinstance(vision_weights, dict) else str(vision_weights)


def _tied_missing(model: nn.Module, sd: StateDict) -> list[str]:
    """Model keys absent from ``sd`` that alias (share storage with) a key present in it (tied LM heads)."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight is one Parameter (meta too)
    present = {id(params[k]) for k in sd if k in params}
    return [re.escape(k) for k, p in params.items() if k not in sd and id(p) in present]


def _finish_load(model: nn.Module, sd: StateDict, source: str, origins: dict[str, str],
                 unused: list[str]) -> LoadReport:
    """Load with the LLM/vision parts that are not in ``sd`` declared as coming from elsewhere (``origins``)."""
    missing = [re.escape(prefix) + r"\..*" for prefix, where in origins.items() if where != source]
    report = load_into(model, sd, source, expected_missing=missing + _tied_missing(model, sd), expected_unused=unused)
    report.origins.update(origins)
    model.load_report = report
    return report


def load_original(sd: StateDict, source: str, arch: str | None = None, task: str | None = None,
                  llm: str | Path | None = None, vision_weights: str | Path | None = None, **overrides) -> nn.Module:
    """A LAVIS BLIP-2 LLM / InstructBLIP checkpoint -> model.

    llm: the HF directory of the frozen LLM (weights unless the file carries them, config, tokenizer).
    vision_weights: the frozen EVA file (``eva_vit_g.pth``) when the file has no ``visual_encoder.*`` keys.
    overrides: :class:`blip.models.blip2_llm.Blip2LLMConfig` fields (e.g. ``frozen_dtype="bf16"``).
    """
    guessed_arch, guessed_task = guess_arch(sd)
    arch, task = arch or guessed_arch, task or guessed_task
    name = _llm_name(sd)
    llm_keys = [k for k in sd if k.startswith(f"{name}_model.")]
    has_llm = any(k[len(name) + 7:] not in LLM_TIED_ALIASES for k in llm_keys)
    if not has_llm:  # only tied aliases of the frozen embeddings: the LLM comes from the llm= directory
        sd = {k: v for k, v in sd.items() if k not in llm_keys}
    if llm is None and not has_llm:
        raise CheckpointError(f"{source} carries no LLM weights (LAVIS saves only trainable parameters): pass "
                              "llm=<HF directory of the language model>")
    pos = sd.get("visual_encoder.pos_embed")
    vision = overrides.get("vision", blip2_llm.ARCHS[arch].vision)
    if pos is not None and pos.shape[1] - 1 != vision.num_patches:  # fine-tuned at another size (e.g. 364 px)
        overrides["vision"] = replace(vision, image_size=math.isqrt(pos.shape[1] - 1) * vision.patch_size)
    model = blip2_llm.create(arch, task, llm=llm, **overrides)
    out, used = lavis_to_ours(sd)
    origins = {"image_encoder.ln_vision": source, "qformer": source, "llm_proj": source,
               "llm": source if has_llm else str(llm), "image_encoder.visual_encoder": source}
    has_vit = any(k.startswith("image_encoder.visual_encoder.") for k in out)
    if has_vit and vision_weights is not None:
        raise CheckpointError(f"{source} carries its own visual_encoder weights (fine-tuned ViT); drop vision_weights=")
    if not has_vit:
        origins["image_encoder.visual_encoder"] = _add_vision_file(out, vision_weights, model.config.vision, source)
    stray = [k for k in sd if k not in used and not any(re.fullmatch(p, k) for p in LAVIS_ALWAYS_UNUSED)
             and not k.startswith("Qformer.cls.")]
    if stray:
        raise CheckpointError(f"{source}: keys this converter does not know: {stray[:8]}")
    _finish_load(model, out, source, origins, [])
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# HF directories

def hf_to_ours(sd: StateDict, instruct: bool) -> tuple[StateDict, set[str]]:
    """Pure key conversion of an HF ``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration``
    state dict -> (ours, consumed keys)."""
    out, used = hf_vision_to_ours(sd)
    qf_out, qf_used = hf_qformer_to_ours(sd, text_embeddings=None, embeddings=INSTRUCT_HF_EMB if instruct else None)
    out.update(qf_out)
    used |= qf_used
    for src, dst in (("language_projection.", "llm_proj."), ("language_model.", "llm.")):
        for k, v in sd.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = v
                used.add(k)
    return out, used


def hf_llm_config(hf, directory: Path | None = None, instruct: bool = False) -> "blip2_llm.Blip2LLMConfig":
    """HF Blip2Config / InstructBlipConfig -> :class:`Blip2LLMConfig` (the LLM from ``text_config``)."""
    vision, qf = hf.vision_config.to_dict(), hf.qformer_config.to_dict()
    has_tokenizer = directory is not None and any((Path(directory) / f).exists()
                                                  for f in ("tokenizer.json", "tokenizer_config.json"))
    return blip2_llm.Blip2LLMConfig(
        vision=hf_vision_config(vision), qformer=hf_qformer_config(qf, hf.num_query_tokens, text=instruct),
        llm=hf.text_config, ln_vision_eps=vision["layer_norm_eps"], tokenizer=directory if has_tokenizer else None,
        image_token_id=getattr(hf, "image_token_index", None) or getattr(hf, "image_token_id", None))


def _load_hf(directory: Path, instruct: bool, llm=None, vision_weights=None, **overrides) -> nn.Module:
    from transformers import AutoConfig
    directory = Path(directory)
    if llm is not None or vision_weights is not None:
        raise CheckpointError(f"{directory} is an HF directory that carries its ViT and LLM: drop llm= / "
                              "vision_weights=")
    cfg = hf_llm_config(hf_pretrained(AutoConfig, directory), directory, instruct)
    if "dtype" in overrides:
        overrides["frozen_dtype"] = overrides.pop("dtype")
    cfg = replace(cfg, **overrides)
    from ..models.blip2_llm_lm import load_llm
    cls = blip2_llm.InstructBlipLanguageModel if instruct else blip2_llm.Blip2LanguageModel
    model = build_empty(lambda: cls(cfg, llm=load_llm(cfg.llm, blip2_llm.DTYPES[cfg.frozen_dtype], cfg.llm_overrides)))
    sd = read_state_dict(directory)
    out, used = hf_to_ours(sd, instruct)
    stray = [k for k in sd if k not in used and not k.endswith("position_ids")]
    if stray:
        raise CheckpointError(f"{directory}: keys this converter does not know: {stray[:8]}")
    origins = {p: str(directory) for p in ("image_encoder", "qformer", "llm_proj", "llm")}
    _finish_load(model, out, str(directory), origins, [r".*position_ids"])
    return model.eval()


def load_hf_blip2(directory: Path, llm=None, **overrides) -> nn.Module:
    """An HF ``Blip2ForConditionalGeneration`` directory (OPT, T5 or any LLM) -> :class:`Blip2LanguageModel`."""
    return _load_hf(directory, instruct=False, **overrides)


def load_hf_instructblip(directory: Path, llm=None, **overrides) -> nn.Module:
    """An HF ``InstructBlipForConditionalGeneration`` directory -> :class:`InstructBlipLanguageModel`."""
    return _load_hf(directory, instruct=True, **overrides)


HF_LOADERS = {"Blip2ForConditionalGeneration": load_hf_blip2,
              "InstructBlipForConditionalGeneration": load_hf_instructblip}


def export_hf(model: nn.Module, directory: str | Path, image_token_index: int | None = None) -> Path:
    """Write a BLIP-2 LLM / InstructBLIP model as an HF ``Blip2ForConditionalGeneration`` /
    ``InstructBlipForConditionalGeneration`` directory (config.json + model.safetensors in fp32, + the LLM tokenizer).

    HF 5.x marks the query positions with a placeholder id in ``input_ids``: ``image_token_index`` (default: the id
    the model was loaded with; real HF checkpoints add ``<image>`` to the vocabulary). The generation eos (OPT "\n")
    becomes the text config's ``eos_token_id``. HF has one LayerNorm eps for the ViT and ``post_layernorm``: an
    ``ln_vision`` eps that differs (LAVIS 1e-5 vs EVA 1e-6) is logged (~1e-6 relative effect).
    """
    from safetensors.torch import save_file
    from transformers import Blip2Config, InstructBlipConfig
    cfg = model.config
    token = image_token_index if image_token_index is not None else cfg.image_token_id
    if token is None:
        raise ValueError("HF needs an image placeholder id in the LLM vocabulary: pass image_token_index=")
    if cfg.ln_vision_eps != cfg.vision.layer_norm_eps:
        log.warning("HF uses one layer_norm_eps: ln_vision eps %g is exported as %g", cfg.ln_vision_eps,
                    cfg.vision.layer_norm_eps)
    text = model.llm.config.to_dict()
    if model.eos_token_id is not None:
        text["eos_token_id"] = model.eos_token_id
    qformer = to_hf_qformer_config(cfg.qformer)
    config_cls, arch = ((InstructBlipConfig, "InstructBlipForConditionalGeneration") if model.instruct
                        else (Blip2Config, "Blip2ForConditionalGeneration"))
    hf = config_cls(vision_config=to_hf_vision_config(cfg.vision), qformer_config=qformer, text_config=text,
                    num_query_tokens=model.qformer.num_queries, image_token_index=token)
    hf.architectures = [arch]
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = ours_to_hf_vision(sd)
    emb = {v: k for k, v in INSTRUCT_HF_EMB.items()} if model.instruct else {v: k for k, v in HF_QFORMER_EMB.items()}
    out.update(ours_to_bert(sd, "qformer.transformer.", "qformer.", self_name="attention",
                            embeddings={k: v for v, k in emb.items()}))
    out["query_tokens"] = sd["qformer.query_tokens"]
    for src, dst in (("llm_proj.", "language_projection."), ("llm.", "language_model.")):
        out.update({dst + k[len(src):]: v for k, v in sd.items() if k.startswith(src)})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(directory))
    save_file({k: v.contiguous().clone() for k, v in out.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    if model.has_tokenizer():
        model.tokenizer.save_pretrained(str(directory))
    return directory


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

