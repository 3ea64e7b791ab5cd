"""Serving with the MLflow registry down (issue 22): a registry unreachable from the start, and a real ``mlflow
server`` stopped mid-traffic. Every request is answered within its deadline with the right status: base and loaded
adapters 200, the champion with a known version 200 (stale), a registry name never resolved 503 + Retry-After at
once, ``GET /v1/models`` within 1 s.

The real Generator deployment class (its batching, its registry refresher thread) and the real HTTP ingress run in
process without Ray, as in test_http.py: ``serve.get_replica_context()`` is monkeypatched, deployment handles are
plain objects behind ``.remote()``, and requests go through httpx's ASGI transport, concurrently, on one event loop.

    pytest tests/serving/test_registry_down.py -s     # -s prints the latency figure of docs/reliability.md
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import pytest

from tests.serving.test_http import Remote

pytestmark = pytest.mark.slow
PROMPT = "a red circle on a sks background"
DEADLINE_S = 5.0  # registry_deadline_s: the longest a request may wait for the registry
RETRY_S = 2  # registry_retry_s: also the Retry-After of a registry name (deployment.retry_after_s stays 1)
AT_ONCE_S = 1.0  # "at once": a 503 for a name the registry alone can resolve, while it is known to be down
MODELS_S = 1.0  # GET /v1/models
GENERATION_S = 60.0  # deployment.request_timeout_s: a 2-step 64 px image takes well under 1 s alone
ROUNDS = 10  # rounds of concurrent requests with the registry up, and again with it down


def registry_args(serve_args, uri: str, champion: str):
    return serve_args(
        **{"tracking_uri": uri, "champion.model": champion, "champion.poll_s": 1, "default_model": "champion",
           "registry_deadline_s": DEADLINE_S, "registry_retry_s": RETRY_S, "registry_retries": 1,
           "deployment.request_timeout_s": GENERATION_S, "defaults.steps": 2}
    )  # fmt: skip


@contextlib.asynccontextmanager
async def serving(args, monkeypatch):
    """The Generator replica (started as Serve starts it: pipeline, registry refresh) behind the HTTP ingress."""
    from ray import serve

    from serving.app import Generator, ImageUrls
    from serving.http import Api, web

    config = SimpleNamespace(max_ongoing_requests=args.deployment.max_ongoing_requests)  # what serve.batch checks
    context = SimpleNamespace(servable_object=None, _deployment_config=config)
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    gen = await asyncio.to_thread(Generator.func_or_class, args.model_dump())
    urls = ImageUrls.func_or_class(args.image_urls.model_dump())
    context.servable_object = Api.func_or_class.__mro__[1](Remote(gen), args, Remote(urls))
    transport = httpx.ASGITransport(app=web)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=120) as http:
            yield SimpleNamespace(http=http, gen=gen)
    finally:
        gen._stop.set()  # the refresher thread
        gen.engine.resolver.close()


@dataclass
class Answer:
    kind: str
    phase: str
    status: int
    seconds: float
    response: httpx.Response


async def ask(http: httpx.AsyncClient, kind: str, phase: str, model: str | None = None) -> Answer:
    """One request of ``kind``: an image of ``model`` (POST /v1/images/generations, or GET /v1/generate with the
    default model for kind "default"), or GET /v1/models, /readyz."""
    start = time.perf_counter()
    if kind == "models":
        r = await http.get("/v1/models")
    elif kind == "readyz":
        r = await http.get("/readyz")
    elif kind == "default":
        r = await http.get("/v1/generate", params={"prompt": PROMPT, "seed": 1})
    else:
        body = {"prompt": PROMPT, "model": model, "seed": 1, "response_format": "b64_json"}
        r = await http.post("/v1/images/generations", json=body)
    return Answer(kind, phase, r.status_code, time.perf_counter() - start, r)


def check(a: Answer, statuses: tuple[int, ...], within: float) -> None:
    assert a.status in statuses, f"{a.phase} {a.kind}: {a.status} {a.response.text[:400]}"
    assert a.seconds <= within, f"{a.phase} {a.kind}: answered in {a.seconds:.2f} s > {within} s ({a.status})"


def check_unavailable(a: Answer, uri: str, within: float = AT_ONCE_S) -> None:
    """A registry name the replica never resolved, while the registry is down: 503 + Retry-After, naming the URI."""
    check(a, (503,), within)
    assert a.response.headers.get("retry-after") == str(RETRY_S), a.response.headers
    assert uri in a.response.json()["error"]["message"], a.response.text


def cards(answer: Answer) -> dict[str, dict]:
    check(answer, (200,), MODELS_S)
    return {c["id"]: c for c in answer.response.json()["data"]}


def test_a_registry_that_hangs_holds_a_request_no_longer_than_the_deadline(serve_args, monkeypatch):
    """A server that takes connections but never answers (a hung registry; no connection refused to end the call):
    the first look-up of a registry name ends at ``registry_deadline_s`` with a 503, later ones at once."""
    import socket

    from serving.app import error_result
    from serving.engine import Engine, ImageRequest

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each hung call ends after the timeout below
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "4")
    with socket.create_server(("127.0.0.1", 0)) as hung:  # listens, never accepts: requests sit in its backlog
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        args = serve_args(**{"tracking_uri": uri, "registry_deadline_s": 1, "registry_retry_s": RETRY_S})
        engine = Engine.from_args(args)
        for limit in (1 + 1, AT_ONCE_S):  # the deadline (+1 s for a busy machine), then at once
            start = time.perf_counter()
            with pytest.raises(Exception) as info:
                engine.prepare(ImageRequest(PROMPT, model="hung-lora/1"))
            seconds = time.perf_counter() - start
            error = error_result(info.value)["error"]
            assert error["status"] == 503 and error["retry_after"] == RETRY_S and uri in error["message"], error
            assert seconds < limit, f"waited {seconds:.2f} s for a hung registry (limit {limit} s)"
        assert engine.prepare(ImageRequest(PROMPT, model="ad0")).adapter is not None  # folders never wait
        health = engine.resolver.watch.health()
        assert health["reachable"] is False and "no answer within 1 s" in health["last_error"], health
        engine.resolver.close()


def test_a_registry_unreachable_from_the_start_never_stalls_serving(serve_args, monkeypatch):
    pytest.importorskip("openai")
    import openai

    from training.mlflow_server import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = registry_args(serve_args, uri, "never-up-lora")

    async def scenario():
        started = time.perf_counter()
        async with serving(args, monkeypatch) as s:
            assert time.perf_counter() - started < 60, "the replica's start waited for the registry"
            phase = "down from the start"
            for _ in range(3):  # rounds of concurrent requests
                answers = await asyncio.gather(
                    ask(s.http, "base", phase, "base"), ask(s.http, "folder", phase, "ad0"),
                    ask(s.http, "champion", phase, "champion"), ask(s.http, "default", phase),
                    ask(s.http, "registry", phase, "never-up-lora/2"), ask(s.http, "models", phase),
                    ask(s.http, "readyz", phase),
                )  # fmt: skip
                base, folder, champion, default, registry, models, ready = answers
                check(base, (200,), GENERATION_S)
                check(folder, (200,), GENERATION_S)
                for a in (champion, default, registry):
                    check_unavailable(a, uri)
                listed = cards(models)
                assert listed["champion"]["available"] is False and listed["base"]["available"] is True
                assert listed["ad0"]["available"] is True
                assert models.response.json()["registry"]["reachable"] is False
                check(ready, (200,), AT_ONCE_S)
                details = ready.response.json()["details"]
                assert details["registry"]["reachable"] is False  # public: no URI, no error texts, no refs
                assert uri not in ready.response.text and "error" not in details["registry"], details
                assert uri not in models.response.text.replace(f"registry at {uri}", ""), models.response.text
                assert details["names"]["champion"]["version"] is None
            stats = await s.http.get("/admin/stats")
            assert stats.json()["registry"]["registry"]["failures"] >= 1, stats.text
            # the official openai client (max_retries=0): models list at once, a base image, the champion a 503
            client = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="-", http_client=s.http, max_retries=0)
            start = time.perf_counter()
            assert "champion" in {m.id for m in (await client.models.list()).data}
            assert time.perf_counter() - start < MODELS_S
            drawn = await client.images.generate(model="base", prompt=PROMPT, response_format="b64_json")
            assert drawn.data[0].b64_json
            start = time.perf_counter()
            with pytest.raises(openai.APIStatusError) as info:
                await client.images.generate(model="champion", prompt=PROMPT, response_format="b64_json")
            assert info.value.status_code == 503 and time.perf_counter() - start < AT_ONCE_S

    asyncio.run(scenario())


def test_a_registry_stopped_mid_traffic_keeps_every_answer_in_its_deadline(serve_args, tiny_adapters, tmp_path):
    from tests.serving.conftest import register_adapter
    from training.mlflow_server import start_mlflow_server

    server = start_mlflow_server(tmp_path / "mlflow")
    monkeypatch = pytest.MonkeyPatch()
    try:
        assert register_adapter(server.uri, "mid-lora", tiny_adapters["ad1"], status="passed") == "1"
        assert register_adapter(server.uri, "mid-lora", tiny_adapters["ad2"], alias=None, status="passed") == "2"
        args = registry_args(serve_args, server.uri, "mid-lora")
        answers = asyncio.run(_mid_traffic(args, server, monkeypatch))
    finally:
        monkeypatch.undo()
        server.stop()
    print_figure(answers)


async def _mid_traffic(args, server, monkeypatch) -> list[Answer]:
    """Rounds of concurrent requests: ``ROUNDS`` with the registry up, then the server is stopped (SIGTERM to its
    process group) while rounds go on, until the replica has noticed and ``ROUNDS`` more ran with it down. Kind
    "registry" is ``mid-lora/1`` while up (looked up and downloaded once, then cached) and ``mid-lora/2`` (never
    resolved) while down."""
    answers: list[Answer] = []
    kinds = [("base", "base"), ("folder", "ad0"), ("champion", "champion"), ("default", None), ("models", None)]

    async def round_(http, phase: str, extra=()) -> list[Answer]:
        got = await asyncio.gather(*(ask(http, k, phase, m) for k, m in [*kinds, *extra]))
        answers.extend(got)
        return got

    async with serving(args, monkeypatch) as s:
        for _ in range(ROUNDS):
            for a in await round_(s.http, "up", [("registry", "mid-lora/1")]):
                check(a, (200,), MODELS_S if a.kind == "models" else GENERATION_S)
        assert cards(next(a for a in reversed(answers) if a.kind == "models"))["champion"]["version"] == "1"
        stopping = asyncio.create_task(asyncio.to_thread(server.stop))
        while not stopping.done():  # traffic goes on while the server goes away
            for a in await round_(s.http, "stopping"):
                check(a, (200,), MODELS_S if a.kind == "models" else GENERATION_S)
        await stopping
        down_rounds, deadline = 0, time.monotonic() + 120
        while down_rounds < ROUNDS or not s.gen.engine.resolver.watch.down():
            assert time.monotonic() < deadline, "the replica never noticed the registry was down"
            known_down = s.gen.engine.resolver.watch.down()
            got = await round_(s.http, "down", [("registry", "mid-lora/2")])
            for a in got:
                if a.kind == "registry":  # before the replica knows, a first look-up may wait out its deadline
                    check_unavailable(a, server.uri, AT_ONCE_S if known_down else DEADLINE_S + 1)
                else:
                    check(a, (200,), MODELS_S if a.kind == "models" else GENERATION_S)
                if a.kind == "champion":  # the last known version, stale
                    assert a.response.json()["version"] == "1", a.response.text
                if a.kind == "default":
                    assert a.response.headers["x-version"] == "1", a.response.headers
            down_rounds += known_down
        listed = cards(await ask(s.http, "models", "down"))
        assert listed["champion"]["available"] and listed["champion"]["version"] == "1"
        assert listed["mid-lora/2"]["available"] is False and listed["mid-lora"]["available"] is False
        ready = await ask(s.http, "readyz", "down")
        check(ready, (200,), AT_ONCE_S)
        champion = ready.response.json()["details"]["names"]["champion"]
        assert champion["version"] == "1" and champion["age_s"] > args.champion.poll_s, champion
    return answers


def print_figure(answers: list[Answer]) -> None:
    """p50 / max seconds and statuses of each kind of request, registry up vs down (docs/reliability.md)."""
    print("\nkind       phase      n   p50 s   max s  statuses")
    for kind in ("base", "folder", "champion", "default", "models", "registry"):
        for phase in ("up", "stopping", "down"):
            got = [a for a in answers if a.kind == kind and a.phase == phase]
            if got:
                seconds = [a.seconds for a in got]
                statuses = ",".join(f"{s}x{n}" for s, n in sorted(Counter(a.status for a in got).items()))
                p50, top = statistics.median(seconds), max(seconds)
                print(f"{kind:10} {phase:9} {len(got):2} {p50:7.3f} {top:7.3f}  {statuses}")
