"""String-level API of the BLIP-2 stage-1 model (:class:`blip.models.blip2_qformer.Blip2Qformer`): ``caption``,
``match``.

It applies LAVIS's conventions on top of the tensor API: the Q-Former tokenizer (bert-base-uncased + ``[DEC]``, held
lazily as ``model.tokenizer``), texts keeping ``[CLS]`` for ITC and ITM, captions decoded after the default ``[DEC]``
prompt, and LAVIS ``Blip2Qformer.generate``'s defaults. Keywords follow :mod:`blip.models.strings`. Images are paths,
PIL images or a preprocessed tensor [B, 3, H, W].
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..nn.transformer import check_length
from .strings import Images, MatchResult, cached, image_batch, search_options


class QformerStrings:
    """Mixin for :class:`blip.models.blip2_qformer.Blip2Qformer` (uses ``cfg``, ``generate``, ``image_features``,
    ``itm_logits_from_features``, ``itc_similarity_from_features``)."""

    default_num_beams = 3   # beam search's width when the caller gives none (LAVIS's)

    def pixel_values(self, images: Images) -> Tensor:
        """Paths / PIL images / a preprocessed tensor -> [B, 3, S, S] (LAVIS eval transform at the model's size)."""
        return image_batch(self, images, self.cfg.vision.image_size, "blip2")

    @property
    def tokenizer(self):
        """bert-base-uncased + [DEC] (30523 tokens), loaded on first use."""
        from ..data.tokenizer import get_tokenizer
        return cached(self, "_tokenizer", lambda: get_tokenizer("blip2_qformer"))

    @torch.no_grad()
    def match(self, images: Images, texts: str | list[str], max_length: int = 35) -> MatchResult:
        """Every image against every text, each [images, texts]: ITM probability (ITM head averaged over the query
        outputs) and ITC cosine (max over queries). Texts keep [CLS] (LAVIS's Q-Former encoder convention)."""
        from ..data.tokenizer import tokenize_to
        pixels = self.pixel_values(images)
        ids, mask = tokenize_to(self.tokenizer, texts, max_length, pixels.device)
        vit = self.image_features(pixels)                                                  # [I, 1 + N, W]
        bi, bt = vit.shape[0], ids.shape[0]
        logits = self.itm_logits_from_features(vit.repeat_interleave(bt, 0), ids.repeat(bi, 1), mask.repeat(bi, 1))
        itc = self.itc_similarity_from_features(vit, ids, mask)
        return MatchResult(itm_prob=logits.softmax(-1)[:, 1].view(bi, bt), itc_sim=itc)

    def check_generation_length(self, prompts: Sequence[str], max_new_tokens: int) -> None:
        """ValueError naming the limit when ``[DEC]`` + ``max_new_tokens`` exceed the Q-Former's text positions
        (it captions without a prompt)."""
        check_length(1 + max_new_tokens, self.cfg.qformer.text.max_position_embeddings, "[DEC] + max_new_tokens")

    @torch.no_grad()
    def caption(self, images: Images, *, max_new_tokens: int = 29, min_new_tokens: int = 9,
                num_beams: int | None = None, **gen) -> list[str]:
        """Q-Former captions with LAVIS's ``Blip2Qformer.generate`` defaults (its max_length 30 / min_length 10
        count the [DEC] token; 3 beams, one when sampling). gen: the other :mod:`blip.models.strings` keywords."""
        gen.setdefault("beam_length_convention", "total")
        gen = search_options({**gen, "num_beams": num_beams}, num_beams=self.default_num_beams)
        ids = self.generate(self.pixel_values(images), max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                            **gen)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
