"""The NLVR2 benchmark: BLIP's two-image classifier, one verdict per (left image, right image, sentence)."""
from __future__ import annotations

from functools import partial
from typing import Mapping

import torch
from torch import nn

from ..data.eval_datasets import NLVRData
from ..models.family import Family, family_of
from .common import image_preprocess
from .sharding import EvalContext, ListDataset, run_pass


def _load_pair(transform, item, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """item = (left path, right path) -> ([3, S, S], [3, S, S], index)."""
    from ..data.images import load_image
    return transform(load_image(item[0])), transform(load_image(item[1])), index


def _collate_pairs(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]), [s[2] for s in samples]


def run_nlvr(model: nn.Module, data: NLVRData, task: Mapping, ctx: EvalContext) -> tuple[list, dict]:
    """BLIP's NLVR2 evaluation (train_nlvr.py): argmax of the two-image classifier per sentence; accuracy in
    percent. predictions: [{"identifier", "prediction": "True" | "False"}] (the NLVR2 evaluation's fields)."""
    if not hasattr(model, "predict") or family_of(model) != Family.BLIP:
        raise ValueError(f"nlvr2 needs a BLIP NLVR2 model (task=nlvr), got {type(model).__name__}")
    dataset = ListDataset(data.images, partial(_load_pair, image_preprocess(model)))

    def compute(batch):
        left, right, index = batch
        verdicts = model.predict(left.to(ctx.device), right.to(ctx.device), [data.sentences[i] for i in index])
        return [{"identifier": data.identifiers[i], "prediction": str(bool(v))} for i, v in zip(index, verdicts)]

    predictions = run_pass(ctx, "nlvr", dataset, _collate_pairs, compute, unit="pair")
    if any(label is None for label in data.labels) or not ctx.is_main:
        return predictions, {}
    hits = [p["prediction"] == str(label) for p, label in zip(predictions, data.labels)]
    return predictions, {"accuracy": 100.0 * sum(hits) / len(hits)}
