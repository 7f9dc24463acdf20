"""String-level conveniences of the BLIP task models: ``caption``, ``answer``, ``match``.

They apply the conventions the tensor API leaves to the caller: tokenization with the BLIP tokenizer (held lazily
as ``model.tokenizer``), ``[DEC]`` first for decoder inputs, ``[ENC]`` first for ITM and VQA questions, ``[CLS]``
for ITC and the caption prompt without its trailing ``[SEP]``. Keywords follow :mod:`blip.models.strings`
(``max_new_tokens`` / ``min_new_tokens`` count generated tokens only).

Defaults reproduce the original BLIP code (salesforce/BLIP with the transformers 4.x it ran on); LAVIS behaves the
same way in every default below. Options give the alternatives:

- caption: BLIP's max_length 20 / min_length 5 counted the prompt tokens (``[DEC] a picture of`` = 4): 16 / 1 new
  tokens; beam scores use ``length_convention="total"`` (transformers 4.2x), the caption is the decoded text minus
  ``len(prompt)`` characters (``strip_prompt="chars"``; ``"tokens"`` decodes only the new tokens instead).
- answer, generate: BLIP's max_length 10 / min_length 1 counted ``[DEC]``: 9 / 0 new tokens (an empty answer is
  allowed); the decoder attends to padded question positions (``mask_question_padding=False``; True masks them).
- answer, rank: the top-k candidates by first-token probability, scored by label-smoothed (0.1) summed LM loss.

Images may be paths, PIL images or a preprocessed tensor. A file that cannot be decoded raises
:class:`blip.data.images.ImageDecodeError` naming it (the whole call fails: these are single-call conveniences, batch
jobs should skip bad files themselves).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..nn.transformer import check_length
from .strings import Images, MatchResult, cached, image_batch, search_options

BLIP_VOCAB = 30524


class _StringAPI:
    """Mixin for BLIP task models (needs ``self.cfg`` and parameters)."""

    @property
    def tokenizer(self):
        """The BLIP tokenizer (bert-base-uncased + [DEC] + [ENC]), built on first use."""
        if self.cfg.text.vocab_size != BLIP_VOCAB:
            raise ValueError(f"the string API needs the BLIP vocabulary ({BLIP_VOCAB} tokens); this model has "
                             f"{self.cfg.text.vocab_size}: tokenize yourself and use the tensor API")
        from ..data.tokenizer import get_tokenizer
        return cached(self, "_tokenizer", lambda: get_tokenizer("blip"))

    def _pixels(self, images: Images) -> Tensor:
        """Paths / PIL images / a preprocessed tensor -> [B, 3, S, S] (BLIP eval transform), model device and dtype."""
        return image_batch(self, images, self.cfg.image_size, "blip")

    def _tokens(self, texts: Sequence[str], first_token: int | None, max_length: int = 35,
                allow_empty: bool = False) -> tuple[Tensor, Tensor]:
        from ..data.tokenizer import tokenize_to
        return tokenize_to(self.tokenizer, texts, max_length, next(self.parameters()).device, first_token=first_token,
                           allow_empty=allow_empty)


class CaptionStrings(_StringAPI):
    default_num_beams = 3   # beam search's width when the caller gives none (BLIP's)

    def check_generation_length(self, prompts: Sequence[str], max_new_tokens: int) -> None:
        """ValueError naming the limit when ``[DEC] prompt`` + ``max_new_tokens`` exceed the decoder's positions."""
        from ..data.tokenizer import caption_prompt_ids
        for prompt in prompts:
            check_length(caption_prompt_ids(self.tokenizer, prompt, 1).shape[1] + max_new_tokens,
                         self.cfg.text.max_position_embeddings, "prompt + max_new_tokens")

    @torch.no_grad()
    def caption(self, images: Images, prompt: str = "a picture of ", *, max_new_tokens: int = 16,
                min_new_tokens: int = 1, num_beams: int | None = None, do_sample: bool | None = None,
                top_p: float | None = None, temperature: float | None = None,
                repetition_penalty: float | None = None, top_k: int | None = None, length_penalty: float = 1.0,
                length_convention: str = "total", strip_prompt: str = "chars",
                generator: torch.Generator | None = None) -> list[str]:
        """One caption per image: up to ``max_new_tokens`` after the prompt (BLIP's max_length 20 / min_length 5
        with its 4-token prompt ``[DEC] a picture of``).

        Beam search with 3 beams, or nucleus sampling when ``do_sample`` or a sampling setting (temperature != 1,
        top_p < 1, top_k > 0) is given (:func:`blip.models.strings.search_options`): top_p 0.9 after top_k 50 (the
        transformers default BLIP sampled with) unless given, one beam; repetition_penalty defaults to BLIP's 1.1
        when sampling and 1.0 otherwise.
        """
        from ..data.tokenizer import caption_prompt_ids
        if strip_prompt not in ("chars", "tokens"):
            raise ValueError(f"strip_prompt must be 'chars' or 'tokens', got {strip_prompt!r}")
        search = search_options(dict(do_sample=do_sample, num_beams=num_beams, temperature=temperature, top_p=top_p,
                                     top_k=top_k), num_beams=self.default_num_beams)
        sampling = search["do_sample"]
        pixels = self._pixels(images)
        ids = caption_prompt_ids(self.tokenizer, prompt, pixels.shape[0]).to(pixels.device)
        if repetition_penalty is None:
            repetition_penalty = 1.1 if sampling else 1.0
        out = self.generate(pixels, ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                            num_beams=search["num_beams"], do_sample=sampling, top_p=search.get("top_p", 0.9),
                            top_k=search.get("top_k", 50) if sampling else 0,
                            temperature=search.get("temperature", 1.0), repetition_penalty=repetition_penalty,
                            length_penalty=length_penalty, beam_length_convention=length_convention,
                            generator=generator)
        if strip_prompt == "tokens":
            return [t.strip() for t in self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
        return [t[len(prompt):] for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class VQAStrings(_StringAPI):
    default_num_beams = 3   # beam search's width when the caller gives none (BLIP's)

    def check_generation_length(self, prompts: Sequence[str], max_new_tokens: int) -> None:
        """ValueError naming the limit when ``[DEC]`` + ``max_new_tokens`` exceed the answer decoder's positions
        (questions are truncated to 35 tokens, as BLIP's VQA does: they never run over)."""
        check_length(1 + max_new_tokens, self.cfg.text.max_position_embeddings, "[DEC] + max_new_tokens")

    @torch.no_grad()
    def answer(self, images: Images, questions: str | Sequence[str], *, method: str = "generate",
               answer_list: Sequence[str] | None = None, k: int = 128, max_new_tokens: int = 9,
               min_new_tokens: int = 0, num_beams: int | None = None, do_sample: bool | None = None,
               top_p: float | None = None, temperature: float | None = None, repetition_penalty: float = 1.0,
               mask_question_padding: bool = False, length_convention: str = "total") -> list[str]:
        """One answer per (image, question); one image may serve every question. method "generate" (open-ended; the
        defaults are BLIP's max_length 10 / min_length 1, which count [DEC]) or "rank" (choose from ``answer_list``
        with BLIP's ranking over the top-``k`` candidates). Questions are cleaned by BLIP's ``pre_question`` first,
        as BLIP's VQA datasets do. Generation: 3 beams, or nucleus sampling (top_p 0.9, one beam) when ``do_sample``
        or a sampling setting is given (:func:`blip.models.strings.search_options`)."""
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
        search = search_options(dict(do_sample=do_sample, num_beams=num_beams, temperature=temperature, top_p=top_p),
                                num_beams=self.default_num_beams)
        out = self.generate(pixels, q_ids, q_mask, mask_question_padding=mask_question_padding,
                            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                            num_beams=search["num_beams"], do_sample=search["do_sample"],
                            top_p=search.get("top_p", 0.9), temperature=search.get("temperature", 1.0),
                            repetition_penalty=repetition_penalty, beam_length_convention=length_convention)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


class MatchStrings(_StringAPI):
    @torch.no_grad()
    def match(self, images: Images, texts: str | Sequence[str], max_length: int = 35) -> MatchResult:
        """Every image against every text: ITM probability and ITC cosine, each [images, texts]. ITM text starts with
        [ENC], ITC with [CLS] (BLIP's conventions)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        pixels = self._pixels(images)
        n_img, n_txt = pixels.shape[0], len(texts)
        image_embeds = self.image_embeds(pixels)                                          # [I, 1 + N, W]
        itm_ids, itm_mask = self._tokens(texts, self.cfg.enc_token_id, max_length)
        logits = self.itm_logits_from_embeds(image_embeds.repeat_interleave(n_txt, 0), itm_ids.repeat(n_img, 1),
                                             itm_mask.repeat(n_img, 1))
        itc_ids, itc_mask = self._tokens(texts, None, max_length)
        image_feat = torch.nn.functional.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        itc = image_feat @ self.encode_text(itc_ids, itc_mask).T
        return MatchResult(itm_prob=logits.softmax(-1)[:, 1].view(n_img, n_txt), itc_sim=itc)
