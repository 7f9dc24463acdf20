"""What every search shares: the generation settings, the logits processors (repetition penalty, eos before
``min_new_tokens``, top-k / top-p) and the fixed-shape decoding state."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor], Tensor]
ReorderFn = Callable[[Tensor], None]
NEG = -1.0e9
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class GenerationConfig:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool = False
    eos_token_id: int | None = None
    pad_token_id: int = 0
    beam_length_convention: str = "generated"   # "generated" (HF >= 4.38) or "total" (HF 4.2x: BLIP, LAVIS)
    compile: bool | str = False     # True: torch.compile(mode="reduce-overhead"); a string: that compile backend
    stop_check_every: int = 0       # steps between host stop checks; 0: 1 eager, 8 compiled

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError("num_beams >= 1, max_new_tokens >= 0 and min_new_tokens >= 0 are required")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling with beams is not supported: use num_beams=1 with do_sample=True")
        if self.beam_length_convention not in ("generated", "total"):
            raise ValueError(f"beam_length_convention must be 'generated' or 'total', "
                             f"got {self.beam_length_convention!r}")
        if self.stop_check_every < 0:
            raise ValueError(f"stop_check_every must be >= 0, got {self.stop_check_every}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) > max_new_tokens ({self.max_new_tokens}): the "
                             "minimum length cannot exceed the maximum")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}; for deterministic "
                             "output use do_sample=False (greedy or beam search) instead of temperature 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p} (1 keeps every token)")
        if self.top_k < 0 or not self.repetition_penalty > 0:
            raise ValueError(f"top_k must be >= 0 and repetition_penalty > 0, got {self.top_k}, "
                             f"{self.repetition_penalty}")


SAMPLING_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}   # the values at which a setting changes nothing


def sampling_settings_given(temperature: float | None = None, top_p: float | None = None,
                            top_k: int | None = None) -> list[str]:
    """The settings that only act when sampling and are set to something other than their neutral value
    (temperature != 1, top_p < 1, top_k > 0), as ``name=value``; None means not given."""
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    return [f"{name}={value}" for name, value in given.items()
            if value is not None and value != SAMPLING_NEUTRAL[name]]


def choose_search(do_sample: bool | None = None, num_beams: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None) -> tuple[bool, int | None]:
    """The one rule every string API, the CLI and the server apply to a caller's settings (None: not given):
    sampling settings (temperature != 1, top_p < 1, top_k > 0) imply sampling, and sampling uses one beam unless
    beams are asked for. Returns (do_sample, num_beams); num_beams stays None (the caller's beam-search default)
    when not sampling and not given.

    Refused with a ValueError instead of silently ignored: sampling settings with ``do_sample=False``, and sampling
    with ``num_beams`` > 1 (beam sampling is not implemented)."""
    given = sampling_settings_given(temperature, top_p, top_k)
    if do_sample is None:
        do_sample = bool(given)
    elif not do_sample and given:
        raise ValueError(f"{', '.join(given)} only act when sampling, but sampling is off (do_sample=False): drop "
                         "them, or sample")
    if do_sample and num_beams is not None and num_beams > 1:
        raise ValueError(f"sampling with {num_beams} beams is not supported: leave num_beams out (sampling uses "
                         "one) or drop the sampling settings for beam search")
    return do_sample, (1 if do_sample else num_beams)


def apply_repetition_penalty(scores: Tensor, seqs: Tensor, penalty: float, valid: Tensor | None = None) -> Tensor:
    """CTRL penalty on every token of ``seqs`` [N, L] (prompt included), as HF does; ``valid`` [L] or [N, L]
    restricts it to the positions written so far (a preallocated buffer)."""
    if penalty == 1.0:
        return scores
    valid = torch.ones_like(seqs, dtype=torch.bool) if valid is None else valid.expand_as(seqs)
    seen = torch.zeros_like(scores).scatter_add_(1, seqs, valid.to(scores.dtype)) > 0
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability mass exceeds ``top_p``."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = scores.sort(dim=-1)
    remove_sorted = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
    remove_sorted[..., -1] = False
    return scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))


def top_k_filter(scores: Tensor, top_k: int) -> Tensor:
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    kth = scores.topk(top_k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def process_logits(scores: Tensor, seqs: Tensor, written: Tensor, step: Tensor, cfg: GenerationConfig) -> Tensor:
    """Repetition penalty over the ``written`` positions of ``seqs``; no eos before ``min_new_tokens``
    (step: device scalar, the index of the new token being chosen)."""
    scores = apply_repetition_penalty(scores, seqs, cfg.repetition_penalty, written)
    if cfg.eos_token_id is not None and cfg.min_new_tokens > 0:
        is_eos = torch.arange(scores.shape[-1], device=scores.device) == cfg.eos_token_id
        scores = scores.masked_fill(is_eos & (step < cfg.min_new_tokens), float("-inf"))
    return scores


class DecodeState:
    """Fixed-shape decoding state on the device, updated in place (a captured graph reads and writes the same
    addresses at every step).

    seqs, mask: [N, L] token buffer and attention mask of the final length L = prompt + max_new_tokens (pad / 0
    where nothing is written yet); cur: device scalar, the position being chosen; logits: [N, V] float, the
    scores of that position. Greedy/sampling add ``finished`` [N], ``count`` [N] (tokens emitted up to eos) and
    ``uniforms`` [N, max_new] (per-row generators); beam search adds its hypotheses (:func:`beam_init`).
    """

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, pad_token_id: int):
        n, self.prompt_len = input_ids.shape
        length, dev = self.prompt_len + max_new_tokens, input_ids.device
        self.seqs = input_ids.new_full((n, length), pad_token_id)
        self.seqs[:, :self.prompt_len] = input_ids
        self.mask = attention_mask.new_zeros((n, length))
        self.mask[:, :self.prompt_len] = attention_mask
        self.cols = torch.arange(length, device=dev)
        self.cur = torch.tensor(self.prompt_len, device=dev)

    def mark_static(self) -> None:
        """CUDA graphs may update these in place (torch.compile(mode="reduce-overhead"))."""
        for t in vars(self).values():
            if isinstance(t, Tensor):
                torch._dynamo.mark_static_address(t)
