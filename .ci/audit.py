"""Audit the installed dependencies for known vulnerabilities (pip-audit) and print the report into the log.

    python .ci/audit.py            # make audit; CI runs it before the tests

Exit 1 when a vulnerability is reported. A package the vulnerability service does not know (private, or the
service is unreachable) is listed as not audited with the reason; when no package could be audited at all, the
summary says so plainly instead of reading as a clean bill.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="audit-")) / "audit.json"
    site = sysconfig.get_paths()["purelib"]
    cmd = [sys.executable, "-m", "pip_audit", "--path", site, "--progress-spinner", "off", "--desc", "on",
           "-f", "json", "-o", str(out)]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if not out.is_file():
        print(proc.stdout, proc.stderr, sep="\n")
        print("audit: pip-audit produced no report (see its output above)")
        return 1
    deps = json.loads(out.read_text())["dependencies"]
    vulnerable = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if "skip_reason" in d]
    for d in vulnerable:
        for v in d["vulns"]:
            fix = ", ".join(v.get("fix_versions") or []) or "no fixed release yet"
            print(f"VULNERABLE {d['name']} {d['version']}: {v['id']} (fixed in {fix}) {v.get('description', '')[:200]}")
    reasons: dict[str, int] = {}
    for d in skipped:
        reasons[d["skip_reason"].split(":")[0]] = reasons.get(d["skip_reason"].split(":")[0], 0) + 1
    for reason, count in sorted(reasons.items()):
        print(f"not audited: {count} package(s): {reason}")
    audited = len(deps) - len(skipped)
    found = sum(len(d["vulns"]) for d in vulnerable)
    print(f"audit: {len(deps)} installed packages, {audited} audited, {len(skipped)} not audited, "
          f"{found} known vulnerabilities in {len(vulnerable)} package(s)")  # fmt: skip
    if audited == 0:
        print("audit: NOTHING WAS AUDITED — the vulnerability service (PyPI's JSON API) did not answer for any "
              "package here; run `make audit` where pypi.org is reachable for a real result")  # fmt: skip
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
