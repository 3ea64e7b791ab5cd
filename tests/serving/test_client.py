"""The client SDK against a scripted transport: retries with backoff, typed errors, image decoding."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
from PIL import Image

from serving.client import AsyncClient, BadRequest, Client, NotFound, ServerBusy, ServerError, Unauthorized
from serving.images import png_bytes

PNG = base64.b64encode(png_bytes(Image.new("RGB", (8, 8), "red"))).decode()
OK = {"created": 0, "data": [{"b64_json": PNG, "seed": 7}], "model": "champion", "version": "2", "size": "8x8"}


def scripted(*answers):
    """A transport answering with ``answers`` in turn (status, body[, headers]); records the requests."""
    seen: list[httpx.Request] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status, body, *headers = queue.pop(0)
        return httpx.Response(status, json=body, headers=headers[0] if headers else None)

    return handle, seen


def busy(message="server busy"):
    return 503, {"error": {"message": message, "param": None}}, {"Retry-After": "0"}


def test_generate_sends_the_openai_body_and_decodes_images():
    handle, seen = scripted((200, OK))
    client = Client("http://x", api_key="k", transport=httpx.MockTransport(handle))
    [image] = client.generate("a red circle", adapter="champion", seed=7, steps=10, size=64)
    assert image.size == (8, 8) and image.info["seed"] == 7 and image.info["version"] == "2"
    body = __import__("json").loads(seen[0].content)
    assert body == {
        "prompt": "a red circle",
        "n": 1,
        "response_format": "b64_json",
        "model": "champion",
        "seed": 7,
        "size": "64x64",
        "steps": 10,
    }
    assert seen[0].headers["authorization"] == "Bearer k"


def test_busy_answers_are_retried_with_growing_jittered_delays(monkeypatch):
    sleeps = []
    monkeypatch.setattr("serving.client.time.sleep", sleeps.append)
    handle, seen = scripted(busy(), (504, {"error": {"message": "slow"}}), busy(), (200, OK))
    client = Client("http://x", transport=httpx.MockTransport(handle), backoff_s=0.1, retries=4)
    assert len(client.generate("p")) == 1 and len(seen) == 4
    assert len(sleeps) == 3 and 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2 and 0.2 <= sleeps[2] <= 0.4


def test_retries_run_out_as_server_busy_with_the_servers_message(monkeypatch):
    monkeypatch.setattr("serving.client.time.sleep", lambda s: None)
    handle, seen = scripted(*[busy("queue full")] * 3)
    client = Client("http://x", transport=httpx.MockTransport(handle), retries=2)
    with pytest.raises(ServerBusy, match="queue full"):
        client.generate("p")
    assert len(seen) == 3


def test_retry_after_is_a_lower_bound(monkeypatch):
    sleeps = []
    monkeypatch.setattr("serving.client.time.sleep", sleeps.append)
    handle, _ = scripted((503, {"error": {"message": "busy"}}, {"Retry-After": "3"}), (200, OK))
    Client("http://x", transport=httpx.MockTransport(handle), backoff_s=0.1).generate("p")
    assert 3 <= sleeps[0] <= 4.5


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, BadRequest), (422, BadRequest), (401, Unauthorized), (404, NotFound), (500, ServerError)],
)
def test_other_errors_are_typed_and_not_retried(status, error):
    handle, seen = scripted((status, {"error": {"message": "the message", "param": "n"}}))
    with pytest.raises(error, match="the message") as exc:
        Client("http://x", transport=httpx.MockTransport(handle)).generate("p")
    assert exc.value.status == status and len(seen) == 1
    if status == 400:
        assert exc.value.param == "n"


def test_the_async_client_retries_and_decodes_too(monkeypatch):
    async def no_sleep(s):
        return None

    monkeypatch.setattr("serving.client.asyncio.sleep", no_sleep)
    handle, seen = scripted(busy(), (200, OK), (200, {"object": "list", "data": [{"id": "base"}]}))

    async def main():
        async with AsyncClient("http://x", transport=httpx.MockTransport(handle)) as client:
            images = await client.generate("p", n=1)
            return images, await client.models()

    images, models = asyncio.run(main())
    assert images[0].info["model"] == "champion" and models == [{"id": "base"}] and len(seen) == 3


def test_an_unreachable_server_is_server_busy_after_retries(monkeypatch):
    monkeypatch.setattr("serving.client.time.sleep", lambda s: None)

    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    client = Client("http://x", transport=httpx.MockTransport(refuse), retries=1)
    with pytest.raises(ServerBusy, match="cannot reach"):
        client.generate("p")
    assert client.health() == {"live": False, "ready": False}


def test_every_retry_of_a_call_sends_the_same_request_id(monkeypatch):
    """The server's canary picks the arm by X-Request-Id (serving/canary.py): a retried call stays on one arm."""
    monkeypatch.setattr("serving.client.time.sleep", lambda s: None)
    handle, seen = scripted(busy(), busy(), (200, OK | {"arm": "challenger"}), (200, OK))
    client = Client("http://x", transport=httpx.MockTransport(handle), retries=4)
    [image] = client.generate("p")
    assert image.info["arm"] == "challenger"
    ids = [r.headers["x-request-id"] for r in seen[:3]]
    assert len(set(ids)) == 1 and len(ids[0]) == 32
    client.generate("p")  # a new call: a new id
    assert seen[3].headers["x-request-id"] != ids[0]
