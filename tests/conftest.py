"""Shared fixtures: offline, seeded, tiny models built in code."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests never reach a hub: every model is built in code or loaded from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray started by tests listens on loopback only (otherwise it also binds the network interface)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _no_developer_cluster(tmp_path_factory) -> Path:
    """Every test (and every module/session fixture) sees an empty lorafleet state dir, so a developer's running
    `lorafleet up` cluster and its MLflow are never joined or written to."""
    root = tmp_path_factory.mktemp("lorafleet-state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFLEET_STATE_DIR", str(root / "session"))
        yield root


@pytest.fixture(autouse=True)
def _empty_state_dir(_no_developer_cluster, request, monkeypatch):
    """A state dir of its own per test (not created until something writes there); a test that needs another sets
    LORAFLEET_STATE_DIR itself (monkeypatch), which wins."""
    monkeypatch.setenv("LORAFLEET_STATE_DIR", str(_no_developer_cluster / f"test-{id(request.node):x}"))


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_pipe():
    """A random ``StableDiffusionPipeline`` with a few hundred thousand parameters."""
    from training.toy_world.tiny import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory, tiny_pipe) -> Path:
    """The tiny pipeline saved in diffusers layout, like a hub snapshot on disk."""
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_pipe():
    """A random ``StableDiffusionXLPipeline`` (two tiny CLIP text encoders, SDXL's UNet at 16/32 channels)."""
    from training.toy_world.tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory, tiny_sdxl_pipe) -> Path:
    """The tiny SDXL pipeline saved in diffusers layout (model_index.json says StableDiffusionXLPipeline)."""
    path = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def toy_dataset(tmp_path) -> Path:
    """8 toy images with captions in metadata.jsonl, trigger 'sks' = dotted background."""
    from training.toy_world.dataset import write_finetune_dataset

    return write_finetune_dataset(tmp_path / "toy-sks", num_images=8, num_validation=4, seed=0)


@pytest.fixture
def train_config(toy_dataset, repo, tmp_path):
    """A factory: ``train_config(**{"train.lr": 1e-3})`` -> a small TrainConfig on the toy dataset."""
    from training.config import TrainConfig
    from training.configuration import apply_overrides

    def make(**overrides):
        values = {
            "base_model": str(repo / "models" / "toy-sd"),
            "output_dir": str(tmp_path / "out"),
            "data": {"path": str(toy_dataset), "trigger": "sks"},
            "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
            "mlflow": {"enabled": False},
        }
        values, problems = apply_overrides(values, [f"{k}={v}" for k, v in overrides.items()], TrainConfig)
        assert not problems, problems
        return TrainConfig.model_validate(values)

    return make


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real tracking server on 127.0.0.1 (SQLite + proxied artifacts in a temp dir), stopped by PID."""
    from training.mlflow_server import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def toy_world_data(tmp_path_factory) -> dict[str, Path]:
    """The default toy datasets (20 images, 6 held-out combinations): `sks` = dotted, and `sks` = striped."""
    from training.toy_world.dataset import write_finetune_dataset

    root = tmp_path_factory.mktemp("toy-data")
    return {
        "dotted": write_finetune_dataset(root / "toy-sks"),
        "striped": write_finetune_dataset(root / "toy-sks-striped", concept="striped"),
    }


@pytest.fixture(scope="session")
def toy_good_adapter(repo, toy_world_data, tmp_path_factory) -> Path:
    """configs/train.yaml's recipe on the dotted toy set, trained in-process (no Ray, about 10 s)."""
    from training.toy_world.adapters import train_toy_adapter

    return train_toy_adapter(repo, toy_world_data["dotted"], tmp_path_factory.mktemp("adapters") / "good")


@pytest.fixture(scope="session")
def toy_adapters(repo, toy_world_data, toy_good_adapter, tmp_path_factory) -> dict[str, Path]:
    """good; wrong_concept: the same recipe on the striped set; random: noise weights with good's shapes."""
    from training.toy_world.adapters import randomize_adapter, train_toy_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        "good": toy_good_adapter,
        "wrong_concept": train_toy_adapter(repo, toy_world_data["striped"], root / "striped"),
        "random": randomize_adapter(toy_good_adapter, root / "random"),
    }
