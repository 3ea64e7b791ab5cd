"""The Ray Serve app: a FastAPI ingress in front of generator replicas that batch requests into UNet passes.

    serve run configs/serve.yaml                 # local: HTTP on 127.0.0.1:8000 (make serve)
    serve deploy configs/serve.yaml              # onto a running cluster (ray start / KubeRay RayService)
    curl -o out.png "http://127.0.0.1:8000/v1/generate?prompt=a+red+circle+on+a+sks+background&seed=1"

``build_app(args: ServeArgs)`` is the typed application builder ``serve run`` calls with the config's ``args``.
Ray stays in this file; the engine it wraps is plain diffusers code (serving/engine.py).
"""

import asyncio
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from ray import serve
from ray.serve import Application

from evaluation.registry import client_for
from serving.adapters import AdapterUnavailable, UnknownModel, public_state
from serving.batches.deployment import BatchWorker
from serving.batches.runner import batch_room
from serving.canary import Canary
from serving.catalog import model_cards
from serving.config import ServeArgs, project_path
from serving.engine import Cancelled, Engine, ImageRequest, ImageResult, Prepared, RequestError
from serving.feedback import PNG_KEY, new_image_id
from serving.http import Api
from serving.images import png_bytes
from serving.passes import PassQueue
from serving.records import generation_record, recorder_for
from serving.response_cache import ResponseCache
from serving.shared_stores import Feedback, ImageUrls
from serving.telemetry import GeneratorMetrics
from serving.tenants import Tenant
from training.adapter import AdapterError
from training.quiet import quiet_libraries

log = logging.getLogger("ray.serve")


@dataclass
class _Queued:
    prepared: Prepared
    arrived: float  # time.monotonic() when the replica got it
    low: bool = False  # a batch request (serving/batches): fills the room interactive requests leave in a pass
    started: float | None = None  # time.monotonic() when its UNet pass began (records' queue wait)
    batch_images: int | None = None  # images in that pass


def error_result(exc: Exception) -> dict:
    """An exception from preparing or generating -> an error the ingress turns into an HTTP status."""
    if isinstance(exc, RequestError):
        return {"error": {"status": 400, "message": str(exc), "param": exc.field}}
    if isinstance(exc, UnknownModel):
        return {"error": {"status": 404, "message": str(exc), "param": "model"}}
    if isinstance(exc, AdapterError):
        return {"error": {"status": 422, "message": f"adapter refused: {exc}", "param": "model"}}
    if isinstance(exc, AdapterUnavailable):
        retry = {"retry_after": exc.retry_after_s} if exc.retry_after_s else {}
        return {"error": {"status": 503, "message": str(exc), "param": "model", **retry}}
    return {"error": {"status": 500, "message": f"generation failed: {type(exc).__name__}: {exc}", "param": None}}


def encode(result: ImageResult) -> dict:
    """A generation's answer; each image gets its id (serving/feedback.py), also inside its PNG."""
    ids = [new_image_id() for _ in result.images]
    return {
        "images": [png_bytes(img, {PNG_KEY: i}) for img, i in zip(result.images, ids)],
        "image_ids": ids,
        "seeds": result.seeds,
        "model": result.model,
        "version": result.version,
        "size": f"{result.images[0].width}x{result.images[0].height}",
    }


