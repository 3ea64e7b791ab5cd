"""Feedback on generated images: the image ids (JSON, header, PNG text), ``FeedbackStore`` alone (bounds, rules,
persistence, summary numbers with known answers), ``POST /v1/feedback`` through the FastAPI app with fakes (as
test_http.py: no Ray), and the SDK over that app's ASGI transport."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from tests.serving.test_http import FakeClock, FakeGenerator, Remote

KEY_ENV, KEY = "LORAFLEET_TEST_FEEDBACK_KEY", "feedback-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "a red circle on a sks background"


def store(tmp_path, clock=None, **kw):
    from serving.feedback import FeedbackStore

    return FeedbackStore(tmp_path / "feedback", clock=clock or FakeClock(), **kw)


def ids(n: int) -> list[str]:
    from serving.feedback import new_image_id

    return [new_image_id() for _ in range(n)]


def refusal(fn, *args) -> tuple[int, str | None, str, int | None]:
    from serving.feedback import FeedbackError

    with pytest.raises(FeedbackError) as caught:
        fn(*args)
    e = caught.value
    return e.status, e.param, e.message, e.retry_after


# ---- ids ---------------------------------------------------------------------------------------------------------
def test_encode_gives_each_image_its_own_id_inside_its_png():
    from serving.app import encode
    from serving.engine import ImageResult
    from serving.feedback import IMAGE_ID, PNG_KEY
    from serving.images import from_png

    images = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    out = encode(ImageResult(images, [1, 2, 3], "champion", "4", batch_images=3, seconds=0.1))
    assert len(set(out["image_ids"])) == 3 and all(IMAGE_ID.match(i) for i in out["image_ids"])
    assert [from_png(p).info[PNG_KEY] for p in out["images"]] == out["image_ids"]
    assert from_png(out["images"][0]).tobytes() == images[0].tobytes()  # the text chunk changes no pixel


def test_restamp_gives_a_png_a_new_id_without_touching_its_pixels():
    from serving.feedback import PNG_KEY, restamp
    from serving.images import from_png, png_bytes

    image = Image.new("RGB", (8, 8), (10, 200, 30))
    old, new = ids(2)
    stamped = png_bytes(image, {PNG_KEY: old})
    again = restamp(stamped, new)
    assert from_png(again).info[PNG_KEY] == new and from_png(again).tobytes() == image.tobytes()
    assert len(again) == len(stamped) and again.count(b"tEXt") == 1  # replaced in place, not added
    bare = restamp(png_bytes(image), new)  # no id yet: one is added before IEND
    assert from_png(bare).info[PNG_KEY] == new and bare.endswith(b"IEND\xaeB`\x82")
    with pytest.raises(ValueError, match="not a PNG"):
        restamp(b"GIF89a", new)


# ---- the store alone ---------------------------------------------------------------------------------------------
def test_a_second_rating_replaces_the_first_and_the_summary_counts_the_last(tmp_path):
    s = store(tmp_path)
    [a] = ids(1)
    s.register("acme", "champion", "3", [a])
    first = s.rate("acme", a, 1, "nice")
    assert first["replaced"] is False and first["model"] == "champion" and first["version"] == "3"
    second = s.rate("acme", a, -1)
    assert second["replaced"] is True and second["rating"] == -1
    assert s.summary() == {"champion": {"3": {"count": 1, "positive": 0, "mean": -1.0}}}


def test_another_tenants_image_reads_as_an_unknown_one(tmp_path):
    s = store(tmp_path)
    mine, never = ids(2)
    s.register("acme", "base", None, [mine])
    theirs = refusal(s.rate, "bravo", mine, 1)
    unknown = refusal(s.rate, "bravo", never, 1)
    assert theirs[:2] == unknown[:2] == (404, "image_id")
    assert theirs[2].replace(mine, "X") == unknown[2].replace(never, "X")  # same words: nothing to tell apart
    assert mine in theirs[2]
    s.register("bravo", "base", None, [mine])  # an id seen before keeps its first owner
    assert refusal(s.rate, "bravo", mine, 1)[0] == 404
    assert s.rate("acme", mine, 1)["replaced"] is False


def test_bad_ratings_comments_and_ids_are_400s_naming_the_field(tmp_path):
    thumbs, stars = store(tmp_path / "t", max_comment_chars=10), store(tmp_path / "s", scale="stars")
    [a] = ids(1)
    for s in (thumbs, stars):
        s.register("acme", "base", None, [a])
    for bad in (0, 2, -2, 5):
        status, param, message, _ = refusal(thumbs.rate, "acme", a, bad)
        assert (status, param) == (400, "rating") and "-1 or 1" in message
    for bad in (0, 6, -1):
        assert refusal(stars.rate, "acme", a, bad)[:2] == (400, "rating")
    assert [stars.rate("acme", a, r)["rating"] for r in (1, 5)] == [1, 5]
    status, param, message, _ = refusal(thumbs.rate, "acme", a, 1, "x" * 11)
    assert (status, param) == (400, "comment") and "11 characters" in message and "10" in message
    assert thumbs.rate("acme", a, 1, "x" * 10)["comment"] == "x" * 10
    url_id = "A" * 32  # what a response_format 'url' link carries
    status, param, message, _ = refusal(thumbs.rate, "acme", url_id, 1)
    assert (status, param) == (400, "image_id") and "'url' link is not one" in message


def test_ids_expire_after_ttl_and_the_oldest_go_past_max_images(tmp_path):
    clock = FakeClock()
    s = store(tmp_path, clock, ttl_s=100, max_images=3)
    old = ids(1)
    s.register("acme", "base", None, old)
    clock.now += 50
    batch = ids(3)
    s.register("acme", "base", None, batch)  # 4 ids > max_images 3: the first is forgotten
    assert refusal(s.rate, "acme", old[0], 1)[0] == 404
    assert s.rate("acme", batch[0], 1)["replaced"] is False
    clock.now += 100  # past ttl_s: every id expired
    assert refusal(s.rate, "acme", batch[1], 1)[0] == 404
    assert s.stats()["images"] == 0 and s.stats()["counts"]["forgotten"] == 1


def test_the_rate_limit_is_per_tenant_with_the_seconds_to_wait(tmp_path):
    clock = FakeClock()
    s = store(tmp_path, clock, max_per_minute=3)
    a = ids(4)
    s.register("acme", "base", None, a)
    for i in range(3):
        s.rate("acme", a[i], 1)
        clock.now += 10  # calls at 0, 10, 20 s
    assert refusal(s.rate, "acme", a[3], 1) == (429, None, refusal(s.rate, "acme", a[3], 1)[2], 30)  # at 30 s
    assert refusal(s.rate, "bravo", ids(1)[0], 1)[0] == 404  # another tenant has its own minute
    clock.now += 30.5  # the call at 0 s left the window
    assert s.rate("acme", a[3], 1)["replaced"] is False


def test_summary_numbers_on_synthetic_ratings(tmp_path):
    thumbs, stars = store(tmp_path / "t"), store(tmp_path / "s", scale="stars")
    plan = {("champion", "3"): [1, 1, -1, 1], ("champion", "4"): [-1, -1], ("base", None): [1]}
    starred = {("champion", "3"): [5, 4, 3, 1], ("champion", "4"): [4]}
    for s, ratings in ((thumbs, plan), (stars, starred)):
        for (model, version), values in ratings.items():
            got = ids(len(values))
            s.register("acme", model, version, got)
            for image_id, r in zip(got, values):
                s.rate("acme", image_id, r)
    assert thumbs.summary() == {
        "base": {"none": {"count": 1, "positive": 1, "mean": 1.0}},
        "champion": {"3": {"count": 4, "positive": 3, "mean": 0.5}, "4": {"count": 2, "positive": 0, "mean": -1.0}},
    }
    assert stars.summary() == {
        "champion": {"3": {"count": 4, "positive": 2, "mean": 3.25}, "4": {"count": 1, "positive": 1, "mean": 4.0}}
    }


def test_a_reopened_store_keeps_ids_ratings_and_replacement(tmp_path):
    clock = FakeClock()
    s = store(tmp_path, clock, ttl_s=100)
    a, b, c = ids(3)
    s.register("acme", "champion", "3", [a, b])
    s.register("bravo", "champion", "3", [c])
    s.rate("acme", a, 1)
    s.rate("acme", a, -1)
    s.rate("bravo", c, 1)
    before = s.summary()
    s.close()
    with (tmp_path / "feedback" / "ratings.jsonl").open("a") as f:
        f.write('{"image_id": "img_cut sh')  # a write cut short by a crash
    again = store(tmp_path, clock, ttl_s=100)
    assert again.summary() == before == {"champion": {"3": {"count": 2, "positive": 1, "mean": 0.0}}}
    assert again.stats()["counts"]["bad_lines"] == 1
    assert again.rate("acme", a, 1)["replaced"] is True  # its earlier rating survived the restart
    assert again.rate("acme", b, 1)["replaced"] is False
    assert refusal(again.rate, "acme", c, 1)[0] == 404  # still bravo's
    assert again.summary()["champion"]["3"] == {"count": 3, "positive": 3, "mean": 1.0}
    again.close()
    clock.now += 150  # restarted after the ids expired: the ratings stay in the summary, rating again is a 404
    late = store(tmp_path, clock, ttl_s=100)
    assert late.summary()["champion"]["3"]["count"] == 3
    assert refusal(late.rate, "acme", a, 1)[0] == 404


def test_images_log_is_compacted_and_ratings_of_another_scale_are_not_counted(tmp_path):
    s = store(tmp_path, max_images=2)
    every = ids(7)
    for image_id in every:
        s.register("acme", "base", None, [image_id])
    lines = (tmp_path / "feedback" / "images.jsonl").read_text().splitlines()
    assert len(lines) <= 4 and [json.loads(x)["id"] for x in lines][-2:] == every[-2:]
    s.rate("acme", every[-1], 1)
    s.close()
    reopened = store(tmp_path, max_images=2)
    assert reopened.stats()["images"] == 2 and refusal(reopened.rate, "acme", every[-3], 1)[0] == 404
    reopened.close()
    stars = store(tmp_path, scale="stars", max_images=2)
    assert stars.summary() == {} and stars.stats()["counts"]["other_scale"] == 1


def test_notices_never_wait_and_drop_past_the_backlog():
    from serving.feedback import Notices

    async def main():
        gate = asyncio.Event()
        notices = Notices(max_pending=2, timeout_s=5)

        async def slow():
            await gate.wait()

        async def broken():
            raise RuntimeError("store gone")

        assert [notices.send(slow) for _ in range(3)] == [True, True, False]
        assert notices.stats() == {"pending": 2, "sent": 0, "dropped": 1, "failed": 0}
        gate.set()
        await asyncio.sleep(0.01)
        notices.send(broken)
        await asyncio.sleep(0.01)
        return notices.stats()

    assert asyncio.run(main()) == {"pending": 0, "sent": 2, "dropped": 1, "failed": 1}


# ---- HTTP, with fakes (no Ray) -----------------------------------------------------------------------------------
class IdGenerator(FakeGenerator):
    """FakeGenerator's images with ids, made as the Generator deployment makes them (``serving.app.encode``)."""

    async def generate(self, req, epoch: int = 0) -> dict:
        from serving.app import encode
        from serving.engine import ImageResult
        from serving.images import from_png

        out = await super().generate(req, epoch)
        result = ImageResult([from_png(p) for p in out["images"]], out["seeds"], out["model"], "7", 1, 0.0)
        return encode(result)

    async def models(self, tenant=None) -> dict:
        return {"object": "list", "data": [{"id": "base", "kind": "base"}]}


