"""Audit the installed dependencies for known vulnerabilities (pip-audit) and print the report into the log.

    python .ci/audit.py                        # make audit; CI runs it before the tests
    python .ci/audit.py --report audit.json    # summarise a pip-audit JSON report made elsewhere (no network)

Exit 1 when a vulnerability is reported. A package the vulnerability service does not know (private, or the
service is unreachable) is listed as not audited with the reason; when no package could be audited at all, the
summary says so plainly instead of reading as a clean bill.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path


def summarize(report: dict) -> tuple[list[str], int]:
    """pip-audit's JSON report -> the lines to print and the exit code (1: a known vulnerability)."""
    deps = report["dependencies"]
    vulnerable = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if "skip_reason" in d]
    lines = []
    for d in vulnerable:
        for v in d["vulns"]:
            fix = ", ".join(v.get("fix_versions") or []) or "no fixed release yet"
            lines.append(
                f"VULNERABLE {d['name']} {d['version']}: {v['id']} (fixed in {fix}) {v.get('description', '')[:200]}"
            )
    reasons: dict[str, int] = {}
    for d in skipped:
        reason = d["skip_reason"].split(":")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    lines += [f"not audited: {count} package(s): {reason}" for reason, count in sorted(reasons.items())]
    audited, found = len(deps) - len(skipped), sum(len(d["vulns"]) for d in vulnerable)
    lines.append(f"audit: {len(deps)} installed packages, {audited} audited, {len(skipped)} not audited, "
                 f"{found} known vulnerabilities in {len(vulnerable)} package(s)")  # fmt: skip
    if audited == 0:
        lines.append("audit: NOTHING WAS AUDITED — the vulnerability service (PyPI's JSON API) did not answer for "
                     "any package here; run `make audit` where pypi.org is reachable for a real result")  # fmt: skip
    return lines, 1 if vulnerable else 0


def run_pip_audit() -> dict | None:
    out = Path(tempfile.mkdtemp(prefix="audit-")) / "audit.json"
    site = sysconfig.get_paths()["purelib"]
    cmd = [sys.executable, "-m", "pip_audit", "--path", site, "--progress-spinner", "off", "--desc", "on",
           "-f", "json", "-o", str(out)]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if not out.is_file():
        print(proc.stdout, proc.stderr, sep="\n")
        return None
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--report", help="a pip-audit JSON report to summarise instead of running pip-audit")
    a = p.parse_args(argv)
    report = json.loads(Path(a.report).read_text()) if a.report else run_pip_audit()
    if report is None:
        print("audit: pip-audit produced no report (see its output above)")
        return 1
    lines, code = summarize(report)
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
