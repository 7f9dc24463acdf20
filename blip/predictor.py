"""One front for labelling with any loaded model: ``caption``, ``answer`` (with the hosted BLIP-2 chat context) and
``match``, driven by one set of decoding settings. The CLI, ``blip caption-dir`` and ``blip serve`` all go through it.

Images arrive as preprocessed pixels [B, 3, S, S] (:meth:`Predictor.transform` makes them from decoded RGB images in
data-loader workers), so decoding and resizing never run on the device thread.

Prompts follow the hosted BLIP-2 predictor: a question becomes ``"Question: {q} Answer:"``, and a context (previous
turns, e.g. ``"Question: what is it? Answer: a cat."``) is put in front of it with a space.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch
from torch import Tensor, nn

from .generation import choose_search, sampling_settings_given
from .models.family import Family, family_of

DEFAULT_QUESTION = "What is this a picture of?"



class UsageError(ValueError):
    """A request the loaded model or the given options cannot serve; the message says what to change."""


@dataclass
class Decoding:
    """Decoding settings with one meaning for every family; None means the model's own default (BLIP's caption prompt
    "a picture of ", 3 beams, 16 new tokens; BLIP-2: the checkpoint's prompt, 5 beams, 30 new tokens).

    Sampling follows :func:`blip.generation.choose_search`: a sampling setting (temperature != 1, top_p < 1,
    top_k > 0) implies ``do_sample``, sampling uses one beam, and ``do_sample=False`` with a sampling setting (or
    sampling with beams) is refused. When sampling, top_p defaults to 0.9 (LAVIS's nucleus) and temperature to 1."""
    prompt: str | None = None
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    top_p: float | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        checks = [(self.num_beams is None or self.num_beams >= 1, "num_beams must be >= 1"),
                  (self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.min_new_tokens is None or self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
                  (self.top_p is None or 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
                  (self.top_k is None or self.top_k >= 0, "top_k must be >= 0"),
                  (self.temperature is None or self.temperature > 0.0, "temperature must be > 0"),
                  (self.repetition_penalty is None or self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.max_new_tokens is None or self.min_new_tokens is None
                   or self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be <= max_new_tokens")]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        self.search()

    def search(self) -> tuple[bool, int | None]:
        """(do_sample, num_beams) by :func:`blip.generation.choose_search`; UsageError for contradicting settings."""
        try:
            return choose_search(self.do_sample, self.num_beams, self.temperature, self.top_p, self.top_k)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def under(self, own: dict) -> Decoding:
        """A request's own settings (the fields it gave) over these defaults. A request that picks its search keeps
        it unmixed: sampling (do_sample or a sampling setting) drops the default beams; beam search (do_sample
        false or num_beams > 1) drops the default sampling settings."""
        base, sample = self, own.get("do_sample")
        if sample or (sample is None and sampling_settings_given(own.get("temperature"), own.get("top_p"),
                                                                 own.get("top_k"))):
            base = replace(base, num_beams=None)
        elif sample is False or (own.get("num_beams") or 1) > 1:
            base = replace(base, do_sample=None, top_p=None, temperature=None, top_k=None)
        return replace(base, **own)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def question_prompt(question: str, context: str | None = None, template: str | None = None) -> str:
    """The hosted BLIP-2 prompt: ``"[context ]Question: {question} Answer:"``; ``template``: a VQA run's own."""
    prompt = (template or "Question: {} Answer:").format(question)
    return f"{context.strip()} {prompt}" if context and context.strip() else prompt


class Predictor:
    """Wraps a model from :func:`blip.load`; ``name`` (how the user named the model) is reported with results."""

    def __init__(self, model: nn.Module, name: str = ""):
        self.model, self.name = model.eval(), name
        self.family = family_of(model)
        self.llm = self.family == Family.BLIP2_LLM
        # a VQA run recorded the question template it trained with; other models take the hosted one
        self.question_template = model.config.question_prompt if self.llm else None

    # ---- what the model can do ----------------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t, method in (("caption", "caption"), ("answer", "answer"), ("match", "match"))
                     if hasattr(self.model, method))

    def require(self, task: str) -> None:
        """Raise UsageError unless the model can do ``task`` ("any": at least one task)."""
        if task == "any" and not self.tasks:
            raise UsageError(f"{self.name or type(self.model).__name__} ({type(self.model).__name__}) has no "
                             "caption / answer / match: load a task model")
        if task != "any" and task not in self.tasks:
            kind = {"caption": "a captioning", "answer": "a VQA or BLIP-2 language", "match": "a retrieval / "
                    "BLIP-2 Q-Former"}[task]
            raise UsageError(f"{self.name or type(self.model).__name__} ({type(self.model).__name__}) cannot {task}: "
                             f"load {kind} model (it can: {', '.join(self.tasks) or 'nothing at string level'})")

    def check(self, task: str, decoding: Decoding | None = None, context: str | None = None,
              question: str | None = None) -> None:
        """Raise UsageError unless the model can do ``task`` with these settings, and (given ``decoding``) unless
        the prompt (caption prompt, or ``question`` with its ``context``) and the new tokens fit the model's
        positions: the limit is named before anything runs."""
        self.require(task)
        if task == "answer" and not self.llm:
            if context and context.strip():
                raise UsageError("a context (previous questions and answers) needs a BLIP-2 language model; BLIP VQA "
                                 "answers one question at a time")
            if decoding is not None and decoding.search()[0]:
                raise UsageError("BLIP VQA answers here with beam search (its sampling takes no per-image seed); "
                                 "sample with a BLIP-2 language model")
        if decoding is None or task == "match" or not hasattr(self.model, "check_generation_length"):
            return
        d = self.resolve(decoding, task)
        if task == "caption":
            prompt = d.prompt or ""
        else:
            prompt = question_prompt(question or "", context, self.question_template) if self.llm else (question or "")
        try:
            self.model.check_generation_length([prompt], d.max_new_tokens)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def transform(self):
        """Decoded RGB PIL image -> float32 [3, S, S] at this model's resolution (the eval transform)."""
        from .data.transforms import image_transform
        return image_transform(self.model.image_size, train=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _pixels(self, pixels: Tensor) -> Tensor:
        return pixels.to(self.device, self.dtype, non_blocking=True)

    # ---- tasks --------------------------------------------------------------------------------------------------
    def _defaults(self, task: str) -> dict:
        """The model's own defaults for ``task``: BLIP-2 LLM models' ``caption_defaults()`` (the checkpoint's own; T5
        min_length 1 counts the decoder start), used for answers too as the hosted predictor does; otherwise the
        keyword defaults of the model's ``caption`` / ``answer`` (BLIP's and LAVIS's lengths) and its
        ``default_num_beams``."""
        if self.llm:
            return {**self.model.caption_defaults(), "prompt": self.model.config.prompt if task == "caption" else None}
        params = inspect.signature(getattr(self.model, task)).parameters
        keys = ("num_beams", "max_new_tokens", "min_new_tokens", "prompt")
        own = {k: params[k].default if k in params else None for k in keys}
        return {**own, "num_beams": own["num_beams"] or getattr(self.model, "default_num_beams", None)}

    def resolve(self, d: Decoding, task: str = "caption") -> Decoding:
        """``d`` with the search decided (:meth:`Decoding.search`) and the model's defaults for ``task`` filled in
        (what the model will actually run); the sampling settings only when sampling."""
        own = self._defaults(task)
        sample, beams = d.search()
        return replace(d, prompt=d.prompt if d.prompt is not None else own["prompt"], do_sample=sample,
                       num_beams=beams or own["num_beams"], max_new_tokens=d.max_new_tokens or own["max_new_tokens"],
                       min_new_tokens=d.min_new_tokens if d.min_new_tokens is not None else own["min_new_tokens"],
                       top_p=(0.9 if d.top_p is None else d.top_p) if sample else None,
                       temperature=(1.0 if d.temperature is None else d.temperature) if sample else None,
                       top_k=d.top_k if sample else None)

    def settings(self, d: Decoding, task: str = "caption") -> dict:
        """The effective settings, as recorded next to results."""
        return self.resolve(d, task).as_dict()

    def _generation(self, d: Decoding, task: str, seeds: Sequence[int | None] | None, n: int) -> dict:
        d = self.resolve(d, task)
        gen = dict(num_beams=d.num_beams, max_new_tokens=d.max_new_tokens, min_new_tokens=d.min_new_tokens,
                   do_sample=d.do_sample)
        if d.do_sample:
            gen.update(top_p=d.top_p, temperature=d.temperature, generator=row_generators(seeds, n))
            if d.top_k is not None:
                gen["top_k"] = d.top_k
        if d.repetition_penalty is not None:
            gen["repetition_penalty"] = d.repetition_penalty
        return gen

    @torch.no_grad()
    def caption(self, pixels: Tensor, decoding: Decoding = Decoding(), seeds: Sequence[int | None] | None = None
                ) -> list[str]:
        """pixels [B, 3, S, S] -> B captions. seeds: one per image (None: unseeded) when sampling."""
        self.require("caption")
        gen = self._generation(decoding, "caption", seeds, pixels.shape[0])
        prompt = self.resolve(decoding).prompt
        if self.family == Family.BLIP2_QFORMER:
            if prompt:
                raise UsageError("the BLIP-2 Q-Former captions without a prompt")
            return self.model.caption(self._pixels(pixels), **gen)
        return self.model.caption(self._pixels(pixels), prompt=prompt, **gen)

    @torch.no_grad()
    def answer(self, pixels: Tensor, questions: Sequence[str], decoding: Decoding = Decoding(),
               contexts: Sequence[str | None] | None = None, seeds: Sequence[int | None] | None = None) -> list[str]:
        """pixels [B, 3, S, S] and B questions (one context per question, BLIP-2 only) -> B answers."""
        self.check("answer", decoding, next((c for c in contexts or () if c), None))
        if len(questions) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images for {len(questions)} questions")
        gen = self._generation(decoding, "answer", seeds, pixels.shape[0])
        if self.llm:
            contexts = contexts or [None] * len(questions)
            prompts = [question_prompt(q, c, self.question_template) for q, c in zip(questions, contexts)]
            return self.model.complete(self._pixels(pixels), prompts, **gen)
        # padded question positions masked: each answer is what the question alone gives, whatever its batch
        return self.model.answer(self._pixels(pixels), list(questions), num_beams=gen["num_beams"],
                                 max_new_tokens=gen["max_new_tokens"], min_new_tokens=gen["min_new_tokens"],
                                 mask_question_padding=True)

    @torch.no_grad()
    def match(self, pixels: Tensor, texts: Sequence[str]) -> list[dict]:
        """One image [1, 3, S, S] against texts -> [{"text", "itm", "itc"}]: ITM match probability and ITC cosine."""
        self.require("match")
        result = self.model.match(self._pixels(pixels), list(texts))
        return [{"text": t, "itm": float(a), "itc": float(b)}
                for t, a, b in zip(texts, result.itm_prob[0].tolist(), result.itc_sim[0].tolist())]


def row_generators(seeds: Sequence[int | None] | None, n: int) -> list[torch.Generator]:
    """One CPU generator per row: a seeded row samples the same tokens whatever else shares its batch."""
    seeds = list(seeds) if seeds is not None else [None] * n
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} rows")
    out = []
    for seed in seeds:
        g = torch.Generator()
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        out.append(g)
    return out