@pytest.fixture
def site(monkeypatch, tmp_path):
    """``SimpleNamespace(http, acme, gen, store, clock, api)``: the ingress with a default (admin) key and a key of
    tenant acme, over IdGenerator and a real FeedbackStore (stars scale, 3 ratings a minute)."""
    from fastapi.testclient import TestClient
    from ray import serve

    from serving.config import ServeArgs
    from serving.feedback import FeedbackStore
    from serving.http import Api, web
    from serving.shared_stores import Feedback, ImageUrls
    from serving.tenants import add_key

    monkeypatch.setenv(KEY_ENV, KEY)
    acme, _ = add_key(tmp_path / "keys.json", "acme")
    args = ServeArgs(
        champion={"model": None}, default_model="base", api_key_env=KEY_ENV,
        tenants={"keys_file": str(tmp_path / "keys.json"), "keys_env": None},
        feedback={"root": str(tmp_path / "fb"), "scale": "stars", "max_per_minute": 3, "max_comment_chars": 20},
    )  # fmt: skip
    clock = FakeClock()
    fb = Feedback.func_or_class(args.feedback.model_dump())  # the deployment's class, without Ray
    fb.store.close()
    f = args.feedback
    fb.store = FeedbackStore(f.root, f.scale, f.ttl_s, f.max_images, f.max_comment_chars, f.max_per_minute, clock=clock)
    urls = ImageUrls.func_or_class(args.image_urls.model_dump())
    gen = IdGenerator()
    api = Api.func_or_class.__mro__[1](Remote(gen), args, Remote(urls), Remote(fb))
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=api))
    with TestClient(web, headers=AUTH) as http:
        yield SimpleNamespace(http=http, acme={"Authorization": f"Bearer {acme}"}, gen=gen, store=fb.store,
                              clock=clock, api=api)  # fmt: skip


