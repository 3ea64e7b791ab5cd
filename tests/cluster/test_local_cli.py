"""`lorafleet up/down/status` bookkeeping and the cluster commands' arguments (no cluster needed)."""

from __future__ import annotations

import json
import socket

import pytest

from cluster.cli import COMMANDS, main
from cluster.local import ClusterError, ClusterState, Ports, alive, port_free, status, up

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
    assert "until" in err and "deploy2" in err
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
