"""The response cache (serving/response_cache.py): its bounds, LRU order and key (model version, every field that
changes pixels, tenant); requests without a seed and errors never cached; HTTP validators (ETag, 304, Cache-Control)
through the FastAPI app with a fake generator; and the real Generator replica in process (as test_registry_down.py
runs it): a hit skips the batch queue, a champion moved to another version is a miss, another tenant's private
adapter is refused before the cache is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from types import SimpleNamespace

import pytest
from PIL import Image

from serving.images import PNG_KEY
from tests.serving.test_http import AUTH, FakeGenerator, server  # noqa: F401 - `server` is a fixture

PROMPT = "a red circle on a sks background"


# ---- the cache class --------------------------------------------------------------------------------------------
def prepared(seed: int | None = 1, tenant: str | None = None, version: str | None = None, sha: str = "a" * 64, **kw):
    """A Prepared request as Engine.prepare makes it (an adapter with ``version``/``sha``, or base for sha None)."""
    from serving.adapters import ResolvedAdapter
    from serving.engine import ImageRequest, Prepared
    from serving.tenants import Tenant

    fields = {"steps": 4, "guidance": 4.0, "width": 64, "height": 64} | {
        k: kw.pop(k) for k in ("steps", "guidance", "width", "height") if k in kw
    }
    req = ImageRequest(PROMPT, seed=seed, tenant=Tenant(tenant) if tenant else None, **kw)
    adapter = None
    if sha is not None:
        meta = SimpleNamespace(sha256=sha)
        adapter = ResolvedAdapter(req.model or "champion", "models:/m@champion", None, meta, version, "m")
    return Prepared(req, req.model or "champion", adapter, 12345 if seed is None else seed, **fields)


def result(size: int = 100, tag: int = 0) -> dict:
    return {"images": [bytes([tag]) * size], "seeds": [1], "model": "champion", "version": "1", "size": "64x64"}


def make(max_entries: int = 4, max_bytes: int = 10**6, ttl_s: float | None = None, **kw):
    from serving.response_cache import ResponseCache

    clock = SimpleNamespace(now=0.0)
    return ResponseCache(max_entries, max_bytes, ttl_s, clock=lambda: clock.now, **kw), clock


def test_a_stored_response_comes_back_marked_cached_and_a_copy():
    cache, _ = make()
    key = cache.key(prepared())
    assert cache.get(key) is None and cache.put(key, result(tag=7))
    hit = cache.get(key)
    assert hit["cached"] is True and hit["images"] == [bytes([7]) * 100] and hit["version"] == "1"
    hit["images"].append(b"changed")  # the caller's copy
    assert cache.get(key)["images"] == [bytes([7]) * 100]
    s = cache.stats()
    assert (s["hits"], s["misses"], s["stores"], s["entries"], s["hit_ratio"]) == (2, 1, 1, 1, 2 / 3), s


def test_entries_beyond_max_entries_go_least_recently_used_first():
    cache, _ = make(max_entries=3)
    keys = [cache.key(prepared(seed=i)) for i in range(4)]
    for k in keys[:3]:
        cache.put(k, result())
    cache.get(keys[0])  # used: now the newest
    cache.put(keys[3], result())
    assert [cache.get(k) is not None for k in keys] == [True, False, True, True]
    assert len(cache) == 3 and cache.stats()["evictions"] == 1


def test_bytes_are_bounded_and_a_response_larger_than_the_bound_is_not_kept():
    from serving.response_cache import ENTRY_OVERHEAD

    entry = 1000 + ENTRY_OVERHEAD
    cache, _ = make(max_entries=100, max_bytes=2 * entry + 10)
    keys = [cache.key(prepared(seed=i)) for i in range(3)]
    for k in keys:
        assert cache.put(k, result(size=1000))
    assert cache.stats()["bytes"] == 2 * entry and [cache.get(k) is not None for k in keys] == [False, True, True]
    assert not cache.put(cache.key(prepared(seed=99)), result(size=3 * entry))
    assert cache.stats()["too_large"] == 1 and len(cache) == 2
    cache.put(keys[1], result(size=10))  # stored again, smaller: its old bytes are released
    assert cache.stats()["bytes"] == entry + 10 + ENTRY_OVERHEAD


def test_entries_expire_after_ttl():
    cache, clock = make(ttl_s=10)
    key = cache.key(prepared())
    cache.put(key, result())
    clock.now = 10.0
    assert cache.get(key) is not None
    clock.now = 10.5
    assert cache.get(key) is None and cache.stats()["expired"] == 1 and len(cache) == 0


def test_requests_without_a_seed_and_a_disabled_cache_are_never_cached():
    cache, _ = make()
    assert cache.key(prepared(seed=None)) is None
    assert not cache.put(None, result()) and cache.get(None) is None
    off, _ = make(enabled=False)
    assert off.key(prepared(seed=3)) is None
    assert cache.stats()["bypassed"] == 1 and off.stats()["bypassed"] == 1 and len(cache) == 0


def test_errors_are_never_stored():
    cache, _ = make()
    key = cache.key(prepared())
    with pytest.raises(ValueError, match="only successful generations"):
        cache.put(key, {"error": {"status": 500, "message": "boom", "param": None}})
    assert cache.get(key) is None and len(cache) == 0


def test_the_key_holds_the_version_the_weights_and_every_field_that_changes_pixels():
    cache, _ = make()
    same = cache.key(prepared())
    assert same == cache.key(prepared()) and len(same) == 64
    variants = {
        "version": prepared(version="2"),
        "weights": prepared(sha="b" * 64),
        "base model": prepared(sha=None),
        "model name": prepared(model="m"),
        "seed": prepared(seed=2),
        "negative prompt": prepared(negative_prompt="blurry"),
        "n": prepared(n=2),
        "steps": prepared(steps=5),
        "guidance": prepared(guidance=4.5),
        "width": prepared(width=32),
        "height": prepared(height=32),
        "tenant": prepared(tenant="acme"),
    }
    other_prompt = prepared()
    other_prompt.request.prompt = PROMPT + "!"
    variants["prompt"] = other_prompt
    keys = {name: cache.key(p) for name, p in variants.items()}
    assert all(k != same for k in keys.values()), [n for n, k in keys.items() if k == same]
    assert len(set(keys.values())) == len(keys)
    shared, _ = make(share_between_tenants=True)
    assert shared.key(prepared(tenant="acme")) == shared.key(prepared(tenant="bravo")) == shared.key(prepared())


# ---- If-None-Match --------------------------------------------------------------------------------------------
ETAG = '"abc"'


@pytest.mark.parametrize(
    "header, current, expected",
    [
        (None, ETAG, False),
        ('"abc"', ETAG, True),
        ('W/"abc"', ETAG, True),  # weak comparison (RFC 9110 §13.1.2)
        ('"abc"', 'W/"abc"', True),
        ('"x", "abc"', ETAG, True),
        (' "x" ,, W/"abc" ', ETAG, True),  # empty list elements are ignored (§5.6.1)
        ('"x", "y"', ETAG, False),
        ('"a,b"', '"a,b"', True),  # a comma inside an entity tag is part of it
        ("*", ETAG, True),
        ("*", None, True),  # a current representation exists
        ('"abc"', None, False),  # no entity tag to compare
        ("abc", ETAG, False),  # not an entity tag: the condition is not evaluated
        ('"abc" "x"', ETAG, False),  # not a list
        ("", ETAG, False),
    ],
)
def test_if_none_match_follows_rfc_9110(header, current, expected):
    from serving.response_cache import not_modified

    assert not_modified(header, current) is expected


# ---- HTTP: ETag, Cache-Control, 304, X-Cache --------------------------------------------------------------------
def test_a_seeded_png_gets_a_strong_etag_private_max_age_and_a_304_when_it_matches(server):  # noqa: F811
    params = {"prompt": PROMPT, "seed": 3}
    r = server.http.get("/v1/generate", params=params)
    assert r.status_code == 200 and r.headers["x-cache"] == "miss"
    tag = r.headers["etag"]
    assert tag == f'"{hashlib.sha256(r.content).hexdigest()}"'
    max_age = server.args.response_cache.http_max_age_s
    assert r.headers["cache-control"] == f"private, max-age={max_age}"
    for header in (tag, f"W/{tag}", f'"other", {tag}', "*"):
        again = server.http.get("/v1/generate", params=params, headers={"If-None-Match": header})
        assert again.status_code == 304 and again.content == b"", header
        assert again.headers["etag"] == tag and again.headers["cache-control"] == r.headers["cache-control"]
        assert again.headers["x-seed"] == "3"
    # two If-None-Match fields are one list
    two = server.http.get("/v1/generate", params=params, headers=[("If-None-Match", '"x"'), ("If-None-Match", tag)])
    assert two.status_code == 304
    other = server.http.get("/v1/generate", params={**params, "seed": 4}, headers={"If-None-Match": tag})
    assert other.status_code == 200 and other.headers["etag"] != tag and other.content


def test_an_unseeded_png_is_no_store_without_an_etag(server):  # noqa: F811
    first = server.http.get("/v1/generate", params={"prompt": PROMPT})
    assert first.status_code == 200 and first.headers["cache-control"] == "no-store" and "etag" not in first.headers
    tag = f'"{hashlib.sha256(first.content).hexdigest()}"'  # a client guessing the tag of what it got
    again = server.http.get("/v1/generate", params={"prompt": PROMPT}, headers={"If-None-Match": tag})
    assert again.status_code == 200 and again.content


def test_a_url_image_gets_an_etag_and_a_304(server):  # noqa: F811
    body = {"prompt": PROMPT, "seed": 5, "response_format": "url"}
    url = server.http.post("/v1/images/generations", json=body).json()["data"][0]["url"]
    r = server.http.get(url)
    assert r.status_code == 200 and r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
    assert r.headers["cache-control"].startswith("private")
    again = server.http.get(url, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == r.headers["etag"]
    assert server.http.get(url, headers={"If-None-Match": '"stale"'}).status_code == 200


def test_x_cache_says_whether_the_replica_answered_from_its_cache(server, monkeypatch):  # noqa: F811
    draw = FakeGenerator.generate

    async def marked(self, req, epoch=0):
        return {**await draw(self, req, epoch), "cached": req.seed == 1}

    monkeypatch.setattr(FakeGenerator, "generate", marked)
    for seed, expected in ((1, "hit"), (2, "miss")):
        png = server.http.get("/v1/generate", params={"prompt": PROMPT, "seed": seed})
        js = server.http.post("/v1/images/generations", json={"prompt": PROMPT, "seed": seed})
        assert png.headers["x-cache"] == js.headers["x-cache"] == expected
        assert "cached" not in js.json()  # the body stays OpenAI's shape


# ---- the Generator replica in process ----------------------------------------------------------------------------
@contextlib.contextmanager
def replica(args, monkeypatch):
    """The real Generator deployment class without Ray (``serve.batch`` reads the replica context)."""
    from ray import serve

    from serving.app import Generator

    config = SimpleNamespace(max_ongoing_requests=args.deployment.max_ongoing_requests)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(_deployment_config=config))
    gen = Generator.func_or_class(args.model_dump())
    try:
        yield gen
    finally:
        gen._stop.set()
        gen.engine.resolver.close()


async def ask(gen, *requests) -> list[dict]:
    """The replica's answers to ``requests``, sent at once (one event loop per test: serve.batch's queue is bound
    to the loop it first ran on)."""
    return await asyncio.gather(*(gen.generate(r) for r in requests))


def test_a_repeated_seeded_request_is_a_hit_that_skips_the_queue(serve_args, monkeypatch):
    from serving.engine import ImageRequest

    async def scenario(gen):
        [first] = await ask(gen, ImageRequest(PROMPT, model="ad0", seed=5))
        passes = gen.engine.passes
        [second] = await ask(gen, ImageRequest(PROMPT, model="ad0", seed=5))
        assert first["cached"] is False and second["cached"] is True and gen.engine.passes == passes
        assert second["images"] == first["images"] and second["seeds"] == first["seeds"] == [5]
        assert {k: v for k, v in second.items() if k != "cached"} == {k: v for k, v in first.items() if k != "cached"}
        # another model, seed or step count is another image; without a seed it is drawn every time
        others = await ask(
            gen, ImageRequest(PROMPT, model="ad1", seed=5), ImageRequest(PROMPT, model="ad0", seed=6),
            ImageRequest(PROMPT, model="ad0", seed=5, steps=3),
        )  # fmt: skip
        assert [o["cached"] for o in others] == [False] * 3
        unseeded = [(await ask(gen, ImageRequest(PROMPT, model="ad0")))[0] for _ in range(2)]
        assert [u["cached"] for u in unseeded] == [False, False] and unseeded[0]["seeds"] != unseeded[1]["seeds"]
        assert gen.engine.passes >= passes + 3  # the unseeded two and at least one pass for the three others
        stats = gen.stats()["response_cache"]
        assert (stats["hits"], stats["misses"], stats["bypassed"], stats["entries"]) == (1, 4, 2, 4), stats
        assert stats["bytes"] > sum(len(b) for b in first["images"])

    with replica(serve_args(**{"defaults.steps": 2}), monkeypatch) as gen:
        asyncio.run(scenario(gen))


def test_a_failed_generation_is_not_cached(serve_args, monkeypatch):
    from serving.engine import ImageRequest

    async def scenario(gen):
        real = gen.engine.generate
        monkeypatch.setattr(gen.engine, "generate", lambda batch, stop=None: [RuntimeError("no memory")] * len(batch))
        [failed] = await ask(gen, ImageRequest(PROMPT, seed=1, model="base"))
        assert failed["error"]["status"] == 500
        monkeypatch.setattr(gen.engine, "generate", real)
        [drawn] = await ask(gen, ImageRequest(PROMPT, seed=1, model="base"))
        assert drawn["cached"] is False and drawn["images"]
        [again] = await ask(gen, ImageRequest(PROMPT, seed=1, model="base"))
        assert again["cached"] is True and again["images"] == drawn["images"]

    with replica(serve_args(**{"defaults.steps": 2}), monkeypatch) as gen:
        asyncio.run(scenario(gen))


@pytest.fixture
def registry(tmp_path, tiny_adapters) -> str:
    """A registry where toy-lora v1 (ad0) is champion and acme--private v1 (ad1) is tenant acme's."""
    from tests.serving.conftest import register_adapter

    uri = f"sqlite:///{tmp_path / 'registry' / 'mlflow.db'}"
    (tmp_path / "registry").mkdir()
    assert register_adapter(uri, "toy-lora", tiny_adapters["ad0"], status="passed") == "1"
    assert register_adapter(uri, "acme--private", tiny_adapters["ad1"], status="passed") == "1"
    return uri


