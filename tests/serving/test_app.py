"""The Ray Serve app on a local Ray (loopback, one logical GPU): HTTP round trips, bad input, auth, backpressure,
batching, GPU-fraction packing and champion reload. One Ray and one Serve instance for the module."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
PROMPT = "a red circle on a sks background"
KEY_ENV = "LORAFLEET_TEST_API_KEY"
os.environ[KEY_ENV] = "s3cret-test-key"  # before ray.init: replicas inherit the environment, as from a secret


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_instance():
    import ray
    from ray import serve

    port, metrics_port = free_port(), free_port()
    ray.init(
        num_cpus=4,
        num_gpus=1,  # logical: lets two num_gpus=0.5 replicas pack; the engine falls back to CPU
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _metrics_export_port=metrics_port,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"url": f"http://127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def module_args(tiny_pipe_dir, tiny_adapters, tmp_path_factory):
    """ServeArgs for the module's apps (the function-scoped ``serve_args`` cannot serve a module fixture)."""
    from tests.serving.conftest import tiny_serve_args

    cache = tmp_path_factory.mktemp("serve-cache")
    return lambda **overrides: tiny_serve_args(
        tiny_pipe_dir, tiny_adapters, cache, **({"deployment.num_cpus": 0} | overrides)
    )


def deploy(serve_instance, args, name: str) -> str:
    from ray import serve

    from serving.app import build_app

    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return f"{serve_instance['url']}/{name}"


@pytest.fixture(scope="module")
def main_app(serve_instance, module_args) -> str:
    return deploy(serve_instance, module_args(**{"batching.batch_wait_timeout_s": 0.2}), "main")


def decode(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))), dtype=np.int16)


def test_http_round_trip(main_app):
    with httpx.Client(base_url=main_app, timeout=60) as http:
        assert http.get("/healthz").json() == {"status": "ok"} and http.get("/readyz").status_code == 200
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert ids == ["base", "ad0", "ad1", "ad2", "ad3"]
        body = {"prompt": PROMPT, "model": "ad0", "n": 2, "seed": 3, "size": "64x64"}
        out = http.post("/v1/images/generations", json=body).json()
        assert out["model"] == "ad0" and [d["seed"] for d in out["data"]] == [3, 4]
        assert decode(out["data"][0]).shape == (64, 64, 3)
        png = http.get("/v1/generate", params={"prompt": PROMPT, "adapter": "ad0", "seed": 3})
        assert png.headers["content-type"] == "image/png" and png.headers["x-seed"] == "3"
        same = np.asarray(Image.open(io.BytesIO(png.content)), dtype=np.int16)
        assert np.abs(same - decode(out["data"][0])).max() <= 1
        # the replica's response cache and HTTP validators through Serve: the repeat is a hit, then a 304
        assert png.headers["x-cache"] == "miss" and png.headers["cache-control"].startswith("private, max-age=")
        again = http.get("/v1/generate", params={"prompt": PROMPT, "adapter": "ad0", "seed": 3})
        assert again.headers["x-cache"] == "hit" and again.content == png.content
        assert again.headers["etag"] == png.headers["etag"]
        unchanged = http.get(
            "/v1/generate",
            params={"prompt": PROMPT, "adapter": "ad0", "seed": 3},
            headers={"If-None-Match": png.headers["etag"]},
        )
        assert unchanged.status_code == 304 and not unchanged.content
        assert "OpenAPI" in http.get("/docs").text or "swagger" in http.get("/docs").text.lower()
        assert "<form" in http.get("/").text
        # response_format url through the real proxy and route prefix: a link on this host, the same image
        linked = http.post("/v1/images/generations", json={**body, "n": 1, "response_format": "url", "user": None})
        url = linked.json()["data"][0]["url"]
        assert linked.status_code == 200 and url.startswith(f"{main_app}/v1/images/"), linked.text
        linked_png = http.get(url)  # one image in its pass, `out` had two: equal up to rounding (see /v1/generate)
        assert linked_png.headers["content-type"] == "image/png", linked_png.text[:500]
        assert np.abs(np.asarray(Image.open(io.BytesIO(linked_png.content)), dtype=np.int16) - decode(out["data"][0])
                      ).max() <= 1  # fmt: skip
        form = http.post("/v1/images/generations", content=b'{"prompt": "sks"}')  # no JSON Content-Type
        assert form.status_code == 415 and form.json()["error"]["param"] == "Content-Type", form.text


