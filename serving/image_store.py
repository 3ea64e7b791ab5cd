"""Images kept for ``response_format: "url"``: a bounded, expiring map from an unguessable id to PNG bytes.

OpenAI's images API answers dall-e requests with a URL by default (valid for an hour); lorafleet does the same
when asked: ``POST /v1/images/generations`` with ``"response_format": "url"`` puts the PNGs here and returns
``GET /v1/images/{id}.png`` links on the request's own host, which ask for the same API key as the rest of the API.

Where the images live: in ONE Ray Serve deployment (``serving.shared_stores.ImageUrls``, one replica, no CPU
reserved) that holds this store, reached through its handle from every HTTP ingress replica on every node. An
in-process map per ingress replica would 404 whenever the GET lands on another replica than the POST did; a folder
on the local disk would do the same once replicas sit on two nodes. The cost is that the PNG bytes cross Ray's
object store twice (a 64² PNG is ~10 KB, a 512² one ~0.4 MB) and that a restarted store replica forgets its images —
they then 404, the same answer as an expired link, and the client asks again. This class knows nothing of Ray and is
tested alone.

Bounds (``ServeArgs.image_urls``): each image lives ``ttl_s`` seconds; beyond ``max_images`` images or
``max_bytes`` bytes the oldest go first. An expired, evicted or unknown id reads as ``None`` (the ingress's 404),
and so does another owner's (tenant's) image.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

IMAGE_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}\Z")  # what secrets.token_urlsafe(24) gives (32 chars)


class ImageStoreFull(ValueError):
    """One request's images are larger than the whole store (``image_urls.max_bytes``)."""


@dataclass(frozen=True)
class StoredImage:
    id: str
    expires_at: float  # unix time (s) after which ``get`` returns None


@dataclass
class _Entry:
    png: bytes
    expires: float  # on the store's clock
    owner: str | None = None  # the tenant that made it; only it reads it back


class ImageStore:
    """PNG bytes by id, oldest first, bounded in age, count and bytes; thread-safe.

    Args:
        ttl_s: seconds an image stays readable after ``put``.
        max_images: most images held; a ``put`` beyond it evicts the oldest.
        max_bytes: most PNG bytes held; a ``put`` beyond it evicts the oldest.
        clock: seconds on a monotonic clock (tests pass a fake one instead of sleeping).
        wall: unix time, for the ``expires_at`` reported to clients.
    """

    def __init__(
        self,
        ttl_s: float,
        max_images: int,
        max_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        if ttl_s <= 0 or max_images < 1 or max_bytes < 1:
            raise ValueError(f"ttl_s, max_images and max_bytes must be positive: {ttl_s}, {max_images}, {max_bytes}")
        self.ttl_s, self.max_images, self.max_bytes = ttl_s, max_images, max_bytes
        self._clock, self._wall = clock, wall
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # insertion order = age order
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted = 0  # images dropped for room before their time (count or bytes), for stats

    def put(self, pngs: list[bytes], owner: str | None = None) -> list[StoredImage]:
        """Keep ``pngs`` (one request's images, kept or dropped together) for ``owner``; return their ids, in order.

        Raises:
            ImageStoreFull: the images alone exceed ``max_bytes`` or ``max_images``; nothing was stored or evicted.
        """
        size = sum(len(p) for p in pngs)
        if size > self.max_bytes or len(pngs) > self.max_images:
            raise ImageStoreFull(
                f"{len(pngs)} images of {size} bytes do not fit image_urls (max_images {self.max_images}, "
                f"max_bytes {self.max_bytes}); raise them or ask for response_format 'b64_json'"
            )
        with self._lock:
            now = self._clock()
            self._expire(now)
            while self._entries and (
                len(self._entries) + len(pngs) > self.max_images or self._bytes + size > self.max_bytes
            ):
                self._drop_oldest()
                self.evicted += 1
            stored = []
            for png in pngs:
                image_id = secrets.token_urlsafe(24)
                self._entries[image_id] = _Entry(png, now + self.ttl_s, owner)
                self._bytes += len(png)
                stored.append(StoredImage(image_id, self._wall() + self.ttl_s))
            return stored

    def get(self, image_id: str, owner: str | None = None) -> bytes | None:
        """The PNG stored under ``image_id`` for ``owner``, or None when it expired, was evicted, never existed or
        is another owner's."""
        with self._lock:
            self._expire(self._clock())
            entry = self._entries.get(image_id)
            return entry.png if entry is not None and entry.owner == owner else None

    def stats(self) -> dict:
        """``{"images", "bytes", "evicted"}`` now (expired images not counted)."""
        with self._lock:
            self._expire(self._clock())
            return {"images": len(self._entries), "bytes": self._bytes, "evicted": self.evicted}

    def _expire(self, now: float) -> None:
        while self._entries and next(iter(self._entries.values())).expires <= now:  # same ttl: oldest expire first
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self._bytes -= len(entry.png)
