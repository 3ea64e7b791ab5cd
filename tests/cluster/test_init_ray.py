"""``init_ray`` joins a cluster explicitly — $RAY_ADDRESS, else `lorafleet up`'s recorded cluster, else a private
local instance — never Ray's "most recently started cluster", even when a decoy ``ray start --head`` (default temp
dir) was started after ``up``. ``init_ray`` runs in a separate driver process, as an entry point would (the three
cases one after the other, ``ray.shutdown()`` between them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import Ports, down, up
from tests.cluster.decoy import decoy_head, free_port, short_tmpdir
from training.cluster_state import ClusterState, private_temp_dir, short_enough

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# One driver process, three cases in turn (ray.shutdown() between them); it imports while the parent starts the decoy.
CHILD = r"""
import json, os, subprocess, sys
import ray
from training.ray_train import init_ray


def joined(**env):
    for key, value in env.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    address = init_ray()
    found = {"address": address, "session_dir": ray._private.worker._global_node.get_session_dir_path()}
    return found


decoy = sys.stdin.readline().strip()  # the decoy runs now
out = {"explicit": joined(RAY_ADDRESS=decoy)}  # first: before anything set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER here
ray.shutdown()
out["ours"] = joined(RAY_ADDRESS=None)
ray.shutdown()
out["private"] = joined(LORAFLEET_STATE_DIR=os.environ["EMPTY_STATE_DIR"])
# someone else's plain ray.init() while the private instance runs
probe = "import ray; ray.init(); print('PLAIN', ray.get_runtime_context().gcs_address); ray.shutdown()"
done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
found = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("PLAIN ")]
out["plain"] = found[0] if found else done.stderr[-3000:]
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


def result(proc: subprocess.Popen, decoy: str) -> dict:
    try:
        out, _ = proc.communicate(decoy + "\n", timeout=240)
    except subprocess.TimeoutExpired:  # e.g. a driver waiting for a raylet on the wrong interface
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"init_ray did not return within 240 s: {out[-4000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, out[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_init_ray_joins_the_recorded_cluster_not_a_later_decoy(repo, tmp_path):
    state_dir, empty = tmp_path / "state", tmp_path / "no-cluster"
    empty.mkdir()
    with short_tmpdir() as tmpdir, pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmpdir))  # Ray's default temp dir is $TMPDIR/ray for every process below
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"):
            mp.delenv(var, raising=False)
        ports = Ports(*(free_port() for _ in range(6)))
        state = up(state_dir, ports, num_cpus=1)
        driver = None
        try:
            recorded = ClusterState.load(state_dir)
            assert recorded.gcs_address == f"127.0.0.1:{ports.ray}" and recorded.temp_dir == state.temp_dir
            assert short_enough(recorded.temp_dir) and not recorded.temp_dir.startswith(str(tmpdir))
            # a user's shell: no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (conftest sets it for this process)
            env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
            env |= {"LORAFLEET_STATE_DIR": str(state_dir), "EMPTY_STATE_DIR": str(empty)}
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
            driver = subprocess.Popen([sys.executable, "-c", CHILD], cwd=repo, env=env, text=True, **pipes)
            with decoy_head(tmpdir) as decoy:  # started after `up`: Ray's "latest cluster" is now the decoy
                found = result(driver, decoy.gcs_address)
        finally:
            if driver is not None and driver.poll() is None:  # the decoy did not start: the driver still waits
                driver.kill()
            down(state_dir)
            if state.temp_dir and not state.temp_dir.startswith(str(state_dir)):  # the short /tmp fallback
                shutil.rmtree(state.temp_dir, ignore_errors=True)
    explicit, ours, private = found["explicit"], found["ours"], found["private"]
    # (a) $RAY_ADDRESS wins (inside a job it is the job's own cluster), even over the recorded one
    assert explicit["address"] == decoy.gcs_address
    # (b) the recorded cluster, by its address: its session lives in up's own temp dir
    assert ours["address"] == state.gcs_address
    assert Path(ours["session_dir"]).parent == Path(state.temp_dir)
    # (c) nothing recorded: a new instance in the private temp dir, neither up's nor the decoy...
    assert private["address"] not in (state.gcs_address, decoy.gcs_address)
    assert Path(private["session_dir"]).parent == private_temp_dir()
    # ... which another process's plain ray.init() does not join (it joins Ray's latest cluster: the decoy)
    assert found["plain"] == decoy.gcs_address, found["plain"]
