"""A head `lorafleet up` starts keeps working when a Ray token appears on the machine later. Ray 2.60 decides token
auth per process by whether ``~/.ray/auth_token`` exists; a head started before any token ran without auth, and once
someone's ``ray.init()`` wrote the file, every new job driver switched to token mode, the head took it for dead and
cancelled its actors: every Tune trial of every later job failed ("The actor never ran - it was cancelled before it
started running"; 15 of 20 jobs in the queue burst). `up` now pins one mode for the head and everything it starts
(cluster.local.pin_auth_mode). Runs in a process of its own with a fresh HOME (no token) and TMPDIR."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.cluster.decoy import short_tmpdir
from tests.procs import run_ok

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def test_jobs_keep_running_when_a_token_appears_after_up(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with short_tmpdir() as tmpdir:
        env = os.environ | {"HOME": str(home), "TMPDIR": str(tmpdir), "PYTHONPATH": os.getcwd()}
        for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
            env.pop(var, None)
        done = run_ok([sys.executable, "-m", "tests.cluster.auth_scenario", str(tmp_path / "cluster")], env=env,
                      timeout=3000)  # fmt: skip
    out = json.loads(done.stdout.strip().splitlines()[-1])
    shown = json.dumps(out, indent=1)[-6000:]
    assert out["token_before_up"] is False and out["token_after_elsewhere"], shown
    assert out["first"]["status"] == "SUCCEEDED" and "the actor ran" in out["first"]["log"], shown
    assert out["second"]["status"] == "SUCCEEDED" and "the actor ran" in out["second"]["log"], shown
    # how: `up` made the token (owner-only) and started the head in token mode
    assert out["token_after_up"] and out["token_mode"] == "0o600" and out["head_auth_mode"] == "token", shown