def generated(site, headers=None, **body) -> list[str]:
    """The ids of one POST /v1/images/generations (after the store heard of them)."""
    r = site.http.post("/v1/images/generations", json={"prompt": PROMPT, **body}, headers=headers)
    assert r.status_code == 200, r.text
    got = [d["id"] for d in r.json()["data"]]
    settle(site)
    return got


def settle(site) -> None:
    """Let the ingress's background notices reach the store (they run on the TestClient's event loop)."""
    for _ in range(50):
        if site.api.feedback.notices.stats()["pending"] == 0:
            return
        site.http.get("/healthz")  # a request turns the loop
    raise AssertionError("notices still pending")


def test_image_ids_in_json_header_and_png_and_a_rating_round_trip(site):
    from serving.feedback import IMAGE_ID, PNG_KEY
    from serving.images import from_png

    r = site.http.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2, "seed": 1})
    data = r.json()["data"]
    assert all(IMAGE_ID.match(d["id"]) for d in data) and data[0]["id"] != data[1]["id"]
    assert [from_png(base64.b64decode(d["b64_json"])).info[PNG_KEY] for d in data] == [d["id"] for d in data]
    url = site.http.post("/v1/images/generations", json={"prompt": PROMPT, "response_format": "url"}).json()["data"][0]
    assert IMAGE_ID.match(url["id"]) and url["id"] not in url["url"]  # the link's id is another one
    png = site.http.get("/v1/generate", params={"prompt": PROMPT, "seed": 3})
    assert png.headers["X-Image-Id"] == from_png(png.content).info[PNG_KEY]
    settle(site)
    assert site.http.get("/v1/feedback").json() == {"object": "feedback.config", "enabled": True, "scale": "stars",
                                                     "ratings": [1, 2, 3, 4, 5], "max_comment_chars": 20}  # fmt: skip
    out = site.http.post("/v1/feedback", json={"image_id": png.headers["X-Image-Id"], "rating": 4, "comment": "ok"})
    assert out.status_code == 200, out.text
    assert out.json() | {"created": 0} == {
        "object": "feedback", "image_id": png.headers["X-Image-Id"], "rating": 4, "comment": "ok", "model": "base",
        "version": "7", "created": 0, "replaced": False,
    }  # fmt: skip
    summary = site.http.get("/v1/feedback/summary").json()
    assert summary["data"] == {"base": {"7": {"count": 1, "positive": 1, "mean": 4.0}}}
    assert summary["ingress"]["sent"] == 3 and summary["ingress"]["dropped"] == 0


