"""Beam search over [batch, beams] with fixed-shape state, vectorised (HF semantics).

Beam search has two length conventions for the score ``sum_logprobs / length ** length_penalty``:
``"generated"`` (transformers >= 4.38 and 5.x: new tokens, eos included) and ``"total"`` (the transformers 4.2x
that original BLIP and LAVIS ran: the whole sequence with the prompt, eos excluded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .core import NEG, DecodeState, GenerationConfig, process_logits


def beam_init(st: DecodeState, cfg: GenerationConfig) -> None:
    """Beam search over [B, beams]: ``seqs`` holds the running beams; finished hypotheses live in ``done_*``."""
    nb = cfg.num_beams
    n, length = st.seqs.shape
    b, dev = n // nb, st.seqs.device
    st.running_scores = torch.zeros(b, nb, device=dev)
    st.running_scores[:, 1:] = NEG
    st.done_seqs = st.seqs.view(b, nb, length).clone()
    st.done_scores = torch.full((b, nb), NEG, device=dev)
    st.done_flag = torch.zeros(b, nb, dtype=torch.bool, device=dev)
    st.done_len = torch.full((b, nb), st.prompt_len, dtype=torch.long, device=dev)
    st.improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    st.stopped = torch.zeros((), dtype=torch.bool, device=dev)


def _pow(x: Tensor, exponent: float) -> Tensor:
    """``float(x) ** exponent`` as Python computes it (double), as a float32 device scalar."""
    return (x.double() ** exponent).float()


def beam_step(st: DecodeState, cfg: GenerationConfig) -> Tensor:
    """One vectorised beam-search step (HF semantics, see module docstring); once stopped the state is frozen.

    Returns the cache reorder index [N] (source row of every new running beam)."""
    nb, eos = cfg.num_beams, cfg.eos_token_id
    n, max_len = st.seqs.shape
    b, k, cur, dev = n // nb, 2 * nb, st.cur, st.seqs.device
    running = st.seqs.view(b, nb, max_len)
    logp = process_logits(F.log_softmax(st.logits, dim=-1), st.seqs, st.cols < cur, cur - st.prompt_len, cfg)
    vocab = logp.shape[-1]
    total = (logp.view(b, nb, vocab) + st.running_scores[:, :, None]).view(b, nb * vocab)
    cand_scores, cand_idx = total.topk(k, dim=-1)
    cand_beam, cand_tok = cand_idx // vocab, cand_idx % vocab
    cand_seqs = torch.where(st.cols == cur, cand_tok[:, :, None],
                            running.gather(1, cand_beam[:, :, None].expand(b, k, max_len)))
    is_eos = cand_tok == eos if eos is not None else torch.zeros_like(cand_tok, dtype=torch.bool)
    last_step = cur + 1 >= max_len
    hits = is_eos | last_step

    # running beams for the next step: the best candidates that did not stop
    stop_masked = cand_scores + hits.float() * NEG
    keep = stop_masked.topk(nb, dim=-1).indices
    new_running = cand_seqs.gather(1, keep[:, :, None].expand(b, nb, max_len))
    running_scores = stop_masked.gather(1, keep)
    beam_src = cand_beam.gather(1, keep)

    done_seqs, done_scores, done_flag, done_len = _merge_finished(st, cfg, cand_seqs, cand_scores, is_eos, hits,
                                                                  last_step)
    improvable = _still_improvable(st, cfg, cand_scores, running_scores, done_scores, done_flag)
    go_on = improvable.any() & ~(done_flag.all() & cfg.early_stopping) & ~hits.all() & ~last_step

    frozen = st.stopped.clone()  # stopped earlier: this step changes nothing (the eager loop had left)
    for old, new in ((running, new_running), (st.running_scores, running_scores), (st.done_seqs, done_seqs),
                     (st.done_scores, done_scores), (st.done_flag, done_flag), (st.done_len, done_len),
                     (st.improvable, improvable)):
        old.copy_(torch.where(frozen, old, new))
    st.stopped.logical_or_(~go_on)
    st.cur.add_(1)
    return (beam_src + torch.arange(b, device=dev)[:, None] * nb).view(-1)


def _merge_finished(st: DecodeState, cfg: GenerationConfig, cand_seqs: Tensor, cand_scores: Tensor, is_eos: Tensor,
                    hits: Tensor, last_step: bool | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``nb`` best finished hypotheses [B, nb] (seqs [B, nb, T], scores, flags, lengths) after adding this step's
    top-``nb`` candidates [B, 2 nb] that emitted eos (or reached the length limit)."""
    nb, lp, cur = cfg.num_beams, cfg.length_penalty, st.cur
    b, k, max_len = cand_seqs.shape
    top_rank = torch.arange(k, device=cand_seqs.device)[None, :] < nb
    if cfg.beam_length_convention == "total":  # HF 4.2x: stored without its eos; length counts the prompt
        length = torch.where(is_eos, cur, cur + 1)
        norm = length.float() ** lp
        # at the length limit HF 4.2x "finalize" adds every running beam (the best non-eos candidates)
        new_done = (is_eos & top_rank) | (_first_n(~is_eos, nb) & last_step)
    else:
        length = (cur + 1).expand_as(is_eos)
        norm = _pow(cur + 1 - st.prompt_len, lp)
        new_done = hits & top_rank
    final_scores = cand_scores / norm
    final_scores = final_scores + (~st.improvable).float() * NEG + (~new_done).float() * NEG
    if cfg.early_stopping:
        final_scores = final_scores + st.done_flag.all(-1, keepdim=True).float() * NEG
    merged_scores = torch.cat([st.done_scores, final_scores], dim=1)
    best = merged_scores.topk(nb, dim=-1).indices
    done_seqs = torch.cat([st.done_seqs, cand_seqs], 1).gather(1, best[:, :, None].expand(b, nb, max_len))
    done_flag = torch.cat([st.done_flag, new_done], 1).gather(1, best)
    done_len = torch.cat([st.done_len, length], 1).gather(1, best)
    return done_seqs, merged_scores.gather(1, best), done_flag, done_len


