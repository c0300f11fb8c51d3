"""Decoding images as users send them, safely. Pillow only: the API uses this too."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from models.exceptions import InvalidInput

#: Longest side over shortest side: beyond it resizing to a model's input size overflows.
MAX_ASPECT = 50


def b64_to_bytes(data: str) -> bytes:
    """Strict base64 (a ``data:`` URL prefix is accepted) to bytes."""
    if not isinstance(data, str) or not data:
        raise InvalidInput("image_b64 must be a non-empty base64 string")
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("image_b64 is not valid base64") from None


def _open(raw: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InvalidInput("the data is not an image Pillow can read (JPEG, PNG, WebP, GIF, ...)") from None
    except OSError as exc:
        raise InvalidInput(f"the image cannot be read: {exc}") from None
    except Exception as exc:  # format plugins raise ValueError, NotImplementedError, SyntaxError, ...
        raise InvalidInput(f"the image cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise InvalidInput(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise InvalidInput(f"image is {width}x{height}; sides more than {MAX_ASPECT}:1 apart are refused")
    return img


def check_image(raw: bytes, max_pixels: int) -> tuple[int, int]:
    """Cheap check that ``raw`` is an image within the pixel limit; returns its size."""
    img = _open(raw, max_pixels)
    try:
        img.verify()
    except Exception as exc:  # Pillow raises many types for a corrupt file
        raise InvalidInput(f"the image is corrupt: {exc}") from None
    return img.size


def decode_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Fully decode to an RGB image: EXIF orientation applied, first frame of animations."""
    img = _open(raw, max_pixels)
    try:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGB", img.size, (255, 255, 255))
                background.paste(img, mask=img.getchannel("A"))
                img = background
            else:
                img = img.convert("RGB")
    except InvalidInput:
        raise
    except Exception as exc:  # truncated or corrupt data surfaces only on load
        raise InvalidInput(f"the image cannot be decoded: {exc}") from None
    return img
