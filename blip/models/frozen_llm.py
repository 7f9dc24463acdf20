"""Frozen HF language models for BLIP-2: loading (by directory or tiny config) and the two ways of feeding them.

The LLM is never vendored: any ``AutoModelForCausalLM`` (OPT, Llama, ...) or ``AutoModelForSeq2SeqLM`` (FlanT5) is
driven through ``inputs_embeds``. The projected Q-Former queries are a prefix of embeddings:

- decoder-only: ``[queries; prompt]`` enter the LLM together, positions come from the attention mask (so padding can
  sit anywhere), and during decoding the queries are fed at the first step only (the KV cache holds them after);
- encoder-decoder: the encoder reads ``[queries; prompt]`` once, the decoder is driven step by step.

Both plug into :func:`blip.generation.generate` through the ``step``/``reorder`` protocol over a transformers
``StaticCache`` (preallocated, written at a device-tensor position, reordered in place), so decode steps have fixed
shapes and compile without recompiling per step.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, EncoderDecoderCache,
                          PretrainedConfig, StaticCache)
from transformers.modeling_outputs import BaseModelOutput

from ..checkpoints import hf_pretrained

LLMSource = str | Path | dict | PretrainedConfig


def llm_config(source: LLMSource, overrides: dict | None = None) -> PretrainedConfig:
    """HF config from a model directory (``local_files_only``), a config dict (with ``model_type``) or a config."""
    if isinstance(source, (str, Path)):
        if not (Path(source) / "config.json").exists():
            raise FileNotFoundError(f"{source}: not an HF model directory (no config.json); blip never downloads, "
                                    "pass llm=<local directory of the language model>")
        cfg = hf_pretrained(AutoConfig, source)
    elif isinstance(source, dict):
        cfg = AutoConfig.for_model(**source)
    else:
        cfg = source
    for key, value in (overrides or {}).items():
        setattr(cfg, key, value)
    return cfg


def load_llm(source: LLMSource, dtype: torch.dtype | None = None, overrides: dict | None = None,
             weights: bool = True) -> nn.Module:
    """Build the frozen LLM: weights from an HF directory, or random weights from a config (tiny tests).

    overrides: config attributes set before building (LAVIS FlanT5: ``{"dense_act_fn": "gelu"}``).
    weights=False builds a directory's architecture without reading its weights (they come from elsewhere).
    Returns the model in eval mode with ``requires_grad=False`` everywhere.
    """
    cfg = llm_config(source, overrides)
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    dtype = dtype or torch.float32
    if isinstance(source, (str, Path)) and weights:
        model = hf_pretrained(auto, source, config=cfg, dtype=dtype)
    else:
        model = auto.from_config(cfg).to(dtype)
    model.eval().requires_grad_(False)
    return model


def set_hf_checkpointing(llm: nn.Module, enable: bool) -> None:
    """Switch an HF model's activation checkpointing (non-reentrant; transformers >= 5 names it
    ``activation_checkpointing_*``, earlier ``gradient_checkpointing_*``)."""
    if not getattr(llm, "supports_gradient_checkpointing", False):
        return
    if enable and hasattr(llm, "activation_checkpointing_enable"):
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif enable:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable)()


def _cache_kwarg(llm: nn.Module) -> str:
    params = inspect.signature(llm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _accepts(llm: nn.Module, name: str) -> bool:
    return name in inspect.signature(llm.forward).parameters


def mask_positions(mask: Tensor) -> Tensor:
    """Positions from an attention mask [B, T]: 0, 1, ... over real tokens (pads get 1, as HF generate does)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def causal_logits(llm: nn.Module, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor,
                  query_positions: int = 0) -> Tensor:
    """Decoder-only LLM over ``[prefix; embed(input_ids)]``.

    prefix: [B, Q, H] projected queries (LLM dtype); input_ids, attention_mask: [B, T].
    Returns logits [B, query_positions + T, V]: the T text positions after the last ``query_positions`` query
    positions (by default the query positions are dropped).
    """
    embeds = torch.cat([prefix, llm.get_input_embeddings()(input_ids)], dim=1)
    mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
    extra = {"position_ids": mask_positions(mask)} if _accepts(llm, "position_ids") else {}
    if _accepts(llm, "logits_to_keep"):  # no vocabulary projection for the query positions
        extra["logits_to_keep"] = input_ids.shape[1] + query_positions
    out = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **extra)
    return out.logits[:, -(input_ids.shape[1] + query_positions):]


