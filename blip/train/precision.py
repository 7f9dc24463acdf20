"""One precision policy for the whole run: autocast dtype, gradient scaling, and the dtype of frozen towers.

- fp32: everything fp32, no autocast.
- bf16: autocast to bf16; trainable weights stay fp32 (the optimizer's master copy); no scaler needed.
- fp16: autocast to fp16 with a GradScaler (unscaled before clipping).
With `frozen_dtype` set, frozen towers (modules whose parameters are all frozen, e.g. BLIP-2's ViT and LLM) are stored
in that dtype to halve their memory; their norm layers stay fp32, as the originals need, and a ViT keeps its residual
stream fp32 (only its Linear / Conv weights are cast, as LAVIS stores EVA). Momentum (EMA) copies
(`*_m` modules, BLIP's `visual_encoder_m` ...) are frozen too but updated every step, so they always stay fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from blip.dtypes import DTYPES

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class PrecisionPolicy:
    precision: str = "fp32"
    frozen_dtype: str | None = None  # None: frozen towers keep their dtype
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {list(DTYPES)}, got {self.precision!r}")
        if self.frozen_dtype is not None and self.frozen_dtype not in DTYPES:
            raise ValueError(f"frozen_dtype must be one of {list(DTYPES)} or null, got {self.frozen_dtype!r}")

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.precision == "fp16" else None

    def cast_frozen(self, model: nn.Module) -> list[str]:
        """Cast maximal fully-frozen submodules to the frozen dtype; returns their names."""
        if self.frozen_dtype is None or DTYPES[self.frozen_dtype] == torch.float32:
            return []
        dtype = DTYPES[self.frozen_dtype]
        cast: list[str] = []
        for name, module in frozen_towers(model):
            _cast_tower(module, dtype)
            cast.append(name)
        return cast


def _cast_tower(module: nn.Module, dtype: torch.dtype) -> None:
    """Parameters to ``dtype`` except norms; a module with ``cast_matmul_weights`` (the ViT) casts itself, keeping its
    residual stream fp32 as LAVIS does for EVA."""
    if hasattr(module, "cast_matmul_weights"):
        module.cast_matmul_weights(dtype)
        return
    if not isinstance(module, NORMS):
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dtype)
    for child in module.children():
        _cast_tower(child, dtype)


def frozen_towers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Maximal submodules whose parameters are all frozen (requires_grad=False), outermost first."""
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if prefix.endswith("_m"):  # EMA copy: frozen, but updated in fp32 every step
            return
        if params and not any(p.requires_grad for p in params) and prefix:
            found.append((prefix, module))
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    return found
