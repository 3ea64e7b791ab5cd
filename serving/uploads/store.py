"""The file store behind ``POST /v1/files``: an uploaded archive becomes a validated dataset folder.

    store = FileStore(ServeArgs().files)                       # <root> = files.root (runs/files by default)
    with open("toy-sks.zip", "rb") as f:
        file = await store.create(f, "toy-sks.zip", "fine-tune", tenant="default")
    store.data_dir(file.id, "default")                         # the folder a fine-tuning job trains on

On disk, one folder per file: ``<root>/<file id>/data/`` (the unpacked archive) and ``<root>/<file id>/file.json``
(its OpenAI File object and the tenant it belongs to). An upload is streamed in chunks to
``<root>/.staging/<file id>/`` (never held whole in memory; ``files.max_bytes`` stops it), unpacked there by
``serving.uploads.archive`` under the ``files.*`` limits, validated with the project's own
``training.data.validate_dataset`` — the check every training run makes — and only then moved into place with one
``os.rename``: a refused or interrupted upload leaves nothing behind but its staging folder, which is removed
(stale ones after a day, when a store starts). A dataset the validator rejects is kept as a File object with
``status: "error"`` and its report, without its data, and ``DatasetRejected`` is raised. The metadata is written
atomically (temporary file + ``os.replace``), so files survive a restart of the Serve app.

Tenants are opaque strings given by the caller; a file of another tenant is ``FileNotFound``, as a missing one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, Field

from serving.config import FilesArgs, workdir_path
from serving.uploads.archive import CHUNK, ArchiveLimits, Extracted, extract
from training.config import IMAGE_EXTENSIONS, DataConfig
from training.data import DatasetReport, validate_dataset
from training.layout import SKIP_DIRS, kohya_folder

log = logging.getLogger(__name__)
FILE_ID = re.compile(r"^file-[0-9a-f]{24}\Z")
META = "file.json"
STAGING = ".staging"
STALE_S = 24 * 3600  # a staging folder this old belongs to no upload in progress
NO_CAPTION = "(no caption: captioned by the fine-tuning job)"  # validates the images of a caption-less upload


class FileStoreError(Exception):
    """A request the store refuses; the message says why and what to do, ``param`` names the request field."""

    param: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param if param is not None else type(self).param


class FileNotFound(FileStoreError):
    param = "file_id"


class InvalidUpload(FileStoreError):
    """A field of the upload other than the archive's content (purpose, tenant)."""


class UploadTooLarge(FileStoreError):
    param = "file"


class DatasetRejected(FileStoreError):
    """The archive unpacked but the validator found errors; ``file`` is the stored ``status: "error"`` object."""

    param = "file"

    def __init__(self, file: FileObject):
        problems = [p for p in file.dataset.problems if p.severity == "error"] if file.dataset else []
        shown = "; ".join(f"{p.file}: {p.message}" for p in problems[:5]) + (" …" if len(problems) > 5 else "")
        super().__init__(f"the dataset in {file.filename} has {len(problems)} error(s): {shown}")
        self.file = file


class DatasetProblem(BaseModel):
    file: str = Field(description="path inside the dataset ('.' for the dataset itself)")
    severity: Literal["error", "warning"] = Field(description="errors reject the upload; warnings are advice")
    message: str = Field(description="what is wrong and what to do")


class DatasetFacts(BaseModel):
    """lorafleet's extras on a File object: what the validator made of the upload."""

    layout: str = Field(description="metadata, kohya, sidecar, dreambooth, or images (no captions: jobs caption)")
    root: str = Field(description="the dataset folder inside the archive ('.' = its top level)")
    images: int = Field(description="usable images")
    captions: bool = Field(description="captions came with the images (false: a fine-tuning job captions them)")
    archive: str = Field(description="zip, tar, tar.gz, tar.bz2 or tar.xz (read from the bytes, not the name)")
    entries: int = Field(description="archive entries unpacked (files and folders)")
    extracted_bytes: int = Field(description="bytes unpacked")
    buckets: dict[str, int] = Field(description="usable images per aspect-ratio bucket 'WxH'")
    problems: list[DatasetProblem] = Field(description="the validator's report, every problem by file")


class FileObject(BaseModel):
    """OpenAI's File object (same field names and values), plus ``dataset``."""

    id: str = Field(description="'file-' and 24 hex digits")
    object: Literal["file"] = Field("file", description="always 'file'")
    bytes: int = Field(description="size of the uploaded archive in bytes")
    created_at: int = Field(description="upload time, Unix seconds")
    filename: str = Field(description="the uploaded file's name")
    purpose: str = Field(description="as uploaded, e.g. 'fine-tune'")
    status: Literal["processed", "error"] = Field(description="processed: usable; error: see status_details")
    status_details: str | None = Field(None, description="why the file is in error (OpenAI: deprecated, kept)")
    dataset: DatasetFacts | None = Field(None, description="lorafleet: the validated dataset (null for none)")


def files_root(root: str) -> Path:
    """``files.root`` as an absolute path: a relative one is under ``$LORAFLEET_WORKDIR`` when set (what
    ``lorafleet submit`` gives jobs), else the project (Serve replicas do not share a working directory)."""
    return workdir_path(root)


