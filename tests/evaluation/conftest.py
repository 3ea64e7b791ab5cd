"""Fixtures for evaluation tests: toy adapters trained in-process (no Ray), good and broken, on a full toy dataset."""

from __future__ import annotations

import pytest

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