def _still_improvable(st: DecodeState, cfg: GenerationConfig, cand_scores: Tensor, running_scores: Tensor,
                      done_scores: Tensor, done_flag: Tensor) -> Tensor:
    """[B, 1]: can a running beam of the example still beat its worst finished hypothesis?"""
    lp, cur = cfg.length_penalty, st.cur
    if cfg.beam_length_convention == "total":
        best_possible = cand_scores.max(-1, keepdim=True).values / _pow(cur, lp)
    else:
        best_possible = running_scores[:, :1] / _pow(cur + 1 - st.prompt_len, lp)
    worst_done = torch.where(done_flag, done_scores.min(-1, keepdim=True).values, torch.full_like(done_scores, NEG))
    if cfg.beam_length_convention == "total":
        # HF 4.2x: a batch is done once it holds `nb` hypotheses and none can improve
        return st.improvable & ~(done_flag.all(-1, keepdim=True) &
                                 (cfg.early_stopping | (worst_done[:, :1] >= best_possible)))
    return st.improvable & (best_possible > worst_done).any(-1, keepdim=True)


def beam_output(st: DecodeState, cfg: GenerationConfig) -> Tensor:
    """The best finished hypothesis of every example, padded to the longest: [B, T + n]."""
    eos, max_len = cfg.eos_token_id, st.seqs.shape[1]
    best_seqs, best_len = st.done_seqs[:, 0], st.done_len[:, 0]
    pos = st.cols[None, :]
    out = torch.where(pos < best_len[:, None], best_seqs, cfg.pad_token_id)
    out_len = int(best_len.max())
    if cfg.beam_length_convention == "total" and eos is not None:  # HF 4.2x appends eos after the hypothesis
        out = torch.where(pos == best_len[:, None], eos, out)
        out_len = min(out_len + 1, max_len)
    return out[:, :out_len]


def _first_n(flags: Tensor, count: int) -> Tensor:
    """True for the first ``count`` True entries of each row of ``flags`` [B, K] (in candidate order)."""
    return flags & (flags.long().cumsum(-1) <= count)
