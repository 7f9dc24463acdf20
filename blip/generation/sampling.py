"""Greedy decoding and sampling (top-k / nucleus, one generator for the batch or one per row)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .core import DecodeState, GenerationConfig, process_logits, top_k_filter, top_p_filter


def row_uniforms(generators: Sequence[torch.Generator], n: int, steps: int, device: torch.device) -> Tensor:
    """[n, steps] uniforms, row r drawn from generators[r] (CPU generators; moved to ``device``)."""
    if len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} rows: pass one per row (beams/samples expanded)")
    return torch.stack([torch.rand(steps, generator=g) for g in generators]).to(device)


def choose_token(st: DecodeState, cfg: GenerationConfig) -> None:
    """Greedy / sampling: write the next token of every row at ``cur`` (pad once a row emitted eos)."""
    step = st.cur - st.prompt_len
    scores = process_logits(st.logits, st.seqs, st.cols < st.cur, step, cfg)
    if cfg.do_sample:
        probs = top_p_filter(top_k_filter(scores / cfg.temperature, cfg.top_k), cfg.top_p).softmax(-1)
        if st.uniforms is not None:  # inverse CDF with the row's own uniform
            cdf = probs.cumsum(-1)
            u = st.uniforms.index_select(1, step.view(1)) * cdf[:, -1:]
            next_ids = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)
        else:
            next_ids = torch.multinomial(probs, 1, generator=st.generator).squeeze(1)
    else:
        next_ids = scores.argmax(-1)
    next_ids = torch.where(st.finished, cfg.pad_token_id, next_ids)
    st.seqs.index_copy_(1, st.cur.view(1), next_ids[:, None])
    st.count.add_((~st.finished).long())
    if cfg.eos_token_id is not None:
        st.finished.logical_or_(next_ids == cfg.eos_token_id)
    st.cur.add_(1)