def test_only_the_generator_replicas_load_torch(main_app):
    """The ingress and the one-replica stores import neither torch nor diffusers (about 600 MB each otherwise):
    asked inside each live replica of the app, after it served (``__ray_call__`` runs a function in the actor)."""
    import ray

    with httpx.Client(base_url=main_app, timeout=60) as http:  # every deployment has done its work once
        out = http.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 1, "size": "64x64"})
        assert out.status_code == 200, out.text

    def loaded(_replica) -> tuple[int, list[str], int]:
        import os
        import re
        import sys

        rss = re.search(r"VmRSS:\s+(\d+) kB", open("/proc/self/status").read())  # noqa: SIM115 - one read
        modules = sorted(m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules)
        return os.getpid(), modules, int(rss.group(1)) // 1024 if rss else -1

    found = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        parts = actor["name"].split("#")  # SERVE_REPLICA::<app>#<deployment>#<replica id>
        if actor["namespace"] == "serve" and len(parts) == 3 and parts[0] == "SERVE_REPLICA::main":
            handle = ray.get_actor(actor["name"], namespace="serve")
            found.setdefault(parts[1], []).append(ray.get(handle.__ray_call__.remote(loaded), timeout=60))
    print("replica RSS MB:", {d: [r[2] for r in replicas] for d, replicas in sorted(found.items())})
    assert set(found) >= {"Api", "Generator", "ImageUrls", "Feedback", "BatchWorker"}, found
    for deployment, replicas in found.items():
        for pid, modules, _rss in replicas:
            if deployment == "Generator":
                assert "torch" in modules and "diffusers" in modules, (pid, modules)
            else:
                assert modules == [], f"{deployment} replica (pid {pid}) imported {modules}"


def test_images_get_ids_the_feedback_deployment_takes_ratings_for(main_app):
    """Through Ray: the Generator's image ids reach the one-replica Feedback store in the background, which takes a
    rating and sums it up per model and version (the store's rules: tests/serving/test_feedback.py)."""
    from serving.images import PNG_KEY

    with httpx.Client(base_url=main_app, timeout=60) as http:
        out = http.post("/v1/images/generations", json={"prompt": PROMPT, "model": "ad1", "n": 2, "seed": 5}).json()
        first = out["data"][0]
        assert Image.open(io.BytesIO(base64.b64decode(first["b64_json"]))).info[PNG_KEY] == first["id"]
        png = http.get("/v1/generate", params={"prompt": PROMPT, "seed": 5})
        deadline, rated = time.monotonic() + 30, None
        while time.monotonic() < deadline:  # the notice is fire-and-forget: it may land after the answer
            rated = http.post("/v1/feedback", json={"image_id": first["id"], "rating": 1, "comment": "good"})
            if rated.status_code != 404:
                break
            time.sleep(0.2)
        assert rated.status_code == 200 and rated.json()["model"] == "ad1", rated.text
        assert http.post("/v1/feedback", json={"image_id": first["id"], "rating": -1}).json()["replaced"] is True
        until = time.monotonic() + 30
        while http.post("/v1/feedback", json={"image_id": png.headers["x-image-id"], "rating": 1}).status_code == 404:
            assert time.monotonic() < until, "the GET /v1/generate image never became ratable"
            time.sleep(0.2)
        summary = http.get("/v1/feedback/summary").json()
        assert summary["data"] == {"ad1": {"none": {"count": 1, "positive": 0, "mean": -1.0}},
                                   "base": {"none": {"count": 1, "positive": 1, "mean": 1.0}}}  # fmt: skip
        assert summary["store"]["counts"]["registered"] >= 3


