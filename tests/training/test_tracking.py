"""The tracker when the MLflow server goes away: values kept and sent later, and what never arrives is stated; its
exit (a context manager) flushes, states the gap in the run or in a local file within a stated bound, and ends the
run with a status that says how the block ended; no call changes the MLflow settings other threads read."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
from mlflow import MlflowClient
from PIL import Image

from training.mlflow_server import start_mlflow_server
from training.tracking import GAP_RECORD, GAP_TAG, MlflowTracker, driver_tracker, start_run, tracker_for
from training.tracking_rest import RequestLimits


def test_values_wait_for_the_server_and_the_run_states_what_is_missing(tmp_path):
    server = start_mlflow_server(tmp_path / "mlflow")
    port = int(server.uri.rsplit(":", 1)[1])
    run_id = start_run(server.uri, "test-tracking", "outage", {})
    tracker = MlflowTracker(server.uri, run_id)
    tracker.exit_wait_s = 0.0  # close() tries once
    tracker.log_metrics({"loss": 1.0}, step=1)
    server.stop()
    try:
        started = time.monotonic()
        tracker.log_metrics({"loss": 0.9, "lr": 1e-3}, step=2)
        tracker.log_params({"train.lr": "0.001"})
        tracker.log_image(Image.new("RGB", (8, 8)), "validation/epoch_002.png")
        assert time.monotonic() - started < 30, "a call to a dead server must not block for minutes"
        assert tracker.pending == 3 and tracker.dropped == ["validation/epoch_002.png"]
        tracker.close()  # the server is still away: nothing can be sent, the gap stays known
        assert tracker.gap() == "3 param/metric values never reached the server; not logged: validation/epoch_002.png"

        server = start_mlflow_server(tmp_path / "mlflow", port=port)  # back: the next call sends what waited
        tracker.log_metrics({"loss": 0.8}, step=3)
        assert tracker.pending == 0
        tracker.close()
        run = MlflowClient(server.uri).get_run(run_id)
        history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3] and run.data.params == {"train.lr": "0.001"}
        assert run.data.tags["lorafleet.mlflow_gap"] == "not logged: validation/epoch_002.png"
    finally:
        server.stop()


def test_the_tracking_uri_falls_back_to_ups_server_before_a_local_file(tmp_path, monkeypatch):
    """mlflow.tracking_uri, then $MLFLOW_TRACKING_URI, then `lorafleet up`'s running server, then SQLite (README)."""
    from training import cluster_state
    from training.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(cluster_state, "up_mlflow", lambda state_dir=None: "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("http://127.0.0.1:5111", tmp_path) == "http://127.0.0.1:5111"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5222")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5222"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setattr(cluster_state, "up_mlflow", lambda state_dir=None: None)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def _status(uri: str, run_id: str) -> tuple[str, int | None, dict[str, str]]:
    run = MlflowClient(uri).get_run(run_id)
    return run.info.status, run.info.end_time, run.data.tags


def test_exit_sends_what_waited_once_the_server_is_back_and_finishes_the_run(tmp_path):
    """Values logged during an outage are sent by the with-block's exit, which waits for the server to return
    (no later log call needed); the image dropped meanwhile is named in the run, and the run is FINISHED."""
    server = start_mlflow_server(tmp_path / "mlflow")
    port = int(server.uri.rsplit(":", 1)[1])
    run_id = start_run(server.uri, "test-tracking", "exit-flush", {})
    restarted: dict = {}

    def restart() -> None:
        restarted["server"] = start_mlflow_server(tmp_path / "mlflow", port=port)

    record = tmp_path / "out" / GAP_RECORD
    try:
        with MlflowTracker(server.uri, run_id, local_record=record) as tracker:
            tracker.exit_wait_s, tracker.retry_every_s = 240.0, 0.5  # generous: a server start takes seconds here
            tracker.log_metrics({"loss": 1.0}, step=1)
            server.stop()
            tracker.log_metrics({"loss": 0.9}, step=2)
            tracker.log_params({"train.lr": "0.001"})
            tracker.log_image(Image.new("RGB", (8, 8)), "validation/epoch_002.png")
            assert tracker.pending == 2 and tracker.dropped == ["validation/epoch_002.png"]
            back = threading.Thread(target=restart, daemon=True)
            back.start()  # the server returns while the exit is trying
        back.join(timeout=120)
        server = restarted["server"]
        status, end_time, tags = _status(server.uri, run_id)
        history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2], history
        assert MlflowClient(server.uri).get_run(run_id).data.params == {"train.lr": "0.001"}
        assert (status, end_time is not None) == ("FINISHED", True), (status, end_time)
        assert tags[GAP_TAG] == "not logged: validation/epoch_002.png"
        assert tracker.pending == 0 and not record.exists(), "the server got everything: nothing recorded locally"
    finally:
        server.stop()


