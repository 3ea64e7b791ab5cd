"""Read and validate a fine-tuning dataset folder before anything is trained or written.

The layouts users bring (``metadata.jsonl``, kohya ``<repeats>_<name>`` folders, caption files next to the
images, DreamBooth's one ``instance_prompt``) are found by ``training.layout``; class images for prior
preservation (``data.class_data_dir``, in any of them) are read by ``training.training_set`` with this same
function, after the trigger and the held-out split are settled. ``validate_dataset`` opens every image once and
returns a report listing every problem by file; errors stop the job (``DatasetError``), warnings are logged. It
only reads. Every reader of the dataset (training, held-out split, evaluation, the pipeline) uses the report's
``examples``, so they all see the same images with the same captions.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from training.buckets import Bucket, data_buckets, default_step, histogram, nearest_bucket
from training.captions import caption_words
from training.config import DataConfig
from training.images import Decoded, ImageReadError, open_rgb
from training.layout import DatasetFileError, Problem, find_layout, read_dataset_file
from training.remote import is_uri, local_copy

log = logging.getLogger(__name__)
__all__ = ["DatasetError", "DatasetReport", "Example", "Problem", "validate_dataset"]


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str  # exactly as trained (after reading, BOM/whitespace handling)
    sha256: str = ""  # of the image file's bytes
    repeats: int = 1  # times seen per epoch (kohya's ``<repeats>_<name>`` folders); 1 = once
    prior: bool = False  # a class (regularisation) image for DreamBooth prior preservation, not the concept
    conversions: tuple[str, ...] = ()  # done to the pixels on reading, e.g. "RGBA composited on white (255, 255, 255)"

    def to_row(self) -> dict:
        """JSON-able form (``WorkerSpec`` hands it to Ray workers); ``from_row`` reads it back."""
        row = {"path": str(self.path), "caption": self.caption, "sha256": self.sha256}
        if self.repeats != 1:
            row["repeats"] = self.repeats
        if self.prior:
            row["prior"] = True
        if self.conversions:
            row["conversions"] = list(self.conversions)
        return row

    @classmethod
    def from_row(cls, row: dict | list, path: Path | None = None) -> Example:
        """Inverse of ``to_row`` (also reads the older ``[path, caption, sha256]`` triples); ``path`` overrides."""
        if isinstance(row, list):
            row = dict(zip(("path", "caption", "sha256"), row, strict=False))
        return cls(
            path if path is not None else Path(row["path"]),
            row["caption"],
            row.get("sha256", ""),
            int(row.get("repeats", 1)),
            bool(row.get("prior", False)),
            tuple(row.get("conversions", ())),
        )


@dataclass
class DatasetReport:
    root: Path
    format: str
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)  # usable images per bucket "WxH" (training's crop sizes)
    bucket_rule: str = ""  # how the buckets were made, e.g. "data.resolution=64, bucket step 16, max aspect 2"
    groups: dict[str, tuple[int, int]] = field(default_factory=dict)  # kohya folder -> (usable images, repeats)

    @property
    def instances(self) -> list[Example]:
        """The concept's examples (captions with the trigger); ``examples`` also holds class images (``prior``)."""
        return [e for e in self.examples if not e.prior]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def summary(self) -> str:
        lines = [f"dataset {self.root} ({self.format}): {len(self.instances)} usable images"]
        if priors := len(self.examples) - len(self.instances):
            lines[0] += f" + {priors} class images (prior preservation)"
        lines += [f"  {g}: {n} images × {r} repeats" for g, (n, r) in self.groups.items()]
        if self.buckets:
            counts = ", ".join(f"{b}: {n}" for b, n in self.buckets.items())
            lines.append(f"  buckets ({self.bucket_rule}): {counts}")
        lines += [f"  {p.severity:7s} {p.file}: {p.message}" for p in self.problems]
        lines += [  # what was done to each file's pixels (training.images.open_rgb), so no conversion is silent
            f"  convert {_relative(ex.path, self.root)}: {'; '.join(ex.conversions)}"
            for ex in self.examples
            if ex.conversions
        ]
        return "\n".join(lines)

    def fingerprint(self) -> str:
        """sha256 over every usable (path inside the dataset, image digest, caption, repeats, prior, pixel
        conversions): names this exact training set (a flat folder of RGB images hashes as it always did)."""
        h = hashlib.sha256()
        for ex in self.examples:
            extra = (f"\0repeats={ex.repeats}" if ex.repeats != 1 else "") + ("\0prior" if ex.prior else "")
            extra += f"\0{'; '.join(ex.conversions)}" if ex.conversions else ""  # e.g. the data.background used
            try:
                name = ex.path.relative_to(self.root).as_posix()
            except ValueError:  # a class image outside the dataset folder
                name = ex.path.name
            h.update(f"{name}\0{ex.sha256}\0{ex.caption}{extra}\n".encode())
        return h.hexdigest()

    def raise_if_errors(self) -> None:
        """Log warnings; raise ``DatasetError`` listing every error (nothing has been written)."""
        for p in self.warnings:
            log.warning("%s: %s", p.file, p.message)
        if self.errors:
            raise DatasetError(self)


