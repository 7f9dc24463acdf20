"""The decoding loop over a KV cache: greedy, nucleus sampling (:mod:`.sampling`), beam search (:mod:`.beam_search`).

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
"""
from __future__ import annotations

import torch
from torch import Tensor

from .beam_search import beam_init, beam_output, beam_step
from .core import DecodeState, GenerationConfig, Generators, ReorderFn, StepFn
from .sampling import choose_token, row_uniforms


@torch.no_grad()
def generate(step: StepFn, input_ids: Tensor, attention_mask: Tensor | None, cfg: GenerationConfig,
             reorder: ReorderFn | None = None, generator: Generators = None) -> Tensor:
    """Decode from a prompt.

    input_ids: [B, T] prompt (already expanded to [B * num_beams, T] by the caller when num_beams > 1, beams of an
    example adjacent); attention_mask: [B(*beams), T] or None. ``step(new_ids [N, t], mask [N, T + max_new_tokens])``
    is called first with the whole prompt, then with one token per row; ``mask`` always spans the final length
    (0 where nothing is written yet), so every call after the first has the same shapes. A step may define
    ``mark_static()`` (its cache tensors keep their addresses: CUDA graphs may update them in place);
    ``stop_check_every=max_new_tokens`` with ``compile`` captures the whole loop as one graph.
    generator: one generator for the batch (``torch.multinomial``, as HF samples; decoded eagerly even when
    compiling), or one per row: each row then samples from its own stream (inverse CDF), so a row's output does
    not depend on the rest of the batch. Returns [B, T + n] with n <= max_new_tokens new tokens.
    """
    if input_ids.shape[0] == 0:
        raise ValueError("empty batch: generate needs at least one prompt row (one image)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cfg.num_beams > 1 and reorder is None:
        raise ValueError("beam search needs a reorder function for the cache")
    if cfg.max_new_tokens == 0:
        return input_ids
    st = DecodeState(input_ids, attention_mask, cfg.max_new_tokens, cfg.pad_token_id)
    per_row = cfg.do_sample and generator is not None and not isinstance(generator, torch.Generator)
    if cfg.num_beams > 1:
        beam_init(st, cfg)
    else:
        n, dev = input_ids.shape[0], input_ids.device
        st.finished = torch.zeros(n, dtype=torch.bool, device=dev)
        st.count = torch.zeros(n, dtype=torch.long, device=dev)
        st.uniforms = row_uniforms(generator, n, cfg.max_new_tokens, dev) if per_row else None
        st.generator = None if per_row else generator
    st.logits = step(input_ids, st.mask).float()
    compile_mode = cfg.compile if not (cfg.do_sample and not per_row) else False  # one RNG stream: eager
    _decode_loop(step, reorder, st, cfg, compile_mode)
    if cfg.num_beams > 1:
        return beam_output(st, cfg)
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
            getattr(step, "mark_static", lambda: None)()
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
            index = beam_step(st, cfg)
        else:
            choose_token(st, cfg)
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
