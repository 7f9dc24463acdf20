"""BLIP pretraining (paper §3.2): ITC with momentum distillation + ITM with hard negatives + LM, one module.

Modules (names as original BLIP / LAVIS, so task models load from this checkpoint by key name):
``visual_encoder`` (ViT), ``text_encoder`` (bidirectional MED; with image cross-attention it is the image-grounded
encoder), ``text_decoder`` (causal MED + LM head) that shares **every** parameter with the encoder except
self-attention — the embeddings, cross-attention and FFN are the same module objects, ``vision_proj`` /
``text_proj`` (ITC, ``embed_dim``), ``itm_head``, ``temp`` (0.07, kept in [0.001, 0.5]), momentum copies
``visual_encoder_m``, ``text_encoder_m``, ``vision_proj_m``, ``text_proj_m`` (no gradient) and ``queue``
(:class:`~blip.losses.FeatureQueue`, 57600 by default).

Choices (original BLIP behaviour noted where we differ):
- EMA (m=0.995) and the temperature clamp run in :meth:`after_optimizer_step`. BLIP runs both at the start of
  ``forward``; without gradient accumulation the sequence of values is identical (the momentum copies start equal to
  the online weights), with accumulation ours updates once per optimizer step, and evaluation forwards change nothing.
- ``world_batch=True`` (default): the in-batch ITC candidates and the ITM negative pool are the whole world batch
  (momentum features gathered without gradient, ViT tokens with gradient), so a run on N ranks computes what one
  process would on the concatenated batch. ``world_batch=False`` is original BLIP pretraining: local batch + queue.
  The queue is filled from every rank either way (BLIP's ``_dequeue_and_enqueue`` all-gathers).
- Hard negatives never share the row's image id (BLIP pretrain only excludes the diagonal; with COCO's 5 captions per
  image it can pick a positive as "negative"); ``exclude_same_image=False`` restores BLIP's rule. ITC targets stay the
  diagonal, as in BLIP pretraining.
- alpha = 0.4 * min(1, progress / 2): BLIP's ``pretrain.py`` ramps distillation over the first 2 epochs.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import LoadReport, load_into
from ..data.tokenizer import DEC_TOKEN_ID, ENC_TOKEN_ID, PAD_TOKEN_ID, get_tokenizer, tokenize_to, with_first_token
from ..losses import FeatureQueue, lm_loss_from_hidden, rank
from ..models.blip_core import TextDecoder
from ..models.family import Family
from ..models.structure import DeclaredLayers
from ..nn.transformer import TextTransformer
from ..nn.vit import VisionTransformer
from .momentum import MomentumDistillation, itm_hard_negatives, momentum_itc, ramped_alpha


def share_except_self_attention(encoder: TextTransformer, decoder: TextTransformer) -> None:
    """Make ``decoder`` use the encoder's embeddings, cross-attention and FFN modules (BLIP's
    ``tie_encoder_decoder_weights(..., '/attention')``): only self-attention stays the decoder's own."""
    decoder.embeddings = encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.layers, decoder.layers, strict=True):
        dec_layer.cross_attn = enc_layer.cross_attn
        dec_layer.ffn = enc_layer.ffn
        dec_layer.ffn_query = enc_layer.ffn_query


