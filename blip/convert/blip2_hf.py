"""HF transformers BLIP-2 directories <-> blip's BLIP-2 models.

- ``Blip2ForImageTextRetrieval`` <-> :class:`blip.models.blip2_qformer.Blip2Qformer` (stage 1; HF has no ITG head
  and no temperature);
- ``Blip2ForConditionalGeneration`` (OPT, T5, any LLM) / ``InstructBlipForConditionalGeneration`` <->
  :mod:`blip.models.blip2_llm` models.

Where each part comes from (``model.load_report.origins``): ``image_encoder.visual_encoder`` <- ``vision_model.*``,
``image_encoder.ln_vision`` <- ``vision_model.post_layernorm``, ``qformer`` <- ``query_tokens`` + ``qformer.*``
(+ ``embeddings.*`` for retrieval), heads <- ``vision_projection`` / ``text_projection`` / ``itm_head``,
``llm_proj`` <- ``language_projection``, ``llm`` <- ``language_model.*``.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..checkpoints import (CheckpointError, StateDict, build_empty, hf_pretrained, load_into, read_state_dict,
                           write_hf_directory)
from ..dtypes import to_dtype
from ..models import blip2_llm
from ..models.blip2 import Blip2LLMConfig
from ..models.blip2_qformer import Blip2Qformer, Blip2QformerConfig
from ..models.frozen_llm import load_llm
from .bert import ours_to_bert
from .blip2_parts import (HF_QFORMER_EMB, hf_qformer_config, hf_qformer_to_ours, hf_vision_config, hf_vision_to_ours,
                          load_parts, ours_to_hf_qformer, ours_to_hf_vision, to_hf_qformer_config,
                          to_hf_vision_config)

log = logging.getLogger(__name__)
HF_HEADS = {"vision_projection.": "vision_proj.", "text_projection.": "text_proj.", "itm_head.": "itm_head."}
INSTRUCT_HF_EMB = {"embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings":
                   "embeddings.position", "embeddings.layernorm": "embeddings.norm"}


# ---------------------------------------------------------------------------------------------------------------
# stage 1: Blip2ForImageTextRetrieval

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
        raise CheckpointError(f"{directory}: an HF Blip2ForImageTextRetrieval directory carries its ViT and has no "
                              "LLM: drop llm= / vision_weights=")
    hf = hf_pretrained(AutoConfig, directory)
    v, q = hf.vision_config.to_dict(), hf.qformer_config.to_dict()
    if not q.get("use_qformer_text_input", False):
        raise CheckpointError(f"{directory}: qformer_config.use_qformer_text_input is false: no text side to load")
    cfg = Blip2QformerConfig(vision=hf_vision_config(v), qformer=hf_qformer_config(q, hf.num_query_tokens),
                             embed_dim=hf.image_text_hidden_size, ln_vision_eps=v["layer_norm_eps"])
    model = Blip2Qformer(replace(cfg, **overrides))
    sd = read_state_dict(directory)
    out, used = hf_retrieval_to_ours(sd)
    stray = [k for k in sd if k not in used and not k.endswith("position_ids")]
    if stray:
        raise CheckpointError(f"{directory}: keys a Blip2ForImageTextRetrieval checkpoint does not have: {stray[:8]}")
    report = load_into(model, out, str(directory), expected_missing=[r"lm_head\..*", r"temp"])
    report.origins.update({p: str(directory) for p in ("image_encoder", "qformer", "vision_proj", "text_proj",
                                                       "itm_head")})
    model.load_report = report
    model.has_lm_head = False
    return model.eval()


def hf_retrieval_to_ours(sd: StateDict) -> tuple[StateDict, set[str]]:
    """Pure key conversion of an HF ``Blip2ForImageTextRetrieval`` state dict -> (ours, consumed keys)."""
    out, used = hf_vision_to_ours(sd)
    qf, qf_used = hf_qformer_to_ours(sd)
    out.update(qf)
    used |= qf_used
    for k, value in sd.items():
        for src, dst in HF_HEADS.items():
            if k.startswith(src):
                out[dst + k[len(src):]] = value
                used.add(k)
    return out, used


def to_hf_state_dict(model: Blip2Qformer) -> StateDict:
    """Our weights under HF ``Blip2ForImageTextRetrieval`` names, float32 (no ``lm_head``, no ``temp``)."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = ours_to_hf_vision(sd)
    out.update(ours_to_hf_qformer(sd))
    for src, dst in HF_HEADS.items():
        out.update({src + k[len(dst):]: v for k, v in sd.items() if k.startswith(dst)})
    return out


def export_hf_qformer(model: Blip2Qformer, directory: str | Path) -> Path:
    """Write ``model`` as an HF ``Blip2ForImageTextRetrieval`` directory (config.json + model.safetensors, fp32).

    Dropped (HF has no place for them): ``lm_head`` (the ITG head) and ``temp``. HF uses one LayerNorm eps for the
    ViT blocks and ``post_layernorm``: the ViT's is written; an ``ln_vision`` eps that differs (LAVIS 1e-5 vs EVA's
    1e-6) is logged, its effect is ~1e-6 relative.
    """
    from transformers import Blip2Config
    cfg = model.cfg
    if cfg.ln_vision_eps != cfg.vision.layer_norm_eps:
        log.warning("HF Blip2VisionModel has one layer_norm_eps: ln_vision eps %g is exported as %g",
                    cfg.ln_vision_eps, cfg.vision.layer_norm_eps)
    hf = Blip2Config(vision_config=to_hf_vision_config(cfg.vision), qformer_config=to_hf_qformer_config(cfg.qformer),
                     num_query_tokens=model.num_queries, image_text_hidden_size=cfg.embed_dim)
    hf.architectures = ["Blip2ForImageTextRetrieval"]
    return write_hf_directory(directory, hf, to_hf_state_dict(model))


