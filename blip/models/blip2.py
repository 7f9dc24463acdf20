"""The BLIP-2 family's named architectures: stage-1 Q-Former models and stage-2 / InstructBLIP LLM models.

Only configurations live here (no transformers import): the models are :class:`blip.models.blip2_qformer.Blip2Qformer`
(stage 1) and :mod:`blip.models.blip2_llm` (frozen LLM); :mod:`blip.registry` maps ``(arch, task)`` to them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..nn.vit import VisionConfig
from .blip2_qformer import Blip2QformerConfig
from .qformer import CLIP_VIT_L, EVA_VIT_G, QFormerConfig, qformer_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# LAVIS's zero-shot BLIP-2 VQA template (its eval configs); a VQA run records its own in question_prompt
LAVIS_QUESTION_PROMPT = "Question: {} Short answer:"

# tiny EVA (image 56 px, patch 14) shared by every tiny BLIP-2 arch
TINY_VISION = VisionConfig(image_size=56, patch_size=14, width=48, depth=2, heads=4, mlp_dim=209, qkv_bias="qv",
                           final_norm=False, layer_norm_eps=1e-6)

QFORMER_ARCHS: dict[str, Blip2QformerConfig] = {
    "blip2_vitg_qformer": Blip2QformerConfig(vision=EVA_VIT_G, qformer=QFormerConfig(qformer_config(1408), 32),
                                             embed_dim=256),
    "blip2_vitL_qformer": Blip2QformerConfig(vision=CLIP_VIT_L, qformer=QFormerConfig(qformer_config(1024), 32),
                                             embed_dim=256),
    # tests and the training default; same ViT and Q-Former sizes as blip2_tiny_opt / blip2_tiny_t5, so a tiny
    # stage-1 run initialises a tiny stage-2 run. No dropout: from random init the image- and text-dependent part
    # of the embeddings is ~1% of their scale, and dropout noise of 0.1 drowned it (ITC stayed at chance)
    "blip2_tiny_qformer": Blip2QformerConfig(
        vision=TINY_VISION,
        qformer=QFormerConfig(qformer_config(48, hidden_size=32, num_heads=4, num_layers=4, intermediate_size=128,
                                             hidden_dropout=0.0, attention_dropout=0.0), 8),
        embed_dim=24),
}


def qformer_arch_of_widths(query_width: int, image_width: int) -> str | None:
    """The Q-Former arch whose query tokens and image features have these widths; None when none (or several) do."""
    found = [arch for arch, cfg in QFORMER_ARCHS.items()
             if (cfg.qformer.text.hidden_size, cfg.vision.width) == (query_width, image_width)]
    return found[0] if len(found) == 1 else None


def qformer_arch_config(arch: str, **overrides) -> Blip2QformerConfig:
    """The config of a Q-Former arch with top-level fields replaced (e.g. ``freeze_vit=False``,
    ``vit_dtype="bf16"``)."""
    if arch not in QFORMER_ARCHS:
        raise KeyError(f"unknown BLIP-2 Q-Former arch {arch!r}; known: {sorted(QFORMER_ARCHS)}")
    cfg = QFORMER_ARCHS[arch]
    if "image_size" in overrides:   # e.g. 364 for fine-tuning: the position embedding gets that grid
        vision = overrides.get("vision", cfg.vision)
        overrides["vision"] = dataclasses.replace(vision, image_size=overrides.pop("image_size"))
    return dataclasses.replace(cfg, **overrides)


def _llm_qformer(image_width: int = EVA_VIT_G.width) -> QFormerConfig:
    """The bert-base Q-Former of the real-size LLM archs on image features of this width: stage 1's without its text
    parts (word embeddings, text FFN), which stage-2 models do not use."""
    return QFormerConfig(qformer_config(image_width, word_embeddings=False, text_ffn=False))


@dataclass
class Blip2LLMConfig:
    vision: VisionConfig = field(default_factory=lambda: EVA_VIT_G)
    qformer: QFormerConfig = field(default_factory=_llm_qformer)
    llm: str | Path | dict | PretrainedConfig | None = None  # HF directory (real archs: llm=...) or a config
    llm_overrides: dict = field(default_factory=dict)  # e.g. LAVIS FlanT5: {"dense_act_fn": "gelu"}
    tokenizer: str | Path | None = None   # LLM tokenizer directory (default: ``llm`` when it is a directory)
    eos: str | int | None = None          # "\n" (OPT convention: the id of "\n"), an id, or None: the LLM's eos
    prompt: str = ""                      # default caption prompt
    question_prompt: str | None = None    # the VQA template a run trained with; None: LAVIS_QUESTION_PROMPT
    generation: dict = field(default_factory=dict)  # this checkpoint's caption defaults (num_beams, min_new_tokens..)
    ln_vision_eps: float = 1e-5           # LAVIS 1e-5; HF post_layernorm uses the vision layer_norm_eps
    frozen_dtype: str | torch.dtype | None = None  # storage dtype of the frozen ViT + LLM ("bf16", "fp16"); None: fp32
    image_token_id: int | None = None     # HF placeholder id, rejected in input_ids (queries are prepended inside)
    llm_train_mode: bool = False          # True: the frozen LLM follows model.train() (dropout on), as in LAVIS
    freeze_vit: bool = True               # False: the ViT trains, in fp32 (LAVIS fine-tuning, ``freeze_vit: False``)


def _tiny_llm_qformer() -> QFormerConfig:
    """The tiny stage-1 Q-Former without its text parts (stage-2 models keep only what the queries use)."""
    return QFormerConfig(qformer_config(encoder_width=48, hidden_size=32, num_layers=4, num_heads=4,
                                        intermediate_size=128, word_embeddings=False, text_ffn=False), 8)


TINY_OPT = dict(model_type="opt", vocab_size=512, hidden_size=48, num_hidden_layers=2, ffn_dim=96,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=48, do_layer_norm_before=True,
                activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2)
TINY_T5 = dict(model_type="t5", vocab_size=416, d_model=40, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
               num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
               pad_token_id=0, eos_token_id=1)
TINY_LLAMA = dict(model_type="llama", vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
_T5_GELU = {"dense_act_fn": "gelu"}  # LAVIS builds FlanT5 with exact GELU (HF's gated-gelu means gelu_new)

LLM_ARCHS: dict[str, Blip2LLMConfig] = {
    "blip2_vitg_opt2.7b": Blip2LLMConfig(eos="\n"),
    "blip2_vitg_opt6.7b": Blip2LLMConfig(eos="\n"),
    "blip2_vitg_flant5xl": Blip2LLMConfig(llm_overrides=_T5_GELU),
    "blip2_vitg_flant5xxl": Blip2LLMConfig(llm_overrides=_T5_GELU),
    # the paper's ViT-L row: LAVIS's CLIP ViT-L/14 (the stage-1 blip2_vitL_qformer's) under the Q-Former
    "blip2_vitL_flant5xl": Blip2LLMConfig(CLIP_VIT_L, _llm_qformer(CLIP_VIT_L.width), llm_overrides=_T5_GELU),
    "instructblip_vicuna7b": Blip2LLMConfig(),
    "instructblip_flant5xl": Blip2LLMConfig(llm_overrides=_T5_GELU),
    "blip2_tiny_opt": Blip2LLMConfig(TINY_VISION, _tiny_llm_qformer(), llm=TINY_OPT, eos="\n"),
    "blip2_tiny_t5": Blip2LLMConfig(TINY_VISION, _tiny_llm_qformer(), llm=TINY_T5, llm_overrides=_T5_GELU),
    "blip2_tiny_llama": Blip2LLMConfig(TINY_VISION, _tiny_llm_qformer(), llm=TINY_LLAMA),
}


def llm_arch_of_sizes(model_type: str, query_width: int, llm_width: int) -> str | None:
    """The LLM arch that carries its LLM config (not an HF directory) with this model type, Q-Former width and LLM
    width; None when none (or several) do. Archs of released sizes are told apart by their converters."""
    def sizes(cfg: Blip2LLMConfig) -> tuple:
        llm_width = cfg.llm.get("hidden_size", cfg.llm.get("d_model"))
        return cfg.llm["model_type"], cfg.qformer.text.hidden_size, llm_width

    found = [arch for arch, cfg in LLM_ARCHS.items()
             if isinstance(cfg.llm, dict) and sizes(cfg) == (model_type, query_width, llm_width)]
    return found[0] if len(found) == 1 else None
