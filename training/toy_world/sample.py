"""Toy-world prompts for sampling a base model; loading and drawing are production code (re-exported here)."""

from __future__ import annotations

from training.families import load_pipeline
from training.sampling import generate, image_grid, write_samples
from training.toy_world import world

__all__ = ["demo_prompts", "generate", "image_grid", "load_pipeline", "write_samples"]


def demo_prompts(n: int) -> list[str]:
    """``n`` base-world prompts that cycle through every colour, shape and background."""
    colours, shapes, backgrounds = list(world.COLOURS), world.SHAPES, list(world.PLAIN_BACKGROUNDS)
    return [
        world.caption_for(colours[i % len(colours)], shapes[i % len(shapes)], backgrounds[(i // 6) % 2])
        for i in range(n)
    ]
