"""`lorafleet up/down/status` bookkeeping and the cluster commands' arguments (no cluster needed)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cluster.cli import COMMANDS, main
from cluster.local import ClusterError, ClusterState, Ports, alive, port_free, status, up
from tests.procs import run_ok
from training.cluster_state import ray_temp_dir, recorded_cluster, short_enough

CLUSTER_COMMANDS = ["up", "down", "status", "validate", "submit", "logs", "stop", "jobs", "serve", "generate"]


def run(argv: list[str]) -> int:
    """main(argv)'s exit code, including argparse's SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def no_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_STATE_DIR", str(tmp_path / "state"))
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "state"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    assert run([command, "--help"]) == 0
    assert "usage" in capsys.readouterr().out.lower()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["up", "--mlflow-port", "x"], "invalid int value: 'x'"),
        (["submit"], "the following arguments are required: kind"),
        (["submit", "deploy"], "invalid choice: 'deploy'"),
        (["logs"], "the following arguments are required: job_id"),
        (["stop"], "the following arguments are required: job_id"),
        (["generate"], "the following arguments are required: prompt"),
        (["generate", "a cat", "--n", "two"], "invalid int value: 'two'"),
        (["validate"], "the following arguments are required: path"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert run(argv) == 2
    assert message in capsys.readouterr().err


def test_a_bad_job_config_is_refused_before_connecting(no_cluster, capsys, repo):
    assert run(["submit", "pipeline", "--config", str(repo / "configs/pipeline.yaml"), "until=deploy2"]) == 2
    err = capsys.readouterr().err
    assert "until:" in err and "'deploy'" in err  # the key and its valid values
    assert run(["submit", "pipeline", 'serve.overrides=["deployment.num_gpus=0.3"]']) == 2
    assert "deployment.num_gpus" in capsys.readouterr().err  # the stage configs are checked too


def test_commands_without_a_cluster_say_how_to_start_one(no_cluster, capsys):
    assert run(["logs", "some-job"]) == 3
    assert "lorafleet up" in capsys.readouterr().err
    assert run(["status"]) == 1
    assert "not up" in capsys.readouterr().out
    assert run(["down"]) == 0 and "nothing to stop" in capsys.readouterr().out
    port = _free_port()
    assert run(["generate", "a red circle", "--url", f"http://127.0.0.1:{port}"]) == 3
    assert "no server at" in capsys.readouterr().err


def test_validate_reports_per_file_and_exits_1_on_errors(toy_dataset, capsys):
    assert run(["validate", str(toy_dataset), "--trigger", "sks", "--resolution", "64"]) == 0
    assert "8 usable images" in capsys.readouterr().out
    (toy_dataset / "broken.png").write_bytes(b"not a png")
    assert run(["validate", str(toy_dataset), "--trigger", "sks", "--resolution", "64", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert any(p["file"] == "broken.png" and p["severity"] == "error" for p in report["problems"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_state_round_trip_and_status_of_nothing(tmp_path):
    state = ClusterState(str(tmp_path), Ports(ray=1, dashboard=2, mlflow=3), num_cpus=2)
    state.save()
    back = ClusterState.load(tmp_path)
    assert back == state and back.dashboard_url == "http://127.0.0.1:2" and back.mlflow_uri == "http://127.0.0.1:3"
    info = status(tmp_path)
    assert not info["up"] and not info["components"]["ray"]["running"]
    assert not alive(None) and not alive(2**22 + 12345)


def test_up_refuses_a_taken_port_and_leaves_nothing_running(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert not port_free(port)
        taken_msg = rf"port {port} \(MLflow\) is taken by another process; pass --mlflow-port"
        with pytest.raises(ClusterError, match=taken_msg):
            up(tmp_path, Ports(ray=_free_port(), dashboard=_free_port(), mlflow=port))
    state = ClusterState.load(tmp_path)
    assert state is None or not (alive(state.ray_pid) or alive(state.mlflow_pid))


def test_flags_go_anywhere_among_the_overrides(no_cluster, capsys):
    # options after the job kind / between overrides parse; the bad override is then what is reported
    flags_between = ["submit", "pipeline", "name=x", "--follow", "until=deploy2", "--entrypoint-num-cpus", "1"]
    for argv in (["submit", "pipeline", "--follow", "name=x", "until=deploy2"], flags_between):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert "unrecognized arguments" not in err and "until:" in err, err
    assert run(["serve", "warmup=false", "--port", "8001", "max_adapters=2"]) == 3  # parsed; no cluster to deploy to
    assert "lorafleet up" in capsys.readouterr().err
    from cluster.demo import parse_args

    demo = parse_args(["name=demo2", "--prompts", "3", "until=tune"])
    assert demo.prompts == 3 and demo.overrides == ["name=demo2", "until=tune"]


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in image server: records the request body, answers one 8x8 PNG the way the Serve API does."""

    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802 — http.server's naming
        from PIL import Image

        from serving.images import png_bytes

        type(self).bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        image = base64.b64encode(png_bytes(Image.new("RGB", (8, 8), "red"))).decode()
        payload = json.dumps({"model": "base", "version": None, "data": [{"b64_json": image, "seed": 0}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.bodies = []
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.bodies
    server.shutdown()
    server.server_close()


def test_generate_size_64_means_64x64(image_server, tmp_path, capsys):
    url, bodies = image_server
    for size, sent in (("64", "64x64"), ("64x48", "64x48")):
        assert run(["generate", "a red circle", "--url", url, "--size", size, "--out", str(tmp_path)]) == 0
        assert bodies[-1]["size"] == sent  # the server's pattern is WIDTHxHEIGHT only: "64" was a 400
    assert (tmp_path / "base-0.png").is_file()
    assert run(["generate", "a red circle", "--url", url, "--size", "big"]) == 2
    assert "'big' is not a size" in capsys.readouterr().err and len(bodies) == 2


def test_ray_temp_dir_is_private_and_short_enough(tmp_path):
    assert ray_temp_dir("/work/x/runs/cluster") == Path("/work/x/runs/cluster/ray")
    deep = tmp_path / ("d" * 60)
    fallback = ray_temp_dir(deep)
    assert fallback.parent == Path("/tmp") and fallback.name.startswith("lorafleet-ray-")
    assert fallback == ray_temp_dir(deep) != ray_temp_dir(tmp_path / ("e" * 60))  # one per state dir
    assert short_enough(fallback) and not short_enough(deep / "ray")
    # Ray's longest socket path below it fits the 107-byte AF_UNIX limit
    assert len(f"{fallback}/session_2026-01-01_00-00-00_000000_4194304/sockets/dash_TaskEventsHead") <= 107


def test_state_of_an_older_or_newer_lorafleet_loads(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"state_dir": str(tmp_path), "ports": {"ray": 7, "future": 1},
                                                      "ray_pid": None, "something_new": True}))  # fmt: skip
    state = ClusterState.load(tmp_path)
    assert state.temp_dir is None and state.address == "127.0.0.1:7" and state.ports.ray == 7


@pytest.fixture
def fake_running_cluster(tmp_path, monkeypatch):
    """A recorded cluster that counts as running: this process's PID, a socket listening on its GCS port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    gcs = listener.getsockname()[1]
    state = ClusterState(str(tmp_path), Ports(ray=gcs, dashboard=_free_port()), ray_pid=os.getpid(),
                         temp_dir=str(tmp_path / "ray"), gcs_address=f"127.0.0.1:{gcs}")  # fmt: skip
    state.save()
    monkeypatch.setenv("LORAFLEET_STATE_DIR", str(tmp_path))
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    yield state
    listener.close()


def test_jobs_find_the_dashboard_explicitly_in_order(fake_running_cluster, monkeypatch):
    from cluster.jobs import NoCluster, dashboard_address

    state = fake_running_cluster
    assert recorded_cluster() == state and dashboard_address() == state.dashboard_url
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not a dashboard: up's still
    assert dashboard_address() == state.dashboard_url
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.2:8265")
    assert dashboard_address() == "http://10.0.0.2:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.3:8265")
    assert dashboard_address() == "http://10.0.0.3:8265"
    assert dashboard_address("127.0.0.1:9999") == "http://127.0.0.1:9999"
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var)
    state.ray_pid = 2**22 + 12345  # the head died: never fall back to any other cluster
    state.save()
    assert recorded_cluster() is None
    with pytest.raises(NoCluster, match="is not running: run `lorafleet up`"):
        dashboard_address()


def test_status_shows_the_gcs_address_and_temp_dir(fake_running_cluster, capsys):
    assert run(["status"]) == 1  # the dashboard does not answer: not up
    out = capsys.readouterr().out
    assert f"GCS {fake_running_cluster.gcs_address}" in out and f"temp dir {fake_running_cluster.temp_dir}" in out
    assert run(["status", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["components"]["ray"]["temp_dir"] == fake_running_cluster.temp_dir


def test_up_says_how_to_open_the_dashboard(tmp_path, monkeypatch, capsys):
    state = ClusterState(str(tmp_path), temp_dir=str(tmp_path / "ray"), gcs_address="127.0.0.1:6379")
    monkeypatch.setattr("cluster.local.up", lambda *args: state)
    assert run(["up", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "asks for a token" in out and "get-auth-token" in out and str(tmp_path / "ray") in out
    ray_cli = re.search(r"`(\S+) get-auth-token`", out).group(1)
    ray_cli = shutil.which(ray_cli) or ray_cli
    done = run_ok([ray_cli, "get-auth-token", "--help"], timeout=300)
    assert "authentication token" in done.stdout, done.stdout  # the command exists in this Ray