def _relative(path: Path, root: Path) -> str:
    """``path`` as the report names files: relative to the dataset root where it lies inside it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


class DatasetError(ValueError):
    def __init__(self, report: DatasetReport):
        self.report = report
        n = len(report.errors)
        super().__init__(f"{n} problem{'s' * (n != 1)} in the dataset; fix them and rerun:\n{report.summary()}")


def _check_image(
    data: bytes, cfg: DataConfig, buckets: list[Bucket]
) -> tuple[str | None, Bucket | None, Decoded | None]:
    """(why these image bytes cannot be trained on or None, the image's bucket, the decoded image). Decodes the
    whole image as training will (``training.images.open_rgb``: catches truncation, records the conversions). Too
    small: the short side is below its bucket's short side (without buckets: data.resolution)."""
    try:
        decoded = open_rgb(data, cfg.background_rgb, cfg.max_pixels)
    except ImageReadError as exc:
        return str(exc), None, None
    width, height = decoded.image.size  # as displayed (EXIF orientation applied)
    bucket = nearest_bucket((width, height), buckets)
    short, need = min(width, height), min(bucket)
    if short >= need:
        return None, bucket, decoded
    fix = "use a larger image or lower data.resolution"
    if not cfg.buckets:
        why = f"{width}x{height}: short side {short} px is below data.resolution={cfg.resolution}; {fix}"
        return why, bucket, decoded
    return (
        (
            f"{width}x{height}: short side {short} px is below {need} px, the short side of its bucket "
            f"{bucket[0]}x{bucket[1]} for data.resolution={cfg.resolution}; {fix}"
        ),
        bucket,
        decoded,
    )


_CONTROL_NAMES = {"\x1b": "ESC, a terminal escape", "\x07": "BEL", "\u200b": "ZERO WIDTH SPACE",
                  "\u202e": "RIGHT-TO-LEFT OVERRIDE", "\ufeff": "BYTE ORDER MARK"}  # fmt: skip


def invisible_characters(caption: str) -> list[str]:
    """Where ``caption`` holds characters a viewer does not show but the tokenizer reads: control (Unicode
    category Cc, tab excepted), format (Cf: zero-width space U+200B, RTL override U+202E, BOM U+FEFF…), private
    use (Co) and unassigned (Cn) code points — e.g. ``["U+200B (ZERO WIDTH SPACE) at character 13"]``.
    They split a trigger into other tokens (``s\u200bks`` is not ``sks``) while the caption looks right."""
    found = []
    for i, ch in enumerate(caption, start=1):
        if ch != "\t" and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cn"):
            name = _CONTROL_NAMES.get(ch) or unicodedata.name(ch, unicodedata.category(ch))
            found.append(f"U+{ord(ch):04X} ({name}) at character {i}")
    return found


def kept_fraction(size: tuple[int, int], bucket: Bucket) -> float:
    """The share of an image of ``size`` (w, h) that training keeps: it is resized to cover ``bucket`` and
    cropped to it (``training.dataset.load_image``), so ``bucket area / resized area``, in (0, 1]."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return bucket[0] * bucket[1] / (max(bucket[0], size[0] * scale) * max(bucket[1], size[1] * scale))


def validate_dataset(cfg: DataConfig) -> DatasetReport:
    """Check every file of the dataset folder; see the module docstring."""
    if is_uri(cfg.path):
        try:
            root = local_copy(cfg.path)  # this node's mirror; Train workers make their own from the URI
        except (OSError, ValueError) as exc:
            report = DatasetReport(Path(cfg.path), cfg.format)
            report.problems.append(Problem(".", "error", f"data.path {cfg.path}: {exc}"))
            return report
    else:
        root = Path(cfg.path).expanduser()
    if not root.is_dir():
        report = DatasetReport(root, cfg.format)
        msg = f"data.path {root} is not a folder; point it at your images"
        if not root.is_absolute():
            msg += (
                f" (relative to {Path.cwd()}; `ray job submit --working-dir .` does not upload git-ignored "
                "folders such as data/: pass an absolute path or shared storage)"
            )
        report.problems.append(Problem(".", "error", msg))
        return report
    class_root = Path(cfg.class_data_dir).expanduser() if cfg.class_data_dir else None  # may sit inside root
    layout = find_layout(root, cfg, skip=(class_root,) if class_root else ())
    fmt = layout.format
    report = DatasetReport(root, fmt, problems=layout.problems)
    prompt = cfg.instance_prompt
    if fmt == "dreambooth" and cfg.trigger and prompt and cfg.trigger.lower() not in caption_words(prompt):
        msg = f"data.instance_prompt {prompt!r} lacks the trigger {cfg.trigger!r}; add it"
        report.problems.append(Problem(".", "error", msg))
    step = cfg.bucket_step or default_step(cfg.resolution)  # no model here: train.run resolves it first
    buckets = data_buckets(cfg, step)
    assigned: list[Bucket] = []
    seen: dict[str, str] = {}
    candidates = layout.candidates[: cfg.max_images] if cfg.max_images else layout.candidates
    for cand in candidates:
        path, name = cand.path, cand.name
        try:  # one rule for every dataset file: no link out of the folder, no FIFO, no OSError escapes
            data = read_dataset_file(root, path)  # read once: decoded for the checks, hashed for duplicates
        except DatasetFileError as exc:
            report.problems.append(Problem(name, "error", str(exc)))
            continue
        why, bucket, decoded = _check_image(data, cfg, buckets)
        if why is not None:
            report.problems.append(Problem(name, "error", why))
            continue
        caption = cand.caption
        if caption is None:
            if cand.why:  # "" = a problem names it already (its caption file, its metadata row)
                report.problems.append(Problem(name, "error", cand.why))
            continue
        if not caption:
            report.problems.append(Problem(name, "error", "empty caption; describe the image"))
            continue
        if hidden := invisible_characters(caption):
            msg = f"caption has invisible characters the tokenizer reads: {', '.join(hidden[:5])}; delete them"
            report.problems.append(Problem(name, "warning", msg))
        kept = kept_fraction(decoded.image.size, bucket)
        if kept < 0.5:
            w, h = decoded.image.size
            fix = "raise data.max_aspect (at most 8) or crop it yourself" if cfg.buckets else "set data.buckets=true"
            report.problems.append(Problem(name, "warning", f"{w}x{h} is cropped to bucket {bucket[0]}x{bucket[1]}: "
                                           f"training sees {kept:.0%} of it (data.max_aspect={cfg.max_aspect:g}); "
                                           f"{fix}"))  # fmt: skip
        if cfg.trigger and fmt != "dreambooth" and not cand.prior and cfg.trigger.lower() not in caption_words(caption):
            report.problems.append(Problem(name, "warning", f"caption lacks the trigger {cfg.trigger!r}"))
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            report.problems.append(Problem(name, "warning", f"exact duplicate of {seen[digest]}; it counts twice"))
        seen.setdefault(digest, name)
        if decoded.frames > 1:
            msg = f"animated ({decoded.frames} frames): only the first frame is trained on; export it as a still"
            report.problems.append(Problem(name, "warning", msg))
        report.examples.append(Example(path, caption, digest, cand.repeats, cand.prior, decoded.conversions))
        if cand.group:
            count, repeats = report.groups.get(cand.group, (0, cand.repeats))
            report.groups[cand.group] = (count + 1, repeats)
        assigned.append(bucket)

    report.buckets = histogram(assigned)
    report.bucket_rule = (
        f"data.resolution={cfg.resolution}, bucket step {step}{'' if cfg.bucket_step else ' (no model at hand)'}, "
        f"max aspect {cfg.max_aspect:g}"
        if cfg.buckets
        else f"data.buckets=false: {cfg.resolution}x{cfg.resolution} crops"
    )
    instances = len(report.instances)
    if instances < cfg.min_images and not layout.fatal:
        msg = f"only {instances} usable images; data.min_images={cfg.min_images} — add images or lower it"
        report.problems.append(Problem(".", "error", msg))
    return report
