from __future__ import annotations

import pytest

from training.configuration import load_config
from tuning.config import TuneConfig


@pytest.fixture
def tune_config(repo, toy_dataset, tmp_path):
    """A factory: ``tune_config("search.num_samples=4", ...)`` -> configs/tune.yaml on the tiny toy dataset."""

    def make(*overrides: str) -> TuneConfig:
        base = [
            f"output_dir={tmp_path / 'tune'}",
            f"trial.base_model={repo / 'models' / 'toy-sd'}",
            f"trial.data.path={toy_dataset}",
            f"trial.validation.data_path={toy_dataset / 'heldout'}",
            "evaluation.enabled=false",  # tests that hand off to evaluation turn it on
        ]
        return load_config(TuneConfig, repo / "configs" / "tune.yaml", base + list(overrides))

    return make
