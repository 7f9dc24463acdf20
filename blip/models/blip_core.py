"""BLIP building blocks shared by the task models: the config, the MED decoder and its decoding step.

The ViT and the BERT-style stack are the library's one :class:`~blip.nn.vit.VisionTransformer` and one
:class:`~blip.nn.transformer.TextTransformer`; this file only wires them the BLIP way.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..generation import GenerationConfig, generate
from ..nn.transformer import LMHead, TextConfig, TextTransformer, check_length
from ..nn.vit import VisionConfig, VisionTransformer
from .family import Family
from .structure import InferenceModel


@dataclass
class BlipConfig:
    """One BLIP model: ViT + MED text stack (+ ITC projection size) and the special token ids it decodes with."""
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(image_size=384))
    text: TextConfig = field(default_factory=TextConfig)   # encoder_width = vision width (image cross-attention)
    embed_dim: int = 256                                   # ITC projection size (vision_proj / text_proj)
    bos_token_id: int = 30522                              # [DEC]: first token of every decoder input
    sep_token_id: int = 102                                # [SEP]: eos of generation
    pad_token_id: int = 0
    cls_token_id: int = 101
    enc_token_id: int = 30523                              # [ENC]: first token of ITM / VQA question inputs

    def __post_init__(self):
        if self.text.encoder_width != self.vision.width:
            self.text = replace(self.text, encoder_width=self.vision.width)

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    def with_overrides(self, **overrides: Any) -> "BlipConfig":
        """``image_size=``, ``vision={...}``, ``text={...}`` or any top-level field -> a new config."""
        vision = replace(self.vision, **overrides.pop("vision", {}))
        if "image_size" in overrides:
            vision = replace(vision, image_size=overrides.pop("image_size"))
        text = replace(self.text, **overrides.pop("text", {}))
        return replace(self, vision=vision, text=text, **overrides)


def build_vit(cfg: BlipConfig) -> VisionTransformer:
    return VisionTransformer(cfg.vision)


class BlipModel(InferenceModel, nn.Module):
    """Base of the BLIP task models: holds ``cfg``; switches gradient checkpointing in every tower at once."""

    family = Family.BLIP
    compile_decoding = False   # generate()'s default for compile= (blip.load(compile=True) sets it)

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.cfg = cfg


class TextDecoder(nn.Module):
    """MED decoder: causal :class:`TextTransformer` with cross-attention + BERT LM head tied to its word embeddings.

    forward(input_ids [B, T], attention_mask [B, T], encoder_hidden_states [B', S, E] | cross_kv, ...) -> logits
    [B, T, vocab]; B = B' * beam_group.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transformer = TextTransformer(cfg)
        self.lm_head = LMHead(cfg, self.transformer.embeddings.word)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                      encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                      cross_kv: list | None = None, beam_group: int = 1) -> Tensor:
        """The last layer's states [B, T, D] before the LM head (training applies the head to target positions only,
        see :func:`blip.losses.lm_loss_from_hidden`)."""
        return self.transformer(input_ids, attention_mask=attention_mask, causal=True,
                                encoder_hidden_states=encoder_hidden_states,
                                encoder_attention_mask=encoder_attention_mask, cross_kv=cross_kv, beam_group=beam_group)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """As :meth:`hidden_states` (same keyword arguments) -> logits [B, T, vocab]."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, **kwargs))


class DecoderStep:
    """The ``step``/``reorder`` protocol of :func:`blip.generation.generate` over a :class:`TextDecoder`.

    The cross-attention K/V of the encoder states are computed once and shared by the ``group`` beams of each
    example; the self-attention cache is preallocated for ``max_length`` positions.
    """

    def __init__(self, decoder: TextDecoder, encoder_states: Tensor, encoder_mask: Tensor | None, group: int,
                 max_length: int):
        self.decoder, self.group, self.encoder_mask = decoder, group, encoder_mask
        self.cross_kv = decoder.transformer.cross_kv(encoder_states)
        self.cache = decoder.transformer.new_cache(encoder_states.shape[0] * group, max_length)

    def __call__(self, new_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.decoder.transformer(new_ids, attention_mask=attention_mask, causal=True, cross_kv=self.cross_kv,
                                     encoder_attention_mask=self.encoder_mask, beam_group=self.group, cache=self.cache)
        return self.decoder.lm_head(h[:, -1])

    def reorder(self, index: Tensor) -> None:
        self.cache.reorder(index)

    def mark_static(self) -> None:
        self.cache.mark_static()


GENERATE_DEFAULTS = dict(max_new_tokens=20, min_new_tokens=0, num_beams=1, do_sample=False, top_p=1.0, top_k=0,
                         temperature=1.0, repetition_penalty=1.0, length_penalty=1.0, early_stopping=False,
                         beam_length_convention="generated", compile=False, stop_check_every=0)


def decode(decoder: TextDecoder, cfg: BlipConfig, encoder_states: Tensor, encoder_mask: Tensor | None,
           input_ids: Tensor | None, attention_mask: Tensor | None, generator: torch.Generator | None = None,
           **options: Any) -> Tensor:
    """Generate from ``input_ids`` [B, T] (default: ``[bos]``) conditioned on ``encoder_states`` [B, S, E].

    options: the :class:`~blip.generation.GenerationConfig` fields (see ``GENERATE_DEFAULTS``). eos = [SEP],
    pad = [PAD] from ``cfg``. Returns [B, T + n] ids, n <= max_new_tokens.
    """
    unknown = set(options) - set(GENERATE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown generation options {sorted(unknown)}; known: {sorted(GENERATE_DEFAULTS)}")
    gen = GenerationConfig(**{**GENERATE_DEFAULTS, **options}, eos_token_id=cfg.sep_token_id,
                           pad_token_id=cfg.pad_token_id)
    b = encoder_states.shape[0]
    if input_ids is None:
        input_ids = torch.full((b, 1), cfg.bos_token_id, dtype=torch.long, device=encoder_states.device)
    if input_ids.shape[0] != b:
        raise ValueError(f"{input_ids.shape[0]} prompts for {b} images: pass one prompt row per image")
    check_length(input_ids.shape[1] + gen.max_new_tokens, cfg.text.max_position_embeddings, "prompt + max_new_tokens")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    group = gen.num_beams
    ids, mask = input_ids.repeat_interleave(group, 0), attention_mask.repeat_interleave(group, 0)
    step = DecoderStep(decoder, encoder_states, encoder_mask, group, input_ids.shape[1] + gen.max_new_tokens)
    return generate(step, ids, mask, gen, reorder=step.reorder, generator=generator)


@dataclass
class BlipOutput:
    """logits: [B, T, vocab] for the T decoder positions; image_embeds: [B, 1 + N, W] ViT tokens;
    question_states: [B, Tq, D] (VQA only)."""
    logits: Tensor
    image_embeds: Tensor
    question_states: Tensor | None = None