BAD = [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x" * 501}, 400, "prompt"),
    ({"prompt": PROMPT, "n": 99}, 400, "n"),
    ({"prompt": PROMPT, "n": 0}, 400, "n"),
    ({"prompt": PROMPT, "steps": 999}, 400, "steps"),
    ({"prompt": PROMPT, "size": "4096x4096"}, 400, "width"),
    ({"prompt": PROMPT, "size": "-64x64"}, 400, "size"),
    ({"prompt": PROMPT, "size": "big"}, 400, "size"),
    ({"prompt": PROMPT, "guidance": "NaN"}, 400, "guidance"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed"),
    ({"prompt": PROMPT, "n": "two"}, 400, "n"),
    ({"prompt": PROMPT, "response_format": "jpeg"}, 400, "response_format"),
    ({"prompt": PROMPT, "stream": True}, 400, "stream"),
    ({"prompt": PROMPT, "colour": "red"}, 400, "colour"),
    ({"n": 1}, 400, "prompt"),
    ({"prompt": PROMPT, "model": "nope"}, 404, "model"),
    ({"prompt": PROMPT, "model": "../../etc/passwd"}, 404, "model"),
    ({"prompt": PROMPT, "model": "someone@champion"}, 404, "model"),  # no registry configured
    # reliability: hand-written hostile input
    ({"prompt": "x" * 1_000_000}, 413, "body"),  # limits.max_body_bytes: refused before it is read
    ({"prompt": PROMPT, "size": "99999x1"}, 400, "width"),
    ({"prompt": PROMPT, "size": "0x0"}, 400, "width"),
    ({"prompt": PROMPT, "steps": 10**30}, 400, "steps"),
    ({"prompt": PROMPT, "steps": -5}, 400, "steps"),
    ({"prompt": PROMPT, "seed": 2**70}, 400, "seed"),
    ({"prompt": PROMPT, "guidance": 1e308}, 400, "guidance"),
    ({"prompt": PROMPT, "guidance": "Infinity"}, 400, "guidance"),
    ({"prompt": PROMPT, "n": 10**12}, 400, "n"),
    ({"prompt": PROMPT, "n": 1.5}, 400, "n"),
    ({"prompt": None}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": {"$gt": ""}}, 400, "prompt"),
    ({"prompt": PROMPT, "model": "/etc/passwd"}, 404, "model"),
    ({"prompt": PROMPT, "model": "..%2F..%2Fetc%2Fpasswd"}, 404, "model"),
    ({"prompt": PROMPT, "model": "models:/x@y"}, 404, "model"),
    ({"prompt": PROMPT, "model": "runs:/abc/adapter"}, 404, "model"),
    ({"prompt": PROMPT, "model": "file:///etc/passwd"}, 404, "model"),
    ({"prompt": PROMPT, "model": "ad0\x00"}, 404, "model"),
    ({"prompt": PROMPT, "model": 7}, 400, "model"),
]
GOOD_ODD = ["🦊 ʎɐɹƃ on a sks background", "שלום sks", "a\x00b sks", "\u202e sks \ufeff", "sks " * 100]


def test_bad_input_gets_a_4xx_naming_the_field(main_app):
    with httpx.Client(base_url=main_app, timeout=60) as http:
        for body, status, field in BAD:
            r = http.post("/v1/images/generations", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["param"] == field, (body, r.json())
        for raw in (b"{bad json", b"[1, 2]", b""):
            r = http.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "body", (raw, r.text)
        r = http.get("/v1/generate", params={"prompt": PROMPT, "size": "64"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "size"
        for adapter in ("../../etc/passwd", "/etc/passwd", "..\\..\\win.ini", "models:/a/1"):
            r = http.get("/v1/generate", params={"prompt": PROMPT, "adapter": adapter})
            assert r.status_code == 404 and r.json()["error"]["param"] == "model", (adapter, r.text)

        def chunks():  # no Content-Length: counted while it arrives
            yield b'{"prompt": "'
            for _ in range(200):
                yield b"x" * 1024
            yield b'"}'

        r = http.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text
        for prompt in GOOD_ODD:  # odd but valid text is drawn, not refused (or crashed on)
            r = http.post("/v1/images/generations", json={"prompt": prompt, "seed": 1, "steps": 2})
            assert r.status_code == 200, (prompt, r.text)


def test_concurrent_requests_share_batches_and_the_metrics_show_it(main_app, serve_instance):
    from prometheus_client.parser import text_string_to_metric_families

    def one(i: int) -> int:
        model = ["ad0", "ad1", "base", "ad2"][i % 4]
        return httpx.post(
            f"{main_app}/v1/images/generations", json={"prompt": PROMPT, "model": model}, timeout=60
        ).status_code

    with cf.ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(32))) == {200}
    stats = httpx.get(f"{main_app}/admin/stats", timeout=10).json()
    assert stats["mean_batch_images"] > 1, stats
    assert max(int(k) for k in stats["batch_images"]) >= 4, stats
    records = stats["records"]["versions"]  # every answer became a generation record, per model
    assert sum(records[f"{m}/-"]["ok"] for m in ("ad0", "ad1", "base", "ad2")) >= 32, stats["records"]
    deadline, mean = time.time() + 60, 0.0  # Ray's agent exports every few seconds
    while time.time() < deadline and mean <= 1:
        text = httpx.get(serve_instance["metrics"], timeout=10).text
        sums = {"count": 0.0, "sum": 0.0}
        for family in text_string_to_metric_families(text):
            if family.name == "ray_lorafleet_batch_images":
                for s in family.samples:
                    for part in sums:
                        if s.name.endswith(f"_{part}"):
                            sums[part] += s.value
        mean = sums["sum"] / sums["count"] if sums["count"] else 0.0
        time.sleep(2)
    assert mean > 1, "ray_lorafleet_batch_images never showed batches of more than one image"
    assert "ray_lorafleet_adapter_cache" in text and "ray_lorafleet_requests" in text
    # every series the Grafana dashboard (cluster/grafana/lorafleet_serve.json) reads is exported under that name
    from tests.cluster.test_grafana import FIRST_EVENT_ONLY, dashboard, queries

    series = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    wanted = {m for _, query in queries(dashboard()) for m in re.findall(r"\bray_lorafleet_\w+", query)}
    wanted -= FIRST_EVENT_ONLY  # no record was dropped in this run
    assert wanted <= series, f"the dashboard reads series Ray does not export: {sorted(wanted - series)}"


def test_api_key_guards_everything_but_health(serve_instance, module_args):
    from serving.client import Client, Unauthorized

    url = deploy(serve_instance, module_args(api_key_env=KEY_ENV), "guarded")
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/images/generations"), ("GET", "/admin/stats")):
            r = http.request(method, path, json={"prompt": PROMPT})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    with pytest.raises(Unauthorized), Client(url, api_key="nope") as client:
        client.models()
    with Client(url, api_key=os.environ[KEY_ENV]) as client:
        assert len(client.generate(PROMPT, adapter="ad1", seed=0)) == 1
        client.models()

    # the key never reaches a log: Serve's access and replica logs, the controller, the proxy, the raylet
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any(p.parent.name == "serve" for p in files), "no Serve logs found to check"
    leaked = [str(p) for p in files if os.environ[KEY_ENV].encode() in p.read_bytes()]
    assert not leaked, leaked


def test_tenants_see_only_their_own_adapters_and_images_through_serve(
    serve_instance, module_args, tiny_adapters, mlflow_server, tmp_path
):
    """Keys from a keys file next to the api_key_env key: the tenant travels with the request to the generator
    replica (adapters, /v1/models) and to the image store (url images); /admin/* is the admin's."""
    from ray import serve

    from serving.tenants import add_key
    from tests.serving.conftest import register_adapter

    keys_file = tmp_path / "keys.json"
    acme, bravo = (add_key(keys_file, name)[0] for name in ("acme", "bravo"))
    register_adapter(mlflow_server, "acme--app-style", tiny_adapters["ad1"], status="passed")
    args = module_args(**{"tracking_uri": mlflow_server, "api_key_env": KEY_ENV, "tenants.keys_file": str(keys_file)})
    url = deploy(serve_instance, args, "tenants")
    a, b = ({"Authorization": f"Bearer {key}"} for key in (acme, bravo))
    admin = {"Authorization": f"Bearer {os.environ[KEY_ENV]}"}
    with httpx.Client(base_url=url, timeout=60) as http:
        listed = {
            who: {m["id"] for m in http.get("/v1/models", headers=h).json()["data"]} for who, h in (("a", a), ("b", b))
        }
        assert "acme--app-style" in listed["a"] and not {i for i in listed["b"] if i.startswith("acme--")}, listed
        body = {"prompt": PROMPT, "model": "acme--app-style", "seed": 1, "response_format": "url"}
        mine = http.post("/v1/images/generations", json=body, headers=a)
        assert mine.status_code == 200, mine.text
        theirs = http.post("/v1/images/generations", json=body, headers=b)
        missing = http.post("/v1/images/generations", json={**body, "model": "acme--app-none"}, headers=b)
        assert theirs.status_code == missing.status_code == 404, theirs.text
        assert theirs.json()["error"]["message"] == missing.json()["error"]["message"].replace("none", "style")
        image = mine.json()["data"][0]["url"].removeprefix(url)
        assert http.get(image, headers=a).status_code == 200 and http.get(image, headers=b).status_code == 404
        assert http.get("/admin/stats", headers=a).status_code == 403
        assert http.get("/admin/stats", headers=admin).status_code == 200
    serve.delete("tenants")


def test_a_burst_beyond_the_queue_is_shed_with_503_and_slow_requests_time_out(serve_instance, module_args):
    args = module_args(
        **{
            "batching.max_batch_size": 1,
            "batching.max_concurrent_batches": 1,
            "limits.max_n": 1,
            "limits.max_steps": 500,
            "deployment.max_ongoing_requests": 1,
            "deployment.max_queued_requests": 1,
            "deployment.request_timeout_s": 30,
            "deployment.retry_after_s": 2,
        }
    )
    url = deploy(serve_instance, args, "tight")

    def one(i: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "steps": 60, "seed": i}, timeout=60)

    with cf.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    codes = [r.status_code for r in answers]
    # room for 2 (1 running + 1 queued); Ray's routers see queue lengths a moment late, so count loosely
    assert set(codes) <= {200, 503} and codes.count(503) >= 6 and codes.count(200) >= 1, codes
    shed = next(r for r in answers if r.status_code == 503)
    assert shed.headers["retry-after"] == "2" and shed.json()["error"]["type"] == "server_busy"
    assert one(99).status_code == 200  # shedding left the replica serving

    quick = {"deployment.request_timeout_s": 0.05, "registry_deadline_s": 0.01}  # the deadline below the timeout
    slow = deploy(serve_instance, module_args(**quick), "slow")
    r = httpx.post(f"{slow}/v1/images/generations", json={"prompt": PROMPT, "steps": 50, "n": 4}, timeout=60)
    assert r.status_code == 504 and "longer than 0.05 s" in r.json()["error"]["message"]


def test_two_half_gpu_replicas_pack_onto_one_logical_gpu(serve_instance, module_args):
    import ray
    from ray import serve

    from serving.client import Client

    args = module_args(**{"deployment.num_replicas": 2, "deployment.num_gpus": 0.5})
    url = deploy(serve_instance, args, "gpu")
    status = serve.status().applications["gpu"].deployments["Generator"]
    assert status.replica_states.get("RUNNING") == 2, status
    assert ray.available_resources().get("GPU", 0) == pytest.approx(0)
    with Client(url) as client:
        assert client.generate(PROMPT, adapter="ad0", seed=1)[0].size == (64, 64)  # CPU fallback draws
    serve.delete("gpu")  # give the logical GPU back


def test_replicas_follow_the_champion_without_dropping_requests(
    serve_instance, module_args, tiny_adapters, mlflow_server
):
    from serving.client import Client
    from tests.serving.conftest import register_adapter

    v1 = register_adapter(mlflow_server, "srv-champ", tiny_adapters["ad0"])
    args = module_args(
        **{
            "champion.model": "srv-champ",
            "champion.poll_s": 2,
            "default_model": "champion",
            "tracking_uri": mlflow_server,
        }
    )
    url = deploy(serve_instance, args, "champ")
    with Client(url) as client:
        assert client.generate(PROMPT, seed=1)[0].info["version"] == v1
        v2 = register_adapter(mlflow_server, "srv-champ", tiny_adapters["ad1"])
        versions, deadline = [], time.time() + 30
        while time.time() < deadline and (not versions or versions[-1] != v2):  # the poll picks it up
            versions.append(client.generate(PROMPT, seed=1)[0].info["version"])
        assert versions[-1] == v2 and set(versions) <= {v1, v2}
        # the admin route reloads at once; requests in flight meanwhile all succeed
        from evaluation.registry import client_for, rollback

        rollback(client_for(mlflow_server), "srv-champ")
        with cf.ThreadPoolExecutor(4) as pool:
            during = [pool.submit(client.generate, PROMPT, None, 1, i) for i in range(8)]
            reload = httpx.post(f"{url}/admin/reload", timeout=60).json()
            assert [len(f.result()) for f in during] == [1] * 8
        assert reload["models"] == {"champion": v1}
        assert client.generate(PROMPT, seed=1)[0].info["version"] == v1
        ids = [m["id"] for m in client.models()]
        assert {"champion", "srv-champ", f"srv-champ/{v1}"} <= set(ids) and f"srv-champ/{v2}" not in ids  # rolled back


def test_every_datasets_model_is_listed_and_a_missing_name_is_a_404_at_once(
    serve_instance, module_args, tiny_adapters, mlflow_server
):
    from ray import serve

    from evaluation.registry import client_for, rollback
    from serving.client import Client, NotFound
    from tests.serving.conftest import register_adapter
    from training.mlflow_server import free_port as closed_port

    sks, ohwx = "app-sks-lora", "app-ohwx-lora"  # two datasets' models: champions, an alias, gated versions
    for adapter in ("ad0", "ad1"):
        register_adapter(mlflow_server, sks, tiny_adapters[adapter], status="passed")
    register_adapter(mlflow_server, sks, tiny_adapters["ad2"], alias=None, status="rejected")
    for adapter in ("ad3", "ad0"):
        register_adapter(mlflow_server, ohwx, tiny_adapters[adapter], status="passed")
    rollback(client_for(mlflow_server), ohwx)
    args = module_args(**{"champion.model": sks, "default_model": "champion", "tracking_uri": mlflow_server})
    url = deploy(serve_instance, args, "fleet")
    with Client(url) as client:
        ids = [m["id"] for m in client.models()]
        assert ids[:6] == ["base", "ad0", "ad1", "ad2", "ad3", "champion"]
        assert [i for i in ids if i.startswith(("app-sks-", "app-ohwx-"))] == [
            ohwx, f"{ohwx}/1", sks, f"{sks}@previous", f"{sks}/1", f"{sks}/2",
        ]  # fmt: skip
        assert client.generate(PROMPT, adapter=ohwx, seed=1)[0].info["version"] == "1"
        for name, words in ((f"{sks}@challenger", "no alias 'challenger'"), (f"{sks}/3", "rejected by the evaluation"),
                            (f"{ohwx}/2", "rolled back"), ("no-such-lora", "not served here")):  # fmt: skip
            start = time.perf_counter()
            with pytest.raises(NotFound, match=words):
                client.generate(PROMPT, adapter=name)
            assert time.perf_counter() - start < 2, name  # no retries: 404 is final
    serve.delete("fleet")

    # the registry down: 503 + Retry-After (registry_retry_s) at once — the replica found it down when it started —
    # naming the registry; the listing keeps the configured names
    dead = f"http://127.0.0.1:{closed_port()}"
    down = deploy(serve_instance, module_args(tracking_uri=dead, registry_retry_s=3), "down")
    start = time.perf_counter()
    r = httpx.post(f"{down}/v1/images/generations", json={"prompt": PROMPT, "model": f"{sks}@champion"}, timeout=90)
    assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
    assert time.perf_counter() - start < 5 and f"registry at {dead} does not answer" in r.json()["error"]["message"]
    start = time.perf_counter()
    listed = httpx.get(f"{down}/v1/models", timeout=60).json()
    assert time.perf_counter() - start < 1 and listed["registry"]["reachable"] is False
    assert [m["id"] for m in listed["data"]] == ["base", *tiny_adapters] and all(m["available"] for m in listed["data"])
    ready = httpx.get(f"{down}/readyz", timeout=60)
    assert ready.status_code == 200 and ready.json()["details"]["registry"]["reachable"] is False, ready.text
    assert dead not in ready.text  # /readyz is public: the registry's address stays in /admin/stats
    serve.delete("down")


def test_a_client_that_goes_away_stops_its_generation(serve_instance, module_args):
    args = module_args(**{"limits.max_steps": 999, "batching.max_batch_size": 1, "limits.max_n": 1})
    url = deploy(serve_instance, args, "cancel")
    start = time.time()
    assert httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "steps": 100}, timeout=60).is_success
    full = (time.time() - start) * 10  # what 1000 steps would take
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "steps": 999}, timeout=1.0)
    start = time.time()  # the abandoned pass stops at its next step, so the replica is free again
    assert httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "steps": 4}, timeout=120).is_success
    assert time.time() - start < 0.3 * full, (time.time() - start, full)
    stats = httpx.get(f"{url}/admin/stats", timeout=10).json()
    assert stats["requests"].get("cancelled") == 1
    base = stats["records"]["versions"]["base/-"]  # generation records (serving/records.py) saw the same
    assert (base["cancelled"], base["ok"], stats["records"]["errors"]) == (1, 2, 0), stats["records"]


