"""The HTTP face of the Serve app: OpenAI-compatible images API, a raw-PNG route, health, admin and a web page.

Errors use OpenAI's body (``{"error": {"message", "type", "param", "code"}}``): bad input is 400 (never 500),
a body not sent as JSON 415, an unknown model or image 404, a refused adapter 422, a missing key 401, a full queue
503 with ``Retry-After``, a generation slower than ``deployment.request_timeout_s`` 504.

Request bodies are JSON only (``Content-Type: application/json``), as OpenAI's API: a body sent as a form
(``curl -d``), ``text/plain`` or with no type is refused with 415 naming the type it came with, even when its text
is valid JSON — the type decides how a body is read, and a browser may post forms and text/plain from any web
page without asking first (no CORS preflight), which would let other sites draw on a server that has no API key.
"""

import asyncio
import base64
import email.message
import hmac
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.config import ServeArgs
from serving.engine import ImageRequest
from serving.image_store import IMAGE_ID
from serving.schemas import GenerationBody, ImageData, ImagesResponse, ModelList, error_body

log = logging.getLogger("ray.serve")
PUBLIC = {"/healthz", "/readyz", "/", "/docs", "/openapi.json", "/docs/oauth2-redirect"}  # hold no data
PAGE = (Path(__file__).parent / "static" / "index.html").read_text()

web = FastAPI(
    title="lorafleet",
    description="Stable-Diffusion LoRA adapters served by Ray Serve. OpenAI-compatible: POST /v1/images/generations.",
    version="0.1.0",
)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 — refused on its Content-Length before anything is
    read, or, sent chunked without one, as soon as the bytes received pass the limit (FastAPI would turn an
    error raised while it reads the body into a 400, so the body is read here and replayed)."""

    max_bytes = 65536  # set from limits.max_body_bytes when the ingress starts

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await self._refuse(send, limit)
        received, seen = [], 0  # read the body here (at most `limit` bytes), then hand it on
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > limit:
                return await self._refuse(send, limit)
            if not message.get("more_body"):
                break
        replay = iter(received)

        async def replayed():
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = json.dumps(error_body(413, f"request body larger than {limit} bytes (limits.max_body_bytes)", "body"))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})


web.add_middleware(BodyLimit)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after


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
        loc = [str(x) for x in err["loc"] if x not in ("body", "query")]
        field = ".".join(loc) or "body"
        msg = err["msg"]
        if err["type"] == "json_invalid":
            where = _json_position(exc.body, err["loc"][1] if len(err["loc"]) > 1 else None)
            field, msg = "body", f"is not valid JSON: {err.get('ctx', {}).get('error', 'parse error')}{where}"
        elif err["type"] == "model_attributes_type":
            field, msg = "body", "must be a JSON object"
        elif err["type"] == "missing" and field == "body":
            msg = "missing: send a JSON object with the header 'Content-Type: application/json'"
        first = first or field
        if err["type"] == "extra_forbidden":
            msg = "is not a field of this request; remove it"
        problems.append(f"{field}: {msg}")
    return JSONResponse(error_body(400, "; ".join(problems), first), status_code=400)


@web.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


@serve.deployment
@serve.ingress(web)
class Api:
    def __init__(self, generator: DeploymentHandle, args: ServeArgs | dict, images: DeploymentHandle):
        self.gen = generator
        self.images = images  # serving.app.ImageUrls: the one store of response_format "url" images
        self.args = ServeArgs.model_validate(args)
        self.key = self.args.api_key()
        self.epoch = 0
        BodyLimit.max_bytes = self.args.limits.max_body_bytes

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        path, root = request.url.path, request.scope.get("root_path", "")
        if self.key is None or (path[len(root) :] if root and path.startswith(root) else path) in PUBLIC:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

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
            raise ApiError(e["status"], e["message"], e["param"], d.retry_after_s if e["status"] == 503 else None)
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
    @web.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)

    @web.get("/healthz", summary="liveness: the HTTP layer answers")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @web.get("/readyz", summary="readiness: a generator replica answers")
    async def readyz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self.gen.ready.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return JSONResponse(error_body(503, f"no generator replica is ready: {exc}"), status_code=503)
        return JSONResponse({"status": "ready"})

    @web.get("/v1/models", response_model=ModelList, summary="base model, configured adapters, registry versions")
    async def models(self, request: Request) -> dict:
        self._auth(request)
        return await self.gen.models.remote()

    @web.post("/v1/images/generations", response_model=ImagesResponse, summary="OpenAI-compatible image generation")
    async def generations(self, body: GenerationBody, request: Request) -> ImagesResponse:
        self._auth(request)
        out = await self._call(body.to_request())
        if body.response_format == "url":
            kept = await self._images("put", out["images"])
            if "error" in kept:
                raise ApiError(507, kept["error"], "response_format")
            data = [
                ImageData(
                    url=str(request.url_for("image", image_id=image_id)),
                    expires_at=int(expires_at),
                    seed=seed,
                    revised_prompt=body.prompt,
                )
                for (image_id, expires_at), seed in zip(kept["images"], out["seeds"])
            ]
        else:
            data = [
                ImageData(b64_json=base64.b64encode(png).decode(), seed=seed, revised_prompt=body.prompt)
                for png, seed in zip(out["images"], out["seeds"])
            ]
        return ImagesResponse(
            created=int(time.time()), data=data, model=out["model"], version=out["version"], size=out["size"]
        )

    @web.get(
        "/v1/images/{image_id}.png",
        name="image",
        response_class=Response,
        summary="an image made with response_format 'url' (same API key; kept image_urls.ttl_s seconds)",
    )
    async def image(self, request: Request, image_id: str) -> Response:
        self._auth(request)
        png = await self._images("get", image_id) if IMAGE_ID.match(image_id) else None
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
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-transform"})

    @web.get("/v1/generate", response_class=Response, summary="one image as raw image/png")
    async def generate_png(
        self,
        request: Request,
        prompt: str = Query(..., min_length=1, description="what to draw"),
        adapter: str | None = Query(None, description="model name; omitted = the default model"),
        seed: int | None = Query(None, ge=0),
        steps: int | None = Query(None, ge=1),
        guidance: float | None = Query(None, ge=0, allow_inf_nan=False),
        size: str | None = Query(None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="WIDTHxHEIGHT"),
    ) -> Response:
        self._auth(request)
        body = GenerationBody(prompt=prompt, model=adapter, seed=seed, steps=steps, guidance=guidance, size=size)
        out = await self._call(body.to_request())
        headers = {"X-Seed": str(out["seeds"][0]), "X-Model": out["model"], "X-Version": str(out["version"])}
        return Response(out["images"][0], media_type="image/png", headers=headers)

    @web.post("/admin/reload", summary="look the champion up in the registry now (all replicas follow)")
    async def reload(self, request: Request) -> dict:
        self._auth(request)
        self.epoch += 1
        return {"epoch": self.epoch, "models": await self.gen.refresh.remote()}

    @web.get("/admin/stats", summary="batching, cache and request counters of one generator replica")
    async def stats(self, request: Request) -> dict:
        self._auth(request)
        return await self.gen.stats.remote()
