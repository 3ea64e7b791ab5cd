"""The OpenAI-shaped HTTP API unchanged on an SDXL base: the real ingress and the real generator replica class (its
engine on the tiny SDXL pipeline) in process, without Ray (``serve.batch`` runs on the test client's event loop)."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.serving.test_engine import PROMPT, pixels
from tests.serving.test_http import AUTH, KEY, KEY_ENV, Remote

pytestmark = pytest.mark.slow


@pytest.fixture
def sdxl_http(monkeypatch, tiny_sdxl_pipe, tiny_sdxl_dir, tmp_path):
    """``SimpleNamespace(http=TestClient, gen=Generator, adapter=folder)``: an SDXL replica serving base and xl."""
    from fastapi.testclient import TestClient
    from ray import serve

    from serving.app import Generator, ImageUrls
    from serving.http import Api, web
    from tests.serving.conftest import tiny_serve_args
    from training.toy_world.adapters import random_adapter

    monkeypatch.setenv(KEY_ENV, KEY)
    adapter = random_adapter(tiny_sdxl_pipe, tiny_sdxl_dir, tmp_path / "xl", seed=60, text_encoders=True)
    args = tiny_serve_args(
        tiny_sdxl_dir, {"xl": adapter}, tmp_path / "cache", api_key_env=KEY_ENV, warmup=True, **{"defaults.steps": 2}
    )
    config = SimpleNamespace(max_ongoing_requests=args.deployment.max_ongoing_requests)  # what serve.batch reads
    context = SimpleNamespace(servable_object=None, _deployment_config=config)
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    gen = Generator.func_or_class(args.model_dump())  # the replica class, without Ray
    urls = ImageUrls.func_or_class(args.image_urls.model_dump())
    context.servable_object = Api.func_or_class.__mro__[1](Remote(gen), args, Remote(urls))
    with TestClient(web, headers=AUTH) as http:
        yield SimpleNamespace(http=http, gen=gen, adapter=adapter)


def test_the_openai_api_serves_an_sdxl_base_and_its_adapters_unchanged(sdxl_http):
    from serving.engine import ImageRequest

    models = sdxl_http.http.get("/v1/models")
    assert models.status_code == 200 and {"base", "xl"} <= {m["id"] for m in models.json()["data"]}
    body = {"prompt": PROMPT, "model": "xl", "n": 2, "size": "64x48", "seed": 4, "response_format": "b64_json"}
    r = sdxl_http.http.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]]
    assert [im.size for im in images] == [(64, 48), (64, 48)]
    engine = sdxl_http.gen.engine  # the same request straight through the engine draws the same images
    [direct] = engine.generate([engine.prepare(ImageRequest(PROMPT, model="xl", n=2, seed=4, width=64, height=48))])
    for got, want in zip(images, direct.images):
        assert np.abs(pixels(got.convert("RGB")) - pixels(want)).max() <= 1  # as the engine tests: 1/255
    bad = sdxl_http.http.post("/v1/images/generations", json={"prompt": PROMPT, "size": "72x72"})
    assert bad.status_code == 400 and "multiple of 16" in bad.text, bad.text
