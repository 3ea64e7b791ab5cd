"""The HTTP face of the Serve app: OpenAI-compatible images API, a raw-PNG route, health, admin and a web page.

Errors use OpenAI's body (``{"error": {"message", "type", "param", "code"}}``): bad input is 400 (never 500),
a body not sent as JSON 415, an unknown model or image 404, a refused adapter 422, a missing key 401, a full queue
503 with ``Retry-After``, a generation slower than ``deployment.request_timeout_s`` 504, too many ratings a minute
(``POST /v1/feedback``, serving/feedback_routes.py) 429 with ``Retry-After``.

Request bodies are JSON only (``Content-Type: application/json``), as OpenAI's API: a body sent as a form
(``curl -d``), ``text/plain`` or with no type is refused with 415 naming the type it came with, even when its text
is valid JSON — the type decides how a body is read, and a browser may post forms and text/plain from any web
page without asking first (no CORS preflight), which would let other sites draw on a server that has no API key.

A request is refused in this order, each answer naming what to change: the API key (401, before any of the
request is read — see ``Gate``; the key also names the request's tenant, serving/tenants.py), the body's headers
(a Content-Length that is not a byte count 400, a Content-Encoding 415), its size (413), its bytes as JSON
(``read_json``: charset, nesting, number size, duplicate keys — 400/415), then its fields (pydantic, 400 naming each
field).
"""

import asyncio
import base64
import codecs
import email.message
import inspect
import json
import logging
import re
import time
import typing
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import canary, production
from serving.batches import routes as batches
from serving.batches.store import CreateBatchBody
from serving.catalog import configured_cards
from serving.config import ServeArgs
from serving.feedback import FeedbackBody
from serving.feedback_routes import FeedbackRoutes
from serving.finetune import routes as finetune
from serving.finetune.jobs import CreateJobBody
from serving.image_request import ImageRequest
from serving.image_store import IMAGE_ID
from serving.response_cache import etag, not_modified, png_headers
from serving.schemas import GenerateQuery, GenerationBody, ImageData, ImagesResponse, ModelList, Params, error_body
from serving.tenants import STATE_KEY, KeyRing, NotFound, Tenant, tenant_of
from serving.uploads import routes as files
from serving.uploads.store import FileStore

log = logging.getLogger("ray.serve")
MODELS_WAIT_S = 1.0  # GET /v1/models answers within this (issue 22: it once waited for a registry that was down)
PUBLIC = {"/healthz", "/readyz", "/", "/stats", "/docs", "/openapi.json", "/docs/oauth2-redirect"}  # hold no data
PAGE = (Path(__file__).parent / "static" / "index.html").read_text()
STATS_PAGE = (Path(__file__).parent / "static" / "stats.html").read_text()

web = FastAPI(
    title="lorafleet",
    description="Stable-Diffusion LoRA adapters served by Ray Serve. OpenAI-compatible: POST /v1/images/generations.",
    version="0.1.0",
)


def _current_api() -> "Api":
    """The ingress instance serving this request (how Ray Serve's class-based routes find ``self``)."""
    return serve.get_replica_context().servable_object


class Gate:
    """ASGI middleware, the first to see a request; it refuses, in this order:

    1. a missing or wrong API key (401) on every path but ``PUBLIC`` — before anything else of the request is
       read, so a caller without the key learns nothing from bodies, parameters or routes. The key's tenant goes
       into ``scope["state"]`` for the routes (``serving.tenants.tenant_of(request)``);
    2. a Content-Length that is not one byte count (400 naming the header), a Content-Encoding other than
       ``identity`` (415 naming it, with ``Accept-Encoding: identity`` as RFC 7694 asks). Compressed bodies are
       refused rather than inflated: bodies are at most ``limits.max_body_bytes`` (64 KiB) of JSON, so gzip
       saves a client little, while inflating needs its own bound against decompression bombs; OpenAI's SDKs
       send bodies uncompressed;
    3. a body over ``max_bytes`` (413) — on its Content-Length before anything is read, or, sent chunked, as
       soon as the bytes received pass the limit (FastAPI would turn an error raised while it reads the body
       into a 400, so the body is read here and replayed).

    ``POST /v1/files`` (an upload of up to ``files.max_bytes``) is refused on its Content-Length against
    ``upload_bytes`` but not read here: its route streams the body to disk and counts it (serving/uploads).
    """

    max_bytes = 65536  # set from limits.max_body_bytes when the ingress starts
    upload_bytes = 65536  # POST /v1/files: set from files.max_bytes (+ multipart framing) when the ingress starts

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        upload = files.is_upload(scope)  # POST /v1/files: its route streams the body to disk and counts it
        who = _current_api().authenticate(scope)
        if isinstance(who, Tenant):
            scope.setdefault("state", {})[STATE_KEY] = who
        limit, key = (self.upload_bytes, "files.max_bytes") if upload else (self.max_bytes, "limits.max_body_bytes")
        refusal = who if isinstance(who, tuple) else _header_problem(headers, limit, key)
        if refusal is not None:
            return await _refuse(send, *refusal)
        if upload:
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        received, seen = [], 0  # read the body here (at most `limit` bytes), then hand it on
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > limit:
                return await _refuse(send, *_too_large(limit))
            if not message.get("more_body"):
                break
        replay = iter(received)

        async def replayed():
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)


