"""Language-modelling loss: next-token cross-entropy with the shift inside and -100 ignored."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy: ``logits[:, :-1]`` predict ``labels[:, 1:]``; -100 in labels is ignored.

    logits: [B, T, V]; labels: [B, T] (the input ids with padding / prompt set to -100).
    reduction: "mean" (over all unmasked tokens of the batch, as BLIP's caption/pretrain loss) -> scalar;
    "sum_per_sequence" (BLIP VQA) -> [B]; "none" -> [B, T - 1].
    """
    if reduction not in ("mean", "sum_per_sequence", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum_per_sequence' or 'none', got {reduction!r}")
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    if reduction == "mean":
        return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100,
                               label_smoothing=label_smoothing)
    per_token = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=-100,
                                label_smoothing=label_smoothing, reduction="none")
    return per_token.sum(dim=1) if reduction == "sum_per_sequence" else per_token

