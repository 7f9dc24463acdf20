"""Decoding over a KV cache: greedy, beam search, nucleus sampling.

The loops are model-agnostic: a model supplies ``step(new_ids [N, t], attention_mask [N, Tk]) -> logits [N, V]``
(the logits of the last position; the step owns its cache) and ``reorder(index [N])`` for beam search. Our MED
decoder, the Q-Former and HF LLMs (BLIP-2) all plug in this way.

All state lives in fixed-shape device tensors; the only host synchronisation per step is the "is everyone
finished?" check that stopping needs. Outputs follow HF transformers' conventions (greedy/sampling stop once
every row emitted ``eos``; finished rows are filled with ``pad``), so parity tests can compare ids exactly.

Beam search has two length conventions for the score ``sum_logprobs / length ** length_penalty``:
``"generated"`` (transformers >= 4.38 and 5.x: new tokens, eos included) and ``"total"`` (the transformers 4.2x
that original BLIP and LAVIS ran: the whole sequence with the prompt, eos excluded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

StepFn = Callable[[Tensor, Tensor], Tensor]
ReorderFn = Callable[[Tensor], None]
NEG = -1.0e9


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

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError("num_beams >= 1, max_new_tokens >= 0 and min_new_tokens >= 0 are required")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling with beams is not supported: use num_beams=1 with do_sample=True")
        if self.beam_length_convention not in ("generated", "total"):
            raise ValueError(f"beam_length_convention must be 'generated' or 'total', got {self.beam_length_convention!r}")


def apply_repetition_penalty(scores: Tensor, seqs: Tensor, penalty: float) -> Tensor:
    """CTRL penalty on every token already in ``seqs`` [N, L] (prompt included), as HF does."""
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seqs)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seqs, picked)


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


def _process(scores: Tensor, seqs: Tensor, step: int, cfg: GenerationConfig) -> Tensor:
    scores = apply_repetition_penalty(scores, seqs, cfg.repetition_penalty)
    if cfg.eos_token_id is not None and step < cfg.min_new_tokens:
        scores = scores.clone()
        scores[:, cfg.eos_token_id] = float("-inf")
    return scores


Generators = torch.Generator | Sequence[torch.Generator] | None


@torch.no_grad()
def generate(step: StepFn, input_ids: Tensor, attention_mask: Tensor | None, cfg: GenerationConfig,
             reorder: ReorderFn | None = None, generator: Generators = None) -> Tensor:
    """Decode from a prompt.

    input_ids: [B, T] prompt (already expanded to [B * num_beams, T] by the caller when num_beams > 1, beams of an
    example adjacent); attention_mask: [B(*beams), T] or None. ``step`` is called first with the whole prompt.
    generator: one generator for the batch (``torch.multinomial``, as HF samples), or one per row: each row then
    samples from its own stream (inverse CDF), so a row's output does not depend on the rest of the batch.
    Returns [B, T + n] with n <= max_new_tokens new tokens.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cfg.num_beams > 1:
        if reorder is None:
            raise ValueError("beam search needs a reorder function for the cache")
        return _beam_search(step, reorder, input_ids, attention_mask, cfg)
    return _greedy_or_sample(step, input_ids, attention_mask, cfg, generator)


def _row_uniforms(generators: Sequence[torch.Generator], n: int, steps: int, device: torch.device) -> Tensor:
    """[n, steps] uniforms, row r drawn from generators[r] (CPU generators; moved to ``device``)."""
    if len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} rows: pass one per row (beams/samples expanded)")
    return torch.stack([torch.rand(steps, generator=g) for g in generators]).to(device)


def _greedy_or_sample(step: StepFn, seqs: Tensor, mask: Tensor, cfg: GenerationConfig,
                      generator: Generators) -> Tensor:
    n = seqs.shape[0]
    finished = torch.zeros(n, dtype=torch.bool, device=seqs.device)
    per_row = cfg.do_sample and generator is not None and not isinstance(generator, torch.Generator)
    uniforms = _row_uniforms(generator, n, cfg.max_new_tokens, seqs.device) if per_row else None
    logits = step(seqs, mask)
    for i in range(cfg.max_new_tokens):
        scores = _process(logits.float(), seqs, i, cfg)
        if cfg.do_sample:
            probs = top_p_filter(top_k_filter(scores / cfg.temperature, cfg.top_k), cfg.top_p).softmax(-1)
            if per_row:  # inverse CDF with the row's own uniform
                cdf = probs.cumsum(-1)
                u = uniforms[:, i:i + 1] * cdf[:, -1:]
                next_ids = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)
            else:
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_ids = scores.argmax(-1)
        next_ids = torch.where(finished, torch.full_like(next_ids, cfg.pad_token_id), next_ids)
        seqs = torch.cat([seqs, next_ids[:, None]], dim=1)
        if cfg.eos_token_id is not None:
            finished = finished | (next_ids == cfg.eos_token_id)
            if bool(finished.all()):  # the one host sync per step: stopping needs it
                break
        if i + 1 == cfg.max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        logits = step(next_ids[:, None], mask)
    return seqs


