"""The SDK's fine-tuning jobs: ``Job`` (from ``Client``) and ``AsyncJob`` (from ``AsyncClient``).

    job = client.fine_tune(training_file=file.id, suffix="my-style", hyperparameters={"n_epochs": 16}, trigger="sks")
    job.wait(timeout=3600)        # a tqdm bar: status and stage; each event printed as it arrives
    job.fine_tuned_model          # 'default--my-style': /v1/images/generations serves it at once
    for event in job.events():    # every page, newest first (OpenAI's order): dicts with id, level, message, data
        ...

A job's fields are OpenAI's ``fine_tuning.job`` (``job.status``, ``job.error``, ``job.seed`` …; the whole object in
``job.data``), as of the last ``refresh()``. ``wait`` returns the job once it ``succeeded``; it raises ``JobFailed``
(``error.message``: the failed stage's message, e.g. the gate's reasons; ``code``: ``gate_failed``,
``pipeline_failed`` …), ``JobCancelled``, or ``JobTimeout`` (a ``TimeoutError`` naming the job id; the job goes
on). An unreachable server is polled again until the timeout; other request errors
(``serving.client_errors.LorafleetError``) pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from serving.client_errors import ServerBusy

if TYPE_CHECKING:
    from serving.client import AsyncClient, Client

TERMINAL = ("succeeded", "failed", "cancelled")
ROUTE = "/v1/fine_tuning/jobs"


class JobError(Exception):
    """A fine-tuning job ended other than ``succeeded``; ``job`` is it, as last seen."""

    def __init__(self, job: Job | AsyncJob, message: str):
        super().__init__(message)
        self.job = job


class JobFailed(JobError):
    """The job ``failed``: ``code`` (``gate_failed``, ``pipeline_failed``, ``submit_failed`` …) and ``reason``
    (the server's ``error.message``: the failed stage's message, e.g. the gate's numbers)."""

    def __init__(self, job: Job | AsyncJob):
        error = job.error or {}
        self.code, self.reason = error.get("code"), error.get("message") or "no reason given"
        super().__init__(job, f"fine-tuning job {job.id} failed ({self.code}): {self.reason}")


class JobCancelled(JobError):
    """The job was ``cancelled`` (by this client or another)."""

    def __init__(self, job: Job | AsyncJob):
        super().__init__(job, f"fine-tuning job {job.id} was cancelled")


class JobTimeout(TimeoutError):
    """``wait`` ran out of time; the job goes on (``job.wait()`` again, or ``job.cancel()``)."""

    def __init__(self, job: Job | AsyncJob, timeout: float):
        super().__init__(
            f"fine-tuning job {job.id} is still {job.status} after {timeout:g} s; wait again, or cancel it"
        )
        self.job = job


class _JobBase:
    """What ``Job`` and ``AsyncJob`` share: the fields, the events already shown, the end of ``wait``."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self._seen: set[str] = set()  # ids of events wait() has shown

    def __getattr__(self, name: str) -> Any:  # OpenAI's other fields: job.seed, job.hyperparameters, …
        data = self.__dict__.get("data") or {}
        if name in data:
            return data[name]
        raise AttributeError(f"a fine-tuning job has no field {name!r}")

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def status(self) -> str:
        """``validating_files``, ``queued``, ``running``, ``succeeded``, ``failed`` or ``cancelled``."""
        return self.data["status"]

    @property
    def fine_tuned_model(self) -> str | None:
        """The served model's name once the job succeeded (``/v1/images/generations``' ``model``), else None."""
        return self.data.get("fine_tuned_model")

    @property
    def error(self) -> dict[str, Any] | None:
        """OpenAI's error object (``code``, ``message``, ``param``) of a failed job, else None."""
        return self.data.get("error")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id!r}, status={self.status!r}, fine_tuned_model={self.fine_tuned_model!r})"
        )

    def _unseen(self, newest_first: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events not shown yet, oldest first (``newest_first`` stops at the first one shown before)."""
        new = list(reversed(newest_first))
        self._seen.update(e["id"] for e in new)
        return new

    def _outcome(self) -> bool:
        """True once the job succeeded; raises JobFailed / JobCancelled; False while it has not ended."""
        if self.status == "failed":
            raise JobFailed(self)
        if self.status == "cancelled":
            raise JobCancelled(self)
        return self.status == "succeeded"


class _Progress:
    """``wait``'s tqdm bar: one step per event; the description is the status, the postfix the last stage seen."""

    def __init__(self, job: _JobBase, show: bool):
        self.on = show
        self.bar = tqdm(desc=f"{job.id} {job.status}", unit=" events", disable=not show, dynamic_ncols=True)

    def show(self, job: _JobBase, events: list[dict[str, Any]]) -> None:
        if not self.on:
            return
        for event in events:  # above the bar, on its stream (stderr): stdout stays the caller's
            self.bar.write(f"{job.id} [{event.get('level', 'info')}] {event.get('message', '')}", file=sys.stderr)
            if event.get("message", "").startswith("stage "):
                self.bar.set_postfix_str(event["message"].split(" (")[0][:60], refresh=False)
        self.bar.set_description(f"{job.id} {job.status}", refresh=False)
        self.bar.update(len(events))

    def away(self, exc: Exception) -> None:
        if self.on:
            self.bar.set_postfix_str(f"server unreachable, polling again ({str(exc)[:60]})")

    def close(self) -> None:
        self.bar.close()


class Job(_JobBase):
    """A fine-tuning job seen through a blocking ``Client``; see the module docstring."""

    def __init__(self, client: Client, data: dict[str, Any]):
        super().__init__(data)
        self._client = client

    def refresh(self) -> Job:
        """Fetch the job object again (``GET /v1/fine_tuning/jobs/{id}``); returns self."""
        self.data = self._client.request("GET", f"{ROUTE}/{self.id}")
        return self

    def events(self, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every event of the job, newest first, fetched ``page_size`` at a time as the iteration goes."""
        return self._client.paginate(f"{ROUTE}/{self.id}/events", limit=page_size)

    def checkpoints(self) -> list[dict[str, Any]]:
        """``fine_tuning.job.checkpoint`` objects: the registered adapter (``fine_tuned_model_checkpoint``)."""
        return list(self._client.paginate(f"{ROUTE}/{self.id}/checkpoints", limit=100))

    def cancel(self) -> Job:
        """Cancel the job in any state (an ended one stays as it is); returns self, refreshed."""
        self.data = self._client.request("POST", f"{ROUTE}/{self.id}/cancel")
        return self

    def _poll(self) -> list[dict[str, Any]]:
        """Refresh; the events not shown yet, oldest first."""
        self.refresh()
        new = []
        for event in self.events():
            if event["id"] in self._seen:
                break
            new.append(event)
        return self._unseen(new)

    def wait(self, timeout: float | None = None, poll: float = 2.0, progress: bool = True) -> Job:
        """Poll every ``poll`` seconds until the job ends; with ``progress`` show a tqdm bar and each event.

        Returns:
            self, ``succeeded`` (``fine_tuned_model`` set).
        Raises:
            JobFailed: the job failed (``reason``: the server's error message, e.g. the gate's).
            JobCancelled: it was cancelled.
            JobTimeout: still going after ``timeout`` seconds (None: no limit). While the server does not answer
                (``ServerBusy`` after the client's retries: a restart of the Serve app, whose jobs go on), ``wait``
                keeps polling until ``timeout``; other errors of a request (``LorafleetError``) pass through.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Progress(self, progress)
        try:
            while True:
                try:
                    new = self._poll()
                except ServerBusy as exc:  # the Serve app restarting (its jobs go on): poll again
                    bar.away(exc)
                else:
                    bar.show(self, new)
                    if self._outcome():
                        return self
                if deadline is not None and time.monotonic() >= deadline:
                    raise JobTimeout(self, timeout)
                time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        finally:
            bar.close()


class AsyncJob(_JobBase):
    """``Job`` for an ``AsyncClient``: the same methods as coroutines; ``events()`` is an async iterator."""

    def __init__(self, client: AsyncClient, data: dict[str, Any]):
        super().__init__(data)
        self._client = client

    async def refresh(self) -> AsyncJob:
        self.data = await self._client.request("GET", f"{ROUTE}/{self.id}")
        return self

    def events(self, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every event, newest first: ``async for event in job.events(): ...``."""
        return self._client.paginate(f"{ROUTE}/{self.id}/events", limit=page_size)

    async def checkpoints(self) -> list[dict[str, Any]]:
        return [c async for c in self._client.paginate(f"{ROUTE}/{self.id}/checkpoints", limit=100)]

    async def cancel(self) -> AsyncJob:
        self.data = await self._client.request("POST", f"{ROUTE}/{self.id}/cancel")
        return self

    async def _poll(self) -> list[dict[str, Any]]:
        await self.refresh()
        new = []
        async with contextlib.aclosing(self.events()) as events:
            async for event in events:
                if event["id"] in self._seen:
                    break
                new.append(event)
        return self._unseen(new)

    async def wait(self, timeout: float | None = None, poll: float = 2.0, progress: bool = True) -> AsyncJob:
        """``Job.wait`` without blocking the event loop (same returns and errors)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Progress(self, progress)
        try:
            while True:
                try:
                    new = await self._poll()
                except ServerBusy as exc:
                    bar.away(exc)
                else:
                    bar.show(self, new)
                    if self._outcome():
                        return self
                if deadline is not None and time.monotonic() >= deadline:
                    raise JobTimeout(self, timeout)
                await asyncio.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        finally:
            bar.close()