def test_feedback_errors_name_the_field(site):
    [mine] = generated(site, seed=1)
    cases = [
        ({"image_id": mine, "rating": 6}, 400, "rating"),
        ({"image_id": mine, "rating": True}, 400, "rating"),
        ({"image_id": mine, "rating": 4.5}, 400, "rating"),
        ({"image_id": mine}, 400, "rating"),
        ({"image_id": mine, "rating": 3, "comment": "x" * 21}, 400, "comment"),
        ({"image_id": mine, "rating": 3, "stars": 2}, 400, "stars"),
        ({"image_id": "img_" + "A" * 24, "rating": 3}, 404, "image_id"),
    ]
    site.store.max_per_minute = 100
    for body, status, param in cases:
        r = site.http.post("/v1/feedback", json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (body, r.text)
        assert param in r.json()["error"]["message"]


def test_tenants_cannot_rate_each_others_images_and_only_admins_read_the_summary(site):
    [mine] = generated(site, seed=1)
    [theirs] = generated(site, headers=site.acme, seed=2)
    r = site.http.post("/v1/feedback", json={"image_id": mine, "rating": 5}, headers=site.acme)
    assert r.status_code == 404 and mine in r.json()["error"]["message"]
    assert site.http.post("/v1/feedback", json={"image_id": theirs, "rating": 5}).status_code == 404
    assert site.http.post("/v1/feedback", json={"image_id": theirs, "rating": 5}, headers=site.acme).status_code == 200
    assert site.http.get("/v1/feedback/summary", headers=site.acme).status_code == 403


def test_the_rate_limit_is_a_429_with_retry_after(site):
    got = generated(site, n=4, seed=1)
    for image_id in got[:3]:
        assert site.http.post("/v1/feedback", json={"image_id": image_id, "rating": 3}).status_code == 200
    r = site.http.post("/v1/feedback", json={"image_id": got[3], "rating": 3})
    assert r.status_code == 429 and r.headers["Retry-After"] == "60"
    assert "feedback.max_per_minute" in r.json()["error"]["message"]
    site.clock.now += 61
    assert site.http.post("/v1/feedback", json={"image_id": got[3], "rating": 3}).status_code == 200


def test_generation_does_not_wait_for_a_stuck_store(site):
    """The store never answers: generations still come back at once; notices past max_pending are dropped."""

    async def stuck(*args):
        await asyncio.sleep(3)

    site.api.feedback.store = Remote(SimpleNamespace(register=stuck))
    site.api.feedback.notices.max_pending = 2
    for seed in range(4):
        started = time.monotonic()
        r = site.http.post("/v1/images/generations", json={"prompt": PROMPT, "seed": seed})
        assert r.status_code == 200 and time.monotonic() - started < 1.5
    assert site.api.feedback.notices.stats() | {"sent": 0} == {"pending": 2, "sent": 0, "dropped": 2, "failed": 0}


def test_feedback_off_is_a_404(site):
    site.api.feedback.args = site.api.feedback.args.model_copy(update={"enabled": False})
    r = site.http.post("/v1/feedback", json={"image_id": "img_" + "A" * 24, "rating": 3})
    assert r.status_code == 404 and "feedback.enabled=false" in r.json()["error"]["message"]


# ---- SDK ---------------------------------------------------------------------------------------------------------
def test_the_sdk_rates_the_images_it_generated(site, tmp_path):
    from serving.client import AsyncClient, BadRequest, Client, NotFound, RateLimited
    from serving.http import web
    from serving.images import PNG_KEY, png_text

    with Client("http://sdk", api_key=KEY, transport=_SyncASGI(site.http)) as client:
        images = client.generate(PROMPT, n=2, seed=1)
        settle(site)
        assert images[0].info["image_id"] == images[0].info["lorafleet:image_id"]
        images[0].save(tmp_path / "saved.png", pnginfo=png_text({PNG_KEY: images[0].info["image_id"]}))
        assert client.feedback(Image.open(tmp_path / "saved.png"), 5)["rating"] == 5  # the id kept in the file
        again = client.feedback(images[0].info["image_id"], 2, comment="changed")
        assert again["replaced"] is True
        with pytest.raises(BadRequest) as bad:
            client.feedback(images[1], 9)
        assert bad.value.param == "rating"
        with pytest.raises(RateLimited) as limited:
            client.feedback(images[1], 3)
        assert limited.value.retry_after == 60
        with pytest.raises(ValueError, match="carries no id"):
            client.feedback(Image.new("RGB", (4, 4)), 3)

    async def main():
        site.clock.now += 61
        transport = httpx.ASGITransport(app=web)
        async with AsyncClient("http://sdk", api_key=KEY, transport=transport) as client:
            with pytest.raises(NotFound):
                await client.feedback("img_" + "B" * 24, 3)
            return await client.feedback(images[1], 4)

    assert asyncio.run(main())["rating"] == 4


class _SyncASGI(httpx.BaseTransport):
    """httpx's sync transport over the TestClient (which runs the ASGI app and its event loop)."""

    def __init__(self, http):
        self.http = http

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.http.request(request.method, request.url.path, content=request.read(), headers=dict(request.headers))
        return httpx.Response(r.status_code, headers=r.headers, content=r.content)


def test_null_for_the_optional_comment_means_not_given(site):
    """FeedbackBody is a RequestBody (tests/serving/test_http.py checks the image bodies): null = omitted."""
    from serving.feedback import FeedbackBody

    assert FeedbackBody.optional_keys() == {"comment"}
    a, b = generated(site, n=2, seed=1)
    nulled = site.http.post("/v1/feedback", json={"image_id": a, "rating": 3, "comment": None}).json()
    omitted = site.http.post("/v1/feedback", json={"image_id": b, "rating": 3}).json()
    assert nulled["comment"] is omitted["comment"] is None
    assert {k: v for k, v in nulled.items() if k != "image_id"} == {k: v for k, v in omitted.items() if k != "image_id"}
