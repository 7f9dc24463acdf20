"""String-level conveniences of the BLIP task models: ``caption``, ``answer``, ``match``.

They apply the conventions the tensor API leaves to the caller: tokenization with the BLIP tokenizer (held lazily
as ``model.tokenizer``), ``[DEC]`` first for decoder inputs, ``[ENC]`` first for ITM and VQA questions, ``[CLS]``
for ITC, the caption prompt without its trailing ``[SEP]``, and BLIP's length counting.

Defaults reproduce the original BLIP code (salesforce/BLIP with the transformers 4.x it ran on); LAVIS behaves the
same way in every default below. Options give the alternatives:

- caption: ``max_length``/``min_length`` count the prompt tokens (``[DEC] a picture of`` = 4), beam scores use
  ``length_convention="total"`` (transformers 4.2x), the caption is the decoded text minus ``len(prompt)``
  characters (``strip_prompt="chars"``; ``"tokens"`` decodes only the new tokens instead).
- answer, generate: lengths count the ``[DEC]`` token, so ``min_length=1`` allows an empty answer; the decoder
  attends to padded question positions (``mask_question_padding=False``; True masks them).
- answer, rank: the top-k candidates by first-token probability, scored by label-smoothed (0.1) summed LM loss.

Images may be paths or PIL images. A file that cannot be decoded raises :class:`blip.data.images.ImageDecodeError`
naming it (the whole call fails: these are single-call conveniences, batch jobs should skip bad files themselves).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

ImageLike = str | os.PathLike | Image.Image
BLIP_VOCAB = 30524


class _StringAPI:
    """Mixin for BLIP task models (needs ``self.cfg`` and parameters)."""

    @property
    def tokenizer(self):
        """The BLIP tokenizer (bert-base-uncased + [DEC] + [ENC]), built on first use."""
        tok = self.__dict__.get("_tokenizer")
        if tok is None:
            if self.cfg.text.vocab_size != BLIP_VOCAB:
                raise ValueError(f"the string API needs the BLIP vocabulary ({BLIP_VOCAB} tokens); this model has "
                                 f"{self.cfg.text.vocab_size}: tokenize yourself and use the tensor API")
            from ..data.tokenizer import get_tokenizer
            tok = get_tokenizer("blip")
            self.__dict__["_tokenizer"] = tok
        return tok

    def _pixels(self, images: ImageLike | Sequence[ImageLike] | Tensor) -> Tensor:
        """Paths / PIL images / preprocessed [B, 3, S, S] -> [B, 3, S, S] on the model's device and dtype (BLIP eval
        transform)."""
        from ..data.images import load_image
        from ..data.transforms import image_transform
        p = next(self.parameters())
        if isinstance(images, Tensor):
            if images.ndim == 4 and images.shape[0] == 0:
                raise ValueError("no images given: the pixel tensor holds an empty batch")
            return (images[None] if images.ndim == 3 else images).to(device=p.device, dtype=p.dtype)
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given: pass at least one path, PIL image or tensor")
        transform = image_transform(self.cfg.image_size, train=False, kind="blip")
        batch = torch.stack([transform(load_image(img)) for img in images])
        return batch.to(device=p.device, dtype=p.dtype)

    def _tokens(self, texts: Sequence[str], first_token: int | None, max_length: int = 35,
                allow_empty: bool = False) -> tuple[Tensor, Tensor]:
        from ..data.tokenizer import tokenize, with_first_token
        enc = tokenize(self.tokenizer, texts, max_length=max_length, allow_empty=allow_empty)
        ids = enc["input_ids"] if first_token is None else with_first_token(enc["input_ids"], first_token)
        device = next(self.parameters()).device
        return ids.to(device), enc["attention_mask"].to(device)


class CaptionStrings(_StringAPI):
    @torch.no_grad()
    def caption(self, images: ImageLike | Sequence[ImageLike], prompt: str = "a picture of ", *, num_beams: int = 3,
                max_length: int = 20, min_length: int = 5, do_sample: bool = False, top_p: float = 0.9,
                top_k: int = 50, repetition_penalty: float | None = None, length_penalty: float = 1.0,
                length_convention: str = "total", strip_prompt: str = "chars",
                generator: torch.Generator | None = None) -> list[str]:
        """One caption per image. Lengths count the prompt tokens ([DEC] included), as BLIP does.

        do_sample: nucleus sampling with ``top_p`` (beams ignored) after ``top_k`` (50: the transformers default BLIP
        sampled with); repetition_penalty defaults to BLIP's 1.1 when sampling and 1.0 otherwise.
        """
        from ..data.tokenizer import caption_prompt_ids
        if strip_prompt not in ("chars", "tokens"):
            raise ValueError(f"strip_prompt must be 'chars' or 'tokens', got {strip_prompt!r}")
        pixels = self._pixels(images)
        ids = caption_prompt_ids(self.tokenizer, prompt, pixels.shape[0]).to(pixels.device)
        plen = ids.shape[1]
        if max_length <= plen:
            raise ValueError(f"max_length={max_length} leaves no room after the {plen} prompt tokens")
        if repetition_penalty is None:
            repetition_penalty = 1.1 if do_sample else 1.0
        out = self.generate(pixels, ids, max_new_tokens=max_length - plen, min_new_tokens=max(min_length - plen, 0),
                            num_beams=1 if do_sample else num_beams, do_sample=do_sample, top_p=top_p,
                            top_k=top_k if do_sample else 0,
                            repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                            beam_length_convention=length_convention, generator=generator)
        if strip_prompt == "tokens":
            return [t.strip() for t in self.tokenizer.batch_decode(out[:, plen:], skip_special_tokens=True)]
        return [t[len(prompt):] for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class VQAStrings(_StringAPI):
    @torch.no_grad()
    def answer(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str], *,
               method: str = "generate", answer_list: Sequence[str] | None = None, k: int = 128,
               num_beams: int = 3, max_length: int = 10, min_length: int = 1, mask_question_padding: bool = False,
               length_convention: str = "total") -> list[str]:
        """One answer per (image, question); one image may serve every question. method "generate" (open-ended;
        lengths count [DEC]) or "rank" (choose from ``answer_list`` with BLIP's ranking over the top-``k``
        candidates). Questions are cleaned by BLIP's ``pre_question`` first, as BLIP's VQA datasets do."""
        from ..data.text import pre_question
        questions = [pre_question(q) for q in ([questions] if isinstance(questions, str) else questions)]
        pixels = self._pixels(images)
        if pixels.shape[0] == 1:
            pixels = pixels.expand(len(questions), -1, -1, -1)
        if pixels.shape[0] != len(questions):
            raise ValueError(f"{pixels.shape[0]} images for {len(questions)} questions: pass one image, or one per "
                             "question")
        q_ids, q_mask = self._tokens(questions, self.cfg.enc_token_id)
        if method == "rank":
            if not answer_list:
                raise ValueError("method='rank' needs an answer_list")
            from ..data.tokenizer import tokenize, with_first_token
            enc = tokenize(self.tokenizer, list(answer_list), max_length=512)
            a_ids = with_first_token(enc["input_ids"], self.cfg.bos_token_id).to(pixels.device)
            ranked = self.rank_answers(pixels, q_ids, q_mask, a_ids, enc["attention_mask"].to(pixels.device), k=k)
            return [answer_list[i] for i in ranked.answer_index.tolist()]
        if method != "generate":
            raise ValueError(f"method must be 'generate' or 'rank', got {method!r}")
        out = self.generate(pixels, q_ids, q_mask, mask_question_padding=mask_question_padding,
                            max_new_tokens=max_length - 1, min_new_tokens=max(min_length - 1, 0), num_beams=num_beams,
                            beam_length_convention=length_convention)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


@dataclass
class MatchResult:
    """itm_prob [N]: ITM probability that image i matches text i; itc_sim [N]: their ITC cosine similarity."""
    itm_prob: Tensor
    itc_sim: Tensor


class MatchStrings(_StringAPI):
    @torch.no_grad()
    def match(self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str],
              max_length: int = 35) -> MatchResult:
        """Score pairs (image i, text i); one image is paired with every text. ITM text starts with [ENC], ITC with
        [CLS] (BLIP's conventions)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        pixels = self._pixels(images)
        if pixels.shape[0] not in (1, len(texts)):
            raise ValueError(f"{pixels.shape[0]} images for {len(texts)} texts: pass one image, or one per text")
        image_embeds = self.image_embeds(pixels).expand(len(texts), -1, -1)
        itm_ids, mask = self._tokens(texts, self.cfg.enc_token_id, max_length)
        itm = self.itm_logits_from_embeds(image_embeds, itm_ids, mask).softmax(-1)[:, 1]
        itc_ids, mask = self._tokens(texts, None, max_length)
        image_feat = torch.nn.functional.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        itc = (image_feat * self.encode_text(itc_ids, mask)).sum(-1)
        return MatchResult(itm_prob=itm, itc_sim=itc)