@serve.deployment
class Generator:
    """Holds one engine; ``generate`` calls are batched by images per pass (``@serve.batch``)."""

    def __init__(self, args: ServeArgs | dict):
        quiet_libraries()  # this replica's process: no library noise in the Serve logs
        self.args = ServeArgs.model_validate(args)
        for key, value in self.args.registry_env().items():  # MLflow's HTTP retries, once per replica process,
            os.environ.setdefault(key, value)  # before any registry call (build_app's runtime_env sets the same)
        # Every torch call of the replica runs on this one thread: with OpenMP teams started from two threads
        # (say, loading on one and generating on another), libgomp throttles its spin-waits once it manages more
        # threads than there are cores, and small ops got 3x slower on 2 cores (measured; see README, Serving).
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        cache = Path(project_path(self.args.adapter_cache_dir)) / f"replica-{os.getpid()}"
        self.engine = self._torch.submit(self._load, cache).result()
        self.canary = Canary(self.args)  # the challenger's share of champion requests (serving/canary.py)
        if self.args.resolved_tracking_uri():  # the champion and the listing, each waited for registry_deadline_s
            log.info("registry %s: %s", self.args.resolved_tracking_uri(), self.engine.resolver.refresh())
        self.metrics = GeneratorMetrics()
        self.responses = ResponseCache.from_args(self.args.response_cache)  # seeded repeats, after prepare
        self._started = time.time()
        self.records = recorder_for(self.args, on_drop=self.metrics.records_dropped)  # serving/records.py
        self._gone: dict[str, float] = {}  # request id whose caller went away -> when
        self._epoch = 0
        b = self.args.batching
        self._passes: PassQueue[_Queued, ImageResult | Exception] = PassQueue(
            self._run_pass,
            size=lambda q: q.prepared.request.n,
            max_images=b.max_batch_size,
            skip=lambda q: self._gone.pop(q.prepared.request.request_id, None) is not None,
            skipped=lambda q: Cancelled("the client went away before its pass"),
            low=lambda q: q.low,
            max_low=self.args.batches.max_images_per_pass,
        )
        self._batch_requests = 0  # batch requests held now, at most self._batch_room
        self._batch_room = batch_room(self.args)
        self._batched = serve.batch(
            max_batch_size=b.max_batch_size,
            batch_wait_timeout_s=b.batch_wait_timeout_s,
            max_concurrent_batches=b.max_concurrent_batches,
            batch_size_fn=lambda items: sum(q.prepared.request.n for q in items),  # a batch counts images
        )(self._run_batch)
        if self.args.warmup:
            log.info("warm-up took %.2f s", self._torch.submit(self.engine.warm_up).result())
        self._check_gpu_memory()
        self._stop = threading.Event()
        self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-refresh")  # reloads from requests
        if self.canary.enabled:  # the challenger is loaded before it may draw (and its stop tag read)
            self._sync_canary()
            self._preload([self.canary.challenger_name])
        if self.args.resolved_tracking_uri() and self.args.champion.poll_s > 0:
            threading.Thread(target=self._poll, daemon=True, name="champion-poll").start()

    def _load(self, cache: Path) -> Engine:
        torch.set_num_threads(max(1, int(self.args.deployment.num_cpus)))
        if self.args.deployment.num_gpus > 0 and not torch.cuda.is_available():
            log.warning("num_gpus=%s but torch sees no CUDA GPU: generating on CPU", self.args.deployment.num_gpus)
        return Engine.from_args(self.args, cache_dir=cache)

    def _on_torch(self, fn, *args):
        return asyncio.wrap_future(self._torch.submit(fn, *args))

    def reconfigure(self, user_config: dict) -> None:
        """``user_config: {max_batch_size, batch_wait_timeout_s}`` changes batching without a restart."""
        if "max_batch_size" in user_config:
            size = int(user_config["max_batch_size"])
            if size < self.args.limits.max_n:
                raise ValueError(f"user_config.max_batch_size {size} < limits.max_n {self.args.limits.max_n}")
            self._batched.set_max_batch_size(size)
            self._passes.max_images = size
        if "batch_wait_timeout_s" in user_config:
            self._batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    async def generate(self, req: ImageRequest, epoch: int = 0, priority: str = "interactive") -> dict:
        """One request -> ``encode``'s dict or ``{"error": {status, message, param}}``. A request for the champion
        may be drawn by the challenger (``serving.canary``): its answer then says ``arm`` and the challenger's
        ``version``. ``priority="batch"`` (the batch runner, serving/batches): the request skips ``@serve.batch`` and
        waits in the pass queue behind every interactive one; past ``batch_room`` of them
        (batches.max_in_flight_per_replica) it is refused at once, 429. Every answer (and a caller that went away)
        becomes a generation record (serving/records.py)."""
        if priority != "batch":
            return await self._routed(req, epoch, False)
        if self._batch_requests >= self._batch_room:
            return {"error": {"status": 429, "message": "this replica's batch room is full", "param": None}}
        self._batch_requests += 1
        try:
            return await self._routed(req, epoch, True)
        finally:
            self._batch_requests -= 1

    async def _routed(self, req: ImageRequest, epoch: int, low: bool) -> dict:
        """``_generate`` on the canary's arm for this request (the champion's name asked for, or as asked), counted
        for the canary and recorded."""
        arrived, wall, seen, out, outcome = time.monotonic(), time.time(), {}, None, "500"
        asked = req.model or self.args.default_model
        route = self.canary.pick(asked, req.routing_key, self.engine.resolver.known())
        if route is not None:
            req = dataclasses.replace(req, model=route.name)
        try:
            out = await self._generate(req, epoch, low, arrived, seen)
            outcome = str(out["error"]["status"]) if "error" in out else "ok"
            if route is not None and "error" not in out:
                out = out | {"model": asked, "arm": route.arm}
            return out
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            latency = time.monotonic() - arrived
            if route is not None and self.canary.record(route, outcome, latency):  # a 5xx spike stopped it
                self._bg.submit(self._sync_canary)  # recorded in the registry now, for the other replicas
            self._record_generation(req, seen, out, outcome, wall, latency)

    def _record_generation(self, req, seen: dict, out, outcome: str, wall: float, latency_s: float) -> None:
        try:
            q, prepared = seen.get("queued"), seen.get("prepared")
            model = req.model or self.args.default_model
            label = prepared.model if prepared else model if model in self.engine.resolver.served() else "invalid"
            waited = q.started - q.arrived if q is not None and q.started is not None else None
            self.records.record(generation_record(
                req, label, prepared, out, outcome, arrived=wall, latency_s=latency_s, queue_wait_s=waited,
                batch_images=q.batch_images if q else None, redact_prompts=self.args.records.redact_prompts,
            ))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - recording never fails a request
            self.records.failed("generate", exc)

    async def _generate(self, req: ImageRequest, epoch: int, low: bool, arrived: float, seen: dict) -> dict:
        model = req.model or self.args.default_model
        if epoch > self._epoch:  # an admin reload reached another replica first
            self._epoch = epoch
            await self._wait_registry(self._bg.submit(self._refresh))
        # a registry name this replica has not resolved: its fetch is awaited here, holding no thread, at most
        # registry_deadline_s; base, folders and names resolved before never wait (resolve answers from its cache)
        await self._wait_registry(self.engine.resolver.pending(model, req.tenant))
        try:
            prepared = seen["prepared"] = await asyncio.to_thread(self.engine.prepare, req, 0.0)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a typed error result
            out = error_result(exc)
            # a metric label is never the client's raw text (unbounded label values, bytes Prometheus refuses)
            label = model if model in self.engine.resolver.served() else "invalid"
            self.metrics.request(label, str(out["error"]["status"]))
            return out
        key = self.responses.key(prepared)  # prepared: the model resolved (and allowed) for this tenant
        owner = req.tenant.name if req.tenant else None
        hit = self.responses.get(key, owner)
        self.metrics.response_cache(self.responses.stats())
        if hit is not None:  # never queued: no pass, no batch metrics
            self.metrics.request(prepared.model, "ok")
            return hit
        try:
            queued = seen.setdefault("queued", _Queued(prepared, arrived, low))
            result = (await self._passes.submit([queued]))[0] if low else await self._batched(queued)
        except asyncio.CancelledError:
            self._gone[req.request_id] = time.monotonic()
            self.metrics.request(prepared.model, "cancelled")
            raise
        if isinstance(result, Exception):
            out = error_result(result)
            self.metrics.request(prepared.model, str(out["error"]["status"]))
            return out
        self.metrics.request(prepared.model, "ok")
        # records, feedback and summaries file the answer under the registered model (whatever name asked for it)
        out = encode(result) | {"registered_model": prepared.adapter.registered if prepared.adapter else None}
        if self.responses.put(key, out, owner):
            self.metrics.response_cache(self.responses.stats())
        return {**out, "cached": False}

    async def _run_batch(self, items: list[_Queued]) -> list[ImageResult | Exception]:
        """What ``@serve.batch`` formed goes into the pass queue, merged with batches formed meanwhile."""
        return await self._passes.submit(items)

    async def _run_pass(self, items: list[_Queued]) -> list[ImageResult | Exception]:
        started = time.monotonic()
        ids = {q.prepared.request.request_id for q in items}
        try:
            results = await self._on_torch(
                self.engine.generate, [q.prepared for q in items], lambda: ids <= self._gone.keys()
            )
        except Cancelled as exc:
            results = [exc] * len(items)
        finally:
            horizon = started - 2 * self.args.deployment.request_timeout_s  # ids that no pass will ask about
            self._gone = {k: t for k, t in self._gone.items() if k not in ids and t > horizon}
        self._record(items, results, started)
        return results

    def _record(self, items: list[_Queued], results: list, started: float) -> None:
        passes: dict[int, list[tuple[_Queued, ImageResult]]] = {}
        for q, r in zip(items, results):
            if isinstance(r, ImageResult):
                passes.setdefault(r.pass_id, []).append((q, r))
                q.started, q.batch_images = started, r.batch_images
        for members in passes.values():
            per_model: dict[str, int] = {}
            for _, r in members:
                per_model[r.model] = per_model.get(r.model, 0) + len(r.images)
            first = members[0][1]
            waits = [started - q.arrived for q, _ in members if not q.low]  # batch requests wait by design
            self.metrics.batch(first.batch_images, first.seconds, waits, per_model)
        self.metrics.cache_state(self.engine.stats())

    async def refresh(self) -> dict:
        """Look the champion (and other aliases) up again; load a moved champion before serving it."""
        return await asyncio.to_thread(self._refresh)

    async def _wait_registry(self, future) -> None:
        """Wait for a registry call at most ``registry_deadline_s``, and not at all while the registry is down (the
        call goes on in the background either way)."""
        if future is not None and not self.engine.resolver.watch.down():
            await asyncio.wait({asyncio.wrap_future(future)}, timeout=self.args.registry_deadline_s)

    def _refresh(self) -> dict:
        versions = self.engine.resolver.refresh()
        moved = [n for n, v in versions.items() if not v.startswith(("error", "none"))]
        if moved:
            self._preload(moved)
        self._sync_canary()
        return versions

    def _preload(self, names: list[str]) -> None:
        """Load the adapters of resolved ``names`` now (a moved champion, the challenger) before a request needs one."""
        names = [n for n in names if n in self.engine.resolver.known()]
        if names:
            self._torch.submit(self.engine.preload, names).result()
            self.metrics.cache_state(self.engine.stats())

    def _sync_canary(self) -> None:
        """Write this replica's canary stops to the registry and read the challenger's (``Canary.sync``); while the
        registry does not answer, the challenger's share is 0 here."""
        uri = self.args.resolved_tracking_uri()
        if not self.canary.enabled or not uri:
            return
        try:
            self.engine.resolver.watch.call(self.canary.sync, client_for(uri))
        except Exception as exc:  # noqa: BLE001 - the canary pauses; serving goes on
            self.canary.unsynced(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            log.warning("canary paused (challenger share 0) until the registry answers: %s", exc)

    def canary_state(self) -> dict:
        """This replica's canary counts and routing state, for ``GET /admin/canary`` (serving.canary.report)."""
        return {"pid": os.getpid(), **self.canary.snapshot(self.engine.resolver.known())}

    def _poll(self) -> None:
        """The background refresher: every ``champion.poll_s``, and every ``registry_retry_s`` while the registry
        does not answer, look the champion and the listing up again."""
        every, retry = self.args.champion.poll_s, self.args.registry_retry_s
        while not self._stop.wait(min(every, retry) if self.engine.resolver.watch.down() else every):
            try:
                self._refresh()
            except Exception:  # noqa: BLE001 - a failed poll keeps the current champion
                log.exception("champion poll failed")

    def _check_gpu_memory(self) -> None:
        """Fractions are scheduling labels, not isolation: refuse to start when k replicas of this size
        (k = 1 / num_gpus) cannot fit on the device."""
        share = self.args.deployment.num_gpus
        if not torch.cuda.is_available() or not 0 < share < 1:
            return
        total = torch.cuda.get_device_properties(0).total_memory
        used = torch.cuda.max_memory_allocated()
        if used / share > 0.95 * total:
            raise RuntimeError(
                f"deployment.num_gpus {share}: {round(1 / share)} replicas of {used / 2**30:.1f} GiB each need "
                f"{used / share / 2**30:.1f} GiB but the GPU has {total / 2**30:.1f} GiB; raise num_gpus"
            )

    async def models(self, tenant: Tenant | None = None) -> dict:
        """``GET /v1/models``: what ``tenant`` may use (None: everything), from what this replica knows (never waits
        for the registry: serving.catalog)."""
        return self._models(tenant)

    def _models(self, tenant: Tenant | None) -> dict:
        resolver = self.engine.resolver
        cards = model_cards(resolver, set(self.engine.adapters.keys()), tenant)
        registry = public_state(resolver.state())["registry"] if self.engine.args.resolved_tracking_uri() else None
        return {"object": "list", "data": cards, "registry": registry}

    def stats(self) -> dict:
        return {
            "pid": os.getpid(),
            **self.metrics.snapshot(),
            "adapter_cache": self.engine.stats(),
            "response_cache": self.responses.stats(),
            "registry": self.engine.resolver.state(),
            "batch_requests": {"held": self._batch_requests, "room": self._batch_room},  # serving/batches
            "records": self.records.stats(),
        }

    def production(self) -> dict:
        """This replica's production figures for ``GET /admin/production`` (``serving.production.report``)."""
        return {**self.records.production(), "pid": os.getpid(), "uptime_s": round(time.time() - self._started, 1)}

    def ready(self) -> dict:
        """Readiness details (``GET /readyz``, public): whether the registry answers and the age of the champion's
        version (``serving.adapters.public_state``; the full state is in ``/admin/stats``)."""
        return public_state(self.engine.resolver.state())

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.resolver.close()
        records = getattr(self, "records", None)
        if records is not None:
            records.close()


def build_app(args: ServeArgs) -> Application:
    """The application ``serve run configs/serve.yaml`` starts: ``Api`` (HTTP) -> ``Generator`` replicas, and the
    one ``BatchWorker`` that feeds them batch requests at low priority (serving/batches)."""
    args = ServeArgs.model_validate(args) if isinstance(args, dict) else args
    d, b = args.deployment, args.batching
    replicas = (
        {"num_replicas": "auto", "autoscaling_config": d.autoscaling_config}
        if d.num_replicas == "auto"
        else {"num_replicas": d.num_replicas}
    )
    generator = Generator.options(
        **replicas,
        max_ongoing_requests=d.max_ongoing_requests,
        max_queued_requests=d.max_queued_requests,
        ray_actor_options={
            "num_cpus": d.num_cpus,
            "num_gpus": d.num_gpus,
            "runtime_env": {"env_vars": args.registry_env()},  # merged with the app's runtime_env by Ray
        },
        user_config={"max_batch_size": b.max_batch_size, "batch_wait_timeout_s": b.batch_wait_timeout_s},
        health_check_period_s=10,
    ).bind(args.model_dump())
    room = max(
        100,
        4
        * (d.max_ongoing_requests + max(d.max_queued_requests, 0))
        * (d.num_replicas if isinstance(d.num_replicas, int) else 4),
    )
    images = ImageUrls.bind(args.image_urls.model_dump())
    feedback = Feedback.bind(args.feedback.model_dump(), args.model_dump()) if args.feedback.enabled else None
    runner = BatchWorker.bind(generator, args.model_dump(), feedback) if args.batches.enabled else None  # batches
    return Api.options(max_ongoing_requests=room, max_queued_requests=room, ray_actor_options={"num_cpus": 0}).bind(
        generator, args.model_dump(), images, feedback, runner
    )
