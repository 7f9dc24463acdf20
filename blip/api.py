"""Public entry points: ``create_model``, ``list_models``, ``list_pretrained`` and ``load``.

``create_model`` / ``list_models`` read the ``(arch, task)`` tables of :mod:`blip.registry`, ``list_pretrained`` the
named checkpoints of :mod:`blip.zoo`; ``load`` reads the source through the table of checkpoint formats
(:mod:`blip.convert.formats`) and builds the model its row names.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError
from .convert.formats import read_checkpoint
from .dtypes import to_dtype
from .finite_weights import check_finite, check_finite_before_first_call
from .registry import create_model, family, list_models
from .runs import load_source

__all__ = ["check_device", "create_model", "list_models", "list_pretrained", "load", "load_for_evaluation",
           "load_task_model"]


def list_pretrained() -> list[str]:
    """The names of the released checkpoints ``blip.load`` knows (:data:`blip.zoo.PRETRAINED`; ``blip models``
    lists them with their arch, task and source). Their files must already be local: blip never downloads."""
    from .zoo import PRETRAINED
    return list(PRETRAINED)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, checked before anything is loaded: a ValueError saying what to pass instead
    for a string that names no device, or a device this machine does not have (no CUDA GPU, a GPU index beyond
    those visible, no MPS)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={str(device)!r} is not a device: use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else torch.backends.mps
    if not getattr(backend, "is_available", lambda: False)():
        gpu = "CUDA GPU" if dev.type == "cuda" else f"{dev.type} device"
        raise ValueError(f"device={str(device)!r}: no {gpu} is visible here; use device='cpu'")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device={str(device)!r}: only {count} {dev.type} device(s) visible (indices 0 to "
                         f"{count - 1})")
    return dev


def load(source: str | Path, *, arch: str | None = None, task: str | None = None, llm: str | Path | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype | None = None, allow_nonfinite: bool = False,
         compile: bool = False, merge: bool = False, **kwargs) -> nn.Module:
    """Load a checkpoint into the matching model, in eval mode.

    source: an HF model directory (``config.json["architectures"]`` picks the class), an original BLIP / LAVIS
    ``.pth`` (``arch``/``task`` where the file can't tell), a ``.safetensors`` exported by blip, or a name from
    ``blip.zoo.PRETRAINED`` (the file must already be under ``$BLIP_HOME``: blip never downloads), or a run directory
    of ``scripts/train.py`` (rebuilt from its config.yaml; ``task`` picks the head of a BLIP pretraining run), or a
    LoRA adapter directory (:func:`blip.models.lora.save_adapters`: its base, read by the same rules with this call's
    options, plus the adapters).
    llm: HF directory of the language model for BLIP-2 checkpoints that carry no LLM weights.
    merge: fold LoRA adapters into the weights (plain modules, the base model's ``state_dict`` names); without it a
        model with adapters keeps them.
    allow_nonfinite: load weights holding NaN / inf (by default a CheckpointError lists them: at load, or where the
        weights stay memory-mapped on a CPU, at the model's first call, which reads them anyway).
    compile: :func:`compile_model` — faster repeated calls (CUDA graphs on GPU) after a warm-up per input shape.
    device: checked before loading (:func:`check_device`).

    The model tells what its tensor API takes: ``model.preprocess`` (path / PIL image -> [3, S, S], the eval
    transform at ``model.image_size``), ``model.device`` and ``model.dtype``.
    """
    check_device(device)
    model = _load(source, arch, task, llm, kwargs)
    if merge:
        from .models.lora import has_lora, merge_lora
        if not has_lora(model):
            raise CheckpointError(f"{source}: the model has no LoRA adapters to merge; drop merge")
        merge_lora(model)
    if not allow_nonfinite:
        stays_mapped = not compile and torch.device(device).type == "cpu" and dtype in (None, _dtype(model))
        # weights that stay memory-mapped are checked when first read; a copy to another device / dtype reads them
        (check_finite_before_first_call if stays_mapped else check_finite)(model, str(source))
    model = _finish(model, device, dtype)
    return compile_model(model) if compile else model


def load_for_evaluation(source: str | Path, model_cfg: dict, device: torch.device,
                        precision: str = "fp32") -> nn.Module:
    """``load`` for the benchmark evaluation (``scripts/evaluate.py``): ``model_cfg`` holds its keyword arguments
    (None meaning the checkpoint's own). bf16 / fp16: BLIP-2's frozen ViT and LLM are stored in that dtype (as LAVIS
    runs them); everything else stays fp32 under autocast."""
    model = load(source, device=device, **{k: v for k, v in model_cfg.items() if v is not None})
    dtype = to_dtype(precision)
    if dtype != torch.float32 and hasattr(model, "cast_frozen"):
        model.cast_frozen(dtype)
    return model


def load_task_model(source: str | Path | None, arch: str, task: str, image_size: int | None = None) -> nn.Module:
    """CapFilt's captioner / filter: ``source`` None (a random ``arch``: smoke tests), a training run of this project
    (rebuilt from the run's ``config.yaml``, loaded strictly), or anything else :func:`load` reads."""
    if source is None:
        return create_model(arch, task, **({"image_size": image_size} if image_size else {}))
    return load(source, arch=arch, task=task)


def _dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _load(source: str | Path, arch: str | None, task: str | None, llm, kwargs: dict) -> nn.Module:
    if isinstance(source, str) and not Path(source).exists():
        from .zoo import PRETRAINED
        if source in PRETRAINED:   # the settings a released file was evaluated with (blip.load's defaults)
            entry = PRETRAINED[source]
            arch, task = arch or entry.arch, task or entry.task
            if family(entry.arch) == "blip":  # BLIP releases differ in resolution (caption 384, VQA 480)
                kwargs.setdefault("image_size", entry.image_size)
            for key, value in entry.options.items():  # e.g. the prompt and generation settings it was evaluated with
                kwargs.setdefault(key, value)
    checkpoint = read_checkpoint(source)
    if checkpoint.format.name == "adapters":   # the base through this same function (any row, run or zoo name)
        from .models.lora import attach_adapters, base_source, read_adapters
        settings, base, tensors = read_adapters(checkpoint.path)
        model = _load(base_source(checkpoint.path, base), arch, task, llm, kwargs)
        return attach_adapters(model, settings, tensors, checkpoint.name)
    return load_source(checkpoint, arch=arch, task=task, llm=llm, **kwargs)


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