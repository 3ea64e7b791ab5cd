"""OpenAI's files routes over the ``FileStore``: what ``serving.http``'s ingress methods call.

    curl -F purpose=fine-tune -F file=@toy-sks.zip -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/v1/files
    client.files.create(file=open("toy-sks.zip", "rb"), purpose="fine-tune")      # the official openai client

``POST /v1/files`` takes ``multipart/form-data`` with the fields ``file`` (the archive) and ``purpose``. The body is
parsed as it arrives by python-multipart's streaming ``MultipartParser`` (the parser Starlette's own form reader
is built on, which would spool the file to a temporary file of its own first): the archive part goes straight
into the store's staging folder, chunk by chunk, and is refused with 413 as soon as it passes ``files.max_bytes``.
``serving.http.Gate`` does not buffer this route's body (``is_upload``); it refuses a declared Content-Length
over ``upload_limit`` before anything is read.

Errors are OpenAI's body, their statuses chosen here, in ``STATUS``; a rejected dataset's 400 carries the
stored File object and every problem of the validator's report in ``error.file`` / ``error.problems``.

Every route acts for the request's tenant (``serving.tenants``: resolved from the API key by ``serving.http.Gate``);
another tenant's file is "not found", as a missing one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Literal

from pydantic import Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from serving import tenants
from serving.schemas import Params, error_body
from serving.uploads.archive import ArchiveError, StorageError
from serving.uploads.store import (
    DatasetRejected,
    FileNotFound,
    FileStore,
    FileStoreError,
    InvalidUpload,
    Upload,
    UploadTooLarge,
)

ROUTE = "/v1/files"
MULTIPART_SLACK = 64 * 1024  # boundaries, part headers and the purpose field around the archive
MAX_FIELD_BYTES = 1024  # a text field (purpose) longer than this is no purpose
FIELDS = ("file", "purpose")
UPLOAD_SCHEMA = {  # the route's body in /openapi.json (FastAPI cannot infer it: the handler parses the stream)
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": list(FIELDS), "properties": {
            "file": {"type": "string", "format": "binary", "description": "a zip or tar(.gz/.bz2/.xz) of the images "
                     "with captions (metadata.jsonl, .txt sidecars, kohya folders) or without (a job captions them)"},
            "purpose": {"type": "string", "description": "'fine-tune' (files.purposes)"},
        }}}}},
}  # fmt: skip


class UnsupportedType(FileStoreError):
    param = "Content-Type"


class FormError(FileStoreError):
    """A multipart body without the fields this route takes, or one that does not parse."""


STATUS: dict[type[Exception], int] = {
    FileNotFound: 404, UploadTooLarge: 413, UnsupportedType: 415, DatasetRejected: 400, InvalidUpload: 400,
    FormError: 400, ArchiveError: 400, StorageError: 507,
}  # fmt: skip


class FileListQuery(Params):
    """``GET /v1/files``'s query string (OpenAI's parameters)."""

    purpose: str | None = Field(None, description="only files of this purpose")
    limit: int = Field(10000, ge=1, le=10000, description="files per page (OpenAI's default and maximum: 10000)")
    order: Literal["asc", "desc"] = Field("desc", description="by created_at: desc = newest first")
    after: str | None = Field(None, description="a file id: the page starts after it (the previous page's last_id)")

    @classmethod
    def _not_given(cls, value: object) -> bool:
        return value == ""


def is_upload(scope: dict) -> bool:
    """Whether an ASGI scope is ``POST /v1/files`` (a body streamed by its route, not buffered by ``Gate``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    path = path[len(root) :] if root and path.startswith(root) else path
    return scope.get("method") == "POST" and path.rstrip("/") == ROUTE


def upload_limit(store: FileStore) -> int:
    """The largest ``POST /v1/files`` body: ``files.max_bytes`` of archive plus the multipart framing."""
    return store.cfg.max_bytes + MULTIPART_SLACK


def tenant_of(request: Request) -> str:
    """The name of the request's tenant, which ``serving.http.Gate`` resolved from its API key
    (``serving.tenants.tenant_of``)."""
    return tenants.tenant_of(request).name


def error_response(exc: Exception) -> JSONResponse:
    status = next(code for kind, code in STATUS.items() if isinstance(exc, kind))
    body = error_body(status, str(exc), getattr(exc, "param", None) or ("file" if status == 400 else None))
    if isinstance(exc, DatasetRejected):
        body["error"] |= {"code": "invalid_dataset", "file": exc.file.model_dump(),
                          "problems": [p.model_dump() for p in exc.file.dataset.problems]}  # fmt: skip
    if hasattr(exc, "error_fields"):  # e.g. a batch file's bad lines (serving.batches.inputs.BatchFileRejected)
        body["error"] |= exc.error_fields()
    return JSONResponse(body, status_code=status)


def _answers_errors(route: Callable[..., Awaitable[object]]) -> Callable[..., Awaitable[Response]]:
    @wraps(route)
    async def answer(*args, **kwargs) -> Response:
        try:
            out = await route(*args, **kwargs)
        except tuple(STATUS) as exc:
            return error_response(exc)
        return out if isinstance(out, Response) else JSONResponse(out)

    return answer


@_answers_errors
async def create_file(store: FileStore, request: Request) -> dict:
    """``POST /v1/files``: the stored File object (200), or OpenAI's error body (see ``STATUS``)."""
    tenant = tenant_of(request)
    with store.staging() as upload:
        form = _Form(upload, store, tenant)
        try:
            await form.receive(request, upload_limit(store))
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; the staging folder is removed
        purpose = form.field("purpose")
        file = await asyncio.to_thread(store.ingest, upload, form.filename(), purpose, tenant)
    return file.model_dump()


@_answers_errors
async def list_files(store: FileStore, request: Request, query: FileListQuery) -> dict:
    """``GET /v1/files``: OpenAI's list (``object: list``, ``data``, ``first_id``, ``last_id``, ``has_more``)."""
    files = await asyncio.to_thread(store.list, tenant_of(request), query.purpose)
    if query.order == "asc":
        files.reverse()
    if query.after is not None:
        ids = [f.id for f in files]
        if query.after not in ids:
            raise FileNotFound(f"after: no file {query.after[:64]!r} in this list; pass the last_id of a page", "after")
        files = files[ids.index(query.after) + 1 :]
    page = files[: query.limit]
    return {"object": "list", "data": [f.model_dump() for f in page], "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None, "has_more": len(files) > len(page)}  # fmt: skip


@_answers_errors
async def retrieve_file(store: FileStore, request: Request, file_id: str) -> dict:
    """``GET /v1/files/{file_id}``: the File object, or 404 (also for another tenant's file)."""
    return (await asyncio.to_thread(store.get, file_id, tenant_of(request))).model_dump()


@_answers_errors
async def delete_file(store: FileStore, request: Request, file_id: str) -> dict:
    """``DELETE /v1/files/{file_id}``: ``{id, object: "file", deleted: true}``, or 404."""
    await asyncio.to_thread(store.delete, file_id, tenant_of(request))
    return {"id": file_id, "object": "file", "deleted": True}


class _Form:
    """python-multipart callbacks: the ``file`` part into the ``Upload``, short text fields into ``fields``."""

    def __init__(self, upload: Upload, store: FileStore, tenant: str):
        self.upload, self.store, self.tenant = upload, store, tenant
        self.fields: dict[str, str] = {}
        self.file_name: str | None = None  # the file part's filename ("" when it had none)
        self._header, self._value, self._disposition = b"", b"", b""
        self._name, self._is_file, self._data = "", False, bytearray()

    async def receive(self, request: Request, limit: int) -> None:
        """Parse the request body as it streams in. Raises UnsupportedType, FormError, UploadTooLarge and the
        store's field errors."""
        mime, params = parse_options_header(request.headers.get("content-type", ""))
        if mime != b"multipart/form-data" or not params.get(b"boundary"):
            sent = request.headers.get("content-type")
            raise UnsupportedType(
                f"the request body was sent {f'as {sent!r}' if sent else 'without a Content-Type'}; POST /v1/files "
                "takes multipart/form-data with the fields 'file' (the archive) and 'purpose' (curl: -F "
                "purpose=fine-tune -F file=@data.zip)"
            )
        callbacks = {name: getattr(self, name) for name in dir(self) if name.startswith("on_")}
        parser = MultipartParser(params[b"boundary"], callbacks)
        seen = 0
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise UploadTooLarge(f"the request body is larger than {limit} bytes (files.max_bytes and "
                                         "the multipart framing); send a smaller archive")  # fmt: skip
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError as exc:
            raise FormError(f"the multipart body does not parse ({exc}); let the client encode the form") from exc
        missing = [name for name in FIELDS if (self.file_name if name == "file" else self.fields.get(name)) is None]
        if missing:
            raise FormError(f"{', '.join(missing)}: missing; send the archive as the form field 'file' and its "
                            "purpose ('fine-tune') as 'purpose'", missing[0])  # fmt: skip

    def field(self, name: str) -> str:
        return self.fields[name]

    def filename(self) -> str:
        return self.file_name or "upload"

    # the parser's callbacks (python-multipart's MultipartCallbacks names)
    def on_part_begin(self) -> None:
        self._disposition, self._data = b"", bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._header.strip().lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise FormError("a form part without a name (Content-Disposition: form-data; name=...)", "body")
        self._name = name.decode("utf-8", "replace")
        self._is_file = self._name == "file"
        if self._name not in FIELDS:
            raise FormError(f"{self._name[:64]}: is not a field of this request (it takes {', '.join(FIELDS)}); "
                            "remove it", self._name[:64])  # fmt: skip
        if self._name in self.fields or (self._is_file and self.file_name is not None):
            raise FormError(f"{self._name}: given twice in the form; give it once", self._name)
        if self._is_file:
            self.file_name = options.get(b"filename", b"").decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.upload.write(data[start:end])  # raises UploadTooLarge past files.max_bytes
            return
        self._data += data[start:end]
        if len(self._data) > MAX_FIELD_BYTES:
            raise FormError(f"{self._name}: longer than {MAX_FIELD_BYTES} bytes", self._name)

    def on_part_end(self) -> None:
        if not self._is_file:
            self.fields[self._name] = self._data.decode("utf-8", "replace")
            if self._name == "purpose":  # refused before the archive is received, when it comes first
                self.store.check_fields(self.fields["purpose"], self.tenant)
                if (handler := self.store.handlers.get(self.fields["purpose"])) is not None:
                    handler.bound(self.upload)  # e.g. batches.max_file_bytes, while the file streams in
