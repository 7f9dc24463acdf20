"""load_image on every test photo and every unusual input, plus generated edge cases (16-bit, LA, transparency)."""

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from blip.data import images
from blip.data.images import ImageDecodeError, load_image, to_rgb
from conftest import FIXTURES

IMAGES = FIXTURES / "images"
UNUSUAL = IMAGES / "unusual"
BROKEN = ["truncated.jpg", "not_an_image.jpg", "empty.jpg"]
# EXIF orientation -> the PIL transpose that makes the stored pixels upright (EXIF 2.3 spec, tag 0x0112)
UPRIGHT = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180], 4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE], 6: [Image.Transpose.ROTATE_270], 7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}  # fmt: skip


def raw(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def test_every_unusual_file_is_covered():
    names = {p.name for p in UNUSUAL.iterdir()}
    handled = set(BROKEN) | {"cmyk.jpg", "grayscale.png", "exif_rotated.jpg", "rgba.png", "palette.gif",
                             "one_pixel.png", "very_wide.jpg"}  # fmt: skip
    assert names == handled, f"new unusual files need a test: {names - handled}"


@pytest.mark.parametrize("path", sorted(IMAGES.glob("*.jpg")), ids=lambda p: p.name)
def test_photos_decode_unchanged(path):
    img = load_image(path)
    stored = raw(path)
    assert img.mode == "RGB" and img.size == stored.size
    assert np.array_equal(pixels(img), pixels(stored.convert("RGB")))


def test_cmyk_colours_not_inverted():
    # cmyk.jpg is coffee.jpg saved as CMYK: back in RGB it should look like the original
    img, coffee = load_image(UNUSUAL / "cmyk.jpg"), load_image(IMAGES / "coffee.jpg")
    assert raw(UNUSUAL / "cmyk.jpg").mode == "CMYK" and img.mode == "RGB" and img.size == coffee.size
    assert np.abs(pixels(img) - pixels(coffee)).mean() < 10


def test_grayscale_replicated():
    img = load_image(UNUSUAL / "grayscale.png")
    gray = pixels(raw(UNUSUAL / "grayscale.png"))
    assert img.mode == "RGB" and all(np.array_equal(pixels(img)[..., c], gray) for c in range(3))


def test_exif_orientation_applied():
    stored = raw(UNUSUAL / "exif_rotated.jpg")
    orientation = stored.getexif().get(0x0112)
    assert orientation in UPRIGHT
    img = load_image(UNUSUAL / "exif_rotated.jpg")
    swaps = orientation >= 5  # orientations 5-8 rotate by 90 degrees
    assert img.size == (stored.size[::-1] if swaps else stored.size)
    expected = stored
    for op in UPRIGHT[orientation]:
        expected = expected.transpose(op)
    assert np.array_equal(pixels(img), pixels(expected.convert("RGB")))
    # and upright means it matches the photo it was made from
    assert np.abs(pixels(img) - pixels(load_image(IMAGES / "coffee.jpg"))).mean() < 10


def test_rgba_composited_on_white():
    rgba = pixels(raw(UNUSUAL / "rgba.png")).astype(np.float64)
    alpha = rgba[..., 3:] / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    img = load_image(UNUSUAL / "rgba.png")
    assert img.mode == "RGB" and np.abs(pixels(img) - expected).max() <= 1


def test_palette_gif():
    img = load_image(UNUSUAL / "palette.gif")
    stored = raw(UNUSUAL / "palette.gif")
    assert stored.mode == "P" and img.mode == "RGB"
    palette = np.array(stored.getpalette(), dtype=np.int16).reshape(-1, 3)
    assert np.array_equal(pixels(img), palette[np.asarray(stored)])


def test_one_pixel_and_very_wide():
    one = load_image(UNUSUAL / "one_pixel.png")
    assert one.size == (1, 1) and one.mode == "RGB"
    assert np.array_equal(pixels(one), pixels(raw(UNUSUAL / "one_pixel.png").convert("RGB")))
    wide = load_image(UNUSUAL / "very_wide.jpg")
    assert wide.size == raw(UNUSUAL / "very_wide.jpg").size == (2000, 20) and wide.mode == "RGB"


@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_raise_named_error(name):
    with pytest.raises(ImageDecodeError, match=name) as info:
        load_image(UNUSUAL / name)
    assert isinstance(info.value, ValueError) and info.value.path == str(UNUSUAL / name)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on to "fix" truncation


def test_error_reasons_say_what_happened():
    def reason(src):
        with pytest.raises(ImageDecodeError) as info:
            load_image(src)
        return info.value.reason

    assert "empty" in reason(UNUSUAL / "empty.jpg")
    assert "truncated" in reason(UNUSUAL / "truncated.jpg")
    assert "not a recognised image" in reason(UNUSUAL / "not_an_image.jpg")
    assert "no such file" in reason(UNUSUAL / "missing.jpg")
    assert "directory" in reason(UNUSUAL)
    assert "truncated" in reason((UNUSUAL / "truncated.jpg").read_bytes())
    assert "empty" in reason(b"")


def test_unreadable_path(monkeypatch):
    # tests may run as root, which reads mode-000 files; simulate the denied open() instead
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images, "open", denied, raising=False)
    with pytest.raises(ImageDecodeError, match="cat.jpg.*permission denied"):
        load_image(IMAGES / "cat.jpg")


def test_truncated_pil_image_input():
    lazy = Image.open(UNUSUAL / "truncated.jpg")  # opened, not decoded
    with pytest.raises(ImageDecodeError, match="truncated.jpg"):
        load_image(lazy)


def test_bytes_file_object_and_pil_inputs():
    path = IMAGES / "cat.jpg"
    from_path = pixels(load_image(path))
    assert np.array_equal(pixels(load_image(path.read_bytes())), from_path)
    assert np.array_equal(pixels(load_image(io.BytesIO(path.read_bytes()))), from_path)
    assert np.array_equal(pixels(load_image(str(path))), from_path)
    assert np.array_equal(pixels(load_image(Image.open(path))), from_path)


def test_sixteen_bit_grayscale_scaled(tmp_path):
    levels = np.array([[0, 257 * 100, 65535, 300]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert raw(tmp_path / "deep.png").mode in ("I;16", "I")
    img = load_image(tmp_path / "deep.png")
    assert img.mode == "RGB" and pixels(img)[0, :, 0].tolist() == [0, 100, 255, 1]  # 300/257 -> 1, not clipped


def test_la_and_palette_transparency_on_white(tmp_path):
    la = Image.fromarray(np.array([[[0, 0], [100, 255], [200, 51]]], dtype=np.uint8))
    la.save(tmp_path / "la.png")
    # 0 transparent -> white; 100 opaque -> 100; 200 at alpha 51 -> 200*0.2 + 255*0.8 = 244
    assert pixels(load_image(tmp_path / "la.png"))[0, :, 0].tolist() == [255, 100, 244]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putdata([0, 1])
    pal.save(tmp_path / "t.gif", transparency=0)
    assert pixels(load_image(tmp_path / "t.gif")).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_to_rgb_float_image():
    f = Image.fromarray(np.array([[-5.0, 12.4, 300.0]], dtype=np.float32))
    assert pixels(to_rgb(f))[0, :, 1].tolist() == [0, 12, 255]


def test_error_survives_pickling():  # DataLoader workers send exceptions back to the main process
    err = pickle.loads(pickle.dumps(ImageDecodeError("a/b.jpg", "empty file")))
    assert (err.path, err.reason) == ("a/b.jpg", "empty file") and "a/b.jpg" in str(err)
