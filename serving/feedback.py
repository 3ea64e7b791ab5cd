"""User feedback on generated images: image ids, ``POST /v1/feedback``'s body and the store of ratings.

Two kinds of image id — do not confuse them:

- the **image id** (``img_`` + 24 URL-safe characters, ``new_image_id``): every generated image gets one in the
  generator replica before its PNG is encoded. It is the id a rating names: ``data[i].id`` in the JSON of
  ``POST /v1/images/generations``, the ``X-Image-Id`` header of ``GET /v1/generate``, and inside the PNG as the
  tEXt chunk ``lorafleet:image_id`` (``PNG_KEY``; Pillow reads it into ``Image.info``), so a saved file still
  names its image;
- the id inside a ``response_format: "url"`` link (``/v1/images/<32 characters>.png``, serving/image_store.py): a
  short-lived handle on stored PNG bytes. It is not an image id and ``POST /v1/feedback`` refuses it (400).

``FeedbackStore`` (no Ray; tested alone) keeps a bounded index image id -> (tenant, model, version, created),
at most ``feedback.max_images`` ids for ``feedback.ttl_s`` seconds each, and the ratings. Both are append-only
JSON Lines files under ``feedback.root`` (``images.jsonl``, ``ratings.jsonl``), written before a call returns (a
rating also fsync'ed) and replayed on start, so a restarted store loses nothing it acknowledged.
``images.jsonl`` is rewritten with the live ids once it holds twice ``max_images`` lines; ``ratings.jsonl`` keeps
every rating ever given (it is the data).

Rules of a rating (``FeedbackStore.rate``):

- the image must be known to the store, unexpired and the calling tenant's: another tenant's image reads exactly
  as an unknown one (404), so tenants never learn of each other's images;
- one rating per image per tenant: rating an image again **replaces** the earlier rating (a user who clicks thumbs
  down after thumbs up changed their mind; the summary counts the last one only). The answer says
  ``"replaced": true`` then. Ratings of an image that has left the index can no longer be changed;
- the rating is on the configured scale (``thumbs``: -1 or +1; ``stars``: 1 to 5), the comment at most
  ``max_comment_chars`` characters;
- each tenant may send ``max_per_minute`` ratings per sliding minute over all ingress replicas (the store is one
  replica); more get 429 with the seconds until the oldest leaves the window. Refused calls count as well (a
  client guessing ids is slowed down too).

``summary()`` is the shape the records and canary helpers read: ``{model: {version: {"count", "positive",
"mean"}}}`` where ``positive`` counts ratings of +1 (thumbs) or >= 4 (stars), ``mean`` is the mean rating on its
scale (None without ratings) and ``version`` is the registry version as a string, ``"none"`` for models without one
(the base model, folder adapters). Ratings logged under another scale than the configured one are not counted
(``stats()["other_scale"]`` says how many).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from serving.images import PNG_KEY
from serving.schemas import RequestBody

__all__ = ["PNG_KEY", "FeedbackBody", "FeedbackError", "FeedbackStore", "Notices", "is_positive", "new_image_id",
           "restamp"]  # fmt: skip

log = logging.getLogger("ray.serve")
ID_PREFIX = "img_"
IMAGE_ID = re.compile(r"^img_[A-Za-z0-9_-]{24}\Z")  # ID_PREFIX + secrets.token_urlsafe(18)
NO_VERSION = "none"  # summary key of a model without a registry version
SCALES: dict[str, tuple[int, ...]] = {"thumbs": (-1, 1), "stars": (1, 2, 3, 4, 5)}
WINDOW_S = 60.0  # the rate limit's sliding window


def new_image_id() -> str:
    """A fresh image id: ``img_`` + 144 random bits as 24 URL-safe characters (``secrets.token_urlsafe(18)``)."""
    return ID_PREFIX + secrets.token_urlsafe(18)


def restamp(png: bytes, image_id: str) -> bytes:
    """``png`` with its ``lorafleet:image_id`` text chunk set to ``image_id`` (added when it has none), without
    decoding the image: for a generation answered again from bytes (a response cache), whose images need ids of
    their own. Chunk layout and CRC: PNG spec (ISO/IEC 15948) section 5.3.

    Raises:
        ValueError: ``png`` is not a PNG.
    """
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG: no PNG signature")
    text = PNG_KEY.encode("latin-1") + b"\0" + image_id.encode("latin-1")
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    out, pos, placed = [png[:8]], 8, False
    while pos + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        end = pos + 12 + length
        data = png[pos + 8 : pos + 8 + length]
        if kind == b"tEXt" and data.split(b"\0", 1)[0] == PNG_KEY.encode("latin-1"):
            out.append(chunk)  # the old id's chunk, replaced in place
            placed = True
        else:
            if kind == b"IEND" and not placed:
                out.append(chunk)
            out.append(png[pos:end])
        pos = end
    return b"".join(out)


def is_positive(scale: str, rating: int) -> bool:
    """Whether ``rating`` counts as good: +1 on the thumbs scale, 4 or 5 on the stars scale."""
    return rating > 0 if scale == "thumbs" else rating >= 4


class FeedbackBody(RequestBody):
    """``POST /v1/feedback``: a rating of one generated image (its scale and the comment's length are the server's
    ``feedback`` settings, checked by the store)."""

    image_id: str = Field(
        ..., min_length=1, max_length=200, description="the image's id: data[i].id, X-Image-Id or the PNG's text"
    )
    rating: int = Field(..., description="thumbs scale: -1 or 1; stars scale: 1 to 5 (GET /v1/feedback says which)")
    comment: str | None = Field(None, description="optional text, at most feedback.max_comment_chars characters")


class FeedbackError(Exception):
    """A refused rating: ``status`` (400, 404, 429), a message naming the fix, the field (``param``) and, for 429,
    ``retry_after`` seconds."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after

    def as_dict(self) -> dict:
        """``{"error": {"status", "message", "param", "retry_after"}}`` (what the Ray wrapper returns)."""
        return {"error": {"status": self.status, "message": self.message, "param": self.param,
                          "retry_after": self.retry_after}}  # fmt: skip


