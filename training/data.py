"""Read and validate a fine-tuning dataset folder before anything is trained or written.

Three layouts, as users bring them:

- ``metadata.jsonl`` with one ``{"file_name": ..., "text": ...}`` per image (🤗 imagefolder,
  diffusers' ``train_text_to_image_lora.py``);
- ``.txt`` caption sidecars (``0001.png`` + ``0001.txt``, kohya-style);
- DreamBooth: images only, one ``instance_prompt`` containing the trigger word.

``validate_dataset`` opens every file once and returns a report listing every problem by
file; errors stop the job (``DatasetError``), warnings are logged. It only reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from training.buckets import Bucket, data_buckets, default_step, histogram, nearest_bucket
from training.captions import caption_words
from training.config import IMAGE_EXTENSIONS, DataConfig
from training.images import Decoded, ImageReadError, open_rgb
from training.remote import is_uri, local_copy

log = logging.getLogger(__name__)
Severity = Literal["error", "warning"]
_SKIP = {"metadata.jsonl", "validation_prompts.txt", "toy_dataset.json"}


@dataclass(frozen=True)
class Problem:
    file: str  # path relative to the dataset root ("." for the folder itself)
    severity: Severity
    message: str


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str  # exactly as trained (after reading, BOM/whitespace handling)
    sha256: str = ""  # of the image file's bytes
    repeats: int = 1  # times seen per epoch (kohya's ``<repeats>_<name>`` folders); 1 = once
    prior: bool = False  # a class (regularisation) image for DreamBooth prior preservation, not the concept
    conversions: tuple[str, ...] = ()  # what was done to the pixels on reading, e.g. "I;16 -> L (scaled 1/257)"

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

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def summary(self) -> str:
        lines = [f"dataset {self.root} ({self.format}): {len(self.examples)} usable images"]
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
        """sha256 over every usable (file name, image digest, caption): names this exact training set."""
        h = hashlib.sha256()
        for ex in self.examples:
            extra = (f"\0repeats={ex.repeats}" if ex.repeats != 1 else "") + ("\0prior" if ex.prior else "")
            h.update(f"{ex.path.name}\0{ex.sha256}\0{ex.caption}{extra}\n".encode())
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


def _read_text(path: Path) -> tuple[str | None, str | None]:
    try:
        return path.read_text(encoding="utf-8").strip(), None
    except UnicodeDecodeError:
        return None, "caption file is not UTF-8 text; re-save it as UTF-8"


def _metadata_captions(root: Path, report: DatasetReport) -> dict[str, str]:
    captions: dict[str, str] = {}
    for n, line in enumerate((root / "metadata.jsonl").read_bytes().splitlines(), start=1):
        where = f"metadata.jsonl:{n}"
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            report.problems.append(Problem(where, "error", "not UTF-8 text; re-save metadata.jsonl as UTF-8"))
            continue
        except json.JSONDecodeError:
            report.problems.append(Problem(where, "error", 'not a JSON object; write {"file_name": ..., "text": ...}'))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            report.problems.append(Problem(where, "error", "needs a string 'file_name' naming an image"))
            continue
        text = row.get("text")
        captions[row["file_name"]] = text.strip() if isinstance(text, str) else ""
    return captions


def _detect_format(root: Path, cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    if (root / "metadata.jsonl").is_file():
        return "metadata"
    if any(p.suffix == ".txt" and p.name not in _SKIP for p in root.iterdir()):
        return "sidecar"
    return "dreambooth"


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


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
    fmt = _detect_format(root, cfg)
    report = DatasetReport(root, fmt)
    if fmt == "metadata" and not (root / "metadata.jsonl").is_file():
        report.problems.append(Problem(".", "error", "data.format=metadata but there is no metadata.jsonl"))
        return report
    if fmt == "dreambooth":
        if not cfg.instance_prompt:
            msg = "no captions found: add metadata.jsonl or .txt sidecars, or set data.instance_prompt (DreamBooth)"
            report.problems.append(Problem(".", "error", msg))
            return report
        if cfg.trigger and cfg.trigger.lower() not in caption_words(cfg.instance_prompt):
            msg = f"data.instance_prompt {cfg.instance_prompt!r} lacks the trigger {cfg.trigger!r}; add it"
            report.problems.append(Problem(".", "error", msg))
    captions = _metadata_captions(root, report) if fmt == "metadata" else {}
    step = cfg.bucket_step or default_step(cfg.resolution)  # no model here: train.run resolves it first
    buckets = data_buckets(cfg, step)
    assigned: list[Bucket] = []

    seen: dict[str, str] = {}
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    for path in images[: cfg.max_images] if cfg.max_images else images:
        name = path.name
        row_caption = captions.pop(name, None)  # claimed even if the image is rejected below
        if path.is_symlink() and not _inside(root, path):
            report.problems.append(
                Problem(name, "error", "symlink pointing outside the dataset folder; copy the file in")
            )
            continue
        data = path.read_bytes()  # read once: decoded for the checks, hashed for duplicates
        why, bucket, decoded = _check_image(data, cfg, buckets)
        if why is not None:
            report.problems.append(Problem(name, "error", why))
            continue
        if fmt == "metadata":
            caption = row_caption
            if caption is None:
                report.problems.append(Problem(name, "error", "no row in metadata.jsonl; add one or remove the image"))
                continue
        elif fmt == "sidecar":
            sidecar = path.with_suffix(".txt")
            if not sidecar.is_file():
                report.problems.append(Problem(name, "error", f"missing caption file {sidecar.name}"))
                continue
            caption, why = _read_text(sidecar)
            if why:
                report.problems.append(Problem(sidecar.name, "error", why))
                continue
        else:
            caption = cfg.instance_prompt or ""
        if not caption:
            report.problems.append(Problem(name, "error", "empty caption; describe the image"))
            continue
        if cfg.trigger and fmt != "dreambooth" and cfg.trigger.lower() not in caption_words(caption):
            report.problems.append(Problem(name, "warning", f"caption lacks the trigger {cfg.trigger!r}"))
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            report.problems.append(Problem(name, "warning", f"exact duplicate of {seen[digest]}; it counts twice"))
        seen.setdefault(digest, name)
        if decoded.frames > 1:
            msg = f"animated ({decoded.frames} frames): only the first frame is trained on; export it as a still"
            report.problems.append(Problem(name, "warning", msg))
        report.examples.append(Example(path, caption, digest, conversions=decoded.conversions))
        assigned.append(bucket)

    report.buckets = histogram(assigned)
    report.bucket_rule = (
        f"data.resolution={cfg.resolution}, bucket step {step}{'' if cfg.bucket_step else ' (no model at hand)'}, "
        f"max aspect {cfg.max_aspect:g}"
        if cfg.buckets
        else f"data.buckets=false: {cfg.resolution}x{cfg.resolution} crops"
    )
    for orphan in captions:
        report.problems.append(Problem(orphan, "error", "listed in metadata.jsonl but the file is missing"))
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix.lower() not in (*IMAGE_EXTENSIONS, ".txt") and path.name not in _SKIP:
            report.problems.append(Problem(path.name, "warning", "not an image or caption; ignored"))
    if len(report.examples) < cfg.min_images:
        msg = f"only {len(report.examples)} usable images; data.min_images={cfg.min_images} — add images or lower it"
        report.problems.append(Problem(".", "error", msg))
    return report
