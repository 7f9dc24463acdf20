"""BLIP-2 stage-1 training objective: ITC + ITM (hard negatives) + ITG on a :class:`Blip2Qformer`.

As LAVIS ``Blip2Qformer.forward``:
- ITC: each query embedding against the text [CLS] embedding, max over queries, divided by the learnable ``temp``,
  cross-entropy with label smoothing 0.1 against the world batch (features gathered without gradient);
- ITM: for every text a negative image and for every image a negative text, drawn from softmax(similarity) over
  the world batch (+1e-4, positives excluded); image features are gathered *with* gradient; pairs
  [pos; image-negatives; text-negatives] with labels [1; 0; 0]; logits averaged over the query outputs;
- ITG: ``[DEC]`` replaces [CLS]; the text attends to the query K/V cached by the ITC query pass (no second query
  pass), label smoothing 0.1.
The loss is the plain sum. Texts are tokenized here, padded to ``max_txt_len`` ("max_length" padding as LAVIS).

``image_id_targets=True`` restores LAVIS's branch for batches with image ids (its COCO / VG batches): ITC targets
spread over every candidate of the same image, smoothed by 0.1 as well (LAVIS ``0.9 * targets + 0.1 / N``). By
default the targets stay the diagonal with smoothing 0.1 for every batch, and image ids only keep same-image pairs
out of the ITM negatives.

``uniform_negative_epochs`` (0 = the papers) draws the ITM negatives uniformly from the non-positives until the
batch's "progress" (epochs) reaches it, then mines them as above: the tiny CPU default's warm-up, whose untrained ITC
makes the mined negatives too hard for its ITM to leave the prior.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.tokenizer import DEC_TOKEN_ID, PAD_TOKEN_ID, get_tokenizer, tokenize_to, with_first_token
from ..losses import (all_gather_with_grad, concat_all_gather, itc_loss, itm_loss, lm_loss_from_hidden,
                      positive_targets, rank, sample_hard_negatives)
from ..models.blip2_qformer import Blip2Qformer, query_similarity
from ..models.structure import DeclaredLayers
from ..nn.attention import ConcatKVCache


class Blip2Stage1Objective(DeclaredLayers, nn.Module):
    """forward(batch) -> {"loss", "loss_itc", "loss_itm", "loss_lm"}.

    batch: {"pixel_values": [B, 3, H, W], "text": list[str] (B), "image_ids": LongTensor [B] (optional: pairs with
    the same id are never negatives of each other), "progress": float (epochs elapsed)}. For tests,
    "itm_negatives": (neg_image_idx [B], neg_text_idx [B]) world-batch indices replace the sampling.
    """

    vit_path = "model.image_encoder.visual_encoder"
    # recomputed in backward: the Q-Former layers (ITM and text passes; the query pass fills the ITG cache), and the
    # ViT's where it trains (LoRA adapters: a frozen ViT runs without autograd, so nothing is recomputed there)
    checkpointed = ("model.qformer.transformer", "model.image_encoder.visual_encoder")

    def __init__(self, model: Blip2Qformer, tokenizer=None, max_txt_len: int | None = None,
                 label_smoothing: float = 0.1, negative_eps: float = 1e-4, image_id_targets: bool = False,
                 uniform_negative_epochs: float = 0.0):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer("blip2_qformer")
        self.max_txt_len = max_txt_len or model.cfg.max_txt_len
        self.label_smoothing = label_smoothing
        self.negative_eps = negative_eps
        self.image_id_targets = image_id_targets
        self.uniform_negative_epochs = uniform_negative_epochs

    def no_weight_decay(self) -> set[str]:
        return {"model.temp"}

    # ---- held-out retrieval hooks (blip.train.heldout) -------------------------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Normalized query embeddings [B, Q, E]."""
        return self.model.encode_image(pixel_values).embeds

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Normalized [CLS] embedding [B, E]."""
        return self.model.encode_text(input_ids, attention_mask).embeds

    def itm_image_features(self, pixel_values: Tensor) -> Tensor:
        """The frozen encoder's features [B, S, W] ITM's queries read."""
        return self.model.image_features(pixel_values)

    def itm_match_prob(self, image_features: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
                       ) -> Tensor:
        """ITM's match probability [B] of the pairs (image_features b, text b)."""
        return self.model.itm_logits_from_features(image_features, input_ids, attention_mask).softmax(-1)[:, 1]

    @staticmethod
    def retrieval_similarity(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """BLIP-2 ITC score [N_img, N_txt]: max over queries."""
        return query_similarity(image_embeds, text_embeds)

    def tokenize(self, texts: list[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """[CLS] text [SEP] padded to ``max_txt_len`` (LAVIS "max_length" padding) -> (ids, mask), each [B, T]."""
        return tokenize_to(self.tokenizer, texts, self.max_txt_len, device, padding="max_length")

    def forward(self, batch: dict) -> dict[str, Tensor]:
        ids, mask = self.tokenize(batch["text"], batch["pixel_values"].device)
        uniform = float(batch.get("progress", 0.0)) < self.uniform_negative_epochs
        return self.losses(batch["pixel_values"], ids, mask, image_ids=batch.get("image_ids"),
                           negatives=batch.get("itm_negatives"), uniform_negatives=uniform)

    def losses(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
               image_ids: Tensor | None = None, negatives: tuple[Tensor, Tensor] | None = None,
               uniform_negatives: bool = False) -> dict[str, Tensor]:
        """The three losses from tokenized text (input_ids [B, T] with [CLS] first, attention_mask [B, T]);
        ``uniform_negatives``: ITM negatives drawn uniformly from the non-positives instead of mined."""
        m = self.model
        b = pixel_values.shape[0]
        vit = m.image_features(pixel_values)                                    # [B, S, W]
        cache = ConcatKVCache(m.cfg.qformer.text.num_layers)
        image_feats = F.normalize(m.vision_proj(m.query_output(vit, cache=cache)), dim=-1)   # [B, Q, E]
        text_feat = m.encode_text(input_ids, attention_mask).embeds             # [B, E]

        # ITC against the world batch
        sim_i2t = query_similarity(image_feats, concat_all_gather(text_feat)) / m.temp      # [B, W*B]
        sim_t2i = query_similarity(concat_all_gather(image_feats), text_feat).t() / m.temp  # [B, W*B]
        loss_itc = self.contrastive_loss(sim_i2t, sim_t2i, image_ids)

        # ITM with hard negatives from the world batch
        ids_world, mask_world = concat_all_gather(input_ids), concat_all_gather(attention_mask)
        vit_world = all_gather_with_grad(vit)
        if negatives is None:
            neg_image, neg_text = self.hard_negatives(sim_i2t, sim_t2i, image_ids, uniform=uniform_negatives)
        else:
            neg_image, neg_text = (t.to(pixel_values.device) for t in negatives)
        itm_logits = m.itm_logits_from_features(
            torch.cat([vit, vit_world[neg_image], vit]),
            torch.cat([input_ids, input_ids, ids_world[neg_text]]),
            torch.cat([attention_mask, attention_mask, mask_world[neg_text]]))
        loss_itm = itm_loss(itm_logits, num_positive=b)

        # ITG reusing the query K/V of the ITC pass
        dec_ids = with_first_token(input_ids, DEC_TOKEN_ID)
        labels = dec_ids.masked_fill(dec_ids == PAD_TOKEN_ID, -100)
        hidden = m.lm_hidden(vit, dec_ids, attention_mask, query_cache=cache)
        loss_lm = lm_loss_from_hidden(hidden, m.lm_head, labels, label_smoothing=self.label_smoothing)
        return {"loss": loss_itc + loss_itm + loss_lm, "loss_itc": loss_itc, "loss_itm": loss_itm,
                "loss_lm": loss_lm}

    def contrastive_loss(self, sim_i2t: Tensor, sim_t2i: Tensor, image_ids: Tensor | None) -> Tensor:
        """ITC from this rank's rows against the world batch (sim_*: [B, W*B], already / temp)."""
        if self.image_id_targets and image_ids is not None:   # LAVIS with image ids: same-image soft targets
            ids = image_ids.to(sim_i2t.device)
            targets = positive_targets(ids, concat_all_gather(ids))
        else:
            b = sim_i2t.shape[0]
            targets = rank() * b + torch.arange(b, device=sim_i2t.device)
        return itc_loss(sim_i2t, sim_t2i, targets, targets, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def hard_negatives(self, sim_i2t: Tensor, sim_t2i: Tensor, image_ids: Tensor | None = None,
                       uniform: bool = False) -> tuple[Tensor, Tensor]:
        """World-batch indices [B] of a negative image per local text and a negative text per local image, drawn
        from softmax(sim) (+``negative_eps``) with the positives excluded. sim_*: [B, W*B] (this rank's rows).
        ``uniform``: every non-positive equally likely (a flat similarity)."""
        b = sim_i2t.shape[0]
        targets = rank() * b + torch.arange(b, device=sim_i2t.device)
        positive = self._positive_mask(targets, sim_i2t.shape[1], image_ids)
        if uniform:
            sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
        return (sample_hard_negatives(sim_t2i.detach(), positive, eps=self.negative_eps),
                sample_hard_negatives(sim_i2t.detach(), positive, eps=self.negative_eps))

    @staticmethod
    def _positive_mask(targets: Tensor, world_batch: int, image_ids: Tensor | None) -> Tensor:
        """bool [B, W*B]: the row's own pair, plus every pair of the same image when ``image_ids`` are given."""
        positive = torch.zeros(targets.shape[0], world_batch, dtype=torch.bool, device=targets.device)
        positive[torch.arange(targets.shape[0], device=targets.device), targets] = True
        if image_ids is not None:
            image_ids = image_ids.to(targets.device)
            positive |= image_ids[:, None] == concat_all_gather(image_ids)[None, :]
        return positive
