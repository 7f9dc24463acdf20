"""BLIP for NLVR2: does a sentence hold for a pair of images? (salesforce/BLIP ``BLIP_NLVR``, LAVIS ``BlipNLVR``.)

ViT over both images (one pass over the concatenated batch) -> image-grounded text encoder whose every
cross-attention layer reads the two images separately (:class:`~blip.nn.transformer.TwinCrossAttention`: averaged
in layers 0-5, merged by a linear layer from layer 6 on, as BLIP's ``nlvr_encoder``) -> ``cls_head`` (Linear, ReLU,
Linear) on the first token -> 2 logits; class 1 = "True". Trained with plain cross-entropy (BLIP ``train_nlvr.py``;
:class:`blip.objectives.blip_finetune.NLVRObjective`).

Tensor API (ids exactly as given: BLIP feeds ``[ENC] sentence [SEP]``, padded to the longest, never truncated)::

    out = model(pixel_values_left=[B, 3, H, W], pixel_values_right=[B, 3, H, W], input_ids=[B, T],
                attention_mask=[B, T])
    out.logits        # [B, 2]
    out.image_embeds  # [2, B, 1 + N, W]: index 0 = left image (LAVIS's intermediate ``image_embeds``)

String API: ``model.predict(images_left, images_right, texts) -> list[bool]`` (paths or PIL images with BLIP's
eval transform, or preprocessed pixels; ``[ENC]`` first). Texts are used as given; BLIP's datasets clean them with
``pre_caption`` first.

Checkpoints: BLIP's ``model_base_nlvr.pth`` (LAVIS's ``blip_nlvr`` loads the same file) and LAVIS-layout state
dicts load with ``blip.load``; a pretraining checkpoint loaded with ``task="nlvr"`` starts both cross-attention
branches from its single cross-attention, as BLIP / LAVIS do to begin fine-tuning (:mod:`blip.convert.blip_nlvr`).
HF transformers has no BLIP NLVR2 class, so there is no HF import or export for this task.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor, nn

from ..nn.transformer import TextTransformer
from .blip_core import BlipConfig, BlipModel, build_vit
from .blip_strings import _StringAPI
from .strings import Images

NUM_CLASSES = 2   # NLVR2 labels: 0 = "False", 1 = "True"


@dataclass
class NLVROutput:
    """logits [B, 2] (class 1 = the sentence is true); image_embeds [2, B, 1 + N, W] (left, right)."""
    logits: Tensor
    image_embeds: Tensor


class BlipNLVR(_StringAPI, BlipModel):
    """ViT + twin-cross-attention text encoder + 2-way classification head."""

    def __init__(self, cfg: BlipConfig):
        cfg = replace(cfg, text=replace(cfg.text, twin_cross_attention=True))
        super().__init__(cfg)
        self.visual_encoder = build_vit(cfg)
        self.text_encoder = TextTransformer(cfg.text)
        hidden = cfg.text.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))

    def image_embeds(self, pixel_values_left: Tensor, pixel_values_right: Tensor) -> Tensor:
        """Both images [B, 3, H, W] -> ViT tokens stacked [2, B, 1 + N, W] (one ViT pass over the 2B images)."""
        if pixel_values_left.shape != pixel_values_right.shape:
            raise ValueError(f"left and right images differ in shape: {tuple(pixel_values_left.shape)} vs "
                             f"{tuple(pixel_values_right.shape)}; transform both to the model's image size")
        b = pixel_values_left.shape[0]
        tokens = self.visual_encoder(torch.cat([pixel_values_left, pixel_values_right]))
        return tokens.view(2, b, *tokens.shape[1:])

    def logits_from_embeds(self, image_embeds: Tensor, input_ids: Tensor,
                           attention_mask: Tensor | None = None) -> Tensor:
        """Stacked image tokens [2, B, 1 + N, W] + ids [B, T] -> logits [B, 2] (head on the first token)."""
        states = self.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds)
        return self.cls_head(states[:, 0])

    def forward(self, pixel_values_left: Tensor, pixel_values_right: Tensor, input_ids: Tensor,
                attention_mask: Tensor | None = None) -> NLVROutput:
        image_embeds = self.image_embeds(pixel_values_left, pixel_values_right)
        return NLVROutput(self.logits_from_embeds(image_embeds, input_ids, attention_mask), image_embeds)

    @torch.no_grad()
    def predict(self, images_left: Images, images_right: Images, texts: str | Sequence[str]) -> list[bool]:
        """Whether each sentence holds for its (left, right) image pair; one pair may serve every sentence. Images:
        paths, PIL images or preprocessed [B, 3, S, S] pixels."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        left, right = self._pixels(images_left), self._pixels(images_right)
        if left.shape[0] != right.shape[0]:
            raise ValueError(f"{left.shape[0]} left images but {right.shape[0]} right images: pass pairs")
        if left.shape[0] == 1:
            left, right = left.expand(len(texts), -1, -1, -1), right.expand(len(texts), -1, -1, -1)
        if left.shape[0] != len(texts):
            raise ValueError(f"{left.shape[0]} image pairs for {len(texts)} sentences: pass one pair, or one per "
                             "sentence")
        ids, mask = self._tokens(texts, self.cfg.enc_token_id, max_length=self.cfg.text.max_position_embeddings)
        return (self(left, right, ids, mask).logits.argmax(-1) == 1).tolist()
