"""The structure hooks the trainer reads, declared the timm way by where a module's stacks live.

Models and training objectives alike inherit :class:`DeclaredLayers` and name their stacks; layer-wise LR decay
(:mod:`blip.train.optim`) reads ``group_matcher()``, activation checkpointing (:mod:`blip.train.run`)
``set_grad_checkpointing()``.
"""
from __future__ import annotations

from ..nn.vit import VisionTransformer


class DeclaredLayers:
    """Mixin for an ``nn.Module``: ``group_matcher`` and ``set_grad_checkpointing`` from two class attributes.

    vit_path: dotted path of the ViT whose stem and blocks are the layer-decay groups.
    checkpointed: dotted paths of the stacks whose layers are recomputed in the backward pass; None: every submodule
    that has ``set_grad_checkpointing`` (every tower, momentum copies included).
    """

    vit_path: str = "visual_encoder"
    checkpointed: tuple[str, ...] | None = None

    def group_matcher(self) -> dict[str, str]:
        """Layer groups for layer-wise LR decay (timm convention): the ViT's stem and blocks."""
        return VisionTransformer.group_matcher(f"{self.vit_path}.")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the layers of the ``checkpointed`` stacks in the backward pass (training memory for compute)."""
        if self.checkpointed is None:
            stacks = [m for m in self.modules() if m is not self and hasattr(m, "set_grad_checkpointing")]
        else:
            stacks = [self.get_submodule(path) for path in self.checkpointed]
        for stack in stacks:
            stack.set_grad_checkpointing(enable)
