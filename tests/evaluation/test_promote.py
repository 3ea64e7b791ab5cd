"""Promote a checkpoint picked by eye from a trial's sample grids: found by trial id and epoch in MLflow,
evaluated like the pipeline's adapters (the search's eval_config.json), registered, made champion on a pass or
with --force. Needs a tracking server (the session's, on loopback)."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from evaluation.promote import EVAL_CONFIG, checkpoint_ref, main, promote_adapter
from evaluation.registry import TAG_STATUS, RegistryError
from tests.evaluation.conftest import SMALL_SUITE
from training.tracking import start_run

pytestmark = pytest.mark.slow
RELAXED = "gate.checks={success_rate: {min: 0.95}}"


@pytest.fixture
def search(eval_config, mlflow_server, toy_adapters, tmp_path):
    """A search run with its eval_config.json, and one trial run that logged adapters at epochs 2 and 4."""
    uri = mlflow_server
    client = MlflowClient(uri)
    study = start_run(uri, "promote-test", "p search", {"lorafleet.kind": "search"})
    cfg = eval_config(*SMALL_SUITE, RELAXED, "mlflow.enabled=true", "registry.enabled=true")
    path = tmp_path / EVAL_CONFIG
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    client.log_artifact(study, str(path))
    trial = start_run(uri, "promote-test", "ab12c_00003 rank=8 lr=0.001", {"lorafleet.kind": "trial"}, study)
    for epoch, adapter in ((2, toy_adapters["random"]), (4, toy_adapters["good"])):
        client.log_artifacts(trial, str(adapter), f"checkpoints/epoch_{epoch:04d}/adapter")
    return uri, trial


def test_a_checkpoint_picked_from_the_grids_is_evaluated_registered_and_promoted(search):
    uri, trial = search
    out = promote_adapter("picked-lora", tracking_uri=uri, trial="ab12c_00003", epoch=4)
    assert out["adapter"] == checkpoint_ref(trial, 4) and out["passed"] and out["promoted"]
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("picked-lora", "champion")
    assert champion.version == out["version"] and champion.tags[TAG_STATUS] == "passed"
    assert champion.tags["eval.comparable_key"]  # evaluated like any registered adapter, suite and all

    # an epoch without a logged adapter names the ones there are; a trial that does not exist is named too
    with pytest.raises(RegistryError, match=r"at epochs \[2, 4\].*not 3"):
        promote_adapter("picked-lora", tracking_uri=uri, trial="ab12c_00003", epoch=3)
    with pytest.raises(RegistryError, match="no trial run named 'zz9'"):
        promote_adapter("picked-lora", tracking_uri=uri, trial="zz9", epoch=4)


def test_a_picked_checkpoint_the_gate_refuses_needs_force(search, capsys):
    uri, _ = search
    strict = ["gate.checks={success_rate: {min: 0.95}, prior_similarity: {min: 0.9}}"]
    argv = ["strict-lora", "--trial", "ab12c_00003", "--epoch", "2", "--tracking-uri", uri, *strict]
    assert main(argv) == 1  # random weights: registered as rejected, the champion untouched
    assert "not promoted" in capsys.readouterr().out
    client = MlflowClient(uri)
    assert client.get_model_version("strict-lora", "1").tags[TAG_STATUS] == "rejected"
    assert not client.get_registered_model("strict-lora").aliases
    assert main([*argv, "--force"]) == 0  # by hand: evaluated again, registered, made champion anyway
    assert str(client.get_model_version_by_alias("strict-lora", "champion").version) == "2"


def test_only_epoch_folders_count_as_logged_checkpoints():
    """Another folder under checkpoints/ (logged by hand: `best`) is not an epoch, and never a ValueError."""
    from types import SimpleNamespace

    from evaluation.promote import logged_epochs

    folders = [("epoch_0008", True), ("best", True), ("epoch_0004", True), ("epoch_x", True), ("notes.txt", False)]
    entries = [SimpleNamespace(path=f"checkpoints/{n}", is_dir=d) for n, d in folders]
    client = SimpleNamespace(list_artifacts=lambda run_id, path: entries)
    assert logged_epochs(client, "run") == [4, 8]


def test_an_unreachable_tracking_server_is_a_message_not_a_traceback(monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    import evaluation.promote as promote

    def down(*args, **kwargs):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/search failed: Max retries exceeded\nmore")

    monkeypatch.setattr(promote, "promote_adapter", down)
    assert promote.main(["ohwx-lora", "--trial", "abc", "--epoch", "4", "--tracking-uri", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: MLflow at http://127.0.0.1:9 failed: API request") and "Traceback" not in err
