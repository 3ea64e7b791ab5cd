"""``lorafleet canary``: how the challenger does against the champion on live traffic, and its promotion.

    lorafleet promote toy-sks-lora 7 --challenger       # 7 gets canary.share of the champion's requests
    lorafleet canary status toy-sks-lora                # arms, counts, Wilson intervals, the verdict
    lorafleet canary status toy-sks-lora --url http://127.0.0.1:8000 --api-key-env LORAFLEET_API_KEY --json
    lorafleet canary promote toy-sks-lora               # champion -> the challenger, only when it is "better"
    lorafleet canary promote toy-sks-lora --force       # without asking the Serve app (and past a stop or the gate)

The counts and the verdict come from the Serve app (``GET /admin/canary``, an admin key; serving/canary.py states the
test); the aliases and a stop's reason from the MLflow registry (``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``).
``promote`` moves ``champion`` to the challenger's version (the old champion becomes ``previous``, so ``lorafleet
rollback NAME`` undoes it) and removes the ``challenger`` alias. Exit codes: 0 done, 1 refused or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx

from evaluation.registry import (
    CHALLENGER,
    TAG_CANARY_STOPPED,
    TAG_STATUS,
    RegistryError,
    client_for,
    current,
    promote_challenger,
)

DEFAULT_URL = "http://127.0.0.1:8000"


def fetch_report(url: str, api_key: str | None, timeout_s: float = 10.0) -> dict[str, Any]:
    """``GET <url>/admin/canary`` (serving/http.py) with ``Authorization: Bearer <api_key>``.

    Raises:
        RuntimeError: the server did not answer, or answered with an error (its message quoted).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/admin/canary", headers=headers, timeout=timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL (a malformed URL) is no HTTPError
        raise RuntimeError(f"the Serve app at {url} did not answer ({type(exc).__name__}: {exc}); pass --url") from exc
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        hint = " (an admin key: --api-key-env)" if response.status_code in (401, 403) else ""
        raise RuntimeError(f"GET {url}/admin/canary answered {response.status_code}: {message}{hint}")
    try:
        report = response.json()
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise RuntimeError(f"GET {url}/admin/canary answered 200 with {response.headers.get('content-type')!r}, not "
                           "the canary's JSON report: pass the lorafleet Serve app's address as --url")  # fmt: skip
    return report


def registry_view(client, name: str) -> dict[str, Any]:
    """The aliases and tags that matter for the canary: champion, challenger, its gate status and stop reason."""
    champion, challenger = current(client, name, "champion"), current(client, name, CHALLENGER)
    tags = (challenger.tags or {}) if challenger is not None else {}
    return {
        "champion": None if champion is None else str(champion.version),
        "challenger": None if challenger is None else str(challenger.version),
        "challenger_status": tags.get(TAG_STATUS),
        "stopped": tags.get(TAG_CANARY_STOPPED),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(interval: list[float] | None) -> str:
    return "-" if not interval else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]%"


