"""The one BERT-style transformer: MED text encoder, image-grounded encoder, MED decoder and Q-Former.

Post-LayerNorm BERT layers with
- self-attention that is bidirectional, causal, or "multimodal causal" (a bidirectional prefix of
  query tokens that text can see but that cannot see text) — chosen per call by the mask;
- cross-attention to image features in every ``cross_attention_freq``-th layer, applied to all positions
  (MED) or to the query positions only (Q-Former, ``cross_attention_queries_only``);
- twin cross-attention to two images (BLIP NLVR2, ``twin_cross_attention``): one cross-attention per image, their
  outputs averaged, or concatenated and projected from layer ``twin_merge_from_layer`` on;
- an optional second FFN for the leading query positions (Q-Former);
- a preallocated KV cache for decoding, and cross-attention K/V that can be computed once per batch.

Parameter names are our own (fused ``qkv`` and ``kv`` projections for fewer, larger GEMMs);
``blip/checkpoints.py`` maps the BERT/MED/Q-Former names of the original, LAVIS and HF checkpoints onto them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache, attention, causal_mask, grouped_cross_attention, merge_heads, padding_mask, split_heads


@dataclass
class TextConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    encoder_width: int | None = 768      # width of the image features; None: no cross-attention at all
    cross_attention_freq: int = 1        # cross-attention in layers i with i % freq == 0
    cross_attention_queries_only: bool = False  # Q-Former: only query positions attend to the image
    twin_cross_attention: bool = False   # BLIP NLVR2: attend to two images ([2, B, S, E] features) separately
    twin_merge_from_layer: int = 6       # NLVR2: layers >= this merge the two by a linear layer, earlier ones average
    query_ffn: bool = False              # Q-Former: separate FFN for the leading query positions
    text_ffn: bool = True                # BLIP-2 stage 2 drops the text FFN
    word_embeddings: bool = True         # BLIP-2 stage 2 drops word/position embeddings
    initializer_range: float = 0.02


def check_length(length: int, max_positions: int, what: str) -> None:
    """ValueError when a sequence needs more positions than the model has (instead of an IndexError deep inside)."""
    if length > max_positions:
        raise ValueError(f"{what}: {length} tokens, but the model has {max_positions} positions "
                         "(max_position_embeddings); truncate the text (tokenize(max_length=...)) or generate fewer "
                         "new tokens")


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.word_embeddings:
            self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: Tensor | None, query_embeds: Tensor | None, position_offset: int | Tensor) -> Tensor:
        """input_ids [B, T] and/or query_embeds [B, Q, D] -> [B, Q + T, D]. Queries get no position embedding."""
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            if not hasattr(self, "word"):
                raise ValueError("this transformer has no word embeddings (BLIP-2 stage-2 Q-Former): pass queries only")
            if isinstance(position_offset, int):  # (a device tensor in compiled decoding: checked by the caller)
                check_length(position_offset + input_ids.shape[1], self.position.num_embeddings, "text")
            pos = position_offset + torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word(input_ids) + self.position(pos))
        if not parts:
            raise ValueError("pass input_ids, query_embeds or both")
        return self.dropout(self.norm(torch.cat(parts, dim=1)))


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.dropout_p = cfg.num_heads, cfg.attention_dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int) -> Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        h = attention(q, k, v, mask, self.dropout_p if self.training else 0.0)
        return self.norm(x + self.dropout(self.out(merge_heads(h))))


class CrossAttention(nn.Module):
    """Text -> image attention; with ``residual_norm=False`` only the projected context (a twin branch)."""

    def __init__(self, cfg: TextConfig, residual_norm: bool = True):
        super().__init__()
        self.heads, self.dropout_p = cfg.num_heads, cfg.attention_dropout
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.encoder_width, 2 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        if residual_norm:
            self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            self.dropout = nn.Dropout(cfg.hidden_dropout)

    def project_kv(self, encoder_hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """[B, S, E] -> (k, v), each [B, H, S, Dh]."""
        k, v = self.kv(encoder_hidden_states).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def attend(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None, group: int = 1) -> Tensor:
        """x [B, T, D] -> projected context [B, T, D] (no residual)."""
        q = split_heads(self.q(x), self.heads)
        h = grouped_cross_attention(q, kv[0], kv[1], mask, group, self.dropout_p if self.training else 0.0)
        return self.out(merge_heads(h))

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None, group: int = 1) -> Tensor:
        return self.norm(x + self.dropout(self.attend(x, kv, mask, group)))


class TwinCrossAttention(nn.Module):
    """BLIP NLVR2: the text attends to image 0 and image 1 with separate cross-attentions (own q, k/v and output
    projections); the two outputs are averaged, or, with ``merge``, concatenated and projected by a linear layer
    (no activation, as BLIP / LAVIS). Then dropout, residual and one LayerNorm.

    Image features come stacked: [2, B, S, E] (index 0 = image 0), masks [2, B, 1, 1, S].
    """

    def __init__(self, cfg: TextConfig, merge: bool):
        super().__init__()
        self.image0 = CrossAttention(cfg, residual_norm=False)
        self.image1 = CrossAttention(cfg, residual_norm=False)
        self.merge = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size) if merge else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def project_kv(self, encoder_hidden_states: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """[2, B, S, E] -> ((k0, v0), (k1, v1)), each [B, H, S, Dh]."""
        if encoder_hidden_states.dim() != 4 or encoder_hidden_states.shape[0] != 2:
            raise ValueError("twin cross-attention reads two images: pass encoder_hidden_states stacked as "
                             f"[2, B, S, E], got {tuple(encoder_hidden_states.shape)}")
        return self.image0.project_kv(encoder_hidden_states[0]), self.image1.project_kv(encoder_hidden_states[1])

    def forward(self, x: Tensor, kv: tuple, mask: Tensor | None, group: int = 1) -> Tensor:
        h0 = self.image0.attend(x, kv[0], None if mask is None else mask[0], group)
        h1 = self.image1.attend(x, kv[1], None if mask is None else mask[1], group)
        h = (h0 + h1) / 2 if self.merge is None else self.merge(torch.cat([h0, h1], dim=-1))
        return self.norm(x + self.dropout(h))


class FeedForward(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.cfg = cfg
        self.self_attn = SelfAttention(cfg)
        self.cross_attn = None
        if cfg.encoder_width is not None and index % cfg.cross_attention_freq == 0:
            self.cross_attn = (TwinCrossAttention(cfg, merge=index >= cfg.twin_merge_from_layer)
                               if cfg.twin_cross_attention else CrossAttention(cfg))
        self.ffn = FeedForward(cfg) if cfg.text_ffn else None
        self.ffn_query = FeedForward(cfg) if cfg.query_ffn else None

    def forward(self, x: Tensor, mask: Tensor | None, cross: Tensor | tuple[Tensor, Tensor] | None,
                cross_mask: Tensor | None, query_length: int, cache: KVCache | None, layer: int,
                group: int) -> Tensor:
        """cross: image features [B', S, E] (twin: [2, B', S, E]), projected here, inside the layer, so FSDP can
        shard per layer and checkpointing recomputes them; or this layer's precomputed (k, v) (decoding)."""
        x = self.self_attn(x, mask, cache, layer)
        queries_only = self.cfg.cross_attention_queries_only  # Q-Former: text never attends to the image
        if self.cross_attn is not None and cross is not None and (query_length or not queries_only):
            cross_kv = self.cross_attn.project_kv(cross) if isinstance(cross, Tensor) else cross
            if queries_only:
                x = torch.cat([self.cross_attn(x[:, :query_length], cross_kv, cross_mask, group),
                               x[:, query_length:]], dim=1)
            else:
                x = self.cross_attn(x, cross_kv, cross_mask, group)
        if self.ffn_query is None or query_length == 0:
            return self._text_ffn(x)
        queries = self.ffn_query(x[:, :query_length])
        if query_length == x.shape[1]:
            return queries
        return torch.cat([queries, self._text_ffn(x[:, query_length:])], dim=1)

    def _text_ffn(self, x: Tensor) -> Tensor:
        if self.ffn is None:
            raise ValueError("this transformer has no text FFN (BLIP-2 stage-2 Q-Former): "
                             "text positions are not supported")
        return self.ffn(x)


