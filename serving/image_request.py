"""What a generation request is, before the engine validates it: ``ImageRequest`` and the errors a request can end
in. No torch here, so the ingress, the batch runner and the one-replica stores that build or check requests stay
small processes (``serving.engine`` re-exports these names)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from serving.tenants import Tenant


class RequestError(ValueError):
    """A request outside the configured limits (HTTP 400); ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class Cancelled(RuntimeError):
    """Every request of a batch went away; the batch stopped at a denoising step."""


@dataclass
class ImageRequest:
    prompt: str
    model: str | None = None  # None: the configured default model
    n: int = 1
    seed: int | None = None  # image i uses seed + i; None: a random seed (returned)
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tenant: Tenant | None = None  # who asks: only its own, shared and unowned adapters resolve; None: no check
    client_request_id: str | None = None  # the client's X-Request-Id / Idempotency-Key: a retry's canary arm

    @property
    def routing_key(self) -> str:
        """What picks the canary arm (serving.canary): the client's id when it gave one, else this attempt's."""
        return self.client_request_id or self.request_id
