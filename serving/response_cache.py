"""The response cache: repeated seeded requests answered from a generator replica's memory, and HTTP validators.

    cache = ResponseCache.from_args(args.response_cache)
    key = cache.key(prepared)                 # None: not cacheable (no seed from the client, or the cache is off)
    out = cache.get(key)                      # a hit: the generation's dict plus "cached": True; None: a miss
    ...generate...; cache.put(key, encode(result))

A request with an explicit seed is a pure function of what the key holds: the model name asked for, the adapter's
registered model, its registry version and the sha256 of its weights (``ResolvedAdapter.key``), the prompt,
negative prompt, seed, n, steps, guidance and size as ``Engine.prepare`` filled them in, and (unless
``share_between_tenants``) the tenant. The base model, scheduler, dtype and speed options are the replica's own and
never change under a running cache, so they are not in the key. A promotion moves the champion to another version
(and other weights): its first request is a miss, and no request gets the old model's images again.

Never cached: requests without a seed (the client asked for a random image each time), errors, cancelled requests.
The key is computed from a ``Prepared`` request — after ``Engine.prepare`` resolved the model for the request's
tenant, so a model the tenant may not use is refused (404) before the cache is asked.

HTTP caching (RFC 9110 §8.8.3, §13.1.2; RFC 9111 §5.2.2): ``png_headers`` gives GET /v1/generate a strong ``ETag``
(the PNG's sha256) and ``Cache-Control: private, max-age=…`` when the client gave a seed, ``no-store`` without one;
``not_modified`` evaluates ``If-None-Match`` (``*``, lists, weak comparison) for a 304.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.config import ResponseCacheArgs
from serving.feedback import restamp

if TYPE_CHECKING:  # serving.engine imports torch; the cache only reads a Prepared request's fields
    from serving.engine import Prepared

ENTRY_OVERHEAD = 512  # bytes counted per entry besides its PNGs: the key, the dict, the seeds (a rough bound)


@dataclass
class _Entry:
    value: dict
    size: int  # bytes counted against max_bytes
    stored: float  # clock() when stored
    owner: str | None = None  # the tenant whose request drew it


class ResponseCache:
    """A bounded LRU map from request keys to generation results (the dict ``serving.app.encode`` makes).

    Bounded by entries and by bytes (the PNGs plus ``ENTRY_OVERHEAD`` per entry); the least recently used entry goes
    first; an entry older than ``ttl_s`` is a miss. Thread-safe (the replica's event loop stores, ``/admin/stats``
    may read from another thread). A disabled cache answers every ``key`` with None and counts it as bypassed.
    """

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        ttl_s: float | None = None,
        *,
        enabled: bool = True,
        share_between_tenants: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_entries < 1 or max_bytes < 1 or (ttl_s is not None and ttl_s <= 0):
            raise ValueError(
                f"response_cache: max_entries ({max_entries}) and max_bytes ({max_bytes}) must be >= 1 and ttl_s "
                f"({ttl_s}) > 0 or null"
            )
        self.enabled, self.max_entries, self.max_bytes, self.ttl_s = enabled, max_entries, max_bytes, ttl_s
        self.share_between_tenants = share_between_tenants
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.counts = {"hits": 0, "misses": 0, "bypassed": 0, "stores": 0, "evictions": 0, "expired": 0, "too_large": 0}

    @classmethod
    def from_args(cls, args: ResponseCacheArgs, clock: Callable[[], float] = time.monotonic) -> ResponseCache:
        """The cache ``response_cache`` (serving/config.py) describes."""
        return cls(
            args.max_entries,
            args.max_bytes,
            args.ttl_s,
            enabled=args.enabled,
            share_between_tenants=args.share_between_tenants,
            clock=clock,
        )

    def key(self, p: Prepared) -> str | None:
        """The hex sha256 of everything that decides ``p``'s pixels and response (module docstring); None when
        ``p`` must not be cached (no seed given by the client, or the cache is off), counted as bypassed."""
        r = p.request
        if not self.enabled or r.seed is None:
            with self._lock:
                self.counts["bypassed"] += 1
            return None
        a = p.adapter
        fields = {
            "model": p.model,
            "registered": a.registered if a else None,
            "version": a.version if a else None,
            "weights": a.key if a else None,
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "seed": p.seed,
            "n": r.n,
            "steps": p.steps,
            "guidance": p.guidance,  # a finite float (prepare refuses NaN); json writes it exactly
            "width": p.width,
            "height": p.height,
            "tenant": None if self.share_between_tenants or r.tenant is None else r.tenant.name,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def get(self, key: str | None, tenant: str | None = None) -> dict | None:
        """The stored response for ``key`` with ``"cached": True`` (a copy: callers may change it), or None (a
        miss; None for ``key`` None, counted as bypassed by ``key`` already).

        ``tenant``: who asks. Image ids (serving/feedback.py) belong to the tenant that got them, so an entry drawn
        for another tenant (only with ``share_between_tenants``) is answered with ids of the asking tenant's own —
        derived from the stored id and the tenant name (sha256), so a tenant gets the same ids, and the same
        bytes and ETag, on every hit — written into the PNGs (``feedback.restamp``)."""
        if key is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self.ttl_s is not None and self.clock() - entry.stored > self.ttl_s:
                self._drop(key)
                self.counts["expired"] += 1
                entry = None
            if entry is None:
                self.counts["misses"] += 1
                return None
            self._entries.move_to_end(key)
            self.counts["hits"] += 1
            value, owner = entry.value, entry.owner
        out = {**value, **{k: list(v) for k, v in value.items() if isinstance(v, list)}, "cached": True}
        if owner != tenant and out.get("image_ids"):
            out["image_ids"] = [tenant_image_id(i, tenant) for i in out["image_ids"]]
            out["images"] = [restamp(png, i) for png, i in zip(out["images"], out["image_ids"])]
        return out

    def put(self, key: str | None, value: dict, tenant: str | None = None) -> bool:
        """Keep ``value`` (a successful generation: ``images`` is a list of PNG bytes) under ``key``, evicting the
        least recently used entries until both bounds hold; returns whether it was kept (not for ``key`` None, an
        error result, or a response larger than ``max_bytes`` on its own).

        Raises:
            ValueError: ``value`` has no ``images`` list of bytes (an error result must never get here).
        """
        if key is None:
            return False
        images = value.get("images")
        if "error" in value or not isinstance(images, list) or not all(isinstance(b, bytes) for b in images):
            raise ValueError(f"response cache: only successful generations are stored, got keys {sorted(value)}")
        size = sum(len(b) for b in images) + ENTRY_OVERHEAD
        with self._lock:
            if size > self.max_bytes:
                self.counts["too_large"] += 1
                return False
            if key in self._entries:
                self._drop(key)
            self._entries[key] = _Entry({k: v for k, v in value.items() if k != "cached"}, size, self.clock(), tenant)
            self._bytes += size
            self.counts["stores"] += 1
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.counts["evictions"] += 1
        return True

    def _drop(self, key: str) -> None:
        self._bytes -= self._entries.pop(key).size

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        """Cumulative counters, the hit ratio (hits / (hits + misses); None before any lookup) and the current
        size: ``{"enabled", "entries", "bytes", "max_entries", "max_bytes", "hit_ratio", "hits", "misses",
        "bypassed", "stores", "evictions", "expired", "too_large"}``."""
        with self._lock:
            counts = dict(self.counts)
            entries, size = len(self._entries), self._bytes
        looked = counts["hits"] + counts["misses"]
        return {
            "enabled": self.enabled,
            "entries": entries,
            "bytes": size,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "hit_ratio": counts["hits"] / looked if looked else None,
            **counts,
        }


# ---- HTTP validators -------------------------------------------------------------------------------------------
_SEPARATORS = re.compile(r"[\s,]*")  # RFC 9110 §5.6.1: empty list elements are allowed and ignored
_ENTITY_TAG = re.compile(r'(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?=,|\Z)')


def etag(body: bytes) -> str:
    """A strong entity tag for ``body`` (RFC 9110 §8.8.3): its sha256, hex, quoted."""
    return f'"{hashlib.sha256(body).hexdigest()}"'


def not_modified(if_none_match: str | None, current: str | None) -> bool:
    """Whether ``If-None-Match`` fails for a representation with entity tag ``current`` (RFC 9110 §13.1.2), so a GET
    or HEAD answers 304: the field is ``*`` (a current representation exists), or one of its listed tags matches
    ``current`` by weak comparison (``W/"x"`` matches ``"x"``). A field that does not parse as a list of entity tags
    is ignored (the request is answered in full), as is any list when the response has no entity tag."""
    if if_none_match is None:
        return False
    value = if_none_match.strip()
    if value == "*":
        return True
    if current is None or not value:
        return False
    tags, at = [], _SEPARATORS.match(value).end()
    while at < len(value):
        found = _ENTITY_TAG.match(value, at)
        if found is None:
            return False  # not a list of entity tags: the precondition cannot be evaluated, so it does not apply
        tags.append(found[2])
        at = _SEPARATORS.match(value, found.end()).end()
    opaque = current.removeprefix("W/")
    return opaque in tags


def tenant_image_id(image_id: str, tenant: str | None) -> str:
    """The id ``tenant`` gets for a cached image first drawn (as ``image_id``) for another tenant: ``img_`` + 24
    URL-safe characters of sha256(image_id, tenant) — unguessable as ``image_id`` is, the same on every hit."""
    digest = hashlib.sha256(f"{image_id}\0{tenant or ''}".encode()).digest()
    return "img_" + base64.urlsafe_b64encode(digest)[:24].decode()


def png_headers(png: bytes, seeded: bool, max_age_s: int) -> dict[str, str]:
    """Caching headers of GET /v1/generate: with a seed from the client the image is reproducible — ``ETag`` (its
    bytes' sha256) and ``Cache-Control: private, max-age=max_age_s`` (private: the answer depends on the API key's
    tenant); without a seed a new random image each time — ``Cache-Control: no-store``, no ETag."""
    if not seeded:
        return {"Cache-Control": "no-store"}
    return {"ETag": etag(png), "Cache-Control": f"private, max-age={max_age_s}"}
