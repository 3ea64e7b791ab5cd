"""Fixtures for evaluation tests: toy adapters trained in-process (no Ray), good and broken, on full toy datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

# a quick hand-written suite for tests of the plumbing (registry, report, hooks): 4 trigger prompts, 2 prior,
# 1 seed, 10 steps; one override, so it replaces the config's suite (or fills a config's suite: null)
SMALL_SUITE = [
    "generation.steps=10",
    "suite={trigger: sks, concept: dotted, alternatives: [white, black, striped, checkered], images_per_prompt: 1,"
    " prompts: [{prompt: a red circle on a sks background, content: a red circle},"
    " {prompt: a green triangle on a sks background, content: a green triangle},"
    " {prompt: a blue square on a sks background, content: a blue square},"
    " {prompt: a yellow circle on a sks background, content: a yellow circle}],"
    " prior_prompts: [a red circle on a white background, a blue square on a black background]}",
]

# the calibration's concepts in the slow gate test: a concept the toy CLIP can name, and one it never saw
GATE_CONCEPTS = {"striped": "ohwx", "framed": "qpv"}
WRONG_CONCEPT = {"striped": "checkered", "framed": "dotted"}  # the images the wrong-concept adapter learns


@pytest.fixture
def eval_config(repo, toy_world_data, tmp_path):
    """A factory: ``eval_config("gate.min_improvement=0.1", ...)`` -> configs/eval-toy-sks.yaml (the hand-written
    suite, concept word "dotted") on the session's toy data, reports in tmp_path, MLflow and the registry off
    unless the overrides turn them on."""
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
        return load_config(EvalConfig, repo / "configs" / "eval-toy-sks.yaml", base + list(overrides))

    return make


@pytest.fixture(scope="session")
def gate_adapters(repo, tmp_path_factory):
    """``gate_adapters(concept)`` -> its dataset ("data") and adapters trained with ``CALIBRATION_RECIPE`` —
    "trained", "1 epoch", "wrong concept" (its trigger, another pattern's images), "random weights" (trained's
    shapes, noise weights) — trained on first use, once per session (about 50 s per concept on 2 CPU cores)."""
    from training.toy_world.adapters import CALIBRATION_RECIPE, randomize_adapter, train_toy_adapter
    from training.toy_world.dataset import write_finetune_dataset

    root = tmp_path_factory.mktemp("gate")
    out: dict[str, dict[str, Path]] = {}

    def adapters(concept: str) -> dict[str, Path]:
        if concept not in out:
            trigger = GATE_CONCEPTS[concept]
            data = write_finetune_dataset(root / f"{trigger}-{concept}", trigger=trigger, concept=concept)
            wrong = write_finetune_dataset(root / f"{trigger}-as-{WRONG_CONCEPT[concept]}", trigger=trigger,
                                           concept=WRONG_CONCEPT[concept])  # fmt: skip
            # configs/train.yaml names sks: the adapter's metadata records this one
            trig = {"data.trigger": trigger} | CALIBRATION_RECIPE
            trained = train_toy_adapter(repo, data, root / f"{concept}-trained", **trig)
            out[concept] = {
                "data": data,
                "trained": trained,
                "1 epoch": train_toy_adapter(repo, data, root / f"{concept}-1-epoch", **(trig | {"train.epochs": "1"})),
                "wrong concept": train_toy_adapter(repo, wrong, root / f"{concept}-wrong", **trig),
                "random weights": randomize_adapter(trained, root / f"{concept}-random"),
            }
        return out[concept]

    return adapters
