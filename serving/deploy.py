"""Deploy or refresh the Serve application on a running Ray cluster, then smoke-test it over HTTP.

    python -m serving.deploy --config configs/serve.yaml                       # inside a Ray job
    python -m serving.deploy --config configs/serve.yaml --port 8001 champion.poll_s=5
    lorafleet serve --config configs/serve.yaml                                 # the same, submitted as a job

Run it as a Ray job (``lorafleet serve`` does): ``serve.run`` gives the replicas the job's runtime env, so they
import this repository from the job's working dir. Applications outlive the job; deploying again updates
the application in place, and ``POST /admin/reload`` makes the replicas look the champion up at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from serving.config import PROJECT_ROOT, ServeArgs, load_serve_args

log = logging.getLogger(__name__)


def http_options(path: str | Path) -> dict[str, Any]:
    """The ``http_options`` of a Serve config file (host, port, request_timeout_s); defaults on loopback."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    opts = dict(data.get("http_options") or {}) if isinstance(data, dict) else {}
    return {"host": "127.0.0.1", "port": 8000} | opts


def local_url(host: str, port: int, route_prefix: str = "/") -> str:
    """Where this machine reaches the proxy (a proxy on 0.0.0.0 is reachable on loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def deploy(
    args: ServeArgs,
    *,
    name: str = "lorafleet",
    route_prefix: str = "/",
    http: dict[str, Any] | None = None,
    api_key: str | None = None,
    timeout_s: float = 600,
) -> str:
    """Deploy (or update) the application and wait until it answers ready; returns its URL.

    Raises:
        RuntimeError: the application failed to deploy, or its URL does not answer (e.g. Serve already runs
            with other ``http_options``: ``serve shutdown`` first).
    """
    from ray import serve

    from serving.app import build_app
    from serving.client import Client
    from training.ray_train import init_ray

    http = {"host": "127.0.0.1", "port": 8000} | (http or {})
    init_ray()
    serve.start(http_options=http)  # no-op (with a warning) when Serve already runs
    started = time.monotonic()
    serve.run(build_app(args), name=name, route_prefix=route_prefix, blocking=False)  # returns once RUNNING
    url = local_url(http["host"], int(http["port"]), route_prefix)
    with Client(url, api_key=api_key, timeout=60, retries=8) as client:
        while not client.health()["ready"]:
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(
                    f"application {name!r} is RUNNING but {url}/readyz did not answer within {timeout_s:.0f} s "
                    f"(Serve says: {serve_account(name)}); if Serve was already running with other http_options, "
                    "`serve shutdown` and deploy again"
                )
            time.sleep(1)
        client.reload()  # an updated application keeps its replicas: make them follow the registry now
    log.info("application %r ready at %s (%.0f s)", name, url, time.monotonic() - started)
    return url


def serve_account(name: str) -> str:
    """Serve's own account of application ``name`` (its and its deployments' status, replica states, messages):
    what a readiness timeout reports, so the failure says which replica is stuck and why."""
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception as exc:  # noqa: BLE001 — an account for an error message; never the error itself
        return f"serve.status() failed: {exc!r}"
    if app is None:
        return f"no application {name!r}"
    parts = [f"{app.status} {app.message}".strip()]
    parts += [f"{d}: {s.status} {dict(s.replica_states)} {s.message}".strip() for d, s in app.deployments.items()]
    return "; ".join(parts)


def smoke_test(
    url: str,
    prompt: str,
    *,
    model: str | None = None,
    out: str | Path | None = None,
    api_key: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One image through the public API; returns what answered (model, version, seconds, image path).

    Raises:
        serving.client.LorafleetError: the server refused or failed the request.
    """
    from serving.client import Client

    started = time.monotonic()
    with Client(url, api_key=api_key, timeout=120) as client:
        images = client.generate(prompt, adapter=model, n=1, seed=seed)
    info = images[0].info
    result = {
        "url": url,
        "prompt": prompt,
        "model": info.get("model"),
        "version": info.get("version"),
        "size": list(images[0].size),
        "seconds": round(time.monotonic() - started, 3),
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        images[0].save(out)
        result["image"] = str(out)
    return result


def main(argv: list[str] | None = None) -> int:
    from training.quiet import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m serving.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "serve.yaml"), help="Serve config file")
    parser.add_argument("--name", default="lorafleet", help="Serve application name")
    parser.add_argument("--route-prefix", default="/", help="where the application is mounted")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's http_options)")
    parser.add_argument("--smoke", default=None, metavar="PROMPT", help="generate one image for PROMPT afterwards")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the application args, e.g. max_adapters=2")
    args = parser.parse_intermixed_args(argv)
    from training.configuration import ConfigError

    try:
        serve_args = load_serve_args(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    http = http_options(args.config) | ({"port": args.port} if args.port else {})
    api_key = serve_args.api_key()
    try:
        url = deploy(serve_args, name=args.name, route_prefix=args.route_prefix, http=http, api_key=api_key)
        print(f"serving: {url}  (web page {url}/, API docs {url}/docs)")
        if args.smoke:
            print(f"smoke test: {smoke_test(url, args.smoke, api_key=api_key)}")
    except Exception as exc:  # noqa: BLE001 — a job's one line of outcome
        print(f"error: deploying {args.name!r} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
