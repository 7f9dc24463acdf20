"""The parts every BLIP-2 model shares, converted between LAVIS / EVA / CLIP / HF names and ours.

Pure ``state_dict -> state_dict`` converters for the frozen image encoder (``visual_encoder`` ViT + ``ln_vision``) and
the Q-Former (``query_tokens`` + BERT stack). Each takes the destination prefix of the module in our model, so any model
that holds a :class:`blip.models.qformer.FrozenImageEncoder` and a :class:`blip.models.qformer.QFormer` can use them:

- our image encoder keys: ``{dst}visual_encoder.*`` (EVA/timm names) and ``{dst}ln_vision.*``;
- our Q-Former keys: ``{dst}query_tokens`` and ``{dst}transformer.*`` (:class:`blip.nn.transformer.TextTransformer`).

Each ``*_to_ours`` returns ``(converted, consumed_source_keys)`` so callers can list what a file carried unused.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import CheckpointError, LoadReport, StateDict, load_into, read_state_dict
from ..models.qformer import QFormerConfig, qformer_config
from ..nn.vit import VisionConfig
from .bert import bert_to_ours, ours_to_bert
from .vit import VISION_PREFIX, clip_vit_to_ours, hf_vit_to_ours, is_clip_vit, ours_to_hf_vit, vision_file_to_ours

QFORMER_PREFIX = "qformer."        # ... and their QFormer
HF_QFORMER_EMB = {"layernorm": "embeddings.norm"}   # Blip2QFormerModel owns only the embedding LayerNorm

# LAVIS keys that carry nothing a blip model needs (buffers, tied aliases)
LAVIS_ALWAYS_UNUSED = [r"Qformer\.bert\.embeddings\.position_ids", r"Qformer\.cls\.predictions\.decoder\.(weight|bias)"]


def _split(sd: StateDict, src: str, dst: str) -> tuple[StateDict, set[str]]:
    out, used = {}, set()
    for k, v in sd.items():
        if k.startswith(src):
            out[dst + k[len(src):]] = v
            used.add(k)
    return out, used


# ---------------------------------------------------------------------------------------------------------------
# image encoder

def lavis_vision_to_ours(sd: StateDict, dst: str = VISION_PREFIX) -> tuple[StateDict, set[str]]:
    """LAVIS ``visual_encoder.*`` (EVA names = ours; CLIP ViT-L names converted) and ``ln_vision.*`` ->
    ``{dst}visual_encoder.*``, ``{dst}ln_vision.*``.

    fp16 EVA weights (LAVIS ``vit_precision="fp16"``) are returned as stored; ``load_into`` casts to the model dtype.
    """
    if is_clip_vit(sd, "visual_encoder."):
        out, used = clip_vit_to_ours(sd, dst, "visual_encoder.")
    else:
        out, used = _split(sd, "visual_encoder.", dst + "visual_encoder.")
    more, more_used = _split(sd, "ln_vision.", dst + "ln_vision.")
    out.update(more)
    return out, used | more_used


def vision_for_grid(vision: VisionConfig, pos_embed: torch.Tensor | None) -> VisionConfig:
    """A checkpoint with its own ViT decides the image size (e.g. 364 px for LAVIS COCO fine-tuning): ``vision``
    with the image size whose patch grid matches ``pos_embed`` [1, 1 + N, W] (unchanged without one)."""
    if pos_embed is None or pos_embed.shape[1] - 1 == vision.num_patches:
        return vision
    return replace(vision, image_size=math.isqrt(pos_embed.shape[1] - 1) * vision.patch_size)


def add_vision_weights(out: StateDict, vision_weights: str | Path | StateDict | None, vision: VisionConfig,
                       source: str) -> str:
    """Put the frozen ViT of a file saved without it into ``out`` (ours names) and return where it came from.

    vision_weights: ``eva_vit_g.pth`` / ``clip_vit_L.pth`` (a path, a ``blip.zoo`` name such as "blip2-eva-vit-g", or
    the state dict itself). LAVIS saves only trainable parameters, so its files lack the frozen ViT."""
    from ..zoo import PRETRAINED, resolve
    if vision_weights is None:
        from ..models.blip2 import QFORMER_ARCHS
        same_vit = {arch for arch, cfg in QFORMER_ARCHS.items() if cfg.vision.width == vision.width}
        files = [f"<{e.url.rsplit('/', 1)[-1]}> (or the zoo name '{name}')" for name, e in PRETRAINED.items()
                 if e.task == "vision" and e.arch in same_vit]
        raise CheckpointError(f"{source} has no visual_encoder.* weights (LAVIS saves only trainable parameters "
                              f"and the ViT is frozen): pass vision_weights={' or '.join(files) or '<its ViT file>'}")
    if isinstance(vision_weights, str) and not Path(vision_weights).exists():
        if vision_weights in PRETRAINED:   # e.g. "blip2-eva-vit-g" under $BLIP_HOME
            vision_weights = resolve(vision_weights)
    sd = vision_weights if isinstance(vision_weights, dict) else read_state_dict(vision_weights)
    try:
        out.update(vision_file_to_ours(sd, depth=vision.depth, num_patches=vision.num_patches))
    except CheckpointError as e:
        raise CheckpointError(f"{vision_weights}: {e}") from e
    return "<state dict>" if isinstance(vision_weights, dict) else str(vision_weights)


def hf_vision_to_ours(sd: StateDict, dst: str = VISION_PREFIX, qv_bias: bool = True) -> tuple[StateDict, set[str]]:
    """HF ``vision_model.*`` (Blip2VisionModel) -> ``{dst}visual_encoder.*``; ``post_layernorm`` -> ``{dst}ln_vision``.

    HF's fused ``qkv.bias`` = cat(q_bias, k_bias, v_bias) is split into EVA's q_bias/v_bias; its k part is dropped:
    a key bias adds the same amount to every logit of a query row, which softmax ignores.
    """
    out, used = hf_vit_to_ours(sd, "vision_model.", dst + "visual_encoder.", qv_bias=qv_bias)
    renamed = {}
    for k, v in out.items():
        if k.startswith(dst + "visual_encoder.norm."):
            k = dst + "ln_vision." + k[len(dst + "visual_encoder.norm."):]
        renamed[k] = v
    return renamed, used


def ours_to_hf_vision(sd: StateDict, src: str = VISION_PREFIX) -> StateDict:
    """Inverse of :func:`hf_vision_to_ours` (EVA q/v bias -> HF fused bias with a zero k part)."""
    vit = {k: v for k, v in sd.items() if k.startswith(src + "visual_encoder.")}
    out = ours_to_hf_vit(vit, src + "visual_encoder.", "vision_model.")
    for k, v in sd.items():
        if k.startswith(src + "ln_vision."):
            out["vision_model.post_layernorm." + k[len(src + "ln_vision."):]] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# Q-Former

def lavis_qformer_to_ours(sd: StateDict, dst: str = QFORMER_PREFIX) -> tuple[StateDict, set[str]]:
    """LAVIS ``query_tokens`` + ``Qformer.bert.*`` -> ``{dst}query_tokens`` + ``{dst}transformer.*``.

    Stage-2 files lack the word/position embeddings and the text FFN; the result then lacks them too (build the
    Q-Former with ``word_embeddings=False, text_ffn=False``). The LM head (``Qformer.cls``):
    :func:`lavis_lm_head_to_ours`.
    """
    out, used = bert_to_ours(sd, "Qformer.bert.", dst + "transformer.")
    if "query_tokens" in sd:
        out[dst + "query_tokens"] = sd["query_tokens"]
        used.add("query_tokens")
    used |= {k for k in sd if re.fullmatch(LAVIS_ALWAYS_UNUSED[0], k)}
    return out, used


def lavis_lm_head_to_ours(sd: StateDict, dst: str = "lm_head.") -> tuple[StateDict, set[str]]:
    """LAVIS ``Qformer.cls.predictions.{transform.dense, transform.LayerNorm, bias}`` -> :class:`LMHead` keys.

    ``decoder.weight`` / ``decoder.bias`` are tied aliases of the word embeddings / ``bias``; they are consumed and
    checked to be equal to what they alias (a file where they differ was not saved from a tied model).
    """
    src = "Qformer.cls.predictions."
    names = {"transform.dense.": "dense.", "transform.LayerNorm.": "norm."}
    out, used = {}, set()
    for k, v in sd.items():
        if not k.startswith(src):
            continue
        rest = k[len(src):]
        for s, d in names.items():
            if rest.startswith(s):
                out[dst + d + rest[len(s):]] = v
                used.add(k)
        if rest == "bias":
            out[dst + "bias"] = v
            used.add(k)
    _check_alias(sd, src + "decoder.weight", "Qformer.bert.embeddings.word_embeddings.weight", used)
    _check_alias(sd, src + "decoder.bias", src + "bias", used)
    return out, used


def _check_alias(sd: StateDict, alias: str, target: str, used: set[str]) -> None:
    if alias in sd and target in sd:
        a, t = sd[alias], sd[target]
        if not (a.is_meta or t.is_meta or torch.equal(a.float(), t.float())):  # meta: shapes-only checks
            raise CheckpointError(f"{alias} differs from {target}: BLIP-2 ties them; this file was not saved from a "
                                  "tied LAVIS model")
        used.add(alias)


def hf_qformer_to_ours(sd: StateDict, dst: str = QFORMER_PREFIX, text_embeddings: str | None = "embeddings.",
                       qformer_src: str = "qformer.", embeddings: dict[str, str] | None = None
                       ) -> tuple[StateDict, set[str]]:
    """HF ``query_tokens`` + ``qformer.*`` (+ Blip2ForImageTextRetrieval's top-level ``embeddings.*``) -> ours.

    text_embeddings: prefix of HF's separate ``Blip2TextEmbeddings`` (word/position embeddings), None if absent.
    embeddings: embedding-name map inside ``qformer_src`` (default: only ``layernorm``; InstructBLIP:
    ``{"embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings": "embeddings.position",
    "embeddings.layernorm": "embeddings.norm"}``).
    """
    out, used = bert_to_ours(sd, qformer_src, dst + "transformer.", self_name="attention",
                             embeddings=embeddings if embeddings is not None else HF_QFORMER_EMB)
    if "query_tokens" in sd:
        out[dst + "query_tokens"] = sd["query_tokens"]
        used.add("query_tokens")
    if text_embeddings is not None:
        for s, d in (("word_embeddings", "embeddings.word"), ("position_embeddings", "embeddings.position")):
            k = f"{text_embeddings}{s}.weight"
            if k in sd:
                out[f"{dst}transformer.{d}.weight"] = sd[k]
                used.add(k)
        used |= {k for k in sd if k == f"{text_embeddings}position_ids"}
    return out, used


def ours_to_hf_qformer(sd: StateDict, src: str = QFORMER_PREFIX, text_embeddings: str | None = "embeddings.",
                       qformer_dst: str = "qformer.") -> StateDict:
    """Inverse of :func:`hf_qformer_to_ours` (split fused q/k/v and k/v projections back into BERT names)."""
    out = ours_to_bert(sd, src + "transformer.", qformer_dst, self_name="attention", embeddings=HF_QFORMER_EMB)
    if src + "query_tokens" in sd:
        out["query_tokens"] = sd[src + "query_tokens"]
    if text_embeddings is not None:
        for s, d in (("word_embeddings", "embeddings.word"), ("position_embeddings", "embeddings.position")):
            k = f"{src}transformer.{d}.weight"
            if k in sd:
                out[f"{text_embeddings}{s}.weight"] = sd[k]
    return out


def is_lavis_blip2(sd: StateDict) -> bool:
    """True for any LAVIS BLIP-2 / InstructBLIP checkpoint (stage 1, stage 2, fine-tuned)."""
    return "query_tokens" in sd or any(k.startswith("Qformer.") for k in sd)


def is_lavis_stage2(sd: StateDict) -> bool:
    """True when the file belongs to an LLM model (projection or LLM weights present)."""
    return any(k.startswith(p) for k in sd for p in ("opt_proj.", "t5_proj.", "llm_proj.", "opt_model.",
                                                     "t5_model.", "llm_model."))




# ---------------------------------------------------------------------------------------------------------------
# HF configs (dicts from ``config.to_dict()``, i.e. with HF's defaults filled in)

def hf_vision_config(v: dict) -> VisionConfig:
    """HF Blip2VisionConfig / InstructBlipVisionConfig -> our EVA-style VisionConfig (no final norm: HF's
    ``post_layernorm`` is ``ln_vision``, whose eps is the same ``layer_norm_eps``)."""
    act = {"gelu": "gelu", "quick_gelu": "quick_gelu"}.get(v.get("hidden_act", "gelu"))
    if act is None:
        raise CheckpointError(f"vision hidden_act {v.get('hidden_act')!r} is not supported (gelu, quick_gelu)")
    return VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
                        depth=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
                        qkv_bias="qv" if v.get("qkv_bias", True) else "none", final_norm=False,
                        layer_norm_eps=v["layer_norm_eps"], act=act)


def hf_qformer_config(q: dict, num_query_tokens: int, text: bool = True) -> QFormerConfig:
    """HF Blip2QFormerConfig -> ours. text: keep word/position embeddings and the text FFN (retrieval, InstructBLIP)."""
    cfg = qformer_config(encoder_width=q["encoder_hidden_size"], vocab_size=q["vocab_size"],
                         hidden_size=q["hidden_size"], num_layers=q["num_hidden_layers"],
                         num_heads=q["num_attention_heads"], intermediate_size=q["intermediate_size"],
                         max_position_embeddings=q["max_position_embeddings"], layer_norm_eps=q["layer_norm_eps"],
                         cross_attention_freq=q["cross_attention_frequency"], hidden_dropout=q["hidden_dropout_prob"],
                         attention_dropout=q["attention_probs_dropout_prob"], word_embeddings=text, text_ffn=text)
    return QFormerConfig(cfg, num_query_tokens)


def to_hf_vision_config(cfg: VisionConfig) -> dict:
    """Inverse of :func:`hf_vision_config` for EVA-style ViTs (CLIP ViT-L has no HF Blip2VisionModel form)."""
    if cfg.pre_norm or not cfg.patch_bias or cfg.final_norm or cfg.act != "gelu":
        raise CheckpointError("only EVA-style ViTs (no pre-norm, patch bias, GELU) have an HF Blip2VisionModel form")
    return dict(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                layer_norm_eps=cfg.layer_norm_eps, qkv_bias=cfg.qkv_bias == "qv", hidden_act="gelu")


def to_hf_qformer_config(cfg: QFormerConfig) -> dict:
    t = cfg.text
    return dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
                max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                cross_attention_frequency=t.cross_attention_freq, encoder_hidden_size=t.encoder_width,
                hidden_dropout_prob=t.hidden_dropout, attention_probs_dropout_prob=t.attention_dropout,
                use_qformer_text_input=t.text_ffn)


# ---------------------------------------------------------------------------------------------------------------
# loading with every key accounted for

def tied_missing(model: nn.Module, sd: StateDict) -> list[str]:
    """Model keys absent from ``sd`` that alias (share storage with) a key present in it (tied LM heads)."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight is one Parameter (meta too)
    present = {id(params[k]) for k in sd if k in params}
    return [re.escape(k) for k, p in params.items() if k not in sd and id(p) in present]


def load_parts(model: nn.Module, sd: StateDict, source: str, origins: dict[str, str],
               unused: list[str] | None = None) -> LoadReport:
    """Load ``sd`` (ours names) into ``model``; the parts ``origins`` names with another file than ``source`` (the
    frozen ViT / LLM) are expected to be absent. Sets ``model.load_report`` (with ``origins``)."""
    missing = [re.escape(prefix) + r"\..*" for prefix, where in origins.items() if where != source]
    report = load_into(model, sd, source, expected_missing=missing + tied_missing(model, sd),
                       expected_unused=unused or [])
    report.origins.update(origins)
    model.load_report = report
    return report
