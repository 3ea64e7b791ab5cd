"""Canary promotion: a share of the champion's traffic goes to the registry's ``challenger``, and the arms are compared.

The offline gate (evaluation/gate.py) stays the first gate; this is the second, on live traffic (issue 22, part 3):

    lorafleet promote toy-sks-lora 7 --challenger       # version 7 takes canary.share of the champion's requests
    lorafleet canary status toy-sks-lora                # arms, counts, intervals, the verdict
    lorafleet canary promote toy-sks-lora               # champion -> 7 only when the verdict is "better"

No Ray in here: ``Canary`` is one replica's state (routing, per-arm counts, the automatic stop), called by the
``Generator`` in serving/app.py; ``decide`` is the statistical test, a pure function of counts.

Routing. A request whose model means the champion (``champion.name``, the registered model's bare name or
``<model>@champion``; the default model too) goes to the challenger when ``fraction(key) < share``, where ``key`` is
the client's ``X-Request-Id`` / ``Idempotency-Key`` (else the request's own random id) and ``fraction`` the first 8
bytes of its SHA-256 read as a number in [0, 1): the same key lands on the same arm on every replica and every retry.
A request naming a version (``toy-sks-lora/3``) or another alias is never re-routed.

The share is 0 — every request goes to the champion — while any of these holds: no challenger alias, the challenger
is the champion's version, its version is not resolved in this replica yet (the replica's start and every poll
resolve it and then load it, like the champion), it was stopped (the ``lorafleet.canary_stopped`` tag on its
version), or the last registry read of its tags failed. The last one is the safer choice when the registry is down:
another replica may have stopped the challenger meanwhile and this one could not learn of it, and the champion is the
version that already proved itself; the canary only loses samples while the registry is away.

Automatic stop. Each replica keeps the last ``rollback.window`` outcomes of each arm; once the challenger's window
holds ``rollback.min_requests`` outcomes and its 5xx rate is above ``rollback.max_error_rate`` and above the
champion's by ``rollback.margin``, its share drops to 0 at once in that replica, and the reason is written to the
registry as the tag ``lorafleet.canary_stopped = "<reason> (at <UTC time>)"`` on the challenger's version (retried on
every poll while the registry is down), so the other replicas (on their next ``champion.poll_s`` poll) and restarted
ones stop too. ``lorafleet promote NAME VERSION --challenger`` clears the tag: a new try starts clean.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from evaluation.registry import TAG_CANARY_STOPPED as TAG_STOPPED  # on a version: why its canary stopped, and when

CHAMPION, CHALLENGER = "champion", "challenger"
ARMS = (CHAMPION, CHALLENGER)
# outcomes as serving.telemetry labels them: "ok", "cancelled" or the HTTP status as a string
SERVER_ERROR = "5"


# visible ASCII (RFC 9110 field value without spaces): uuid4, ULIDs, base64 ids proxies forward (+/=), W3C trace ids
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}\Z")
REQUEST_ID_HEADERS = ("X-Request-Id", "Idempotency-Key")


class BadRequestId(ValueError):
    """A client's request id header is unusable (HTTP 400); ``header`` names it."""

    def __init__(self, header: str, message: str):
        super().__init__(message)
        self.header = header


def client_request_id(values: Mapping[str, list[str]]) -> str | None:
    """The client's request id from ``{header: [values]}`` (``X-Request-Id``, else ``Idempotency-Key``): a retry
    that sends the same id lands on the same canary arm. None when neither is sent.

    Raises:
        BadRequestId: a header given twice, the two headers disagreeing, or a value outside ``REQUEST_ID``.
    """
    found: dict[str, str] = {}
    for header in REQUEST_ID_HEADERS:
        given = values.get(header) or []
        if len(given) > 1:
            raise BadRequestId(header, f"{header}: given {len(given)} times; send it once")
        if given:
            if not REQUEST_ID.match(given[0]):
                raise BadRequestId(
                    header, f"{header} {given[0][:40]!r}: use 1-128 visible ASCII characters (no spaces or controls) "
                    "(a UUID works); a retry sends the same value",
                )  # fmt: skip
            found[header] = given[0]
    if len(set(found.values())) > 1:
        raise BadRequestId(
            REQUEST_ID_HEADERS[0], f"{' and '.join(REQUEST_ID_HEADERS)} differ: send one, or the same id in both"
        )
    return next(iter(found.values()), None)


