"""The structure hooks the trainer reads, declared the timm way by where a module's stacks live, and what every
inference model tells about itself.

Models and training objectives alike inherit :class:`DeclaredLayers` and name their stacks; layer-wise LR decay
(:mod:`blip.train.optim`) reads ``group_matcher()``, activation checkpointing (:mod:`blip.train.run`)
``set_grad_checkpointing()``. The inference models of every family inherit :class:`InferenceModel`: ``device``,
``dtype``, ``image_size`` and ``preprocess`` (the eval image transform), what the tensor API needs to be fed.
"""
from __future__ import annotations

import torch
from torchvision import transforms as T

from ..nn.vit import VisionTransformer
from .family import Family


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


class InferenceModel(DeclaredLayers):
    """Mixin of every family's inference model (BLIP task models, the BLIP-2 Q-Former, BLIP-2 / InstructBLIP LLM
    models): what to feed its tensor API.

    dtype_part: dotted path of the part whose parameters ``dtype`` reports ("": the whole model). BLIP-2 models say
    "qformer": the part that trains, in fp32 even where the frozen ViT and LLM are stored in bf16 / fp16
    (``cast_frozen``); the ViT casts the pixels it is given itself.
    """

    dtype_part: str = ""

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (blip keeps a model on one device)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the parameters of ``dtype_part`` (BLIP: the model's; BLIP-2: the Q-Former's)."""
        part = self.get_submodule(self.dtype_part)
        return next(p.dtype for p in part.parameters() if p.is_floating_point())

    @property
    def image_size(self) -> int:
        """The input resolution S of the ViT (``vit_path``): the tensor API takes pixels [B, 3, S, S]."""
        return self.get_submodule(self.vit_path).cfg.image_size

    @property
    def preprocess(self) -> T.Compose:
        """The eval image transform the string API applies, at this model's resolution: a path or PIL image ->
        float32 [3, S, S] (decoded upright RGB, bicubic resize to S x S, CLIP mean / std normalisation). Stack
        images into [B, 3, S, S] and move them to ``model.device`` / ``model.dtype`` for the tensor API."""
        from ..data.images import load_image
        from ..data.transforms import image_transform
        kind = "blip" if self.family == Family.BLIP else "blip2"
        return T.Compose([load_image, *image_transform(self.image_size, train=False, kind=kind).transforms])
