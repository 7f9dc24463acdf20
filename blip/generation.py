"""Decoding over a KV cache: greedy, beam search, nucleus sampling.

The loops are model-agnostic: a model supplies ``step(new_ids [N, t], attention_mask [N, Tk]) -> logits [N, V]``
(the logits of the last position; the step owns its cache) and ``reorder(index [N])`` for beam search. Our MED
decoder, the Q-Former and HF LLMs (BLIP-2) all plug in this way.

Static shapes: the token buffer and the attention mask are allocated at their final length, every position is a
device tensor, a finished row keeps decoding ``pad`` (beam search freezes its state) instead of leaving the loop,
and the host asks "has everyone stopped?" only every ``stop_check_every`` steps. So one decode step has the same
shapes and addresses at every position, and a chunk of steps (or the whole loop) compiles once and can be captured
in a CUDA graph (``compile=True``: ``torch.compile(mode="reduce-overhead")``). The compiled and eager paths run
the same code and return the same ids. Outputs follow HF transformers' conventions (greedy/sampling stop once
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
    compile: bool | str = False     # True: torch.compile(mode="reduce-overhead"); a string: that compile backend
    stop_check_every: int = 0       # steps between host stop checks; 0: 1 eager, 8 compiled

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError("num_beams >= 1, max_new_tokens >= 0 and min_new_tokens >= 0 are required")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling with beams is not supported: use num_beams=1 with do_sample=True")
        if self.beam_length_convention not in ("generated", "total"):
            raise ValueError(f"beam_length_convention must be 'generated' or 'total', got {self.beam_length_convention!r}")
        if self.stop_check_every < 0:
            raise ValueError(f"stop_check_every must be >= 0, got {self.stop_check_every}")


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


def _process(scores: Tensor, seqs: Tensor, written: Tensor, step: Tensor, cfg: GenerationConfig) -> Tensor:
    """Repetition penalty over the ``written`` positions of ``seqs``; no eos before ``min_new_tokens``
    (step: device scalar, the index of the new token being chosen)."""
    scores = apply_repetition_penalty(scores, seqs, cfg.repetition_penalty, written)
    if cfg.eos_token_id is not None and cfg.min_new_tokens > 0:
        is_eos = torch.arange(scores.shape[-1], device=scores.device) == cfg.eos_token_id
        scores = scores.masked_fill(is_eos & (step < cfg.min_new_tokens), float("-inf"))
    return scores


Generators = torch.Generator | Sequence[torch.Generator] | None


class DecodeState:
    """Fixed-shape decoding state on the device, updated in place (a captured graph reads and writes the same
    addresses at every step).

    seqs, mask: [N, L] token buffer and attention mask of the final length L = prompt + max_new_tokens (pad / 0
    where nothing is written yet); cur: device scalar, the position being chosen; logits: [N, V] float, the
    scores of that position. Greedy/sampling add ``finished`` [N], ``count`` [N] (tokens emitted up to eos) and
    ``uniforms`` [N, max_new] (per-row generators); beam search adds its hypotheses (:func:`_beam_state`).
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