def fraction(key: str) -> float:
    """``key`` -> a number in [0, 1), uniform over keys: the first 8 bytes of SHA-256(key), big-endian, / 2**64."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def arm_for(key: str, share: float) -> str:
    """``"challenger"`` for a ``share`` (0..1) of all keys, the same for one key every time; else ``"champion"``."""
    return CHALLENGER if fraction(key) < share else CHAMPION


# ---- statistics -------------------------------------------------------------------------------------------------
def z_value(confidence: float) -> float:
    """The two-sided normal quantile for ``confidence`` (0.95 -> 1.959964)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence}: use a number between 0 and 1, e.g. 0.95")
    return statistics.NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson_interval(successes: int, n: int, z: float) -> tuple[float, float] | None:
    """Wilson's score interval for a binomial proportion; None when ``n`` is 0.

    For p̂ = successes / n:  centre = (p̂ + z²/2n) / (1 + z²/n),
    half-width = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²).
    Source: E. B. Wilson, "Probable inference, the law of succession, and statistical inference", JASA 22 (1927)
    209-212; recommended over the Wald interval for small n and p near 0 or 1 by L. D. Brown, T. T. Cai and
    A. DasGupta, "Interval estimation for a binomial proportion", Statistical Science 16 (2001) 101-133, and
    A. Agresti and B. A. Coull, "Approximate is better than 'exact'…", The American Statistician 52 (1998) 119-126.

    Raises:
        ValueError: ``successes`` outside 0..n.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..n ({n})")
    if n == 0:
        return None
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends (no rounding residue)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def p95(samples: Iterable[float]) -> float | None:
    """The 95th percentile (linear interpolation between order statistics, numpy's default), None for no samples."""
    xs = sorted(samples)
    if not xs:
        return None
    pos = 0.95 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def compare_rates(
    champion: tuple[int, int], challenger: tuple[int, int], *, higher_is_better: bool, z: float, min_samples: int
) -> dict[str, Any]:
    """Compare two proportions (successes, n) by their Wilson intervals at the same ``z``.

    ``better``: the challenger's interval lies entirely on the good side of the champion's (above it when
    ``higher_is_better``), ``worse``: entirely on the bad side; ``undecided``: the intervals overlap;
    ``too_few``: an arm has fewer than ``min_samples`` trials. Non-overlap of two 95 % intervals is a conservative
    test (its level is stricter than 5 %): the canary errs towards "undecided", never towards a false "better".
    """
    out: dict[str, Any] = {}
    for arm, (k, n) in ((CHAMPION, champion), (CHALLENGER, challenger)):
        ci = wilson_interval(k, n, z)
        out[arm] = {"successes": k, "n": n, "rate": k / n if n else None, "interval": list(ci) if ci else None}
    if min(champion[1], challenger[1]) < min_samples:
        out["outcome"] = "too_few"
        return out
    (c_lo, c_hi), (x_lo, x_hi) = out[CHAMPION]["interval"], out[CHALLENGER]["interval"]
    above, below = x_lo > c_hi, x_hi < c_lo
    if above or below:
        out["outcome"] = "better" if above == higher_is_better else "worse"
    else:
        out["outcome"] = "undecided"
    return out


def compare_latency(
    champion: list[float], challenger: list[float], *, tolerance: float, min_samples: int
) -> dict[str, Any]:
    """p95 latency of each arm; ``worse`` when the challenger's p95 exceeds the champion's by more than ``tolerance``
    (a fraction: 0.2 = 20 %), ``ok`` otherwise, ``too_few`` below ``min_samples`` samples in an arm."""
    a, b = p95(champion), p95(challenger)
    out: dict[str, Any] = {
        CHAMPION: {"p95_s": a, "n": len(champion)},
        CHALLENGER: {"p95_s": b, "n": len(challenger)},
        "tolerance": tolerance,
    }
    if min(len(champion), len(challenger)) < min_samples or a is None or b is None:
        out["outcome"] = "too_few"
    else:
        out["outcome"] = "worse" if b > a * (1 + tolerance) else "ok"
    return out


def decide(arms: Mapping[str, Mapping[str, Any]], ratings: Mapping[str, Mapping[str, Any]] | None, args) -> dict:
    """The verdict on the challenger: ``better``, ``worse`` or ``undecided``, with each comparison and why.

    Args:
        arms: ``{"champion"|"challenger": {"requests": int, "errors": int, "latency_s": [float, ...]}}`` — requests
            that ended ok or with a 5xx, the 5xx among them, and latency samples (seconds, bounded) of the ok ones.
        ratings: ``{"champion"|"challenger": {"count": int, "positive": int, ...}}`` (the feedback summary's entry of
            each arm's version), or None when no ratings source is wired.
        args: ``CanaryArgs`` (its ``decision`` section: confidence, min_requests, min_ratings, latency_tolerance).

    The test, stated: Wilson score intervals (``wilson_interval``) at ``decision.confidence`` on the positive-rating
    proportion and on the 5xx proportion; p95 latency within ``decision.latency_tolerance``. ``worse`` when any of
    them says worse (ratings' interval below, errors' interval above, p95 beyond the tolerance); ``better`` when the
    ratings' interval lies above the champion's, each arm has ``min_requests`` requests and neither errors nor latency
    say worse; else ``undecided`` (also while an arm has fewer than ``min_requests`` requests or ``min_ratings``
    ratings). Error rate and latency alone
    never make a challenger better: a version must win on what users rate.
    """
    d = args.decision
    z = z_value(d.confidence)
    arm = {a: arms.get(a) or {} for a in ARMS}
    errors = compare_rates(
        *((int(arm[a].get("errors", 0)), int(arm[a].get("requests", 0))) for a in ARMS),
        higher_is_better=False,
        z=z,
        min_samples=d.min_requests,
    )
    latency = compare_latency(
        *(list(arm[a].get("latency_s") or []) for a in ARMS), tolerance=d.latency_tolerance, min_samples=d.min_requests
    )
    rated = None
    if ratings is not None:
        r = {a: ratings.get(a) or {} for a in ARMS}
        rated = compare_rates(
            *((int(r[a].get("positive", 0)), int(r[a].get("count", 0))) for a in ARMS),
            higher_is_better=True,
            z=z,
            min_samples=d.min_ratings,
        )
    reasons = []
    if errors["outcome"] == "worse":
        reasons.append("its 5xx rate is significantly higher than the champion's")
    if latency["outcome"] == "worse":
        reasons.append(f"its p95 latency is more than {d.latency_tolerance:.0%} above the champion's")
    if rated is not None and rated["outcome"] == "worse":
        reasons.append("its positive-rating rate is significantly lower than the champion's")
    if reasons:
        verdict = "worse"
    elif rated is not None and rated["outcome"] == "better" and errors["outcome"] != "too_few":
        verdict, reasons = "better", ["its positive-rating rate is significantly higher; errors and latency hold"]
    else:
        verdict = "undecided"
        if rated is None:
            reasons.append("no ratings source: a challenger is judged better only on ratings")
        elif rated["outcome"] == "too_few":
            reasons.append(f"fewer than decision.min_ratings ({d.min_ratings}) ratings in an arm")
        elif rated["outcome"] == "undecided":
            reasons.append("the positive-rating intervals overlap")
        if errors["outcome"] == "too_few":
            reasons.append(f"fewer than decision.min_requests ({d.min_requests}) requests in an arm")
    test = (
        f"Wilson score intervals at {d.confidence:.0%} (Wilson 1927) on positive ratings and 5xx rate; "
        f"p95 latency within +{d.latency_tolerance:.0%}"
    )
    return {
        "verdict": verdict,
        "reasons": reasons,
        "test": test,
        "ratings": rated,
        "errors": errors,
        "latency": latency,
    }


# ---- one replica's state ----------------------------------------------------------------------------------------
@dataclass
class ArmCounts:
    """One arm's outcomes for one version, since the replica started."""

    requests: int = 0  # ended ok or with a 5xx: the error rate's denominator
    errors: int = 0  # 5xx
    client_errors: int = 0  # 4xx: the request's fault, counted apart
    cancelled: int = 0
    latency_s: deque = field(default_factory=lambda: deque(maxlen=1000))  # ok requests, arrival to answer

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "client_errors": self.client_errors,
            "cancelled": self.cancelled,
            "latency_s": [round(s, 4) for s in self.latency_s],
        }


