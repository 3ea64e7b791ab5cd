"""The search space as plain Python: Optuna define-by-run, grid points, and trial configs (no Ray).

space = OptunaSpace(cfg.space)          # OptunaSearch(space=space, ...) calls it with an optuna trial
points = grid_points(cfg.grid)          # [{"lora.rank": 16, "train.lr": 1e-5, ...}, ...]
trial_cfg = trial_config(cfg, points[0], trial_id="abc_00000")
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import optuna
from pydantic import ValidationError

from training.config import TrainConfig
from training.configuration import ConfigError
from tuning.config import ParamSpec, TuneConfig

log = logging.getLogger(__name__)
PRODIGY_LR = 1.0  # Prodigy estimates its own step size; lr is a multiplier on it


def is_active(spec: ParamSpec, params: dict[str, Any]) -> bool:
    return all(params.get(k) in values for k, values in (spec.when or {}).items())


def with_rules(params: dict[str, Any], cfg: TuneConfig) -> dict[str, Any]:
    """The overrides a trial really runs: Prodigy's lr pinned to 1.0 unless searched, epochs capped."""
    out = dict(params)
    if out.get("train.optimizer", cfg.trial.train.optimizer) == "prodigy" and "train.lr" not in out:
        out["train.lr"] = PRODIGY_LR
    cap = cfg.search.max_epochs
    if cap and out.get("train.epochs", cfg.trial.train.epochs) > cap:
        out["train.epochs"] = cap
    return out


class OptunaSpace:
    """Define-by-run space for ``OptunaSearch``: unconditional keys first, then those whose ``when`` holds.

    A class (not a closure) so Tune can pickle it into the searcher state that ``Tuner.restore`` reads.
    """

    def __init__(self, cfg: TuneConfig):
        self.cfg = cfg

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        params: dict[str, Any] = {}
        ordered = sorted(self.cfg.space.items(), key=lambda kv: kv[1].when is not None)
        for key, spec in ordered:
            if is_active(spec, params):
                params[key] = suggest(trial, key, spec)
        return {k: v for k, v in with_rules(params, self.cfg).items() if k not in params}  # the constants


def suggest(trial: optuna.Trial, key: str, spec: ParamSpec) -> Any:
    if spec.type == "choice":
        return trial.suggest_categorical(key, spec.values)
    if spec.type in ("uniform", "loguniform"):
        return trial.suggest_float(key, spec.low, spec.high, log=spec.type == "loguniform")
    return trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.type == "logint")


def distribution(spec: ParamSpec) -> optuna.distributions.BaseDistribution:
    if spec.type == "choice":
        return optuna.distributions.CategoricalDistribution(spec.values)
    if spec.type in ("uniform", "loguniform"):
        return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.type == "loguniform")
    return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.type == "logint")


def grid_points(cfg: TuneConfig) -> list[dict[str, Any]]:
    """Every combination of ``grid:`` values, after the rules; duplicates (Prodigy × lr) run once."""
    keys = list(cfg.grid)
    points, seen = [], set()
    for combo in itertools.product(*(cfg.grid[k] for k in keys)):
        params = dict(zip(keys, combo))
        if params.get("train.optimizer") == "prodigy" and "train.lr" in params:
            params["train.lr"] = PRODIGY_LR  # the classic grid's lr axis does not apply to Prodigy
        point = with_rules(params, cfg)
        frozen = tuple(sorted((k, repr(v)) for k, v in point.items()))
        if frozen not in seen:
            seen.add(frozen)
            points.append(point)
    return points


def for_hardware(cfg: TuneConfig) -> tuple[TuneConfig, list[str]]:
    """Drop GPU-only choices (``adamw8bit``) when trials run on CPU; return the new config and what was dropped."""
    if cfg.trial.ray.use_gpu:
        return cfg, []
    notes: list[str] = []
    data = cfg.model_dump(mode="json")
    gpu_only = "adamw8bit"
    for section in ("space", "grid"):
        for key, value in data[section].items():
            values = value["values"] if section == "space" else value
            if values and gpu_only in values:
                values.remove(gpu_only)
                notes.append(f"{section}.{key}: dropped {gpu_only!r} (bitsandbytes 8-bit AdamW needs a CUDA GPU)")
    kept = [p for p in data["search"]["points_to_evaluate"] if gpu_only not in p.values()]
    if len(kept) != len(data["search"]["points_to_evaluate"]):
        notes.append(f"search.points_to_evaluate: dropped points using {gpu_only!r}")
    data["search"]["points_to_evaluate"] = kept
    try:
        return TuneConfig.model_validate(data), notes
    except ValidationError as exc:
        raise ConfigError(
            [
                f"{e['msg']} (after dropping {gpu_only!r}: this search has nothing left to run on CPU)"
                for e in exc.errors()
            ],
            "search space on CPU",
        ) from exc


def trial_config(cfg: TuneConfig, overrides: dict[str, Any], *, trial_id: str, run_dir: str) -> TrainConfig:
    """Base config + a trial's overrides, with the trial's own run name, folder and MLflow parent.

    Raises:
        ConfigError: an override value the training schema rejects (named with its key).
    """
    values = cfg.trial.model_dump(mode="json")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node[part]
        node[leaf] = value
    values["run_name"] = f"trial_{trial_id}"
    values["output_dir"] = f"{run_dir}/trials/{trial_id}"
    # Train storage: the base's ray.storage_path (shared FS / s3:// on a cluster), else <trial folder>/ray;
    # either way the run name makes it the trial's own
    values["ray"]["checkpoint_every_n_epochs"] = 1  # the adapter of every reported metric is kept
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']} (from {overrides})" for e in exc.errors()]
        raise ConfigError(problems, f"trial {trial_id}") from exc


def check_points(cfg: TuneConfig, points: list[dict[str, Any]]) -> list[str]:
    """Problems of points (grid points, points_to_evaluate, choice values) the training schema rejects, and what
    Ray's trial workers cannot run (``TrainConfig.ray_problems``: fp16/bf16 on CPU workers) for points that set it."""
    problems = []
    for point in points:
        try:
            trial = trial_config(cfg, point, trial_id="check", run_dir=cfg.output_dir)
        except ConfigError as exc:
            problems += exc.problems
            continue
        if any(key == "train.mixed_precision" or key.startswith("ray.") for key in point):
            ray = TrainConfig.ray_problems(trial.model_dump(), prefix="trial.")
            problems += [f"{p} (from {point})" for p in ray]
    return problems


def choice_points(cfg: TuneConfig) -> list[dict[str, Any]]:
    """One point per choice value and range end, each alone on the base config: cheap schema checks."""
    points = []
    for key, spec in cfg.space.items():
        values = spec.values if spec.type == "choice" else [spec.low, spec.high]
        if spec.type in ("int", "logint"):
            values = [int(v) for v in values]
        points += [{key: v} for v in values]
    return points
