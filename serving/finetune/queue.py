"""Admission and state of fine-tuning jobs: bounded concurrency, a per-tenant limit, start in order, cancel in
every state. Plain Python: the Ray side is a ``Submitter`` passed in (``cluster.finetune.RaySubmitter`` in the
Serve app, a fake in tests).

    queue = JobQueue(store, submitter, max_running=None, per_tenant=2)   # None: submitter.capacity()
    queue.tick()              # refresh every submitted job from its Ray job + pipeline.json, then start queued ones

``tick`` is called by the ingress replica's poller (``serving.finetune.routes.Poller``) every ``finetune.poll_s``.
Everything it knows is on disk (the job records, the pipeline's ``pipeline.json``) and in the Ray job (its status
by submission id), so a restarted Serve app picks up where it was. The submission id is the job id: Ray refuses a
second job under one id, so a job is never run twice, even by two ingress replicas (their ticks also take a file
lock).

Status (OpenAI's): ``validating_files`` while the dataset is being held, ``queued`` before it is submitted and
while its Ray job is PENDING, ``running`` while RUNNING, then ``succeeded`` (the pipeline registered the model),
``failed`` (``error`` = the failed stage's message, e.g. the gate's reasons) or ``cancelled``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from serving.finetune.jobs import TERMINAL, JobRecord, JobStore
from tuning.progress import PROGRESS as PROGRESS_FILE
from tuning.progress import read_progress

log = logging.getLogger(__name__)
RAY_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
STUCK_S = 3600  # a job still validating_files this long was cut off by a restart (holding takes seconds)
SUMMARY = "pipeline.json"  # written by cluster.pipeline into <output_dir>/<name>/
TRIALS = "search/results.json"  # the search's trials (tuning/results.py), once it ended
PROGRESS = f"search/{PROGRESS_FILE}"  # the search's live progress (tuning/progress.py), one line per trial event
MAX_EPOCH_EVENTS = 500  # per job: a long search's epochs beyond this are in MLflow, not in the events


class Submitter(Protocol):
    """What the queue needs of a cluster (``cluster.finetune.RaySubmitter`` over ``cluster.jobs.Jobs``)."""

    def submit(self, job_id: str, overrides: list[str]) -> str:
        """Start ``python -m cluster.pipeline`` with ``overrides`` as job ``job_id``; returns its submission id."""

    def status(self, submission_id: str) -> str:
        """The Ray job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""

    def stop(self, submission_id: str) -> None:
        """SIGTERM the job's entry point (the pipeline stops its trials and exits)."""

    def capacity(self) -> int:
        """Jobs that fit at once: cluster GPUs ÷ GPUs per job, else CPUs ÷ CPUs per job (at least 1)."""


