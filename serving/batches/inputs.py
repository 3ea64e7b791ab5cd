"""Batch input and output files: JSONL in OpenAI's batch line format, kept by the ``FileStore`` of ``/v1/files``.

An input file (``POST /v1/files`` with ``purpose=batch``) holds one request per line, as OpenAI's Batch API::

    {"custom_id": "sku-1", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "...", "seed": 1}}

Every line is checked when the file is uploaded, before a batch can use it: the line's JSON as the live route reads
a body (``serving.http.read_json``: duplicate keys, NaN, nesting), its fields (``BatchLine``: the ``body`` is the
live route's own ``serving.schemas.GenerationBody``), the configured request limits (``limits.*``: prompt length,
``n``, steps, guidance, size), unique ``custom_id``s, and the bounds ``batches.max_requests`` (lines) and
``batches.max_file_bytes``. A file with bad lines is refused (400) with every problem by line number and field
(``error.problems``: ``[{line, param, message}]``, the first ``MAX_PROBLEMS``); nothing is kept.

On disk an input file is ``<files.root>/<file id>/content.jsonl`` next to its ``file.json``; a batch's output and
error files (``purpose=batch_output``) are stored the same way, so ``GET /v1/files``, ``DELETE /v1/files/{id}``
and ``GET /v1/files/{id}/content`` treat them like any other file of the tenant.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from serving.config import BatchesArgs, RequestLimits
from serving.schemas import GenerationBody, Params
from serving.uploads.store import (
    META,
    FileObject,
    FileStore,
    InvalidUpload,
    Upload,
    UploadTooLarge,
    clean_filename,
    write_json,
)

BATCH_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"
ENDPOINT = "/v1/images/generations"
CONTENT = "content.jsonl"
MAX_PROBLEMS = 100  # problems reported per file (the count of bad lines is always given)
MAX_LINE_BYTES = 65536  # one line is one request body: limits.max_body_bytes' default, as the live route


class BatchLine(Params):
    """One line of a batch input file (OpenAI's batch request line). Unknown keys are refused, as in a body."""

    custom_id: str = Field(..., min_length=1, max_length=512, description="your id for the request: unique per file")
    method: Literal["POST"] = Field(..., description="always POST")
    url: Literal["/v1/images/generations"] = Field(..., description="the endpoint: /v1/images/generations")
    body: GenerationBody = Field(..., description="the body of POST /v1/images/generations")


class LineProblem(BaseModel):
    """A bad line: its 1-based number, the field (``body.prompt``; None for the line as a whole) and what to do."""

    line: int = Field(description="1-based line number in the file")
    param: str | None = Field(description="the field, dotted (custom_id, body.n, ...); null = the whole line")
    message: str = Field(description="what is wrong and the fix")


class BatchFileRejected(InvalidUpload):
    """A batch input file with bad lines (400); ``problems`` lists them by line and field."""

    param = "file"

    def __init__(self, problems: list[LineProblem], bad_lines: int):
        shown = "; ".join(f"line {p.line}: {p.param + ': ' if p.param else ''}{p.message}" for p in problems[:5])
        more = f" (and {bad_lines - 5} more: see error.problems)" if bad_lines > 5 else ""
        super().__init__(f"the batch file has {bad_lines} bad line(s): {shown}{more}", "file")
        self.problems, self.bad_lines = problems, bad_lines

    def error_fields(self) -> dict[str, Any]:
        """What ``serving.uploads.routes.error_response`` adds to ``error``: ``code`` and every problem."""
        return {"code": "invalid_batch_file", "problems": [p.model_dump() for p in self.problems]}


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "line"


def limit_problems(body: GenerationBody, lim: RequestLimits) -> list[tuple[str, str]]:
    """The configured limits a body breaks, as (field, message) — the checks ``serving.engine.Engine.prepare`` makes
    that need no model (the size's multiple and the model name are checked when the request runs)."""
    out = []
    if len(body.prompt) > lim.max_prompt_chars:
        out.append(("prompt", f"{len(body.prompt)} characters > {lim.max_prompt_chars} (limits.max_prompt_chars)"))
    if len(body.negative_prompt) > lim.max_prompt_chars:
        out.append(("negative_prompt", f"longer than {lim.max_prompt_chars} characters (limits.max_prompt_chars)"))
    if body.n > lim.max_n:
        out.append(("n", f"{body.n} is outside 1..{lim.max_n} (limits.max_n)"))
    if body.steps is not None and body.steps > lim.max_steps:
        out.append(("steps", f"{body.steps} is outside 1..{lim.max_steps} (limits.max_steps)"))
    if body.seed is not None and body.seed >= 2**63 - lim.max_n:  # Engine.prepare's bound: seed + i below 2^63
        out.append(("seed", f"{body.seed} is outside 0..{2**63 - lim.max_n - 1}: image i uses seed + i, which stays "
                            f"below 2^63 for every n up to limits.max_n ({lim.max_n})"))  # fmt: skip
    if body.guidance is not None and body.guidance > lim.max_guidance:
        out.append(("guidance", f"{body.guidance} is outside 0..{lim.max_guidance} (limits.max_guidance)"))
    if body.size and body.size != "auto":
        for name, side in zip(("width", "height"), (int(v) for v in body.size.split("x"))):
            if not lim.min_size <= side <= lim.max_size:
                out.append(("size", f"{name} {side} px is outside {lim.min_size}..{lim.max_size} (limits.*_size)"))
    if body.response_format != "b64_json":
        out.append(("response_format", "batch results carry each image as b64_json in the output file; remove it"))
    return out


def check_line(raw: bytes, number: int, lim: RequestLimits) -> BatchLine | list[LineProblem]:
    """Parse and validate one line (``raw``: its bytes without the newline); the line, or its problems."""
    from serving.http import ApiError, read_json  # the live route's JSON reader (serving.http imports this package)

    if len(raw) > MAX_LINE_BYTES:
        return [LineProblem(line=number, param=None, message=f"{len(raw)} bytes > {MAX_LINE_BYTES}: one request "
                            "body is at most that long")]  # fmt: skip
    try:
        value = read_json(raw, "application/json")
    except ApiError as exc:
        return [LineProblem(line=number, param=exc.param if exc.param not in (None, "body") else None,
                            message=exc.message)]  # fmt: skip
    except json.JSONDecodeError as exc:
        return [LineProblem(line=number, param=None, message=f"not JSON: {exc.msg} at column {exc.colno}")]
    if not isinstance(value, dict):
        return [LineProblem(line=number, param=None, message="one JSON object {custom_id, method, url, body} a line")]
    try:
        line = BatchLine.model_validate(value)
    except ValidationError as exc:
        return [LineProblem(line=number, param=_dotted(e["loc"]), message=e["msg"]) for e in exc.errors()]
    problems = [LineProblem(line=number, param=f"body.{f}", message=m) for f, m in limit_problems(line.body, lim)]
    return problems or line


def validate_jsonl(path: Path, cfg: BatchesArgs, lim: RequestLimits) -> int:
    """Check every line of a batch input file; returns how many requests it holds (blank lines are skipped).

    Raises:
        BatchFileRejected: any bad line, a repeated ``custom_id``, more than ``batches.max_requests`` lines, or none.
    """
    problems: list[LineProblem] = []
    bad: set[int] = set()
    seen: dict[str, int] = {}
    count = 0

    def report(found: list[LineProblem]) -> None:
        bad.update(p.line for p in found)
        problems.extend(found[: max(0, MAX_PROBLEMS - len(problems))])

    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            count += 1
            if count > cfg.max_requests:
                report([LineProblem(line=number, param=None, message=f"more than {cfg.max_requests} requests in one "
                                    "file (batches.max_requests): split it into several batches")])  # fmt: skip
                break
            checked = check_line(raw.rstrip(b"\r\n"), number, lim)
            if isinstance(checked, list):
                report(checked)
                continue
            first = seen.setdefault(checked.custom_id, number)
            if first != number:
                report([LineProblem(line=number, param="custom_id", message=f"{checked.custom_id[:64]!r} is also "
                                    f"the custom_id of line {first}: give every request its own")])  # fmt: skip
    if count == 0:
        report([LineProblem(line=1, param=None, message="the file holds no request lines; one JSON object per line")])
    if bad:
        raise BatchFileRejected(problems, len(bad))
    return count


def read_lines(path: Path) -> Iterator[BatchLine]:
    """The requests of a validated input file, in file order (the runner's source), each line read as
    ``check_line`` read it at upload (``serving.http.read_json``: a UTF-8 byte-order mark skipped, as a body's).

    Raises:
        ValueError: a line that no longer parses (the file changed on disk since it was checked)."""
    from serving.http import ApiError, read_json

    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    value = read_json(raw.rstrip(b"\r\n"), "application/json")
                except ApiError as exc:
                    raise ValueError(f"line {number}: {exc.message}") from exc
                yield BatchLine.model_validate(value)


class BatchFiles:
    """What the ``FileStore`` does for ``purpose=batch``: bound the upload, validate its lines, keep it as
    ``content.jsonl``. Registered on the store as ``store.handlers["batch"]`` by the ingress."""

    purpose = BATCH_PURPOSE

    def __init__(self, cfg: BatchesArgs, limits: RequestLimits):
        self.cfg, self.limits = cfg, limits

    def bound(self, upload: Upload) -> None:
        """Lower a streaming upload's byte limit to ``batches.max_file_bytes`` once its purpose is known."""
        if self.cfg.max_file_bytes < upload.max_bytes:
            upload.max_bytes, upload.limit_name = self.cfg.max_file_bytes, "batches.max_file_bytes"

    def ingest(self, store: FileStore, upload: Upload, filename: str, tenant: str) -> FileObject:
        """Validate a received batch file and move it into place. Raises UploadTooLarge, BatchFileRejected."""
        upload.close()
        if upload.bytes > self.cfg.max_file_bytes:
            raise UploadTooLarge(f"the batch file is larger than {self.cfg.max_file_bytes} bytes "
                                 "(batches.max_file_bytes): split it into several batches")  # fmt: skip
        requests = validate_jsonl(upload.archive, self.cfg, self.limits)
        os.rename(upload.archive, upload.folder / CONTENT)
        file = FileObject(id=upload.id, bytes=upload.bytes, created_at=int(store.clock()),
                          filename=clean_filename(filename), purpose=BATCH_PURPOSE, status="processed")  # fmt: skip
        write_json(upload.folder / META, {"tenant": tenant, "file": file.model_dump(), "requests": requests})
        os.rename(upload.folder, store.root / file.id)
        upload.kept = True
        return file


def content_path(store: FileStore, file_id: str, tenant: str) -> Path:
    """The bytes of a JSONL file (batch input or output) of ``tenant``.

    Raises:
        FileNotFound: no such file for this tenant.
        InvalidUpload: a file without downloadable content (a fine-tuning dataset).
    """
    file = store.get(file_id, tenant)
    path = store.root / file_id / CONTENT
    if file.purpose not in (BATCH_PURPOSE, OUTPUT_PURPOSE) or not path.is_file():
        raise InvalidUpload(f"file {file_id} (purpose {file.purpose!r}) has no content to download: only batch "
                            "input and output files do", "file_id")  # fmt: skip
    return path


def input_requests(store: FileStore, file_id: str, tenant: str) -> tuple[Path, int]:
    """(the content path, the request count) of a batch input file, for ``POST /v1/batches``.

    Raises:
        FileNotFound: no such file for this tenant.
        InvalidUpload: a file of another purpose.
    """
    file = store.get(file_id, tenant)
    if file.purpose != BATCH_PURPOSE:
        raise InvalidUpload(f"input_file_id {file_id} has purpose {file.purpose!r}: upload the JSONL with "
                            "purpose=batch", "input_file_id")  # fmt: skip
    meta = json.loads((store.root / file_id / META).read_text())
    return store.root / file_id / CONTENT, int(meta["requests"])


def write_output_file(store: FileStore, tenant: str, filename: str, source: Path, file_id: str | None = None
                      ) -> FileObject:  # fmt: skip
    """Keep ``source`` (a JSONL the runner wrote) as a ``batch_output`` file of ``tenant`` under ``file_id`` (None:
    a new one); ``source`` is moved."""
    file_id = file_id or f"file-{secrets.token_hex(12)}"
    folder = store.root / ".staging" / file_id
    folder.mkdir(parents=True)
    os.rename(source, folder / CONTENT)
    file = FileObject(id=file_id, bytes=(folder / CONTENT).stat().st_size, created_at=int(store.clock()),
                      filename=filename, purpose=OUTPUT_PURPOSE, status="processed")  # fmt: skip
    write_json(folder / META, {"tenant": tenant, "file": file.model_dump()})
    os.rename(folder, store.root / file_id)
    return file