class Upload:
    """An upload being received: its archive is written to ``folder/upload`` chunk by chunk, bytes counted."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes, self.bytes, self.kept = folder, max_bytes, 0, False
        self.limit_name = "files.max_bytes"  # the setting max_bytes comes from, named when it is passed
        self.id = folder.name
        self.archive = folder / "upload"
        self._out = open(self.archive, "xb")  # noqa: SIM115 - closed by close() (the staging context)

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``. Raises UploadTooLarge once the upload passes ``files.max_bytes``."""
        self.bytes += len(chunk)
        if self.bytes > self.max_bytes:
            raise UploadTooLarge(
                f"the upload is larger than {self.max_bytes} bytes ({self.limit_name}): send a smaller file (fewer or "
                f"smaller images, fewer requests), or ask the operator to raise {self.limit_name}"
            )
        self._out.write(chunk)

    def close(self) -> None:
        self._out.close()


class FileStore:
    """Uploaded datasets under one root folder; see the module docstring.

    Args:
        cfg: the ``files`` section of ``ServeArgs``.
        root: overrides ``cfg.root`` (resolved by ``files_root``).
        clock: Unix seconds (``created_at``); tests pass a fake.
    """

    def __init__(self, cfg: FilesArgs, root: Path | None = None, clock: Callable[[], float] = time.time):
        self.cfg, self.clock = cfg, clock
        self.root = Path(root) if root is not None else files_root(cfg.root)
        self.handlers: dict[str, Any] = {}  # purpose -> its handler (serving.batches.inputs.BatchFiles for "batch")
        self._sweep_staging()

    @property
    def limits(self) -> ArchiveLimits:
        c = self.cfg
        return ArchiveLimits(c.max_entries, c.max_entry_bytes, c.max_extracted_bytes, c.max_ratio)

    # ---- writing ---------------------------------------------------------------------------------------------
    @contextmanager
    def staging(self) -> Iterator[Upload]:
        """A fresh ``Upload`` in ``<root>/.staging/<new id>/``; the folder is removed on exit unless ``ingest``
        moved it into place."""
        folder = self.root / STAGING / f"file-{secrets.token_hex(12)}"
        folder.mkdir(parents=True)
        upload = Upload(folder, self.cfg.max_bytes)
        try:
            yield upload
        finally:
            upload.close()
            if not upload.kept:
                shutil.rmtree(folder, ignore_errors=True)

    async def create(
        self, stream: AsyncIterator[bytes] | BinaryIO, filename: str, purpose: str, tenant: str
    ) -> FileObject:
        """Receive, unpack and validate one upload (the unpacking and validation run in a worker thread).

        Args:
            stream: the archive's bytes, as async chunks or a binary file.
            filename: the uploaded file's name (its last path part is kept).
            purpose: one of ``files.purposes``.
            tenant: the owner; only this tenant sees the file.

        Returns:
            The stored File object, ``status: "processed"``.

        Raises:
            InvalidUpload: a purpose or tenant that is not accepted (before anything is read).
            UploadTooLarge: past ``files.max_bytes`` (nothing is kept).
            serving.uploads.archive.ArchiveError: not an archive, or one refused (nothing is kept).
            DatasetRejected: the validator found errors (the error File object is kept, its data is not).
            serving.uploads.archive.StorageError: the files could not be written.
        """
        self.check_fields(purpose, tenant)
        with self.staging() as upload:
            if isinstance(stream, AsyncIterator):
                async for chunk in stream:
                    upload.write(chunk)
            else:
                while chunk := stream.read(CHUNK):
                    upload.write(chunk)
            return await asyncio.to_thread(self.ingest, upload, filename, purpose, tenant)

    def check_fields(self, purpose: str, tenant: str) -> None:
        """Raises InvalidUpload for a purpose not in ``files.purposes`` or an empty tenant."""
        if purpose not in self.cfg.purposes and purpose not in self.handlers:
            raise InvalidUpload(
                f"purpose {purpose[:64]!r} is not accepted here: use one of {[*self.cfg.purposes, *self.handlers]} "
                "(files.purposes, and batch while batches.enabled)",
                "purpose",
            )
        if not isinstance(tenant, str) or not tenant:
            raise InvalidUpload("no tenant: the caller must name the file's owner", "tenant")

    def ingest(self, upload: Upload, filename: str, purpose: str, tenant: str) -> FileObject:
        """Unpack and validate a received ``Upload``, then move it into place; see ``create`` (same errors)."""
        upload.close()
        self.check_fields(purpose, tenant)
        if purpose in self.handlers:  # not an archive: e.g. a batch's JSONL (serving/batches/inputs.py)
            return self.handlers[purpose].ingest(self, upload, filename, tenant)
        data = upload.folder / "data"
        extracted = extract(upload.archive, data, self.limits)
        upload.archive.unlink()  # the unpacked folder is what jobs read
        root = dataset_root(data)
        report, captions = self._validate(root)
        errors = report.errors
        facts = _facts(report, root, data, extracted, captions)
        file = FileObject(
            id=upload.id, bytes=upload.bytes, created_at=int(self.clock()), filename=clean_filename(filename),
            purpose=purpose, status="error" if errors else "processed", dataset=facts,
            status_details=f"{len(errors)} dataset error(s); see dataset.problems" if errors else None,
        )  # fmt: skip
        if errors:
            shutil.rmtree(data)
        write_json(upload.folder / META, {"tenant": tenant, "file": file.model_dump()})
        os.rename(upload.folder, self.root / file.id)
        upload.kept = True
        if errors:
            raise DatasetRejected(file)
        return file

    def _validate(self, root: Path) -> tuple[DatasetReport, bool]:
        """(the validator's report, whether captions came with the images). A folder of images without captions
        (no metadata.jsonl, kohya folders or caption files) is a dataset a fine-tuning job captions: its images
        are validated with a stand-in caption."""
        cfg = DataConfig.model_validate({**self.cfg.data, "path": str(root)})
        report = validate_dataset(cfg)
        if cfg.format != "auto" or cfg.instance_prompt or report.format != "dreambooth" or not _has_images(root):
            return report, report.format != "dreambooth" or bool(cfg.instance_prompt)
        return validate_dataset(cfg.model_copy(update={"instance_prompt": NO_CAPTION})), False

    # ---- reading ---------------------------------------------------------------------------------------------
    def _record(self, file_id: str) -> dict[str, Any] | None:
        if not FILE_ID.match(file_id or ""):
            return None
        try:
            return json.loads((self.root / file_id / META).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("file %s: unreadable %s (%s); skipped", file_id, META, exc)
            return None

    def get(self, file_id: str, tenant: str) -> FileObject:
        """The File object. Raises FileNotFound when there is none, or it is another tenant's."""
        record = self._record(file_id)
        if record is None or record.get("tenant") != tenant:
            raise FileNotFound(f"no file {file_id[:64]!r}: list yours with GET /v1/files")
        return FileObject.model_validate(record["file"])

    def list(self, tenant: str, purpose: str | None = None) -> list[FileObject]:
        """The tenant's files (of ``purpose`` when given), newest first."""
        found = []
        for folder in self.root.iterdir() if self.root.is_dir() else ():
            record = self._record(folder.name)
            if record and record.get("tenant") == tenant and purpose in (None, record["file"]["purpose"]):
                found.append(FileObject.model_validate(record["file"]))
        return sorted(found, key=lambda f: (f.created_at, f.id), reverse=True)

    def data_dir(self, file_id: str, tenant: str) -> Path:
        """The dataset folder of a processed file (what a fine-tuning job's data.path is).

        Raises:
            FileNotFound: no such file for this tenant.
            InvalidUpload: the file is in error (it has no data).
        """
        file = self.get(file_id, tenant)
        if file.status != "processed" or file.dataset is None:
            raise InvalidUpload(f"file {file_id} has status {file.status!r}: upload the dataset again", "file_id")
        return self.root / file_id / "data" / file.dataset.root

    def delete(self, file_id: str, tenant: str) -> None:
        """Remove the file and its data (moved aside in one rename, then deleted). Raises FileNotFound."""
        self.get(file_id, tenant)
        trash = self.root / STAGING / f"{file_id}-deleted-{secrets.token_hex(4)}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.root / file_id, trash)
        except FileNotFoundError:  # deleted meanwhile by another request
            raise FileNotFound(f"no file {file_id!r}: list yours with GET /v1/files") from None
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep_staging(self) -> None:
        staging = self.root / STAGING
        for folder in staging.iterdir() if staging.is_dir() else ():
            try:
                if time.time() - folder.stat().st_mtime > STALE_S:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                continue


def dataset_root(data: Path) -> Path:
    """The dataset folder inside an unpacked archive: its top level, or the one folder there when the archive
    holds a folder (what zipping a folder makes; ``__MACOSX/`` and hidden entries aside) — unless that folder is a
    kohya ``<repeats>_<name>`` folder, which is part of the dataset."""
    entries = [p for p in data.iterdir() if not p.name.startswith(".") and p.name.casefold() not in SKIP_DIRS]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() and not kohya_folder(entries[0].name):
        return entries[0]
    return data


def _has_images(root: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*") if "__MACOSX" not in p.parts)


def _facts(report: DatasetReport, root: Path, data: Path, extracted: Extracted, captions: bool) -> DatasetFacts:
    hidden = f"{root}{os.sep}"  # server paths are not the client's business: messages name files in the dataset

    def clean(text: str) -> str:
        return text.replace(hidden, "").replace(str(root), ".")

    return DatasetFacts(
        layout=report.format if captions else "images", root=root.relative_to(data).as_posix(),
        images=len(report.instances), captions=captions, archive=extracted.kind, entries=extracted.entries,
        extracted_bytes=extracted.bytes, buckets=report.buckets,
        problems=[DatasetProblem(file=p.file, severity=p.severity, message=clean(p.message)) for p in report.problems],
    )  # fmt: skip


def clean_filename(name: str | None) -> str:
    """The uploaded file's name as stored: its last path part, without control characters, at most 255 chars."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    return base[:255] or "upload"


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, flushed to disk, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
