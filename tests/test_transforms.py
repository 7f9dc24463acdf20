"""Image transforms: eval pixels vs LAVIS's recorded preprocessing, RandAugment ops vs hand-computed / PIL results."""


import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from blip.data.images import load_image
from blip.data.transforms import (
    BLIP_RANDAUG_OPS,
    CLIP_MEAN,
    CLIP_STD,
    BlipRandAugment,
    apply_op,
    image_transform,
    op_magnitude,
)
from conftest import FIXTURES

LAVIS = FIXTURES / "lavis"
PHOTOS = FIXTURES / "images"


@pytest.mark.parametrize(
    "fixture, size",
    [("blip_caption", 64), ("blip_itm", 64), ("blip_vqa", 64), ("blip2_qformer", 56), ("blip2_opt", 56),
     ("blip2_t5", 56)],
)  # fmt: skip
def test_eval_matches_lavis_pixels(fixture, size):
    inputs = torch.load(LAVIS / fixture / "inputs.pt", weights_only=True)
    tf = image_transform(size)
    files = [LAVIS / fixture / f for f in inputs["raw_image_files"]]
    via_pil = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])  # what LAVIS did
    via_loader = torch.stack([tf(load_image(f)) for f in files])
    assert via_pil.shape == inputs["image"].shape and via_pil.dtype == torch.float32
    assert (via_pil - inputs["image"]).abs().max() <= 1e-6
    assert torch.equal(via_loader, via_pil)


