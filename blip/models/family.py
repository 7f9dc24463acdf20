"""The model families, one vocabulary for the whole library.

Every inference model class declares its family as the class attribute ``family``; :func:`family_of` reads it (for a
training objective, from the inference model it holds as ``.model``), and :func:`blip.registry.family` gives it for an
arch name. The values are also written out (an evaluation's manifest, its ``protocol`` keys in
``configs/evaluate/task/``), so they are plain strings.
"""
from __future__ import annotations

from enum import Enum

from torch import nn


class Family(str, Enum):
    """Which conventions a model follows: its string API, evaluation protocol and checkpoint formats."""
    BLIP = "blip"                    # BLIP (v1) task models: caption, retrieval, VQA, NLVR2, feature extractor
    BLIP2_QFORMER = "blip2_qformer"  # BLIP-2 stage 1: frozen ViT + Q-Former with its ITC / ITM / ITG heads
    BLIP2_LLM = "blip2_llm"          # BLIP-2 stage 2 and InstructBLIP: frozen ViT + Q-Former + frozen LLM

    def __str__(self) -> str:   # the value in f-strings and str() on every Python version (not "Family.BLIP")
        return self.value


def family_of(module: nn.Module) -> Family:
    """The family of an inference model, or of a training objective (that of the model it holds as ``.model``)."""
    found = getattr(module, "family", None) or getattr(getattr(module, "model", None), "family", None)
    if found is None:
        raise TypeError(f"{type(module).__name__} is not a BLIP / BLIP-2 model (it declares no family)")
    return Family(found)
