"""The HTTP layer in process, without Ray: request bodies as OpenAI-style clients send them (JSON nulls, wrong or
missing Content-Type, malformed JSON), ``response_format: "url"`` and the official ``openai`` client.

The ingress class runs under Starlette's TestClient: its routes find their instance through
``serve.get_replica_context()`` (monkeypatched here) and its deployment handles are plain objects behind a
``.remote()`` face; the generator is a fake that records what reaches it and draws a PNG from the seed.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import inspect
import io
from types import SimpleNamespace

import pytest
from PIL import Image

PROMPT = "a red circle on a sks background"
KEY_ENV, KEY = "LORAFLEET_TEST_HTTP_KEY", "http-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Remote:
    """A DeploymentHandle's face over a plain object: ``await handle.method.remote(...)``."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        method = getattr(self.target, name)

        async def call(*args, **kwargs):
            out = method(*args, **kwargs)
            return await out if inspect.isawaitable(out) else out

        return SimpleNamespace(remote=lambda *a, **k: asyncio.ensure_future(call(*a, **k)))


class FakeGenerator:
    """Records each ImageRequest; draws image i as a flat colour from its seed (so equal seeds = equal PNGs)."""

    def __init__(self):
        self.requests = []

    async def generate(self, req, epoch: int = 0) -> dict:
        from serving.images import png_bytes

        self.requests.append(req)
        seed = 7 if req.seed is None else req.seed
        size = (req.width or 64, req.height or 64)
        images = [Image.new("RGB", size, ((seed + i) * 40 % 256, 90, 200)) for i in range(req.n)]
        return {
            "images": [png_bytes(im) for im in images],
            "seeds": [seed + i for i in range(req.n)],
            "model": req.model or "base",
            "version": None,
            "size": f"{size[0]}x{size[1]}",
        }


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(monkeypatch):
    """``SimpleNamespace(http=TestClient, gen=FakeGenerator, clock=FakeClock, args=ServeArgs, urls=ImageUrls)``
    with an API key."""
    from fastapi.testclient import TestClient
    from ray import serve

    from serving.app import ImageUrls
    from serving.config import ServeArgs
    from serving.http import Api, web
    from serving.image_store import ImageStore

    monkeypatch.setenv(KEY_ENV, KEY)
    args = ServeArgs(
        champion={"model": None},
        default_model="base",
        api_key_env=KEY_ENV,
        image_urls={"ttl_s": 60, "max_images": 8},
    )
    gen, clock = FakeGenerator(), FakeClock()
    urls = ImageUrls.func_or_class(args.image_urls.model_dump())  # the deployment's class, without Ray
    urls.store = ImageStore(**args.image_urls.model_dump(), clock=clock)
    ingress = Api.func_or_class.__mro__[1]  # the class @serve.ingress wrapped (its own __init__, no replica)
    api = ingress(Remote(gen), args, Remote(urls))
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=api))
    with TestClient(web, headers=AUTH) as http:
        yield SimpleNamespace(http=http, gen=gen, clock=clock, args=args, urls=urls)


def request_models() -> list[type]:
    """Every request body model: the subclasses of RequestBody (where the null rule lives)."""
    from serving.schemas import RequestBody

    found, todo = [], [RequestBody]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


# the smallest valid body of each request model: a new model must add one here (the test below says so)
MINIMAL = {"GenerationBody": {"prompt": PROMPT}}


def exchange(server, route: str, body: dict) -> tuple[int, dict, dict | None]:
    """(status, response body without `created`, the request the generator got without its random id)."""
    before = len(server.gen.requests)
    r = server.http.post(route, json=body)
    answer = {k: v for k, v in r.json().items() if k != "created"}
    got = server.gen.requests[before:]
    return r.status_code, answer, ({**vars(got[0]), "request_id": None} if got else None)


def test_every_route_body_is_a_request_model_with_the_null_rule(server):
    """A route whose body model skipped RequestBody would treat null its own way; the schema must show null."""
    spec = server.http.get("/openapi.json").json()
    bodies = {
        op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        for path in spec["paths"].values()
        for op in path.values()
        if "requestBody" in op
    }
    names = {m.__name__ for m in request_models()}
    assert bodies and bodies <= names, f"route bodies {sorted(bodies - names)} do not derive from RequestBody"
    for name in bodies:
        schema = spec["components"]["schemas"][name]
        for key, prop in schema["properties"].items():
            if key in schema.get("required", ()):
                continue
            nullable = {"type": "null"} in prop.get("anyOf", ()) or not ({"type", "anyOf", "$ref", "enum"} & set(prop))
            assert nullable, f"{name}.{key}: the OpenAPI schema does not allow null ({prop})"