class TextTransformer(nn.Module):
    """Embeddings + BERT layers. Returns hidden states [B, Q + T, D] of the current positions."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(TransformerLayer(cfg, i) for i in range(cfg.num_layers))
        self.grad_checkpointing = False
        if not self.embeddings.norm.weight.is_meta:  # on the meta device a checkpoint will assign every tensor
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data.normal_(0.0, self.cfg.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.zero_()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def cross_kv(self, encoder_hidden_states: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """Project image features to every cross-attention layer's K/V once (reused across decode steps), stored
        contiguous: every step reads them, and a strided K/V makes CPU attention 1.3x (fp32) to 3x (bf16) slower."""
        return [None if layer.cross_attn is None else
                tuple(t.contiguous() for t in layer.cross_attn.project_kv(encoder_hidden_states))
                for layer in self.layers]

    def new_cache(self, batch_size: int, max_length: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        p = self.layers[0].self_attn.qkv.weight
        return KVCache(self.cfg.num_layers, batch_size, self.cfg.num_heads, max_length,
                       self.cfg.hidden_size // self.cfg.num_heads, dtype or p.dtype, device or p.device)

    def forward(self, input_ids: Tensor | None = None, *, query_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None, causal: bool = False, prefix_length: int = 0,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                cross_kv: list | None = None, beam_group: int = 1, cache: KVCache | None = None,
                position_offset: int | None = None) -> Tensor:
        """Run the stack on text tokens and/or query embeddings.

        input_ids: [B, T]; query_embeds: [B, Q, D] (placed before the text).
        attention_mask: [B, Tk] over all keys, cached ones included (1 = token, 0 = pad); default all ones.
        causal: causal self-attention; ``prefix_length`` leading keys form a bidirectional prefix (Q-Former ITG).
        encoder_hidden_states: [B', S, E] image features (or ``cross_kv`` from :meth:`cross_kv`), with
        B = B' * beam_group; twin cross-attention: both images' features stacked, [2, B', S, E].
        encoder_attention_mask: [B', S] (twin: [2, B', S]). cache: a :class:`KVCache` (decoding: ``attention_mask``
        then covers its whole ``max_length``, keys not yet written may read 1) or a :class:`ConcatKVCache`;
        position_offset: first text position (default: the number of text tokens already in the cache).
        Returns [B, Q + T, D].
        """
        q_len = 0 if query_embeds is None else query_embeds.shape[1]
        if self.cfg.cross_attention_queries_only and q_len == 0 and (encoder_hidden_states is not None or cross_kv):
            # only queries read the image: image features without queries would be silently ignored
            raise ValueError("Q-Former: image features were passed without query_embeds; only the queries attend to "
                             "the image, so pass the query tokens too (or no image for text-only use)")
        static = isinstance(cache, KVCache)
        past = 0 if cache is None or static else cache.length
        if position_offset is None:
            start = cache.position if static else past
            position_offset = (start - prefix_length).clamp(min=0) if static else max(start - prefix_length, 0)
        x = self.embeddings(input_ids, query_embeds, position_offset)
        b, t = x.shape[:2]
        keys = cache.max_length if static else past + t
        if attention_mask is None:
            attention_mask = torch.ones(b, keys, dtype=torch.long, device=x.device)
        if attention_mask.shape[1] != keys:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} keys, expected {keys} "
                             + ("(the static cache's max_length)" if static else f"({past} cached + {t} new)"))
        if static:  # the whole buffer is attended: keys past the new positions are hidden
            new_positions = cache.positions(t)
            visible = attention_mask.bool() & (torch.arange(keys, device=x.device) <= new_positions[-1])
            # not causal: a prefix of all keys makes the mask bidirectional over the visible ones
            mask = causal_mask(visible, t, prefix_length if causal else keys, x.dtype, new_positions)
        elif causal:
            mask = causal_mask(attention_mask, t, prefix_length, x.dtype)
        else:
            mask = padding_mask(attention_mask, x.dtype)
        cross_mask = None if encoder_attention_mask is None else padding_mask(encoder_attention_mask, x.dtype)
        for i, layer in enumerate(self.layers):
            cross = encoder_hidden_states if cross_kv is None else cross_kv[i]
            args = (mask, cross, cross_mask, q_len, cache, i, beam_group)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, *args, use_reentrant=False)
            else:
                x = layer(x, *args)
        if cache is not None:
            cache.advance(t)
        return x


class LMHead(nn.Module):
    """BERT prediction head: dense + GELU + LayerNorm, then logits with the (tied) word embedding matrix."""

    def __init__(self, cfg: TextConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.word_embeddings = [word_embeddings]  # a list: tied, not registered twice

    @property
    def weight(self) -> Tensor:
        return self.word_embeddings[0].weight

    def forward(self, hidden: Tensor) -> Tensor:
        """[B, T, D] -> logits [B, T, vocab]."""
        return F.linear(self.norm(F.gelu(self.dense(hidden))), self.weight, self.bias)