# ---------------------------------------------------------------------------------------------------------------
# stage 2 / InstructBLIP: Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

def hf_llm_to_ours(sd: StateDict, instruct: bool) -> tuple[StateDict, set[str]]:
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


def hf_llm_config(hf, directory: Path | None = None, instruct: bool = False) -> Blip2LLMConfig:
    """HF Blip2Config / InstructBlipConfig -> :class:`Blip2LLMConfig` (the LLM from ``text_config``)."""
    vision, qf = hf.vision_config.to_dict(), hf.qformer_config.to_dict()
    has_tokenizer = directory is not None and any((Path(directory) / f).exists()
                                                  for f in ("tokenizer.json", "tokenizer_config.json"))
    return Blip2LLMConfig(
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
    cls = blip2_llm.InstructBlipLanguageModel if instruct else blip2_llm.Blip2LanguageModel
    model = build_empty(lambda: cls(cfg, llm=load_llm(cfg.llm, to_dtype(cfg.frozen_dtype), cfg.llm_overrides)))
    sd = read_state_dict(directory)
    out, used = hf_llm_to_ours(sd, instruct)
    stray = [k for k in sd if k not in used and not k.endswith("position_ids")]
    if stray:
        raise CheckpointError(f"{directory}: keys this converter does not know: {stray[:8]}")
    origins = {p: str(directory) for p in ("image_encoder", "qformer", "llm_proj", "llm")}
    load_parts(model, out, str(directory), origins, [r".*position_ids"])
    return model.eval()


def load_hf_blip2(directory: Path, llm=None, **overrides) -> nn.Module:
    """An HF ``Blip2ForConditionalGeneration`` directory (OPT, T5 or any LLM) -> :class:`Blip2LanguageModel`."""
    return _load_hf(directory, instruct=False, **overrides)


def load_hf_instructblip(directory: Path, llm=None, **overrides) -> nn.Module:
    """An HF ``InstructBlipForConditionalGeneration`` directory -> :class:`InstructBlipLanguageModel`."""
    return _load_hf(directory, instruct=True, **overrides)


def export_hf_llm(model: nn.Module, directory: str | Path, image_token_index: int | None = None) -> Path:
    """Write a BLIP-2 LLM / InstructBLIP model as an HF ``Blip2ForConditionalGeneration`` /
    ``InstructBlipForConditionalGeneration`` directory (config.json + model.safetensors in fp32, + the LLM tokenizer).

    HF 5.x marks the query positions with a placeholder id in ``input_ids``: ``image_token_index`` (default: the id
    the model was loaded with, else :func:`spare_image_token_id`, logged). The generation eos (OPT "\n") becomes
    the text config's ``eos_token_id``. HF has one LayerNorm eps for the ViT and ``post_layernorm``: an
    ``ln_vision`` eps that differs (LAVIS 1e-5 vs EVA 1e-6) is logged (~1e-6 relative effect).
    """
    from transformers import Blip2Config, InstructBlipConfig
    cfg = model.config
    token = image_token_index if image_token_index is not None else cfg.image_token_id
    if token is None:
        token = spare_image_token_id(model)
        if token is None:
            raise ValueError("HF marks the image queries with an id of the LLM vocabulary and this model has none "
                             "to spare (no LLM tokenizer, or no embedding row beyond its vocabulary): pass "
                             "image_token_index=<id> (an id whose embedding row no text uses)")
        log.warning("image_token_index=%d: the LLM embedding row after the tokenizer's vocabulary, where HF's "
                    "Blip2Processor puts <image>", token)
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
    directory = write_hf_directory(directory, hf, out)
    if model.has_tokenizer():
        model.tokenizer.save_pretrained(str(directory))
    return directory


def spare_image_token_id(model: nn.Module) -> int | None:
    """The id HF's ``Blip2Processor`` / ``InstructBlipProcessor`` give ``<image>`` with this model's LLM tokenizer: the
    token's own id where the tokenizer has it, else the next id (``len(tokenizer)``, the processor adds the token)
    when the LLM's embedding has that row spare (HF's released OPT and T5 have rows beyond their vocabulary; the
    queries' embeddings replace that row's wherever the id appears). None without a tokenizer or a spare row."""
    if not model.has_tokenizer():
        return None
    tokenizer = model.tokenizer
    name = str(getattr(tokenizer, "image_token", None) or "<image>")
    if name in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(name)
    free = len(tokenizer)
    return free if free < model.llm.get_input_embeddings().num_embeddings else None


HF_LOADERS = {"Blip2ForImageTextRetrieval": load_hf_retrieval, "Blip2ForConditionalGeneration": load_hf_blip2,
              "InstructBlipForConditionalGeneration": load_hf_instructblip}