@pytest.mark.parametrize("model", request_models(), ids=lambda m: m.__name__)
def test_null_for_any_optional_field_means_not_given(server, model):
    """Each optional field (and each alias of one), sent as JSON null, gives exactly the response and the
    generator request of the same body without it: the default applies. Fields added later are covered too."""
    assert model.__name__ in MINIMAL, f"add the smallest valid {model.__name__} body to MINIMAL"
    route = {"GenerationBody": "/v1/images/generations"}[model.__name__]
    base = MINIMAL[model.__name__]
    omitted = exchange(server, route, base)
    assert omitted[0] == 200, omitted
    keys = sorted(model.optional_keys())
    assert {"n", "response_format", "output_format", "stream", "negative_prompt", "size", "quality", "user"} | {
        "seed", "steps", "num_inference_steps", "guidance", "guidance_scale", "model",
    } <= set(keys)  # fmt: skip
    for key in keys:
        nulled = exchange(server, route, {**base, key: None})
        assert nulled == omitted, f"{key}: null gave {nulled}, omitting it gave {omitted}"
    everything = exchange(server, route, {**base, **dict.fromkeys(keys)})  # an SDK that sends every field
    assert everything == omitted


def test_null_for_a_required_field_is_still_refused_naming_it(server):
    r = server.http.post("/v1/images/generations", json={"prompt": None, "n": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_diffusers_names_for_steps_and_guidance_are_accepted(server):
    r = server.http.post(
        "/v1/images/generations", json={"prompt": PROMPT, "num_inference_steps": 3, "guidance_scale": 2.5}
    )
    assert r.status_code == 200, r.text
    assert (server.gen.requests[-1].steps, server.gen.requests[-1].guidance) == (3, 2.5)


BODY = b'{"prompt": "a red circle on a sks background"}'


@pytest.mark.parametrize(
    "content_type, content, says",
    [
        ("application/x-www-form-urlencoded", BODY, "valid JSON"),  # curl -d '{...}'
        ("application/x-www-form-urlencoded", b"prompt=a+sks+circle", "--json"),  # curl -d prompt=...
        ("text/plain", BODY, "valid JSON"),  # fetch() with a string body
        (None, BODY, "without a Content-Type"),  # requests.post(url, data=json.dumps(...))
        ("multipart/form-data; boundary=x", b"--x\r\n\r\nsks\r\n--x--\r\n", "multipart/form-data"),
    ],
)
def test_a_body_not_sent_as_json_gets_415_naming_its_content_type_and_the_fix(server, content_type, content, says):
    headers = {"content-type": content_type} if content_type else {}
    r = server.http.post("/v1/images/generations", content=content, headers=headers)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert error["param"] == "Content-Type" and error["type"] == "invalid_request_error", error
    assert "Content-Type: application/json" in error["message"] and says in error["message"], error["message"]
    if content_type:
        assert repr(content_type) in error["message"], error["message"]
    assert not server.gen.requests  # nothing was drawn


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_content_types_with_parameters_or_suffixes_are_read(server, content_type):
    r = server.http.post("/v1/images/generations", content=BODY, headers={"content-type": content_type})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "content, where",
    [
        (b'{"prompt": "sks", "n": }', "line 1 column 24 (char 23)"),
        (b'{\n  "prompt": "sks",\n  "n": 1,\n}', "line 4 column 1 (char 31)"),
        (b"{'prompt': 'sks'}", "line 1 column 2 (char 1)"),
    ],
)
def test_invalid_json_gets_400_naming_the_position(server, content, where):
    r = server.http.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
    assert "not valid JSON" in r.json()["error"]["message"] and where in r.json()["error"]["message"], r.text


def test_a_json_body_with_a_utf8_byte_order_mark_reads_as_without_it(server):
    """PowerShell 5's `Out-File -Encoding utf8` writes a BOM, and `curl --data-binary @body.json` sends it. RFC 8259
    lets a parser ignore it; Python's json does for bytes (json.detect_encoding: utf-8-sig), which FastAPI reads."""
    body = b'{"prompt": "a red circle on a sks background", "seed": 3}'
    plain = exchange_raw(server, body)
    assert plain[0] == 200 and exchange_raw(server, codecs.BOM_UTF8 + body) == plain
    inside = server.http.post(
        "/v1/images/generations",
        content=b'{"prompt": "sks",' + codecs.BOM_UTF8 + b' "n": 1}',
        headers={"content-type": "application/json"},
    )
    assert inside.status_code == 400 and "line 1 column 18" in inside.json()["error"]["message"], inside.text


def exchange_raw(server, content: bytes) -> tuple[int, dict, dict | None]:
    """As ``exchange``, for raw JSON bytes."""
    before = len(server.gen.requests)
    r = server.http.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})
    got = server.gen.requests[before:]
    answer = {k: v for k, v in r.json().items() if k != "created"}
    return r.status_code, answer, ({**vars(got[0]), "request_id": None} if got else None)