class JobQueue:
    """See the module docstring. ``clock``: Unix seconds."""

    def __init__(self, store: JobStore, submitter: Submitter, max_running: int | None = None, per_tenant: int = 1,
                 clock: Callable[[], float] = time.time):  # fmt: skip
        self.store, self.submitter, self.clock = store, submitter, clock
        self.max_running, self.per_tenant = max_running, per_tenant
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time: threads of this replica and other ingress replicas (a file lock)."""
        self.store.root.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, open(self.store.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def bound(self) -> int:
        return self.max_running or max(1, self.submitter.capacity())

    # ---- the poller's step ------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Refresh every submitted job that has not ended, then start queued jobs in order within the bounds."""
        if not self.store.root.is_dir():
            return  # no job yet: nothing is created on disk by polling
        with self.locked():
            records = self.store.all()
            for record in records:
                if record.submission_id and record.ray_status not in RAY_ENDED:
                    try:
                        self._refresh(record)
                    except Exception:  # noqa: BLE001 - one job's odd files must not stop every other job's poll
                        log.exception("fine-tuning job %s: refresh failed; tried again next poll", record.id)
                elif record.status == "validating_files" and record.order < self.clock() - STUCK_S:
                    self._end(
                        record,
                        "failed",
                        self.clock(),
                        {
                            "code": "interrupted",
                            "param": "training_file",
                            "message": "the server stopped while it held this job's dataset; create the job again",
                        },
                    )
                    self.store.save(record)  # fmt: skip
            self._admit(records)

    def _active(self, record: JobRecord) -> bool:
        return record.submission_id is not None and record.ray_status not in RAY_ENDED

    def _admit(self, records: list[JobRecord]) -> None:
        if not any(r.status == "queued" and not r.submission_id for r in records):
            return  # nothing to start: the submitter (the cluster) is not asked for its capacity
        active = [r for r in records if self._active(r)]
        bound = self.bound()
        per: dict[str, int] = {}
        for r in active:
            per[r.tenant] = per.get(r.tenant, 0) + 1
        for record in records:
            if len(active) >= bound:
                return
            if record.status != "queued" or record.submission_id or per.get(record.tenant, 0) >= self.per_tenant:
                continue
            self._submit(record)
            if self._active(record):
                active.append(record)
                per[record.tenant] = per.get(record.tenant, 0) + 1

    def _submit(self, record: JobRecord) -> None:
        now = self.clock()
        try:
            record.submission_id = self.submitter.submit(record.id, record.overrides)
        except Exception as exc:  # noqa: BLE001 - any refusal ends this job, never the poller
            log.warning("fine-tuning job %s could not be submitted: %s", record.id, exc)
            self._end(record, "failed", now, {"code": "submit_failed", "message": str(exc)[:2000], "param": None})
        else:
            record.ray_status = "PENDING"
            record.event("submitted", f"started as Ray job {record.submission_id}", now)
        self.store.save(record)

    def _refresh(self, record: JobRecord) -> None:
        now = self.clock()
        try:
            ray_status = self.submitter.status(record.submission_id)
        except Exception as exc:  # noqa: BLE001 - the dashboard is away: try again next tick
            log.warning("fine-tuning job %s: status unknown (%s)", record.id, exc)
            return
        summary = read_summary(self.store.folder(record.id), record.id)
        before = record.model_dump_json()
        record.ray_status = ray_status
        if record.status not in TERMINAL and ray_status == "RUNNING" and record.status != "running":
            record.status = "running"
            record.event("running", "the pipeline is running", now)
        self._stage_events(record, summary, now)
        caption_events(record, summary, now)
        self._progress_events(record, now)
        self._trial_events(record, now)
        if record.status not in TERMINAL and ray_status in RAY_ENDED:
            self._finish(record, ray_status, summary, now)
        if record.model_dump_json() != before:
            self.store.save(record)

    def _stage_events(self, record: JobRecord, summary: dict[str, Any], now: float) -> None:
        """Events for pipeline stages whose status changed since the last tick."""
        for name, stage in (summary.get("stages") or {}).items():
            status = stage.get("status", "?")
            if record.stages.get(name) == status:
                continue
            record.stages[name] = status
            numbers = {k: v for k, v in stage.items() if isinstance(v, (int, float, str, bool)) and k != "status"}
            message = f"stage {name}: {status}" + (f" ({stage['seconds']} s)" if "seconds" in stage else "")
            if status == "failed" and stage.get("error"):
                message += f": {stage['error']}"
            level = "error" if status == "failed" else "warn" if status == "stopped" else "info"
            record.event(f"stage/{name}/{status}", message, now, level=level, data=numbers or None)

    def _progress_events(self, record: JobRecord, now: float) -> None:
        """Events for the search's progress lines written since the last tick (``tuning.progress``): a trial's
        start, each epoch (train loss, the search metric, epoch n/N), its end. ``record.progress_offset`` keeps the
        place; an event's id comes from the trial and epoch, so a line read twice is still one event."""
        lines, record.progress_offset = read_progress(self.store.folder(record.id) / "runs" / record.id / PROGRESS,
                                                      record.progress_offset)  # fmt: skip
        epochs = sum(1 for e in record.events if e.data and "epoch" in e.data and "trial_id" in e.data)
        for line in lines:
            trial, kind, when = str(line.get("trial_id", "?")), line.get("event"), _when(line.get("time"), now)
            if kind == "epoch":
                epochs += 1
                if epochs > MAX_EPOCH_EVENTS:
                    record.event("progress/capped", f"more than {MAX_EPOCH_EVENTS} epochs: later ones are left out "
                                 "of the events (every trial's metrics are in MLflow)", when, level="warn")  # fmt: skip
                    continue
                record.event(f"trial/{trial}/epoch/{line.get('epoch')}", epoch_message(line), when,
                             data=epoch_data(line))  # fmt: skip
            elif kind == "start":
                params = json.dumps(line.get("params") or {}, sort_keys=True)
                record.event(f"trial/{trial}/start", f"trial {trial} started ({line.get('n')} of {line.get('total')})"
                             f": {params}", when, data={"trial_id": trial, "params": params})  # fmt: skip
            elif kind == "end":  # the same key as results.json's event for the trial: one event, whichever is first
                status, data = line.get("status"), {k: line.get(k) for k in ("trial_id", "epochs", "planned_epochs")}
                data[str(line.get("metric"))] = line.get("value")
                record.event(f"trial/{trial}/{status}", f"trial {trial}: {status} after {line.get('epochs')}/"
                             f"{line.get('planned_epochs')} epoch(s), {line.get('metric')} {line.get('value')}", when,
                             data=data)  # fmt: skip
            elif kind == "error":
                record.event(f"trial/{trial}/error", f"trial {trial} failed (its error is in the trial's event when "
                             "the search ends)", when, level="error", data={"trial_id": trial})  # fmt: skip

    def _trial_events(self, record: JobRecord, now: float) -> None:
        """One event per trial of the search, once it wrote ``results.json`` (tuning/results.py's TrialRecord)."""
        try:
            trials = json.loads((self.store.folder(record.id) / "runs" / record.id / TRIALS).read_text())
        except (OSError, ValueError):
            return
        for t in trials if isinstance(trials, list) else ():
            if not isinstance(t, dict) or "trial_id" not in t:
                continue
            numbers = {k: t.get(k) for k in ("metric", "best_metric", "epochs", "planned_epochs", "time_s")}
            numbers["params"] = json.dumps(t.get("params") or {}, sort_keys=True)
            message = (
                f"trial {t['trial_id']}: {t.get('status')} after {t.get('epochs')} epoch(s), metric {t.get('metric')}"
            )
            if t.get("error"):
                message += f": {str(t['error'])[:500]}"
            level = "error" if t.get("status") == "failed" else "info"
            record.event(f"trial/{t['trial_id']}/{t.get('status')}", message, now, level=level, data=numbers)

    def _finish(self, record: JobRecord, ray_status: str, summary: dict[str, Any], now: float) -> None:
        stages = summary.get("stages") or {}
        register = stages.get("register") or {}
        if record.cancel_requested or (ray_status == "STOPPED" and record.status == "cancelled"):
            self._end(record, "cancelled", now)
        elif ray_status == "SUCCEEDED" and register.get("status") in ("done", "skipped") and register.get("version"):
            record.checkpoints = checkpoints(record, stages, now)
            self._end(record, "succeeded", now)
        else:
            failed = next((f"{n}: {s['error']}" for n, s in stages.items() if s.get("status") == "failed"), None)
            why = failed or (
                "stopped by someone other than this API (ray job stop)" if ray_status == "STOPPED" else
                f"the Ray job {record.submission_id} ended {ray_status} before the pipeline recorded a stage; see "
                f"`ray job logs {record.submission_id}`"
            )  # fmt: skip
            gate_failed = (stages.get("gate") or {}).get("status") == "failed"
            code = "gate_failed" if gate_failed else "pipeline_failed"
            why = gate_message(stages) if gate_failed else why
            # the server's own paths mean nothing to an API client (and are not theirs to see)
            why = why.replace(str(self.store.folder(record.id)) + "/", "")
            self._end(record, "failed", now, {"code": code, "message": why, "param": None})

    def _end(self, record: JobRecord, status: str, now: float, error: dict[str, Any] | None = None) -> None:
        record.status, record.error, record.finished_at = status, error, int(now)
        message = f"the job {status}" + (f": {error['message']}" if error else "")
        if status == "succeeded":
            message += f"; fine_tuned_model {record.fine_tuned_model} is served now"
        record.event(f"end/{status}", message, now, level="error" if error else "info")

    # ---- requests ---------------------------------------------------------------------------------------------
    def enqueue(self, record: JobRecord) -> JobRecord:
        """A new job whose dataset is held: ``queued``, started by the next tick when the bounds allow. Returns the
        job as it now is: one cancelled while its dataset was held (it is listed by then) stays cancelled."""
        with self.locked():
            current = self.store.load(record.id)
            if current is not None and current.status != "validating_files":
                return current
            record.status = "queued"
            record.event("queued", "files validated; the job is queued", self.clock())
            self.store.save(record)
            return record

    def cancel(self, job_id: str, tenant: str) -> JobRecord:
        """Cancel in any state: a queued job is never submitted; a submitted one is stopped (SIGTERM: the
        pipeline stops its trials and exits); an ended one is returned as it is (OpenAI answers the same).

        Raises:
            serving.tenants.NotFound: no such job for this tenant.
        """
        with self.locked():
            record = self.store.get(job_id, tenant)
            if record.status in TERMINAL:
                return record
            now = self.clock()
            if self._active(record):
                record.cancel_requested = True
                try:
                    self.submitter.stop(record.submission_id)
                except Exception as exc:  # noqa: BLE001 - recorded; the next tick sees how the Ray job ended
                    log.warning("fine-tuning job %s: stop failed (%s)", record.id, exc)
                record.event("cancel", "cancel requested: the Ray job was asked to stop", now, level="warn")
            self._end(record, "cancelled", now)
            self.store.save(record)
            return record


