"""Decoding over a KV cache: greedy, beam search, nucleus sampling, model-agnostic and HF-exact.

:func:`generate` (:mod:`.decode`) runs the loop; :mod:`.sampling` and :mod:`.beam_search` choose the tokens;
:mod:`.core` holds the settings, the logits processors and the decoding state.
"""
from .core import (GenerationConfig, apply_repetition_penalty, choose_search, sampling_settings_given, top_k_filter,
                   top_p_filter)
from .decode import generate

__all__ = ["GenerationConfig", "apply_repetition_penalty", "choose_search", "generate", "sampling_settings_given",
           "top_k_filter", "top_p_filter"]
