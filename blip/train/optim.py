"""Optimizer construction: parameter groups for weight decay and layer-wise LR decay.

- Frozen parameters (requires_grad=False) never enter the optimizer.
- Weight decay (``exempt``, the config's ``trainer.optimizer.weight_decay_exempt``): ``ours`` exempts norms, biases
  (every parameter with ndim <= 1), embeddings (nn.Embedding weights, position / cls / query tokens) and whatever the
  model lists in `no_weight_decay()` (``temp``); ``lavis`` exempts only parameters of fewer than 2 dims (LAVIS
  ``get_optimizer_params``: its bias / ln / bn names are all 1-dim), so embeddings and query tokens decay; ``none``
  decays every parameter (BLIP: ``AdamW(model.parameters(), weight_decay=...)``), ``temp`` included.
- Layer-wise LR decay (BEiT/BLIP-2 fine-tuning): ViT layer i gets `lr_scale = decay ** (L + 1 - i)` where the
  model declares its layers timm-style, `model.group_matcher() -> {"stem": regex, "blocks": regex capturing the
  block index}`: the stem (patch / cls / pos embedding) is layer 0, block j is layer j + 1, everything else is layer
  L + 1 (scale 1). Each group carries its `lr_scale`, which the schedule multiplies in at every step — the scale LAVIS
  computes but never applies.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

EMBEDDING_NAMES = re.compile(r"(^|\.)(pos_embed|cls_token|query_tokens|position_embeddings?|token_type_embeddings"
                             r"|word_embeddings|embed_tokens|embed_positions)(\.|$)")


def layer_ids(model: nn.Module) -> tuple[int, Callable[[str], int]]:
    """(L, name -> layer id) from ``model.group_matcher()``: 0 for the stem, i + 1 for block i, L + 1 otherwise."""
    if not hasattr(model, "group_matcher"):
        raise ValueError(f"layer_decay needs a model that declares its layers: {type(model).__name__} has no "
                         "group_matcher() (timm convention: {'stem': regex, 'blocks': regex with the block index})")
    matcher = model.group_matcher()
    stem, blocks = re.compile(matcher["stem"]), re.compile(matcher["blocks"])
    ids = {int(m.group(1)) for n, _ in model.named_parameters() if (m := blocks.match(n))}
    depth = max(ids) + 1 if ids else 0

    def layer_id(name: str) -> int:
        if m := blocks.match(name):
            return int(m.group(1)) + 1
        return 0 if stem.match(name) else depth + 1

    return depth, layer_id


def no_decay_names(model: nn.Module) -> set[str]:
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            names |= {f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)}
    return names


EXEMPT = ("ours", "lavis", "none")


def decays(name: str, p: torch.Tensor, exempt: str, skip: set[str]) -> bool:
    """Whether parameter ``name`` gets weight decay under the ``exempt`` rule (module docstring)."""
    if exempt == "none":
        return True
    if exempt == "lavis":
        return p.ndim >= 2
    return not (p.ndim <= 1 or name in skip or EMBEDDING_NAMES.search(name))


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float | None = None,
                 exempt: str = "ours") -> list[dict]:
    """Groups keyed by (decay?, layer); each has `lr_scale` and `layer_id` besides the usual keys."""
    if exempt not in EXEMPT:
        raise ValueError(f"weight_decay_exempt must be one of {' | '.join(EXEMPT)}, got {exempt!r}")
    depth, layer_id = layer_ids(model) if layer_decay is not None and layer_decay != 1.0 else (0, None)
    skip = no_decay_names(model)
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = decays(name, p, exempt, skip)
        lid = layer_id(name) if depth else 0
        scale = layer_decay ** (depth + 1 - lid) if depth else 1.0
        group = groups.setdefault((decay, lid), {"params": [], "lr_scale": scale,
                                                 "layer_id": lid, "weight_decay": weight_decay if decay else 0.0,
                                                 "lr": lr * scale})
        group["params"].append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1], k[0]))]


def build_optimizer(model: nn.Module, *, name: str = "adamw", lr: float, weight_decay: float = 0.05,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    layer_decay: float | None = None, fused: bool | None = None,
                    weight_decay_exempt: str = "ours") -> torch.optim.Optimizer:
    """fused: one kernel for the whole AdamW update; default: on where torch has it (plain CUDA tensors).
    weight_decay_exempt: which parameters get no decay, ``ours | lavis | none`` (module docstring)."""
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay,
                          exempt=weight_decay_exempt)
    if name == "adamw":
        if fused is None:
            fused = all(p.is_cuda and type(p.data) is torch.Tensor for g in groups for p in g["params"]) or None
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=betas[0], weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (adamw | sgd)")
