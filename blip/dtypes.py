"""Precision names used across configs, the CLI and checkpoints: "fp32", "bf16", "fp16" <-> torch dtypes."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """"bf16" / torch.bfloat16 / None -> torch.bfloat16 / torch.bfloat16 / None; an unknown name raises."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"unknown precision {value!r}; known: {sorted(DTYPES)}")
    return DTYPES[value]


def dtype_name(value: str | torch.dtype | None) -> str | None:
    """torch.bfloat16 / "bf16" / None -> "bf16" / "bf16" / None."""
    dtype = to_dtype(value)
    return None if dtype is None else next(name for name, d in DTYPES.items() if d == dtype)
