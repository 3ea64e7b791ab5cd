"""Where a dataset folder's images and their captions are, in the layouts users bring.

- ``metadata``: ``metadata.jsonl``, one ``{"file_name": "sub/a.png", "text": "..."}`` per image (🤗 imagefolder,
  diffusers' ``--image_column`` / ``--caption_column``, here ``data.image_column`` / ``data.caption_column``);
- ``kohya``: sub-folders named ``<repeats>_<name>`` (kohya-ss/sd-scripts' DreamBooth method, e.g.
  ``10_sks dog/``): each image is seen ``repeats`` times per epoch; its caption is its caption file's first line,
  else the folder's ``<name>`` (sd-scripts' ``class_tokens``);
- ``sidecar``: a caption file next to each image (``a.png`` + ``a.txt``), in the folder or its sub-folders;
- ``dreambooth``: images only, one ``instance_prompt`` for all.

File names and extensions match in any letter case (``A.JPG`` + ``a.TXT``, as on Windows and macOS); hidden
files and folders, ``heldout/`` (the held-out images ``cluster.pipeline`` finds there) and ``__MACOSX/`` are not
part of the training set. Text is read by ``training.textfile`` (BOM, CRLF/CR, whitespace). This module only
reads; ``training.data.validate_dataset`` decodes the images and builds the report.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from training.config import IMAGE_EXTENSIONS, DataConfig
from training.textfile import TextFileError, check_encoding, decode_line, decode_text, split_lines

Severity = Literal["error", "warning"]
SKIP_FILES = frozenset({"metadata.jsonl", "validation_prompts.txt", "toy_dataset.json"})
SKIP_DIRS = frozenset({"heldout", "__macosx"})  # compared case-folded
_DRIVE = re.compile(r"^[A-Za-z]:")
PREVIEW_MARK = "lorafleet validate --preview"  # in index.html of a folder ``training.preview`` wrote
MAX_CAPTION_BYTES = 64 * 1024  # a caption file larger than this is not a caption (SD reads 77 tokens, ~300 bytes)
# Upper bound of a kohya folder's repeats: an epoch draws images × repeats samples, and sd-scripts users set 1-100
# (its docs: 10-20 for ~20 images). 1000 × 100 images is 100 000 samples per epoch already; above it is a typo.
MAX_REPEATS = 1000


class DatasetFileError(ValueError):
    """A dataset file that cannot be read; the message (without the file name) says why and what to do."""


def read_dataset_file(root: Path, path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path``, a file of the dataset folder ``root``, by one rule for every file (images, caption
    files, ``metadata.jsonl``): a symlink must resolve to a file inside ``root``; only regular files are read (a
    FIFO would block, a folder named ``x.png`` is not an image); no ``OSError`` escapes.

    Args:
        root: the dataset folder (``data.path`` or ``data.class_data_dir``).
        path: the file, under ``root``.
        max_bytes: refuse a larger file (captions: ``MAX_CAPTION_BYTES``); None = no limit.

    Raises:
        DatasetFileError: broken or outside symlink, not a regular file, unreadable (permission, I/O), too large;
            the message says what to do.
    """
    try:
        if path.is_symlink():
            target = os.readlink(path)
            if not path.exists():
                raise DatasetFileError(f"broken symlink -> {target}; remove it or restore its target")
            try:
                path.resolve().relative_to(root.resolve())
            except ValueError:
                raise DatasetFileError(
                    f"symlink pointing outside the dataset folder (-> {target}); copy the file in"
                ) from None
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else (
                "a socket or device")  # fmt: skip
            raise DatasetFileError(f"is {kind}, not a file; rename or remove it")
        if max_bytes is not None and info.st_size > max_bytes:
            raise DatasetFileError(
                f"{info.st_size} bytes, more than {max_bytes // 1024} KiB: not a caption; write one short line"
            )
        return path.read_bytes()
    except DatasetFileError:
        raise
    except OSError as exc:
        raise DatasetFileError(f"cannot be read ({exc.strerror or exc}); fix its permissions or remove it") from None


def is_preview(folder: Path) -> bool:
    """Whether ``folder`` holds a preview ``lorafleet validate --preview`` wrote (its index.html carries the mark)."""
    index = folder / "index.html"
    try:
        return index.is_file() and PREVIEW_MARK in index.read_text(encoding="utf-8", errors="replace")[:2048]
    except OSError:
        return False


