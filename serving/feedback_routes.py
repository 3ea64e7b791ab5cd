"""The feedback routes over the ``Feedback`` store deployment: what ``serving.http``'s ingress methods call.

    curl -H "Authorization: Bearer $KEY" --json '{"image_id": "img_...", "rating": 1}' http://127.0.0.1:8000/v1/feedback
    client.feedback(images[0], +1)                      # serving.client: the id read from the PNG

- ``GET /v1/feedback``: the scale this server takes (``{"enabled", "scale", "ratings", "max_comment_chars"}``);
- ``POST /v1/feedback`` ``{image_id, rating, comment?}``: rates an image (rules: serving/feedback.py); 400 naming
  the field, 404 naming ``image_id``, 429 with ``Retry-After``; 503 with ``Retry-After`` when the store does not
  answer; 404 for every feedback route when ``feedback.enabled`` is false;
- ``GET /v1/feedback/summary`` (admin): ``{"scale", "data": FeedbackStore.summary(), "store": its stats,
  "ingress": this ingress replica's notice counters}``.

The ingress tells the store about each generation's image ids through ``notice`` — a background call
(``Notices``) that the request never waits for.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from serving.config import FeedbackArgs
from serving.feedback import SCALES, FeedbackBody, Notices
from serving.schemas import error_body

log = logging.getLogger("ray.serve")
STORE_WAIT_S = 10.0  # a rating or summary call to the store answers within this, else 503
_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError, asyncio.TimeoutError)


def _error(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class FeedbackRoutes:
    """The ingress's side of feedback: new-image notices and the three routes.

    Args:
        args: the ``feedback`` config section.
        store: the ``serving.shared_stores.Feedback`` deployment's handle (anything with ``.method.remote(...)``);
            None when ``feedback.enabled`` is false.
        retry_after_s: the ``Retry-After`` of a 503 when the store does not answer.
    """

    def __init__(self, args: FeedbackArgs, store: Any, retry_after_s: int):
        self.args, self.store, self.retry_after_s = args, store, retry_after_s
        self.notices = Notices(args.max_pending)

    @property
    def on(self) -> bool:
        return self.args.enabled and self.store is not None

    def notice(self, tenant: str, out: dict) -> None:
        """Tell the store (in the background) that ``tenant`` got ``out["image_ids"]`` (a generation's answer)."""
        ids = out.get("image_ids")
        if self.on and ids:
            model, version = out.get("registered_model") or out.get("model"), out.get("version")
            self.notices.send(lambda: self.store.register.remote(tenant, model, version, list(ids)))

    def _off(self) -> JSONResponse:
        return _error(404, "feedback is off on this server (feedback.enabled=false)")

    async def _ask(self, method: str, *args: Any) -> Any:
        """One store call, or raises one of ``_GONE`` (its replica gone, restarting, or slower than STORE_WAIT_S)."""
        return await asyncio.wait_for(getattr(self.store, method).remote(*args), STORE_WAIT_S)

    def _unavailable(self, exc: Exception) -> JSONResponse:
        log.warning("feedback store did not answer: %s", type(exc).__name__)
        return _error(503, f"the feedback store did not answer; retry after {self.retry_after_s} s", None,
                      self.retry_after_s)  # fmt: skip

    def config(self) -> JSONResponse:
        """``GET /v1/feedback``: what a rating may be here."""
        if not self.on:
            return self._off()
        return JSONResponse({"object": "feedback.config", "enabled": True, "scale": self.args.scale,
                             "ratings": list(SCALES[self.args.scale]),
                             "max_comment_chars": self.args.max_comment_chars})  # fmt: skip

    async def rate(self, tenant: str, body: FeedbackBody) -> JSONResponse:
        """``POST /v1/feedback``: the stored rating, or the store's refusal as OpenAI's error body."""
        if not self.on:
            return self._off()
        try:
            out = await self._ask("rate", tenant, body.image_id, body.rating, body.comment)
        except _GONE as exc:
            return self._unavailable(exc)
        if "error" in out:
            e = out["error"]
            return _error(e["status"], e["message"], e.get("param"), e.get("retry_after"))
        return JSONResponse(out)

    async def ratings(self) -> dict | None:
        """The store's summary (``{model: {version: {"count", "positive", "mean"}}}``) for the canary's verdict
        (``GET /admin/canary``); None when feedback is off or the store does not answer (the verdict then goes
        without ratings, and says so)."""
        if not self.on:
            return None
        try:
            return await self._ask("summary")
        except _GONE as exc:
            log.warning("feedback store did not answer for the canary's ratings: %s", type(exc).__name__)
            return None

    async def summary(self) -> JSONResponse:
        """``GET /v1/feedback/summary`` (the caller checked admin)."""
        if not self.on:
            return self._off()
        try:
            data, store = await self._ask("summary"), await self._ask("stats")
        except _GONE as exc:
            return self._unavailable(exc)
        return JSONResponse({"object": "feedback.summary", "scale": self.args.scale, "data": data, "store": store,
                             "ingress": self.notices.stats()})  # fmt: skip
