"""Write captions into a dataset folder, in a layout ``training.layout`` reads, never losing a caption.

- ``metadata``: rows ``{"file_name": ..., "text": ...}`` appended to ``metadata.jsonl`` (created if absent); every
  other line is kept byte for byte, a replaced row keeps its other keys;
- ``sidecar``: a caption file (``a.png`` -> ``a.txt``) next to each image, in kohya ``<repeats>_<name>`` folders too.

``auto`` keeps the folder's own layout (metadata.jsonl -> metadata; caption files or kohya folders -> sidecar;
images only -> metadata). An image with a caption keeps it unless ``overwrite``; an empty caption (the validator's
error) is replaced. A layout that would hide the folder's captions (metadata.jsonl next to caption files, or caption
files next to metadata.jsonl) is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from training.config import DataConfig
from training.images import ImageReadError, open_rgb
from training.layout import DatasetFileError, Layout, Problem, find_layout, read_dataset_file, read_metadata
from training.textfile import split_lines

Format = Literal["auto", "metadata", "sidecar"]


class StalePlan(RuntimeError):
    """A file the plan read changed before the captions were written; nothing of that file was written."""


@dataclass(frozen=True)
class Todo:
    """An image to caption, and where its caption goes."""

    path: Path
    name: str  # posix path inside the dataset, as the validator names it
    old: str | None  # the caption it replaces (None: it had none)
    line: int | None = None  # metadata: the row replaced (1-based); None = a new row
    target: Path | None = None  # sidecar: the caption file to write
    replace: bool = False  # sidecar: ``target`` exists (only then is it opened for rewriting)


@dataclass
class CaptionPlan:
    """What ``plan_captions`` found: images to caption, images that keep their caption, and problems."""

    root: Path
    format: Literal["metadata", "sidecar"]
    data: DataConfig
    todo: list[Todo] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # names of images that keep their caption
    problems: list[Problem] = field(default_factory=list)  # errors refuse the whole plan; warnings are notes
    metadata_sha256: str | None = None  # metadata.jsonl's bytes when planned (None: absent): line numbers refer to them

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def _caption_files(images: list[Path], extension: str) -> dict[tuple[Path, str], Path]:
    """{(folder, stem case-folded): caption file} in the folders of ``images``: an image's caption file may differ
    in letter case (``A.PNG`` + ``a.txt``), as the validator matches them."""
    found: dict[tuple[Path, str], Path] = {}
    for folder in {p.parent for p in images}:
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() == extension.lower() and p.is_file():
                found.setdefault((folder, p.stem.casefold()), p)
    return found


def _target_format(layout: Layout, fmt: Format, root: Path, data: DataConfig) -> tuple[str, str | None]:
    """(the format to write, why it cannot be written or None)."""
    found = layout.format
    if fmt == "auto":
        return ("sidecar" if found in ("sidecar", "kohya") else "metadata"), None
    if fmt == "metadata" and found in ("sidecar", "kohya"):
        what = "kohya <repeats>_<name> folders" if found == "kohya" else f"caption files ({data.caption_extension})"
        return fmt, f"the folder's captions are {what}; a metadata.jsonl would hide them: use --format sidecar"
    if fmt == "sidecar" and found == "metadata":
        return fmt, "metadata.jsonl holds this folder's captions (read before caption files): use --format metadata"
    return fmt, None


def plan_captions(root: str | Path, fmt: Format = "auto", overwrite: bool = False,
                  data: DataConfig | None = None) -> CaptionPlan:  # fmt: skip
    """Which images of the dataset folder ``root`` get a caption, and where it is written. Reads only.

    Args:
        root: the dataset folder.
        fmt: metadata, sidecar, or auto (the folder's own layout; see the module docstring).
        overwrite: also re-caption images that have a caption.
        data: ``image_column``, ``caption_column``, ``caption_extension`` are read (default: ``DataConfig``'s).

    Returns:
        A ``CaptionPlan``; when it has errors nothing may be written (``write_captions`` refuses).
    """
    root = Path(root).expanduser()
    data = (data or DataConfig(path=str(root))).model_copy(update={"path": str(root), "format": "auto"})
    if not root.is_dir():
        plan = CaptionPlan(root, "metadata", data)
        plan.problems.append(Problem(".", "error", f"{root} is not a folder; point the command at your images"))
        return plan
    layout = find_layout(root, data)
    target, why = _target_format(layout, fmt, root, data)
    plan = CaptionPlan(root, target, data)  # type: ignore[arg-type]
    if why:
        plan.problems.append(Problem(".", "error", why))
        return plan
    if layout.format == "dreambooth":  # images only: list them as caption-less
        layout = find_layout(root, data.model_copy(update={"format": "sidecar"}))
    if layout.fatal and layout.format == "metadata":
        plan.problems += [p for p in layout.problems if p.severity == "error"]
        return plan
    if not layout.candidates:
        plan.problems.append(Problem(".", "error", "no images in the folder or its sub-folders; nothing to caption"))
        return plan
    rows: dict[str, tuple[int, str | None]] = {}
    if layout.format == "metadata":
        rows = read_metadata(root, data, Layout("metadata"))
    plan.metadata_sha256 = _sha256(root / "metadata.jsonl")
    folded = {k.casefold(): k for k in rows}
    sidecars = (
        _caption_files([c.path for c in layout.candidates], data.caption_extension) if target == "sidecar" else {}
    )
    for cand in layout.candidates:
        if cand.prior:
            continue
        old = cand.caption
        if old and not overwrite:
            plan.kept.append(cand.name)
            continue
        if old is None and cand.why == "" and not overwrite:  # its caption file or row is unreadable: named below
            plan.problems.append(Problem(cand.name, "warning", "its caption cannot be read (`lorafleet validate` "
                                         "says why); kept: fix it, or pass --overwrite to replace it"))  # fmt: skip
            plan.kept.append(cand.name)
            continue
        if target == "metadata":
            key = cand.name if cand.name in rows else folded.get(cand.name.casefold())
            line = rows[key][0] if key is not None else None
            plan.todo.append(Todo(cand.path, cand.name, old, line=line))
        else:
            file = sidecars.get((cand.path.parent, cand.path.stem.casefold()))
            target_file = file or cand.path.with_suffix(data.caption_extension)
            plan.todo.append(Todo(cand.path, cand.name, old, target=target_file, replace=file is not None))
    _check_targets(plan)
    return plan


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _check_targets(plan: CaptionPlan) -> None:
    """Errors for what ``write_captions`` could only do halfway: two images whose caption would go to one file
    (``a.png`` and ``a.jpg``), and files or folders the user made read-only."""
    if plan.format == "metadata":
        files = [plan.root / "metadata.jsonl"] if plan.todo else []
    else:
        by_target: dict[Path, list[str]] = {}
        for item in plan.todo:
            by_target.setdefault(item.target, []).append(item.name)  # type: ignore[arg-type]
        for target, names in by_target.items():
            if len(names) > 1:
                plan.problems.append(Problem(names[0], "error", f"{' and '.join(names)} would share the caption file "
                                             f"{target.name}; rename one image so each has its own"))  # fmt: skip
        files = list(by_target)
    for path in files:
        if path.exists() and not os.access(path, os.W_OK):
            plan.problems.append(Problem(_rel(path, plan.root), "error", "read-only: make it writable (chmod u+w) "
                                         "to write captions into it"))  # fmt: skip
        elif not os.access(path.parent, os.W_OK):
            plan.problems.append(Problem(_rel(path.parent, plan.root), "error", "a read-only folder: make it "
                                         "writable (chmod u+w) to write captions into it"))  # fmt: skip


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else "."


def load_images(plan: CaptionPlan) -> tuple[list[Todo], list[Image.Image]]:
    """The plan's images decoded as training decodes them (``open_rgb``: EXIF orientation, alpha on
    ``data.background``); an unreadable one becomes an error of the plan and is left out."""
    todo, images = [], []
    for item in plan.todo:
        try:
            raw = read_dataset_file(plan.root, item.path)
            images.append(open_rgb(raw, plan.data.background_rgb, plan.data.max_pixels).image)
            todo.append(item)
        except (DatasetFileError, ImageReadError) as exc:
            plan.problems.append(Problem(item.name, "error", f"not captioned: {exc}"))
    return todo, images


def _write_atomic(path: Path, data: bytes, replace: bool) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file in the same folder, fsynced, then renamed over
    ``path`` keeping its permission bits (``replace``), or linked to it (new: ``os.link`` refuses an existing file,
    so one written meanwhile is never replaced; the mode is 0666 less the umask, as ``open`` makes it).

    Raises:
        FileExistsError: not ``replace`` and ``path`` exists.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_captions(plan: CaptionPlan, captions: list[tuple[Todo, str]]) -> list[Path]:
    """Write ``captions`` (each ``Todo`` of ``plan`` with its new caption); returns the files written.

    Every file is written whole or not at all (``_write_atomic``), keeping its permission bits. metadata.jsonl is
    rewritten keeping every other line as it was, and only if it is still what the plan read (its line numbers
    refer to those bytes); a new caption file is created exclusively, so one written meanwhile is never replaced.

    Raises:
        ValueError: the plan has errors (nothing is written).
        StalePlan: metadata.jsonl changed since the plan was made (nothing is written), or a caption file appeared
            (the files before it are written).
    """
    if plan.errors:
        raise ValueError(f"{len(plan.errors)} problem(s) in {plan.root}; nothing written")
    if not captions:
        return []
    if plan.format == "sidecar":
        written = []
        for item, text in captions:
            try:
                _write_atomic(item.target, f"{text}\n".encode(), item.replace)  # type: ignore[arg-type]
            except FileExistsError:
                raise StalePlan(f"{item.target} appeared while captioning; it is kept: run caption again") from None
            written.append(item.target)
        return written
    path = plan.root / "metadata.jsonl"
    if _sha256(path) != plan.metadata_sha256:
        raise StalePlan(f"{path} changed while captioning (its rows may have moved); nothing written: run caption "
                        "again")  # fmt: skip
    lines = split_lines(read_dataset_file(plan.root, path)) if path.exists() else []
    img_col, cap_col = plan.data.image_column, plan.data.caption_column
    for item, text in captions:
        if item.line is None:
            lines.append(json.dumps({img_col: item.name, cap_col: text}, ensure_ascii=False).encode())
            continue
        row = json.loads(lines[item.line - 1])
        row[cap_col] = text
        lines[item.line - 1] = json.dumps(row, ensure_ascii=False).encode()
    _write_atomic(path, b"".join(line + b"\n" for line in lines), replace=plan.metadata_sha256 is not None)
    return [path]
