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

    from serving.config import ServeArgs
    from serving.http import Api, web
    from serving.image_store import ImageStore
    from serving.shared_stores import ImageUrls

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
        if "application/json" in op.get("requestBody", {}).get("content", {})  # POST /v1/files is multipart
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


# image-generation bodies; other routes' bodies test the rule in their own files (tests/serving/test_finetune.py)
@pytest.mark.parametrize("model", [m for m in request_models() if m.__module__ == "serving.schemas"],
                         ids=lambda m: m.__name__)  # fmt: skip
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


# ---- body bytes: encodings, charsets, JSON that Python's json takes or fails on without saying why ----------------
ROUTE = "/v1/images/generations"


def post_raw(server, content: bytes, **headers: str):
    return server.http.post(ROUTE, content=content, headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate, gzip"])
def test_a_compressed_body_gets_415_naming_the_encoding(server, coding):
    import gzip

    r = post_raw(server, gzip.compress(BODY), **{"content-encoding": coding})
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert error["param"] == "Content-Encoding" and coding in error["message"], error
    assert "uncompressed" in error["message"] and r.headers["accept-encoding"] == "identity", (error, r.headers)
    assert not server.gen.requests
    assert post_raw(server, BODY, **{"content-encoding": "identity"}).status_code == 200


@pytest.mark.parametrize(
    "charset, codec", [("latin-1", "latin-1"), ("ISO-8859-1", "latin-1"), ("utf-16", "utf-16"), ("UTF-8", "utf-8")]
)
def test_a_body_in_the_charset_its_content_type_names_reads_as_those_characters(server, charset, codec):
    prompt = "café crème on a sks background"
    r = post_raw(
        server, f'{{"prompt": "{prompt}"}}'.encode(codec), **{"content-type": f"application/json; charset={charset}"}
    )
    assert r.status_code == 200, r.text
    assert server.gen.requests[-1].prompt == prompt


@pytest.mark.parametrize(
    "content_type, status, param, says",
    [
        ("application/json", 400, "body", ["0xe9 at offset 15", "UTF-8", "charset=latin-1"]),  # no charset: UTF-8
        ("application/json; charset=utf-8", 400, "body", ["0xe9 at offset 15", "UTF-8"]),
        ("application/json; charset=klingon", 415, "Content-Type", ["'klingon'", "UTF-8"]),
        ("application/json; charset=base64", 415, "Content-Type", ["'base64'", "not a text encoding"]),
    ],
)
def test_body_bytes_that_are_not_its_encoding_get_an_error_naming_the_byte_or_charset(
    server, content_type, status, param, says
):
    r = post_raw(server, '{"prompt": "café sks"}'.encode("latin-1"), **{"content-type": content_type})
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert all(s in r.json()["error"]["message"] for s in says), r.json()["error"]["message"]
    assert not server.gen.requests


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_json_nesting_is_limited_and_the_limit_is_named(server):
    from serving.http import MAX_DEPTH

    deep = post_raw(server, b'{"prompt": "sks", "user": ' + nested(30_000) + b"}")
    assert deep.status_code == 400 and deep.json()["error"]["param"] == "body", deep.text
    assert f"nested 30001 levels deep; the limit is {MAX_DEPTH}" in deep.json()["error"]["message"], deep.text
    over = post_raw(server, b'{"prompt": "sks", "user": ' + nested(MAX_DEPTH) + b"}")  # the body object is one more
    assert over.status_code == 400 and f"nested {MAX_DEPTH + 1} levels" in over.json()["error"]["message"], over.text
    at = post_raw(server, b'{"prompt": "sks", "user": ' + nested(MAX_DEPTH - 1) + b"}")
    assert at.status_code == 200, at.text
    brackets_in_text = post_raw(server, b'{"prompt": "' + b"[{" * 100 + b' sks \\" ]"}')  # inside a string
    assert brackets_in_text.status_code == 200, brackets_in_text.text
    assert server.gen.requests[-1].prompt == "[{" * 100 + ' sks " ]'


@pytest.mark.parametrize(
    "content, param, says",
    [
        (b'{"prompt": "sks", "n": ' + b"9" * 5000 + b"}", "n", "a number with 5000 digits"),  # past Python's 4300
        (b'{"prompt": "sks", "seed": -' + b"1" * 101 + b"}", "seed", "a number with 101 digits"),
        (b'{"prompt": "sks", "user": [1, ' + b"7" * 4400 + b"]}", "user", "a number with 4400 digits"),
        (b'{"prompt": "sks", "guidance": NaN}', "guidance", "NaN is not JSON"),
        (b'{"prompt": "sks", "guidance": -Infinity}', "guidance", "-Infinity is not JSON"),
        (b'{"prompt": "sks", "n": 1, "n": 3}', "n", "given 2 times in one JSON object"),
        (b'{"prompt": "sks", "user": {"id": 1, "id": 2}}', "id", "given 2 times"),
        (b'[{"prompt": "sks"}, ' + b"5" * 200 + b"]", "body", "a number with 200 digits"),  # outside any object
    ],
)
def test_json_python_would_misread_gets_400_naming_the_key(server, content, param, says):
    r = post_raw(server, content)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert says in r.json()["error"]["message"], r.text
    assert not server.gen.requests


def test_an_integer_under_the_digit_limit_gets_its_fields_own_error(server):
    """The digit limit (100) sits far above every field's range: a merely out-of-range number is the field's 400."""
    r = post_raw(server, b'{"prompt": "sks", "seed": -' + b"9" * 60 + b"}")
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    assert "greater than or equal to 0" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("length, status", [("-1", 400), ("abc", 400), ("1e3", 400), ("10, 20", 400)])
def test_a_content_length_that_is_not_one_byte_count_is_a_400_naming_the_header(server, length, status):
    r = post_raw(server, BODY, **{"content-length": length})
    assert r.status_code == status and r.json()["error"]["param"] == "Content-Length", r.text
    assert repr(length) in r.json()["error"]["message"] and "larger than" not in r.json()["error"]["message"]


# ---- fields: aliases, booleans, query strings ----------------------------------------------------------------------
def alias_pairs() -> list[tuple[str, tuple[str, ...]]]:
    from serving.schemas import GenerationBody

    return [
        (n, GenerationBody.field_keys(n)) for n in GenerationBody.model_fields if len(GenerationBody.field_keys(n)) > 1
    ]


@pytest.mark.parametrize("name, keys", alias_pairs(), ids=lambda x: str(x))
def test_a_field_given_under_two_of_its_names_is_refused_naming_both(server, name, keys):
    """steps / num_inference_steps, guidance / guidance_scale, and any alias added later."""
    values = {"steps": (4, 40), "guidance": (1.5, 7.5)}[name]
    r = server.http.post(ROUTE, json={"prompt": PROMPT, keys[0]: values[0], keys[1]: values[1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == keys[0], r.text
    assert f"{keys[0]} / {keys[1]} are the same field: give one of them" in r.json()["error"]["message"], r.text
    one = server.http.post(ROUTE, json={"prompt": PROMPT, keys[0]: None, keys[1]: values[1]})  # null = not given
    assert one.status_code == 200 and getattr(server.gen.requests[-1], name) == values[1], one.text


@pytest.mark.parametrize("field", ["n", "seed", "steps", "num_inference_steps", "guidance", "guidance_scale"])
@pytest.mark.parametrize("value", [True, False])
def test_a_json_boolean_for_a_number_is_refused_naming_the_field(server, field, value):
    r = server.http.post(ROUTE, json={"prompt": PROMPT, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert f"is a JSON boolean ({str(value).lower()}); send a number" in r.json()["error"]["message"]
    assert not server.gen.requests


def test_integral_floats_and_numeric_strings_stay_accepted_fractions_do_not(server):
    """pydantic's lax reading, kept on purpose: JavaScript clients send 2.0 for 2; 2.5 images is refused."""
    assert server.http.post(ROUTE, json={"prompt": PROMPT, "n": 2.0, "seed": "7"}).status_code == 200
    assert (server.gen.requests[-1].n, server.gen.requests[-1].seed) == (2, 7)
    r = server.http.post(ROUTE, json={"prompt": PROMPT, "n": 2.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


@pytest.mark.parametrize("size", ["64x64\n", "64x64\r\n", " 64x64", "64X64x"])
def test_a_size_with_anything_around_it_is_refused(server, size):
    """``$`` in a pattern matches before a trailing newline; sizes (and model names, image ids) use ``\\Z``."""
    r = server.http.post(ROUTE, json={"prompt": PROMPT, "size": size})
    assert r.status_code == 400 and r.json()["error"]["param"] == "size", r.text
    assert not server.gen.requests


def test_a_model_name_with_a_trailing_newline_is_not_a_name():
    from serving.config import MODEL_NAME

    assert MODEL_NAME.match("champion") and not MODEL_NAME.match("champion\n")


def png_request(server, query: str):
    before = len(server.gen.requests)
    r = server.http.get(f"/v1/generate?{query}")
    got = server.gen.requests[before:]
    return r, ({**vars(got[0]), "request_id": None} if got else None)


def test_unknown_query_parameters_are_refused_naming_them_and_the_known_ones(server):
    r, got = png_request(server, "prompt=sks&n=2&foo=1")
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and got is None, r.text
    message = r.json()["error"]["message"]
    assert "n: is not a parameter of this route" in message and "foo: is not a parameter" in message, message
    assert "it takes prompt, adapter, seed, steps, guidance, size" in message, message


def test_an_empty_query_value_means_not_given_as_null_does_in_a_body(server):
    plain = png_request(server, "prompt=sks")
    assert plain[0].status_code == 200
    blank = png_request(server, "prompt=sks&seed=&steps=&guidance=&size=&adapter=")
    assert (blank[0].status_code, blank[0].content, blank[1]) == (200, plain[0].content, plain[1])
    r, got = png_request(server, "prompt=")  # a required parameter stays required
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and got is None, r.text
    r, got = png_request(server, "prompt=sks&seed=3&steps=2&size=64x64")
    assert r.status_code == 200 and (got["seed"], got["steps"], got["width"]) == (3, 2, 64)


def test_a_query_parameter_given_twice_is_refused(server):
    r, got = png_request(server, "prompt=a&prompt=sks&seed=1")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and got is None, r.text
    assert "given 2 times in the query string" in r.json()["error"]["message"]


# ---- methods, auth order -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, path, allow",
    [("GET", ROUTE, "POST"), ("PUT", ROUTE, "POST"), ("POST", "/v1/generate", "GET"), ("HEAD", "/v1/generate", "GET")],
)
def test_a_wrong_method_is_a_405_of_the_clients_kind_with_allow(server, method, path, allow):
    r = server.http.request(method, f"{path}?prompt=sks" if "generate?" not in path else path)
    assert r.status_code == 405 and r.headers["allow"] == allow, (r.status_code, r.headers)
    if method != "HEAD":
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and f"{method} is not allowed" in error["message"], error
    assert not server.gen.requests  # a HEAD on /v1/generate draws nothing


def test_no_client_error_status_is_typed_a_server_error():
    from serving.schemas import error_type

    assert all(error_type(s) != "server_error" for s in range(400, 500))
    assert error_type(500) == error_type(507) == "server_error" and error_type(401) == "authentication_error"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/", "/v1/models", "/admin/stats"])
def test_cheap_get_routes_answer_head(server, path):
    server.gen.models = lambda tenant=None: {"object": "list", "data": []}
    server.gen.ready = lambda: True
    server.gen.stats = lambda: {}
    get, head = server.http.get(path), server.http.head(path)
    assert get.status_code == head.status_code == 200, (get.text, head.status_code)
    assert head.headers["content-type"] == get.headers["content-type"]


def test_head_needs_the_key_where_get_does(server):
    assert server.http.head("/v1/models", headers={"Authorization": ""}).status_code == 401
    assert server.http.head("/healthz", headers={"Authorization": ""}).status_code == 200


@pytest.mark.parametrize(
    "method, path, content, headers",
    [
        ("POST", ROUTE, b"{", {"content-type": "application/json"}),  # broken JSON
        ("POST", ROUTE, b'{"prompt": "sks", "colour": 1}', {"content-type": "application/json"}),  # unknown key
        ("POST", ROUTE, BODY, {"content-type": "text/plain"}),  # 415 otherwise
        ("POST", ROUTE, b"x" * 70_000, {"content-type": "application/json"}),  # 413 otherwise
        ("POST", ROUTE, BODY, {"content-type": "application/json", "content-length": "-1"}),
        ("POST", ROUTE, BODY, {"content-type": "application/json", "content-encoding": "gzip"}),
        ("GET", "/v1/generate?prompt=sks&foo=1", b"", {}),
        ("GET", "/v1/images/nope.png", b"", {}),
        ("PUT", ROUTE, b"", {}),  # 405 otherwise
        ("GET", "/no/such/route", b"", {}),  # 404 otherwise: a caller without the key learns no routes
    ],
)
def test_without_the_key_every_request_is_a_401_whatever_else_is_wrong(server, method, path, content, headers):
    r = server.http.request(method, path, content=content, headers={**headers, "Authorization": ""})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (r.status_code, r.text)
    assert r.json()["error"]["type"] == "authentication_error"
    assert not server.gen.requests
