"""BLIP-2 stage 1: a frozen image encoder, the Q-Former and its three heads (ITC, ITM, ITG captioning).

Pipeline: pixels -> frozen ViT (EVA ViT-g/14 or CLIP ViT-L/14) -> ``ln_vision`` -> Q-Former queries cross-attend to
the image features -> heads:

- ITC: ``vision_proj`` of every query output vs ``text_proj`` of the text [CLS]; similarity = max over queries.
- ITM: queries and text attend to each other (bidirectional), queries read the image; ``itm_head`` averaged over
  the query outputs.
- ITG: text is decoded with the "multimodal causal" mask (queries see queries, text sees queries + earlier text);
  the query keys/values come from a cache filled by the query pass (the paper's reuse), the LM head is tied to the
  word embeddings.

The tensor API takes ids as given (callers put [CLS] for ITC/ITM, [DEC] for ITG); the string API (``caption``,
``match``) is :class:`blip.models.blip2_qformer_strings.QformerStrings`; the stage-1 training objective is
:class:`blip.objectives.blip2_stage1.Blip2Stage1Objective`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.special_ids import DEC_TOKEN_ID, PAD_TOKEN_ID, SEP_TOKEN_ID
from ..dtypes import to_dtype
from ..generation import GenerationConfig, generate
from ..nn.attention import ConcatKVCache
from ..nn.transformer import LMHead
from ..nn.vit import VisionConfig
from .blip2_qformer_strings import QformerStrings
from .family import Family
from .qformer import EVA_VIT_G, FrozenImageEncoder, QFormer, QFormerConfig
from .structure import InferenceModel



@dataclass
class Blip2QformerConfig:
    vision: VisionConfig = field(default_factory=lambda: EVA_VIT_G)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    embed_dim: int = 256                  # ITC projection width
    ln_vision_eps: float = 1e-5
    freeze_vit: bool = True
    vit_dtype: str = "fp32"               # "fp16" / "bf16": frozen ViT Linear/Conv weights stored in that dtype
    max_txt_len: int = 32                 # stage-1 training tokenization
    temp: float = 0.07                    # ITC temperature (learnable, used by the stage-1 objective)


@dataclass
class ImageEmbeddings:
    embeds: Tensor        # [B, Q, E] normalized vision_proj of every query output (what ITC compares)
    pooled: Tensor        # [B, E] normalized mean of ``embeds``: one vector per image for indexing
    query_output: Tensor  # [B, Q, D] Q-Former query outputs
    vit_embeds: Tensor    # [B, 1 + N, W] ln_vision(ViT(pixels)), float32


@dataclass
class TextEmbeddings:
    embeds: Tensor        # [B, E] normalized text_proj of the first ([CLS]) position
    hidden: Tensor        # [B, T, D] Q-Former text outputs (unimodal)


@dataclass
class Blip2Features:
    """LAVIS ``extract_features`` fields; the ones a mode does not compute are None."""
    image_embeds: Tensor | None = None        # [B, Q, D]
    image_embeds_proj: Tensor | None = None   # [B, Q, E] normalized
    text_embeds: Tensor | None = None         # [B, T, D]
    text_embeds_proj: Tensor | None = None    # [B, T, E] normalized (all positions)
    multimodal_embeds: Tensor | None = None   # [B, Q, D] query part of the joint image-text pass


@dataclass
class Blip2QformerOutput:
    logits: Tensor        # [B, T, vocab] ITG logits of the text positions


def query_similarity(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """BLIP-2 ITC similarity: image_embeds [Bi, Q, E], text_embeds [Bt, E] -> [Bi, Bt], max over the Q queries."""
    return torch.einsum("iqe,te->itq", image_embeds, text_embeds).amax(dim=-1)


class Blip2Qformer(QformerStrings, InferenceModel, nn.Module):
    """BLIP-2 stage-1 model (LAVIS ``Blip2Qformer``, HF ``Blip2ForImageTextRetrieval`` + the ITG head).

    Modules: ``image_encoder`` (``visual_encoder`` + ``ln_vision``), ``qformer`` (``query_tokens`` + transformer with
    text embeddings), ``lm_head`` (tied), ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``.
    """

    family = Family.BLIP2_QFORMER
    vit_path = "image_encoder.visual_encoder"
    checkpointed = ("image_encoder.visual_encoder", "qformer.transformer")
    dtype_part = "qformer"   # .dtype: the trained part's (the frozen ViT may be stored in fp16 / bf16)
    compile_decoding = False   # generate()'s default for compile= (blip.load(compile=True) sets it)

    def __init__(self, cfg: Blip2QformerConfig):
        super().__init__()
        self.cfg = cfg
        text = cfg.qformer.text
        if not (text.word_embeddings and text.text_ffn and text.cross_attention_queries_only and text.query_ffn):
            raise ValueError("Blip2Qformer needs a stage-1 Q-Former: word embeddings, text FFN, query FFN, "
                             "cross-attention on queries only")
        self.image_encoder = FrozenImageEncoder(cfg.vision, cfg.ln_vision_eps, cfg.freeze_vit)
        if to_dtype(cfg.vit_dtype) != torch.float32 and cfg.freeze_vit:   # a trainable ViT stays fp32
            self.image_encoder.cast_vit(to_dtype(cfg.vit_dtype))
        self.qformer = QFormer(cfg.qformer)
        self.lm_head = LMHead(text, self.qformer.transformer.embeddings.word)
        self.vision_proj = nn.Linear(text.hidden_size, cfg.embed_dim)
        self.text_proj = nn.Linear(text.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        self.has_lm_head = True   # False after loading a format without the ITG head (HF Blip2ForImageTextRetrieval)
        for m in (self.lm_head.dense, self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(m.weight, std=text.initializer_range)
            nn.init.zeros_(m.bias)

    @property
    def num_queries(self) -> int:
        return self.qformer.num_queries

    # ---- features ------------------------------------------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> ln_vision(ViT) [B, 1 + N, W] in float32 (what the Q-Former cross-attends to)."""
        return self.image_encoder(pixel_values)

    def query_output(self, vit_embeds: Tensor, cache=None) -> Tensor:
        """Queries attending to the image: vit_embeds [B, S, W] -> [B, Q, D]. ``cache`` keeps their self-attn K/V."""
        return self.qformer(vit_embeds, cache=cache)

    def encode_image(self, pixel_values: Tensor) -> ImageEmbeddings:
        """[B, 3, H, W] -> the Q normalized query embeddings ITC compares (+ pooled, query outputs, ViT features)."""
        vit = self.image_features(pixel_values)
        query = self.query_output(vit)
        embeds = F.normalize(self.vision_proj(query), dim=-1)
        return ImageEmbeddings(embeds, F.normalize(embeds.mean(1), dim=-1), query, vit)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TextEmbeddings:
        """input_ids [B, T] (with [CLS] first, as LAVIS) -> normalized [B, E] + hidden states; no image involved."""
        hidden = self.qformer.encode_text(input_ids, attention_mask)
        return TextEmbeddings(F.normalize(self.text_proj(hidden[:, 0]), dim=-1), hidden)

    def multimodal_output(self, vit_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Queries + text (bidirectional), queries read the image: -> query outputs [B, Q, D]."""
        return self.qformer(vit_embeds, input_ids=input_ids, attention_mask=attention_mask)[:, :self.num_queries]

    def extract_features(self, pixel_values: Tensor | None = None, input_ids: Tensor | None = None,
                         attention_mask: Tensor | None = None, mode: str = "multimodal") -> Blip2Features:
        """LAVIS ``extract_features``: mode "image" (pixels), "text" (ids) or "multimodal" (both)."""
        if mode == "image":
            if pixel_values is None:
                raise ValueError("mode='image' needs pixel_values")
            img = self.encode_image(pixel_values)
            return Blip2Features(image_embeds=img.query_output, image_embeds_proj=img.embeds)
        if mode == "text":
            if input_ids is None:
                raise ValueError("mode='text' needs input_ids")
            hidden = self.qformer.encode_text(input_ids, attention_mask)
            return Blip2Features(text_embeds=hidden, text_embeds_proj=F.normalize(self.text_proj(hidden), dim=-1))
        if mode == "multimodal":
            if pixel_values is None or input_ids is None:
                raise ValueError("mode='multimodal' needs pixel_values and input_ids")
            out = self.multimodal_output(self.image_features(pixel_values), input_ids, attention_mask)
            return Blip2Features(multimodal_embeds=out)
        raise ValueError(f"mode must be 'image', 'text' or 'multimodal', got {mode!r}")

    # ---- retrieval heads -----------------------------------------------------------------------------------
    def itc_similarity(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Cosine similarity [B_img, B_txt], max over queries, no temperature (HF ITC: ``use_image_text_matching_head
        =False``)."""
        return self.itc_similarity_from_features(self.image_features(pixel_values), input_ids, attention_mask)

    def itc_similarity_from_features(self, vit_embeds: Tensor, input_ids: Tensor,
                                     attention_mask: Tensor | None = None) -> Tensor:
        """vit_embeds [B_img, S, W] (from :meth:`image_features`), input_ids [B_txt, T] -> [B_img, B_txt]."""
        image = F.normalize(self.vision_proj(self.query_output(vit_embeds)), dim=-1)
        return query_similarity(image, self.encode_text(input_ids, attention_mask).embeds)

    def itm_logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Matching logits [B, 2] of the pairs (image b, text b), averaged over the query outputs."""
        return self.itm_logits_from_features(self.image_features(pixel_values), input_ids, attention_mask)

    def itm_logits_from_features(self, vit_embeds: Tensor, input_ids: Tensor,
                                 attention_mask: Tensor | None = None) -> Tensor:
        """vit_embeds [B, S, W] (from :meth:`image_features`), input_ids [B, T] -> [B, 2]."""
        return self.itm_head(self.multimodal_output(vit_embeds, input_ids, attention_mask)).mean(dim=1)

    # ---- image-grounded text generation --------------------------------------------------------------------
    def lm_logits(self, vit_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                  query_cache: ConcatKVCache | None = None) -> Tensor:
        """ITG logits [B, T, vocab]: ``lm_head`` over :meth:`lm_hidden` (same arguments)."""
        return self.lm_head(self.lm_hidden(vit_embeds, input_ids, attention_mask, query_cache))

    def lm_hidden(self, vit_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                  query_cache: ConcatKVCache | None = None) -> Tensor:
        """ITG text states [B, T, D] before the LM head: text (``[DEC]`` first) attends to the queries and to
        earlier text. Training applies the head to target positions only (:func:`blip.losses.lm_loss_from_hidden`).

        query_cache: a cache holding exactly the query pass's self-attention K/V (training reuses the ITC pass);
        without one the query pass runs here. The text K/V are appended to it.
        """
        if query_cache is None:
            query_cache = ConcatKVCache(self.cfg.qformer.text.num_layers)
            self.query_output(vit_embeds, cache=query_cache)
        if query_cache.length != self.num_queries:
            raise ValueError(f"query_cache must hold the {self.num_queries} query positions only, "
                             f"it holds {query_cache.length}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], self.num_queries), attention_mask], dim=1)
        return self.qformer.transformer(input_ids, attention_mask=mask, causal=True, prefix_length=self.num_queries,
                                        cache=query_cache)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
                ) -> Blip2QformerOutput:
        """ITG logits for the T text positions (the captioning view of the model)."""
        self._check_lm_head()
        return Blip2QformerOutput(self.lm_logits(self.image_features(pixel_values), input_ids, attention_mask))

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                 max_new_tokens: int = 20, min_new_tokens: int = 0, num_beams: int = 1, do_sample: bool = False,
                 top_p: float = 1.0, top_k: int = 0, temperature: float = 1.0, repetition_penalty: float = 1.0,
                 length_penalty: float = 1.0, beam_length_convention: str = "generated",
                 eos_token_id: int = SEP_TOKEN_ID, pad_token_id: int = PAD_TOKEN_ID,
                 generator: torch.Generator | None = None, compile: bool | str | None = None,
                 stop_check_every: int = 0) -> Tensor:
        """Q-Former captioning (LAVIS ``Blip2Qformer.generate``): returns [B, T + n] ids, prompt included.

        input_ids: [B, T] prompt, default ``[DEC]`` alone. The queries are run once per image into a KV cache, which
        beams share by index (no repeated image pass). LAVIS lengths count the prompt: ``max_length=L`` with the
        default prompt is ``max_new_tokens=L - 1``; use ``beam_length_convention="total"`` to reproduce LAVIS beams.
        """
        self._check_lm_head()
        b = pixel_values.shape[0]
        if input_ids is None:
            input_ids = torch.full((b, 1), DEC_TOKEN_ID, dtype=torch.long, device=pixel_values.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif not bool(attention_mask.all()):
            raise ValueError("Q-Former captioning takes prompts without padding (text positions are counted from the "
                             "first token): generate prompts of different lengths separately")
        q = self.num_queries
        transformer = self.qformer.transformer
        cache = transformer.new_cache(b, q + input_ids.shape[1] + max_new_tokens)
        self.query_output(self.image_features(pixel_values), cache=cache)
        if num_beams > 1:
            cache.reorder(torch.arange(b, device=input_ids.device).repeat_interleave(num_beams))
            input_ids = input_ids.repeat_interleave(num_beams, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_beams, dim=0)

        def step(new_ids: Tensor, mask: Tensor) -> Tensor:
            full = torch.cat([mask.new_ones(mask.shape[0], q), mask], dim=1)
            hidden = transformer(new_ids, attention_mask=full, causal=True, prefix_length=q, cache=cache)
            return self.lm_head(hidden[:, -1:])[:, 0]
        step.mark_static = cache.mark_static  # CUDA graphs may update the cache in place

        cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                               do_sample=do_sample, top_p=top_p, top_k=top_k, temperature=temperature,
                               repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                               beam_length_convention=beam_length_convention,
                               compile=self.compile_decoding if compile is None else compile,
                               stop_check_every=stop_check_every)
        return generate(step, input_ids, attention_mask, cfg, reorder=cache.reorder, generator=generator)

    def _check_lm_head(self) -> None:
        if not self.has_lm_head:
            raise ValueError("this model was loaded from a checkpoint without the ITG (LM) head (HF "
                             "Blip2ForImageTextRetrieval drops it): captioning needs a LAVIS stage-1 checkpoint")
