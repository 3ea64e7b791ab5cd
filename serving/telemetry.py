"""Serving metrics through ``ray.util.metrics`` (exported by Ray's metrics agent to Prometheus as
``ray_lorafleet_*``), plus the same figures kept in-process for ``GET /admin/stats`` and the benchmark."""

from __future__ import annotations

from collections import Counter as Tally

from ray.util import metrics

BATCH_BOUNDS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
SECONDS_BOUNDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]


class GeneratorMetrics:
    """One per generator replica."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "lorafleet_requests", "generation requests by outcome", tag_keys=("model", "status")
        )
        self.images = metrics.Counter("lorafleet_images", "images generated", tag_keys=("model",))
        self.batch_images = metrics.Histogram("lorafleet_batch_images", "images per UNet pass", boundaries=BATCH_BOUNDS)
        self.queue_wait = metrics.Histogram(
            "lorafleet_queue_wait_seconds", "time from arrival at the replica to its pass", boundaries=SECONDS_BOUNDS
        )
        self.latency = metrics.Histogram(
            "lorafleet_generation_seconds", "wall time of a UNet pass (all steps + decode)", boundaries=SECONDS_BOUNDS
        )
        self.cache = metrics.Counter(
            "lorafleet_adapter_cache", "adapter cache events: hit, miss, eviction", tag_keys=("event",)
        )
        self.loaded = metrics.Gauge("lorafleet_adapters_loaded", "adapters held in the replica's memory")
        self.responses = metrics.Counter(
            "lorafleet_response_cache",
            "response cache events: hit, miss, bypass (no seed / cache off), eviction",
            tag_keys=("event",),
        )
        self.responses_bytes = metrics.Gauge("lorafleet_response_cache_bytes", "PNG bytes the response cache holds")
        self._responses_seen = {"hits": 0, "misses": 0, "bypassed": 0, "evictions": 0}
        self.records_lost = metrics.Counter(
            "lorafleet_records_dropped", "generation records not written (serving/records.py)", tag_keys=("reason",)
        )
        self.local = {
            "requests": Tally(),
            "batch_images": Tally(),
            "passes": 0,
            "pass_seconds": 0.0,
            "queue_wait_seconds": 0.0,
            "waited": 0,
        }
        self._seen = {"hits": 0, "misses": 0, "evictions": 0}

    def request(self, model: str, status: str) -> None:
        self.requests.inc(tags={"model": model, "status": status})
        self.local["requests"][status] += 1

    def batch(self, images: int, seconds: float, waits: list[float], per_model: dict[str, int]) -> None:
        self.batch_images.observe(images)
        self.latency.observe(seconds)
        for w in waits:
            self.queue_wait.observe(w)
        for model, count in per_model.items():
            self.images.inc(count, tags={"model": model})
        self.local["batch_images"][images] += 1
        self.local["passes"] += 1
        self.local["pass_seconds"] += seconds
        self.local["queue_wait_seconds"] += sum(waits)
        self.local["waited"] += len(waits)

    def records_dropped(self, count: int, reason: str) -> None:
        """``count`` generation records dropped for ``reason`` (buffer_full, sink_failed, sink_busy, closed)."""
        self.records_lost.inc(count, tags={"reason": reason})

    def cache_state(self, stats: dict) -> None:
        """Export the engine's cumulative cache counters as increments."""
        for key, event in (("hits", "hit"), ("misses", "miss"), ("evictions", "eviction")):
            delta = stats[key] - self._seen[key]
            if delta > 0:
                self.cache.inc(delta, tags={"event": event})
            self._seen[key] = stats[key]
        self.loaded.set(stats["loaded"])

    def response_cache(self, stats: dict) -> None:
        """Export the response cache's cumulative counters (``ResponseCache.stats()``) as increments, and its size."""
        for key, event in (("hits", "hit"), ("misses", "miss"), ("bypassed", "bypass"), ("evictions", "eviction")):
            delta = stats[key] - self._responses_seen[key]
            if delta > 0:
                self.responses.inc(delta, tags={"event": event})
            self._responses_seen[key] = stats[key]
        self.responses_bytes.set(stats["bytes"])

    def snapshot(self) -> dict:
        sizes = self.local["batch_images"]
        total = sum(k * v for k, v in sizes.items())
        return {
            "requests": dict(self.local["requests"]),
            "passes": self.local["passes"],
            "batch_images": {str(k): v for k, v in sorted(sizes.items())},
            "mean_batch_images": total / max(1, self.local["passes"]),
            "mean_pass_s": self.local["pass_seconds"] / max(1, self.local["passes"]),
            "mean_queue_wait_s": self.local["queue_wait_seconds"] / max(1, self.local["waited"]),
        }
