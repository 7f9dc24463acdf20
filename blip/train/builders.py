"""Model construction for training: `blip.create_model` plus the objective's own settings.

`create_model(arch, task, **overrides)` configures the architecture; training objectives also take settings that
are not architecture (BLIP's ITC queue length, text length, distillation alpha...). Configs pass those as
`objective`, which this builder hands to the objective's constructor.
"""

from __future__ import annotations

from torch import nn

import blip


def create_training_model(arch: str, task: str, *, objective: dict | None = None, **overrides) -> nn.Module:
    """`blip.create_model(arch, task, **overrides)`; with `objective` (BLIP pretraining only) the objective's
    keyword arguments, e.g. {"queue_size": 4096, "max_txt_len": 16}."""
    if not objective:
        return blip.create_model(arch, task, **overrides)
    if task != "pretrain" or not arch.startswith("blip_"):
        raise ValueError(f"objective settings are supported for BLIP pretraining, not {arch}/{task}")
    from blip.models.blip import ARCHS
    from blip.models.blip_pretrain import BlipPretrain

    if arch not in ARCHS:
        raise KeyError(f"unknown BLIP arch {arch!r}; known: {sorted(ARCHS)}")
    return BlipPretrain(ARCHS[arch].with_overrides(**overrides), **objective)
