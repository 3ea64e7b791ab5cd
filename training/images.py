"""Image files -> the RGB pixels a model trains on: one decoder for validation, training, preview and evaluation.

Photos arrive in every mode Pillow knows. ``Image.convert("RGB")`` alone gets several of them wrong without a
word: a 16-bit greyscale PNG (``I;16``) is clipped to white, an ``RGBA``/``LA`` or transparent palette image
loses its alpha and shows whatever colour the transparent pixels hold (often black), a phone photo stays sideways
(EXIF orientation). ``open_rgb`` handles each kind with Pillow's own operations and says what it did, so
``lorafleet validate`` can list it per file:

========================  ==========================================================================
stored as                 becomes
========================  ==========================================================================
``I;16`` ``I;16B`` ``I``  8-bit greyscale, value / 257 rounded (65535 -> 255; ``Image.point``)
``F`` (float TIFF)        8-bit greyscale, value × 255 rounded (floats read as 0..1)
16-bit RGB(A) PNG/TIFF    Pillow decodes it to 8 bits per channel (its high byte): noted only
``RGBA`` ``LA`` ``PA``    composited on ``background`` (``data.background``, white by default)
``P``/``L``/``RGB`` + tRNS  the same: transparency composited on ``background``
``CMYK``                  RGB by Pillow's conversion (no colour management)
``L`` ``1`` ``YCbCr`` …   RGB
EXIF orientation 2-8      rotated/mirrored as viewers show it (``ImageOps.exif_transpose``)
animated GIF/WebP/APNG    the first frame; the frame count is noted (validation warns)
AVIF                      read by Pillow itself (≥ 11.3 wheels, ``PIL.features.check("avif")``)
HEIC/HEIF                 refused, naming the format and the conversion to make
========================  ==========================================================================
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageColor, ImageOps, features

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)

_GREY_16 = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}  # ISO/IEC 23008-12


class ImageReadError(ValueError):
    """The file cannot become training pixels; the message says why and what to do (no file name: callers add it)."""


@dataclass(frozen=True)
class Decoded:
    """An image as the model will see it, before resizing, and how it got there."""

    image: Image.Image  # mode RGB, oriented as viewers show it, fully loaded
    mode: str  # the Pillow mode the file decoded to, e.g. "I;16", "RGBA", "P"
    size: tuple[int, int]  # (width, height) as stored in the file, before EXIF orientation
    frames: int = 1  # frames in the file; > 1 = animated, only the first is used
    conversions: tuple[str, ...] = ()  # what was done, in order, e.g. "I;16 -> 8-bit (scaled 1/257)"


def parse_colour(value: str) -> RGB:
    """An opaque colour from a Pillow colour name or hex string ("white", "#808080", "rgb(0,0,0)").

    Raises:
        ValueError: Pillow does not know the colour, or it is not opaque; the message says what to write.
    """
    try:
        rgba = ImageColor.getrgb(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a colour Pillow knows; use a name (white, black, gray) or hex like '#7f7f7f'"
        ) from None
    if len(rgba) == 4 and rgba[3] != 255:
        raise ValueError(f"{value!r} is not opaque; transparent pixels need an opaque colour to sit on")
    return rgba[:3]


def _heif_brand(head: bytes) -> bytes | None:
    """The major brand of an ISO-BMFF HEIF/HEIC file (``....ftypheic``), or None."""
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return head[8:12]
    return None


def _unreadable(head: bytes) -> str:
    if _heif_brand(head):
        return (
            "is HEIC/HEIF (an iPhone photo format) which Pillow cannot decode; convert it to JPEG or PNG "
            "(macOS: `sips -s format jpeg IN.heic --out OUT.jpg`; Linux: `heif-convert IN.heic OUT.jpg`), "
            "or set the camera to 'Most Compatible'"
        )
    if head[4:12] in (b"ftypavif", b"ftypavis") and not features.check("avif"):
        return "is AVIF, which this Pillow build cannot decode (Pillow >= 11.3 wheels can); convert it to PNG or JPEG"
    return "cannot be read as an image (corrupt, or not an image despite its extension); re-export or remove it"


def _rawmode(img: Image.Image) -> str:
    """The decoder's raw mode before loading (e.g. "RGB;16B" for a 48-bit PNG), or ""."""
    if not img.tile:
        return ""
    args = img.tile[0][3]
    if isinstance(args, str):
        return args
    return args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else ""


