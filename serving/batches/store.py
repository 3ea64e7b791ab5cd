"""Batches on disk: OpenAI's Batch object, the record behind it, and each batch's progress files.

    store = BatchStore(files_root / "batches")
    record = store.create(tenant, CreateBatchBody(input_file_id="file-…", endpoint=…, completion_window="24h"),
                          input_path, requests=50)
    store.get(record.id, "acme").to_openai(store.cancel_requested_at(record.id))   # {"object": "batch", …}

One folder per batch next to the uploaded files: ``<files.root>/batches/<batch id>/`` holding ``batch.json`` (the
record, written atomically), ``input.jsonl`` (the input file, hard-linked at creation so deleting the upload cannot
pull it from under a running batch), ``output.jsonl`` / ``errors.jsonl`` (one line per finished request, appended as
they finish: the runner's progress; a restarted runner skips the ``custom_id``s found there) and ``cancel`` (written
by ``POST /v1/batches/{id}/cancel``). After creation only the runner writes ``batch.json``; the ingress writes only
the ``cancel`` marker, so the two never race on one file. A runner holds ``lock`` (``fcntl.flock``) while it runs a
batch: two apps on one ``files.root`` never run the same batch twice.

Status (OpenAI's): ``validating`` until the runner takes the batch, ``in_progress``, ``finalizing`` while the
output and error files are stored, then ``completed``, ``failed`` (the input could not be read), ``cancelling`` →
``cancelled`` or ``expired`` (not finished within ``batches.completion_window_s``); the last two keep the results of
the requests that finished, and list the others in the error file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from serving.batches.inputs import ENDPOINT
from serving.schemas import RequestBody
from serving.tenants import NotFound, Tenant
from serving.uploads.store import write_json

BATCH_ID = re.compile(r"^batch_[0-9a-f]{24}\Z")
RECORD, INPUT, OUTPUT, ERRORS = "batch.json", "input.jsonl", "output.jsonl", "errors.jsonl"
CANCEL, END = "cancel", "end"  # the ingress's cancel marker; how the runner is ending the batch (finalizing)
Status = Literal["validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled", "expired"]
TERMINAL = ("completed", "failed", "cancelled", "expired")
MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class BatchRequestError(ValueError):
    """A create or cancel request this server refuses (HTTP 400); ``param`` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CreateBatchBody(RequestBody):
    """``POST /v1/batches`` (OpenAI's fields)."""

    input_file_id: str = Field(..., min_length=1, max_length=64, description="an uploaded file's id (purpose=batch)")
    endpoint: Literal["/v1/images/generations"] = Field(
        ..., description="the endpoint every line calls: only /v1/images/generations here"
    )
    completion_window: Literal["24h"] = Field(..., description="OpenAI's only window: 24h")
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        None, max_length=16, description="up to 16 key-value pairs (keys up to 64 characters, values 512), returned"
    )


class RequestCounts(BaseModel):
    total: int = Field(0, description="requests in the input file")
    completed: int = Field(0, description="requests answered 200 (their lines are in the output file)")
    failed: int = Field(0, description="requests that ran and failed (their lines are in the error file)")


class BatchRecord(BaseModel):
    """What ``batch.json`` holds: OpenAI's Batch fields plus the owner."""

    id: str = Field(description="'batch_' + 24 hex digits")
    tenant: str = Field(description="the owner; other tenants get 404")
    sees_shared: bool = Field(True, description="the owner's Tenant.sees_shared when the batch was created")
    order: float = Field(description="creation time with fractions: batches start in this order")
    base_model: str | None = Field(None, description="the base model of the app it was created on (None: any)")
    input_file_id: str
    endpoint: str = ENDPOINT
    completion_window: str = "24h"
    status: Status = "validating"
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = Field(None, description="why it failed: [{code, message, param, line}]")
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)

    def tenant_object(self) -> Tenant:
        return Tenant(name=self.tenant, sees_shared=self.sees_shared)

    def to_openai(self, cancel_at: int | None = None) -> dict[str, Any]:
        """OpenAI's ``batch`` object; ``cancel_at`` (the cancel marker's time) shows a running batch as
        ``cancelling`` before the runner has seen the marker."""
        out = self.model_dump(exclude={"tenant", "sees_shared", "order", "base_model"})
        if cancel_at is not None and self.status in ("validating", "in_progress"):
            out["status"], out["cancelling_at"] = "cancelling", cancel_at
        out["errors"] = {"object": "list", "data": self.errors} if self.errors else None
        return {"object": "batch", **out}


