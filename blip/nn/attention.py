"""The one attention of the library: multi-head SDPA, additive masks, a preallocated KV cache.

Every attention in blip (ViT, MED text encoder/decoder, Q-Former) goes through :func:`attention`,
which calls ``torch.nn.functional.scaled_dot_product_attention`` (on a CPU, decode steps' short queries take two
matmuls and a softmax instead, which is faster there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, T, H*Dh] -> [B, H, T, Dh]."""
    b, t, d = x.shape
    return x.view(b, t, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, Dh] -> [B, T, H*Dh]."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Scaled dot-product attention.

    q: [B, H, Tq, Dh]; k, v: [B, H, Tk, Dh]; mask: additive, broadcastable to [B, H, Tq, Tk]
    (0 where attended, a large negative number where not). Returns [B, H, Tq, Dh].
    """
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    if q.device.type == "cpu" and q.shape[-2] <= SHORT_QUERY and not dropout_p:
        return _short_query_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# Decode steps on a CPU (a query or a beam group of queries against up to a few hundred keys): two matmuls and a
# softmax beat the fused SDPA kernel, 1.5x in fp32 and 5x in bf16 (batch 8, 12 heads, 577 image keys), while long
# queries (ViT, training) are 3x faster fused.
SHORT_QUERY = 4


def _short_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`attention` unfused: scores and softmax in float32 (as the fused kernel accumulates), output in
    q's dtype."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).float()
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def grouped_cross_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, group: int,
                            dropout_p: float = 0.0) -> Tensor:
    """Cross-attention where ``group`` consecutive query rows share one key/value set.

    Beam search keeps one copy of the image K/V per image instead of one per beam: the queries of the
    beams of an image are stacked along the time axis and attend to the same K/V (cross-attention has
    no causal structure, so this is exact).
    q: [B*group, H, Tq, Dh]; k, v: [B, H, Tk, Dh]; mask broadcastable to [B, 1, 1, Tk]. Returns [B*group, H, Tq, Dh].
    """
    if group == 1:
        return attention(q, k, v, mask, dropout_p)
    bg, h, tq, dh = q.shape
    q = q.view(bg // group, group, h, tq, dh).transpose(1, 2).reshape(bg // group, h, group * tq, dh)
    out = attention(q, k, v, mask, dropout_p)
    return out.view(bg // group, h, group, tq, dh).transpose(1, 2).reshape(bg, h, tq, dh)


def padding_mask(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Key-padding mask [..., B, Tk] (1 = token, 0 = pad) -> additive [..., B, 1, 1, Tk]."""
    return (1.0 - attention_mask[..., None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_mask(attention_mask: Tensor, query_length: int, prefix_length: int = 0,
                dtype: torch.dtype = torch.float32, query_positions: Tensor | None = None) -> Tensor:
    """Additive mask [B, 1, Tq, Tk] for causal attention over Tk = ``attention_mask.shape[1]`` keys.

    The new positions are the last ``query_length`` keys, or ``query_positions`` [Tq] (a static cache, whose
    buffer extends past them); key j is visible from the query at position p when j <= p and key j is not
    padding. The first ``prefix_length`` keys form a bidirectional prefix that cannot see later keys (the
    Q-Former's "multimodal causal" mask: queries see only queries, text sees queries and earlier text).
    """
    b, tk = attention_mask.shape
    device = attention_mask.device
    if query_positions is None:
        query_positions = torch.arange(tk - query_length, tk, device=device)
    rows = query_positions[:, None]
    cols = torch.arange(tk, device=device)[None, :]
    allowed = cols <= rows
    if prefix_length:
        in_prefix_row = rows < prefix_length
        allowed = torch.where(in_prefix_row, cols < prefix_length, allowed | (cols < prefix_length))
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    return (~allowed).to(dtype) * torch.finfo(dtype).min


class KVCache:
    """Preallocated self-attention cache for all layers: k, v of shape [L, B, H, max_len, Dh].

    The write position is a device tensor and every read returns the whole buffer (the attention mask hides the
    unwritten keys), so a decode step has the same shapes and addresses at every position: it can be compiled
    once and captured in a CUDA graph. :meth:`reorder` (beam search) works in place for the same reason.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)   # next position to write

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def positions(self, t: int) -> Tensor:
        """The [t] positions the next forward pass of t tokens writes."""
        return self.position + torch.arange(t, device=self.position.device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, T, Dh] at the current position of ``layer``; return the buffer [B, H, max_len, Dh]."""
        index = self.positions(k.shape[2])
        self.k[layer].index_copy_(2, index, k)
        self.v[layer].index_copy_(2, index, v)
        return self.k[layer], self.v[layer]

    def advance(self, t: int) -> None:
        """Commit the t positions written by the last forward pass (called once per pass, after all layers)."""
        self.position.add_(t)

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): index [B'] — in place when B' = B, so captured graphs stay valid."""
        if index.shape[0] == self.k.shape[1]:
            self.k.copy_(self.k.index_select(1, index))
            self.v.copy_(self.v.index_select(1, index))
        else:  # a new batch size (expanding to beams before decoding): new buffers
            self.k = self.k.index_select(1, index)
            self.v = self.v.index_select(1, index)

    def mark_static(self) -> None:
        """Tell torch.compile the buffers keep their addresses (CUDA graphs may then update them in place)."""
        for t in (self.k, self.v, self.position):
            torch._dynamo.mark_static_address(t)


class ConcatKVCache:
    """Autograd-friendly cache: keys/values grow by concatenation, never in place; ``length`` is a host int.

    For training passes that reuse cached K/V under autograd (BLIP-2 ITG reuses the query K/V of the ITC pass);
    :class:`KVCache` writes into a preallocated buffer, which autograd cannot differentiate across passes.
    """

    def __init__(self, num_layers: int):
        self.kv: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v [B, H, T, Dh] to ``layer``; return all keys/values so far."""
        if self.kv[layer] is not None:
            k = torch.cat([self.kv[layer][0], k], dim=2)
            v = torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = (k, v)
        return k, v

    def advance(self, t: int) -> None:
        self.length += t

    def reorder(self, index: Tensor) -> None:
        self.kv = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                   for kv in self.kv]
