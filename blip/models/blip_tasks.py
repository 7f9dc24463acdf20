"""BLIP (v1) task models: captioner, retrieval (ITC + ITM), VQA (generate and rank), feature extractor.

All take preprocessed ``pixel_values`` [B, 3, H, W] and token ids exactly as given (no token is added,
replaced or dropped here); the string conveniences in :mod:`blip.models.blip_strings` apply BLIP's conventions.
Module names follow LAVIS's top level (``visual_encoder``, ``text_encoder``, ``text_decoder``, ``vision_proj``,
``text_proj``, ``itm_head``) so checkpoints convert by prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.transformer import TextTransformer
from .blip_core import BlipConfig, BlipModel, BlipOutput, TextDecoder, build_vit, decode
from .blip_strings import CaptionStrings, MatchStrings, VQAStrings


class BlipCaption(CaptionStrings, BlipModel):
    """Image captioning: ViT -> MED decoder (causal self-attention, cross-attention to all image tokens)."""

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.visual_encoder = build_vit(cfg)
        self.text_decoder = TextDecoder(cfg.text)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> BlipOutput:
        """pixel_values [B, 3, H, W], input_ids [B, T] (``[DEC] ...``) -> BlipOutput(logits [B, T, vocab])."""
        hidden, image_embeds = self.decoder_states(pixel_values, input_ids, attention_mask)
        return BlipOutput(logits=self.text_decoder.lm_head(hidden), image_embeds=image_embeds)

    def decoder_states(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
        """As :meth:`forward` before the LM head -> (decoder states [B, T, D], image_embeds [B, 1+N, W])."""
        image_embeds = self.visual_encoder(pixel_values)
        return self.text_decoder.hidden_states(input_ids, attention_mask, encoder_hidden_states=image_embeds), \
            image_embeds

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 *, generator: torch.Generator | None = None, **options) -> Tensor:
        """Caption ids [B, T + n]: the prompt ``input_ids`` [B, T] (default ``[DEC]``; no trailing [SEP]) + new tokens.

        options: max_new_tokens=20, min_new_tokens=0, num_beams=1, do_sample=False, top_p=1.0, top_k=0,
        temperature=1.0, repetition_penalty=1.0, length_penalty=1.0, early_stopping=False,
        beam_length_convention="generated" ("total": the transformers 4.2x beam scores original BLIP / LAVIS ran),
        compile (default ``model.compile_decoding``, set by ``blip.load(compile=True)``: the decode loop under
        torch.compile, CUDA graphs on GPU; the same ids), stop_check_every=0.
        """
        image_embeds = self.visual_encoder(pixel_values)
        options.setdefault("compile", self.compile_decoding)
        return decode(self.text_decoder, self.cfg, image_embeds, None, input_ids, attention_mask, generator, **options)


@dataclass
class FeatureOutput:
    """LAVIS ``extract_features`` fields. image_embeds [B, 1+N, W], image_embeds_proj [B, 1+N, E] (normalized),
    text_embeds [B, T, D], text_embeds_proj [B, T, E] (normalized), multimodal_embeds [B, T, D]."""
    image_embeds: Tensor | None = None
    image_embeds_proj: Tensor | None = None
    text_embeds: Tensor | None = None
    text_embeds_proj: Tensor | None = None
    multimodal_embeds: Tensor | None = None


class BlipFeatureExtractor(BlipModel):
    """ViT + MED text encoder + ITC projections: image, text and image-grounded (multimodal) embeddings."""

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.visual_encoder = build_vit(cfg)
        self.text_encoder = TextTransformer(cfg.text)
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim)

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> ViT tokens [B, 1 + N, W]."""
        return self.visual_encoder(pixel_values)

    def text_embeds(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Unimodal text encoder (bidirectional, no image; ids start with [CLS]) -> [B, T, D]."""
        return self.text_encoder(input_ids, attention_mask=attention_mask)

    def multimodal_embeds(self, image_embeds: Tensor, input_ids: Tensor,
                          attention_mask: Tensor | None = None) -> Tensor:
        """Image-grounded text encoder (ids start with [ENC]); image_embeds [B, 1+N, W] -> [B, T, D]."""
        return self.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Normalized ITC image embedding [B, embed_dim] (``vision_proj`` of the CLS token)."""
        return F.normalize(self.vision_proj(self.image_embeds(pixel_values)[:, 0]), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Normalized ITC text embedding [B, embed_dim] (``text_proj`` of the [CLS] state)."""
        return F.normalize(self.text_proj(self.text_embeds(input_ids, attention_mask)[:, 0]), dim=-1)

    def itc_similarity(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Cosine similarity [B_img, B_txt] of the ITC embeddings, without temperature."""
        return self.encode_image(pixel_values) @ self.encode_text(input_ids, attention_mask).t()

    def extract_features(self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None,
                         attention_mask: Tensor | None = None, mode: str = "multimodal") -> FeatureOutput:
        """LAVIS-style features. mode "image" (pixels), "text" (ids with [CLS]) or "multimodal" (pixels + ids with
        [ENC]); ``*_proj`` are normalized projections of every token."""
        out = FeatureOutput()
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"mode must be 'image', 'text' or 'multimodal', got {mode!r}")
        if mode in ("image", "multimodal"):
            if pixel_values is None:
                raise ValueError(f"mode {mode!r} needs pixel_values")
            out.image_embeds = self.image_embeds(pixel_values)
            out.image_embeds_proj = F.normalize(self.vision_proj(out.image_embeds), dim=-1)
        if mode in ("text", "multimodal") and input_ids is None:
            raise ValueError(f"mode {mode!r} needs input_ids")
        if mode == "text":
            out.text_embeds = self.text_embeds(input_ids, attention_mask)
            out.text_embeds_proj = F.normalize(self.text_proj(out.text_embeds), dim=-1)
        if mode == "multimodal":
            out.multimodal_embeds = self.multimodal_embeds(out.image_embeds, input_ids, attention_mask)
        return out


@dataclass
class RetrievalOutput:
    """itm_logits [B, 2] (class 1 = match), itc_similarity [B, B] (image rows, text columns), image_embeds."""
    itm_logits: Tensor
    itc_similarity: Tensor
    image_embeds: Tensor


class BlipRetrieval(MatchStrings, BlipFeatureExtractor):
    """Image-text retrieval: ITC embeddings (``encode_image``/``encode_text``/``itc_similarity``) + ITM head."""

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.itm_head = nn.Linear(cfg.text.hidden_size, 2)

    def itm_logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Image i with text i -> ITM logits [B, 2]. BLIP feeds ids starting with [ENC] (HF leaves [CLS])."""
        return self.itm_logits_from_embeds(self.image_embeds(pixel_values), input_ids, attention_mask)

    def itm_logits_from_embeds(self, image_embeds: Tensor, input_ids: Tensor,
                               attention_mask: Tensor | None = None) -> Tensor:
        """As :meth:`itm_logits` from precomputed ViT tokens [B, 1+N, W] (re-ranking many texts per image)."""
        return self.itm_head(self.multimodal_embeds(image_embeds, input_ids, attention_mask)[:, 0])

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> RetrievalOutput:
        image_embeds = self.image_embeds(pixel_values)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        sim = image_feat @ self.encode_text(input_ids, attention_mask).t()
        return RetrievalOutput(self.itm_logits_from_embeds(image_embeds, input_ids, attention_mask), sim, image_embeds)


@dataclass
class RankOutput:
    """answer_index [B] (into the candidate list), candidate_index [B, k] (top-k by first-token probability),
    candidate_loss [B, k] (label-smoothed LM loss summed over answer tokens; the answer is the argmin)."""
    answer_index: Tensor
    candidate_index: Tensor
    candidate_loss: Tensor


class BlipVQA(VQAStrings, BlipModel):
    """VQA: ViT -> question encoder (image-grounded) -> answer decoder cross-attending to the question states."""

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.visual_encoder = build_vit(cfg)
        self.text_encoder = TextTransformer(cfg.text)
        self.text_decoder = TextDecoder(replace(cfg.text, encoder_width=cfg.text.hidden_size))

    def encode_question(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Question ids [B, T] (``[ENC] ...``) grounded on the image -> question states [B, T, D]."""
        image_embeds = self.visual_encoder(pixel_values)
        return self.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                decoder_input_ids: Tensor, decoder_attention_mask: Tensor | None = None) -> BlipOutput:
        """Answer logits [B, Ta, vocab] for ``decoder_input_ids`` [B, Ta] (``[DEC] answer [SEP]``); the decoder
        attends to the question states with the real question mask (as in BLIP / LAVIS training)."""
        image_embeds = self.visual_encoder(pixel_values)
        states = self.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds)
        logits = self.text_decoder(decoder_input_ids, decoder_attention_mask, encoder_hidden_states=states,
                                   encoder_attention_mask=attention_mask)
        return BlipOutput(logits=logits, image_embeds=image_embeds, question_states=states)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                 decoder_input_ids: Tensor | None = None, mask_question_padding: bool = False,
                 generator: torch.Generator | None = None, **options) -> Tensor:
        """Open-ended answers [B, Ta + n] starting from ``decoder_input_ids`` (default ``[DEC]``).

        mask_question_padding=False attends to every question position, padding included, as original BLIP, LAVIS
        and HF do in generate mode; True uses ``attention_mask`` there too. options: as BlipCaption.generate.
        """
        states = self.encode_question(pixel_values, input_ids, attention_mask)
        mask = attention_mask if mask_question_padding else None
        options.setdefault("compile", self.compile_decoding)
        return decode(self.text_decoder, self.cfg, states, mask, decoder_input_ids, None, generator, **options)

    @torch.no_grad()
    def rank_answers(self, pixel_values: Tensor, question_ids: Tensor, question_mask: Tensor | None,
                     answer_ids: Tensor, answer_mask: Tensor, k: int = 128, label_smoothing: float = 0.1) -> RankOutput:
        """Pick each question's answer from a candidate list, as original BLIP's ``rank_answer``.

        answer_ids / answer_mask [A, Ta]: every candidate as ``[DEC] answer [SEP] [PAD]...``. The k candidates whose
        first token is most probable after [DEC] are scored by their label-smoothed LM loss summed over tokens.
        """
        b = question_ids.shape[0]
        k = min(k, answer_ids.shape[0])
        states = self.encode_question(pixel_values, question_ids, question_mask)
        cross_kv = self.text_decoder.transformer.cross_kv(states)
        start = answer_ids[:1, :1].expand(b, 1)
        first = self.text_decoder(start, cross_kv=cross_kv, encoder_attention_mask=question_mask)[:, 0]
        prob_first = first.softmax(dim=1).index_select(1, answer_ids[:, 1])
        _, top = prob_first.topk(k, dim=1)                                     # [B, k]
        # [B*k, Ta] with the k candidates of a question adjacent: they share its cross-attention K/V (beam_group=k)
        ids, mask = answer_ids[top.flatten()], answer_mask[top.flatten()]
        logits = self.text_decoder(ids, mask, cross_kv=cross_kv, encoder_attention_mask=question_mask, beam_group=k)
        targets = ids.masked_fill(mask == 0, -100)[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100,
                               label_smoothing=label_smoothing, reduction="none").sum(1).view(b, k)
        best = loss.argmin(dim=1)
        return RankOutput(top.gather(1, best[:, None]).squeeze(1), top, loss)
