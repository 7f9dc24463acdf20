"""BERT names <-> blip's :class:`blip.nn.transformer.TextTransformer`: the one key map of every BERT-shaped stack.

Original BLIP's MED encoder / decoder, LAVIS's BLIP and Q-Former, HF ``BlipFor*`` text towers, HF's Q-Former
(``self_name="attention"``) and plain HF BERT checkpoints (``text_init``) all name their layers as BERT does; ours
fuse q/k/v (and the cross-attention's k/v) into one projection. Also the HF BERT format's tower map for
``model.text_init`` (:func:`text_state_to_ours`, :func:`lm_head_state`).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from ..checkpoints import CheckpointError, StateDict
from ..nn.transformer import LMHead, TextTransformer

_BERT_LAYER = [  # (BERT suffix, our suffix, fused slot or None)
    ("attention.{s}.query", "self_attn.qkv", 0), ("attention.{s}.key", "self_attn.qkv", 1),
    ("attention.{s}.value", "self_attn.qkv", 2),
    ("attention.output.dense", "self_attn.out", None), ("attention.output.LayerNorm", "self_attn.norm", None),
    ("crossattention.{s}.query", "cross_attn.q", None), ("crossattention.{s}.key", "cross_attn.kv", 0),
    ("crossattention.{s}.value", "cross_attn.kv", 1),
    ("crossattention.output.dense", "cross_attn.out", None),
    ("crossattention.output.LayerNorm", "cross_attn.norm", None),
    # BLIP NLVR2's twin cross-attention: self0/dense0 read image 0, self1/dense1 image 1, merge_layer joins them
    *[(f"crossattention.self{i}.{src}", f"cross_attn.image{i}.{dst}", slot) for i in (0, 1)
      for src, dst, slot in (("query", "q", None), ("key", "kv", 0), ("value", "kv", 1))],
    ("crossattention.output.dense0", "cross_attn.image0.out", None),
    ("crossattention.output.dense1", "cross_attn.image1.out", None),
    ("crossattention.output.merge_layer", "cross_attn.merge", None),
    ("intermediate.dense", "ffn.fc1", None), ("output.dense", "ffn.fc2", None), ("output.LayerNorm", "ffn.norm", None),
    ("intermediate_query.dense", "ffn_query.fc1", None), ("output_query.dense", "ffn_query.fc2", None),
    ("output_query.LayerNorm", "ffn_query.norm", None),
]
_BERT_EMB = {"embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings": "embeddings.position",
             "embeddings.LayerNorm": "embeddings.norm"}


def bert_to_ours(sd: StateDict, src: str, dst: str, self_name: str = "self",
                 embeddings: dict[str, str] | None = None) -> tuple[StateDict, set[str]]:
    """Convert the BERT-named keys under prefix ``src`` (e.g. ``"text_decoder.bert."``) to ours under ``dst``.

    ``self_name``: "self" (original/LAVIS/HF BLIP) or "attention" (HF Q-Former). ``embeddings`` overrides the
    embedding key names (HF Q-Former: ``{"layernorm": "embeddings.norm"}`` with its own prefix). Fused projections
    (q,k,v -> qkv; k,v -> kv) are concatenated. Returns (converted, consumed source keys).
    """
    out: StateDict = {}
    used: set[str] = set()
    fused: dict[str, dict[int, Tensor]] = {}
    emb = _BERT_EMB if embeddings is None else embeddings
    for name, value in sd.items():
        if not name.startswith(src):
            continue
        rest = name[len(src):]
        for s_name, d_name in emb.items():
            if rest.startswith(s_name + "."):
                out[dst + d_name + rest[len(s_name):]] = value
                used.add(name)
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", rest)
        if not m:
            continue
        idx, module, kind = m.groups()
        for b_suffix, o_suffix, slot in _BERT_LAYER:
            if module == b_suffix.format(s=self_name):
                key = f"{dst}layers.{idx}.{o_suffix}.{kind}"
                if slot is None:
                    out[key] = value
                else:
                    fused.setdefault(key, {})[slot] = value
                used.add(name)
    for key, parts in fused.items():
        n = 3 if ".self_attn.qkv." in key else 2
        if sorted(parts) != list(range(n)):
            raise CheckpointError(f"incomplete attention projections for {key}: found slots {sorted(parts)}")
        out[key] = torch.cat([parts[i] for i in range(n)], dim=0)
    return out, used


def ours_to_bert(sd: StateDict, src: str, dst: str, self_name: str = "self",
                 embeddings: dict[str, str] | None = None) -> StateDict:
    """Inverse of :func:`bert_to_ours`: split fused projections back into BERT names."""
    out: StateDict = {}
    emb = _BERT_EMB if embeddings is None else embeddings
    for name, value in sd.items():
        if not name.startswith(src):
            continue
        rest = name[len(src):]
        for s_name, d_name in emb.items():
            if rest.startswith(d_name + "."):
                out[dst + s_name + rest[len(d_name):]] = value
        m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", rest)
        if not m:
            continue
        idx, module, kind = m.groups()
        targets = [(b, slot) for b, o, slot in _BERT_LAYER if o == module]
        if not targets:
            continue
        chunks = value.chunk(len(targets), dim=0) if targets[0][1] is not None else [value]
        for (b_suffix, _), chunk in zip(targets, chunks):
            out[f"{dst}encoder.layer.{idx}.{b_suffix.format(s=self_name)}.{kind}"] = chunk.clone()
    return out


# ---------------------------------------------------------------------------------------------------------------
# HF BERT directories (bert-base-uncased) -> one text tower

BERT_LM_HEAD = {"cls.predictions.transform.dense.": "dense.", "cls.predictions.transform.LayerNorm.": "norm.",
                "cls.predictions.bias": "bias"}


def _grow_rows(value: torch.Tensor, rows: int, init: torch.Tensor) -> torch.Tensor:
    """The file's first rows, then the model's own initial rows (BLIP adds [DEC] / [ENC] after BERT's 30522)."""
    return torch.cat([value.to(init.dtype), init[value.shape[0]:]]) if value.shape[0] < rows else value


def text_state_to_ours(sd: StateDict, tower: TextTransformer) -> tuple[StateDict, set[str], list[str]]:
    """HF BERT keys (``bert.``-prefixed or not) -> ``tower``'s keys; the query FFN (Q-Former) is the text FFN's copy."""
    src = "bert." if any(k.startswith("bert.encoder.") for k in sd) else ""
    out, used = bert_to_ours(sd, src, "")
    own = tower.state_dict()
    for k in list(out):
        if k.startswith("layers.") and ".ffn." in k and k.replace(".ffn.", ".ffn_query.") in own:
            out[k.replace(".ffn.", ".ffn_query.")] = out[k].clone()
    resized = []
    word = out.get("embeddings.word.weight")
    if word is not None and "embeddings.word.weight" in own and word.shape[0] < own["embeddings.word.weight"].shape[0]:
        rows = own["embeddings.word.weight"].shape[0]
        out["embeddings.word.weight"] = _grow_rows(word, rows, own["embeddings.word.weight"])
        resized.append(f"embeddings.word {word.shape[0]} -> {rows} rows (new rows keep their init)")
    return {k: v for k, v in out.items() if k in own}, used, resized


def lm_head_state(sd: StateDict, head: LMHead) -> tuple[StateDict, set[str]]:
    out, used = {}, set()
    for k, v in sd.items():
        for s, d in BERT_LM_HEAD.items():
            if k.startswith(s):
                out[d + k[len(s):]] = v
                used.add(k)
    if "bias" in out:
        out["bias"] = _grow_rows(out["bias"], head.bias.shape[0], head.bias.detach())
    return out, used
