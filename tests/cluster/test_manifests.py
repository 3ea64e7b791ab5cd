"""Cluster launcher YAMLs, KubeRay manifests and the Dockerfile: they parse, agree with each other and with
pyproject.toml, and the RayService serves what configs/serve.yaml says (validated by ServeArgs)."""

from __future__ import annotations

import re
import shlex
from importlib.metadata import metadata, requires, version

import pytest
import yaml
from packaging.requirements import Requirement

from cluster.manifests import IMAGE, RAYSERVICE, render_serve_config, rendered_rayservice

LAUNCHERS = ["cluster/aws.yaml", "cluster/gcp.yaml"]
KUBERAY = ["cluster/kuberay/rayjob.yaml", "cluster/kuberay/rayservice.yaml"]


class StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (plain YAML keeps the last one silently)."""


def _no_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    if dupes := {k for k in keys if keys.count(k) > 1}:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dupes)}", node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load(repo, name: str) -> dict:
    return yaml.load((repo / name).read_text(), Loader=StrictLoader)  # noqa: S506 — a SafeLoader subclass


@pytest.fixture(scope="module")
def project() -> dict:
    """pyproject.toml's version and dependencies, as installed (``pip install -e .``)."""
    return {"version": metadata("lorafleet")["Version"], "dependencies": requires("lorafleet")}


def images(tree) -> list[str]:
    found = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += [value] if key == "image" and isinstance(value, str) else images(value)
    elif isinstance(tree, list):
        for value in tree:
            found += images(value)
    return found


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_is_a_valid_autoscaling_gpu_cluster(repo, project, name):
    cfg = load(repo, name)
    assert cfg["docker"]["image"] == f"{IMAGE}:{project['version']}"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers and all(w["min_workers"] == 0 <= w["max_workers"] for w in workers.values())  # 0..N
    assert cfg["max_workers"] >= max(w["max_workers"] for w in workers.values())
    assert any("/mnt/shared" in c for c in cfg["initialization_commands"])  # the multi-node storage rule
    assert any("--head" in c and "--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])


def test_kuberay_manifests_use_one_image_and_one_ray_version(repo, project):
    ray_version = version("ray")
    docker = (repo / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray_version)}$", docker, re.M), "Dockerfile: the tested Ray"
    assert f'org.opencontainers.image.version="{project["version"]}"' in docker
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in docker
    ray_req = next(Requirement(r) for r in project["dependencies"] if r.startswith("ray["))
    assert ray_req.specifier.contains(ray_version)
    for name in KUBERAY:
        doc = load(repo, name)
        assert doc["apiVersion"] == "ray.io/v1"
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        assert spec["rayVersion"] == ray_version
        assert set(images(spec)) == {f"{IMAGE}:{project['version']}"}, name


def test_rayservice_embeds_configs_serve_yaml_as_servearg_accepts_it(repo):
    from serving.config import ServeArgs

    assert rendered_rayservice() == RAYSERVICE.read_text(), "stale: run python -m cluster.manifests"
    embedded = yaml.safe_load(load(repo, "cluster/kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    assert embedded == render_serve_config()
    app = embedded["applications"][0]
    args = ServeArgs.model_validate(app["args"])
    assert app["import_path"] == "serving.app:build_app" and embedded["http_options"]["host"] == "0.0.0.0"
    assert args.deployment.num_gpus == 0.5 and args.tracking_uri.startswith("http://mlflow.")
    # everything else is configs/serve.yaml's
    local = yaml.safe_load((repo / "configs" / "serve.yaml").read_text())["applications"][0]["args"]
    assert args.champion.model == local["champion"]["model"] and args.limits.max_n == local["limits"]["max_n"]


def test_rayjob_entrypoint_is_a_valid_pipeline_command(repo):
    from cluster.config import PipelineConfig
    from cluster.pipeline import config_file
    from training.configuration import load_config

    doc = load(repo, "cluster/kuberay/rayjob.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "cluster.pipeline", "--config"]
    cfg = load_config(PipelineConfig, config_file(argv[4]), argv[5:])
    assert cfg.storage.shared and cfg.dataset.startswith("s3://") and not cfg.serve.enabled
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")


def test_dockerfile_leaves_out_what_the_job_upload_leaves_out(repo):
    from cluster.jobs import EXCLUDES

    ignored = set((repo / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "runs", "mlruns"} <= ignored
    assert ignored <= set(EXCLUDES) | {"venv"}
