"""The CI audit's summary of a pip-audit report: a vulnerability fails, and 'nothing audited' is never clean."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ci_audit", REPO / ".ci" / "audit.py")
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)


def test_a_known_vulnerability_fails_and_is_named(tmp_path, capsys):
    report = {
        "dependencies": [
            {"name": "requests", "version": "2.19.0", "vulns": [{"id": "PYSEC-2018-28", "fix_versions": ["2.20.0"]}]},
            {"name": "torch", "version": "2.13.0+cpu", "skip_reason": "Dependency not found on PyPI: local build"},
            {"name": "pillow", "version": "12.0.0", "vulns": []},
        ]
    }
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert audit.main(["--report", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "VULNERABLE requests 2.19.0: PYSEC-2018-28 (fixed in 2.20.0)" in out
    assert "3 installed packages, 2 audited, 1 not audited, 1 known vulnerabilities in 1 package(s)" in out
    assert "NOTHING WAS AUDITED" not in out


def test_nothing_audited_is_said_plainly_not_reported_clean():
    report = {
        "dependencies": [{"name": n, "version": "1", "skip_reason": "Dependency not found on PyPI"} for n in "ab"]
    }
    lines, code = audit.summarize(report)
    assert code == 0 and "not audited: 2 package(s): Dependency not found on PyPI" in lines
    assert any("NOTHING WAS AUDITED" in line for line in lines)
