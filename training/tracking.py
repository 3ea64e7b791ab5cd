"""MLflow logging from one process (the driver or rank 0), and a do-nothing tracker with the same face.

The driver creates the experiment and run (``start_run``) and passes the run id down; rank 0 logs
into it with an explicit ``MlflowClient`` over the tracking URI — never the global fluent state,
never one SQLite file written by concurrent processes.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """``configured`` (``mlflow.tracking_uri``), else ``$MLFLOW_TRACKING_URI``, else a SQLite file under ``output_dir``.

    The SQLite fallback is for a single machine: the driver and rank 0 write to it one after the other.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = Path(output_dir).expanduser().resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    log.warning(
        "no MLflow tracking server configured (mlflow.tracking_uri / MLFLOW_TRACKING_URI); logging to %s, "
        "which only works on one machine — point it at a tracking server on a cluster",
        db,
    )
    return f"sqlite:///{db}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    artifact_location: str | None = None,
) -> str:
    """Create the experiment if needed and a new run in it; return the run id (driver side)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location)
    tags = dict(tags)
    if submission := os.environ.get("LORAFLEET_SUBMISSION_ID"):  # set by cluster.jobs: find a job's runs
        tags.setdefault("lorafleet.submission_id", submission)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id


class NullTracker:
    """Same methods as ``MlflowTracker``; does nothing (MLflow off, or ranks other than 0)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: Image.Image, artifact_file: str) -> None: ...
    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None: ...
    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def start_system_metrics(self) -> None: ...
    def close(self) -> None: ...


class MlflowTracker(NullTracker):
    """Logs into one existing run. A failing server costs a warning, never the training run."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(uri)
        self._monitor = None
        self.dropped = 0

    def _safe(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 — tracking must not kill training
            self.dropped += 1
            log.warning("MLflow %s failed (%s); training continues", what, exc)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self._safe("log_params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._safe("log_metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        self._safe("log_image", self.client.log_image, self.run_id, image, artifact_file=artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._safe("log_artifacts", self.client.log_artifacts, self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self._safe("log_artifact", self.client.log_artifact, self.run_id, str(local_file), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._safe("set_tag", self.client.set_tag, self.run_id, k, v)

    def start_system_metrics(self) -> None:
        """CPU/memory (and GPU, where pynvml is present) sampled into the run while training."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 — optional (needs psutil)
            log.info("system metrics unavailable: %s", exc)

    def close(self) -> None:
        if self._monitor is not None:
            self._safe("system metrics", self._monitor.finish)
            self._monitor = None


def tracker_for(uri: str | None, run_id: str | None, rank: int) -> NullTracker:
    """The real tracker on rank 0 when a run exists, the null one elsewhere."""
    return MlflowTracker(uri, run_id) if uri and run_id and rank == 0 else NullTracker()