def _black_hole() -> socket.socket:
    """A TCP port that accepts connections (the kernel's backlog) and never answers: a hung server."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    return sock


def test_exit_with_the_server_hung_records_the_gap_locally_within_its_bound(tmp_path):
    """Nothing reaches the server, not even the gap tag or the status: the exit gives up within
    ``exit_bound_s()`` and appends one JSON line with the unsent values and the status the run should have."""
    hole = _black_hole()
    uri = f"http://127.0.0.1:{hole.getsockname()[1]}"
    record = tmp_path / "out" / GAP_RECORD
    limits = RequestLimits(max_retries=0, timeout_s=1.0)
    try:
        with MlflowTracker(uri, "0" * 32, local_record=record, limits=limits) as tracker:
            tracker.exit_wait_s, tracker.retry_every_s = 3.0, 0.5
            started = time.monotonic()
            tracker.log_metrics({"loss": 0.5, "lr": 1e-3}, step=7)
            tracker.log_params({"train.rank": "8"})
            assert time.monotonic() - started <= 2 * limits.call_bound_s() + 5, "each call is limited"
            exiting = time.monotonic()
        took, bound = time.monotonic() - exiting, tracker.exit_bound_s()
    finally:
        hole.close()
    assert took <= bound, f"exit took {took:.1f} s, more than its stated bound {bound:.1f} s"
    print(f"hung server: exit took {took:.1f} s (bound {bound:.1f} s; exit_wait_s {tracker.exit_wait_s} s)")
    assert took >= tracker.exit_wait_s, f"exit gave the server only {took:.1f} s, not exit_wait_s"
    lines = record.read_text().splitlines()
    assert len(lines) == 1, lines
    got = json.loads(lines[0])
    assert (got["run_id"], got["status"], got["status_set"]) == ("0" * 32, "FINISHED", False), got
    assert sorted((k, v, s) for k, v, _, s in got["metrics"]) == [("loss", 0.5, 7), ("lr", 1e-3, 7)]
    assert got["params"] == [["train.rank", "8"]] and got["gap"] == "3 param/metric values never reached the server"


def test_an_exception_in_the_block_fails_the_run_and_a_worker_leaves_the_status_alone(mlflow_server):
    failed = start_run(mlflow_server, "test-tracking", "raises", {})
    with pytest.raises(ValueError, match="boom"), MlflowTracker(mlflow_server, failed) as tracker:
        tracker.log_metrics({"loss": 2.0}, step=1)
        raise ValueError("boom")
    status, end_time, _ = _status(mlflow_server, failed)
    assert (status, end_time is not None) == ("FAILED", True)
    assert [m.value for m in MlflowClient(mlflow_server).get_metric_history(failed, "loss")] == [2.0]

    stopped = start_run(mlflow_server, "test-tracking", "interrupted", {})
    with pytest.raises(KeyboardInterrupt), MlflowTracker(mlflow_server, stopped):
        raise KeyboardInterrupt
    assert _status(mlflow_server, stopped)[0] == "KILLED"

    shared = start_run(mlflow_server, "test-tracking", "driver's run", {})
    with pytest.raises(ValueError), tracker_for(mlflow_server, shared, rank=0) as worker:  # rank 0 of a worker group
        worker.log_metrics({"loss": 1.0}, step=1)
        raise ValueError("a worker failed; Ray Train may restart it into the same run")
    assert _status(mlflow_server, shared)[0] == "RUNNING", "the driver owns the run's status"
    with driver_tracker(mlflow_server, shared) as driver:
        driver.end_status = "FAILED"  # said before the block ends without an exception (e.g. no trial finished)
    assert _status(mlflow_server, shared)[0] == "FAILED"

    both = start_run(mlflow_server, "test-tracking", "two trackers, two gaps", {})
    with tracker_for(mlflow_server, both, rank=0) as worker:
        worker.dropped.append("samples/epoch_001.png")  # what a failed upload leaves (see the outage tests)
    with driver_tracker(mlflow_server, both) as driver:
        driver.dropped.append("tuning/plots.html")
    tags = _status(mlflow_server, both)[2]  # the driver closes last: it must not overwrite rank 0's gap
    assert tags[f"{GAP_TAG}.rank0"] == "not logged: samples/epoch_001.png", tags
    assert tags[GAP_TAG] == "not logged: tuning/plots.html", tags


def test_tracker_calls_leave_the_mlflow_settings_other_threads_read_unchanged(tmp_path, monkeypatch):
    """MLflow's system-metrics thread (or any other) reads MLFLOW_HTTP_REQUEST_* from the environment at each
    request; the tracker's own limits travel with its calls, so that environment never changes — also while
    calls fail against a server that went away."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    names = ["MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"]
    for name in names:
        monkeypatch.delenv(name, raising=False)
    server = start_mlflow_server(tmp_path / "mlflow")
    run_id = start_run(server.uri, "test-tracking", "threads", {})
    seen: set = set()
    reads = 0
    done = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not done.is_set():
            seen.add((tuple(os.environ.get(n) for n in names), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(),
                      MLFLOW_HTTP_REQUEST_TIMEOUT.get()))  # fmt: skip
            reads += 1

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        with MlflowTracker(server.uri, run_id, local_record=tmp_path / GAP_RECORD) as tracker:
            tracker.exit_wait_s = 0.0
            for step in range(1, 6):
                tracker.log_metrics({"loss": 1.0 / step}, step=step)
            tracker.log_params({"train.lr": "0.001"})
            tracker.set_tags({"stage": "threads"})
            tracker.log_image(Image.new("RGB", (8, 8)), "validation/live.png")
            server.stop()  # now every call fails (connection refused) while the reader reads
            tracker.log_metrics({"loss": 0.1}, step=6)
            tracker.log_image(Image.new("RGB", (8, 8)), "validation/down.png")
    finally:
        done.set()
        thread.join(timeout=30)
        server.stop()
    assert tracker.failures >= 2 and tracker.dropped == ["validation/down.png"], (tracker.failures, tracker.dropped)
    assert reads > 100, f"the reader thread read only {reads} times"
    assert seen == {((None, None, None), 7, 120)}, f"another thread saw MLflow's settings change: {seen}"


def test_request_limits_take_an_explicit_mlflow_setting_and_bound_a_call(monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    assert RequestLimits.from_env() == RequestLimits()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "4")
    limits = RequestLimits.from_env()
    assert (limits.max_retries, limits.timeout_s, limits.backoff_factor) == (3, 4, 1.0)
    # 4 attempts × (connect 4 s + read 4 s), then urllib3's sleeps before retries 2 and 3: (1·2 + 1) + (1·4 + 1)
    assert limits.call_bound_s() == 4 * 8 + 3 + 5
