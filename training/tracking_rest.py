"""The few calls a tracker makes into one MLflow run, each with its own retry and timeout limits.

MLflow's client reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_BACKOFF_FACTOR`` / ``_TIMEOUT`` from the environment at
every request (``mlflow.utils.rest_utils.http_request``): one setting for the whole process, whose defaults (7
retries, backoff factor 2, 120 s timeout) hold a call to a server that is down for minutes. Changing the environment
around a call would also change it for every other thread (MLflow's system-metrics thread, Ray's threads). But
``http_request`` takes the same limits as arguments, so ``RunRest`` calls MLflow's REST API for its run with
``RequestLimits`` of its own — MLflow's HTTP code, auth and JSON encoding, no environment written:

    rest = RunRest("http://127.0.0.1:5000", run_id, RequestLimits(max_retries=1, timeout_s=10))
    rest.log_batch(metrics=[Metric("loss", 0.5, ts, 1)])      # raises MlflowException when the server fails

Endpoints: https://mlflow.org/docs/latest/api_reference/rest-api.html (``runs/log-batch``, ``runs/set-tag``,
``runs/update``, ``runs/get``). Other tracking URIs (``sqlite:``, ``file:``, ``databricks``) go through
``MlflowClient`` (``ClientRun``): no HTTP of ours to limit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

API = "/api/2.0/mlflow"


@dataclass(frozen=True)
class RequestLimits:
    """How long one tracking call may hold the caller (urllib3 retries under MLflow's ``http_request``)."""

    max_retries: int = 1  # one quick retry: a server that restarts answers the next call instead
    backoff_factor: float = 1.0  # urllib3 sleeps factor × 2^(n-1) s before retry n ≥ 2 (none before the first)
    backoff_jitter: float = 1.0  # up to this many seconds added to each such sleep
    timeout_s: float = 10.0  # requests' connect timeout and, separately, its read timeout

    @classmethod
    def from_env(cls) -> RequestLimits:
        """The quick defaults, except where the user set ``MLFLOW_HTTP_REQUEST_*`` explicitly (read, never
        written): an explicit setting wins, as it did for every MLflow call."""
        from mlflow.environment_variables import (
            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
            MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES,
            MLFLOW_HTTP_REQUEST_TIMEOUT,
        )

        quick = cls()
        pick = [(MLFLOW_HTTP_REQUEST_MAX_RETRIES, quick.max_retries),
                (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, quick.backoff_factor),
                (MLFLOW_HTTP_REQUEST_BACKOFF_JITTER, quick.backoff_jitter),
                (MLFLOW_HTTP_REQUEST_TIMEOUT, quick.timeout_s)]  # fmt: skip
        return cls(*(var.get() if var.is_set() else default for var, default in pick))

    def call_bound_s(self) -> float:
        """Seconds one call may take at most against a server that accepts connections and never answers:
        every attempt waits out its connect and read timeouts, plus urllib3's capped backoff between attempts.
        (A server that drips bytes slower than the read timeout could hold a read longer; MLflow's servers don't.)"""
        sleeps = sum(min(self.backoff_factor * 2 ** (n - 1), 120.0) + self.backoff_jitter
                     for n in range(2, self.max_retries + 1))  # fmt: skip
        return (self.max_retries + 1) * 2 * self.timeout_s + sleeps


class RunRest:
    """MLflow's REST API for one run on an ``http(s)://`` tracking server, with this object's ``RequestLimits``.

    Every method raises ``mlflow.exceptions.MlflowException`` when the server fails or cannot be reached."""

    def __init__(self, uri: str, run_id: str, limits: RequestLimits):
        from mlflow.utils.credentials import get_default_host_creds

        self.run_id, self.limits = run_id, limits
        self.creds = get_default_host_creds(uri)  # MLFLOW_TRACKING_USERNAME/_TOKEN/_INSECURE_TLS…, as MlflowClient

    def _call(self, endpoint: str, method: str, message: Any = None, params: dict | None = None) -> dict:
        import json

        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        body = {"json": json.loads(message_to_json(message))} if message is not None else {"params": params}
        lim = self.limits
        response = http_request(
            self.creds, f"{API}/{endpoint}", method,
            max_retries=lim.max_retries, backoff_factor=lim.backoff_factor, backoff_jitter=lim.backoff_jitter,
            timeout=lim.timeout_s, respect_retry_after_header=False,  # a 503's Retry-After could say an hour
            **body,
        )  # fmt: skip
        return verify_rest_response(response, endpoint).json()

    def log_batch(self, metrics: Sequence = (), params: Sequence = (), tags: Sequence = ()) -> None:
        """``mlflow.entities`` Metric / Param / RunTag lists, within MLflow's batch limits (1000 / 100 / 100)."""
        from mlflow.protos.service_pb2 import LogBatch

        protos = {"metrics": [m.to_proto() for m in metrics], "params": [p.to_proto() for p in params],
                  "tags": [t.to_proto() for t in tags]}  # fmt: skip
        self._call("runs/log-batch", "POST", LogBatch(run_id=self.run_id, **protos))

    def set_tag(self, key: str, value: str) -> None:
        from mlflow.protos.service_pb2 import SetTag

        self._call("runs/set-tag", "POST", SetTag(run_id=self.run_id, run_uuid=self.run_id, key=key, value=value))

    def set_terminated(self, status: str) -> None:
        """End the run: ``status`` is FINISHED, FAILED or KILLED (``mlflow.entities.RunStatus``)."""
        from mlflow.entities import RunStatus
        from mlflow.protos.service_pb2 import UpdateRun

        update = UpdateRun(run_id=self.run_id, run_uuid=self.run_id, status=RunStatus.from_string(status),
                           end_time=int(time.time() * 1000))  # fmt: skip
        self._call("runs/update", "POST", update)

    def ping(self) -> None:
        """One limited ``runs/get`` of this run: raises when the server does not answer for it."""
        self._call("runs/get", "GET", params={"run_id": self.run_id})


class ClientRun:
    """The same four calls through ``MlflowClient``, for tracking URIs that are not an HTTP server."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def log_batch(self, metrics: Sequence = (), params: Sequence = (), tags: Sequence = ()) -> None:
        self.client.log_batch(self.run_id, metrics=list(metrics), params=list(params), tags=list(tags))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def set_terminated(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def ping(self) -> None:
        self.client.get_run(self.run_id)


def run_calls(client: Any, uri: str, run_id: str, limits: RequestLimits) -> RunRest | ClientRun:
    """``RunRest`` for an ``http(s)://`` server (limited calls), else ``ClientRun`` over ``client``."""
    return RunRest(uri, run_id, limits) if uri.startswith(("http://", "https://")) else ClientRun(client, run_id)


def tracking_problem(uri: str, limits: RequestLimits | None = None) -> str | None:
    """Why the MLflow server at ``uri`` cannot be used now, or None when it answers: one limited request
    (``experiments/get-by-name``; any answer but a failing 5xx counts) before a command line tool makes
    ``MlflowClient`` calls, whose default retries (7, backoff factor 2, 120 s timeout) hold an unreachable server for
    minutes. ``limits``: default ``RequestLimits.from_env()`` (at most ``call_bound_s()`` seconds). URIs that are not
    ``http(s)://`` are not checked here (None): ``MlflowClient`` fails on them at once.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    lim = limits or RequestLimits.from_env()
    try:
        http_request(
            get_default_host_creds(uri), f"{API}/experiments/get-by-name", "GET",
            max_retries=lim.max_retries, backoff_factor=lim.backoff_factor, backoff_jitter=lim.backoff_jitter,
            timeout=lim.timeout_s, respect_retry_after_header=False, params={"experiment_name": "lorafleet-probe"},
        )  # fmt: skip
    except (MlflowException, OSError) as exc:
        first = (getattr(exc, "message", None) or str(exc)).splitlines()[0][:300]
        return (f"the MLflow tracking server at {uri} did not answer ({first}): start it (lorafleet up, or "
                "mlflow server) or pass the right --tracking-uri / $MLFLOW_TRACKING_URI")  # fmt: skip
    return None
