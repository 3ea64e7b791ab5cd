"""Generation records: every request a generator replica answers, kept as an MLflow 3 trace, plus exact aggregates.

    recorder = recorder_for(args, on_drop=metrics.records_dropped)   # in Generator.__init__
    recorder.record(generation_record(req, ...))   # in Generator.generate: returns at once, never raises
    recorder.stats()                                # /admin/stats: written, dropped by reason, errors

Why a buffer and a thread: generation must never wait for MLflow nor fail because of it (issue 22). ``record`` takes
a lock for a few dict updates and a deque append; a full buffer drops the record (counted). One ``records`` thread
writes each sampled record as a trace through one worker with a deadline (``records.deadline_s``): a call that does
not finish in time, or fails, drops its record (counted) and the thread leaves MLflow alone for ``records.retry_s``
(records arriving meanwhile wait in the bounded buffer, then drop). A call still hanging when the next one is due is
not joined by a second: that record is dropped as ``sink_busy``, so threads and memory stay bounded while the server
is away. Each HTTP call is also limited by the replica's MLflow environment (``ServeArgs.registry_env``: retries,
timeout), set once per replica process.

The trace (MLflow's Traces view, ``mlflow.search_traces``): one root span named ``generation`` from the request's
arrival to its answer (so the trace's execution time is the latency), inputs = the request (prompt, negative
prompt, seed, steps, size, guidance, n), outputs = the answer (outcome, seeds, image ids, cached, images in the
UNet pass, queue wait). Searchable tags: ``model``, ``version`` ("" for none), ``tenant``, ``outcome``, ``cached``;
the request id is the trace's ``client_request_id``; the trace's request preview is the prompt (or its redaction).
Traces are built as entities and sent with ``mlflow.tracing.client.TracingClient(uri)`` — spans first
(``log_spans``, stored in the tracking database by MLflow >= 3.4 servers and ``sqlite:`` stores), then the trace
info (``start_trace``); stores that keep spans as artifacts get them uploaded. Nothing here sets MLflow's
process-global state (tracking URI, active experiment, the OpenTelemetry tracer provider), which the registry
resolver and any user code in the replica share: the fluent ``mlflow.start_span_no_context`` would export through
that global provider, to the global URI, with MLflow's own queue whose failures we could not count.

Aggregates per (model, version) are exact (every request, not only sampled ones): generations by outcome, cache
hits, the latency of the last ``latency_window`` successful answers (p50/p95). Every ``summary_every_s`` a replica
logs them as metrics on its own MLflow run in the records experiment (one run per model version per replica, tagged
``lorafleet.model``, ``lorafleet.version``, ``lorafleet.replica``; step = the summary's number). Why runs and not
model-version tags: a metric keeps its history (the UI plots it over time next to the version's evaluation run),
while a tag holds one string that each replica would overwrite. Additive across replicas: the counts are cumulative
per replica, so the fleet's figure is the sum of each replica run's last value (rates recomputed from the sums);
percentiles do not add, so the fleet's p50/p95 come from the traces at read time (``lorafleet generations``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import Field

from serving.production import Timeline, TopPrompts
from training.config import _Section

log = logging.getLogger(__name__)

TRACE_NAME = "generation"
SUMMARY_KIND = "production-summary"  # tag lorafleet.kind of the summary runs
MAX_VERSIONS = 1000  # (model, version) pairs a replica keeps figures for; more are counted under ("other", "")

# the feedback helper's summary shape: {"<model>": {"<version>": {"count": int, "positive": int, "mean": float|None}}}
Ratings = dict[str, dict[str, dict[str, Any]]]


class RecordsArgs(_Section):
    """``records`` in configs/serve.yaml: generation records (serving/records.py)."""

    enabled: bool = Field(True, description="record every generation (aggregates always; traces when a URI is set)")
    tracking_uri: str | None = Field(
        None, description="where the traces go; null = the app's tracking_uri / $MLFLOW_TRACKING_URI (none: no traces)"
    )
    experiment: str = Field("lorafleet-generations", min_length=1, description="MLflow experiment of the traces")
    sample_rate: float = Field(
        1.0, ge=0, le=1, description="share of requests written as traces, chosen by request id (all-or-nothing)"
    )
    redact_prompts: bool = Field(
        False, description="store prompts as 'sha256:<16 hex>/<chars>' instead of their text (aggregates unchanged)"
    )
    buffer_size: int = Field(1000, ge=1, le=1_000_000, description="records waiting to be written; more are dropped")
    flush_every_s: float = Field(1.0, gt=0, le=60, description="seconds between the writer thread's rounds")
    deadline_s: float = Field(
        5.0, gt=0, le=60, description="the longest one MLflow call may take before its record drops"
    )
    retry_s: float = Field(10.0, gt=0, le=3600, description="after a failed call, seconds before MLflow is tried again")
    summary_every_s: float = Field(
        300.0, ge=0, description="seconds between a replica's per-version summaries in MLflow (0: none)"
    )
    latency_window: int = Field(
        2048, ge=1, le=1_000_000, description="latencies kept per model version for p50/p95 (the most recent)"
    )


@dataclass
class GenerationRecord:
    """One answered request. Times are unix seconds; durations seconds; ``version`` "" when not from the registry."""

    time: float  # arrival at the replica (unix s)
    request_id: str
    tenant: str | None
    model: str  # the registered model when the adapter came from the registry, else the name served (base, a folder)
    version: str
    prompt: str  # the text, or redact(prompt) when records.redact_prompts
    negative_prompt: str
    seed: int | None  # the first image's seed (image i used seed + i)
    steps: int | None
    size: str | None  # "WxH"
    guidance: float | None
    n: int
    latency_s: float  # arrival to answer
    queue_wait_s: float | None  # arrival to the start of its UNet pass (None: never reached one)
    batch_images: int | None  # images in that pass
    outcome: str  # "ok", "cancelled" or the HTTP status ("400", "503", ...)
    seeds: list[int] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    cached: bool = False
    served_as: str = ""  # the name the request was answered under (champion, toy-sks-lora/3, a canary arm's name)


def redact(text: str) -> str:
    """A prompt as records keep it when ``records.redact_prompts``: ``sha256:<first 16 hex>/<length in chars>`` (equal
    prompts stay countable; the text cannot be read back)."""
    return "" if not text else f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}/{len(text)}"


def sampled(request_id: str, rate: float) -> bool:
    """Whether ``request_id`` is written as a trace at ``rate`` (0..1): the same id always gets the same answer, on
    every replica, so a retried request is recorded all-or-nothing."""
    if rate >= 1:
        return True
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def outcome_kind(outcome: str) -> str:
    """An outcome's kind: "ok", "cancelled", "rejected" (4xx: the request's fault), "error" (5xx: the server's)."""
    if outcome in ("ok", "cancelled"):
        return outcome
    return "rejected" if outcome.startswith("4") else "error"


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` (0..1) quantile by linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Aggregate:
    """Exact counts for one (model, version) on one replica."""

    def __init__(self, window: int):
        self.outcomes: Counter[str] = Counter()  # by outcome_kind
        self.cached = 0
        self.latencies: deque[float] = deque(maxlen=window)  # successful answers only

    def add(self, rec: GenerationRecord) -> None:
        kind = outcome_kind(rec.outcome)
        self.outcomes[kind] += 1
        self.cached += rec.cached
        if kind == "ok":
            self.latencies.append(rec.latency_s)

    def figures(self, rating: dict | None = None) -> dict[str, float]:
        """The summary's metrics: counts are cumulative since the replica started; rates are shares of all requests
        (``error_rate``: 5xx) or of successful ones (``cache_hit_rate``); latencies in seconds."""
        total = sum(self.outcomes.values())
        ok = self.outcomes["ok"]
        lat = list(self.latencies)
        out = {
            "generations": float(total),
            "ok": float(ok),
            "errors": float(self.outcomes["error"]),
            "rejected": float(self.outcomes["rejected"]),
            "cancelled": float(self.outcomes["cancelled"]),
            "cache_hits": float(self.cached),
            "error_rate": self.outcomes["error"] / total if total else 0.0,
            "cache_hit_rate": self.cached / ok if ok else 0.0,
        }
        if lat:
            out["latency_p50_s"], out["latency_p95_s"] = percentile(lat, 0.5), percentile(lat, 0.95)
        if rating and rating.get("count"):
            out["ratings"] = float(rating["count"])
            out["ratings_positive"] = float(rating.get("positive") or 0)
            if rating.get("mean") is not None:
                out["rating_mean"] = float(rating["mean"])
        return out


class Sink(Protocol):
    """Where records go. Each method may raise or hang; the recorder bounds and counts both."""

    def write(self, rec: GenerationRecord) -> None:
        """Store one record (``MlflowSink``: one trace)."""

    def summarize(self, rows: list[tuple[str, str, dict[str, float]]], step: int) -> None:
        """Store ``(model, version, Aggregate.figures)`` rows as summary number ``step`` (1, 2, ...)."""

    def finish(self) -> None:
        """The replica stops: end what ``summarize`` keeps open (``MlflowSink``: its summary runs, FINISHED)."""


class SinkBusy(RuntimeError):
    """The previous call to the sink has not returned yet (it hangs past its deadline)."""


class Recorder:
    """Takes records from request paths without blocking; one background thread hands them to ``sink``.

    Args:
        args: the ``records`` section.
        sink: where sampled records go (None: aggregates only, nothing written).
        ratings: returns the feedback summary (``Ratings``) for the periodic summary; None: no ratings in it.
        on_drop: called with (count, reason) for every dropped record (the replica's Prometheus counter).
        start: start the writer thread (tests drive ``flush_once`` themselves with False).
    """

    def __init__(
        self,
        args: RecordsArgs,
        sink: Sink | None,
        *,
        ratings: Callable[[], Ratings] | None = None,
        on_drop: Callable[[int, str], None] | None = None,
        start: bool = True,
    ):
        self.args, self.sink, self.ratings, self.on_drop = args, sink, ratings, on_drop
        self._lock = threading.Lock()
        self._buffer: deque[GenerationRecord] = deque()
        self._aggregates: dict[tuple[str, str], Aggregate] = {}
        self.timeline = Timeline()  # the /stats page's minute buckets (serving/production.py)
        self.prompts = TopPrompts()
        self.started = time.time()
        self.counts: Counter[str] = Counter()  # recorded, sampled_out, written, summaries, errors
        self.dropped: Counter[str] = Counter()  # by reason: buffer_full, sink_failed, sink_busy, closed
        self._logged: set[str] = set()  # kinds of failure already logged once
        self.last_error: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records-sink")
        self._inflight: Future | None = None
        self._down_until = 0.0  # time.monotonic() before which the sink is left alone
        self._summary_step = 0
        self._next_summary = time.monotonic() + args.summary_every_s
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        if start and sink is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="records")
            self._thread.start()

    # ---- request side: never blocks, never raises ------------------------------------------------------------
    def record(self, rec: GenerationRecord) -> None:
        """Count ``rec`` and queue it for the sink when sampled. Returns at once; never raises."""
        try:
            with self._lock:
                key = (rec.model, rec.version)
                if key not in self._aggregates and len(self._aggregates) >= MAX_VERSIONS:
                    key = ("other", "")  # bounded memory whatever names clients send
                agg = self._aggregates.get(key)
                if agg is None:
                    agg = self._aggregates[key] = Aggregate(self.args.latency_window)
                agg.add(rec)
                self.timeline.add(rec.time, rec.model, rec.outcome, rec.latency_s)
                if rec.prompt:
                    self.prompts.add(rec.prompt)
                self.counts["recorded"] += 1
                if self.sink is None:
                    return
                if not sampled(rec.request_id, self.args.sample_rate):
                    self.counts["sampled_out"] += 1
                    return
                if len(self._buffer) >= self.args.buffer_size:
                    full = True
                else:
                    self._buffer.append(rec)
                    full = False
            if full:
                self._drop(1, "buffer_full")
        except Exception as exc:  # noqa: BLE001 - recording never reaches the request
            self.failed("record", exc)

    # ---- writer side ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.args.flush_every_s):
            self.flush_once()

    def flush_once(self) -> None:
        """One round of the writer: the records buffered when it starts to the sink (or dropped), then the summary when
        due."""
        try:
            with self._lock:
                due = len(self._buffer)  # what arrives meanwhile waits for the next round (the summary is not starved)
            for _ in range(due):
                with self._lock:
                    if not self._buffer:
                        break
                    rec = self._buffer.popleft()
                if time.monotonic() < self._down_until:  # left alone for retry_s: back in front, try next round
                    with self._lock:
                        self._buffer.appendleft(rec)
                    break
                reason = self._call(self.sink.write, rec)
                if reason:
                    self._drop(1, reason)
                else:
                    with self._lock:
                        self.counts["written"] += 1
            if self.args.summary_every_s > 0 and time.monotonic() >= self._next_summary:
                self._next_summary = time.monotonic() + self.args.summary_every_s
                self.summarize()
        except Exception as exc:  # noqa: BLE001 - the writer thread must live on
            self.failed("flush", exc)

    def summarize(self) -> bool:
        """Send the per-version summary now (also called every ``summary_every_s``). Returns whether it was written."""
        rows = self.summary() if self.sink is not None else []
        if not rows or time.monotonic() < self._down_until:
            return False
        self._summary_step += 1
        table = [(r["model"], r["version"], r["metrics"]) for r in rows]
        if self._call(self.sink.summarize, table, self._summary_step):
            return False
        with self._lock:
            self.counts["summaries"] += 1
        return True

    def _call(self, fn: Callable[..., None], *args: Any) -> str | None:
        """``fn(*args)`` on the sink thread within ``deadline_s``; None when it returned, else the drop reason."""
        if self._inflight is not None and not self._inflight.done():
            self.failed("sink", SinkBusy(f"an MLflow call has been running for over {self.args.deadline_s:g} s"))
            self._down_until = time.monotonic() + self.args.retry_s  # the rest wait in the buffer meanwhile
            return "sink_busy"
        self._inflight = self._pool.submit(fn, *args)
        try:
            self._inflight.result(timeout=self.args.deadline_s)
            return None
        except FutureTimeout:
            self.failed("sink", TimeoutError(f"no answer within records.deadline_s={self.args.deadline_s:g} s"))
        except Exception as exc:  # noqa: BLE001 - whatever MLflow raised: counted, logged once
            self.failed("sink", exc)
        self._down_until = time.monotonic() + self.args.retry_s
        return "sink_failed"

    def _drop(self, count: int, reason: str) -> None:
        with self._lock:
            self.dropped[reason] += count
        if self.on_drop is not None:
            try:
                self.on_drop(count, reason)
            except Exception as exc:  # noqa: BLE001
                self.failed("metrics", exc)

    def failed(self, where: str, exc: BaseException) -> None:
        """Count a failure; log the first of each kind (where + exception type) with its message, later ones not."""
        kind = f"{where}:{type(exc).__name__}"
        with self._lock:
            self.counts["errors"] += 1
            self.last_error = f"{kind}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            log.warning("generation records: %s failed (%s: %s); later failures of this kind are only counted "
                        "(records.errors in /admin/stats)", where, type(exc).__name__, exc)  # fmt: skip

    # ---- state --------------------------------------------------------------------------------------------------
    def summary(self) -> list[dict]:
        """``[{"model", "version", "metrics": Aggregate.figures}]`` for every model version seen, with its rating
        from ``ratings()`` when given (a failing ``ratings`` leaves the rating out and counts an error)."""
        ratings: Ratings = {}
        if self.ratings is not None:
            try:
                ratings = self.ratings() or {}
            except Exception as exc:  # noqa: BLE001
                self.failed("ratings", exc)
        with self._lock:
            items = list(self._aggregates.items())
            return [
                {"model": m, "version": v, "metrics": agg.figures((ratings.get(m) or {}).get(v))}
                for (m, v), agg in items
            ]

    def production(self, latencies: int = 512) -> dict:
        """This replica's part of ``GET /admin/production`` (``serving.production.report`` merges the replicas):
        exact counts per model version with its last ``latencies`` successful latencies (s), the minute buckets and
        the prompt counts (redacted ones when ``records.redact_prompts``)."""
        with self._lock:
            versions = [
                {"model": m, "version": v, "counts": dict(agg.outcomes), "cache_hits": agg.cached,
                 "latencies": list(agg.latencies)[-latencies:]}
                for (m, v), agg in self._aggregates.items()
            ]  # fmt: skip
            return {"enabled": True, "uptime_s": round(time.time() - self.started, 1), "versions": versions,
                    "timeline": self.timeline.snapshot(), "prompts": self.prompts.top(100),
                    "redacted": self.args.redact_prompts}  # fmt: skip

    def stats(self) -> dict:
        """For ``/admin/stats``: counts, drops by reason, buffer fill, the last error and the per-version figures."""
        with self._lock:
            state = {
                "enabled": True,
                "sink": getattr(self.sink, "name", None) if self.sink is not None else None,
                "sample_rate": self.args.sample_rate,
                "buffered": len(self._buffer),
                "buffer_size": self.args.buffer_size,
                **{k: self.counts[k] for k in ("recorded", "sampled_out", "written", "summaries", "errors")},
                "dropped": dict(self.dropped),
                "dropped_total": sum(self.dropped.values()),
                "sink_down_for_s": round(max(0.0, self._down_until - time.monotonic()), 1),
                "last_error": self.last_error,
            }
        state["versions"] = {f"{r['model']}/{r['version'] or '-'}": r["metrics"] for r in self.summary()}
        return state

    def close(self, flush_s: float = 0.0) -> None:
        """Stop the writer; with ``flush_s`` > 0 first give it that long to write what is buffered. Then, unless the
        sink is down, the last summary (when ``summary_every_s`` > 0) and ``sink.finish`` (the summary runs end
        FINISHED, not left RUNNING), each within ``deadline_s``. Best effort: Serve's ``graceful_shutdown_timeout_s``
        may end the replica first, and its runs then stay RUNNING. Never raises; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if flush_s > 0 and self.sink is not None:
            end = time.monotonic() + flush_s
            while self._buffer and time.monotonic() < end:
                self.flush_once()
        self._stop.set()
        with self._lock:
            left = len(self._buffer)
            self._buffer.clear()
        if left:
            self._drop(left, "closed")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.args.deadline_s + 1)  # its round ends at the empty buffer
        finish = getattr(self.sink, "finish", None)
        if finish is not None and not (self._thread is not None and self._thread.is_alive()):
            try:
                if self.args.summary_every_s > 0:
                    self.summarize()
                if time.monotonic() >= self._down_until:  # not after a failed summary: the sink is down
                    self._call(finish)
            except Exception as exc:  # noqa: BLE001 - closing never raises (it runs in __del__)
                self.failed("close", exc)
        self._pool.shutdown(wait=False, cancel_futures=True)


class NullRecorder:
    """``records.enabled: false``: the recorder's face, doing nothing."""

    def record(self, rec: GenerationRecord) -> None:
        """Nothing."""

    def failed(self, where: str, exc: BaseException) -> None:
        """Nothing (records are off)."""

    def stats(self) -> dict:
        """``{"enabled": False}``."""
        return {"enabled": False}

    def production(self) -> dict:
        """No figures: ``/stats`` says records are off."""
        return {"enabled": False, "versions": [], "timeline": [], "prompts": [], "redacted": False}

    def close(self, flush_s: float = 0.0) -> None:
        """Nothing."""


# ---- the MLflow sink ----------------------------------------------------------------------------------------------
def trace_parts(rec: GenerationRecord, experiment_id: str):
    """``rec`` as an MLflow trace: ``(TraceInfo, [root Span])``, built as entities (no global tracer involved).

    The span's OpenTelemetry attributes follow MLflow's own encoding (``mlflow.entities.Span``: JSON values under
    ``mlflow.traceRequestId``, ``mlflow.spanInputs``, ``mlflow.spanOutputs``, ``mlflow.spanType``)."""
    from mlflow.entities import Span, TraceInfo, TraceLocation, TraceState
    from mlflow.tracing.constant import TRACE_SCHEMA_VERSION, TRACE_SCHEMA_VERSION_KEY, SpanAttributeKey, TraceTagKey
    from mlflow.tracing.utils import generate_mlflow_trace_id_from_otel_trace_id
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

    otel_trace_id, span_id = random.getrandbits(128) or 1, random.getrandbits(64) or 1
    trace_id = generate_mlflow_trace_id_from_otel_trace_id(otel_trace_id)
    start_ns = int(rec.time * 1e9)
    end_ns = start_ns + max(0, int(rec.latency_s * 1e9))
    inputs = {"prompt": rec.prompt, "negative_prompt": rec.negative_prompt, "model": rec.model, "n": rec.n,
              "seed": rec.seed, "steps": rec.steps, "size": rec.size, "guidance": rec.guidance}  # fmt: skip
    outputs = {"outcome": rec.outcome, "seeds": rec.seeds, "image_ids": rec.image_ids, "cached": rec.cached,
               "batch_images": rec.batch_images, "queue_wait_s": rec.queue_wait_s}  # fmt: skip
    ok = rec.outcome == "ok"
    attributes = {
        SpanAttributeKey.REQUEST_ID: json.dumps(trace_id),
        SpanAttributeKey.SPAN_TYPE: json.dumps("UNKNOWN"),
        SpanAttributeKey.INPUTS: json.dumps(inputs),
        SpanAttributeKey.OUTPUTS: json.dumps(outputs),
        "lorafleet.queue_wait_s": json.dumps(rec.queue_wait_s),
        "lorafleet.batch_images": json.dumps(rec.batch_images),
    }
    status = Status(StatusCode.OK) if ok else Status(StatusCode.ERROR, rec.outcome)
    otel = ReadableSpan(
        name=TRACE_NAME,
        context=SpanContext(otel_trace_id, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)),
        parent=None,
        start_time=start_ns,
        end_time=end_ns,
        attributes=attributes,
        status=status,
        resource=Resource.get_empty(),
    )
    tags = {
        TraceTagKey.TRACE_NAME: TRACE_NAME,
        "model": rec.model,
        "version": rec.version,
        "served_as": rec.served_as or rec.model,
        "tenant": rec.tenant or "",
        "outcome": rec.outcome,
        "cached": str(rec.cached).lower(),
    }
    info = TraceInfo(
        trace_id=trace_id,
        trace_location=TraceLocation.from_experiment_id(experiment_id),
        request_time=start_ns // 1_000_000,
        execution_duration=(end_ns - start_ns) // 1_000_000,
        state=TraceState.OK if ok else TraceState.ERROR,
        client_request_id=rec.request_id,
        request_preview=rec.prompt[:1000],
        response_preview=json.dumps({"outcome": rec.outcome, "image_ids": rec.image_ids})[:1000],
        trace_metadata={TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION), "lorafleet.replica": replica_id()},
        tags=tags,
    )
    return info, [Span(otel)]


def replica_id() -> str:
    """This process as a summary run's key: ``<host>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


class MlflowSink:
    """Writes records as traces and summaries as run metrics to one tracking URI, with clients of its own.

    Args:
        uri: the tracking URI (``http(s)://`` server or ``sqlite:``); nothing is contacted until the first write.
        experiment: the experiment's name (created on first use).
    """

    def __init__(self, uri: str, experiment: str):
        from serving.registry_watch import shown_uri

        self.uri, self.experiment = uri, experiment
        self.name = f"mlflow {shown_uri(uri)} experiment {experiment}"
        self._experiment_id: str | None = None
        self._runs: dict[tuple[str, str], str] = {}  # (model, version) -> this replica's summary run
        self._client = self._tracing = None

    def _clients(self):
        if self._client is None:
            from mlflow import MlflowClient
            from mlflow.tracing.client import TracingClient

            self._client, self._tracing = MlflowClient(self.uri), TracingClient(self.uri)
        return self._client, self._tracing

    def experiment_id(self) -> str:
        """The experiment's id, created when missing (a concurrent creator's experiment is used instead)."""
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            client, _ = self._clients()
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = client.create_experiment(self.experiment)
                except MlflowException:  # another replica created it first
                    self._experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def write(self, rec: GenerationRecord) -> None:
        """One record as one trace. Raises whatever MLflow raises (the recorder counts it)."""
        from mlflow.entities import TraceData
        from mlflow.tracing.constant import SpansLocation, TraceTagKey

        eid = self.experiment_id()
        info, spans = trace_parts(rec, eid)
        _, tracing = self._clients()
        with contextlib.suppress(NotImplementedError):  # a store without span logging (file store, server < 3.4)
            tracing.log_spans(eid, spans)  # then the spans go to the trace's artifacts below
        returned = tracing.start_trace(info)
        if returned.tags.get(TraceTagKey.SPANS_LOCATION) != SpansLocation.TRACKING_STORE.value:
            tracing._upload_trace_data(returned, TraceData(spans=spans))  # what MLflow's own exporter does then

    def summarize(self, rows: list[tuple[str, str, dict[str, float]]], step: int) -> None:
        """Each (model, version, metrics) as metrics at ``step`` on this replica's run for that version."""
        from mlflow.entities import Metric

        client, _ = self._clients()
        now = int(time.time() * 1000)
        for model, version, figures in rows:
            run_id = self._runs.get((model, version))
            if run_id is None:
                tags = {"lorafleet.kind": SUMMARY_KIND, "lorafleet.model": model, "lorafleet.version": version,
                        "lorafleet.replica": replica_id()}  # fmt: skip
                name = f"production {model} v{version or '-'} {replica_id()}"
                run_id = client.create_run(self.experiment_id(), tags=tags, run_name=name).info.run_id
                self._runs[(model, version)] = run_id
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in figures.items()])

    def finish(self) -> None:
        """End this replica's summary runs (status FINISHED); the next ``summarize`` starts new ones. Raises whatever
        MLflow raises (the runs not ended yet stay listed)."""
        if not self._runs:
            return
        client, _ = self._clients()
        for key, run_id in list(self._runs.items()):
            client.set_terminated(run_id)
            del self._runs[key]


def rating_rows(ratings: Ratings) -> list[tuple[str, str, dict[str, float]]]:
    """The feedback summary as summary rows (``MlflowSink.summarize``): per (model, version — "" for the feedback's
    "none") the metrics ``ratings``, ``ratings_positive`` and ``rating_mean`` (on the feedback scale)."""
    rows = []
    for model, versions in sorted(ratings.items()):
        for version, r in sorted(versions.items()):
            if not r.get("count"):
                continue
            figures = {"ratings": float(r["count"]), "ratings_positive": float(r.get("positive") or 0)}
            if r.get("mean") is not None:
                figures["rating_mean"] = float(r["mean"])
            rows.append((model, "" if version == "none" else version, figures))
    return rows


def recorder_for(
    args: Any,
    *,
    ratings: Callable[[], Ratings] | None = None,
    on_drop: Callable[[int, str], None] | None = None,
) -> Recorder | NullRecorder:
    """The recorder a replica runs with, from ``ServeArgs`` (its ``records`` section and tracking URI)."""
    r: RecordsArgs = args.records
    if not r.enabled:
        return NullRecorder()
    uri = r.tracking_uri or args.resolved_tracking_uri()
    sink = MlflowSink(uri, r.experiment) if uri else None
    return Recorder(r, sink, ratings=ratings, on_drop=on_drop)


def generation_record(
    req: Any,
    model: str,
    prepared: Any | None,
    out: dict | None,
    outcome: str,
    *,
    arrived: float,
    latency_s: float,
    queue_wait_s: float | None = None,
    batch_images: int | None = None,
    redact_prompts: bool = False,
) -> GenerationRecord:
    """The record of one request from what ``Generator.generate`` saw: ``req`` (``serving.engine.ImageRequest``),
    ``prepared`` (``serving.engine.Prepared``, None when preparing failed), ``out`` (the answer dict, None when the
    caller went away); ``arrived`` unix s."""
    out = out or {}
    adapter = getattr(prepared, "adapter", None)
    version = out.get("version") or getattr(adapter, "version", None) or ""
    if prepared is not None:
        seed, steps, guidance = prepared.seed, prepared.steps, prepared.guidance
        size = f"{prepared.width}x{prepared.height}"
    else:
        seed, steps, guidance = req.seed, req.steps, req.guidance
        size = f"{req.width}x{req.height}" if req.width and req.height else None
    prompt, negative = str(req.prompt or ""), str(req.negative_prompt or "")
    if redact_prompts:
        prompt, negative = redact(prompt), redact(negative)
    return GenerationRecord(
        time=arrived,
        request_id=req.request_id,
        tenant=getattr(req.tenant, "name", None),
        model=out.get("registered_model") or getattr(adapter, "registered", None) or out.get("model") or model,
        served_as=out.get("model") or model,
        version=str(version),
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=steps,
        size=out.get("size") or size,
        guidance=guidance,
        n=req.n,
        latency_s=latency_s,
        queue_wait_s=queue_wait_s,
        batch_images=batch_images,
        outcome=outcome,
        seeds=list(out.get("seeds") or []),
        image_ids=list(out.get("image_ids") or []),
        cached=bool(out.get("cached", False)),
    )
