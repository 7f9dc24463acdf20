"""The contrastive, matching and language-modelling objectives of BLIP / BLIP-2, as small pure functions.

- ITC: :func:`itc_loss` over similarity logits (already divided by the temperature) with hard or soft targets;
  :func:`momentum_soft_targets` mixes in the momentum model's distribution (ALBEF/BLIP distillation);
  :func:`positive_targets` spreads the target mass over every candidate with the same image id (BLIP retrieval).
- ITM: :func:`sample_hard_negatives` draws one negative per row from softmax(sim), vectorised, never a positive;
  :func:`itm_loss` is the 2-way cross-entropy on [positives; negatives].
- LM: :func:`lm_loss` with the next-token shift inside and -100 ignored.
- Distributed helpers: :func:`concat_all_gather` (no grad), :func:`all_gather_with_grad`; both are the identity
  without an initialised process group, so single-process runs never need torch.distributed.
- Momentum model: :func:`ema_update`, :class:`FeatureQueue`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


# ---------------------------------------------------------------------------------------------------------------
# distributed
def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """[B, ...] on every rank -> [world * B, ...] in rank order, without gradient. Every rank must pass the same B."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_with_grad(x: Tensor) -> Tensor:
    """[B, ...] -> [world * B, ...] in rank order; the backward pass sends each rank the gradient of its own slice
    (summed over ranks), so the mean of the per-rank losses has the gradient of the loss on the whole world batch."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x.contiguous()), dim=0)


# ---------------------------------------------------------------------------------------------------------------
# ITC
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


# ---------------------------------------------------------------------------------------------------------------
# ITM
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
    torch._assert_async(has_negative, "sample_hard_negatives: a row has no negative candidate (all share one image)")
    weights = hard_negative_weights(sim, positive_mask, eps)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(logits: Tensor, num_positive: int) -> Tensor:
    """2-way matching loss. logits: [P + M, 2] with the P positive pairs first, then the M negative pairs."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positive] = 1
    return F.cross_entropy(logits.float(), labels)


# ---------------------------------------------------------------------------------------------------------------
# LM
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


# ---------------------------------------------------------------------------------------------------------------
# momentum model
@torch.no_grad()
def ema_update(online: nn.Module, momentum: nn.Module, m: float) -> None:
    """``p_m <- m * p_m + (1 - m) * p`` for every parameter pair (same order; buffers are not averaged)."""
    po, pm = list(online.parameters()), list(momentum.parameters())
    if len(po) != len(pm):
        raise ValueError(f"online model has {len(po)} parameters, momentum model {len(pm)}")
    torch._foreach_mul_(pm, m)
    torch._foreach_add_(pm, [p.detach().to(q.dtype) for p, q in zip(po, pm)], alpha=1.0 - m)


class FeatureQueue(nn.Module):
    """Image / text feature queues ``[D, K]``, an image-id queue ``[1, K]`` and a write pointer.

    :meth:`enqueue` gathers the features of all ranks (rank order) and writes them at the pointer. A write that
    runs past the end continues at the start (wrap-around), so K need not be a multiple of the world batch
    (LAVIS/BLIP assert it is); a world batch larger than K keeps its last K entries. All index arithmetic
    stays on the device (no host synchronisation). Feature queues start as random unit vectors (as BLIP/ALBEF),
    the id queue as -100 (never an id of real data, so it matches nothing).
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor | None = None,
                gather: bool = True) -> None:
        """image_feat, text_feat: [B, D] (normalised, local); image_ids: [B] (None: -100).
        With ``gather`` the world batch [world * B, D] is written, as every rank must keep identical queues."""
        if image_ids is None:
            image_ids = torch.full((image_feat.shape[0],), -100, dtype=torch.long, device=image_feat.device)
        if gather:
            image_feat, text_feat, image_ids = (concat_all_gather(t) for t in (image_feat, text_feat, image_ids))
        n = image_feat.shape[0]
        if n > self.size:
            image_feat, text_feat, image_ids = image_feat[-self.size:], text_feat[-self.size:], image_ids[-self.size:]
            self.queue_ptr.add_(n - self.size)
            n = self.size
        index = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % self.size
        self.image_queue.index_copy_(1, index, image_feat.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, index, text_feat.T.to(self.text_queue.dtype))
        self.idx_queue.index_copy_(1, index, image_ids.view(1, -1).to(self.idx_queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.size)
