"""CapFilt's filter step: a BLIP retrieval model's ITM head scores each (image, caption) pair; captions whose match
probability is under the threshold are dropped (BLIP: ITM, threshold 0.5)."""
from __future__ import annotations

import torch
from torch import nn

from ..data.tokenizer import ENC_TOKEN_ID, tokenize_to


@torch.no_grad()
def itm_match_scores(filter_model: nn.Module, tokenizer, pixels: torch.Tensor, texts: list[list[str]],
                     device: torch.device) -> list[list[float]]:
    """pixels [B, 3, H, W], texts: B lists of captions -> the ITM match probability of every (image i, text) for the
    texts of image i. Texts start with [ENC] (BLIP's ITM convention); empty texts are scored too."""
    counts = [len(t) for t in texts]
    flat = [t for ts in texts for t in ts]
    if not flat:
        return [[] for _ in texts]
    image_embeds = filter_model.image_embeds(pixels)
    image_embeds = image_embeds.repeat_interleave(torch.tensor(counts, device=device), dim=0)
    ids, mask = tokenize_to(tokenizer, flat, 35, device, first_token=ENC_TOKEN_ID, allow_empty=True)
    logits = filter_model.itm_logits_from_embeds(image_embeds, ids, mask)
    probs = logits.float().softmax(-1)[:, 1].tolist()
    out, i = [], 0
    for n in counts:
        out.append(probs[i:i + n])
        i += n
    return out


def keep_caption(text: str, score: float, threshold: float, filtered: bool) -> bool:
    """The filter's verdict: a non-empty caption is kept unless it is filtered and scores under ``threshold``."""
    return bool(text) and (not filtered or score >= threshold)