def _beam_search(step: StepFn, reorder: ReorderFn, input_ids: Tensor, mask: Tensor, cfg: GenerationConfig) -> Tensor:
    """Vectorised beam search over [B, beams] with fixed-shape state (HF semantics, see module docstring)."""
    nb, eos, lp = cfg.num_beams, cfg.eos_token_id, cfg.length_penalty
    legacy = cfg.beam_length_convention == "total"
    n, prompt_len = input_ids.shape
    b, dev = n // nb, input_ids.device
    max_len = prompt_len + cfg.max_new_tokens
    k = 2 * nb
    running = input_ids.new_full((b, nb, max_len), cfg.pad_token_id)
    running[:, :, :prompt_len] = input_ids.view(b, nb, prompt_len)
    running_scores = torch.zeros(b, nb, device=dev)
    running_scores[:, 1:] = NEG
    done_seqs = running.clone()
    done_scores = torch.full((b, nb), NEG, device=dev)
    done_flag = torch.zeros(b, nb, dtype=torch.bool, device=dev)
    done_len = torch.full((b, nb), prompt_len, dtype=torch.long, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    top_rank = torch.arange(k, device=dev)[None, :] < nb
    batch_offset = torch.arange(b, device=dev)[:, None] * nb

    logits = step(input_ids, mask)
    cur = prompt_len
    for i in range(cfg.max_new_tokens):
        logp = F.log_softmax(logits.float(), dim=-1)
        logp = _process(logp, running.view(n, max_len)[:, :cur], i, cfg)
        vocab = logp.shape[-1]
        total = (logp.view(b, nb, vocab) + running_scores[:, :, None]).view(b, nb * vocab)
        cand_scores, cand_idx = total.topk(k, dim=-1)
        cand_beam, cand_tok = cand_idx // vocab, cand_idx % vocab
        cand_seqs = running.gather(1, cand_beam[:, :, None].expand(b, k, max_len)).clone()
        cand_seqs[:, :, cur] = cand_tok
        is_eos = cand_tok == eos if eos is not None else torch.zeros_like(cand_tok, dtype=torch.bool)
        last_step = cur + 1 >= max_len
        hits = is_eos | last_step

        # running beams for the next step: the best candidates that did not stop
        keep = (cand_scores + hits.float() * NEG).topk(nb, dim=-1).indices
        running = cand_seqs.gather(1, keep[:, :, None].expand(b, nb, max_len))
        running_scores = (cand_scores + hits.float() * NEG).gather(1, keep)
        beam_src = cand_beam.gather(1, keep)

        # finished hypotheses: a top-`nb` candidate that emitted eos (or reached the length limit)
        if legacy:  # HF 4.2x: the hypothesis is stored without its eos; length counts the prompt
            length = torch.where(is_eos, cur, cur + 1)
            norm = length.float() ** lp
            # at the length limit HF 4.2x "finalize" adds every running beam (the best non-eos candidates)
            new_done = (is_eos & top_rank) | (_first_n(~is_eos, nb) if last_step else False)
        else:
            length = torch.full_like(cand_tok, cur + 1)
            norm = float(cur + 1 - prompt_len) ** lp
            new_done = hits & top_rank
        final_scores = cand_scores / norm
        final_scores = final_scores + (~improvable).float() * NEG + (~new_done).float() * NEG
        if cfg.early_stopping:
            final_scores = final_scores + done_flag.all(-1, keepdim=True).float() * NEG
        merged_scores = torch.cat([done_scores, final_scores], dim=1)
        best = merged_scores.topk(nb, dim=-1).indices
        done_seqs = torch.cat([done_seqs, cand_seqs], 1).gather(1, best[:, :, None].expand(b, nb, max_len))
        done_scores = merged_scores.gather(1, best)
        done_flag = torch.cat([done_flag, new_done], 1).gather(1, best)
        done_len = torch.cat([done_len, length], 1).gather(1, best)

        cur += 1
        if last_step:
            break
        # can a running beam still beat the worst finished one?
        if legacy:
            best_possible = cand_scores.max(-1, keepdim=True).values / float(cur - 1) ** lp
        else:
            best_possible = running_scores[:, :1] / float(cur - prompt_len) ** lp
        worst_done = torch.where(done_flag, done_scores.min(-1, keepdim=True).values, torch.full_like(done_scores, NEG))
        if legacy:
            # HF 4.2x: a batch is done once it holds `nb` hypotheses and none can improve
            improvable = improvable & ~(done_flag.all(-1, keepdim=True) &
                                        (cfg.early_stopping | (worst_done[:, :1] >= best_possible)))
        else:
            improvable = improvable & (best_possible > worst_done).any(-1, keepdim=True)
        open_beams = ~(done_flag.all() & cfg.early_stopping)
        if not bool(improvable.any() & open_beams & ~hits.all()):  # host sync: stopping needs it
            break
        reorder((beam_src + batch_offset).view(-1))
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        logits = step(running.view(n, max_len)[:, cur - 1:cur], mask)

    best_seqs, best_len = done_seqs[:, 0], done_len[:, 0]
    pos = torch.arange(max_len, device=dev)[None, :]
    out = torch.where(pos < best_len[:, None], best_seqs, cfg.pad_token_id)
    out_len = int(best_len.max())
    if legacy and eos is not None:  # HF 4.2x appends eos after the stored hypothesis when there is room
        out = torch.where(pos == best_len[:, None], eos, out)
        out_len = min(out_len + 1, max_len)
    return out[:, :out_len]


def _first_n(flags: Tensor, count: int) -> Tensor:
    """True for the first ``count`` True entries of each row of ``flags`` [B, K] (in candidate order)."""
    return flags & (flags.long().cumsum(-1) <= count)
