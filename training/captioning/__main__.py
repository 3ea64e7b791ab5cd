"""Caption a dataset folder's images that have no caption.

    lorafleet caption data/my-photos --trigger sks                      # BLIP for a hub base model
    lorafleet caption data/toy-new --trigger sks --dry-run              # the toy captioner for models/toy-sd
    python -m training.captioning data/toy-new --trigger sks --format sidecar --overwrite

Parse -> plan (which images, which file; nothing written) -> caption -> write (unless --dry-run) -> print.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from training.captioning import CaptionConfig, build_captioner
from training.captioning.folder import CaptionPlan, StalePlan, load_images, plan_captions, write_captions
from training.config import DataConfig
from training.configuration import ConfigError, validate_values


class _Args(BaseModel):  # problems are named as in a config file: caption.dtype
    caption: CaptionConfig
    data: DataConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafleet caption",
        description="Write a caption for every image of a dataset folder that has none, in a layout `lorafleet "
        "validate` reads. Existing captions are kept unless --overwrite.",
    )
    p.add_argument("path", help="the dataset folder")
    d = CaptionConfig.model_fields
    p.add_argument("--captioner", choices=("auto", "toy", "blip"), default="auto", help=d["captioner"].description)
    p.add_argument("--base-model", default=d["base_model"].default, help=d["base_model"].description)
    p.add_argument("--model", help=d["model"].description)
    p.add_argument("--trigger", help=d["trigger"].description)
    p.add_argument("--template", help=d["template"].description)
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help=d["batch_size"].description)
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"].default,
                   help=d["max_new_tokens"].description)  # fmt: skip
    p.add_argument("--device", default="auto", help=d["device"].description)
    p.add_argument("--dtype", default="auto", help=d["dtype"].description)
    p.add_argument("--format", choices=("auto", "metadata", "sidecar"), default="auto",
                   help="metadata: rows in metadata.jsonl; sidecar: a caption file next to each image; auto: the "
                   "folder's own layout (images only: metadata)")  # fmt: skip
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (data.caption_extension)")
    p.add_argument("--image-column", default="file_name", help="metadata.jsonl image key (data.image_column)")
    p.add_argument("--caption-column", default="text", help="metadata.jsonl caption key (data.caption_column)")
    p.add_argument("--overwrite", action="store_true", help="also re-caption images that have a caption")
    p.add_argument("--dry-run", action="store_true", help="caption and print, write nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _print(plan: CaptionPlan, rows: list[dict], written: list[Path], dry_run: bool, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"root": str(plan.root), "format": plan.format, "dry_run": dry_run, "captions": rows,
                          "kept": plan.kept, "written": [str(p) for p in written],
                          "problems": [vars(p) for p in plan.problems]}, indent=2))  # fmt: skip
        return
    for r in rows:
        was = f"   (was {r['was']!r})" if r["was"] is not None else ""
        print(f"  {r['file']}: {r['caption']}{was}")
    for p in plan.problems:
        print(f"  {p.severity:7s} {p.file}: {p.message}")
    if plan.errors:
        print(f"nothing written: {len(plan.errors)} error(s) above; fix them and run caption again")
        return
    verb = "would write" if dry_run else "wrote"
    where = "metadata.jsonl" if plan.format == "metadata" else f"{plan.data.caption_extension} caption files"
    kept = f"; {len(plan.kept)} kept their caption (--overwrite to redo them)" if plan.kept else ""
    print(f"{verb} {len(rows)} captions to {where} in {plan.root}{kept}")


def main(argv: list[str] | None = None) -> int:
    """``lorafleet caption``; exit 0 done, 1 a problem in the folder (nothing written), 2 bad settings."""
    a = _parser().parse_args(argv)
    caption = {k: getattr(a, k) for k in ("captioner", "base_model", "model", "trigger", "template", "batch_size",
                                          "max_new_tokens", "device", "dtype")}  # fmt: skip
    data = {"path": a.path, "caption_extension": a.caption_extension, "image_column": a.image_column,
            "caption_column": a.caption_column}  # fmt: skip
    try:
        cfg = validate_values(_Args, {"caption": caption, "data": data}, source="lorafleet caption")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = plan_captions(a.path, a.format, a.overwrite, cfg.data)
    rows: list[dict] = []
    written: list[Path] = []
    if not plan.errors and plan.todo:
        try:
            captioner = build_captioner(cfg.caption)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        todo, images = load_images(plan)
        pairs = list(zip(todo, captioner.caption(images)))
        rows = [{"file": t.name, "caption": c, "was": t.old} for t, c in pairs]
        if not plan.errors and not a.dry_run:
            try:
                written = write_captions(plan, pairs)
            except StalePlan as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    _print(plan, rows, written, a.dry_run, a.json)
    return 1 if plan.errors else 0


if __name__ == "__main__":
    sys.exit(main())