def _to_8bit(img: Image.Image, notes: list[str]) -> Image.Image:
    """Greyscale wider than 8 bits -> mode L, scaled (not clipped) with ``Image.point``."""
    if img.mode in _GREY_16:
        # point() on mode I applies x/257 + 0.5 and truncates: round(x / 257), 0..65535 -> 0..255
        notes.append(f"{img.mode} (16-bit greyscale) -> 8-bit (scaled 1/257)")
        return img.convert("I").point(lambda x: x / 257 + 0.5).convert("L")
    if img.mode == "F":
        notes.append("F (32-bit float, read as 0..1) -> 8-bit (scaled x255)")
        return img.point(lambda x: x * 255 + 0.5).convert("L")
    return img


def _flatten(img: Image.Image, background: RGB, notes: list[str]) -> Image.Image:
    """Any mode -> RGB; transparency composited on ``background`` (an alpha fully opaque is just dropped)."""
    mode = img.mode
    if img.has_transparency_data:
        rgba = img.convert("RGBA")  # Pillow applies a palette's or tRNS transparency here
        low, _ = rgba.getextrema()[3]
        if low == 255:
            notes.append(f"{mode}: alpha fully opaque, dropped")
            return rgba.convert("RGB")
        what = "alpha" if mode in ("RGBA", "LA", "PA", "La", "RGBa") else "transparency"
        notes.append(f"{mode} {what} composited on {background}")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB":
        return img
    names = {"L": "greyscale", "1": "bilevel", "P": "palette", "CMYK": "no colour profile applied"}
    notes.append(f"{mode} -> RGB" + (f" ({names[mode]})" if mode in names else ""))
    return img.convert("RGB")


def open_rgb(source: str | Path | bytes, background: RGB = WHITE, max_pixels: int | None = None) -> Decoded:
    """Decode ``source`` (a path or the file's bytes) into the RGB image training uses; see the module docstring.

    Args:
        source: an image file's path or its bytes.
        background: RGB the transparent parts are composited on (``data.background``).
        max_pixels: refuse images with more pixels than this before decoding them (decompression bombs); None =
            Pillow's own limit only.

    Returns:
        ``Decoded``: the RGB image (stored size, or with sides swapped by EXIF orientations 5-8) and the notes.

    Raises:
        ImageReadError: not decodable (corrupt, truncated, HEIC, too many pixels), with what to do.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageReadError(
                        f"{width}x{height} exceeds data.max_pixels={max_pixels} "
                        "(possible decompression bomb); downscale it or raise data.max_pixels"
                    )
                mode, frames = img.mode, getattr(img, "n_frames", 1)
                raw = _rawmode(img)
                orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
                img.load()  # the first frame, whole: catches truncation
                if frames > 1:
                    notes.append(f"animated: first of {frames} frames")
                if mode in ("RGB", "RGBA") and ";16" in raw:
                    notes.append(f"16-bit {mode}: Pillow decodes 8 bits per channel (the high byte)")
                out = ImageOps.exif_transpose(img)  # a copy; handles every orientation 1-8
                if orientation in range(2, 9):
                    notes.append(f"EXIF orientation {orientation} applied")
                out = _flatten(_to_8bit(out, notes), background, notes)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError("refused as a decompression bomb (too many pixels); downscale it") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(_unreadable(data[:16])) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data (SyntaxError: some plugins)
        raise ImageReadError(f"corrupt or truncated image ({exc}); re-export it") from None
    return Decoded(out, mode, (width, height), frames, tuple(notes))