class BlipPretrain(MomentumDistillation, DeclaredLayers, nn.Module):
    """BLIP pretraining objective. ``forward(batch) -> {"loss", "loss_itc", "loss_itm", "loss_lm"}``.

    batch: {"pixel_values": [B, 3, H, W], "text": list[str] (cleaned captions), "image_ids": LongTensor [B],
    "progress": float (epochs elapsed)}. Text is tokenized here (``[CLS] ... [SEP]``, padded to ``max_txt_len``).
    cfg: a :class:`blip.models.blip_core.BlipConfig` (``vision``, ``text``, ``embed_dim``).
    """

    family = Family.BLIP   # no ``.model`` to ask: the towers are this objective's own

    def __init__(self, cfg: Any, *, queue_size: int = 57600, momentum: float = 0.995, alpha: float = 0.4,
                 alpha_warmup_epochs: float = 2.0, temp: float = 0.07, max_txt_len: int = 30,
                 label_smoothing: float = 0.1, negative_eps: float = 1e-4, world_batch: bool = True,
                 exclude_same_image: bool = True, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.momentum, self.alpha, self.alpha_warmup_epochs = momentum, alpha, alpha_warmup_epochs
        self.max_txt_len, self.label_smoothing = max_txt_len, label_smoothing
        self.negative_eps, self.world_batch, self.exclude_same_image = negative_eps, world_batch, exclude_same_image
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer("blip")

        self.visual_encoder = VisionTransformer(cfg.vision)
        self.text_encoder = TextTransformer(cfg.text)
        self.text_decoder = TextDecoder(cfg.text)
        share_except_self_attention(self.text_encoder, self.text_decoder.transformer)
        self.text_decoder.lm_head.word_embeddings[0] = self.text_encoder.embeddings.word   # LM head stays tied
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text.hidden_size, 2)
        self.init_momentum(temp)
        self.queue = FeatureQueue(cfg.embed_dim, queue_size)

    # ---- training -------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        return tokenize_to(self.tokenizer, texts, self.max_txt_len, self.temp.device, padding="max_length")

    def forward(self, batch: dict) -> dict[str, Tensor]:
        pixel_values, image_ids = batch["pixel_values"], batch["image_ids"].to(self.temp.device)
        alpha = ramped_alpha(self.alpha, float(batch.get("progress", 0.0)), self.alpha_warmup_epochs)
        input_ids, attention_mask = self.tokenize(batch["text"])

        image_embeds = self.visual_encoder(pixel_values)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask=attention_mask)[:, 0]),
                                dim=-1)
        with torch.no_grad():
            image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(pixel_values)[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(
                self.text_encoder_m(input_ids, attention_mask=attention_mask)[:, 0]), dim=-1)
        loss_itc, sim_i2t, sim_t2i = momentum_itc(image_feat, text_feat, image_feat_m, text_feat_m, self.queue,
                                                  self.temp, alpha, world_batch=self.world_batch)
        # no ids in the queue (pretraining ITC is diagonal): a checkpoint's idx_queue stays -100, so retrieval
        # fine-tuning started from it sees no stale pretraining ids, exactly like BLIP (whose pretrain has no id queue)
        self.queue.enqueue(image_feat_m, text_feat_m)   # the world batch, whatever ``world_batch`` (as BLIP)

        # ITM: negatives from the online-vs-momentum sims of the (world) batch, as BLIP (`sim[:, :bs]`)
        bw = sim_i2t.shape[1] - self.queue.size
        if not self.exclude_same_image:  # BLIP: only the pair itself is excluded (one id per row of the world batch)
            b = image_ids.shape[0]
            image_ids = torch.arange(b, device=image_ids.device) + (rank() * b if self.world_batch else 0)
        loss_itm = itm_hard_negatives(self.text_encoder, self.itm_head, image_embeds,
                                      with_first_token(input_ids, ENC_TOKEN_ID), attention_mask,
                                      sim_i2t[:, :bw].detach(), sim_t2i[:, :bw].detach(), image_ids,
                                      self.world_batch, self.negative_eps)

        dec_ids = with_first_token(input_ids, DEC_TOKEN_ID)
        labels = dec_ids.masked_fill(dec_ids == PAD_TOKEN_ID, -100)
        hidden = self.text_decoder.hidden_states(dec_ids, attention_mask, encoder_hidden_states=image_embeds)
        loss_lm = lm_loss_from_hidden(hidden, self.text_decoder.lm_head, labels, self.label_smoothing)
        return {"loss": loss_itc + loss_itm + loss_lm, "loss_itc": loss_itc, "loss_itm": loss_itm,
                "loss_lm": loss_lm}

    # ---- retrieval API (evaluation during pretraining), as BlipRetrieval ---------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Normalized ITC image embedding [B, embed_dim]."""
        return F.normalize(self.vision_proj(self.visual_encoder(pixel_values)[:, 0]), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Normalized ITC text embedding [B, embed_dim] (ids start with [CLS])."""
        return F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask=attention_mask)[:, 0]), dim=-1)

    def itc_similarity(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Cosine similarity [B_img, B_txt] without temperature."""
        return self.encode_image(pixel_values) @ self.encode_text(input_ids, attention_mask).T

    def itm_logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Image i with text i (ids start with [ENC]) -> [B, 2] (class 1 = match)."""
        return self.itm_logits_from_embeds(self.visual_encoder(pixel_values), input_ids, attention_mask)

    def itm_logits_from_embeds(self, image_embeds: Tensor, input_ids: Tensor,
                               attention_mask: Tensor | None = None) -> Tensor:
        h = self.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds)
        return self.itm_head(h[:, 0])

    # ---- hand-off to the task models -----------------------------------------------------------------------
    def export_to(self, model: nn.Module) -> LoadReport:
        """Copy the weights ``model`` (BlipCaption, BlipRetrieval, BlipVQA, BlipFeatureExtractor or a fine-tuning
        objective) has under the same names; raises if one of its keys is absent or has another shape."""
        return load_pretrain_weights(model, self.state_dict(), "BlipPretrain")


def load_pretrain_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str,
                          expected_missing: tuple[str, ...] = ()) -> LoadReport:
    """Load a BlipPretrain state dict (e.g. a stage-1 checkpoint's ``model``) into a task model by key name.
    Keys of the model absent from ``state_dict`` must match ``expected_missing`` (regexes)."""
    own = model.state_dict()
    sd = {k: v for k, v in state_dict.items() if k in own}
    return load_into(model, sd, source, expected_missing=expected_missing)
