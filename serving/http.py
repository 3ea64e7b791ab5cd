"""The HTTP face of the Serve app: OpenAI-compatible images API, a raw-PNG route, health, admin and a web page.

Errors use OpenAI's body (``{"error": {"message", "type", "param", "code"}}``): bad input is 400 (never 500),
an unknown model 404, a refused adapter 422, a missing key 401, a full queue 503 with ``Retry-After``, a
generation slower than ``deployment.request_timeout_s`` 504.
"""

import asyncio
import base64
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


@web.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's complaints as one 400 naming every field (malformed JSON included)."""
    problems, first = [], None
    for err in exc.errors():
        loc = [str(x) for x in err["loc"] if x not in ("body", "query")]
        field = ".".join(loc) or "body"
        msg = err["msg"]
        if err["type"] == "json_invalid":
            field, msg = "body", f"is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        elif err["type"] == "model_attributes_type":
            field, msg = "body", "must be a JSON object"
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
    def __init__(self, generator: DeploymentHandle, args: ServeArgs | dict):
        self.gen = generator
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
        data = [
            ImageData(b64_json=base64.b64encode(png).decode(), seed=seed, revised_prompt=body.prompt)
            for png, seed in zip(out["images"], out["seeds"])
        ]
        return ImagesResponse(
            created=int(time.time()), data=data, model=out["model"], version=out["version"], size=out["size"]
        )

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
