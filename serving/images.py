"""PNG bytes <-> PIL images, shared by the server and the client."""

from __future__ import annotations

import base64
import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PNG_KEY = "lorafleet:image_id"  # the PNG tEXt keyword carrying a generated image's id (serving/feedback.py)


def png_text(text: dict[str, str]) -> PngInfo:
    """PNG tEXt chunks (keyword -> Latin-1 value) for ``Image.save(..., pnginfo=...)``. Pillow reads them back into
    ``Image.info`` but writes none unless given this: ``image.save("a.png", pnginfo=png_text({PNG_KEY: id}))``."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """``image`` as PNG bytes; ``text``: tEXt chunks, e.g. ``{PNG_KEY: image id}`` (serving/feedback.py)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_text(text) if text else None)
    return buf.getvalue()


def from_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def from_b64(text: str) -> Image.Image:
    return from_png(base64.b64decode(text))
