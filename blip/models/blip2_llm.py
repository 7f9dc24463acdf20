"""BLIP-2 stage 2 and InstructBLIP: frozen image encoder -> Q-Former -> ``llm_proj`` -> frozen HF LLM.

- :class:`Blip2LanguageModel`: the Q-Former has no text parts (no word/position embeddings, no text FFN, as in
  LAVIS's Blip2OPT / Blip2T5): only the queries attend to the image.
- :class:`InstructBlipLanguageModel`: instruction-aware Q-Former: the instruction tokens (BERT ids) go through the
  Q-Former together with the queries (bidirectional), so the Q-Former keeps word embeddings and the text FFN.

Tensor API: ``forward(pixel_values, input_ids, attention_mask).logits`` and ``generate(pixel_values,
input_ids, ...)`` where ``input_ids`` are LLM tokenizer ids **without image placeholders**: the queries are
prepended inside, always (there is no path on which an image reaches the LLM without its queries).
String API (:class:`blip.models.blip2_llm_strings.LanguageInterface`): ``caption``, ``answer``, ``chat``.

Precision: ``frozen_dtype`` (or :meth:`Blip2LanguageModel.cast_frozen`) stores the frozen ViT and LLM in bf16/fp16;
``ln_vision``, the Q-Former and ``llm_proj`` stay fp32 and the projected queries are cast to the LLM's dtype at the
boundary.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..dtypes import to_dtype
from ..generation import GenerationConfig, generate
from .blip2 import LLM_ARCHS, Blip2LLMConfig
from .blip2_llm_strings import LanguageInterface
from .family import Family
from .frozen_llm import (CausalStep, LLMSource, Seq2SeqStep, align_padding, causal_logits, load_llm, seq2seq_encode,
                         seq2seq_logits, set_hf_checkpointing)
from .qformer import FrozenImageEncoder, QFormer, QFormerConfig
from .structure import InferenceModel

LLM_TASKS = ("stage2", "instruct")
# the parts an instruction-aware Q-Former has and a stage-2 one lacks (word / position embeddings, text FFN)
QUESTION_TEXT_PARTS = (r"qformer\.transformer\.embeddings\.(word|position)\..*",
                       r"qformer\.transformer\.layers\.\d+\.ffn\..*")


@dataclass
class Blip2LLMOutput:
    """logits: [B, T, V] over the text positions (decoder-only) or the decoder positions (seq2seq);
    query_embeds: [B, Q, H_llm] projected queries fed to the LLM."""
    logits: Tensor
    query_embeds: Tensor


class Blip2LanguageModel(LanguageInterface, InferenceModel, nn.Module):
    """Stage-2 BLIP-2: ``image_encoder`` (ViT + ln_vision) -> ``qformer`` -> ``llm_proj`` -> ``llm`` (HF, frozen)."""

    family = Family.BLIP2_LLM
    vit_path = "image_encoder.visual_encoder"
    checkpointed = ("image_encoder.visual_encoder", "qformer.transformer")
    dtype_part = "qformer"   # .dtype: the trained part's (the frozen ViT and LLM may be stored in fp16 / bf16)
    compile_decoding = False   # generate()'s default for compile= (blip.load(compile=True) sets it)

    instruct = False
    new_on_init_from = (r"llm_proj\..*",)   # a stage-1 Q-Former run has no projection into the LLM

    def __init__(self, cfg: Blip2LLMConfig, llm: nn.Module | None = None):
        super().__init__()
        if llm is None and cfg.llm is None:
            raise ValueError("this architecture needs its language model: pass llm=<HF model directory>")
        self.config = cfg
        frozen_dtype = to_dtype(cfg.frozen_dtype)
        self.image_encoder = FrozenImageEncoder(cfg.vision, ln_eps=cfg.ln_vision_eps, freeze=cfg.freeze_vit)
        self.qformer = QFormer(cfg.qformer)
        self.llm = llm if llm is not None else load_llm(cfg.llm, frozen_dtype, cfg.llm_overrides)
        self.llm.requires_grad_(False)
        self.llm_proj = nn.Linear(cfg.qformer.text.hidden_size, self.llm.get_input_embeddings().embedding_dim)
        if frozen_dtype not in (None, torch.float32):
            self.cast_frozen(frozen_dtype)

    def cast_frozen(self, dtype: str | torch.dtype) -> "Blip2LanguageModel":
        """Store the frozen ViT (Linear/Conv weights) and the LLM in ``dtype``; ln_vision, the Q-Former, llm_proj and a
        trainable ViT (``freeze_vit=False``) stay fp32. (``model.to(dtype)`` would cast everything, as HF's ``.to``
        does.)"""
        dtype = to_dtype(dtype)
        if self.image_encoder.frozen:
            self.image_encoder.cast_vit(dtype)
        self.llm.to(dtype)
        self.config.frozen_dtype = dtype
        return self

    # ---- structure -------------------------------------------------------------------------------------------
    @property
    def is_seq2seq(self) -> bool:
        return bool(self.llm.config.is_encoder_decoder)

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def train(self, mode: bool = True) -> "Blip2LanguageModel":
        """The frozen ViT stays in eval mode (FrozenImageEncoder, as LAVIS). The frozen LLM too unless
        ``config.llm_train_mode``: LAVIS leaves its LLM in train mode, so the LLM's dropout is active in training.
        An LLM with trainable parameters (LoRA adapters) follows ``mode``, as LAVIS and peft train it: its dropout,
        the adapters' dropout and HF activation checkpointing act in training mode only."""
        super().train(mode)
        trains = any(p.requires_grad for p in self.llm.parameters())
        self.llm.train(mode and (self.config.llm_train_mode or trains))
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the ViT and Q-Former layers in the backward pass, and the LLM's (HF activation checkpointing,
        which transformers applies while the LLM is in training mode: with adapters or ``llm_train_mode``)."""
        super().set_grad_checkpointing(enable)
        set_hf_checkpointing(self.llm, enable)

    @property
    def eos_token_id(self) -> int | None:
        """The generation eos: OPT convention "\\n" (resolved with the tokenizer), an explicit id, or the LLM's."""
        eos = self.config.eos
        if isinstance(eos, int):
            return eos
        if isinstance(eos, str) and self.has_tokenizer():
            ids = self.tokenizer(eos, add_special_tokens=False).input_ids
            if not ids:
                raise ValueError(f"the LLM tokenizer has no token for the eos text {eos!r}")
            return ids[0]  # as LAVIS: the first token of "\n"
        gen = getattr(self.llm, "generation_config", None)
        eos_id = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos_id = eos_id if eos_id is not None else self.llm.config.eos_token_id
        return eos_id[0] if isinstance(eos_id, list) else eos_id

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.llm.config, "pad_token_id", None)
        return pad if pad is not None else (self.eos_token_id or 0)

    @property
    def start_token_id(self) -> int:
        """Default prompt when none is given: the LLM's bos (T5: ``</s>``, what LAVIS's empty prompt tokenizes to)."""
        cfg = self.llm.config
        bos = getattr(cfg, "bos_token_id", None)  # T5 configs have none
        return bos if bos is not None else cfg.eos_token_id

    # ---- tensor API ------------------------------------------------------------------------------------------
    def query_embeds(self, pixel_values: Tensor, qformer_input_ids: Tensor | None = None,
                     qformer_attention_mask: Tensor | None = None) -> Tensor:
        """pixel_values [B, 3, H, W] -> projected queries [B, Q, H_llm] in the LLM's dtype."""
        if pixel_values is None:
            raise ValueError("BLIP-2 needs pixel_values: the image enters the LLM only as Q-Former queries")
        if qformer_input_ids is not None:
            raise ValueError("this BLIP-2 Q-Former has no text input; use the 'instruct' task (InstructBLIP)")
        image = self.image_encoder(pixel_values)
        queries = self.qformer(image)[:, :self.qformer.num_queries]
        return self.llm_proj(queries.to(self.llm_proj.weight.dtype)).to(self.llm_dtype)

    def _check_ids(self, input_ids: Tensor | None) -> None:
        if input_ids is not None and self.config.image_token_id is not None and \
                bool((input_ids == self.config.image_token_id).any()):
            raise ValueError(f"input_ids contain the image placeholder id {self.config.image_token_id}: pass the plain "
                             "prompt ids; blip prepends the image queries itself")

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                qformer_input_ids: Tensor | None = None,
                qformer_attention_mask: Tensor | None = None, query_positions: int = 0) -> Blip2LLMOutput:
        """pixel_values [B, 3, H, W]; input_ids/attention_mask [B, T] (LLM ids, no placeholders).

        Decoder-only: logits [B, T, V] for the T text positions (queries dropped; ``query_positions`` > 0 also keeps
        the last that many query positions in front: [B, query_positions + T, V]).
        Seq2seq: the encoder reads [queries; input_ids] (padding moved to the right); ``decoder_input_ids`` [B, Td]
        are required -> [B, Td, V].
        """
        self._check_ids(input_ids)
        prefix = self.query_embeds(pixel_values, qformer_input_ids, qformer_attention_mask)
        return self.logits_from_queries(prefix, input_ids, attention_mask, decoder_input_ids=decoder_input_ids,
                                        decoder_attention_mask=decoder_attention_mask, query_positions=query_positions)

    def logits_from_queries(self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                            decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                            query_positions: int = 0) -> Blip2LLMOutput:
        """:meth:`forward` from projected queries prefix [B, Q, H_llm] (:meth:`query_embeds`), e.g. one image's
        queries repeated for several target texts (VQA answers)."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if self.is_seq2seq:
            if decoder_input_ids is None:
                raise ValueError("a seq2seq LLM (T5) needs decoder_input_ids (the shifted targets) for logits")
            # the prompt must follow the queries directly (T5 relative positions): right-align any padding
            input_ids, mask = align_padding(input_ids, mask, self.pad_token_id, "right")
            logits = seq2seq_logits(self.llm, prefix, input_ids, mask, decoder_input_ids, decoder_attention_mask)
        else:
            logits = causal_logits(self.llm, prefix, input_ids, mask, query_positions)
        return Blip2LLMOutput(logits=logits, query_embeds=prefix)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                 max_new_tokens: int = 20, min_new_tokens: int = 0, num_beams: int = 1, do_sample: bool = False,
                 top_p: float = 1.0, top_k: int = 0, temperature: float = 1.0, repetition_penalty: float = 1.0,
                 length_penalty: float = 1.0, early_stopping: bool = False, eos_token_id: int | None = None,
                 beam_length_convention: str = "generated", generator: torch.Generator | None = None,
                 qformer_input_ids: Tensor | None = None, qformer_attention_mask: Tensor | None = None,
                 compile: bool | str | None = None, stop_check_every: int = 0) -> Tensor:
        """Decode from the image queries and an optional prompt.

        input_ids/attention_mask: [B, T] prompt (any padding side: rows are re-aligned, left for decoder-only,
        right for seq2seq encoders, so a batch gives the same tokens as each prompt alone). Default: the bos.
        Returns decoder-only: [B, T + n] (aligned prompt + new tokens); seq2seq: [B, 1 + n] (decoder start + new).
        ``beam_length_convention="total"`` reproduces the transformers 4.2x beam search LAVIS ran. compile: the decode
        loop under torch.compile (CUDA graphs on GPU), the same ids; stop_check_every: steps between stop checks
        (compiled default 1: one LLM step per graph keeps the compile time bounded).
        """
        self._check_ids(input_ids)
        compile = self.compile_decoding if compile is None else compile
        prefix = self.query_embeds(pixel_values, qformer_input_ids, qformer_attention_mask)
        b = prefix.shape[0]
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                               do_sample=do_sample, top_p=top_p, top_k=top_k, temperature=temperature,
                               repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                               early_stopping=early_stopping, pad_token_id=self.pad_token_id,
                               eos_token_id=eos_token_id if eos_token_id is not None else self.eos_token_id,
                               beam_length_convention=beam_length_convention, compile=compile,
                               # an LLM step is a large graph: compile one step (bounded warm-up), not a chunk
                               stop_check_every=stop_check_every or (1 if compile else 0))
        device = pixel_values.device
        if input_ids is None:
            input_ids = torch.full((b, 1), self.start_token_id, dtype=torch.long, device=device)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        input_ids, mask = align_padding(input_ids, mask, self.pad_token_id, "right" if self.is_seq2seq else "left")
        nb = num_beams
        if self.is_seq2seq:
            hidden, enc_mask = seq2seq_encode(self.llm, prefix, input_ids, mask)
            step = Seq2SeqStep(self.llm, hidden.repeat_interleave(nb, 0), enc_mask.repeat_interleave(nb, 0),
                               1 + max_new_tokens)
            start = self.llm.config.decoder_start_token_id
            ids = torch.full((b * nb, 1), start, dtype=torch.long, device=device)
            return generate(step, ids, torch.ones_like(ids), cfg, reorder=step.reorder, generator=generator)
        step = CausalStep(self.llm, prefix.repeat_interleave(nb, 0), input_ids.shape[1] + max_new_tokens)
        return generate(step, input_ids.repeat_interleave(nb, 0), mask.repeat_interleave(nb, 0), cfg,
                        reorder=step.reorder, generator=generator)


class InstructBlipLanguageModel(Blip2LanguageModel):
    """InstructBLIP: the instruction (Q-Former BERT ids ``qformer_input_ids``) is read by the Q-Former with the
    queries."""

    instruct = True
    # started from a stage-2 file (BLIP-2 VQA fine-tuning, InstructBLIP from BLIP-2) the text parts are new; the
    # training run fills them from model.text_init or the query FFN (blip.convert.blip2_handoff.init_question_text)
    new_on_init_from = Blip2LanguageModel.new_on_init_from + QUESTION_TEXT_PARTS

    def query_embeds(self, pixel_values: Tensor, qformer_input_ids: Tensor | None = None,
                     qformer_attention_mask: Tensor | None = None) -> Tensor:
        """pixel_values [B, 3, H, W], qformer_input_ids [B, Ti] -> projected queries [B, Q, H_llm]."""
        if pixel_values is None:
            raise ValueError("InstructBLIP needs pixel_values: the image enters the LLM only as Q-Former queries")
        if qformer_input_ids is None:
            raise ValueError("InstructBLIP needs the instruction for its Q-Former: pass qformer_input_ids (BERT ids)")
        image = self.image_encoder(pixel_values)
        out = self.qformer(image, input_ids=qformer_input_ids, attention_mask=qformer_attention_mask)
        queries = out[:, :self.qformer.num_queries]
        return self.llm_proj(queries.to(self.llm_proj.weight.dtype)).to(self.llm_dtype)


def instruct_qformer(cfg: QFormerConfig) -> QFormerConfig:
    """The InstructBLIP Q-Former keeps its text parts (word/position embeddings, text FFN)."""
    return replace(cfg, text=replace(cfg.text, word_embeddings=True, text_ffn=True))


def create(arch: str, task: str = "stage2", *, llm: LLMSource | nn.Module | None = None,
           **overrides) -> Blip2LanguageModel:
    """Build a stage-2 BLIP-2 (``task="stage2"``) or InstructBLIP (``task="instruct"``) model.

    llm: HF directory of the language model (required for the real archs), a config dict, or a built HF model.
    overrides: fields of :class:`Blip2LLMConfig` (``frozen_dtype="bf16"``, ``prompt=...``, ``eos=...``); ``dtype`` is
    accepted for ``frozen_dtype``.
    """
    if arch not in LLM_ARCHS:
        raise KeyError(f"unknown BLIP-2 LLM arch {arch!r}; known: {sorted(LLM_ARCHS)}")
    cfg = copy.deepcopy(LLM_ARCHS[arch])
    if "dtype" in overrides:
        overrides["frozen_dtype"] = overrides.pop("dtype")
    built = llm if isinstance(llm, nn.Module) else None
    if llm is not None and built is None:
        cfg.llm = llm
        if isinstance(llm, (str, Path)) and cfg.tokenizer is None:
            cfg.tokenizer = llm
    if "image_size" in overrides:   # e.g. 364 for fine-tuning: the position embedding gets that grid
        overrides["vision"] = replace(overrides.get("vision", cfg.vision), image_size=overrides.pop("image_size"))
    return build(replace(cfg, **overrides), task, llm=built)


def build(cfg: Blip2LLMConfig, task: str = "stage2", llm: nn.Module | None = None) -> Blip2LanguageModel:
    """The model of a config: task "stage2" -> :class:`Blip2LanguageModel`, "instruct" ->
    :class:`InstructBlipLanguageModel` (its Q-Former keeps the text parts)."""
    if task not in LLM_TASKS:
        raise ValueError(f"task must be one of {LLM_TASKS}, got {task!r}")
    if task == "instruct":
        cfg = replace(cfg, qformer=instruct_qformer(cfg.qformer))
    return (InstructBlipLanguageModel if task == "instruct" else Blip2LanguageModel)(cfg, llm=llm)