GATE_ADVICE = (
    "Nothing is served. To pass, train more (hyperparameters.n_epochs, learning_rate_multiplier) or leave them "
    '"auto" for a search, and make every caption name the concept with the trigger word; the stage evaluate event '
    "has every measured value."
)
LATENCY_ADVICE = (
    " latency_p95_s is the drawing time measured on the cluster while it ran: with other jobs running it can miss "
    "the operator's bound however good the adapter is; try again when the queue is shorter, or ask the operator."
)


def gate_message(stages: dict[str, Any]) -> str:
    """The job's ``error.message`` when the gate refused every candidate: each candidate's failed checks
    (``evaluate.candidates[].gate``, from ``evaluation.gate``), then what an API client can do about it — not the
    pipeline's operator advice (``lorafleet promote``, config overrides, report paths on the server)."""
    candidates = [c for c in (stages.get("evaluate") or {}).get("candidates") or [] if c.get("gate")]
    if not candidates:  # an older or partial summary: the gate stage's own words
        return f"gate: {(stages.get('gate') or {}).get('error') or 'the gate refused the adapter'}"
    checks = "; ".join(
        f"candidate {i} (trial {c.get('trial_id')}): {str(c['gate']).removeprefix('gate FAILED: ')}"
        for i, c in enumerate(candidates, 1)
    )
    advice = GATE_ADVICE + (LATENCY_ADVICE if "latency_p95_s" in checks else "")
    return f"gate: no adapter passed the gate — {checks}. {advice}"


