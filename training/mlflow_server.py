"""Start and stop a local MLflow tracking server on loopback (SQLite + proxied local artifacts).

    server = start_mlflow_server("runs/mlflow", port=5000)   # http://127.0.0.1:5000
    ...
    server.stop()

Clients log over HTTP, so several processes (Ray workers, Tune trials) can write at once; the
SQLite file has exactly one writer, the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MlflowServer:
    uri: str
    pid: int
    state_dir: Path
    process: subprocess.Popen | None = None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and its workers (they share a process group)."""
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_mlflow_server(
    state_dir: str | Path, port: int | None = None, host: str = "127.0.0.1", timeout: float = 60.0
) -> MlflowServer:
    """Run ``mlflow server`` in its own process group and wait until ``/health`` answers.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout`` (its log path is named).
    """
    state = Path(state_dir).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    log = open(state / "server.log", "ab")  # noqa: SIM115 — handed to the child process
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
        "--artifacts-destination", str(state / "artifacts"),
    ]  # fmt: skip
    # MLflow 3's job runner (GenAI scorers and prompt optimisation; six extra processes, ~1 GB) is not used here
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    server = MlflowServer(f"http://{host}:{port}", proc.pid, state, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}; see {state / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"mlflow server did not answer on {server.uri} within {timeout:.0f}s; see {state}/server.log")
