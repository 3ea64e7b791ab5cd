"""The promotion gate: thresholds from config plus "beats the champion", each check with its margin.

Pure: metrics in, a verdict out.

    result = run_gate(metrics, cfg.gate, champion={"version": "3", "metrics": {...}})
    result.passed, result.failures()   # ['concept_hit_rate 0.61 < min 0.80 (short by 0.19)']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from evaluation.config import METRICS, GateArgs


@dataclass
class Check:
    name: str  # e.g. "concept_hit_rate >= 0.8" or "beats champion v3 on clip_t"
    metric: str
    value: float | None
    op: str  # ">=", "<=", ">"
    threshold: float
    passed: bool
    margin: float | None  # how far inside (+) or outside (-) the threshold, in the metric's units

    def describe(self) -> str:
        value = "not measured" if self.value is None or math.isnan(self.value) else f"{self.value:.4g}"
        if self.passed:
            return f"{self.name}: {value} (margin {self.margin:+.4g})"
        if self.margin is None:
            return f"{self.name}: {value}"
        return f"{self.name}: {value}, short by {-self.margin:.4g}"


@dataclass
class GateResult:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    champion: dict[str, Any] | None = None  # {"version", "metrics", "source": "stored" | "re-evaluated"}

    def failures(self) -> list[str]:
        return [c.describe() for c in self.checks if not c.passed]

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        failed = self.failures()
        return f"gate {verdict}" + (": " + "; ".join(failed) if failed else f" ({len(self.checks)} checks)")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks], "champion": self.champion}


def _bound_check(metric: str, value: float | None, op: str, threshold: float, name: str | None = None) -> Check:
    name = name or f"{metric} {op} {threshold:g}"
    if value is None or math.isnan(value):
        return Check(name, metric, value, op, threshold, False, None)
    margin = value - threshold if op in (">=", ">") else threshold - value
    passed = margin > 0 if op == ">" else margin >= 0
    return Check(name, metric, value, op, threshold, passed, margin)


def run_gate(metrics: dict[str, float], args: GateArgs, champion: dict[str, Any] | None = None) -> GateResult:
    """Every configured bound, then (when ``args.beat_champion`` and there is a champion) the primary metric
    against the champion's, measured on the same suite. A metric that was not measured fails its check."""
    checks = []
    for metric, bound in args.checks.items():
        if bound.min is not None:
            checks.append(_bound_check(metric, metrics.get(metric), ">=", bound.min))
        if bound.max is not None:
            checks.append(_bound_check(metric, metrics.get(metric), "<=", bound.max))
    if args.beat_champion and champion is not None:
        metric = args.primary_metric
        theirs = champion["metrics"].get(metric)
        if theirs is None or math.isnan(theirs):
            checks.append(Check(f"champion v{champion['version']} has no {metric}", metric, None, ">", 0, True, 0.0))
        else:
            higher = METRICS[metric] == "max"
            step = args.min_improvement
            target = theirs + step if higher else theirs - step
            op = ">" if higher else "<"
            name = f"beats champion v{champion['version']} on {metric} ({op} {target:.4g})"
            ours = metrics.get(metric)
            if higher:
                checks.append(_bound_check(metric, ours, ">", target, name))
            else:  # lower is better: compare the negated values
                neg = None if ours is None else -ours
                c = _bound_check(metric, neg, ">", -target, name)
                c.value, c.op, c.threshold = ours, "<", target
                checks.append(c)
    return GateResult(all(c.passed for c in checks), checks, champion)