def _fuzz(op, mode, url: str, examples: int, tried, statuses, failures: list[str]) -> None:
    from hypothesis import HealthCheck, Phase, given, settings

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case) -> None:
        response = case.call(base_url=url, timeout=60)
        tried[(op.label, mode.value)] += 1
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            failures.append(f"{op.label} {mode.value}: {response.status_code} {response.text[:200]} <- {case}")

    fuzz()


def test_fuzzing_every_route_from_its_openapi_schema_gets_no_server_error(serve_instance, module_args):
    """Schemathesis draws valid and invalid requests for every operation in /openapi.json; bad input must be a
    4xx, never a 5xx. Tight limits keep each accepted generation cheap."""
    import collections
    import contextlib

    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    limits = {"limits.max_steps": 3, "limits.max_n": 2, "limits.max_size": 64, "defaults.steps": 2}
    url = deploy(serve_instance, module_args(**limits), "fuzz")
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    tried: collections.Counter = collections.Counter()
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    examples = int(os.environ.get("LORAFLEET_FUZZ_EXAMPLES", "25"))
    for found in schema.get_all_operations():
        op = found.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            with contextlib.suppress(Unsatisfiable):  # e.g. no invalid request exists for a parameterless route
                _fuzz(op, mode, url, examples, tried, statuses, failures)
    total = sum(tried.values())
    print(f"fuzzing: {total} requests over {len({k[0] for k in tried})} operations; statuses {dict(statuses)}; "
          f"server errors: {len(failures)}")  # fmt: skip
    assert total >= 100 and len({k[0] for k in tried}) >= 7, tried
    assert not failures, failures[:8]
    assert statuses[200] > 0 and any(400 <= code < 500 for code in statuses), statuses  # both kinds were drawn


