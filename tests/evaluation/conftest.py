"""Fixtures for evaluation tests: toy adapters trained in-process (no Ray), good and broken, on a full toy dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.adapter import META_NAME, WEIGHTS_NAME, file_sha256


def train_toy_adapter(repo: Path, data: Path, out: Path, **overrides) -> Path:
    """configs/train.yaml's recipe (rank 8, AdamW 1e-3, 30 epochs) on ``data``, trained by one plain worker."""
    from training.config import TrainConfig
    from training.configuration import load_config
    from training.data import validate_dataset
    from training.worker import ADAPTER_DIR, WorkerSpec, adapter_meta, run_worker, write_checkpoint

    values = {
        "base_model": str(repo / "models" / "toy-sd"),
        "output_dir": str(out),
        "data.path": str(data),
        "validation.prompts": "[]",
        "mlflow.enabled": "false",
    } | overrides
    cfg = load_config(TrainConfig, repo / "configs" / "train.yaml", [f"{k}={v}" for k, v in values.items()])
    report = validate_dataset(cfg.data)
    spec = WorkerSpec(cfg, report.examples, report.fingerprint())
    parts, state = run_worker(spec)
    write_checkpoint(out, parts, state, adapter_meta(spec, state))
    return out / ADAPTER_DIR


def randomize_adapter(src: Path, dst: Path, std: float = 0.3, seed: int = 0) -> Path:
    """Same keys and shapes as ``src``, random weights (a broken training run); metadata re-hashed."""
    dst.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * std for k, v in load_file(str(src / WEIGHTS_NAME)).items()}
    save_file(state, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = json.loads((src / META_NAME).read_text())
    meta["sha256"] = file_sha256(dst / WEIGHTS_NAME)
    (dst / META_NAME).write_text(json.dumps(meta))
    return dst


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
def toy_adapters(repo, toy_world_data, tmp_path_factory) -> dict[str, Path]:
    """good: the default recipe on the dotted set; wrong_concept: same recipe on striped; random: noise weights."""
    root = tmp_path_factory.mktemp("adapters")
    good = train_toy_adapter(repo, toy_world_data["dotted"], root / "good")
    return {
        "good": good,
        "wrong_concept": train_toy_adapter(repo, toy_world_data["striped"], root / "striped"),
        "random": randomize_adapter(good, root / "random"),
    }


# a quick suite for tests of the plumbing (registry, report, hooks): 4 trigger prompts, 2 prior, 1 seed, 10 steps
SMALL_SUITE = [
    "suite.images_per_prompt=1",
    "generation.steps=10",
    "suite.prompts=[{prompt: a red circle on a sks background, content: a red circle},"
    " {prompt: a green triangle on a sks background, content: a green triangle},"
    " {prompt: a blue square on a sks background, content: a blue square},"
    " {prompt: a yellow circle on a sks background, content: a yellow circle}]",
    "suite.prior_prompts=[a red circle on a white background, a blue square on a black background]",
]


@pytest.fixture
def eval_config(repo, toy_world_data, tmp_path):
    """A factory: ``eval_config("gate.min_improvement=0.1", ...)`` -> configs/eval.yaml on the session's toy data,
    reports in tmp_path, MLflow and the registry off unless the overrides turn them on."""
    from evaluation.config import EvalConfig
    from training.configuration import load_config

    def make(*overrides: str) -> EvalConfig:
        data = toy_world_data["dotted"]
        base = [
            f"clip_model={repo / 'models' / 'toy-clip'}",
            f"output_dir={tmp_path / 'eval'}",
            f"data.train_path={data}",
            f"data.heldout_path={data / 'heldout'}",
            "mlflow.enabled=false",
            "registry.enabled=false",
        ]
        return load_config(EvalConfig, repo / "configs" / "eval.yaml", base + list(overrides))

    return make
