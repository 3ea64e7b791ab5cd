"""Search results without Ray: the best trial, the table, and Optuna's plots from finished trials."""

from __future__ import annotations

import csv
import json
import math

from tuning.results import TrialRecord, best_record, study_of, write_plots, write_table
from tuning.space import for_hardware


def record(tid, metric, status="completed", **params):
    params = {"lora.rank": 8, "train.optimizer": "adamw", "train.lr": 1e-3, "train.epochs": 4} | params
    return TrialRecord(
        trial_id=tid,
        params=params,
        suggested=params,
        status=status,
        epochs=4 if status == "completed" else 2,
        planned_epochs=4,
        metric=metric,
        best_metric=metric,
        time_s=12.0,
        history=[] if metric is None else [metric + 0.02, metric],
    )


def test_best_is_the_best_last_metric_and_failures_or_nan_never_win():
    records = [
        record("a", 0.30),
        record("b", 0.20, status="stopped"),
        record("c", None, status="failed"),
        record("d", math.nan),
        record("e", 0.25),
    ]
    assert best_record(records, "min").trial_id == "b"
    assert best_record(records, "max").trial_id == "a"
    assert best_record([record("c", None, status="failed")], "min") is None


def test_table_has_a_row_per_trial_with_params_as_columns(tmp_path):
    records = [record("a", 0.3, **{"lora.rank": 16}), record("b", None, status="failed")]
    records[1].error = "ValueError: boom"
    csv_path, json_path = write_table(records, tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["trial_id"] for r in rows] == ["a", "b"]
    assert rows[0]["lora.rank"] == "16" and rows[1]["status"] == "failed" and "boom" in rows[1]["error"]
    assert json.loads(json_path.read_text())[0]["params"]["lora.rank"] == 16


def test_plots_are_drawn_from_any_algorithms_trials(tune_config, tmp_path):
    cfg, _ = for_hardware(tune_config())
    records = [
        record("a", 0.30, **{"lora.rank": 4, "train.lr": 1e-4}),
        record("b", 0.22, **{"lora.rank": 16, "train.lr": 2e-3}),
        record("c", 0.26, **{"lora.rank": 32, "train.lr": 5e-4, "train.epochs": 8}),
        # Prodigy's pinned lr is not a searched value: it must not reach the study as a param
        record("d", 0.24, **{"train.optimizer": "prodigy", "train.lr": 1.0, "train.d_coef": 1.2}),
        record("e", None, status="failed"),
    ]
    study = study_of(records, cfg)
    assert len(study.trials) == 5 and study.best_value == 0.22
    assert "train.lr" not in study.trials[3].params and study.trials[3].params["train.d_coef"] == 1.2
    assert study.trials[4].state.name == "FAIL"
    paths = write_plots(study, tmp_path, "val_loss")
    names = {p.stem for p in paths}
    assert {"optimization_history", "param_importances", "parallel_coordinate"} <= names
    assert all(p.stat().st_size > 5000 for p in paths)

    grid, _ = for_hardware(tune_config("search.algorithm=grid"))
    gstudy = study_of(records[:4], grid)
    assert set(gstudy.trials[0].params) == {"lora.rank", "train.lr", "train.optimizer", "train.epochs"}


def test_trials_the_scheduler_stopped_are_finished_runs_not_failures(tmp_path):
    """ASHA-stopped trials showed as red failures in the MLflow UI; they ran as planned and say so."""
    from mlflow import MlflowClient

    from training.tracking import start_run
    from tuning.summary import close_child_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = {s: start_run(uri, "e", s, {"lorafleet.kind": "trial"}) for s in ("completed", "stopped", "failed")}
    records = [record(s, None if s == "failed" else 0.1, status=s) for s in ids]
    for r in records:
        r.run_id = ids[r.status]
        r.error = "boom" if r.status == "failed" else None
    assert close_child_runs(records, uri) == []
    client = MlflowClient(uri)
    runs = {s: client.get_run(i) for s, i in ids.items()}
    assert {s: r.info.status for s, r in runs.items()} == {
        "completed": "FINISHED", "stopped": "FINISHED", "failed": "FAILED",
    }  # fmt: skip
    assert runs["stopped"].data.tags["lorafleet.stopped_early"] == "by the scheduler after epoch 2"
    assert runs["stopped"].data.tags["lorafleet.trial_status"] == "stopped"
    assert "lorafleet.stopped_early" not in runs["completed"].data.tags


def test_closing_trial_runs_with_the_server_down_gives_up_after_one_limited_call(tmp_path, monkeypatch):
    """A dead server: one limited call (not MLflow's 7 retries per call, per run), every run named as left open."""
    import socket
    import time

    from tuning.summary import close_child_runs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    records = [record(s, 0.1, status=s) for s in ("completed", "stopped", "failed")]
    for i, r in enumerate(records):
        r.run_id = f"run{i}"
    started = time.monotonic()
    assert close_child_runs(records, f"http://127.0.0.1:{port}") == ["run0", "run1", "run2"]
    assert time.monotonic() - started < 60  # refused connections: seconds; MLflow's defaults retry for minutes


def test_a_search_with_no_finished_trial_ends_its_study_run_failed_with_its_files(tune_config, tmp_path):
    """``finish`` logs through the driver's study tracker; the tracker's exit ends the run, FAILED when no trial
    finished with a metric (the block itself ended without an exception)."""
    from mlflow import MlflowClient

    from training.tracking import driver_tracker, start_run
    from tuning.summary import finish

    cfg, _ = for_hardware(tune_config())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MlflowClient's path (no HTTP limits to apply)
    parent = start_run(uri, "e", "study", {"lorafleet.kind": "search"})
    records = [record("a", None, status="failed"), record("b", None, status="failed")]
    run_dir = tmp_path / "search"
    run_dir.mkdir()
    with driver_tracker(uri, parent) as study:
        summary = finish(cfg, records, run_dir, uri, None, study)
    assert summary["best"] is None and summary["trials"]["failed"] == 2
    client = MlflowClient(uri)
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.info.end_time is not None, run.info
    assert run.data.metrics["trials_failed"] == 2.0
    assert {"results.csv", "results.json", "best.json"} <= {a.path for a in client.list_artifacts(parent)}
