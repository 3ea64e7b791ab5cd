"""Production figures for the ``/stats`` page (users without Grafana): what each generator replica saw, merged.

    timeline = Timeline(bucket_s=60, buckets=1440)   # in serving.records.Recorder: the last 24 h, minute by minute
    timeline.add(time.time(), "champion", "ok", 0.8)
    prompts = TopPrompts(capacity=1000)             # the most common prompts (already redacted when configured)
    report(snapshots, ratings, cards)                # GET /admin/production: every replica's snapshot, merged

A replica's snapshot (``Recorder.production``) holds exact counts per model version, its last latencies (bounded),
per-minute buckets and its prompt counts. Counts add across replicas; percentiles are taken over the union of the
replicas' latency samples (an exact percentile of those samples, not an average of percentiles). Ratings come from
the feedback store (``serving.feedback``'s summary shape), versions and their gate status from the registry listing
(``serving.catalog`` cards). Nothing here blocks a request: the recorder updates these under its own lock.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

MAX_BUCKET_SAMPLES = 256  # latencies kept per minute bucket (a reservoir of the first ones: enough for a p50)


class Timeline:
    """Requests per ``bucket_s`` window over the last ``buckets`` windows: count, 5xx errors, latencies (bounded
    per bucket) and counts per model. Not thread-safe: the recorder calls it under its lock."""

    def __init__(self, bucket_s: int = 60, buckets: int = 1440):
        self.bucket_s, self.buckets = bucket_s, buckets
        self._data: dict[int, dict[str, Any]] = {}

    def add(self, t: float, model: str, outcome: str, latency_s: float) -> None:
        """One answered request at unix time ``t`` (s), its latency (s) counted when it succeeded."""
        start = int(t // self.bucket_s) * self.bucket_s
        bucket = self._data.get(start)
        if bucket is None:
            bucket = self._data[start] = {"requests": 0, "errors": 0, "latencies": [], "by_model": Counter()}
            horizon = start - self.bucket_s * self.buckets
            for old in [k for k in self._data if k <= horizon]:
                del self._data[old]
        bucket["requests"] += 1
        kind = "ok" if outcome == "ok" else "error" if outcome.startswith("5") else "other"
        bucket["errors"] += kind == "error"
        if kind == "ok" and len(bucket["latencies"]) < MAX_BUCKET_SAMPLES:
            bucket["latencies"].append(latency_s)
        bucket["by_model"][model] += 1

    def snapshot(self) -> list[dict]:
        """``[{"t": bucket start (unix s), "requests", "errors", "latencies": [s, ...], "by_model": {model: n}}]``,
        oldest first."""
        return [
            {"t": t, "requests": b["requests"], "errors": b["errors"], "latencies": list(b["latencies"]),
             "by_model": dict(b["by_model"])}
            for t, b in sorted(self._data.items())
        ]  # fmt: skip


class TopPrompts:
    """Prompt counts kept for at most ``capacity`` distinct prompts. When full, a new prompt replaces one of the
    least counted (so a flood of one-off prompts cannot grow memory; counts of prompts seen before they were
    replaced are lost — the top of a long-tailed distribution is what stays). Not thread-safe (the recorder's lock)."""

    def __init__(self, capacity: int = 1000):
        self.capacity = capacity
        self.counts: Counter[str] = Counter()

    def add(self, prompt: str) -> None:
        if prompt in self.counts or len(self.counts) < self.capacity:
            self.counts[prompt] += 1
            return
        least, _ = min(self.counts.items(), key=lambda kv: kv[1])
        del self.counts[least]
        self.counts[prompt] = 1

    def top(self, k: int = 20) -> list[tuple[str, int]]:
        return self.counts.most_common(k)


def _merge_versions(snapshots: list[dict]) -> dict[tuple[str, str], dict]:
    merged: dict[tuple[str, str], dict] = {}
    for snap in snapshots:
        for v in snap.get("versions", []):
            key = (v["model"], v["version"])
            m = merged.setdefault(key, {"counts": Counter(), "cache_hits": 0, "latencies": []})
            m["counts"].update(v["counts"])
            m["cache_hits"] += v["cache_hits"]
            m["latencies"] += v["latencies"]
    return merged


def _merge_timeline(snapshots: list[dict]) -> list[dict]:
    from serving.records import percentile

    buckets: dict[int, dict] = {}
    for snap in snapshots:
        for b in snap.get("timeline", []):
            m = buckets.setdefault(b["t"], {"requests": 0, "errors": 0, "latencies": [], "by_model": Counter()})
            m["requests"] += b["requests"]
            m["errors"] += b["errors"]
            m["latencies"] += b["latencies"]
            m["by_model"].update(b["by_model"])
    return [
        {"t": t, "requests": b["requests"], "errors": b["errors"], "p50_s": percentile(b["latencies"], 0.5),
         "p95_s": percentile(b["latencies"], 0.95), "by_model": dict(b["by_model"])}
        for t, b in sorted(buckets.items())
    ]  # fmt: skip


def report(snapshots: list[dict], ratings: dict | None, cards: list[dict], expected: int | None = None) -> dict:
    """``GET /admin/production``: the replicas' snapshots merged, with ratings and the registry's versions.

    Args:
        snapshots: ``Recorder.production()`` of each replica that answered (distinct pids).
        ratings: the feedback summary ``{model: {version: {"count", "positive", "mean"}}}`` (version ``"none"`` for
            none), or None when feedback is off or its store did not answer.
        cards: ``GET /v1/models`` cards; those of kind ``registry`` give each registered version's aliases and
            gate status (``validation_status``: passed / rejected).
        expected: generator replicas configured (None: autoscaling).

    Returns:
        ``{"object": "production.stats", "replicas", "replicas_expected", "uptime_s", "records", "totals",
        "versions": [...], "timeline": [...], "top_prompts": [[prompt, count]], "registry": [...],
        "ratings_source"}`` — latencies in seconds, rates as shares (0..1); ``top_prompts`` empty when prompts are
        redacted (they are kept as sha256 prefixes then; the page says so).
    """
    from serving.records import percentile

    versions = []
    total: Counter[str] = Counter()
    hits, lat_all = 0, []
    for (model, version), m in sorted(_merge_versions(snapshots).items()):
        counts, n = m["counts"], sum(m["counts"].values())
        total.update(counts)
        hits += m["cache_hits"]
        lat_all += m["latencies"]
        rating = ((ratings or {}).get(model) or {}).get(version or "none")
        versions.append({
            "model": model, "version": version or None, "requests": n, "ok": counts["ok"],
            "rejected": counts["rejected"], "errors": counts["error"], "cancelled": counts["cancelled"],
            "error_rate": counts["error"] / n if n else 0.0,
            "success_rate": counts["ok"] / n if n else None,
            "cache_hit_rate": m["cache_hits"] / counts["ok"] if counts["ok"] else None,
            "p50_s": percentile(m["latencies"], 0.5), "p95_s": percentile(m["latencies"], 0.95),
            "ratings": rating,
        })  # fmt: skip
    n = sum(total.values())
    rated = [r for by_version in (ratings or {}).values() for r in by_version.values() if r.get("count")]
    count = sum(r["count"] for r in rated)
    mean = sum(r["mean"] * r["count"] for r in rated if r.get("mean") is not None) / count if count else None
    prompts: Counter[str] = Counter()
    for snap in snapshots:
        prompts.update(dict(snap.get("prompts", [])))
    redacted = any(snap.get("redacted") for snap in snapshots)
    registry = [
        {"registered_model": c.get("registered_model"), "version": c.get("version"), "aliases": c.get("aliases", []),
         "status": c.get("status"), "id": c.get("id")}
        for c in cards if c.get("kind") == "registry"
    ]  # fmt: skip
    return {
        "object": "production.stats",
        "replicas": sorted(s["pid"] for s in snapshots),
        "replicas_expected": expected,
        "uptime_s": max((s.get("uptime_s", 0.0) for s in snapshots), default=0.0),
        "records": all(s.get("enabled", False) for s in snapshots) if snapshots else False,
        "totals": {
            "requests": n,
            "ok": total["ok"],
            "errors": total["error"],
            "rejected": total["rejected"],
            "success_rate": total["ok"] / n if n else None,
            "error_rate": total["error"] / n if n else 0.0,
            "cache_hit_rate": hits / total["ok"] if total["ok"] else None,
            "p50_s": percentile(lat_all, 0.5),
            "p95_s": percentile(lat_all, 0.95),
            "ratings": count,
            "rating_mean": mean,
        },  # fmt: skip
        "versions": versions,
        "timeline": _merge_timeline(snapshots),
        "top_prompts": [] if redacted else [list(p) for p in prompts.most_common(20)],
        "prompts_redacted": redacted,
        "registry": registry,
        "ratings_source": ratings is not None,
    }
