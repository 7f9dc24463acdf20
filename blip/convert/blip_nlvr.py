"""BLIP NLVR2 checkpoints, as pure state-dict functions used by the BLIP loader (:mod:`blip.convert.blip`).

One layout serves both sources: salesforce/BLIP's ``model_base_nlvr.pth`` and LAVIS's ``blip_nlvr`` (which loads
that same file) hold ``visual_encoder.*``, ``cls_head.{0,2}.*`` and a ``text_encoder.*`` whose cross-attention is
twinned: ``crossattention.self0`` / ``output.dense0`` read image 0, ``self1`` / ``dense1`` image 1, and
``output.merge_layer`` exists in layers >= 6. The names map onto ours through the one BERT mapping in
:mod:`blip.checkpoints` (``cross_attn.image0.{q,kv,out}``, ``cross_attn.image1.*``, ``cross_attn.merge``).

What each source is expected to lack or carry without use:
- an NLVR2 checkpoint: nothing is missing; only ``*.position_ids`` is unused;
- a checkpoint with one cross-attention per layer (pretraining, retrieval...) loaded with ``task="nlvr"``: both
  branches start from that cross-attention, as BLIP's and LAVIS's ``blip_nlvr`` loaders do to begin fine-tuning;
  the merge layers and ``cls_head`` are missing (fresh initialisation); the decoder, ITC projections, ITM head,
  momentum copies, queues and ``temp`` are unused.
"""
from __future__ import annotations

import re

from ..checkpoints import StateDict

NLVR_UNUSED = [r"text_decoder\..*", r"(vision_proj|text_proj|itm_head)\..*"]
FROM_SINGLE_MISSING = [r"text_encoder\.layers\.\d+\.cross_attn\.merge\.(weight|bias)", r"cls_head\..*"]
_SINGLE_CROSS = re.compile(r"(text_encoder\.layers\.\d+\.cross_attn\.)(q|kv|out)\.(weight|bias)$")


def is_nlvr(sd: StateDict) -> bool:
    """An NLVR2 model's keys (ours or BLIP / LAVIS names): the classifier or a twin cross-attention branch."""
    return any(k.startswith("cls_head.") or ".cross_attn.image0." in k or ".crossattention.self0." in k for k in sd)


def twin_from_single(sd: StateDict) -> StateDict:
    """Ours-layout state dict with one cross-attention per text-encoder layer -> both twin branches (image0,
    image1) start from its q / kv / out projections; the shared LayerNorm keeps its name. Other keys pass."""
    out: StateDict = {}
    for key, value in sd.items():
        m = _SINGLE_CROSS.match(key)
        if m is None:
            out[key] = value
            continue
        for branch in ("image0", "image1"):
            out[f"{m[1]}{branch}.{m[2]}.{m[3]}"] = value
    return out
