"""The cluster manifests' shared facts, and the RayService's ``serveConfigV2`` rendered from ``configs/serve.yaml``.

    python -m cluster.manifests            # rewrite serveConfigV2 in cluster/kuberay/rayservice.yaml
    python -m cluster.manifests --check    # exit 1 when it is out of date (tests run this check)

The RayService serves what ``serve run configs/serve.yaml`` serves, with Kubernetes' differences applied
(``K8S_OVERRIDES``): the proxy listens on every pod interface, MLflow is the in-cluster service, replicas
take half a GPU each. ``ServeArgs`` validates the result, as it validates the file itself.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from serving.config import PROJECT_ROOT

IMAGE = "ghcr.io/lorafleet/lorafleet"  # + ":<pyproject version>" (Dockerfile, launcher YAMLs, KubeRay)
RAY_IMAGE = "rayproject/ray"  # the Dockerfile's base: <ray version>-py311-gpu
RAYSERVICE = PROJECT_ROOT / "cluster" / "kuberay" / "rayservice.yaml"
MLFLOW_SVC = "http://mlflow.lorafleet.svc.cluster.local:5000"
K8S_OVERRIDES = {
    "tracking_uri": MLFLOW_SVC,
    "deployment.num_replicas": 2,
    "deployment.num_gpus": 0.5,  # two replicas per GPU (fractions are scheduling labels: memory is checked)
    "deployment.num_cpus": 2,
    "adapter_cache_dir": "/tmp/lorafleet/adapters",
}


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def render_serve_config(path: Path = PROJECT_ROOT / "configs" / "serve.yaml") -> dict:
    """``configs/serve.yaml`` as KubeRay runs it: every pod interface, in-cluster MLflow, GPU fractions."""
    from serving.config import ServeArgs

    config = yaml.safe_load(path.read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "0.0.0.0", "port": 8000}
    config["proxy_location"] = "EveryNode"
    app = config["applications"][0]
    for key, value in K8S_OVERRIDES.items():
        _set(app["args"], key, value)
    ServeArgs.model_validate(app["args"])  # raises with every problem
    return config


def _block(config: dict) -> str:
    text = yaml.safe_dump(config, sort_keys=False, width=110)
    return "".join(f"    {line}\n" if line else "\n" for line in text.splitlines())


_SERVE_BLOCK = re.compile(r"(  serveConfigV2: \|\n)((?:    .*\n|\n)+)")


def rendered_rayservice(path: Path = RAYSERVICE) -> str:
    text = path.read_text()
    if not _SERVE_BLOCK.search(text):
        raise ValueError(f"{path}: no `  serveConfigV2: |` block to fill")
    return _SERVE_BLOCK.sub(lambda m: m.group(1) + _block(render_serve_config()), text, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.manifests", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether rayservice.yaml is up to date")
    args = parser.parse_args(argv)
    new = rendered_rayservice()
    if args.check:
        stale = new != RAYSERVICE.read_text()
        print(f"{RAYSERVICE}: {'out of date: run python -m cluster.manifests' if stale else 'up to date'}")
        return 1 if stale else 0
    RAYSERVICE.write_text(new)
    print(f"wrote serveConfigV2 of {RAYSERVICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
