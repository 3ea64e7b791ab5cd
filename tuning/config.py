"""Typed schema for a hyperparameter search (values live in `configs/tune.yaml`).

A search is a base ``TrainConfig`` (``trial:``) plus a space of dotted keys; every trial is
"base config + dotted overrides", nothing else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from training.config import TrainConfig, _Section
from training.configuration import MERGE, key_problem

# what a trial reports each epoch that can be optimised (issue 5's quality score joins here)
METRICS = {"val_loss": "min", "loss": "min"}
# the LoRA's shape: fixed by trial.lora.init_adapter's adapter (training/init_adapter.py), so never searched then
CONTINUED_SHAPE = ("lora.rank", "lora.alpha", "lora.target_modules", "lora.text_encoder", "lora.init_adapter")


class ParamSpec(_Section):
    """One searched key: a choice, or a (log-)uniform float or int range, optionally conditional."""

    type: Literal["choice", "uniform", "loguniform", "int", "logint"] = Field(
        ..., description="choice (values) | uniform / loguniform (low, high) | int / logint (integer low…high)"
    )
    values: list[Any] | None = Field(None, description="choice: the candidates")
    low: float | None = Field(None, description="range: lower bound (inclusive)")
    high: float | None = Field(None, description="range: upper bound (inclusive)")
    when: dict[str, list[Any]] | None = Field(
        None, description="sample only when these (unconditional) keys take one of the listed values"
    )

    @model_validator(mode="after")
    def _shape(self) -> ParamSpec:
        if self.type == "choice":
            if not self.values:
                raise ValueError("type=choice needs a non-empty values: [...] list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"type={self.type} needs low and high")
        if self.low > self.high:
            raise ValueError(f"low={self.low} is above high={self.high}; swap them")
        if self.type in ("loguniform", "logint") and self.low <= 0:
            raise ValueError(f"type={self.type} needs low > 0 (got {self.low}); use uniform/int for ranges from 0")
        if self.type in ("int", "logint") and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"type={self.type} needs integer low and high")
        return self


class SearchArgs(_Section):
    algorithm: Literal["optuna", "random", "grid"] = Field(
        "optuna", description="optuna: seeded TPE | random: Optuna's RandomSampler | grid: every point of grid:"
    )
    metric: str = Field("val_loss", description=f"trial metric to optimise: one of {', '.join(METRICS)}")
    mode: Literal["min", "max"] = Field("min", description="minimise or maximise search.metric")
    num_samples: int = Field(16, ge=1, description="trials to run (grid: ignored, one trial per grid point)")
    time_budget_s: float | None = Field(None, gt=0, description="stop the whole search after this many seconds")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="null = cluster CPUs (GPUs) ÷ one trial's workers' CPUs (GPUs)"
    )
    seed: int = Field(0, description="seeds the Optuna sampler (the same seed replays the same suggestions)")
    startup_trials: int = Field(4, ge=1, description="optuna: random trials before TPE starts modelling")
    scheduler: Literal["asha", "fifo"] = Field(
        "asha", description="asha: stop trials whose metric trails at each rung | fifo: run every trial to the end"
    )
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: keep the best 1/reduction_factor at each rung")
    max_epochs: int | None = Field(
        None, ge=1, description="cap every trial's train.epochs (a budget knob; also ASHA's max_t)"
    )
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="known-good trials to run first, as {dotted key: value} over space keys"
    )


class EvaluationHook(_Section):
    """Evaluate the best trial's adapter when the search ends: QA suite, gate, registry (``evaluation.evaluate``)."""

    enabled: bool = Field(False, description="run the evaluation and gate on the best adapter after the search")
    config: str = Field("configs/eval.yaml", description="the evaluation config (an EvalConfig YAML)")
    candidates: int = Field(
        1, ge=1, description="while the gate refuses, evaluate the next-best trials too, up to this many adapters"
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="dotted overrides for it; data paths default to the search's own (trial.data.path, "
        "trial.validation.data_path), MLflow to the search's server, with the evaluation a child of the study; "
        "on the command line a list is added to these, `[]` clears them",
        json_schema_extra=MERGE,
    )


class TuneConfig(_Section):
    name: str = Field("search", description="the search's name: its folder under output_dir and the MLflow run name")
    label: str | None = Field(None, description="the study's MLflow run name when it differs from name")
    output_dir: str = Field("runs/tune", description="searches live in <output_dir>/<name>")
    trial: TrainConfig = Field(..., description="the base training config every trial starts from")
    space: dict[str, ParamSpec] = Field(default_factory=dict, description="searched dotted keys (optuna/random)")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="grid mode: the values of each dotted key")
    search: SearchArgs = Field(default_factory=SearchArgs)
    evaluation: EvaluationHook = Field(default_factory=EvaluationHook)

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        problems = []
        keys = self.grid if self.search.algorithm == "grid" else self.space
        section = "grid" if self.search.algorithm == "grid" else "space"
        if not keys:
            problems.append(f"search.algorithm={self.search.algorithm} needs a non-empty {section}: section")
        for key in list(self.space) + list(self.grid):
            if key in ("run_name", "output_dir") or key.startswith(("mlflow.", "ray.storage_path")):
                problems.append(f"{key!r} is set per trial by the search; it cannot be searched")
            elif why := key_problem(TrainConfig, key):
                problems.append(f"search key {key!r}: {why}")
        if self.trial.lora.init_adapter:
            problems += [
                f"{key!r} cannot be searched while trial.lora.init_adapter continues an adapter: its LoRA keeps the "
                f"adapter's shape; drop {key} from {section}: (trial.{key} is checked against the adapter)"
                for key in keys
                if key in CONTINUED_SHAPE
            ]
        for key, spec in self.space.items():
            for cond in spec.when or {}:
                if cond not in self.space or self.space[cond].when:
                    problems.append(
                        f"space.{key}.when: {cond!r} must be an unconditional key of space: (one level of conditions)"
                    )
        for key, values in self.grid.items():
            if not values:
                problems.append(f"grid.{key} is empty; list at least one value")
        m = self.search.metric
        if m not in METRICS:
            problems.append(f"search.metric={m!r} is not reported by trials; use one of {', '.join(METRICS)}")
        elif METRICS[m] != self.search.mode:
            problems.append(
                f"search.mode={self.search.mode} but {m} is better when lower; set search.mode={METRICS[m]}"
            )
        if m == "val_loss" and not self.trial.has_heldout:
            problems.append(
                "search.metric=val_loss needs held-out images: set trial.validation.data_path (a folder like "
                "data.path) or trial.validation.holdout (images taken out of data.path)"
            )
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self
