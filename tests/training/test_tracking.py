"""The tracker when the MLflow server goes away: values kept and sent later, and what never arrives is stated."""

from __future__ import annotations

import time

from mlflow import MlflowClient
from PIL import Image

from training.mlflow_server import start_mlflow_server
from training.tracking import MlflowTracker, start_run


def test_values_wait_for_the_server_and_the_run_states_what_is_missing(tmp_path):
    server = start_mlflow_server(tmp_path / "mlflow")
    port = int(server.uri.rsplit(":", 1)[1])
    run_id = start_run(server.uri, "test-tracking", "outage", {})
    tracker = MlflowTracker(server.uri, run_id)
    tracker.close_attempts, tracker.close_wait_s = 1, 0.0
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