Refusal = tuple[int, str, str | None, dict[str, str]]  # status, message, param, extra headers


def _too_large(limit: int, key: str = "limits.max_body_bytes") -> Refusal:
    return 413, f"request body larger than {limit} bytes ({key})", "body", {}


def _header_problem(headers: list[tuple[bytes, bytes]], limit: int, key: str) -> Refusal | None:
    """A Content-Length or Content-Encoding this API cannot read the body by, or a declared size over ``limit``."""
    lengths = {v.strip() for k, v in headers if k.lower() == b"content-length"}
    if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
        shown = ", ".join(sorted(repr(v.decode("latin-1")) for v in lengths))
        return (
            400, f"Content-Length header {shown} is not one byte count (a non-negative integer): send the body's "
            "size in bytes, or leave the header out and let the client set it", "Content-Length", {},
        )  # fmt: skip
    if lengths and int(next(iter(lengths))) > limit:
        return _too_large(limit, key)
    codings = [
        c.strip().lower()
        for k, v in headers
        if k.lower() == b"content-encoding"
        for c in v.decode("latin-1").split(",")
        if c.strip()
    ]
    if any(c != "identity" for c in codings):
        return (
            415, f"Content-Encoding {', '.join(codings)!r} is not accepted: send the body uncompressed (it is at most "
            f"{limit} bytes of JSON; limits.max_body_bytes)", "Content-Encoding", {"Accept-Encoding": "identity"},
        )  # fmt: skip
    return None


