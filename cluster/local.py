"""A local lorafleet cluster on loopback: a Ray head (dashboard 127.0.0.1:8265) and an MLflow server (127.0.0.1:5000).

    lorafleet up            # idempotent; state (PIDs, ports, MLflow's SQLite + artifacts) in runs/cluster/
    lorafleet status        # what runs where
    lorafleet down          # stops exactly the processes `up` started (by process group), nothing else

``ray start --head --block`` runs in its own session, so every Ray process of this head (GCS, raylet,
dashboard, workers) shares its process group and ``down`` can stop all of them without ``ray stop``
(which would also stop other Ray instances on the machine, such as a test's).

The head gets its own Ray temp dir (``<state dir>/ray``, or a short ``/tmp/lorafleet-ray-<hash>``), recorded with
its GCS address in ``state.json``: a Ray head started later with the default ``/tmp/ray`` then cannot capture
this cluster's job drivers, and lorafleet's commands join this cluster by its address
(``training.cluster_state``, ``training.ray_train.init_ray``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

from training.cluster_state import (  # noqa: F401 — the state's home is training/ (init_ray reads it); re-exported
    HOST,
    ClusterState,
    Ports,
    alive,
    default_state_dir,
    ray_temp_dir,
    recorded_cluster,
    reload_auth_token,
)


class ClusterError(RuntimeError):
    """The local cluster could not start or stop; the message says what to do."""


def answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:  # e.g. 401: Ray's dashboard wants its auth token, but it is up
        return exc.code < 500
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count as taken
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _wait(check, what: str, timeout: float, log: Path, pid: int) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not alive(pid):
            raise ClusterError(f"{what} exited during start-up; see {log}")
        time.sleep(0.5)
    raise ClusterError(f"{what} did not come up within {timeout:.0f}s; see {log}")


def ray_env(state: ClusterState) -> dict[str, str]:
    """The head's environment; Ray workers and job drivers inherit it."""
    env = dict(os.environ)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # bind GCS, raylet and dashboard to 127.0.0.1, not the NIC
        RAY_JOB_STOP_WAIT_TIME_S=os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "60"),  # SIGTERM grace for `stop`
        MLFLOW_TRACKING_URI=state.mlflow_uri,
        RAY_USAGE_STATS_ENABLED="0",
        # one node: nothing to drain towards on `down` (the default waits 30 s for a RayService-style hand-over)
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        # job entry points say `python`: the interpreter that runs Ray (this venv), not the system's
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        # Ray's own processes on this cluster (Train's PlacementGroupCleaner, anything using the state API) find
        # "their" cluster by address when told none: with several Ray instances on the machine that lookup fails
        # ("Found multiple active Ray instances") or picks another one, placement groups of trials the scheduler
        # stopped are never removed, and later trials time out waiting for CPUs. This names the right dashboard.
        RAY_API_SERVER_ADDRESS=state.dashboard_url,
    )
    env.pop("RAY_ADDRESS", None)
    return env


GRAFANA_DASHBOARD = Path(__file__).resolve().parent / "grafana" / "lorafleet_serve.json"


def install_grafana_dashboard(temp_dir: str | Path) -> Path | None:
    """Copy lorafleet's Grafana dashboard (``cluster/grafana/lorafleet_serve.json``: the ``ray_lorafleet_*``
    serving metrics) into the folder of Grafana dashboards Ray's dashboard writes for this session
    (``<temp_dir>/session_latest/metrics/grafana/dashboards``), which the provisioning file Ray writes next to it
    (``…/grafana/provisioning/dashboards/default.yml``) loads: a Grafana started with Ray's ``grafana.ini`` shows it
    in its "Ray" folder next to Ray's own dashboards.

    Returns:
        The copy's path; None when Ray wrote no Grafana folder (a Ray without its metrics module).

    Raises:
        OSError: the folder exists but the copy cannot be written.
    """
    target = grafana_dashboard_copy(temp_dir)
    if not target.parent.is_dir():
        return None
    target.write_bytes(GRAFANA_DASHBOARD.read_bytes())
    return target


