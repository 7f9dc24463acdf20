"""Image preprocessing of BLIP / BLIP-2 (LAVIS `blip_image_eval`, `blip_image_train`, `blip2_image_train`).

All outputs are float32 [3, S, S], normalised with the OpenAI CLIP mean/std. Eval is a square *squash* (no crop):
PIL bicubic resize to (S, S), ToTensor, Normalize -- bit-identical to LAVIS `BlipImageEvalProcessor`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP's RandomAugment op list (a subset of RandAugment without Color/Contrast/Posterize/Solarize/Cutout).
BLIP_RANDAUG_OPS = (
    "Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)  # fmt: skip
_MAX_LEVEL = 10
_FILL = [128.0, 128.0, 128.0]  # grey, as BLIP fills the uncovered area of geometric ops
_SIGNED_OPS = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


def op_magnitude(name: str, level: float) -> float:
    """BLIP's level -> argument mapping (level in [0, 10]); signed ops get a random sign at call time.

    Brightness/Sharpness factor = level/10*1.8 + 0.1 (so BLIP's M=5 gives 1.0: both are no-ops in BLIP, kept so),
    shear factor = level/10*0.3, translate = level/10*10 pixels, rotate = level/10*30 degrees.
    """
    if name in ("Identity", "AutoContrast", "Equalize"):
        return 0.0
    if name in ("Brightness", "Sharpness"):
        return level / _MAX_LEVEL * 1.8 + 0.1
    if name in ("ShearX", "ShearY"):
        return level / _MAX_LEVEL * 0.3
    if name in ("TranslateX", "TranslateY"):
        return level / _MAX_LEVEL * 10.0
    if name == "Rotate":
        return level / _MAX_LEVEL * 30.0
    raise ValueError(f"unknown RandAugment op {name!r}; known: {BLIP_RANDAUG_OPS}")


def _autocontrast(img: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's [min, max] to [0, 255] with BLIP's (and PIL's) float64 truncating lookup table.

    torchvision's autocontrast divides by float32 (max-min)/255 and lands one level lower on exact values."""
    out = img.clone()
    levels = torch.arange(256, dtype=torch.float64)
    for c in range(img.shape[0]):
        lo, hi = img[c].min().item(), img[c].max().item()
        if hi > lo:
            scale = 255.0 / (hi - lo)
            out[c] = (levels * scale - lo * scale).clamp(0, 255).to(torch.uint8)[img[c].long()]
    return out


def apply_op(img: torch.Tensor, name: str, value: float) -> torch.Tensor:
    """Apply one op to a uint8 image [3, H, W] with an explicit (already signed) argument `value`.

    Conventions follow BLIP's cv2 ops: shear x' = x + value*y about the top-left corner, translate moves the content
    by -value pixels, rotate is counter-clockwise by `value` degrees about the centre; bilinear, grey (128) fill.
    """
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return _autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    if name == "Brightness":
        return F.adjust_brightness(img, value)
    if name == "Sharpness":
        return F.adjust_sharpness(img, value)
    bilinear = InterpolationMode.BILINEAR
    if name in ("ShearX", "ShearY"):
        # torchvision's shear is an angle with x' = x - tan(angle)*y, hence the minus sign; centre [0.5, 0.5] is
        # pixel (0, 0)'s centre, the origin of cv2's matrix.
        angle = -math.degrees(math.atan(value))
        shear = [angle, 0.0] if name == "ShearX" else [0.0, angle]
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=bilinear,
                        fill=_FILL, center=[0.5, 0.5])  # fmt: skip
    if name in ("TranslateX", "TranslateY"):
        shift = [-value, 0.0] if name == "TranslateX" else [0.0, -value]
        return F.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=bilinear,
                        fill=_FILL)  # fmt: skip
    if name == "Rotate":
        return F.rotate(img, value, interpolation=bilinear, fill=_FILL)
    raise ValueError(f"unknown RandAugment op {name!r}; known: {BLIP_RANDAUG_OPS}")


class BlipRandAugment(torch.nn.Module):
    """BLIP's RandomAugment(N, M): draw `num_ops` ops with replacement; apply each with probability 0.5 at level
    `magnitude`, signed ops with a random sign. Uses torch's global RNG (seed with `torch.manual_seed`).

    Input/output: a PIL image (returns PIL) or a uint8 tensor [3, H, W] (returns a tensor).
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 5, ops: Sequence[str] = BLIP_RANDAUG_OPS):
        super().__init__()
        for name in ops:
            op_magnitude(name, magnitude)  # validates the name
        self.num_ops, self.magnitude, self.ops = num_ops, magnitude, tuple(ops)

    def forward(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        is_pil = isinstance(img, Image.Image)
        x = F.pil_to_tensor(img) if is_pil else img
        picks = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        for i in picks:
            name = self.ops[i]
            if torch.rand(()).item() > 0.5:
                continue
            value = op_magnitude(name, self.magnitude)
            if name in _SIGNED_OPS and torch.rand(()).item() < 0.5:
                value = -value
            x = apply_op(x, name, value)
        return F.to_pil_image(x) if is_pil else x

    def extra_repr(self) -> str:
        return f"num_ops={self.num_ops}, magnitude={self.magnitude}, ops={list(self.ops)}"


def image_transform(image_size: int, train: bool = False, kind: str = "blip", min_scale: float = 0.5) -> T.Compose:
    """PIL image -> float32 [3, image_size, image_size], CLIP-normalised.

    eval (any kind): bicubic squash resize to (S, S) + ToTensor + Normalize (== LAVIS BlipImageEvalProcessor).
    train, kind "blip": RandomResizedCrop(S, scale=(min_scale, 1), bicubic) + HFlip + BlipRandAugment(2, 5).
    train, kind "blip2": RandomResizedCrop + HFlip only. (BLIP pretraining used min_scale 0.2, fine-tuning 0.5.)
    """
    if kind not in ("blip", "blip2"):
        raise ValueError(f"unknown transform kind {kind!r}; expected 'blip' or 'blip2'")
    bicubic = InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    if not train:
        return T.Compose([T.Resize((image_size, image_size), interpolation=bicubic), *tail])
    aug = [T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=bicubic), T.RandomHorizontalFlip()]
    if kind == "blip":
        aug.append(BlipRandAugment(2, 5))
    return T.Compose([*aug, *tail])
