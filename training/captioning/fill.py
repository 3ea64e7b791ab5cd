"""Caption the images of a dataset folder that have no caption, in place: what the pipeline's ``caption`` stage
(and so every fine-tuning job on an upload without captions) runs.

    rows = fill_missing_captions("data/my-photos", CaptionConfig(base_model="models/toy-sd", trigger="sks"))
    rows[0]   # {'file': '0000.png', 'caption': 'a red circle on a sks background'}

The same steps as ``lorafleet caption DIR`` (``training.captioning.__main__``): plan (which images, which file),
load the captioner only when there is something to caption, caption, write in the folder's own layout (images
only: ``metadata.jsonl``). Images that have a caption keep it. Files are replaced, never written in place
(``folder.write_captions``), so a folder of hard links to another (a job's copy of an upload) leaves the other as
it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.captioning import CaptionConfig, build_captioner
from training.captioning.folder import load_images, plan_captions, write_captions


class CaptionError(ValueError):
    """The folder cannot be captioned (its problems, by file, are in the message); nothing was written."""


@dataclass
class Filled:
    """What ``fill_missing_captions`` did."""

    captions: list[dict[str, str]] = field(default_factory=list)  # {"file", "caption"} per image captioned, in order
    kept: int = 0  # images that had a caption
    format: str = "metadata"  # where the captions went: metadata (metadata.jsonl) or sidecar (caption files)


def fill_missing_captions(root: str | Path, cfg: CaptionConfig) -> Filled:
    """Caption every image of ``root`` without a caption with the captioner ``cfg`` names; returns what it did.

    Raises:
        CaptionError: the folder has a problem (no images, unreadable image, read-only file); nothing written.
        FileNotFoundError / ValueError: the captioner cannot be loaded (``build_captioner``); nothing written.
        training.captioning.folder.StalePlan: the folder changed while captioning.
    """
    plan = plan_captions(root)
    if not plan.errors and not plan.todo:
        return Filled(kept=len(plan.kept), format=plan.format)
    todo, images = load_images(plan) if not plan.errors else ([], [])
    if plan.errors:
        raise CaptionError("\n  - ".join([f"cannot caption {root}:", *(f"{p.file}: {p.message}" for p in plan.errors)]))
    pairs = list(zip(todo, build_captioner(cfg).caption(images)))
    write_captions(plan, pairs)
    return Filled([{"file": t.name, "caption": text} for t, text in pairs], len(plan.kept), plan.format)