def grafana_dashboard_copy(temp_dir: str | Path) -> Path:
    """Where ``install_grafana_dashboard`` puts the dashboard for the Ray session of ``temp_dir``."""
    return (
        Path(temp_dir)
        / "session_latest"
        / "metrics"
        / "grafana"
        / "dashboards"
        / "lorafleet_serve_grafana_dashboard.json"
    )


def pin_auth_mode() -> dict[str, str]:
    """Ray's authentication mode for every process of a new head, fixed before it starts.

    Ray 2.60 decides token auth per process: ``ray start`` turns it on only when ``~/.ray/auth_token`` exists, while
    any later ``ray.init()`` that starts a local instance on this machine writes that file, and from then on each new
    process connecting to the head (a job's driver, ``training.cluster_state.enable_token_auth``) switches to token
    mode — and the head, still without auth, finds the driver's calls refused: it takes the driver for dead and
    destroys its actors ("The actor never ran - it was cancelled before it started running"), so every Tune trial
    of every later job failed. So the head and everything it starts run in one mode: the user's ``RAY_AUTH_MODE``
    when set, else ``token``, with the token created first when missing (as ``ray get-auth-token --generate`` does,
    readable by the owner only).

    Returns:
        The variables to add to the head's environment (empty when the user set ``RAY_AUTH_MODE`` or this Ray has no
        token auth).
    """
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return {}
    try:
        from ray._private.authentication.authentication_token_setup import (
            _get_default_token_path,
            generate_and_save_token,
        )
    except ImportError:  # a Ray without token auth
        return {}
    token = _get_default_token_path()
    if not (token.is_file() and token.read_text().strip()):
        generate_and_save_token()
        token.chmod(0o600)
        reload_auth_token()  # this process's clients (Jobs, Serve deploys after `up` in one process) read it
    return {"RAY_AUTH_MODE": "token"}


