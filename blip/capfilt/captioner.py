"""CapFilt's captioner step: sample synthetic captions, each from its own random stream.

A caption's stream is seeded by (seed, sample key, caption index), so the captions of an image do not depend on the
batch, the chunk size or the number of ranks (a resumed run writes the same bytes).
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..data.tokenizer import caption_prompt_ids


def sample_seed(seed: int, key: str, caption: int) -> int:
    """A 63-bit seed for one synthetic caption of one sample, stable across runs, processes and batchings."""
    digest = hashlib.blake2b(f"{seed}:{key}:{caption}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def sample_captions(captioner: nn.Module, tokenizer, pixels: torch.Tensor, keys: list[str], cfg,
                    device: torch.device) -> list[list[str]]:
    """pixels [B, 3, H, W] -> B lists of ``cfg.num_captions`` captions sampled by a BLIP caption model (nucleus
    ``top_p``, lengths counting the prompt as BLIP does; the prompt is stripped). ``keys`` [B] seed each caption.
    cfg: a :class:`blip.capfilt.CapFiltConfig`."""
    n = cfg.num_captions
    pixels = pixels.repeat_interleave(n, dim=0)
    ids = caption_prompt_ids(tokenizer, cfg.prompt, pixels.shape[0]).to(device)
    plen = ids.shape[1]
    out = captioner.generate(pixels, ids, max_new_tokens=cfg.max_length - plen,
                             min_new_tokens=max(cfg.min_length - plen, 0), do_sample=True, top_p=cfg.top_p,
                             repetition_penalty=cfg.repetition_penalty,
                             generator=[torch.Generator().manual_seed(sample_seed(cfg.seed, key, j))
                                        for key in keys for j in range(n)])
    texts = [t[len(cfg.prompt):].strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return [texts[i * n:(i + 1) * n] for i in range(len(texts) // n)]
