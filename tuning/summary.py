"""The end of a search, driver side: results table, Optuna plots, the best adapter, ``best.json``, MLflow.

``finish`` takes ``TrialRecord``s (``tuning.tune.records_of`` makes them from Tune's ``ResultGrid``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from training.adapter_meta import verify_adapter
from training.tracking import NullTracker
from training.worker import ADAPTER_DIR
from tuning.config import TuneConfig
from tuning.results import TrialRecord, best_record, study_of, write_plots, write_table
from tuning.space import trial_config

log = logging.getLogger(__name__)


def close_child_runs(records: list[TrialRecord], uri: str | None) -> list[str]:
    """Say how each trial ended in its MLflow run: Tune kills a trial's process when ASHA stops it — also
    at its last epoch, when that is a rung or max_t — so the trial cannot always close its run itself.

    A trial the scheduler stopped early ran as planned (that is how ASHA spends its budget): its run is FINISHED
    with ``lorafleet.trial_status=stopped`` and ``lorafleet.stopped_early`` saying at which epoch, never FAILED or
    KILLED (which the MLflow UI shows as errors).

    Each call has the tracker's per-call limits (``training.tracking_rest.RequestLimits.from_env()``: one retry,
    10 s timeouts), not MLflow's default of 7 retries; after the first call the server does not answer, the rest are
    not tried (each would wait as long). Never raises.

    Returns:
        The run ids left open (empty when every trial's run was closed).
    """
    if uri is None:
        return []
    from mlflow import MlflowClient

    from training.tracking_rest import RequestLimits, run_calls

    client, limits = MlflowClient(uri), RequestLimits.from_env()
    runs = [r for r in records if r.run_id is not None]
    for i, r in enumerate(runs):
        calls = run_calls(client, uri, r.run_id, limits)
        try:
            calls.set_tag("lorafleet.trial_status", r.status)
            if r.status == "failed":
                calls.set_tag("lorafleet.error", r.error or "")
                calls.set_terminated("FAILED")
            else:
                if r.status == "stopped":
                    calls.set_tag("lorafleet.stopped_early", f"by the scheduler after epoch {r.epochs}")
                calls.set_terminated("FINISHED")
        except Exception as exc:  # noqa: BLE001 — the study's results are on disk; its run states the gap
            left = [x.run_id for x in runs[i:]]
            log.warning("MLflow did not answer while closing trial runs (%s); %d left open: %s",
                        str(exc).splitlines()[0][:200], len(left), ", ".join(left))  # fmt: skip
            return left
    return []


def finish(
    cfg: TuneConfig,
    records: list[TrialRecord],
    run_dir: Path,
    uri: str | None,
    store: str | None = None,
    study: NullTracker | None = None,
) -> dict:
    """Results table, Optuna plots, the best adapter and ``best.json``; all logged to the study's run through
    ``study`` (the driver's tracker; its exit ends the run — FAILED when no trial finished with a metric).

    ``store``: the backend store of a tracking server started just for this search (its URL dies with it).
    """
    study = study or NullTracker()
    parent = study.run_id
    files = write_table(records, run_dir)
    plots = write_plots(study_of(records, cfg), run_dir / "plots", cfg.search.metric)
    counts = {s: sum(r.status == s for r in records) for s in ("completed", "stopped", "failed")}
    best = best_record(records, cfg.search.mode)
    summary: dict[str, Any] = {
        "search": cfg.name,
        "algorithm": cfg.search.algorithm,
        "metric": cfg.search.metric,
        "mode": cfg.search.mode,
        "trials": counts,
        "trial_epochs": sum(r.epochs for r in records),
    }
    if best is not None:
        if best.checkpoint is None:
            raise RuntimeError(f"best trial {best.trial_id} reported no checkpoint; its adapter cannot be exported")
        target = run_dir / "best" / ADAPTER_DIR
        shutil.rmtree(target, ignore_errors=True)
        from ray.train import Checkpoint

        with Checkpoint(best.checkpoint).as_directory() as ckpt:  # local, shared FS or s3://
            shutil.copytree(Path(ckpt) / ADAPTER_DIR, target)
        meta = verify_adapter(target)
        summary["best"] = {
            "trial_id": best.trial_id,
            "value": best.metric,
            "epochs": best.epochs,
            "overrides": best.params,
            "config": trial_config(cfg, best.params, trial_id=best.trial_id, run_dir=str(run_dir)).model_dump(
                mode="json"
            ),
            "adapter": str(target),
            "adapter_sha256": meta.sha256,
            "mlflow": {
                "tracking_uri": uri,
                "parent_run_id": parent,
                "trial_run_id": best.run_id,
                "adapter_uri": f"runs:/{parent}/best_adapter" if parent else None,
                "backend_store_uri": store,  # `mlflow ui --backend-store-uri <this>` when the server is gone
            },
        }
    else:
        summary["best"] = None
    best_json = run_dir / "best.json"
    best_json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if parent:
        left_open = close_child_runs(records, uri)
        if left_open:  # sent with the study's tracker: when that fails too, its gap tag / local record names it
            study.set_tags({"lorafleet.trial_runs_left_open": ", ".join(left_open)})
        metrics = {f"trials_{k}": float(v) for k, v in counts.items()} | {"trial_epochs": summary["trial_epochs"]}
        if best is not None:
            metrics[f"best_{cfg.search.metric}"] = best.metric
            study.set_tags({"best_trial_id": best.trial_id, "best_run_id": best.run_id or ""})
            study.log_params({f"best.{k}": str(v) for k, v in best.params.items()})
            study.log_artifacts(run_dir / "best" / ADAPTER_DIR, "best_adapter")
        study.log_metrics(metrics, step=0)
        for path in [*files, best_json]:
            study.log_artifact(path)
        for path in plots:
            study.log_artifact(path, "plots")
    if best is None:
        study.end_status = "FAILED"  # no trial finished with a finite metric
    return summary
