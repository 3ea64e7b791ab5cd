"""One replica's calls to the MLflow registry, each on a worker thread with a deadline, and what they said.

A registry that is down must never stall serving (issue 22: with the tracking server stopped, ``GET /v1/models``
waited for the proxy's 120 s timeout and a base-model request timed out behind champion look-ups that held the
event loop's thread pool). So every registry call of a replica — an alias look-up, the catalog listing, an adapter
download — runs here, on the ``registry`` threads, never on a request's thread:

    watch = RegistryWatch("http://127.0.0.1:5000", deadline_s=5, retry_s=5)
    future = watch.submit(client.get_model_version_by_alias, "toy-sks-lora", "champion")
    watch.wait(future)        # the answer, or RegistryTimeout after deadline_s (the call goes on in the background)
    watch.down()              # True while the last call failed: request paths answer 503 at once instead of waiting
    watch.health()            # {"uri", "reachable", "last_ok_age_s", "last_error", ...} for /readyz and /admin/stats

A failure is a call that could not reach the registry (connection refused, no answer, an HTTP 5xx after MLflow's
own retries) or that the registry refused for this replica's credentials (HTTP 401/403: told apart in messages
and ``health()``, since waiting will not help — the Serve app needs ``MLFLOW_TRACKING_TOKEN`` or
``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``); an answer that a name is missing is a success (the registry
answered). MLflow's HTTP retries are set once per replica process at start (``ServeArgs.registry_env``), so a
single call ends after about ``registry_retries`` tries; the deadline here bounds what a caller waits even when a
call hangs (a host that drops packets instead of refusing them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

log = logging.getLogger(__name__)


class RegistryTimeout(TimeoutError):
    """The registry did not answer within the deadline (the call goes on in the background)."""


def reached_registry(exc: BaseException) -> bool:
    """Whether ``exc`` came from a registry that answered (a missing name, a refused adapter), not from one that
    could not be reached. Sources: ``evaluation.registry`` (``NotInRegistry``, ``RegistryError``), MLflow's
    ``MlflowException.error_code`` (``RESOURCE_DOES_NOT_EXIST``, ``INVALID_PARAMETER_VALUE`` for a missing alias)."""
    from mlflow.exceptions import MlflowException

    from evaluation.registry import MISSING_CODES, NotInRegistry, RegistryError
    from training.adapter_meta import AdapterError

    if isinstance(exc, (NotInRegistry, AdapterError, LookupError)):  # LookupError: serving's UnknownModel
        return True
    if isinstance(exc, MlflowException):
        return exc.error_code in MISSING_CODES
    if isinstance(exc, RegistryError):  # a wrapped download error: missing artifacts are an answer, too
        cause = exc.__cause__
        return cause is not None and cause is not exc and reached_registry(cause)
    return not isinstance(exc, (OSError, TimeoutError, RuntimeError))


CREDENTIAL_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")  # MLflow's error codes for HTTP 401 / 403


def refused_credentials(exc: BaseException) -> bool:
    """Whether the registry answered ``exc`` by refusing the caller's credentials (HTTP 401/403: MLflow's
    ``UNAUTHENTICATED``/``PERMISSION_DENIED`` error codes, ``mlflow.utils.rest_utils.verify_rest_response``),
    also when wrapped in ``evaluation.registry.RegistryError``."""
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MlflowException):
            return exc.error_code in CREDENTIAL_CODES
        exc = exc.__cause__
    return False


def shown_uri(uri: str) -> str:
    """``uri`` as clients and logs may see it: without ``user:password@`` (``http://u:p@host`` → ``http://host``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


class RegistryWatch:
    """Runs registry calls on ``workers`` threads and remembers the last outcome. Thread-safe.

    Args:
        uri: the tracking/registry URI (named in every message a client gets while it is down).
        deadline_s: the longest ``wait`` waits for one call.
        retry_s: while the registry is down, how often a replica tries it again (also the ``Retry-After`` a client
            gets for a name only the registry can resolve).
        workers: threads for registry calls (a download and a look-up at once; more would only queue on the server).
    """

    def __init__(self, uri: str | None, deadline_s: float = 5.0, retry_s: float = 5.0, workers: int = 2):
        self.uri = shown_uri(uri)  # in messages, /admin/stats and logs: never the credentials
        self.deadline_s = deadline_s
        self.retry_s = retry_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="registry")
        self._lock = threading.Lock()
        self._ok_at: float | None = None  # time.time() of the last answer
        self._error_at: float | None = None  # time.time() of the last failure
        self._tried_at = float("-inf")  # time.monotonic() of the last call started
        self.error: str | None = None  # the last failure, one line
        self.failures = 0  # calls that failed since the last answer
        self.refused = False  # the last failure was the registry refusing this replica's credentials (401/403)

    # ---- calls ----------------------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Start ``fn(*args)`` on a registry thread; its outcome updates ``down()`` and ``health()``."""
        with self._lock:
            self._tried_at = time.monotonic()
        future = self._pool.submit(self._run, fn, *args)
        future.submitted_at = time.time()  # type: ignore[attr-defined]  # for timed_out: did others answer since?
        return future

    def wait(self, future: Future, deadline_s: float | None = None) -> Any:
        """``future``'s result within ``deadline_s`` (default ``self.deadline_s``).

        Raises:
            RegistryTimeout: no answer in time (recorded as a failure; the call goes on and may still fill a cache).
            Exception: whatever the call raised.
        """
        limit = self.deadline_s if deadline_s is None else deadline_s
        since = getattr(future, "submitted_at", time.time())
        try:
            return future.result(timeout=limit)
        except FutureTimeout as exc:
            self.timed_out(limit, since)
            raise RegistryTimeout(f"the registry at {self.uri} did not answer within {limit:g} s") from exc

    def timed_out(self, seconds: float, since: float | None = None) -> None:
        """A caller waited ``seconds`` for a call that has not answered: recorded as a failure (``down()``) unless
        another call answered after this one began (``since``, ``time.time()``): the registry is up, only this call
        is slow (a large download, a long listing)."""
        with self._lock:
            if since is not None and self._ok_at is not None and self._ok_at >= since:
                return
        self._failed(f"no answer within {seconds:g} s")

    def call(self, fn: Callable[..., Any], *args: Any, deadline_s: float | None = None) -> Any:
        """``fn(*args)`` on a registry thread, waited for at most ``deadline_s``; see ``wait``."""
        return self.wait(self.submit(fn, *args), deadline_s)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            out = fn(*args)
        except BaseException as exc:
            if reached_registry(exc):
                self._answered()
            elif refused_credentials(exc):
                self._failed(
                    f"refused this replica's credentials ({str(exc).splitlines()[0][:200]}): give the Serve app "
                    "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (runtime_env "
                    "env_vars) that the registry accepts", refused=True,
                )  # fmt: skip
            else:
                self._failed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            raise
        self._answered()
        return out

    def _answered(self) -> None:
        with self._lock:
            if self.failures:
                log.info("the registry at %s answers again after %d failed calls", self.uri, self.failures)
            self._ok_at, self.failures, self.refused = time.time(), 0, False

    def _failed(self, why: str, refused: bool = False) -> None:
        with self._lock:
            self._error_at, self.error, self.refused = time.time(), why, refused
            self.failures += 1
        log.warning("registry call to %s failed: %s", self.uri, why)

    # ---- state ----------------------------------------------------------------------------------------------
    def down(self) -> bool:
        """Whether the last outcome was a failure (no answer since)."""
        with self._lock:
            return self._down()

    def may_retry(self) -> bool:
        """Whether a background call may be started now: always while the registry answers, at most once per
        ``retry_s`` while it is down (a replica does not pile calls onto a server that is away)."""
        with self._lock:
            return not self._down() or time.monotonic() - self._tried_at >= self.retry_s

    def _down(self) -> bool:  # under self._lock
        return self._error_at is not None and (self._ok_at is None or self._error_at > self._ok_at)

    def problem(self) -> str:
        """What is wrong with the registry, for a client's 503: "does not answer", or that it refuses this server's
        credentials (no operator detail: that is in the log and ``health()``)."""
        with self._lock:
            refused = self.refused and self._down()
        return "refuses this server's credentials (HTTP 401/403)" if refused else "does not answer"

    def retry_after_s(self) -> int:
        """Seconds a client should wait before asking again for a name only the registry can resolve."""
        return max(1, round(self.retry_s))

    def health(self) -> dict:
        """The registry as this replica last saw it (for ``/readyz`` details and ``/admin/stats``)."""
        now = time.time()
        with self._lock:
            return {
                "uri": self.uri,
                "reachable": None if self._ok_at is None and self._error_at is None else not self._down(),
                "last_ok_age_s": None if self._ok_at is None else round(now - self._ok_at, 1),
                "last_error": self.error if self._down() else None,
                "last_error_age_s": None if self._error_at is None else round(now - self._error_at, 1),
                "failures": self.failures,
                "refused_credentials": self.refused and self._down(),
            }

    def close(self) -> None:
        """Stop taking calls; a call in progress ends on its own (after MLflow's retries, ``registry_env``)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