async def _refuse(send, status: int, message: str, param: str | None, headers: dict[str, str]) -> None:
    body = json.dumps(error_body(status, message, param)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class ApiError(StarletteHTTPException):
    """An error answer in OpenAI's body. An HTTPException, so FastAPI lets one raised while it reads a body pass
    (any other exception there becomes its generic 400 "There was an error parsing the body")."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(status, message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after


MAX_DEPTH = 32  # JSON nesting: these bodies are flat objects; Python's parser itself fails near 1000 levels
MAX_DIGITS = 100  # integer literals: the largest value any field takes, a seed below 2^63, has 19 digits
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class _Refused:
    """A value ``json`` can read but this API does not take; reported under the key it was given for."""

    def __init__(self, why: str):
        self.why = why


def _integer(text: str) -> int | _Refused:
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        return _Refused(f"a number with {digits} digits: no field takes more than 19 (limit {MAX_DIGITS})")
    return int(text)


def _constant(name: str) -> _Refused:
    return _Refused(f"{name} is not JSON (RFC 8259 has no NaN or Infinity): send a finite number")


def _object(pairs: list[tuple[str, Any]]) -> dict:
    counts = Counter(key for key, _ in pairs)
    for key, value in pairs:
        if counts[key] > 1:
            raise ApiError(400, f"{key}: given {counts[key]} times in one JSON object; give it once", key)
        refused = _refused_in_arrays(value)
        if refused is not None:
            raise ApiError(400, f"{key}: {refused.why}", key)
    return dict(pairs)


def _refused_in_arrays(value: Any) -> _Refused | None:
    if isinstance(value, _Refused):
        return value
    if isinstance(value, list):
        return next((r for r in map(_refused_in_arrays, value) if r is not None), None)
    return None  # objects were checked as they were read


def _nesting(text: str) -> int:
    """The deepest ``[``/``{`` nesting of JSON text, brackets inside strings not counted."""
    depth = deepest = 0
    for bracket in _NOT_BRACKET.sub("", _STRING.sub('""', text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _decode(body: bytes, content_type: str | None) -> str:
    """The body's text: by the Content-Type's ``charset`` when it names one other than UTF-8 (a client that
    declares ``charset=latin-1`` and sends latin-1 bytes meant those characters; RFC 8259 defines no charset
    parameter and asks for UTF-8, so nothing is guessed when none is named), else as ``json.loads`` reads bytes:
    UTF-8, a UTF-8 byte-order mark skipped, UTF-16/32 recognised by their BOM or zero bytes."""
    message = email.message.Message()
    message["content-type"] = content_type or ""
    charset = message.get_param("charset")
    charset = charset.strip() if isinstance(charset, str) and charset.strip() else None
    try:
        codec = codecs.lookup(charset).name if charset else "utf-8"
        if codec in ("utf-8", "utf-8-sig"):
            codec, charset = json.detect_encoding(body), None
        return body.decode(codec, "surrogatepass" if codec.startswith("utf") else "strict")
    except LookupError as exc:  # no such codec, or one that is not text (base64, zlib)
        raise ApiError(
            415, f"Content-Type charset {charset!r} is not a text encoding this server knows: send the body as "
            "UTF-8 (JSON's encoding, RFC 8259) and drop the charset", "Content-Type",
        ) from exc  # fmt: skip
    except UnicodeDecodeError as exc:
        bad = body[exc.start : exc.start + 1].hex()
        if charset:
            raise ApiError(
                400, f"body: byte 0x{bad} at offset {exc.start} is not {charset!r}, the charset its Content-Type "
                "names: send UTF-8 (JSON's encoding, RFC 8259) and drop the charset", "body",
            ) from exc  # fmt: skip
        raise ApiError(
            400, f"body: byte 0x{bad} at offset {exc.start} is not {codec.upper()}: JSON is UTF-8 (RFC 8259); send "
            "UTF-8, or name the encoding the body is in, e.g. 'Content-Type: application/json; charset=latin-1'",
            "body",
        ) from exc  # fmt: skip


def read_json(body: bytes, content_type: str | None) -> Any:
    """Parse a request body as JSON, refusing what Python's ``json`` would take or fail on without saying why.

    Args:
        body: the raw bytes (at most ``limits.max_body_bytes``: ``Gate`` refused larger ones).
        content_type: the Content-Type header, for its ``charset`` (see ``_decode``).

    Returns:
        The parsed value (any JSON value; the body model says which it must be).

    Raises:
        ApiError: 415 for a charset that is no text encoding; 400 naming the problem for bytes that are not in the
            body's encoding, nesting deeper than ``MAX_DEPTH``, an integer literal longer than ``MAX_DIGITS``
            digits (Python refuses past 4300), ``NaN``/``Infinity`` (not JSON), and a key given twice in one
            object (which one was meant is not guessable; Python would keep the last) — the last three name the
            key as ``param``.
        json.JSONDecodeError: broken syntax; FastAPI reports it at its position.
    """
    text = _decode(body, content_type)
    depth = _nesting(text)
    if depth > MAX_DEPTH:
        raise ApiError(
            400, f"body: JSON nested {depth} levels deep; the limit is {MAX_DEPTH} (these bodies are flat objects)",
            "body",
        )  # fmt: skip
    value = json.loads(text, parse_int=_integer, parse_constant=_constant, object_pairs_hook=_object)
    refused = _refused_in_arrays(value)
    if refused is not None:
        raise ApiError(400, f"body: {refused.why}", "body")
    return value


class JsonRequest(Request):
    """A request whose JSON body is read by ``read_json`` (FastAPI calls ``request.json()`` for JSON types)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = read_json(await self.body(), self.headers.get("content-type"))
        return self._json


class JsonRoute(APIRoute):
    """Every route of ``web``: its handler gets a ``JsonRequest`` (FastAPI's documented custom-request hook)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(JsonRequest(request.scope, request.receive))

        return handle


web.router.route_class = JsonRoute
web.add_middleware(Gate)


@web.exception_handler(NotFound)
async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    """Another tenant's id reads as one that does not exist (serving.tenants.require_owner)."""
    return JSONResponse(error_body(404, str(exc), exc.param), status_code=404)


@web.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    if exc.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(exc.status, exc.message, exc.param), status_code=exc.status, headers=headers)


def is_json_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/<x>+json`` (parameters such as charset allowed): the Content-Types
    FastAPI reads a body as JSON for."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _not_json(content_type: str | None, body: object) -> str:
    try:
        json.loads(body)
        parses = " (its text is valid JSON: only the header is wrong)"
    except (TypeError, ValueError):
        parses = ""
    sent = f"with Content-Type {content_type!r}" if content_type else "without a Content-Type"
    return (
        f"the request body was sent {sent}{parses}; this API reads JSON bodies only: send the header "
        "'Content-Type: application/json' (curl: -H 'Content-Type: application/json', or --json instead of -d, "
        "which sends application/x-www-form-urlencoded)"
    )


def _json_position(doc: object, pos: object) -> str:
    """`line L column C (char N)` of a JSON parse error, as Python's json module words it."""
    if not isinstance(pos, int):
        return ""
    text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else doc if isinstance(doc, str) else ""
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return f" at line {line} column {column} (char {pos})"


# pydantic's names for the members of a union in an error's location (`n_epochs.constrained-int`): not a field
_UNION_TAG = re.compile(r"^(constrained-\w+|literal\[.*\]|function-\w+\[.*\]|lax-\w+|json-or-python\[.*\])\Z")


@web.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's complaints as one 400 naming every field (malformed JSON at its position); a body that came
    without a JSON Content-Type is a 415 naming the type it came with."""
    errors = exc.errors()
    content_type = request.headers.get("content-type")
    sent_body = isinstance(exc.body, (bytes, str)) and bool(exc.body)
    if sent_body and not is_json_type(content_type) and any(e["loc"][:1] == ("body",) for e in errors):
        return JSONResponse(error_body(415, _not_json(content_type, exc.body), "Content-Type"), status_code=415)
    problems, first = [], None
    for err in errors:
        loc = [str(x) for x in err["loc"] if x not in ("body", "query") and not _UNION_TAG.match(str(x))]
        field = ".".join(loc) or "body"
        msg = err["msg"]
        if err["type"] == "json_invalid":
            where = _json_position(exc.body, err["loc"][1] if len(err["loc"]) > 1 else None)
            field, msg = "body", f"is not valid JSON: {err.get('ctx', {}).get('error', 'parse error')}{where}"
        elif err["type"] == "model_attributes_type":  # the body, or a field such as hyperparameters
            msg = "must be a JSON object"
        elif err["type"] == "missing" and field == "body":
            msg = "missing: send a JSON object with the header 'Content-Type: application/json'"
        elif err["type"] == "one_key_per_field":
            field = err["ctx"]["field"]
        first = first or field
        if err["type"] == "extra_forbidden" and err["loc"][:1] == ("query",):
            msg = f"is not a parameter of this route (it takes {', '.join(_query_names(request)) or '-'}); remove it"
        elif err["type"] == "extra_forbidden":
            msg = "is not a field of this request; remove it"
        problems.append(f"{field}: {msg}")
    return JSONResponse(error_body(400, "; ".join(problems), first), status_code=400)


def _query_names(request: Request) -> list[str]:
    """The query parameters the matched route takes: the fields of its endpoint's query model."""
    endpoint = getattr(request.scope.get("route"), "endpoint", None)
    names: list[str] = []
    for parameter in inspect.signature(endpoint).parameters.values() if endpoint else ():
        model = typing.get_args(parameter.annotation)[:1]
        if model and isinstance(model[0], type) and issubclass(model[0], Params):
            names += [key for name in model[0].model_fields for key in model[0].field_keys(name)]
    return names


def _if_none_match(request: Request) -> str | None:
    """Every ``If-None-Match`` field of the request as one list (RFC 9110 §5.3), None when it sent none."""
    fields = request.headers.getlist("if-none-match")
    return ", ".join(fields) if fields else None


@web.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing's own answers (404, 405) in OpenAI's body; a 405 keeps its ``Allow`` header and names the methods."""
    message = str(exc.detail)
    if exc.status_code == 405 and exc.headers and "Allow" in exc.headers:
        message = f"{request.method} is not allowed on {request.url.path}: use {exc.headers['Allow']}"
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)


@serve.deployment
@serve.ingress(web)
class Api:
    def __init__(
        self,
        generator: DeploymentHandle,
        args: ServeArgs | dict,
        images: DeploymentHandle,
        feedback: DeploymentHandle | None = None,
        batch_worker: DeploymentHandle | None = None,
    ):
        self.gen = generator
        self.images = images  # serving.shared_stores.ImageUrls: the one store of response_format "url" images
        self.args = ServeArgs.model_validate(args)
        # serving.shared_stores.Feedback: the one store of image ids and ratings (None: feedback.enabled is false)
        self.feedback = FeedbackRoutes(self.args.feedback, feedback, self.args.deployment.retry_after_s)
        self.keys = KeyRing(self.args.tenants, self.args.api_key())
        self.epoch = 0
        Gate.max_bytes = self.args.limits.max_body_bytes
        self.files = FileStore(self.args.files)  # uploads (serving/uploads); created on the first one
        Gate.upload_bytes = files.upload_limit(self.files)
        self.finetune = finetune.FineTuning(self.args, self.files)  # jobs live next to the files (serving/finetune)
        if self.args.finetune.enabled:
            self.finetune.start()  # the queue's poller: starts queued jobs, follows running ones
        # batches (serving/batches): purpose=batch uploads, /v1/batches; the runner is the BatchWorker deployment
        self.batches = batches.Batches(self.args, self.files, batch_worker) if self.args.batches.enabled else None

    # ---- helpers ---------------------------------------------------------------------------------------------
    def authenticate(self, scope: dict) -> Tenant | Refusal | None:
        """The tenant whose key the request sends (``Authorization: Bearer <key>``); the 401 for a missing or
        unknown key on every path but ``PUBLIC``; None on a public path without a valid key. With no key configured
        anywhere (``api_key_env``, ``tenants``) every request is the default tenant. ``Gate`` asks first."""
        if not self.keys.required:
            return self.keys.default
        given = next((v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"), b"")
        scheme, _, token = given.decode("latin-1").partition(" ")
        tenant = self.keys.tenant_for(token.strip()) if scheme.lower() == "bearer" else None
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if tenant is not None or (path[len(root) :] if root and path.startswith(root) else path) in PUBLIC:
            return tenant
        return 401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None, {"WWW-Authenticate": "Bearer"}

    @staticmethod
    def _admin(request: Request) -> None:
        tenant = tenant_of(request)
        if not tenant.admin:
            raise ApiError(
                403, f"tenant {tenant.name!r} may not call {request.url.path}: admin routes need the api_key_env key "
                "or a key of an admin tenant (lorafleet keys add NAME --admin)",
            )  # fmt: skip

    @staticmethod
    def _request_id(request: Request, req: ImageRequest) -> ImageRequest:
        """``req`` with the client's ``X-Request-Id`` / ``Idempotency-Key`` (its canary arm's key; serving.canary)."""
        try:
            req.client_request_id = canary.client_request_id(
                {h: request.headers.getlist(h) for h in canary.REQUEST_ID_HEADERS}
            )
        except canary.BadRequestId as exc:
            raise ApiError(400, str(exc), exc.header) from exc
        return req

    async def _call(self, req: ImageRequest) -> dict:
        d = self.args.deployment
        response = self.gen.generate.remote(req, self.epoch)
        try:
            out = await asyncio.wait_for(response, timeout=d.request_timeout_s)
        except BackPressureError as exc:
            raise ApiError(503, f"server busy ({exc}); retry after {d.retry_after_s} s", None, d.retry_after_s) from exc
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            # the replica died (or is being replaced) with this request on it: nothing was drawn, retrying is safe
            log.warning("request lost with a generator replica: %s", type(exc).__name__)
            raise ApiError(
                503, f"a generator replica went away during this request; retry after {d.retry_after_s} s",
                None, d.retry_after_s,
            ) from exc  # fmt: skip
        except asyncio.TimeoutError as exc:
            response.cancel()
            raise ApiError(504, f"generation took longer than {d.request_timeout_s} s; retry or lower steps/n") from exc
        if "error" in out:
            e = out["error"]
            retry = e.get("retry_after") or d.retry_after_s  # the registry's retry interval for a registry name
            raise ApiError(e["status"], e["message"], e["param"], retry if e["status"] == 503 else None)
        return out

    async def _images(self, method: str, *args):
        """A call to the ImageUrls store; a store replica that is gone or being replaced is a 503, not a 500."""
        d = self.args.deployment
        try:
            return await getattr(self.images, method).remote(*args)
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError) as exc:
            log.warning("image store call %s failed: %s", method, type(exc).__name__)
            raise ApiError(
                503, f"the image store did not answer; retry after {d.retry_after_s} s or ask for response_format "
                "'b64_json'", None, d.retry_after_s,
            ) from exc  # fmt: skip

    # ---- routes ----------------------------------------------------------------------------------------------
    # GET routes that are cheap to answer also answer HEAD (load balancers check health by HEAD), kept out of the
    # OpenAPI schema (one operation id per route); GET /v1/generate does not: a HEAD would draw an image to discard
    @web.get("/", response_class=HTMLResponse, include_in_schema=False)
    @web.head("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)

    @web.get("/healthz", summary="liveness: the HTTP layer answers")
    @web.head("/healthz", include_in_schema=False)
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @web.get("/readyz", summary="readiness: a generator replica answers")
    @web.head("/readyz", include_in_schema=False)
    async def readyz(self) -> JSONResponse:
        try:
            details = await asyncio.wait_for(self.gen.ready.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return JSONResponse(error_body(503, f"no generator replica is ready: {exc}"), status_code=503)
        # ready while the registry is down (base and resolved names serve); the details say how stale the champion is
        return JSONResponse({"status": "ready", **({"details": details} if isinstance(details, dict) else {})})

    @web.get("/v1/models", response_model=ModelList, summary="base model, configured adapters, registry versions")
    @web.head("/v1/models", include_in_schema=False)
    async def models(self, request: Request) -> dict:
        """The tenant's own, shared and unowned adapters, as a generator replica knows them; within
        ``MODELS_WAIT_S`` (a replica never asks the registry for it, but may be slow to answer under load), else the
        configured names alone (``configured_cards``)."""
        response = self.gen.models.remote(tenant_of(request))
        try:
            return await asyncio.wait_for(response, timeout=MODELS_WAIT_S)
        except asyncio.TimeoutError:
            response.cancel()
            log.warning("no generator replica answered within %s s: listing the configured names", MODELS_WAIT_S)
            return {"object": "list", "data": configured_cards(self.args), "registry": None}

    @web.post("/v1/images/generations", response_model=ImagesResponse, summary="OpenAI-compatible image generation")
    async def generations(self, body: GenerationBody, request: Request, response: Response) -> ImagesResponse:
        tenant = tenant_of(request)
        out = await self._call(self._request_id(request, body.to_request(tenant)))
        self.feedback.notice(tenant.name, out)  # in the background: the answer never waits for the store
        ids = out.get("image_ids") or [None] * len(out["images"])
        response.headers["X-Cache"] = "hit" if out.get("cached") else "miss"  # the replica's response cache
        if body.response_format == "url":
            kept = await self._images("put", out["images"], tenant.name)
            if "error" in kept:
                raise ApiError(507, kept["error"], "response_format")
            data = [
                ImageData(
                    id=rated_id,
                    url=str(request.url_for("image", image_id=image_id)),
                    expires_at=int(expires_at),
                    seed=seed,
                    revised_prompt=body.prompt,
                )
                for (image_id, expires_at), seed, rated_id in zip(kept["images"], out["seeds"], ids)
            ]
        else:
            data = [
                ImageData(id=i, b64_json=base64.b64encode(png).decode(), seed=seed, revised_prompt=body.prompt)
                for png, seed, i in zip(out["images"], out["seeds"], ids)
            ]
        return ImagesResponse(
            created=int(time.time()), data=data, model=out["model"], version=out["version"], size=out["size"],
            arm=out.get("arm"),
        )  # fmt: skip

    @web.get(
        "/v1/images/{image_id}.png",
        name="image",
        response_class=Response,
        summary="an image made with response_format 'url' (same API key; kept image_urls.ttl_s seconds)",
    )
    @web.head("/v1/images/{image_id}.png", include_in_schema=False)
    async def image(self, request: Request, image_id: str) -> Response:
        owner = tenant_of(request).name  # another tenant's image id reads as an unknown one
        png = await self._images("get", image_id, owner) if IMAGE_ID.match(image_id) else None
        if png is None:
            urls = self.args.image_urls
            raise ApiError(
                404,
                f"no image {image_id[:64]!r} here: images made with response_format 'url' are kept {urls.ttl_s:g} s "
                f"(image_urls.ttl_s) and at most {urls.max_images} of them, oldest dropped first; this one expired, "
                "was dropped or never existed — generate it again (same seed, same image) or ask for "
                "response_format 'b64_json'",
                "image_id",
            )
        headers = {"Cache-Control": "private, no-transform", "ETag": etag(png)}  # an id's image never changes
        if not_modified(_if_none_match(request), headers["ETag"]):
            return Response(status_code=304, headers=headers)
        return Response(png, media_type="image/png", headers=headers)

    @web.get("/v1/generate", response_class=Response, summary="one image as raw image/png")
    async def generate_png(self, request: Request, query: Annotated[GenerateQuery, Query()]) -> Response:
        repeated = {k: n for k, n in Counter(k for k, _ in parse_qsl(request.url.query, True)).items() if n > 1}
        if repeated:
            key, times = next(iter(repeated.items()))
            raise ApiError(400, f"{key}: given {times} times in the query string; give it once", key)
        tenant = tenant_of(request)
        out = await self._call(self._request_id(request, query.to_request(tenant)))
        self.feedback.notice(tenant.name, out)
        headers = {"X-Seed": str(out["seeds"][0]), "X-Model": out["model"], "X-Version": str(out["version"])}
        if out.get("image_ids"):
            headers["X-Image-Id"] = out["image_ids"][0]  # the id POST /v1/feedback takes (also in the PNG)
        if out.get("arm"):
            headers["X-Lorafleet-Arm"] = out["arm"]
        headers["X-Cache"] = "hit" if out.get("cached") else "miss"
        headers |= png_headers(out["images"][0], query.seed is not None, self.args.response_cache.http_max_age_s)
        if not_modified(_if_none_match(request), headers.get("ETag")):  # RFC 9110 §15.4.5: 304 keeps the headers
            return Response(status_code=304, headers=headers)
        return Response(out["images"][0], media_type="image/png", headers=headers)

    @web.post("/admin/reload", summary="look the champion up in the registry now (all replicas follow)")
    async def reload(self, request: Request) -> dict:
        self._admin(request)
        self.epoch += 1
        return {"epoch": self.epoch, "models": await self.gen.refresh.remote()}

    @web.get("/admin/stats", summary="batching, cache and request counters of one generator replica")
    @web.head("/admin/stats", include_in_schema=False)
    async def stats(self, request: Request) -> dict:
        self._admin(request)
        return await self.gen.stats.remote()

    # ---- feedback: ratings of generated images (serving/feedback.py, serving/feedback_routes.py) ---------------
    @web.get("/v1/feedback", summary="the rating scale this server takes")
    async def feedback_config(self) -> Response:
        return self.feedback.config()

    @web.post("/v1/feedback", summary="rate a generated image (data[i].id / X-Image-Id); a second rating replaces")
    async def rate(self, request: Request, body: FeedbackBody) -> Response:
        return await self.feedback.rate(tenant_of(request).name, body)

    @web.get("/v1/feedback/summary", summary="admin: ratings per model and version")
    async def feedback_summary(self, request: Request) -> Response:
        self._admin(request)
        return await self.feedback.summary()

    async def _each_replica(self, method: str) -> tuple[list[dict], int | None]:
        """``method``'s answer from each generator replica that answers within 5 s, and the replicas configured (None:
        autoscaling). A handle reaches one replica per call and cannot broadcast, so this asks twice as many times as
        there are replicas (concurrently) and keeps one answer per pid: fewer answers than replicas means some
        replica is missing from a report (reports list the pids).

        Raises:
            ApiError: 503 when no replica answers.
        """
        d = self.args.deployment
        expected = d.num_replicas if isinstance(d.num_replicas, int) else None
        calls = [getattr(self.gen, method).remote() for _ in range(2 * (expected or 2))]
        try:
            answers = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=5)
        except asyncio.TimeoutError as exc:
            raise ApiError(503, f"no generator replica answered within 5 s; retry after {d.retry_after_s} s", None,
                           d.retry_after_s) from exc  # fmt: skip
        snapshots = list({a["pid"]: a for a in answers if isinstance(a, dict)}.values())
        if not snapshots:
            retry = d.retry_after_s
            raise ApiError(503, f"no generator replica answered; retry after {retry} s", None, retry)
        return snapshots, expected

    @web.get("/admin/canary", summary="the canary: each arm's version, counts, ratings and the verdict")
    async def canary_report(self, request: Request) -> dict:
        """``serving.canary.report`` over the generator replicas that answered (``_each_replica``), their counts
        summed."""
        self._admin(request)
        snapshots, expected = await self._each_replica("canary_state")
        summary = await self.feedback.ratings()  # None: feedback off or its store not answering
        return canary.report(snapshots, summary, self.args, expected)

    @web.get("/admin/production", summary="production figures: generations, latency, errors, ratings, versions")
    async def production_report(self, request: Request) -> dict:
        """``serving.production.report``: the generator replicas' records merged (``_each_replica``), the feedback
        store's ratings and the registry's versions with their gate status — what ``GET /stats`` draws."""
        self._admin(request)
        snapshots, expected = await self._each_replica("production")
        ratings = await self.feedback.ratings()
        listing = await self.models(request)  # the registry's versions as a replica knows them (never waits on it)
        return production.report(snapshots, ratings, listing.get("data", []), expected)

    @web.get("/stats", response_class=HTMLResponse, include_in_schema=False)
    @web.head("/stats", include_in_schema=False)
    async def stats_page(self) -> HTMLResponse:
        """The production figures as a page with plots (no data in it: it asks ``/admin/production`` with the key
        typed into it)."""
        return HTMLResponse(STATS_PAGE)

    # ---- files: OpenAI's files API over serving/uploads (the handlers and their errors live there) ----------
    @web.post(
        "/v1/files",
        summary="upload a zip or tar of images (+ captions) as multipart: file, purpose=fine-tune",
        openapi_extra=files.UPLOAD_SCHEMA,
    )
    async def create_file(self, request: Request) -> Response:
        return await files.create_file(self.files, request)

    @web.get("/v1/files", summary="your uploaded files, newest first")
    async def list_files(self, request: Request, query: Annotated[files.FileListQuery, Query()]) -> Response:
        return await files.list_files(self.files, request, query)

    @web.get("/v1/files/{file_id}", summary="one uploaded file: status and the dataset's validation report")
    async def retrieve_file(self, request: Request, file_id: str) -> Response:
        return await files.retrieve_file(self.files, request, file_id)

    @web.delete("/v1/files/{file_id}", summary="delete an uploaded file and its data")
    async def delete_file(self, request: Request, file_id: str) -> Response:
        return await files.delete_file(self.files, request, file_id)

    # ---- fine-tuning: OpenAI's fine-tuning jobs API over serving/finetune (handlers and errors live there) -------
    def _finetune(self) -> "finetune.FineTuning":
        if not self.args.finetune.enabled:
            raise ApiError(404, "fine-tuning is off on this server (finetune.enabled=false)")
        return self.finetune

    @web.post("/v1/fine_tuning/jobs", summary="start a fine-tuning job on an uploaded file")
    async def create_job(self, request: Request, body: CreateJobBody) -> Response:
        return await finetune.create_job(self._finetune(), request, body)

    @web.get("/v1/fine_tuning/jobs", summary="your fine-tuning jobs, newest first")
    async def list_jobs(self, request: Request, query: Annotated[finetune.PageQuery, Query()]) -> Response:
        return await finetune.list_jobs(self._finetune(), request, query)

    @web.get("/v1/fine_tuning/jobs/{job_id}", summary="one fine-tuning job")
    async def retrieve_job(self, request: Request, job_id: str) -> Response:
        return await finetune.retrieve_job(self._finetune(), request, job_id)

    @web.post("/v1/fine_tuning/jobs/{job_id}/cancel", summary="cancel a fine-tuning job in any state")
    async def cancel_job(self, request: Request, job_id: str) -> Response:
        return await finetune.cancel_job(self._finetune(), request, job_id)

    @web.get("/v1/fine_tuning/jobs/{job_id}/events", summary="a job's stage progress, newest first")
    async def job_events(
        self, request: Request, job_id: str, query: Annotated[finetune.PageQuery, Query()]
    ) -> Response:
        return await finetune.list_events(self._finetune(), request, job_id, query)

    @web.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", summary="a succeeded job's registered adapter")
    async def job_checkpoints(
        self, request: Request, job_id: str, query: Annotated[finetune.PageQuery, Query()]
    ) -> Response:
        return await finetune.list_checkpoints(self._finetune(), request, job_id, query)

    # ---- batches: OpenAI's Batch API over serving/batches (handlers and errors live there) ---------------------
    def _batches(self) -> "batches.Batches":
        if self.batches is None:
            raise ApiError(404, "batches are off on this server (batches.enabled=false)")
        return self.batches

    @web.get("/v1/files/{file_id}/content", summary="a batch input, output or error file's JSONL")
    async def file_content(self, request: Request, file_id: str) -> Response:
        return await batches.file_content(self.files, request, file_id)

    @web.post("/v1/batches", summary="run an uploaded JSONL of image requests (purpose=batch) at low priority")
    async def create_batch(self, request: Request, body: CreateBatchBody) -> Response:
        return await batches.create_batch(self._batches(), request, body)

    @web.get("/v1/batches", summary="your batches, newest first")
    async def list_batches(self, request: Request, query: Annotated[finetune.PageQuery, Query()]) -> Response:
        return await batches.list_batches(self._batches(), request, query)

    @web.get("/v1/batches/{batch_id}", summary="one batch: status, request_counts, output_file_id")
    async def retrieve_batch(self, request: Request, batch_id: str) -> Response:
        return await batches.retrieve_batch(self._batches(), request, batch_id)

    @web.post("/v1/batches/{batch_id}/cancel", summary="cancel a batch (finished requests stay in its output file)")
    async def cancel_batch(self, request: Request, batch_id: str) -> Response:
        return await batches.cancel_batch(self._batches(), request, batch_id)
