"""What ``lorafleet up`` recorded about its local cluster (``<state dir>/state.json``), and where Ray keeps its files.

    from training.cluster_state import recorded_cluster

    state = recorded_cluster()          # None unless `lorafleet up`'s Ray head runs (PID alive, GCS answers)
    state.gcs_address, state.temp_dir   # what `ray.init(address=...)` joins; the head's own Ray temp dir

No Ray import at module level: ``training.ray_train.init_ray`` and the ``cluster`` commands both read it, and a
lower floor (training/) must not import a higher one (cluster/). ``enable_token_auth`` is the one Ray call here,
shared by both for the same reason.

Why a private temp dir: Ray picks "the most recently started cluster" from the shared ``/tmp/ray/ray_current_cluster``
whenever it is not told an address — a plain ``ray.init()``, and the job supervisor's address for each job driver
(it reads ``<head temp dir>/ray_current_cluster``). A head started with its own ``--temp-dir`` writes that file
there, where no other ``ray start --head`` overwrites it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
STATE_FILE = "state.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Ray's AF_UNIX sockets live at <temp dir>/session_<date>_<microseconds>_<pid>/sockets/<name>; the longest tail is
# "/session_2025-01-01_12-00-00_123456_4194304/sockets/dash_TaskEventsHead" (72 characters), and Linux caps the
# whole path at 107 bytes. A longer temp dir makes `ray start` fail with "AF_UNIX path length cannot exceed".
RAY_SOCKET_TAIL = 72
MAX_SOCKET_PATH = 107
SHORT_ROOT = Path("/tmp")  # not $TMPDIR: on macOS that is /var/folders/…, already too long


def default_state_dir() -> Path:
    """``$LORAFLEET_STATE_DIR``, else ``<project>/runs/cluster`` (absolute)."""
    return Path(os.environ.get("LORAFLEET_STATE_DIR") or PROJECT_ROOT / "runs" / "cluster").resolve()


def short_enough(temp_dir: str | Path) -> bool:
    """Whether Ray's socket paths below ``temp_dir`` stay under the 107-byte AF_UNIX limit."""
    return len(str(temp_dir).encode()) + RAY_SOCKET_TAIL < MAX_SOCKET_PATH


def ray_temp_dir(state_dir: str | Path) -> Path:
    """The Ray temp dir of ``up``'s head: ``<state_dir>/ray``, or ``/tmp/lorafleet-ray-<hash of state_dir>`` when that
    path is too long for Ray's sockets. Private to the state dir either way (no other cluster writes there)."""
    own = Path(state_dir).resolve() / "ray"
    if short_enough(own):
        return own
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return SHORT_ROOT / f"lorafleet-ray-{digest}"


def private_temp_dir() -> Path:
    """The Ray temp dir of the local instances ``init_ray`` starts when no cluster is recorded (one per user).

    Ray's "latest cluster" file is written only by ``ray start``, never by ``ray.init()``; keeping these instances
    out of ``/tmp/ray`` also keeps their sessions apart from any cluster that does use the default."""
    return SHORT_ROOT / f"lorafleet-local-{os.getuid() if hasattr(os, 'getuid') else 0}"


@dataclass
class Ports:
    """The TCP ports of ``up``'s cluster, all on 127.0.0.1."""

    ray: int = 6379
    dashboard: int = 8265
    mlflow: int = 5000
    client: int = 10001  # Ray client server
    agent: int = 52365  # dashboard agent (HTTP)
    serve: int = 8000  # where the pipeline's Serve app listens (recorded for `status` and the SDK)


@dataclass
class ClusterState:
    """``state.json``: what ``up`` started (PIDs are process-group leaders) and where it listens."""

    state_dir: str
    ports: Ports = field(default_factory=Ports)
    num_cpus: int | None = None
    num_gpus: int | None = None
    ray_pid: int | None = None
    mlflow_pid: int | None = None
    started_at: float = 0.0
    temp_dir: str | None = None  # the head's --temp-dir (None: a state written before it was recorded)
    gcs_address: str | None = None  # host:port that `ray.init(address=...)` joins

    @property
    def address(self) -> str:
        return self.gcs_address or f"{HOST}:{self.ports.ray}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.ports.dashboard}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.ports.mlflow}"

    @property
    def serve_url(self) -> str:
        return f"http://{HOST}:{self.ports.serve}"

    def ray_running(self) -> bool:
        """The head's process group leader is alive and its GCS port accepts connections."""
        return alive(self.ray_pid) and listening(HOST, self.ports.ray)

    def mlflow_running(self) -> bool:
        """The MLflow server's process is alive and its port accepts connections."""
        return alive(self.mlflow_pid) and listening(HOST, self.ports.mlflow)

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, state_dir: str | Path | None = None) -> ClusterState | None:
        """The recorded state, or None when ``state_dir`` (default: :func:`default_state_dir`) has none."""
        path = Path(state_dir or default_state_dir()) / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}  # a newer lorafleet may record more
        ports = {k: v for k, v in (data.get("ports") or {}).items() if k in {f.name for f in dataclasses.fields(Ports)}}
        return cls(**{k: v for k, v in data.items() if k in known and k != "ports"}, ports=Ports(**ports))


def recorded_cluster(state_dir: str | Path | None = None) -> ClusterState | None:
    """``up``'s cluster when its Ray head is running, else None (no state, or a stopped / crashed head)."""
    state = ClusterState.load(state_dir)
    return state if state is not None and state.ray_running() else None


def up_mlflow(state_dir: str | Path | None = None) -> str | None:
    """The MLflow server of ``up``'s cluster when it runs (the default tracking server of every lorafleet command
    after ``$MLFLOW_TRACKING_URI``), else None."""
    state = ClusterState.load(state_dir)
    return state.mlflow_uri if state is not None and state.mlflow_running() else None


def alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not reaped by us) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def reload_auth_token() -> None:
    """Make this process read ``~/.ray/auth_token`` again at its next use: Ray caches the token (or its absence)
    per process (``AuthenticationTokenLoader``). A no-op on a Ray without token auth."""
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:
        return
    AuthenticationTokenLoader.instance().reset_cache()


def enable_token_auth() -> None:
    """Send this machine's Ray auth token (``~/.ray/auth_token``) to clusters this process connects to.

    Ray 2.60's ``ray start`` turns token auth on; a client that names the address explicitly (``ray.init(address=…)``,
    a ``JobSubmissionClient``) only sends the token when told to, else it fails with ``InvalidAuthToken``. A no-op
    when ``RAY_AUTH_MODE`` is set (the user's choice) or no token exists.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # an older Ray without token auth
        return
    reload_auth_token()  # this process may have looked before `lorafleet up` (or anyone) created the token
    quiet = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns on every call that the cluster uses tokens; that is the point
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)
