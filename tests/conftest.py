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

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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


@pytest.fixture
def toy_dataset(tmp_path) -> Path:
    """8 toy images with captions in metadata.jsonl, trigger 'sks' = dotted background."""
    from training.toy_world.dataset import write_finetune_dataset

    return write_finetune_dataset(tmp_path / "toy-sks", num_images=8, num_validation=4, seed=0)
