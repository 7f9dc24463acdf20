"""Batching of decoded samples into the training batch dict every model takes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def collate_image_text(samples: Sequence[dict]) -> dict:
    """[{"pixel_values": [3,H,W], "text": str, "image_id": int}] → {"pixel_values": [B,3,H,W], "text": list[str],
    "image_ids": LongTensor [B]}. Models tokenize the text themselves. Any other key (the sample "key", VQA
    "answers") becomes a list over the batch."""
    batch = {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "text": [s["text"] for s in samples],
        "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
    }
    for key in samples[0].keys() - {"pixel_values", "text", "image_id"}:
        batch[key] = [s[key] for s in samples]
    return batch
