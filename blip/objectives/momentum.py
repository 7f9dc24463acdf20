"""The momentum encoder of ALBEF/BLIP: EMA copies of the encoders, ITC against momentum features with
distillation, hard-negative ITM, and the distillation-weight (alpha) ramp.

Used by BLIP pretraining (:mod:`blip.objectives.blip_pretrain`) and retrieval fine-tuning
(:mod:`blip.objectives.blip_finetune`).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..losses import (FeatureQueue, all_gather_with_grad, concat_all_gather, itc_loss, itm_loss,
                      momentum_soft_targets, positive_targets, rank, sample_hard_negatives)
from ..nn.transformer import TextTransformer


@torch.no_grad()
def ema_update(online: nn.Module, momentum: nn.Module, m: float) -> None:
    """``p_m <- m * p_m + (1 - m) * p`` for every parameter pair (same order; buffers are not averaged)."""
    po, pm = list(online.parameters()), list(momentum.parameters())
    if len(po) != len(pm):
        raise ValueError(f"online model has {len(po)} parameters, momentum model {len(pm)}")
    torch._foreach_mul_(pm, m)
    torch._foreach_add_(pm, [p.detach().to(q.dtype) for p, q in zip(po, pm)], alpha=1.0 - m)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` that :func:`ema_update` keeps following it."""
    return copy.deepcopy(module).requires_grad_(False)


def ramped_alpha(alpha: float, progress: float, warmup_epochs: float) -> float:
    """Distillation weight ramped linearly from 0 over the first ``warmup_epochs`` (progress in epochs)."""
    return alpha if warmup_epochs <= 0 else alpha * min(1.0, max(progress, 0.0) / warmup_epochs)


def momentum_itc(image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor,
                 queue: FeatureQueue, temp: Tensor, alpha: float, image_ids: Tensor | None = None,
                 world_batch: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """ALBEF/BLIP ITC against momentum features of the (world) batch + the queue, with distillation.

    image_feat, text_feat: [B, E] online, normalised; *_m: momentum (no grad). image_ids [B]: positives are all
    candidates with the same id (BLIP retrieval, uses ``queue.idx_queue``); None: the diagonal (BLIP pretraining).
    Returns (loss, sim_i2t [B, Bw + K], sim_t2i [B, Bw + K]); the first Bw columns are the world batch.
    """
    gather = concat_all_gather if world_batch else (lambda t: t)
    b = image_feat.shape[0]
    with torch.no_grad():
        image_m_w, text_m_w = gather(image_feat_m), gather(text_feat_m)
        image_all = torch.cat([image_m_w.T, queue.image_queue.to(image_m_w.dtype)], dim=1)   # [E, Bw + K]
        text_all = torch.cat([text_m_w.T, queue.text_queue.to(text_m_w.dtype)], dim=1)
        if image_ids is not None:
            hard = positive_targets(image_ids, torch.cat([gather(image_ids), queue.idx_queue.view(-1)]))
        else:
            hard = torch.zeros(b, image_all.shape[1], device=image_feat.device)
            offset = rank() * b if world_batch else 0
            hard[torch.arange(b), offset + torch.arange(b)] = 1.0
        t_i2t = momentum_soft_targets(image_feat_m @ text_all / temp, hard, alpha)
        t_t2i = momentum_soft_targets(text_feat_m @ image_all / temp, hard, alpha)
    sim_i2t, sim_t2i = image_feat @ text_all / temp, text_feat @ image_all / temp
    return itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i), sim_i2t, sim_t2i


def itm_hard_negatives(text_encoder: TextTransformer, itm_head: nn.Module, image_embeds: Tensor, enc_ids: Tensor,
                       attention_mask: Tensor, sim_i2t: Tensor, sim_t2i: Tensor, image_ids: Tensor,
                       world_batch: bool = True, eps: float = 0.0) -> Tensor:
    """ITM on B positive pairs, B (image, hard-negative text) and B (hard-negative image, text) pairs.

    image_embeds [B, 1+N, W]; enc_ids / attention_mask [B, T] (ids start with [ENC]); sim_i2t / sim_t2i [B, Bw]
    similarity logits of the local rows against the (world) batch; image_ids [B]. Negatives never share the row's
    image id. Returns the 2-way cross-entropy over the 3B pairs.
    """
    gather = concat_all_gather if world_batch else (lambda t: t)
    with torch.no_grad():
        ids_w = gather(image_ids)
        positive = image_ids.view(-1, 1) == ids_w.view(1, -1)
        neg_text = sample_hard_negatives(sim_i2t, positive, eps=eps)    # a text for each image
        neg_image = sample_hard_negatives(sim_t2i, positive, eps=eps)   # an image for each text
        ids_neg, mask_neg = gather(enc_ids)[neg_text], gather(attention_mask)[neg_text]
    image_embeds_w = all_gather_with_grad(image_embeds) if world_batch else image_embeds
    pos = text_encoder(enc_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds)[:, 0]
    neg = text_encoder(torch.cat([enc_ids, ids_neg]), attention_mask=torch.cat([attention_mask, mask_neg]),
                       encoder_hidden_states=torch.cat([image_embeds_w[neg_image], image_embeds]))[:, 0]
    return itm_loss(itm_head(torch.cat([pos, neg])), enc_ids.shape[0])


class MomentumDistillation:
    """ALBEF/BLIP momentum machinery shared by pretraining and retrieval fine-tuning: EMA copies of the ViT, the
    text encoder and the two ITC projections (no gradients) and a learnable ITC temperature clamped to [0.001, 0.5].

    The host class defines ``visual_encoder``, ``text_encoder``, ``vision_proj``, ``text_proj`` and ``momentum``
    before calling :meth:`init_momentum`.
    """

    def init_momentum(self, temp: float) -> None:
        self.temp = nn.Parameter(torch.tensor(temp))
        self.visual_encoder_m = momentum_copy(self.visual_encoder)
        self.text_encoder_m = momentum_copy(self.text_encoder)
        self.vision_proj_m = momentum_copy(self.vision_proj)
        self.text_proj_m = momentum_copy(self.text_proj)

    def momentum_pairs(self) -> tuple[tuple[nn.Module, nn.Module], ...]:
        """(online, momentum copy) module pairs, in the order the EMA updates them."""
        return ((self.visual_encoder, self.visual_encoder_m), (self.text_encoder, self.text_encoder_m),
                (self.vision_proj, self.vision_proj_m), (self.text_proj, self.text_proj_m))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """EMA of the momentum copies and the temperature clamp (BLIP does both at the start of forward)."""
        for online, shadow in self.momentum_pairs():
            ema_update(online, shadow, self.momentum)
        self.temp.clamp_(0.001, 0.5)

    def no_weight_decay(self) -> set[str]:
        return {"temp"}
