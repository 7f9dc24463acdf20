"""Text cleaning exactly as BLIP and LAVIS do it (``pre_caption`` for captions, ``pre_question`` for VQA questions).

Captions: lowercase; each of ``. ! " ( ) * # : ; ~`` becomes a space; runs of 2+ whitespace characters become one
space; trailing newline and surrounding spaces are trimmed; the first ``max_words`` space-separated words are kept.
Apostrophes, commas, question marks, hyphens, slashes and ``<person>`` are kept as they are.
Questions: lowercase; the same characters are *deleted* (not spaced); trailing spaces trimmed; first ``max_words``.
"""

from __future__ import annotations

import re
from functools import partial

_BLIP_PUNCT = re.compile(r"[.!\"()*#:;~]")
_RUNS_OF_SPACE = re.compile(r"\s{2,}")
CAPTION_WORDS = 30    # BLIP's pretraining and caption / retrieval datasets (max_words=30)
QUESTION_WORDS = 50   # BLIP's pre_question default (max_ques_words=50)


def _first_words(text: str, max_words: int) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_caption(text: str, max_words: int = 50) -> str:
    """BLIP / LAVIS caption cleaning: "A man's dog, running." -> "a man's dog, running"."""
    text = _RUNS_OF_SPACE.sub(" ", _BLIP_PUNCT.sub(" ", text.lower()))
    return _first_words(text.rstrip("\n").strip(" "), max_words)


def pre_question(text: str, max_words: int = QUESTION_WORDS) -> str:
    """BLIP / LAVIS question cleaning: "What's (in) the Picture?" -> "what's in the picture?"."""
    return _first_words(_BLIP_PUNCT.sub("", text.lower()).rstrip(" "), max_words)


CLEANERS = {"caption": pre_caption, "question": pre_question}


def text_cleaner(kind: str, max_words: int | None = None):
    """The cleaning function of a dataset's text: kind "caption" | "question" | "none" -> fn(str) -> str."""
    if kind == "none":
        return _unchanged
    if kind not in CLEANERS:
        raise ValueError(f"text_cleaning must be one of {[*CLEANERS, 'none']}, got {kind!r}")
    words = max_words if max_words is not None else (CAPTION_WORDS if kind == "caption" else QUESTION_WORDS)
    return partial(CLEANERS[kind], max_words=words)  # picklable: DataLoader workers may be spawned


def _unchanged(text: str) -> str:
    return text


def answer_weights(answers: list[str]) -> tuple[list[str], list[float]]:
    """BLIP's VQAv2 rule: unique answers (first-seen order), each weighted by its share of the annotators' answers."""
    weights: dict[str, float] = {}
    for a in answers:
        weights[a] = weights.get(a, 0.0) + 1.0 / len(answers)
    return list(weights), list(weights.values())