def test_a_moved_champion_never_gets_the_old_versions_images_and_tenants_stay_apart(
    serve_args, tiny_adapters, registry, monkeypatch
):
    from serving.engine import ImageRequest
    from serving.tenants import Tenant
    from tests.serving.conftest import register_adapter

    acme, bravo = Tenant("acme"), Tenant("bravo")

    def same(tenant=acme, model="champion") -> ImageRequest:
        return ImageRequest(PROMPT, model=model, seed=9, tenant=tenant)

    async def one(gen, request) -> dict:
        return (await ask(gen, request))[0]

    async def scenario(gen):
        v1 = await one(gen, same())
        assert v1["version"] == "1" and v1["cached"] is False and (await one(gen, same()))["cached"] is True
        assert register_adapter(registry, "toy-lora", tiny_adapters["ad2"], status="passed") == "2"  # promoted
        await asyncio.to_thread(gen._refresh)  # what champion.poll_s or POST /admin/reload does
        v2 = await one(gen, same())
        assert v2["version"] == "2" and v2["cached"] is False and v2["images"] != v1["images"]
        assert (await one(gen, same()))["cached"] is True

        # acme's private adapter: acme's repeat is a hit; bravo's identical request is refused before the cache
        mine = await one(gen, same(model="acme--private"))
        assert mine["cached"] is False and mine["version"] == "1"
        hits = gen.stats()["response_cache"]["hits"]
        theirs = await one(gen, same(tenant=bravo, model="acme--private"))
        assert theirs["error"]["status"] == 404 and "images" not in theirs, theirs
        assert gen.stats()["response_cache"]["hits"] == hits
        assert (await one(gen, same(model="acme--private")))["cached"] is True
        # where both may use the model, another tenant's entry is still not theirs (share_between_tenants: false)
        assert (await one(gen, same(tenant=bravo)))["cached"] is False
        gen.responses.share_between_tenants = True  # then one tenant's entry answers another's request
        assert (await one(gen, same(tenant=Tenant("carol"))))["cached"] is False
        shared = await one(gen, same(tenant=Tenant("dave")))
        assert shared["cached"] is True and shared["version"] == "2"
        # image ids belong to the tenant that got them (feedback): dave gets ids of his own, the same on every hit
        drawn = await one(gen, same(tenant=Tenant("carol")))
        assert drawn["cached"] is True and not set(drawn["image_ids"]) & set(shared["image_ids"])
        again = await one(gen, same(tenant=Tenant("dave")))
        assert (again["image_ids"], again["images"]) == (shared["image_ids"], shared["images"])
        assert [Image.open(io.BytesIO(b)).info[PNG_KEY] for b in shared["images"]] == shared["image_ids"]
        assert [Image.open(io.BytesIO(b)).tobytes() for b in shared["images"]] == [
            Image.open(io.BytesIO(b)).tobytes() for b in drawn["images"]
        ]  # the same pixels

    args = serve_args(**{"tracking_uri": registry, "champion.model": "toy-lora", "champion.poll_s": 3600,
                         "defaults.steps": 2})  # fmt: skip
    with replica(args, monkeypatch) as gen:
        asyncio.run(scenario(gen))
