"""Image-text contrastive (ITC) loss: :func:`itc_loss` over similarity logits (already divided by the
temperature) with hard or soft targets; :func:`momentum_soft_targets` mixes in the momentum model's distribution
(ALBEF/BLIP distillation); :func:`positive_targets` spreads the target mass over every candidate with the same image
id (BLIP retrieval)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, targets_i2t: Tensor | None = None, targets_t2i: Tensor | None = None,
             label_smoothing: float = 0.0) -> Tensor:
    """Image-text contrastive loss, the mean of the two directions.

    sim_i2t: [B, N_txt] logits of each local image against the candidate texts (cosine / temperature);
    sim_t2i: [B, N_img] likewise for each local text. Targets per direction:
    None -> row i's positive is column i (the in-batch diagonal); LongTensor [B] -> the positive's column index
    (e.g. ``rank * B + arange(B)`` against world-gathered candidates); float [B, N] -> a target distribution
    (rows sum to 1: momentum distillation, several positives). Returns a scalar: the mean over rows of the
    cross-entropy, averaged over the two directions.
    """
    def one(sim: Tensor, targets: Tensor | None) -> Tensor:
        if targets is None:
            targets = torch.arange(sim.shape[0], device=sim.device)
        if targets.is_floating_point():
            targets = targets.float()
        return F.cross_entropy(sim.float(), targets, label_smoothing=label_smoothing)   # fp32 under autocast too

    return (one(sim_i2t, targets_i2t) + one(sim_t2i, targets_t2i)) / 2


def momentum_soft_targets(sim_m: Tensor, hard_targets: Tensor, alpha: float) -> Tensor:
    """ALBEF/BLIP distillation targets: ``alpha * softmax(sim_m) + (1 - alpha) * hard_targets``.

    sim_m: [B, N] the momentum model's logits (already / temperature); hard_targets: [B, N] (rows sum to 1).
    Returns [B, N] without gradient.
    """
    with torch.no_grad():
        return alpha * F.softmax(sim_m.float(), dim=1).to(hard_targets.dtype) + (1 - alpha) * hard_targets


def positive_targets(image_ids_local: Tensor, image_ids_all: Tensor) -> Tensor:
    """Targets that spread each row's mass evenly over every candidate showing the same image.

    image_ids_local: [B]; image_ids_all: [N] (the candidates' image ids, e.g. world batch + queue).
    Returns float [B, N]; a row with no match (cannot happen when the local batch is among the candidates) is zero.
    """
    pos = (image_ids_local.view(-1, 1) == image_ids_all.view(1, -1)).float()
    return pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)

