"""A decoy Ray head for tests: a plain ``ray start --head`` with Ray's default temp dir, started after lorafleet's
cluster, so that Ray's "most recently started cluster" file names the decoy.

Ray's default temp dir is ``$TMPDIR/ray`` (``/tmp/ray`` when TMPDIR is unset). The tests point TMPDIR at a short
folder of their own for every process involved (lorafleet's head, the decoy, the drivers): the decoy is then the
default cluster for all of them exactly as with ``/tmp/ray``, without capturing other people's ``ray.init()`` on
this shared machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster.local import answers, stop_group
from training.cluster_state import HOST, alive, listening


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A short folder for TMPDIR (Ray's socket paths below ``$TMPDIR/ray`` must stay under 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Decoy:
    pid: int  # leader of the decoy's process group
    gcs_address: str
    dashboard_url: str | None
    temp_dir: Path  # Ray's default temp dir for processes with this TMPDIR


@contextlib.contextmanager
def decoy_head(tmpdir: Path, *, dashboard: bool = False, timeout: float = 120) -> Iterator[Decoy]:
    """Start ``ray start --head`` with ``TMPDIR=tmpdir`` (default temp dir), wait until it is Ray's "latest
    cluster" there, yield it, stop its process group."""
    from ray._private.utils import read_ray_address

    gcs_port = free_port()
    gcs = f"{HOST}:{gcs_port}"
    dash = f"http://{HOST}:{free_port()}" if dashboard else None
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", HOST, "--port", str(gcs_port), "--num-cpus", "1",
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        *(["--dashboard-host", HOST, "--dashboard-port", dash.rsplit(":", 1)[1]] if dash
          else ["--include-dashboard=false"]),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env |= {"TMPDIR": str(tmpdir), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmpdir / "decoy.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    default_temp = tmpdir / "ray"
    try:
        deadline = time.monotonic() + timeout
        while not (
            read_ray_address(str(default_temp)) == gcs
            and listening(HOST, gcs_port)
            and (dash is None or answers(f"{dash}/api/version"))
        ):
            if not alive(proc.pid) or time.monotonic() > deadline:
                raise RuntimeError(f"the decoy Ray head did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Decoy(proc.pid, gcs, dash, default_temp)
    finally:
        stop_group(proc.pid, 30)
