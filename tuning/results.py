"""What a finished search produced, as plain data: trial records, the best trial, tables and Optuna plots.

No Ray here: ``tuning.tune`` turns Tune's ``ResultGrid`` into ``TrialRecord``s; tests build them by hand.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from tuning.config import TuneConfig
from tuning.space import distribution, is_active

log = logging.getLogger(__name__)


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]  # the overrides the trial ran with
    suggested: dict[str, Any]  # what the search algorithm proposed (before Prodigy's lr pin / max_epochs)
    status: str  # "completed" | "stopped" (by ASHA / the time budget) | "failed"
    epochs: int  # epochs reported
    planned_epochs: int
    metric: float | None  # the metric at the last reported epoch
    best_metric: float | None  # the best over its epochs
    time_s: float
    checkpoint: str | None = None  # the last reported checkpoint (its adapter/ is the trial's adapter)
    run_id: str | None = None  # the trial's MLflow child run
    error: str | None = None
    history: list[float] = field(default_factory=list)  # the metric per epoch
    ended_at: float = 0.0  # unix time of its last result (orders trials by completion)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def best_record(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    """The trial whose last-epoch metric is best (its adapter is the one that was trained); failures never win."""
    scored = [r for r in records if r.status != "failed" and _finite(r.metric)]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r.metric)


def write_table(records: list[TrialRecord], out_dir: Path) -> list[Path]:
    """``results.csv`` (one row per trial, params as columns) and ``results.json`` (everything)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in records for k in r.params})
    columns = ["trial_id", "status", "metric", "best_metric", "epochs", "planned_epochs", "time_s", *keys]
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns + ["run_id", "error"])
        for r in records:
            row = [r.trial_id, r.status, r.metric, r.best_metric, r.epochs, r.planned_epochs, round(r.time_s, 1)]
            writer.writerow(row + [r.params.get(k, "") for k in keys] + [r.run_id or "", (r.error or "")[:200]])
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps([asdict(r) for r in records], indent=2, default=str) + "\n")
    return [csv_path, json_path]


def _choice(value: Any) -> Any:
    """Optuna choices are scalars: a list value (e.g. target modules) becomes its JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def study_of(records: list[TrialRecord], cfg: TuneConfig) -> optuna.Study:
    """An in-memory Optuna study of the finished trials (any algorithm, grid included), for Optuna's plots.

    Only searched values are params (Prodigy's pinned lr is not); failed trials are FAIL, no value.
    """
    study = optuna.create_study(direction="minimize" if cfg.search.mode == "min" else "maximize")
    grid = cfg.search.algorithm == "grid"
    for r in sorted(records, key=lambda r: (r.ended_at, r.trial_id)):  # completion order
        if grid:
            params = {k: _choice(r.suggested[k]) for k in cfg.grid if k in r.suggested}
            dists = {
                k: optuna.distributions.CategoricalDistribution(
                    sorted({_choice(x.suggested[k]) for x in records if k in x.suggested}, key=repr)
                )
                for k in params
            }
        else:
            params = {k: r.suggested[k] for k, s in cfg.space.items() if k in r.suggested and is_active(s, r.suggested)}
            dists = {k: distribution(cfg.space[k]) for k in params}
        ok = r.status != "failed" and _finite(r.metric)
        state = optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL
        intermediate = {i + 1: v for i, v in enumerate(r.history) if _finite(v)}
        trial = optuna.trial.create_trial(
            params=params,
            distributions=dists,
            value=r.metric if ok else None,
            state=state,
            intermediate_values=intermediate,
            user_attrs={"trial_id": r.trial_id, "status": r.status},
        )
        study.add_trial(trial)
    return study


def write_plots(study: optuna.Study, out_dir: Path, metric: str) -> list[Path]:
    """Optimisation history, parameter importances, parallel coordinates and intermediate values, as PNGs.

    A plot Optuna cannot draw for this study (e.g. importances with one finished trial) is skipped with a log line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "optimization_history": lambda: ovm.plot_optimization_history(study, target_name=metric),
        "param_importances": lambda: ovm.plot_param_importances(study, target_name=metric),
        "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study, target_name=metric),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
    }
    written = []
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.warning("skipped the %s plot: %s", name, exc)
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        fig.set_size_inches(9, 5.5)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