@dataclass
class _Image:
    tenant: str
    model: str
    version: str | None
    created: float  # unix s
    rating: int | None = None  # this image's current rating (its tenant's), for replacement


@dataclass
class _Tally:
    count: int = 0
    positive: int = 0
    total: int = 0  # sum of ratings

    def add(self, scale: str, rating: int, sign: int = 1) -> None:
        self.count += sign
        self.positive += sign * is_positive(scale, rating)
        self.total += sign * rating


class FeedbackStore:
    """Image ids and their ratings, bounded and persisted; thread-safe.

    Args:
        root: folder of ``images.jsonl`` and ``ratings.jsonl`` (created); existing files are replayed.
        scale: ``"thumbs"`` (-1/+1) or ``"stars"`` (1-5).
        ttl_s: seconds after ``register`` an image may be rated.
        max_images: image ids kept at most (oldest forgotten first).
        max_comment_chars: longest comment accepted.
        max_per_minute: ratings per tenant per sliding minute.
        clock: unix time in seconds (tests pass a fake one); persisted times use it.

    Raises:
        ValueError: a scale other than thumbs/stars, or a non-positive bound.
    """

    def __init__(
        self,
        root: str | Path,
        scale: Literal["thumbs", "stars"] = "thumbs",
        ttl_s: float = 7 * 86400.0,
        max_images: int = 100_000,
        max_comment_chars: int = 1000,
        max_per_minute: int = 60,
        *,
        clock: Callable[[], float] = time.time,
    ):
        if scale not in SCALES:
            raise ValueError(f"feedback.scale {scale!r}: use 'thumbs' or 'stars'")
        if ttl_s <= 0 or max_images < 1 or max_per_minute < 1 or max_comment_chars < 0:
            raise ValueError(f"feedback bounds must be positive: ttl_s {ttl_s}, max_images {max_images}, "
                             f"max_per_minute {max_per_minute}, max_comment_chars {max_comment_chars}")  # fmt: skip
        self.root = Path(root)
        self.scale, self.ttl_s, self.max_images = scale, ttl_s, max_images
        self.max_comment_chars, self.max_per_minute = max_comment_chars, max_per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._images: OrderedDict[str, _Image] = OrderedDict()  # registration order = age order
        self._tallies: dict[tuple[str, str | None], _Tally] = {}
        self._recent: dict[str, deque[float]] = {}  # tenant -> times of its calls in the last WINDOW_S
        self.counts = {"registered": 0, "forgotten": 0, "ratings": 0, "replaced": 0, "refused": 0, "other_scale": 0,
                       "bad_lines": 0}  # fmt: skip
        self.root.mkdir(parents=True, exist_ok=True)
        self._image_log, self._rating_log = self.root / "images.jsonl", self.root / "ratings.jsonl"
        self._image_lines = self._load()
        self._images_out = self._image_log.open("a", encoding="utf-8")
        self._ratings_out = self._rating_log.open("a", encoding="utf-8")

    # ---- replay ------------------------------------------------------------------------------------------------
    def _read(self, path: Path) -> list[dict]:
        """The JSON objects of a log; a line that is not one (a write cut short by a crash) is skipped, counted."""
        if not path.exists():
            return []
        rows = []
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if isinstance(row, dict):
                    rows.append(row)
                elif line.strip():
                    self.counts["bad_lines"] += 1
        return rows

    def _load(self) -> int:
        """Replay both logs; returns the lines of images.jsonl (for its compaction)."""
        rows = self._read(self._image_log)
        now = self._clock()
        for row in rows:
            try:
                image = _Image(str(row["tenant"]), str(row["model"]), row.get("version"), float(row["created"]))
                image_id = str(row["id"])
            except (KeyError, TypeError, ValueError):
                self.counts["bad_lines"] += 1
                continue
            if image_id not in self._images:  # an id keeps its first owner, as in register
                self._images[image_id] = image
        self._expire(now)
        while len(self._images) > self.max_images:  # max_images may have been lowered since
            self._images.popitem(last=False)
        latest: dict[tuple[str, str], dict] = {}  # (image id, tenant) -> its last rating
        for row in self._read(self._rating_log):
            if row.get("scale") != self.scale:
                self.counts["other_scale"] += 1
            elif isinstance(row.get("rating"), int) and isinstance(row.get("image_id"), str):
                latest[(row["image_id"], str(row.get("tenant")))] = row
            else:
                self.counts["bad_lines"] += 1
        for (image_id, tenant), row in latest.items():
            self._tally(str(row.get("model")), row.get("version")).add(self.scale, row["rating"])
            image = self._images.get(image_id)
            if image is not None and image.tenant == tenant:
                image.rating = row["rating"]
        self.counts["ratings"] = len(latest)
        if self.counts["bad_lines"] or self.counts["other_scale"]:
            log.warning("feedback logs in %s: %d unreadable lines, %d ratings on another scale than %r skipped",
                        self.root, self.counts["bad_lines"], self.counts["other_scale"], self.scale)  # fmt: skip
        return len(rows)

    # ---- writes ------------------------------------------------------------------------------------------------
    def register(self, tenant: str, model: str, version: str | None, image_ids: list[str]) -> int:
        """Remember that ``tenant`` got ``image_ids`` from ``model`` at registry ``version`` (None: none), so they
        can be rated; returns how many were new (an id seen before keeps its first owner)."""
        with self._lock:
            now = self._clock()
            new = [i for i in image_ids if isinstance(i, str) and IMAGE_ID.match(i) and i not in self._images]
            for image_id in new:
                self._images[image_id] = _Image(tenant, model, version, now)
                record = {"id": image_id, "tenant": tenant, "model": model, "version": version, "created": now}
                self._images_out.write(json.dumps(record) + "\n")
            self._images_out.flush()
            self._image_lines += len(new)
            self.counts["registered"] += len(new)
            self._expire(now)
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)
                self.counts["forgotten"] += 1
            if self._image_lines > 2 * self.max_images:
                self._compact()
            return len(new)

    def rate(self, tenant: str, image_id: str, rating: int, comment: str | None = None) -> dict:
        """Store ``tenant``'s ``rating`` of ``image_id`` (replacing its earlier one), on disk before returning.

        Returns:
            ``{"object": "feedback", "image_id", "rating", "comment", "model", "version", "created", "replaced"}``.

        Raises:
            FeedbackError: 429 (``retry_after`` set) past ``max_per_minute``; 400 naming ``image_id`` (not an image
                id), ``rating`` (off the scale) or ``comment`` (too long); 404 naming ``image_id`` for an unknown,
                expired, forgotten or other tenant's image.
        """
        with self._lock:
            now = self._clock()
            self._limit(tenant, now)
            self._check(image_id, rating, comment)
            self._expire(now)
            image = self._images.get(image_id)
            if image is None or image.tenant != tenant:
                self.counts["refused"] += 1
                raise FeedbackError(
                    404, f"image_id {image_id!r}: no such image to rate: an image can be rated for {self.ttl_s:g} s "
                    f"after it was drawn (feedback.ttl_s), while it is among the last {self.max_images} "
                    "(feedback.max_images), with the API key it was drawn with; send the id of an image you generated",
                    "image_id",
                )  # fmt: skip
            replaced = image.rating is not None
            row = {"image_id": image_id, "tenant": tenant, "model": image.model, "version": image.version,
                   "rating": rating, "comment": comment, "scale": self.scale, "created": now}  # fmt: skip
            self._ratings_out.write(json.dumps(row) + "\n")
            self._ratings_out.flush()
            os.fsync(self._ratings_out.fileno())  # a rating is acknowledged once it is on disk
            tally = self._tally(image.model, image.version)
            if replaced:
                tally.add(self.scale, image.rating, -1)
                self.counts["replaced"] += 1
            else:
                self.counts["ratings"] += 1
            tally.add(self.scale, rating)
            image.rating = rating
            out = {k: v for k, v in row.items() if k not in ("tenant", "scale")}
            return {"object": "feedback", **out, "created": int(now), "replaced": replaced}

    def _limit(self, tenant: str, now: float) -> None:
        recent = self._recent.setdefault(tenant, deque())
        while recent and recent[0] <= now - WINDOW_S:
            recent.popleft()
        if len(recent) >= self.max_per_minute:
            wait = max(1, math.ceil(recent[0] + WINDOW_S - now))
            self.counts["refused"] += 1
            raise FeedbackError(
                429, f"more than {self.max_per_minute} ratings a minute from this API key (feedback.max_per_minute); "
                f"retry after {wait} s", None, wait,
            )  # fmt: skip
        recent.append(now)
        for other in [t for t, d in self._recent.items() if not d or d[-1] <= now - WINDOW_S]:
            del self._recent[other]  # tenants quiet for a minute: no state kept

    def _check(self, image_id: str, rating: int, comment: str | None) -> None:
        problem = None
        if not IMAGE_ID.match(image_id):
            problem = (f"image_id {image_id[:64]!r} is not an image id: they are 'img_' + 24 characters, found in "
                       "data[i].id of POST /v1/images/generations, the X-Image-Id header of GET /v1/generate and the "
                       f"PNG's text chunk {PNG_KEY!r} (the id in a response_format 'url' link is not one)",
                       "image_id")  # fmt: skip
        elif isinstance(rating, bool) or not isinstance(rating, int) or rating not in SCALES[self.scale]:
            allowed = " or ".join(map(str, SCALES[self.scale])) if self.scale == "thumbs" else "an integer 1 to 5"
            problem = f"rating {rating!r} is not on this server's {self.scale} scale: send {allowed}", "rating"
        elif comment is not None and len(comment) > self.max_comment_chars:
            problem = (f"comment has {len(comment)} characters; at most {self.max_comment_chars} are kept "
                       "(feedback.max_comment_chars): shorten it", "comment")  # fmt: skip
        if problem is not None:
            self.counts["refused"] += 1
            raise FeedbackError(400, *problem)

    def _tally(self, model: str, version: str | None) -> _Tally:
        return self._tallies.setdefault((model, version), _Tally())

    def _expire(self, now: float) -> None:
        while self._images and next(iter(self._images.values())).created <= now - self.ttl_s:
            self._images.popitem(last=False)

    def _compact(self) -> None:
        """Rewrite images.jsonl with the live ids only (a new file moved over the old: a crash keeps one whole)."""
        tmp = self._image_log.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for image_id, im in self._images.items():
                record = {"id": image_id, "tenant": im.tenant, "model": im.model, "version": im.version,
                          "created": im.created}  # fmt: skip
                f.write(json.dumps(record) + "\n")
        self._images_out.close()
        tmp.replace(self._image_log)
        self._images_out = self._image_log.open("a", encoding="utf-8")
        self._image_lines = len(self._images)

    # ---- reads -------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{model: {version: {"count": int, "positive": int, "mean": float | None}}}`` over every rating kept
        (the last per image), versions as strings (``"none"``: no registry version)."""
        with self._lock:
            out: dict[str, dict[str, dict[str, Any]]] = {}
            for (model, version), t in sorted(self._tallies.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
                if t.count:
                    out.setdefault(model, {})[NO_VERSION if version is None else str(version)] = {
                        "count": t.count, "positive": t.positive, "mean": t.total / t.count}  # fmt: skip
            return out

    def stats(self) -> dict:
        """The store's counters and size: ``images`` (ids that can be rated now), ``scale`` and ``counts``."""
        with self._lock:
            self._expire(self._clock())
            return {"images": len(self._images), "scale": self.scale, "root": str(self.root),
                    "counts": dict(self.counts)}  # fmt: skip

    def close(self) -> None:
        """Close the log files (writes already reached the OS)."""
        with self._lock:
            self._images_out.close()
            self._ratings_out.close()


