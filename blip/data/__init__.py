"""Data: tokenizer, text cleaning, transforms, image loading, streams. ``pre_caption`` / ``pre_question`` are BLIP's."""
from .text import pre_caption, pre_question

__all__ = ["pre_caption", "pre_question"]