def _start_ray(state: ClusterState) -> int:
    p = state.ports
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = ray_temp_dir(state.state_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    state.temp_dir, state.gcs_address = str(temp_dir), f"{HOST}:{p.ray}"
    cmd = [
        str(ray_bin), "start", "--head", "--block", "--disable-usage-stats", "--temp-dir", str(temp_dir),
        "--node-ip-address", HOST, "--port", str(p.ray),
        "--dashboard-host", HOST, "--dashboard-port", str(p.dashboard),
        "--ray-client-server-port", str(p.client), "--dashboard-agent-listen-port", str(p.agent),
    ]  # fmt: skip
    if state.num_cpus is not None:
        cmd += ["--num-cpus", str(state.num_cpus)]
    if state.num_gpus is not None:
        cmd += ["--num-gpus", str(state.num_gpus)]
    log = Path(state.state_dir) / "ray.log"
    with open(log, "ab") as out:
        env = ray_env(state) | pin_auth_mode()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state.ray_pid = proc.pid
    state.save()  # before waiting: an interrupted start is still cleaned up by `down`
    try:
        _wait(lambda: answers(f"{state.dashboard_url}/api/version"), "the Ray head", 120, log, proc.pid)
        # a job also needs the head's dashboard agent, which Ray's job head waits for only 10 s
        # (WAIT_AVAILABLE_AGENT_TIMEOUT) before `ray job submit` fails with "No available agent to submit job"
        agent = f"http://{HOST}:{p.agent}/api/local_raylet_healthz"
        _wait(lambda: answers(agent), "the Ray dashboard agent", 120, log, proc.pid)
    except ClusterError:
        stop_group(proc.pid, 15)
        raise
    install_grafana_dashboard(temp_dir)  # the dashboard has written its Grafana folder by the time it answers
    return proc.pid


def _start_mlflow(state: ClusterState) -> int:
    from training.mlflow_server import start_mlflow_server

    try:
        server = start_mlflow_server(Path(state.state_dir) / "mlflow", port=state.ports.mlflow, timeout=120)
    except RuntimeError as exc:
        raise ClusterError(str(exc)) from exc
    state.mlflow_pid = server.pid
    state.save()
    return server.pid


def up(
    state_dir: str | Path | None = None,
    ports: Ports | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
) -> ClusterState:
    """Start what is not running yet (idempotent) and return the cluster's state.

    Raises:
        ClusterError: a port is taken by something else, or a server failed to start (its log is named).
    """
    root = Path(state_dir or default_state_dir()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    state = ClusterState.load(root)
    if state is None or not (alive(state.ray_pid) or alive(state.mlflow_pid)):
        state = ClusterState(str(root), ports or Ports(), num_cpus, num_gpus)
    elif ports and asdict(ports) != asdict(state.ports):
        raise ClusterError(f"a cluster with other ports already runs from {root}; `lorafleet down` first")
    p = state.ports
    started: list[int] = []
    try:
        if not alive(state.mlflow_pid):
            if not port_free(p.mlflow):
                raise ClusterError(f"port {p.mlflow} (MLflow) is taken by another process; pass --mlflow-port")
            started.append(_start_mlflow(state))
        if not alive(state.ray_pid):
            taken = [(port, what, flag) for port, what, flag in (
                (p.ray, "Ray GCS", "--ray-port"), (p.dashboard, "Ray dashboard", "--dashboard-port"),
                (p.client, "Ray client server", "--client-port"), (p.agent, "dashboard agent", "--agent-port"),
            ) if not port_free(port)]  # fmt: skip
            if taken:
                port, what, flag = taken[0]
                raise ClusterError(f"port {port} ({what}) is taken by another process; pass {flag}, or `ray stop`")
            state.started_at = time.time()
            started.append(_start_ray(state))
    except BaseException:
        for pid in started:  # what this call started, it stops: a failed `up` leaves nothing running
            stop_group(pid, 15)
        raise
    state.save()
    return state


def stop_group(pid: int | None, timeout: float) -> None:
    """Stop the process group led by ``pid`` (started with ``start_new_session=True``): SIGTERM to the leader, then
    SIGKILL to the whole group after ``timeout`` seconds. Other processes on the machine are never touched."""
    if not alive(pid):
        return
    try:
        # the group leader (`ray start --block`, `mlflow server`) stops its own children in order; signalling
        # the whole group at once leaves Ray's raylet draining towards a GCS that is already gone (30 s)
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and group_alive(pid):
        time.sleep(0.2)
    if group_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Any process (not a zombie) left in the process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def down(state_dir: str | Path | None = None, timeout: float = 30.0) -> ClusterState | None:
    """Stop the Ray head and the MLflow server that ``up`` started (whole process groups); keep their data."""
    state = ClusterState.load(state_dir)
    if state is None:
        return None
    stop_group(state.ray_pid, timeout)
    stop_group(state.mlflow_pid, timeout)
    forget_address(state.address, state.temp_dir)
    state.ray_pid = state.mlflow_pid = None
    state.save()
    return state


def forget_address(address: str, temp_dir: str | None = None) -> None:
    """Remove Ray's "latest cluster" file of ``temp_dir`` (None: Ray's default, for states written before the head
    had its own) when it names this stopped head, as ``ray stop`` does; otherwise a ``ray.init()`` with that temp
    dir would try to join the dead cluster instead of starting one. The temp dir itself (session logs) stays."""
    from ray._private.utils import get_ray_address_file, read_ray_address

    if read_ray_address(temp_dir) == address:
        with contextlib.suppress(FileNotFoundError):
            os.remove(get_ray_address_file(temp_dir))


def status(state_dir: str | Path | None = None) -> dict:
    """What runs where: each component's URL, PID and whether it answers."""
    state = ClusterState.load(state_dir)
    if state is None:
        return {"state_dir": str(state_dir or default_state_dir()), "up": False, "components": {}}
    comps = {
        "ray": {
            "address": state.address,
            "dashboard": state.dashboard_url,
            "temp_dir": state.temp_dir,
            "pid": state.ray_pid,
            "running": alive(state.ray_pid) and answers(f"{state.dashboard_url}/api/version"),
        },
        "mlflow": {
            "url": state.mlflow_uri,
            "pid": state.mlflow_pid,
            "running": alive(state.mlflow_pid) and answers(f"{state.mlflow_uri}/health"),
            "store": str(Path(state.state_dir) / "mlflow"),
        },
        "serve": {"url": state.serve_url, "running": answers(f"{state.serve_url}/healthz")},
    }
    return {"state_dir": state.state_dir, "up": comps["ray"]["running"] and comps["mlflow"]["running"],
            "components": comps}  # fmt: skip
