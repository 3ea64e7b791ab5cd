"""Write a toy fine-tuning dataset in the ordinary user format.

An image folder with ``metadata.jsonl`` (``file_name``, ``text``), the layout of 🤗 datasets'
``imagefolder`` and diffusers' ``train_text_to_image_lora.py``. It teaches one new concept,
a background pattern the base model never saw, behind a user-chosen trigger word:
``a red circle on a sks background`` where ``sks`` means ``dotted``.
Held-out validation prompts (combinations absent from the training images) go to
``validation_prompts.txt``, with images of them (same layout) in ``heldout/`` for the held-out
denoising loss (``validation.data_path``); ``toy_dataset.json`` records what the trigger stands for so an
evaluation can score it with the toy CLIP.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

from training.toy_world import world

_TRIGGER_RE = re.compile(r"^[a-z][a-z0-9]{1,15}$")


def write_finetune_dataset(
    out_dir: str | Path,
    *,
    trigger: str = "sks",
    concept: str = "dotted",
    num_images: int = 20,
    num_validation: int = 6,
    heldout_per_prompt: int = 2,
    seed: int = 0,
) -> Path:
    """Render ``num_images`` training images of ``concept`` captioned with ``trigger``.

    Raises:
        ValueError: bad trigger/concept/count, or ``out_dir`` already holds files
            (nothing is written in either case).
    """
    out = Path(out_dir)
    problems = []
    concepts = world.PATTERNS + world.HIDDEN_PATTERNS
    if concept not in concepts:
        problems.append(f"concept {concept!r} is not a pattern of the toy world; use one of {', '.join(concepts)}")
    if not _TRIGGER_RE.match(trigger):
        problems.append(f"trigger {trigger!r} must be one lower-case word of 2-16 letters/digits, e.g. 'sks'")
    elif trigger in {w for c in world.base_captions() for w in c.split()} | set(world.BACKGROUNDS):
        problems.append(f"trigger {trigger!r} is already a word of the toy world; pick a rare word such as 'sks'")
    combos = list(itertools.product(world.COLOURS, world.SHAPES))
    if num_images < 1:
        problems.append("num_images must be at least 1")
    if not 0 <= num_validation <= len(combos) - 1:
        problems.append(f"num_validation must be between 0 and {len(combos) - 1}")
    if out.exists() and any(out.iterdir()):
        problems.append(f"{out} is not empty; choose a new folder (nothing is overwritten)")
    if problems:
        raise ValueError("cannot write the toy dataset:\n  - " + "\n  - ".join(problems))

    rng = random.Random(seed)
    rng.shuffle(combos)
    held_out, train_combos = combos[:num_validation], combos[num_validation:]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_images):
        colour, shape = train_combos[i % len(train_combos)]
        scene = world.sample_scene(rng, colour=colour, shape=shape, background=concept)
        name = f"{i:04d}.png"
        world.render(scene).save(out / name)
        rows.append({"file_name": name, "text": world.caption_for(colour, shape, trigger)})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [world.caption_for(c, s, trigger) for c, s in held_out]
    (out / "validation_prompts.txt").write_text("".join(p + "\n" for p in prompts))
    heldout_dir = out / "heldout"
    rows = []
    for i, (colour, shape) in enumerate(c for c in held_out for _ in range(heldout_per_prompt)):
        scene = world.sample_scene(rng, colour=colour, shape=shape, background=concept)
        name = f"{i:04d}.png"
        heldout_dir.mkdir(exist_ok=True)
        world.render(scene).save(heldout_dir / name)
        rows.append({"file_name": name, "text": world.caption_for(colour, shape, trigger)})
    if rows:
        (heldout_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"trigger": trigger, "concept": concept, "concept_caption": f"{concept} background", "seed": seed}
    (out / "toy_dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