def _interactive(http: httpx.Client, count: int, clients: int = 2) -> list[float]:
    """Seconds per interactive request: ``count`` requests from ``clients`` threads, one after another each."""

    def one(i: int) -> float:
        started = time.perf_counter()
        r = http.post("/v1/images/generations", json={"prompt": PROMPT, "seed": i, "size": "64x64"})
        assert r.status_code == 200, r.text
        return time.perf_counter() - started

    with cf.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(count)))


def test_a_batch_runs_next_to_interactive_traffic(serve_instance, module_args, tmp_path):
    """A 50-request batch (OpenAI's Batch API) while interactive requests go on: every result comes back under its
    custom_id, and interactive p99 stays within a generous bound: an interactive request waits for at most the pass
    running when it arrives plus its own pass, each of at most max_batch_size images (serving/passes.py)."""
    size = 4
    args = module_args(  # its own files.root: the module's other apps run batch runners too (serving/batches)
        **{"batching.max_batch_size": size, "batches.poll_s": 0.2, "files.root": str(tmp_path / "files")}
    )
    url = deploy(serve_instance, args, "batch")
    with httpx.Client(base_url=url, timeout=120) as http:
        _interactive(http, 4)  # warm
        alone = np.array(_interactive(http, 24))
        bodies = [{"prompt": PROMPT, "seed": 100 + i, "n": 1 + i % 2} for i in range(50)]
        lines = [
            json.dumps({"custom_id": f"sku-{i}", "method": "POST", "url": "/v1/images/generations", "body": b})
            for i, b in enumerate(bodies)
        ]
        up = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", "\n".join(lines).encode())})
        assert up.status_code == 200, up.text
        body = {"input_file_id": up.json()["id"], "endpoint": "/v1/images/generations", "completion_window": "24h"}
        batch = http.post("/v1/batches", json=body).json()
        started, during = time.perf_counter(), []
        while (batch := http.get(f"/v1/batches/{batch['id']}").json())["status"] not in ("completed", "failed"):
            assert time.perf_counter() - started < 600, batch
            during += _interactive(http, 4)
        took = time.perf_counter() - started
        assert batch["status"] == "completed" and batch["request_counts"] == {"total": 50, "completed": 50, "failed": 0}
        out = [json.loads(x) for x in http.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()]
        assert sorted(x["custom_id"] for x in out) == sorted(f"sku-{i}" for i in range(50))
        for x in out:
            i = int(x["custom_id"].split("-")[1])
            data = x["response"]["body"]["data"]
            assert x["response"]["status_code"] == 200 and [d["seed"] for d in data] == [
                100 + i + k for k in range(1 + i % 2)
            ]
            assert decode(data[0]).shape == (64, 64, 3)
        assert http.get("/admin/stats").json()["batch_requests"] == {"held": 0, "room": 8}  # all answered, none held
        image_id = out[0]["response"]["body"]["data"][0]["id"]  # a batch's images can be rated like live ones
        until = time.monotonic() + 30
        while (rated := http.post("/v1/feedback", json={"image_id": image_id, "rating": 1})).status_code == 404:
            assert time.monotonic() < until, "a batch image never became ratable (BatchWorker's notice)"
            time.sleep(0.2)
        assert rated.status_code == 200 and rated.json()["image_id"] == image_id, rated.text
    with_batch = np.array(during)
    p = {
        name: (np.percentile(v, 50), np.percentile(v, 99)) for name, v in (("alone", alone), ("with batch", with_batch))
    }
    print(f"batch of 50 requests (75 images) in {took:.1f} s next to {len(during)} interactive requests; interactive "
          + "; ".join(f"{k}: p50 {a * 1000:.0f} ms, p99 {b * 1000:.0f} ms" for k, (a, b) in p.items()))  # fmt: skip
    one_pass = p["alone"][0]  # a lone request is about one pass of one image; a pass of `size` images costs at most
    bound = p["alone"][1] + 2 * size * one_pass  # `size` of those on CPU (less on a GPU)
    assert len(during) >= 4 and p["with batch"][1] <= max(bound, 1.0), (p, bound)