def test_eval_normalisation_by_hand():
    rgb = (200, 100, 50)
    out = image_transform(8)(Image.new("RGB", (13, 5), rgb))  # non-square: squashed, not cropped
    assert out.shape == (3, 8, 8)
    for c in range(3):
        expected = (rgb[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(out[c], torch.full((8, 8), expected), atol=1e-6, rtol=0)


def test_eval_squashes_whole_image():
    # a 4:1 image with a white band in its leftmost 10%: a squash keeps it, a centre crop would cut it off
    arr = np.zeros((10, 40, 3), np.uint8)
    arr[:, :4] = 255
    out = image_transform(20)(Image.fromarray(arr))
    assert out[:, :, 0].mean() > 1.5 and out[:, :, -1].mean() < -1.5


@pytest.mark.parametrize("size", [(1, 1), (2000, 20), (20, 2000)])
def test_eval_extreme_shapes(size):
    assert image_transform(16)(Image.new("RGB", size, (10, 20, 30))).shape == (3, 16, 16)


def _transforms_of(tf: T.Compose) -> list:
    return list(tf.transforms)


def test_train_pipelines_structure():
    blip = _transforms_of(image_transform(32, train=True, kind="blip", min_scale=0.2))
    rrc = blip[0]
    assert isinstance(rrc, T.RandomResizedCrop) and rrc.size == (32, 32) and rrc.scale == (0.2, 1.0)
    assert rrc.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(blip[1], T.RandomHorizontalFlip)
    assert isinstance(blip[2], BlipRandAugment) and (blip[2].num_ops, blip[2].magnitude) == (2, 5)
    blip2 = _transforms_of(image_transform(32, train=True, kind="blip2"))
    assert blip2[0].scale == (0.5, 1.0) and not any(isinstance(t, BlipRandAugment) for t in blip2)
    with pytest.raises(ValueError, match="kind"):
        image_transform(32, kind="clip")


@pytest.mark.parametrize("kind", ["blip", "blip2"])
def test_train_deterministic_under_seed(kind):
    img = load_image(PHOTOS / "cat.jpg")
    tf = image_transform(48, train=True, kind=kind)
    torch.manual_seed(7)
    a = tf(img)
    torch.manual_seed(7)
    b = tf(img)
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32 and torch.equal(a, b)
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        outs.append(tf(img))
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_op_list_and_levels_are_blips():
    assert BLIP_RANDAUG_OPS == ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
                                "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")  # fmt: skip
    # BLIP: enhance = l/10*1.8+0.1, shear = l/10*0.3, translate = l/10*10 px, rotate = l/10*30 deg
    at5 = {name: op_magnitude(name, 5) for name in BLIP_RANDAUG_OPS}
    assert at5["Brightness"] == pytest.approx(1.0) and at5["Sharpness"] == pytest.approx(1.0)
    assert at5["ShearX"] == pytest.approx(0.15) and at5["TranslateY"] == pytest.approx(5.0)
    assert at5["Rotate"] == pytest.approx(15.0)
    assert op_magnitude("Brightness", 10) == pytest.approx(1.9)
    with pytest.raises(ValueError, match="unknown"):
        op_magnitude("Solarize", 5)


@pytest.fixture
def rand_img() -> torch.Tensor:
    return torch.randint(0, 256, (3, 12, 12), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_identity(rand_img):
    assert torch.equal(apply_op(rand_img, "Identity", 0.0), rand_img)


def test_autocontrast_by_hand():
    x = torch.tensor([50, 60, 75, 101], dtype=torch.uint8).reshape(1, 2, 2).repeat(3, 1, 1)
    x[1] = torch.tensor([[0, 255], [7, 9]])  # already full range -> unchanged
    out = apply_op(x, "AutoContrast", 0.0)
    assert out[0].flatten().tolist() == [0, 50, 125, 255]  # (v - 50) * 255 / 51 = (v - 50) * 5
    assert torch.equal(out[1], x[1])


def test_autocontrast_matches_pil(rand_img):
    low_contrast = rand_img // 3 + 40
    pil = ImageOps.autocontrast(Image.fromarray(low_contrast.permute(1, 2, 0).numpy()))
    expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    assert torch.equal(apply_op(low_contrast, "AutoContrast", 0.0), expected)


def test_equalize_matches_pil(rand_img):
    pil = ImageOps.equalize(Image.fromarray(rand_img.permute(1, 2, 0).numpy()))
    assert torch.equal(apply_op(rand_img, "Equalize", 0.0), torch.from_numpy(np.array(pil)).permute(2, 0, 1))


def test_brightness(rand_img):
    assert torch.equal(apply_op(rand_img, "Brightness", op_magnitude("Brightness", 5)), rand_img)  # BLIP M=5
    # BLIP's table: clip(float32(v) * 1.9, 0, 255) truncated to uint8
    expected = np.clip(rand_img.numpy().astype(np.float32) * np.float32(1.9), 0, 255).astype(np.uint8)
    assert np.array_equal(apply_op(rand_img, "Brightness", 1.9).numpy(), expected)


def test_sharpness_by_hand(rand_img):
    assert torch.equal(apply_op(rand_img, "Sharpness", 1.0), rand_img)
    out = apply_op(rand_img, "Sharpness", 1.9).numpy().astype(int)
    x = rand_img.numpy().astype(float)
    kernel = np.ones((3, 3))
    kernel[1, 1] = 5
    for c, i, j in [(0, 1, 1), (1, 5, 7), (2, 10, 10), (0, 6, 3)]:
        smooth = np.floor((x[c, i - 1 : i + 2, j - 1 : j + 2] * kernel).sum() / 13 + 0.5)
        assert out[c, i, j] == int(np.clip(smooth + 1.9 * (x[c, i, j] - smooth), 0, 255))
    assert np.array_equal(out[:, 0], x[:, 0]) and np.array_equal(out[:, :, -1], x[:, :, -1])  # borders kept


def test_shear_about_top_left():
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    img[:, :, 2] = 255  # a vertical line at x=2
    out = apply_op(img, "ShearX", 1.0)  # BLIP/cv2: x' = x + 1.0 * y
    for y in range(6):
        row = out[0, y]
        assert row[2 + y] == 255 and (row == 255).sum() == 1
        assert (row[:y] == 128).all()  # uncovered area is grey
    out_y = apply_op(img.transpose(1, 2).contiguous(), "ShearY", 1.0)  # y' = y + 1.0 * x
    assert torch.equal(out_y, out.transpose(1, 2))


@pytest.mark.parametrize("value", [5.0, -5.0])
def test_translate(rand_img, value):
    shift = int(value)
    out = apply_op(rand_img, "TranslateX", value)  # content moves by -value px
    if shift > 0:
        assert torch.equal(out[:, :, : 12 - shift], rand_img[:, :, shift:])
        assert (out[:, :, 12 - shift :] == 128).all()
    else:
        assert torch.equal(out[:, :, -shift:], rand_img[:, :, :shift])
        assert (out[:, :, :-shift] == 128).all()
    out_y = apply_op(rand_img, "TranslateY", value)
    assert torch.equal(out_y, apply_op(rand_img.transpose(1, 2), "TranslateX", value).transpose(1, 2))


def test_rotate_counter_clockwise():
    img = torch.arange(3 * 5 * 5, dtype=torch.uint8).reshape(3, 5, 5)
    assert torch.equal(apply_op(img, "Rotate", 90.0), torch.rot90(img, 1, dims=(1, 2)))
    out = apply_op(torch.full((3, 9, 9), 10, dtype=torch.uint8), "Rotate", 45.0)
    assert (out[:, 0, 0] == 128).all() and (out[:, 4, 4] == 10).all()  # corner uncovered, centre kept


def test_randaugment_seeded_and_types():
    aug = BlipRandAugment(2, 5)
    pil = load_image(PHOTOS / "coffee.jpg").resize((24, 16))
    torch.manual_seed(3)
    a = aug(pil)
    torch.manual_seed(3)
    b = aug(pil)
    assert isinstance(a, Image.Image) and a.size == (24, 16) and np.array_equal(np.asarray(a), np.asarray(b))
    t = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
    torch.manual_seed(3)
    c = aug(t)
    assert isinstance(c, torch.Tensor) and c.dtype == torch.uint8 and np.array_equal(c.permute(1, 2, 0).numpy(), a)
    assert torch.equal(BlipRandAugment(0, 5)(t), t)
    with pytest.raises(ValueError):
        BlipRandAugment(2, 5, ops=("Identity", "Posterize"))


def test_randaugment_probabilities():
    # each of the 2 drawn ops is applied with probability 0.5 -> the image is untouched 25% of the time
    img = torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    aug = BlipRandAugment(2, 5, ops=("TranslateX",))
    torch.manual_seed(0)
    outs = [aug(img) for _ in range(400)]
    untouched = sum(torch.equal(o, img) for o in outs) / len(outs)
    assert 0.18 < untouched < 0.32
    moved_left = sum(torch.equal(o, apply_op(img, "TranslateX", 5.0)) for o in outs)
    moved_right = sum(torch.equal(o, apply_op(img, "TranslateX", -5.0)) for o in outs)
    assert moved_left > 40 and moved_right > 40  # both signs occur (each ~1/4 of draws)