def seq2seq_encode(llm: nn.Module, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Encoder of a seq2seq LLM over ``[prefix; embed(input_ids)]`` -> (hidden [B, Q+T, H], mask [B, Q+T])."""
    embeds = torch.cat([prefix, llm.get_input_embeddings()(input_ids)], dim=1)
    mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
    hidden = llm.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return hidden, mask


def seq2seq_logits(llm: nn.Module, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor,
                   decoder_input_ids: Tensor, decoder_attention_mask: Tensor | None = None) -> Tensor:
    """Seq2seq LLM: encoder over ``[prefix; prompt]``, decoder over ``decoder_input_ids`` [B, Td] -> [B, Td, V]."""
    hidden, mask = seq2seq_encode(llm, prefix, input_ids, attention_mask)
    out = llm(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
              decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask, use_cache=False)
    return out.logits


def reorder_static_cache(cache: StaticCache, index: Tensor) -> None:
    """Beam reorder of a ``StaticCache`` in place (its own ``reorder_cache`` rebinds the buffers and syncs)."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys.copy_(layer.keys.index_select(0, index))
            layer.values.copy_(layer.values.index_select(0, index))


class CausalStep:
    """``step``/``reorder`` for :func:`blip.generation.generate` over a decoder-only HF LLM with a static cache.

    prefix: [N, Q, H] projected queries, one row per decoded sequence (beams already expanded); max_length: the
    prompt plus the new tokens. The first call receives the whole prompt and feeds ``[prefix; prompt]``; later
    calls feed only the new ids. ``position`` (device scalar) is the next cache position.
    """

    def __init__(self, llm: nn.Module, prefix: Tensor, max_length: int):
        self.llm, self.prefix = llm, prefix
        self.cache = StaticCache(config=llm.config, max_cache_len=prefix.shape[1] + max_length)
        self.cache_kw = _cache_kwarg(llm)
        self.positions = _accepts(llm, "position_ids")
        self.keep = {"logits_to_keep": 1} if _accepts(llm, "logits_to_keep") else {}
        self.position = torch.zeros((), dtype=torch.long, device=prefix.device)
        self.started = False

    def __call__(self, new_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """new_ids [N, t]; attention_mask [N, max_length] -> logits [N, V] of the last position."""
        mask = torch.cat([attention_mask.new_ones(self.prefix.shape[:2]), attention_mask], dim=1)
        kwargs = {self.cache_kw: self.cache, "use_cache": True, "attention_mask": mask, **self.keep}
        if self.started:
            inputs = {"input_ids": new_ids}
        else:
            self.started = True
            inputs = {"inputs_embeds": torch.cat([self.prefix, self.llm.get_input_embeddings()(new_ids)], dim=1)}
        t = next(iter(inputs.values())).shape[1]
        if self.positions:
            where = self.position + torch.arange(t, device=mask.device)
            kwargs["position_ids"] = mask_positions(mask).index_select(1, where)
        out = self.llm(**inputs, **kwargs)
        self.position.add_(t)
        return out.logits[:, -1]

    def reorder(self, index: Tensor) -> None:
        reorder_static_cache(self.cache, index)

    def mark_static(self) -> None:  # the cache's own tensors are marked by transformers when allocated
        torch._dynamo.mark_static_address(self.position)


class Seq2SeqStep:
    """``step``/``reorder`` over a seq2seq HF LLM's decoder; encoder hidden states [N, S, H] and mask [N, S] fixed.

    Static caches: the decoder's self-attention for ``max_length`` decoder positions, the cross-attention K/V
    (written once). The decoder ids are never padded, so the step's attention mask is not needed."""

    def __init__(self, llm: nn.Module, encoder_hidden: Tensor, encoder_mask: Tensor, max_length: int):
        self.llm = llm
        self.encoder = BaseModelOutput(last_hidden_state=encoder_hidden)
        self.encoder_mask = encoder_mask
        self.cache = EncoderDecoderCache(StaticCache(config=llm.config, max_cache_len=max_length),
                                         StaticCache(config=llm.config, max_cache_len=encoder_hidden.shape[1]))
        self.cache_kw = _cache_kwarg(llm)

    def __call__(self, new_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.llm(encoder_outputs=self.encoder, attention_mask=self.encoder_mask, decoder_input_ids=new_ids,
                       use_cache=True, **{self.cache_kw: self.cache})
        return out.logits[:, -1]

    def reorder(self, index: Tensor) -> None:
        # the cross-attention K/V are equal for every beam of an example: only the self-attention moves
        reorder_static_cache(self.cache.self_attention_cache, index)


def align_padding(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int, side: str) -> tuple[Tensor, Tensor]:
    """Move each row's padding to the ``side`` ("left" or "right") keeping token order; pads become ``pad_token_id``.

    Decoder-only generation needs left padding (new tokens follow the prompt directly); a T5 encoder needs the
    prompt right after the queries (relative positions), i.e. right padding.
    """
    keys = attention_mask.long() if side == "left" else 1 - attention_mask.long()
    order = keys.sort(dim=1, stable=True).indices
    mask = attention_mask.gather(1, order)
    ids = input_ids.gather(1, order).masked_fill(mask == 0, pad_token_id)
    return ids, mask