def _when(value: Any, now: float) -> float:
    """A progress line's ``time`` when it is a plausible Unix time, else ``now`` (text, NaN or 1e400 is no time)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok and 0 < value < 1e11 else now


def epoch_message(line: dict[str, Any]) -> str:
    """``trial a1b2c3d4: epoch 3/8, train loss 0.1436, val_loss 0.1913`` from a progress line."""
    extra = {k: v for k, v in line.items() if k not in EPOCH_KEYS and isinstance(v, (int, float))}
    numbers = "".join(f", {k} {v:.4g}" for k, v in extra.items())
    loss = line.get("loss")
    loss_text = f", train loss {loss:.4g}" if isinstance(loss, (int, float)) else ""
    return f"trial {line.get('trial_id')}: epoch {line.get('epoch')}/{line.get('planned_epochs')}{loss_text}{numbers}"


EPOCH_KEYS = ("event", "trial_id", "epoch", "planned_epochs", "loss", "time_total_s", "time")


def epoch_data(line: dict[str, Any]) -> dict[str, Any]:
    """A ``metrics`` event's data: trial, epoch n of N, train_loss, the search metric, seconds so far."""
    extra = {k: v for k, v in line.items() if k not in EPOCH_KEYS}
    return {"trial_id": line.get("trial_id"), "epoch": line.get("epoch"), "total_epochs": line.get("planned_epochs"),
            "train_loss": line.get("loss"), **extra, "time_total_s": line.get("time_total_s")}  # fmt: skip


def caption_events(record: JobRecord, summary: dict[str, Any], now: float) -> None:
    """One event per caption the pipeline's caption stage wrote (it records at most 100 in pipeline.json), and a
    note of how many more there were."""
    stage = (summary.get("stages") or {}).get("caption") or {}
    shown = stage.get("captions") if isinstance(stage.get("captions"), list) else []
    for row in shown:
        if isinstance(row, dict) and "file" in row:
            record.event(f"caption/{row['file']}", f"caption {row['file']}: {row.get('caption')}", now,
                         data={"file": row["file"], "caption": row.get("caption")})  # fmt: skip
    if isinstance(stage.get("captioned"), int) and stage["captioned"] > len(shown):
        record.event("caption/more", f"and {stage['captioned'] - len(shown)} more image(s) captioned (not shown)", now)


def read_summary(job_folder: Path, name: str) -> dict[str, Any]:
    """The pipeline's ``pipeline.json`` for this job ({} while there is none, or while it is being rewritten)."""
    try:
        summary = json.loads((job_folder / "runs" / name / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(summary, dict):
        return {}
    stages = summary.get("stages")  # every reader takes a stage as an object: anything else is left out
    stages = {str(k): v for k, v in stages.items() if isinstance(v, dict)} if isinstance(stages, dict) else {}
    return summary | {"stages": stages}


def checkpoints(record: JobRecord, stages: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """OpenAI's ``fine_tuning.job.checkpoint`` for the registered adapter: ``<model>/<version>`` (a name
    ``/v1/images/generations`` accepts) with the best trial's search metric (val_loss in configs/tune.yaml) as
    ``valid_loss`` and its epochs as the step."""
    register, best = stages["register"], (stages.get("tune") or {}).get("best")
    best = best if isinstance(best, dict) else {}  # tuning/summary.py's best trial: value (the metric), epochs
    loss, step = best.get("value"), best.get("epochs") or 0
    return [{
        "id": f"ftckpt-{record.id.removeprefix('ftjob-')}", "object": "fine_tuning.job.checkpoint",
        "created_at": int(now), "fine_tuned_model_checkpoint": f"{register['model']}/{register['version']}",
        "fine_tuning_job_id": record.id, "step_number": int(step),
        "metrics": {"valid_loss": loss, "step": float(step)} if loss is not None else {"step": float(step)},
    }]  # fmt: skip
