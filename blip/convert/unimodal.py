"""Unimodal initialisation: BLIP / BLIP-2 towers from the single-modality weights the papers start from.

- ``vision``: a timm-layout ViT state dict (DeiT-B, ViT-L/16 in21k; torch or safetensors) for BLIP's ViT; EVA
  ``eva_vit_g.pth``, an OpenAI CLIP ViT-L file or an HF CLIP directory for BLIP-2's frozen image encoder. The
  position embedding is resized bicubically to the model's grid (class token kept); classifier heads, the blocks
  beyond the model's depth (LAVIS keeps 39 of EVA's 40, 23 of CLIP-L's 24) and CLIP's text tower are unused.
- ``text``: an HF BERT directory (bert-base-uncased) for BLIP's text encoder and decoder (cross-attention new; the
  30522-row word embedding and LM bias grow to the model's 30524 / 30523, the new rows keep their initialisation as
  BLIP's ``resize_token_embeddings`` does) or BLIP-2's Q-Former (query FFN copied from the text FFN, as LAVIS).

Towers are found by type (every :class:`VisionTransformer`, :class:`TextTransformer` and :class:`LMHead` outside a
momentum copy), so task models, training objectives and pretraining models all work; momentum copies (``*_m``)
are then set equal to their online tower (BLIP's ``copy_params``). Each init returns a :class:`LoadReport`
(loaded, resized, new by design, unused) and refuses a file that leaves any other key of a tower unset.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoints import CheckpointError, LoadReport, StateDict
from ..nn.transformer import LMHead, TextTransformer
from ..nn.vit import VisionTransformer
from .bert import lm_head_state
from .formats import Checkpoint, read_checkpoint

log = logging.getLogger("blip.init")

NEW_TEXT_PARTS = [r"layers\.\d+\.cross_attn\..*"]   # image cross-attention: BERT has none


def _towers(model: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    """Modules of type ``kind`` outside momentum copies, each object once (shared modules are loaded once)."""
    seen, out = set(), []
    for name, module in model.named_modules():
        if isinstance(module, kind) and id(module) not in seen and not any(p.endswith("_m") for p in name.split(".")):
            seen.add(id(module))
            out.append((name, module))
    return out


def sync_momentum(model: nn.Module, loaded: set[str] | None = None) -> None:
    """``x_m`` <- ``x`` for every momentum copy whose online twin exists (BLIP ``copy_params``); with ``loaded``
    (keys just loaded from a checkpoint), copies that got their own weights are left alone."""
    modules = dict(model.named_modules())
    for name, shadow in modules.items():
        online = modules.get(name[:-2]) if name.endswith("_m") else None
        if online is not None and not (loaded and any(k.startswith(name + ".") for k in loaded)):
            shadow.load_state_dict(online.state_dict())


def _load_tower(tower: nn.Module, prefix: str, sd: StateDict, report: LoadReport, new: list[str]) -> None:
    """Copy ``sd`` (the tower's own key names) into ``tower``; every tower key must be in ``sd`` or match ``new``."""
    own = tower.state_dict()
    missing = [k for k in own if k not in sd and not any(re.fullmatch(p, k) for p in new)]
    if missing:
        raise CheckpointError(f"{report.source} does not cover {prefix or type(tower).__name__}: missing "
                              f"{missing[:6]}{' ...' if len(missing) > 6 else ''} (another size or layout?)")
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{report.source} does not fit {prefix}: {bad[:4]}")
    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
    dot = prefix + "." if prefix else ""
    report.loaded += [dot + k for k in sd if k in own]
    report.expected_missing += [dot + k for k in own if k not in sd]


# ---------------------------------------------------------------------------------------------------------------
# vision

def _read_tower_file(source, what: str, tower: str) -> Checkpoint:
    """``source`` read through the formats table; it must be a one-tower format holding a ``tower`` tower."""
    ckpt = read_checkpoint(source, what)
    if ckpt.format.tower != tower:
        hint = "; to start from a whole model use init_from" if ckpt.format.tower is None else ""
        raise CheckpointError(f"{what}={ckpt.name} is a {ckpt.format.description}, not a {tower} tower file{hint}")
    return ckpt


def _init_towers(model: nn.Module, ckpt: Checkpoint, kind: type, new: list[str]) -> tuple[LoadReport, set[str]]:
    """Load every (non-momentum) ``kind`` tower of ``model`` with the format's tower map -> (report, consumed keys)."""
    towers = _towers(model, kind)
    if not towers:
        raise ValueError(f"{ckpt.name}: {type(model).__name__} has no {kind.__name__}")
    report, used = LoadReport(ckpt.name), set()
    for prefix, tower in towers:
        converted, consumed, resized = ckpt.format.tower_map(ckpt.raw, tower)
        if not converted:
            raise CheckpointError(f"{ckpt.name}: no {ckpt.format.description} weights; first keys {list(ckpt.raw)[:6]}")
        _load_tower(tower, prefix, converted, report, new=new)
        report.resized += [f"{prefix}.{r}" for r in resized]
        used |= consumed
    return report, used


def vision_state_to_ours(sd: StateDict, vit: VisionTransformer) -> tuple[StateDict, set[str], list[str]]:
    """A ViT state dict (timm / EVA / OpenAI CLIP / HF CLIP layout) -> (``vit``'s keys, consumed keys, resized)."""
    ckpt = _read_tower_file(sd, "vision_init", "vision")
    return ckpt.format.tower_map(ckpt.raw, vit)


def init_vision(model: nn.Module, source: str | Path) -> LoadReport:
    """Load every (non-momentum) ViT of ``model`` from a pretrained vision file / HF CLIP directory."""
    ckpt = _read_tower_file(source, "vision_init", "vision")
    report, used = _init_towers(model, ckpt, VisionTransformer, [])
    report.unused += [k for k in ckpt.raw if k not in used]
    sync_momentum(model)
    return report


# ---------------------------------------------------------------------------------------------------------------
# text

def init_text(model: nn.Module, source: str | Path) -> LoadReport:
    """Load every (non-momentum) MED / Q-Former text stack and LM head of ``model`` from an HF BERT directory."""
    ckpt = _read_tower_file(source, "text_init", "text")
    report, used = _init_towers(model, ckpt, TextTransformer, NEW_TEXT_PARTS)
    for prefix, head in _towers(model, LMHead):
        converted, consumed = lm_head_state(ckpt.raw, head)
        _load_tower(head, prefix, converted, report, new=[] if converted else [".*"])  # no MLM head: new
        used |= consumed
    report.unused += [k for k in ckpt.raw if k not in used]   # token types, pooler, NSP head: MED has none of them
    sync_momentum(model)
    return report


# ---------------------------------------------------------------------------------------------------------------
# both

def init_unimodal(model: nn.Module, vision: str | Path | None = None, text: str | Path | None = None,
                  echo: Callable[[str], None] = log.info) -> list[LoadReport]:
    """Vision and / or text init of ``model``; each report is shown through ``echo`` and kept in
    ``model.init_reports``."""
    reports = []
    if vision is not None:
        reports.append(init_vision(model, vision))
    if text is not None:
        reports.append(init_text(model, text))
    for r in reports:
        echo(r.describe())
    model.__dict__.setdefault("init_reports", []).extend(reports)
    return reports
