import base64
import io

import pytest
from PIL import Image

from models.exceptions import InvalidInput
from models.images import b64_to_bytes, check_image, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"),
                                       ("RGB", "WEBP"), ("P", "GIF"), ("LA", "PNG")])
def test_decodes_common_formats_to_rgb(mode, fmt):
    raw = encode(Image.new(mode, (40, 30)), fmt)
    img = decode_image(raw, 10_000)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_gif_takes_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue(), 1000)
    r, g, b = img.getpixel((4, 4))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    raw = encode(img, "JPEG", exif=exif)
    assert decode_image(raw, 10_000).size == (20, 40)


def test_not_an_image_truncated_and_too_many_pixels():
    with pytest.raises(InvalidInput, match="not an image"):
        decode_image(b"hello, I am text", 10_000)
    raw = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(InvalidInput):
        decode_image(raw[: len(raw) // 2], 10_000)
    with pytest.raises(InvalidInput, match="pixels"):
        check_image(raw, 1000)
    assert check_image(raw, 10_000) == (64, 64)


def test_base64_is_strict():
    assert b64_to_bytes(base64.b64encode(b"abc").decode()) == b"abc"
    assert b64_to_bytes("data:image/png;base64," + base64.b64encode(b"abc").decode()) == b"abc"
    with pytest.raises(InvalidInput):
        b64_to_bytes("not base64 !!")
    with pytest.raises(InvalidInput):
        b64_to_bytes("")
