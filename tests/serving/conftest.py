"""Serving fixtures: the tiny pipeline on disk with random LoRA adapters, and an engine over them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_pipe, tiny_pipe_dir) -> dict[str, Path]:
    """Four distinct random adapters for the tiny pipeline: name -> folder."""
    from training.toy_world.adapters import random_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {f"ad{i}": random_adapter(tiny_pipe, tiny_pipe_dir, root / f"ad{i}", seed=i + 1) for i in range(4)}


def tiny_serve_args(pipe_dir: Path, adapters: dict[str, Path], cache: Path, **overrides):
    """ServeArgs over the tiny pipeline and its adapters (no champion, 4 steps), with dotted ``overrides``."""
    from serving.config import ServeArgs
    from training.configuration import validate_values

    values = {
        "base_model": str(pipe_dir),
        "adapters": {k: str(v) for k, v in adapters.items()},
        "adapter_roots": [tempfile.gettempdir()],  # pytest's folders
        "champion": {"model": None},
        "default_model": "base",
        "adapter_cache_dir": str(cache),
        "defaults": {"steps": 4, "guidance": 4.0, "size": 64},
        "limits": {"min_size": 32, "max_size": 128},
        "api_key_env": "LORAFLEET_UNSET_KEY",
        "files": {"root": str(Path(cache) / "files")},  # uploads (POST /v1/files) stay in pytest's folders
        "feedback": {"root": str(Path(cache) / "feedback")},  # ratings too
    }
    return validate_values(ServeArgs, values, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture
def serve_args(tiny_pipe_dir, tiny_adapters, tmp_path):
    """A factory: ``serve_args(**{"max_adapters": 2})`` -> ServeArgs for an engine (no warm-up)."""
    return lambda **overrides: tiny_serve_args(
        tiny_pipe_dir, tiny_adapters, tmp_path / "adapter-cache", **({"warmup": False} | overrides)
    )


@pytest.fixture
def engine(serve_args):
    from serving.engine import Engine

    return Engine.from_args(serve_args())


def register_adapter(
    uri: str, name: str, adapter_dir: Path, alias: str | None = "champion", status: str | None = None
) -> str:
    """Log ``adapter_dir`` as a run's artifacts, register it as a new version of ``name`` (with the sha256 and
    base-model tags the evaluation writes, and ``validation_status`` when given) and point ``alias`` at it;
    returns the version. On a ``sqlite:///…/x.db`` registry the artifacts go next to the database file."""
    from evaluation.registry import TAG_BASE, TAG_SHA, TAG_STATUS, client_for, promote, register
    from training.adapter import base_model_id, verify_adapter

    client = client_for(uri)
    exp = client.get_experiment_by_name("serving-tests")
    if exp:
        exp_id = exp.experiment_id
    elif uri.startswith("sqlite:///"):
        art = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
        exp_id = client.create_experiment("serving-tests", artifact_location=art.as_uri())
    else:
        exp_id = client.create_experiment("serving-tests")
    run = client.create_run(exp_id)
    client.log_artifacts(run.info.run_id, str(adapter_dir), "adapter")
    client.set_terminated(run.info.run_id)
    meta = verify_adapter(adapter_dir)
    tags = {TAG_SHA: meta.sha256, TAG_BASE: base_model_id(meta.base_model)} | ({TAG_STATUS: status} if status else {})
    version = str(register(client, name, f"runs:/{run.info.run_id}/adapter", run.info.run_id, tags).version)
    if alias:
        promote(client, name, version, alias)
    return version