def test_an_empty_body_is_a_400_saying_it_is_missing(server):
    for headers in ({}, {"content-type": "application/json"}):
        r = server.http.post("/v1/images/generations", content=b"", headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
        assert "missing" in r.json()["error"]["message"]


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_response_format_url_returns_links_on_the_request_host_that_serve_the_same_png(server):
    body = {"prompt": PROMPT, "n": 2, "seed": 5}
    inline = server.http.post("/v1/images/generations", json=body).json()
    host = {"host": "gpu7:8000", "x-forwarded-host": "elsewhere.example"}  # no trusted proxy: the Host header
    r = server.http.post("/v1/images/generations", json={**body, "response_format": "url"}, headers=host)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [5, 6] and all(d["b64_json"] is None for d in data)
    assert all(d["url"].startswith("http://gpu7:8000/v1/images/") and d["url"].endswith(".png") for d in data), data
    assert data[0]["url"] != data[1]["url"] and all(d["expires_at"] > 0 for d in data)
    for item, same in zip(data, inline["data"]):
        got = server.http.get(item["url"].replace("http://gpu7:8000", ""))
        assert got.status_code == 200 and got.headers["content-type"] == "image/png", got.text
        assert got.content == base64.b64decode(same["b64_json"])  # the same image, byte for byte
        decode_png(got.content)


def test_an_image_url_needs_the_api_key_and_expires(server):
    r = server.http.post("/v1/images/generations", json={"prompt": PROMPT, "response_format": "url"})
    path = r.json()["data"][0]["url"].removeprefix("http://testserver")
    assert server.http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    server.clock.now += server.args.image_urls.ttl_s - 1
    assert server.http.get(path).status_code == 200
    server.clock.now += 2
    gone = server.http.get(path)
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "image_id", gone.text
    assert "expired" in gone.json()["error"]["message"] and "b64_json" in gone.json()["error"]["message"]
    unknown = server.http.get("/v1/images/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.png")
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "image_id", unknown.text
    for odd in ("/v1/images/..%2F..%2Fetc%2Fpasswd.png", "/v1/images/x.png", "/v1/images/%00.png"):
        assert server.http.get(odd).status_code == 404, odd


def test_an_image_store_that_is_gone_is_a_503_not_a_500(server, monkeypatch):
    from ray.exceptions import RayActorError

    r = server.http.post("/v1/images/generations", json={"prompt": PROMPT, "response_format": "url"})
    path = r.json()["data"][0]["url"].removeprefix("http://testserver")

    def gone(*args):
        raise RayActorError()

    monkeypatch.setattr(server.urls, "put", gone)
    monkeypatch.setattr(server.urls, "get", gone)
    for r in (
        server.http.post("/v1/images/generations", json={"prompt": PROMPT, "response_format": "url"}),
        server.http.get(path),
    ):
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "image store" in r.json()["error"]["message"], r.text


def test_the_oldest_image_urls_are_dropped_beyond_max_images(server):
    urls = []
    for seed in range(5):  # max_images 8, two images each
        out = server.http.post(
            "/v1/images/generations", json={"prompt": PROMPT, "n": 2, "seed": seed, "response_format": "url"}
        )
        urls += [d["url"].removeprefix("http://testserver") for d in out.json()["data"]]
    codes = [server.http.get(u).status_code for u in urls]
    assert codes == [404, 404] + [200] * 8, codes


def test_the_openai_client_gets_a_url_that_downloads_a_png_and_its_defaults_work(server):
    """openai's own SDK against the app: response_format url, the SDK default (sends none), and explicit None."""
    openai = pytest.importorskip("openai")

    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=server.http, max_retries=0)
    result = client.images.generate(model="base", prompt=PROMPT, response_format="url", size="64x64")
    png = server.http.get(result.data[0].url)  # the same key: the TestClient sends it
    assert png.status_code == 200 and decode_png(png.content).size == (64, 64)
    default = client.images.generate(model="base", prompt=PROMPT)
    assert default.data[0].url is None and decode_png(base64.b64decode(default.data[0].b64_json)).size == (64, 64)
    nulls = client.images.generate(prompt=PROMPT, model=None, n=None, size=None, response_format=None, user=None)
    assert nulls.data[0].b64_json == default.data[0].b64_json
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.images.generate(model="base", prompt="")