class Notices:
    """Fire-and-forget calls with a bounded backlog, for the ingress's new-image notices to the store: ``send``
    starts the call as an asyncio task and returns at once (the request never waits for the store); past
    ``max_pending`` calls in flight a notice is dropped and counted, as is a call that fails or takes longer than
    ``timeout_s``. A dropped notice costs only the ability to rate those images (their rating gets 404).

    Args:
        max_pending: calls in flight at most (``feedback.max_pending``).
        timeout_s: how long one call may take before it counts as failed.
    """

    def __init__(self, max_pending: int, timeout_s: float = 30.0):
        self.max_pending, self.timeout_s = max_pending, timeout_s
        self._pending: set[asyncio.Task] = set()  # held so the tasks are not garbage-collected mid-flight
        self.counts = {"sent": 0, "dropped": 0, "failed": 0}

    def send(self, call: Callable[[], Awaitable[Any]]) -> bool:
        """Start ``call()`` in the background (inside a running event loop); False when it was dropped."""
        if len(self._pending) >= self.max_pending:
            self.counts["dropped"] += 1
            return False
        task = asyncio.ensure_future(self._run(call))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    async def _run(self, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            await asyncio.wait_for(call(), self.timeout_s)
            self.counts["sent"] += 1
        except Exception as exc:  # noqa: BLE001 - a lost notice is counted, never raised into serving
            self.counts["failed"] += 1
            log.warning("feedback store notice failed: %s: %s", type(exc).__name__, exc)

    def stats(self) -> dict:
        """``{"pending", "sent", "dropped", "failed"}`` of this ingress replica."""
        return {"pending": len(self._pending), **self.counts}
