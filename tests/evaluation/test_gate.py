"""The promotion gate on metric dicts, and the evaluation config's validation."""

from __future__ import annotations

import math

import pytest

from evaluation.config import RELATIVE, EvalConfig, GateArgs
from evaluation.gate import run_gate
from training.configuration import ConfigError, load_config

GOOD = {"clip_t": 0.72, "concept_hit_rate": 0.97, "success_rate": 1.0, "latency_p95_s": 0.4, "heldout_loss": 0.04}


def _gate(**values) -> GateArgs:
    checks = {"clip_t": {"min": 0.6}, "success_rate": {"min": 0.95}, "latency_p95_s": {"max": 2.0}}
    return GateArgs.model_validate({"checks": checks, "primary_metric": "clip_t"} | values)


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
    strict = repo / "configs" / "eval-toy-sks.yaml"
    with pytest.raises(ConfigError, match="concept_hit_rate needs suite.alternatives"):
        load_config(
            EvalConfig, strict, ["suite={trigger: sks, concept: dotted, prompts: [{prompt: a sks, content: a}]}"]
        )
    with pytest.raises(ConfigError, match="registry.enabled=true needs mlflow.enabled=true"):
        load_config(EvalConfig, repo / "configs" / "eval.yaml", ["mlflow.enabled=false"])
    with pytest.raises(ConfigError, match="a gate check needs min or max"):
        load_config(EvalConfig, repo / "configs" / "eval.yaml", ["gate.checks={concept_gain: {}}"])
    with pytest.raises(ConfigError, match="suite.alternatives need suite.concept"):
        load_config(
            EvalConfig, strict, ["suite={trigger: sks, alternatives: [white], prompts: [{prompt: a sks, content: a}]}"]
        )
    with pytest.raises(ConfigError, match="trigger='ohwx' but suite.trigger='sks'; make them agree"):
        load_config(EvalConfig, strict, ["trigger=ohwx"])
    with pytest.raises(ConfigError, match="registry.model_name is derived from data.train_path: set one of them"):
        load_config(EvalConfig, strict, ["data.train_path=null", "gate.checks={}", "gate.primary_metric=clip_t"])


def test_the_shipped_gates_measure_what_their_suites_can(repo):
    generic = load_config(EvalConfig, repo / "configs" / "eval.yaml")
    assert generic.suite is None and generic.registry.model_name is None and generic.gate_problems() == []
    assert set(generic.gate.checks) <= {"concept_gain", "concept_win_rate", "heldout_loss_ratio", "flexibility_delta",
                                        "prior_similarity", "success_rate", "latency_p95_s"}  # fmt: skip
    assert generic.gate.primary_metric in RELATIVE
    strict = load_config(EvalConfig, repo / "configs" / "eval-toy-sks.yaml")
    assert strict.suite.concept == "dotted" and strict.gate.primary_metric == "clip_t"
    assert {k: (b.min, b.max) for k, b in strict.gate.checks.items()} == {  # today's thresholds, unchanged
        "clip_t": (0.6, None), "concept_learned": (0.1, None), "concept_hit_rate": (0.75, None),
        "flexibility_hit_rate": (0.75, None), "prior_similarity": (0.7, None), "heldout_loss": (None, 0.1),
        "success_rate": (0.95, None), "latency_p95_s": (None, 2.0),
    }  # fmt: skip
    with pytest.raises(ConfigError, match="gate.checks.clip_t needs a concept word"):
        load_config(EvalConfig, repo / "configs" / "eval.yaml", ["gate.checks.clip_t={min: 0.6}"])


def test_relative_checks_pass_and_fail_with_their_margins():
    gate = GateArgs.model_validate(
        {
            "checks": {
                "concept_gain": {"min": 0.08},
                "heldout_loss_ratio": {"max": 0.4},
                "flexibility_delta": {"min": -0.15},
            },
            "primary_metric": "concept_gain",
        }  # fmt: skip
    )
    good = {"concept_gain": 0.2, "heldout_loss_ratio": 0.17, "flexibility_delta": 0.0}
    assert run_gate(good, gate).passed
    broken = run_gate(good | {"heldout_loss_ratio": 0.94, "flexibility_delta": -0.3}, gate)
    assert broken.failures() == ["heldout_loss_ratio <= 0.4: 0.94, short by 0.54",
                                 "flexibility_delta >= -0.15: -0.3, short by 0.15"]  # fmt: skip
    champion = {"version": "2", "metrics": {"concept_gain": 0.25}}
    assert run_gate(good, gate, champion).failures() == [
        "beats champion v2 on concept_gain (> 0.25): 0.2, short by 0.05"
    ]


def test_comparable_key_ignores_how_paths_are_spelled(repo, monkeypatch):
    monkeypatch.chdir(repo)
    config = "configs/eval-toy-sks.yaml"  # a suite in the config: the key needs no dataset on disk
    relative = load_config(EvalConfig, config, ["clip_model=models/toy-clip"])
    absolute = load_config(EvalConfig, config, [f"clip_model={repo / 'models' / 'toy-clip'}"])
    assert relative.comparable_key() == absolute.comparable_key()
    assert load_config(EvalConfig, config, ["generation.steps=8"]).comparable_key() != relative.comparable_key()
    assert load_config(EvalConfig, config, ["generation.batch_size=4"]).comparable_key() == (relative.comparable_key())
