"""What every benchmark task runner shares: the protocol of the model's family, and image datasets in the model's
eval transform whose pixels are decoded in the DataLoader workers.

A runner (:mod:`.caption`, :mod:`.vqa`, :mod:`.retrieval`, :mod:`.nlvr2`) takes a loaded model, the dataset
(:mod:`blip.data.eval_datasets`), the task config (its ``protocol`` block holds one entry per model family:
``blip``, ``blip2_qformer``, ``blip2_llm``) and an :class:`~blip.evaluation.sharding.EvalContext`, and returns
``(predictions, metrics)`` on every rank. Decoding goes through the models' string API, so the conventions (prompts,
[DEC]/[ENC], BLIP's length counting) live in one place.
"""
from __future__ import annotations

from functools import partial
from typing import Mapping

import torch
from torch import nn

from ..models.family import Family, family_of
from .sharding import ListDataset


def protocol_for(task: Mapping, model: nn.Module) -> tuple[Family, Mapping]:
    """(family, the task's protocol settings for that family); a clear error when the task has none."""
    family = family_of(model)
    protocols = task["protocol"]
    if family not in protocols:
        raise ValueError(f"task {task['name']} has no protocol for {family} models ({type(model).__name__}); it "
                         f"evaluates {sorted(protocols)} checkpoints")
    return family, protocols[family]


def image_preprocess(model: nn.Module):
    """The model's eval transform: bicubic resize to its own image size, CLIP normalisation (BLIP and BLIP-2 alike)."""
    from ..data.transforms import image_transform
    return image_transform(model.image_size, train=False)


def load_pixels(transform, item, index: int) -> tuple[torch.Tensor, int]:
    """item = (anything, image path) -> ([3, S, S], index); runs in the DataLoader workers."""
    from ..data.images import load_image
    return transform(load_image(item[1])), index


def collate_pixels(samples: list) -> tuple[torch.Tensor, list[int]]:
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


def image_dataset(model: nn.Module, items: list) -> ListDataset:
    return ListDataset(items, partial(load_pixels, image_preprocess(model)))
