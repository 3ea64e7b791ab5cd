"""Pure measurements of toy-world images: a pixel classifier and CLIP caption retrieval.

The pixel classifier needs no model: toy backgrounds and patterns are neutral grey, the
shapes are saturated, so saturated pixels are the foreground. Colour is the nearest
palette hue of the foreground's median pixel; shape is read off how much of its bounding
box the foreground fills (square ~1.0, circle ~pi/4, triangle ~0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from evaluation.metrics import ClipScorer
from training.toy_world import world

_MIN_SATURATION = 0.35
_MIN_VALUE = 0.25
_MIN_PIXELS = 12  # fewer foreground pixels than this: nothing was drawn


@dataclass(frozen=True)
class PixelReading:
    colour: str | None  # None when no foreground was found
    shape: str | None
    fill: float  # foreground share of its bounding box
    pixels: int  # foreground pixel count


def _hsv(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb.astype(np.uint8)).convert("HSV"), dtype=np.float32) / 255.0


def _palette_hues() -> dict[str, float]:
    return {name: float(_hsv(np.array([[rgb]], dtype=np.uint8))[0, 0, 0]) for name, rgb in world.COLOURS.items()}


_PALETTE_HUES = _palette_hues()


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the biggest 4-connected blob (drops stray saturated specks)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def read_image(image: Image.Image | np.ndarray) -> PixelReading:
    """Classify the foreground colour and shape of one toy-world image."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    hsv = _hsv(rgb)
    mask = _largest_component((hsv[..., 1] > _MIN_SATURATION) & (hsv[..., 2] > _MIN_VALUE))
    count = int(mask.sum())
    if count < _MIN_PIXELS:
        return PixelReading(None, None, 0.0, count)
    hue = float(np.median(hsv[..., 0][mask]))
    # hue is circular: red sits at both 0 and 1
    colour = min(_PALETTE_HUES, key=lambda n: min(abs(hue - _PALETTE_HUES[n]), 1 - abs(hue - _PALETTE_HUES[n])))
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = count / box
    shape = "triangle" if fill < 0.64 else "circle" if fill < 0.89 else "square"
    return PixelReading(colour, shape, fill, count)


def clip_similarity(model, processor, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    """Cosine similarity matrix (images x texts) under any ``CLIPModel`` + ``CLIPProcessor``."""
    scorer = ClipScorer(model, processor)
    return scorer.images(images) @ scorer.texts(texts).T