@torch.no_grad()
def generate(step: StepFn, input_ids: Tensor, attention_mask: Tensor | None, cfg: GenerationConfig,
             reorder: ReorderFn | None = None, generator: Generators = None) -> Tensor:
    """Decode from a prompt.

    input_ids: [B, T] prompt (already expanded to [B * num_beams, T] by the caller when num_beams > 1, beams of an
    example adjacent); attention_mask: [B(*beams), T] or None. ``step(new_ids [N, t], mask [N, T + max_new_tokens])``
    is called first with the whole prompt, then with one token per row; ``mask`` always spans the final length
    (0 where nothing is written yet), so every call after the first has the same shapes.
    generator: one generator for the batch (``torch.multinomial``, as HF samples; decoded eagerly even when
    compiling), or one per row: each row then samples from its own stream (inverse CDF), so a row's output does
    not depend on the rest of the batch. Returns [B, T + n] with n <= max_new_tokens new tokens.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cfg.num_beams > 1 and reorder is None:
        raise ValueError("beam search needs a reorder function for the cache")
    if cfg.max_new_tokens == 0:
        return input_ids
    st = DecodeState(input_ids, attention_mask, cfg.max_new_tokens, cfg.pad_token_id)
    per_row = cfg.do_sample and generator is not None and not isinstance(generator, torch.Generator)
    if cfg.num_beams > 1:
        _beam_state(st, cfg)
    else:
        n, dev = input_ids.shape[0], input_ids.device
        st.finished = torch.zeros(n, dtype=torch.bool, device=dev)
        st.count = torch.zeros(n, dtype=torch.long, device=dev)
        st.uniforms = _row_uniforms(generator, n, cfg.max_new_tokens, dev) if per_row else None
        st.generator = None if per_row else generator
    st.logits = step(input_ids, st.mask).float()
    compile_mode = cfg.compile if not (cfg.do_sample and not per_row) else False  # one RNG stream: eager
    _decode_loop(step, reorder, st, cfg, compile_mode)
    if cfg.num_beams > 1:
        return _beam_output(st, cfg)
    return st.seqs[:, :st.prompt_len + int(st.count.max())]


def _decode_loop(step: StepFn, reorder: ReorderFn | None, st: DecodeState, cfg: GenerationConfig,
                 compile_mode: bool | str) -> None:
    """``max_new_tokens`` steps in chunks of ``stop_check_every`` (one compiled graph per chunk length); the host
    reads "has everyone stopped?" between chunks only."""
    run = _chunk
    if compile_mode:
        run = _compiled(compile_mode)
        if st.seqs.device.type == "cuda":
            st.mark_static()
    every = cfg.stop_check_every or (8 if compile_mode else 1)
    done, total = 0, cfg.max_new_tokens
    while done < total:
        k = min(every, total - done)
        run(step, reorder, st, cfg, k, done + k == total)
        done += k
        if done < total and _all_stopped(st, cfg):
            break


def _all_stopped(st: DecodeState, cfg: GenerationConfig) -> bool:
    """The host synchronisation that stopping needs."""
    if cfg.num_beams > 1:
        return bool(st.stopped)
    return cfg.eos_token_id is not None and bool(st.finished.all())


def _chunk(step: StepFn, reorder: ReorderFn | None, st: DecodeState, cfg: GenerationConfig, k: int,
           ends: bool) -> None:
    """k decode steps: choose the next token of every row, then feed it (the final choice of the loop feeds
    nothing). Shapes are the same at every step; no host synchronisation."""
    for j in range(k):
        if cfg.num_beams > 1:
            index = _beam_choose(st, cfg)
        else:
            _choose_token(st, cfg)
        if ends and j == k - 1:
            return
        if cfg.num_beams > 1:
            reorder(index)
        last = (st.cur - 1).view(1)
        st.mask.index_fill_(1, last, 1)
        st.logits.copy_(step(st.seqs.index_select(1, last), st.mask))


_COMPILED: dict = {}


def _compiled(mode: bool | str):
    """:func:`_chunk` under torch.compile, built once per setting (dynamo then caches one graph per chunk length
    and state layout): True -> inductor with CUDA graphs on GPU; a string -> that backend ("aot_eager" in tests)."""
    if mode not in _COMPILED:
        options = dict(mode="reduce-overhead") if mode is True else dict(backend=mode)
        _COMPILED[mode] = torch.compile(_chunk, fullgraph=True, **options)
    return _COMPILED[mode]


def _row_uniforms(generators: Sequence[torch.Generator], n: int, steps: int, device: torch.device) -> Tensor:
    """[n, steps] uniforms, row r drawn from generators[r] (CPU generators; moved to ``device``)."""
    if len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} rows: pass one per row (beams/samples expanded)")
    return torch.stack([torch.rand(steps, generator=g) for g in generators]).to(device)


def _choose_token(st: DecodeState, cfg: GenerationConfig) -> None:
    """Greedy / sampling: write the next token of every row at ``cur`` (pad once a row emitted eos)."""
    step = st.cur - st.prompt_len
    scores = _process(st.logits, st.seqs, st.cols < st.cur, step, cfg)
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


def _beam_state(st: DecodeState, cfg: GenerationConfig) -> None:
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


def _beam_choose(st: DecodeState, cfg: GenerationConfig) -> Tensor:
    """One vectorised beam-search step (HF semantics, see module docstring); once stopped the state is frozen.

    Returns the cache reorder index [N] (source row of every new running beam)."""
    nb, eos, lp = cfg.num_beams, cfg.eos_token_id, cfg.length_penalty
    legacy = cfg.beam_length_convention == "total"
    n, max_len = st.seqs.shape
    b, k, cur, dev = n // nb, 2 * nb, st.cur, st.seqs.device
    running = st.seqs.view(b, nb, max_len)
    logp = _process(F.log_softmax(st.logits, dim=-1), st.seqs, st.cols < cur, cur - st.prompt_len, cfg)
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

    # finished hypotheses: a top-`nb` candidate that emitted eos (or reached the length limit)
    top_rank = torch.arange(k, device=dev)[None, :] < nb
    if legacy:  # HF 4.2x: the hypothesis is stored without its eos; length counts the prompt
        length = torch.where(is_eos, cur, cur + 1)
        norm = length.float() ** lp
        # at the length limit HF 4.2x "finalize" adds every running beam (the best non-eos candidates)
        new_done = (is_eos & top_rank) | (_first_n(~is_eos, nb) & last_step)
    else:
        length = (cur + 1).expand_as(cand_tok)
        norm = _pow(cur + 1 - st.prompt_len, lp)
        new_done = hits & top_rank
    final_scores = cand_scores / norm
    final_scores = final_scores + (~st.improvable).float() * NEG + (~new_done).float() * NEG
    if cfg.early_stopping:
        final_scores = final_scores + st.done_flag.all(-1, keepdim=True).float() * NEG
    merged_scores = torch.cat([st.done_scores, final_scores], dim=1)
    best = merged_scores.topk(nb, dim=-1).indices
    done_seqs = torch.cat([st.done_seqs, cand_seqs], 1).gather(1, best[:, :, None].expand(b, nb, max_len))
    done_scores = merged_scores.gather(1, best)
    done_flag = torch.cat([st.done_flag, new_done], 1).gather(1, best)
    done_len = torch.cat([st.done_len, length], 1).gather(1, best)

    # can a running beam still beat the worst finished one?
    if legacy:
        best_possible = cand_scores.max(-1, keepdim=True).values / _pow(cur, lp)
    else:
        best_possible = running_scores[:, :1] / _pow(cur + 1 - st.prompt_len, lp)
    worst_done = torch.where(done_flag, done_scores.min(-1, keepdim=True).values, torch.full_like(done_scores, NEG))
    if legacy:
        # HF 4.2x: a batch is done once it holds `nb` hypotheses and none can improve
        improvable = st.improvable & ~(done_flag.all(-1, keepdim=True) &
                                       (cfg.early_stopping | (worst_done[:, :1] >= best_possible)))
    else:
        improvable = st.improvable & (best_possible > worst_done).any(-1, keepdim=True)
    go_on = improvable.any() & ~(done_flag.all() & cfg.early_stopping) & ~hits.all() & ~last_step

    frozen = st.stopped.clone()  # stopped earlier: this step changes nothing (the eager loop had left)
    for old, new in ((running, new_running), (st.running_scores, running_scores), (st.done_seqs, done_seqs),
                     (st.done_scores, done_scores), (st.done_flag, done_flag), (st.done_len, done_len),
                     (st.improvable, improvable)):
        old.copy_(torch.where(frozen, old, new))
    st.stopped.logical_or_(~go_on)
    st.cur.add_(1)
    return (beam_src + torch.arange(b, device=dev)[:, None] * nb).view(-1)


def _beam_output(st: DecodeState, cfg: GenerationConfig) -> Tensor:
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
