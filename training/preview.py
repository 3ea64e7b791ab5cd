"""What a dataset will be trained on: per-image rows for ``lorafleet validate --json`` and a preview folder.

The preview is a dataset debug view (what kohya's ``--debug_dataset`` shows): each usable image exactly as
training's ``load_image`` gives it to the VAE — mode conversions, EXIF orientation, transparency on
``data.background``, resized to cover its bucket and centre-cropped — saved as 8-bit PNG next to its caption::

    lorafleet validate data/my-dog --resolution 512 --preview preview/
    preview/0001.png  preview/0001.txt  ...  preview/index.html (every image with caption, bucket, conversions)
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from PIL import Image

from training.buckets import Bucket, assign_buckets, default_step, oriented_size
from training.config import DataConfig
from training.data import DatasetReport, Example
from training.layout import PREVIEW_MARK

GENERATOR = PREVIEW_MARK  # marks a folder this module wrote: a rerun may replace it, validation does not read it
_OURS = re.compile(r"\d{4,}\.(png|txt)|index\.html")


def _step(cfg: DataConfig) -> int:
    return cfg.bucket_step or default_step(cfg.resolution)  # as validate_dataset: no model at hand


def example_buckets(report: DatasetReport, cfg: DataConfig) -> list[Bucket]:
    """Each usable image's (width, height) bucket, by training's own ``assign_buckets``."""
    return assign_buckets([e.path for e in report.examples], cfg, _step(cfg))


def _name(ex: Example, root: Path) -> str:
    try:
        return ex.path.relative_to(root).as_posix()
    except ValueError:
        return str(ex.path)


def describe(report: DatasetReport, cfg: DataConfig) -> list[dict]:
    """One JSON-able row per usable image: file (relative to the root), caption exactly as trained, size
    [width, height] as viewers show it (EXIF orientation applied) and ``stored_size`` as in the file, Pillow mode,
    repeats, prior (class image), bucket "WxH", and the conversions applied."""
    rows = []
    for ex, (w, h) in zip(report.examples, example_buckets(report, cfg)):
        with Image.open(ex.path) as img:  # the header only
            size, stored, mode = list(oriented_size(img)), list(img.size), img.mode
        rows.append({
            "file": _name(ex, report.root), "caption": ex.caption, "size": size, "stored_size": stored, "mode": mode,
            "repeats": ex.repeats, "prior": ex.prior, "bucket": f"{w}x{h}", "conversions": list(ex.conversions),
        })  # fmt: skip
    return rows


def as_trained(ex: Example, bucket: Bucket, cfg: DataConfig) -> Image.Image:
    """``ex``'s pixels exactly as ``load_image`` feeds them to the VAE (centre crop, no flip), back in 8-bit RGB."""
    import torch  # here, not at the top: `validate --json` stays free of torch and diffusers

    from training.dataset import load_image

    t = load_image(ex.path, bucket, "center", background=cfg.background_rgb)  # (3, H, W) in [-1, 1]
    pixels = t.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")


def write_preview(report: DatasetReport, cfg: DataConfig, out: str | Path) -> list[Path]:
    """Write ``OUT/0001.png`` + ``OUT/0001.txt`` (caption as trained) per usable image and ``OUT/index.html``.

    ``out`` must be empty, missing, or a previous preview (whose files are replaced); anything else is refused, so
    no user file is overwritten. It must not lie inside the dataset folder: its PNG + caption pairs would be read
    as more training images (``training.layout`` also skips a folder holding a preview, with a warning).

    Returns:
        The image files written, in the report's order.

    Raises:
        FileExistsError: ``out`` is a file, or a folder holding other files; the message says what to do.
        ValueError: ``out`` is inside the dataset folder (``report.root``).
    """
    out = Path(out)
    if out.resolve().is_relative_to(report.root.resolve()):
        raise ValueError(f"--preview {out} is inside the dataset folder {report.root}: its images would become "
                         "training images; write the preview outside it")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--preview {out} is a file; give a folder to write the preview into")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "index.html").is_file() or GENERATOR not in (out / "index.html").read_text(errors="replace"):
            raise FileExistsError(
                f"--preview {out} is not empty and holds no earlier preview; give an empty or new folder"
            )
        for old in out.iterdir():
            if old.is_file() and _OURS.fullmatch(old.name):
                old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    width = max(4, len(str(len(report.examples))))
    for n, (ex, row) in enumerate(zip(report.examples, describe(report, cfg)), start=1):
        w, h = (int(v) for v in row["bucket"].split("x"))
        stem = f"{n:0{width}d}"
        as_trained(ex, (w, h), cfg).save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(ex.caption + "\n", encoding="utf-8")
        written.append(out / f"{stem}.png")
        rows.append((stem, row))
    (out / "index.html").write_text(_html(report, cfg, rows), encoding="utf-8")
    return written


def _html(report: DatasetReport, cfg: DataConfig, rows: list[tuple[str, dict]]) -> str:
    esc = html.escape
    note = (
        "data.crop=random: training crops at random inside the resized image; shown: the centre crop. "
        if cfg.crop == "random"
        else ""
    ) + ("data.random_flip: half the steps see the mirror image. " if cfg.random_flip else "")
    cells = []
    for stem, r in rows:
        extra = [f"{r['repeats']} repeats"] if r["repeats"] != 1 else []
        extra += ["class image (prior)"] if r["prior"] else []
        facts = f"{esc(r['file'])} · {r['size'][0]}x{r['size'][1]} {esc(r['mode'])} → bucket {r['bucket']}"
        conv = "".join(f"<li>{esc(c)}</li>" for c in r["conversions"])
        cells.append(
            f'<figure><img src="{stem}.png" alt="{esc(r["caption"])}"><figcaption><b>{esc(r["caption"])}</b>'
            f"<br><small>{facts}{' · ' + esc(', '.join(extra)) if extra else ''}</small>"
            f"{f'<ul>{conv}</ul>' if conv else ''}</figcaption></figure>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}">
<title>preview of {esc(str(report.root))}</title>
<style>body{{font-family:sans-serif}} figure{{display:inline-block;vertical-align:top;width:260px;margin:6px}}
img{{image-rendering:pixelated;max-width:256px;max-height:256px;border:1px solid #ccc}}
ul{{margin:2px;padding-left:16px}}
</style></head><body>
<h1>{len(rows)} images as the model sees them</h1>
<p>{esc(str(report.root))} ({esc(report.format)}), {esc(report.bucket_rule)}. Each image is decoded, converted to
RGB, resized to cover its bucket and centre-cropped, exactly as training feeds it to the VAE; the caption is the text
trained with it. {esc(note)}</p>
{chr(10).join(cells)}
</body></html>
"""
