"""MLflow logging from one process (the driver or rank 0), and a do-nothing tracker with the same face.

The driver creates the experiment and run (``start_run``) and passes the run id down; rank 0 logs
into it with an explicit ``MlflowClient`` over the tracking URI — never the global fluent state,
never one SQLite file written by concurrent processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """``configured`` (``mlflow.tracking_uri``), else ``$MLFLOW_TRACKING_URI``, else the MLflow server of
    ``lorafleet up``'s cluster while it runs (as every lorafleet command), else a SQLite file under ``output_dir``.

    The SQLite fallback is for a single machine: the driver and rank 0 write to it one after the other.
    """
    from training.cluster_state import up_mlflow

    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or up_mlflow()
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


# While training, a tracking call gets one quick try: with MLflow's defaults (7 retries, backoff factor 2) a server
# that is down blocks each call for minutes, and with it the training step that made the call.
QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
         "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}  # fmt: skip
MAX_PENDING = 100_000  # metric values held while the server is away (a few MB); older ones beyond that are dropped


@contextlib.contextmanager
def _quick_requests():
    """MLflow reads these variables at each request, so they are set around a call (process-wide: another
    thread's call meanwhile gets the quick settings too, which only shortens its retries)."""
    saved = {k: os.environ.get(k) for k in QUICK}
    os.environ.update({k: v for k, v in QUICK.items() if saved[k] is None})  # an explicit setting wins
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


class MlflowTracker(NullTracker):
    """Logs into one existing run. A failing server costs a warning, never the training run.

    Params and metrics that fail to send are kept (up to ``MAX_PENDING`` values) and sent with the next call
    that reaches the server, and once more at ``close``; images and artifacts that fail are counted in
    ``dropped``. ``gap()`` says what the run is missing.
    """

    close_attempts, close_wait_s = 6, 5.0  # at the end, pending values get 30 s for the server to come back

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(uri)
        self._monitor = None
        self._pending_metrics: list = []
        self._pending_params: list = []
        self.dropped: list[str] = []  # what failed for good
        self.lost_metrics = 0
        self.failures = 0

    def _safe(self, what: str, fn, *args, **kwargs) -> bool:
        try:
            with _quick_requests():
                fn(*args, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 — tracking must not kill training
            self.failures += 1
            log.warning("MLflow %s failed (%s); training continues", what, str(exc).splitlines()[0][:300])
            return False

    def _flush(self) -> bool:
        """Send what is pending (params first); False when the server still does not answer."""
        while self._pending_params:
            chunk = self._pending_params[:100]  # MLflow's batch limit for params
            if not self._safe("log_params", self.client.log_batch, self.run_id, params=chunk):
                return False
            del self._pending_params[: len(chunk)]
        while self._pending_metrics:
            chunk = self._pending_metrics[:1000]  # MLflow's batch limit for metrics
            if not self._safe("log_metrics", self.client.log_batch, self.run_id, metrics=chunk):
                if len(self._pending_metrics) > MAX_PENDING:
                    over = len(self._pending_metrics) - MAX_PENDING
                    del self._pending_metrics[:over]
                    self.lost_metrics += over
                return False
            del self._pending_metrics[: len(chunk)]
        return True

    @property
    def pending(self) -> int:
        return len(self._pending_metrics) + len(self._pending_params)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self._pending_params += [Param(k, v) for k, v in params.items()]
        self._flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending_metrics += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if self._flush() is False and self.pending:
            log.warning("%d MLflow values kept until the server answers", self.pending)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        self._flush()
        if not self._safe("log_image", self.client.log_image, self.run_id, image, artifact_file=artifact_file):
            self.dropped.append(artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if not self._safe("log_artifacts", self.client.log_artifacts, self.run_id, str(local_dir), artifact_path):
            self.dropped.append(f"{artifact_path or ''}/ ({local_dir})")

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        if not self._safe("log_artifact", self.client.log_artifact, self.run_id, str(local_file), artifact_path):
            self.dropped.append(f"{artifact_path or ''}/{Path(local_file).name}")

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            if not self._safe("set_tag", self.client.set_tag, self.run_id, k, v):
                self.dropped.append(f"tag {k}")

    def gap(self) -> str | None:
        """What this run is missing because the server was away (None: nothing)."""
        parts = []
        if self.pending or self.lost_metrics:
            parts.append(f"{self.pending + self.lost_metrics} param/metric values never reached the server")
        if self.dropped:
            parts.append(f"not logged: {', '.join(self.dropped[:20])}")
        return "; ".join(parts) or None

    def flush(self, attempts: int = 6, wait_s: float = 5.0) -> bool:
        """Send what is pending, trying ``attempts`` times ``wait_s`` apart; True when nothing is left."""
        import time

        for i in range(attempts):
            if self._flush():
                return True
            if i < attempts - 1:
                time.sleep(wait_s)
        return False

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
        if self.pending and not self.flush(self.close_attempts, self.close_wait_s):
            log.warning("MLflow run %s is incomplete: %s", self.run_id, self.gap())
        if gap := self.gap():  # stated in the run, when the server answers again
            self._safe("set_tag", self.client.set_tag, self.run_id, "lorafleet.mlflow_gap", gap)


def tracker_for(uri: str | None, run_id: str | None, rank: int) -> NullTracker:
    """The real tracker on rank 0 when a run exists, the null one elsewhere."""
    return MlflowTracker(uri, run_id) if uri and run_id and rank == 0 else NullTracker()
