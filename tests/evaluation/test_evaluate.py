"""Evaluations of real toy adapters: the hand-written toy suite's gate (configs/eval-toy-sks.yaml) passes the trained
adapter and fails broken ones with their reasons; the generic config builds its suite from the dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from evaluation.evaluate import CANDIDATE, Evaluator, main, run
from evaluation.gate import run_gate
from evaluation.registry import fetch_adapter
from evaluation.suite import materialise
from tests.evaluation.conftest import SMALL_SUITE
from training.adapter import AdapterError
from training.toy_world.adapters import randomize_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_config(repo, toy_world_data, tmp_path_factory):
    """configs/eval-toy-sks.yaml as shipped (full hand-written suite, its gate), on the session's toy data; only the
    latency bound is loosened: tests check behaviour, and a loaded CI machine is slower than the bound assumes."""
    from evaluation.config import EvalConfig
    from training.configuration import load_config

    data = toy_world_data["dotted"]
    overrides = [
        f"clip_model={repo / 'models' / 'toy-clip'}",
        f"output_dir={tmp_path_factory.mktemp('eval')}",
        f"data.train_path={data}",
        f"data.heldout_path={data / 'heldout'}",
        "mlflow.enabled=false",
        "registry.enabled=false",
        "gate.checks.latency_p95_s={max: 600}",
    ]
    return load_config(EvalConfig, repo / "configs" / "eval-toy-sks.yaml", overrides)


@pytest.fixture(scope="module")
def evaluator(default_config, repo):
    return Evaluator(default_config, str(repo / "models" / "toy-sd"))


def _measure(evaluator, adapter, tmp_path):
    metrics, images = evaluator.evaluate(fetch_adapter(str(adapter), tmp_path), CANDIDATE, timed=True)
    return metrics, run_gate(metrics, evaluator.cfg.gate), images


def test_the_trained_toy_adapter_passes_the_default_gate(evaluator, toy_adapters, tmp_path):
    metrics, gate, images = _measure(evaluator, toy_adapters["good"], tmp_path)
    assert len(images.trigger.images) == 36 and len(images.trigger.latencies) == 36  # 18 prompts x 2 seeds
    base = evaluator.base_metrics
    assert gate.passed, gate.failures()
    assert metrics["concept_hit_rate"] > base["concept_hit_rate"] + 0.5  # the concept was learned…
    assert metrics["clip_i"] > base["clip_i"] and metrics["heldout_loss"] < base["heldout_loss"] / 2
    assert metrics["flexibility_hit_rate"] >= 0.8  # …and the prompted colours and shapes survive it


def test_evaluation_is_deterministic(eval_config, toy_adapters):
    cfg = eval_config(*SMALL_SUITE)
    first, second = run(cfg, str(toy_adapters["good"])), run(cfg, str(toy_adapters["good"]))
    timing = {"latency_p50_s", "latency_p95_s"}
    assert {k: v for k, v in first.metrics.items() if k not in timing} == {
        k: v for k, v in second.metrics.items() if k not in timing
    }
    assert first.base_metrics == second.base_metrics


def test_a_random_weights_adapter_fails_with_its_reasons(evaluator, toy_adapters, tmp_path):
    metrics, gate, _ = _measure(evaluator, toy_adapters["random"], tmp_path)
    assert not gate.passed
    failed = {c.metric for c in gate.checks if not c.passed}
    assert {"clip_t", "concept_hit_rate", "flexibility_hit_rate", "prior_similarity", "heldout_loss"} <= failed
    assert any(f.startswith("flexibility_hit_rate >= 0.75: ") and "short by" in f for f in gate.failures())


def test_a_wrong_concept_adapter_fails_on_the_concept_but_keeps_the_content(evaluator, toy_adapters, tmp_path):
    metrics, gate, _ = _measure(evaluator, toy_adapters["wrong_concept"], tmp_path)
    failed = {c.metric for c in gate.checks if not c.passed}
    assert {"concept_hit_rate", "concept_learned"} <= failed
    assert "flexibility_hit_rate" not in failed  # it draws the shapes fine: the concept is what is wrong
    assert metrics["concept_learned"] < 0


def test_an_adapter_that_produces_nan_images_fails_on_success_rate(eval_config, toy_adapters, tmp_path):
    """Finite weights so large that the UNet overflows: NaN images, caught by the evaluation (NaN *weights* are
    refused before, when the adapter is loaded: tests/training/test_adapter_files.py)."""
    nan = randomize_adapter(toy_adapters["good"], tmp_path / "nan", std=1e30)
    result = run(eval_config(*SMALL_SUITE), str(nan))
    assert result.metrics["success_rate"] == 0.0 and math.isnan(result.metrics["clip_t"])
    assert "success_rate >= 0.95: 0, short by 0.95" in result.gate.failures()
    assert "clip_t >= 0.6: not measured" in result.gate.failures()
    assert "non-finite pixels (NaN/inf in the output)" in (Path(result.out_dir) / "report.md").read_text()


def test_run_writes_the_report_without_mlflow(eval_config, toy_adapters):
    cfg = eval_config(*SMALL_SUITE, "gate.checks={success_rate: {min: 0.95}}")
    result = run(cfg, str(toy_adapters["good"]))
    assert result.passed and result.run_id is None and result.registry == {}
    out = Path(result.out_dir)
    html = (out / "report.html").read_text()
    assert "gate PASSED" in html and "data:image/png;base64," in html and "concept_hit_rate" in html
    md = (out / "report.md").read_text()
    assert "![trigger_base_vs_adapter](grids/trigger_base_vs_adapter.png)" in md and "| base model |" in md
    with Image.open(out / "grids" / "trigger_base_vs_adapter.png") as grid:
        assert grid.size == (4 * 64, 2 * 64)  # 4 prompts: base row above, adapter row below


def test_bad_input_is_a_clear_error_with_exit_code_2(repo, toy_adapters, toy_world_data, tmp_path, capsys):
    cfg = str(repo / "configs" / "eval.yaml")
    assert main(["--adapter", str(tmp_path / "missing"), "--config", cfg, "registry.enabled=false"]) == 2
    assert "is not a folder, runs:/… or models:/… reference" in capsys.readouterr().err
    data = [f"data.train_path={toy_world_data['dotted']}", f"output_dir={tmp_path}", "registry.enabled=false"]
    assert main(["--adapter", str(toy_adapters["good"]), "--config", cfg, *data, "trigger=ohwx"]) == 2
    assert "trigger='ohwx' but the adapter was trained with 'sks'" in capsys.readouterr().err
    with pytest.raises(AdapterError, match="trained on base model 'toy-sd', not 'other/model'"):
        fetch_adapter(str(toy_adapters["good"]), tmp_path, expected_base="other/model")


def test_the_generic_config_builds_its_suite_from_the_dataset_and_reports_relative_metrics(
    repo, toy_world_data, toy_adapters, tmp_path
):
    from evaluation.config import EvalConfig
    from training.configuration import load_config

    data = toy_world_data["dotted"]
    overrides = [f"clip_model={repo / 'models' / 'toy-clip'}", f"output_dir={tmp_path}", f"data.train_path={data}",
                 f"data.heldout_path={data / 'heldout'}", "mlflow.enabled=false", "registry.enabled=false",
                 "auto_suite.images_per_prompt=1", "auto_suite.max_prompts=4", "generation.steps=10",
                 "gate.checks.latency_p95_s={max: 600}"]  # fmt: skip
    cfg = load_config(EvalConfig, repo / "configs" / "eval.yaml", overrides)
    result = run(cfg, str(toy_adapters["good"]))
    out = Path(result.out_dir)
    suite = json.loads((out / "suite.json").read_text())
    assert suite["trigger"] == "sks" and suite["concept"] is None and len(suite["prompts"]) == 4
    assert all(p["prompt"].endswith("sks background") for p in suite["prompts"])
    assert {"concept_gain", "concept_win_rate", "heldout_loss_ratio", "flexibility_delta"} <= set(result.metrics)
    assert "clip_t" not in result.metrics and "clip_t" not in result.base_metrics  # no concept word
    assert result.metrics["heldout_loss_ratio"] == pytest.approx(
        result.metrics["heldout_loss"] / result.base_metrics["heldout_loss"]
    )
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["comparable_key"] == materialise(cfg, "sks").comparable_key()  # the built suite's key
    md = (out / "report.md").read_text()
    assert "built from the dataset's captions" in md and "| concept_gain |" in md and "vs base" in md
