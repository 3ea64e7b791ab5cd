"""MLflow logging from one process (the driver or rank 0), and a do-nothing tracker with the same face.

The driver creates the experiment and run (``start_run``) and passes the run id down; rank 0 logs
into it with an explicit ``MlflowClient`` over the tracking URI — never the global fluent state,
never one SQLite file written by concurrent processes. A tracker is a context manager: its exit flushes what the
server missed, states the rest (in the run, else in a local file) and ends the run:

    run_id = start_run(uri, "lorafleet", "train ohwx", tags={})
    with driver_tracker(uri, run_id, local_record=out / GAP_RECORD) as tracker:   # FINISHED, or FAILED on an error
        tracker.log_metrics({"loss": 0.25}, step=1)
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from training.tracking_rest import RequestLimits, run_calls

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


GAP_TAG = "lorafleet.mlflow_gap"  # what a run is missing, in the run itself (a Train worker's: GAP_TAG + ".rank0")
GAP_RECORD = "mlflow_gap.jsonl"  # ... or, when even that tag cannot be sent, a line in this file next to the outputs
MAX_PENDING = 100_000  # metric values held while the server is away (a few MB); older ones beyond that are dropped


class NullTracker:
    """Same methods as ``MlflowTracker``, a context manager too; does nothing (MLflow off, or ranks other than 0)."""

    run_id: str | None = None
    end_status: str | None = None

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: Image.Image, artifact_file: str) -> None: ...
    def log_artifacts(
        self, local_dir: str | Path, artifact_path: str | None = None, *, required: bool = False
    ) -> None: ...
    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def start_system_metrics(self) -> None: ...
    def close(self, status: str | None = None) -> bool:
        return True


class MlflowTracker(NullTracker):
    """Logs into one existing run; a failing server costs a warning, never the training run. Use it as a context
    manager — its exit flushes, states what is missing, and (``owns_run``) ends the run::

        with MlflowTracker(uri, run_id, local_record=out / GAP_RECORD) as tracker:
            tracker.log_metrics({"loss": 0.5}, step=1)
        # the run is FINISHED; an exception in the block: FAILED (KeyboardInterrupt: KILLED), then re-raised

    Over HTTP each call gets ``limits`` (``RequestLimits``: by default one retry, 10 s timeouts; explicit
    ``MLFLOW_HTTP_REQUEST_*`` settings win) through ``tracking_rest.RunRest`` — passed per call, so no other thread's
    MLflow calls change. Params and metrics that fail to send are kept (up to ``MAX_PENDING`` values) and sent with
    the next call that reaches the server; images and artifacts that fail are counted in ``dropped``.

    At exit (``close``): the system-metrics thread gets ``monitor_wait_s``; pending values get ``exit_wait_s`` for
    the server to come back (tried every ``retry_every_s``); what is still missing goes into the run's
    ``lorafleet.mlflow_gap`` tag, and the run is ended with ``end_status`` (FINISHED/FAILED/KILLED; None: FINISHED,
    or from the exception). When the tag or the status cannot be sent either, one JSON line with the unsent values
    and the intended status is appended to ``local_record`` (with a warning; without ``local_record``, only the
    warning). Over HTTP exit takes at most ``exit_bound_s()``.

    Args:
        uri: tracking URI (``http(s)://`` server; ``sqlite:``/``file:`` go through ``MlflowClient`` unlimited).
        run_id: the existing run (``start_run``).
        owns_run: False for a process that logs into a run it did not open (rank 0 of a Train worker group, a
            helper logging setup): exit flushes and states the gap but leaves the run's status to its owner.
        local_record: the JSON-lines file for what could not reach the server at all.
        gap_tag: the tag that states this tracker's gap (default ``GAP_TAG``). Two trackers in one run (a Train
            worker's rank 0 and its driver) each need their own, or the last to close overwrites the other's.
        limits: per-call retry/timeout limits for HTTP; default ``RequestLimits.from_env()``.
    """

    exit_wait_s, retry_every_s, monitor_wait_s = 30.0, 5.0, 15.0

    def __init__(self, uri: str, run_id: str, *, owns_run: bool = True, local_record: str | Path | None = None,
                 gap_tag: str = GAP_TAG, limits: RequestLimits | None = None):  # fmt: skip
        from mlflow import MlflowClient

        self.uri, self.run_id, self.owns_run, self.gap_tag = uri, run_id, owns_run, gap_tag
        self.local_record = Path(local_record) if local_record else None
        self.limits = limits or RequestLimits.from_env()
        self._client = MlflowClient(uri)  # artifacts: MLflow's artifact repositories (S3, proxied, local)
        self._calls = run_calls(self._client, uri, run_id, self.limits)  # params/metrics/tags/status: limited
        self._monitor = None
        self.system_metrics = False  # start_system_metrics was called
        self._pending_metrics: list = []
        self._pending_params: list = []
        self.dropped: list[str] = []  # what failed for good
        self.lost_metrics = 0
        self.failures = 0
        self.end_status = None

    def __exit__(self, exc_type, exc, tb) -> None:
        status = None
        if self.owns_run:
            if exc_type is None:
                status = self.end_status or "FINISHED"
            elif issubclass(exc_type, KeyboardInterrupt):
                status = "KILLED"
            else:  # a caller may have said KILLED (a stopped search) before raising
                status = self.end_status if self.end_status in ("FAILED", "KILLED") else "FAILED"
        self.close(status)

    def _attempt(self, what: str, fn, *args, **kwargs) -> bool:
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 — tracking must not kill training
            self.failures += 1
            log.warning("MLflow %s failed (%s); training continues", what, str(exc).splitlines()[0][:300])
            return False

    def _send_pending(self, deadline: float | None = None) -> bool:
        """Send what is pending (params first); False when the server does not answer (or ``deadline`` passed)."""
        while self._pending_params:
            chunk = self._pending_params[:100]  # MLflow's batch limit for params
            if not self._attempt("log_params", self._calls.log_batch, params=chunk):
                return False
            del self._pending_params[: len(chunk)]
            if deadline is not None and time.monotonic() > deadline:
                return not self.pending
        while self._pending_metrics:
            chunk = self._pending_metrics[:1000]  # MLflow's batch limit for metrics
            if not self._attempt("log_metrics", self._calls.log_batch, metrics=chunk):
                if len(self._pending_metrics) > MAX_PENDING:
                    over = len(self._pending_metrics) - MAX_PENDING
                    del self._pending_metrics[:over]
                    self.lost_metrics += over
                return False
            del self._pending_metrics[: len(chunk)]
            if deadline is not None and time.monotonic() > deadline:
                return not self.pending
        return True

    @property
    def pending(self) -> int:
        """Param and metric values waiting for the server."""
        return len(self._pending_metrics) + len(self._pending_params)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self._pending_params += [Param(k, v) for k, v in params.items()]
        self._send_pending()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending_metrics += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if not self._send_pending() and self.pending:
            log.warning("%d MLflow values kept until the server answers", self.pending)

    def _upload(self, what: str, name: str, fn, *args) -> None:
        """An artifact upload goes through MLflow's artifact repository (its own retry settings), so only after a
        limited call showed the server answering: a server that is away costs one quick try, not MLflow's
        minutes of retries. (A server that dies during the upload itself still gets MLflow's retries.)"""
        self._send_pending()
        if not (self._attempt("ping", self._calls.ping) and self._attempt(what, fn, self.run_id, *args)):
            self.dropped.append(name)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        self._upload("log_image", artifact_file, lambda run_id: self._client.log_image(run_id, image, artifact_file))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None, *, required: bool = False) -> None:
        """``required``: the caller cannot go on without these files (e.g. an adapter about to be registered from
        the run): MLflow's error is raised, with MLflow's own retries, instead of being counted in ``dropped``."""
        if required:
            self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)
            return
        self._upload("log_artifacts", f"{artifact_path or ''}/ ({local_dir})", self._client.log_artifacts,
                     str(local_dir), artifact_path)  # fmt: skip

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self._upload("log_artifact", f"{artifact_path or ''}/{Path(local_file).name}", self._client.log_artifact,
                     str(local_file), artifact_path)  # fmt: skip

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit for tags
            chunk = items[i : i + 100]
            if not self._attempt("set_tags", self._calls.log_batch, tags=chunk):
                self.dropped += [f"tag {t.key}" for t in chunk]

    def gap(self) -> str | None:
        """What this run is missing because the server was away (None: nothing)."""
        parts = []
        if self.pending or self.lost_metrics:
            parts.append(f"{self.pending + self.lost_metrics} param/metric values never reached the server")
        if self.dropped:
            parts.append(f"not logged: {', '.join(self.dropped[:20])}")
        return "; ".join(parts) or None

    def flush(self, within_s: float = 0.0) -> bool:
        """Send what is pending, trying again every ``retry_every_s`` for up to ``within_s`` seconds (a call that
        started before then may finish up to ``limits.call_bound_s()`` later); True when nothing is left."""
        deadline = time.monotonic() + within_s
        while not self._send_pending(deadline):
            if time.monotonic() + self.retry_every_s > deadline:
                return False
            time.sleep(self.retry_every_s)
        return True

    def exit_bound_s(self) -> float:
        """The longest ``close`` takes over HTTP: the system-metrics wait (when they were started), the flush
        window and one limited call past it, then the gap tag and the status."""
        monitor = self.monitor_wait_s if self.system_metrics else 0.0
        return monitor + self.exit_wait_s + 3 * self.limits.call_bound_s()

    def start_system_metrics(self) -> None:
        """CPU/memory (and GPU, where pynvml is present) sampled into the run while training."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=self.uri)
            self._monitor.start()
            self.system_metrics = True
        except Exception as exc:  # noqa: BLE001 — optional (needs psutil)
            log.info("system metrics unavailable: %s", exc)

    def _stop_monitor(self) -> None:
        """MLflow's monitor thread sends its last batch with MLflow's own (long) retries: wait ``monitor_wait_s``
        for it, then leave the daemon thread behind rather than hold the exit."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        stopper = threading.Thread(target=self._attempt, args=("system metrics", monitor.finish), daemon=True)
        stopper.start()
        stopper.join(self.monitor_wait_s)
        if stopper.is_alive():
            log.warning("MLflow's system-metrics thread still waits on the server after %.0f s; not waiting longer",
                        self.monitor_wait_s)  # fmt: skip

    def close(self, status: str | None = None) -> bool:
        """Flush (for up to ``exit_wait_s``), state the gap in the run, end the run with ``status`` (None: leave
        it open). Never raises. Returns True when the run holds everything and has its status."""
        try:
            self._stop_monitor()
            if self.pending and not self.flush(self.exit_wait_s):
                log.warning("MLflow run %s is incomplete: %s", self.run_id, self.gap())
            gap = self.gap()
            tagged = gap is None or self._attempt("set_tag", self._calls.set_tag, self.gap_tag, gap)
            ended = status is None or self._attempt("set_terminated", self._calls.set_terminated, status)
            if not (tagged and ended):
                self._record_locally(status, ended)
            return gap is None and ended
        except Exception as exc:  # noqa: BLE001 — an exit must not hide the with-block's own exception
            log.warning("closing MLflow run %s failed: %s", self.run_id, exc)
            return False

    def _record_locally(self, status: str | None, ended: bool) -> None:
        """One JSON line with what the server never got: enough to see the gap and to log the values later."""
        import json
        import socket
        from datetime import datetime, timezone

        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
            "pid": os.getpid(), "tracking_uri": self.uri, "run_id": self.run_id, "gap": self.gap(),
            "status": status, "status_set": ended, "lost_metrics": self.lost_metrics, "dropped": self.dropped,
            "params": [[p.key, p.value] for p in self._pending_params],
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self._pending_metrics],
        }  # fmt: skip
        where = "nowhere (no local_record)"
        if self.local_record is not None:
            try:
                self.local_record.parent.mkdir(parents=True, exist_ok=True)
                with self.local_record.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                where = str(self.local_record)
            except OSError as exc:
                where = f"nowhere ({self.local_record}: {exc})"
        log.warning("MLflow server unreachable at the end of run %s (status %s %s): %s; recorded in %s",
                    self.run_id, status, "set" if ended else "NOT set", self.gap() or "no values missing",
                    where)  # fmt: skip


def tracker_for(uri: str | None, run_id: str | None, rank: int, local_record: str | Path | None = None) -> NullTracker:
    """A Train worker's tracker: the real one on rank 0 when a run exists (it logs into the driver's run and leaves
    its status to the driver; its gap goes into ``lorafleet.mlflow_gap.rank0``, next to the driver's), the null one
    elsewhere."""
    if uri and run_id and rank == 0:
        return MlflowTracker(uri, run_id, owns_run=False, local_record=local_record, gap_tag=f"{GAP_TAG}.rank{rank}")
    return NullTracker()


def driver_tracker(uri: str | None, run_id: str | None, local_record: str | Path | None = None) -> NullTracker:
    """A driver's tracker for the run it opened (its exit ends the run), or the null one when MLflow is off."""
    return MlflowTracker(uri, run_id, local_record=local_record) if uri and run_id else NullTracker()
