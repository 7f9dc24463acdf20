"""The FlanT5 prefix-LM split of BLIP-2 stage 2 (paper §3.3): each caption is cut at a random point; the prefix goes
to the encoder after the image queries, the suffix is the decoder's target.

LAVIS never implemented the split; its Blip2T5 mode (encoder reads ``text_input``, decoder predicts
``text_output``) is :func:`text_pair_batch`. Token lists become padded tensors here; the objective
(:class:`blip.objectives.blip2_stage2.Blip2Stage2Objective`) moves them to the device.
"""
from __future__ import annotations

import torch
from torch import Tensor


def split_point(n: int, generator: torch.Generator | None = None) -> int:
    """Prefix length for a caption of n tokens: uniform in 1 .. max(1, n // 2)."""
    high = max(1, n // 2)
    return int(torch.randint(1, high + 1, (1,), generator=generator))


def pad_rows(seqs: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> (ids [B, T] right-padded with ``pad_token_id``, mask [B, T])."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def decoder_targets(seqs: list[list[int]], pad_token_id: int, decoder_start_token_id: int) -> dict[str, Tensor]:
    """Target token lists -> labels [B, Td] (pad -100), decoder_input_ids (labels shifted right after the decoder
    start), decoder_attention_mask."""
    ids, mask = pad_rows(seqs, pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    shifted = torch.cat([torch.full_like(labels[:, :1], decoder_start_token_id), ids[:, :-1]], dim=1)
    return {"labels": labels, "decoder_input_ids": shifted, "decoder_attention_mask": mask}


def prefix_lm_batch(tokenizer, texts: list[str], special_ids: tuple[int, int], *, prompt: str = "",
                    max_txt_len: int = 32, splits: list[int] | None = None,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Captions -> encoder ``input_ids``/``attention_mask`` [B, Te] (prompt + prefix + </s>) and the decoder targets
    of :func:`decoder_targets` (suffix + </s>). special_ids: (pad, decoder start) of the LLM.
    splits: the prefix lengths (default: drawn with :func:`split_point`)."""
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
    enc, dec = [], []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False).input_ids[:max_txt_len - 1]
        k = splits[i] if splits is not None else split_point(len(ids), generator)
        enc.append(prompt_ids + ids[:k] + [eos])
        dec.append(ids[k:] + [eos])
    return _encoder_decoder(enc, dec, *special_ids)


def text_pair_batch(tokenizer, inputs: list[str], outputs: list[str], special_ids: tuple[int, int], *,
                    max_txt_len: int = 32, max_output_len: int | None = None) -> dict[str, Tensor]:
    """LAVIS Blip2T5 mode: the encoder reads ``inputs``, the decoder predicts ``outputs`` (both end with </s>);
    outputs are truncated to ``max_output_len`` tokens (default ``max_txt_len``)."""
    enc = [tokenizer(t, truncation=True, max_length=max_txt_len).input_ids for t in inputs]
    dec = [tokenizer(t, truncation=True, max_length=max_output_len or max_txt_len).input_ids for t in outputs]
    return _encoder_decoder(enc, dec, *special_ids)


def _encoder_decoder(enc: list[list[int]], dec: list[list[int]], pad: int, start: int) -> dict[str, Tensor]:
    ids, mask = pad_rows(enc, pad)
    return {"input_ids": ids, "attention_mask": mask, **decoder_targets(dec, pad, start)}
