"""String-level API of the BLIP-2 LLM models: ``caption``, ``answer``, ``chat``.

It applies the conventions the tensor level leaves to the caller: the LLM tokenizer's own special tokens (OPT's
``</s>`` bos, T5's trailing ``</s>``), the "\\n" eos of OPT, the VQA prompt template, the chat transcript, and for
InstructBLIP the instruction given to the Q-Former as BERT ids. Images are paths, PIL images or a preprocessed
tensor [B, 3, H, W].
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import Tensor

from .blip2 import LAVIS_QUESTION_PROMPT
from .strings import Images, cached, image_batch, search_options



class LanguageInterface:
    """Mixin for :class:`blip.models.blip2_llm.Blip2LanguageModel` (uses ``config``, ``llm``, ``generate``)."""


    # ---- tokenizers ------------------------------------------------------------------------------------------
    def _tokenizer_source(self) -> str | None:
        cfg = self.config
        src = cfg.tokenizer if cfg.tokenizer is not None else cfg.llm
        return str(src) if isinstance(src, (str, Path)) else None

    def has_tokenizer(self) -> bool:
        return self.__dict__.get("_tokenizer") is not None or self._tokenizer_source() is not None

    @property
    def tokenizer(self):
        """The LLM tokenizer, loaded from ``config.tokenizer`` (or the ``llm`` directory) on first use."""
        def build():
            src = self._tokenizer_source()
            if src is None:
                raise ValueError("no LLM tokenizer: this model's LLM was built from a config; set model.tokenizer = "
                                 "<HF tokenizer> or create it with tokenizer=<directory>")
            from transformers import AutoTokenizer

            from ..checkpoints import hf_pretrained
            return hf_pretrained(AutoTokenizer, src)
        return cached(self, "_tokenizer", build)

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self.__dict__["_tokenizer"] = value

    @property
    def qformer_tokenizer(self):
        """InstructBLIP's Q-Former tokenizer: bert-base-uncased + [DEC], truncating on the left as LAVIS does."""
        def build():
            from ..data.tokenizer import get_tokenizer
            tok = get_tokenizer("blip2_qformer")
            tok.truncation_side = "left"
            return tok
        return cached(self, "_qformer_tokenizer", build)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def pixel_values(self, images: Images) -> Tensor:
        """Paths / PIL images / a preprocessed tensor -> [B, 3, S, S] (LAVIS eval transform at the model's size)."""
        return image_batch(self, images, self.config.vision.image_size, "blip2")

    def _encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        device = next(self.qformer.parameters()).device
        tok = self.tokenizer(prompts, padding="longest", return_tensors="pt")
        out = {"input_ids": tok.input_ids.to(device), "attention_mask": tok.attention_mask.to(device)}
        if self.instruct:
            q = self.qformer_tokenizer(prompts, padding="longest", truncation=True, max_length=128, return_tensors="pt")
            out["qformer_input_ids"] = q.input_ids.to(device)
            out["qformer_attention_mask"] = q.attention_mask.to(device)
        return out

    def max_positions(self) -> int | None:
        """Positions the decoder-only LLM has for the image queries, the prompt and the new tokens together
        (``max_position_embeddings``); None for an encoder-decoder (T5's relative positions set no limit)."""
        return None if self.is_seq2seq else getattr(self.llm.config, "max_position_embeddings", None)

    def check_generation_length(self, prompts: Sequence[str], max_new_tokens: int) -> None:
        """ValueError naming the limit, before anything runs, when the image queries, a prompt's tokens and
        ``max_new_tokens`` need more positions than the LLM has."""
        limit = self.max_positions()
        if limit is None:
            return
        queries = self.qformer.num_queries
        for prompt, ids in zip(prompts, self.tokenizer(list(prompts))["input_ids"]):
            if queries + len(ids) + max_new_tokens > limit:
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                raise ValueError(f"prompt {shown!r} is too long: {queries} image queries + {len(ids)} prompt tokens + "
                                 f"{max_new_tokens} new tokens = {queries + len(ids) + max_new_tokens} positions, but "
                                 f"the LLM has {limit} (max_position_embeddings); shorten the question or context "
                                 "to at most "
                                 f"{max(limit - queries - max_new_tokens, 0)} tokens or generate fewer new tokens")

    def complete(self, images: Images, prompts: Sequence[str], **gen) -> list[str]:
        """The LLM's continuation of each image's prompt, exactly as given (no template, no question cleaning): one
        prompt for every image or one per image. gen: :meth:`generate` options (``num_beams``, ``max_new_tokens``,
        ``do_sample``, per-row ``generator`` list, ...); sampling settings imply sampling, with one beam
        (:func:`blip.models.strings.search_options`). A prompt too long for the LLM's positions is refused first
        (:meth:`check_generation_length`)."""
        prompts = list(prompts)
        gen = search_options(gen, num_beams=1)
        self.check_generation_length(prompts, gen.get("max_new_tokens", 20))
        pixels = self.pixel_values(images)
        if len(prompts) == 1 and pixels.shape[0] > 1:
            prompts = prompts * pixels.shape[0]
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(prompts)} prompts")
        inputs = self._encode_prompts(prompts)
        ids = self.generate(pixels, **inputs, **gen)
        new = ids if self.is_seq2seq else ids[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    # ---- public ----------------------------------------------------------------------------------------------
    def caption_defaults(self) -> dict:
        """LAVIS ``generate`` defaults (5 beams, 30 new tokens, min_length 1, which for T5 counts the decoder start:
        0 new tokens), then this checkpoint's own (``config.generation``; the COCO-finetuned zoo models: 5 beams,
        30 tokens, min 8)."""
        return {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 0 if self.is_seq2seq else 1,
                **self.config.generation}

    def caption(self, images: Images, prompt: str | None = None, **gen) -> list[str]:
        """Captions with :meth:`caption_defaults` unless given; prompt: default ``config.prompt`` ("a photo of").
        Sampling settings (or ``do_sample``) sample with one beam instead of the default beam search."""
        prompt = self.config.prompt if prompt is None else prompt
        defaults = self.caption_defaults()
        return self.complete(images, [prompt], **{**defaults, **search_options(gen, defaults["num_beams"])})

    @property
    def question_template(self) -> str:
        """The VQA template: the one a VQA run trained with (``config.question_prompt``), else LAVIS's."""
        return self.config.question_prompt or LAVIS_QUESTION_PROMPT

    def answer(self, images: Images, questions: str | Sequence[str], prompt: str | None = None,
               *, num_beams: int | None = None, max_new_tokens: int = 10, min_new_tokens: int | None = None,
               length_penalty: float | None = None, **gen) -> list[str]:
        """Open-ended VQA as LAVIS's zero-shot VQA: questions cleaned by BLIP's ``pre_question`` (the
        ``blip_question`` processor), the prompt template (default: the one a VQA run trained with, else LAVIS's
        "Question: {} Short answer:"), 5 beams (one when sampling), 10 new tokens; OPT: length penalty 0, at least 1
        new token; T5: length penalty -1, min_length 1 counting the decoder start (0 new tokens)."""
        from ..data.text import pre_question
        prompt = self.question_template if prompt is None else prompt
        questions = [questions] if isinstance(questions, str) else list(questions)
        if min_new_tokens is None:
            min_new_tokens = 0 if self.is_seq2seq else 1
        if length_penalty is None:
            length_penalty = -1.0 if self.is_seq2seq else 0.0
        gen = search_options({**gen, "num_beams": num_beams}, num_beams=5)
        return self.complete(images, [prompt.format(pre_question(q)) for q in questions],
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             length_penalty=length_penalty, **gen)

    def chat(self, images: Images, turns: Sequence[str] | Sequence[Sequence[str]], *, num_beams: int | None = None,
             max_new_tokens: int = 30, min_new_tokens: int = 1, **gen) -> list[str]:
        """Multi-turn answers (5 beams, one when sampling). turns: [q1, a1, q2, a2, ..., qn] (shared by all images)
        or one such list per image; the earlier turns are the context: "Question: q1 Answer: a1. Question: q2 ..."."""
        per_image = [turns] if turns and isinstance(turns[0], str) else list(turns)
        gen = search_options({**gen, "num_beams": num_beams}, num_beams=5)
        return self.complete(images, [chat_prompt(t) for t in per_image], max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, **gen)


def chat_prompt(turns: Sequence[str]) -> str:
    """[q1, a1, ..., qn] -> "Question: q1 Answer: a1. ... Question: qn Answer:" (the BLIP-2 paper's chat format)."""
    if len(turns) % 2 != 1:
        raise ValueError("turns must alternate question, answer, ... and end with a question")
    parts = [f"Question: {q} Answer: {a.rstrip('.')}." for q, a in zip(turns[0:-1:2], turns[1::2])]
    return " ".join(parts + [f"Question: {turns[-1]} Answer:"])
