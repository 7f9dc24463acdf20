"""BLIP-2's Q-Former: learned query tokens + the library's one BERT-style transformer in Q-Former mode,
and the frozen image encoder in front of it (a ViT configuration + ``ln_vision``)."""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.transformer import TextConfig, TextTransformer
from ..nn.vit import LayerNorm, VisionConfig, VisionTransformer
from .lora import set_adapter_dropout

EVA_VIT_G = VisionConfig(image_size=224, patch_size=14, width=1408, depth=39, heads=16, mlp_dim=6144, qkv_bias="qv",
                         final_norm=False, layer_norm_eps=1e-6)
CLIP_VIT_L = VisionConfig(image_size=224, patch_size=14, width=1024, depth=23, heads=16, mlp_dim=4096, qkv_bias="qkv",
                          final_norm=False, pre_norm=True, patch_bias=False, act="quick_gelu", layer_norm_eps=1e-5)


def qformer_config(encoder_width: int = 1408, **overrides) -> TextConfig:
    """bert-base Q-Former: 12 layers, cross-attention every 2nd layer, query FFN, vocab 30522 + [DEC]."""
    cfg = dict(vocab_size=30523, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
               encoder_width=encoder_width, cross_attention_freq=2, cross_attention_queries_only=True, query_ffn=True,
               hidden_dropout=0.1, attention_dropout=0.1)
    cfg.update(overrides)
    return TextConfig(**cfg)


@dataclass
class QFormerConfig:
    text: TextConfig = field(default_factory=qformer_config)
    num_query_tokens: int = 32


class QFormer(nn.Module):
    """Query tokens [1, Q, D] + transformer. Queries (and optional text) attend to image features.

    forward(image_embeds [B, S, E], input_ids [B, T] | None, ...) -> [B, Q + T, D]. The queries are always
    present: a Q-Former call without an image is an error, never a silent text-only path.
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.text.hidden_size))
        nn.init.normal_(self.query_tokens, std=cfg.text.initializer_range)
        self.transformer = TextTransformer(cfg.text)

    @property
    def num_queries(self) -> int:
        return self.cfg.num_query_tokens

    def forward(self, image_embeds: Tensor, image_mask: Tensor | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, causal: bool = False, cache=None) -> Tensor:
        if image_embeds is None:
            raise ValueError("the Q-Former needs image features: pass image_embeds")
        b = image_embeds.shape[0]
        queries = self.query_tokens.expand(b, -1, -1)
        mask = None
        if input_ids is not None:
            text_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            mask = torch.cat([text_mask.new_ones(b, self.num_queries), text_mask], dim=1)
        return self.transformer(input_ids, query_embeds=queries, attention_mask=mask, causal=causal,
                                prefix_length=self.num_queries if causal else 0,
                                encoder_hidden_states=image_embeds.to(queries.dtype), encoder_attention_mask=image_mask,
                                cache=cache)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Text alone (BLIP-2 ITC text side: no queries, no image): input_ids [B, T] -> [B, T, D]."""
        return self.transformer(input_ids, attention_mask=attention_mask)


class FrozenImageEncoder(nn.Module):
    """ViT (EVA ViT-g or CLIP ViT-L configuration) followed by ``ln_vision`` (trainable, computed in fp32).

    forward(pixel_values [B, 3, H, W]) -> [B, 1 + N, width]. With ``freeze`` (BLIP-2's default) the ViT has
    ``requires_grad=False`` and stays in eval mode when the model is ``.train()``-ed (as LAVIS ``freeze_vit``). A ViT
    without trainable parameters runs without autograd; one with LoRA adapters (:mod:`blip.models.lora`) lets
    gradients reach them, still in eval mode (only the adapters' dropout follows ``.train()``).
    :meth:`cast_vit` stores its Linear/Conv weights in fp16/bf16 (LAVIS ``vit_precision``; norms, q/v biases, cls and
    position embeddings stay fp32); ``ln_vision`` returns float32 either way.
    """

    def __init__(self, cfg: VisionConfig, ln_eps: float = 1e-5, freeze: bool = True):
        super().__init__()
        self.visual_encoder = VisionTransformer(cfg)
        self.ln_vision = LayerNorm(cfg.width, eps=ln_eps)
        self.set_frozen(freeze)

    def train(self, mode: bool = True) -> "FrozenImageEncoder":
        super().train(mode)
        if self.frozen:
            self.visual_encoder.eval()  # no dropout / drop-path in a frozen tower
            set_adapter_dropout(self.visual_encoder, mode)
        return self

    def set_frozen(self, frozen: bool) -> "FrozenImageEncoder":
        """Freeze the ViT (no grad, eval mode, no activations kept) or make it trainable (LAVIS ``freeze_vit:
        False``: fine-tuning). A trainable ViT is stored in fp32 (LAVIS ``vit_precision: fp32``): weights a frozen
        tower had cast to bf16 / fp16 come back as fp32 copies of those values."""
        self.frozen = frozen
        self.visual_encoder.requires_grad_(not frozen)
        if not frozen:
            self.visual_encoder.float()
        self.train(self.training)
        return self

    def cast_vit(self, dtype: torch.dtype) -> "FrozenImageEncoder":
        """Store the ViT's Linear/Conv weights and biases in ``dtype`` (LAVIS ``convert_weights_to_fp16``); its
        residual stream stays fp32."""
        self.visual_encoder.cast_matmul_weights(dtype)
        return self

    def forward(self, pixel_values: Tensor) -> Tensor:
        trains = any(p.requires_grad for p in self.visual_encoder.parameters())
        with contextlib.nullcontext() if trains else torch.no_grad():  # a frozen tower keeps no activations
            feats = self.visual_encoder(pixel_values).float()
        ln = self.ln_vision  # fp32 even when the whole model was cast to bf16/fp16, as LAVIS computes it
        return F.layer_norm(feats, ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