@dataclass(frozen=True)
class Problem:
    file: str  # path relative to the dataset root, posix ("." for the folder itself)
    severity: Severity
    message: str


@dataclass(frozen=True)
class Candidate:
    """An image file of the dataset and the caption it would be trained with."""

    path: Path
    name: str  # posix path relative to the folder scanned, as problems name it
    caption: str | None  # None: no usable caption (``why`` says why, or a problem names it already)
    why: str | None = None  # the caption problem, reported only if the image itself reads
    repeats: int = 1
    group: str = ""  # the kohya folder the image is in
    prior: bool = False  # a class image (``data.class_data_dir``)


@dataclass
class Layout:
    """What ``find_layout`` found: the format, every image with its caption, and the problems met on the way."""

    format: str
    candidates: list[Candidate] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    fatal: bool = False  # captions cannot be read at all (one error says why; images get no caption errors)

    def error(self, file: str, message: str) -> None:
        self.problems.append(Problem(file, "error", message))

    def warn(self, file: str, message: str) -> None:
        self.problems.append(Problem(file, "warning", message))


def kohya_folder(name: str) -> tuple[int, str] | None:
    """``(repeats, caption)`` of a kohya ``<repeats>_<name>`` folder name (``"10_sks dog"`` → ``(10, "sks dog")``),
    split as sd-scripts' ``extract_dreambooth_params`` does (on ``_``; the rest re-joined with ``_``); None for
    any other name."""
    head, sep, rest = name.partition("_")
    if not sep or not re.fullmatch(r"[0-9]+", head):
        return None
    return int(head), rest.strip()


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_caption(path: Path, cfg: DataConfig) -> bool:
    return path.suffix.lower() == cfg.caption_extension.lower() and path.name not in SKIP_FILES