@dataclass(frozen=True)
class Route:
    """Where a request for the champion went: ``arm``, the model name it was resolved as, and that arm's version."""

    arm: str
    name: str
    version: str | None


class Canary:
    """One replica's canary: routing, per-arm counts, the automatic stop and its record in the registry.

    Thread-safe (requests record from the event loop, the poll syncs from a registry thread).

    Args:
        args: ``ServeArgs`` (its ``champion`` and ``canary`` sections).
        clock: ``time.time``, replaceable in tests.
    """

    def __init__(self, args, clock=time.time):
        self.args = args
        self.cfg = args.canary
        ch = args.champion
        self.model = ch.model
        self.challenger_name = f"{ch.model}@{self.cfg.alias}" if ch.model else None
        # the names a client may send that mean the champion: these are re-routed, nothing else
        self.champion_names = {ch.name, ch.model, f"{ch.model}@{ch.alias}"} if ch.model else set()
        self.clock = clock
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str | None], ArmCounts] = {}
        self.recent: dict[tuple[str, str | None], deque] = {}  # last rollback.window outcomes: True = 5xx
        self.stopped: dict[str, str] = {}  # challenger version -> why its share is 0 (registry tag or this replica)
        self.unsaved: dict[str, str] = {}  # stops this replica decided that the registry has not recorded yet
        self.synced = False  # the last registry read of the challenger's tags answered
        self.sync_error: str | None = None
        self.synced_at: float | None = None
        self.registry_challenger: str | None = None  # the challenger alias's version at the last sync
        self._champion_window: deque | None = None  # the recent outcomes of the champion version last served

    @property
    def enabled(self) -> bool:
        return bool(self.challenger_name) and self.cfg.share > 0

    # ---- routing ----------------------------------------------------------------------------------------------
    def share(self, champion_version: str | None, challenger_version: str | None) -> float:
        """The challenger's share now (0..1): ``canary.share``, or 0 for the reasons in the module docstring."""
        if not self.enabled or challenger_version is None or champion_version is None:
            return 0.0
        if challenger_version == champion_version or not self.synced:
            return 0.0
        with self._lock:
            return 0.0 if challenger_version in self.stopped else self.cfg.share

    def pick(self, asked: str, key: str, known: Mapping[str, Any]) -> Route | None:
        """The arm of a request for ``asked`` with routing key ``key``; None when it is not a champion request.

        ``known``: the resolver's resolved names (``AdapterResolver.known()``: name -> adapter with ``.version``); the
        challenger is picked only once its name is resolved there (preloaded by the poll).
        """
        if not self.enabled or asked not in self.champion_names:  # no canary: nothing re-routed, nothing counted
            return None
        champion = known.get(asked) or known.get(self.args.champion.name)
        challenger = known.get(self.challenger_name) if self.challenger_name else None
        v_champion = getattr(champion, "version", None)
        v_challenger = getattr(challenger, "version", None)
        if arm_for(key, self.share(v_champion, v_challenger)) == CHALLENGER:
            return Route(CHALLENGER, self.challenger_name, v_challenger)
        return Route(CHAMPION, asked, v_champion)

    # ---- counting and the automatic stop ----------------------------------------------------------------------
    def record(self, route: Route, outcome: str, seconds: float) -> str | None:
        """Count one request's ``outcome`` ("ok", "cancelled", or the HTTP status as a string) on its arm; returns
        the reason when this outcome stopped the challenger (its share is 0 from now on in this replica)."""
        key = (route.arm, route.version)
        server_error = outcome.startswith(SERVER_ERROR)
        with self._lock:
            c = self.counts.get(key)
            if c is None:
                c = self.counts[key] = ArmCounts(latency_s=deque(maxlen=self.cfg.latency_samples))
            if outcome == "cancelled":
                c.cancelled += 1
                return None
            if not server_error and outcome != "ok":
                c.client_errors += 1
                return None
            c.requests += 1
            c.errors += server_error
            if not server_error:
                c.latency_s.append(seconds)
            window = self.recent.setdefault(key, deque(maxlen=self.cfg.rollback.window))
            window.append(server_error)
            if route.arm == CHAMPION:
                self._champion_window = window
            if route.arm != CHALLENGER or route.version is None or route.version in self.stopped:
                return None
            reason = self._spike(window, route.version)
            if reason is not None:
                self.stopped[route.version] = self.unsaved[route.version] = reason
            return reason

    def _spike(self, window: deque, version: str) -> str | None:  # under self._lock
        rb = self.cfg.rollback
        if len(window) < rb.min_requests:
            return None
        rate = sum(window) / len(window)
        champ = self._champion_window
        c_rate = sum(champ) / len(champ) if champ else 0.0  # no champion outcomes yet: compared with 0
        if rate > rb.max_error_rate and rate > c_rate + rb.margin:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock()))
            return (
                f"5xx rate {rate:.0%} over the challenger's last {len(window)} requests (version {version}) > "
                f"rollback.max_error_rate {rb.max_error_rate:.0%} and > the champion's {c_rate:.0%} + "
                f"{rb.margin:.0%} (at {when})"
            )
        return None

    # ---- the registry (called on a registry thread: AdapterResolver.watch) ------------------------------------
    def sync(self, client) -> dict[str, Any]:
        """Write the stops this replica decided (``lorafleet.canary_stopped`` tags), then read the challenger alias
        and its tag: a stop recorded by another replica applies here too; a tag cleared by ``lorafleet promote
        --challenger`` lets the challenger serve again, with a fresh error window. Returns ``state()``.

        Raises:
            Exception: whatever the registry call raised (the share stays 0 until a sync answers).
        """
        from mlflow.exceptions import MlflowException

        from evaluation.registry import MISSING_CODES

        if not self.model:
            return self.state()
        try:
            with self._lock:
                unsaved = dict(self.unsaved)
            for version, reason in unsaved.items():
                try:
                    client.set_model_version_tag(self.model, version, TAG_STOPPED, reason[:5000])
                except MlflowException as exc:  # the version was deleted meanwhile: nothing left to record it on
                    if exc.error_code not in MISSING_CODES:
                        raise
                with self._lock:
                    if self.unsaved.get(version) == reason:
                        del self.unsaved[version]
            try:
                found = client.get_model_version_by_alias(self.model, self.cfg.alias)
            except MlflowException as exc:  # only "no such alias" is an answer; a registry that is down is not
                if exc.error_code not in MISSING_CODES:
                    raise
                found = None
        except Exception as exc:
            with self._lock:
                self.synced, self.sync_error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            raise
        version = None if found is None else str(found.version)
        tag = None if found is None else (found.tags or {}).get(TAG_STOPPED)
        with self._lock:
            self.registry_challenger = version
            if version is not None:
                if tag:
                    self.stopped[version] = tag
                elif version in self.stopped and version not in self.unsaved:  # cleared: a new try starts clean
                    del self.stopped[version]
                    self.recent.pop((CHALLENGER, version), None)
            self.synced, self.sync_error, self.synced_at = True, None, self.clock()
        return self.state()

    def unsynced(self, why: str) -> None:
        """A registry read did not answer in time: the share is 0 until one does."""
        with self._lock:
            self.synced, self.sync_error = False, why

    # ---- reports -----------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Configuration and routing state (no counts)."""
        with self._lock:
            return {
                "model": self.model,
                "alias": self.cfg.alias,
                "share": self.cfg.share if self.enabled else 0.0,
                "challenger_version": self.registry_challenger,
                "stopped": dict(self.stopped),
                "unsaved_stops": sorted(self.unsaved),
                "registry_synced": self.synced,
                "registry_sync_error": self.sync_error,
                "synced_age_s": None if self.synced_at is None else round(self.clock() - self.synced_at, 1),
            }

    def snapshot(self, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Counts by arm and version, plus ``state()``; with ``known`` (resolved names) the arms' current versions
        and the share in effect now. Counts are additive across replicas (``merge``)."""
        with self._lock:
            counts = [{"arm": a, "version": v, **c.snapshot()} for (a, v), c in sorted(self.counts.items(), key=str)]
        out = self.state() | {"counts": counts}
        if known is not None and self.challenger_name:
            champion = getattr(known.get(self.args.champion.name), "version", None)
            challenger = getattr(known.get(self.challenger_name), "version", None)
            out |= {
                "champion_version": champion,
                "serving_challenger_version": challenger,
                "share_now": self.share(champion, challenger),
            }
        return out


def merge(snapshots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Counts of several replicas' ``Canary.snapshot()`` summed by (arm, version); latency samples concatenated."""
    merged: dict[tuple[str, str | None], dict[str, Any]] = {}
    for snap in snapshots:
        for row in snap.get("counts", []):
            key = (row["arm"], row["version"])
            into = merged.setdefault(
                key,
                {"arm": key[0], "version": key[1], "requests": 0, "errors": 0, "client_errors": 0, "cancelled": 0,
                 "latency_s": []},
            )  # fmt: skip
            for k in ("requests", "errors", "client_errors", "cancelled"):
                into[k] += int(row.get(k, 0))
            into["latency_s"] += list(row.get("latency_s", []))
    return list(merged.values())


def ratings_for(summary: Mapping[str, Any] | None, names: Iterable[str], version: str | None) -> dict | None:
    """One version's ratings from the feedback summary ``{model: {version: {count, positive, mean}}}``, summed over
    the model ``names`` it may be filed under (the registered model's name, under which the ingress files an image
    of a registry version, and the served name ``champion``, which older feedback logs may hold). None when there
    is no summary."""
    if summary is None:
        return None
    count = positive = 0
    weighted, rated = 0.0, 0
    for name in names:
        entry = (summary.get(name) or {}).get(str(version)) if version is not None else None
        if entry:
            count += int(entry.get("count", 0))
            positive += int(entry.get("positive", 0))
            if entry.get("mean") is not None:
                weighted += float(entry["mean"]) * int(entry.get("count", 0))
                rated += int(entry.get("count", 0))
    return {"count": count, "positive": positive, "mean": weighted / rated if rated else None}


def report(
    snapshots: list[dict[str, Any]], summary: Mapping[str, Any] | None, args, replicas_expected: int | None = None
) -> dict[str, Any]:
    """``GET /admin/canary``'s body: the replicas' snapshots merged, each arm's current version with its counts and
    ratings, and ``decide``'s verdict. ``summary``: the feedback summary (None: no ratings source)."""
    first = snapshots[0] if snapshots else {}
    champion_v = first.get("champion_version")
    challenger_v = first.get("challenger_version") or first.get("serving_challenger_version")
    rows = merge(snapshots)
    names = sorted({args.champion.name, *(n for n in [args.champion.model] if n)})
    arms: dict[str, dict[str, Any]] = {}
    for arm, version in ((CHAMPION, champion_v), (CHALLENGER, challenger_v)):
        row = next((r for r in rows if r["arm"] == arm and r["version"] == version), None)
        counts = row or {"requests": 0, "errors": 0, "client_errors": 0, "cancelled": 0, "latency_s": []}
        arms[arm] = {"version": version, **counts, "ratings": ratings_for(summary, names, version)}
    ratings = None if summary is None else {a: arms[a]["ratings"] for a in ARMS}
    verdict = decide(arms, ratings, args.canary)
    stopped = first.get("stopped", {})
    for arm in arms.values():  # the samples went into the verdict; the report keeps their count and p95
        samples = arm.pop("latency_s")
        arm["latency_samples"], arm["latency_p95_s"] = len(samples), p95(samples)
    return {
        "model": args.champion.model,
        "alias": args.canary.alias,
        "share": args.canary.share,
        "share_now": min((s.get("share_now", 0.0) for s in snapshots), default=0.0),
        "stopped": stopped.get(challenger_v) if challenger_v else None,
        "arms": arms,
        "other_versions": [r | {"latency_s": len(r["latency_s"])} for r in rows if (r["arm"], r["version"]) not in
                           {(CHAMPION, champion_v), (CHALLENGER, challenger_v)}],  # earlier arms since the start
        "replicas": sorted(s.get("pid") for s in snapshots if s.get("pid") is not None),
        "replicas_expected": replicas_expected,
        "ratings_source": summary is not None,
        **verdict,
    }  # fmt: skip
