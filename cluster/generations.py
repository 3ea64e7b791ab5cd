"""``lorafleet generations``: what a served model did, from its generation records (MLflow traces, serving/records.py).

    lorafleet generations --model toy-sks-lora --since 1h
    lorafleet generations --model toy-sks-lora --version 3 --since 2026-12-01T09:00 --json
    lorafleet generations --model base --tracking-uri http://127.0.0.1:5000 --experiment lorafleet-generations

Per registry version (``-`` for none): requests, how they ended (ok / rejected 4xx / error 5xx / cancelled), the
error rate (5xx share), p50/p95 latency of successful answers (arrival to answer, from each trace's execution time),
the cache hit rate and the most common prompts (not when the replica redacted them: they are then shown as
``sha256:…/<chars>`` counts). Figures are over the sampled traces (``records.sample_rate``) of every replica, so
they add up across replicas; exact per-replica counts are on the summary runs (``lorafleet.kind`` tag
``production-summary``) in the same experiment.

Exit codes: 0 printed, 1 nothing recorded (no experiment, no traces) or the tracking server did not answer (found
within seconds: ``training.tracking_rest.tracking_problem``), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import unicodedata
from collections import Counter
from datetime import datetime, timezone

from serving.records import TRACE_NAME, outcome_kind, percentile

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def since_ms(value: str, now: float | None = None) -> int:
    """``--since``: an age (``90s``, ``30m``, ``1h``, ``7d``, ``2w``) or an ISO 8601 time (naive = UTC) -> unix ms.

    Raises:
        ValueError: neither form (the message names ``--since`` and both forms)."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])\s*", value)
    if m:
        start = now - float(m.group(1)) * UNITS[m.group(2)]  # inf for an age of hundreds of digits
    else:
        try:
            t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"--since {value!r}: give an age like 30m, 1h, 7d or an ISO time like 2026-12-01T09:00 (UTC)"
            ) from None
        start = (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    if not 0 <= start < float("inf"):  # trace times are unix ms: nothing is older than 1970
        raise ValueError(f"--since {value[:40]!r} reaches back before 1970-01-01: give a shorter age or a later time, "
                         "or leave --since out for every record")  # fmt: skip
    return int(start * 1000)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def search(uri: str, experiment: str, model: str, version: str | None, since: int | None, limit: int) -> list | None:
    """The ``TraceInfo`` of ``model``'s generation traces (of ``version`` when given) since ``since`` (unix ms),
    newest first, at most ``limit``; None when the experiment does not exist. Uses ``MlflowClient(uri).search_traces``
    (MLflow's trace search, filtering on the trace tags the replicas set) page by page, without spans."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    where = [f"trace.name = {_quote(TRACE_NAME)}", f"tag.model = {_quote(model)}"]
    if version is not None:
        where.append(f"tag.version = {_quote('' if version == '-' else version)}")
    if since is not None:
        where.append(f"trace.timestamp_ms > {since}")
    traces, token = [], None
    while len(traces) < limit:
        page = client.search_traces(
            locations=[exp.experiment_id],
            filter_string=" AND ".join(where),
            max_results=min(500, limit - len(traces)),
            order_by=["timestamp_ms DESC"],
            page_token=token,
            include_spans=False,
        )
        traces.extend(t.info for t in page)
        token = page.token
        if not token or not page:
            break
    return traces


def summarize(infos: list, top: int = 5) -> dict[str, dict]:
    """Per version (``"-"`` for none): ``{"requests", "ok", "rejected", "errors", "cancelled", "error_rate",
    "cache_hit_rate", "latency_p50_s", "latency_p95_s", "top_prompts": [[prompt, count], ...], "redacted"}`` from
    ``mlflow.entities.TraceInfo`` objects written by serving/records.py (tags ``version``, ``outcome``, ``cached``;
    latency = ``execution_duration`` ms; prompt = ``request_preview``)."""
    groups: dict[str, list] = {}
    for info in infos:
        groups.setdefault(info.tags.get("version") or "-", []).append(info)
    out = {}
    for version, items in sorted(groups.items(), key=lambda kv: kv[0]):
        kinds = Counter(outcome_kind(i.tags.get("outcome", "500")) for i in items)
        ok = [i for i in items if i.tags.get("outcome") == "ok"]
        latencies = [i.execution_duration / 1000 for i in ok if i.execution_duration is not None]
        prompts = Counter(i.request_preview or "" for i in items)
        redacted = bool(prompts) and all(p.startswith("sha256:") or not p for p in prompts)
        out[version] = {
            "requests": len(items),
            "ok": kinds["ok"],
            "rejected": kinds["rejected"],
            "errors": kinds["error"],
            "cancelled": kinds["cancelled"],
            "error_rate": kinds["error"] / len(items),
            "cache_hit_rate": sum(i.tags.get("cached") == "true" for i in ok) / len(ok) if ok else 0.0,
            "latency_p50_s": percentile(latencies, 0.5),
            "latency_p95_s": percentile(latencies, 0.95),
            "redacted": redacted,
            "top_prompts": [] if redacted else [[p, c] for p, c in prompts.most_common(top)],
        }
    return out


def printable(text: str) -> str:
    """``text`` with every control, format (bidi overrides), separator-of-lines and unassigned character escaped
    (``\\x1b``, ``\\u202e``): a prompt is a client's text, and printed raw it could move the cursor, retitle or
    clear an admin's terminal, or start a forged line of the report."""
    return "".join(
        c if unicodedata.category(c)[0] != "C" and unicodedata.category(c) not in ("Zl", "Zp")
        else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
        for c in text
    )  # fmt: skip


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def render(model: str, summary: dict[str, dict], since: str | None) -> str:
    """The summary as the text ``lorafleet generations`` prints."""
    lines = [f"generations of {model}" + (f" since {since}" if since else "") + " (sampled traces)"]
    for version, s in summary.items():
        plural = "" if s["requests"] == 1 else "s"
        lines.append(
            f"  version {version}: {s['requests']} request{plural}, {s['ok']} ok, {s['rejected']} rejected (4xx), "
            f"{s['errors']} errors (5xx), {s['cancelled']} cancelled; error rate {s['error_rate']:.1%}; "
            f"latency p50 {_seconds(s['latency_p50_s'])} p95 {_seconds(s['latency_p95_s'])}; "
            f"cache hits {s['cache_hit_rate']:.1%}"
        )
        if s["redacted"]:
            lines.append("    prompts: redacted (records.redact_prompts)")
        for prompt, count in s["top_prompts"]:
            lines.append(f"    {count:5d}  {printable(prompt[:100])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet generations", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="served model name (a registered model, an adapter, base)")
    p.add_argument("--version", help="one registry version ('-': requests without one); default: every version")
    p.add_argument("--since", help="an age (30m, 1h, 7d) or an ISO time (UTC when naive); default: all")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the up cluster's)")
    p.add_argument("--experiment", default="lorafleet-generations", help="the serve config's records.experiment")
    p.add_argument("--limit", type=int, default=10000, help="newest traces read at most (default 10000)")
    p.add_argument("--top", type=int, default=5, help="most common prompts shown per version")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    uri = a.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("error: no tracking URI: pass --tracking-uri or set $MLFLOW_TRACKING_URI (or run `lorafleet up`)",
              file=sys.stderr)  # fmt: skip
        return 2
    if a.limit < 1:
        print(f"error: --limit {a.limit}: give at least 1", file=sys.stderr)
        return 2
    try:
        since = since_ms(a.since) if a.since else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException

    from training.tracking_rest import tracking_problem

    problem = tracking_problem(uri)  # within seconds, not MlflowClient's minutes of retries
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        infos = search(uri, a.experiment, a.model, a.version, since, a.limit)
    except MlflowException as exc:  # e.g. a tracking URI MLflow has no store for
        print(f"error: {(exc.message or str(exc)).strip().splitlines()[0][:300]} (--tracking-uri {uri})",
              file=sys.stderr)  # fmt: skip
        return 1
    if infos is None:
        print(f"no generation records: experiment {a.experiment!r} does not exist at {uri} (records.enabled and "
              "records.experiment in the serve config)", file=sys.stderr)  # fmt: skip
        return 1
    if not infos:
        which = a.model + (f" version {a.version}" if a.version else "") + (f" since {a.since}" if a.since else "")
        print(f"no generation records of {which} in experiment {a.experiment!r}", file=sys.stderr)
        return 1
    summary = summarize(infos, a.top)
    text = json.dumps({"model": a.model, "versions": summary}, indent=2) if a.json else None
    print(text or render(a.model, summary, a.since))
    return 0


if __name__ == "__main__":
    sys.exit(main())
