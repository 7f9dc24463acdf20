"""The string-level contract every model family follows: images in, text out.

- images: paths, PIL images, or a preprocessed tensor [B, 3, S, S] / [3, S, S]; :func:`image_batch` makes the
  [B, 3, S, S] batch on the model's device and in its dtype (the family's eval transform at the model's size);
- generation keywords, with one meaning everywhere: ``max_new_tokens`` / ``min_new_tokens`` count generated tokens
  (never the prompt), ``num_beams``, ``do_sample``, ``top_p``, ``top_k``, ``temperature``, ``repetition_penalty``;
  sampling settings imply sampling and sampling uses one beam (:func:`search_options`);
- ``check_generation_length(prompts, max_new_tokens)``: a ValueError naming the model's position limit, before
  anything runs, when a prompt and the new tokens would not fit;
- ``match(images, texts) -> MatchResult``: every image against every text;
- tokenizers are built on first use (:func:`cached`), so ``import blip`` and building a model stay light.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from ..generation import choose_search

ImageLike = str | os.PathLike | Image.Image
Images = ImageLike | Sequence[ImageLike] | Tensor


@dataclass
class MatchResult:
    """itm_prob [I, T]: ITM probability that image i matches text t; itc_sim [I, T]: their ITC cosine similarity."""
    itm_prob: Tensor
    itc_sim: Tensor


def image_batch(model: nn.Module, images: Images, image_size: int, kind: str) -> Tensor:
    """Paths / PIL images / a preprocessed tensor -> [B, 3, S, S] on ``model``'s device, in its dtype.

    kind: the eval transform ("blip": BLIP's, "blip2": LAVIS BLIP-2's). A file that cannot be decoded raises
    :class:`blip.data.images.ImageDecodeError` naming it."""
    p = next(model.parameters())
    if isinstance(images, Tensor):
        batch = images[None] if images.ndim == 3 else images
        if batch.shape[0] == 0:
            raise ValueError("no images given: the pixel tensor holds an empty batch")
    else:
        from ..data.images import load_image
        from ..data.transforms import image_transform
        images = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        if not images:
            raise ValueError("no images given: pass at least one path, PIL image or tensor")
        transform = image_transform(image_size, train=False, kind=kind)
        batch = torch.stack([transform(load_image(im)) for im in images])
    return batch.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)


def search_options(gen: dict, num_beams: int | None) -> dict:
    """Generation keywords as the caller gave them (None: not given) with ``do_sample`` and ``num_beams`` decided by
    :func:`blip.generation.choose_search` (``num_beams``: this API's beam-search default) and the Nones dropped."""
    do_sample, beams = choose_search(gen.get("do_sample"), gen.get("num_beams"), gen.get("temperature"),
                                     gen.get("top_p"), gen.get("top_k"))
    out = {k: v for k, v in gen.items() if v is not None}
    out.update(do_sample=do_sample, num_beams=beams if beams is not None else num_beams)
    return out


def cached(owner: nn.Module, name: str, build: Callable[[], object]) -> object:
    """``owner.<name>``, built by ``build()`` on first use and kept outside the module's state (tokenizers)."""
    value = owner.__dict__.get(name)
    if value is None:
        value = owner.__dict__[name] = build()
    return value
