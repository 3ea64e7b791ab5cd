"""The promotion gate on metric dicts, and the evaluation config's validation."""

from __future__ import annotations

import math

import pytest

from evaluation.config import EvalConfig, GateArgs
from evaluation.gate import run_gate
from training.configuration import ConfigError, load_config

GOOD = {"clip_t": 0.72, "concept_hit_rate": 0.97, "success_rate": 1.0, "latency_p95_s": 0.4, "heldout_loss": 0.04}


def _gate(**values) -> GateArgs:
    checks = {"clip_t": {"min": 0.6}, "success_rate": {"min": 0.95}, "latency_p95_s": {"max": 2.0}}
    return GateArgs.model_validate({"checks": checks} | values)


def test_every_check_passes_with_its_margin():
    result = run_gate(GOOD, _gate())
    assert result.passed and result.failures() == []
    margins = {c.metric: round(c.margin, 6) for c in result.checks}
    assert margins == {"clip_t": 0.12, "success_rate": 0.05, "latency_p95_s": 1.6}


def test_failures_name_the_metric_the_threshold_and_the_shortfall():
    result = run_gate(GOOD | {"clip_t": 0.5, "latency_p95_s": 2.5}, _gate())
    assert not result.passed
    assert result.failures() == ["clip_t >= 0.6: 0.5, short by 0.1", "latency_p95_s <= 2: 2.5, short by 0.5"]
    assert "gate FAILED" in result.summary()


def test_a_metric_that_was_not_measured_fails_its_check():
    result = run_gate({"success_rate": 1.0, "latency_p95_s": 0.4, "clip_t": math.nan}, _gate())
    assert result.failures() == ["clip_t >= 0.6: not measured"]
    assert not run_gate({"success_rate": 1.0, "latency_p95_s": 0.4}, _gate()).passed


def test_the_champion_must_be_beaten_on_the_primary_metric():
    champion = {"version": "3", "metrics": {"clip_t": 0.70}}
    assert run_gate(GOOD, _gate(), champion).passed
    assert not run_gate(GOOD | {"clip_t": 0.70}, _gate(), champion).passed  # a tie does not replace it
    lost = run_gate(GOOD | {"clip_t": 0.65}, _gate(), champion)
    assert lost.failures() == ["beats champion v3 on clip_t (> 0.7): 0.65, short by 0.05"]
    assert not run_gate(GOOD, _gate(min_improvement=0.05), champion).passed
    assert run_gate(GOOD | {"clip_t": 0.5}, _gate(checks={}, beat_champion=False), champion).passed


def test_lower_is_better_metrics_are_compared_the_right_way():
    gate = _gate(primary_metric="heldout_loss")
    assert run_gate(GOOD, gate, {"version": "1", "metrics": {"heldout_loss": 0.05}}).passed
    worse = run_gate(GOOD, gate, {"version": "1", "metrics": {"heldout_loss": 0.03}})
    assert worse.failures() == ["beats champion v1 on heldout_loss (< 0.03): 0.04, short by 0.01"]


def test_a_champion_without_the_metric_does_not_block():
    assert run_gate(GOOD, _gate(), {"version": "1", "metrics": {}}).passed


def test_config_errors_name_every_key(repo):
    with pytest.raises(ConfigError) as err:
        load_config(
            EvalConfig,
            repo / "configs" / "eval.yaml",
            ["gate.checks={sharpness: {min: 1}}", "gate.primary_metric=beauty", "generation.steps=0", "typo=1"],
        )
    text = str(err.value)
    for needle in ("gate.checks.sharpness: unknown metric", "gate.primary_metric='beauty'", "generation.steps", "typo"):
        assert needle in text
    with pytest.raises(ConfigError, match="concept_hit_rate needs suite.alternatives"):
        load_config(EvalConfig, repo / "configs" / "eval.yaml", ["suite.alternatives=[]"])
    with pytest.raises(ConfigError, match="registry.enabled=true needs mlflow.enabled=true"):
        load_config(EvalConfig, repo / "configs" / "eval.yaml", ["mlflow.enabled=false"])
    with pytest.raises(ConfigError, match="a gate check needs min or max"):
        load_config(EvalConfig, repo / "configs" / "eval.yaml", ["gate.checks={clip_t: {}}"])


def test_comparable_key_ignores_how_paths_are_spelled(repo, monkeypatch):
    monkeypatch.chdir(repo)
    relative = load_config(EvalConfig, "configs/eval.yaml", ["clip_model=models/toy-clip"])
    absolute = load_config(EvalConfig, "configs/eval.yaml", [f"clip_model={repo / 'models' / 'toy-clip'}"])
    assert relative.comparable_key() == absolute.comparable_key()
    assert load_config(EvalConfig, "configs/eval.yaml", ["generation.steps=8"]).comparable_key() != (
        relative.comparable_key()
    )
    assert load_config(EvalConfig, "configs/eval.yaml", ["generation.batch_size=4"]).comparable_key() == (
        relative.comparable_key()
    )
