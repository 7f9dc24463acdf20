"""A frozen image encoder for the embedded BLIP-2 default that has learned something: a tiny ViT trained once to name
each synthetic image's size, colour, shape and position, cached next to the synthetic data.

BLIP-2 trains its Q-Former against a frozen, pretrained image encoder (EVA ViT-g, CLIP ViT-L). Offline there is
none to download, so this supervised stand-in takes its place (as the tiny OPT's language-model warm-up stands in for
a pretrained LLM). It is a pure function of its settings: the first run trains it (seconds on a CPU) and writes
``vision-<hash>.safetensors`` atomically; later runs (and every rank) read that file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.synthetic import ATTRIBUTES, COLORS, POSITIONS, SHAPES, SIZES, default_cache_root, render_sample
from ..nn.vit import VisionConfig, VisionTransformer

log = logging.getLogger("blip.train")
CLASSES = (SIZES, tuple(COLORS), SHAPES, POSITIONS)
VERSION = 2   # bump when the recipe below changes, so a stale encoder is not reused (2: trained on one thread)


def _rendered(num: int, render_size: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[num, 3, S, S] eval-transformed images and [num, 4] attribute labels, rendered from ``seed``."""
    from ..data.transforms import image_transform

    transform = image_transform(image_size, train=False, kind="blip2")
    rng = np.random.default_rng([seed, 7])
    images, labels = [], []
    for _ in range(num):
        image, attrs = render_sample(rng, render_size)
        images.append(transform(image))
        labels.append([options.index(attrs[a]) for a, options in zip(ATTRIBUTES, CLASSES)])
    return torch.stack(images), torch.tensor(labels)


def train_attribute_encoder(vision: VisionConfig, *, steps: int, batch_size: int, num_images: int, render_size: int,
                            seed: int) -> tuple[VisionTransformer, nn.Linear]:
    """A ViT whose class token predicts the four attributes (one linear head each, concatenated in ``head``),
    trained with AdamW. Returns (vit, head), both in eval mode."""
    torch.manual_seed(seed)
    vit = VisionTransformer(vision)
    head = nn.Linear(vision.width, sum(len(c) for c in CLASSES))
    images, labels = _rendered(num_images, render_size, vision.image_size, seed)
    params = [*vit.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        logits = head(vit(images[idx])[:, 0]).split([len(c) for c in CLASSES], dim=-1)
        loss = sum(F.cross_entropy(lg, labels[idx, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("synthetic image encoder: step %d/%d, attribute loss %.3f", step + 1, steps, loss.item())
    return vit.eval(), head.eval()


def ensure_synthetic_vision_encoder(vision: VisionConfig, cache_dir: str | Path | None = None, *, steps: int = 800,
                                    batch_size: int = 64, num_images: int = 4096, render_size: int = 64,
                                    seed: int = 0) -> Path:
    """The cached encoder file for ``vision`` (trained on first use). Returns its path (a timm/EVA-named
    safetensors state dict: load it with ``model.vision_init=<path>``)."""
    from safetensors.torch import save_file

    params = dict(v=VERSION, vision=dataclasses.asdict(vision), steps=steps, batch_size=batch_size,
                  num_images=num_images, render_size=render_size, seed=seed)
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    base = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = base / f"vision-{tag}.safetensors"
    if target.exists():
        return target
    log.info("training the synthetic image encoder once (cached as %s): a stand-in for a pretrained frozen encoder",
             target)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the thread count changes float sums and so the weights: one, whatever the run uses
    try:
        vit, _ = train_attribute_encoder(vision, steps=steps, batch_size=batch_size, num_images=num_images,
                                         render_size=render_size, seed=seed)
    finally:
        torch.set_num_threads(threads)
    base.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".vision-{tag}-", suffix=".tmp", dir=base)
    os.close(fd)
    try:
        weights = {k: v.contiguous() for k, v in vit.state_dict().items()}
        save_file(weights, tmp, metadata={"params": json.dumps(params)})
        os.replace(tmp, target)   # atomic: parallel ranks each write their own temp file, one rename wins
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
