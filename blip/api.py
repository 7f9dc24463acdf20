"""Public entry points: ``create_model``, ``list_models`` and ``load``.

Families plug in through two modules each (no registry side effects at import time):
- ``blip.models.<family>`` exposes ``ARCHS`` (arch name -> config) and ``create(arch, task, **overrides)``;
- ``blip.convert.<family>`` exposes ``HF_LOADERS`` (HF class name in config.json -> ``fn(directory, **kw) -> model``),
  ``owns(state_dict) -> bool`` (sentinel keys of its original/LAVIS formats) and
  ``load_original(state_dict, source, arch=None, task=None, **kw) -> model``.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, read_hf_config_json, read_state_dict

log = logging.getLogger(__name__)
FAMILIES = ("blip", "blip2")


def _family_module(kind: str, family: str):
    return importlib.import_module(f"blip.{kind}.{family}")


def _family_of(arch: str) -> str:
    for family in FAMILIES:
        if arch in _family_module("models", family).ARCHS:
            return family
    raise KeyError(f"unknown arch {arch!r}; known: {sorted(a for a, _ in list_models())}")


def list_models() -> list[tuple[str, str]]:
    """All (arch, task) pairs ``create_model`` can build."""
    pairs = []
    for family in FAMILIES:
        module = _family_module("models", family)
        tasks_for = getattr(module, "tasks_for", lambda arch: module.TASKS)
        pairs += [(arch, task) for arch in module.ARCHS for task in tasks_for(arch)]
    return pairs


def create_model(arch: str, task: str, **overrides) -> nn.Module:
    """Build a randomly initialised model, e.g. ``create_model("blip_base", "caption")``."""
    return _family_module("models", _family_of(arch)).create(arch, task, **overrides)


def load(source: str | Path, *, arch: str | None = None, task: str | None = None, llm: str | Path | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype | None = None, allow_nonfinite: bool = False,
         **kwargs) -> nn.Module:
    """Load a checkpoint into the matching model, in eval mode.

    source: an HF model directory (``config.json["architectures"]`` picks the class), an original BLIP / LAVIS
    ``.pth`` (``arch``/``task`` where the file can't tell), a ``.safetensors`` exported by blip, or a name from
    ``blip.zoo.PRETRAINED`` (the file must already be under ``$BLIP_HOME``: blip never downloads), or a run directory
    of ``scripts/train.py`` (rebuilt from its config.yaml; ``task`` picks the head of a BLIP pretraining run).
    llm: HF directory of the language model for BLIP-2 checkpoints that carry no LLM weights.
    allow_nonfinite: load weights holding NaN / inf (by default a CheckpointError lists them).
    """
    model = _load(source, arch, task, llm, kwargs)
    if not allow_nonfinite:
        check_finite(model, str(source))
    return _finish(model, device, dtype)


def _load(source: str | Path, arch: str | None, task: str | None, llm, kwargs: dict) -> nn.Module:
    path = Path(source)
    if not path.exists() and isinstance(source, str):
        from .zoo import PRETRAINED, resolve
        if source in PRETRAINED:
            entry = PRETRAINED[source]
            path = resolve(source)
            arch, task = arch or entry.arch, task or entry.task
            if entry.arch.startswith("blip_"):  # BLIP releases differ in resolution (caption 384, VQA 480)
                kwargs.setdefault("image_size", entry.image_size)
            for key, value in entry.options.items():  # e.g. the prompt and generation settings it was evaluated with
                kwargs.setdefault(key, value)
    if path.is_dir() and ((path / "config.yaml").is_file() or (path / "state.pt").is_file()):
        from .runs import load_run   # a run directory of scripts/train.py (or one of its checkpoints)
        return load_run(path, task)
    if path.is_dir():
        archs = read_hf_config_json(path).get("architectures") or []
        for family in FAMILIES:
            loaders = _family_module("convert", family).HF_LOADERS
            for name in archs:
                if name in loaders:
                    return loaders[name](path, llm=llm, **kwargs)
        raise CheckpointError(f"{path}: architectures {archs} are not supported; supported: "
                              f"{sorted(n for f in FAMILIES for n in _family_module('convert', f).HF_LOADERS)}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (blip never downloads: pass a local path)")
    state = read_state_dict(path)
    for family in FAMILIES:
        convert = _family_module("convert", family)
        if convert.owns(state):
            return convert.load_original(state, str(path), arch=arch, task=task, llm=llm, **kwargs)
    raise CheckpointError(f"{path}: not a BLIP / BLIP-2 checkpoint in any known layout (original BLIP, LAVIS, blip "
                          f"export); first keys: {list(state)[:5]}")


def check_finite(model: nn.Module, source: str) -> None:
    """CheckpointError listing the parameters that hold NaN / inf (a diverged or corrupted checkpoint)."""
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight tensors hold NaN or inf values ({bad[:5]}"
                              f"{' ...' if len(bad) > 5 else ''}): the checkpoint is corrupt or its training "
                              "diverged; use an earlier checkpoint, or pass allow_nonfinite=True to load it anyway")


def _finish(model: nn.Module, device, dtype) -> nn.Module:
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
