"""Image-text matching (ITM) loss: :func:`sample_hard_negatives` draws one negative per row from softmax(sim),
vectorised, never a positive; :func:`itm_loss` is the 2-way cross-entropy on [positives; negatives]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def hard_negative_weights(sim: Tensor, positive_mask: Tensor, eps: float = 0.0) -> Tensor:
    """Unnormalised sampling weights [B, N]: softmax(sim) (+ ``eps``, LAVIS/BLIP pretrain use 1e-4) with every
    positive set to 0. With ``eps == 0`` it is the softmax over the negatives alone (the same distribution once
    normalised, and it cannot underflow to an all-zero row when the positives take all the mass)."""
    sim = sim.float()
    if eps == 0.0:
        return sim.masked_fill(positive_mask, float("-inf")).softmax(dim=1).nan_to_num_(0.0)
    return (sim.softmax(dim=1) + eps).masked_fill_(positive_mask, 0.0)


@torch.no_grad()
def sample_hard_negatives(sim: Tensor, positive_mask: Tensor, generator: torch.Generator | None = None,
                          eps: float = 0.0) -> Tensor:
    """One hard negative per row, drawn with probability proportional to softmax(sim) over the non-positives.

    sim: [B, N] similarity logits (/ temperature); positive_mask: bool [B, N], True where the candidate shows the
    row's own image (the diagonal plus duplicates of the same image id). One ``torch.multinomial`` call for the
    whole matrix, no host synchronisation. Every row needs at least one negative (checked asynchronously).
    Returns LongTensor [B] of column indices.
    """
    has_negative = (~positive_mask).any(dim=1).all()
    message = ("ITM hard negatives need at least 2 distinct images in the batch (all ranks together): every "
               "candidate of a row shows its own image (batch size 1, or one image repeated); raise the batch size")
    if has_negative.device.type == "cpu":  # free to check here; on an accelerator the check must not sync
        if not has_negative:
            raise ValueError(message)
    else:
        torch._assert_async(has_negative, message)
    weights = hard_negative_weights(sim, positive_mask, eps)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(logits: Tensor, num_positive: int) -> Tensor:
    """2-way matching loss. logits: [P + M, 2] with the P positive pairs first, then the M negative pairs."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positive] = 1
    return F.cross_entropy(logits.float(), labels)