def _walk(root: Path, layout: Layout, skip: set[Path]) -> list[Path]:
    """Every file under ``root`` (sorted by relative path), not entering skipped folders; symlinked folders
    are not followed and earlier previews (``is_preview``) are not read (a warning names them); a folder that
    cannot be listed is an error naming it."""
    files: list[Path] = []

    def unreadable(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else root
        rel = where.relative_to(root).as_posix() if where != root else "."
        layout.error(f"{rel}/", f"cannot list this folder ({exc.strerror or exc}); fix its permissions or remove it")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            sub = here / d
            if d.startswith(".") or d.casefold() in SKIP_DIRS or sub.resolve() in skip:
                continue
            rel = sub.relative_to(root).as_posix()
            if sub.is_symlink():
                layout.warn(f"{rel}/", "symlinked folder, not followed; copy its files into the dataset folder")
                continue
            if is_preview(sub):
                layout.warn(f"{rel}/", "a `lorafleet validate --preview` folder, not read (its images are copies); "
                            "move it out of the dataset folder")  # fmt: skip
                continue
            keep.append(d)
        dirnames[:] = keep
        files += [here / f for f in filenames if not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def detect_format(root: Path, cfg: DataConfig, files: list[Path]) -> str:
    """``cfg.format``, or for ``auto``: metadata.jsonl → kohya folders → caption files → dreambooth."""
    if cfg.format != "auto":
        return cfg.format
    if os.path.lexists(root / "metadata.jsonl"):  # a broken link too: read_metadata names it
        return "metadata"
    if any(kohya_folder(p.relative_to(root).parts[0]) for p in files if len(p.relative_to(root).parts) > 1):
        return "kohya"
    if any(_is_caption(p, cfg) for p in files):
        return "sidecar"
    return "dreambooth"


def read_caption_file(root: Path, path: Path, name: str, layout: Layout) -> str | None:
    """The caption in a caption file: its first non-blank line, stripped (sd-scripts reads the first line; a blank
    first line is warned about, as kohya would train an empty caption); further lines are ignored with a warning.
    None if the file cannot be read (``read_dataset_file``) or is not UTF-8 (an error names it)."""
    try:
        text = decode_text(read_dataset_file(root, path, MAX_CAPTION_BYTES), name)
    except DatasetFileError as exc:
        layout.error(name, str(exc))
        return None
    except TextFileError as exc:
        layout.error(name, f"{exc}".removeprefix(f"{name}: ").replace("re-save it", "re-save the caption file"))
        return None
    raw = [line.strip() for line in text.split("\n")]
    lines = [line for line in raw if line]
    if lines and not raw[0]:
        n = raw.index(lines[0]) + 1
        layout.warn(name, f"line 1 is blank; the caption is line {n} (kohya reads line 1, an empty caption): "
                    "remove the blank line")  # fmt: skip
    if len(lines) > 1:
        layout.warn(name, f"{len(lines)} lines; only the first is the caption (as kohya reads it): join them")
    return lines[0] if lines else ""


def _type_name(value: object) -> str:
    return {type(None): "null", bool: "true/false", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)  # fmt: skip


def _relative_name(value: str) -> tuple[str | None, str | None]:
    """(the posix path inside the dataset, or None and why): backslashes read as folder separators."""
    s = value.replace("\\", "/").strip()
    if s.startswith("/") or _DRIVE.match(s):
        return None, "is an absolute path; write it relative to data.path (e.g. 'sub/a.png')"
    parts = [p for p in s.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "leaves the dataset folder ('..'); images must be inside data.path"
    if not parts:
        return None, "is empty; name an image file"
    return "/".join(parts), None


def read_metadata(root: Path, cfg: DataConfig, layout: Layout) -> dict[str, tuple[int, str | None]]:
    """``metadata.jsonl`` as {posix path inside ``root``: (line number, caption or None if the row is bad)}.
    Every bad line is an error naming it; if no row has ``data.caption_column``, one error names the columns
    the rows do have and the override, and the layout is ``fatal``."""
    img_col, cap_col = cfg.image_column, cfg.caption_column
    rows: dict[str, tuple[int, str | None]] = {}
    columns: dict[str, None] = {}
    with_caption = 0
    lacking: list[tuple[str, dict]] = []  # rows without the caption column: one error each, or one for all
    no_image: list[tuple[str, dict]] = []  # rows without the image column: the same
    with_image = 0
    folded: dict[str, str] = {}  # casefolded key -> key: rows naming one file in two letter cases
    try:
        data = read_dataset_file(root, root / "metadata.jsonl")
        check_encoding(data, "metadata.jsonl")
    except (DatasetFileError, TextFileError) as exc:
        msg = str(exc).removeprefix("metadata.jsonl: ").replace("re-save it", "re-save metadata.jsonl")
        layout.error("metadata.jsonl", msg)
        layout.fatal = True
        return rows
    for n, raw in enumerate(split_lines(data), start=1):
        where = f"metadata.jsonl:{n}"
        if not raw.strip():
            continue
        try:
            row = json.loads(decode_line(raw, where))
        except TextFileError as exc:
            layout.error(where, str(exc).removeprefix(f"{where}: ").replace("re-save it", "re-save metadata.jsonl"))
            continue
        except json.JSONDecodeError as exc:
            layout.error(where, f"not a JSON object ({exc.msg}); write {{{img_col!r}: ..., {cap_col!r}: ...}}")
            continue
        if not isinstance(row, dict):
            layout.error(where, f"not a JSON object; write {{{img_col!r}: ..., {cap_col!r}: ...}}")
            continue
        columns |= dict.fromkeys(row)
        image = row.get(img_col)
        if not isinstance(image, str):
            if img_col not in row:
                no_image.append((where, row))
                continue
            layout.error(where, f"needs a string {img_col!r} (data.image_column) naming an image; it is "
                         f"{_type_name(image)}")  # fmt: skip
            continue
        with_image += 1
        key, why = _relative_name(image)
        if key is None:
            layout.error(where, f"{img_col} {image!r} {why}")
            continue
        if key in rows:
            layout.error(where, f"{key} is also on line {rows[key][0]}; keep one row per image")
            continue
        other = folded.get(key.casefold())
        if other is not None and not ((root / key).is_file() and (root / other).is_file()
                                      and not (root / key).samefile(root / other)):  # fmt: skip
            layout.error(where, f"duplicate row: {key} names the same image as {other} on line {rows[other][0]} "
                         "(letter case differs); keep one row per image")  # fmt: skip
            continue
        folded.setdefault(key.casefold(), key)
        caption = row.get(cap_col)
        if cap_col in row:
            with_caption += 1
        if isinstance(caption, str) and len(caption.encode()) > MAX_CAPTION_BYTES:
            layout.error(where, f"{cap_col!r} is {len(caption.encode())} bytes, more than "
                         f"{MAX_CAPTION_BYTES // 1024} KiB: not a caption; write one short line")  # fmt: skip
            rows[key] = (n, None)
            continue
        if isinstance(caption, str):
            rows[key] = (n, caption.strip())
            if "\n" in caption.strip() or "\r" in caption.strip():
                msg = f"the {cap_col!r} has line breaks; it is trained as written (the tokenizer reads them as spaces)"
                layout.warn(where, f"{msg}, while a caption file gives only its first line: join the lines")
            continue
        rows[key] = (n, None)
        if cap_col in row:
            layout.error(where, f"{cap_col!r} is {_type_name(caption)}, not a string; write the caption in quotes")
        else:
            lacking.append((where, row))
    if no_image and not with_image:  # another trainer's image column: one error naming the columns there
        others = [c for c in columns if c != cap_col]
        fix = f"set data.image_column={others[0]}" if len(others) == 1 else "set data.image_column to one of them"
        msg = f"no row has the image column {img_col!r} (data.image_column); the rows have {', '.join(columns)}"
        if not any(cap_col in row for _, row in no_image):
            msg += f", and none has the caption column {cap_col!r} (data.caption_column) either"
        layout.error("metadata.jsonl", f"{msg}: {fix}")
        layout.fatal = True
        return rows
    for where, row in no_image:
        layout.error(where, f"no {img_col!r} (data.image_column) naming an image; this row has {', '.join(row)}")
    if with_caption:
        for where, row in lacking:
            layout.error(where, f"no {cap_col!r} (data.caption_column); this row has {', '.join(row)}")
    elif rows:
        others = [c for c in columns if c != img_col]
        fix = f"set data.caption_column={others[0]}" if len(others) == 1 else "set data.caption_column to one of them"
        msg = f"no row has the caption column {cap_col!r} (data.caption_column); the rows have {', '.join(columns)}"
        layout.error("metadata.jsonl", f"{msg}: {fix}")
        layout.fatal = True
    return rows


def _metadata(root: Path, cfg: DataConfig, files: list[Path], layout: Layout) -> None:
    rows = read_metadata(root, cfg, layout)
    folded = {k.casefold(): k for k in rows}
    for path in (p for p in files if _is_image(p)):
        name = _rel(root, path)
        key = name if name in rows else folded.get(name.casefold())  # Windows/macOS names match in any case
        if key is None:
            why = f"no row in metadata.jsonl; add one ({cfg.image_column}: {name!r}) or remove the image"
            why = None if layout.fatal else why
            layout.candidates.append(Candidate(path, name, None, why))
            continue
        line, caption = rows.pop(key)
        why = None if caption is not None else ""  # the row's own error names it
        layout.candidates.append(Candidate(path, name, caption, why))
    for key, (line, _) in rows.items():
        target = root / key
        if target.is_dir():
            why = "but it is a folder, not an image file"
        elif target.is_file() and not _is_image(target):
            why = f"is not one of the image types read ({', '.join(IMAGE_EXTENSIONS)})"
        elif target.is_file():
            why = "is in a folder that is not training data (heldout/, __MACOSX/ or a hidden folder)"
        else:
            why = "but the file is missing"
        layout.error(key, f"listed in metadata.jsonl (line {line}) {why}")


def _captioned(root: Path, cfg: DataConfig, images: list[Path], layout: Layout, captions: dict, *,
               fallback: str | None = None, repeats: int = 1, group: str = "") -> None:  # fmt: skip
    """Candidates for ``images`` whose caption is the caption file next to them, else ``fallback`` (warned
    about when other images of the folder have caption files: likely a forgotten one)."""
    mixed = fallback and any((p.parent, p.stem.casefold()) in captions for p in images)
    stems: dict[tuple[Path, str], list[Path]] = {}
    for path in images:
        stems.setdefault((path.parent, path.stem.casefold()), []).append(path)
    for path in images:
        name = _rel(root, path)
        stem = (path.parent, path.stem.casefold())
        sharing = stems[stem]
        if len(sharing) > 1 and (stem in captions or not fallback):
            shared = captions.get(stem)
            what = f"the caption file {_rel(root, shared)}" if shared else "one caption file name"
            others = ", ".join(_rel(root, p) for p in sharing if p != path)
            layout.candidates.append(Candidate(path, name, None, f"shares {what} with {others}: which image it "
                                               "describes is unclear; rename one image (and give it its own caption "
                                               "file)", repeats, group))  # fmt: skip
            if path == sharing[-1]:
                captions.pop(stem, None)  # named in these errors, not "without an image"
            continue
        sidecar = captions.pop(stem, None)
        if sidecar is not None:
            caption = read_caption_file(root, sidecar, _rel(root, sidecar), layout)
            layout.candidates.append(Candidate(path, name, caption, "" if caption is None else None, repeats, group))
        elif fallback:
            layout.candidates.append(Candidate(path, name, fallback, None, repeats, group))
            if mixed:
                layout.warn(name, f"no caption file; trained with the folder's caption {fallback!r} (kohya)")
        else:
            want = path.with_suffix(cfg.caption_extension).name
            why = f"missing caption file {want}" + (f" (and the folder {group!r} names no caption)" if group else "")
            layout.candidates.append(Candidate(path, name, None, why, repeats, group))


def _kohya(root: Path, cfg: DataConfig, files: list[Path], captions: dict, layout: Layout) -> None:
    folders: dict[str, list[Path]] = {}
    nested: dict[str, list[Path]] = {}  # sub-folders of a kohya folder: sd-scripts reads only images directly inside
    for path in (p for p in files if _is_image(p)):
        parts = path.relative_to(root).parts
        if len(parts) == 1:
            msg = "image outside every <repeats>_<name> folder (kohya layout); move it into one (e.g. 1_<name>/)"
            layout.error(parts[0], msg)
            continue
        if len(parts) > 2 and kohya_folder(parts[0]):
            nested.setdefault("/".join(parts[:-1]), []).append(path)
            continue
        folders.setdefault(parts[0], []).append(path)
    for sub, images in nested.items():
        for p in images:
            captions.pop((p.parent, p.stem.casefold()), None)
        top = sub.split("/")[0]
        layout.warn(f"{sub}/", f"{len(images)} images in a sub-folder of the kohya folder {top}/ are not trained: "
                    f"kohya reads only the images directly inside each <repeats>_<name> folder; move them into "
                    f"{top}/ or make {sub.split('/')[-1]}/ a folder of its own next to it")  # fmt: skip
    if not folders and cfg.format == "kohya":
        layout.error(".", "data.format=kohya but no sub-folder holds images; put them in <repeats>_<name>/ folders")
    for folder, images in folders.items():
        parsed = kohya_folder(folder)
        if parsed is None:
            layout.error(f"{folder}/", f"{len(images)} images in a folder not named <repeats>_<name>: kohya reads only "
                         f"those; rename it (e.g. '1_{folder}') or move it out of data.path")  # fmt: skip
            continue
        repeats, name = parsed
        if repeats < 1:
            layout.error(f"{folder}/", f"{repeats} repeats: its {len(images)} images would never be seen; rename it "
                         f"(e.g. '1_{name}') or move it out of data.path")  # fmt: skip
            continue
        if repeats > MAX_REPEATS:
            layout.error(f"{folder}/", f"{repeats} repeats is more than {MAX_REPEATS} (each epoch would draw its "
                         f"{len(images)} images {repeats} times); rename it with fewer (kohya users take 1-100, "
                         f"e.g. '10_{name}')")  # fmt: skip
            continue
        _captioned(root, cfg, images, layout, captions, fallback=name or None, repeats=repeats, group=folder)


def _describe_images(root: Path, images: list[Path]) -> str:
    """E.g. ``found 3 images: 1 in the folder itself, 2 in sub-folders a/, b/``."""
    depth = [len(p.relative_to(root).parts) for p in images]
    subs = sorted({p.relative_to(root).parts[0] for p, d in zip(images, depth) if d > 1})
    where = []
    if top := depth.count(1):
        where.append(f"{top} in the folder itself")
    if subs:
        shown = ", ".join(f"{s}/" for s in subs[:5]) + (f" and {len(subs) - 5} more" if len(subs) > 5 else "")
        where.append(f"{len(images) - top} in sub-folders {shown}")
    return f"found {len(images)} images: {', '.join(where)}"


def find_layout(root: Path, cfg: DataConfig, prompt_key: str = "data.instance_prompt",
                skip: tuple[Path, ...] = ()) -> Layout:  # fmt: skip
    """Every image under ``root`` with the caption it would be trained with, in ``cfg``'s layout.

    Args:
        root: the dataset folder (local).
        cfg: ``format``, ``image_column``, ``caption_column``, ``caption_extension`` and ``instance_prompt``
            (the caption of the ``dreambooth`` layout) are read.
        prompt_key: the config key named when a caption-less folder needs a prompt.
        skip: folders under ``root`` that are not part of it (e.g. ``data.class_data_dir`` inside ``data.path``).

    Returns:
        A ``Layout``: candidates sorted by path (``cfg.max_images`` is not applied here), and problems:
        unreadable caption text, bad metadata rows, kohya folders without repeats, stray files.
    """
    layout = Layout("")
    files = _walk(root, layout, {p.resolve() for p in skip})
    layout.format = fmt = detect_format(root, cfg, files)
    captions: dict[tuple[Path, str], Path] = {}
    for p in (p for p in files if _is_caption(p, cfg)):
        twin = captions.setdefault((p.parent, p.stem.casefold()), p)
        if twin != p:  # two caption files for one image name (Linux tells a.txt from A.TXT; Windows does not)
            a, b = _rel(root, twin), _rel(root, p)
            layout.error(b, f"two caption files differ only in letter case: {a} and {b}; {a} would be used: merge "
                         "them into one and remove the other")  # fmt: skip
    images = [p for p in files if _is_image(p)]
    n_captions = len(captions)
    forced = f"data.format={cfg.format}"
    if fmt == "metadata":
        if not os.path.lexists(root / "metadata.jsonl"):
            layout.error(".", "data.format=metadata but there is no metadata.jsonl")
            layout.fatal = True
            return layout
        _metadata(root, cfg, files, layout)
        if captions:
            layout.warn(".", f"{n_captions} caption files ({cfg.caption_extension}) are not read: metadata.jsonl "
                        "holds the captions (data.format=metadata when it is present); remove them, or set "
                        "data.format=sidecar to train with them instead")  # fmt: skip
        captions = {}
    elif fmt == "kohya":
        _kohya(root, cfg, files, captions, layout)
        if cfg.format == "kohya" and captions and detect_format(root, cfg.model_copy(update={"format": "auto"}),
                                                                files) != "kohya":  # fmt: skip
            layout.warn(".", f"{forced} ignores the {len(captions)} caption files ({cfg.caption_extension}) outside "
                        "<repeats>_<name> folders; set data.format=auto to train with them as they are")  # fmt: skip
            captions = {}
    elif fmt == "sidecar":
        _captioned(root, cfg, images, layout, captions)
    elif cfg.instance_prompt:
        layout.candidates = [Candidate(p, _rel(root, p), cfg.instance_prompt) for p in images]
        if captions:
            layout.warn(".", f"{n_captions} caption files ({cfg.caption_extension}) are not read: the dreambooth "
                        f"layout trains every image with {prompt_key}; set data.format=auto to use them")  # fmt: skip
            captions = {}
    elif not images:
        layout.error(".", f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder or its sub-folders; put the "
                     "training images there, or point data.path at the folder that holds them")  # fmt: skip
        layout.fatal = True
    elif cfg.format == "dreambooth" and captions:
        layout.error(".", f"{forced} trains every image with one {prompt_key}, which is not set, and ignores the "
                     f"{n_captions} caption files ({cfg.caption_extension}): set {prompt_key}, or data.format=auto "
                     "to train with the caption files")  # fmt: skip
        layout.fatal = True
        captions = {}
    else:
        found = _describe_images(root, images)
        layout.error(".", f"{found} but no captions: add a metadata.jsonl ({cfg.image_column}, {cfg.caption_column}), "
                     f"a caption file ({cfg.caption_extension}) next to each image, kohya <repeats>_<name> folders "
                     f"(the name is the caption), or set {prompt_key} (DreamBooth: one caption for all)")  # fmt: skip
        layout.fatal = True
    if fmt != "kohya" and (own := kohya_folder(root.name)) and own[0] != 1:
        msg = f"the folder is named like a kohya <repeats>_<name> folder, but {own[0]} repeats apply only to"
        layout.warn(".", f"{msg} sub-folders: point data.path at its parent ({root.parent}) to use them")
    for path in captions.values():
        layout.warn(_rel(root, path), f"caption file without an image of the same name ({', '.join(IMAGE_EXTENSIONS)})")
    for path in files:
        if not (_is_image(path) or _is_caption(path, cfg) or path.name in SKIP_FILES):
            layout.warn(_rel(root, path), "not an image or caption; ignored")
    return layout
