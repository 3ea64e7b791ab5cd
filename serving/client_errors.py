"""The client SDK's errors: one typed error per kind of answer, carrying the server's message (``serving.client``
raises them; ``serving.client_jobs`` adds the job outcomes)."""

from __future__ import annotations

from typing import Any

import httpx

RETRY_STATUS = (408, 503, 504)
RETRYABLE = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)  # the server restarting


class LorafleetError(Exception):
    """An error answer: ``status``, the server's ``message``, the field it names (``param``) and the whole OpenAI
    error object (``details``; a rejected upload's holds ``problems``: the validator's report, file by file)."""

    def __init__(self, status: int, message: str, param: str | None = None, details: dict | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.param, self.details = status, message, param, details or {}


class BadRequest(LorafleetError):
    """The request is invalid (``param`` names the field); fix it, do not retry."""


class Unauthorized(LorafleetError):
    """Missing or wrong API key."""


class NotFound(LorafleetError):
    """No such model, file or fine-tuning job on this server (another tenant's ids read as missing): for a model, an
    unknown name, an alias or version the registry does not hold, or a version the gate rejected (or one rolled
    back) asked for by number. Final: never retried."""


class ServerBusy(LorafleetError):
    """The server shed the request (503) or timed out (408/504), and the retries ran out."""


class RateLimited(ServerBusy):
    """429: this API key sent more requests of a kind than the server takes per minute (``POST /v1/feedback``:
    ``feedback.max_per_minute``); ``retry_after`` is the server's Retry-After in seconds. Not retried."""

    def __init__(self, status: int, message: str, param: str | None = None, details: dict | None = None,
                 retry_after: int | None = None):  # fmt: skip
        super().__init__(status, message, param, details)
        self.retry_after = retry_after


class ServerError(LorafleetError):
    """The server failed (5xx)."""


def error_from(status: int, body: Any, retry_after: str | None = None) -> LorafleetError:
    """The typed error of an error answer (OpenAI's body ``{"error": {"message", "param", …}}``, or any body);
    ``retry_after``: the answer's Retry-After header (a 429's ``RateLimited.retry_after``)."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    message = err.get("message") or (str(body)[:300] if body else f"HTTP {status}")
    if status == 429:
        return RateLimited(status, message, err.get("param"), err, int(retry_after) if retry_after and
                           retry_after.isdigit() else None)  # fmt: skip
    cls = {400: BadRequest, 401: Unauthorized, 404: NotFound, 422: BadRequest}.get(status)
    if cls is None:
        cls = ServerBusy if status in RETRY_STATUS or status == 429 else ServerError if status >= 500 else BadRequest
    return cls(status, message, err.get("param"), err)
