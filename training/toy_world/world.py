"""The procedural toy world: coloured shapes on backgrounds, rendered with PIL.

Pure Python + PIL + numpy; no torch. Every image is a function of a seed, so the
toy models, the fine-tuning datasets and the quality checks are reproducible.

The *base* world (what the toy generator is trained on) is every colour x shape on
a plain background. The *wider* world adds patterned backgrounds that only the toy
CLIP scorer knows, so an evaluation can tell whether a fine-tune taught one of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64

# Saturated foreground colours; backgrounds and patterns are neutral greys, so a
# pixel's saturation separates foreground from background (see evaluation.toy_metrics).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (235, 210, 25),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "purple": (145, 55, 195),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLAIN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (18, 18, 18)}
PATTERNS: tuple[str, ...] = ("striped", "dotted", "checkered")
BACKGROUNDS: tuple[str, ...] = (*PLAIN_BACKGROUNDS, *PATTERNS)
# Patterns outside even the scorer's world: the toy CLIP was never shown them nor their names, so a fine-tune
# that teaches one can only be judged by image-image similarity (a style the scorer has no word for).
HIDDEN_PATTERNS: tuple[str, ...] = ("framed",)

_PATTERN_LIGHT = (240, 240, 240)
_PATTERN_DARK = (120, 120, 120)
_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges like a photo


@dataclass(frozen=True)
class Scene:
    """One image's content: what is drawn, where, and how big."""

    colour: str
    shape: str
    background: str
    size: int  # bounding-box side in pixels
    cx: float
    cy: float
    tint: tuple[int, int, int]  # per-image colour jitter, added to the base colour

    @property
    def caption(self) -> str:
        return caption_for(self.colour, self.shape, self.background)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(colour: str | None, shape: str | None, background: str | None) -> str:
    """Caption naming any subset of the attributes, e.g. ``an orange circle on a white background``."""
    noun = shape or "shape"
    subject = f"{colour} {noun}" if colour else noun
    subject = f"{_article(subject)} {subject}"
    if background is None:
        return subject
    if colour is None and shape is None:
        return f"{_article(background)} {background} background"
    return f"{subject} on {_article(background)} {background} background"


def sample_scene(
    rng: random.Random,
    colour: str | None = None,
    shape: str | None = None,
    background: str | None = None,
    backgrounds: tuple[str, ...] = tuple(PLAIN_BACKGROUNDS),
) -> Scene:
    """Draw a random scene; fixed attributes are kept, the rest are sampled."""
    size = rng.randint(24, 40)
    half = size / 2
    margin = 3
    return Scene(
        colour=colour or rng.choice(list(COLOURS)),
        shape=shape or rng.choice(SHAPES),
        background=background or rng.choice(backgrounds),
        size=size,
        cx=rng.uniform(half + margin, RESOLUTION - half - margin),
        cy=rng.uniform(half + margin, RESOLUTION - half - margin),
        tint=tuple(rng.randint(-14, 14) for _ in range(3)),  # type: ignore[arg-type]
    )


def _background(name: str, side: int) -> Image.Image:
    if name in PLAIN_BACKGROUNDS:
        return Image.new("RGB", (side, side), PLAIN_BACKGROUNDS[name])
    if name not in PATTERNS + HIDDEN_PATTERNS:
        raise ValueError(f"unknown background {name!r}; choose one of {', '.join(BACKGROUNDS + HIDDEN_PATTERNS)}")
    img = Image.new("RGB", (side, side), _PATTERN_LIGHT)
    draw = ImageDraw.Draw(img)
    cell = 8 * _SUPERSAMPLE  # patterns align with the 8x8-pixel cells a VAE latent covers
    for y in range(0, side, cell):
        for x in range(0, side, cell):
            if name == "striped":
                draw.rectangle([x, y, x + cell - 1, y + cell // 2 - 1], fill=_PATTERN_DARK)
            elif name == "checkered" and (x // cell + y // cell) % 2 == 0:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_PATTERN_DARK)
            elif name == "dotted":
                r = cell // 4
                c = cell // 2
                draw.ellipse([x + c - r, y + c - r, x + c + r, y + c + r], fill=_PATTERN_DARK)
            elif name == "framed" and not (2 * cell <= x < side - 2 * cell and 2 * cell <= y < side - 2 * cell):
                r, c = cell // 4, cell // 2  # dotted cells along a 16-pixel frame around a plain centre
                draw.ellipse([x + c - r, y + c - r, x + c + r, y + c + r], fill=_PATTERN_DARK)
    return img


def render(scene: Scene) -> Image.Image:
    """Render a scene as a 64x64 RGB image."""
    s = _SUPERSAMPLE
    img = _background(scene.background, RESOLUTION * s)
    draw = ImageDraw.Draw(img)
    colour = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[scene.colour], scene.tint))
    half = scene.size / 2
    x0, y0 = (scene.cx - half) * s, (scene.cy - half) * s
    x1, y1 = (scene.cx + half) * s, (scene.cy + half) * s
    if scene.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif scene.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
    elif scene.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; choose one of {', '.join(SHAPES)}")
    return img.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)


def base_captions() -> list[str]:
    """Every full caption of the base world (colour x shape x plain background)."""
    return [caption_for(c, s, b) for b in PLAIN_BACKGROUNDS for c in COLOURS for s in SHAPES]


def scenes(seed: int, n: int, backgrounds: tuple[str, ...] = tuple(PLAIN_BACKGROUNDS)) -> list[Scene]:
    """``n`` random scenes, deterministic from ``seed``."""
    rng = random.Random(seed)
    return [sample_scene(rng, backgrounds=backgrounds) for _ in range(n)]


def render_array(scene_list: list[Scene]) -> np.ndarray:
    """Render scenes into a uint8 array of shape (N, 64, 64, 3)."""
    return np.stack([np.asarray(render(sc)) for sc in scene_list])
