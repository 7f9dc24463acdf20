"""Language-modelling loss: next-token cross-entropy with the shift inside and -100 ignored."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum_per_sequence", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum_per_sequence' or 'none', got {reduction!r}")


def lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy: ``logits[:, :-1]`` predict ``labels[:, 1:]``; -100 in labels is ignored.

    logits: [B, T, V]; labels: [B, T] (the input ids with padding / prompt set to -100).
    reduction: "mean" (over all unmasked tokens of the batch, as BLIP's caption/pretrain loss) -> scalar;
    "sum_per_sequence" (BLIP VQA) -> [B]; "none" -> [B, T - 1].
    """
    _check_reduction(reduction)
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    if reduction == "mean":
        return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100,
                               label_smoothing=label_smoothing)
    per_token = F.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=-100,
                                label_smoothing=label_smoothing, reduction="none")
    return per_token.sum(dim=1) if reduction == "sum_per_sequence" else per_token


def lm_loss_from_hidden(hidden: Tensor, lm_head: Callable[[Tensor], Tensor], labels: Tensor,
                        label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """``lm_loss(lm_head(hidden), labels, ...)`` with the head applied only where a target exists.

    hidden: [B, T, D] decoder states; lm_head: [N, D] -> [N, V] (position-wise); labels: [B, T] with -100 at
    padding / prompt. Padding and prompt positions contribute nothing to the loss, so the [B, T, V] logits (and
    their log-softmax, slice and backward) are only computed for the N kept positions. Returns what
    :func:`lm_loss` returns: scalar ("mean"), [B] ("sum_per_sequence") or [B, T - 1] ("none", 0 where ignored).
    """
    _check_reduction(reduction)
    targets = labels[:, 1:]
    keep = targets != -100
    logits = lm_head(hidden[:, :-1][keep]).float()   # [N, V]
    kept_targets = targets[keep]
    if reduction == "mean":
        return F.cross_entropy(logits, kept_targets, label_smoothing=label_smoothing)
    per_kept = F.cross_entropy(logits, kept_targets, label_smoothing=label_smoothing, reduction="none")
    per_token = per_kept.new_zeros(targets.shape).masked_scatter(keep, per_kept)
    return per_token.sum(dim=1) if reduction == "sum_per_sequence" else per_token
