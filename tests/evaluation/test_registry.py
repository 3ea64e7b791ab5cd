"""The MLflow registry through real evaluations on a real tracking server (loopback): aliases move on a
pass and stay on a fail, rollback works, and tampered or mismatched adapters are refused at load."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from evaluation.evaluate import run
from evaluation.registry import TAG_STATUS, RegistryError, fetch_adapter, main, parse_model_ref
from tests.evaluation.conftest import SMALL_SUITE
from training.adapter import META_NAME, WEIGHTS_NAME, AdapterError, file_sha256, verify_adapter
from training.toy_world.adapters import randomize_adapter

pytestmark = pytest.mark.slow
RELAXED = "gate.checks={success_rate: {min: 0.95}}"  # only "beats the champion" decides, besides success


@pytest.fixture
def registry_config(eval_config, mlflow_server):
    def make(model: str, *overrides: str):
        on = [f"mlflow.tracking_uri={mlflow_server}", "mlflow.enabled=true", "registry.enabled=true"]
        return eval_config(*SMALL_SUITE, RELAXED, *on, f"registry.model_name={model}", *overrides)

    return make


@pytest.fixture(scope="module")
def weak_adapter(toy_adapters, tmp_path_factory):
    """Passes the relaxed gate, but its clip_t sits near the base model's: any real adapter beats it."""
    return randomize_adapter(toy_adapters["good"], tmp_path_factory.mktemp("weak"), std=0.05)


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_alias_moves_on_pass_stays_on_fail_and_rolls_back(registry_config, toy_adapters, weak_adapter, mlflow_server):
    client = MlflowClient(mlflow_server)
    first = run(registry_config("reg-a"), str(weak_adapter))
    assert first.passed and first.registry["version"] == "1" and _aliases(client, "reg-a") == {"champion": "1"}

    second = run(registry_config("reg-a"), str(toy_adapters["good"]))
    assert second.passed and second.gate.champion["version"] == "1" and second.gate.champion["source"] == "stored"
    assert _aliases(client, "reg-a") == {"champion": "2", "previous": "1"}

    third = run(registry_config("reg-a"), str(toy_adapters["wrong_concept"]))
    assert not third.passed and third.registry == {
        "model": "reg-a", "version": "3", "status": "rejected", "action": "registered",
    }  # fmt: skip
    assert any(f.startswith("beats champion v2 on clip_t") for f in third.gate.failures())
    assert _aliases(client, "reg-a") == {"champion": "2", "previous": "1"}  # a failed adapter never gets the alias

    v2 = client.get_model_version("reg-a", "2")
    assert v2.tags["adapter_sha256"] == verify_adapter(toy_adapters["good"]).sha256
    assert v2.tags["base_model"] == "toy-sd" and v2.tags[TAG_STATUS] == "passed"
    assert float(v2.tags["metric.clip_t"]) == pytest.approx(second.metrics["clip_t"])
    assert client.get_model_version("reg-a", "3").tags[TAG_STATUS] == "rejected"
    run2 = client.get_run(v2.run_id)
    assert run2.data.metrics["base.clip_t"] == pytest.approx(second.base_metrics["clip_t"])
    assert run2.data.tags["gate"] == "passed" and run2.info.status == "FINISHED"
    report = {a.path for a in client.list_artifacts(v2.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/metrics.json", "report/grids"} <= report
    grids = {a.path for a in client.list_artifacts(v2.run_id, "report/grids")}
    assert "report/grids/trigger_base_vs_adapter.png" in grids

    # rollback: one command moves the champion back; the demoted version says why
    assert main(["--tracking-uri", mlflow_server, "rollback", "reg-a"]) == 0
    assert _aliases(client, "reg-a") == {"champion": "1"}
    assert client.get_model_version("reg-a", "2").tags[TAG_STATUS] == "rolled_back"
    fetched = fetch_adapter("models:/reg-a@champion", first.out_dir, mlflow_server)
    assert fetched.meta.sha256 == verify_adapter(weak_adapter).sha256 and fetched.version == "1"
    assert main(["--tracking-uri", mlflow_server, "rollback", "reg-a"]) == 1  # nothing before version 1
    # a rejected version is only promoted on purpose
    assert main(["--tracking-uri", mlflow_server, "promote", "reg-a", "3"]) == 1
    assert main(["--tracking-uri", mlflow_server, "promote", "reg-a", "2"]) == 0
    assert _aliases(client, "reg-a") == {"champion": "2", "previous": "1"}
    assert client.get_model_version("reg-a", "2").tags[TAG_STATUS] == "passed"


def test_on_fail_skip_registers_nothing(registry_config, toy_adapters, mlflow_server):
    cfg = registry_config("reg-b", "registry.on_fail=skip", "gate.checks={clip_t: {min: 0.6}}")
    result = run(cfg, str(toy_adapters["random"]))
    assert not result.passed and result.registry["action"] == "not registered"
    assert MlflowClient(mlflow_server).search_model_versions("name='reg-b'") == []


def test_the_same_adapter_again_changes_nothing(registry_config, toy_adapters, mlflow_server):
    run(registry_config("reg-c"), str(toy_adapters["good"]))
    again = run(registry_config("reg-c"), str(toy_adapters["good"]))
    assert again.registry["action"] == "unchanged" and "already champion (version 1)" in again.registry["note"]
    assert len(MlflowClient(mlflow_server).search_model_versions("name='reg-c'")) == 1


def test_a_champion_scored_on_another_suite_is_re_evaluated(registry_config, toy_adapters, weak_adapter):
    run(registry_config("reg-d"), str(weak_adapter))
    result = run(registry_config("reg-d", "generation.steps=8"), str(toy_adapters["good"]))
    assert result.gate.champion["source"] == "re-evaluated" and result.passed


def test_tampered_or_mismatched_adapters_are_refused_at_load(
    registry_config, toy_adapters, mlflow_server, tmp_path, monkeypatch
):
    result = run(registry_config("reg-e"), str(toy_adapters["good"]))
    client = MlflowClient(mlflow_server)
    run_id = result.run_id
    dl = tmp_path / "downloads"
    monkeypatch.chdir(tmp_path)
    assert fetch_adapter("models:/reg-e@champion", "downloads", mlflow_server).version == "1"  # relative works too
    fetched = fetch_adapter("models:/reg-e/1", dl, mlflow_server)  # a second fetch replaces the first copy
    assert fetched.path == dl / "reg-e-v1" / "adapter" and [p.name for p in dl.iterdir()] == ["reg-e-v1"]

    # the weights re-uploaded under the registered version: their sha256 no longer matches the adapter's JSON
    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray((toy_adapters["good"] / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF
    (bad / WEIGHTS_NAME).write_bytes(bytes(data))
    client.log_artifact(run_id, str(bad / WEIGHTS_NAME), "adapter")
    with pytest.raises(AdapterError, match="sha256 .* does not match"):
        fetch_adapter("models:/reg-e@champion", tmp_path / "a", mlflow_server)
    assert list((tmp_path / "a").iterdir()) == []  # a refused download is not left behind

    # … and with a JSON rewritten to match: the registry's own tag still catches it
    meta = json.loads((toy_adapters["good"] / META_NAME).read_text()) | {"sha256": file_sha256(bad / WEIGHTS_NAME)}
    (bad / META_NAME).write_text(json.dumps(meta))
    client.log_artifact(run_id, str(bad / META_NAME), "adapter")
    with pytest.raises(AdapterError, match="changed after registration — refusing to load"):
        fetch_adapter("models:/reg-e@champion", tmp_path / "b", mlflow_server)

    # a version registered for another base model
    client.set_model_version_tag("reg-e", "1", "base_model", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    client.log_artifact(run_id, str(toy_adapters["good"] / WEIGHTS_NAME), "adapter")
    client.log_artifact(run_id, str(toy_adapters["good"] / META_NAME), "adapter")
    with pytest.raises(AdapterError, match="registered for base model 'stable-diffusion-v1-5/"):
        fetch_adapter("models:/reg-e/1", tmp_path / "c", mlflow_server)


def test_references_that_name_nothing_are_clear_errors(mlflow_server, tmp_path, monkeypatch):
    with pytest.raises(RegistryError, match="models:/<name>@<alias>"):
        parse_model_ref("models:/just-a-name")
    with pytest.raises(RegistryError, match="registered model 'nope' has no alias 'champion'"):
        fetch_adapter("models:/nope@champion", tmp_path, mlflow_server)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RegistryError, match="needs an MLflow tracking URI"):
        fetch_adapter("models:/nope@champion", tmp_path, None)


def test_promote_and_rollback_on_a_sqlite_registry(tmp_path):
    """Without a server the registry is a SQLite file (versions come back as ints there, strings over REST)."""
    from evaluation.registry import client_for, describe, promote, register, rollback

    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    for _ in range(3):
        register(client, "m", f"runs:/{run_id}/adapter", run_id, {"adapter_sha256": "x"})
    assert promote(client, "m", "1") is None
    assert promote(client, "m", "2") == "1" and promote(client, "m", "3") == "2"
    assert promote(client, "m", "3") is None  # already champion
    assert [r["aliases"] for r in describe(client, "m")] == [[], ["previous"], ["champion"]]
    assert rollback(client, "m") == ("3", "2")
    assert [r["aliases"] for r in describe(client, "m")] == [["previous"], ["champion"], []]
    assert rollback(client, "m") == ("2", "1")
    assert [r["aliases"] for r in describe(client, "m")] == [["champion"], [], []]
    with pytest.raises(RegistryError, match="no earlier champion"):
        rollback(client, "m")


def test_lorafleets_models_are_tagged_and_a_missing_name_is_told_from_a_registry_that_is_down(tmp_path, monkeypatch):
    """register() tags the model (also one created before the tag); resolve_version raises NotInRegistry for a
    name the registry does not hold and a plain RegistryError when the registry cannot be reached."""
    from evaluation.registry import (
        MODEL_TAG,
        NotInRegistry,
        adapter_models,
        client_for,
        register,
        resolve_version,
        rollback,
        unservable,
    )

    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e", artifact_location=tmp_path.as_uri())).info.run_id
    client.create_registered_model("old-lora")  # registered by an earlier lorafleet, untagged
    client.create_registered_model("not-ours")
    for name in ("new-lora", "old-lora", "new-lora"):
        register(client, name, f"runs:/{run_id}/adapter", run_id, {TAG_STATUS: "passed"})
    assert [m.name for m in adapter_models(client)] == ["new-lora", "old-lora"]
    assert client.get_registered_model("old-lora").tags[MODEL_TAG] == "true"

    assert str(resolve_version(client, "models:/new-lora/2").version) == "2"
    for ref in ("models:/nope@champion", "models:/new-lora@previous", "models:/new-lora/7", "models:/nope/1"):
        with pytest.raises(NotInRegistry):
            resolve_version(client, ref)

    # gated versions: a rejected or rolled-back one is refused by number while no alias holds it
    register(client, "new-lora", f"runs:/{run_id}/adapter", run_id, {TAG_STATUS: "rejected"})
    assert "rejected by the evaluation gate" in unservable(client.get_model_version("new-lora", "3"))
    assert unservable(client.get_model_version("new-lora", "2")) is None
    from evaluation.registry import promote

    promote(client, "new-lora", "1")
    promote(client, "new-lora", "2")
    rollback(client, "new-lora")
    assert "rolled back" in unservable(client.get_model_version("new-lora", "2"))
    promote(client, "new-lora", "3")  # on purpose (--force): the alias serves it
    assert unservable(client.get_model_version("new-lora", "3")) is None

    from training.mlflow_server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = client_for(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryError, match="the registry did not answer") as err:
        resolve_version(down, "models:/new-lora@champion")
    assert not isinstance(err.value, NotInRegistry)
