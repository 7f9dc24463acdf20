"""The contrastive, matching and language-modelling losses of BLIP / BLIP-2, as small pure functions.

- :mod:`.itc`: image-text contrastive loss, momentum-distillation targets, same-image positives;
- :mod:`.itm`: hard-negative sampling and the 2-way matching loss;
- :mod:`.lm`: next-token loss;
- :mod:`.gather`: cross-rank gathers (identity in a single process); :mod:`.queue`: the momentum feature queue.
"""
from .gather import all_gather_with_grad, concat_all_gather, rank, world_size
from .itc import itc_loss, momentum_soft_targets, positive_targets
from .itm import hard_negative_weights, itm_loss, sample_hard_negatives
from .lm import lm_loss, lm_loss_from_hidden
from .queue import FeatureQueue

__all__ = ["FeatureQueue", "all_gather_with_grad", "concat_all_gather", "hard_negative_weights", "itc_loss",
           "itm_loss", "lm_loss", "lm_loss_from_hidden", "momentum_soft_targets", "positive_targets", "rank",
           "sample_hard_negatives", "world_size"]
