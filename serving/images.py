"""PNG bytes <-> PIL images, shared by the server and the client."""

from __future__ import annotations

import base64
import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PNG_KEY = "lorafleet:image_id"  # the PNG tEXt keyword carrying a generated image's id (serving/feedback.py)


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """``image`` as PNG bytes; ``text``: tEXt chunks (keyword -> Latin-1 value), e.g. ``{"lorafleet:image_id": id}``
    (serving/feedback.py), which Pillow reads back into ``Image.info``."""
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def from_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def from_b64(text: str) -> Image.Image:
    return from_png(base64.b64decode(text))