def render(name: str, reg: dict[str, Any] | None, rep: dict[str, Any] | None) -> str:
    """The status text: registry aliases, each arm's counts with their intervals, the stop, the verdict."""
    lines = [f"{name}"]
    if reg is not None:
        lines.append(
            f"  registry: champion {reg['champion'] or '-'}, challenger {reg['challenger'] or '-'}"
            + (f" (gate: {reg['challenger_status']})" if reg.get("challenger_status") else "")
        )
    if rep is None:
        return "\n".join(lines)
    seen, expected = rep.get("replicas") or [], rep.get("replicas_expected")
    lines.append(
        f"  share: {_pct(rep['share'])} configured, {_pct(rep['share_now'])} now; replicas counted: {len(seen)}"
        + (f" of {expected}" if expected else "")
    )
    lines.append(f"  {'arm':<11}{'version':>8}{'requests':>10}{'5xx':>6}  {'5xx rate [CI]':<24}"
                 f"{'+ratings/n':>11}  {'positive [CI]':<24}{'p95 s':>8}")  # fmt: skip
    for arm in ("champion", "challenger"):
        a = rep["arms"][arm]
        e = (rep.get("errors") or {}).get(arm) or {}
        r = (rep.get("ratings") or {}).get(arm) or {}
        rated = a.get("ratings") or {}
        p95 = a.get("latency_p95_s")
        lines.append(
            f"  {arm:<11}{a.get('version') or '-':>8}{a['requests']:>10}{a['errors']:>6}  "
            f"{_pct(e.get('rate')) + ' ' + _ci(e.get('interval')):<24}"
            f"{str(rated.get('positive', '-')) + '/' + str(rated.get('count', '-')):>11}  "
            f"{_pct(r.get('rate')) + ' ' + _ci(r.get('interval')):<24}{'-' if p95 is None else f'{p95:.3f}':>8}"
        )
    stopped = rep.get("stopped") or (reg or {}).get("stopped")
    lines.append(f"  stopped: {stopped}" if stopped else "  stopped: no")
    if not rep.get("ratings_source"):
        lines.append("  ratings: no feedback source on this server")
    lines.append(f"  verdict: {rep['verdict']} - {'; '.join(rep.get('reasons') or [])}")
    lines.append(f"  test: {rep.get('test')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet canary", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for verb, help_ in (
        ("status", "the arms' versions, shares, counts, intervals and the verdict"),
        ("promote", "champion -> the challenger's version when the verdict is 'better' (or --force)"),
    ):
        s = sub.add_parser(verb, help=help_)
        s.add_argument("name", help="the registered model (champion.model of the Serve config)")
        s.add_argument("--url", default=os.environ.get("LORAFLEET_URL", DEFAULT_URL), help="the Serve app")
        s.add_argument("--api-key-env", default="LORAFLEET_API_KEY", help="env var holding an admin API key")
        s.add_argument("--tracking-uri", default=None, help="MLflow registry (default $MLFLOW_TRACKING_URI)")
        if verb == "status":
            s.add_argument("--json", action="store_true", help="print the registry view and the report as JSON")
        else:
            s.add_argument("--force", action="store_true", help="promote without the verdict, past a stop and the gate")
    args = p.parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    from mlflow.exceptions import MlflowException

    from training.tracking_rest import tracking_problem

    problem = tracking_problem(uri) if uri else None  # within seconds, not MlflowClient's minutes of retries
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        client = client_for(uri) if uri else None
        reg = registry_view(client, args.name) if client is not None else None
        if args.command == "status":
            return _status(args, reg, api_key)
        if client is None:
            print("error: set MLFLOW_TRACKING_URI or pass --tracking-uri (where the registry lives)", file=sys.stderr)
            return 2
        return _promote(args, client, reg, api_key)
    except (RegistryError, MlflowException) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1


def _report_for(args, api_key: str | None) -> dict[str, Any]:
    rep = fetch_report(args.url, api_key)
    if rep.get("model") != args.name:
        raise RuntimeError(
            f"the Serve app at {args.url} runs the canary of {rep.get('model')!r} (champion.model), not {args.name!r}"
        )
    return rep


def _status(args, reg: dict[str, Any] | None, api_key: str | None) -> int:
    try:
        rep = _report_for(args, api_key)
    except RuntimeError as exc:
        rep, problem = None, str(exc)
    else:
        problem = None
    if args.json:
        print(json.dumps({"registry": reg, "report": rep, "error": problem}, indent=2))
    else:
        print(render(args.name, reg, rep))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problem else 0


def _promote(args, client, reg: dict[str, Any], api_key: str | None) -> int:
    version = reg["challenger"]
    if version is None:
        raise RegistryError(f"{args.name} has no challenger: set one with lorafleet promote {args.name} VERSION "
                            "--challenger")  # fmt: skip
    refusals = []
    if reg["challenger_status"] == "rejected":
        refusals.append(f"version {version} was rejected by the evaluation gate (its eval run's report says why)")
    if reg["stopped"]:
        refusals.append(f"its canary was stopped: {reg['stopped']}")
    if not args.force:
        try:
            rep = _report_for(args, api_key)
        except RuntimeError as exc:
            refusals.append(f"no verdict: {exc}")
        else:
            served = rep["arms"]["challenger"].get("version")
            if served != version:
                refusals.append(f"the Serve app's challenger is version {served}, the registry's {version}: wait for "
                                "its poll (champion.poll_s) or POST /admin/reload, then ask again")  # fmt: skip
            elif rep["verdict"] != "better":
                refusals.append(f"the verdict is {rep['verdict']!r}: {'; '.join(rep.get('reasons') or [])}")
    if refusals and not args.force:
        print(f"error: not promoting {args.name} version {version}: " + "; ".join(refusals)
              + "; pass --force to promote it anyway", file=sys.stderr)  # fmt: skip
        return 1
    old, new = promote_challenger(client, args.name)
    print(f"{args.name}: champion -> version {new}" + (f" (was {old}, now previous)" if old else "")
          + f"; the {CHALLENGER} alias is removed")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
