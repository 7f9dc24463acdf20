"""Decode any image a dataset or user hands us into an upright 8-bit RGB PIL image, or fail with a clear error.

Choices (documented because they change pixels):
* EXIF orientation is applied (`ImageOps.exif_transpose`), so phone photos come out upright.
* Transparency (RGBA, LA, PA, palette or RGB/L with a transparency key) is composited onto **white**, as an image
  viewer shows it on a page and as HF transformers' `convert_rgb` does. (BLIP/LAVIS call `.convert("RGB")`, which
  drops alpha and keeps whatever colour hides under transparent pixels; identical for opaque images.)
* 16-bit / 32-bit integer grayscale (modes I;16*, I) is scaled from 0..65535 to 0..255, not clipped at 255;
  float images (F) are clipped to 0..255. CMYK / YCbCr / LAB / HSV / palette / 1-bit use Pillow's conversion.
* Truncated files are errors: `.load()` forces a full decode and `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is never
  touched (it must stay False, else Pillow pads missing data with grey and hides the damage).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageDecodeError(ValueError):
    """An image could not be loaded. `path` names the file (or `<bytes>`), `reason` says why and what to do."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot load image {self.path!r}: {reason}")

    def __reduce__(self):  # keeps (path, reason) when sent back from a DataLoader worker
        return (type(self), (self.path, self.reason))


class ImageTooLargeError(ImageDecodeError):
    """The image's header declares more pixels than the caller's `max_pixels` allows (checked before decoding)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the alpha / 16-bit choices)."""
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8)  # 65535 / 257 = 255
        return Image.fromarray(gray).convert("RGB")
    if img.mode == "F":
        gray = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _upright(img: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # a broken EXIF block must not lose an otherwise good image
        warnings.warn(f"{name}: ignoring unreadable EXIF orientation ({e})", stacklevel=3)
        return img


def _open_source(source: ImageSource) -> tuple[BinaryIO | str, str]:
    """-> (what Image.open accepts, a name for messages). Raises ImageDecodeError for unreadable / empty inputs."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("<bytes>", "empty input (0 bytes); the download or read produced nothing")
        return io.BytesIO(bytes(source)), "<bytes>"
    if hasattr(source, "read"):
        return source, str(getattr(source, "name", "<file object>"))
    path = Path(source)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise ImageDecodeError(path, "is a directory, not an image file; check the dataset root / file list")
        with open(path, "rb"):  # permission check with the real error
            pass
    except FileNotFoundError:
        raise ImageDecodeError(path, "no such file; check the path and the dataset root") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied; check the file's permissions") from None
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read the file ({e})") from e
    if size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes); re-download it or remove it from the annotations")
    return str(path), str(path)


def load_image(source: ImageSource, max_pixels: int | None = None,
               limit_name: str = "data.max_image_pixels") -> Image.Image:
    """Decode `source` (path, bytes, binary file object or PIL image) -> upright RGB `PIL.Image.Image`.

    Raises ImageDecodeError (a ValueError) naming the file for missing/unreadable paths, empty files, non-images,
    truncated or corrupt data and decompression bombs; ImageTooLargeError (a subclass) when `max_pixels` is given
    and the header declares more pixels (read from the header, before any pixel is decoded); `limit_name` is
    the setting the message names.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        try:
            source.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageDecodeError(name, f"truncated or corrupt image data ({e})") from e
        return to_rgb(_upright(source, name))

    fp, name = _open_source(source)
    try:
        with Image.open(fp) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLargeError(name, f"{img.width}x{img.height} pixels, more than the limit of {max_pixels} "
                                         f"({limit_name}); downscale the image or raise the limit")
            img.load()  # full decode now: truncation must fail here, not later in a worker
            return to_rgb(_upright(img, name))  # exif_transpose returns a copy, detached from the file
    except ImageTooLargeError:
        raise
    except UnidentifiedImageError as e:
        raise ImageDecodeError(
            name, f"not a recognised image format ({_content_kind(_peek(fp))}); re-download it or remove it from the "
            "annotations"
        ) from e  # fmt: skip
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(name, f"too large to decode safely ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise ImageDecodeError(
            name, f"truncated or corrupt image data ({e}); re-download or re-encode the file, or remove it"
        ) from e


def _content_kind(head: bytes) -> str:
    """What a file's first bytes look like, in words: errors describe a file's content, never echo it (the path
    may name a file that is not the user's to show)."""
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "it is an HTML page: often an HTML error page saved by a failed download"
    if not head:
        return "nothing could be read from it"
    if any(byte < 32 and byte not in b"\t\n\r" or byte == 127 for byte in head):   # control bytes: not text
        return "binary data of an unknown format"
    return "it holds text, not image data"


def _peek(fp: BinaryIO | str, n: int = 16) -> bytes:
    try:
        if isinstance(fp, str):
            with open(fp, "rb") as f:
                return f.read(n)
        fp.seek(0)
        return fp.read(n)
    except (OSError, ValueError):
        return b""
