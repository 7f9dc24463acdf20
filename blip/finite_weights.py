"""The NaN / inf check of loaded weights: a diverged or corrupted checkpoint is refused before it produces output.

Checking reads every weight. For a checkpoint memory-mapped from a safetensors file that read is most of a load's
time (``from_pretrained`` never reads the file: the first forward does), so :func:`check_finite_before_first_call`
defers the check to the model's first forward, which reads the weights anyway: loading stays as fast as mapping the
file, and no output is computed from non-finite weights.
"""
from __future__ import annotations

import copy
import weakref

import torch
from torch import Tensor, nn

from .checkpoints import CheckpointError


def check_finite(model: nn.Module, source: str) -> None:
    """CheckpointError listing the parameters that hold NaN / inf (a diverged or corrupted checkpoint)."""
    _raise_if_nonfinite(list(model.named_parameters()), source)


def _raise_if_nonfinite(named: list[tuple[str, Tensor]], source: str) -> None:
    bad = [name for name, p in named if p.is_floating_point() and not _finite(p)]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight tensors hold NaN or inf values ({bad[:5]}"
                              f"{' ...' if len(bad) > 5 else ''}): the checkpoint is corrupt or its training "
                              "diverged; use an earlier checkpoint, or pass allow_nonfinite=True to load it anyway")


def _finite(t: Tensor) -> bool:
    """No NaN / inf in ``t``: min and max propagate both; one pass over ``t`` and no temporary the size of ``t``
    (a loaded model stays within one copy of its weights)."""
    return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


class _PendingCheck:
    """What the first call checks, held by every hooked module: weak references only, so a model loaded and never
    called is freed as usual."""

    def __init__(self, source: str, named_parameters: list[tuple[str, Tensor]], holders: list[nn.Module]):
        self.source = source
        self.parameters = [(name, weakref.ref(p)) for name, p in named_parameters]
        self.holders = [weakref.ref(m) for m in holders]

    def __deepcopy__(self, memo: dict) -> "_PendingCheck":
        """A deepcopy of the model made before its first call checks the copy's own parameters at its first call."""
        return _PendingCheck(self.source,
                             [(name, copy.deepcopy(ref(), memo)) for name, ref in self.parameters if ref() is not None],
                             [copy.deepcopy(ref(), memo) for ref in self.holders if ref() is not None])


_PENDING_ATTRIBUTE = "_pending_finite_check"


def check_finite_before_first_call(model: nn.Module, source: str) -> None:
    """Run :func:`check_finite` when any module of ``model`` that holds weights is first called (every use of a
    model calls one), then remove the hooks. Until the weights pass, every call raises the CheckpointError."""
    holders = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    pending = _PendingCheck(source, list(model.named_parameters()), holders)
    for module in holders:
        setattr(module, _PENDING_ATTRIBUTE, pending)
        module.register_forward_pre_hook(_check_before_first_call)


def _check_before_first_call(module: nn.Module, args) -> None:
    pending = getattr(module, _PENDING_ATTRIBUTE)
    named = [(name, ref()) for name, ref in pending.parameters]
    _raise_if_nonfinite([(name, p) for name, p in named if p is not None], pending.source)
    for ref in pending.holders:
        holder = ref()
        if holder is not None and hasattr(holder, _PENDING_ATTRIBUTE):
            delattr(holder, _PENDING_ATTRIBUTE)
            for key, hook in list(holder._forward_pre_hooks.items()):
                if hook is _check_before_first_call:
                    del holder._forward_pre_hooks[key]
