"""OpenAI's batch routes (and ``GET /v1/files/{id}/content``): what ``serving.http``'s ingress methods call.

    f = client.files.create(file=open("catalogue.jsonl", "rb"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h")
    client.batches.retrieve(b.id).status               # validating → in_progress → finalizing → completed
    client.files.content(b.output_file_id).text        # one JSON line per request: custom_id, response.body

Every route acts for the request's tenant; another tenant's batch or file is a 404 worded as a missing one. Errors
are OpenAI's body with the status chosen here (``STATUS``).
"""

from __future__ import annotations

import asyncio
import logging
from functools import wraps

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from serving.batches.inputs import BATCH_PURPOSE, BatchFiles, content_path, input_requests
from serving.batches.store import BatchRequestError, BatchStore, CreateBatchBody
from serving.config import ServeArgs
from serving.finetune.jobs import page
from serving.finetune.routes import PageQuery
from serving.schemas import error_body
from serving.tenants import NotFound, tenant_of
from serving.uploads.store import FileNotFound, FileStore, InvalidUpload

log = logging.getLogger(__name__)
STATUS: dict[type[Exception], int] = {NotFound: 404, FileNotFound: 404, BatchRequestError: 400, InvalidUpload: 400}
WAKE_WAIT_S = 1.0  # the runner polls anyway; a wake that does not answer in this is not waited for


def _answers_errors(route):
    @wraps(route)
    async def answer(*args, **kwargs) -> Response:
        try:
            out = await route(*args, **kwargs)
        except tuple(STATUS) as exc:
            status = next(code for kind, code in STATUS.items() if isinstance(exc, kind))
            message = str(exc) + ("; list yours with GET /v1/batches" if isinstance(exc, NotFound) else "")
            return JSONResponse(error_body(status, message, getattr(exc, "param", None)), status_code=status)
        return out if isinstance(out, Response) else JSONResponse(out)

    return answer


class Batches:
    """The routes' state in one ingress replica: the batch store next to the files, the ``purpose=batch`` handler
    registered on the file store, and the runner's handle (``serving.batches.deployment.BatchWorker``; None in
    tests without Ray: the runner then finds new batches by polling)."""

    def __init__(self, args: ServeArgs, files: FileStore, worker=None):
        self.cfg, self.files, self.worker, self.base_model = args.batches, files, worker, args.base_model
        self.store = BatchStore(files.root / "batches", self.cfg.completion_window_s)
        files.handlers[BATCH_PURPOSE] = BatchFiles(self.cfg, args.limits)

    async def wake(self) -> None:
        if self.worker is None:
            return
        try:
            await asyncio.wait_for(self.worker.wake.remote(), WAKE_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - the runner's next poll finds the batch
            log.warning("batch runner did not answer wake (%s); it finds the batch on its next poll", exc)


@_answers_errors
async def create_batch(b: Batches, request: Request, body: CreateBatchBody) -> dict:
    """``POST /v1/batches``: the Batch object (``validating``), or 404/400 for an input file that is missing,
    another tenant's, or of another purpose."""
    tenant = tenant_of(request)
    try:
        path, requests = await asyncio.to_thread(input_requests, b.files, body.input_file_id, tenant.name)
    except FileNotFound as exc:
        raise FileNotFound(f"no file {body.input_file_id!r}: upload the requests with POST /v1/files "
                           "(purpose=batch), or list yours with GET /v1/files", "input_file_id") from exc  # fmt: skip
    record = await asyncio.to_thread(b.store.create, tenant, body, path, requests, b.base_model)
    await b.wake()
    return b.store.view(record)


@_answers_errors
async def retrieve_batch(b: Batches, request: Request, batch_id: str) -> dict:
    """``GET /v1/batches/{batch_id}``: the Batch object, or 404 (also for another tenant's)."""
    return b.store.view(await asyncio.to_thread(b.store.get, batch_id, tenant_of(request).name))


@_answers_errors
async def list_batches(b: Batches, request: Request, query: PageQuery) -> dict:
    """``GET /v1/batches``: the tenant's batches, newest first, OpenAI's page (``after``, ``limit``, ``has_more``,
    ``first_id``, ``last_id``)."""
    tenant = tenant_of(request).name
    records = [r for r in reversed(await asyncio.to_thread(b.store.all)) if r.tenant == tenant]
    out = page(records, query.after, query.limit, lambda r: r.id, "batch")
    out["data"] = [b.store.view(r) for r in out["data"]]
    ids = [d["id"] for d in out["data"]]
    return out | {"first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None}


@_answers_errors
async def cancel_batch(b: Batches, request: Request, batch_id: str) -> dict:
    """``POST /v1/batches/{batch_id}/cancel``: the Batch object, ``cancelling`` (then ``cancelled`` within
    ``batches.poll_s``); 400 for a batch that has ended."""
    record = await asyncio.to_thread(b.store.request_cancel, batch_id, tenant_of(request).name)
    await b.wake()
    return b.store.view(record)


@_answers_errors
async def file_content(files: FileStore, request: Request, file_id: str) -> Response:
    """``GET /v1/files/{file_id}/content``: a batch input, output or error file's JSONL; 400 for a fine-tuning
    dataset (OpenAI does not hand those back either), 404 for a missing file or another tenant's."""
    path = await asyncio.to_thread(content_path, files, file_id, tenant_of(request).name)
    return FileResponse(path, media_type="application/jsonl", filename=f"{file_id}.jsonl")
