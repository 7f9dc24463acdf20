"""Public entry points: ``create_model``, ``list_models`` and ``load``.

``create_model`` / ``list_models`` read the ``(arch, task)`` tables of :mod:`blip.registry`; ``load`` asks each
family's checkpoint facade (:mod:`blip.convert.blip`, :mod:`blip.convert.blip2`) which file it owns.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, read_hf_config_json, read_state_dict
from .finite_weights import check_finite, check_finite_before_first_call
from .registry import create_model, family, list_models

__all__ = ["create_model", "list_models", "load"]


def family_converters() -> tuple:
    """The checkpoint facades of the families, in the order ``load`` asks them."""
    from .convert import blip as blip_convert
    from .convert import blip2 as blip2_convert
    return blip_convert, blip2_convert


def load(source: str | Path, *, arch: str | None = None, task: str | None = None, llm: str | Path | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype | None = None, allow_nonfinite: bool = False,
         compile: bool = False, **kwargs) -> nn.Module:
    """Load a checkpoint into the matching model, in eval mode.

    source: an HF model directory (``config.json["architectures"]`` picks the class), an original BLIP / LAVIS
    ``.pth`` (``arch``/``task`` where the file can't tell), a ``.safetensors`` exported by blip, or a name from
    ``blip.zoo.PRETRAINED`` (the file must already be under ``$BLIP_HOME``: blip never downloads), or a run directory
    of ``scripts/train.py`` (rebuilt from its config.yaml; ``task`` picks the head of a BLIP pretraining run).
    llm: HF directory of the language model for BLIP-2 checkpoints that carry no LLM weights.
    allow_nonfinite: load weights holding NaN / inf (by default a CheckpointError lists them: at load, or where the
        weights stay memory-mapped on a CPU, at the model's first call, which reads them anyway).
    compile: :func:`compile_model` — faster repeated calls (CUDA graphs on GPU) after a warm-up per input shape.
    """
    model = _load(source, arch, task, llm, kwargs)
    if not allow_nonfinite:
        stays_mapped = not compile and torch.device(device).type == "cpu" and dtype in (None, _dtype(model))
        # weights that stay memory-mapped are checked when first read; a copy to another device / dtype reads them
        (check_finite_before_first_call if stays_mapped else check_finite)(model, str(source))
    model = _finish(model, device, dtype)
    return compile_model(model) if compile else model


def _dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _load(source: str | Path, arch: str | None, task: str | None, llm, kwargs: dict) -> nn.Module:
    path = Path(source)
    if not path.exists() and isinstance(source, str):
        from .zoo import PRETRAINED, resolve
        if source in PRETRAINED:
            entry = PRETRAINED[source]
            path = resolve(source)
            arch, task = arch or entry.arch, task or entry.task
            if family(entry.arch) == "blip":  # BLIP releases differ in resolution (caption 384, VQA 480)
                kwargs.setdefault("image_size", entry.image_size)
            for key, value in entry.options.items():  # e.g. the prompt and generation settings it was evaluated with
                kwargs.setdefault(key, value)
    from .runs import find_run, load_run
    # a run directory of scripts/train.py, one of its checkpoints, or outputs/<name>/ (its newest run with a checkpoint)
    if path.is_dir() and ((path / "config.yaml").is_file() or (path / "state.pt").is_file() or find_run(path)):
        return load_run(path, task)
    if path.is_dir():
        archs = read_hf_config_json(path).get("architectures") or []
        for convert in family_converters():
            for name in archs:
                if name in convert.HF_LOADERS:
                    return convert.HF_LOADERS[name](path, llm=llm, **kwargs)
        raise CheckpointError(f"{path}: architectures {archs} are not supported; supported: "
                              f"{sorted(n for c in family_converters() for n in c.HF_LOADERS)}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (blip never downloads: pass a local path)")
    state = read_state_dict(path)
    for convert in family_converters():
        if convert.owns(state):
            return convert.load_original(state, str(path), arch=arch, task=task, llm=llm, **kwargs)
    raise CheckpointError(f"{path}: not a BLIP / BLIP-2 checkpoint in any known layout (original BLIP, LAVIS, blip "
                          f"export); first keys: {list(state)[:5]}")


def _finish(model: nn.Module, device, dtype) -> nn.Module:
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` where it pays, in place (parameter names unchanged): every ViT block, and ``generate``,
    whose decode loop then runs as compiled chunks (CUDA graphs on GPU; the same ids). The first call for each
    input shape pays the compilation (see docs/benchmarks.md); later calls with that shape reuse it."""
    from .nn.vit import VisionTransformer
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            for block in module.blocks:
                block.compile()
    model.compile_decoding = True
    return model