class BatchStore:
    """Batch folders under one root (``<files.root>/batches``); ``clock``: Unix seconds (tests pass a fake)."""

    def __init__(self, root: Path, completion_window_s: float = 86400.0, clock: Callable[[], float] = time.time):
        self.root, self.window_s, self.clock = Path(root), completion_window_s, clock

    def folder(self, batch_id: str) -> Path:
        return self.root / batch_id

    def create(self, tenant: Tenant, body: CreateBatchBody, input_path: Path, requests: int,
               base_model: str | None = None) -> BatchRecord:  # fmt: skip
        """A new batch (status ``validating``) holding its own link to the input file; ``base_model``: the serving
        app's, so only a runner of an app serving that model runs it (apps may share ``files.root``)."""
        now = self.clock()
        record = BatchRecord(id=f"batch_{secrets.token_hex(12)}", tenant=tenant.name, sees_shared=tenant.sees_shared,
                             order=now, input_file_id=body.input_file_id, metadata=body.metadata, base_model=base_model,
                             created_at=int(now), expires_at=int(now + self.window_s),
                             request_counts=RequestCounts(total=requests))  # fmt: skip
        folder = self.folder(record.id)
        folder.mkdir(parents=True)
        try:
            os.link(input_path, folder / INPUT)
        except OSError:  # another file system: a copy
            shutil.copyfile(input_path, folder / INPUT)
        self.save(record)
        return record

    def save(self, record: BatchRecord) -> None:
        write_json(self.folder(record.id) / RECORD, record.model_dump(mode="json"))

    def load(self, batch_id: str) -> BatchRecord | None:
        if not BATCH_ID.match(batch_id or ""):
            return None
        try:
            return BatchRecord.model_validate(json.loads((self.folder(batch_id) / RECORD).read_text()))
        except (OSError, ValueError):
            return None

    def get(self, batch_id: str, tenant: str) -> BatchRecord:
        """The tenant's batch. Raises NotFound (404) for a missing one and for another tenant's, worded alike."""
        record = self.load(batch_id)
        if record is None or record.tenant != tenant:
            raise NotFound("batch", batch_id, "batch_id")
        return record

    def ids(self) -> list[str]:
        """Every batch id on disk (folder names), unordered."""
        return [p.name for p in (self.root.iterdir() if self.root.is_dir() else ()) if BATCH_ID.match(p.name)]

    def all(self) -> list[BatchRecord]:
        """Every batch, oldest first."""
        found = [r for p in (self.root.iterdir() if self.root.is_dir() else ()) if (r := self.load(p.name))]
        return sorted(found, key=lambda r: (r.order, r.id))

    def request_cancel(self, batch_id: str, tenant: str) -> BatchRecord:
        """Mark the tenant's batch to be cancelled (the runner stops it within ``batches.poll_s``).

        Raises:
            NotFound: no such batch for this tenant.
            BatchRequestError: it has already ended.
        """
        record = self.get(batch_id, tenant)
        if record.status in TERMINAL:
            raise BatchRequestError(f"batch {batch_id} has status {record.status!r}: only a batch that has not "
                                    "ended can be cancelled", "batch_id")  # fmt: skip
        marker = self.folder(batch_id) / CANCEL
        if not marker.exists():
            write_json(marker, {"at": int(self.clock())})
        return record

    def cancel_requested_at(self, batch_id: str) -> int | None:
        """When cancel was asked (Unix seconds), or None."""
        try:
            return int(json.loads((self.folder(batch_id) / CANCEL).read_text())["at"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def view(self, record: BatchRecord) -> dict[str, Any]:
        """The OpenAI object as a client sees it now (``cancelling`` once asked)."""
        return record.to_openai(self.cancel_requested_at(record.id))
