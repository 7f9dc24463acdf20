"""Captioning benchmarks (COCO Karpathy test, NoCaps): one caption per image with the family's protocol, scored
with the COCO caption metrics (NoCaps: per domain)."""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from ..data.eval_datasets import CaptionData
from ..models.family import Family
from .common import collate_pixels, image_dataset, protocol_for
from .sharding import EvalContext, run_pass

log = logging.getLogger("blip.evaluate")


def caption_images(model: nn.Module, family: Family, p: Mapping, pixels: torch.Tensor) -> list[str]:
    """One caption per image with the protocol ``p`` of ``family`` (BLIP lengths count the prompt tokens)."""
    if family == Family.BLIP:   # BLIP's lengths count the prompt tokens ([DEC] a picture of = 4)
        from ..data.tokenizer import caption_prompt_ids
        plen = caption_prompt_ids(model.tokenizer, p["prompt"], 1).shape[1]
        return model.caption(pixels, prompt=p["prompt"], num_beams=p["num_beams"],
                             max_new_tokens=p["max_length"] - plen, min_new_tokens=max(p["min_length"] - plen, 0),
                             repetition_penalty=p.get("repetition_penalty", 1.0))
    if family == Family.BLIP2_QFORMER:   # LAVIS's lengths count [DEC]
        return model.caption(pixels, num_beams=p["num_beams"], max_new_tokens=p["max_length"] - 1,
                             min_new_tokens=max(p["min_length"] - 1, 0))
    # LAVIS's min_length counts new tokens for decoder-only LLMs and the decoder start token for T5
    min_new = p["min_length"] - 1 if model.is_seq2seq else p["min_length"]
    return model.caption(pixels, prompt=p["prompt"], num_beams=p["num_beams"], max_new_tokens=p["max_new_tokens"],
                         min_new_tokens=max(min_new, 0), beam_length_convention="total")


def run_captioning(model: nn.Module, data: CaptionData, task: Mapping, ctx: EvalContext) -> tuple[list, dict]:
    from ..metrics.captioning import caption_metrics, nocaps_metrics, require_java, spice_status
    family, p = protocol_for(task, model)
    items = list(zip(data.image_ids, data.images))
    if data.references is not None:  # before any decoding: what scoring will need
        require_java()
        spice, why = spice_status(task.get("spice", "auto"))

    def compute(batch):
        pixels, index = batch
        captions = caption_images(model, family, p, pixels.to(ctx.device))
        return [{"image_id": data.image_ids[i], "caption": c} for i, c in zip(index, captions)]

    predictions = run_pass(ctx, "caption", image_dataset(model, items), collate_pixels, compute)
    if data.references is None or not ctx.is_main:
        return predictions, {}
    if why:
        log.warning(why)
    by_id = {r["image_id"]: r["caption"] for r in predictions}
    if data.domains is not None:
        metrics = nocaps_metrics(by_id, data.references, data.domains, spice=spice)
    else:
        metrics = caption_metrics(by_id, data.references, spice=spice)
    if why:
        metrics["SPICE_skipped"] = why
    return predictions, metrics
